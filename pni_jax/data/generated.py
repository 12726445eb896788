"""Embedded generated dataset, written in MVTec AD layout (numpy + PIL only).

Five categories (design notes in pni_jax/data/README.md):
  weave, granite  textures: procedural patterns with scratches, stains, holes, foreign patches;
  tokens, cable   objects whose parts are individually normal but swapped, misplaced, missing or
                  duplicated. Those defects are locally invisible: every part is drawn by the same
                  renderer, on a uniform background, separated by gaps wider than a CNN patch's
                  receptive field, so only the position tells them apart.
  lattice         a lattice of parts whose types follow a fixed order ((row + column) mod 3), laid
                  at a random phase in every image, so any part can be anywhere: position tells
                  nothing, every part is locally normal, only the neighbouring parts (one lattice
                  pitch away) show that a part is swapped, replaced or missing.

Every image is a pure function of (seed, category, split, index): it draws from its own
`np.random.default_rng([seed, crc32(category), split_code, index])`, so files are byte-identical
across runs and independent of which other categories are generated. `generate` writes each
category into a staging folder, writes a hash manifest (`generated.json`) last and then renames
the folder into place; a complete category whose manifest verifies is skipped.

Run `python -m pni_jax.data.generated --root /tmp/gen --check` to generate and measure how
locally invisible the object defects are (nearest training patch distances).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
import zlib
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

GENERATOR_VERSION = 1
MARKER = 'generated.json'
TEXTURES = ('weave', 'granite')
OBJECTS = ('tokens', 'cable', 'lattice')
CATEGORIES = TEXTURES + OBJECTS
DEFECTS = {
    'weave': ('scratch', 'stain', 'hole', 'foreign'),
    'granite': ('scratch', 'stain', 'hole', 'foreign'),
    'tokens': ('swap', 'misplaced', 'missing', 'duplicate'),
    'cable': ('swap', 'rotate', 'duplicate'),
    'lattice': ('swap', 'replace', 'missing'),
}
_SPLIT_CODES = {'train': 0, 'test_good': 1, 'test_defect': 2}


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
  """One generated image.

  image: uint8 [S, S, 3]; mask: bool [S, S] (all False for normal images); reference: uint8
  [S, S, 3], the same draw (same jitter, same noise) without the defect (== image when normal).
  """
  image: np.ndarray
  mask: np.ndarray
  reference: np.ndarray


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates yy, xx: float32 [S, S]."""
  r = np.arange(size, dtype=np.float32)
  return np.meshgrid(r, r, indexing='ij')


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _coverage(sdf: np.ndarray) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] of a shape given its signed distance (px, < 0 inside)."""
  return np.clip(0.5 - sdf, 0.0, 1.0)


# ------------------------------------------------------------------------------------ noise


def _value_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
  """Smooth value noise in [0, 1]: random values on a grid of spacing `cell` px, smoothstep-
  interpolated. float32 [S, S]."""
  cell = max(float(cell), 1.0)
  n = int(np.ceil(size / cell)) + 2
  values = rng.random((n, n), dtype=np.float32)
  off = rng.random(2) * cell
  coords = (np.arange(size, dtype=np.float32) + off[:, None]) / cell  # [2, S]
  i0 = np.floor(coords).astype(np.int64)
  t = coords - i0
  t = t * t * (3 - 2 * t)
  iy, ix = i0
  ty, tx = t[0][:, None], t[1][None, :]
  rows = values[:, ix] * (1 - tx) + values[:, ix + 1] * tx      # [n, S], separable
  return (rows[iy] * (1 - ty) + rows[iy + 1] * ty).astype(np.float32)


def _fbm(rng, size, cells: Sequence[float], gains: Sequence[float]) -> np.ndarray:
  """Multi-scale noise, zero mean, roughly in [-1, 1]. float32 [S, S]."""
  out = sum(g * (_value_noise(rng, size, c) - 0.5) for c, g in zip(cells, gains))
  return (out * (2.0 / sum(gains)) * 1.6).astype(np.float32)


# ------------------------------------------------------------------------------------ textures


def _weave(rng, size: int, f: float, palette=((200, 172, 122), (184, 160, 116))) -> np.ndarray:
  """Basket weave: threads of period P alternate over / under. float32 [S, S, 3] in 0..255."""
  yy, xx = _grid(size)
  period = max(16.0 * f, 4.0)
  theta = np.deg2rad(rng.uniform(-1.0, 1.0))
  pu, pv = rng.uniform(0, 2 * period, size=2)
  u = xx * np.cos(theta) + yy * np.sin(theta) + pu
  v = -xx * np.sin(theta) + yy * np.cos(theta) + pv
  over = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
  fu, fv = (u / period) % 1.0, (v / period) % 1.0
  height = np.where(over, np.sin(np.pi * fv), np.sin(np.pi * fu)) ** 0.7
  fibres = 0.07 * np.sin(2 * np.pi * np.where(over, v, u) * 5.0 / period)
  shade = 0.45 + 0.55 * height + fibres
  shade *= 1.0 + 0.05 * _fbm(rng, size, [96 * f], [1.0])
  colour = np.where(over[..., None], np.float32(palette[0]), np.float32(palette[1]))
  jitter = 1.0 + rng.normal(0, 0.012, size=3)
  return (colour * shade[..., None] * jitter).astype(np.float32)


_GRANITE = ((168, 152, 146), (52, 48, 50), (236, 230, 222), (196, 132, 118))


def _granite(rng, size: int, f: float, palette=_GRANITE) -> np.ndarray:
  """Granite: multi-scale mottling with dark, white and pink grains. float32 [S, S, 3]."""
  base, dark, white, pink = (np.float32(c) for c in palette)
  n = _fbm(rng, size, [48 * f, 24 * f, 12 * f, 6 * f, 3 * f], [1.0, 0.7, 0.5, 0.35, 0.25])
  img = base * (1.0 + 0.16 * n)[..., None]
  for colour, cell, lo in ((dark, 3.5 * f, 0.80), (white, 3.5 * f, 0.82), (pink, 5.0 * f, 0.78)):
    g = _value_noise(rng, size, max(cell, 1.0))
    a = np.clip((g - lo) * 12.0, 0.0, 1.0)[..., None]
    img = img * (1 - a) + colour * a
  jitter = 1.0 + rng.normal(0, 0.012, size=3)
  return (img * jitter).astype(np.float32)


def _blob_sdf(rng, yy, xx, cy, cx, radius, wobble=0.25, aspect=(0.7, 1.0)):
  """Approximate signed distance (px) of an irregular blob: a wobbly, rotated ellipse."""
  a = rng.uniform(*aspect)
  rot = rng.uniform(0, np.pi)
  dy, dx = yy - cy, xx - cx
  u = dx * np.cos(rot) + dy * np.sin(rot)
  v = (-dx * np.sin(rot) + dy * np.cos(rot)) / a
  ang = np.arctan2(v, u)
  r = np.ones_like(ang)
  for k in (2, 3, 5):
    r = r + wobble / k * np.sin(k * ang + rng.uniform(0, 2 * np.pi))
  return np.hypot(u, v) - radius * r


def _curve_distance(yy, xx, points: np.ndarray, reach: float) -> np.ndarray:
  """Distance (px) from every pixel to a polyline `points` [K, 2] (y, x), exact within `reach`
  px of the curve's bounding box and `reach` + 1 beyond it. Vectorised over pixels and segments
  (K is fixed and small)."""
  size = yy.shape[0]
  lo = np.maximum(np.floor(points.min(0) - reach - 1), 0).astype(int)
  hi = np.minimum(np.ceil(points.max(0) + reach + 2), size).astype(int)
  out = np.full(yy.shape, reach + 1.0, np.float32)
  if (hi <= lo).any():
    return out
  sub = np.s_[lo[0]:hi[0], lo[1]:hi[1]]
  out[sub] = _segments_distance(yy[sub], xx[sub], points)
  return out


def _segments_distance(yy, xx, points):
  a, b = points[:-1], points[1:]                               # [K-1, 2]
  ab = b - a
  p = np.stack([yy, xx], axis=-1)[..., None, :]                # [..., 1, 2]
  t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0, 1)
  closest = a + t[..., None] * ab
  return np.sqrt(((p - closest) ** 2).sum(-1)).min(-1)


def _texture_defect(rng, img: np.ndarray, kind: str, category: str, f: float):
  """Applies one surface defect to img (float32 [S, S, 3]); returns (image, mask bool [S, S])."""
  size = img.shape[0]
  yy, xx = _grid(size)
  margin = 0.18 * size
  cy, cx = rng.uniform(margin, size - margin, size=2)
  if kind == 'scratch':
    length = rng.uniform(40, 90) * f
    phi = rng.uniform(0, np.pi)
    d = np.array([np.sin(phi), np.cos(phi)]) * length / 2
    normal = np.array([d[1], -d[0]]) / max(np.linalg.norm(d), 1e-6)
    ctrl = np.array([cy, cx]) + normal * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, 33)[:, None]
    p0, p2 = np.array([cy, cx]) - d, np.array([cy, cx]) + d
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p2
    width = max(rng.uniform(2.0, 3.5) * f, 1.0)
    sdf = _curve_distance(yy, xx, pts, width + 2) - width / 2
    s = _coverage(sdf)[..., None]
    target = np.float32(238.0) if rng.random() < 0.5 else np.float32(40.0)
    img = img * (1 - 0.85 * s) + 0.85 * s * target
  elif kind == 'stain':
    sdf = _blob_sdf(rng, yy, xx, cy, cx, rng.uniform(10, 20) * f)
    s = _coverage(sdf)[..., None]
    tint = np.float32([0.62, 0.5, 0.38]) if rng.random() < 0.5 else np.float32([0.55, 0.62, 0.75])
    img = img * (1 - s * (1 - tint))
  elif kind == 'hole':
    radius = rng.uniform(6, 12) * f
    rim = max(2.0 * f, 1.0)
    sdf = _blob_sdf(rng, yy, xx, cy, cx, radius, wobble=0.12, aspect=(0.75, 1.0))
    outer = _coverage(sdf - rim)[..., None]
    inner = _coverage(sdf)[..., None]
    img = img * (1 - outer) + outer * np.minimum(img * 1.3, 255.0)
    depth = np.clip(-sdf / max(radius, 1.0), 0, 1)[..., None]
    img = img * (1 - inner) + inner * (np.float32(38.0) - 20.0 * depth)
    sdf = sdf - rim
  elif kind == 'foreign':
    sdf = _blob_sdf(rng, yy, xx, cy, cx, rng.uniform(12, 22) * f, wobble=0.3)
    s = _coverage(sdf)[..., None]
    if category == 'weave':   # a granite-like speckle in cold colours
      fill = _granite(rng, size, f, palette=((110, 140, 170), (30, 40, 60), (220, 235, 240),
                                             (90, 170, 120)))
    else:                     # a woven patch in green
      fill = _weave(rng, size, f * 0.6, palette=((90, 150, 80), (70, 120, 60)))
    img = img * (1 - s) + s * fill
  else:
    raise ValueError(f'unknown texture defect {kind!r}')
  return img, sdf <= 0


def _texture_sample(category: str, rng, size: int, defect: str | None) -> Sample:
  f = size / 256.0
  clean = _weave(rng, size, f) if category == 'weave' else _granite(rng, size, f)
  clean = clean + rng.normal(0, 3.0, size=clean.shape).astype(np.float32)
  reference = _to_uint8(clean)
  if defect is None:
    return Sample(reference, np.zeros((size, size), bool), reference)
  img, mask = _texture_defect(rng, clean, defect, category, f)
  return Sample(_to_uint8(img), mask, reference)


# ------------------------------------------------------------------------------------ objects
#
# Both object categories are scenes: a list of (part, slot) drawn by ONE renderer onto a uniform
# background. A normal image uses the fixed assignment; a defect only edits the list. Parts are
# separated from each other and from the border by >= 40 px of background at 256 px (scaled with
# the image size), wider than the receptive field of a mid-level CNN patch feature.


def _box_sdf(dy, dx, hy, hx):
  qy, qx = np.abs(dy) - hy, np.abs(dx) - hx
  return np.hypot(np.maximum(qy, 0), np.maximum(qx, 0)) + np.minimum(np.maximum(qy, qx), 0)


def _triangle_sdf(dy, dx, r):
  """Equilateral triangle pointing up, centroid at 0, circumradius ~1.04 r (exact distance)."""
  k = np.sqrt(3.0)
  h = 0.9 * r                                # half the side length
  px = np.abs(dx) - h
  py = -dy + h / k                           # y up
  fold = px + k * py > 0
  px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
  px = px - np.clip(px, -2 * h, 0)
  return -np.hypot(px, py) * np.sign(py)


def _token_parts():
  """The 'tokens' parts: (name, colour, signed distance function of (dy, dx, r))."""
  return (
      ('disc', (200, 44, 40), lambda dy, dx, r: np.hypot(dy, dx) - r),
      ('square', (42, 84, 200), lambda dy, dx, r: _box_sdf(dy, dx, 0.78 * r, 0.78 * r)),
      ('triangle', (44, 160, 64), _triangle_sdf),
      ('diamond', (222, 190, 40), lambda dy, dx, r: (np.abs(dy) + np.abs(dx) - r) / np.sqrt(2)),
      ('ring', (142, 60, 172), lambda dy, dx, r: np.abs(np.hypot(dy, dx) - 0.68 * r) - 0.32 * r),
      ('cross', (232, 122, 30), lambda dy, dx, r: np.minimum(_box_sdf(dy, dx, 0.3 * r, r),
                                                             _box_sdf(dy, dx, r, 0.3 * r))),
      ('capsule', (30, 168, 180),
       lambda dy, dx, r: np.hypot(dy, np.maximum(np.abs(dx) - 0.5 * r, 0)) - 0.48 * r),
  )


# 3 x 3 slots; part i sits in slot TOKEN_HOME[i]; slots 4 (centre) and 7 stay empty.
TOKEN_HOME = (0, 1, 2, 3, 5, 6, 8)


def _token_geometry(size: int):
  f = size / 256.0
  pitch, radius = float(round(72.0 * f)), 16.0 * f   # integer pitch: slots are integer translates
  centres = [(size / 2 + (s // 3 - 1) * pitch, size / 2 + (s % 3 - 1) * pitch) for s in range(9)]
  jitter = max(int(round(3 * f)), 1)
  return f, radius, centres, jitter


def _draw_token(img, part, cy, cx, radius, f):
  """Draws one token (in place) on img float32 [S, S, 3]; the look depends only on the offset
  from (cy, cx), so a token looks the same in every slot."""
  _, colour, sdf_fn = part
  size = img.shape[0]
  reach = 1.15 * radius + 3                                      # covers every part's extent
  y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
  x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  dy, dx = yy - cy, xx - cx
  sdf = sdf_fn(dy, dx, radius)
  shade = 1.0 - 0.22 * dy / radius + 0.08 * dx / radius
  shade = shade * np.where(-sdf < 1.5 * f, 0.78, 1.0)          # darker rim
  a = _coverage(sdf)[..., None]
  img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + a * (np.float32(colour) * shade[..., None])


def _token_footprint(size, part, cy, cx, radius, dilate):
  yy, xx = _grid(size)
  return part[2](yy - cy, xx - cx, radius) <= dilate


def _render_tokens(size: int, placed, radius, f, gain, noise) -> np.ndarray:
  """uint8 [size, size, 3]: token parts drawn at (cy, cx, part) in order on the plain
  background, with the image's gain and noise."""
  img = np.empty((size, size, 3), np.float32)
  img[...] = np.float32((206, 201, 190))
  for cy, cx, part in placed:
    _draw_token(img, part, cy, cx, radius, f)
  return _to_uint8(img * gain + noise)


def _tokens_sample(rng, size: int, defect: str | None) -> Sample:
  f, radius, centres, jitter = _token_geometry(size)
  parts = _token_parts()
  # Normal draws first (identical for the reference), defect draws after.
  offsets = rng.integers(-jitter, jitter + 1, size=(9, 2))
  gain = 1.0 + rng.uniform(-0.02, 0.02)
  noise = rng.normal(0, 1.5, size=(size, size, 3)).astype(np.float32)
  normal = {slot: i for i, slot in enumerate(TOKEN_HOME)}       # slot -> part index
  scene = dict(normal)
  if defect is not None:
    occupied = list(TOKEN_HOME)
    empty = [s for s in range(9) if s not in normal]
    if defect == 'swap':
      a, b = rng.choice(occupied, size=2, replace=False)
      scene[a], scene[b] = normal[b], normal[a]
    elif defect == 'misplaced':
      a, e = rng.choice(occupied), rng.choice(empty)
      scene[e] = scene.pop(a)
    elif defect == 'missing':
      del scene[rng.choice(occupied)]
    elif defect == 'duplicate':
      a, b = rng.choice(occupied, size=2, replace=False)
      scene[a] = normal[b]
    else:
      raise ValueError(f'unknown tokens defect {defect!r}')

  def render(assignment):
    return _render_tokens(size, [(centres[slot][0] + offsets[slot][0],
                                  centres[slot][1] + offsets[slot][1], parts[i])
                                 for slot, i in sorted(assignment.items())],
                          radius, f, gain, noise)

  reference = render(normal)
  if defect is None:
    return Sample(reference, np.zeros((size, size), bool), reference)
  mask = np.zeros((size, size), bool)
  dilate = max(2.0 * f, 1.0)
  for slot in range(9):
    if scene.get(slot) == normal.get(slot):
      continue
    cy, cx = centres[slot]
    if slot in normal:    # where the expected part should be (any jitter), dilated
      mask |= _token_footprint(size, parts[normal[slot]], cy, cx, radius, jitter + dilate)
    if slot in scene:     # the part that is there but should not be, dilated
      mask |= _token_footprint(size, parts[scene[slot]], cy + offsets[slot][0],
                               cx + offsets[slot][1], radius, dilate)
  return Sample(render(scene), mask, reference)


# Cable: three strands with distinct colour and surface, vertical, in a fixed left-to-right order.
CABLE_COLOURS = ((192, 52, 46), (46, 82, 186), (214, 178, 52))


def _cable_geometry(size: int):
  f = size / 256.0
  pitch, half = float(round(72.0 * f)), 12.0 * f
  xs = [size / 2 + (k - 1) * pitch for k in range(3)]
  jitter = max(int(round(3 * f)), 1)
  amplitude = 2.0 * f
  return f, xs, half, jitter, amplitude


def _draw_strand(img, strand: int, x0: float, shift: int, f: float, half: float,
                 amplitude: float):
  """Draws strand `strand` centred on column x0 (in place). A strand is one canonical pattern
  translated by `shift` rows and centred on x0: every strand in every image is an integer
  translate of the same picture, whatever its position."""
  size = img.shape[0]
  c0, c1 = max(int(x0 - half - amplitude - 2), 0), min(int(x0 + half + amplitude + 3), size)
  yy, xx = np.mgrid[0:size, c0:c1].astype(np.float32)
  y = yy + np.float32(shift)
  period = float(max(round(96.0 * f), 8))       # the whole pattern repeats every `period` rows
  centre = x0 + amplitude * np.sin(2 * np.pi * y / period)
  t = (xx - centre) / half                                       # -1..1 across the strand
  sdf = np.abs(xx - centre) - half
  a = _coverage(sdf)[..., None]
  body = np.sqrt(np.clip(1 - t * t, 0, 1))                       # cylindrical shading
  if strand == 0:    # twisted: diagonal stripes
    pattern = 0.85 + 0.15 * np.tanh(4 * np.sin(2 * np.pi * (y + 0.6 * half * t) / (period / 10)))
  elif strand == 1:  # braided: cross-hatch
    pattern = (0.86 + 0.14 * np.sin(2 * np.pi * (y + half * t) / (period / 12))
               * np.sin(2 * np.pi * (y - half * t) / (period / 12)))
  else:              # banded: thin dark rings
    pattern = 1.0 - 0.3 * (np.cos(2 * np.pi * y / (period / 7)) > 0.85)
  shade = (0.5 + 0.5 * body) * pattern
  colour = np.float32(CABLE_COLOURS[strand]) * shade[..., None]
  img[:, c0:c1] = img[:, c0:c1] * (1 - a) + a * colour


def _cable_sample(rng, size: int, defect: str | None) -> Sample:
  f, xs, half, jitter, amplitude = _cable_geometry(size)
  offsets = rng.integers(-jitter, jitter + 1, size=3)
  shifts = rng.integers(0, max(int(round(96 * f)), 8), size=3)  # rows, one per strand
  gain = 1.0 + rng.uniform(-0.02, 0.02)
  noise = rng.normal(0, 1.5, size=(size, size, 3)).astype(np.float32)
  normal = [0, 1, 2]                                             # position -> strand
  order = list(normal)
  if defect == 'swap':
    a, b = rng.choice(3, size=2, replace=False)
    order[a], order[b] = order[b], order[a]
  elif defect == 'rotate':
    shift = int(rng.integers(1, 3))
    order = order[shift:] + order[:shift]
  elif defect == 'duplicate':
    a, b = rng.choice(3, size=2, replace=False)
    order[a] = normal[b]
  elif defect is not None:
    raise ValueError(f'unknown cable defect {defect!r}')

  def render(strands):
    img = np.empty((size, size, 3), np.float32)
    img[...] = np.float32((64, 68, 76))
    for pos, strand in enumerate(strands):
      # The shift travels with the strand, so a moved strand carries exactly its normal look.
      _draw_strand(img, strand, xs[pos] + offsets[pos], shifts[strand], f, half, amplitude)
    return _to_uint8(img * gain + noise)

  reference = render(normal)
  if defect is None:
    return Sample(reference, np.zeros((size, size), bool), reference)
  _, xx = _grid(size)
  mask = np.zeros((size, size), bool)
  dilate = max(2.0 * f, 1.0)
  for pos in range(3):
    if order[pos] != normal[pos]:
      # the strand band at this position (any jitter and wave), dilated
      mask |= np.abs(xx - xs[pos]) <= half + jitter + amplitude + dilate
  return Sample(render(order), mask, reference)


# Lattice: parts of three types (the tokens' disc, square and triangle) on a square lattice of
# integer pitch, type (i + j) mod 3 at site (i, j), the whole lattice translated by a random
# integer offset in [0, 3 pitch) per image (so every type occurs at every position in training),
# plus a small per-part jitter. Gaps between parts (~42 px at 256) exceed a 32 px window, so
# every window of a defective image has a twin in normal images; the neighbours one pitch away
# do not.
LATTICE_TYPES = (0, 1, 2)   # indices into _token_parts()


def _lattice_geometry(size: int):
  f = size / 256.0
  pitch = int(round(72.0 * f))
  radius = 14.0 * f
  jitter = max(int(round(2 * f)), 1)
  return f, pitch, radius, jitter


def _lattice_sample(rng, size: int, defect: str | None) -> Sample:
  f, pitch, radius, jitter = _lattice_geometry(size)
  parts = _token_parts()
  # Normal draws first (identical for the reference), defect draws after.
  origin = rng.integers(0, 3 * pitch, size=2)                      # lattice phase, integer px
  n = -(-(size + 3 * pitch) // pitch) + 1                          # sites per axis
  offsets = rng.integers(-jitter, jitter + 1, size=(n, n, 2))
  gain = 1.0 + rng.uniform(-0.02, 0.02)
  noise = rng.normal(0, 1.5, size=(size, size, 3)).astype(np.float32)
  reach = 1.15 * radius + 3

  def centre(i, j):
    return (float(origin[0] - 3 * pitch + i * pitch + offsets[i, j, 0]),
            float(origin[1] - 3 * pitch + j * pitch + offsets[i, j, 1]))

  normal = {}
  for i in range(n):
    for j in range(n):
      cy, cx = centre(i, j)
      if -reach < cy < size + reach and -reach < cx < size + reach:
        normal[(i, j)] = LATTICE_TYPES[(i + j) % 3]
  scene = dict(normal)
  if defect is not None:
    lo, hi = 0.8 * pitch, size - 0.8 * pitch                       # neighbours in view
    inner = sorted(s for s in normal if lo <= centre(*s)[0] <= hi and lo <= centre(*s)[1] <= hi)
    a = inner[int(rng.integers(len(inner)))]
    if defect == 'swap':
      steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
      cands = [(a[0] + dy, a[1] + dx) for dy, dx in steps]
      cands = [b for b in cands if b in normal
               and radius <= centre(*b)[0] <= size - radius
               and radius <= centre(*b)[1] <= size - radius]
      b = cands[int(rng.integers(len(cands)))]
      scene[a], scene[b] = normal[b], normal[a]
    elif defect == 'replace':
      scene[a] = LATTICE_TYPES[(LATTICE_TYPES.index(normal[a]) + int(rng.integers(1, 3))) % 3]
    elif defect == 'missing':
      del scene[a]
    else:
      raise ValueError(f'unknown lattice defect {defect!r}')

  def render(assignment):
    return _render_tokens(size, [(*centre(*site), parts[t])
                                 for site, t in sorted(assignment.items())],
                          radius, f, gain, noise)

  reference = render(normal)
  if defect is None:
    return Sample(reference, np.zeros((size, size), bool), reference)
  mask = np.zeros((size, size), bool)
  dilate = max(2.0 * f, 1.0)
  for site, t in normal.items():
    if scene.get(site) == t:
      continue
    cy, cx = centre(*site)
    mask |= _token_footprint(size, parts[t], cy, cx, radius, dilate)       # what should be
    if site in scene:                                                      # what is there
      mask |= _token_footprint(size, parts[scene[site]], cy, cx, radius, dilate)
  return Sample(render(scene), mask, reference)


def render_sample(category: str, rng: np.random.Generator, image_size: int,
                  defect: str | None = None) -> Sample:
  """One image of `category` (normal when defect is None) drawn from `rng`."""
  if category not in CATEGORIES:
    raise ValueError(f'unknown generated category {category!r}; valid: {CATEGORIES}')
  if defect is not None and defect not in DEFECTS[category]:
    raise ValueError(f'unknown {category} defect {defect!r}; valid: {DEFECTS[category]}')
  if image_size < 32:
    raise ValueError(f'image_size must be >= 32, got {image_size}')
  if category in TEXTURES:
    return _texture_sample(category, rng, image_size, defect)
  if category == 'tokens':
    return _tokens_sample(rng, image_size, defect)
  if category == 'lattice':
    return _lattice_sample(rng, image_size, defect)
  return _cable_sample(rng, image_size, defect)


def sample_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
  """The generator of one image: split in 'train' | 'test_good' | 'test_defect'."""
  return np.random.default_rng(
      [int(seed), zlib.crc32(category.encode()), _SPLIT_CODES[split], int(index)])


def category_samples(category: str, *, seed: int, image_size: int, num_train: int,
                     num_test_good: int, num_test_defect: int):
  """Yields (relative path, Sample, mask path or None) for every file of one category."""
  for i in range(num_train):
    s = render_sample(category, sample_rng(seed, category, 'train', i), image_size)
    yield f'train/good/{i:03d}.png', s, None
  for i in range(num_test_good):
    s = render_sample(category, sample_rng(seed, category, 'test_good', i), image_size)
    yield f'test/good/{i:03d}.png', s, None
  kinds = DEFECTS[category]
  counts = {k: 0 for k in kinds}
  for i in range(num_test_defect):
    kind = kinds[i % len(kinds)]
    s = render_sample(category, sample_rng(seed, category, 'test_defect', i), image_size, kind)
    j = counts[kind]
    counts[kind] += 1
    yield (f'test/{kind}/{j:03d}.png', s, f'ground_truth/{kind}/{j:03d}_mask.png')


# ------------------------------------------------------------------------------------ writing


def _png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def _sha256_file(path: str) -> str:
  with open(path, 'rb') as fh:
    return hashlib.sha256(fh.read()).hexdigest()


def _is_complete(cat_dir: str, params: dict[str, Any]) -> bool:
  marker = os.path.join(cat_dir, MARKER)
  try:
    with open(marker, encoding='utf-8') as fh:
      manifest = json.load(fh)
  except (OSError, ValueError):
    return False
  if manifest.get('params') != params:
    return False
  for rel, digest in manifest.get('files', {}).items():
    path = os.path.join(cat_dir, rel)
    if not os.path.isfile(path) or _sha256_file(path) != digest:
      return False
  return bool(manifest.get('files'))


def generate(root: str, *, seed: int, image_size: int = 256, num_train: int = 60,
             num_test_good: int = 12, num_test_defect: int = 24,
             categories: Sequence[str] | None = None,
             log: Callable[[str], None] | None = None) -> list[str]:
  """Writes the generated dataset under `root` in MVTec AD layout; returns the category names.

  Deterministic from `seed` (byte-identical files). Idempotent: a category whose manifest
  (`<root>/<cat>/generated.json`, written last) matches these arguments and whose files hash
  to the manifest is left alone; anything else is regenerated. A `<root>/<cat>` folder without a
  manifest is not ours and is never overwritten (FileExistsError).
  """
  cats = list(categories) if categories else list(CATEGORIES)
  for c in cats:
    if c not in CATEGORIES:
      raise ValueError(f'unknown generated category {c!r}; valid: {CATEGORIES}')
  counts = dict(num_train=num_train, num_test_good=num_test_good, num_test_defect=num_test_defect)
  for k, v in counts.items():
    if int(v) < 0:
      raise ValueError(f'{k} must be >= 0, got {v}')
  if num_train < 1:
    raise ValueError(f'num_train must be >= 1, got {num_train}')
  root = os.path.abspath(os.path.expanduser(root))
  os.makedirs(root, exist_ok=True)
  for cat in cats:
    params = dict(version=GENERATOR_VERSION, category=cat, seed=int(seed),
                  image_size=int(image_size), **{k: int(v) for k, v in counts.items()})
    cat_dir = os.path.join(root, cat)
    if _is_complete(cat_dir, params):
      if log:
        log(f'generated/{cat}: complete, skipped ({cat_dir})')
      continue
    if os.path.exists(cat_dir):
      if not os.path.isfile(os.path.join(cat_dir, MARKER)):
        raise FileExistsError(f'{cat_dir} exists but is not a generated category (no {MARKER}); '
                              'refusing to overwrite it: remove it or choose another root')
      shutil.rmtree(cat_dir)
    staging = os.path.join(root, f'.{cat}.partial')
    if os.path.exists(staging):
      shutil.rmtree(staging)
    start = time.time()
    files = {}
    for rel, sample, mask_rel in category_samples(cat, seed=seed, image_size=image_size, **counts):
      for r, arr in ((rel, sample.image), (mask_rel, None if mask_rel is None else
                                           (sample.mask.astype(np.uint8) * 255))):
        if r is None:
          continue
        data = _png_bytes(arr)
        path = os.path.join(staging, r)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as fh:
          fh.write(data)
        files[r] = hashlib.sha256(data).hexdigest()
    with open(os.path.join(staging, MARKER), 'w', encoding='utf-8') as fh:
      json.dump({'params': params, 'files': dict(sorted(files.items()))}, fh, indent=1,
                sort_keys=True)
    os.rename(staging, cat_dir)
    if log:
      log(f'generated/{cat}: {len(files)} files in {time.time() - start:.1f}s ({cat_dir})')
  return cats


def generate_from_config(data_cfg: Any, seed: int, log=None) -> list[str]:
  """`generate` with the `data` ConfigDict: root, categories and data.generated.*."""
  g = data_cfg.generated
  cats = data_cfg.categories
  if isinstance(cats, str):
    cats = [c for c in cats.replace(' ', ',').split(',') if c]
  return generate(data_cfg.root, seed=seed, image_size=g.image_size, num_train=g.num_train,
                  num_test_good=g.num_test_good, num_test_defect=g.num_test_defect,
                  categories=list(cats) or None, log=log)


# ------------------------------------------------------------------------------------ check


def _patches(img: np.ndarray, patch: int, stride: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [P, patch * patch * 3] (centred at 128)."""
  v = np.lib.stride_tricks.sliding_window_view(img, (patch, patch), axis=(0, 1))
  v = v[::stride, ::stride]                                      # [h, w, 3, p, p]
  return (v.reshape(-1, v.shape[2] * patch * patch).astype(np.float32) - 128.0)


def nearest_patch_rms(queries: Sequence[np.ndarray], references: Sequence[np.ndarray], *,
                      patch: int, query_stride: int, rows_per_chunk: int = 8) -> list[np.ndarray]:
  """Brute force: for every patch x patch window of each query image (on a grid of stride
  query_stride), the RMS pixel distance (0..255 levels) to the nearest window at ANY position
  (stride 1) of ANY reference image. Memory: one chunk of reference windows at a time.

  Returns one float32 [h, w] map per query image.
  """
  q = [_patches(x, patch, query_stride) for x in queries]
  sizes = [len(x) for x in q]
  qa = np.concatenate(q)
  qn = (qa * qa).sum(1)
  best = np.full(len(qa), np.inf, np.float32)
  for ref in references:
    height = ref.shape[0] - patch + 1
    for r0 in range(0, height, rows_per_chunk):
      rows = ref[r0:r0 + rows_per_chunk + patch - 1]
      rp = _patches(rows, patch, 1)
      d2 = qn[:, None] + (rp * rp).sum(1)[None, :] - 2.0 * (qa @ rp.T)
      best = np.minimum(best, d2.min(1))
  rms = np.sqrt(np.maximum(best, 0) / qa.shape[1])
  out, start = [], 0
  h = (queries[0].shape[0] - patch) // query_stride + 1
  for n in sizes:
    out.append(rms[start:start + n].reshape(h, -1))
    start += n
  return out


def _check(root: str, seed: int, image_size: int, num_refs: int, patch: int, stride: int) -> None:
  """Prints nearest-training-patch distances for normal and defective test images."""
  print(f'patch {patch}x{patch}, query stride {stride}, {num_refs} training images as '
        'references (all positions); RMS distance in 0..255 levels')
  for cat in CATEGORIES:
    refs = [render_sample(cat, sample_rng(seed, cat, 'train', i), image_size).image
            for i in range(num_refs)]
    good = [render_sample(cat, sample_rng(seed, cat, 'test_good', i), image_size).image
            for i in range(2)]
    bad = [render_sample(cat, sample_rng(seed, cat, 'test_defect', i), image_size,
                         DEFECTS[cat][i % len(DEFECTS[cat])]) for i in range(len(DEFECTS[cat]))]
    start = time.time()
    maps = nearest_patch_rms(good + [s.image for s in bad], refs, patch=patch, query_stride=stride)
    g = np.concatenate([m.ravel() for m in maps[:2]])
    line = [f'{cat:8s} good: max {g.max():5.2f} median {np.median(g):5.2f}']
    for s, m, kind in zip(bad, maps[2:], DEFECTS[cat]):
      line.append(f'{kind}: max {m.max():6.2f}')
    print(' | '.join(line) + f'  ({time.time() - start:.0f}s)')
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--root', required=True)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--num_train', type=int, default=60)
  p.add_argument('--num_test_good', type=int, default=12)
  p.add_argument('--num_test_defect', type=int, default=24)
  p.add_argument('--check', action='store_true', help='measure local invisibility (slow)')
  p.add_argument('--check_refs', type=int, default=6)
  p.add_argument('--check_patch', type=int, default=32)
  p.add_argument('--check_stride', type=int, default=16)
  a = p.parse_args(argv)
  start = time.time()
  generate(a.root, seed=a.seed, image_size=a.image_size, num_train=a.num_train,
           num_test_good=a.num_test_good, num_test_defect=a.num_test_defect, log=print)
  print(f'total {time.time() - start:.1f}s')
  if a.check:
    _check(a.root, a.seed, a.image_size, a.check_refs, a.check_patch, a.check_stride)
  return 0


if __name__ == '__main__':
  sys.exit(main())
