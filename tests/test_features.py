"""Patch features: torch-semantics pooling, unfold order, PatchCore's resize-then-pool order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pni_jax import features


def _torch_adaptive_pool_1d(x, out):
  """Direct transcription of torch's adaptive_avg_pool1d bin rule, looped."""
  length = x.shape[-1]
  res = np.zeros(x.shape[:-1] + (out,), np.float64)
  for i in range(out):
    start = (i * length) // out
    end = -(-((i + 1) * length) // out)
    res[..., i] = x[..., start:end].mean(-1)
  return res


@pytest.mark.parametrize('length,out', [(12, 12), (12, 4), (360, 256), (1008, 256), (7, 5),
                                        (5, 7)])
def test_adaptive_avg_pool_matches_torch_rule(length, out):
  x = np.random.default_rng(0).normal(size=(3, length)).astype(np.float32)
  got = np.asarray(features.adaptive_avg_pool(jnp.asarray(x), out))
  np.testing.assert_allclose(got, _torch_adaptive_pool_1d(x, out), rtol=1e-5, atol=1e-6)


def test_local_patches_is_channel_major_unfold_with_zero_padding():
  rng = np.random.default_rng(1)
  fmap = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  p, r = 3, 1
  got = np.asarray(features.local_patches(jnp.asarray(fmap), p))
  padded = np.pad(fmap, ((0, 0), (r, r), (r, r), (0, 0)))
  want = np.zeros((2, 5, 6, 3 * p * p), np.float32)
  for y in range(5):
    for x in range(6):
      win = padded[:, y:y + p, x:x + p, :]            # [B, p, p, c]
      want[:, y, x] = np.transpose(win, (0, 3, 1, 2)).reshape(2, -1)   # (c, dy, dx)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match='aggregation_size'):
    features.local_patches(jnp.asarray(fmap), 4)


@pytest.mark.parametrize('dense', [True, False])
@pytest.mark.parametrize('p,pre_dim,dim', [(3, 16, 12), (3, 16, 13), (1, 7, 5), (5, 64, 32)])
def test_patch_features_equal_patchcore_resize_then_pool_order(dense, p, pre_dim, dim):
  """Pooling at native resolution then resizing == PatchCore's resize of unfolded patches, for
  the gathered bins and the folded convolutions alike (dim 13 and 5: final bins that straddle
  the two stages; p = 1: no neighbourhood)."""
  rng = np.random.default_rng(2)
  l2 = jnp.asarray(rng.normal(size=(2, 8, 8, 6)).astype(np.float32))
  l3 = jnp.asarray(rng.normal(size=(2, 4, 4, 10)).astype(np.float32))
  got = features.patch_features({'layer2': l2, 'layer3': l3}, ('layer2', 'layer3'), p, pre_dim,
                                dim, dense=dense)
  assert got.shape == (2, 8, 8, dim)

  # PatchCore order: unfold each layer, bilinearly resize the coarse unfolded map, then pool.
  u2 = features.local_patches(l2, p)
  u3 = features.local_patches(l3, p)
  u3 = jax.image.resize(u3, (2, 8, 8, u3.shape[-1]), 'bilinear', antialias=False)
  pooled = [_torch_adaptive_pool_1d(np.asarray(u, np.float64), pre_dim) for u in (u2, u3)]
  want = _torch_adaptive_pool_1d(np.concatenate(pooled, -1), dim)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_patch_features_picks_the_folded_convolutions_by_their_size():
  # The demo's Lite0 stages (40 and 112 channels, p 3, 256 -> 128) fold into convolutions of
  # 87,552 multiply-adds per position; the paper's WideResNet stages (512 and 1024, 1024 ->
  # 1024) would need 7.1 M and keep the gathered bins; both give the same features.
  assert features.dense_aggregation_macs([40, 112], 3, 256, 128) == 9 * 40 * 64 + 9 * 112 * 64
  assert features.dense_aggregation_macs([512, 1024], 3, 1024, 1024) == 9 * (512 + 1024) * 512
  assert (features.dense_aggregation_macs([40, 112], 3, 256, 128)
          <= features.DENSE_AGGREGATION_MACS
          < features.dense_aggregation_macs([512, 1024], 3, 1024, 1024))
  rng = np.random.default_rng(5)
  taps = {'layer2': jnp.asarray(rng.normal(size=(1, 8, 8, 40)), jnp.float32),
          'layer3': jnp.asarray(rng.normal(size=(1, 4, 4, 112)), jnp.float32)}
  auto = features.patch_features(taps, ('layer2', 'layer3'), 3, 256, 128)
  bins = features.patch_features(taps, ('layer2', 'layer3'), 3, 256, 128, dense=False)
  np.testing.assert_allclose(np.asarray(auto), np.asarray(bins), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('stages,pre_dim,dim', [(2, 16, 12), (2, 16, 13), (3, 10, 7), (2, 7, 5),
                                                (2, 256, 128), (1, 8, 8)])
def test_stage_columns_are_the_columns_the_pooling_matrix_reaches(stages, pre_dim, dim):
  final = features._pool_matrix(stages * pre_dim, dim)
  for j, (a, b) in enumerate(features._stage_columns(stages, pre_dim, dim)):
    hit = np.flatnonzero(final[j * pre_dim:(j + 1) * pre_dim].sum(0))
    assert (a, b) == (hit[0], hit[-1] + 1)
    assert len(hit) == b - a                     # contiguous
