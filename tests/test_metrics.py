"""Metrics against scikit-learn and brute-force references (small arrays, tiny chunk sizes)."""

import bisect
import logging
import math

import numpy as np
import pytest
from skimage import measure
from sklearn import metrics as skm

from pni_jax import metrics

# ----------------------------------------------------------------------------- references


def brute_f1(scores, labels):
  """Best F1 and the largest threshold reaching it, over every distinct score (score >= t)."""
  best, best_t = -1.0, math.nan
  num_pos = labels.sum()
  for t in np.unique(scores)[::-1]:
    pred = scores >= t
    tp = np.sum(pred & labels)
    fp = np.sum(pred & ~labels)
    f1 = 2.0 * tp / (tp + fp + num_pos)
    if f1 > best:
      best, best_t = f1, t
  return best, best_t


def brute_aupro(maps, masks, max_fpr):
  """Per-region PRO at every distinct threshold, trapezoid up to max_fpr (MVTec AD style)."""
  regions = []
  for m, gt in zip(maps, masks):
    lab = measure.label(gt, connectivity=2)  # 8-connectivity
    regions += [m[lab == k] for k in range(1, lab.max() + 1)]
  normal = maps[~masks]
  thresholds = np.unique(maps)[::-1]                  # every distinct score, descending
  fprs = np.mean(normal[:, None] >= thresholds, axis=0)
  pros = np.mean([np.mean(r[:, None] >= thresholds, axis=0) for r in regions], axis=0)
  x = np.concatenate([[0.0], fprs, [1.0]])
  y = np.concatenate([[0.0], pros, [1.0]])
  correction = 0.0
  if max_fpr not in x:
    ins = bisect.bisect(x, max_fpr)
    y_cut = y[ins - 1] + (y[ins] - y[ins - 1]) * (max_fpr - x[ins - 1]) / (x[ins] - x[ins - 1])
    correction = 0.5 * (y_cut + y[ins - 1]) * (max_fpr - x[ins - 1])
  keep = x <= max_fpr
  x, y = x[keep], y[keep]
  return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / max_fpr, len(regions)


# ----------------------------------------------------------------------------- data


def hand_made_set(seed=0):
  """6 images 24 x 28: one large region, several small ones (two touching only diagonally), normal
  images; scores mix continuous values, heavy ties and negatives."""
  rng = np.random.default_rng(seed)
  n, h, w = 6, 24, 28
  masks = np.zeros((n, h, w), bool)
  masks[0, 3:17, 5:21] = True                 # one large region (14 x 16)
  masks[0, 19, 2] = True                      # a single pixel
  masks[1, 2:4, 2:4] = True                   # 2 x 2
  masks[1, 10, 10] = masks[1, 11, 11] = True  # diagonal neighbours: one 8-connected region
  masks[1, 20:23, 15:26] = True               # a thin bar
  masks[2, 5, 20:23] = True
  masks[2, 15:19, 3] = True
  # images 3..5 are normal.
  maps = rng.normal(0.0, 1.0, (n, h, w)).astype(np.float32)
  maps[masks] += rng.uniform(0.0, 2.5, int(masks.sum())).astype(np.float32)
  ties = rng.random((n, h, w)) < 0.35
  maps[ties] = np.round(maps[ties], 1)        # many exact ties
  maps[4, :, :10] = 0.0                       # one heavily populated score (dense bucket)
  maps[5, 3:6] = -0.0                         # -0.0 ties with +0.0
  maps[1, 2:4, 2:4] = 0.0                     # a region tied with normal pixels
  return maps, masks


@pytest.fixture(scope='module')
def pixel_set():
  return hand_made_set()


CHUNKS = (37, 700, 10**7)

# ----------------------------------------------------------------------------- keys


def test_float_keys_preserve_order_and_invert():
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(0, 1e3, 500), [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40,
                                                 np.finfo(np.float32).max]]).astype(np.float32)
  keys = metrics.float_keys(x)
  assert keys.dtype == np.uint32
  i, j = np.triu_indices(len(x), 1)
  np.testing.assert_array_equal(keys[i] < keys[j], x[i] < x[j])
  np.testing.assert_array_equal(keys[i] == keys[j], x[i] == x[j])
  np.testing.assert_array_equal(metrics.key_values(keys), x + np.float32(0))


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize('seed', range(4))
def test_auroc_equals_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 200
  labels = rng.random(n) < 0.3
  scores = rng.normal(size=n) + labels
  scores[: n // 2] = np.round(scores[: n // 2], 1)
  np.testing.assert_allclose(metrics.auroc(scores, labels), skm.roc_auc_score(labels, scores),
                             rtol=1e-12)
  assert metrics.auroc(np.zeros(n), labels) == 0.5  # all tied


def test_f1_max_equals_brute_force_sweep():
  rng = np.random.default_rng(5)
  for _ in range(5):
    labels = rng.random(150) < 0.4
    scores = np.round(rng.normal(size=150) + 1.2 * labels, 1)
    f1, t = metrics.f1_max(scores, labels.astype(np.uint8))
    ref_f1, ref_t = brute_f1(scores, labels)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert t == ref_t


def test_fpr_fnr_counts_at_threshold():
  scores = np.array([0.1, 0.4, 0.4, 0.7, 0.9, 0.2])
  labels = np.array([0, 0, 1, 1, 1, 0])
  fpr, fnr = metrics.fpr_fnr(scores, labels, 0.4)  # predicted: 0.4, 0.4, 0.7, 0.9
  assert fpr == pytest.approx(1 / 3)
  assert fnr == 0.0
  fpr, fnr = metrics.fpr_fnr(scores, labels, 0.8)
  assert (fpr, fnr) == (0.0, pytest.approx(2 / 3))


def test_single_class_gives_nan_and_warns(caplog):
  with caplog.at_level(logging.WARNING):
    assert math.isnan(metrics.auroc([0.1, 0.5, 0.3], [0, 0, 0]))
  assert 'AUROC undefined' in caplog.text
  assert all(math.isnan(v) for v in metrics.f1_max([0.1, 0.5], [0, 0]))
  assert metrics.f1_max([0.1, 0.5], [1, 1]) == (1.0, 0.1)
  fpr, fnr = metrics.fpr_fnr([0.1, 0.5], [1, 1], 0.3)
  assert math.isnan(fpr) and fnr == 0.5


def test_image_input_errors():
  with pytest.raises(ValueError, match='binary'):
    metrics.auroc([0.1, 0.2], [0, 2])
  with pytest.raises(ValueError, match='NaN'):
    metrics.auroc([0.1, np.nan], [0, 1])
  with pytest.raises(ValueError, match=r'\[N\]'):
    metrics.auroc([0.1, 0.2, 0.3], [0, 1])


# ----------------------------------------------------------------------------- pixel level


def test_both_resolve_paths_are_exercised(pixel_set):
  maps, masks = pixel_set
  census = metrics._census(maps, masks, 37, count_regions=False)
  groups = metrics._plan_groups(census.anomalous + census.normal, 37)
  kinds = {dense for dense, _, _ in groups}
  assert kinds == {True, False}
  # Groups cover every non-empty bucket once, highest first, each within capacity or dense.
  counts = census.anomalous + census.normal
  covered = np.concatenate([np.arange(lo, hi + 1) for _, lo, hi in groups])
  assert np.all(np.diff([hi for _, _, hi in groups]) < 0)
  np.testing.assert_array_equal(np.sort(covered[counts[covered] > 0]), np.flatnonzero(counts))
  for dense, lo, hi in groups:
    assert dense or counts[lo:hi + 1].sum() <= 37


def test_sweep_is_independent_of_block_size(pixel_set):
  maps, masks = pixel_set
  census = metrics._census(maps, masks, 37, count_regions=True)
  args = (int(census.anomalous.sum()), int(census.normal.sum()), census.num_regions, 0.3, 50,
          np.linspace(-4, 6, 9))
  results = [metrics._sweep(metrics._pixel_blocks(maps, masks, census, 37, True, block_size=b),
                            *args) for b in (3, 1 << 16)]
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize('chunk_pixels', CHUNKS)
def test_pixel_auroc_equals_sklearn(pixel_set, chunk_pixels):
  maps, masks = pixel_set
  ref = skm.roc_auc_score(masks.ravel(), maps.ravel().astype(np.float64))
  got = metrics.pixel_auroc(maps, masks.astype(np.uint8), chunk_pixels=chunk_pixels)
  np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_pixel_metrics_read_memmaps(pixel_set, tmp_path):
  maps, masks = pixel_set
  mm = np.lib.format.open_memmap(tmp_path / 'maps.npy', 'w+', np.float32, maps.shape)
  mm[:] = maps
  mm.flush()
  ro = np.load(tmp_path / 'maps.npy', mmap_mode='r')
  ref = metrics.pixel_stats(maps, masks, chunk_pixels=10**7)
  got = metrics.pixel_stats(ro, masks, chunk_pixels=700)
  assert got.auroc == pytest.approx(ref.auroc, abs=1e-15)
  assert got.aupro == pytest.approx(ref.aupro, abs=1e-12)
  assert (got.f1_max, got.threshold) == (ref.f1_max, ref.threshold)


@pytest.mark.parametrize('max_fpr', (0.3, 0.05, 1.0))
def test_aupro_equals_brute_force(pixel_set, max_fpr):
  maps, masks = pixel_set
  ref, num_regions = brute_aupro(maps, masks, max_fpr)
  assert num_regions == 7  # the diagonal pair is one region under 8-connectivity
  for chunk_pixels in CHUNKS:
    stats = metrics.pixel_stats(maps, masks, max_fpr=max_fpr, chunk_pixels=chunk_pixels)
    assert stats.num_regions == num_regions
    assert stats.aupro == pytest.approx(ref, abs=1e-9)


def test_aupro_of_perfect_and_inverted_maps(pixel_set):
  _, masks = pixel_set
  perfect = masks.astype(np.float32)
  assert metrics.aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
  assert metrics.aupro(-perfect, masks, chunk_pixels=50) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('chunk_pixels', CHUNKS)
def test_pixel_f1_max_equals_brute_force(pixel_set, chunk_pixels):
  maps, masks = pixel_set
  ref_f1, ref_t = brute_f1(maps.ravel().astype(np.float64), masks.ravel())
  f1, t = metrics.pixel_f1_max(maps, masks, chunk_pixels=chunk_pixels)
  assert f1 == pytest.approx(ref_f1, abs=1e-12)
  assert t == ref_t


def test_pixel_pr_curve_points_lie_on_exact_curve(pixel_set):
  maps, masks = pixel_set
  scores, labels = maps.ravel().astype(np.float64), masks.ravel()
  for max_points in (5, 40, 1000):
    precision, recall, thresholds = metrics.pixel_pr_curve(maps, masks, max_points=max_points,
                                                           chunk_pixels=37)
    assert 2 <= len(recall) <= max_points
    assert np.all(np.diff(thresholds) < 0) and np.all(np.diff(recall) >= 0)
    assert thresholds[0] == scores.max() and thresholds[-1] == scores.min()
    assert recall[-1] == 1.0
    for p, r, t in zip(precision, recall, thresholds):
      pred = scores >= t
      assert p == pytest.approx(np.sum(pred & labels) / np.sum(pred), abs=1e-12)
      assert r == pytest.approx(np.sum(pred & labels) / np.sum(labels), abs=1e-12)
  # With enough points: the first threshold reaching each distinct recall, plus the last point.
  thresholds = np.unique(scores)[::-1]
  tp = np.array([np.sum(labels & (scores >= t)) for t in thresholds])
  expected = len(np.unique(tp)) + int(tp[-2] == tp[-1])
  assert len(metrics.pixel_pr_curve(maps, masks, max_points=10**6)[0]) == expected


def test_pixel_histograms_equal_numpy(pixel_set):
  maps, masks = pixel_set
  hist = metrics.pixel_score_histograms(maps, masks, bins=17, chunk_pixels=37)
  edges = np.histogram_bin_edges(maps.astype(np.float64), bins=17)
  np.testing.assert_allclose(hist['edges'], edges, rtol=1e-12)
  np.testing.assert_array_equal(hist['normal'], np.histogram(maps[~masks], bins=hist['edges'])[0])
  np.testing.assert_array_equal(hist['anomalous'],
                                np.histogram(maps[masks], bins=hist['edges'])[0])
  hist = metrics.pixel_score_histograms(maps, masks, bins=4, value_range=(-1.0, 1.0))
  assert hist['normal'].sum() == np.sum((maps[~masks] >= -1) & (maps[~masks] <= 1))


def test_evaluate_keys_and_values(pixel_set):
  maps, masks = pixel_set
  rng = np.random.default_rng(3)
  labels = masks.reshape(len(masks), -1).any(1)
  image_scores = maps.reshape(len(maps), -1).max(1) + rng.normal(0, 0.5, len(maps))
  got = metrics.evaluate(image_scores, labels, maps, masks, chunk_pixels=100)
  assert list(got) == list(metrics.METRIC_KEYS)
  assert all(isinstance(v, float) for v in got.values())
  assert got['image_auroc'] == pytest.approx(skm.roc_auc_score(labels, image_scores))
  assert got['pixel_auroc'] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()))
  assert got['aupro'] == pytest.approx(brute_aupro(maps, masks, 0.3)[0], abs=1e-9)
  assert (got['image_f1_max'], got['image_threshold']) == metrics.f1_max(image_scores, labels)
  assert (got['fpr'], got['fnr']) == metrics.fpr_fnr(image_scores, labels,
                                                     got['image_threshold'])
  metrics_, curves = metrics.evaluate_with_curves(image_scores, labels, maps, masks,
                                                  pr_points=50, hist_bins=10)
  assert metrics_ == pytest.approx(got, abs=1e-12)
  assert len(curves['pr']['recall']) <= 50 and curves['hist']['normal'].sum() == np.sum(~masks)
  assert curves['hist']['anomalous'].sum() == np.sum(masks) and len(curves['hist']['edges']) == 11


def test_evaluate_single_class_pixels_and_images(caplog):
  maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
  masks = np.zeros((3, 8, 8), bool)
  with caplog.at_level(logging.WARNING):
    got = metrics.evaluate([0.1, 0.2, 0.3], [0, 0, 0], maps, masks)
  assert 'no anomalous pixel' in caplog.text
  assert all(math.isnan(got[key]) for key in metrics.METRIC_KEYS), got
  got = metrics.evaluate([0.1, 0.2, 0.3], [1, 1, 1], maps, np.ones_like(masks))
  assert math.isnan(got['pixel_auroc']) and math.isnan(got['aupro'])
  assert got['pixel_f1_max'] == 1.0 and got['image_f1_max'] == 1.0 and got['fnr'] == 0.0


def test_pixel_input_errors(pixel_set):
  maps, masks = pixel_set
  with pytest.raises(ValueError, match='differ in shape'):
    metrics.pixel_auroc(maps, masks[:, :-1])
  with pytest.raises(ValueError, match=r'\[N, H, W\]'):
    metrics.pixel_auroc(maps[..., None], masks[..., None])
  bad = maps.copy()
  bad[2, 3, 4] = np.nan
  with pytest.raises(ValueError, match='1 NaN'):
    metrics.aupro(bad, masks)
  with pytest.raises(ValueError, match='max_fpr'):
    metrics.aupro(maps, masks, max_fpr=0.0)
  with pytest.raises(ValueError, match='image scores'):
    metrics.evaluate(np.zeros(2), [0, 1], maps, masks)
