"COCO metrics equal pycocotools run directly on the original annotation file."
import contextlib, copy, io, json, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from icefast.parsers import COCOParser
from icefast.metrics import COCOEvaluator, detections_to_coco, COCO_FIGURES, confusion_matrix, choose_thresholds, evaluate_detections
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
    assert_figures(ours, bbox) and assert_figures(ours, segm, 'mask_')

def assert_figures(ours, stats, prefix=''):
    "All 12 figures equal pycocotools' `stats`, NaN where it says -1."
    assert len(stats) == len(COCO_FIGURES) == 12
    for k, v in zip(COCO_FIGURES, stats):
        assert (ours[prefix + k] == v) if v > -1 else ours[prefix + k] != ours[prefix + k], (prefix + k, ours[prefix + k], v)
    return True

def test_results_load_in_pycocotools_with_the_source_ids(coco_records):
    records, cm = coco_records
    results = fixed_predictions(records, cm)
    gt = COCO(str(SAMPLES/'annotations.json'))
    with contextlib.redirect_stdout(io.StringIO()): dt = gt.loadRes(copy.deepcopy(results))
    assert set(dt.getImgIds()) <= set(gt.getImgIds())
    assert {a['category_id'] for a in results} <= set(gt.getCatIds())

def test_no_detection_at_all_gives_zeros(coco_records):
    "pycocotools' own figures without a detection (its loadRes([]) raises): 0, and NaN where it has nothing to measure (-1)."
    records, cm = coco_records
    ev = COCOEvaluator(records, cm, masks=True)
    res = ev.evaluate([])
    assert len(res) == 24 and {v for v in res.values() if v == v} == {0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(SAMPLES/'annotations.json'))
        E = COCOeval(gt, gt.loadRes([{'image_id': records[0].image_id, 'category_id': 1, 'bbox': [0, 0, 1, 1], 'score': 0.01}]), 'bbox')
        E.evaluate(); E.accumulate(); E.summarize()
    assert [k for k in COCO_FIGURES if res[k] != res[k]] == [k for k, v in zip(COCO_FIGURES, E.stats) if v == -1]

def test_per_class_ap(coco_records):
    records, cm = coco_records
    ev = COCOEvaluator(records, cm)
    ev.evaluate(fixed_predictions(records, cm))
    per = ev.per_class['bbox']
    present = {cm.get_name(int(l)) for r in records for l, c in zip(r.labels, r.iscrowd) if not c}
    assert {k for k, v in per.items() if v['AP'] == v['AP']} == present  # NaN for classes without ground truth
    assert all(0 <= per[k]['AP'] <= 1 for k in present)

@pytest.mark.parametrize('kind', ['bbox', 'segm'])
def test_per_class_table_equals_cocoeval_of_each_class_alone(coco_records, kind):
    "AP, AP50, AR100 of each class == COCOeval with catIds=[that class]; instances == a hand count without crowd regions."
    records, cm = coco_records
    results = fixed_predictions(records, cm, seed=1)
    ev = COCOEvaluator(records, cm, masks=True)
    ev.evaluate(results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(SAMPLES/'annotations.json'))
        dt = gt.loadRes(copy.deepcopy(results))
        checked = 0
        for cat in gt.getCatIds():
            name = cm.get_name(cm.from_source_id(cat))
            row = ev.per_class[kind][name]
            assert row['instances'] == sum(1 for a in gt.dataset['annotations'] if a['category_id'] == cat and not a['iscrowd'])
            E = COCOeval(gt, dt, kind); E.params.catIds = [cat]
            E.evaluate(); E.accumulate(); E.summarize()
            for k, i in (('AP', 0), ('AP50', 1), ('AR100', 8)):
                assert (row[k] == pytest.approx(E.stats[i], abs=1e-12)) if E.stats[i] > -1 else row[k] != row[k], (name, k)
            checked += E.stats[0] > -1
    assert checked >= 3

def synthetic_set(tmp_path):
    "Records and detections with gapped category ids, a crowd region, an image without boxes, a class never detected and one never present."
    from PIL import Image
    from icefast.core import ClassMap, Record
    for n in 'abc': Image.new('RGB', (100, 80)).save(tmp_path/f'{n}.png')
    cm = ClassMap(['cat', 'dog', 'bird', 'fish'], source_ids=[3, 7, 20, 21])  # fish: no ground truth
    recs = [Record(tmp_path/'a.png', 10, 100, 80, [1, 2, 3], [[5, 5, 30, 30], [40, 10, 90, 60], [0, 50, 20, 78]]),
            Record(tmp_path/'b.png', 11, 100, 80, [1, 1], [[10, 10, 40, 40], [50, 20, 99, 79]], iscrowd=[False, True]),
            Record(tmp_path/'c.png', 12, 100, 80)]
    dets = [{'boxes': np.array([[6, 5, 30, 31], [42, 12, 88, 60], [60, 60, 80, 79.]]), 'scores': np.array([0.9, 0.6, 0.4]),
             'labels': np.array([1, 1, 4])},  # the cat found, the dog taken for a cat, a fish invented; the bird missed
            {'boxes': np.array([[10, 12, 41, 40], [55, 25, 95, 75], [0, 0, 5, 5.]]), 'scores': np.array([0.8, 0.7, 0.1]),
             'labels': np.array([1, 2, 1])},  # the cat found, a dog in the crowd region (ignored), a low-scoring cat
            {'boxes': np.array([[20, 20, 60, 60.]]), 'scores': np.array([0.5]), 'labels': np.array([2])}]  # a dog in an empty image
    return recs, dets, cm

def test_synthetic_figures_and_per_class_equal_pycocotools(tmp_path):
    from icefast.metrics import records_to_coco
    recs, dets, cm = synthetic_set(tmp_path)
    res = evaluate_detections(recs, dets, cm)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(); gt.dataset = copy.deepcopy(records_to_coco(recs, cm)); gt.createIndex()
        E = COCOeval(gt, gt.loadRes(copy.deepcopy(res['results'])), 'bbox'); E.evaluate(); E.accumulate(); E.summarize()
    assert_figures(res['metrics'], E.stats)
    per = res['per_class']['bbox']
    assert [per[n]['instances'] for n in cm.classes] == [2, 1, 1, 0]
    assert per['bird']['AP'] == 0.0 and per['fish']['AP'] != per['fish']['AP']  # never detected: 0; never present: NaN
    assert per['cat']['AP50'] == pytest.approx(1.0)

def test_confusion_matrix_counts_by_hand(tmp_path):
    recs, dets, cm = synthetic_set(tmp_path)
    M = confusion_matrix(recs, dets, cm, iou=0.5, threshold=0.3)
    want = np.zeros((5, 5), int)
    want[1, 1] = 2  # both cats found (the one under the threshold is left out)
    want[2, 1] = 1  # the dog taken for a cat
    want[3, 0] = 1  # the bird missed
    want[0, 4] = 1  # the invented fish
    want[0, 2] = 1  # the dog in the empty image (the one in the crowd region is neither right nor wrong)
    assert (M == want).all(), M
    assert confusion_matrix(recs, dets, cm, threshold=0.0)[0, 1] == 1  # with every detection: the low-scoring cat is a false alarm
    per_class = confusion_matrix(recs, dets, cm, threshold={'cat': 0.95})  # thresholds by class name, others SCORE_THRESHOLD
    assert per_class[1, 1] == 0 and per_class[1, 0] == 2 and per_class[0, 2] == 1
    assert confusion_matrix(recs, dets, cm, iou=0.99).trace() == 0  # no pair overlaps that much

def test_thresholds_at_the_best_f1_or_a_precision_target(tmp_path):
    "One class, 3 objects; detections scored 0.9 (right), 0.8 (right), 0.7 (wrong), 0.6 (right), 0.3, 0.2 (wrong)."
    from PIL import Image
    from icefast.core import ClassMap, Record
    Image.new('RGB', (200, 60)).save(tmp_path/'a.png')
    cm = ClassMap(['thing'])
    gt = [[0, 0, 20, 20], [50, 0, 70, 20], [100, 0, 120, 20]]
    rec = Record(tmp_path/'a.png', 1, 200, 60, [1, 1, 1], gt)
    boxes = np.array([gt[0], gt[1], [150, 30, 170, 50], gt[2], [150, 0, 170, 20], [0, 30, 20, 50]], np.float32)
    det = {'boxes': boxes, 'scores': np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2]), 'labels': np.ones(6, int)}
    res = evaluate_detections([rec], [det], cm)
    curves = res['evaluator'].pr_curves()
    # F1 keeping scores >= 0.6: precision 3/4, recall 1: 0.857, the best (>= 0.8: 0.8; >= 0.9: 0.5; >= 0.7: 0.667)
    assert choose_thresholds(curves) == {'thing': pytest.approx(0.6)}
    assert choose_thresholds(curves, precision=0.9) == {'thing': pytest.approx(0.8)}  # the most recall at precision 1
    assert choose_thresholds(curves, precision=1.01) == {}  # never reached: the default applies
    with pytest.raises(ValueError, match='COCO evaluates at IoU'): res['evaluator'].pr_curves(iou=0.33)

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
    with learn.no_bar(), learn.no_logging(): res = learn.validate()
    assert assert_figures(res.figures, bbox) and assert_figures(res.figures, segm, 'mask_')  # all 24, whatever the table shows
    table = learn.per_class()
    assert list(table.columns) == ['AP', 'AP50', 'AR100', 'mask_AP', 'mask_AP50', 'mask_AR100', 'instances']
    assert table['AP'].max() > 0 and (table.equals(res.per_class))
    assert learn.thresholds and set(learn.thresholds) <= set(cm.classes)  # chosen on this validation, kept on the model
    model.empty = True  # an epoch without a single detection: zeros, not pycocotools' IndexError
    with learn.no_bar(), learn.no_logging(): res = learn.validate()
    assert res[1:] == [0.0] * 6
    assert all(len(p['boxes']) == 0 for p in learn.get_preds()[0])

def test_thresholds_chosen_on_validation_are_used_by_predict(coco_records):
    "After validate(): per-class thresholds on the model; predict keeps detections above their class's, threshold=0 all of them."
    from icefast.data import dataloaders
    from icefast.learner import detection_learner
    records, cm = coco_records
    every = lambda items: (list(range(len(items))), list(range(len(items))))
    dls = dataloaders(records, cm, size=256, bs=4, batch_tfms=[], splitter=every)
    model = FixedMaskRCNN(list(dls.valid.items), fixed_detections(list(dls.valid.items), cm))
    model.remember(dls.valid)
    learn = detection_learner(dls, model)
    assert learn.thresholds == {}
    with learn.no_bar(), learn.no_logging(): learn.validate()
    chosen = learn.thresholds
    assert chosen and chosen == model.score_thresholds and all(0 < v <= 1 for v in chosen.values())
    item = dls.valid.items[int(np.argmax([len(r) for r in dls.valid.items]))]
    everything, kept = learn.predict(item, threshold=0), learn.predict(item)
    want = [n for n, s in zip(everything['names'], everything['scores'].tolist()) if s >= chosen.get(n, 0.25)]
    assert kept['names'] == want and 0 < len(want) < len(everything['names'])
    strict = learn.tune_thresholds(precision=1.0)
    assert learn.detection.threshold_rule == {'precision': 1.0, 'iou': 0.5} and set(strict) <= set(chosen)

def test_progress_table_figures_are_one_argument_away(coco_records):
    from icefast.learner import detection_metrics
    records, cm = coco_records
    model = FixedMaskRCNN([], [])
    assert len(detection_metrics(model, 'all')) == 24 and [m.name for m in detection_metrics(model, ['mAP_small'])] == ['mAP_small']
    with pytest.raises(ValueError, match="figures \\['mAP_tiny'\\]"): detection_metrics(model, ['mAP_tiny'])
    model.predicts_masks = False
    with pytest.raises(ValueError, match='box figures'): detection_metrics(model, ['mask_mAP'])

@pytest.mark.parametrize('seed', [0, 1])
def test_faster_coco_eval_backend_equals_pycocotools(coco_records, tmp_path, seed):
    "faster-coco-eval (icefast[fast-eval], in the dev extra) gives pycocotools' figures and per-class table to 1e-9."
    records, cm = coco_records
    results = fixed_predictions(records, cm, seed)
    ref, fast = COCOEvaluator(records, cm, masks=True), COCOEvaluator(records, cm, masks=True, backend='faster_coco_eval')
    a, b = ref.evaluate(results), fast.evaluate(results)
    assert list(a) == list(b) and all(abs(a[k] - b[k]) <= 1e-9 or (a[k] != a[k] and b[k] != b[k]) for k in a), (a, b)
    for kind in ('bbox', 'segm'):
        for n, row in ref.per_class[kind].items():
            assert all(abs(v - fast.per_class[kind][n][k]) <= 1e-9 or v != v for k, v in row.items()), (kind, n)
    same = lambda x, y: abs(x - y) <= 1e-9 or (x != x and y != y)  # equal, or both undefined (NaN)
    empty_ref, empty_fast = ref.evaluate([]), fast.evaluate([])
    assert list(empty_ref) == list(empty_fast) and all(same(empty_ref[k], empty_fast[k]) for k in empty_ref)
    recs, dets, scm = synthetic_set(tmp_path)  # gapped ids, crowd, empty image, a class never detected, one never present
    ra, rb = evaluate_detections(recs, dets, scm), COCOEvaluator(recs, scm, backend='faster_coco_eval')
    fb = rb.evaluate(ra['results'])
    assert all(abs(ra['metrics'][k] - fb[k]) <= 1e-9 or (fb[k] != fb[k] and ra['metrics'][k] != ra['metrics'][k]) for k in fb)
    with pytest.raises(ValueError, match="backend 'coco'"): COCOEvaluator(records, cm, backend='coco')

def test_show_results_of_a_lightly_trained_model_shows_its_detections(coco_records):
    "Scores all under 0.2 (a model after an epoch or two): the thresholds chosen on validation still show its detections."
    import matplotlib; matplotlib.use('Agg')
    from icefast.core import open_image
    from icefast.data import dataloaders
    from icefast.learner import detection_learner
    from icefast.metrics import SCORE_THRESHOLD
    records, cm = coco_records
    every = lambda items: (list(range(len(items))), list(range(len(items))))
    dls = dataloaders(records, cm, size=256, bs=4, batch_tfms=[], splitter=every)
    dets = fixed_detections(list(dls.valid.items), cm)
    for d in dets: d['scores'] = d['scores'] * 0.2
    model = FixedMaskRCNN(list(dls.valid.items), dets)
    model.remember(dls.valid)
    learn = detection_learner(dls, model)
    with learn.no_bar(), learn.no_logging(): learn.validate()
    assert learn.thresholds and max(learn.thresholds.values()) < SCORE_THRESHOLD
    i = next(i for i, r in enumerate(dls.valid.items) if len(r))
    fig = learn.show_results(max_n=i + 1)
    shown = np.asarray(fig.axes[2*i + 1].images[0].get_array())
    assert (shown != np.asarray(open_image(dls.valid.items[i].filepath).convert('RGB'))).any()  # boxes drawn
    fig = learn.show_results(max_n=i + 1, threshold=SCORE_THRESHOLD)  # the one default without thresholds: nothing
    assert (np.asarray(fig.axes[2*i + 1].images[0].get_array()) == np.asarray(open_image(dls.valid.items[i].filepath).convert('RGB'))).all()
