"""Ensembles of full PNI models on different backbones (paper Table 2, bottom).

Each member's maps and image scores are normalised, then averaged. Two normalisations:
  'holdout'      deployable: z-scores with the mean / std of the member's scores on held-out normal
                 training images (stored with each member model at fit time); no test data used.
  'test_minmax'  the paper's protocol (kept to reproduce its numbers): min-max over the test set,
                 per member. It needs the whole test set first, so it cannot score a single image.
"""

from __future__ import annotations

import ml_collections
import numpy as np

NORMALIZATIONS = ('holdout', 'test_minmax')


def members(cfg) -> list[tuple[str, str]]:
  """[(backbone, weights)] of the ensemble; empty when `model.ensemble` is empty."""
  names = tuple(cfg.model.get('ensemble', ()))
  weights = tuple(cfg.model.get('ensemble_weights', ()))
  if weights and len(weights) != len(names):
    raise ValueError(f'config.model.ensemble_weights has {len(weights)} entries for '
                     f'{len(names)} ensemble members; give one path per member ("" = embedded)')
  return [(n, weights[i] if weights else '') for i, n in enumerate(names)]


def member_config(cfg, backbone: str, weights: str) -> ml_collections.ConfigDict:
  """The full config of one member: the ensemble's config with this backbone."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.model.backbone = backbone
  out.model.weights = weights
  out.model.ensemble = ()
  out.model.ensemble_weights = ()
  return out


def holdout_affine(stats: dict) -> tuple[tuple[float, float], tuple[float, float]]:
  """((map shift, map scale), (image shift, image scale)) from a member's held-out statistics."""
  for key in ('pixel_mean', 'pixel_std', 'image_mean', 'image_std'):
    if key not in stats:
      raise ValueError(f'ensemble member has no held-out statistic {key!r}: fit it with '
                       'data.holdout_fraction > 0')
  return ((float(stats['pixel_mean']), max(float(stats['pixel_std']), 1e-12)),
          (float(stats['image_mean']), max(float(stats['image_std']), 1e-12)))


def minmax_affine(maps, scores: np.ndarray, chunk: int = 16):
  """((map shift, map scale), (image shift, image scale)) for min-max over a whole test set.

  Args:
    maps: [N, H, W] (array or memmap; read in chunks of `chunk` images).
    scores: [N] image scores.
  """
  lo, hi = np.inf, -np.inf
  for start in range(0, maps.shape[0], chunk):
    block = np.asarray(maps[start:start + chunk])
    lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
  return ((lo, max(hi - lo, 1e-12)),
          (float(scores.min()), max(float(scores.max() - scores.min()), 1e-12)))


def combine(arrays: list, affines: list[tuple[float, float]], out=None, chunk: int = 16):
  """mean_i (arrays[i] - shift_i) / scale_i, chunked over the leading axis; writes into `out`
  (e.g. a memmap) when given. arrays: list of [N, ...] arrays of one shape."""
  n = arrays[0].shape[0]
  if out is None:
    out = np.empty(arrays[0].shape, np.float32)
  for start in range(0, n, chunk):
    acc = np.zeros((min(chunk, n - start),) + tuple(arrays[0].shape[1:]), np.float64)
    for a, (shift, scale) in zip(arrays, affines):
      acc += (np.asarray(a[start:start + chunk], np.float64) - shift) / scale
    out[start:start + chunk] = (acc / len(arrays)).astype(np.float32)
  return out
