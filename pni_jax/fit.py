"""Fitting: training images -> features -> coresets -> priors (-> refinement) -> `PNIModel`.

Each stage is a function of explicit arrays and a config slice; `fit_category` strings them
together for one category and caches their results in the category's folder, so an interrupted
run resumes and a re-run only fits what is missing or whose settings changed:
  <cat>/model/          the fitted model (reused when its fingerprints match)
  <cat>/fit/coreset.npz the coreset selection
  <cat>/fit/mlp-*/      the MLP's per-epoch checkpoints; <cat>/fit/refine-*/ the refinement's

Memory: the training patch features live in a `FeatureStore` (host RAM up to a cap, else a
memory-mapped file); the coreset selection only needs their random projection
([N_patches, projection_dim], one host buffer filled in place, sent to the devices shard by
shard); device memory is bounded by the batch and tile sizes (the MLP's by
`memory.device_feature_cap_mb`, see `neighborhood.train_mlp`). Nothing here is N x N.

Devices: every stage runs over a `sharding.make_mesh()` mesh (all devices, axis 'data'): the
image batches, the coreset rows and the nearest-code queries are split over it, the backbone
variables and the coreset bank replicated. On one device that is the plain computation.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pni_jax import config as config_lib
from pni_jax import coreset
from pni_jax import data as data_lib
from pni_jax import features
from pni_jax import fileio
from pni_jax import infer
from pni_jax import knn
from pni_jax import model as model_lib
from pni_jax import neighborhood
from pni_jax import position as position_lib
from pni_jax import sharding
from pni_jax.progress import Progress
from pni_jax.store import FeatureStore


def padded_batches(batches: Iterable[dict], batch_size: int):
  """Pads short batches to `batch_size` (repeating the last image) so a jitted function sees one
  shape. Yields (images [batch_size, S, S, 3], valid count)."""
  for batch in batches:
    yield sharding.pad_rows(np.asarray(batch['image'], np.float32), batch_size)


@jax.jit
def _project(feats, matrix):
  flat = feats.reshape(-1, feats.shape[-1])
  return flat if matrix is None else flat @ matrix


def extract_features(feature_fn: Callable, variables, batches: Iterable[dict], num_images: int,
                     batch_size: int, store: FeatureStore, projection: jax.Array | None, *,
                     mesh=None, return_projected: bool = True) -> np.ndarray | None:
  """Runs the feature function over the training images, batches split over the devices.

  Args:
    feature_fn: jitted `fn(variables, images [B, S, S, 3]) -> [B, H', W', d]`.
    variables: backbone variables (replicated on the mesh once here).
    batches: dicts with 'image' [b, S, S, 3] float32, b <= batch_size.
    num_images: N, the number of images `batches` yields in total.
    batch_size: images per call; padded up to a multiple of the device count.
    store: receives the [N, H', W', d] maps.
    projection: [d, p] random projection or None.
    mesh: `sharding.make_mesh()` (default: all devices).
    return_projected: False when the coreset is already known (nothing projected is kept).

  Returns:
    The projected patch features [N * H' * W', p] float32 (numpy, host; p = d without a
    projection) used by the coreset selection: one preallocated buffer, filled batch by batch
    (None when not `return_projected`).
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  per_call = sharding.padded_size(batch_size, sharding.num_shards(mesh))
  variables = sharding.replicate(variables, mesh)
  if projection is not None:
    projection = sharding.replicate(projection, mesh)
  prog = Progress('train features', num_images, unit='img')
  projected, start = None, 0
  for images, n in padded_batches(batches, per_call):
    if start + n > num_images:
      raise ValueError(f'expected {num_images} training images, the pipeline gave more')
    feats = feature_fn(variables, sharding.shard_rows(images, mesh))
    store.write(start, np.asarray(feats)[:n])
    if return_projected:
      proj = _project(feats, projection)
      _, h, w, _ = feats.shape
      if projected is None:
        projected = np.empty((num_images * h * w, proj.shape[-1]), np.float32)
      projected[start * h * w:(start + n) * h * w] = np.asarray(proj)[:n * h * w]
    start += n
    prog.update(n)
  prog.close()
  if start != num_images:
    raise ValueError(f'expected {num_images} training images, the pipeline gave {start}')
  return projected


def select_coreset(projected: np.ndarray, store: FeatureStore, cfg_coreset, key, *,
                   mesh=None, pad_rows_to: int = 0) -> dict:
  """Greedy k-center selection -> C_emb (full features), the C_dist prefix and emb -> dist map.

  `projected` [N_patches, p] (host) is split by rows over the mesh; the full d-dimensional
  features are read from `store` only for the selected rows. `pad_rows_to`: compile for that
  many patches (a shape bucket shared by training sets of similar sizes); same result.

  Returns dict(c_emb [K_emb, d] float32, emb_to_dist [K_emb] int32, num_dist, order [K_emb]).
  """
  prog = Progress('coreset', coreset.coreset_size(projected.shape[0], cfg_coreset.ratio),
                  unit='picks')

  def on_progress(done, total, elapsed):
    del total, elapsed
    prog.update(done - prog.done)

  emb, dist = coreset.select_coresets(projected, float(cfg_coreset.ratio),
                                      int(cfg_coreset.dist_size), key,
                                      chunk_size=int(cfg_coreset.chunk_size),
                                      segment_size=int(cfg_coreset.segment_size),
                                      progress=on_progress, mesh=mesh, pad_rows_to=pad_rows_to)
  prog.close()
  order = np.asarray(emb)
  c_emb = store.flat_rows(order)
  num_emb, num_dist = c_emb.shape[0], int(dist.shape[0])
  capacity = coreset.coreset_size(max(projected.shape[0], pad_rows_to), cfg_coreset.ratio)
  queries = sharding.pad_rows(c_emb, 1, mode='zeros', to=capacity)[0]
  mapping = np.asarray(coreset.emb_to_dist(queries, c_emb[:num_dist], mesh=mesh))[:num_emb]
  return dict(c_emb=c_emb, emb_to_dist=mapping.astype(np.int32), num_dist=num_dist,
              order=order.astype(np.int32))


def nearest_codes(store: FeatureStore, c_dist: np.ndarray, *, images_per_chunk: int,
                  query_tile: int, bank_tile: int, mesh=None) -> np.ndarray:
  """Index of the nearest C_dist row for every stored patch: [N, H', W'] int32.

  Streams `images_per_chunk` images at a time; each chunk's patches are split over the mesh's
  devices, C_dist is replicated.
  """
  n, h, w, d = store.shape
  mesh = sharding.make_mesh() if mesh is None else mesh
  bank = sharding.replicate(jnp.asarray(c_dist), mesh)
  out = np.empty((n, h, w), np.int32)
  prog = Progress('nearest codes', n, unit='img')
  for start, maps in store.chunks(images_per_chunk):
    b = maps.shape[0]
    maps = sharding.pad_rows(maps, images_per_chunk)[0]     # one shape for every chunk
    _, idx = knn.knn_sharded(maps.reshape(-1, d), bank, k=1, mesh=mesh, query_tile=query_tile,
                             bank_tile=bank_tile)
    out[start:start + b] = np.asarray(idx[:, 0]).reshape(maps.shape[:3])[:b]
    prog.update(b)
  prog.close()
  return out


# ----------------------------------------------------------------------------- one category


def shape_bucket(cfg, num_images: int) -> int:
  """The number of training images the fitting functions are compiled for: `num_images` (at
  least runtime.min_train_images) rounded up to its `sharding.bucket_size`
  (runtime.shape_buckets), so that categories of different sizes share compilations; padded
  rows never change a result."""
  rt = cfg.runtime
  return sharding.images_bucket(num_images, rt.get('min_train_images', 0), rt.shape_buckets)


def base_settings(cfg) -> dict:
  """What determines features and coresets: a saved model is only reused when these match."""
  d, m = cfg.data, cfg.model
  return dict(data=dict(name=d.name, resize=d.resize, crop=d.crop,
                        holdout_fraction=d.holdout_fraction,
                        generated=config_lib.to_plain(d.generated)
                        if d.name == 'generated' else None),
              backbone=m.backbone, weights=m.weights, layers=list(m.layers),
              precision=m.precision, aggregation_size=m.aggregation_size, pre_dim=m.pre_dim,
              dim=m.dim, coreset=config_lib.to_plain(m.coreset), seed=cfg.seed)


def fingerprints(cfg, needed: infer.Variant) -> dict[str, str]:
  """Fingerprints of the model's parts: base (features + coresets), nb, pos, ref (refinement,
  whose A_hat comes from the main variant's N / P without R)."""
  fp = config_lib.fingerprint
  base = fp(base_settings(cfg))
  nb, pos = fp(cfg.model.neighborhood, base), fp(cfg.model.position, base)
  main = refine_source(cfg, needed)
  ref = fp(cfg.model.refine, base, main.name, amap_config(cfg).model.scoring,
           nb if main.neighborhood else None, pos if main.position else None)
  return dict(base=base, nb=nb, pos=pos, ref=ref)


def amap_config(cfg):
  """`cfg` as the refinement stage scores its training maps A_hat: the MLP in model.precision,
  whatever model.scoring.mlp_precision says (that setting is for evaluation and predict).

  Trained on A_hat from the bfloat16 scoring MLP, the demo's refinement network lost 0.25-1.7
  points of granite's pixel F1 (seeds 0, 1, 2; float32 67.9 / 72.4 / 72.1, README 'Scale'),
  while evaluating with it moved no metric by more than 0.02 points."""
  if not str(cfg.model.scoring.get('mlp_precision', '') or ''):
    return cfg
  cfg = cfg.copy_and_resolve_references()
  cfg.model.scoring.mlp_precision = ''
  return cfg


def refine_source(cfg, needed: infer.Variant) -> infer.Variant:
  """The variant whose maps (A_hat) the refinement network learns to refine."""
  return infer.Variant(needed.neighborhood and cfg.model.use_neighborhood,
                       needed.position and cfg.model.use_position, False)


def _load_compatible(model_dir: pathlib.Path, base_fp: str) -> model_lib.PNIModel | None:
  if not model_lib.exists(model_dir):
    return None
  model = model_lib.load(model_dir)
  if model.meta.get('base_fingerprint') != base_fp:
    raise ValueError(
        f'{model_dir} was fitted with other data / feature / coreset settings than this run '
        f'(saved {model.meta.get("base_config")}); use another --workdir or delete {model_dir}')
  return model


def fit_category(cfg, category: str, cat_dir: pathlib.Path, extractor: infer.Extractor,
                 train_split, needed: infer.Variant) -> model_lib.PNIModel:
  """Fits (or reuses) every component `needed` asks for; returns the saved model.

  Training features are only extracted when the coreset, N or P must be fitted; a model that
  only lacks its refinement network keeps its other parts and trains only that.
  """
  model_dir = cat_dir / 'model'
  fps = fingerprints(cfg, needed)
  previous = _load_compatible(model_dir, fps['base'])
  meta = previous.meta if previous is not None else {}
  have_mlp = previous is not None and previous.mlp is not None and meta.get('mlp_fingerprint') == fps['nb']
  have_pos = (previous is not None and previous.position is not None
              and meta.get('position_fingerprint') == fps['pos'])
  have_ref = (previous is not None and previous.refine is not None
              and meta.get('refine_fingerprint') == fps['ref'])
  missing_nb = needed.neighborhood and not have_mlp
  missing_pos = needed.position and not have_pos
  missing_ref = needed.refinement and not have_ref
  if previous is not None and not (missing_nb or missing_pos or missing_ref):
    logging.info('[%s] reusing the fitted model in %s', category, model_dir)
    return previous
  if len(train_split.paths) == 0:
    raise ValueError(f'[{category}] the training set is empty')

  t0 = time.perf_counter()
  timings = dict(meta.get('timings', {}))
  key = jax.random.key(cfg.seed)
  if previous is None or missing_nb or missing_pos:
    model = _fit_priors(cfg, category, cat_dir / 'fit', extractor, train_split, previous,
                        key, fps, fit_nb=missing_nb, fit_pos=missing_pos, timings=timings)
  else:
    model = previous
  if needed.refinement:
    if have_ref:  # another component was refitted; the refinement stage still holds
      model = model.replace(
          refine=previous.refine,
          stats=dict(model.stats, **{k: previous.stats[k] for k in ('refine_lo', 'refine_hi')}),
          meta=dict(model.meta, refine_fingerprint=fps['ref'],
                    refine_history=previous.meta.get('refine_history')))
    else:
      t = time.perf_counter()
      model = fit_refinement(cfg, category, cat_dir, extractor, model, train_split,
                             refine_source(cfg, needed), fps['ref'], jax.random.fold_in(key, 7))
      timings['refine_s'] = time.perf_counter() - t
  model = model.replace(meta=dict(model.meta, timings=timings))
  model_lib.save(model, model_dir)
  logging.info('[%s] fitted in %.1fs (%s; |C_emb| %d, |C_dist| %d)', category,
               time.perf_counter() - t0, ', '.join(f'{k} {v:.1f}' for k, v in timings.items()),
               model.c_emb.shape[0], model.num_dist)
  return model_lib.load(model_dir)


def _fit_priors(cfg, category: str, fit_dir: pathlib.Path, extractor: infer.Extractor,
                train_split, previous: model_lib.PNIModel | None, key, fps: dict, *,
                fit_nb: bool, fit_pos: bool, timings: dict) -> model_lib.PNIModel:
  """Features -> coreset (cached) -> nearest codes -> P histograms / N MLP: a model without
  refinement. Components not asked for are taken from `previous` when it has them."""
  crop = int(cfg.data.crop)
  h, w, d = extractor.feature_shape(crop)
  n = len(train_split.paths)
  cap = int(float(cfg.memory.feature_cap_mb) * 2 ** 20)
  fit_dir.mkdir(parents=True, exist_ok=True)
  k_proj, k_core, k_mlp = jax.random.split(key, 3)
  cs = cfg.model.coreset
  core_path = fit_dir / 'coreset.npz'
  core = None
  if core_path.exists():
    z = np.load(core_path)
    if str(z['fingerprint']) == fps['base']:
      core = dict(c_emb=z['c_emb'], emb_to_dist=z['emb_to_dist'], num_dist=int(z['num_dist']))
      logging.info('[%s] reusing the coreset in %s', category, core_path)
  proj = (coreset.random_projection(k_proj, d, int(cs.projection_dim))
          if int(cs.projection_dim) > 0 else None)
  position = previous.position if previous is not None and not fit_pos else None
  mlp = previous.mlp if previous is not None and not fit_nb else None
  prev_meta = previous.meta if previous is not None else {}
  mlp_history = prev_meta.get('mlp_history') if mlp is not None else None
  pos_smoothing = prev_meta.get('position_smoothing') if position is not None else None
  with tempfile.TemporaryDirectory(dir=fit_dir, prefix='scratch-') as scratch, \
       FeatureStore((n, h, w, d), cap_bytes=cap, scratch_dir=scratch) as store:
    if store.spilled:
      logging.info('[%s] train features (%.1f MB) exceed memory.feature_cap_mb=%g: '
                   'memory-mapped in %s', category, store.nbytes / 2 ** 20,
                   cfg.memory.feature_cap_mb, scratch)
    t = time.perf_counter()
    projected = extract_features(extractor.fn, extractor.variables,
                                 data_lib.batches(train_split, cfg.data, with_masks=False), n,
                                 extractor.batch_size, store, proj, mesh=extractor.mesh,
                                 return_projected=core is None)
    timings['features_s'] = time.perf_counter() - t
    if core is None:
      t = time.perf_counter()
      core = select_coreset(projected, store, cs, k_core, mesh=extractor.mesh,
                            pad_rows_to=shape_bucket(cfg, n) * h * w)
      timings['coreset_s'] = time.perf_counter() - t
      with fileio.atomic_open(core_path, 'wb') as f:
        np.savez(f, fingerprint=fps['base'], **core)
    del projected

    sc = cfg.model.scoring
    if fit_nb or fit_pos:
      t = time.perf_counter()
      codes = nearest_codes(store, core['c_emb'][:core['num_dist']],
                            images_per_chunk=extractor.batch_size,
                            query_tile=int(sc.query_tile), bank_tile=int(sc.bank_tile),
                            mesh=extractor.mesh)
      timings['codes_s'] = time.perf_counter() - t
    if fit_pos:
      t = time.perf_counter()
      pos_cfg = cfg.model.position
      pos_smoothing = float(pos_cfg.get('smoothing', 0.0))
      if pos_smoothing < 0:          # chosen by leave-one-image-out likelihood
        pos_smoothing, table = position_lib.choose_smoothing(
            codes, core['num_dist'], int(pos_cfg.window), batch=extractor.batch_size)
        logging.info('[%s] position prior: smoothing %g pseudo-counts per code (leave-one-image-'
                     'out NLL %.2f per patch; raw histograms %.2f)', category, pos_smoothing,
                     min(table['nll']), table['nll'][0])
      position = np.asarray(position_lib.position_histogram(
          codes, core['num_dist'], int(pos_cfg.window), batch=extractor.batch_size,
          smoothing=pos_smoothing))
      timings['position_s'] = time.perf_counter() - t
    if fit_nb:
      t = time.perf_counter()
      variables, history = neighborhood.train_mlp(
          store.array, codes, cfg.model.neighborhood, k_mlp,
          ckpt_dir=str((fit_dir / f'mlp-{fps["nb"]}').absolute()),
          num_classes=int(core['num_dist']),
          log_fn=lambda msg: logging.info('[%s] %s', category, msg),
          dtype=features.compute_dtype(cfg.model), mesh=extractor.mesh,
          device_cap_bytes=int(float(cfg.memory.get('device_feature_cap_mb', 0)) * 2 ** 20),
          pad_images_to=shape_bucket(cfg, n))
      mlp = jax.tree.map(np.asarray, variables)
      mlp_history = config_lib.to_plain(history)
      timings['mlp_s'] = time.perf_counter() - t

  meta = dict(category=category, backbone=cfg.model.backbone, grid=[h, w], dim=d,
              crop=crop, resize=int(cfg.data.resize), num_dist=int(core['num_dist']),
              base_fingerprint=fps['base'], base_config=base_settings(cfg),
              mlp_fingerprint=fps['nb'] if mlp is not None else None,
              position_fingerprint=fps['pos'] if position is not None else None,
              position_smoothing=pos_smoothing,
              mlp_history=mlp_history, num_train=n, config=config_lib.to_plain(cfg))
  return model_lib.PNIModel(c_emb=np.asarray(core['c_emb'], np.float32),
                            emb_to_dist=np.asarray(core['emb_to_dist'], np.int32),
                            position=position, mlp=mlp, meta=meta)


# ----------------------------------------------------------------------------- refinement


def split_images_uint8(split, data_cfg, cap_mb: float, scratch: str) -> np.ndarray:
  """All images of a split as uint8 [N, S, S, 3] (the refinement stage's normal images): in
  memory under `cap_mb` (memory.feature_cap_mb), else memory-mapped in `scratch`."""
  crop = int(data_cfg.crop)
  shape = (len(split.paths), crop, crop, 3)
  if np.prod(shape) > float(cap_mb) * 2 ** 20:
    out = np.memmap(os.path.join(scratch, 'images.u8'), np.uint8, 'w+', shape=shape)
  else:
    out = np.empty(shape, np.uint8)
  start = 0
  for batch in data_lib.batches(split, data_cfg, with_masks=False):
    b = batch['image'].shape[0]
    out[start:start + b] = np.round(np.clip(batch['image'], 0, 1) * 255).astype(np.uint8)
    start += b
  return out


def fit_refinement(cfg, category: str, cat_dir: pathlib.Path, extractor: infer.Extractor,
                   model: model_lib.PNIModel, train_split, main: infer.Variant, ref_fp: str,
                   key) -> model_lib.PNIModel:
  """Trains the model's refinement network (`train_refinement`).

  A_hat comes from the fitted model's `main` variant (its N / P settings, without R). Returns the
  model with `refine` variables, `stats['refine_lo' / 'refine_hi']` and a figure of samples.
  """
  cfg = amap_config(cfg)
  arrays = infer.scoring_arrays(cfg, model)       # padded: one compilation per shape bucket
  maps_fn = extractor.maps_fn(cfg, main)

  def amap_fn(images01):
    return maps_fn(arrays, images01)

  variables, stats, history = train_refinement(
      cfg, category, cat_dir, amap_fn, train_split, key,
      ckpt_dir=cat_dir / 'fit' / f'refine-{ref_fp}', what=main.name)
  return model.replace(
      refine=variables,
      stats=dict(model.stats, refine_lo=np.float32(stats['lo']), refine_hi=np.float32(stats['hi'])),
      meta=dict(model.meta, refine_fingerprint=ref_fp, refine_history=history))


def train_refinement(cfg, category: str, cat_dir: pathlib.Path,
                     amap_fn: Callable[[jax.Array], jax.Array], train_split, key, *,
                     ckpt_dir: pathlib.Path, what: str) -> tuple[dict, dict, dict]:
  """Trains a refinement network on synthetic defects of the training images (section 3.3).

  Args:
    amap_fn: A_hat of a device batch, `amap_fn(images01 [B, S, S, 3] in [0, 1]) -> [B, S, S]`,
      a jitted function of device arrays (`refine.train_refiner`).
    ckpt_dir: the run's resumable checkpoints; `what`: A_hat's source, for the log.
  Writes <cat_dir>/figures/refine_samples.png. Returns (variables (numpy), {'lo', 'hi'} (the
  A_hat normalisation), a summary of the training history (pool_size, num_images,
  total_seconds)).
  """
  from pni_jax import refine  # the refinement network only when used

  r = cfg.model.refine
  (cat_dir / 'fit').mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cat_dir / 'fit', prefix='scratch-') as scratch:
    images = split_images_uint8(train_split, cfg.data, cfg.memory.feature_cap_mb, scratch)
    logging.info('[%s] refinement: %d normal images, %d iterations of batch %d at %d px (%s), '
                 'A_hat from %s', category, images.shape[0], int(r.iterations),
                 int(r.batch_size), int(r.input_size), r.encoder, what)
    bucket = shape_bucket(cfg, images.shape[0])
    variables, stats, history = refine.train_refiner(
        images, amap_fn, r, key, ckpt_dir=str(pathlib.Path(ckpt_dir).absolute()),
        log_fn=lambda msg: logging.info('[%s] %s', category, msg), pad_images_to=bucket)
    variables = jax.tree.map(np.asarray, variables)
    refine.save_training_figure(cat_dir / 'figures' / 'refine_samples.png',
                                jax.random.fold_in(key, 1), images, amap_fn, variables, stats, r,
                                num_samples=4, pad_images_to=bucket)
    del images
  return variables, stats, {k: v for k, v in config_lib.to_plain(history).items()
                            if k in ('pool_size', 'num_images', 'total_seconds')}
