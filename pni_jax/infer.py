"""The inference runtime: images -> patch features -> patch scores, maps and image scores.

Pure scoring (no config reads inside, hyper-parameters as data):
  `make_spec(cfg_model, variant, out_size)`  the static choices (variant, combine mode,
      image-score mode, tiles, bounds) as one hashable `ScoringSpec`
  `score_features(arrays, feats, hp, spec, images=None)`  arrays = `model.arrays(fitted)`,
      hp = `scoring.HParams` -> dict(patch, maps, image, allowed)
  `make_scorer(cfg_model, variant, out_size)`  that function jitted, with the config's
      hyper-parameters as defaults: `score(arrays, feats, images=None, hparams=None)`
  `score_variants(arrays, feats, hp, specs, images=None)` / `make_variants_scorer`  several
      variants of one batch in one call, what they share (the MLP's prior, the nearest C_emb
      row, patch scores) computed once (`Shared`)

Runtime (the deployable path `predict`, `export`, evaluation and calibration use):
  `make_extractor(cfg)` the backbone's jitted feature function with its variables on the devices
      (once per run); `Extractor.scorer` builds each data-parallel scorer (of a tuple of
      variants) once per run.
  `ModelRuntime(cfg, extractor, fitted, variants)` uploads a fitted model's arrays to the
      devices once (C_emb padded to its shape bucket, `scoring_arrays`, so that categories of
      different sizes share one compiled scorer) and scores batches of any size: a batch of b
      images runs at the smallest bucket (1, 2, 4, ... up to data.batch_size, a multiple of the
      device count) that holds it, so one image costs a batch-1 call, not a padded batch.

N + P work per patch, made to cost what its kernels cost (`patch_scores`):
  * the MLP over the p x p window as one convolution (its first layer) with BatchNorm folded into
    the layers, then dense layers (`mlp_logits`; equal to `neighborhood.neighbor_logits`);
  * priors, their combination and the threshold as one fused elementwise pass;
  * the unconstrained nearest C_emb row first; the masked search over C_emb only for the patches
    whose nearest code the prior excludes, in fixed-size chunks (`scoring.masked_sq_dist_sparse`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import coreset
from pni_jax import diagnostics
from pni_jax import features
from pni_jax import knn
from pni_jax import model as model_lib
from pni_jax import neighborhood
from pni_jax import scoring
from pni_jax import sharding


# ----------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
  """Which PNI components score a map: N (neighbourhood), P (position), R (refinement)."""
  neighborhood: bool = False
  position: bool = False
  refinement: bool = False
  combine: str | None = None   # overrides model.scoring.combine ('N+P@mean_score')

  @property
  def name(self) -> str:
    letters = ''.join(l for l, on in zip('NPR', (self.neighborhood, self.position,
                                                  self.refinement)) if on)
    name = 'baseline' if not letters else '+' + '+'.join(letters)
    return name if self.combine is None or not self.conditional else f'{name}@{self.combine}'

  @property
  def conditional(self) -> bool:
    return self.neighborhood or self.position


def parse_variant(text: str) -> Variant:
  """'baseline' | 'patchcore' | '-' -> no component; otherwise letters of 'NPR' ('N+P', 'NPR'),
  optionally '@<combine>' to score with that model.scoring.combine ('N+P@mean_score')."""
  text, _, combine = text.partition('@')
  combine = combine.strip() or None
  if combine is not None and combine not in scoring.COMBINE_MODES:
    raise ValueError(f'eval.ablations: unknown combine {combine!r} in {text}@{combine}; valid: '
                     f'{scoring.COMBINE_MODES}')
  t = text.strip().upper().replace('+', '')
  if t in ('', '-', 'BASELINE', 'PATCHCORE', 'BASE'):
    return Variant()
  bad = set(t) - set('NPR')
  if bad:
    raise ValueError(f'eval.ablations: cannot parse variant {text!r}: use letters N, P, R '
                     f"(e.g. 'N+P+R') or 'baseline', optionally '@combine'")
  return Variant('N' in t, 'P' in t, 'R' in t, combine if ('N' in t or 'P' in t) else None)


def variant_from_config(cfg_model) -> Variant:
  return Variant(bool(cfg_model.use_neighborhood), bool(cfg_model.use_position),
                 bool(cfg_model.use_refinement))


def tau(cfg_scoring, num_emb: int) -> float:
  """Threshold of eq. 5: tau = tau_scale / |C_emb| (paper: 1 / (2 |C_emb|))."""
  return float(cfg_scoring.tau_scale) / float(num_emb)


# ----------------------------------------------------------------------------- static spec


@dataclasses.dataclass(frozen=True)
class ScoringSpec:
  """The static (structural) part of scoring; hashable, so jit treats it as a constant."""
  variant: Variant
  out_size: tuple[int, int]
  combine: str = 'mean_prob'
  image_score: str = 'max'
  image_border: int = 0          # cells cut at each side for image_score='patch_max_cropped'
  border: int = 0                # N / N+P map border replaced by edge padding (scoring.border)
  window: int = 9                # neighbourhood window p
  dilation: int = 1              # neighbourhood window stride (model.neighborhood.dilation)
  infer_chunk: int = 4096        # patches per MLP call (rounded to whole images)
  query_tile: int = 1024
  bank_tile: int = 4096
  search_chunk: int = 256        # patches per masked-search chunk (where a prior binds)
  reweight_neighbors: int = 9
  max_sigma: float = 16.0        # static bound of a traced sigma
  max_top_percent: float = 1.0   # static bound of a traced top_percent
  dtype: str = 'float32'         # MLP compute dtype
  refine_input_size: int = 320
  refine_encoder: str = 'densenet161'
  refine_loss: str = 'reg_grad'


def image_border(cfg_model, variant: Variant) -> int:
  """Border cut by image_score='patch_max_cropped': model.scoring.image_border, or with -1 (auto)
  (p - 1) / 2 of the neighbourhood window for variants with N or P (the cells whose window leaves
  the map; the authors crop it from N / N+P maps) and 0 for the baseline (PatchCore)."""
  border = int(cfg_model.scoring.get('image_border', -1))
  if border >= 0:
    return border
  return (int(cfg_model.neighborhood.window) - 1) // 2 if variant.conditional else 0


def map_border(cfg_model, variant: Variant) -> int:
  """Cells of the N / N+P patch-score border that model.scoring.border='authors' crops and
  edge-pads back (the neighbourhood window's reach, where the MLP's windows leave the map); 0
  for 'pad' and for variants without N."""
  if not variant.neighborhood or cfg_model.scoring.get('border', 'pad') != 'authors':
    return 0
  nb = cfg_model.neighborhood
  return neighborhood.window_reach(int(nb.window), int(nb.get('dilation', 1)))


def make_spec(cfg_model, variant: Variant, out_size: tuple[int, int], *,
              max_sigma: float | None = None, max_top_percent: float | None = None
              ) -> ScoringSpec:
  """The static choices of `variant` under `cfg_model`. The bounds default to the config
  (model.scoring.max_sigma, at least sigma; top_percent); sweeps pass their grid's maxima."""
  sc, nb, r = cfg_model.scoring, cfg_model.neighborhood, cfg_model.refine
  return ScoringSpec(
      variant=variant, out_size=(int(out_size[0]), int(out_size[1])),
      combine=str(variant.combine or sc.combine), image_score=str(sc.image_score),
      image_border=image_border(cfg_model, variant), border=map_border(cfg_model, variant),
      window=int(nb.window), dilation=int(nb.get('dilation', 1)),
      infer_chunk=int(nb.infer_chunk),
      query_tile=int(sc.query_tile), bank_tile=int(sc.bank_tile),
      search_chunk=int(sc.get('search_chunk', 256)),
      reweight_neighbors=int(sc.reweight_neighbors),
      max_sigma=float(max_sigma if max_sigma is not None
                      else max(float(sc.get('max_sigma', 16.0)), float(sc.sigma))),
      max_top_percent=float(max_top_percent if max_top_percent is not None
                            else float(sc.top_percent)),
      dtype=mlp_dtype(cfg_model),
      refine_input_size=int(r.input_size), refine_encoder=str(r.encoder), refine_loss=str(r.loss))


# ----------------------------------------------------------------------------- the MLP


def mlp_dtype(cfg_model) -> str:
  """The MLP's compute dtype when scoring: model.scoring.mlp_precision, or model.precision when
  that is empty. ('bfloat16' ran the demo MLP 1.4-1.6x faster on a CPU with AVX512-BF16; the
  matmuls accumulate in float32; README 'Scale: devices, precision, memory' gives the measured
  speed and accuracy.)"""
  name = str(cfg_model.scoring.get('mlp_precision', '') or '')
  if not name:
    return jnp.dtype(features.compute_dtype(cfg_model)).name
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"model.scoring.mlp_precision must be '', 'float32' or 'bfloat16', got "
                     f'{name!r}')
  return name


def _fold_mlp(variables) -> list[tuple[jax.Array, jax.Array]]:
  """The MLP's layers as [(kernel [in, out], bias [out])] with inference BatchNorm folded in
  (y = (x W + b - mean) * scale / sqrt(var + eps) + beta); ReLU between them."""
  params = variables['params']
  stats = variables.get('batch_stats', {})
  names = sorted((k for k in params if k.startswith('Dense_')), key=lambda k: int(k.split('_')[1]))
  layers = []
  for i, name in enumerate(names):
    kernel = jnp.asarray(params[name]['kernel'])           # a folded kernel keeps its dtype
    bias = jnp.asarray(params[name].get('bias', jnp.zeros(kernel.shape[1])), jnp.float32)
    bn = f'BatchNorm_{i}'
    if i < len(names) - 1 and bn in params:
      s = params[bn]['scale'] * jax.lax.rsqrt(stats[bn]['var'] + 1e-5)
      kernel = kernel.astype(jnp.float32) * s[None, :]
      bias = (bias - stats[bn]['mean']) * s + params[bn]['bias']
    layers.append((kernel, bias))
  return layers


@functools.partial(jax.jit, static_argnames='dtype')
def fold_mlp(variables, dtype='float32') -> dict:
  """The MLP's variables with its inference BatchNorm folded into the dense layers:
  {'params': {'Dense_i': {'kernel' (dtype), 'bias' (float32)}}}; `mlp_logits` computing in
  `dtype` gives the same logits from either form.

  `scoring_arrays` uploads this form, so a scorer does not refold and reconvert the weights on
  every call (demo MLP on this CPU: 3-4 ms per call whatever the batch size, the float32 ->
  bfloat16 conversion of the first layer alone 2.2 ms)."""
  return {'params': {f'Dense_{i}': {'kernel': k.astype(dtype), 'bias': b}
                     for i, (k, b) in enumerate(_fold_mlp(variables))}}


def mlp_logits(variables, feats: jax.Array, *, window: int, dilation: int = 1,
               chunk: int = 4096, dtype=jnp.float32) -> jax.Array:
  """MLP logits at every position, as `neighborhood.neighbor_logits` computes them.

  The first layer reads the p x p window (centre removed, zeros outside the map), i.e. it is a
  p x p convolution whose centre tap is zero (in bfloat16 written as the window's shifted copies
  times one matrix); the others are dense layers on each position.
  Images go through in groups of max(1, chunk // (H W)) (`lax.map`), bounding the activations.

  Args:
    variables: the trained MLP's {'params', 'batch_stats'}, or its folded form (`fold_mlp`).
    feats: [B, H, W, d] patch features.
    window: p (odd); dilation: cells between window taps (1 = adjacent).
    dtype: compute dtype of the matmuls (float32 accumulation).
  Returns:
    [B, H, W, K_dist] float32.
  """
  b, h, w, d = feats.shape
  cdt = jnp.dtype(dtype)
  # Weights in the compute dtype once, outside the groups' loop (XLA:CPU does not hoist the
  # folding and conversion out of it); a no-op for `fold_mlp`'s form in this dtype.
  layers = [(kern.astype(cdt), bias) for kern, bias in _fold_mlp(variables)]
  first, first_bias = layers[0]
  p = int(window)
  if first.shape[0] != (p * p - 1) * d:
    raise ValueError(f'MLP expects {first.shape[0]} inputs, but window {p} and d = {d} give '
                     f'{(p * p - 1) * d}')
  r = (p // 2) * int(dilation)
  step = int(dilation)
  offsets = [(dy, dx) for dy in range(p) for dx in range(p) if (dy, dx) != (p // 2, p // 2)]
  taps = first.reshape(p * p - 1, d, -1)
  centre = (p * p) // 2
  taps = jnp.concatenate([taps[:centre], jnp.zeros_like(taps[:1]), taps[centre:]], axis=0)
  kernel = taps.reshape(p, p, d, -1)                                    # HWIO

  def first_layer(x):                                                   # [g, H, W, d]
    if cdt == jnp.float32:
      return jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding=((r, r), (r, r)),
          rhs_dilation=(step, step), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          preferred_element_type=jnp.float32)
    # Lower precision: the window's p*p - 1 shifted copies side by side ([g, H, W, (p*p - 1) d],
    # the first layer's input order) times one matrix. XLA:CPU runs a bfloat16 dot at twice its
    # float32 rate (AVX512-BF16) but has no fast bfloat16 convolution; the copies are bounded by
    # `chunk` (on GPU both forms are GEMMs).
    x = x.astype(cdt)
    g = x.shape[0]
    # The copies are made as 32-bit words (two 16-bit values each when d is even): XLA moves a
    # float conversion behind a concatenation, and its concatenation copies 16-bit elements one
    # by one; the words copy twice as fast (demo b8: 85 -> 50 ms) and keep the values' bits.
    pairs = cdt.itemsize == 2 and d % 2 == 0
    if pairs:
      x = jax.lax.bitcast_convert_type(x.reshape(g, h, w, d // 2, 2), jnp.uint32)
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    cols = jnp.concatenate([xp[:, dy * step:dy * step + h, dx * step:dx * step + w]
                            for dy, dx in offsets], axis=-1)
    if pairs:
      cols = jax.lax.bitcast_convert_type(cols, cdt).reshape(g, h, w, -1)
    return jnp.dot(cols, first, preferred_element_type=jnp.float32)

  def one_group(x):                                                     # [g, H, W, d]
    y = first_layer(x) + first_bias
    for kern, bias in layers[1:]:
      y = jax.nn.relu(y)
      y = jnp.dot(y.astype(cdt), kern, preferred_element_type=jnp.float32) + bias
    return y

  per = max(1, min(b, int(chunk) // (h * w)))
  groups = -(-b // per)
  if groups == 1:
    return one_group(feats)
  x = sharding.pad_rows(feats, per)[0] if b % per else feats
  out = jax.lax.map(one_group, x.reshape(groups, per, h, w, d))
  return out.reshape(groups * per, h, w, -1)[:b]


# ----------------------------------------------------------------------------- padded banks


def pad_bank(arrays: dict, rows: int) -> dict:
  """The model arrays with C_emb padded to `rows` rows, every score unchanged.

  |C_emb| is 1 % of a category's training patches, so each category would compile its own
  scorer; padded to a shape bucket, categories of similar sizes share one. The padding rows are
  copies of row 0 of C_emb with its code: every distance search sees the same set of vectors
  (ties go to the lowest index, so a copy never replaces row 0) and every masked search the same
  allowed set. What counts rows reads `emb_valid` [rows] bool (True for the real rows):
  |C_emb| in tau = tau_scale / |C_emb|, the allowed fraction (`bank_counts`), and PatchCore's
  reweighting, whose k nearest neighbours in C_emb exclude the copies.

  Args:
    arrays: model arrays (`model.arrays`) with 'c_emb' [K_emb, d], 'emb_to_dist' [K_emb].
    rows: K_pad >= K_emb.
  Returns:
    The same dict with 'c_emb' [K_pad, d], 'emb_to_dist' [K_pad], 'emb_valid' [K_pad] bool.
  """
  c_emb, e2d = arrays['c_emb'], arrays['emb_to_dist']
  if arrays.get('emb_valid') is not None:
    raise ValueError('pad_bank: the arrays are padded already')
  k = int(c_emb.shape[0])
  if rows < k:
    raise ValueError(f'pad_bank: cannot pad C_emb of {k} rows to {rows}')
  xp = np if isinstance(c_emb, np.ndarray) else jnp
  extra = rows - k
  return dict(arrays,
              c_emb=xp.concatenate([c_emb, xp.repeat(c_emb[:1], extra, axis=0)]),
              emb_to_dist=xp.concatenate([e2d, xp.repeat(e2d[:1], extra)]),
              emb_valid=xp.arange(rows) < k)


def bank_counts(arrays: dict, num_dist: int):
  """(|C_emb|, code_count [K_dist] float32: real C_emb rows per C_dist code) of model arrays,
  padded (`pad_bank`: counted from 'emb_valid', |C_emb| a float32 scalar) or not (|C_emb| the
  row count)."""
  valid = arrays.get('emb_valid')
  return (scoring.num_rows(arrays['c_emb'], valid),
          scoring.code_counts(arrays['emb_to_dist'], num_dist, valid))


def bank_rows(cfg, fitted: model_lib.PNIModel) -> int:
  """Rows C_emb is padded to for scoring (runtime.shape_buckets; else K_emb itself): the coreset
  size of the fit's training-image bucket (`sharding.images_bucket` of meta num_train and
  runtime.min_train_images, as `fit.shape_bucket`), so that every category of one image bucket
  shares the scorer; a model without that metadata gets the bucket of K_emb."""
  k = int(np.shape(fitted.c_emb)[0])
  if not _buckets_on(cfg):
    return k
  meta = fitted.meta
  try:
    h, w = (int(v) for v in meta['grid'])
    ratio = float(meta['base_config']['coreset']['ratio'])
    images = sharding.images_bucket(int(meta['num_train']),
                                    cfg.runtime.get('min_train_images', 0))
    capacity = coreset.coreset_size(images * h * w, ratio)
  except (KeyError, TypeError, ValueError):
    capacity = 0
  return capacity if capacity >= k else sharding.bucket_size(k)


def scoring_arrays(cfg, fitted: model_lib.PNIModel) -> dict:
  """`model.arrays(fitted)` with C_emb padded to `bank_rows` (`pad_bank`): what the scorers of a
  run are given, so that they compile once per bucket (the saved model is not changed). Without
  runtime.shape_buckets: `model.arrays(fitted)` itself (no 'emb_valid'). Either way the MLP comes
  with its BatchNorm folded in (`fold_mlp`)."""
  if not _buckets_on(cfg):
    return _folded(model_lib.arrays(fitted), cfg)
  bank = pad_bank({'c_emb': np.asarray(fitted.c_emb),
                   'emb_to_dist': np.asarray(fitted.emb_to_dist)},
                  bank_rows(cfg, fitted))                   # on the host: nothing compiles
  arrays = model_lib.arrays(fitted.replace(c_emb=bank['c_emb'], emb_to_dist=bank['emb_to_dist']))
  return dict(_folded(arrays, cfg), emb_valid=jax.device_put(bank['emb_valid']))


def _folded(arrays: dict, cfg) -> dict:
  """The arrays with the MLP in its folded form (`fold_mlp`) for the scorers' compute dtype
  (float32 when `cfg` has no model section: a scorer in another dtype converts per call)."""
  if arrays.get('mlp') is None:
    return arrays
  dtype = mlp_dtype(cfg.model) if 'model' in cfg else 'float32'
  return dict(arrays, mlp=fold_mlp(arrays['mlp'], dtype=dtype))


def _buckets_on(cfg) -> bool:
  runtime = cfg.get('runtime')
  return runtime is not None and bool(runtime.get('shape_buckets', False))


# ----------------------------------------------------------------------------- pure scoring


def _check_component(arrays: dict, name: str, what: str, setting: str) -> None:
  if arrays.get(name) is None:
    raise ValueError(f'variant uses {what} but the model has no {name} arrays '
                     f'(fit with {setting}=True)')


class Shared:
  """The values that several variants' scoring of one batch have in common (the MLP's prior,
  the nearest C_emb row, whole patch-score maps), each computed once per trace: variants that
  differ only in what follows (R, the combine rule, the image score) share what precedes it.
  Keys name everything a value depends on besides the batch, the arrays and the hparams."""

  def __init__(self):
    self._values = {}

  def get(self, key, compute):
    if key not in self._values:
      self._values[key] = compute()
    return self._values[key]


def priors(arrays: dict, feats: jax.Array, hp: scoring.HParams, spec: ScoringSpec,
           shared: Shared | None = None):
  """(p_nb [B, H, W, K] or None, p_pos [1, H, W, K] or None) of the variant."""
  v = spec.variant
  shared = Shared() if shared is None else shared
  _, h, w, _ = feats.shape
  p_nb = p_pos = None
  if v.neighborhood:
    _check_component(arrays, 'mlp', 'N', 'model.use_neighborhood')

    def neighbor_prior():
      logits = mlp_logits(arrays['mlp'], feats, window=spec.window, dilation=spec.dilation,
                          chunk=spec.infer_chunk, dtype=spec.dtype)
      return scoring.neighbor_prior(logits, hp.temperature)

    p_nb = shared.get(('p_nb', spec.window, spec.dilation, spec.infer_chunk, spec.dtype),
                      neighbor_prior)
  if v.position:
    _check_component(arrays, 'position', 'P', 'model.use_position')
    pos = arrays['position']
    if pos.shape[:2] != (h, w):
      raise ValueError(f'position prior grid {pos.shape[:2]} != feature grid {(h, w)}: the model '
                       'was fitted at another image size')
    p_pos = pos[None]
  return p_nb, p_pos


def _patch_key(spec: ScoringSpec) -> tuple:
  """What a variant's patch scores depend on in its spec."""
  v = spec.variant
  return ('patch', v.neighborhood, v.position, spec.combine if v.conditional else None,
          spec.border, spec.window, spec.dilation, spec.infer_chunk, spec.dtype, spec.query_tile,
          spec.bank_tile, spec.search_chunk)


def patch_scores(arrays: dict, feats: jax.Array, hp: scoring.HParams, spec: ScoringSpec,
                 shared: Shared | None = None):
  """Patch scores of one batch.

  Args:
    arrays: model arrays (`model.arrays`): c_emb [K_emb, d], emb_to_dist [K_emb], position
      [H', W', K_dist] or None, mlp variables or None; optionally padded (`pad_bank`).
    feats: [B, H', W', d] patch features.
    hp: scalar `scoring.HParams`.
    shared: values computed for other variants of this batch (`Shared`), reused.
  Returns:
    (scores [B, H', W'] float32, allowed_fraction [B, H', W'] float32 (1 for the baseline)).
  """
  shared = Shared() if shared is None else shared
  return shared.get(_patch_key(spec), lambda: _patch_scores(arrays, feats, hp, spec, shared))


def _patch_scores(arrays: dict, feats: jax.Array, hp: scoring.HParams, spec: ScoringSpec,
                  shared: Shared):
  b, h, w, d = feats.shape
  flat = feats.reshape(-1, d)
  c_emb = arrays['c_emb']
  tiles = dict(query_tile=spec.query_tile, bank_tile=spec.bank_tile)
  if not spec.variant.conditional:
    sq = shared.get(('nearest_sq', spec.query_tile, spec.bank_tile),
                    lambda: knn.nearest_sq_dist(flat, c_emb, **tiles))
    return ((hp.likelihood_lambda * jnp.sqrt(sq)).reshape(b, h, w),
            jnp.ones((b, h, w), jnp.float32))
  p_nb, p_pos = priors(arrays, feats, hp, spec, shared)
  k = (p_nb if p_nb is not None else p_pos).shape[-1]
  if p_nb is not None:
    p_nb = p_nb.reshape(-1, k)
  if p_pos is not None:
    p_pos = jnp.broadcast_to(p_pos, (b, h, w, k)).reshape(-1, k)
  sq, idx = shared.get(('knn1', spec.query_tile, spec.bank_tile),
                       lambda: knn.knn(flat, c_emb, k=1, **tiles))
  sq, idx = sq[:, 0], idx[:, 0]
  e2d = arrays['emb_to_dist']

  def nearest_allowed_sq(allowed):
    return scoring.masked_sq_dist_sparse(flat, c_emb, e2d, allowed, sq, idx,
                                         chunk=spec.search_chunk, **tiles)

  def min_plus_offset(offset):
    value, _ = knn.min_dist_plus_offset(flat, c_emb, offset, e2d, scoring.offset_by_code,
                                        **tiles)
    return value

  num_emb, code_count = bank_counts(arrays, k)
  scores, frac = scoring.conditional_scores(
      nearest_allowed_sq, sq, p_nb, p_pos, hp, num_emb=num_emb, code_count=code_count,
      combine=spec.combine, min_plus_offset=min_plus_offset,
      pos_base=None if p_pos is None else scoring.position_base_rate(arrays['position']))
  scores = scoring.edge_pad_border(scores.reshape(b, h, w), spec.border)
  return scores, frac.reshape(b, h, w)


def refine_maps(refine_arrays: dict, images: jax.Array, maps: jax.Array, weight,
                spec: ScoringSpec) -> jax.Array:
  """Eq. 9 fusion: (1 - w) * normalize(A_hat) + w * f(I, normalize(A_hat)).

  Args:
    refine_arrays: {'variables', 'lo', 'hi'} (`model.arrays(...)['refine']`).
    images: [B, S, S, 3] float32 in [0, 1]; maps: [B, S, S] A_hat; weight: w (may be traced).
  Returns:
    [B, S, S] float32 in the normalised units of the refinement stage.
  """
  from pni_jax import refine  # the refinement network (and its encoder) only when used
  return refine.fuse(refine_arrays['variables'], images, maps, refine_arrays['lo'],
                     refine_arrays['hi'], weight, input_size=spec.refine_input_size,
                     encoder=spec.refine_encoder, loss=spec.refine_loss)


def image_scores(arrays: dict, feats, patch, maps, hp: scoring.HParams, spec: ScoringSpec):
  """[B] image scores of the spec's mode."""
  if spec.image_score == 'reweight':
    return scoring.reweighted_image_scores(
        feats, patch, arrays['c_emb'], spec.reweight_neighbors,
        query_tile=spec.query_tile, bank_tile=spec.bank_tile,
        bank_valid=arrays.get('emb_valid'))
  return scoring.image_scores(maps, patch, spec.image_score, hp.top_percent,
                              border=spec.image_border, max_top_percent=spec.max_top_percent)


def score_features(arrays: dict, feats: jax.Array, hp: scoring.HParams, spec: ScoringSpec,
                   images: jax.Array | None = None, shared: Shared | None = None) -> dict:
  """Patch scores, maps and image scores of one batch: a pure function of its arguments.

  With `spec.variant.refinement` the maps are the fused refined maps (images [B, S, S, 3] in
  [0, 1] needed) and the image score is taken from them, as in the paper's R rows.
  `shared` (`Shared`) reuses what other variants of this batch computed.

  Returns:
    dict(patch [B, h, w], maps [B, S, S], image [B], allowed [B, h, w]) float32.
  """
  shared = Shared() if shared is None else shared
  patch, allowed = patch_scores(arrays, feats, hp, spec, shared)
  maps = shared.get(('maps', _patch_key(spec), spec.out_size, spec.max_sigma),
                    lambda: scoring.anomaly_maps(patch, spec.out_size, hp.sigma, spec.max_sigma))
  if spec.variant.refinement:
    _check_component(arrays, 'refine', 'R', 'model.use_refinement')
    if images is None:
      raise ValueError('the refinement stage needs the images: score(arrays, feats, images)')
    maps = refine_maps(arrays['refine'], images, maps, hp.fusion_weight, spec)
  image = image_scores(arrays, feats, patch, maps, hp, spec)
  return dict(patch=patch, maps=maps, image=image, allowed=allowed)


# The key of `score_variants`' output that holds the prior diagnostics.
DIAGNOSTICS = '_diagnostics'


def diagnostics_values(arrays: dict, feats: jax.Array, hp: scoring.HParams, spec: ScoringSpec,
                       shared: Shared | None = None) -> dict:
  """`diagnostics.per_patch_values` of spec's priors (hyper-parameters from hp; tau of eq. 5
  from the real |C_emb|) -> {name: [B, h, w]}, the priors taken from `shared`."""
  p_nb, p_pos = priors(arrays, feats, hp, spec, Shared() if shared is None else shared)
  k = (p_nb if p_nb is not None else p_pos).shape[-1]
  num_emb, _ = bank_counts(arrays, k)
  values = diagnostics.per_patch_values(
      feats, arrays['c_emb'], arrays['emb_to_dist'], arrays.get('emb_valid'), p_nb,
      None if p_pos is None else p_pos[0], hp.tau_scale / num_emb, hp.likelihood_lambda, hp.rho,
      query_tile=spec.query_tile, bank_tile=spec.bank_tile)
  return {name: v.reshape(feats.shape[:3]) for name, v in values.items()}


def score_variants(arrays: dict, feats: jax.Array, hp: scoring.HParams,
                   specs: Iterable[ScoringSpec], images: jax.Array | None = None,
                   diagnostics_spec: ScoringSpec | None = None) -> dict[str, dict]:
  """`score_features` of several variants of one batch -> {variant name: its dict}, and with
  `diagnostics_spec` the prior diagnostics of its priors under the key `DIAGNOSTICS`
  (`diagnostics_values`).

  What the variants share is computed once (`Shared`): the MLP's prior, the nearest C_emb row
  and the patch scores (N+P and N+P+R differ only after the maps), so an ablation table costs
  one MLP per image, not one per row."""
  shared = Shared()
  out = {s.variant.name: score_features(arrays, feats, hp, s, images, shared) for s in specs}
  if diagnostics_spec is not None:
    out[DIAGNOSTICS] = diagnostics_values(arrays, feats, hp, diagnostics_spec, shared)
  return out


def _jit_with_defaults(cfg_model, score_fn):
  """jit of `score(arrays, feats, images=None, hparams=None)` = score_fn(arrays, feats, hp,
  images), hp defaulting to the config's (`scoring.hparams_from_config`)."""
  defaults = scoring.hparams_from_config(cfg_model)

  @jax.jit
  def score(arrays, feats, images=None, hparams=None):
    return score_fn(arrays, feats, defaults if hparams is None else hparams, images)

  return score


def make_scorer(cfg_model, variant: Variant, out_size: tuple[int, int]):
  """Jitted `score(arrays, feats, images=None, hparams=None) -> dict(patch [B,h,w], maps [B,S,S],
  image [B], allowed [B,h,w])`; hparams default to the config's (`scoring.hparams_from_config`)."""
  spec = make_spec(cfg_model, variant, out_size)
  return _jit_with_defaults(cfg_model, lambda a, f, hp, im: score_features(a, f, hp, spec, im))


def make_variants_scorer(cfg_model, variants: Iterable[Variant], out_size: tuple[int, int],
                         diagnostics_of: Variant | None = None):
  """Jitted `score(arrays, feats, images=None, hparams=None) -> {variant name: dict(...)}` of
  `score_variants` (one call scores every variant; shared work done once); with
  `diagnostics_of` (a variant with N and / or P) also the prior diagnostics of its priors."""
  specs = tuple(make_spec(cfg_model, v, out_size) for v in variants)
  names = [s.variant.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f'variants must be distinct, got {names}')
  diag = None
  if diagnostics_of is not None:
    if not diagnostics_of.conditional:
      raise ValueError(f'prior diagnostics need a variant with N or P, got {diagnostics_of.name}')
    diag = make_spec(cfg_model, diagnostics_of, out_size)
  return _jit_with_defaults(cfg_model,
                            lambda a, f, hp, im: score_variants(a, f, hp, specs, im, diag))


# ----------------------------------------------------------------------------- runtime


def bucket_size(b: int, batch_size: int, num_devices: int = 1) -> int:
  """The batch a call of b images runs at: the smallest power of two >= b, rounded up to a
  multiple of the device count, capped at `batch_size` (itself such a multiple)."""
  if b < 1:
    raise ValueError(f'batch of {b} images')
  p = 1
  while p < b:
    p *= 2
  return min(sharding.padded_size(p, num_devices), batch_size)


@dataclasses.dataclass
class Extractor:
  """The jitted feature function and backbone variables (on the devices), shared by every
  category of a run.

  Batches are split over `mesh` (all devices); `batch_size` is data.batch_size rounded up to a
  multiple of the device count, the variables are replicated.
  """
  fn: object
  variables: object
  batch_size: int
  mesh: object
  scorers: dict = dataclasses.field(default_factory=dict)

  def scorer(self, cfg, variants: tuple[Variant, ...], diagnostics_of: Variant | None = None):
    """The data-parallel jitted scorer of `variants` together (`make_variants_scorer`), built
    once per run (not per category), so categories with equal shapes reuse its compilation."""
    crop = int(cfg.data.crop)
    key = (tuple(variants), diagnostics_of, crop)
    if key not in self.scorers:
      self.scorers[key] = sharding.data_parallel(
          make_variants_scorer(cfg.model, variants, (crop, crop), diagnostics_of), self.mesh,
          sharded_argnums=(1, 2))
    return self.scorers[key]

  def maps_fn(self, cfg, variant: Variant):
    """Jitted `maps(arrays, images01 [B, S, S, 3]) -> [B, S, S]`: the backbone and the scorer of
    `variant` in one call (A_hat of the refinement stage), built once per run; the model arrays
    are an argument, so categories with equal shapes (`scoring_arrays`) reuse its compilation."""
    crop = int(cfg.data.crop)
    key = ('maps', variant, crop, mlp_dtype(cfg.model))
    if key not in self.scorers:
      score = make_scorer(cfg.model, variant, (crop, crop))
      fn = self.fn

      @jax.jit
      def maps(variables, arrays, images01):
        return score(arrays, fn(variables, images01))['maps']

      self.scorers[key] = lambda arrays, images01: maps(self.variables, arrays, images01)
    return self.scorers[key]

  def features(self, images: np.ndarray, full_batch: bool = False):
    """Host images [b, S, S, 3] -> (device images [n, ...], features [n, h, w, d]) at the
    bucket n >= b, or at the batch size with `full_batch` (padding repeats the last image)."""
    b = images.shape[0]
    n = (self.batch_size if full_batch
         else bucket_size(b, self.batch_size, sharding.num_shards(self.mesh)))
    if b > n:
      raise ValueError(f'{b} images exceed the batch size {self.batch_size}')
    images_dev = sharding.shard_rows(sharding.pad_rows(images, n)[0], self.mesh)
    return images_dev, self.fn(self.variables, images_dev)

  def feature_shape(self, crop: int) -> tuple[int, int, int]:
    """(h, w, d) of the features of a crop x crop image."""
    shape = jax.eval_shape(self.fn, self.variables,
                           jax.ShapeDtypeStruct((self.batch_size, crop, crop, 3), jnp.float32))
    return tuple(shape.shape[1:])


def make_extractor(cfg) -> Extractor:
  fn, variables = features.make_feature_fn(cfg.model, key=jax.random.key(cfg.seed))
  mesh = sharding.make_mesh()
  return Extractor(fn, sharding.replicate(variables, mesh),
                   sharding.padded_size(int(cfg.data.batch_size), sharding.num_shards(mesh)), mesh)


class ModelRuntime:
  """A fitted model on the devices, ready to score: its arrays and hyper-parameters are uploaded
  once, the scorers come from the extractor (built once per run). With `diagnostics_of` every
  call also returns the prior diagnostics' per-patch values of that variant's priors under
  `DIAGNOSTICS` ({name: [b, h, w]}, `diagnostics.summarize` reduces them)."""

  def __init__(self, cfg, extractor: Extractor, fitted: model_lib.PNIModel,
               variants: Iterable[Variant], hparams: scoring.HParams | None = None,
               diagnostics_of: Variant | None = None):
    self.extractor = extractor
    self.variants = list(variants)
    self.diagnostics_of = diagnostics_of
    mesh = extractor.mesh
    self.arrays = sharding.replicate(scoring_arrays(cfg, fitted), mesh)
    hp = scoring.hparams_from_config(cfg.model) if hparams is None else hparams
    self.hparams = sharding.replicate(hp, mesh)
    self.scorer = extractor.scorer(cfg, tuple(self.variants), diagnostics_of)

  def score(self, images: np.ndarray, keys=('maps', 'image', 'allowed'),
            full_batch: bool = False) -> dict[str, dict]:
    """images [b, S, S, 3] float32 in [0, 1] (b <= batch size) -> {variant name: {key: numpy
    array cut to b}}. Runs at the smallest batch bucket >= b (`bucket_size`: a request of one
    image costs a batch of one), or at the full batch size with `full_batch`."""
    images = np.asarray(images, np.float32)
    b = images.shape[0]
    images_dev, feats = self.extractor.features(images, full_batch)
    out = self.scorer(self.arrays, feats, images_dev, self.hparams)
    outs = {v.name: {k: np.asarray(out[v.name][k])[:b] for k in keys}   # cut on the host
            for v in self.variants}
    if self.diagnostics_of is not None:
      outs[DIAGNOSTICS] = {k: np.asarray(v)[:b] for k, v in out[DIAGNOSTICS].items()}
    return outs

  def score_batches(self, batches) -> Iterator[tuple[dict, dict]]:
    """Yields (batch, {variant name: dict(maps [b, S, S], image [b], allowed [b, h, w])}).

    Every batch runs at the full batch size: the held-out and test splits of a batch job's
    categories end in partial batches of any size, and one shape means one compilation for the
    whole run (padding a last batch costs at most batch - 1 images once per split; a new batch
    bucket costs a compile of the backbone and the scorer)."""
    for batch in batches:
      yield batch, self.score(batch['image'], full_batch=True)


def score_batches(cfg, extractor: Extractor, fitted: model_lib.PNIModel,
                  variants: list[Variant], batches):
  """Scores batches of images with every variant (`ModelRuntime.score_batches`).

  Yields (batch, {variant name: dict(maps [b, S, S], image [b], allowed [b, h, w])}) with numpy
  arrays cut to the batch's real size.
  """
  yield from ModelRuntime(cfg, extractor, fitted, variants).score_batches(batches)
