"""Anomaly-detection metrics: image / pixel AUROC, AUPRO, F1-max, FPR / FNR.

Every metric is exact: each distinct score is a threshold (no threshold grid, no subsampling, no
quantisation). Ties count 1/2 in AUROC, as in `sklearn.metrics.roc_auc_score`.

Pixel-level metrics stream over the anomaly maps, which may be an `np.memmap` far larger than
memory. They share one machinery, "sorted counts":

1. Census pass. Each float32 score maps to an order-preserving uint32 key. One pass over image
   chunks counts normal / anomalous pixels per coarse bucket (the key's top 16 bits, 65,536
   buckets, `np.bincount`), counts the ground-truth regions and records the score range.
2. Resolve passes. Buckets are visited from the highest score down, packed into groups of at most
   `chunk_pixels` pixels. A group is resolved exactly by one more pass that gathers the keys of its
   pixels (with the class and an index into the region weights) and sorts them. A bucket holding
   more than `chunk_pixels` pixels on its own is resolved by a dense 65,536-bin count of the key's
   low 16 bits (one bin per distinct float32).
   Each resolved group yields (distinct score, #anomalous, #normal, region-overlap weight) in
   descending score order, which one sweep folds into every metric: AUROC, F1-max, the PRO curve
   integral, a decimated PR curve and score histograms.

Memory bound: about 45 bytes x max(chunk_pixels, H * W) at the peak (measured with tracemalloc:
the gathered group as uint64 words, its sort and the per-score outputs; one image chunk of float32
scores read from the memmap and its masks), plus fixed 65,536-bucket tables (~2 MB). It depends on
`chunk_pixels` and the image size, never on N; the default 2**21 peaks near 90 MiB. Each resolve
pass reads the whole set once; there are about N * H * W / chunk_pixels of them, fewer than
3 * N * H * W / chunk_pixels + 2 in the worst case (a group and the group or bucket after it
together exceed `chunk_pixels`; a dense bucket alone does).

Scores are compared in float32 (anomaly maps are float32 throughout pni-jax); float64 maps are cast,
with a logged warning. Image-level metrics work in float64 on in-memory arrays.

AUPRO follows the MVTec AD evaluation code: regions are the 8-connected components of each
ground-truth mask (`scipy.ndimage.label` with a 3 x 3 structure, as that code does, so a defect
drawn with diagonal strokes is one region, not several); for each threshold t (predicted anomalous:
score >= t), PRO(t) is the mean over all regions of the fraction of the region predicted anomalous
and FPR(t) the fraction of all normal pixels predicted anomalous; the curve starts at (0, 0), is
integrated with the trapezoid rule up to FPR = max_fpr (interpolated linearly at exactly max_fpr),
and divided by max_fpr.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Any, Iterator, NamedTuple

from absl import logging
import numpy as np
from scipy import ndimage

DEFAULT_CHUNK_PIXELS = 1 << 21   # pixels per image chunk and per resolved group (~90 MiB peak)
DEFAULT_PR_POINTS = 1000
DEFAULT_HIST_BINS = 100

_HIGH_BITS = 16
_NUM_BUCKETS = 1 << _HIGH_BITS
_LOW_MASK = np.uint32(_NUM_BUCKETS - 1)
_SIGN = np.uint32(0x80000000)

METRIC_KEYS = ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_f1_max', 'image_f1_max', 'fpr', 'fnr',
               'image_threshold', 'pixel_threshold')


class PixelStats(NamedTuple):
  """Everything one sorted sweep over the pixels yields (see `pixel_stats`)."""
  auroc: float              # pixel AUROC (nan if a class is missing)
  aupro: float              # normalised area under the PRO curve up to max_fpr (nan if undefined)
  f1_max: float             # best F1 over all thresholds (nan if no anomalous pixel)
  threshold: float          # the F1-optimal threshold (largest one on ties)
  precision: np.ndarray     # [K] float64 decimated PR curve, K <= pr_points, descending threshold
  recall: np.ndarray        # [K] float64
  pr_thresholds: np.ndarray  # [K] float64
  hist_edges: np.ndarray    # [B + 1] float64
  hist_normal: np.ndarray   # [B] int64 counts of normal pixels per bin
  hist_anomalous: np.ndarray  # [B] int64 counts of anomalous pixels per bin
  num_anomalous: int
  num_normal: int
  num_regions: int


# ----------------------------------------------------------------------------- keys


def float_keys(x: np.ndarray) -> np.ndarray:
  """Order-preserving keys: x [...] float32 -> [...] uint32, a < b iff key(a) < key(b).

  -0.0 and +0.0 share a key (they compare equal). NaN must be rejected beforehand.
  """
  x = np.asarray(x, np.float32)
  keys = (x.reshape(-1) + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 == +0.0
  flip = (keys.view(np.int32) >> 31).view(np.uint32)  # all ones for negative scores, else 0
  flip |= _SIGN                                # negative: flip all bits; positive: the sign bit
  keys ^= flip
  return keys.reshape(x.shape)


def key_values(keys: np.ndarray) -> np.ndarray:
  """Inverse of `float_keys`: [...] uint32 -> [...] float32."""
  keys = np.asarray(keys, np.uint32)
  bits = keys.reshape(-1).copy()
  flip = (bits.view(np.int32) >> 31).view(np.uint32)  # all ones for keys of scores >= 0
  np.invert(flip, out=flip)
  flip |= _SIGN                                # scores >= 0: clear the sign bit; else flip all
  bits ^= flip
  return bits.view(np.float32).reshape(keys.shape)


# ----------------------------------------------------------------------------- inputs


def _binary_labels(labels: Any, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.dtype != bool:
    if labels.size and not np.isin(labels, (0, 1)).all():
      bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5]
      raise ValueError(f'{name} must be binary (0/1 or bool); found values {bad.tolist()}')
    labels = labels.astype(bool)
  return labels


def _image_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64)
  labels = _binary_labels(labels, 'labels')
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(f'scores and labels must both be [N]; got {scores.shape} and {labels.shape}')
  if scores.size == 0:
    raise ValueError('scores is empty')
  if np.isnan(scores).any():
    raise ValueError(f'scores contain {int(np.isnan(scores).sum())} NaN value(s)')
  return scores, labels


def _check_pixel_inputs(maps: Any, masks: Any) -> tuple[int, int, int]:
  for name, a in (('maps', maps), ('masks', masks)):
    if not hasattr(a, 'shape') or len(a.shape) != 3:
      raise ValueError(f'{name} must be an array of shape [N, H, W]; got '
                       f'{getattr(a, "shape", type(a).__name__)}')
  if tuple(maps.shape) != tuple(masks.shape):
    raise ValueError(f'maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape')
  n, h, w = maps.shape
  if n * h * w == 0:
    raise ValueError(f'maps is empty: shape {tuple(maps.shape)}')
  if not np.issubdtype(maps.dtype, np.floating) and not np.issubdtype(maps.dtype, np.integer):
    raise ValueError(f'maps must be real-valued; got dtype {maps.dtype}')
  if np.dtype(maps.dtype).itemsize > 4 or (np.issubdtype(maps.dtype, np.integer)
                                           and np.dtype(maps.dtype).itemsize > 2):
    logging.warning('maps have dtype %s: scores are compared at float32 precision', maps.dtype)
  return n, h, w


def _chunks(maps: Any, masks: Any, chunk_pixels: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (scores [n, H, W] float32, gt [n, H, W] bool), n = max(1, chunk_pixels // (H * W))."""
  num, h, w = maps.shape
  step = max(1, int(chunk_pixels) // (h * w))
  for start in range(0, num, step):
    stop = min(num, start + step)
    yield np.asarray(maps[start:stop], dtype=np.float32), np.asarray(masks[start:stop]) != 0


def _label_regions(gt: np.ndarray) -> tuple[np.ndarray, int]:
  """8-connected components of one mask: gt [h, w] bool -> (labels [h, w] int32, count)."""
  return ndimage.label(gt, structure=np.ones((3, 3), dtype=bool))


def _bounding_box(gt: np.ndarray) -> tuple[slice, slice]:
  """The smallest (rows, cols) window of gt [H, W] bool holding every True pixel (non-empty gt)."""
  rows = np.flatnonzero(gt.any(axis=1))
  cols = np.flatnonzero(gt.any(axis=0))
  return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _images_with(pixels: np.ndarray) -> np.ndarray:
  """pixels [n, H, W] bool -> indices of the images holding at least one True pixel."""
  return np.flatnonzero(pixels.reshape(len(pixels), -1).any(axis=1))


def _count_regions(gt: np.ndarray) -> int:
  """Number of ground-truth regions in gt [n, H, W] bool (labelled image by image)."""
  return sum(_label_regions(gt[i][_bounding_box(gt[i])])[1] for i in _images_with(gt))


def _region_weights(gt: np.ndarray, picked: np.ndarray) -> np.ndarray:
  """1 / (size of its region) for every picked pixel, in C order: [picked.sum()] float64.

  gt: [n, H, W] bool ground truth; picked: [n, H, W] bool, a subset of gt. Regions are labelled
  within the bounding box of each image's ground truth only, which holds them all.
  """
  parts = []
  for i in _images_with(picked):
    box = _bounding_box(gt[i])
    labels, count = _label_regions(gt[i][box])
    inv_size = np.zeros(count + 1, np.float64)
    inv_size[1:] = 1.0 / np.bincount(labels.ravel(), minlength=count + 1)[1:]
    parts.append(inv_size[labels[picked[i][box]]])
  return np.concatenate(parts) if parts else np.zeros(0, np.float64)


# ----------------------------------------------------------------------------- sorted counts


# One resolved block of distinct scores, highest first: (values [K] float32, anomalous counts [K],
# normal counts [K], summed per-region overlap weights [K] float64).
_Block = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class _Census(NamedTuple):
  anomalous: np.ndarray  # [65536] int64 anomalous pixels per bucket
  normal: np.ndarray     # [65536] int64 normal pixels per bucket
  num_regions: int
  lo: float              # smallest finite score (nan if none)
  hi: float              # largest finite score


def _census(maps: Any, masks: Any, chunk_pixels: int, count_regions: bool) -> _Census:
  anomalous = np.zeros(_NUM_BUCKETS, np.int64)
  normal = np.zeros(_NUM_BUCKETS, np.int64)
  num_regions, lo, hi = 0, math.inf, -math.inf
  for scores, gt in _chunks(maps, masks, chunk_pixels):
    nan = np.isnan(scores)
    if nan.any():
      raise ValueError(f'anomaly maps contain {int(nan.sum())} NaN value(s)')
    finite = np.isfinite(scores)
    if finite.all():
      lo, hi = min(lo, float(scores.min())), max(hi, float(scores.max()))
    elif finite.any():
      lo, hi = min(lo, float(scores[finite].min())), max(hi, float(scores[finite].max()))
    high = (float_keys(scores) >> _HIGH_BITS).astype(np.uint16)
    anomalous += np.bincount(high[gt], minlength=_NUM_BUCKETS)
    normal += np.bincount(high[~gt], minlength=_NUM_BUCKETS)
    if count_regions:
      num_regions += _count_regions(gt)
  if lo > hi:
    lo = hi = math.nan
  return _Census(anomalous, normal, num_regions, lo, hi)


def _plan_groups(counts: np.ndarray, capacity: int) -> list[tuple[bool, int, int]]:
  """Packs non-empty buckets, highest first, into groups: [(dense, bucket_lo, bucket_hi)].

  Consecutive buckets are packed while their total stays <= capacity (gathered and sorted); a
  bucket holding more than capacity pixels alone is a dense group (bincount of the low key bits).
  """
  groups = []
  start = stop = None
  total = 0
  for b in np.flatnonzero(counts)[::-1].tolist():
    c = int(counts[b])
    if c > capacity or total + c > capacity:
      if start is not None:
        groups.append((False, stop, start))
      start = stop = None
      total = 0
    if c > capacity:
      groups.append((True, b, b))
      continue
    start = b if start is None else start
    stop = b
    total += c
  if start is not None:
    groups.append((False, stop, start))
  return groups


def _bucket_range(lo: int, hi: int) -> tuple[float, float, bool]:
  """Buckets lo..hi as a score interval: (low, high, high_inclusive), so that a score s lies in
  them iff low <= s < high (or s <= high). Compares floats directly: no keys for unselected pixels.
  """
  low = float(key_values(np.uint32(lo << _HIGH_BITS)))
  if math.isnan(low):      # the -inf bucket starts with NaN bit patterns
    low = -math.inf
  if hi + 1 >= _NUM_BUCKETS:
    return low, math.inf, True
  high = float(key_values(np.uint32((hi + 1) << _HIGH_BITS)))
  if math.isnan(high):     # the bucket after +inf holds only NaN bit patterns
    return low, math.inf, True
  return low, high, False


def _select(scores: np.ndarray, interval: tuple[float, float, bool]) -> np.ndarray:
  low, high, inclusive = interval
  sel = scores >= np.float32(low)
  sel &= (scores <= np.float32(high)) if inclusive else (scores < np.float32(high))
  return sel


def _resolve_gathered(maps, masks, interval, num_normal: int, num_anomalous: int,
                      chunk_pixels: int, need_pro: bool) -> _Block:
  """Exact counts of a group of buckets (holding num_normal + num_anomalous pixels, known from the
  census) by gathering and sorting its scores. Returns ascending distinct scores.

  One sort of uint64 words (key << 32 | anomalous << 31 | index among anomalous pixels) gives the
  distinct scores, both counts and, through the index, the order of the region weights.
  """
  words = np.empty(num_normal + num_anomalous, np.uint64)
  weights = np.empty(num_anomalous if need_pro else 0, np.float64)
  at_normal, at_anomalous = 0, num_normal
  shift = np.uint64(32)
  for scores, gt in _chunks(maps, masks, chunk_pixels):
    sel = _select(scores, interval)
    picked = sel & gt
    sel ^= picked            # now: selected normal pixels
    normal = float_keys(scores[sel])
    anomalous = float_keys(scores[picked])
    if at_normal + len(normal) > num_normal or at_anomalous + len(anomalous) > len(words):
      raise RuntimeError('anomaly maps changed while being evaluated')
    block = words[at_normal:at_normal + len(normal)]
    block[...] = normal
    block <<= shift
    block = words[at_anomalous:at_anomalous + len(anomalous)]
    start = at_anomalous - num_normal
    block[...] = np.arange(start, start + len(anomalous), dtype=np.uint64)
    block |= (anomalous.astype(np.uint64) << shift) | np.uint64(1 << 31)
    if need_pro:
      weights[start:start + len(anomalous)] = _region_weights(gt, picked)
    at_normal += len(normal)
    at_anomalous += len(anomalous)
  if at_normal != num_normal or at_anomalous != len(words):
    raise RuntimeError('anomaly maps changed while being evaluated')
  words.sort()
  keys = (words >> shift).astype(np.uint32)
  first = np.empty(len(keys), bool)
  first[0] = True
  np.not_equal(keys[1:], keys[:-1], out=first[1:])
  values = key_values(keys[first])
  del keys
  run = np.cumsum(first, dtype=np.intp)
  run -= 1                                    # index of each word's distinct score
  del first
  is_anomalous = (words & np.uint64(1 << 31)) != 0
  anomalous_counts = np.bincount(run[is_anomalous], minlength=len(values))
  if need_pro:
    index = (words[is_anomalous] & np.uint64((1 << 31) - 1)).astype(np.int64)
    pro = np.bincount(run[is_anomalous], weights=weights[index], minlength=len(values))
    del index, weights
  else:
    pro = np.zeros(len(values), np.float64)
  del words, is_anomalous
  normal_counts = np.bincount(run, minlength=len(values))
  normal_counts -= anomalous_counts
  return values, anomalous_counts, normal_counts, pro


def _resolve_dense(maps, masks, bucket: int, chunk_pixels: int, need_pro: bool) -> _Block:
  """Exact counts of one crowded bucket: one bin per low-16-bit key pattern (ascending)."""
  anomalous = np.zeros(_NUM_BUCKETS, np.int64)
  normal = np.zeros(_NUM_BUCKETS, np.int64)
  pro = np.zeros(_NUM_BUCKETS, np.float64)
  interval = _bucket_range(bucket, bucket)
  for scores, gt in _chunks(maps, masks, chunk_pixels):
    sel = _select(scores, interval)
    picked = sel & gt
    sel ^= picked
    normal += np.bincount(float_keys(scores[sel]) & _LOW_MASK, minlength=_NUM_BUCKETS)
    low = float_keys(scores[picked]) & _LOW_MASK
    anomalous += np.bincount(low, minlength=_NUM_BUCKETS)
    if need_pro and len(low):
      pro += np.bincount(low, weights=_region_weights(gt, picked), minlength=_NUM_BUCKETS)
  present = np.flatnonzero(anomalous + normal)
  keys = (np.uint32(bucket) << np.uint32(_HIGH_BITS)) | present.astype(np.uint32)
  return key_values(keys), anomalous[present], normal[present], pro[present]


def _pixel_blocks(maps, masks, census: _Census, chunk_pixels: int, need_pro: bool,
                  block_size: int = 1 << 16) -> Iterator[_Block]:
  """Yields (scores [k] float64, anomalous [k] int64, normal [k] int64, pro weight [k] float64) for
  every distinct score, in descending score order, k <= block_size per block."""
  capacity = max(1, int(chunk_pixels))
  for dense, lo, hi in _plan_groups(census.anomalous + census.normal, capacity):
    if dense:
      block = _resolve_dense(maps, masks, lo, chunk_pixels, need_pro)
    else:
      block = _resolve_gathered(maps, masks, _bucket_range(lo, hi),
                                int(census.normal[lo:hi + 1].sum()),
                                int(census.anomalous[lo:hi + 1].sum()), chunk_pixels, need_pro)
    block = tuple(a[::-1] for a in block)
    for start in range(0, len(block[0]), block_size):
      # Copies, so that no view keeps the whole group alive while the next one is gathered.
      yield tuple(np.array(a[start:start + block_size], dtype) for a, dtype in
                  zip(block, (np.float64, np.int64, np.int64, np.float64)))
    del block


def _image_block(scores: np.ndarray, labels: np.ndarray) -> _Block:
  uniq, inverse = np.unique(scores, return_inverse=True)
  anomalous = np.bincount(inverse[labels], minlength=len(uniq))
  normal = np.bincount(inverse, minlength=len(uniq)) - anomalous
  return uniq[::-1], anomalous[::-1], normal[::-1], np.zeros(len(uniq))


# ----------------------------------------------------------------------------- the sweep


class _SweepResult(NamedTuple):
  auroc: float
  f1_max: float
  threshold: float
  aupro: float
  precision: np.ndarray
  recall: np.ndarray
  pr_thresholds: np.ndarray
  hist_normal: np.ndarray
  hist_anomalous: np.ndarray


def _sweep(blocks: Iterator[_Block], num_pos: int, num_neg: int, num_regions: int,
           max_fpr: float | None, pr_points: int, hist_edges: np.ndarray | None) -> _SweepResult:
  """Folds descending (score, #anomalous, #normal, pro weight) blocks into every metric."""
  tp = fp = 0                 # pixels with score >= the current threshold
  pro_sum = 0.0               # sum of 1 / region size over those anomalous pixels
  auc2 = 0                    # 2 * sum over positives of (#negatives below + 1/2 #tied)
  best_f1, best_threshold = -1.0, math.nan
  do_pro = max_fpr is not None and num_regions > 0 and num_neg > 0
  area, prev_x, prev_y = 0.0, 0.0, 0.0
  do_pr = pr_points > 0 and num_pos > 0
  pr_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
  last_level, last_point = -1, None
  num_bins = 0 if hist_edges is None else len(hist_edges) - 1
  hist_normal = np.zeros(num_bins, np.int64)
  hist_anomalous = np.zeros(num_bins, np.int64)

  for values, pos, neg, weight in blocks:
    ctp = tp + np.cumsum(pos)
    cfp = fp + np.cumsum(neg)
    auc2 += int(np.sum(pos * (2 * (num_neg - cfp) + neg)))
    if num_pos > 0:
      f1 = 2.0 * ctp / (ctp + cfp + num_pos)
      i = int(np.argmax(f1))
      if f1[i] > best_f1:
        best_f1, best_threshold = float(f1[i]), float(values[i])
    if do_pro:
      cpro = pro_sum + np.cumsum(weight)
      x = cfp / num_neg
      y = np.minimum(cpro / num_regions, 1.0)
      xs = np.concatenate([[prev_x], x])
      ys = np.concatenate([[prev_y], y])
      beyond = np.flatnonzero(x > max_fpr)
      end = int(beyond[0]) if beyond.size else len(x)
      area += float(np.sum((xs[1:end + 1] - xs[:end]) * (ys[1:end + 1] + ys[:end]))) / 2.0
      if beyond.size:
        x0, y0, x1, y1 = xs[end], ys[end], xs[end + 1], ys[end + 1]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += (max_fpr - x0) * (y0 + y_cut) / 2.0
        do_pro = False
      else:
        prev_x, prev_y = float(x[-1]), float(y[-1])
      pro_sum = float(cpro[-1])
    if do_pr:
      recall = ctp / num_pos
      precision = ctp / (ctp + cfp)
      level = np.floor(recall * (pr_points - 2)).astype(np.int64)
      keep = np.flatnonzero(level > np.concatenate([[last_level], level[:-1]]))
      pr_parts.append((precision[keep], recall[keep], values[keep]))
      last_level = int(level[-1])
      last_point = (precision[-1:], recall[-1:], values[-1:])
      if keep.size and keep[-1] == len(values) - 1:
        last_point = None
    if num_bins:
      idx = np.searchsorted(hist_edges, values, side='right') - 1
      idx[values == hist_edges[-1]] = num_bins - 1
      inside = (idx >= 0) & (idx < num_bins)
      hist_normal += np.bincount(idx[inside], weights=neg[inside],
                                 minlength=num_bins).astype(np.int64)
      hist_anomalous += np.bincount(idx[inside], weights=pos[inside],
                                    minlength=num_bins).astype(np.int64)
    tp, fp = int(ctp[-1]), int(cfp[-1])

  if last_point is not None:
    pr_parts.append(last_point)
  if pr_parts:
    precision, recall, pr_thresholds = (np.concatenate(p) for p in zip(*pr_parts))
  else:
    precision = recall = pr_thresholds = np.zeros(0)
  auroc = auc2 / (2 * num_pos * num_neg) if num_pos and num_neg else math.nan
  has_pro = max_fpr is not None and num_regions > 0 and num_neg > 0
  return _SweepResult(
      auroc=float(auroc),
      f1_max=best_f1 if num_pos else math.nan,
      threshold=best_threshold if num_pos else math.nan,
      aupro=area / max_fpr if has_pro else math.nan,
      precision=precision, recall=recall, pr_thresholds=pr_thresholds,
      hist_normal=hist_normal, hist_anomalous=hist_anomalous)


def _check_max_fpr(max_fpr: float) -> float:
  max_fpr = float(max_fpr)
  if not 0.0 < max_fpr <= 1.0:
    raise ValueError(f'max_fpr must be in (0, 1]; got {max_fpr}')
  return max_fpr


def _hist_edges(lo: float, hi: float, bins: int, value_range) -> np.ndarray:
  if value_range is not None:
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
      raise ValueError(f'value_range must be (low, high) with low < high; got {value_range}')
  elif math.isnan(lo):
    lo, hi = 0.0, 1.0
  elif lo == hi:
    lo, hi = lo - 0.5, hi + 0.5
  return np.linspace(lo, hi, int(bins) + 1)


# ----------------------------------------------------------------------------- pixel level


def pixel_stats(maps: Any, masks: Any, *, max_fpr: float | None = 0.3,
                pr_points: int = DEFAULT_PR_POINTS, hist_bins: int = DEFAULT_HIST_BINS,
                hist_range: tuple[float, float] | None = None,
                chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> PixelStats:
  """All pixel metrics and curve data in one bounded, exact sweep.

  Args:
    maps: [N, H, W] anomaly scores (float32 preferred; np.ndarray or np.memmap, read in chunks).
    masks: [N, H, W] ground truth, bool / uint8 (non-zero = anomalous).
    max_fpr: AUPRO integration limit in (0, 1]; None skips AUPRO (and region labelling).
    pr_points: at most this many PR-curve points, decimated from the exact curve at evenly spaced
      recall levels (the first and last points of the exact curve are kept); 0 = none.
    hist_bins: fixed bins of the score histograms; 0 = none.
    hist_range: (low, high) of the histogram bins; default: the finite score range. Scores outside
      are not counted.
    chunk_pixels: memory knob (see the module docstring): pixels per image chunk and per group.
  """
  num, h, w = _check_pixel_inputs(maps, masks)
  if max_fpr is not None:
    max_fpr = _check_max_fpr(max_fpr)
  if not 1 <= int(chunk_pixels) < 2**31:
    raise ValueError(f'chunk_pixels must be in [1, 2**31); got {chunk_pixels}')
  if int(pr_points) == 1 or int(pr_points) < 0:
    raise ValueError(f'pr_points must be 0 (no curve) or >= 2; got {pr_points}')
  need_pro = max_fpr is not None
  census = _census(maps, masks, chunk_pixels, count_regions=need_pro)
  num_pos, num_neg = int(census.anomalous.sum()), int(census.normal.sum())
  if num_pos == 0:
    logging.warning('no anomalous pixel among %d x %d x %d: pixel AUROC, AUPRO and pixel F1 are '
                    'nan', num, h, w)
  if num_neg == 0:
    logging.warning('no normal pixel among %d x %d x %d: pixel AUROC and AUPRO are nan', num, h, w)
  edges = _hist_edges(census.lo, census.hi, hist_bins, hist_range) if hist_bins else None
  blocks = _pixel_blocks(maps, masks, census, chunk_pixels, need_pro)
  res = _sweep(blocks, num_pos, num_neg, census.num_regions, max_fpr, pr_points, edges)
  return PixelStats(
      auroc=res.auroc, aupro=res.aupro, f1_max=res.f1_max, threshold=res.threshold,
      precision=res.precision, recall=res.recall, pr_thresholds=res.pr_thresholds,
      hist_edges=edges if edges is not None else np.zeros(0),
      hist_normal=res.hist_normal, hist_anomalous=res.hist_anomalous,
      num_anomalous=num_pos, num_normal=num_neg, num_regions=census.num_regions)


def pixel_auroc(maps: Any, masks: Any, chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> float:
  """Exact pixel AUROC of maps [N, H, W] against masks [N, H, W] (bounded memory, see module)."""
  return pixel_stats(maps, masks, max_fpr=None, pr_points=0, hist_bins=0,
                     chunk_pixels=chunk_pixels).auroc


def aupro(maps: Any, masks: Any, max_fpr: float = 0.3,
          chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> float:
  """Exact normalised area under the PRO curve up to FPR = max_fpr (see the module docstring)."""
  return pixel_stats(maps, masks, max_fpr=max_fpr, pr_points=0, hist_bins=0,
                     chunk_pixels=chunk_pixels).aupro


def pixel_f1_max(maps: Any, masks: Any,
                 chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> tuple[float, float]:
  """(best pixel F1, its threshold) over every distinct score; predicted anomalous: >= threshold."""
  stats = pixel_stats(maps, masks, max_fpr=None, pr_points=0, hist_bins=0,
                      chunk_pixels=chunk_pixels)
  return stats.f1_max, stats.threshold


def pixel_pr_curve(maps: Any, masks: Any, max_points: int = DEFAULT_PR_POINTS,
                   chunk_pixels: int = DEFAULT_CHUNK_PIXELS
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(precision [K], recall [K], thresholds [K]) float64, K <= max_points, decimated from the exact
  pixel PR curve (descending thresholds; for plotting)."""
  if int(max_points) < 2:
    raise ValueError(f'max_points must be >= 2; got {max_points}')
  stats = pixel_stats(maps, masks, max_fpr=None, pr_points=max_points, hist_bins=0,
                      chunk_pixels=chunk_pixels)
  return stats.precision, stats.recall, stats.pr_thresholds


def pixel_score_histograms(maps: Any, masks: Any, bins: int = DEFAULT_HIST_BINS,
                           value_range: tuple[float, float] | None = None,
                           chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> dict[str, np.ndarray]:
  """{'edges': [bins + 1] float64, 'normal': [bins] int64, 'anomalous': [bins] int64} pixel counts
  per fixed bin (default range: the finite score range), for the report's histogram figure."""
  if int(bins) < 1:
    raise ValueError(f'bins must be >= 1; got {bins}')
  stats = pixel_stats(maps, masks, max_fpr=None, pr_points=0, hist_bins=bins,
                      hist_range=value_range, chunk_pixels=chunk_pixels)
  return {'edges': stats.hist_edges, 'normal': stats.hist_normal,
          'anomalous': stats.hist_anomalous}


# ----------------------------------------------------------------------------- image level


def auroc(scores: Any, labels: Any) -> float:
  """Exact AUROC of scores [N] against binary labels [N] (ties count 1/2); nan if one class."""
  scores, labels = _image_inputs(scores, labels)
  num_pos = int(labels.sum())
  num_neg = len(labels) - num_pos
  if not num_pos or not num_neg:
    logging.warning('AUROC undefined: %d positive and %d negative samples', num_pos, num_neg)
  return _sweep(iter([_image_block(scores, labels)]), num_pos, num_neg, 0, None, 0, None).auroc


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
  """(best F1, threshold) over every distinct score, predicted positive: score >= threshold.

  On ties the largest threshold wins. (nan, nan) without positives.
  """
  scores, labels = _image_inputs(scores, labels)
  num_pos = int(labels.sum())
  if not num_pos:
    logging.warning('F1 undefined: no positive sample among %d', len(labels))
  res = _sweep(iter([_image_block(scores, labels)]), num_pos, len(labels) - num_pos, 0, None, 0,
               None)
  return res.f1_max, res.threshold


def fpr_fnr(scores: Any, labels: Any, threshold: float) -> tuple[float, float]:
  """(false-positive rate, false-negative rate) with predicted positive: score >= threshold.

  Each is nan when its class is absent (or the threshold is nan).
  """
  scores, labels = _image_inputs(scores, labels)
  if math.isnan(threshold):
    return math.nan, math.nan
  pred = scores >= threshold
  num_pos = int(labels.sum())
  num_neg = len(labels) - num_pos
  fpr = int((pred & ~labels).sum()) / num_neg if num_neg else math.nan
  fnr = int((~pred & labels).sum()) / num_pos if num_pos else math.nan
  return fpr, fnr


# ----------------------------------------------------------------------------- all together


def evaluate_with_curves(image_scores: Any, labels: Any, maps: Any, masks: Any, *,
                         max_fpr: float = 0.3, pr_points: int = DEFAULT_PR_POINTS,
                         hist_bins: int = DEFAULT_HIST_BINS,
                         chunk_pixels: int = DEFAULT_CHUNK_PIXELS
                         ) -> tuple[dict[str, float], dict[str, Any]]:
  """`evaluate` plus the curve data for the report, from the same sweep.

  Returns:
    (metrics, curves): metrics as `evaluate`; curves = {'pr': {'precision', 'recall',
    'thresholds'} ([K] float64, K <= pr_points, descending thresholds), 'hist': {'edges' [B + 1],
    'normal' [B], 'anomalous' [B]}} (pixel counts per fixed score bin).
  """
  image_scores, labels = _image_inputs(image_scores, labels)
  if len(image_scores) != maps.shape[0]:
    raise ValueError(f'{len(image_scores)} image scores but {maps.shape[0]} anomaly maps')
  stats = pixel_stats(maps, masks, max_fpr=max_fpr, pr_points=pr_points, hist_bins=hist_bins,
                      chunk_pixels=chunk_pixels)
  image_f1, image_threshold = f1_max(image_scores, labels)
  fpr, fnr = fpr_fnr(image_scores, labels, image_threshold)
  metrics = {
      'image_auroc': auroc(image_scores, labels),
      'pixel_auroc': stats.auroc,
      'aupro': stats.aupro,
      'pixel_f1_max': stats.f1_max,
      'image_f1_max': image_f1,
      'fpr': fpr,
      'fnr': fnr,
      'image_threshold': image_threshold,
      'pixel_threshold': stats.threshold,
  }
  curves = {
      'pr': {'precision': stats.precision, 'recall': stats.recall,
             'thresholds': stats.pr_thresholds},
      'hist': {'edges': stats.hist_edges, 'normal': stats.hist_normal,
               'anomalous': stats.hist_anomalous},
  }
  return {k: float(v) for k, v in metrics.items()}, curves


def evaluate(image_scores: Any, labels: Any, maps: Any, masks: Any, *, max_fpr: float = 0.3,
             chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> dict[str, float]:
  """Every metric of a category.

  Args:
    image_scores: [N] float image anomaly scores.
    labels: [N] binary image labels (1 = anomalous).
    maps: [N, H, W] float32 anomaly maps (np.ndarray or np.memmap).
    masks: [N, H, W] bool / uint8 ground truth.
    max_fpr: AUPRO integration limit.
    chunk_pixels: memory knob of the pixel metrics (module docstring).

  Returns:
    {image_auroc, pixel_auroc, aupro, pixel_f1_max, image_f1_max, fpr, fnr, image_threshold,
    pixel_threshold}: floats; fractions in [0, 1] except the thresholds (scores); fpr / fnr at the
    F1-optimal image threshold. Metrics a missing class makes undefined are nan (logged).
  """
  metrics, _ = evaluate_with_curves(image_scores, labels, maps, masks, max_fpr=max_fpr,
                                    pr_points=0, hist_bins=0, chunk_pixels=chunk_pixels)
  return metrics


# ----------------------------------------------------------------------------- grids of maps
#
# A hyper-parameter sweep scores the same test set G times. The ground truth is the same for
# every grid point, so the anomalous pixels are one fixed set (usually a few percent of all
# pixels). For each point the exact metrics follow from
#   a  = the anomalous scores sorted ascending (with each pixel's 1 / region size along),
#   lt = for each a_i, the number of normal pixels scoring < a_i, le = ... <= a_i,
# i.e. one sort of the normal scores plus a binary search of the few anomalous ones:
#   AUROC  = sum_i (lt_i + (le_i - lt_i) / 2) / (A N)                 (ties count 1/2)
#   F1     at each anomalous score t (the optimum is always at one): TP = #anomalous >= t,
#          FP = N - lt
#   AUPRO  the PRO curve is flat between distinct anomalous scores (only FPR moves there) and a
#          straight ramp across the normal pixels tied with one, so its integral up to max_fpr
#          has a closed form per distinct anomalous score.
# `grid_metrics` does this in numpy for a chunk of G points at once (rows sorted in parallel
# threads, vectorised counts over [G, A]): no Python per pixel; memory ~ 8 bytes x G x pixels per
# chunk beyond the maps. Results equal `evaluate` (same definitions, float64) to rounding.


class GroundTruth(NamedTuple):
  """The fixed ground truth of a test set, prepared once for `grid_metrics`.

  anomalous: [N, H, W] bool pixel masks; weights: [A] float64, 1 / (size of its region) of every
  anomalous pixel in C order; num_regions: R; labels: [N] bool image labels.
  """
  anomalous: np.ndarray
  weights: np.ndarray
  num_regions: int
  labels: np.ndarray


def ground_truth(masks: Any, labels: Any) -> GroundTruth:
  """Masks [N, H, W] (non-zero = anomalous) and labels [N] -> `GroundTruth` (regions labelled
  with 8-connectivity, as `aupro`)."""
  gt = np.asarray(masks) != 0
  if gt.ndim != 3:
    raise ValueError(f'masks must be [N, H, W]; got shape {gt.shape}')
  labels = _binary_labels(labels, 'labels')
  if labels.shape != (gt.shape[0],):
    raise ValueError(f'labels must be [{gt.shape[0]}]; got shape {labels.shape}')
  return GroundTruth(gt, _region_weights(gt, gt), _count_regions(gt), labels)


def _run_first(a: np.ndarray) -> np.ndarray:
  """For sorted rows a [G, A]: the index of the first element of each element's run of equal
  values."""
  idx = np.broadcast_to(np.arange(a.shape[-1]), a.shape)
  start = np.ones(a.shape, bool)
  start[..., 1:] = a[..., 1:] != a[..., :-1]
  return np.maximum.accumulate(np.where(start, idx, 0), axis=-1)


def _split_metrics(a: np.ndarray, w: np.ndarray, lt: np.ndarray, le: np.ndarray, num_neg: int,
                   num_regions: int, max_fpr: float | None) -> dict[str, np.ndarray]:
  """Metrics of G score sets from their sorted anomalous scores (see the section comment).

  Args:
    a: [G, A] anomalous scores, ascending per row; w: [G, A] their region weights (same order);
    lt, le: [G, A] int64 numbers of normal scores < a and <= a.
  Returns:
    {'auroc', 'f1_max', 'threshold', 'aupro'}: [G] float64 (nan where undefined).
  """
  g, num_pos = a.shape
  nan = np.full(g, np.nan)
  if num_pos == 0:
    return dict(auroc=nan, f1_max=nan, threshold=nan, aupro=nan)
  lt = lt.astype(np.float64)
  le = le.astype(np.float64)
  auroc = ((lt + 0.5 * (le - lt)).sum(-1) / (num_pos * num_neg) if num_neg else nan)
  first = _run_first(a)
  tp = num_pos - first
  fp = num_neg - lt
  f1 = 2.0 * tp / (tp + fp + num_pos)
  best = num_pos - 1 - np.argmax(f1[:, ::-1], axis=-1)          # ties: the largest threshold
  rows = np.arange(g)
  out = dict(auroc=np.asarray(auroc, np.float64), f1_max=f1[rows, best],
             threshold=a[rows, best].astype(np.float64), aupro=nan)
  if max_fpr is None or num_regions == 0 or num_neg == 0:
    return out
  c = float(max_fpr)
  suffix = np.zeros((g, num_pos + 1))
  suffix[:, :-1] = np.cumsum(w[:, ::-1], axis=-1)[:, ::-1]      # sum of w[j] for j >= i
  last = np.ones(a.shape, bool)
  last[:, :-1] = a[:, 1:] != a[:, :-1]
  y1 = np.minimum(np.take_along_axis(suffix, first, -1) / num_regions, 1.0)   # PRO(>= v)
  y0 = np.minimum(suffix[:, 1:] / num_regions, 1.0)                            # PRO(> v) at last
  x_s = (num_neg - le) / num_neg                                 # FPR(> v)
  x_e = (num_neg - lt) / num_neg                                 # FPR(>= v)
  x_p = np.zeros_like(x_e)                                       # FPR(>= next higher score)
  x_p[:, :-1] = x_e[:, 1:]
  flat = y0 * (np.minimum(x_s, c) - np.minimum(x_p, c))
  span = np.where(x_e > x_s, x_e - x_s, 1.0)
  y_cut = y0 + (y1 - y0) * (c - x_s) / span
  ramp = np.where(x_e <= c, (x_e - x_s) * (y0 + y1) / 2.0,
                  np.where(x_s < c, (c - x_s) * (y0 + y_cut) / 2.0, 0.0))
  area = np.where(last, flat + ramp, 0.0).sum(-1)
  y_all = np.minimum(suffix[:, 0] / num_regions, 1.0)
  area += y_all * (c - np.minimum(x_e[:, 0], c))
  out['aupro'] = area / c
  return out


def _row_counts(row: np.ndarray, pos_mask: np.ndarray, weights: np.ndarray):
  """One score set: (sorted anomalous scores [A], their weights, lt [A], le [A]).

  Only the scores within [min, max] of the anomalous ones need sorting (the normal ones below
  are below every anomalous score and are just counted; those above never count): typically a
  small part of the normal pixels. The normal counts are the counts among those scores minus the
  anomalous ones.
  """
  pos = row[pos_mask]
  order = np.argsort(pos, kind='stable')
  a = pos[order]
  w = weights[order] if weights.size else np.zeros(len(a))
  if not len(a):
    empty = np.zeros(0, np.int64)
    return a, w, empty, empty
  inside = row >= a[0]
  below = row.size - np.count_nonzero(inside)
  inside &= row <= a[-1]
  sub = np.sort(row[inside])
  lt = below + np.searchsorted(sub, a, 'left') - np.searchsorted(a, a, 'left')
  le = below + np.searchsorted(sub, a, 'right') - np.searchsorted(a, a, 'right')
  return a, w, lt, le


def _split_counts(rows: np.ndarray, pos_mask: np.ndarray, weights: np.ndarray, threads: int):
  """`_row_counts` of every row of [G, P] scores, rows in parallel threads (numpy releases the
  GIL in its sorts); stacked to [G, A] arrays."""
  if threads > 1 and rows.shape[0] > 1:
    with concurrent.futures.ThreadPoolExecutor(min(threads, rows.shape[0])) as pool:
      parts = list(pool.map(lambda r: _row_counts(r, pos_mask, weights), rows))
  else:
    parts = [_row_counts(r, pos_mask, weights) for r in rows]
  return tuple(np.stack(x) for x in zip(*parts))


def grid_metrics(image_scores: Any, maps: Any, truth: GroundTruth, *,
                 max_fpr: float = 0.3, threads: int | None = None) -> dict[str, np.ndarray]:
  """Exact metrics of G scorings of one test set, batched over the grid (host, numpy).

  Args:
    image_scores: [G, N] image scores; maps: [G, N, H, W] float32 anomaly maps.
    truth: `ground_truth(masks, labels)` of the N images.
    threads: rows sorted in parallel (default: the CPU count).
  Returns:
    {'image_auroc', 'image_f1_max', 'pixel_auroc', 'aupro', 'pixel_f1_max', 'pixel_threshold'}:
    [G] float64 each, equal to `evaluate`'s values for each row.
  """
  maps = np.asarray(maps, np.float32)
  scores = np.asarray(image_scores, np.float32)
  gt, labels = truth.anomalous, truth.labels
  if maps.ndim != 4 or maps.shape[1:] != gt.shape:
    raise ValueError(f'maps must be [G, {", ".join(map(str, gt.shape))}]; got {maps.shape}')
  if scores.shape != maps.shape[:2]:
    raise ValueError(f'image_scores must be [G, N] = {maps.shape[:2]}; got {scores.shape}')
  if np.isnan(maps).any() or np.isnan(scores).any():
    raise ValueError('grid_metrics: scores contain NaN values')
  if max_fpr is not None:
    max_fpr = _check_max_fpr(max_fpr)
  g = maps.shape[0]
  threads = (os.cpu_count() or 1) if threads is None else int(threads)
  mask = gt.reshape(-1)
  a, w, lt, le = _split_counts(maps.reshape(g, -1), mask, truth.weights, threads)
  pix = _split_metrics(a, w, lt, le, int((~mask).sum()), truth.num_regions, max_fpr)
  a, w, lt, le = _split_counts(scores, labels, np.zeros(0), 1)
  img = _split_metrics(a, w, lt, le, int((~labels).sum()), 0, None)
  return dict(image_auroc=img['auroc'], image_f1_max=img['f1_max'], pixel_auroc=pix['auroc'],
              aupro=pix['aupro'], pixel_f1_max=pix['f1_max'], pixel_threshold=pix['threshold'])


# ----------------------------------------------------------------------------- jit-able (jnp)


def _curve_metrics_jnp(scores, positive, weights, num_regions, max_fpr):
  """AUROC, F1-max (+ threshold) and AUPRO of one score set in jnp (jit / vmap-able, exact up
  to float32 rounding): one sort of all scores (descending, class and region weight carried),
  the curve points at every distinct score, trapezoids, the cut at max_fpr interpolated.

  scores [P] float32; positive [P] bool; weights [P] float32 (1 / region size at anomalous
  pixels, else 0); num_regions: scalar.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the host path above needs no jax)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  f32 = jnp.float32
  pos = positive.astype(f32)
  neg_scores, p, w = jax.lax.sort((-scores.astype(f32), pos, weights.astype(f32)), num_keys=1)
  v = -neg_scores
  n = v.shape[0]
  num_pos = pos.sum()
  num_neg = n - num_pos
  tp, fp, pro = jnp.cumsum(p), jnp.cumsum(1.0 - p), jnp.cumsum(w)
  change = v[1:] != v[:-1]
  is_end = jnp.concatenate([change, jnp.ones((1,), bool)])
  is_start = jnp.concatenate([jnp.ones((1,), bool), change])
  start = jax.lax.cummax(jnp.where(is_start, jnp.arange(n), 0))

  def before(c):                                    # cumulative value before the run's start
    return jnp.where(start > 0, c[jnp.maximum(start - 1, 0)], 0.0)

  x, xp = fp / num_neg, before(fp) / num_neg
  auroc = jnp.sum(jnp.where(is_end, (x - xp) * (tp + before(tp)) / 2.0, 0.0)) / num_pos
  f1 = jnp.where(is_end, 2.0 * tp / (tp + fp + num_pos), -1.0)
  best = jnp.argmax(f1)                             # first = largest threshold on ties
  y = jnp.minimum(pro / num_regions, 1.0)
  yp = jnp.minimum(before(pro) / num_regions, 1.0)
  c = max_fpr
  span = jnp.where(x > xp, x - xp, 1.0)
  y_cut = yp + (y - yp) * (c - xp) / span
  seg = jnp.where(x <= c, (x - xp) * (y + yp) / 2.0,
                  jnp.where(xp < c, (c - xp) * (yp + y_cut) / 2.0, 0.0))
  aupro = jnp.sum(jnp.where(is_end, seg, 0.0)) / c
  nan = jnp.float32(jnp.nan)
  defined = (num_pos > 0) & (num_neg > 0)
  return dict(auroc=jnp.where(defined, auroc, nan),
              f1_max=jnp.where(num_pos > 0, f1[best], nan),
              threshold=jnp.where(num_pos > 0, v[best], nan),
              aupro=jnp.where(defined & (num_regions > 0), aupro, nan))


def evaluate_jnp(image_scores, labels, maps, masks, region_weights, num_regions, *,
                 max_fpr: float = 0.3) -> dict:
  """`evaluate`'s main metrics as a pure jnp function (jit- and vmap-able; one sort of all
  pixels per call, so it suits accelerators; on CPU `grid_metrics` is much faster).

  Args:
    image_scores: [N]; labels: [N] bool / 0-1; maps: [N, H, W]; masks: [N, H, W] bool / 0-1;
    region_weights: [N, H, W] float32 (1 / region size at anomalous pixels, 0 elsewhere; from
      `region_weight_map`); num_regions: R.
  Returns:
    {'image_auroc', 'image_f1_max', 'pixel_auroc', 'aupro', 'pixel_f1_max', 'pixel_threshold'}
    float32 scalars.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  img = _curve_metrics_jnp(jnp.asarray(image_scores).reshape(-1),
                           jnp.asarray(labels).reshape(-1) != 0,
                           jnp.zeros(jnp.shape(image_scores)[0], jnp.float32), 1.0, 1.0)
  pix = _curve_metrics_jnp(jnp.asarray(maps).reshape(-1), jnp.asarray(masks).reshape(-1) != 0,
                           jnp.asarray(region_weights).reshape(-1),
                           jnp.asarray(num_regions, jnp.float32), float(max_fpr))
  return dict(image_auroc=img['auroc'], image_f1_max=img['f1_max'], pixel_auroc=pix['auroc'],
              aupro=pix['aupro'], pixel_f1_max=pix['f1_max'], pixel_threshold=pix['threshold'])


def region_weight_map(masks: Any) -> tuple[np.ndarray, int]:
  """Masks [N, H, W] -> (weights [N, H, W] float32: 1 / size of the pixel's 8-connected region at
  anomalous pixels, 0 elsewhere; number of regions), for `evaluate_jnp`."""
  gt = np.asarray(masks) != 0
  out = np.zeros(gt.shape, np.float32)
  out[gt] = _region_weights(gt, gt)
  return out, _count_regions(gt)
