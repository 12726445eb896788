"""Ensembles of full PNI models on different backbones (paper Table 2, bottom).

Each member's maps and image scores are normalised, then averaged. Two normalisations:
  'holdout'      deployable: z-scores with the mean / std of the member's scores on held-out normal
                 training images (stored with each member model at fit time); no test data used.
  'test_minmax'  the paper's protocol (kept to reproduce its numbers): min-max over the test set,
                 per member. It needs the whole test set first, so it cannot score a single image.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

from absl import logging
import ml_collections
import numpy as np

from pni_jax import config as config_lib
from pni_jax import evaluate
from pni_jax import fileio
from pni_jax import infer
from pni_jax import metrics as metrics_lib

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


HOLDOUT_NAME = 'ensemble (holdout)'
_HOLDOUT_KEYS = ('pixel_mean', 'pixel_std', 'image_mean', 'image_std')


def has_holdout_stats(stats: dict) -> bool:
  """Whether a member was calibrated on held-out normal images (data.holdout_fraction > 0)."""
  return all(k in stats for k in _HOLDOUT_KEYS)


def holdout_affine(stats: dict) -> tuple[tuple[float, float], tuple[float, float]]:
  """((map shift, map scale), (image shift, image scale)) from a member's held-out statistics."""
  for key in _HOLDOUT_KEYS:
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


def evaluate_ensemble(cfg, category: str, cat_dir: pathlib.Path, member_fits: list,
                      test_split, variant: infer.Variant) -> tuple[str, dict[str, dict]]:
  """Scores the test set with every member's `variant`, then the normalised average.

  Args:
    member_fits: [(member name, member cfg, Extractor, fitted PNIModel)].
  Returns:
    (main result name, {name: metrics}) with names 'ensemble (holdout)' (deployable, the main
    result), 'ensemble (test min-max, paper)' and one entry per member. Without held-out images
    (data.holdout_fraction=0, the paper's protocol) there is no deployable normalisation: the
    paper's test min-max result is the main one.
  """
  paper_name = 'ensemble (test min-max, paper)'
  deployable = all(has_holdout_stats(f.stats) for *_, f in member_fits)
  if not deployable:
    logging.warning('[%s] ensemble members have no held-out statistics (data.holdout_fraction=%s): '
                    'reporting the paper\'s test min-max normalisation only', category,
                    cfg.data.holdout_fraction)
  normalisations = ([(HOLDOUT_NAME, lambda maps, scores, fitted: holdout_affine(fitted.stats))]
                    if deployable else [])
  normalisations.append((paper_name, lambda maps, scores, fitted: minmax_affine(maps, scores)))
  main_name = normalisations[0][0]
  eval_dir = cat_dir / 'eval'
  eval_fp = config_lib.fingerprint([f.meta.get('base_fingerprint') for *_, f in member_fits],
                                   [f.meta.get('calibration_fingerprint') for *_, f in member_fits],
                                   cfg.model.scoring, variant.name)
  names = [name for name, _ in normalisations] + [name for name, *_ in member_fits]
  cached = {}
  for name in names:
    path = eval_dir / f'{_safe(name)}.json'
    if path.exists():
      saved = json.loads(path.read_text())
      if saved.get('fingerprint') == eval_fp:
        cached[name] = saved['metrics']
  if len(cached) == len(names):
    logging.info('[%s] reusing the evaluated ensemble', category)
    return main_name, cached

  crop = int(cfg.data.crop)
  n = len(test_split.paths)
  max_fpr = float(cfg.eval.max_fpr)
  results = {}
  with tempfile.TemporaryDirectory(dir=cat_dir, prefix='scratch-') as scratch:
    def memmap(name, dtype=np.float32):
      return np.memmap(os.path.join(scratch, name), dtype, 'w+', shape=(n, crop, crop))
    masks = memmap('masks.u8', np.uint8)
    labels, fig_images = evaluate.labels_masks_figures(cfg, test_split, masks,
                                                       int(cfg.eval.max_figures))
    member_maps, member_scores = [], []
    for i, (name, mcfg, extractor, fitted) in enumerate(member_fits):
      maps = memmap(f'member{i}.f32')
      scores = evaluate.score_split(mcfg, extractor, fitted, variant, test_split, maps,
                                    what=f'[{category}] {name} test images')
      m, _ = metrics_lib.evaluate_with_curves(scores, labels, maps, masks, max_fpr=max_fpr)
      results[name] = {k: float(v) for k, v in m.items()}
      member_maps.append(maps)
      member_scores.append(scores)
    for res_name, affine_fn in normalisations:
      affines = [affine_fn(maps, scores, f) for maps, scores, (*_, f)
                 in zip(member_maps, member_scores, member_fits)]
      maps = combine(member_maps, [a[0] for a in affines], out=memmap('ens.f32'))
      scores = combine(member_scores, [a[1] for a in affines])
      m, curve = metrics_lib.evaluate_with_curves(scores, labels, maps, masks, max_fpr=max_fpr)
      results[res_name] = {k: float(v) for k, v in m.items()}
      if res_name == main_name:
        evaluate.write_main_outputs(cfg, cat_dir, test_split, maps, masks, labels, scores,
                                    fig_images, results[res_name], curve)
      del maps
    for name, m in results.items():
      logging.info('[%s] %-32s I-AUROC %.4f  P-AUROC %.4f  AUPRO %.4f  P-F1 %.4f', category, name,
                   m['image_auroc'], m['pixel_auroc'], m['aupro'], m['pixel_f1_max'])
      fileio.atomic_write_json(eval_dir / f'{_safe(name)}.json',
                               dict(fingerprint=eval_fp, metrics=m))
    del member_maps, masks
  return main_name, {name: results[name] for name in names}


def _safe(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '+-_.' else '_' for c in name)
