"""Resumable training checkpoints shared by the Optax loops (neighbourhood MLP, refinement net).

Each checkpoint step holds a pytree of arrays (train state, best weights, ...) and a JSON record
(the run's fingerprint and history), written by an orbax CheckpointManager that keeps the last
two steps. Everything random in those loops derives from (key, step), so a run resumed from a
checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def key_words(key: jax.Array) -> list[int]:
  """A PRNG key (typed or raw uint32) as a list of ints, for a JSON fingerprint."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(v) for v in np.asarray(key).ravel()]


def json_ready(tree):
  """Python floats / ints / lists only (NaN kept: orbax's JSON writer accepts it)."""
  if isinstance(tree, dict):
    return {k: json_ready(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_ready(v) for v in tree]
  if isinstance(tree, (np.generic, jax.Array)):
    return tree.item()
  return tree


class TrainCheckpoints:
  """Orbax CheckpointManager holding an arrays pytree and a JSON record per step."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # slow import: only when checkpointing
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest(self) -> int | None:
    return self._manager.latest_step()

  def restore_record(self, step: int) -> dict:
    ocp = self._ocp
    return self._manager.restore(step, args=ocp.args.Composite(
        record=ocp.args.JsonRestore()))['record']

  def restore_arrays(self, step: int, arrays_like):
    ocp = self._ocp
    return self._manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(arrays_like)))['arrays']

  def save(self, step: int, arrays, record: dict) -> None:
    ocp = self._ocp
    self._manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(record)))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
