"""Evaluation of a fitted category: fit-time calibration on held-out normal images, scoring of
the test set with every variant, metrics, maps and figures (cached per variant in <cat>/eval/)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time
from typing import NamedTuple

import numpy as np
from absl import logging

from pni_jax import config as config_lib
from pni_jax import data as data_lib
from pni_jax import diagnostics
from pni_jax import fileio
from pni_jax import infer
from pni_jax import metrics as metrics_lib
from pni_jax import model as model_lib
from pni_jax import report
from pni_jax.progress import Progress

DIAGNOSTICS = 'diagnostics.json'


def variants_to_evaluate(cfg) -> list[infer.Variant]:
  """The main variant (model.use_*) first, then eval.ablations, without duplicates. An ablation
  N+P row (without R, without '@combine') also gets its eq. 6 ('@mean_prob') and authors'
  ('@mean_score') twins, so both rules are always reported (issue 12 A7)."""
  out = [infer.variant_from_config(cfg.model)]
  for text in cfg.eval.get('ablations', ()):
    v = infer.parse_variant(text)
    twins = ([infer.Variant(True, True, False, c) for c in ('mean_prob', 'mean_score')
              if c != cfg.model.scoring.combine]
             if v.neighborhood and v.position and not v.refinement and v.combine is None else [])
    for w in [v] + twins:
      if w not in out:
        out.append(w)
  return out


def calibrate(cfg, category: str, cat_dir: pathlib.Path, extractor: infer.Extractor,
              fitted: model_lib.PNIModel, holdout_split, variant: infer.Variant,
              score_with: 'EvaluationPlan | None' = None) -> model_lib.PNIModel:
  """Fit-time thresholds and normalisation from held-out normal training images (no test labels).

  score_with: the category's `evaluation_plan`: when it scores `variant`, the held-out images
  are scored by the evaluation's own compiled scorer (all its variants and diagnostics in one
  call; `variant`'s values are used), so a run compiles one scorer instead of two.

  Adds to `fitted.stats` (and saves the model):
    image_threshold  the (1 - eval.threshold_fpr) quantile of held-out image scores
    pixel_threshold  the (1 - eval.pixel_threshold_fpr) quantile of held-out pixel scores
    pixel_mean / pixel_std / image_mean / image_std  held-out score statistics, used by the
      deployable ensemble normalisation.
  """
  fp = config_lib.fingerprint(
      variant.name, cfg.model.scoring, cfg.eval.threshold_fpr, cfg.eval.pixel_threshold_fpr,
      fitted.meta.get('mlp_fingerprint'), fitted.meta.get('position_fingerprint'),
      fitted.meta.get('refine_fingerprint'),
      cfg.model.refine.fusion_weight if variant.refinement else None)
  if fitted.meta.get('calibration_fingerprint') == fp:
    return fitted
  if holdout_split is None or len(holdout_split.paths) == 0:
    logging.warning('[%s] no held-out normal images (data.holdout_fraction=%s): no fit-time '
                    'thresholds; predict mode will need them', category,
                    cfg.data.holdout_fraction)
    return fitted
  n = len(holdout_split.paths)
  image_scores, pixels = split_statistics(cfg, extractor, fitted, variant, holdout_split,
                                          what=f'[{category}] held-out images',
                                          score_with=score_with)
  stats = dict(fitted.stats)
  stats.update(
      image_threshold=np.float32(np.quantile(image_scores, 1 - float(cfg.eval.threshold_fpr),
                                             method='higher')),
      pixel_threshold=np.float32(np.quantile(pixels, 1 - float(cfg.eval.pixel_threshold_fpr),
                                             method='higher')),
      image_mean=np.float32(image_scores.mean()), image_std=np.float32(image_scores.std()),
      pixel_mean=np.float32(pixels.mean()), pixel_std=np.float32(pixels.std()))
  # The config saved with the model is the one its thresholds belong to (predict mode uses it).
  meta = dict(fitted.meta, calibration_fingerprint=fp, calibration_variant=variant.name,
              num_holdout=n, config=config_lib.to_plain(cfg))
  fitted = fitted.replace(stats=stats, meta=meta)
  model_lib.save(fitted, cat_dir / 'model')
  logging.info('[%s] fit-time thresholds from %d held-out images: image %.4f, pixel %.4f',
               category, n, stats['image_threshold'], stats['pixel_threshold'])
  return fitted


def split_statistics(cfg, extractor: infer.Extractor, fitted: model_lib.PNIModel,
                     variant: infer.Variant, split, *, what: str,
                     score_with: 'EvaluationPlan | None' = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """The scores of a split of normal images: (image scores [N] float64, a strided sample of
  their map pixels [P] float64, P ~ eval.calibration_pixels); scored with `score_with`'s
  scorer when it has `variant` (see `calibrate`), else with `variant`'s alone."""
  n = len(split.paths)
  stride = max(1, (n * int(cfg.data.crop) ** 2) // int(cfg.eval.calibration_pixels))
  image_scores, pixels = [], []
  prog = Progress(what, n, unit='img')
  batches = data_lib.batches(split, cfg.data, with_masks=False)
  if score_with is not None and variant in score_with.todo:
    runtime = infer.ModelRuntime(cfg, extractor, fitted, score_with.todo,
                                 diagnostics_of=score_with.diagnostics_of)
  else:
    runtime = infer.ModelRuntime(cfg, extractor, fitted, [variant])
  for batch, outs in runtime.score_batches(batches):
    out = outs[variant.name]
    image_scores.append(out['image'])
    pixels.append(out['maps'].reshape(-1)[::stride])
    prog.update(out['image'].shape[0])
  prog.close()
  return (np.concatenate(image_scores).astype(np.float64),
          np.concatenate(pixels).astype(np.float64))


class EvaluationPlan(NamedTuple):
  """What `evaluate_category` will compute for a category: the variants whose saved metrics are
  missing or stale (`todo`), and the variant whose prior diagnostics it will gather (None:
  saved). `cached` holds the saved metrics still valid."""
  fingerprint: str
  cached: dict
  todo: list
  diagnostics_of: infer.Variant | None


def evaluation_plan(cfg, cat_dir: pathlib.Path, fitted: model_lib.PNIModel,
                    variants: list[infer.Variant]) -> EvaluationPlan:
  """The category's `EvaluationPlan` (reads the saved evaluations under `<cat_dir>/eval`)."""
  eval_dir = cat_dir / 'eval'
  eval_fp = config_lib.fingerprint(
      fitted.meta.get('base_fingerprint'), fitted.meta.get('mlp_fingerprint'),
      fitted.meta.get('position_fingerprint'), fitted.meta.get('refine_fingerprint'),
      cfg.model.scoring, cfg.model.neighborhood.window, cfg.model.refine.fusion_weight)
  cached, todo = {}, []
  for v in variants:
    path = eval_dir / f'{v.name}.json'
    if path.exists():
      saved = json.loads(path.read_text())
      if saved.get('fingerprint') == eval_fp:
        cached[v.name] = saved['metrics']
        continue
    todo.append(v)
  diag_path = eval_dir / DIAGNOSTICS
  have_diag = (diag_path.exists()
               and json.loads(diag_path.read_text()).get('fingerprint') == eval_fp)
  return EvaluationPlan(eval_fp, cached, todo,
                        None if have_diag else diagnostics_variant(cfg, fitted))


def evaluate_category(cfg, category: str, cat_dir: pathlib.Path, extractor: infer.Extractor,
                      fitted: model_lib.PNIModel, test_split,
                      variants: list[infer.Variant]) -> dict[str, dict]:
  """Scores the test set with each variant; returns variant name -> metrics (cached per variant)."""
  eval_dir = cat_dir / 'eval'
  plan = evaluation_plan(cfg, cat_dir, fitted, variants)
  eval_fp, results = plan.fingerprint, dict(plan.cached)
  todo, diag_of = plan.todo, plan.diagnostics_of
  diag_path = eval_dir / DIAGNOSTICS
  if not todo and diag_of is None:
    logging.info('[%s] reusing evaluated variants: %s', category, ', '.join(results))
    return results

  crop = int(cfg.data.crop)
  n = len(test_split.paths)
  num_fig = int(cfg.eval.max_figures)
  with tempfile.TemporaryDirectory(dir=cat_dir, prefix='scratch-') as scratch:
    maps = {v.name: np.memmap(os.path.join(scratch, f'{v.name}.f32'), np.float32, 'w+',
                              shape=(n, crop, crop)) for v in todo}
    masks = np.memmap(os.path.join(scratch, 'masks.u8'), np.uint8, 'w+', shape=(n, crop, crop))
    image_scores = {v.name: np.zeros(n, np.float32) for v in todo}
    allowed = {v.name: 0.0 for v in todo}
    labels = np.zeros(n, np.int32)
    fig_index = _figure_index(n, num_fig)
    fig_images = {}
    prog = Progress(f'[{category}] test images', n, unit='img')
    start = 0
    batches = data_lib.batches(test_split, cfg.data, with_masks=True)
    runtime = infer.ModelRuntime(cfg, extractor, fitted, todo, diagnostics_of=diag_of)
    diag_parts = []
    for batch, outs in runtime.score_batches(batches):
      b = batch['image'].shape[0]
      for v in todo:
        maps[v.name][start:start + b] = outs[v.name]['maps']
        image_scores[v.name][start:start + b] = outs[v.name]['image']
        allowed[v.name] += float(outs[v.name]['allowed'].mean()) * b
      if diag_of is not None:
        values = outs[infer.DIAGNOSTICS]
        grid = next(iter(values.values())).shape[1:3]
        diag_parts.append(diagnostics.summarize(
            values, diagnostics.patch_masks(np.asarray(batch['mask']) > 0.5, grid)))
      _keep_ground_truth(batch, start, masks, labels, fig_index, fig_images)
      start += b
      prog.update(b)
    prog.close()
    if diag_of is not None:
      diag = diagnostics.merge_diagnostics(diag_parts)
      log_diagnostics(category, diag)
      fileio.atomic_write_json(diag_path, dict(fingerprint=eval_fp, diagnostics=diag))

    curves = {}
    t = time.perf_counter()
    for v in todo:
      m, curve = metrics_lib.evaluate_with_curves(image_scores[v.name], labels, maps[v.name],
                                                  masks, max_fpr=float(cfg.eval.max_fpr))
      m = {k: float(val) for k, val in m.items()}
      m['allowed_fraction'] = allowed[v.name] / max(n, 1)
      results[v.name] = m
      curves[v.name] = curve
      fileio.atomic_write_json(eval_dir / f'{v.name}.json', dict(fingerprint=eval_fp, metrics=m))
      if v == variants[0]:
        write_main_outputs(cfg, cat_dir, test_split, maps[v.name], masks, labels,
                            image_scores[v.name], fig_images, m, curve)
    if curves:
      logging.info('[%s] metrics in %.1fs:\n%s', category, time.perf_counter() - t,
                   metrics_table({name: m for name, m in results.items() if name in curves}))
    if len(curves) > 1:
      report.save_pr_curve(cat_dir / 'figures' / 'pr_curve_variants.png',
                           {k: (c['pr']['precision'], c['pr']['recall']) for k, c in curves.items()},
                           {k: results[k]['pixel_f1_max'] for k in curves})
    for arr in maps.values():
      del arr
  return results


def _image_name(path: str) -> str:
  p = pathlib.Path(path)
  return f'{p.parent.name}_{p.stem}'


def write_main_outputs(cfg, cat_dir, split, maps, masks, labels, image_scores, fig_images, m,
                        curve):
  """Heat-map PNGs, per-image panels, the score histogram and the PR curve for the main variant."""
  fig_dir = cat_dir / 'figures'
  lo, hi = float(np.min(maps)), float(np.max(maps))
  if cfg.eval.save_maps:
    for i, path in enumerate(split.paths):
      report.save_heatmap_png(cat_dir / 'maps' / f'{_image_name(path)}.png', maps[i], lo, hi)
  thr = m['pixel_threshold']
  for i, image in sorted(fig_images.items()):
    name = _image_name(split.paths[i])
    report.save_image_figure(fig_dir / f'{name}.png', image, masks[i], maps[i], maps[i] >= thr,
                             f'{name}  score {image_scores[i]:.3f}  label {int(labels[i])}')
  report.save_score_histogram(fig_dir / 'score_histogram.png', curve['hist'], thr)
  report.save_pr_curve(fig_dir / 'pr_curve.png',
                       {'pixel': (curve['pr']['precision'], curve['pr']['recall'])},
                       {'pixel': m['pixel_f1_max']})


def score_split(cfg, extractor, fitted, variant, split, maps_out, *, what: str):
  """Streams `split` through one scorer, writing maps into `maps_out` [N, S, S]; returns the
  image scores [N] float32."""
  n = len(split.paths)
  scores = np.zeros(n, np.float32)
  prog = Progress(what, n, unit='img')
  start = 0
  for _, outs in infer.score_batches(cfg, extractor, fitted, [variant],
                               data_lib.batches(split, cfg.data, with_masks=False)):
    out = outs[variant.name]
    b = out['image'].shape[0]
    maps_out[start:start + b] = out['maps']
    scores[start:start + b] = out['image']
    start += b
    prog.update(b)
  prog.close()
  return scores


def labels_masks_figures(cfg, split, masks_out, num_fig: int):
  """Ground truth of a split into `masks_out` [N, S, S] uint8; returns (labels [N], figure images)."""
  n = len(split.paths)
  labels = np.zeros(n, np.int32)
  fig_index = _figure_index(n, num_fig)
  fig_images, start = {}, 0
  for batch in data_lib.batches(split, cfg.data, with_masks=True):
    _keep_ground_truth(batch, start, masks_out, labels, fig_index, fig_images)
    start += batch['image'].shape[0]
  return labels, fig_images


def _figure_index(n: int, num_fig: int) -> set[int]:
  """Up to `num_fig` test images spread evenly over a split of `n`."""
  if num_fig <= 0 or n <= 0:
    return set()
  return set(np.unique(np.linspace(0, n - 1, num_fig).round().astype(int)).tolist())


def _keep_ground_truth(batch, start: int, masks_out, labels, fig_index, fig_images) -> None:
  """Stores a batch's masks and labels at `start`; keeps the images picked for figures."""
  b = batch['image'].shape[0]
  masks_out[start:start + b] = np.asarray(batch['mask'] > 0.5, np.uint8)
  labels[start:start + b] = np.asarray(batch['label'])
  for j in range(b):
    if start + j in fig_index:
      fig_images[start + j] = np.asarray(batch['image'][j], np.float32)


def diagnostics_variant(cfg, fitted: model_lib.PNIModel) -> infer.Variant | None:
  """The variant whose priors the prior diagnostics examine: the model's N and / or P (None
  when it has neither, or with eval.diagnostics off).

  The diagnostics (`diagnostics.prior_diagnostics`, computed in the test set's scoring call):
  does a prior bind on this test set? Normal and defective patches apart: how often the nearest
  C_emb code is excluded by N, by P, by both (at tau, and at rho * max p), and the mean score
  change N causes (config hyper-parameters)."""
  has_n, has_p = fitted.mlp is not None, fitted.position is not None
  if not (has_n or has_p) or not cfg.eval.get('diagnostics', True):
    return None
  return infer.Variant(has_n, has_p)


def metrics_table(results: dict[str, dict]) -> str:
  """Aligned text lines of each variant's metrics (the log's view of the ablation table)."""
  width = max(len('variant'), *(len(name) for name in results))
  lines = [f'  {"variant":<{width}}  I-AUROC  P-AUROC    AUPRO     P-F1  allowed C_emb']
  lines += [f'  {name:<{width}}  {m["image_auroc"]:7.4f}  {m["pixel_auroc"]:7.4f}  '
            f'{m["aupro"]:7.4f}  {m["pixel_f1_max"]:7.4f}  {m["allowed_fraction"]:13.3f}'
            for name, m in results.items()]
  return '\n'.join(lines)


def log_diagnostics(category: str, diag: dict) -> None:
  logging.info('[%s] priors exclude the nearest code (normal / defect patches): %s', category,
               '; '.join(f'{k} {100 * diag[f"normal/excluded_{k}"]:.1f}% / '
                         f'{100 * diag[f"defect/excluded_{k}"]:.1f}%'
                         for k in ('N', 'P', 'NP') if f'normal/excluded_{k}' in diag))


def read_diagnostics(cat_dir: pathlib.Path) -> dict | None:
  """The saved `prior_diagnostics` of a category (None when it has none)."""
  path = cat_dir / 'eval' / DIAGNOSTICS
  return json.loads(path.read_text())['diagnostics'] if path.exists() else None


DIAGNOSTIC_COLUMNS = tuple(f'{g}/{k}' for k in ('excluded_N', 'excluded_P', 'excluded_NP',
                                                 'rel_excluded_N', 'rel_excluded_P',
                                                 'lift_excluded_P', 'score_change_N',
                                                 'rel_score_change_N')
                           for g in ('normal', 'defect'))


def write_diagnostics_table(workdir: pathlib.Path, categories) -> None:
  """`<workdir>/diagnostics.{csv,md}`: per category, how often N / P / both exclude the nearest
  code of normal and defective patches (percent), and N's mean score change."""
  rows = [(c, d) for c in categories if (d := read_diagnostics(workdir / c)) is not None]
  if not rows:
    return
  percent = [c for c in DIAGNOSTIC_COLUMNS if 'excluded' in c]
  report.write_table(workdir / 'diagnostics', rows, DIAGNOSTIC_COLUMNS, label='category',
                     percent_columns=percent)
