"""Exported detectors against eager PyTorch: per-image CPU latency of onnxruntime and TorchScript, and the file sizes.

For each architecture, one model (random weights: latency does not depend on training, and no hub is reachable) at a
deployment-like size is exported to ONNX and to TorchScript with `icefast.export` (the same graph the learner exports:
letterboxed image in, detections out, normalization and NMS inside). The three runtimes then predict on the same
letterboxed images, interleaved image by image (eager, onnxruntime, TorchScript, in a rotating order) so that a change of
load hits them alike:

- `eager`: `model(x)` in eval mode under `torch.no_grad()`: the PyTorch model `learn.predict` runs;
- `onnxruntime`: `ExportedDetector.run(x)` on the .onnx file (CPU provider), then `to_original_pixels` at scale 1;
- `torchscript`: the same on the .torchscript file.

`to_original_pixels` at scale 1 gives the detections in the input's pixels, as eager's are: for Mask R-CNN, whose
graph holds 28 x 28 RoI masks (export format 2), that is the runtime's paste (`paste_roi_masks`), timed with the
graph; its share is printed below the table. `--paste-in-graph` exports masks pasted inside the graph instead
(format 1, torchvision's ONNX `Loop`), to compare.

All three get the same threads (`--threads`, default 2: this machine's cores). Times are the median per image over
`--n-images` after `--warmup` runs; ratios are against eager in the same run (target: onnxruntime <= 0.8x eager).
RetinaNet and FCOS are built with a score threshold of 0.005 so that random weights still detect (as trained ones do).

    . /work/venv/bin/activate   # or the README's virtual environment
    KMP_BLOCKTIME=0 python bench/export_speed.py                       # all five, 384 px (~6 min on 2 cores)
    KMP_BLOCKTIME=0 python bench/export_speed.py --arch efficientdet --size 512
    KMP_BLOCKTIME=0 python bench/export_speed.py --arch faster_rcnn mask_rcnn   # Mask R-CNN with its reference
"""
from __future__ import annotations
import os
os.environ.setdefault('KMP_BLOCKTIME', '0')
import argparse, statistics, tempfile, time, warnings
from pathlib import Path

import numpy as np
import torch

from icefast.core import ClassMap
from icefast.models import create_model
from icefast.export import ExportGraph, export_header, write_onnx, write_torchscript
from icefast.runtime import ExportedDetector, to_original_pixels

ARCHS = {'faster_rcnn': 'resnet_fpn.resnet50', 'mask_rcnn': 'resnet_fpn.resnet50', 'retinanet': 'resnet_fpn.resnet50',
         'fcos': 'resnet_fpn.resnet50', 'efficientdet': 'tf_efficientdet_lite0'}

def build(arch:str, backbone:str, size:int, n_classes:int):
    kw = {'score_thresh': 0.005} if arch in ('retinanet', 'fcos') else {}
    torch.manual_seed(0)
    return create_model(arch, backbone=backbone, num_classes=n_classes + 1, img_size=size, **kw).eval()

def images(n:int, size:int) -> list:
    "Letterboxed-looking inputs: smooth random pictures with the bottom quarter black (padding)."
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g), size=(size, size), mode='bilinear')
        x[..., 3 * size // 4:, :] = 0
        out.append(x)
    return out

def bench(arch:str, backbone:str, size:int, n:int, warmup:int, threads:int, folder:Path, paste_in_graph:bool=False) -> dict:
    model, cm = build(arch, backbone, size, 3), ClassMap(['a', 'b', 'c'])
    xs = images(n + warmup, size)
    graph = ExportGraph(model, paste_masks=paste_in_graph).eval()
    paths = {}
    t0 = time.perf_counter()
    for fmt, write in (('onnx', write_onnx), ('torchscript', write_torchscript)):
        paths[fmt] = folder/f"{arch}.{fmt}"
        example = next(x for x in xs if len(model(x)[0]['scores']))
        write(graph, example, paths[fmt], export_header(model, cm, graph, fmt))
    export_s = time.perf_counter() - t0
    pasted = []  # seconds of the runtime's step to the input's pixels (the paste of RoI masks), per exported run
    def exported(det):
        def run(x):
            outs = det.run(x)
            t = time.perf_counter()
            res = [to_original_pixels(d, 1.0, (size, size), det.mask_format) for d in outs]
            pasted.append(time.perf_counter() - t)
            return res
        return run
    runs = {'eager': lambda x: model(x), 'onnxruntime': exported(ExportedDetector(paths['onnx'], threads=threads)),
            'torchscript': exported(ExportedDetector(paths['torchscript']))}
    times = {k: [] for k in runs}
    names = list(runs)
    with torch.no_grad():
        for i, x in enumerate(xs):
            order = names[i % 3:] + names[:i % 3]
            for k in order:
                inp = x if k == 'eager' else x.numpy()
                t = time.perf_counter(); runs[k](inp); dt = time.perf_counter() - t
                if i >= warmup: times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    med['paste'] = statistics.median(pasted[2 * warmup:])
    return dict(arch=arch, backbone=backbone, size=size, **{f'{k}_ms': 1000 * v for k, v in med.items()},
                onnx_ratio=med['onnxruntime'] / med['eager'], torchscript_ratio=med['torchscript'] / med['eager'],
                onnx_mb=paths['onnx'].stat().st_size / 2**20, torchscript_mb=paths['torchscript'].stat().st_size / 2**20,
                export_s=export_s, mask_format=graph.mask_format)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--arch', nargs='*', default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument('--size', type=int, default=384)
    ap.add_argument('--n-images', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--paste-in-graph', action='store_true', help="masks pasted inside the graph (format 1) instead of by the runtime")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter('ignore')
    print(f"torch {torch.__version__}, {a.threads} threads, {a.size} px, median of {a.n_images} images after {a.warmup} warm-up")
    print(f"{'architecture':<34}{'eager ms':>10}{'ORT ms':>9}{'TS ms':>9}{'ORT/eager':>11}{'TS/eager':>10}{'ONNX MB':>9}{'TS MB':>8}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for arch in a.arch:
            r = bench(arch, ARCHS[arch], a.size, a.n_images, a.warmup, a.threads, Path(d), a.paste_in_graph)
            rows.append(r)
            print(f"{arch + ' ' + r['backbone']:<34}{r['eager_ms']:>10.0f}{r['onnxruntime_ms']:>9.0f}{r['torchscript_ms']:>9.0f}"
                  f"{r['onnx_ratio']:>10.2f}x{r['torchscript_ratio']:>9.2f}x{r['onnx_mb']:>9.1f}{r['torchscript_mb']:>8.1f}", flush=True)

    for r in rows:
        if r['mask_format']:
            print(f"{r['arch']}: masks {'pasted by the runtime from RoI masks' if r['mask_format'] == 'roi' else 'pasted in the graph'}; "
                  f"the runtime's step to the input's pixels, in the ORT and TS times: median {r['paste_ms']:.0f} ms")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")

if __name__ == '__main__': main()
