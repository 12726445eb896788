"""bfloat16 compute (backbone + MLP; float32 accumulation and float32 distances) against float32.

A small generated set ('weave' at 128 px: 12 training images, 6 good + 10 defective test images)
with the demo backbone (pretrained EfficientNet-Lite0), scored with PNI N + P:
  * inference only: one float32 fit, test features and MLP priors in bfloat16 vs float32;
  * everything: features, coreset, MLP training and inference in bfloat16 vs all float32.
Bounds are the measured changes (2 CPU cores) with a margin; see the asserts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from pni_jax import coreset
from pni_jax import features
from pni_jax import fit
from pni_jax import metrics
from pni_jax import neighborhood as nb
from pni_jax import position as position_lib
from pni_jax import scoring
from pni_jax.data import generated
from pni_jax.store import FeatureStore

SIZE = 128
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _config():
  m = demo.get_config().model
  m.coreset.ratio, m.coreset.dist_size = 0.1, 64
  m.neighborhood.width, m.neighborhood.epochs, m.neighborhood.batch_size = 128, 3, 128
  # The rule the figures below were measured with (a threshold that flips few codes when bf16
  # moves a prior a little), whatever the demo's default rule is.
  m.scoring.combine, m.scoring.rho = 'relative_score', 0.01
  return m


@pytest.fixture(scope='module')
def data():
  samples = list(generated.category_samples('weave', seed=0, image_size=SIZE, num_train=12,
                                            num_test_good=6, num_test_defect=10))
  train = np.stack([s.image for path, s, _ in samples if path.startswith('train')])
  test = [s for path, s, _ in samples if path.startswith('test')]
  return (train.astype(np.float32) / 255, np.stack([s.image for s in test]).astype(np.float32) / 255,
          np.array([s.mask.any() for s in test], np.int32), np.stack([s.mask for s in test]))


def _feature_fn(cfg, precision):
  cfg = cfg.copy_and_resolve_references()
  cfg.precision = precision
  return features.make_feature_fn(cfg)


def _fit(cfg, train, precision):
  fn, variables = _feature_fn(cfg, precision)
  n = train.shape[0]
  h = SIZE // 8
  key = jax.random.key(0)
  with FeatureStore((n, h, h, cfg.dim), cap_bytes=1 << 30) as store:
    proj = coreset.random_projection(key, cfg.dim, int(cfg.coreset.projection_dim))
    projected = fit.extract_features(fn, variables, [{'image': train[i:i + 8]}
                                                     for i in range(0, n, 8)], n, 8, store, proj)
    core = fit.select_coreset(projected, store, cfg.coreset, jax.random.key(1))
    k = core['num_dist']
    codes = fit.nearest_codes(store, core['c_emb'][:k], images_per_chunk=8, query_tile=1024,
                              bank_tile=4096)
    position = position_lib.position_histogram(codes, k, int(cfg.position.window), batch=8)
    mlp, _ = nb.train_mlp(store.array, codes, cfg.neighborhood, jax.random.key(2),
                          num_classes=k, dtype=DTYPES[precision], log_fn=lambda msg: None)
  return dict(c_emb=core['c_emb'], emb_to_dist=core['emb_to_dist'], position=position, mlp=mlp)


def _score(cfg, model, test, precision):
  """Patch scores [B, h, w], maps [B, S, S] and image scores [B] of N + P with the config's rule."""
  fn, variables = _feature_fn(cfg, precision)
  feats = fn(variables, jnp.asarray(test))
  b, h, w, d = feats.shape
  sc = cfg.scoring
  p_nb = nb.neighbor_probs(model['mlp'], feats, int(cfg.neighborhood.window),
                           int(cfg.neighborhood.infer_chunk), float(sc.temperature),
                           dtype=DTYPES[precision]).reshape(b * h * w, -1)
  p_pos = jnp.broadcast_to(jnp.asarray(model['position'])[None],
                           (b, h, w, model['position'].shape[-1])).reshape(b * h * w, -1)
  patch, _ = scoring.pni_patch_scores(
      feats.reshape(-1, d), jnp.asarray(model['c_emb']), jnp.asarray(model['emb_to_dist']),
      p_nb, p_pos, tau=float(sc.tau_scale) / model['c_emb'].shape[0],
      lam=float(sc.likelihood_lambda), combine=str(sc.combine), query_tile=1024, bank_tile=4096,
      rho=float(sc.rho), pos_base=scoring.position_base_rate(jnp.asarray(model['position'])))
  patch = patch.reshape(b, h, w)
  maps = scoring.anomaly_maps(patch, (SIZE, SIZE), float(sc.sigma))
  return np.asarray(patch), np.asarray(maps), np.asarray(maps.reshape(b, -1).max(-1))


@pytest.fixture(scope='module')
def results(data):
  cfg = _config()
  train, test, labels, masks = data
  f32 = _fit(cfg, train, 'float32')
  bf16 = _fit(cfg, train, 'bfloat16')
  out = {'f32': _score(cfg, f32, test, 'float32'),
         'infer_bf16': _score(cfg, f32, test, 'bfloat16'),
         'all_bf16': _score(cfg, bf16, test, 'bfloat16')}
  aurocs = {k: (metrics.auroc(v[2], labels), metrics.pixel_auroc(v[1], masks))
            for k, v in out.items()}
  return out, aurocs, f32, bf16


def test_float32_is_a_working_detector(results):
  _, aurocs, _, _ = results
  # Measured: image AUROC 1.000, pixel AUROC 0.996 (chance 0.5).
  assert aurocs['f32'][0] > 0.9 and aurocs['f32'][1] > 0.9


def test_bfloat16_inference_changes_scores_little(results):
  out, aurocs, _, _ = results
  patch32, _, image32 = out['f32']
  patch16, _, image16 = out['infer_bf16']
  rel = np.abs(patch16 - patch32) / np.abs(patch32).max()
  # Measured (relative to the largest patch score): median 0.10%, 99th percentile 0.41%,
  # max 0.69%; image scores within 0.30%; image AUROC 1.000 -> 1.000, pixel AUROC
  # 0.99569 -> 0.99567. Asserted with 3-5x margin.
  assert np.median(rel) < 0.005 and np.quantile(rel, 0.99) < 0.02 and rel.max() < 0.03
  assert np.abs(image16 - image32).max() / np.abs(image32).max() < 0.015
  assert abs(aurocs['infer_bf16'][0] - aurocs['f32'][0]) <= 0.02
  assert abs(aurocs['infer_bf16'][1] - aurocs['f32'][1]) <= 0.005


def test_bfloat16_everywhere_keeps_the_aurocs(results):
  _, aurocs, f32, bf16 = results
  # The bfloat16 fit selects its own coreset from its own features, so patch scores are not
  # comparable one by one; the detector's quality is. Measured: image AUROC 1.000 -> 1.000,
  # pixel AUROC 0.99569 -> 0.99576.
  assert abs(aurocs['all_bf16'][0] - aurocs['f32'][0]) <= 0.02
  assert abs(aurocs['all_bf16'][1] - aurocs['f32'][1]) <= 0.005
  assert f32['c_emb'].dtype == bf16['c_emb'].dtype == np.float32   # distances stay float32
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16['mlp']))  # float32 parameters


def test_bfloat16_mlp_accumulates_in_float32():
  """bfloat16 inputs and weights, float32 sums: 4095 * (1 + 2^-7) = 4126.9921875 is kept exactly
  (a bfloat16 result would round it to 4128, a bfloat16 running sum would stall near 256)."""
  model16 = nb.MLP(num_layers=1, width=4, num_classes=1, dtype=jnp.bfloat16)
  x = jnp.full((1, 4095), 1.0 + 2.0 ** -7, jnp.float32)      # exactly representable in bf16
  params = {'params': {'Dense_0': {'kernel': jnp.ones((4095, 1)), 'bias': jnp.zeros((1,))}}}
  got = model16.apply(params, x, train=False)
  assert got.dtype == jnp.float32
  assert float(got[0, 0]) == 4095 * (1 + 2.0 ** -7) == 4126.9921875


def _lowered_step(dtype):
  """A small MLP training step (3 layers of 32, window 3, batch 16), lowered."""
  from pni_jax.config import base_config
  cfg = base_config().model.neighborhood
  cfg.window, cfg.num_layers, cfg.width, cfg.batch_size = 3, 3, 32, 16
  state = nb.create_train_state(jax.random.key(0), cfg, 8 * 4, 8, 10, dtype)
  maps = {'feats': jnp.zeros((2, 5, 5, 4), dtype), 'targets': jnp.zeros((2, 5, 5), jnp.int32),
          'slot': jnp.arange(2, dtype=jnp.int32)}
  return nb.train_step.lower(state, maps, jnp.zeros((32,), jnp.int32), 0, jax.random.key(1), 0,
                             grid=nb._Grid(2, 5, 5, 0), batch_size=16)


def _matmul_dtypes(dtype) -> set[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of every matmul in the lowered MLP training step."""
  import re
  text = _lowered_step(dtype).as_text()
  found = re.findall(r'stablehlo\.dot_general .*: \(tensor<[\dx]+x(\w+)>, tensor<[\dx]+x(\w+)>\) '
                     r'-> tensor<[\dx]+x(\w+)>', text)
  assert len(found) == 3 + 2 * 3 - 1      # 3 forward, 3 weight and 2 input gradients
  return set(found)


def test_bfloat16_training_multiplies_in_bfloat16_forward_and_backward():
  # Before the custom VJP the backward products took the float32 cotangent as it was and ran
  # float32 x float32 (two thirds of the training FLOPs): bfloat16 trained no faster on a GPU.
  assert _matmul_dtypes(jnp.bfloat16) == {('bf16', 'bf16', 'f32')}
  assert _matmul_dtypes(jnp.float32) == {('f32', 'f32', 'f32')}


def _compiled_dot_types(dtype) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot of the step as XLA compiled it."""
  from pni_jax import compilation
  return compilation.dot_operand_types(_lowered_step(dtype).compile().as_text())


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's bfloat16 dot kernels")
def test_bfloat16_backward_products_stay_bfloat16_after_xla(monkeypatch):
  # XLA:CPU upcast the backward products whose transposed operand it laid out column-major
  # (the weight gradients x^T g, the input gradients g w^T) to float32; the row-major copies
  # keep all 8 products (3 forward, 3 weight and 2 input gradients) in bfloat16.
  assert _compiled_dot_types(jnp.bfloat16) == [('bf16', 'bf16')] * 8
  assert _compiled_dot_types(jnp.float32) == [('f32', 'f32')] * 8
  # With XLA's own transposes, 5 of the 8 products run in float32 (what the fix is for).
  monkeypatch.setattr(nb, '_row_major_transpose', jnp.transpose)
  jax.clear_caches()   # trace the step again
  assert _compiled_dot_types(jnp.bfloat16).count(('f32', 'f32')) == 5
  monkeypatch.undo()
  jax.clear_caches()   # no later test reuses the step traced with XLA's transposes


def test_bfloat16_backward_adds_no_error(monkeypatch):
  """The bfloat16 step's gradients (backward products in bfloat16) are as close to the float32
  gradients as those of autodiff's float32 backward products: the bfloat16 forward dominates."""
  x = jax.random.normal(jax.random.key(0), (64, 48), jnp.float32)
  labels = jax.random.randint(jax.random.key(1), (64,), 0, 6)

  def grads(dtype):
    model = nb.MLP(num_layers=3, width=32, num_classes=6, dtype=dtype)
    variables = model.init(jax.random.key(2), x, train=False)

    def loss(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'])
      return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(64), labels])

    return jax.tree.leaves(jax.grad(loss)(variables['params']))

  g32, g16 = grads(jnp.float32), grads(jnp.bfloat16)
  monkeypatch.setattr(nb, '_dot_general_mixed', functools.partial(
      jax.lax.dot_general, preferred_element_type=jnp.float32))
  g_autodiff = grads(jnp.bfloat16)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  for a, b, c in zip(g16, g_autodiff, g32):
    assert a.dtype == jnp.float32
    # Measured: 0.2-9% from float32 either way (width 32: BatchNorm of rounded activations),
    # the two bfloat16 variants within 0.1 percentage point of each other.
    assert rel(a, c) <= 1.25 * rel(b, c) + 0.01, (rel(a, c), rel(b, c))
