"""Inspect new images with a fitted workdir: "is this image defective, and where?".

`python -m pni_jax.main --mode=predict --workdir=RUN --images=DIR_OR_GLOB [--category=CAT]`
writes, under `<RUN>/predictions/<category>/` (or --out):
  <name>_overlay.png   the input at its original size, the predicted defect region tinted red
  <name>_mask.png      the binary defect mask (0 / 255) at the input's original size (empty when
                       the image is judged normal)
  predictions.csv / predictions.json   per image: score, threshold, decision, defect area, error
Images of any size, grayscale or RGBA go through the model's own preprocessing (resize per
data.resize_mode, center crop); maps come back to the original size. An unreadable file is
reported in the table (and the log) and the others are still processed. Thresholds are the fit-time ones (held-out
normal images), stored with the model.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import glob
import io
import os
import pathlib

import ml_collections
import numpy as np
from absl import logging

from pni_jax import data as data_lib
from pni_jax import fileio
from pni_jax import infer
from pni_jax import model as model_lib
from pni_jax.progress import Progress

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def find_images(spec: str) -> list[str]:
  """A folder (its image files, recursively, sorted) or a glob pattern -> file paths."""
  if os.path.isdir(spec):
    paths = [str(p) for p in sorted(pathlib.Path(spec).rglob('*'))
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
  else:
    paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f'--images={spec}: no image files found (a folder or a glob such as '
                            f'"parts/*.png"; suffixes {", ".join(IMAGE_SUFFIXES)})')
  return paths


def pick_category(workdir: pathlib.Path, category: str | None) -> str:
  fitted = sorted(p.name for p in workdir.iterdir() if model_lib.exists(p / 'model')) \
      if workdir.is_dir() else []
  if not fitted:
    raise FileNotFoundError(f'no fitted model under {workdir} (expected <category>/model/)')
  if category:
    if category not in fitted:
      raise FileNotFoundError(f'no fitted model for category {category!r} in {workdir}; '
                              f'fitted: {", ".join(fitted)}')
    return category
  if len(fitted) > 1:
    raise ValueError(f'{workdir} holds several fitted categories ({", ".join(fitted)}): choose one '
                     'with --category')
  return fitted[0]


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] image with the mask tinted red and its border drawn: uint8 [H, W, 3].
  Only the masked pixels are computed (in float32; the rest is a copy)."""
  out = np.array(image, np.uint8)
  if mask.any():
    red = np.array([255.0, 0.0, 0.0], np.float32)
    tinted = 0.55 * image[mask].astype(np.float32) + 0.45 * red
    out[mask] = np.clip(tinted, 0, 255).astype(np.uint8)
    out[mask & ~_erode(mask)] = [255, 255, 0]
  return out


def _erode(mask: np.ndarray) -> np.ndarray:
  padded = np.pad(mask, 1, constant_values=False)
  h, w = mask.shape
  out = np.ones_like(mask)
  for dy in (0, 1, 2):
    for dx in (0, 1, 2):
      out &= padded[dy:dy + h, dx:dx + w]
  return out


class _Writes:
  """Calls on a thread pool with at most `limit` in flight (memory stays bounded when writing is
  slower than scoring); the first failure is re-raised in the caller's thread."""

  def __init__(self, pool: concurrent.futures.Executor, limit: int):
    self.pool, self.limit, self.in_flight = pool, limit, set()

  def submit(self, fn, *args) -> concurrent.futures.Future:
    self.check()
    while len(self.in_flight) >= self.limit:
      concurrent.futures.wait(self.in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
      self.check()
    future = self.pool.submit(fn, *args)
    self.in_flight.add(future)
    return future

  def check(self) -> None:
    done = {f for f in self.in_flight if f.done()}
    self.in_flight -= done
    for f in done:
      if f.exception() is not None:
        raise f.exception()

  def finish(self) -> None:
    concurrent.futures.wait(self.in_flight)
    self.check()

  def cancel(self) -> None:
    for f in self.in_flight:
      f.cancel()
    concurrent.futures.wait(self.in_flight)


def _save_png(path: pathlib.Path, array: np.ndarray) -> None:
  # zlib level 1: several times faster to encode than level 6, lossless all the same.
  fileio.atomic_save_png(path, array, level=1)


class Predictor:
  """A fitted category ready to inspect images: the model loaded, its arrays on the devices and
  its scorer compiled once; `run` can be called again and again (a service, a benchmark).

  The model's own saved config (the one it was fitted with) drives preprocessing and scoring.
  """

  def __init__(self, workdir: pathlib.Path, category: str):
    self.category = category
    workdir = pathlib.Path(workdir)
    fitted = model_lib.load(workdir / category / 'model')
    cfg = ml_collections.ConfigDict(fitted.meta['config'])
    self.stats = {k: float(v) for k, v in fitted.stats.items()}
    if 'image_threshold' not in self.stats:
      raise ValueError(f'the model in {workdir / category} has no fit-time thresholds (it was '
                       'fitted with data.holdout_fraction=0); refit with held-out images')
    self.variant = infer.parse_variant(fitted.meta.get('calibration_variant', 'baseline'))
    self.resize, self.crop = int(cfg.data.resize), int(cfg.data.crop)
    # Models fitted before data.resize_mode existed used the short side.
    self.mode = str(cfg.data.get('resize_mode', data_lib.LEGACY_RESIZE_MODE))
    with cfg.unlocked():
      # The fitting run's shared shape bucket (pipeline.run_bucket) only saved compiles across
      # its categories; one category scores with C_emb padded to its own bucket.
      if 'runtime' in cfg:
        cfg.runtime.min_train_images = 0
    extractor = infer.make_extractor(cfg)
    self.batch_size = extractor.batch_size
    self.runtime = infer.ModelRuntime(cfg, extractor, fitted, [self.variant])
    # Started once (a service calls `run` per request); the threads exit with the interpreter.
    # Loaders decode and resample the next files; writers map each scored image back to its
    # size and encode and write its mask and overlay (a 256 px overlay takes 3-5 ms with
    # `fileio.encode_png`, a 1024 px one 30-45 ms); both while the calling thread scores.
    workers = data_lib.default_workers()
    self.loader_pool = concurrent.futures.ThreadPoolExecutor(workers, 'pni-predict-loader')
    self.writer_pool = concurrent.futures.ThreadPoolExecutor(workers, 'pni-predict-writer')

  def _flush(self, pending: list[dict], out_dir: pathlib.Path, finished: list,
             writes: _Writes) -> None:
    if not pending:
      return
    images = np.stack([p['crop'] for p in pending])
    # At the smallest batch bucket; only what is used comes back to the host.
    out = self.runtime.score(images, keys=('maps', 'image'))[self.variant.name]
    for k, item in enumerate(pending):
      # The map back at the image's size, the mask and the PNGs run on the writer threads (numpy,
      # zlib and fsync release the GIL) while the next batch is decoded and scored.
      finished.append(writes.submit(self._finish, item, out['maps'][k], float(out['image'][k]),
                                    out_dir))
    pending.clear()

  def _finish(self, item: dict, amap_crop: np.ndarray, score: float,
              out_dir: pathlib.Path) -> dict:
    """One scored image: its map at the original size, the mask, the two PNGs -> its table row."""
    stats = self.stats
    h, w = item['orig'].shape[:2]
    amap = data_lib.unprocess_map(amap_crop, h, w, self.resize, self.crop, mode=self.mode)
    # The defect region of an image judged normal is empty: pixels above the pixel threshold
    # in a normal image are the expected false positives of the held-out calibration.
    mask = (amap >= stats['pixel_threshold']) & (score >= stats['image_threshold'])
    name = item['name']
    _save_png(out_dir / f'{name}_mask.png', mask.astype(np.uint8) * 255)
    _save_png(out_dir / f'{name}_overlay.png', overlay(item['orig'], mask))
    return dict(path=item['path'], score=score, threshold=stats['image_threshold'],
                defective=bool(score >= stats['image_threshold']),
                defect_fraction=float(mask.mean()), height=h, width=w,
                mask=f'{name}_mask.png', overlay=f'{name}_overlay.png', error='')

  def run(self, paths: list[str], out_dir: pathlib.Path, *, progress: bool = True,
          write_tables: bool = True) -> list[dict]:
    """Scores `paths`; writes masks, overlays and (with write_tables) the tables to `out_dir`.
    The files decode on the loader threads ahead of the batch being scored."""
    out_dir = pathlib.Path(out_dir)
    rows, pending, finished = [], [], []
    prog = Progress(f'[{self.category}] predict', len(paths), unit='img') if progress else None
    names = _unique_names(paths)
    writes = _Writes(self.writer_pool, 4 * self.batch_size)
    load = functools.partial(data_lib.load_crop, resize=self.resize, crop=self.crop,
                             mode=self.mode)
    loads = data_lib.threaded_map(load, paths, ahead=2 * self.batch_size, pool=self.loader_pool)
    try:
      for path, name, loaded in zip(paths, names, loads):
        try:
          image, crop = loaded.result()
        except (OSError, ValueError) as e:
          logging.error('skipping %s: %s', path, e)
          rows.append(dict(path=path, score=float('nan'),
                           threshold=self.stats['image_threshold'], defective=None,
                           defect_fraction=float('nan'), height=0, width=0, mask='',
                           overlay='', error=str(e)))
        else:
          pending.append(dict(path=path, name=name, orig=image, crop=crop))
          if len(pending) == self.batch_size:
            self._flush(pending, out_dir, finished, writes)
        if prog:
          prog.update(1)
      self._flush(pending, out_dir, finished, writes)
      writes.finish()
    except BaseException:
      writes.cancel()
      raise
    finally:
      loads.close()
    rows += [f.result() for f in finished]
    if prog:
      prog.close()
    order = {p: i for i, p in enumerate(paths)}
    rows.sort(key=lambda r: order[r['path']])
    if write_tables:
      _write_tables(out_dir, rows)
    return rows


def predict_images(workdir: pathlib.Path, category: str, paths: list[str],
                   out_dir: pathlib.Path) -> list[dict]:
  """Scores `paths` with the fitted model of `category`; writes masks, overlays and tables."""
  rows = Predictor(workdir, category).run(paths, out_dir)
  bad = [r for r in rows if r['error']]
  logging.info('[%s] %d images: %d defective, %d normal, %d unreadable -> %s', category,
               len(rows), sum(bool(r['defective']) for r in rows),
               sum(r['defective'] is False for r in rows), len(bad), out_dir)
  return rows


def _unique_names(paths: list[str]) -> list[str]:
  """File stems, made unique by prefixing parent folders where two stems collide."""
  stems = [pathlib.Path(p).stem for p in paths]
  out = []
  for p, stem in zip(paths, stems):
    out.append(f'{pathlib.Path(p).parent.name}_{stem}' if stems.count(stem) > 1 else stem)
  return out


COLUMNS = ('path', 'score', 'threshold', 'defective', 'defect_fraction', 'height', 'width', 'mask',
           'overlay', 'error')


def _write_tables(out_dir: pathlib.Path, rows: list[dict]) -> None:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator='\n')
  writer.writeheader()
  for r in rows:
    writer.writerow(r)
  fileio.atomic_write_text(out_dir / 'predictions.csv', buf.getvalue())
  fileio.atomic_write_json(out_dir / 'predictions.json', rows)


def run(workdir: str, images: str, category: str | None = None, out: str | None = None
        ) -> list[dict]:
  workdir = pathlib.Path(workdir)
  category = pick_category(workdir, category)
  paths = find_images(images)
  out_dir = pathlib.Path(out) if out else workdir / 'predictions' / category
  out_dir.mkdir(parents=True, exist_ok=True)
  return predict_images(workdir, category, paths, out_dir)
