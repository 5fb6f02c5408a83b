"""fastai-native object detection and instance segmentation."""

__version__ = "0.1.0"
