"""Prediction cost: `learn.predict(path)` per image against the raw model forward and against a plain load+resize+forward.

Three pipelines over the same image files, side by side in one run, repeats alternating the order:

- `raw forward`: the model's eval forward on the image already loaded and letterboxed (the very tensor icefast's
  test DataLoader makes of it, on the device): `with torch.no_grad(): model(x)`. Nothing but the network.
- `plain`: what a user writes by hand with PIL and torch: open, EXIF transpose, RGB, one bilinear resize keeping
  the aspect, zero padding to `size` x `size`, float tensor / 255, eval forward, boxes scaled back to the image's
  pixels and clipped (and Mask R-CNN masks cropped and resized back to the image), class names.
- `icefast`: `learn.predict(path)` on a Learner made by `detection_learner(dls, model)`: detections in the
  image's own pixels, with class names.

The target is `learn.predict` <= 1.1 x the raw forward (and so <= 1.1 x the plain pipeline, which costs a little more
than the raw forward). The pipelines are interleaved image by image (the three on image i, in a rotating order, then
image i+1), so that a change of the machine's load hits the three alike; the ratios are the median of the per-image
ratios; the times per image are the mean over `--n-images` images, best and median of `--repeats`. The DataLoaders are made as a user makes them (`dataloaders(records, class_map, size, bs,
batch_tfms=[])`): fastai's default `num_workers` unless `--workers` is given. On the CPU `predict` is split into its
parts (reading the image size, building the test DataLoader, iterating it, the forward, `to_original`).

    . .venv/bin/activate
    python bench/predict_cost.py                      # Faster R-CNN resnet18-FPN, 128 px (~1-2 min on 2 cores)
    python bench/predict_cost.py --arch mask_rcnn
    python bench/predict_cost.py --arch efficientdet
    python bench/predict_cost.py --workers 0          # DataLoaders made with num_workers=0
    python bench/predict_cost.py --device cuda --size 384
"""
from __future__ import annotations
import learner_common as C  # first: sets KMP_BLOCKTIME / OMP_WAIT_POLICY before torch is imported

import argparse, statistics, tempfile, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

DEFAULT_N_IMAGES = {'faster_rcnn': 8, 'mask_rcnn': 4, 'efficientdet': 24}


def plain_predict(model, path, size:int, dev, names:list, masks:bool) -> dict:
    "PIL load + letterbox + eval forward + boxes (and masks) back to the image's pixels."
    img = ImageOps.exif_transpose(Image.open(path)).convert('RGB')
    w, h = img.size
    s = min(size/w, size/h)
    cw, ch = max(1, round(w*s)), max(1, round(h*s))
    canvas = Image.new('RGB', (size, size))
    canvas.paste(img.resize((cw, ch), Image.BILINEAR), (0, 0))
    x = torch.from_numpy(np.asarray(canvas)).permute(2, 0, 1)[None].to(dev).float().div_(255)
    with torch.no_grad(): d = model(x)[0]
    boxes = (d['boxes'].float() / s).cpu()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w); boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    out = {'boxes': boxes, 'scores': d['scores'].cpu(), 'labels': d['labels'].cpu()}
    if masks and 'masks' in d:
        m = d['masks'][:, 0, :ch, :cw].float()
        out['masks'] = (F.interpolate(m[None], size=(h, w), mode='bilinear', align_corners=False)[0] > 0.5).to(torch.uint8).cpu()
    out['names'] = [names[int(l)] for l in out['labels']]
    return out


def raw_forward(model, x, dev):
    with torch.no_grad(): out = model(x)
    C.sync(dev)
    return out


def time_images(f, n:int, dev) -> tuple:
    "Mean (wall, CPU) seconds per image of `f(i)` for i < n."
    t, c = C.clock(dev), time.process_time()
    for i in range(n): f(i)
    return (C.clock(dev) - t)/n, (time.process_time() - c)/n


PARTS = [('image_size', 'image_size (reads the header)'), ('test_dl', 'dls.test_dl([record]) (builds a DataLoader)'),
         ('iterate', 'iterating it (load, letterbox, collate; workers)'), ('forward', 'model forward'),
         ('to_original', 'to_original'), ('rest', 'the rest')]

def predict_parts(learn, paths, dev) -> dict:
    "On the CPU: `learn.predict` over `paths` with its parts timed; mean (wall, CPU) seconds per image per part."
    import icefast.core as core
    import icefast.learner as L
    sw = C.Stopwatch(dev)
    handles = sw.hook_forward(learn.model)
    saved = (core.image_size, L.to_original)
    core.image_size, L.to_original = sw.wrap('image_size', core.image_size), sw.wrap('to_original', L.to_original)
    object.__setattr__(learn.dls, 'test_dl', sw.wrap('test_dl', type(learn.dls).test_dl.__get__(learn.dls)))
    learn._detect = sw.wrap('_detect', type(learn)._detect.__get__(learn))
    try: total = time_images(lambda i: learn.predict(paths[i]), len(paths), dev)
    finally:
        for h in handles: h.remove()
        core.image_size, L.to_original = saved
        learn.dls.__dict__.pop('test_dl', None); learn.__dict__.pop('_detect', None)
    n, a = len(paths), sw.acc
    out = {k: tuple(v/n for v in a.get(k, (0., 0.))) for k in ('image_size', 'test_dl', 'forward', 'to_original')}
    det = tuple(v/n for v in a['_detect'])
    out['iterate'] = tuple(d - f - o for d, f, o in zip(det, out['forward'], out['to_original']))
    out['rest'] = tuple(t - d - i - b for t, d, i, b in zip(total, det, out['image_size'], out['test_dl']))
    out['total'] = total
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    C.add_common_args(p)
    p.add_argument('--n-images', type=int, default=None, help=f'images predicted per measurement (default per arch: {DEFAULT_N_IMAGES})')
    p.add_argument('--workers', type=int, default=None, help="num_workers of the DataLoaders (default: fastai's default, as a user gets it)")
    args = p.parse_args(argv)
    dev = C.setup(args)
    n = args.n_images or DEFAULT_N_IMAGES[args.arch]
    t0 = time.perf_counter()

    from icefast.data import dataloaders
    from icefast.learner import detection_learner

    with tempfile.TemporaryDirectory(prefix='icefast_bench_') as tmp:
        records, cm = C.make_records(Path(tmp), max(n, 2*args.bs), args)
        kw = {} if args.workers is None else {'num_workers': args.workers}
        dls = dataloaders(records, cm, size=args.size, bs=args.bs, batch_tfms=[], device=dev, **kw)
        model = C.build_model(args, len(cm))
        learn = detection_learner(dls, model)
        model.to(dev).eval()
        recs = records[:n]
        paths = [str(r.filepath) for r in recs]
        xs = [next(iter(dls.test_dl([r], num_workers=0)))[0].as_subclass(torch.Tensor).to(dev) for r in recs]  # what predict feeds the model
        names, masks = list(cm.vocab), args.arch == 'mask_rcnn'
        pipes = {'raw forward': lambda i: raw_forward(model, xs[i], dev),
                 'plain': lambda i: plain_predict(model, paths[i], args.size, dev, names, masks),
                 'icefast': lambda i: learn.predict(paths[i])}
        workers = dls.valid.fake_l.num_workers
        print(f"{C.describe(args, dev)}; {n} images per measurement; DataLoaders num_workers={workers}"
              f"{' (fastai default)' if args.workers is None else ''}, so test_dl has {workers}", flush=True)
        for f in pipes.values(): f(0)  # warm-up (untimed)

        # interleaved image by image (the three pipelines on image i, in a rotating order, then image i+1), so that a change of
        # the machine's load hits the three measurements of an image alike; ratios are taken per image, then their median
        res = {k: [] for k in pipes}  # per repeat: mean (wall, CPU) seconds per image
        paired = {(k, j): [] for k in ('raw forward', 'plain') for j in (0, 1)}  # per (repeat, image)
        keys = list(pipes)
        for rep in range(args.repeats):
            sums = {k: [0., 0.] for k in keys}
            for i in range(n):
                got = {}
                r = (rep*n + i) % 3
                for k in keys[r:] + keys[:r]:
                    got[k] = time_images(lambda _: pipes[k](i), 1, dev)
                    for j in (0, 1): sums[k][j] += got[k][j]/n
                for k in ('raw forward', 'plain'):
                    for j in (0, 1): paired[(k, j)].append(got['icefast'][j]/got[k][j])
            for k in keys:
                res[k].append(tuple(sums[k]))
                if args.verbose: print(f"   rep {rep} {k:12s} {1000*sums[k][0]:8.1f} ms/image, {1000*sums[k][1]:8.1f} CPU ms/image", flush=True)
        parts = predict_parts(learn, paths, dev) if dev.type == 'cpu' else None
        if args.profile: C.profile_call(lambda: [learn.predict(p_) for p_ in paths], f"learn.predict over {n} images")
        d = learn.predict(paths[0])

    print(f"\nms per image, best and median of {args.repeats} (each the mean over {n} images); "
          f"{args.arch} {args.backbone} {args.size} px on {dev}")
    hdr = f"{'pipeline':54s} {'best':>8s} {'median':>8s} {'CPU ms best':>11s}"
    print(hdr); print('-'*len(hdr))
    desc = {'raw forward': 'raw forward (image loaded and letterboxed)', 'plain': 'plain PIL load + letterbox + forward + rescale',
            'icefast': f'learn.predict(path) (test_dl num_workers={workers})'}
    for k in keys:
        b, m = C.stats([r[0] for r in res[k]])
        print(f"{desc[k]:54s} {1000*b:8.1f} {1000*m:8.1f} {1000*min(r[1] for r in res[k]):11.1f}")
    if parts:
        print(f"\nwhere learn.predict's time goes, ms per image (one more pass, after the measurements), wall | CPU:")
        for k, name in PARTS: print(f"  {name:52s} {1000*parts[k][0]:8.1f} | {1000*parts[k][1]:8.1f}")
        print(f"  {'total':52s} {1000*parts['total'][0]:8.1f} | {1000*parts['total'][1]:8.1f}")
    print(f"\nlearn.predict gave {len(d['boxes'])} detections on the first image (untrained model: up to 100)")
    print("\nratio learn.predict / baseline, target <= 1.1 (best: of the per-repeat means; paired: median of the per-image ratios):")
    for k in ('raw forward', 'plain'):
        for j, what in ((0, 'ms/image'), (1, 'main-process CPU ms/image')):
            print(C.ratio_line(f"vs {k:12s} {what}", [r[j] for r in res['icefast']], [r[j] for r in res[k]], 1.1, paired[(k, j)]))
    print("CPU ms: CPU time of the main process (all its threads; loader workers not counted), least of the repeats.")
    print(f"total {time.perf_counter() - t0:.0f}s; {C.load_line()}")


if __name__ == '__main__':
    main()
