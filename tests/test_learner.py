"The shared Learner adapter: losses, one-pass validation without moving batch-norm, COCO metrics that rise with training."
import warnings
import numpy as np
import pytest
import torch
from fastai.torch_core import set_seed

from icefast.synthetic import make_shapes
from icefast.parsers import COCOParser
from icefast.data import dataloaders, IdSplitter
from icefast.learner import detection_learner, to_original, DetectionLoss
from icefast.models import faster_rcnn, efficientdet
from icefast.core import Record

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    ann, imgs = make_shapes(tmp_path_factory.mktemp('shapes'), n_images=48, size=(160, 128), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        p = COCOParser(ann, imgs)
        return p.parse(), p.class_map

@pytest.fixture(scope='module')
def trained(shapes):
    "A small Faster R-CNN trained 8 epochs on the shapes (about a minute on 2 cores)."
    records, cm = shapes
    set_seed(0, reproducible=True)
    dls = dataloaders(records, cm, size=128, bs=4, batch_tfms=[])
    learn = detection_learner(dls, faster_rcnn.model(backbone='resnet_fpn.resnet18', num_classes=len(cm)))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(8, 1e-3)
    return learn

def test_faster_rcnn_trains_loss_falls_and_map50_rises(trained):
    learn = trained
    names = learn.recorder.metric_names
    vals = np.array([[float(v) for v in row] for row in learn.recorder.values])
    train_loss, map50 = vals[:, 0], vals[:, names.index('mAP50') - 1]
    assert train_loss[-1] < 0.8 * train_loss[0], train_loss
    assert map50.max() > map50[0] + 0.15 and map50[-1] > 0.25, map50
    assert {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'} <= set(names)

def _iou(a, b):
    x0, y0 = max(a[0], b[0]), max(a[1], b[1]); x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1-x0) * max(0, y1-y0)
    return inter / ((a[2]-a[0])*(a[3]-a[1]) + (b[2]-b[0])*(b[3]-b[1]) - inter)

def test_predict_gives_boxes_on_the_original_image(trained, shapes):
    records, cm = shapes
    train = list(trained.dls.train_ds.items)
    hits = 0
    singles = [r for r in train if len(r) == 1][:6]
    for r in singles:  # 160 x 128 images, letterboxed to 128: boxes must come back to 160 x 128 pixels
        p = trained.predict(r.filepath)
        assert (p['boxes'][:, 2] <= 160).all() and (p['boxes'][:, 3] <= 128).all()
        if len(p['boxes']) and _iou(p['boxes'][0].tolist(), r.boxes[0].tolist()) > 0.5: hits += 1
        assert p['names'] == [cm.get_name(int(l)) for l in p['labels']]
    assert hits >= len(singles) // 2, f"{hits} of {len(singles)} top boxes hit their shape"

def test_get_preds_in_original_pixels(trained):
    preds, targs = trained.get_preds()
    assert len(preds) == len(targs) == len(trained.dls.valid_ds)
    assert all(set(p) == {'boxes', 'scores', 'labels'} for p in preds)
    assert all((p['boxes'][:, 2] <= 160).all() and (p['boxes'][:, 3] <= 128).all() for p in preds)

def test_export_and_load_learner_round_trip(trained, tmp_path):
    from fastai.learner import load_learner
    trained.export(tmp_path/'model.pkl')
    loaded = load_learner(tmp_path/'model.pkl')
    item = trained.dls.valid_ds.items[0].filepath
    a, b = trained.predict(item), loaded.predict(item)
    assert torch.allclose(a['boxes'], b['boxes']) and a['names'] == b['names']

def test_show_results_renders(trained, tmp_path):
    import matplotlib; matplotlib.use('Agg')
    fig = trained.show_results(max_n=2, threshold=0.3)
    fig.savefig(tmp_path/'show_results.png')
    assert len(fig.axes) == 4 and (tmp_path/'show_results.png').stat().st_size > 10000

def test_validation_is_one_pass_and_leaves_batchnorm_alone(shapes):
    records, cm = shapes
    dls = dataloaders(records[:12], cm, size=128, bs=4, batch_tfms=[], splitter=IdSplitter([r.image_id for r in records[:8]]))
    model = faster_rcnn.model(backbone='resnet.resnet18', num_classes=len(cm))
    learn = detection_learner(dls, model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    calls = []
    handle = model.backbone.register_forward_hook(lambda *a: calls.append(1))
    with learn.no_bar(), learn.no_logging(): res = learn.validate()
    handle.remove()
    assert len(calls) == len(dls.valid)  # one backbone pass per validation batch
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert res[0] > 0 and len(res) == 1 + len(learn.metrics)

def test_effdet_in_the_same_adapter(shapes):
    records, cm = shapes
    dls = dataloaders(records[:12], cm, size=128, bs=4, batch_tfms=[], splitter=IdSplitter([r.image_id for r in records[:4]]))
    learn = detection_learner(dls, efficientdet.model(backbone='mobilenetv3_small_100', num_classes=len(cm), img_size=128))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    names = learn.recorder.metric_names
    assert {'class_loss', 'box_loss', 'mAP', 'mAP50'} <= set(names)
    assert all(np.isfinite(float(v)) for v in learn.recorder.values[-1])

def test_detections_back_to_original_pixels(tmp_path):
    r = Record(tmp_path/'a.jpg', 'a', 200, 100, [1], [[20, 10, 60, 50]])
    # letterboxed to 128: scale 0.64, content 128 x 64
    det = {'boxes': torch.tensor([[12.8, 6.4, 38.4, 32.0], [100., 50., 140., 70.]]), 'scores': torch.tensor([0.9, 0.5]),
           'labels': torch.tensor([1, 1]), 'masks': torch.zeros(2, 1, 128, 128)}
    det['masks'][0, 0, 6:32, 13:38] = 1
    out = to_original(det, r, (128, 128))
    assert torch.allclose(out['boxes'][0], torch.tensor([20., 10., 60., 50.]), atol=1e-4)
    assert (out['boxes'][1] <= torch.tensor([200., 100., 200., 100.])).all()  # clipped to the image
    assert out['masks'].shape == (2, 100, 200)
    ys, xs = torch.nonzero(out['masks'][0], as_tuple=True)
    assert abs(xs.min().item() - 20) <= 2 and abs(ys.max().item() - 49) <= 2

def test_loss_is_the_models_own_sum():
    lf = DetectionLoss()
    losses = {'a': torch.tensor(1.5), 'b': torch.tensor(0.25)}
    assert lf(losses, None).item() == 1.75 and lf((losses, []), None).item() == 1.75
    assert set(lf.parts) == {'a', 'b'}

def test_nan_loss_stops_training_naming_the_images(shapes):
    from icefast.learner import NonFiniteLoss
    from fastai.callback.core import Callback
    records, cm = shapes
    dls = dataloaders(records[:12], cm, size=128, bs=4, batch_tfms=[], splitter=IdSplitter([r.image_id for r in records[:4]]))
    class Poison(Callback):
        order = -5  # after the adapter, before the model: corrupt the images of the second batch
        def before_batch(self):
            if self.training and self.iter == 1: self.learn.xb = (self.xb[0] * float('nan'), *self.xb[1:])
    learn = faster_rcnn.fastai.learner(dls, faster_rcnn.model(backbone='resnet.resnet18', num_classes=len(cm)), cbs=[Poison()])
    with pytest.raises(NonFiniteLoss, match=r"batch 1; training stopped\. The batch's images: \[.*\.jpg"):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)

def test_seed_entry_points():
    from icefast.models import mask_rcnn
    for mod in (faster_rcnn, mask_rcnn, efficientdet): assert callable(mod.fastai.learner)

def test_save_model_callback_monitors_map(shapes, tmp_path):
    from fastai.callback.tracker import SaveModelCallback
    records, cm = shapes
    dls = dataloaders(records[:12], cm, size=128, bs=4, batch_tfms=[], splitter=IdSplitter([r.image_id for r in records[:4]]))
    learn = detection_learner(dls, faster_rcnn.model(backbone='resnet.resnet18', num_classes=len(cm)), path=tmp_path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-3, cbs=SaveModelCallback(monitor='mAP', comp=np.greater, fname='best', with_opt=False))
    assert (tmp_path/'models'/'best.pth').is_file()
