"""Small building blocks shared by the backbone ports (NHWC, explicit torchvision padding).

torchvision pads symmetrically (`padding=k // 2`); XLA's 'SAME' pads the extra row/column at
the bottom/right when the total is odd, which happens for stride-2 convolutions on even inputs.
The torchvision ports therefore always pass explicit `((p, p), (p, p))` padding. The
EfficientNet-Lite port passes 'SAME' on purpose: its weights come from TensorFlow (see
efficientnet_lite.py).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Tap names in network order. 'stem' = first conv + BN + activation (stride 2);
# 'layer1'..'layer4' = strides 4, 8, 16, 32; 'logits' = ImageNet classifier output.
TAP_ORDER = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'logits')
DEFAULT_TAPS = ('layer2', 'layer3')

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _flat(a: jnp.ndarray) -> jnp.ndarray:
  return a.reshape(-1, a.shape[-1])


@jax.custom_vjp
def pointwise(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """x [..., C] @ w [C, F] -> [..., F] (the product over the channels of a 1 x 1 convolution).

  The VJP is written out: input gradient g @ w^T; kernel gradient x^T g as one dot_general
  contracting the flattened leading axes of both. The numbers are autodiff's; what changes is
  the graph XLA:CPU sees. With the autodiff's VJP, layout assignment inside a whole training
  step stored the cotangent transposed ([F, B*H*W], a strided copy written by the fusion that
  produces it) and ran the kernel gradient as a slow non-YNN dot: in the refinement's train
  step (Lite0, 128 px, batch 8) 66 transposing copies took 42 ms and 41 such dots 27 ms of ~340.
  Written out, the copies fall to 30 (9 ms); the step with this and `conv_tap_grad` is 5-15 %
  faster (README, Refinement).
  """
  return jnp.dot(x, w)


def _pointwise_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _pointwise_bwd(residuals, g):
  x, w = residuals
  dw = jax.lax.dot_general(_flat(x), _flat(g), (((0,), (0,)), ((), ())))
  return jnp.dot(g, w.T), dw.astype(w.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


class Pointwise(nn.Module):
  """A 1 x 1 convolution (stride s, no padding) as a matrix product over the channels.

  Same parameters as `nn.Conv(features, (1, 1))` ('kernel' [1, 1, C_in, C_out], 'bias'
  [C_out]), same values up to summation order: x[:, ::s, ::s] @ kernel. XLA:CPU runs a 1 x 1
  `conv_general_dilated` about 2x slower than the same product written as a dot (measured:
  8 x 64 x 64 x 144 -> 24, 4.0 ms vs 1.4 ms), and the backward pass is two more dots
  (`pointwise`); on GPU both lower to the same GEMM.
  """
  features: int
  stride: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = conv_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    if self.stride > 1:
      x = x[:, ::self.stride, ::self.stride]
    y = pointwise(jnp.asarray(x, self.dtype), jnp.asarray(kernel[0, 0], self.dtype))
    if self.use_bias:
      y = y + jnp.asarray(self.param('bias', self.bias_init, (self.features,), jnp.float32),
                          self.dtype)
    return y


def conv(features: int, kernel: int, *, stride: int = 1, padding: Any = 0,
         groups: int = 1, use_bias: bool = False, dtype: Dtype = jnp.float32,
         in_channels: int = 0, name: str | None = None) -> nn.Module:
  """A square convolution; integer `padding` pads every side by that many pixels (torch), a
  string is XLA's ('SAME' / 'VALID'), pairs ((top, bottom), (left, right)) are explicit.
  1 x 1 convolutions without padding ('SAME' pads none at 1 x 1) are `Pointwise`; a convolution
  whose `in_channels` (when the caller knows them) make k * k * C_in <= SMALL_CONV_TERMS is
  `SmallConv` (same parameters as nn.Conv)."""
  if kernel == 1 and groups == 1 and padding in (0, 'SAME', 'VALID'):
    return Pointwise(features, stride, use_bias, dtype, name=name)
  if groups == 1 and 0 < kernel * kernel * in_channels <= SMALL_CONV_TERMS:
    return SmallConv(features, kernel, stride, padding, use_bias, dtype, name=name)
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_init, name=name)


def same_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
  """TF / XLA 'SAME': ((pad_before, pad_after), output size) for one spatial axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2), out


def _window(xp: jnp.ndarray, dy: int, dx: int, out_hw: tuple[int, int], stride: int):
  """xp[:, dy + s*i, dx + s*j, :] for i < out_h, j < out_w (one tap's strided slice)."""
  b, _, _, c = xp.shape
  (oh, ow), s = out_hw, stride
  return jax.lax.slice(xp, (0, dy, dx, 0), (b, dy + (oh - 1) * s + 1, dx + (ow - 1) * s + 1, c),
                       (1, s, s, 1))


def _tap_sum(xp: jnp.ndarray, w: jnp.ndarray, out_hw: tuple[int, int], stride: int):
  """sum over taps (dy, dx) of window(dy, dx) * w[dy, dx, 0]: xp [B, Hp, Wp, C], w [k, k, 1, C]
  -> [B, out_h, out_w, C]; unrolled, so XLA fuses it into one elementwise loop."""
  k = w.shape[0]
  out = None
  for dy in range(k):
    for dx in range(k):
      term = _window(xp, dy, dx, out_hw, stride) * w[dy, dx, 0]
      out = term if out is None else out + term
  return out


def _geometry(x_shape, k: int, s: int):
  """((pad_h, pad_w), (out_h, out_w)) of a k x k stride-s 'SAME' conv on x [B, H, W, C]."""
  pad_h, out_h = same_padding(x_shape[1], k, s)
  pad_w, out_w = same_padding(x_shape[2], k, s)
  return (pad_h, pad_w), (out_h, out_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shifted(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
  """Depthwise 'SAME' convolution as k*k shifted slices: x [B, H, W, C], w [k, k, 1, C] (same
  float dtype) -> [B, ceil(H/s), ceil(W/s), C].

  The forward pass is one fused elementwise loop. Its VJP is written by hand, because the
  autodiff of the unrolled sum leaves XLA:CPU with k*k multi-output reductions it fuses badly:
    input gradient  = the same shifted sum over the cotangent, dilated by the stride and padded,
                      with the kernel flipped (one fused loop, like the forward);
    kernel gradient = per tap, sum over (b, i, j) of window * cotangent, as a `lax.fori_loop`
                      over the k*k taps (dynamic slices of the padded input), so each tap is
                      one streaming reduction and the HLO stays small.
  Same numbers as the autodiff up to summation order.
  """
  k = w.shape[0]
  (pad_h, pad_w), out_hw = _geometry(x.shape, k, stride)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  return _tap_sum(xp, w, out_hw, stride)


def _depthwise_fwd(x, w, stride):
  return depthwise_shifted(x, w, stride), (x, w)


def _depthwise_bwd(stride, residuals, g):
  x, w = residuals
  k, s = w.shape[0], stride
  b, h, wd, c = x.shape
  (pad_h, pad_w), (oh, ow) = _geometry(x.shape, k, s)
  # Input gradient. Forward: out[i] = sum_d xp[s*i + d] w[d]; so dxp[y] = sum_d gd[y - d] w[d]
  # with gd = g dilated by s. Padding gd by k - 1 - pad_before in front (and cropping to
  # H + k - 1 rows) turns dx[j] = dxp[j + pad_before] into a valid correlation with w flipped.
  def spread(pad, size, out):
    return (k - 1 - pad[0], pad[0] + size - ((out - 1) * s + 1), s - 1)
  zero = jnp.zeros((), g.dtype)
  gp = jax.lax.pad(g, zero, ((0, 0, 0), spread(pad_h, h, oh), spread(pad_w, wd, ow), (0, 0, 0)))
  dx = _tap_sum(gp, w[::-1, ::-1], (h, wd), 1)
  # Kernel gradient: one reduction per tap, looped so that only one window is live at a time.
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  span = (b, (oh - 1) * s + 1, (ow - 1) * s + 1, c)

  def tap(t, acc):
    window = jax.lax.dynamic_slice(xp, (0, t // k, t % k, 0), span)
    if s > 1:
      window = window[:, ::s, ::s]
    return acc.at[t].set(jnp.sum(window * g, axis=(0, 1, 2)))

  dw = jax.lax.fori_loop(0, k * k, tap, jnp.zeros((k * k, c), w.dtype))
  return dx, dw.reshape(w.shape)


depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution, TF 'SAME' padding, no bias; kernel [k, k, 1, C] (HWIO).

  impl='shifted' sums k*k strided slices times per-channel weights (`depthwise_shifted`, with a
  hand-written VJP): one fused elementwise loop, 5-20x faster than XLA:CPU's grouped
  convolution for these shapes (measured: e.g. 8x56x56x144, k5 s2: 5.8 ms vs 90 ms) and exact
  up to summation order. impl='conv' uses lax.conv_general_dilated with feature_group_count=C
  (cuDNN's depthwise kernels on GPU).
  """
  kernel_size: int
  stride: int = 1
  impl: str = 'shifted'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s, c = self.kernel_size, self.stride, x.shape[-1]
    kernel = self.param('kernel', conv_init, (k, k, 1, c), jnp.float32)
    x = jnp.asarray(x, self.dtype)
    if self.impl == 'conv':
      return jax.lax.conv_general_dilated(x, jnp.asarray(kernel, self.dtype), (s, s), 'SAME',
                                          feature_group_count=c,
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.impl != 'shifted':
      raise ValueError(f"DepthwiseConv.impl must be 'shifted' or 'conv', got {self.impl!r}")
    # Accumulate in float32 whatever the compute dtype (k*k terms; also compiles faster).
    out = depthwise_shifted(jnp.asarray(x, jnp.float32), kernel, s)
    return jnp.asarray(out, self.dtype)


# A convolution with at most this many kernel taps x input channels is `SmallConv`.
SMALL_CONV_TERMS = 36


def _conv_pads(x_shape, k: int, stride: int, padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit ((top, bottom), (left, right)) of 'SAME' / 'VALID' / an int / explicit pairs."""
  if padding == 'SAME':
    return same_padding(x_shape[1], k, stride)[0], same_padding(x_shape[2], k, stride)[0]
  if padding == 'VALID':
    return (0, 0), (0, 0)
  if isinstance(padding, int):
    return (padding, padding), (padding, padding)
  return tuple(tuple(int(v) for v in p) for p in padding)


def _lax_conv(x, w, stride: int, pads):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def small_conv(x: jnp.ndarray, w: jnp.ndarray, stride: int, pads) -> jnp.ndarray:
  """A convolution with few input channels as one fused multiply-add loop: x [B, H, W, C] and
  w [k, k, C, F] (same float dtype), explicit `pads` ((top, bottom), (left, right)) -> [B, H',
  W', F], the sum over the k * k * C (tap, channel) pairs of the tap's strided window of channel
  c (broadcast over F) times w[dy, dx, c].

  For an RGB stem (3 x 3 x 3 = 27 terms) XLA:CPU's convolution and its im2col dot are both
  slow, since the contraction is only 27 long (measured, 8 x 256 x 256 x 3 -> 32, stride 2:
  conv 10-16 ms, this loop 2.4-3.3 ms); at 7 x 7 x 3 = 147 terms the convolution wins (27 vs
  70 ms), hence `SMALL_CONV_TERMS`. The VJP is the convolution's own (`lax.conv_general_dilated`
  differentiated), so training sees the same gradients as before; the input gradient is only
  computed when something needs it.
  """
  k, c = w.shape[0], w.shape[2]
  (top, bottom), (left, right) = pads
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h = (x.shape[1] + top + bottom - k) // stride + 1
  out_w = (x.shape[2] + left + right - k) // stride + 1
  out = None
  for dy in range(k):
    for dx in range(k):
      window = _window(xp, dy, dx, (out_h, out_w), stride)
      for ci in range(c):
        term = window[..., ci:ci + 1] * w[dy, dx, ci]
        out = term if out is None else out + term
  return out


def _small_conv_fwd(x, w, stride, pads):
  return small_conv(x, w, stride, pads), (x, w)


def _small_conv_bwd(stride, pads, residuals, g):
  x, w = residuals
  _, vjp = jax.vjp(lambda x, w: _lax_conv(x, w, stride, pads), x, w)
  return vjp(g)


small_conv.defvjp(_small_conv_fwd, _small_conv_bwd)


def _tap_kernel_grad(x: jnp.ndarray, g: jnp.ndarray, k: int, stride: int, pads) -> jnp.ndarray:
  """Kernel gradient of a k x k convolution, one dot per tap: dw[dy, dx] = window(dy, dx)^T g,
  contracting batch and positions. x [B, H, W, C], g [B, H', W', F] -> [k, k, C, F]."""
  (top, bottom), (left, right) = pads
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  g2 = _flat(g)
  taps = [jax.lax.dot_general(_flat(_window(xp, dy, dx, g.shape[1:3], stride)), g2,
                              (((0,), (0,)), ((), ())))
          for dy in range(k) for dx in range(k)]
  return jnp.stack(taps).reshape(k, k, x.shape[-1], g.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_tap_grad(x: jnp.ndarray, w: jnp.ndarray, stride: int, pads) -> jnp.ndarray:
  """`lax.conv_general_dilated` (NHWC, HWIO, explicit `pads`) whose kernel gradient, on CPU,
  is k * k dots (`_tap_kernel_grad`) instead of XLA's convolution-shaped one, for kernels of
  at least `TAP_GRAD_MIN_FEATURES` output channels (narrower ones keep the convolution's).

  The forward and the input gradient are the convolution's own. On CPU, XLA's kernel gradient
  of a narrow convolution is slow (YNNPACK; measured, 8 x 64 x 64 x 20 -> 20, 3 x 3: 16.8 ms,
  per-tap dots 6.9 ms; 40 channels at 32 x 32: 6.2 vs 3.6; 80 at 16 x 16: 3.1 vs 2.1; 160 at
  8 x 8: 3.0 vs 1.8); other platforms keep the convolution's (cuDNN's) kernel gradient.
  Same numbers up to summation order.
  """
  return _lax_conv(x, w, stride, pads)


def _conv_tap_grad_fwd(x, w, stride, pads):
  return _lax_conv(x, w, stride, pads), (x, w)


# Up to this many output channels XLA:CPU's own kernel gradient beat the per-tap dots in every
# shape measured (3 x 3, batch 8: 10 -> 10 at 128 x 128 4.9 vs 21 ms, 8 -> 8 3.9 vs 20, 16 -> 16
# 9.8 vs 39, 20 -> 10 12.6 vs 54, 16 -> 16 at 64 x 64 2.5 vs 3.4); from 20 output channels on the
# taps won in every one (20 -> 20 at 64 x 64 3.4 vs 12.6, 10 -> 20 at 128 x 128 20 vs 33).
TAP_GRAD_MIN_FEATURES = 17


def _conv_tap_grad_bwd(stride, pads, residuals, g):
  x, w = residuals
  _, vjp = jax.vjp(lambda x, w: _lax_conv(x, w, stride, pads), x, w)
  k = w.shape[0]
  if w.shape[-1] < TAP_GRAD_MIN_FEATURES:
    return vjp(g)
  dw = jax.lax.platform_dependent(
      x, g, cpu=lambda x, g: _tap_kernel_grad(x, g, k, stride, pads).astype(w.dtype),
      default=lambda x, g: vjp(g)[1])
  return vjp(g)[0], dw


conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


class Conv(nn.Module):
  """nn.Conv (square kernel, no groups) whose kernel gradient is `conv_tap_grad`'s: same
  parameters ('kernel' [k, k, C_in, F], optional 'bias' [F], float32), same forward (the inputs
  and kernel cast to the compute dtype, one `lax.conv_general_dilated`). For the narrow
  convolutions of training (the refinement decoder's 3 x 3 convolutions)."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: Any = 0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = conv_init
  bias_init: Any = nn.initializers.zeros

  def convolve(self, x: jnp.ndarray, kernel: jnp.ndarray, pads) -> jnp.ndarray:
    return conv_tap_grad(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype), self.stride,
                         pads)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    y = self.convolve(x, kernel, _conv_pads(x.shape, k, self.stride, self.padding))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + jnp.asarray(jnp.asarray(bias, self.dtype), y.dtype)
    return jnp.asarray(y, self.dtype)


class SmallConv(Conv):
  """nn.Conv (square kernel, no groups) computed by `small_conv`: for k * k * C_in <=
  SMALL_CONV_TERMS, e.g. EfficientNet-Lite0's RGB stem. Parameters 'kernel' [k, k, C_in, F]
  and optional 'bias' [F], as nn.Conv's. Accumulates in float32 whatever the compute dtype
  (inputs and kernel rounded to it first), output in the compute dtype."""

  def convolve(self, x: jnp.ndarray, kernel: jnp.ndarray, pads) -> jnp.ndarray:
    f32 = lambda a: jnp.asarray(jnp.asarray(a, self.dtype), jnp.float32)
    return small_conv(f32(x), f32(kernel), self.stride, pads)


def _channel_sum(a: jnp.ndarray) -> jnp.ndarray:
  return jnp.sum(a, axis=tuple(range(a.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float):
  """Training-mode batch normalisation over all axes but the last: x [..., C] (any float dtype),
  scale and bias [C] float32 -> (y [..., C] in x's dtype, batch mean [C], batch variance [C];
  float32 statistics, variance E[x^2] - E[x]^2 clipped at 0, as flax's BatchNorm).

  The VJP is written out: with xhat = (x - mean) * rstd and sums over the batch and positions,
  d bias = sum g, d scale = sum g * xhat, dx = scale * rstd * (g - (d bias + xhat * d scale) / n).
  The statistics outputs are for the running averages: their cotangents are ignored.
  """
  return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_forward(x, scale, bias, epsilon):
  xf = jnp.asarray(x, jnp.float32)
  n = xf.size // xf.shape[-1]
  mean = _channel_sum(xf) / n
  var = jnp.maximum(_channel_sum(xf * xf) / n - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = jnp.asarray((xf - mean) * (rstd * scale) + bias, x.dtype)
  return (y, mean, var), (x, mean, rstd, scale)


def _bn_bwd(epsilon, residuals, cotangents):
  x, mean, rstd, scale = residuals
  g = jnp.asarray(cotangents[0], jnp.float32)
  xhat = (jnp.asarray(x, jnp.float32) - mean) * rstd
  n = g.size // g.shape[-1]
  d_bias = _channel_sum(g)
  d_scale = _channel_sum(g * xhat)
  dx = (scale * rstd) * (g - (d_bias + xhat * d_scale) / n)
  return jnp.asarray(dx, x.dtype), d_scale, d_bias


batch_norm_train.defvjp(_bn_forward, _bn_bwd)


class BatchNorm(nn.Module):
  """flax's nn.BatchNorm over the channel axis (same variables: params 'scale' / 'bias',
  batch_stats 'mean' / 'var'; same running-average update and normalisation) with the
  training-mode VJP of `batch_norm_train`."""
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, use_running_average: bool) -> jnp.ndarray:
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    if use_running_average:
      y = (jnp.asarray(x, jnp.float32) - ra_mean.value) * (
          jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return jnp.asarray(y, self.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return jnp.asarray(y, self.dtype)


def batch_norm(*, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               name: str | None = None) -> BatchNorm:
  """BatchNorm over the channel axis; pass `use_running_average=not train` when calling.

  torch's momentum 0.1 (weight of the new batch) is flax's momentum 0.9.
  """
  return BatchNorm(momentum=0.9, epsilon=epsilon, dtype=dtype, name=name)


def max_pool_torch(x: jnp.ndarray, window: int = 3, stride: int = 2,
                   padding: int = 1) -> jnp.ndarray:
  """torch `MaxPool2d(window, stride, padding)`: the padding never wins (pads with -inf)."""
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def check_taps(taps: Iterable[str], valid: Sequence[str] = TAP_ORDER) -> tuple[str, ...]:
  """Validates tap names; returns them as a tuple (order kept)."""
  if isinstance(taps, str):
    taps = (taps,)
  taps = tuple(taps)
  if not taps:
    raise ValueError(f'taps is empty; choose from {", ".join(valid)}')
  bad = [t for t in taps if t not in valid]
  if bad:
    raise ValueError(f'unknown tap(s) {bad}; valid taps: {", ".join(valid)}')
  return taps


def deepest(taps: Sequence[str]) -> int:
  """Index in TAP_ORDER of the deepest requested tap: stages after it are never run."""
  return max(TAP_ORDER.index(t) for t in taps)


class TapNetwork:
  """Mixin of the backbone modules: `__call__(x) = from_first_conv(first_conv(x))`.

  The split after the first convolution lets the refinement network fuse its map there. A
  subclass provides `stem_layers()` -> (first conv, its norm, activation) and
  `body(h, taps, last, train, out)`, which runs the rest from the stem's activation `h`, adds
  its taps to `out` and returns it; `last` = `deepest(taps)` (>= 1).
  """

  def first_conv(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, H, W, 3] normalised -> first conv output [B, H/2, W/2, C0] (before its norm)."""
    conv, _, _ = self.stem_layers()
    return conv(jnp.asarray(x, self.dtype))

  def from_first_conv(self, h: jnp.ndarray, taps: Sequence[str] = DEFAULT_TAPS,
                      train: bool = False) -> dict[str, jnp.ndarray]:
    """Runs the network from the first conv's output on; returns {tap: array}."""
    taps = check_taps(taps)
    last = deepest(taps)
    _, norm, act = self.stem_layers()
    h = act(norm(h, use_running_average=not train))
    out = {'stem': h} if 'stem' in taps else {}
    if last == 0:
      return out
    return self.body(h, taps, last, train, out)

  def __call__(self, x: jnp.ndarray, taps: Sequence[str] = DEFAULT_TAPS,
               train: bool = False) -> dict[str, jnp.ndarray]:
    """x: [B, H, W, 3] normalised images -> {tap: [B, h, w, c]} (logits: [B, 1000])."""
    return self.from_first_conv(self.first_conv(x), taps, train)
