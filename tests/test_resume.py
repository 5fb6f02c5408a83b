"""Resuming an interrupted run: `RunCheckpoint` + `fine_tune(start_epoch=)` in Python, `icefast train --resume` on the
command line, and an interrupted run folder used by predict / eval / export. Seeded CPU runs on the synthetic shapes."""
import json, warnings
import pytest
import torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed

from icefast.synthetic import make_shapes
from icefast.parsers import COCOParser
from icefast.data import dataloaders
from icefast.learner import detection_learner, RunCheckpoint, RunLog, read_checkpoint
from icefast.models import create_model
from icefast.cli import main

# Measured (2026-12-04, 2 shared CPU cores): a Faster R-CNN run interrupted after epoch 2 of 3 and resumed ends with every
# metric, loss and smoothed batch loss of the uninterrupted run bit-identical (largest difference 0.0: the random states
# of torch, numpy, Python and the DataLoaders come back with the checkpoint, and the CPU kernels are deterministic); the
# tiny learner's tests assert equality. TOL leaves room for another CPU's or torch version's kernels.
TOL = 1e-4
EPOCHS, STOP = 3, 2


class Interrupted(Exception): "The test's stand-in for Ctrl-C or a kill: out of `fine_tune` (a `CancelFitException` ends one fit only)."

class StopAfter(Callback):
    "Interrupt the training once `n` epochs are checkpointed, counting every fit of `fine_tune`."
    order = 90  # after the Recorder, the RunLog and the RunCheckpoint have the epoch
    def __init__(self, n): self.n = n
    def after_epoch(self):
        if len(self.recorder.values[-1]) and self.learn.run_checkpoint.done >= self.n: raise Interrupted(f"interrupted after {self.n} epochs")

def _interrupted(fit, *args, **kwargs):
    with pytest.raises(Interrupted): fit(*args, **kwargs)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    make_shapes(root, n_images=12, size=(80, 64), seed=5)
    return root


def _learner(shapes, path, **kw):
    "The same learner each call: seeded data order, split and initialization."
    set_seed(0, reproducible=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        p = COCOParser(shapes/'annotations.json', shapes/'images'); records = p.parse()
    dls = dataloaders(records, p.class_map, size=64, bs=4, batch_tfms=[])
    model = create_model('faster_rcnn', backbone='resnet_fpn.resnet18', num_classes=len(p.class_map), img_size=64)
    return detection_learner(dls, model, path=path, model_dir='models', **kw)


def _fine_tune(learn, cbs, **kw):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fine_tune(EPOCHS - kw.get('freeze_epochs', 0), 2e-3, cbs=cbs, **kw)


def _compare_rows(a, b, epochs=EPOCHS):
    "Every number of rows `a` and `b` (metrics.json rows), equal within TOL; the largest difference."
    assert [r['epoch'] for r in a] == [r['epoch'] for r in b] == list(range(epochs))
    diffs = [abs((ra[k] or 0) - (rb[k] or 0)) for ra, rb in zip(a, b) for k in ra if k not in ('epoch', 'seconds')]
    assert max(diffs) <= TOL, (max(diffs), a, b)
    return max(diffs)


def test_resumed_run_ends_as_the_uninterrupted_one(shapes, tmp_path, freeze_epochs=1):
    "Weights, optimizer, one-cycle schedule (frozen epochs included), best-so-far and log continue where they stopped."
    kw = dict(freeze_epochs=freeze_epochs, lr_mult=1)
    full = _learner(shapes, tmp_path/'full')
    log, ckpt = RunLog(), RunCheckpoint()
    _fine_tune(full, [log, ckpt], **kw)

    cut = _learner(shapes, tmp_path/'cut')
    _interrupted(_fine_tune, cut, [RunLog(), RunCheckpoint(), StopAfter(STOP)], **kw)
    assert read_checkpoint(tmp_path/'cut'/'models')['epochs_done'] == STOP

    again = _learner(shapes, tmp_path/'cut')  # a new process: the same learner, then restore
    log2, ckpt2 = RunLog(), RunCheckpoint()
    again.add_cbs([log2, ckpt2])
    start = ckpt2.restore(again)
    assert start == STOP
    _fine_tune(again, [], start_epoch=start, **kw)
    _compare_rows(log.rows, log2.rows)
    assert (ckpt2.best_epoch, ckpt2.best) == (ckpt.best_epoch, ckpt.best)
    for a, b in zip(full.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=TOL)


def _tiny_learner(path, opt_func):
    "A regression learner of two parameter groups, seeded: the resume mechanics without a detector's cost."
    from torch import nn
    import torch.nn.functional as F
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from icefast.learner import DetectionLearner
    set_seed(0)
    x = torch.randn(64, 3); ds = list(zip(x, x @ torch.randn(3, 2)))
    m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    return DetectionLearner(DataLoaders(DataLoader(ds, bs=8, shuffle=True), DataLoader(ds, bs=8)), m, loss_func=F.mse_loss,
                            opt_func=opt_func, path=path, splitter=lambda m: [list(m[:2].parameters()), list(m[3].parameters())])


@pytest.mark.parametrize('freeze_epochs, stop, opt', [(0, 2, 'TorchAdamW'), (2, 1, 'TorchAdamW'), (2, 2, 'TorchAdamW'),
                                                     (1, 3, 'TorchAdamW'), (0, 2, 'Adam')])
def test_resume_inside_and_after_the_frozen_epochs(tmp_path, freeze_epochs, stop, opt):
    "Stopped in the frozen epochs, at their end or after: the same losses (fastai's `unfreeze` clears the optimizer state once)."
    from fastai.optimizer import Adam
    from icefast.learner import TorchAdamW
    opt_func = {'TorchAdamW': TorchAdamW, 'Adam': Adam}[opt]
    ft = dict(epochs=4 - freeze_epochs, base_lr=1e-2, freeze_epochs=freeze_epochs, lr_mult=10, pct_start=0.3, div=5.)
    def fit(learn, cbs, **kw):
        with learn.no_bar(), learn.no_logging(): learn.fine_tune(**ft, cbs=cbs, **kw)
    full, log = _tiny_learner(tmp_path/'full', opt_func), RunLog()
    fit(full, [log, RunCheckpoint(monitor='valid_loss')])
    _interrupted(fit, _tiny_learner(tmp_path/'cut', opt_func), [RunLog(), RunCheckpoint(monitor='valid_loss'), StopAfter(stop)])
    again, log2, ckpt = _tiny_learner(tmp_path/'cut', opt_func), RunLog(), RunCheckpoint(monitor='valid_loss')
    again.add_cbs([log2, ckpt])
    fit(again, [], start_epoch=ckpt.restore(again))
    assert [r['valid_loss'] for r in log2.rows] == [r['valid_loss'] for r in log.rows]
    assert log2.batch_losses == log.batch_losses


def test_restore_refuses_a_folder_without_checkpoint(shapes, tmp_path):
    learn = _learner(shapes, tmp_path)
    with pytest.raises(FileNotFoundError, match='no checkpoint.pt'): RunCheckpoint().restore(learn)


class _Interrupt:
    "Patch `RunCheckpoint.after_epoch` to raise KeyboardInterrupt (Ctrl-C, a kill) once `n` epochs are saved."
    def __init__(self, monkeypatch, n):
        orig = RunCheckpoint.after_epoch
        def after_epoch(cb):
            orig(cb)
            if cb.done >= n: raise KeyboardInterrupt()
        monkeypatch.setattr(RunCheckpoint, 'after_epoch', after_epoch)


def test_cli_interrupted_run_predicts_and_resumes(shapes, tmp_path, monkeypatch, capsys):
    "An interrupted `icefast train` leaves a folder that predict / eval / export use, and `--resume` finishes as an uninterrupted run."
    args = ['--data', str(shapes), '--format', 'coco', '--size', '64', '--bs', '4', '--epochs', '3', '--lr', '2e-3',
            '--pretrained', 'false', '--backbone', 'resnet_fpn.resnet18', '--valid-pct', '0.25', '--seed', '1']
    full, run = tmp_path/'full', tmp_path/'run'
    assert main(['train', *args, '--out', str(full)]) == 0
    with monkeypatch.context() as m:
        _Interrupt(m, 2)
        assert main(['train', *args, '--out', str(run)]) == 130
    s = json.loads((run/'run.json').read_text())
    assert (s['state'], s['epochs_done'], s['epochs']) == ('interrupted', 2, 3) and not (run/'model.pkl').exists()
    assert {'best.pth', 'last.pth', 'checkpoint.pt', 'learner.pkl'} <= {f.name for f in (run/'models').iterdir()}
    assert len(json.loads((run/'metrics.json').read_text())) == 2
    capsys.readouterr()

    img = next((shapes/'images').iterdir())
    assert main(['predict', str(run), str(img), '--out', str(tmp_path/'pred')]) == 0
    out = capsys.readouterr().out
    assert 'unfinished run' in out and f"epoch {s['best_epoch']}" in out and 'models/best.pth' in out
    assert main(['eval', str(run), '--data', str(shapes), '--format', 'coco', '--split', str(run/'valid.txt')]) == 0
    assert 'unfinished run' in capsys.readouterr().out

    assert main(['train', '--resume', str(run), '--epochs', '9']) == 0
    out = capsys.readouterr().out
    assert '--epochs ignored' in out and 'resuming' in out
    s, f = json.loads((run/'run.json').read_text()), json.loads((full/'run.json').read_text())
    assert (s['state'], s['epochs_done'], s['epochs']) == ('finished', 3, 3) and (run/'model.pkl').is_file()
    assert not (run/'models'/'learner.pkl').exists()
    _compare_rows(json.loads((full/'metrics.json').read_text()), json.loads((run/'metrics.json').read_text()), 3)
    assert s['best_epoch'] == f['best_epoch']

    err = capsys.readouterr()
    assert main(['train', '--resume', str(run)]) == 2
    assert 'nothing to resume' in capsys.readouterr().err


def test_cli_resume_refuses_a_folder_without_checkpoint(tmp_path, capsys):
    assert main(['train', '--resume', str(tmp_path)]) == 2
    assert 'no run.json' in capsys.readouterr().err
    (tmp_path/'run.json').write_text(json.dumps({'state': 'running', 'epochs': 3, 'args': {'epochs': 3}}))
    assert main(['train', '--resume', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'no models/checkpoint.pt' in err and 'start it again' in err
