"""Dataset layouts, preprocessing and the tf.data pipeline on small fixtures written here."""

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
  assert data.category_group('generated', 'tokens') == 'object'
  assert data.category_group('btad', '02') == 'object'
  assert data.category_group('folder', 'x') == 'object'
  with pytest.raises(ValueError, match='imagenet'):
    data.category_group('imagenet', 'x')


def test_generated_names_agree():
  from pni_jax.data import generated
  assert layouts.GENERATED_TEXTURES == generated.TEXTURES
  assert [layouts.VISA_GROUPS[c] for c in ('candle', 'cashew', 'pcb1')] == [
      'multiple instances', 'single instance', 'complex structure']


# ------------------------------------------------------------------------------ pipeline


def _expected_square(square, h=H, w=W):
  """Bright-square mask after resize (short side RESIZE) + center crop CROP, by geometry."""
  box = images.crop_box(h, w, RESIZE, CROP)
  sy, sx = box.resized_h / h, box.resized_w / w
  y0, y1, x0, x1 = square
  out = np.zeros((CROP, CROP), bool)
  yc = (np.arange(CROP) + box.crop_top + 0.5) / sy   # pixel centres in original coordinates
  xc = (np.arange(CROP) + box.crop_left + 0.5) / sx
  out[np.ix_((yc >= y0) & (yc < y1), (xc >= x0) & (xc < x1))] = True
  return out


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_pipeline_shapes_and_mask_alignment(roots, name):
  cfg = _cfg(name, roots[name])
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
    expected = _expected_square(square)
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


def test_pipeline_matches_numpy_preprocessing(roots):
  cfg = _cfg('visa', roots['visa'])
  test = data.load_split(cfg, 'candle', 'test')
  batches = list(data.iterate_numpy(data.make_dataset(test, cfg, batch_size=3)))
  for b in batches:
    for img, i in zip(b['image'], b['index']):
      ref = images.preprocess(images.load_image(test.paths[i]), RESIZE, CROP)
      assert np.abs(img - ref).max() <= 1.0 / 255
      if test.mask_paths[i]:
        ref_m = images.preprocess_mask(images.load_mask(test.mask_paths[i]), RESIZE, CROP)
        assert np.array_equal(b['mask'][list(b['index']).index(i)], ref_m)


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
  box = data.crop_box(100, 200, 50, 40)
  assert (box.resized_h, box.resized_w, box.crop_top, box.crop_left) == (50, 100, 5, 30)
  assert (box.top, box.left, box.height, box.width) == (10.0, 60.0, 80.0, 80.0)
  box = data.crop_box(90, 60, 40, 40)   # portrait: 60 -> 40, 90 -> int(60) = 60
  assert (box.resized_h, box.resized_w, box.crop_top, box.crop_left) == (60, 40, 10, 0)
  with pytest.raises(ValueError, match='data.crop=41'):
    data.crop_box(90, 60, 40, 41)


def test_preprocess_geometry():
  """A single bright pixel block lands where the resize + crop geometry says."""
  img = np.zeros((100, 200, 3), np.uint8)
  img[40:60, 100:120] = 255                      # original rows 40..60, cols 100..120
  x = data.preprocess(img, 50, 40)               # scale 0.5, crop offset (5, 30)
  assert x.shape == (40, 40, 3) and x.dtype == np.float32
  rows = np.where(x[..., 0].max(1) > 0.5)[0]
  cols = np.where(x[..., 0].max(0) > 0.5)[0]
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (15, 24, 20, 29)
  assert abs(x[20, 25, 0] - 1.0) < 1e-6 and x[0, 0, 0] == 0.0


def test_unprocess_map_round_trip():
  h, w, resize, crop = 60, 90, 40, 32
  mask = np.zeros((h, w), bool)
  mask[20:41, 30:61] = True
  m = data.preprocess_mask(mask, resize, crop)
  back = data.unprocess_map(m, h, w, resize, crop, fill='zero')
  assert back.shape == (h, w) and back.dtype == np.float32
  box = data.crop_box(h, w, resize, crop)
  inside = np.zeros((h, w), bool)
  inside[int(np.ceil(box.top)) + 1:int(box.top + box.height) - 1,
         int(np.ceil(box.left)) + 1:int(box.left + box.width) - 1] = True
  iou = ((back > 0.5) & mask).sum() / ((back > 0.5) | mask).sum()
  assert iou > 0.85
  ramp = np.tile(np.linspace(0, 1, crop, dtype=np.float32), (crop, 1))
  z = data.unprocess_map(ramp, h, w, resize, crop, fill='zero')
  e = data.unprocess_map(ramp, h, w, resize, crop, fill='edge')
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
