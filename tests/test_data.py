"Blocks, transforms, padding and DataLoaders: boxes and masks must follow the pixels."
import json, pickle, warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastai.data.block import DataBlock
from fastai.data.transforms import RandomSplitter
from fastai.vision.augment import Flip, Zoom, Rotate, Warp, RandomResizedCropGPU, Resize, aug_transforms
from fastai.vision.data import ImageBlock, BBoxBlock, BBoxLblBlock

from icefast.core import ClassMap, Record, PolygonMask
from icefast.parsers import COCOParser
from icefast.data import (dataloaders, detection_datablock, split_batch, targets_from_batch, pad_instances, Letterbox,
                          RecordImageBlock, RecordBBoxBlock, LabelBlock, InstanceMaskBlock, record_boxes, record_labels,
                          record_masks, record_path, record_pixel_boxes, IdSplitter, FileListSplitter, FolderSplitter, TensorInstanceMasks,
                          detection_aug_transforms)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
CLASSES = ['red', 'green', 'blue']

def _ellipse(cx, cy, rx, ry, n=24):
    t = np.linspace(0, 2*np.pi, n, endpoint=False)
    return np.stack([cx + rx*np.cos(t), cy + ry*np.sin(t)], 1)

def make_coco(root, sizes=((200, 120), (90, 160), (150, 150), (240, 100)), exif_rotated=True, seed=0):
    "Images with up to 3 coloured ellipses (class = colour) on black, and their COCO file."
    rng = np.random.default_rng(seed)
    root = Path(root); (root/'images').mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (w, h) in enumerate(sizes):
        img = Image.new('RGB', (w, h)); d = ImageDraw.Draw(img)
        for k in range(1 + i % 3):
            # one instance per horizontal third, so they never overlap
            x0, x1 = k*w/3, (k+1)*w/3
            rx, ry = rng.uniform(0.2, 0.4)*w/3, rng.uniform(0.15, 0.35)*h
            cx, cy = rng.uniform(x0+rx+2, x1-rx-2), rng.uniform(ry+2, h-ry-2)
            pts = _ellipse(cx, cy, rx, ry)
            d.polygon([tuple(p) for p in pts], fill=COLORS[k])
            x, y = pts.min(0); X, Y = pts.max(0)
            anns.append(dict(id=len(anns)+1, image_id=i+1, category_id=k+1, bbox=[x, y, X-x, Y-y], area=float(np.pi*rx*ry),
                             iscrowd=0, segmentation=[pts.ravel().tolist()]))
        fn = f'{i}.png'
        if exif_rotated and i == 0:
            fn = f'{i}.jpg'  # stored rotated, displayed upright through EXIF orientation 6
            exif = Image.Exif(); exif[0x0112] = 6
            img.transpose(Image.ROTATE_90).save(root/'images'/fn, exif=exif, quality=95)
        else: img.save(root/'images'/fn)
        images.append(dict(id=i+1, file_name=fn, width=w, height=h))
    cats = [dict(id=k+1, name=n) for k, n in enumerate(CLASSES)]
    (root/'coco.json').write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return root/'coco.json', root/'images'

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    ann, imgs = make_coco(tmp_path_factory.mktemp('shapes'))
    parser = COCOParser(ann, imgs, masks=True)
    return parser.parse(), parser.class_map

def _dls(records, class_map, size=128, bs=4, **kwargs):
    kwargs.setdefault('batch_tfms', []); kwargs.setdefault('item_tfms', [])
    return dataloaders(records, class_map, size=size, bs=bs, splitter=IdSplitter([]), **kwargs)

def _all_batch(dls):
    "The whole (train) set as one batch, in order."
    dl = dls.train.new(shuffle=False, drop_last=False, bs=len(dls.train_ds))
    return dl.one_batch()

def _painted(img, k):
    "Pixels of instance colour `k` in a (3, H, W) float image."
    on = img[k] > 0.5
    off = torch.stack([img[j] < 0.5 for j in range(3) if j != k]).all(0)
    return on & off

def _tight_box(m):
    ys, xs = torch.nonzero(m, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max()+1, ys.max()+1], dtype=torch.float32)

def check_consistent(b, box_tol=3.0, min_iou=0.75):
    "Every target box is the tight box of its painted pixels, every mask covers them, and classes are colours."
    images, targets = split_batch(b)
    n = 0
    for img, t in zip(images, targets):
        for box, lbl, *m in zip(t['boxes'], t['labels'], *([t['masks']] if 'masks' in t else [])):
            painted = _painted(img, int(lbl) - 1)
            if (box[2]-box[0]) * (box[3]-box[1]) < 50: continue  # a sliver left by a crop: too few pixels to compare
            assert painted.sum() > 10, "the class of a box does not match the colour under it"
            # only the pixels of this instance's colour inside its box belong to it
            x0, y0, x1, y1 = box.tolist()
            inside = torch.zeros_like(painted); inside[int(max(y0-box_tol, 0)):int(y1+box_tol)+1, int(max(x0-box_tol, 0)):int(x1+box_tol)+1] = True
            tight = _tight_box(painted & inside)
            h, w = img.shape[-2:]
            if box[0] < box_tol or box[1] < box_tol or box[2] > w - box_tol or box[3] > h - box_tol:
                # cut by the image border: the box of the visible part can only be tighter
                assert (tight[:2] >= box[:2] - box_tol).all() and (tight[2:] <= box[2:] + box_tol).all()
            else: assert torch.allclose(tight, box, atol=box_tol), f"box {box.tolist()} vs painted pixels {tight.tolist()}"
            if m and (painted & inside).sum() >= 100:  # slivers cut by the border resample too coarsely to compare
                mask = m[0].bool()
                iou = (mask & painted & inside).sum() / (mask | (painted & inside)).sum()
                assert iou > min_iou, f"mask IoU {iou:.2f}"
            n += 1
    return n

def test_letterbox_keeps_boxes_and_masks_on_the_pixels(shapes):
    records, cm = shapes
    dls = _dls(records, cm)
    b = _all_batch(dls)
    test_n = check_consistent(b)
    assert test_n == sum(len(r) for r in records)
    images = b[0]
    assert images.shape[-2:] == (128, 128) and images.dtype == torch.float32
    # the EXIF-rotated JPEG (record 0) is upright: its instance sits where the annotation says
    assert (records[0].width, records[0].height) == (200, 120)

def test_item_flip_moves_boxes_and_masks(shapes):
    from fastai.vision.augment import FlipItem
    records, cm = shapes
    dls = _dls(records, cm, item_tfms=[FlipItem(p=1.)])
    b = _all_batch(dls)
    assert check_consistent(b) == sum(len(r) for r in records)  # fastai's flip_lr swaps box corners: none may be lost
    # the letterbox padding is now on the left: the instance pixels moved
    assert torch.equal(split_batch(b)[1][1]['masks'], split_batch(_all_batch(_dls(records, cm, item_tfms=[])))[1][1]['masks'].flip(-1))

@pytest.mark.parametrize('tfms', [
    [Flip(p=1.)],
    [Zoom(min_zoom=1.3, max_zoom=1.3, p=1., pad_mode='zeros')],
    [Rotate(max_deg=20, p=1., pad_mode='zeros')],
    [Warp(magnitude=0.3, p=1., pad_mode='zeros')],
    detection_aug_transforms(max_lighting=0),
    detection_aug_transforms(min_zoom=0.7, max_zoom=1.3, max_lighting=0),
    aug_transforms(min_scale=0.6, max_lighting=0, max_warp=0, max_rotate=0, size=96),
], ids=['flip', 'zoom', 'rotate', 'warp', 'detection_aug', 'scale_jitter', 'random_resized_crop'])
def test_batch_transforms_move_boxes_and_masks_with_pixels(shapes, tfms):
    records, cm = shapes
    from fastai.torch_core import set_seed
    set_seed(0)
    dls = _dls(records, cm, batch_tfms=tfms)
    for _ in range(3):
        b = _all_batch(dls)
        rotated = any(isinstance(t, (Rotate, Warp)) for t in tfms)
        # a rotated or warped ellipse's box is the moved box's envelope: looser, so only containment is checked
        if rotated:
            images, targets = split_batch(b)
            for img, t in zip(images, targets):
                for box, lbl, m in zip(t['boxes'], t['labels'], t['masks']):
                    painted = _painted(img, int(lbl)-1) & _box_region(box, img.shape[-2:], 2)
                    tight = _tight_box(painted)
                    assert (tight[:2] >= box[:2] - 2).all() and (tight[2:] <= box[2:] + 2).all()
                    if painted.sum() >= 100:  # the mask moved with the pixels
                        assert (m.bool() & painted).sum() / (m.bool() | painted).sum() > 0.75
        else: check_consistent(b)
        h, w = b[0].shape[-2:]
        for t in split_batch(b)[1]:
            bx = t['boxes']
            assert (bx >= 0).all() and (bx[:, [0, 2]] <= w).all() and (bx[:, [1, 3]] <= h).all()

def _box_region(box, hw, tol):
    m = torch.zeros(hw, dtype=torch.bool)
    x0, y0, x1, y1 = box.tolist()
    m[int(max(y0-tol, 0)):int(y1+tol)+1, int(max(x0-tol, 0)):int(x1+tol)+1] = True
    return m

def test_padding_never_reaches_the_targets(shapes):
    records, cm = shapes
    dls = _dls(records, cm)
    dl = dls.train.new(shuffle=False, drop_last=False, bs=len(records))
    b = dl.one_batch()
    assert (b[2] == 0).any(), "the batch should contain padding rows"
    padded = targets_from_batch(b[1], b[2], b[3], b[0].shape[-2:])
    for i, t in enumerate(padded):
        single = dl.after_batch(dl.do_batch([dl.do_item(i)]))
        alone = targets_from_batch(single[1], single[2], single[3], single[0].shape[-2:])[0]
        assert (alone['labels'] > 0).all() and (t['labels'] > 0).all()
        assert torch.equal(t['labels'], alone['labels'])
        assert torch.allclose(t['boxes'], alone['boxes'])
        assert torch.equal(t['masks'], alone['masks'])
        assert len(t['boxes']) == len(records[i])

def test_out_of_image_boxes_are_clipped_and_empty_ones_dropped():
    boxes = torch.tensor([[[-1.5, -0.5, 0.5, 0.5], [1.2, 0., 1.6, 0.5], [0, 0, 0, 0]]])
    labels = torch.tensor([[1, 2, 0]])
    t = targets_from_batch(boxes, labels, None, (100, 200))[0]
    assert t['labels'].tolist() == [1]
    assert torch.allclose(t['boxes'], torch.tensor([[0., 25., 150., 75.]]))
    # every box cropped away: an empty target, not a crash
    t = targets_from_batch(boxes[:, 1:2], labels[:, 1:2], None, (100, 200))[0]
    assert t['boxes'].shape == (0, 4) and t['labels'].shape == (0,)

def test_augmentation_that_removes_every_box_gives_empty_targets(shapes):
    records, cm = shapes
    # shift the picture out of the frame: every box leaves the image
    from fastai.vision.augment import AffineCoordTfm
    def away(x):
        m = torch.eye(3, device=x.device)[None].repeat(x.size(0), 1, 1)
        m[:, 0, 2] = 3.
        return m
    dls = _dls(records, cm, batch_tfms=[AffineCoordTfm(aff_fs=away, pad_mode='zeros', p=1.)])
    images, targets = split_batch(_all_batch(dls))
    assert all(len(t['boxes']) == 0 and t['masks'].shape[0] == 0 for t in targets)

@pytest.mark.parametrize('with_background', [False, True])
def test_class_ids_in_a_batch_match_the_class_map(shapes, with_background):
    records, cm = shapes
    cm2 = ClassMap((['background'] if with_background else []) + CLASSES)
    assert cm2 == cm
    dls = _dls(records, cm2)
    b = _all_batch(dls)
    for t, r in zip(split_batch(b)[1], records):
        assert t['labels'].tolist() == r.labels.tolist()
        assert [cm2.get_name(i) for i in t['labels'].tolist()] == [CLASSES[i-1] for i in r.labels]

def test_fastai_users_datablock_with_icefast_blocks(shapes):
    records, cm = shapes
    dblock = DataBlock(blocks=(RecordImageBlock(), RecordBBoxBlock(), LabelBlock(cm), InstanceMaskBlock()),
                       getters=[None, record_boxes, record_labels, record_masks],
                       splitter=RandomSplitter(0.25, seed=0), item_tfms=Letterbox(128), n_inp=1)
    dls = dblock.dataloaders(records, bs=2)
    b = dls.train.new(shuffle=False, drop_last=False, bs=3).one_batch()
    assert isinstance(b[3], TensorInstanceMasks)
    check_consistent(b)

def test_fastai_stock_blocks_with_record_getters(shapes):
    records, cm = shapes
    # fastai's own ImageBlock/BBoxBlock/Resize work on the upright images; BBoxLblBlock must not add '#na#'
    upright = records[1:]
    names = lambda r: [cm.get_name(i) for i in r.labels]
    dblock = DataBlock(blocks=(ImageBlock, BBoxBlock, BBoxLblBlock(vocab=cm.vocab, add_na=False)),
                       getters=[record_path, record_pixel_boxes, names],
                       splitter=IdSplitter([]), item_tfms=Resize(128, method='pad', pad_mode='zeros'), n_inp=1)
    dls = dblock.dataloaders(upright, bs=len(upright))
    b = dls.train.new(shuffle=False, drop_last=False).one_batch()
    check_consistent(b)

def test_fastai_resize_with_masks_is_refused_clearly(shapes):
    records, cm = shapes
    dblock = DataBlock(blocks=(RecordImageBlock(), RecordBBoxBlock(), LabelBlock(cm), InstanceMaskBlock()),
                       getters=[None, record_boxes, record_labels, record_masks],
                       splitter=IdSplitter([]), item_tfms=Resize(128, method='pad'), n_inp=1)
    with pytest.raises(Exception, match="Letterbox"):
        dblock.dataloaders(records[1:], bs=2).one_batch()

def test_show_batch_renders_boxes_and_masks(shapes, tmp_path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    records, cm = shapes
    for masks in (False, True):
        dls = _dls(records, cm, masks=masks, bs=4)
        dls.train.new(shuffle=False).show_batch(max_n=4)
        n_texts = 0
        for ax in plt.gcf().axes:  # every class name is written at the corner of a drawn box
            corners = [(p.get_x(), p.get_y()) for p in ax.patches]
            for t in ax.texts:
                assert t.get_text() in CLASSES
                assert any(np.allclose(t.get_position(), c, atol=0.5) for c in corners), t.get_position()
                n_texts += 1
        assert n_texts >= 4
        out = tmp_path/f'show_batch_{"masks" if masks else "boxes"}.png'
        plt.savefig(out); plt.close('all')
        assert out.stat().st_size > 5000

def test_splitters(shapes, tmp_path):
    records, cm = shapes
    train, valid = IdSplitter([2, '3.png'])(records)
    assert sorted(valid) == [1, 3] and len(train) == 2  # image id 2 is 1.png
    (tmp_path/'val.txt').write_text('1\n4\n')
    assert sorted(FileListSplitter(tmp_path/'val.txt')(records)[1]) == [0, 3]
    assert FolderSplitter('images')(records)[1] == [0, 1, 2, 3]
    dls = dataloaders(records, cm, size=64, bs=2, splitter=IdSplitter([1]), batch_tfms=[])
    assert len(dls.valid_ds) == 1 and dls.valid_ds.items[0].image_id == 1

def test_dataloaders_pickle_for_export(shapes):
    records, cm = shapes
    dls = _dls(records, cm)
    empty = pickle.loads(pickle.dumps(dls.new_empty()))
    assert len(empty.train_ds) == 0

def test_test_dl_takes_image_paths(shapes, tmp_path):
    "Plain paths become records without annotations; their images come out as the records' do (letterboxed, not flipped)."
    records, cm = shapes
    dls = _dls(records, cm)
    from_paths, from_records = dls.test_dl([r.filepath for r in records[:2]]), dls.test_dl(records[:2])
    assert [r.image_id for r in from_paths.items] == [r.filepath.stem for r in records[:2]] and len(from_paths.items[0]) == 0
    assert torch.equal(from_paths.one_batch()[0], from_records.one_batch()[0])
    assert type(pickle.loads(pickle.dumps(dls.new_empty()))).__name__ == 'DetectionDataLoaders'  # what load_learner gets
    bad = tmp_path/'bad.png'; bad.write_bytes(b'not an image')
    with pytest.raises(OSError, match='bad.png: cannot read image'): dls.test_dl([bad])

def test_masks_requested_without_masks_is_a_clear_error(shapes):
    records, cm = shapes
    plain = [Record(r.filepath, r.image_id, r.width, r.height, r.labels, r.boxes) for r in records]
    with pytest.raises(ValueError, match='masks=True'):
        dataloaders(plain, cm, masks=True)
    dls = dataloaders(plain, cm, size=64, bs=2, batch_tfms=[], splitter=IdSplitter([]))
    assert len(dls.one_batch()) == 3

def test_unreadable_image_at_load_time_names_the_file(shapes, tmp_path):
    records, cm = shapes
    bad = tmp_path/'bad.png'; bad.write_bytes(b'not an image')
    recs = [Record(bad, 'bad', 50, 40, [1], [[1, 1, 10, 10]])]
    with pytest.raises(OSError, match='bad.png: cannot read image'):
        dataloaders(recs, cm, size=64, bs=1, batch_tfms=[], splitter=IdSplitter([])).one_batch()

def test_overlapping_instances_keep_their_own_masks(tmp_path):
    Image.new('RGB', (64, 48)).save(tmp_path/'a.png')
    a = [10, 10, 40, 10, 40, 40, 10, 40]; b = [25, 5, 55, 5, 55, 30, 25, 30]
    r = Record(tmp_path/'a.png', 'a', 64, 48, labels=[1, 2], boxes=[[10, 10, 40, 40], [25, 5, 55, 30]],
               masks=[PolygonMask([a]), PolygonMask([b])])
    cm = ClassMap(['a', 'b'])
    dls = dataloaders([r, r], cm, size=64, bs=2, item_tfms=[], batch_tfms=[], splitter=IdSplitter([]))
    m = split_batch(dls.train.new(shuffle=False).one_batch())[1][0]['masks']
    full = r.mask_array()
    assert m.shape == (2, 64, 64)
    assert (m[0] & m[1]).sum() > 100  # the overlap belongs to both
    assert torch.equal(m[:, :48, :64], torch.from_numpy(full))

def test_records_splitter_for_separate_train_and_valid_files(tmp_path):
    from icefast.parsers import CSVParser
    from icefast.data import RecordsSplitter
    for n in ('a', 'b', 'c'): Image.new('RGB', (40, 30)).save(tmp_path/f'{n}.png')
    (tmp_path/'train.csv').write_text("filename,label,xmin,ymin,xmax,ymax\na.png,cat,1,1,20,20\nb.png,dog,2,2,30,25\n")
    (tmp_path/'test.csv').write_text("filename,label,xmin,ymin,xmax,ymax\nc.png,dog,5,5,25,25\nc.png,cow,1,1,9,9\n")
    tp = CSVParser(tmp_path/'train.csv', tmp_path); train = tp.parse()
    with pytest.warns(UserWarning, match='unknown_class'):
        vp = CSVParser(tmp_path/'test.csv', tmp_path, class_map=tp.class_map); valid = vp.parse()
    dls = dataloaders(train + valid, tp.class_map, size=32, bs=1, splitter=RecordsSplitter(valid), batch_tfms=[])
    assert [r.image_id for r in dls.valid_ds.items] == ['c'] and len(dls.train_ds) == 2
    assert dls.valid.one_batch()[2].tolist() == [[tp.class_map.get_id('dog')]]


def test_detection_lighting_is_fastais_lighting_in_one_cheap_pass():
    "Brightness and contrast in logit space, per image, on training batches only; several times cheaper than fastai's on CPU."
    import time
    from fastai.torch_core import TensorImage
    from fastai.vision.augment import Brightness, Contrast
    from icefast.data import DetectionLighting
    x = TensorImage(torch.rand(8, 3, 192, 192))
    t = DetectionLighting(0.2, p=1.)
    y = t(x.clone(), split_idx=0)
    lx = torch.logit(x.as_subclass(torch.Tensor), eps=1e-7)
    assert isinstance(y, TensorImage)
    assert torch.allclose(y.as_subclass(torch.Tensor), torch.sigmoid((lx + t.shift) * t.mult), atol=1e-5)
    assert (t.shift.abs() > 0).all() and (t.shift.abs() <= torch.logit(torch.tensor(0.6)) + 1e-6).all()
    assert ((t.mult >= 0.8 - 1e-6) & (t.mult <= 1.25 + 1e-6)).all()
    assert torch.equal(t(x, split_idx=1), x)  # validation untouched
    assert [type(o).__name__ for o in detection_aug_transforms()] == ['DetectionLighting']
    assert detection_aug_transforms(max_lighting=0) == []
    fastai_tfms = [Brightness(0.2, p=1.), Contrast(0.2, p=1.)]
    def best(f, n=5):
        times = []
        for _ in range(n):
            s = time.perf_counter(); f(); times.append(time.perf_counter() - s)
        return min(times)
    def fastai_lighting():
        z = x.clone()
        for tf in fastai_tfms: z = tf(z, split_idx=0)
    ours, theirs = best(lambda: t(x.clone(), split_idx=0)), best(fastai_lighting)
    assert ours < 0.7 * theirs, (ours, theirs)


def test_cpu_dataloaders_load_in_the_training_process(shapes):
    "On the CPU fastai's per-epoch worker processes cost more than they save: 0 workers unless asked."
    records, cm = shapes
    dls = dataloaders(records, cm, size=64, bs=2, device='cpu')
    assert [dl.fake_l.num_workers for dl in dls.loaders] == [0, 0]
    dls = dataloaders(records, cm, size=64, bs=2, device='cpu', num_workers=1)
    assert [dl.fake_l.num_workers for dl in dls.loaders] == [1, 1]

def test_scale_jitter_zooms_training_images_inside_the_letterbox(shapes):
    "`detection_aug_transforms(min_zoom=0.7, max_zoom=1.3)` zooms training images by 0.7-1.3 (zeros around when zoomed out); not a default."
    from fastai.torch_core import TensorImage, set_seed
    set_seed(0)
    zoom, = detection_aug_transforms(min_zoom=0.7, max_zoom=1.3, max_lighting=0)
    assert isinstance(zoom, Zoom) and zoom.pad_mode == 'zeros'
    x = TensorImage(torch.ones(64, 3, 48, 48))
    kept = zoom(x, split_idx=0).as_subclass(torch.Tensor).mean((1, 2, 3))  # the fraction of the image left after zooming out
    assert 0.2 < (kept < 0.99).float().mean() < 0.6, kept  # about 0.75 (probability) x 1/2 (zoom below 1)
    assert kept.min() > 0.7**2 - 0.02 and (kept > 0.999).float().mean() > 0.3, kept  # never below 0.7; zoomed in or untouched: full
    assert (zoom(x, split_idx=1) - x).abs().max() < 1e-4  # validation: fastai resamples with the identity
    records, cm = shapes
    names = lambda dls: [type(t).__name__ for t in dls.train.after_batch.fs if type(t).__name__ in ('Zoom', 'DetectionLighting')]
    assert names(dataloaders(records, cm, size=64, bs=4)) == ['DetectionLighting']  # measured: not a default (09_learner)
    assert names(dataloaders(records, cm, size=64, bs=4, batch_tfms=detection_aug_transforms(min_zoom=0.7, max_zoom=1.3))) == ['Zoom', 'DetectionLighting']
