"""Operations on `Split`s: subsets, the held-out normal images, and batches through tf.data."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from pni_jax.data.layouts import Split


def subset(split: Split, keep) -> Split:
  """The images `keep` (indices into `split`) of a split, with their labels, masks and paths."""
  keep = np.asarray(keep, np.int64)
  fields = {}
  for f in dataclasses.fields(split):
    value = getattr(split, f.name)
    if isinstance(value, np.ndarray):
      fields[f.name] = value[keep]
    elif isinstance(value, tuple) and len(value) == len(split.paths):
      fields[f.name] = tuple(value[i] for i in keep)
    else:
      fields[f.name] = value
  return dataclasses.replace(split, **fields)


def train_holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
  """Deterministically holds out `fraction` of the normal training images (at least one when
  fraction > 0 and there are >= 2 images). Returns (train, holdout or None)."""
  n = len(split.paths)
  k = int(round(fraction * n))
  if fraction > 0 and n >= 2:
    k = min(max(k, 1), n - 1)
  else:
    k = 0
  if k == 0:
    return split, None
  perm = np.random.default_rng(seed).permutation(n)
  return subset(split, np.sort(perm[k:])), subset(split, np.sort(perm[:k]))


def tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def batches(split: Split, data_cfg: Any, *, with_masks: bool) -> Iterator[dict[str, np.ndarray]]:
  """The split's preprocessed batches as numpy dicts, in order: image [b, S, S, 3] float32,
  label [b] int32, index [b] int32, mask [b, S, S] float32 (with_masks).

  Through tf.data (`pipeline.make_dataset`, parallel decoding) when TensorFlow is installed;
  without it (an accelerator image with jax only) the same preprocessing runs image by image in
  this process (`numpy_batches`), with the same arrays.
  """
  if tensorflow_available():
    from pni_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.iterate_numpy(pipeline.make_dataset(split, data_cfg, with_masks=with_masks))
  return numpy_batches(split, data_cfg, with_masks=with_masks)


def numpy_batches(split: Split, data_cfg: Any, *, with_masks: bool
                  ) -> Iterator[dict[str, np.ndarray]]:
  """`batches` without TensorFlow: PIL decode + `images.preprocess`, the images of the next
  batches decoded on threads (`images.threaded_map`) while the caller works on this one."""
  from pni_jax.data import images  # pylint: disable=g-import-not-at-top
  resize, crop, bs = int(data_cfg.resize), int(data_cfg.crop), int(data_cfg.batch_size)
  mode = str(data_cfg.get('resize_mode', images.LEGACY_RESIZE_MODE))
  n = len(split.paths)
  if n == 0:
    raise ValueError(f'{split.category or "split"} {split.split}: no images to load')

  def load(i: int) -> tuple[np.ndarray, np.ndarray | None]:
    image = images.load_image(split.paths[i])
    crop_image = images.preprocess(image, resize, crop, mode=mode)
    if not with_masks:
      return crop_image, None
    path = split.mask_paths[i]
    if path is None:
      return crop_image, np.zeros((crop, crop), np.float32)
    mask = images.load_mask(path)
    if mask.shape != image.shape[:2]:
      raise ValueError(f'mask size {mask.shape[0]}x{mask.shape[1]} (HxW) of {path} differs '
                       f'from image size {image.shape[0]}x{image.shape[1]} of '
                       f'{split.paths[i]}')
    return crop_image, images.preprocess_mask(mask, resize, crop, mode=mode)

  loads = images.threaded_map(load, range(n), ahead=2 * bs)
  try:
    for start in range(0, n, bs):
      idx = np.arange(start, min(start + bs, n))
      loaded = [next(loads).result() for _ in idx]
      out = {'image': np.stack([c for c, _ in loaded]).astype(np.float32),
             'label': np.asarray([split.labels[i] for i in idx], np.int32),
             'index': idx.astype(np.int32)}
      if with_masks:
        out['mask'] = np.stack([m for _, m in loaded]).astype(np.float32)
      yield out
  finally:
    loads.close()          # a consumer that stops early: the loads not started are cancelled
