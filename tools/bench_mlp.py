"""Neighbourhood MLP figures: `python tools/benchmark.py mlp [throughput|confidence] [options]`.

throughput (default): training samples/s (one `train_step`: gather + forward + backward + Adam)
  and inference patches/s (`neighbor_logits`), with the achieved matmul GFLOP/s, for the demo-sized
  MLP and the paper-faithful one (d = 1024, p = 9 -> 81,920 inputs, 10 x 2048, K = 2048). On CPU
  the paper size runs only a couple of steps at a smaller batch (printed).

hlo: what the jitted training step computes, per precision, from its StableHLO and XLA's cost
  analysis: every matmul (dot_general) by operand / result dtype with its FLOPs, the converts, and
  FLOPs / bytes accessed per step. `--autodiff-dot` shows the step as it was before the custom
  VJP (bfloat16 forward, autodiff's float32 backward products). Runs on any backend without
  running the step; `--paper` for the paper-size MLP (slow to compile on CPU).

confidence: trains the MLP (`train_mlp`, `--bf16` for bfloat16) on a synthetic demo-sized task (smooth feature fields,
  targets = nearest of K greedy k-center codes) and reports validation accuracy, training time and
  how peaked the tempered softmax is on held-out maps: the fraction of the K classes with
  probability > tau = 1 / (2 K_emb), which decides whether PNI's threshold removes anything.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import compilation
from pni_jax import neighborhood as nb
from pni_jax import position
from pni_jax.config import base_config


def _matmul_macs(in_dim: int, num_layers: int, width: int, num_classes: int) -> tuple[int, int]:
  """(multiply-adds per sample of all Dense layers, of the first one)."""
  dims = [in_dim] + [width] * (num_layers - 1) + [num_classes]
  macs = [a * b for a, b in zip(dims[:-1], dims[1:])]
  return sum(macs), macs[0]


def _nb_config(layers: int, width: int, window: int, batch: int):
  cfg = base_config().model.neighborhood
  cfg.num_layers, cfg.width, cfg.window, cfg.batch_size = layers, width, window, batch
  return cfg


def _train_inputs(cfg, dim: int, classes: int, images: int, grid: int, batch: int, steps: int,
                  dtype):
  """(state, device maps, sample order for `steps` batches, grid) for `nb.train_step`."""
  key = jax.random.key(0)
  in_dim = (int(cfg.window) ** 2 - 1) * dim
  rng = np.random.default_rng(0)
  maps = {'feats': jax.random.normal(key, (images, grid, grid, dim), jnp.float32).astype(dtype),
          'targets': jnp.asarray(rng.integers(0, classes, (images, grid, grid)), jnp.int32),
          'slot': jnp.arange(images, dtype=jnp.int32)}
  order = jnp.asarray(rng.integers(0, images * grid * grid, steps * batch), jnp.int32)
  state = nb.create_train_state(key, cfg, in_dim, classes, steps_per_epoch=1000, dtype=dtype)
  return state, maps, order, nb._Grid(images, grid, grid, 0)


def throughput(name: str, *, dim: int, layers: int, width: int, classes: int, window: int,
               batch: int, steps: int, grid: int, images: int, infer_images: int, chunk: int,
               dtype) -> dict:
  cfg = _nb_config(layers, width, window, batch)
  in_dim = (window * window - 1) * dim
  key = jax.random.key(0)
  state, maps, order, grid_spec = _train_inputs(cfg, dim, classes, images, grid, batch, steps + 1,
                                                 dtype)
  step_args = dict(grid=grid_spec, batch_size=batch)
  t = time.perf_counter()
  state, m = nb.train_step(state, maps, order, 0, key, 0, **step_args)   # compile + 1 step
  jax.block_until_ready(state.params)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for i in range(1, steps + 1):   # one dispatch per step: the batch is built on the device
    state, m = nb.train_step(state, maps, order, i, key, i, **step_args)
  jax.block_until_ready(state.params)
  train_s = (time.perf_counter() - t) / steps
  macs, first = _matmul_macs(in_dim, layers, width, classes)
  train_flops = 2 * macs + 2 * macs + 2 * (macs - first)   # forward, weight grads, input grads

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  infer_feats = maps['feats'][:infer_images]
  jax.block_until_ready(nb.neighbor_logits(variables, infer_feats, window, chunk, dtype))
  t = time.perf_counter()
  jax.block_until_ready(nb.neighbor_logits(variables, infer_feats, window, chunk, dtype))
  infer_s = time.perf_counter() - t
  patches = infer_images * grid * grid
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(name=name, in_dim=in_dim, layers=layers, width=width, classes=classes, batch=batch,
              dtype=jnp.dtype(dtype).name, params_m=params / 1e6, steps=steps, compile_s=compile_s,
              train_samples_s=batch / train_s, train_gflops=batch * train_flops / train_s / 1e9,
              infer_patches_s=patches / infer_s, infer_gflops=patches * 2 * macs / infer_s / 1e9,
              infer_patches=patches)


def run_throughput(args) -> None:
  on_cpu = jax.default_backend() == 'cpu'
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), dtype '
        f'{jnp.dtype(dtype).name}')
  rows = []
  for dim in args.demo_dims:
    rows.append(throughput(
        f'demo d={dim}', dim=dim, layers=args.demo_layers, width=args.demo_width,
        classes=args.demo_classes, window=args.demo_window, batch=args.demo_batch,
        steps=args.steps, grid=32, images=8, infer_images=4, chunk=4096, dtype=dtype))
    print(_fmt(rows[-1]), flush=True)
  if not args.skip_paper:
    batch = args.paper_batch or (256 if on_cpu else 2048)
    steps = args.paper_steps or (2 if on_cpu else 20)
    if on_cpu:
      print(f'paper size on CPU: only {steps} timed steps at batch {batch} (paper: 2048) and '
            f'one 60 x 60 map for inference', flush=True)
    rows.append(throughput(
        'paper', dim=1024, layers=10, width=2048, classes=2048, window=9, batch=batch,
        steps=steps, grid=60, images=2, infer_images=1 if on_cpu else 8,
        chunk=1024 if on_cpu else 4096, dtype=dtype))
    print(_fmt(rows[-1]), flush=True)


def _fmt(r: dict) -> str:
  return (f"{r['name']:<12} in {r['in_dim']:>6} -> {r['layers']} x {r['width']} -> K {r['classes']}"
          f"  ({r['params_m']:.1f}M params, batch {r['batch']}, {r['steps']} steps, compile "
          f"{r['compile_s']:.1f}s)\n"
          f"   train {r['train_samples_s']:>10.0f} samples/s  {r['train_gflops']:>8.1f} GFLOP/s"
          f"   |   infer {r['infer_patches_s']:>10.0f} patches/s  {r['infer_gflops']:>8.1f} GFLOP/s"
          f" ({r['infer_patches']} patches)")


# ----------------------------------------------------------------------------- hlo


_DOT = re.compile(r'stablehlo\.dot_general .*: \(tensor<([\dx]+)x(\w+)>, tensor<([\dx]+)x(\w+)>\) '
                  r'-> tensor<([\dx]+)x(\w+)>')


def step_hlo(dim: int, layers: int, width: int, classes: int, window: int, batch: int,
             dtype) -> dict:
  """Matmuls of the jitted training step by dtype (from StableHLO) and XLA's cost analysis."""
  cfg = _nb_config(layers, width, window, batch)
  state, maps, order, grid_spec = _train_inputs(cfg, dim, classes, 1, window + 1, batch, 1, dtype)
  lowered = nb.train_step.lower(state, maps, order, 0, jax.random.key(0), 0, grid=grid_spec,
                                batch_size=batch)
  text = lowered.as_text()
  dots = {}
  for m in _DOT.finditer(text):
    a, ta, b, tb, o, to = m.groups()
    ka = [int(v) for v in a.split('x')]
    ko = [int(v) for v in o.split('x')]
    flops = 2 * np.prod(ko) * (np.prod(ka) * np.prod([int(v) for v in b.split('x')]) /
                               np.prod(ko)) ** 0.5
    key = f'{ta} x {tb} -> {to}'
    n, f = dots.get(key, (0, 0.0))
    dots[key] = (n + 1, f + flops)
  compiled = lowered.compile()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  compiled_dots = collections.Counter(compilation.dot_operand_types(compiled.as_text()))
  return dict(dtype=jnp.dtype(dtype).name, dots=dots, converts=text.count('stablehlo.convert'),
              flops=float(cost.get('flops', np.nan)),
              bytes=float(cost.get('bytes accessed', np.nan)), compiled_dots=compiled_dots)


def run_hlo(args) -> None:
  import functools  # pylint: disable=g-import-not-at-top
  if args.autodiff_dot:   # the step before the custom VJP: autodiff's backward products
    nb._dot_general_mixed = functools.partial(jax.lax.dot_general,
                                              preferred_element_type=jnp.float32)
  shape = (dict(dim=1024, layers=10, width=2048, classes=2048, window=9, batch=2048) if args.paper
           else dict(dim=args.dim, layers=args.layers, width=args.width, classes=args.classes,
                     window=args.window, batch=args.batch))
  print(f'train_step HLO, {shape}{"  (autodiff backward dots)" if args.autodiff_dot else ""}')
  for dtype in (jnp.float32, jnp.bfloat16):
    r = step_hlo(**shape, dtype=dtype)
    total = sum(f for _, f in r['dots'].values())
    print(f"{r['dtype']:>9}: {r['flops'] / 1e9:8.2f} GFLOP, {r['bytes'] / 1e9:7.3f} GB accessed "
          f'per step (XLA), {r["converts"]} converts; matmuls:')
    for k, (n, f) in sorted(r['dots'].items(), key=lambda kv: -kv[1][1]):
      print(f'           {n:3d} x {k:<32} {f / 1e9:8.2f} GFLOP ({100 * f / total:.0f}%)')
    print('           after XLA (operand types of the compiled dots; on CPU a bfloat16 product '
          'XLA could not\n           run in bfloat16 shows as f32 x f32): ' +
          ', '.join(f'{n} x {a} x {b}' for (a, b), n in sorted(r['compiled_dots'].items())))


# ----------------------------------------------------------------------------- confidence


def greedy_k_center(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
  """Indices of k greedy farthest-point picks of x `[N, d]` (the coreset rule), numpy."""
  rng = np.random.default_rng(seed)
  picks = [int(rng.integers(len(x)))]
  dist = np.linalg.norm(x - x[picks[0]], axis=1)
  for _ in range(k - 1):
    picks.append(int(dist.argmax()))
    dist = np.minimum(dist, np.linalg.norm(x - x[picks[-1]], axis=1))
  return np.asarray(picks)


def nearest(x: np.ndarray, codes: np.ndarray, chunk: int = 8192) -> np.ndarray:
  out = []
  cn = (codes ** 2).sum(1)
  for s in range(0, len(x), chunk):
    q = x[s:s + chunk]
    out.append(((q ** 2).sum(1)[:, None] - 2 * q @ codes.T + cn[None]).argmin(1))
  return np.concatenate(out).astype(np.int32)


def synthetic_maps(kind: str, num: int, grid: int, dim: int, seed: int) -> np.ndarray:
  """`[num, grid, grid, dim]` float32 smooth maps.

  'object': one smooth template per category, each image shifted by up to 1 cell and with
  smooth noise of 0.5 x the template's scale; 'texture': a stationary smooth random field.
  """
  import scipy.ndimage as ndi  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  def field(n, sigma):
    f = ndi.gaussian_filter(rng.normal(size=(n, grid + 4, grid + 4, dim)),
                            sigma=(0, sigma, sigma, 0))
    return f / f.std()
  if kind == 'texture':
    maps = field(num, 1.5)[:, 2:-2, 2:-2]
  else:
    template = np.random.default_rng(1234).normal(size=(1, grid + 4, grid + 4, dim))
    template = ndi.gaussian_filter(template, sigma=(0, 2.0, 2.0, 0))
    template /= template.std()
    noise = field(num, 1.5)
    maps = np.empty((num, grid, grid, dim))
    for i in range(num):
      dy, dx = rng.integers(-1, 2, size=2)
      maps[i] = template[0, 2 + dy:2 + dy + grid, 2 + dx:2 + dx + grid] + 0.5 * noise[i, 2:-2, 2:-2]
  return maps.astype(np.float32)


def allowed_fraction(probs: np.ndarray, num_emb: int) -> np.ndarray:
  """Per position: fraction of the K classes with probability > 1 / (2 num_emb)."""
  return (probs > 0.5 / num_emb).mean(-1)


def run_confidence(args) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
  cfg = base_config().model.neighborhood
  cfg.window, cfg.num_layers, cfg.width = args.window, args.layers, args.width
  cfg.dropout, cfg.epochs, cfg.batch_size = args.dropout, args.epochs, args.batch
  cfg.learning_rate, cfg.decay_every = args.lr, args.decay_every
  cfg.max_train_samples = args.max_train_samples
  cfg.train_positions = args.train_positions
  num_emb = args.emb_factor * args.classes
  for kind in args.kinds:
    maps = synthetic_maps(kind, args.images + args.test_images, args.grid, args.dim, seed=7)
    train, test = maps[:args.images], maps[args.images:]
    flat = train.reshape(-1, args.dim)
    codes = flat[greedy_k_center(flat, args.classes)]
    targets = nearest(flat, codes).reshape(train.shape[:3])
    test_targets = nearest(test.reshape(-1, args.dim), codes).reshape(test.shape[:3])
    t = time.perf_counter()
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    variables, hist = nb.train_mlp(train, targets, cfg, jax.random.key(0),
                                   num_classes=args.classes, dtype=dtype)
    train_s = time.perf_counter() - t
    logits = np.asarray(nb.neighbor_logits(variables, test, args.window, 4096, dtype))
    r = args.window // 2
    inner = (slice(None), slice(r, args.grid - r), slice(r, args.grid - r))
    test_acc = (logits.argmax(-1) == test_targets)[inner].mean()
    pos_prior = np.asarray(position.position_histogram(targets, args.classes, args.pos_window))
    print(f'{kind}: d={args.dim} K={args.classes} K_emb={num_emb} window={args.window} '
          f'{args.layers}x{args.width} dropout={args.dropout} epochs={args.epochs} '
          f'lr={args.lr} batch={args.batch} positions={args.train_positions} '
          f'{jnp.dtype(dtype).name}  train {train_s:.1f}s ({hist["num_train"]} samples)')
    print(f'   val acc per epoch {np.round(hist["val_accuracy"], 3).tolist()} (best epoch '
          f'{hist["best_epoch"] + 1}); held-out maps top-1 {test_acc:.3f} (interior)')
    for temperature in args.temperatures:
      p_nb = np.asarray(jax.nn.softmax(logits / temperature, -1))
      frac_nb = allowed_fraction(p_nb, num_emb)
      frac_mix = allowed_fraction((p_nb + pos_prior[None]) / 2, num_emb)
      true_kept = np.take_along_axis(p_nb, test_targets[..., None], -1)[..., 0] > 0.5 / num_emb
      print(f'   T={temperature:g}: allowed fraction N {frac_nb.mean():.3f} (median '
            f'{np.median(frac_nb):.3f}, interior {frac_nb[inner].mean():.3f}); true class '
            f'allowed {true_kept.mean():.3f}; max prob {p_nb.max(-1).mean():.3f}; '
            f'N+P mean-prob {frac_mix.mean():.3f}')
    frac_pos = allowed_fraction(pos_prior, num_emb)
    print(f'   position prior (window {args.pos_window}): allowed fraction {frac_pos.mean():.3f}',
          flush=True)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='benchmark.py mlp', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('mode', nargs='?', default='throughput',
                      choices=('throughput', 'hlo', 'confidence'))
  parser.add_argument('--steps', type=int, default=10, help='timed demo training steps')
  parser.add_argument('--demo-dims', type=int, nargs='+', default=[128, 256])
  parser.add_argument('--demo-layers', type=int, default=3)
  parser.add_argument('--demo-width', type=int, default=512)
  parser.add_argument('--demo-classes', type=int, default=512)
  parser.add_argument('--demo-window', type=int, default=9)
  parser.add_argument('--demo-batch', type=int, default=512)
  parser.add_argument('--paper-batch', type=int, default=0, help='0: 2048 (GPU) / 256 (CPU)')
  parser.add_argument('--paper-steps', type=int, default=0, help='0: 20 (GPU) / 2 (CPU)')
  parser.add_argument('--skip-paper', action='store_true')
  parser.add_argument('--bf16', action='store_true', help='bfloat16 features and MLP compute')
  # hlo
  parser.add_argument('--paper', action='store_true', help='hlo: the paper-size MLP')
  parser.add_argument('--autodiff-dot', action='store_true',
                      help='hlo: without the custom VJP (as before: float32 backward products)')
  # confidence
  parser.add_argument('--kinds', nargs='+', default=['object', 'texture'])
  parser.add_argument('--images', type=int, default=60)
  parser.add_argument('--test-images', type=int, default=8)
  parser.add_argument('--grid', type=int, default=32)
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--classes', type=int, default=256)
  parser.add_argument('--emb-factor', type=int, default=4, help='K_emb = factor x K')
  parser.add_argument('--window', type=int, default=5)
  parser.add_argument('--pos-window', type=int, default=3)
  parser.add_argument('--layers', type=int, default=3)
  parser.add_argument('--width', type=int, default=512)
  parser.add_argument('--dropout', type=float, default=0.0)
  parser.add_argument('--epochs', type=int, default=6)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--decay-every', type=int, default=4)
  parser.add_argument('--max-train-samples', type=int, default=0)
  parser.add_argument('--train-positions', default='interior', choices=nb.TRAIN_POSITIONS)
  parser.add_argument('--temperatures', type=float, nargs='+', default=[2.0])
  parser.add_argument('--verbose', action='store_true')
  args = parser.parse_args(argv)
  if args.mode == 'throughput':
    run_throughput(args)
  elif args.mode == 'hlo':
    run_hlo(args)
  else:
    run_confidence(args)
  return 0
