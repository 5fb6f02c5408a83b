"""Shared pieces of the Learner benchmarks `train_overhead.py`, `valid_cost.py` and `predict_cost.py`.

Command line options, the seeded synthetic shapes set (COCO format, parsed with `COCOParser`), the model builders,
clocks that wait for the device, a loader that replays pre-collated batches to a `Learner`, and a plain
`torch.utils.data.DataLoader` over the same decoded items as icefast's fastai `DataLoader` (for the baselines that
include data loading). Import this module before torch: it sets the OpenMP variables.
"""
from __future__ import annotations
import os
# Idle OpenMP threads sleep instead of spinning (as in data_pipeline.py); must be set before torch is imported.
os.environ.setdefault('KMP_BLOCKTIME', '0')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import random, statistics, sys, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore', message='.*torch.jit.script.*', category=FutureWarning)  # printed when fastai imports
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCHS = ('faster_rcnn', 'mask_rcnn', 'retinanet', 'fcos', 'efficientdet')
DEFAULT_BACKBONES = {'faster_rcnn': 'resnet_fpn.resnet18', 'mask_rcnn': 'resnet_fpn.resnet18', 'retinanet': 'resnet_fpn.resnet18',
                     'fcos': 'resnet_fpn.resnet18', 'efficientdet': 'mobilenetv3_small_100'}  # small ones, to time the learner


def n_cpus() -> int:
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


def add_common_args(p, size=128, bs=4, repeats=3):
    "The options every Learner benchmark takes."
    p.add_argument('--arch', choices=ARCHS, default='faster_rcnn')
    p.add_argument('--backbone', default=None,
                   help=f"R-CNN: a registered backbone (default {DEFAULT_BACKBONES['faster_rcnn']}); EfficientDet: a timm backbone "
                        f"(default {DEFAULT_BACKBONES['efficientdet']}) or an EfficientDet name such as tf_efficientdet_lite0")
    p.add_argument('--size', type=int, default=size, help='DataLoaders/model image size (EfficientDet: a multiple of 128)')
    p.add_argument('--bs', type=int, default=bs)
    p.add_argument('--image-size', nargs=2, type=int, default=(160, 128), metavar=('W', 'H'), help='synthetic image size')
    p.add_argument('--max-shapes', type=int, default=3, help='up to this many shapes per synthetic image')
    p.add_argument('--repeats', type=int, default=repeats, help='measurements per pipeline, alternating the order; best and median kept')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (or 'cuda:1', ...)")
    p.add_argument('--threads', type=int, default=0, help='torch threads of the main process (0: every CPU)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--profile', action='store_true', help='also cProfile one icefast measurement')
    p.add_argument('--verbose', '-v', action='store_true', help='print every measurement')
    return p


def setup(args):
    "Threads, seeds, quiet warnings; returns the torch device."
    warnings.simplefilter('ignore')
    torch.set_num_threads(args.threads or n_cpus())
    random.seed(args.seed); np.random.seed(args.seed); torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == 'cuda' and not torch.cuda.is_available(): raise SystemExit('--device cuda: no CUDA device here')
    if args.backbone is None: args.backbone = DEFAULT_BACKBONES[args.arch]
    if args.arch == 'efficientdet' and args.size % 128: raise SystemExit('EfficientDet needs --size a multiple of 128')
    return dev


def describe(args, dev) -> str:
    return (f"{args.arch} {args.backbone}, {args.size} px, batch {args.bs}, {dev}, {torch.get_num_threads()} torch threads, "
            f"{n_cpus()} CPUs; synthetic {args.image_size[0]}x{args.image_size[1]} shapes")


def make_records(root:Path, n_images:int, args, seed:int=None):
    "A seeded shapes set (COCO JSON + JPEGs) under `root`, parsed with `COCOParser` (masks for Mask R-CNN): (records, class_map)."
    from icefast.synthetic import make_shapes
    from icefast.parsers import COCOParser
    from icefast.models import model_spec
    ann, imgs = make_shapes(root, n_images=n_images, size=tuple(args.image_size), max_shapes=args.max_shapes,
                            seed=args.seed if seed is None else seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        parser = COCOParser(ann, imgs, masks=model_spec(args.arch).masks)
        records = parser.parse()
    return records, parser.class_map


def build_model(args, num_classes:int):
    "The detector of `--arch`/`--backbone` from icefast's registry, untrained (pretrained=False: nothing is downloaded)."
    from icefast.models import create_model
    return create_model(args.arch, backbone=args.backbone, num_classes=num_classes, img_size=args.size)


def model_settings(model) -> dict:
    "The sampling settings that change the work of an R-CNN step (empty for EfficientDet)."
    if not hasattr(model, 'rpn'): return {}
    return dict(pre_nms=dict(model.rpn._pre_nms_top_n), post_nms=dict(model.rpn._post_nms_top_n),
                rois=model.roi_heads.fg_bg_sampler.batch_size_per_image, min_size=model.transform.min_size, max_size=model.transform.max_size)


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)

def clock(dev) -> float:
    "perf_counter after the device has finished its queued work."
    sync(dev)
    return time.perf_counter()


def load_line() -> str:
    return (f"load average {' '.join(f'{l:.2f}' for l in os.getloadavg())} on {n_cpus()} CPUs "
            "(other processes on the machine distort the numbers: compare ratios from the same run)")


def stats(xs) -> tuple:
    "(best, median) of a list of seconds."
    return min(xs), statistics.median(xs)


def ratio_line(name, ice:list, base:list, target:float, paired:list=None) -> str:
    """Ratio icefast/baseline of the best measurements, and the median of the per-repeat ratios (the two measurements of
    a repeat run next to each other, so a change of the machine's load hits both); the verdict is on the latter."""
    r_best = min(ice)/min(base)
    r_pair = statistics.median(paired) if paired else statistics.median(ice)/statistics.median(base)
    ok = 'ok' if r_pair <= target else 'MISSES the target'
    return f"{name:46s} {r_best:6.3f} (best)  {r_pair:6.3f} (median of paired)   target <= {target}: {ok}"


class CachedLoader:
    "Replays pre-collated batches to a fastai `Learner` (data loading excluded); what icefast's adapter reads of a DataLoader."
    def __init__(self, batches:list, items:list, bs:int): self.batches, self.items, self.bs = batches, items, bs
    def __iter__(self): return iter(self.batches)
    def __len__(self): return len(self.batches)


def collect_batches(dl, n:int=None) -> list:
    "The first `n` batches of `dl` (all by default), as it yields them (after `after_batch`, on its device)."
    out = []
    for b in dl:
        out.append(b)
        if n is not None and len(out) == n: break
    return out


def fastai_order(dl, seed:int) -> list:
    "The item order `dl` draws in its next epoch once its generator is reset with `reset_order(dl, seed)`."
    reset_order(dl, seed)
    dl.randomize()
    idxs = list(dl.get_idxs())
    reset_order(dl, seed)
    return idxs

def reset_order(dl, seed:int): dl.rng = random.Random(seed)


# ---------------------------------------------------------------------------------------------------------------
# Plain torch DataLoader over the same decoded items
# ---------------------------------------------------------------------------------------------------------------
class SameItems(torch.utils.data.Dataset):
    "Item `i` of a fastai `TfmdDL` decoded and augmented by its own item pipeline: the same work per item as icefast's loader."
    def __init__(self, dl): self.dl = dl
    def __len__(self): return len(self.dl.dataset)
    def __getitem__(self, i): return self.dl.do_item(i)

def targets_collate(items):
    "torchvision-style collate in the workers: stacked uint8 images, one target dict per image (boxes in pixels, no padding)."
    from icefast.data import targets_from_batch
    images = torch.stack([it[0].as_subclass(torch.Tensor) for it in items])
    hw = tuple(images.shape[-2:])
    targets = [targets_from_batch(it[1][None], it[2][None], it[3][None] if len(it) > 3 else None, hw)[0] for it in items]
    return images, targets

def _one_thread(_): torch.set_num_threads(1)

def plain_loader(fastai_dl, order:list, num_workers:int, drop_last:bool):
    "A `torch.utils.data.DataLoader` over the items of `fastai_dl` in `order`, batched as `fastai_dl` batches them."
    return torch.utils.data.DataLoader(SameItems(fastai_dl), batch_size=fastai_dl.bs, sampler=order, drop_last=drop_last,
                                       num_workers=num_workers, collate_fn=targets_collate,
                                       worker_init_fn=_one_thread if num_workers else None)

def to_device_batch(images, targets, dev):
    "The references' per-step move: images to the device as float 0..1, target tensors to the device."
    images = images.to(dev, non_blocking=True).float().div_(255)
    return images, [{k: v.to(dev, non_blocking=True) for k, v in t.items()} for t in targets]


class Stopwatch:
    """Wall and main-process CPU seconds accumulated per named part of a run, by wrapping functions and hooking a model's
    forward (on the CPU only: on a GPU each reading would need a synchronization, which would change what is measured).
    `acc[name]` is `[wall, cpu]`; a part nested in another is counted in both."""
    def __init__(self, dev): self.dev, self.on, self.acc = dev, dev.type == 'cpu', {}

    def add(self, name:str, wall:float, cpu:float):
        a = self.acc.setdefault(name, [0., 0.])
        a[0] += wall; a[1] += cpu

    def wrap(self, name:str, f):
        if not self.on: return f
        def g(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try: return f(*args, **kwargs)
            finally: self.add(name, time.perf_counter() - t, time.process_time() - c)
        return g

    def hook_forward(self, model, name:str='forward', training_only:bool=False) -> list:
        "Hooks adding the top-level forwards of `model` to `name`; returns their handles (`.remove()` them)."
        if not self.on: return []
        def pre(m, args):
            if m.training or not training_only: self._t = (time.perf_counter(), time.process_time())
        def post(m, args, out):
            if m.training or not training_only: self.add(name, time.perf_counter() - self._t[0], time.process_time() - self._t[1])
        return [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]


def profile_call(f, title:str, top:int=30):
    "cProfile `f()`; print the top functions by own time and by cumulative time."
    import cProfile, io, pstats
    pr = cProfile.Profile()
    pr.enable()
    try: f()
    finally: pr.disable()
    for key in ('tottime', 'cumulative'):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        print(f"\n--- cProfile, {title}, sorted by {key} ---")
        print('\n'.join(s.getvalue().splitlines()[4:]))
