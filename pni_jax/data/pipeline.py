"""tf.data input pipeline: a `Split` -> batches of preprocessed images, masks and labels.

Decoding and preprocessing run the numpy/PIL functions of `images.py` inside
`tf.numpy_function`, mapped in parallel with `deterministic=True`: the order of the examples is
the order of the split (or of one seeded shuffle), whatever the number of threads, and the pixels
equal `images.preprocess(images.load_image(path), resize, crop)` exactly. A file that cannot be
decoded stops the iteration with an error naming it.

TensorFlow is kept off the GPU (it must never take memory from JAX).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from pni_jax.data import images
from pni_jax.data.layouts import Split

try:  # harmless with tensorflow-cpu; fails only if TF already initialised its devices
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):
  pass


def _example_fn(split: Split, resize: int, crop: int, with_masks: bool):
  """Returns a numpy function: index -> (image [crop, crop, 3] f32, mask [crop, crop] f32)."""

  def load(index):
    i = int(index)
    path = split.paths[i]
    image = images.load_image(path)
    x = images.preprocess(image, resize, crop)
    if not with_masks:
      return (x,)
    mask_path = split.mask_paths[i]
    if mask_path is None:
      m = np.zeros((crop, crop), np.float32)
    else:
      mask = images.load_mask(mask_path)
      if mask.shape != image.shape[:2]:
        raise ValueError(f'mask size {mask.shape[0]}x{mask.shape[1]} (HxW) of {mask_path} differs '
                         f'from image size {image.shape[0]}x{image.shape[1]} of {path}')
      m = images.preprocess_mask(mask, resize, crop)
    return x, m

  return load


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
    split: from `layouts.load_split`.
    data_cfg: the `data` ConfigDict (resize, crop, batch_size).
    with_masks: load ground-truth masks. Requires `split.has_masks` when the split has
      defective images.
    shuffle: visit the split in the order `np.random.default_rng(seed).permutation(len(split))`
      (the same order on every call and every machine for that seed).
  """
  n = len(split)
  if n == 0:
    raise ValueError(f'{split.category or "split"} {split.split}: no images to load')
  resize, crop = int(data_cfg.resize), int(data_cfg.crop)
  if crop <= 0 or crop > resize:
    raise ValueError(f'data.crop={crop} must be in [1, data.resize={resize}]')
  bs = int(batch_size or data_cfg.batch_size)
  if bs <= 0:
    raise ValueError(f'data.batch_size must be positive, got {bs}')
  if with_masks and not split.has_masks:
    missing = next(p for p, m, l in zip(split.paths, split.mask_paths, split.labels)
                   if l and m is None)
    raise ValueError(f'with_masks=True but defective test images have no masks (e.g. {missing}); '
                     'pass with_masks=False for image-level evaluation only')

  load = _example_fn(split, resize, crop, with_masks)
  labels = tf.constant(split.labels, tf.int32)
  out_types = (tf.float32, tf.float32) if with_masks else (tf.float32,)

  def to_example(index):
    arrays = tf.numpy_function(load, [index], out_types, stateful=False)
    arrays[0].set_shape((crop, crop, 3))
    ex = {'image': arrays[0], 'label': tf.gather(labels, index),
          'index': tf.cast(index, tf.int32)}
    if with_masks:
      arrays[1].set_shape((crop, crop))
      ex['mask'] = arrays[1]
    return ex

  order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
  ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
  ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(bs, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(2)


def _python_error(e: tf.errors.OpError) -> Exception:
  """The message our numpy function raised, without TensorFlow's traceback wrapping."""
  msg = e.message or str(e)
  for line in msg.splitlines():
    line = line.strip()
    for kind in ('FileNotFoundError', 'ValueError'):
      if line.startswith(kind + ': '):
        cls = FileNotFoundError if kind == 'FileNotFoundError' else ValueError
        return cls(line[len(kind) + 2:])
  return ValueError(msg)


def iterate_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Yields each batch of `ds` as a dict of numpy arrays.

  Errors raised while decoding (unreadable / truncated image, mask size mismatch) come out as the
  original ValueError / FileNotFoundError naming the file, not as a TensorFlow OpError.
  """
  it = iter(ds)
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise _python_error(e) from None
    yield {k: v.numpy() for k, v in batch.items()}
