"""Dataset layouts on disk -> `Split` file lists (pure Python listing; nothing is downloaded).

Supported `data.name` values and the layouts they read (see pni_jax/data/README.md):

  mvtec, generated  <root>/<cat>/train/good/*, <root>/<cat>/test/<defect>/* ('good' = normal),
                    <root>/<cat>/ground_truth/<defect>/<stem>_mask.png
  visa              <root>/split_csv/1cls.csv (object,split,label,image,mask; label normal|anomaly;
                    paths relative to root, e.g. candle/Data/Images/Anomaly/000.JPG and
                    candle/Data/Masks/Anomaly/000.png)
  btad              <root>/<cat>/train/ok/*, <root>/<cat>/test/{ok,ko}/*,
                    <root>/<cat>/ground_truth/ko/<stem>.png|.bmp
  folder            <root>/<cat>/train/<data.folder_good>/*, <root>/<cat>/test/<anything>/*,
                    optional <root>/<cat>/masks/<defect>/<stem>[_mask].<ext>

Every error names the path it expected and what it found there.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import types
from typing import Any, Sequence

import numpy as np

from pni_jax.data import images

LAYOUTS = ('generated', 'mvtec', 'visa', 'btad', 'folder')

# VisA's official split file and its columns / label strings, as shipped in the dataset and in
# amazon-science/spot-diff (split_csv/1cls.csv: header "object,split,label,image,mask", labels
# "normal" / "anomaly", mask empty for normal rows; utils/prepare_data.py maps label == 'normal'
# to good and binarises masks with `mask != 0`). anomalib's visa loader reads the same file.
VISA_SPLIT_CSV = os.path.join('split_csv', '1cls.csv')
VISA_COLUMNS = ('object', 'split', 'label', 'image', 'mask')
VISA_LABELS = {'normal': 0, 'anomaly': 1}

# Category groups used for the report's sub-total rows.
MVTEC_TEXTURES = ('carpet', 'grid', 'leather', 'tile', 'wood')
VISA_GROUPS = {  # the paper's Table 6 (groups as defined by the VisA authors)
    'cashew': 'single instance', 'chewinggum': 'single instance', 'fryum': 'single instance',
    'pipe_fryum': 'single instance',
    'candle': 'multiple instances', 'capsules': 'multiple instances',
    'macaroni1': 'multiple instances', 'macaroni2': 'multiple instances',
    'pcb1': 'complex structure', 'pcb2': 'complex structure', 'pcb3': 'complex structure',
    'pcb4': 'complex structure',
}
GENERATED_TEXTURES = ('weave', 'granite')


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of one category.

  Attributes:
    paths: image files, N entries.
    labels: int32 [N], 0 = good, 1 = defective.
    mask_paths: N entries; None for good images (and for defective ones of a layout without
      masks, see `has_masks`).
    defect_types: N entries; 'good' for normal images, else the defect name (test sub-folder).
    category: category name (for messages).
    split: 'train' or 'test'.
    record_ids: data.source='tfds' only: the record index of each entry in the prepared TFDS
      split (increasing); empty for the files source.
  """
  paths: tuple[str, ...]
  labels: np.ndarray
  mask_paths: tuple[str | None, ...]
  defect_types: tuple[str, ...]
  category: str = ''
  split: str = ''
  record_ids: tuple[int, ...] = ()

  def __post_init__(self):
    labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
    labels.setflags(write=False)
    object.__setattr__(self, 'labels', labels)
    object.__setattr__(self, 'paths', tuple(self.paths))
    object.__setattr__(self, 'mask_paths', tuple(self.mask_paths))
    object.__setattr__(self, 'defect_types', tuple(self.defect_types))
    object.__setattr__(self, 'record_ids', tuple(int(i) for i in self.record_ids))
    n = len(self.paths)
    if not (len(labels) == len(self.mask_paths) == len(self.defect_types) == n):
      raise ValueError('Split fields disagree in length: '
                       f'{n} paths, {len(labels)} labels, {len(self.mask_paths)} mask_paths, '
                       f'{len(self.defect_types)} defect_types')
    if self.record_ids and len(self.record_ids) != n:
      raise ValueError(f'Split has {len(self.record_ids)} record_ids for {n} paths')

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def num_defective(self) -> int:
    return int(self.labels.sum())

  @property
  def has_masks(self) -> bool:
    """True when every defective image has a ground-truth mask (pixel metrics possible)."""
    return all(m is not None for m, l in zip(self.mask_paths, self.labels) if l)


# ------------------------------------------------------------------------------------ helpers


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(images.IMAGE_EXTENSIONS)


def _list_images(folder: str) -> list[str]:
  return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                if _is_image(n) and os.path.isfile(os.path.join(folder, n)))


def _subdirs(folder: str) -> list[str]:
  return sorted(n for n in os.listdir(folder)
                if not n.startswith('.') and os.path.isdir(os.path.join(folder, n)))


def _listing(path: str, limit: int = 12) -> str:
  """What is at `path`, for error messages."""
  if not os.path.exists(path):
    return f'{path} does not exist'
  if not os.path.isdir(path):
    return f'{path} is a file, not a folder'
  names = sorted(os.listdir(path))
  if not names:
    return f'{path} is empty'
  shown = ', '.join(n + ('/' if os.path.isdir(os.path.join(path, n)) else '')
                    for n in names[:limit])
  more = f' (+{len(names) - limit} more)' if len(names) > limit else ''
  return f'{path} contains: {shown}{more}'


def _detect_layout(root: str) -> str:
  """A guess at the layout under `root`, for hints in error messages."""
  if not os.path.isdir(root):
    return 'nothing'
  if os.path.isfile(os.path.join(root, VISA_SPLIT_CSV)):
    return "a VisA layout (data.name='visa')"
  for cat in _subdirs(root)[:64]:
    train = os.path.join(root, cat, 'train')
    if os.path.isdir(os.path.join(train, 'good')):
      return "an MVTec AD layout (data.name='mvtec' or 'generated')"
    if os.path.isdir(os.path.join(train, 'ok')):
      return "a BTAD layout (data.name='btad')"
    if os.path.isdir(train):
      return f"a folder layout (data.name='folder'; train/ holds {_subdirs(train)})"
  return 'no known layout'


def _check_name(name: str) -> str:
  if name not in LAYOUTS:
    raise ValueError(f'data.name={name!r} is not a known dataset layout; valid: {LAYOUTS}')
  return name


def _check_root(data_cfg: Any) -> str:
  root = str(data_cfg.root or '')
  if not root:
    raise FileNotFoundError('data.root is empty: set --config.data.root=<dataset folder>')
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    hint = ''
    if data_cfg.name == 'generated':
      hint = (' (the generated set is written by pni_jax.data.generated.generate(root, seed=...) '
              'before it is read)')
    raise FileNotFoundError(f'dataset root data.root={root} does not exist{hint}')
  return root


def _requested(data_cfg: Any) -> list[str]:
  cats = data_cfg.categories
  if cats is None:
    return []
  if isinstance(cats, str):
    cats = [c for c in cats.replace(' ', ',').split(',') if c]
  return [str(c) for c in cats]


def _check_split(split: str) -> str:
  if split not in ('train', 'test'):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  return split


def _check_files(paths: Sequence[str], mask_paths: Sequence[str | None]) -> None:
  """Reads every header: unreadable files and mask / image size mismatches fail here, early."""
  for p, m in zip(paths, mask_paths):
    hw = images.image_size(p, 'image')
    if m is not None:
      mhw = images.image_size(m, 'mask')
      if mhw != hw:
        raise ValueError(f'mask size {mhw[0]}x{mhw[1]} (HxW) of {m} differs from image size '
                         f'{hw[0]}x{hw[1]} of {p}')


def _train_folder_split(cat_dir: str, good: str, layout: str, category: str) -> Split:
  folder = os.path.join(cat_dir, 'train', good)
  if not os.path.isdir(folder):
    raise ValueError(f'not a {layout} layout: expected the normal training images in {folder}/; '
                     f'{_listing(os.path.join(cat_dir, "train"))}; '
                     f'{_listing(cat_dir)}; '
                     f'data.root looks like {_detect_layout(os.path.dirname(cat_dir))}')
  paths = _list_images(folder)
  if not paths:
    raise ValueError(f'empty train set: no images ({", ".join(images.IMAGE_EXTENSIONS)}) in '
                     f'{folder}; {_listing(folder)}')
  n = len(paths)
  return Split(tuple(paths), np.zeros(n, np.int32), (None,) * n, ('good',) * n, category, 'train')


def _find_mask(folder: str, stems: Sequence[str]) -> str | None:
  for stem in stems:
    for ext in images.IMAGE_EXTENSIONS:
      for e in (ext, ext.upper()):
        p = os.path.join(folder, stem + e)
        if os.path.isfile(p):
          return p
  return None


def _test_folder_split(cat_dir: str, *, good: str, layout: str, category: str,
                       mask_root: str | None, mask_stems, expected_mask: str) -> Split:
  """Reads <cat_dir>/test/<sub>/* with <sub> == good -> label 0, else label 1. With a
  mask_root, every defective image must have its mask in <mask_root>/<sub>/."""
  test_dir = os.path.join(cat_dir, 'test')
  if not os.path.isdir(test_dir):
    raise ValueError(f'not a {layout} layout: expected test images in {test_dir}/<defect>/; '
                     f'{_listing(cat_dir)}')
  paths, labels, masks, types = [], [], [], []
  for sub in _subdirs(test_dir):
    bad = sub != good
    for p in _list_images(os.path.join(test_dir, sub)):
      mask = None
      if bad and mask_root is not None:
        stem = os.path.splitext(os.path.basename(p))[0]
        mask = _find_mask(os.path.join(mask_root, sub), mask_stems(stem))
        if mask is None:
          raise ValueError(f'defective test image {p} has no ground-truth mask: expected '
                           f'{os.path.join(mask_root, sub, expected_mask.format(stem=stem))}')
      paths.append(p)
      labels.append(int(bad))
      masks.append(mask)
      types.append(sub if bad else 'good')
  if not paths:
    raise ValueError(f'empty test set: no images in {test_dir}/<sub-folder>/; {_listing(test_dir)}')
  return Split(tuple(paths), np.asarray(labels, np.int32), tuple(masks), tuple(types), category,
               'test')


# ------------------------------------------------------------------------------------ layouts


def _mvtec_split(root: str, category: str, split: str) -> Split:
  cat_dir = os.path.join(root, category)
  if split == 'train':
    return _train_folder_split(cat_dir, 'good', 'MVTec AD', category)
  return _test_folder_split(
      cat_dir, good='good', layout='MVTec AD', category=category,
      mask_root=os.path.join(cat_dir, 'ground_truth'),
      mask_stems=lambda s: (s + '_mask',), expected_mask='{stem}_mask.png')


def _btad_split(root: str, category: str, split: str) -> Split:
  # BTAD ships images as .bmp (01, 03) or .png (02) and masks as .png (01, 02) or .bmp (03), all
  # with the image's stem (anomalib PR #162 lists the extensions per category).
  cat_dir = os.path.join(root, category)
  if split == 'train':
    return _train_folder_split(cat_dir, 'ok', 'BTAD', category)
  return _test_folder_split(
      cat_dir, good='ok', layout='BTAD', category=category,
      mask_root=os.path.join(cat_dir, 'ground_truth'),
      mask_stems=lambda s: (s,), expected_mask='{stem}.png (or .bmp)')


def _folder_split(root: str, category: str, split: str, good: str) -> Split:
  cat_dir = os.path.join(root, category)
  if split == 'train':
    return _train_folder_split(cat_dir, good, 'folder', category)
  mask_root = os.path.join(cat_dir, 'masks')
  has_masks = os.path.isdir(mask_root)
  return _test_folder_split(
      cat_dir, good=good, layout='folder', category=category,
      mask_root=mask_root if has_masks else None,
      mask_stems=lambda s: (s, s + '_mask'),
      expected_mask='{stem}.png (or {stem}_mask.png, any image extension)')


def _read_visa_csv(root: str) -> list[dict[str, str]]:
  path = os.path.join(root, VISA_SPLIT_CSV)
  if not os.path.isfile(path):
    raise ValueError(f'not a VisA layout: expected the split file {path}; {_listing(root)}; '
                     f'data.root looks like {_detect_layout(root)}')
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    columns = tuple(c.strip() for c in (reader.fieldnames or ()))
    if columns[:len(VISA_COLUMNS)] != VISA_COLUMNS:
      raise ValueError(f'VisA split file {path} has columns {columns}; expected {VISA_COLUMNS}')
    rows = []
    for line, row in enumerate(reader, start=2):
      row = {k.strip(): (v or '').strip() for k, v in row.items() if k is not None}
      if row['label'] not in VISA_LABELS:
        raise ValueError(f'VisA split file {path} line {line}: label {row["label"]!r} is not one '
                         f'of {tuple(VISA_LABELS)}')
      row['line'] = str(line)
      rows.append(row)
  return rows


def _visa_split(root: str, category: str, split: str) -> Split:
  rows = [r for r in _read_visa_csv(root) if r['object'] == category and r['split'] == split]
  csv_path = os.path.join(root, VISA_SPLIT_CSV)
  if not rows:
    raise ValueError(f'empty {split} set: {csv_path} has no rows with object={category!r}, '
                     f'split={split!r}')
  rows.sort(key=lambda r: r['image'])
  paths, labels, masks, types = [], [], [], []
  for r in rows:
    label = VISA_LABELS[r['label']]
    if split == 'train' and label:
      raise ValueError(f'{csv_path} line {r["line"]}: anomalous image {r["image"]} in the train '
                       'split (one-class training needs normal images only)')
    mask = None
    if label:
      if not r['mask']:
        raise ValueError(f'{csv_path} line {r["line"]}: anomalous image '
                         f'{os.path.join(root, r["image"])} has no mask path')
      mask = os.path.join(root, r['mask'])
      if not os.path.isfile(mask):
        raise ValueError(f'defective test image {os.path.join(root, r["image"])} has no '
                         f'ground-truth mask: expected {mask} ({csv_path} line {r["line"]})')
    paths.append(os.path.join(root, r['image']))
    labels.append(label)
    masks.append(mask)
    types.append('anomaly' if label else 'good')
  return Split(tuple(paths), np.asarray(labels, np.int32), tuple(masks), tuple(types), category,
               split)


# ------------------------------------------------------------------------------------ public API


def list_categories(data_cfg: Any) -> list[str]:
  """Categories to run: `data.categories`, or every category found under `data.root`.

  Raises:
    FileNotFoundError: root missing, or a requested category missing (names the expected path).
    ValueError: unknown `data.name`, or no category of the declared layout under the root.
  """
  name = _check_name(data_cfg.name)
  root = _check_root(data_cfg)
  requested = _requested(data_cfg)
  marker = {'btad': 'ok', 'folder': str(getattr(data_cfg, 'folder_good', 'good'))}.get(name, 'good')
  if name == 'visa':
    found = sorted({r['object'] for r in _read_visa_csv(root)})
  else:
    found = [c for c in _subdirs(root) if os.path.isdir(os.path.join(root, c, 'train', marker))]
  for c in requested:
    cat_dir = os.path.join(root, c)
    if not os.path.isdir(cat_dir):
      raise FileNotFoundError(f'category {c!r} not found: expected the folder {cat_dir}; '
                              f'categories found under {root}: {found}')
    if name == 'visa' and c not in found:
      raise ValueError(f'category {c!r} has no rows in {os.path.join(root, VISA_SPLIT_CSV)}; '
                       f'categories there: {found}')
  if requested:
    return requested
  if not found:
    expected = {'visa': f'{VISA_SPLIT_CSV} rows', 'btad': '<cat>/train/ok/',
                'folder': f'<cat>/train/{marker}/'}.get(name, '<cat>/train/good/')
    raise ValueError(f'no {name} categories under {root}: expected {expected}; {_listing(root)}; '
                     f'it looks like {_detect_layout(root)}')
  return found


def load_split(data_cfg: Any, category: str, split: str, *, check_files: bool = True) -> Split:
  """Lists one split of one category.

  Args:
    data_cfg: the `data` ConfigDict (name, root, folder_good, source; with source 'tfds' also
      tfds_data_dir: the split then comes from the prepared TFDS builder, see tfds_builders).
    category: category folder / VisA object name.
    split: 'train' or 'test'.
    check_files: read every image and mask header now, so that unreadable files and masks whose
      size differs from their image fail before any feature extraction.
  """
  name = _check_name(data_cfg.name)
  if getattr(data_cfg, 'source', 'files') == 'tfds':
    from pni_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    return tfds_builders.load_split(data_cfg, category, split)
  root = _check_root(data_cfg)
  _check_split(split)
  if name != 'visa' and not os.path.isdir(os.path.join(root, category)):
    raise FileNotFoundError(f'category {category!r} not found: expected the folder '
                            f'{os.path.join(root, category)}; {_listing(root)}')
  if name in ('mvtec', 'generated'):
    out = _mvtec_split(root, category, split)
  elif name == 'btad':
    out = _btad_split(root, category, split)
  elif name == 'folder':
    out = _folder_split(root, category, split, str(data_cfg.folder_good))
  else:
    out = _visa_split(root, category, split)
  if check_files:
    _check_files(out.paths, out.mask_paths)
  return out


def texture_categories(data_cfg: Any) -> tuple[str, ...]:
  """`data.texture_categories`, or (when None / absent) the dataset's own textures: MVTec AD's
  five, the generated set's weave and granite, none for the other layouts. A comma-separated
  string (from the command line) is split."""
  value = getattr(data_cfg, 'texture_categories', None)
  if value is None:
    return {'mvtec': MVTEC_TEXTURES, 'generated': GENERATED_TEXTURES}.get(data_cfg.name, ())
  if isinstance(value, str):
    value = (value,)
  return tuple(part.strip() for v in value for part in str(v).split(',') if part.strip())


def category_group(data_cfg: Any, category: str) -> str:
  """Report group of a category.

  'texture' for the categories of `texture_categories(data_cfg)`; otherwise VisA's 'single
  instance' / 'multiple instances' / 'complex structure' (paper Table 6) for VisA's names, and
  'object' for everything else.

  Args:
    data_cfg: the `data` config (name, texture_categories), or just a dataset name (then the
      dataset's own textures).
    category: the category name.
  """
  if isinstance(data_cfg, str):
    data_cfg = types.SimpleNamespace(name=data_cfg)
  _check_name(data_cfg.name)
  if category in texture_categories(data_cfg):
    return 'texture'
  if data_cfg.name == 'visa':
    return VISA_GROUPS.get(category, 'object')
  return 'object'
