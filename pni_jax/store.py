"""Host-side storage of per-image patch feature maps with a memory cap.

Fitting needs the training feature maps twice after extraction (coreset gathering, nearest-code
targets, MLP inputs). They live in host memory while they fit under `memory.feature_cap_mb`;
beyond that they are written to a memory-mapped file in the run's scratch folder, so host memory
stays bounded by the cap whatever the number of training images.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np

DTYPES = {'float32': np.float32, 'float16': np.float16}


class FeatureStore:
  """Feature maps [N, H, W, d] filled batch by batch.

  Attributes:
    array: [N, H, W, d] numpy array or np.memmap (read it in chunks).
    spilled: True when the maps live on disk.
  """

  def __init__(self, shape: tuple[int, int, int, int], *, cap_bytes: int,
               scratch_dir: str | os.PathLike | None = None, dtype: str = 'float32'):
    if dtype not in DTYPES:
      raise ValueError(f'feature store dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
    self.shape = tuple(int(s) for s in shape)
    self.dtype = np.dtype(DTYPES[dtype])
    self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
    self.spilled = self.nbytes > cap_bytes
    self._path = None
    if self.spilled:
      scratch = pathlib.Path(scratch_dir or tempfile.gettempdir())
      scratch.mkdir(parents=True, exist_ok=True)
      fd, path = tempfile.mkstemp(prefix='features-', suffix='.bin', dir=scratch)
      os.close(fd)
      self._path = path
      self.array = np.memmap(path, dtype=self.dtype, mode='w+', shape=self.shape)
    else:
      self.array = np.empty(self.shape, self.dtype)

  def write(self, start: int, batch: np.ndarray) -> None:
    """Stores maps [b, H, W, d] at images start .. start + b - 1."""
    self.array[start:start + batch.shape[0]] = batch

  def flat_rows(self, rows: np.ndarray) -> np.ndarray:
    """Gathers patch rows [k, d] by flat index into the [N * H * W, d] view (sorted reads)."""
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind='stable')
    flat = self.array.reshape(-1, self.shape[-1])
    out = np.empty((rows.size, self.shape[-1]), np.float32)
    out[order] = flat[rows[order]]
    return out

  def chunks(self, images_per_chunk: int):
    """Yields (start, maps [b, H, W, d] float32) over the stored images."""
    for start in range(0, self.shape[0], images_per_chunk):
      yield start, np.asarray(self.array[start:start + images_per_chunk], np.float32)

  def close(self) -> None:
    if self._path is not None:
      del self.array
      try:
        os.remove(self._path)
      except FileNotFoundError:
        pass
      self._path = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
