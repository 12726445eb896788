"""Patch scores -> anomaly maps and image scores.

* PatchCore: the patch score is the distance to the nearest C_emb vector.
* PNI (eq. 3-8): p(c | Omega) over C_dist from the neighbourhood MLP and / or the position
  histograms, thresholded at tau; with p(phi | c) = exp(-lambda ||phi - c||) the score
  -log max_{allowed c} p(phi | c) is lambda times the distance to the nearest *allowed* C_emb vector
  (a C_emb vector is allowed when its C_dist representative is). When nothing is allowed the
  nearest C_emb vector is used (the paper's fallback).
* Maps: bilinear upsampling to the crop and a Gaussian blur are both linear and separable, so the
  whole step is one matrix pair per axis: map = A_h @ s @ A_w^T with A = blur @ upsample.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import knn

COMBINE_MODES = ('mean_prob', 'product', 'mean_score', 'max_prob', 'posterior',
                 'posterior_ratio', 'relative', 'relative_score')
BORDER_MODES = ('pad', 'authors')
PRIOR_FLOOR = 1e-30   # -log p(c | Omega) of the posterior score is at most -log(1e-30) ~ 69
IMAGE_SCORES = ('max', 'patch_max', 'top_percent', 'reweight')


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


def combine_priors(p_nb: jax.Array | None, p_pos: jax.Array | None,
                   mode: str = 'mean_prob') -> jax.Array:
  """p(c | Omega) from the two priors, or whichever prior is present.

  'mean_prob' is the paper's eq. 6, (p(c | N_p(x)) + p(c | x)) / 2. 'product' treats the two as
  independent evidence, p_nb * p_pos renormalised (all zeros where their supports do not meet),
  so a code ruled out by either prior stays ruled out.

  Args:
    p_nb, p_pos: [..., K_dist] probabilities (or None when that prior is switched off).
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
  return 0.5 * (p_nb + p_pos)


def _allowed_by_code(allowed_dist_tile, emb_to_dist_tile):
  # allowed_dist_tile: [tq, K_dist] bool; emb_to_dist_tile: [tk] int32 -> [tq, tk] bool.
  return jnp.take(allowed_dist_tile, emb_to_dist_tile, axis=1)


def conditional_distance(feats: jax.Array, c_emb: jax.Array, emb_to_dist: jax.Array,
                         prior: jax.Array, tau: float, *, query_tile: int, bank_tile: int):
  """Distance to the nearest C_emb vector whose C_dist representative has prior > tau (eq. 4-5).

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
  allowed_dist = prior > tau
  res = knn.masked_min_dist(feats, c_emb, allowed_dist, emb_to_dist, _allowed_by_code,
                            query_tile=query_tile, bank_tile=bank_tile)
  none_allowed = ~jnp.isfinite(res.sq_dist)
  sq = jnp.where(none_allowed, res.nearest_sq_dist, res.sq_dist)
  # Fraction of C_emb allowed: count the codes' multiplicity once, per patch.
  code_count = jnp.zeros((prior.shape[-1],), jnp.float32).at[emb_to_dist].add(1.0)
  frac = (allowed_dist.astype(jnp.float32) @ code_count) / c_emb.shape[0]
  return jnp.sqrt(sq), frac


def relative_allowed(prior: jax.Array, rho) -> jax.Array:
  """[M, K_dist] bool: a code is allowed when p(c | Omega) > rho * max_c p(c | Omega).

  A threshold relative to the most probable code: unlike tau = 1/(2|C_emb|) it does not depend on
  how many codes there are, only on how peaked the prior is, and the most probable code is always
  allowed (no fallback needed). rho is a float (or a traced scalar), rho in (0, 1].
  """
  return prior > rho * prior.max(-1, keepdims=True)


def allowed_distance(feats: jax.Array, c_emb: jax.Array, emb_to_dist: jax.Array,
                     allowed_dist: jax.Array, *, query_tile: int, bank_tile: int):
  """Distance to the nearest C_emb vector whose C_dist code is allowed; the plain nearest when
  none is. Like `conditional_distance` with the mask given: allowed_dist [M, K_dist] bool.

  Returns (dist [M] float32, allowed_fraction [M] float32 of C_emb).
  """
  res = knn.masked_min_dist(feats, c_emb, allowed_dist, emb_to_dist, _allowed_by_code,
                            query_tile=query_tile, bank_tile=bank_tile)
  sq = jnp.where(jnp.isfinite(res.sq_dist), res.sq_dist, res.nearest_sq_dist)
  code_count = jnp.zeros((allowed_dist.shape[-1],), jnp.float32).at[emb_to_dist].add(1.0)
  frac = (allowed_dist.astype(jnp.float32) @ code_count) / c_emb.shape[0]
  return jnp.sqrt(sq), frac


def _offset_by_code(neg_log_tile, emb_to_dist_tile):
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
  value, _ = knn.min_dist_plus_offset(feats, c_emb, neg_log, emb_to_dist, _offset_by_code,
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
                     query_tile, bank_tile, rho=0.01):
  """PNI patch scores -log max_{allowed c} exp(-lam ||phi - c||) for one set of patches.

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
      'relative_score' (each prior thresholded at rho * its own max, scores averaged).
    rho: the relative threshold of 'relative*' (float or traced scalar).
  Returns:
    scores [M] float32, allowed_fraction [M] float32.
  """
  kw = dict(query_tile=query_tile, bank_tile=bank_tile)
  if combine not in COMBINE_MODES:
    raise ValueError(f'model.scoring.combine must be one of {COMBINE_MODES}, got {combine!r}')
  if combine in ('posterior', 'posterior_ratio'):
    prior = combine_priors(p_nb, p_pos, 'mean_prob')
    if combine == 'posterior_ratio':   # -log p(c) / max p: an uncertain prior penalises nothing
      prior = prior / jnp.maximum(prior.max(-1, keepdims=True), PRIOR_FLOOR)
    scores = posterior_scores(feats, c_emb, emb_to_dist, prior, lam, **kw)
    return scores, jnp.ones_like(scores)
  if combine in ('relative', 'relative_score'):
    priors = ([p for p in (p_nb, p_pos) if p is not None] if combine == 'relative_score'
              else [combine_priors(p_nb, p_pos, 'mean_prob')])
    outs = [allowed_distance(feats, c_emb, emb_to_dist, relative_allowed(p, rho), **kw)
            for p in priors]
    dist = sum(o[0] for o in outs) / len(outs)
    frac = sum(o[1] for o in outs) / len(outs)
    return lam * dist, frac
  if p_nb is None or p_pos is None or combine != 'mean_score':
    prior = combine_priors(p_nb, p_pos, combine)
    dist, frac = conditional_distance(feats, c_emb, emb_to_dist, prior, tau, **kw)
  else:  # mean_score
    d1, f1 = conditional_distance(feats, c_emb, emb_to_dist, p_nb, tau, **kw)
    d2, f2 = conditional_distance(feats, c_emb, emb_to_dist, p_pos, tau, **kw)
    dist, frac = 0.5 * (d1 + d2), 0.5 * (f1 + f2)
  return lam * dist, frac


# ----------------------------------------------------------------------------- maps


def upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bilinear upsampling (half-pixel centres, torch align_corners=False)."""
  with jax.ensure_compile_time_eval():  # a constant, also when called while tracing
    eye = jnp.eye(n_in, dtype=jnp.float32)
    return np.asarray(jax.image.resize(eye, (n_out, n_in), 'bilinear', antialias=False))


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """[n, n] Gaussian blur with scipy.ndimage's defaults (mode 'reflect', truncate 4)."""
  if sigma <= 0:
    return np.eye(n, dtype=np.float32)
  radius = int(truncate * sigma + 0.5)
  offs = np.arange(-radius, radius + 1)
  kern = np.exp(-0.5 * (offs / sigma) ** 2)
  kern /= kern.sum()
  src = np.arange(n)[:, None] + offs[None, :]
  period = 2 * n  # 'reflect' (d c b a | a b c d | d c b a) is periodic with period 2n
  src = np.mod(src, period)
  src = np.where(src >= n, period - 1 - src, src)
  mat = np.zeros((n, n), np.float64)
  np.add.at(mat, (np.repeat(np.arange(n), offs.size), src.ravel()), np.tile(kern, n))
  return mat.astype(np.float32)


@functools.lru_cache(maxsize=16)
def map_operator(h: int, w: int, out_h: int, out_w: int, sigma: float):
  """(A_h [out_h, h], A_w [out_w, w]) so that map = A_h @ patch_scores @ A_w.T."""
  a_h = gaussian_matrix(out_h, sigma) @ upsample_matrix(h, out_h)
  a_w = gaussian_matrix(out_w, sigma) @ upsample_matrix(w, out_w)
  return a_h, a_w


def anomaly_maps(patch_scores: jax.Array, out_size: tuple[int, int], sigma: float) -> jax.Array:
  """Patch score grids [B, h, w] -> blurred pixel maps [B, out_h, out_w] float32."""
  _, h, w = patch_scores.shape
  a_h, a_w = map_operator(h, w, int(out_size[0]), int(out_size[1]), float(sigma))
  hi = jax.lax.Precision.HIGHEST
  return jnp.einsum('ih,bhw,jw->bij', a_h, patch_scores.astype(jnp.float32), a_w, precision=hi)


def image_scores(maps: jax.Array, patch_scores: jax.Array, mode: str, top_percent: float = 1.0):
  """Image anomaly scores [B] from maps [B, H, W] and patch score grids [B, h, w].

  'max': max of the blurred map (authors' code); 'patch_max': max patch score (PatchCore without
  reweighting); 'top_percent': mean of the top `top_percent` % map pixels. PatchCore's neighbour
  reweighting needs the coreset and is `reweighted_image_scores`.
  """
  if mode == 'max':
    return maps.reshape(maps.shape[0], -1).max(-1)
  if mode == 'patch_max':
    return patch_scores.reshape(patch_scores.shape[0], -1).max(-1)
  if mode == 'top_percent':
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, int(round(flat.shape[1] * top_percent / 100.0)))
    return jax.lax.top_k(flat, k)[0].mean(-1)
  raise ValueError(f'model.scoring.image_score must be one of {IMAGE_SCORES}, got {mode!r}')


def reweighted_image_scores(feats: jax.Array, patch_scores: jax.Array, c_emb: jax.Array,
                            num_neighbors: int, *, query_tile: int, bank_tile: int) -> jax.Array:
  """PatchCore's image score: the max patch score scaled by 1 - softmax over its nearest C_emb's
  `num_neighbors` neighbours in C_emb (PatchCore eq. 7).

  Args:
    feats: [B, h, w, d] patch features; patch_scores: [B, h, w] (distances to the nearest C_emb).
  Returns:
    [B] float32.
  """
  b, h, w, d = feats.shape
  flat = patch_scores.reshape(b, -1)
  arg = jnp.argmax(flat, axis=-1)
  star = feats.reshape(b, h * w, d)[jnp.arange(b), arg]                      # [B, d]
  _, nn_idx = knn.knn(star, c_emb, k=1, query_tile=query_tile, bank_tile=bank_tile)
  m_star = c_emb[nn_idx[:, 0]]                                               # [B, d]
  k = min(int(num_neighbors), c_emb.shape[0])
  _, nb_idx = knn.knn(m_star, c_emb, k=k, query_tile=query_tile, bank_tile=bank_tile)
  nb = c_emb[nb_idx]                                                          # [B, k, d]
  dists = jnp.linalg.norm(star[:, None, :] - nb, axis=-1)                     # [B, k]
  # nb[:, 0] is m_star itself, so the weight is 1 - exp(d*) / sum_k exp(d_k).
  weight = 1.0 - jax.nn.softmax(dists, axis=-1)[:, 0]
  return weight * flat.max(-1)
