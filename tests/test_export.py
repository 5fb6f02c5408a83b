"Export: every registered architecture to ONNX and TorchScript, run by icefast.runtime without fastai, predicting as the model."
import json, os, subprocess, sys, warnings
import numpy as np
import pytest
import torch

from icefast.export import export_model, ExportGraph, compare_detections, export_problems, TOLERANCES, ExportMismatch
from icefast.runtime import ExportedDetector, read_header, prepare_image
from icefast.core import ClassMap
from conftest import train_once
from test_learner import shapes, trained, trained_mask, trained_arch  # noqa: F401 (fixtures, trained once a session)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a fresh interpreter: the runtime alone, fastai must stay unimported
_RUNTIME = r'''
import json, sys
from icefast.runtime import load_exported
models, files = sys.argv[1].split(','), sys.argv[2:]
out = [[{k: list(v) if k == 'names' else v.tolist() for k, v in load_exported(m).predict(p, threshold=0).items() if k != 'masks'}
        for p in files] for m in models]
assert not [m for m in sys.modules if m.split('.')[0] in ('fastai', 'fastcore')], 'the runtime imported fastai'
print(json.dumps(out))
'''

def runtime_predictions(paths, files):
    "What `icefast.runtime` predicts for `files` from each exported file of `paths`, in one process that never imports fastai."
    env = {**os.environ, 'KMP_BLOCKTIME': '0', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-c', _RUNTIME, ','.join(map(str, paths)), *map(str, files)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

def learner_of(arch, request, tmp_path_factory):
    if arch == 'faster_rcnn': return request.getfixturevalue('trained')
    if arch == 'mask_rcnn': return request.getfixturevalue('trained_mask')[0]
    return trained_arch(tmp_path_factory, request.getfixturevalue('shapes'), arch)

def assert_same_detections(runtime:list, learn, records, tol_px=TOLERANCES['box_px']):
    "`learn.predict`'s detections (its chosen thresholds) are among the runtime's (all of them): the same labels, boxes within `tol_px`."
    n = 0
    for pred, rec in zip(runtime, records):
        ref = learn.predict(rec)
        assert set(pred['names']) <= set(ref['names']) | set(learn.dls.class_map.classes)
        ref = {k: v.numpy() for k, v in ref.items() if k in ('boxes', 'scores', 'labels')}
        got = {k: np.asarray(pred[k], np.float32).reshape(-1, 4) if k == 'boxes' else np.asarray(pred[k]) for k in ('boxes', 'scores', 'labels')}
        c = compare_detections([ref], [got], threshold=0)
        assert c['matched'] == c['detections'], (rec.filepath.name, c)
        assert c['max_box_diff_px'] <= tol_px and c['max_score_diff'] <= TOLERANCES['score'], c
        n += c['detections']
    assert n > 0, 'nothing compared: no detection above the thresholds'

@pytest.mark.parametrize('arch', ['faster_rcnn', 'mask_rcnn', 'retinanet', 'fcos', 'efficientdet'])
def test_export_onnx_and_torchscript_predict_as_the_model(arch, request, tmp_path_factory, tmp_path):
    "Each architecture, trained on the shapes: both files verified at export (mAP within 0.005) and predicting as learn.predict without fastai."
    learn = learner_of(arch, request, tmp_path_factory)
    records, paths = list(learn.dls.valid.items)[:4], []
    for fmt in ('onnx', 'torchscript'):
        path = tmp_path/f'{arch}.{fmt}'
        with warnings.catch_warnings():
            warnings.simplefilter('error', ExportMismatch)  # a mismatch fails the test
            rep = export_model(learn, path, fmt, n_images=4, log=lambda *a: None)
        assert rep['ok'] and rep['detections'] > 0 and rep['matched'] >= 0.98 * rep['detections'], rep
        assert abs(rep['mAP_exported'] - rep['mAP_pytorch']) <= 0.005 and rep['mAP_pytorch'] > 0.05, rep
        if arch == 'mask_rcnn': assert abs(rep['mask_mAP_exported'] - rep['mask_mAP_pytorch']) <= 0.005, rep
        h = read_header(path)
        assert h['classes'] == list(learn.dls.class_map.classes) and h['image_size'] == ([128, 128] if arch == 'efficientdet' else [96, 96])
        assert h['batch'] == (None if arch == 'efficientdet' else 1) and h['verification']['ok']
        assert h['score_thresholds'] == {k: float(v) for k, v in learn.thresholds.items()}
        paths.append(path)
    from PIL import Image
    Image.new('RGB', (160, 128)).save(tmp_path/'black.png')  # nothing to detect: RetinaNet and FCOS find nothing at all
    n_black = len(learn.predict(tmp_path/'black.png', threshold=0)['scores'])
    for preds in runtime_predictions(paths, [tmp_path/'black.png'] + [r.filepath for r in records[:3]]):
        assert (len(preds[0]['scores']) == 0) == (n_black == 0), (len(preds[0]['scores']), n_black)
        assert_same_detections(preds[1:], learn, records[:3])  # after an empty result too

def mask_ious(runtime:dict, ref:dict) -> list:
    "Mask IoU of each `ref` detection (learn.predict's) with the runtime's detection of its class that overlaps its box most (IoU 0.9 or more)."
    from icefast.export import _iou
    rb, rl, rm = (np.asarray(ref[k]) for k in ('boxes', 'labels', 'masks'))
    gb, gl, gm = (np.asarray(runtime[k]) for k in ('boxes', 'labels', 'masks'))
    out, used = [], set()
    for i in range(len(rb)):
        cand = [j for j in range(len(gb)) if gl[j] == rl[i] and j not in used]
        if not cand: continue
        ious = _iou(rb[i:i+1].astype(np.float64), gb[cand].astype(np.float64))[0]
        if ious.max() < 0.9: continue
        j = cand[int(np.argmax(ious))]; used.add(j)
        union = np.logical_or(rm[i], gm[j]).sum()
        out.append(np.logical_and(rm[i], gm[j]).sum() / union if union else 1.0)
    return out

def test_mask_rcnn_exports_roi_masks_that_the_runtime_pastes_as_learn_predict(trained_mask, tmp_path):
    "Mask R-CNN's graph ends at the 28 x 28 RoI masks (no Loop pasting them); the runtime's paste gives learn.predict's masks. A version-1 file (masks pasted in the graph) still runs."
    import onnx
    from icefast.export import export_header, write_onnx, set_header
    learn = trained_mask[0]
    records = list(learn.dls.valid.items)[:4]
    shown = next(r for r in learn.dls.valid.items if len(learn.predict(r, threshold=0)['boxes']))  # an image with detections: run and traced on
    ious = {}
    for fmt in ('onnx', 'torchscript'):
        path = tmp_path/f'm.{fmt}'
        export_model(learn, path, fmt, records=records, n_images=0)
        h = read_header(path)
        assert (h['format_version'], h['mask_format']) == (2, 'roi') and 'torchvision' in h['mask_paste'], h
        det = ExportedDetector(path)
        x = prepare_image(shown, det.size)[0][None]
        raw = det.run(x)[0]['masks']
        assert raw.ndim == 3 and raw.shape[1:] == (28, 28) and len(raw) > 0, raw.shape
        if fmt == 'onnx':
            graph = onnx.load(str(path)).graph
            assert 'Loop' not in {n.op_type for n in graph.node}
            assert graph.output[3].name == 'masks' and len(graph.output[3].type.tensor_type.shape.dim) == 4  # (1, D, 28, 28): D and M traced as dynamic
            assert det.session.run(['masks'], {'images': x})[0].shape == (1, len(raw), 28, 28)
        ious[fmt] = [v for r in records for v in mask_ious(det.predict(r, threshold=0), learn.predict(r, threshold=0))]
        assert len(ious[fmt]) >= 10 and np.mean(ious[fmt]) > 0.95 and np.median(ious[fmt]) == 1.0, (fmt, len(ious[fmt]), np.mean(ious[fmt]))
    # a version-1 file: masks pasted in the graph, a header without mask_format
    model = learn.model.eval()
    graph = ExportGraph(model, paste_masks=True).eval()
    old = tmp_path/'old.onnx'
    header = export_header(model, learn.dls.class_map, graph, 'onnx')
    write_onnx(graph, torch.from_numpy(prepare_image(shown, header['image_size'])[0])[None], old, header)
    set_header(old, {**{k: v for k, v in header.items() if k != 'mask_format'}, 'format_version': 1})
    det = ExportedDetector(old)
    assert det.mask_format == 'image' and det.run(prepare_image(shown, det.size)[0][None])[0]['masks'].shape[1:] == (96, 96)
    old_ious = [v for r in records for v in mask_ious(det.predict(r, threshold=0), learn.predict(r, threshold=0))]
    assert np.mean(old_ious) > 0.9, np.mean(old_ious)
    set_header(old, {**header, 'format_version': 3})
    with pytest.raises(ValueError, match='newer icefast'): ExportedDetector(old)

def test_runtime_paste_equals_torchvisions_paste_and_learners_resize():
    "`paste_roi_masks` gives, pixel for pixel, torchvision's paste on the letterboxed image then `learner.to_original`'s resize."
    import torch.nn.functional as F
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from icefast.runtime import paste_roi_masks
    rng = np.random.default_rng(1)
    masks = rng.random((40, 28, 28), dtype=np.float32)
    xy = rng.uniform(-5, 90, (40, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(0.3, 50, (40, 2)).astype(np.float32)], 1).clip(0, 96)
    for scale, (w, h) in [(96/300, (300, 200)), (0.5, (192, 60)), (1.5, (64, 40)), (1.0, (96, 96))]:
        cw, ch = max(1, round(w*scale)), max(1, round(h*scale))
        pasted = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (96, 96))[:, 0, :ch, :cw]
        ref = (F.interpolate(pasted[None], size=(h, w), mode='bilinear', align_corners=False)[0] > 0.5).numpy()
        got = paste_roi_masks(masks, boxes, scale, (w, h))
        assert got.shape == ref.shape and got.dtype == np.uint8 and (got != ref).mean() < 1e-5, (w, h, (got != ref).sum())

def test_efficientdet_export_takes_any_batch_size(request, tmp_path_factory, tmp_path):
    "EfficientDet's graph has a dynamic batch: three images at once give what each gives alone."
    learn = trained_arch(tmp_path_factory, request.getfixturevalue('shapes'), 'efficientdet')
    path = tmp_path/'e.onnx'
    records = list(learn.dls.valid.items)[:3]
    export_model(learn, path, n_images=0)
    det = ExportedDetector(path)
    x = np.stack([prepare_image(r, det.size)[0] for r in records])
    together, alone = det.run(x), [det.run(x[i:i+1])[0] for i in range(3)]
    for a, b in zip(together, alone):
        assert len(a['scores']) == len(b['scores']) > 0
        np.testing.assert_allclose(a['boxes'], b['boxes'], atol=1e-3)

def test_efficientdet_batched_decoding_equals_effdets(request):
    "EfficientDet's one-NMS batched decoding (what the export holds) keeps effdet's own per-image detections."
    from effdet.bench import _post_process, _batch_detection
    from icefast.models import create_model
    m = create_model('efficientdet', backbone='tf_efficientdet_lite0', num_classes=4, img_size=128).eval()
    torch.manual_seed(0)
    x = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        co, bo = m.net((x - m.mean) / m.std)
        b = m.bench
        c, bx, idx, cls = _post_process(co, bo, num_levels=b.num_levels, num_classes=b.num_classes, max_detection_points=m.detection_points)
        ref = _batch_detection(3, c, bx, b.anchors.boxes, idx, cls, max_det_per_image=b.max_det_per_image, soft_nms=False)
        got = m.detections(co, bo)
    rows = lambda a: {tuple(np.round(x, 3)) for x in a.numpy()}
    for r, d in zip(ref, got):
        r = r[r[:, 4] > 0]
        assert len(r) == len(d['boxes']) > 50
        mine = torch.cat([d['boxes'], d['scores'][:, None], d['labels'][:, None].float()], 1)
        # random weights score many boxes alike: equal scores at the 100th place or in an NMS may keep another of the tied boxes
        assert len(rows(r) & rows(mine)) >= 0.95 * len(r), len(rows(r) & rows(mine))

def test_a_detection_the_export_loses_is_reported(recwarn):
    "Verification flags what differs: a moved box, a changed score, a lost detection, a lower mAP."
    ref = [{'boxes': np.array([[0., 0, 10, 10], [20, 20, 40, 40], [5, 5, 9, 9]]), 'scores': np.array([.9, .8, .1]), 'labels': np.array([1, 2, 1])}]
    moved = [{'boxes': np.array([[0., 0, 10, 11]]), 'scores': np.array([.85]), 'labels': np.array([1])}]
    c = compare_detections(ref, moved)  # the 0.1 one is under SCORE_THRESHOLD: not compared
    assert (c['detections'], c['matched']) == (2, 1) and c['max_box_diff_px'] == 1.0
    assert compare_detections(ref, moved, {'a': 0.05}, ClassMap(['a', 'b']))['detections'] == 3
    rep = dict(c, mAP_pytorch=0.5, mAP_exported=0.49)
    problems = export_problems(rep)
    assert len(problems) == 4 and 'mAP 0.4900 exported' in problems[-1], problems
    assert export_problems(dict(compare_detections(ref, ref), mAP_pytorch=0.5, mAP_exported=0.5)) == []

def test_export_refuses_what_it_cannot_trace_and_says_what_to_install(trained, tmp_path, monkeypatch):
    "No detections to trace on, an unknown format, a missing onnx: each a clear error."
    import builtins
    recs = list(trained.dls.valid.items)[:2]
    with pytest.raises(ValueError, match="format 'tflite'"): export_model(trained, tmp_path/'m.onnx', 'tflite')
    with pytest.raises(ValueError, match='not an exported detector'): export_model(trained, tmp_path/'m.tflite')
    real_import = builtins.__import__
    def no_onnx(name, *a, **k):
        if name == 'onnx': raise ImportError('no onnx')
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, '__import__', no_onnx)
    with pytest.raises(ImportError, match=r'pip install "icefast\[export\]"'): export_model(trained, tmp_path/'m.onnx', records=recs, n_images=0)
    monkeypatch.undo()
    from icefast.core import Record
    blank = tmp_path/'blank.png'
    from PIL import Image
    Image.new('RGB', (64, 64)).save(blank)
    model = trained.model
    old = model.roi_heads.score_thresh
    model.roi_heads.score_thresh = 1.1  # detects nothing anywhere
    try:
        with pytest.raises(ValueError, match='detects nothing in any of the 1 example images'):
            export_model(trained, tmp_path/'m.onnx', records=[Record(blank, 'blank', 64, 64)], n_images=0)
    finally: model.roi_heads.score_thresh = old

def test_exported_file_without_icefast_header_is_refused(tmp_path):
    (tmp_path/'x.onnx').write_bytes(b'not a model')
    with pytest.raises(ValueError, match='onnxruntime cannot'): ExportedDetector(tmp_path/'x.onnx')
    with pytest.raises(FileNotFoundError): ExportedDetector(tmp_path/'missing.onnx')
