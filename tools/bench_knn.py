"""kNN kernel benchmark: `python tools/benchmark.py knn [--n 10000,100000] [--dim 1024] ...`.

For each bank size N: M queries x N bank rows of dimension d, timed for
  * pni_jax.knn.knn (tiled, jitted),
  * plain jnp.dot of the same query matrix against the bank (the machine's
    matmul throughput in this run; the bank is cut to --matmul-max-mb of output),
  * a numpy baseline (same expansion, bank tiles, running argmin / argpartition),
  * scikit-learn (pairwise_distances_argmin_min for k=1, NearestNeighbors brute for k>1),
and printed as GFLOP/s (2 M N d flops; the O(M N) distance epilogue is not
counted) with the kNN kernel as a % of the matmul, plus time ratios.
Baselines are skipped above --baseline-max-n. Times: min over --repeats runs
(kernel and matmul interleaved, so both see the same background load).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pni_jax import knn as knn_lib


def _parse_sizes(text: str) -> list[int]:
  return [int(float(s)) for s in text.split(',') if s.strip()]


def _time_interleaved(fns, repeats: int) -> list[float]:
  """Min wall time of each function over `repeats` rounds after one warm-up (compile) run.

  The functions run alternately, so on a shared machine the kernel and its
  matmul reference see the same background load.
  """
  for fn in fns:
    jax.block_until_ready(fn())
  best = [float('inf')] * len(fns)
  for _ in range(repeats):
    for j, fn in enumerate(fns):
      t = time.perf_counter()
      jax.block_until_ready(fn())
      best[j] = min(best[j], time.perf_counter() - t)
  return best


def numpy_knn(queries: np.ndarray, bank: np.ndarray, k: int, tile: int = 4096):
  """Brute force in numpy float32: ||q||^2 - 2 q.b + ||b||^2 per bank tile, running best."""
  m = queries.shape[0]
  q_sq = np.einsum('ij,ij->i', queries, queries)[:, None]
  best_d = np.full((m, k), np.inf, np.float32)
  best_i = np.full((m, k), -1, np.int64)
  for start in range(0, bank.shape[0], tile):
    b = bank[start:start + tile]
    d = q_sq - 2.0 * (queries @ b.T) + np.einsum('ij,ij->i', b, b)[None, :]
    np.maximum(d, 0.0, out=d)
    if k == 1:
      j = np.argmin(d, axis=1)
      dj = d[np.arange(m), j]
      better = dj < best_d[:, 0]
      best_d[better, 0], best_i[better, 0] = dj[better], start + j[better]
    else:
      kk = min(k, d.shape[1])
      j = np.argpartition(d, kk - 1, axis=1)[:, :kk]
      cand_d = np.concatenate([best_d, np.take_along_axis(d, j, 1)], 1)
      cand_i = np.concatenate([best_i, start + j], 1)
      order = np.argsort(cand_d, axis=1, kind='stable')[:, :k]
      best_d = np.take_along_axis(cand_d, order, 1)
      best_i = np.take_along_axis(cand_i, order, 1)
  return best_d, best_i


def sklearn_knn(queries: np.ndarray, bank: np.ndarray, k: int):
  from sklearn import metrics, neighbors  # pylint: disable=import-outside-toplevel
  if k == 1:
    idx, dist = metrics.pairwise_distances_argmin_min(queries, bank)
    return dist[:, None] ** 2, idx[:, None]
  nn = neighbors.NearestNeighbors(n_neighbors=k, algorithm='brute').fit(bank)
  dist, idx = nn.kneighbors(queries)
  return dist ** 2, idx


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='benchmark.py knn', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--n', default='10000,100000',
                      help='bank sizes, comma separated (e.g. 1e4,1e5,1e6)')
  parser.add_argument('--queries', type=int, default=1024, help='M, query rows')
  parser.add_argument('--dim', type=int, default=1024, help='d, feature size')
  parser.add_argument('--k', type=int, default=1)
  parser.add_argument('--query-tile', type=int, default=1024)
  parser.add_argument('--bank-tile', type=int, default=4096)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--precision', default='highest', choices=('highest', 'default'),
                      help='dot precision of the kernel and of the matmul reference')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--baseline-max-n', type=int, default=100_000,
                      help='skip numpy / scikit-learn above this N (0: never skip)')
  parser.add_argument('--no-sklearn', action='store_true')
  parser.add_argument('--matmul-max-mb', type=int, default=1024,
                      help='cap on the [M, N] float32 output of the plain matmul reference')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default='', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  if not args.no_sklearn:
    try:
      import sklearn  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      print('scikit-learn is not installed (it is only a test / benchmark extra: '
            "pip install 'pni-jax[test]'): skipping its column")
      args.no_sklearn = True

  dtype = jnp.dtype(args.dtype)
  precision = jax.lax.Precision.HIGHEST if args.precision == 'highest' else None
  m, d, k = args.queries, args.dim, args.k
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})'
        f', M={m} d={d} k={k} dtype={args.dtype} tiles={args.query_tile}x{args.bank_tile}'
        f' precision={args.precision}')
  key_q, key_b = jax.random.split(jax.random.key(args.seed))
  queries = jax.random.normal(key_q, (m, d), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a, b: jax.lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), precision=precision,
      preferred_element_type=jnp.float32))

  # Warm up numpy / scikit-learn (imports, thread pools) outside the timings.
  warm = np.random.default_rng(0).normal(size=(64, d)).astype(np.float32)
  numpy_knn(warm, warm, k)
  if not args.no_sklearn:
    sklearn_knn(warm, warm, k)

  rows = []
  header = ('| N | kNN s | kNN GFLOP/s | matmul GFLOP/s | kNN % of matmul | numpy s |'
            ' sklearn s | numpy / kNN | sklearn / kNN | idx = numpy |')
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  for n in _parse_sizes(args.n):
    bank = jax.random.normal(jax.random.fold_in(key_b, n), (n, d), jnp.float32).astype(dtype)
    flops = 2.0 * m * n * d
    fn = lambda: knn_lib.knn(queries, bank, k, query_tile=args.query_tile,  # noqa: E731
                             bank_tile=args.bank_tile, precision=precision)
    n_mm = max(1, min(n, args.matmul_max_mb * 2 ** 20 // (4 * m)))
    bank_mm = bank[:n_mm]
    t_knn, t_mm = _time_interleaved([fn, lambda: matmul(queries, bank_mm)], args.repeats)
    gf_knn, gf_mm = flops / t_knn / 1e9, 2.0 * m * n_mm * d / t_mm / 1e9
    row = dict(n=n, m=m, d=d, k=k, knn_s=t_knn, knn_gflops=gf_knn, matmul_n=n_mm,
               matmul_gflops=gf_mm, knn_pct_of_matmul=100 * gf_knn / gf_mm)

    cells = ['-', '-', '-', '-', '-']
    if not args.baseline_max_n or n <= args.baseline_max_n:
      q_np = np.asarray(queries, np.float32)
      b_np = np.asarray(bank, np.float32)
      t = time.perf_counter()
      _, i_np = numpy_knn(q_np, b_np, k)
      row['numpy_s'] = time.perf_counter() - t
      _, i_jax = fn()
      row['idx_equal_numpy'] = float(np.mean(np.asarray(i_jax) == i_np))
      cells[0] = f'{row["numpy_s"]:.3f}'
      cells[2] = f'{row["numpy_s"] / t_knn:.2f}x'
      cells[4] = f'{100 * row["idx_equal_numpy"]:.2f}%'
      if not args.no_sklearn:
        t = time.perf_counter()
        sklearn_knn(q_np, b_np, k)
        row['sklearn_s'] = time.perf_counter() - t
        cells[1] = f'{row["sklearn_s"]:.3f}'
        cells[3] = f'{row["sklearn_s"] / t_knn:.2f}x'
      del q_np, b_np
    rows.append(row)
    print(f'| {n} | {t_knn:.3f} | {gf_knn:.1f} | {gf_mm:.1f} | {row["knn_pct_of_matmul"]:.0f}% | '
          + ' | '.join(cells[:4]) + f' | {cells[4]} |', flush=True)
    del bank, bank_mm
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)
  return 0
