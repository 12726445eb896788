"""Synthetic defects for training the refinement network (paper section 3.3, Figure 3).

Four generators, each a pure function of a PRNG key and an image:

  cutpaste       a rectangle cut from the same image, colour-jittered, pasted elsewhere (CutPaste)
  cutpaste_scar  a thin strip, rotated by -45..45 degrees, colour-jittered, pasted (CutPaste scar)
  draem          a thresholded Perlin-noise region filled with a blend of image and texture (DRAEM)
  drawing        random brush strokes (cubic Bezier curves) of random width and colour

`synthesize` picks one of the four in equal ratio with `lax.switch` (under vmap that runs all four
generators per image); `synthesize_balanced` gives a batch exactly N/4 of each kind at a quarter
of the cost; `augment` is the online flip / rotation / colour augmentation of a training pair.
`procedural_texture` stands in for a texture source when no folder is given (`load_textures`).

Conventions: images are [H, W, 3] float32 in [0, 1] (NHWC when batched with `jax.vmap`), masks are
[H, W] float32 in {0, 1}. Every function has static output shapes and no data-dependent Python
control flow, so it can be jitted and vmapped over keys and images (or wrapped with
`tf.numpy_function`). Shapes and keyword settings are static Python values (unless a docstring
says they may be traced); keys and images are traced.

Mask contract (every generator): let `region` be the candidate defect region and `candidate` the
defect content. The output is `where(region, candidate, image)`, so pixels outside `region` are
bit-identical to the input, and the mask is defined as the set of pixels that actually changed,
`mask == any(out != image, axis=-1)` (a pasted pixel that happens to equal the original is not a
defect). Non-empty rule: every region is non-empty by construction; if fewer than half of its
pixels changed (flat or saturated content, e.g. a CutPaste on a black image), every region pixel is
replaced by `image + shift` where `image < 0.5` and by `image - shift` elsewhere, per channel
(`shift = 0.25`), which changes every channel of every region pixel, so then `mask == region`.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('cutpaste', 'scar', 'draem', 'drawing')

# Luma weights (ITU-R 601, as torchvision's rgb_to_grayscale).
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# RGB -> YIQ; hue rotation turns the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)

FORCED_SHIFT = 0.25
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


# ----------------------------------------------------------------------------- helpers


def _check_image(image, name: str = 'image') -> jnp.ndarray:
  """Returns `image` as float32 after checking it is [H, W, 3]."""
  image = jnp.asarray(image, jnp.float32)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'{name} must be [H, W, 3] (use jax.vmap for batches), got shape '
                     f'{tuple(image.shape)}')
  if image.shape[0] < 8 or image.shape[1] < 8:
    raise ValueError(f'{name} must be at least 8 x 8 pixels, got {tuple(image.shape[:2])}')
  return image


def _draw(key: jax.Array, **shapes) -> dict[str, jnp.ndarray]:
  """All uniform [0, 1) numbers a function needs, from ONE `jax.random.uniform` call.

  One call per generator instead of one per scalar keeps the compiled graph small (each PRNG call
  adds a Threefry circuit; a dozen of them multiply XLA compile time several-fold).
  shapes: name -> static shape. Returns name -> float32 array of that shape.
  """
  sizes = [math.prod(shape) for shape in shapes.values()]
  flat = jax.random.uniform(key, (sum(sizes),), jnp.float32)
  out, start = {}, 0
  for (name, shape), size in zip(shapes.items(), sizes):
    out[name] = flat[start:start + size].reshape(shape)
    start += size
  return out


def _scale(u, lo, hi) -> jnp.ndarray:
  """Maps uniform u in [0, 1) to [lo, hi) (bounds may be traced)."""
  return lo + (hi - lo) * u


def _randint(u, lo, hi) -> jnp.ndarray:
  """Maps uniform u in [0, 1) to an int32 uniform in [lo, hi] inclusive (bounds may be traced)."""
  lo = jnp.asarray(lo, jnp.int32)
  hi = jnp.asarray(hi, jnp.int32)
  r = jnp.floor(u * (hi - lo + 1).astype(jnp.float32)).astype(jnp.int32)
  return lo + jnp.clip(r, 0, hi - lo)


def _grid(h: int, w: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Pixel-centre coordinates: two [H, W] float32 arrays (row, column)."""
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing='ij')
  return yy, xx


def _gather(image: jnp.ndarray, sy: jnp.ndarray, sx: jnp.ndarray) -> jnp.ndarray:
  """image[sy, sx] with float coordinates rounded to the nearest pixel and clipped to the image.

  image: [H, W, ...]; sy, sx: [H', W'] float32 -> [H', W', ...].
  """
  h, w = image.shape[:2]
  iy = jnp.clip(jnp.round(sy), 0, h - 1).astype(jnp.int32)
  ix = jnp.clip(jnp.round(sx), 0, w - 1).astype(jnp.int32)
  return image[iy, ix]


def _mix3(x: jnp.ndarray, m) -> jnp.ndarray:
  """x [..., 3] times m [3, ...] over the channel axis, as three multiply-adds (a matrix product
  with a contraction of 3 is a library call on XLA:CPU: 4.8 ms for a batch of 8 128 px images,
  the fused sum well under a millisecond)."""
  return x[..., 0, None] * m[0] + x[..., 1, None] * m[1] + x[..., 2, None] * m[2]


def _gray(image: jnp.ndarray) -> jnp.ndarray:
  """[..., 3] -> [...] luma."""
  return _mix3(image, jnp.asarray(_LUMA)[:, None])[..., 0]


def _jitter(u: jnp.ndarray, image: jnp.ndarray, brightness, contrast, saturation, hue,
            region: jnp.ndarray | None = None) -> jnp.ndarray:
  """`color_jitter` driven by four uniforms u: [4] float32 (see there)."""
  x = jnp.clip(image * _scale(u[0], 1.0 - brightness, 1.0 + brightness), 0.0, 1.0)
  luma = _gray(x)
  if region is None:
    pivot = jnp.mean(luma)
  else:
    weight = region.astype(jnp.float32)
    pivot = jnp.sum(luma * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  c = _scale(u[1], 1.0 - contrast, 1.0 + contrast)
  x = jnp.clip((x - pivot) * c + pivot, 0.0, 1.0)
  g = _gray(x)[..., None]
  s = _scale(u[2], 1.0 - saturation, 1.0 + saturation)
  x = jnp.clip((x - g) * s + g, 0.0, 1.0)
  angle = 2.0 * math.pi * _scale(u[3], -hue, hue)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  zero, one = jnp.zeros_like(cos), jnp.ones_like(cos)
  rot = jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([zero, cos, -sin]),
                   jnp.stack([zero, sin, cos])])          # turns the (I, Q) chroma plane
  to_rgb = jnp.asarray(_YIQ_TO_RGB) @ rot @ jnp.asarray(_RGB_TO_YIQ)
  return jnp.clip(_mix3(x, to_rgb.T), 0.0, 1.0)


def color_jitter(key: jax.Array, image: jnp.ndarray, brightness: float = 0.1,
                 contrast: float = 0.1, saturation: float = 0.1, hue: float = 0.1,
                 region: jnp.ndarray | None = None) -> jnp.ndarray:
  """torchvision-style ColorJitter with factors drawn from `key` (fixed order b, c, s, h).

  brightness / contrast / saturation: factor uniform in [1 - s, 1 + s]; hue: shift uniform in
  [-hue, hue] turns (a rotation of the YIQ chroma plane). The contrast pivot is the mean luma over
  `region` ([H, W] bool/float, the pasted patch) or over the whole image when None.
  image: [H, W, 3] float32 in [0, 1] -> [H, W, 3] float32 in [0, 1].
  """
  u = jax.random.uniform(key, (4,), jnp.float32)
  return _jitter(u, jnp.asarray(image, jnp.float32), brightness, contrast, saturation, hue, region)


def _composite(image: jnp.ndarray, candidate: jnp.ndarray,
               region: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Pastes `candidate` on `region` and derives the exact mask (see the module docstring).

  image, candidate: [H, W, 3] float32; region: [H, W] bool -> (image [H, W, 3], mask [H, W]).
  """
  out = jnp.where(region[..., None], candidate, image)
  changed = jnp.any(out != image, axis=-1)
  weak = 2 * jnp.sum(changed) < jnp.sum(region)
  forced = jnp.where(image < 0.5, image + FORCED_SHIFT, image - FORCED_SHIFT)
  out = jnp.where(jnp.logical_and(weak, region)[..., None], forced, out)
  mask = jnp.any(out != image, axis=-1)
  return out, mask.astype(jnp.float32)


# ----------------------------------------------------------------------------- CutPaste


def cutpaste(key: jax.Array, image: jnp.ndarray,
             area_range: tuple[float, float] = (0.02, 0.15),
             aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
             jitter: float = 0.1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """CutPaste: a rectangle from a random place, colour-jittered, pasted at another random place.

  The rectangle's area is uniform in `area_range` (fraction of H * W) and its aspect ratio
  (width / height) log-uniform in `aspect_range`, as CutPaste; it lies fully inside the image both
  where it is cut and where it is pasted. `jitter` is the ColorJitter strength (all four factors).
  image: [H, W, 3] float32 in [0, 1] -> (image [H, W, 3] float32, mask [H, W] float32).
  """
  image = _check_image(image)
  h, w = image.shape[:2]
  u = _draw(key, shape=(2,), place=(4,), jitter=(4,))
  area = _scale(u['shape'][0], area_range[0], area_range[1]) * (h * w)
  aspect = jnp.exp(_scale(u['shape'][1], math.log(aspect_range[0]), math.log(aspect_range[1])))
  cut_w = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, w).astype(jnp.int32)
  cut_h = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, h).astype(jnp.int32)
  place = u['place']
  sy, sx = _randint(place[0], 0, h - cut_h), _randint(place[1], 0, w - cut_w)
  dy, dx = _randint(place[2], 0, h - cut_h), _randint(place[3], 0, w - cut_w)
  yy, xx = _grid(h, w)
  region = ((yy >= dy) & (yy < dy + cut_h) & (xx >= dx) & (xx < dx + cut_w))
  patch = _gather(image, yy - dy + sy, xx - dx + sx)
  patch = _jitter(u['jitter'], patch, jitter, jitter, jitter, jitter, region=region)
  return _composite(image, patch, region)


def cutpaste_scar(key: jax.Array, image: jnp.ndarray,
                  width_range: tuple[float, float] = (2.0, 16.0),
                  length_range: tuple[float, float] = (0.10, 0.25),
                  angle_range: tuple[float, float] = (-45.0, 45.0),
                  jitter: float = 0.1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """CutPaste (scar): a thin strip cut, rotated, colour-jittered and pasted.

  Strip width uniform in `width_range` pixels (capped at a quarter of the short side), length
  uniform in `length_range` times the short side, rotation uniform in `angle_range` degrees.
  The strip is cut axis-aligned (long axis vertical) and sampled with nearest neighbour; the
  rotated strip lies fully inside the image.
  image: [H, W, 3] float32 in [0, 1] -> (image [H, W, 3] float32, mask [H, W] float32).
  """
  image = _check_image(image)
  h, w = image.shape[:2]
  side = min(h, w)
  u = _draw(key, shape=(3,), place=(4,), jitter=(4,))
  width = jnp.minimum(_scale(u['shape'][0], width_range[0], width_range[1]), side / 4)
  length = jnp.maximum(_scale(u['shape'][1], length_range[0], length_range[1]) * side, 2.0)
  theta = jnp.deg2rad(_scale(u['shape'][2], angle_range[0], angle_range[1]))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  half_l, half_w = length / 2, width / 2
  # Source centre: the axis-aligned strip fits; destination centre: the rotated strip fits.
  place = u['place']
  cy_s = _scale(place[0], half_l, h - 1 - half_l)
  cx_s = _scale(place[1], half_w, w - 1 - half_w)
  ext_y = jnp.abs(cos) * half_l + jnp.abs(sin) * half_w
  ext_x = jnp.abs(sin) * half_l + jnp.abs(cos) * half_w
  cy_d = _scale(place[2], ext_y, h - 1 - ext_y)
  cx_d = _scale(place[3], ext_x, w - 1 - ext_x)
  yy, xx = _grid(h, w)
  dy, dx = yy - cy_d, xx - cx_d
  along = cos * dy + sin * dx     # strip coordinates of each destination pixel
  across = -sin * dy + cos * dx
  region = (jnp.abs(along) <= half_l) & (jnp.abs(across) <= half_w)
  patch = _gather(image, cy_s + along, cx_s + across)
  patch = _jitter(u['jitter'], patch, jitter, jitter, jitter, jitter, region=region)
  return _composite(image, patch, region)


# ----------------------------------------------------------------------------- DRAEM


def perlin_table_shape(shape: tuple[int, int], max_res: int, rotated: bool) -> tuple[int, int]:
  """Static size of the gradient lattice that `max_res` cells over the image need (rotated by any
  angle about the centre when `rotated`), with no repetition inside the image."""
  h, w = shape
  cy, cx = (h - 1) / 2, (w - 1) / 2
  reach = (math.hypot(cy, cx) + 1,) * 2 if rotated else (cy + 1, cx + 1)
  return (2 * math.ceil(reach[0] * max_res / h) + 2, 2 * math.ceil(reach[1] * max_res / w) + 2)


def _perlin(table_u: jnp.ndarray, shape: tuple[int, int], res_y, res_x,
            angle=None) -> jnp.ndarray:
  """Perlin noise from gradient angles table_u: [Ty, Tx] uniforms (see `perlin_noise`)."""
  h, w = shape
  size_y, size_x = table_u.shape
  theta = 2.0 * math.pi * table_u
  grads = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)   # [Ty, Tx, 2]
  yy, xx = _grid(h, w)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  if angle is None:
    ry, rx = yy - cy, xx - cx
  else:
    a = jnp.deg2rad(jnp.asarray(angle, jnp.float32))
    ry = jnp.cos(a) * (yy - cy) - jnp.sin(a) * (xx - cx)
    rx = jnp.sin(a) * (yy - cy) + jnp.cos(a) * (xx - cx)
  u = ry * (jnp.asarray(res_y, jnp.float32) / h)
  v = rx * (jnp.asarray(res_x, jnp.float32) / w)
  u0, v0 = jnp.floor(u), jnp.floor(v)
  fu, fv = u - u0, v - v0
  i0 = jnp.mod(u0.astype(jnp.int32), size_y)
  j0 = jnp.mod(v0.astype(jnp.int32), size_x)
  i1, j1 = jnp.mod(i0 + 1, size_y), jnp.mod(j0 + 1, size_x)

  def corner(i, j, du, dv):
    g = grads[i, j]
    return g[..., 0] * du + g[..., 1] * dv

  n00 = corner(i0, j0, fu, fv)
  n10 = corner(i1, j0, fu - 1, fv)
  n01 = corner(i0, j1, fu, fv - 1)
  n11 = corner(i1, j1, fu - 1, fv - 1)
  fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
  tu, tv = fade(fu), fade(fv)
  top = n00 + tu * (n10 - n00)
  bottom = n01 + tu * (n11 - n01)
  return math.sqrt(2.0) * (top + tv * (bottom - top))


def perlin_noise(key: jax.Array, shape: tuple[int, int], res_y, res_x, angle=None,
                 max_res: int = 32) -> jnp.ndarray:
  """2-D gradient (Perlin) noise as DRAEM's `rand_perlin_2d`, sampled on a (rotated) pixel grid.

  shape: static (H, W); res_y, res_x: cells per image side (int or traced scalar, 1..max_res);
  angle: rotation of the noise field in degrees about the image centre (scalar, may be traced), or
  None for no rotation. Gradients are random unit vectors on a lattice just large enough for
  max_res cells over the (rotated) image (`perlin_table_shape`), so the field never repeats
  inside the image. Returns [H, W] float32 in about [-1, 1] (scaled by sqrt(2) as DRAEM).
  """
  table = perlin_table_shape(shape, max_res, angle is not None)
  return _perlin(jax.random.uniform(key, table, jnp.float32), shape, res_y, res_x, angle)


def perlin_region(key: jax.Array, shape: tuple[int, int], max_scale_exp: int = 5,
                  threshold: float = 0.5, min_area: float = 0.01) -> jnp.ndarray:
  """DRAEM's defect region: Perlin noise at scale 2^k per axis, rotated, thresholded.

  k is uniform in {0, ..., max_scale_exp} for each axis independently, rotation uniform in
  [-90, 90] degrees, region = noise >= min(threshold, t_min) where t_min is the noise value of the
  ceil(min_area * H * W)-th highest pixel: the region covers at least that fraction (DRAEM would
  return no defect there). Returns [H, W] bool.
  """
  table = perlin_table_shape(shape, 2 ** max_scale_exp, rotated=True)
  u = _draw(key, scale=(3,), table=table)
  return _region_from(u['scale'], u['table'], shape, max_scale_exp, threshold, min_area)


def _region_from(u, table_u, shape, max_scale_exp, threshold, min_area) -> jnp.ndarray:
  """`perlin_region` from uniforms u: [3] and table_u: [Ty, Tx]."""
  h, w = shape
  res_y = 2 ** _randint(u[0], 0, max_scale_exp)
  res_x = 2 ** _randint(u[1], 0, max_scale_exp)
  noise = _perlin(table_u, shape, res_y, res_x, _scale(u[2], -90.0, 90.0))
  k = max(1, int(math.ceil(min_area * h * w)))
  kth = kth_largest(noise.reshape(-1), k)
  return noise >= jnp.minimum(threshold, kth)


def kth_largest(x: jnp.ndarray, k: int) -> jnp.ndarray:
  """The k-th largest value of x [n] float32 (k static, 1 <= k <= n): lax.top_k(x, k)[0][-1].

  A bisection on the values' bit patterns (mapped to unsigned integers in float order): 32
  counting passes over x (measured on CPU at 256 x 256, k = 1 % of the pixels: 0.5 ms against
  11 ms for top_k).
  """
  x = jnp.asarray(x, jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  # Float order as unsigned order: negatives flipped whole, positives get the top bit set.
  negative = (bits >> 31) == 1
  keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))

  def step(i, answer):
    candidate = answer | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(jnp.sum(keys >= candidate) >= k, candidate, answer)

  key = jax.lax.fori_loop(0, 32, step, jnp.uint32(0))
  top = (key >> 31) == 1
  bits = jnp.where(top, key & jnp.uint32(0x7fffffff), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def draem(key: jax.Array, image: jnp.ndarray, texture: jnp.ndarray,
          beta_range: tuple[float, float] = (0.0, 0.8), max_scale_exp: int = 5,
          min_area: float = 0.01, texture_jitter: float = 0.3) -> tuple[jnp.ndarray, jnp.ndarray]:
  """DRAEM-style defect: a Perlin-noise region filled with beta * image + (1 - beta) * texture.

  `texture` ([H, W, 3] float32 in [0, 1]: another training image, a user texture or
  `procedural_texture`) is first colour-jittered with strength `texture_jitter` (hue: up to half
  a turn), standing in for DRAEM's random imgaug operations. beta is uniform in `beta_range`
  (DRAEM: 0-0.8). Region: `perlin_region(..., max_scale_exp, 0.5, min_area)`.
  image: [H, W, 3] float32 in [0, 1] -> (image [H, W, 3] float32, mask [H, W] float32).
  """
  image = _check_image(image)
  texture = _check_image(texture, 'texture')
  if texture.shape != image.shape:
    raise ValueError(f'texture shape {tuple(texture.shape)} must equal image shape '
                     f'{tuple(image.shape)}')
  shape = image.shape[:2]
  table = perlin_table_shape(shape, 2 ** max_scale_exp, rotated=True)
  u = _draw(key, scale=(3,), table=table, beta=(), jitter=(4,))
  region = _region_from(u['scale'], u['table'], shape, max_scale_exp, 0.5, min_area)
  tex = _jitter(u['jitter'], texture, texture_jitter, texture_jitter, texture_jitter, 0.5)
  beta = _scale(u['beta'], beta_range[0], beta_range[1])
  blend = beta * image + (1.0 - beta) * tex
  return _composite(image, jnp.clip(blend, 0.0, 1.0), region)


def procedural_texture(key: jax.Array, h: int, w: int) -> jnp.ndarray:
  """A random coloured texture for DRAEM when no texture source is given.

  One of three patterns, chosen by `key`, mapped through a random three-colour palette and
  lightly grained: multi-octave (fractal) Perlin noise (4 octaves from 2, 4 or 8 cells),
  noise-warped stripes, or a warped checkerboard. Returns [h, w, 3] float32 in [0, 1].
  """
  shape = (h, w)
  octaves = 4
  tables = {f'oct{o}': perlin_table_shape(shape, 8 * 2 ** o, False) for o in range(octaves)}
  warp_tables = {f'warp{o}': perlin_table_shape(shape, 2 * 2 ** o, False) for o in range(2)}
  u = _draw(key, pick=(6,), palette=(3, 3), grain=(h, w, 3), **tables, **warp_tables)
  pick = u['pick']

  def fractal(names, base):
    total = sum(0.5 ** o * _perlin(u[n], shape, base * 2 ** o, base * 2 ** o)
                for o, n in enumerate(names))
    lo, hi = jnp.min(total), jnp.max(total)
    return (total - lo) / jnp.maximum(hi - lo, 1e-6)       # [H, W] in [0, 1]

  yy, xx = _grid(h, w)
  side = float(min(h, w))
  clouds = fractal(list(tables), 2 ** _randint(pick[1], 1, 3))
  warp = fractal(list(warp_tables), 2) - 0.5
  freq = _scale(pick[2], 3.0, 14.0) / side
  phi = _scale(pick[3], 0.0, math.pi)
  phase = 2 * math.pi * freq * (jnp.cos(phi) * yy + jnp.sin(phi) * xx) + 6.0 * warp
  stripes = 0.5 + 0.5 * jnp.sin(phase)
  cell = _scale(pick[4], 0.04, 0.2) * side
  checker = 0.5 + 0.5 * jnp.tanh(4.0 * jnp.sin(math.pi * (yy / cell + 2 * warp)) *
                                 jnp.sin(math.pi * (xx / cell - 2 * warp)))
  which = _randint(pick[0], 0, 2)
  pattern = jnp.where(which == 0, clouds, jnp.where(which == 1, stripes, checker))
  palette = u['palette']                                   # three RGB colours
  t = pattern[..., None]
  low = palette[0] + 2 * t * (palette[1] - palette[0])
  high = palette[1] + (2 * t - 1) * (palette[2] - palette[1])
  tex = jnp.where(t < 0.5, low, high) + 0.08 * (u['grain'] - 0.5)
  return jnp.clip(tex, 0.0, 1.0)


# ----------------------------------------------------------------------------- drawing


def _segment_distance(py: jnp.ndarray, px: jnp.ndarray, a: jnp.ndarray,
                      b: jnp.ndarray) -> jnp.ndarray:
  """Distance from each pixel to the nearest of S segments a[s] -> b[s].

  py, px: [H, W] float32; a, b: [S, 2] float32 (row, column) -> [H, W] float32.
  """
  aby, abx = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]               # [S]
  inv = 1.0 / jnp.maximum(aby * aby + abx * abx, 1e-12)
  # A running minimum over the (static, few) segments: XLA fuses it into one loop over the
  # pixels; the [H, W, S] form materialised five [H, W, S] arrays (3x slower on CPU).
  best = None
  for s in range(a.shape[0]):
    dy, dx = py - a[s, 0], px - a[s, 1]
    t = jnp.clip((dy * aby[s] + dx * abx[s]) * inv[s], 0.0, 1.0)
    ey, ex = dy - t * aby[s], dx - t * abx[s]
    sq = ey * ey + ex * ex
    best = sq if best is None else jnp.minimum(best, sq)
  return jnp.sqrt(best)


def drawing(key: jax.Array, image: jnp.ndarray, max_strokes: int = 3,
            width_range: tuple[float, float] = (2.0, 12.0),
            extent_range: tuple[float, float] = (0.08, 0.3),
            points: int = 24) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Manual-drawing-like defect: 1..max_strokes brush strokes of random width and colour.

  Each stroke is a cubic Bezier curve starting at a uniform point; its three further control
  points follow by random steps of up to `extent_range` times the short side (clipped to the
  image). The curve is sampled at `points` points and rasterised as the pixels within width / 2
  of the polyline (width uniform in `width_range` px), filled with a uniform random colour; later
  strokes paint over earlier ones. Strokes are a `lax.scan` over a fixed count, the unused ones
  disabled, so shapes are static.
  image: [H, W, 3] float32 in [0, 1] -> (image [H, W, 3] float32, mask [H, W] float32).
  """
  image = _check_image(image)
  h, w = image.shape[:2]
  side = min(h, w)
  # Per stroke: start (2), extent (1), steps (6), width (1), colour (3).
  u = _draw(key, count=(), strokes=(max_strokes, 13))
  num = _randint(u['count'], 1, max_strokes)
  yy, xx = _grid(h, w)
  hi = jnp.array([h - 1, w - 1], jnp.float32)
  t = jnp.linspace(0.0, 1.0, points, dtype=jnp.float32)[:, None]
  basis = jnp.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3],
                          axis=1)                           # [P, 4] Bernstein weights

  def stroke(carry, inputs):
    canvas, region = carry
    v, index = inputs
    start = v[0:2] * hi
    extent = _scale(v[2], extent_range[0], extent_range[1]) * side
    steps = (2.0 * v[3:9] - 1.0).reshape(3, 2) * extent
    ctrl = jnp.clip(start + jnp.concatenate([jnp.zeros((1, 2)), jnp.cumsum(steps, 0)]), 0, hi)
    curve = basis @ ctrl                                    # [P, 2]
    dist = _segment_distance(yy, xx, curve[:-1], curve[1:])
    width = _scale(v[9], width_range[0], width_range[1])
    inside = (dist <= width / 2) & (index < num)
    canvas = jnp.where(inside[..., None], v[10:13], canvas)
    return (canvas, region | inside), None

  init = (image, jnp.zeros((h, w), bool))
  (canvas, region), _ = jax.lax.scan(stroke, init, (u['strokes'], jnp.arange(max_strokes)))
  return _composite(image, canvas, region)


# ----------------------------------------------------------------------------- mix, augment


def synthesize(key: jax.Array, image: jnp.ndarray,
               texture: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """One synthetic defect of a random kind, the four kinds in equal ratio (paper section 3.3).

  `key` is split into (k_kind, k_gen); kind = uniform in {0, 1, 2, 3} from k_kind, indexing
  KINDS = (cutpaste, scar, draem, drawing), and that generator runs with k_gen and default
  settings (`texture` is only used by draem). Under vmap the switch evaluates all four kinds.
  image, texture: [H, W, 3] float32 in [0, 1] ->
    (image [H, W, 3] float32, mask [H, W] float32, kind [] int32).
  """
  image = _check_image(image)
  texture = _check_image(texture, 'texture')
  k_kind, k_gen = jax.random.split(key)
  kind = jax.random.randint(k_kind, (), 0, len(KINDS), jnp.int32)
  branches = [
      lambda k, im, tx: cutpaste(k, im),
      lambda k, im, tx: cutpaste_scar(k, im),
      lambda k, im, tx: draem(k, im, tx),
      lambda k, im, tx: drawing(k, im),
  ]
  out, mask = jax.lax.switch(kind, branches, k_gen, image, texture)
  return out, mask, kind


def synthesize_batch(key: jax.Array, images: jnp.ndarray, textures: jnp.ndarray | None = None):
  """`synthesize` over a batch: images [N, H, W, 3] float32; textures [N, H, W, 3] or None
  (procedural textures, one per image) -> (images [N, H, W, 3], masks [N, H, W], kinds [N] int32).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f'images must be [N, H, W, 3], got shape {tuple(images.shape)}')
  n, h, w = images.shape[:3]
  k_tex, k_syn = jax.random.split(key)
  if textures is None:
    textures = jax.vmap(lambda k: procedural_texture(k, h, w))(jax.random.split(k_tex, n))
  return jax.vmap(synthesize)(jax.random.split(k_syn, n), images, textures)


def synthesize_balanced(key: jax.Array, images: jnp.ndarray,
                        textures) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """A batch with exactly N / 4 defects of each kind, at a quarter of vmap(synthesize)'s cost.

  Under vmap, `synthesize`'s switch becomes a select that runs all four generators on every
  image; here each generator runs only on its own quarter of the batch. Which image gets which
  kind is a random permutation from `key`; image perm[j] uses split(k_gen, N)[j] (key = (k_perm,
  k_gen) split) with the kind KINDS[j // (N / 4)].
  images: [N, H, W, 3] float32 in [0, 1], N divisible by 4; textures: [N, H, W, 3] (image i's
  texture) or a function rows [N / 4] -> the textures [N / 4, H, W, 3] of those images (called
  once, for the DRAEM quarter only: procedural textures cost as much as the synthesis) ->
    (images [N, H, W, 3] float32, masks [N, H, W] float32, kinds [N] int32).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[0] % len(KINDS):
    raise ValueError(f'images must be [N, H, W, 3] with N divisible by {len(KINDS)}, got shape '
                     f'{tuple(images.shape)}')
  if not callable(textures):
    textures = jnp.asarray(textures, jnp.float32)
    if textures.shape != images.shape:
      raise ValueError(f'textures shape {tuple(textures.shape)} must equal images shape '
                       f'{tuple(images.shape)}')
    texture_rows = lambda rows: textures[rows]
  else:
    texture_rows = textures
  n = images.shape[0]
  q = n // len(KINDS)
  k_perm, k_gen = jax.random.split(key)
  perm = jax.random.permutation(k_perm, n)
  keys = jax.random.split(k_gen, n)
  generators = [
      lambda k, im, tx: cutpaste(k, im),
      lambda k, im, tx: cutpaste_scar(k, im),
      lambda k, im, tx: draem(k, im, tx),
      lambda k, im, tx: drawing(k, im),
  ]
  outs, masks = [], []
  for i, generate in enumerate(generators):     # static: four kinds
    rows = perm[i * q:(i + 1) * q]
    tex = (jnp.asarray(texture_rows(rows), jnp.float32) if KINDS[i] == 'draem'
           else images[rows])                   # (ignored by the other kinds)
    o, m = jax.vmap(generate)(keys[i * q:(i + 1) * q], images[rows], tex)
    outs.append(o)
    masks.append(m)
  out = jnp.zeros_like(images).at[perm].set(jnp.concatenate(outs))
  mask = jnp.zeros(images.shape[:3], jnp.float32).at[perm].set(jnp.concatenate(masks))
  kind = jnp.zeros((n,), jnp.int32).at[perm].set(jnp.repeat(jnp.arange(len(KINDS)), q))
  return out, mask, kind


def dihedral_index(k: jnp.ndarray, flip: jnp.ndarray, h: int,
                   w: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Source pixel of every output pixel for `rot90(k)` then an optional horizontal flip.

  k: int scalar (rotation by k * 90 degrees counter-clockwise, as np.rot90; k must be even unless
  h == w); flip: bool scalar. Returns (sy, sx): two [h, w] int32 arrays, out = image[sy, sx].
  """
  i, j = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  j = jnp.where(flip, w - 1 - j, j)
  n = h  # == w whenever k is odd
  sy = jnp.stack([i, j, h - 1 - i, n - 1 - j])[k]
  sx = jnp.stack([j, n - 1 - i, w - 1 - j, i])[k]
  return sy.astype(jnp.int32), sx.astype(jnp.int32)


def augment(key: jax.Array, image: jnp.ndarray, mask: jnp.ndarray, max_angle: float = 0.0,
            brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
            hue: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Online augmentation of a training pair: flip, rotation, colour jitter (paper section 4.1).

  Geometry (identical for image and mask): a rotation by a uniform multiple of 90 degrees (only 0
  or 180 when H != W, so shapes stay static), a horizontal flip with probability 1/2, and an extra
  rotation uniform in [-max_angle, max_angle] degrees about the centre. Everything is one
  nearest-neighbour index map (coordinates clipped to the border, so border pixels repeat), so a
  mask pixel moves exactly with its image pixel and the mask stays binary. Colour jitter
  (`color_jitter` with the given strengths) then changes the image only. The strengths and
  max_angle may be traced scalars.
  image: [H, W, 3] float32 in [0, 1]; mask: [H, W] float32 ->
    (image [H, W, 3] float32, mask [H, W] float32).
  """
  image = _check_image(image)
  mask = jnp.asarray(mask, jnp.float32)
  h, w = image.shape[:2]
  if mask.shape != (h, w):
    raise ValueError(f'mask shape {tuple(mask.shape)} must be {(h, w)} (image {image.shape})')
  u = _draw(key, geometry=(3,), jitter=(4,))
  flip = u['geometry'][0] < 0.5
  k = _randint(u['geometry'][1], 0, 3) if h == w else 2 * _randint(u['geometry'][1], 0, 1)
  sy, sx = dihedral_index(k, flip, h, w)
  # Small rotation: output pixel p reads the dihedral map at round(R(p - c) + c).
  angle = jnp.deg2rad(_scale(u['geometry'][2], -max_angle, max_angle))
  yy, xx = _grid(h, w)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  ry = cy + jnp.cos(angle) * (yy - cy) - jnp.sin(angle) * (xx - cx)
  rx = cx + jnp.sin(angle) * (yy - cy) + jnp.cos(angle) * (xx - cx)
  iy = jnp.clip(jnp.round(ry), 0, h - 1).astype(jnp.int32)
  ix = jnp.clip(jnp.round(rx), 0, w - 1).astype(jnp.int32)
  src_y, src_x = sy[iy, ix], sx[iy, ix]
  out_image = image[src_y, src_x]
  out_mask = mask[src_y, src_x]
  out_image = _jitter(u['jitter'], out_image, brightness, contrast, saturation, hue)
  return out_image, out_mask


# ----------------------------------------------------------------------------- texture folder


def load_textures(folder: str, shape: tuple[int, int], max_textures: int = 64) -> np.ndarray:
  """Reads up to `max_textures` images (sorted by name) from `folder` (config
  `model.refine.texture_dir`), resized to shape (H, W). Returns [N, H, W, 3] float32 in [0, 1].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(folder):
    raise FileNotFoundError(f'texture folder {folder!r} (model.refine.texture_dir) does not exist')
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
  if not names:
    raise FileNotFoundError(
        f'texture folder {folder!r} holds no images ({", ".join(IMAGE_SUFFIXES)})')
  out = []
  for name in names[:max_textures]:
    path = os.path.join(folder, name)
    try:
      with Image.open(path) as im:
        im = im.convert('RGB').resize((shape[1], shape[0]), Image.BILINEAR)
        out.append(np.asarray(im, np.float32) / 255.0)
    except OSError as e:
      raise ValueError(f'cannot read texture image {path!r}: {e}') from e
  return np.stack(out)


def to_unit_float(images: np.ndarray | Sequence) -> np.ndarray:
  """uint8 [..., 3] (0-255) or float images -> float32 in [0, 1]; grayscale [H, W] -> [H, W, 3]."""
  a = np.asarray(images)
  if a.dtype == np.uint8:
    a = a.astype(np.float32) / 255.0
  a = a.astype(np.float32)
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  return np.clip(a, 0.0, 1.0)
