"""tools/gpu_check_report.py: the figures of a GPU check are parsed from the tools' real output
and judged against issue 11's targets (the GPU run is one shot: a parse error there loses it)."""

import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'tools'))

import bench_mlp  # noqa: E402  pylint: disable=g-import-not-at-top
import bench_refine  # noqa: E402  pylint: disable=g-import-not-at-top
import gpu_check_report as rep  # noqa: E402  pylint: disable=g-import-not-at-top

# Lines as tools/bench_refine.py (loop, its own formatter) and tools/bench_backbone.py
# (--dtype both) print them.
REFINE_BF16 = bench_refine.format_row(0, dict(compile=95.8, steady=0.00412, steady_cpu=0.00310,
                                              total=97.8, total_cpu=48.0, loss=0.00628,
                                              input_loss=0.00719, hits=0))
REFINE_F32 = bench_refine.format_row(0, dict(compile=119.7, steady=0.00824, steady_cpu=0.00611,
                                             total=122.4, total_cpu=56.7, loss=0.00631,
                                             input_loss=0.00719, hits=3))
BACKBONE = '\n'.join([
    'arch               size batch    GFLOP compile s   s/call    img/s  GFLOP/s',
    'wide_resnet101_2    480     8   1412.1      21.3   float32    0.040   200.00  35302.5',
    'wide_resnet101_2    480     8   1412.1      25.0  bfloat16    0.020   400.00  70605.0',
    '                   bfloat16 speed-up x2.00'])


def _mlp_log(samples_s: float) -> str:
  row = dict(name='paper', in_dim=81920, layers=10, width=2048, classes=2048, batch=2048,
             dtype='float32', params_m=209.9, steps=50, compile_s=12.5,
             train_samples_s=samples_s, train_gflops=1000.0, infer_patches_s=3 * samples_s,
             infer_gflops=3000.0, infer_patches=28800)
  demo = dict(row, name='demo d=128', in_dim=10240, layers=3, width=512, classes=512)
  return 'backend gpu (NVIDIA H200), dtype float32\n' + bench_mlp._fmt(demo) + '\n' + \
      bench_mlp._fmt(row) + '\n'


def _work(tmp_path: pathlib.Path, batch_warm_s: float) -> pathlib.Path:
  work = tmp_path / 'work'
  (work / 'e2e').mkdir(parents=True)
  stages = [('data (generate + decode)', 20.0, 0.0), ('features', 8.0, 6.0), ('coreset', 5.0, 4.0),
            ('nearest codes', 4.0, 3.0), ('histograms', 1.0, 0.5), ('MLP training', 20.0, 5.0),
            ('inference (N+P)', 2.0, 0.0), ('inference (baseline)', 1.0, 0.0)]
  e2e = dict(results=[dict(stages=[dict(stage=n, seconds=s, compile_seconds=c)
                                   for n, s, c in stages], peak_device_bytes=8 * 2 ** 30,
                           auroc={})])
  (work / 'e2e' / 'e2e.json').write_text(json.dumps(e2e))
  (work / 'batch').mkdir()
  row = lambda s: dict(category='tokens', num_train=180, seconds=s, compiles=120, compile_s=30.0,
                       cache_hits=0)
  (work / 'batch' / 'batch.json').write_text(json.dumps(dict(results=dict(
      cold=dict(wall=90.0, rows=[row(44.0)]), warm=dict(wall=50.0, rows=[row(batch_warm_s)])))))
  (work / 'mlp_f32.log').write_text(_mlp_log(100000.0))
  (work / 'mlp_bf16.log').write_text(_mlp_log(150000.0))
  (work / 'refine_bf16.log').write_text(REFINE_BF16 + '\n')
  (work / 'refine_f32.log').write_text(REFINE_F32 + '\n')
  (work / 'backbone.log').write_text(BACKBONE + '\n')
  (work / 'nstudy.log').write_text('Traceback (most recent call last):\nValueError: boom\n')
  steps = [dict(name='e2e', status='ok', seconds=100.0, cap='240', cmd='x'),
           dict(name='nstudy', status='timed out at 150 s', seconds=150.0, cap='150', cmd='y'),
           dict(name='refine_f32', status='skipped (10 s left, needs 60 s)', seconds=None,
                cap='140', cmd='z')]
  (work / 'steps.jsonl').write_text(''.join(json.dumps(s) + '\n' for s in steps))
  return work


def test_figures_parsed_from_the_tools_output(tmp_path):
  fig = rep.collect(_work(tmp_path, 20.0))['figures']
  assert fig['e2e']['fit_s'] == pytest.approx(38.0)          # data generation excluded
  assert fig['e2e']['fit_compile_s'] == pytest.approx(18.5)
  assert fig['e2e']['fit_eval_s'] == pytest.approx(40.0)     # + N+P inference
  assert fig['e2e']['peak_device_gib'] == pytest.approx(8.0)
  assert fig['mlp_speedup'] == {'demo d=128': pytest.approx(1.5), 'paper': pytest.approx(1.5)}
  assert fig['mlp_f32'][1]['compile_s'] == pytest.approx(12.5)
  assert fig['backbone_speedup'] == pytest.approx(2.0)
  assert fig['refine_bf16']['steady_s'] == pytest.approx(0.00412)
  assert fig['refine_bf16']['compile_s'] == pytest.approx(95.8)
  assert fig['refine_speedup'] == pytest.approx(2.0)
  assert rep.parse_refine(REFINE_F32)[0]['cache_hits'] == 3      # the last column, optional
  assert fig['batch']['warm']['max_category_s'] == pytest.approx(20.0)


@pytest.mark.parametrize('warm_s, verdict', [(20.0, 'PASS'), (30.0, 'MISS')])
def test_targets_are_judged_and_unfinished_steps_shown(tmp_path, warm_s, verdict):
  work = _work(tmp_path, warm_s)
  assert rep.main(['x', str(work), str(tmp_path / 'out')]) == 0
  md = (tmp_path / 'out' / 'gpu_check.md').read_text()
  rows = {l.split(' | ')[0]: l for l in md.splitlines() if l.startswith('| ')}
  assert rows['| fit + evaluation, one category, cold, <= 45 s (e2e: fit stages + N+P '
              'inference, data and inference compile excluded)'].endswith('| PASS |')
  assert rows['| real CLI per category, warm cache, <= 25 s'].endswith(f'| {verdict} |')
  assert '4.12 ms / iteration' in md and rows[
      '| refinement DenseNet-161 320 px batch 8 bf16, <= 5 ms / iteration'].endswith('| PASS |')
  assert rows['| MLP training (paper size) bf16 / f32 speed >= 1.6x'].endswith('1.50x | MISS |')
  assert '## nstudy: timed out at 150 s' in md and 'ValueError: boom' in md
  assert '## refine_f32' not in md        # skipped steps have no log section
  saved = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
  assert saved['smoke'] is False and len(saved['steps']) == 3


def test_smoke_runs_are_never_judged(tmp_path):
  work = _work(tmp_path, 30.0)
  rep.main(['x', str(work), str(tmp_path / 'out'), '--smoke'])
  md = (tmp_path / 'out' / 'gpu_check.md').read_text()
  assert 'CPU SMOKE RUN' in md and '| PASS |' not in md and '| MISS |' not in md
