"""Sweep cost against single evaluations: `python tools/benchmark.py sweep --workdir=runs/demo`.

On one fitted category (default: the first) it times
  * one evaluation: the test split scored through `infer.ModelRuntime` (backbone + scorer, the
    path the pipeline's evaluation uses) plus the exact host metrics (`metrics.evaluate`), warm
    (compiled) and at the config's hyper-parameters;
  * the sweep of a --points-per-axis^3 grid over (tau_scale, temperature, sigma)
    (default 4 x 4 x 4 = 64 points), `sweep.sweep_category` end to end: the test features from the
    backbone (the on-disk cache removed first), the grid-independent cache, the compiled grid and
    the batched exact metrics (`metrics.grid_metrics`), warm (a first sweep compiles), with its
    parts: cache, grid scoring, metrics;
and prints the ratios against the targets of issue 13: sweep <= 3 x one evaluation, and
<= 1/20 of 64 separate evaluations (64 x the measured one). It also times the metrics alone:
`grid_metrics` on one chunk of maps against `metrics.evaluate` per point.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import time

import jax
import ml_collections
import numpy as np

from pni_jax import data as data_lib
from pni_jax import infer
from pni_jax import metrics
from pni_jax import model as model_lib
from pni_jax import scoring
from pni_jax import sweep
from pni_jax.config import base_config


def _one_evaluation(cfg, runtime, variant, split):
  """Scores the split through the runtime and computes the exact metrics; returns seconds."""
  t = time.perf_counter()
  maps, scores, masks, labels = [], [], [], []
  for batch in data_lib.batches(split, cfg.data, with_masks=True):
    out = runtime.score(batch['image'])[variant.name]
    maps.append(out['maps'])
    scores.append(out['image'])
    masks.append(np.asarray(batch['mask']) > 0.5)
    labels.append(np.asarray(batch['label']))
  t_score = time.perf_counter() - t
  m = metrics.evaluate(np.concatenate(scores), np.concatenate(labels), np.concatenate(maps),
                       np.concatenate(masks), max_fpr=float(cfg.eval.max_fpr))
  return time.perf_counter() - t, t_score, m


def run(args) -> int:
  workdir = pathlib.Path(args.workdir)
  cats = sorted(p.parent.parent.name for p in workdir.glob('*/model/meta.json'))
  if not cats:
    print(f'no fitted model under {workdir}: run the demo first')
    return 2
  category = args.category or cats[0]
  fitted = model_lib.load(workdir / category / 'model')
  cfg = ml_collections.ConfigDict(fitted.meta['config'])
  variant = infer.Variant(bool(cfg.model.use_neighborhood), bool(cfg.model.use_position), False)
  split = data_lib.load_split(cfg.data, category, 'test')
  extractor = infer.make_extractor(cfg)
  runtime = infer.ModelRuntime(cfg, extractor, fitted, [variant])
  n = len(split.paths)
  k = args.points_per_axis
  axes = {'tau_scale': tuple(np.geomspace(0.1, 4.0, k).round(4)),
          'temperature': tuple(np.geomspace(0.5, 4.0, k).round(4)),
          'sigma': tuple(np.linspace(1.0, 8.0, k).round(4))}
  points = len(sweep.grid_points(axes))
  print(f'{workdir} [{category}] {variant.name}: {n} test images at {cfg.data.crop} px; grid '
        f'{" x ".join(str(len(v)) for v in axes.values())} = {points} points over '
        f'{", ".join(axes)}; devices {jax.device_count()} ({jax.devices()[0].platform})')

  _one_evaluation(cfg, runtime, variant, split)                    # compile
  runs = [_one_evaluation(cfg, runtime, variant, split) for _ in range(args.repeats)]
  t_one = statistics.median(r[0] for r in runs)
  t_one_score = statistics.median(r[1] for r in runs)

  with cfg.unlocked():
    if 'sweep' not in cfg:                     # a model saved before config.sweep existed
      cfg.sweep = base_config().sweep
    for name, values in axes.items():
      cfg.sweep[name] = values
  cfg = sweep.effective_config(cfg, fitted)
  cache_dir = workdir / category / 'sweep'
  timings = []
  for i in range(args.repeats + 1):                                   # the first one compiles
    shutil.rmtree(cache_dir, ignore_errors=True)
    t = time.perf_counter()
    rows, parts = sweep.sweep_category(cfg, category, workdir / category, extractor, axes)
    total = time.perf_counter() - t
    if i:
      timings.append((total, parts))
  t_sweep = statistics.median(t for t, _ in timings)
  cache_s = statistics.median(p['cache_s'] for _, p in timings)
  grid_s = statistics.median(p['grid_s'] for _, p in timings)

  # The metrics alone: one chunk of maps through grid_metrics vs evaluate per point.
  spec = sweep.sweep_spec(cfg.model, variant, int(cfg.data.crop), axes)
  feats, masks, labels = sweep.test_features(cfg, workdir / category, fitted, split, extractor)
  cache = sweep.build_cache(model_lib.arrays(fitted), feats, masks, labels, spec,
                            float(cfg.sweep.cache_mb))
  chunk = min(sweep.chunk_size(cfg.sweep, n, int(cfg.data.crop)), points)
  pts = sweep.grid_points(axes)[:chunk]
  base = scoring.hparams_from_config(cfg.model)
  hp = scoring.stack_hparams([scoring.hparams_from_config(cfg.model, **p) for p in pts])
  maps, image, _ = sweep.grid_scores(cache.group_sq, cache.nearest_sq, cache.logits,
                                     cache.position, cache.code_count, cache.feats, cache.c_emb,
                                     hp, hp, spec=spec, num_emb=cache.num_emb,
                                     grid=cache.grid)
  maps, image = np.asarray(maps), np.asarray(image)
  t = time.perf_counter()
  metrics.grid_metrics(image, maps, cache.truth)
  t_grid_metrics = (time.perf_counter() - t) / chunk
  t = time.perf_counter()
  for g in range(min(chunk, 4)):
    metrics.evaluate(image[g], labels, maps[g], masks)
  t_host_metrics = (time.perf_counter() - t) / min(chunk, 4)
  del base

  print(f'\none evaluation (runtime scoring + exact metrics, warm): {t_one:.2f} s '
        f'(scoring {t_one_score:.2f} s, metrics {t_one - t_one_score:.2f} s)')
  print(f'sweep of {points} points (warm, features recomputed): {t_sweep:.2f} s '
        f'(cache: backbone + code distances + logits {cache_s:.2f} s; grid + metrics '
        f'{grid_s:.2f} s in chunks of {chunk})')
  print(f'metrics per point: grid_metrics {1e3 * t_grid_metrics:.0f} ms (batched over {chunk}), '
        f'metrics.evaluate {1e3 * t_host_metrics:.0f} ms')
  print(f'per grid point: {1e3 * grid_s / points:.0f} ms (scoring + maps + metrics)')
  ratio_one = t_sweep / t_one
  ratio_all = t_sweep / (points * t_one)
  print('\ntargets (issue 13, CPU demo):')
  print(f'  sweep / one evaluation         {ratio_one:6.2f}  (<= 3)     '
        f'{"ok" if ratio_one <= 3 else "MISSED"}')
  print(f'  sweep / {points} evaluations        {ratio_all:6.3f}  (<= 0.05)  '
        f'{"ok" if ratio_all <= 0.05 else "MISSED"}  ({points} x the measured one evaluation)')
  best = max(rows, key=lambda r: r['pixel_auroc'])
  print(f'  best P-AUROC {100 * best["pixel_auroc"]:.2f} at ' +
        ', '.join(f'{a}={best[a]:g}' for a in axes))
  return 0


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='benchmark.py sweep', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/demo', help='a fitted workdir (the demo)')
  parser.add_argument('--category', default='')
  parser.add_argument('--points-per-axis', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=2)
  return run(parser.parse_args(argv))
