"""Writes a PNG grid of synthetic defects (pni_jax.synth) so a person can judge the generators.

  python tools/show_synth.py --out DIR [--image PATH ...] [--texture PATH] [--size 256]
      [--samples 4] [--seed 0]

One PNG per input image, DIR/synth_<name>.png: a row per kind (cutpaste, scar, draem, drawing) and
a last row of `synthesize` + `augment` samples; each sample is shown twice, plain and with the mask
overlaid (red tint, yellow outline) and its area in percent. Without --image, scikit-image's
bundled brick (grayscale -> RGB) and chelsea photos are used; without --texture, DRAEM fills from
`procedural_texture` (a different one per sample).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from pni_jax import synth  # pylint: disable=g-import-not-at-top

LABEL_W = 110
GAP = 4


def _square(image: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes: [H, W, 3] float -> [size, size, 3] float32 in [0, 1]."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  crop = (np.clip(image[top:top + s, left:left + s], 0, 1) * 255).round().astype(np.uint8)
  pil = Image.fromarray(crop).resize((size, size), Image.BILINEAR)
  return np.asarray(pil, np.float32) / 255.0


def _read(path: str, size: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image {path!r} does not exist')
  try:
    with Image.open(path) as im:
      return _square(np.asarray(im.convert('RGB'), np.float32) / 255.0, size)
  except OSError as e:
    raise ValueError(f'cannot read image {path!r}: {e}') from e


def _default_images(size: int) -> dict[str, np.ndarray]:
  from skimage import data  # pylint: disable=g-import-not-at-top
  return {'brick': _square(synth.to_unit_float(data.brick()), size),
          'chelsea': _square(synth.to_unit_float(data.chelsea()), size)}


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Red tint on the mask, yellow on its outline. image [S, S, 3], mask [S, S] -> uint8 RGB."""
  m = mask.astype(bool)
  out = image.copy()
  out[m] = 0.5 * out[m] + 0.5 * np.array([1.0, 0.0, 0.0])
  inner = m.copy()
  inner[1:] &= m[:-1]
  inner[:-1] &= m[1:]
  inner[:, 1:] &= m[:, :-1]
  inner[:, :-1] &= m[:, 1:]
  out[m & ~inner] = np.array([1.0, 1.0, 0.0])
  return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _rows(key: jax.Array, image: np.ndarray, texture: np.ndarray | None, samples: int):
  """Returns [(label, [(image [S, S, 3], mask [S, S], caption), ...]), ...] for the five rows."""
  size = image.shape[0]
  k_tex, k_gen, k_aug = jax.random.split(key, 3)
  if texture is None:
    textures = jax.jit(jax.vmap(lambda k: synth.procedural_texture(k, size, size)))(
        jax.random.split(k_tex, samples))
  else:
    textures = jnp.broadcast_to(texture, (samples,) + texture.shape)
  generators = {
      'cutpaste': lambda k, t: synth.cutpaste(k, image),
      'scar': lambda k, t: synth.cutpaste_scar(k, image),
      'draem': lambda k, t: synth.draem(k, image, t),
      'drawing': lambda k, t: synth.drawing(k, image),
  }
  keys = jax.random.split(k_gen, samples)
  rows = []
  for name, fn in generators.items():
    out, mask = jax.jit(jax.vmap(fn))(keys, textures)
    rows.append((name, [(o, m, '') for o, m in zip(np.asarray(out), np.asarray(mask))]))

  def mixed(k, t):
    k1, k2 = jax.random.split(k)
    out, mask, kind = synth.synthesize(k1, image, t)
    out, mask = synth.augment(k2, out, mask, max_angle=10.0)
    return out, mask, kind

  out, mask, kind = jax.jit(jax.vmap(mixed))(jax.random.split(k_aug, samples), textures)
  triples = zip(np.asarray(out), np.asarray(mask), np.asarray(kind))
  rows.append(('synthesize\n+ augment', [(o, m, synth.KINDS[int(k)]) for o, m, k in triples]))
  return rows


def render(rows, size: int) -> Image.Image:
  """Composes the grid: per row a label, then (plain, overlay) pairs."""
  samples = len(rows[0][1])
  width = LABEL_W + samples * (2 * size + GAP) + GAP
  height = len(rows) * (size + 16 + GAP) + GAP
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for r, (label, pairs) in enumerate(rows):
    top = GAP + r * (size + 16 + GAP)
    draw.multiline_text((6, top + size // 2 - 20), label, fill=(0, 0, 0), spacing=2)
    for c, (img, mask, caption) in enumerate(pairs):
      left = LABEL_W + c * (2 * size + GAP)
      plain = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
      canvas.paste(Image.fromarray(plain), (left, top))
      canvas.paste(Image.fromarray(_overlay(img, mask)), (left + size, top))
      draw.text((left + 2, top + size + 2), f'{caption} mask {100 * mask.mean():.1f}%'.strip(),
                fill=(0, 0, 0))
  return canvas


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='output folder for the PNG grids')
  parser.add_argument('--image', action='append', default=[],
                      help='input image (repeatable); default: skimage brick and chelsea')
  parser.add_argument('--texture', default='', help='DRAEM texture image; default procedural')
  parser.add_argument('--size', type=int, default=256, help='square working size in pixels')
  parser.add_argument('--samples', type=int, default=4, help='samples per kind')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if args.size < 32:
    raise ValueError(f'--size must be at least 32, got {args.size}')
  if args.samples < 1:
    raise ValueError(f'--samples must be positive, got {args.samples}')
  images = ({pathlib.Path(p).stem: _read(p, args.size) for p in args.image} if args.image
            else _default_images(args.size))
  texture = _read(args.texture, args.size) if args.texture else None
  os.makedirs(args.out, exist_ok=True)
  key = jax.random.key(args.seed)
  for i, (name, image) in enumerate(images.items()):
    rows = _rows(jax.random.fold_in(key, i), image, texture, args.samples)
    path = os.path.join(args.out, f'synth_{name}.png')
    render(rows, args.size).save(path)
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
