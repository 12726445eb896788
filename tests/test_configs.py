"""The paper configs follow the paper's protocol (README "Differences from the paper"); the demo
differs where the README's configuration table says so."""

import pytest

from configs import btad
from configs import demo
from configs import mvtec
from configs import visa
from pni_jax import config as config_lib
from pni_jax import infer


@pytest.mark.parametrize('module,name', [(mvtec, 'mvtec'), (visa, 'visa'), (btad, 'btad')])
def test_paper_configs_follow_the_paper(module, name):
  c = module.get_config()
  assert c.data.name == name
  # 4.1: resize every image to 512 x 512, centre-crop 480; every training image (no hold-out).
  assert (c.data.resize, c.data.crop, c.data.resize_mode) == (512, 480, 'square')
  assert c.data.holdout_fraction == 0.0
  m = c.model
  assert m.backbone == 'wide_resnet101_2' and tuple(m.layers) == ('layer2', 'layer3')
  assert m.use_neighborhood and m.use_position and m.use_refinement
  assert (m.coreset.ratio, m.coreset.dist_size) == (0.01, 2048)
  assert m.position.window == 9
  nb = m.neighborhood
  assert (nb.window, nb.dilation, nb.num_layers, nb.width) == (9, 1, 10, 2048)
  assert (nb.epochs, nb.batch_size, nb.learning_rate) == (15, 2048, 1e-3)
  assert (nb.decay_every, nb.decay_factor, nb.train_positions) == (5, 0.1, 'interior')
  sc = m.scoring
  # eq. 5-6 with tau = 1 / (2 |C_emb|), T = 2, lambda = 1, sigma = 8.
  assert (sc.combine, sc.tau_scale, sc.temperature) == ('mean_prob', 0.5, 2.0)
  assert (sc.likelihood_lambda, sc.sigma, sc.neighborhood_weight) == (1.0, 8.0, 0.5)
  # The authors' border handling and image score (where the paper is silent).
  assert (sc.border, sc.image_score) == ('authors', 'patch_max_cropped')
  r = m.refine
  assert (r.arch, r.encoder, r.input_size, r.iterations) == ('paper', 'densenet161', 320, 55000)
  assert (r.batch_size, r.learning_rate, r.loss, r.fusion_weight) == (8, 1e-4, 'reg_grad', 0.1)
  assert r.pool_size == 0 and r.augment                  # online synthesis and augmentation
  c.data.root = '/data/' + name                          # the one setting a user must give
  config_lib.validate(c)
  # The main variant is N + P + R; the refinement's A_hat is N + P.
  assert infer.variant_from_config(m) == infer.Variant(True, True, True)


def test_the_demo_differs_only_where_the_readme_says():
  d, p = demo.get_config(), mvtec.get_config()
  assert d.data.name == 'generated' and d.data.holdout_fraction == 0.1
  assert d.model.backbone == 'efficientnet_lite0' and d.model.coreset.ratio == 0.05
  assert d.model.scoring.combine == 'relative_lift_score' and d.model.scoring.rho == 0.1
  assert d.model.position.smoothing < 0 and p.model.position.smoothing == 0.0
  assert d.model.neighborhood.dilation == 5 and d.model.scoring.border == 'pad'
  assert d.model.refine.arch == 'skips' and not d.model.use_refinement
  for field in ('tau_scale', 'temperature', 'likelihood_lambda'):
    assert d.model.scoring[field] == p.model.scoring[field]
  config_lib.validate(d)


def test_new_neutral_fields_leave_fingerprints_unchanged():
  # Workdirs fitted before model.scoring.mlp_precision existed keep their fingerprints while it
  # holds its neutral value; any other value changes them; a bad value is refused.
  from pni_jax import config as config_lib
  cfg = demo.get_config()
  cfg.model.scoring.mlp_precision = ''
  with_field = config_lib.fingerprint(cfg.model.scoring)
  old = config_lib.to_plain(cfg.model.scoring)
  del old['mlp_precision']
  assert with_field == config_lib.fingerprint(old)
  cfg.model.scoring.mlp_precision = 'bfloat16'
  assert config_lib.fingerprint(cfg.model.scoring) != with_field
  cfg.model.scoring.mlp_precision = 'half'
  with pytest.raises(ValueError, match='mlp_precision'):
    config_lib.validate(cfg)


def test_the_ensemble_refinement_ignores_the_scoring_mlp_precision_too():
  # As for one model: the ensemble's A_ens is scored in model.precision, so the evaluation
  # setting leaves the ensemble refinement's fingerprint alone (and a fitted one is reused).
  from pni_jax import ensemble
  from pni_jax import infer
  cfg = demo.get_config()
  variant = infer.Variant(True, True, True)
  prints = {}
  for precision in ('bfloat16', 'float32', ''):
    cfg.model.scoring.mlp_precision = precision
    prints[precision] = ensemble.refiner_fingerprint(cfg, [], variant, 'training')
  assert len(set(prints.values())) == 1, prints
  cfg.model.refine.iterations += 1                          # a refinement setting still counts
  assert ensemble.refiner_fingerprint(cfg, [], variant, 'training') != prints['']


def test_the_refinement_trains_on_maps_in_model_precision():
  # model.scoring.mlp_precision is for evaluation and predict: the refinement's A_hat is scored
  # in model.precision (bfloat16 A_hat cost the demo's refined granite 0.25-1.7 F1 points), so
  # the setting neither changes the refinement's fingerprint nor the config it scores with.
  from pni_jax import fit
  from pni_jax import infer
  cfg = demo.get_config()
  cfg.model.use_refinement = True
  assert cfg.model.scoring.mlp_precision == 'bfloat16'      # the demo's choice
  needed = infer.Variant(True, True, True)
  fp = fit.fingerprints(cfg, needed)
  amap_cfg = fit.amap_config(cfg)
  assert infer.mlp_dtype(amap_cfg.model) == 'float32'
  assert infer.mlp_dtype(cfg.model) == 'bfloat16'           # the caller's config is untouched
  cfg.model.scoring.mlp_precision = ''
  assert fit.fingerprints(cfg, needed) == fp
  assert fit.amap_config(cfg) is cfg
  cfg.model.precision = 'bfloat16'                          # model.precision still counts
  assert infer.mlp_dtype(fit.amap_config(cfg).model) == 'bfloat16'
  assert fit.fingerprints(cfg, needed)['ref'] != fp['ref']
