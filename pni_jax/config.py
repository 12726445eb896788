"""Shared configuration defaults; `configs/*.py` start from `base_config()` and override.

Every value a user may want to change is a field, so `--config.data.root=...` works from the
command line and a researcher can build variants with `cfg.copy_and_resolve_references()`.
The defaults below are the paper-faithful values (see README: "Configuration").
"""

from __future__ import annotations

import hashlib
import json

import ml_collections
from ml_collections.config_dict import placeholder

DATASETS = ('generated', 'mvtec', 'visa', 'btad', 'folder')


def base_config() -> ml_collections.ConfigDict:
  """Paper-faithful defaults (WideResNet-101, 480 px crops, PNI with N + P + R)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- data
  c.data = d = ml_collections.ConfigDict()
  d.name = 'mvtec'            # 'generated' | 'mvtec' | 'visa' | 'btad' | 'folder'
  d.root = ''                 # dataset root folder (generated: where the set is written)
  d.categories = ()           # empty = every category found under root
  d.resize = 512              # resize to this many pixels (see resize_mode)
  d.resize_mode = 'square'    # 'square': whole image -> resize x resize (paper); 'short_side':
                              # short side -> resize, aspect kept (authors' code, torchvision)
  d.crop = 480                # then center-crop a square of this size
  d.source = 'files'          # 'files': read data.root directly | 'tfds': TFDS builders with
                              # data.root as manual_dir (pni_jax/data/tfds_builders.py)
  d.tfds_data_dir = ''        # where TFDS writes the prepared records ('' = ~/tensorflow_datasets)
  # Report groups: categories reported as 'texture'. None = the dataset's own (MVTec AD's five
  # textures, the generated set's weave and granite, none elsewhere).
  d.texture_categories = placeholder(tuple)
  d.batch_size = 8            # images per feature-extraction batch
  # Normal training images held out for fit-time thresholds and the deployable ensemble
  # normalisation. The paper fits on every training image (0); deployments want ~0.1.
  d.holdout_fraction = 0.0
  d.folder_good = 'good'      # 'folder' layout: sub-folder names (see pni_jax/data/README)
  # Generated (embedded) dataset; only read when name == 'generated'.
  d.generated = g = ml_collections.ConfigDict()
  g.image_size = 256
  g.num_train = 60
  g.num_test_good = 12
  g.num_test_defect = 24

  # ---------------------------------------------------------------- model
  c.model = m = ml_collections.ConfigDict()
  m.backbone = 'wide_resnet101_2'
  m.weights = ''              # converted weights (tools/convert_weights.py); '' = embedded default
  m.allow_random_init = False # only for tests / smoke runs: features are then not pretrained
  m.layers = ('layer2', 'layer3')
  m.precision = 'float32'     # 'float32' | 'bfloat16' (backbone and MLP compute on GPU/TPU)
  m.aggregation_size = 5      # local p x p aggregation of patch features (authors' code: 5)
  m.pre_dim = 1024            # per-layer channel pooling
  m.dim = 1024                # d, final patch feature size
  m.use_neighborhood = True   # N: p(c | neighbourhood) from the MLP
  m.use_position = True       # P: p(c | position) from histograms
  m.use_refinement = True     # R: refinement network on the anomaly map
  # Ensemble (paper Table 2): one full PNI model per backbone, normalised and averaged.
  # Paper: ('wide_resnet101_2', 'resnext101_32x8d', 'densenet201'); empty = single model.
  m.ensemble = ()
  m.ensemble_weights = ()     # one converted-weights path per member ('' = embedded)

  # Coresets (greedy k-center on a random projection).
  m.coreset = cs = ml_collections.ConfigDict()
  cs.ratio = 0.01             # |C_emb| = ratio * number of training patches
  cs.dist_size = 2048         # |C_dist|, the first picks of the same greedy run
  cs.projection_dim = 128     # random projection used for the selection (0 = none)
  cs.chunk_size = 16384       # rows per distance-update tile
  cs.segment_size = 256       # picks per jitted call between progress reports (0 = one call)

  # Position model (Algorithm 1).
  m.position = pos = ml_collections.ConfigDict()
  pos.window = 9              # histogram accumulation window p
  pos.smoothing = 0.0         # pseudo-counts per code added as the codes' overall shares
                              # (position.position_prior); 0: the paper's raw histograms;
                              # < 0: chosen by leave-one-image-out likelihood

  # Neighbourhood MLP.
  m.neighborhood = nb = ml_collections.ConfigDict()
  nb.window = 9               # p: 9 x 9 window, centre removed -> 80 neighbours
  nb.dilation = 1             # k: the window's cells every k feature cells (reach k (p-1)/2)
  nb.num_layers = 10          # N_MLP
  nb.width = 2048             # c_MLP
  nb.dropout = 0.5
  nb.epochs = 15
  nb.batch_size = 2048
  nb.learning_rate = 1e-3
  nb.decay_every = 5          # epochs per x0.1 step decay
  nb.decay_factor = 0.1
  nb.val_fraction = 0.1
  nb.max_train_samples = 0    # 0 = every training position allowed by train_positions
  nb.train_positions = 'interior'  # 'interior' (authors' code: full window inside the map) | 'all'
  nb.infer_chunk = 4096       # patches per MLP inference chunk

  # Conditional scoring (eq. 3-8).
  m.scoring = sc = ml_collections.ConfigDict()
  sc.temperature = 2.0
  sc.tau_scale = 0.5          # tau = tau_scale / |C_emb|
  sc.likelihood_lambda = 1.0
  sc.combine = 'mean_prob'    # 'mean_prob' (eq. 6) | 'product' | 'mean_score' | 'max_prob'
                              # | 'posterior' | 'posterior_ratio' | 'relative' | 'relative_score'
                              # | 'relative_lift_score'
                              # (pni_jax/scoring.py; README 'The neighbourhood prior')
  sc.rho = 0.01               # 'relative*': a code is allowed when p > rho * max_c p
                              # ('relative_lift_score': P's when p > rho * its base rate)
  sc.border = 'authors'       # 'authors': the N / N+P maps' border (the window's reach, where
                              # the MLP never trained: train_positions='interior') is cropped and
                              # edge-padded back | 'pad': N scored everywhere (zero-padded windows)
  sc.neighborhood_weight = 0.5  # weight of p(c | N) against p(c | x) (eq. 6: 0.5)
  sc.sigma = 8.0              # Gaussian blur of the upsampled map (PatchCore: 4)
  sc.max_sigma = 16.0         # static bound of sigma (the blur kernel's radius is 4 max_sigma)
  # Image score: 'patch_max_cropped' (authors' test step: max of the unblurred patch map, its
  # border cut for N / P variants) | 'max' (of the blurred map) | 'patch_max' | 'reweight'
  # (PatchCore) | 'top_percent'.
  sc.image_score = 'patch_max_cropped'
  sc.image_border = -1        # cells cut by patch_max_cropped; -1: (window - 1) / 2 for N / P
  sc.top_percent = 1.0
  sc.search_chunk = 256       # patches per masked-search chunk (only where a prior binds)
  sc.mlp_precision = ''       # compute dtype of the MLP when scoring: '' = model.precision |
                              # 'float32' | 'bfloat16' (float32 accumulation; README 'Scale')
  sc.reweight_neighbors = 9
  sc.query_tile = 1024        # patches per distance tile
  sc.bank_tile = 4096         # coreset rows per distance tile

  # Refinement network.
  m.refine = r = ml_collections.ConfigDict()
  r.encoder = 'densenet161'   # 'densenet161' | 'efficientnet_lite0'
  r.encoder_weights = ''
  r.input_size = 320
  r.iterations = 55000
  r.batch_size = 8
  r.learning_rate = 1e-4
  r.loss = 'reg_grad'         # 'reg_grad' (eq. 10-11) | 'ce' | 'focal'
  r.fusion_weight = 0.1
  r.texture_dir = ''          # optional folder of textures for DRAEM-style defects
  r.texture_source = 'procedural'  # without texture_dir: 'procedural' | 'images' (training images)
  r.checkpoint_every = 1000
  r.pool_size = 0             # 0 = synthesise every step (paper); N = a fixed pool of N samples
  r.allow_random_init = False # encoder without pretrained weights (warns)
  r.norm_quantiles = (0.01, 0.99)  # A_hat normalisation: lo / hi quantiles (normal / defect px)
  r.calibration_samples = 64  # synthetic samples for the normalisation statistics
  r.augment = True            # online flip / rotation / colour augmentation
  r.log_every = 1000           # iterations per progress line
  r.arch = 'paper'            # 'paper' (map fused into the pretrained first conv, no skips) | 'skips'
  r.decoder_width = 768       # 'paper' decoder: channels after its first 1x1 conv (authors: 768)
  r.precision = 'float32'     # 'float32' | 'bfloat16' (compute; float32 master weights)
  r.device_images_mb = 1024.0 # normal images on the device up to this size, else streamed (0 = no cap)

  # ---------------------------------------------------------------- evaluation / outputs
  c.eval = e = ml_collections.ConfigDict()
  e.save_maps = True          # PNG anomaly maps per test image
  e.max_figures = 24          # per-image figures per category (0 = none)
  e.max_fpr = 0.3             # AUPRO integration limit
  e.threshold_fpr = 0.01      # fit-time image threshold: this FPR on held-out normal images
  e.pixel_threshold_fpr = 0.001  # fit-time pixel threshold (defect masks in predict mode)
  e.calibration_pixels = 2 ** 22 # held-out pixels kept for the pixel threshold (strided)
  e.ablations = ()            # extra variants to evaluate, e.g. ('baseline', 'N', 'N+P', 'N+P+R')
  e.diagnostics = True        # report how often N / P exclude the nearest code (diagnostics.md)

  # ---------------------------------------------------------------- hyper-parameter sweeps
  # `--mode=sweep`: one list per swept hyper-parameter (named as in model.scoring / model.refine:
  # tau_scale, temperature, likelihood_lambda, neighborhood_weight, sigma, top_percent,
  # fusion_weight, rho); the grid is their product. Empty = that parameter stays at its config value.
  c.sweep = sw = ml_collections.ConfigDict()
  for name in ('tau_scale', 'temperature', 'likelihood_lambda', 'neighborhood_weight', 'sigma',
               'top_percent', 'fusion_weight', 'rho'):
    sw[name] = ()
  sw.variant = ''             # '' = the main variant (model.use_*); e.g. 'N+P'
  sw.chunk_size = 16          # grid points per compiled call (bounded by memory_mb too)
  sw.memory_mb = 1024.0       # host memory for one chunk's maps (chunk shrinks to fit)
  sw.cache_mb = 4096.0        # cap on the cached per-patch code distances and MLP logits

  # ---------------------------------------------------------------- process
  c.runtime = rt = ml_collections.ConfigDict()
  rt.compilation_cache = True     # JAX's persistent compilation cache (compiles paid once)
  rt.compilation_cache_dir = ''   # '' = $XDG_CACHE_HOME/pni_jax/xla (~/.cache/pni_jax/xla)
  rt.shape_buckets = True         # pad data-dependent sizes (training images) to shared buckets
  rt.run_bucket = True            # with shape_buckets: one bucket for the whole run (every category
                                  # padded to the largest training set's), so a batch job compiles
                                  # each function once; False: each category its own bucket
  rt.min_train_images = 0         # with shape_buckets: compile the fitting and scoring functions for
                                  # at least this many training images (set by the run from
                                  # run_bucket; 0: the category's own bucket)

  c.memory = mem = ml_collections.ConfigDict()
  mem.feature_cap_mb = 4096.0  # host memory for stored patch features before spilling to disk
  mem.device_feature_cap_mb = 16384.0  # per-device memory for the MLP's training feature maps;
                                       # beyond it they are streamed in groups of images (0 = none)
  return c


def to_plain(value):
  """A ConfigDict (or nested tuples / lists of values) as plain dicts and lists, JSON-ready."""
  if isinstance(value, ml_collections.ConfigDict):
    return {k: to_plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [to_plain(v) for v in value]
  return value


# Fields added after models were fitted with their section, and the value that behaves as before:
# left out of fingerprints while they hold it, so that workdirs fitted earlier stay valid.
NEUTRAL_FIELDS = {'mlp_precision': ''}


def _fingerprint_plain(value):
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _fingerprint_plain(v) for k, v in value.items()
            if not (k in NEUTRAL_FIELDS and v == NEUTRAL_FIELDS[k])}
  if isinstance(value, (tuple, list)):
    return [_fingerprint_plain(v) for v in value]
  return value


def fingerprint(*slices) -> str:
  """Short stable hash of config slices (ConfigDicts / plain values): equal settings, equal hash
  (`NEUTRAL_FIELDS` at their neutral value are left out)."""
  text = json.dumps([_fingerprint_plain(s) for s in slices], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _choice(value, name: str, choices) -> None:
  if value not in choices:
    raise ValueError(f'config.{name} must be one of {tuple(choices)}, got {value!r}')


def _positive(value, name: str) -> None:
  if not value > 0:
    raise ValueError(f'config.{name} must be > 0, got {value!r}')


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first setting that cannot work."""
  _choice(c.data.name, 'data.name', DATASETS)
  if c.data.name != 'generated' and not c.data.root:
    raise ValueError(f'config.data.root must name the {c.data.name} dataset folder '
                     f'(--config.data.root=/path/to/data)')
  _positive(c.data.crop, 'data.crop')
  _positive(c.data.batch_size, 'data.batch_size')
  if c.data.crop > c.data.resize:
    raise ValueError(f'config.data.crop ({c.data.crop}) must not exceed config.data.resize '
                     f'({c.data.resize})')
  _choice(c.data.get('resize_mode', 'square'), 'data.resize_mode', ('square', 'short_side'))
  _choice(c.data.get('source', 'files'), 'data.source', ('files', 'tfds'))
  if not 0 <= c.data.holdout_fraction < 1:
    raise ValueError(f'config.data.holdout_fraction must be in [0, 1), got {c.data.holdout_fraction}')
  m = c.model
  _choice(m.precision, 'model.precision', ('float32', 'bfloat16'))
  _choice(m.scoring.get('mlp_precision', ''), 'model.scoring.mlp_precision',
          ('', 'float32', 'bfloat16'))
  if len(m.layers) < 1:
    raise ValueError('config.model.layers must name at least one backbone stage')
  if m.aggregation_size < 1 or m.aggregation_size % 2 != 1:
    raise ValueError(f'config.model.aggregation_size must be odd and >= 1, got {m.aggregation_size}')
  for name in ('pre_dim', 'dim'):
    _positive(m[name], f'model.{name}')
  if not 0 < m.coreset.ratio <= 1:
    raise ValueError(f'config.model.coreset.ratio must be in (0, 1], got {m.coreset.ratio}')
  _positive(m.coreset.dist_size, 'model.coreset.dist_size')
  for name in ('window',):
    if m.position[name] < 1 or m.position[name] % 2 != 1:
      raise ValueError(f'config.model.position.{name} must be odd, got {m.position[name]}')
    if m.neighborhood[name] < 3 or m.neighborhood[name] % 2 != 1:
      raise ValueError(f'config.model.neighborhood.{name} must be odd and >= 3, got '
                       f'{m.neighborhood[name]}')
  _choice(m.neighborhood.train_positions, 'model.neighborhood.train_positions',
          ('interior', 'all'))
  _choice(m.scoring.combine, 'model.scoring.combine',
          ('mean_prob', 'product', 'mean_score', 'max_prob', 'posterior', 'posterior_ratio',
           'relative', 'relative_score', 'relative_lift_score'))
  if not 0 < m.scoring.get('rho', 0.01) <= 1:
    raise ValueError(f'config.model.scoring.rho must be in (0, 1], got {m.scoring.rho}')
  _choice(m.scoring.get('border', 'pad'), 'model.scoring.border', ('pad', 'authors'))
  if int(m.neighborhood.get('dilation', 1)) < 1:
    raise ValueError(f'config.model.neighborhood.dilation must be >= 1, got '
                     f'{m.neighborhood.dilation}')
  _choice(m.scoring.image_score, 'model.scoring.image_score',
          ('max', 'patch_max', 'patch_max_cropped', 'top_percent', 'reweight'))
  _positive(m.scoring.temperature, 'model.scoring.temperature')
  if not 0 <= m.scoring.get('neighborhood_weight', 0.5) <= 1:
    raise ValueError(f'config.model.scoring.neighborhood_weight must be in [0, 1], got '
                     f'{m.scoring.neighborhood_weight}')
  if not 0 <= m.scoring.sigma <= m.scoring.get('max_sigma', m.scoring.sigma):
    raise ValueError(f'config.model.scoring.sigma must be in [0, model.scoring.max_sigma = '
                     f'{m.scoring.get("max_sigma")}], got {m.scoring.sigma}')
  if not 0 < m.scoring.top_percent <= 100:
    raise ValueError(f'config.model.scoring.top_percent must be in (0, 100], got '
                     f'{m.scoring.top_percent}')
  _choice(m.refine.loss, 'model.refine.loss', ('reg_grad', 'ce', 'focal'))
  _choice(m.refine.encoder, 'model.refine.encoder', ('densenet161', 'efficientnet_lite0'))
  _choice(m.refine.texture_source, 'model.refine.texture_source', ('procedural', 'images'))
  if not 0 <= m.refine.fusion_weight <= 1:
    raise ValueError(f'config.model.refine.fusion_weight must be in [0, 1], got '
                     f'{m.refine.fusion_weight}')
  _positive(c.memory.feature_cap_mb, 'memory.feature_cap_mb')
  if c.memory.get('device_feature_cap_mb', 0) < 0:
    raise ValueError(f'config.memory.device_feature_cap_mb must be >= 0 (0 = no cap), got '
                     f'{c.memory.device_feature_cap_mb}')
