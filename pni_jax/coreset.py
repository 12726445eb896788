"""Greedy k-center (farthest point) coreset selection on randomly projected features.

PatchCore / PNI pick the memory bank by greedy k-center: start from one point,
then repeatedly add the point farthest from everything picked so far. We keep
one running vector ``min_sq_dist [N]`` (squared distance of every feature to
its nearest pick) and per pick make one pass over the features:

  d = ||x||^2 - 2 x.c_last + ||c_last||^2 for all x   (chunks of ``chunk_size``
      rows; a matrix-vector product accumulated in float32, clipped at 0)
  min_sq_dist = min(min_sq_dist, d);   next = argmax(min_sq_dist)

so memory is O(N * p + N) (the features, their squared norms and the running
vector), never N x N, and the largest temporary is [chunk_size] float32. A pass
reads N * p feature values and 3 N floats (norms, running min read and
written): selection is memory-bound and linear in N per pick. (The expansion
ran 1.2-2x faster on XLA:CPU than a fused sum of squared differences and is
what PatchCore uses; its float32 cancellation only affects near-zero
distances, never the far points the argmax looks for.)

Rules (a numpy loop following them reproduces the indices exactly, see
tests/test_coreset.py):
  * the first pick is ``start_index`` (or uniform from a PRNG key);
  * an already picked row gets ``min_sq_dist = -inf`` and is never picked
    again, so the ``num`` picks are distinct whenever num <= N;
  * ties in argmax: the lowest row index wins.

One run gives the whole selection order, so C_emb (first ceil(ratio * N)
picks) and C_dist (first ``dist_size`` picks) come from the same run and
C_dist is a prefix of C_emb (`select_coresets`).

Devices: `greedy_coreset` splits the rows over a `sharding.make_mesh()` mesh
(padded to a multiple of the device count; padded rows start at -inf and are
never picked). Every device updates its own rows; the centre row is broadcast
by a ``psum`` from the device that owns it, and the next pick is the ``pmax``
of the per-device maxima, the lowest global index among equal maxima
(``pmin``), so the picks are the one-device picks. `greedy_k_center` is the
single-device, vmap-able form of the same step.

Long runs (paper size: N ~ 700k, 7k picks) can be cut into jitted segments of
``segment_size`` picks with a Python progress callback between them; the state
between segments is plain arrays, so segmented and one-shot runs are identical.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, NamedTuple

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np

from pni_jax import knn as knn_lib
from pni_jax import sharding

ProgressFn = Callable[[int, int, float], None]
PROJECTIONS = ('sparse', 'gaussian')


# ----------------------------------------------------------------------------- projection


def random_projection(key: jax.Array,
                      d_in: int,
                      d_out: int | None,
                      kind: str = 'sparse',
                      density: float | None = None) -> jax.Array | None:
  """A random linear map that roughly preserves distances (Johnson-Lindenstrauss).

  Args:
    key: PRNG key.
    d_in: input feature size.
    d_out: output size; 0 or None means "no projection" and returns None
      (`project` then passes features through unchanged).
    kind: 'sparse' (Achlioptas / Li et al., as scikit-learn's
      SparseRandomProjection and PatchCore use): each entry is
      +-1 / sqrt(density * d_out) with probability density / 2 each, else 0;
      'gaussian': entries N(0, 1 / d_out).
    density: fraction of non-zeros for 'sparse'; default 1 / sqrt(d_in).

  Returns:
    [d_in, d_out] float32 (stored dense) or None. Both kinds keep
    E ||x R||^2 = ||x||^2.
  """
  if not d_out:
    return None
  if d_in < 1 or d_out < 1:
    raise ValueError(f'projection sizes must be >= 1, got d_in={d_in}, d_out={d_out}')
  if kind == 'gaussian':
    return jax.random.normal(key, (d_in, d_out), jnp.float32) / math.sqrt(d_out)
  if kind != 'sparse':
    raise ValueError(f'unknown projection kind {kind!r}; expected one of {PROJECTIONS}')
  if density is None:
    density = 1.0 / math.sqrt(d_in)
  if not 0.0 < density <= 1.0:
    raise ValueError(f'projection density must be in (0, 1], got {density}')
  k_nz, k_sign = jax.random.split(key)
  nonzero = jax.random.bernoulli(k_nz, density, (d_in, d_out))
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (d_in, d_out)), 1.0, -1.0)
  scale = 1.0 / math.sqrt(density * d_out)
  return jnp.where(nonzero, sign * scale, 0.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('precision',))
def _matmul(features, matrix, precision):
  return lax.dot_general(features, matrix, (((1,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def project(features: jax.Array, matrix: jax.Array | None,
            *, precision=lax.Precision.HIGHEST) -> jax.Array:
  """features [N, d_in] float -> [N, d_out] float32 (matrix None: features as float32)."""
  if features.ndim != 2:
    raise ValueError(f'features must be [N, d], got shape {tuple(features.shape)}')
  if matrix is None:
    return jnp.asarray(features, jnp.float32)
  if matrix.ndim != 2 or matrix.shape[0] != features.shape[1]:
    raise ValueError(f'projection matrix shape {tuple(matrix.shape)} does not fit features '
                     f'with d={features.shape[1]}')
  return _matmul(features, matrix, precision)


# ----------------------------------------------------------------------------- greedy k-center


class CoresetState(NamedTuple):
  """Selection state carried between segments (plain arrays).

  sq_norms: [N] float32, ||x||^2 of every feature row (constant).
  min_sq_dist: [N] float32, squared distance to the nearest pick; -inf for picks.
  picks: [num] int32, selection order (entries >= `done` are not yet valid).
  """
  sq_norms: jax.Array
  min_sq_dist: jax.Array
  picks: jax.Array


def chunk_rows(n: int, chunk_size: int) -> int:
  """Rows per chunk: the fewest nearly equal chunks of at most ``chunk_size`` rows."""
  if int(chunk_size) < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  return knn_lib.balanced_tile(n, int(chunk_size), 128)


def _pick_step(features: jax.Array, chunk: int, step: jax.Array, state: CoresetState, *,
               axis: str | None = None, offset: jax.Array | int = 0) -> CoresetState:
  """Adds pick number ``step`` (>= 1) given picks[step - 1]; one pass over features.

  ``features`` [n, p], ``state.sq_norms`` and ``state.min_sq_dist`` [n] are this device's rows
  ``offset .. offset + n - 1`` of the global arrays (all of them without a mesh); ``picks`` holds
  global row indices. Under ``shard_map`` (``axis`` given) the device owning the last pick
  broadcasts its row with a ``psum`` and the farthest row is the ``pmax`` of the local maxima,
  the lowest global index among equal maxima (``pmin``): the same pick as on one device.
  """
  n, p = features.shape
  last = state.picks[step - 1]
  local = last - offset
  mine = (local >= 0) & (local < n)
  li = jnp.clip(local, 0, n - 1)
  row = lax.dynamic_slice(features, (li, 0), (1, p))[0]  # [p], features' dtype
  center = jnp.where(mine, row, jnp.zeros((), row.dtype))
  center_sq = jnp.where(mine, state.sq_norms[li], 0.0)
  if axis is not None:
    center, center_sq = lax.psum((center, center_sq), axis)
  min_d = state.min_sq_dist.at[li].set(jnp.where(mine, -jnp.inf, state.min_sq_dist[li]))
  num_chunks = -(-n // chunk)

  def chunk_body(c, carry):
    min_d, best_v, best_i = carry
    # The last chunk is shifted back to end at row n (no padded copy of the
    # features); its overlap with the previous chunk is recomputed identically.
    start = jnp.minimum(c * chunk, n - chunk)
    x = lax.dynamic_slice(features, (start, 0), (chunk, p))
    dot = lax.dot_general(x, center, (((1,), (0,)), ((), ())),
                          precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    sq = lax.dynamic_slice(state.sq_norms, (start,), (chunk,))
    d = jnp.maximum(sq - 2.0 * dot + center_sq, 0.0)
    new = jnp.minimum(lax.dynamic_slice(min_d, (start,), (chunk,)), d)
    min_d = lax.dynamic_update_slice(min_d, new, (start,))
    j = jnp.argmax(new).astype(jnp.int32)  # first index among ties
    v = new[j]
    better = v > best_v  # strict: earlier chunk (lower index) wins ties
    return (min_d, jnp.where(better, v, best_v), jnp.where(better, start + j, best_i))

  init = (min_d, jnp.array(-jnp.inf, jnp.float32), jnp.array(0, jnp.int32))
  min_d, best_v, best_i = lax.fori_loop(0, num_chunks, chunk_body, init)
  best_i = best_i + offset
  if axis is not None:
    top = lax.pmax(best_v, axis)
    best_i = lax.pmin(jnp.where(best_v == top, best_i, jnp.iinfo(jnp.int32).max), axis)
  return CoresetState(state.sq_norms, min_d, state.picks.at[step].set(best_i))


@functools.partial(jax.jit, static_argnames=('chunk',))
def run_picks(features: jax.Array, state: CoresetState, lo: jax.Array, hi: jax.Array,
              chunk: int) -> CoresetState:
  """Makes picks number lo .. hi - 1 of ``state`` (1 <= lo <= hi <= num), one device.

  Args:
    features: [N, p] float.
    state: from `init_state` or an earlier call (picks[:lo] made).
    lo, hi: int32 scalars, traced, so all segments share one compilation.
    chunk: feature rows per distance tile (static, <= N).

  Returns:
    The updated `CoresetState`.
  """
  return lax.fori_loop(lo, hi, functools.partial(_pick_step, features, chunk), state)


@functools.partial(jax.jit, static_argnames=('num',))
def init_state(features: jax.Array, num: int, start_index: jax.Array) -> CoresetState:
  """State with only the first pick made: features [N, p] -> norms, min_sq_dist +inf,
  picks [num] with picks[0] = start_index."""
  x = features.astype(jnp.float32)
  picks = jnp.zeros((num,), jnp.int32).at[0].set(jnp.asarray(start_index, jnp.int32))
  return CoresetState(jnp.sum(x * x, axis=1),
                      jnp.full((features.shape[0],), jnp.inf, jnp.float32), picks)


# The same two functions over a mesh: features, norms and min_sq_dist split by rows
# ([N_pad / D, ...] per device), picks replicated.


@functools.partial(jax.jit, static_argnames=('num', 'mesh'))
def _init_state_sharded(features: jax.Array, num: int, rows: jax.Array, start_index: jax.Array,
                        mesh) -> CoresetState:
  """`init_state` for row-sharded features [N_pad, p]; padded rows (>= rows, traced) start at
  -inf, so one compilation serves every N that pads to the same N_pad."""

  def local(x):
    offset = lax.axis_index(sharding.DATA) * x.shape[0]
    x32 = x.astype(jnp.float32)
    valid = offset + jnp.arange(x.shape[0]) < rows
    return jnp.sum(x32 * x32, axis=1), jnp.where(valid, jnp.inf, -jnp.inf).astype(jnp.float32)

  sq, min_d = jax.shard_map(local, mesh=mesh, in_specs=P(sharding.DATA),
                            out_specs=(P(sharding.DATA), P(sharding.DATA)))(features)
  picks = jnp.zeros((num,), jnp.int32).at[0].set(jnp.asarray(start_index, jnp.int32))
  return CoresetState(sq, min_d, picks)


@functools.partial(jax.jit, static_argnames=('chunk', 'mesh'))
def _run_picks_sharded(features: jax.Array, state: CoresetState, lo: jax.Array, hi: jax.Array,
                       chunk: int, mesh) -> CoresetState:
  """`run_picks` with every device scanning its own rows (chunk: rows per tile per device)."""

  def local(x, sq, min_d, picks, lo, hi):
    offset = lax.axis_index(sharding.DATA) * x.shape[0]
    step = functools.partial(_pick_step, x, chunk, axis=sharding.DATA, offset=offset)
    out = lax.fori_loop(lo, hi, step, CoresetState(sq, min_d, picks))
    return out.min_sq_dist, out.picks

  rows = P(sharding.DATA)
  min_d, picks = jax.shard_map(
      local, mesh=mesh, in_specs=(rows, rows, rows, P(), P(), P()), out_specs=(rows, P()),
      check_vma=False)(features, state.sq_norms, state.min_sq_dist, state.picks, lo, hi)
  return CoresetState(state.sq_norms, min_d, picks)


def greedy_k_center(features: jax.Array, start_index: jax.Array, num: int,
                    chunk_size: int = 16384) -> jax.Array:
  """Pure, jit/vmap-able greedy k-center: [N, p] features -> [num] int32 picks in order.

  ``start_index`` may be traced; ``num`` and ``chunk_size`` are static.
  `greedy_coreset` is the user-facing wrapper (validation, key, progress).
  """
  n = features.shape[0]
  chunk = chunk_rows(n, chunk_size)
  state = init_state(features, num, start_index)
  return run_picks(features, state, jnp.int32(1), jnp.int32(num), chunk).picks


def greedy_coreset(features: jax.Array,
                   num: int,
                   *,
                   key: jax.Array | None = None,
                   start_index: int | None = None,
                   chunk_size: int = 16384,
                   segment_size: int = 0,
                   progress: ProgressFn | None = None,
                   mesh: Mesh | None = None,
                   pad_rows_to: int = 0,
                   pad_picks_to: int = 0) -> jax.Array:
  """Greedy k-center selection order over ``features``, split by rows over a device mesh.

  Args:
    features: [N, p] float32 or bfloat16 (already projected), numpy (host) or
      jax. They are placed on the mesh split by rows (padded to a multiple of
      the device count; padded rows are never picked); a host array goes to the
      devices shard by shard, without a second full host copy. Memory per
      device: N / D feature rows, two [N / D] float32 vectors and a
      [chunk_size, p] tile.
    num: number of picks, 0 <= num <= N.
    key: PRNG key; the start row is uniform in [0, N) from it (PatchCore starts
      at a random point). Deterministic given the key.
    start_index: explicit start row instead of ``key`` (give exactly one).
    chunk_size: feature rows per distance tile (memory bound, not a result
      parameter: any value gives the same indices).
    segment_size: picks per jitted call; 0 = all in one call. Between calls
      ``progress(done, num, elapsed_seconds)`` is called.
    progress: optional callback, e.g. `log_progress`.
    mesh: device mesh (`sharding.make_mesh`); default all devices. Every
      device scans its rows and the farthest point is a cross-device
      max-reduction; the picks equal the one-device run's.
    pad_rows_to, pad_picks_to: pad the rows (never picked) and the picks
      array to at least these sizes, so that inputs of different N share one
      compilation (`sharding.bucket_size`); the picks are unchanged.

  Returns:
    [num] int32 distinct row indices in selection order (replicated).
  """
  if features.ndim != 2:
    raise ValueError(f'features must be [N, p], got shape {tuple(features.shape)}')
  n = features.shape[0]
  if not 0 <= num <= n:
    raise ValueError(f'num (coreset size) must be in [0, N={n}], got {num}')
  if (key is None) == (start_index is None):
    raise ValueError('give exactly one of key= or start_index=')
  if start_index is not None and not 0 <= int(start_index) < n:
    raise ValueError(f'start_index must be in [0, {n}), got {start_index}')
  if segment_size < 0:
    raise ValueError(f'segment_size must be >= 0, got {segment_size}')
  chunk_rows(n, chunk_size)  # validates chunk_size
  if num == 0:
    return jnp.zeros((0,), jnp.int32)
  if start_index is None:
    start_index = jax.random.randint(key, (), 0, n, dtype=jnp.int32)

  mesh = sharding.make_mesh() if mesh is None else mesh
  shards = sharding.num_shards(mesh)
  rows_to = sharding.padded_size(max(n, int(pad_rows_to)), shards)
  if isinstance(features, jax.Array):
    if rows_to > n:
      features = jnp.concatenate([features, jnp.zeros((rows_to - n, features.shape[1]),
                                                      features.dtype)])
    features = jax.device_put(features, sharding.data_sharding(mesh))
  else:
    features = sharding.shard_host_rows(np.asarray(features), mesh, rows=rows_to)
  chunk = chunk_rows(features.shape[0] // shards, chunk_size)
  state = _init_state_sharded(features, max(num, int(pad_picks_to)), jnp.int32(n), start_index,
                              mesh)
  seg = segment_size if segment_size > 0 else num
  t0 = time.perf_counter()
  done = 1
  while done < num:
    hi = min(done + seg, num)
    state = _run_picks_sharded(features, state, jnp.int32(done), jnp.int32(hi), chunk, mesh)
    done = hi
    if progress is not None:
      jax.block_until_ready(state)
      progress(done, num, time.perf_counter() - t0)
  return jax.device_put(np.asarray(state.picks)[:num])   # cut on the host: no compile per num


def log_progress(done: int, total: int, elapsed: float) -> None:
  """A `greedy_coreset` progress callback: picks done / total, elapsed and ETA (absl log)."""
  eta = elapsed / max(done - 1, 1) * (total - done)
  logging.info('coreset: %d / %d picks, %.1f s elapsed, ETA %.1f s', done, total, elapsed, eta)


# ----------------------------------------------------------------------------- C_emb / C_dist


def coreset_size(n: int, ratio: float) -> int:
  """ceil(ratio * n), at least 1 (float noise such as 0.01 * 300 = 3.0000000000000004 ignored)."""
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f'coreset ratio must be in (0, 1], got {ratio}')
  return max(1, min(n, math.ceil(round(ratio * n, 6))))


def select_coresets(features: jax.Array,
                    ratio: float,
                    dist_size: int,
                    key: jax.Array,
                    *,
                    chunk_size: int = 16384,
                    segment_size: int = 0,
                    progress: ProgressFn | None = None,
                    mesh: Mesh | None = None,
                    pad_rows_to: int = 0) -> tuple[jax.Array, jax.Array]:
  """C_emb and C_dist indices from ONE greedy run (C_dist is a prefix of C_emb).

  Args:
    features: [N, p] float (projected) features of all training patches.
    ratio: |C_emb| = ceil(ratio * N) (paper: 0.01).
    dist_size: |C_dist| (paper: 2048); clipped to |C_emb| with a logged note.
    key: PRNG key for the start point.
    chunk_size, segment_size, progress, mesh: as in `greedy_coreset`.
    pad_rows_to: compile for at least this many rows (and for the picks that many rows would
      give), so that training sets in one `sharding.bucket_size` bucket share one compilation.

  Returns:
    (emb_indices [K_emb] int32, dist_indices [K_dist] int32) rows of ``features``;
    dist_indices == emb_indices[:K_dist].
  """
  if features.ndim != 2:
    raise ValueError(f'features must be [N, p], got shape {tuple(features.shape)}')
  n = features.shape[0]
  if n == 0:
    raise ValueError('no features to select a coreset from (N = 0)')
  if dist_size < 1:
    raise ValueError(f'dist_size must be >= 1, got {dist_size}')
  num_emb = coreset_size(n, ratio)
  if dist_size > num_emb:
    logging.info('coreset: dist_size %d > |C_emb| = %d (N=%d, ratio=%g); using %d',
                 dist_size, num_emb, n, ratio, num_emb)
    dist_size = num_emb
  emb = greedy_coreset(features, num_emb, key=key, chunk_size=chunk_size,
                       segment_size=segment_size, progress=progress, mesh=mesh,
                       pad_rows_to=pad_rows_to,
                       pad_picks_to=coreset_size(max(n, pad_rows_to), ratio))
  return emb, jax.device_put(np.asarray(emb)[:dist_size])


def emb_to_dist(c_emb: jax.Array, c_dist: jax.Array, *, query_tile: int = 1024,
                bank_tile: int = 4096, mesh: Mesh | None = None) -> jax.Array:
  """Index of the nearest C_dist row for every C_emb row.

  Args:
    c_emb: [K_emb, d] float (rows split over `mesh`, default all devices).
    c_dist: [K_dist, d] float.

  Returns:
    [K_emb] int32 in [0, K_dist) (ties: lowest index).
  """
  _, idx = knn_lib.knn_sharded(c_emb, c_dist, 1, mesh=mesh, query_tile=query_tile,
                               bank_tile=bank_tile)
  return idx[:, 0]
