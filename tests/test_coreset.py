"""pni_jax.coreset against a brute-force numpy greedy k-center (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pni_jax import coreset

N, P = 1500, 12


def brute_greedy(features, num, start):
  """Greedy k-center with the documented rules: picked rows -inf, first index on ties."""
  x = np.asarray(features, np.float64)
  min_d = np.full(len(x), np.inf)
  picks = [int(start)]
  for _ in range(num - 1):
    last = picks[-1]
    min_d[last] = -np.inf
    min_d = np.minimum(min_d, ((x - x[last]) ** 2).sum(1))
    picks.append(int(np.argmax(min_d)))
  return np.array(picks[:num])


@pytest.fixture(scope='module')
def feats():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=(N, P)).astype(np.float32))


@pytest.fixture(scope='module')
def reference(feats):
  return brute_greedy(feats, 120, start=17)


def test_equals_brute_force(feats, reference):
  picks = coreset.greedy_coreset(feats, 120, start_index=17)
  assert picks.shape == (120,) and picks.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(picks), reference)


@pytest.mark.parametrize('chunk_size', [256, 700])  # 700 does not divide N: shifted last chunk
def test_chunked_equals_one_chunk(feats, reference, chunk_size):
  picks = coreset.greedy_coreset(feats, 120, start_index=17, chunk_size=chunk_size)
  np.testing.assert_array_equal(np.asarray(picks), reference)


def test_segments_and_progress(feats, reference):
  calls = []
  picks = coreset.greedy_coreset(feats, 120, start_index=17, chunk_size=700, segment_size=50,
                                 progress=lambda done, total, t: calls.append((done, total, t)))
  np.testing.assert_array_equal(np.asarray(picks), reference)
  assert [c[:2] for c in calls] == [(51, 120), (101, 120), (120, 120)]
  assert all(c[2] >= 0 for c in calls) and calls[0][2] <= calls[-1][2]
  coreset.log_progress(51, 120, 1.5)  # the ready-made callback runs


def test_key_start_is_deterministic(feats):
  key = jax.random.key(3)
  a = np.asarray(coreset.greedy_coreset(feats, 20, key=key))
  b = np.asarray(coreset.greedy_coreset(feats, 20, key=key))
  np.testing.assert_array_equal(a, b)
  assert a[0] == int(jax.random.randint(key, (), 0, N, dtype=jnp.int32))
  np.testing.assert_array_equal(a, brute_greedy(feats, 20, a[0]))
  c = np.asarray(coreset.greedy_coreset(feats, 20, key=jax.random.key(4)))
  assert c[0] != a[0]


def test_duplicates_give_distinct_picks():
  rng = np.random.default_rng(1)
  base = rng.integers(0, 3, size=(10, 2)).astype(np.float32)
  x = np.concatenate([base, base, base[:5]])  # many exact duplicates, N = 25
  picks = np.asarray(coreset.greedy_coreset(jnp.asarray(x), 25, start_index=3, chunk_size=8))
  assert sorted(picks.tolist()) == list(range(25))
  np.testing.assert_array_equal(picks, brute_greedy(x, 25, 3))


def test_greedy_k_center_jit_and_vmap(feats):
  fn = jax.jit(jax.vmap(lambda s: coreset.greedy_k_center(feats, s, 15, chunk_size=512)))
  picks = np.asarray(fn(jnp.array([0, 999], jnp.int32)))
  np.testing.assert_array_equal(picks[0], brute_greedy(feats, 15, 0))
  np.testing.assert_array_equal(picks[1], brute_greedy(feats, 15, 999))


def test_select_coresets_prefix(feats):
  key = jax.random.key(0)
  emb, dist = coreset.select_coresets(feats, 0.05, 30, key, chunk_size=512)
  assert emb.shape == (math.ceil(0.05 * N),) and dist.shape == (30,)
  np.testing.assert_array_equal(np.asarray(dist), np.asarray(emb)[:30])
  np.testing.assert_array_equal(np.asarray(emb), brute_greedy(feats, 75, int(emb[0])))
  # dist_size larger than |C_emb| is clipped to it.
  emb2, dist2 = coreset.select_coresets(feats, 0.01, 2048, key, chunk_size=512)
  assert emb2.shape == (15,) and dist2.shape == (15,)
  np.testing.assert_array_equal(np.asarray(emb2), np.asarray(emb)[:15])


def test_coreset_size():
  assert coreset.coreset_size(300, 0.01) == 3  # 0.01 * 300 = 3.0000000000000004
  assert coreset.coreset_size(301, 0.01) == 4
  assert coreset.coreset_size(10, 0.001) == 1
  assert coreset.coreset_size(700_000, 0.01) == 7000
  assert coreset.coreset_size(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001
  with pytest.raises(ValueError, match='ratio'):
    coreset.coreset_size(10, 0.0)


def test_emb_to_dist(feats):
  rng = np.random.default_rng(2)
  c_emb = np.asarray(feats)[rng.permutation(N)[:200]]
  c_dist = c_emb[:40]  # a prefix, as in select_coresets
  idx = np.asarray(coreset.emb_to_dist(jnp.asarray(c_emb), jnp.asarray(c_dist), bank_tile=16))
  d = ((c_emb[:, None, :].astype(np.float64) - c_dist[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(idx, np.argmin(d, axis=1))
  np.testing.assert_array_equal(idx[:40], np.arange(40))
  assert idx.dtype == np.int32


@pytest.mark.parametrize('kind', ['sparse', 'gaussian'])
def test_random_projection_preserves_norms(kind):
  d_in, d_out = 256, 128
  r = coreset.random_projection(jax.random.key(0), d_in, d_out, kind=kind)
  assert r.shape == (d_in, d_out) and r.dtype == jnp.float32
  if kind == 'sparse':
    nz = np.mean(np.asarray(r) != 0)
    assert abs(nz - 1 / math.sqrt(d_in)) < 0.01
  rng = np.random.default_rng(3)
  x = rng.normal(size=(400, d_in)).astype(np.float32)
  y = np.asarray(coreset.project(jnp.asarray(x), r))
  np.testing.assert_allclose(y, x.astype(np.float64) @ np.asarray(r, np.float64), rtol=1e-4,
                             atol=1e-4)
  # E ||x R||^2 = ||x||^2 * ||R||_F^2 / d_in for isotropic x; ||R||_F^2 / d_in ~ 1 +- 2%.
  assert abs((np.asarray(r, np.float64) ** 2).sum() / d_in - 1.0) < 0.1
  ratio = (y ** 2).sum(1) / (x ** 2).sum(1)
  assert abs(ratio.mean() - 1.0) < 0.1 and ratio.std() < 0.25  # JL: sd ~ sqrt(2 / d_out)
  # The projection keeps pairwise distances close too.
  dx = ((x[:50, None] - x[None, 50:100]) ** 2).sum(-1)
  dy = ((y[:50, None] - y[None, 50:100]) ** 2).sum(-1)
  assert abs(np.median(dy / dx) - 1.0) < 0.1


def test_projection_identity_and_errors(feats):
  assert coreset.random_projection(jax.random.key(0), P, 0) is None
  assert coreset.random_projection(jax.random.key(0), P, None) is None
  y = coreset.project(jnp.asarray(feats, jnp.bfloat16), None)
  assert y.dtype == jnp.float32 and y.shape == (N, P)
  with pytest.raises(ValueError, match='unknown projection kind'):
    coreset.random_projection(jax.random.key(0), P, 4, kind='dense')
  with pytest.raises(ValueError, match='does not fit'):
    coreset.project(feats, jnp.zeros((P + 1, 4)))


def test_errors(feats):
  with pytest.raises(ValueError, match='num'):
    coreset.greedy_coreset(feats, N + 1, start_index=0)
  with pytest.raises(ValueError, match='exactly one'):
    coreset.greedy_coreset(feats, 5)
  with pytest.raises(ValueError, match='exactly one'):
    coreset.greedy_coreset(feats, 5, start_index=0, key=jax.random.key(0))
  with pytest.raises(ValueError, match='start_index'):
    coreset.greedy_coreset(feats, 5, start_index=N)
  with pytest.raises(ValueError, match='chunk_size'):
    coreset.greedy_coreset(feats, 5, start_index=0, chunk_size=0)
  with pytest.raises(ValueError, match='dist_size'):
    coreset.select_coresets(feats, 0.1, 0, jax.random.key(0))
  assert coreset.greedy_coreset(feats, 0, start_index=0).shape == (0,)


def test_host_and_device_inputs_give_the_same_picks(feats, reference):
  """A numpy (host) array goes to the mesh shard by shard; the picks do not depend on it."""
  host = np.asarray(feats)
  picks = coreset.greedy_coreset(host, 120, start_index=17, chunk_size=700, segment_size=50)
  np.testing.assert_array_equal(np.asarray(picks), reference)


@pytest.mark.parametrize('host', [False, True])
def test_padding_to_a_bucket_keeps_the_picks_and_shares_one_compilation(feats, reference, host):
  """Rows and picks padded to a shape bucket: the same picks; a smaller N in the same bucket
  reuses the compiled step (padded rows are never picked)."""
  x = np.asarray(feats) if host else feats
  picks = coreset.greedy_coreset(x, 120, start_index=17, chunk_size=700, pad_rows_to=1792,
                                 pad_picks_to=160)
  np.testing.assert_array_equal(np.asarray(picks), reference)
  compiled = coreset._run_picks_sharded._cache_size()
  smaller = x[:1300]
  picks = coreset.greedy_coreset(smaller, 100, start_index=17, chunk_size=700, pad_rows_to=1792,
                                 pad_picks_to=160)
  np.testing.assert_array_equal(np.asarray(picks), brute_greedy(np.asarray(feats)[:1300], 100, 17))
  assert coreset._run_picks_sharded._cache_size() == compiled
