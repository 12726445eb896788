"""Per-category orchestration: data -> fit -> evaluate -> report, resumable in a workdir.

Workdir layout (one folder per category):
  <workdir>/config.json                  the resolved config of the last run
  <workdir>/results.{csv,md}             one row per category + group means (main variant)
  <workdir>/ablation.{csv,md}            one row per evaluated variant (when several)
  <workdir>/<cat>/model/                 the fitted PNIModel (orbax + meta.json)
  <workdir>/<cat>/members/<i>-<backbone>/  an ensemble's members (each a category folder)
  <workdir>/<cat>/ensemble_refine/       an ensemble's one refinement network (ensemble.py)
  <workdir>/<cat>/fit/                   stage caches (coreset, MLP checkpoints, ...)
  <workdir>/<cat>/metrics.json           metrics of the main variant
  <workdir>/<cat>/eval/<variant>.json    metrics of every evaluated variant (reused when present)
  <workdir>/<cat>/maps/*.png             anomaly maps of the main variant
  <workdir>/<cat>/figures/*.png          per-image panels, score histogram, PR curves
A second run on the same workdir reuses the fitted stages and the evaluated variants; a run whose
data / feature / coreset settings differ from the saved model stops with an error naming them.
"""

from __future__ import annotations

import os
import pathlib
import time

import ml_collections
from absl import logging

from pni_jax import compilation
from pni_jax import config as config_lib
from pni_jax import data as data_lib
from pni_jax import ensemble
from pni_jax import evaluate
from pni_jax import fileio
from pni_jax import fit
from pni_jax import infer
from pni_jax import logs
from pni_jax import report
from pni_jax import sharding


# ----------------------------------------------------------------------------- run


def prepare_data(cfg, workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """Resolves the data root; writes the embedded generated set when the config asks for it."""
  cfg = cfg.copy_and_resolve_references()
  if cfg.data.name == 'generated':
    root = pathlib.Path(cfg.data.root or workdir / 'data')
    g = cfg.data.generated
    cats = list(cfg.data.categories) or None
    data_lib.generate(str(root), seed=int(cfg.seed), image_size=int(g.image_size),
                      num_train=int(g.num_train), num_test_good=int(g.num_test_good),
                      num_test_defect=int(g.num_test_defect), categories=cats)
    with cfg.unlocked():
      cfg.data.root = str(root)
  return cfg


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, dict]:
  """Fits and evaluates every category; writes metrics, tables and figures. Returns
  {category: metrics of the main variant}."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cfg = prepare_data(cfg, workdir)
  fileio.atomic_write_json(workdir / 'config.json', config_lib.to_plain(cfg))
  categories = data_lib.list_categories(cfg.data)
  logging.info('categories: %s', ', '.join(categories))
  cfg = run_bucket(cfg, categories)
  variants = evaluate.variants_to_evaluate(cfg)
  needed = infer.Variant(any(v.neighborhood for v in variants), any(v.position for v in variants),
                         any(v.refinement for v in variants))
  members, extractor = [], None
  for backbone, weights in ensemble.members(cfg):
    mcfg = ensemble.member_config(cfg, backbone, weights)
    members.append((backbone, mcfg, infer.make_extractor(mcfg)))
  if members:
    if len(variants) > 1:
      logging.info('ensemble run: eval.ablations are not evaluated (members use %s)',
                   variants[0].name)
    variants = variants[:1]
  else:
    extractor = infer.make_extractor(cfg)
  writer = report.scalar_writer(str(workdir / 'logs'))
  main_results, all_results, groups = {}, {}, {}
  row_names = [v.name for v in variants]
  summary = []
  for step, category in enumerate(categories):
    t0 = time.perf_counter()
    with compilation.CompileCounter() as compiles:
      results, main_name, num_train = _run_category(cfg, workdir / category, category,
                                                    variants, needed, members, extractor)
    if members:
      row_names = list(results)
    main = results[main_name]
    report.write_category_metrics(workdir / category, main)
    report.log_metrics(writer, step, main, prefix=f'{category}/')
    main_results[category] = main
    all_results[category] = results
    groups[category] = data_lib.category_group(cfg.data, category)
    summary.append(dict(category=category, seconds=time.perf_counter() - t0,
                        num_train=num_train, **compiles.as_dict(),
                        **{k: main[k] for k in SUMMARY_METRICS}))
    logging.info('[%s] done in %.1fs: %d compiles (%.1fs, %d from the cache)', category,
                 summary[-1]['seconds'], compiles.compiles, compiles.compile_seconds,
                 compiles.cache_hits)
  report.write_results_table(workdir, main_results, groups)
  if len(row_names) > 1:
    report.write_ablation_table(workdir, all_results, groups, row_names)
  evaluate.write_diagnostics_table(workdir, categories)
  report.write_table(workdir / 'summary', [(r['category'], r) for r in summary],
                     [c for c in SUMMARY_COLUMNS if c != 'category'], label='category')
  fileio.atomic_write_json(workdir / 'summary.json', summary)
  writer.flush()
  logging.info('summary (%s):\n%s', workdir, logs.table(summary, SUMMARY_COLUMNS))
  return main_results


def run_bucket(cfg, categories: list[str]) -> ml_collections.ConfigDict:
  """With runtime.shape_buckets and runtime.run_bucket: `cfg` with runtime.min_train_images set
  to the largest training set of the run (after the hold-out split), so that every category
  is compiled for one shape bucket and a batch job compiles each function once. Unchanged
  otherwise (or when min_train_images is already larger)."""
  rt = cfg.runtime
  if not (rt.shape_buckets and rt.get('run_bucket', False)) or not categories:
    return cfg
  counts = {}
  for category in categories:
    split = data_lib.load_split(cfg.data, category, 'train', check_files=False)
    train, _ = data_lib.train_holdout(split, float(cfg.data.holdout_fraction), int(cfg.seed))
    counts[category] = len(train.paths)
  largest = max(counts, key=counts.get)
  if counts[largest] <= int(rt.get('min_train_images', 0)):
    return cfg
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.runtime.min_train_images = counts[largest]
  if len(set(counts.values())) > 1:
    logging.info('one shape bucket for the run: every category compiled for %d training images '
                 '(the largest, %s; runtime.run_bucket=False: a bucket per category)',
                 sharding.images_bucket(counts[largest]), largest)
  return cfg


SUMMARY_METRICS = ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_f1_max')
SUMMARY_COLUMNS = ('category', 'num_train', 'seconds', 'compiles', 'cache_hits', 'compile_s') + SUMMARY_METRICS


def _run_category(cfg, cat_dir: pathlib.Path, category: str, variants, needed, members,
                  extractor):
  """Fit, calibrate and evaluate one category (each member of an ensemble, then the ensemble).

  members: [(backbone, member config, Extractor)] of an ensemble, or empty (then `extractor`).
  Returns ({result name: metrics}, main result name, number of training images used).
  """
  train = data_lib.load_split(cfg.data, category, 'train')
  test = data_lib.load_split(cfg.data, category, 'test')
  train, holdout = data_lib.train_holdout(train, float(cfg.data.holdout_fraction), int(cfg.seed))
  if not members:
    fitted = fit.fit_category(cfg, category, cat_dir, extractor, train, needed)
    # Calibration scores with the evaluation's scorer: one compilation for both.
    plan = evaluate.evaluation_plan(cfg, cat_dir, fitted, variants)
    fitted = evaluate.calibrate(cfg, category, cat_dir, extractor, fitted, holdout, variants[0],
                                score_with=plan)
    results = evaluate.evaluate_category(cfg, category, cat_dir, extractor, fitted, test, variants)
    return results, variants[0].name, len(train.paths)
  # Members are fitted without R: the ensemble trains one refinement network on its combined map.
  mvariant = ensemble.member_variant(variants[0])
  fits = []
  for i, (backbone, mcfg, ext) in enumerate(members):
    mdir = cat_dir / 'members' / f'{i}-{backbone}'
    fitted = fit.fit_category(mcfg, category, mdir, ext, train, ensemble.member_variant(needed))
    fitted = evaluate.calibrate(mcfg, category, mdir, ext, fitted, holdout, mvariant)
    fits.append((f'member {i}: {backbone}', mcfg, ext, fitted))
  refiner = (ensemble.fit_refiner(cfg, category, cat_dir, fits, train, variants[0])
             if variants[0].refinement else None)
  main_name, results = ensemble.evaluate_ensemble(cfg, category, cat_dir, fits, test, variants[0],
                                                  refiner)
  return results, main_name, len(train.paths)
