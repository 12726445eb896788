"""The fitted model: a pytree of arrays plus JSON metadata, saved and restored with orbax.

`PNIModel` holds everything inference needs beside the backbone weights:
  c_emb        [K_emb, d] float32   embedding coreset
  emb_to_dist  [K_emb] int32        nearest C_dist row of each C_emb row
  num_dist     K_dist               C_dist = c_emb[:num_dist] (a prefix of the same greedy run)
  position     [H', W', K_dist]     p(c_dist | x), or None
  mlp          {'params', 'batch_stats'} of the neighbourhood MLP, or None
  refine       variables of the refinement network, or None
  stats        dict of float32 scalars / small arrays (thresholds, normalisation)
Restoring gives bit-identical arrays, hence bit-identical maps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
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


def save(model: PNIModel, directory: str | os.PathLike) -> None:
  """Writes the model to `directory` atomically (a temp dir renamed into place)."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = directory.with_name(directory.name + '.tmp')
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(tmp / 'arrays', _arrays(model))
  meta = dict(model.meta, format_version=FORMAT_VERSION,
              present=sorted(k for k in ('position', 'mlp', 'refine') if getattr(model, k) is not None))
  (tmp / 'meta.json').write_text(json.dumps(meta, indent=2, sort_keys=True))
  if directory.exists():
    shutil.rmtree(directory)
  os.replace(tmp, directory)


def load(directory: str | os.PathLike) -> PNIModel:
  """Restores a model written by `save`; arrays come back bit-identical (numpy on host)."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  meta_path = directory / 'meta.json'
  if not meta_path.exists():
    raise FileNotFoundError(f'no fitted model at {directory} (missing {meta_path.name}); '
                            'fit one with `python -m pni_jax.main --config=... --workdir=...`')
  meta = json.loads(meta_path.read_text())
  if meta.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{directory}: model format {meta.get("format_version")} is not supported '
                     f'(expected {FORMAT_VERSION}); refit the model')
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(directory / 'arrays')
  present = set(meta.pop('present', ()))
  meta.pop('format_version', None)
  return PNIModel(
      c_emb=tree['c_emb'], emb_to_dist=tree['emb_to_dist'],
      position=tree.get('position') if 'position' in present else None,
      mlp=tree.get('mlp') if 'mlp' in present else None,
      refine=tree.get('refine') if 'refine' in present else None,
      stats=dict(tree.get('stats', {})), meta=meta)


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
  return jax.tree.map(jnp.asarray, tree)
