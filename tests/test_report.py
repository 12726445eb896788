"""Reports: atomic writes, metrics.json, results tables, figures, clu scalars."""

import csv
import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from pni_jax import fileio
from pni_jax import metrics
from pni_jax import report


def _files(folder):
  return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------- atomic writes


def test_interrupted_write_leaves_no_file(tmp_path):
  path = tmp_path / 'sub' / 'out.txt'
  with pytest.raises(RuntimeError, match='interrupted'):
    with fileio.atomic_open(path, 'w') as f:
      f.write('half of the content')
      f.flush()
      raise RuntimeError('interrupted')
  assert not path.exists()
  assert _files(tmp_path / 'sub') == []  # no temporary left behind either


def test_interrupted_json_keeps_previous_file(tmp_path):
  path = tmp_path / 'metrics.json'
  fileio.atomic_write_json(path, {'aupro': 0.5})
  # json.dump writes piece by piece: the object fails after the first keys went out.
  with pytest.raises(TypeError):
    fileio.atomic_write_json(path, {'a': 1.0, 'b': list(range(1000)), 'c': object()})
  assert json.loads(path.read_text()) == {'aupro': 0.5}
  assert _files(tmp_path) == ['metrics.json']


def test_atomic_text_json_png_round_trip(tmp_path):
  fileio.atomic_write_text(tmp_path / 'a' / 'b.txt', 'héllo\n')
  assert (tmp_path / 'a' / 'b.txt').read_text(encoding='utf-8') == 'héllo\n'
  fileio.atomic_write_json(tmp_path / 'x.json', {'v': np.float32(0.25), 'n': float('nan'),
                                                 'arr': np.arange(3)})
  assert json.loads((tmp_path / 'x.json').read_text()) == {'v': 0.25, 'n': None, 'arr': [0, 1, 2]}
  image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
  fileio.atomic_save_png(tmp_path / 'i.png', image)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'i.png')), image)
  assert oct(os.stat(tmp_path / 'i.png').st_mode & 0o777) == oct(0o644)
  with pytest.raises(ValueError, match='uint8'):
    fileio.atomic_save_png(tmp_path / 'bad.png', image.astype(np.float32))
  assert not (tmp_path / 'bad.png').exists()


@pytest.mark.parametrize('channels', [0, 3, 4])
@pytest.mark.parametrize('level', [0, 1, 6, 9])
def test_encode_png_round_trips_through_pil(channels, level):
  # Our PNG encoder (Sub filter + zlib): PIL (and its CRC checks) decode the exact pixels, for
  # grey, RGB and RGBA, odd sizes, values that wrap modulo 256 in the filter, every zlib level.
  rng = np.random.default_rng(channels * 10 + level)
  shape = (13, 1) if level == 9 else (17, 29)
  image = rng.integers(0, 256, shape + ((channels,) if channels else ()), dtype=np.uint8)
  image[0, 0] = 255
  data = fileio.encode_png(image, level)
  decoded = Image.open(io.BytesIO(data))
  decoded.verify()
  decoded = Image.open(io.BytesIO(data))
  assert decoded.mode == {0: 'L', 3: 'RGB', 4: 'RGBA'}[channels]
  np.testing.assert_array_equal(np.asarray(decoded), image)
  # Smooth content compresses (the filter and zlib do their work); level 0 stores.
  smooth = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
  assert len(fileio.encode_png(smooth, 1)) < smooth.size / 10
  assert len(fileio.encode_png(smooth, 0)) > smooth.size


# ----------------------------------------------------------------------------- metrics.json


def test_category_metrics_json_keys(tmp_path):
  rng = np.random.default_rng(0)
  maps = rng.random((4, 12, 12)).astype(np.float32)
  masks = np.zeros((4, 12, 12), bool)
  masks[1, 2:6, 3:7] = masks[3, 8:, 8:] = True
  maps[masks] += 0.5
  result = metrics.evaluate([0.1, 0.9, 0.3, 0.8], [0, 1, 0, 1], maps, masks)
  path = report.write_category_metrics(tmp_path / 'bottle', result)
  assert path == os.path.join(tmp_path / 'bottle', 'metrics.json')
  data = json.loads((tmp_path / 'bottle' / 'metrics.json').read_text())
  assert list(data) == ['image_auroc', 'pixel_auroc', 'aupro', 'pixel_f1_max', 'image_f1_max',
                        'fpr', 'fnr', 'image_threshold', 'pixel_threshold']
  assert data['image_auroc'] == 1.0 and data['fpr'] == 0.0 and data['fnr'] == 0.0
  assert report.read_category_metrics(tmp_path / 'bottle') == pytest.approx(result)
  report.write_category_metrics(tmp_path / 'nan', {'aupro': math.nan})
  assert math.isnan(report.read_category_metrics(tmp_path / 'nan')['aupro'])
  with pytest.raises(FileNotFoundError, match='missing'):
    report.read_category_metrics(tmp_path / 'missing')


# ----------------------------------------------------------------------------- tables


RESULTS = {
    'carpet': {'image_auroc': 0.99, 'pixel_auroc': 0.98, 'aupro': 0.90},
    'bottle': {'image_auroc': 1.00, 'pixel_auroc': 0.97, 'aupro': 0.95},
    'grid': {'image_auroc': 0.95, 'pixel_auroc': 0.96, 'aupro': 0.80},
    'screw': {'image_auroc': 0.90, 'pixel_auroc': 0.99, 'aupro': math.nan},
}
GROUPS = {'carpet': 'texture', 'grid': 'texture', 'bottle': 'object', 'screw': 'object'}
COLUMNS = ('image_auroc', 'pixel_auroc', 'aupro')


def test_results_table_rows_and_means(tmp_path):
  csv_path, md_path = report.write_results_table(
      tmp_path, RESULTS, GROUPS, columns=COLUMNS,
      extra_rows={'PNI (paper)': {'image_auroc': 0.9956}})
  assert (csv_path, md_path) == (str(tmp_path / 'results.csv'), str(tmp_path / 'results.md'))
  with open(csv_path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['category'] for r in rows] == ['carpet', 'bottle', 'grid', 'screw', 'mean (texture)',
                                           'mean (object)', 'mean', 'PNI (paper)']
  by_name = {r['category']: r for r in rows}
  assert float(by_name['mean (texture)']['image_auroc']) == pytest.approx((0.99 + 0.95) / 2)
  assert float(by_name['mean (object)']['pixel_auroc']) == pytest.approx((0.97 + 0.99) / 2)
  assert float(by_name['mean']['image_auroc']) == pytest.approx((0.99 + 1.0 + 0.95 + 0.90) / 4)
  assert float(by_name['mean (texture)']['aupro']) == pytest.approx(0.85)
  assert math.isnan(float(by_name['mean (object)']['aupro']))  # a nan is not hidden
  assert float(by_name['carpet']['aupro']) == 0.9 and by_name['carpet']['group'] == 'texture'
  assert by_name['PNI (paper)']['pixel_auroc'] == ''

  md = open(md_path).read().splitlines()
  assert md[0] == '| category | group | I-AUROC | P-AUROC | AUPRO |'
  assert md[2] == '| carpet | texture | 99.00 | 98.00 | 90.00 |'
  assert '| mean (object) | object | 95.00 | 98.00 | n/a |' in md
  assert '| mean | all | 96.00 | 97.50 | n/a |' in md


def test_generic_table_for_ablation(tmp_path):
  rows = [('PatchCore', {'aupro': 0.934, 'pixel_threshold': 2.5}),
          ('PNI', {'aupro': 0.9605, 'pixel_threshold': 1.25})]
  csv_path, md_path = report.write_table(tmp_path / 'ablation', rows,
                                         ['aupro', 'pixel_threshold'])
  with open(csv_path, newline='') as f:
    assert list(csv.reader(f)) == [['variant', 'aupro', 'pixel_threshold'],
                                   ['PatchCore', '0.934', '2.5'], ['PNI', '0.9605', '1.25']]
  md = open(md_path).read()
  assert '| PNI | 96.05 | 1.25 |' in md and '| PatchCore | 93.40 | 2.5 |' in md


# ----------------------------------------------------------------------------- figures


def _png_size(path):
  with Image.open(path) as im:
    im.verify()  # a complete, valid PNG
  with Image.open(path) as im:
    return im.format, im.size


def test_image_figure_is_a_png_of_the_expected_size(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.random((32, 40, 3))
  gt = np.zeros((32, 40), bool)
  gt[5:15, 10:20] = True
  amap = rng.random((32, 40))
  path = tmp_path / 'figs' / 'img.png'
  report.save_image_figure(path, image, gt, amap, amap > 0.7, title='000.png score 1.2',
                           panel_inches=2.0, dpi=50)
  assert _png_size(path) == ('PNG', (300, 125))
  report.save_image_figure(tmp_path / 'normal.png', (image * 255).astype(np.uint8), None, amap,
                           np.zeros_like(gt), panel_inches=2.0, dpi=50)
  assert _png_size(tmp_path / 'normal.png') == ('PNG', (300, 125))
  with pytest.raises(ValueError, match='amap'):
    report.save_image_figure(tmp_path / 'bad.png', image, gt, amap[:-1], gt)


def test_histogram_pr_curve_and_category_report(tmp_path):
  rng = np.random.default_rng(1)
  maps = rng.normal(size=(4, 16, 16)).astype(np.float32)
  masks = np.zeros((4, 16, 16), bool)
  masks[0, 4:9, 4:9] = masks[2, 10:14, 1:6] = True
  maps[masks] += 2.0
  result, curves = metrics.evaluate_with_curves([0.9, 0.1, 0.8, 0.2], [1, 0, 1, 0], maps, masks,
                                                pr_points=100, hist_bins=20)
  report.save_score_histogram(tmp_path / 'h.png', curves['hist'], result['pixel_threshold'],
                              width_inches=3.0, height_inches=2.0, dpi=50)
  assert _png_size(tmp_path / 'h.png') == ('PNG', (150, 100))
  pr = curves['pr']
  report.save_pr_curve(tmp_path / 'pr.png',
                       {'PNI': (pr['precision'], pr['recall']), 'flat': ([0.5, 0.5], [0.0, 1.0])},
                       {'PNI': result['pixel_f1_max']}, size_inches=2.0, dpi=50)
  assert _png_size(tmp_path / 'pr.png') == ('PNG', (100, 100))
  paths = report.write_category_report(tmp_path / 'cat', result, curves)
  assert [os.path.basename(p) for p in paths] == ['metrics.json', 'pixel_histogram.png',
                                                  'pixel_pr_curve.png']
  assert _files(tmp_path / 'cat') == sorted(os.path.basename(p) for p in paths)
  with pytest.raises(ValueError, match='histogram sizes'):
    report.save_score_histogram(tmp_path / 'x.png', {'edges': [0, 1], 'normal': [1, 2],
                                                     'anomalous': [1, 2]})


def test_heatmap_png_colours_and_size(tmp_path):
  amap = np.tile(np.linspace(0.0, 2.0, 11), (5, 1))
  report.save_heatmap_png(tmp_path / 'm.png', amap, vmin=0.0, vmax=1.0)
  rgb = np.asarray(Image.open(tmp_path / 'm.png'))
  assert rgb.shape == (5, 11, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[:, 5:], np.broadcast_to(rgb[0, -1], (5, 6, 3)))  # clipped
  np.testing.assert_array_equal(rgb[0, 0], report.colorize(np.zeros((1, 1)), 0.0, 1.0)[0, 0])
  assert not np.array_equal(rgb[0, 0], rgb[0, 4])


# ----------------------------------------------------------------------------- clu scalars


def test_log_metrics_writes_tensorboard_scalars(tmp_path):
  writer = report.scalar_writer(tmp_path / 'tb', asynchronous=False)
  written = report.log_metrics(writer, 3, {'aupro': 0.9, 'fpr': np.float32(0.25),
                                           'name': 'bottle'}, prefix='bottle')
  writer.close()
  assert written == {'bottle/aupro': 0.9, 'bottle/fpr': 0.25}
  events = [f for f in os.listdir(tmp_path / 'tb') if 'tfevents' in f]
  assert len(events) == 1
  content = (tmp_path / 'tb' / events[0]).read_bytes()
  assert b'bottle/aupro' in content and b'bottle/fpr' in content


def test_metrics_log_table_is_aligned_per_variant():
  # evaluate logs one aligned line per variant (the values in the table's column order).
  from pni_jax import evaluate
  results = {'+N+P+R': dict(image_auroc=1.0, pixel_auroc=0.99384, aupro=0.9793,
                            pixel_f1_max=0.91381, allowed_fraction=0.0361),
             'baseline': dict(image_auroc=0.7326, pixel_auroc=0.7019, aupro=0.3408,
                              pixel_f1_max=0.4385, allowed_fraction=1.0)}
  lines = evaluate.metrics_table(results).split('\n')
  assert len(lines) == 3
  assert lines[0].split() == ['variant', 'I-AUROC', 'P-AUROC', 'AUPRO', 'P-F1', 'allowed', 'C_emb']
  assert lines[1].split() == ['+N+P+R', '1.0000', '0.9938', '0.9793', '0.9138', '0.036']
  assert lines[2].split() == ['baseline', '0.7326', '0.7019', '0.3408', '0.4385', '1.000']
  assert len({len(line) for line in lines}) == 1     # columns line up
