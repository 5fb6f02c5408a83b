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
        assert h['classes'] == list(learn.dls.class_map.classes) and h['image_size'] == ([96, 96] if arch == 'mask_rcnn' else [128, 128])
        assert h['batch'] == (None if arch == 'efficientdet' else 1) and h['verification']['ok']
        assert h['score_thresholds'] == {k: float(v) for k, v in learn.thresholds.items()}
        paths.append(path)
    from PIL import Image
    Image.new('RGB', (160, 128)).save(tmp_path/'black.png')  # nothing to detect: RetinaNet and FCOS find nothing at all
    n_black = len(learn.predict(tmp_path/'black.png', threshold=0)['scores'])
    for preds in runtime_predictions(paths, [tmp_path/'black.png'] + [r.filepath for r in records[:3]]):
        assert (len(preds[0]['scores']) == 0) == (n_black == 0), (len(preds[0]['scores']), n_black)
        assert_same_detections(preds[1:], learn, records[:3])  # after an empty result too

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
