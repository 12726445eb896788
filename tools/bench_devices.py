"""Host-device figures: `python tools/benchmark.py devices [--devices 1,4] [--steps N] [options]`.

Runs the neighbourhood MLP's data-parallel `train_step` (demo size by default: 5 x 5 window,
d = 128, 3 layers x 512, K = 512, batch 256) on D simulated CPU devices
(`--xla_force_host_platform_device_count=D`), one subprocess per D, one after the other, and prints
ms per step and the ratio to the first D. Steps are dispatched without waiting, as in
`train_mlp`, so more than XLA:CPU's 32 computations per device queue up; each subprocess first
calls `sharding.configure_host_threads` as `pni_jax.main` does (`--no-configure` skips it, to see
the deadlock it prevents: XLA aborts after 40 s on a host with fewer than 2 D CPUs).

Simulated devices share the host's cores: they test the parallel code, they do not speed it up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _child(a) -> None:
  """One measurement in this process (XLA_FLAGS already set by the parent)."""
  from pni_jax import sharding
  line = sharding.configure_host_threads(os.environ) if a.configure else None
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pni_jax import neighborhood as nb
  from pni_jax.config import base_config

  cfg = base_config().model.neighborhood
  cfg.num_layers, cfg.width, cfg.window, cfg.batch_size = a.layers, a.width, a.window, a.batch
  mesh = sharding.make_mesh()
  key = jax.random.key(0)
  feats = sharding.replicate(jax.random.normal(key, (a.images, a.grid, a.grid, a.dim)), mesh)
  in_dim = (a.window ** 2 - 1) * a.dim
  state = sharding.replicate(
      nb.create_train_state(key, cfg, in_dim, a.classes, steps_per_epoch=1000), mesh)
  rng = np.random.default_rng(0)
  highs = {'img': a.images, 'row': a.grid, 'col': a.grid, 'target': a.classes}
  batches = [{k: rng.integers(0, high, a.batch).astype(np.int32) for k, high in highs.items()}
             for _ in range(a.steps + 1)]
  keys = [jax.random.key(i) for i in range(a.steps + 1)]
  state, _ = nb.train_step(state, feats, sharding.shard_batch(batches[0], mesh), keys[0])
  jax.block_until_ready(state.params)                                    # compiled
  t = time.perf_counter()
  for b, k in zip(batches[1:], keys[1:]):
    state, _ = nb.train_step(state, feats, sharding.shard_batch(b, mesh), k)
  jax.block_until_ready(state.params)
  ms = (time.perf_counter() - t) / a.steps * 1e3
  print(f'RESULT {jax.device_count()} {ms:.2f} {os.environ.get("PJRT_NPROC", "-")} '
        f'{"(" + line + ")" if line else ""}', flush=True)


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog='benchmark.py devices', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--devices', default='1,4', help='comma-separated device counts')
  p.add_argument('--steps', type=int, default=100, help='timed steps (default 100 > 32 queued)')
  p.add_argument('--no-configure', dest='configure', action='store_false')
  p.add_argument('--dim', type=int, default=128)
  p.add_argument('--window', type=int, default=5)
  p.add_argument('--layers', type=int, default=3)
  p.add_argument('--width', type=int, default=512)
  p.add_argument('--classes', type=int, default=512)
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--images', type=int, default=16)
  p.add_argument('--grid', type=int, default=32)
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    _child(a)
    return 0
  from pni_jax import sharding
  print(f'host: {sharding.host_cpu_count(os.environ)} CPU(s) (shared machines: compare ratios only); '
        f'MLP {a.layers} x {a.width}, inputs {(a.window ** 2 - 1) * a.dim}, K {a.classes}, '
        f'batch {a.batch}, {a.steps} steps queued')
  first = None
  for d in [int(x) for x in a.devices.split(',')]:
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} '
                         f'--xla_force_host_platform_device_count={d}')
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'benchmark.py')
    args = [sys.executable, script, 'devices', '--child'] + [x for x in argv if x != '--child']
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    result = [line for line in proc.stdout.splitlines() if line.startswith('RESULT')]
    if proc.returncode or not result:
      tail = [line for line in proc.stderr.splitlines() if not line.startswith('    @')][-3:]
      print(f'{d} device(s): failed (exit {proc.returncode}): ' + ' | '.join(tail))
      continue
    _, count, ms, threads = result[0].split()[:4]
    first = first or float(ms)
    print(f'{int(count)} device(s): {float(ms):8.1f} ms/step  x{float(ms) / first:.2f}  '
          f'(PJRT_NPROC {threads})')
  return 0
