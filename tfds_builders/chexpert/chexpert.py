"""TFDS builder for CheXpert: Stanford chest radiographs with 14 report-derived labels.

Input layouts. Both releases of CheXpert v1.0 have the same structure and differ
only in the folder name and the image resolution:

* `CheXpert-v1.0-small/` (downsampled JPEGs, about 11 GB) and
* `CheXpert-v1.0/` (original resolution, several hundred GB),

each holding `train.csv`, `valid.csv`, `train/patientNNNNN/studyN/viewN_<frontal|
lateral>.jpg` and `valid/...`. The `Path` column of both CSV files is relative to
the folder that CONTAINS the data set folder (it starts with
`CheXpert-v1.0-small/` or `CheXpert-v1.0/`). `manual_dir` may be the data set
folder itself or any folder above it: `train.csv` is looked up directly in
`manual_dir`, then in its immediate subfolders, then anywhere below it (the
shallowest wins; between folders at the same depth, the first in sorted order,
so `CheXpert-v1.0` before `CheXpert-v1.0-small`). `valid.csv` must sit next to
`train.csv`. Each `Path` is resolved against the parent of the CSV's folder; when
no file is there (a renamed data set folder), against the CSV's folder with the
first `Path` component dropped, and finally against the CSV's folder as is.

Labels. For each image, the CSV files give 14 observations extracted from the
radiology report by the CheXpert labeler: `1.0` positive, `0.0` negative, `-1.0`
uncertain, and blank when the report does not mention the observation. The
`labels` feature keeps all four states: blank is stored as NaN, so it stays
distinct from a negative. Any other value stops the build with an error that
names the file, line and column.

Splits are the official ones: `train.csv` -> 'train', `valid.csv` ->
'validation' (the radiologist-labelled validation set). The official test set
is not part of this release. The two files must be patient-disjoint; a patient in
both stops the build with an error naming the patient and both rows.

Images are stored as single-channel (grayscale) JPEG, re-encoded only when the
config downscales them (`side512`, the default, or any `side<N>`) or when they are
not 8-bit grayscale JPEGs; otherwise the published bytes are kept. A file that is
in fact a PNG is stored as a one-channel PNG (lossless stays lossless; the input
pipeline decodes either, whatever the feature's `jpeg` format says). Missing or
undecodable images stop the build unless the build skips bad images (they are then
listed in the metadata). Errors are
one-line `bigssl_med.errors.DataError`s naming the file and row.
"""

from __future__ import annotations

import math
import os
import re
from typing import Iterator, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from bigssl_med.errors import DataError
from tfds_builders import common

# The 14 observations, in the column order of the published CSV files.
LABEL_NAMES = (
    'No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
    'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis',
    'Pneumothorax', 'Pleural Effusion', 'Pleural Other', 'Fracture',
    'Support Devices',
)
INFO_COLUMNS = ('Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA')
REQUIRED_COLUMNS = INFO_COLUMNS + LABEL_NAMES
# Official split -> label file, in the data set folder.
CSV_FILES = {'train': 'train.csv', 'validation': 'valid.csv'}
DATASET_FOLDERS = ('CheXpert-v1.0', 'CheXpert-v1.0-small')

_PATIENT_RE = re.compile(r'^patient\d+$')
_STUDY_RE = re.compile(r'^study\d+$')

_HOMEPAGE = 'https://stanfordmlgroup.github.io/competitions/chexpert/'

_DESCRIPTION = """\
CheXpert (Irvin et al., 2019): 224,316 chest radiographs of 65,240 patients from
Stanford Hospital, frontal and lateral views, each with 14 observations that the
CheXpert labeler extracted from the radiology report. A label is 1.0 (positive),
0.0 (negative), -1.0 (uncertain) or NaN (blank in the CSV: the report does not
mention the observation), so uncertain and unmentioned stay distinguishable from
negative; `metadata['label_names']` gives the observation of each position of
`labels`. The official validation set (valid.csv: 200 studies, labelled by
board-certified radiologists) is the 'validation' split; train.csv is 'train';
the official test set is not part of this release.

`case_id` is the patient (e.g. patient00001): all studies and views of one patient
share it, which is what MICLe uses for positive pairs. Images are grayscale, stored
with one channel.
"""

_CITATION = """\
@inproceedings{irvin2019chexpert,
  title={{CheXpert}: A Large Chest Radiograph Dataset with Uncertainty Labels and
         Expert Comparison},
  author={Irvin, Jeremy and Rajpurkar, Pranav and Ko, Michael and Yu, Yifan and
          Ciurea-Ilcus, Silviana and Chute, Chris and Marklund, Henrik and
          Haghgoo, Behzad and Ball, Robyn and Shpanskaya, Katie and others},
  booktitle={Proceedings of the AAAI Conference on Artificial Intelligence},
  volume={33},
  pages={590--597},
  year={2019},
  doi={10.1609/aaai.v33i01.3301590}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
CheXpert cannot be downloaded automatically: it requires registration and
acceptance of the Stanford University School of Medicine CheXpert Dataset Research
Use Agreement. Request it through the Stanford AIMI shared data sets
(https://aimi.stanford.edu/, linked from
https://stanfordmlgroup.github.io/competitions/chexpert/), download
CheXpert-v1.0-small (or the full-resolution CheXpert-v1.0), unzip it and pass
either the CheXpert-v1.0-small folder (the one with train.csv, valid.csv, train/
and valid/) or the folder containing it as --manual_dir.
"""


# ----------------------------------------------------------------------------
# Reading the CSV files.
# ----------------------------------------------------------------------------


def find_tables(root: str) -> dict[str, str]:
  """The label files of each split ({'train': .../train.csv, 'validation': ...}).

  Raises:
    DataError: no `train.csv` under `root`, or no `valid.csv` next to it.
  """
  train = _find_train_csv(root)
  folder = os.path.dirname(train)
  tables = {}
  for split, name in CSV_FILES.items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise DataError(f'CheXpert: no {name} next to {train} (expected {path}); '
                      'the release has both train.csv and valid.csv')
    tables[split] = path
  return tables


def _find_train_csv(root: str) -> str:
  """`train.csv` in `root`, in one of its subfolders, or anywhere below it."""
  candidates = [os.path.join(root, CSV_FILES['train'])]
  try:
    entries = sorted(os.listdir(root))
  except OSError as exc:
    raise DataError(f'cannot list manual_dir {root} ({common.one_line(exc)})') from exc
  candidates += [os.path.join(root, entry, CSV_FILES['train']) for entry in entries
                 if not common.is_hidden(entry)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  return common.find_file(root, [CSV_FILES['train']], 'CheXpert label file')


def resolve_image_path(csv_dir: str, relative: str) -> str:
  """The image file a CSV `Path` refers to (see the module docstring).

  Args:
    csv_dir: the folder of the CSV file (the data set folder).
    relative: the `Path` value, e.g.
      `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`.

  Returns:
    The first candidate that is a file; when none is, the most plausible one
    (so that the error about the missing file names it).
  """
  parts = [p for p in re.split(r'[\\/]+', relative) if p not in ('', '.')]
  candidates = [os.path.join(os.path.dirname(csv_dir), *parts)]
  if len(parts) > 1:
    candidates.append(os.path.join(csv_dir, *parts[1:]))
  candidates.append(os.path.join(csv_dir, *parts))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  if len(parts) > 1 and parts[0] != os.path.basename(csv_dir):
    return candidates[1]
  return candidates[0]


def parse_path(relative: str, where: str) -> tuple[str, str, str, str]:
  """Splits a CSV `Path` into (image_id, patient, study, view).

  `image_id` is the path from the split folder on (`train/patient00001/study1/
  view1_frontal.jpg`), the same in the small and the full release.

  Raises:
    DataError: the path does not end in `patientN/studyN/<view>.jpg`.
  """
  parts = [p for p in re.split(r'[\\/]+', relative) if p not in ('', '.')]
  if (len(parts) < 3 or not _PATIENT_RE.match(parts[-3]) or
      not _STUDY_RE.match(parts[-2])):
    raise DataError(f'{where}: Path {relative!r} does not end in '
                    'patient<N>/study<N>/<view>.jpg')
  image_id = '/'.join(parts[max(len(parts) - 4, 0):])
  view = os.path.splitext(parts[-1])[0]
  return image_id, parts[-3], parts[-2], view


def parse_age(text: str, where: str) -> float:
  """Age in years; NaN when blank.

  Raises:
    DataError: a value that is not a number.
  """
  text = text.strip()
  if not text:
    return math.nan
  try:
    return float(text)
  except ValueError:
    raise DataError(f'{where}: column \'Age\' is {text!r}; expected a number '
                    'of years or blank') from None


def read_split(csv_path: str, split: str) -> list[common.Item]:
  """Reads one label file into items, in file order.

  Raises:
    DataError: missing columns, a malformed Path, age or label (naming the file,
      line and column).
  """
  _, rows = common.read_table(csv_path, REQUIRED_COLUMNS)
  csv_dir = os.path.dirname(csv_path)
  items = []
  for row in rows:
    where = row.where(csv_path)
    relative = row.get('Path')
    if not relative:
      raise DataError(f'{where}: empty Path')
    image_id, patient, study, view = parse_path(relative, where)
    items.append(common.Item(
        key=image_id,
        path=resolve_image_path(csv_dir, relative),
        where=f'{where} (Path {relative})',
        split=split,
        features={
            'image_id': image_id,
            'case_id': patient,
            'study': study,
            'view': view,
            'sex': row.get('Sex'),
            'age': np.float32(parse_age(row.get('Age'), where)),
            'frontal_lateral': row.get('Frontal/Lateral'),
            'ap_pa': row.get('AP/PA'),
            'labels': common.parse_labels(row, LABEL_NAMES, where),
        }))
  return items


# ----------------------------------------------------------------------------
# The builder.
# ----------------------------------------------------------------------------


class Chexpert(common.ImageBuilder):
  """CheXpert v1.0 chest radiographs with 14 uncertainty-aware labels.

  Splits: the official 'train' (train.csv) and 'validation' (valid.csv).
  Example keys are image ids (`train/patient00001/study1/view1_frontal.jpg`).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Grayscale images, 14 labels (1/0/-1/NaN), patient ids; official '
               'train/validation splits.',
  }
  BUILDER_CONFIGS = common.downscaled_configs(512, 'Images as published.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.new_metadata()
    metadata['label_names'] = list(LABEL_NAMES)
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(None, None, 1), encoding_format='jpeg',
                doc='Chest radiograph, grayscale JPEG (one channel).'),
            'image_id': tfds.features.Text(
                doc='Image path from the split folder on, e.g. '
                    'train/patient00001/study1/view1_frontal.jpg.'),
            'case_id': tfds.features.Text(
                doc='Patient, e.g. patient00001: the grouping unit.'),
            'study': tfds.features.Text(doc='Study of the patient, e.g. study1.'),
            'view': tfds.features.Text(doc='View, e.g. view1_frontal.'),
            'sex': tfds.features.Text(doc='Male, Female or Unknown, as published.'),
            'age': tfds.features.Scalar(
                dtype=np.float32, doc='Age in years; NaN when unknown.'),
            'frontal_lateral': tfds.features.Text(doc='Frontal or Lateral.'),
            'ap_pa': tfds.features.Text(
                doc='Projection of frontal views (AP, PA, ...); empty for '
                    'lateral views.'),
            'labels': tfds.features.Tensor(
                shape=(len(LABEL_NAMES),), dtype=np.float32,
                doc='The 14 observations in the order of '
                    "metadata['label_names']: 1.0 positive, 0.0 negative, "
                    '-1.0 uncertain, NaN blank (not mentioned in the report).'),
        }),
        homepage=_HOMEPAGE,
        citation=_CITATION,
        license=('Stanford University School of Medicine CheXpert Dataset '
                 'Research Use Agreement (research use only).'),
        metadata=metadata,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = common.manual_dir_or_none(dl_manager)
    if manual_dir is None:
      raise DataError('CheXpert cannot be downloaded automatically (registration '
                      'required): download CheXpert-v1.0-small from Stanford AIMI '
                      f'({_HOMEPAGE}) and pass its folder, or the folder holding '
                      'it, as --manual_dir')
    tables = find_tables(manual_dir)
    logging.info('CheXpert label files: %s', ', '.join(tables.values()))
    items = {split: read_split(path, split) for split, path in tables.items()}
    all_items = [item for split_items in items.values() for item in split_items]
    common.check_case_disjoint(
        (item.features['case_id'], item.split, item.where) for item in all_items)
    common.check_unique_keys(all_items)
    store = self.image_store(channels=1)
    generators = {}
    for split, split_items in items.items():
      if not split_items:  # TFDS cannot write an empty split.
        logging.warning('CheXpert: %s has no rows; split %s is left out.',
                        tables[split], split)
        continue
      generators[split] = self._generate_examples(split_items, store)
    return generators

  def _generate_examples(self, items: Sequence[common.Item],
                         store: common.ImageStore) -> Iterator[tuple[str, dict]]:
    return common.generate_examples(items, store, self.name)
