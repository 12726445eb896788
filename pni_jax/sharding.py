"""Device mesh and data-parallel helpers (`jax.sharding`): one code path for 1 .. D devices.

Every data-parallel stage of pni-jax follows one pattern:
  * a 1-D `Mesh` over all devices with the axis 'data' (`make_mesh`);
  * arrays whose leading axis is a batch of images, patches or feature rows are sharded over it
    (`P('data')`, `data_sharding`); model arrays (backbone variables, coresets, MLP parameters,
    optimiser state) are replicated (`P()`, `replicated`);
  * a leading axis that is not a multiple of the device count is padded (`pad_rows`,
    `padded_size`) and the padding is cut from the results (or masked, for reductions).

On one device the mesh has one entry, every helper here is a plain `device_put` and every
collective is the identity, so single- and multi-device runs execute the same code.

Where the stage is written against local arrays (greedy k-center, kNN, scoring) it runs under
`jax.shard_map` (`data_parallel`); where it is a model step (the MLP's `train_step`) it is jitted
on a batch placed with `shard_batch` and a state placed with `replicate`, and GSPMD inserts the
cross-device reductions (batch statistics and gradients over the global batch). Any other
training loop (e.g. the refinement network's) becomes data parallel the same way.

Several devices on one host CPU (`XLA_FLAGS=--xla_force_host_platform_device_count=D`, e.g. to
test data parallelism without accelerators) need 2 D threads in XLA:CPU's client thread pool, or
a training loop that queues its steps deadlocks; entry points call `configure_host_threads`
before JAX starts (see its docstring for the mechanism).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, MutableMapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None, axis: str = DATA) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of the default backend), axis `axis`.

  Logs a warning (once) when the devices are D > 1 host CPU devices and XLA:CPU was started with
  fewer than 2 D threads (`configure_host_threads` explains why that can abort training).
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError('make_mesh needs at least one device')
  cpus = sum(1 for d in devices if d.platform == 'cpu')
  if cpus > 1:
    problem = host_thread_problem(cpus, os.environ)
    if problem:
      logging.log_first_n(logging.WARNING, problem + ' before JAX starts', 1)
  return Mesh(np.asarray(devices, dtype=object), (axis,))


def num_shards(mesh: Mesh) -> int:
  """Number of devices along the data axis."""
  return int(mesh.shape[DATA])


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the 'data' axis, the rest whole."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def padded_size(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= n (at least `multiple`, so every shard has a row)."""
  if multiple < 1:
    raise ValueError(f'multiple must be >= 1, got {multiple}')
  return max(multiple, -(-int(n) // multiple) * multiple)


def bucket_size(n: int, multiple: int = 1) -> int:
  """The smallest size >= n on the ladder {4, 5, 6, 7} x 2^k (and a multiple of `multiple`).

  Arrays whose length depends on the data (training images, patches, coreset rows) are padded
  to their bucket so that categories of different sizes share one compilation; the ladder
  wastes at most 25% (12% on average) and has ~4 sizes per doubling. Sizes below 8 are kept.
  """
  n = int(n)
  if n <= 8:
    size = max(n, 1)
  else:
    step = 1 << (n.bit_length() - 3)          # n in [4 * step, 8 * step)
    size = -(-n // step) * step
  return padded_size(size, multiple)


def images_bucket(n: int, at_least: int = 0, enabled: bool = True) -> int:
  """The number of training images a category's fitting functions are compiled for:
  `bucket_size(max(n, at_least))`, or n itself when not `enabled` (runtime.shape_buckets).

  `at_least` (runtime.min_train_images) is the largest training set of the run when
  runtime.run_bucket is on, so every category of a batch job lands in one bucket and each
  function compiles once; padded rows never change a result.
  """
  n = int(n)
  return bucket_size(max(n, int(at_least))) if enabled else n


def pad_rows(x, multiple: int, *, mode: str = 'edge', to: int = 0):
  """Pads the leading axis of `x` (numpy or jax) to `padded_size(max(len(x), to), multiple)`.

  mode: 'edge' repeats the last row (padded rows compute valid, ignored numbers); 'zeros' fills
  with zeros (also for empty inputs).
  Returns (padded array, original length).
  """
  n = x.shape[0]
  pad = padded_size(max(n, int(to)), multiple) - n
  if pad == 0:
    return x, n
  xp = jnp if isinstance(x, jax.Array) else np
  if mode == 'edge' and n > 0:
    filler = xp.repeat(x[-1:], pad, axis=0)
  elif mode in ('edge', 'zeros'):
    filler = xp.zeros((pad,) + tuple(x.shape[1:]), x.dtype)
  else:
    raise ValueError(f"pad mode must be 'edge' or 'zeros', got {mode!r}")
  return xp.concatenate([x, filler], axis=0), n


def shard_rows(x, mesh: Mesh) -> jax.Array:
  """Places `x` [R, ...] on the mesh split by rows; R must be a multiple of the device count."""
  d = num_shards(mesh)
  if x.shape[0] % d:
    raise ValueError(f'cannot split {x.shape[0]} rows over {d} devices: pad them first '
                     '(sharding.pad_rows)')
  return jax.device_put(x, data_sharding(mesh))


def shard_host_rows(x: np.ndarray, mesh: Mesh, *, fill: float = 0.0, rows: int = 0) -> jax.Array:
  """Host array [R, ...] -> device array [padded_size(max(R, rows), D), ...] split by rows over
  the mesh (the padding rows hold `fill`).

  Each device receives its own slice of `x` (no padded host copy of the whole array; only a
  shard that needs padding rows is assembled in a new host buffer). The transfers may alias `x`
  where the runtime allows it: do not modify `x` while the result is in use.
  """
  d = num_shards(mesh)
  total = padded_size(max(x.shape[0], int(rows)), d)
  rows = x.shape[0]
  shape = (total,) + tuple(x.shape[1:])
  target = data_sharding(mesh)
  parts = []
  for device, index in target.addressable_devices_indices_map(shape).items():
    sl = index[0]
    start, stop = sl.start or 0, total if sl.stop is None else sl.stop
    part = x[min(start, rows):min(stop, rows)]
    if stop > rows:
      filler = np.full((stop - max(start, rows),) + tuple(x.shape[1:]), fill, x.dtype)
      part = np.concatenate([np.asarray(part), filler], axis=0)
    parts.append(jax.device_put(part, device, may_alias=True))
  return jax.make_array_from_single_device_arrays(shape, target, parts)


def replicate_host(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """Host array -> a full copy on every device of the mesh, each sent straight from `x` (no
  intermediate host copy; the runtime may alias `x`: do not modify it while the result is in
  use)."""
  target = replicated(mesh)
  parts = [jax.device_put(x, device, may_alias=True)
           for device in target.addressable_devices_indices_map(x.shape)]
  return jax.make_array_from_single_device_arrays(tuple(x.shape), target, parts)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every array leaf of `tree` as a replicated copy on the mesh (None leaves kept)."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Leaves with a leading batch axis -> split over the mesh when it divides, else replicated.

  A batch that does not split evenly (e.g. 6 samples on 4 devices) is kept whole on every device:
  still the same math, only without the speed-up.
  """
  d = num_shards(mesh)
  leaves = jax.tree.leaves(tree)
  even = all(leaf.shape[0] % d == 0 for leaf in leaves)
  return jax.device_put(tree, data_sharding(mesh) if even else replicated(mesh))


def data_parallel(fn: Callable, mesh: Mesh, sharded_argnums: Sequence[int] = (0,),
                  *, check_vma: bool = False) -> Callable:
  """Wraps `fn(*args)` so that the arguments in `sharded_argnums` are split by their leading
  (batch) axis over the mesh and the others are replicated (`jax.shard_map`).

  `fn` must treat batch rows independently (kNN of queries against a bank, per-image scoring)
  and return a pytree of arrays with the same leading batch axis. The wrapper pads the batch to
  a multiple of the device count (repeating the last row), runs `fn` on every device's rows and
  cuts the padding from the outputs. On one device it is `fn` under `jit`.
  """
  sharded_argnums = tuple(sharded_argnums)
  d = num_shards(mesh)

  def wrapped(*args):
    leaves = jax.tree.leaves([args[i] for i in sharded_argnums])
    if not leaves:
      raise ValueError('data_parallel: the sharded arguments hold no arrays')
    n = leaves[0].shape[0]
    for leaf in leaves:
      if leaf.shape[0] != n:
        raise ValueError(f'data_parallel: sharded arguments disagree on the batch size '
                         f'({n} vs {leaf.shape[0]})')
    args = list(args)
    for i in sharded_argnums:
      args[i] = jax.tree.map(lambda x: pad_rows(x, d)[0], args[i])
    in_specs = tuple(P(DATA) if i in sharded_argnums else P() for i in range(len(args)))
    out = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(DATA),
                        check_vma=check_vma)(*args)
    if padded_size(n, d) == n:
      return out
    return jax.tree.map(lambda x: x[:n], out)

  return jax.jit(wrapped)


def peak_memory_bytes(mesh: Mesh | None = None) -> int | None:
  """Largest `peak_bytes_in_use` over the mesh's devices, None where the backend has no stats
  (XLA:CPU)."""
  devices = mesh.devices.ravel().tolist() if mesh is not None else jax.devices()
  peaks = []
  for dev in devices:
    try:
      stats = dev.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without memory stats)
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


# ----------------------------------------------------------------------------- host CPU devices

# The XLA:CPU client's limit of queued computations per device (`CpuClientOptions`; JAX does not
# expose it).
MAX_IN_FLIGHT_PER_DEVICE = 32


def _env_int(environ: MutableMapping[str, str], name: str) -> int | None:
  value = environ.get(name, '').strip()
  return int(value) if value.isdigit() else None


def requested_cpu_devices(environ: MutableMapping[str, str]) -> int:
  """The number of CPU devices JAX will create from `environ`: `JAX_NUM_CPU_DEVICES` when set
  (>= 0), else the last `--xla_force_host_platform_device_count=D` in `XLA_FLAGS`, else 1."""
  num = _env_int(environ, 'JAX_NUM_CPU_DEVICES')   # None when unset or -1 (JAX's "unset")
  if num is not None:
    return max(1, num)
  found = re.findall(r'--xla_force_host_platform_device_count=(\d+)', environ.get('XLA_FLAGS', ''))
  return max(1, int(found[-1])) if found else 1


def host_cpu_count(environ: MutableMapping[str, str]) -> int:
  """CPUs XLA:CPU assumes: `NPROC` when set (a CPU reservation), else the CPUs this process may
  run on."""
  nproc = _env_int(environ, 'NPROC')
  if nproc is not None:
    return nproc
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def host_threads_needed(num_devices: int) -> int:
  """Threads XLA:CPU needs for `num_devices` host devices: 2 D when D > 1 (see
  `configure_host_threads`), else no constraint (1)."""
  return 2 * num_devices if num_devices > 1 else 1


def host_thread_problem(num_devices: int, environ: MutableMapping[str, str]) -> str | None:
  """Why XLA:CPU's thread pool is too small for `num_devices` host devices with `environ`, or None.

  XLA:CPU sizes its pool max(`PJRT_NPROC`, else `NPROC`, else the CPU count; D).
  """
  need = host_threads_needed(num_devices)
  threads = _env_int(environ, 'PJRT_NPROC')
  if threads is not None:
    source = f'PJRT_NPROC={threads}'
  else:
    threads = host_cpu_count(environ)
    source = f'NPROC={threads}' if _env_int(environ, 'NPROC') is not None else f'{threads} CPU(s)'
  threads = max(threads, num_devices)
  if threads >= need:
    return None
  return (f'XLA:CPU has {threads} threads ({source}) for {num_devices} host CPU devices: a '
          f'multi-device step can deadlock once more than {MAX_IN_FLIGHT_PER_DEVICE} '
          f"computations per device are queued, and XLA then aborts after 40 s ('Termination "
          f"timeout ... all reduce'); set PJRT_NPROC={need} or more")


def configure_host_threads(environ: MutableMapping[str, str], *,
                           jax_started: bool | None = None) -> str | None:
  """Gives XLA:CPU enough threads for the requested host devices; call before JAX starts.

  Why: with D host CPU devices, XLA:CPU runs a multi-device step as D programs, one per device,
  each holding a thread of the client's pool until it finishes; the D programs meet at every
  cross-device reduction (BatchNorm statistics, gradients: an all-reduce rendezvous). Dispatch
  is asynchronous, so a loop that does not wait for its results queues steps; once a device has
  `MAX_IN_FLIGHT_PER_DEVICE` computations queued, launching the next step blocks a pool thread
  on that device's queue (up to D threads, one per device). The pool has max(#CPUs, D) threads:
  on a host with fewer than 2 D CPUs a blocked launch leaves too few threads for the running
  step, D - 1 of its programs wait at the all-reduce for the last one, which never gets a
  thread, and after 40 s XLA aborts the process ("Termination timeout ... Exiting to ensure a
  consistent program state"). With 2 D threads the running step always has its D (one thread
  dispatching, as in every loop of this package).

  What: when `requested_cpu_devices(environ)` = D > 1 and the pool would have fewer than 2 D
  threads, sets `environ['PJRT_NPROC'] = 2 D` (read by XLA:CPU when JAX starts; it sizes the
  client pool and the intra-op pool). Nothing changes when JAX has already started
  (`make_mesh` then warns) or when the CPUs suffice.

  Args:
    environ: the process environment (`os.environ`), changed in place.
    jax_started: whether JAX's backends exist already (default: asks JAX).

  Raises:
    ValueError naming `PJRT_NPROC` when it is set explicitly below 2 D.

  Returns:
    the line to log when it set `PJRT_NPROC`, else None.
  """
  if jax_started is None:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    jax_started = xla_bridge.backends_are_initialized()
  if jax_started:
    return None
  num_devices = requested_cpu_devices(environ)
  problem = host_thread_problem(num_devices, environ)
  if problem is None:
    return None
  if _env_int(environ, 'PJRT_NPROC') is not None:
    raise ValueError(f'{problem}, or unset it, or use fewer host devices '
                     f'(--xla_force_host_platform_device_count={num_devices})')
  need = host_threads_needed(num_devices)
  environ['PJRT_NPROC'] = str(need)
  return (f'{num_devices} host CPU devices on {host_cpu_count(environ)} CPU(s): XLA:CPU threads '
          f'set to PJRT_NPROC={need}, 2 per device, so that multi-device steps cannot deadlock')
