"""Scoring: eq. 3-8 against a direct numpy evaluation; maps against scipy's resize + blur."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from pni_jax import knn
from pni_jax import scoring


def _numpy_pni(feats, c_emb, e2d, p_nb, p_pos, tau, lam):
  """Eq. 4-8 literally: p(c|Omega) = (p_nb + p_pos) / 2, T_tau, p(phi|c) = exp(-lam ||phi - c||),
  S = -log max_c p(phi|c) T(p(c|Omega)); nearest C_emb when nothing passes the threshold."""
  p = [q for q in (p_nb, p_pos) if q is not None]
  prior = sum(p) / len(p)                                               # eq. 6
  dist = np.sqrt(((feats[:, None, :] - c_emb[None]) ** 2).sum(-1))      # [M, K_emb]
  like = np.exp(-lam * dist)                                            # eq. 8
  gate = (prior[:, e2d] > tau).astype(np.float64)                       # eq. 5 via emb -> dist
  best = (like * gate).max(-1)                                          # eq. 4
  fallback = like.max(-1)
  best = np.where(gate.any(-1), best, fallback)
  return -np.log(best), gate.mean(-1)


@pytest.mark.parametrize('use_nb,use_pos', [(True, True), (True, False), (False, True)])
def test_pni_scores_equal_direct_numpy_eq_4_to_8(use_nb, use_pos):
  rng = np.random.default_rng(0)
  m, d, k_emb, k_dist = 37, 6, 50, 11
  feats = rng.normal(size=(m, d)).astype(np.float32)
  c_emb = rng.normal(size=(k_emb, d)).astype(np.float32)
  e2d = rng.integers(0, k_dist, size=k_emb).astype(np.int32)
  def probs():
    logits = rng.normal(scale=3.0, size=(m, k_dist))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)
  p_nb = probs() if use_nb else None
  p_pos = probs() if use_pos else None
  for p in (p_nb, p_pos):
    if p is not None:
      p[:3] = 0.0       # nothing allowed for a few patches: exercises the fallback
  tau, lam = 0.05, 0.7
  want, want_frac = _numpy_pni(feats, c_emb, e2d, p_nb, p_pos, tau, lam)
  got, frac = scoring.pni_patch_scores(
      jnp.asarray(feats), jnp.asarray(c_emb), jnp.asarray(e2d),
      None if p_nb is None else jnp.asarray(p_nb), None if p_pos is None else jnp.asarray(p_pos),
      tau=tau, lam=lam, combine='mean_prob', query_tile=8, bank_tile=16)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(frac), want_frac, atol=1e-6)
  assert (want_frac[:3] == 0).all() and (want_frac[3:] > 0).any()


def test_product_combination_vetoes_codes_either_prior_rules_out():
  p_nb = jnp.asarray([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.5, 0.5]])
  p_pos = jnp.asarray([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
  got = np.asarray(scoring.combine_priors(p_nb, p_pos, 'product'))
  np.testing.assert_allclose(got[0], [0.0, 0.6, 0.4, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(got[1], 0.0)          # disjoint supports: nothing allowed
  mean = np.asarray(scoring.combine_priors(p_nb, p_pos, 'mean_prob'))
  np.testing.assert_allclose(mean, 0.5 * (np.asarray(p_nb) + np.asarray(p_pos)))


def test_mean_score_averages_the_two_conditional_scores():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(20, 4)).astype(np.float32)
  c_emb = rng.normal(size=(30, 4)).astype(np.float32)
  e2d = rng.integers(0, 7, size=30).astype(np.int32)
  p1 = rng.dirichlet(np.ones(7) * 0.3, size=20).astype(np.float32)
  p2 = rng.dirichlet(np.ones(7) * 0.3, size=20).astype(np.float32)
  s1, _ = _numpy_pni(feats, c_emb, e2d, p1, None, 0.1, 1.0)
  s2, _ = _numpy_pni(feats, c_emb, e2d, None, p2, 0.1, 1.0)
  got, _ = scoring.pni_patch_scores(jnp.asarray(feats), jnp.asarray(c_emb), jnp.asarray(e2d),
                                    jnp.asarray(p1), jnp.asarray(p2), tau=0.1, lam=1.0,
                                    combine='mean_score', query_tile=8, bank_tile=8)
  np.testing.assert_allclose(np.asarray(got), 0.5 * (s1 + s2), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='combine'):
    scoring.pni_patch_scores(jnp.asarray(feats), jnp.asarray(c_emb), jnp.asarray(e2d),
                             jnp.asarray(p1), jnp.asarray(p2), tau=0.1, lam=1.0, combine='sum',
                             query_tile=8, bank_tile=8)


def test_patchcore_distance_is_nearest_coreset_distance():
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(45, 5)).astype(np.float32)
  bank = rng.normal(size=(23, 5)).astype(np.float32)
  dist, idx = scoring.nearest_distance(jnp.asarray(feats), jnp.asarray(bank), query_tile=16,
                                       bank_tile=8)
  full = np.sqrt(((feats[:, None] - bank[None]) ** 2).sum(-1))
  np.testing.assert_allclose(np.asarray(dist), full.min(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(idx), full.argmin(-1))


@pytest.mark.parametrize('h,out,sigma', [(8, 64, 4.0), (7, 50, 2.5), (16, 64, 0.0)])
def test_anomaly_map_equals_bilinear_resize_then_scipy_gaussian(h, out, sigma):
  rng = np.random.default_rng(3)
  patch = rng.normal(size=(2, h, h + 1)).astype(np.float32)
  got = np.asarray(scoring.anomaly_maps(jnp.asarray(patch), (out, out + 3), sigma))
  up = np.asarray(jax.image.resize(jnp.asarray(patch), (2, out, out + 3), 'bilinear',
                                   antialias=False))
  want = up if sigma == 0 else np.stack(
      [scipy.ndimage.gaussian_filter(u.astype(np.float64), sigma) for u in up])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_image_scores_modes():
  rng = np.random.default_rng(4)
  maps = jnp.asarray(rng.normal(size=(3, 10, 10)).astype(np.float32))
  patch = jnp.asarray(rng.normal(size=(3, 4, 4)).astype(np.float32))
  np.testing.assert_allclose(scoring.image_scores(maps, patch, 'max'), np.asarray(maps).max((1, 2)))
  np.testing.assert_allclose(scoring.image_scores(maps, patch, 'patch_max'),
                             np.asarray(patch).max((1, 2)))
  top = np.sort(np.asarray(maps).reshape(3, -1), -1)[:, -5:].mean(-1)
  np.testing.assert_allclose(scoring.image_scores(maps, patch, 'top_percent', 5.0), top, rtol=1e-6)
  with pytest.raises(ValueError, match='image_score'):
    scoring.image_scores(maps, patch, 'mean')


def test_reweighted_image_score_matches_patchcore_formula():
  rng = np.random.default_rng(5)
  feats = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  bank = rng.normal(size=(12, 4)).astype(np.float32)
  flat = feats.reshape(2, 9, 4)
  dist = np.sqrt(((flat[:, :, None] - bank[None, None]) ** 2).sum(-1))   # [B, 9, K]
  patch = dist.min(-1)
  want = []
  for b in range(2):
    i = patch[b].argmax()
    star = flat[b, i]
    m_star = bank[dist[b, i].argmin()]
    nb = bank[np.argsort(((bank - m_star) ** 2).sum(-1), kind='stable')[:3]]
    dn = np.sqrt(((star - nb) ** 2).sum(-1))
    want.append((1 - np.exp(dn[0]) / np.exp(dn).sum()) * patch[b].max())
  got = scoring.reweighted_image_scores(jnp.asarray(feats), jnp.asarray(patch.reshape(2, 3, 3)),
                                        jnp.asarray(bank), 3, query_tile=4, bank_tile=4)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# ----------------------------------------------------------------------------- hyper-parameters


def _random_case(seed=6, m=60, d=5, k_emb=40, k_dist=9):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(m, d)).astype(np.float32)
  c_emb = rng.normal(size=(k_emb, d)).astype(np.float32)
  e2d = rng.integers(0, k_dist, size=k_emb).astype(np.int32)
  e2d[:k_dist] = np.arange(k_dist)                       # every code has a row
  logits = rng.normal(scale=3.0, size=(m, k_dist)).astype(np.float32)
  pos = rng.dirichlet(np.ones(k_dist) * 0.3, size=m).astype(np.float32)
  return feats, c_emb, e2d, logits, pos


@pytest.mark.parametrize('sigma', [0.0, 0.7, 2.5, 4.0, 8.0])
def test_jnp_blur_equals_the_numpy_reference_for_sigma_within_the_bound(sigma):
  got = np.asarray(scoring.gaussian_matrix_jnp(50, jnp.float32(sigma), max_sigma=8.0))
  np.testing.assert_allclose(got, scoring.gaussian_matrix(50, sigma), atol=1e-6)
  a_h, a_w = scoring.map_operator(7, 9, 50, 60, sigma)
  b_h, b_w = scoring.map_operator_jnp(7, 9, 50, 60, jnp.float32(sigma), 8.0)
  np.testing.assert_allclose(np.asarray(b_h), a_h, atol=1e-6)
  np.testing.assert_allclose(np.asarray(b_w), a_w, atol=1e-6)


def test_traced_sigma_under_vmap_equals_scipy_per_value():
  rng = np.random.default_rng(7)
  patch = jnp.asarray(rng.normal(size=(2, 6, 7)).astype(np.float32))
  sigmas = jnp.asarray([1.0, 2.5, 6.0], jnp.float32)
  maps = jax.jit(jax.vmap(lambda s: scoring.anomaly_maps(patch, (40, 44), s, 6.0)))(sigmas)
  up = np.asarray(jax.image.resize(patch, (2, 40, 44), 'bilinear', antialias=False))
  for i, s in enumerate([1.0, 2.5, 6.0]):
    want = np.stack([scipy.ndimage.gaussian_filter(u.astype(np.float64), s) for u in up])
    np.testing.assert_allclose(np.asarray(maps[i]), want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='max_sigma'):
    jax.jit(lambda s: scoring.anomaly_maps(patch, (40, 44), s))(jnp.float32(2.0))


@pytest.mark.parametrize('combine', scoring.COMBINE_MODES)
def test_sparse_and_group_searches_equal_the_dense_reference(combine):
  feats, c_emb, e2d, logits, pos = _random_case()
  f, c, e = jnp.asarray(feats), jnp.asarray(c_emb), jnp.asarray(e2d)
  hp = scoring.HParams(tau_scale=jnp.float32(1.0), temperature=jnp.float32(1.5),
                       likelihood_lambda=jnp.float32(0.8), neighborhood_weight=jnp.float32(0.3),
                       rho=jnp.float32(0.2))
  p_nb = scoring.neighbor_prior(jnp.asarray(logits), hp.temperature)
  tau = 1.0 / c_emb.shape[0]
  base = jnp.asarray(pos).mean(0)                  # P's base rate ('relative_lift_score')
  want, want_frac = scoring.pni_patch_scores(f, c, e, p_nb, jnp.asarray(pos), tau=tau, lam=0.8,
                                             combine=combine, query_tile=16, bank_tile=16,
                                             neighborhood_weight=0.3, rho=0.2, pos_base=base)
  sq, idx = knn.knn(f, c, 1, query_tile=16, bank_tile=16)
  counts = scoring.code_counts(e, logits.shape[1])
  sparse = lambda a: scoring.masked_sq_dist_sparse(f, c, e, a, sq[:, 0], idx[:, 0], chunk=7,
                                                   query_tile=16, bank_tile=16)
  groups = scoring.group_min_sq_dists(f, c, e, logits.shape[1], query_tile=16, bank_tile=16)
  grouped = lambda a: scoring.masked_sq_dist_from_groups(groups, a)
  dense_offset = lambda o: knn.min_dist_plus_offset(f, c, o, e, scoring.offset_by_code,
                                                     query_tile=16, bank_tile=16)[0]
  grouped_offset = lambda o: scoring.min_plus_offset_from_groups(groups, o)
  for oracle, offsets in ((sparse, dense_offset), (grouped, grouped_offset)):
    got, frac = scoring.conditional_scores(oracle, sq[:, 0], p_nb, jnp.asarray(pos), hp,
                                           num_emb=c_emb.shape[0], code_count=counts,
                                           combine=combine, min_plus_offset=offsets,
                                           pos_base=base)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(frac), np.asarray(want_frac), atol=1e-6)


def test_group_min_distances_are_the_per_code_minimum():
  feats, c_emb, e2d, _, _ = _random_case(seed=8, k_dist=11)
  e2d[e2d == 10] = 0                                      # code 10 has no C_emb row
  got = np.asarray(scoring.group_min_sq_dists(jnp.asarray(feats), jnp.asarray(c_emb),
                                              jnp.asarray(e2d), 11, query_tile=16, bank_tile=16))
  full = ((feats[:, None] - c_emb[None]) ** 2).sum(-1)
  for k in range(11):
    cols = e2d == k
    want = full[:, cols].min(-1) if cols.any() else np.full(len(feats), np.inf)
    np.testing.assert_allclose(got[:, k], want, rtol=1e-5, atol=1e-5)


def test_vmapped_hparams_equal_the_per_value_loop():
  feats, c_emb, e2d, logits, pos = _random_case(seed=9)
  f, c, e = jnp.asarray(feats), jnp.asarray(c_emb), jnp.asarray(e2d)
  sq, idx = knn.knn(f, c, 1, query_tile=16, bank_tile=16)
  counts = scoring.code_counts(e, logits.shape[1])

  def score(hp):
    p_nb = scoring.neighbor_prior(jnp.asarray(logits), hp.temperature)
    oracle = lambda a: scoring.masked_sq_dist_sparse(f, c, e, a, sq[:, 0], idx[:, 0], chunk=8,
                                                     query_tile=16, bank_tile=16)
    s, _ = scoring.conditional_scores(oracle, sq[:, 0], p_nb, jnp.asarray(pos), hp,
                                      num_emb=c_emb.shape[0], code_count=counts,
                                      combine='mean_prob')
    return s

  values = [(0.1, 1.0), (1.0, 2.0), (3.0, 0.5), (8.0, 4.0)]
  points = [scoring.HParams(tau_scale=jnp.float32(t), temperature=jnp.float32(T))
            for t, T in values]
  batched = jax.jit(jax.vmap(score))(scoring.stack_hparams(points))
  for i, p in enumerate(points):
    np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(jax.jit(score)(p)), atol=1e-6)
  assert np.ptp(np.asarray(batched).mean(-1)) > 0          # the knobs do change the scores


def test_hparams_from_config_reads_the_defaults_and_overrides():
  from pni_jax.config import base_config
  m = base_config().model
  hp = scoring.hparams_from_config(m, sigma=3.0)
  assert float(hp.tau_scale) == m.scoring.tau_scale and float(hp.sigma) == 3.0
  assert float(hp.fusion_weight) == pytest.approx(m.refine.fusion_weight)
  with pytest.raises(ValueError, match='unknown hyper-parameter'):
    scoring.hparams_from_config(m, tau=1.0)


def test_temperature_is_checked_by_config_validation_not_while_scoring():
  from pni_jax import config as config_lib
  cfg = config_lib.base_config()
  cfg.data.root = '/x'
  cfg.model.scoring.temperature = 0.0
  with pytest.raises(ValueError, match='model.scoring.temperature'):
    config_lib.validate(cfg)
  probs = jax.vmap(lambda t: scoring.neighbor_prior(jnp.ones((2, 3)), t))(jnp.asarray([1.0, 2.0]))
  np.testing.assert_allclose(np.asarray(probs), 1.0 / 3.0, rtol=1e-6)


def test_patch_max_cropped_ignores_the_border_and_the_blur():
  patch = np.zeros((2, 8, 8), np.float32)
  patch[0, 0, 3] = 9.0                 # on the border: cut
  patch[0, 4, 4] = 2.0
  patch[1, 2, 5] = 3.0                 # inside a border of 2
  maps = np.full((2, 16, 16), 100.0, np.float32)
  got = scoring.image_scores(jnp.asarray(maps), jnp.asarray(patch), 'patch_max_cropped', border=2)
  np.testing.assert_allclose(np.asarray(got), [2.0, 3.0])
  whole = scoring.image_scores(jnp.asarray(maps), jnp.asarray(patch), 'patch_max_cropped',
                               border=0)
  np.testing.assert_allclose(np.asarray(whole), [9.0, 3.0])
  with pytest.raises(ValueError, match='image_border'):
    scoring.image_scores(jnp.asarray(maps), jnp.asarray(patch), 'patch_max_cropped', border=4)


def test_traced_top_percent_equals_the_static_one():
  rng = np.random.default_rng(10)
  maps = jnp.asarray(rng.normal(size=(3, 10, 10)).astype(np.float32))
  patch = jnp.zeros((3, 2, 2))
  got = jax.vmap(lambda t: scoring.image_scores(maps, patch, 'top_percent', t,
                                                max_top_percent=10.0))(jnp.asarray([2.0, 5.0]))
  for i, t in enumerate([2.0, 5.0]):
    np.testing.assert_allclose(np.asarray(got[i]),
                               np.asarray(scoring.image_scores(maps, patch, 'top_percent', t)),
                               rtol=1e-6)


# ----------------------------------------------------------------------------- variants (issue 12)


def _problem(seed, m=29, d=5, k_emb=40, k_dist=9):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(m, d)).astype(np.float32)
  c_emb = rng.normal(size=(k_emb, d)).astype(np.float32)
  e2d = rng.integers(0, k_dist, size=k_emb).astype(np.int32)
  p1 = rng.dirichlet(np.ones(k_dist) * 0.3, size=m).astype(np.float32)
  p2 = rng.dirichlet(np.ones(k_dist) * 0.3, size=m).astype(np.float32)
  return feats, c_emb, e2d, p1, p2


def _scores(feats, c_emb, e2d, p1, p2, combine, **kw):
  got, frac = scoring.pni_patch_scores(
      jnp.asarray(feats), jnp.asarray(c_emb), jnp.asarray(e2d),
      None if p1 is None else jnp.asarray(p1), None if p2 is None else jnp.asarray(p2),
      combine=combine, query_tile=8, bank_tile=16, **kw)
  return np.asarray(got), np.asarray(frac)


@pytest.mark.parametrize('two_priors', [False, True])
@pytest.mark.parametrize('combine', ['posterior', 'posterior_ratio'])
def test_posterior_score_equals_brute_force_min_over_codes(two_priors, combine):
  feats, c_emb, e2d, p1, p2 = _problem(6)
  p1[:4, :3] = 0.0                                   # zero probabilities hit the floor
  p2 = p2 if two_priors else None
  lam = 0.6
  prior = p1 if p2 is None else 0.5 * (p1 + p2)      # eq. 6
  if combine == 'posterior_ratio':
    prior = prior / prior.max(-1, keepdims=True)
  dist = np.sqrt(((feats[:, None].astype(np.float64) - c_emb[None]) ** 2).sum(-1))
  want = (lam * dist - np.log(np.maximum(prior[:, e2d], 1e-30))).min(-1)
  got, frac = _scores(feats, c_emb, e2d, p1, p2, combine, tau=0.5, lam=lam)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(frac, 1.0)
  # no threshold at all: tau plays no part
  got2, _ = _scores(feats, c_emb, e2d, p1, p2, combine, tau=0.0, lam=lam)
  np.testing.assert_array_equal(got, got2)


@pytest.mark.parametrize('combine', ['relative', 'relative_score'])
def test_relative_threshold_equals_brute_force(combine):
  feats, c_emb, e2d, p1, p2 = _problem(7)
  rho, lam = 0.2, 1.3
  dist = np.sqrt(((feats[:, None].astype(np.float64) - c_emb[None]) ** 2).sum(-1))

  def one(prior):
    gate = prior[:, e2d] > rho * prior.max(-1, keepdims=True)       # [M, K_emb]
    assert gate.any(-1).all()          # the most probable code always passes: no fallback
    return np.where(gate, dist, np.inf).min(-1), gate.mean(-1)

  if combine == 'relative':
    want, want_frac = one(0.5 * (p1 + p2))
  else:
    (a, fa), (b, fb) = one(p1), one(p2)
    want, want_frac = 0.5 * (a + b), 0.5 * (fa + fb)
  got, frac = _scores(feats, c_emb, e2d, p1, p2, combine, tau=0.0, lam=lam, rho=rho)
  np.testing.assert_allclose(got, lam * want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(frac, want_frac, atol=1e-6)
  # a looser rho allows more and can only lower the scores
  loose, _ = _scores(feats, c_emb, e2d, p1, p2, combine, tau=0.0, lam=lam, rho=0.01)
  assert (loose <= got + 1e-6).all() and (loose < got - 1e-6).any()


def test_relative_lift_thresholds_p_against_its_base_rate():
  """'relative_lift_score': N allowed at rho x its max, P at rho x the code's base rate; each
  with the nearest code as fallback; scores averaged."""
  feats, c_emb, e2d, p1, p2 = _problem(9)
  base = p2.mean(0)                                  # the base rate over the M "positions"
  rho, lam = 0.5, 1.3
  dist = np.sqrt(((feats[:, None].astype(np.float64) - c_emb[None]) ** 2).sum(-1))

  def best(gate):                                    # gate [M, K_emb]
    return (np.where(gate.any(-1), np.where(gate, dist, np.inf).min(-1), dist.min(-1)),
            gate.mean(-1))

  (s_n, f_n), (s_p, f_p) = (best(p1[:, e2d] > rho * p1.max(-1, keepdims=True)),
                            best(p2[:, e2d] > rho * base[e2d]))
  assert 0 < f_p.mean() < 1                          # P binds on this problem
  kw = dict(tau=0.0, lam=lam, rho=rho, pos_base=jnp.asarray(base))
  got, frac = _scores(feats, c_emb, e2d, p1, p2, 'relative_lift_score', **kw)
  np.testing.assert_allclose(got, lam * 0.5 * (s_n + s_p), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(frac, 0.5 * (f_n + f_p), atol=1e-6)
  got_p, _ = _scores(feats, c_emb, e2d, None, p2, 'relative_lift_score', **kw)
  np.testing.assert_allclose(got_p, lam * s_p, rtol=1e-5, atol=1e-5)
  # A position prior equal to its base rate everywhere (position says nothing) excludes nothing,
  # where a threshold relative to its max still excludes the rare codes.
  skewed = np.geomspace(1.0, 0.01, p2.shape[1]).astype(np.float32)   # skewed code shares
  skewed /= skewed.sum()
  flat = np.broadcast_to(skewed, p2.shape).copy()
  kw['pos_base'] = jnp.asarray(skewed)
  got_flat, frac_flat = _scores(feats, c_emb, e2d, None, flat, 'relative_lift_score', **kw)
  np.testing.assert_allclose(got_flat, lam * dist.min(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(frac_flat, 1.0)
  _, frac_rel = _scores(feats, c_emb, e2d, None, flat, 'relative_score', tau=0.0, lam=lam,
                        rho=rho)
  assert frac_rel.max() < 1


def test_mean_score_thresholds_each_prior_on_its_own_like_the_authors():
  """The authors' N+P: S = (S_N + S_P) / 2 with S_N, S_P each from its own prior at tau (each
  with its own fallback), not eq. 6's threshold of the averaged prior."""
  feats, c_emb, e2d, p1, p2 = _problem(8)
  p1[:5] = 0.0                                        # N allows nothing here: N falls back
  tau, lam = 0.08, 1.0
  dist = np.sqrt(((feats[:, None].astype(np.float64) - c_emb[None]) ** 2).sum(-1))

  def one(prior):
    gate = prior[:, e2d] > tau
    best = np.where(gate, dist, np.inf).min(-1)
    return np.where(gate.any(-1), best, dist.min(-1))

  want = 0.5 * (one(p1) + one(p2))
  got, _ = _scores(feats, c_emb, e2d, p1, p2, 'mean_score', tau=tau, lam=lam)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  eq6, _ = _scores(feats, c_emb, e2d, p1, p2, 'mean_prob', tau=tau, lam=lam)
  assert np.abs(eq6 - got).max() > 1e-3             # a different rule, measurably


def test_edge_pad_border_crops_and_pads_with_the_nearest_interior_value():
  s = np.arange(2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7)
  got = np.asarray(scoring.edge_pad_border(jnp.asarray(s), 2))
  want = np.pad(s[:, 2:4, 2:5], ((0, 0), (2, 2), (2, 2)), mode='edge')
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(scoring.edge_pad_border(jnp.asarray(s), 0)), s)
  with pytest.raises(ValueError, match='border'):
    scoring.edge_pad_border(jnp.asarray(s), 3)
