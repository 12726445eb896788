"""Position model p(c_dist | x): Algorithm 1 of the paper, as the authors coded it.

For every training image i and feature-map position x = (h, w), let k = index of the C_dist vector
nearest to Phi_i(x). Then hist[x', k] += 1 for every x' in the p x p window centred on x (clipped at
the map borders), and p(c_dist | x') = hist[x', :] / sum_k hist[x', k].

The window spread is linear, so it is done once at the end instead of per image:

  counts[x, k]  = #{images i : nearest(Phi_i(x)) = k}                (streamed, `accumulate_counts`)
  hist[x', k]   = sum_{x : |x - x'|_inf <= p // 2} counts[x, k]       (`position_prior`)

The second line is a p x p box sum over (H, W) with zero padding outside the map, which is exactly
"clipped at borders" (a position outside the map has no counts). It is computed separably, as a
1-D `lax.reduce_window` sum over H and then over W. The counts are whole numbers held in float32,
exact while every box sum stays below 2**24 (fewer than 2**24 / p**2, about 207k images for p = 9).

Memory: the counts are [H, W, K] float32 whatever the number of images; images are added in batches.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def _check_window(window: int, name: str = 'window') -> int:
  window = int(window)
  if window < 1 or window % 2 == 0:
    raise ValueError(f'{name} must be a positive odd integer (a centred p x p window), '
                     f'got {window}')
  return window


def init_counts(height: int, width: int, num_classes: int) -> jax.Array:
  """Zero counts `[H, W, K]` float32 for `K = |C_dist|` classes."""
  if height < 1 or width < 1 or num_classes < 1:
    raise ValueError(f'init_counts needs positive sizes, got H={height}, W={width}, '
                     f'K={num_classes}')
  return jnp.zeros((height, width, num_classes), jnp.float32)


@jax.jit
def accumulate_counts(counts: jax.Array, index_maps: jax.Array) -> jax.Array:
  """Adds one batch of images to the per-position counts (Algorithm 1, lines 2-7, without spread).

  Args:
    counts: `[H, W, K]` float32, running counts (from `init_counts` or a previous call).
    index_maps: `[B, H, W]` int, index of the nearest C_dist vector of each patch feature.
      Entries outside `[0, K)` (e.g. -1 for padding images of a fixed-size batch) are ignored.

  Returns:
    `[H, W, K]` float32, `counts` plus the one-hot counts of the batch (a scatter-add).
  """
  if index_maps.ndim != 3 or index_maps.shape[1:] != counts.shape[:2]:
    raise ValueError(f'index_maps must be [B, H, W] with (H, W) = {counts.shape[:2]}, '
                     f'got {index_maps.shape}')
  height, width, num_classes = counts.shape
  idx = index_maps.astype(jnp.int32)
  valid = (idx >= 0) & (idx < num_classes)
  rows = jnp.broadcast_to(jnp.arange(height)[None, :, None], idx.shape)
  cols = jnp.broadcast_to(jnp.arange(width)[None, None, :], idx.shape)
  return counts.at[rows, cols, jnp.where(valid, idx, 0)].add(valid.astype(counts.dtype))


def _box_sum(x: jax.Array, window: int, axis: int) -> jax.Array:
  """Sum over a centred window of `window` entries along `axis`, zero padding outside."""
  radius = window // 2
  dims = [1] * x.ndim
  dims[axis] = window
  pads = [(0, 0)] * x.ndim
  pads[axis] = (radius, radius)
  return jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, tuple(dims),
                               (1,) * x.ndim, tuple(pads))


@functools.partial(jax.jit, static_argnames=('window',))
def _position_prior(counts: jax.Array, window: int) -> jax.Array:
  hist = _box_sum(_box_sum(counts.astype(jnp.float32), window, 0), window, 1)
  total = hist.sum(axis=-1, keepdims=True)
  uniform = jnp.full_like(hist, 1.0 / hist.shape[-1])
  return jnp.where(total > 0, hist / jnp.maximum(total, 1.0), uniform)


def position_prior(counts: jax.Array, window: int) -> jax.Array:
  """p(c_dist | x): spreads the counts over the p x p window and normalises per position.

  Args:
    counts: `[H, W, K]` float, from `accumulate_counts`.
    window: p, a positive odd integer (paper: 9). The window may be larger than the map.

  Returns:
    `[H, W, K]` float32 whose rows sum to 1. A position without any count (only when no image was
    added) gets the uniform distribution 1/K.
  """
  window = _check_window(window)
  if counts.ndim != 3:
    raise ValueError(f'counts must be [H, W, K], got shape {counts.shape}')
  return _position_prior(jnp.asarray(counts), window)


def position_histogram(index_maps, num_classes: int, window: int, batch: int = 64) -> jax.Array:
  """Convenience: Algorithm 1 over `index_maps` `[N, H, W]` int (numpy or jax), in batches.

  Returns `[H, W, K]` float32, rows summing to 1. Batches are padded with -1 to a fixed size so that
  `accumulate_counts` compiles once.
  """
  window = _check_window(window)
  if batch < 1:
    raise ValueError(f'batch must be >= 1, got {batch}')
  index_maps = np.asarray(index_maps) if not isinstance(index_maps, jax.Array) else index_maps
  if index_maps.ndim != 3 or index_maps.shape[0] == 0:
    raise ValueError(f'index_maps must be a non-empty [N, H, W] array, '
                     f'got shape {index_maps.shape}')
  num, height, width = index_maps.shape
  counts = init_counts(height, width, num_classes)
  batch = min(batch, num)
  for chunk in _padded_batches(index_maps, batch):
    counts = accumulate_counts(counts, chunk)
  return position_prior(counts, window)


def _padded_batches(index_maps, batch: int) -> Iterable[jax.Array]:
  num = index_maps.shape[0]
  xp = jnp if isinstance(index_maps, jax.Array) else np   # host maps padded on the host
  for start in range(0, num, batch):
    chunk = xp.asarray(index_maps[start:start + batch], xp.int32)
    if chunk.shape[0] < batch:
      pad = xp.full((batch - chunk.shape[0],) + chunk.shape[1:], -1, xp.int32)
      chunk = xp.concatenate([chunk, pad], axis=0)
    yield jnp.asarray(chunk)
