"""Atomic file writes: an interrupted run never leaves a half-written output.

Each writer fills a temporary file in the destination's folder, flushes it to disk and renames it
over the destination with `os.replace` (atomic on POSIX and Windows within one file system). On any
error the temporary file is removed and an existing destination is left untouched.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from typing import Any, Iterator

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = 'w') -> Iterator[Any]:
  """Opens a temporary file next to `path`; renames it to `path` when the block ends cleanly.

  Args:
    path: destination; its parent folders are created.
    mode: 'w' (text, UTF-8) or 'wb'.
  """
  if mode not in ('w', 'wb'):
    raise ValueError(f"mode must be 'w' or 'wb'; got {mode!r}")
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are ordinary readable files
    with os.fdopen(fd, mode, **({'encoding': 'utf-8', 'newline': ''} if mode == 'w' else {})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path, 'wb') as f:
    f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_open(path, 'w') as f:
    f.write(text)


def _plain(obj: Any) -> Any:
  """numpy scalars / arrays -> Python; non-finite floats -> None (strict JSON has no NaN)."""
  if isinstance(obj, dict):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _plain(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
  """Writes `obj` as strict JSON (numpy values converted; nan / inf written as null)."""
  with atomic_open(path, 'w') as f:
    json.dump(_plain(obj), f, indent=indent, sort_keys=False, allow_nan=False)
    f.write('\n')


def atomic_save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Saves image [H, W] / [H, W, 3] / [H, W, 4] uint8 as a PNG."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                          and image.shape[2] in (3, 4))):
    raise ValueError(f'{os.fspath(path)}: need a uint8 image [H, W], [H, W, 3] or [H, W, 4]; got '
                     f'{image.dtype} {image.shape}')
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  atomic_write_bytes(path, buffer.getvalue())
