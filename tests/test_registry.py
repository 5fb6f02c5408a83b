"""The model registry and protocol: every architecture builds by name, matches torchvision's parameter counts on the meta
device, round-trips through save_model/load_model, and the learner and CLI know no architecture."""
import re, warnings
from pathlib import Path

import pytest
import torch
import torchvision.models.detection as tvd

from icefast.models import create_model, list_models, model_spec, save_model, load_model
from icefast.models.core import Detector

ROOT = Path(__file__).resolve().parents[1]

def n_params(m): return sum(p.numel() for p in m.parameters())

def test_list_models_lists_every_architecture():
    assert list_models() == ['efficientdet', 'faster_rcnn', 'fcos', 'mask_rcnn', 'retinanet']
    assert 'resnet_fpn.resnet18' in list_models('retinanet') and 'resnet50_fpn_v2' in list_models('retinanet')
    assert 'resnet50_fpn_v2' not in list_models('fcos') and 'tf_efficientdet_lite0' in list_models('efficientdet')
    with pytest.raises(KeyError, match="unknown architecture 'yolo'; registered: \\['efficientdet'"): create_model('yolo', num_classes=3)

TORCHVISION = [('faster_rcnn', 'resnet_fpn.resnet50', tvd.fasterrcnn_resnet50_fpn), ('faster_rcnn', 'resnet50_fpn_v2', tvd.fasterrcnn_resnet50_fpn_v2),
               ('mask_rcnn', 'resnet_fpn.resnet50', tvd.maskrcnn_resnet50_fpn), ('mask_rcnn', 'resnet50_fpn_v2', tvd.maskrcnn_resnet50_fpn_v2),
               ('retinanet', 'resnet_fpn.resnet50', tvd.retinanet_resnet50_fpn), ('retinanet', 'resnet50_fpn_v2', tvd.retinanet_resnet50_fpn_v2),
               ('fcos', 'resnet_fpn.resnet50', tvd.fcos_resnet50_fpn)]

@pytest.mark.parametrize('arch,backbone,builder', TORCHVISION, ids=[f'{a}-{b}' for a, b, _ in TORCHVISION])
def test_parameters_equal_torchvisions_builders(arch, backbone, builder):
    "Counted on the meta device: nothing is allocated, so the big ones cost nothing."
    with torch.device('meta'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ours = create_model(arch, backbone=backbone, num_classes=5)
        theirs = builder(weights=None, weights_backbone=None, num_classes=5)
    assert n_params(ours) == n_params(theirs) and isinstance(ours, Detector)
    assert model_spec(arch).has_coco(backbone)

def test_coco_weights_are_known_per_backbone():
    assert not model_spec('retinanet').has_coco('resnet_fpn.resnet18') and model_spec('fcos').has_coco()
    assert model_spec('efficientdet').has_coco('tf_efficientdet_lite0') and not model_spec('efficientdet').has_coco('mobilenetv3_large_100')
    assert model_spec('mask_rcnn').masks and not model_spec('retinanet').masks
    from icefast.backbones import WeightsUnavailable
    with pytest.raises(WeightsUnavailable, match='no COCO weights for retinanet resnet_fpn.resnet18'):
        create_model('retinanet', backbone='resnet_fpn.resnet18', num_classes=3, pretrained=True)

SMALL = [('faster_rcnn', 'resnet_fpn.resnet18'), ('mask_rcnn', 'resnet_fpn.resnet18'), ('retinanet', 'resnet_fpn.resnet18'),
         ('fcos', 'resnet_fpn.resnet18'), ('efficientdet', 'tf_efficientdet_lite0'), ('efficientdet', 'mobilenetv3_small_100')]

@pytest.mark.parametrize('arch,backbone', SMALL, ids=[f'{a}-{b}' for a, b in SMALL])
def test_every_architecture_round_trips_through_save_and_load(arch, backbone, tmp_path):
    "save_model / load_model rebuild the model through the registry: the same tensors, frozen parameters and predictions."
    torch.manual_seed(0)
    m = create_model(arch, backbone=backbone, num_classes=3, img_size=128)
    for n, b in m.named_buffers():  # batch-norm statistics that differ from the init's
        if n.endswith('running_mean'): b.uniform_(-.1, .1)
    next(iter(m.parameters())).requires_grad_(False)
    m.score_thresholds = {'a': 0.31, 'b': 0.62}  # chosen on a validation set: saved with the weights
    save_model(m, tmp_path/'m.pth')
    loaded = load_model(tmp_path/'m.pth')
    assert type(loaded) is type(m) and loaded.icefast_config == m.icefast_config and loaded.score_thresholds == m.score_thresholds
    sa, sb = m.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [n for n, p in m.named_parameters() if not p.requires_grad] == [n for n, p in loaded.named_parameters() if not p.requires_grad]
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad(): a, b = m.eval()(x), loaded.eval()(x)
    assert all(torch.equal(da['boxes'], db['boxes']) and torch.equal(da['scores'], db['scores']) for da, db in zip(a, b))

def test_the_seeds_spellings_are_entries_over_the_registry():
    from icefast.models import faster_rcnn, efficientdet, retinanet, fcos
    a = faster_rcnn.model(backbone='resnet_fpn.resnet18', num_classes=3)
    b = create_model('faster_rcnn', backbone='resnet_fpn.resnet18', num_classes=3)
    assert n_params(a) == n_params(b) and a.icefast_config == b.icefast_config
    e = efficientdet.model(model_name='tf_efficientdet_lite0', num_classes=3, img_size=128)
    assert e.icefast_config == create_model('efficientdet', backbone='tf_efficientdet_lite0', num_classes=3, img_size=128).icefast_config
    with pytest.raises(TypeError): faster_rcnn.model('resnet_fpn.resnet18', 3)  # keyword arguments after the first
    assert callable(retinanet.fastai.learner) and callable(fcos.fastai.learner)

def test_learner_cli_and_metrics_know_no_architecture():
    "The issue's check: no class names or private attributes of the architectures in the shared modules."
    pat = re.compile(r"MaskRCNN|EfficientDetModel|roi_heads|\.rpn|config\.num_classes|resnet50_fpn_v2")
    for f in ('learner.py', 'cli.py', 'metrics.py'):
        hits = [l for l in (ROOT/'icefast'/f).read_text().splitlines() if pat.search(l)]
        assert not hits, (f, hits)

FLOW = ['core', 'parsers', 'data', 'backbones', 'models', 'metrics', 'learner', 'distributed', 'cli']

def test_imports_follow_the_data_flow():
    "No module imports one below it in the flow, not even inside a function."
    for i, mod in enumerate(FLOW):
        files = sorted((ROOT/'icefast'/mod).glob('*.py')) if (ROOT/'icefast'/mod).is_dir() else [ROOT/'icefast'/f'{mod}.py']
        below = FLOW[i + 1:]
        for f in files:
            src = f.read_text()
            for b in below:
                assert not re.search(rf"^\s*(from|import) (icefast\.|\.+){b}\b", src, re.M), f"{f.name} imports icefast.{b}, which is below it"
