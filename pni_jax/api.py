"""A small functional API for research: fit once, then score and evaluate with pure functions.

    from pni_jax import api
    model = api.fit(cfg, train_images)                        # a pytree (arrays + static setup)
    hp = api.default_hparams(model)                           # scoring.HParams of scalars
    maps = api.anomaly_maps(model, test_images, hp)           # [N, S, S]
    grid = api.grid(hp, tau_scale=[0.1, 0.5, 1.0], sigma=[2.0, 4.0, 8.0])   # 9 points, [9] leaves
    feats = api.features(model, test_images)                  # the backbone once
    all_maps = jax.vmap(lambda h: api.anomaly_maps(model, feats, h))(grid)  # [9, N, S, S]
    metrics = jax.vmap(lambda m: api.evaluate(m, masks, labels))(all_maps)

`fit(config, images)` runs the project's fitting stages in memory (no workdir): features,
coresets, the nearest codes, the position histograms (P) and the neighbourhood MLP (N), as
`config.model.use_*` ask (the refinement network needs the pipeline:
`python -m pni_jax.main`). Everything after `fit` is a pure function of its arguments: no config
is read, the model's static choices (backbone, variant, combine mode, tiles, bounds) travel in it
as static pytree data, and the numeric hyper-parameters are an argument. They jit, and vmap over
`hparams` (stacked with `grid`) and over models whose shapes agree (e.g. two seeds with the same
coreset sizes: `jax.tree.map(lambda *x: jnp.stack(x), m1, m2)`). `images_or_features` is either
images [B, S, S, 3] in [0, 1] or their patch features [B, h, w, d] (`features(model, images)`),
which lets a sweep reuse one backbone pass.

A traced sigma (or top_percent) must stay within the model's static bounds
(`config.model.scoring.max_sigma`, default 16; top_percent: the config's); `with_bounds` raises
them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import tempfile
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import coreset
from pni_jax import features as features_lib
from pni_jax import infer
from pni_jax import metrics as metrics_lib
from pni_jax import scoring
from pni_jax import sharding
from pni_jax.store import FeatureStore


@dataclasses.dataclass(frozen=True)
class Setup:
  """The static part of a fitted model: how images become features and how features are scored."""
  backbone: str
  layers: tuple[str, ...]
  aggregation_size: int
  pre_dim: int
  dim: int
  precision: str
  crop: int
  spec: infer.ScoringSpec
  defaults: tuple[tuple[str, float], ...]   # the config's hyper-parameters (default_hparams)


@flax.struct.dataclass
class Model:
  """A fitted model as one pytree.

  arrays: {'c_emb' [K_emb, d], 'emb_to_dist' [K_emb], 'position' [h, w, K_dist] | None,
           'mlp' {'params', 'batch_stats'} | None, 'refine': None}
  backbone: the backbone's variables.
  setup: `Setup` (static).
  """
  arrays: dict
  backbone: Any
  setup: Setup = flax.struct.field(pytree_node=False)


def default_hparams(model: Model) -> scoring.HParams:
  """The hyper-parameters the model was configured with (scalars)."""
  return scoring.HParams(**{k: jnp.float32(v) for k, v in model.setup.defaults})


def grid(base: scoring.HParams, **values) -> scoring.HParams:
  """The product grid of `values` (name -> list) over `base`: an HParams of [G] arrays, the first
  name varying slowest (as `itertools.product`)."""
  unknown = set(values) - set(scoring.HPARAM_NAMES)
  if unknown:
    raise ValueError(f'unknown hyper-parameter(s) {sorted(unknown)}; known: '
                     f'{scoring.HPARAM_NAMES}')
  names = list(values)
  points = list(itertools.product(*(list(values[n]) for n in names)))
  cols = {n: jnp.asarray([p[i] for p in points], jnp.float32) for i, n in enumerate(names)}
  g = len(points)
  return scoring.HParams(**{
      f.name: cols.get(f.name, jnp.full((g,), getattr(base, f.name), jnp.float32))
      for f in dataclasses.fields(scoring.HParams)})


def with_bounds(model: Model, *, max_sigma: float | None = None,
                max_top_percent: float | None = None) -> Model:
  """The model with raised static bounds for traced sigma / top_percent."""
  spec = model.setup.spec
  spec = dataclasses.replace(
      spec, max_sigma=float(max_sigma) if max_sigma is not None else spec.max_sigma,
      max_top_percent=(float(max_top_percent) if max_top_percent is not None
                       else spec.max_top_percent))
  return model.replace(setup=dataclasses.replace(model.setup, spec=spec))


# ----------------------------------------------------------------------------- fit


def _setup(cfg) -> Setup:
  m = cfg.model
  crop = int(cfg.data.crop)
  variant = infer.Variant(bool(m.use_neighborhood), bool(m.use_position), False)
  hp = scoring.hparams_from_config(m)
  return Setup(backbone=str(m.backbone), layers=tuple(m.layers),
               aggregation_size=int(m.aggregation_size), pre_dim=int(m.pre_dim), dim=int(m.dim),
               precision=str(m.precision), crop=crop,
               spec=infer.make_spec(m, variant, (crop, crop)),
               defaults=tuple((k, float(v)) for k, v in dataclasses.asdict(hp).items()))


def fit(config, train_images, *, key: jax.Array | None = None) -> Model:
  """Fits a model on normal images in memory with the project's fitting stages.

  Args:
    config: a full config (`configs/*.py` get_config()); data.crop must match the images.
    train_images: [N, S, S, 3] float in [0, 1] (already preprocessed, S = config.data.crop).
    key: PRNG key (default: jax.random.key(config.seed)).
  Returns:
    `Model` with C_emb / C_dist, the position prior (if model.use_position) and the MLP (if
    model.use_neighborhood).
  """
  from pni_jax import fit as fit_lib              # pylint: disable=g-import-not-at-top
  from pni_jax import neighborhood                # pylint: disable=g-import-not-at-top
  from pni_jax import position as position_lib    # pylint: disable=g-import-not-at-top
  images = np.asarray(train_images, np.float32)
  crop = int(config.data.crop)
  if images.ndim != 4 or images.shape[1:] != (crop, crop, 3):
    raise ValueError(f'train_images must be [N, {crop}, {crop}, 3] (config.data.crop = {crop}); '
                     f'got {images.shape}')
  key = jax.random.key(int(config.seed)) if key is None else key
  m = config.model
  fn, variables = features_lib.make_feature_fn(m, key=key)
  mesh = sharding.make_mesh()
  bs = sharding.padded_size(int(config.data.batch_size), sharding.num_shards(mesh))
  n = images.shape[0]
  h, w, d = jax.eval_shape(fn, variables,
                           jax.ShapeDtypeStruct((bs, crop, crop, 3), jnp.float32)).shape[1:]
  k_proj, k_core, k_mlp = jax.random.split(key, 3)
  cs = m.coreset
  proj = (coreset.random_projection(k_proj, d, int(cs.projection_dim))
          if int(cs.projection_dim) > 0 else None)
  cap = int(float(config.memory.feature_cap_mb) * 2 ** 20)
  batches = ({'image': images[i:i + bs]} for i in range(0, n, bs))
  arrays = {'position': None, 'mlp': None, 'refine': None}
  with tempfile.TemporaryDirectory(prefix='pni-fit-') as scratch, \
       FeatureStore((n, h, w, d), cap_bytes=cap, scratch_dir=scratch) as store:
    projected = fit_lib.extract_features(fn, variables, batches, n, bs, store, proj, mesh=mesh)
    core = fit_lib.select_coreset(projected, store, cs, k_core, mesh=mesh)
    del projected
    arrays['c_emb'] = jnp.asarray(core['c_emb'], jnp.float32)
    arrays['emb_to_dist'] = jnp.asarray(core['emb_to_dist'], jnp.int32)
    if m.use_neighborhood or m.use_position:
      codes = fit_lib.nearest_codes(store, core['c_emb'][:core['num_dist']], images_per_chunk=bs,
                                    query_tile=int(m.scoring.query_tile),
                                    bank_tile=int(m.scoring.bank_tile), mesh=mesh)
      if m.use_position:
        arrays['position'] = jnp.asarray(position_lib.position_histogram(
            codes, core['num_dist'], int(m.position.window), batch=bs))
      if m.use_neighborhood:
        mlp, _ = neighborhood.train_mlp(store.array, codes, m.neighborhood, k_mlp,
                                        num_classes=int(core['num_dist']),
                                        dtype=features_lib.compute_dtype(m), mesh=mesh,
                                        log_fn=lambda msg: None)
        arrays['mlp'] = jax.tree.map(jnp.asarray, mlp)
  return Model(arrays=arrays, backbone=jax.tree.map(jnp.asarray, variables),
               setup=_setup(config))


# ----------------------------------------------------------------------------- pure functions


@functools.lru_cache(maxsize=8)
def _extract_fn(backbone: str, layers: tuple[str, ...], dtype_name: str):
  from pni_jax import backbones                   # pylint: disable=g-import-not-at-top
  return backbones.extractor(backbone, None, layers, jnp.dtype(dtype_name))


def features(model: Model, images: jax.Array) -> jax.Array:
  """Patch features [B, h, w, d] of images [B, S, S, 3] in [0, 1]."""
  s = model.setup
  extract = _extract_fn(s.backbone, s.layers, 'bfloat16' if s.precision == 'bfloat16'
                        else 'float32')
  taps = extract(model.backbone, images)
  return features_lib.patch_features(taps, s.layers, s.aggregation_size, s.pre_dim, s.dim)


def _features_of(model: Model, x: jax.Array) -> jax.Array:
  s = model.setup
  if x.ndim != 4:
    raise ValueError(f'expected images [B, S, S, 3] or features [B, h, w, d]; got {x.shape}')
  if x.shape[1:] == (s.crop, s.crop, 3):
    return features(model, x)
  if x.shape[-1] != s.dim:
    raise ValueError(f'expected images [B, {s.crop}, {s.crop}, 3] or features [B, h, w, '
                     f'{s.dim}]; got {x.shape}')
  return x


def score(model: Model, images_or_features: jax.Array, hparams: scoring.HParams) -> dict:
  """dict(patch [B, h, w], maps [B, S, S], image [B], allowed [B, h, w]) of the model's variant."""
  feats = _features_of(model, images_or_features)
  return infer.score_features(model.arrays, feats, hparams, model.setup.spec)


def patch_scores(model: Model, images_or_features: jax.Array,
                 hparams: scoring.HParams) -> jax.Array:
  """[B, h, w] patch scores (lambda * distance to the nearest allowed C_emb row)."""
  feats = _features_of(model, images_or_features)
  return infer.patch_scores(model.arrays, feats, hparams, model.setup.spec)[0]


def anomaly_maps(model: Model, images_or_features: jax.Array,
                 hparams: scoring.HParams) -> jax.Array:
  """[B, S, S] anomaly maps (upsampled, blurred with hparams.sigma)."""
  return score(model, images_or_features, hparams)['maps']


def image_scores(model: Model, images_or_features: jax.Array,
                 hparams: scoring.HParams) -> jax.Array:
  """[B] image scores (config.model.scoring.image_score of the fitted config)."""
  return score(model, images_or_features, hparams)['image']


def ground_truth(masks) -> tuple[np.ndarray, int]:
  """Host helper: masks [N, H, W] -> (region weights [N, H, W], number of regions) for
  `evaluate` under jit / vmap (the connected components are labelled with scipy)."""
  return metrics_lib.region_weight_map(masks)


def evaluate(maps: jax.Array, masks, labels, image_scores: jax.Array | None = None, *,
             regions: tuple[Any, Any] | None = None, max_fpr: float = 0.3) -> dict:
  """Exact I-AUROC, I-F1, P-AUROC, AUPRO, P-F1 (+ its threshold) as jnp scalars.

  Args:
    maps: [N, H, W]; masks: [N, H, W] (non-zero = anomalous); labels: [N];
    image_scores: [N] (default: the max of each map).
    regions: `ground_truth(masks)`; computed here when masks are concrete (pass it under jit /
      vmap, where the connected components cannot be labelled).
  Returns:
    {'image_auroc', 'image_f1_max', 'pixel_auroc', 'aupro', 'pixel_f1_max', 'pixel_threshold'}.
  """
  if regions is None:
    if isinstance(masks, jax.core.Tracer):
      raise ValueError('evaluate: pass regions=api.ground_truth(masks) when masks are traced')
    regions = ground_truth(masks)
  if image_scores is None:
    image_scores = maps.reshape(maps.shape[0], -1).max(-1)
  weights, count = regions
  return metrics_lib.evaluate_jnp(image_scores, labels, maps, masks, weights, count,
                                  max_fpr=max_fpr)
