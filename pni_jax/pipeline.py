"""Per-category orchestration: data -> fit -> evaluate -> report, resumable in a workdir.

Workdir layout (one folder per category):
  <workdir>/config.json                  the resolved config of the last run
  <workdir>/results.{csv,md}             one row per category + group means (main variant)
  <workdir>/ablation.{csv,md}            one row per evaluated variant (when several)
  <workdir>/<cat>/model/                 the fitted PNIModel (orbax + meta.json)
  <workdir>/<cat>/fit/                   stage caches (coreset, MLP checkpoints, ...)
  <workdir>/<cat>/metrics.json           metrics of the main variant
  <workdir>/<cat>/eval/<variant>.json    metrics of every evaluated variant (reused when present)
  <workdir>/<cat>/maps/*.png             anomaly maps of the main variant
  <workdir>/<cat>/figures/*.png          per-image panels, score histogram, PR curves
A second run on the same workdir reuses the fitted stages and the evaluated variants; a run whose
data / feature / coreset settings differ from the saved model stops with an error naming them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pni_jax import coreset
from pni_jax import data as data_lib
from pni_jax import ensemble
from pni_jax import features
from pni_jax import fileio
from pni_jax import fit
from pni_jax import infer
from pni_jax import metrics as metrics_lib
from pni_jax import model as model_lib
from pni_jax import neighborhood
from pni_jax import report
from pni_jax import sharding
from pni_jax.progress import Progress
from pni_jax.store import FeatureStore

MAIN_KEYS = ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_f1_max', 'image_f1_max', 'fpr', 'fnr')


# ----------------------------------------------------------------------------- config helpers


def _to_plain(value):
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _to_plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_to_plain(v) for v in value]
  return value


def fingerprint(*slices) -> str:
  """Short stable hash of config slices (ConfigDicts / plain values)."""
  text = json.dumps([_to_plain(s) for s in slices], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _base_fingerprint(cfg) -> dict:
  """What determines features and coresets: a saved model is only reused when these match."""
  d, m = cfg.data, cfg.model
  return dict(data=dict(name=d.name, resize=d.resize, crop=d.crop,
                        holdout_fraction=d.holdout_fraction,
                        generated=_to_plain(d.generated) if d.name == 'generated' else None),
              backbone=m.backbone, weights=m.weights, layers=list(m.layers),
              precision=m.precision, aggregation_size=m.aggregation_size, pre_dim=m.pre_dim,
              dim=m.dim, coreset=_to_plain(m.coreset), seed=cfg.seed)


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


# ----------------------------------------------------------------------------- data helpers


def _subset(split, keep: np.ndarray):
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


def train_holdout(split, fraction: float, seed: int):
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
  return _subset(split, np.sort(perm[k:])), _subset(split, np.sort(perm[:k]))


def _batches(split, cfg, *, with_masks: bool):
  ds = data_lib.make_dataset(split, cfg.data, with_masks=with_masks)
  return data_lib.iterate_numpy(ds)


# ----------------------------------------------------------------------------- fitting


@dataclasses.dataclass
class Extractor:
  """The jitted feature function and backbone variables, shared by every category.

  Batches are split over `mesh` (all devices); `batch_size` is data.batch_size rounded up to a
  multiple of the device count, the variables are replicated.
  """
  fn: object
  variables: object
  batch_size: int
  mesh: object
  scorers: dict = dataclasses.field(default_factory=dict)

  def scorer(self, cfg, variant: infer.Variant):
    """The data-parallel jitted scorer of `variant`, built once per run (not per category), so
    categories with equal shapes reuse its compilation."""
    crop = int(cfg.data.crop)
    key = (variant, crop)
    if key not in self.scorers:
      self.scorers[key] = sharding.data_parallel(infer.make_scorer(cfg.model, variant,
                                                                   (crop, crop)),
                                                 self.mesh, sharded_argnums=(1, 2))
    return self.scorers[key]


def make_extractor(cfg) -> Extractor:
  fn, variables = features.make_feature_fn(cfg.model, key=jax.random.key(cfg.seed))
  mesh = sharding.make_mesh()
  return Extractor(fn, sharding.replicate(variables, mesh),
                   sharding.padded_size(int(cfg.data.batch_size), sharding.num_shards(mesh)), mesh)


def _feature_shape(extractor: Extractor, crop: int):
  shape = jax.eval_shape(extractor.fn, extractor.variables,
                         jax.ShapeDtypeStruct((extractor.batch_size, crop, crop, 3), jnp.float32))
  return tuple(shape.shape[1:])


def fit_category(cfg, category: str, cat_dir: pathlib.Path, extractor: Extractor,
                 train_split, needed: infer.Variant) -> model_lib.PNIModel:
  """Fits (or reuses) every component `needed` asks for; returns the saved model."""
  model_dir = cat_dir / 'model'
  fit_dir = cat_dir / 'fit'
  base_fp = fingerprint(_base_fingerprint(cfg))
  nb_fp = fingerprint(cfg.model.neighborhood, base_fp)
  pos_fp = fingerprint(cfg.model.position, base_fp)
  main = infer.Variant(needed.neighborhood and cfg.model.use_neighborhood,
                       needed.position and cfg.model.use_position, False)
  ref_fp = fingerprint(cfg.model.refine, base_fp, main.name, cfg.model.scoring,
                       nb_fp if main.neighborhood else None, pos_fp if main.position else None)

  model = None
  if (model_dir / 'meta.json').exists():
    model = model_lib.load(model_dir)
    if model.meta.get('base_fingerprint') != base_fp:
      raise ValueError(
          f'{model_dir} was fitted with other data / feature / coreset settings than this run '
          f'(saved {model.meta.get("base_config")}); use another --workdir or delete {model_dir}')
  have_mlp = model is not None and model.mlp is not None and model.meta.get('mlp_fingerprint') == nb_fp
  have_pos = (model is not None and model.position is not None
              and model.meta.get('position_fingerprint') == pos_fp)
  have_ref = (model is not None and model.refine is not None
              and model.meta.get('refine_fingerprint') == ref_fp)
  missing_nb = needed.neighborhood and not have_mlp
  missing_pos = needed.position and not have_pos
  missing_ref = needed.refinement and not have_ref
  if model is not None and not (missing_nb or missing_pos or missing_ref):
    logging.info('[%s] reusing the fitted model in %s', category, model_dir)
    return model

  previous = model
  t0 = time.perf_counter()
  crop = int(cfg.data.crop)
  h, w, d = _feature_shape(extractor, crop)
  n = len(train_split.paths)
  if n == 0:
    raise ValueError(f'[{category}] the training set is empty')
  cap = int(float(cfg.memory.feature_cap_mb) * 2 ** 20)
  fit_dir.mkdir(parents=True, exist_ok=True)
  key = jax.random.key(cfg.seed)
  k_proj, k_core, k_mlp = jax.random.split(key, 3)
  cs = cfg.model.coreset
  proj = (coreset.random_projection(k_proj, d, int(cs.projection_dim))
          if int(cs.projection_dim) > 0 else None)
  timings = dict(model.meta.get('timings', {})) if model is not None else {}
  with tempfile.TemporaryDirectory(dir=fit_dir, prefix='scratch-') as scratch, \
       FeatureStore((n, h, w, d), cap_bytes=cap, scratch_dir=scratch) as store:
    if store.spilled:
      logging.info('[%s] train features (%.1f MB) exceed memory.feature_cap_mb=%g: '
                   'memory-mapped in %s', category, store.nbytes / 2 ** 20,
                   cfg.memory.feature_cap_mb, scratch)
    t = time.perf_counter()
    projected = fit.extract_features(extractor.fn, extractor.variables,
                                     _batches(train_split, cfg, with_masks=False), n,
                                     extractor.batch_size, store, proj, mesh=extractor.mesh)
    timings['features_s'] = time.perf_counter() - t

    core_path = fit_dir / 'coreset.npz'
    core = None
    if core_path.exists():
      z = np.load(core_path)
      if str(z['fingerprint']) == base_fp:
        core = dict(c_emb=z['c_emb'], emb_to_dist=z['emb_to_dist'], num_dist=int(z['num_dist']))
        logging.info('[%s] reusing the coreset in %s', category, core_path)
    if core is None:
      t = time.perf_counter()
      core = fit.select_coreset(projected, store, cs, k_core, mesh=extractor.mesh)
      timings['coreset_s'] = time.perf_counter() - t
      with fileio.atomic_open(core_path, 'wb') as f:
        np.savez(f, fingerprint=base_fp, **core)
    del projected
    logging.info('[%s] |C_emb| = %d, |C_dist| = %d from %d patches', category,
                 core['c_emb'].shape[0], core['num_dist'], n * h * w)

    position = model.position if (model is not None and have_pos) else None
    mlp = model.mlp if (model is not None and have_mlp) else None
    mlp_history = model.meta.get('mlp_history') if model is not None else None
    sc = cfg.model.scoring
    if missing_nb or missing_pos:
      t = time.perf_counter()
      codes = fit.nearest_codes(store, core['c_emb'][:core['num_dist']],
                                images_per_chunk=extractor.batch_size,
                                query_tile=int(sc.query_tile), bank_tile=int(sc.bank_tile),
                                mesh=extractor.mesh)
      timings['codes_s'] = time.perf_counter() - t
    if missing_pos:
      t = time.perf_counter()
      position = fit.position_prior(codes, core['num_dist'], int(cfg.model.position.window),
                                    images_per_chunk=extractor.batch_size)
      timings['position_s'] = time.perf_counter() - t
    if missing_nb:
      t = time.perf_counter()
      variables, history = neighborhood.train_mlp(
          store.array, codes, cfg.model.neighborhood, k_mlp,
          ckpt_dir=str((fit_dir / f'mlp-{nb_fp}').absolute()), num_classes=int(core['num_dist']),
          log_fn=lambda msg: logging.info('[%s] %s', category, msg),
          dtype=features.compute_dtype(cfg.model), mesh=extractor.mesh,
          device_cap_bytes=int(float(cfg.memory.get('device_feature_cap_mb', 0)) * 2 ** 20))
      mlp = jax.tree.map(np.asarray, variables)
      mlp_history = _to_plain(history)
      timings['mlp_s'] = time.perf_counter() - t

  meta = dict(category=category, backbone=cfg.model.backbone, grid=[h, w], dim=d,
              crop=crop, resize=int(cfg.data.resize), num_dist=int(core['num_dist']),
              base_fingerprint=base_fp, base_config=_base_fingerprint(cfg),
              mlp_fingerprint=nb_fp if mlp is not None else None,
              position_fingerprint=pos_fp if position is not None else None,
              mlp_history=mlp_history, num_train=n, timings=timings,
              config=_to_plain(cfg))
  model = model_lib.PNIModel(c_emb=np.asarray(core['c_emb'], np.float32),
                             emb_to_dist=np.asarray(core['emb_to_dist'], np.int32),
                             position=position, mlp=mlp, meta=meta)
  if needed.refinement:
    if have_ref:  # another component was refitted; the refinement stage still holds
      model = model.replace(
          refine=previous.refine,
          stats={k: previous.stats[k] for k in ('refine_lo', 'refine_hi')},
          meta=dict(meta, refine_fingerprint=ref_fp,
                    refine_history=previous.meta.get('refine_history')))
    else:
      t = time.perf_counter()
      model = fit_refinement(cfg, category, cat_dir, extractor, model, train_split, main, ref_fp,
                             jax.random.fold_in(key, 7))
      timings['refine_s'] = time.perf_counter() - t
  model_lib.save(model, model_dir)
  logging.info('[%s] fitted in %.1fs (%s)', category, time.perf_counter() - t0,
               ', '.join(f'{k} {v:.1f}' for k, v in timings.items()))
  return model_lib.load(model_dir)


def _split_images_uint8(split, cfg, scratch: str) -> np.ndarray:
  """All images of a split as uint8 [N, S, S, 3] (the refinement stage's normal images): in
  memory under `memory.feature_cap_mb`, else memory-mapped in `scratch`."""
  crop = int(cfg.data.crop)
  shape = (len(split.paths), crop, crop, 3)
  if np.prod(shape) > float(cfg.memory.feature_cap_mb) * 2 ** 20:
    out = np.memmap(os.path.join(scratch, 'images.u8'), np.uint8, 'w+', shape=shape)
  else:
    out = np.empty(shape, np.uint8)
  start = 0
  for batch in _batches(split, cfg, with_masks=False):
    b = batch['image'].shape[0]
    out[start:start + b] = np.round(np.clip(batch['image'], 0, 1) * 255).astype(np.uint8)
    start += b
  return out


def fit_refinement(cfg, category: str, cat_dir: pathlib.Path, extractor: Extractor,
                   model: model_lib.PNIModel, train_split, main: infer.Variant, ref_fp: str,
                   key) -> model_lib.PNIModel:
  """Trains the refinement network on synthetic defects of the training images (section 3.3).

  A_hat comes from the fitted model's `main` variant (its N / P settings, without R). Returns the
  model with `refine` variables, `stats['refine_lo' / 'refine_hi']` and a figure of samples.
  """
  from pni_jax import refine  # the refinement network only when used

  r = cfg.model.refine
  crop = int(cfg.data.crop)
  bs = int(r.batch_size)
  arrays = model_lib.arrays(model)
  scorer = infer.make_scorer(cfg.model, main, (crop, crop))

  @jax.jit
  def amap_fn(images01):
    return scorer(arrays, extractor.fn(extractor.variables, images01))['maps']

  scratch = tempfile.TemporaryDirectory(dir=cat_dir / 'fit', prefix='scratch-')
  images = _split_images_uint8(train_split, cfg, scratch.name)
  logging.info('[%s] refinement: %d normal images, %d iterations of batch %d at %d px (%s), '
               'A_hat from %s', category, images.shape[0], int(r.iterations), bs,
               int(r.input_size), r.encoder, main.name)
  variables, stats, history = refine.train_refiner(
      images, amap_fn, r, key, ckpt_dir=str((cat_dir / 'fit' / f'refine-{ref_fp}').absolute()),
      log_fn=lambda msg: logging.info('[%s] %s', category, msg))
  variables = jax.tree.map(np.asarray, variables)
  figure = cat_dir / 'figures' / 'refine_samples.png'
  refine.save_training_figure(figure, jax.random.fold_in(key, 1), images, amap_fn, variables,
                              stats, r, num_samples=4)
  del images
  scratch.cleanup()
  return model.replace(
      refine=variables,
      stats=dict(model.stats, refine_lo=np.float32(stats['lo']), refine_hi=np.float32(stats['hi'])),
      meta=dict(model.meta, refine_fingerprint=ref_fp,
                refine_history={k: v for k, v in _to_plain(history).items()
                                if k in ('pool_size', 'num_images', 'total_seconds')}))


# ----------------------------------------------------------------------------- calibration


def calibrate(cfg, category: str, cat_dir: pathlib.Path, extractor: Extractor,
              fitted: model_lib.PNIModel, holdout_split, variant: infer.Variant
              ) -> model_lib.PNIModel:
  """Fit-time thresholds and normalisation from held-out normal training images (no test labels).

  Adds to `fitted.stats` (and saves the model):
    image_threshold  the (1 - eval.threshold_fpr) quantile of held-out image scores
    pixel_threshold  the (1 - eval.pixel_threshold_fpr) quantile of held-out pixel scores
    pixel_mean / pixel_std / image_mean / image_std  held-out score statistics, used by the
      deployable ensemble normalisation.
  """
  fp = fingerprint(variant.name, cfg.model.scoring, cfg.eval.threshold_fpr,
                   cfg.eval.pixel_threshold_fpr, fitted.meta.get('mlp_fingerprint'),
                   fitted.meta.get('position_fingerprint'), fitted.meta.get('refine_fingerprint'),
                   cfg.model.refine.fusion_weight if variant.refinement else None)
  if fitted.meta.get('calibration_fingerprint') == fp:
    return fitted
  if holdout_split is None or len(holdout_split.paths) == 0:
    logging.warning('[%s] no held-out normal images (data.holdout_fraction=%s): no fit-time '
                    'thresholds; predict mode will need them', category,
                    cfg.data.holdout_fraction)
    return fitted
  n = len(holdout_split.paths)
  stride = max(1, (n * int(cfg.data.crop) ** 2) // int(cfg.eval.calibration_pixels))
  image_scores, pixels = [], []
  prog = Progress(f'[{category}] held-out images', n, unit='img')
  batches = _batches(holdout_split, cfg, with_masks=False)
  for batch, outs in score_batches(cfg, extractor, fitted, [variant], batches):
    out = outs[variant.name]
    image_scores.append(out['image'])
    pixels.append(out['maps'].reshape(-1)[::stride])
    prog.update(out['image'].shape[0])
  prog.close()
  image_scores = np.concatenate(image_scores).astype(np.float64)
  pixels = np.concatenate(pixels).astype(np.float64)
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
              num_holdout=n, config=_to_plain(cfg))
  fitted = fitted.replace(stats=stats, meta=meta)
  model_lib.save(fitted, cat_dir / 'model')
  logging.info('[%s] fit-time thresholds from %d held-out images: image %.4f, pixel %.4f',
               category, n, stats['image_threshold'], stats['pixel_threshold'])
  return fitted


# ----------------------------------------------------------------------------- evaluation


def pad_batch(images: np.ndarray, batch_size: int) -> np.ndarray:
  """Pads [b, S, S, 3] to [batch_size, S, S, 3] by repeating the last image (one jit shape)."""
  b = images.shape[0]
  if b == batch_size:
    return images
  return np.concatenate([images, np.repeat(images[-1:], batch_size - b, axis=0)])


def score_batches(cfg, extractor: Extractor, fitted: model_lib.PNIModel,
                  variants: list[infer.Variant], batches):
  """Scores batches of images with every variant.

  Yields (batch, {variant name: dict(maps [b, S, S], image [b], allowed [b, h, w])}) with numpy
  arrays cut to the batch's real size.
  """
  mesh = extractor.mesh
  arrays = sharding.replicate(model_lib.arrays(fitted), mesh)
  scorers = {v.name: extractor.scorer(cfg, v) for v in variants}
  for batch in batches:
    images = np.asarray(batch['image'], np.float32)
    b = images.shape[0]
    images_dev = sharding.shard_rows(pad_batch(images, extractor.batch_size), mesh)
    feats = extractor.fn(extractor.variables, images_dev)
    outs = {}
    for v in variants:
      out = scorers[v.name](arrays, feats, images_dev)
      outs[v.name] = {k: np.asarray(out[k][:b]) for k in ('maps', 'image', 'allowed')}
    yield batch, outs


def evaluate_category(cfg, category: str, cat_dir: pathlib.Path, extractor: Extractor,
                      fitted: model_lib.PNIModel, test_split,
                      variants: list[infer.Variant]) -> dict[str, dict]:
  """Scores the test set with each variant; returns variant name -> metrics (cached per variant)."""
  eval_dir = cat_dir / 'eval'
  eval_fp = fingerprint(fitted.meta.get('base_fingerprint'), fitted.meta.get('mlp_fingerprint'),
                        fitted.meta.get('position_fingerprint'),
                        fitted.meta.get('refine_fingerprint'), cfg.model.scoring,
                        cfg.model.neighborhood.window, cfg.model.refine.fusion_weight)
  results, todo = {}, []
  for v in variants:
    path = eval_dir / f'{v.name}.json'
    if path.exists():
      saved = json.loads(path.read_text())
      if saved.get('fingerprint') == eval_fp:
        results[v.name] = saved['metrics']
        continue
    todo.append(v)
  if not todo:
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
    batches = _batches(test_split, cfg, with_masks=True)
    for batch, outs in score_batches(cfg, extractor, fitted, todo, batches):
      b = batch['image'].shape[0]
      for v in todo:
        maps[v.name][start:start + b] = outs[v.name]['maps']
        image_scores[v.name][start:start + b] = outs[v.name]['image']
        allowed[v.name] += float(outs[v.name]['allowed'].mean()) * b
      _keep_ground_truth(batch, start, masks, labels, fig_index, fig_images)
      start += b
      prog.update(b)
    prog.close()

    curves = {}
    for v in todo:
      t = time.perf_counter()
      m, curve = metrics_lib.evaluate_with_curves(image_scores[v.name], labels, maps[v.name],
                                                  masks, max_fpr=float(cfg.eval.max_fpr))
      m = {k: float(val) for k, val in m.items()}
      m['allowed_fraction'] = allowed[v.name] / max(n, 1)
      results[v.name] = m
      curves[v.name] = curve
      logging.info('[%s] %-10s I-AUROC %.4f  P-AUROC %.4f  AUPRO %.4f  P-F1 %.4f  allowed %.3f '
                   '(metrics %.1fs)', category, v.name, m['image_auroc'], m['pixel_auroc'],
                   m['aupro'], m['pixel_f1_max'], m['allowed_fraction'], time.perf_counter() - t)
      fileio.atomic_write_json(eval_dir / f'{v.name}.json', dict(fingerprint=eval_fp, metrics=m))
      if v == variants[0]:
        _write_main_outputs(cfg, cat_dir, test_split, maps[v.name], masks, labels,
                            image_scores[v.name], fig_images, m, curve)
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


def _write_main_outputs(cfg, cat_dir, split, maps, masks, labels, image_scores, fig_images, m,
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


def _score_split(cfg, extractor, fitted, variant, split, maps_out, *, what: str):
  """Streams `split` through one scorer, writing maps into `maps_out` [N, S, S]; returns the
  image scores [N] float32."""
  n = len(split.paths)
  scores = np.zeros(n, np.float32)
  prog = Progress(what, n, unit='img')
  start = 0
  for _, outs in score_batches(cfg, extractor, fitted, [variant],
                               _batches(split, cfg, with_masks=False)):
    out = outs[variant.name]
    b = out['image'].shape[0]
    maps_out[start:start + b] = out['maps']
    scores[start:start + b] = out['image']
    start += b
    prog.update(b)
  prog.close()
  return scores


def _labels_masks_figures(cfg, split, masks_out, num_fig: int):
  """Ground truth of a split into `masks_out` [N, S, S] uint8; returns (labels [N], figure images)."""
  n = len(split.paths)
  labels = np.zeros(n, np.int32)
  fig_index = _figure_index(n, num_fig)
  fig_images, start = {}, 0
  for batch in _batches(split, cfg, with_masks=True):
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


def evaluate_ensemble(cfg, category: str, cat_dir: pathlib.Path, member_fits: list,
                      test_split, variant: infer.Variant) -> tuple[str, dict[str, dict]]:
  """Scores the test set with every member's `variant`, then the normalised average.

  Args:
    member_fits: [(member name, member cfg, Extractor, fitted PNIModel)].
  Returns:
    (main result name, {name: metrics}) with names 'ensemble (holdout)' (deployable, the main
    result), 'ensemble (test min-max, paper)' and one entry per member.
  """
  main_name = 'ensemble (holdout)'
  paper_name = 'ensemble (test min-max, paper)'
  eval_dir = cat_dir / 'eval'
  eval_fp = fingerprint([f.meta.get('base_fingerprint') for *_, f in member_fits],
                        [f.meta.get('calibration_fingerprint') for *_, f in member_fits],
                        cfg.model.scoring, variant.name)
  names = [main_name, paper_name] + [name for name, *_ in member_fits]
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
  results = {}
  with tempfile.TemporaryDirectory(dir=cat_dir, prefix='scratch-') as scratch:
    def memmap(name, dtype=np.float32):
      return np.memmap(os.path.join(scratch, name), dtype, 'w+', shape=(n, crop, crop))
    masks = memmap('masks.u8', np.uint8)
    labels, fig_images = _labels_masks_figures(cfg, test_split, masks, int(cfg.eval.max_figures))
    member_maps, member_scores, holdout_aff, minmax_aff = [], [], [], []
    for i, (name, mcfg, extractor, fitted) in enumerate(member_fits):
      maps = memmap(f'member{i}.f32')
      scores = _score_split(mcfg, extractor, fitted, variant, test_split, maps,
                            what=f'[{category}] {name} test images')
      m, _ = metrics_lib.evaluate_with_curves(scores, labels, maps, masks,
                                              max_fpr=float(cfg.eval.max_fpr))
      results[name] = {k: float(v) for k, v in m.items()}
      member_maps.append(maps)
      member_scores.append(scores)
      holdout_aff.append(ensemble.holdout_affine(fitted.stats))
      minmax_aff.append(ensemble.minmax_affine(maps, scores))
    for res_name, affines in ((main_name, holdout_aff), (paper_name, minmax_aff)):
      maps = ensemble.combine(member_maps, [a[0] for a in affines], out=memmap('ens.f32'))
      scores = ensemble.combine(member_scores, [a[1] for a in affines])
      m, curve = metrics_lib.evaluate_with_curves(scores, labels, maps, masks,
                                                  max_fpr=float(cfg.eval.max_fpr))
      results[res_name] = {k: float(v) for k, v in m.items()}
      if res_name == main_name:
        _write_main_outputs(cfg, cat_dir, test_split, maps, masks, labels, scores, fig_images,
                            results[res_name], curve)
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
  fileio.atomic_write_json(workdir / 'config.json', _to_plain(cfg))
  categories = data_lib.list_categories(cfg.data)
  logging.info('categories: %s', ', '.join(categories))
  variants = variants_to_evaluate(cfg)
  needed = infer.Variant(any(v.neighborhood for v in variants), any(v.position for v in variants),
                         any(v.refinement for v in variants))
  member_list = ensemble.members(cfg)
  if member_list:
    member_cfgs = [ensemble.member_config(cfg, b, w) for b, w in member_list]
    extractors = [make_extractor(mcfg) for mcfg in member_cfgs]
    if len(variants) > 1:
      logging.info('ensemble run: eval.ablations are not evaluated (members use %s)',
                   variants[0].name)
    variants = variants[:1]
  else:
    extractor = make_extractor(cfg)
  writer = report.scalar_writer(str(workdir / 'logs'))
  main_results, all_results, groups = {}, {}, {}
  row_names = [v.name for v in variants]
  for step, category in enumerate(categories):
    cat_dir = workdir / category
    train = data_lib.load_split(cfg.data, category, 'train')
    test = data_lib.load_split(cfg.data, category, 'test')
    train, holdout = train_holdout(train, float(cfg.data.holdout_fraction), int(cfg.seed))
    if member_list:
      fits = []
      for i, ((backbone, _), mcfg, ext) in enumerate(zip(member_list, member_cfgs, extractors)):
        mdir = cat_dir / 'members' / f'{i}-{backbone}'
        fitted = fit_category(mcfg, category, mdir, ext, train, needed)
        fitted = calibrate(mcfg, category, mdir, ext, fitted, holdout, variants[0])
        fits.append((f'member {i}: {backbone}', mcfg, ext, fitted))
      main_name, results = evaluate_ensemble(cfg, category, cat_dir, fits, test, variants[0])
      row_names = list(results)
    else:
      fitted = fit_category(cfg, category, cat_dir, extractor, train, needed)
      fitted = calibrate(cfg, category, cat_dir, extractor, fitted, holdout, variants[0])
      results = evaluate_category(cfg, category, cat_dir, extractor, fitted, test, variants)
      main_name = variants[0].name
    main = results[main_name]
    report.write_category_metrics(cat_dir, main)
    report.log_metrics(writer, step, main, prefix=f'{category}/')
    main_results[category] = main
    all_results[category] = results
    groups[category] = data_lib.category_group(cfg.data.name, category)
  report.write_results_table(workdir, main_results, groups)
  if len(row_names) > 1:
    write_ablation_table(workdir, all_results, groups, row_names)
  writer.flush()
  return main_results


def write_ablation_table(workdir, all_results, groups, names):
  """Like the paper's Table 3: rows = variants; columns = I-AUROC / P-AUROC / P-F1-max / AUPRO and
  the allowed fraction of C_emb, per category group and overall (fractions, percent in Markdown)."""
  group_names = sorted(set(groups.values()))
  metrics = ('image_auroc', 'pixel_auroc', 'pixel_f1_max', 'aupro', 'allowed_fraction')
  headers = dict(report.HEADERS, allowed_fraction='allowed')
  columns = [f'{headers.get(m, m)} ({g})' for m in metrics for g in group_names + ['mean']]
  rows = []
  for name in names:
    row = {}
    for metric in metrics:
      for g in group_names + ['mean']:
        cats = [c for c in all_results if g == 'mean' or groups[c] == g]
        vals = [all_results[c][name][metric] for c in cats
                if metric in all_results[c].get(name, {})]
        row[f'{headers.get(metric, metric)} ({g})'] = float(np.mean(vals)) if vals else float('nan')
    rows.append((name, row))
  report.write_table(workdir / 'ablation', rows, columns, label='variant', percent_columns=columns)
