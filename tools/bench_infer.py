"""Inference speed on a fitted workdir: `python tools/benchmark.py infer --workdir=runs/demo`.

For the baseline (PatchCore) and N+P, at batch 1 and batch B (data.batch_size), it prints
  * compiled: features + scoring as one jitted call, per image;
  * a per-stage breakdown, each stage jitted alone: backbone, MLP, priors + search (the scorer's
    patch scores minus its MLP: priors of the configured rule, nearest C_emb row, the search
    where a prior binds; for the baseline: masked search = the nearest row), maps (upsample,
    blur, image score);
  * runtime: `infer.ModelRuntime.score` (the path evaluation, calibration and --mode=predict use)
    on b host images, per image;
  * predict: `predict.Predictor.run` on one image file (decode, preprocess, score, map back to
    the original size, write the mask and overlay PNGs), warm; and its host work timed alone
    (decode + preprocess; map back + mask + both PNGs);
the evaluation's variants on one batch, one scorer per variant against all in one call
(`infer.make_variants_scorer`); and the same measured for the reference formulation side by side ("before": the MLP as gathered
windows + dense layers, the masked search over all of C_emb for every patch, every call padded to
batch B, as pni-jax scored before the runtime rewrite), with the ratio. Times: median over
--repeats calls after a warm-up (compile) call, the two formulations interleaved so both see the
same background load. The targets of issue 11 item 5 are printed next to the figures.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pni_jax import data as data_lib
from pni_jax import infer
from pni_jax import sharding
from pni_jax import knn
from pni_jax import model as model_lib
from pni_jax import neighborhood
from pni_jax import scoring


def _mlp_dtype(cfg) -> str:
  """The scoring MLP's dtype (older checkouts, timed with PYTHONPATH: model.precision)."""
  if hasattr(infer, 'mlp_dtype'):
    return infer.mlp_dtype(cfg.model)
  return str(cfg.model.precision)


def _median_times(fns: dict, repeats: int) -> dict:
  """Median wall time of each zero-argument function (block_until_ready), interleaved."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def reference_scorer(cfg_model, variant: infer.Variant, out_size):
  """The pre-rewrite formulation (still in the package as reference functions): the gathered-
  window MLP (`neighborhood.neighbor_probs`), the dense masked search (`scoring.pni_patch_scores`),
  the numpy-built blur operator."""
  sc = cfg_model.scoring
  nb = cfg_model.neighborhood
  tiles = dict(query_tile=int(sc.query_tile), bank_tile=int(sc.bank_tile))

  @jax.jit
  def score(arrays, feats):
    b, h, w, d = feats.shape
    flat = feats.reshape(-1, d)
    if not variant.conditional:
      dist, _ = scoring.nearest_distance(flat, arrays['c_emb'], **tiles)
      patch = float(sc.likelihood_lambda) * dist.reshape(b, h, w)
    else:
      p_nb = neighborhood.neighbor_probs(arrays['mlp'], feats, window=int(nb.window),
                                         chunk=int(nb.infer_chunk),
                                         temperature=float(sc.temperature)).reshape(b * h * w, -1)
      pos = arrays['position']
      p_pos = jnp.broadcast_to(pos[None], (b, h, w, pos.shape[-1])).reshape(b * h * w, -1)
      s, _ = scoring.pni_patch_scores(
          flat, arrays['c_emb'], arrays['emb_to_dist'], p_nb, p_pos,
          tau=infer.tau(sc, arrays['c_emb'].shape[0]), lam=float(sc.likelihood_lambda),
          combine=str(sc.combine), rho=float(sc.get('rho', 0.01)),
          neighborhood_weight=float(sc.get('neighborhood_weight', 0.5)),
          pos_base=scoring.position_base_rate(pos), **tiles)
      patch = s.reshape(b, h, w)
    a_h, a_w = scoring.map_operator(h, w, out_size[0], out_size[1], float(sc.sigma))
    maps = jnp.einsum('ih,bhw,jw->bij', a_h, patch, a_w, precision=jax.lax.Precision.HIGHEST)
    return dict(maps=maps, image=maps.reshape(b, -1).max(-1), patch=patch)

  return score


def _stage_fns(arrays, feats, cfg, variant, spec, hp):
  """Jitted stage functions of the new formulation on fixed inputs -> {stage: thunk}."""
  d = feats.shape[-1]
  flat = feats.reshape(-1, d)
  tiles = dict(query_tile=spec.query_tile, bank_tile=spec.bank_tile)
  c_emb = arrays['c_emb']
  patch = jnp.zeros(feats.shape[:3], jnp.float32)
  out = {}
  maps_fn = jax.jit(lambda p: (lambda m: (m, scoring.image_scores(
      m, p, spec.image_score, hp.top_percent, border=spec.image_border,
      max_top_percent=spec.max_top_percent)))(
          scoring.anomaly_maps(p, spec.out_size, hp.sigma, spec.max_sigma)))
  if not variant.conditional:
    nearest_fn = jax.jit(lambda f, c: knn.nearest_sq_dist(f, c, **tiles))
    out['masked search'] = lambda: nearest_fn(flat, c_emb)
    out['maps'] = lambda: maps_fn(patch)
    return out
  mlp_fn = jax.jit(lambda m, f: infer.mlp_logits(m, f, window=spec.window,
                                                 dilation=spec.dilation, chunk=spec.infer_chunk,
                                                 dtype=spec.dtype))
  patch_fn = jax.jit(lambda a, f: infer.patch_scores(a, f, hp, spec))
  out['MLP'] = lambda: mlp_fn(arrays['mlp'], feats)
  # The scorer's own patch scores (MLP, priors of the configured rule, nearest row and the
  # search where a prior binds); 'priors + search' is this minus the MLP row.
  out['patch scores'] = lambda: patch_fn(arrays, feats)
  out['maps'] = lambda: maps_fn(patch)
  return out


def _evaluation_figures(cfg, arrays, feats, images, hp, repeats: int) -> None:
  """Prints ms / image of the variants evaluation scores (`evaluate.variants_to_evaluate`, those
  the model has) on one batch: one scorer per variant against all in one call
  (`infer.make_variants_scorer`, shared MLP prior / nearest row / N+P maps), and the time of
  each form's first call (its compilation)."""
  from pni_jax import evaluate  # pylint: disable=g-import-not-at-top
  if not hasattr(infer, 'make_variants_scorer'):
    print('\nevaluation: this checkout scores each variant with its own scorer only')
    return
  have = {'N': arrays.get('mlp') is not None, 'P': arrays.get('position') is not None,
          'R': arrays.get('refine') is not None}
  variants = [v for v in evaluate.variants_to_evaluate(cfg)
              if (have['N'] or not v.neighborhood) and (have['P'] or not v.position)
              and (have['R'] or not v.refinement)]
  size = tuple(images.shape[1:3])
  singles = [infer.make_scorer(cfg.model, v, size) for v in variants]
  together = infer.make_variants_scorer(cfg.model, variants, size)
  fns = {'one scorer per variant': lambda: [s(arrays, feats, images, hp) for s in singles],
         'all variants in one call': lambda: together(arrays, feats, images, hp)}
  first = {}
  for name, fn in fns.items():
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first[name] = time.perf_counter() - t
  times = _median_times(fns, repeats)
  b = images.shape[0]
  print(f'\nevaluation scoring, {len(variants)} variants ({", ".join(v.name for v in variants)}), '
        f'batch {b}:')
  for name in fns:
    print(f'  {name:<28s} {1e3 * times[name] / b:8.2f} ms / image   first call (compile) '
          f'{first[name]:6.1f} s')
  print(f'  speed-up {times["one scorer per variant"] / times["all variants in one call"]:.2f}x')


def run(args) -> int:
  workdir = pathlib.Path(args.workdir)
  cats = sorted(p.parent.parent.name for p in workdir.glob('*/model/meta.json'))
  if not cats:
    print(f'no fitted model under {workdir}: run the demo first '
          '(python -m pni_jax.main --config=configs/demo.py --workdir=...)')
    return 2
  category = args.category or cats[0]
  fitted = model_lib.load(workdir / category / 'model')
  cfg = ml_collections.ConfigDict(fitted.meta['config'])
  if args.mlp_precision:
    with cfg.unlocked():
      cfg.model.scoring.mlp_precision = args.mlp_precision
  crop = int(cfg.data.crop)
  extractor = infer.make_extractor(cfg)
  big = extractor.batch_size
  # What the runtime uploads (C_emb padded to its bucket, the MLP folded), so that 'compiled'
  # and the stages time the runtime's own inputs.
  arrays = jax.device_put(infer.scoring_arrays(cfg, fitted) if hasattr(infer, 'scoring_arrays')
                          else model_lib.arrays(fitted))
  raw = jax.device_put(model_lib.arrays(fitted))     # the reference formulation's
  hp = scoring.hparams_from_config(cfg.model)
  test_dir = pathlib.Path(cfg.data.root) / category / 'test'
  paths = sorted(str(p) for p in test_dir.rglob('*.png'))[:big]
  mode = str(cfg.data.get('resize_mode', data_lib.LEGACY_RESIZE_MODE))
  images = np.stack([data_lib.preprocess(data_lib.load_image(p), int(cfg.data.resize), crop,
                                         mode=mode) for p in paths]).astype(np.float32)
  print(f'{workdir} [{category}]: {crop} px, backbone {cfg.model.backbone}, |C_emb| '
        f'{fitted.c_emb.shape[0]}, |C_dist| {fitted.num_dist}, devices {jax.device_count()} '
        f'({jax.devices()[0].platform}), batch B = {big}, MLP '
        f'{_mlp_dtype(cfg)}; median of {args.repeats} calls')
  variants = {'baseline': infer.Variant(), 'N+P': infer.Variant(True, True)}
  results = {}
  for vname, variant in variants.items():
    if variant.neighborhood and fitted.mlp is None or variant.position and fitted.position is None:
      continue
    new = infer.make_scorer(cfg.model, variant, (crop, crop))
    ref = reference_scorer(cfg.model, variant, (crop, crop))
    spec = infer.make_spec(cfg.model, variant, (crop, crop))
    fused_new = jax.jit(lambda a, v, x: new(a, extractor.fn(v, x)))
    fused_ref = jax.jit(lambda a, v, x: ref(a, extractor.fn(v, x)))
    runtime = infer.ModelRuntime(cfg, extractor, fitted, [variant])
    for b in (1, big):
      x = jnp.asarray(images[:b])
      x_pad = jnp.asarray(sharding.pad_rows(images[:b], big)[0])
      feats = extractor.fn(extractor.variables, x)
      stages = _stage_fns(arrays, feats, cfg, variant, spec, hp)
      fns = {'compiled': lambda: fused_new(arrays, extractor.variables, x),
             'compiled (before)': lambda: fused_ref(raw, extractor.variables, x),
             'runtime': lambda: runtime.score(images[:b]),
             'runtime (before: padded to B)': lambda: fused_ref(raw, extractor.variables,
                                                                  x_pad),
             'backbone': lambda: extractor.fn(extractor.variables, x)}
      fns.update(stages)
      times = _median_times(fns, args.repeats)
      if 'patch scores' in times:
        times['priors + search'] = times.pop('patch scores') - times['MLP']
      results[(vname, b)] = {k: 1e3 * v / b for k, v in times.items()}
  # predict on one image, warm (the second call).
  predict_ms, host_ms = None, None
  try:
    if args.mlp_precision:
      raise ValueError('--mlp-precision given: predict uses the fitted config')
    from pni_jax import predict
    predictor = predict.Predictor(workdir, category)
    with tempfile.TemporaryDirectory() as tmp:
      predictor.run(paths[:1], pathlib.Path(tmp), progress=False)
      runs = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        predictor.run(paths[:1], pathlib.Path(tmp), progress=False, write_tables=False)
        runs.append(time.perf_counter() - t)
      predict_ms = 1e3 * statistics.median(runs)
      predict_variant = predictor.variant.name
      host_ms = _predict_host_work(predictor, paths[0], pathlib.Path(tmp), args.repeats)
  except ValueError as e:
    print(f'predict skipped: {e}')

  x_eval = jnp.asarray(images)
  _evaluation_figures(cfg, arrays, extractor.fn(extractor.variables, x_eval), x_eval, hp,
                      args.repeats)

  # The MLP's work against this machine's matmul rate, measured now (a lower bound of N+P).
  mlp_gflop = None
  if fitted.mlp is not None:
    layers = infer._fold_mlp(fitted.mlp)                  # pylint: disable=protected-access
    h, w = extractor.feature_shape(crop)[:2]
    mlp_gflop = 2e-9 * h * w * sum(int(k.shape[0]) * int(k.shape[1]) for k, _ in layers)
    a = jnp.ones((2048, 2048), _mlp_dtype(cfg))
    mm = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    t_mm = _median_times({'mm': lambda: mm(a)}, args.repeats)['mm']
    rate = 2 * 2048 ** 3 / t_mm / 1e9

  order = ['compiled', 'compiled (before)', 'runtime', 'runtime (before: padded to B)',
           'backbone', 'MLP', 'priors + search', 'masked search', 'maps']
  print(f'\nms per image                       ' + ''.join(
      f'{v + " b" + str(b):>16s}' for v, b in results))
  for row in order:
    cells = [results[key].get(row) for key in results]
    if all(c is None for c in cells):
      continue
    print(f'  {row:<32s}' + ''.join(f'{c:16.2f}' if c is not None else f'{"-":>16s}'
                                    for c in cells))
  print('\nspeed-ups (before / after):')
  for (vname, b), r in results.items():
    print(f'  {vname} b{b}: compiled {r["compiled (before)"] / r["compiled"]:.2f}x, '
          f'runtime path {r["runtime (before: padded to B)"] / r["runtime"]:.2f}x')
  if mlp_gflop is not None:
    print(f'\nMLP work {mlp_gflop:.2f} GFLOP / image; {_mlp_dtype(cfg)} matmul rate now '
          f'{rate:.0f} GFLOP/s -> the MLP '
          f'alone needs >= {1e3 * mlp_gflop / rate:.1f} ms / image at that rate')
  print('\ntargets (issue 11 item 5, CPU demo 256 px):')
  def show(label, value, bound):
    ok = 'ok' if value <= bound else 'MISSED'
    print(f'  {label:<48s} {value:8.2f}  (<= {bound:.2f})  {ok}')
  if ('N+P', 1) in results:
    show('N+P ms / image at batch B', results[('N+P', big)]['compiled'], 25.0)
    show('N+P ms at batch 1', results[('N+P', 1)]['compiled'], 25.0)
  show('baseline ms / image at batch B', results[('baseline', big)]['compiled'], 12.0)
  if predict_ms is not None:
    key = ('N+P', 1) if predict_variant != 'baseline' and ('N+P', 1) in results else (
        'baseline', 1)
    print(f'  predict, one image, warm ({predict_variant}): {predict_ms:.2f} ms; runtime scoring '
          f'of one image {results[key]["runtime"]:.2f} ms; compiled batch 1 '
          f'{results[key]["compiled"]:.2f} ms')
    if host_ms:
      print(f'  predict\'s host work on that image, each part alone: decode + preprocess '
            f'{host_ms[0]:.2f} ms, map back + mask + both PNGs written {host_ms[1]:.2f} ms')
    show('runtime (predict scoring path) / compiled b1', results[key]['runtime'] /
         results[key]['compiled'], 1.3)
    if '+R' in predict_variant:
      print('  predict incl. decode + PNG writes / compiled b1: not comparable here (predict runs '
            'the refinement network, the compiled figures are without R)')
    else:
      show('predict incl. decode + PNG writes / compiled b1', predict_ms /
           results[key]['compiled'], 1.3)
  return 0


def _predict_host_work(predictor, path: str, out_dir: pathlib.Path, repeats: int):
  """(decode + preprocess ms, map back + mask + PNG writes ms) of one image, each timed alone
  (median); None where this checkout's predict has no such parts."""
  from pni_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  if not (hasattr(data_lib, 'load_crop') and hasattr(predictor, '_finish')):
    return None
  load = lambda: data_lib.load_crop(path, predictor.resize, predictor.crop, predictor.mode)
  image, crop = load()
  item = dict(path=path, name='host_work', orig=image, crop=crop)
  out = predictor.runtime.score(crop[None], keys=('maps', 'image'))[predictor.variant.name]
  amap, score = out['maps'][0], float(out['image'][0])       # the image's own map and score
  finish = lambda: predictor._finish(item, amap, score, out_dir)  # pylint: disable=protected-access
  out = []
  for fn in (load, finish):
    runs = []
    for _ in range(max(repeats, 3)):
      t = time.perf_counter()
      fn()
      runs.append(time.perf_counter() - t)
    out.append(1e3 * statistics.median(runs))
  return tuple(out)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='benchmark.py infer', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/demo', help='a fitted workdir (the demo)')
  parser.add_argument('--category', default='', help='default: the first fitted category')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--mlp-precision', default='', choices=('', 'float32', 'bfloat16'),
                      help="model.scoring.mlp_precision for this run ('': the model's)")
  return run(parser.parse_args(argv))
