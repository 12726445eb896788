"""Tests for pni_jax.synth: exact masks, determinism, jit/vmap parity, kind ratio, augment."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data, transform

from pni_jax import synth

H, W = 40, 56          # non-square on purpose: catches row / column mix-ups
NUM_KEYS = 400         # synthesize runs; about 100 per kind
PHOTO_NAMES = ('brick', 'grass', 'gravel', 'chelsea', 'chelsea-half-white')


def _photo(name: str, shape) -> np.ndarray:
  a = getattr(data, name)()
  a = transform.resize(a, shape, anti_aliasing=True, preserve_range=True)
  return synth.to_unit_float(a / 255.0)


@pytest.fixture(scope='module')
def photos():
  """[5, H, W, 3] float32: brick, grass, gravel (grayscale -> RGB), chelsea, and chelsea with a
  saturated white top half (clipping: pasted pixels may equal the original)."""
  base = [_photo(n, (H, W)) for n in ('brick', 'grass', 'gravel', 'chelsea')]
  half = base[3].copy()
  half[:H // 2] = 1.0
  return np.stack(base + [half])


@pytest.fixture(scope='module')
def textures():
  keys = jax.random.split(jax.random.key(7), 5)
  return np.asarray(jax.jit(jax.vmap(lambda k: synth.procedural_texture(k, H, W)))(keys))


GENERATORS = {
    'cutpaste': lambda k, im, tx: synth.cutpaste(k, im),
    'scar': lambda k, im, tx: synth.cutpaste_scar(k, im),
    'draem': lambda k, im, tx: synth.draem(k, im, tx),
    'drawing': lambda k, im, tx: synth.drawing(k, im),
}
# Plausible mask area, fraction of H * W (mask >= half the region by the non-empty rule).
AREA = {
    'cutpaste': (0.01, 0.17),
    'scar': (1.0 / (H * W), 0.08),
    'draem': (0.005, 0.7),
    'drawing': (1.0 / (H * W), 0.6),
}


@pytest.fixture(scope='module')
def synthesized(photos, textures):
  """jit(vmap(synthesize)) on NUM_KEYS keys over the four photos (sample i uses photo i % 4),
  run twice for the determinism check. Every generator is exercised through its kind."""
  keys = jax.random.split(jax.random.key(0), NUM_KEYS)
  index = np.arange(NUM_KEYS) % len(photos)
  images, texs = photos[index], textures[index]
  f = jax.jit(jax.vmap(synth.synthesize))
  o1, m1, k1 = f(keys, images, texs)
  o2, m2, k2 = f(keys, images, texs)
  return dict(keys=keys, index=index, images=images, textures=texs, out=np.asarray(o1),
              mask=np.asarray(m1), kind=np.asarray(k1), out2=np.asarray(o2),
              mask2=np.asarray(m2), kind2=np.asarray(k2))


def _of_kind(s, name):
  sel = s['kind'] == synth.KINDS.index(name)
  return {k: v[sel] for k, v in s.items() if k != 'keys'}, np.nonzero(sel)[0]


@pytest.mark.parametrize('name', list(GENERATORS))
def test_mask_is_exactly_the_changed_pixels(synthesized, name):
  b, _ = _of_kind(synthesized, name)
  out, mask, images = b['out'], b['mask'], b['images']
  assert len(out) >= 60, (name, len(out))
  assert out.shape == images.shape and out.dtype == np.float32
  assert mask.shape == images.shape[:3] and mask.dtype == np.float32
  assert set(np.unique(mask)) <= {0.0, 1.0}
  changed = np.any(out != images, axis=-1)
  np.testing.assert_array_equal(mask.astype(bool), changed)
  # Outside the mask bit-identical, inside every pixel differs in some channel.
  outside = ~mask.astype(bool)
  np.testing.assert_array_equal(out[outside], images[outside])
  assert out.min() >= 0.0 and out.max() <= 1.0
  area = mask.mean(axis=(1, 2))
  lo, hi = AREA[name]
  assert area.min() >= lo, (name, area.min())
  assert area.max() <= hi, (name, area.max())


@pytest.mark.parametrize('name', list(GENERATORS))
def test_deterministic_per_key_and_different_across_keys(synthesized, name):
  b, _ = _of_kind(synthesized, name)
  np.testing.assert_array_equal(b['kind'], b['kind2'])
  np.testing.assert_array_equal(b['out'], b['out2'])
  np.testing.assert_array_equal(b['mask'], b['mask2'])
  # Same photo, different keys: no two masks are equal.
  for photo in range(len(PHOTO_NAMES)):
    masks = b['mask'][b['index'] == photo].reshape(-1, H * W)
    assert len({m.tobytes() for m in masks}) == len(masks), (name, photo)


@pytest.mark.parametrize('name', list(GENERATORS))
def test_synthesize_runs_the_chosen_generator_and_jit_vmap_matches_eager(synthesized, name):
  """Row i of jit(vmap(synthesize)) equals the eager generator called on split(key_i)[1]."""
  s = synthesized
  _, rows = _of_kind(s, name)
  for i in rows[:1]:   # one eager call per kind (eager dispatch is slow)
    k_gen = jax.random.split(s['keys'][i])[1]
    o, m = GENERATORS[name](k_gen, jnp.asarray(s['images'][i]), jnp.asarray(s['textures'][i]))
    np.testing.assert_allclose(np.asarray(o), s['out'][i], atol=1e-5)
    mismatch = np.mean(np.asarray(m) != s['mask'][i])
    assert mismatch <= 2.0 / (H * W), (name, i, mismatch)


def test_synthesize_kinds_equal_ratio(synthesized):
  kind = synthesized['kind']
  assert kind.dtype == np.int32 and kind.min() >= 0 and kind.max() <= 3
  counts = np.bincount(kind, minlength=4)
  expected = len(kind) / 4
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 16.27, counts      # chi-square, 3 dof, p = 0.001


def test_cutpaste_region_is_a_rectangle_of_cutpaste_shape(synthesized):
  for m in _of_kind(synthesized, 'cutpaste')[0]['mask'].astype(bool):
    rows, cols = np.nonzero(m)
    bh, bw = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert 0.015 <= bh * bw / (H * W) <= 0.17
    assert 0.3 * 0.8 <= bw / bh <= (1 / 0.3) * 1.25
    assert m.sum() >= 0.5 * bh * bw          # at least half of the rectangle changed


def test_scar_is_thin(synthesized):
  for m in _of_kind(synthesized, 'scar')[0]['mask'].astype(bool):
    rows, cols = np.nonzero(m)
    pts = np.stack([rows, cols], 1).astype(np.float64)
    cov = np.cov(pts.T) if len(pts) > 2 else np.zeros((2, 2))
    ev = np.sort(np.linalg.eigvalsh(cov))
    # Principal spreads: the strip is longer than wide (uniform strip: spread = extent / sqrt(12)).
    length, width = math.sqrt(12 * max(ev[1], 0)), math.sqrt(12 * max(ev[0], 0))
    assert length <= 0.25 * min(H, W) * 1.3 + 2
    assert width <= min(16, min(H, W) / 4) * 1.3 + 2


def test_forced_shift_on_black_images():
  """On a black image every pasted / blended pixel equals the original (jitter keeps 0 at 0), so
  the documented rule applies: the whole region becomes 0 + 0.25."""
  black = jnp.zeros((H, W, 3), jnp.float32)
  for name in ('cutpaste', 'scar', 'draem'):
    out, mask = GENERATORS[name](jax.random.key(3), black, black)
    out, mask = np.asarray(out), np.asarray(mask).astype(bool)
    assert mask.sum() > 0, name
    np.testing.assert_array_equal(out[mask], synth.FORCED_SHIFT)
    np.testing.assert_array_equal(out[~mask], 0.0)
    if name == 'cutpaste':
      rows, cols = np.nonzero(mask)
      assert mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)   # the full rectangle


@pytest.mark.parametrize('num_changed', [60, 40])
def test_composite_mask_is_region_and_changed(num_changed):
  """The rule itself: a region of 100 pixels where only `num_changed` pasted pixels differ.
  60 >= half: the mask is exactly those 60; 40 < half: the whole region is shifted by 0.25."""
  rng = np.random.default_rng(0)
  image = rng.uniform(0.1, 0.9, (20, 20, 3)).astype(np.float32)
  region = np.zeros((20, 20), bool)
  region[5:15, 5:15] = True
  candidate = image.copy()
  changed = np.zeros((20, 20), bool)
  flat = np.flatnonzero(region)
  changed.flat[rng.choice(flat, num_changed, replace=False)] = True
  candidate[changed, 1] = rng.uniform(0, 1, num_changed)
  candidate[~region] = 0.0               # content outside the region is never pasted
  out, mask = map(np.asarray, synth._composite(image, candidate, region))
  np.testing.assert_array_equal(out[~region], image[~region])
  if num_changed >= 50:
    np.testing.assert_array_equal(mask.astype(bool), changed)
    np.testing.assert_array_equal(out[region], candidate[region])
  else:
    np.testing.assert_array_equal(mask.astype(bool), region)
    shifted = np.where(image < 0.5, image + synth.FORCED_SHIFT, image - synth.FORCED_SHIFT)
    np.testing.assert_array_equal(out[region], shifted[region])


def test_segment_distance_matches_brute_force():
  rng = np.random.default_rng(0)
  a = rng.uniform(-5, 40, (7, 2)).astype(np.float32)
  b = rng.uniform(-5, 40, (7, 2)).astype(np.float32)
  b[3] = a[3]                                        # a degenerate (zero-length) segment
  yy, xx = np.meshgrid(np.arange(30.0), np.arange(35.0), indexing='ij')
  got = np.asarray(synth._segment_distance(jnp.asarray(yy, jnp.float32),
                                           jnp.asarray(xx, jnp.float32), a, b))
  want = np.full(yy.shape, np.inf)
  for s in range(len(a)):
    for t in np.linspace(0, 1, 1001):
      p = a[s] + t * (b[s] - a[s])
      want = np.minimum(want, np.hypot(yy - p[0], xx - p[1]))
  # Dense sampling of the segment over-estimates by at most half the sample spacing.
  np.testing.assert_allclose(got, want, atol=0.05)


def test_perlin_rotation_and_range():
  key = jax.random.key(5)
  noise = jax.jit(lambda a: synth.perlin_noise(key, (32, 32), 4, 4, angle=a))
  n0, n90 = np.asarray(noise(0.0)), np.asarray(noise(90.0))
  assert np.abs(n0).max() <= 1.5 and n0.std() > 0.05
  # Rotating the field by +90 degrees about the centre equals rotating the image grid.
  np.testing.assert_allclose(n90, np.rot90(n0, k=-1), atol=1e-4)


def test_draem_region_threshold_and_minimum_area():
  key = jax.random.key(11)
  regions = np.asarray(jax.jit(jax.vmap(lambda k: synth.perlin_region(k, (H, W))))(
      jax.random.split(key, 16)))
  assert regions.dtype == bool
  assert regions.mean(axis=(1, 2)).min() >= 0.01
  assert len({r.tobytes() for r in regions}) == 16


def test_procedural_texture(textures):
  assert textures.shape == (5, H, W, 3) and textures.dtype == np.float32
  assert textures.min() >= 0.0 and textures.max() <= 1.0
  assert textures.std(axis=(1, 2)).mean() > 0.02
  assert np.abs(textures[0] - textures[1]).mean() > 0.02


def _coordinate_image(h, w):
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return np.stack([yy / (h - 1), xx / (w - 1), np.full((h, w), 0.5)], -1).astype(np.float32)


def _decode(image, h, w):
  return (np.round(image[..., 0] * (h - 1)).astype(int),
          np.round(image[..., 1] * (w - 1)).astype(int))


def _dihedral_maps(h, w):
  """All allowed (sy, sx) maps: rot90 by k, then optional flip, as numpy does it."""
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  maps = []
  for k in (range(4) if h == w else (0, 2)):
    for flip in (False, True):
      sy, sx = np.rot90(yy, k), np.rot90(xx, k)
      if flip:
        sy, sx = sy[:, ::-1], sx[:, ::-1]
      maps.append((sy, sx))
  return maps


def _augment_fn():
  """jit(vmap(augment)) over keys; max_angle and jitter strengths traced (one compile per shape)."""
  return jax.jit(jax.vmap(synth.augment, in_axes=(0, None, None, None, None, None, None, None)))


@pytest.fixture(scope='module')
def augment_fn():
  return _augment_fn()


@pytest.mark.parametrize('shape', [(24, 24), (24, 32)])
def test_augment_geometry_is_dihedral_and_aligned(augment_fn, shape):
  h, w = shape
  image = _coordinate_image(h, w)
  rng = np.random.default_rng(1)
  mask = (rng.uniform(size=(h, w)) < 0.2).astype(np.float32)
  keys = jax.random.split(jax.random.key(2), 48)
  outs, masks = map(np.asarray, augment_fn(keys, image, mask, 0.0, 0.0, 0.0, 0.0, 0.0))
  allowed = _dihedral_maps(h, w)
  seen = set()
  for o, m in zip(outs, masks):
    np.testing.assert_allclose(o[..., 2], 0.5, atol=1e-5)
    sy, sx = _decode(o, h, w)
    hits = [i for i, (ay, ax) in enumerate(allowed) if (ay == sy).all() and (ax == sx).all()]
    assert len(hits) == 1
    seen.add(hits[0])
    np.testing.assert_array_equal(m, mask[sy, sx])
  assert len(seen) == len(allowed)    # every flip / rotation occurs


def test_augment_small_angle_and_colour_keep_alignment(augment_fn):
  h = w = 24
  image = _coordinate_image(h, w)
  mask = np.zeros((h, w), np.float32)
  mask[3:9, 14:20] = 1.0
  keys = jax.random.split(jax.random.key(9), 16)
  go, gm = map(np.asarray, augment_fn(keys, image, mask, 20.0, 0.0, 0.0, 0.0, 0.0))
  fo, fm = map(np.asarray, augment_fn(keys, image, mask, 20.0, 0.2, 0.2, 0.2, 0.05))
  non_dihedral = 0
  allowed = _dihedral_maps(h, w)
  for o, m in zip(go, gm):
    sy, sx = _decode(o, h, w)
    np.testing.assert_array_equal(m, mask[sy, sx])     # mask moved with its pixels
    assert set(np.unique(m)) <= {0.0, 1.0}
    # Nearest-neighbour rotation by <= 20 degrees about the centre: for one dihedral map D every
    # source lies within the 20-degree chord (2 r sin 10 deg) plus rounding of D(pixel).
    radius = math.hypot((h - 1) / 2, (w - 1) / 2)
    offsets = [np.hypot(sy - ay, sx - ax).max() for ay, ax in allowed]
    assert min(offsets) <= 2 * radius * math.sin(math.radians(10)) + 0.75, offsets
    if min(offsets) > 0:
      non_dihedral += 1
  assert non_dihedral >= 8
  # Colour jitter changes the image only, never the geometry or the mask.
  np.testing.assert_array_equal(fm, gm)
  assert fo.min() >= 0.0 and fo.max() <= 1.0
  assert np.abs(fo - go).max() > 0.01


def test_synthesize_balanced(photos, textures):
  """Exactly two of each kind in a batch of 8; every row is its generator's output."""
  images, texs = photos[[0, 1, 2, 3, 4, 0, 1, 2]], textures[[0, 1, 2, 3, 4, 0, 1, 2]]
  key = jax.random.key(4)
  out, mask, kind = map(np.asarray, jax.jit(synth.synthesize_balanced)(key, images, texs))
  np.testing.assert_array_equal(np.bincount(kind, minlength=4), [2, 2, 2, 2])
  np.testing.assert_array_equal(mask.astype(bool), np.any(out != images, axis=-1))
  assert mask.sum(axis=(1, 2)).min() > 0
  k_perm, k_gen = jax.random.split(key)
  perm = np.asarray(jax.random.permutation(k_perm, 8))
  keys = jax.random.split(k_gen, 8)
  for j, row in enumerate(perm):
    name = synth.KINDS[j // 2]
    assert kind[row] == j // 2
    o, m = jax.jit(GENERATORS[name])(keys[j], images[row], texs[row])
    np.testing.assert_allclose(np.asarray(o), out[row], atol=1e-5)
    assert np.mean(np.asarray(m) != mask[row]) <= 2.0 / (H * W)
  with pytest.raises(ValueError, match='divisible by 4'):
    synth.synthesize_balanced(key, images[:6], texs[:6])


def test_texture_function_is_asked_for_the_draem_rows_only(photos, textures):
  # A function of the rows gives the same batch as the texture array, bit for bit, and is called
  # once with the N / 4 DRAEM rows (procedural textures are made for those images only).
  images, texs = photos[[0, 1, 2, 3, 4, 0, 1, 2]], textures[[0, 1, 2, 3, 4, 0, 1, 2]]
  key = jax.random.key(11)
  asked = []

  def texture_rows(rows):
    asked.append(rows.shape)
    return jnp.asarray(texs)[rows]

  fn = jax.jit(lambda k, im: synth.synthesize_balanced(k, im, texture_rows))
  got = [np.asarray(a) for a in fn(key, images)]
  want = [np.asarray(a) for a in jax.jit(synth.synthesize_balanced)(key, images, texs)]
  assert asked == [(2,)]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_kth_largest_equals_top_k():
  # The bisection on bit patterns returns lax.top_k's k-th value exactly: ties, negatives,
  # zeros, k = 1 and k = n, and DRAEM's size (1 % of 256 x 256).
  rng = np.random.default_rng(3)
  cases = [rng.standard_normal(1000), np.round(rng.standard_normal(500), 1),
           -np.abs(rng.standard_normal(300)) * 1e-3, np.zeros(50), rng.uniform(size=65536),
           np.concatenate([np.zeros(40), -np.ones(40), np.full(20, 7.5)])]
  for x in cases:
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    for k in sorted({1, 2, n // 3 + 1, max(1, math.ceil(0.01 * n)), n}):
      want = float(jax.lax.top_k(x, k)[0][-1])
      assert float(synth.kth_largest(x, k)) == want, (n, k)


def test_synthesize_batch_shapes():
  """Traced only (jax.eval_shape, no compile): batch wiring with procedural textures."""
  images = jax.ShapeDtypeStruct((3, H, W, 3), jnp.float32)
  out, mask, kind = jax.eval_shape(lambda im: synth.synthesize_batch(jax.random.key(0), im),
                                   images)
  assert (out.shape, out.dtype) == ((3, H, W, 3), jnp.float32)
  assert (mask.shape, mask.dtype) == ((3, H, W), jnp.float32)
  assert (kind.shape, kind.dtype) == ((3,), jnp.int32)


def test_bad_inputs_raise():
  img = jnp.zeros((H, W, 3), jnp.float32)
  with pytest.raises(ValueError, match=r'\[H, W, 3\]'):
    synth.cutpaste(jax.random.key(0), jnp.zeros((H, W)))
  with pytest.raises(ValueError, match='texture shape'):
    synth.draem(jax.random.key(0), img, jnp.zeros((H, W + 1, 3)))
  with pytest.raises(ValueError, match='mask shape'):
    synth.augment(jax.random.key(0), img, jnp.zeros((H + 1, W)))
  with pytest.raises(ValueError, match=r'\[N, H, W, 3\]'):
    synth.synthesize_batch(jax.random.key(0), img)


def test_load_textures(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    synth.load_textures(str(tmp_path / 'missing'), (16, 16))
  with pytest.raises(FileNotFoundError, match='no images'):
    synth.load_textures(str(tmp_path), (16, 16))
  Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(tmp_path / 'a.png')
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / 'b.jpg')
  (tmp_path / 'notes.txt').write_text('not an image')
  tex = synth.load_textures(str(tmp_path), (16, 24))
  assert tex.shape == (2, 16, 24, 3) and tex.dtype == np.float32
  np.testing.assert_allclose(tex[0], 1.0)
  np.testing.assert_allclose(tex[1], 0.0)
