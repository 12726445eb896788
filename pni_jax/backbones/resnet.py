"""torchvision ResNet family in Flax: ResNet-18/50/101, WideResNet-50-2/101-2, ResNeXt-101 32x8d.

Architecture as `torchvision.models.resnet` (v1.5: the stride sits on the 3x3 convolution of
the bottleneck). Parameter names mirror torchvision's state_dict with `layerK.I` ->
`layerK/blockI` and `downsample.0/1` -> `downsample_conv/_bn`, so conversion is a rename plus
OIHW -> HWIO transposes (see convert.py).

Taps (all after the block's final ReLU):
  stem   [B, H/2,  W/2,  64]   relu(bn1(conv1(x))), before the max-pool
  layer1 [B, H/4,  W/4,  C1]   output of torchvision `layer1`
  layer2 [B, H/8,  W/8,  C2]   `layer2`
  layer3 [B, H/16, W/16, C3]   `layer3`
  layer4 [B, H/32, W/32, C4]   `layer4`
  logits [B, 1000]             fc(global average of layer4)
with C = 64, 128, 256, 512 (BasicBlock) or 256, 512, 1024, 2048 (Bottleneck). Spatial sizes are
the torch ones: H/2 means floor((H - 1) / 2) + 1 etc.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from pni_jax.backbones import layers

Dtype = Any


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with identity (or 1x1 conv) shortcut; expansion 1."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    ura = not train
    y = layers.conv(self.planes, 3, stride=self.stride, padding=1, dtype=self.dtype,
                    name='conv1')(x)
    y = nn.relu(layers.batch_norm(dtype=self.dtype, name='bn1')(y, use_running_average=ura))
    y = layers.conv(self.planes, 3, padding=1, dtype=self.dtype, name='conv2')(y)
    y = layers.batch_norm(dtype=self.dtype, name='bn2')(y, use_running_average=ura)
    if self.downsample:
      x = layers.conv(self.planes, 1, stride=self.stride, dtype=self.dtype,
                      name='downsample_conv')(x)
      x = layers.batch_norm(dtype=self.dtype, name='downsample_bn')(x, use_running_average=ura)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, groups) -> 1x1 bottleneck; expansion 4.

  width = planes * width_per_group / 64 * groups (torchvision's formula), so
  WideResNet (width_per_group=128) doubles the inner width and ResNeXt-32x8d has 32 groups.
  """
  planes: int
  stride: int = 1
  downsample: bool = False
  groups: int = 1
  width_per_group: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    ura = not train
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    y = layers.conv(width, 1, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(layers.batch_norm(dtype=self.dtype, name='bn1')(y, use_running_average=ura))
    y = layers.conv(width, 3, stride=self.stride, padding=1, groups=self.groups,
                    dtype=self.dtype, name='conv2')(y)
    y = nn.relu(layers.batch_norm(dtype=self.dtype, name='bn2')(y, use_running_average=ura))
    y = layers.conv(self.planes * 4, 1, dtype=self.dtype, name='conv3')(y)
    y = layers.batch_norm(dtype=self.dtype, name='bn3')(y, use_running_average=ura)
    if self.downsample:
      x = layers.conv(self.planes * 4, 1, stride=self.stride, dtype=self.dtype,
                      name='downsample_conv')(x)
      x = layers.batch_norm(dtype=self.dtype, name='downsample_bn')(x, use_running_average=ura)
    return nn.relu(x + y)


class ResNetStage(nn.Module):
  """torchvision `layerK`: `num_blocks` blocks, the first one strided / projecting."""
  num_blocks: int
  planes: int
  stride: int
  in_channels: int
  bottleneck: bool
  groups: int = 1
  width_per_group: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    expansion = 4 if self.bottleneck else 1
    for i in range(self.num_blocks):
      stride = self.stride if i == 0 else 1
      downsample = i == 0 and (self.stride != 1 or self.in_channels != self.planes * expansion)
      if self.bottleneck:
        block = Bottleneck(self.planes, stride, downsample, self.groups, self.width_per_group,
                           dtype=self.dtype, name=f'block{i}')
      else:
        block = BasicBlock(self.planes, stride, downsample, dtype=self.dtype, name=f'block{i}')
      x = block(x, train)
    return x


class ResNet(layers.TapNetwork, nn.Module):
  """A torchvision ResNet returning the requested taps; stops after the deepest one.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 23, 3) for the 101-layer nets.
    bottleneck: Bottleneck (True) or BasicBlock (False).
    groups, width_per_group: ResNeXt / WideResNet knobs (torchvision names).
    num_classes: classifier outputs ('logits' tap).
    dtype: compute dtype (params stay float32).

  Use `first_conv` + `from_first_conv` to insert something after the first convolution
  (their composition is `__call__`).
  """
  stage_sizes: Sequence[int]
  bottleneck: bool
  groups: int = 1
  width_per_group: int = 64
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  def setup(self):
    self.conv1 = layers.conv(64, 7, stride=2, padding=3, dtype=self.dtype)
    self.bn1 = layers.batch_norm(dtype=self.dtype)
    expansion = 4 if self.bottleneck else 1
    stages, in_ch = [], 64
    for i, (n, planes) in enumerate(zip(self.stage_sizes, (64, 128, 256, 512))):
      stages.append(ResNetStage(n, planes, 1 if i == 0 else 2, in_ch, self.bottleneck,
                                self.groups, self.width_per_group, dtype=self.dtype,
                                name=f'layer{i + 1}'))
      in_ch = planes * expansion
    self.stages = stages
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)

  def stem_layers(self):
    return self.conv1, self.bn1, nn.relu

  def body(self, h, taps, last, train, out):
    h = layers.max_pool_torch(h, 3, 2, 1)
    for i, stage in enumerate(self.stages):
      if i + 1 > last:
        break
      h = stage(h, train)
      if f'layer{i + 1}' in taps:
        out[f'layer{i + 1}'] = h
    if 'logits' in taps:
      out['logits'] = self.fc(jnp.mean(h, axis=(1, 2)))
    return out
