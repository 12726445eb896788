"""Fitting stages: training images -> features -> coresets -> priors -> `PNIModel`.

Each stage is a function of explicit arrays and a config slice. `pipeline.py` strings them
together per category and caches their results in the workdir so an interrupted run resumes.

Memory: the training patch features live in a `FeatureStore` (host RAM up to a cap, else a
memory-mapped file); the coreset selection only needs their random projection
([N_patches, projection_dim], one host buffer filled in place, sent to the devices shard by
shard); device memory is bounded by the batch and tile sizes (the MLP's by
`memory.device_feature_cap_mb`, see `neighborhood.train_mlp`). Nothing here is N x N.

Devices: every stage runs over a `sharding.make_mesh()` mesh (all devices, axis 'data'): the
image batches, the coreset rows and the nearest-code queries are split over it, the backbone
variables and the coreset bank replicated. On one device that is the plain computation.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pni_jax import coreset
from pni_jax import knn
from pni_jax import position as position_lib
from pni_jax import sharding
from pni_jax.progress import Progress
from pni_jax.store import FeatureStore


def padded_batches(batches: Iterable[dict], batch_size: int):
  """Pads short batches to `batch_size` (repeating the last image) so a jitted function sees one
  shape. Yields (images [batch_size, S, S, 3], valid count)."""
  for batch in batches:
    images = np.asarray(batch['image'], np.float32)
    n = images.shape[0]
    if n < batch_size:
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
    yield images, n


@jax.jit
def _project(feats, matrix):
  flat = feats.reshape(-1, feats.shape[-1])
  return flat if matrix is None else flat @ matrix


def extract_features(feature_fn: Callable, variables, batches: Iterable[dict], num_images: int,
                     batch_size: int, store: FeatureStore, projection: jax.Array | None, *,
                     mesh=None) -> np.ndarray:
  """Runs the feature function over the training images, batches split over the devices.

  Args:
    feature_fn: jitted `fn(variables, images [B, S, S, 3]) -> [B, H', W', d]`.
    variables: backbone variables (replicated on the mesh once here).
    batches: dicts with 'image' [b, S, S, 3] float32, b <= batch_size.
    num_images: N, the number of images `batches` yields in total.
    batch_size: images per call; padded up to a multiple of the device count.
    store: receives the [N, H', W', d] maps.
    projection: [d, p] random projection or None.
    mesh: `sharding.make_mesh()` (default: all devices).

  Returns:
    The projected patch features [N * H' * W', p] float32 (numpy, host; p = d without a
    projection) used by the coreset selection: one preallocated buffer, filled batch by batch.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  per_call = sharding.padded_size(batch_size, sharding.num_shards(mesh))
  variables = sharding.replicate(variables, mesh)
  if projection is not None:
    projection = sharding.replicate(projection, mesh)
  prog = Progress('train features', num_images, unit='img')
  projected, start = None, 0
  for images, n in padded_batches(batches, per_call):
    if start + n > num_images:
      raise ValueError(f'expected {num_images} training images, the pipeline gave more')
    feats = feature_fn(variables, sharding.shard_rows(images, mesh))
    proj = _project(feats, projection)
    _, h, w, _ = feats.shape
    if projected is None:
      projected = np.empty((num_images * h * w, proj.shape[-1]), np.float32)
    store.write(start, np.asarray(feats)[:n])
    projected[start * h * w:(start + n) * h * w] = np.asarray(proj)[:n * h * w]
    start += n
    prog.update(n)
  prog.close()
  if start != num_images:
    raise ValueError(f'expected {num_images} training images, the pipeline gave {start}')
  return projected


def coreset_sizes(num_patches: int, ratio: float, dist_size: int) -> tuple[int, int]:
  """(|C_emb|, |C_dist|): ceil(ratio * N) and dist_size, clipped to N and to |C_emb|."""
  if not 0 < ratio <= 1:
    raise ValueError(f'model.coreset.ratio must be in (0, 1], got {ratio}')
  num_emb = min(num_patches, max(1, math.ceil(ratio * num_patches)))
  num_dist = min(int(dist_size), num_emb)
  if num_dist < dist_size:
    logging.info('C_dist clipped to |C_emb| = %d (model.coreset.dist_size = %d)', num_emb,
                 dist_size)
  return num_emb, num_dist


def select_coreset(projected: np.ndarray, store: FeatureStore, cfg_coreset, key, *,
                   mesh=None) -> dict:
  """Greedy k-center selection -> C_emb (full features), the C_dist prefix and emb -> dist map.

  `projected` [N_patches, p] (host) is split by rows over the mesh; the full d-dimensional
  features are read from `store` only for the selected rows.

  Returns dict(c_emb [K_emb, d] float32, emb_to_dist [K_emb] int32, num_dist, order [K_emb]).
  """
  num_emb, num_dist = coreset_sizes(projected.shape[0], cfg_coreset.ratio, cfg_coreset.dist_size)
  prog = Progress('coreset', num_emb, unit='picks')

  def on_progress(done, total, elapsed):
    del total, elapsed
    prog.update(done - prog.done)

  order = coreset.greedy_coreset(projected, num_emb, key=key,
                                 chunk_size=int(cfg_coreset.chunk_size),
                                 segment_size=int(cfg_coreset.segment_size), progress=on_progress,
                                 mesh=mesh)
  prog.close()
  order = np.asarray(order)
  c_emb = store.flat_rows(order)
  _, idx = knn.knn_sharded(c_emb, c_emb[:num_dist], 1, mesh=mesh)
  emb_to_dist = idx[:, 0]
  return dict(c_emb=c_emb, emb_to_dist=np.asarray(emb_to_dist, np.int32), num_dist=num_dist,
              order=order.astype(np.int32))


def nearest_codes(store: FeatureStore, c_dist: np.ndarray, *, images_per_chunk: int,
                  query_tile: int, bank_tile: int, mesh=None) -> np.ndarray:
  """Index of the nearest C_dist row for every stored patch: [N, H', W'] int32.

  Streams `images_per_chunk` images at a time; each chunk's patches are split over the mesh's
  devices, C_dist is replicated.
  """
  n, h, w, d = store.shape
  mesh = sharding.make_mesh() if mesh is None else mesh
  bank = sharding.replicate(jnp.asarray(c_dist), mesh)
  out = np.empty((n, h, w), np.int32)
  prog = Progress('nearest codes', n, unit='img')
  for start, maps in store.chunks(images_per_chunk):
    _, idx = knn.knn_sharded(maps.reshape(-1, d), bank, k=1, mesh=mesh, query_tile=query_tile,
                             bank_tile=bank_tile)
    out[start:start + maps.shape[0]] = np.asarray(idx[:, 0]).reshape(maps.shape[:3])
    prog.update(maps.shape[0])
  prog.close()
  return out


def position_prior(codes: np.ndarray, num_dist: int, window: int, *, images_per_chunk: int):
  """Algorithm 1 streamed over image chunks: codes [N, H', W'] -> p(c_dist | x) [H', W', K]."""
  n, h, w = codes.shape
  counts = position_lib.init_counts(h, w, num_dist)
  for start in range(0, n, images_per_chunk):
    counts = position_lib.accumulate_counts(counts, jnp.asarray(codes[start:start + images_per_chunk]))
  return np.asarray(position_lib.position_prior(counts, window))
