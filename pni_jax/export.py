"""Portable inference artifact: the whole inference path as one StableHLO function + its weights.

`export_model` composes, as ONE pure function of (params, images),

  images01 [B, S, S, 3] float32 in [0, 1]
    -> backbone normalisation -> backbone -> patch features            (features.make_feature_fn)
    -> PNI / PatchCore patch scores of the model's main variant       (infer.make_scorer)
    -> anomaly map (bilinear upsampling + Gaussian blur) -> image score
    -> refinement fusion, when the main variant uses R   (infer.refine_maps -> refine.fuse)

and serialises it with `jax.export` (StableHLO) for CPU and CUDA. The batch dimension is symbolic
(any B works without re-exporting): the backbone runs on the whole batch, the patch scoring (and
the fusion) image by image (`lax.map`), because its tile / chunk arithmetic needs a static
number of patches, and so that its temporaries stay bounded by the configured tiles whatever B
the caller passes. `batch_size=N` exports a fixed batch instead (the loader then pads).

Artifact layout (`<out>/`):
  model.stablehlo   serialised `jax.export.Exported` (bytes)
  params.npz        the function's parameters: one array per leaf, named 'backbone/params/...',
                    'model/c_emb', ..., 'refine/variables/...', 'refine/lo' (flat, see below)
  meta.json         input size, resize / crop, batch, thresholds, score units, versions
  run_artifact.py   standalone loader + CLI; imports only jax, numpy, PIL and the standard library

The exported function takes the parameters as a FLAT dict {name: array} (exactly the arrays of
params.npz) and rebuilds the nested pytree inside the trace, so a loader needs no pytree
structure beyond the npz keys. It returns dict(maps [B, S, S] float32, image [B] float32,
patch [B, h, w] float32).

The loader code exists once, as `LOADER_SOURCE`: `export_model` writes it as run_artifact.py and
`load_artifact` executes the same source, so the in-package and standalone paths cannot diverge.

Refinement hook: when `fitted.refine` holds RefineNet variables {'params', 'batch_stats'} and the
main variant asks for R (model.use_refinement), the map becomes
`refine.fuse(variables, images01, maps, lo, hi, cfg.model.refine.fusion_weight, ...)` with
lo = fitted.stats['refine_lo'], hi = fitted.stats['refine_hi'] (the fit-time normalisation of
`refine.train_refiner`); the image score is then taken from the fused map (as in the paper's R
rows, and as in-process). lo and hi are parameters; the weight comes from the config.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import features
from pni_jax import infer
from pni_jax import model as model_lib

ARTIFACT_FORMAT = 'pni-jax-inference-artifact'
ARTIFACT_VERSION = 1
FILES = ('model.stablehlo', 'params.npz', 'meta.json', 'run_artifact.py')
DEFAULT_PLATFORMS = ('cpu', 'cuda')
_SEP = '/'
_NUMPY_DTYPES = ('float32', 'float64', 'float16', 'int32', 'int64', 'int8', 'uint8', 'bool')


# ----------------------------------------------------------------------------- the pure function


def make_inference_fn(cfg_model, variant: infer.Variant, crop: int,
                      backbone_variables) -> Callable[[dict, jax.Array], dict]:
  """The whole inference path for preprocessed crops as one pure function.

  Args:
    cfg_model: cfg.model (backbone, layers, feature sizes, scoring, refine settings).
    variant: which components score the map (with R, the fused refined map; `infer.make_scorer`).
    crop: S, the square input size.
    backbone_variables: only used to check them against the architecture (they stay an argument).
  Returns:
    `fn(tree, images01) -> dict(maps [B, S, S], image [B], patch [B, h, w])` (float32), with
    tree = {'backbone': variables, 'model': {'c_emb', 'emb_to_dist', ['position'], ['mlp'],
    ['refine': {'variables', 'lo', 'hi'}]}} and images01 [B, S, S, 3] float32 in [0, 1].
    B may be symbolic (jax.export); the scoring runs per image with `lax.map`.
  """
  feature_fn, _ = features.make_feature_fn(cfg_model, variables=backbone_variables)
  scorer = infer.make_scorer(cfg_model, variant, (crop, crop))

  def fn(tree, images01):
    feats = feature_fn(tree['backbone'], images01)                     # [B, h, w, d]

    def score_one(args):                                               # one image
      f, image = args
      out = scorer(tree['model'], f[None], image[None])
      return {k: out[k][0] for k in ('patch', 'maps', 'image')}

    out = jax.lax.map(score_one, (feats, images01))
    return {k: out[k].astype(jnp.float32) for k in ('maps', 'image', 'patch')}

  return fn


def inference_tree(backbone_variables, fitted, variant: infer.Variant, cfg_model) -> dict:
  """The parameter pytree of `make_inference_fn` from backbone variables and a fitted PNIModel."""
  arrays = model_lib.arrays(fitted)
  model = {'c_emb': arrays['c_emb'], 'emb_to_dist': arrays['emb_to_dist']}
  for name, used in (('position', variant.position), ('mlp', variant.neighborhood),
                     ('refine', variant.refinement)):
    if used:
      if arrays.get(name) is None:
        raise ValueError(f'the main variant {variant.name} needs the model\'s {name} arrays but '
                         'the fitted model has none (fit with the matching model.use_* settings)')
      model[name] = arrays[name]
  del cfg_model
  return jax.tree.map(np.asarray, {'backbone': backbone_variables, 'model': model})


# ----------------------------------------------------------------------------- flat parameters


def _key_name(entry) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten_params(tree) -> tuple[dict[str, np.ndarray], Callable[[dict], Any]]:
  """Nested pytree -> ({'a/b/c': array}, unflatten(flat dict) -> pytree of the same structure)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [_SEP.join(_key_name(e) for e in path) for path, _ in leaves]
  if len(set(names)) != len(names):
    raise ValueError('parameter names collide after flattening (a key contains "/")')
  flat = {}
  for name, (_, leaf) in zip(names, leaves):
    arr = np.asarray(leaf)
    if arr.dtype.name not in _NUMPY_DTYPES:
      raise ValueError(f'parameter {name} has dtype {arr.dtype}, which params.npz cannot hold; '
                       'export float32 weights')
    flat[name] = arr

  def unflatten(flat_params: dict):
    return jax.tree_util.tree_unflatten(treedef, [flat_params[n] for n in names])

  return flat, unflatten


_CALL_PRIMITIVES = ('jit', 'pjit', 'closed_call', 'core_call')


def _used_invars(jaxpr) -> set[int]:
  """Indices of `jaxpr.invars` that any equation or output reads. Nested jit calls are followed
  (their unused arguments are not counted); any other equation counts all its operands (so the
  answer may keep too much, never too little)."""
  used = set()
  for eqn in jaxpr.eqns:
    sub = eqn.params.get('jaxpr') if eqn.primitive.name in _CALL_PRIMITIVES else None
    if sub is not None and len(getattr(sub, 'jaxpr', sub).invars) == len(eqn.invars):
      inner = _used_invars(getattr(sub, 'jaxpr', sub))
      used.update(id(v) for i, v in enumerate(eqn.invars) if i in inner)
    else:
      used.update(id(v) for v in eqn.invars)
  used.update(id(v) for v in jaxpr.outvars)
  return {i for i, v in enumerate(jaxpr.invars) if id(v) in used}


def used_params(flat_fn, flat: dict, image_spec) -> list[str]:
  """Names of the flat parameters `flat_fn(flat, images)` reads (e.g. drops the backbone stages
  after the last tap and its classifier)."""
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
  closed = jax.make_jaxpr(flat_fn)(spec, image_spec)
  order = jax.tree_util.tree_leaves(({k: k for k in flat},))  # the dict's flattening order
  used = _used_invars(closed.jaxpr)
  return sorted(name for i, name in enumerate(order) if i in used)


# ----------------------------------------------------------------------------- export


def _resolve(source):
  """(cfg, fitted, backbone variables) from a category or model dir, or (cfg, fitted, extractor)."""
  if isinstance(source, (tuple, list)):
    if len(source) != 3:
      raise ValueError('export_model: pass a category directory or (cfg, fitted model, extractor)')
    cfg, fitted, extractor = source
    return cfg, fitted, extractor.variables
  import ml_collections  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(source)
  is_model_dir = (path / 'meta.json').exists() and (path / 'arrays').exists()
  model_dir = path if is_model_dir else path / 'model'
  if not (model_dir / 'meta.json').exists():
    raise FileNotFoundError(f'no fitted model at {path} (expected {path}/model/meta.json, i.e. '
                            '<workdir>/<category>); fit one with `python -m pni_jax.main`')
  fitted = model_lib.load(model_dir)
  if 'config' not in fitted.meta:
    raise ValueError(f'{model_dir}/meta.json has no "config": cannot rebuild the backbone')
  cfg = ml_collections.ConfigDict(fitted.meta['config'])
  return cfg, fitted, infer.make_extractor(cfg).variables


def _score_units(cfg_model, variant: infer.Variant) -> dict:
  sc = cfg_model.scoring
  dist = (f'lambda * Euclidean feature distance (lambda = {float(sc.likelihood_lambda):g}) to the '
          + ('nearest allowed C_emb vector (PNI, eq. 3-8)' if variant.conditional else
             'nearest C_emb vector (PatchCore)'))
  image = {'max': 'max of the final map',
           'patch_max': 'max patch score', 'reweight': 'PatchCore reweighted max patch score',
           'patch_max_cropped': 'max patch score, the border of the patch map cut',
           'top_percent': f'mean of the top {float(sc.top_percent):g} % PNI map pixels'}
  maps = (f'{dist}, upsampled and blurred (sigma {float(sc.sigma):g})' if not variant.refinement
          else '(1 - w) * clip((A - lo) / (hi - lo), 0, 1) + w * refined: unitless, ~[0, 1]')
  return dict(patch=dist, maps=maps, image=f'{image.get(str(sc.image_score), sc.image_score)} '
              f'({dist})')


def _thresholds(fitted, variant: infer.Variant) -> dict:
  """{'image', 'pixel'} fit-time thresholds from `fitted.stats` (None when absent, or when they
  were calibrated on another variant than the exported one)."""
  calibrated_on = fitted.meta.get('calibration_variant')
  if calibrated_on is not None and calibrated_on != variant.name:
    return dict(image=None, pixel=None)
  out = {}
  for key in ('image', 'pixel'):
    value = (fitted.stats or {}).get(f'{key}_threshold')
    out[key] = None if value is None else float(np.asarray(value))
  return out


def export_model(source, out_path: str | os.PathLike, *, batch_size: int | None = None,
                 platforms: tuple[str, ...] = DEFAULT_PLATFORMS) -> dict:
  """Writes the portable inference artifact of a fitted model to the folder `out_path`.

  Args:
    source: `<workdir>/<category>` (or its `model/` folder), or a tuple (cfg, fitted PNIModel,
      infer.Extractor).
    out_path: the artifact folder; replaced when it holds an earlier artifact, refused
      (FileExistsError) when it holds anything else.
    batch_size: None exports a symbolic batch (any B); an int exports that fixed batch.
    platforms: lowering platforms of `jax.export` (CUDA lowers on a CPU-only machine too).
  Returns:
    the artifact's meta dict (what meta.json holds), with 'export_seconds' and 'sizes' (bytes).
  """
  t0 = time.perf_counter()
  out = pathlib.Path(out_path).absolute()
  if out.exists() and not (out / 'meta.json').exists() and any(out.iterdir()):
    raise FileExistsError(f'{out} exists and is not a pni-jax artifact; choose another --out')
  if batch_size is not None and int(batch_size) < 1:
    raise ValueError(f'batch_size must be >= 1 or None (symbolic), got {batch_size}')
  cfg, fitted, backbone_variables = _resolve(source)
  crop, resize = int(cfg.data.crop), int(cfg.data.resize)
  variant = infer.variant_from_config(cfg.model)
  tree = inference_tree(backbone_variables, fitted, variant, cfg.model)
  fn = make_inference_fn(cfg.model, variant, crop, tree['backbone'])
  flat, unflatten = flatten_params(tree)

  def full_fn(flat_params, images01):
    return fn(unflatten(flat_params), images01)

  keep = used_params(full_fn, flat, jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32))
  dropped = {k: (v.shape, v.dtype) for k, v in flat.items() if k not in keep}
  flat = {k: flat[k] for k in keep}

  def flat_fn(flat_params, images01):
    # Parameters the function never reads are not saved; NaN placeholders would make any use of
    # one visible in the outputs (the analysis in `used_params` only ever keeps too much).
    filler = {k: jnp.full(shape, jnp.nan if jnp.issubdtype(dtype, jnp.floating) else 0, dtype)
              for k, (shape, dtype) in dropped.items()}
    return full_fn({**flat_params, **filler}, images01)

  if batch_size is None:
    batch, = jax.export.symbolic_shape('batch')
  else:
    batch = int(batch_size)
  param_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
  image_spec = jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.float32)
  exported = jax.export.export(jax.jit(flat_fn), platforms=tuple(platforms))(param_spec, image_spec)
  blob = exported.serialize()

  grid = features.feature_grid(cfg.model, crop)
  meta = dict(
      format=ARTIFACT_FORMAT, version=ARTIFACT_VERSION, jax_version=jax.__version__,
      category=fitted.meta.get('category'), backbone=str(cfg.model.backbone),
      variant=variant.name, refinement=bool(variant.refinement),
      input=dict(size=crop, resize=resize, crop=crop, layout='NHWC float32 RGB in [0, 1]',
                 preprocess='PIL bilinear resize of the short side to `resize`, center crop '
                            '`crop` (top = round((h - crop) / 2)); grayscale -> RGB'),
      batch_size=None if batch_size is None else int(batch_size),
      platforms=list(exported.platforms),
      outputs=dict(maps=['B', crop, crop], image=['B'], patch=['B', *grid]),
      thresholds=_thresholds(fitted, variant), score_units=_score_units(cfg.model, variant),
      thresholds_calibrated_on=fitted.meta.get('calibration_variant'),
      num_params=int(sum(v.size for v in flat.values())), num_unused_params_dropped=len(dropped))

  if out.exists():
    shutil.rmtree(out)
  tmp = out.with_name(out.name + '.tmp')
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  (tmp / 'model.stablehlo').write_bytes(bytes(blob))
  np.savez(tmp / 'params.npz', **flat)
  (tmp / 'meta.json').write_text(json.dumps(meta, indent=2, sort_keys=True))
  (tmp / 'run_artifact.py').write_text(LOADER_SOURCE)
  os.replace(tmp, out)
  meta['sizes'] = {f: (out / f).stat().st_size for f in FILES}
  meta['export_seconds'] = time.perf_counter() - t0
  return meta


def load_artifact(path: str | os.PathLike):
  """In-package loader: `load_artifact(dir)(images01 [B, S, S, 3] float32 in [0, 1])` ->
  dict(maps [B, S, S], image [B], patch [B, h, w]) numpy float32. The returned object also has
  `.meta`, `.load_images(paths)` and `.predict_files(paths, batch_size)` (see LOADER_SOURCE)."""
  namespace = {'__name__': 'pni_jax_artifact_loader'}
  exec(compile(LOADER_SOURCE, 'run_artifact.py', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['Artifact'](os.fspath(path))


# ----------------------------------------------------------------------------- the loader


LOADER_SOURCE = r'''"""Standalone runner of a pni-jax inference artifact (jax, numpy, PIL only).

  python run_artifact.py IMAGE_OR_FOLDER [...] [--json results.json] [--npz maps.npz] [--batch 8]

prints one line per image: image score, decision (when meta.json has an image threshold), path.
From Python: `art = Artifact(folder)`; `art(images01)` with images01 [B, S, S, 3] float32 in
[0, 1] -> dict(maps [B, S, S], image [B], patch [B, h, w]); `art.predict_files(paths)`.
Preprocessing: PIL decode (grayscale / RGBA / 16-bit -> RGB uint8), bilinear resize of the short
side to meta.input.resize, center crop meta.input.crop (top = round((h - crop) / 2)), / 255.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
from PIL import Image

FORMAT = 'pni-jax-inference-artifact'
VERSION = 1
EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


def to_uint8_rgb(img):
  """Any PIL image -> uint8 [H, W, 3] (16 / 32-bit integer and float images are scaled)."""
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
    img = img.convert('RGB')
  return np.asarray(img, dtype=np.uint8)


def load_image(path):
  """uint8 [H, W, 3] RGB; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError('image file not found: %s' % path)
  try:
    img = Image.open(path)
    img.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError('cannot read image %s: %s: %s' % (path, type(e).__name__, e)) from e
  return to_uint8_rgb(img)


def preprocess(image, resize, crop):
  """uint8 [H, W, 3] -> float32 [crop, crop, 3] in [0, 1]: resize the short side, center crop."""
  h, w = image.shape[:2]
  rh, rw = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
  if crop > min(rh, rw):
    raise ValueError('crop %d exceeds the resized image %dx%d' % (crop, rh, rw))
  img = Image.fromarray(image)
  if (rh, rw) != (h, w):
    img = img.resize((rw, rh), Image.BILINEAR)
  top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
  x = np.asarray(img)[top:top + crop, left:left + crop]
  return x.astype(np.float32) / np.float32(255.0)


def list_images(inputs):
  paths = []
  for item in inputs:
    if not os.path.exists(item):
      raise FileNotFoundError('no such image file or folder: %s' % item)
    if os.path.isdir(item):
      paths += sorted(os.path.join(item, f) for f in os.listdir(item)
                      if f.lower().endswith(EXTENSIONS))
    else:
      paths.append(item)
  return paths


class Artifact:
  """The exported function with its parameters; call it on preprocessed crops."""

  def __init__(self, directory):
    self.directory = directory
    meta_path = os.path.join(directory, 'meta.json')
    if not os.path.isfile(meta_path):
      raise FileNotFoundError('no pni-jax artifact at %s (missing meta.json)' % directory)
    with open(meta_path) as f:
      self.meta = json.load(f)
    if self.meta.get('format') != FORMAT or self.meta.get('version') != VERSION:
      raise ValueError('%s: artifact format %r version %r is not supported (expected %s %d)' % (
          directory, self.meta.get('format'), self.meta.get('version'), FORMAT, VERSION))
    with open(os.path.join(directory, 'model.stablehlo'), 'rb') as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, 'params.npz')) as z:
      self.params = jax.device_put({k: z[k] for k in z.files})
    self.size = int(self.meta['input']['size'])
    self.batch_size = self.meta.get('batch_size')
    self._call = jax.jit(self.exported.call)

  def __call__(self, images01):
    """images01 [B, S, S, 3] float in [0, 1] -> numpy float32 dict(maps, image, patch)."""
    x = np.asarray(images01, dtype=np.float32)
    s = self.size
    if x.ndim != 4 or x.shape[1:] != (s, s, 3):
      raise ValueError('expected images [B, %d, %d, 3], got %s' % (s, s, x.shape))
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

  def load_images(self, paths):
    """Files -> preprocessed crops [N, S, S, 3] float32."""
    inp = self.meta['input']
    return np.stack([preprocess(load_image(p), int(inp['resize']), int(inp['crop']))
                     for p in paths])

  def predict_files(self, paths, batch_size=8):
    """Scores image files in batches of `batch_size`; dict(maps, image, patch, decision)."""
    parts = []
    for start in range(0, len(paths), batch_size):
      parts.append(self(self.load_images(paths[start:start + batch_size])))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    thr = (self.meta.get('thresholds') or {}).get('image')
    out['decision'] = (np.where(out['image'] >= thr, 'defective', 'normal') if thr is not None
                       else np.full(len(paths), 'unknown'))
    return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    raise SystemExit('no images found in %s' % args.inputs)
  out = art.predict_files(paths, args.batch)
  for p, score, decision in zip(paths, out['image'], out['decision']):
    print('%.6f  %-9s  %s' % (score, decision, p))
  if args.json:
    rows = [dict(path=p, image_score=float(s), decision=str(d))
            for p, s, d in zip(paths, out['image'], out['decision'])]
    with open(args.json, 'w') as f:
      json.dump(dict(thresholds=art.meta.get('thresholds'), images=rows), f, indent=2)
  if args.npz:
    np.savez(args.npz, paths=np.asarray(paths), image=out['image'], maps=out['maps'],
             patch=out['patch'])
  return out


if __name__ == '__main__':
  main(sys.argv[1:])
'''


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m pni_jax.export',
      description='Export a fitted category as a portable StableHLO inference artifact.')
  parser.add_argument('--workdir', required=True, help='run folder of pni_jax.main')
  parser.add_argument('--category', required=True, help='category sub-folder of the workdir')
  parser.add_argument('--out', required=True, help='artifact folder to write')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='fixed batch size (0 = symbolic batch, any size)')
  parser.add_argument('--platforms', default=','.join(DEFAULT_PLATFORMS),
                      help='comma-separated lowering platforms (cpu, cuda, rocm, tpu)')
  args = parser.parse_args(argv)
  cat_dir = pathlib.Path(args.workdir) / args.category
  if not cat_dir.is_dir():
    raise SystemExit(f'no category folder {cat_dir} (check --workdir and --category)')
  meta = export_model(cat_dir, args.out, batch_size=args.batch_size or None,
                      platforms=tuple(p for p in args.platforms.split(',') if p))
  sizes = ', '.join(f'{k} {v / 2 ** 20:.2f}' for k, v in meta['sizes'].items())
  print(f'wrote {args.out} ({sizes} MiB), batch {meta["batch_size"] or "symbolic"}, '
        f'platforms {",".join(meta["platforms"])}, {meta["export_seconds"]:.1f} s')


if __name__ == '__main__':
  main(sys.argv[1:])
