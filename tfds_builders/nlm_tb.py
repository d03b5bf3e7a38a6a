"""What the builders of NLM's tuberculosis chest X-ray sets (`montgomery`, `shenzhen`) share.

Both releases of the U.S. National Library of Medicine's Tuberculosis Chest X-ray Image
Data Sets unpack to a folder (`MontgomerySet/`, `ChinaSet_AllFiles/`) holding
`CXR_png/<NAME>_<0|1>.png`, the digit after the last underscore being the label (0
normal, 1 tuberculosis), and `ClinicalReadings/<stem>.txt`: the patient's sex and age,
then the radiologist's reading as free text. Each set writes sex and age its own way;
this module finds the set's folder, lists its images, reads reading files and ages.

Errors are one-line `bigssl_med.errors.DataError`s that name the file (and line).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from bigssl_med import files
from bigssl_med.errors import DataError
from tfds_builders import common

CLASS_NAMES = ('normal', 'tuberculosis')
IMAGE_FOLDER = 'CXR_png'
READING_FOLDER = 'ClinicalReadings'
HOMEPAGE = ('https://lhncbc.nlm.nih.gov/LHC-publications/pubs/'
            'TuberculosisChestXrayImageDataSets.html')

# The paper both NLM TB sets are published with.
CITATION = """\
@article{jaeger2014two,
  title={Two public chest {X}-ray datasets for computer-aided screening of pulmonary
         diseases},
  author={Jaeger, Stefan and Candemir, Sema and Antani, Sameer and W{\\'a}ng,
          Y{\\`i}-Xi{\\'a}ng J and Lu, Pu-Xuan and Thoma, George},
  journal={Quantitative Imaging in Medicine and Surgery},
  volume={4},
  number={6},
  pages={475--477},
  year={2014},
  doi={10.3978/j.issn.2223-4292.2014.11.20}
}
"""
_IMAGE_RE = re.compile(r'^(?P<id>.+)\.png$', re.IGNORECASE)
_LABEL_RE = re.compile(r'_(?P<label>[01])$')
# A number of years, or a number and its unit: `045Y` (the DICOM age string), `006M`,
# `45yrs`, `45 yrs`, `45yr`, `52 years`, `3 months`, `10 days`.
_AGE_RE = re.compile(r'^(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)\.?$', re.IGNORECASE)
_DAYS_PER_YEAR = 365.25
_YEARS_PER_UNIT = {}
for _units, _years in ((('', 'y', 'yr', 'yrs', 'year', 'years'), 1.0),
                       (('m', 'mo', 'mos', 'month', 'months'), 1.0 / 12.0),
                       (('w', 'wk', 'wks', 'week', 'weeks'), 7.0 / _DAYS_PER_YEAR),
                       (('d', 'day', 'days'), 1.0 / _DAYS_PER_YEAR)):
  _YEARS_PER_UNIT.update(dict.fromkeys(_units, _years))
MISSING_AGE = frozenset({'', 'na', 'n/a', 'nan', 'null', 'none', 'unknown', '?'})


@dataclasses.dataclass(frozen=True)
class Reading:
  """What a clinical reading file says: sex, age in years (NaN when unknown) and the
  free text."""
  sex: str = ''
  age: float = math.nan
  text: str = ''


@dataclasses.dataclass(frozen=True)
class Listed:
  """One image of `CXR_png/`: its id (the file stem), label (from the name) and path."""
  image_id: str
  label: str
  path: str

  @property
  def name(self) -> str:
    """The file name, e.g. `CHNCXR_0001_0.png`."""
    return os.path.basename(self.path)


def split_for_case(case_id: str) -> str:
  """The split ('train', 'validation' or 'test') of a case id: 80/10/10 by case hash."""
  return common.hash_split(case_id, validation=10, test=10)


def features(*, example_id: str, sex_doc: str, mask: bool = False) -> dict[str, Any]:
  """The features of an NLM TB set's records: a gray image, the label of its file name,
  `image_id` = `case_id` (one image per patient), `sex`, `age` and `reading`, and with
  `mask` the lungs' mask. `example_id` is a published id (`MCUCXR_0001_0`)."""
  found = {
      'image': tfds.features.Image(
          shape=(None, None, 1), encoding_format='png',
          doc='Frontal chest X-ray, 8-bit gray PNG (one channel).'),
      'label': tfds.features.ClassLabel(
          names=CLASS_NAMES, doc='From the file name: _0 normal, _1 tuberculosis.'),
      'image_id': tfds.features.Text(doc=f'File stem, e.g. {example_id}.'),
      'case_id': tfds.features.Text(
          doc='The image id (one image per patient): the grouping unit.'),
      'sex': tfds.features.Text(doc=sex_doc),
      'age': tfds.features.Scalar(dtype=np.float32, doc='Age in years; NaN when unknown.'),
      'reading': tfds.features.Text(
          doc="The clinical reading's free text (empty when there is none)."),
  }
  if mask:
    found['mask'] = tfds.features.Image(
        shape=(None, None, 1), encoding_format='png',
        doc='Union of the manual left- and right-lung masks (0 background, 255 lung).')
  return found


def set_root(dl_manager: tfds.download.DownloadManager, *, name: str, folder: str,
             contents: str, prefix: str) -> str:
  """The set's folder under the manual dir (`find_root`).

  Args:
    dl_manager: the build's download manager (its manual dir).
    name: the set, for messages ('Montgomery County').
    folder: the folder its zip unpacks to ('MontgomerySet').
    contents: what that folder holds, for messages ('CXR_png/, ClinicalReadings/').
    prefix: how its image names start ('MCUCXR_').

  Raises:
    DataError: no manual dir (the builder does not download NLM's sets), or no
      `CXR_png` folder in or below it.
  """
  manual_dir = common.manual_dir_or_none(dl_manager)
  if manual_dir is None:
    raise DataError(f'the {name} set is not downloaded by the builder: download it from '
                    "NLM's Tuberculosis Chest X-ray Image Data Sets page, unzip it and pass "
                    f'the {folder} folder, or a folder above it, as --manual_dir (main.py: '
                    '--config.data.manual_dir=DIR)')
  return find_root(manual_dir, prefix=prefix, what=f'the {folder} folder ({contents})')


def check_images(images: Sequence[Any], others: Sequence[str], root: str, name: str) -> None:
  """Fails when `root/CXR_png` has no image; warns about the other files there.

  Raises:
    DataError: no .png image (names the folder).
  """
  folder = os.path.join(root, IMAGE_FOLDER)
  if not images:
    raise DataError(f'{folder}: no .png images')
  if others:
    logging.warning('%s: %d file(s) in %s that are not .png ignored (first: %s)', name,
                    len(others), folder, others[0])


def find_root(manual_dir: str, *, what: str, prefix: str = '') -> str:
  """The set's folder: the one holding `CXR_png/`, looked up in `manual_dir`, then the
  shallowest below it (between folders at the same depth, the first in sorted order).
  Folders whose `CXR_png/` holds images named `prefix...` come first, so that another
  NLM set unpacked beside this one (`MontgomerySet/`, `ChinaSet_AllFiles/`) is not taken
  for it.

  Args:
    manual_dir: where to look.
    what: the folder the user should pass, for the error message (e.g. 'the
      MontgomerySet folder (CXR_png/, ManualMask/, ClinicalReadings/)').
    prefix: how the set's image names start (`MCUCXR_`, `CHNCXR_`).

  Raises:
    DataError: no `CXR_png` folder in or below `manual_dir`.
  """
  def ours(folder: str) -> bool:
    try:
      return any(name.startswith(prefix)
                 for name in os.listdir(os.path.join(folder, IMAGE_FOLDER)))
    except OSError:
      return False

  if os.path.isdir(os.path.join(manual_dir, IMAGE_FOLDER)) and ours(manual_dir):
    return manual_dir
  found = []
  for dirpath, dirnames, _ in files.walk(manual_dir):
    dirnames[:] = sorted(d for d in dirnames if not common.is_hidden(d))
    if IMAGE_FOLDER in dirnames:
      depth = os.path.relpath(dirpath, manual_dir).count(os.sep) + (dirpath != manual_dir)
      found.append((not ours(dirpath), depth, dirpath))
      dirnames.remove(IMAGE_FOLDER)  # images, not another copy of the set
  if not found:
    raise DataError(f'no {IMAGE_FOLDER} folder in or below {manual_dir}: pass {what} or '
                    'a folder above it as --manual_dir')
  return min(found)[2]


def list_images(root: str, *, example: str) -> tuple[list[Listed], list[str]]:
  """The PNG images of `root/CXR_png` in name order, and the other files found there
  (hidden files and folders are passed over).

  Args:
    root: the set's folder (`find_root`).
    example: a published file name, for the error message (`MCUCXR_0001_0.png`).

  Raises:
    DataError: a PNG whose name does not end in `_0` or `_1` (names the file).
  """
  folder = os.path.join(root, IMAGE_FOLDER)
  images, others = [], []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if common.is_hidden(name) or not os.path.isfile(path):
      continue
    match = _IMAGE_RE.match(name)
    if match is None:
      others.append(path)
      continue
    label = _LABEL_RE.search(match['id'])
    if label is None:
      raise DataError(f'{path}: image name does not end in _0 (normal) or _1 '
                      f'(tuberculosis), as {example} does')
    images.append(Listed(image_id=match['id'], label=CLASS_NAMES[int(label['label'])],
                         path=path))
  return images, others


def read_text(path: str) -> str:
  """The text of a clinical reading file: UTF-8 (a byte order mark is dropped), or
  Latin-1 where it is not UTF-8.

  Raises:
    DataError: the file cannot be read (names it).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as exc:
    raise DataError(f'{path}: cannot read clinical reading ({common.one_line(exc)})') from exc
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError:
    return data.decode('latin-1')


def join_text(lines: Sequence[str]) -> str:
  """`lines`, each stripped at its end and blank lines at either end dropped, joined
  with newlines: the free text of a reading."""
  lines = [line.rstrip() for line in lines]
  while lines and not lines[0]:
    lines.pop(0)
  while lines and not lines[-1]:
    lines.pop()
  return '\n'.join(lines)


def text_lines(text: str) -> list[str]:
  """`text` split at line ends (`\n`, `\r\n`, `\r`) only: `str.splitlines` also splits
  at characters a Latin-1 file may hold (U+0085, form feed), which would put an error on
  the wrong line."""
  return text.replace('\r\n', '\n').replace('\r', '\n').split('\n')


# A leading age and where it ends: the number, then the longest unit that fits.
_LEADING_AGE_RE = re.compile(
    r'^(?P<age>\d+(?:\.\d+)?\s*(?:' +
    '|'.join(sorted((re.escape(u) for u in _YEARS_PER_UNIT if u), key=len, reverse=True)) +
    r')?(?![a-z0-9.])\.?)(?P<rest>.*)$', re.IGNORECASE | re.DOTALL)


def leading_age(text: str) -> tuple[str, str] | None:
  """`(age, rest)` where `text` starts with an age `parse_age` reads (`45yrs`, `6 month`,
  `42`) followed by other text (`45yrs PTB in the left upper field`), the rest stripped
  of the separators between them; None where it does not start with one."""
  match = _LEADING_AGE_RE.match(text.strip())
  if match is None or not is_age(match['age']):
    return None
  return match['age'].strip(), match['rest'].strip(' \t,;:.\u3000，；：。、')


def is_age(text: str) -> bool:
  """Whether `text` has the form of an age `parse_age` reads (not a missing one)."""
  match = _AGE_RE.match(text.strip())
  return match is not None and match['unit'].lower() in _YEARS_PER_UNIT


def parse_age(text: str, *, where: str, expected: str) -> float:
  """Years from a number and an optional unit: years (`45`, `045Y`, `45yrs`, `45 yrs`,
  `45yr`, `45 years`), months (`006M`, `6 months`), weeks (`3W`) or days (`014D`,
  `10 days`), in either letter case; NaN when blank or marked unknown (`unknown`, `?`,
  `n/a`, ...).

  Args:
    text: the age as written.
    where: the file and line, for the error message.
    expected: the forms the set writes, for the error message (e.g. `045Y, the DICOM
      age string, or a number of years`).

  Raises:
    DataError: any other text; names `where`.
  """
  text = text.strip()
  if text.lower() in MISSING_AGE:
    return math.nan
  match = _AGE_RE.match(text)
  years = None if match is None else _YEARS_PER_UNIT.get(match['unit'].lower())
  if years is None:
    raise DataError(f'{where}: age {text!r} is not an age (expected e.g. {expected})')
  return float(match['number']) * years


def reading_of(root: str, image_id: str, parse: Callable[[str], Reading]) -> Reading | None:
  """`parse(path)` of the image's clinical reading file, or None when it has none."""
  path = os.path.join(root, READING_FOLDER, f'{image_id}.txt')
  return parse(path) if os.path.isfile(path) else None


def warn_without_reading(what: str, root: str, image_ids: Sequence[str]) -> None:
  """One warning for the images without a clinical reading (none: no warning)."""
  if image_ids:
    logging.warning('%s: %d image(s) without a clinical reading in %s (first: %s): sex and '
                    'reading empty, age NaN', what, len(image_ids),
                    os.path.join(root, READING_FOLDER), image_ids[0])
