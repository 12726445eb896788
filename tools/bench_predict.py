"""Predict and image loading on a folder: `python tools/benchmark.py predict --workdir=WORKDIR`.

Real inspection images are larger than the model's input (MVTec AD: 700-1024 px; the demo's are
256 px), and then the host's image work weighs as much as the scoring. This writes `--images`
test images of the category, resized to `--size` px (PNG), to a temporary folder and prints, in
ms per image (median of --repeats runs after a warm-up run):
  * predict: `predict.Predictor.run` on the folder (decode, preprocess, score, the map back to
    the image's size, mask and overlay PNGs written);
    and the process CPU time per image (how many cores the call kept busy);
  * loading: `data.batches` without TensorFlow (`splits.numpy_batches`: decode + preprocess, the
    loader an accelerator machine without TensorFlow uses), alone.
Uses only public functions, so `PYTHONPATH=/other/checkout python tools/benchmark.py predict ...`
times another checkout on the same images.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image


def _inputs(workdir: pathlib.Path, category: str, size: int, count: int,
            folder: pathlib.Path) -> list[str]:
  """`count` test images of `category` (cycled), resized to size x size, saved as PNG."""
  from pni_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from pni_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(model_lib.load(workdir / category / 'model').meta['config'])
  test = data_lib.load_split(cfg.data, category, 'test')
  paths = []
  for i in range(count):
    image = Image.fromarray(data_lib.load_image(test.paths[i % len(test.paths)]))
    path = folder / f'{i:04d}.png'
    image.resize((size, size), Image.BILINEAR).save(path)
    paths.append(str(path))
  return paths


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog='benchmark.py predict', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='a fitted workdir (the demo)')
  p.add_argument('--category', default='', help='default: the first fitted category')
  p.add_argument('--size', type=int, default=1024, help='image side in px')
  p.add_argument('--images', type=int, default=24)
  p.add_argument('--repeats', type=int, default=3)
  a = p.parse_args(argv)
  from pni_jax import predict  # pylint: disable=g-import-not-at-top
  from pni_jax.data import layouts, splits  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(a.workdir)
  fitted = sorted(d.name for d in workdir.iterdir() if (d / 'model').is_dir())
  category = a.category or fitted[0]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / 'in').mkdir()
    paths = _inputs(workdir, category, a.size, a.images, tmp / 'in')
    predictor = predict.Predictor(workdir, category)
    print(f'{workdir} [{category}]: {a.images} images of {a.size} x {a.size} px -> '
          f'{predictor.crop} px crops, batch {predictor.batch_size}; ms per image, median of '
          f'{a.repeats} (all runs)')
    predictor.run(paths[:predictor.batch_size], tmp / 'warm', progress=False)
    runs, cpu = [], []
    for r in range(a.repeats):
      t, c = time.perf_counter(), time.process_time()
      predictor.run(paths, tmp / f'out{r}', progress=False)
      runs.append(1e3 * (time.perf_counter() - t) / len(paths))
      cpu.append(1e3 * (time.process_time() - c) / len(paths))
    print(f'  {"predict (Predictor.run on the folder)":<44} {statistics.median(runs):8.1f}   '
          + ' '.join(f'{v:.1f}' for v in runs)
          + f'   (process CPU {statistics.median(cpu):.1f} ms per image: '
          f'{statistics.median(cpu) / statistics.median(runs):.1f} cores busy)')
    split = layouts.Split(paths=tuple(paths), labels=np.zeros(len(paths), np.int32),
                          mask_paths=(None,) * len(paths), defect_types=('good',) * len(paths),
                          category=category, split='bench')
    data_cfg = ml_collections.ConfigDict(dict(resize=predictor.resize, crop=predictor.crop,
                                              batch_size=predictor.batch_size,
                                              resize_mode=predictor.mode))
    runs = []
    for r in range(a.repeats + 1):
      t = time.perf_counter()
      n = sum(b['image'].shape[0] for b in splits.numpy_batches(split, data_cfg, with_masks=False))
      if r:                                      # the first run warms the file cache
        runs.append(1e3 * (time.perf_counter() - t) / n)
    print(f'  {"loading alone (decode + preprocess, no TF)":<44} {statistics.median(runs):8.1f}   '
          + ' '.join(f'{v:.1f}' for v in runs))
  return 0
