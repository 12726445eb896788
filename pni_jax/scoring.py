"""Patch scores -> anomaly maps and image scores, as pure functions of arrays and hyper-parameters.

* PatchCore: the patch score is the distance to the nearest C_emb vector.
* PNI (eq. 3-8): p(c | Omega) over C_dist from the neighbourhood MLP and / or the position
  histograms, thresholded at tau; with p(phi | c) = exp(-lambda ||phi - c||) the score
  -log max_{allowed c} p(phi | c) is lambda times the distance to the nearest *allowed* C_emb vector
  (a C_emb vector is allowed when its C_dist representative is). When nothing is allowed the
  nearest C_emb vector is used (the paper's fallback).
* Maps: bilinear upsampling to the crop and a Gaussian blur are both linear and separable, so the
  whole step is one matrix pair per axis: map = A_h @ s @ A_w^T with A = blur @ upsample.

Hyper-parameters are data. `HParams` is one pytree of every numeric scoring knob (tau scale,
temperature, lambda, the N / P mixing weight, sigma, top_percent, the fusion weight w); the
functions here take it as an argument and never branch on its values in Python, so
`jax.vmap(f, in_axes=(..., 0))` over a stacked `HParams` evaluates a whole grid in one call.
Structural choices (the combine mode, the image-score mode, which priors exist) stay static
arguments. The blur is built in jnp from a traced sigma with a static radius bound
(`max_sigma`); for sigma <= max_sigma it equals scipy.ndimage.gaussian_filter (truncate 4,
mode 'reflect').

Adding a variant: a new combine mode is a function `(nearest_allowed, prior_nb, prior_pos, hp,
num_emb, code_count) -> (dist [M], frac [M])` registered in `COMBINERS` (see
`_combine_thresholded`); a new numeric knob is a field of `HParams` (with its config path in
`HPARAM_CONFIG`), e.g. a relative threshold rho.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import knn

BORDER_MODES = ('pad', 'authors')
PRIOR_FLOOR = 1e-30   # -log p(c | Omega) of the posterior score is at most -log(1e-30) ~ 69
IMAGE_SCORES = ('max', 'patch_max', 'patch_max_cropped', 'top_percent', 'reweight')
TRUNCATE = 4.0   # scipy.ndimage.gaussian_filter's default: radius = int(4 sigma + 0.5)


# ----------------------------------------------------------------------------- hyper-parameters


@flax.struct.dataclass
class HParams:
  """Every numeric scoring hyper-parameter, as one pytree (leaves: scalars or [G] arrays).

  tau_scale: tau = tau_scale / |C_emb| (eq. 5; paper 0.5).
  temperature: p(c | N_p(x)) = softmax(logits / temperature) (paper 2).
  likelihood_lambda: lambda of eq. 8 (paper 1); scores are lambda * distance.
  neighborhood_weight: weight of the neighbourhood prior against the position prior (eq. 6 uses
    0.5: (p_N + p_P) / 2; with combine='mean_score' the weight of the N score).
  sigma: Gaussian blur of the upsampled map, in pixels (paper 8).
  top_percent: image_score='top_percent' averages this percentage of the highest map pixels.
  fusion_weight: w of the refinement fusion (1 - w) A_hat + w refined (paper 0.1).
  rho: the relative threshold of the 'relative*' rules: a code is allowed when
    p(c | Omega) > rho * max_c p(c | Omega).
  """
  tau_scale: jax.Array = 0.5
  temperature: jax.Array = 2.0
  likelihood_lambda: jax.Array = 1.0
  neighborhood_weight: jax.Array = 0.5
  sigma: jax.Array = 8.0
  top_percent: jax.Array = 1.0
  fusion_weight: jax.Array = 0.1
  rho: jax.Array = 0.01


# HParams field -> (config section under cfg.model, field name); the sweep fields of config.sweep
# carry the same names.
HPARAM_CONFIG = {
    'tau_scale': ('scoring', 'tau_scale'),
    'temperature': ('scoring', 'temperature'),
    'likelihood_lambda': ('scoring', 'likelihood_lambda'),
    'neighborhood_weight': ('scoring', 'neighborhood_weight'),
    'sigma': ('scoring', 'sigma'),
    'top_percent': ('scoring', 'top_percent'),
    'fusion_weight': ('refine', 'fusion_weight'),
    'rho': ('scoring', 'rho'),
}
HPARAM_NAMES = tuple(HPARAM_CONFIG)


def hparams_from_config(cfg_model, **overrides) -> HParams:
  """The config's values as float32 scalars (the defaults of every scorer); `overrides` replace
  fields by name."""
  values = {}
  for name, (section, field) in HPARAM_CONFIG.items():
    values[name] = cfg_model[section].get(field, getattr(HParams, name))
  unknown = set(overrides) - set(values)
  if unknown:
    raise ValueError(f'unknown hyper-parameter(s) {sorted(unknown)}; known: {HPARAM_NAMES}')
  values.update(overrides)
  return HParams(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def stack_hparams(points: list[HParams]) -> HParams:
  """[HParams of scalars] -> one HParams of [G] arrays (vmap over axis 0)."""
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs]), *points)


# ----------------------------------------------------------------------------- patch scores


def nearest_distance(feats: jax.Array, c_emb: jax.Array, *, query_tile: int, bank_tile: int):
  """PatchCore patch scores.

  Args:
    feats: [M, d] patch features.
    c_emb: [K, d] embedding coreset.
  Returns:
    (dist [M] float32 Euclidean distance to the nearest C_emb row, idx [M] int32).
  """
  sq, idx = knn.knn(feats, c_emb, k=1, query_tile=query_tile, bank_tile=bank_tile)
  return jnp.sqrt(sq[:, 0]), idx[:, 0]


def neighbor_prior(logits: jax.Array, temperature) -> jax.Array:
  """p(c_dist | N_p(x)) = softmax(logits / T) over the last axis (T may be traced; > 0 is checked
  by config validation)."""
  return jax.nn.softmax(logits / temperature, axis=-1)


def combine_priors(p_nb: jax.Array | None, p_pos: jax.Array | None,
                   mode: str = 'mean_prob', weight=0.5) -> jax.Array:
  """p(c | Omega) from the two priors, or whichever prior is present.

  'mean_prob' is the paper's eq. 6, (p(c | N_p(x)) + p(c | x)) / 2 (generally weight * p_N +
  (1 - weight) * p_P). 'product' treats the two as independent evidence, p_nb * p_pos
  renormalised (all zeros where their supports do not meet), so a code ruled out by either prior
  stays ruled out. 'max_prob': the larger of the two.

  Args:
    p_nb, p_pos: [..., K_dist] probabilities (or None when that prior is switched off); they
      broadcast against each other.
    weight: the N weight of 'mean_prob' (traced or float).
  """
  if p_nb is None and p_pos is None:
    raise ValueError('combine_priors needs at least one prior')
  if p_nb is None:
    return p_pos
  if p_pos is None:
    return p_nb
  if mode == 'product':
    prod = p_nb * p_pos
    total = prod.sum(-1, keepdims=True)
    return jnp.where(total > 0, prod / jnp.where(total > 0, total, 1.0), 0.0)
  if mode == 'max_prob':
    return jnp.maximum(p_nb, p_pos)
  if mode in ('mean_prob', 'mean_score'):
    return weight * p_nb + (1.0 - weight) * p_pos
  raise ValueError(f'model.scoring.combine must be one of {COMBINE_MODES}, got {mode!r}')


def _allowed_by_code(allowed_dist_tile, emb_to_dist_tile):
  # allowed_dist_tile: [tq, K_dist] bool; emb_to_dist_tile: [tk] int32 -> [tq, tk] bool.
  return jnp.take(allowed_dist_tile, emb_to_dist_tile, axis=1)


def code_counts(emb_to_dist: jax.Array, num_dist: int, emb_valid: jax.Array | None = None
                ) -> jax.Array:
  """[K_dist] float32: how many C_emb rows each C_dist code represents (only the rows where
  `emb_valid` [K_emb] bool is True: the real rows of a padded C_emb, `infer.pad_bank`)."""
  ones = 1.0 if emb_valid is None else jnp.asarray(emb_valid, jnp.float32)
  return jnp.zeros((num_dist,), jnp.float32).at[emb_to_dist].add(ones)


def num_rows(c_emb: jax.Array, emb_valid: jax.Array | None = None):
  """|C_emb|: the row count (an int), or the number of real rows of a padded C_emb (a float32
  scalar, so that it stays a traced value)."""
  if emb_valid is None:
    return int(c_emb.shape[0])
  return jnp.asarray(emb_valid, jnp.float32).sum()


def masked_sq_dist_dense(feats, c_emb, emb_to_dist, allowed_dist, *, query_tile, bank_tile):
  """Squared distance to the nearest allowed C_emb row for every patch (+inf where none).

  Args: feats [M, d]; c_emb [K_emb, d]; emb_to_dist [K_emb]; allowed_dist [M, K_dist] bool.
  """
  return knn.masked_min_sq(feats, c_emb, allowed_dist, emb_to_dist, _allowed_by_code,
                           query_tile=query_tile, bank_tile=bank_tile)


def masked_sq_dist_sparse(feats, c_emb, emb_to_dist, allowed_dist, nearest_sq, nearest_idx, *,
                          chunk: int, query_tile: int, bank_tile: int):
  """`masked_sq_dist_dense`, searching only where the prior binds.

  When the nearest C_emb row's code is allowed, its distance is the answer. Only the other
  patches are searched, gathered into fixed-size chunks of `chunk` rows (a `while_loop` over as
  many chunks as there are such patches), so the cost follows the number of excluded patches.

  Args:
    feats [M, d]; c_emb [K_emb, d]; emb_to_dist [K_emb] int32; allowed_dist [M, K_dist] bool;
    nearest_sq [M], nearest_idx [M]: the unconstrained nearest C_emb row (`knn`, k=1).
  Returns:
    [M] float32 squared distances (+inf where nothing is allowed).
  """
  m = feats.shape[0]
  chunk = max(1, min(int(chunk), m))
  nearest_code = jnp.take(emb_to_dist, nearest_idx)
  ok = jnp.take_along_axis(allowed_dist, nearest_code[:, None], axis=1)[:, 0]
  out = jnp.where(ok, nearest_sq, jnp.inf)
  need = ~ok
  count = need.sum()
  num_chunks = -(-m // chunk)
  rows = jnp.nonzero(need, size=num_chunks * chunk, fill_value=m)[0]   # m = "no row"

  def body(state):
    i, out = state
    ids = jax.lax.dynamic_slice_in_dim(rows, i * chunk, chunk)
    safe = jnp.minimum(ids, m - 1)
    sq = masked_sq_dist_dense(feats[safe], c_emb, emb_to_dist, allowed_dist[safe],
                              query_tile=min(query_tile, chunk), bank_tile=bank_tile)
    return i + 1, out.at[ids].set(sq, mode='drop')

  _, out = jax.lax.while_loop(lambda s: s[0] * chunk < count, body, (jnp.int32(0), out))
  return out


class Distances(NamedTuple):
  """What a combine rule may ask of the distances (each returns [M] float32 distances):
  nearest_allowed(allowed [M, K_dist] bool): to the nearest C_emb row whose code is allowed, the
    plain nearest where none is (the paper's fallback);
  min_plus_offset(offset [M, K_dist]): min_c (||phi - c|| + offset[code(c)]) (posterior rules).
  """
  nearest_allowed: Callable
  min_plus_offset: Callable


def _allowed_fraction(allowed, code_count, num_emb):
  return (allowed.astype(jnp.float32) @ code_count) / num_emb


def _per_prior(one, p_nb, p_pos, hp, each: bool, mode: str = 'mean_prob'):
  """`one(prior) -> (dist, frac)` on the combined prior, or (each=True: the authors' N+P rule)
  on each prior separately, averaged with the N weight."""
  if each and p_nb is not None and p_pos is not None:
    w = hp.neighborhood_weight
    d1, f1 = one(p_nb)
    d2, f2 = one(p_pos)
    return w * d1 + (1.0 - w) * d2, w * f1 + (1.0 - w) * f2
  return one(combine_priors(p_nb, p_pos, mode, hp.neighborhood_weight))


def _combine_thresholded(dists, p_nb, p_pos, hp, num_emb, code_count, mode):
  """Eq. 4-5: a code is allowed when its prior exceeds tau = tau_scale / |C_emb|; distance to the
  nearest allowed C_emb row (fallback: the nearest), and the allowed fraction of C_emb."""
  tau = hp.tau_scale / num_emb

  def one(prior):
    allowed = prior > tau
    return dists.nearest_allowed(allowed), _allowed_fraction(allowed, code_count, num_emb)

  return _per_prior(one, p_nb, p_pos, hp, mode == 'mean_score',
                    'mean_prob' if mode == 'mean_score' else mode)


def _combine_relative(dists, p_nb, p_pos, hp, num_emb, code_count, each):
  """A threshold relative to the most probable code: allowed when p > rho * max_c p. It does not
  depend on |C_emb| (tau does), only on how peaked the prior is, and the most probable code is
  always allowed. each=True ('relative_score'): each prior on its own, scores averaged."""

  def one(prior):
    allowed = prior > hp.rho * prior.max(-1, keepdims=True)
    return dists.nearest_allowed(allowed), _allowed_fraction(allowed, code_count, num_emb)

  return _per_prior(one, p_nb, p_pos, hp, each)


def position_base_rate(position: jax.Array) -> jax.Array:
  """[K] each code's mean probability over the positions of a position prior [H, W, K]: the
  base rate the 'relative_lift_score' rule compares p(c | x) with."""
  return position.reshape(-1, position.shape[-1]).mean(0)


def _combine_relative_lift(dists, p_nb, p_pos, hp, num_emb, code_count, pos_base):
  """'relative_lift_score': N allowed where p(c | Omega) > rho * max_c p (as 'relative'); P
  allowed where p(c | x) > rho * pi(c), pi the code's base rate over all positions
  (`position_base_rate`): P excludes a code only where the position makes it rho times rarer
  than it is anywhere on average. A relative-to-max threshold on P also excludes codes that
  are rare everywhere (a texture's skewed code shares), which says nothing about position.
  Scores averaged with the N weight, as the authors average N and P scores."""
  outs = []
  if p_nb is not None:
    allowed = p_nb > hp.rho * p_nb.max(-1, keepdims=True)
    outs.append((dists.nearest_allowed(allowed), _allowed_fraction(allowed, code_count, num_emb)))
  if p_pos is not None:
    if pos_base is None:
      raise ValueError("combine='relative_lift_score' needs the position prior's base rate")
    allowed = p_pos > hp.rho * pos_base
    outs.append((dists.nearest_allowed(allowed), _allowed_fraction(allowed, code_count, num_emb)))
  if len(outs) == 1:
    return outs[0]
  w = hp.neighborhood_weight
  return (w * outs[0][0] + (1.0 - w) * outs[1][0], w * outs[0][1] + (1.0 - w) * outs[1][1])


def _combine_posterior(dists, p_nb, p_pos, hp, num_emb, code_count, ratio):
  """The posterior score without a threshold: min_c (lam ||phi - c|| - log p(c | Omega)) / lam
  (eq. 3 with its sum replaced by the largest term, in log space), the prior floored at
  PRIOR_FLOOR. ratio=True divides the prior by its max first (a patch matching the most probable
  code exactly scores its distance, whatever the prior's spread)."""
  del num_emb, code_count
  prior = combine_priors(p_nb, p_pos, 'mean_prob', hp.neighborhood_weight)
  if ratio:
    prior = prior / jnp.maximum(prior.max(-1, keepdims=True), PRIOR_FLOOR)
  offset = -jnp.log(jnp.maximum(prior, PRIOR_FLOOR)) / hp.likelihood_lambda
  dist = dists.min_plus_offset(offset)
  return dist, jnp.ones_like(dist)


COMBINERS: dict[str, Callable] = {
    'mean_prob': functools.partial(_combine_thresholded, mode='mean_prob'),
    'product': functools.partial(_combine_thresholded, mode='product'),
    'max_prob': functools.partial(_combine_thresholded, mode='max_prob'),
    'mean_score': functools.partial(_combine_thresholded, mode='mean_score'),
    'relative': functools.partial(_combine_relative, each=False),
    'relative_score': functools.partial(_combine_relative, each=True),
    'relative_lift_score': _combine_relative_lift,
    'posterior': functools.partial(_combine_posterior, ratio=False),
    'posterior_ratio': functools.partial(_combine_posterior, ratio=True),
}
COMBINE_MODES = tuple(COMBINERS)
USES_POS_BASE = ('relative_lift_score',)   # rules that take `pos_base` (the P base rate)


def conditional_scores(nearest_allowed_sq: Callable, nearest_sq: jax.Array, p_nb, p_pos,
                       hp: HParams, *, num_emb: int, code_count: jax.Array, combine: str,
                       min_plus_offset: Callable | None = None,
                       pos_base: jax.Array | None = None):
  """PNI patch scores lambda * (distance under the combine rule) from distance oracles.

  Args:
    nearest_allowed_sq: allowed_dist [M, K_dist] bool -> [M] squared distance to the nearest
      allowed C_emb row (+inf where none); see `masked_sq_dist_sparse` / `group_min_sq_dists`.
    nearest_sq: [M] squared distance to the nearest C_emb row (the fallback).
    p_nb, p_pos: [M, K_dist] priors (or broadcastable), or None when switched off.
    hp: HParams (scalars here; vmap for grids).
    num_emb: |C_emb| (an int, or a traced scalar for a padded C_emb: `infer.bank_counts`);
      code_count: [K_dist] C_emb rows per code (`code_counts`).
    combine: a key of COMBINERS (static).
    min_plus_offset: offset [M, K_dist] -> [M] min_c (||phi - c|| + offset[code(c)]) (the
      posterior rules; see `Distances`).
    pos_base: [K_dist] the position prior's base rate (`position_base_rate`), for the rules
      in USES_POS_BASE.
  Returns:
    scores [M] float32, allowed_fraction [M] float32.
  """
  if combine not in COMBINERS:
    raise ValueError(f'model.scoring.combine must be one of {COMBINE_MODES}, got {combine!r}')

  def nearest_allowed(allowed):
    sq = nearest_allowed_sq(allowed)
    return jnp.sqrt(jnp.where(jnp.isfinite(sq), sq, nearest_sq))

  def no_offsets(offset):
    raise ValueError(f'combine={combine!r} needs a min_plus_offset distance oracle')

  dists = Distances(nearest_allowed, min_plus_offset or no_offsets)
  extra = {'pos_base': pos_base} if combine in USES_POS_BASE else {}
  dist, frac = COMBINERS[combine](dists, p_nb, p_pos, hp, num_emb, code_count, **extra)
  return hp.likelihood_lambda * dist, frac


def min_plus_offset_from_groups(group_sq: jax.Array, offset: jax.Array) -> jax.Array:
  """min_k (sqrt(group_sq[m, k]) + offset[m, k]) from per-code squared distances
  (`group_min_sq_dists`; +inf for codes without a C_emb row): [M] float32."""
  return jnp.min(jnp.sqrt(group_sq) + offset, axis=-1)


def conditional_distance(feats: jax.Array, c_emb: jax.Array, emb_to_dist: jax.Array,
                         prior: jax.Array, tau, *, query_tile: int, bank_tile: int,
                         emb_valid: jax.Array | None = None):
  """Distance to the nearest C_emb vector whose C_dist representative has prior > tau (eq. 4-5).

  The reference (dense) formulation: every patch searches all of C_emb with the mask applied.

  Args:
    feats: [M, d] patch features.
    c_emb: [K_emb, d].
    emb_to_dist: [K_emb] int32, the nearest C_dist row of each C_emb row.
    prior: [M, K_dist] p(c_dist | Omega) per patch.
    tau: threshold of eq. 5.
  Returns:
    dist [M] float32 (allowed minimum, or the plain nearest where nothing is allowed),
    allowed_fraction [M] float32: fraction of C_emb rows allowed for each patch.
  """
  return allowed_distance(feats, c_emb, emb_to_dist, prior > tau, query_tile=query_tile,
                          bank_tile=bank_tile, emb_valid=emb_valid)


def relative_allowed(prior: jax.Array, rho) -> jax.Array:
  """[M, K_dist] bool: a code is allowed when p(c | Omega) > rho * max_c p(c | Omega).

  A threshold relative to the most probable code: unlike tau = 1/(2|C_emb|) it does not depend on
  how many codes there are, only on how peaked the prior is, and the most probable code is always
  allowed (no fallback needed). rho is a float (or a traced scalar), rho in (0, 1].
  """
  return prior > rho * prior.max(-1, keepdims=True)


def allowed_distance(feats: jax.Array, c_emb: jax.Array, emb_to_dist: jax.Array,
                     allowed_dist: jax.Array, *, query_tile: int, bank_tile: int,
                     emb_valid: jax.Array | None = None):
  """Distance to the nearest C_emb vector whose C_dist code is allowed; the plain nearest when
  none is (reference formulation, dense): allowed_dist [M, K_dist] bool. `emb_valid`: the real
  rows of a padded C_emb (`infer.pad_bank`; the fraction counts only them).

  Returns (dist [M] float32, allowed_fraction [M] float32 of C_emb).
  """
  res = knn.masked_min_dist(feats, c_emb, allowed_dist, emb_to_dist, _allowed_by_code,
                            query_tile=query_tile, bank_tile=bank_tile)
  sq = jnp.where(jnp.isfinite(res.sq_dist), res.sq_dist, res.nearest_sq_dist)
  frac = _allowed_fraction(allowed_dist,
                           code_counts(emb_to_dist, allowed_dist.shape[-1], emb_valid),
                           num_rows(c_emb, emb_valid))
  return jnp.sqrt(sq), frac


def offset_by_code(neg_log_tile, emb_to_dist_tile):
  # neg_log_tile: [tq, K_dist] float32; emb_to_dist_tile: [tk] int32 -> [tq, tk].
  return jnp.take(neg_log_tile, emb_to_dist_tile, axis=1)


def posterior_scores(feats: jax.Array, c_emb: jax.Array, emb_to_dist: jax.Array,
                     prior: jax.Array, lam, *, query_tile: int, bank_tile: int) -> jax.Array:
  """Posterior patch scores min_c (lam ||phi - c|| - log p(c | Omega)) (no threshold).

  Eq. 3 with its sum replaced by the max term, in log space: -log max_c p(phi | c) p(c | Omega)
  with p(phi | c) = exp(-lam ||phi - c||) (eq. 8) and p(c_emb | Omega) = p(c_dist | Omega) of its
  C_dist code (section 3.2). Probabilities are floored at PRIOR_FLOOR.

  Args:
    feats: [M, d]; c_emb: [K_emb, d]; emb_to_dist: [K_emb] int32; prior: [M, K_dist];
    lam: lambda > 0 (float or traced scalar).
  Returns:
    [M] float32.
  """
  neg_log = -jnp.log(jnp.maximum(prior.astype(jnp.float32), PRIOR_FLOOR)) / lam
  value, _ = knn.min_dist_plus_offset(feats, c_emb, neg_log, emb_to_dist, offset_by_code,
                                      query_tile=query_tile, bank_tile=bank_tile)
  return lam * value


def edge_pad_border(scores: jax.Array, border: int) -> jax.Array:
  """The authors' border handling of the N / N+P maps: the outer `border` cells of each
  [B, h, w] score grid are replaced by the nearest interior value (crop, then edge-pad back).
  `border` is a static int; 0 returns the grid unchanged."""
  border = int(border)
  if border <= 0:
    return scores
  _, h, w = scores.shape
  if h <= 2 * border or w <= 2 * border:
    raise ValueError(f'model.scoring.border: cropping {border} cells leaves nothing of a '
                     f'{h} x {w} score grid')
  inner = scores[:, border:h - border, border:w - border]
  return jnp.pad(inner, ((0, 0), (border, border), (border, border)), mode='edge')


def pni_patch_scores(feats, c_emb, emb_to_dist, p_nb, p_pos, *, tau, lam, combine,
                     query_tile, bank_tile, neighborhood_weight=0.5, rho=0.01, pos_base=None):
  """PNI patch scores -log max_{allowed c} exp(-lam ||phi - c||) for one set of patches
  (reference formulation: dense masked search, scalar hyper-parameters).

  Args:
    feats: [M, d]; c_emb: [K_emb, d]; emb_to_dist: [K_emb] int32;
    p_nb, p_pos: [M, K_dist] priors or None (switched off).
    combine: 'mean_prob' (eq. 6: threshold the averaged prior), 'product' (threshold the
      renormalised product), 'max_prob' (threshold the larger of the two), 'mean_score' (the
      authors' code: score under each prior separately, each thresholded at tau, then average
      the scores), 'posterior' (`posterior_scores` with eq. 6's prior, no threshold),
      'posterior_ratio' (the same with p(c | Omega) / max_c p(c | Omega): the score of a patch
      that matches the most probable code exactly is its distance, whatever the prior's spread),
      'relative' (eq. 6's prior thresholded at rho * its max, `relative_allowed`) or
      'relative_score' (each prior thresholded at rho * its own max, scores averaged) or
      'relative_lift_score' (N as 'relative', P thresholded at rho * pos_base; scores averaged).
    rho: the relative threshold of 'relative*' (float or traced scalar).
    pos_base: [K_dist] P's base rate ('relative_lift_score').
  Returns:
    scores [M] float32, allowed_fraction [M] float32.
  """
  kw = dict(query_tile=query_tile, bank_tile=bank_tile)
  if combine not in COMBINE_MODES:
    raise ValueError(f'model.scoring.combine must be one of {COMBINE_MODES}, got {combine!r}')
  w = neighborhood_weight
  if combine in ('posterior', 'posterior_ratio'):
    prior = combine_priors(p_nb, p_pos, 'mean_prob', w)
    if combine == 'posterior_ratio':   # -log p(c) / max p: an uncertain prior penalises nothing
      prior = prior / jnp.maximum(prior.max(-1, keepdims=True), PRIOR_FLOOR)
    scores = posterior_scores(feats, c_emb, emb_to_dist, prior, lam, **kw)
    return scores, jnp.ones_like(scores)
  if combine in ('relative', 'relative_score', 'relative_lift_score'):
    if combine == 'relative':
      gates = [relative_allowed(combine_priors(p_nb, p_pos, 'mean_prob', w), rho)]
    else:
      gates = [relative_allowed(p_nb, rho)] if p_nb is not None else []
      if p_pos is not None:
        gates.append(p_pos > rho * pos_base if combine == 'relative_lift_score'
                     else relative_allowed(p_pos, rho))
    outs = [allowed_distance(feats, c_emb, emb_to_dist, g, **kw) for g in gates]
    weights = [w, 1 - w] if len(outs) == 2 else [1.0]
    dist = sum(wi * o[0] for wi, o in zip(weights, outs))
    frac = sum(wi * o[1] for wi, o in zip(weights, outs))
    return lam * dist, frac
  if p_nb is None or p_pos is None or combine != 'mean_score':
    prior = combine_priors(p_nb, p_pos, combine, w)
    dist, frac = conditional_distance(feats, c_emb, emb_to_dist, prior, tau, **kw)
  else:  # mean_score
    d1, f1 = conditional_distance(feats, c_emb, emb_to_dist, p_nb, tau, **kw)
    d2, f2 = conditional_distance(feats, c_emb, emb_to_dist, p_pos, tau, **kw)
    dist, frac = w * d1 + (1 - w) * d2, w * f1 + (1 - w) * f2
  return lam * dist, frac


# ----------------------------------------------------------------------------- group distances


def group_min_sq_dists(feats: jax.Array, c_emb: jax.Array, emb_to_dist: jax.Array,
                       num_dist: int, *, query_tile: int, bank_tile: int) -> jax.Array:
  """For every patch and C_dist code: the squared distance to the nearest C_emb row of that code.

  What eq. 4-5 needs of the distances, whatever the prior: for an allowed set A of codes, the
  nearest allowed distance is min_{k in A} G[m, k]. Computing G once makes every hyper-parameter
  point a [M, K_dist] reduction (the sweep's cache). Codes without a C_emb row get +inf.

  Args:
    feats: [M, d]; c_emb: [K_emb, d]; emb_to_dist: [K_emb] int32 in [0, num_dist).
  Returns:
    [M, num_dist] float32.
  """
  m, kb = feats.shape[0], c_emb.shape[0]
  tq = knn.balanced_tile(m, query_tile, 8)
  tk = knn.balanced_tile(kb, bank_tile, 128)
  n_q, q_starts = knn._tile_starts(m, tq)        # pylint: disable=protected-access
  n_k, k_starts = knn._tile_starts(kb, tk)       # pylint: disable=protected-access
  c_sq = knn._sq_norms(c_emb)                     # pylint: disable=protected-access
  cols = jnp.arange(tk, dtype=jnp.int32)

  def query_tile_fn(start):
    q = jax.lax.dynamic_slice_in_dim(feats, start, tq, axis=0)
    q_sq = knn._sq_norms(q)                       # pylint: disable=protected-access

    def bank_step(acc, xs):
      t, kstart = xs
      b = jax.lax.dynamic_slice_in_dim(c_emb, kstart, tk, axis=0)
      b_sq = jax.lax.dynamic_slice_in_dim(c_sq, kstart, tk, axis=0)
      b_sq = jnp.where(kstart + cols >= t * tk, b_sq, jnp.inf)   # rows an earlier tile covered
      codes = jax.lax.dynamic_slice_in_dim(emb_to_dist, kstart, tk, axis=0)
      d = knn._tile_sq_dists(q, q_sq, b, b_sq, knn._HIGHEST)  # pylint: disable=protected-access
      grp = jax.ops.segment_min(d.T, codes, num_segments=num_dist)     # [K_dist, tq]
      return jnp.minimum(acc, grp.T), None

    init = jnp.full((tq, num_dist), jnp.inf, jnp.float32)
    acc, _ = jax.lax.scan(bank_step, init, (jnp.arange(n_k, dtype=jnp.int32), k_starts))
    return acc

  out = jax.lax.map(query_tile_fn, q_starts)                  # [n_q, tq, K_dist]
  return knn._unshift(out, m, tq)                             # pylint: disable=protected-access


def masked_sq_dist_from_groups(group_sq: jax.Array, allowed_dist: jax.Array) -> jax.Array:
  """min over allowed codes of `group_min_sq_dists`: [..., K_dist] x bool -> [...] (+inf if none)."""
  return jnp.min(jnp.where(allowed_dist, group_sq, jnp.inf), axis=-1)


# ----------------------------------------------------------------------------- maps


def upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bilinear upsampling (half-pixel centres, torch align_corners=False)."""
  with jax.ensure_compile_time_eval():  # a constant, also when called while tracing
    eye = jnp.eye(n_in, dtype=jnp.float32)
    return np.asarray(jax.image.resize(eye, (n_out, n_in), 'bilinear', antialias=False))


def gaussian_matrix(n: int, sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
  """[n, n] Gaussian blur with scipy.ndimage's defaults (mode 'reflect', truncate 4), numpy
  (the reference of `gaussian_matrix_jnp`)."""
  if sigma <= 0:
    return np.eye(n, dtype=np.float32)
  radius = int(truncate * sigma + 0.5)
  offs = np.arange(-radius, radius + 1)
  kern = np.exp(-0.5 * (offs / sigma) ** 2)
  kern /= kern.sum()
  src = _reflect(np.arange(n)[:, None] + offs[None, :], n)
  mat = np.zeros((n, n), np.float64)
  np.add.at(mat, (np.repeat(np.arange(n), offs.size), src.ravel()), np.tile(kern, n))
  return mat.astype(np.float32)


def _reflect(src: np.ndarray, n: int) -> np.ndarray:
  period = 2 * n  # 'reflect' (d c b a | a b c d | d c b a) is periodic with period 2n
  src = np.mod(src, period)
  return np.where(src >= n, period - 1 - src, src)


def max_radius(max_sigma: float) -> int:
  """Static kernel radius bound for sigma <= max_sigma."""
  return int(TRUNCATE * float(max_sigma) + 0.5)


def gaussian_matrix_jnp(n: int, sigma, max_sigma: float) -> jax.Array:
  """`gaussian_matrix` with a traced sigma: [n, n] float32.

  The kernel has the static radius `max_radius(max_sigma)`; taps beyond sigma's own radius
  int(4 sigma + 0.5) are zero, so for 0 <= sigma <= max_sigma this is scipy's Gaussian (sigma 0:
  the identity). Larger sigmas are cut at the bound.
  """
  radius = max_radius(max_sigma)
  offs = np.arange(-radius, radius + 1)
  s = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6)
  own = jnp.floor(TRUNCATE * s + 0.5)
  o = jnp.asarray(offs, jnp.float32)
  kern = jnp.where(jnp.abs(o) <= own, jnp.exp(-0.5 * (o / s) ** 2), 0.0)
  kern = kern / kern.sum()
  src = _reflect(np.arange(n)[:, None] + offs[None, :], n)          # static [n, 2R + 1]
  rows = np.repeat(np.arange(n), offs.size)
  return jnp.zeros((n, n), jnp.float32).at[rows, src.ravel()].add(jnp.tile(kern, n))


@functools.lru_cache(maxsize=16)
def map_operator(h: int, w: int, out_h: int, out_w: int, sigma: float):
  """(A_h [out_h, h], A_w [out_w, w]) numpy, so that map = A_h @ patch_scores @ A_w.T."""
  a_h = gaussian_matrix(out_h, sigma) @ upsample_matrix(h, out_h)
  a_w = gaussian_matrix(out_w, sigma) @ upsample_matrix(w, out_w)
  return a_h, a_w


def map_operator_jnp(h: int, w: int, out_h: int, out_w: int, sigma, max_sigma: float):
  """`map_operator` with a traced sigma (see `gaussian_matrix_jnp`)."""
  hi = jax.lax.Precision.HIGHEST
  a_h = jnp.matmul(gaussian_matrix_jnp(out_h, sigma, max_sigma), upsample_matrix(h, out_h),
                   precision=hi)
  a_w = jnp.matmul(gaussian_matrix_jnp(out_w, sigma, max_sigma), upsample_matrix(w, out_w),
                   precision=hi)
  return a_h, a_w


def anomaly_maps(patch_scores: jax.Array, out_size: tuple[int, int], sigma,
                 max_sigma: float | None = None) -> jax.Array:
  """Patch score grids [B, h, w] -> blurred pixel maps [B, out_h, out_w] float32.

  sigma: a float, or a traced scalar with the static bound `max_sigma` (required then).
  """
  _, h, w = patch_scores.shape
  out_h, out_w = int(out_size[0]), int(out_size[1])
  if max_sigma is None:
    if isinstance(sigma, jax.core.Tracer):
      raise ValueError('anomaly_maps: a traced sigma needs the static bound max_sigma '
                       '(model.scoring.max_sigma)')
    max_sigma = float(sigma)
  a_h, a_w = map_operator_jnp(h, w, out_h, out_w, sigma, max_sigma)
  hi = jax.lax.Precision.HIGHEST
  return jnp.einsum('ih,bhw,jw->bij', a_h, patch_scores.astype(jnp.float32), a_w, precision=hi)


def top_k_bound(num_pixels: int, max_top_percent: float) -> int:
  """Static number of candidates for a top_percent <= max_top_percent."""
  return max(1, min(num_pixels, int(np.ceil(num_pixels * float(max_top_percent) / 100.0)) + 1))


def image_scores(maps: jax.Array, patch_scores: jax.Array, mode: str, top_percent=1.0, *,
                 border: int = 0, max_top_percent: float | None = None):
  """Image anomaly scores [B] from maps [B, H, W] and patch score grids [B, h, w].

  'max': max of the blurred map; 'patch_max': max patch score (PatchCore without reweighting);
  'patch_max_cropped': max of the unblurred patch map with `border` cells cut at every side (the
  authors' test step for N / N+P: their MLP has no full window there); 'top_percent': mean of
  the top `top_percent` % map pixels (k = max(1, round(H W top_percent / 100)); a traced
  top_percent needs the static bound `max_top_percent`). PatchCore's neighbour reweighting needs
  the coreset and is `reweighted_image_scores`.
  """
  if mode == 'max':
    return maps.reshape(maps.shape[0], -1).max(-1)
  if mode == 'patch_max':
    return patch_scores.reshape(patch_scores.shape[0], -1).max(-1)
  if mode == 'patch_max_cropped':
    b, h, w = patch_scores.shape
    border = int(border)
    if 2 * border >= min(h, w):
      raise ValueError(f'image_score patch_max_cropped: border {border} leaves nothing of the '
                       f'{h} x {w} patch grid (model.scoring.image_border)')
    inner = patch_scores[:, border:h - border, border:w - border]
    return inner.reshape(b, -1).max(-1)
  if mode == 'top_percent':
    flat = maps.reshape(maps.shape[0], -1)
    n = flat.shape[1]
    if max_top_percent is None:
      if isinstance(top_percent, jax.core.Tracer):
        raise ValueError('image_scores: a traced top_percent needs the static bound '
                         'max_top_percent')
      max_top_percent = float(top_percent)
    kmax = top_k_bound(n, max_top_percent)
    k = jnp.clip(jnp.round(n * jnp.asarray(top_percent, jnp.float32) / 100.0), 1, kmax)
    top = jax.lax.top_k(flat, kmax)[0]
    keep = jnp.arange(kmax)[None, :] < k
    return jnp.where(keep, top, 0.0).sum(-1) / k
  raise ValueError(f'model.scoring.image_score must be one of {IMAGE_SCORES}, got {mode!r}')


def reweighted_image_scores(feats: jax.Array, patch_scores: jax.Array, c_emb: jax.Array,
                            num_neighbors: int, *, query_tile: int, bank_tile: int,
                            bank_valid: jax.Array | None = None) -> jax.Array:
  """PatchCore's image score: the max patch score scaled by 1 - softmax over its nearest C_emb's
  `num_neighbors` neighbours in C_emb (PatchCore eq. 7).

  Args:
    feats: [B, h, w, d] patch features; patch_scores: [B, h, w] (distances to the nearest C_emb).
    bank_valid: [K_emb] bool, the real rows of a padded C_emb (`infer.pad_bank`); the others are
      never neighbours (a C_emb with fewer real rows than `num_neighbors` uses all of them).
  Returns:
    [B] float32.
  """
  b, h, w, d = feats.shape
  flat = patch_scores.reshape(b, -1)
  arg = jnp.argmax(flat, axis=-1)
  star = feats.reshape(b, h * w, d)[jnp.arange(b), arg]                      # [B, d]
  tiles = dict(query_tile=query_tile, bank_tile=bank_tile, bank_mask=bank_valid)
  _, nn_idx = knn.knn(star, c_emb, k=1, **tiles)
  m_star = c_emb[nn_idx[:, 0]]                                               # [B, d]
  k = min(int(num_neighbors), c_emb.shape[0])
  _, nb_idx = knn.knn(m_star, c_emb, k=k, **tiles)
  nb = c_emb[nb_idx]                                                          # [B, k, d]
  dists = jnp.linalg.norm(star[:, None, :] - nb, axis=-1)                     # [B, k]
  if bank_valid is not None:   # fewer real rows than k: the missing neighbours (index -1) drop out
    dists = jnp.where(nb_idx >= 0, dists, -jnp.inf)
  # nb[:, 0] is m_star itself, so the weight is 1 - exp(d*) / sum_k exp(d_k).
  weight = 1.0 - jax.nn.softmax(dists, axis=-1)[:, 0]
  return weight * flat.max(-1)
