"""COCO box evaluation at scale: pycocotools against faster-coco-eval on the same synthetic detections.

    KMP_BLOCKTIME=0 python bench/coco_eval_speed.py                 # 5,000 images, 100 detections each
    KMP_BLOCKTIME=0 python bench/coco_eval_speed.py --images 500    # quicker

Prints the seconds of each backend (load + evaluate + accumulate + summarize), their ratio, and the largest
difference of the 12 figures (faster-coco-eval is only worth using if it is equal to 1e-9).
"""
import argparse, contextlib, copy, io, time
import numpy as np


def synthetic(n_images:int, n_dets:int, n_classes:int=10, seed:int=0):
    "A COCO ground truth (about 7 objects an image, all sizes, some crowd regions) and `n_dets` jittered/false detections an image."
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        W, H = 640, 480
        images.append({'id': i, 'width': W, 'height': H, 'file_name': f'{i}.jpg'})
        k = int(rng.integers(0, 15))
        wh = np.exp(rng.uniform(np.log(8), np.log(300), (k, 2)))
        xy = rng.uniform(0, 1, (k, 2)) * ([W, H] - wh)
        cls = rng.integers(1, n_classes + 1, k)
        for b, c in zip(np.concatenate([xy, wh], 1), cls):
            anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': int(c), 'bbox': [float(v) for v in b],
                         'area': float(b[2] * b[3]), 'iscrowd': int(rng.random() < 0.02)})
        # detections: each object found with jitter (some with a wrong class), the rest false alarms, scores random
        m = min(k, n_dets)
        jit = np.concatenate([xy, wh], 1)[:m] * rng.normal(1, 0.08, (m, 4))
        fx = rng.uniform(0, W - 50, (n_dets - m, 2)); fw = rng.uniform(10, 200, (n_dets - m, 2))
        boxes = np.concatenate([jit, np.concatenate([fx, fw], 1)])
        labels = np.concatenate([np.where(rng.random(m) < 0.85, cls[:m], rng.integers(1, n_classes + 1, m)),
                                 rng.integers(1, n_classes + 1, n_dets - m)])
        scores = np.concatenate([rng.uniform(0.3, 1, m), rng.uniform(0, 0.7, n_dets - m)])
        dets += [{'image_id': i, 'category_id': int(c), 'bbox': [float(v) for v in np.abs(b)], 'score': float(s)}
                 for b, c, s in zip(boxes, labels, scores)]
    cats = [{'id': c, 'name': f'class{c}'} for c in range(1, n_classes + 1)]
    return {'images': images, 'annotations': anns, 'categories': cats}, dets


def run_pycocotools(gt_dict, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        gt = COCO(); gt.dataset = copy.deepcopy(gt_dict); gt.createIndex()
        E = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), 'bbox'); E.evaluate(); E.accumulate(); E.summarize()
    return time.perf_counter() - t, np.array(E.stats)


def run_faster(gt_dict, dets):
    from faster_coco_eval import COCO, COCOeval_faster
    t = time.perf_counter()
    gt = COCO(copy.deepcopy(gt_dict))
    E = COCOeval_faster(gt, gt.loadRes(copy.deepcopy(dets)), 'bbox', print_function=lambda *a: None)
    E.evaluate(); E.accumulate(); E.summarize()
    return time.perf_counter() - t, np.array(E.stats[:12])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--images', type=int, default=5000)
    ap.add_argument('--dets', type=int, default=100, help='detections per image')
    ap.add_argument('--repeats', type=int, default=1)
    a = ap.parse_args()
    gt, dets = synthetic(a.images, a.dets)
    print(f"{a.images} images, {len(gt['annotations'])} ground-truth boxes, {len(dets)} detections")
    t_py, s_py = min(run_pycocotools(gt, dets) for _ in range(a.repeats))
    print(f"pycocotools      {t_py:8.1f} s   (baseline)")
    try:
        t_f, s_f = min(run_faster(gt, dets) for _ in range(a.repeats))
    except ImportError:
        print("faster-coco-eval is not installed (pip install faster-coco-eval)"); return
    diff = float(np.abs(s_f - s_py).max())
    print(f"faster-coco-eval {t_f:8.1f} s   {t_py / t_f:5.1f}x faster; largest difference of the 12 figures {diff:.2e}"
          f" ({'equal to 1e-9' if diff <= 1e-9 else 'NOT equal to 1e-9'})")
    print('figures', ' '.join(f'{v:.4f}' for v in s_py))


if __name__ == '__main__': main()
