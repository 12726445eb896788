"""Portable artifact: export time, size and per-image latency against the in-process path.

python tools/benchmark.py export --cat_dir=RUN/CATEGORY --out=/tmp/artifact [--reps=5]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def _median_seconds(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main(argv) -> int:
  from pni_jax import export, infer, model as model_lib

  ap = argparse.ArgumentParser(prog='benchmark.py export', description=__doc__)
  ap.add_argument('--cat_dir', required=True, help='a fitted category folder: RUN/CATEGORY')
  ap.add_argument('--out', required=True, help='where to write the artifact')
  ap.add_argument('--reps', type=int, default=5)
  args = ap.parse_args(argv)
  cat_dir, out = pathlib.Path(args.cat_dir), pathlib.Path(args.out)

  meta = export.export_model(cat_dir, out)
  sizes = meta['sizes']
  print(f"export {meta['export_seconds']:.1f} s; sizes MiB: "
        + ', '.join(f'{k} {v / 2 ** 20:.2f}' for k, v in sizes.items())
        + f'; total {sum(sizes.values()) / 2 ** 20:.2f} MiB')

  fitted = model_lib.load(cat_dir / 'model')
  cfg = ml_collections.ConfigDict(fitted.meta['config'])
  ext = infer.make_extractor(cfg)
  s = int(cfg.data.crop)
  scorer = infer.make_scorer(cfg.model, infer.variant_from_config(cfg.model), (s, s))
  arrays = model_lib.arrays(fitted)
  bs = ext.batch_size
  x = np.random.default_rng(0).uniform(size=(bs, s, s, 3)).astype(np.float32)

  def in_process(batch):
    return scorer(arrays, ext.fn(ext.variables, jnp.asarray(batch)))

  t = time.perf_counter()
  ref = jax.block_until_ready(in_process(x))
  compile_in = time.perf_counter() - t
  t = time.perf_counter()
  artifact = export.load_artifact(out)
  load_s = time.perf_counter() - t
  t = time.perf_counter()
  got = artifact(x)
  compile_art = time.perf_counter() - t
  print(f'first call (compile): in-process {compile_in:.1f} s; artifact load {load_s:.2f} s + '
        f'{compile_art:.1f} s')
  print(f"max |maps diff| {np.abs(got['maps'] - np.asarray(ref['maps'])).max():.2e}, "
        f"max |image diff| {np.abs(got['image'] - np.asarray(ref['image'])).max():.2e}")
  t_in = _median_seconds(lambda: in_process(x), args.reps)
  t_art = _median_seconds(lambda: artifact(x), args.reps)
  print(f'batch {bs}: in-process {1e3 * t_in / bs:.0f} ms/img, artifact {1e3 * t_art / bs:.0f} '
        'ms/img')
  artifact(x[:1])
  t_one = _median_seconds(lambda: artifact(x[:1]), args.reps)
  print(f'batch 1: artifact {1e3 * t_one:.0f} ms/img')
  return 0
