"""The inference runtime: batch buckets, the fast MLP and masked search against the reference
formulations, one image scored alone equals the same image inside a batch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pni_jax import infer
from pni_jax import model as model_lib
from pni_jax import neighborhood
from pni_jax import scoring
from pni_jax.config import base_config


def test_bucket_sizes():
  assert [infer.bucket_size(b, 8) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  assert [infer.bucket_size(b, 8, 4) for b in (1, 3, 5)] == [4, 4, 8]
  with pytest.raises(ValueError):
    infer.bucket_size(0, 8)


def _mlp_variables(key, window, d, width, classes, layers=3):
  model = neighborhood.MLP(num_layers=layers, width=width, num_classes=classes)
  variables = model.init(key, jnp.zeros((1, (window * window - 1) * d)), train=False)
  stats = jax.tree.map(lambda x: x + 0.3 * jax.random.uniform(key, x.shape),
                       variables['batch_stats'])          # non-trivial BatchNorm statistics
  return {'params': variables['params'], 'batch_stats': stats}


@pytest.mark.parametrize('window,chunk', [(3, 1000), (5, 70)])
def test_mlp_as_convolution_equals_gathered_windows(window, chunk):
  key = jax.random.key(window)
  variables = _mlp_variables(key, window, 6, 24, 10)
  feats = jax.random.normal(jax.random.fold_in(key, 1), (3, 7, 9, 6))
  want = neighborhood.neighbor_logits(variables, feats, window, 64)
  got = jax.jit(lambda v, f: infer.mlp_logits(v, f, window=window, chunk=chunk))(variables, feats)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The folded form the scorers are given (`scoring_arrays`): no BatchNorm left, same logits.
  folded = infer.fold_mlp(variables)
  assert not any('BatchNorm' in k for k in folded['params']) and 'batch_stats' not in folded
  again = infer.mlp_logits(folded, feats, window=window, chunk=chunk)
  np.testing.assert_allclose(np.asarray(again), np.asarray(got), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='MLP expects'):
    infer.mlp_logits(variables, feats[..., :5], window=window)


def _model_config():
  m = base_config().model
  m.backbone, m.allow_random_init, m.layers = 'resnet18', True, ('layer2', 'layer3')
  m.aggregation_size, m.pre_dim, m.dim = 3, 32, 16
  m.neighborhood.window, m.neighborhood.infer_chunk = 3, 64
  m.scoring.query_tile, m.scoring.bank_tile, m.scoring.search_chunk = 32, 64, 16
  m.scoring.sigma, m.scoring.combine, m.scoring.image_score = 2.0, 'product', 'max'
  m.scoring.border = 'pad'
  return m


def _arrays(key, grid=(8, 8), d=16, k_emb=90, k_dist=12):
  rng = np.random.default_rng(0)
  e2d = rng.integers(0, k_dist, size=k_emb).astype(np.int32)
  e2d[:k_dist] = np.arange(k_dist)
  return {'c_emb': jax.random.normal(key, (k_emb, d)), 'emb_to_dist': jnp.asarray(e2d),
          'position': jnp.asarray(rng.dirichlet(np.ones(k_dist) * 0.2, size=grid)
                                  .astype(np.float32)),
          'mlp': _mlp_variables(key, 3, d, 16, k_dist), 'refine': None}


@pytest.mark.parametrize('combine', ['product', 'mean_score', 'relative_score',
                                     'relative_lift_score', 'posterior'])
def test_patch_scores_equal_the_dense_reference(combine):
  m = _model_config()
  m.scoring.combine = combine
  m.scoring.rho = 0.05
  m.scoring.tau_scale = 8.0                     # tau = 8 / |C_emb|: many codes excluded
  arrays = _arrays(jax.random.key(2))
  feats = jax.random.normal(jax.random.key(3), (2, 8, 8, 16))
  spec = infer.make_spec(m, infer.Variant(True, True), (32, 32))
  hp = scoring.hparams_from_config(m)
  got, frac = jax.jit(lambda a, f: infer.patch_scores(a, f, hp, spec))(arrays, feats)
  p_nb = neighborhood.neighbor_probs(arrays['mlp'], feats, 3, 64, 2.0).reshape(128, -1)
  p_pos = jnp.broadcast_to(arrays['position'][None], (2, 8, 8, 12)).reshape(128, -1)
  want, want_frac = scoring.pni_patch_scores(
      feats.reshape(128, 16), arrays['c_emb'], arrays['emb_to_dist'], p_nb, p_pos,
      tau=8.0 / 90, lam=1.0, combine=combine, query_tile=32, bank_tile=64, rho=0.05,
      pos_base=arrays['position'].reshape(-1, 12).mean(0))
  np.testing.assert_allclose(np.asarray(got).ravel(), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(frac).ravel(), np.asarray(want_frac), atol=1e-6)
  if not combine.startswith('posterior'):
    assert 0 < float(np.asarray(frac).mean()) < 0.9


def test_authors_border_edge_pads_the_n_map_only():
  """scoring.border='authors': the N / N+P patch scores' border (the window's reach) is replaced by
  the nearest interior value; P-only and PatchCore maps are untouched."""
  m = _model_config()
  arrays = _arrays(jax.random.key(2))
  feats = jax.random.normal(jax.random.key(3), (2, 8, 8, 16))
  hp = scoring.hparams_from_config(m)
  for variant, cropped in ((infer.Variant(True, True), True), (infer.Variant(False, True), False),
                           (infer.Variant(), False)):
    plain = infer.patch_scores(arrays, feats, hp, infer.make_spec(m, variant, (32, 32)))[0]
    m.scoring.border = 'authors'
    spec = infer.make_spec(m, variant, (32, 32))
    m.scoring.border = 'pad'
    got = infer.patch_scores(arrays, feats, hp, spec)[0]
    assert spec.border == (1 if cropped else 0)
    want = scoring.edge_pad_border(plain, 1) if cropped else plain
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_runtime_scores_one_image_as_inside_a_batch():
  cfg = ml_collections.ConfigDict(dict(seed=0, data=dict(crop=64, batch_size=4),
                                       model=_model_config().to_dict()))
  extractor = infer.make_extractor(cfg)
  arrays = jax.tree.map(np.asarray, _arrays(jax.random.key(4)))
  fitted = model_lib.PNIModel(c_emb=arrays['c_emb'], emb_to_dist=arrays['emb_to_dist'],
                              position=arrays['position'], mlp=arrays['mlp'],
                              meta={'num_dist': 12})
  runtime = infer.ModelRuntime(cfg, extractor, fitted, [infer.Variant(True, True),
                                                        infer.Variant()])
  images = np.random.default_rng(5).random((3, 64, 64, 3)).astype(np.float32)
  batch = runtime.score(images)                 # bucket 4
  single = runtime.score(images[1:2])           # bucket 1
  for name in ('+N+P', 'baseline'):
    assert batch[name]['maps'].shape == (3, 64, 64)
    for k in ('maps', 'image', 'allowed'):
      np.testing.assert_allclose(single[name][k][0], batch[name][k][1], rtol=1e-5, atol=1e-5)
  assert (batch['baseline']['allowed'] == 1).all()


def test_variants_scored_together_equal_each_scored_alone():
  # An ablation table in one call (`make_variants_scorer`, what evaluation runs) shares the MLP,
  # the nearest row and N+P's maps between rows; every row must equal its own scorer's.
  m = _model_config()
  m.scoring.combine, m.scoring.rho = 'relative_lift_score', 0.9
  m.scoring.tau_scale = 8.0
  arrays = _arrays(jax.random.key(6))
  feats = jax.random.normal(jax.random.key(7), (2, 8, 8, 16))
  variants = [infer.Variant(True, True), infer.Variant(), infer.Variant(True, False),
              infer.Variant(False, True), infer.Variant(True, True, False, 'mean_score'),
              infer.Variant(True, True, False, 'mean_prob')]
  together = infer.make_variants_scorer(m, variants, (32, 32))(arrays, feats)
  assert sorted(together) == sorted(v.name for v in variants)
  for v in variants:
    alone = infer.make_scorer(m, v, (32, 32))(arrays, feats)
    for k in ('patch', 'maps', 'image', 'allowed'):
      np.testing.assert_allclose(np.asarray(together[v.name][k]), np.asarray(alone[k]),
                                 rtol=1e-6, atol=1e-6, err_msg=f'{v.name} {k}')
  # The rows differ where they should (a row equal to another would hide a wrong sharing key).
  maps = {v.name: np.asarray(together[v.name]['maps']) for v in variants}
  names = list(maps)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not np.allclose(maps[a], maps[b]), (a, b)
  with pytest.raises(ValueError, match='distinct'):
    infer.make_variants_scorer(m, [infer.Variant(), infer.Variant()], (32, 32))


def test_diagnostics_in_the_scoring_call_equal_the_standalone_ones():
  # Evaluation takes the prior diagnostics from its scoring call (the MLP's prior shared with
  # the variants); they must equal `diagnostics.prior_diagnostics` on the same batch.
  from pni_jax import diagnostics
  m = _model_config()
  m.scoring.combine, m.scoring.rho, m.scoring.tau_scale = 'relative_lift_score', 0.9, 8.0
  arrays = _arrays(jax.random.key(8))
  feats = jax.random.normal(jax.random.key(9), (3, 8, 8, 16))
  masks = np.zeros((2, 8, 8), bool)              # the first 2 of 3 rows are real images
  masks[:, 2:5, 3:6] = True
  both = infer.Variant(True, True)
  out = infer.make_variants_scorer(m, [infer.Variant()], (32, 32), diagnostics_of=both)(
      arrays, feats)
  values = out[infer.DIAGNOSTICS]
  assert all(v.shape == (3, 8, 8) for v in values.values())
  got = diagnostics.summarize(values, masks)
  hp = scoring.hparams_from_config(m)
  p_nb, p_pos = infer.priors(arrays, feats, hp, infer.make_spec(m, both, (32, 32)))
  want = diagnostics.prior_diagnostics(
      feats, masks, arrays, p_nb, p_pos[0], tau=8.0 / 90, lam=float(hp.likelihood_lambda),
      rho=0.9, query_tile=32, bank_tile=64)
  assert set(got) == set(want) and 'normal/rel_score_change_N' in got
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert 0 < got['normal/excluded_N'] < 1 and 0 < got['defect/lift_excluded_P'] < 1
  with pytest.raises(ValueError, match='N or P'):
    infer.make_variants_scorer(m, [], (32, 32), diagnostics_of=infer.Variant())


def test_paper_configs_take_the_max_of_the_unblurred_cropped_patch_map():
  from configs import btad, mvtec, visa
  for module in (mvtec, visa, btad):
    m = module.get_config().model
    assert m.scoring.image_score == 'patch_max_cropped'
    assert infer.make_spec(m, infer.Variant(True, True), (480, 480)).image_border == 4
    assert infer.make_spec(m, infer.Variant(False, True), (480, 480)).image_border == 4
    assert infer.make_spec(m, infer.Variant(), (480, 480)).image_border == 0   # PatchCore
  m = _model_config()
  m.scoring.image_score = 'patch_max_cropped'                 # window 3: border 1
  arrays = _arrays(jax.random.key(9))
  feats = jax.random.normal(jax.random.key(10), (2, 8, 8, 16))
  out = infer.make_scorer(m, infer.Variant(True, True), (32, 32))(arrays, feats)
  patch = np.asarray(out['patch'])
  np.testing.assert_allclose(np.asarray(out['image']), patch[:, 1:-1, 1:-1].max((1, 2)))
  assert not np.allclose(np.asarray(out['image']), np.asarray(out['maps']).max((1, 2)))


def _score_padded_and_not(m, variant, arrays, feats, rows):
  scorer = infer.make_scorer(m, variant, (32, 32))
  want = jax.device_get(scorer(arrays, feats))
  got = jax.device_get(scorer(infer.pad_bank(arrays, rows), feats))
  return want, got


@pytest.mark.parametrize('combine', scoring.COMBINE_MODES)
def test_a_padded_bank_leaves_every_score_unchanged(combine):
  # C_emb of 90 rows padded to its bucket (96) and far beyond (200, other bank tiles): patch
  # scores, maps, image scores and allowed fractions equal (to float rounding: other bank tiles
  # sum the distances in another order) for every combine rule.
  m = _model_config()
  m.scoring.combine, m.scoring.rho, m.scoring.tau_scale = combine, 0.5, 8.0
  arrays = _arrays(jax.random.key(4))
  feats = jax.random.normal(jax.random.key(5), (2, 8, 8, 16))
  for rows in (96, 200):
    for variant in (infer.Variant(True, True), infer.Variant(True, False)):
      want, got = _score_padded_and_not(m, variant, arrays, feats, rows)
      for k in ('patch', 'maps', 'image', 'allowed'):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6,
                                   err_msg=f'{combine} {variant.name} {k}')
      if not combine.startswith('posterior'):   # (no threshold: everything allowed)
        assert (want['allowed'] < 1).any()        # the rule excludes codes: tau / counts matter


@pytest.mark.parametrize('k_emb', [90, 6])
def test_a_padded_bank_keeps_patchcore_reweighting(k_emb):
  # PatchCore's image score reads the k = 9 nearest C_emb rows of the nearest row: the padding
  # copies of row 0 are masked out (6 rows: fewer than k, the same 6 with and without padding).
  m = _model_config()
  m.scoring.image_score = 'reweight'
  arrays = _arrays(jax.random.key(6), k_emb=k_emb, k_dist=min(12, k_emb))
  feats = jax.random.normal(jax.random.key(7), (3, 8, 8, 16))
  # The most anomalous patch of image 0 is row 0 itself: its copies would be its neighbours.
  feats = feats.at[0, 3, 3].set(arrays['c_emb'][0] + 0.01).at[0, 0, 0].set(30.0)
  for rows in (k_emb + 1, 128):
    for variant in (infer.Variant(), infer.Variant(False, True)):
      want, got = _score_padded_and_not(m, variant, arrays, feats, rows)
      for k in ('patch', 'image'):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6,
                                   err_msg=f'{variant.name} {k}')


def test_bank_rows_follow_the_training_image_bucket():
  # 33 and 40 training images share the image bucket 40, so their C_emb (1 % of 33 or 40 x 64
  # patches: 22 and 26 rows) are padded to the same 26 rows; without buckets nothing is padded.
  cfg = ml_collections.ConfigDict({'runtime': {'shape_buckets': True}})
  def fitted(n):
    k = -(-n * 64 // 100)
    return model_lib.PNIModel(
        c_emb=np.zeros((k, 4), np.float32), emb_to_dist=np.zeros(k, np.int32),
        meta={'num_train': n, 'grid': [8, 8], 'base_config': {'coreset': {'ratio': 0.01}}})
  assert [infer.bank_rows(cfg, fitted(n)) for n in (33, 40, 41)] == [26, 26, 31]
  # A run's shared bucket (runtime.min_train_images, pipeline.run_bucket): 33 images are then
  # scored like the run's largest training set (41 images: bucket 48).
  run_cfg = ml_collections.ConfigDict({'runtime': {'shape_buckets': True, 'min_train_images': 41}})
  assert [infer.bank_rows(run_cfg, fitted(n)) for n in (33, 41)] == [31, 31]
  arrays = infer.scoring_arrays(cfg, fitted(33))
  assert arrays['c_emb'].shape == (26, 4) and int(arrays['emb_valid'].sum()) == 22
  assert infer.bank_rows(ml_collections.ConfigDict({'runtime': {'shape_buckets': False}}),
                         fitted(33)) == 22
  old = fitted(33)
  old.meta.clear()                                   # no fit metadata: the bucket of K_emb
  assert infer.bank_rows(cfg, old) == 24
  with pytest.raises(ValueError, match='cannot pad'):
    infer.pad_bank(model_lib.arrays(old), 10)


def test_models_of_one_training_bucket_share_one_compiled_scorer():
  # Two categories of 33 and 40 training images (image bucket 40: C_emb of 22 and 26 rows, both
  # padded to 26) score through ONE compilation of the jitted scorer, with the scores of their
  # unpadded arrays; without shape buckets each compiles its own.
  m = _model_config()
  m.scoring.tau_scale = 8.0
  feats = jax.random.normal(jax.random.key(9), (2, 8, 8, 16))
  scorer = infer.make_scorer(m, infer.Variant(True, True), (32, 32))
  models = []
  for i, n in enumerate((33, 40)):
    a = _arrays(jax.random.key(10 + i), k_emb=-(-n * 64 // 100))
    models.append(model_lib.PNIModel(
        c_emb=np.asarray(a['c_emb']), emb_to_dist=np.asarray(a['emb_to_dist']),
        position=np.asarray(a['position']), mlp=jax.tree.map(np.asarray, a['mlp']),
        meta={'num_train': n, 'grid': [8, 8], 'base_config': {'coreset': {'ratio': 0.01}}}))
  for buckets, compiles in ((True, 1), (False, 2)):
    cfg = ml_collections.ConfigDict({'runtime': {'shape_buckets': buckets}})
    fn = jax.jit(lambda arrays, feats: scorer(arrays, feats))     # a fresh cache
    for fitted in models:
      arrays = infer.scoring_arrays(cfg, fitted)
      assert ('emb_valid' in arrays) == buckets
      got = jax.device_get(fn(arrays, feats))
      want = jax.device_get(scorer(model_lib.arrays(fitted), feats))
      for k in ('maps', 'image', 'allowed'):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert fn._cache_size() == compiles, buckets


def test_mlp_precision_setting_and_bfloat16_logits_stay_close():
  # model.scoring.mlp_precision picks the MLP's compute dtype ('' = model.precision); bfloat16
  # logits stay within bfloat16 rounding of the float32 ones and pick the same top code on
  # nearly every patch.
  cfg = base_config()
  assert infer.mlp_dtype(cfg.model) == 'float32'
  cfg.model.scoring.mlp_precision = 'bfloat16'
  assert infer.mlp_dtype(cfg.model) == 'bfloat16'
  cfg.model.scoring.mlp_precision = 'float16'
  with pytest.raises(ValueError, match='mlp_precision'):
    infer.mlp_dtype(cfg.model)
  rng = np.random.default_rng(0)
  d, window, k = 8, 3, 16
  mlp = neighborhood.MLP(num_layers=3, width=32, num_classes=k)
  variables = mlp.init(jax.random.key(0), jnp.zeros((2, (window ** 2 - 1) * d)), train=False)
  feats = jnp.asarray(rng.standard_normal((2, 9, 11, d)), jnp.float32)
  f32 = infer.mlp_logits(variables, feats, window=window, dilation=2)
  bf16 = infer.mlp_logits(variables, feats, window=window, dilation=2, dtype='bfloat16')
  assert bf16.dtype == jnp.float32 and bf16.shape == f32.shape == (2, 9, 11, k)
  scale = float(jnp.abs(f32).max())
  err = float(jnp.abs(bf16 - f32).max())
  assert 0 < err <= 0.05 * scale, (err, scale)
  assert float(jnp.mean(jnp.argmax(bf16, -1) == jnp.argmax(f32, -1))) >= 0.9
  # The bfloat16 window copies are made as 32-bit words when d is even; with one zero channel
  # more (odd d, copied as 16-bit values) and zero weights for it, the logits are the same.
  taps = variables['params']['Dense_0']['kernel'].reshape(window ** 2 - 1, d, -1)
  wide = jax.tree.map(lambda x: x, variables)
  wide['params']['Dense_0']['kernel'] = jnp.concatenate(
      [taps, jnp.zeros_like(taps[:, :1])], axis=1).reshape((window ** 2 - 1) * (d + 1), -1)
  odd = infer.mlp_logits(wide, jnp.pad(feats, ((0, 0), (0, 0), (0, 0), (0, 1))), window=window,
                         dilation=2, dtype='bfloat16')
  np.testing.assert_allclose(np.asarray(odd), np.asarray(bf16), rtol=0, atol=1e-5 * scale)
  # The folded form in bfloat16 (what `scoring_arrays` uploads for a bfloat16 MLP).
  folded = infer.fold_mlp(variables, dtype='bfloat16')
  assert folded['params']['Dense_0']['kernel'].dtype == jnp.bfloat16
  again = infer.mlp_logits(folded, feats, window=window, dilation=2, dtype='bfloat16')
  np.testing.assert_allclose(np.asarray(again), np.asarray(bf16), rtol=0, atol=1e-6 * scale)
