"""TFDS builder for SIIM-ACR Pneumothorax Segmentation: chest X-rays with pneumothorax masks.

Input layout: the competition's files as Kaggle and its mirrors publish them, in
`manual_dir` or below it:

* an annotation table, `train-rle.csv` (stage 1) or `stage_2_train.csv` (stage 2,
  which also annotates stage 1's test images): columns `ImageId` and `EncodedPixels`
  (stage 1 writes the second ` EncodedPixels`, with a space; column names are
  stripped). One row per pneumothorax region, or one row `-1` for an image without
  pneumothorax. The shallowest table is read; between two at the same depth,
  `stage_2_train.csv`.
* the images, `<ImageId>.dcm`, anywhere below `manual_dir`
  (`dicom-images-train/<study>/<series>/<ImageId>.dcm`, `dicom-images-test/...`,
  `stage_2_images/<ImageId>.dcm`): DICOM, 1024 x 1024, 8-bit gray, JPEG baseline.
  They are read with pydicom (`tfds_builders.dicom`). Images the table does not
  annotate (stage 1's test images under `train-rle.csv`, stage 2's test images) are
  not stored; the build counts them (`metadata['num_unannotated_images']`).

Masks. The runs of `EncodedPixels` are pairs (start, length) over the image's pixels
numbered down each column, then column by column to the right (column-major). The
competition wrote them in two forms, `rle_encoding` tells them apart from the file:

* relative (stage 1's `train-rle.csv`): the first start is the 0-based index of the
  first pixel; each later start counts the pixels between the end of the previous
  run and the first pixel of this one;
* absolute (the usual Kaggle form): each start is the 1-based index of the run's
  first pixel, so starts grow along a row.

A file whose runs read as absolute would go back in some row is relative; a file
whose every row of several runs grows is absolute (a relative row can only grow like
that if each gap outruns all the pixels before it, which no region of a real
radiograph does); a file of one-run rows only is read as relative, the published
form. The form read is logged and recorded in `metadata['rle_encoding']`. `mask` is
the union of an image's regions (0 background, 255 pneumothorax).

Features. `image`: the X-ray, gray, one channel; `mask`; `label`: `pneumothorax`
when the image has a region, else `no_pneumothorax`; `num_regions`: its number of
distinct annotated regions; `image_id`: the ImageId (the DICOM SOP instance UID);
`case_id`: the DICOM `PatientID` (the image id where it is blank); `study_id`
(`StudyInstanceUID`), `sex` (`PatientSex`), `age` (years, from `PatientAge`; NaN
when blank) and `view_position` (`ViewPosition`: PA or AP).

Splits. The competition's test labels were never published, so every split comes
from the annotated images, case-disjoint and deterministic from a hash of `case_id`
(`common.hash_split`):

    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    bucket 0-79 -> 'train', 80-89 -> 'validation', 90-99 -> 'test'

Configs (`tfds_builders.common.ImageConfig`): `side512` (the default, as the other
chest X-ray builders) and any `side<N>` downscale each image (antialiased bicubic)
and its mask (nearest neighbour, so it stays binary) to a longest side of N;
`original` stores them at their published size.

Bad input stops the build with a one-line `bigssl_med.errors.DataError` naming the
file and line: no annotation table, a table without `ImageId` or `EncodedPixels`, a
row whose `EncodedPixels` is neither `-1` nor pairs of whole numbers, a run outside
its image, an image marked `-1` on one row and given a region on another, two `.dcm`
files of one ImageId, an annotated image without its `.dcm` file, a `.dcm` file that
is not DICOM or whose pixels cannot be decoded, an age that is not an age. With
`skip_bad_images`, an annotated image whose file is missing, unreadable or
undecodable is skipped instead and listed in the data set's `metadata.json`.

The set cannot be downloaded by the builder: download it from the competition's
Kaggle page (or the mirror of its files) and pass it as `--manual_dir`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from bigssl_med.errors import DataError
from tfds_builders import common
from tfds_builders import dicom
from tfds_builders import nlm_tb

CLASS_NAMES = ('no_pneumothorax', 'pneumothorax')
SPLIT_NAMES = ('train', 'validation', 'test')
ANNOTATION_FILES = ('stage_2_train.csv', 'train-rle.csv')  # preferred first
COLUMNS = ('ImageId', 'EncodedPixels')
NO_REGION = '-1'
RELATIVE, ABSOLUTE = 'relative', 'absolute'
HOMEPAGE = 'https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation'
_EXPECTED_AGE = '38, 038Y (the DICOM age string) or blank'

_DESCRIPTION = """\
SIIM-ACR Pneumothorax Segmentation (Society for Imaging Informatics in Medicine and
American College of Radiology, 2019): frontal chest radiographs in DICOM, drawn from
the NIH ChestX-ray14 collection, annotated by radiologists with the regions of
pneumothorax as run-length encoded masks. Stored here: the gray image, the union of
its regions as a mask (`mask`, 0 or 255; empty for an image without pneumothorax), a
label (pneumothorax or not) and the DICOM header's patient, study, sex, age and view.

Splits are not official (the competition's test labels were not published):
case-disjoint train/validation/test (80/10/10 by patient) from a SHA-256 hash of the
case id, over the annotated images.
"""

_CITATION = """\
@misc{siim2019pneumothorax,
  title={{SIIM-ACR} Pneumothorax Segmentation},
  author={{Society for Imaging Informatics in Medicine} and {American College of
          Radiology}},
  howpublished={Kaggle competition,
                \\url{https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation}},
  year={2019}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The builder does not download SIIM-ACR Pneumothorax Segmentation. Download the
competition's files from its Kaggle page (or a mirror of them): the DICOM images
(dicom-images-train/, dicom-images-test/ or stage_2_images/) and the annotation table
(train-rle.csv or stage_2_train.csv), and pass the folder holding them (or any folder
above it) as --manual_dir.
"""


@dataclasses.dataclass(frozen=True)
class Annotation:
  """An image's rows of the table: its regions' runs (distinct, in order of their
  first row; none for `-1`) and where its first row is."""
  image_id: str
  regions: tuple[tuple[int, ...], ...]
  where: str


@dataclasses.dataclass(frozen=True)
class Entry:
  """An annotated image with its file and header, ready to store."""
  annotation: Annotation
  path: str
  header: dicom.Header
  case_id: str
  age: float

  @property
  def where(self) -> str:
    return f'image_id {self.annotation.image_id}'


def parse_runs(text: str, *, where: str) -> tuple[int, ...] | None:
  """The numbers of one `EncodedPixels` field; None for `-1` (no pneumothorax).

  Raises:
    DataError: empty, not whole numbers, an odd count, a negative number or a run of
      length 0 (names `where`).
  """
  text = text.strip()
  if text == NO_REGION:
    return None
  if not text:
    raise DataError(f'{where}: EncodedPixels is empty; expected {NO_REGION} (no '
                    'pneumothorax) or runs of start and length')
  try:
    numbers = tuple(int(token) for token in text.split())
  except ValueError as exc:
    bad = next(t for t in text.split() if not t.lstrip('-').isdigit())
    raise DataError(f'{where}: EncodedPixels holds {bad!r}; expected whole numbers '
                    '(runs of start and length) or -1') from exc
  if len(numbers) % 2:
    raise DataError(f'{where}: EncodedPixels has {len(numbers)} numbers; expected pairs '
                    'of start and length')
  if min(numbers) < 0:
    raise DataError(f'{where}: EncodedPixels holds {min(numbers)}; runs are pairs of '
                    'non-negative start and positive length (-1 alone: no pneumothorax)')
  if 0 in numbers[1::2]:
    raise DataError(f'{where}: EncodedPixels has a run of length 0')
  return numbers


def read_annotations(path: str) -> list[Annotation]:
  """The table's images in order of their first row.

  Raises:
    DataError: a missing column, a blank ImageId, a field `parse_runs` refuses, or an
      image marked `-1` on one row and given a region on another (names the file and
      lines).
  """
  _, rows = common.read_table(path, COLUMNS)
  regions: dict[str, list[tuple[int, ...]]] = {}
  first: dict[str, str] = {}
  marked_none: dict[str, str] = {}
  with_region: dict[str, str] = {}
  for row in rows:
    where = f'{path} line {row.line}'
    image_id = row.get('ImageId')
    if not image_id:
      raise DataError(f'{where}: ImageId is empty')
    runs = parse_runs(row.get('EncodedPixels'), where=where)
    first.setdefault(image_id, where)
    found = regions.setdefault(image_id, [])
    if runs is None:
      marked_none.setdefault(image_id, where)
    else:
      with_region.setdefault(image_id, where)
      if runs not in found:
        found.append(runs)
    if image_id in marked_none and image_id in with_region:
      raise DataError(f'image {image_id} is marked {NO_REGION} (no pneumothorax) at '
                      f'{marked_none[image_id]} and has a region at {with_region[image_id]}')
  return [Annotation(image_id=i, regions=tuple(r), where=first[i]) for i, r in regions.items()]


def rle_encoding(annotations: Iterable[Annotation]) -> str:
  """`RELATIVE` or `ABSOLUTE`: the form of a table's runs (see the module docstring)."""
  several = False
  for annotation in annotations:
    for numbers in annotation.regions:
      starts, lengths = numbers[0::2], numbers[1::2]
      for k in range(1, len(starts)):
        several = True
        if starts[k] < starts[k - 1] + lengths[k - 1]:
          return RELATIVE
  return ABSOLUTE if several else RELATIVE


def run_bounds(numbers: Sequence[int], encoding: str) -> tuple[np.ndarray, np.ndarray]:
  """0-based (begins, ends) of one region's runs in the column-major pixel order."""
  starts = np.asarray(numbers[0::2], np.int64)
  lengths = np.asarray(numbers[1::2], np.int64)
  if encoding == RELATIVE:
    begins = np.cumsum(starts) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
  else:
    begins = starts - 1
  return begins, begins + lengths


def check_runs(annotation: Annotation, encoding: str, *, height: int, width: int,
               path: str) -> None:
  """Fails for a run outside the image.

  Raises:
    DataError: names the table's row, the image's size and the form read.
  """
  for numbers in annotation.regions:
    begins, ends = run_bounds(numbers, encoding)
    if begins.min() < 0 or ends.max() > height * width:
      bad = int(np.argmax((begins < 0) | (ends > height * width)))
      raise DataError(
          f'{annotation.where}: run {bad + 1} ({numbers[2 * bad]} {numbers[2 * bad + 1]}) '
          f'falls outside the {width}x{height} image {path} (runs read as {encoding}, '
          f'column-major)')


def decode_mask(regions: Sequence[Sequence[int]], encoding: str, *, height: int,
                width: int) -> np.ndarray:
  """bool [height, width]: the union of the regions' runs (checked by `check_runs`)."""
  flat = np.zeros(height * width, bool)
  for numbers in regions:
    for begin, end in zip(*run_bounds(numbers, encoding)):
      flat[begin:end] = True
  return flat.reshape(width, height).T


def parse_age(text: str, *, where: str) -> float:
  """Years from `PatientAge` (`38`, `038Y`, `006M`, ...); NaN when blank.

  Raises:
    DataError: any other text (names `where`).
  """
  return nlm_tb.parse_age(text, where=where, expected=_EXPECTED_AGE)


def split_for_case(case_id: str) -> str:
  """The split ('train', 'validation' or 'test') of a case: 80/10/10 by case hash."""
  return common.hash_split(case_id, validation=10, test=10)


class SiimAcrPneumothorax(common.ImageBuilder):
  """SIIM-ACR chest X-rays with pneumothorax masks, labels and DICOM header fields.

  Splits (no official ones with labels): case-disjoint, from
  `int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100`: buckets 0-79
  `train`, 80-89 `validation`, 90-99 `test`. Example keys are image ids.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Gray images from DICOM, union pneumothorax masks from the RLE table, '
               'labels, patient, study, sex, age and view; case-hash splits.',
  }
  BUILDER_CONFIGS = common.downscaled_configs(512, 'Images and masks as published '
                                                   '(1024x1024).')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.new_metadata()
    metadata.update(annotation_file='', rle_encoding='', num_unannotated_images=0,
                    num_images_without_patient_id=0)
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            **dicom.features(),
            'mask': tfds.features.Image(
                shape=(None, None, 1), encoding_format='png',
                doc='Union of the annotated pneumothorax regions (0 background, 255 '
                    'pneumothorax); all 0 without pneumothorax.'),
            'label': tfds.features.ClassLabel(
                names=CLASS_NAMES, doc='pneumothorax when the image has a region.'),
            'num_regions': tfds.features.Scalar(
                dtype=np.int32, doc='Distinct annotated regions (rows of the table).'),
            'image_id': tfds.features.Text(
                doc='ImageId, the DICOM SOP instance UID (the file stem).'),
            'case_id': tfds.features.Text(
                doc='DICOM PatientID (the image id where blank): the grouping unit.'),
            'study_id': tfds.features.Text(doc='DICOM StudyInstanceUID.'),
        }),
        supervised_keys=('image', 'label'),
        metadata=metadata,
        homepage=HOMEPAGE,
        citation=_CITATION,
        license='See the competition\'s data page for the terms of use.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = common.manual_dir_or_none(dl_manager)
    if manual_dir is None:
      raise DataError('SIIM-ACR Pneumothorax Segmentation is not downloaded by the '
                      f'builder: download the competition\'s files ({HOMEPAGE}) and pass the '
                      'folder holding the .dcm images and train-rle.csv (or '
                      'stage_2_train.csv) as --manual_dir (main.py: '
                      '--config.data.manual_dir=DIR)')
    table = common.find_file(manual_dir, ANNOTATION_FILES, 'SIIM-ACR annotation table')
    annotations = read_annotations(table)
    if not annotations:
      raise DataError(f'{table}: no annotated image')
    encoding = rle_encoding(annotations)
    logging.info('SIIM-ACR: %d annotated images in %s, runs read as %s', len(annotations),
                 table, encoding)
    images = dicom.find_files(manual_dir)
    unannotated = dicom.count_unlisted(images, (a.image_id for a in annotations),
                                       what='SIIM-ACR', manual_dir=manual_dir, table=table)
    self.info.metadata.update(annotation_file=os.path.basename(table), rle_encoding=encoding,
                              num_unannotated_images=unannotated)
    store = self.image_store(channels=1)
    entries = self._entries(annotations, images, encoding, store)
    by_split = {split: [] for split in SPLIT_NAMES}
    for entry in entries:
      by_split[split_for_case(entry.case_id)].append(entry)
    store.check_no_split_emptied(by_split, 'siim_acr_pneumothorax')
    empty = [split for split, items in by_split.items() if not items]
    if empty:  # TFDS cannot write an empty split; only tiny inputs get here.
      logging.warning('SIIM-ACR from %s: no case hashes into split(s) %s; they are left out.',
                      manual_dir, ', '.join(empty))
    return {split: self._generate_examples(items, split, encoding, store)
            for split, items in by_split.items() if items}

  def _entries(self, annotations, images, encoding, store) -> list[Entry]:
    """The annotated images with their headers, runs checked; missing or unreadable
    files skipped (when asked) or raised, in table order."""
    by_id = {annotation.image_id: annotation for annotation in annotations}
    entries, without_patient = [], 0
    for image_id, path, read in dicom.listed_headers(
        [(a.image_id, a.where) for a in annotations], images, store, split_for_case):
      annotation = by_id[image_id]
      check_runs(annotation, encoding, height=read.rows, width=read.columns, path=path)
      case_id = read.patient_id or annotation.image_id
      without_patient += not read.patient_id
      age = parse_age(read.age, where=f'{path} PatientAge')
      entries.append(Entry(annotation=annotation, path=path, header=read, case_id=case_id,
                           age=age))
    if without_patient:
      logging.warning('SIIM-ACR: %d image(s) without a PatientID; each is its own case',
                      without_patient)
    self.info.metadata['num_images_without_patient_id'] = without_patient
    return entries

  def _generate_examples(self, entries, split, encoding, store):
    def load(entry):  # on a worker thread: the stored image and mask, or a Failed
      image = store.try_load(entry.path, where=entry.where)  # DICOM: common.read_image
      if isinstance(image, common.Failed):
        return image
      mask = decode_mask(entry.annotation.regions, encoding, height=entry.header.rows,
                         width=entry.header.columns)
      return image, common.encode_mask(mask, common.encoded_size(image))

    for entry, (image, mask) in store.each(entries, load, split=split,
                                           what=f'siim_acr_pneumothorax {split}'):
      regions = entry.annotation.regions
      yield entry.annotation.image_id, {
          'image': image,
          'mask': mask,
          'label': CLASS_NAMES[bool(regions)],
          'num_regions': np.int32(len(regions)),
          'image_id': entry.annotation.image_id,
          'case_id': entry.case_id,
          'study_id': entry.header.study_id,
          'sex': entry.header.sex,
          'age': np.float32(entry.age),
          'view_position': entry.header.view,
      }

