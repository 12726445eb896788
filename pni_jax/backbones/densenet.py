"""torchvision DenseNet-161 / DenseNet-201 in Flax.

Architecture as `torchvision.models.densenet` (BN-ReLU-conv "pre-activation" dense layers with
a 1x1 bottleneck of bn_size * growth_rate channels; transitions BN-ReLU-1x1 conv-2x2 avg-pool
halving the channels). Parameter names mirror torchvision's state_dict without the `features.`
prefix: conv0, norm0, denseblockK/denselayerJ/{norm1,conv1,norm2,conv2}, transitionK/{norm,conv},
norm5, classifier.

Taps. PatchCore (amazon-science/patchcore-inspection) hooks `features.denseblockK` of the
torchvision model and timm's `features_only` DenseNet reports `features.denseblockK` for
K = 1..3 and `features.norm5` (BN + ReLU) at the last stride, so:
  stem   [B, H/2,  W/2,  C0]  relu(norm0(conv0(x))), before the max-pool
  layer1 [B, H/4,  W/4,  C1]  output of denseblock1 (the concatenation), BEFORE transition1
  layer2 [B, H/8,  W/8,  C2]  output of denseblock2, before transition2
  layer3 [B, H/16, W/16, C3]  output of denseblock3, before transition3
  layer4 [B, H/32, W/32, C4]  relu(norm5(denseblock4)), torchvision's `F.relu(features(x))`
  logits [B, 1000]            classifier(global average of layer4)
DenseNet-161: C = 96, 384, 768, 2112, 2208.  DenseNet-201: C = 64, 256, 512, 1792, 1920.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from pni_jax.backbones import layers

Dtype = Any


class DenseLayer(nn.Module):
  """norm1-relu-conv1(1x1) -> norm2-relu-conv2(3x3, pad 1): `growth_rate` new channels."""
  growth_rate: int
  bn_size: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    ura = not train
    y = nn.relu(layers.batch_norm(dtype=self.dtype, name='norm1')(x, use_running_average=ura))
    y = layers.conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype, name='conv1')(y)
    y = nn.relu(layers.batch_norm(dtype=self.dtype, name='norm2')(y, use_running_average=ura))
    return layers.conv(self.growth_rate, 3, padding=1, dtype=self.dtype, name='conv2')(y)


class DenseBlock(nn.Module):
  """`num_layers` dense layers; each sees the concatenation of all earlier outputs.

  x: [B, h, w, c] -> [B, h, w, c + num_layers * growth_rate] (input channels first, as torch).
  """
  num_layers: int
  growth_rate: int
  bn_size: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    features = [x]
    for j in range(self.num_layers):
      inp = features[0] if j == 0 else jnp.concatenate(features, axis=-1)
      features.append(DenseLayer(self.growth_rate, self.bn_size, dtype=self.dtype,
                                 name=f'denselayer{j + 1}')(inp, train))
    return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
  """norm-relu-conv(1x1, `features` out)-avgpool(2, stride 2): halves size and channels."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    y = nn.relu(layers.batch_norm(dtype=self.dtype, name='norm')(x, use_running_average=not train))
    y = layers.conv(self.features, 1, dtype=self.dtype, name='conv')(y)
    return nn.avg_pool(y, (2, 2), strides=(2, 2))


class DenseNet(layers.TapNetwork, nn.Module):
  """A torchvision DenseNet returning the requested taps; stops after the deepest one.

  Attributes:
    growth_rate, block_config, num_init_features, bn_size: torchvision's constructor arguments.
    num_classes: classifier outputs ('logits' tap).
    dtype: compute dtype (params stay float32).

  `first_conv` + `from_first_conv` split the network after conv0 (the refinement network fuses
  the anomaly map there); their composition is `__call__`.
  """
  growth_rate: int
  block_config: Sequence[int]
  num_init_features: int
  bn_size: int = 4
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  def setup(self):
    self.conv0 = layers.conv(self.num_init_features, 7, stride=2, padding=3, dtype=self.dtype)
    self.norm0 = layers.batch_norm(dtype=self.dtype)
    blocks, transitions = [], []
    c = self.num_init_features
    for i, n in enumerate(self.block_config):
      blocks.append(DenseBlock(n, self.growth_rate, self.bn_size, dtype=self.dtype,
                               name=f'denseblock{i + 1}'))
      c += n * self.growth_rate
      if i + 1 < len(self.block_config):
        transitions.append(Transition(c // 2, dtype=self.dtype, name=f'transition{i + 1}'))
        c //= 2
    self.blocks = blocks
    self.transitions = transitions
    self.norm5 = layers.batch_norm(dtype=self.dtype)
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)

  def stem_layers(self):
    return self.conv0, self.norm0, nn.relu

  def body(self, h, taps, last, train, out):
    h = layers.max_pool_torch(h, 3, 2, 1)
    for i, block in enumerate(self.blocks):
      if i + 1 > last:
        break
      if i > 0:
        h = self.transitions[i - 1](h, train)
      h = block(h, train)
      if i + 1 == len(self.blocks):
        h = nn.relu(self.norm5(h, use_running_average=not train))
      if f'layer{i + 1}' in taps:
        out[f'layer{i + 1}'] = h
    if 'logits' in taps:
      out['logits'] = self.classifier(jnp.mean(h, axis=(1, 2)))
    return out
