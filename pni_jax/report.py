"""Reports in the workdir: metrics.json per category, results tables, PNG figures, clu scalars.

Every file is written atomically (`pni_jax.fileio`). Figures use matplotlib's Agg canvas on
`matplotlib.figure.Figure` objects (no pyplot, no global figure state); matplotlib and clu are
imported only when a figure or a writer is made.

Layout written by the helpers below:
  <workdir>/<category>/metrics.json          write_category_metrics
  <workdir>/<category>/pixel_histogram.png   save_score_histogram   (the paper's Figure 7)
  <workdir>/<category>/pixel_pr_curve.png    save_pr_curve          (the paper's Figure 5)
  <workdir>/results.csv, results.md          write_results_table    (the paper's Table 1)
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from typing import Any, Mapping, Sequence

import numpy as np

from pni_jax import fileio

METRIC_COLUMNS = ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_f1_max', 'image_f1_max', 'fpr',
                  'fnr')
# Columns holding fractions in [0, 1]: shown as percentages with 2 decimals in Markdown.
FRACTION_COLUMNS = METRIC_COLUMNS
HEADERS = {
    'image_auroc': 'I-AUROC', 'pixel_auroc': 'P-AUROC', 'aupro': 'AUPRO',
    'pixel_f1_max': 'P-F1max', 'image_f1_max': 'I-F1max', 'fpr': 'FPR', 'fnr': 'FNR',
    'image_threshold': 'I-threshold', 'pixel_threshold': 'P-threshold', 'group': 'group',
}


# ----------------------------------------------------------------------------- metrics.json


def write_category_metrics(cat_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> str:
  """Writes `<cat_dir>/metrics.json` atomically (nan as null); returns its path."""
  path = os.path.join(os.fspath(cat_dir), 'metrics.json')
  fileio.atomic_write_json(path, dict(metrics))
  return path


def read_category_metrics(cat_dir: str | os.PathLike) -> dict[str, Any]:
  """Reads `<cat_dir>/metrics.json` back (null as nan)."""
  path = os.path.join(os.fspath(cat_dir), 'metrics.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no metrics file: {path}')
  with open(path, encoding='utf-8') as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from e
  return {k: math.nan if v is None else v for k, v in data.items()}


# ----------------------------------------------------------------------------- tables


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _csv_cell(value: Any) -> str:
  if value is None:
    return ''
  if _is_number(value):
    return repr(float(value))
  return str(value)


def _md_cell(value: Any, percent: bool) -> str:
  if value is None:
    return ''
  if _is_number(value):
    value = float(value)
    if math.isnan(value):
      return 'n/a'
    return f'{100.0 * value:.2f}' if percent else f'{value:.4g}'
  return str(value).replace('|', '\\|')


def write_table(path_stem: str | os.PathLike,
                rows: Mapping[str, Mapping[str, Any]] | Sequence[tuple[str, Mapping[str, Any]]],
                columns: Sequence[str], label: str = 'variant',
                percent_columns: Sequence[str] = FRACTION_COLUMNS) -> tuple[str, str]:
  """Writes `<path_stem>.csv` (raw values) and `<path_stem>.md` (fractions as percentages).

  Args:
    path_stem: output path without extension.
    rows: label -> {column: value}, in display order (a mapping or a sequence of pairs). Values may
      be numbers (nan allowed) or strings; a missing column is left empty.
    columns: the columns to write, in order.
    label: header of the first (row label) column, e.g. 'category' or 'variant'.
    percent_columns: columns shown as 100 * value with 2 decimals in Markdown.

  Returns:
    (csv path, markdown path).
  """
  rows = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
  columns = list(columns)
  stem = os.fspath(path_stem)
  text = io.StringIO()
  writer = csv.writer(text, lineterminator='\n')
  writer.writerow([label] + columns)
  for name, values in rows:
    writer.writerow([name] + [_csv_cell(values.get(c)) for c in columns])
  fileio.atomic_write_text(stem + '.csv', text.getvalue())

  percent = set(percent_columns)
  text_columns = {c for c in columns
                  if all(isinstance(v.get(c), str) or v.get(c) is None for _, v in rows)}
  lines = ['| ' + ' | '.join([label] + [HEADERS.get(c, c) for c in columns]) + ' |',
           '|---|' + ''.join('---|' if c in text_columns else '---:|' for c in columns)]
  for name, values in rows:
    cells = [_md_cell(values.get(c), c in percent) for c in columns]
    lines.append('| ' + ' | '.join([str(name)] + cells) + ' |')
  if percent & set(columns):
    lines += ['', 'Fractions in percent (' + ', '.join(HEADERS.get(c, c) for c in columns
                                                       if c in percent) + ').']
  fileio.atomic_write_text(stem + '.md', '\n'.join(lines) + '\n')
  return stem + '.csv', stem + '.md'


def _mean(results: Sequence[Mapping[str, Any]], column: str) -> float:
  """Plain mean over categories; a nan (or missing) value makes the mean nan, visibly."""
  values = [m.get(column, math.nan) for m in results]
  values = [float(v) if _is_number(v) else math.nan for v in values]
  return float(np.mean(values)) if values else math.nan


def results_rows(results: Mapping[str, Mapping[str, Any]], groups: Mapping[str, str],
                 columns: Sequence[str] = METRIC_COLUMNS) -> list[tuple[str, dict[str, Any]]]:
  """Table 1 rows: one per category (input order), 'mean (<group>)' per group present (order of
  first appearance), then 'mean' over all categories."""
  rows = [(cat, {'group': groups.get(cat, ''), **dict(m)}) for cat, m in results.items()]
  present = list(dict.fromkeys(g for g in (groups.get(c, '') for c in results) if g))
  for group in present:
    members = [m for c, m in results.items() if groups.get(c, '') == group]
    rows.append((f'mean ({group})', {'group': group,
                                     **{c: _mean(members, c) for c in columns}}))
  if results:
    rows.append(('mean', {'group': 'all', **{c: _mean(list(results.values()), c)
                                             for c in columns}}))
  return rows


def write_results_table(workdir: str | os.PathLike, results: Mapping[str, Mapping[str, Any]],
                        groups: Mapping[str, str], columns: Sequence[str] = METRIC_COLUMNS,
                        extra_rows: Mapping[str, Mapping[str, Any]] | None = None
                        ) -> tuple[str, str]:
  """Writes `<workdir>/results.csv` and `<workdir>/results.md` (the paper's Table 1 layout).

  Args:
    workdir: output folder.
    results: category -> metrics dict (as `metrics.evaluate` returns), in display order.
    groups: category -> group name ('object', 'texture', ...); a category without a group gets no
      group mean but counts in the overall mean.
    columns: metric columns, in order.
    extra_rows: label -> metrics rows appended after the means (e.g. published numbers).

  Returns:
    (csv path, markdown path).
  """
  rows = results_rows(results, groups, columns)
  rows += [(name, dict(values)) for name, values in (extra_rows or {}).items()]
  return write_table(os.path.join(os.fspath(workdir), 'results'), rows,
                     ['group'] + list(columns), label='category')


# ----------------------------------------------------------------------------- figures


def _figure(width_in: float, height_in: float, dpi: int):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width_in, height_in), dpi=dpi)
  FigureCanvasAgg(fig)
  return fig


def _save_figure(fig, path: str | os.PathLike) -> None:
  with fileio.atomic_open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=fig.dpi)


def _colormap(name: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  return matplotlib.colormaps[name]


def _check_2d(name: str, array: Any, shape: tuple[int, int]) -> np.ndarray:
  array = np.asarray(array)
  if array.shape != shape:
    raise ValueError(f'{name} must have shape {shape} (the image size); got {array.shape}')
  return array


def colorize(amap: np.ndarray, vmin: float | None = None, vmax: float | None = None,
             cmap: str = 'jet') -> np.ndarray:
  """amap [H, W] float -> [H, W, 3] uint8 through a matplotlib colour map over [vmin, vmax]
  (default: the map's own range)."""
  amap = np.asarray(amap, np.float64)
  if amap.ndim != 2:
    raise ValueError(f'amap must be [H, W]; got {amap.shape}')
  lo = float(np.min(amap)) if vmin is None else float(vmin)
  hi = float(np.max(amap)) if vmax is None else float(vmax)
  scaled = np.clip((amap - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(amap)
  return (_colormap(cmap)(scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def save_heatmap_png(path: str | os.PathLike, amap: np.ndarray, vmin: float | None = None,
                     vmax: float | None = None, cmap: str = 'jet') -> None:
  """Saves amap [H, W] as a colour-mapped [H, W, 3] PNG of the same size (no axes)."""
  fileio.atomic_save_png(path, colorize(amap, vmin, vmax, cmap))


def save_image_figure(path: str | os.PathLike, image: np.ndarray, gt_mask: np.ndarray | None,
                      amap: np.ndarray, pred_mask: np.ndarray, title: str = '', *,
                      vmin: float | None = None, vmax: float | None = None,
                      panel_inches: float = 4.0, dpi: int = 100) -> None:
  """Three panels: input with ground-truth contour | anomaly heat map | predicted mask overlay.

  Args:
    path: PNG path; the image is (3 * panel_inches * dpi) x ((panel_inches + 0.5) * dpi) pixels.
    image: [H, W, 3] float in [0, 1] (clipped) or uint8.
    gt_mask: [H, W] bool ground truth, or None (no contour; e.g. a normal image).
    amap: [H, W] float anomaly map, coloured over [vmin, vmax] (default: its own range; pass the
      category's range to compare images).
    pred_mask: [H, W] bool, e.g. amap >= the F1-optimal pixel threshold.
    title: figure title (e.g. file name, image score, label).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'image must be [H, W, 3]; got {image.shape}')
  if image.dtype == np.uint8:
    image = image.astype(np.float64) / 255.0
  image = np.clip(np.asarray(image, np.float64), 0.0, 1.0)
  shape = image.shape[:2]
  amap = _check_2d('amap', amap, shape).astype(np.float64)
  pred = _check_2d('pred_mask', pred_mask, shape).astype(bool)
  gt = None if gt_mask is None else _check_2d('gt_mask', gt_mask, shape).astype(bool)

  fig = _figure(3 * panel_inches, panel_inches + 0.5, dpi)
  axes = fig.subplots(1, 3)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86, wspace=0.03)
  axes[0].imshow(image)
  if gt is not None and gt.any():
    axes[0].contour(gt.astype(np.float32), levels=[0.5], colors=['red'], linewidths=1.2)
  axes[0].set_title('input + ground truth', fontsize=10)
  axes[1].imshow(amap, cmap='jet', vmin=vmin, vmax=vmax)
  axes[1].set_title('anomaly map', fontsize=10)
  overlay = image.copy()
  overlay[pred] = 0.45 * overlay[pred] + 0.55 * np.array([1.0, 0.0, 0.0])
  axes[2].imshow(overlay)
  if pred.any():
    axes[2].contour(pred.astype(np.float32), levels=[0.5], colors=['yellow'], linewidths=0.8)
  axes[2].set_title('predicted mask', fontsize=10)
  for ax in axes:
    ax.set_axis_off()
  if title:
    fig.suptitle(title, fontsize=11)
  _save_figure(fig, path)


def save_score_histogram(path: str | os.PathLike, hist: Mapping[str, np.ndarray],
                         threshold: float | None = None, title: str = '', *,
                         density: bool = True, width_inches: float = 6.0,
                         height_inches: float = 4.0, dpi: int = 100) -> None:
  """Normal (green) vs anomalous (red) pixel score histograms with the threshold line.

  Args:
    hist: {'edges' [B + 1], 'normal' [B], 'anomalous' [B]} as `metrics.pixel_score_histograms` or
      `metrics.evaluate_with_curves(...)[1]['hist']` return.
    threshold: drawn as a dashed vertical line (e.g. the F1-optimal pixel threshold); None: none.
    density: normalise each histogram to unit area (the classes differ in size by orders of
      magnitude), else raw counts on a log axis.
  """
  edges = np.asarray(hist['edges'], np.float64)
  normal = np.asarray(hist['normal'], np.float64)
  anomalous = np.asarray(hist['anomalous'], np.float64)
  if len(edges) != len(normal) + 1 or len(normal) != len(anomalous):
    raise ValueError(f'histogram sizes do not fit: {len(edges)} edges, {len(normal)} normal and '
                     f'{len(anomalous)} anomalous bins')
  fig = _figure(width_inches, height_inches, dpi)
  ax = fig.subplots()
  widths = np.diff(edges)
  for counts, color, name in ((normal, 'tab:green', 'normal'), (anomalous, 'tab:red',
                                                                'anomalous')):
    total = counts.sum()
    values = counts / (total * widths) if density and total else counts
    ax.stairs(values, edges, fill=True, alpha=0.45, color=color,
              label=f'{name} ({int(total)} px)')
  if threshold is not None and math.isfinite(threshold):
    ax.axvline(threshold, color='black', linestyle='--', linewidth=1.2,
               label=f'threshold {threshold:.4g}')
  if not density:
    ax.set_yscale('log')
  ax.set_xlabel('pixel anomaly score')
  ax.set_ylabel('density' if density else 'pixels')
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  _save_figure(fig, path)


def save_pr_curve(path: str | os.PathLike, curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  f1s: Mapping[str, float] | None = None, title: str = 'pixel precision-recall',
                  *, size_inches: float = 5.0, dpi: int = 100) -> None:
  """Pixel precision-recall curves, one line per variant (the paper's Figure 5).

  Args:
    curves: label -> (precision [K], recall [K]) (e.g. from `metrics.pixel_pr_curve`).
    f1s: label -> F1-max, shown in the legend.
  """
  fig = _figure(size_inches, size_inches, dpi)
  ax = fig.subplots()
  for name, (precision, recall) in curves.items():
    precision, recall = np.asarray(precision), np.asarray(recall)
    if precision.shape != recall.shape:
      raise ValueError(f'{name}: precision {precision.shape} and recall {recall.shape} differ')
    f1 = None if f1s is None else f1s.get(name)
    label = name if f1 is None or not math.isfinite(f1) else f'{name} (F1-max {100 * f1:.2f})'
    ax.plot(recall, precision, linewidth=1.5, label=label)
  ax.set_xlim(0.0, 1.0)
  ax.set_ylim(0.0, 1.02)
  ax.set_xlabel('recall')
  ax.set_ylabel('precision')
  ax.grid(alpha=0.3)
  if curves:
    ax.legend(fontsize=8, loc='lower left')
  if title:
    ax.set_title(title)
  fig.tight_layout()
  _save_figure(fig, path)


def write_category_report(cat_dir: str | os.PathLike, metrics: Mapping[str, Any],
                          curves: Mapping[str, Any], label: str = 'model') -> list[str]:
  """metrics.json, pixel_histogram.png and pixel_pr_curve.png of one category.

  Args:
    metrics, curves: as `metrics.evaluate_with_curves` returns them.
    label: the variant's name in the PR-curve legend.

  Returns:
    the paths written.
  """
  cat_dir = os.fspath(cat_dir)
  name = os.path.basename(os.path.normpath(cat_dir))
  paths = [write_category_metrics(cat_dir, metrics)]
  paths.append(os.path.join(cat_dir, 'pixel_histogram.png'))
  save_score_histogram(paths[-1], curves['hist'], metrics.get('pixel_threshold'),
                       title=f'{name}: pixel scores')
  paths.append(os.path.join(cat_dir, 'pixel_pr_curve.png'))
  save_pr_curve(paths[-1], {label: (curves['pr']['precision'], curves['pr']['recall'])},
                {label: metrics.get('pixel_f1_max', math.nan)}, title=f'{name}: pixel PR curve')
  return paths


# ----------------------------------------------------------------------------- clu scalars


def scalar_writer(logdir: str | os.PathLike, asynchronous: bool = True):
  """A clu metric writer: TensorBoard summaries under `logdir` (and the log). Without TensorFlow
  (an accelerator image with jax only) the scalars go to `<logdir>/scalars.jsonl` instead."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers.create_default_writer(os.fspath(logdir), asynchronous=asynchronous)
  except ImportError:
    return JsonlWriter(logdir)


class JsonlWriter:
  """`write_scalars(step, {name: value})` as JSON lines in `<logdir>/scalars.jsonl`."""

  def __init__(self, logdir: str | os.PathLike):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(os.fspath(logdir), 'scalars.jsonl')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(dict(step=int(step), **{k: float(v) for k, v in scalars.items()})) + '\n')

  def flush(self) -> None:
    pass


def log_metrics(writer, step: int, metrics: Mapping[str, Any],
                prefix: str = '') -> dict[str, float]:
  """Writes the numeric entries of `metrics` as scalars '<prefix>/<name>' and flushes.

  Returns the scalars written.
  """
  scalars = {(f'{prefix}/{k}' if prefix else k): float(v)
             for k, v in metrics.items() if _is_number(v)}
  writer.write_scalars(int(step), scalars)
  writer.flush()
  return scalars


def write_ablation_table(workdir, all_results, groups, names):
  """Like the paper's Table 3: rows = variants; columns = I-AUROC / P-AUROC / P-F1-max / AUPRO and
  the allowed fraction of C_emb, per category group and overall (fractions, percent in Markdown)."""
  group_names = sorted(set(groups.values()))
  metrics = ('image_auroc', 'pixel_auroc', 'pixel_f1_max', 'aupro', 'allowed_fraction')
  headers = dict(HEADERS, allowed_fraction='allowed')
  columns = [f'{headers.get(m, m)} ({g})' for m in metrics for g in group_names + ['mean']]
  rows = []
  for name in names:
    row = {}
    for metric in metrics:
      for g in group_names + ['mean']:
        cats = [c for c in all_results if g == 'mean' or groups[c] == g]
        vals = [all_results[c][name][metric] for c in cats
                if metric in all_results[c].get(name, {})]
        row[f'{headers.get(metric, metric)} ({g})'] = float(np.mean(vals)) if vals else float('nan')
    rows.append((name, row))
  write_table(workdir / 'ablation', rows, columns, label='variant', percent_columns=columns)
