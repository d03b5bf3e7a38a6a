"""TFDS builder for NIH ChestX-ray14: frontal chest X-rays with 14 finding labels.

Input (found by walking `manual_dir`, so folder names and nesting do not matter):

* The label file, `Data_Entry_2017_v2020.csv` or `Data_Entry_2017.csv` (the
  2020 name wins when both exist): one row per image with the columns
  `Image Index`, `Finding Labels`, `Follow-up #`, `Patient ID`, `Patient Age`,
  `Patient Gender` (`Patient Sex` in some copies; either is accepted) and
  `View Position`. The published header also names
  `OriginalImage[Width,Height]` and `OriginalImagePixelSpacing[x,y]`; as those
  names hold an unquoted comma, a CSV reader sees four columns
  (`OriginalImage[Width`, `Height]`, `OriginalImagePixelSpacing[x`, `y]`) that
  line up with the two values each row has there, and the 2017 file ends
  every line with a comma (an empty last column). These columns are not used.
* The official split, `train_val_list.txt` and `test_list.txt`: one image
  file name per line.
* The images, as unpacked from the twelve `images_XXX.tar.gz` archives
  (`images_001/images/00000001_000.png`, ...). Every `*.png` under manual_dir
  is indexed by file name; when a name occurs twice the first path in sorted
  walk order is used.

Labels. `Finding Labels` is `|`-separated findings out of `FINDINGS`, or
`No Finding`; `labels` is their multi-hot vector in the order of `FINDINGS`
(also stored as `metadata['label_names']`), so `No Finding` is all zeros.
An unknown finding stops the build with an error naming the file and line.

Patients. `case_id` is the `Patient ID` zero-padded to 8 digits (`1` ->
`00000001`), the form it has in the image file names; a non-numeric id is
kept as written.

Splits. `test_list.txt` gives `test`. `train_val_list.txt` is divided by
patient into `train` and `validation`, from the patient's hash bucket
`int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100`: buckets 0-89
`train`, 90-99 `validation` (`tfds_builders.common.hash_bucket`). A patient in
both lists is an error. Label-file rows in neither list are left out and
counted in `metadata['num_unlisted']`; a listed image missing from the label
file is an error. A listed image whose file is missing or cannot be decoded is
an error, or, with `skip_bad_images`, a skipped record listed in the metadata.

Images are stored as single-channel 8-bit PNG (the few RGBA originals are
converted to gray), downscaled to a longest side of 512 in the default
`side512` config, as published (1024x1024) in `original`, or to `side<N>`.

Without manual_dir the builder downloads the release; see `IMAGE_ARCHIVE_URLS`
and `TABLE_URLS` for where from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Iterable, NamedTuple, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from bigssl_med import files
from bigssl_med.errors import DataError
from tfds_builders import common

FINDINGS = ('Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass',
            'Nodule', 'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema',
            'Emphysema', 'Fibrosis', 'Pleural_Thickening', 'Hernia')
NO_FINDING = 'No Finding'
# Names of the label file, preferred first.
LABELS_FILE_NAMES = ('Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv')
TRAIN_VAL_LIST = 'train_val_list.txt'
TEST_LIST = 'test_list.txt'
REQUIRED_COLUMNS = ('Image Index', 'Finding Labels', 'Follow-up #', 'Patient ID',
                    'Patient Age', 'View Position')
SEX_COLUMNS = ('Patient Gender', 'Patient Sex')
SPLIT_NAMES = ('train', 'validation', 'test')
# Patients of train_val_list.txt whose hash bucket is at least this go to
# 'validation', the others to 'train'.
VALIDATION_FROM_BUCKET = 90

# Public download, not checked from this project (no network when written).
# The twelve image archives on NIH's Box (https://nihcc.app.box.com/v/ChestXray-
# NIHCC, folder `images`), in order images_001.tar.gz ... images_012.tar.gz: the
# links NIH's `batch_download_zips.py` uses, identical in several public
# repositories' copies of that script.
_BOX = 'https://nihcc.box.com/shared/static/'
IMAGE_ARCHIVE_URLS = tuple(_BOX + name + '.gz' for name in (
    'vfk49d74nhbxq3nqjg0900w5nvkorp5c',
    'i28rlmbvmfjbl8p2n3ril0pptcmcu9d1',
    'f1t00wrtdk94satdfb9olcolqx20z2jp',
    '0aowwzs5lhjrceb3qp67ahp0rd1l1etg',
    'v5e3goj22zr6h8tzualxfsqlqaygfbsn',
    'asi7ikud9jwnkrnkj99jnpfkjdes7l6l',
    'jn1b4mw4n6lnh74ovmcjb8y48h8xj07n',
    'tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j',
    'upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj',
    'l6nilvfa9cg3s28tqv1qc1olm3gnz54p',
    'hhq8fkdgvcari67vfhs7ppg2w6ni4jze',
    'ioqwiy20ihqwyr8pf4c24eazhh281pbu',
))
# NIH's Box has no public static links for the label file and the split lists
# that we could find; these come from a third-party mirror of the release on
# the Hugging Face Hub (alkzar90/NIH-Chest-X-ray-dataset), which public code
# downloads them from. Not NIH's own copy: prefer --manual_dir with the files
# from NIH's Box where that matters.
_MIRROR = 'https://huggingface.co/datasets/alkzar90/NIH-Chest-X-ray-dataset/resolve/main/data/'
TABLE_URLS = {
    'labels': _MIRROR + 'Data_Entry_2017_v2020.csv',
    'train_val': _MIRROR + TRAIN_VAL_LIST,
    'test': _MIRROR + TEST_LIST,
}

_MISSING_AGE = frozenset({'', 'na', 'nan', 'null', 'none'})
# Ages are years, written `58` or, in early copies, `058Y`.
_AGE_RE = re.compile(r'^(?P<years>[0-9]+(?:\.[0-9]*)?)\s*[Yy]?$')
_PNG_RE = re.compile(r'\.png$', re.IGNORECASE)

_DESCRIPTION = """\
NIH ChestX-ray14 (the extended ChestX-ray8): 112,120 frontal chest X-rays of
30,805 patients from the NIH Clinical Center, each with the findings that
natural-language processing extracted from its radiology report, out of 14
thoracic findings (atelectasis, cardiomegaly, effusion, infiltration, mass,
nodule, pneumonia, pneumothorax, consolidation, edema, emphysema, fibrosis,
pleural thickening, hernia) or none. `labels` is the multi-hot vector of the
findings (names in metadata['label_names']); `case_id` is the patient, the unit
that groups follow-up images.

Splits: the official patient-disjoint test list gives `test`; the official
train/validation list is divided by a SHA-256 hash of the patient id into
`train` (90% of patients) and `validation` (10%).
"""

_CITATION = """\
@inproceedings{wang2017chestxray8,
  title={{ChestX-ray8}: Hospital-scale chest X-ray database and benchmarks on
         weakly-supervised classification and localization of common thorax
         diseases},
  author={Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and
          Bagheri, Mohammadhadi and Summers, Ronald M.},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={3462--3471},
  year={2017}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download from https://nihcc.app.box.com/v/ChestXray-NIHCC the label file
(Data_Entry_2017_v2020.csv or Data_Entry_2017.csv), train_val_list.txt,
test_list.txt and the twelve images_XXX.tar.gz archives, unpack the archives
next to the other files (any folder layout works) and pass that directory as
--manual_dir.
"""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the label file; `line` is its line number in that file."""
  line: int
  image_id: str
  case_id: str
  findings: tuple[str, ...]
  follow_up: int
  age: float
  sex: str
  view_position: str


class Inputs(NamedTuple):
  """Where the raw files are: label file, split lists, folders with images."""
  labels: str
  train_val: str
  test: str
  roots: Sequence[str]


def case_id_of(patient_id: str) -> str:
  """`Patient ID` as `case_id`: digits zero-padded to 8, anything else as is."""
  patient_id = patient_id.strip()
  is_number = patient_id.isascii() and patient_id.isdigit()
  return f'{int(patient_id):08d}' if is_number else patient_id


def train_val_split(case_id: str) -> str:
  """'train' or 'validation' for a patient of `train_val_list.txt`."""
  if common.hash_bucket(case_id) < VALIDATION_FROM_BUCKET:
    return 'train'
  return 'validation'


def multi_hot(findings: Iterable[str]) -> np.ndarray:
  """float32 [14] vector with 1 at the index (in `FINDINGS`) of each finding."""
  vector = np.zeros(len(FINDINGS), dtype=np.float32)
  for finding in findings:
    vector[FINDINGS.index(finding)] = 1.0
  return vector


def read_labels(path: str) -> dict[str, Entry]:
  """Reads and checks the label file.

  Returns:
    image file name -> `Entry`, in file order.

  Raises:
    DataError: missing columns, or a row with an empty or repeated image name,
      an empty patient id, an unknown finding, or a follow-up number or age
      that is not a number; the message names the file and line.
  """
  columns, rows = common.read_table(path, REQUIRED_COLUMNS)
  sex_column = next((c for c in SEX_COLUMNS if c in columns), None)
  if sex_column is None:
    raise DataError(f'{path}: missing column {" or ".join(SEX_COLUMNS)} (found: '
                    f'{", ".join(c for c in columns if c)})')
  entries: dict[str, Entry] = {}
  for row in rows:
    entry = _parse_row(row, path, sex_column)
    earlier = entries.get(entry.image_id)
    if earlier is not None:
      raise DataError(f'{row.where(path)}: image {entry.image_id} already on line '
                      f'{earlier.line}')
    entries[entry.image_id] = entry
  if not entries:
    raise DataError(f'{path}: the label file has a header but no rows')
  return entries


def read_list(path: str) -> list[tuple[int, str]]:
  """(line number, image file name) for each non-empty line of a split list.

  Raises:
    DataError: the file cannot be read, or names an image twice.
  """
  items, seen = [], {}
  try:
    with open(path, encoding='utf-8-sig') as f:
      for number, text in enumerate(f, 1):
        name = text.strip()
        if not name:
          continue
        if name in seen:
          raise DataError(f'{path} line {number}: image {name} already on line '
                          f'{seen[name]}')
        seen[name] = number
        items.append((number, name))
  except (OSError, UnicodeDecodeError) as exc:
    raise DataError(f'{path}: cannot read split list ({common.one_line(exc)})') from exc
  return items


def index_images(roots: Sequence[str]) -> dict[str, str]:
  """PNG file name -> path, for every `*.png` under `roots` (sorted walk)."""
  images: dict[str, str] = {}
  for root in roots:
    for dirpath, dirnames, filenames in files.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not common.is_hidden(d))
      for name in sorted(filenames):
        if _PNG_RE.search(name) and not common.is_hidden(name):
          images.setdefault(name, os.path.join(dirpath, name))
  return images


class NihChestXray14(common.ImageBuilder):
  """NIH ChestX-ray14 chest X-rays with 14 multi-label findings and patient ids.

  Splits: official `test`; the official train/validation list divided by
  patient hash bucket (0-89 `train`, 90-99 `validation`). Example keys are the
  image file names.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Gray PNG images, 14 findings multi-hot, patient ids; official '
               'test split, patient-hash train/validation.',
  }
  BUILDER_CONFIGS = common.downscaled_configs(512, 'Images as published (1024x1024 PNG).')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  DOWNLOADS = True  # the release's archives (IMAGE_ARCHIVE_URLS)

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.new_metadata()
    metadata['label_names'] = list(FINDINGS)
    metadata['num_unlisted'] = 0
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(None, None, 1), encoding_format='png',
                doc='Chest X-ray, 8-bit gray PNG.'),
            'image_id': tfds.features.Text(
                doc='Image file name (label file column Image Index).'),
            'case_id': tfds.features.Text(
                doc='Patient ID zero-padded to 8 digits: the grouping unit.'),
            'labels': tfds.features.Tensor(
                shape=(len(FINDINGS),), dtype=np.float32,
                doc='Multi-hot findings, in the order of '
                    "metadata['label_names']; all zero for No Finding."),
            'follow_up': tfds.features.Scalar(
                dtype=np.int32, doc="The patient's follow-up number (0 first)."),
            'age': tfds.features.Scalar(
                dtype=np.float32, doc='Age in years; NaN when unknown.'),
            'sex': tfds.features.Text(doc='M or F, as written.'),
            'view_position': tfds.features.Text(doc='PA or AP.'),
        }),
        supervised_keys=('image', 'labels'),
        metadata=metadata,
        homepage='https://nihcc.app.box.com/v/ChestXray-NIHCC',
        citation=_CITATION,
        license='Unrestricted use with acknowledgement of the NIH Clinical '
                'Center and citation of Wang et al. (CVPR 2017); see the '
                'release README.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    inputs = self._locate_inputs(dl_manager)
    entries = read_labels(inputs.labels)
    assigned: list[tuple[Entry, str, str]] = []
    for list_path, official in ((inputs.train_val, 'train_val'),
                                (inputs.test, 'test')):
      for line, image_id in read_list(list_path):
        entry = entries.get(image_id)
        if entry is None:
          raise DataError(f'{list_path} line {line}: image {image_id} is not in '
                          f'the label file {inputs.labels}')
        split = 'test' if official == 'test' else train_val_split(entry.case_id)
        assigned.append((entry, split, f'{list_path} line {line}'))
    common.check_case_disjoint((entry.case_id, split, where)
                               for entry, split, where in assigned)
    num_unlisted = len(entries) - len(assigned)
    self.info.metadata['num_unlisted'] = num_unlisted
    if num_unlisted:
      logging.warning('%d images of %s are in neither %s nor %s; they are left '
                      'out.', num_unlisted, inputs.labels, inputs.train_val,
                      inputs.test)

    images = index_images(inputs.roots)
    store = self.image_store(channels=1)
    by_split = {split: [] for split in SPLIT_NAMES}
    for entry, split, _ in assigned:
      where = f'{inputs.labels} line {entry.line}'
      path = images.get(entry.image_id)
      if path is None:
        message = (f'{where}: image file {entry.image_id} not found under '
                   f'{", ".join(inputs.roots)}')
        if not store.skip_bad_images:
          raise DataError(message)
        store.skip(path=entry.image_id, where=where, split=split, reason=message)
        continue
      by_split[split].append((entry, path, where))
    store.check_no_split_emptied(by_split, 'nih_chest_xray14')
    empty = [split for split, items in by_split.items() if not items]
    if empty:  # TFDS cannot write an empty split; only tiny inputs get here.
      logging.warning('nih_chest_xray14: no images in split(s) %s; they are '
                      'left out.', ', '.join(empty))
    return {
        split: self._generate_examples(
            sorted(items, key=lambda item: item[0].image_id), split, store)
        for split, items in by_split.items() if items
    }

  def _generate_examples(self, items, split: str, store: common.ImageStore):
    for (entry, _, _), image in store.each(
        items, lambda item: store.try_load(item[1], where=item[2]), split=split,
        what=f'nih_chest_xray14 {split}'):
      yield entry.image_id, {
          'image': image,
          'image_id': entry.image_id,
          'case_id': entry.case_id,
          'labels': multi_hot(entry.findings),
          'follow_up': np.int32(entry.follow_up),
          'age': np.float32(entry.age),
          'sex': entry.sex,
          'view_position': entry.view_position,
      }

  def _locate_inputs(self, dl_manager) -> Inputs:
    """The raw files, from manual_dir or downloaded."""
    root = common.manual_dir_or_none(dl_manager)
    if root is not None:
      return Inputs(
          labels=common.find_file(root, LABELS_FILE_NAMES,
                                  'NIH ChestX-ray14 label file'),
          train_val=common.find_file(root, (TRAIN_VAL_LIST,),
                                     'NIH ChestX-ray14 train/validation list'),
          test=common.find_file(root, (TEST_LIST,), 'NIH ChestX-ray14 test list'),
          roots=[root])
    logging.info('No manual_dir with data: downloading NIH ChestX-ray14 '
                 '(12 archives, about 42 GB) from %s', _BOX)
    try:
      archives = dl_manager.download_and_extract({
          f'images_{number:03d}': tfds.download.Resource(
              url=url, extract_method=tfds.download.ExtractMethod.TAR_GZ)
          for number, url in enumerate(IMAGE_ARCHIVE_URLS, 1)
      })
      tables = dl_manager.download(dict(TABLE_URLS))
    except Exception as exc:  # pylint: disable=broad-except
      raise DataError(
          f'could not download NIH ChestX-ray14 ({common.one_line(exc)}); '
          'download it from https://nihcc.app.box.com/v/ChestXray-NIHCC, unpack '
          'it into one directory and pass --manual_dir=DIR (main.py: '
          '--config.data.manual_dir=DIR)') from exc
    return Inputs(labels=os.fspath(tables['labels']),
                  train_val=os.fspath(tables['train_val']),
                  test=os.fspath(tables['test']),
                  roots=sorted(os.fspath(p) for p in archives.values()))


def _parse_row(row: common.Row, path: str, sex_column: str) -> Entry:
  """Checks one row of the label file."""
  where = row.where(path)
  image_id = row.get('Image Index')
  if not image_id:
    raise DataError(f'{where}: empty Image Index')
  where = f'{where} (image {image_id})'
  patient_id = row.get('Patient ID')
  if not patient_id:
    raise DataError(f'{where}: empty Patient ID')
  findings = _parse_findings(row.get('Finding Labels'), where)
  follow_up_text = row.get('Follow-up #')
  try:
    follow_up = int(follow_up_text)
  except ValueError:
    raise DataError(f'{where}: Follow-up # {follow_up_text!r} is not a whole '
                    'number') from None
  return Entry(line=row.line, image_id=image_id, case_id=case_id_of(patient_id),
               findings=findings, follow_up=follow_up,
               age=_parse_age(row.get('Patient Age'), where),
               sex=row.get(sex_column), view_position=row.get('View Position'))


def _parse_findings(text: str, where: str) -> tuple[str, ...]:
  """The findings of a `Finding Labels` value; () for `No Finding`."""
  names = [name.strip() for name in text.split('|')]
  if not text or not all(names):
    raise DataError(f'{where}: empty finding in Finding Labels {text!r}')
  findings = []
  for name in names:
    if name == NO_FINDING:
      continue
    if name not in FINDINGS:
      raise DataError(f'{where}: unknown finding {name!r} in Finding Labels; '
                      f'expected {NO_FINDING!r} or |-separated names out of '
                      f'{", ".join(FINDINGS)}')
    findings.append(name)
  return tuple(findings)


def _parse_age(text: str, where: str) -> float:
  if text.lower() in _MISSING_AGE:
    return math.nan
  match = _AGE_RE.match(text)
  if match is None:
    raise DataError(f'{where}: Patient Age {text!r} is not a number of years')
  return float(match['years'])


def findings_of(labels: np.ndarray) -> list[str]:
  """Inverse of `multi_hot`: the names of the findings set in `labels`."""
  return [name for name, value in zip(FINDINGS, labels) if value > 0.5]

