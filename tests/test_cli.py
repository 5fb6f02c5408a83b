"""The `icefast` command line: train in every format, predict and eval on its runs, the demo's code path, and bad input
that ends in one line on stderr with exit code 2 (no traceback)."""
import contextlib, csv, io, json, os, shutil, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from icefast.cli import main
from icefast.metrics import COCO_FIGURES
from icefast.synthetic import make_shapes, SHAPES

ROOT = Path(__file__).resolve().parents[1]
# 1-2 epochs at 64 px on resnet18 FPN: the code paths, not the accuracy (the demo's accuracy is measured by hand); a step
# costs about the same at any small size (the optimizer and heads dominate), so few large batches are cheapest
FAST = ['--backbone', 'resnet_fpn.resnet18', '--pretrained', 'false', '--bs', '4', '--workers', '0', '--device', 'cpu']


def run(capsys, *argv):
    "`main(argv)` in this process: (exit code, stdout, stderr)."
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('icefast') and ': error: ' in lines[0], err
    assert 'Traceback' not in err
    for w in words: assert w.lower() in err.lower(), (w, err)


def assert_run_folder(out, epochs):
    for f in ('metrics.csv', 'metrics.json', 'models/best.pth', 'model.pkl', 'curves.png', 'results.png',
              'data_report.json', 'data_report.txt', 'run.json', 'valid.txt'):
        assert (out/f).is_file() and (out/f).stat().st_size > 0, f
    with open(out/'metrics.csv') as f: rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == list(range(epochs))
    assert {'train_loss', 'valid_loss', 'mAP', 'mAP50', 'seconds'} <= set(rows[0])
    assert len(json.loads((out/'metrics.json').read_text())) == epochs
    rep = json.loads((out/'data_report.json').read_text())
    assert {'source', 'n_images', 'n_boxes', 'counts', 'fixes'} <= set(rep)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    "A COCO shapes set (with polygons) of 16 small images."
    root = tmp_path_factory.mktemp('shapes')
    make_shapes(root, n_images=16, size=(96, 80), seed=3)
    return root


# A model barely moved from its initialization detects plenty (every class scores about 1/4), which is what the tests of
# the output formats need; a few epochs at a real learning rate would first learn that everything is background.
UNTRAINED = ['--lr', '1e-6']

@pytest.fixture(scope='module')
def coco_run(shapes, tmp_path_factory):
    "Faster R-CNN 'trained' 2 epochs on the shapes, at a learning rate too low to change it."
    out = tmp_path_factory.mktemp('coco_run')
    assert main(['train', '--data', str(shapes), '--format', 'coco', '--size', '64', '--epochs', '2', *UNTRAINED,
                 '--valid-pct', '0.25', '--out', str(out), *FAST]) == 0
    return out


def test_train_coco_writes_a_run_folder(coco_run):
    assert_run_folder(coco_run, 2)
    summary = json.loads((coco_run/'run.json').read_text())
    assert summary['classes'] == list(SHAPES) and summary['n_train'] == 12 and summary['n_valid'] == 4
    rows = json.loads((coco_run/'metrics.json').read_text())
    assert summary['best_epoch'] == max(range(2), key=lambda i: (rows[i]['mAP'], -i))  # SaveModelCallback(monitor='mAP')


def test_predict_results_load_against_the_ground_truth(coco_run, shapes, capsys):
    from pycocotools.coco import COCO
    out = coco_run.parent/'pred'
    code, stdout, err = run(capsys, 'predict', coco_run/'model.pkl', shapes/'images', '--out', out, '--threshold', 0,
                            '--data', shapes, '--format', 'coco')
    assert code == 0, err
    res = json.loads((out/'predictions.json').read_text())
    assert res, "the model gave no detection at all"
    assert set(res[0]) == {'image_id', 'category_id', 'bbox', 'score'}
    gt = COCO(str(shapes/'annotations.json'))
    dt = gt.loadRes(str(out/'predictions.json'))
    assert set(dt.getImgIds()) <= set(gt.getImgIds())
    for r in res:  # xywh in the original 96 x 80 pixels
        x, y, w, h = r['bbox']
        assert 0 <= x and 0 <= y and x + w <= 96 + 1e-3 and y + h <= 80 + 1e-3
    assert len(list((out/'images').glob('*.jpg'))) == 16
    cats = json.loads((out/'images.json').read_text())['categories']
    assert [c['name'] for c in cats] == list(SHAPES)


def test_predict_without_data_uses_file_stems_as_ids(coco_run, shapes, capsys):
    "Without --data an image's id is its stem, as `learn.predict` and `icefast.core.image_record` name it."
    out = coco_run.parent/'pred_plain'
    code, _, err = run(capsys, 'predict', coco_run, shapes/'images'/'0003.jpg', '--out', out, '--threshold', 0.0)
    assert code == 0, err
    ids = {r['image_id'] for r in json.loads((out/'predictions.json').read_text())}
    assert ids <= {'0003'}
    assert json.loads((out/'images.json').read_text())['images'][0]['id'] == '0003'


def test_eval_prints_the_metrics_table_per_class(coco_run, shapes, capsys):
    out = coco_run.parent/'eval'
    code, stdout, err = run(capsys, 'eval', coco_run, '--data', shapes/'annotations.json', '--format', 'coco', '--out', out)
    assert code == 0, err
    for word in ('mAP50', 'mAR100', 'class', 'circle', 'square', 'triangle'): assert word in stdout
    res = json.loads((out/'eval.json').read_text())
    assert list(res['metrics']) == list(COCO_FIGURES) and set(res['per_class']['bbox']) == set(SHAPES)
    assert res['n_images'] == 16 and 'its training images; --split' in stdout  # the run's 4 validation images and 12 more
    with contextlib.redirect_stdout(io.StringIO()):  # every figure is pycocotools' on the file and the written predictions
        gt = COCO(str(shapes/'annotations.json'))
        E = COCOeval(gt, gt.loadRes(str(out/'predictions.json')), 'bbox'); E.evaluate(); E.accumulate(); E.summarize()
    assert [res['metrics'][k] for k in COCO_FIGURES] == [float(v) if v > -1 else None for v in E.stats]
    table = pd.read_csv(out/'per_class.csv', index_col='class')
    assert list(table.columns) == ['AP', 'AP50', 'AR100', 'instances'] and set(table.index) == set(SHAPES)
    conf = res['confusion']
    assert conf['classes'] == ['background', *SHAPES] and conf['iou'] == 0.5
    counts = np.array(conf['counts'])  # each class's row holds each of its objects once: found, confused or missed
    assert [counts[i].sum() for i in range(1, 4)] == [res['per_class']['bbox'][n]['instances'] for n in SHAPES]
    for f in ('confusion.png', 'pr.png'): assert (out/f).stat().st_size > 10000
    code, _, err = run(capsys, 'eval', coco_run, '--data', shapes/'annotations.json', '--format', 'coco', '--out', out/'fast',
                       '--coco-backend', 'faster_coco_eval')
    assert code == 0, err
    fast = json.loads((out/'fast'/'eval.json').read_text())
    code, _, err = run(capsys, 'eval', coco_run, '--data', shapes/'annotations.json', '--format', 'coco', '--iou', 0.33)
    assert code != 0 and '--iou 0.33: COCO evaluates at 0.5, 0.55' in err
    assert fast['metrics'] == res['metrics'] and fast['per_class'] == res['per_class']  # faster-coco-eval: pycocotools' figures
    assert len((coco_run/'valid.txt').read_text().split()) == 4
    code, stdout, err = run(capsys, 'eval', coco_run, '--data', shapes, '--format', 'coco', '--split', coco_run/'valid.txt')
    assert code == 0 and 'on 4 images' in stdout and 'training images' not in stdout, err


def test_mask_rcnn_on_coco_masks_as_rle(shapes, tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools import mask as mask_utils
    out = tmp_path/'run'
    code, _, err = run(capsys, 'train', '--data', shapes, '--format', 'coco', '--arch', 'mask_rcnn', '--size', '64',
                       '--epochs', '1', *UNTRAINED, '--valid-pct', '0.25', '--out', out, *FAST)
    assert code == 0, err
    assert_run_folder(out, 1)
    assert {'mask_mAP', 'mask_mAP50'} <= set(json.loads((out/'metrics.json').read_text())[0])
    code, _, err = run(capsys, 'predict', out, shapes/'images'/'0001.jpg', shapes/'images'/'0002.jpg', '--out', tmp_path/'pred',
                       '--threshold', 0, '--data', shapes, '--format', 'coco')
    assert code == 0, err
    res = json.loads((tmp_path/'pred'/'predictions.json').read_text())
    assert res and {r['image_id'] for r in res} <= {2, 3}
    assert mask_utils.decode(res[0]['segmentation']).shape == (80, 96)  # COCO RLE in the original pixels
    COCO(str(shapes/'annotations.json')).loadRes(res)
    code, stdout, err = run(capsys, 'eval', out, '--data', shapes, '--format', 'coco', '--split', out/'valid.txt')
    assert code == 0 and 'mask_mAP' in stdout and 'mask_AP50' in stdout, err


def test_train_voc_fridge(samples, tmp_path, capsys):
    out = tmp_path/'run'
    code, stdout, err = run(capsys, 'train', '--data', samples/'fridge'/'odFridgeObjects', '--format', 'voc', '--size', '96',
                            '--epochs', '1', '--valid-pct', '0.34', '--out', out, *FAST)
    assert code == 0, err
    assert_run_folder(out, 1)
    assert json.loads((out/'run.json').read_text())['classes'] == ['can', 'carton', 'milk_bottle', 'water_bottle']
    code, stdout, err = run(capsys, 'eval', out, '--data', samples/'fridge'/'odFridgeObjects', '--format', 'voc')
    assert code == 0 and 'milk_bottle' in stdout, err


def test_train_voc_with_a_split_file(samples, tmp_path, capsys):
    (tmp_path/'val.txt').write_text('2011_003353\n')
    out = tmp_path/'run'
    code, _, err = run(capsys, 'train', '--data', samples/'voc', '--format', 'voc', '--size', '64', '--epochs', '1',
                       '--split', tmp_path/'val.txt', '--out', out, *FAST)
    assert code == 0, err
    s = json.loads((out/'run.json').read_text())
    assert (s['n_train'], s['n_valid']) == (1, 1)


def test_train_via_with_lr_find(samples, tmp_path, capsys):
    "VIA polygons and rects; `--lr auto` runs fastai's lr_find first, whose steps are not epochs of the run."
    out = tmp_path/'run'
    code, stdout, err = run(capsys, 'train', '--data', samples/'via'/'via_bbox.json', '--format', 'via', '--size', '64',
                            '--epochs', '1', '--valid-pct', '0.5', '--out', out, *FAST, '--lr', 'auto', '--lr-find-steps', '12')
    assert code == 0, err
    assert_run_folder(out, 1)
    rep = json.loads((out/'data_report.json').read_text())
    assert rep['n_images'] == 2 and rep['n_boxes'] > 0
    assert (out/'lr_find.png').is_file() and 'lr_find suggests' in stdout
    assert 0 < json.loads((out/'run.json').read_text())['lr'] < 10
    assert '█' not in stdout + err and sum(l.split()[:1] == ['epoch'] for l in stdout.splitlines()) == 1  # lr_find: no lines


def test_train_coco_samples_and_predict_against_them(samples, tmp_path, capsys):
    "The real COCO sample (80 categories, a crowd region): predictions keep COCO's own image and category ids."
    out = tmp_path/'run'
    code, _, err = run(capsys, 'train', '--data', samples/'annotations.json', '--format', 'coco', '--size', '64',
                       '--epochs', '1', '--valid-pct', '0.34', '--out', out, *FAST)
    assert code == 0, err
    code, _, err = run(capsys, 'predict', out, samples/'images', '--out', tmp_path/'pred', '--threshold', 0,
                       '--data', samples, '--format', 'coco')
    assert code == 0, err
    images = json.loads((tmp_path/'pred'/'images.json').read_text())['images']
    assert {i['id'] for i in images} == {128372, 404249, 343934, 194216, 464689, 89}


def _write_csv(shapes, root):
    "The shapes set as a CSV of boxes (root/boxes.csv, images in root/images)."
    d = json.loads((shapes/'annotations.json').read_text())
    names = {i['id']: i['file_name'] for i in d['images']}
    root.mkdir()
    shutil.copytree(shapes/'images', root/'images')
    with open(root/'boxes.csv', 'w', newline='') as f:
        w = csv.writer(f); w.writerow(['filename', 'label', 'xmin', 'ymin', 'xmax', 'ymax'])
        for a in d['annotations']:
            x, y, bw, bh = a['bbox']
            w.writerow([names[a['image_id']], SHAPES[a['category_id'] - 1], x, y, x + bw, y + bh])
        boxed = {a['image_id'] for a in d['annotations']}
        for i, fn in names.items():
            if i not in boxed: w.writerow([fn, '', '', '', '', ''])
    return root


def _write_yolo(shapes, root):
    "The shapes set in YOLO layout: root/images, root/labels/<stem>.txt, root/classes.txt."
    d = json.loads((shapes/'annotations.json').read_text())
    root.mkdir()
    shutil.copytree(shapes/'images', root/'images')
    (root/'labels').mkdir()
    imgs = {i['id']: i for i in d['images']}
    lines = {i: [] for i in imgs}
    for a in d['annotations']:
        im, (x, y, w, h) = imgs[a['image_id']], a['bbox']
        lines[a['image_id']].append(f"{a['category_id'] - 1} {(x + w/2)/im['width']:.6f} {(y + h/2)/im['height']:.6f} "
                                    f"{w/im['width']:.6f} {h/im['height']:.6f}")
    for i, ls in lines.items():
        if ls: (root/'labels'/(Path(imgs[i]['file_name']).stem + '.txt')).write_text('\n'.join(ls) + '\n')
    (root/'classes.txt').write_text('\n'.join(SHAPES) + '\n')
    return root


def test_train_csv_through_the_installed_script(shapes, tmp_path):
    "One run as a user runs it: the `icefast` console script in a subprocess, a relative --out, 2 CPU processes (--nproc)."
    data, out = _write_csv(shapes, tmp_path/'csv'), tmp_path/'run'
    exe = Path(sys.executable).parent/'icefast'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-c', 'import sys; from icefast.cli import main; sys.exit(main())']
    env = dict(os.environ, KMP_BLOCKTIME='0')
    res = subprocess.run(cmd + ['train', '--data', str(data), '--format', 'csv', '--size', '64', '--epochs', '1',
                                '--valid-pct', '0.25', '--out', 'run', '--nproc', '2', *FAST], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'CSVParser(boxes.csv): 16 images' in res.stdout and res.stdout.count('best mAP') == 1  # rank 0 alone reports
    assert_run_folder(out, 1)
    assert json.loads((out/'run.json').read_text())['classes'] == list(SHAPES)


def test_train_yolo_efficientdet(shapes, tmp_path, capsys):
    data, out = _write_yolo(shapes, tmp_path/'yolo'), tmp_path/'run'
    code, _, err = run(capsys, 'train', '--data', data, '--format', 'yolo', '--arch', 'efficientdet', '--backbone',
                       'mobilenetv3_small_100', '--pretrained', 'false', '--size', '128', '--epochs', '1', '--bs', '4',
                       '--valid-pct', '0.25', '--workers', '0', '--device', 'cpu', '--out', out)
    assert code == 0, err
    assert_run_folder(out, 1)
    s = json.loads((out/'run.json').read_text())
    assert s['classes'] == list(SHAPES) and s['arch'] == 'efficientdet'
    code, stdout, err = run(capsys, 'eval', out, '--data', data, '--format', 'yolo')
    assert code == 0 and 'triangle' in stdout, err


def test_pretrained_weights_from_files(shapes, tmp_path, capsys):
    "--pretrained PATH: a whole detector's state dict or a backbone's; fine_tune then trains every layer from the start."
    import torch, torchvision
    from icefast.cli import resolve_pretrained
    from icefast.models import faster_rcnn
    det, bb = tmp_path/'detector.pth', tmp_path/'resnet18.pth'
    torch.save(faster_rcnn.model(backbone='resnet_fpn.resnet18', num_classes=4).state_dict(), det)
    torch.save(torchvision.models.resnet18().state_dict(), bb)
    assert resolve_pretrained(str(det), 'faster_rcnn', 'resnet_fpn.resnet18') == (det, False)
    assert resolve_pretrained(str(bb), 'faster_rcnn', 'resnet_fpn.resnet18') == (False, bb)
    out = tmp_path/'run'
    code, stdout, err = run(capsys, 'train', '--data', shapes, '--format', 'coco', '--size', '64', '--epochs', '1',
                            '--valid-pct', '0.25', '--out', out, *FAST, '--pretrained', det)
    assert code == 0, err
    assert_run_folder(out, 1)  # no frozen epoch: fine_tune's default for pretrained detectors too
    assert f'--pretrained {det}: read as whole-detector weights' in stdout


def test_two_split_files_and_yolo_names_from_data_yaml(shapes, tmp_path):
    from icefast.cli import split_records, parse_data
    from icefast.parsers import parser_for
    records = parse_data(parser_for(shapes, 'coco'), log=lambda *a: None)
    (tmp_path/'train.txt').write_text('0000.jpg\n0001.jpg\n0002\n')
    (tmp_path/'valid.txt').write_text('5\n')  # COCO image id 5 is 0004.jpg
    kept, splitter = split_records(records, split=[tmp_path/'train.txt', tmp_path/'valid.txt'])
    train, valid = splitter(kept)
    assert sorted(kept[i].filepath.name for i in train) == ['0000.jpg', '0001.jpg', '0002.jpg']
    assert [kept[i].filepath.name for i in valid] == ['0004.jpg']
    data = _write_yolo(shapes, tmp_path/'yolo')
    (data/'classes.txt').unlink()
    (data/'data.yaml').write_text("path: .\nnames:\n  0: circle\n  1: square\n  2: triangle\n")
    p = parser_for(data, 'yolo')
    assert len(p.parse()) == 16 and p.class_map.classes == list(SHAPES)


def test_demo_code_path_quick(tmp_path, capsys):
    "`icefast demo` end to end with tiny settings (the real demo trains ~4 minutes)."
    code, stdout, err = run(capsys, 'demo', '--out', tmp_path/'demo', '--quick', '--device', 'cpu', '--workers', '0')
    assert code == 0, err
    assert_run_folder(tmp_path/'demo', 1)
    assert (tmp_path/'demo'/'data'/'annotations.json').is_file()
    s = json.loads((tmp_path/'demo'/'run.json').read_text())
    assert s['command'] == 'demo' and s['format'] == 'coco' and 'mAP50' in s['best']
    assert 'icefast demo: mAP50' in stdout
    lines = (stdout + err).splitlines()  # not a terminal: no progress bars, a header and one plain line per epoch
    assert not any('█' in l or '\r' in l for l in lines)
    header = next(i for i, l in enumerate(lines) if l.split()[:3] == ['epoch', 'train_loss', 'valid_loss'])
    assert lines[header + 1].split()[0] == '0' and len(lines[header + 1].split()) == len(lines[header].split())


# -- help and bad input --------------------------------------------------------------------------------------------

def test_help_of_every_command(capsys):
    for cmd in ([], ['train'], ['predict'], ['eval'], ['demo']):
        code, out, _ = run(capsys, *cmd, '--help')
        assert code == 0 and 'usage: icefast' in out
    code, out, _ = run(capsys, 'train', '--help')
    for fmt in ('coco', 'voc', 'via', 'csv', 'yolo'): assert f'\n  {fmt} ' in out  # the data layouts


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, icefast.cli; assert 'torch' not in sys.modules and 'fastai' not in sys.modules, 'heavy import'"
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bad_arguments_in_a_subprocess(tmp_path):
    exe = Path(sys.executable).parent/'icefast'
    if not exe.exists(): pytest.skip('icefast script not installed (pip install -e .)')
    res = subprocess.run([str(exe), 'train', '--data', str(tmp_path), '--format', 'xml', '--out', str(tmp_path/'o')],
                         capture_output=True, text=True)
    assert_one_line_error(res.returncode, res.stderr, "invalid choice: 'xml'")
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert_one_line_error(res.returncode, res.stderr, 'no command')


def test_missing_data_folder(tmp_path, capsys):
    code, _, err = run(capsys, 'train', '--data', tmp_path/'nope', '--format', 'coco', '--out', tmp_path/'o', *FAST)
    assert_one_line_error(code, err, 'no such file or folder', 'nope')


def test_missing_required_argument(tmp_path, capsys):
    code, _, err = run(capsys, 'train', '--format', 'coco', '--out', tmp_path/'o')
    assert_one_line_error(code, err, '--data')


@pytest.mark.parametrize('argv, words', [
    (['--epochs', 'x'], ['--epochs', "invalid int value"]),
    (['--nproc', '0'], ['--nproc 0', 'at least 1']),
    (['--lr', 'fast'], ["--lr fast"]),
    (['--valid-pct', '1.5'], ['--valid-pct']),
    (['--pretrained', 'maybe.pth'], ['--pretrained maybe.pth']),
    (['--backbone', 'resnet_fpn.resnet7'], ['unknown backbone', 'resnet_fpn.resnet7']),
    (['--valid-pct', '0.2', '--split', 'a.txt'], ['not allowed with']),
    (['--arch', 'efficientdet', '--backbone', 'tf_efficientdet_lite0', '--size', '100'], ['multiples of']),
])
def test_bad_train_arguments(shapes, tmp_path, capsys, argv, words):
    args = ['train', '--data', shapes, '--format', 'coco', '--out', tmp_path/'o', '--size', '64', *FAST]
    code, _, err = run(capsys, *args, *argv)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path/'o').exists()  # refused before the data are read, nothing written


@pytest.mark.parametrize('fmt, name', [('coco', 'annotations.json'), ('via', 'via.json'), ('csv', 'boxes.csv')])
def test_empty_annotation_file(tmp_path, capsys, fmt, name):
    (tmp_path/name).write_text('')
    code, _, err = run(capsys, 'train', '--data', tmp_path/name, '--format', fmt, '--out', tmp_path/'o', *FAST)
    assert_one_line_error(code, err, name)


def test_parse_error_names_the_file_and_place(tmp_path, capsys):
    (tmp_path/'annotations.json').write_text('{"images": [], "annotations": [], ')
    code, _, err = run(capsys, 'train', '--data', tmp_path, '--format', 'coco', '--out', tmp_path/'o', *FAST)
    assert_one_line_error(code, err, 'annotations.json', 'invalid JSON at line 1')


def test_data_in_another_format(shapes, tmp_path, capsys):
    code, _, err = run(capsys, 'train', '--data', shapes, '--format', 'voc', '--out', tmp_path/'o', *FAST)
    assert_one_line_error(code, err, 'Annotations/')
    code, _, err = run(capsys, 'train', '--data', shapes, '--format', 'yolo', '--out', tmp_path/'o', *FAST)
    assert_one_line_error(code, err, 'labels/')


def test_corrupt_images(shapes, tmp_path, make_image, capsys):
    "Every image corrupt: nothing to train on (the report says why). Predicting on a corrupt image: its name."
    data = tmp_path/'corrupt'
    shutil.copytree(shapes, data, ignore=shutil.ignore_patterns('*.jpg'))
    d = json.loads((shapes/'annotations.json').read_text())
    for im in d['images']: make_image(im['file_name'], 'truncated', folder='corrupt/images')
    code, out, err = run(capsys, 'train', '--data', data, '--format', 'coco', '--out', tmp_path/'o', *FAST)
    assert_one_line_error(code, err, 'no usable image')
    assert 'corrupt_image' in out  # the parser's report, printed before
    bad = make_image('broken.jpg', 'truncated')
    code, _, err = run(capsys, 'predict', tmp_path/'nowhere', bad, '--out', tmp_path/'p')
    assert_one_line_error(code, err, 'no exported learner')


def test_predict_on_a_corrupt_image(coco_run, make_image, tmp_path, capsys):
    bad = make_image('broken.jpg', 'not_image')
    code, _, err = run(capsys, 'predict', coco_run, bad, '--out', tmp_path/'p')
    assert_one_line_error(code, err, 'broken.jpg', 'unreadable image')
    code, _, err = run(capsys, 'predict', coco_run, tmp_path/'missing.jpg', '--out', tmp_path/'p')
    assert_one_line_error(code, err, 'missing.jpg')


def test_eval_on_data_of_other_classes(coco_run, samples, capsys):
    code, out, err = run(capsys, 'eval', coco_run, '--data', samples/'fridge'/'odFridgeObjects', '--format', 'voc')
    assert_one_line_error(code, err, 'every box is of a class outside circle, square, triangle')
    assert 'unknown_class' in out


def test_eval_with_a_file_that_is_not_a_learner(tmp_path, shapes, capsys):
    (tmp_path/'model.pkl').write_bytes(b'not a pickle')
    code, _, err = run(capsys, 'eval', tmp_path, '--data', shapes, '--format', 'coco')
    assert_one_line_error(code, err, 'not a learner exported by icefast train')


def _coco_parts(shapes, tmp_path):
    "The shapes' COCO file cut in two: train.json (12 images) and val.json (4), beside the images."
    d = json.loads((shapes/'annotations.json').read_text())
    val_ids = {i['id'] for i in d['images'][-4:]}
    for name, keep in (('train.json', lambda i: i not in val_ids), ('val.json', lambda i: i in val_ids)):
        part = dict(d, images=[i for i in d['images'] if keep(i['id'])], annotations=[a for a in d['annotations'] if keep(a['image_id'])])
        (tmp_path/name).write_text(json.dumps(part))
    return tmp_path/'train.json', tmp_path/'val.json', val_ids


def test_train_with_its_own_validation_file_and_progress_lines(shapes, tmp_path, capsys):
    "--valid-data: validation annotations in their own file; without a terminal, plain progress lines within epochs."
    train_json, val_json, val_ids = _coco_parts(shapes, tmp_path)
    out = tmp_path/'run'
    code, stdout, err = run(capsys, 'train', '--data', train_json, '--format', 'coco', '--images', shapes/'images',
                            '--valid-data', val_json, '--size', '64', '--epochs', '1', *UNTRAINED, '--out', out, *FAST,
                            '--progress-every', '0')
    assert code == 0, err
    s = json.loads((out/'run.json').read_text())
    assert (s['n_train'], s['n_valid']) == (12, 4)
    assert {int(l) for l in (out/'valid.txt').read_text().split()} == val_ids
    assert '--valid-data' in (out/'data_report.txt').read_text()
    lines = [l for l in stdout.splitlines() if ' batch ' in l]
    assert any('epoch 1/1 train batch 3/3, loss' in l for l in lines) and any('valid batch 1/1' in l for l in lines), stdout
    assert '3 classes' in stdout and '█' not in stdout
    from icefast.cli import build_argparser
    assert build_argparser().parse_args(['train', '--data', 'd', '--format', 'coco', '--out', 'o']).progress_every <= 30
    code, _, err = run(capsys, 'train', '--data', train_json, '--format', 'coco', '--valid-data', val_json, '--split',
                       tmp_path/'x.txt', '--out', out)
    assert_one_line_error(code, err, 'not allowed with argument')


def test_a_nan_in_validation_fails_the_run_and_exports_nothing(shapes, tmp_path, capsys, monkeypatch):
    "A model whose validation loss is NaN: exit code 1 with the reason, and no model.pkl passed off as the result."
    import icefast.cli as cli
    build = cli.build_model
    def diverged(*args, **kwargs):
        m = build(*args, **kwargs)
        forward = m.forward
        def nan_in_validation(images, targets=None):
            out = forward(images, targets)
            if m.training or targets is None: return out
            losses, dets = out
            return {k: v * float('nan') for k, v in losses.items()}, dets
        m.forward = nan_in_validation
        return m
    monkeypatch.setattr(cli, 'build_model', diverged)
    out = tmp_path/'run'
    code, _, err = run(capsys, 'train', '--data', shapes, '--format', 'coco', '--size', '64', '--epochs', '1', *UNTRAINED,
                       '--valid-pct', '0.25', '--out', out, *FAST)
    assert code == 1 and 'training failed: the validation loss became nan' in err, err
    assert 'Nothing was exported' in err and not (out/'model.pkl').exists()


def test_predict_takes_images_like_train_and_eval(coco_run, shapes, tmp_path, capsys):
    "`predict --images DIR` names the image folder of --data as train and eval do (the old --images-dir still works)."
    for opt in ('--images', '--images-dir'):
        code, _, err = run(capsys, 'predict', coco_run, shapes/'images', '--out', tmp_path/opt, '--data', shapes/'annotations.json',
                           '--format', 'coco', opt, shapes/'images')
        assert code == 0, err


def _via_single_class_parts(shapes, root):
    "The shapes as a single-class VIA 2 polygon project with no region attributes, saved in two JSON parts."
    d = json.loads((shapes/'annotations.json').read_text())
    (root/'images').mkdir(parents=True)
    entries = {}
    for img in d['images']:
        shutil.copy(shapes/'images'/img['file_name'], root/'images'/img['file_name'])
        regions = [{'shape_attributes': {'name': 'polygon', 'all_points_x': a['segmentation'][0][0::2],
                                         'all_points_y': a['segmentation'][0][1::2]}, 'region_attributes': {}}
                   for a in d['annotations'] if a['image_id'] == img['id']]
        entries[img['file_name']] = {'filename': img['file_name'], 'size': 0, 'regions': regions, 'file_attributes': {}}
    names = sorted(entries)
    for i, part in enumerate((names[:8], names[8:])):
        (root/f'part{i}.json').write_text(json.dumps({n: entries[n] for n in part}))
    return root


def test_single_class_via_project_in_two_parts_trains_mask_rcnn(shapes, tmp_path, capsys):
    "A VIA polygon export with no label attribute, saved in two files: one argument (class_name / --class-name) trains Mask R-CNN."
    root = _via_single_class_parts(shapes, tmp_path/'via')
    code, _, err = run(capsys, 'train', '--data', root, '--format', 'via', '--arch', 'mask_rcnn', '--size', '64', '--epochs', '1',
                       '--out', tmp_path/'x', *FAST)
    assert_one_line_error(code, err, "--class-name")  # no label attribute: the error names the CLI's own option
    out = tmp_path/'run'
    code, stdout, err = run(capsys, 'train', '--data', root, '--format', 'via', '--class-name', 'shape', '--arch', 'mask_rcnn',
                            '--size', '64', '--epochs', '1', *UNTRAINED, '--valid-pct', '0.25', '--out', out, *FAST)
    assert code == 0, err
    assert_run_folder(out, 1)
    s = json.loads((out/'run.json').read_text())
    assert s['classes'] == ['shape'] and s['n_train'] + s['n_valid'] == 16 and '1 class,' in stdout
    assert {'mask_mAP', 'mask_mAP50'} <= set(json.loads((out/'metrics.json').read_text())[0])
    from icefast.parsers import VIAParser
    from icefast.models import mask_rcnn
    from icefast.learner import detection_learner
    p = VIAParser(root, root/'images', class_name='shape', masks=True)  # Python: the same one argument
    dls = p.dataloaders(size=64, bs=4, batch_tfms=[], num_workers=0)
    learn = detection_learner(dls, mask_rcnn.model(backbone='resnet_fpn.resnet18', num_classes=len(p.class_map)))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-6)
    assert p.report.n_images == 16 and p.report.n_boxes == sum(len(r) for r in p.parse()) > 0


@pytest.mark.parametrize('arch', ['retinanet', 'fcos'])
def test_train_predict_and_eval_the_registrys_new_architectures(arch, shapes, tmp_path, capsys):
    "RetinaNet and FCOS joined through the registry alone: train, predict and eval work end to end on the demo's shapes."
    out = tmp_path/'run'
    code, _, err = run(capsys, 'train', '--data', shapes, '--format', 'coco', '--arch', arch, '--size', '64', '--epochs', '1',
                       *UNTRAINED, '--valid-pct', '0.25', '--out', out, *FAST)
    assert code == 0, err
    assert_run_folder(out, 1)
    assert json.loads((out/'run.json').read_text())['arch'] == arch
    code, _, err = run(capsys, 'predict', out, shapes/'images', '--out', tmp_path/'pred', '--threshold', 0)
    assert code == 0, err
    code, stdout, err = run(capsys, 'eval', out, '--data', shapes, '--format', 'coco', '--split', out/'valid.txt')
    assert code == 0 and 'mAP50' in stdout, err
    code, _, err = run(capsys, 'train', '--data', shapes, '--format', 'coco', '--arch', arch, '--backbone', 'vgg.vgg11', '--out', out)
    assert_one_line_error(code, err, "unknown backbone 'vgg.vgg11'")


def test_export_then_predict_and_eval_the_exported_file(coco_run, shapes, tmp_path, capsys):
    "`icefast export` writes a verified ONNX file next to the run; predict and eval take it as the model, as they take the run."
    code, out, err = run(capsys, 'export', coco_run, '--verify', '4')
    assert code == 0, err
    exported = coco_run/'model.onnx'
    assert exported.is_file() and 'verified on 4 images' in out and 'MISMATCH' not in out + err, out + err
    counts = {}
    for name, model in (('onnx', exported), ('pkl', coco_run)):
        code, _, err = run(capsys, 'predict', model, shapes/'images', '--out', tmp_path/name, '--threshold', '0.2')
        assert code == 0, err
        counts[name] = len(json.loads((tmp_path/name/'predictions.json').read_text()))
        code, _, err = run(capsys, 'eval', model, '--data', shapes, '--format', 'coco', '--split', coco_run/'valid.txt',
                           '--out', tmp_path/f'eval_{name}')
        assert code == 0, err
    assert counts['onnx'] > 0 and abs(counts['onnx'] - counts['pkl']) <= 0.02 * counts['pkl'], counts
    a, b = (json.loads((tmp_path/f'eval_{n}'/'eval.json').read_text())['metrics'] for n in ('onnx', 'pkl'))
    assert abs(a['mAP'] - b['mAP']) <= 0.005 and abs(a['mAP50'] - b['mAP50']) <= 0.005, (a, b)
    code, out, err = run(capsys, 'export', coco_run, '--format', 'torchscript', '--verify', '0', '--out', tmp_path/'m.torchscript')
    assert code == 0 and (tmp_path/'m.torchscript').is_file() and 'not verified' in out, err
    assert_one_line_error(*run(capsys, 'export', exported)[::2], 'already an export')
    assert_one_line_error(*run(capsys, 'predict', tmp_path/'none.onnx', shapes/'images', '--out', tmp_path/'x')[::2], 'no exported learner')
