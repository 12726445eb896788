"""End-to-end stage timings: `python tools/benchmark.py e2e [run|peer] [options]`.

run (default): for each config in --configs (demo, paper) generates an MVTec-layout set
  (pni_jax.data.generate, one category), then runs the fitting stages exactly as
  `pipeline.fit_category` strings them (fit.extract_features -> fit.select_coreset ->
  fit.nearest_codes -> position.position_histogram -> neighborhood.train_mlp), the refinement training
  (refine.train_refiner, when it runs) and inference (features + N + P scoring per test batch),
  over a `sharding.make_mesh()` mesh of all devices. Per stage it prints the wall time, the part
  of it spent compiling (jax.monitoring compile events), the work (FLOPs from XLA's
  cost_analysis or the stage's known operation count, or bytes moved for memory-bound stages)
  and the achieved rate against this device's peak measured in the same run (a large matmul for
  FLOP/s, a large elementwise pass for bytes/s). Written to <out>/e2e.json and <out>/e2e.md.
  On CPU the paper config is shrunk (fewer / smaller images, fewer MLP epochs, refinement
  iterations); every shrink is printed and stored with the results.

peer: additionally runs anomalib's PatchCore (`pip install anomalib`, optional) on the same
  generated images with the same backbone / layers / coreset ratio in this process, and prints
  its time and image / pixel AUROC next to ours (the baseline = PatchCore variant) as ratios.
  Without anomalib it says so and exits 0.

Examples:
  python tools/benchmark.py e2e --configs demo
  python tools/benchmark.py e2e --configs paper --images 200 --test-images 100 --size 480 \
      --mlp-epochs 15 --out runs/bench_gpu            # the full paper setting (GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import coreset
from pni_jax import data as data_lib
from pni_jax import features
from pni_jax import fit
from pni_jax import infer
from pni_jax import metrics
from pni_jax import neighborhood
from pni_jax import position as position_lib
from pni_jax import sharding
from pni_jax.config import base_config
from pni_jax.store import FeatureStore

CATEGORY = 'tokens'


# ----------------------------------------------------------------------------- timing helpers


class CompileClock:
  """Seconds spent tracing / lowering / compiling, from jax.monitoring events."""

  def __init__(self):
    self.total = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_):
    if event.startswith('/jax/core/compile/'):
      self.total += float(duration)

  def close(self):
    jax.monitoring.unregister_event_duration_listener(self._on_event)


@contextlib.contextmanager
def stage(rows: list, name: str, clock: CompileClock, **info):
  """Times the block (after `jax.effects_barrier`) and appends a row; the block may fill `info`."""
  row = dict(stage=name, **info)
  c0, t0 = clock.total, time.perf_counter()
  yield row
  jax.effects_barrier()
  row['seconds'] = time.perf_counter() - t0
  row['compile_seconds'] = clock.total - c0
  rows.append(row)
  print(f'  {name:<22s} {row["seconds"]:8.2f} s (compile {row["compile_seconds"]:.2f} s)',
        flush=True)


def _flops_of(fn, *args) -> float:
  """XLA's FLOP count of one call of a jitted function (HLO cost analysis of the lowered,
  uncompiled function: no second compile; nan when unavailable)."""
  try:
    cost = fn.lower(*args).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float('nan')
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def measure_peaks(on_cpu: bool) -> dict:
  """Peak matmul FLOP/s (float32 and bfloat16) and elementwise bytes/s of the default device."""
  out = {}
  n = 2048 if on_cpu else 8192
  for name, dtype in (('float32', jnp.float32), ('bfloat16', jnp.bfloat16)):
    size = n if name == 'float32' or not on_cpu else n // 2      # bf16 matmuls are slow on CPU
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(mm(a, a))
    best = math.inf
    for _ in range(3 if on_cpu else 10):
      t = time.perf_counter()
      jax.block_until_ready(mm(a, a))
      best = min(best, time.perf_counter() - t)
    out[f'matmul_{name}_flops'] = 2 * size ** 3 / best
  elems = (32 if on_cpu else 512) * 2 ** 20
  x = jnp.ones((elems,), jnp.float32)
  step = jax.jit(lambda v: v * 1.0001 + 1.0)
  jax.block_until_ready(step(x))
  best = math.inf
  for _ in range(5 if on_cpu else 20):
    t = time.perf_counter()
    jax.block_until_ready(step(x))
    best = min(best, time.perf_counter() - t)
  out['memory_bytes_per_s'] = 2 * 4 * elems / best
  return out


# ----------------------------------------------------------------------------- configs


def make_config(name: str, args, on_cpu: bool):
  """The demo or paper config with this run's data sizes; returns (cfg, notes on shrinks)."""
  notes = []
  if name == 'demo':
    from configs import demo
    cfg = demo.get_config()
    defaults = dict(images=60, test_images=36, size=256, mlp_epochs=None, refine_iterations=0)
  elif name == 'paper':
    cfg = base_config()
    cfg.model.allow_random_init = True   # no WideResNet-101 weights ship with the package
    with cfg.unlocked():
      cfg.model.refine.allow_random_init = True
    notes.append('paper config: WideResNet-101-2 with RANDOM weights (allow_random_init=True; '
                 'no converted weights here): speed is representative, AUROCs are not')
    if on_cpu:  # refinement off: densenet161's train step alone compiles ~2 min on 2 cores
      defaults = dict(images=4, test_images=4, size=128, mlp_epochs=1, refine_iterations=0)
    else:
      defaults = dict(images=200, test_images=100, size=480, mlp_epochs=None,
                      refine_iterations=200)
  else:
    raise ValueError(f'unknown config {name!r}: use demo or paper')
  size = args.size or defaults['size']
  images = args.images or defaults['images']
  test_images = args.test_images or defaults['test_images']
  epochs = args.mlp_epochs if args.mlp_epochs is not None else defaults['mlp_epochs']
  iters = (args.refine_iterations if args.refine_iterations is not None
           else defaults['refine_iterations'])
  cfg.data.name = 'mvtec'
  cfg.data.resize = cfg.data.crop = size
  if args.batch_size:
    cfg.data.batch_size = args.batch_size
  if epochs is not None:
    cfg.model.neighborhood.epochs = epochs
  if args.precision:
    cfg.model.precision = args.precision
  if args.coreset_chunk:
    cfg.model.coreset.chunk_size = args.coreset_chunk
  cfg.model.refine.iterations = iters
  cfg.model.refine.checkpoint_every = max(iters, 1)
  if on_cpu and name == 'paper':
    cfg.model.refine.input_size = min(int(cfg.model.refine.input_size), size)
  paper = base_config()
  if on_cpu and name == 'paper':
    notes.append(f'shrunk for CPU: {images} train / {test_images} test images at {size} px '
                 f'(paper: 200+ / 100+ at 480), MLP epochs {cfg.model.neighborhood.epochs} '
                 f'(paper {paper.model.neighborhood.epochs}), refinement '
                 + (f'{iters} iterations at {cfg.model.refine.input_size} px' if iters else
                    'not timed (--refine-iterations N to time it; measured here: 2 iterations '
                    'at 128 px took 242 s, 118 s of it compiling)')
                 + f' (paper {paper.model.refine.iterations} at {paper.model.refine.input_size} px)')
  elif iters != paper.model.refine.iterations and cfg.model.use_refinement:
    notes.append(f'refinement: {iters} iterations timed (paper {paper.model.refine.iterations}; '
                 'the per-iteration time scales linearly)')
  return cfg, dict(images=images, test_images=test_images, size=size), notes


def load_data(cfg, root: str, sizes: dict):
  """Generates the set (idempotent) and decodes it with the project's input pipeline (tf.data,
  or without TensorFlow the same preprocessing image by image)."""
  n_def = sizes['test_images'] * 2 // 3
  data_lib.generate(root, seed=0, image_size=sizes['size'], num_train=sizes['images'],
                    num_test_good=sizes['test_images'] - n_def, num_test_defect=n_def,
                    categories=[CATEGORY])
  with cfg.unlocked():
    cfg.data.root = root
    cfg.data.categories = (CATEGORY,)

  def read(split, masks):
    batches = list(data_lib.batches(split, cfg.data, with_masks=masks))  # TF optional
    out = {'image': np.concatenate([b['image'] for b in batches]).astype(np.float32)}
    if masks:
      out['mask'] = np.concatenate([b['mask'] for b in batches]) > 0.5
      out['label'] = np.concatenate([b['label'] for b in batches]).astype(np.int32)
    return out

  train = read(data_lib.load_split(cfg.data, CATEGORY, 'train'), False)
  test = read(data_lib.load_split(cfg.data, CATEGORY, 'test'), True)
  return train, test


def _batches(images: np.ndarray, batch_size: int):
  return [{'image': images[i:i + batch_size]} for i in range(0, len(images), batch_size)]


def _mlp_macs(in_dim: int, layers: int, width: int, classes: int) -> int:
  dims = [in_dim] + [width] * (layers - 1) + [classes]
  return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


# ----------------------------------------------------------------------------- the stages


def run_config(name: str, args, root: str, mesh, clock: CompileClock, on_cpu: bool) -> dict:
  cfg, sizes, notes = make_config(name, args, on_cpu)
  for note in notes:
    print(f'  note: {note}')
  rows = []
  with stage(rows, 'data (generate + decode)', clock) as row:
    train, test = load_data(cfg, os.path.join(root, name), sizes)
    row['images'] = int(train['image'].shape[0] + test['image'].shape[0])
  m = cfg.model
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[m.precision]
  fn, variables = features.make_feature_fn(m, key=jax.random.key(cfg.seed))
  batch = int(cfg.data.batch_size)
  per_call = sharding.padded_size(batch, sharding.num_shards(mesh))
  crop = int(cfg.data.crop)
  shape = jax.eval_shape(fn, variables, jax.ShapeDtypeStruct((per_call, crop, crop, 3),
                                                             jnp.float32))
  _, h, w, d = shape.shape
  n = train['image'].shape[0]
  key = jax.random.key(cfg.seed)
  k_proj, k_core, k_mlp = jax.random.split(key, 3)
  p = int(m.coreset.projection_dim)
  proj = coreset.random_projection(k_proj, d, p) if p > 0 else None
  feat_flops = _flops_of(fn, variables, jax.ShapeDtypeStruct((per_call, crop, crop, 3),
                                                             jnp.float32))
  calls = -(-n // batch)
  result = dict(config=name, notes=notes, sizes=sizes, grid=[h, w], dim=d,
                precision=m.precision, devices=sharding.num_shards(mesh), stages=rows)
  with tempfile.TemporaryDirectory() as scratch, \
       FeatureStore((n, h, w, d), cap_bytes=int(cfg.memory.feature_cap_mb * 2 ** 20),
                    scratch_dir=scratch) as store:
    with stage(rows, 'features', clock, kind='flops') as row:
      projected = fit.extract_features(fn, variables, _batches(train['image'], batch), n, batch,
                                       store, proj, mesh=mesh)
      row['work'] = feat_flops * calls + 2.0 * n * h * w * d * max(p, 0)
      row['per_image_ms'] = None
    with stage(rows, 'coreset', clock, kind='bytes') as row:
      core = fit.select_coreset(projected, store, m.coreset, k_core, mesh=mesh)
      picks = core['c_emb'].shape[0]
      rows_total = sharding.padded_size(projected.shape[0], sharding.num_shards(mesh))
      row['work'] = float(picks) * rows_total * (projected.shape[1] * 4 + 3 * 4)
      row['picks'] = picks
    del projected
    k = int(core['num_dist'])
    sc = m.scoring
    with stage(rows, 'nearest codes', clock, kind='flops') as row:
      codes = fit.nearest_codes(store, core['c_emb'][:k], images_per_chunk=batch,
                                query_tile=int(sc.query_tile), bank_tile=int(sc.bank_tile),
                                mesh=mesh)
      row['work'] = 2.0 * n * h * w * k * d
    with stage(rows, 'histograms', clock, kind='bytes') as row:
      position = position_lib.position_histogram(codes, k, int(m.position.window), batch=batch)
      row['work'] = float(codes.nbytes + position.nbytes)
    nb_cfg = m.neighborhood
    cap_mb = float(cfg.memory.get('device_feature_cap_mb', 0) or 0)
    with stage(rows, 'MLP training', clock, kind='flops') as row:
      mlp, hist = neighborhood.train_mlp(
          store.array, codes, nb_cfg, k_mlp, num_classes=k, dtype=dtype, mesh=mesh,
          device_cap_bytes=int(cap_mb * 2 ** 20) or None, log_fn=lambda msg: None)
      in_dim = (int(nb_cfg.window) ** 2 - 1) * d
      samples = int(nb_cfg.epochs) * hist['steps_per_epoch'] * hist['batch_size']
      row['work'] = 6.0 * samples * _mlp_macs(in_dim, int(nb_cfg.num_layers), int(nb_cfg.width),
                                              k)
      row['samples'] = samples
      row['peak'] = 'bfloat16' if m.precision == 'bfloat16' else 'float32'
  arrays = {'c_emb': jnp.asarray(core['c_emb']), 'emb_to_dist': jnp.asarray(core['emb_to_dist']),
            'position': jnp.asarray(position), 'mlp': jax.tree.map(jnp.asarray, mlp),
            'refine': None}
  arrays = sharding.replicate(arrays, mesh)
  variant = infer.Variant(True, True)
  scorer = sharding.data_parallel(infer.make_scorer(m, variant, (crop, crop)), mesh, (1,))
  baseline = sharding.data_parallel(infer.make_scorer(m, infer.Variant(), (crop, crop)), mesh,
                                    (1,))

  def amaps(images):
    feats = fn(variables, sharding.shard_rows(sharding.pad_rows(images, per_call)[0], mesh))
    return scorer(arrays, feats)['maps'][:images.shape[0]]

  if m.use_refinement and int(m.refine.iterations) > 0:
    with stage(rows, 'refinement training', clock, kind='time') as row:
      try:
        from pni_jax import refine
        _, _, rhist = refine.train_refiner(train['image'], amaps, m.refine,
                                           jax.random.key(cfg.seed + 7), log_fn=lambda msg: None,
                                           dtype=dtype)
        row['iterations'] = int(m.refine.iterations)
        row['loop_seconds'] = float(sum(rhist.get('interval_seconds', [])))
        row['work'] = None
      except Exception as e:  # pylint: disable=broad-except  (another room, still moving)
        row['skipped'] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
        print(f'  refinement skipped: {row["skipped"]}')
  # Inference: one warm-up batch (compiles), then the test set timed per batch.
  test_images = test['image']
  warm = sharding.pad_rows(test_images[:batch], per_call)[0]
  jax.block_until_ready(scorer(arrays, fn(variables, sharding.shard_rows(warm, mesh))))
  jax.block_until_ready(baseline(arrays, fn(variables, sharding.shard_rows(warm, mesh))))
  feat_spec = jax.ShapeDtypeStruct((per_call, h, w, d), jnp.float32)
  score_flops = _flops_of(infer.make_scorer(m, variant, (crop, crop)), arrays, feat_spec)
  base_flops = _flops_of(infer.make_scorer(m, infer.Variant(), (crop, crop)), arrays, feat_spec)
  maps, image_scores, base_maps, base_scores = [], [], [], []
  with stage(rows, 'inference (N+P)', clock, kind='flops') as row:
    for i in range(0, len(test_images), batch):
      chunk = test_images[i:i + batch]
      x = sharding.shard_rows(sharding.pad_rows(chunk, per_call)[0], mesh)
      out = scorer(arrays, fn(variables, x))
      maps.append(np.asarray(out['maps'])[:len(chunk)])
      image_scores.append(np.asarray(out['image'])[:len(chunk)])
    row['work'] = (feat_flops + score_flops) * -(-len(test_images) // batch)
    row['images'] = len(test_images)
  rows[-1]['per_image_ms'] = 1e3 * rows[-1]['seconds'] / len(test_images)
  with stage(rows, 'inference (baseline)', clock, kind='flops') as row:
    for i in range(0, len(test_images), batch):
      chunk = test_images[i:i + batch]
      x = sharding.shard_rows(sharding.pad_rows(chunk, per_call)[0], mesh)
      out = baseline(arrays, fn(variables, x))
      base_maps.append(np.asarray(out['maps'])[:len(chunk)])
      base_scores.append(np.asarray(out['image'])[:len(chunk)])
    row['work'] = (feat_flops + base_flops) * -(-len(test_images) // batch)
    row['images'] = len(test_images)
  rows[-1]['per_image_ms'] = 1e3 * rows[-1]['seconds'] / len(test_images)
  labels, masks = test['label'], test['mask']
  result['auroc'] = {
      'N+P': dict(image=metrics.auroc(np.concatenate(image_scores), labels),
                  pixel=metrics.pixel_auroc(np.concatenate(maps), masks)),
      'baseline': dict(image=metrics.auroc(np.concatenate(base_scores), labels),
                       pixel=metrics.pixel_auroc(np.concatenate(base_maps), masks))}
  result['mlp'] = dict(num_train=hist['num_train'], val_accuracy=hist['val_accuracy'][-1]
                       if hist['val_accuracy'] else None, images_per_group=hist['images_per_group'])
  result['peak_device_bytes'] = sharding.peak_memory_bytes(mesh)
  return result


# ----------------------------------------------------------------------------- reports


def _rate(row: dict, peaks: dict, devices: int) -> tuple[str, str, str]:
  """(work, achieved rate, fraction of the peak of one device times the device count)."""
  work = row.get('work')
  steady = max(row['seconds'] - row['compile_seconds'], 1e-9)
  if not work or (isinstance(work, float) and math.isnan(work)):
    return '-', '-', '-'
  if row.get('kind') == 'bytes':
    rate = work / steady
    return (f'{work / 1e9:.3g} GB', f'{rate / 1e9:.3g} GB/s',
            f'{100 * rate / (devices * peaks["memory_bytes_per_s"]):.1f}%')
  rate = work / steady
  peak = peaks[f'matmul_{row.get("peak", "float32")}_flops']
  return (f'{work / 1e9:.3g} GFLOP', f'{rate / 1e9:.3g} GFLOP/s',
          f'{100 * rate / (devices * peak):.1f}%')


def markdown(results: list[dict], peaks: dict, device: str) -> str:
  lines = [f'# pni-jax end-to-end benchmark\n', f'Device: {device}. Peaks measured in this run: '
           f'matmul float32 {peaks["matmul_float32_flops"] / 1e9:.3g} GFLOP/s, bfloat16 '
           f'{peaks["matmul_bfloat16_flops"] / 1e9:.3g} GFLOP/s; elementwise '
           f'{peaks["memory_bytes_per_s"] / 1e9:.3g} GB/s (a DRAM-sized pass: memory-bound stages '
           f'whose working set fits in cache can exceed it). "achieved" divides the work by the '
           f'wall time minus the compile time.\n']
  for res in results:
    s = res['sizes']
    lines.append(f'## {res["config"]}: {s["images"]} train / {s["test_images"]} test images at '
                 f'{s["size"]} px, grid {res["grid"][0]}x{res["grid"][1]}, d = {res["dim"]}, '
                 f'{res["precision"]}, {res["devices"]} device(s)\n')
    for note in res['notes']:
      lines.append(f'- {note}')
    lines.append('\n| stage | wall s | compile s | work | achieved (excl. compile) | of peak |'
                 ' note |')
    lines.append('|---|---|---|---|---|---|---|')
    for row in res['stages']:
      work, rate, frac = _rate(row, peaks, res['devices'])
      note = row.get('skipped', '')
      if row.get('per_image_ms') is not None:
        note = f'{row["per_image_ms"]:.1f} ms / image (compiled beforehand)'
      if 'picks' in row:
        note = f'{row["picks"]} picks'
      if 'samples' in row:
        note = f'{row["samples"]} samples'
      if 'iterations' in row:
        note = (f'{row["iterations"]} iterations: training loop {row["loop_seconds"]:.1f} s '
                f'({1e3 * row["loop_seconds"] / max(row["iterations"], 1):.0f} ms / iteration '
                'incl. the train-step compile), the rest is encoder init and the synthetic '
                'calibration maps')
      lines.append(f'| {row["stage"]} | {row["seconds"]:.2f} | {row["compile_seconds"]:.2f} | '
                   f'{work} | {rate} | {frac} | {note} |')
    a = res['auroc']
    lines.append(f'\nAUROC image / pixel: N+P {a["N+P"]["image"]:.3f} / {a["N+P"]["pixel"]:.3f}, '
                 f'baseline {a["baseline"]["image"]:.3f} / {a["baseline"]["pixel"]:.3f}. '
                 f'Peak device memory: '
                 + (f'{res["peak_device_bytes"] / 2 ** 30:.2f} GiB' if res['peak_device_bytes']
                    else 'n/a (no memory stats on this backend)') + '\n')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- peer


def anomalib_missing() -> str | None:
  """None when anomalib's PatchCore can be imported, else the reason."""
  try:
    from anomalib.data import MVTecAD  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from anomalib.engine import Engine  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from anomalib.models import Patchcore  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return str(e)
  return None


def run_peer(args, root: str, results: list[dict]) -> int:
  """anomalib PatchCore on the same images; prints time and AUROC ratios against ours."""
  from anomalib.data import MVTecAD  # pylint: disable=g-import-not-at-top
  from anomalib.engine import Engine  # pylint: disable=g-import-not-at-top
  from anomalib.models import Patchcore  # pylint: disable=g-import-not-at-top
  for res in results:
    cfg, sizes, _ = make_config(res['config'], args, jax.default_backend() == 'cpu')
    m = cfg.model
    ours = sum(r['seconds'] for r in res['stages']
               if r['stage'] in ('features', 'coreset', 'inference (baseline)'))
    t0 = time.perf_counter()
    try:
      model = Patchcore(backbone=m.backbone, layers=list(m.layers),
                        pre_trained=not m.allow_random_init,
                        coreset_sampling_ratio=float(m.coreset.ratio), num_neighbors=9,
                        pre_processor=Patchcore.configure_pre_processor(
                            image_size=(sizes['size'], sizes['size'])))
      datamodule = MVTecAD(root=os.path.join(root, res['config']), category=CATEGORY,
                           train_batch_size=int(cfg.data.batch_size),
                           eval_batch_size=int(cfg.data.batch_size), num_workers=0)
      engine = Engine(max_epochs=1, logger=False, enable_checkpointing=False)
      engine.fit(model=model, datamodule=datamodule)
      test_results = engine.test(model=model, datamodule=datamodule)[0]
    except Exception as e:  # pylint: disable=broad-except
      print(f'peer ({res["config"]}): anomalib PatchCore failed: {type(e).__name__}: {e}')
      continue
    theirs = time.perf_counter() - t0
    a = res['auroc']['baseline']
    img, pix = test_results.get('image_AUROC'), test_results.get('pixel_AUROC')
    print(f'peer ({res["config"]}): anomalib PatchCore {theirs:.1f} s (fit + test), ours '
          f'{ours:.1f} s (features + coreset + baseline inference): time ratio '
          f'{theirs / ours:.2f}x; image AUROC {img} vs {a["image"]:.3f}, pixel AUROC {pix} vs '
          f'{a["pixel"]:.3f}' + (f'; AUROC ratios {a["image"] / img:.3f} / {a["pixel"] / pix:.3f}'
                                  if img and pix else ''))
  return 0


# ----------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='benchmark.py e2e', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('mode', nargs='?', default='run', choices=('run', 'peer'))
  parser.add_argument('--configs', default='demo,paper', help='comma list of demo, paper')
  parser.add_argument('--images', type=int, default=0, help='training images (0: per config)')
  parser.add_argument('--test-images', type=int, default=0, help='test images (0: per config)')
  parser.add_argument('--size', type=int, default=0, help='image / crop size (0: per config)')
  parser.add_argument('--batch-size', type=int, default=0, help='images per batch (0: config)')
  parser.add_argument('--mlp-epochs', type=int, default=None)
  parser.add_argument('--refine-iterations', type=int, default=None)
  parser.add_argument('--precision', choices=('float32', 'bfloat16'), default=None)
  parser.add_argument('--coreset-chunk', type=int, default=0,
                      help='rows per coreset tile (0: config; large values suit GPUs)')
  parser.add_argument('--categories', type=int, default=0,
                      help='also run the batch-job measurement (tools/bench_batch.py): the real '
                           'CLI over N generated categories of different sizes, cold and warm '
                           'compilation cache (0: skip)')
  parser.add_argument('--data-root', default='', help='where the generated sets go (default tmp)')
  parser.add_argument('--out', default='runs/bench_e2e', help='folder for e2e.json / e2e.md')
  args = parser.parse_args(argv)

  if args.mode == 'peer':
    missing = anomalib_missing()
    if missing:
      print(f'peer: anomalib is not installed ({missing}); skipping the PatchCore comparison. '
            'Install the optional extra with `pip install anomalib` (it pulls torch) to run it.')
      return 0
  on_cpu = jax.default_backend() == 'cpu'
  mesh = sharding.make_mesh()
  device = (f'{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), '
            f'{os.cpu_count()} CPU cores, {platform.node()}')
  print(f'device: {device}')
  peaks = measure_peaks(on_cpu)
  print('peaks: ' + ', '.join(f'{k} {v / 1e9:.3g} G' for k, v in peaks.items()))
  clock = CompileClock()
  results = []
  root_ctx = (contextlib.nullcontext(args.data_root) if args.data_root
              else tempfile.TemporaryDirectory(prefix='pni-bench-'))
  with root_ctx as root:
    for name in [c.strip() for c in args.configs.split(',') if c.strip()]:
      print(f'config {name}:')
      results.append(run_config(name, args, root, mesh, clock, on_cpu))
    if args.mode == 'peer':
      run_peer(args, root, results)
  clock.close()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report = dict(device=device, peaks=peaks, results=results, argv=argv,
                jax=jax.__version__, python=sys.version.split()[0])
  (out / 'e2e.json').write_text(json.dumps(report, indent=1, default=str))
  text = markdown(results, peaks, device)
  (out / 'e2e.md').write_text(text)
  print(text)
  print(f'written: {out / "e2e.json"}, {out / "e2e.md"}')
  if args.categories:
    import bench_batch  # pylint: disable=g-import-not-at-top  (tools/ is on sys.path)
    for name in [c.strip() for c in args.configs.split(',') if c.strip()]:
      batch_args = ['--config', name, '--categories', str(args.categories),
                    '--out', str(out / f'batch-{name}')]
      for flag, value in (('--images', args.images), ('--test-images', args.test_images),
                          ('--size', args.size), ('--mlp-epochs', args.mlp_epochs),
                          ('--refine-iterations', args.refine_iterations),
                          ('--precision', args.precision)):
        if value or (value == 0 and flag in ('--mlp-epochs', '--refine-iterations')):
          batch_args += [flag, str(value)]   # '--refine-iterations 0' = refinement off
      bench_batch.main(batch_args)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
