"""Batched metrics of hyper-parameter grids: numpy (`grid_metrics`) and jnp (`evaluate_jnp`)
against the exact streaming `metrics.evaluate`."""

import jax
import numpy as np
import pytest

from pni_jax import metrics


def _case(seed=0, g=5, n=7, h=18, w=22):
  rng = np.random.default_rng(seed)
  masks = np.zeros((n, h, w), np.uint8)
  masks[1, 3:7, 4:9] = 1
  masks[2, 10:15, 2:5] = 1
  masks[2, 1:3, 18:21] = 1                  # two regions in one image
  masks[4, 5:17, 10:12] = 1
  masks[5, 0:2, 0:2] = 1
  labels = masks.reshape(n, -1).any(1).astype(np.int32)
  maps = rng.normal(size=(g, n, h, w)) + masks * rng.uniform(0, 2, size=(g, 1, 1, 1))
  maps = (np.round(maps * 4) / 4).astype(np.float32)       # many ties, crossings inside ties
  scores = maps.reshape(g, n, -1).max(-1)
  return maps, scores, masks, labels


KEYS = ('image_auroc', 'image_f1_max', 'pixel_auroc', 'aupro', 'pixel_f1_max', 'pixel_threshold')


@pytest.mark.parametrize('max_fpr', [0.3, 0.05, 1.0])
def test_grid_metrics_equal_evaluate_per_point(max_fpr):
  maps, scores, masks, labels = _case()
  got = metrics.grid_metrics(scores, maps, metrics.ground_truth(masks, labels), max_fpr=max_fpr)
  for g in range(maps.shape[0]):
    want = metrics.evaluate(scores[g], labels, maps[g], masks, max_fpr=max_fpr)
    for k in KEYS:
      assert got[k][g] == pytest.approx(want[k], abs=1e-12), (g, k)


def test_evaluate_jnp_vmapped_equals_evaluate():
  maps, scores, masks, labels = _case(seed=1)
  weights, count = metrics.region_weight_map(masks)
  fn = jax.jit(jax.vmap(lambda s, m: metrics.evaluate_jnp(s, labels, m, masks, weights, count)))
  got = fn(scores, maps)
  for g in range(maps.shape[0]):
    want = metrics.evaluate(scores[g], labels, maps[g], masks)
    for k in KEYS:
      assert float(got[k][g]) == pytest.approx(want[k], abs=2e-6), (g, k)


def test_grid_metrics_errors_and_missing_classes():
  maps, scores, masks, labels = _case(seed=2, g=2)
  truth = metrics.ground_truth(masks, labels)
  with pytest.raises(ValueError, match=r'maps must be \[G'):
    metrics.grid_metrics(scores, maps[:, :3], truth)
  bad = maps.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    metrics.grid_metrics(scores, bad, truth)
  empty = metrics.ground_truth(np.zeros_like(masks), np.zeros_like(labels))
  out = metrics.grid_metrics(scores, maps, empty)
  assert np.isnan(out['pixel_auroc']).all() and np.isnan(out['image_auroc']).all()
