"""Summary of a tools/gpu_check.sh run: `python tools/gpu_check_report.py WORK OUT [--smoke]`.

Reads what the steps left in WORK (steps.jsonl: one line per step with its status; <step>.log;
e2e/e2e.json; batch/batch.json; nstudy/study.md; env.json) and writes OUT/gpu_check.md (the
figures against the issue's GPU targets, then each step's table) and OUT/gpu_check.json (the
parsed figures and the raw JSON of the steps). Standard library only (no jax import), so it runs
after every step in a second and a run cut short still leaves the finished steps' figures.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys

TAIL_LINES = 25
_NOISE = re.compile(r'oneDNN|absl::InitializeLog|UserWarning|warnings\.warn|load_variables\(')

# Stages of tools/bench_e2e.py that make up fitting one category (data generation excluded).
FIT_STAGES = ('features', 'coreset', 'nearest codes', 'histograms', 'MLP training')

_MLP_HEAD = re.compile(r'^(?P<name>\S.*?)\s+in\s+(?P<in_dim>\d+) -> (?P<layers>\d+) x (?P<width>\d+)'
                       r' -> K (?P<classes>\d+)\s+\((?P<params_m>[\d.]+)M params, batch '
                       r'(?P<batch>\d+), (?P<steps>\d+) steps, compile (?P<compile_s>[\d.]+)s\)')
_MLP_RATE = re.compile(r'^\s+train\s+(?P<train_samples_s>[\d.]+) samples/s\s+(?P<train_gflops>'
                       r'[\d.]+) GFLOP/s\s+\|\s+infer\s+(?P<infer_patches_s>[\d.]+) patches/s\s+'
                       r'(?P<infer_gflops>[\d.]+) GFLOP/s')
_BACKBONE = re.compile(r'^(?P<arch>\w+)\s+(?P<size>\d+)\s+(?P<batch>\d+)\s+(?P<gflop>[\d.]+)\s+'
                       r'(?P<compile_s>[\d.]+)\s+(?P<dtype>float32|bfloat16)\s+(?P<s_call>[\d.]+)\s+'
                       r'(?P<img_s>[\d.]+)\s+(?P<gflop_s>[\d.]+)\s*$')
_NUM = r'([\d.]+|nan)'
_REFINE = re.compile(rf'^\s*(?P<run>\d+)\s+(?P<compile_s>{_NUM})\s+(?P<steady_s>{_NUM})\s+'
                     rf'(?P<steady_cpu_s>{_NUM})\s+(?P<total_s>{_NUM})\s+(?P<total_cpu_s>{_NUM})\s+'
                     r'(?P<loss>\S+)\s+\((?P<input_loss>\S+)\)(?:\s+(?P<cache_hits>\d+))?\s*$')


def _floats(d: dict) -> dict:
  out = {}
  for k, v in d.items():
    try:
      out[k] = int(v) if re.fullmatch(r'\d+', v) else float(v)
    except (TypeError, ValueError):
      out[k] = v
  return out


def parse_mlp(text: str) -> list[dict]:
  rows, head = [], None
  for line in text.splitlines():
    m = _MLP_HEAD.match(line)
    if m:
      head = _floats(m.groupdict())
      continue
    m = _MLP_RATE.match(line)
    if m and head is not None:
      rows.append({**head, **_floats(m.groupdict())})
      head = None
  return rows


def parse_backbone(text: str) -> list[dict]:
  return [_floats(m.groupdict()) for m in map(_BACKBONE.match, text.splitlines()) if m]


def parse_refine(text: str) -> list[dict]:
  return [_floats(m.groupdict()) for m in map(_REFINE.match, text.splitlines()) if m]


def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _read(path: pathlib.Path) -> str:
  try:
    return path.read_text(errors='replace')
  except OSError:
    return ''


def _fmt(x, spec: str = '.1f', unit: str = '') -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return 'n/a'
  return f'{x:{spec}}{unit}'


def _verdict(value, limit, higher_is_better: bool, smoke: bool) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return 'not measured'
  if smoke:
    return 'CPU smoke (not comparable)'
  ok = value >= limit if higher_is_better else value <= limit
  return 'PASS' if ok else 'MISS'


def collect(work: pathlib.Path) -> dict:
  steps = []
  for line in _read(work / 'steps.jsonl').splitlines():
    try:
      steps.append(json.loads(line))
    except ValueError:
      pass
  fig = {}
  e2e = _read_json(work / 'e2e' / 'e2e.json')
  if e2e and e2e.get('results'):
    res = e2e['results'][0]
    stages = {r['stage']: r for r in res['stages']}
    fit = [stages[s] for s in FIT_STAGES if s in stages]
    inf = stages.get('inference (N+P)')
    fig['e2e'] = dict(
        fit_s=sum(r['seconds'] for r in fit), fit_compile_s=sum(r['compile_seconds'] for r in fit),
        eval_s=inf['seconds'] if inf else None,
        per_image_ms=inf.get('per_image_ms') if inf else None,
        fit_eval_s=sum(r['seconds'] for r in fit) + (inf['seconds'] if inf else 0.0),
        stages={k: dict(seconds=v['seconds'], compile_seconds=v['compile_seconds'])
                for k, v in stages.items()},
        peak_device_gib=(res.get('peak_device_bytes') or 0) / 2 ** 30 or None,
        auroc=res.get('auroc'))
  batch = _read_json(work / 'batch' / 'batch.json')
  if batch:
    per = {}
    for name, r in batch['results'].items():
      rows = r['rows']
      per[name] = dict(wall=r['wall'], categories=[
          dict(category=x['category'], num_train=x.get('num_train'), seconds=x['seconds'],
               compiles=x['compiles'], compile_s=x['compile_s'], cache_hits=x['cache_hits'])
          for x in rows], max_category_s=max((x['seconds'] for x in rows), default=None))
    fig['batch'] = per
  for name in ('mlp_f32', 'mlp_bf16'):
    rows = parse_mlp(_read(work / f'{name}.log'))
    if rows:
      fig[name] = rows
  if 'mlp_f32' in fig and 'mlp_bf16' in fig:
    f32 = {r['name']: r for r in fig['mlp_f32']}
    fig['mlp_speedup'] = {r['name']: r['train_samples_s'] / f32[r['name']]['train_samples_s']
                          for r in fig['mlp_bf16'] if r['name'] in f32}
    fig['mlp_infer_speedup'] = {r['name']: r['infer_patches_s'] / f32[r['name']]['infer_patches_s']
                                for r in fig['mlp_bf16'] if r['name'] in f32}
  rows = parse_backbone(_read(work / 'backbone.log'))
  if rows:
    fig['backbone'] = rows
    t = {r['dtype']: r['s_call'] for r in rows}
    if 'float32' in t and 'bfloat16' in t and t['bfloat16'] > 0:
      fig['backbone_speedup'] = t['float32'] / t['bfloat16']
  for name in ('refine_bf16', 'refine_f32'):
    rows = parse_refine(_read(work / f'{name}.log'))
    if rows:
      fig[name] = rows[-1]
  if 'refine_bf16' in fig and 'refine_f32' in fig:
    b, f = fig['refine_bf16']['steady_s'], fig['refine_f32']['steady_s']
    if isinstance(b, float) and isinstance(f, float) and b > 0 and not math.isnan(b + f):
      fig['refine_speedup'] = f / b
  return dict(steps=steps, figures=fig, env=_read_json(work / 'env.json'), e2e=e2e, batch=batch)


def markdown(data: dict, smoke: bool, work: pathlib.Path) -> str:
  fig, env = data['figures'], data.get('env') or {}
  lines = ['# pni-jax GPU check' + (' (CPU SMOKE RUN: tiny sizes, figures meaningless)' if smoke
                                    else ''), '']
  for key in ('device', 'gpu', 'versions', 'budget'):
    if env.get(key):
      lines.append(f'- {key}: {env[key]}')
  lines += ['', '## Targets (issue 11, GPU part of "Done when")', '',
            '| target | measured | verdict |', '|---|---|---|']
  e2e = fig.get('e2e')
  if e2e:
    lines.append(f'| fit + evaluation, one category, cold, <= 45 s (e2e: fit stages + N+P '
                 f'inference, data and inference compile excluded) | {_fmt(e2e["fit_eval_s"])} s '
                 f'(fit {_fmt(e2e["fit_s"])} s, of which compile {_fmt(e2e["fit_compile_s"])} s; '
                 f'eval {_fmt(e2e["eval_s"])} s) | '
                 f'{_verdict(e2e["fit_eval_s"], 45, False, smoke)} |')
  else:
    lines.append('| fit + evaluation cold (e2e) <= 45 s | not measured | not measured |')
  batch = fig.get('batch') or {}
  for name, limit in (('cold', 45), ('warm', 25)):
    b = batch.get(name)
    if b:
      cats = ', '.join(f'{c["category"]} {c["seconds"]:.1f} s ({c["compiles"]} compiles, '
                       f'{c["compile_s"]:.1f} s compiling, {c["cache_hits"]} cache hits)'
                       for c in b['categories'])
      lines.append(f'| real CLI per category, {name} cache, <= {limit} s | {cats} | '
                   f'{_verdict(b["max_category_s"], limit, False, smoke)} |')
    else:
      lines.append(f'| real CLI per category, {name} cache, <= {limit} s | not measured | '
                   'not measured |')
  r = fig.get('refine_bf16')
  if r:
    ms = r['steady_s'] * 1e3 if isinstance(r['steady_s'], (int, float)) else None
    lines.append(f'| refinement DenseNet-161 320 px batch 8 bf16, <= 5 ms / iteration | '
                 f'{_fmt(ms, ".2f")} ms / iteration (compile {_fmt(r["compile_s"])} s, total '
                 f'{_fmt(r["total_s"])} s) | {_verdict(ms, 5, False, smoke)} |')
  else:
    lines.append('| refinement DenseNet-161 320 px batch 8 bf16, <= 5 ms / iteration | '
                 'not measured | not measured |')
  for key, label in (('mlp', 'MLP training (paper size) bf16 / f32 speed'),
                     ('backbone', 'backbone WRN-101-2 480 px batch 8 bf16 / f32 speed'),
                     ('refine', 'refinement steady step bf16 / f32 speed')):
    val = fig.get(f'{key}_speedup')
    if isinstance(val, dict):   # MLP: per row; the target is on the paper-size MLP
      val = val.get('paper', next(iter(val.values()), None) if smoke else None)
    lines.append(f'| {label} >= 1.6x | {_fmt(val, ".2f", "x")} | '
                 f'{_verdict(val, 1.6, True, smoke)} |')
  if e2e and e2e.get('peak_device_gib'):
    lines.append(f'\nPeak device memory in the e2e run: {e2e["peak_device_gib"]:.2f} GiB.')

  lines += ['', '## Steps', '', '| step | status | wall s | time box s | command |',
            '|---|---|---:|---:|---|']
  for s in data['steps']:
    lines.append(f'| {s["name"]} | {s["status"]} | {_fmt(s.get("seconds"), ".0f")} | '
                 f'{s.get("cap", "")} | `{s.get("cmd", "")}` |')

  e2e_md = _read(work / 'e2e' / 'e2e.md').strip()
  if e2e_md:
    lines += ['', '## e2e (tools/bench_e2e.py)', '', e2e_md.replace('# pni-jax end-to-end '
                                                                    'benchmark', '').strip()]
  batch_md = _read(work / 'batch' / 'batch.md').strip()
  if batch_md:
    lines += ['', '## batch (tools/bench_batch.py)', '', batch_md.lstrip('# ')]
  if fig.get('mlp_f32') or fig.get('mlp_bf16'):
    lines += ['', '## MLP throughput (tools/bench_mlp.py)', '',
              '| MLP | dtype | batch | compile s | train samples/s | train GFLOP/s | '
              'infer patches/s | infer GFLOP/s |', '|---|---|---:|---:|---:|---:|---:|---:|']
    for name in ('mlp_f32', 'mlp_bf16'):
      for r in fig.get(name, []):
        lines.append(f'| {r["name"]} ({r["in_dim"]} -> {r["layers"]} x {r["width"]} -> '
                     f'{r["classes"]}) | {name[4:]} | {r["batch"]} | {r["compile_s"]:.1f} | '
                     f'{r["train_samples_s"]:.0f} | {r["train_gflops"]:.0f} | '
                     f'{r["infer_patches_s"]:.0f} | {r["infer_gflops"]:.0f} |')
    for name, sp in (fig.get('mlp_speedup') or {}).items():
      lines.append(f'\nbf16 / f32 {name}: training x{sp:.2f}, inference '
                   f'x{fig["mlp_infer_speedup"][name]:.2f}')
  if fig.get('backbone'):
    lines += ['', '## Backbone (tools/bench_backbone.py)', '',
              '| arch | size | batch | dtype | GFLOP | compile s | s / call | images/s | GFLOP/s |',
              '|---|---:|---:|---|---:|---:|---:|---:|---:|']
    for r in fig['backbone']:
      lines.append(f'| {r["arch"]} | {r["size"]} | {r["batch"]} | {r["dtype"]} | {r["gflop"]} | '
                   f'{r["compile_s"]} | {r["s_call"]} | {r["img_s"]} | {r["gflop_s"]} |')
  if fig.get('refine_bf16') or fig.get('refine_f32'):
    lines += ['', '## Refinement loop (tools/bench_refine.py loop)', '',
              '| precision | compile s | steady ms / it | steady CPU ms / it | total s | loss |',
              '|---|---:|---:|---:|---:|---:|']
    for name in ('refine_bf16', 'refine_f32'):
      r = fig.get(name)
      if r:
        ms = (lambda v: _fmt(v * 1e3 if isinstance(v, float) else None, '.2f'))
        lines.append(f'| {name[7:]} | {_fmt(r["compile_s"])} | {ms(r["steady_s"])} | '
                     f'{ms(r["steady_cpu_s"])} | {_fmt(r["total_s"])} | {r["loss"]} |')
  study = _read(work / 'nstudy' / 'study.md').strip()
  if study:
    lines += ['', '## Neighbourhood study (tools/n_study_gpu.sh)', '', study]
  for s in data['steps']:   # what a failed or cut step printed last (its whole log: gpu_check.log)
    if s['status'] != 'ok' and not s['status'].startswith('skipped'):
      tail = [l for l in _read(work / f'{s["name"]}.log').splitlines()
              if l.strip() and not _NOISE.search(l)][-TAIL_LINES:]
      lines += ['', f'## {s["name"]}: {s["status"]} (last lines of its output)', '', '```',
                *tail, '```']
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> int:
  if len(argv) < 3:
    print(__doc__)
    return 2
  work, out = pathlib.Path(argv[1]), pathlib.Path(argv[2])
  smoke = '--smoke' in argv[3:]
  data = collect(work)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'gpu_check.json').write_text(json.dumps(dict(smoke=smoke, **data), indent=1,
                                                 default=str))
  (out / 'gpu_check.md').write_text(markdown(data, smoke, work))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
