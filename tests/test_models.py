"The model catalog: every name builds offline, matches upstream, groups its parameters, trains a step and predicts."
import math, socket, time, warnings

import pytest
import torch
import torchvision
import torchvision.models.detection as tvd
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from icefast import backbones
from icefast.backbones import WeightsUnavailable, list_backbones
from icefast.models import faster_rcnn, mask_rcnn, efficientdet
from icefast.models.efficientdet import EFFDET_NAMES, EFFDET_ALIASES, TIMM_PRESETS, efficientdet_config

NUM_CLASSES = 3  # two classes and the background

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    "Nothing here may open a connection: `pretrained=False` never touches the network."
    def refuse(*args, **kwargs): raise OSError("network access attempted in a test")
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    torch.manual_seed(0)

def n_params(m): return sum(p.numel() for p in m.parameters())

def check_groups(groups, model):
    "Groups cover every trainable parameter exactly once (stages the builder froze stay out), in at least 3 groups, heads last."
    ids = [id(p) for g in groups for p in g]
    assert len(groups) >= 3 and all(groups)
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad} and len(ids) == len(set(ids))

# ---------------------------------------------------------------- upstream references
def rcnn_reference(arch, name):
    "The upstream torchvision builder of the same architecture, where torchvision has one."
    kw = dict(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    own = {('faster_rcnn', 'resnet_fpn.resnet50'): tvd.fasterrcnn_resnet50_fpn, ('faster_rcnn', 'resnet50_fpn_v2'): tvd.fasterrcnn_resnet50_fpn_v2,
           ('faster_rcnn', 'mobilenet.mobilenet_v3_large_fpn'): tvd.fasterrcnn_mobilenet_v3_large_fpn,
           ('mask_rcnn', 'resnet_fpn.resnet50'): tvd.maskrcnn_resnet50_fpn, ('mask_rcnn', 'resnet50_fpn_v2'): tvd.maskrcnn_resnet50_fpn_v2}
    if (arch, name) in own: return own[(arch, name)](**kw)
    if name.startswith('resnet_fpn.'):
        bb = resnet_fpn_backbone(backbone_name=name.split('.')[1], weights=None, trainable_layers=5, norm_layer=torch.nn.BatchNorm2d)
        return (tvd.MaskRCNN if arch == 'mask_rcnn' else tvd.FasterRCNN)(bb, num_classes=NUM_CLASSES)
    return None

HEAVY = {'resnet_fpn.resnet152', 'resnet_fpn.resnext101_32x8d', 'resnet_fpn.wide_resnet101_2', 'resnet.resnet152', 'resnet.resnext101_32x8d'}
LIGHT_RCNN = {('faster_rcnn', 'resnet_fpn.resnet18'), ('faster_rcnn', 'resnet.resnet18'), ('faster_rcnn', 'mobilenet.mobilenet_v3_large_fpn'),
              ('faster_rcnn', 'mobilenet.mobilenet'), ('faster_rcnn', 'vgg.vgg11'), ('mask_rcnn', 'resnet_fpn.resnet18')}

def train_and_eval_step(model, groups, size, masks=False, n_classes=NUM_CLASSES):
    "One training step unfrozen and one frozen (gradients reach the backbone only when unfrozen), then an eval forward."
    images = torch.rand(2, 3, size, size)
    boxes = torch.tensor([[10., 12., 60., 70.], [30., 40., 100., 110.]])
    top = n_classes - 1  # the last class id
    targets = [{'boxes': boxes, 'labels': torch.tensor([1, top])}, {'boxes': boxes[:1], 'labels': torch.tensor([top])}]
    if masks:
        for t in targets:
            t['masks'] = torch.zeros(len(t['boxes']), size, size, dtype=torch.uint8)
            for m, b in zip(t['masks'], t['boxes'].long()): m[b[1]:b[3], b[0]:b[2]] = 1
    backbone = groups[0]
    for frozen in (False, True):
        for g in groups[:-1]:
            for p in g: p.requires_grad_(not frozen)
        model.zero_grad(set_to_none=True)
        model.train()
        losses = model(list(images), targets)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        total.backward()
        reached = [p for p in backbone if p.grad is not None and p.grad.abs().sum() > 0]
        if frozen: assert not reached, "frozen backbone received gradients"
        else: assert reached, "gradients did not reach the backbone"
    model.eval()
    with torch.no_grad(): out = model(list(images))
    keys = {'boxes', 'labels', 'scores'} | ({'masks'} if masks else set())
    assert len(out) == 2 and all(keys <= set(o) for o in out)
    return losses

# ---------------------------------------------------------------- Faster and Mask R-CNN
RCNN_CASES = [(a, n) for a in ('faster_rcnn', 'mask_rcnn') for n in (faster_rcnn if a == 'faster_rcnn' else mask_rcnn).list_models()]

@pytest.mark.parametrize('arch,name', RCNN_CASES, ids=[f'{a}-{n}' for a, n in RCNN_CASES])
def test_rcnn_catalog(arch, name):
    "Every catalog entry: upstream's parameter count and our groups; one light backbone per family trains a real step, the rest are wired on the meta device."
    mod = faster_rcnn if arch == 'faster_rcnn' else mask_rcnn
    light = (arch, name) in LIGHT_RCNN
    with torch.device('cpu' if light else 'meta'): model = mod.model(backbone=name, num_classes=NUM_CLASSES, img_size=128)
    with torch.device('meta'): ref = rcnn_reference(arch, name)  # upstream's parameter count, without building it for real
    if ref is not None: assert n_params(model) == n_params(ref), f"{n_params(model)} vs upstream {n_params(ref)}"
    groups = mod.param_groups(model)
    check_groups(groups, model)
    assert {id(p) for p in groups[-1]} >= {id(p) for p in model.roi_heads.parameters()}
    assert model.transform.min_size == (128,) and model.transform.max_size == 128
    if light:
        model.cpu_light()  # the CPU's sampling: the wiring is checked, not torchvision's 2000 proposals and 512 RoIs
        return train_and_eval_step(model, groups, 128, masks=arch == 'mask_rcnn')
    with torch.device('meta'):  # shapes through backbone, RPN head and RoI heads, without computing anything
        feats = model.backbone(torch.empty(1, 3, 64, 64))
        feats = list((feats if isinstance(feats, dict) else {'0': feats}).values())
        assert all(f.shape[1] == model.backbone.out_channels for f in feats)
        objectness, deltas = model.rpn.head(feats)
        assert [o.shape[1] * 4 for o in objectness] == [d.shape[1] for d in deltas]
        scores, boxes = model.roi_heads.box_predictor(model.roi_heads.box_head(torch.empty(5, model.backbone.out_channels, 7, 7)))
        assert scores.shape == (5, NUM_CLASSES) and boxes.shape == (5, 4 * NUM_CLASSES)
        if arch == 'mask_rcnn':
            masks = model.roi_heads.mask_predictor(model.roi_heads.mask_head(torch.empty(5, model.backbone.out_channels, 14, 14)))
            assert masks.shape == (5, NUM_CLASSES, 28, 28)

def test_backbone_module_and_name_build_the_same_model():
    a = faster_rcnn.model(backbone=backbones.resnet_fpn.resnet34(pretrained=False), num_classes=NUM_CLASSES)
    b = faster_rcnn.model(backbone='resnet_fpn.resnet34', num_classes=NUM_CLASSES)
    assert n_params(a) == n_params(b)
    assert faster_rcnn.model(num_classes=NUM_CLASSES).icefast_config['backbone'] == 'resnet_fpn.resnet50'

def test_backbone_list_and_families():
    assert len(list_backbones()) == 9 + 6 + 4 + 4
    assert backbones.resnet_fpn.list() == ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d',
                                           'resnext101_32x8d', 'wide_resnet50_2', 'wide_resnet101_2']
    assert backbones.vgg.list() == ['vgg11', 'vgg13', 'vgg16', 'vgg19']
    with pytest.raises(AttributeError, match='this family has'): backbones.resnet.resnet19
    with pytest.raises(KeyError, match='unknown backbone'): faster_rcnn.model(backbone='resnet_fpn.resnet19', num_classes=3)
    with pytest.raises(ValueError, match='len\\(class_map\\)'): faster_rcnn.model(num_classes=None)

# ---------------------------------------------------------------- EfficientDet
EFFDET_CLASSES = 2  # one class and the background at the smallest legal size: fewer anchors x classes than effdet's top-k

def effdet_reference(name, size):
    from effdet import create_model
    return create_model(EFFDET_ALIASES.get(name, name), num_classes=EFFDET_CLASSES - 1, pretrained=False, pretrained_backbone=False,
                        image_size=(size, size))

EFFDET_LIGHT = {'tf_efficientdet_lite0', 'efficientdet_d0', 'mobilenetv3_large_100'}

@pytest.mark.parametrize('name', EFFDET_NAMES + TIMM_PRESETS)
def test_efficientdet_catalog(name):
    "Every EfficientDet at its smallest legal size with one class: upstream's parameters, groups, and it predicts (effdet's top-k fits)."
    timm_backbone = name in TIMM_PRESETS
    size = 256 if name.endswith('d7x') else 128
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = (efficientdet.model(backbone=name, num_classes=EFFDET_CLASSES, img_size=size) if timm_backbone
                 else efficientdet.model(name, num_classes=EFFDET_CLASSES, img_size=size))
    if timm_backbone:
        from effdet import EfficientDet
        with torch.device('meta'):
            ref = EfficientDet(efficientdet_config(backbone=name, img_size=size, num_classes=EFFDET_CLASSES - 1), pretrained_backbone=False)
    else:
        with torch.device('meta'): ref = effdet_reference(name, size)
    assert n_params(model) == n_params(ref), f"{n_params(model)} vs upstream {n_params(ref)}"
    groups = efficientdet.param_groups(model)
    check_groups(groups, model)
    if name in EFFDET_LIGHT: train_and_eval_step(model, groups, size, n_classes=EFFDET_CLASSES)
    else:  # the rest (the heaviest included) at least predict on one tiny image
        model.eval()
        with torch.no_grad(): out = model(torch.rand(1, 3, size, size))
        assert {'boxes', 'labels', 'scores'} <= set(out[0])

def test_efficientdet_aliases_say_what_they_build():
    with pytest.warns(UserWarning, match='building tf_efficientdet_d6'):
        m = efficientdet.model('efficientdet_d6', num_classes=NUM_CLASSES, img_size=128)
    assert m.config.name == 'tf_efficientdet_d6'

def test_efficientdet_size_rule_and_refusals():
    with pytest.raises(ValueError, match='multiples of 2\\*\\*max_level = 128'): efficientdet.model('efficientdet_d0', num_classes=3, img_size=300)
    efficientdet.model('tf_efficientdet_lite0', num_classes=3)  # its native 320
    with pytest.raises(ValueError, match='strides \\[16, 16, 16\\]'): efficientdet.model(backbone='vit_tiny_patch16_224', num_classes=3)
    m = efficientdet.model('tf_efficientdet_lite0', num_classes=3, img_size=256)
    with pytest.raises(ValueError, match='built for \\(256, 256\\)'): m.eval()(torch.rand(1, 3, 384, 384))

# ---------------------------------------------------------------- weights from local files
def test_backbone_weights_from_upstream_checkpoint(tmp_path):
    ref = torchvision.models.resnet34()
    torch.save(ref.state_dict(), tmp_path/'resnet34.pth')
    b = backbones.resnet_fpn.resnet34(pretrained=tmp_path/'resnet34.pth')
    for k, v in ref.state_dict().items():
        if k.startswith('fc.') or k.endswith('num_batches_tracked'): continue
        assert torch.equal(b.body.state_dict()[k], v), k
    assert type(b.body.bn1).__name__ == 'FrozenBatchNorm2d'  # built as pretrained=True builds it
    ref = torchvision.models.vgg11()
    torch.save(ref.state_dict(), tmp_path/'vgg11.pth')
    assert torch.equal(backbones.vgg.vgg11(pretrained=tmp_path/'vgg11.pth')[0].weight, ref.features[0].weight)

def test_load_weights_reports_each_key_once():
    "A tensor whose shape differs is re-initialized, and is not also reported as missing."
    from icefast.backbones import load_weights
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5)).state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        rep = load_weights(net, state, 'toy')
    assert rep.reinitialized == ['1.weight', '1.bias'] and rep.missing == [] and rep.unexpected == []
    assert [str(w.message).split(':')[0] for w in caught] == ['toy']  # one warning: the re-initialization
    assert 're-initialized 2 tensors' in str(caught[0].message) and torch.equal(net[0].weight, state['0.weight'])
    del state['0.bias']
    with pytest.warns(UserWarning, match='1 missing'): assert load_weights(net, state, 'toy').missing == ['0.bias']
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    for other in ({'conv.weight': torch.zeros(4, 3, 1, 1)}, {'0.weight': torch.zeros(5, 3, 1, 1)}):  # other names; other shapes
        with pytest.raises(ValueError, match='toy: none of the weights fit'), warnings.catch_warnings():
            warnings.simplefilter('ignore'); load_weights(bn, other, 'toy')

def test_detector_weights_from_upstream_checkpoint(tmp_path):
    ref = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(ref.state_dict(), tmp_path/'fasterrcnn_resnet50_fpn_coco.pth')
    with pytest.warns(UserWarning, match='re-initialized'):
        m = faster_rcnn.model(num_classes=NUM_CLASSES, pretrained=tmp_path/'fasterrcnn_resnet50_fpn_coco.pth')
    assert torch.equal(m.backbone.body.layer1[0].conv1.weight, ref.backbone.body.layer1[0].conv1.weight)
    assert torch.equal(m.rpn.head.conv[0][0].weight, ref.rpn.head.conv[0][0].weight)
    assert m.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    assert type(m.backbone.body.bn1).__name__ == 'FrozenBatchNorm2d'

def test_effdet_weights_from_upstream_checkpoints(tmp_path):
    from effdet import create_model
    import timm
    from safetensors.torch import save_file
    ref = create_model('tf_efficientdet_lite0', num_classes=90, pretrained=False, pretrained_backbone=False)
    torch.save(ref.state_dict(), tmp_path/'tf_efficientdet_lite0.pth')
    with pytest.warns(UserWarning, match='re-initialized'):
        m = efficientdet.model('tf_efficientdet_lite0', num_classes=NUM_CLASSES, pretrained=tmp_path/'tf_efficientdet_lite0.pth')
    assert all(torch.equal(a, b) for a, b in zip(m.net.fpn.parameters(), ref.fpn.parameters()))
    assert torch.equal(m.net.backbone.conv_stem.weight, ref.backbone.conv_stem.weight)
    tm = timm.create_model('mobilenetv3_large_100', pretrained=False)
    save_file(tm.state_dict(), str(tmp_path/'model.safetensors'))
    m = efficientdet.model(backbone='mobilenetv3_large_100', num_classes=NUM_CLASSES, img_size=256, pretrained_backbone=tmp_path/'model.safetensors')
    assert torch.equal(m.net.backbone.conv_stem.weight, tm.conv_stem.weight)
    assert torch.equal(m.net.backbone.blocks[3][0].conv_pw.weight, tm.blocks[3][0].conv_pw.weight)

def test_pretrained_true_offline_fails_fast_with_help(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    for build in (lambda: faster_rcnn.model(num_classes=NUM_CLASSES, pretrained=True),
                  lambda: backbones.resnet_fpn.resnet18(pretrained=True),
                  lambda: efficientdet.model('tf_efficientdet_lite0', num_classes=NUM_CLASSES, pretrained=True),
                  lambda: efficientdet.model(backbone='mnasnet_100', num_classes=NUM_CLASSES, pretrained_backbone=True)):
        t = time.time()
        with pytest.raises(WeightsUnavailable, match="pass pretrained(_backbone)?='/path/to/"):
            build()
        assert time.time() - t < 30
    with pytest.raises(WeightsUnavailable, match=r"state_dict\(\) as a \.pth file.*CLI: --pretrained PATH"):  # timm: a .pth works too
        efficientdet.model(backbone='mnasnet_100', num_classes=NUM_CLASSES, pretrained_backbone=True)

def test_saved_weights_rebuild_with_plain_torchvision(tmp_path):
    m = faster_rcnn.model(backbone='resnet_fpn.resnet18', num_classes=NUM_CLASSES, img_size=160)
    faster_rcnn.save_model(m, tmp_path/'model.pth')
    # the snippet of nbs/04_models.rcnn.ipynb, with torchvision alone
    ckpt = torch.load(tmp_path/'model.pth', map_location='cpu')
    cfg = ckpt['icefast']
    backbone = resnet_fpn_backbone(backbone_name=cfg['backbone'].split('.')[1], weights=None, trainable_layers=5)
    plain = tvd.FasterRCNN(backbone, num_classes=cfg['num_classes'], min_size=min(cfg['img_size']), max_size=max(cfg['img_size']))
    res = plain.load_state_dict(ckpt['state_dict'], strict=False)
    assert not res.unexpected_keys and all(k.endswith('num_batches_tracked') for k in res.missing_keys)
    x = [torch.rand(3, 160, 160)]
    with torch.no_grad(): a, b = m.eval()(x), plain.eval()(x)
    assert torch.equal(a[0]['boxes'], b[0]['boxes'])

def _same_model(a, b, x):
    "Same tensors, same frozen parameters, same batch-norm kinds, same outputs on `x`."
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [n for n, p in a.named_parameters() if not p.requires_grad] == [n for n, p in b.named_parameters() if not p.requires_grad]
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    with torch.no_grad(): oa, ob = a.eval()(x), b.eval()(x)
    assert all(torch.equal(da['boxes'], db['boxes']) for da, db in zip(oa, ob))

@pytest.mark.parametrize('build', ['fine_tuned', 'scratch', 'mask_rcnn'])
def test_load_model_rebuilds_rcnn_as_saved(build, tmp_path):
    "Frozen batch-norm and torchvision's frozen stages (a fine-tuned COCO model) or plain batch-norm (from scratch) come back."
    from icefast.models import save_model, load_model
    kw = dict(backbone='resnet_fpn.resnet18', num_classes=NUM_CLASSES, img_size=(96, 128))
    if build == 'fine_tuned':
        torch.save(faster_rcnn.model(**kw).state_dict(), tmp_path/'coco.pth')
        m = faster_rcnn.model(pretrained=tmp_path/'coco.pth', **kw)
        assert type(m.backbone.body.bn1).__name__ == 'FrozenBatchNorm2d' and not m.backbone.body.layer1[0].conv1.weight.requires_grad
    else:
        m = (mask_rcnn if build == 'mask_rcnn' else faster_rcnn).model(**kw, box_detections_per_img=50)
        m.roi_heads.box_head.fc6.weight.requires_grad_(False)  # frozen by hand: stays frozen
    for n, b in m.named_buffers():  # batch-norm statistics that differ from the init's
        if n.endswith('running_mean'): b.uniform_(-.1, .1)
    save_model(m, tmp_path/'model.pth')
    loaded = load_model(tmp_path/'model.pth')
    _same_model(m, loaded, [torch.rand(3, 96, 128)])
    assert loaded.transform.min_size == m.transform.min_size and loaded.icefast_pretrained
    assert loaded.roi_heads.detections_per_img == m.roi_heads.detections_per_img

def test_load_model_rebuilds_efficientdet(tmp_path):
    from icefast.models import save_model, load_model
    m = efficientdet.model(backbone='resnet18', num_classes=NUM_CLASSES, img_size=(128, 256))
    save_model(m, tmp_path/'model.pth')
    _same_model(m, load_model(tmp_path/'model.pth'), torch.rand(1, 3, 128, 256))

def test_load_model_refuses_what_it_cannot_rebuild(tmp_path):
    from icefast.models import save_model, load_model
    from icefast.backbones import build_backbone
    with pytest.raises(FileNotFoundError, match='none.pth: model file not found'): load_model(tmp_path/'none.pth')
    m = faster_rcnn.model(backbone='resnet_fpn.resnet18', num_classes=NUM_CLASSES)
    torch.save(m.state_dict(), tmp_path/'plain.pth')
    with pytest.raises(ValueError, match="plain.pth: not written by save_model .* pretrained="): load_model(tmp_path/'plain.pth')
    bb = build_backbone('resnet_fpn.resnet18'); bb.icefast_name = None  # a backbone module of the user's own
    save_model(faster_rcnn.model(backbone=bb, num_classes=NUM_CLASSES), tmp_path/'own.pth')
    with pytest.raises(ValueError, match='own.pth: saved with a backbone module of your own'): load_model(tmp_path/'own.pth')
    (tmp_path/'text.pth').write_text('hello')
    with pytest.raises(ValueError, match='text.pth: not a PyTorch file'): load_model(tmp_path/'text.pth')

def test_saved_efficientdet_rebuilds_with_plain_effdet(tmp_path):
    from effdet import create_model, DetBenchPredict
    m = efficientdet.model('tf_efficientdet_lite0', num_classes=NUM_CLASSES, img_size=256).eval()
    efficientdet.save_model(m, tmp_path/'model.pth')
    ckpt = torch.load(tmp_path/'model.pth', map_location='cpu')
    cfg = ckpt['icefast']
    net = create_model(cfg['backbone'], num_classes=cfg['num_classes'] - 1, image_size=cfg['img_size'],
                       pretrained=False, pretrained_backbone=False)
    net.load_state_dict({k[12:]: v for k, v in ckpt['state_dict'].items() if k.startswith('bench.model.')})
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        ours = m(x)[0]
        plain = DetBenchPredict(net).eval()((x - m.mean) / m.std)[0]
    plain = plain[plain[:, 4] > 0]
    assert torch.allclose(ours['boxes'], plain[:, :4]) and torch.equal(ours['labels'], plain[:, 5].long())
