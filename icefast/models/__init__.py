"""icefast's detectors: one registry (`create_model`, `list_models`, `register_model`), one protocol (`Detector`), and the
architectures that fill them. Importing this package registers every built-in architecture."""
from .core import (Detector, ModelSpec, register_model, create_model, list_models, model_spec, save_model, load_model,
                   fine_tune_recipe)
from . import faster_rcnn, mask_rcnn, efficientdet, retinanet, fcos  # each registers its architecture

__all__ = ['Detector', 'ModelSpec', 'register_model', 'create_model', 'list_models', 'model_spec', 'save_model', 'load_model',
           'fine_tune_recipe', 'faster_rcnn', 'mask_rcnn', 'efficientdet', 'retinanet', 'fcos']
