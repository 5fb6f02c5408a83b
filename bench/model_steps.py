"""Seconds per training step of every catalog model on this machine's CPU, at 384 px, batch 2.

Prints one row per model: parameters, seconds per step (median of --steps after one warm-up step), and the ratio
to Faster R-CNN ResNet50-FPN measured in the same run. Models are built with pretrained=False (nothing is
downloaded) and torchvision's default RoI sampling. EfficientDet d7x needs multiples of 256: it runs at 512.

    python bench/model_steps.py                 # every model (~10 min on 2 cores)
    python bench/model_steps.py --only resnet18 # names containing a word
"""
import argparse, os, statistics, time, warnings
os.environ.setdefault('KMP_BLOCKTIME', '0')
import torch

from icefast.models import create_model, list_models, model_spec

def catalog():
    "Every registered architecture with every backbone it takes."
    for arch in list_models():
        for n in list_models(arch): yield arch, n

def build(arch, name, size): return create_model(arch, backbone=name, num_classes=3, img_size=size)

def batch(size, masks):
    boxes = torch.tensor([[30., 40., 200., 220.], [150., 100., 330., 300.]])
    t = {'boxes': boxes, 'labels': torch.tensor([1, 2])}
    if masks:
        t['masks'] = torch.zeros(2, size, size, dtype=torch.uint8)
        for m, b in zip(t['masks'], boxes.long()): m[b[1]:b[3], b[0]:b[2]] = 1
    return [torch.rand(3, size, size) for _ in range(2)], [t, dict(t)]

def step_seconds(model, size, masks, steps):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images, targets = batch(size, masks)
    model.train()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad(); loss.backward(); opt.step()
        if i: times.append(time.perf_counter() - t)
    return statistics.median(times)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--size', type=int, default=384)
    ap.add_argument('--steps', type=int, default=2)
    ap.add_argument('--only', default='')
    args = ap.parse_args()
    warnings.simplefilter('ignore')
    base_s = step_seconds(build('faster_rcnn', 'resnet_fpn.resnet50', args.size), args.size, False, args.steps)
    print(f"{'architecture':13} {'name':34} {'params (M)':>10} {'s/step':>7} {'vs R50-FPN':>10}")
    for arch, name in catalog():
        if args.only and args.only not in name: continue
        size = 512 if name.endswith('d7x') else args.size
        m = build(arch, name, size)
        s = step_seconds(m, size, model_spec(arch).masks, args.steps)
        params = sum(p.numel() for p in m.parameters()) / 1e6
        print(f"{arch:13} {name + ('' if size == args.size else f' @{size}'):34} {params:10.1f} {s:7.2f} {s/base_s:10.2f}", flush=True)
    print(f"baseline: faster_rcnn resnet_fpn.resnet50 {base_s:.2f} s/step at {args.size} px, batch 2, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

if __name__ == '__main__': main()
