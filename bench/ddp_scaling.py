"""Data-parallel scaling: training images/s of one process against `--nproc` processes (`icefast.distributed`), the same global batch.

    python bench/ddp_scaling.py                          # CPU: Faster R-CNN resnet18-FPN from scratch, 128 px, global batch 4
    python bench/ddp_scaling.py --sync-bn off            # also each process normalizing its own images (no batch-norm all-reduce)
    python bench/ddp_scaling.py --arch efficientdet      # mobilenetv3_small_100 EfficientDet (batch-norm everywhere)
    python bench/ddp_scaling.py --device cuda --nproc 2 --size 384 --bs 8 --steps 30   # GPUs: 1 GPU against 2

Configurations, each in fresh processes started by `launch_training` (so every one pays the same start-up, which is not
timed): on the CPU, 1 process with all the cores as threads (the baseline: the same hardware), 1 process with as many
threads as each of the N processes gets, and N processes sharing the cores; on GPUs, 1 process on one GPU and N processes
on N GPUs. The global batch is `--bs` in every configuration (N processes: `--bs / N` each, as `learn.distrib_ctx` trains:
the batch size is per process). Each process trains one epoch of `--warmup` + `--steps` steps with a 2-image validation;
the time is from the end of the last warm-up step to the end of the last step, the slowest process's. Images/s =
steps x global batch / time; the ratio is N processes' images/s over the baseline's. The data: seeded synthetic shapes.
"""
from __future__ import annotations
import os
os.environ.setdefault('KMP_BLOCKTIME', '0')  # idle OpenMP threads sleep instead of spinning, in every process
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse, sys, tempfile, time, warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings('ignore', message='.*torch.jit.script.*', category=FutureWarning)
import torch

BACKBONES = {'faster_rcnn': 'resnet_fpn.resnet18', 'mask_rcnn': 'resnet_fpn.resnet18', 'retinanet': 'resnet_fpn.resnet18',
             'fcos': 'resnet_fpn.resnet18', 'efficientdet': 'mobilenetv3_small_100'}


def n_cpus() -> int:
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1

def load_line() -> str:
    try: return 'load average %.2f %.2f %.2f' % os.getloadavg()
    except OSError: return ''

def _worker(root, arch, size, bs, warmup, steps, sync_bn, device) -> float:
    "One process: train warmup + steps batches inside `distrib_ctx`; the seconds of the timed steps."
    import warnings; warnings.filterwarnings('ignore')
    from fastai.callback.core import Callback
    from fastai.torch_core import set_seed
    from icefast.parsers import COCOParser
    from icefast.data import dataloaders, IdSplitter
    from icefast.models import create_model
    from icefast.learner import detection_learner
    import icefast.distributed  # noqa: F401  (learn.distrib_ctx for detectors)
    p = COCOParser(Path(root)/'annotations.json', Path(root)/'images', masks=arch == 'mask_rcnn')
    records = p.parse()
    set_seed(0)
    dls = dataloaders(records, p.class_map, size=size, bs=bs, batch_tfms=[], splitter=IdSplitter([r.image_id for r in records[:2]]),
                      device=torch.device(device))
    model = create_model(arch, backbone=BACKBONES[arch], num_classes=len(p.class_map), img_size=size)
    learn = detection_learner(dls, model)
    class Clock(Callback):
        order = 100
        def before_fit(self): self.marks = []
        def after_batch(self):
            if not self.training: return
            if device == 'cuda': torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
            if len(self.marks) == warmup + steps: raise __import__('fastai.callback.core', fromlist=['x']).CancelFitException()
    clock = Clock()
    with learn.distrib_ctx(sync_bn=sync_bn), learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4, cbs=[clock])
    return clock.marks[-1] - clock.marks[warmup - 1]

def measure(root, args, nproc:int, threads:int) -> float:
    "Images/s of `nproc` processes with `threads` each (the slowest process's time)."
    from icefast.distributed import launch_training
    secs = launch_training(_worker, nproc, args=(str(root), args.arch, args.size, args.bs // nproc, args.warmup, args.steps,
                                                 None if args.sync_bn == 'default' else False, args.device),
                           device=args.device, threads=threads)
    return args.steps * args.bs / max(secs)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', choices=list(BACKBONES), default='faster_rcnn')
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--bs', type=int, default=4, help='global batch (each of N processes: bs / N)')
    p.add_argument('--nproc', type=int, default=2)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--repeats', type=int, default=1, help='measurements of each configuration, alternating; the best is kept')
    p.add_argument('--sync-bn', choices=['default', 'off', 'both'], default='default',
                   help="default: synchronized batch-norm where the model has any (as distrib_ctx does); both: also without")
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    args = p.parse_args()
    if args.bs % args.nproc: p.error(f'--bs {args.bs} is not a multiple of --nproc {args.nproc}')
    cores = n_cpus()
    from icefast.synthetic import make_shapes
    with tempfile.TemporaryDirectory() as tmp:
        n = 2 + (args.warmup + args.steps) * args.bs
        make_shapes(tmp, n_images=n, size=(args.size + args.size // 4, args.size), seed=0)
        if args.device == 'cuda':
            configs = [('1 GPU', 1, 1)] + [(f'{args.nproc} GPUs', args.nproc, 1)]
        else:
            per = max(1, cores // args.nproc)
            configs = [(f'1 process x {cores} threads', 1, cores), (f'1 process x {per} thread{"s" * (per > 1)}', 1, per),
                       (f'{args.nproc} processes x {per} thread{"s" * (per > 1)}', args.nproc, per)]
        modes = ['default', 'off'] if args.sync_bn == 'both' else [args.sync_bn]
        print(f"{args.arch} {BACKBONES[args.arch]} {args.size} px, global batch {args.bs}, {args.steps} timed steps after {args.warmup}; "
              f"{cores} CPUs; torch {torch.__version__}", flush=True)
        best = {}
        for _ in range(args.repeats):
            for mode in modes:
                args.sync_bn = mode
                for name, nproc, threads in configs:
                    if nproc == 1 and mode != modes[0]: continue  # batch-norm synchronization only matters with several
                    key = name if nproc == 1 else f'{name}, batch-norm {"synchronized" if mode == "default" else "per process"}'
                    best[key] = max(best.get(key, 0.), measure(tmp, args, nproc, threads))
                    print(f"  {key}: {best[key]:.2f} images/s", flush=True)
        base = best[configs[0][0]]
        print(f"\nimages/s (best of {args.repeats}), ratio to {configs[0][0]}:")
        for k, v in best.items(): print(f"  {k:55s} {v:7.2f}  {v / base:5.2f}x")
        print(load_line())

if __name__ == '__main__': main()
