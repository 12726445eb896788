"""Refinement network (paper 3.3): residual output, eq. 10-11, normalisation, fusion, training, resume.

Every network test uses the EfficientNet-Lite0 encoder with its embedded ImageNet weights at 64 px
and one training configuration (lr 1e-3, no augmentation, reg_grad loss), so `train_step`
compiles once for the whole module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pni_jax import refine
from pni_jax import sharding
from pni_jax import synth
from pni_jax.config import base_config

S = 64          # image size of every test
B = 4           # batch (a multiple of 4: the four defect kinds)
ENCODER = 'efficientnet_lite0'
LR = 1e-3


def _images(n: int, seed: int) -> np.ndarray:
  """[n, S, S, 3] float32 smooth coloured stripes plus noise, in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(S), np.arange(S), indexing='ij')
  out = []
  for _ in range(n):
    f, phi = rng.uniform(0.1, 0.3), rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.2 * np.sin(f * (yy + 0.5 * xx) + phi)
    colour = rng.uniform(0.6, 1.0, 3)
    out.append(np.clip(base[..., None] * colour + rng.normal(0, 0.03, (S, S, 3)), 0, 1))
  return np.asarray(out, np.float32)


@jax.jit
def _amap_fn(images01):
  """A cheap stand-in for the fitted model: colour distance to a fixed grey, [B, S, S]."""
  return jnp.sqrt(jnp.sum(jnp.square(images01 - 0.45), axis=-1))


@pytest.fixture(scope='module')
def variables():
  return refine.init_variables(ENCODER, jax.random.key(0))


@pytest.fixture(scope='module')
def variables_skips():
  return refine.init_variables(ENCODER, jax.random.key(0), arch='skips')


@pytest.fixture(scope='module')
def batch():
  """A fixed batch: squares of defect with a blurred, offset input map."""
  images = _images(B, 1)
  mask = np.zeros((B, S, S), np.float32)
  amap = np.zeros((B, S, S), np.float32)
  for i in range(B):
    y, x = 10 + 8 * i, 14 + 5 * i
    mask[i, y:y + 16, x:x + 20] = 1
    amap[i, y + 3:y + 19, x - 4:x + 16] = 0.7      # misplaced and too weak: work for the refiner
    images[i, y:y + 16, x:x + 20] = [0.9, 0.2, 0.1]
  return {'image': jnp.asarray(images), 'amap': jnp.asarray(amap), 'mask': jnp.asarray(mask)}


def _cfg(**kw) -> ml_collections.ConfigDict:
  cfg = base_config().model.refine
  cfg.encoder = ENCODER
  cfg.input_size = S
  cfg.batch_size = B
  cfg.learning_rate = LR
  cfg.iterations = 4
  cfg.checkpoint_every = 2
  with cfg.unlocked():
    cfg.pool_size = 8
    cfg.augment = False
    cfg.texture_source = 'images'
    cfg.log_every = 1
  cfg.decoder_width = 0          # 'paper' network with C4 / 2 = 160 decoder channels (Lite0)
  for k, v in kw.items():
    cfg[k] = v
  return cfg


# ----------------------------------------------------------------------------- losses


def _np_reg_grad(pred, target):
  """Eq. 10-11 written out in float64 numpy, per image, then the batch mean."""
  out = []
  for p, t in zip(np.asarray(pred, np.float64), np.asarray(target, np.float64)):
    h, w = p.shape
    l_reg = np.sqrt(np.sum((p - t) ** 2)) / (h * w)
    gh = (p[1:, :] - p[:-1, :]) - (t[1:, :] - t[:-1, :])
    gw = (p[:, 1:] - p[:, :-1]) - (t[:, 1:] - t[:, :-1])
    l_grad = (np.sqrt(np.sum(gh ** 2)) + np.sqrt(np.sum(gw ** 2))) / (2 * h * w)
    out.append((l_reg + l_grad) / 2)
  return float(np.mean(out))


def test_loss_reg_grad_equals_numpy_eq_10_11():
  rng = np.random.default_rng(0)
  pred = rng.normal(0.3, 0.4, (3, 7, 5)).astype(np.float32)
  target = (rng.uniform(size=(3, 7, 5)) > 0.6).astype(np.float32)
  got = float(refine.loss_reg_grad(pred, target))
  np.testing.assert_allclose(got, _np_reg_grad(pred, target), rtol=1e-5)
  # Zero difference: zero loss and a finite (zero) gradient, not NaN from sqrt at 0.
  grad = jax.grad(refine.loss_reg_grad)(jnp.asarray(target), jnp.asarray(target))
  assert float(refine.loss_reg_grad(target, target)) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  with pytest.raises(ValueError, match='pred and target'):
    refine.loss_reg_grad(pred[0], target[0])


def test_loss_ce_and_focal_equal_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (2, 6, 6)).astype(np.float32)
  target = (rng.uniform(size=(2, 6, 6)) > 0.5).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  ce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
  np.testing.assert_allclose(float(refine.loss_fn('ce')(logits, target)), ce.mean(), rtol=1e-5)
  p_t = target * p + (1 - target) * (1 - p)
  focal = (1 - p_t) ** 2 * ce
  np.testing.assert_allclose(float(refine.loss_fn('focal')(logits, target)), focal.mean(),
                             rtol=1e-5)
  assert refine.loss_fn('reg_grad') is refine.loss_reg_grad
  with pytest.raises(ValueError, match='model.refine.loss'):
    refine.loss_fn('l1')


# ----------------------------------------------------------------------------- normalisation


def test_normalize_map_clips_with_global_statistics():
  amap = np.array([[-1.0, 2.0, 3.0], [4.5, 6.0, 9.0]], np.float32)
  got = np.asarray(refine.normalize_map(amap, 2.0, 6.0))
  np.testing.assert_allclose(got, [[0, 0, 0.25], [0.625, 1, 1]], rtol=0, atol=1e-7)


def test_map_stats_quantiles():
  rng = np.random.default_rng(2)
  raw = rng.uniform(0, 1, (3, 16, 16)).astype(np.float32)
  mask = np.zeros((3, 16, 16), np.float32)
  mask[:, 4:8, 4:8] = 1
  raw[mask > 0] += 2.0
  stats = refine.map_stats(raw, mask, (0.1, 0.9))
  assert stats['lo'] == pytest.approx(float(np.quantile(raw[mask == 0], 0.1)), rel=1e-6)
  assert stats['hi'] == pytest.approx(float(np.quantile(raw[mask > 0], 0.9)), rel=1e-6)
  with pytest.raises(ValueError, match='inside and outside'):
    refine.map_stats(raw, np.zeros_like(mask))


# ----------------------------------------------------------------------------- network, fusion


@pytest.mark.parametrize('shape,size', [((3, 8, 6, 5), (16, 12)), ((2, 1, 1, 2), (2, 2)),
                                        ((2, 7, 5), (14, 10)), ((2, 8, 8, 3), (12, 12))])
def test_resize_doubling_equals_image_resize(shape, size):
  # The decoder's exact x2 steps are shifted sums (refine._double); other sizes go through
  # jax.image.resize. Values and gradients equal jax.image.resize's up to float32 rounding.
  x = jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), jnp.float32)
  ref = lambda x: jax.image.resize(x, (shape[0], *size, *shape[3:]), 'bilinear')
  got, want = refine._resize(x, size), ref(x)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
  cot = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), jnp.float32)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cot))(x)
  np.testing.assert_allclose(np.asarray(grad(lambda x: refine._resize(x, size))),
                             np.asarray(grad(ref)), rtol=0, atol=1e-5)


@pytest.mark.parametrize('with_skip', [True, False])
def test_up_mix_is_the_1x1_conv_of_the_upsampled_concatenation(with_skip):
  # UpMix mixes the channels before upsampling: nn.Conv(1 x 1)'s parameter tree and initial
  # values, and its output on [resize(x), skip] up to float32 rounding.
  from flax import linen as nn
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 12)), jnp.float32)
  skip = jnp.asarray(rng.standard_normal((2, 12, 10, 4)), jnp.float32) if with_skip else None
  mix = refine.UpMix(7)
  ref = nn.Conv(7, (1, 1), kernel_init=refine.backbones.layers.conv_init)
  upsampled = refine._resize(x, (12, 10))
  cat = upsampled if skip is None else jnp.concatenate([upsampled, skip], axis=-1)
  variables = mix.init(jax.random.key(0), x, skip, (12, 10))
  want_init = ref.init(jax.random.key(0), cat)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, want_init)
  np.testing.assert_array_equal(np.asarray(variables['params']['kernel']),
                                np.asarray(want_init['params']['kernel']))
  variables = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                           variables)
  np.testing.assert_allclose(np.asarray(mix.apply(variables, x, skip, (12, 10))),
                             np.asarray(ref.apply(variables, cat)), rtol=1e-5, atol=1e-5)


def test_residual_output_and_fusion(variables, batch):
  images = batch['image']
  amap = np.asarray(batch['amap']) * 4.0 + 1.0          # raw scale; lo = 1, hi = 5 -> batch map
  a_norm = np.asarray(refine.normalize_map(amap, 1.0, 5.0))
  fuse = lambda v, w: np.asarray(refine.fuse(v, images, amap, 1.0, 5.0, w, S, ENCODER))
  # Zero final conv (the initialisation): the network returns its input map.
  zero = fuse(variables, 1.0)
  assert zero.shape == (B, S, S) and zero.dtype == np.float32
  np.testing.assert_array_equal(zero, a_norm)
  # Weight 0: the normalised map, whatever the network says.
  shifted = jax.tree.map(lambda x: x, variables)
  shifted['params']['decoder']['out_conv']['bias'] = jnp.full((1,), 0.25)
  np.testing.assert_array_equal(fuse(shifted, 0.0), a_norm)
  # A constant residual 0.25 is added to the map; weight 0.1 mixes 0.9 / 0.1.
  np.testing.assert_allclose(fuse(shifted, 1.0), a_norm + 0.25, atol=1e-6)
  np.testing.assert_allclose(fuse(shifted, 0.1), a_norm + 0.1 * 0.25, atol=1e-6)
  # A non-zero final kernel makes the output depend on the decoder (not just on the map).
  k = shifted['params']['decoder']['out_conv']['kernel']
  shifted['params']['decoder']['out_conv']['kernel'] = jnp.ones_like(k) * 0.05
  assert np.abs(fuse(shifted, 1.0) - a_norm - 0.25).max() > 1e-3


def test_logit_head_starts_at_the_input_map(variables, batch):
  # 'ce' / 'focal': refined = sigmoid(logit(clip(A_hat, eps, 1 - eps)) + r), r = 0 at init.
  a = np.asarray(batch['amap'])
  got = np.asarray(refine.fuse(variables, batch['image'], a, 0.0, 1.0, 1.0, S, ENCODER,
                               loss='ce'))
  np.testing.assert_allclose(got, np.clip(a, refine.LOGIT_EPS, 1 - refine.LOGIT_EPS), atol=1e-6)


def test_init_variables_structure(variables, variables_skips):
  from pni_jax import backbones
  pretrained = backbones.load_variables(ENCODER)
  stem = pretrained['params']['conv_stem']['kernel']                   # [3, 3, 3, 32]
  for v in (variables, variables_skips):
    params = v['params']
    assert set(params) == {'encoder', 'map_conv', 'decoder'}
    # The encoder holds the embedded ImageNet weights, not a random draw.
    np.testing.assert_array_equal(params['encoder']['conv_stem']['kernel'], stem)
    assert 'fc' not in params['encoder']          # the classifier is never built
  # 'paper': the map enters through a copy of the pretrained first conv (as a grey image), the
  # decoder starts with a 1x1 conv to decoder_width (0: C4 / 2 = 160 for Lite0's 320) and halves
  # it five times; no skips, so every block's 1x1 conv takes the previous block's channels.
  paper = variables['params']
  np.testing.assert_array_equal(paper['map_conv']['kernel'], stem)
  assert set(paper['decoder']) == {'conv0', 'up1', 'up2', 'up3', 'up4', 'up5', 'out_conv'}
  assert paper['decoder']['conv0']['kernel'].shape == (1, 1, 320, 160)
  assert [paper['decoder'][f'up{i}']['conv1x1']['kernel'].shape[2:] for i in range(1, 6)] == [
      (160, 80), (80, 40), (40, 20), (20, 10), (10, 8)]
  assert refine.arch_of(variables) == ('paper', 160)
  # 'skips': a random 1-channel map conv, channel halving from C4 = 320 (160 .. 10) and the skips
  # concatenated (block 1 takes 320 + layer3's 112 channels).
  skips = variables_skips['params']
  assert skips['map_conv']['kernel'].shape == (3, 3, 1, 32)
  assert set(skips['decoder']) == {'up1', 'up2', 'up3', 'up4', 'up5', 'out_conv'}
  assert [skips['decoder'][f'up{i}']['conv3x3']['kernel'].shape[-1] for i in range(1, 6)] == [
      160, 80, 40, 20, 10]
  assert skips['decoder']['up1']['conv1x1']['kernel'].shape[2] == 320 + 112
  assert refine.arch_of(variables_skips) == ('skips', 0)
  # An explicit width (the paper config: 768 for DenseNet-161).
  wide = refine.init_variables(ENCODER, jax.random.key(0), decoder_width=96)
  assert refine.arch_of(wide) == ('paper', 96)
  with pytest.raises(ValueError, match='model.refine.arch'):
    refine.init_variables(ENCODER, jax.random.key(0), arch='unet')


def test_missing_encoder_weights_name_the_refine_settings():
  with pytest.raises(FileNotFoundError, match='model.refine.encoder_weights'):
    refine.init_variables('densenet161', jax.random.key(0))


def test_augment_batch_moves_map_with_mask():
  images = jnp.asarray(_images(B, 3))
  mask = np.zeros((B, S, S), np.float32)
  mask[:, 5:20, 30:60] = 1
  amap = mask * 0.5 + 0.25
  out_img, out_map, out_mask = refine.augment_batch(jax.random.key(5), images, amap, mask)
  assert out_img.shape == (B, S, S, 3) and out_map.shape == out_mask.shape == (B, S, S)
  np.testing.assert_array_equal(np.asarray(out_map), np.asarray(out_mask) * 0.5 + 0.25)
  assert set(np.unique(np.asarray(out_mask)).tolist()) == {0.0, 1.0}


# ----------------------------------------------------------------------------- training


def test_train_steps_lower_the_loss(variables_skips, batch):
  # Everything committed to the device, as train_refiner does: the compiled step is shared.
  device = jax.devices()[0]
  state = jax.device_put(refine.create_train_state(variables_skips, ENCODER, "reg_grad", LR,
                                                   augment=False), device)
  batch = jax.device_put(batch, device)
  losses = []
  for i in range(8):
    state, metrics = refine.train_step(state, batch, jax.device_put(jax.random.key(i), device))
    m = metrics.compute()
    losses.append(float(m['loss']))
    if i == 0:   # the first loss is the untrained network's, i.e. the input map's
      assert float(m['loss']) == pytest.approx(float(m['input_loss']), rel=1e-6)
  assert int(state.step) == 8
  assert losses[-1] < 0.9 * losses[0], losses


# ----------------------------------------------------------------------------- samples on the device


@pytest.mark.parametrize('texture_source', ['images', 'procedural'])
def test_device_samples_mask_is_the_changed_pixels(texture_source):
  """The on-device sampler: every mask is exactly the pixels changed from the picked normal
  image (uint8 images as the pipeline gives them), and a streamed source (images reloaded
  under a device cap) draws bit-identical batches."""
  images = np.round(_images(12, 8) * 255).astype(np.uint8)
  mesh = sharding.make_mesh(jax.devices()[:1])
  base = jax.random.key(3)
  resident = refine.ImageSource(images, None, texture_source, B, None, mesh)
  streamed = refine.ImageSource(images, None, texture_source, B, 3 * images[0].nbytes, mesh)
  mode = resident.mode
  # The buffer holds what one batch may pick: B images (+ B texture images), not all 12.
  assert resident.resident and not streamed.resident
  assert streamed.rows == (2 * B if mode == 'images' else B) and streamed.steps_per_load == 1
  for i in range(3):
    out, mask = (np.asarray(x) for x in resident.sample(base, i))
    idx, _ = refine._host_indices(base, jnp.arange(i, i + 1), 12, 0, B, mode)
    picked = synth.to_unit_float(images[np.asarray(idx)[0]])
    assert out.shape == (B, S, S, 3) and mask.shape == (B, S, S)
    np.testing.assert_array_equal(mask, np.any(out != picked, axis=-1).astype(np.float32))
    assert np.all(mask.reshape(B, -1).sum(1) > 0)          # every sample has a defect
    out2, mask2 = streamed.sample(base, i)
    np.testing.assert_array_equal(np.asarray(out2), out)
    np.testing.assert_array_equal(np.asarray(mask2), mask)
  resident.close()
  streamed.close()


@pytest.mark.parametrize('texture_source', ['images', 'procedural'])
def test_device_samples_padded_to_a_bucket_are_identical(texture_source):
  """Sources padded to 16 images (resident and streamed) draw the batches of the unpadded
  source, and training sets of 12 and 14 images padded to 16 share one compiled sampler."""
  images = np.round(_images(14, 8) * 255).astype(np.uint8)
  mesh = sharding.make_mesh(jax.devices()[:1])
  base = jax.random.key(5)
  for n in (12, 14):
    plain = refine.ImageSource(images[:n], None, texture_source, B, None, mesh)
    want = [tuple(np.asarray(x) for x in plain.sample(base, i)) for i in range(3)]
    plain.close()
    if n == 14:
      compiled = refine._sample._cache_size()
    for cap in (None, 3 * images[0].nbytes):
      padded = refine.ImageSource(images[:n], None, texture_source, B, cap, mesh,
                                  pad_images_to=16)
      if cap is None:
        assert padded.buffer.shape[0] == 16
      for i in range(3):
        got = padded.sample(base, i)
        np.testing.assert_array_equal(np.asarray(got[0]), want[i][0])
        np.testing.assert_array_equal(np.asarray(got[1]), want[i][1])
      padded.close()
  assert refine._sample._cache_size() == compiled     # 14 padded to 16: compiled for 12 already


class _Killed(Exception):
  pass


def test_killed_and_resumed_online_training_equals_uninterrupted(tmp_path):
  # Online synthesis (the paper's mode), images streamed under a device cap of 3 images.
  images = _images(6, 4)
  cfg = _cfg(pool_size=0, calibration_samples=8, device_images_mb=3 * images[0].nbytes / 2 ** 20)
  key = jax.random.key(7)
  ref_vars, ref_stats, ref_hist = refine.train_refiner(images, _amap_fn, cfg, key,
                                                       log_fn=lambda msg: None)
  assert ref_hist['step'] == [1, 2, 3, 4] and ref_hist['pool_size'] == 0
  assert ref_stats['hi'] > ref_stats['lo']
  assert ref_hist['compile_seconds'] > 0 and ref_hist['steady_step_seconds'] > 0

  lines = []

  def killer(msg):
    lines.append(msg)
    if msg.startswith('refinement iteration 3/'):
      raise _Killed()      # after step 3; the last checkpoint is step 2

  ckpt = str(tmp_path / 'ckpt')
  with pytest.raises(_Killed):
    refine.train_refiner(images, _amap_fn, cfg, key, ckpt_dir=ckpt, log_fn=killer)
  resumed_lines = []
  vars2, stats2, hist2 = refine.train_refiner(images, _amap_fn, cfg, key, ckpt_dir=ckpt,
                                              log_fn=resumed_lines.append)
  assert any('resumed' in l and 'iteration 2' in l for l in resumed_lines), resumed_lines
  assert stats2 == ref_stats
  assert hist2['step'] == ref_hist['step'] and hist2['loss'] == ref_hist['loss']
  for a, b in zip(jax.tree.leaves(vars2), jax.tree.leaves(ref_vars)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(vars2) == jax.tree.structure(ref_vars)
  # The weights moved: training did something.
  assert np.abs(np.asarray(vars2['params']['decoder']['out_conv']['kernel'])).max() > 0

  # A checkpoint of another run is refused.
  with pytest.raises(ValueError, match='different run'):
    refine.train_refiner(images, _amap_fn, _cfg(input_size=32), key, ckpt_dir=ckpt,
                         log_fn=lambda msg: None)


def test_pool_training_ignores_the_device_cap(tmp_path):
  # The pool (8 samples) on the device; a cap of 2 images streams the normal images while the
  # pool is drawn and must not change a bit.
  images = _images(6, 9)
  key = jax.random.key(11)
  vars1, stats1, hist1 = refine.train_refiner(images, _amap_fn, _cfg(iterations=3), key,
                                              log_fn=lambda m: None)
  assert hist1['pool_size'] == 8 and len(hist1['loss']) == 3
  assert all(np.isfinite(hist1['loss'])) and stats1['hi'] > stats1['lo']
  # The training figure draws its samples with the training's compiled sampler.
  compiled = refine._sample._cache_size()
  refine.save_training_figure(tmp_path / 'samples.png', key, images, _amap_fn, vars1, stats1,
                              _cfg(iterations=3), num_samples=2)
  assert (tmp_path / 'samples.png').stat().st_size > 0
  assert refine._sample._cache_size() == compiled
  capped = _cfg(iterations=3, device_images_mb=2 * images[0].nbytes / 2 ** 20)
  vars2, stats2, _ = refine.train_refiner(images, _amap_fn, capped, key, log_fn=lambda m: None)
  assert stats2 == stats1
  assert jax.tree.all(jax.tree.map(np.array_equal, vars1, vars2))
  assert np.abs(np.asarray(vars1['params']['decoder']['out_conv']['kernel'])).max() > 0


def test_config_errors_name_the_field():
  images = _images(4, 5)
  with pytest.raises(ValueError, match='batch_size'):
    refine.train_refiner(images, _amap_fn, _cfg(batch_size=6), jax.random.key(0))
  with pytest.raises(ValueError, match='model.refine.loss'):
    refine.train_refiner(images, _amap_fn, _cfg(loss='l1'), jax.random.key(0))
  with pytest.raises(ValueError, match='pool_size'):
    refine.train_refiner(images, _amap_fn, _cfg(pool_size=-1), jax.random.key(0))
  with pytest.raises(ValueError, match='normal_images'):
    refine.train_refiner(images[0], _amap_fn, _cfg(), jax.random.key(0))


def test_save_refine_samples(tmp_path):
  from PIL import Image
  images = _images(3, 6)
  maps = np.random.default_rng(0).uniform(size=(3, S, S)).astype(np.float32)
  mask = (maps > 0.7).astype(np.float32)
  path = tmp_path / 'samples.png'
  refine.save_refine_samples(path, images, mask, maps, maps, panel_inches=1.0, dpi=50)
  with Image.open(path) as im:
    assert im.size[0] == 4 * 50 and im.size[1] == int(round((3 * 1.0 + 0.4) * 50))
  with pytest.raises(ValueError, match='refined'):
    refine.save_refine_samples(path, images, mask, maps, maps[:2])
