"""Hostile files and interrupted writes, through the real entry points (deterministic seeds).

* torch weight files (the torch-written golden files and crafted ones): truncated, bit-flipped,
  with out-of-range tensor geometry, unknown globals or non-tensor entries -> a ValueError naming
  the file, or (only where the format has no checksum over the changed bytes) a state_dict of the
  same names, shapes and dtypes; the converter CLI then writes nothing;
* PNG images and masks: truncated or bit-flipped -> a ValueError naming the file from the shared
  decoder, the split listing and the tf.data pipeline (in-graph decoding), or the clean pixels;
* model.save interrupted between any two of its steps -> load() returns a complete model (the
  old one until the new one is in place), and no half-written folder is read.
"""

import collections
import io
import os
import pathlib
import pickle
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pni_jax import data
from pni_jax import model as model_lib
from pni_jax.backbones import torch_pickle

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'golden'


# ------------------------------------------------------------------------------ torch files


def _rebuild_tensor_v2(*args):  # stand-in global, renamed to torch._utils in the byte stream
  raise AssertionError('never called')


class FloatStorage:  # stand-in for torch.FloatStorage
  pass


class LongStorage:
  pass


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

  def __reduce__(self):
    return _rebuild_tensor_v2, self.args


class _Store:
  def __init__(self, key, kind, numel):
    self.key, self.kind, self.numel = key, kind, numel


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _Store):
      return ('storage', obj.kind, obj.key, 'cpu', obj.numel)
    return None


def _torch_zip(path, obj, storages, extra_globals=()):
  """Writes a torch zip checkpoint: obj pickled with _Tensor / _Store stand-ins (renamed to the
  torch globals), storages {key: bytes}."""
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(obj)
  raw = buf.getvalue()
  mod = __name__.encode()
  raw = raw.replace(mod + b'\n_rebuild_tensor_v2', b'torch._utils\n_rebuild_tensor_v2')
  raw = raw.replace(mod + b'\nFloatStorage', b'torch\nFloatStorage')
  raw = raw.replace(mod + b'\nLongStorage', b'torch\nLongStorage')
  for old, new in extra_globals:
    raw = raw.replace(old, new)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    z.writestr('archive/data.pkl', raw)
    z.writestr('archive/byteorder', 'little')
    z.writestr('archive/version', '3\n')
    for key, value in storages.items():
      z.writestr(f'archive/data/{key}', value)


def _good_state(path):
  """A small valid state_dict: weight [3, 4] (a transposed view), bias [3], steps int64 []."""
  w = np.arange(12, dtype=np.float32)
  b = np.arange(3, dtype=np.float32) - 1
  s0, s1 = _Store('0', FloatStorage, 12), _Store('1', FloatStorage, 3)
  s2 = _Store('2', LongStorage, 1)
  sd = collections.OrderedDict(
      [('fc.weight', _Tensor(s0, 0, (3, 4), (1, 3))), ('fc.bias', _Tensor(s1, 0, (3,), (1,))),
       ('steps', _Tensor(s2, 0, (), ()))])
  _torch_zip(path, sd, {'0': w.tobytes(), '1': b.tobytes(),
                        '2': np.array([7], np.int64).tobytes()})
  return {'fc.weight': w.reshape(4, 3).T, 'fc.bias': b, 'steps': np.array(7, np.int64)}


def test_crafted_file_reads_correctly(tmp_path):
  want = _good_state(tmp_path / 'ok.pth')
  got = torch_pickle.load_state_dict(tmp_path / 'ok.pth')
  assert list(got) == list(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
    assert got[k].dtype == want[k].dtype and got[k].flags.c_contiguous


BAD_GEOMETRY = {  # (offset, size, stride) of a tensor over a 12-float storage -> message
    'offset beyond': (12, (1,), (1,), 'outside its storage'),
    'extent beyond': (2, (3, 4), (4, 1), 'outside its storage'),
    'stride beyond': (0, (2, 2), (1, 12), 'outside its storage'),
    'negative offset': (-1, (2,), (1,), 'negative'),
    'negative size': (0, (-2, 2), (1, 1), 'negative'),
    'negative stride': (4, (2,), (-1,), 'negative'),
    'rank mismatch': (0, (2, 2), (1,), 'differ in length'),
    'overlapping view larger than storage': (0, (4, 100), (1, 0), 'outside its storage'),
    'float offset': (1.5, (2,), (1,), 'must be an integer'),
}


@pytest.mark.parametrize('case', sorted(BAD_GEOMETRY))
def test_tensor_geometry_is_checked(tmp_path, case):
  offset, size, stride, message = BAD_GEOMETRY[case]
  st = _Store('0', FloatStorage, 12)
  path = tmp_path / 'bad.pth'
  _torch_zip(path, {'w': _Tensor(st, offset, size, stride)},
             {'0': np.zeros(12, np.float32).tobytes()})
  with pytest.raises(ValueError, match=f'{path}.*{message}'):
    torch_pickle.load_state_dict(path)


def test_storages_entries_and_globals_are_checked(tmp_path):
  p = tmp_path / 'short.pth'
  _torch_zip(p, {'w': _Tensor(_Store('0', FloatStorage, 12), 0, (12,), (1,))},
             {'0': np.zeros(5, np.float32).tobytes()})
  with pytest.raises(ValueError, match=f'{p}.*storage 0 holds 20 bytes'):
    torch_pickle.load_state_dict(p)
  p = tmp_path / 'missing.pth'
  _torch_zip(p, {'w': _Tensor(_Store('7', FloatStorage, 2), 0, (2,), (1,))}, {})
  with pytest.raises(ValueError, match=f'{p}.*storage 7 is missing'):
    torch_pickle.load_state_dict(p)
  p = tmp_path / 'twotypes.pth'
  _torch_zip(p, {'a': _Tensor(_Store('0', FloatStorage, 2), 0, (2,), (1,)),
                 'b': _Tensor(_Store('0', LongStorage, 2), 0, (2,), (1,))},
             {'0': np.zeros(4, np.float32).tobytes()})
  with pytest.raises(ValueError, match=f'{p}.*storage 0 is used as FloatStorage.*LongStorage'):
    torch_pickle.load_state_dict(p)
  p = tmp_path / 'global.pth'
  _torch_zip(p, {'w': _Tensor(_Store('0', FloatStorage, 2), 0, (2,), (1,))},
             {'0': np.zeros(2, np.float32).tobytes()},
             extra_globals=[(b'torch._utils\n_rebuild_tensor_v2', b'os\nsystem')])
  with pytest.raises(ValueError, match=f'{p}.*unsupported object os.system'):
    torch_pickle.load_state_dict(p)
  p = tmp_path / 'entry.pth'
  _torch_zip(p, collections.OrderedDict(
      [('w', _Tensor(_Store('0', FloatStorage, 2), 0, (2,), (1,))), ('note', 'hello')]),
      {'0': np.zeros(2, np.float32).tobytes()})
  with pytest.raises(ValueError, match=f"{p}: state_dict entry 'note' is a str, not a tensor"):
    torch_pickle.load_state_dict(p)


def _structure(sd):
  return [(k, v.shape, v.dtype) for k, v in sd.items()]


def _mutations(blob: bytes, seed: int, flips: int = 48, cuts: int = 24):
  """Deterministic truncations (evenly spread lengths) and single-bit flips (seeded)."""
  rng = np.random.default_rng(seed)
  for n in np.unique(np.linspace(0, len(blob) - 1, cuts).astype(int)):
    yield f'cut{n}', blob[:n]
  for pos, bit in zip(rng.integers(0, len(blob), flips), rng.integers(0, 8, flips)):
    b = bytearray(blob)
    b[pos] ^= 1 << int(bit)
    yield f'flip{pos}.{bit}', bytes(b)


def _rezip_with_flipped_pickle(blob: bytes, seed: int, count: int = 24):
  """Zip files whose data.pkl has a flipped bit but a correct CRC (the parser itself is hit)."""
  rng = np.random.default_rng(seed)
  with zipfile.ZipFile(io.BytesIO(blob)) as z:
    members = {i.filename: z.read(i.filename) for i in z.infolist()}
  pkl = next(n for n in members if n.endswith('data.pkl'))
  for pos, bit in zip(rng.integers(2, len(members[pkl]), count), rng.integers(0, 8, count)):
    b = bytearray(members[pkl])
    b[pos] ^= 1 << int(bit)
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w', zipfile.ZIP_STORED) as z:
      for name, value in members.items():
        z.writestr(name, bytes(b) if name == pkl else value)
    yield f'pkl{pos}.{bit}', out.getvalue()


@pytest.mark.parametrize('source', ['tiny_zip.pth', 'tiny_legacy.pth', 'crafted'])
def test_fuzzed_weight_files(tmp_path, source):
  if source == 'crafted':
    _good_state(tmp_path / 'src.pth')
    blob = (tmp_path / 'src.pth').read_bytes()
  else:
    blob = (GOLDEN / source).read_bytes()
  (tmp_path / 'clean.pth').write_bytes(blob)
  clean = torch_pickle.load_state_dict(tmp_path / 'clean.pth')
  is_zip = zipfile.is_zipfile(io.BytesIO(blob))
  cases = list(_mutations(blob, seed=len(source)))
  if is_zip:
    cases += list(_rezip_with_flipped_pickle(blob, seed=1))
  outcomes = collections.Counter()
  for name, mutated in cases:
    path = tmp_path / f'{name}.pth'
    path.write_bytes(mutated)
    try:
      got = torch_pickle.load_state_dict(path)
    except ValueError as e:
      assert str(path) in str(e), (name, str(e))
      outcomes['error'] += 1
      continue
    # Loaded: only possible where no checksum covers the change. The zip's CRC covers every
    # stored byte, so a zip that loads from the original members holds the original values.
    if is_zip and not name.startswith('pkl'):
      assert _structure(got) == _structure(clean), name
      for k in clean:
        np.testing.assert_array_equal(got[k], clean[k], err_msg=name)
    for v in got.values():
      assert isinstance(v, np.ndarray) and v.flags.c_contiguous, name
    outcomes['loaded'] += 1
  assert outcomes['error'] >= len(cases) // 2, outcomes


def test_converter_cli_leaves_nothing_on_bad_weights(tmp_path):
  sys.path.insert(0, str(REPO / 'tools'))
  try:
    import convert_weights  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(REPO / 'tools'))
  blob = (GOLDEN / 'tiny_zip.pth').read_bytes()
  for i, (name, mutated) in enumerate(_mutations(blob, seed=5, flips=6, cuts=4)):
    src, out = tmp_path / f'{name}.pth', tmp_path / f'out{i}'
    src.write_bytes(mutated)
    assert convert_weights.main(['--arch', 'resnet18', '--from', str(src), '--out', str(out)]) == 1
    assert all(p.suffix == '.pth' for p in tmp_path.iterdir()), sorted(os.listdir(tmp_path))


# ------------------------------------------------------------------------------ images, masks

H, W = 20, 24


def _png_bytes(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def test_fuzzed_pngs_and_masks_through_the_shared_decoder(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (H, W, 3), np.uint8)
  mask = (rng.random((H, W)) > 0.6).astype(np.uint8) * 255
  counts = collections.Counter()
  for what, blob, load, clean in (('image', _png_bytes(image), data.load_image, image),
                                  ('mask', _png_bytes(mask), data.load_mask, mask != 0)):
    for name, mutated in _mutations(blob, seed=11, flips=120, cuts=30):
      path = tmp_path / f'{what}-{name}.png'
      path.write_bytes(mutated)
      try:
        got = load(str(path))
      except ValueError as e:
        assert str(path) in str(e), (name, str(e))
        counts['error'] += 1
        continue
      np.testing.assert_array_equal(got, clean, err_msg=f'{what} {name}: silent garbage')
      counts['clean'] += 1
  assert counts['error'] > 0.9 * sum(counts.values()), counts


def _mvtec(root, image_blob, mask_blob):
  rng = np.random.default_rng(1)
  for sub in ('train/good', 'test/good', 'test/crack', 'ground_truth/crack'):
    os.makedirs(root / 'w' / sub, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (H, W, 3), np.uint8)).save(root / 'w/train/good/0.png')
  Image.fromarray(rng.integers(0, 256, (H, W, 3), np.uint8)).save(root / 'w/test/good/0.png')
  (root / 'w/test/crack/1.png').write_bytes(image_blob)
  (root / 'w/ground_truth/crack/1_mask.png').write_bytes(mask_blob)
  cfg = ml_collections.ConfigDict(dict(
      name='mvtec', root=str(root), categories=(), resize=16, crop=16, batch_size=2,
      folder_good='good', resize_mode='square', source='files'))
  return cfg, root / 'w/test/crack/1.png', root / 'w/ground_truth/crack/1_mask.png'


def test_fuzzed_pngs_through_the_tf_data_pipeline(tmp_path):
  """In-graph decoding: every corrupt test image or mask stops the iteration with a ValueError
  naming it (found by re-reading the failing batch), or decodes to the clean crop."""
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (H, W, 3), np.uint8)
  mask = (rng.random((H, W)) > 0.6).astype(np.uint8) * 255
  image_blob, mask_blob = _png_bytes(image), _png_bytes(mask)
  cfg, _, _ = _mvtec(tmp_path / 'clean', image_blob, mask_blob)
  clean = list(data.iterate_numpy(data.make_dataset(data.load_split(cfg, 'w', 'test'), cfg)))
  cases = [('image', n, b) for n, b in _mutations(image_blob, seed=21, flips=5, cuts=3)]
  cases += [('mask', n, b) for n, b in _mutations(mask_blob, seed=22, flips=3, cuts=2)]
  errors = 0
  for i, (what, name, mutated) in enumerate(cases):
    blobs = (mutated, mask_blob) if what == 'image' else (image_blob, mutated)
    cfg, image_path, mask_path = _mvtec(tmp_path / f'c{i}', *blobs)
    bad = image_path if what == 'image' else mask_path
    try:
      split = data.load_split(cfg, 'w', 'test')            # reads headers
      got = list(data.iterate_numpy(data.make_dataset(split, cfg)))
    except ValueError as e:
      assert str(bad) in str(e), (what, name, str(e))
      errors += 1
      continue
    for a, b in zip(got, clean):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f'{what} {name}: silent garbage')
  assert errors >= len(cases) - 2


# ------------------------------------------------------------------------------ model.save


class _Crash(BaseException):
  """Stands for the process dying: nothing after it runs, no cleanup."""


def _model(tag, value):
  c = np.full((6, 4), value, np.float32)
  return model_lib.PNIModel(c_emb=c, emb_to_dist=np.arange(6, dtype=np.int32) % 3,
                            position=np.full((2, 2, 3), value, np.float32),
                            stats={'image_threshold': np.float32(value)},
                            meta={'num_dist': 3, 'tag': tag})


@pytest.mark.parametrize('step', ['aside', 'swap_in', 'delete_old', 'write'])
def test_save_interrupted_keeps_a_complete_model(tmp_path, monkeypatch, step):
  target = tmp_path / 'model'
  model_lib.save(_model('old', 1.0), target)
  real_replace, real_rmtree = model_lib.os.replace, model_lib.shutil.rmtree
  calls = []

  def replace(src, dst):
    calls.append(('replace', pathlib.Path(src).name, pathlib.Path(dst).name))
    if (step == 'aside' and pathlib.Path(dst).name == 'model.old') or (
        step == 'swap_in' and pathlib.Path(src).name == 'model.tmp'):
      raise _Crash()
    return real_replace(src, dst)

  def rmtree(path, *a, **kw):
    if step == 'delete_old' and pathlib.Path(path).name == 'model.old':
      raise _Crash()
    return real_rmtree(path, *a, **kw)

  monkeypatch.setattr(model_lib.os, 'replace', replace)
  monkeypatch.setattr(model_lib.shutil, 'rmtree', rmtree)
  new = _model('new', 2.0)
  if step == 'write':  # the write itself fails (e.g. disk full): a normal exception
    new = new.replace(meta={'num_dist': 3, 'tag': object()})
    with pytest.raises(TypeError):
      model_lib.save(new, target)
  else:
    with pytest.raises(_Crash):
      model_lib.save(new, target)
  monkeypatch.setattr(model_lib.os, 'replace', real_replace)
  monkeypatch.setattr(model_lib.shutil, 'rmtree', real_rmtree)
  left = sorted(p.name for p in tmp_path.iterdir())
  if step == 'swap_in':
    assert 'model' not in left and 'model.old' in left   # the crash window of the old code
  loaded = model_lib.load(target)
  expected = 'new' if step == 'delete_old' else 'old'
  assert loaded.meta['tag'] == expected
  value = 2.0 if expected == 'new' else 1.0
  np.testing.assert_array_equal(loaded.c_emb, _model(expected, value).c_emb)
  assert 'model.old' not in os.listdir(tmp_path)
  if step == 'write':
    assert sorted(os.listdir(tmp_path)) == ['model']   # the failed write removed its folder
  # The next save completes normally and cleans everything up.
  model_lib.save(_model('newer', 3.0), target)
  assert sorted(os.listdir(tmp_path)) == ['model']
  assert model_lib.load(target).meta['tag'] == 'newer'
