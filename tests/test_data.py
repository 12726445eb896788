"""Dataset layouts, preprocessing and the tf.data pipeline on small fixtures written here."""

import dataclasses
import io
import os
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pni_jax import data
from pni_jax.data import images
from pni_jax.data import layouts

RESIZE, CROP = 32, 28


def _cfg(name, root, **kw):
  c = ml_collections.ConfigDict()
  c.name = name
  c.root = str(root)
  c.categories = ()
  c.resize = RESIZE
  c.crop = CROP
  c.batch_size = 2
  c.folder_good = 'good'
  c.resize_mode = 'short_side'
  c.source = 'files'
  c.update(kw)
  return c


def _save(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(array)
  if mode is not None:
    img = img.convert(mode)
  img.save(path)


def _scene(h, w, square, rng):
  """Dark noisy RGB image uint8 [h, w, 3] with a bright square at square=(y0, y1, x0, x1), and the
  matching mask uint8 [h, w] (255 inside)."""
  img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
  mask = np.zeros((h, w), np.uint8)
  if square is not None:
    y0, y1, x0, x1 = square
    img[y0:y1, x0:x1] = 250
    mask[y0:y1, x0:x1] = 255
  return img, mask


H, W = 40, 48                  # non-square: the resize / crop geometry matters
SQUARES = [(8, 20, 10, 24), (20, 34, 26, 40)]


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
  """One small dataset per layout; returns {name: root}."""
  base = tmp_path_factory.mktemp('layouts')
  rng = np.random.default_rng(0)
  out = {}

  # MVTec AD: 3 train (one grayscale), 1 good test, 2 'crack' with masks.
  r = base / 'mvtec'
  for i in range(3):
    img, _ = _scene(H, W, None, rng)
    _save(f'{r}/widget/train/good/{i:03d}.png', img, mode='L' if i == 1 else None)
  _save(f'{r}/widget/test/good/000.png', _scene(H, W, None, rng)[0])
  for i, sq in enumerate(SQUARES):
    img, mask = _scene(H, W, sq, rng)
    _save(f'{r}/widget/test/crack/{i:03d}.png', img)
    _save(f'{r}/widget/ground_truth/crack/{i:03d}_mask.png', mask)
  _save(f'{r}/gadget/train/good/000.png', _scene(H, W, None, rng)[0])
  (r / 'license.txt').write_text('not a category')
  out['mvtec'] = r

  # VisA: split_csv/1cls.csv, JPG images, masks holding small class ids (not 255).
  r = base / 'visa'
  rows = ['object,split,label,image,mask']
  for i in range(3):
    p = f'candle/Data/Images/Normal/{i:04d}.JPG'
    _save(f'{r}/{p}', _scene(H, W, None, rng)[0])
    rows.append(f'candle,{"train" if i < 2 else "test"},normal,{p},')
  for i, sq in enumerate(SQUARES):
    img, mask = _scene(H, W, sq, rng)
    p, m = f'candle/Data/Images/Anomaly/{i:03d}.JPG', f'candle/Data/Masks/Anomaly/{i:03d}.png'
    _save(f'{r}/{p}', img)
    _save(f'{r}/{m}', (mask > 0).astype(np.uint8) * (i + 1))
    rows.append(f'candle,test,anomaly,{p},{m}')
  p = 'pcb1/Data/Images/Normal/0000.JPG'
  _save(f'{r}/{p}', _scene(H, W, None, rng)[0])
  rows.append(f'pcb1,train,normal,{p},')
  os.makedirs(r / 'split_csv')
  (r / 'split_csv' / '1cls.csv').write_text('\n'.join(rows) + '\n')
  out['visa'] = r

  # BTAD: '01' bmp images + png masks, '03' bmp images + bmp masks.
  r = base / 'btad'
  for cat, mext in (('01', 'png'), ('03', 'bmp')):
    for i in range(2):
      _save(f'{r}/{cat}/train/ok/{i:03d}.bmp', _scene(H, W, None, rng)[0])
    _save(f'{r}/{cat}/test/ok/000.bmp', _scene(H, W, None, rng)[0])
    img, mask = _scene(H, W, SQUARES[0], rng)
    _save(f'{r}/{cat}/test/ko/000.bmp', img)
    _save(f'{r}/{cat}/ground_truth/ko/000.{mext}', mask)
  out['btad'] = r

  # folder: masks/ mirror of test/ (one mask named <stem>_mask), a second category without masks.
  r = base / 'folder'
  for cat in ('parts', 'nomask'):
    for i in range(2):
      _save(f'{r}/{cat}/train/good/{i:03d}.png', _scene(H, W, None, rng)[0])
    _save(f'{r}/{cat}/test/good/a.png', _scene(H, W, None, rng)[0])
    for i, sq in enumerate(SQUARES):
      img, mask = _scene(H, W, sq, rng)
      _save(f'{r}/{cat}/test/dent/b{i}.png', img)
      if cat == 'parts':
        _save(f'{r}/{cat}/masks/dent/b{i}{"_mask" if i else ""}.png', mask)
  out['folder'] = r
  return out


EXPECTED = {  # name: (category, train count, test labels in split order, defect types)
    'mvtec': ('widget', 3, [1, 1, 0], ('crack', 'crack', 'good')),
    'visa': ('candle', 2, [1, 1, 0], ('anomaly', 'anomaly', 'good')),
    'btad': ('01', 2, [1, 0], ('ko', 'good')),
    'folder': ('parts', 2, [1, 1, 0], ('dent', 'dent', 'good')),
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_layout_counts_labels(roots, name):
  cfg = _cfg(name, roots[name])
  cat, n_train, test_labels, types = EXPECTED[name]
  train = data.load_split(cfg, cat, 'train')
  test = data.load_split(cfg, cat, 'test')
  assert len(train) == n_train and train.labels.dtype == np.int32
  assert train.labels.tolist() == [0] * n_train
  assert all(m is None for m in train.mask_paths)
  assert test.labels.tolist() == test_labels
  assert test.defect_types == types
  assert test.has_masks and test.num_defective == sum(test_labels)
  for p, m, l in zip(test.paths, test.mask_paths, test.labels):
    assert os.path.isfile(p)
    assert (m is not None) == bool(l)


def test_list_categories(roots):
  assert data.list_categories(_cfg('mvtec', roots['mvtec'])) == ['gadget', 'widget']
  assert data.list_categories(_cfg('visa', roots['visa'])) == ['candle', 'pcb1']
  assert data.list_categories(_cfg('btad', roots['btad'])) == ['01', '03']
  assert data.list_categories(_cfg('folder', roots['folder'])) == ['nomask', 'parts']
  assert data.list_categories(_cfg('mvtec', roots['mvtec'], categories=('widget',))) == ['widget']
  plain = types.SimpleNamespace(name='mvtec', root=str(roots['mvtec']), categories='widget,gadget')
  assert data.list_categories(plain) == ['widget', 'gadget']


def test_btad_bmp_masks(roots):
  test = data.load_split(_cfg('btad', roots['btad']), '03', 'test')
  assert test.paths[0].endswith('ko/000.bmp') and test.mask_paths[0].endswith('ko/000.bmp')


def test_category_group():
  assert data.category_group('mvtec', 'carpet') == 'texture'
  assert data.category_group('mvtec', 'bottle') == 'object'
  assert data.category_group('visa', 'pcb3') == 'complex structure'
  assert data.category_group('visa', 'macaroni2') == 'multiple instances'
  assert data.category_group('visa', 'pipe_fryum') == 'single instance'
  assert data.category_group('generated', 'granite') == 'texture'
  assert data.category_group('generated', 'weave') == 'texture'
  assert data.category_group('generated', 'tokens') == 'object'
  assert data.category_group('btad', '02') == 'object'
  assert data.category_group('folder', 'x') == 'object'
  with pytest.raises(ValueError, match='imagenet'):
    data.category_group('imagenet', 'x')


def test_texture_categories_from_the_config():
  from pni_jax import config as config_lib
  cfg = config_lib.base_config().data          # texture_categories None: the dataset's own
  assert cfg.texture_categories is None
  assert data.texture_categories(cfg) == layouts.MVTEC_TEXTURES
  assert data.category_group(cfg, 'wood') == 'texture'
  cfg.name = 'generated'
  assert [data.category_group(cfg, c) for c in ('weave', 'granite', 'cable')] == [
      'texture', 'texture', 'object']
  cfg.name = 'folder'
  assert data.category_group(cfg, 'fabric') == 'object'
  cfg.texture_categories = ('fabric', 'stone')
  assert [data.category_group(cfg, c) for c in ('fabric', 'stone', 'bolt')] == [
      'texture', 'texture', 'object']
  cfg.name = 'btad'
  cfg.texture_categories = ('02,03',)          # as the command line delivers it
  assert [data.category_group(cfg, c) for c in ('01', '02', '03')] == [
      'object', 'texture', 'texture']
  cfg.name = 'visa'
  cfg.texture_categories = ('pcb1',)
  assert data.category_group(cfg, 'pcb1') == 'texture'
  assert data.category_group(cfg, 'pcb2') == 'complex structure'
  cfg.name = 'mvtec'
  cfg.texture_categories = ()                  # explicitly none
  assert data.category_group(cfg, 'carpet') == 'object'


def test_generated_names_agree():
  from pni_jax.data import generated
  assert layouts.GENERATED_TEXTURES == generated.TEXTURES
  assert [layouts.VISA_GROUPS[c] for c in ('candle', 'cashew', 'pcb1')] == [
      'multiple instances', 'single instance', 'complex structure']


# ------------------------------------------------------------------------------ pipeline


def _expected_square(square, mode, h=H, w=W):
  """Bright-square mask after resize (`mode`) + center crop CROP, by geometry."""
  box = images.crop_box(h, w, RESIZE, CROP, mode)
  sy, sx = box.resized_h / h, box.resized_w / w
  y0, y1, x0, x1 = square
  out = np.zeros((CROP, CROP), bool)
  yc = (np.arange(CROP) + box.crop_top + 0.5) / sy   # pixel centres in original coordinates
  xc = (np.arange(CROP) + box.crop_left + 0.5) / sx
  out[np.ix_((yc >= y0) & (yc < y1), (xc >= x0) & (xc < x1))] = True
  return out


@pytest.mark.parametrize('mode', ['square', 'short_side'])
@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_pipeline_shapes_and_mask_alignment(roots, name, mode):
  cfg = _cfg(name, roots[name], resize_mode=mode)
  cat = EXPECTED[name][0]
  test = data.load_split(cfg, cat, 'test')
  batches = list(data.iterate_numpy(data.make_dataset(test, cfg)))
  n = len(test)
  assert [len(b['label']) for b in batches] == [2] * (n // 2) + [1] * (n % 2)
  img = np.concatenate([b['image'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  label = np.concatenate([b['label'] for b in batches])
  assert img.shape == (len(test), CROP, CROP, 3) and img.dtype == np.float32
  assert mask.shape == (len(test), CROP, CROP) and mask.dtype == np.float32
  assert index.dtype == np.int32 and label.dtype == np.int32
  assert index.tolist() == list(range(len(test)))
  assert label.tolist() == test.labels.tolist()
  assert 0.0 <= img.min() and img.max() <= 1.0
  assert set(np.unique(mask)) <= {0.0, 1.0}
  for i in range(len(test)):
    if not label[i]:
      assert mask[i].sum() == 0
      continue
    stem = os.path.splitext(os.path.basename(test.paths[i]))[0]
    square = SQUARES[int(stem[-1])]
    expected = _expected_square(square, mode)
    m = mask[i] > 0.5
    # nearest-neighbour mask: at most one pixel row or column off at the square's edges
    assert (m ^ expected).sum() <= CROP, (m ^ expected).sum()
    assert (m & expected).sum() / (m | expected).sum() > 0.9
    bright = img[i].mean(-1)
    assert bright[m].mean() > 0.8 and bright[~m].mean() < 0.35


def test_pipeline_grayscale_train_image(roots):
  cfg = _cfg('mvtec', roots['mvtec'])
  train = data.load_split(cfg, 'widget', 'train')
  batch = next(data.iterate_numpy(data.make_dataset(train, cfg, with_masks=False)))
  assert 'mask' not in batch
  gray = batch['image'][1]
  assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize('mode', ['square', 'short_side'])
def test_pipeline_matches_numpy_preprocessing_exactly(roots, mode):
  """In-graph decoding + resampling == images.preprocess(images.load_image(...)) bit for bit
  (JPEG here: VisA's images)."""
  cfg = _cfg('visa', roots['visa'], resize_mode=mode)
  test = data.load_split(cfg, 'candle', 'test')
  batches = list(data.iterate_numpy(data.make_dataset(test, cfg, batch_size=3)))
  assert sum(len(b['index']) for b in batches) == len(test)
  for b in batches:
    for img, mask, i in zip(b['image'], b['mask'], b['index']):
      ref = images.preprocess(images.load_image(test.paths[i]), RESIZE, CROP, mode=mode)
      np.testing.assert_array_equal(img, ref)
      if test.mask_paths[i]:
        ref_m = images.preprocess_mask(images.load_mask(test.mask_paths[i]), RESIZE, CROP,
                                       mode=mode)
        np.testing.assert_array_equal(mask, ref_m)


@pytest.mark.parametrize('name', ['visa', 'btad'])
def test_batches_without_tensorflow_equal_the_pipeline(roots, name):
  """`data.batches` falls back to image-by-image decoding without TensorFlow (an accelerator
  image with jax only): the same arrays, batch by batch."""
  from pni_jax.data import splits
  cfg = _cfg(name, roots[name])
  test = data.load_split(cfg, EXPECTED[name][0], 'test')
  graph = list(data.iterate_numpy(data.make_dataset(test, cfg)))
  plain = list(splits.numpy_batches(test, cfg, with_masks=True))
  assert len(graph) == len(plain)
  for a, b in zip(graph, plain):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _kinds(rng, h, w):
  """{file name: (PIL image, save kwargs)}: the colour types and formats a dataset may hold."""
  rgb = rng.integers(0, 256, (h, w, 3), np.uint8)
  gray16 = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
  return {
      'rgb.png': (Image.fromarray(rgb), {}), 'l.png': (Image.fromarray(rgb).convert('L'), {}),
      'p.png': (Image.fromarray(rgb).convert('P'), {}),
      'ptrns.png': (Image.fromarray(rgb).convert('P'), {'transparency': 3}),
      'rgba.png': (Image.fromarray(rgb).convert('RGBA'), {}),
      'la.png': (Image.fromarray(rgb).convert('LA'), {}),
      'bits.png': (Image.fromarray(rgb).convert('1'), {}),
      'g16.png': (gray16, {}),
      'q95.jpg': (Image.fromarray(rgb), {'quality': 95, 'subsampling': 2}),
      'q75.jpg': (Image.fromarray(rgb), {'quality': 75, 'subsampling': 0}),
      'prog.jpg': (Image.fromarray(rgb), {'progressive': True}),
      'gray.jpg': (Image.fromarray(rgb).convert('L'), {}),
      'cmyk.jpg': (Image.fromarray(rgb).convert('CMYK'), {}),
      'rgb.bmp': (Image.fromarray(rgb), {}), 'p.bmp': (Image.fromarray(rgb).convert('P'), {}),
      'l.bmp': (Image.fromarray(rgb).convert('L'), {}),
      'rgb.tif': (Image.fromarray(rgb), {}),
  }


def test_graph_decoding_equals_the_shared_decoder(tmp_path):
  """Every kind: the codec rule picks the graph only where TF's decoding equals PIL's exactly
  (JPEG with dct_method='INTEGER_ACCURATE'); the others take the shared Python decoder."""
  import tensorflow as tf
  from pni_jax.data import pipeline
  rng = np.random.default_rng(3)
  graph_kinds = set()
  for name, (img, kw) in _kinds(rng, 23, 37).items():
    path = str(tmp_path / name)
    img.save(path, **kw)
    for what in ('image', 'mask'):
      codec = pipeline.graph_codec(path, what)
      if codec == pipeline.PYTHON:
        continue
      graph_kinds.add((what, name))
      got = pipeline._decode_file(tf.constant(path), tf.constant(codec), what).numpy()
      want = images.load_image(path) if what == 'image' else images.load_mask(path)
      np.testing.assert_array_equal(got, want, err_msg=f'{what} {name}')
  assert ('image', 'q95.jpg') in graph_kinds and ('image', 'rgb.bmp') in graph_kinds
  assert ('image', 'p.png') in graph_kinds and ('mask', 'l.png') in graph_kinds
  for kind in ('g16.png', 'cmyk.jpg', 'p.bmp', 'rgb.tif'):
    assert ('image', kind) not in graph_kinds, kind
  assert ('mask', 'p.png') not in graph_kinds    # palette masks: indices, not colours


def test_pipeline_all_kinds_of_files(tmp_path):
  """Graph-decoded and Python-decoded files in one split give the numpy preprocessing exactly."""
  rng = np.random.default_rng(4)
  for name, (img, kw) in _kinds(rng, H, W).items():
    os.makedirs(tmp_path / 'k' / 'train' / 'good', exist_ok=True)
    img.save(tmp_path / 'k' / 'train' / 'good' / name, **kw)
  cfg = _cfg('mvtec', tmp_path, resize_mode='square')
  train = data.load_split(cfg, 'k', 'train')
  batches = list(data.iterate_numpy(data.make_dataset(train, cfg, with_masks=False)))
  got = np.concatenate([b['image'] for b in batches])
  want = np.stack([images.preprocess(images.load_image(p), RESIZE, CROP, mode='square')
                   for p in train.paths])
  np.testing.assert_array_equal(got, want)


def test_pipeline_shuffle_and_remainder(roots):
  cfg = _cfg('mvtec', roots['mvtec'])
  test = data.load_split(cfg, 'widget', 'test')

  def order(**kw):
    ds = data.make_dataset(test, cfg, with_masks=False, batch_size=1, **kw)
    return [int(b['index'][0]) for b in data.iterate_numpy(ds)]

  assert order() == [0, 1, 2]
  orders = {tuple(order(shuffle=True, seed=s)) for s in range(6)}
  assert all(sorted(o) == [0, 1, 2] for o in orders) and len(orders) > 1
  assert order(shuffle=True, seed=3) == np.random.default_rng(3).permutation(3).tolist()
  ds = data.make_dataset(test, cfg, with_masks=False, batch_size=2, drop_remainder=True)
  assert [len(b['label']) for b in data.iterate_numpy(ds)] == [2]


# ------------------------------------------------------------------------------ single images


def test_load_image_modes(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
  Image.fromarray(rgb).convert('L').save(tmp_path / 'l.png')
  rgba = np.concatenate([rgb, np.full((6, 5, 1), 7, np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / 'rgba.png')
  g16 = np.array([[0, 257, 32896, 65535]], np.uint16)
  Image.fromarray(g16).save(tmp_path / 'g16.png')
  Image.fromarray(rgb).save(tmp_path / 'x.bmp')

  gray = data.load_image(str(tmp_path / 'l.png'))
  assert gray.shape == (6, 5, 3) and gray.dtype == np.uint8
  assert np.array_equal(gray[..., 0], np.asarray(Image.fromarray(rgb).convert('L')))
  assert np.array_equal(data.load_image(str(tmp_path / 'rgba.png')), rgb)
  assert data.load_image(str(tmp_path / 'g16.png'))[0, :, 0].tolist() == [0, 1, 128, 255]
  assert np.array_equal(data.load_image(str(tmp_path / 'x.bmp')), rgb)


def test_crop_box_numbers():
  box = data.crop_box(100, 200, 50, 40, 'short_side')
  assert (box.resized_h, box.resized_w, box.crop_top, box.crop_left) == (50, 100, 5, 30)
  assert (box.top, box.left, box.height, box.width) == (10.0, 60.0, 80.0, 80.0)
  box = data.crop_box(90, 60, 40, 40, 'short_side')   # portrait: 60 -> 40, 90 -> int(60) = 60
  assert (box.resized_h, box.resized_w, box.crop_top, box.crop_left) == (60, 40, 10, 0)
  with pytest.raises(ValueError, match='data.crop=41'):
    data.crop_box(90, 60, 40, 41, 'short_side')
  box = data.crop_box(100, 200, 50, 40, 'square')
  assert (box.resized_h, box.resized_w, box.crop_top, box.crop_left) == (50, 50, 5, 5)
  assert (box.top, box.left, box.height, box.width) == (10.0, 20.0, 80.0, 160.0)
  with pytest.raises(ValueError, match='resize_mode'):
    data.crop_box(100, 200, 50, 40, 'stretch')


def test_resampling_filter_against_pillow_and_by_hand():
  """The taps: rows sum to 1, identity at equal size, 2:1 shrink = mean of 4 pixels around the
  centre with triangle weights; within one grey level of Pillow's BILINEAR (which rounds to
  uint8 twice)."""
  idx, w = images.bilinear_taps(7, 7)
  assert np.allclose(w.sum(1), 1) and np.array_equal(idx[np.arange(7), w.argmax(1)], np.arange(7))
  assert np.array_equal(w.max(1), np.ones(7, np.float32))
  idx, w = images.bilinear_taps(8, 4)            # centre 2.5 in input pixels, half-width 2
  np.testing.assert_allclose(w[1][w[1] > 0], [1 / 8, 3 / 8, 3 / 8, 1 / 8], rtol=1e-6)
  assert idx[1][w[1] > 0].tolist() == [1, 2, 3, 4]
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (70, 131, 3), np.uint8)
  for mode in ('square', 'short_side'):
    box = data.crop_box(70, 131, 50, 44, mode)
    pil = np.asarray(Image.fromarray(img).resize((box.resized_w, box.resized_h), Image.BILINEAR))
    pil = pil[box.crop_top:box.crop_top + 44, box.crop_left:box.crop_left + 44] / 255.0
    ours = data.preprocess(img, 50, 44, mode=mode)
    assert np.abs(ours - pil).max() <= 1.0 / 255 + 1e-6


def _plain_taps(x, idx, w, axis):
  """The resampling as first written: per tap, gather, convert to float32, multiply, add."""
  shape = [1] * x.ndim
  shape[axis] = -1
  acc = w[:, 0].reshape(shape) * np.take(x, idx[:, 0], axis=axis).astype(np.float32)
  for k in range(1, idx.shape[1]):
    acc = acc + w[:, k].reshape(shape) * np.take(x, idx[:, k], axis=axis).astype(np.float32)
  return acc


@pytest.mark.parametrize('n_in, n_out', [(131, 44), (40, 40), (30, 97), (1000, 256)])
def test_apply_taps_equals_the_plain_per_tap_sum_bit_for_bit(n_in, n_out):
  """The buffered `apply_taps` (uint8 converted inside the product, all-zero taps skipped, an
  unresized axis one product) computes each pixel with the same float32 operations in the same
  order as the plain loop, so the tf.data pipeline's crops still equal it exactly."""
  rng = np.random.default_rng(n_in)
  idx, w = images.bilinear_taps(n_in, n_out, gain=1 / 255)
  img = rng.integers(0, 256, (n_in, 23, 3), np.uint8)
  out = images.apply_taps(img, idx, w, axis=0)
  assert out.dtype == np.float32 and out.shape == (n_out, 23, 3) and out.flags.c_contiguous
  np.testing.assert_array_equal(out, _plain_taps(img, idx, w, 0))
  flt = rng.uniform(size=(9, n_in, 3)).astype(np.float32)
  out = images.apply_taps(flt, idx, w, axis=1)
  assert out.shape == (9, n_out, 3) and out.flags.c_contiguous
  np.testing.assert_array_equal(out, _plain_taps(flt, idx, w, 1))


def test_threaded_map_keeps_order_bounds_the_work_ahead_and_reports_each_failure():
  import threading
  started, lock = [], threading.Lock()

  def work(i):
    with lock:
      started.append(i)
    if i == 5:
      raise ValueError(f'bad item {i}')
    return i * i

  results = []
  loads = images.threaded_map(work, range(40), workers=3, ahead=4)
  for i, f in enumerate(loads):
    if i == 10:
      break
    # never more than `ahead` calls beyond the one being consumed
    assert max(started) <= i + 4
    try:
      results.append(f.result())
    except ValueError as e:
      results.append(str(e))
  loads.close()        # leaving early: the calls not yet started are cancelled
  assert results == [i * i for i in range(5)] + ['bad item 5'] + [i * i for i in range(6, 10)]
  assert len(started) <= 10 + 4 + 1 and max(started) < 40


def test_square_mode_keeps_the_whole_width():
  """Paper geometry: a 300 x 200 (W x H) image is judged over its whole width. With 'square' the
  crop keeps 480 / 512 of both axes (9.4 px of 300 cut per side): thin defect stripes 12 px from
  the left and right edges survive preprocessing (with 'short_side' the crop keeps 62.5 % of the
  width and cuts them off); unprocess_map returns 200 x 300 with the stripes in place."""
  h, w, resize, crop = 200, 300, 512, 480
  mask = np.zeros((h, w), bool)
  mask[:, 12:16] = True
  mask[:, w - 16:w - 12] = True
  box = data.crop_box(h, w, resize, crop, 'square')
  assert box.width / w == box.height / h == crop / resize
  m = data.preprocess_mask(mask, resize, crop, mode='square')
  cols = np.where(m.max(0) > 0)[0]
  assert cols.min() < 10 and cols.max() > crop - 10 and len(cols) < 20
  assert data.preprocess_mask(mask, resize, crop, mode='short_side').sum() == 0
  img = np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, -1)
  x = data.preprocess(img, resize, crop, mode='square')
  assert x[:, :10].max() > 0.5 and x[:, -10:].max() > 0.5
  for fill in ('edge', 'zero'):
    back = data.unprocess_map(m, h, w, resize, crop, mode='square', fill=fill)
    assert back.shape == (h, w) and back.dtype == np.float32
    rows = slice(20, h - 20)                     # fill='zero' blanks the cropped-off rows
    assert back[rows, 13:15].min() > 0.5 and back[rows, w - 15:w - 13].min() > 0.5
    assert back[:, 20:w - 20].max() < 0.5


def test_preprocess_geometry():
  """A single bright pixel block lands where the resize + crop geometry says."""
  img = np.zeros((100, 200, 3), np.uint8)
  img[40:60, 100:120] = 255                      # original rows 40..60, cols 100..120
  x = data.preprocess(img, 50, 40, mode='short_side')   # scale 0.5, crop offset (5, 30)
  assert x.shape == (40, 40, 3) and x.dtype == np.float32
  rows = np.where(x[..., 0].max(1) > 0.5)[0]
  cols = np.where(x[..., 0].max(0) > 0.5)[0]
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (15, 24, 20, 29)
  assert abs(x[20, 25, 0] - 1.0) < 1e-6 and x[0, 0, 0] == 0.0


def test_unprocess_map_round_trip():
  h, w, resize, crop = 60, 90, 40, 32
  mask = np.zeros((h, w), bool)
  mask[20:41, 30:61] = True
  m = data.preprocess_mask(mask, resize, crop, mode='short_side')
  back = data.unprocess_map(m, h, w, resize, crop, mode='short_side', fill='zero')
  assert back.shape == (h, w) and back.dtype == np.float32
  box = data.crop_box(h, w, resize, crop, 'short_side')
  inside = np.zeros((h, w), bool)
  inside[int(np.ceil(box.top)) + 1:int(box.top + box.height) - 1,
         int(np.ceil(box.left)) + 1:int(box.left + box.width) - 1] = True
  iou = ((back > 0.5) & mask).sum() / ((back > 0.5) | mask).sum()
  assert iou > 0.85
  ramp = np.tile(np.linspace(0, 1, crop, dtype=np.float32), (crop, 1))
  z = data.unprocess_map(ramp, h, w, resize, crop, mode='short_side', fill='zero')
  e = data.unprocess_map(ramp, h, w, resize, crop, mode='short_side', fill='edge')
  assert z[:, :int(box.left) - 1].max() == 0.0            # left margin: no prediction
  assert np.allclose(e[:, :int(box.left) - 1], 0.0) and np.allclose(e[:, -1], 1.0)
  assert z[:, -1].max() == 0.0
  assert np.allclose(z[inside], e[inside])


# ------------------------------------------------------------------------------ bad input


def _copy_mvtec(tmp_path, roots):
  import shutil
  dst = tmp_path / 'mv'
  shutil.copytree(roots['mvtec'], dst)
  return dst


def test_missing_root_and_category(tmp_path, roots):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match=str(missing)):
    data.list_categories(_cfg('mvtec', missing))
  with pytest.raises(FileNotFoundError, match='data.root is empty'):
    data.list_categories(_cfg('mvtec', ''))
  cfg = _cfg('mvtec', roots['mvtec'], categories=('bottle',))
  with pytest.raises(FileNotFoundError, match=os.path.join(str(roots['mvtec']), 'bottle')):
    data.list_categories(cfg)
  with pytest.raises(FileNotFoundError, match=os.path.join(str(roots['mvtec']), 'bottle')):
    data.load_split(cfg, 'bottle', 'train')
  with pytest.raises(FileNotFoundError, match=os.path.join(str(roots['visa']), 'bottle')):
    data.list_categories(_cfg('visa', roots['visa'], categories=('bottle',)))
  with pytest.raises(ValueError, match="data.name='nope'"):
    data.list_categories(_cfg('nope', roots['mvtec']))


def test_wrong_layout(roots):
  # BTAD data declared as MVTec: names the expected train/good folder and what is there.
  with pytest.raises(ValueError, match=r'train/good/.*ok/.*BTAD') as e:
    data.load_split(_cfg('mvtec', roots['btad']), '01', 'train')
  assert os.path.join(str(roots['btad']), '01', 'train', 'good') in str(e.value)
  with pytest.raises(ValueError, match=r'no mvtec categories.*BTAD'):
    data.list_categories(_cfg('mvtec', roots['btad']))
  with pytest.raises(ValueError, match=r'split_csv/1cls.csv.*MVTec'):
    data.list_categories(_cfg('visa', roots['mvtec']))
  with pytest.raises(ValueError, match=r'train/ok/'):
    data.list_categories(_cfg('btad', roots['visa']))


def test_visa_bad_csv(tmp_path, roots):
  import shutil
  r = tmp_path / 'v'
  shutil.copytree(roots['visa'], r)
  csv_path = r / 'split_csv' / '1cls.csv'
  text = csv_path.read_text()
  csv_path.write_text(text.replace('object,split,label,image,mask', 'obj,set,label,img,msk'))
  with pytest.raises(ValueError, match=f'{csv_path}.*columns'):
    data.list_categories(_cfg('visa', r))
  csv_path.write_text(text.replace('candle,test,anomaly', 'candle,test,bad', 1))
  with pytest.raises(ValueError, match=f"{csv_path} line .*'bad'"):
    data.load_split(_cfg('visa', r), 'candle', 'test')
  csv_path.write_text(text)
  os.remove(r / 'candle/Data/Masks/Anomaly/001.png')
  with pytest.raises(ValueError, match='Anomaly/001.JPG has no ground-truth mask.*001.png'):
    data.load_split(_cfg('visa', r), 'candle', 'test')


def test_unreadable_image(tmp_path, roots):
  r = _copy_mvtec(tmp_path, roots)
  bad = r / 'widget' / 'train' / 'good' / '001.png'
  bad.write_bytes(b'this is not a png')
  with pytest.raises(ValueError, match=str(bad)):
    data.load_split(_cfg('mvtec', r), 'widget', 'train')
  with pytest.raises(ValueError, match=str(bad)):
    data.load_image(str(bad))
  with pytest.raises(FileNotFoundError, match='gone.png'):
    data.load_image(str(r / 'gone.png'))


def test_truncated_image(tmp_path, roots):
  r = _copy_mvtec(tmp_path, roots)
  bad = r / 'widget' / 'test' / 'good' / '000.png'
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)).save(buf, 'PNG')
  bad.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  cfg = _cfg('mvtec', r)
  test = data.load_split(cfg, 'widget', 'test')       # the header is fine
  with pytest.raises(ValueError, match=f'{bad}.*truncated'):
    list(data.iterate_numpy(data.make_dataset(test, cfg)))
  with pytest.raises(ValueError, match=str(bad)):
    data.load_image(str(bad))
  from pni_jax.data import splits   # without TensorFlow: decoded on threads, the same error
  with pytest.raises(ValueError, match=f'{bad}.*truncated'):
    list(splits.numpy_batches(test, cfg, with_masks=True))


def test_mask_size_mismatch(tmp_path, roots):
  r = _copy_mvtec(tmp_path, roots)
  mask = r / 'widget' / 'ground_truth' / 'crack' / '001_mask.png'
  Image.fromarray(np.zeros((H + 2, W, 3), np.uint8)).save(mask)
  cfg = _cfg('mvtec', r)
  image = r / 'widget' / 'test' / 'crack' / '001.png'
  with pytest.raises(ValueError, match=f'{mask}.*{image}'):
    data.load_split(cfg, 'widget', 'test')
  test = data.load_split(cfg, 'widget', 'test', check_files=False)
  with pytest.raises(ValueError, match=f'{mask}.*{image}'):
    list(data.iterate_numpy(data.make_dataset(test, cfg)))


def test_missing_mask(tmp_path, roots):
  r = _copy_mvtec(tmp_path, roots)
  os.remove(r / 'widget' / 'ground_truth' / 'crack' / '000_mask.png')
  with pytest.raises(ValueError, match=r'crack/000.png has no ground-truth mask: expected .*'
                                       r'ground_truth/crack/000_mask.png'):
    data.load_split(_cfg('mvtec', r), 'widget', 'test')


def test_folder_without_masks(roots):
  cfg = _cfg('folder', roots['folder'])
  test = data.load_split(cfg, 'nomask', 'test')
  assert not test.has_masks and test.labels.tolist() == [1, 1, 0]
  with pytest.raises(ValueError, match='with_masks=False'):
    data.make_dataset(test, cfg)
  batches = list(data.iterate_numpy(data.make_dataset(test, cfg, with_masks=False)))
  assert sum(len(b['label']) for b in batches) == 3


def test_empty_train_set(tmp_path, roots):
  r = _copy_mvtec(tmp_path, roots)
  folder = r / 'widget' / 'train' / 'good'
  for p in folder.iterdir():
    p.unlink()
  (folder / 'notes.txt').write_text('x')
  with pytest.raises(ValueError, match=f'empty train set: no images .* in {folder}'):
    data.load_split(_cfg('mvtec', r), 'widget', 'train')


# ------------------------------------------------------------------------------ TFDS source


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _arrays(split, cfg, with_masks=True):
  batches = list(data.iterate_numpy(data.make_dataset(split, cfg, with_masks=with_masks)))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_tfds_source_gives_identical_arrays(roots, tfds_dir, name):
  """The TFDS builder of each layout (prepared from the fixture as manual_dir) and the files
  source list the same split and give bit-identical images, masks, labels and indices."""
  cat = EXPECTED[name][0]
  files_cfg = _cfg(name, roots[name], resize_mode='square', tfds_data_dir=str(tfds_dir))
  tfds_cfg = _cfg(name, roots[name], resize_mode='square', tfds_data_dir=str(tfds_dir),
                  source='tfds')
  for split_name in ('train', 'test'):
    files = data.load_split(files_cfg, cat, split_name)
    recs = data.load_split(tfds_cfg, cat, split_name)
    assert recs.paths == files.paths and recs.mask_paths == files.mask_paths
    assert recs.labels.tolist() == files.labels.tolist()
    assert recs.defect_types == files.defect_types
    assert recs.record_ids == tuple(range(len(files))) and not files.record_ids
    masks = split_name == 'test'
    a, b = _arrays(files, files_cfg, masks), _arrays(recs, tfds_cfg, masks)
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{name} {split_name} {key}')
  # A subset (as the hold-out split makes): same images, indices relative to the subset.
  n = len(data.load_split(files_cfg, cat, 'test'))
  keep = list(range(1, n))                       # all but the first
  sub = lambda s: dataclasses.replace(
      s, paths=tuple(s.paths[i] for i in keep), labels=s.labels[keep],
      mask_paths=tuple(s.mask_paths[i] for i in keep),
      defect_types=tuple(s.defect_types[i] for i in keep),
      record_ids=tuple(s.record_ids[i] for i in keep) if s.record_ids else ())
  test_f = sub(data.load_split(files_cfg, cat, 'test'))
  test_t = sub(data.load_split(tfds_cfg, cat, 'test'))
  a, b = _arrays(test_f, files_cfg), _arrays(test_t, tfds_cfg)
  assert b['index'].tolist() == list(range(n - 1))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_tfds_refuses_a_changed_download_and_shuffle(tmp_path, roots):
  import shutil
  r = tmp_path / 'mv'
  shutil.copytree(roots['mvtec'], r)
  cfg = _cfg('mvtec', r, source='tfds', tfds_data_dir=str(tmp_path / 'prepared'))
  train = data.load_split(cfg, 'widget', 'train')
  with pytest.raises(ValueError, match="shuffle=True needs data.source='files'"):
    data.make_dataset(train, cfg, shuffle=True)
  _save(f'{r}/widget/train/good/009.png', _scene(H, W, None, np.random.default_rng(9))[0])
  with pytest.raises(ValueError, match=r'made from other files.*delete .*pni_mvtec_ad'):
    data.load_split(cfg, 'widget', 'train')
  bad = _cfg('mvtec', tmp_path / 'absent', source='tfds', tfds_data_dir=str(tmp_path / 'p2'))
  with pytest.raises(FileNotFoundError, match='absent'):
    data.load_split(bad, 'widget', 'train')


def test_tfds_prepare_names_a_corrupt_file(tmp_path, roots):
  import shutil
  r = tmp_path / 'mv'
  shutil.copytree(roots['mvtec'], r)
  bad = r / 'widget' / 'test' / 'good' / '000.png'
  bad.write_bytes(bad.read_bytes()[:60])
  cfg = _cfg('mvtec', r, source='tfds', tfds_data_dir=str(tmp_path / 'prepared'))
  with pytest.raises(ValueError, match=str(bad)):
    data.load_split(cfg, 'widget', 'test')
  # No half-prepared file is left (TFDS keeps only its builder-level .config/metadata.json);
  # the repaired download prepares and reads.
  prepared = tmp_path / 'prepared' / 'pni_mvtec_ad'
  leftovers = [p for p in prepared.rglob('*') if p.is_file() and '.config' not in p.parts]
  assert not leftovers, leftovers
  shutil.copy(roots['mvtec'] / 'widget' / 'test' / 'good' / '000.png', bad)
  assert len(data.load_split(cfg, 'widget', 'test')) == 3
