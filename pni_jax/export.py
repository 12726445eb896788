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
  run_artifact.py   standalone loader + CLI: a copy of pni_jax/artifact_runner.py, which imports
                    only jax, numpy, PIL and the standard library

The exported function takes the parameters as a FLAT dict {name: array} (exactly the arrays of
params.npz) and rebuilds the nested pytree inside the trace, so a loader needs no pytree
structure beyond the npz keys. It returns dict(maps [B, S, S] float32, image [B] float32,
patch [B, h, w] float32).

The loader code exists once, as the module `pni_jax.artifact_runner`: `export_model` copies its
file (importlib.resources) as run_artifact.py, `load_artifact` uses the module, and
`pni_jax.data.images` imports its decoding and preprocessing, so the package's preprocessing,
the in-package loader and the standalone one cannot diverge.

Refinement hook: when `fitted.refine` holds RefineNet variables {'params', 'batch_stats'} and the
main variant asks for R (model.use_refinement), the map becomes
`refine.fuse(variables, images01, maps, lo, hi, cfg.model.refine.fusion_weight, ...)` with
lo = fitted.stats['refine_lo'], hi = fitted.stats['refine_hi'] (the fit-time normalisation of
`refine.train_refiner`); the image score is then taken from the fused map (as in the paper's R
rows, and as in-process). lo and hi are parameters; the weight comes from the config.
"""

from __future__ import annotations

import argparse
import importlib.resources
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

from pni_jax import artifact_runner
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


def used_params(flat_fn, flat: dict, image_spec) -> list[str]:
  """Names of the flat parameters `flat_fn(flat, images)` reads (e.g. drops the backbone stages
  after the last tap and its classifier).

  jax's own dead-code elimination decides: a jitted function lowered with `keep_unused=False`
  (the default) drops the arguments its module never reads, and `jax.export` reports the kept
  ones as `module_kept_var_idx` (indices into the flattened (params, images) arguments).
  """
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
  exported = jax.export.export(jax.jit(flat_fn), platforms=('cpu',))(spec, image_spec)
  order = jax.tree_util.tree_leaves(({k: k for k in flat},))  # the dict's flattening order
  kept = set(exported.module_kept_var_idx)
  return sorted(name for i, name in enumerate(order) if i in kept)


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
  resize_mode = str(cfg.data.get('resize_mode', artifact_runner.LEGACY_RESIZE_MODE))
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
    # one visible in the outputs.
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
      input=dict(size=crop, resize=resize, crop=crop, resize_mode=resize_mode,
                 layout='NHWC float32 RGB in [0, 1]',
                 preprocess=f'antialiased bilinear resize ({resize_mode}: '
                            + ('whole image to `resize` x `resize`' if resize_mode == 'square'
                               else 'short side to `resize`')
                            + '), center crop `crop` (top = round((h - crop) / 2)); grayscale '
                            '-> RGB (run_artifact.preprocess)'),
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
  (tmp / 'run_artifact.py').write_text(loader_source(), encoding='utf-8')
  os.replace(tmp, out)
  meta['sizes'] = {f: (out / f).stat().st_size for f in FILES}
  meta['export_seconds'] = time.perf_counter() - t0
  return meta


def loader_source() -> str:
  """The text of `pni_jax/artifact_runner.py`, which the artifact ships as run_artifact.py (read
  as package data, so it works from an installed wheel or a zip too)."""
  return importlib.resources.files('pni_jax').joinpath('artifact_runner.py').read_text('utf-8')


def load_artifact(path: str | os.PathLike) -> artifact_runner.Artifact:
  """In-package loader: `load_artifact(dir)(images01 [B, S, S, 3] float32 in [0, 1])` ->
  dict(maps [B, S, S], image [B], patch [B, h, w]) numpy float32. The returned object also has
  `.meta`, `.load_images(paths)` and `.predict_files(paths, batch_size)`: it is the class that
  run_artifact.py holds (the same file, `pni_jax.artifact_runner`)."""
  return artifact_runner.Artifact(os.fspath(path))



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
