"""Single-image reading and preprocessing (numpy + PIL only, no TensorFlow).

The same functions run inside the tf.data pipeline (`pipeline.py`) and on the predict path, so the
two cannot disagree. Geometry follows torchvision's `Resize(int)` + `CenterCrop(int)` on PIL images
(the authors' preprocessing):

  * resize: the short side becomes `resize`, the long side `int(resize * long / short)`; PIL
    bilinear, which low-pass filters (antialiases) when it shrinks;
  * center crop: top = round((h - crop) / 2), left = round((w - crop) / 2), Python rounding;
  * masks: binarised as `value != 0` (VisA masks hold small class indices, MVTec ones 0/255), then
    PIL nearest neighbour, then `> 0.5`.

Images are returned in [0, 1] and NOT normalised: each backbone applies its own mean / std.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


def _open(path: str, what: str) -> Image.Image:
  """Opens and fully decodes `path` with PIL; every failure names the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file not found: {path}')
  try:
    img = Image.open(path)
    img.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'cannot read {what} {path}: {type(e).__name__}: {e} '
                     '(unreadable or not an image)') from e
  return h, w


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3]. 16-bit / 32-bit integer images are scaled, not clipped."""
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
    x = np.asarray(img).astype(np.float64)
    top = 65535.0 if (img.mode.startswith('I;16') or x.max() > 255) else 255.0
    x = np.clip(np.round(x * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)
  if img.mode == 'F':
    x = np.asarray(img, dtype=np.float64)
    top = 1.0 if x.max() <= 1.0 else 255.0
    x = np.clip(np.round(x * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)
  if img.mode != 'RGB':
    img = img.convert('RGB')  # L, LA, P, RGBA (alpha dropped), CMYK, YCbCr, 1
  return np.asarray(img, dtype=np.uint8)


def load_image(path: str) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3] RGB (grayscale / RGBA / 16-bit become RGB).

  Raises FileNotFoundError when missing and ValueError naming the file when it cannot be decoded
  (corrupt or truncated).
  """
  return _to_uint8_rgb(_open(path, 'image'))


def load_mask(path: str) -> np.ndarray:
  """Reads a ground-truth mask as bool [H, W] (`value != 0` on the first channel)."""
  img = _open(path, 'mask')
  x = np.asarray(img)
  if x.ndim == 3:
    x = x[..., 0]
  return x != 0


def resized_size(h: int, w: int, resize: int) -> tuple[int, int]:
  """Size after torchvision `Resize(resize)`: the short side becomes `resize`."""
  if resize <= 0:
    raise ValueError(f'data.resize must be positive, got {resize}')
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


def crop_box(orig_h: int, orig_w: int, resize: int, crop: int) -> CropBox:
  """Geometry of resize-short-side + center-crop for an orig_h x orig_w image."""
  rh, rw = resized_size(orig_h, orig_w, resize)
  if crop <= 0 or crop > min(rh, rw):
    raise ValueError(f'data.crop={crop} must be in [1, data.resize={resize}] '
                     f'(resized image is {rh}x{rw})')
  top = int(round((rh - crop) / 2.0))
  left = int(round((rw - crop) / 2.0))
  sy, sx = orig_h / rh, orig_w / rw
  return CropBox(rh, rw, top, left, top * sy, left * sx, crop * sy, crop * sx)


def preprocess(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [crop, crop, 3] in [0, 1]: resize short side, center crop."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'preprocess expects uint8 [H, W, 3], got {image.dtype} {image.shape}')
  h, w = image.shape[:2]
  box = crop_box(h, w, resize, crop)
  img = Image.fromarray(image)
  if (box.resized_h, box.resized_w) != (h, w):
    img = img.resize((box.resized_w, box.resized_h), Image.BILINEAR)
  x = np.asarray(img)[box.crop_top:box.crop_top + crop, box.crop_left:box.crop_left + crop]
  return x.astype(np.float32) / np.float32(255.0)


def preprocess_mask(mask: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """bool / integer [H, W] -> float32 [crop, crop] in {0, 1} (nearest neighbour, then > 0.5)."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f'preprocess_mask expects [H, W], got {mask.shape}')
  h, w = mask.shape
  box = crop_box(h, w, resize, crop)
  img = Image.fromarray((mask != 0).astype(np.uint8) * 255)
  if (box.resized_h, box.resized_w) != (h, w):
    img = img.resize((box.resized_w, box.resized_h), Image.NEAREST)
  m = np.asarray(img)[box.crop_top:box.crop_top + crop, box.crop_left:box.crop_left + crop]
  return (m.astype(np.float32) / 255.0 > 0.5).astype(np.float32)


def unprocess_map(amap: np.ndarray, orig_h: int, orig_w: int, resize: int, crop: int,
                  fill: str = 'edge') -> np.ndarray:
  """Maps a [crop, crop] map (e.g. an anomaly map) back onto the original image grid.

  The map is placed where the crop sat in the resized image; the margins the crop cut off get
  `fill`: 'edge' repeats the nearest map value (default: no artificial step at the crop border),
  'zero' writes 0 (no prediction there). The canvas is then resized bilinearly (PIL, float32) to
  [orig_h, orig_w].

  Args:
    amap: [crop, crop] float map.
  Returns:
    [orig_h, orig_w] float32.
  """
  amap = np.asarray(amap, dtype=np.float32)
  if amap.shape != (crop, crop):
    raise ValueError(f'unprocess_map expects a [{crop}, {crop}] map, got {amap.shape}')
  if fill not in ('edge', 'zero'):
    raise ValueError(f"fill must be 'edge' or 'zero', got {fill!r}")
  box = crop_box(orig_h, orig_w, resize, crop)
  pad = ((box.crop_top, box.resized_h - crop - box.crop_top),
         (box.crop_left, box.resized_w - crop - box.crop_left))
  canvas = np.pad(amap, pad, mode='edge' if fill == 'edge' else 'constant')
  if canvas.shape == (orig_h, orig_w):
    return canvas
  out = Image.fromarray(canvas).resize((orig_w, orig_h), Image.BILINEAR)
  return np.asarray(out, dtype=np.float32)
