"""Greedy k-center benchmark: `python tools/benchmark.py coreset [--n 1e4,1e5,1e6] [--dim 128]`.

For each N: random [N, dim] float32 features (as after the random projection),
timed per pick for
  * pni_jax.coreset (jitted, chunked over rows, --picks picks in one call),
  * a numpy greedy loop (||x||^2 - 2 x.c + ||c||^2 with a BLAS matvec; --baseline-picks picks),
  * a scikit-learn loop (metrics.pairwise.euclidean_distances per pick, same rule),
and printed as ms per pick, GB/s (bytes moved per pick: the features and the [N]
norms read once, the [N] running-min vector read and written) and ns per row per
pick, which stays flat when selection time is linear in N. The baseline picks are
compared with the first picks of pni_jax (same start). Times: min over --repeats
(pni_jax and numpy alternate; scikit-learn runs once).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import coreset


def _parse_sizes(text: str) -> list[int]:
  return [int(float(s)) for s in text.split(',') if s.strip()]


def numpy_greedy(x: np.ndarray, num: int, start: int) -> np.ndarray:
  """Greedy k-center in numpy float32 (same rules as pni_jax.coreset)."""
  sq = np.einsum('ij,ij->i', x, x)
  min_d = np.full(x.shape[0], np.inf, np.float32)
  picks = [start]
  for _ in range(num - 1):
    last = picks[-1]
    c = x[last]
    d = sq - 2.0 * (x @ c) + sq[last]
    np.minimum(min_d, d, out=min_d)
    min_d[picks] = -np.inf
    picks.append(int(np.argmax(min_d)))
  return np.array(picks)


def sklearn_greedy(x: np.ndarray, num: int, start: int) -> np.ndarray:
  """The same loop with scikit-learn's euclidean_distances for the distance pass."""
  from sklearn.metrics import pairwise  # pylint: disable=import-outside-toplevel
  sq = np.einsum('ij,ij->i', x, x)[:, None]
  min_d = np.full(x.shape[0], np.inf, np.float32)
  picks = [start]
  for _ in range(num - 1):
    last = picks[-1]
    d = pairwise.euclidean_distances(x, x[last:last + 1], X_norm_squared=sq,
                                     squared=True)[:, 0]
    np.minimum(min_d, d, out=min_d)
    min_d[picks] = -np.inf
    picks.append(int(np.argmax(min_d)))
  return np.array(picks)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='benchmark.py coreset', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--n', default='10000,100000,1000000', help='feature counts, comma separated')
  parser.add_argument('--dim', type=int, default=128, help='projected feature size')
  parser.add_argument('--picks', type=int, default=60, help='timed picks of pni_jax per N')
  parser.add_argument('--baseline-picks', type=int, default=20, help='timed baseline picks per N')
  parser.add_argument('--chunk-size', type=int, default=16384)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--no-sklearn', action='store_true')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default='', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  if args.picks < 2 or args.baseline_picks < 2:
    raise ValueError('--picks and --baseline-picks must be >= 2')

  dtype = jnp.dtype(args.dtype)
  p = args.dim
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})'
        f', dim={p} dtype={args.dtype} chunk={args.chunk_size} picks={args.picks}'
        f' baseline picks={args.baseline_picks}')
  warm = np.random.default_rng(0).normal(size=(256, p)).astype(np.float32)
  numpy_greedy(warm, 3, 0)
  if not args.no_sklearn:
    sklearn_greedy(warm, 3, 0)

  header = ('| N | ms / pick | GB/s | ns / row / pick | numpy ms / pick | sklearn ms / pick |'
            ' numpy / jax | sklearn / jax | picks = numpy |')
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  rows = []
  for n in _parse_sizes(args.n):
    x = jax.random.normal(jax.random.key(args.seed + n), (n, p), jnp.float32).astype(dtype)
    num = min(args.picks, n)
    chunk = coreset.chunk_rows(n, args.chunk_size)
    state0 = coreset.init_state(x, num, 0)

    def run():
      return coreset.run_picks(x, state0, jnp.int32(1), jnp.int32(num), chunk).picks
    jax.block_until_ready(run())  # compile
    x_np = np.asarray(x, np.float32)
    nb = min(args.baseline_picks, num)
    # pni_jax and numpy alternate, so both see the same background load.
    t_jax = t_np = float('inf')
    for _ in range(args.repeats):
      t = time.perf_counter()
      picks = jax.block_until_ready(run())
      t_jax = min(t_jax, time.perf_counter() - t)
      t = time.perf_counter()
      ref = numpy_greedy(x_np, nb, 0)
      t_np = min(t_np, time.perf_counter() - t)
    per_pick = t_jax / (num - 1)
    bytes_pick = n * p * dtype.itemsize + 3 * 4 * n
    row = dict(n=n, dim=p, ms_per_pick=1e3 * per_pick, gb_per_s=bytes_pick / per_pick / 1e9,
               ns_per_row_pick=1e9 * per_pick / n, numpy_ms_per_pick=1e3 * t_np / (nb - 1),
               picks_equal_numpy=int(np.sum(np.cumprod(ref == np.asarray(picks)[:nb]))))
    cells = [f'{row["numpy_ms_per_pick"]:.2f}', '-',
             f'{row["numpy_ms_per_pick"] / row["ms_per_pick"]:.2f}x', '-']
    if not args.no_sklearn:
      t = time.perf_counter()
      sklearn_greedy(x_np, nb, 0)
      row['sklearn_ms_per_pick'] = 1e3 * (time.perf_counter() - t) / (nb - 1)
      cells[1] = f'{row["sklearn_ms_per_pick"]:.2f}'
      cells[3] = f'{row["sklearn_ms_per_pick"] / row["ms_per_pick"]:.2f}x'
    del x_np, x
    rows.append(row)
    print(f'| {n} | {row["ms_per_pick"]:.2f} | {row["gb_per_s"]:.2f} | '
          f'{row["ns_per_row_pick"]:.2f} | ' + ' | '.join(cells)
          + f' | {row["picks_equal_numpy"]}/{nb} |', flush=True)
  if len(rows) > 1:
    print('scaling, time-per-pick ratio / N ratio between successive N (1.00 = linear): '
          + ', '.join(f'{a["n"]} -> {b["n"]}: '
                      f'{(b["ms_per_pick"] / a["ms_per_pick"]) / (b["n"] / a["n"]):.2f}'
                      for a, b in zip(rows[:-1], rows[1:])))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)
  return 0
