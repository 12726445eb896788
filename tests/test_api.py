"""The functional API: fit in memory, pure scoring functions, vmap over hyper-parameters and over
models (seeds), evaluation under vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pni_jax import api
from pni_jax import infer
from pni_jax import metrics
from pni_jax.config import base_config

SIZE = 64


def _config(seed=0):
  c = base_config()
  c.seed = seed
  c.data.name, c.data.root = 'generated', ''
  c.data.resize = c.data.crop = SIZE
  c.data.batch_size = 4
  m = c.model
  m.backbone, m.allow_random_init, m.layers = 'resnet18', True, ('layer2', 'layer3')
  m.aggregation_size, m.pre_dim, m.dim = 3, 32, 16
  m.coreset.ratio, m.coreset.dist_size, m.coreset.projection_dim = 0.25, 12, 0
  m.position.window = 3
  nb = m.neighborhood
  nb.window, nb.num_layers, nb.width, nb.dropout = 3, 2, 16, 0.0
  nb.epochs, nb.batch_size, nb.val_fraction, nb.infer_chunk = 1, 32, 0.0, 128
  m.use_refinement = False
  m.scoring.combine = 'product'
  m.scoring.tau_scale = 4.0            # tau = 4 / |C_emb|: the priors bind on random weights
  m.scoring.query_tile, m.scoring.bank_tile = 64, 64
  m.scoring.sigma, m.scoring.image_score = 2.0, 'max'
  return c


def _images(seed, n):
  rng = np.random.default_rng(seed)
  base = np.linspace(0, 1, SIZE, dtype=np.float32)
  img = np.stack(list(np.meshgrid(base, base[::-1], indexing='ij')) + [np.full((SIZE, SIZE), 0.5)],
                 -1)
  return np.clip(img[None] + 0.05 * rng.normal(size=(n, SIZE, SIZE, 3)), 0, 1).astype(np.float32)


@pytest.fixture(scope='module')
def fitted():
  cfg = _config()
  model = api.fit(cfg, _images(0, 6))
  test = _images(1, 4)
  test[2:, 20:36, 20:36] = [1.0, 0.0, 0.0]                   # two defective images
  masks = np.zeros((4, SIZE, SIZE), np.uint8)
  masks[2:, 20:36, 20:36] = 1
  return cfg, model, test, masks, np.asarray([0, 0, 1, 1])


def test_fit_returns_a_pytree_with_every_component(fitted):
  _, model, _, _, _ = fitted
  a = model.arrays
  assert a['c_emb'].shape[1] == 16 and a['emb_to_dist'].shape == a['c_emb'].shape[:1]
  assert a['position'].shape[:2] == (8, 8) and a['mlp'] is not None
  leaves = jax.tree.leaves(model)
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert model.setup.spec.variant == infer.Variant(True, True)


def test_api_is_pure_and_needs_no_config(fitted):
  cfg, model, test, _, _ = fitted
  hp = api.default_hparams(model)
  score = jax.jit(api.score)
  first = score(model, test, hp)
  cfg.model.scoring.tau_scale = 1e-9                        # a config changed later is not read
  cfg.model.scoring.sigma = 0.0
  again = score(model, test, hp)
  feats = jax.jit(api.features)(model, test)
  from_feats = score(model, feats, hp)                      # the features input path
  for k in ('patch', 'maps', 'image', 'allowed'):
    np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(first[k]))
    np.testing.assert_allclose(np.asarray(from_feats[k]), np.asarray(first[k]), rtol=1e-6,
                               atol=1e-6)
  jaxpr = jax.make_jaxpr(api.patch_scores)(model, feats, hp)   # traceable: no host callbacks
  assert 'callback' not in str(jaxpr)
  assert float(np.asarray(first['allowed']).mean()) < 1.0    # the priors bind


def test_vmapped_evaluation_over_hparams_equals_the_loop(fitted):
  _, model, test, masks, labels = fitted
  model = api.with_bounds(model, max_sigma=4.0)
  feats = api.features(model, test)
  grid = api.grid(api.default_hparams(model), tau_scale=[0.5, 4.0, 16.0],
                  temperature=[1.0, 3.0], sigma=[1.0, 4.0])
  regions = api.ground_truth(masks)

  def one(hp):
    out = api.score(model, feats, hp)
    return out, api.evaluate(out['maps'], masks, labels, out['image'], regions=regions)

  outs, mets = jax.jit(jax.vmap(one))(grid)
  assert outs['maps'].shape == (12, 4, SIZE, SIZE)
  for g in range(12):
    hp = jax.tree.map(lambda x: x[g], grid)
    out, met = jax.jit(one)(hp)
    for k in ('patch', 'maps', 'image'):
      np.testing.assert_allclose(np.asarray(outs[k][g]), np.asarray(out[k]), rtol=1e-6,
                                 atol=1e-6)
    for k in met:
      np.testing.assert_allclose(float(mets[k][g]), float(met[k]), atol=1e-6)
    exact = metrics.evaluate(np.asarray(out['image']), labels, np.asarray(out['maps']), masks)
    for k in ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_f1_max'):
      assert float(met[k]) == pytest.approx(exact[k], abs=2e-6)
  assert np.ptp(np.asarray(mets['pixel_auroc'])) > 0 or np.ptp(np.asarray(outs['patch'])) > 0


def test_vmap_over_models_with_equal_shapes(fitted):
  _, model, test, _, _ = fitted
  other = api.fit(_config(seed=1), _images(0, 6))
  assert jax.tree.map(jnp.shape, other.arrays) == jax.tree.map(jnp.shape, model.arrays)
  both = jax.tree.map(lambda *x: jnp.stack(x), model, other)
  hp = api.default_hparams(model)
  feats = jax.jit(api.features)(model, test)
  got = jax.jit(jax.vmap(api.patch_scores, in_axes=(0, None, None)))(both, feats, hp)
  one = jax.jit(api.patch_scores)
  # Tolerance: distances here are ~0.02 from norms ~1 (random weights), so the float32 rounding
  # of the ||a||^2 - 2ab + ||b||^2 expansion, batched differently under vmap, shows at ~2e-5;
  # the two models' scores differ by far more.
  singles = [np.asarray(one(m, feats, hp)) for m in (model, other)]
  for i in range(2):
    np.testing.assert_allclose(np.asarray(got[i]), singles[i], atol=1e-4)
  assert np.abs(singles[0] - singles[1]).max() > 1e-2


def test_api_input_errors(fitted):
  cfg, model, test, masks, labels = fitted
  with pytest.raises(ValueError, match='train_images must be'):
    api.fit(cfg, test[:, :32])
  with pytest.raises(ValueError, match='expected images'):
    api.patch_scores(model, jnp.zeros((1, 8, 8, 5)), api.default_hparams(model))
  with pytest.raises(ValueError, match='unknown hyper-parameter'):
    api.grid(api.default_hparams(model), tau=[1.0])
  with pytest.raises(ValueError, match='regions'):
    jax.jit(lambda m, k: api.evaluate(m, k, labels))(jnp.zeros((4, SIZE, SIZE)), masks)
