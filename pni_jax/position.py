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


def _window_hist(counts: jax.Array, window: int) -> jax.Array:
  return _box_sum(_box_sum(counts.astype(jnp.float32), window, 0), window, 1)


def _code_rate(hist: jax.Array) -> jax.Array:
  """pi [K]: each code's share of all (window-spread) counts."""
  total = hist.sum(axis=(0, 1))
  return total / jnp.maximum(total.sum(), 1.0)


@functools.partial(jax.jit, static_argnames=('window',))
def _position_prior(counts: jax.Array, window: int, smoothing) -> jax.Array:
  hist = _window_hist(counts, window)
  k = hist.shape[-1]
  hist = hist + jnp.asarray(smoothing, jnp.float32) * k * _code_rate(hist)
  total = hist.sum(axis=-1, keepdims=True)
  uniform = jnp.full_like(hist, 1.0 / k)
  return jnp.where(total > 0, hist / jnp.where(total > 0, total, 1.0), uniform)


def position_prior(counts: jax.Array, window: int, smoothing: float = 0.0) -> jax.Array:
  """p(c_dist | x): spreads the counts over the p x p window and normalises per position.

  Args:
    counts: `[H, W, K]` float, from `accumulate_counts`.
    window: p, a positive odd integer (paper: 9). The window may be larger than the map.
    smoothing: s >= 0 pseudo-counts per code (paper: 0, the raw histogram). s * K * pi(c) is
      added to every position's window counts before normalising, pi(c) the code's share of
      all counts: the posterior mean under a Dirichlet prior centred on pi. A code never seen
      in a position's window becomes "rare here" rather than impossible; it matters where a
      position has few samples per code (a texture's sparse histograms) and hardly where its
      samples concentrate on a few codes (an object's parts). `choose_smoothing` fits s.

  Returns:
    `[H, W, K]` float32 whose rows sum to 1. A position without any count (only when no image was
    added) gets the uniform distribution 1/K.
  """
  window = _check_window(window)
  if counts.ndim != 3:
    raise ValueError(f'counts must be [H, W, K], got shape {counts.shape}')
  if not float(smoothing) >= 0.0:
    raise ValueError(f'position smoothing must be >= 0, got {smoothing}')
  return _position_prior(jnp.asarray(counts), window, jnp.float32(smoothing))


# Candidate pseudo-counts per code for `choose_smoothing` (0 is tried too).
SMOOTHING_GRID = tuple(float(v) for v in np.round(10.0 ** np.linspace(-3, 1, 17), 6))


def _own_window_counts(codes: jax.Array, window: int) -> jax.Array:
  """own[b, y, x] = #{x' in the window of (y, x), inside the map : codes[b, x'] == codes[b, y, x]}
  for codes [B, H, W] int (an image's own contribution to its histogram at its own code)."""
  r = window // 2
  _, h, w = codes.shape
  padded = jnp.pad(codes, ((0, 0), (r, r), (r, r)), constant_values=-1)
  own = jnp.zeros(codes.shape, jnp.float32)
  for dy in range(window):            # the window's offsets (static), not pixels
    for dx in range(window):
      own = own + (padded[:, dy:dy + h, dx:dx + w] == codes).astype(jnp.float32)
  return own


@functools.partial(jax.jit, static_argnames=('window',))
def _loo_log_likelihood(hist: jax.Array, cells: jax.Array, num_images, codes: jax.Array,
                        grid: jax.Array, window: int) -> jax.Array:
  """Sum over the batch's valid patches of log p_s^{-i}(code | x) for every s of `grid` [S]:
  [S] float32 (-inf where a code is unseen without its own image and s = 0)."""
  k = hist.shape[-1]
  valid = codes >= 0
  c = jnp.where(valid, codes, 0)
  own = _own_window_counts(codes, window)                                    # [B, H, W]
  at = jnp.take_along_axis(hist[None], c[..., None], axis=-1)[..., 0]        # [B, H, W]
  rate = _code_rate(hist)[c]                                                 # [B, H, W]
  num = (at - own)[None] + grid[:, None, None, None] * k * rate[None]
  den = (num_images - 1.0) * cells[None, None] + grid[:, None, None, None] * k
  logp = jnp.log(jnp.maximum(num, 0.0)) - jnp.log(jnp.maximum(den, 1e-30))
  return jnp.where(valid[None], logp, 0.0).sum(axis=(1, 2, 3))


def choose_smoothing(index_maps, num_classes: int, window: int, batch: int = 64,
                     grid: tuple[float, ...] = SMOOTHING_GRID) -> tuple[float, dict]:
  """The pseudo-count s of `position_prior` that best predicts each training image's codes from
  the other images' histograms (leave-one-image-out log-likelihood, empirical Bayes).

  For image i and position x with code c: p_s^{-i}(c | x) = (hist[x, c] - own_i(x) + s K pi(c))
  / ((N - 1) n_x + s K), own_i(x) the cells of x's window where image i has code c and n_x the
  window's cells inside the map; pi(c) is every image's code share (not left out: it barely
  depends on one image). Few images per code (a texture) favour a large s, repeatable
  per-position codes (an object's parts) a small one.

  Args:
    index_maps: `[N, H, W]` int codes (N >= 2), as for `position_histogram`.
  Returns:
    (s, {'grid': [0, *grid], 'nll': mean negative log-likelihood per patch for each}); s = 0
    only if every training code is seen at its position without its own image.
  """
  window = _check_window(window)
  index_maps = np.asarray(index_maps)
  if index_maps.ndim != 3 or index_maps.shape[0] < 2:
    raise ValueError('choosing the position smoothing needs [N, H, W] codes of N >= 2 images, '
                     f'got shape {index_maps.shape}')
  num, height, width = index_maps.shape
  batch = min(batch, num)
  hist = _window_hist(count_codes(index_maps, num_classes, batch), window)
  r = window // 2
  rows = np.minimum(np.arange(height) + r, height - 1) - np.maximum(np.arange(height) - r, 0) + 1
  cols = np.minimum(np.arange(width) + r, width - 1) - np.maximum(np.arange(width) - r, 0) + 1
  cells = jnp.asarray(rows[:, None] * cols[None, :], jnp.float32)
  candidates = (0.0,) + tuple(float(v) for v in grid)
  values = jnp.asarray(candidates, jnp.float32)
  total = jnp.zeros(values.shape, jnp.float32)
  for chunk in _padded_batches(index_maps, batch):
    total = total + _loo_log_likelihood(hist, cells, jnp.float32(num), chunk, values, window)
  nll = -np.asarray(total, np.float64) / (num * height * width)
  best = int(np.argmin(nll))
  return candidates[best], {'grid': list(candidates), 'nll': nll.tolist()}


def position_histogram(index_maps, num_classes: int, window: int, batch: int = 64,
                       smoothing: float = 0.0) -> jax.Array:
  """Convenience: Algorithm 1 over `index_maps` `[N, H, W]` int (numpy or jax), in batches
  (`smoothing`: see `position_prior`).

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
  return position_prior(count_codes(index_maps, num_classes, batch), window, smoothing)


def count_codes(index_maps, num_classes: int, batch: int) -> jax.Array:
  """counts [H, W, K] float32 of `index_maps` [N, H, W] (`accumulate_counts` over batches of
  `batch` images, padded with -1 so that it compiles once)."""
  num, height, width = index_maps.shape
  counts = init_counts(height, width, num_classes)
  for chunk in _padded_batches(index_maps, min(batch, num)):
    counts = accumulate_counts(counts, chunk)
  return counts


def _padded_batches(index_maps, batch: int) -> Iterable[jax.Array]:
  num = index_maps.shape[0]
  xp = jnp if isinstance(index_maps, jax.Array) else np   # host maps padded on the host
  for start in range(0, num, batch):
    chunk = xp.asarray(index_maps[start:start + batch], xp.int32)
    if chunk.shape[0] < batch:
      pad = xp.full((batch - chunk.shape[0],) + chunk.shape[1:], -1, xp.int32)
      chunk = xp.concatenate([chunk, pad], axis=0)
    yield jnp.asarray(chunk)
