"""Position model (Algorithm 1) against a brute-force loop over images, positions and windows."""

import jax.numpy as jnp
import numpy as np
import pytest

from pni_jax import position


def brute_force_histogram(index_maps: np.ndarray, num_classes: int, window: int) -> np.ndarray:
  """Algorithm 1 as written: every (image, x) adds 1 to hist[x', k] for x' in the clipped window."""
  num, height, width = index_maps.shape
  r = window // 2
  hist = np.zeros((height, width, num_classes), np.float64)
  for i in range(num):
    for h in range(height):
      for w in range(width):
        k = index_maps[i, h, w]
        for hh in range(max(0, h - r), min(height, h + r + 1)):
          for ww in range(max(0, w - r), min(width, w + r + 1)):
            hist[hh, ww, k] += 1
  return hist / hist.sum(-1, keepdims=True)


@pytest.mark.parametrize('shape, num_classes, window', [
    ((5, 6, 6), 4, 3),
    ((4, 5, 8), 7, 3),        # H != W
    ((3, 7, 4), 5, 5),        # window wider than the map along W
    ((3, 4, 6), 6, 9),        # window larger than the map in both directions
    ((2, 3, 5), 3, 1),        # no spread
])
def test_histogram_matches_brute_force(shape, num_classes, window):
  rng = np.random.default_rng(sum(shape) + window)
  maps = rng.integers(0, num_classes, size=shape).astype(np.int32)
  got = np.asarray(position.position_histogram(maps, num_classes, window, batch=2))
  want = brute_force_histogram(maps, num_classes, window)
  assert got.shape == (shape[1], shape[2], num_classes)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)


def test_streamed_counts_equal_one_shot_and_ignore_padding():
  rng = np.random.default_rng(0)
  maps = rng.integers(0, 6, size=(7, 5, 4)).astype(np.int32)
  counts = position.init_counts(5, 4, 6)
  for start in range(0, 7, 3):                      # batches of 3, 3, 1
    counts = position.accumulate_counts(counts, jnp.asarray(maps[start:start + 3]))
  want = np.zeros((5, 4, 6))
  for i in range(7):
    for h in range(5):
      for w in range(4):
        want[h, w, maps[i, h, w]] += 1
  np.testing.assert_array_equal(np.asarray(counts), want)
  padded = np.concatenate([maps[:2], np.full((2, 5, 4), -1, np.int32)])
  only_two = position.accumulate_counts(position.init_counts(5, 4, 6), jnp.asarray(padded))
  assert float(only_two.sum()) == 2 * 5 * 4
  # A window of 1 gives the raw per-position frequencies.
  prior = np.asarray(position.position_prior(counts, 1))
  np.testing.assert_allclose(prior, want / 7.0, rtol=1e-6)


def test_prior_of_empty_counts_is_uniform():
  prior = np.asarray(position.position_prior(position.init_counts(2, 3, 4), 3))
  np.testing.assert_allclose(prior, 0.25)


def test_bad_arguments():
  counts = position.init_counts(4, 4, 3)
  with pytest.raises(ValueError, match='odd'):
    position.position_prior(counts, 4)
  with pytest.raises(ValueError, match='odd'):
    position.position_histogram(np.zeros((1, 4, 4), np.int32), 3, 0)
  with pytest.raises(ValueError, match=r'\[B, H, W\]'):
    position.accumulate_counts(counts, jnp.zeros((2, 4, 5), jnp.int32))
  with pytest.raises(ValueError, match='non-empty'):
    position.position_histogram(np.zeros((0, 4, 4), np.int32), 3, 3)
  with pytest.raises(ValueError, match='smoothing must be >= 0'):
    position.position_prior(counts, 3, smoothing=-1.0)
  with pytest.raises(ValueError, match='N >= 2'):
    position.choose_smoothing(np.zeros((1, 4, 4), np.int32), 3, 3)


def _brute_counts(index_maps, num_classes, window):
  """Window-spread counts (unnormalised `brute_force_histogram`)."""
  num, height, width = index_maps.shape
  r = window // 2
  hist = np.zeros((height, width, num_classes))
  for img in index_maps:
    for h in range(height):
      for w in range(width):
        hist[max(0, h - r):h + r + 1, max(0, w - r):w + r + 1, img[h, w]] += 1
  return hist


def test_smoothing_adds_pseudo_counts_as_the_code_shares():
  rng = np.random.default_rng(3)
  maps = rng.integers(0, 5, size=(4, 5, 6))
  hist = _brute_counts(maps, 5, 3)
  share = hist.sum((0, 1)) / hist.sum()
  got = np.asarray(position.position_histogram(maps, 5, 3, batch=3, smoothing=0.7))
  want = (hist + 0.7 * 5 * share) / (hist.sum(-1, keepdims=True) + 0.7 * 5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)


def test_choose_smoothing_is_the_leave_one_image_out_likelihood():
  rng = np.random.default_rng(4)
  num, k, window = 5, 4, 3
  maps = rng.integers(0, k, size=(num, 4, 5))
  maps[:, :2] = rng.integers(0, 2, size=(num, 2, 5))     # the top rows use codes 0 and 1 only
  grid = (0.01, 0.1, 1.0, 10.0)
  s, table = position.choose_smoothing(maps, k, window, batch=2, grid=grid)
  share = _brute_counts(maps, k, window).sum((0, 1))
  share = share / share.sum()
  for value, nll in zip(table['grid'], table['nll']):
    total = 0.0
    for i in range(num):
      hist = _brute_counts(np.delete(maps, i, 0), k, window)
      p = (hist + value * k * share) / (hist.sum(-1, keepdims=True) + value * k)
      with np.errstate(divide='ignore'):
        total += np.log(np.take_along_axis(p, maps[i][..., None], -1)).sum()
    assert nll == pytest.approx(-total / maps.size, rel=1e-4), value
  assert table['grid'] == [0.0, *grid] and s == table['grid'][int(np.argmin(table['nll']))]


def test_choose_smoothing_is_small_for_parts_and_large_for_a_texture():
  """Codes fixed by position in every image (an object's parts) are predicted best by the raw
  histograms; codes drawn anew in every image (a texture) by histograms pulled to the shares."""
  rng = np.random.default_rng(5)
  parts = np.broadcast_to(rng.integers(0, 64, size=(12, 12)), (20, 12, 12)).copy()
  parts[rng.random(parts.shape) < 0.05] = 7                     # a little noise
  texture = rng.integers(0, 64, size=(20, 12, 12))
  s_parts, _ = position.choose_smoothing(parts, 64, 3)
  s_texture, _ = position.choose_smoothing(texture, 64, 3)
  assert s_parts <= 0.01 and s_texture >= 1.0, (s_parts, s_texture)
