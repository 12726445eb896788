"""Hyper-parameter sweeps on a fitted workdir: the whole grid in compiled, vmapped calls.

`python -m pni_jax.main --mode=sweep --config=configs/demo.py --workdir=runs/demo \
    --config.sweep.tau_scale=0.1,0.5,1 --config.sweep.sigma=2,4,8`

One field of `config.sweep` per hyper-parameter (`scoring.HPARAM_NAMES`, named as in
model.scoring / model.refine), each a list; the grid is their product, the other
hyper-parameters keep their config values. Data and features follow each fitted model's saved
config; the scoring choices (model.scoring, model.use_*) and the sweep come from this run's
config. Nothing is refitted: per category,

1. the test images' patch features come from the backbone once (cached in
   `<cat>/sweep/features.npy`, reused by later sweeps of the same model);
2. what does not depend on the hyper-parameters is computed once on the device: for every patch
   and C_dist code the distance to the nearest C_emb row of that code
   (`scoring.group_min_sq_dists`, so the nearest allowed distance for any prior is a min over
   [K_dist] values), the MLP logits and the position prior;
3. the grid is evaluated in chunks of G points (`sweep.chunk_size`, shrunk to fit
   `sweep.memory_mb`): one compiled call, `vmap` over the chunk's hyper-parameter points inside a
   `lax.map` over images, gives [G, N, S, S] maps and [G, N] image scores. Parameters that only
   change the maps (sigma, top_percent) vary innermost, so each patch-score point is computed once
   for all of them;
4. the metrics of the G points come from one batched host pass, `metrics.grid_metrics` (exact,
   equal to the evaluation's metrics: one sort of the normal pixels per point, the few anomalous
   pixels located by binary search; no Python per point or pixel).

Outputs in the workdir: `sweep.csv` / `sweep.md` (one row per category and grid point, and the
mean over categories), `sweep_<a>_<b>.png` heat maps of I-AUROC, P-AUROC, AUPRO and P-F1 for every
pair of swept parameters (category mean, best over the other swept parameters).
Variants with R are not swept (the refinement network would run per point); fusion_weight is a
hyper-parameter of `infer` / `api` scoring.

Memory: the cache holds N x h x w x K_dist float32 distances (plus as many logits with N), capped
by `sweep.cache_mb`; a chunk holds ~12 bytes x G x N x S x S on the host (G at least the number
of map-parameter combinations).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pni_jax import data as data_lib
from pni_jax import fileio
from pni_jax import infer
from pni_jax import metrics as metrics_lib
from pni_jax import model as model_lib
from pni_jax import report
from pni_jax import scoring

METRICS = ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_f1_max')
HEADERS = {'image_auroc': 'I-AUROC', 'pixel_auroc': 'P-AUROC', 'aupro': 'AUPRO',
           'pixel_f1_max': 'P-F1', 'image_f1_max': 'I-F1', 'allowed_fraction': 'allowed'}


# ----------------------------------------------------------------------------- the grid


def parse_values(value) -> tuple[float, ...]:
  """A sweep field from the config or the command line ('0.1,0.5,1', (0.1, 0.5), 2) -> floats."""
  if isinstance(value, (int, float)):
    return (float(value),)
  out = []
  for v in (value or ()):
    for part in str(v).strip('()[] ').split(','):
      part = part.strip().strip('\'"')
      if part:
        out.append(float(part))
  return tuple(out)


def grid_axes(cfg) -> dict[str, tuple[float, ...]]:
  """{hyper-parameter: values} of the non-empty config.sweep fields, in HPARAM_NAMES order."""
  sw = cfg.get('sweep', ml_collections.ConfigDict())
  unknown = [k for k in sw if k not in scoring.HPARAM_NAMES + (
      'variant', 'chunk_size', 'memory_mb', 'cache_mb')]
  if unknown:
    raise ValueError(f'config.sweep.{unknown[0]} is not a hyper-parameter; sweepable: '
                     f'{", ".join(scoring.HPARAM_NAMES)}')
  axes = {}
  for name in scoring.HPARAM_NAMES:
    values = parse_values(sw.get(name, ()))
    if values:
      axes[name] = values
  return axes


def grid_points(axes: dict[str, tuple[float, ...]]) -> list[dict[str, float]]:
  """The product of the axes, the first axis varying slowest."""
  names = list(axes)
  return [dict(zip(names, combo)) for combo in itertools.product(*axes.values())]


def check_axes(axes: dict, cfg_model, variant: infer.Variant) -> None:
  """Clear errors for grids that cannot work (before anything is computed)."""
  if not axes:
    raise ValueError('nothing to sweep: give at least one list, e.g. '
                     '--config.sweep.tau_scale=0.1,0.5,1 (sweepable: '
                     f'{", ".join(scoring.HPARAM_NAMES)})')
  if variant.refinement:
    raise ValueError(f'sweep: variant {variant.name} uses the refinement network, which would run '
                     'per grid point; sweep a variant without R (--config.sweep.variant=N+P)')
  if 'fusion_weight' in axes:
    raise ValueError('sweep.fusion_weight needs the refinement (R), which the sweep does not run')
  checks = {'temperature': (lambda v: v > 0, '> 0'), 'tau_scale': (lambda v: v >= 0, '>= 0'),
            'sigma': (lambda v: v >= 0, '>= 0'), 'top_percent': (lambda v: 0 < v <= 100,
                                                                 'in (0, 100]'),
            'neighborhood_weight': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
            'likelihood_lambda': (lambda v: v > 0, '> 0')}
  for name, values in axes.items():
    ok, want = checks.get(name, (lambda v: True, ''))
    bad = [v for v in values if not ok(v)]
    if bad:
      raise ValueError(f'config.sweep.{name}: values must be {want}, got {bad}')
  if 'temperature' in axes and not variant.neighborhood:
    logging.warning('sweep: temperature has no effect on variant %s (no N)', variant.name)


# ----------------------------------------------------------------------------- the cache


@dataclasses.dataclass
class Cache:
  """What every grid point shares, for N test images (device arrays unless noted).

  group_sq [N, h*w, K_dist]: per patch and code, the squared distance to the nearest C_emb row
  of the code; nearest_sq [N, h*w]; logits [N, h, w, K_dist] or None; position [h, w, K_dist] or
  None; code_count [K_dist]; feats [N, h, w, d] (for image_score='reweight'); c_emb [K, d] and
  emb_valid [K] bool or None (a padded C_emb, `infer.pad_bank`); num_emb (|C_emb|, an int or a
  float32 scalar); truth: `metrics.GroundTruth` (host).
  """
  group_sq: jax.Array
  nearest_sq: jax.Array
  logits: jax.Array | None
  position: jax.Array | None
  code_count: jax.Array
  feats: jax.Array
  c_emb: jax.Array
  num_emb: int | jax.Array
  grid: tuple[int, int]
  truth: metrics_lib.GroundTruth
  emb_valid: jax.Array | None = None


def _split_arrays(cfg, split, extractor: infer.Extractor):
  """Test images through the data pipeline -> (features [N, h, w, d] float32, masks [N, S, S]
  bool, labels [N] int)."""
  feats, masks, labels = [], [], []
  for batch in data_lib.batches(split, cfg.data, with_masks=True):
    images = np.asarray(batch['image'], np.float32)
    _, f = extractor.features(images)
    feats.append(np.asarray(f)[:images.shape[0]])
    masks.append(np.asarray(batch['mask']) > 0.5)
    labels.append(np.asarray(batch['label']))
  return np.concatenate(feats), np.concatenate(masks), np.concatenate(labels)


def test_features(cfg, cat_dir: pathlib.Path, fitted: model_lib.PNIModel, split,
                  extractor: infer.Extractor):
  """(features, masks, labels) of the test split; features cached in `<cat>/sweep/` for this
  model and split (the backbone runs once)."""
  folder = cat_dir / 'sweep'
  key = json.dumps(dict(model=fitted.meta.get('base_fingerprint'), paths=list(split.paths),
                        crop=int(cfg.data.crop), resize=int(cfg.data.resize)), sort_keys=True)
  meta_path, feat_path = folder / 'cache.json', folder / 'features.npy'
  if meta_path.exists() and feat_path.exists():
    saved = json.loads(meta_path.read_text())
    if saved.get('key') == key:
      gt = np.load(folder / 'truth.npz')
      return np.load(feat_path), gt['masks'], gt['labels']
  feats, masks, labels = _split_arrays(cfg, split, extractor)
  folder.mkdir(parents=True, exist_ok=True)
  with fileio.atomic_open(feat_path, 'wb') as f:
    np.save(f, feats)
  with fileio.atomic_open(folder / 'truth.npz', 'wb') as f:
    np.savez_compressed(f, masks=masks, labels=labels)
  fileio.atomic_write_json(meta_path, dict(key=key))
  return feats, masks, labels


@functools.partial(jax.jit, static_argnames=('num_dist', 'query_tile', 'bank_tile'))
def _group_sq(feats, c_emb, e2d, *, num_dist: int, query_tile: int, bank_tile: int):
  return scoring.group_min_sq_dists(feats, c_emb, e2d, num_dist, query_tile=query_tile,
                                    bank_tile=bank_tile)


@functools.partial(jax.jit, static_argnames=('window', 'dilation', 'chunk', 'dtype'))
def _mlp_logits(variables, feats, *, window: int, dilation: int, chunk: int, dtype: str):
  return infer.mlp_logits(variables, feats, window=window, dilation=dilation, chunk=chunk,
                          dtype=dtype)


def build_cache(arrays: dict, feats: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                spec: infer.ScoringSpec, cache_mb: float) -> Cache:
  """The grid-independent arrays of one category (see `Cache`); `arrays` as `model.arrays`, or
  padded (`infer.pad_bank`: categories of one bucket then share the compiled functions)."""
  n, h, w, d = feats.shape
  c_emb, e2d = jnp.asarray(arrays['c_emb']), jnp.asarray(arrays['emb_to_dist'])
  valid = arrays.get('emb_valid')
  k = int(arrays['position'].shape[-1] if arrays.get('position') is not None
          else (int(np.max(np.asarray(e2d))) + 1))
  v = spec.variant
  per_image = h * w * k * 4 * (2 if v.neighborhood else 1)
  if n * per_image > float(cache_mb) * 2 ** 20:
    raise ValueError(f'sweep cache of {n} test images needs {n * per_image / 2 ** 20:.0f} MB '
                     f'(h*w*K_dist float32 per image) > config.sweep.cache_mb = {cache_mb:g}; '
                     'raise it or sweep fewer categories at once')
  feats_dev = jnp.asarray(feats)
  tiles = dict(query_tile=spec.query_tile, bank_tile=spec.bank_tile)
  group_sq = jnp.stack([_group_sq(feats_dev[i].reshape(h * w, d), c_emb, e2d, num_dist=k,
                                  **tiles) for i in range(n)])
  logits = None
  if v.neighborhood:
    if arrays.get('mlp') is None:
      raise ValueError('sweep variant uses N but the model has no MLP')
    mlp = jax.tree.map(jnp.asarray, arrays['mlp'])
    logits = jnp.concatenate([
        _mlp_logits(mlp, feats_dev[i:i + 8], window=spec.window, dilation=spec.dilation,
                    chunk=spec.infer_chunk, dtype=spec.dtype) for i in range(0, n, 8)])
  position = None
  if v.position:
    if arrays.get('position') is None:
      raise ValueError('sweep variant uses P but the model has no position prior')
    position = jnp.asarray(arrays['position'])
  num_emb, code_count = infer.bank_counts(dict(emb_to_dist=e2d, c_emb=c_emb, emb_valid=valid), k)
  return Cache(group_sq=group_sq, nearest_sq=group_sq.min(-1), logits=logits, position=position,
               code_count=code_count, feats=feats_dev, c_emb=c_emb, num_emb=num_emb, grid=(h, w),
               truth=metrics_lib.ground_truth(masks, labels),
               emb_valid=None if valid is None else jnp.asarray(valid))


# ----------------------------------------------------------------------------- the compiled grid


# Hyper-parameters that change the patch scores; the others (sigma, top_percent) only change the
# maps / image scores, so a grid is evaluated as (patch points) x (map points) and each patch
# grid is computed once for all its map points.
PATCH_PARAMS = ('tau_scale', 'temperature', 'likelihood_lambda', 'neighborhood_weight')


@functools.partial(jax.jit, static_argnames=('spec', 'grid', 'maps_per_patch'))
def grid_scores(group_sq, nearest_sq, logits, position, code_count, feats, c_emb,
                hp_patch: scoring.HParams, hp: scoring.HParams, *, spec: infer.ScoringSpec,
                num_emb, grid, maps_per_patch: int = 1, emb_valid=None):
  """Maps, image scores and allowed fractions of G = U x maps_per_patch points on N images.

  Args:
    group_sq [N, h*w, K], nearest_sq [N, h*w], logits [N, h, w, K] | None, position
    [h, w, K] | None, code_count [K], feats [N, h, w, d], c_emb [K_emb, d], num_emb (traced),
    emb_valid [K_emb] bool | None (see `Cache`);
    hp_patch: HParams of [U] arrays (the patch-score knobs of U points, vmapped);
    hp: HParams of [G] arrays, point g using the patch scores of hp_patch[g // maps_per_patch]
      and its own sigma / top_percent.
  Returns:
    (maps [G, N, S, S], image [G, N], allowed [G]) float32.
  """
  h, w = grid
  variant = spec.variant

  def one_image(xs):
    g_sq, n_sq, lg = xs

    def one_point(p):
      if not variant.conditional:
        return p.likelihood_lambda * jnp.sqrt(n_sq), jnp.float32(1.0)
      p_nb = None if lg is None else scoring.neighbor_prior(lg.reshape(h * w, -1), p.temperature)
      p_pos = None if position is None else position.reshape(h * w, -1)
      scores, frac = scoring.conditional_scores(
          lambda allowed: scoring.masked_sq_dist_from_groups(g_sq, allowed), n_sq, p_nb, p_pos,
          p, num_emb=num_emb, code_count=code_count, combine=spec.combine,
          min_plus_offset=lambda offset: scoring.min_plus_offset_from_groups(g_sq, offset),
          pos_base=None if position is None else scoring.position_base_rate(position))
      return scores, frac.mean()

    patch, frac = jax.vmap(one_point)(hp_patch)              # [U, h*w], [U]
    return scoring.edge_pad_border(patch.reshape(-1, h, w), spec.border), frac

  patch, frac = jax.lax.map(one_image, (group_sq, nearest_sq, logits))   # [N, U, h, w], [N, U]
  patch = jnp.swapaxes(patch, 0, 1)                                       # [U, N, h, w]
  which = jnp.arange(hp.sigma.shape[0]) // maps_per_patch

  # Point by point (lax.map): the same compiled einsum whatever the chunk, so a point's maps (and
  # metrics) do not depend on which chunk it lands in.
  def one_map(args):
    i, sigma, top = args
    p = patch[i]
    m = scoring.anomaly_maps(p, spec.out_size, sigma, spec.max_sigma)
    return m, infer.image_scores({'c_emb': c_emb, 'emb_valid': emb_valid}, feats, p, m,
                                 scoring.HParams(top_percent=top), spec)

  maps, image = jax.lax.map(one_map, (which, hp.sigma, hp.top_percent))
  return maps, image, frac.mean(0)[which]


def chunk_size(cfg_sweep, num_images: int, crop: int) -> int:
  """Grid points per compiled call: sweep.chunk_size, shrunk so that one chunk's maps and their
  metric keys (~12 bytes per pixel and point) fit sweep.memory_mb."""
  per_point = 12 * num_images * crop * crop
  fit = int(float(cfg_sweep.memory_mb) * 2 ** 20 // per_point)
  return max(1, min(int(cfg_sweep.chunk_size), fit))


def _stack(points: list[dict], base: scoring.HParams) -> scoring.HParams:
  return scoring.HParams(**{
      f.name: jnp.asarray([p.get(f.name, float(getattr(base, f.name))) for p in points],
                          jnp.float32)
      for f in dataclasses.fields(scoring.HParams)})


def evaluate_grid(cache: Cache, points: list[dict[str, float]], base: scoring.HParams,
                  spec: infer.ScoringSpec, chunk: int, max_fpr: float = 0.3) -> list[dict]:
  """Metrics of every grid point: [{hyper-parameter values..., metrics...}].

  `points` is a product grid with the patch-score parameters (PATCH_PARAMS) varying slower than
  the map parameters (as `grid_points` orders them); each call takes max(1, chunk // M) patch
  points and their M map points each.
  """
  rows = []
  names = list(points[0]) if points else []
  map_names = [n for n in names if n not in PATCH_PARAMS]
  per_patch = len({tuple(p[n] for n in map_names) for p in points}) if map_names else 1
  if len(points) % per_patch:
    raise ValueError('evaluate_grid needs a product grid (map parameters innermost)')
  groups = [points[i:i + per_patch] for i in range(0, len(points), per_patch)]
  step = max(1, chunk // per_patch)
  for start in range(0, len(groups), step):
    part = groups[start:start + step]
    padded = part + [part[-1]] * (step - len(part))           # one compiled shape per sweep
    flat = [p for group in padded for p in group]
    maps, image, allowed = grid_scores(
        cache.group_sq, cache.nearest_sq, cache.logits, cache.position, cache.code_count,
        cache.feats, cache.c_emb, _stack([g[0] for g in padded], base), _stack(flat, base),
        spec=spec, num_emb=cache.num_emb, grid=cache.grid, maps_per_patch=per_patch,
        emb_valid=cache.emb_valid)
    g = len(part) * per_patch
    m = metrics_lib.grid_metrics(np.asarray(image)[:g], np.asarray(maps)[:g], cache.truth,
                                 max_fpr=max_fpr)
    allowed = np.asarray(allowed)[:g]
    for i, p in enumerate(flat[:g]):
      row = {n: p[n] for n in names}
      row.update({k: float(v[i]) for k, v in m.items()})
      row['allowed_fraction'] = float(allowed[i])
      rows.append(row)
  return rows


# ----------------------------------------------------------------------------- run


def sweep_spec(cfg_model, variant: infer.Variant, crop: int, axes: dict) -> infer.ScoringSpec:
  """The static spec with bounds that hold every grid value."""
  sc = cfg_model.scoring
  max_sigma = max([float(sc.sigma), float(sc.get('max_sigma', 16.0))] +
                  list(axes.get('sigma', ())))
  max_top = max([float(sc.top_percent)] + list(axes.get('top_percent', ())))
  return infer.make_spec(cfg_model, variant, (crop, crop), max_sigma=max_sigma,
                         max_top_percent=max_top)


def effective_config(cfg, fitted: model_lib.PNIModel) -> ml_collections.ConfigDict:
  """The fitted model's own config (data, backbone, features, neighbourhood window: what the
  model is) with this run's scoring choices (model.scoring, model.refine.fusion_weight,
  eval.max_fpr), variant switches (model.use_*) and sweep settings."""
  out = ml_collections.ConfigDict(fitted.meta['config'])
  with out.unlocked():
    out.model.scoring = ml_collections.ConfigDict(cfg.model.scoring.to_dict())
    out.model.refine.fusion_weight = float(cfg.model.refine.fusion_weight)
    for name in ('use_neighborhood', 'use_position', 'use_refinement'):
      out.model[name] = bool(cfg.model[name])
    out.eval.max_fpr = float(cfg.eval.max_fpr)
    out.sweep = ml_collections.ConfigDict(cfg.sweep.to_dict())
    out.data.root = str(cfg.data.root or out.data.root)
  return out


def _feature_key(cfg) -> tuple:
  m = cfg.model
  return (str(m.backbone), str(m.weights), tuple(m.layers), str(m.precision),
          int(m.aggregation_size), int(m.pre_dim), int(m.dim), int(cfg.data.crop),
          int(cfg.data.batch_size), int(cfg.seed))


def sweep_category(cfg, category: str, cat_dir: pathlib.Path, extractor: infer.Extractor | None,
                   axes: dict) -> tuple[list[dict], dict]:
  """Rows of one category and timings {'cache_s', 'grid_s'}.

  `cfg` supplies the scoring choices and the sweep; data and features follow the fitted model's
  saved config (`effective_config`). `extractor`: one made for that config (None: made here).
  """
  fitted = model_lib.load(cat_dir / 'model')
  cfg = effective_config(cfg, fitted)
  if extractor is None:
    extractor = infer.make_extractor(cfg)
  text = str(cfg.sweep.get('variant', '') or '')
  variant = infer.parse_variant(text) if text else infer.Variant(
      bool(cfg.model.use_neighborhood), bool(cfg.model.use_position), False)
  check_axes(axes, cfg.model, variant)
  crop = int(cfg.data.crop)
  spec = sweep_spec(cfg.model, variant, crop, axes)
  t0 = time.perf_counter()
  split = data_lib.load_split(cfg.data, category, 'test')
  feats, masks, labels = test_features(cfg, cat_dir, fitted, split, extractor)
  cache = build_cache(infer.scoring_arrays(cfg, fitted), feats, masks, labels, spec,
                      float(cfg.sweep.cache_mb))
  jax.block_until_ready(cache.group_sq)
  t1 = time.perf_counter()
  points = grid_points(axes)
  chunk = min(chunk_size(cfg.sweep, feats.shape[0], crop), len(points))
  rows = evaluate_grid(cache, points, scoring.hparams_from_config(cfg.model), spec, chunk,
                       float(cfg.eval.max_fpr))
  t2 = time.perf_counter()
  logging.info('[%s] sweep of %d points (%s) in %.1fs (cache %.1fs, grid %.1fs in chunks of %d)',
               category, len(points), variant.name, t2 - t0, t1 - t0, t2 - t1, chunk)
  for r in rows:
    r['variant'] = variant.name
  return rows, dict(cache_s=t1 - t0, grid_s=t2 - t1)


def run(cfg, workdir) -> list[dict]:
  """Sweeps every fitted category of `workdir`; writes sweep.csv / sweep.md / heat maps."""
  workdir = pathlib.Path(workdir)
  axes = grid_axes(cfg)
  if not axes:
    check_axes(axes, cfg.model, infer.Variant())
  if cfg.data.name == 'generated' and not cfg.data.root:
    with cfg.unlocked():
      cfg.data.root = str(workdir / 'data')
  fitted_cats = sorted(p.parent.parent.name for p in workdir.glob('*/model/meta.json'))
  if not fitted_cats:
    raise FileNotFoundError(f'no fitted model under {workdir} (expected <category>/model/): fit '
                            'first with --mode=fit_eval')
  wanted = list(cfg.data.categories) or fitted_cats
  missing = [c for c in wanted if c not in fitted_cats]
  if missing:
    raise FileNotFoundError(f'no fitted model for {", ".join(missing)} in {workdir}')
  extractors, rows = {}, []
  for category in wanted:
    eff = effective_config(cfg, model_lib.load(workdir / category / 'model'))
    key = _feature_key(eff)
    if key not in extractors:                      # one backbone per feature setting, not per cat
      extractors[key] = infer.make_extractor(eff)
    cat_rows, _ = sweep_category(cfg, category, workdir / category, extractors[key], axes)
    rows += [dict(r, category=category) for r in cat_rows]
  write_outputs(workdir, rows, list(axes))
  return rows


def _label(row: dict, names: list[str]) -> str:
  return ', '.join(f'{n}={row[n]:g}' for n in names)


def mean_rows(rows: list[dict], names: list[str]) -> list[dict]:
  """Category means per grid point (in grid order)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r[n] for n in names), []).append(r)
  out = []
  for key, members in groups.items():
    row = dict(zip(names, key))
    for m in METRICS + ('image_f1_max', 'allowed_fraction'):
      vals = [r[m] for r in members if not math.isnan(r[m])]
      row[m] = float(np.mean(vals)) if vals else float('nan')
    out.append(row)
  return out


def write_outputs(workdir: pathlib.Path, rows: list[dict], names: list[str]) -> None:
  columns = names + list(METRICS) + ['image_f1_max', 'allowed_fraction']
  table = [(f'{r["category"]} ({r["variant"]})', r) for r in rows]
  means = mean_rows(rows, names)
  table += [('mean', r) for r in means]
  report.write_table(workdir / 'sweep', table, columns, label='category',
                     percent_columns=list(METRICS) + ['image_f1_max', 'allowed_fraction'])
  best = max(means, key=lambda r: (np.nan_to_num(r['pixel_auroc']), np.nan_to_num(r['aupro'])))
  text = (workdir / 'sweep.md').read_text()
  fileio.atomic_write_text(workdir / 'sweep.md', text + (
      f'\nBest mean P-AUROC: {_label(best, names)} (I-AUROC {100 * best["image_auroc"]:.2f}, '
      f'P-AUROC {100 * best["pixel_auroc"]:.2f}, AUPRO {100 * best["aupro"]:.2f}, '
      f'P-F1 {100 * best["pixel_f1_max"]:.2f}).\n'))
  for a, b in itertools.combinations(names, 2):
    save_heatmaps(workdir / f'sweep_{a}_{b}.png', means, a, b)
  if len(names) == 1:
    save_heatmaps(workdir / f'sweep_{names[0]}.png', means, names[0], None)


def heat_values(means: list[dict], a: str, b: str | None, metric: str):
  """(values of a, values of b, [len(a), len(b)] best metric over the other parameters)."""
  va = sorted({r[a] for r in means})
  vb = sorted({r[b] for r in means}) if b else [0.0]
  grid = np.full((len(va), len(vb)), np.nan)
  for r in means:
    i, j = va.index(r[a]), (vb.index(r[b]) if b else 0)
    if not math.isnan(r[metric]):
      grid[i, j] = r[metric] if math.isnan(grid[i, j]) else max(grid[i, j], r[metric])
  return va, vb, grid


def save_heatmaps(path: pathlib.Path, means: list[dict], a: str, b: str | None) -> None:
  """One panel per metric: the category mean over (a, b), best over the other swept values."""
  fig = report._figure(4.0 * len(METRICS), 3.6, 100)        # pylint: disable=protected-access
  for k, metric in enumerate(METRICS):
    ax = fig.add_subplot(1, len(METRICS), k + 1)
    va, vb, grid = heat_values(means, a, b, metric)
    im = ax.imshow(100 * grid, origin='lower', aspect='auto', cmap='viridis')
    ax.set_yticks(range(len(va)), [f'{v:g}' for v in va])
    ax.set_ylabel(a)
    if b:
      ax.set_xticks(range(len(vb)), [f'{v:g}' for v in vb])
      ax.set_xlabel(b)
    else:
      ax.set_xticks([])
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        if not math.isnan(grid[i, j]):
          ax.text(j, i, f'{100 * grid[i, j]:.2f}', ha='center', va='center', fontsize=7,
                  color='white')
    ax.set_title(HEADERS[metric])
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.suptitle('category mean (%), best over the other swept parameters', fontsize=9)
  fig.tight_layout()
  report._save_figure(fig, path)                              # pylint: disable=protected-access
