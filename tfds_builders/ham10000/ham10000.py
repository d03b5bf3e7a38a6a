"""TFDS builder for HAM10000: dermatoscopic images, lesion ids and lesion masks.

Input layouts (both found by walking `manual_dir` once and indexing files by name,
so folder names and nesting do not matter):

* The project's layout: `HAM10000_metadata.csv`, `images/ISIC_xxxxxxx.jpg`,
  `masks/ISIC_xxxxxxx_segmentation.png`.
* The official release on Harvard Dataverse (doi:10.7910/DVN/DBW86T), unzipped:
  `HAM10000_images_part_1/`, `HAM10000_images_part_2/`,
  `HAM10000_segmentations_lesion_tschandl/` and the metadata file, which Dataverse
  serves as `HAM10000_metadata.tab` (tab-separated, ingested), as the original
  `HAM10000_metadata.csv` (`?format=original`), or, in its file listing and the
  ISIC/Kaggle mirrors, as `HAM10000_metadata` with no extension. Comma or tab
  separation is detected from the header line.

Splits. The release has no official split. Splits are lesion-disjoint and
deterministic, derived from a hash of the lesion id (`case_id`):

    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    bucket 0-79 -> 'train', 80-89 -> 'validation', 90-99 -> 'test'

so all images of one lesion fall in the same split, and the assignment of a lesion
never depends on which other lesions are present.

Configs (`tfds_builders.common.ImageConfig`): `original` (the default) stores the
images as published; `side<N>` downscales each image (antialiased bicubic) and
its mask (nearest neighbour, so it stays binary) to a longest side of N.

Every image and mask is decoded with PIL at build time; a file that cannot be
decoded, a missing file or a malformed metadata row stops the build with a one-line
`bigssl_med.errors.DataError` naming the file and the metadata line. With
`skip_bad_images`, an image whose image or mask file is missing or undecodable
is skipped instead, and listed in the data set's `metadata.json`; a mask of another
size than its image is an error either way (the pairing is wrong, not a file).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
from typing import Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from bigssl_med import files
from bigssl_med.data import host_ops
from bigssl_med.errors import DataError
from tfds_builders import common

CLASS_NAMES = ('akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc')
REQUIRED_COLUMNS = ('lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex',
                    'localization')
# Names under which the metadata file is published, most specific first.
METADATA_FILE_NAMES = ('HAM10000_metadata.csv', 'HAM10000_metadata.tab',
                       'HAM10000_metadata.tsv', 'HAM10000_metadata.txt',
                       'HAM10000_metadata')
SPLIT_NAMES = ('train', 'validation', 'test')
_MISSING_AGE = frozenset({'', 'na', 'nan', 'null', 'none'})
_IMAGE_RE = re.compile(r'^(?P<id>.+)\.(?:jpg|jpeg)$', re.IGNORECASE)
_MASK_RE = re.compile(r'^(?P<id>.+)_segmentation\.png$', re.IGNORECASE)

# Public download of the official release (Harvard Dataverse, doi:10.7910/DVN/DBW86T),
# through the Dataverse Data Access API (`/api/access/datafile/<file id>`). The file
# ids were found in public code that downloads this record, not checked online from
# this project (no network at the time of writing):
#   3172585 HAM10000_images_part_1.zip, 3172584 HAM10000_images_part_2.zip
#     (the same two ids in several independent repositories' download scripts);
#   3838943 HAM10000_segmentations_lesion_tschandl.zip and
#   4338392 HAM10000_metadata (`?format=original` gives the uploaded CSV rather
#     than Dataverse's ingested .tab), both from a download script that fetches
#     the Tschandl et al. 2020 lesion segmentations. An older metadata id, 3172582,
#     also circulates; Dataverse keeps old file versions downloadable.
_DATAVERSE_ACCESS = 'https://dataverse.harvard.edu/api/access/datafile/'
DOWNLOAD_URLS = {
    'images_part_1': _DATAVERSE_ACCESS + '3172585',
    'images_part_2': _DATAVERSE_ACCESS + '3172584',
    'segmentations': _DATAVERSE_ACCESS + '3838943',
    'metadata': _DATAVERSE_ACCESS + '4338392?format=original',
}

_DESCRIPTION = """\
HAM10000 ("Human Against Machine with 10000 training images"): 10,015
dermatoscopic images of pigmented skin lesions from several populations and
acquisition devices, with 7 diagnostic categories: actinic keratoses and
intraepithelial carcinoma (akiec), basal cell carcinoma (bcc), benign
keratosis-like lesions (bkl), dermatofibroma (df), melanoma (mel), melanocytic
nevi (nv) and vascular lesions (vasc). The ground truth (`dx_type`) is
histopathology, follow-up, expert consensus or in-vivo confocal microscopy.
Several images can show the same lesion (`case_id` = the metadata's `lesion_id`;
7,470 lesions), which is what MICLe uses for positive pairs. Each image comes with
the binary lesion segmentation mask of Tschandl et al. (2020) (`mask`, 0 or 255).

Splits are not official: lesion-disjoint train/validation/test (80/10/10 by lesion)
from a SHA-256 hash of the lesion id, so no lesion is in two splits.
"""

_CITATION = """\
@article{tschandl2018ham10000,
  title={The {HAM10000} dataset, a large collection of multi-source dermatoscopic
         images of common pigmented skin lesions},
  author={Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal={Scientific Data},
  volume={5},
  pages={180161},
  year={2018},
  doi={10.1038/sdata.2018.161}
}
@article{tschandl2020human,
  title={Human--computer collaboration for skin cancer recognition},
  author={Tschandl, Philipp and Rinner, Christoph and Apalla, Zoe and others},
  journal={Nature Medicine},
  volume={26},
  pages={1229--1234},
  year={2020},
  doi={10.1038/s41591-020-0942-0}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the HAM10000 release from https://doi.org/10.7910/DVN/DBW86T
(HAM10000_images_part_1.zip, HAM10000_images_part_2.zip,
HAM10000_segmentations_lesion_tschandl.zip and HAM10000_metadata), unzip everything
into one directory and pass it as --manual_dir. A directory with
HAM10000_metadata.csv, images/ and masks/ works too.
"""


def split_for_case(case_id: str) -> str:
  """Returns the split ('train', 'validation' or 'test') of a lesion id."""
  return common.hash_split(case_id, validation=10, test=10)


@dataclasses.dataclass(frozen=True)
class MetadataRow:
  """One row of the metadata file; `line` is its line number in that file."""
  line: int
  lesion_id: str
  image_id: str
  dx: str
  dx_type: str
  age: float
  sex: str
  localization: str


@dataclasses.dataclass(frozen=True)
class FileIndex:
  """Image and mask paths found under some directories, keyed by image id."""
  images: Mapping[str, str]
  masks: Mapping[str, str]


def find_metadata(root: str) -> str:
  """Returns the metadata file under `root` (shallowest, then by name preference).

  Raises:
    DataError: when no file with one of `METADATA_FILE_NAMES` exists under root.
  """
  return common.find_file(root, METADATA_FILE_NAMES, 'HAM10000 metadata file')


def index_files(roots: Sequence[str]) -> FileIndex:
  """Walks `roots` once and indexes `<id>.jpg` images and `<id>_segmentation.png`.

  The walk is sorted, so when an id occurs twice (e.g. a release unpacked twice)
  the first path in sorted order wins, deterministically. Hidden files and
  `__MACOSX` folders are skipped.
  """
  images, masks = {}, {}
  for root in roots:
    for dirpath, dirnames, filenames in files.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not common.is_hidden(d))
      for name in sorted(filenames):
        if common.is_hidden(name):
          continue
        if match := _MASK_RE.match(name):
          masks.setdefault(match['id'], os.path.join(dirpath, name))
        elif match := _IMAGE_RE.match(name):
          images.setdefault(match['id'], os.path.join(dirpath, name))
  return FileIndex(images=images, masks=masks)


def read_metadata(path: str) -> list[MetadataRow]:
  """Reads and validates the metadata file (comma- or tab-separated).

  Raises:
    DataError: missing columns, an empty or duplicate id, an unknown `dx`, or an
      age that is not a number; the message names the file and line.
  """
  name = os.path.basename(path)
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      header = f.readline()
      f.seek(0)
      delimiter = '\t' if '\t' in header else ','
      reader = csv.DictReader(f, delimiter=delimiter)
      columns = [c.strip() for c in (reader.fieldnames or [])]
      missing = [c for c in REQUIRED_COLUMNS if c not in columns]
      if missing:
        raise DataError(
            f'{path}: missing required column(s) {", ".join(missing)} '
            f'(found: {", ".join(columns) or "no header"})')
      reader.fieldnames = columns
      rows, seen = [], {}
      for record in reader:
        if not any((value or '').strip() for key, value in record.items() if key):
          continue  # a blank line or a row of empty fields, as spreadsheets leave
        if any(value is None for key, value in record.items() if key):
          raise DataError(f'{name} line {reader.line_num}: fewer fields than the header\'s '
                          f'{len(columns)}')
        if any(value.strip() for value in record.get(None) or ()):
          raise DataError(f'{name} line {reader.line_num}: more fields than the header\'s '
                          f'{len(columns)}')
        rows.append(_parse_row(record, reader.line_num, name, seen))
  except (OSError, UnicodeDecodeError, csv.Error) as exc:
    raise DataError(f'{path}: cannot read metadata ({common.one_line(exc)})') from exc
  if not rows:
    raise DataError(f'{path}: metadata has a header but no rows')
  return rows


def load_mask(path: str, where: str, size: tuple[int, int],
              original_size: tuple[int, int]) -> bytes:
  """Returns single-channel 8-bit PNG bytes of the mask at `path`.

  Bytes are returned unchanged when the file already is an 8-bit grayscale PNG
  of the stored image's size; otherwise the mask is converted to mode 'L',
  resized to `size` with the nearest-neighbour filter (values stay 0 and 255)
  and re-encoded.

  Args:
    path: the mask file.
    where: which metadata row refers to it, for error messages.
    size: the (width, height) of the stored image.
    original_size: the (width, height) of the image as published; the mask
      must have this size.

  Raises:
    DataError: the file cannot be read or decoded.
    MaskSizeError: its size differs from the published image's (not skipped by
      `skip_bad_images`: the pairing is wrong, not a file).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as exc:
    raise DataError(f'{path}: cannot read mask ({common.one_line(exc)}); '
                    f'referenced by {where}') from exc
  try:
    mask, mask_format = host_ops.decode_pil(data, channels=1, name=path)
  except DataError as exc:
    reason = str(exc).split(f'{path}: ', 1)[-1]
    raise DataError(f'{path}: cannot decode mask ({reason}); referenced by '
                    f'{where}') from exc
  if mask.size != original_size:
    raise common.MaskSizeError(
        f'{path}: mask is {mask.size[0]}x{mask.size[1]} but its image is '
        f'{original_size[0]}x{original_size[1]} ({where})')
  with Image.open(io.BytesIO(data)) as published:
    unchanged = published.mode == 'L' and mask_format == 'PNG'
  if unchanged and mask.size == size:
    return data
  if mask.size != size:
    mask = mask.resize(size, Image.Resampling.NEAREST)
  buffer = io.BytesIO()
  mask.save(buffer, format='PNG')
  return buffer.getvalue()


def _image_size(data: bytes) -> tuple[int, int]:
  with Image.open(io.BytesIO(data)) as image:
    return image.size


class Ham10000(common.ImageBuilder):
  """HAM10000 dermatoscopic images with lesion ids, diagnoses and lesion masks.

  Splits (no official ones): lesion-disjoint, from
  `int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100`: buckets 0-79
  `train`, 80-89 `validation`, 90-99 `test`. Example keys are image ids.
  """

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Images, lesion masks, metadata; lesion-disjoint hash splits.',
      '1.1.0': 'Configs original / side<N>; optional skipping of bad images.',
  }
  BUILDER_CONFIGS = [
      common.ImageConfig(name=common.ORIGINAL,
                         description='Images and masks as published.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  DOWNLOADS = True  # the public release, from Harvard Dataverse

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(None, None, 3), encoding_format='jpeg',
                doc='Dermatoscopic image, RGB JPEG as published.'),
            'mask': tfds.features.Image(
                shape=(None, None, 1), encoding_format='png',
                doc='Binary lesion segmentation (0 background, 255 lesion).'),
            'image_id': tfds.features.Text(doc='ISIC image id.'),
            'case_id': tfds.features.Text(
                doc='Lesion id (HAM_xxxxxxx): the grouping unit.'),
            'label': tfds.features.ClassLabel(
                names=CLASS_NAMES, doc='Diagnosis (metadata column dx).'),
            'dx_type': tfds.features.Text(
                doc='Ground truth: histo, follow_up, consensus or confocal.'),
            'age': tfds.features.Scalar(
                dtype=np.float32, doc='Age in years; NaN when unknown.'),
            'sex': tfds.features.Text(doc='male, female or unknown.'),
            'localization': tfds.features.Text(doc='Anatomical site.'),
        }),
        supervised_keys=('image', 'label'),
        metadata=self.new_metadata(),
        homepage='https://doi.org/10.7910/DVN/DBW86T',
        citation=_CITATION,
        license='CC BY-NC 4.0 (see the Dataverse record for the exact terms)',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    metadata_path, roots = self._locate_inputs(dl_manager)
    rows = read_metadata(metadata_path)
    index = index_files(roots)
    name = os.path.basename(metadata_path)
    by_split = {split: [] for split in SPLIT_NAMES}
    store = self.image_store(channels=3)
    for row in rows:
      where = f'{name} line {row.line}, image_id {row.image_id}'
      split = split_for_case(row.lesion_id)
      missing = [(kind, file_name) for kind, file_name, found in (
          ('image', f'{row.image_id}.jpg', row.image_id in index.images),
          ('mask', f'{row.image_id}_segmentation.png', row.image_id in index.masks),
      ) if not found]
      if missing:
        kind, file_name = missing[0]
        message = (f'{metadata_path} line {row.line}: {kind} file for image_id '
                   f'{row.image_id} ({file_name}) not found under '
                   f'{", ".join(roots)}')
        if not store.skip_bad_images:
          raise DataError(message)
        store.skip(path=file_name, where=where, split=split, reason=message)
        continue
      by_split[split].append(
          (row, index.images[row.image_id], index.masks[row.image_id], where))
    store.check_no_split_emptied(by_split, 'ham10000')
    empty = [split for split, items in by_split.items() if not items]
    if empty:  # TFDS cannot write an empty split; only tiny inputs get here.
      logging.warning('HAM10000 from %s: no lesion hashes into split(s) %s; '
                      'they are left out.', metadata_path, ', '.join(empty))
    return {
        split: self._generate_examples(
            sorted(items, key=lambda x: x[0].image_id), split, store)
        for split, items in by_split.items() if items
    }

  def _generate_examples(self, items, split, store):
    def load(item):  # on a worker thread: the stored image and mask, or a Failed
      _, image_path, mask_path, where = item
      published = []  # the file's bytes, read once for the image and its size

      def read():
        published.append(common.read_image_file(image_path, where))
        return published[-1]

      image = store.try_convert(read, path=image_path, where=where)
      if isinstance(image, common.Failed):
        return image
      try:
        return image, load_mask(mask_path, where, _image_size(image),
                                _image_size(published[-1]))
      except common.MaskSizeError:
        raise
      except DataError as exc:
        return common.Failed(mask_path, where, exc)

    for (row, *_), (image, mask) in store.each(items, load, split=split,
                                               what=f'ham10000 {split}'):
      yield row.image_id, {
          'image': image,
          'mask': mask,
          'image_id': row.image_id,
          'case_id': row.lesion_id,
          'label': row.dx,
          'dx_type': row.dx_type,
          'age': np.float32(row.age),
          'sex': row.sex,
          'localization': row.localization,
      }

  def _locate_inputs(self, dl_manager) -> tuple[str, list[str]]:
    """Returns (metadata file, directories to index) from manual_dir or online."""
    root = common.manual_dir_or_none(dl_manager)
    if root is not None:
      return find_metadata(root), [root]
    logging.info('No manual_dir with data: downloading HAM10000 from %s',
                 _DATAVERSE_ACCESS)
    zip_method = tfds.download.ExtractMethod.ZIP
    try:
      extracted = dl_manager.download_and_extract({
          key: tfds.download.Resource(url=DOWNLOAD_URLS[key],
                                      extract_method=zip_method)
          for key in ('images_part_1', 'images_part_2', 'segmentations')
      })
      metadata = dl_manager.download(DOWNLOAD_URLS['metadata'])
    except Exception as exc:  # pylint: disable=broad-except
      raise DataError(
          f'could not download HAM10000 from Harvard Dataverse '
          f'({common.one_line(exc)}); download it from '
          f'https://doi.org/10.7910/DVN/DBW86T, unzip it into one directory and '
          f'pass --manual_dir=DIR (main.py: --config.data.manual_dir=DIR)') from exc
    return os.fspath(metadata), sorted(os.fspath(p) for p in extracted.values())


def _parse_row(record: Mapping[str, str | None], line: int, name: str,
               seen: dict[str, int]) -> MetadataRow:
  """Validates one metadata record; `seen` maps image ids to their lines."""
  def get(key: str) -> str:
    return (record.get(key) or '').strip()

  image_id, lesion_id, dx = get('image_id'), get('lesion_id'), get('dx')
  for key, value in (('image_id', image_id), ('lesion_id', lesion_id),
                     ('dx', dx)):
    if not value:
      raise DataError(f'{name} line {line}: empty {key}')
  if image_id in seen:
    raise DataError(f'{name} line {line}: image_id {image_id} already on line '
                    f'{seen[image_id]}')
  seen[image_id] = line
  if dx not in CLASS_NAMES:
    raise DataError(f'{name} line {line} (image_id {image_id}): unknown dx '
                    f'{dx!r}; expected one of {", ".join(CLASS_NAMES)}')
  age_text = get('age')
  if age_text.lower() in _MISSING_AGE:
    age = math.nan
  else:
    try:
      age = float(age_text)
    except ValueError:
      raise DataError(f'{name} line {line} (image_id {image_id}): age '
                      f'{age_text!r} is not a number') from None
  return MetadataRow(line=line, lesion_id=lesion_id, image_id=image_id, dx=dx,
                     dx_type=get('dx_type'), age=age, sex=get('sex'),
                     localization=get('localization'))
