"""Seeded synthetic weights and compact golden summaries for the torchvision parity tests.

numpy only: tools/record_golden.py loads this file by path inside a torch-only virtualenv, and
tests/test_backbones.py imports it normally, so both sides draw identical weights and reduce
the taps identically.

Weight scheme (SCHEME): entry i of the torchvision state_dict (in its order) is drawn from
`np.random.default_rng(seed + i)`:
  (float32 draws: rng.standard_normal(shape, dtype=np.float32), rng.random(..., float32))
  conv / linear `weight` (ndim >= 2)  N(0, 1 / fan_in), fan_in = prod(shape[1:])
  BatchNorm `weight` (gamma)          U(0.8, 1.2)
  `bias` (BN beta, linear bias)       N(0, 0.05^2)
  `running_mean`                      N(0, 0.05^2)
  `running_var`                       U(0.8, 1.2)
  `num_batches_tracked`               0 (int64)
Unit-gain (not He) conv scaling keeps the activations O(1)..O(10) through the 101-layer nets:
each conv + ReLU roughly halves the second moment, so a residual branch adds about a quarter of
its input's energy instead of doubling it.
"""

from __future__ import annotations

import collections
from typing import Mapping, Sequence

import numpy as np

SCHEME = ('pni_jax.synthetic/2: rng_i = np.random.default_rng(seed + i) over the torchvision '
          'state_dict in order, float32 draws; weight(ndim>=2) = standard_normal / sqrt(fan_in); '
          'bn weight = 0.8 + 0.4 * random(); bias = 0.05 * standard_normal; running_mean = '
          '0.05 * standard_normal; running_var = 0.8 + 0.4 * random(); num_batches_tracked = 0')
SAMPLES = 1024       # raw values kept per tap
PROJ_DIM = 4         # channels of the fixed random projection kept per tap


def synthetic_state_dict(manifest: Sequence[tuple[str, Sequence[int]]],
                         seed: int) -> 'collections.OrderedDict[str, np.ndarray]':
  """manifest: [(torch key, shape)] in state_dict order -> {key: array} per SCHEME."""
  out = collections.OrderedDict()
  for i, (key, shape) in enumerate(manifest):
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed + i)
    leaf = key.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
      value = np.zeros(shape, np.int64)
    elif leaf == 'weight' and len(shape) >= 2:
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
    elif leaf in ('weight', 'running_var'):
      value = np.float32(0.8) + np.float32(0.4) * rng.random(shape, dtype=np.float32)
    elif leaf in ('bias', 'running_mean'):
      value = np.float32(0.05) * rng.standard_normal(shape, dtype=np.float32)
    else:
      raise ValueError(f'no synthetic rule for state_dict entry {key!r}')
    out[key] = value
  return out


def golden_input(seed: int, shape: Sequence[int] = (2, 66, 58, 3)) -> np.ndarray:
  """The (already normalised) NHWC input of the parity runs: N(0, 1) float32."""
  return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def summarize(taps: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
  """Compact, deterministic reduction of tap outputs for the golden files.

  Args:
    taps: {tap: NHWC array (or [B, classes] for logits)}.
    seed: fixes the sampled positions and the projection.

  Returns:
    {'sample/<tap>': [SAMPLES] float32 values at fixed random flat indices,
     'proj/<tap>': [..., PROJ_DIM] float32, the channels projected on a fixed Gaussian matrix
     (computed in float64)}.
  """
  out = {}
  for j, tap in enumerate(sorted(taps)):
    a = np.asarray(taps[tap], np.float64)
    rng = np.random.default_rng(seed + 100_000 + j)
    n = min(a.size, SAMPLES)
    idx = np.sort(rng.choice(a.size, n, replace=False))
    out[f'sample/{tap}'] = a.reshape(-1)[idx].astype(np.float32)
    c = a.shape[-1]
    proj = rng.standard_normal((c, PROJ_DIM)) / np.sqrt(c)
    out[f'proj/{tap}'] = (a @ proj).astype(np.float32)
  return out


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
  """max |got - ref| / max |ref| (the parity metric)."""
  got = np.asarray(got, np.float64)
  ref = np.asarray(ref, np.float64)
  if got.shape != ref.shape:
    raise ValueError(f'shape {got.shape} != reference shape {ref.shape}')
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
