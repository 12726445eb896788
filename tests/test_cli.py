"""Command line: config errors name the bad setting and the valid ones, without a traceback."""

import os
import subprocess
import sys

import pytest

from configs import demo
from pni_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'pni_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_unknown_config_field_lists_the_valid_ones(tmp_path):
  res = _main('--config=configs/demo.py', f'--workdir={tmp_path}', '--config.data.rot=x')
  assert res.returncode == 2
  assert 'unknown config field --config.data.rot' in res.stderr
  assert 'data.root' in res.stderr and 'Traceback' not in res.stderr


def test_inconsistent_settings_are_named(tmp_path):
  res = _main('--config=configs/demo.py', f'--workdir={tmp_path}', '--config.data.crop=999')
  assert res.returncode != 0
  assert 'config.data.crop (999) must not exceed config.data.resize (256)' in res.stderr
  assert not any(tmp_path.iterdir())       # nothing written before the config is checked


def test_list_fields_from_the_command_line_are_split():
  cfg = demo.get_config()
  cfg.data.categories = ('tokens, weave',)
  cfg.model.ensemble = ('(wide_resnet101_2,densenet201)',)
  cfg.model.ensemble_weights = ('a.ckpt,',)
  out = cli.normalize_config(cfg)
  assert out.data.categories == ('tokens', 'weave')
  assert out.model.ensemble == ('wide_resnet101_2', 'densenet201')
  assert out.model.ensemble_weights == ('a.ckpt', '')


@pytest.mark.parametrize('field,value,message', [
    ('data.name', 'imagenet', 'config.data.name must be one of'),
    ('model.scoring.combine', 'sum', 'config.model.scoring.combine must be one of'),
    ('model.aggregation_size', 4, 'config.model.aggregation_size must be odd'),
])
def test_validation_names_the_setting(field, value, message):
  cfg = demo.get_config()
  node = cfg
  *path, last = field.split('.')
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=message):
    cli.normalize_config(cfg)
