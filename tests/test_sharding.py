"""Data parallelism over a device mesh: 4 CPU devices give the 1-device results.

The 4-device run needs `XLA_FLAGS=--xla_force_host_platform_device_count=4` before JAX starts, so it
runs this file as a script in a subprocess (`python tests/test_sharding.py OUT.npz`); the 1-device
run is this pytest process. Both compute every stage on the same inputs (numpy generators with
fixed seeds), each stage on its own inputs so a difference cannot carry over from an earlier stage:
  features        fit.extract_features, ResNet-18 (random init) on 6 images, batches of 4
  coreset         coreset.greedy_coreset on 2001 rows (not a multiple of 4) and fit.select_coreset
  knn             knn.knn_sharded, 301 queries (not a multiple of 4), k = 4
  codes           fit.nearest_codes over a feature store
  scores          infer.make_scorer(N + P) under sharding.data_parallel on 6 images
  mlp             neighborhood.train_mlp, 1 epoch of 12 steps, batch 32, dropout, BatchNorm
Tolerances (asserted; measured on 2 CPU cores in brackets): indices identical; features,
distances and patch scores within 1e-5 (bit-identical); MLP weights and batch statistics after 12
Adam steps within 1e-5 (2.4e-7: the global-batch means are summed in another order across
devices).

Host threads: `python tests/test_sharding.py --queued-steps N OUT.npz` queues N data-parallel
steps without waiting (more than XLA:CPU's 32 per device) on 4 devices of a simulated 2-CPU host
(NPROC=2), after `sharding.configure_host_threads` as the entry point calls it; with XLA's
default pool of 4 threads this deadlocks and XLA aborts the process (here after 20 s).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE, BATCH, NUM_IMAGES = 64, 4, 6


def _model_config():
  from pni_jax.config import base_config
  m = base_config().model
  m.backbone, m.allow_random_init, m.layers = 'resnet18', True, ('layer2', 'layer3')
  m.aggregation_size, m.pre_dim, m.dim = 3, 64, 32
  m.coreset.ratio, m.coreset.dist_size, m.coreset.chunk_size = 0.1, 16, 100
  m.neighborhood.window, m.neighborhood.infer_chunk = 3, 100
  m.scoring.query_tile, m.scoring.bank_tile = 64, 128
  m.scoring.sigma = 2.0
  return m


def _mlp_config():
  from pni_jax.config import base_config
  nb = base_config().model.neighborhood
  nb.window, nb.num_layers, nb.width, nb.dropout = 3, 3, 32, 0.2
  nb.epochs, nb.batch_size, nb.learning_rate, nb.val_fraction = 1, 32, 3e-3, 0.25
  return nb


def compute() -> dict[str, np.ndarray]:
  """Every stage on fixed inputs over all devices of this process; returns named results."""
  import jax
  import jax.numpy as jnp
  from pni_jax import coreset
  from pni_jax import features
  from pni_jax import fit
  from pni_jax import infer
  from pni_jax import knn
  from pni_jax import neighborhood as nb
  from pni_jax import sharding
  from pni_jax.store import FeatureStore

  mesh = sharding.make_mesh()
  out = {'num_devices': np.int32(sharding.num_shards(mesh))}
  rng = np.random.default_rng(0)
  cfg = _model_config()

  # Feature extraction: batches split over the devices (the last one, 2 images, padded).
  fn, variables = features.make_feature_fn(cfg, key=jax.random.key(0))
  images = rng.uniform(size=(NUM_IMAGES, SIZE, SIZE, 3)).astype(np.float32)
  batches = [{'image': images[i:i + BATCH]} for i in range(0, NUM_IMAGES, BATCH)]
  h = SIZE // 8
  proj = coreset.random_projection(jax.random.key(1), cfg.dim, 8)
  with FeatureStore((NUM_IMAGES, h, h, cfg.dim), cap_bytes=1 << 30) as store:
    out['projected'] = fit.extract_features(fn, variables, batches, NUM_IMAGES, BATCH, store,
                                            proj, mesh=mesh)
    out['features'] = np.array(store.array)

  # Greedy k-center: rows split over the devices, the farthest point by a cross-device max.
  rows = rng.normal(size=(2001, 16)).astype(np.float32)
  out['picks'] = np.asarray(coreset.greedy_coreset(rows, 150, start_index=2000, chunk_size=128,
                                                   segment_size=60, mesh=mesh))
  feats = rng.normal(size=(12, h, h, cfg.dim)).astype(np.float32)
  with FeatureStore(feats.shape, cap_bytes=1 << 30) as store:
    store.write(0, feats)
    projected = feats.reshape(-1, cfg.dim) @ np.asarray(proj)
    core = fit.select_coreset(projected, store, cfg.coreset, jax.random.key(2), mesh=mesh)
    out.update(order=core['order'], emb_to_dist=core['emb_to_dist'])
    out['codes'] = fit.nearest_codes(store, core['c_emb'][:core['num_dist']], images_per_chunk=5,
                                     query_tile=64, bank_tile=128, mesh=mesh)

  # kNN: queries split, bank replicated.
  queries = rng.normal(size=(301, 24)).astype(np.float32)
  bank = rng.normal(size=(1001, 24)).astype(np.float32)
  out['knn_dist'], out['knn_idx'] = map(np.asarray, knn.knn_sharded(
      queries, bank, 4, mesh=mesh, query_tile=64, bank_tile=256))

  # Conditional (N + P) scoring of a batch of 6 images: images split, the model replicated.
  k_emb, k_dist = 40, 10
  c_emb = rng.normal(size=(k_emb, cfg.dim)).astype(np.float32)
  d2 = ((c_emb[:, None] - c_emb[None, :k_dist]) ** 2).sum(-1)
  mlp = nb.MLP(num_layers=2, width=16, num_classes=k_dist)
  arrays = {
      'c_emb': c_emb, 'emb_to_dist': d2.argmin(1).astype(np.int32),
      'position': rng.dirichlet(np.full(k_dist, 0.3), size=(h, h)).astype(np.float32),
      'mlp': jax.jit(mlp.init, static_argnames='train')(
          jax.random.key(3), jnp.zeros((1, 8 * cfg.dim)), train=False),
      'refine': None}
  arrays = sharding.replicate(jax.tree.map(jnp.asarray, arrays), mesh)
  cfg.scoring.tau_scale = 0.5 * k_emb / k_dist   # tau = 0.5 / K_dist: a real selection
  scorer = infer.make_scorer(cfg, infer.Variant(True, True), (SIZE, SIZE))
  test_feats = rng.normal(size=(NUM_IMAGES, h, h, cfg.dim)).astype(np.float32)
  scores = sharding.data_parallel(scorer, mesh, sharded_argnums=(1,))(arrays, test_feats)
  for name in ('patch', 'maps', 'image', 'allowed'):
    out[f'score_{name}'] = np.asarray(scores[name])
  if out['num_devices'] == 1:  # the wrapper adds nothing on one device
    plain = scorer(arrays, jnp.asarray(test_feats))
    out['plain_patch'] = np.asarray(plain['patch'])

  # MLP training: batches of 32 split over the devices, BatchNorm over the global batch.
  fields = _smooth_fields(rng)
  variables, history = nb.train_mlp(fields[0], fields[1], _mlp_config(), jax.random.key(4),
                                    num_classes=4, mesh=mesh, log_fn=lambda msg: None)
  for i, leaf in enumerate(jax.tree.leaves(variables)):
    out[f'mlp_{i}'] = np.asarray(leaf)
  out['mlp_val_accuracy'] = np.float32(history['val_accuracy'][-1])
  out['mlp_steps'] = np.int32(history['steps_per_epoch'])
  return out


def _queued_inputs():
  rng = np.random.default_rng(5)
  return (rng.normal(size=(32, 64)).astype(np.float32),
          (np.eye(64) + 0.1 * rng.normal(size=(64, 64))).astype(np.float32))


def queued_steps(num_steps: int) -> np.ndarray:
  """`num_steps` gradient steps on w [64, 64] (batch [32, 64] split over the devices, so the
  gradient is a cross-device all-reduce), dispatched without waiting; the final w."""
  import jax
  import jax.numpy as jnp
  from pni_jax import sharding
  mesh = sharding.make_mesh()
  x, w = _queued_inputs()
  x, w = sharding.shard_rows(x, mesh), sharding.replicate(w, mesh)

  @jax.jit
  def step(w, x):
    return w - 0.05 * jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)

  for _ in range(num_steps):
    w = step(w, x)
  return np.asarray(w)


def _small_host_env(**extra) -> dict[str, str]:
  """Environment of a subprocess with 4 host devices on a simulated 2-CPU host."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='2',
             NPROC='2', XLA_FLAGS='--xla_force_host_platform_device_count=4 '
                                  '--xla_cpu_collective_call_terminate_timeout_seconds=20')
  for name in ('PJRT_NPROC', 'JAX_NUM_CPU_DEVICES'):
    env.pop(name, None)
  env.update(extra)
  return env


def _smooth_fields(rng):
  """Feature maps [8, 10, 10, 4] (a smoothed random field) and quartile targets of channel 0."""
  import scipy.ndimage as ndi
  feats = ndi.gaussian_filter(rng.normal(size=(8, 10, 10, 4)), sigma=(0, 2, 2, 0), mode='wrap')
  feats = (feats / feats.std()).astype(np.float32)
  edges = np.quantile(feats[..., 0], [0.25, 0.5, 0.75])
  return feats, np.digitize(feats[..., 0], edges).astype(np.int32)


def _four_device_run(out_path: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.Popen([sys.executable, __file__, str(out_path)], env=env, cwd=str(ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ----------------------------------------------------------------------------- tests

import pytest  # noqa: E402  (the script mode above needs no pytest)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  path = tmp_path_factory.mktemp('sharding') / 'four.npz'
  proc = _four_device_run(path)       # runs while this process computes the 1-device results
  one = compute()
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log[-4000:]
  with np.load(path) as z:
    four = dict(z)
  return one, four


def test_the_subprocess_really_has_four_devices(runs):
  one, four = runs
  assert int(one['num_devices']) == 1 and int(four['num_devices']) == 4


def test_features_equal(runs):
  one, four = runs
  assert one['features'].shape == (NUM_IMAGES, SIZE // 8, SIZE // 8, 32)
  # Measured max |diff|: 0 (features), 0 (projected) on 2 CPU cores.
  np.testing.assert_allclose(four['features'], one['features'], rtol=0, atol=1e-5)
  np.testing.assert_allclose(four['projected'], one['projected'], rtol=0, atol=1e-5)


def test_coreset_indices_identical(runs):
  one, four = runs
  assert len(set(one['picks'].tolist())) == 150 and one['picks'][0] == 2000
  np.testing.assert_array_equal(four['picks'], one['picks'])
  np.testing.assert_array_equal(four['order'], one['order'])
  np.testing.assert_array_equal(four['emb_to_dist'], one['emb_to_dist'])


def test_knn_and_nearest_codes_identical(runs):
  one, four = runs
  assert one['knn_idx'].shape == (301, 4)
  np.testing.assert_array_equal(four['knn_idx'], one['knn_idx'])
  np.testing.assert_allclose(four['knn_dist'], one['knn_dist'], rtol=0, atol=1e-5)
  assert one['codes'].shape == (12, SIZE // 8, SIZE // 8)
  np.testing.assert_array_equal(four['codes'], one['codes'])


def test_patch_scores_equal(runs):
  one, four = runs
  np.testing.assert_array_equal(one['score_patch'], one['plain_patch'])
  assert one['score_maps'].shape == (NUM_IMAGES, SIZE, SIZE)
  assert 0 < one['score_allowed'].mean() < 1          # the priors do select codes
  for name in ('patch', 'maps', 'image', 'allowed'):
    np.testing.assert_allclose(four[f'score_{name}'], one[f'score_{name}'], rtol=0, atol=1e-5)


def test_mlp_training_equal(runs):
  one, four = runs
  assert int(one['mlp_steps']) == int(four['mlp_steps']) == 12
  keys = sorted(k for k in one if k.startswith('mlp_') and k[4:].isdigit())
  assert len(keys) == 12     # 3 Dense kernels + last bias, 2 BatchNorm (scale, bias, mean, var)
  worst = max(float(np.abs(four[k] - one[k]).max()) for k in keys)
  # Measured: worst |diff| 2.4e-7 after 12 steps (weights are O(0.01-3)).
  assert worst < 1e-5, worst
  assert abs(float(four['mlp_val_accuracy']) - float(one['mlp_val_accuracy'])) <= 0.01


def test_pad_rows_and_shard_helpers():
  import jax.numpy as jnp
  from pni_jax import sharding
  x = np.arange(10, dtype=np.float32).reshape(5, 2)
  padded, n = sharding.pad_rows(x, 4)
  assert n == 5 and padded.shape == (8, 2)
  np.testing.assert_array_equal(padded[5:], np.repeat(x[-1:], 3, axis=0))
  zeros, _ = sharding.pad_rows(jnp.asarray(x), 4, mode='zeros')
  assert isinstance(zeros, jnp.ndarray) and float(zeros[5:].sum()) == 0.0
  assert sharding.padded_size(0, 4) == 4 and sharding.padded_size(8, 4) == 8
  mesh = sharding.make_mesh()
  y = sharding.shard_host_rows(x, mesh, fill=-1.0)
  np.testing.assert_array_equal(np.asarray(y)[:5], x)
  with pytest.raises(ValueError, match='pad mode'):
    sharding.pad_rows(x, 4, mode='wrap')
  with pytest.raises(ValueError, match='disagree on the batch size'):
    sharding.data_parallel(lambda a, b: a + b, mesh, (0, 1))(np.zeros(3), np.zeros(4))


def test_requested_cpu_devices_and_thread_problem():
  from pni_jax import sharding
  flags = '--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=4'
  assert sharding.requested_cpu_devices({}) == 1
  assert sharding.requested_cpu_devices({'XLA_FLAGS': flags}) == 4
  assert sharding.requested_cpu_devices({'XLA_FLAGS': flags, 'JAX_NUM_CPU_DEVICES': '3'}) == 3
  assert sharding.requested_cpu_devices({'XLA_FLAGS': flags, 'JAX_NUM_CPU_DEVICES': '-1'}) == 4
  assert [sharding.host_threads_needed(d) for d in (1, 2, 4)] == [1, 4, 8]
  assert sharding.host_thread_problem(1, {'NPROC': '1'}) is None
  assert sharding.host_thread_problem(4, {'NPROC': '8'}) is None
  assert sharding.host_thread_problem(4, {'NPROC': '2', 'PJRT_NPROC': '8'}) is None
  problem = sharding.host_thread_problem(4, {'NPROC': '2'})
  assert 'has 4 threads (NPROC=2) for 4 host CPU devices' in problem
  assert 'set PJRT_NPROC=8' in problem


def test_configure_host_threads():
  from pni_jax import sharding
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'NPROC': '2'}
  line = sharding.configure_host_threads(env, jax_started=False)
  assert env['PJRT_NPROC'] == '8' and 'PJRT_NPROC=8' in line
  assert sharding.configure_host_threads(env, jax_started=False) is None   # now enough
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'NPROC': '2'}
  assert sharding.configure_host_threads(env, jax_started=True) is None    # too late: unchanged
  assert 'PJRT_NPROC' not in env
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'NPROC': '16'}
  assert sharding.configure_host_threads(env, jax_started=False) is None
  assert 'PJRT_NPROC' not in env                                            # enough CPUs
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'PJRT_NPROC': '6'}
  with pytest.raises(ValueError, match=r'PJRT_NPROC=6.*set PJRT_NPROC=8 or more'):
    sharding.configure_host_threads(env, jax_started=False)


def test_queued_steps_complete_on_a_small_host(tmp_path):
  """The forced-4-device demo used to abort in MLP training on 2 CPUs; this is its mechanism in
  ~3 s (without `configure_host_threads` the subprocess aborts after 20 s)."""
  out = tmp_path / 'queued.npz'
  proc = subprocess.run([sys.executable, __file__, '--queued-steps', '100', str(out)],
                        env=_small_host_env(), cwd=str(ROOT), capture_output=True, text=True,
                        timeout=300)
  log = '\n'.join(line for line in (proc.stdout + proc.stderr).splitlines()
                  if not line.startswith('    @'))          # XLA's abort: no stack frames
  assert proc.returncode == 0, log[-4000:]
  assert 'XLA:CPU threads set to PJRT_NPROC=8' in proc.stdout
  with np.load(out) as z:
    four, devices = z['w'], int(z['num_devices'])
  assert devices == 4
  assert float(np.abs(four - _queued_inputs()[1]).max()) > 1e-2    # the steps moved w
  np.testing.assert_allclose(four, queued_steps(100), rtol=0, atol=1e-5)   # = this process's


def test_main_refuses_too_few_threads(tmp_path):
  env = _small_host_env(PJRT_NPROC='4')
  proc = subprocess.run([sys.executable, '-m', 'pni_jax.main', '--config=configs/demo.py',
                         f'--workdir={tmp_path / "run"}'], env=env, cwd=str(ROOT),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'XLA:CPU has 4 threads (PJRT_NPROC=4) for 4 host CPU devices' in proc.stderr
  assert 'set PJRT_NPROC=8 or more' in proc.stderr
  assert not (tmp_path / 'run').exists()


def test_bucket_size_ladder():
  """Sizes on {4, 5, 6, 7} x 2^k: at least n, at most 25% more, few distinct sizes, multiples."""
  from pni_jax import sharding as sh
  sizes = [sh.bucket_size(n) for n in range(1, 5000)]
  assert all(s >= n for n, s in zip(range(1, 5000), sizes))
  assert all(s <= max(8, 1.25 * n) for n, s in zip(range(1, 5000), sizes))
  assert len(set(s for s in sizes if s > 8)) <= 4 * 10
  assert [sh.bucket_size(n) for n in (9, 17, 200, 209, 224, 225, 391)] == [10, 20, 224, 224, 224,
                                                                           256, 448]
  assert sh.bucket_size(209, 8) % 8 == 0


if __name__ == '__main__':
  from pni_jax import sharding as _sharding
  print(_sharding.configure_host_threads(os.environ), flush=True)   # as pni_jax.main does
  t0 = time.time()
  if sys.argv[1] == '--queued-steps':
    import jax as _jax
    np.savez(sys.argv[3], w=queued_steps(int(sys.argv[2])), num_devices=_jax.device_count())
  else:
    results = compute()
    np.savez(sys.argv[1], **results)
    print(f'{int(results["num_devices"])} devices, {time.time() - t0:.1f}s')
