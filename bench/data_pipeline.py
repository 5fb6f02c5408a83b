"""Data-pipeline throughput: icefast's fastai pipeline against a plain PyTorch `Dataset` + `DataLoader`.

Measures images/s for decode + augment + collate (+ float/255) at `--size` px, batch `--bs`, for each worker
count in `--workers`, side by side in the same run, and prints the ratio icefast/baseline (the target is >= 0.8).

    . .venv/bin/activate
    python bench/data_pipeline.py              # synthetic 1024x768 JPEGs + the real COCO samples (~640x480)
    python bench/data_pipeline.py --masks      # same with instance masks (COCO polygons)
    python bench/data_pipeline.py --profile    # also cProfile the icefast num_workers=0 loop

Both pipelines see the same image list (the parsed set cycled to `(batches + max(workers))*bs` items), shuffled,
with `drop_last`, one epoch per measurement: max(1, num_workers) warm-up batches (worker start-up and each
worker's first batch, made in parallel, are not timed), then `--batches` timed batches. Each measurement is
repeated `--repeats` times, alternating the two pipelines; the best is kept.

The baseline is what a competent person writes by hand: PIL decode + `.convert('RGB')`, EXIF transpose, one
bilinear resize keeping the aspect to fit `size`, zero padding to `size`x`size` (letterbox), boxes scaled, a
random horizontal flip of image and boxes (PIL transpose), uint8 tensor; `collate_fn` stacks the images and pads
boxes/labels (and masks) to the batch max; `float()/255` happens in the main process, where fastai runs its
`after_batch`. With `--masks` it rasterizes the polygons with pycocotools at the target scale.

icefast: `icefast.data.dataloaders(records, class_map, size, bs, num_workers, item_tfms=..., batch_tfms=[])` on
records parsed by `COCOParser`, iterating `dls.train` on the CPU (so fastai's `after_batch` runs on the CPU in the
main process). With `--aug flip` (default) icefast uses its default augmentation's flip, fastai's item-level
`FlipItem(0.5)`, the same augmentation as the baseline's random flip; `--aug none` removes the flip from both.
"""
from __future__ import annotations
import os
# Idle OpenMP threads sleep instead of spinning (Intel OpenMP / GNU libgomp, which PyTorch's Linux wheels use):
# a spinning main process steals a core from the loader workers on a small machine, and its CPU time would count
# spinning. Must be set before torch is imported; both pipelines run under the same settings.
os.environ.setdefault('KMP_BLOCKTIME', '0')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse, cProfile, io, json, math, pstats, random, shutil, sys, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore', message='.*torch.jit.script.*', category=FutureWarning)  # printed when fastai imports
import numpy as np
from PIL import Image, ImageDraw, ImageOps
import torch
from torch.utils.data import Dataset, DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLES = REPO/'tests'/'data'/'samples'


def n_cpus() -> int:
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------------------
def _smooth_noise(rng, w, h):
    "A photo-like background: coarse colour noise upsampled bicubically, plus fine grain."
    coarse = (rng.random((h//48 + 2, w//48 + 2, 3))*255).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = img + rng.normal(0, 7, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

def _ellipse_polygon(cx, cy, rx, ry, n=32):
    t = np.linspace(0, 2*math.pi, n, endpoint=False)
    return np.stack([cx + rx*np.cos(t), cy + ry*np.sin(t)], 1).ravel()

def make_synthetic_coco(root:Path, n:int, image_size, seed:int=0, rotated_every:int=8, n_classes:int=5) -> tuple:
    "`n` seeded photo-like JPEGs (quality 90) with filled rectangles/ellipses and a COCO JSON (boxes + polygons)."
    rng = np.random.default_rng(seed)
    img_dir = root/'images'; img_dir.mkdir(parents=True, exist_ok=True)
    W, H = image_size
    cats = [{'id': i + 1, 'name': f'class{i + 1}'} for i in range(n_classes)]
    images, anns = [], []
    for k in range(n):
        rotated = rotated_every > 0 and k % rotated_every == rotated_every - 1  # a phone photo: EXIF orientation 6
        w, h = (H, W) if rotated else (W, H)  # displayed size
        img = _smooth_noise(rng, w, h)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 11))):
            bw, bh = rng.uniform(0.05, 0.45)*w, rng.uniform(0.05, 0.45)*h
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=color)
                poly = np.array([x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh])
            else:
                draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=color)
                poly = _ellipse_polygon(x0 + bw/2, y0 + bh/2, bw/2, bh/2)
            anns.append({'id': len(anns) + 1, 'image_id': k + 1, 'category_id': int(rng.integers(1, n_classes + 1)),
                         'bbox': [round(float(x0), 2), round(float(y0), 2), round(float(bw), 2), round(float(bh), 2)],
                         'area': float(bw*bh), 'iscrowd': 0, 'segmentation': [np.round(poly, 2).tolist()]})
        fn = f'{k:05d}.jpg'
        if rotated:
            exif = Image.Exif(); exif[0x0112] = 6  # displayed = stored rotated by 270 (PIL's exif_transpose)
            img.transpose(Image.Transpose.ROTATE_90).save(img_dir/fn, quality=90, exif=exif.tobytes())
        else: img.save(img_dir/fn, quality=90)
        images.append({'id': k + 1, 'file_name': fn, 'width': w, 'height': h})
    ann_file = root/'annotations.json'
    ann_file.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': cats}))
    return ann_file, img_dir

def make_samples_coco(root:Path, n:int) -> tuple:
    "The real COCO sample images of the tests, copied under new names (and their annotations) to reach `n` images."
    d = json.loads((SAMPLES/'annotations.json').read_text())
    img_dir = root/'images'; img_dir.mkdir(parents=True, exist_ok=True)
    by_img = {}
    for a in d['annotations']: by_img.setdefault(a['image_id'], []).append(a)
    images, anns = [], []
    for k in range(n):
        im = d['images'][k % len(d['images'])]
        fn = f'{k:05d}_{im["file_name"]}'
        shutil.copyfile(SAMPLES/'images'/im['file_name'], img_dir/fn)
        images.append({**im, 'id': k + 1, 'file_name': fn})
        for a in by_img.get(im['id'], []): anns.append({**a, 'id': len(anns) + 1, 'image_id': k + 1})
    ann_file = root/'annotations.json'
    ann_file.write_text(json.dumps({**d, 'images': images, 'annotations': anns}))
    return ann_file, img_dir


# ---------------------------------------------------------------------------------------------------------------
# Baseline: plain torchvision-style Dataset + DataLoader
# ---------------------------------------------------------------------------------------------------------------
def plain_items(ann_file:Path, img_dir:Path) -> list:
    "(path, boxes xyxy, labels, polygons) per image straight from the COCO JSON; crowd regions skipped."
    d = json.loads(Path(ann_file).read_text())
    cat_idx = {c['id']: i + 1 for i, c in enumerate(sorted(d['categories'], key=lambda c: c['id']))}
    by_img = {}
    for a in d['annotations']:
        if a.get('iscrowd', 0): continue
        by_img.setdefault(a['image_id'], []).append(a)
    items = []
    for im in d['images']:
        anns = by_img.get(im['id'], [])
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)], np.float32).reshape(-1, 4)
        labels = np.array([cat_idx[a['category_id']] for a in anns], np.int64)
        polys = [[np.asarray(p, np.float64) for p in a['segmentation']] for a in anns]
        items.append((Path(img_dir)/im['file_name'], boxes, labels, polys))
    return items

class PlainDetectionDataset(Dataset):
    "Decode, EXIF transpose, letterbox to `size`, random horizontal flip, uint8 tensor (+ polygon masks at the target scale)."
    def __init__(self, items, size=384, flip=True, masks=False, draft=False):
        self.items, self.size, self.flip, self.masks, self.draft = items, size, flip, masks, draft
    def __len__(self): return len(self.items)
    def __getitem__(self, i):
        path, boxes, labels, polys = self.items[i]
        S = self.size
        img = Image.open(path)
        if self.draft:  # only with --baseline-draft: JPEG DCT-domain downscaling, as icefast's open_image does
            full = img.size[::-1] if _orientation(img) in (5, 6, 7, 8) else img.size
            img.draft('RGB', (S, S))
        img = img.convert('RGB')
        img = ImageOps.exif_transpose(img)
        w, h = full if self.draft else img.size  # annotations are in pixels of the full displayed image
        s = min(S/w, S/h)
        cw, ch = max(1, round(w*s)), max(1, round(h*s))
        img = img.resize((cw, ch), Image.BILINEAR)
        canvas = Image.new('RGB', (S, S))
        canvas.paste(img, (0, 0))
        sx, sy = cw/w, ch/h
        boxes = torch.from_numpy(boxes*np.array([sx, sy, sx, sy], np.float32))
        flip = self.flip and random.random() < 0.5
        if flip:
            canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = torch.stack([S - boxes[:, 2], boxes[:, 1], S - boxes[:, 0], boxes[:, 3]], 1)
        x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1)
        out = (x, boxes, torch.from_numpy(labels))
        if self.masks:
            from pycocotools import mask as mask_utils
            m = np.zeros((len(polys), S, S), np.uint8)
            for j, ps in enumerate(polys):
                rle = mask_utils.merge(mask_utils.frPyObjects([(p*np.array([sx, sy]*(len(p)//2))).tolist() for p in ps], ch, cw))
                m[j, :ch, :cw] = mask_utils.decode(rle)
            if flip: m = np.ascontiguousarray(m[:, :, ::-1])
            out += (torch.from_numpy(m),)
        return out

def _orientation(img):
    try: return int(img.getexif().get(0x0112, 1) or 1)
    except Exception: return 1

def plain_collate(batch):
    "Stack images; pad boxes (zeros), labels (0) and masks (zeros) to the batch max."
    imgs = torch.stack([b[0] for b in batch])
    n = max(len(b[1]) for b in batch)
    B = len(batch)
    boxes, labels = torch.zeros(B, n, 4), torch.zeros(B, n, dtype=torch.int64)
    masks = torch.zeros(B, n, *batch[0][3].shape[-2:], dtype=torch.uint8) if len(batch[0]) > 3 else None
    for i, b in enumerate(batch):
        k = len(b[1])
        boxes[i, :k], labels[i, :k] = b[1], b[2]
        if masks is not None: masks[i, :k] = b[3]
    return (imgs, boxes, labels) if masks is None else (imgs, boxes, labels, masks)

def _worker_init(_): torch.set_num_threads(1)

def baseline_batches(items, args, num_workers):
    ds = PlainDetectionDataset(items, args.size, flip=args.aug == 'flip', masks=args.masks, draft=args.baseline_draft)
    dl = DataLoader(ds, batch_size=args.bs, shuffle=True, drop_last=True, num_workers=num_workers,
                    collate_fn=plain_collate, worker_init_fn=_worker_init if num_workers else None)
    for b in dl:
        yield (b[0].float().div_(255), *b[1:])  # the after_batch work, in the main process as in fastai


# ---------------------------------------------------------------------------------------------------------------
# icefast
# ---------------------------------------------------------------------------------------------------------------
def icefast_dls(records, class_map, args, num_workers):
    from icefast.data import dataloaders
    from fastai.vision.augment import FlipItem
    item_tfms = [FlipItem(0.5)] if args.aug == 'flip' else []
    all_train = lambda items: (list(range(len(items))), [])
    return dataloaders(records, class_map, size=args.size, bs=args.bs, num_workers=num_workers, item_tfms=item_tfms, batch_tfms=[],
                       splitter=all_train, masks=args.masks, device=torch.device('cpu'))


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------
def time_epoch(make_iter, batches:int, bs:int, warmup:int=1) -> tuple:
    "(images/s, main-process CPU ms/image) over `batches` batches after `warmup` batches (which absorb worker start-up)."
    it = make_iter()
    try:
        for _ in range(warmup): b = next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches): b = next(it)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if hasattr(it, 'close'): it.close()  # shut workers down outside the timed region
    return batches*bs/dt, 1000*dc/(batches*bs)

def cycled(seq, n): return [seq[i % len(seq)] for i in range(n)]

def run_config(name, ann_file, img_dir, args, results):
    from icefast.parsers import COCOParser
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        parser = COCOParser(ann_file, img_dir, masks=args.masks)
        records = parser.parse()
    items = plain_items(ann_file, img_dir)
    assert len(items) == len(records), (len(items), len(records))
    warmup = max(1, max(args.workers))
    n = (args.batches + warmup)*args.bs
    recs, its = cycled(records, n), cycled(items, n)
    sizes = sorted({(r.width, r.height) for r in records})
    n_inst = np.mean([len(r) for r in records])
    print(f"\n== {name}: {len(records)} images ({', '.join(f'{w}x{h}' for w, h in sizes[:3])}{', ...' if len(sizes) > 3 else ''}),"
          f" {n_inst:.1f} instances/image; {n} items/epoch = max(1, workers) warm-up + {args.batches} timed batches of {args.bs} (+ unused rest)", flush=True)
    for w in args.workers:
        torch.set_num_threads(args.threads or max(1, n_cpus() - w))  # main process: leave the cores to the workers
        dls = icefast_dls(recs, parser.class_map, args, w)
        pipes = {'baseline': lambda: baseline_batches(its, args, w), 'icefast': lambda: iter(dls.train)}
        best, cpu = {k: 0. for k in pipes}, {k: math.inf for k in pipes}
        for rep in range(args.repeats):
            order = list(pipes) if rep % 2 == 0 else list(pipes)[::-1]
            for k in order:
                ips, ms = time_epoch(pipes[k], args.batches, args.bs, warmup=max(1, w))
                best[k], cpu[k] = max(best[k], ips), min(cpu[k], ms)
                if args.verbose: print(f"   workers={w} rep {rep} {k:8s} {ips:7.1f} img/s, main process {ms:5.2f} CPU ms/img", flush=True)
        procs = max(1, w)
        row = dict(config=name, workers=w, baseline=best['baseline'], icefast=best['icefast'],
                   ratio=best['icefast']/best['baseline'], base_pp=best['baseline']/procs, ice_pp=best['icefast']/procs,
                   base_cpu=cpu['baseline'], ice_cpu=cpu['icefast'])
        results.append(row)
        print(f"   workers={w}: baseline {row['baseline']:.1f} img/s, icefast {row['icefast']:.1f} img/s, ratio {row['ratio']:.2f}", flush=True)
        if args.profile and w == 0: profile_icefast(dls, args)

def profile_icefast(dls, args):
    "cProfile one icefast num_workers=0 epoch; print the top functions by own time and by cumulative time."
    pr = cProfile.Profile()
    it = iter(dls.train)
    next(it)  # warm-up
    pr.enable()
    for _ in range(args.batches): next(it)
    pr.disable()
    it.close()
    for key, k in (('tottime', 30), ('cumulative', 45)):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).strip_dirs().sort_stats(key).print_stats(k)
        print(f"\n--- cProfile, icefast num_workers=0, {args.batches} batches, sorted by {key} ---")
        print('\n'.join(s.getvalue().splitlines()[4:]))

def print_table(results, args):
    print(f"\nimages/s at {args.size}px, batch {args.bs}, aug={args.aug}, masks={args.masks}, "
          f"best of {args.repeats}, {n_cpus()} CPU(s); target: icefast/baseline >= 0.8")
    hdr = (f"{'config':30s} {'workers':>7s} {'baseline':>9s} {'icefast':>9s} {'ratio':>6s} {'base/proc':>10s} {'ice/proc':>9s}"
           f" {'main CPU ms/img base':>21s} {'ice':>6s} {'cpu ratio':>9s}")
    print(hdr); print('-'*len(hdr))
    for r in results:
        flag = '' if r['ratio'] >= 0.8 else '  < 0.8'
        cpu_ratio = f"{r['base_cpu']/r['ice_cpu']:9.2f}" if r['workers'] == 0 else f"{'':9s}"
        print(f"{r['config']:30s} {r['workers']:7d} {r['baseline']:9.1f} {r['icefast']:9.1f} {r['ratio']:6.2f}"
              f" {r['base_pp']:10.1f} {r['ice_pp']:9.1f} {r['base_cpu']:21.2f} {r['ice_cpu']:6.2f} {cpu_ratio}{flag}")
    print("baseline/icefast: images/s (best of the repeats); ratio = icefast/baseline.\n"
          "per proc: images/s divided by the loading processes (the main process for workers=0, else the workers; the main\n"
          "  process also runs after_batch). main CPU ms/img: CPU time of the main process per image, all its threads (least\n"
          "  of the repeats). With workers=0 that is the whole cost, and cpu ratio = baseline/icefast CPU is less sensitive to\n"
          "  other load on the machine than ratio (it differs from ratio where torch ops run on several threads); with\n"
          "  workers>0 it is the after_batch + batch-receiving work that the workers cannot take over.")
    print(f"torch threads: workers 1, main process {'--threads ' + str(args.threads) if args.threads else 'CPUs - workers (min 1)'}; "
          f"KMP_BLOCKTIME={os.environ.get('KMP_BLOCKTIME')} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--image-size', nargs=2, type=int, default=(1024, 768), metavar=('W', 'H'), help='synthetic image size')
    p.add_argument('--n-images', type=int, default=64, help='distinct images per set')
    p.add_argument('--size', type=int, default=384)
    p.add_argument('--bs', type=int, default=8)
    p.add_argument('--batches', type=int, default=16,
                   help='timed batches per measurement, after max(1, workers) warm-up batches (one per worker: start-up and the '
                        'first batch each worker makes in parallel are not counted)')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    p.add_argument('--repeats', type=int, default=5, help='measurements per pipeline, alternating; best kept')
    p.add_argument('--masks', action='store_true', help='instance masks from COCO polygons in both pipelines')
    p.add_argument('--aug', choices=('flip', 'none'), default='flip', help='random horizontal flip in both, or nothing')
    p.add_argument('--baseline-draft', action='store_true', help="let the baseline use PIL's JPEG draft mode too")
    p.add_argument('--no-samples', action='store_true', help='skip the real COCO sample images configuration')
    p.add_argument('--no-synthetic', action='store_true', help='skip the synthetic configuration')
    p.add_argument('--rotated-every', type=int, default=8, help='every k-th synthetic image has EXIF orientation 6 (0: none)')
    p.add_argument('--threads', type=int, default=0,
                   help='torch threads of the main process (0: the CPU count minus the workers, at least 1); workers use 1')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--profile', action='store_true', help='cProfile the icefast num_workers=0 loop')
    p.add_argument('--verbose', '-v', action='store_true', help='print every measurement')
    args = p.parse_args(argv)

    random.seed(args.seed); torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix='icefast_bench_') as tmp:
        tmp = Path(tmp)
        if not args.no_synthetic:
            W, H = args.image_size
            ann, imgs = make_synthetic_coco(tmp/'synthetic', args.n_images, (W, H), args.seed, args.rotated_every)
            print(f"generated {args.n_images} synthetic {W}x{H} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
            run_config(f"synthetic {W}x{H}" + (' +masks' if args.masks else ''), ann, imgs, args, results)
        if not args.no_samples:
            ann, imgs = make_samples_coco(tmp/'samples', args.n_images)
            run_config('COCO samples ~640x480' + (' +masks' if args.masks else ''), ann, imgs, args, results)
    print_table(results, args)
    print(f"total {time.perf_counter() - t0:.0f}s; load average at the end {' '.join(f'{l:.2f}' for l in os.getloadavg())} "
          f"(other processes on the machine distort the numbers)")

if __name__ == '__main__':
    main()
