"""TFDS builder for the RSNA Pneumonia Detection Challenge: chest X-rays, 3 classes, boxes.

Input layout: the challenge's files as Kaggle publishes them, in `manual_dir` or below it:

* `stage_2_train_labels.csv`: `patientId,x,y,width,height,Target`, one row per
  lung-opacity box (`x`, `y`: the box's upper-left corner, in pixels) and one row with
  blank box and `Target` 0 for an image without one;
* `stage_2_detailed_class_info.csv` beside it: `patientId,class`, with the class of
  each of those rows: `Lung Opacity`, `No Lung Opacity / Not Normal` or `Normal`;
* `stage_2_train_images/<patientId>.dcm` (and `stage_2_test_images/`, whose labels
  were not published): DICOM, 1024 x 1024, 8-bit gray, read with pydicom
  (`tfds_builders.dicom`). The `.dcm` files are found anywhere below `manual_dir`;
  images the table does not list are counted (`metadata['num_unlisted_images']`), not
  stored.

The stage 1 release's files (`stage_1_train_labels.csv`,
`stage_1_detailed_class_info.csv`, `stage_1_train_images/`) are read the same way. The
shallowest labels table is read (stage 2 before stage 1 at the same depth), with the
class table of its stage from its folder.

Features. `image`: the X-ray, gray, one channel; `label`: `normal`,
`no_lung_opacity_not_normal` or `lung_opacity` (the class table's `Normal`, `No Lung
Opacity / Not Normal`, `Lung Opacity`); `boxes`: float32 [N, 4], the image's
lung-opacity boxes as published (`x`, `y`, `width`, `height` in the published image's
pixels; N = 0 without lung opacity); `mask`: their union (0 background, 255 inside a
box; a box past the image's edge is clipped to it, counted in
`metadata['num_clipped_boxes']` with a warning); `image_id` and `case_id`: the
patientId (one image per patient); `sex` (`PatientSex`), `age` (years, from
`PatientAge`; NaN when blank) and `view_position` (`ViewPosition`: PA or AP) from the
DICOM header.

Splits. The challenge's test labels were not published, so every split comes from
the labelled images, case-disjoint and deterministic from a hash of `case_id`
(`common.hash_split`):

    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    bucket 0-79 -> 'train', 80-89 -> 'validation', 90-99 -> 'test'

Configs (`tfds_builders.common.ImageConfig`): `side512` (the default, as the other
chest X-ray builders) and any `side<N>` downscale each image (antialiased bicubic) and
its mask (nearest neighbour) to a longest side of N; `original` stores them at their
published size. `boxes` stay in the published image's pixels whatever the config.

Bad input stops the build with a one-line `bigssl_med.errors.DataError` naming the file
and line: no labels table, a missing column, a `Target` other than 0 or 1, a box that is
not four numbers with positive width and height where `Target` is 1 (or any box where
it is 0), a patient with rows of both targets, a class other than the three, a patient
whose class rows disagree, or whose class contradicts its target (`Lung Opacity` if and
only if `Target` is 1), a patient in one table and not the other, a box wholly outside
its image, two `.dcm` files of one patient, a listed image without its file, a file
that is not DICOM or whose pixels cannot be decoded, an age that is not an age. With
`skip_bad_images`, a listed image whose file is missing, unreadable or undecodable is
skipped instead and listed in the data set's `metadata.json`.

The set cannot be downloaded by the builder: download it from the challenge's Kaggle
page and pass it as `--manual_dir`.
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from bigssl_med.errors import DataError
from tfds_builders import common
from tfds_builders import dicom
from tfds_builders import nlm_tb

# The class table's classes, in the order of `CLASS_NAMES`.
PUBLISHED_CLASSES = ('Normal', 'No Lung Opacity / Not Normal', 'Lung Opacity')
CLASS_NAMES = ('normal', 'no_lung_opacity_not_normal', 'lung_opacity')
OPACITY = 'Lung Opacity'
SPLIT_NAMES = ('train', 'validation', 'test')
LABEL_FILES = ('stage_2_train_labels.csv', 'stage_1_train_labels.csv')  # preferred first
LABEL_COLUMNS = ('patientId', 'x', 'y', 'width', 'height', 'Target')
CLASS_COLUMNS = ('patientId', 'class')
BOX_COLUMNS = ('x', 'y', 'width', 'height')
HOMEPAGE = 'https://www.kaggle.com/c/rsna-pneumonia-detection-challenge'
_EXPECTED_AGE = '51, 051Y (the DICOM age string) or blank'

_DESCRIPTION = """\
RSNA Pneumonia Detection Challenge (Radiological Society of North America, 2018):
frontal chest radiographs in DICOM from the NIH ChestX-ray14 collection, read by
radiologists for lung opacities suggestive of pneumonia. Each image has one of three
classes (normal; no lung opacity but not normal; lung opacity) and, with lung opacity,
its bounding boxes. Stored here: the gray image, the class, the boxes and their union as
a mask, and the DICOM header's sex, age and view position.

Splits are not official (the challenge's test labels were not published): case-disjoint
train/validation/test (80/10/10 by patient) from a SHA-256 hash of the case id.
"""

_CITATION = """\
@article{shih2019augmenting,
  title={Augmenting the National Institutes of Health chest radiograph dataset with
         expert annotations of possible pneumonia},
  author={Shih, George and Wu, Carol C and Halabi, Safwan S and Kohli, Marc D and
          Prevedello, Luciano M and Cook, Tessa S and Sharma, Arjun and Amorosa, Judith K
          and Arteaga, Veronica and Galperin-Aizenberg, Maya and others},
  journal={Radiology: Artificial Intelligence},
  volume={1},
  number={1},
  pages={e180041},
  year={2019},
  doi={10.1148/ryai.2019180041}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The builder does not download the RSNA Pneumonia Detection Challenge. Download the
challenge's files from its Kaggle page: stage_2_train_labels.csv,
stage_2_detailed_class_info.csv and stage_2_train_images/, and pass the folder holding
them (or any folder above it) as --manual_dir.
"""


@dataclasses.dataclass(frozen=True)
class Listed:
  """A patient's rows: its class, its boxes (x, y, width, height) and its first row."""
  patient_id: str
  label: str  # one of CLASS_NAMES
  boxes: tuple[tuple[float, float, float, float], ...]
  where: str


@dataclasses.dataclass(frozen=True)
class Entry:
  """A listed image with its file and header, ready to store."""
  listed: Listed
  path: str
  header: dicom.Header
  age: float

  @property
  def where(self) -> str:
    return f'image_id {self.listed.patient_id}'


def _box(row: common.Row, target: int, where: str) -> tuple[float, ...] | None:
  """The row's box, None for a row of target 0.

  Raises:
    DataError: a box where the target is 0, or not four numbers of positive width and
      height where it is 1 (names `where`).
  """
  fields = [row.get(column) for column in BOX_COLUMNS]
  if target == 0:
    if any(fields):
      raise DataError(f'{where}: Target is 0 but the row has a box ({", ".join(fields)}); a '
                      'row without lung opacity leaves x, y, width and height blank')
    return None
  try:
    box = tuple(float(field) for field in fields)
  except ValueError as exc:
    raise DataError(f'{where}: Target is 1 but x, y, width, height are '
                    f'{", ".join(repr(f) for f in fields)}; expected four numbers') from exc
  if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
    raise DataError(f'{where}: box {box} needs finite numbers and a positive width and '
                    'height')
  return box


def read_labels(labels_path: str, classes_path: str) -> list[Listed]:
  """The patients of the two tables, in order of their first row in the labels table.

  Raises:
    DataError: see the module docstring (names the file and line).
  """
  _, rows = common.read_table(labels_path, LABEL_COLUMNS)
  targets: dict[str, tuple[int, str]] = {}
  boxes: dict[str, list[tuple[float, ...]]] = {}
  for row in rows:
    where = f'{labels_path} line {row.line}'
    patient = row.get('patientId')
    if not patient:
      raise DataError(f'{where}: patientId is empty')
    text = row.get('Target')
    if text not in ('0', '1'):
      raise DataError(f'{where}: Target is {text!r}; expected 0 or 1')
    target = int(text)
    first = targets.setdefault(patient, (target, where))
    if first[0] != target:
      raise DataError(f'patient {patient} has Target {first[0]} at {first[1]} and Target '
                      f'{target} at {where}')
    box = _box(row, target, where)
    found = boxes.setdefault(patient, [])
    if box is not None and box not in found:
      found.append(box)
  _, class_rows = common.read_table(classes_path, CLASS_COLUMNS)
  classes: dict[str, tuple[str, str]] = {}
  for row in class_rows:
    where = f'{classes_path} line {row.line}'
    patient, name = row.get('patientId'), row.get('class')
    if name not in PUBLISHED_CLASSES:
      raise DataError(f'{where}: class {name!r} is not one of '
                      f'{", ".join(repr(c) for c in PUBLISHED_CLASSES)}')
    first = classes.setdefault(patient, (name, where))
    if first[0] != name:
      raise DataError(f'patient {patient} has class {first[0]!r} at {first[1]} and '
                      f'{name!r} at {where}')
    if patient not in targets:
      raise DataError(f'{where}: patient {patient} is not in {labels_path}')
  listed = []
  for patient, (target, where) in targets.items():
    if patient not in classes:
      raise DataError(f'{where}: patient {patient} has no row in {classes_path}')
    name, class_where = classes[patient]
    if (name == OPACITY) != bool(target):
      raise DataError(f'patient {patient} has class {name!r} at {class_where} but Target '
                      f'{target} at {where}; {OPACITY!r} goes with Target 1 and only it')
    listed.append(Listed(patient_id=patient,
                         label=CLASS_NAMES[PUBLISHED_CLASSES.index(name)],
                         boxes=tuple(boxes[patient]), where=where))
  return listed


def box_pixels(box, *, height: int, width: int) -> tuple[slice, slice, bool]:
  """The rows and columns of the image a box covers, and whether it was clipped to the
  image: rows `round(y)` to `round(y + height)`, columns `round(x)` to `round(x + width)`,
  the ends excluded (the published boxes are whole pixels).

  Raises:
    DataError: a box wholly outside the image (the caller names the row).
  """
  x, y, w, h = box
  left, top = int(round(x)), int(round(y))
  right, bottom = int(round(x + w)), int(round(y + h))
  if right <= 0 or bottom <= 0 or left >= width or top >= height:
    raise DataError(f'box (x {x}, y {y}, width {w}, height {h}) lies outside the '
                    f'{width}x{height} image')
  clipped = left < 0 or top < 0 or right > width or bottom > height
  return (slice(max(top, 0), min(bottom, height)), slice(max(left, 0), min(right, width)),
          clipped)


def box_mask(boxes, *, height: int, width: int) -> np.ndarray:
  """bool [height, width]: the union of the boxes' pixels (`box_pixels`)."""
  mask = np.zeros((height, width), bool)
  for box in boxes:
    rows, columns, _ = box_pixels(box, height=height, width=width)
    mask[rows, columns] = True
  return mask


def split_for_case(case_id: str) -> str:
  """The split ('train', 'validation' or 'test') of a case: 80/10/10 by case hash."""
  return common.hash_split(case_id, validation=10, test=10)


class RsnaPneumonia(common.ImageBuilder):
  """RSNA Pneumonia Detection Challenge chest X-rays: 3 classes, boxes, DICOM fields.

  Splits (no official ones with labels): case-disjoint, from
  `int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100`: buckets 0-79
  `train`, 80-89 `validation`, 90-99 `test`. Example keys are patient ids.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Gray images from DICOM, 3 classes, lung-opacity boxes and their mask, sex, '
               'age and view position; case-hash splits.',
  }
  BUILDER_CONFIGS = common.downscaled_configs(512, 'Images and masks as published '
                                                   '(1024x1024).')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.new_metadata()
    metadata.update(labels_file='', num_unlisted_images=0, num_clipped_boxes=0)
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            **dicom.features(),
            'label': tfds.features.ClassLabel(
                names=CLASS_NAMES,
                doc='The class table\'s Normal, No Lung Opacity / Not Normal, Lung Opacity.'),
            'boxes': tfds.features.Tensor(
                shape=(None, 4), dtype=np.float32,
                doc='Lung-opacity boxes (x, y, width, height) in the published image\'s '
                    'pixels; none without lung opacity.'),
            'mask': tfds.features.Image(
                shape=(None, None, 1), encoding_format='png',
                doc='Union of the boxes (0 background, 255 inside a box).'),
            'image_id': tfds.features.Text(doc='patientId (the file stem).'),
            'case_id': tfds.features.Text(doc='patientId (one image per patient).'),
        }),
        supervised_keys=('image', 'label'),
        metadata=metadata,
        homepage=HOMEPAGE,
        citation=_CITATION,
        license='See the challenge\'s data page for the terms of use.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = common.manual_dir_or_none(dl_manager)
    if manual_dir is None:
      raise DataError('The RSNA Pneumonia Detection Challenge is not downloaded by the '
                      f'builder: download the challenge\'s files ({HOMEPAGE}) and pass the '
                      'folder holding stage_2_train_labels.csv, '
                      'stage_2_detailed_class_info.csv and stage_2_train_images/ as '
                      '--manual_dir (main.py: --config.data.manual_dir=DIR)')
    labels_path = common.find_file(manual_dir, LABEL_FILES, 'RSNA Pneumonia labels table')
    stage = os.path.basename(labels_path).split('_train_labels')[0]  # stage_2 or stage_1
    classes_path = os.path.join(os.path.dirname(labels_path), f'{stage}_detailed_class_info.csv')
    if not os.path.isfile(classes_path):
      raise DataError(f'{classes_path}: not found; the class table goes beside '
                      f'{labels_path}')
    listed = read_labels(labels_path, classes_path)
    if not listed:
      raise DataError(f'{labels_path}: no patient')
    images = dicom.find_files(manual_dir)
    unlisted = dicom.count_unlisted(images, (item.patient_id for item in listed),
                                    what='RSNA Pneumonia', manual_dir=manual_dir,
                                    table=labels_path)
    self.info.metadata.update(labels_file=os.path.basename(labels_path),
                              num_unlisted_images=unlisted)
    store = self.image_store(channels=1)
    by_id = {item.patient_id: item for item in listed}
    by_split = {split: [] for split in SPLIT_NAMES}
    clipped = 0
    for patient, path, header in dicom.listed_headers(
        [(item.patient_id, item.where) for item in listed], images, store, split_for_case):
      item = by_id[patient]
      for box in item.boxes:  # a box wholly outside the image: an error naming its patient
        try:
          clipped += box_pixels(box, height=header.rows, width=header.columns)[2]
        except DataError as exc:
          raise DataError(f'{item.where}: patient {patient}: {exc} ({path})') from None
      age = nlm_tb.parse_age(header.age, where=f'{path} PatientAge', expected=_EXPECTED_AGE)
      by_split[split_for_case(patient)].append(Entry(listed=item, path=path, header=header,
                                                     age=age))
    store.check_no_split_emptied(by_split, 'rsna_pneumonia')
    empty = [split for split, items in by_split.items() if not items]
    if empty:  # TFDS cannot write an empty split; only tiny inputs get here.
      logging.warning('RSNA Pneumonia from %s: no case hashes into split(s) %s; they are '
                      'left out.', manual_dir, ', '.join(empty))
    if clipped:
      logging.warning('RSNA Pneumonia: %d box(es) reach past their image\'s edge; their '
                      'masks are clipped to the image', clipped)
    self.info.metadata['num_clipped_boxes'] = clipped
    return {split: self._generate_examples(items, split, store)
            for split, items in by_split.items() if items}

  def _generate_examples(self, entries, split, store):
    def load(entry):  # on a worker thread: the stored image and mask, or a Failed
      image = store.try_load(entry.path, where=entry.where)  # DICOM: common.read_image
      if isinstance(image, common.Failed):
        return image
      mask = box_mask(entry.listed.boxes, height=entry.header.rows,
                      width=entry.header.columns)
      return image, common.encode_mask(mask, common.encoded_size(image))

    for entry, (image, mask) in store.each(entries, load, split=split,
                                           what=f'rsna_pneumonia {split}'):
      patient = entry.listed.patient_id
      yield patient, {
          'image': image,
          'label': entry.listed.label,
          'boxes': np.asarray(entry.listed.boxes, np.float32).reshape(-1, 4),
          'mask': mask,
          'image_id': patient,
          'case_id': patient,
          'sex': entry.header.sex,
          'age': np.float32(entry.age),
          'view_position': entry.header.view,
      }
