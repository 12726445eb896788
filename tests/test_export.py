"""Portable inference artifact: a tiny fitted model exported, reloaded in this process and in a
fresh one that cannot import pni_jax, and compared with the in-process inference path.

Tolerance: maps and image scores agree to 1e-5 ABSOLUTE (scores here are ~1-20)."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import demo
from pni_jax import artifact_runner
from pni_jax import data as data_lib
from pni_jax import export
from pni_jax import infer
from pni_jax import model as model_lib
from pni_jax import pipeline
from pni_jax.cli import normalize_config

REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-5
# Float32 rounding: the dots of the 1 x 1 convolutions tile their products by the batch's row
# count, so scores of another batch size differ in the last bits (~7e-6 relative seen).
RTOL = 1e-5
ALLOWED_LOADER_IMPORTS = {'__future__', 'argparse', 'collections', 'concurrent', 'json', 'math',
                          'os', 'sys', 'typing', 'jax', 'numpy', 'PIL'}

# Runs a script like `python SCRIPT ARGS`, but with pni_jax (and the rest of this repository)
# unimportable: a meta-path finder placed first refuses the names and the repository is taken
# off sys.path, so an editable install (a .pth path entry or an import hook) cannot serve them.
# Afterwards it fails if any loaded module's file lies inside the repository's source folders.
# (A virtual environment may live inside the repository, as CI's .venv does: its site-packages
# stay usable; only the repository root and its source folders are taken off the path.)
_ISOLATE = r'''
import importlib.abc, os, runpy, sys
repo = os.path.realpath(os.environ['PNI_REPO'])
sources = tuple(os.path.join(repo, d) + os.sep for d in ('pni_jax', 'configs', 'tests', 'tools'))
def ours(p):
  p = os.path.realpath(p or '.')
  return p == repo or (p + os.sep).startswith(sources)
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('pni_jax', 'configs', 'tests', 'tools'):
      raise ImportError('%s is blocked: the artifact must run without the package' % name)
    return None
sys.meta_path.insert(0, Block())
sys.path[:] = [p for p in sys.path if not ours(p)]
script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name='__main__')
bad = sorted(n for n, m in list(sys.modules.items())
             if getattr(m, '__file__', None) and ours(m.__file__))
if bad:
  raise SystemExit('modules loaded from the repository: %s' % bad)
'''


def _run_isolated(script, args, cwd, **extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONSTARTUP')}
  env.update(PNI_REPO=str(REPO), JAX_PLATFORMS='cpu', PYTHONNOUSERSITE='1', **extra_env)
  return subprocess.run([sys.executable, '-c', _ISOLATE, str(script), *map(str, args)],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _tiny_config(root):
  cfg = demo.get_config()
  cfg.data.root = str(root)
  cfg.data.categories = ('tokens',)
  cfg.data.resize = cfg.data.crop = 96
  g = cfg.data.generated
  g.image_size, g.num_train, g.num_test_good, g.num_test_defect = 96, 8, 2, 2
  m = cfg.model
  m.pre_dim, m.dim = 64, 32
  m.coreset.ratio, m.coreset.dist_size = 0.25, 32
  m.neighborhood.width, m.neighborhood.epochs, m.neighborhood.batch_size = 32, 1, 128
  m.neighborhood.infer_chunk = 1024
  m.use_neighborhood = m.use_position = True
  m.use_refinement = False
  cfg.eval.ablations = ()
  cfg.eval.max_figures = 0
  cfg.eval.save_maps = False
  return normalize_config(cfg)


@pytest.fixture(scope='module')
def fitted(tmp_path_factory):
  base = tmp_path_factory.mktemp('export')
  cfg = _tiny_config(base / 'data')
  pipeline.run(cfg, base / 'work')
  return base, base / 'work' / 'tokens'


@pytest.fixture(scope='module')
def artifact(fitted):
  base, cat_dir = fitted
  meta = export.export_model(cat_dir, base / 'artifact')
  return base / 'artifact', meta


@pytest.fixture(scope='module')
def reference(fitted):
  """The in-process path (as pipeline.evaluate_category): padded batch -> features -> scorer."""
  _, cat_dir = fitted
  model = model_lib.load(cat_dir / 'model')
  cfg = ml_collections.ConfigDict(model.meta['config'])
  extractor = infer.make_extractor(cfg)
  crop = int(cfg.data.crop)
  paths = sorted(str(p) for p in (pathlib.Path(cfg.data.root) / 'tokens' / 'test').glob('*/*.png'))
  images = np.stack([data_lib.preprocess(data_lib.load_image(p), cfg.data.resize, crop,
                                         mode=cfg.data.resize_mode) for p in paths])
  padded = np.concatenate([images, np.repeat(images[-1:], extractor.batch_size - len(paths), 0)])
  feats = extractor.fn(extractor.variables, jnp.asarray(padded))
  scorer = infer.make_scorer(cfg.model, infer.variant_from_config(cfg.model), (crop, crop))
  out = scorer(model_lib.arrays(model), feats)
  n = len(paths)
  return dict(cfg=cfg, model=model, extractor=extractor, paths=paths, images=images,
              maps=np.asarray(out['maps'][:n]), image=np.asarray(out['image'][:n]),
              patch=np.asarray(out['patch'][:n]))


def test_artifact_layout_and_meta(artifact, reference):
  out, meta = artifact
  assert sorted(p.name for p in out.iterdir()) == sorted(export.FILES)
  saved = json.loads((out / 'meta.json').read_text())
  assert saved['format'] == export.ARTIFACT_FORMAT and saved['version'] == export.ARTIFACT_VERSION
  assert saved['input']['size'] == saved['input']['crop'] == saved['input']['resize'] == 96
  assert saved['input']['resize_mode'] == reference['cfg'].data.resize_mode == 'square'
  assert saved['batch_size'] is None and saved['variant'] == '+N+P' and not saved['refinement']
  stats = reference['model'].stats
  for key in ('image', 'pixel'):
    want = stats.get(f'{key}_threshold')
    assert saved['thresholds'][key] == (None if want is None else pytest.approx(float(want)))
  exported = jax.export.deserialize(bytearray((out / 'model.stablehlo').read_bytes()))
  assert exported.platforms == ('cpu', 'cuda')  # CUDA lowered on this CPU-only machine
  assert str(exported.in_avals[-1].shape[0]) == 'batch'  # symbolic batch
  with np.load(out / 'params.npz') as z:
    names = set(z.files)
    assert z['model/c_emb'].shape == reference['model'].c_emb.shape
    np.testing.assert_array_equal(z['model/position'], reference['model'].position)
  # The classifier head is never read, so it is not saved; the saved set is what the module takes.
  assert not any('head' in n or 'classifier' in n for n in names if n.startswith('backbone/'))
  assert len(names) == len(exported.in_avals) - 1
  assert meta['num_unused_params_dropped'] > 0 and meta['sizes']['params.npz'] > 0


def test_fresh_process_without_the_package_reproduces_scores(artifact, reference, tmp_path):
  out, _ = artifact
  npz, js = tmp_path / 'maps.npz', tmp_path / 'scores.json'
  res = _run_isolated(out / 'run_artifact.py',
                      [*reference['paths'], '--npz', npz, '--json', js, '--batch', 3],  # 3 + 1
                      tmp_path)
  assert res.returncode == 0, res.stderr[-3000:]
  got = np.load(npz)
  assert list(got['paths']) == reference['paths']
  np.testing.assert_allclose(got['image'], reference['image'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got['maps'], reference['maps'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got['patch'], reference['patch'], rtol=RTOL, atol=ATOL)
  lines = [l for l in res.stdout.splitlines() if l.strip()]
  assert len(lines) == len(reference['paths'])
  rows = json.loads(js.read_text())['images']
  thr = reference['model'].stats.get('image_threshold')
  for row, score in zip(rows, reference['image']):
    assert row['image_score'] == pytest.approx(float(score), abs=ATOL, rel=RTOL)
    if thr is not None:
      assert row['decision'] == ('defective' if score >= float(thr) else 'normal')


def test_isolation_really_blocks_the_package(tmp_path):
  probe = tmp_path / 'probe.py'
  probe.write_text('try:\n  import pni_jax\n  print("IMPORTED")\n'
                   'except ImportError as e:\n  print("BLOCKED", e)\n')
  # With the repository on the path, as when the package is installed (CI: pip install -e).
  res = _run_isolated(probe, [], tmp_path, PYTHONPATH=str(REPO))
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith('BLOCKED'), res.stdout


def test_loader_is_the_package_module_and_imports_only_jax_numpy_pil_stdlib(artifact):
  out, _ = artifact
  source = (out / 'run_artifact.py').read_text()
  assert source == pathlib.Path(artifact_runner.__file__).read_text() == export.loader_source()
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names |= {a.name.split('.')[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      names.add(node.module.split('.')[0])
  assert names <= ALLOWED_LOADER_IMPORTS, names - ALLOWED_LOADER_IMPORTS
  # One copy of the decode / preprocess code: the data package uses the runner's functions.
  for name in ('load_image', 'preprocess', 'crop_box'):
    assert getattr(data_lib, name) is getattr(artifact_runner, name), name


def test_load_artifact_in_process(artifact, reference):
  out, _ = artifact
  art = export.load_artifact(out)
  images = reference['images']
  whole = art(images)
  assert whole['maps'].shape == images.shape[:3] and whole['image'].shape == (len(images),)
  np.testing.assert_allclose(whole['image'], reference['image'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(whole['maps'], reference['maps'], rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match=r'expected images \[B, 96, 96, 3\]'):
    art(images[:, :64])


def test_standalone_loader_preprocessing_equals_the_package(tmp_path):
  """The shipped file, run in a process that cannot import pni_jax, preprocesses non-square,
  grayscale, RGBA and 16-bit files exactly as the package does (both resize modes)."""
  rng = np.random.default_rng(0)
  files = {
      'rgb_wide.png': Image.fromarray(rng.integers(0, 256, (70, 131, 3), np.uint8)),
      'gray_tall.png': Image.fromarray(rng.integers(0, 256, (150, 97), np.uint8), 'L'),
      'rgba.png': Image.fromarray(rng.integers(0, 256, (96, 96, 4), np.uint8), 'RGBA'),
      'gray16.png': Image.fromarray(rng.integers(0, 65536, (120, 100)).astype(np.uint16)),
  }
  paths = []
  for name, img in files.items():
    paths.append(str(tmp_path / name))
    img.save(paths[-1])
  (tmp_path / 'run_artifact.py').write_text(export.loader_source())
  script = tmp_path / 'probe.py'
  script.write_text(
      'import sys, numpy as np\n'
      'import run_artifact as r\n'
      'out = {}\n'
      'for mode in r.RESIZE_MODES:\n'
      '  for i, p in enumerate(sys.argv[2:]):\n'
      '    out[f"{mode}{i}"] = r.preprocess(r.load_image(p), 100, 96, mode=mode)\n'
      'np.savez(sys.argv[1], **out)\n')
  res = _run_isolated(script, [tmp_path / 'out.npz', *paths], tmp_path)
  assert res.returncode == 0, res.stderr[-3000:]
  got = np.load(tmp_path / 'out.npz')
  for mode in data_lib.RESIZE_MODES:
    for i, path in enumerate(paths):
      want = data_lib.preprocess(data_lib.load_image(path), 100, 96, mode=mode)
      np.testing.assert_array_equal(got[f'{mode}{i}'], want, err_msg=f'{mode} {path}')
  with pytest.raises(ValueError, match='cannot read image .*broken.png'):
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    artifact_runner.load_image(str(tmp_path / 'broken.png'))


def test_cli_fixed_batch_export_pads(fitted, reference, tmp_path, capsys):
  base, _ = fitted
  out = tmp_path / 'fixed'
  export.main([f'--workdir={base / "work"}', '--category=tokens', f'--out={out}',
               '--batch_size=3', '--platforms=cpu'])
  assert 'wrote' in capsys.readouterr().out
  meta = json.loads((out / 'meta.json').read_text())
  assert meta['batch_size'] == 3 and meta['platforms'] == ['cpu']
  got = export.load_artifact(out)(reference['images'])  # 4 images: one full call + one padded
  np.testing.assert_allclose(got['image'], reference['image'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got['maps'], reference['maps'], rtol=RTOL, atol=ATOL)


def _random_refine_variables(key, size):
  """RefineNet variables with random weights everywhere, the residual head included (its
  initialisation is zero, which would make the network invisible). Shapes from eval_shape: a real
  init runs op by op and takes tens of seconds on 2 cores."""
  from pni_jax import refine

  net = refine.RefineNet('efficientnet_lite0', 'residual')
  shapes = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, size, size, 3)),
                                             jnp.zeros((1, size, size)), train=False), key)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'batch_stats' in name:
      return np.full(leaf.shape, 1.0 if name.endswith("['var']") else 0.0, np.float32)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0
    std = np.sqrt(1.0 / fan_in) if fan_in else 0.02
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_refinement_fusion_is_part_of_the_artifact(reference, tmp_path):
  from pni_jax import refine

  cfg = reference['cfg'].copy_and_resolve_references()
  cfg.model.use_refinement = True
  cfg.model.refine.encoder, cfg.model.refine.input_size = 'efficientnet_lite0', 32
  variables = _random_refine_variables(jax.random.key(1), 32)
  lo, hi = 1.0, 12.0
  stats = dict(reference['model'].stats, refine_lo=lo, refine_hi=hi)
  model = reference['model'].replace(refine=variables, stats=stats)
  with pytest.raises(ValueError, match='no refine_lo / refine_hi'):
    export.export_model((cfg, reference['model'].replace(refine=variables),
                         reference['extractor']), tmp_path / 'bad', platforms=('cpu',))
  export.export_model((cfg, model, reference['extractor']), tmp_path / 'r', platforms=('cpu',))
  got = export.load_artifact(tmp_path / 'r')(reference['images'])
  want = refine.fuse(variables, jnp.asarray(reference['images']), jnp.asarray(reference['maps']),
                     lo, hi, cfg.model.refine.fusion_weight, input_size=32,
                     encoder='efficientnet_lite0')
  plain = refine.normalize_map(reference['maps'], lo, hi)
  assert float(jnp.abs(want - plain).max()) > 1e-3  # the network changes the map
  np.testing.assert_allclose(got['maps'], np.asarray(want), rtol=RTOL, atol=ATOL)
  # With R the image score is the max of the final (fused) map, as in the paper's R rows.
  np.testing.assert_allclose(got['image'], np.asarray(want).reshape(len(want), -1).max(-1),
                             rtol=RTOL, atol=ATOL)


def test_errors_name_the_problem(fitted, tmp_path):
  with pytest.raises(FileNotFoundError, match='no fitted model'):
    export.export_model(tmp_path, tmp_path / 'a')
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'keep.txt').write_text('x')
  with pytest.raises(FileExistsError, match='not a pni-jax artifact'):
    export.export_model(fitted[1], tmp_path / 'notes')
  with pytest.raises(FileNotFoundError, match='missing meta.json'):
    export.load_artifact(tmp_path)
  with pytest.raises(SystemExit, match='no category folder'):
    export.main([f'--workdir={tmp_path}', '--category=nope', f'--out={tmp_path / "o"}'])
