"""Refinement network figures: `python tools/benchmark.py refine [loop|step] [options]`.

loop (default): the whole training loop, `refine.train_refiner`, on normal images of a generated
  category with an A_hat function built like the pipeline's (backbone features + PNI N + P scorer,
  jitted; random coreset, MLP and position arrays of the config's sizes: timing only). Prints the
  compile time of the run (jax.monitoring: tracing + lowering + XLA compile of everything the
  loop compiles, A_hat included), the steady time per iteration (log points after the first:
  synthesis + A_hat + update), the one-off rest (init, calibration or pool, first steps) and the
  total. `--amap demo` (default: EfficientNet-Lite0, 256 px, the demo's scorer) or `paper`
  (WideResNet-101-2, 480 px, random weights, the paper's sizes). `--compilation-cache DIR`: with
  JAX's persistent cache in DIR (cold the first time, warm after). Uses only `train_refiner`'s
  public arguments and history, so the same command times an older checkout
  (`PYTHONPATH=/path/to/checkout python tools/benchmark.py refine ...`).

step: for each input size, the XLA compile time and the steady time of one `train_step`
  (augmentation, forward, backward, Adam), the time of one `fuse` call on a batch of full-size
  maps, and the projected time of `--iterations` steps.

GPU (tools/gpu_check.sh): `loop --amap paper --encoder densenet161 --input-size 320
--precision bfloat16 --iterations 60` gives the per-iteration time the paper's 55,000 iterations
cost. No TensorFlow needed.
"""

from __future__ import annotations

import argparse
import math
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


# ----------------------------------------------------------------------------- loop


class _CompileClock:
  """Seconds of '/jax/core/compile/' events and persistent-cache hits (works with any jax that
  has jax.monitoring)."""

  def __init__(self):
    self.total, self.hits = 0.0, 0
    jax.monitoring.register_event_duration_secs_listener(self._on)
    jax.monitoring.register_event_listener(self._on_event)

  def _on(self, event, duration, **_):
    if event.startswith('/jax/core/compile/'):
      self.total += float(duration)

  def _on_event(self, event, **_):
    if event == '/jax/compilation_cache/cache_hits':
      self.hits += 1

  def close(self):
    jax.monitoring.unregister_event_duration_listener(self._on)
    jax.monitoring.unregister_event_listener(self._on_event)


def amap_model(which: str, seed: int = 0, mlp_precision: str = ''):
  """(model config, jitted amap_fn(images01 [B, S, S, 3]) -> [B, S, S], image size S) of a
  PNI N + P model with random arrays of the config's sizes (timing only)."""
  import warnings  # pylint: disable=g-import-not-at-top
  from pni_jax import features  # pylint: disable=g-import-not-at-top
  from pni_jax import infer  # pylint: disable=g-import-not-at-top
  from pni_jax import neighborhood as nb  # pylint: disable=g-import-not-at-top
  if which == 'demo':
    from configs import demo as config_module  # pylint: disable=g-import-not-at-top
    size, num_train = 256, 54
  else:
    from configs import mvtec as config_module  # pylint: disable=g-import-not-at-top
    size, num_train = 480, 200
  m = config_module.get_config().model
  m.allow_random_init = True
  # '' scores A_hat as the pipeline's refinement stage does (`fit.amap_config`: the MLP in
  # model.precision, whatever the config's evaluation setting model.scoring.mlp_precision says).
  if mlp_precision or 'mlp_precision' in m.scoring:     # (older checkouts have no such field)
    m.scoring.mlp_precision = mlp_precision
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    fn, variables = features.make_feature_fn(m, key=jax.random.key(seed))
  h = features.feature_grid(m, size)[0]
  d, window = int(m.dim), int(m.neighborhood.window)
  k_emb = max(int(m.coreset.ratio * num_train * h * h), int(m.coreset.dist_size))
  k_dist = int(m.coreset.dist_size)
  rng = np.random.default_rng(seed)
  mlp = nb.MLP(num_layers=int(m.neighborhood.num_layers), width=int(m.neighborhood.width),
               num_classes=k_dist)
  mlp_vars = jax.jit(mlp.init, static_argnames='train')(
      jax.random.key(seed), jnp.zeros((2, (window * window - 1) * d)), train=False)
  pos = rng.uniform(size=(h, h, k_dist)).astype(np.float32)
  arrays = {'c_emb': jnp.asarray(rng.normal(size=(k_emb, d)), jnp.float32),
            'emb_to_dist': jnp.asarray(rng.integers(0, k_dist, k_emb), jnp.int32),
            'position': jnp.asarray(pos / pos.sum(-1, keepdims=True)), 'mlp': mlp_vars,
            'refine': None}
  scorer = infer.make_scorer(m, infer.Variant(True, True), (size, size))

  @jax.jit
  def amap_fn(images01):
    return scorer(arrays, fn(variables, images01))['maps']

  return m, amap_fn, size


def normal_images(num: int, size: int) -> np.ndarray:
  """[num, size, size, 3] uint8 training images of the generated 'weave' category."""
  from pni_jax.data import generated  # pylint: disable=g-import-not-at-top
  samples = generated.category_samples('weave', seed=0, image_size=size, num_train=num,
                                       num_test_good=0, num_test_defect=0)
  return np.stack([s.image for _, s, _ in samples][:num])


def bench_loop(args) -> dict:
  m, amap_fn, size = amap_model(args.amap, mlp_precision=args.mlp_precision)
  r = m.refine
  r.encoder, r.input_size, r.batch_size = args.encoder, args.input_size, args.batch
  r.iterations, r.pool_size, r.log_every = args.iterations, args.pool_size, 1
  r.checkpoint_every = max(args.iterations, 1)
  r.calibration_samples = args.batch
  r.allow_random_init = not backbones.spec(args.encoder).embedded_weights
  r.learning_rate = 1e-3
  optional = {'arch': args.arch, 'precision': args.precision, 'decoder_width': args.decoder_width}
  for k, v in optional.items():
    if k in r:
      r[k] = v
    elif v not in ('skips', 'float32', 0):
      raise SystemExit(f'this checkout has no model.refine.{k}: cannot set {v!r}')
  images = normal_images(args.images, size)
  points = []          # (iteration, wall, process CPU seconds) at every progress line

  def log(msg: str) -> None:
    if msg.startswith('refinement iteration '):
      points.append((int(msg.split()[2].split('/')[0]), time.perf_counter(), time.process_time()))

  clock = _CompileClock()
  parts = _PartTimer() if args.parts else None
  t, cpu = time.perf_counter(), time.process_time()
  try:
    _, _, hist = refine.train_refiner(images, amap_fn, r, jax.random.key(0), log_fn=log)
  finally:
    clock.close()
    if parts is not None:
      parts.close()
  total, total_cpu = time.perf_counter() - t, time.process_time() - cpu
  steady = steady_cpu = math.nan
  if len(points) >= 2:
    (i0, w0, c0), (i1, w1, c1) = points[0], points[-1]
    steady, steady_cpu = (w1 - w0) / (i1 - i0), (c1 - c0) / (i1 - i0)
  half = max(1, len(hist['loss']) // 2)    # the loss over the second half of the run
  return dict(total=total, total_cpu=total_cpu, compile=clock.total, hits=clock.hits,
              steady=steady, steady_cpu=steady_cpu, loss=float(np.mean(hist['loss'][-half:])),
              input_loss=float(np.mean(hist['input_loss'][-half:])),
              parts=None if parts is None else parts.medians())


class _PartTimer:
  """--parts: each jitted call of an iteration (sampling + synthesis, A_hat, batch preparation,
  train step) timed alone, waiting for its result (so the parts do not overlap as in a normal
  run); median over the calls after the first two. Wraps refine's module functions for the
  run and restores them."""

  NAMES = {'_sample': 'sample + synthesis', '_amap': 'A_hat', '_online_batch': 'batch',
           '_pool_batch': 'batch', 'train_step': 'train step'}

  def __init__(self):
    self.times, self.saved = {}, {}
    for name, label in self.NAMES.items():
      fn = getattr(refine, name, None)
      if fn is not None:
        self.saved[name] = fn
        setattr(refine, name, self._wrap(fn, label))

  def _wrap(self, fn, label):
    def timed(*a, **k):
      t = time.perf_counter()
      out = jax.block_until_ready(fn(*a, **k))
      self.times.setdefault(label, []).append(time.perf_counter() - t)
      return out
    return timed

  def close(self):
    for name, fn in self.saved.items():
      setattr(refine, name, fn)

  def medians(self) -> dict:
    return {k: float(np.median(v[2:] if len(v) > 2 else v)) for k, v in self.times.items()}


HEADER = (f'{"run":>4} {"compile s":>10} {"steady s/it":>12} {"steady CPU s/it":>16} '
          f'{"total s":>8} {"total CPU s":>12} {"loss (input map), 2nd half":>27} '
          f'{"cache hits":>10}')


def format_row(i: int, r: dict) -> str:
  """One run's line under HEADER (tools/gpu_check_report.py parses it: keep the columns)."""
  return (f'{i:>4} {r["compile"]:>10.1f} {r["steady"]:>12.5f} {r["steady_cpu"]:>16.5f} '
          f'{r["total"]:>8.1f} {r["total_cpu"]:>12.1f} {r["loss"]:>14.5f} '
          f'({r["input_loss"]:.5f}) {r.get("hits", 0):>10}')


def use_cache(folder: str) -> None:
  """JAX's persistent compilation cache in `folder`, every compile stored (as
  `compilation.setup_cache` sets it for runs; set here directly so older checkouts work too)."""
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def run_loop(args) -> None:
  if args.compilation_cache:
    use_cache(args.compilation_cache)
  mode = 'online synthesis' if args.pool_size == 0 else f'pool of {args.pool_size}'
  print(f'backend {jax.default_backend()}, {jax.device_count()} device(s); refinement loop: '
        f'{args.encoder} ({args.arch}, {args.precision}) at {args.input_size} px, batch '
        f'{args.batch}, {mode}, A_hat of the {args.amap} model, {args.iterations} iterations, '
        f'persistent compilation cache: {args.compilation_cache or "off"}')
  print('compile: tracing + lowering + XLA compile (wall); steady: per iteration after the first '
        'log point; CPU: process CPU seconds (less sensitive to a shared machine)')
  print(HEADER)
  for i in range(args.repeats):
    r = bench_loop(args)
    print(format_row(i, r), flush=True)
    if r['parts']:
      print('      parts, s per call (each waited for): ' + ', '.join(
          f'{k} {v:.4f}' for k, v in r['parts'].items()) + f'; sum {sum(r["parts"].values()):.4f}',
          flush=True)


# ----------------------------------------------------------------------------- step


def bench_step(encoder: str, size: int, batch: int, image_size: int, steps: int, iterations: int,
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
    holder['state'], _ = compiled(holder['state'], data, key)
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


def run_step(a) -> None:
  print(f'backend {jax.default_backend()}, {jax.device_count()} device(s), batch {a.batch}, '
        f'encoder {a.encoder}')
  print(f'{"size":>5} {"init s":>7} {"compile s":>10} {"step s":>7} {"img/s":>7} '
        f'{"fuse compile s":>15} {"fuse s":>7} {"train s (" + str(a.iterations) + " it)":>18}')
  for size in (int(s) for s in a.sizes.split(',')):
    r = bench_step(a.encoder, size, a.batch, a.image_size, a.steps, a.iterations,
                   not a.no_augment)
    print(f'{size:>5} {r["init_s"]:>7.1f} {r["compile_s"]:>10.1f} {r["step_s"]:>7.3f} '
          f'{a.batch / r["step_s"]:>7.1f} {r["fuse_compile_s"]:>15.1f} {r["fuse_s"]:>7.3f} '
          f'{r["train_s"]:>18.1f}', flush=True)


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog='benchmark.py refine', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('mode', nargs='?', default='loop', choices=('loop', 'step'))
  p.add_argument('--encoder', default='efficientnet_lite0', choices=backbones.names())
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--iterations', type=int, default=8,
                 help='loop: iterations run; step: for the projected training time')
  # loop
  p.add_argument('--amap', default='demo', choices=('demo', 'paper'))
  p.add_argument('--input-size', type=int, default=128)
  p.add_argument('--pool-size', type=int, default=0, help='0: online synthesis (the paper)')
  p.add_argument('--arch', default='skips', choices=('paper', 'skips'))
  p.add_argument('--decoder-width', type=int, default=0)
  p.add_argument('--precision', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--mlp-precision', default='', choices=('', 'float32', 'bfloat16'),
                 help="loop: model.scoring.mlp_precision of the A_hat scorer ('': model.precision, "
                      "as the pipeline's refinement stage scores it)")
  p.add_argument('--images', type=int, default=16, help='normal training images')
  p.add_argument('--parts', action='store_true',
                 help='loop: also time each call of an iteration alone (waits after each)')
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--compilation-cache', default='',
                 help='loop: a persistent compilation cache folder (empty: off, every compile '
                      'cold). Run twice with the same folder for the warm figure, as every run '
                      'after the first pays with the cache on (runtime.compilation_cache)')
  # step
  p.add_argument('--sizes', default='96,128,160', help='step: comma-separated input sizes')
  p.add_argument('--image_size', type=int, default=256, help='step: full map size for fuse')
  p.add_argument('--steps', type=int, default=5, help='step: timed repeats')
  p.add_argument('--no_augment', action='store_true')
  a = p.parse_args(argv)
  if a.mode == 'loop':
    run_loop(a)
  else:
    run_step(a)
  return 0
