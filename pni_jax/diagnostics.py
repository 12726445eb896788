"""Does a prior bind? Diagnostics of the neighbourhood (N) and position (P) priors on a test set.

A conditional prior can only change a patch's score when it excludes the C_emb code nearest to
the patch (eq. 4-5 then fall back to a farther allowed code). `prior_diagnostics` measures, for
normal and for defective patches separately, how often that nearest code is excluded by N, by P
and by both, how much N changes the score, and how well the MLP's top code agrees with the
patch's own nearest C_dist code (docs/n_study.md: what the numbers showed on the demo).

Batches are summarised on their own (`prior_diagnostics`; or `per_patch_values` on the device and
`summarize` on the host, as evaluation does inside its scoring call) and merged with
`merge_diagnostics`, so memory is one batch whatever the test set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import scoring

GROUPS = ('normal', 'defect')


def patch_masks(pixel_masks, grid: tuple[int, int], min_fraction: float = 0.25) -> np.ndarray:
  """Pixel ground truth [B, H, W] (bool / 0-1) -> defective patches [B, h, w] bool: a patch is
  defective when at least `min_fraction` of its cell's pixels are (H, W multiples of h, w; else
  the cell fraction comes from an antialiased resize)."""
  m = np.asarray(pixel_masks, np.float32)
  if m.ndim != 3:
    raise ValueError(f'pixel_masks must be [B, H, W], got shape {m.shape}')
  b, big_h, big_w = m.shape
  h, w = int(grid[0]), int(grid[1])
  if big_h % h == 0 and big_w % w == 0:
    frac = m.reshape(b, h, big_h // h, w, big_w // w).mean((2, 4))
  else:
    frac = np.asarray(jax.image.resize(m, (b, h, w), 'linear', antialias=True))
  return frac >= float(min_fraction)


def _gather_code(prior, code):
  # prior [M, K], code [M] -> [M]
  return jnp.take_along_axis(prior, code[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=('query_tile', 'bank_tile'))
def per_patch_values(feats, c_emb, e2d, emb_valid, p_nb, p_pos, tau, lam, rho, *,
                     query_tile: int, bank_tile: int) -> dict:
  """The per-patch values `summarize` reduces ([B h w] arrays by name; arguments as in
  `prior_diagnostics`, C_emb optionally padded with its 'emb_valid'), one compiled call per
  batch shape (and C_emb shape: pass a padded C_emb, `infer.pad_bank`, to share it)."""
  b, h, w, d = feats.shape
  flat = feats.reshape(-1, d)
  tiles = dict(query_tile=query_tile, bank_tile=bank_tile)
  d0, idx = scoring.nearest_distance(flat, c_emb, **tiles)
  code = e2d[idx]
  base = lam * d0
  per_patch = {}
  priors = {}
  if p_nb is not None:
    priors['N'] = p_nb.reshape(b * h * w, -1)
  if p_pos is not None:
    pos_base = scoring.position_base_rate(p_pos if p_pos.ndim == 3 else p_pos[0])
    if p_pos.ndim == 3:
      p_pos = jnp.broadcast_to(p_pos[None], (b,) + p_pos.shape)
    priors['P'] = p_pos.reshape(b * h * w, -1)
  for name, prior in priors.items():
    p_code = _gather_code(prior, code)
    per_patch[f'excluded_{name}'] = p_code <= tau
    per_patch[f'log10_p_{name}'] = jnp.log10(jnp.maximum(p_code, 1e-30))
    per_patch[f'log10_pmax_{name}'] = jnp.log10(jnp.maximum(prior.max(-1), 1e-30))
    per_patch[f'top1_{name}'] = jnp.argmax(prior, -1) == code
    if rho is not None:
      per_patch[f'rel_excluded_{name}'] = p_code <= rho * prior.max(-1)
  if rho is not None and 'P' in priors:   # 'relative_lift_score': P against its base rate
    per_patch['lift_excluded_P'] = _gather_code(priors['P'], code) <= rho * pos_base[code]
  if 'N' in priors:
    dist_n, frac_n = scoring.conditional_distance(flat, c_emb, e2d, priors['N'], tau,
                                                  emb_valid=emb_valid, **tiles)
    change = lam * dist_n - base
    per_patch['score_change_N'] = change
    per_patch['changed_N'] = change > 1e-6 * jnp.maximum(base, 1e-6)
    per_patch['allowed_N'] = frac_n
    if rho is not None:
      dist_r, _ = scoring.allowed_distance(flat, c_emb, e2d,
                                           scoring.relative_allowed(priors['N'], rho),
                                           emb_valid=emb_valid, **tiles)
      per_patch['rel_score_change_N'] = lam * dist_r - base
  if 'N' in priors and 'P' in priors:
    per_patch['excluded_NP'] = per_patch['excluded_N'] & per_patch['excluded_P']
    mean = 0.5 * (priors['N'] + priors['P'])
    per_patch['excluded_eq6'] = _gather_code(mean, code) <= tau
  return per_patch


def prior_diagnostics(feats, masks, arrays: dict, p_nb=None, p_pos=None, *, tau: float,
                      lam: float = 1.0, rho: float | None = None, query_tile: int = 1024,
                      bank_tile: int = 4096) -> dict[str, float]:
  """Binding statistics of the priors on one batch of test patches.

  Args:
    feats: [B, h, w, d] patch features of test images.
    masks: [n, h, w] bool, defective patches (`patch_masks`) of the first n <= B images; the
      other rows of feats / p_nb (a batch padded to one shape) are left out.
    arrays: model arrays with 'c_emb' [K_emb, d] and 'emb_to_dist' [K_emb] int32 (optionally
      padded, with 'emb_valid': `infer.pad_bank`).
    p_nb: [B, h, w, K_dist] p(c_dist | neighbourhood) or None.
    p_pos: [h, w, K_dist] or [B, h, w, K_dist] (the same for every image) p(c_dist | position)
      or None.
    tau: the threshold of eq. 5 (`infer.tau`).
    lam: lambda of eq. 8 (scores are lam x distances).
    rho: if given, also the relative threshold p > rho * max p ('rel_*' keys).

  Returns:
    dict of floats. 'n_normal', 'n_defect': patch counts; for g in ('normal', 'defect'):
      '{g}/excluded_N', '{g}/excluded_P', '{g}/excluded_NP' (by both, each thresholded on its
        own), '{g}/excluded_eq6' (by eq. 6's averaged prior): fraction of patches whose nearest
        C_emb code is excluded (p <= tau);
      '{g}/score_change_N': mean of S_N - S_baseline (eq. 4-5 with N alone, >= 0);
      '{g}/changed_N': fraction of patches whose score N changes (by > 1e-6 relative);
      '{g}/allowed_N': mean fraction of C_emb that N allows;
      '{g}/top1_N': fraction where the MLP's most probable code is the patch's nearest C_dist
        code (the code of its nearest C_emb vector);
      '{g}/log10_p_N': mean log10 p_N of that code; '{g}/log10_pmax_N': mean log10 max_c p_N;
      with rho: '{g}/rel_excluded_N', '{g}/rel_score_change_N' (and '_P' for P), and
        '{g}/lift_excluded_P' (p_P <= rho x the code's base rate over positions).
    Means over an empty group are NaN. Keys for a missing prior are left out.
  """
  feats = jnp.asarray(feats)
  if feats.ndim != 4:
    raise ValueError(f'feats must be [B, h, w, d], got shape {feats.shape}')
  b, h, w, d = feats.shape
  masks = np.asarray(masks, bool)
  if masks.ndim != 3 or masks.shape[1:] != (h, w) or masks.shape[0] > b:
    raise ValueError(f'masks must be [n, h, w] with n <= B, (B, h, w) = {(b, h, w)} (patch '
                     f'resolution), got {masks.shape}')
  p_pos = None if p_pos is None else jnp.asarray(p_pos)
  per_patch = per_patch_values(
      feats, jnp.asarray(arrays['c_emb']), jnp.asarray(arrays['emb_to_dist']),
      arrays.get('emb_valid'), None if p_nb is None else jnp.asarray(p_nb), p_pos,
      jnp.float32(tau), jnp.float32(lam), None if rho is None else jnp.float32(rho),
      query_tile=query_tile, bank_tile=bank_tile)
  return summarize(per_patch, masks)


def summarize(per_patch: dict, masks) -> dict[str, float]:
  """`per_patch_values` of a batch of B images ([B h w] or [B, ...] arrays) -> the statistics
  of `prior_diagnostics` over its first n images, masks [n, h, w] bool their defective patches
  (n <= B: the rows of a padded batch after n are left out)."""
  masks = np.asarray(masks, bool)
  n = masks.shape[0]
  defect = masks.reshape(-1)
  out = {'n_normal': float((~defect).sum()), 'n_defect': float(defect.sum())}
  for key, values in per_patch.items():
    v = np.asarray(values, np.float64)
    v = v.reshape(-1, defect.size // max(n, 1))[:n].reshape(-1)
    if v.size != defect.size:
      raise ValueError(f'diagnostics value {key!r}: {v.size} patches for {defect.size} masks')
    for group, sel in (('normal', ~defect), ('defect', defect)):
      out[f'{group}/{key}'] = float(v[sel].mean()) if sel.any() else float('nan')
  return out


def merge_diagnostics(parts: list[dict[str, float]]) -> dict[str, float]:
  """Merges per-batch `prior_diagnostics` results: group means weighted by the group counts
  (batches where a group is empty do not count for it)."""
  if not parts:
    raise ValueError('merge_diagnostics needs at least one batch result')
  out = {'n_normal': float(sum(p['n_normal'] for p in parts)),
         'n_defect': float(sum(p['n_defect'] for p in parts))}
  keys = [k for k in parts[0] if '/' in k]
  for key in keys:
    group = key.split('/')[0]
    num = sum(p[key] * p[f'n_{group}'] for p in parts if p[f'n_{group}'] > 0)
    den = sum(p[f'n_{group}'] for p in parts if p[f'n_{group}'] > 0)
    out[key] = float(num / den) if den > 0 else float('nan')
  return out
