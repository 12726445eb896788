"""Pixelwise refinement (paper section 3.3, eq. 9-11, Figure 4): network, losses, training, fusion.

Network `RefineNet` f(I, A_hat): an ImageNet encoder (DenseNet-161 in the paper, EfficientNet-Lite0
for CPU runs) into which the map is fused EARLY, after the encoder's first convolution, and a
decoder of 5 blocks `bilinear x2 -> 1x1 conv + ReLU -> 3x3 conv + ReLU` that ends in a 1x1 conv
to one channel: the residual r, zero-initialised (the untrained network returns its input map),
and the output is `A_hat + r` ("output added to the input map"). Two architectures
(`model.refine.arch`):

  'paper'  the paper's Figure 4 as the authors coded it: the map enters the pretrained encoder as
           a grey image (A_hat repeated to RGB and preprocessed like one) through a copy of the
           encoder's pretrained first conv ('map_conv', initialised from those weights), the two
           first-conv outputs are averaged ((image + map) / 2, which is one convolution over the
           stacked image and map channels) and the rest of the encoder runs from there; the
           decoder has NO skips: a 1x1 conv from layer4 to `decoder_width` channels (authors:
           768 for DenseNet-161's 2208), then 5 blocks halving it (768 -> 384 .. 24).
  'skips'  our earlier variant: the map (scaled to [-1, 1]) through a randomly initialised conv
           of the first conv's geometry, SUMMED with the image's first conv; the decoder blocks
           have C4 / 2 .. C4 / 32 channels (C4 = layer4 channels; DenseNet-161: 1104 .. 69, Lite0:
           160 .. 10) and concatenate U-Net skips at matching resolutions: layer3, layer2,
           layer1 and stem for blocks 1-4, the 4-channel network input (preprocessed image +
           scaled map) at full resolution for block 5.
Upsampling uses half-pixel centres (the authors' code: align_corners=True). A saved network's
architecture is read from its variables (`arch_of`), so inference needs no setting.

Heads. For the paper's loss ('reg_grad') the refined map is `A_hat + r`. For the Table 4
alternatives ('ce', 'focal') the residual is added in logit space: logits = logit(clip(A_hat,
1e-3, 1 - 1e-3)) + r and the refined map is sigmoid(logits), a probability that equals A_hat at
initialisation; the losses take those logits (numerically stable sigmoid cross-entropy).

Losses (eq. 10-11), per image, then averaged over the batch:
  l_reg  = ||A~ - A||_2 / (H W)
  l_grad = (||grad_h A~ - grad_h A||_2 + ||grad_w A~ - grad_w A||_2) / (2 H W)
  loss   = (l_reg + l_grad) / 2
with forward differences (grad_h X = X[1:, :] - X[:-1, :]) and ||.||_2 the Frobenius norm.

Map normalisation. The input map and the target both live in [0, 1] (paper): A_hat is mapped with
GLOBAL statistics `normalize_map(a, lo, hi) = clip((a - lo) / (hi - lo), 0, 1)`, where, at fit time,
lo = the `norm_quantiles[0]` (default 1 %) quantile of A_hat over the pixels outside the synthetic
defects (normal texture) and hi = the `norm_quantiles[1]` (default 99 %) quantile of A_hat inside
the synthetic defect masks. A low normal quantile keeps almost the whole normal range unclipped (the
network can still see how normal a pixel is), a high defect quantile maps clearly detected defects
to ~1 like the target. Per-image min-max would stretch a normal image's noise to [0, 1].

Training (`train_refiner`, flax examples/imagenet style, the loop helper `train_loop`): a
`TrainState`, pure jitted steps (online flip / 90-degree rotation / colour augmentation inside the
step, forward, loss, Adam) and a Python loop with clu metrics, progress lines and orbax checkpoints
every `checkpoint_every` iterations. Each sample: normal training images (picked from the run key
and the step number), a synthetic defect (`synth.synthesize_balanced`: the four kinds in equal
ratio), A_hat from the caller's `amap_fn` on the synthetic image at full size, then image, map and
mask resized to `input_size`; augmentation comes after A_hat (the geometry moves image, map and
mask together, the colour jitter changes the image only, teaching robustness to colour shifts the
map does not follow). `pool_size > 0` synthesises a fixed pool of samples (and their A_hat)
once and trains with online augmentation drawn from it (amap_fn dominates on CPU); `pool_size = 0`
synthesises every batch afresh, as the paper. All randomness derives from (key, step): a run killed
and resumed from its checkpoint directory ends with bit-identical weights.

On the device: the normal images live on the device (uint8 as given; beyond
`device_images_mb` a buffer of them is reloaded every few steps, with the same picks), and a step
is a few dispatches with no host round trip: the jitted synthesis (`_sample`), the caller's
jitted `amap_fn`, the jitted batch preparation (`_online_batch`: resize, normalisation;
`_pool_batch` draws from the device-resident pool instead) and the jitted `train_step`
(augmentation, forward, backward, Adam). They compile separately, `train_step` (the big one)
once for both modes; metrics stay on the device until a log point. Data parallel over a
`sharding.make_mesh()` mesh: the batch is split over the devices (when it divides), the state
replicated, and GSPMD reduces BatchNorm statistics and gradients over the global batch.
`model.refine.precision = 'bfloat16'` computes in bfloat16 with float32 master weights, Adam
state, loss and outputs.

Fusion at inference (`fuse`): final = (1 - w) * normalize(A_hat) + w * refined (paper: w = 0.1),
the network running at `input_size` (image and map resized there, the refined map resized back).

Shapes: images [B, S, S, 3] float32 in [0, 1] (NHWC); maps and masks [B, S, S] float32.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from clu import metrics as clu_metrics
import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pni_jax import backbones
from pni_jax import checkpoints
from pni_jax.backbones import convert
from pni_jax import fileio
from pni_jax import sharding
from pni_jax import synth
from pni_jax import train_loop

LOSSES = ('reg_grad', 'ce', 'focal')
HEADS = ('residual', 'logit')
ENCODER_TAPS = ('stem', 'layer1', 'layer2', 'layer3', 'layer4')
TEXTURE_SOURCES = ('procedural', 'images')
LOGIT_EPS = 1e-3              # A_hat is clipped to [eps, 1 - eps] before logit() (ce / focal)
FOCAL_GAMMA = 2.0

# First convolution of each encoder family: (kernel, padding) as the encoder's own first conv.
_FIRST_CONV = {
    'densenet': (7, ((3, 3), (3, 3))),
    'resnet': (7, ((3, 3), (3, 3))),
    'efficientnet_lite': (3, 'SAME'),
}

# Salts for `jax.random.fold_in`: one independent stream per use of the run key.
_SALT_INIT, _SALT_POOL, _SALT_CALIB, _SALT_STEP = 0, 1, 2, 3

ARCHS = ('paper', 'skips')
PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Defaults of the optional cfg.model.refine fields (configs written before a field existed).
DEFAULTS = dict(pool_size=0, allow_random_init=False, texture_source='procedural',
                norm_quantiles=(0.01, 0.99), calibration_samples=64, augment=True,
                log_every=100, arch='skips', decoder_width=0, precision='float32',
                device_images_mb=1024.0)


def head_for_loss(loss: str) -> str:
  """'reg_grad' -> 'residual' (A_hat + r); 'ce' | 'focal' -> 'logit' (sigmoid(logit A_hat + r))."""
  if loss not in LOSSES:
    raise ValueError(f'model.refine.loss must be one of {LOSSES}, got {loss!r}')
  return 'residual' if loss == 'reg_grad' else 'logit'


def _get(cfg, name: str):
  return cfg.get(name, DEFAULTS[name]) if hasattr(cfg, 'get') else DEFAULTS[name]


# ----------------------------------------------------------------------------- network


def _double(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  """Bilinear x2 upsampling along `axis` with half-pixel centres: output 2k is 0.75 x[k] + 0.25
  x[k - 1], output 2k + 1 is 0.75 x[k] + 0.25 x[k + 1], the neighbour clamped at the edges (what
  `jax.image.resize` computes there, up to float32 rounding)."""
  n = x.shape[axis]
  take = lambda lo, hi: jax.lax.slice_in_dim(x, lo, hi, axis=axis)
  prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)
  nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
  even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def _resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Bilinear resize of the spatial axes 1, 2 of [B, H, W, ...] (half-pixel centres,
  antialiased when shrinking). Exact doubling, as between the decoder's blocks, is two fused
  shifted sums (`_double`) instead of `jax.image.resize`'s products with [2n, n] weight matrices
  (on XLA:CPU, 17 ms of a demo train step's 270 with their copies and gradients)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  if tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
    return _double(_double(x, 1), 2)
  return jax.image.resize(x, (x.shape[0], *size, *x.shape[3:]), 'bilinear')


class UpMix(nn.Module):
  """The 1x1 conv of [resize(x, size), skip]: nn.Conv(features, (1, 1))'s parameters ('kernel'
  [1, 1, c + c_skip, F], 'bias' [F]) and values up to float32 rounding, computed as
  resize(x @ kernel[:c]) + skip @ kernel[c:] + bias. A resize is linear per channel, so the
  channel mix moves to the coarse grid: 4x fewer positions for x's part, and neither the
  upsampled x nor the concatenation is materialised."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, skip: jnp.ndarray | None,
               size: tuple[int, int]) -> jnp.ndarray:
    c = x.shape[-1]
    total = c + (0 if skip is None else skip.shape[-1])
    kernel = self.param('kernel', backbones.layers.conv_init, (1, 1, total, self.features),
                        jnp.float32)
    kernel = jnp.asarray(kernel[0, 0], self.dtype)
    y = _resize(backbones.layers.pointwise(jnp.asarray(x, self.dtype), kernel[:c]), size)
    if skip is not None:
      y = y + backbones.layers.pointwise(jnp.asarray(skip, self.dtype), kernel[c:])
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return y + jnp.asarray(bias, self.dtype)


class UpBlock(nn.Module):
  """Bilinear upsampling to `size` (x2 for the encoder's strides), concat skip, 1x1 conv + ReLU
  (`UpMix`: the same, mixed before upsampling), 3x3 conv + ReLU.
  x: [B, h, w, c] -> [B, size[0], size[1], features]."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, skip: jnp.ndarray | None,
               size: tuple[int, int]) -> jnp.ndarray:
    x = nn.relu(UpMix(self.features, dtype=self.dtype, name='conv1x1')(x, skip, size))
    return nn.relu(backbones.layers.Conv(self.features, 3, padding='SAME', use_bias=True,
                                         dtype=self.dtype, name='conv3x3')(x))


def decoder_features(encoder: str, arch: str = 'skips', width: int = 0) -> tuple[int, ...]:
  """Channels of the 5 decoder blocks. 'skips': C4 / 2 .. C4 / 32 (C4 = layer4 channels);
  'paper': width / 2 .. width / 32 (width 0: C4 / 2); at least 8 each."""
  if arch not in ARCHS:
    raise ValueError(f'model.refine.arch must be one of {ARCHS}, got {arch!r}')
  c4 = backbones.spec(encoder).channels['layer4']
  top = c4 if arch == 'skips' else (int(width) or c4 // 2)
  return tuple(max(top // 2 ** k, 8) for k in range(1, 6))


def _out_conv(dtype) -> nn.Module:
  """The last 1x1 conv to the one-channel residual, zero-initialised."""
  return backbones.layers.Pointwise(1, use_bias=True, dtype=dtype,
                                    kernel_init=nn.initializers.zeros, name='out_conv')


class Decoder(nn.Module):
  """5 `UpBlock`s to the given sizes, with a skip each ('skips') or none (`skips` is None:
  'paper', then a 1x1 conv to `width` channels comes first), then the zero-initialised 1x1 conv
  to one channel. deepest: [B, h, w, C4] -> r [B, sizes[-1][0], sizes[-1][1]] float32."""
  features: Sequence[int]
  width: int = 0                      # 'paper': channels of the first 1x1 conv (0: none)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, deepest: jnp.ndarray, sizes: Sequence[tuple[int, int]],
               skips: Sequence[jnp.ndarray] | None = None) -> jnp.ndarray:
    h = deepest
    if self.width:
      h = backbones.layers.Pointwise(self.width, use_bias=True, dtype=self.dtype,
                                     name='conv0')(h)
    for i, (features, size) in enumerate(zip(self.features, sizes)):
      skip = None if skips is None else skips[i]
      h = UpBlock(features, dtype=self.dtype, name=f'up{i + 1}')(h, skip, tuple(size))
    return jnp.asarray(_out_conv(self.dtype)(h)[..., 0], jnp.float32)


def _map_conv(encoder: str, dtype, in_channels: int, name: str | None = None) -> nn.Module:
  """The map's first conv: kernel, stride, padding and channels of the encoder's first conv
  (input channels from its input: 3 for 'paper', 1 for 'skips'); `layers.conv` makes it a
  `SmallConv` where it is small enough (Lite0), else an nn.Conv (same parameters)."""
  spec = backbones.spec(encoder)
  kernel, padding = _FIRST_CONV[spec.family]
  return backbones.layers.conv(spec.channels['stem'], kernel, stride=2, padding=padding,
                               dtype=dtype, in_channels=in_channels, name=name)


class RefineNet(nn.Module):
  """The refinement network f(I, A_hat) (module docstring).

  Attributes:
    encoder: backbone name ('densenet161' | 'efficientnet_lite0' | any `backbones.names()`); its
      variables live under the submodule 'encoder' (then 'map_conv' and 'decoder').
    head: 'residual' (refined = A_hat + r) or 'logit' (refined = sigmoid(logit(A_hat) + r)).
    dtype: compute dtype (params stay float32; outputs are float32).
    arch: 'paper' | 'skips' (module docstring).
    decoder_width: 'paper': channels of the decoder's first 1x1 conv (0: C4 / 2).
  """
  encoder: str = 'densenet161'
  head: str = 'residual'
  dtype: Any = jnp.float32
  arch: str = 'paper'
  decoder_width: int = 0

  @nn.compact
  def residual(self, images01: jnp.ndarray, amap: jnp.ndarray, train: bool) -> jnp.ndarray:
    """images01: [B, S, S, 3] float in [0, 1]; amap: [B, S, S] in [0, 1] -> r [B, S, S] float32."""
    if images01.ndim != 4 or images01.shape[-1] != 3:
      raise ValueError(f'images01 must be [B, S, S, 3], got shape {tuple(images01.shape)}')
    if tuple(amap.shape) != tuple(images01.shape[:3]):
      raise ValueError(f'amap must be [B, S, S] = {tuple(images01.shape[:3])}, got shape '
                       f'{tuple(amap.shape)}')
    features = decoder_features(self.encoder, self.arch, self.decoder_width)
    x = backbones.preprocess(self.encoder, jnp.asarray(images01, jnp.float32))
    a = jnp.asarray(amap, jnp.float32)
    enc = backbones.build(self.encoder, self.dtype).clone(name='encoder', parent=self)
    size = images01.shape[1:3]
    # Decoder output sizes: the encoder's grids at strides 16, 8, 4, 2, then the input size.
    sizes = [tuple(-(-s // 2 ** k) for s in size) for k in (4, 3, 2, 1, 0)]
    if self.arch == 'paper':
      grey = backbones.preprocess(self.encoder, jnp.repeat(a[..., None], 3, axis=-1))
      map_conv = _map_conv(self.encoder, self.dtype, 3, 'map_conv')
      fused = 0.5 * (enc.first_conv(x) + map_conv(grey))
      taps = enc.from_first_conv(fused, taps=('layer4',), train=train)
      width = int(self.decoder_width) or 2 * features[0]
      return Decoder(features, width, self.dtype, name='decoder')(taps['layer4'], sizes)
    m = (2.0 * a - 1.0)[..., None]                                     # [0, 1] -> [-1, 1]
    fused = enc.first_conv(x) + _map_conv(self.encoder, self.dtype, 1, 'map_conv')(m)
    taps = enc.from_first_conv(fused, taps=ENCODER_TAPS, train=train)
    skips = (taps['layer3'], taps['layer2'], taps['layer1'], taps['stem'],
             jnp.concatenate([x, m], axis=-1))
    return Decoder(features, 0, self.dtype, name='decoder')(
        taps['layer4'], [tuple(s.shape[1:3]) for s in skips], skips)

  def logits(self, images01: jnp.ndarray, amap: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """'logit' head: logit(clip(A_hat, eps, 1 - eps)) + r, [B, S, S] float32."""
    a = jnp.clip(jnp.asarray(amap, jnp.float32), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return jnp.log(a) - jnp.log1p(-a) + self.residual(images01, amap, train)

  def __call__(self, images01: jnp.ndarray, amap: jnp.ndarray,
               train: bool = False) -> jnp.ndarray:
    """images01: [B, S, S, 3] in [0, 1]; amap: [B, S, S] normalised A_hat in [0, 1] ->
    refined [B, S, S] float32 (A_hat + r, or sigmoid(logits) for the 'logit' head)."""
    if self.head == 'residual':
      return jnp.asarray(amap, jnp.float32) + self.residual(images01, amap, train)
    if self.head == 'logit':
      return jax.nn.sigmoid(self.logits(images01, amap, train))
    raise ValueError(f'RefineNet.head must be one of {HEADS}, got {self.head!r}')


def arch_of(variables: Mapping) -> tuple[str, int]:
  """(arch, decoder_width) of a network's variables: 'paper' has the decoder's first 1x1 conv."""
  decoder = variables['params']['decoder']
  if 'conv0' in decoder:
    return 'paper', int(decoder['conv0']['kernel'].shape[-1])
  return 'skips', 0


def network(variables: Mapping, encoder: str, loss: str = 'reg_grad', dtype=jnp.float32,
            ) -> RefineNet:
  """The `RefineNet` that owns `variables` (architecture read from them)."""
  arch, width = arch_of(variables)
  return RefineNet(encoder, head_for_loss(loss), dtype, arch, width)


def _merge_pretrained(init: Mapping, pretrained: Mapping, path: str = '') -> dict:
  """`init`'s tree (arrays or ShapeDtypeStructs) with every leaf taken from `pretrained` (which may
  hold more, e.g. the classifier the encoder never builds); shapes must match."""
  out = {}
  for k, v in init.items():
    where = f'{path}/{k}'
    if k not in pretrained:
      raise ValueError(f'pretrained encoder variables lack {where}')
    if isinstance(v, Mapping):
      out[k] = _merge_pretrained(v, pretrained[k], where)
    else:
      p = jnp.asarray(pretrained[k], jnp.float32)
      if p.shape != tuple(v.shape):
        raise ValueError(f'pretrained encoder variable {where} has shape {p.shape}, '
                         f'the network expects {tuple(v.shape)}')
      out[k] = p
  return out


def _seed(key: jax.Array) -> int:
  return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def _random_head(expected: Mapping, seed: int) -> dict:
  """Random params of the map conv and the decoder, drawn on the host (numpy) as the modules'
  initialisers define them: conv kernels ~ N(0, 2 / fan_out) (`backbones.layers.conv_init`),
  biases 0, the last conv (decoder/out_conv) all zeros. (Jitting `RefineNet.init` instead costs
  15-25 s of XLA compile on CPU.)"""
  head = {k: v for k, v in expected.items() if k != 'encoder'}
  params = convert.random_variables(head, seed)
  params['decoder']['out_conv'] = jax.tree.map(np.zeros_like, params['decoder']['out_conv'])
  return convert.to_jax(params)


def _first_conv_kernel(encoder: str, encoder_params: Mapping) -> jnp.ndarray:
  """The encoder's first-conv kernel [k, k, 3, C0] from its (pretrained) params."""
  model = backbones.build(encoder)
  used = jax.eval_shape(functools.partial(model.init, method='first_conv'), jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))['params']
  (path, _), = jax.tree_util.tree_flatten_with_path(flax.core.unfreeze(used))[0]
  node = encoder_params
  for entry in path:
    node = node[entry.key]
  return node


def init_variables(encoder: str, key: jax.Array, *, weights: str = '', pretrained: bool = True,
                   allow_random_init: bool = False, dtype=jnp.float32, arch: str = 'paper',
                   decoder_width: int = 0) -> dict:
  """Variables {'params', 'batch_stats'} of a fresh RefineNet (either head: same variables).

  The encoder's subtree holds its ImageNet variables (`backbones.load_variables(encoder,
  weights)`) when `pretrained`; with no weights available for `encoder` (e.g. densenet161 without
  converted weights) that raises FileNotFoundError unless `allow_random_init`, which uses random
  encoder variables and warns. `pretrained=False` (tests) takes torchvision-like random encoder
  variables silently. The decoder is random from `key`, its last conv zero; the map conv is
  random ('skips') or the encoder's first conv ('paper').
  (Built part by part: jitting `RefineNet.init` as a whole takes ~20 s of XLA compile on CPU.)
  """
  model = RefineNet(encoder, 'residual', dtype, arch, int(decoder_width))
  k_enc, k_head = jax.random.split(key)
  if pretrained:
    try:
      loaded = backbones.load_variables(encoder, weights, allow_random_init=allow_random_init,
                                        key=k_enc)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f'refinement encoder {encoder!r}: {e}\n(for the refinement network the settings are '
          'model.refine.encoder_weights and model.refine.allow_random_init)') from e
  else:
    loaded = convert.to_jax(convert.random_variables(backbones.abstract_variables(encoder),
                                                     _seed(k_enc)))
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  a = jax.ShapeDtypeStruct((1, 64, 64), jnp.float32)
  expected = flax.core.unfreeze(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), x, a))
  params = {'encoder': _merge_pretrained(expected['params']['encoder'], loaded['params'],
                                         'params/encoder'),
            **_random_head(expected['params'], _seed(k_head))}
  if arch == 'paper':
    params['map_conv']['kernel'] = jnp.asarray(_first_conv_kernel(encoder, loaded['params']),
                                               jnp.float32)
  stats = {'encoder': _merge_pretrained(expected['batch_stats']['encoder'],
                                        loaded['batch_stats'], 'batch_stats/encoder')}
  variables = {'params': params, 'batch_stats': stats}
  want = jax.tree.map(lambda v: tuple(v.shape), expected)
  have = jax.tree.map(lambda v: tuple(v.shape), variables)
  if want != have:
    raise RuntimeError('refinement network variables do not match the module (internal error)')
  return variables


# ----------------------------------------------------------------------------- losses


def _l2(x: jnp.ndarray) -> jnp.ndarray:
  """Frobenius norm over the last two axes, with a zero (not NaN) gradient at 0."""
  s = jnp.sum(jnp.square(x), axis=(-2, -1))
  positive = s > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def loss_reg_grad(pred: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """(l_reg + l_grad) / 2 of eq. 10-11, mean over the batch.

  pred, target: [B, H, W] float (refined map, ground-truth mask in [0, 1]) -> [] float32.
  """
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  if pred.shape != target.shape or pred.ndim != 3:
    raise ValueError(f'pred and target must both be [B, H, W], got {pred.shape} and '
                     f'{target.shape}')
  h, w = pred.shape[1:]
  d = pred - target
  l_reg = _l2(d) / (h * w)
  grad_h = d[:, 1:, :] - d[:, :-1, :]          # = grad_h pred - grad_h target
  grad_w = d[:, :, 1:] - d[:, :, :-1]
  l_grad = (_l2(grad_h) + _l2(grad_w)) / (2 * h * w)
  return jnp.mean((l_reg + l_grad) / 2)


def loss_ce(logits: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """Pixelwise sigmoid cross-entropy (the 'logit' head's logits vs mask), mean -> [] float32."""
  logits = jnp.asarray(logits, jnp.float32)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(target, jnp.float32)))


def loss_focal(logits: jnp.ndarray, target: jnp.ndarray, gamma: float = FOCAL_GAMMA) -> jnp.ndarray:
  """Pixelwise sigmoid focal loss (gamma 2, no alpha class weighting), mean -> [] float32."""
  logits = jnp.asarray(logits, jnp.float32)
  return jnp.mean(optax.sigmoid_focal_loss(logits, jnp.asarray(target, jnp.float32), alpha=None,
                                           gamma=gamma))


def loss_fn(name: str) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
  """cfg.model.refine.loss -> loss(pred, target): 'reg_grad' takes the refined map, 'ce' and
  'focal' the logits of the 'logit' head (`head_for_loss`)."""
  head_for_loss(name)
  return {'reg_grad': loss_reg_grad, 'ce': loss_ce, 'focal': loss_focal}[name]


# ----------------------------------------------------------------------------- normalisation, fusion


def normalize_map(amap: jnp.ndarray, lo, hi) -> jnp.ndarray:
  """clip((amap - lo) / (hi - lo), 0, 1) with global fit-time statistics lo < hi (scalars, may be
  traced). amap: [...] float -> same shape float32."""
  amap = jnp.asarray(amap, jnp.float32)
  lo = jnp.asarray(lo, jnp.float32)
  span = jnp.maximum(jnp.asarray(hi, jnp.float32) - lo, 1e-12)
  return jnp.clip((amap - lo) / span, 0.0, 1.0)


def map_stats(raw_maps: np.ndarray, masks: np.ndarray,
              quantiles: Sequence[float] = DEFAULTS['norm_quantiles']) -> dict[str, float]:
  """Normalisation statistics from A_hat of synthetic samples (module docstring).

  raw_maps: [N, S, S] float (A_hat before normalisation); masks: [N, S, S] synthetic defect masks.
  Returns {'lo': quantile q0 of A_hat outside the masks, 'hi': quantile q1 inside them}; when
  hi <= lo (a degenerate A_hat), hi = the overall maximum, else lo + 1e-6 (logged).
  """
  raw = np.asarray(raw_maps, np.float32)
  inside = np.asarray(masks) > 0.5
  q0, q1 = (float(q) for q in quantiles)
  if not 0.0 <= q0 < 1.0 or not 0.0 < q1 <= 1.0:
    raise ValueError(f'model.refine.norm_quantiles must be two quantiles in [0, 1], got '
                     f'{tuple(quantiles)}')
  normal, defect = raw[~inside], raw[inside]
  if normal.size == 0 or defect.size == 0:
    raise ValueError('map_stats needs pixels both inside and outside the synthetic defect masks')
  lo = float(np.quantile(normal, q0))
  hi = float(np.quantile(defect, q1))
  if not hi > lo:
    logging.warning('refinement: A_hat inside synthetic defects (q%.2f = %g) is not above the '
                    'normal pixels (q%.2f = %g); using the overall maximum', q1, hi, q0, lo)
    hi = float(raw.max())
    if not hi > lo:
      hi = lo + 1e-6
  return {'lo': lo, 'hi': hi}


@functools.partial(jax.jit, static_argnames=('input_size', 'encoder', 'loss', 'dtype'))
def refine_maps(variables, images01: jnp.ndarray, amap_norm: jnp.ndarray, input_size: int,
                encoder: str, loss: str = 'reg_grad', dtype=jnp.float32) -> jnp.ndarray:
  """The refined map A~ at the images' size: the network runs at `input_size`.

  images01: [B, S, S, 3] float in [0, 1]; amap_norm: [B, S, S] normalised A_hat ->
  [B, S, S] float32 (bilinear back to S).
  """
  size = tuple(amap_norm.shape[1:3])
  s = (int(input_size), int(input_size))
  model = network(variables, encoder, loss, dtype)
  img = _resize(jnp.asarray(images01, jnp.float32), s)
  a = _resize(jnp.asarray(amap_norm, jnp.float32), s)
  refined = model.apply(variables, img, a, train=False)
  return _resize(refined, size)


@functools.partial(jax.jit, static_argnames=('input_size', 'encoder', 'loss', 'dtype'))
def fuse(variables, images01: jnp.ndarray, amap_raw: jnp.ndarray, lo, hi, weight,
         input_size: int, encoder: str, loss: str = 'reg_grad', dtype=jnp.float32) -> jnp.ndarray:
  """Final map = (1 - w) * normalize(A_hat) + w * refined (paper: w = 0.1).

  Args:
    variables: RefineNet variables {'params', 'batch_stats'} (`train_refiner`).
    images01: [B, S, S, 3] float in [0, 1].
    amap_raw: [B, S, S] A_hat as the scorer returns it.
    lo, hi: the fit-time statistics (`train_refiner`'s stats); weight: w in [0, 1].
    input_size, encoder, loss: cfg.model.refine.{input_size, encoder, loss} (static).
  Returns:
    [B, S, S] float32.
  """
  a = normalize_map(amap_raw, lo, hi)
  refined = refine_maps(variables, images01, a, input_size, encoder, loss, dtype)
  w = jnp.asarray(weight, jnp.float32)
  return (1.0 - w) * a + w * refined


# ----------------------------------------------------------------------------- training state


@flax.struct.dataclass
class TrainState(train_loop.TrainState):
  """`train_loop.TrainState` plus the loss and whether the steps augment (static, hashable), so
  the steps compile once per network shape."""
  loss: str = flax.struct.field(pytree_node=False, default='reg_grad')
  augment: bool = flax.struct.field(pytree_node=False, default=True)


def create_train_state(variables: Mapping, encoder: str, loss: str = 'reg_grad',
                       learning_rate: float = 1e-4, augment: bool = True,
                       dtype=jnp.float32) -> TrainState:
  """A TrainState around `variables` (`init_variables`; the architecture is read from them) with
  a fresh Adam state (constant learning rate)."""
  return TrainState.create(network(variables, encoder, loss, dtype), variables,
                           float(learning_rate), loss=loss, augment=bool(augment))


Metrics = clu_metrics.Collection.create(loss=clu_metrics.Average.from_output('loss'),
                                        input_loss=clu_metrics.Average.from_output('input_loss'))


def augment_batch(key: jax.Array, images: jnp.ndarray, amaps: jnp.ndarray,
                  masks: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """`synth.augment` per sample: one geometry (90-degree rotation, flip) for image, map and mask,
  colour jitter on the image only. [B, s, s, 3], [B, s, s], [B, s, s] -> the same shapes.

  `synth.augment` moves its mask argument by a pure index map, so it is given the pixel indices
  (exact in float32 below 2^24 pixels) and the map and the mask are gathered with the result.
  """
  b, h, w = amaps.shape
  if h * w >= 2 ** 24:
    raise ValueError(f'augment_batch: {h} x {w} pixels is too many for float32 indices')
  index = jnp.arange(h * w, dtype=jnp.float32).reshape(h, w)

  def one(k, image, amap, mask):
    out_image, moved = synth.augment(k, image, index)
    src = moved.astype(jnp.int32)
    return out_image, amap.reshape(-1)[src], mask.reshape(-1)[src]

  return jax.vmap(one)(jax.random.split(key, b), images, amaps, masks)


def _predictions(model: RefineNet, variables, images, amaps, train: bool):
  """(predictions the loss takes, updated batch stats or None)."""
  method = 'logits' if model.head == 'logit' else None
  if train:
    out, updates = model.apply(variables, images, amaps, train=True, method=method,
                               mutable=['batch_stats'])
    return out, updates['batch_stats']
  return model.apply(variables, images, amaps, train=False, method=method), None


def _input_predictions(head: str, amaps: jnp.ndarray) -> jnp.ndarray:
  """What the loss sees for the unrefined map (r = 0): A_hat, or its logits."""
  if head == 'logit':
    a = jnp.clip(amaps, LOGIT_EPS, 1.0 - LOGIT_EPS)
    return jnp.log(a) - jnp.log1p(-a)
  return amaps


def _update(state: TrainState, images, amaps, masks, key) -> tuple[TrainState, Metrics]:
  """One Adam step on a batch at the network's size (augmented first when `state.augment`)."""
  if state.augment:
    images, amaps, masks = augment_batch(key, images, amaps, masks)
  criterion = loss_fn(state.loss)

  def objective(params):
    pred, stats = _predictions(state.model, {'params': params, 'batch_stats': state.batch_stats},
                               images, amaps, train=True)
    return criterion(pred, masks), stats

  (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  state = state.apply_gradients(grads, stats)
  input_loss = criterion(_input_predictions(state.model.head, amaps), masks)
  return state, Metrics.single_from_model_output(loss=loss, input_loss=input_loss)


@jax.jit
def train_step(state: TrainState, batch: Mapping[str, jax.Array],
               key: jax.Array) -> tuple[TrainState, Metrics]:
  """One Adam step.

  Args:
    state: the TrainState.
    batch: 'image' [B, s, s, 3] float32 in [0, 1], 'amap' [B, s, s] normalised A_hat, 'mask'
      [B, s, s] target in [0, 1].
    key: augmentation key of this step (unused when state.augment is False).
  Returns:
    (new state, Metrics: the batch loss and the loss of the unrefined input map).
  """
  return _update(state, batch['image'], batch['amap'], batch['mask'], key)


@jax.jit
def eval_loss(state: TrainState, batch: Mapping[str, jax.Array]) -> jax.Array:
  """The loss of `batch` in inference mode (running BN statistics, no augmentation) -> []."""
  pred, _ = _predictions(state.model, state.variables, batch['image'], batch['amap'], train=False)
  return loss_fn(state.loss)(pred, batch['mask'])


def _keys(base: jax.Array, i) -> tuple[jax.Array, jax.Array]:
  """(data key, augmentation key) of sample batch / step `i` of the stream `base`."""
  k_data, k_aug = jax.random.split(jax.random.fold_in(base, i))
  return k_data, k_aug


def _constrain(tree, out_sharding):
  return tree if out_sharding is None else jax.lax.with_sharding_constraint(tree, out_sharding)


@functools.partial(jax.jit, static_argnames=('size', 'out_sharding'))
def _online_batch(images, raw, masks, lo, hi, step_key: jax.Array, step, size: int,
                  out_sharding=None):
  """Online training: the full-size synthetic batch (images [B, S, S, 3], raw A_hat [B, S, S],
  masks [B, S, S]) resized to `size`, A_hat normalised -> (`train_step` batch, its augmentation
  key for `step`)."""
  s = (size, size)
  batch = {'image': _resize(images, s),
           'amap': normalize_map(_resize(jnp.asarray(raw, jnp.float32), s), lo, hi),
           'mask': _resize(masks, s)}
  return _constrain(batch, out_sharding), _keys(step_key, step)[1]


@functools.partial(jax.jit, static_argnames=('batch_size', 'out_sharding'))
def _pool_batch(pool: Mapping[str, jax.Array], lo, hi, step_key: jax.Array, step,
                batch_size: int, out_sharding=None):
  """Pool training: `batch_size` samples of the device-resident pool ('image' [P, s, s, 3], raw
  'amap' [P, s, s], 'mask' [P, s, s]) drawn with the data key of `step`, A_hat normalised ->
  (`train_step` batch, its augmentation key)."""
  k_data, k_aug = _keys(step_key, step)
  idx = jax.random.randint(k_data, (batch_size,), 0, pool['image'].shape[0])
  batch = {'image': pool['image'][idx], 'amap': normalize_map(pool['amap'][idx], lo, hi),
           'mask': pool['mask'][idx]}
  return _constrain(batch, out_sharding), k_aug


# ----------------------------------------------------------------------------- samples


@functools.partial(jax.jit, static_argnames=('procedural',))
def _synthesize(key: jax.Array, images: jnp.ndarray, textures: jnp.ndarray | None,
                procedural: bool):
  """synthesize_balanced with textures given or procedural (one per image)."""
  k_tex, k_syn = jax.random.split(key)
  if procedural:        # image i's texture from split(k_tex, B)[i], made for the DRAEM rows only
    b, h, w = images.shape[:3]
    tex_keys = jax.random.split(k_tex, b)
    textures = lambda rows: jax.vmap(lambda k: synth.procedural_texture(k, h, w))(tex_keys[rows])
  out, masks, _ = synth.synthesize_balanced(k_syn, images, textures)
  return out, masks


@functools.partial(jax.jit, static_argnames=('size',))
def _to_input(images: jnp.ndarray, amaps: jnp.ndarray, masks: jnp.ndarray, size: int):
  """Resizes a full-size sample to the network's input size (bilinear, antialiased)."""
  s = (size, size)
  return (_resize(images, s), _resize(jnp.asarray(amaps, jnp.float32), s), _resize(masks, s))


_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def _unit(x: jnp.ndarray) -> jnp.ndarray:
  """uint8 (0-255) or float images -> float32 in [0, 1], the values of `synth.to_unit_float`
  (a table lookup: XLA may turn x / 255 into x * (1 / 255), which rounds differently)."""
  if x.dtype == jnp.uint8:
    return jnp.asarray(_UINT8_TO_UNIT)[x.astype(jnp.int32)]
  return jnp.clip(x.astype(jnp.float32), 0.0, 1.0)


def _indices(key: jax.Array, num_images: int, num_textures: int, batch_size: int, mode: str):
  """(synthesis key, image indices [B], texture indices [B]) of a sample batch: textures are
  drawn from the given ones ('given'), are other training images ('images') or unused."""
  k_pick, k_tex, k_syn = jax.random.split(key, 3)
  idx = jax.random.randint(k_pick, (batch_size,), 0, num_images)
  if mode == 'given':
    tex = jax.random.randint(k_tex, (batch_size,), 0, num_textures)
  elif mode == 'images':
    tex = (idx + jax.random.randint(k_tex, (batch_size,), 1, num_images)) % num_images
  else:
    tex = idx
  return k_syn, idx, tex


@functools.partial(jax.jit, static_argnames=('num_textures', 'batch_size', 'mode'))
def _host_indices(base: jax.Array, steps: jax.Array, num_images, num_textures: int,
                  batch_size: int, mode: str):
  """The image / texture indices [M, B] of sample batches `steps` [M] of `base` (for loading);
  num_images is traced (the draws are those of a static count), so one compilation serves
  training sets of every size."""
  def one(i):
    return _indices(_keys(base, i)[0], num_images, num_textures, batch_size, mode)[1:]
  return jax.vmap(one)(steps)


@functools.partial(jax.jit, static_argnames=('batch_size', 'mode', 'out_sharding'))
def _sample(base: jax.Array, i, images: jax.Array, slot: jax.Array, num_images, textures,
            batch_size: int, mode: str, out_sharding=None):
  """Sample batch `i` of the stream `base` at full size: (images01 [B, S, S, 3] float32, masks
  [B, S, S] float32), from the device buffer `images` [R, S, S, 3] (uint8 or float) where image
  n < num_images (an int32 scalar, traced) of the training set is row `slot[n]` (slot [>= N]:
  padded buffers compile once for every N of a bucket), and `textures` [T, S, S, 3] or None."""
  k_syn, idx, tex = _indices(_keys(base, i)[0], num_images,
                             0 if textures is None else textures.shape[0], batch_size, mode)
  picked = _unit(images[slot[idx]])
  if mode == 'given':
    tex_images = _unit(textures[tex])
  elif mode == 'images':
    tex_images = _unit(images[slot[tex]])
  else:
    tex_images = None
  out, masks = _synthesize(k_syn, picked, tex_images, mode == 'procedural')
  return _constrain((out, masks), out_sharding)


class ImageSource:
  """The normal images (and textures) the synthetic samples come from, on the device.

  All images are put on the device once (replicated over the mesh, in their dtype: uint8 as the
  pipeline gives them) when they fit under `cap_bytes` (None: no cap). Otherwise a buffer of
  `rows` images is reloaded before every `steps_per_load` batches (`prepare`) with the images
  those batches pick (the picks are the same functions of the keys either way, so the samples do
  not depend on the cap). `sample(base, i)` is batch i of the stream `base`. `pad_images_to`:
  device buffers of at least that many images (zeros past the N real ones, never picked), so
  that training sets of one shape bucket share the compiled sampling.
  """

  def __init__(self, normal_images, textures, texture_source: str, batch_size: int,
               cap_bytes: int | None, mesh, out_sharding=None, pad_images_to: int = 0):
    images = normal_images if isinstance(normal_images, np.ndarray) else np.asarray(normal_images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'normal_images must be [N, S, S, 3], got shape {images.shape}')
    if images.shape[1] != images.shape[2]:
      raise ValueError(f'normal_images must be square, got {images.shape[1:3]}')
    if images.shape[0] < 1:
      raise ValueError('normal_images is empty')
    if textures is not None:
      textures = np.asarray(textures)
      if textures.ndim != 4 or tuple(textures.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f'textures must be [T, {images.shape[1]}, {images.shape[2]}, 3] like the '
                         f'images, got shape {textures.shape}')
      self.mode = 'given'
    elif texture_source not in TEXTURE_SOURCES:
      raise ValueError(f'model.refine.texture_source must be one of {TEXTURE_SOURCES}, got '
                       f'{texture_source!r}')
    else:
      self.mode = 'images' if texture_source == 'images' and images.shape[0] > 1 else 'procedural'
    self.host, self.batch_size, self.mesh = images, int(batch_size), mesh
    self.out_sharding = out_sharding
    self.textures = None if textures is None else sharding.replicate_host(textures, mesh)
    self.num = int(images.shape[0])
    self.slots = max(self.num, int(pad_images_to))   # slot entries (padded: one shape a bucket)
    self.num_dev = sharding.replicate_host(np.int32(self.num), mesh)
    per_image = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    per_batch = self.batch_size * (2 if self.mode == 'images' else 1)
    self.resident = not cap_bytes or self.num * per_image <= cap_bytes
    if self.resident:
      self.rows, self.steps_per_load = self.slots, 0
      self.buffer = sharding.replicate_host(sharding.pad_rows(
          np.ascontiguousarray(images), 1, mode='zeros', to=self.slots)[0], mesh)
      self.slot = sharding.replicate_host(np.arange(self.slots, dtype=np.int32), mesh)
    else:
      self.rows = min(self.slots, max(per_batch, int(cap_bytes) // per_image))
      self.steps_per_load = max(1, self.rows // per_batch)
      self.buffer = self.slot = None
    self.loaded = None                              # (base key words, first, last) loaded

  def prepare(self, base: jax.Array, first: int, count: int) -> None:
    """Makes sure batches first .. first + count - 1 of `base` can be drawn (streaming: loads the
    images they pick, at most `steps_per_load` batches at a time; resident: nothing)."""
    if self.resident:
      return
    tag = tuple(np.asarray(jax.random.key_data(base)).ravel().tolist())
    if self.loaded is not None and self.loaded[0] == tag and (
        self.loaded[1] <= first and first + count <= self.loaded[2]):
      return
    count = min(count, self.steps_per_load)
    idx, tex = _host_indices(base, jnp.arange(first, first + count), self.num_dev,
                             0 if self.textures is None else self.textures.shape[0],
                             self.batch_size, self.mode)
    needed = np.asarray(idx).ravel()
    if self.mode == 'images':
      needed = np.concatenate([needed, np.asarray(tex).ravel()])
    needed = np.unique(needed)
    host = np.zeros((self.rows,) + self.host.shape[1:], self.host.dtype)
    host[:len(needed)] = self.host[needed]
    slot = np.zeros(self.slots, np.int32)
    slot[needed] = np.arange(len(needed), dtype=np.int32)
    if self.buffer is not None:
      self.buffer.delete()
    self.buffer = sharding.replicate_host(host, self.mesh)
    self.slot = sharding.replicate_host(slot, self.mesh)
    self.loaded = (tag, first, first + count)

  def sample(self, base: jax.Array, i: int) -> tuple[jax.Array, jax.Array]:
    """Batch `i` of `base` at full size: (images01 [B, S, S, 3], masks [B, S, S]) on the device."""
    self.prepare(base, i, 1)
    return _sample(base, i, self.buffer, self.slot, self.num_dev, self.textures,
                   self.batch_size, self.mode, self.out_sharding)

  def close(self) -> None:
    for a in (self.buffer, self.slot, self.textures, self.num_dev):
      if a is not None:
        a.delete()


def _amap(amap_fn: Callable, images: jax.Array) -> jax.Array:
  """amap_fn on a synthetic batch, checked: raw A_hat [B, S, S] float32 (a device array)."""
  raw = jnp.asarray(amap_fn(images), jnp.float32)
  if tuple(raw.shape) != tuple(images.shape[:3]):
    raise ValueError(f'amap_fn must return [B, S, S] = {tuple(images.shape[:3])}, got '
                     f'{tuple(raw.shape)}')
  return raw


def image_source(images, textures, texture_source: str, batch_size: int,
                 device_images_mb: float, mesh=None, pad_images_to: int = 0) -> ImageSource:
  """The `ImageSource` `train_refiner` draws from: all devices (or `mesh`), the batch split over
  them when it divides, the images resident under `device_images_mb` (0: no cap). Other callers
  with the same arguments reuse its compiled sampling."""
  mesh = sharding.make_mesh() if mesh is None else mesh
  batch_sharding = (sharding.data_sharding(mesh) if batch_size % sharding.num_shards(mesh) == 0
                    else sharding.replicated(mesh))
  cap = float(device_images_mb) * 2 ** 20
  return ImageSource(images, textures, texture_source, batch_size, int(cap) or None, mesh,
                     batch_sharding, pad_images_to=pad_images_to)


def synthetic_samples(key: jax.Array, normal_images, amap_fn: Callable, batch_size: int = 8,
                      textures: np.ndarray | None = None,
                      texture_source: str = 'procedural', pad_images_to: int = 0,
                      device_images_mb: float = 0.0) -> dict[str, np.ndarray]:
  """A batch of synthetic training samples (e.g. for `save_refine_samples`): {'image' [B, S, S, 3],
  'amap' raw A_hat [B, S, S], 'mask' [B, S, S]} numpy float32; batch_size divisible by 4.
  pad_images_to, device_images_mb: as `train_refiner`'s (the same values reuse its compiled
  sampling; pad 0: the shape bucket of N)."""
  src = image_source(normal_images, textures, texture_source, batch_size, device_images_mb,
                     pad_images_to=pad_images_to or sharding.bucket_size(np.shape(normal_images)[0]))
  try:
    image, mask = src.sample(key, 0)
    raw = _amap(amap_fn, image)
    return {'image': np.asarray(image), 'amap': np.asarray(raw), 'mask': np.asarray(mask)}
  finally:
    src.close()


# ----------------------------------------------------------------------------- training loop


def check_config(cfg_refine) -> None:
  """Raises ValueError naming the first bad `model.refine` field."""
  def bad(field, value, why):
    raise ValueError(f'model.refine.{field} = {value!r}: {why}')
  if cfg_refine.encoder not in backbones.names():
    bad('encoder', cfg_refine.encoder, f'must be one of {backbones.names()}')
  if int(cfg_refine.input_size) < 32:
    bad('input_size', cfg_refine.input_size, 'must be >= 32 (the encoder has stride 32)')
  if int(cfg_refine.batch_size) < 4 or int(cfg_refine.batch_size) % 4:
    bad('batch_size', cfg_refine.batch_size, 'must be a positive multiple of 4 (the four defect '
        'kinds in equal ratio)')
  if int(cfg_refine.iterations) < 0:
    bad('iterations', cfg_refine.iterations, 'must be >= 0')
  if float(cfg_refine.learning_rate) <= 0:
    bad('learning_rate', cfg_refine.learning_rate, 'must be > 0')
  head_for_loss(cfg_refine.loss)
  if int(cfg_refine.checkpoint_every) < 1:
    bad('checkpoint_every', cfg_refine.checkpoint_every, 'must be >= 1')
  if int(_get(cfg_refine, 'pool_size')) < 0:
    bad('pool_size', _get(cfg_refine, 'pool_size'), 'must be >= 0 (0 = fully online)')
  if _get(cfg_refine, 'texture_source') not in TEXTURE_SOURCES:
    bad('texture_source', _get(cfg_refine, 'texture_source'), f'must be one of {TEXTURE_SOURCES}')
  q = tuple(_get(cfg_refine, 'norm_quantiles'))
  if len(q) != 2 or not 0.0 <= q[0] < 1.0 or not 0.0 < q[1] <= 1.0:
    bad('norm_quantiles', q, 'must be two quantiles (normal pixels, defect pixels) in [0, 1]')
  if int(_get(cfg_refine, 'calibration_samples')) < 1:
    bad('calibration_samples', _get(cfg_refine, 'calibration_samples'), 'must be >= 1')
  if int(_get(cfg_refine, 'log_every')) < 1:
    bad('log_every', _get(cfg_refine, 'log_every'), 'must be >= 1')
  if _get(cfg_refine, 'arch') not in ARCHS:
    bad('arch', _get(cfg_refine, 'arch'), f'must be one of {ARCHS}')
  if int(_get(cfg_refine, 'decoder_width')) < 0:
    bad('decoder_width', _get(cfg_refine, 'decoder_width'), 'must be >= 0 (0 = C4 / 2)')
  if _get(cfg_refine, 'precision') not in PRECISIONS:
    bad('precision', _get(cfg_refine, 'precision'), f'must be one of {tuple(PRECISIONS)}')
  if float(_get(cfg_refine, 'device_images_mb')) < 0:
    bad('device_images_mb', _get(cfg_refine, 'device_images_mb'), 'must be >= 0 (0 = no cap)')


def _draw_many(src: ImageSource, amap_fn: Callable, base: jax.Array, num_batches: int,
               size: int):
  """num_batches sample batches of `base` with their A_hat: the net-size samples on the device
  (images [M, s, s, 3], raw maps [M, s, s], masks [M, s, s]) and the full-size raw maps and
  masks on the host (numpy, for the normalisation statistics)."""
  parts = [[], [], [], [], []]
  src.prepare(base, 0, num_batches)
  for j in range(num_batches):
    image, mask = src.sample(base, j)
    raw = _amap(amap_fn, image)
    for p, v in zip(parts, (*_to_input(image, raw, mask, size), raw, mask)):
      p.append(v)
  small = tuple(jnp.concatenate(p) for p in parts[:3])
  return small + tuple(np.concatenate([np.asarray(v) for v in p]) for p in parts[3:])


def train_refiner(normal_images, amap_fn: Callable[[jax.Array], jax.Array],
                  cfg_refine: ml_collections.ConfigDict, key: jax.Array,
                  ckpt_dir: str | None = None, log_fn: Callable[[str], None] | None = None,
                  textures: np.ndarray | None = None, *, dtype=None, mesh=None,
                  pad_images_to: int = 0):
  """Trains the refinement network on synthetic defects of `normal_images`.

  Args:
    normal_images: [N, S, S, 3] uint8 (0-255) or float32 in [0, 1] host array (np.memmap ok).
      Put on the device once when under `device_images_mb`, else streamed (`ImageSource`).
    amap_fn: `amap_fn(images01 [B, S, S, 3] float32 device array) -> [B, S, S]` raw A_hat of the
      fitted model, B = cfg_refine.batch_size: a jitted function of device arrays (it is called
      every step between the jitted synthesis and the jitted update, and compiled on its own).
      Its input is split over the mesh's devices when the batch divides.
    cfg_refine: cfg.model.refine (encoder, encoder_weights, input_size, iterations, batch_size,
      learning_rate, loss, texture_dir, checkpoint_every; optional fields in `DEFAULTS`).
    key: PRNG key of the run; initialisation, pool, statistics, image picks, synthesis and
      augmentation all derive from it and the step number.
    ckpt_dir: if given, orbax checkpoints are written there every `checkpoint_every` iterations and
      at the end, and a re-run with the same arguments continues from the latest one (raising
      `iterations` extends a run).
    log_fn: progress lines (default absl logging.info).
    textures: optional [T, S, S, 3] texture images for the DRAEM-style defects; else
      cfg.texture_dir (`synth.load_textures`), else `texture_source` ('procedural' textures or
      other training 'images').
    dtype: compute dtype of the network (default: `model.refine.precision`).
    mesh: `sharding.make_mesh()` (default: all devices).
    pad_images_to: the images' device buffer has at least this many rows (`ImageSource`; the
      shape bucket of N, so that training sets of one bucket share the compiled sampling; the
      samples do not depend on it).

  Returns:
    (variables {'params', 'batch_stats'}, stats {'lo': float, 'hi': float}, history) where
    history holds lists step, loss, input_loss (the loss of the unrefined map on the same
    batches), interval_seconds (one entry per log / checkpoint point), and pool_size, num_images,
    total_seconds, compile_seconds (tracing + compiling in this call, jax.monitoring),
    steady_step_seconds (mean iteration time after the first log point of this call; NaN with
    fewer than two log points).
  """
  check_config(cfg_refine)
  log = log_fn or logging.info
  t_start = time.time()
  encoder = str(cfg_refine.encoder)
  batch_size = int(cfg_refine.batch_size)
  size = int(cfg_refine.input_size)
  iterations = int(cfg_refine.iterations)
  every = int(cfg_refine.checkpoint_every)
  log_every = int(_get(cfg_refine, 'log_every'))
  pool_size = int(_get(cfg_refine, 'pool_size'))
  pool_batches = -(-pool_size // batch_size)
  calib_batches = pool_batches or -(-int(_get(cfg_refine, 'calibration_samples')) // batch_size)
  arch, width = str(_get(cfg_refine, 'arch')), int(_get(cfg_refine, 'decoder_width'))
  dtype = PRECISIONS[_get(cfg_refine, 'precision')] if dtype is None else dtype
  texture_dir = str(cfg_refine.get('texture_dir', '') or '')
  images = normal_images if isinstance(normal_images, np.ndarray) else np.asarray(normal_images)
  if textures is None and texture_dir:
    if images.ndim != 4:
      raise ValueError(f'normal_images must be [N, S, S, 3], got shape {images.shape}')
    textures = synth.load_textures(texture_dir, tuple(images.shape[1:3]))
  mesh = sharding.make_mesh() if mesh is None else mesh
  src = image_source(images, textures, _get(cfg_refine, 'texture_source'), batch_size,
                     float(_get(cfg_refine, 'device_images_mb')), mesh, pad_images_to)
  batch_sharding = src.out_sharding

  fingerprint = {
      'images_shape': list(images.shape), 'key': checkpoints.key_words(key),
      'textures_shape': None if textures is None else list(np.shape(textures)),
      'precision': jnp.dtype(dtype).name,
      **{k: cfg_refine.get(k) for k in ('encoder', 'encoder_weights', 'input_size', 'batch_size',
                                        'learning_rate', 'loss', 'texture_dir')},
      **{k: _get(cfg_refine, k) for k in ('pool_size', 'texture_source', 'norm_quantiles',
                                          'calibration_samples', 'augment',
                                          'allow_random_init', 'arch', 'decoder_width')}}
  variables = init_variables(encoder, jax.random.fold_in(key, _SALT_INIT),
                             weights=str(cfg_refine.get('encoder_weights', '') or ''),
                             allow_random_init=bool(_get(cfg_refine, 'allow_random_init')),
                             dtype=dtype, arch=arch, decoder_width=width)
  state = sharding.replicate(create_train_state(
      variables, encoder, cfg_refine.loss, float(cfg_refine.learning_rate),
      bool(_get(cfg_refine, 'augment')), dtype), mesh)
  history = {k: [] for k in ('step', 'loss', 'input_loss', 'interval_seconds')}
  stats, lo, hi = None, None, None
  clock = train_loop.CompileClock()
  try:
    with train_loop.Run('refinement', ckpt_dir, fingerprint, log, total=iterations,
                        unit='iteration') as run:
      start, arrays, record = run.resume(state.arrays(),
                                         lambda a: sharding.replicate(a, mesh))
      if arrays is not None:
        state = state.with_arrays(arrays)
        stats, history = record['stats'], record['history']
      t = time.time()
      pool = None
      if pool_batches and start < iterations:
        img, raw, mask, raw_full, mask_full = _draw_many(
            src, amap_fn, jax.random.fold_in(key, _SALT_POOL), pool_batches, size)
        pool = sharding.replicate({'image': img, 'amap': raw, 'mask': mask}, mesh)
        if stats is None:
          stats = map_stats(raw_full, mask_full, _get(cfg_refine, 'norm_quantiles'))
        log(f'refinement: pool of {img.shape[0]} synthetic samples in {time.time() - t:.1f}s')
      elif stats is None:
        *_, raw_full, mask_full = _draw_many(src, amap_fn, jax.random.fold_in(key, _SALT_CALIB),
                                             calib_batches, size)
        stats = map_stats(raw_full, mask_full, _get(cfg_refine, 'norm_quantiles'))
        log(f'refinement: statistics from {calib_batches * batch_size} synthetic samples in '
            f'{time.time() - t:.1f}s')
      lo, hi = float(stats['lo']), float(stats['hi'])
      log(f'refinement: {encoder} encoder ({arch}) at {size} px, {iterations} iterations x '
          f'{batch_size}, loss {cfg_refine.loss}, {jnp.dtype(dtype).name}, '
          f'{"pool of " + str(pool_batches * batch_size) if pool else "online"} samples, '
          f'{sharding.num_shards(mesh)} device(s), A_hat normalised with lo {lo:.4g}, hi {hi:.4g}')

      step_key = jax.random.fold_in(key, _SALT_STEP)
      metrics, t_point, points = None, time.time(), []
      for step in range(start, iterations):
        if pool is not None:
          batch, k_aug = _pool_batch(pool, lo, hi, step_key, step, batch_size, batch_sharding)
        else:
          src.prepare(step_key, step, iterations - step)
          image, mask = src.sample(step_key, step)
          batch, k_aug = _online_batch(image, _amap(amap_fn, image), mask, lo, hi, step_key,
                                       step, size, batch_sharding)
        state, m = train_step(state, batch, k_aug)
        metrics = m if metrics is None else metrics.merge(m)
        done = step + 1
        save = ckpt_dir is not None and (done % every == 0 or done == iterations)
        if done % log_every == 0 or done == iterations or save:
          summary = train_loop.summarize(metrics)
          metrics = None
          now = time.time()
          points.append((done, now - t_point))
          history['step'].append(done)
          history['loss'].append(summary['loss'])
          history['input_loss'].append(summary['input_loss'])
          history['interval_seconds'].append(now - t_point)
          t_point = now
          run.progress(done, f'loss {summary["loss"]:.5f}  (input map '
                             f'{summary["input_loss"]:.5f})')
        if save:
          run.save(done, state.arrays(), stats=stats, history=history)
  finally:
    clock.close()
    src.close()
  steady = math.nan
  if len(points) >= 2:
    steady = sum(s for _, s in points[1:]) / (points[-1][0] - points[0][0])
  history.update(pool_size=pool_batches * batch_size, num_images=int(images.shape[0]),
                 total_seconds=time.time() - t_start, compile_seconds=clock.total,
                 steady_step_seconds=steady)
  return state.variables, {'lo': lo, 'hi': hi}, history


# ----------------------------------------------------------------------------- figure


def save_refine_samples(path: str | os.PathLike, images: np.ndarray, masks: np.ndarray,
                        amaps: np.ndarray, refined: np.ndarray, *, max_rows: int = 8,
                        panel_inches: float = 2.2, dpi: int = 100) -> None:
  """A figure of synthetic training samples: rows of image (+ mask contour) | mask | A_hat
  (normalised) | refined map, both maps coloured over [0, 1].

  images: [N, S, S, 3] float in [0, 1]; masks, amaps, refined: [N, S, S] (amaps normalised).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be [N, S, S, 3], got shape {images.shape}')
  arrays = {'masks': masks, 'amaps': amaps, 'refined': refined}
  for name, a in arrays.items():
    if np.shape(a) != images.shape[:3]:
      raise ValueError(f'{name} must be [N, S, S] = {images.shape[:3]}, got {np.shape(a)}')
  rows = min(int(max_rows), images.shape[0])
  fig = Figure(figsize=(4 * panel_inches, rows * panel_inches + 0.4), dpi=dpi)
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(rows, 4, squeeze=False))
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (rows * panel_inches + 0.4),
                      wspace=0.03, hspace=0.03)
  titles = ('synthetic image', 'mask', 'A_hat (normalised)', 'refined')
  for i in range(rows):
    mask = np.asarray(masks[i], np.float32)
    panels = (images[i], mask, np.asarray(amaps[i], np.float32), np.asarray(refined[i], np.float32))
    for j, (ax, panel) in enumerate(zip(axes[i], panels)):
      if j == 0:
        ax.imshow(panel)
        if mask.max() > 0.5:
          ax.contour(mask, levels=[0.5], colors=['red'], linewidths=0.8)
      else:
        ax.imshow(panel, cmap='gray' if j == 1 else 'jet', vmin=0.0, vmax=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(titles[j], fontsize=9)
  with fileio.atomic_open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=dpi)


def save_training_figure(path: str | os.PathLike, key: jax.Array, normal_images,
                         amap_fn: Callable, variables, stats: Mapping[str, float],
                         cfg_refine, textures: np.ndarray | None = None,
                         num_samples: int | None = None, pad_images_to: int = 0) -> None:
  """Synthesises one batch (cfg_refine.batch_size, like training; no augmentation), refines it
  with the trained network and writes `save_refine_samples` (at most `num_samples` rows).
  pad_images_to: as `train_refiner`'s (the same value reuses its compiled sampling)."""
  samples = synthetic_samples(key, normal_images, amap_fn, int(cfg_refine.batch_size), textures,
                              _get(cfg_refine, 'texture_source'), pad_images_to,
                              float(_get(cfg_refine, 'device_images_mb')))
  a = normalize_map(samples['amap'], stats['lo'], stats['hi'])
  refined = refine_maps(variables, jnp.asarray(samples['image']), a, int(cfg_refine.input_size),
                        str(cfg_refine.encoder), str(cfg_refine.loss))
  save_refine_samples(path, samples['image'], samples['mask'], np.asarray(a), np.asarray(refined),
                      max_rows=num_samples or samples['image'].shape[0])
