"""tf.data input pipeline: a `Split` -> batches of preprocessed images, masks and labels.

Two sources (`data.source`) feed the same graph:
  'files'  the image files of the split, read with `tf.io.read_file`;
  'tfds'   the records of the split's TFDS builder (`tfds_builders.py`), prepared once from the
           same files.
Decoding runs in the TensorFlow graph (`tf.io.decode_png` / `decode_jpeg` with
dct_method='INTEGER_ACCURATE' / `decode_bmp`), for the files whose in-graph decoding gives exactly
the array of the shared decoder `images.load_image` (8-bit PNG of any colour type, baseline or
progressive RGB / grayscale JPEG, 24 / 32-bit BMP; the rule is `graph_codec`, tested per kind).
Other files (16-bit PNG, TIFF, CMYK JPEG, palette BMP, ...) are decoded by `images.load_image`
inside `tf.numpy_function`. The TFDS builders store the original bytes of the first kind and a
lossless PNG of the decoded array for the second, so their records always decode in the graph.

Resampling (resize + center crop) also runs in the graph, with the taps of `images.crop_taps`
(looked up once per image size) applied in the order of `images.apply_taps`: the crops equal
`images.preprocess(images.load_image(path), ...)` bit for bit (tests/test_data.py). Masks:
`value != 0`, nearest neighbour with the taps of `images.mask_taps`.

The map runs in parallel with `deterministic=True`: the order of the examples is the order of
the split (or of one seeded shuffle, files source only). A file that cannot be decoded stops the
iteration (`iterate_numpy`) with a ValueError / FileNotFoundError naming it.

TensorFlow is kept off the GPU (it must never take memory from JAX).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
from PIL import Image

from pni_jax.data import images
from pni_jax.data.layouts import Split

try:  # harmless with tensorflow-cpu; fails only if TF already initialised its devices
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):
  pass

# In-graph codecs (switch_case branch indices); PYTHON = the shared PIL decoder.
PNG, JPEG, BMP, PYTHON = 0, 1, 2, 3
SOURCES = ('files', 'tfds')

# PIL modes whose in-graph decoding equals images.load_image / images.load_mask exactly.
_GRAPH_MODES = {
    'image': {'PNG': ('RGB', 'RGBA', 'L', 'LA', 'P', '1'), 'JPEG': ('RGB', 'L'), 'BMP': ('RGB',)},
    'mask': {'PNG': ('RGB', 'RGBA', 'L', 'LA', '1'), 'JPEG': ('RGB', 'L'), 'BMP': ('RGB',)},
}
_CODECS = {'PNG': PNG, 'JPEG': JPEG, 'BMP': BMP}


def graph_codec(path: str, what: str = 'image') -> int:
  """PNG / JPEG / BMP when TensorFlow decodes `path` to exactly what `images.load_image`
  (what='image') or `images.load_mask` (what='mask') returns; else PYTHON. Reads the header only;
  an unreadable header gives PYTHON (the shared decoder then names the file)."""
  try:
    with Image.open(path) as img:
      fmt, mode = img.format, img.mode
      rawmode = str(img.tile[0][3]) if img.tile else ''
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
    return PYTHON
  if fmt not in _CODECS or mode not in _GRAPH_MODES[what][fmt]:
    return PYTHON
  if fmt == 'PNG' and ';16' in rawmode:   # 16-bit PNG: TF drops the low byte, we round
    return PYTHON
  return _CODECS[fmt]


def _decode_bytes(contents: tf.Tensor, codec: tf.Tensor, channels: int) -> tf.Tensor:
  """Encoded bytes -> uint8 [H, W, C] (C = channels, or as stored when 0), by in-graph codec."""
  return tf.switch_case(codec, [
      lambda: tf.io.decode_png(contents, channels=channels),
      lambda: tf.io.decode_jpeg(contents, channels=channels, dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_bmp(contents, channels=channels),
  ])


def _decode_file(path: tf.Tensor, codec: tf.Tensor, what: str) -> tf.Tensor:
  """A file -> uint8 [H, W, 3] image (what='image') or bool [H, W] mask (what='mask')."""
  channels = 3 if what == 'image' else 0

  def python():
    if what == 'image':
      fn = lambda p: images.load_image(p.decode())
      return tf.numpy_function(fn, [path], tf.uint8, stateful=False)
    fn = lambda p: images.load_mask(p.decode()).astype(np.uint8)[..., None]
    return tf.numpy_function(fn, [path], tf.uint8, stateful=False)

  def graph():
    return _decode_bytes(tf.io.read_file(path), tf.minimum(codec, BMP), channels)

  x = tf.cond(codec == PYTHON, python, graph)
  if what == 'image':
    return tf.ensure_shape(x, (None, None, 3))
  return tf.ensure_shape(x, (None, None, None))[..., 0] != 0


def _apply_taps(x: tf.Tensor, idx: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
  """`images.apply_taps` along axis 0 in the graph: x [N, M, C] (uint8 or float32) -> float32
  [count, M, C], the first product then one multiply-add per further tap, in order."""

  def term(k):
    return tf.reshape(w[:, k], (-1, 1, 1)) * tf.cast(tf.gather(x, idx[:, k]), tf.float32)

  _, acc = tf.while_loop(lambda k, _: k < tf.shape(idx)[1],
                         lambda k, acc: (k + 1, acc + term(k)), (tf.constant(1), term(0)))
  return acc


def _taps_fn(resize: int, crop: int, mode: str):
  """(h, w) -> crop taps (images.crop_taps) and mask taps (images.mask_taps), cached per size."""

  @functools.lru_cache(maxsize=64)
  def taps(h: int, w: int):
    return (*images.crop_taps(h, w, resize, crop, mode),
            *images.mask_taps(h, w, resize, crop, mode))

  def lookup(h, w):
    return taps(int(h), int(w))

  return lookup


def _preprocess_graph(image: tf.Tensor, mask: tf.Tensor | None, taps_fn, crop: int):
  """uint8 [H, W, 3] (+ bool [H, W]) -> float32 [crop, crop, 3] (+ float32 [crop, crop])."""
  hw = tf.shape(image)[:2]
  ry, wy, rx, wx, my, mx = tf.numpy_function(
      taps_fn, [hw[0], hw[1]], (tf.int32, tf.float32, tf.int32, tf.float32, tf.int32, tf.int32),
      stateful=False)
  # Rows (whose weights carry the 1 / 255), then columns, as images.preprocess; each pass
  # gathers along axis 0 (contiguous rows), hence the transposes.
  x = tf.transpose(_apply_taps(image, ry, wy), (1, 0, 2))
  x = tf.transpose(_apply_taps(x, rx, wx), (1, 0, 2))
  x = tf.ensure_shape(x, (crop, crop, 3))
  if mask is None:
    return x, None
  m = tf.gather(tf.gather(mask, my, axis=0), mx, axis=1)
  return x, tf.ensure_shape(tf.cast(m, tf.float32), (crop, crop))


def _check_mask_size(image: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  ok = tf.reduce_all(tf.shape(image)[:2] == tf.shape(mask))
  with tf.control_dependencies([tf.debugging.Assert(ok, ['mask size differs from image size'])]):
    return tf.identity(mask)


@dataclasses.dataclass(frozen=True)
class _Recovery:
  """What `iterate_numpy` needs to name the file behind an in-graph decoding error."""
  split: Split
  order: np.ndarray
  batch_size: int
  with_masks: bool
  source: str


def _check_masks(split: Split, with_masks: bool) -> None:
  if with_masks and not split.has_masks:
    missing = next(p for p, m, l in zip(split.paths, split.mask_paths, split.labels)
                   if l and m is None)
    raise ValueError(f'with_masks=True but defective test images have no masks (e.g. {missing}); '
                     'pass with_masks=False for image-level evaluation only')


def _files_examples(split: Split, order: np.ndarray, with_masks: bool, taps_fn, crop: int,
                    labels: tf.Tensor):
  """index dataset -> example dataset for the files source."""
  paths = tf.constant(split.paths)
  codecs = tf.constant([graph_codec(p, 'image') for p in split.paths], tf.int32)
  mask_paths = tf.constant([m or '' for m in split.mask_paths])
  mask_codecs = tf.constant([graph_codec(m, 'mask') if m else PYTHON for m in split.mask_paths],
                            tf.int32)
  has_mask = tf.constant([m is not None for m in split.mask_paths])

  def to_example(index):
    image = _decode_file(paths[index], codecs[index], 'image')
    mask = None
    if with_masks:
      mask = tf.cond(
          has_mask[index],
          lambda: _check_mask_size(image, _decode_file(mask_paths[index], mask_codecs[index],
                                                       'mask')),
          lambda: tf.zeros(tf.shape(image)[:2], tf.bool))
    x, m = _preprocess_graph(image, mask, taps_fn, crop)
    ex = {'image': x, 'label': tf.gather(labels, index), 'index': tf.cast(index, tf.int32)}
    if with_masks:
      ex['mask'] = m
    return ex

  ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
  return ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _tfds_examples(split: Split, data_cfg: Any, with_masks: bool, taps_fn, crop: int,
                   labels: tf.Tensor):
  """The split's TFDS records (in record order) -> example dataset."""
  from pni_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top

  ids = np.asarray(split.record_ids, np.int64)
  if len(ids) != len(split) or np.any(np.diff(ids) <= 0):
    raise ValueError(f'{split.category} {split.split}: a split of the tfds source needs its '
                     'record_ids in increasing order (from load_split, or a subset of it)')
  total = int(ids.max()) + 1
  position = np.full(total, -1, np.int32)
  position[ids] = np.arange(len(ids), dtype=np.int32)
  position = tf.constant(position)
  records = tfds_builders.records(data_cfg, split.category, split.split)

  def keep(ex):
    i = tf.cast(ex['index'], tf.int32)
    return tf.logical_and(i < total, tf.gather(position, tf.minimum(i, total - 1)) >= 0)

  def to_example(ex):
    index = tf.gather(position, tf.cast(ex['index'], tf.int32))
    image = tf.ensure_shape(_decode_bytes(ex['image'], ex['image_codec'], 3), (None, None, 3))
    mask = None
    if with_masks:
      mask = tf.cond(ex['has_mask'],
                     lambda: tf.io.decode_png(ex['mask'], channels=1)[..., 0] != 0,
                     lambda: tf.zeros(tf.shape(image)[:2], tf.bool))
      mask = _check_mask_size(image, mask)
    x, m = _preprocess_graph(image, mask, taps_fn, crop)
    out = {'image': x, 'label': tf.gather(labels, index), 'index': index}
    if with_masks:
      out['mask'] = m
    return out

  return records.filter(keep).map(to_example, num_parallel_calls=tf.data.AUTOTUNE,
                                  deterministic=True)


def make_dataset(split: Split, data_cfg: Any, *, with_masks: bool = True, shuffle: bool = False,
                 seed: int = 0, drop_remainder: bool = False,
                 batch_size: int | None = None) -> tf.data.Dataset:
  """Batches of one split.

  Each element is a dict of numpy-convertible tensors:
    image: [B, crop, crop, 3] float32 in [0, 1] (not normalised; the backbone normalises);
    mask:  [B, crop, crop] float32 in {0, 1}, zeros for good images (only when with_masks);
    label: [B] int32, 0 good / 1 defective;
    index: [B] int32, position of the image in `split`.
  B = batch_size (default data_cfg.batch_size); the last batch may be short unless
  drop_remainder. One pass; call `.repeat()` for more.

  Args:
    split: from `layouts.load_split` (data.source 'files' or 'tfds'), or a subset of one.
    data_cfg: the `data` ConfigDict (source, resize, crop, resize_mode, batch_size; tfds:
      root, tfds_data_dir).
    with_masks: load ground-truth masks. Requires `split.has_masks` when the split has
      defective images.
    shuffle: visit the split in the order `np.random.default_rng(seed).permutation(len(split))`
      (the same order on every call and every machine for that seed). Files source only: TFDS
      records are read in order.
  """
  n = len(split)
  if n == 0:
    raise ValueError(f'{split.category or "split"} {split.split}: no images to load')
  source = str(data_cfg.get('source', 'files'))
  if source not in SOURCES:
    raise ValueError(f'data.source must be one of {SOURCES}, got {source!r}')
  resize, crop = int(data_cfg.resize), int(data_cfg.crop)
  mode = str(data_cfg.get('resize_mode', 'short_side'))
  if mode not in images.RESIZE_MODES:
    raise ValueError(f'data.resize_mode must be one of {images.RESIZE_MODES}, got {mode!r}')
  if crop <= 0 or crop > resize:
    raise ValueError(f'data.crop={crop} must be in [1, data.resize={resize}]')
  bs = int(batch_size or data_cfg.batch_size)
  if bs <= 0:
    raise ValueError(f'data.batch_size must be positive, got {bs}')
  _check_masks(split, with_masks)

  taps_fn = _taps_fn(resize, crop, mode)
  labels = tf.constant(split.labels, tf.int32)
  if source == 'tfds':
    if shuffle:
      raise ValueError("shuffle=True needs data.source='files' (TFDS records are read in order)")
    order = np.arange(n)
    ds = _tfds_examples(split, data_cfg, with_masks, taps_fn, crop, labels)
  else:
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    ds = _files_examples(split, order, with_masks, taps_fn, crop, labels)
  ds = ds.batch(bs, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options).prefetch(2)
  ds.pni_recovery = _Recovery(split, order, bs, with_masks, source)
  return ds


def _python_error(e: tf.errors.OpError) -> Exception | None:
  """The ValueError / FileNotFoundError a numpy function raised, without TF's wrapping."""
  msg = e.message or str(e)
  for line in msg.splitlines():
    line = line.strip()
    for kind in ('FileNotFoundError', 'ValueError'):
      if line.startswith(kind + ': '):
        cls = FileNotFoundError if kind == 'FileNotFoundError' else ValueError
        return cls(line[len(kind) + 2:])
  return None


def _graph_error(path: str, what: str) -> Exception | None:
  """Decodes one file eagerly with the in-graph decoder; its error, naming the file, or None."""
  codec = graph_codec(path, what)
  if codec == PYTHON:
    return None
  try:
    _decode_file(tf.constant(path), tf.constant(codec), what)
  except tf.errors.OpError as e:
    msg = (e.message or str(e)).strip().splitlines()[0]
    return ValueError(f'cannot decode {what} {path}: {msg} (TensorFlow decoder)')
  return None


def _culprit(rec: _Recovery, first: int, tf_message: str) -> Exception:
  """Re-reads the split's files from example `first` on (in iteration order), with the shared
  decoder and then alone with the in-graph one, until one fails; that error names the file."""
  split = rec.split
  if rec.source == 'files':
    for i in rec.order[first:]:
      path, mask_path = split.paths[i], split.mask_paths[i] if rec.with_masks else None
      try:
        image = images.load_image(path)
        if mask_path is not None:
          mask = images.load_mask(mask_path)
          if mask.shape != image.shape[:2]:
            return ValueError(
                f'mask size {mask.shape[0]}x{mask.shape[1]} (HxW) of {mask_path} differs from '
                f'image size {image.shape[0]}x{image.shape[1]} of {path}')
      except (FileNotFoundError, ValueError) as err:
        return err
      err = _graph_error(path, 'image') or (mask_path and _graph_error(mask_path, 'mask'))
      if err:
        return err
  first_msg = (tf_message.strip().splitlines() or ['?'])[0]
  if rec.source == 'tfds' and first < len(rec.order):
    return ValueError(f'cannot decode the TFDS records of {split.category} {split.split} '
                      f'(example {split.paths[rec.order[first]]} or after): {first_msg}')
  return ValueError(f'cannot decode an image of {split.category} {split.split}: {first_msg}')


def iterate_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Yields each batch of `ds` as a dict of numpy arrays.

  Errors raised while decoding (unreadable / truncated image, mask size mismatch) come out as a
  ValueError / FileNotFoundError naming the file, not as a TensorFlow OpError: errors of the
  shared Python decoder pass through; for an in-graph decoding error the files of the failing
  batch and after are re-read with the shared decoder, which names the bad one.
  """
  rec = getattr(ds, 'pni_recovery', None)
  it = iter(ds)
  done = 0
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      err = _python_error(e)
      if err is None and rec is not None:
        err = _culprit(rec, done * rec.batch_size, e.message or str(e))
      raise (err or ValueError(e.message or str(e))) from None
    done += 1
    yield {k: v.numpy() for k, v in batch.items()}
