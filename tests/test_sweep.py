"""Sweeps: the grid from config.sweep, the compiled vmapped grid against the per-point loop and
the evaluation scorer, and a whole sweep over a small fitted workdir."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pni_jax import cli
from pni_jax import data as data_lib
from pni_jax import infer
from pni_jax import metrics
from pni_jax import model as model_lib
from pni_jax import scoring
from pni_jax import sweep
from pni_jax.config import base_config
from test_infer import _arrays
from test_infer import _model_config

SIZE = 64


def _config(root):
  c = base_config()
  c.data.name, c.data.root, c.data.categories = 'generated', str(root), ('tokens',)
  c.data.resize = c.data.crop = SIZE
  c.data.batch_size = 4
  g = c.data.generated
  g.image_size, g.num_train, g.num_test_good, g.num_test_defect = SIZE, 2, 2, 3
  c.model = _model_config()
  c.model.use_refinement = False
  c.model.scoring.tau_scale = 8.0
  return c


def test_grid_axes_from_the_command_line_and_their_errors():
  c = base_config()
  c.data.root = '/x'
  c.sweep.tau_scale = ('0.1,0.5,1',)
  c.sweep.sigma = ('2, 4',)
  c = cli.normalize_config(c)
  axes = sweep.grid_axes(c)
  assert axes == {'tau_scale': (0.1, 0.5, 1.0), 'sigma': (2.0, 4.0)}
  points = sweep.grid_points(axes)
  assert len(points) == 6 and points[1] == {'tau_scale': 0.1, 'sigma': 4.0}
  with pytest.raises(ValueError, match='list of numbers'):
    c.sweep.temperature = ('a,b',)
    cli.normalize_config(c)
  with pytest.raises(ValueError, match='nothing to sweep'):
    sweep.check_axes({}, c.model, infer.Variant(True, True))
  with pytest.raises(ValueError, match='refinement'):
    sweep.check_axes(axes, c.model, infer.Variant(True, True, True))
  with pytest.raises(ValueError, match=r'temperature: values must be > 0'):
    sweep.check_axes({'temperature': (1.0, 0.0)}, c.model, infer.Variant(True, True))


@pytest.fixture(scope='module')
def cache():
  m = _model_config()
  m.scoring.tau_scale = 8.0
  arrays = _arrays(jax.random.key(6))
  rng = np.random.default_rng(7)
  feats = rng.normal(size=(5, 8, 8, 16)).astype(np.float32)
  masks = np.zeros((5, 32, 32), bool)
  masks[3:, 10:20, 8:16] = True
  labels = np.asarray([0, 0, 0, 1, 1])
  axes = {'tau_scale': (0.5, 8.0, 40.0), 'temperature': (0.5, 2.0), 'sigma': (1.0, 3.0)}
  spec = sweep.sweep_spec(m, infer.Variant(True, True), 32, axes)
  c = sweep.build_cache(arrays, feats, masks, labels, spec, cache_mb=64)
  return m, arrays, feats, c, spec, axes


def test_vmapped_grid_equals_the_per_point_loop_and_the_scorer(cache):
  m, arrays, feats, c, spec, axes = cache
  points = sweep.grid_points(axes)
  base = scoring.hparams_from_config(m)
  batched = sweep.evaluate_grid(c, points, base, spec, chunk=5)       # chunks of 5, last padded
  single = sweep.evaluate_grid(c, points, base, spec, chunk=1)
  for b, s in zip(batched, single):
    for k in b:
      assert b[k] == pytest.approx(s[k], abs=1e-6), k
  # Scores of the compiled grid equal the evaluation path's scorer, point by point.
  hp = jax.tree.map(lambda *x: jnp.stack(x), *[scoring.hparams_from_config(m, **p)
                                              for p in points])
  maps, image, _ = sweep.grid_scores(c.group_sq, c.nearest_sq, c.logits, c.position,
                                     c.code_count, c.feats, c.c_emb, hp, hp, spec=spec,
                                     num_emb=c.num_emb, grid=c.grid)
  scorer = jax.jit(lambda a, f, h: infer.score_features(a, f, h, spec))
  for g in (0, 5, len(points) - 1):
    out = scorer(arrays, jnp.asarray(feats), jax.tree.map(lambda x: x[g], hp))
    np.testing.assert_allclose(np.asarray(maps[g]), np.asarray(out['maps']), rtol=1e-5,
                               atol=1e-5)
    want = metrics.evaluate(np.asarray(out['image']), c.truth.labels, np.asarray(out['maps']),
                            c.truth.anomalous)
    assert batched[g]['pixel_auroc'] == pytest.approx(want['pixel_auroc'], abs=1e-5)
    assert batched[g]['aupro'] == pytest.approx(want['aupro'], abs=1e-5)
  assert len({round(r['allowed_fraction'], 6) for r in batched}) > 1


def test_sweep_of_a_fitted_workdir_writes_tables_and_figures(tmp_path):
  cfg = _config(tmp_path / 'data')
  data_lib.generate(str(tmp_path / 'data'), seed=0, image_size=SIZE, num_train=2,
                    num_test_good=2, num_test_defect=3, categories=['tokens'])
  arrays = jax.tree.map(np.asarray, _arrays(jax.random.key(8)))
  model_lib.save(model_lib.PNIModel(
      c_emb=arrays['c_emb'], emb_to_dist=arrays['emb_to_dist'], position=arrays['position'],
      mlp=arrays['mlp'], meta={'num_dist': 12, 'config': cfg.to_dict(), 'base_fingerprint': 'x'}),
      tmp_path / 'work' / 'tokens' / 'model')
  cfg.sweep.tau_scale = (1.0, 8.0)
  cfg.sweep.sigma = (1.0, 2.0, 4.0)
  cfg = cli.normalize_config(cfg)
  rows = sweep.run(cfg, tmp_path / 'work')
  assert len(rows) == 6
  work = tmp_path / 'work'
  with open(work / 'sweep.csv') as f:
    table = list(csv.reader(f))
  assert table[0][:3] == ['category', 'tau_scale', 'sigma'] and len(table) == 1 + 6 + 6
  assert (work / 'sweep_tau_scale_sigma.png').stat().st_size > 1000
  assert 'Best mean P-AUROC' in (work / 'sweep.md').read_text()
  assert (work / 'tokens' / 'sweep' / 'features.npy').exists()       # the backbone ran once
  again = sweep.run(cfg, work)                                          # from the cache
  assert [r['pixel_auroc'] for r in again] == [r['pixel_auroc'] for r in rows]
