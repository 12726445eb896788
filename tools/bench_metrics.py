"""Time and peak memory of `metrics.evaluate` on synthetic MVTec-size maps stored as a memmap.

  python tools/benchmark.py metrics [--num 100] [--size 480] [--chunk-pixels N] [--dir D] [--check]

Peak memory: the largest traced Python / numpy allocation (tracemalloc) during `evaluate`; the
memmap's file pages are not counted (the OS may evict them). Also prints the process's max RSS.
`--check` also computes pixel AUROC with scikit-learn on the whole flattened set (needs ~30 bytes
per pixel in memory) and prints the difference.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc

import numpy as np
from scipy import ndimage

from pni_jax import metrics


def make_set(directory: str, num: int, size: int, seed: int = 0):
  """Writes maps [num, size, size] float32 and masks [num, size, size] uint8 as .npy memmaps."""
  rng = np.random.default_rng(seed)
  maps = np.lib.format.open_memmap(os.path.join(directory, 'maps.npy'), 'w+', np.float32,
                                   (num, size, size))
  masks = np.lib.format.open_memmap(os.path.join(directory, 'masks.npy'), 'w+', np.uint8,
                                    (num, size, size))
  yy, xx = np.mgrid[:size, :size]
  labels = np.zeros(num, bool)
  for i in range(num):
    m = np.zeros((size, size), bool)
    if i % 2:  # every other image is defective: 1-4 elliptic regions of varied size
      labels[i] = True
      for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(2, size / 8, 2)
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), 4)
    maps[i] = noise * 8 + 1.5 * ndimage.gaussian_filter(m.astype(np.float32), 4)
    masks[i] = m
  maps.flush()
  masks.flush()
  image_scores = np.array([maps[i].max() for i in range(num)], np.float64)
  return image_scores, labels


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='benchmark.py metrics')
  parser.add_argument('--num', type=int, default=100)
  parser.add_argument('--size', type=int, default=480)
  parser.add_argument('--chunk-pixels', type=int, default=metrics.DEFAULT_CHUNK_PIXELS)
  parser.add_argument('--dir', default=None, help='where the memmaps go (default: a temp dir)')
  parser.add_argument('--check', action='store_true', help='compare pixel AUROC with sklearn')
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    t0 = time.perf_counter()
    image_scores, labels = make_set(tmp, args.num, args.size)
    print(f'data: {args.num} x {args.size} x {args.size} float32 memmap '
          f'({args.num * args.size ** 2 * 4 / 2 ** 20:.0f} MiB) written in '
          f'{time.perf_counter() - t0:.1f} s')
    maps = np.load(os.path.join(tmp, 'maps.npy'), mmap_mode='r')
    masks = np.load(os.path.join(tmp, 'masks.npy'), mmap_mode='r')

    tracemalloc.start()
    t0 = time.perf_counter()
    result = metrics.evaluate(image_scores, labels, maps, masks, chunk_pixels=args.chunk_pixels)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    census = metrics._census(maps, masks, args.chunk_pixels, count_regions=False)
    groups = metrics._plan_groups(census.anomalous + census.normal, args.chunk_pixels)
    print(f'evaluate: {elapsed:.2f} s, peak traced memory {peak / 2 ** 20:.1f} MiB '
          f'(chunk_pixels={args.chunk_pixels}, {len(groups)} resolve passes, '
          f'{sum(d for d, _, _ in groups)} dense), max RSS '
          f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10:.0f} MiB')
    for key, value in result.items():
      print(f'  {key:16s} {value:.6f}')
    if args.check:
      from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
      t0 = time.perf_counter()
      ref = skm.roc_auc_score(np.asarray(masks).ravel() != 0, np.asarray(maps).ravel())
      print(f'sklearn pixel AUROC {ref:.12f} in {time.perf_counter() - t0:.1f} s; '
            f'difference {abs(ref - result["pixel_auroc"]):.2e}')
  return 0


if __name__ == '__main__':
  import sys
  sys.exit(main(sys.argv[1:]))
