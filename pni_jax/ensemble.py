"""Ensembles of full PNI models on different backbones (paper Table 2, bottom).

Each member's maps and image scores are normalised, then averaged. Two normalisations:
  'holdout'      deployable: z-scores with the mean / std of the member's scores on held-out normal
                 training images (stored with each member model at fit time); no test data used.
  'test_minmax'  the paper's protocol (kept to reproduce its numbers): min-max over the test set,
                 per member. It needs the whole test set first, so it cannot score a single image.

Refinement (R) is done once, on the ensembled map, as the authors do (issue 12 A3): the members
are fitted without a refinement network, and one network (`fit_refiner`) trains on

  A_ens(I) = mean_i (A_i(I) - shift_i) / scale_i      (A_i: member i's N / P map, without R)

with per-member affines fixed at fit time ('source'):
  'holdout'   mean / std of the member's map pixels on the held-out normal images (the
              statistics `evaluate.calibrate` stores; data.holdout_fraction > 0);
  'training'  the same statistics over the training images (a strided pixel sample of
              eval.calibration_pixels): in-sample, used only to put the members on one scale
              (data.holdout_fraction = 0, the paper's protocol).
The network always sees A_ens, at fit and at test time. With n(.) its fit-time [lo, hi]
normalisation, f the network and w = model.refine.fusion_weight, the ensemble's R rows are
  deployable  (1 - w) n(A_ens) + w f(I, n(A_ens))  (= `refine.fuse` on A_ens), named
              'ensemble (holdout)', or 'ensemble (training stats)' without held-out images;
  paper       (1 - w) A_mm + w f(I, n(A_ens)), A_mm the test-set min-max combination (in [0, 1]).
It is saved in <cat>/ensemble_refine/ (variables, lo / hi, member affines, fingerprint) and
reused while the fingerprint matches; its training checkpoints are <cat>/fit/ensemble-refine-*/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import tempfile
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pni_jax import config as config_lib
from pni_jax import data as data_lib
from pni_jax import evaluate
from pni_jax import fileio
from pni_jax import fit
from pni_jax import infer
from pni_jax import metrics as metrics_lib
from pni_jax import model as model_lib
from pni_jax import scoring
from pni_jax import sharding

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
PAPER_NAME = 'ensemble (test min-max, paper)'
TRAINING_NAME = 'ensemble (training stats)'
REFINER_DIR = 'ensemble_refine'
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


def sample_affine(image_scores: np.ndarray, pixels: np.ndarray):
  """((map shift, map scale), (image shift, image scale)): mean / std of a sample of scores.
  image_scores: [N]; pixels: [P] map pixels."""
  return holdout_affine(dict(pixel_mean=np.mean(pixels), pixel_std=np.std(pixels),
                             image_mean=np.mean(image_scores), image_std=np.std(image_scores)))


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


# ----------------------------------------------------------------------------- one refinement


def member_variant(variant: infer.Variant) -> infer.Variant:
  """What the members score with: the ensemble's variant without R (R is the ensemble's)."""
  return dataclasses.replace(variant, refinement=False)


@dataclasses.dataclass(frozen=True)
class EnsembleRefiner:
  """The ensemble's refinement network and the fit-time normalisation of its input.

  variables: RefineNet {'params', 'batch_stats'}; lo, hi: A_ens normalisation
  (`refine.train_refiner`'s stats); map_affines / image_affines: ((shift, scale), ...) per
  member; meta: fingerprint, source ('holdout' | 'training'), members, variant, history.
  """
  variables: Any
  lo: float
  hi: float
  map_affines: tuple
  image_affines: tuple
  meta: dict

  @property
  def deployable_name(self) -> str:
    return HOLDOUT_NAME if self.meta['source'] == 'holdout' else TRAINING_NAME


def save_refiner(refiner: EnsembleRefiner, directory: str | os.PathLike) -> None:
  """Writes the refiner atomically (`model.save_tree`); numbers other than the network's
  variables are kept exactly in meta.json."""
  meta = dict(refiner.meta, lo=float(refiner.lo), hi=float(refiner.hi),
              map_affines=[list(map(float, a)) for a in refiner.map_affines],
              image_affines=[list(map(float, a)) for a in refiner.image_affines])
  model_lib.save_tree({'variables': refiner.variables}, meta, directory)


def load_refiner(directory: str | os.PathLike) -> EnsembleRefiner:
  tree, meta = model_lib.load_tree(directory)
  numbers = {k: meta.pop(k) for k in ('lo', 'hi', 'map_affines', 'image_affines')}
  return EnsembleRefiner(
      variables=tree['variables'], lo=float(numbers['lo']), hi=float(numbers['hi']),
      map_affines=tuple(tuple(a) for a in numbers['map_affines']),
      image_affines=tuple(tuple(a) for a in numbers['image_affines']), meta=meta)


def combined_map_fn(cfg, member_fits: list, variant: infer.Variant,
                    map_affines) -> Callable[[jax.Array], jax.Array]:
  """A_ens of a device batch: `fn(images01 [B, S, S, 3] in [0, 1]) -> [B, S, S] float32`,
  mean_i (A_i - shift_i) / scale_i with each member's own extractor and scorer of `variant`
  (its MLP in model.precision, as the single model's refinement maps are scored:
  `fit.amap_config`); one jitted function of the members' device arrays
  (`refine.train_refiner`'s amap_fn).

  Args:
    member_fits: [(name, member cfg, Extractor, fitted PNIModel)]; map_affines: [(shift, scale)].
  """
  crop = int(cfg.data.crop)
  fns = tuple((ext.fn, infer.make_scorer(fit.amap_config(mcfg).model, variant, (crop, crop)))
              for _, mcfg, ext, _ in member_fits)
  params = [(ext.variables, sharding.replicate(infer.scoring_arrays(mcfg, fitted), ext.mesh))
            for _, mcfg, ext, fitted in member_fits]
  shifts = jnp.asarray([a[0] for a in map_affines], jnp.float32)
  scales = jnp.asarray([a[1] for a in map_affines], jnp.float32)

  @jax.jit
  def combined(params, shifts, scales, images01):
    total = 0.0
    for i, ((feature_fn, scorer), (variables, arrays)) in enumerate(zip(fns, params)):
      maps = scorer(arrays, feature_fn(variables, images01))['maps']
      total = total + (maps - shifts[i]) / scales[i]
    return total / len(fns)

  return lambda images01: combined(params, shifts, scales, images01)


def refiner_fingerprint(cfg, member_fits: list, variant: infer.Variant, source: str) -> str:
  """What the ensemble's refinement depends on: the refinement and scoring settings, the
  members' fitted parts (and calibration, for held-out affines) and the affines' source."""
  keys = ('base_fingerprint', 'mlp_fingerprint', 'position_fingerprint') + (
      ('calibration_fingerprint',) if source == 'holdout' else ())
  return config_lib.fingerprint(
      cfg.model.refine, fit.amap_config(cfg).model.scoring, member_variant(variant).name, source,
      cfg.seed,
      [[f.meta.get(k) for k in keys] for *_, f in member_fits],
      cfg.eval.calibration_pixels if source == 'training' else None)


def fit_refiner(cfg, category: str, cat_dir: pathlib.Path, member_fits: list, train_split,
                variant: infer.Variant) -> EnsembleRefiner:
  """Trains (or reuses) the ensemble's one refinement network on A_ens of the training images.

  Args:
    member_fits: [(name, member cfg, Extractor, fitted PNIModel)], members fitted and
      calibrated with `member_variant(variant)`.
    train_split: the training images (without the held-out ones).
  """
  mvariant = member_variant(variant)
  source = ('holdout' if all(has_holdout_stats(f.stats) for *_, f in member_fits)
            else 'training')
  fp = refiner_fingerprint(cfg, member_fits, variant, source)
  directory = cat_dir / REFINER_DIR
  if model_lib.exists(directory):
    saved = load_refiner(directory)
    if saved.meta.get('fingerprint') == fp:
      logging.info('[%s] reusing the ensemble refinement in %s', category, directory)
      return saved
  if source == 'holdout':
    affines = [holdout_affine(f.stats) for *_, f in member_fits]
  else:
    logging.info('[%s] no held-out images: the members\' affines come from their maps on the '
                 'training images (in-sample)', category)
    affines = [sample_affine(*evaluate.split_statistics(
        mcfg, ext, fitted, mvariant, train_split, what=f'[{category}] {name} training images'))
               for name, mcfg, ext, fitted in member_fits]
  map_affines = tuple(a[0] for a in affines)
  amap_fn = combined_map_fn(cfg, member_fits, mvariant, map_affines)
  key = jax.random.fold_in(jax.random.key(cfg.seed), 7)
  variables, stats, history = fit.train_refinement(
      cfg, category, cat_dir, amap_fn, train_split, key,
      ckpt_dir=cat_dir / 'fit' / f'ensemble-refine-{fp}',
      what=f'the ensemble of {len(member_fits)} members ({mvariant.name}, {source} affines)')
  refiner = EnsembleRefiner(
      variables=variables, lo=float(stats['lo']), hi=float(stats['hi']), map_affines=map_affines,
      image_affines=tuple(a[1] for a in affines),
      meta=dict(fingerprint=fp, source=source, variant=mvariant.name, history=history,
                members=[name for name, *_ in member_fits], category=category))
  save_refiner(refiner, directory)
  return load_refiner(directory)


@functools.partial(jax.jit, static_argnames=('input_size', 'encoder', 'loss'))
def refined_rows(variables, images01: jax.Array, a_ens: jax.Array, a_paper: jax.Array, lo, hi,
                 weight, *, input_size: int, encoder: str, loss: str):
  """The R rows of one batch (module docstring): (deployable [B, S, S], paper [B, S, S]).

  images01: [B, S, S, 3] in [0, 1]; a_ens: [B, S, S] A_ens with the fit-time affines; a_paper:
  [B, S, S] the test-min-max combination; lo, hi: the refiner's statistics; weight: w.
  """
  from pni_jax import refine  # the refinement network only when used
  a = refine.normalize_map(a_ens, lo, hi)
  refined = refine.refine_maps(variables, images01, a, input_size, encoder, loss)
  w = jnp.asarray(weight, jnp.float32)
  return (1.0 - w) * a + w * refined, (1.0 - w) * jnp.asarray(a_paper, jnp.float32) + w * refined


MAP_IMAGE_SCORES = ('max', 'top_percent')


def refined_image_scores(cfg, maps, member_scores: list, image_affines, chunk: int = 16):
  """[N] image scores of an R row: from its maps [N, S, S] when model.scoring.image_score is
  map-based (as a single model's R row), else the members' image scores combined with
  `image_affines` (refinement does not change patch scores)."""
  sc = cfg.model.scoring
  if sc.image_score not in MAP_IMAGE_SCORES:
    return combine(member_scores, image_affines)
  out = np.empty(maps.shape[0], np.float32)
  for start in range(0, maps.shape[0], chunk):
    block = jnp.asarray(np.asarray(maps[start:start + chunk]))
    out[start:start + chunk] = np.asarray(
        scoring.image_scores(block, block, sc.image_score, float(sc.top_percent)))
  return out


def _refine_split(cfg, refiner: EnsembleRefiner, split, member_maps: list, paper_affines,
                  out_ens, out_paper) -> None:
  """Writes both R rows' maps of a split into out_ens / out_paper [N, S, S], batch by batch
  (images read again; member maps [N, S, S] from `member_maps`)."""
  r = cfg.model.refine
  bs = int(cfg.data.batch_size)
  variables = jax.device_put(refiner.variables)
  static = dict(input_size=int(r.input_size), encoder=str(r.encoder), loss=str(r.loss))

  def pad(x):   # one batch shape, one compilation
    return sharding.pad_rows(np.asarray(x, np.float32), bs)[0]

  start = 0
  for batch in data_lib.batches(split, cfg.data, with_masks=False):
    b = batch['image'].shape[0]
    rows = [m[start:start + b] for m in member_maps]
    a_ens = combine(rows, refiner.map_affines)
    a_paper = combine(rows, paper_affines)
    ens, paper = refined_rows(variables, pad(batch['image']), pad(a_ens), pad(a_paper),
                              refiner.lo, refiner.hi, float(r.fusion_weight), **static)
    out_ens[start:start + b] = np.asarray(ens)[:b]
    out_paper[start:start + b] = np.asarray(paper)[:b]
    start += b
  if start != len(split.paths):
    raise ValueError(f'expected {len(split.paths)} test images, the pipeline gave {start}')


# ----------------------------------------------------------------------------- evaluation


def evaluate_ensemble(cfg, category: str, cat_dir: pathlib.Path, member_fits: list,
                      test_split, variant: infer.Variant,
                      refiner: EnsembleRefiner | None = None) -> tuple[str, dict[str, dict]]:
  """Scores the test set with every member, then the normalised average (refined once when the
  variant has R).

  Args:
    member_fits: [(member name, member cfg, Extractor, fitted PNIModel)]; the members score with
      `member_variant(variant)` (no R).
    refiner: the ensemble's refinement (`fit_refiner`); required when `variant` has R.
  Returns:
    (main result name, {name: metrics}) with names 'ensemble (holdout)' (deployable, the main
    result), 'ensemble (test min-max, paper)' and one entry per member (without R). Without
    held-out images (data.holdout_fraction=0, the paper's protocol) the paper's test min-max
    result is the main one; with R it then has 'ensemble (training stats)' beside it (the R rows
    are defined in the module docstring), without R there is no deployable row.
  """
  if variant.refinement != (refiner is not None):
    raise ValueError(f'[{category}] the ensemble variant {variant.name} '
                     + ('needs the ensemble\'s refinement network (fit_refiner)'
                        if variant.refinement else 'has no R: pass no refinement network'))
  mvariant = member_variant(variant)
  deployable = all(has_holdout_stats(f.stats) for *_, f in member_fits)
  if refiner is not None:
    row_names = ([HOLDOUT_NAME, PAPER_NAME] if refiner.meta['source'] == 'holdout'
                 else [PAPER_NAME, TRAINING_NAME])
  else:
    if not deployable:
      logging.warning('[%s] ensemble members have no held-out statistics '
                      '(data.holdout_fraction=%s): reporting the paper\'s test min-max '
                      'normalisation only', category, cfg.data.holdout_fraction)
    row_names = [HOLDOUT_NAME, PAPER_NAME] if deployable else [PAPER_NAME]
  main_name = row_names[0]
  eval_dir = cat_dir / 'eval'
  eval_fp = config_lib.fingerprint(
      [[f.meta.get(k) for k in ('base_fingerprint', 'mlp_fingerprint', 'position_fingerprint',
                                'calibration_fingerprint')] for *_, f in member_fits],
      cfg.model.scoring, variant.name,
      None if refiner is None else [refiner.meta['fingerprint'], cfg.model.refine.fusion_weight])
  names = row_names + [name for name, *_ in member_fits]
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
      scores = evaluate.score_split(mcfg, extractor, fitted, mvariant, test_split, maps,
                                    what=f'[{category}] {name} test images')
      m, _ = metrics_lib.evaluate_with_curves(scores, labels, maps, masks, max_fpr=max_fpr)
      results[name] = {k: float(v) for k, v in m.items()}
      member_maps.append(maps)
      member_scores.append(scores)
    minmax = [minmax_affine(maps, scores) for maps, scores in zip(member_maps, member_scores)]
    rows = {}   # name -> (maps [N, S, S], image scores [N])
    if refiner is None:
      if deployable:
        held = [holdout_affine(f.stats) for *_, f in member_fits]
        rows[HOLDOUT_NAME] = (combine(member_maps, [a[0] for a in held], out=memmap('ens.f32')),
                              combine(member_scores, [a[1] for a in held]))
      rows[PAPER_NAME] = (combine(member_maps, [a[0] for a in minmax], out=memmap('mm.f32')),
                          combine(member_scores, [a[1] for a in minmax]))
    else:
      ens_maps, paper_maps = memmap('ens.f32'), memmap('mm.f32')
      _refine_split(cfg, refiner, test_split, member_maps, [a[0] for a in minmax], ens_maps,
                    paper_maps)
      rows[refiner.deployable_name] = (ens_maps, refined_image_scores(
          cfg, ens_maps, member_scores, refiner.image_affines))
      rows[PAPER_NAME] = (paper_maps, refined_image_scores(
          cfg, paper_maps, member_scores, [a[1] for a in minmax]))
    for res_name in row_names:
      maps, scores = rows[res_name]
      m, curve = metrics_lib.evaluate_with_curves(scores, labels, maps, masks, max_fpr=max_fpr)
      results[res_name] = {k: float(v) for k, v in m.items()}
      if res_name == main_name:
        evaluate.write_main_outputs(cfg, cat_dir, test_split, maps, masks, labels, scores,
                                    fig_images, results[res_name], curve)
    del rows, maps
    for name, m in results.items():
      logging.info('[%s] %-32s I-AUROC %.4f  P-AUROC %.4f  AUPRO %.4f  P-F1 %.4f', category, name,
                   m['image_auroc'], m['pixel_auroc'], m['aupro'], m['pixel_f1_max'])
      fileio.atomic_write_json(eval_dir / f'{_safe(name)}.json',
                               dict(fingerprint=eval_fp, metrics=m))
    del member_maps, masks
  return main_name, {name: results[name] for name in names}


def _safe(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '+-_.' else '_' for c in name)
