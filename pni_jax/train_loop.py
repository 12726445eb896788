"""The training-loop helper shared by the Optax loops (neighbourhood MLP, refinement network).

Each loop keeps only its step function and its data; what they share lives here:

  TrainState    params, batch statistics, Adam state and the step count as a pytree; the model
                and the optimiser's hyper-parameters are static (hashable) fields, so a jitted
                step compiles once per model shape, not once per run. Loops subclass it to add
                their own static settings (the MLP's window, the refinement's loss).
  Run           one run's checkpoint directory (orbax, `checkpoints.TrainCheckpoints`): resume
                with a fingerprint check, save with the run's record, best-weights keeping, and
                the progress lines (done / total, metrics, elapsed, ETA).
  summarize     clu metrics -> floats. Steps merge their metrics on the device (pass the running
                collection in and out of the jitted step, starting from `Metrics.empty()`), so
                the host reads them only at log points.

Everything random in the loops derives from (key, step), so a run killed and resumed from its
checkpoint directory ends with bit-identical weights.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import optax

from pni_jax import checkpoints
from pni_jax.progress import format_seconds


def schedule(learning_rate: float, decay_steps: int = 0,
             decay_factor: float = 1.0) -> optax.Schedule:
  """Staircase step decay: lr * decay_factor ** floor(step / decay_steps); 0 steps = constant."""
  if decay_steps == 0:
    return optax.constant_schedule(learning_rate)
  return optax.exponential_decay(learning_rate, transition_steps=decay_steps,
                                 decay_rate=decay_factor, staircase=True)


@flax.struct.dataclass
class TrainState:
  """Training state: arrays (step, params, batch_stats, opt_state) plus static settings.

  Like flax's `TrainState`, but the optimiser (Adam with `schedule`) is rebuilt from hashable
  hyper-parameters instead of being stored as closures. Parameters and Adam moments are float32
  (the master weights) whatever the model's compute dtype.
  """
  step: jax.Array                    # [] int32, optimiser steps taken
  params: Any
  batch_stats: Any
  opt_state: Any
  model: nn.Module = flax.struct.field(pytree_node=False)
  learning_rate: float = flax.struct.field(pytree_node=False)
  decay_steps: int = flax.struct.field(pytree_node=False, default=0)   # 0 = constant lr
  decay_factor: float = flax.struct.field(pytree_node=False, default=1.0)

  @classmethod
  def create(cls, model: nn.Module, variables: Mapping, learning_rate: float, **static):
    """A state around `variables` {'params', 'batch_stats'?} with a fresh Adam state."""
    state = cls(step=jnp.zeros((), jnp.int32), params=variables['params'],
                batch_stats=variables.get('batch_stats', {}), opt_state=None, model=model,
                learning_rate=float(learning_rate), **static)
    return state.replace(opt_state=_init_opt_state(state))

  @property
  def tx(self) -> optax.GradientTransformation:
    return optax.adam(schedule(self.learning_rate, self.decay_steps, self.decay_factor))

  def apply_gradients(self, grads, batch_stats) -> 'TrainState':
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)

  @property
  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def arrays(self) -> dict:
    """The arrays a checkpoint holds."""
    return {'step': self.step, 'params': self.params, 'batch_stats': self.batch_stats,
            'opt_state': self.opt_state}

  def with_arrays(self, arrays: Mapping) -> 'TrainState':
    """This state with the arrays of `arrays()` replaced (e.g. restored from a checkpoint)."""
    return self.replace(step=arrays['step'], params=arrays['params'],
                        batch_stats=arrays['batch_stats'], opt_state=arrays['opt_state'])


@jax.jit
def _init_opt_state(state: TrainState):
  """`state.tx.init(state.params)` as one compiled function: eagerly, Adam's zero moments
  compiled one small program per parameter shape (62 in a demo run, ~2 s on 2 CPU cores); this
  compiles once per model and optimiser settings (static fields of the state)."""
  return state.tx.init(state.params)


def summarize(metrics) -> dict[str, float]:
  """A clu metrics collection -> {name: float} (reads the device once)."""
  return {k: float(v) for k, v in jax.device_get(metrics.compute()).items()}


class Best:
  """The weights of the best-scoring point so far (e.g. best validation accuracy per epoch)."""

  def __init__(self, state: TrainState):
    self.score, self.index, self.variables = -math.inf, -1, state.variables

  def offer(self, score: float, index: int, state: TrainState) -> bool:
    """Keeps `state`'s weights when `score` beats the best so far; True when it did."""
    if score > self.score:
      self.score, self.index, self.variables = float(score), int(index), state.variables
      return True
    return False

  def record(self) -> dict:
    return {'best_index': self.index, 'best_score': self.score}

  def restore(self, variables: Mapping, record: Mapping) -> None:
    self.variables = dict(variables)
    self.index, self.score = int(record['best_index']), float(record['best_score'])


class Run:
  """Checkpoints, resume and progress lines of one training run.

  `what` names the run in its lines ('refinement', 'neighbourhood MLP'); `unit` is what
  `total` counts ('iteration', 'epoch'). Without `ckpt_dir` nothing is saved or resumed.
  Use as a context manager (pending checkpoint writes finish on exit).
  """

  def __init__(self, what: str, ckpt_dir: str | None, fingerprint: Mapping,
               log: Callable[[str], None], *, total: int, unit: str, every: float = 0.0):
    self.what, self.ckpt_dir, self.log = what, ckpt_dir, log
    self.total, self.unit, self.every = int(total), unit, float(every)
    self._last_line = -float('inf')
    self.fingerprint = checkpoints.json_ready(dict(fingerprint))
    self.ckpts = checkpoints.TrainCheckpoints(ckpt_dir) if ckpt_dir else None
    self.start = 0
    self.t_start = time.time()

  def __enter__(self) -> 'Run':
    return self

  def __exit__(self, *exc) -> None:
    if self.ckpts is not None:
      self.ckpts.close()

  def check_fingerprint(self, record: Mapping) -> None:
    """ValueError naming the first setting in which the checkpoint's run differs from this one."""
    saved = record.get('fingerprint', {})
    for field in sorted(set(self.fingerprint) | set(saved)):
      if saved.get(field) != self.fingerprint.get(field):
        raise ValueError(f'checkpoint in {self.ckpt_dir} was written by a different run: {field} = '
                         f'{saved.get(field)!r} there, {self.fingerprint.get(field)!r} now; use a '
                         'fresh ckpt_dir or the original settings')

  def resume(self, arrays_like, place: Callable[[Any], Any] = lambda x: x):
    """(start, arrays, record) of the latest checkpoint, or (0, None, None) when there is none.

    arrays_like: a pytree of the arrays' shapes (e.g. the fresh state's); `place` puts the
    restored arrays where the loop keeps them (`sharding.replicate`, `jax.device_put`).
    """
    if self.ckpts is None or self.ckpts.latest() is None:
      return 0, None, None
    start = int(self.ckpts.latest())
    record = self.ckpts.restore_record(start)
    self.check_fingerprint(record)
    arrays = place(self.ckpts.restore_arrays(start, arrays_like))
    self.start = start
    self.log(f'{self.what}: resumed from {self.ckpt_dir} at {self.unit} {start}')
    return start, arrays, record

  def save(self, done: int, arrays, **record) -> None:
    """Checkpoint after `done` units: `arrays` (a pytree) and the JSON `record` with the
    fingerprint (no-op without a directory)."""
    if self.ckpts is not None:
      self.ckpts.save(done, arrays, checkpoints.json_ready(
          {'fingerprint': self.fingerprint, **record}))

  def elapsed(self) -> float:
    return time.time() - self.t_start

  def progress(self, done: int, text: str) -> None:
    """Logs '<what> <unit> done/total  <text>  elapsed ..  ETA ..' (ETA from this call's rate):
    the first and the last line, and in between at most one line every `every` seconds (0: every
    call logs)."""
    now = time.time()
    if done < self.total and now - self._last_line < self.every:
      return
    self._last_line = now
    elapsed = self.elapsed()
    rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else 0.0
    self.log(f'{self.what} {self.unit} {done}/{self.total}  {text}  elapsed '
             f'{format_seconds(elapsed)}  ETA {format_seconds(eta)}')


class CompileClock:
  """Seconds spent tracing, lowering and compiling (jax.monitoring '/jax/core/compile/' events)
  between construction and `close()`, in `total`."""

  def __init__(self):
    self.total = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_) -> None:
    if event.startswith('/jax/core/compile/'):
      self.total += float(duration)

  def close(self) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_event)
