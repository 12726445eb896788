"""The fitted model: a pytree of arrays plus JSON metadata, saved and restored with orbax.

`PNIModel` holds everything inference needs beside the backbone weights:
  c_emb        [K_emb, d] float32   embedding coreset
  emb_to_dist  [K_emb] int32        nearest C_dist row of each C_emb row
  num_dist     K_dist               C_dist = c_emb[:num_dist] (a prefix of the same greedy run)
  position     [H', W', K_dist]     p(c_dist | x), or None
  mlp          {'params', 'batch_stats'} of the neighbourhood MLP, or None
  refine       variables of the refinement network, or None
  stats        dict of float32 scalars / small arrays (thresholds, normalisation)
Restoring gives bit-identical arrays, hence bit-identical maps. `save_tree` / `load_tree` do the
same (atomic) write and read for any pytree of arrays with its metadata (e.g. an ensemble's
refinement network, `ensemble.save_refiner`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PNIModel:
  c_emb: jax.Array
  emb_to_dist: jax.Array
  position: jax.Array | None = None
  mlp: Any = None
  refine: Any = None
  stats: dict = dataclasses.field(default_factory=dict)
  meta: dict = dataclasses.field(default_factory=dict)  # JSON-able: config, backbone, grid

  @property
  def num_dist(self) -> int:
    return int(self.meta['num_dist'])

  @property
  def c_dist(self) -> jax.Array:
    return self.c_emb[:self.num_dist]

  def replace(self, **kw) -> 'PNIModel':
    return dataclasses.replace(self, **kw)


def _arrays(model: PNIModel) -> dict:
  tree = {'c_emb': model.c_emb, 'emb_to_dist': model.emb_to_dist, 'stats': dict(model.stats)}
  for name in ('position', 'mlp', 'refine'):
    value = getattr(model, name)
    if value is not None:
      tree[name] = value
  return jax.tree.map(np.asarray, tree)


def _staging(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(where the new model is written, where the old one is set aside) beside `directory`."""
  return (directory.with_name(directory.name + '.tmp'),
          directory.with_name(directory.name + '.old'))


def _recover(directory: pathlib.Path) -> None:
  """Finishes a `save` that stopped between its renames.

  Only the aside copy (`<dir>.old`) left: it was the last complete model, put it back. Both
  left: the new model is complete in place, drop the aside copy. A `<dir>.tmp` is an unfinished
  write and is never read (the next save removes it).
  """
  _, old = _staging(directory)
  if not old.exists():
    return
  if (directory / 'meta.json').exists():
    shutil.rmtree(old)
  elif (old / 'meta.json').exists():
    if directory.exists():
      shutil.rmtree(directory)
    os.replace(old, directory)


def save(model: PNIModel, directory: str | os.PathLike) -> None:
  """Writes the model to `directory`, keeping the previous model until the new one is complete
  (`save_tree`)."""
  meta = dict(model.meta, present=sorted(k for k in ('position', 'mlp', 'refine')
                                         if getattr(model, k) is not None))
  save_tree(_arrays(model), meta, directory)


def save_tree(arrays: dict, meta: dict, directory: str | os.PathLike) -> None:
  """Writes a pytree of arrays (orbax) and JSON metadata to `directory`, atomically.

  Steps: write everything to `<dir>.tmp`; rename the old `<dir>` to `<dir>.old`; rename
  `<dir>.tmp` to `<dir>`; delete `<dir>.old`. A crash at any point leaves a complete tree that
  `load_tree` finds (the old one, or the new one); a failed write removes its `<dir>.tmp`.
  """
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  directory.parent.mkdir(parents=True, exist_ok=True)
  _recover(directory)
  tmp, old = _staging(directory)
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(tmp / 'arrays', jax.tree.map(np.asarray, arrays))
    meta = dict(meta, format_version=FORMAT_VERSION)
    (tmp / 'meta.json').write_text(json.dumps(meta, indent=2, sort_keys=True))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if directory.exists():
    os.replace(directory, old)
  os.replace(tmp, directory)
  if old.exists():
    shutil.rmtree(old)


def exists(directory: str | os.PathLike) -> bool:
  """Whether a complete model is at `directory` (finishing an interrupted `save` first)."""
  directory = pathlib.Path(directory).absolute()
  _recover(directory)
  return (directory / 'meta.json').exists()


def load(directory: str | os.PathLike) -> PNIModel:
  """Restores a model written by `save`; arrays come back bit-identical (numpy on host).

  A save interrupted between its renames is completed first (see `save_tree`).
  """
  tree, meta = load_tree(directory)
  present = set(meta.pop('present', ()))
  return PNIModel(
      c_emb=tree['c_emb'], emb_to_dist=tree['emb_to_dist'],
      position=tree.get('position') if 'position' in present else None,
      mlp=tree.get('mlp') if 'mlp' in present else None,
      refine=tree.get('refine') if 'refine' in present else None,
      stats=dict(tree.get('stats', {})), meta=meta)


def load_tree(directory: str | os.PathLike) -> tuple[dict, dict]:
  """(arrays pytree (numpy, bit-identical), metadata) written by `save_tree`."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  _recover(directory)
  meta_path = directory / 'meta.json'
  if not meta_path.exists():
    raise FileNotFoundError(f'no fitted model at {directory} (missing {meta_path.name}); '
                            'fit one with `python -m pni_jax.main --config=... --workdir=...`')
  try:
    meta = json.loads(meta_path.read_text())
  except ValueError as e:
    raise ValueError(f'{meta_path}: not valid JSON ({e}); refit the model') from e
  if not isinstance(meta, dict) or meta.get('format_version') != FORMAT_VERSION:
    version = meta.get('format_version') if isinstance(meta, dict) else None
    raise ValueError(f'{directory}: model format {version} is not supported '
                     f'(expected {FORMAT_VERSION}); refit the model')
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(directory / 'arrays')
  meta.pop('format_version', None)
  return tree, meta


def arrays(model: PNIModel) -> dict:
  """The model's arrays as a pytree on the default device (pass it to jitted functions).

  {'c_emb', 'emb_to_dist', 'position' | None, 'mlp' | None,
   'refine': {'variables', 'lo', 'hi'} | None}
  """
  refine = None
  if model.refine is not None:
    missing = [k for k in ('refine_lo', 'refine_hi') if k not in model.stats]
    if missing:
      raise ValueError(f'the model has refinement variables but no {" / ".join(missing)} in its '
                       'stats (the normalisation of refine.train_refiner); refit the refinement')
    refine = {'variables': model.refine, 'lo': np.float32(model.stats['refine_lo']),
              'hi': np.float32(model.stats['refine_hi'])}
  tree = {'c_emb': model.c_emb, 'emb_to_dist': model.emb_to_dist, 'position': model.position,
          'mlp': model.mlp, 'refine': refine}
  return jax.tree.map(jax.device_put, tree)   # (jnp.asarray would compile a copy per shape)
