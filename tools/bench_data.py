"""Input pipeline throughput: images/s of the data sources on a generated fixture.

python tools/benchmark.py data [--num=300] [--size=480] [--format=png|jpg|bmp] [--reps=2]

Writes `--num` smooth random RGB images of `--size` px (MVTec layout, one category) to a
temporary folder (or `--root`), then times full passes of `make_dataset` + `iterate_numpy`
(decode, resize to data.resize, crop data.crop, batch, copy to numpy) for
  files        data.source='files': tf.io.read_file + in-graph decode + in-graph resampling
  tfds         data.source='tfds': the prepared TFDS records (preparation timed separately)
  numpy_fn     the previous design: the whole example (shared PIL decoder + numpy resampling)
               inside tf.numpy_function
  pil_fn       the previous code exactly: PIL decode + PIL's uint8 bilinear resize + crop inside
               tf.numpy_function (no longer our preprocessing; a speed reference only)
The first pass of each is a warm-up (tracing, file cache); the median of `--reps` passes counts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def _write_fixture(root: str, num: int, size: int, fmt: str) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  for i in range(num + 2):  # the last two: a small test split (the layout needs one)
    folder = os.path.join(root, 'parts', 'train' if i < num else 'test', 'good')
    os.makedirs(folder, exist_ok=True)
    coarse = rng.integers(0, 256, (size // 16, size // 16, 3), np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255)
    Image.fromarray(noisy.astype(np.uint8)).save(os.path.join(folder, f'{i:04d}.{fmt}'))


def _numpy_function_dataset(split, cfg, use_pil: bool):
  """The previous pipeline's structure: one tf.numpy_function per example."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from pni_jax.data import images  # pylint: disable=import-outside-toplevel

  resize, crop, mode = int(cfg.resize), int(cfg.crop), str(cfg.resize_mode)

  def load(index):
    image = images.load_image(split.paths[int(index)])
    if not use_pil:
      return images.preprocess(image, resize, crop, mode=mode)
    box = images.crop_box(image.shape[0], image.shape[1], resize, crop, mode)
    x = np.asarray(Image.fromarray(image).resize((box.resized_w, box.resized_h), Image.BILINEAR))
    x = x[box.crop_top:box.crop_top + crop, box.crop_left:box.crop_left + crop]
    return x.astype(np.float32) / np.float32(255.0)

  def to_example(index):
    x = tf.numpy_function(load, [index], tf.float32, stateful=False)
    x.set_shape((crop, crop, 3))
    return {'image': x, 'index': tf.cast(index, tf.int32)}

  ds = tf.data.Dataset.from_tensor_slices(np.arange(len(split), dtype=np.int64))
  ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(int(cfg.batch_size)).prefetch(2)


def _images_per_second(make, n: int, reps: int) -> float:
  from pni_jax import data  # pylint: disable=import-outside-toplevel

  times = []
  for _ in range(reps + 1):
    ds = make()
    t = time.perf_counter()
    count = sum(len(b['index']) for b in data.iterate_numpy(ds))
    times.append(time.perf_counter() - t)
    assert count == n, (count, n)
  return n / float(np.median(times[1:]))


def main(argv) -> int:
  ap = argparse.ArgumentParser(prog='benchmark.py data', description=__doc__)
  ap.add_argument('--num', type=int, default=300, help='images in the fixture')
  ap.add_argument('--size', type=int, default=480, help='image side in pixels')
  ap.add_argument('--format', default='png', choices=('png', 'jpg', 'bmp'))
  ap.add_argument('--resize', type=int, default=512)
  ap.add_argument('--crop', type=int, default=480)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--reps', type=int, default=2, help='timed passes per source (after a warm-up)')
  ap.add_argument('--root', default='', help='fixture folder (default: a temporary one)')
  args = ap.parse_args(argv)

  import ml_collections  # pylint: disable=import-outside-toplevel
  from pni_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from pni_jax import data  # pylint: disable=import-outside-toplevel

  tmp = None if args.root else tempfile.mkdtemp(prefix='bench_data_')
  root = args.root or tmp
  try:
    t = time.perf_counter()
    if not os.path.isdir(os.path.join(root, 'parts')):
      _write_fixture(root, args.num, args.size, args.format)
    print(f'fixture: {args.num} {args.format.upper()} images of {args.size} px in {root} '
          f'({time.perf_counter() - t:.1f} s); resize {args.resize} (square), crop {args.crop}, '
          f'batch {args.batch}; {os.cpu_count()} CPU cores')
    cfg = config_lib.base_config().data
    cfg.update(dict(name='mvtec', root=root, resize=args.resize, crop=args.crop,
                    batch_size=args.batch, resize_mode='square',
                    tfds_data_dir=os.path.join(root, 'tfds')))
    files_split = data.load_split(cfg, 'parts', 'train')
    tfds_cfg = ml_collections.ConfigDict(cfg.to_dict())
    tfds_cfg.source = 'tfds'
    t = time.perf_counter()
    tfds_split = data.load_split(tfds_cfg, 'parts', 'train')
    prepare_s = time.perf_counter() - t
    n = len(files_split)
    rows = [
        ('files', lambda: data.make_dataset(files_split, cfg, with_masks=False)),
        ('tfds', lambda: data.make_dataset(tfds_split, tfds_cfg, with_masks=False)),
        ('numpy_fn', lambda: _numpy_function_dataset(files_split, cfg, use_pil=False)),
        ('pil_fn', lambda: _numpy_function_dataset(files_split, cfg, use_pil=True)),
    ]
    results = {name: _images_per_second(make, n, args.reps) for name, make in rows}
    print(f'tfds preparation (once): {prepare_s:.1f} s ({n / prepare_s:.1f} images/s)')
    print('| source | images/s | vs numpy_fn |')
    print('|---|---|---|')
    for name, ips in results.items():
      print(f'| {name} | {ips:.1f} | {ips / results["numpy_fn"]:.2f}x |')
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  return 0
