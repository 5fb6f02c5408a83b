"""Training-step overhead: seconds per step through icefast's fastai Learner against a plain PyTorch loop.

The same model (one initial state dict loaded into both before every measurement, the same R-CNN sampling settings),
the same batches in the same order, the same optimizer (torch's `AdamW` with fastai Adam's hyper-parameters, fused where torch has the kernel, in both:
`icefast.learner.TorchAdamW`, the Learner's default `opt_func`, in the Learner; `--opt fastai`: fastai's `Adam` in both), the
same learning rate and seed. The ratio icefast/plain is the Learner's overhead; the target is <= 1.03.

    . .venv/bin/activate
    python bench/train_overhead.py                        # Faster R-CNN resnet18-FPN, 128 px, batch 4 (~3 min on 2 busy cores)
    python bench/train_overhead.py --arch mask_rcnn
    python bench/train_overhead.py --arch efficientdet    # mobilenetv3_small_100 EfficientDet
    python bench/train_overhead.py --plain-opt torch-default  # against torch.optim.AdamW(model.parameters(), lr) as written by hand
    python bench/train_overhead.py --opt fastai --plain-opt torch  # fastai's Adam (the default before) against torch's AdamW
    python bench/train_overhead.py --device cuda --size 384 --bs 8 --steps 20 --workers 4

Two modes, measured side by side in one run, repeats alternating the order:

- `step`: pre-collated batches already on the device, so data loading is excluded from both. The Learner gets the
  batches its DataLoader yields (fastai's padded `(images, boxes, labels[, masks])`), replayed through a stand-in
  loader; the plain loop gets the same batches as torchvision-style `(images, [target dicts])`. So the Learner's
  share includes turning padded batches into target dicts (icefast's `DetectionAdapter.before_batch`), fastai's
  callbacks (Recorder, progress bar, TrainEval) and the loss wrapper.
- `loader`: data loading included, with `--workers` loader processes in both: the Learner iterates icefast's fastai
  DataLoader (`dls.train`); the plain loop iterates a `torch.utils.data.DataLoader` over the same items decoded and
  augmented by the same item pipeline, in the same order, whose `collate_fn` (in the workers) stacks the images and
  makes the target dicts; the main process moves them to the device and divides by 255, as fastai's `after_batch` does.

Per measurement one epoch of `--warmup` + `--steps` batches; the seconds per step are the time from the end of the
last warm-up step to the end of the last step, over `--steps` (a step's interval includes fetching its batch). The
plain loop is the torchvision references' loop: `loss = sum(model(images, targets).values())`, `loss.item()` checked
finite, `opt.zero_grad(); loss.backward(); opt.step()`. On the CPU the model's forward, backward and optimizer step are
timed inside both pipelines; the rest of a step is the loop's or the Learner's own work, and (plain model work + icefast
rest) / (plain model work + plain rest) estimates the ratio far less noisily on a busy machine than whole steps do.
"""
from __future__ import annotations
import learner_common as C  # first: sets KMP_BLOCKTIME / OMP_WAIT_POLICY before torch is imported

import argparse, contextlib, copy, io, math, statistics, tempfile, time
from functools import partial
from pathlib import Path

import torch


PHASES = ('forward', 'backward', 'optimizer')


class Phases(C.Stopwatch):
    "Step-end readings of the wall and CPU clocks and of the time accumulated in forward, backward and the optimizer step."
    def __init__(self, dev):
        super().__init__(dev)
        self.readings = []
        for k in PHASES: self.acc[k] = [0., 0.]

    def step_end(self):
        self.readings.append((C.clock(self.dev), time.process_time(), *(v for k in PHASES for v in self.acc[k])))

    def per_step(self, warmup:int) -> dict:
        "Seconds per step after the warm-up: wall, main-process CPU, each phase and the rest (wall, and CPU as `cpu_<name>`)."
        r, n = self.readings, len(self.readings) - warmup
        names = ('wall', 'cpu', *(f'{p}{k}' for k in PHASES for p in ('', 'cpu_')))
        out = {k: (r[-1][i] - r[warmup - 1][i]) / n for i, k in enumerate(names)}
        nan = float('nan')
        out['rest'] = out['wall'] - sum(out[k] for k in PHASES) if self.on else nan
        out['cpu_rest'] = out['cpu'] - sum(out[f'cpu_{k}'] for k in PHASES) if self.on else nan
        return out


def _callbacks():
    "fastai Callbacks (fastai is imported late): no validation epoch (only training steps are timed), and a step clock."
    from fastai.callback.core import Callback, CancelValidException

    class SkipValid(Callback):
        order = -5  # after the DetectionAdapter has opened its (empty) validation
        def before_validate(self): raise CancelValidException()

    class StepClock(Callback):
        "Readings at the end of every training step (after every other callback), and the loss of the first step."
        order = 1000
        def __init__(self, phases): self.phases, self.first_loss = phases, None
        def after_batch(self):
            if not self.training: return
            if self.iter == 0: self.first_loss = float(self.learn.loss)  # inside the warm-up step
            self.phases.step_end()
    return SkipValid, StepClock


def optimizer_factories(kind:str):
    """(Learner opt_func, plain-loop optimizer maker) of `kind`: 'fastai' (fastai's Adam), 'torch' (`icefast.learner.TorchAdamW`,
    the Learner's default: torch's AdamW, fused where torch has the kernel, with fastai Adam's hyper-parameters; the plain loop
    the same torch optimizer and settings) or 'torch-default' (the plain loop only: `torch.optim.AdamW(model.parameters(), lr)`
    as a PyTorch user writes it, torch's defaults: weight decay 0.01 on every parameter, foreach on CUDA, a loop on the CPU)."""
    from fastai.optimizer import Adam
    from icefast.learner import param_groups_of, TorchAdamW, _fused_ok
    if kind == 'fastai':  # the Learner's earlier default; the plain loop builds it on the same parameter groups
        return Adam, lambda model, lr: Adam(param_groups_of(model), lr=lr)
    if kind == 'torch-default': return None, lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr)
    def plain(model, lr):
        ps = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01,
                                 **(dict(fused=True) if _fused_ok(ps) else dict(foreach=True)))
    return TorchAdamW, plain


def run_plain(model, batches, make_opt, lr, dev, seed, warmup, from_loader:bool):
    "The references' training loop; (per-step seconds, first loss)."
    torch.manual_seed(seed)
    opt = make_opt(model, lr)
    ph = Phases(dev)
    handles = ph.hook_forward(model, training_only=True)
    backward, step = ph.wrap('backward', torch.Tensor.backward), ph.wrap('optimizer', opt.step)
    model.train()
    first = None
    try:
        for i, (images, targets) in enumerate(batches):
            if from_loader: images, targets = C.to_device_batch(images, targets, dev)
            else: targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]  # no-ops: the batches are on the device
            loss = sum(model(images, targets).values())
            value = loss.item()
            if not math.isfinite(value): raise FloatingPointError(f"plain loop: loss {value} at step {i}")
            if i == 0: first = value
            opt.zero_grad(); backward(loss); step()
            ph.step_end()
    finally:
        for h in handles: h.remove()
    return ph.per_step(warmup), first


def run_learner(learn, loader, lr, dev, seed, warmup, bar:bool):
    "One `learn.fit(1, lr)` epoch over `loader` (validation skipped); (per-step seconds, first loss)."
    SkipValid, StepClock = _callbacks()
    ph = Phases(dev)
    clock = StepClock(ph)
    handles = ph.hook_forward(learn.model, training_only=True)
    old = learn.dls.loaders[0]
    learn.dls.loaders[0] = loader
    if ph.on:  # the Learner's own backward and optimizer-step methods, timed on this instance
        learn._backward = ph.wrap('backward', type(learn)._backward.__get__(learn))
        learn._step = ph.wrap('optimizer', type(learn)._step.__get__(learn))
    torch.manual_seed(seed)
    try:
        ctx = contextlib.nullcontext() if bar else learn.no_bar()
        with ctx, contextlib.redirect_stdout(io.StringIO()):  # the progress bar and the epoch line, as a user has them
            learn.fit(1, lr, cbs=[SkipValid(), clock], reset_opt=True)
    finally:
        learn.dls.loaders[0] = old
        for h in handles: h.remove()
        for k in ('_backward', '_step'): learn.__dict__.pop(k, None)
    return ph.per_step(warmup), clock.first_loss


def optimizer_step_ms(model, lr, n=5) -> dict:
    "Milliseconds of one `step()` of fastai's Adam and of torch's AdamW on `model`'s trainable parameters (gradients set)."
    out = {}
    for kind in ('fastai', 'torch', 'torch-default'):
        m = copy.deepcopy(model)
        for p in m.parameters():
            if p.requires_grad: p.grad = torch.full_like(p, 1e-3)
        opt = optimizer_factories(kind)[1](m, lr)
        dev = next(m.parameters()).device
        ts = []
        for i in range(n + 1):
            t = C.clock(dev); opt.step(); ts.append(C.clock(dev) - t)
        out[kind] = 1000*min(ts[1:])
        del m, opt
    return out


DEFAULT_STEPS = {'faster_rcnn': 6, 'mask_rcnn': 5, 'efficientdet': 24}  # about 5-10 s per measurement on 2 cores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    C.add_common_args(p)
    p.add_argument('--steps', type=int, default=None, help=f'timed steps per measurement (default per arch: {DEFAULT_STEPS})')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps first in each measurement (at least 1)')
    p.add_argument('--workers', type=int, default=2, help='loader processes in the loader mode (both pipelines)')
    p.add_argument('--mode', choices=('step', 'loader', 'both'), default='both')
    p.add_argument('--opt', choices=('fastai', 'torch'), default='torch',
                   help="the Learner's optimizer: torch's AdamW through icefast.learner.TorchAdamW (the default opt_func, fused "
                        "where torch has the kernel) or fastai's Adam (the default before)")
    p.add_argument('--plain-opt', choices=('same', 'fastai', 'torch', 'torch-default'), default='same',
                   help="the plain loop's optimizer: the same as the Learner's (default: the ratio is the Learner's overhead), or "
                        "another (--plain-opt torch-default: torch.optim.AdamW(model.parameters(), lr) as a PyTorch user writes it)")
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--no-bar', action='store_true', help='train the Learner without its progress bar')
    args = p.parse_args(argv)
    args.warmup = max(1, args.warmup)
    dev = C.setup(args)
    if args.steps is None: args.steps = DEFAULT_STEPS[args.arch]
    plain_opt = args.opt if args.plain_opt == 'same' else args.plain_opt
    t0 = time.perf_counter()

    from icefast.data import dataloaders, split_batch
    from icefast.learner import detection_learner

    modes = ['step', 'loader'] if args.mode == 'both' else [args.mode]
    n_batches = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix='icefast_bench_') as tmp:
        records, cm = C.make_records(Path(tmp), n_batches*args.bs, args)
        all_train = lambda items: (list(range(len(items))), [])
        dls = dataloaders(records, cm, size=args.size, bs=args.bs, batch_tfms=[], splitter=all_train,
                          num_workers=args.workers, device=dev)
        assert len(dls.train) == n_batches, (len(dls.train), n_batches)

        opt_func = optimizer_factories(args.opt)[0]
        make_opt = optimizer_factories(plain_opt)[1]
        model = C.build_model(args, len(cm))
        learn = detection_learner(dls, model, opt_func=opt_func)  # on CPU: lighter R-CNN sampling (300 proposals, 64 RoIs)
        # the plain loop's model: a second build with the same state dict and the same settings as the Learner's
        base = C.build_model(args, len(cm))
        base.load_state_dict(model.state_dict())
        if hasattr(base, 'set_image_size'): base.set_image_size(args.size)
        if dev.type == 'cpu' and hasattr(base, 'cpu_light'): base.cpu_light()
        assert C.model_settings(base) == C.model_settings(model), (C.model_settings(base), C.model_settings(model))
        model.to(dev); base.to(dev)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}

        pipes = {}
        if 'step' in modes:
            cache = dls.train.new(num_workers=0)
            C.reset_order(cache, args.seed)
            ice_batches = C.collect_batches(cache)  # fastai batches as the Learner receives them, on the device
            plain_batches = [split_batch(b) for b in ice_batches]  # the same batches as a torchvision-style collate gives them
            items = list(dls.train.items)
            pipes[('step', 'plain')] = lambda: run_plain(base, plain_batches, make_opt, args.lr, dev, args.seed, args.warmup, False)
            pipes[('step', 'icefast')] = lambda: run_learner(learn, C.CachedLoader(ice_batches, items, args.bs), args.lr, dev,
                                                             args.seed, args.warmup, not args.no_bar)
        if 'loader' in modes:
            order = C.fastai_order(dls.train, args.seed)
            def plain_loader_run():
                dl = C.plain_loader(dls.train, order, args.workers, drop_last=True)
                return run_plain(base, dl, make_opt, args.lr, dev, args.seed, args.warmup, True)
            def learner_loader_run():
                C.reset_order(dls.train, args.seed)  # the same item order as the plain loader's
                return run_learner(learn, dls.train, args.lr, dev, args.seed, args.warmup, not args.no_bar)
            pipes[('loader', 'plain')] = plain_loader_run
            pipes[('loader', 'icefast')] = learner_loader_run

        ms = C.model_settings(model)
        print(f"{C.describe(args, dev)}; optimizer: Learner {args.opt}, plain loop {plain_opt}; lr {args.lr}"
              + (f"; R-CNN training sampling {ms['post_nms']['training']} proposals, {ms['rois']} RoIs per image" if ms else '')
              + f"; {args.warmup} warm-up + {args.steps} timed steps per measurement", flush=True)
        res = {k: [] for k in pipes}  # per-step seconds (wall, CPU, phases), one dict per repeat
        first = {}
        paired = {(m, k): [] for m in modes for k in ('wall', 'cpu')}
        for rep in range(args.repeats):
            for mode in modes:
                got = {}
                for who in (['plain', 'icefast'] if rep % 2 == 0 else ['icefast', 'plain']):
                    for m in (model, base): m.load_state_dict(init)  # the same start in every measurement
                    st, l0 = pipes[(mode, who)]()
                    res[(mode, who)].append(st); got[who] = st
                    first.setdefault((mode, who), l0)
                    if args.verbose:
                        print(f"   rep {rep} {mode:6s} {who:8s} {st['wall']:7.3f} s/step, {st['cpu']:7.3f} CPU s/step; "
                              + ', '.join(f"{k} {1000*st[k]:.0f}" for k in (*PHASES, 'rest')) + f" ms (first loss {l0:.4f})", flush=True)
                for k in ('wall', 'cpu'): paired[(mode, k)].append(got['icefast'][k]/got['plain'][k])

        if args.profile and 'step' in modes:
            for m in (model, base): m.load_state_dict(init)
            C.profile_call(pipes[('step', 'icefast')], f"one icefast Learner epoch, step mode, {n_batches} steps")

        model.load_state_dict(init)
        opt_ms = optimizer_step_ms(model, args.lr)

    med = lambda mode, who, k: statistics.median(r[k] for r in res[(mode, who)])
    print(f"\nseconds per training step, best and median of {args.repeats} (each: {args.steps} steps after {args.warmup} warm-up); "
          f"{args.arch} {args.backbone} {args.size} px batch {args.bs} on {dev}")
    hdr = (f"{'mode':44s} {'plain best':>10s} {'median':>7s} {'icefast best':>12s} {'median':>7s}"
           f" {'CPU s/step plain':>17s} {'icefast':>8s}")
    print(hdr); print('-'*len(hdr))
    desc = {'step': 'step (pre-collated batches on the device)', 'loader': f'loader (DataLoaders, {args.workers} workers)'}
    for mode in modes:
        pb, pm = C.stats([r['wall'] for r in res[(mode, 'plain')]]); ib, im = C.stats([r['wall'] for r in res[(mode, 'icefast')]])
        pc, icc = min(r['cpu'] for r in res[(mode, 'plain')]), min(r['cpu'] for r in res[(mode, 'icefast')])
        print(f"{desc[mode]:44s} {pb:10.3f} {pm:7.3f} {ib:12.3f} {im:7.3f} {pc:17.3f} {icc:8.3f}")
    if dev.type == 'cpu':
        print(f"\nwhere a step's time goes, ms per step (medians of the repeats), wall clock | main-process CPU time: the model's "
              "forward, backward, the optimizer step, and the rest (the loop or the Learner around them: waiting for the batch, "
              "turning it into targets, callbacks, loss sum, zero_grad)")
        cols = (*PHASES, 'rest')
        print(f"{'mode':8s} {'pipeline':8s} " + ' '.join(f"{k:>9s}" for k in cols) + ' |' + ' '.join(f"{k:>9s}" for k in cols))
        for mode in modes:
            for who in ('plain', 'icefast'):
                print(f"{mode:8s} {who:8s} " + ' '.join(f"{1000*med(mode, who, k):9.1f}" for k in cols) + ' |'
                      + ' '.join(f"{1000*med(mode, who, 'cpu_' + k):9.1f}" for k in cols))
    print(f"\nratio icefast/plain, target <= 1.03 (optimizer: Learner {args.opt}, plain loop {plain_opt}):")
    for mode in modes:
        for k, what in (('wall', 's/step'), ('cpu', 'main-process CPU s/step')):
            print(C.ratio_line(f"{mode:6s} {what}", [r[k] for r in res[(mode, 'icefast')]],
                               [r[k] for r in res[(mode, 'plain')]], 1.03, paired[(mode, k)]))
        if dev.type == 'cpu':  # the same model work on both sides: only the rest differs (less noisy than the whole ratio)
            for pre, what in (('', 'wall'), ('cpu_', 'CPU')):
                core = sum(med(mode, 'plain', pre + k) for k in PHASES)
                est = (core + med(mode, 'icefast', pre + 'rest')) / (core + med(mode, 'plain', pre + 'rest'))
                print(f"{mode:6s} {what + ': (plain model work + icefast rest)/(plain model work + plain rest)':70s} {est:6.3f}"
                      f"   target <= 1.03: {'ok' if est <= 1.03 else 'MISSES the target'}")
    if 'step' in modes:
        a, b = first[('step', 'plain')], first[('step', 'icefast')]
        print(f"same computation check (step mode, first step, same weights/batch/seed): loss plain {a:.5f}, icefast {b:.5f}"
              f"{'' if abs(a - b) <= 1e-3*max(1., abs(a)) else '  DIFFERENT'}")
    print(f"optimizer step() alone on this model: fastai Adam {opt_ms['fastai']:.1f} ms, TorchAdamW's torch AdamW "
          f"{opt_ms['torch']:.1f} ms, torch.optim.AdamW with torch's defaults {opt_ms['torch-default']:.1f} ms")
    print("CPU s/step: CPU time of the main process (all its threads; workers not counted), least of the repeats; less "
          "sensitive to other load than wall time.")
    print(f"total {time.perf_counter() - t0:.0f}s; {C.load_line()}")


if __name__ == '__main__':
    main()
