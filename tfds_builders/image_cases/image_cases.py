"""TFDS builder for a user's own images, listed with their cases in `cases.csv`.

Input: `manual_dir/cases.csv` (comma- or tab-separated) with the columns

* `path`: the image file, relative to manual_dir or absolute; images may lie
  anywhere. Any format Pillow decodes (JPEG, PNG, BMP, TIFF, ...), or DICOM (a Part 10
  file, `DICM` after its preamble, whatever its name; read as `tfds_builders.dicom`
  reads it: the pixel data, MONOCHROME1 inverted, more than 8 bits scaled). `~` is the
  home directory; on Linux and macOS, `\\` separates folders as `/` does (a list
  made on Windows), and a file whose name matches only when letter case is
  ignored (`a.jpg` listed, `A.JPG` on disk) is read, with a warning.
* `case_id`: what groups images (a patient, a lesion, a study): the unit that
  splits keep together and that MICLe draws positive pairs from.
* exactly one of `label` (single-label: one class name per image) or `labels`
  (multi-label: `|`-separated class names, empty for no positive class); or
  neither, for a set of masks only (see Masks);
* optionally `split`: `train`, `validation` (or `val`, `valid`), `test` or
  `unlabeled` (or `unlabelled`), case-insensitive; empty: by case hash, as
  without the column.
* optionally `mask`: a binary mask image of the row's image (for segmentation,
  `trainer='segment'`), found as `path` is (relative to manual_dir or absolute,
  `~`, `\\`, letter case); any format Pillow decodes; any nonzero pixel is
  foreground (in any colour band; alpha is ignored; in a JPEG, 128 or more). It must
  have its image's size, as stored in the file: builds ignore EXIF orientation.
  With the column every labeled row names a mask; see Masks.

Other columns are ignored. The class names are the distinct names in the
file, sorted; they become `label` (`tfds.features.ClassLabel`) or `labels`
(float32 multi-hot vector, names in `metadata['label_names']`).

Because the features depend on the data, there is no predefined config:
`ImageCases.make_config(NAME, manual_dir=DIR)` reads cases.csv and returns an
`ImageCasesConfig` holding the class names, whether the data is multi-label,
the number of channels and whether there are masks. NAME is any name matching `[A-Za-z0-9_.-]+`, so
one data dir can hold several private sets (`image_cases/derm_2024`); without
one it is `original`, or `side<N>` with `max_side=N`. `original` and
`side<N>` imply their max_side; another name stores images as published
unless `max_side` is given.

Channels: images are stored with 1 channel when the first (up to 16) listed
images that exist and decode are all grayscale, in a gray mode or with equal
red, green and blue everywhere (e.g. X-rays saved as RGB); else with 3 (gray
images replicated). A later colour image in a set stored gray is stored as gray
(luma), with a warning, and listed in `metadata['gray_converted_images']` (count in
`metadata['num_gray_converted_images']`).

Splits. Without a `split` column, by case: the case's SHA-256 hash bucket
`int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100` gives 0-79
`train`, 80-89 `validation`, 90-99 `test` (`tfds_builders.common.hash_split`).
With one, as given (an empty cell: by case hash); a case in two of `train`,
`validation` and `test` is an error. A split with no images is left out.

Unlabeled images (for pretraining: `data.train_split='train+unlabeled'`) are the
rows whose split is `unlabeled`; their `label` or `labels` cell must be empty.
They are stored with `label` -1 or `labels` all NaN (unknown), and fine-tuning
refuses the split. An unlabeled image of a case that has labeled images in
`validation` or `test` is left out, with a warning, so that no validation or test
case is seen in pretraining; such images are listed in
`metadata['unlabeled_images_left_out']` (count in
`metadata['num_unlabeled_images_left_out']`). An unlabeled image of a `train`
case is kept: in `train+unlabeled`, MICLe pairs it with the case's training images.

Masks. With a `mask` column the records gain a `mask` feature (without it the
features, and so earlier builds and configs, are as before): a single-channel
8-bit PNG of the stored image's size, 0 (background) or 255 (foreground), as
`ham10000` stores its lesion masks: resized with the image (nearest neighbour,
so it stays binary) when max_side downscales it; the file's bytes when it
already is such a PNG. A missing or undecodable mask is an error, or its row is
skipped with `skip_bad_images`, as for an image. A row of split `unlabeled` has
no annotation: its mask cell must be empty, as its label cell is, and its
record's mask is all 0 (a placeholder: training on masks and evaluation refuse
the `unlabeled` split, so nothing reads it as a target). The config records
whether the set has masks (`ImageCasesConfig.masks`), and a build is tied to its
cases.csv (MD5 in `metadata.json`), so a build without masks is not reused for a
cases.csv that has gained the column.

A set of masks only (segmentation without classes) has a `mask` column and neither
`label` nor `labels`: every row outside split `unlabeled` names its mask, and the
records have no class feature (`ImageCasesConfig.class_names` is empty;
`supervised_keys` are image and mask). The segment trainer reads it; fine-tuning
and linear evaluation refuse it, naming the missing label feature.

Records: `image` (the file's bytes when it already is an 8-bit JPEG or PNG in
the stored mode and within max_side, else converted and re-encoded: PNG stays
PNG, anything else becomes JPEG; the feature's `encoding_format='jpeg'` is only
what TFDS would use for arrays), `image_id` (the path as written in cases.csv,
also the example key), `case_id`, `label` or `labels` (unless masks only), and
`mask` with a mask column.

Errors are one-line `bigssl_med.errors.DataError`s naming cases.csv and the
line: text that is not UTF-8, missing columns, both of `label` and `labels` (or
neither, without a `mask` column), an empty path, case_id or label, a label on an unlabeled row, an
unknown split, a Windows drive path (`C:\\...`) on another system, a path listed
twice (both lines named), a class name or case_id spelled two ways, no labeled
(or annotated) row, an empty mask cell on a labeled row or a mask on an unlabeled one, a mask
of another size than its image (both sizes named; with `skip_bad_images` too), a
missing or undecodable image or mask (the row skipped and listed in the metadata
instead with `skip_bad_images`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
from typing import Callable, Iterable, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from bigssl_med.data import splits
from bigssl_med.errors import DataError
from tfds_builders import common
from tfds_builders import dicom

CASES_FILE = 'cases.csv'
REQUIRED_COLUMNS = ('path', 'case_id')
UNLABELED = splits.UNLABELED
SPLIT_NAMES = ('train', 'validation', 'test', UNLABELED)
SPLIT_ALIASES = {'train': 'train', 'validation': 'validation',
                 'val': 'validation', 'valid': 'validation', 'test': 'test',
                 UNLABELED: UNLABELED, 'unlabelled': UNLABELED}
# Splits whose cases no unlabeled image may share (they would be seen in pretraining).
HELD_OUT_SPLITS = ('validation', 'test')
# metadata.json: the MD5 of the cases.csv a build was made from.
CASES_DIGEST = 'cases_csv_md5'
# How many listed images (that exist and decode) decide the channel count.
CHANNEL_PROBES = 16
_CONFIG_NAME_RE = re.compile(r'^[A-Za-z0-9_.-]+$')

_DESCRIPTION = """\
Images of the user's own data set, listed with their cases, class labels and
optionally binary masks in cases.csv (see the `tfds_builders.image_cases` module
docstring).
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put a cases.csv in a directory and pass that directory as --manual_dir. Columns:
path (relative to that directory, or absolute), case_id, and label (one class)
or labels (|-separated classes); optionally split (train/validation/test, or
unlabeled for images without a label) and mask (a binary mask image of the row's
image, for segmentation; with a mask column, label and labels may both be left out).
"""


@dataclasses.dataclass
class ImageCasesConfig(common.ImageConfig):
  """Config of `ImageCases`, made from cases.csv by `ImageCases.make_config`.

  Attributes:
    class_names: the sorted class names found in cases.csv; empty for a set of masks
      only (no `label` or `labels` column).
    multi_label: True for a `labels` column, False for `label` (or none).
    channels: 1 or 3, the channels images are stored with.
    masks: True for a `mask` column: records have a `mask` feature.
  """
  class_names: tuple[str, ...] = ()
  multi_label: bool = False
  channels: int = 3
  masks: bool = False

  @property
  def has_classes(self) -> bool:
    """Whether records have `label` or `labels` (False: masks only)."""
    return bool(self.class_names)


@dataclasses.dataclass(frozen=True)
class Case:
  """One row of cases.csv.

  Attributes:
    line: its line number (the header is line 1).
    path: the image path as written.
    file: the image path resolved against manual_dir, normalised.
    case_id: the case.
    labels: its class names (one for single-label data; none when unlabeled or in a
      set of masks only).
    split: 'train', 'validation', 'test' or 'unlabeled'.
    hashed: whether the split comes from the case hash (no split given).
    mask_path: the mask path as written ('' for none).
    mask_file: the mask path resolved as `file` is; None for none.
  """
  line: int
  path: str
  file: str
  case_id: str
  labels: tuple[str, ...]
  split: str
  hashed: bool = False
  mask_path: str = ''
  mask_file: str | None = None

  @property
  def labeled(self) -> bool:
    return self.split != UNLABELED


@dataclasses.dataclass(frozen=True)
class CasesTable:
  """cases.csv, read and checked.

  Attributes:
    path: the file.
    cases: its rows to store, in order.
    class_names: the sorted class names; empty for a set of masks only.
    multi_label: whether it has a `labels` column (else `label`, or neither).
    has_split: whether it has a `split` column.
    left_out: the unlabeled rows left out, their cases being in validation or test.
    has_mask: whether it has a `mask` column.
  """
  path: str
  cases: list[Case]
  class_names: tuple[str, ...]
  multi_label: bool
  has_split: bool
  left_out: list[Case] = dataclasses.field(default_factory=list)
  has_mask: bool = False


def read_cases(manual_dir: str) -> CasesTable:
  """Reads and checks `manual_dir/cases.csv`.

  Raises:
    DataError: the file is missing, is not UTF-8 or has no labeled rows; it
      misses `path` or `case_id`, has both of `label` and `labels` or neither
      without a `mask` column; or
      a row has an empty path, case_id or label, a label though unlabeled, an
      unknown split, a Windows drive path (on another system) or a path listed
      before, an empty mask cell though labeled or a mask though unlabeled (with a
      `mask` column), spells a class name or case_id another way, or puts a case
      in two of train, validation and test. Messages name the file and line.
  """
  path = os.path.join(manual_dir, CASES_FILE)
  if not os.path.isfile(path):
    raise DataError(f'{path} not found: image_cases reads its images from a '
                    f'{CASES_FILE} in manual_dir (columns path, case_id, '
                    'label or labels, optional split)')
  columns, rows = common.read_table(path, REQUIRED_COLUMNS)
  has_label, has_labels = 'label' in columns, 'labels' in columns
  has_split, has_mask = 'split' in columns, 'mask' in columns
  if has_label and has_labels:
    raise DataError(f'{path}: has both of the columns label and labels; give '
                    'exactly one: label (one class per image) or labels '
                    '(|-separated classes, multi-label)')
  if not (has_label or has_labels or has_mask):
    raise DataError(f'{path}: has neither of the columns label and labels; give '
                    'exactly one: label (one class per image) or labels '
                    '(|-separated classes, multi-label), or a mask column for a set '
                    'of masks only')
  label_column = 'labels' if has_labels else 'label' if has_label else None
  cases, seen = [], {}
  for row in rows:
    case = _parse_row(row, path, manual_dir, label_column=label_column,
                      has_split=has_split, has_mask=has_mask)
    earlier = seen.get(case.file)
    if earlier is not None:
      raise DataError(f'{row.where(path)}: image {case.path} is already listed on '
                      f'line {earlier.line} ({earlier.path})')
    seen[case.file] = case
    cases.append(case)
  if not cases:
    raise DataError(f'{path}: no rows after the header')
  _check_one_spelling(cases, path, multi_label=has_labels)
  labeled = [c for c in cases if c.labeled]
  if not labeled:
    need = ('labeled images too (they make the class names)' if label_column else
            'images with masks too')
    raise DataError(f'{path}: every row is split {UNLABELED}; image_cases needs {need}')
  if has_split:
    common.check_case_disjoint(
        (c.case_id, c.split, f'{path} line {c.line}' + (' by case hash' if c.hashed else ''))
        for c in labeled)
  class_names = tuple(sorted({name for c in labeled for name in c.labels}))
  if label_column and not class_names:
    raise DataError(f'{path}: no class names in column labels (every row is '
                    'empty)')
  held_out = {c.case_id for c in labeled if c.split in HELD_OUT_SPLITS}
  left_out = [c for c in cases if not c.labeled and c.case_id in held_out]
  if left_out:
    cases = [c for c in cases if c.labeled or c.case_id not in held_out]
  return CasesTable(path=path, cases=cases, class_names=class_names,
                    multi_label=has_labels, has_split=has_split, left_out=left_out,
                    has_mask=has_mask)


def _spelling_key(name: str) -> str:
  """What two spellings of one name share: letter case aside, and a number's value
  (`1` and `1.0`)."""
  try:
    return repr(float(name))
  except ValueError:
    return name.casefold()


def _check_one_spelling(cases: Sequence[Case], path: str, *, multi_label: bool) -> None:
  """Fails when a class name or a case id is spelled two ways (`Melanoma` and
  `melanoma`, `1` and `1.0`; `HAM_1` and `ham_1`, `13` and `13.0` as a spreadsheet
  may write it): as two classes, or a case split over two splits, it would be silently
  wrong. Warns about a multi-label class name holding `;` or `,` (classes are
  separated by `|`)."""
  _check_spellings(((name, c.line) for c in cases for name in c.labels), 'class name',
                   _spelling_key, path)
  _check_spellings(((c.case_id, c.line) for c in cases), 'case_id', _spelling_key, path)
  odd = [(name, c.line) for c in cases for name in c.labels if ';' in name or ',' in name]
  if multi_label and odd:
    logging.warning('%s line %d: class name %r holds a separator; labels separates '
                    'classes with |', path, odd[0][1], odd[0][0])


def _check_spellings(names: Iterable[tuple[str, int]], what: str,
                     key: Callable[[str], str], path: str) -> None:
  """Fails at the first `(name, line)` whose `key` an earlier, other name shares."""
  first = {}
  for name, line in names:
    seen, seen_line = first.setdefault(key(name), (name, line))
    if seen != name:
      raise DataError(f'{path} line {line}: {what} {name!r} is {seen!r} (line '
                      f'{seen_line}) spelled another way; spell it one way')


def detect_channels(cases: Sequence[Case], probes: int = CHANNEL_PROBES) -> int:
  """1 when the first `probes` listed images that exist and decode are gray.

  Images that are missing or cannot be decoded are passed over (the build
  reports them); with none to look at, 3.
  """
  looked, finder = 0, common.CaseBlindFinder()
  for case in cases:
    if looked == probes:
      break
    try:
      data = common.read_image_file(finder.find(case.file), '')  # DICOM: as PNG
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        gray = common.is_grayscale(image)
    except (DataError, OSError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError):
      continue
    if not gray:
      return 3
    looked += 1
  return 1 if looked else 3


def check_config_name(name: str) -> str:
  """Returns `name` if usable as a config (and directory) name.

  Raises:
    DataError: `name` does not match `[A-Za-z0-9_.-]+` or is only dots.
  """
  if not _CONFIG_NAME_RE.match(name) or not name.strip('.'):
    raise DataError(f'image_cases config name {name!r} is not usable: use letters, '
                    'digits, _, . and - (e.g. image_cases/derm_2024)')
  return name


class ImageCases(common.ImageBuilder):
  """A user's images with case ids, class labels and optionally masks, listed in cases.csv.

  Build with `python -m bigssl_med.build_data image_cases[/NAME] --manual_dir=DIR`
  (see the module docstring). Splits: the `split` column, else case-hash
  80/10/10. Example keys are the image paths as written in cases.csv. With a `mask`
  column records have a binary `mask` (what `trainer='segment'` reads).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Images, case ids and single- or multi-label classes from '
               'cases.csv.',
  }
  # Names the default config directory (`original`); the configs that builds
  # use are made from the data by `make_config`.
  BUILDER_CONFIGS = [ImageCasesConfig(name=common.ORIGINAL)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  @classmethod
  def get_builder_config(cls, name, version=None):
    """None: no config is predefined.

    TFDS refuses a config object that shares a name with a listed one; every
    `ImageCasesConfig` is made from the data, so none is listed for TFDS.
    """
    del name, version
    return None

  @classmethod
  def make_config(cls, config: str | None = None, *,
                  max_side: int | None = None,
                  manual_dir: str | None = None) -> ImageCasesConfig:
    """Reads `manual_dir/cases.csv` and returns the config to build it with.

    Args:
      config: the config name: `original`, `side<N>` or any other name matching
        `[A-Za-z0-9_.-]+`; None for `original`, or `side<max_side>`.
      max_side: longest stored side; must agree with `config` when that is
        `original` or `side<N>`.
      manual_dir: the directory with cases.csv (required).

    Raises:
      DataError: no manual_dir, a bad config name or max_side, or a bad
        cases.csv (see `read_cases`).
    """
    if manual_dir is None:
      raise DataError('image_cases needs --manual_dir: a directory with a '
                      f'{CASES_FILE} listing the images (columns path, case_id, '
                      'label or labels, optional split)')
    if config is None or common.is_size_name(config):
      sized = super().make_config(config, max_side=max_side)
      name, max_side = sized.name, sized.max_side
    else:
      name = check_config_name(config)
      if max_side is not None:  # Checks it as for any image builder.
        max_side = super().make_config(None, max_side=max_side).max_side
    table = read_cases(os.fspath(manual_dir))
    channels = detect_channels(table.cases)
    kind = ('masks only' if not table.class_names else
            'multi-label' if table.multi_label else 'single-label')
    size = ('as published' if max_side is None else
            f'downscaled to a longest side of at most {max_side}')
    masks = ', with binary masks' if table.has_mask and table.class_names else ''
    classes = f'{len(table.class_names)} classes, ' if table.class_names else ''
    return ImageCasesConfig(
        name=name, max_side=max_side, class_names=table.class_names,
        multi_label=table.multi_label, channels=channels, masks=table.has_mask,
        description=(f'{len(table.cases)} images from {table.path}, {kind}, '
                     f'{classes}{channels} channel(s){masks}, '
                     f'stored {size}.'))

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if not isinstance(config, ImageCasesConfig) or not (config.has_classes or config.masks):
      raise DataError('image_cases has no predefined config: make one from the '
                      'data with ImageCases.make_config(NAME, manual_dir=DIR), '
                      'or build with python -m bigssl_med.build_data '
                      'image_cases[/NAME] --manual_dir=DIR')
    metadata = self.new_metadata()
    if config.channels == 1:
      metadata.update(num_gray_converted_images=0, gray_converted_images=[])
    features = {
        'image': tfds.features.Image(
            shape=(None, None, config.channels), encoding_format='jpeg',
            doc='The image: its file bytes, or converted and re-encoded (PNG '
                'stays PNG, other formats become JPEG).'),
        'image_id': tfds.features.Text(doc='The path as written in cases.csv.'),
        'case_id': tfds.features.Text(doc='The case: the grouping unit.'),
    }
    supervised_keys = ('image', 'mask')  # a set of masks only
    if config.has_classes and config.multi_label:
      metadata['label_names'] = list(config.class_names)
      features['labels'] = tfds.features.Tensor(
          shape=(len(config.class_names),), dtype=np.float32,
          doc="Multi-hot classes, in the order of metadata['label_names'].")
      supervised_keys = ('image', 'labels')
    elif config.has_classes:
      features['label'] = tfds.features.ClassLabel(
          names=config.class_names, doc='The class (cases.csv column label).')
      supervised_keys = ('image', 'label')
    if config.masks:
      features['mask'] = tfds.features.Image(
          shape=(None, None, 1), encoding_format='png',
          doc='Binary mask of the image, its size (0 background, 255 foreground); '
              'all 0 on unlabeled rows, which have none.')
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=supervised_keys,
        metadata=metadata,
    )

  @classmethod
  def check_unchanged(cls, version_dir: str, manual_dir: str) -> None:
    """Fails when the build in `version_dir` was made from another `cases.csv` than
    `manual_dir`'s (edited since), so that an edit is never silently ignored."""
    path = os.path.join(manual_dir, CASES_FILE)
    try:
      with open(os.path.join(version_dir, 'metadata.json')) as f:
        recorded = json.load(f).get(CASES_DIGEST)
    except (OSError, ValueError):
      return
    if recorded and os.path.isfile(path) and common.md5_file(path) != recorded:
      raise DataError(f'{version_dir} was built from another version of {path} (it has '
                      'changed since): rebuild it with --overwrite, or build under a new '
                      'name (image_cases/NAME)')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = common.manual_dir_or_none(dl_manager)
    if manual_dir is None:
      raise DataError('image_cases needs --manual_dir: a directory with a '
                      f'{CASES_FILE} listing the images')
    table = read_cases(manual_dir)
    self.info.metadata[CASES_DIGEST] = common.md5_file(table.path)
    self.info.metadata['num_unlabeled_images_left_out'] = len(table.left_out)
    self.info.metadata['unlabeled_images_left_out'] = [
        {'path': c.path, 'where': f'{table.path} line {c.line}', 'case_id': c.case_id}
        for c in table.left_out]
    if table.left_out:
      first = table.left_out[0]
      logging.warning('%s: %d unlabeled image(s) left out, their cases having labeled '
                      'images in validation or test (first: line %d, case %s)',
                      table.path, len(table.left_out), first.line, first.case_id)
    config = self.builder_config
    if (table.class_names != tuple(config.class_names) or
        table.multi_label != config.multi_label or table.has_mask != config.masks):
      raise DataError(f'{table.path} has changed since config {config.name} was '
                      'made from it (class names, label column or mask column differ); '
                      'make the config again')
    by_split = collections.defaultdict(list)
    for case in table.cases:
      by_split[case.split].append(case)
    empty = [split for split in SPLIT_NAMES if split != UNLABELED and not by_split[split]]
    if empty:  # TFDS cannot write an empty split.
      logging.warning('image_cases from %s: no images in split(s) %s; they are '
                      'left out.', table.path, ', '.join(empty))
    store = self.image_store(channels=config.channels)
    files = _ListedFiles()
    return {
        split: self._generate_examples(by_split[split], split, store, table.path, files)
        for split in SPLIT_NAMES if by_split[split]
    }

  def _generate_examples(self, cases: Sequence[Case], split: str,
                         store: common.ImageStore, cases_path: str, files: '_ListedFiles'):
    config = self.builder_config
    index = {name: i for i, name in enumerate(config.class_names)}
    converted = self.info.metadata.get('gray_converted_images')
    def load(case):  # on a worker thread: Failed, or (image, whether colour, file, mask, file)
      where, file = f'{cases_path} line {case.line}', files.find(case.file)
      if config.channels == 1:
        loaded = store.try_load_gray(file, where=where)
      else:
        loaded = store.try_load(file, where=where)
        loaded = loaded if isinstance(loaded, common.Failed) else (loaded, False)
      if isinstance(loaded, common.Failed):
        return loaded
      mask, mask_file = None, None
      if config.masks and case.mask_file is None:  # unlabeled: no annotation
        mask = empty_mask(common.encoded_size(loaded[0]))
      elif config.masks:
        mask_file = files.find(case.mask_file)
        size, orientation = _file_image_info(file, where)
        mask = _try_load_mask(mask_file, where, stored_size=common.encoded_size(loaded[0]),
                              image_size=size, orientation=orientation)
        if isinstance(mask, common.Failed):
          return mask
      return loaded + (file, mask, mask_file)

    other_case = []
    for case, (image, colour, file, mask, mask_file) in store.each(
        cases, load, split=split, what=f'image_cases {split}'):
      where = f'{cases_path} line {case.line}'
      files.claim(file, case, where)
      if file != case.file:
        other_case.append((where, file))
      if mask_file is not None and mask_file != case.mask_file:
        other_case.append((where, mask_file))
      if colour:
        logging.warning('%s (%s) is a colour image; the set is stored gray (its first '
                        'images are), so it is stored as gray (luma)', case.file, where)
        converted.append({'split': split, 'path': case.path, 'where': where})
        self.info.metadata['num_gray_converted_images'] = len(converted)
      example = {'image': image, 'image_id': case.path, 'case_id': case.case_id}
      if config.masks:
        example['mask'] = mask
      if config.has_classes and config.multi_label:
        labels = np.zeros(len(config.class_names), dtype=np.float32)
        if not case.labeled:
          labels[:] = np.nan
        for name in case.labels:
          labels[index[name]] = 1.0
        example['labels'] = labels
      elif config.has_classes:
        example['label'] = case.labels[0] if case.labeled else -1
      yield case.path, example
    common.warn_found_ignoring_case(other_case, f'image_cases {split}', cases_path)


def _file_image_info(path: str, where: str) -> tuple[tuple[int, int], int]:
  """The (width, height) and EXIF orientation (1 without) of the image file `path` (a
  DICOM file's from its header)."""
  try:
    with open(path, 'rb') as f:
      if dicom.is_dicom(f.read(132)):
        header = dicom.read_header(path, where)
        return (header.columns, header.rows), 1
    with Image.open(path) as image:
      return image.size, int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
    raise DataError(f'{where}: cannot read image file {path} ({common.one_line(exc)})') from exc


def empty_mask(size: tuple[int, int]) -> bytes:
  """A mask of `size` (width, height) that is 0 everywhere, as 8-bit PNG bytes."""
  buffer = io.BytesIO()
  Image.new('L', size, 0).save(buffer, format='PNG')
  return buffer.getvalue()


# EXIF orientations other than 1 (as stored) turn or mirror the displayed picture.
_ORIENTATION_TAG = 0x0112
MaskSizeError = common.MaskSizeError


def load_mask(path: str, where: str, *, stored_size: tuple[int, int],
              image_size: tuple[int, int], orientation: int = 1) -> bytes:
  """Returns the stored mask of the mask file `path`: single-channel 8-bit PNG bytes.

  Any nonzero pixel is foreground (255; in a JPEG mask, 128 or more), the rest
  background (0). The file's bytes
  are returned unchanged when it already is such a PNG (mode 'L', values 0 and 255)
  of the stored image's size; otherwise the binary mask is resized to `stored_size`
  with the nearest-neighbour filter (values stay 0 and 255) and encoded as PNG, as
  `ham10000` stores its masks.

  Args:
    path: the mask file.
    where: the cases.csv line naming it, for error messages.
    stored_size: the (width, height) of the stored image.
    image_size: the (width, height) of the image file; the mask must have it.
    orientation: the image's EXIF orientation. Builds store pixels as they are in the
      file, whatever it says, so the mask must match those: a warning where the image
      would be displayed turned or mirrored, and a hint in the size error where the
      mask has the turned image's size.

  Raises:
    DataError: the file is missing, unreadable or not a decodable image, or its size
      differs from `image_size`.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise DataError(f'{where}: mask file {path} not found') from None
  except OSError as exc:
    raise DataError(f'{where}: cannot read mask file {path} ({common.one_line(exc)})') from exc
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      size, foreground = image.size, common.mask_foreground(image)
      # Already what is stored: an 8-bit gray PNG of 0 and 255 only.
      binary = (image.format == 'PNG' and image.mode == 'L' and
                np.isin(np.asarray(image), (0, 255)).all())
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
    raise DataError(f'{where}: cannot decode mask file {path} '
                    f'({common.one_line(exc)})') from exc
  turned = orientation not in (None, 1)
  if size != image_size:
    hint = ''
    if turned and size == image_size[::-1]:
      hint = (f'; the image has EXIF orientation {orientation}, which builds ignore: the '
              'mask must match its pixels as stored, not as displayed')
    raise MaskSizeError(f'{where}: mask {path} is {size[0]}x{size[1]} but its image is '
                        f'{image_size[0]}x{image_size[1]}{hint}')
  if turned:
    logging.warning('%s: the image has EXIF orientation %d, which builds ignore; its mask %s '
                    'must match its pixels as stored, not as displayed', where, orientation,
                    path)
  if binary and size == stored_size:
    return data
  return common.encode_mask(foreground, stored_size)


def _try_load_mask(path: str, where: str, *, stored_size: tuple[int, int],
                   image_size: tuple[int, int], orientation: int = 1) -> bytes | common.Failed:
  """`load_mask`, or the `Failed` record of a missing or undecodable mask (thread-safe).

  Raises:
    MaskSizeError: the mask's size is not its image's.
  """
  try:
    return load_mask(path, where, stored_size=stored_size, image_size=image_size,
                     orientation=orientation)
  except MaskSizeError:
    raise
  except DataError as exc:
    return common.Failed(path, where, exc)


class _ListedFiles:
  """The files that rows name, found letter case aside where need be; one file per row."""

  def __init__(self):
    self._finder = common.CaseBlindFinder()
    self._claimed: dict[str, str] = {}

  def find(self, file: str) -> str:
    """`file`, or the one file it names letter case aside (thread-safe)."""
    return self._finder.find(file)

  def claim(self, file: str, case: Case, where: str) -> None:
    """Records that the row `where` stores `file`.

    Raises:
      DataError: another row stores it (its path spelled in other letter case).
    """
    earlier = self._claimed.setdefault(file, where)
    if earlier != where:
      raise DataError(f'{where}: image {case.path} is the file of {earlier} ({file}) in '
                      'other letter case; list each image once')


def _parse_row(row: common.Row, path: str, manual_dir: str, *, label_column: str | None,
               has_split: bool, has_mask: bool = False) -> Case:
  """Checks one row of cases.csv (`label_column`: label, labels, or None for masks only)."""
  where = row.where(path)
  image_path, case_id = row.get('path'), row.get('case_id')
  if not image_path:
    raise DataError(f'{where}: empty path')
  if not case_id:
    raise DataError(f'{where}: empty case_id')
  text = row.get('split') if has_split else ''
  hashed = not text
  split = common.hash_split(case_id) if hashed else SPLIT_ALIASES.get(text.lower())
  if split is None:
    raise DataError(f'{where}: unknown split {text!r}; expected train, validation (or '
                    f'val, valid), test, {UNLABELED}, or empty (by case hash)')
  column = label_column
  text = row.get(column) if column else ''
  if column is None:
    labels = ()
  elif split == UNLABELED:
    if text:
      raise DataError(f'{where}: {column} {text!r} on a row of split {UNLABELED}; leave '
                      f'{column} empty for an image without a label, or give the row '
                      'another split')
    labels = ()
  elif column == 'labels':
    labels = tuple(name.strip() for name in text.split('|')) if text else ()
    if not all(labels):
      raise DataError(f'{where}: empty class name in labels {text!r}')
    labels = tuple(sorted(set(labels)))
  else:
    if not text:
      raise DataError(f'{where}: empty label (an image without a label goes in split '
                      f'{UNLABELED})')
    labels = (text,)
  mask_path = row.get('mask') if has_mask else ''
  if has_mask and split == UNLABELED and mask_path:
    raise DataError(f'{where}: mask {mask_path!r} on a row of split {UNLABELED}; an image '
                    'without a label has no annotation (leave mask empty), or give the row '
                    'another split')
  if has_mask and split != UNLABELED and not mask_path:
    raise DataError(f'{where}: empty mask; with a mask column every labeled row names its '
                    f'mask image (only rows of split {UNLABELED} leave it empty)')
  mask_file = common.listed_file(mask_path, manual_dir, where) if mask_path else None
  return Case(line=row.line, path=image_path,
              file=common.listed_file(image_path, manual_dir, where), case_id=case_id,
              labels=labels, split=split, hashed=hashed, mask_path=mask_path,
              mask_file=mask_file)
