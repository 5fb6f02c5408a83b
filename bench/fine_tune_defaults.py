"""Choose `fine_tune`'s defaults by measurement: icefast's `learn.fine_tune(n)` (and variants) against a hand-written
SGD + linear warmup + cosine loop (the torchvision detection references' recipe), same model init, same data, same
number of steps. With no pretrained weights on disk, everything trains from scratch on the synthetic shapes set.

    KMP_BLOCKTIME=0 python bench/fine_tune_defaults.py --arch faster_rcnn --epochs 12
    KMP_BLOCKTIME=0 python bench/fine_tune_defaults.py --only default --opt fastai torch   # the optimizers, same recipe
"""
import argparse, math, os, sys, tempfile, time, warnings
os.environ.setdefault('KMP_BLOCKTIME', '0')
import torch
from fastai.torch_core import set_seed

from icefast.synthetic import make_shapes
from icefast.parsers import COCOParser
from icefast.data import dataloaders, detection_aug_transforms
from fastai.optimizer import Adam
from icefast.learner import detection_learner, TorchAdamW
from icefast.models import create_model, list_models, model_spec

CONFIGS = {  # name: fine_tune keyword arguments
    'fastai stock (freeze 1, lr 2e-3, lr_mult 100)': dict(base_lr=2e-3, freeze_epochs=1, lr_mult=100),
    'icefast default': dict(),
    'no freeze, lr 1e-3': dict(base_lr=1e-3, freeze_epochs=0, lr_mult=1),
    'no freeze, lr 4e-3': dict(base_lr=4e-3, freeze_epochs=0, lr_mult=1),
}

OPTS = {'default': {}, 'fastai': dict(opt_func=Adam), 'torch': dict(opt_func=TorchAdamW)}  # detection_learner kwargs

AUGS = {'none': list, 'lighting': lambda: detection_aug_transforms(min_zoom=1, max_zoom=1), 'default': lambda: None}  # batch_tfms

SMALL = {'efficientdet': 'mobilenetv3_large_100'}  # every other architecture: resnet18 FPN

def build(arch, n_classes, size):
    return create_model(arch, backbone=SMALL.get(arch, 'resnet_fpn.resnet18'), num_classes=n_classes, img_size=size)

def sgd_loop(learn, epochs, lr, momentum=0.9, wd=1e-4, warmup_frac=0.1):
    "torchvision references' recipe: SGD with momentum, linear warmup from lr/1000, then cosine to zero, per step."
    from icefast.data import split_batch
    model, dl = learn.model, learn.dls.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    total = epochs * len(dl); warm = max(1, int(warmup_frac * total))
    def factor(i):
        if i < warm: return 1e-3 + (1 - 1e-3) * i / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    masks = learn.detection.masks
    for _ in range(epochs):
        model.train()
        for b in dl:
            images, targets = split_batch(b)
            if not masks:
                for t in targets: t.pop('masks', None)
            loss = sum(model(images, targets).values())
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--arch', default='faster_rcnn', choices=list_models())
    ap.add_argument('--epochs', type=int, default=12, help='epochs of every run (fine_tune: freeze epochs count in)')
    ap.add_argument('--n-images', type=int, default=96)
    ap.add_argument('--size', type=int, default=128)
    ap.add_argument('--bs', type=int, default=8)
    ap.add_argument('--sgd-lr', type=float, default=None, help='default 0.02 * bs / 16 (the references\' linear rule)')
    ap.add_argument('--only', nargs='*', default=None, help='config names to run (substring match); "sgd" for the loop')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--opt', nargs='+', default=['default'], choices=('default', 'fastai', 'torch'),
                    help="the Learner's opt_func for every fine_tune config: detection_learner's default, fastai's Adam, "
                         "or icefast.learner.TorchAdamW (torch.optim.AdamW through OptimWrapper); several: each in turn")
    ap.add_argument('--workers', type=int, default=None, help="DataLoader workers (default: icefast's, 0 on the CPU)")
    ap.add_argument('--aug', choices=('none', 'lighting', 'default'), default='none',
                    help="batch transforms: none (as this benchmark always ran), lighting only (icefast's default before "
                         "2026-12-06), or icefast's default (scale jitter and lighting)")
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: every core; 1 to run seeds side by side)')
    a = ap.parse_args()
    torch.set_num_threads(a.threads or max(1, os.cpu_count()))
    tmp = tempfile.mkdtemp()
    ann, imgs = make_shapes(tmp, n_images=a.n_images, size=(a.size * 5 // 4, a.size), seed=a.seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        p = COCOParser(ann, imgs, masks=model_spec(a.arch).masks); records = p.parse()
    rows = []
    runs = [('sgd', None)] + list(CONFIGS.items())
    if a.only: runs = [(n, c) for n, c in runs if any(o in n for o in a.only)]
    runs = [(n if c is None or a.opt == ['default'] else f"{n}, {o}", c, o) for n, c in runs
            for o in (a.opt if c is not None else ['default'])]
    for name, cfg, opt in runs:
        set_seed(a.seed, reproducible=True)
        dls = dataloaders(records, p.class_map, size=a.size, bs=a.bs, batch_tfms=AUGS[a.aug](), **({} if a.workers is None else {'num_workers': a.workers}))
        set_seed(a.seed, reproducible=True)
        learn = detection_learner(dls, build(a.arch, len(p.class_map), a.size), **OPTS[opt])
        t, c = time.perf_counter(), time.process_time()
        with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            if cfg is None: sgd_loop(learn, a.epochs, a.sgd_lr or 0.02 * a.bs / 16)
            else:
                ft = dict(cfg); fz = ft.get('freeze_epochs', 0 if cfg == {} else 1)
                learn.fine_tune(a.epochs - fz, **ft)
            secs, cpu = time.perf_counter() - t, time.process_time() - c
            res = dict(zip(['loss'] + [m.name for m in learn.metrics], learn.validate()))
        rows.append((name if cfg is not None else f"SGD+warmup+cosine lr {a.sgd_lr or 0.02 * a.bs / 16:g}", secs, res['mAP'], res['mAP50']))
        print(f"{rows[-1][0]:<48} {secs:7.1f} s ({cpu:.0f} s CPU)  mAP {res['mAP']:.3f}  mAP50 {res['mAP50']:.3f}", flush=True)
    base = rows[0] if runs[0][0] == 'sgd' else None
    print(f"\n{a.arch}, {a.n_images} images at {a.size} px, bs {a.bs}, {a.epochs} epochs, {len(dls.train)} steps/epoch, from scratch, batch transforms: {a.aug}")
    print(f"{'run':<48} {'wall s':>7} {'mAP':>6} {'mAP50':>6}" + ('  mAP50 vs SGD' if base else ''))
    for n, s, m, m50 in rows:
        print(f"{n:<48} {s:7.1f} {m:6.3f} {m50:6.3f}" + (f"  {m50 - base[3]:+.3f}" if base else ''))
    print(f"load average: {os.getloadavg()}")

if __name__ == '__main__': main()
