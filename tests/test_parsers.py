"""Tests of `icefast.parsers`: the real sample sets, agreement with pycocotools, and every kind of bad input
(each parser, where it applies) with the message or report count it must give."""
import json, math, pickle, re, warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from icefast.core import ClassMap, open_image
from icefast.parsers import COCOParser, CSVParser, ParseError, VIAParser, VOCParser, YOLOParser

FORMATS = ['coco', 'voc', 'via', 'csv', 'yolo']
NAN = float('nan')


# ---------------------------------------------------------------------------------------------------------------
# helpers

def parse_clean(parser):
    "Parse, asserting that nothing had to be fixed and no warning was emitted."
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        records = parser.parse()
    user = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert not user, user
    assert not parser.report, str(parser.report)
    return records


def parse_fixing(parser, **counts):
    "Parse, asserting the report counts exactly `counts` and that one warning carries the report's summary."
    with pytest.warns(UserWarning) as rec:
        records = parser.parse()
    assert parser.report.counts == counts, str(parser.report)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert msgs.count(str(parser.report)) == 1, msgs
    for kind in counts: assert f'[{kind}]' in msgs[0]
    return records


def displayed_size(path):
    "(width, height) of an image file as displayed (EXIF orientation applied), read independently of icefast."
    with Image.open(path) as im: return ImageOps.exif_transpose(im).size


class Img:
    """One image of a synthetic data set: its file name, what kind of file to write (`None`: leave it missing),
    its stored size and its boxes as (label, (x0, y0, x1, y1)) in 0-based pixels of the displayed image."""
    def __init__(self, name, boxes=(), kind='RGB', size=(32, 24), annotated_size=None, orientation=6):
        self.name, self.boxes, self.kind, self.size, self.orientation = name, list(boxes), kind, tuple(size), orientation
        disp = (size[1], size[0]) if kind == 'exif_rotated' and orientation >= 5 else tuple(size)
        self.annotated_size = tuple(annotated_size or disp)


def _num(v): return repr(float(v))  # 'nan' for NaN; text formats read it with float()


def write_dataset(fmt, make_image, imgs, classes=None, **kwargs):
    """Write `imgs` as a data set of format `fmt` (coco, voc, via, csv, yolo) under `make_image.root` (tmp_path),
    images in its `images/`, and return its parser (`kwargs` go to the parser)."""
    root = make_image.root
    img_dir = root / 'images'
    img_dir.mkdir(parents=True, exist_ok=True)
    for im in imgs:
        if im.kind == 'exif_rotated': make_image(im.name, im.kind, im.size, orientation=im.orientation)
        elif im.kind is not None: make_image(im.name, im.kind, im.size)
    if classes is None: classes = sorted({lbl for im in imgs for lbl, _ in im.boxes})
    if fmt == 'coco':
        cats = [{'id': i + 1, 'name': c} for i, c in enumerate(classes)]
        images, anns = [], []
        for i, im in enumerate(imgs):
            w, h = im.annotated_size
            images.append({'id': i + 1, 'file_name': im.name, 'width': w, 'height': h})
            for lbl, (x0, y0, x1, y1) in im.boxes:
                anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': classes.index(lbl) + 1,
                             'bbox': [x0, y0, x1 - x0, y1 - y0], 'iscrowd': 0})
        path = root / 'annotations.json'
        path.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': cats}))  # NaN as `NaN`
        return COCOParser(path, img_dir, **kwargs)
    if fmt == 'voc':
        ann_dir = root / 'annotations'
        ann_dir.mkdir(exist_ok=True)
        for im in imgs:
            w, h = im.annotated_size
            objs = ''.join(f'<object><name>{lbl}</name><bndbox><xmin>{_num(x0 + 1)}</xmin><ymin>{_num(y0 + 1)}</ymin>'
                           f'<xmax>{_num(x1)}</xmax><ymax>{_num(y1)}</ymax></bndbox></object>\n'
                           for lbl, (x0, y0, x1, y1) in im.boxes)
            (ann_dir / (Path(im.name).stem + '.xml')).write_text(
                f'<annotation>\n<filename>{im.name}</filename>\n<size><width>{w}</width><height>{h}</height>'
                f'<depth>3</depth></size>\n{objs}</annotation>\n')
        return VOCParser(ann_dir, img_dir, **kwargs)
    if fmt == 'via':
        d = {}
        for im in imgs:
            regions = [{'shape_attributes': {'name': 'rect', 'x': x0, 'y': y0, 'width': x1 - x0, 'height': y1 - y0},
                        'region_attributes': {'label': lbl}} for lbl, (x0, y0, x1, y1) in im.boxes]
            d[f'{im.name}123'] = {'filename': im.name, 'size': 123, 'regions': regions, 'file_attributes': {}}
        path = root / 'via.json'
        path.write_text(json.dumps(d))
        return VIAParser(path, img_dir, **kwargs)
    if fmt == 'csv':
        lines = ['filename,label,xmin,ymin,xmax,ymax']
        for im in imgs:
            lines += [','.join([im.name, lbl, *map(_num, box)]) for lbl, box in im.boxes] or [f'{im.name},,,,,']
        path = root / 'boxes.csv'
        path.write_text('\n'.join(lines) + '\n')
        return CSVParser(path, img_dir, **kwargs)
    if fmt == 'yolo':
        lbl_dir = root / 'labels'
        lbl_dir.mkdir(exist_ok=True)
        for im in imgs:
            if not im.boxes: continue  # an image without a label file is a negative sample
            w, h = im.annotated_size
            rows = [f'{classes.index(lbl)} {_num((x0 + x1) / 2 / w)} {_num((y0 + y1) / 2 / h)} '
                    f'{_num((x1 - x0) / w)} {_num((y1 - y0) / h)}' for lbl, (x0, y0, x1, y1) in im.boxes]
            (lbl_dir / (Path(im.name).stem + '.txt')).write_text('\n'.join(rows) + '\n')
        return YOLOParser(img_dir, lbl_dir, classes, **kwargs)
    raise ValueError(fmt)


def by_name(records): return {r.filepath.name: r for r in records}


# ---------------------------------------------------------------------------------------------------------------
# 1. the real sample sets

def check_sizes(records):
    for r in records: assert (r.width, r.height) == displayed_size(r.filepath), r


@pytest.mark.parametrize('masks', [False, True])
def test_coco_samples(samples, masks):
    p = COCOParser(samples / 'annotations.json', samples / 'images', masks=masks)
    records = parse_clean(p)
    assert len(records) == 6 and sum(len(r) for r in records) == 36
    assert (p.report.n_images, p.report.n_boxes, p.report.n_negative) == (6, 36, 1)
    assert len(p.class_map) == 81 and p.class_map.get_name(0) == 'background'  # all 80 categories of the file
    used = {p.class_map.get_name(int(l)) for r in records for l in r.labels}
    assert used == {'person', 'car', 'motorcycle', 'bus', 'bear', 'handbag', 'skateboard', 'bottle'}
    assert {r.image_id: len(r) for r in records} == {128372: 16, 404249: 2, 343934: 1, 194216: 3, 464689: 14, 89: 0}
    assert sum(int(r.iscrowd.sum()) for r in records) == 1
    check_sizes(records)
    for r in records:
        if masks: assert len(r.masks) == len(r)
        else: assert r.masks is None


def test_voc_samples(samples):
    p = VOCParser(samples / 'voc' / 'Annotations', samples / 'voc' / 'JPEGImages')
    records = parse_clean(p)
    assert [r.image_id for r in records] == ['2007_000063', '2011_003353']
    assert sum(len(r) for r in records) == 3 and p.class_map.vocab == ['background', 'chair', 'dog', 'person']
    check_sizes(records)
    r0, r1 = records
    assert r0.masks is None
    # VOC pixels are 1-based inclusive: xmin, ymin shift by one, xmax, ymax stay
    np.testing.assert_allclose(r0.boxes, [[122, 114, 379, 275], [74, 0, 428, 375]])
    assert [p.class_map.get_name(int(l)) for l in r0.labels] == ['dog', 'chair']
    np.testing.assert_allclose(r1.boxes, [[129, 44.7, 375, 470]], atol=1e-4)


def test_voc_samples_with_masks(samples):
    voc = samples / 'voc'
    p = VOCParser(voc / 'Annotations', voc / 'JPEGImages', masks_dir=voc / 'SegmentationObject')
    records = parse_fixing(p, missing_mask=1)  # 2011_003353 has no SegmentationObject png: skipped
    assert p.report.files('missing_mask') == [str(voc / 'Annotations' / '2011_003353.xml')]
    assert [r.image_id for r in records] == ['2007_000063']
    r = records[0]
    check_sizes(records)
    m = r.mask_array()
    assert m.shape == (2, 375, 500) and m.dtype == np.uint8
    with Image.open(voc / 'SegmentationObject' / '2007_000063.png') as im: obj = np.asarray(im)
    assert m.sum((1, 2)).tolist() == [(obj == 1).sum(), (obj == 2).sum()] == [27632, 78930]
    for box, mi in zip(r.boxes, m):  # every object's pixels lie inside its box
        ys, xs = np.nonzero(mi)
        assert box[0] <= xs.min() and box[1] <= ys.min() and xs.max() < box[2] and ys.max() < box[3]


def test_via_samples(samples):
    path = samples / 'via' / 'via_bbox.json'
    p = VIAParser(path, samples / 'via')
    records = parse_clean(p)
    assert [r.image_id for r in records] == ['IMG_4908', 'IMG_4909']
    assert sum(len(r) for r in records) == 10 and p.class_map.classes == ['###', 'c', 'n', 'o', 'z']
    check_sizes(records)
    # boxes, read independently from the JSON: rect x,y,w,h and polygon extents
    data = json.loads(path.read_text())
    for r, entry in zip(records, data.values()):
        expected = []
        for reg in entry['regions']:
            s = reg['shape_attributes']
            if s['name'] == 'rect': expected.append([s['x'], s['y'], s['x'] + s['width'], s['y'] + s['height']])
            else: expected.append([min(s['all_points_x']), min(s['all_points_y']), max(s['all_points_x']), max(s['all_points_y'])])
        np.testing.assert_allclose(r.boxes, expected)
        assert [p.class_map.get_name(int(l)) for l in r.labels] == [reg['region_attributes']['label'] for reg in entry['regions']]


def test_fridge_samples(samples):
    root = samples / 'fridge' / 'odFridgeObjects'
    p = VOCParser(root / 'annotations', root / 'images')
    records = parse_clean(p)
    assert [r.image_id for r in records] == ['10', '11', '12', '13', '14', '15']
    assert all((r.width, r.height) == (499, 666) for r in records)
    check_sizes(records)
    assert p.class_map.classes == ['can', 'carton', 'milk_bottle', 'water_bottle']
    names = [p.class_map.get_name(int(l)) for r in records for l in r.labels]
    assert {n: names.count(n) for n in set(names)} == {'can': 3, 'carton': 5, 'milk_bottle': 2, 'water_bottle': 2}
    np.testing.assert_allclose(records[0].boxes, [[85, 101, 216, 439], [149, 376, 445, 490]])


# ---------------------------------------------------------------------------------------------------------------
# 2. COCO against pycocotools' own reading of the same file

def test_coco_matches_pycocotools(samples, capsys):
    from pycocotools.coco import COCO
    ann_file = samples / 'annotations.json'
    coco = COCO(str(ann_file))
    capsys.readouterr()  # COCO() prints progress
    p = COCOParser(ann_file, samples / 'images', masks=True)
    records = {r.image_id: r for r in parse_clean(p)}
    assert sorted(records) == sorted(coco.getImgIds())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # pycocotools vs numpy 2 `copy=` noise
        for img_id, r in records.items():
            info = coco.loadImgs(img_id)[0]
            assert (r.width, r.height) == (info['width'], info['height'])
            assert r.filepath.name == info['file_name']
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))
            assert len(r) == len(anns)
            if not anns: continue
            xywh = np.array([a['bbox'] for a in anns], np.float64)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            clipped = np.clip(xyxy, 0, [r.width, r.height, r.width, r.height])
            inside = (np.abs(clipped - xyxy) < 1e-6).all(1)
            assert inside.any()
            np.testing.assert_allclose(r.boxes[inside], xyxy[inside], atol=1e-3)
            np.testing.assert_allclose(r.boxes, clipped, atol=1e-3)
            np.testing.assert_allclose(r.areas, [a['area'] for a in anns], rtol=1e-6)
            assert r.iscrowd.tolist() == [bool(a['iscrowd']) for a in anns]
            assert [p.class_map.get_name(int(l)) for l in r.labels] == \
                   [coco.loadCats(a['category_id'])[0]['name'] for a in anns]
            ours = r.mask_array()
            assert ours.shape == (len(anns), r.height, r.width)
            assert ours.sum((1, 2)).tolist() == [int(coco.annToMask(a).sum()) for a in anns]
    crowd = [a for a in coco.loadAnns(coco.getAnnIds(iscrowd=True))]
    assert len(crowd) == 1 and isinstance(crowd[0]['segmentation'], dict)  # the RLE case really is exercised


# ---------------------------------------------------------------------------------------------------------------
# 3. bad input, for every parser where it applies

@pytest.mark.parametrize('fmt', FORMATS)
def test_clean_synthetic_dataset(fmt, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (1, 2, 11, 12)), ('dog', (5.5, 6, 30, 20))]), Img('b.png', [('cat', (0, 0, 32, 24))])]
    p = write_dataset(fmt, make_image, imgs)
    records = parse_clean(p)
    assert p.class_map.vocab == ['background', 'cat', 'dog']
    r = by_name(records)
    np.testing.assert_allclose(r['a.png'].boxes, [[1, 2, 11, 12], [5.5, 6, 30, 20]], atol=1e-4)
    assert r['a.png'].labels.tolist() == [1, 2]
    np.testing.assert_allclose(r['b.png'].boxes, [[0, 0, 32, 24]], atol=1e-4)
    assert all((x.width, x.height) == (32, 24) for x in records)


@pytest.mark.parametrize('fmt', FORMATS)
def test_missing_image_is_skipped(fmt, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (1, 2, 11, 12))]), Img('b.png', [('cat', (1, 2, 11, 12))], kind=None)]
    p = write_dataset(fmt, make_image, imgs)
    records = parse_fixing(p, missing_image=1)
    assert [r.filepath.name for r in records] == ['a.png']
    # YOLO lists images from the folder: what is missing is the image of a label file
    missing = tmp_path / 'labels' / 'b.txt' if fmt == 'yolo' else tmp_path / 'images' / 'b.png'
    assert p.report.files('missing_image') == [str(missing)]
    assert p.report.n_images == 1


@pytest.mark.parametrize('kind, detail', [('not_image', 'UnidentifiedImageError'), ('truncated', 'truncated')])
@pytest.mark.parametrize('fmt', FORMATS)
def test_corrupt_image_is_skipped(fmt, kind, detail, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (1, 2, 11, 12))]),
            Img('bad.jpg', [('cat', (1, 2, 11, 12))], kind=kind, size=(499, 666))]
    p = write_dataset(fmt, make_image, imgs)
    records = parse_fixing(p, corrupt_image=1)
    assert [r.filepath.name for r in records] == ['a.png']
    assert p.report.files('corrupt_image') == [str(tmp_path / 'images' / 'bad.jpg')]
    assert detail in p.report.fixes['corrupt_image'][0][1]


def test_truncated_jpeg_passes_without_verification(tmp_path, make_image):
    "`verify_images=False` reads headers only: a truncated JPEG is then not caught (the documented trade-off)."
    imgs = [Img('bad.jpg', [('cat', (1, 2, 11, 12))], kind='truncated', size=(499, 666))]
    records = parse_clean(write_dataset('csv', make_image, imgs, verify_images=False))
    assert (records[0].width, records[0].height) == (499, 666)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'I;16'])
@pytest.mark.parametrize('fmt', FORMATS)
def test_image_modes_parse_and_open_as_rgb(fmt, mode, tmp_path, make_image):
    imgs = [Img(f"{mode.replace(';', '')}.png", [('cat', (2, 3, 20, 15))], kind=mode, size=(32, 24))]
    p = write_dataset(fmt, make_image, imgs)
    (r,) = parse_clean(p)
    with Image.open(r.filepath) as src: assert src.mode == mode
    assert (r.width, r.height) == (32, 24)
    np.testing.assert_allclose(r.boxes, [[2, 3, 20, 15]], atol=1e-4)
    im = open_image(r.filepath)
    assert im.mode == 'RGB' and im.size == (r.width, r.height)
    a = np.asarray(im)
    assert a.dtype == np.uint8 and a.shape == (24, 32, 3)
    # the content survives: compare with an independent 8-bit reading of the file
    with Image.open(r.filepath) as src:
        if mode == 'I;16': expected = np.repeat((np.asarray(src).astype(np.float64) / 257).round()[..., None], 3, -1)
        else: expected = np.asarray(src.convert('RGB'))
    np.testing.assert_array_equal(a, expected.astype(np.uint8))
    assert a.max() > a.min()


@pytest.mark.parametrize('orientation', [6, 8])
@pytest.mark.parametrize('fmt', FORMATS)
def test_exif_rotated_jpeg(fmt, orientation, tmp_path, make_image):
    # stored 40x20 with orientation 6 or 8 (rotated 90): displayed 20x40; the box is in displayed pixels and
    # lies below the stored height, so it must not be clipped
    imgs = [Img('rot.jpg', [('cat', (2, 25, 18, 38))], kind='exif_rotated', size=(40, 20), orientation=orientation)]
    p = write_dataset(fmt, make_image, imgs)
    (r,) = parse_clean(p)
    with Image.open(r.filepath) as src: assert src.size == (40, 20)  # as stored
    assert (r.width, r.height) == (20, 40)
    im = open_image(r.filepath)
    assert im.mode == 'RGB' and im.size == (r.width, r.height)
    with Image.open(r.filepath) as src: np.testing.assert_array_equal(np.asarray(im), np.asarray(ImageOps.exif_transpose(src)))
    np.testing.assert_allclose(r.boxes, [[2, 25, 18, 38]], atol=1e-4)


def test_exif_orientation_without_swap(tmp_path, make_image):
    "Orientation 3 (rotated 180) keeps width and height."
    imgs = [Img('rot.jpg', [('cat', (2, 3, 30, 18))], kind='exif_rotated', size=(40, 20), orientation=3)]
    (r,) = parse_clean(write_dataset('voc', make_image, imgs))
    assert (r.width, r.height) == (40, 20) == open_image(r.filepath).size


@pytest.mark.parametrize('fmt', FORMATS)
def test_box_outside_image_is_clipped(fmt, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (-5, -3, 40, 30)), ('cat', (20, 10, 31, 50)), ('cat', (1, 1, 5, 5))])]
    p = write_dataset(fmt, make_image, imgs)
    (r,) = parse_fixing(p, clipped=2)
    np.testing.assert_allclose(r.boxes, [[0, 0, 32, 24], [20, 10, 31, 24], [1, 1, 5, 5]], atol=1e-4)
    np.testing.assert_allclose(r.areas, [32 * 24, 11 * 14, 16], rtol=1e-4)
    assert p.report.files('clipped') == [str(tmp_path / 'images' / 'a.png')]


@pytest.mark.parametrize('fmt', FORMATS)
def test_zero_area_box_is_degenerate(fmt, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (5, 5, 5, 15)), ('cat', (1, 2, 11, 12)), ('cat', (3, 7, 9, 7)), ('cat', (12, 2, 4, 9))])]
    p = write_dataset(fmt, make_image, imgs)
    (r,) = parse_fixing(p, degenerate=3)  # zero width, zero height, inverted
    np.testing.assert_allclose(r.boxes, [[1, 2, 11, 12]], atol=1e-4)
    assert p.report.files('degenerate') == [str(tmp_path / 'images' / 'a.png')]


def test_box_outside_and_empty_after_clipping_is_degenerate(tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (40, 2, 50, 12)), ('cat', (1, 2, 11, 12))])]  # wholly right of the 32-wide image
    p = write_dataset('csv', make_image, imgs)
    (r,) = parse_fixing(p, clipped=1, degenerate=1)
    np.testing.assert_allclose(r.boxes, [[1, 2, 11, 12]])


@pytest.mark.parametrize('fmt', FORMATS)
def test_nan_coordinate_is_invalid_box(fmt, tmp_path, make_image):
    # text formats write `nan`; COCO and VIA get Python's JSON `NaN` extension (what json.dump writes)
    imgs = [Img('a.png', [('cat', (NAN, 2, 11, 12)), ('cat', (1, 2, 11, 12))])]
    p = write_dataset(fmt, make_image, imgs)
    (r,) = parse_fixing(p, invalid_box=1)
    np.testing.assert_allclose(r.boxes, [[1, 2, 11, 12]], atol=1e-4)
    assert p.report.files('invalid_box') == [str(tmp_path / 'images' / 'a.png')]
    assert 'nan' in p.report.fixes['invalid_box'][0][1]


@pytest.mark.parametrize('fmt', ['csv', 'voc', 'yolo'])
def test_infinite_coordinate_is_invalid_box(fmt, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (1, 2, math.inf, 12)), ('cat', (1, 2, 11, 12))])]
    (r,) = parse_fixing(write_dataset(fmt, make_image, imgs), invalid_box=1)
    assert len(r) == 1


@pytest.mark.parametrize('fmt', FORMATS)
def test_unknown_class_with_explicit_class_map(fmt, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (1, 2, 11, 12)), ('dog', (3, 4, 20, 20))])]
    p = write_dataset(fmt, make_image, imgs, class_map=ClassMap(['cat', 'bird']))
    (r,) = parse_fixing(p, unknown_class=1)
    assert p.class_map.vocab == ['background', 'cat', 'bird']
    assert r.labels.tolist() == [1]
    np.testing.assert_allclose(r.boxes, [[1, 2, 11, 12]], atol=1e-4)
    assert p.report.files('unknown_class') == [str(tmp_path / 'images' / 'a.png')]
    assert "'dog'" in p.report.fixes['unknown_class'][0][1]


@pytest.mark.parametrize('fmt', FORMATS)
def test_image_without_boxes_is_a_negative_sample(fmt, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (1, 2, 11, 12))]), Img('empty.png', [])]
    p = write_dataset(fmt, make_image, imgs)
    records = parse_clean(p)
    r = by_name(records)['empty.png']
    assert len(r) == 0 and r.boxes.shape == (0, 4) and r.labels.shape == (0,)
    assert (r.width, r.height) == (32, 24)
    assert (p.report.n_images, p.report.n_boxes, p.report.n_negative) == (2, 1, 1)


@pytest.mark.parametrize('fmt', ['coco', 'voc'])
def test_annotated_size_differs_from_file(fmt, tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (1, 2, 11, 12))], annotated_size=(64, 48))]
    p = write_dataset(fmt, make_image, imgs)
    (r,) = parse_fixing(p, size_mismatch=1)
    assert (r.width, r.height) == (32, 24)  # the file wins


def test_report_lists_kinds_with_counts(tmp_path, make_image):
    imgs = [Img('a.png', [('cat', (-5, 1, 10, 10)), ('cat', (1, 1, 40, 10)), ('cat', (2, 2, 2, 8)), ('cat', (NAN, 1, 2, 3))]),
            Img('b.png', [('cat', (1, 1, 4, 4))], kind=None), Img('c.png', [])]
    p = write_dataset('csv', make_image, imgs)
    parse_fixing(p, clipped=2, degenerate=1, invalid_box=1, missing_image=1)
    s = str(p.report)
    lines = s.splitlines()
    assert lines[0] == 'CSVParser(boxes.csv): 2 images, 2 boxes, 1 images without boxes'
    for kind, n in [('clipped', 2), ('degenerate', 1), ('invalid_box', 1), ('missing_image', 1)]:
        (line,) = [l for l in lines if l.endswith(f'[{kind}]') or f'[{kind}];' in l]
        assert line.strip().startswith(f'{n} x '), line
    assert str(tmp_path / 'images' / 'b.png') in s and 'line 2' in s  # files and the first detail are named
    assert repr(p.report) == s


# --- COCO specifics

def _coco(make_image, images, anns, cats=({'id': 1, 'name': 'cat'},), **kwargs):
    "A COCO file of `images`, `anns` and `cats`, with a 32x24 RGB png for each image."
    for im in images: make_image(im['file_name'])
    path = make_image.root / 'annotations.json'
    path.write_text(json.dumps({'images': list(images), 'annotations': list(anns), 'categories': list(cats)}))
    return COCOParser(path, make_image.root / 'images', **kwargs)


def test_coco_malformed_json(tmp_path):
    path = tmp_path / 'annotations.json'
    path.write_text('{\n  "images": [\n    {"id": 1,,}\n  ]\n}')
    with pytest.raises(ParseError, match=re.escape(str(path)) + r': invalid JSON at line 3 column 14'):
        COCOParser(path, tmp_path).parse()


def test_coco_missing_key_and_bad_bbox(tmp_path, make_image):
    path = tmp_path / 'a.json'
    path.write_text(json.dumps({'images': [], 'annotations': []}))
    with pytest.raises(ParseError, match=re.escape(str(path)) + r": the file has no 'categories'"):
        COCOParser(path, tmp_path).parse()
    p = _coco(make_image, [{'id': 1, 'file_name': 'a.png'}], [{'id': 7, 'image_id': 1, 'category_id': 1, 'bbox': [1, 2, 3]}])
    with pytest.raises(ParseError, match=r"annotations\[0\] \(id 7\)\['bbox'\] should be 4 numbers"):
        p.parse()


def test_coco_unknown_category_id(tmp_path, make_image):
    p = _coco(make_image, [{'id': 1, 'file_name': 'a.png', 'width': 32, 'height': 24}],
              [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [1, 2, 10, 10]},
               {'id': 2, 'image_id': 1, 'category_id': 99, 'bbox': [3, 4, 10, 10]}])
    (r,) = parse_fixing(p, unknown_class=1)
    assert r.labels.tolist() == [1] and r.image_id == 1
    assert '99' in p.report.fixes['unknown_class'][0][1] and 'annotations[1]' in p.report.fixes['unknown_class'][0][1]


def test_coco_orphan_annotation_and_image_without_annotations(tmp_path, make_image):
    p = _coco(make_image, [{'id': 5, 'file_name': 'a.png'}, {'id': 6, 'file_name': 'b.png'}],
              [{'id': 1, 'image_id': 5, 'category_id': 1, 'bbox': [1, 2, 10, 10]},
               {'id': 2, 'image_id': 42, 'category_id': 1, 'bbox': [3, 4, 10, 10]}])
    records = parse_fixing(p, orphan_annotation=1)
    assert [(r.image_id, len(r)) for r in records] == [(5, 1), (6, 0)]
    assert p.report.n_negative == 1


def test_coco_masks_polygon_rle_and_missing(tmp_path, make_image):
    from pycocotools import mask as mask_utils
    m = np.zeros((24, 32), np.uint8)
    m[4:10, 6:16] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle['counts'] = rle['counts'].decode()
    anns = [{'id': 1, 'image_id': 1, 'category_id': 1, 'segmentation': [[2, 2, 12, 2, 12, 8, 2, 8]]},  # no bbox: from polygon
            {'id': 2, 'image_id': 1, 'category_id': 1, 'bbox': [6, 4, 10, 6], 'segmentation': rle, 'iscrowd': 1},
            {'id': 3, 'image_id': 1, 'category_id': 1, 'bbox': [1, 1, 5, 5]}]  # no segmentation
    p = _coco(make_image, [{'id': 1, 'file_name': 'a.png', 'width': 32, 'height': 24}], anns, masks=True)
    (r,) = parse_fixing(p, missing_mask=1)
    np.testing.assert_allclose(r.boxes, [[2, 2, 12, 8], [6, 4, 16, 10]])
    assert r.iscrowd.tolist() == [False, True]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        ma = r.mask_array()
    assert ma.shape == (2, 24, 32) and ma[1].sum() == m.sum() and (ma[1] == m).all()
    # without masks: the third box is kept, and the first one's box still comes from its polygon
    (r,) = parse_clean(COCOParser(tmp_path / 'annotations.json', tmp_path / 'images'))
    assert r.masks is None
    np.testing.assert_allclose(r.boxes, [[2, 2, 12, 8], [6, 4, 16, 10], [1, 1, 6, 6]])


# --- VOC specifics

def test_voc_malformed_xml(tmp_path, make_image):
    make_image('a.png')
    (tmp_path / 'ann').mkdir()
    xml = tmp_path / 'ann' / 'a.xml'
    xml.write_text('<annotation>\n<filename>a.png</filename>\n<object><name>cat</name>\n</annotation>\n')
    with pytest.raises(ParseError, match=re.escape(str(xml)) + r': malformed XML at line 4 column \d+'):
        VOCParser(tmp_path / 'ann', tmp_path / 'images').parse()


@pytest.mark.parametrize('obj, msg', [
    ('<object><name>cat</name><bndbox><xmin>abc</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>',
     r"<object> 1 \('cat'\): <xmin> is not a number: 'abc'"),
    ('<object><name>cat</name></object>', r"<object> 1 \('cat'\) has no <bndbox>"),
    ('<object><bndbox><xmin>1</xmin></bndbox></object>', r'<object> 1 has no <name>'),
    ('<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object>',
     r"<object> 1 \('cat'\) has no <ymax>"),
])
def test_voc_bad_object(tmp_path, make_image, obj, msg):
    make_image('a.png')
    (tmp_path / 'ann').mkdir()
    xml = tmp_path / 'ann' / 'a.xml'
    xml.write_text(f'<annotation><filename>a.png</filename>{obj}</annotation>')
    with pytest.raises(ParseError, match=re.escape(str(xml)) + ': ' + msg):
        VOCParser(tmp_path / 'ann', tmp_path / 'images').parse()


def test_voc_without_filename_finds_image_by_stem(tmp_path, make_image):
    make_image('a.png')
    (tmp_path / 'ann').mkdir()
    (tmp_path / 'ann' / 'a.xml').write_text('<annotation><object><name>cat</name><bndbox><xmin>2</xmin><ymin>3</ymin>'
                                            '<xmax>10</xmax><ymax>12</ymax></bndbox></object></annotation>')
    (r,) = parse_clean(VOCParser(tmp_path / 'ann', tmp_path / 'images'))
    assert r.filepath.name == 'a.png' and r.image_id == 'a'
    np.testing.assert_allclose(r.boxes, [[1, 2, 10, 12]])


def test_voc_missing_annotations_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'nope'))):
        VOCParser(tmp_path / 'nope', tmp_path)


def test_voc_folders_swapped_or_empty(samples):
    "The images folder given as the annotations folder (a common slip) is named, not parsed as zero images."
    voc = samples / 'voc'
    with pytest.raises(FileNotFoundError, match='JPEGImages: no .xml annotation files but images: VOCParser takes the annotations folder first'):
        VOCParser(voc / 'JPEGImages', voc / 'Annotations').parse()


# --- VIA specifics

def test_via_malformed_json(tmp_path):
    path = tmp_path / 'via.json'
    path.write_text('{"a.png1": {"filename": "a.png",\n "regions": [}\n}')
    with pytest.raises(ParseError, match=re.escape(str(path)) + r': invalid JSON at line 2 column 14'):
        VIAParser(path, tmp_path).parse()


def test_via_shapes_labels_and_attribute(tmp_path, make_image):
    make_image('a.png', size=(64, 48))
    regions = [
        {'shape_attributes': {'name': 'circle', 'cx': 20, 'cy': 20, 'r': 5}, 'region_attributes': {'label': 'cat'}},
        {'shape_attributes': {'name': 'ellipse', 'cx': 40, 'cy': 20, 'rx': 8, 'ry': 4}, 'region_attributes': {'label': 'cat'}},
        {'shape_attributes': {'name': 'point', 'cx': 3, 'cy': 3}, 'region_attributes': {'label': 'cat'}},
        {'shape_attributes': {'name': 'rect', 'x': 1, 'y': 1, 'width': 5, 'height': 5}, 'region_attributes': {'label': ''}},
        {'shape_attributes': {'name': 'rect', 'x': 1, 'y': 1, 'width': 5, 'height': 5},
         'region_attributes': {'label': {'dog': True, 'cat': False}}},  # checkbox attribute
    ]
    path = tmp_path / 'via.json'
    # a VIA 2 project file wraps the images in `_via_img_metadata`
    path.write_text(json.dumps({'_via_img_metadata': {'a.png1': {'filename': 'a.png', 'regions': regions}}}))
    p = VIAParser(path, tmp_path / 'images')
    (r,) = parse_fixing(p, unsupported_shape=1, missing_label=1)
    np.testing.assert_allclose(r.boxes, [[15, 15, 25, 25], [32, 16, 48, 24], [1, 1, 6, 6]])
    assert [p.class_map.get_name(int(l)) for l in r.labels] == ['cat', 'cat', 'dog']
    with pytest.raises(ParseError, match=re.escape(str(path)) + r".*no region has the attribute 'kind'"):
        VIAParser(path, tmp_path / 'images', label_attr='kind').parse()


def test_via1_regions_dict(tmp_path, make_image):
    "VIA 1 exports keep regions in a dict keyed by index."
    make_image('a.png')
    path = tmp_path / 'via.json'
    path.write_text(json.dumps({'a.png1': {'filename': 'a.png', 'regions': {
        '0': {'shape_attributes': {'name': 'polygon', 'all_points_x': [1, 10, 10], 'all_points_y': [2, 2, 12]},
              'region_attributes': {'label': 'cat'}}}}}))
    (r,) = parse_clean(VIAParser(path, tmp_path / 'images'))
    np.testing.assert_allclose(r.boxes, [[1, 2, 10, 12]])


def test_via_not_utf8(tmp_path):
    path = tmp_path / 'via.json'
    path.write_bytes('{"caf\xe9.png": {}}'.encode('latin-1'))
    with pytest.raises(ParseError, match=re.escape(str(path)) + ': not a UTF-8 text file'):
        VIAParser(path, tmp_path).parse()


def test_via_only_negative_images(tmp_path, make_image):
    make_image('a.png')
    make_image('b.png')
    path = tmp_path / 'via.json'
    path.write_text(json.dumps({f'{n}1': {'filename': n, 'regions': []} for n in ('a.png', 'b.png')}))
    records = parse_clean(VIAParser(path, tmp_path / 'images'))
    assert [len(r) for r in records] == [0, 0]


# --- CSV specifics

def _csv(make_image, text, **kwargs):
    "A CSV file of `text`, next to a 32x24 images/a.png."
    make_image('a.png')
    path = make_image.root / 'boxes.csv'
    path.write_text(text)
    return CSVParser(path, make_image.root / 'images', **kwargs)


def test_csv_non_numeric_box(tmp_path, make_image):
    p = _csv(make_image, 'filename,class,xmin,ymin,xmax,ymax\na.png,cat,1,2,10,12\na.png,cat,1,two,10,12\n')
    with pytest.raises(ParseError, match=re.escape(str(p.csv_file)) + r": line 3: box .*'ymin': 'two'.* is not numeric"):
        p.parse()


def test_csv_header_without_box_columns(tmp_path, make_image):
    p = _csv(make_image, 'filename,class,a,b,c,d\na.png,cat,1,2,10,12\n')
    with pytest.raises(ParseError, match=re.escape(str(p.csv_file)) + r": cannot tell which columns hold the box; "
                       + re.escape("header is ['filename', 'class', 'a', 'b', 'c', 'd']")):
        p.parse()
    p = _csv(make_image, 'picture,class,xmin,ymin,xmax,ymax\na.png,cat,1,2,10,12\n')
    with pytest.raises(ParseError, match=r'cannot tell which columns hold the image file name; header is \[.picture'):
        p.parse()


@pytest.mark.parametrize('columns, row', [
    ({'filename': 'pic', 'label': 'kind', 'xmin': 'a', 'ymin': 'b', 'xmax': 'c', 'ymax': 'd'}, 'a.png,cat,1,2,10,12'),
    ({'filename': 'pic', 'label': 'kind', 'x': 'a', 'y': 'b', 'w': 'c', 'h': 'd'}, 'a.png,cat,1,2,9,10'),
])
def test_csv_explicit_columns(tmp_path, make_image, columns, row):
    p = _csv(make_image, f'pic,kind,a,b,c,d\n{row}\n', columns=columns)
    (r,) = parse_clean(p)
    np.testing.assert_allclose(r.boxes, [[1, 2, 10, 12]])
    assert p.class_map.classes == ['cat'] and r.image_id == 'a'


def test_csv_explicit_columns_not_in_header(tmp_path, make_image):
    p = _csv(make_image, 'pic,kind,a,b,c,d\na.png,cat,1,2,10,12\n',
             columns={'filename': 'pic', 'label': 'kind', 'xmin': 'a', 'ymin': 'b', 'xmax': 'c', 'ymax': 'zz'})
    with pytest.raises(ParseError, match=re.escape("columns ['zz'] not in the header ['pic', 'kind', 'a', 'b', 'c', 'd']")):
        p.parse()


def test_csv_xywh_header_without_label_and_bom(tmp_path, make_image):
    p = _csv(make_image, '\ufeffimage,x,y,width,height\na.png,1,2,9,10\n')
    (r,) = parse_clean(p)
    np.testing.assert_allclose(r.boxes, [[1, 2, 10, 12]])
    assert p.class_map.classes == ['object']


@pytest.mark.parametrize('text, msg', [
    ('filename,class,xmin,ymin,xmax,ymax\na.png,cat,1,2,10,12\na.png,cat,1,2,10,12,99\n', r'line 3 has more fields than the header'),
    ('filename,class,xmin,ymin,xmax,ymax\na.png,cat,1,2,10,12\n,cat,1,2,10,12\n', r"line 3: empty 'filename'"),
    ('filename,class,xmin,ymin,xmax,ymax\na.png,,1,2,10,12\n', r"line 2: empty 'class'"),
    ('', r'empty file, expected a header row'),
])
def test_csv_malformed_rows(tmp_path, make_image, text, msg):
    p = _csv(make_image, text)
    with pytest.raises(ParseError, match=re.escape(str(p.csv_file)) + ': ' + msg):
        p.parse()


def test_csv_quoted_multiline_field_counts_physical_lines(tmp_path, make_image):
    # a quoted label spanning two lines: the next row's error must name its physical line (5), as an editor shows it
    p = _csv(make_image, 'filename,class,xmin,ymin,xmax,ymax\na.png,"big\ncat",1,2,10,12\na.png,cat,1,2,10,12\n'
                       'a.png,cat,x,2,10,12\n')
    with pytest.raises(ParseError, match=r': line 5: box'):
        p.parse()


# --- YOLO specifics

def _yolo(make_image, label_text, names=('cat', 'dog'), **kwargs):
    "A 32x24 images/a.png with labels/a.txt of `label_text`: (parser, label file)."
    make_image('a.png')
    lbl_dir = make_image.root / 'labels'
    lbl_dir.mkdir(exist_ok=True)
    txt = lbl_dir / 'a.txt'
    txt.write_text(label_text)
    return YOLOParser(make_image.root / 'images', lbl_dir, list(names), **kwargs), txt


@pytest.mark.parametrize('text, msg', [
    ('0 0.5 0.5 0.2 0.2\n\ncat 0.5 0.5 0.2 0.2\n', r"line 3: expected 'class cx cy w h' numbers, got 'cat 0.5 0.5 0.2 0.2'"),
    ('0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n', r'line 2: expected 4 box values or a polygon, got 3 values'),
    ('0 0.5 0.5 0.2 zero\n', r"line 1: expected 'class cx cy w h' numbers"),
    ('0 0.1 0.1 0.5 0.1 0.5 0.5 0.1\n', r'line 1: expected 4 box values or a polygon, got 7 values'),
])
def test_yolo_malformed_line(tmp_path, make_image, text, msg):
    p, txt = _yolo(make_image, text)
    with pytest.raises(ParseError, match=re.escape(str(txt)) + ': ' + msg):
        p.parse()


def test_yolo_class_index_out_of_range(tmp_path, make_image):
    p, txt = _yolo(make_image, '0 0.5 0.5 0.25 0.5\n5 0.5 0.5 0.2 0.2\n-1 0.5 0.5 0.2 0.2\n')
    (r,) = parse_fixing(p, unknown_class=2)
    assert p.class_map.vocab == ['background', 'cat', 'dog']
    np.testing.assert_allclose(r.boxes, [[12, 6, 20, 18]], atol=1e-4)
    details = [d for _, d in p.report.fixes['unknown_class']]
    assert '<class index 5>' in details[0] and 'line 2' in details[0] and 'line 3' in details[1]


def test_yolo_polygon_and_class_file(tmp_path, make_image):
    (tmp_path / 'classes.txt').write_text('cat\ndog\n\n')
    _yolo(make_image, '1 0.25 0.25 0.75 0.25 0.75 0.5\n')
    p = YOLOParser(tmp_path / 'images', tmp_path / 'labels', tmp_path / 'classes.txt', masks=True)
    (r,) = parse_clean(p)
    assert p.class_map.classes == ['cat', 'dog'] and r.labels.tolist() == [2]
    np.testing.assert_allclose(r.boxes, [[8, 6, 24, 12]], atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # pycocotools vs numpy 2
        m = r.mask_array()
    assert m.shape == (1, 24, 32) and m[0, 8, 20] == 1 and m[0, 2, 2] == 0


def test_yolo_classes_txt_in_labels_is_not_an_orphan(tmp_path, make_image):
    p, txt = _yolo(make_image, '0 0.5 0.5 0.25 0.5\n')
    (tmp_path / 'labels' / 'classes.txt').write_text('cat\ndog\n')
    (r,) = parse_clean(p)
    assert len(r) == 1


def test_yolo_missing_labels_dir(tmp_path, make_image):
    make_image('a.png')
    p = YOLOParser(tmp_path / 'images', tmp_path / 'lables', ['cat'])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'lables'))):
        p.parse()


# ---------------------------------------------------------------------------------------------------------------
# 4. ClassMap

@pytest.mark.parametrize('classes', [['cat', 'dog'], ['background', 'cat', 'dog'], ('cat', 'dog')])
def test_classmap_ids(classes):
    cm = ClassMap(classes)
    assert cm.vocab == ['background', 'cat', 'dog'] and cm.classes == ['cat', 'dog'] and len(cm) == 3
    assert [cm.get_id(c) for c in ('background', 'cat', 'dog')] == [0, 1, 2]
    assert [cm.get_name(i) for i in range(3)] == ['background', 'cat', 'dog']
    assert 'cat' in cm and 'bird' not in cm and list(cm) == cm.vocab
    assert cm == ClassMap(['cat', 'dog']) and cm != ClassMap(['dog', 'cat'])
    with pytest.raises(KeyError): cm.get_id('bird')


def test_classmap_custom_background_and_errors():
    cm = ClassMap(['bg', 'cat'], background='bg')
    assert cm.vocab == ['bg', 'cat'] and cm.get_id('cat') == 1
    assert ClassMap([1, 2]).get_id(2) == 2  # names are strings
    with pytest.raises(ValueError, match="'background' must be first or absent"): ClassMap(['cat', 'background'])
    with pytest.raises(ValueError, match=r"duplicate class names \['cat'\]"): ClassMap(['cat', 'dog', 'cat'])
    assert len(ClassMap()) == 1


@pytest.mark.parametrize('cm', [ClassMap(['cat', 'dog']), ClassMap(['background', 'a b', 'ü']), ClassMap(['x'], background='bg')])
def test_classmap_pickle_round_trip(cm):
    cm2 = pickle.loads(pickle.dumps(cm))
    assert cm2 == cm and cm2.vocab == cm.vocab and cm2.background == cm.background
    assert [cm2.get_id(c) for c in cm.vocab] == list(range(len(cm)))


# ---------------------------------------------------------------------------------------------------------------
# 5. real-world data tried as a new user would (#17): malformed values, silent wrong results, VIA usability

_COCO_OK = lambda: {'images': [{'id': 1, 'file_name': 'a.png', 'width': 32, 'height': 24}],
                    'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [1, 2, 10, 10], 'area': 100, 'iscrowd': 0}],
                    'categories': [{'id': 1, 'name': 'cat'}, {'id': 2, 'name': 'dog'}]}


def _set(d, path, value):
    *keys, last = path
    for k in keys: d = d[k]
    d[last] = value


@pytest.mark.parametrize('path, value, msg', [
    (('images', 0, 'file_name'), None, r"images\[0\]\['file_name'\] should be the image's file name .*, got None"),
    (('images', 0, 'height'), None, r"images\[0\]\['height'\] should be a number of pixels .*, got None"),
    (('images', 0, 'width'), [32], r"images\[0\]\['width'\] should be a number of pixels .*, got \[32\]"),
    (('images', 0, 'id'), [1], r"images\[0\]\['id'\] should be an integer image id, got \[1\]"),
    (('categories', 0, 'id'), None, r"categories\[0\]\['id'\] should be an integer category id, got None"),
    (('categories', 0, 'id'), [1], r"categories\[0\]\['id'\] should be an integer category id, got \[1\]"),
    (('categories', 1, 'id'), 'dog', r"'categories' mixes integer and text ids \(e.g. 1 and 'dog'\)"),
    (('categories', 1, 'name'), None, r"categories\[1\]\['name'\] should be a class name .*, got None"),
    (('annotations', 0, 'area'), {}, r"annotations\[0\] \(id 1\)\['area'\] should be the segment's area .*, got \{\}"),
    (('annotations', 0, 'area'), '', r"annotations\[0\] \(id 1\)\['area'\] should be the segment's area .*, got ''"),
    (('annotations', 0, 'category_id'), [1], r"annotations\[0\] \(id 1\)\['category_id'\] should be the id of a category .*, got \[1\]"),
    (('annotations', 0, 'image_id'), [1], r"annotations\[0\] \(id 1\)\['image_id'\] should be the id of an image .*, got \[1\]"),
    (('annotations', 0, 'iscrowd'), '0', r"annotations\[0\] \(id 1\)\['iscrowd'\] should be 0 or 1, got '0'"),
    (('annotations', 0, 'bbox'), '1234', r"annotations\[0\] \(id 1\)\['bbox'\] should be 4 numbers, got '1234'"),
    (('annotations', 0, 'bbox'), [1, 2, 10**400, 4], r"annotations\[0\] \(id 1\)\['bbox'\] should be 4 numbers, got \[1, 2, 1000"),
])
def test_coco_malformed_values(tmp_path, make_image, path, value, msg):
    "Each wrong value is a ParseError naming the file, the element and the value (never a TypeError or KeyError)."
    make_image('a.png')
    d = _COCO_OK()
    _set(d, path, value)
    ann = tmp_path / 'annotations.json'
    ann.write_text(json.dumps(d))
    with pytest.raises(ParseError, match=re.escape(str(ann)) + ': ' + msg):
        COCOParser(ann, tmp_path / 'images').parse()


@pytest.mark.parametrize('seg, msg', [
    ([[1, 2, None, 4, 5, 6]], r"\[0\] should be 6 numbers, got \[1, 2, None"),
    ([[1, 2, 3, 4, 5, 6, 7]], r"\[0\] should be a polygon: x, y pairs"),
    (['abc'], r"\[0\] should be a polygon: a list of x, y pixel coordinates, got 'abc'"),
    ({'counts': '0000', 'size': [24, 32]}, r": the RLE runs cover 0 pixels, but its size 24x32 has 768"),
    ({'counts': '\x7f\x7f', 'size': [24, 32]}, r"\['counts'\] should be a compressed COCO RLE string"),
    ({'counts': [700, 'x'], 'size': [24, 32]}, r"\['counts'\] should be an RLE"),
    ({'counts': [700, 60], 'size': [24, 32]}, r": the RLE runs cover 760 pixels, but its size 24x32 has 768"),
    ({'counts': [768], 'size': [24.5, 32]}, r"\['size'\] should be \[height, width\]: two positive integers"),
    ({'counts': [768], 'size': None}, r"\['size'\] should be 2 numbers, got None"),
])
def test_coco_malformed_segmentation(tmp_path, make_image, seg, msg):
    "Polygons and RLEs are checked when read: a broken RLE would otherwise crash (or overrun) pycocotools when decoded."
    make_image('a.png')
    d = _COCO_OK()
    d['annotations'][0]['segmentation'] = seg
    ann = tmp_path / 'annotations.json'
    ann.write_text(json.dumps(d))
    with pytest.raises(ParseError, match=re.escape(str(ann)) + r": annotations\[0\] \(id 1\)\['segmentation'\]" + msg):
        COCOParser(ann, tmp_path / 'images', masks=True).parse()


def test_coco_duplicate_image_id(tmp_path, make_image):
    "Two images with one id would both get the annotations of either: refused, naming the id and both files."
    p = _coco(make_image, [{'id': 3, 'file_name': 'a.png'}, {'id': 3, 'file_name': 'b.png'}],
              [{'id': 1, 'image_id': 3, 'category_id': 1, 'bbox': [1, 2, 10, 10]}])
    with pytest.raises(ParseError, match=re.escape(str(p.annotations_file)) +
                       r": image id 3 is used twice, by images\[0\] \('a.png'\) and images\[1\] \('b.png'\)"):
        p.parse()


def test_coco_duplicate_category_id(tmp_path, make_image):
    "Today's parser kept the last name of a repeated category id: the other class silently vanished."
    p = _coco(make_image, [{'id': 1, 'file_name': 'a.png'}], [], cats=[{'id': 1, 'name': 'cat'}, {'id': 1, 'name': 'dog'}])
    with pytest.raises(ParseError, match=r"categories\[1\]: category id 1 is used twice, by 'cat' and 'dog'"):
        p.parse()


def test_coco_background_category_is_class_map_background(tmp_path, make_image):
    "A category named 'background' (exports often have one, id 0) is the class map's id 0; its boxes are reported."
    p = _coco(make_image, [{'id': 1, 'file_name': 'a.png'}],
              [{'id': 1, 'image_id': 1, 'category_id': 0, 'bbox': [1, 2, 10, 10]},
               {'id': 2, 'image_id': 1, 'category_id': 1, 'bbox': [1, 2, 10, 10]}],
              cats=[{'id': 0, 'name': 'background'}, {'id': 1, 'name': 'cat'}])
    (r,) = parse_fixing(p, unknown_class=1)
    assert p.class_map.vocab == ['background', 'cat'] and p.class_map.source_ids == [1] and r.labels.tolist() == [1]


def test_coco_rle_size_differs_from_image(tmp_path, make_image):
    "An RLE drawn at another size than its image would be stretched onto it: the instance is dropped and reported."
    from pycocotools import mask as mask_utils
    m = np.zeros((32, 24), np.uint8)  # height and width swapped
    m[4:10, 6:16] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle['counts'] = rle['counts'].decode()
    good = mask_utils.encode(np.asfortranarray(m.T.copy()))
    good['counts'] = good['counts'].decode()
    anns = [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [6, 4, 10, 6], 'segmentation': rle, 'iscrowd': 1},
            {'id': 2, 'image_id': 1, 'category_id': 1, 'bbox': [4, 6, 6, 10], 'segmentation': good, 'iscrowd': 1}]
    p = _coco(make_image, [{'id': 1, 'file_name': 'a.png', 'width': 32, 'height': 24}], anns, masks=True)
    (r,) = parse_fixing(p, mask_size_mismatch=1)
    assert len(r) == 1 and r.iscrowd.tolist() == [True]
    assert 'mask 24x32, image 32x24 (annotations[0]' in p.report.fixes['mask_size_mismatch'][0][1]
    # without masks, and without a bbox, the box would come from the misplaced mask: dropped as well
    for a in anns: del a['bbox']
    p = _coco(make_image, [{'id': 1, 'file_name': 'a.png', 'width': 32, 'height': 24}], anns)
    (r,) = parse_fixing(p, mask_size_mismatch=1)
    np.testing.assert_allclose(r.boxes, [[4, 6, 10, 16]])


def test_class_names_that_make_no_class_map(tmp_path, make_image):
    p, txt = _yolo(make_image, '0 0.5 0.5 0.2 0.2\n', names=('cat', 'cat'))
    with pytest.raises(ParseError, match=r"YOLOParser\(.*labels\): the class names cannot make a class map: .*duplicate class names \['cat'\]"):
        p.parse()


@pytest.mark.parametrize('fmt', ['csv', 'yolo'])
def test_not_utf8_after_the_first_8kb(fmt, tmp_path, make_image):
    "A latin-1 byte far into a file: a ParseError naming the file and line, not a bare UnicodeDecodeError."
    if fmt == 'csv':
        lines = ['filename,class,xmin,ymin,xmax,ymax'] + ['a.png,cat,1,2,10,12'] * 600 + ['a.png,caf\xe9,1,2,10,12']
        p = _csv(make_image, '')
        p.csv_file.write_bytes('\n'.join(lines).encode('latin-1'))
        path, line = p.csv_file, 602
    else:
        p, path = _yolo(make_image, '')
        path.write_bytes(('0 0.5 0.5 0.2 0.2\n' * 600 + '1 0.5 0.5 0.2 0.2 # caf\xe9\n').encode('latin-1'))
        line = 601
    assert path.stat().st_size > 8192
    with pytest.raises(ParseError, match=re.escape(str(path)) + f": not a UTF-8 text file: line {line} has the byte b'\\\\xe9'"):
        p.parse()


def test_yolo_class_names_file_not_utf8(tmp_path, make_image):
    (tmp_path / 'classes.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
    with pytest.raises(ParseError, match=re.escape(str(tmp_path / 'classes.txt')) + ': not a UTF-8 text file: line 1'):
        YOLOParser(tmp_path / 'images', tmp_path / 'labels', tmp_path / 'classes.txt')


def test_yolo_two_images_with_one_stem(tmp_path, make_image):
    "a.jpg and a.png would both take labels/a.txt: refused, naming both."
    p, txt = _yolo(make_image, '0 0.5 0.5 0.2 0.2\n')
    make_image('a.jpg', 'jpeg')
    with pytest.raises(ParseError, match=r"images: a.jpg and a.png would both take the label file .*a.txt; "
                                         r"YOLO pairs images and labels by name"):
        p.parse()


# --- VOC: the class-mask folder, mask values and the coordinate convention

def test_voc_segmentation_class_folder_is_refused(samples, tmp_path):
    "Class PNGs hold class ids, not instance indices: every mask would have been empty, with nothing reported."
    voc = samples / 'voc'
    with pytest.raises(ParseError, match=r'SegmentationClass: masks_dir is a SegmentationClass folder.*pass the instance masks folder, SegmentationObject'):
        VOCParser(voc / 'Annotations', voc / 'JPEGImages', masks_dir=voc / 'SegmentationClass')
    # the same PNG in a folder of another name: recognised by its values (VOC class ids 9 and 12 of chair and dog)
    (tmp_path / 'masks').mkdir()
    (tmp_path / 'masks' / '2007_000063.png').write_bytes((voc / 'SegmentationClass' / '2007_000063.png').read_bytes())
    with pytest.raises(ParseError, match=r"masks: no mask PNG here holds one value per object .* 2007_000063.png: it has the values \[9, 12\] "
                                         r"but 2007_000063.xml has 2 <object>s: they are the VOC class ids of \['chair', 'dog'\]"):
        VOCParser(voc / 'Annotations', voc / 'JPEGImages', masks_dir=tmp_path / 'masks').parse()


def _voc_with_mask(tmp_path, make_image, mask_values, n_objects=2, mode='P', size=(32, 24)):
    make_image('a.png')
    (tmp_path / 'ann').mkdir(exist_ok=True)
    objs = ''.join('<object><name>cat</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>'
                   for _ in range(n_objects))
    (tmp_path / 'ann' / 'a.xml').write_text(f'<annotation><filename>a.png</filename>{objs}</annotation>')
    (tmp_path / 'obj').mkdir(exist_ok=True)
    m = np.zeros(size[::-1], np.uint8)
    for i, v in enumerate(mask_values): m[2 + 2*i:4 + 2*i, 2:10] = v
    Image.fromarray(m if mode != 'RGB' else np.stack([m] * 3, -1)).convert(mode).save(tmp_path / 'obj' / 'a.png')
    return VOCParser(tmp_path / 'ann', tmp_path / 'images', masks_dir=tmp_path / 'obj')


def test_voc_mask_values(tmp_path, make_image):
    # object 2 has no pixels: its mask would be empty; dropped and reported
    (r,) = parse_fixing(p := _voc_with_mask(tmp_path, make_image, [1, 255]), missing_mask=1)
    assert len(r) == 1 and "<object> 2 ('cat'): value 2 absent from a.png" in p.report.fixes['missing_mask'][0][1]
    # an empty PNG for an image with objects: refused when it is all there is
    with pytest.raises(ParseError, match=r'a.png: it holds no object \(all pixels 0 or 255\)'):
        _voc_with_mask(tmp_path, make_image, []).parse()
    # an RGB PNG is not a label image: reported as unreadable, not compared per channel
    p = _voc_with_mask(tmp_path, make_image, [1, 2], mode='RGB')
    assert parse_fixing(p, corrupt_image=1) == [] and 'mode RGB' in p.report.fixes['corrupt_image'][0][1]
    # a mask PNG of another size than its image
    p = _voc_with_mask(tmp_path, make_image, [1, 2], size=(64, 48))
    (r,) = parse_fixing(p, mask_size_mismatch=2)
    assert len(r) == 0


def test_voc_mask_values_mixed_folder(tmp_path, make_image):
    "One class-like PNG among instance PNGs: that image is skipped and reported, the others kept."
    p = _voc_with_mask(tmp_path, make_image, [1, 2])
    make_image('b.png')
    (tmp_path / 'ann' / 'b.xml').write_text((tmp_path / 'ann' / 'a.xml').read_text().replace('a.png', 'b.png'))
    m = np.zeros((24, 32), np.uint8); m[2:6, 2:6] = 15
    Image.fromarray(m).save(tmp_path / 'obj' / 'b.png')
    records = parse_fixing(p, missing_mask=1)
    assert [r.filepath.name for r in records] == ['a.png']
    assert 'values [15] of b.png are not objects of the XML (2 <object>s)' in p.report.fixes['missing_mask'][0][1]


def test_voc_and_csv_coordinate_conventions(tmp_path, make_image):
    "The same numbers give different boxes as VOC (1-based) and CSV (as written) by default; `one_based` switches either."
    make_image('a.png')
    (tmp_path / 'ann').mkdir()
    (tmp_path / 'ann' / 'a.xml').write_text('<annotation><filename>a.png</filename><object><name>cat</name><bndbox><xmin>3</xmin>'
                                            '<ymin>4</ymin><xmax>20</xmax><ymax>15</ymax></bndbox></object></annotation>')
    (tmp_path / 'xyxy.csv').write_text('filename,class,xmin,ymin,xmax,ymax\na.png,cat,3,4,20,15\n')
    (tmp_path / 'xywh.csv').write_text('filename,class,x,y,w,h\na.png,cat,3,4,18,12\n')  # 1-based inclusive: 3..20, 4..15
    voc = lambda **kw: parse_clean(VOCParser(tmp_path / 'ann', tmp_path / 'images', **kw))[0].boxes
    csv_ = lambda f, **kw: parse_clean(CSVParser(tmp_path / f, tmp_path / 'images', **kw))[0].boxes
    np.testing.assert_allclose(voc(), [[2, 3, 20, 15]])
    np.testing.assert_allclose(csv_('xyxy.csv'), [[3, 4, 20, 15]])
    np.testing.assert_allclose(voc(one_based=False), csv_('xyxy.csv'))
    np.testing.assert_allclose(csv_('xyxy.csv', one_based=True), voc())
    np.testing.assert_allclose(csv_('xywh.csv', one_based=True), voc())
    np.testing.assert_allclose(csv_('xywh.csv'), [[3, 4, 21, 16]])


# --- VIA: malformed values, checkbox labels, single-class projects, several files

def _via(tmp_path, entries, name='via.json', **kwargs):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return VIAParser(path, tmp_path / 'images', **kwargs)


def _rect(x=1, y=2, w=9, h=10, **attrs):
    return {'shape_attributes': {'name': 'rect', 'x': x, 'y': y, 'width': w, 'height': h}, 'region_attributes': attrs}


@pytest.mark.parametrize('entry, msg', [
    ({'filename': None, 'regions': []}, r"entry 'a.png1'\['filename'\] should be the image's file name .*, got None"),
    ({'filename': 'a.png', 'regions': 'abc'}, r"entry 'a.png1'\['regions'\] should be a list of regions, got 'abc'"),
    ({'filename': 'a.png', 'regions': ['abc']}, r"'a.png' region 0 should be a region: .*, got 'abc'"),
    ({'filename': 'a.png', 'regions': [_rect(label=['cat'])]}, r"'a.png' region 0 attribute 'label' should be a class name.*, got \['cat'\]"),
    ({'filename': 'a.png', 'regions': [_rect(label={'x': 1, 'y': 2})]}, r"'a.png' region 0 attribute 'label' should be a class name.*checkbox.*, got \{'x': 1"),
    ({'filename': 'a.png', 'regions': [{'shape_attributes': ['rect'], 'region_attributes': {'label': 'cat'}}]}, None),
    ({'filename': 'a.png', 'regions': [{'shape_attributes': {'name': 'rect', 'x': None, 'y': 1, 'width': 2, 'height': 2},
                                        'region_attributes': {'label': 'cat'}}]}, r"'a.png' region 0\['x'\] should be 1 numbers, got \[None\]"),
])
def test_via_malformed_values(tmp_path, make_image, entry, msg):
    make_image('a.png')
    p = _via(tmp_path, {'a.png1': entry})
    if msg is None:  # a shape that is not an object: reported as unsupported, not an AttributeError
        parse_fixing(p, unsupported_shape=1)
        return
    with pytest.raises(ParseError, match=re.escape(str(p.annotations_file)) + ': ' + msg):
        p.parse()


def test_via_checkbox_label(tmp_path, make_image):
    "A checkbox attribute gives the class of its one ticked option; several ticked is ambiguous: dropped and reported."
    make_image('a.png')
    p = _via(tmp_path, {'a.png1': {'filename': 'a.png', 'regions': [
        _rect(label={'cat': True, 'dog': False}), _rect(label={'cat': True, 'dog': True}), _rect(label={'cat': False})]}})
    (r,) = parse_fixing(p, ambiguous_label=1, missing_label=1)
    assert p.class_map.classes == ['cat'] and len(r) == 1
    assert "'label' has ['cat', 'dog'] ticked ('a.png' region 1)" in p.report.fixes['ambiguous_label'][0][1]


def test_via_single_class_project(tmp_path, make_image):
    "The balloon-style layout: regions without attributes. class_name= makes every region that class."
    make_image('a.png')
    make_image('b.png')
    entries = {'a.png1': {'filename': 'a.png', 'regions': [_rect(), _rect(3, 3, 5, 5)]},
               'b.png1': {'filename': 'b.png', 'regions': {'0': _rect()}}}  # VIA 1 dict
    with pytest.raises(ParseError, match=re.escape(str(tmp_path / 'via.json')) + r": no region has the attribute 'label' \(the regions have no "
                       r"attributes at all\); for a single-class project pass class_name='NAME' \(CLI: --class-name NAME\)$"):
        _via(tmp_path, entries).parse()
    p = _via(tmp_path, entries, class_name='balloon')
    records = parse_clean(p)
    assert p.class_map.classes == ['balloon'] and [len(r) for r in records] == [2, 1]
    # attributes other than the label: listed in the message; with class_name= they are not read
    entries['a.png1']['regions'][0]['region_attributes'] = {'type': 'red', 'size': {'big': True}}
    with pytest.raises(ParseError, match=r"\(the attributes are \['size', 'type'\]\); .*--class-name NAME\), else label_attr= one of \['size', 'type'\]"):
        _via(tmp_path, entries).parse()
    assert len(parse_clean(_via(tmp_path, entries, class_name='balloon'))[0]) == 2
    with pytest.raises(ValueError, match='pass label_attr= .* or class_name='):
        _via(tmp_path, entries, label_attr=None)


def test_via_several_files_and_a_folder(samples, tmp_path, make_image):
    "A project saved in parts: a list of files or their folder; entries of one image merged, a repeated region kept once."
    make_image('a.png')
    make_image('b.png')
    ann = tmp_path / 'ann'
    ann.mkdir()
    (ann / 'part1.json').write_text(json.dumps({'a.png1': {'filename': 'a.png', 'regions': [_rect(label='cat')]}}))
    (ann / 'part2.json').write_text(json.dumps({'_via_img_metadata': {  # a project file
        'a.png1': {'filename': 'a.png', 'regions': [_rect(label='cat'), _rect(3, 3, 5, 5, label='dog')]},
        'b.png1': {'filename': 'b.png', 'regions': [_rect(label='dog')]}}}))
    (ann / 'coco.json').write_text(json.dumps({'images': [], 'annotations': [], 'categories': []}))  # not VIA: left out
    for arg in ([ann / 'part1.json', ann / 'part2.json'], ann):
        p = VIAParser(arg, tmp_path / 'images')
        records = by_name(parse_clean(p))
        assert len(records['a.png']) == 2 and len(records['b.png']) == 1
        np.testing.assert_allclose(records['a.png'].boxes, [[1, 2, 10, 12], [3, 3, 8, 8]])
        assert p.report.source == 'VIAParser(part1.json, part2.json)'
        assert str(p.report).startswith('VIAParser(part1.json, part2.json): 2 images, 3 boxes')
    # errors name the file of the region
    (ann / 'part3.json').write_text(json.dumps({'c.png1': {'filename': 'c.png', 'regions': [_rect(label=[1])]}}))
    with pytest.raises(ParseError, match=re.escape(str(ann / 'part3.json')) + r": 'c.png' region 0 \(in part3.json\) attribute 'label'"):
        VIAParser(ann, tmp_path / 'images').parse()
    # a folder without VIA files; the samples' VIA folder holds its file and images
    with pytest.raises(ParseError, match=re.escape(str(tmp_path / 'images')) + r': no VIA JSON export or project in this folder \(no .json file\)'):
        VIAParser(tmp_path / 'images', tmp_path / 'images').parse()
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'coco.json').write_text('{"images": []}')
    with pytest.raises(ParseError, match=r'other: no VIA JSON export or project in this folder \(looked at coco.json\)'):
        VIAParser(tmp_path / 'other', tmp_path / 'images').parse()
    p = VIAParser(samples / 'via', samples / 'via')
    assert sum(len(r) for r in parse_clean(p)) == 10 and p.report.source == 'VIAParser(via_bbox.json)'


def test_csv_class_name(tmp_path, make_image):
    p = _csv(make_image, 'image,x,y,width,height\na.png,1,2,9,10\n', class_name='bottle')
    (r,) = parse_clean(p)
    assert p.class_map.classes == ['bottle'] and r.labels.tolist() == [1]
    p = _csv(make_image, 'filename,class,xmin,ymin,xmax,ymax\na.png,cat,1,2,10,12\na.png,dog,1,2,10,12\n', class_name='animal')
    (r,) = parse_clean(p)
    assert p.class_map.classes == ['animal'] and len(r) == 2


def test_coco_area_too_large_for_a_float_is_a_parse_error(tmp_path):
    "An 'area' integer beyond float range (found by the fuzz test) is refused with a ParseError, not an OverflowError."
    import json
    from icefast.parsers import COCOParser, ParseError
    (tmp_path/'images').mkdir()
    f = tmp_path/'a.json'
    f.write_text(json.dumps({'images': [{'id': 1, 'file_name': 'a.png', 'width': 32, 'height': 24}],
                             'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [1, 1, 5, 5], 'area': 10**400, 'iscrowd': 0}],
                             'categories': [{'id': 1, 'name': 'x'}]}))
    with pytest.raises(ParseError, match="area"): COCOParser(f, tmp_path/'images', verify_images=False).parse()
