"""Everything a notebook needs: `from icefast.all import *` (not used inside the package)."""
from fastai.vision.all import *
from icefast.core import *
from icefast.parsers import *
from icefast.data import *
from icefast import backbones
from icefast.models import (faster_rcnn, mask_rcnn, efficientdet, retinanet, fcos, create_model, list_models, register_model,
                            model_spec, save_model, load_model, Detector)
from icefast.metrics import *
from icefast.learner import *
from icefast.runtime import *
from icefast.export import *
from icefast.distributed import *
from icefast.synthetic import *
