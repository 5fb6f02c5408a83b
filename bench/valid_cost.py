"""Validation cost: a validation epoch through icefast's Learner against an eval-only forward over the same images.

icefast's `learn.validate()` gives the validation loss (each component), the detections and the COCO metrics
(mAP, mAP50, mAP75, mAR100; mask mAP for Mask R-CNN) from one backbone pass per batch. The baseline is the least a
plain PyTorch validation does: `model.eval(); with torch.no_grad(): model(images)`, detections only, no loss, no
metrics. The ratio icefast/plain is what the loss and the metrics cost on top; the target is <= 1.2.

    . .venv/bin/activate
    python bench/valid_cost.py                        # Faster R-CNN resnet18-FPN, 128 px, batch 4 (~2 min on 2 cores)
    python bench/valid_cost.py --arch mask_rcnn
    python bench/valid_cost.py --arch efficientdet
    python bench/valid_cost.py --device cuda --size 384 --bs 8 --n-valid 64 --workers 4

Two modes, side by side in one run, repeats alternating the order:

- `cached`: pre-collated validation batches on the device (data loading excluded from both): `learn.validate(dl=...)`
  over the batches icefast's validation DataLoader yields, the eval forward over their images.
- `loader`: data loading included, `--workers` loader processes in both: `learn.validate()` over `dls.valid`, and
  the eval forward over a `torch.utils.data.DataLoader` of the same items decoded by the same item pipeline.

Each measurement is one whole validation epoch (for icefast: from the `validate()` call to its return, so the COCO
evaluation at the end of the epoch is included), timed on the wall clock and as main-process CPU time. The models are
untrained (pretrained=False), so they give the most detections they may (100 per image): the worst case for
converting detections and for COCO evaluation. On the CPU the icefast epoch is split into its parts (model forward
with losses, `to_original`, `detections_to_coco`, COCO evaluation, the rest).
"""
from __future__ import annotations
import learner_common as C  # first: sets KMP_BLOCKTIME / OMP_WAIT_POLICY before torch is imported

import argparse, contextlib, io, statistics, tempfile, time
from pathlib import Path

import torch

DEFAULT_N_VALID = {'faster_rcnn': 12, 'mask_rcnn': 8, 'efficientdet': 48}  # about 3-10 s per epoch on 2 idle cores


def run_plain(model, batches, dev, from_loader:bool) -> dict:
    "An eval-only forward over every batch; seconds (wall, CPU, and the forward on the CPU)."
    sw = C.Stopwatch(dev)
    handles = sw.hook_forward(model)
    model.eval()
    t, c = C.clock(dev), time.process_time()
    try:
        with torch.no_grad():
            for b in batches:
                images = C.to_device_batch(b[0], [], dev)[0] if from_loader else b
                model(images)
        wall, cpu = C.clock(dev) - t, time.process_time() - c
    finally:
        for h in handles: h.remove()
    return dict(wall=wall, cpu=cpu, **sw.acc)


def run_learner(learn, dl, dev) -> dict:
    "`learn.validate(dl=dl)`; seconds (wall, CPU, and on the CPU its parts), the number of detections."
    import icefast.learner as L
    sw = C.Stopwatch(dev)
    det = learn.detection
    handles = sw.hook_forward(learn.model)
    originals = {n: getattr(L, n) for n in ('to_original', 'detections_to_coco')}
    if sw.on:
        for n, f in originals.items(): setattr(L, n, sw.wrap(n, f))  # module globals that after_pred calls
        for n in ('after_pred', 'epoch_metrics'): object.__setattr__(det, n, sw.wrap(n, getattr(type(det), n).__get__(det)))
    t, c = C.clock(dev), time.process_time()
    try:
        with contextlib.redirect_stdout(io.StringIO()): res = learn.validate(dl=dl)  # the progress bar, as a user has it
        wall, cpu = C.clock(dev) - t, time.process_time() - c
    finally:
        for h in handles: h.remove()
        for n, f in originals.items(): setattr(L, n, f)
        for n in ('after_pred', 'epoch_metrics'): det.__dict__.pop(n, None)
    return dict(wall=wall, cpu=cpu, n_det=len(det._results), values=list(res), **sw.acc)


PARTS = [('forward', 'model forward (icefast: losses + detections, one pass)'),
         ('to_original', 'to_original (detections to original pixels)'),
         ('detections_to_coco', 'detections_to_coco (COCO result dicts)'),
         ('after_pred_other', 'rest of after_pred'),
         ('epoch_metrics', 'COCO evaluation (pycocotools, once per epoch)'),
         ('rest', 'the rest (Learner/loop, callbacks, targets, data)')]

def parts_of(r:dict) -> dict:
    "(wall, CPU) seconds per part of one measurement; the rest is the total minus the timed parts."
    z = (0., 0.)
    out = {k: tuple(r.get(k, z)) for k in ('forward', 'to_original', 'detections_to_coco', 'epoch_metrics')}
    ap = r.get('after_pred', z)
    out['after_pred_other'] = tuple(ap[i] - out['to_original'][i] - out['detections_to_coco'][i] for i in (0, 1))
    total = (r['wall'], r['cpu'])
    out['rest'] = tuple(total[i] - out['forward'][i] - ap[i] - out['epoch_metrics'][i] for i in (0, 1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    C.add_common_args(p)
    p.add_argument('--n-valid', type=int, default=None, help=f'validation images (default per arch: {DEFAULT_N_VALID})')
    p.add_argument('--workers', type=int, default=2, help='loader processes in the loader mode (both pipelines)')
    p.add_argument('--mode', choices=('cached', 'loader', 'both'), default='both')
    args = p.parse_args(argv)
    dev = C.setup(args)
    n_valid = args.n_valid or DEFAULT_N_VALID[args.arch]
    t0 = time.perf_counter()

    from icefast.data import dataloaders
    from icefast.learner import detection_learner

    modes = ['cached', 'loader'] if args.mode == 'both' else [args.mode]
    with tempfile.TemporaryDirectory(prefix='icefast_bench_') as tmp:
        records, cm = C.make_records(Path(tmp), n_valid + args.bs, args)
        split = lambda items: (list(range(n_valid, len(items))), list(range(n_valid)))  # one training batch, n_valid to validate
        dls = dataloaders(records, cm, size=args.size, bs=args.bs, batch_tfms=[], splitter=split, num_workers=args.workers, device=dev)
        model = C.build_model(args, len(cm))
        learn = detection_learner(dls, model)
        model.to(dev).eval()
        valid_items = list(dls.valid.items)
        ice_batches = C.collect_batches(dls.valid.new(num_workers=0))  # as the validation DataLoader yields them, on the device
        plain_images = [b[0].as_subclass(torch.Tensor) for b in ice_batches]

        pipes = {}
        if 'cached' in modes:
            pipes[('cached', 'plain')] = lambda: run_plain(model, plain_images, dev, False)
            pipes[('cached', 'icefast')] = lambda: run_learner(learn, C.CachedLoader(ice_batches, valid_items, args.bs), dev)
        if 'loader' in modes:
            pipes[('loader', 'plain')] = lambda: run_plain(model, C.plain_loader(dls.valid, list(range(n_valid)), args.workers, False), dev, True)
            pipes[('loader', 'icefast')] = lambda: run_learner(learn, dls.valid, dev)

        print(f"{C.describe(args, dev)}; {n_valid} validation images ({len(ice_batches)} batches); "
              f"{sum(len(r) for r in valid_items)} ground-truth objects", flush=True)
        # warm-up (untimed): one batch each; builds icefast's COCO evaluator of the validation records (once per Learner)
        run_plain(model, plain_images[:1], dev, False)
        run_learner(learn, C.CachedLoader(ice_batches[:1], valid_items, args.bs), dev)

        res = {k: [] for k in pipes}
        paired = {(m, k): [] for m in modes for k in ('wall', 'cpu')}
        for rep in range(args.repeats):
            for mode in modes:
                got = {}
                for who in (['plain', 'icefast'] if rep % 2 == 0 else ['icefast', 'plain']):
                    r = pipes[(mode, who)]()
                    res[(mode, who)].append(r); got[who] = r
                    if args.verbose:
                        extra = f", {r['n_det']/n_valid:.0f} detections/image" if 'n_det' in r else ''
                        print(f"   rep {rep} {mode:6s} {who:8s} {r['wall']:7.2f} s/epoch, {r['cpu']:7.2f} CPU s{extra}", flush=True)
                for k in ('wall', 'cpu'): paired[(mode, k)].append(got['icefast'][k]/got['plain'][k])

        if args.profile:
            C.profile_call(pipes[(modes[0], 'icefast')], f"learn.validate(), {modes[0]} mode")

    print(f"\nseconds per validation epoch of {n_valid} images, best and median of {args.repeats}; "
          f"{args.arch} {args.backbone} {args.size} px batch {args.bs} on {dev}")
    hdr = (f"{'mode':40s} {'eval forward best':>17s} {'median':>7s} {'validate() best':>15s} {'median':>7s}"
           f" {'CPU s plain':>11s} {'icefast':>8s}")
    print(hdr); print('-'*len(hdr))
    desc = {'cached': 'cached (pre-collated batches on device)', 'loader': f'loader (DataLoaders, {args.workers} workers)'}
    for mode in modes:
        pb, pm = C.stats([r['wall'] for r in res[(mode, 'plain')]]); ib, im = C.stats([r['wall'] for r in res[(mode, 'icefast')]])
        pc, icc = min(r['cpu'] for r in res[(mode, 'plain')]), min(r['cpu'] for r in res[(mode, 'icefast')])
        print(f"{desc[mode]:40s} {pb:17.2f} {pm:7.2f} {ib:15.2f} {im:7.2f} {pc:11.2f} {icc:8.2f}")
    if dev.type == 'cpu':
        print("\nwhere the time of an epoch goes, seconds (medians over the repeats), wall | main-process CPU:")
        cols = [(m, w) for m in modes for w in ('plain', 'icefast')]
        print(f"{'part':55s} " + ' '.join(f"{m + ' ' + w:>16s}" for m, w in cols))
        for k, name in PARTS:
            cells = []
            for m, w in cols:
                if w == 'plain' and k not in ('forward', 'rest'): cells.append(f"{'':16s}"); continue
                ps = [parts_of(r)[k] for r in res[(m, w)]]
                cells.append(f"{statistics.median(p_[0] for p_ in ps):7.3f} |{statistics.median(p_[1] for p_ in ps):7.3f}")
            print(f"{name:55s} " + ' '.join(cells))
    n_det = res[(modes[0], 'icefast')][-1]['n_det']
    names = ['valid_loss'] + [m.name for m in learn.metrics]
    vals = res[(modes[0], 'icefast')][-1]['values']
    print(f"\nicefast gave {n_det/n_valid:.0f} detections/image (untrained model); validate() -> "
          + ', '.join(f"{n} {float(v):.4g}" for n, v in zip(names, vals) if v is not None))
    print("\nratio icefast validate() / eval-only forward, target <= 1.2:")
    for mode in modes:
        for k, what in (('wall', 's/epoch'), ('cpu', 'main-process CPU s')):
            print(C.ratio_line(f"{mode:6s} {what}", [r[k] for r in res[(mode, 'icefast')]],
                               [r[k] for r in res[(mode, 'plain')]], 1.2, paired[(mode, k)]))
    print("CPU s: CPU time of the main process (all its threads; loader workers not counted), least of the repeats.")
    print(f"total {time.perf_counter() - t0:.0f}s; {C.load_line()}")


if __name__ == '__main__':
    main()
