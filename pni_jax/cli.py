"""Command-line plumbing for `pni_jax.main`: friendly flag errors, config checks, dispatch."""

from __future__ import annotations

import os
import re
import sys

import ml_collections
from absl import app
from absl import flags
from absl import logging

from pni_jax import config as config_lib


def _valid_keys(cfg: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_valid_keys(v, f'{prefix}{k}.'))
    else:
      keys.append(f'{prefix}{k}')
  return keys


def _bad_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=` override whose path is not a field of the default config."""
  valid = set(_valid_keys(config_lib.base_config()))
  for arg in argv[1:]:
    m = re.match(r'--config\.([\w.]+)(=|$)', arg)
    if m and m.group(1) not in valid:
      return m.group(1)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that names the valid keys when a `--config.x` override is unknown
  (ml_collections alone gives a raw traceback)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f'FATAL flags error: {e}\nPass --helpfull to see the flags.\n')
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    bad = _bad_override(argv)
    if bad is None:
      raise
    parent = bad.rsplit('.', 1)[0] if '.' in bad else ''
    keys = [k for k in _valid_keys(config_lib.base_config())
            if not parent or k.startswith(parent + '.')]
    sys.stderr.write(f'FATAL unknown config field --config.{bad} ({e}).\n'
                     f'Valid fields{" under " + parent if parent else ""}: '
                     f'{", ".join(keys)}\n')
    sys.exit(2)


def _split_names(values) -> tuple[str, ...]:
  """('a,b',) or ('(a, b)',) from the command line -> ('a', 'b')."""
  out = []
  for v in values or ():
    for part in str(v).strip('()[] ').split(','):
      part = part.strip().strip('\'"')
      if part:
        out.append(part)
  return tuple(out)


def _split_floats(value, name: str) -> tuple[float, ...]:
  """'0.1,0.5,1' / ('0.1,0.5',) / 2.0 from the command line -> (0.1, 0.5, 1.0)."""
  parts = _split_names(value if isinstance(value, (tuple, list)) else (value,))
  try:
    return tuple(float(p) for p in parts)
  except ValueError:
    raise ValueError(f'config.{name} must be a list of numbers such as 0.1,0.5,1; got '
                     f'{value!r}') from None


def normalize_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Copies `cfg`, normalises list-valued fields from the command line, and checks values."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.data.categories = _split_names(cfg.data.categories)
  cfg.model.layers = _split_names(cfg.model.layers)
  cfg.model.ensemble = _split_names(cfg.model.ensemble)
  weights = tuple(str(w) for w in cfg.model.ensemble_weights)
  if len(weights) == 1 and ',' in weights[0]:   # 'a,,b' from the command line; '' = embedded
    weights = tuple(w.strip() for w in weights[0].strip('()[] ').split(','))
  cfg.model.ensemble_weights = weights
  if 'ablations' in cfg.eval:
    cfg.eval.ablations = _split_names(cfg.eval.ablations)
  if 'sweep' in cfg:
    from pni_jax import scoring  # pylint: disable=g-import-not-at-top
    for name in scoring.HPARAM_NAMES:
      if name in cfg.sweep:
        cfg.sweep[name] = _split_floats(cfg.sweep[name], f'sweep.{name}')
  config_lib.validate(cfg)
  return cfg


def _configure_devices() -> None:
  """Host CPU devices get the threads they need before JAX starts
  (`sharding.configure_host_threads`); a `PJRT_NPROC` too small for them is a usage error."""
  from pni_jax import sharding
  try:
    line = sharding.configure_host_threads(os.environ)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if line:
    logging.info(line)


def run(cfg, workdir: str, *, mode: str = 'fit_eval', images: str | None = None,
        category: str | None = None, out: str | None = None) -> None:
  if not workdir:
    raise app.UsageError('--workdir is required')
  _configure_devices()
  from pni_jax import compilation
  try:
    compilation.setup_cache((cfg if cfg is not None else config_lib.base_config()).runtime)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if mode == 'predict':
    if not images:
      raise app.UsageError('--mode=predict needs --images=DIR_OR_GLOB')
    from pni_jax import predict
    predict.run(workdir, images, category=category, out=out)
    return
  if mode not in ('fit_eval', 'sweep'):
    raise app.UsageError(f'unknown --mode={mode}')
  if cfg is None:
    raise app.UsageError('--config is required (e.g. --config=configs/demo.py)')
  try:
    cfg = normalize_config(cfg)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if mode == 'sweep':
    from pni_jax import sweep
    try:
      sweep.run(cfg, workdir)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(str(e)) from None
    return
  from pni_jax import pipeline
  pipeline.run(cfg, workdir)
