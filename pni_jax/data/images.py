"""Single-image reading and preprocessing (numpy + PIL only, no TensorFlow, no jax).

Decoding, the resize / crop geometry and the resampling filter live in `pni_jax.artifact_runner`
(a module without package imports that the inference artifact ships as its loader); this module
re-exports them and adds masks and the way back to the original image grid. The tf.data pipeline
(`pipeline.py`) decodes in the TensorFlow graph but resamples with the same taps in the same
order (see pni_jax/data/README.md, "Preprocessing"), so train / eval, `predict` and the artifact
see the same pixels.

  * resize (`data.resize_mode`): 'square' makes the whole image resize x resize (the paper);
    'short_side' makes the short side resize (torchvision `Resize(int)`, the authors' code);
    antialiased bilinear, in float32, no intermediate rounding;
  * center crop: top = round((h - crop) / 2), left = round((w - crop) / 2), Python rounding;
  * masks: binarised as `value != 0` (VisA masks hold small class indices, MVTec ones 0/255), then
    nearest neighbour (source pixel floor((i + 0.5) * in / out)).

Images are returned in [0, 1] and NOT normalised: each backbone applies its own mean / std.
"""

from __future__ import annotations

import numpy as np

from pni_jax import artifact_runner as _runner
from pni_jax.artifact_runner import CropBox
from pni_jax.artifact_runner import LEGACY_RESIZE_MODE
from pni_jax.artifact_runner import RESIZE_MODES
from pni_jax.artifact_runner import apply_taps
from pni_jax.artifact_runner import bilinear_taps
from pni_jax.artifact_runner import crop_box
from pni_jax.artifact_runner import crop_taps
from pni_jax.artifact_runner import default_workers
from pni_jax.artifact_runner import image_size
from pni_jax.artifact_runner import load_crop
from pni_jax.artifact_runner import load_image
from pni_jax.artifact_runner import nearest_taps
from pni_jax.artifact_runner import open_image
from pni_jax.artifact_runner import preprocess
from pni_jax.artifact_runner import resized_size
from pni_jax.artifact_runner import threaded_map

IMAGE_EXTENSIONS = _runner.EXTENSIONS

__all__ = [
    'CropBox', 'IMAGE_EXTENSIONS', 'LEGACY_RESIZE_MODE', 'RESIZE_MODES', 'apply_taps',
    'bilinear_taps', 'crop_box', 'crop_taps', 'default_workers', 'image_size', 'load_crop',
    'load_image', 'load_mask', 'mask_taps', 'nearest_taps', 'open_image', 'preprocess',
    'preprocess_mask', 'resized_size', 'threaded_map', 'unprocess_map',
]


def load_mask(path: str) -> np.ndarray:
  """Reads a ground-truth mask as bool [H, W] (`value != 0` on the first channel)."""
  x = np.asarray(open_image(path, 'mask'))
  if x.ndim == 3:
    x = x[..., 0]
  return x != 0


def mask_taps(orig_h: int, orig_w: int, resize: int, crop: int,
              mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Nearest-neighbour source rows [crop] and columns [crop] (int32) of the mask crop."""
  box = crop_box(orig_h, orig_w, resize, crop, mode)
  return (nearest_taps(orig_h, box.resized_h, box.crop_top, crop),
          nearest_taps(orig_w, box.resized_w, box.crop_left, crop))


def preprocess_mask(mask: np.ndarray, resize: int, crop: int, *, mode: str) -> np.ndarray:
  """bool / integer [H, W] -> float32 [crop, crop] in {0, 1} (binarise, nearest neighbour)."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f'preprocess_mask expects [H, W], got {mask.shape}')
  rows, cols = mask_taps(mask.shape[0], mask.shape[1], resize, crop, mode)
  return (mask[rows][:, cols] != 0).astype(np.float32)


def unprocess_map(amap: np.ndarray, orig_h: int, orig_w: int, resize: int, crop: int, *,
                  mode: str, fill: str = 'edge') -> np.ndarray:
  """Maps a [crop, crop] map (e.g. an anomaly map) back onto the original image grid.

  The map is placed where the crop sat in the resized image; the margins the crop cut off get
  `fill`: 'edge' repeats the nearest map value (default: no artificial step at the crop border),
  'zero' writes 0 (no prediction there). The canvas is then resampled (antialiased bilinear,
  float32, the filter of `preprocess`) to [orig_h, orig_w]: with mode 'square' each axis is
  scaled back by its own factor, so a non-square image gets its map over its whole extent.

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
  box = crop_box(orig_h, orig_w, resize, crop, mode)
  pad = ((box.crop_top, box.resized_h - crop - box.crop_top),
         (box.crop_left, box.resized_w - crop - box.crop_left))
  canvas = np.pad(amap, pad, mode='edge' if fill == 'edge' else 'constant')
  if canvas.shape == (orig_h, orig_w):
    return canvas
  ry, wy = bilinear_taps(box.resized_h, orig_h)
  rx, wx = bilinear_taps(box.resized_w, orig_w)
  return apply_taps(apply_taps(canvas, ry, wy, axis=0), rx, wx, axis=1)
