"""Shared fixtures: the sample annotation sets and writers of tiny (and deliberately broken) image files."""
import os, sys
from pathlib import Path

os.environ.setdefault('KMP_BLOCKTIME', '0')  # idle OpenMP threads must not spin (slow on few cores)
if os.environ.get('PYTEST_XDIST_WORKER'):
    # `pytest -n 2`: one thread per worker (and per notebook it starts); two single-threaded workers did 1.5x the work of
    # one two-threaded process on 2 cores (small detectors barely use a second thread)
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    import torch
    torch.set_num_threads(1)

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / 'tests' / 'data' / 'samples'
# `pytest` (unlike `python -m pytest`) does not put the repo root on sys.path; import the source tree
# when icefast is not installed
if str(ROOT) not in sys.path:
    try: import icefast  # noqa: F401
    except ImportError: sys.path.insert(0, str(ROOT))

# a real JPEG of the samples, cut in half for the truncated-file case
REAL_JPEG = SAMPLES / 'fridge' / 'odFridgeObjects' / 'images' / '10.jpg'
EXIF_ORIENTATION = 0x0112

# kinds of image `make_image` writes; the extension it defaults to
IMAGE_KINDS = {
    'RGB': '.png', 'L': '.png', 'RGBA': '.png', 'P': '.png', 'I;16': '.png',
    'jpeg': '.jpg', 'exif_rotated': '.jpg', 'truncated': '.jpg', 'not_image': '.jpg',
}


def _pattern(w, h):
    "A small deterministic gradient, so that every format has real content to encode."
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 255) // max(w - 1, 1)).astype(np.uint8), ((y * 255) // max(h - 1, 1)).astype(np.uint8)


def write_image(path, kind='RGB', size=(32, 24), orientation=6):
    """Write a tiny image of `kind` (see `IMAGE_KINDS`) at `path`; `size` is (width, height) as stored
    (an `exif_rotated` JPEG with `orientation` 5-8 is *displayed* as (height, width)). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    gx, gy = _pattern(w, h)
    if kind in ('RGB', 'jpeg'):
        Image.fromarray(np.stack([gx, gy, 255 - gx], -1)).save(path, format='PNG' if kind == 'RGB' else 'JPEG')
    elif kind == 'L':
        Image.fromarray(gx, 'L').save(path, format='PNG')
    elif kind == 'RGBA':
        Image.fromarray(np.stack([gx, gy, 255 - gx, gy], -1), 'RGBA').save(path, format='PNG')
    elif kind == 'P':
        im = Image.fromarray((gx // 64).astype(np.uint8), 'P')
        im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * (3 * 252))
        im.save(path, format='PNG')
    elif kind == 'I;16':
        # real 16-bit values (not multiples of 257, whose low byte would equal the 8-bit value)
        Image.fromarray(gx.astype(np.uint16) * 256 + 100).save(path, format='PNG')  # mode I;16
    elif kind == 'exif_rotated':
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        Image.fromarray(np.stack([gx, gy, 255 - gx], -1)).save(path, format='JPEG', exif=exif)
    elif kind == 'truncated':
        data = REAL_JPEG.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == 'not_image':
        path.write_text('this is not an image, whatever its name says\n')
    else:
        raise ValueError(f'unknown image kind {kind!r}; one of {list(IMAGE_KINDS)}')
    return path


@pytest.fixture
def samples():
    "Path to tests/data/samples (the real COCO, VOC, VIA and fridge annotation sets)."
    assert SAMPLES.is_dir(), SAMPLES
    return SAMPLES


@pytest.fixture
def make_image(tmp_path):
    """`make_image(name, kind='RGB', size=(32, 24), folder='images')` writes a tiny image of `kind`
    (RGB, L, RGBA, P, I;16, jpeg, exif_rotated, truncated, not_image) under tmp_path/folder and returns its path."""
    def _make(name=None, kind='RGB', size=(32, 24), folder='images', **kwargs):
        if name is None: name = kind.replace(';', '') + IMAGE_KINDS[kind]
        return write_image(tmp_path / folder / name, kind, size, **kwargs)
    _make.root = tmp_path
    return _make


# The longest tests (minutes each, from `--durations`) first: with pyproject's `--maxschedchunk 1` each xdist worker takes
# the next test when it is free, so the two finish together (by default each got long runs of consecutive tests, and the
# notebooks, last in the collection, kept one worker busy minutes after the other had finished)
LONGEST_FIRST = ('test_notebook[20_', 'test_notebook[24_', 'test_notebook[21_', 'test_mask_rcnn_fine_tunes_boxes_and_masks',
                 'test_faster_rcnn_trains_loss_falls', 'test_single_stage_detectors_train', 'test_efficientdet_fine_tunes',
                 'test_mask_rcnn_on_coco_masks', 'test_two_processes_validate',  # its fixture's other tests later (compute_once: no wait)
                 'test_resumed_run_', 'test_notebook[09_', 'test_notebook[03_')


def pytest_collection_modifyitems(config, items):
    "Put the longest tests first (a stable sort: the rest keep their order)."
    rank = lambda item: next((i for i, k in enumerate(LONGEST_FIRST) if k in item.nodeid), len(LONGEST_FIRST))
    items.sort(key=rank)


def compute_once(tmp_path_factory, name:str, compute):
    """`compute()` once per test session: the first caller (on any xdist worker) runs it and saves its (picklable) result,
    later ones, waiting on a lock, load that. A module fixture alone runs once per worker that runs one of its tests."""
    import fcntl, pickle
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / f'computed_{name}.pkl'  # this session's, shared by its workers
    with open(f'{path}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file(): return pickle.loads(path.read_bytes())
        result = compute()
        path.write_bytes(pickle.dumps(result))
        return result


def train_once(tmp_path_factory, name:str, learner, fit):
    """`learner()` trained by `fit(learn)` (which returns what else the tests need) once per test session: the first test
    (of any module, on any xdist worker) trains and saves the weights, the recorder's history and `fit`'s result; later ones
    build the same learner (deterministic data and split) and load them, instead of training it again. Returns (learn, fit's result)."""
    import fcntl, pickle
    learn = learner()
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / f'trained_{name}.pkl'  # this session's, shared by its workers
    with open(f'{path}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            saved = pickle.loads(path.read_bytes())
            learn.model.load_state_dict(saved['state'])
            learn.model.score_thresholds = saved['thresholds']
            learn.recorder.metric_names, learn.recorder.values = saved['names'], saved['values']
            return learn, saved['result']
        result = fit(learn)
        path.write_bytes(pickle.dumps({'state': learn.model.state_dict(), 'thresholds': getattr(learn.model, 'score_thresholds', None),
                                       'names': learn.recorder.metric_names, 'values': learn.recorder.values, 'result': result}))
        return learn, result
