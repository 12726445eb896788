"""What a batch job pays: `python tools/benchmark.py batch [options]`.

Runs the real entry point (`python -m pni_jax.main`) over K generated categories whose training
sets have DIFFERENT sizes (as MVTec AD's do), twice, each in a fresh process:
  cold  with an empty persistent compilation cache (a new folder), then
  warm  the same command again with that cache filled (and a fresh workdir, so everything is
        refitted: the only thing carried over is the compiled code).
For each run it prints per category the wall time, the number of XLA compiles it caused, the
seconds spent compiling and the persistent-cache hits (from the run's summary.json, counted with
jax.monitoring), then the totals and the compile share of the wall time. A batch job over many
categories should compile each function once (later categories: ~0 compiles), and a warm
process should spend a small fraction of the cold one's compile time.

Runs without TensorFlow (images are then decoded image by image with the project's own
preprocessing; pni_jax.data.batches).

Examples:
  python tools/benchmark.py batch --config demo --categories 3
  python tools/benchmark.py batch --config paper --categories 3 --images 200 --test-images 100 \
      --size 480 --refine-iterations 200        # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pni_jax.data import generated  # noqa: E402  pylint: disable=g-import-not-at-top

SIZE_FACTORS = (1.0, 0.8, 1.2, 0.9, 1.1)   # training-set sizes relative to --images, per category


def _overrides(args, root: str, cache: str, categories) -> list[str]:
  # data.name='mvtec': read the generated MVTec-layout folders as they are (the 'generated'
  # source would regenerate them with the config's sizes).
  out = ['--config.data.name=mvtec', f'--config.data.root={root}',
         f'--config.data.categories={",".join(categories)}',
         f'--config.runtime.compilation_cache_dir={cache}', '--config.eval.ablations=',
         '--config.eval.max_figures=0', '--config.eval.save_maps=False']
  if args.config == 'paper':
    out += ['--config.model.allow_random_init=True',
            '--config.model.refine.allow_random_init=True']
  if args.size:
    out += [f'--config.data.resize={args.size}', f'--config.data.crop={args.size}']
  if args.mlp_epochs is not None:
    out.append(f'--config.model.neighborhood.epochs={args.mlp_epochs}')
  if args.refine_iterations is not None:
    if args.refine_iterations > 0:
      out += ['--config.model.use_refinement=True',
              f'--config.model.refine.iterations={args.refine_iterations}',
              f'--config.model.refine.checkpoint_every={args.refine_iterations}']
    else:
      out.append('--config.model.use_refinement=False')
  if args.precision:
    out.append(f'--config.model.precision={args.precision}')
  return out + list(args.extra)


def _run(args, workdir: str, overrides: list[str]) -> tuple[float, list[dict]]:
  config = REPO / 'configs' / ('demo.py' if args.config == 'demo' else 'mvtec.py')
  cmd = [sys.executable, '-m', 'pni_jax.main', f'--config={config}', f'--workdir={workdir}',
         *overrides]
  env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t
  if proc.returncode != 0:
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
    raise SystemExit(f'run failed (exit {proc.returncode}): {" ".join(cmd)}')
  return wall, json.loads((pathlib.Path(workdir) / 'summary.json').read_text())


def _table(name: str, wall: float, rows: list[dict]) -> str:
  lines = [f'### {name}: {wall:.1f} s wall (process, imports and data included)\n',
           '| category | train images | wall s | compiles | compile s | cache hits |',
           '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["category"]} | {r.get("num_train", "")} | {r["seconds"]:.1f} | '
                 f'{r["compiles"]} | {r["compile_s"]:.1f} | {r["cache_hits"]} |')
  comp = sum(r['compile_s'] for r in rows)
  lines.append(f'| **total** | | {sum(r["seconds"] for r in rows):.1f} | '
               f'{sum(r["compiles"] for r in rows)} | {comp:.1f} | '
               f'{sum(r["cache_hits"] for r in rows)} |')
  lines.append(f'\nCompile share of the wall time: {100 * comp / wall:.1f}%.\n')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='benchmark.py batch', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', choices=('demo', 'paper'), default='demo')
  parser.add_argument('--categories', type=int, default=3, help='generated categories (<= 4)')
  parser.add_argument('--images', type=int, default=0, help='train images of the 1st category')
  parser.add_argument('--test-images', type=int, default=0)
  parser.add_argument('--size', type=int, default=0, help='image size (0: per config)')
  parser.add_argument('--mlp-epochs', type=int, default=None)
  parser.add_argument('--refine-iterations', type=int, default=None,
                      help='train the refinement for N iterations (0: off; default: config)')
  parser.add_argument('--precision', choices=('float32', 'bfloat16'), default=None)
  parser.add_argument('--size-factors', default=','.join(map(str, SIZE_FACTORS)),
                      help='training-set sizes relative to --images, per category (e.g. '
                           '1,0.91,0.86: three sizes of one shape bucket)')
  parser.add_argument('--runs', default='cold,warm', help='comma list of cold, warm')
  parser.add_argument('--out', default='runs/bench_batch')
  parser.add_argument('extra', nargs='*', help='more --config.x=y overrides (after --)')
  args = parser.parse_args(argv)
  factors = [float(f) for f in args.size_factors.split(',')]
  cats = list(generated.CATEGORIES)[:max(1, min(args.categories, len(generated.CATEGORIES),
                                                len(factors)))]
  runs = [r for r in args.runs.split(',') if r]
  if not runs or set(runs) - {'cold', 'warm'}:
    raise SystemExit(f'--runs: a comma list of cold, warm; got {args.runs!r}')
  size = args.size or (256 if args.config == 'demo' else 480)
  images = args.images or (60 if args.config == 'demo' else 200)
  test = args.test_images or (36 if args.config == 'demo' else 100)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix='pni-batch-') as tmp:
    root = os.path.join(tmp, 'data')
    num_train = {}
    for cat, factor in zip(cats, factors):
      num_train[cat] = max(4, int(round(images * factor)))
      n_def = test * 2 // 3
      generated.generate(root, seed=0, image_size=size, num_train=num_train[cat],
                         num_test_good=test - n_def, num_test_defect=n_def, categories=[cat])
    cache = os.path.join(tmp, 'xla-cache')
    overrides = _overrides(args, root, cache, cats)
    report = [f'# Batch job: {args.config} config, {len(cats)} categories at {size} px\n',
              f'Training images per category (before the 10% hold-out): '
              + ', '.join(f'{c} {n}' for c, n in num_train.items()) + f'; {test} test images each. '
              f'Overrides: `{" ".join(overrides[1:])}`\n']
    results = {}
    for name in runs:
      print(f'{name} run ...', flush=True)
      wall, rows = _run(args, os.path.join(tmp, f'work-{name}'), overrides)
      results[name] = dict(wall=wall, rows=rows)
      report.append(_table(f'{name} cache', wall, rows))
      print(report[-1], flush=True)
    if 'cold' in results and 'warm' in results:
      cold = sum(r['compile_s'] for r in results['cold']['rows'])
      warm = sum(r['compile_s'] for r in results['warm']['rows'])
      report.append(f'Warm / cold compile time: {warm:.1f} / {cold:.1f} s = '
                    f'{100 * warm / max(cold, 1e-9):.1f}%; wall {results["warm"]["wall"]:.1f} / '
                    f'{results["cold"]["wall"]:.1f} s.')
  text = '\n'.join(report)
  (out / 'batch.md').write_text(text + '\n')
  (out / 'batch.json').write_text(json.dumps(dict(args=vars(args), num_train=num_train,
                                                  results=results), indent=1))
  print(report[-1])
  print(f'written: {out / "batch.md"}, {out / "batch.json"}')
  return 0
