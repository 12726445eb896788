"""torch state_dict (numpy arrays) -> Flax variables, and orbax save / restore of the result.

Renaming (torch key -> Flax path), then one rule per leaf:
  4-D `weight` (OIHW)         -> params/.../kernel, transposed to HWIO (grouped and depthwise
                                 convs too: (O, I/g, kh, kw) -> (kh, kw, I/g, O))
  2-D `weight` (out, in)      -> params/.../kernel, transposed to (in, out)
  1-D `weight` (BatchNorm)    -> params/.../scale
  `bias`                      -> params/.../bias
  `running_mean/_var`         -> batch_stats/.../mean, var
  `num_batches_tracked`       -> dropped
The result is checked against the Flax model's own variable shapes (names and shapes must match
exactly), so a wrong architecture or a truncated file is an error, never a silent misload.
Accepted namings: torchvision (also its legacy DenseNet `norm.1` keys), timm (same names as
torchvision for ResNets/DenseNets; `tf_efficientnet_lite0` naming for Lite0) and lukemelas /
ml-illustrated EfficientNet-PyTorch naming (the embedded Lite0 file).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax.backbones import efficientnet_lite

FORMAT = 'pni_jax.backbones/1'

_LEGACY_DENSE = re.compile(r'^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.*)$')
_TIMM_LITE_STAGE_STARTS = np.cumsum([0] + [s[0] for s in efficientnet_lite.LITE0_STAGES])


def _resnet_path(key: str) -> tuple[str, ...]:
  parts = key.split('.')
  if parts[0].startswith('layer') and len(parts) >= 4:
    stage, idx, *rest = parts
    if rest[0] == 'downsample':
      rest = [('downsample_conv', 'downsample_bn')[int(rest[1])]] + rest[2:]
    return (stage, f'block{idx}', *rest)
  return tuple(parts)


def _densenet_path(key: str) -> tuple[str, ...]:
  if key.startswith('features.'):
    key = key[len('features.'):]
  m = _LEGACY_DENSE.match(key)
  if m:  # torchvision's published checkpoints: 'denselayer1.norm.1.weight' -> 'norm1'
    key = f'{m.group(1)}{m.group(2)}.{m.group(3)}'
  return tuple(key.split('.'))


_TIMM_LITE_FIRST = {'conv_dw': 'depthwise_conv', 'bn1': 'bn1', 'conv_pw': 'project_conv',
                    'bn2': 'bn2'}
_TIMM_LITE_REST = {'conv_pw': 'expand_conv', 'bn1': 'bn0', 'conv_dw': 'depthwise_conv',
                   'bn2': 'bn1', 'conv_pwl': 'project_conv', 'bn3': 'bn2'}
_TIMM_LITE_TOP = {'conv_stem': 'conv_stem', 'bn1': 'bn0', 'conv_head': 'conv_head', 'bn2': 'bn1',
                  'classifier': 'fc'}


def _lite_path(key: str, timm: bool) -> tuple[str, ...]:
  parts = key.split('.')
  if not timm:  # lukemelas: '_blocks.3._expand_conv.weight', '_conv_stem.weight', '_fc.bias'
    parts = [p.lstrip('_') for p in parts]
    if parts[0] == 'blocks':
      return (f'blocks_{parts[1]}', *parts[2:])
    return tuple(parts)
  if parts[0] == 'blocks':  # timm: 'blocks.<stage>.<j>.conv_pwl.weight'
    stage, j = int(parts[1]), int(parts[2])
    table = _TIMM_LITE_FIRST if stage == 0 else _TIMM_LITE_REST
    return (f'blocks_{_TIMM_LITE_STAGE_STARTS[stage] + j}', table.get(parts[3], parts[3]),
            *parts[4:])
  return (_TIMM_LITE_TOP.get(parts[0], parts[0]), *parts[1:])


def torch_path(family: str, key: str, timm_lite: bool = False) -> tuple[str, ...]:
  """Module path (without the leaf) + torch leaf name for one state_dict key."""
  if family == 'resnet':
    return _resnet_path(key)
  if family == 'densenet':
    return _densenet_path(key)
  if family == 'efficientnet_lite':
    return _lite_path(key, timm_lite)
  raise ValueError(f'unknown backbone family {family!r}')


def _leaf(path: tuple[str, ...],
          value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray] | None:
  """(collection, flax path, array) for one torch leaf; None for leaves Flax has no use for."""
  *mod, leaf = path
  mod = tuple(mod)
  value = np.asarray(value)
  if leaf == 'num_batches_tracked':
    return None
  if leaf == 'weight' and value.ndim == 4:
    return 'params', mod + ('kernel',), np.transpose(value, (2, 3, 1, 0))
  if leaf == 'weight' and value.ndim == 2:
    return 'params', mod + ('kernel',), value.T
  if leaf == 'weight' and value.ndim == 1:
    return 'params', mod + ('scale',), value
  if leaf == 'bias':
    return 'params', mod + ('bias',), value
  if leaf == 'running_mean':
    return 'batch_stats', mod + ('mean',), value
  if leaf == 'running_var':
    return 'batch_stats', mod + ('var',), value
  return 'unknown', path, value


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = v
  return out


def _listing(items, limit: int = 8) -> str:
  items = sorted('/'.join(i) if isinstance(i, tuple) else str(i) for i in items)
  more = f' ... (+{len(items) - limit} more)' if len(items) > limit else ''
  return ', '.join(items[:limit]) + more


def state_dict_to_variables(name: str, family: str, state_dict: Mapping[str, np.ndarray],
                            expected: Mapping[str, Any]) -> dict[str, Any]:
  """Converts a torch state_dict to Flax variables shaped like `expected`.

  Args:
    name: backbone name (for error messages).
    family: 'resnet' | 'densenet' | 'efficientnet_lite'.
    state_dict: torch key -> numpy array (torch layout).
    expected: the Flax variables' abstract tree ({'params': ..., 'batch_stats': ...} of
      objects with .shape), e.g. from `jax.eval_shape(model.init, ...)`.

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays.

  Raises:
    ValueError: names or shapes do not match the architecture.
  """
  timm_lite = family == 'efficientnet_lite' and any(k.startswith('blocks.') for k in state_dict)
  want = _flatten(expected)
  got: dict[tuple[str, ...], np.ndarray] = {}
  unknown = []
  for key, value in state_dict.items():
    leaf = _leaf(torch_path(family, key, timm_lite), value)
    if leaf is None:
      continue
    collection, path, array = leaf
    if collection == 'unknown':
      unknown.append(key)
      continue
    got[(collection,) + path] = array
  extra = [p for p in got if p not in want] + unknown
  missing = [p for p in want if p not in got]
  # The classifier is part of the architecture: a checkpoint without it is rejected too.
  bad_shape = [f'{"/".join(p)}: got {tuple(got[p].shape)}, want {tuple(want[p].shape)}'
               for p in want if p in got and tuple(got[p].shape) != tuple(want[p].shape)]
  if extra or missing or bad_shape:
    lines = [f'the state_dict does not fit backbone {name!r} (is it a {name} checkpoint?)']
    if missing:
      lines.append(f'missing {len(missing)}: {_listing(missing)}')
    if extra:
      lines.append(f'unexpected {len(extra)}: {_listing(extra)}')
    if bad_shape:
      lines.append(f'shape mismatch {len(bad_shape)}: {"; ".join(bad_shape[:5])}')
    raise ValueError('\n  '.join(lines))
  return _unflatten({p: np.ascontiguousarray(a, dtype=np.float32) for p, a in got.items()})


def random_variables(expected: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """torchvision-like random init of a variables tree (NOT pretrained: smoke tests only).

  Conv kernels ~ N(0, 2 / fan_out) (kaiming_normal_, fan_out = kh * kw * out), Dense kernels
  ~ U(+-1/sqrt(fan_in)), biases 0, BN scale 1 / bias 0 / mean 0 / var 1.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in _flatten(expected).items():
    shape = tuple(leaf.shape)
    name = path[-1]
    if name == 'kernel' and len(shape) == 4:
      std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
      value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    elif name == 'kernel':
      bound = 1.0 / np.sqrt(shape[0])
      value = rng.uniform(-bound, bound, shape).astype(np.float32)
    elif name in ('scale', 'var'):
      value = np.ones(shape, np.float32)
    else:
      value = np.zeros(shape, np.float32)
    out[path] = value
  return _unflatten(out)


def to_jax(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict of arrays -> same structure of float32 jax arrays."""
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dict(variables))


def save(directory: str | os.PathLike, name: str, variables: Mapping[str, Any],
         source: str = '', force: bool = False) -> str:
  """Writes variables with orbax's StandardCheckpointer; records the backbone name.

  Returns the absolute checkpoint directory.
  """
  import orbax.checkpoint as ocp  # slow import: only when writing / reading checkpoints
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not force:
    raise FileExistsError(f'{directory} exists; pass --force to overwrite')
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory, jax.tree.map(np.asarray, dict(variables)), force=force,
             custom_metadata={'arch': name, 'source': source, 'format': FORMAT})
  ckptr.wait_until_finished()
  return directory


def restore(directory: str | os.PathLike, name: str,
            expected: Mapping[str, Any]) -> dict[str, Any]:
  """Reads a checkpoint written by `save` (or any orbax tree with the same structure).

  Raises:
    FileNotFoundError: no checkpoint there.
    ValueError: the checkpoint was written for another backbone or does not fit.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no weights checkpoint directory at {directory}')
  if not any(os.path.exists(os.path.join(directory, f))
             for f in ('_METADATA', '_CHECKPOINT_METADATA')):
    raise FileNotFoundError(f'{directory} is not an orbax checkpoint (no _METADATA file)')
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(directory)
  except (FileNotFoundError, ValueError) as e:
    raise FileNotFoundError(f'{directory} is not an orbax checkpoint: {e}') from e
  arch = (getattr(meta, 'custom_metadata', None) or {}).get('arch')
  if arch is not None and arch != name:
    raise ValueError(f'{directory} holds weights for {arch!r}, not {name!r}')
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s.shape), np.float32),
                        dict(expected))
  try:
    return ckptr.restore(directory, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f'{directory}: checkpoint does not fit backbone {name!r}: {e}') from e
