"""Datasets: layouts on disk, preprocessing, tf.data pipelines, TFDS builders and the embedded
generated set.

Importing this package does not import TensorFlow; `make_dataset` / `iterate_numpy` load
`pipeline.py` (and TensorFlow) on first use, `generate` loads `generated.py`, and
`load_split` with data.source='tfds' loads `tfds_builders.py`.
"""

from pni_jax.data.images import CropBox
from pni_jax.data.images import LEGACY_RESIZE_MODE
from pni_jax.data.images import RESIZE_MODES
from pni_jax.data.images import crop_box
from pni_jax.data.images import default_workers
from pni_jax.data.images import load_crop
from pni_jax.data.images import load_image
from pni_jax.data.images import load_mask
from pni_jax.data.images import preprocess
from pni_jax.data.images import preprocess_mask
from pni_jax.data.images import threaded_map
from pni_jax.data.images import unprocess_map
from pni_jax.data.layouts import Split
from pni_jax.data.layouts import category_group
from pni_jax.data.layouts import list_categories
from pni_jax.data.layouts import load_split
from pni_jax.data.splits import batches
from pni_jax.data.splits import subset
from pni_jax.data.splits import train_holdout
from pni_jax.data.layouts import texture_categories

_PIPELINE = ('make_dataset', 'iterate_numpy')

__all__ = [
    'CropBox', 'LEGACY_RESIZE_MODE', 'RESIZE_MODES', 'Split', 'batches', 'category_group',
    'crop_box', 'default_workers', 'generate', 'iterate_numpy', 'list_categories', 'load_crop',
    'load_image', 'load_mask', 'load_split', 'make_dataset', 'preprocess', 'preprocess_mask',
    'subset', 'texture_categories', 'threaded_map', 'train_holdout', 'unprocess_map',
]


def __getattr__(name):
  if name in _PIPELINE:
    from pni_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  if name == 'generate':
    from pni_jax.data import generated  # pylint: disable=g-import-not-at-top
    return generated.generate
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
