"""TFDS builder for the Montgomery County chest X-ray set: lungs, TB labels, readings.

Input layout: the release (`NLM-MontgomeryCXRSet.zip`) unpacks to `MontgomerySet/`:

* `CXR_png/MCUCXR_0001_0.png`, ...: 138 frontal chest X-rays; the digit after the
  last underscore is the label (0 normal, 1 tuberculosis);
* `ManualMask/leftMask/<name>.png` and `ManualMask/rightMask/<name>.png`: the
  manual segmentation of each lung, of the image's size;
* `ClinicalReadings/<stem>.txt`: `Patient's Sex: M`, `Patient's Age: 045Y` (the
  DICOM age string), then the radiologist's reading as free text;
* `NLM-MontgomeryCXRSet-ReadMe.pdf` (not read).

`manual_dir` may be `MontgomerySet/` itself or any folder above it: the set's
folder is the one holding `CXR_png/`, looked up directly in `manual_dir`, then
the shallowest below it (between folders at the same depth, the first in sorted
order). Files in `CXR_png/` other than `.png` are ignored (a warning counts them).

Features. `image`: the X-ray, gray, one channel; `mask`: the union of the left-
and right-lung masks (0 background, 255 lung; a mask pixel counts as lung when it
is not 0); `label`: normal or tuberculosis, from the file name; `image_id`: the
file stem; `case_id`: the same (one image per patient); `sex`, `age` (years) and
`reading` from the clinical reading. An image without a clinical reading has
`sex` empty, `age` NaN and `reading` empty; the build warns and lists such images
in `metadata['images_without_reading']`.

Splits. The release has no official split. Splits are case-disjoint and
deterministic, derived from a hash of `case_id` (`common.hash_split`):

    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    bucket 0-79 -> 'train', 80-89 -> 'validation', 90-99 -> 'test'

Configs (`tfds_builders.common.ImageConfig`): `side512` (the default, as the other
chest X-ray builders) and any `side<N>` downscale each image (antialiased bicubic)
and its mask (nearest neighbour, so it stays binary) to a longest side of N;
`original` stores them at their published size.

Bad input stops the build with a one-line `bigssl_med.errors.DataError` naming the
file: no `CXR_png/` folder, an image name that does not end in `_0` or `_1`, an
image without its left or right mask, a mask of another size than its image, an
image or mask that cannot be decoded, a clinical reading whose age is not an age.
With `skip_bad_images`, an image whose image or mask file is missing or
undecodable is skipped instead, and listed in the data set's `metadata.json`.

The set cannot be downloaded by the builder: download it from NLM's Tuberculosis
Chest X-ray Image Data Sets page and pass it as `--manual_dir`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from bigssl_med.errors import DataError
from tfds_builders import common
from tfds_builders import nlm_tb

CLASS_NAMES = nlm_tb.CLASS_NAMES
SPLIT_NAMES = ('train', 'validation', 'test')
IMAGE_FOLDER = nlm_tb.IMAGE_FOLDER
IMAGE_PREFIX = 'MCUCXR_'  # how the set's image names start
MASK_FOLDERS = {'left': os.path.join('ManualMask', 'leftMask'),
                'right': os.path.join('ManualMask', 'rightMask')}
READING_FOLDER = nlm_tb.READING_FOLDER
Reading = nlm_tb.Reading

# `Patient's Sex: M`, `Patient's Age: 045Y` (also written with `Patient Age`, `’`).
_FIELD_RE = re.compile(r"^\s*patient(?:['\u2019]s|s)?\s+(?P<field>sex|age)\s*:(?P<value>.*)$",
                       re.IGNORECASE)
_EXPECTED_AGE = '045Y, the DICOM age string, or a number of years'

_DESCRIPTION = """\
Montgomery County chest X-ray set (Jaeger et al., 2014; lung masks by Candemir et
al., 2014): 138 frontal (posterior-anterior) chest radiographs from the
tuberculosis control program of the Department of Health and Human Services of
Montgomery County, Maryland, USA, 80 normal and 58 with manifestations of
tuberculosis, released by the U.S. National Library of Medicine. Each image comes
with manual segmentations of the left and right lung, stored here as their union
(`mask`, 0 or 255), and a clinical reading: the patient's sex and age and the
radiologist's reading (`reading`). One image per patient: `case_id` is the image id.

Splits are not official: case-disjoint train/validation/test (80/10/10 by case)
from a SHA-256 hash of the case id.
"""

_CITATION = nlm_tb.CITATION + """\
@article{candemir2014lung,
  title={Lung segmentation in chest radiographs using anatomical atlases with nonrigid
         registration},
  author={Candemir, Sema and Jaeger, Stefan and Palaniappan, Kannappan and Musco,
          Jonathan P and Singh, Rahul K and Xue, Zhiyun and Karargyris, Alexandros
          and Antani, Sameer and Thoma, George and McDonald, Clement J},
  journal={IEEE Transactions on Medical Imaging},
  volume={33},
  number={2},
  pages={577--590},
  year={2014},
  doi={10.1109/TMI.2013.2290491}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The builder does not download the Montgomery County set. Download it from the U.S.
National Library of Medicine's Tuberculosis Chest X-ray Image Data Sets page
(NLM-MontgomeryCXRSet.zip), unzip it and pass the MontgomerySet folder (the one
with CXR_png/, ManualMask/ and ClinicalReadings/) or any folder above it as
--manual_dir.
"""


split_for_case = nlm_tb.split_for_case


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image of the set: its id, label, image file and the two mask files."""
  image_id: str
  label: str
  image: str
  masks: tuple[str, str]  # left, right


def find_root(manual_dir: str) -> str:
  """The set's folder: the one holding `CXR_png/` (see the module docstring).

  Raises:
    DataError: no `CXR_png` folder in or below `manual_dir`.
  """
  return nlm_tb.find_root(manual_dir, prefix=IMAGE_PREFIX,
                          what='the MontgomerySet folder (CXR_png/, ManualMask/, '
                               'ClinicalReadings/)')


def list_images(root: str) -> tuple[list[Entry], list[str]]:
  """The images of `root/CXR_png` in name order, and the other files found there.

  Raises:
    DataError: a PNG whose name does not end in `_0` or `_1` (names the file).
  """
  images, others = nlm_tb.list_images(root, example='MCUCXR_0001_0.png')
  entries = [Entry(image_id=image.image_id, label=image.label, image=image.path,
                   masks=tuple(os.path.join(root, MASK_FOLDERS[side], image.name)
                               for side in ('left', 'right')))
             for image in images]
  return entries, others


def read_reading(path: str) -> Reading:
  """Parses one clinical reading file (see the module docstring).

  The `Patient's Sex` and `Patient's Age` lines give `sex` (as written) and `age`
  (years; a DICOM age string `nnnY`, `nnnM`, `nnnW`, `nnnD`, or a number); the
  other lines, stripped of blank lines at either end, are the text. Text that is
  not UTF-8 is read as Latin-1.

  Raises:
    DataError: the file cannot be read, or its age is not an age (names the
      file and line).
  """
  sex, age, lines = '', math.nan, []
  for number, line in enumerate(nlm_tb.text_lines(nlm_tb.read_text(path)), 1):
    match = _FIELD_RE.match(line)
    if match is None:
      lines.append(line)
    elif match['field'].lower() == 'sex':
      sex = match['value'].strip()
    else:
      age = parse_age(match['value'], where=f'{path} line {number}')
  return Reading(sex=sex, age=age, text=nlm_tb.join_text(lines))


def parse_age(text: str, *, where: str) -> float:
  """Years from a DICOM age string (`045Y`, `006M`, ...), a number or `45 years`;
  NaN when blank or marked unknown (`nlm_tb.parse_age`).

  Raises:
    DataError: any other text; names `where`.
  """
  return nlm_tb.parse_age(text, where=where, expected=_EXPECTED_AGE)




class Montgomery(common.ImageBuilder):
  """Montgomery County chest X-rays with lung masks, TB labels and clinical readings.

  Splits (no official ones): case-disjoint, from
  `int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100`: buckets 0-79
  `train`, 80-89 `validation`, 90-99 `test`. Example keys are image ids.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Gray images, union lung masks, TB labels, sex, age and readings; '
               'case-hash splits.',
  }
  BUILDER_CONFIGS = common.downscaled_configs(
      512, 'Images and masks as published (about 4020x4892).')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.new_metadata()
    metadata['images_without_reading'] = []
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(nlm_tb.features(
            example_id='MCUCXR_0001_0', mask=True,
            sex_doc='As written in the clinical reading (M, F); empty when unknown.')),
        supervised_keys=('image', 'label'),
        metadata=metadata,
        homepage=nlm_tb.HOMEPAGE,
        citation=_CITATION,
        license='See NLM-MontgomeryCXRSet-ReadMe.pdf in the release for the terms of use.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = nlm_tb.set_root(dl_manager, name='Montgomery County', folder='MontgomerySet',
                           contents='CXR_png/, ManualMask/, ClinicalReadings/',
                           prefix=IMAGE_PREFIX)
    entries, others = list_images(root)
    nlm_tb.check_images(entries, others, root, 'Montgomery')
    store = self.image_store(channels=1)
    by_split = {split: [] for split in SPLIT_NAMES}
    without_reading = []
    for entry in entries:
      where = f'image_id {entry.image_id}'
      split = split_for_case(entry.image_id)
      missing = next((path for path in entry.masks if not os.path.isfile(path)), None)
      if missing is not None:
        message = f'{missing}: mask file of {entry.image} not found'
        if not store.skip_bad_images:
          raise DataError(message)
        store.skip(path=missing, where=where, split=split, reason=message)
        continue
      reading = nlm_tb.reading_of(root, entry.image_id, read_reading)
      if reading is None:
        reading = Reading()
        without_reading.append(entry.image_id)
      by_split[split].append((entry, reading, where))
    nlm_tb.warn_without_reading('Montgomery', root, without_reading)
    self.info.metadata['images_without_reading'] = without_reading
    store.check_no_split_emptied(by_split, 'montgomery')
    empty = [split for split, items in by_split.items() if not items]
    if empty:  # TFDS cannot write an empty split; only tiny inputs get here.
      logging.warning('Montgomery from %s: no case hashes into split(s) %s; they are left '
                      'out.', root, ', '.join(empty))
    return {split: self._generate_examples(items, split, store)
            for split, items in by_split.items() if items}

  def _generate_examples(self, items, split, store):
    def load(item):  # on a worker thread: the stored image and mask, or a Failed
      entry, _, where = item
      published = []  # the file's bytes, read once for the image and its size

      def read():
        published.append(common.read_image_file(entry.image, where))
        return published[-1]

      image = store.try_convert(read, path=entry.image, where=where)
      if isinstance(image, common.Failed):
        return image
      lung = None
      for path in entry.masks:  # the stored mask is the union of both lungs
        try:
          side = common.load_mask_foreground(path, where,
                                                 common.encoded_size(published[-1]))
        except common.MaskSizeError:
          raise
        except DataError as exc:
          return common.Failed(path, where, exc)
        lung = side if lung is None else lung | side
      return image, common.encode_mask(lung, common.encoded_size(image))

    for (entry, reading, _), (image, mask) in store.each(items, load, split=split,
                                                         what=f'montgomery {split}'):
      yield entry.image_id, {
          'image': image,
          'mask': mask,
          'label': entry.label,
          'image_id': entry.image_id,
          'case_id': entry.image_id,
          'sex': reading.sex,
          'age': np.float32(reading.age),
          'reading': reading.text,
      }
