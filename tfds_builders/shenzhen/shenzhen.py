"""TFDS builder for the Shenzhen chest X-ray set: TB labels, sex, age and readings.

Input layout: the release's zip unpacks to `ChinaSet_AllFiles/`:

* `CXR_png/CHNCXR_0001_0.png`, ...: 662 frontal chest X-rays; the digit after the
  last underscore is the label (0 normal, 1 tuberculosis);
* `ClinicalReadings/<stem>.txt`: the patient's sex and age on the first line
  (`male 45yrs`), then the radiologist's reading as free text (`normal`, `PTB in the
  left upper field`);
* `NLM-ChinaCXRSet-ReadMe.docx` (not read).

`manual_dir` may be `ChinaSet_AllFiles/` itself or any folder above it: the set's
folder is the one holding `CXR_png/`, looked up directly in `manual_dir`, then the
shallowest below it (between folders at the same depth, the first in sorted order).
Files in `CXR_png/` other than `.png` are ignored (a warning counts them). The lung
masks others published for this set are not read.

Features. `image`: the X-ray, gray, one channel; `label`: normal or tuberculosis, from
the file name; `image_id`: the file stem; `case_id`: the same (one image per patient);
`sex`, `age` (years) and `reading` from the clinical reading. Its first line that is
not blank gives sex and age when it is a sex word (`male`, `female`, `M`, `F`, in any
letter case; stored as `M` or `F`) followed by an age (`45yrs`, `45 yrs`, `45yr`, `45`,
`45 years`; months and days as `6 months`, `10 days`) or nothing, or an age alone; a
comma may separate them. The other lines, stripped of blank lines at either end, are
`reading`. A reading without that line has `sex` empty and `age` NaN, and all its
lines are `reading`. An image without a clinical reading has `sex` empty, `age` NaN
and `reading` empty; the build warns and lists such images in
`metadata['images_without_reading']`.

Splits. The release has no official split. Two families of configs:

* `side512` (the default, as the other chest X-ray builders), `original` and any
  `side<N>`: case-disjoint, deterministic splits from a hash of `case_id`
  (`common.hash_split`):

      bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
      bucket 0-79 -> 'train', 80-89 -> 'validation', 90-99 -> 'test'

* `benchmark_side512`, `benchmark_original` and any `benchmark_side<N>`: the
  transfer-learning benchmark's own split lists, `ShenzenCXR_train_data.txt`,
  `ShenzenCXR_valid_data.txt` and `ShenzenCXR_test_data.txt` (its spelling), one line
  per image, `CHNCXR_0578_1.png,1` (file name, label), found as the shallowest file of
  that name in or below `manual_dir`; they make `train`, `validation` and `test`.
  Images that no list names are left out, counted and listed in the metadata
  (`num_unlisted_images`, `unlisted_images`); `metadata['split_lists']` names the
  lists read.

The split scheme is a builder config rather than a property of the input, so that a
build's name says which splits it holds (`shenzhen/side512` and
`shenzhen/benchmark_side512` are built side by side) and list files placed in
`manual_dir` never change what a config builds.

`side<N>` downscales each image (antialiased bicubic) to a longest side of N;
`original` stores them at their published size.

Bad input stops the build with a one-line `bigssl_med.errors.DataError` naming the
file: no `CXR_png/` folder, an image name that does not end in `_0` or `_1`, an image
that cannot be decoded, a clinical reading whose first line names the sex but not an
age after it (`male old`); for the benchmark configs, a split list that is missing, a
line that is not `NAME.png,0` or `NAME.png,1`, a listed file that `CXR_png/` lacks, a
listed label that the file name contradicts, an image listed twice (in one list or
two), or a list without images (these name the list and line). With
`skip_bad_images`, an image that cannot be decoded, or that a list names but
`CXR_png/` lacks, is skipped instead, and listed in the data set's `metadata.json`.

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
BENCHMARK_PREFIX = 'benchmark_'
# The transfer-learning benchmark's split lists, with its spelling of the set's name.
SPLIT_LISTS = {'train': 'ShenzenCXR_train_data.txt',
               'validation': 'ShenzenCXR_valid_data.txt',
               'test': 'ShenzenCXR_test_data.txt'}
Reading = nlm_tb.Reading

# The sex word first (`male`, `Female,`, `M`; the release's misspellings `femal`, `fmale`,
# `famale` too), then whatever follows: the age, and perhaps the start of the reading.
_SEX_RE = re.compile(r'^(?P<sex>female|femal|famale|fmale|male|m|f)(?![a-z/\-])'
                     r'[\s,;:，；：\u3000]*(?P<rest>.*)$', re.IGNORECASE)
_SEX_CODES = {'male': 'M', 'm': 'M', 'female': 'F', 'femal': 'F', 'famale': 'F',
              'fmale': 'F', 'f': 'F'}
_EXPECTED_AGE = "45yrs, as in 'male 45yrs'"

_DESCRIPTION = """\
Shenzhen chest X-ray set (Jaeger et al., 2014): 662 frontal chest radiographs from
Shenzhen No.3 People's Hospital, Guangdong Medical College, Shenzhen, China, 326
normal and 336 with manifestations of tuberculosis, released by the U.S. National
Library of Medicine. Each image comes with a clinical reading: the patient's sex and
age and the radiologist's reading (`reading`). One image per patient: `case_id` is the
image id.

Splits are not official. The default configs split case-disjoint train/validation/test
(80/10/10 by case) from a SHA-256 hash of the case id; the `benchmark_*` configs take
the transfer-learning benchmark's train, validation and test lists.
"""

_CITATION = nlm_tb.CITATION

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The builder does not download the Shenzhen set. Download it from the U.S. National
Library of Medicine's Tuberculosis Chest X-ray Image Data Sets page, unzip it and pass
the ChinaSet_AllFiles folder (the one with CXR_png/ and ClinicalReadings/) or any folder
above it as --manual_dir. The
benchmark_* configs also need the transfer-learning benchmark's split lists
(ShenzenCXR_train_data.txt, ShenzenCXR_valid_data.txt, ShenzenCXR_test_data.txt) in
or below that folder.
"""


split_for_case = nlm_tb.split_for_case  # the default configs' splits


@dataclasses.dataclass
class ShenzhenConfig(common.ImageConfig):
  """Config of `Shenzhen`.

  Attributes:
    split_lists: take the splits from the benchmark's split lists (`benchmark_*`
      configs) instead of the case hash.
  """
  split_lists: bool = False


def _config(name: str, max_side: int | None) -> ShenzhenConfig:
  split_lists = name.startswith(BENCHMARK_PREFIX)
  size = ('as published' if max_side is None else
          f'downscaled (antialiased) to a longest side of at most {max_side}')
  splits = ("the transfer-learning benchmark's split lists" if split_lists else
            'case-hash splits (80/10/10)')
  return ShenzhenConfig(name=name, max_side=max_side, split_lists=split_lists,
                        description=f'Images {size}; {splits}.')


def read_split_line(line: str, *, where: str) -> tuple[str, int]:
  """(file name, label) of one line of a split list, `CHNCXR_0578_1.png,1`.

  Raises:
    DataError: any other line; names `where`.
  """
  fields = [field.strip() for field in line.split(',')]
  if len(fields) != 2 or not fields[0] or fields[1] not in ('0', '1'):
    raise DataError(f'{where}: expected a file name and its label, 0 (normal) or 1 '
                    f'(tuberculosis), as CHNCXR_0578_1.png,1; got {line.strip()!r}')
  return fields[0], int(fields[1])


def find_split_lists(manual_dir: str) -> dict[str, str]:
  """split -> path of the benchmark's list for it (the shallowest file of its name in or
  below `manual_dir`).

  Raises:
    DataError: a list not found (names it and `manual_dir`).
  """
  train = common.find_file(manual_dir, [SPLIT_LISTS['train']], 'benchmark train list')
  folder = os.path.dirname(train)
  lists = {'train': train}
  for split in ('validation', 'test'):
    lists[split] = os.path.join(folder, SPLIT_LISTS[split])
    if not os.path.isfile(lists[split]):
      raise DataError(f'{lists[split]} not found: the benchmark lists are read from one '
                      f'folder, the one of {train}')
  return lists


def read_split_lists(lists: dict[str, str], images: list[nlm_tb.Listed]
                     ) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
  """The images each benchmark list names, checked against `CXR_png/`.

  Args:
    lists: split -> list file (`find_split_lists`).
    images: the images of `CXR_png/` (`nlm_tb.list_images`).

  Returns:
    (split -> [(file name, where)] in list order, `where` naming list and line;
    the ids of the images no list names, in name order).

  Raises:
    DataError: a list that cannot be read or is not UTF-8, a bad line, a listed label
      that the file name contradicts, a file listed twice, or a list without images
      (naming the list and line). A listed file that `CXR_png/` lacks is not checked
      here: the caller decides whether it is an error or a skip.
  """
  by_name = {image.name: image for image in images}
  first: dict[str, str] = {}
  listed: dict[str, list[tuple[str, str]]] = {}
  for split, path in lists.items():
    try:
      with open(path, 'rb') as f:
        text = f.read().decode('utf-8-sig')
    except UnicodeDecodeError as exc:
      raise DataError(f'{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at '
                      f'offset {exc.start})') from exc
    except OSError as exc:
      raise DataError(f'{path}: cannot read split list ({common.one_line(exc)})') from exc
    listed[split] = []
    for number, line in enumerate(nlm_tb.text_lines(text), 1):
      if not line.strip():
        continue
      where = f'{path} line {number}'
      name, label = read_split_line(line, where=where)
      if name in first:
        raise DataError(f'{name} is listed twice: {first[name]} and {where}; an image '
                        'belongs to one split')
      first[name] = where
      image = by_name.get(name)
      if image is not None and image.label != CLASS_NAMES[label]:
        raise DataError(f'{where}: {name} is listed with label {label} ({CLASS_NAMES[label]}) '
                        f'but its name says {image.label}')
      listed[split].append((name, where))
    if not listed[split]:
      raise DataError(f'{path}: no images listed (the benchmark {split} list)')
  unlisted = [image.image_id for image in images if image.name not in first]
  return listed, unlisted


def read_reading(path: str) -> Reading:
  """Parses one clinical reading file (see the module docstring).

  The first line that is not blank gives `sex` (`M` or `F`) and `age` (years) when it
  starts with a sex word or is an age; the other lines, stripped of blank lines at
  either end, are the text. Text that is not UTF-8 is read as Latin-1.

  Raises:
    DataError: the file cannot be read, or its first line names the sex but what
      follows is not an age (names the file and line).
  """
  lines = nlm_tb.text_lines(nlm_tb.read_text(path))
  number = next((i for i, line in enumerate(lines) if line.strip()), None)
  if number is None:
    return Reading()
  header = lines[number].strip()
  where = f'{path} line {number + 1}'
  match = _SEX_RE.match(header)
  following = lines[number + 1:]
  if match is not None:
    sex, rest = _SEX_CODES[match['sex'].lower()], match['rest']
    found = nlm_tb.leading_age(rest)
    if found is not None:  # `male 45yrs PTB in the left`: the reading starts on the line
      rest, start = found
      following = ([start] if start else []) + following
    age = nlm_tb.parse_age(rest, where=where, expected=_EXPECTED_AGE)
  elif nlm_tb.is_age(header):
    sex, age = '', nlm_tb.parse_age(header, where=where, expected=_EXPECTED_AGE)
  else:  # no sex and age line: all of it is the reading
    return Reading(text=nlm_tb.join_text(lines))
  return Reading(sex=sex, age=age, text=nlm_tb.join_text(following))


class Shenzhen(common.ImageBuilder):
  """Shenzhen chest X-rays with TB labels and clinical readings.

  Splits (no official ones): the default configs split case-disjointly, from
  `int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100`: buckets 0-79
  `train`, 80-89 `validation`, 90-99 `test`; the `benchmark_*` configs read the
  transfer-learning benchmark's split lists. Example keys are image ids.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': "Gray images, TB labels, sex, age and readings; case-hash splits, or the "
               "transfer-learning benchmark's split lists (benchmark_* configs).",
  }
  BUILDER_CONFIGS = [_config('side512', 512), _config(common.ORIGINAL, None),
                     _config(f'{BENCHMARK_PREFIX}side512', 512),
                     _config(f'{BENCHMARK_PREFIX}{common.ORIGINAL}', None)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  @classmethod
  def make_config(cls, config: str | None = None, *, max_side: int | None = None,
                  manual_dir: str | None = None) -> ShenzhenConfig:
    """The config to build: `original` or `side<N>` (case-hash splits), or either with
    the prefix `benchmark_` (the benchmark's split lists); None for the default
    (`side512`, or `side<max_side>`). A listed config is returned as that very object.

    Raises:
      DataError: an unknown config name, or one that contradicts `max_side`.
    """
    del manual_dir
    split_lists = config is not None and config.startswith(BENCHMARK_PREFIX)
    size = config[len(BENCHMARK_PREFIX):] if split_lists else config
    if size is not None and not common.is_size_name(size):
      raise DataError(f'unknown shenzhen config {config!r}; expected original or side<N> '
                      '(case-hash splits), or benchmark_original or benchmark_side<N> (the '
                      "benchmark's split lists), e.g. benchmark_side512")
    if size is not None and max_side is not None and common.max_side_of(size) != int(max_side):
      raise DataError(f'builder config {config!r} contradicts max_side={max_side}')
    sized = super().make_config(size, max_side=max_side)
    name = f'{BENCHMARK_PREFIX}{sized.name}' if split_lists else sized.name
    listed = cls.builder_configs.get(name)
    if listed is not None and listed.max_side == sized.max_side:
      return listed
    return _config(name, sized.max_side)

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.new_metadata()
    metadata['split_lists'] = {}
    metadata['images_without_reading'] = []
    metadata['readings_without_sex_age'] = []
    metadata['num_unlisted_images'] = 0
    metadata['unlisted_images'] = []
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(nlm_tb.features(
            example_id='CHNCXR_0001_0',
            sex_doc='M or F, from the clinical reading; empty when unknown.')),
        supervised_keys=('image', 'label'),
        metadata=metadata,
        homepage=nlm_tb.HOMEPAGE,
        citation=_CITATION,
        license='See NLM-ChinaCXRSet-ReadMe.docx in the release for the terms of use.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = nlm_tb.set_root(dl_manager, name='Shenzhen', folder='ChinaSet_AllFiles',
                           contents='CXR_png/, ClinicalReadings/', prefix='CHNCXR_')
    manual_dir = common.manual_dir_or_none(dl_manager)
    images, others = nlm_tb.list_images(root, example='CHNCXR_0001_0.png')
    nlm_tb.check_images(images, others, root, 'Shenzhen')
    folder = os.path.join(root, nlm_tb.IMAGE_FOLDER)
    store = self.image_store(channels=1)
    by_name = {image.name: image for image in images}
    if self.builder_config.split_lists:
      lists = find_split_lists(manual_dir)
      listed, unlisted = read_split_lists(lists, images)
      self.info.metadata['split_lists'] = lists
      self.info.metadata['unlisted_images'] = unlisted
      self.info.metadata['num_unlisted_images'] = len(unlisted)
      if unlisted:
        logging.warning('Shenzhen: %d image(s) of %s in none of the benchmark split lists '
                        'are left out (first: %s)', len(unlisted), folder, unlisted[0])
      assignments = []
      for split, names in listed.items():
        for name, where in names:
          image = by_name.get(name)
          if image is None:
            path = os.path.join(folder, name)
            message = f'{where}: {name} is not in {folder}'
            if not store.skip_bad_images:
              raise DataError(message)
            store.skip(path=path, where=where, split=split, reason=message)
            continue
          assignments.append((image, split, f'image_id {image.image_id}, {where}'))
    else:
      self._warn_if_lists_present(manual_dir)
      assignments = [(image, split_for_case(image.image_id), f'image_id {image.image_id}')
                     for image in images]
    by_split = {split: [] for split in SPLIT_NAMES}
    without_reading, without_sex_age = [], []
    for image, split, where in assignments:
      reading = nlm_tb.reading_of(root, image.image_id, read_reading)
      if reading is None:
        reading = Reading()
        without_reading.append(image.image_id)
      elif not reading.sex and math.isnan(reading.age):
        without_sex_age.append(image.image_id)
      by_split[split].append(common.Item(
          key=image.image_id, path=image.path, where=where, split=split,
          features={'label': image.label, 'image_id': image.image_id,
                    'case_id': image.image_id, 'sex': reading.sex,
                    'age': np.float32(reading.age), 'reading': reading.text}))
    nlm_tb.warn_without_reading('Shenzhen', root, without_reading)
    self.info.metadata['images_without_reading'] = sorted(without_reading)
    if without_sex_age:
      logging.warning('Shenzhen: %d clinical reading(s) do not start with the sex and age '
                      "(e.g. 'male 45yrs'); their sex is empty and age NaN, and the whole "
                      "text is the reading (metadata['readings_without_sex_age']): %s",
                      len(without_sex_age), ', '.join(sorted(without_sex_age)[:10]))
    self.info.metadata['readings_without_sex_age'] = sorted(without_sex_age)
    store.check_no_split_emptied(by_split, 'shenzhen')
    empty = [split for split, items in by_split.items() if not items]
    if empty:  # TFDS cannot write an empty split; only tiny inputs get here.
      logging.warning('Shenzhen from %s: no case hashes into split(s) %s; they are left '
                      'out.', root, ', '.join(empty))
    return {split: self._generate_examples(items, store)
            for split, items in by_split.items() if items}

  def _generate_examples(self, items, store):
    return common.generate_examples(items, store, 'shenzhen')

  def _warn_if_lists_present(self, manual_dir: str) -> None:
    """Logs that the benchmark's lists are in `manual_dir` but this config splits by
    case hash (the `benchmark_*` configs read them)."""
    try:
      found = common.find_file(manual_dir, [SPLIT_LISTS['train']], 'benchmark train list')
    except DataError:
      return
    logging.info('Shenzhen: %s is not read by config %s (case-hash splits); the '
                 "benchmark's splits are config %s%s.", found, self.builder_config.name,
                 BENCHMARK_PREFIX, self.builder_config.name)

