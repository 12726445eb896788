"""Image decoding, preprocessing and the standalone runner of a pni-jax inference artifact.

This module imports nothing from pni_jax (only the standard library, numpy, PIL and, for the
runner, jax): `export.export_model` copies this very file into the artifact as `run_artifact.py`
(read with importlib.resources), and `pni_jax.data.images` imports its decode / preprocess
functions, so the package, the tf.data pipeline's reference and the artifact share one copy.

  python run_artifact.py IMAGE_OR_FOLDER [...] [--json results.json] [--npz maps.npz] [--batch 8]

prints one line per image: image score, decision (when meta.json has an image threshold), path.
From Python: `art = Artifact(folder)`; `art(images01)` with images01 [B, S, S, 3] float32 in
[0, 1] -> dict(maps [B, S, S], image [B], patch [B, h, w]); `art.predict_files(paths)`.

Preprocessing (`preprocess`): decode to uint8 RGB (grayscale / palette / RGBA / 16-bit -> RGB),
resize to the model's input geometry, center crop, / 255:

  * resize_mode 'square': the whole image becomes resize x resize (aspect not kept; the paper's
    "resized to 512 x 512"); 'short_side': the short side becomes resize, the long side
    int(resize * long / short) (torchvision `Resize(int)`, the authors' code);
  * center crop: top = round((h - crop) / 2), left = round((w - crop) / 2) (Python rounding);
  * the resize is antialiased bilinear: output pixel i of an axis averages the input with the
    triangle filter centred at (i + 0.5) * in / out, its half-width stretched to in / out when
    shrinking (Pillow's BILINEAR filter), weights normalised to sum to 1. It is computed in float32
    as a sequence of per-tap multiply-adds (`bilinear_taps`, `apply_taps`), rows then columns,
    without rounding to uint8 in between, the / 255 folded into the row weights; the tf.data
    pipeline runs the same taps in the same order, so both give the same floats.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import sys
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image

FORMAT = 'pni-jax-inference-artifact'
VERSION = 1
EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
RESIZE_MODES = ('square', 'short_side')
# Artifacts written before resize_mode existed were preprocessed this way.
LEGACY_RESIZE_MODE = 'short_side'
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------- decoding


def open_image(path: str, what: str = 'image') -> Image.Image:
  """Opens and fully decodes `path` with PIL; every failure names the file.

  PNG files are first checked against their chunk checksums (PIL's decoder alone does not check
  them, so a damaged file could decode to wrong pixels without an error).
  Raises FileNotFoundError when missing, ValueError when unreadable, truncated or damaged.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file not found: {path}')
  try:
    img = Image.open(path)
    if img.format == 'PNG':
      img.verify()
      img = Image.open(path)
    img.load()
  except _PIL_ERRORS as e:
    raise ValueError(f'cannot read {what} {path}: {type(e).__name__}: {e} '
                     '(unreadable, truncated or not an image)') from e
  return img


def image_size(path: str, what: str = 'image') -> tuple[int, int]:
  """(height, width) from the file header only (cheap); errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file not found: {path}')
  try:
    with Image.open(path) as img:
      w, h = img.size
  except _PIL_ERRORS as e:
    raise ValueError(f'cannot read {what} {path}: {type(e).__name__}: {e} '
                     '(unreadable or not an image)') from e
  if h < 1 or w < 1:
    raise ValueError(f'{what} {path} is empty ({w}x{h} pixels)')
  return h, w


def to_uint8_rgb(img: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3]. 16-bit / 32-bit integer and float images are scaled."""
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
    x = np.asarray(img).astype(np.float64)
    top = 65535.0 if (img.mode.startswith('I;16') or x.max() > 255) else 255.0
    x = np.clip(np.round(x * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)
  if img.mode == 'F':
    x = np.nan_to_num(np.asarray(img, dtype=np.float64))
    top = 1.0 if x.max() <= 1.0 else 255.0
    x = np.clip(np.round(x * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)
  if img.mode != 'RGB':
    img = img.convert('RGB')  # L, LA, P, RGBA (alpha dropped), CMYK, YCbCr, 1
  return np.asarray(img, dtype=np.uint8)


def load_image(path: str) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3] RGB; errors name the file."""
  return to_uint8_rgb(open_image(path, 'image'))


def default_workers() -> int:
  """Threads for decoding and resampling images: the CPUs this process may use, at most 8."""
  try:
    n = len(os.sched_getaffinity(0))
  except AttributeError:                      # not on Linux
    n = os.cpu_count() or 1
  return max(1, min(8, n))


def threaded_map(fn: Callable, items: Iterable, workers: int = 0, ahead: int = 0,
                 pool: concurrent.futures.Executor | None = None
                 ) -> Iterator[concurrent.futures.Future]:
  """`fn` over `items` on `workers` threads (0: `default_workers()`; or on `pool`, an executor
  the caller keeps, e.g. across the requests of a service), in order: yields one
  Future per item, whose `.result()` is fn's value or raises fn's exception (so a caller can
  skip one bad file and go on). At most `ahead` calls (0: 2 x workers) run or wait beyond the
  item being consumed, so memory stays bounded by the caller, not by the number of items.

  PIL's decoders and numpy's loops over large arrays release the GIL, so images decode and
  resample in parallel, and while the caller's thread scores the previous batch. Leaving the
  loop early (or an exception in it) cancels the calls not yet started."""
  workers = int(workers) or default_workers()
  ahead = max(1, int(ahead) or 2 * workers)
  own = pool is None
  if own:
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='pni-load')
  pending = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) > ahead:
        yield pending.popleft()
    while pending:
      yield pending.popleft()
  finally:
    for f in pending:
      f.cancel()
    if own:
      pool.shutdown(wait=True)
    else:
      concurrent.futures.wait(pending)


def load_crop(path: str, resize: int, crop: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [H, W, 3] image as decoded, float32 [crop, crop, 3] model input) of one file."""
  image = load_image(path)
  return image, preprocess(image, resize, crop, mode=mode)


# ----------------------------------------------------------------------------- geometry


def resized_size(h: int, w: int, resize: int, mode: str) -> tuple[int, int]:
  """(height, width) after the resize step of `mode` ('square' or 'short_side')."""
  if resize <= 0:
    raise ValueError(f'data.resize must be positive, got {resize}')
  if mode == 'square':
    return resize, resize
  if mode != 'short_side':
    raise ValueError(f'data.resize_mode must be one of {RESIZE_MODES}, got {mode!r}')
  if h <= w:
    return resize, int(resize * w / h)
  return int(resize * h / w), resize


class CropBox(NamedTuple):
  """Where the model's crop x crop input sits, in resized and in original pixel coordinates.

  The crop covers original rows [top, top + height) and columns [left, left + width) (floats).
  """
  resized_h: int
  resized_w: int
  crop_top: int     # in the resized image
  crop_left: int
  top: float        # in the original image
  left: float
  height: float
  width: float


def crop_box(orig_h: int, orig_w: int, resize: int, crop: int, mode: str) -> CropBox:
  """Geometry of resize (`mode`) + center crop for an orig_h x orig_w image."""
  rh, rw = resized_size(orig_h, orig_w, resize, mode)
  if crop <= 0 or crop > min(rh, rw):
    raise ValueError(f'data.crop={crop} must be in [1, data.resize={resize}] '
                     f'(resized image is {rh}x{rw})')
  top = int(round((rh - crop) / 2.0))
  left = int(round((rw - crop) / 2.0))
  sy, sx = orig_h / rh, orig_w / rw
  return CropBox(rh, rw, top, left, top * sy, left * sx, crop * sy, crop * sx)


# ----------------------------------------------------------------------------- resampling


def bilinear_taps(in_size: int, out_size: int, first: int = 0, count: int | None = None,
                  gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Antialiased bilinear resampling of one axis, in_size -> out_size, as taps.

  Output pixel i (of first .. first + count - 1) is sum_k w[i, k] * x[idx[i, k]]. The filter is
  Pillow's BILINEAR: a triangle centred at c = (i + 0.5) * in / out with half-width
  s = max(in / out, 1) input pixels, sampled at input pixel centres j + 0.5 over
  j in [trunc(c - s + 0.5), trunc(c + s + 0.5)), weights normalised to sum to `gain` (float64,
  then stored as float32). Unused taps have weight 0 and index 0.

  Returns:
    idx [count, K] int32, w [count, K] float32, K = 2 * ceil(s) + 1.
  """
  count = out_size - first if count is None else count
  if in_size < 1 or out_size < 1 or first < 0 or count < 0 or first + count > out_size:
    raise ValueError(f'bad resampling: {in_size} -> {out_size}, pixels {first}..{first + count}')
  scale = in_size / out_size
  support = max(scale, 1.0)
  k = 2 * int(math.ceil(support)) + 1
  centre = (np.arange(first, first + count, dtype=np.float64) + 0.5) * scale
  lo = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
  hi = np.minimum(np.trunc(centre + support + 0.5), in_size).astype(np.int64)
  j = lo[:, None] + np.arange(k)[None, :]                                   # [count, K]
  x = (j - centre[:, None] + 0.5) / support
  w = np.where(j < hi[:, None], np.maximum(1.0 - np.abs(x), 0.0), 0.0)
  w *= gain / w.sum(axis=1, keepdims=True)
  idx = np.where(w > 0, j, 0)
  return idx.astype(np.int32), w.astype(np.float32)


def nearest_taps(in_size: int, out_size: int, first: int = 0,
                 count: int | None = None) -> np.ndarray:
  """Nearest-neighbour source index of output pixels first .. first + count - 1:
  min(floor((i + 0.5) * in / out), in - 1). Returns idx [count] int32."""
  count = out_size - first if count is None else count
  centre = (np.arange(first, first + count, dtype=np.float64) + 0.5) * (in_size / out_size)
  return np.minimum(np.floor(centre), in_size - 1).astype(np.int32)


def apply_taps(x: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
  """sum_k w[:, k] * x[idx[:, k]] along `axis` in float32: the first product, then one
  multiply-add per further tap, in order k (weights and pixels are >= 0, so starting from the
  first product equals starting from 0).

  x: [..., n, ...] (uint8 or float32) -> float32 [..., count, ...] (count = idx.shape[0]), C order.

  Each output element gets exactly those float32 operations (a product, then a sum per tap: no
  fused multiply-add). A uint8 input is converted inside the product (no float copy of the image
  per tap), products and sums go into two preallocated buffers, a tap whose weights are all 0
  (it would add exact zeros) is skipped, and an unresized axis is one product.
  """
  x = np.asarray(x)
  n = x.shape[axis]
  count = idx.shape[0]
  taps = [k for k in range(idx.shape[1]) if k == 0 or np.any(w[:, k])]
  if len(taps) == 1 and count == n and np.array_equal(idx[:, 0], np.arange(n)):
    shape = [1] * x.ndim                      # an unresized axis: one product, no gather
    shape[axis] = -1
    return np.multiply(w[:, 0].reshape(shape), x, dtype=np.float32)
  wshape = [1] * x.ndim
  wshape[axis] = count
  w = np.asarray(w, np.float32)               # uint8 x float32 -> float32, converted per element
  out = np.multiply(w[:, taps[0]].reshape(wshape), np.take(x, idx[:, taps[0]], axis=axis))
  term = np.empty_like(out)
  for k in taps[1:]:
    np.multiply(w[:, k].reshape(wshape), np.take(x, idx[:, k], axis=axis), out=term)
    np.add(out, term, out=out)
  return out


def crop_taps(orig_h: int, orig_w: int, resize: int, crop: int, mode: str):
  """Taps that resize an orig_h x orig_w image and cut the center crop, in one go. The row
  weights also carry the 1 / 255 that maps uint8 to [0, 1] (no separate division).

  Returns (rows_idx [crop, Ky], rows_w [crop, Ky], cols_idx [crop, Kx], cols_w [crop, Kx]).
  """
  box = crop_box(orig_h, orig_w, resize, crop, mode)
  ry, wy = bilinear_taps(orig_h, box.resized_h, box.crop_top, crop, gain=1.0 / 255.0)
  rx, wx = bilinear_taps(orig_w, box.resized_w, box.crop_left, crop)
  return ry, wy, rx, wx


def preprocess(image: np.ndarray, resize: int, crop: int, *, mode: str) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [crop, crop, 3] in [0, 1]: resize (`mode`), center crop, / 255."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'preprocess expects uint8 [H, W, 3], got {image.dtype} {image.shape}')
  ry, wy, rx, wx = crop_taps(image.shape[0], image.shape[1], resize, crop, mode)
  x = apply_taps(image, ry, wy, axis=0)      # rows (with the 1 / 255) first, then columns
  return apply_taps(x, rx, wx, axis=1)


# ----------------------------------------------------------------------------- the runner


def list_images(inputs):
  """Files and folders (their image files, sorted) -> paths."""
  paths = []
  for item in inputs:
    if not os.path.exists(item):
      raise FileNotFoundError(f'no such image file or folder: {item}')
    if os.path.isdir(item):
      paths += sorted(os.path.join(item, f) for f in os.listdir(item)
                      if f.lower().endswith(EXTENSIONS))
    else:
      paths.append(item)
  return paths


class Artifact:
  """The exported function with its parameters; call it on preprocessed crops."""

  def __init__(self, directory):
    import jax  # pylint: disable=g-import-not-at-top  (decoding alone needs no jax)

    self.directory = os.fspath(directory)
    meta_path = os.path.join(self.directory, 'meta.json')
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f'no pni-jax artifact at {self.directory} (missing meta.json)')
    with open(meta_path, encoding='utf-8') as f:
      try:
        self.meta = json.load(f)
      except ValueError as e:
        raise ValueError(f'{meta_path}: not valid JSON ({e})') from e
    if self.meta.get('format') != FORMAT or self.meta.get('version') != VERSION:
      raise ValueError(f'{self.directory}: artifact format {self.meta.get("format")!r} version '
                       f'{self.meta.get("version")!r} is not supported (expected {FORMAT} '
                       f'{VERSION})')
    blob_path = os.path.join(self.directory, 'model.stablehlo')
    with open(blob_path, 'rb') as f:
      blob = f.read()
    try:
      self.exported = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # pylint: disable=broad-except  (flatbuffer errors have many types)
      raise ValueError(f'cannot read {blob_path}: {type(e).__name__}: {e}') from e
    params_path = os.path.join(self.directory, 'params.npz')
    try:
      with np.load(params_path, allow_pickle=False) as z:
        params = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f'cannot read {params_path}: {type(e).__name__}: {e}') from e
    self.params = jax.device_put(params)
    inp = self.meta['input']
    self.size = int(inp['size'])
    self.resize, self.crop = int(inp['resize']), int(inp['crop'])
    self.resize_mode = str(inp.get('resize_mode', LEGACY_RESIZE_MODE))
    self.batch_size = self.meta.get('batch_size')
    self._call = jax.jit(self.exported.call)

  def __call__(self, images01):
    """images01 [B, S, S, 3] float in [0, 1] -> numpy float32 dict(maps, image, patch)."""
    x = np.asarray(images01, dtype=np.float32)
    s = self.size
    if x.ndim != 4 or x.shape[1:] != (s, s, 3):
      raise ValueError(f'expected images [B, {s}, {s}, 3], got {x.shape}')
    b = x.shape[0]
    if not self.batch_size:
      return {k: np.asarray(v) for k, v in self._call(self.params, x).items()}
    chunks = []
    for start in range(0, b, self.batch_size):
      part = x[start:start + self.batch_size]
      n = part.shape[0]
      if n < self.batch_size:  # fixed-batch export: pad with copies of the last image
        part = np.concatenate([part, np.repeat(part[-1:], self.batch_size - n, axis=0)])
      out = self._call(self.params, part)
      chunks.append({k: np.asarray(v)[:n] for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

  def load_crop(self, path):
    """One file -> its preprocessed crop [S, S, 3] float32."""
    return preprocess(load_image(path), self.resize, self.crop, mode=self.resize_mode)

  def load_images(self, paths):
    """Files -> preprocessed crops [N, S, S, 3] float32 (decoded on `default_workers()`
    threads)."""
    return np.stack([f.result() for f in threaded_map(self.load_crop, paths)])

  def predict_files(self, paths, batch_size=8):
    """Scores image files in batches of `batch_size`; dict(maps, image, patch, decision). The
    files decode on `default_workers()` threads while the previous batch is scored."""
    parts, batch = [], []
    for f in threaded_map(self.load_crop, paths, ahead=2 * batch_size):
      batch.append(f.result())
      if len(batch) == batch_size:
        parts.append(self(np.stack(batch)))
        batch = []
    if batch:
      parts.append(self(np.stack(batch)))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    thr = (self.meta.get('thresholds') or {}).get('image')
    out['decision'] = (np.where(out['image'] >= thr, 'defective', 'normal') if thr is not None
                       else np.full(len(paths), 'unknown'))
    return out


def main(argv=None):
  parser = argparse.ArgumentParser(description='Scores images with a pni-jax inference artifact.')
  parser.add_argument('inputs', nargs='+', help='image files or folders')
  parser.add_argument('--artifact', default=os.path.dirname(os.path.abspath(__file__)),
                      help='artifact folder (default: the folder of this script)')
  parser.add_argument('--batch', type=int, default=8, help='images per call')
  parser.add_argument('--json', default='', help='write image scores and decisions here')
  parser.add_argument('--npz', default='', help='write paths, image scores and maps here')
  args = parser.parse_args(argv)
  art = Artifact(args.artifact)
  paths = list_images(args.inputs)
  if not paths:
    raise SystemExit(f'no images found in {args.inputs}')
  out = art.predict_files(paths, args.batch)
  for p, score, decision in zip(paths, out['image'], out['decision']):
    print(f'{score:.6f}  {decision:<9s}  {p}')
  if args.json:
    rows = [dict(path=p, image_score=float(s), decision=str(d))
            for p, s, d in zip(paths, out['image'], out['decision'])]
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(dict(thresholds=art.meta.get('thresholds'), images=rows), f, indent=2)
  if args.npz:
    np.savez(args.npz, paths=np.asarray(paths), image=out['image'], maps=out['maps'],
             patch=out['patch'])
  return out


if __name__ == '__main__':
  main(sys.argv[1:])
