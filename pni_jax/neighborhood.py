"""Neighbourhood model p(c_dist | N_p(x)) (paper 3.2, eq. 7): window gathering, MLP, training.

Input of the MLP at position x = (h, w) of image i: the p x p window of patch features around x with
the centre removed, flattened in row-major window order (dy outer, dx inner, then the d channels),
zeros for window cells outside the map: `[(p * p - 1) * d]` (81,920 values for p = 9, d = 1024).
Target: the index of the C_dist vector nearest to the centre feature Phi_i(x) (given by the caller).
A dilated window (`model.neighborhood.dilation` = k > 1) takes the same p * p - 1 cells every k
cells, (dy, dx) in k * {-(p-1)/2 .. (p-1)/2}: the same input size, k times the reach.

The inputs are never materialised for all positions: training gathers each batch from the
device-resident feature maps inside the jitted step, inference gathers a fixed-size chunk of
positions at a time inside `lax.map`.

Training (`train_mlp`) follows flax examples/imagenet: `create_train_state`, a pure jitted
`train_step`, `eval_step`, a Python loop over epochs with clu metrics, absl progress logging and an
orbax checkpoint after every epoch (the shared `train_loop` helper: state, resume, fingerprint,
best weights, progress lines). Batches are built on the device: each (group of an) epoch uploads
its shuffled sample ids once, and every step slices its batch from them and gathers targets and
MLP inputs from the device-resident maps, so a step is one dispatch with no host work. All
randomness is derived from (key, epoch, step), so a run that is killed and restarted from its
checkpoint directory ends with bit-identical weights.

Devices: training is data parallel over a `sharding.make_mesh()` mesh: each batch of positions is
split over the devices, parameters, optimiser state and feature maps are replicated, and GSPMD
turns the batch means (BatchNorm statistics, loss, gradients) into cross-device reductions, so the
update is the one-device update over the global batch (up to float summation order).

Device memory: the feature maps on the device are capped by `device_cap_bytes`
(`memory.device_feature_cap_mb`). When all training maps fit, they are put on the device once.
Otherwise every epoch streams them in groups of images: the epoch's images are shuffled into the
fewest nearly equal groups that fit under the cap (`images_per_group`), and each group is loaded
in turn (replacing the previous one) and trained on its share of the epoch's shuffled positions
(in their order in the uncapped epoch permutation); each group drops its last partial batch (at
most B - 1 positions per group and epoch, a different random subset every epoch). Validation
streams the groups again at the end of the epoch. Group membership is drawn from (key, epoch), so
streaming runs resume bit-identically too. The learning-rate decay keeps the nominal
num_train // B steps per epoch. Caveat: BatchNorm's running statistics average the last ~10
steps, i.e. mostly the last group's images; with few images per group they lean toward them
(16-map test task, groups of 4: best val accuracy 0.78 vs 0.79 uncapped, but 0.68 vs 0.79 after
the last epoch). With the proposed default cap of 16 GiB, streaming starts beyond ~1,100
paper-size maps (60 x 60 x 1024 float32; ~2,200 in bfloat16).

Precision: with `dtype=bfloat16` the MLP's matmuls take bfloat16 inputs and accumulate in float32
(`preferred_element_type`), BatchNorm statistics are float32 (flax), logits are float32; the
feature maps are kept on the device in bfloat16 (the MLP rounds its input to bfloat16 anyway).
The backward products run in bfloat16 too (`_mixed_matmul`: the float32 cotangent is rounded to
bfloat16 before them; autodiff alone would promote both to float32 and run two thirds of the
training FLOPs at float32 speed). Parameters and Adam moments stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

from absl import logging
from clu import metrics as clu_metrics
import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pni_jax import checkpoints
from pni_jax import sharding
from pni_jax import train_loop

TRAIN_POSITIONS = ('interior', 'all')

# Salts for `jax.random.fold_in`: one independent stream per use of the run key.
_SALT_INIT, _SALT_SPLIT, _SALT_SHUFFLE, _SALT_DROPOUT, _SALT_GROUPS = 0, 1, 2, 3, 4
_PROGRESS_EVERY_S = 60.0      # an extra progress line inside long epochs


# ----------------------------------------------------------------------------- gathering


def _check_window(window: int) -> int:
  window = int(window)
  if window < 3 or window % 2 == 0:
    raise ValueError(f'neighbourhood window must be an odd integer >= 3 (p x p window with a '
                     f'centre to remove), got {window}')
  return window


def _check_dilation(dilation: int) -> int:
  if int(dilation) != dilation or int(dilation) < 1:
    raise ValueError(f'neighbourhood dilation must be an integer >= 1 (window cells every k '
                     f'feature cells), got {dilation}')
  return int(dilation)


def window_reach(window: int, dilation: int = 1) -> int:
  """Cells from the centre to the window's outermost cells: (p - 1) / 2 * k."""
  return (_check_window(window) // 2) * _check_dilation(dilation)


def neighbor_offsets(window: int, dilation: int = 1) -> np.ndarray:
  """`[p * p - 1, 2]` int32 (dy, dx) offsets of the window cells, row-major, centre removed;
  every `dilation` cells (offsets are multiples of it)."""
  window = _check_window(window)
  k = _check_dilation(dilation)
  r = window // 2
  dy, dx = np.meshgrid(np.arange(-r, r + 1) * k, np.arange(-r, r + 1) * k, indexing='ij')
  offsets = np.stack([dy.ravel(), dx.ravel()], axis=1).astype(np.int32)
  return np.delete(offsets, (window * window) // 2, axis=0)


@functools.partial(jax.jit, static_argnames=('window', 'dilation'))
def gather_neighbors(feats: jax.Array, img: jax.Array, row: jax.Array, col: jax.Array,
                     window: int, dilation: int = 1) -> jax.Array:
  """MLP inputs for M positions.

  Args:
    feats: `[N_img, H, W, d]` patch feature maps (any float dtype; kept).
    img, row, col: `[M]` int, image index and position of each query (assumed inside the map).
    window: p, odd.
    dilation: k >= 1, spacing of the window cells (`neighbor_offsets`).

  Returns:
    `[M, (p * p - 1) * d]` in `feats.dtype`: for each query the window cells in row-major order
    without the centre, each cell's d channels contiguous, zeros where the cell is outside the map.
  """
  _, height, width, dim = feats.shape
  offsets = jnp.asarray(neighbor_offsets(window, dilation))
  rows = row[:, None].astype(jnp.int32) + offsets[None, :, 0]          # [M, P]
  cols = col[:, None].astype(jnp.int32) + offsets[None, :, 1]
  inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
  imgs = jnp.broadcast_to(img[:, None].astype(jnp.int32), rows.shape)
  cells = feats.at[imgs, jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1)].get(
      mode='promise_in_bounds')                                        # [M, P, d]
  cells = jnp.where(inside[..., None], cells, jnp.zeros((), feats.dtype))
  return cells.reshape(row.shape[0], offsets.shape[0] * dim)


# ----------------------------------------------------------------------------- model


@jax.custom_vjp
def _mixed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [M, K] @ w [K, N] for low-precision x, w: float32 result (float32 accumulation)."""
  return jax.lax.dot(x, w, preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(x, w):
  return _mixed_matmul(x, w), (x, w)


def _mixed_matmul_bwd(res, g):
  # The cotangent g is float32 (the forward's output type). Left to autodiff, both backward
  # products would take it as it is and promote the other operand: float32 x float32 matmuls,
  # i.e. two thirds of the training FLOPs at float32 speed. Rounded to the operands' dtype
  # first, they run at the low-precision rate and still accumulate in float32.
  x, w = res
  g = g.astype(x.dtype)
  dx = jax.lax.dot(g, _transpose(w), preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jax.lax.dot(_transpose(x), g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


def _transpose(a: jax.Array) -> jax.Array:
  """a [M, K] -> a^T [K, M] for a backward product: on CPU a row-major copy.

  XLA:CPU gives a transpose a column-major layout and folds it into the dot, whose bfloat16
  kernels (YNNPACK) take row-major operands only, so it upcast the MLP's weight and input
  gradients to float32 (the weight gradient of the demo MLP's first layer: 2.7 ms of a 12 ms
  bfloat16 step, at the float32 rate). Concatenating the two halves of a^T materialises it
  row-major and the products stay bfloat16 (`tools/benchmark.py mlp hlo` lists the compiled
  dots' operand types). Other backends take the transpose as it is."""
  return jax.lax.platform_dependent(a, cpu=_row_major_transpose, default=jnp.transpose)


def _row_major_transpose(a: jax.Array) -> jax.Array:
  a_t = a.T
  half = a_t.shape[0] // 2
  return jnp.concatenate([a_t[:half], a_t[half:]], axis=0)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def _dot_general_mixed(lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None):
  """`nn.Dense`'s dot_general for low-precision compute: inputs x [..., K] and kernel [K, N] in
  the compute dtype, float32 accumulation and result, and a backward pass in the compute dtype
  (`_mixed_matmul_bwd`)."""
  del precision, preferred_element_type
  (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
  if tuple(contract_l) != (lhs.ndim - 1,) or tuple(contract_r) != (0,) or batch_l or batch_r:
    raise ValueError(f'_dot_general_mixed supports x [..., K] @ kernel [K, N] only, got '
                     f'dimension numbers {dimension_numbers}')
  out = _mixed_matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
  return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


class MLP(nn.Module):
  """`num_layers` Dense layers; each hidden one followed by BatchNorm + ReLU + Dropout.

  The last layer outputs `num_classes` (= |C_dist|) logits, returned as float32. BatchNorm uses
  torch's defaults (momentum 0.1 -> flax 0.9, eps 1e-5), as in the authors' code.

  The hidden Dense layers have no bias (`hidden_bias=False`): BatchNorm subtracts the batch mean
  right after them, so a bias there has an exactly zero gradient, and Adam turns the rounding
  noise of that zero into steps of size ~lr, i.e. a noise-driven random walk that the running
  mean only follows with a lag (and that makes runs on different device counts drift apart).
  Models saved with hidden biases still load (`mlp_from_variables` sets `hidden_bias=True`).
  """
  num_layers: int
  width: int
  num_classes: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  hidden_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: `[B, in_dim]` -> `[B, num_classes]` float32 logits."""
    x = x.astype(self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    if jnp.dtype(self.dtype) != jnp.float32:  # low-precision inputs, float32 accumulation
      dense = functools.partial(dense, dot_general=_dot_general_mixed)
    for _ in range(self.num_layers - 1):
      x = dense(self.width, use_bias=self.hidden_bias)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype)(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = dense(self.num_classes)(x)
    return x.astype(jnp.float32)


def mlp_from_variables(variables, dtype=jnp.float32) -> MLP:
  """Rebuilds the (inference-time) `MLP` that owns `variables` from its parameter shapes."""
  params = variables['params']
  names = sorted((k for k in params if k.startswith('Dense_')), key=lambda k: int(k.split('_')[1]))
  if not names:
    raise ValueError('variables do not hold MLP parameters (no Dense_* entries in params)')
  first, last = params[names[0]]['kernel'], params[names[-1]]['kernel']
  width = first.shape[1] if len(names) > 1 else last.shape[0]
  hidden_bias = len(names) > 1 and 'bias' in params[names[0]]
  return MLP(num_layers=len(names), width=int(width), num_classes=int(last.shape[1]), dtype=dtype,
             hidden_bias=bool(hidden_bias))


# ----------------------------------------------------------------------------- inference


@functools.partial(jax.jit, static_argnames=('model', 'window', 'chunk', 'dilation'))
def _neighbor_logits(model: MLP, variables, feats: jax.Array, window: int, chunk: int,
                     dilation: int = 1):
  batch, height, width, _ = feats.shape
  total = batch * height * width
  chunk = min(chunk, total)
  num_chunks = -(-total // chunk)
  ids = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk)

  def one_chunk(chunk_ids):
    chunk_ids = jnp.minimum(chunk_ids, total - 1)            # the padded tail repeats the last one
    img, rest = chunk_ids // (height * width), chunk_ids % (height * width)
    x = gather_neighbors(feats, img, rest // width, rest % width, window, dilation)
    return model.apply(variables, x, train=False)

  logits = jax.lax.map(one_chunk, ids)                       # [num_chunks, chunk, K]
  return logits.reshape(num_chunks * chunk, -1)[:total].reshape(batch, height, width, -1)


def neighbor_logits(variables, feats: jax.Array, window: int, chunk: int,
                    dtype=jnp.float32, dilation: int = 1) -> jax.Array:
  """MLP logits at every position.

  Args:
    variables: `{'params', 'batch_stats'}` of a trained `MLP` (from `train_mlp`).
    feats: `[B, H, W, d]` patch feature maps.
    window: p used in training.
    chunk: positions per MLP call (memory: chunk x (p*p-1) x d inputs), `cfg.infer_chunk`.
    dtype: compute dtype of the MLP.
    dilation: window cell spacing used in training.

  Returns:
    `[B, H, W, K]` float32 logits.
  """
  window = _check_window(window)
  dilation = _check_dilation(dilation)
  if chunk < 1:
    raise ValueError(f'infer_chunk must be >= 1, got {chunk}')
  feats = jnp.asarray(feats)
  if feats.ndim != 4:
    raise ValueError(f'feats must be [B, H, W, d], got shape {feats.shape}')
  model = mlp_from_variables(variables, dtype)
  in_dim = variables['params']['Dense_0']['kernel'].shape[0]
  if in_dim != (window * window - 1) * feats.shape[-1]:
    raise ValueError(f'MLP expects {in_dim} inputs, but window {window} and d = {feats.shape[-1]} '
                     f'give {(window * window - 1) * feats.shape[-1]}')
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return _neighbor_logits(model, variables, feats, window, int(chunk), dilation)


def neighbor_probs(variables, feats: jax.Array, window: int, chunk: int,
                   temperature: float = 2.0, dtype=jnp.float32, dilation: int = 1) -> jax.Array:
  """p(c_dist | N_p(x)) = softmax(logits / T): `[B, H, W, K]` float32, rows summing to 1.

  `temperature` may be traced (a hyper-parameter under vmap); T > 0 is checked by config
  validation (model.scoring.temperature)."""
  logits = neighbor_logits(variables, feats, window, chunk, dtype, dilation)
  return jax.nn.softmax(logits / temperature, -1)


# ----------------------------------------------------------------------------- training state


@flax.struct.dataclass
class TrainState(train_loop.TrainState):
  """`train_loop.TrainState` plus the window p and its dilation k (static): Adam with the
  step-decay schedule, whose decay interval (decay_every x steps per epoch, a function of the
  training-set size) is an array, `decay_interval` (None: constant rate), so that the steps
  compile once for training sets of every size."""
  window: int = flax.struct.field(pytree_node=False, default=9)
  dilation: int = flax.struct.field(pytree_node=False, default=1)
  decay_interval: Any = None            # [] int32 optimiser steps per decay, or None

  @property
  def tx(self) -> optax.GradientTransformation:
    if self.decay_interval is None:
      return super().tx
    return optax.adam(step_decay(self.learning_rate, self.decay_interval, self.decay_factor))


def step_decay(learning_rate: float, interval, factor: float) -> optax.Schedule:
  """lr * factor ** floor(count / interval), `interval` an int32 array (traced): the arithmetic of
  `optax.exponential_decay(lr, interval, factor, staircase=True)` (`train_loop.schedule`),
  which needs a static interval."""
  def schedule(count):
    p = jnp.floor(count / interval)
    return jnp.where(count <= 0, learning_rate, learning_rate * jnp.power(factor, p))
  return schedule


# Mean cross-entropy and top-1 accuracy (built with `create`: postponed annotations in this module).
Metrics = clu_metrics.Collection.create(loss=clu_metrics.Average.from_output('loss'),
                                        accuracy=clu_metrics.Accuracy)


def check_config(cfg_nb: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad `model.neighborhood` field."""
  def bad(field, why):
    raise ValueError(f'model.neighborhood.{field} = {cfg_nb[field]!r}: {why}')
  if int(cfg_nb.window) < 3 or int(cfg_nb.window) % 2 == 0:
    bad('window', 'must be an odd integer >= 3')
  if 'dilation' in cfg_nb and (int(cfg_nb.dilation) != cfg_nb.dilation or int(cfg_nb.dilation) < 1):
    bad('dilation', 'must be an integer >= 1')
  if int(cfg_nb.num_layers) < 1:
    bad('num_layers', 'must be >= 1')
  if int(cfg_nb.width) < 1:
    bad('width', 'must be >= 1')
  if not 0.0 <= float(cfg_nb.dropout) < 1.0:
    bad('dropout', 'must be in [0, 1)')
  if int(cfg_nb.epochs) < 0:
    bad('epochs', 'must be >= 0')
  if int(cfg_nb.batch_size) < 1:
    bad('batch_size', 'must be >= 1')
  if float(cfg_nb.learning_rate) <= 0:
    bad('learning_rate', 'must be > 0')
  if int(cfg_nb.decay_every) < 0:
    bad('decay_every', 'must be >= 0 (0 = constant learning rate)')
  if float(cfg_nb.decay_factor) <= 0:
    bad('decay_factor', 'must be > 0')
  if not 0.0 <= float(cfg_nb.val_fraction) < 1.0:
    bad('val_fraction', 'must be in [0, 1)')
  if int(cfg_nb.max_train_samples) < 0:
    bad('max_train_samples', 'must be >= 0 (0 = all)')
  if cfg_nb.train_positions not in TRAIN_POSITIONS:
    bad('train_positions', f'must be one of {TRAIN_POSITIONS}')
  if int(cfg_nb.infer_chunk) < 1:
    bad('infer_chunk', 'must be >= 1')


def learning_rate_schedule(cfg_nb: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """Staircase step decay per optimiser step: lr * decay_factor ** floor(epoch / decay_every).

  The same as torch's StepLR stepped once per epoch; `decay_every = 0` keeps lr constant.
  """
  return train_loop.schedule(float(cfg_nb.learning_rate),
                             int(cfg_nb.decay_every) * int(steps_per_epoch),
                             float(cfg_nb.decay_factor))


def _epoch_learning_rate(cfg_nb: ml_collections.ConfigDict, epoch: int) -> float:
  """The learning rate of `epoch` (host-side twin of `learning_rate_schedule`, for logs)."""
  if int(cfg_nb.decay_every) == 0:
    return float(cfg_nb.learning_rate)
  decays = epoch // int(cfg_nb.decay_every)
  return float(cfg_nb.learning_rate) * float(cfg_nb.decay_factor) ** decays


@functools.partial(jax.jit, static_argnames=('model', 'in_dim'))
def _init_variables(model: MLP, key: jax.Array, in_dim: int):
  return model.init(key, jnp.zeros((2, in_dim), jnp.float32), train=False)


def create_train_state(key: jax.Array, cfg_nb: ml_collections.ConfigDict, in_dim: int,
                       num_classes: int, steps_per_epoch: int, dtype=jnp.float32) -> TrainState:
  """A fresh `TrainState`: MLP parameters from `key`, Adam with the step-decay schedule."""
  check_config(cfg_nb)
  model = MLP(num_layers=int(cfg_nb.num_layers), width=int(cfg_nb.width),
              num_classes=int(num_classes), dropout=float(cfg_nb.dropout), dtype=dtype)
  interval = int(cfg_nb.decay_every) * int(steps_per_epoch)
  return TrainState.create(
      model, _init_variables(model, key, int(in_dim)), float(cfg_nb.learning_rate),
      decay_factor=float(cfg_nb.decay_factor), window=int(cfg_nb.window),
      dilation=int(cfg_nb.get('dilation', 1)),
      decay_interval=jnp.asarray(interval, jnp.int32) if interval > 0 else None)


def _batch(maps: dict, order: jax.Array, index, grid: '_Grid', batch_size: int, window: int,
           dilation: int, batch_sharding):
  """Batch `index` of the device-resident sample order `order` [M] (ids < 0: padding): the MLP
  inputs [B, (p*p - 1) * d] gathered from the group's feature maps, targets [B], mask [B]."""
  ids = jax.lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
  if batch_sharding is not None:
    ids = jax.lax.with_sharding_constraint(ids, batch_sharding)
  mask = ids >= 0
  img, rest = jnp.divmod(jnp.maximum(ids, 0), grid.rows * grid.cols)
  row, col = rest // grid.cols + grid.offset, rest % grid.cols + grid.offset
  slot = maps['slot'][img]
  x = gather_neighbors(maps['feats'], slot, row, col, window, dilation)
  return x, maps['targets'][slot, row, col], mask


@functools.partial(jax.jit, static_argnames=('grid', 'batch_size', 'batch_sharding'))
def train_step(state: TrainState, maps: dict, order: jax.Array, index, epoch_key: jax.Array,
               step, *, grid: '_Grid', batch_size: int, batch_sharding=None
               ) -> tuple[TrainState, Metrics]:
  """One Adam step on batch `index` of the epoch's (group's) sample order; the batch is built
  and the MLP inputs gathered here, on the device.

  Args:
    state: the TrainState.
    maps: the device buffer of the group's images (`_DeviceMaps`): 'feats' `[G, H, W, d]`,
      'targets' `[G, H, W]` int32, 'slot' `[N_img]` int32 (image -> buffer row).
    order: `[M]` int32 sample ids (image-major over the training grid), this group's share of
      the epoch's permutation.
    index: the batch number; the batch is order[index * B:(index + 1) * B].
    epoch_key, step: the epoch's dropout key and the step within the epoch (over all groups);
      the step's dropout key is fold_in(epoch_key, step).
    grid, batch_size: static; batch_sharding: static, how the batch splits over the mesh.

  Returns:
    (new state, `Metrics` of the batch: mean cross-entropy and top-1 accuracy, train mode).
  """
  x, target, _ = _batch(maps, order, index, grid, batch_size, state.window, state.dilation,
                        batch_sharding)
  key = jax.random.fold_in(epoch_key, step)

  def loss_fn(params):
    logits, updates = state.model.apply({'params': params, 'batch_stats': state.batch_stats}, x,
                                        train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    return loss.mean(), (loss, logits, updates)

  grads, (loss, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  return state, Metrics.single_from_model_output(loss=loss, logits=logits, labels=target)


@functools.partial(jax.jit, static_argnames=('grid', 'batch_size', 'batch_sharding'))
def eval_step(state: TrainState, maps: dict, order: jax.Array, index, *, grid: '_Grid',
              batch_size: int, batch_sharding=None) -> Metrics:
  """Metrics of batch `index` of `order` in inference mode; ids < 0 are padding (masked)."""
  x, target, mask = _batch(maps, order, index, grid, batch_size, state.window, state.dilation,
                           batch_sharding)
  logits = state.model.apply(state.variables, x, train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, target)
  return Metrics.single_from_model_output(loss=loss, logits=logits, labels=target, mask=mask)


# ----------------------------------------------------------------------------- samples


@dataclasses.dataclass(frozen=True)
class _Grid:
  """Training positions: the (num_images, rows, cols) grid starting at (offset, offset)."""
  num_images: int
  rows: int
  cols: int
  offset: int

  @property
  def size(self) -> int:
    return self.num_images * self.rows * self.cols


def _sample_grid(shape, window: int, train_positions: str, dilation: int = 1) -> _Grid:
  num_images, height, width = shape[:3]
  if train_positions == 'all':
    return _Grid(num_images, height, width, 0)
  r = window_reach(window, dilation)
  if height - 2 * r < 1 or width - 2 * r < 1:
    raise ValueError(f"model.neighborhood.train_positions = 'interior' leaves no position: the "
                     f'{height} x {width} map has no full {window} x {window} window (dilation '
                     f"{dilation}); use 'all' or a smaller window")
  return _Grid(num_images, height - 2 * r, width - 2 * r, r)


def images_per_group(feats_shape, itemsize: int, cap_bytes: int | None) -> int:
  """Images per streamed group: N when all `[N, H, W, d]` maps (`itemsize` bytes per value) fit in
  `cap_bytes` (None or 0: no cap), else the size of the fewest nearly equal groups that fit
  (e.g. 16 maps, room for 5: 4 groups of 4). ValueError when not even one map fits."""
  num_images, height, width, dim = feats_shape
  if not cap_bytes:
    return int(num_images)
  per_image = height * width * dim * itemsize
  fit = int(cap_bytes) // per_image
  if fit < 1:
    raise ValueError(f'memory.device_feature_cap_mb = {cap_bytes / 2 ** 20:g} MB holds no '
                     f'training feature map (one map {height} x {width} x {dim} is '
                     f'{per_image / 2 ** 20:.2f} MB on the device); raise the cap')
  if fit >= num_images:
    return int(num_images)
  groups = -(-int(num_images) // fit)
  return -(-int(num_images) // groups)


def _epoch_groups(key: jax.Array, epoch: int, num_images: int, per_group: int,
                  pad_to: int = 0) -> list[np.ndarray]:
  """The epoch's image groups (sorted image indices each): the fewest groups of at most
  `per_group` images, of nearly equal sizes, from a permutation drawn from (key, epoch); one
  group of all images when they fit. `pad_to`: the permutation is compiled for that many
  images (same result)."""
  if per_group >= num_images:
    return [np.arange(num_images)]
  perm = _permutation(jax.random.fold_in(key, epoch), np.arange(num_images, dtype=np.int32),
                      pad_to)
  return [np.sort(g) for g in np.array_split(perm, -(-num_images // per_group))]


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_rows(buffer: jax.Array, rows: jax.Array, start) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def _upload_rows(host, rows: int, dtype, mesh, chunk: int = 8) -> jax.Array:
  """Host maps [n, ...] (numpy or memmap) -> a replicated device array [rows, ...] of `dtype`
  (zeros past n). Without padding it is sent as it is (one host copy only for a dtype change);
  with padding, `chunk` maps at a time into a zero buffer, so the host never holds a padded
  copy of all maps."""
  n = int(host.shape[0])
  if rows <= n:
    return sharding.replicate_host(np.asarray(host, dtype), mesh)
  shape = (int(rows),) + tuple(host.shape[1:])
  buffer = jnp.zeros(shape, dtype, device=sharding.replicated(mesh))
  c = min(int(chunk), int(rows))
  for start in range(0, n, c):
    start = min(start, rows - c)                 # the last chunk ends inside the buffer
    part = np.zeros((c,) + shape[1:], dtype)
    m = min(n - start, c)
    part[:m] = host[start:start + m]
    buffer = _write_rows(buffer, sharding.replicate_host(part, mesh), np.int32(start))
  return buffer


class _DeviceMaps:
  """The device-resident feature maps and targets of one group of images, replicated over the mesh.

  `load(imgs)` replaces the buffers (the old ones are freed first, so device memory holds one
  group) and returns {'feats' [G, H, W, d], 'targets' [G, H, W] int32, 'slot' [N_img] int32}:
  image i is buffer row slot[i]. The buffers always have `per_group` rows (zeros past the group's
  images), so the jitted steps compile once; `slots` >= N_img entries of 'slot' (a shape bucket:
  training sets of one bucket share the compiled steps).
  """

  def __init__(self, feats, targets: np.ndarray, per_group: int, dtype, mesh, slots: int = 0):
    self.feats, self.targets, self.per_group = feats, targets, per_group
    self.dtype, self.mesh = np.dtype(dtype), mesh
    self.slots = max(int(slots), int(feats.shape[0]))
    self.arrays, self.images = None, None

  def load(self, imgs: np.ndarray) -> dict:
    if self.images is not None and np.array_equal(self.images, imgs):
      return self.arrays
    if self.arrays is not None:
      for a in self.arrays.values():
        a.delete()
      self.arrays = None
    n = self.feats.shape[0]
    if len(imgs) == n:
      host = self.feats                       # all images, in order: no host copy when possible
    else:
      host = self.feats[imgs]
    if isinstance(host, jax.Array):
      host = np.asarray(host)
    targets = self.targets[imgs]
    pad = self.per_group - host.shape[0]
    if pad > 0:
      targets = np.concatenate([targets, np.zeros((pad,) + targets.shape[1:], targets.dtype)])
    slot = np.zeros(self.slots, np.int32)
    slot[imgs] = np.arange(len(imgs), dtype=np.int32)
    self.arrays = {'feats': _upload_rows(host, self.per_group, self.dtype, self.mesh),
                   'targets': sharding.replicate_host(np.ascontiguousarray(targets), self.mesh),
                   'slot': sharding.replicate_host(slot, self.mesh)}
    self.images = imgs
    return self.arrays


def _shuffle_rounds(n: int) -> int:
  """Sort rounds of `jax.random.permutation` for n elements (jax's heuristic: 1 up to ~1,600,
  2 up to ~2.6 M)."""
  return int(np.ceil(3 * np.log(max(1, n)) / np.log(np.iinfo(np.uint32).max)))


@functools.partial(jax.jit, static_argnames=('rounds',))
def _padded_permutation(key: jax.Array, x: jax.Array, n, *, rounds: int) -> jax.Array:
  """`jax.random.permutation(key, x[:n])` in the first n entries of x [M] (n traced; entries
  past n stay behind them), so that one compilation serves every n <= M.

  jax shuffles by `rounds` stable sorts on random 32-bit keys drawn for the array's shape; with
  the partitionable threefry PRNG (`jax_threefry_partitionable`, the default) the key of entry i
  does not depend on the length, so the first n keys of an M-array are those of an n-array;
  the entries past n get the largest key and sort last (after any real entry that ties them, by
  stability), keeping the real entries in the order an n-array gets.
  """
  live = jnp.arange(x.shape[0]) < n
  top = jnp.uint32(np.iinfo(np.uint32).max)
  for _ in range(rounds):
    key, subkey = jax.random.split(key)
    sort_keys = jnp.where(live, jax.random.bits(subkey, x.shape, jnp.uint32), top)
    _, x = jax.lax.sort_key_val(sort_keys, x)
  return x


def _permutation(key: jax.Array, ids: np.ndarray, pad_to: int = 0) -> np.ndarray:
  """`jax.random.permutation(key, ids)` (ids [n] int32 host), computed on ids padded to
  `pad_to` entries (one compilation per padded length) where jax's PRNG allows it (`_padded_
  permutation`); numpy int32 [n]."""
  n = int(ids.shape[0])
  if not jax.config.jax_threefry_partitionable:
    return np.asarray(jax.random.permutation(key, jnp.asarray(ids, jnp.int32)))
  padded = _pad_ids(np.asarray(ids, np.int32), max(int(pad_to), n))
  return np.asarray(_padded_permutation(key, padded, np.int32(n), rounds=_shuffle_rounds(n)))[:n]


def _pad_ids(ids: np.ndarray, length: int) -> np.ndarray:
  """ids [n] int32 followed by -1 (padding, masked) up to `length` (>= n) entries."""
  return np.concatenate([ids, np.full(max(0, length - len(ids)), -1, ids.dtype)]).astype(np.int32)


# ----------------------------------------------------------------------------- training loop


def _merge(total, m):
  return m if total is None else total.merge(m)


def train_mlp(feats, targets, cfg_nb: ml_collections.ConfigDict, key: jax.Array,
              ckpt_dir: str | None = None,
              log_fn: Callable[[str], None] | None = None, *,
              num_classes: int | None = None, dtype=jnp.float32, mesh=None,
              device_cap_bytes: int | None = None, pad_images_to: int = 0):
  """Trains the neighbourhood MLP on every (selected) position of the training feature maps.

  Args:
    feats: `[N_img, H, W, d]` float32/float16/bfloat16 (numpy, np.memmap or jax). Put on the
      devices once when they fit under `device_cap_bytes`, else streamed in groups of images
      (module docstring); never copied whole on the host.
    targets: `[N_img, H, W]` int, index of the C_dist vector nearest to each patch feature.
    cfg_nb: `cfg.model.neighborhood`.
    key: PRNG key of the run; initialisation, sample selection, validation split, per-epoch
      shuffles, image groups and dropout are all derived from it (with the epoch and step numbers).
    ckpt_dir: if given, an orbax checkpoint is written there after every epoch and a re-run with the
      same arguments continues from the last one (raising the number of epochs extends a run).
    log_fn: where the progress lines go (one per epoch: epoch, samples done/total, loss, train/val
      top-1 accuracy, learning rate, elapsed, ETA); default absl `logging.info`.
    num_classes: K = |C_dist|; default `targets.max() + 1` (pass it: an unused last index would
      otherwise shrink the output).
    dtype: MLP compute dtype (float32 or bfloat16; float32 accumulation either way).
    mesh: `sharding.make_mesh()` (default: all devices); batches are split over it.
    device_cap_bytes: bytes of feature maps allowed on each device (None or 0: no cap).
    pad_images_to: compile for this many images (>= N_img; the shape bucket of N_img,
      `fit.shape_bucket`): the device buffers (all maps when they fit, else the image -> slot
      map) and the sample orders are padded to that size, so that training sets of one bucket
      share the compiled steps. The samples, their order and the weights are those of an
      unpadded run (bit-identical).

  Returns:
    (variables, history): `variables = {'params', 'batch_stats'}` of the epoch with the best
    validation top-1 accuracy (the last epoch without a validation split); `history` a dict of
    per-epoch lists `loss, train_accuracy` (train mode, dropout on), `val_loss, val_accuracy`,
    `learning_rate, seconds`, plus `best_epoch, num_train, num_val, steps_per_epoch, batch_size,
    images_per_group, compile_seconds`.
  """
  check_config(cfg_nb)
  log = log_fn or logging.info
  window = int(cfg_nb.window)
  if feats.ndim != 4:
    raise ValueError(f'feats must be [N_img, H, W, d], got shape {feats.shape}')
  if tuple(targets.shape) != tuple(feats.shape[:3]):
    raise ValueError(f'targets must be [N_img, H, W] = {tuple(feats.shape[:3])}, '
                     f'got shape {tuple(targets.shape)}')
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f'targets must be integer C_dist indices, got dtype {targets.dtype}')
  targets = np.asarray(targets, np.int32)
  lo, hi = int(targets.min()), int(targets.max())
  num_classes = hi + 1 if num_classes is None else int(num_classes)
  if lo < 0 or hi >= num_classes:
    raise ValueError(f'targets must lie in [0, {num_classes}), found [{lo}, {hi}]')

  mesh = sharding.make_mesh() if mesh is None else mesh
  # Feature maps on the device in the narrower of their dtype and the compute dtype (the MLP
  # rounds its input to `dtype` first, so the values it sees are the same).
  dev_dtype = (np.dtype(dtype) if np.dtype(dtype).itemsize < np.dtype(feats.dtype).itemsize
               else np.dtype(feats.dtype))
  per_group = images_per_group(feats.shape, dev_dtype.itemsize, device_cap_bytes)
  streamed = per_group < feats.shape[0]
  padded_images = max(int(pad_images_to), int(feats.shape[0]))
  maps = _DeviceMaps(feats, targets, per_group if streamed else padded_images, dev_dtype, mesh,
                     slots=padded_images)
  dilation = int(cfg_nb.get('dilation', 1))
  grid = _sample_grid(feats.shape, window, cfg_nb.train_positions, dilation)
  step_grid = dataclasses.replace(grid, num_images=padded_images)   # what the steps compile for
  num_samples = grid.size
  max_samples = step_grid.size                  # the padded bound of num_samples (order lengths)
  if int(cfg_nb.max_train_samples) > 0:
    num_samples = min(num_samples, int(cfg_nb.max_train_samples))
    max_samples = min(max_samples, int(cfg_nb.max_train_samples))
  num_val = int(round(float(cfg_nb.val_fraction) * num_samples))
  num_train = num_samples - num_val
  if num_train < 1:
    raise ValueError(f'no training sample left: {num_samples} positions, val_fraction '
                     f'{cfg_nb.val_fraction}')
  ids = _permutation(jax.random.fold_in(key, _SALT_SPLIT), np.arange(grid.size, dtype=np.int32),
                     step_grid.size)[:num_samples]
  val_ids_host, train_ids = ids[:num_val], ids[num_val:]
  batch_size = min(int(cfg_nb.batch_size), num_train)
  steps_per_epoch = num_train // batch_size                   # the last partial batch is dropped
  in_dim = (window * window - 1) * feats.shape[-1]
  positions_per_image = grid.rows * grid.cols
  eval_size = min(max(batch_size, 1), max(num_val, 1))
  # Device sample orders of fixed lengths (padding ids -1, never read by a training step).
  order_len = max_samples
  max_val = max(int(round(float(cfg_nb.val_fraction) * max_samples)), 1)
  val_len = -(-max_val // eval_size) * eval_size
  d = sharding.num_shards(mesh)
  step_args = dict(grid=step_grid, batch_size=batch_size,
                   batch_sharding=sharding.data_sharding(mesh) if batch_size % d == 0 else None)
  eval_args = dict(grid=step_grid, batch_size=eval_size,
                   batch_sharding=sharding.data_sharding(mesh) if eval_size % d == 0 else None)

  state = create_train_state(jax.random.fold_in(key, _SALT_INIT), cfg_nb, in_dim, num_classes,
                             steps_per_epoch, dtype)
  # Parameters and optimiser state live replicated on the mesh, as restored checkpoints do
  # (same compiled steps before and after a restart).
  state = sharding.replicate(state, mesh)
  best = train_loop.Best(state)
  fingerprint = {
      'feats_shape': list(feats.shape), 'num_classes': num_classes,
      'key': checkpoints.key_words(key), 'num_train': num_train, 'num_val': num_val,
      'batch_size': batch_size,
      **{k: cfg_nb[k] for k in ('window', 'num_layers', 'width', 'dropout', 'learning_rate',
                                'decay_every', 'decay_factor', 'val_fraction', 'max_train_samples',
                                'train_positions')}}
  if dilation != 1:  # absent from older fingerprints: dilation-1 checkpoints still resume
    fingerprint['dilation'] = dilation
  if streamed:
    fingerprint['images_per_group'] = per_group
  history = {k: [] for k in ('loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'learning_rate',
                             'seconds')}
  epochs = int(cfg_nb.epochs)
  total_samples = epochs * steps_per_epoch * batch_size
  shuffle_key = jax.random.fold_in(key, _SALT_SHUFFLE)
  dropout_key = jax.random.fold_in(key, _SALT_DROPOUT)
  group_key = jax.random.fold_in(key, _SALT_GROUPS)
  clock = train_loop.CompileClock()
  try:
    with train_loop.Run('neighbourhood MLP', ckpt_dir, fingerprint, log, total=epochs,
                        unit='epoch', every=30.0) as run:
      start_epoch, arrays, record = run.resume(
          {'state': state.arrays(), 'best': best.variables},
          lambda a: sharding.replicate(a, mesh))
      if arrays is not None:
        state = state.with_arrays(arrays['state'])
        best.restore(arrays['best'], record)
        history = record['history']
      log(f'neighbourhood MLP: {num_train} train / {num_val} val positions, {steps_per_epoch} '
          f'steps x {batch_size} per epoch, inputs {in_dim} -> {cfg_nb.num_layers} layers x '
          f'{cfg_nb.width} -> K {num_classes}, {jnp.dtype(dtype).name}, {d} device(s)')
      if streamed:
        map_mb = dev_dtype.itemsize * np.prod(feats.shape[1:]) / 2 ** 20
        log(f'neighbourhood MLP: feature maps ({feats.shape[0]} x {map_mb:.1f} MB) exceed the '
            f'device cap of {device_cap_bytes / 2 ** 20:g} MB: streaming {per_group} images per '
            f'group, {-(-feats.shape[0] // per_group)} groups per epoch')
      t_line = time.time()
      for epoch in range(start_epoch, epochs):
        t_epoch = time.time()
        order = _permutation(jax.random.fold_in(shuffle_key, epoch), train_ids, order_len)
        groups = _epoch_groups(group_key, epoch, feats.shape[0], per_group, padded_images)
        group_of = np.zeros(feats.shape[0], np.int32)
        for g, imgs in enumerate(groups):
          group_of[imgs] = g
        sample_group = group_of[order // positions_per_image]
        epoch_key = jax.random.fold_in(dropout_key, epoch)
        train_metrics, step = None, 0
        for g, imgs in enumerate(groups):
          dev_maps = maps.load(imgs)
          group_order = order[sample_group == g] if streamed else order
          num_batches = len(group_order) // batch_size
          if not num_batches:
            continue
          dev_order = sharding.replicate_host(_pad_ids(group_order, order_len), mesh)
          for i in range(num_batches):
            state, m = train_step(state, dev_maps, dev_order, i, epoch_key, step, **step_args)
            step += 1
            train_metrics = _merge(train_metrics, m)
            if time.time() - t_line > _PROGRESS_EVERY_S:
              t_line = time.time()
              log(f'neighbourhood MLP epoch {epoch + 1}/{epochs}  step {step}/{steps_per_epoch}'
                  f'  samples {(epoch * steps_per_epoch + step) * batch_size}/{total_samples}  '
                  f'elapsed {t_line - run.t_start:.1f}s')
        if train_metrics is None:
          raise ValueError(f'no full batch of {batch_size} positions in any group of {per_group} '
                           'images: raise memory.device_feature_cap_mb or lower '
                           'model.neighborhood.batch_size')
        summary = train_loop.summarize(train_metrics)
        entry = {'loss': summary['loss'], 'train_accuracy': summary['accuracy'],
                 'val_loss': math.nan, 'val_accuracy': math.nan,
                 'learning_rate': _epoch_learning_rate(cfg_nb, epoch)}
        if num_val:
          val_metrics = None
          val_group = group_of[val_ids_host // positions_per_image]
          for g in reversed(range(len(groups))):  # the last training group is still loaded
            group_val = val_ids_host[val_group == g] if streamed else val_ids_host
            if not len(group_val):
              continue
            num_batches = -(-len(group_val) // eval_size)
            dev_maps = maps.load(groups[g])
            dev_val = sharding.replicate_host(
                _pad_ids(group_val, max(val_len, num_batches * eval_size)), mesh)
            for i in range(num_batches):
              val_metrics = _merge(val_metrics, eval_step(state, dev_maps, dev_val, i,
                                                          **eval_args))
          v = train_loop.summarize(val_metrics)
          entry.update(val_loss=v['loss'], val_accuracy=v['accuracy'])
        best.offer(entry['val_accuracy'] if num_val else float(epoch), epoch, state)
        entry['seconds'] = time.time() - t_epoch
        for k, v in entry.items():
          history[k].append(v)
        run.save(epoch + 1, {'state': state.arrays(), 'best': best.variables}, history=history,
                 **best.record())
        streamed_note = f'  ({step} steps over {len(groups)} groups)' if streamed else ''
        run.progress(epoch + 1,
                     f'samples {(epoch + 1) * steps_per_epoch * batch_size}/{total_samples}  '
                     f"loss {entry['loss']:.4f}  train acc {entry['train_accuracy']:.4f}  "
                     f"val loss {entry['val_loss']:.4f}  val acc {entry['val_accuracy']:.4f}  "
                     f"lr {entry['learning_rate']:.2e}" + streamed_note)
  finally:
    clock.close()

  history.update(best_epoch=best.index, num_train=num_train, num_val=num_val,
                 steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                 images_per_group=per_group, compile_seconds=clock.total)
  return dict(best.variables), history
