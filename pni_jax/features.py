"""Backbone taps -> locally aware patch features (PatchCore's feature construction).

For each tapped stage (paper: layer2 and layer3) every position is extended to its p x p
neighbourhood (zero padding), flattened channel-major like torch's `unfold`, and average-pooled
over that flattened vector to `pre_dim` values (torch `adaptive_avg_pool1d` semantics). The coarser
stage is resized bilinearly (half-pixel centres, as torch `align_corners=False`) to the finer grid,
the stages are stacked and pooled once more to `dim` values.

Pooling and bilinear resizing are linear maps over different axes, so pooling each stage at its
native resolution before resizing gives the same features as PatchCore's resize-then-pool order,
at a fraction of the memory.

The whole construction is linear in the stage maps: the p x p neighbourhood, the pooling to
`pre_dim` and the final pooling to `dim` of one stage are together a p x p convolution with a fixed
kernel [p, p, c, k] (k = the output columns the stage feeds), and the resize commutes with it. When
that convolution is small (`DENSE_AGGREGATION_MACS` multiply-adds per position, e.g. the demo's
Lite0 stages: 87,552) `patch_features` runs it as one convolution per stage, which XLA turns into a
fast kernel; the gathered-bins form costs 8x more on XLA:CPU there (measured: 8 demo images,
23 ms -> 3 ms). For wide stages (the paper's WideResNet: 7 M multiply-adds per position, against
a few thousand adds for the bins) the gathered-bins form stays. Both give the same features up to
float rounding (tests compare both with PatchCore's order).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _pool_bins(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
  """Index table and weights of torch `adaptive_avg_pool1d(length -> out)`.

  Returns:
    idx: [out, max_bin] int32 input positions per output bin (padded with 0).
    weight: [out, max_bin] float32, 1/len for the bin's members and 0 for padding.
  """
  starts = (np.arange(out) * length) // out
  ends = -((-(np.arange(out) + 1) * length) // out)  # ceil((i + 1) * L / out)
  sizes = ends - starts
  width = int(sizes.max())
  offs = np.arange(width)[None, :]
  idx = np.minimum(starts[:, None] + offs, length - 1).astype(np.int32)
  weight = np.where(offs < sizes[:, None], 1.0 / sizes[:, None], 0.0).astype(np.float32)
  return idx, weight


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """torch `adaptive_avg_pool1d` over the last axis: [..., L] -> [..., out]."""
  length = x.shape[-1]
  if length == out:
    return x
  if length % out == 0:
    return x.reshape(*x.shape[:-1], out, length // out).mean(-1)
  idx, weight = _pool_bins(length, out)
  return jnp.einsum('...ob,ob->...o', x[..., idx], jnp.asarray(weight, x.dtype))


def local_patches(fmap: jax.Array, p: int) -> jax.Array:
  """p x p neighbourhood of every position, zero padded, flattened channel-major.

  Args:
    fmap: [B, h, w, c].
    p: odd window size.
  Returns:
    [B, h, w, c * p * p], ordered (channel, dy, dx) like torch's `unfold`.
  """
  if p == 1:
    return fmap
  if p % 2 != 1:
    raise ValueError(f'model.aggregation_size must be odd, got {p}')
  r = p // 2
  b, h, w, c = fmap.shape
  padded = jnp.pad(fmap, ((0, 0), (r, r), (r, r), (0, 0)))
  shifts = [padded[:, dy:dy + h, dx:dx + w, :] for dy in range(p) for dx in range(p)]
  return jnp.stack(shifts, axis=-1).reshape(b, h, w, c * p * p)


def layer_embedding(fmap: jax.Array, p: int, pre_dim: int) -> jax.Array:
  """One stage's local aggregation + channel pooling: [B, h, w, c] -> [B, h, w, pre_dim]."""
  return adaptive_avg_pool(local_patches(fmap, p), pre_dim)


# Largest per-position multiply-add count of the folded convolutions (`aggregation_kernels`) for
# which `patch_features` runs them instead of gathering the pooling bins.
DENSE_AGGREGATION_MACS = 2 ** 18


def _pool_matrix(length: int, out: int) -> np.ndarray:
  """torch `adaptive_avg_pool1d(length -> out)` as a matrix [length, out] (float64)."""
  idx, weight = _pool_bins(length, out)
  m = np.zeros((length, out))
  np.add.at(m, (idx, np.broadcast_to(np.arange(out)[:, None], idx.shape)), weight)
  return m


def _stage_columns(num_stages: int, pre_dim: int, dim: int) -> list[tuple[int, int]]:
  """[a_j, b_j): the output columns of the final pooling (stacked stages -> dim) that stage j's
  rows reach (bins [start, end) meeting rows [j pre_dim, (j + 1) pre_dim))."""
  starts = (np.arange(dim) * num_stages * pre_dim) // dim
  ends = -((-(np.arange(dim) + 1) * num_stages * pre_dim) // dim)
  cols = []
  for j in range(num_stages):
    hit = np.flatnonzero((starts < (j + 1) * pre_dim) & (ends > j * pre_dim))
    cols.append((int(hit[0]), int(hit[-1]) + 1))
  return cols


def aggregation_kernels(channels: Sequence[int], p: int, pre_dim: int,
                        dim: int) -> list[tuple[np.ndarray, int]]:
  """The folded linear maps of `patch_features`, one per stage: (kernel [p, p, c_j, k_j] float32,
  first output column a_j), so that patch_features = sum_j resize(conv_SAME(stage_j,
  kernel_j)) placed at columns [a_j, a_j + k_j) (zero padding, as the neighbourhood's).

  kernel[dy, dx, c, o] = (P_j Q_j)[c p^2 + dy p + dx, a_j + o], with P_j the pooling of the
  stage's flattened neighbourhood (channel-major, torch `unfold` order) to `pre_dim` and Q_j the
  stage's rows of the final pooling of the stacked stages to `dim`; k_j spans the columns Q_j
  reaches (dim / number of stages when they divide).
  """
  final = _pool_matrix(len(channels) * pre_dim, dim)
  out = []
  for j, (c, (a, b)) in enumerate(zip(channels, _stage_columns(len(channels), pre_dim, dim))):
    length = c * p * p
    pool = _pool_matrix(length, pre_dim) if length != pre_dim else np.eye(length)
    m = pool @ final[j * pre_dim:(j + 1) * pre_dim, a:b]                 # [c p^2, k_j]
    kernel = m.reshape(c, p, p, b - a).transpose(1, 2, 0, 3)           # [p, p, c, k_j]
    out.append((kernel.astype(np.float32), a))
  return out


def _dense_aggregation(taps, layers, p: int, pre_dim: int, dim: int):
  """patch_features by the folded convolutions (`aggregation_kernels`)."""
  maps = [taps[name].astype(jnp.float32) for name in layers]
  h = max(m.shape[1] for m in maps)
  w = max(m.shape[2] for m in maps)
  out = None
  for fmap, (kernel, a) in zip(maps, aggregation_kernels([m.shape[-1] for m in maps], p,
                                                         pre_dim, dim)):
    y = jax.lax.conv_general_dilated(fmap, jnp.asarray(kernel), (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
    if y.shape[1:3] != (h, w):
      y = jax.image.resize(y, (y.shape[0], h, w, y.shape[3]), 'bilinear', antialias=False)
    y = jnp.pad(y, ((0, 0), (0, 0), (0, 0), (a, dim - a - y.shape[3])))
    out = y if out is None else out + y
  return out


def dense_aggregation_macs(channels: Sequence[int], p: int, pre_dim: int, dim: int) -> int:
  """Multiply-adds per position of the folded convolutions (without building them)."""
  cols = _stage_columns(len(channels), pre_dim, dim)
  return sum(p * p * int(c) * (b - a) for c, (a, b) in zip(channels, cols))


def patch_features(taps: Mapping[str, jax.Array], layers: Sequence[str], p: int, pre_dim: int,
                   dim: int, dense: bool | None = None) -> jax.Array:
  """Stage feature maps -> patch features on the finest tapped grid.

  Args:
    taps: stage name -> [B, h_j, w_j, c_j] feature maps.
    layers: the stages to use, in order (e.g. ('layer2', 'layer3')).
    p: local aggregation window.
    pre_dim: per-stage pooled size.
    dim: final feature size d.
    dense: run the folded convolutions (True) or gather the pooling bins (False); None picks
      the convolutions when they need at most DENSE_AGGREGATION_MACS multiply-adds per position
      (module docstring). Same features up to float rounding.
  Returns:
    [B, H', W', d] float32 with (H', W') the largest tapped grid.
  """
  if p % 2 != 1:
    raise ValueError(f'model.aggregation_size must be odd, got {p}')
  if dense is None:
    channels = [int(taps[name].shape[-1]) for name in layers]
    dense = dense_aggregation_macs(channels, p, pre_dim, dim) <= DENSE_AGGREGATION_MACS
  if dense:
    return _dense_aggregation(taps, layers, p, pre_dim, dim)
  embs = [layer_embedding(taps[name].astype(jnp.float32), p, pre_dim) for name in layers]
  h = max(e.shape[1] for e in embs)
  w = max(e.shape[2] for e in embs)
  resized = [e if e.shape[1:3] == (h, w) else
             jax.image.resize(e, (e.shape[0], h, w, e.shape[3]), 'bilinear', antialias=False)
             for e in embs]
  stacked = jnp.concatenate(resized, axis=-1)  # layer-major, like PatchCore's stack + reshape
  return adaptive_avg_pool(stacked, dim)


def compute_dtype(cfg_model):
  """`model.precision` -> the compute dtype of the backbone and the neighbourhood MLP.

  'bfloat16' rounds activations and weights to bfloat16 while matmuls / convolutions accumulate in
  float32; patch features, coresets and all distances stay float32 (`patch_features` casts the
  taps to float32 before aggregation).
  """
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}.get(cfg_model.precision)
  if dtype is None:
    raise ValueError(f"model.precision must be 'float32' or 'bfloat16', got {cfg_model.precision!r}")
  return dtype


def make_feature_fn(cfg_model, *, variables=None, key=None) -> tuple[Callable, dict]:
  """Builds the pure feature function for a model config.

  Returns:
    (fn, variables) where `fn(variables, images)` maps images [B, S, S, 3] float32 in [0, 1] to
    patch features [B, H', W', d] float32. `fn` is jitted; shapes are static per call site.
  """
  from pni_jax import backbones  # local import: keeps this module importable without weights

  dtype = compute_dtype(cfg_model)
  if variables is None:
    variables = backbones.load_variables(cfg_model.backbone, cfg_model.weights,
                                         allow_random_init=cfg_model.allow_random_init, key=key)
  layers = tuple(cfg_model.layers)
  extract = backbones.extractor(cfg_model.backbone, variables, layers, dtype)
  p, pre_dim, dim = int(cfg_model.aggregation_size), int(cfg_model.pre_dim), int(cfg_model.dim)

  @jax.jit
  def fn(variables, images):
    taps = extract(variables, images)
    return patch_features(taps, layers, p, pre_dim, dim)

  return fn, variables


def feature_grid(cfg_model, crop: int) -> tuple[int, int]:
  """(H', W') of the patch feature grid for square crops of `crop` pixels."""
  from pni_jax import backbones
  strides = backbones.spec(cfg_model.backbone).strides
  s = min(strides[name] for name in cfg_model.layers)
  return -(-crop // s), -(-crop // s)
