"""The persistent compilation cache, compile counting and the log filter."""

import json
import logging as py_logging
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from pni_jax import compilation
from pni_jax import logs

REPO = pathlib.Path(__file__).resolve().parent.parent

_SCRIPT = '''
import json, sys
import jax, jax.numpy as jnp, ml_collections
from pni_jax import compilation
rt = ml_collections.ConfigDict(dict(compilation_cache=True, compilation_cache_dir=sys.argv[1]))
compilation.setup_cache(rt)
with compilation.CompileCounter() as c:
  f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
  f(jnp.ones((32, 32))).block_until_ready()
  f(jnp.ones((32, 32))).block_until_ready()     # same shape: no new compile
print(json.dumps(c.as_dict()))
'''


def _run(cache_dir):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _SCRIPT, str(cache_dir)], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_a_second_process_loads_its_compiles_from_the_cache(tmp_path):
  cold = _run(tmp_path / 'xla')
  assert cold['compiles'] >= 1 and cold['cache_hits'] == 0
  assert any((tmp_path / 'xla').iterdir())
  warm = _run(tmp_path / 'xla')
  assert warm['cache_hits'] == warm['compiles'] == cold['compiles']


def test_cache_settings(tmp_path):
  off = ml_collections.ConfigDict(dict(compilation_cache=False, compilation_cache_dir=''))
  assert compilation.setup_cache(off) is None
  blocked = tmp_path / 'file'
  blocked.write_text('x')
  bad = ml_collections.ConfigDict(dict(compilation_cache=True,
                                       compilation_cache_dir=str(blocked / 'sub')))
  with pytest.raises(ValueError, match='runtime.compilation_cache_dir'):
    compilation.setup_cache(bad)
  assert compilation.default_cache_dir().parts[-2:] == ('pni_jax', 'xla')


def _record(path, level=py_logging.INFO):
  return py_logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_log_filter_keeps_our_lines_and_warnings_only():
  own = os.path.join(REPO, 'pni_jax', 'fit.py')
  tool = os.path.join(REPO, 'tools', 'bench_e2e.py')
  library = os.path.join(os.path.dirname(py_logging.__file__), 'orbax', 'checkpoint', 'x.py')
  f = logs.OwnLinesFilter()
  assert f.filter(_record(own)) and f.filter(_record(tool))
  assert not f.filter(_record(library))
  assert f.filter(_record(library, py_logging.WARNING))


def test_table_lines_up_columns():
  text = logs.table([dict(category='cable', seconds=12.3456, compiles=91),
                     dict(category='tokens', seconds=1234.0, compiles=0)],
                    ('category', 'seconds', 'compiles'))
  lines = text.splitlines()
  assert lines[0].split() == ['category', 'seconds', 'compiles']
  assert lines[2].split() == ['cable', '12.3456', '91']
  assert lines[3].split() == ['tokens', '1234', '0']
  assert all(len(l.rstrip()) <= len(lines[1]) for l in lines)
  assert lines[2].index('12.3456') == lines[0].index('seconds')


def test_a_train_state_compiles_its_optimiser_state_once():
  # Adam's zero moments come from one compiled function per model and settings, not one
  # eager program per parameter shape; a second state of the same model compiles nothing, and
  # the moments equal the eager `tx.init`.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from pni_jax import train_loop  # pylint: disable=g-import-not-at-top

  class Odd(nn.Module):      # parameter shapes no other test uses: nothing cached before
    @nn.compact
    def __call__(self, x):
      for width in (37, 41, 43, 47, 53, 59):
        x = nn.Dense(width)(x)
      return x

  model = Odd()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 31)))
  with compilation.CompileCounter() as first:
    state = train_loop.TrainState.create(model, variables, 1e-3)
  assert first.compiles <= 2, first.as_dict()
  with compilation.CompileCounter() as second:
    train_loop.TrainState.create(model, variables, 1e-3)
  assert second.compiles == 0, second.as_dict()
  eager = state.tx.init(state.params)
  assert jax.tree.structure(eager) == jax.tree.structure(state.opt_state)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.dtype == b.dtype
