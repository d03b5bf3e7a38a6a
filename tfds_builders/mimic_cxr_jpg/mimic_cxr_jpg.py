"""TFDS builder for MIMIC-CXR-JPG: chest radiographs of the Beth Israel Deaconess
Medical Center with 14 report-derived CheXpert labels per study.

Input layout (PhysioNet, credentialed access; found anywhere below `manual_dir`,
e.g. under the `physionet.org/files/mimic-cxr-jpg/2.0.0/` tree that `wget -r`
creates):

* `mimic-cxr-2.0.0-split.csv.gz`: `dicom_id,study_id,subject_id,split`, one row
  per image; `split` is train, validate or test (the official, patient-disjoint
  split). Every image listed here becomes one record.
* `mimic-cxr-2.0.0-chexpert.csv.gz`: `subject_id,study_id` and the 14 labels,
  one row per study (labels are per study: all images of a study share them).
* `mimic-cxr-2.0.0-metadata.csv.gz`: DICOM metadata per image; only
  `ViewPosition` is used (optional file: without it `view_position` is empty).
* `files/p<first two digits of subject_id>/p<subject_id>/s<study_id>/
  <dicom_id>.jpg`, next to the split file (or directly in `manual_dir`).

Each table may also be uncompressed (`.csv`); the split file is looked up in
`manual_dir` first, then anywhere below it, and the other tables next to it first.

Labels: 1.0 positive, 0.0 negative, -1.0 uncertain, NaN blank (the report does
not mention the observation), in the column order of the published chexpert file
(`metadata['label_names']`). A study without a row in the chexpert file gets all
NaN labels; such studies are counted in `metadata['num_studies_without_labels']`.
Any other label value stops the build with an error naming file, line and column.

Splits: train -> 'train', validate -> 'validation', test -> 'test'. A patient
listed in two splits stops the build with an error naming the patient and both
rows. Images are stored as single-channel JPEG (the published bytes unless the
config downscales them or they are not 8-bit grayscale JPEGs; a file that is in
fact a PNG as a one-channel PNG);
missing or undecodable images stop the build unless the config skips bad images
(they are then listed in the metadata). Errors are one-line
`bigssl_med.errors.DataError`s naming the file and row.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from bigssl_med.errors import DataError
from tfds_builders import common

# The 14 labels, in the column order of mimic-cxr-2.0.0-chexpert.csv.
LABEL_NAMES = (
    'Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema',
    'Enlarged Cardiomediastinum', 'Fracture', 'Lung Lesion', 'Lung Opacity',
    'No Finding', 'Pleural Effusion', 'Pleural Other', 'Pneumonia',
    'Pneumothorax', 'Support Devices',
)
SPLIT_FILE_NAMES = ('mimic-cxr-2.0.0-split.csv', 'mimic-cxr-2.0.0-split.csv.gz')
LABEL_FILE_NAMES = ('mimic-cxr-2.0.0-chexpert.csv', 'mimic-cxr-2.0.0-chexpert.csv.gz')
METADATA_FILE_NAMES = ('mimic-cxr-2.0.0-metadata.csv',
                       'mimic-cxr-2.0.0-metadata.csv.gz')
SPLIT_COLUMNS = ('dicom_id', 'study_id', 'subject_id', 'split')
LABEL_COLUMNS = ('subject_id', 'study_id') + LABEL_NAMES
METADATA_COLUMNS = ('dicom_id', 'ViewPosition')
# Value of the split file's `split` column -> TFDS split.
SPLITS = {'train': 'train', 'validate': 'validation', 'test': 'test'}
IMAGE_FOLDER = 'files'

_ID_RE = re.compile(r'^[0-9]+$')
_DICOM_ID_RE = re.compile(r'^[0-9A-Za-z][0-9A-Za-z.-]*$')

_HOMEPAGE = 'https://physionet.org/content/mimic-cxr-jpg/'

_DESCRIPTION = """\
MIMIC-CXR-JPG (Johnson et al., 2019): 377,110 chest radiographs (JPEG, converted
from the DICOMs of MIMIC-CXR) from 227,827 imaging studies of the Beth Israel
Deaconess Medical Center emergency department, 2011-2016. Each study has 14 labels
that the CheXpert labeler extracted from its free-text report: 1.0 (positive),
0.0 (negative), -1.0 (uncertain) or NaN (blank: not mentioned; also every label
of a study that has no row in the label file), so uncertain and unmentioned stay
distinguishable from negative. `metadata['label_names']` gives the observation of
each position of `labels` (the published column order).

`case_id` is the patient (subject_id): all studies and views of one patient share
it, which is what MICLe uses for positive pairs. Splits are the official,
patient-disjoint ones (train, validate -> 'validation', test). Images are
grayscale, stored with one channel.
"""

_CITATION = """\
@article{johnson2019mimiccxrjpg,
  title={{MIMIC-CXR-JPG}, a large publicly available database of labeled chest
         radiographs},
  author={Johnson, Alistair E. W. and Pollard, Tom J. and Greenbaum, Nathaniel R.
          and Lungren, Matthew P. and Deng, Chih-ying and Peng, Yifan and
          Lu, Zhiyong and Mark, Roger G. and Berkowitz, Seth J. and
          Horng, Steven},
  journal={arXiv preprint arXiv:1901.07042},
  year={2019}
}
@misc{mimiccxrjpg_physionet,
  title={{MIMIC-CXR-JPG} - chest radiographs with structured labels (version 2.0.0)},
  author={Johnson, Alistair and Lungren, Matthew and Peng, Yifan and Lu, Zhiyong
          and Mark, Roger and Berkowitz, Seth and Horng, Steven},
  publisher={PhysioNet},
  year={2019},
  doi={10.13026/8360-t248}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MIMIC-CXR-JPG is credentialed-access data on PhysioNet: become a credentialed
user, complete the required training, sign the data use agreement on
https://physionet.org/content/mimic-cxr-jpg/ and download the release (files/,
mimic-cxr-2.0.0-split.csv.gz, mimic-cxr-2.0.0-chexpert.csv.gz and
mimic-cxr-2.0.0-metadata.csv.gz), e.g. with
`wget -r -N -c -np --user USER --ask-password
https://physionet.org/files/mimic-cxr-jpg/2.0.0/`. Pass the downloaded folder (or
any folder above it) as --manual_dir.
"""


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The files of one MIMIC-CXR-JPG copy; `metadata` is None when absent."""
  split: str
  labels: str
  metadata: str | None
  files_dir: str


@dataclasses.dataclass(frozen=True)
class StudyLabels:
  """The label row of one study."""
  subject_id: str
  labels: np.ndarray
  where: str


def _find(root: str, near: Sequence[str], names: Sequence[str], what: str) -> str:
  """`names` (earlier first) directly in one of the folders `near`, else below `root`."""
  for folder in near:
    for name in names:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        return path
  return common.find_file(root, names, what)


def find_inputs(root: str) -> Inputs:
  """Locates the tables and the image folder under `root`.

  Raises:
    DataError: no split or label file, or no `files/` folder next to the split
      file or in `root`.
  """
  split = _find(root, [root], SPLIT_FILE_NAMES, 'MIMIC-CXR-JPG split file')
  folder = os.path.dirname(split)
  labels = _find(root, [folder, root], LABEL_FILE_NAMES,
                 'MIMIC-CXR-JPG label file')
  try:
    metadata = _find(root, [folder, root], METADATA_FILE_NAMES,
                     'MIMIC-CXR-JPG metadata file')
  except DataError:
    logging.warning('MIMIC-CXR-JPG: no %s under %s; view_position is left empty.',
                    ' or '.join(METADATA_FILE_NAMES), root)
    metadata = None
  for candidate in (os.path.join(folder, IMAGE_FOLDER),
                    os.path.join(root, IMAGE_FOLDER)):
    if os.path.isdir(candidate):
      return Inputs(split=split, labels=labels, metadata=metadata,
                    files_dir=candidate)
  raise DataError(f'MIMIC-CXR-JPG: no image folder {IMAGE_FOLDER}/ next to {split} '
                  f'or in {root}')


def _check_id(value: str, column: str, where: str) -> str:
  if not _ID_RE.match(value):
    raise DataError(f'{where}: column {column!r} is {value!r}; expected a number')
  return value


def read_labels(path: str) -> dict[str, StudyLabels]:
  """Reads the chexpert label file: study_id -> its labels.

  Raises:
    DataError: missing columns, a malformed id or label value, or a study with
      two rows (naming the file, line and column).
  """
  _, rows = common.read_table(path, LABEL_COLUMNS)
  studies: dict[str, StudyLabels] = {}
  for row in rows:
    where = row.where(path)
    subject_id = _check_id(row.get('subject_id'), 'subject_id', where)
    study_id = _check_id(row.get('study_id'), 'study_id', where)
    if study_id in studies:
      raise DataError(f'{where}: study {study_id} already has labels on '
                      f'{studies[study_id].where}')
    studies[study_id] = StudyLabels(subject_id=subject_id,
                                    labels=common.parse_labels(row, LABEL_NAMES, where),
                                    where=where)
  return studies


def read_view_positions(path: str | None) -> dict[str, str]:
  """dicom_id -> ViewPosition ('' when blank) from the metadata file, if any."""
  if path is None:
    return {}
  _, rows = common.read_table(path, METADATA_COLUMNS)
  return {row.get('dicom_id'): row.get('ViewPosition') for row in rows}


def image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
  """The image's path relative to the release folder (`files/p10/p10000032/...`)."""
  return '/'.join((IMAGE_FOLDER, f'p{subject_id[:2]}', f'p{subject_id}',
                   f's{study_id}', f'{dicom_id}.jpg'))


def read_split_file(path: str, inputs: Inputs, labels: Mapping[str, StudyLabels],
                    view_positions: Mapping[str, str]
                    ) -> tuple[dict[str, list[common.Item]], set[str]]:
  """Reads the split file into items per TFDS split, in file order.

  Returns:
    (split -> items, ids of the listed studies that have no label row).

  Raises:
    DataError: missing columns, a malformed id, an unknown split value, or a
      study whose label row names another patient (naming file and line).
  """
  _, rows = common.read_table(path, SPLIT_COLUMNS)
  release_dir = os.path.dirname(inputs.files_dir)
  nan_labels = np.full((len(LABEL_NAMES),), np.nan, dtype=np.float32)
  items: dict[str, list[common.Item]] = {split: [] for split in SPLITS.values()}
  unlabelled: set[str] = set()
  for row in rows:
    where = row.where(path)
    dicom_id = row.get('dicom_id')
    if not _DICOM_ID_RE.match(dicom_id):
      raise DataError(f'{where}: column \'dicom_id\' is {dicom_id!r}; expected a '
                      'DICOM id such as 02aa804e-bde0afdd-112c0b34-7bc16630-4e384014')
    subject_id = _check_id(row.get('subject_id'), 'subject_id', where)
    study_id = _check_id(row.get('study_id'), 'study_id', where)
    split = SPLITS.get(row.get('split'))
    if split is None:
      raise DataError(f'{where}: column \'split\' is {row.get("split")!r}; expected '
                      f'one of {", ".join(SPLITS)}')
    study = labels.get(study_id)
    if study is None:
      unlabelled.add(study_id)
      study_labels = nan_labels
    elif study.subject_id != subject_id:
      raise DataError(f'{where}: study {study_id} of subject {subject_id} has labels '
                      f'for subject {study.subject_id} ({study.where})')
    else:
      study_labels = study.labels
    relative = image_path(subject_id, study_id, dicom_id)
    items[split].append(common.Item(
        key=relative,
        path=os.path.join(release_dir, *relative.split('/')),
        where=f'{where} (dicom_id {dicom_id})',
        split=split,
        features={
            'image_id': dicom_id,
            'case_id': subject_id,
            'study_id': study_id,
            'view_position': view_positions.get(dicom_id, ''),
            'labels': study_labels,
        }))
  return items, unlabelled


class MimicCxrJpg(common.ImageBuilder):
  """MIMIC-CXR-JPG chest radiographs with 14 per-study labels (1/0/-1/NaN).

  Splits: the official 'train', 'validation' (validate) and 'test'. Example keys
  are image paths (`files/p10/p10000032/s50414267/<dicom_id>.jpg`).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Grayscale images, 14 labels (1/0/-1/NaN), subject and study ids, '
               'view position; official splits.',
  }
  BUILDER_CONFIGS = common.downscaled_configs(512, 'Images as published.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.new_metadata()
    metadata['label_names'] = list(LABEL_NAMES)
    metadata['num_studies_without_labels'] = 0
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(None, None, 1), encoding_format='jpeg',
                doc='Chest radiograph, grayscale JPEG (one channel).'),
            'image_id': tfds.features.Text(doc='dicom_id of the image.'),
            'case_id': tfds.features.Text(
                doc='Patient (subject_id, e.g. 10000032): the grouping unit.'),
            'study_id': tfds.features.Text(doc='Study (study_id, e.g. 50414267).'),
            'view_position': tfds.features.Text(
                doc='ViewPosition of the metadata file (PA, AP, LATERAL, LL, ...); '
                    'empty when blank or unknown.'),
            'labels': tfds.features.Tensor(
                shape=(len(LABEL_NAMES),), dtype=np.float32,
                doc='The 14 labels of the study, in the order of '
                    "metadata['label_names']: 1.0 positive, 0.0 negative, "
                    '-1.0 uncertain, NaN blank (not mentioned, or no label row).'),
        }),
        homepage=_HOMEPAGE,
        citation=_CITATION,
        license='PhysioNet Credentialed Health Data License 1.5.0 (credentialed '
                'access; see the PhysioNet page).',
        metadata=metadata,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = common.manual_dir_or_none(dl_manager)
    if manual_dir is None:
      raise DataError('MIMIC-CXR-JPG cannot be downloaded automatically '
                      '(credentialed PhysioNet access): download it from '
                      f'{_HOMEPAGE} and pass its folder as --manual_dir')
    inputs = find_inputs(manual_dir)
    logging.info('MIMIC-CXR-JPG inputs: %s', inputs)
    labels = read_labels(inputs.labels)
    view_positions = read_view_positions(inputs.metadata)
    items, unlabelled = read_split_file(inputs.split, inputs, labels, view_positions)
    del labels, view_positions
    all_items = [item for split_items in items.values() for item in split_items]
    common.check_case_disjoint(
        (item.features['case_id'], item.split, item.where) for item in all_items)
    common.check_unique_keys(all_items)
    if unlabelled:
      logging.warning('MIMIC-CXR-JPG: %d studies of %s have no row in %s; their '
                      'labels are all NaN.', len(unlabelled), inputs.split,
                      inputs.labels)
    self.info.metadata['num_studies_without_labels'] = len(unlabelled)
    store = self.image_store(channels=1)
    generators = {}
    for split, split_items in items.items():
      if not split_items:  # TFDS cannot write an empty split.
        logging.warning('MIMIC-CXR-JPG: %s lists no %s images; split %s is left '
                        'out.', inputs.split, split, split)
        continue
      generators[split] = self._generate_examples(split_items, store)
    return generators

  def _generate_examples(self, items: Sequence[common.Item],
                         store: common.ImageStore) -> Iterator[tuple[str, dict]]:
    return common.generate_examples(items, store, self.name)
