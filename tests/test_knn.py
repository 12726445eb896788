"""pni_jax.knn against a brute-force numpy reference (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pni_jax import knn as knn_lib

M, K, D = 300, 1001, 24  # neither a multiple of the tiles below
TQ, TK = 128, 256


def brute_sq(queries, bank):
  q = np.asarray(queries, np.float64)
  b = np.asarray(bank, np.float64)
  return ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def brute_knn(queries, bank, k, mask=None):
  """Sorted by (distance, index): the documented tie rule."""
  d = brute_sq(queries, bank)
  if mask is not None:
    d = np.where(mask[None, :], d, np.inf)
  idx = np.argsort(d, axis=1, kind='stable')[:, :k]
  dist = np.take_along_axis(d, idx, axis=1)
  return dist, np.where(np.isinf(dist), -1, idx)


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(M, D)).astype(np.float32),
          rng.normal(size=(K, D)).astype(np.float32))


@pytest.mark.parametrize('k,bank_tile', [(1, TK), (1, 100), (4, TK)])
def test_knn_equals_brute_force(data, k, bank_tile):
  q, b = data
  d, i = knn_lib.knn(q, b, k, query_tile=TQ, bank_tile=bank_tile)
  ref_d, ref_i = brute_knn(q, b, k)
  assert d.shape == (M, k) and i.shape == (M, k)
  assert d.dtype == jnp.float32 and i.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(i), ref_i)
  np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-4, atol=1e-4)
  assert np.all(np.diff(np.asarray(d), axis=1) >= 0)


def test_knn_default_tiles_single_tile(data):
  q, b = data  # tiles clipped to M and K: one tile each
  d, i = knn_lib.knn(q, b)
  ref_d, ref_i = brute_knn(q, b, 1)
  np.testing.assert_array_equal(np.asarray(i), ref_i)
  np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-4, atol=1e-4)


def test_knn_dists_is_sqrt(data):
  q, b = data
  d, i = knn_lib.knn_dists(q, b, 4, query_tile=TQ, bank_tile=TK)
  ref_d, ref_i = brute_knn(q, b, 4)
  np.testing.assert_array_equal(np.asarray(i), ref_i)
  np.testing.assert_allclose(np.asarray(d), np.sqrt(ref_d), rtol=1e-4, atol=1e-4)


def test_bank_mask_and_too_few_rows(data):
  q, b = data
  mask = np.zeros(K, bool)
  mask[[5, 300, 301, 999]] = True  # 4 valid rows in 3 different tiles, ask for 6
  d, i = knn_lib.knn(q, b, 6, query_tile=TQ, bank_tile=TK, bank_mask=jnp.asarray(mask))
  ref_d, ref_i = brute_knn(q, b, 6, mask)
  np.testing.assert_array_equal(np.asarray(i), ref_i)
  assert np.all(np.asarray(i)[:, 4:] == -1) and np.all(np.isinf(np.asarray(d)[:, 4:]))
  np.testing.assert_allclose(np.asarray(d)[:, :4], ref_d[:, :4], rtol=1e-4, atol=1e-4)


def test_ties_lowest_index_wins():
  # Small integers: every distance is exact, so duplicated rows tie exactly.
  rng = np.random.default_rng(1)
  base = rng.integers(-3, 4, size=(40, 8)).astype(np.float32)
  bank = np.concatenate([base, base[::-1], base])  # each row three times, across tiles
  q = rng.integers(-3, 4, size=(50, 8)).astype(np.float32)
  for k in (1, 5):
    d, i = knn_lib.knn(q, bank, k, query_tile=32, bank_tile=32)
    ref_d, ref_i = brute_knn(q, bank, k)
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    np.testing.assert_array_equal(np.asarray(d), ref_d)


def test_two_level_argmin_ties():
  # Bank tile 512 takes the blocked row-argmin path; duplicates inside one tile.
  rng = np.random.default_rng(2)
  base = rng.integers(-2, 3, size=(200, 4)).astype(np.float32)
  bank = np.concatenate([base, base, base[:112]])  # 512 rows = one tile of 4 blocks
  q = rng.integers(-2, 3, size=(64, 4)).astype(np.float32)
  d, i = knn_lib.knn(q, bank, 1, bank_tile=512)
  ref_d, ref_i = brute_knn(q, bank, 1)
  np.testing.assert_array_equal(np.asarray(i), ref_i)
  np.testing.assert_array_equal(np.asarray(d), ref_d)


def test_vmap_over_banks_and_queries(data):
  q, b = data
  banks = np.stack([b[:500], b[500:1000], b[1:501]])
  fn = lambda qq, bb: knn_lib.knn(qq, bb, 3, query_tile=TQ, bank_tile=TK)
  d, i = jax.vmap(fn, in_axes=(None, 0))(q, banks)
  assert d.shape == (3, M, 3)
  for n in range(3):
    ref_d, ref_i = brute_knn(q, banks[n], 3)
    np.testing.assert_array_equal(np.asarray(i[n]), ref_i)
    np.testing.assert_allclose(np.asarray(d[n]), ref_d, rtol=1e-4, atol=1e-4)
  queries = np.stack([q[:150], q[150:]])
  d, i = jax.jit(jax.vmap(fn, in_axes=(0, None)))(queries, b)
  for n in range(2):
    np.testing.assert_array_equal(np.asarray(i[n]), brute_knn(queries[n], b, 3)[1])


def test_bfloat16_inputs_accumulate_in_float32(data):
  q, b = data
  qb, bb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  d, i = knn_lib.knn(qb, bb, 1, query_tile=TQ, bank_tile=TK)
  assert d.dtype == jnp.float32
  ref_d, ref_i = brute_knn(np.asarray(qb, np.float32), np.asarray(bb, np.float32), 1)
  np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-3, atol=1e-3)
  assert np.mean(np.asarray(i) == ref_i) > 0.99


def test_pairwise_sq_dists(data):
  q, b = data
  d = knn_lib.pairwise_sq_dists(q[:20], b[:30])
  assert d.shape == (20, 30) and d.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(d), brute_sq(q[:20], b[:30]), rtol=1e-4, atol=1e-4)
  self_d = np.asarray(knn_lib.pairwise_sq_dists(q * 100, q * 100))
  assert np.all(self_d >= 0)  # clipped: no negative rounding error
  assert np.diag(self_d).max() <= 1e-4 * np.median(self_d)


def test_errors(data):
  q, b = data
  with pytest.raises(ValueError, match='same feature size'):
    knn_lib.knn(q, b[:, :10])
  with pytest.raises(ValueError, match='k must be'):
    knn_lib.knn(q, b, 0)
  with pytest.raises(ValueError, match='bank is empty'):
    knn_lib.knn(q, b[:0])
  with pytest.raises(ValueError, match='bank_mask'):
    knn_lib.knn(q, b, bank_mask=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match='query_tile'):
    knn_lib.knn(q, b, query_tile=0)
  d, i = knn_lib.knn(q[:0], b, 2)
  assert d.shape == (0, 2) and i.shape == (0, 2)


# ----------------------------------------------------------------------------- masked_min_dist


def allowed_from_probs(allowed_dist_tile, emb_to_dist_tile):
  """PNI-style: [tq, K_dist] bool per query, [tk] int32 map bank row -> dist row."""
  return jnp.take(allowed_dist_tile, emb_to_dist_tile, axis=1)


def test_masked_min_dist_equals_brute_force(data):
  q, b = data
  rng = np.random.default_rng(3)
  k_dist = 37
  emb_to_dist = rng.integers(0, k_dist - 1, size=K).astype(np.int32)
  emb_to_dist[1000] = k_dist - 1  # a dist row owned by bank row 1000 alone
  allowed_dist = rng.random((M, k_dist)) < 0.1
  allowed_dist[:7] = False  # queries with nothing allowed
  allowed_dist[7, :] = False
  allowed_dist[7, k_dist - 1] = True  # only bank row 1000, in the last (padded) tile
  res = knn_lib.masked_min_dist(q, b, jnp.asarray(allowed_dist), jnp.asarray(emb_to_dist),
                                allowed_from_probs, query_tile=TQ, bank_tile=TK)
  assert isinstance(res, knn_lib.MaskedNearest)
  full = brute_sq(q, b)
  mask = allowed_dist[:, emb_to_dist]  # [M, K]
  masked = np.where(mask, full, np.inf)
  ref_i = np.argmin(masked, axis=1)
  ref_d = masked[np.arange(M), ref_i]
  ref_i = np.where(np.isinf(ref_d), -1, ref_i)
  np.testing.assert_array_equal(np.asarray(res.index), ref_i)
  np.testing.assert_allclose(np.asarray(res.sq_dist), ref_d, rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(res.index)[:7] == -1) and np.all(np.isinf(np.asarray(res.sq_dist)[:7]))
  assert int(res.index[7]) == 1000
  near_d, near_i = brute_knn(q, b, 1)
  np.testing.assert_array_equal(np.asarray(res.nearest_index), near_i[:, 0])
  np.testing.assert_allclose(np.asarray(res.nearest_sq_dist), near_d[:, 0], rtol=1e-4, atol=1e-4)


def _tuple_aux(query_aux, bank_aux):
  (lo, hi), ids = query_aux, bank_aux
  return (ids[None, :] >= lo[:, None]) & (ids[None, :] < hi[:, None])


def test_masked_min_dist_pytree_aux_and_vmap(data):
  q, b = data
  rng = np.random.default_rng(4)
  lo = rng.integers(0, K, size=M).astype(np.int32)
  hi = lo + rng.integers(0, 60, size=M).astype(np.int32)
  ids = np.arange(K, dtype=np.int32)
  fn = lambda qq: knn_lib.masked_min_dist(qq, b, (lo, hi), ids, _tuple_aux,
                                          query_tile=TQ, bank_tile=TK)
  res = jax.vmap(fn)(np.stack([q, q[::-1]]))
  full = brute_sq(q, b)
  mask = (ids[None] >= lo[:, None]) & (ids[None] < hi[:, None])
  masked = np.where(mask, full, np.inf)
  ref_i = np.where(mask.any(1), np.argmin(masked, axis=1), -1)
  np.testing.assert_array_equal(np.asarray(res.index[0]), ref_i)
  assert np.all(np.asarray(res.index[0])[hi == lo] == -1)


def test_masked_min_dist_errors(data):
  q, b = data
  with pytest.raises(ValueError, match='leading axis'):
    knn_lib.masked_min_dist(q, b, jnp.zeros((M + 1, 3), bool), jnp.zeros((K,), jnp.int32),
                            allowed_from_probs, query_tile=TQ, bank_tile=TK)
  with pytest.raises(ValueError, match='allowed\\(\\) must return'):
    knn_lib.masked_min_dist(q, b, jnp.zeros((M, 3), bool), jnp.zeros((K,), jnp.int32),
                            _wrong_shape, query_tile=TQ, bank_tile=TK)


@pytest.mark.parametrize('query_tile,bank_tile', [(TQ, TK), (64, 4096), (1024, 300)])
def test_masked_min_sq_is_masked_min_dist_bit_for_bit(data, query_tile, bank_tile):
  """The min-only search returns masked_min_dist's sq_dist exactly (same tiles and dots; shifted
  last tiles, a single-tile bank padded to 128 rows, rows with nothing allowed -> +inf), also
  under vmap."""
  q, b = data
  rng = np.random.default_rng(5)
  k_dist = 23
  emb_to_dist = rng.integers(0, k_dist, size=K).astype(np.int32)
  allowed_dist = rng.random((M, k_dist)) < 0.15
  allowed_dist[:5] = False
  args = (jnp.asarray(allowed_dist), jnp.asarray(emb_to_dist), allowed_from_probs)
  tiles = dict(query_tile=query_tile, bank_tile=bank_tile)
  want = np.asarray(knn_lib.masked_min_dist(q, b, *args, **tiles).sq_dist)
  got = np.asarray(knn_lib.masked_min_sq(q, b, *args, **tiles))
  assert got.shape == (M,) and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  assert np.all(np.isinf(got[:5])) and np.isfinite(got[5:]).mean() > 0.9
  masked = np.where(allowed_dist[:, emb_to_dist], brute_sq(q, b), np.inf)
  np.testing.assert_allclose(got, masked.min(1), rtol=1e-4, atol=1e-4)
  two = np.stack([q, q[::-1]])              # vmapped, the dots batch: compare vmapped with vmapped
  pair = jax.vmap(lambda qq: knn_lib.masked_min_sq(qq, b, *args, **tiles))(two)
  pair_want = jax.vmap(lambda qq: knn_lib.masked_min_dist(qq, b, *args, **tiles).sq_dist)(two)
  np.testing.assert_array_equal(np.asarray(pair), np.asarray(pair_want))
  np.testing.assert_allclose(np.asarray(pair[0]), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='allowed\\(\\) must return'):
    knn_lib.masked_min_sq(q, b, jnp.zeros((M, 3), bool), jnp.zeros((K,), jnp.int32),
                          _wrong_shape, query_tile=TQ, bank_tile=TK)


def _wrong_shape(query_aux, bank_aux):
  return query_aux  # [tq, 3], not [tq, tk]


def test_knn_sharded_equals_brute_force(data):
  """Queries split over the mesh (one device here; 4 in tests/test_sharding.py), bank replicated;
  299 queries exercise the padding to a multiple of the device count."""
  q, b = data
  mask = np.arange(K) % 3 != 0
  d, i = knn_lib.knn_sharded(q[:299], b, 3, query_tile=TQ, bank_tile=TK, bank_mask=mask)
  ref_d, ref_i = brute_knn(q[:299], b, 3, mask)
  assert d.shape == (299, 3) and i.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(i), ref_i)
  np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='same feature size'):
    knn_lib.knn_sharded(q, b[:, :5])


@pytest.mark.parametrize('rows', [300, 517, 1000])
def test_nearest_sq_dist_and_unaligned_single_tile_banks(rows):
  """A bank of one tile that is not a multiple of 128 rows is padded internally (blocked argmin);
  results stay the brute-force ones, ties to the lowest index, padding rows never returned."""
  rng = np.random.default_rng(rows)
  q = rng.normal(size=(77, 6)).astype(np.float32)
  bank = rng.normal(size=(rows, 6)).astype(np.float32)
  bank[rows - 1] = bank[3]                                   # a tie: index 3 must win
  q[0] = bank[3]
  full = ((q[:, None] - bank[None]) ** 2).sum(-1)
  d, i = knn_lib.knn(jnp.asarray(q), jnp.asarray(bank), 1, query_tile=32, bank_tile=4096)
  np.testing.assert_array_equal(np.asarray(i[:, 0]), full.argmin(-1))
  np.testing.assert_allclose(np.asarray(d[:, 0]), full.min(-1), rtol=1e-5, atol=1e-5)
  only = knn_lib.nearest_sq_dist(jnp.asarray(q), jnp.asarray(bank), query_tile=32, bank_tile=128)
  np.testing.assert_allclose(np.asarray(only), full.min(-1), rtol=1e-5, atol=1e-5)
  allowed = rng.random((77, rows)) < 0.3
  res = knn_lib.masked_min_dist(jnp.asarray(q), jnp.asarray(bank), jnp.asarray(allowed),
                                jnp.arange(rows), _allowed_rows, query_tile=32, bank_tile=4096)
  masked = np.where(allowed, full, np.inf)
  np.testing.assert_array_equal(np.asarray(res.index), masked.argmin(-1))
  np.testing.assert_array_equal(np.asarray(res.nearest_index), full.argmin(-1))


def _allowed_rows(allowed_tile, rows_tile):
  return jnp.take(allowed_tile, rows_tile, axis=1)


def test_row_argmin_unaligned_width_is_first_minimum():
  dist = jnp.asarray([[3.0, 1.0, 1.0, 2.0, 5.0], [jnp.inf] * 5, [0.0, 0.0, 0.0, 0.0, 0.0]])
  d, j = knn_lib.row_argmin(dist)
  np.testing.assert_array_equal(np.asarray(j), np.argmin(np.asarray(dist), axis=1))  # [1, 0, 0]
  np.testing.assert_array_equal(np.asarray(d), [1.0, np.inf, 0.0])
