"""XLA compilations: the persistent compilation cache and a per-stage count of compiles.

A batch job over many categories should pay each compile once: shapes that do not depend on the
category (fixed batch / chunk sizes, padded buckets) let one process reuse its compiled
functions, and the persistent cache (a folder on disk) lets the next process load them instead
of compiling again.

`setup_cache(cfg.runtime)` turns the cache on (default folder: $XDG_CACHE_HOME/pni_jax/xla or
~/.cache/pni_jax/xla; `runtime.compilation_cache_dir` to choose another, `runtime.compilation_cache
= False` to switch it off). `CompileCounter` counts the compiles (and cache hits) that happen
while it is active, from jax.monitoring events.
"""

from __future__ import annotations

import os
import pathlib
import re
import threading

import jax
import jax.monitoring

# jax.monitoring event names (jax >= 0.4.30): one backend compile per executable built; with the
# persistent cache on, a hit is counted as a compile request served from disk.
_COMPILE = '/jax/core/compile/backend_compile_duration'
_HIT = '/jax/compilation_cache/cache_hits'
_SAVED = '/jax/compilation_cache/compile_time_saved_sec'


def default_cache_dir() -> pathlib.Path:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'pni_jax' / 'xla'


def setup_cache(cfg_runtime) -> str | None:
  """Enables JAX's persistent compilation cache as `cfg_runtime` says; returns its folder (None
  when off). Call before the first compile of the process."""
  if not bool(cfg_runtime.compilation_cache):
    jax.config.update('jax_compilation_cache_dir', None)
    return None
  folder = pathlib.Path(str(cfg_runtime.compilation_cache_dir) or default_cache_dir())
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f'config.runtime.compilation_cache_dir={str(folder)!r} cannot be created '
                     f'({e}); choose another folder or set runtime.compilation_cache=False') from e
  jax.config.update('jax_compilation_cache_dir', str(folder))
  # Every executable is worth keeping: a batch job recompiles the same small functions per
  # category otherwise.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return str(folder)


class CompileCounter:
  """Counts backend compiles while active (thread-safe); one listener for the process.

  Usage: `with CompileCounter() as c: ...; c.compiles, c.cache_hits, c.compile_seconds`. Counts
  are of executables built: a hit of the persistent cache counts in `cache_hits` and in
  `compiles` (it still builds the executable, from the cached binary, in a fraction of the time).
  """

  _lock = threading.Lock()
  _active: list['CompileCounter'] = []
  _installed = False

  def __init__(self):
    self.compiles = 0
    self.cache_hits = 0
    self.compile_seconds = 0.0
    self.saved_seconds = 0.0

  @classmethod
  def _install(cls) -> None:
    with cls._lock:
      if cls._installed:
        return
      jax.monitoring.register_event_duration_secs_listener(cls._on_duration)
      jax.monitoring.register_event_listener(cls._on_event)
      cls._installed = True

  @classmethod
  def _on_duration(cls, event: str, seconds: float, **kwargs) -> None:
    del kwargs
    if event not in (_COMPILE, _SAVED):
      return
    with cls._lock:
      for c in cls._active:
        if event == _COMPILE:
          c.compiles += 1
          c.compile_seconds += float(seconds)
        else:
          c.saved_seconds += float(seconds)

  @classmethod
  def _on_event(cls, event: str, **kwargs) -> None:
    del kwargs
    if event != _HIT:
      return
    with cls._lock:
      for c in cls._active:
        c.cache_hits += 1

  def __enter__(self) -> 'CompileCounter':
    self._install()
    with self._lock:
      self._active.append(self)
    return self

  def __exit__(self, *exc) -> None:
    with self._lock:
      self._active.remove(self)

  def as_dict(self) -> dict:
    return dict(compiles=self.compiles, cache_hits=self.cache_hits,
                compile_s=round(self.compile_seconds, 3))


def dot_operand_types(hlo_text: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in XLA's optimised HLO (`compiled.as_text()`), i.e.
  after XLA's own passes: a bfloat16 product that XLA:CPU could not hand to its bfloat16 kernels
  shows here as ('f32', 'f32') behind converts."""
  types = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', hlo_text))
  return [tuple(types.get(name, '?') for name in re.findall(r'%([\w.\-]+)', operands)[:2])
          for operands in re.findall(r' dot\(([^)]*)\)', hlo_text)]
