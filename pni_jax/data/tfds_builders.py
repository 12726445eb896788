"""TFDS builders for MVTec AD, VisA, BTAD, the generated set and the generic folder layout.

These datasets are downloaded by hand (licence forms, no stable URLs), so each builder reads the
unpacked download from TFDS's `manual_dir` (`data.root`) in exactly the layouts of `layouts.py`
and writes TFRecords under `data_dir` (`data.tfds_data_dir`; '' = TFDS's default,
~/tensorflow_datasets). One builder config per category; a category name the builder does not
list (the folder layout, fixtures) becomes a custom config of that name.

Each record: image (encoded bytes), image_codec (pipeline.PNG / JPEG / BMP), mask (a 0 / 255
PNG; 1 x 1 zeros when the image has none), has_mask, label (0 good / 1 defective),
defect_type, filename and mask_filename (relative to manual_dir), index (position in the split's
listing; records stay in that order, `disable_shuffling=True`). Image bytes are the original
file's when TensorFlow decodes it to exactly the array of `images.load_image`
(`pipeline.graph_codec`), else a lossless PNG of that array. Every file is fully decoded once
while preparing, so a corrupt file fails the preparation with an error naming it.

The listing of manual_dir (relative paths and sizes) is fingerprinted into the prepared
dataset's metadata; reading a prepared dataset whose download has changed since is refused
(delete the prepared folder to rebuild it).

    from pni_jax.data import tfds_builders
    builder = tfds_builders.builder(cfg.data, 'bottle')   # prepares it on first use
    builder.as_dataset(split='test')
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import types
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging
import tensorflow_datasets as tfds
from PIL import Image

from pni_jax.data import images
from pni_jax.data import layouts
from pni_jax.data import pipeline

_SPLITS = ('train', 'test')

_MANUAL = """\
{name} cannot be downloaded automatically. Download it from {url}, unpack it, and point
`manual_dir` (pni-jax: --config.data.root) at the unpacked folder, which holds
{layout}
"""

MVTEC_CATEGORIES = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather',
                    'metal_nut', 'pill', 'screw', 'tile', 'toothbrush', 'transistor', 'wood',
                    'zipper')
VISA_CATEGORIES = tuple(sorted(layouts.VISA_GROUPS))
BTAD_CATEGORIES = ('01', '02', '03')


@dataclasses.dataclass
class CategoryConfig(tfds.core.BuilderConfig):
  """One category of a layout; `folder_good` only matters for the folder layout."""
  folder_good: str = 'good'


class _LayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads one category of `LAYOUT` from manual_dir (see layouts.py)."""

  LAYOUT = ''
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: the layouts of pni_jax.data.layouts.'}
  BUILDER_CONFIG_CLASS = CategoryConfig

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f'{self.name}: anomaly detection images in the {self.LAYOUT} layout.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'image_codec': tfds.features.Scalar(dtype=np.int32),
            'mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'has_mask': tfds.features.Scalar(dtype=np.bool_),
            'label': tfds.features.ClassLabel(names=['good', 'defective']),
            'defect_type': tfds.features.Text(),
            'filename': tfds.features.Text(),
            'mask_filename': tfds.features.Text(),
            'index': tfds.features.Scalar(dtype=np.int64),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _listing_cfg(self, root: str) -> Any:
    return types.SimpleNamespace(name=self.LAYOUT, root=str(root), categories=(),
                                 folder_good=self.builder_config.folder_good)

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    category = self.builder_config.name
    splits = {s: layouts.load_split(self._listing_cfg(root), category, s) for s in _SPLITS}
    self.info.metadata['listing'] = listing_fingerprint(root, splits.values())
    return {s: self._generate_examples(root, split) for s, split in splits.items()}

  def _generate_examples(self, root: str, split: layouts.Split):
    empty = _png(np.zeros((1, 1), np.uint8))
    for i, (path, mask_path, label, defect) in enumerate(
        zip(split.paths, split.mask_paths, split.labels, split.defect_types)):
      image_bytes, codec, (h, w) = encoded_image(path)
      mask = empty
      if mask_path is not None:
        m = images.load_mask(mask_path)
        if m.shape != (h, w):
          raise ValueError(f'mask size {m.shape[0]}x{m.shape[1]} (HxW) of {mask_path} differs '
                           f'from image size {h}x{w} of {path}')
        mask = _png(m.astype(np.uint8) * 255)
      yield i, {
          'image': image_bytes, 'image_codec': codec, 'mask': mask,
          'has_mask': mask_path is not None, 'label': int(label), 'defect_type': defect,
          'filename': os.path.relpath(path, root),
          'mask_filename': os.path.relpath(mask_path, root) if mask_path else '',
          'index': i,
      }


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def encoded_image(path: str) -> tuple[bytes, int, tuple[int, int]]:
  """(bytes to store, in-graph codec, (h, w)): the file's own bytes when the graph decodes them
  exactly (pipeline.graph_codec), else a PNG of `images.load_image(path)`. Always decodes the file
  (errors name it)."""
  array = images.load_image(path)
  codec = pipeline.graph_codec(path, 'image')
  if codec == pipeline.PYTHON:
    return _png(array), pipeline.PNG, array.shape[:2]
  with open(path, 'rb') as f:
    return f.read(), codec, array.shape[:2]


def listing_fingerprint(root: str, splits) -> str:
  """sha256 of the (relative path, size) of every image and mask file of `splits`."""
  h = hashlib.sha256()
  for split in splits:
    for p in sorted({*split.paths, *(m for m in split.mask_paths if m)}):
      h.update(json.dumps([split.split, os.path.relpath(p, root), os.path.getsize(p)]).encode())
  return h.hexdigest()


class MVTecAD(_LayoutBuilder, skip_registration=True):
  """MVTec AD (Bergmann et al., CVPR 2019), 15 categories."""
  name = 'pni_mvtec_ad'
  LAYOUT = 'mvtec'
  BUILDER_CONFIGS = [CategoryConfig(name=c) for c in MVTEC_CATEGORIES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL.format(
      name='MVTec AD', url='https://www.mvtec.com/company/research/datasets/mvtec-ad',
      layout='<category>/train/good/*.png, <category>/test/<defect>/*.png and '
             '<category>/ground_truth/<defect>/<name>_mask.png (e.g. bottle/, cable/, ...).')


class VisA(_LayoutBuilder, skip_registration=True):
  """VisA (Zou et al., ECCV 2022), 12 categories, with its official split file."""
  name = 'pni_visa'
  LAYOUT = 'visa'
  BUILDER_CONFIGS = [CategoryConfig(name=c) for c in VISA_CATEGORIES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL.format(
      name='VisA', url='https://github.com/amazon-science/spot-diff',
      layout='split_csv/1cls.csv (columns object,split,label,image,mask) and the files it names, '
             'e.g. candle/Data/Images/Normal/0000.JPG and candle/Data/Masks/Anomaly/000.png.')


class BTAD(_LayoutBuilder, skip_registration=True):
  """BTAD (Mishra et al., 2021), categories 01, 02, 03."""
  name = 'pni_btad'
  LAYOUT = 'btad'
  BUILDER_CONFIGS = [CategoryConfig(name=c) for c in BTAD_CATEGORIES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL.format(
      name='BTAD (BTech_Dataset_transformed)', url='the BTAD authors\' page (see the BTAD paper)',
      layout='<category>/train/ok/*, <category>/test/ok|ko/* and <category>/ground_truth/ko/* '
             '(categories 01, 02, 03; .bmp or .png).')


class GeneratedAD(_LayoutBuilder, skip_registration=True):
  """The embedded generated set (pni_jax.data.generated), MVTec layout."""
  name = 'pni_generated'
  LAYOUT = 'generated'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Write the set first: pni_jax.data.generated.generate(root, seed=...); manual_dir = root.')


class FolderAD(_LayoutBuilder, skip_registration=True):
  """Any dataset in the generic folder layout (pni_jax/data/README.md)."""
  name = 'pni_anomaly_folder'
  LAYOUT = 'folder'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Point manual_dir at a folder holding <category>/train/<good>/*, <category>/test/<any>/* '
      'and optionally <category>/masks/<defect>/<stem>.png.')


BUILDERS = {'mvtec': MVTecAD, 'visa': VisA, 'btad': BTAD, 'generated': GeneratedAD,
            'folder': FolderAD}


def _config(cls, category: str, folder_good: str):
  known = {c.name: c for c in cls.BUILDER_CONFIGS}
  if category in known and folder_good == 'good':
    return known[category]
  name = category if category not in known else f'{category}-{folder_good}'
  return CategoryConfig(name=name, folder_good=folder_good, version=cls.VERSION)


def builder(data_cfg: Any, category: str) -> tfds.core.DatasetBuilder:
  """The prepared builder of one category (`download_and_prepare` runs when it is missing).

  Reads data.name, data.root (manual_dir), data.tfds_data_dir and data.folder_good.
  Raises ValueError when the prepared records were made from another download than the one now
  under data.root (names both folders).
  """
  name = str(data_cfg.name)
  if name not in BUILDERS:
    raise ValueError(f'data.name={name!r} has no TFDS builder; valid: {tuple(BUILDERS)}')
  root = str(data_cfg.root or '')
  if not root:
    raise FileNotFoundError('data.root is empty: with data.source=tfds it is the manual_dir '
                            '(the unpacked download)')
  root = os.path.abspath(os.path.expanduser(root))
  data_dir = str(data_cfg.get('tfds_data_dir', '') or '') or None
  cls = BUILDERS[name]
  b = cls(config=_config(cls, category, str(data_cfg.get('folder_good', 'good'))),
          data_dir=data_dir)
  if not b.is_prepared():
    if not os.path.isdir(root):
      raise FileNotFoundError(f'dataset root data.root={root} (the TFDS manual_dir) does not '
                              f'exist and {b.data_dir} is not prepared')
    logging.info('preparing the TFDS records of %s/%s from %s (once) in %s', name, category,
                 root, b.data_dir)
    tfds.display_progress_bar(False)   # our log line, not TFDS's progress bars
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  elif os.path.isdir(root):
    listing = b._listing_cfg(root)  # pylint: disable=protected-access
    now = listing_fingerprint(root, (layouts.load_split(listing, category, s, check_files=False)
                                     for s in _SPLITS))
    if b.info.metadata.get('listing') != now:
      raise ValueError(f'the prepared TFDS dataset {b.data_dir} was made from other files than '
                       f'those now under data.root={root}; delete {b.data_dir} to rebuild it')
  return b


def records(data_cfg: Any, category: str, split: str) -> tf.data.Dataset:
  """The split's records in order, image and mask left encoded (dicts of tensors)."""
  b = builder(data_cfg, category)
  skip = tfds.decode.SkipDecoding()
  return b.as_dataset(split=split, shuffle_files=False, decoders={'image': skip, 'mask': skip},
                      read_config=tfds.ReadConfig(interleave_cycle_length=1))


def load_split(data_cfg: Any, category: str, split: str) -> layouts.Split:
  """The `layouts.Split` of one prepared TFDS split: paths and mask paths under data.root (as
  listed when prepared), labels, defect types and the record ids."""
  layouts._check_split(split)  # pylint: disable=protected-access
  b = builder(data_cfg, category)
  root = os.path.abspath(os.path.expanduser(str(data_cfg.root)))
  skip = tfds.decode.SkipDecoding()
  ds = b.as_dataset(split=split, shuffle_files=False, decoders={'image': skip, 'mask': skip},
                    read_config=tfds.ReadConfig(interleave_cycle_length=1))
  keys = ('index', 'label', 'defect_type', 'filename', 'mask_filename', 'has_mask')
  rows = list(tfds.as_numpy(ds.map(lambda ex: {k: ex[k] for k in keys})))
  if not rows:
    raise ValueError(f'empty {split} set in the prepared TFDS dataset {b.data_dir}')
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  return layouts.Split(
      paths=tuple(os.path.join(root, text(r['filename'])) for r in rows),
      labels=np.asarray([r['label'] for r in rows], np.int32),
      mask_paths=tuple(os.path.join(root, text(r['mask_filename'])) if r['has_mask'] else None
                       for r in rows),
      defect_types=tuple(text(r['defect_type']) for r in rows),
      category=category, split=split,
      record_ids=tuple(int(r['index']) for r in rows))
