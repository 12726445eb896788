"""pni_jax.backbones: torchvision parity, real Lite0 weights, converter, extractor contract.

Golden files (tests/golden/, written once by tools/record_golden.py with torch + torchvision):
for each architecture the torchvision state_dict manifest, a seed and compact summaries of every
tap of the torch model. Here the same numpy weights are redrawn under the torch names, pushed
through the package's converter (the code path of tools/convert_weights.py) and compared.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pni_jax import backbones
from pni_jax.backbones import layers
from pni_jax.backbones import synthetic
from pni_jax.backbones import torch_pickle

GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden'
TOOLS = pathlib.Path(__file__).resolve().parent.parent / 'tools'
PARITY_TOL = 1e-4
ALL_TAPS = backbones.TAP_ORDER
# The parity runs only need correct numbers: skipping XLA's backend optimisation passes cuts
# the compile time of the 100-layer nets ~3x on CPU (results agree to ~1e-6). The wide ResNets
# are the exception: there the unoptimised run costs more than the compile saves.
FAST_COMPILE = {'xla_backend_optimization_level': 0}
COMPILE_OPTIONS = {'wide_resnet50_2': {}, 'wide_resnet101_2': {}}
LITE = 'efficientnet_lite0'


def _golden(name: str):
  return np.load(GOLDEN / f'{name}.npz')


def _variables_for_golden(name: str, golden) -> dict:
  if name == LITE:
    return backbones.load_variables(name)  # the real weights, as recorded
  assert str(golden['scheme']) == synthetic.SCHEME, 'golden files older than the weight scheme'
  manifest = json.loads(str(golden['manifest']))
  state_dict = synthetic.synthetic_state_dict(manifest, int(golden['seed']))
  return backbones.convert_state_dict(name, state_dict)


def _run_all_taps(name: str, variables, x: np.ndarray) -> dict[str, np.ndarray]:
  model = backbones.build(name)
  fn = jax.jit(lambda v, x: model.apply(v, x, taps=ALL_TAPS))
  options = COMPILE_OPTIONS.get(name, FAST_COMPILE)
  out = fn.lower(variables, x).compile(options)(variables, x)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize('name', backbones.names())
def test_parity_with_torchvision_golden(name):
  golden = _golden(name)
  assert str(golden['name']) == name
  variables = _variables_for_golden(name, golden)
  seed = int(golden['seed'])
  x = synthetic.golden_input(seed, tuple(int(s) for s in golden['input_shape']))
  taps = _run_all_taps(name, variables, x)

  want_shapes = json.loads(str(golden['tap_shapes']))
  assert {k: list(v.shape) for k, v in taps.items()} == want_shapes
  spec = backbones.spec(name)
  for tap, value in taps.items():
    assert value.shape[-1] == spec.channels[tap], tap
    if tap != 'logits':  # torch output sizes: ceil-ish division of 66 x 58 by the stride
      assert abs(value.shape[1] - x.shape[1] / spec.strides[tap]) < 1, tap
      assert abs(value.shape[2] - x.shape[2] / spec.strides[tap]) < 1, tap

  summary = synthetic.summarize(taps, seed)
  errors = {k: synthetic.relative_error(v, golden[k]) for k, v in summary.items()}
  assert set(summary) == {k for k in golden.files if k.startswith(('sample/', 'proj/'))}
  worst = max(errors.values())
  print(f'{name}: worst relative error {worst:.2e}')
  assert worst <= PARITY_TOL, {k: f'{v:.2e}' for k, v in errors.items()}


# ------------------------------------------------------------------ EfficientNet-Lite0, real data


@pytest.fixture(scope='module')
def lite_variables():
  return backbones.load_variables(LITE)


def _center_224(image_u8: np.ndarray) -> np.ndarray:
  from skimage import transform  # pylint: disable=import-outside-toplevel
  image = image_u8.astype(np.float32) / 255.0
  h, w = image.shape[:2]
  s = min(h, w)
  image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  return transform.resize(image, (224, 224), anti_aliasing=True).astype(np.float32)


@pytest.fixture(scope='module')
def photos():
  data = pytest.importorskip('skimage.data')
  return np.stack([_center_224(data.chelsea()), _center_224(data.coffee())])


@pytest.fixture(scope='module')
def lite_outputs(lite_variables, photos):
  fn = jax.jit(backbones.extractor(LITE, lite_variables, taps=('layer2', 'layer3', 'logits')))
  return {k: np.asarray(v) for k, v in fn(lite_variables, photos).items()}


def test_lite0_classifies_chelsea_as_cat_and_coffee_as_espresso(lite_outputs):
  probs = np.asarray(jax.nn.softmax(lite_outputs['logits']))
  top = probs.argmax(axis=1)
  assert 281 <= top[0] <= 285, (top[0], probs[0].max())   # tabby .. Egyptian cat
  assert top[1] == 967, (top[1], probs[1].max())          # espresso
  assert probs[1, 967] > 0.5
  assert lite_outputs['layer2'].shape == (2, 28, 28, 40)
  assert lite_outputs['layer3'].shape == (2, 14, 14, 112)


def test_lite0_bfloat16_compute_keeps_float32_params(lite_variables, photos, lite_outputs):
  fn16 = jax.jit(backbones.extractor(LITE, taps=('layer3', 'logits'), dtype=jnp.bfloat16))
  out16 = fn16(lite_variables, photos)
  assert out16['layer3'].dtype == jnp.bfloat16 and out16['logits'].dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(lite_variables))
  a = np.asarray(out16['layer3'], np.float32)
  b = lite_outputs['layer3']
  rel = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert rel < 0.1, rel
  assert np.asarray(out16['logits'], np.float32).argmax(axis=1)[1] == 967


@pytest.mark.parametrize('size,kernel,stride', [(9, 3, 2), (10, 3, 2), (10, 5, 2), (7, 5, 1)])
def test_depthwise_shifted_matches_grouped_convolution(size, kernel, stride):
  rng = np.random.default_rng(size * kernel + stride)
  x = rng.standard_normal((2, size, size + 1, 6)).astype(np.float32)
  shifted = layers.DepthwiseConv(kernel, stride, impl='shifted')
  grouped = layers.DepthwiseConv(kernel, stride, impl='conv')
  kernel = rng.standard_normal((kernel, kernel, 1, 6)).astype(np.float32)
  variables = {'params': {'kernel': kernel}}
  a = np.asarray(jax.jit(shifted.apply)(variables, x))
  b = np.asarray(jax.jit(grouped.apply)(variables, x))
  assert a.shape == (2, -(-size // stride), -(-(size + 1) // stride), 6)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size,kernel,stride', [(9, 3, 2), (10, 3, 2), (10, 5, 2), (7, 5, 1),
                                                (8, 3, 1)])
def test_depthwise_shifted_gradients_match_grouped_convolution(size, kernel, stride):
  # The hand-written VJP (input and kernel gradients) against autodiff of the grouped conv,
  # on odd and even sizes (asymmetric 'SAME' padding), strides 1 and 2.
  rng = np.random.default_rng(100 + size * kernel + stride)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
  shifted = layers.DepthwiseConv(kernel, stride, impl='shifted')
  grouped = layers.DepthwiseConv(kernel, stride, impl='conv')
  out_shape = (2, -(-size // stride), -(-(size + 1) // stride), 6)
  cot = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

  def loss(module):
    return lambda x, w: jnp.sum(module.apply({'params': {'kernel': w}}, x) * cot)

  got = jax.jit(jax.grad(loss(shifted), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(grouped), argnums=(0, 1)))(x, w)
  for g, r, name in zip(got, want, ('input', 'kernel')):
    assert g.shape == r.shape, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize('stride,use_bias', [(1, False), (2, True), (2, False)])
def test_pointwise_matches_a_1x1_convolution_values_and_gradients(stride, use_bias):
  # layers.conv builds 1 x 1 convolutions as a dot: same parameters as nn.Conv, same outputs and
  # gradients (odd and even sizes, stride 2 takes rows / columns 0, 2, ...).
  rng = np.random.default_rng(7 + stride)
  x = jnp.asarray(rng.standard_normal((2, 7, 8, 5)), jnp.float32)
  point = layers.conv(4, 1, stride=stride, use_bias=use_bias)
  assert isinstance(point, layers.Pointwise)
  ref = nn.Conv(4, (1, 1), strides=(stride, stride), padding=0, use_bias=use_bias)
  variables = ref.init(jax.random.key(0), x)
  if use_bias:
    variables = {'params': dict(variables['params'],
                                bias=jnp.asarray(rng.standard_normal(4), jnp.float32))}
  assert (jax.tree.map(jnp.shape, point.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, variables))
  got, want = point.apply(variables, x), ref.apply(variables, x)
  assert got.shape == want.shape == (2, -(-7 // stride), -(-8 // stride), 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  grad = lambda m: jax.grad(lambda v, x: jnp.sum(m.apply(v, x) * cot), argnums=(0, 1))(
      variables, x)
  for g, r in zip(jax.tree.leaves(grad(point)), jax.tree.leaves(grad(ref))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
  # Padded or grouped 1 x 1 convolutions stay convolutions.
  assert isinstance(layers.conv(4, 1, padding=1), nn.Conv)
  assert isinstance(layers.conv(4, 1, groups=2), nn.Conv)


@pytest.mark.parametrize('cin,size,stride,padding,use_bias', [
    (3, 16, 2, 'SAME', False), (3, 15, 2, 'SAME', True), (1, 12, 2, 'SAME', False),
    (4, 9, 1, 1, False), (2, 10, 2, ((1, 2), (0, 1)), True)])
def test_small_conv_matches_nn_conv_values_and_gradients(cin, size, stride, padding, use_bias):
  # Few-input-channel convolutions (Lite0's RGB stem, the refinement's map conv) run as one fused
  # multiply-add loop: same parameters, outputs and gradients as nn.Conv ('SAME' with odd and
  # even sizes, torch-style integer padding, explicit pairs, stride 1 and 2, bias).
  rng = np.random.default_rng(cin * 100 + size)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, cin)), jnp.float32)
  small = layers.SmallConv(5, 3, stride, padding, use_bias)
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  ref = nn.Conv(5, (3, 3), strides=(stride, stride), padding=pad, use_bias=use_bias)
  variables = ref.init(jax.random.key(0), x)
  if use_bias:
    variables = {'params': dict(variables['params'],
                                bias=jnp.asarray(rng.standard_normal(5), jnp.float32))}
  assert (jax.tree.map(jnp.shape, small.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, variables))
  got, want = small.apply(variables, x), ref.apply(variables, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  grad = lambda m: jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x) * cot), argnums=(0, 1)))(
      variables, x)
  for g, r in zip(jax.tree.leaves(grad(small)), jax.tree.leaves(grad(ref))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
  # bfloat16: inputs and kernel rounded to bfloat16, float32 accumulation, bfloat16 output.
  low = layers.SmallConv(5, 3, stride, padding, use_bias, dtype=jnp.bfloat16)
  out = low.apply(variables, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), rtol=0.05, atol=0.05)


@pytest.mark.parametrize('stride,padding,use_bias,features', [
    (1, 'SAME', True, 20), (2, 'SAME', False, 20), (1, ((1, 2), (0, 1)), True, 20),
    (2, 1, True, 20), (1, 'SAME', True, 7)])
def test_tap_grad_conv_matches_nn_conv_values_and_gradients(stride, padding, use_bias, features):
  # layers.Conv (the refinement decoder's 3 x 3 convolutions): nn.Conv's parameters and forward;
  # from TAP_GRAD_MIN_FEATURES output channels on its kernel gradient is summed tap by tap on CPU
  # (conv_tap_grad), equal up to summation order; narrower kernels keep the convolution's own.
  assert jax.default_backend() == 'cpu'     # the tap branch is the one under test
  taps = features >= layers.TAP_GRAD_MIN_FEATURES
  assert taps == (features == 20)
  rng = np.random.default_rng(stride * 10 + use_bias)
  x = jnp.asarray(rng.standard_normal((3, 11, 12, 6)), jnp.float32)
  conv = layers.Conv(features, 3, stride, padding, use_bias)
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  ref = nn.Conv(features, (3, 3), strides=(stride, stride), padding=pad, use_bias=use_bias,
                kernel_init=layers.conv_init)
  variables = ref.init(jax.random.key(0), x)
  assert (jax.tree.map(jnp.shape, conv.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, variables))
  if use_bias:
    variables = {'params': dict(variables['params'],
                                bias=jnp.asarray(rng.standard_normal(features), jnp.float32))}
  got, want = conv.apply(variables, x), ref.apply(variables, x)
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))   # the same convolution
  cot = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  grad = lambda m: jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x) * cot), argnums=(0, 1)))(
      variables, x)
  (gv, gx), (rv, rx) = grad(conv), grad(ref)
  np.testing.assert_array_equal(np.asarray(gx), np.asarray(rx))      # the convolution's own
  for g, r in zip(jax.tree.leaves(gv), jax.tree.leaves(rv)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-4)
  if not taps:                            # narrow: the convolution's own kernel gradient, exactly
    np.testing.assert_array_equal(np.asarray(gv['params']['kernel']),
                                  np.asarray(rv['params']['kernel']))
  assert float(jnp.abs(gv['params']['kernel']).max()) > 1.0         # not a vanishing gradient
  # bfloat16 compute: bfloat16 output and kernel gradient close to float32's.
  low = layers.Conv(features, 3, stride, padding, use_bias, dtype=jnp.bfloat16)
  assert low.apply(variables, x).dtype == jnp.bfloat16
  lv, _ = grad(low)
  np.testing.assert_allclose(np.asarray(lv['params']['kernel']), np.asarray(rv['params']['kernel']),
                             rtol=0.05, atol=0.3)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax_values_statistics_and_gradients(dtype):
  # layers.BatchNorm: flax's variables, running-average update and outputs (both modes, exact),
  # with the training-mode VJP written out (batch_norm_train): gradients equal up to rounding.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 6, 7, 5)) * 3 + 1, dtype)
  ref = nn.BatchNorm(momentum=0.9, epsilon=1e-3, dtype=dtype, param_dtype=jnp.float32)
  ours = layers.batch_norm(epsilon=1e-3, dtype=dtype)
  assert isinstance(ours, layers.BatchNorm)
  shapes = lambda m: jax.tree.map(jnp.shape, m.init(jax.random.key(0), x,
                                                     use_running_average=False))
  assert shapes(ours) == shapes(ref)
  variables = {'params': {'scale': jnp.asarray(rng.random(5) + 0.5, jnp.float32),
                          'bias': jnp.asarray(rng.random(5), jnp.float32)},
               'batch_stats': {'mean': jnp.asarray(rng.random(5), jnp.float32),
                               'var': jnp.asarray(rng.random(5) + 0.5, jnp.float32)}}
  for running in (True, False):
    (got, got_stats), (want, want_stats) = [
        m.apply(variables, x, use_running_average=running, mutable=['batch_stats'])
        for m in (ours, ref)]
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for g, r in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
  cot = jnp.asarray(rng.standard_normal(x.shape), dtype)

  def grads(m):
    def loss(params, x):
      y, _ = m.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                     use_running_average=False, mutable=['batch_stats'])
      return jnp.sum(jnp.asarray(y, jnp.float32) * jnp.asarray(cot, jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)

  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  got, want = grads(ours), grads(ref)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.abs(r).max() > 0.1
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol * np.abs(r).max())


def test_conv_picks_small_conv_only_when_the_caller_names_few_input_channels():
  assert isinstance(layers.conv(32, 3, stride=2, padding='SAME', in_channels=3), layers.SmallConv)
  assert isinstance(layers.conv(32, 3, padding=1, in_channels=4), layers.SmallConv)   # 36 terms
  assert isinstance(layers.conv(32, 3, padding=1, in_channels=5), nn.Conv)            # 45 terms
  assert isinstance(layers.conv(64, 7, stride=2, padding=3, in_channels=3), nn.Conv)  # 147 terms
  assert isinstance(layers.conv(32, 3, padding=1), nn.Conv)                  # channels unknown
  assert isinstance(layers.conv(32, 3, padding=1, groups=3, in_channels=3), nn.Conv)


def test_extractor_is_pure_and_second_call_does_not_recompile(resnet18_random):
  traces = []
  extract = backbones.extractor('resnet18', resnet18_random, taps=('layer2', 'layer3'))

  def counted(variables, images):
    traces.append(images.shape)  # runs only while tracing
    return extract(variables, images)

  fn = jax.jit(counted)
  rng = np.random.default_rng(0)
  x1 = rng.uniform(size=(2, 64, 64, 3)).astype(np.float32)
  x2 = rng.uniform(size=(2, 64, 64, 3)).astype(np.float32)
  out1 = fn(resnet18_random, x1)
  out2 = fn(resnet18_random, x2)
  assert len(traces) == 1 and fn._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(fn(resnet18_random, x1)['layer2']),
                                np.asarray(out1['layer2']))
  assert not np.allclose(np.asarray(out1['layer3']), np.asarray(out2['layer3']))
  fn(resnet18_random, x1[:1])  # a new shape compiles once more
  assert len(traces) == 2 and fn._cache_size() == 2  # pylint: disable=protected-access
  assert set(out1) == {'layer2', 'layer3'}
  assert out1['layer2'].shape == (2, 8, 8, 128) and out1['layer3'].shape == (2, 4, 4, 256)


def test_preprocess_matches_each_backbone_normalisation():
  x = np.random.default_rng(1).uniform(size=(1, 4, 5, 3)).astype(np.float32)
  lite = np.asarray(backbones.preprocess(LITE, x))
  np.testing.assert_allclose(lite, (255.0 * x - 127.0) / 128.0, rtol=1e-5, atol=1e-5)
  tv = np.asarray(backbones.preprocess('wide_resnet101_2', x))
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(tv, (x - mean) / std, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    backbones.preprocess(LITE, x[..., :2])
  with pytest.raises(ValueError, match='uint8'):
    backbones.preprocess(LITE, (x * 255).astype(np.uint8))


# ------------------------------------------------------------------ early stop, first-conv split


@pytest.fixture(scope='module')
def resnet18_random():
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return backbones.load_variables('resnet18', allow_random_init=True)


def _without(variables, modules):
  return {col: {k: v for k, v in tree.items() if k not in modules}
          for col, tree in variables.items()}


def test_unrequested_stages_are_never_built_or_run(resnet18_random):
  model = backbones.build('resnet18')
  x = np.random.default_rng(2).standard_normal((1, 64, 64, 3)).astype(np.float32)
  partial = _without(resnet18_random, {'layer3', 'layer4', 'fc'})
  out = model.apply(partial, x, taps=('layer1', 'layer2'))  # would fail if layer3 ran
  assert set(out) == {'layer1', 'layer2'} and out['layer2'].shape == (1, 8, 8, 128)
  full = model.apply(resnet18_random, x, taps=('layer2',))
  np.testing.assert_array_equal(np.asarray(out['layer2']), np.asarray(full['layer2']))
  with pytest.raises(Exception, match='layer3'):
    model.apply(partial, x, taps=('layer3',))


def test_first_conv_split_composes_to_the_full_network(resnet18_random):
  model = backbones.build('resnet18')
  x = np.random.default_rng(3).standard_normal((1, 48, 40, 3)).astype(np.float32)
  h = model.apply(resnet18_random, x, method='first_conv')
  assert h.shape == (1, 24, 20, 64)
  split = model.apply(resnet18_random, h, taps=('stem', 'layer2'), method='from_first_conv')
  whole = model.apply(resnet18_random, x, taps=('stem', 'layer2'))
  for k in whole:
    np.testing.assert_allclose(np.asarray(split[k]), np.asarray(whole[k]), rtol=1e-6, atol=1e-6)


class _FusingEncoder(nn.Module):
  """How the refinement net reuses an encoder: fuse a map after the first convolution."""

  def setup(self):
    self.encoder = backbones.build('resnet18')
    self.map_conv = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                            kernel_init=nn.initializers.zeros)

  def __call__(self, image, anomaly_map):
    h = self.encoder.first_conv(image) + self.map_conv(anomaly_map)
    return self.encoder.from_first_conv(h, taps=('stem', 'layer1'))


def test_encoder_reuse_with_fusion_after_first_conv(resnet18_random):
  x = np.random.default_rng(4).standard_normal((1, 32, 32, 3)).astype(np.float32)
  m = np.random.default_rng(5).uniform(size=(1, 32, 32, 1)).astype(np.float32)
  fusing = _FusingEncoder()
  variables = fusing.init(jax.random.PRNGKey(0), x, m)
  assert set(variables['params']) == {'encoder', 'map_conv'}
  variables = {'params': {**variables['params'], 'encoder': resnet18_random['params']},
               'batch_stats': {'encoder': resnet18_random['batch_stats']}}
  fused = fusing.apply(variables, x, m)  # map_conv is zero: must equal the plain encoder
  plain = backbones.build('resnet18').apply(resnet18_random, x, taps=('stem', 'layer1'))
  for k in plain:
    np.testing.assert_allclose(np.asarray(fused[k]), np.asarray(plain[k]), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ weights, converter, errors


def test_unknown_names_and_taps_are_rejected():
  for call in (lambda: backbones.build('resnet34'), lambda: backbones.spec('vgg16'),
               lambda: backbones.load_variables('vit_b_16')):
    with pytest.raises(ValueError, match='wide_resnet101_2'):
      call()
  with pytest.raises(ValueError, match='layer5'):
    backbones.extractor('resnet18', taps=('layer2', 'layer5'))
  with pytest.raises(ValueError, match='densenet161'):
    backbones.extractor('densenet161', {'params': {'conv1': {}}})
  assert set(backbones.names()) >= {'resnet18', 'resnet50', 'resnet101', 'wide_resnet50_2',
                                    'wide_resnet101_2', 'resnext101_32x8d', 'densenet161',
                                    'densenet201', LITE}


def test_missing_weights_say_how_to_convert(tmp_path):
  with pytest.raises(FileNotFoundError, match='convert_weights.py --arch wide_resnet101_2'):
    backbones.load_variables('wide_resnet101_2')
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match=r'convert_weights\.py --arch densenet201') as e:
    backbones.load_variables('densenet201', str(missing), allow_random_init=True)
  assert str(missing) in str(e.value)
  with pytest.raises(FileNotFoundError, match=r'not an orbax checkpoint[\s\S]*convert_weights'):
    backbones.load_variables('resnet18', str(tmp_path))  # an empty directory


def test_random_init_only_when_allowed_and_warns():
  with pytest.warns(UserWarning, match='NOT pretrained'):
    variables = backbones.load_variables('resnet18', allow_random_init=True,
                                         key=jax.random.PRNGKey(3))
  assert variables['params']['layer4']['block1']['conv2']['kernel'].shape == (3, 3, 512, 512)
  assert variables['batch_stats']['bn1']['var'].shape == (64,)


def test_converter_rejects_a_state_dict_of_another_architecture():
  manifest = json.loads(str(_golden('resnet18')['manifest']))
  state_dict = synthetic.synthetic_state_dict(manifest, 0)
  with pytest.raises(ValueError, match="does not fit backbone 'resnet50'"):
    backbones.convert_state_dict('resnet50', state_dict)


def test_convert_weights_cli_roundtrip(tmp_path, lite_variables):
  sys.path.insert(0, str(TOOLS))
  try:
    cli = importlib.import_module('convert_weights')
  finally:
    sys.path.remove(str(TOOLS))
  out = tmp_path / 'lite0'
  assert cli.main(['--arch', LITE, '--from', backbones.embedded_lite0_path(),
                   '--out', str(out)]) == 0
  restored = backbones.load_variables(LITE, str(out))
  jax.tree.map(np.testing.assert_array_equal, restored, lite_variables)
  assert cli.main(['--arch', LITE, '--from', 'embedded', '--out', str(out)]) == 1  # exists
  with pytest.raises(ValueError, match="weights for 'efficientnet_lite0', not 'resnet18'"):
    backbones.load_variables('resnet18', str(out))


@pytest.mark.parametrize('filename', ['tiny_zip.pth', 'tiny_legacy.pth'])
def test_torch_files_read_without_torch(filename):
  expected = np.load(GOLDEN / 'tiny_expected.npz')
  state = torch_pickle.load_state_dict(GOLDEN / filename)
  assert list(state) == list(expected['keys'])
  for key in state:
    np.testing.assert_array_equal(state[key], expected[key])
    assert state[key].dtype == expected[key].dtype, key


def test_torch_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='absent.pth'):
    torch_pickle.load_state_dict(tmp_path / 'absent.pth')
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='junk.pth'):
    torch_pickle.load_state_dict(junk)
