"""Backbone feature-extraction throughput: images/s and achieved GFLOP/s.

  python tools/benchmark.py backbone [--archs resnet18 efficientnet_lite0] [--sizes 224 480]
      [--batches 1 8] [--taps layer2 layer3] [--dtype float32|bfloat16|both] [--repeats 3]

Times the jitted pure extractor (preprocess + backbone up to the deepest tap, the PNI default
taps layer2 + layer3) on random weights (speed does not depend on the values). FLOPs come from
XLA's cost_analysis() of the compiled function (2 per multiply-add, all ops counted), so
GFLOP/s = flops / median wall time of one call. Compile time is reported separately.
`--max-gflop` skips configurations whose single call would exceed that many GFLOP (useful on
small CPUs); skipped rows are printed as such.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import backbones


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def bench_one(name: str, variables, size: int, batch: int, taps, dtype, repeats: int,
              max_gflop: float) -> dict:
  """Compiles and times one (arch, size, batch) configuration."""
  fn = jax.jit(backbones.extractor(name, taps=taps, dtype=dtype))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), jnp.float32)
  start = time.perf_counter()
  compiled = fn.lower(variables, x).compile()
  compile_s = time.perf_counter() - start
  flops = _flops(compiled)
  row = dict(arch=name, size=size, batch=batch, gflop=flops / 1e9, compile_s=compile_s)
  if max_gflop and flops / 1e9 > max_gflop:
    row['skipped'] = f'> --max-gflop {max_gflop:g}'
    return row
  jax.block_until_ready(compiled(variables, x))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, x))
    times.append(time.perf_counter() - start)
  t = float(np.median(times))
  row.update(seconds=t, images_per_s=batch / t, gflop_per_s=flops / t / 1e9)
  return row


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--archs', nargs='+', default=list(backbones.names()),
                      choices=backbones.names())
  parser.add_argument('--sizes', nargs='+', type=int, default=[224, 480])
  parser.add_argument('--batches', nargs='+', type=int, default=[1, 8])
  parser.add_argument('--taps', nargs='+', default=list(backbones.DEFAULT_TAPS))
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'both'],
                      help="'both': each configuration in float32 and bfloat16, and the speed-up")
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--max-gflop', type=float, default=0.0,
                      help='skip configurations above this many GFLOP per call (0 = none)')
  args = parser.parse_args(argv)
  dtypes = ([jnp.float32, jnp.bfloat16] if args.dtype == 'both'
            else [jnp.dtype(args.dtype)])
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), dtype {args.dtype}, '
        f'taps {",".join(args.taps)}; FLOPs from XLA cost_analysis; random weights')
  print(f'{"arch":<18} {"size":>4} {"batch":>5} {"GFLOP":>8} {"compile s":>9} '
        f'{"s/call":>8} {"img/s":>8} {"GFLOP/s":>8}')
  for name in args.archs:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # random init warns that features are not pretrained
      variables = backbones.load_variables(name, allow_random_init=True)
    for size in args.sizes:
      for batch in args.batches:
        seconds = {}
        for dt in dtypes:
          r = bench_one(name, variables, size, batch, tuple(args.taps), dt, args.repeats,
                        args.max_gflop)
          head = (f'{name:<18} {size:>4} {batch:>5} {r["gflop"]:>8.1f} {r["compile_s"]:>9.1f}'
                  + (f' {jnp.dtype(dt).name:>9}' if len(dtypes) > 1 else ''))
          if 'skipped' in r:
            print(f'{head}   skipped ({r["skipped"]})', flush=True)
            continue
          seconds[jnp.dtype(dt).name] = r['seconds']
          print(f'{head} {r["seconds"]:>8.3f} {r["images_per_s"]:>8.2f} '
                f'{r["gflop_per_s"]:>8.1f}', flush=True)
        if len(seconds) == 2:
          print(f'{"":<18} bfloat16 speed-up x{seconds["float32"] / seconds["bfloat16"]:.2f}',
                flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
