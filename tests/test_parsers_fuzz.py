"""Property tests of `icefast.parsers` (hypothesis): every parser, fed structurally plausible but malformed input
(wrong types, null, lists, dicts, text, NaN, huge numbers in every field; files that are not UTF-8), either returns
sound records or raises `ParseError` -- never a bare TypeError, KeyError, AttributeError, UnicodeDecodeError, ...
Bounded: a few dozen examples per parser, on two tiny images, `verify_images=False`; the file runs in seconds."""
import json, shutil, warnings
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from icefast.core import Record
from icefast.parsers import COCOParser, CSVParser, ParseError, VIAParser, VOCParser, YOLOParser

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
IMAGES = {'a.png': (32, 24), 'b.jpg': (20, 16)}  # name: (width, height)
MISSING = object()  # a key left out

# values of the wrong kind, for any field
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(['', ' ', 'nan', '1e999', '-1', '0', 'a.png', 'x' * 300, '\x00']),
    st.text(max_size=6), st.lists(st.one_of(st.integers(-3, 40), st.none(), st.text(max_size=2)), max_size=5),
    st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), st.booleans(), st.none()), max_size=3),
    st.just(MISSING))


class Mutator:
    "`m(valid)`: the valid value, or (at the example's rate: 0, 3, 10 or 30 in 100) a malformed one."
    def __init__(self, draw):
        self.draw, self.rate = draw, draw(st.sampled_from([0, 3, 10, 30]))
    def __call__(self, valid, bad=junk):
        return self.draw(bad) if self.draw(st.integers(0, 99)) < self.rate else valid


def clean(d):
    "Drop the keys whose value is MISSING (recursively)."
    if isinstance(d, dict): return {k: clean(v) for k, v in d.items() if v is not MISSING}
    if isinstance(d, list): return [clean(v) for v in d if v is not MISSING]
    return d


encodings = st.sampled_from(['utf-8'] * 6 + ['utf-8-sig', 'bad-early', 'bad-late'])


def encode(text, how):
    "`text` as bytes: UTF-8, with a BOM, or with a byte that is not UTF-8 near the start or past 8 KB."
    data = text.encode('utf-8-sig' if how == 'utf-8-sig' else 'utf-8')
    if how == 'bad-early': data = data[:5] + b'\xe9' + data[5:]
    if how == 'bad-late': data = data + b' ' * 9000 + b'\xff\xfe'
    return data


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    "A folder with images/a.png (32x24) and images/b.jpg (20x16)."
    root = tmp_path_factory.mktemp('fuzz')
    (root / 'images').mkdir()
    for name, (w, h) in IMAGES.items():
        Image.new('RGB', (w, h), (90, 120, 150)).save(root / 'images' / name)
    return root


def fresh(root, name):
    "An empty folder `name` under root (emptied between examples)."
    d = root / name
    if d.exists(): shutil.rmtree(d)
    d.mkdir()
    return d


def check(parser, masks=False):
    "Parse: ParseError is fine; otherwise every record must be sound (finite boxes inside the image, known labels)."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try: records = parser.parse()
        except ParseError as e:
            assert str(e)  # a message
            event('ParseError')
            return None
        event(f"records ({'with' if sum(len(r) for r in records) else 'without'} boxes)")
        n_classes = len(parser.class_map)
        for r in records:
            assert isinstance(r, Record) and (r.width, r.height) == IMAGES[r.filepath.name]
            b = r.boxes
            assert b.shape == (len(r), 4) and np.isfinite(b).all(), b
            assert (b >= 0).all() and (b[:, [0, 2]] <= r.width).all() and (b[:, [1, 3]] <= r.height).all(), b
            assert ((b[:, 2:] - b[:, :2]) >= parser.min_box_size - 1e-4).all(), b
            assert ((r.labels >= 1) & (r.labels < n_classes)).all(), r.labels
            assert len(r.areas) == len(r) and np.isfinite(r.areas).all() or len(r) == 0
            if masks:
                m = r.mask_array()
                assert m.shape == (len(r), r.height, r.width)
    assert parser.report.n_images == len(records)
    return records


# ---------------------------------------------------------------------------------------------------------------
# COCO

def _rle(counts_kind):
    from pycocotools import mask as mask_utils
    m = np.zeros((24, 32), np.uint8)
    m[3:9, 4:20] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    if counts_kind == 'string': return {'counts': rle['counts'].decode(), 'size': [24, 32]}
    flat = m.ravel(order='F')
    runs, v, n = [], 0, 0
    for x in flat:
        if x == v: n += 1
        else: runs.append(n); v, n = x, 1
    return {'counts': runs + [n], 'size': [24, 32]}


segmentations = st.one_of(
    st.lists(st.lists(st.one_of(st.just(3.0), junk), max_size=8), max_size=2),
    st.sampled_from(['string', 'list']).map(_rle),
    st.fixed_dictionaries({'counts': st.one_of(st.text(max_size=12), st.lists(st.integers(-5, 800), max_size=4), junk),
                           'size': st.one_of(st.just([24, 32]), st.just([32, 24]), st.lists(junk, max_size=3), junk)}),
    junk)


@st.composite
def coco_files(draw):
    f = Mutator(draw)
    images = [{'id': f(i + 1), 'file_name': f(name), 'width': f(w), 'height': f(h)}
              for i, (name, (w, h)) in enumerate(IMAGES.items())]
    anns = []
    for i in range(draw(st.integers(0, 4))):
        anns.append({'id': f(i + 1), 'image_id': f(draw(st.sampled_from([1, 2, 3]))),
                     'category_id': f(draw(st.sampled_from([1, 2, 7]))),
                     'bbox': f([1, 2, 10, 8], st.one_of(st.lists(junk, min_size=3, max_size=5), junk)),
                     'segmentation': draw(st.one_of(st.just(MISSING), st.just([[2, 2, 12, 2, 12, 8, 2, 8]]), segmentations)),
                     'area': f(80.0), 'iscrowd': f(draw(st.sampled_from([0, 1])))})
    cats = [{'id': f(1), 'name': f('cat')}, {'id': f(2), 'name': f(draw(st.sampled_from(['dog', 'background', 'cat'])))}]
    d = {'images': images, 'annotations': anns, 'categories': cats}
    for k in list(d):
        d[k] = f(d[k], junk)
    d = clean(d)
    return encode(json.dumps(d), draw(encodings)), draw(st.booleans())


@FUZZ
@given(coco_files())
def test_coco_fuzz(root, data):
    text, masks = data
    path = root / 'coco.json'
    path.write_bytes(text)
    check(COCOParser(path, root / 'images', masks=masks, verify_images=False), masks=masks)


# ---------------------------------------------------------------------------------------------------------------
# VOC

xml_values = st.one_of(st.sampled_from(['3', '12.5', '20', '0', '-4', 'nan', 'inf', '1e400', '', 'abc', '99999']), st.text(max_size=5))


@st.composite
def voc_sets(draw):
    files, m = {}, Mutator(draw)
    for name, (w, h) in IMAGES.items():
        def el(tag, valid):
            v = m(valid, st.one_of(xml_values, st.just(None)))
            return '' if v is None else f'<{tag}>{escape(v)}</{tag}>'
        objs = ''.join(f"<object>{el('name', draw(st.sampled_from(['cat', 'dog'])))}<bndbox>{el('xmin', '3')}{el('ymin', '2')}"
                       f"{el('xmax', '15')}{el('ymax', '12')}</bndbox></object>" for _ in range(draw(st.integers(0, 3))))
        size = f"<size>{el('width', str(w))}{el('height', str(h))}</size>" if draw(st.booleans()) else ''
        xml = f"<annotation>{el('filename', name)}{size}{objs}</annotation>"
        if m(False, st.just(True)): xml = xml[:draw(st.integers(0, len(xml)))]  # cut short
        files[Path(name).stem + '.xml'] = encode(xml, draw(encodings))
    masks = draw(st.one_of(st.none(), st.fixed_dictionaries({n: st.sampled_from(['instance', 'class', 'empty', 'rgb', 'big', 'text', None])
                                                             for n in IMAGES})))
    return files, masks, draw(st.booleans())


def _write_mask(path, kind, size):
    w, h = size
    m = np.zeros((h, w), np.uint8)
    m[2:6, 2:8], m[8:12, 3:9] = 1, (2 if kind != 'class' else 15)
    if kind == 'empty': m[:] = 0
    if kind == 'rgb': Image.fromarray(np.stack([m] * 3, -1)).save(path)
    elif kind == 'big': Image.fromarray(np.kron(m, np.ones((2, 2), np.uint8))).save(path)
    elif kind == 'text': path.write_text('not a png')
    else: Image.fromarray(m).convert('P').save(path)


@FUZZ
@given(voc_sets())
def test_voc_fuzz(root, data):
    files, masks, one_based = data
    ann = fresh(root, 'voc_ann')
    for name, text in files.items(): (ann / name).write_bytes(text)
    masks_dir = None
    if masks is not None:
        masks_dir = fresh(root, 'voc_masks')
        for name, kind in masks.items():
            if kind: _write_mask(masks_dir / (Path(name).stem + '.png'), kind, IMAGES[name])
    check(VOCParser(ann, root / 'images', masks_dir=masks_dir, one_based=one_based, verify_images=False), masks=masks_dir is not None)


# ---------------------------------------------------------------------------------------------------------------
# VIA

@st.composite
def via_regions(draw, f):
    kind = f(draw(st.sampled_from(['rect', 'polygon', 'circle', 'ellipse', 'point', 'polyline'])))
    shape = {'name': kind, 'x': f(2), 'y': f(3), 'width': f(9), 'height': f(7),
             'cx': f(10), 'cy': f(8), 'r': f(4), 'rx': f(5), 'ry': f(3),
             'all_points_x': f([1, 10, 10], st.lists(st.one_of(st.just(5), junk), max_size=4)),
             'all_points_y': f([2, 2, 12], st.lists(st.one_of(st.just(5), junk), max_size=4))}
    label = f(draw(st.sampled_from(['cat', 'dog', ''])), st.one_of(st.just({'cat': True, 'dog': False}), st.just({'cat': True, 'dog': True}), junk))
    attrs = f({'label': label}, st.one_of(st.just({'type': label}), st.just({}), junk))
    region = {'shape_attributes': f(shape), 'region_attributes': attrs}
    return clean(f(region))


@st.composite
def via_sets(draw):
    parts, f = [], Mutator(draw)
    for _ in range(draw(st.integers(1, 2))):
        entries = {}
        for name in draw(st.lists(st.sampled_from(list(IMAGES)), max_size=2)):
            regions = draw(st.lists(via_regions(f), max_size=3))
            if draw(st.booleans()): regions = {str(i): r for i, r in enumerate(regions)}  # VIA 1
            entries[f'{name}123'] = clean({'filename': f(name), 'size': 123, 'regions': f(regions),
                                           'file_attributes': {}})
        d = {'_via_img_metadata': entries} if draw(st.booleans()) else entries
        d = f(d, junk.filter(lambda v: v is not MISSING))
        parts.append(encode(json.dumps(clean(d)), draw(encodings)))
    how = draw(st.sampled_from(['file', 'list', 'folder']))
    kwargs = draw(st.sampled_from([{}, {'class_name': 'balloon'}, {'label_attr': 'type'}, {'masks': True}]))
    return parts, how, kwargs


@FUZZ
@given(via_sets())
def test_via_fuzz(root, data):
    parts, how, kwargs = data
    d = fresh(root, 'via')
    paths = []
    for i, text in enumerate(parts):
        paths.append(d / f'part{i}.json')
        paths[-1].write_bytes(text)
    arg = paths[0] if how == 'file' else (paths if how == 'list' else d)
    check(VIAParser(arg, root / 'images', verify_images=False, **kwargs), masks=kwargs.get('masks', False))


# ---------------------------------------------------------------------------------------------------------------
# CSV

cells = st.one_of(st.sampled_from(['a.png', 'b.jpg', 'cat', 'dog', '1', '2.5', '10', '15', '', 'nan', 'inf', '-3', '1e400', '"', 'x,y',
                                   '"q""uoted"', 'missing.png']), st.text(max_size=4))
headers = st.sampled_from(['filename,class,xmin,ymin,xmax,ymax', 'image,x,y,width,height', 'file,label,x1,y1,x2,y2',
                           'filename,class,a,b,c,d', 'filename,xmin,ymin,xmax,ymax', ''])


@st.composite
def csv_files(draw):
    m = Mutator(draw)
    header = m(draw(headers), st.text(max_size=12))
    rows = [','.join(draw(st.lists(cells, min_size=4, max_size=7))) for _ in range(m(0, st.integers(1, 5)))]
    good = ['a.png,cat,1,2,10,12', 'b.jpg,dog,3,4,15,14', 'b.jpg,,,,,']
    rows = draw(st.lists(st.sampled_from(good), max_size=3)) + rows
    sep = draw(st.sampled_from(['\n', '\r\n']))
    return encode(sep.join([header] + draw(st.permutations(rows))) + sep, draw(encodings)), \
        draw(st.sampled_from([{}, {'one_based': True}, {'class_name': 'thing'}]))


@FUZZ
@given(csv_files())
def test_csv_fuzz(root, data):
    text, kwargs = data
    path = root / 'boxes.csv'
    path.write_bytes(text)
    check(CSVParser(path, root / 'images', verify_images=False, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# YOLO

tokens = st.one_of(st.sampled_from(['0', '1', '2', '-1', '0.5', '0.25', '1.5', 'nan', 'inf', '-inf', '1e400', '99999999999999999999', 'cat',
                                    '0x1', '1_0', '٣']), st.text(max_size=3))


@st.composite
def yolo_sets(draw):
    files, m = {}, Mutator(draw)
    for name in IMAGES:
        lines = [m(draw(st.sampled_from(['0 0.5 0.5 0.25 0.5', '1 0.1 0.1 0.6 0.1 0.6 0.6', '1 0.9 0.9 0.4 0.4'])),
                   st.lists(tokens, max_size=8).map(' '.join)) for _ in range(draw(st.integers(0, 4)))]
        if draw(st.booleans()): files[Path(name).stem + '.txt'] = encode('\n'.join(lines) + '\n', draw(encodings))
    if draw(st.integers(0, 8)) == 0: files['orphan.txt'] = b'0 0.5 0.5 0.1 0.1\n'
    return files, draw(st.booleans())


@FUZZ
@given(yolo_sets())
def test_yolo_fuzz(root, data):
    files, masks = data
    labels = fresh(root, 'yolo_labels')
    for name, text in files.items(): (labels / name).write_bytes(text)
    check(YOLOParser(root / 'images', labels, ['cat', 'dog'], masks=masks, verify_images=False), masks=masks)
