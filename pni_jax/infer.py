"""Inference on patch features: a fitted model's arrays + features -> patch scores, maps, scores.

`make_scorer(cfg_model, variant, out_size)` returns one jitted pure function
`score(arrays, feats) -> dict` per ablation variant; `arrays` is `model.arrays(fitted)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pni_jax import features
from pni_jax import neighborhood
from pni_jax import scoring


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


def patch_scores(arrays: dict, feats: jax.Array, variant: Variant, cfg_model):
  """Patch scores for one batch.

  Args:
    arrays: model arrays (`model.arrays`): c_emb [K_emb, d], emb_to_dist [K_emb], position
      [H', W', K_dist] or None, mlp variables or None.
    feats: [B, H', W', d] patch features.
  Returns:
    (scores [B, H', W'] float32, allowed_fraction [B, H', W'] float32 (1 for the baseline)).
  """
  sc = cfg_model.scoring
  b, h, w, d = feats.shape
  flat = feats.reshape(-1, d)
  tiles = dict(query_tile=int(sc.query_tile), bank_tile=int(sc.bank_tile))
  if not variant.conditional:
    dist, _ = scoring.nearest_distance(flat, arrays['c_emb'], **tiles)
    return (float(sc.likelihood_lambda) * dist).reshape(b, h, w), jnp.ones((b, h, w), jnp.float32)
  p_nb = p_pos = None
  if variant.neighborhood:
    if arrays.get('mlp') is None:
      raise ValueError('variant uses N but the model has no neighbourhood MLP '
                       '(fit with model.use_neighborhood=True)')
    nb = cfg_model.neighborhood
    p_nb = neighborhood.neighbor_probs(arrays['mlp'], feats, window=int(nb.window),
                                       chunk=int(nb.infer_chunk),
                                       temperature=float(sc.temperature),
                                       dtype=features.compute_dtype(cfg_model),
                                       dilation=int(nb.get('dilation', 1)))
    p_nb = p_nb.reshape(b * h * w, -1)
  if variant.position:
    if arrays.get('position') is None:
      raise ValueError('variant uses P but the model has no position histograms '
                       '(fit with model.use_position=True)')
    pos = arrays['position']
    if pos.shape[:2] != (h, w):
      raise ValueError(f'position prior grid {pos.shape[:2]} != feature grid {(h, w)}: the model '
                       'was fitted at another image size')
    p_pos = jnp.broadcast_to(pos[None], (b, h, w, pos.shape[-1])).reshape(b * h * w, -1)
  scores, frac = scoring.pni_patch_scores(
      flat, arrays['c_emb'], arrays['emb_to_dist'], p_nb, p_pos,
      tau=tau(sc, arrays['c_emb'].shape[0]), lam=float(sc.likelihood_lambda),
      combine=str(variant.combine or sc.combine), rho=float(sc.get('rho', 0.01)), **tiles)
  scores = scores.reshape(b, h, w)
  if variant.neighborhood and sc.get('border', 'pad') == 'authors':
    nb = cfg_model.neighborhood
    scores = scoring.edge_pad_border(
        scores, neighborhood.window_reach(int(nb.window), int(nb.get('dilation', 1))))
  return scores, frac.reshape(b, h, w)


def refine_maps(refine_arrays: dict, images: jax.Array, maps: jax.Array, cfg_model) -> jax.Array:
  """Eq. 9 fusion: (1 - w) * normalize(A_hat) + w * f(I, normalize(A_hat)).

  Args:
    refine_arrays: {'variables', 'lo', 'hi'} (`model.arrays(...)['refine']`).
    images: [B, S, S, 3] float32 in [0, 1]; maps: [B, S, S] A_hat.
  Returns:
    [B, S, S] float32 in the normalised units of the refinement stage.
  """
  from pni_jax import refine  # the refinement network (and its encoder) only when used
  r = cfg_model.refine
  return refine.fuse(refine_arrays['variables'], images, maps, refine_arrays['lo'],
                     refine_arrays['hi'], float(r.fusion_weight), input_size=int(r.input_size),
                     encoder=str(r.encoder), loss=str(r.loss))


def make_scorer(cfg_model, variant: Variant, out_size: tuple[int, int]):
  """Jitted `score(arrays, feats, images=None) -> dict(patch [B,h,w], maps [B,S,S], image [B],
  allowed [B,h,w])`.

  With `variant.refinement` the maps are the fused refined maps (images [B, S, S, 3] needed) and
  the image score is taken from them, as in the paper's R rows.
  """
  sc = cfg_model.scoring

  @jax.jit
  def score(arrays, feats, images=None):
    patch, allowed = patch_scores(arrays, feats, variant, cfg_model)
    maps = scoring.anomaly_maps(patch, out_size, float(sc.sigma))
    if variant.refinement:
      if arrays.get('refine') is None:
        raise ValueError('variant uses R but the model has no refinement network '
                         '(fit with model.use_refinement=True)')
      if images is None:
        raise ValueError('the refinement stage needs the images: score(arrays, feats, images)')
      maps = refine_maps(arrays['refine'], images, maps, cfg_model)
    if sc.image_score == 'reweight':
      image = scoring.reweighted_image_scores(
          feats, patch, arrays['c_emb'], int(sc.reweight_neighbors),
          query_tile=int(sc.query_tile), bank_tile=int(sc.bank_tile))
    else:
      image = scoring.image_scores(maps, patch, str(sc.image_score), float(sc.top_percent))
    return dict(patch=patch, maps=maps, image=image, allowed=allowed)

  return score
