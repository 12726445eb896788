"""Refinement network figures: `python tools/benchmark.py refine [options]`.

For each input size: the XLA compile time and the steady time of one `train_step` (augmentation,
forward, backward, Adam; batch `--batch`), the time of one `fuse` call on a batch of full-size maps
(the network at the input size plus the resizes), and the projected time of a refinement training
of `--iterations` steps (compile + steps; the pool's A_hat calls are the caller's model and come on
top). Random weights are used for encoders without embedded ones (timing only).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import backbones
from pni_jax import refine


def _timed(fn, repeats: int) -> float:
  out = fn()
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeats


def bench(encoder: str, size: int, batch: int, image_size: int, steps: int, iterations: int,
          augment: bool) -> dict:
  pretrained = backbones.spec(encoder).embedded_weights
  t = time.perf_counter()
  variables = refine.init_variables(encoder, jax.random.key(0), pretrained=pretrained)
  t_init = time.perf_counter() - t
  device = jax.devices()[0]
  state = jax.device_put(refine.create_train_state(variables, encoder, 'reg_grad', 1e-4,
                                                   augment=augment), device)
  rng = np.random.default_rng(0)
  data = {'image': rng.uniform(size=(batch, size, size, 3)).astype(np.float32),
          'amap': rng.uniform(size=(batch, size, size)).astype(np.float32),
          'mask': (rng.uniform(size=(batch, size, size)) > 0.9).astype(np.float32)}
  data = jax.device_put(data, device)
  key = jax.device_put(jax.random.key(1), device)
  t = time.perf_counter()
  compiled = refine.train_step.lower(state, data, key).compile()
  t_compile = time.perf_counter() - t
  holder = {'state': state}

  def step():
    holder['state'], m = compiled(holder['state'], data, key)
    return holder['state'].params

  t_step = _timed(step, steps)
  full_img = jnp.asarray(rng.uniform(size=(batch, image_size, image_size, 3)), jnp.float32)
  full_map = jnp.asarray(rng.uniform(size=(batch, image_size, image_size)), jnp.float32)
  fuse = lambda: refine.fuse(variables, full_img, full_map, 0.0, 1.0, 0.1, size, encoder)
  t = time.perf_counter()
  jax.block_until_ready(fuse())
  t_fuse_compile = time.perf_counter() - t
  t_fuse = _timed(fuse, steps)
  return dict(encoder=encoder, size=size, init_s=t_init, compile_s=t_compile, step_s=t_step,
              fuse_compile_s=t_fuse_compile, fuse_s=t_fuse,
              train_s=t_compile + iterations * t_step)


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog='benchmark.py refine', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--encoder', default='efficientnet_lite0', choices=backbones.names())
  p.add_argument('--sizes', default='96,128,160', help='comma-separated input sizes')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--image_size', type=int, default=256, help='full map size for fuse')
  p.add_argument('--steps', type=int, default=5, help='timed repeats')
  p.add_argument('--iterations', type=int, default=200, help='for the projected training time')
  p.add_argument('--no_augment', action='store_true')
  a = p.parse_args(argv)
  print(f'backend {jax.default_backend()}, {jax.device_count()} device(s), batch {a.batch}, '
        f'encoder {a.encoder}')
  print(f'{"size":>5} {"init s":>7} {"compile s":>10} {"step s":>7} {"img/s":>7} '
        f'{"fuse compile s":>15} {"fuse s":>7} {"train s (" + str(a.iterations) + " it)":>18}')
  for size in (int(s) for s in a.sizes.split(',')):
    r = bench(a.encoder, size, a.batch, a.image_size, a.steps, a.iterations, not a.no_augment)
    print(f'{size:>5} {r["init_s"]:>7.1f} {r["compile_s"]:>10.1f} {r["step_s"]:>7.3f} '
          f'{a.batch / r["step_s"]:>7.1f} {r["fuse_compile_s"]:>15.1f} {r["fuse_s"]:>7.3f} '
          f'{r["train_s"]:>18.1f}', flush=True)
  return 0
