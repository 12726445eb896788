"""Neighbourhood-prior study (issue 12 B): fit + evaluate one setting, then measure whether N binds.

One call = one setting (any `--config.*` overrides): `pipeline.run` fits (reusing the workdir's
coreset) and evaluates `eval.ablations`; then, per category, the test set is streamed once more
to compute `diagnostics.prior_diagnostics` (does N / P exclude the nearest C_emb code of normal /
defective patches, and by how much does N move the score) and the window geometry (how much of a
defective patch's window lies outside its defect). One JSON line per category is appended to
`<workdir>/study.jsonl` under `--tag`; `--table` prints every line collected so far as Markdown.

  python tools/n_study.py --config=configs/demo.py --workdir=/tmp/nstudy-lat --tag=w5k1 \
      --config.data.categories=lattice --config.eval.ablations=baseline,N,P,N+P
  python tools/n_study.py --workdir=/tmp/nstudy-lat --table

The variants' metrics are copied from `<workdir>/<cat>/eval/*.json` right after the run (the next
setting overwrites them). CPU-sized; tools/n_study_gpu.sh runs the paper-size MLP.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402
import scipy.ndimage as ndi  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'configs/*.py', lock_config=True)
flags.DEFINE_string('workdir', None, 'study workdir (one per category set)')
flags.DEFINE_string('tag', None, 'name of this setting in study.jsonl')
flags.DEFINE_bool('table', False, 'print the collected study.jsonl as Markdown and exit')
flags.DEFINE_float('rho', 0.01, 'relative threshold reported by the diagnostic')


def window_geometry(patch_masks: np.ndarray, window: int, dilation: int) -> dict[str, float]:
  """How far the window of a defective patch sees beyond its defect.

  Args:
    patch_masks: [B, h, w] bool defective patches.
  Returns:
    reach (cells), defect_size (median over connected defect regions of sqrt(area) in cells),
    reach_over_size, outside_fraction (mean over defective patches of the fraction of in-map
    window cells that are not defective).
  """
  from pni_jax import neighborhood
  offsets = neighborhood.neighbor_offsets(window, dilation)
  b, h, w = patch_masks.shape
  sizes, outside, inside_cells = [], 0.0, 0
  for i in range(b):
    m = patch_masks[i]
    if not m.any():
      continue
    lab, n = ndi.label(m)
    sizes.extend(np.sqrt(np.bincount(lab.ravel())[1:]).tolist())
    ys, xs = np.nonzero(m)
    yy = ys[:, None] + offsets[None, :, 0]
    xx = xs[:, None] + offsets[None, :, 1]
    valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    cell_def = m[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
    frac = ((valid & ~cell_def).sum(1) / np.maximum(valid.sum(1), 1))
    outside += float(frac.sum())
    inside_cells += len(ys)
  reach = neighborhood.window_reach(window, dilation)
  size = float(np.median(sizes)) if sizes else float('nan')
  return dict(reach=float(reach), defect_size=size, reach_over_size=reach / size,
              outside_fraction=outside / max(inside_cells, 1))


def diagnose(cfg, workdir: pathlib.Path, category: str, rho: float) -> dict:
  import jax
  from pni_jax import data as data_lib
  from pni_jax import diagnostics
  from pni_jax import features
  from pni_jax import infer
  from pni_jax import model as model_lib
  from pni_jax import neighborhood

  fitted = model_lib.load(workdir / category / 'model')
  arrays = model_lib.arrays(fitted)
  extractor = infer.make_extractor(cfg)
  test = data_lib.load_split(cfg.data, category, 'test')
  nb, sc = cfg.model.neighborhood, cfg.model.scoring
  window, dilation = int(nb.window), int(nb.get('dilation', 1))
  tau = infer.tau(sc, arrays['c_emb'].shape[0])

  @jax.jit
  def probs(feats):
    return neighborhood.neighbor_probs(arrays['mlp'], feats, window, int(nb.infer_chunk),
                                       float(sc.temperature), features.compute_dtype(cfg.model),
                                       dilation)

  parts, all_masks = [], []
  for batch in data_lib.batches(test, cfg.data, with_masks=True):
    images = np.asarray(batch['image'], np.float32)
    bsz = images.shape[0]
    _, feats = extractor.features(images)         # padded to the batch bucket
    p_nb = probs(feats) if arrays.get('mlp') is not None else None
    feats = feats[:bsz]
    p_nb = None if p_nb is None else p_nb[:bsz]
    masks = diagnostics.patch_masks(np.asarray(batch['mask']) > 0.5, feats.shape[1:3])
    all_masks.append(masks)
    parts.append(diagnostics.prior_diagnostics(
        feats, masks, arrays, p_nb, arrays.get('position'), tau=tau,
        lam=float(sc.likelihood_lambda), rho=rho, query_tile=int(sc.query_tile),
        bank_tile=int(sc.bank_tile)))
  out = diagnostics.merge_diagnostics(parts)
  out.update(window_geometry(np.concatenate(all_masks), window, dilation))
  hist = fitted.meta.get('mlp_history') or {}
  if hist.get('val_accuracy'):
    out['mlp_val_accuracy'] = float(hist['val_accuracy'][hist['best_epoch']])
  out['tau'] = tau
  out['num_emb'] = int(arrays['c_emb'].shape[0])
  out['num_dist'] = int(fitted.num_dist)
  return out


def run_setting(cfg, workdir: pathlib.Path, tag: str, rho: float) -> None:
  from pni_jax import cli
  from pni_jax import data as data_lib
  from pni_jax import evaluate
  from pni_jax import pipeline

  cfg = cli.normalize_config(cfg)
  t0 = time.time()
  pipeline.run(cfg, workdir)
  fit_eval_s = time.time() - t0
  cfg = pipeline.prepare_data(cfg, workdir)
  for category in data_lib.list_categories(cfg.data):
    t = time.time()
    diag = diagnose(cfg, workdir, category, rho)
    variants = {}
    for v in evaluate.variants_to_evaluate(cfg):   # this setting's variants only
      path = workdir / category / 'eval' / f'{v.name}.json'
      variants[v.name] = json.loads(path.read_text())['metrics']
    nb = cfg.model.neighborhood
    record = dict(tag=tag, category=category, variants=variants, diagnostics=diag,
                  settings=dict(window=int(nb.window), dilation=int(nb.get('dilation', 1)),
                                num_layers=int(nb.num_layers), width=int(nb.width),
                                epochs=int(nb.epochs), combine=str(cfg.model.scoring.combine),
                                border=str(cfg.model.scoring.get('border', 'pad')),
                                temperature=float(cfg.model.scoring.temperature)),
                  seconds=dict(fit_eval=fit_eval_s, diagnostics=time.time() - t))
    with open(workdir / 'study.jsonl', 'a') as fh:
      fh.write(json.dumps(record) + '\n')
    logging.info('[%s] %s: %s', tag, category, json.dumps(diag))


def _pct(x):
  return '' if x is None or x != x else f'{100 * x:.1f}'


def table(workdir: pathlib.Path) -> str:
  lines = [json.loads(l) for l in (workdir / 'study.jsonl').read_text().splitlines() if l]
  out = ['| tag | category | variant | I-AUROC | P-AUROC | P-F1 | allowed | MLP val acc | '
         'reach/size | win. outside | excl. N (normal / defect) | excl. P (n / d) | '
         'excl. both (n / d) | dS_N (normal / defect) | top-1 N (n / d) |',
         '|' + '---|' * 15]
  for rec in lines:
    d = rec['diagnostics']
    first = True
    for name, m in rec['variants'].items():
      diag_cols = ['', '', '', '', '', '', '', '']
      if first:
        diag_cols = [
            f"{d.get('mlp_val_accuracy', float('nan')):.2f}",
            f"{d['reach_over_size']:.2f}", _pct(d['outside_fraction']),
            f"{_pct(d.get('normal/excluded_N'))} / {_pct(d.get('defect/excluded_N'))}",
            f"{_pct(d.get('normal/excluded_P'))} / {_pct(d.get('defect/excluded_P'))}",
            f"{_pct(d.get('normal/excluded_NP'))} / {_pct(d.get('defect/excluded_NP'))}",
            f"{d.get('normal/score_change_N', float('nan')):.3f} / "
            f"{d.get('defect/score_change_N', float('nan')):.3f}",
            f"{_pct(d.get('normal/top1_N'))} / {_pct(d.get('defect/top1_N'))}"]
      out.append(f"| {rec['tag'] if first else ''} | {rec['category'] if first else ''} | {name} | "
                 f"{_pct(m['image_auroc'])} | {_pct(m['pixel_auroc'])} | "
                 f"{_pct(m['pixel_f1_max'])} | {_pct(m.get('allowed_fraction'))} | "
                 + ' | '.join(diag_cols) + ' |')
      first = False
  return '\n'.join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  workdir = pathlib.Path(FLAGS.workdir)
  if FLAGS.table:
    print(table(workdir))
    return
  if FLAGS.config is None or not FLAGS.tag:
    raise app.UsageError('--config and --tag are required (or --table)')
  logging.set_verbosity(logging.INFO)
  run_setting(FLAGS.config, workdir, FLAGS.tag, FLAGS.rho)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  from pni_jax import cli as _cli
  app.run(main, flags_parser=_cli.parse_flags)
