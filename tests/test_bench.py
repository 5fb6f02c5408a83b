"The benchmark scripts still run against the library (they are scripts, so nothing else imports them)."
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
FRIDGE = ROOT/'tests/data/samples/fridge/odFridgeObjects'


def test_fine_tune_real_runs_both_recipes(tmp_path):
    "bench/fine_tune_real.py, one epoch of each side at 128 px (effdet's 5000 top-k needs that many anchors) on the fridge sample, with random backbone weights."
    import timm
    weights = tmp_path/'lite0.pth'
    torch.save(timm.create_model('tf_efficientnet_lite0', pretrained=False).state_dict(), weights)
    out = tmp_path/'result.json'
    (tmp_path/'test_labels.csv').write_text('filename,width,height,class\n11.jpg,499,666,milk_bottle\n14.jpg,499,666,can\n14.jpg,499,666,carton\nnot_there.jpg,1,1,can\n')
    cmd = [sys.executable, str(ROOT/'bench/fine_tune_real.py'), str(FRIDGE), str(weights), '--size', '128', '--bs', '2',
           '--epochs', '1', '--held-out', str(tmp_path/'test_labels.csv'), '--workers', '0', '--threads', '1', '--ema', '0.9', '--opt', 'fastai', '--frozen-bn-stats',
           '--clip', '0', '--aug', '{"min_zoom": 0.8, "max_zoom": 1.2}', '--json', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, 'KMP_BLOCKTIME': '0', 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    assert set(rows) == {'plain', 'icefast'}
    for side, row in rows.items():
        assert 0 <= row['mAP'] <= row['mAP50'] <= 1, (side, row)
        assert len(row['epoch_s']) == 1 and row['train_s_per_epoch'] > 0, (side, row)
    assert rows['icefast']['valid_s_per_epoch'] > 0
    assert 'icefast - plain: mAP' in r.stdout
    assert 'opt fastai, frozen bn stats True' in r.stdout  # the alternatives were taken
    assert '4 train, 2 held out (listed in' in r.stdout  # the listed split: a CSV's first column, its header and repeats ignored
    assert '1 listed image(s) not in the data set' in r.stdout and 'not_there.jpg' in r.stdout  # counted and named, not silently lost
    assert "fine_tune(1, **{'max_norm': 0.0})" in r.stdout  # --clip reaches fine_tune's own clipping
