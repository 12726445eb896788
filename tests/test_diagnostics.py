"""Prior diagnostics: brute-force numpy on a tiny problem, masks, merging batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from pni_jax import diagnostics


def _problem(seed=0, b=2, h=4, w=5, d=3, k_emb=30, k_dist=6):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(b, h, w, d)).astype(np.float32)
  c_emb = rng.normal(size=(k_emb, d)).astype(np.float32)
  e2d = rng.integers(0, k_dist, size=k_emb).astype(np.int32)
  p_nb = rng.dirichlet(np.ones(k_dist) * 0.2, size=(b, h, w)).astype(np.float32)
  p_pos = rng.dirichlet(np.ones(k_dist) * 0.5, size=(h, w)).astype(np.float32)
  masks = rng.random((b, h, w)) < 0.3
  return feats, masks, dict(c_emb=c_emb, emb_to_dist=e2d), p_nb, p_pos


def _brute(feats, masks, arrays, p_nb, p_pos, tau, lam, rho):
  b, h, w, d = feats.shape
  x = feats.reshape(-1, d).astype(np.float64)
  c, e2d = arrays['c_emb'], arrays['emb_to_dist']
  dist = np.sqrt(((x[:, None] - c[None]) ** 2).sum(-1))                  # [M, K_emb]
  code = e2d[dist.argmin(-1)]
  pn = p_nb.reshape(-1, p_nb.shape[-1])
  pp = np.broadcast_to(p_pos[None], (b,) + p_pos.shape).reshape(-1, p_pos.shape[-1])
  m = np.arange(len(x))
  gate = pn[:, e2d] > tau
  s_n = np.where(gate.any(-1), np.where(gate, dist, np.inf).min(-1), dist.min(-1))
  rel = pn[:, e2d] > rho * pn.max(-1, keepdims=True)
  s_rel = np.where(rel, dist, np.inf).min(-1)
  per = dict(excluded_N=pn[m, code] <= tau, excluded_P=pp[m, code] <= tau,
             excluded_NP=(pn[m, code] <= tau) & (pp[m, code] <= tau),
             excluded_eq6=0.5 * (pn[m, code] + pp[m, code]) <= tau,
             score_change_N=lam * (s_n - dist.min(-1)), top1_N=pn.argmax(-1) == code,
             allowed_N=gate.mean(-1), rel_excluded_N=pn[m, code] <= rho * pn.max(-1),
             rel_score_change_N=lam * (s_rel - dist.min(-1)),
             rel_excluded_P=pp[m, code] <= rho * pp.max(-1),
             lift_excluded_P=pp[m, code] <= rho * p_pos.reshape(-1, p_pos.shape[-1]).mean(0)[code])
  sel = masks.reshape(-1)
  return {f'{g}/{k}': float(np.mean(v[s])) for k, v in per.items()
          for g, s in (('normal', ~sel), ('defect', sel))}


def test_diagnostics_equal_brute_force():
  feats, masks, arrays, p_nb, p_pos = _problem()
  tau, lam, rho = 0.05, 0.8, 0.3
  got = diagnostics.prior_diagnostics(feats, masks, arrays, p_nb, p_pos, tau=tau, lam=lam,
                                      rho=rho, query_tile=8, bank_tile=16)
  want = _brute(feats, masks, arrays, p_nb, p_pos, tau, lam, rho)
  assert got['n_normal'] == (~masks).sum() and got['n_defect'] == masks.sum()
  for k, v in want.items():
    assert got[k] == pytest.approx(v, abs=1e-5), k
  # the problem is not degenerate: N excludes some nearest codes and changes scores
  assert 0 < got['normal/excluded_N'] < 1 and got['defect/score_change_N'] > 0
  assert all(isinstance(v, float) for v in got.values())


def test_diagnostics_without_a_prior_and_merge_equals_one_pass():
  feats, masks, arrays, p_nb, p_pos = _problem(1, b=3)
  only_p = diagnostics.prior_diagnostics(feats, masks, arrays, None, p_pos, tau=0.05)
  assert 'normal/excluded_P' in only_p and not any('_N' in k for k in only_p)
  whole = diagnostics.prior_diagnostics(feats, masks, arrays, p_nb, p_pos, tau=0.05)
  parts = [diagnostics.prior_diagnostics(feats[i:i + 1], masks[i:i + 1], arrays, p_nb[i:i + 1],
                                         p_pos, tau=0.05) for i in range(3)]
  merged = diagnostics.merge_diagnostics(parts)
  assert merged.keys() == whole.keys()
  for k in whole:
    assert merged[k] == pytest.approx(whole[k], abs=1e-6), k
  # A batch padded to one shape (evaluation runs full batches): masks of the first n images
  # only; the padded rows, here the last image repeated, are left out.
  pad = lambda x: jnp.concatenate([x, x[-1:], x[-1:]])
  padded = diagnostics.prior_diagnostics(pad(feats[:2]), masks[:2], arrays, pad(p_nb[:2]),
                                         p_pos, tau=0.05)
  first_two = diagnostics.merge_diagnostics(parts[:2])
  assert padded.keys() == first_two.keys()
  for k in first_two:
    assert padded[k] == pytest.approx(first_two[k], abs=1e-6, nan_ok=True), k


def test_patch_masks_and_errors():
  pix = np.zeros((1, 8, 8), bool)
  pix[0, 0:4, 0:1] = True                  # 4 of the 16 pixels of cell (0, 0)
  pix[0, 4:8, 4:8] = True                  # all of cell (1, 1)
  got = diagnostics.patch_masks(pix, (2, 2))
  np.testing.assert_array_equal(got[0], [[True, False], [False, True]])
  assert not diagnostics.patch_masks(pix, (2, 2), min_fraction=0.5)[0, 0, 0]
  assert diagnostics.patch_masks(np.ones((2, 9, 9)), (4, 4)).all()   # not a multiple: resize
  feats, masks, arrays, p_nb, _ = _problem()
  with pytest.raises(ValueError, match='patch resolution'):
    diagnostics.prior_diagnostics(feats, masks[:, :2], arrays, p_nb, None, tau=0.1)
  with pytest.raises(ValueError, match='n <= B'):
    diagnostics.prior_diagnostics(feats[:1], masks, arrays, p_nb[:1], None, tau=0.1)
  with pytest.raises(ValueError, match='at least one'):
    diagnostics.merge_diagnostics([])
