"COCO metrics equal pycocotools run directly on the original annotation file."
import contextlib, copy, io, json, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from icefast.parsers import COCOParser
from icefast.metrics import COCOEvaluator, detections_to_coco
from icefast.data import letterbox_scale

SAMPLES = Path(__file__).parent/'data'/'samples'

@pytest.fixture(scope='module')
def coco_records():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        p = COCOParser(SAMPLES/'annotations.json', SAMPLES/'images', masks=True)
        return p.parse(), p.class_map

def fixed_predictions(records, class_map, seed=0):
    "Imperfect detections as COCO results: jittered true boxes and masks, some with wrong classes, plus false positives."
    return [a for r, det in zip(records, fixed_detections(records, class_map, seed)) for a in detections_to_coco(r.image_id, det, class_map)]

def fixed_detections(records, class_map, seed=0):
    "Imperfect detections in each record's pixels: jittered true boxes and masks, some with wrong classes, plus false positives."
    rng = np.random.default_rng(seed)
    res = []
    for r in records:
        keep = ~r.iscrowd
        boxes, labels = r.boxes[keep].copy(), r.labels[keep].copy()
        masks = r.mask_array()[keep]
        boxes += rng.normal(0, 6, boxes.shape).astype(np.float32)
        wrong = rng.random(len(labels)) < 0.2
        labels[wrong] = rng.integers(1, len(class_map), wrong.sum())
        masks = np.stack([np.roll(m, int(rng.integers(-4, 5)), axis=1) for m in masks]) if len(masks) else masks
        xs = np.sort(rng.uniform(0, r.width, (2, 2)), axis=1); ys = np.sort(rng.uniform(0, r.height, (2, 2)), axis=1)
        fp = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)  # two false positives, xyxy
        fp_masks = np.zeros((2, r.height, r.width), np.uint8)
        for m, b in zip(fp_masks, fp.astype(int)): m[b[1]:b[3], b[0]:b[2]] = 1
        res.append({'boxes': np.concatenate([boxes, fp]).astype(np.float32), 'scores': rng.uniform(0.05, 1, len(boxes) + 2).astype(np.float32),
                    'labels': np.concatenate([labels, rng.integers(1, len(class_map), 2)]), 'masks': np.concatenate([masks, fp_masks])})
    return res

def pycocotools_stats(results, kind):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(SAMPLES/'annotations.json'))
        E = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), kind)
        E.evaluate(); E.accumulate(); E.summarize()
    return E.stats

@pytest.mark.parametrize('seed', [0, 1])
def test_metrics_equal_pycocotools_on_the_original_file(coco_records, seed):
    records, cm = coco_records
    assert any(r.iscrowd.any() for r in records) and any(len(r) == 0 for r in records)  # a crowd region and an empty image
    assert max(cm.source_ids) == 90 and len(cm.source_ids) < 90  # category ids with gaps
    results = fixed_predictions(records, cm, seed)
    ours = COCOEvaluator(records, cm, masks=True).evaluate(results)
    bbox, segm = pycocotools_stats(results, 'bbox'), pycocotools_stats(results, 'segm')
    assert 0.05 < ours['mAP'] < 0.95  # neither trivially 0 nor 1
    assert ours['mAP'] == bbox[0] and ours['mAP50'] == bbox[1] and ours['mAP75'] == bbox[2] and ours['mAR100'] == bbox[8]
    assert ours['mask_mAP'] == segm[0] and ours['mask_mAP50'] == segm[1]

def test_results_load_in_pycocotools_with_the_source_ids(coco_records):
    records, cm = coco_records
    results = fixed_predictions(records, cm)
    gt = COCO(str(SAMPLES/'annotations.json'))
    with contextlib.redirect_stdout(io.StringIO()): dt = gt.loadRes(copy.deepcopy(results))
    assert set(dt.getImgIds()) <= set(gt.getImgIds())
    assert {a['category_id'] for a in results} <= set(gt.getCatIds())

def test_no_detection_at_all_gives_zeros(coco_records):
    records, cm = coco_records
    ev = COCOEvaluator(records, cm, masks=True)
    assert set(ev.evaluate([]).values()) == {0.0}

def test_per_class_ap(coco_records):
    records, cm = coco_records
    ev = COCOEvaluator(records, cm)
    ev.evaluate(fixed_predictions(records, cm))
    per = ev.per_class['bbox']
    present = {cm.get_name(int(l)) for r in records for l, c in zip(r.labels, r.iscrowd) if not c}
    assert {k for k, v in per.items() if v == v} == present  # NaN for classes without ground truth
    assert all(0 <= per[k] <= 1 for k in present)

def test_string_image_ids_and_default_category_ids(tmp_path):
    from PIL import Image
    from icefast.core import ClassMap, Record
    Image.new('RGB', (50, 40)).save(tmp_path/'a.png')
    cm = ClassMap(['cat', 'dog'])
    recs = [Record(tmp_path/'a.png', 'a', 50, 40, [1, 2], [[5, 5, 20, 20], [25, 10, 45, 35]])]
    ev = COCOEvaluator(recs, cm)
    det = {'boxes': np.array([[5, 5, 20, 20], [25, 10, 45, 35.]]), 'scores': np.array([0.9, 0.8]), 'labels': np.array([1, 2])}
    assert ev.evaluate(detections_to_coco('a', det, cm))['mAP'] == pytest.approx(1.0)

class FixedMaskRCNN(torch.nn.Module):
    "A stand-in detector returning fixed detections (given in original pixels) for the images it recognises, letterboxed."
    loss_names, predicts_masks = ('loss_classifier',), True  # the detector protocol: box and mask metrics
    def __init__(self, records, dets):
        super().__init__()
        self.w, self.records, self.dets, self.by_image, self.empty = torch.nn.Parameter(torch.zeros(1)), records, dets, {}, False
    def param_groups(self): return [[self.w]]
    def remember(self, dl):
        "Key each record by its image as the model will see it (valid transforms are deterministic)."
        i = 0
        for b in dl:
            for img in b[0]: self.by_image[img.as_subclass(torch.Tensor).numpy().tobytes()] = i; i += 1
    def detect(self, img):
        if self.empty: return {'boxes': torch.zeros(0, 4), 'scores': torch.zeros(0), 'labels': torch.zeros(0, dtype=torch.int64), 'masks': torch.zeros(0, 1, *img.shape[-2:])}
        i = self.by_image[img.numpy().tobytes()]
        r, d = self.records[i], self.dets[i]
        s = letterbox_scale(r.width, r.height, img.shape[-2:])
        ch, cw = max(1, round(r.height*s)), max(1, round(r.width*s))
        m = torch.nn.functional.interpolate(torch.from_numpy(d['masks']).float()[None], size=(ch, cw), mode='nearest')[0]
        masks = torch.zeros(len(m), 1, *img.shape[-2:]); masks[:, 0, :ch, :cw] = m
        return {'boxes': torch.from_numpy(d['boxes']) * s, 'scores': torch.from_numpy(d['scores']),
                'labels': torch.from_numpy(d['labels']).long(), 'masks': masks}
    def forward(self, images, targets=None):
        if self.training: return {'loss_classifier': self.w.sum() * 0 + 1}
        dets = [self.detect(img) for img in images]
        return ({'loss_classifier': self.w.sum() * 0 + 1}, dets) if targets is not None else dets

def test_learner_metrics_equal_pycocotools_on_get_preds(coco_records):
    "validate()'s metrics == COCOeval on the original file and `loadRes` of what get_preds returned; zeros with no detections."
    from icefast.data import dataloaders
    from icefast.learner import detection_learner, detection_metrics
    records, cm = coco_records
    every = lambda items: (list(range(len(items))), list(range(len(items))))  # all six images in the validation set
    dls = dataloaders(records, cm, size=256, bs=4, batch_tfms=[], splitter=every)
    model = FixedMaskRCNN(list(dls.valid.items), fixed_detections(list(dls.valid.items), cm))
    model.remember(dls.valid)
    learn = detection_learner(dls, model, metrics=detection_metrics(model))  # predicts_masks: box and mask metrics
    names = [m.name for m in learn.metrics]
    assert names == ['mAP', 'mAP50', 'mAP75', 'mAR100', 'mask_mAP', 'mask_mAP50']
    with learn.no_bar(), learn.no_logging(): ours = dict(zip(names, learn.validate()[1:]))
    preds, _ = learn.get_preds()
    results = [a for r, p in zip(dls.valid.items, preds) for a in detections_to_coco(r.image_id, {k: v.numpy() for k, v in p.items()}, cm)]
    bbox, segm = pycocotools_stats(results, 'bbox'), pycocotools_stats(results, 'segm')
    assert 0.05 < ours['mAP'] < 0.95 and 0.05 < ours['mask_mAP'] < 0.95
    assert [ours[k] for k in ('mAP', 'mAP50', 'mAP75', 'mAR100')] == [bbox[0], bbox[1], bbox[2], bbox[8]]
    assert [ours['mask_mAP'], ours['mask_mAP50']] == [segm[0], segm[1]]
    per = learn.detection.evaluator().per_class
    assert set(per) == {'bbox', 'segm'} and any(v == v and v > 0 for v in per['bbox'].values())
    model.empty = True  # an epoch without a single detection: zeros, not pycocotools' IndexError
    with learn.no_bar(), learn.no_logging(): res = learn.validate()
    assert res[1:] == [0.0] * 6
    assert all(len(p['boxes']) == 0 for p in learn.get_preds()[0])
