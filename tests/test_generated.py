"""The embedded generated dataset: determinism, idempotence, layout, exact masks, and that object
defects are locally invisible while texture defects are not."""

import hashlib
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pni_jax import data
from pni_jax.data import generated

SMALL = dict(image_size=64, num_train=2, num_test_good=1, num_test_defect=4)


def _hashes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
  root = tmp_path_factory.mktemp('gen') / 'a'
  cats = generated.generate(str(root), seed=3, **SMALL)
  return root, cats, _hashes(root)


def test_byte_identical_and_seed_dependent(small_set, tmp_path):
  root, cats, hashes = small_set
  assert cats == list(generated.CATEGORIES)
  # per category: 2 train + 1 good + 4 defective + 4 masks + 1 manifest
  assert len(hashes) == len(generated.CATEGORIES) * (2 + 1 + 4 + 4 + 1)
  generated.generate(str(tmp_path / 'b'), seed=3, **SMALL)
  assert _hashes(tmp_path / 'b') == hashes
  generated.generate(str(tmp_path / 'c'), seed=4, **SMALL)
  other = _hashes(tmp_path / 'c')
  images = [k for k in hashes if k.endswith('.png') and 'ground_truth' not in k]
  assert sorted(other) == sorted(hashes)
  assert sum(other[k] != hashes[k] for k in images) == len(images)


def test_category_subset_is_identical(small_set, tmp_path):
  """An image depends on (seed, category, split, index) only, not on what else is generated."""
  _, _, hashes = small_set
  generated.generate(str(tmp_path / 'd'), seed=3, categories=['cable'], **SMALL)
  sub = _hashes(tmp_path / 'd')
  assert sub and all(hashes[k] == v for k, v in sub.items())


def test_idempotent_and_interrupted(small_set, tmp_path, monkeypatch):
  root, _, hashes = small_set
  work = tmp_path / 'w'
  shutil.copytree(root, work)

  def fail(*args):
    raise AssertionError('complete categories must not be re-rendered')

  with monkeypatch.context() as m:
    m.setattr(generated, '_png_bytes', fail)
    generated.generate(str(work), seed=3, **SMALL)          # complete: skipped, nothing written
  # Interrupted generation (staging folder left behind), a corrupted file, a missing manifest.
  os.makedirs(work / '.tokens.partial' / 'train')
  (work / 'weave' / 'train' / 'good' / '000.png').write_bytes(b'garbage')
  os.remove(work / 'cable' / generated.MARKER)
  with pytest.raises(FileExistsError, match=str(work / 'cable')):
    generated.generate(str(work), seed=3, **SMALL)          # cable without manifest: not ours
  shutil.rmtree(work / 'cable')
  generated.generate(str(work), seed=3, **SMALL)
  assert _hashes(work) == hashes
  # Other parameters regenerate the category.
  generated.generate(str(work), seed=3, categories=['granite'], **{**SMALL, 'num_train': 3})
  with open(work / 'granite' / generated.MARKER) as fh:
    assert json.load(fh)['params']['num_train'] == 3
  assert os.path.isfile(work / 'granite' / 'train' / 'good' / '002.png')


def test_reads_as_mvtec_layout(small_set):
  root, _, _ = small_set
  cfg = ml_collections.ConfigDict(dict(name='generated', root=str(root), categories=(),
                                       resize=64, crop=56, batch_size=4, folder_good='good'))
  assert data.list_categories(cfg) == sorted(generated.CATEGORIES)
  for cat in generated.CATEGORIES:
    train = data.load_split(cfg, cat, 'train')
    test = data.load_split(cfg, cat, 'test')
    assert len(train) == 2 and len(test) == 5
    assert test.labels.tolist() == [0 if t == 'good' else 1 for t in test.defect_types]
    assert test.num_defective == 4 and test.has_masks
    kinds = generated.DEFECTS[cat]
    assert sorted(t for t in test.defect_types if t != 'good') == sorted(
        kinds[i % len(kinds)] for i in range(4))
    for p, m in zip(test.paths, test.mask_paths):
      if m is not None:
        mask = np.asarray(Image.open(m))
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}, p
    expected = 'texture' if cat in generated.TEXTURES else 'object'
    assert data.category_group('generated', cat) == expected


@pytest.mark.parametrize('category', generated.CATEGORIES)
def test_masks_cover_every_changed_pixel(category):
  size = 96
  for i, kind in enumerate(generated.DEFECTS[category]):
    s = generated.render_sample(category, generated.sample_rng(0, category, 'test_defect', i),
                                size, kind)
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (size, size) and s.mask.dtype == bool
    changed = np.any(s.image != s.reference, axis=-1)
    assert changed.sum() > 0 and s.mask.sum() > 0, kind
    if category in generated.TEXTURES:
      # mask = the defect's shape; its anti-aliased edge may touch one more pixel
      grown = s.mask.copy()
      for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        grown |= np.roll(s.mask, (dy, dx), axis=(0, 1))
      assert not (changed & ~grown).any(), kind
      assert (changed & s.mask).sum() >= 0.8 * s.mask.sum(), kind
    else:
      # mask = parts where they should not be + where missing ones should be, dilated
      assert not (changed & ~s.mask).any(), kind
      assert s.mask.sum() <= 6 * changed.sum(), kind
  normal = generated.render_sample(category, generated.sample_rng(0, category, 'train', 0), size)
  assert not normal.mask.any() and np.array_equal(normal.image, normal.reference)


def test_object_defects_locally_invisible():
  """Every 12 x 12 window (32 px at 256) of a defective object image has a near-identical window
  somewhere in 4 training images (8 for the lattice, whose random phase needs more images to
  show every part cut by every border); texture defects do not."""
  size, patch, stride = 96, 12, 6
  result = {}
  for cat in generated.CATEGORIES:
    refs = [generated.render_sample(cat, generated.sample_rng(1, cat, 'train', i), size).image
            for i in range(8 if cat == 'lattice' else 4)]
    good = generated.render_sample(cat, generated.sample_rng(1, cat, 'test_good', 0), size).image
    bad = [generated.render_sample(cat, generated.sample_rng(1, cat, 'test_defect', i), size,
                                   kind).image for i, kind in enumerate(generated.DEFECTS[cat])]
    maps = generated.nearest_patch_rms([good] + bad, refs, patch=patch, query_stride=stride)
    assert maps[0].shape == ((size - patch) // stride + 1,) * 2
    result[cat] = (float(maps[0].max()), [float(m.max()) for m in maps[1:]])
  for cat in generated.OBJECTS:
    good_max, bad_max = result[cat]
    # noise alone (sigma 1.5 per image) gives ~2.1 levels RMS; +-2% brightness jitter adds a bit
    assert max(bad_max) < 4.0 and good_max < 4.0, result[cat]
  good_max, bad_max = result['weave']
  assert min(bad_max) > 1.5 * good_max, result['weave']


def test_nearest_patch_rms_brute_force():
  rng = np.random.default_rng(0)
  refs = [rng.integers(0, 256, (10, 9, 3), dtype=np.uint8) for _ in range(2)]
  query = rng.integers(0, 256, (10, 9, 3), dtype=np.uint8)
  query[2:6, 2:6] = refs[1][5:9, 1:5]              # an exact copy at another position
  got = generated.nearest_patch_rms([query], refs, patch=4, query_stride=2, rows_per_chunk=3)[0]
  want = np.zeros_like(got)
  for a in range(got.shape[0]):
    for b in range(got.shape[1]):
      q = query[2 * a:2 * a + 4, 2 * b:2 * b + 4].astype(np.float64)
      best = min(((q - r[y:y + 4, x:x + 4]) ** 2).mean() for r in refs
                 for y in range(7) for x in range(6))
      want[a, b] = np.sqrt(best)
  np.testing.assert_allclose(got, want, atol=1e-2)
  assert got[1, 1] < 1e-2


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="'marble'"):
    generated.generate(str(tmp_path), seed=0, categories=['marble'], **SMALL)
  with pytest.raises(ValueError, match='num_train'):
    generated.generate(str(tmp_path), seed=0, **{**SMALL, 'num_train': 0})
  with pytest.raises(ValueError, match="'crack'"):
    generated.render_sample('tokens', np.random.default_rng(0), 64, 'crack')


def test_generate_from_config(small_set, tmp_path):
  _, _, hashes = small_set
  cfg = ml_collections.ConfigDict(dict(root=str(tmp_path / 'e'), categories=('tokens',),
                                       generated=dict(image_size=64, num_train=2, num_test_good=1,
                                                      num_test_defect=4)))
  assert generated.generate_from_config(cfg, seed=3) == ['tokens']
  sub = _hashes(tmp_path / 'e')
  assert len(sub) == 12 and all(hashes[k] == v for k, v in sub.items())
  assert data.generate is generated.generate


def test_lattice_position_tells_nothing():
  """The part nearest the image centre is of every type in some normal lattice images, so a
  position histogram cannot tell a misplaced type; only its neighbours' order can."""
  size = 96
  palette = np.float32([part[1] for part in generated._token_parts()[:3]])   # red, blue, green
  counts = np.zeros(3, int)
  for i in range(24):
    img = generated.render_sample('lattice', generated.sample_rng(0, 'lattice', 'train', i),
                                  size).image[36:60, 36:60].reshape(-1, 3).astype(np.float32)
    part = img[np.abs(img - np.float32([206, 201, 190])).max(-1) > 60]
    if len(part):
      counts[np.argmin(((palette - part.mean(0)) ** 2).sum(-1))] += 1
  assert (counts >= 4).all(), counts
