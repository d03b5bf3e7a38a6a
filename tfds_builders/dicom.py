"""DICOM radiographs for the builders: the files, the header fields stored, the pixels.

`is_dicom` tells a DICOM file from its bytes, so that `common.read_image_file` (and with
it `image_cases` and `bigssl_med.predict`) reads DICOM files wherever an image file may
be. `find_files` lists a release's `.dcm` files by stem (its image ids). `read_header` reads
the header only (no pixel data): the patient, study and view and the image's size.
`read_image` decodes the pixel data (uncompressed or compressed as far as pydicom and
Pillow decode it: JPEG baseline, the transfer syntax of SIIM-ACR's files, and JPEG 2000
among them; JPEG Lossless and JPEG-LS need pydicom's plugins)
to a Pillow image that the builders' `ImageStore` downscales and encodes like any other
decoded image file (`read_png`: the same image as lossless PNG bytes, where bytes are
wanted):

* 8-bit gray stays 8-bit gray; MONOCHROME1 (white is 0) is inverted so that, as in
  every other stored X-ray, bone is bright;
* gray of more than 8 bits becomes a 16-bit image with its values scaled from
  `BitsStored` bits to the full 16-bit range (a 12-bit X-ray's 4095 becomes 65535), so
  that the store's 16-to-8-bit conversion keeps its contrast; bits above `BitsStored`
  are no part of the value and are masked off (pydicom 3 does so itself, 2.x does not);
* signed values are shifted up by half their range; colour (three samples) becomes RGB.

No modality or VOI LUT is applied: the stored image is the pixel data's own values, as
`pixel_array` gives them. pydicom is imported on first use, so that the other builders,
and machines without pydicom, never need it.

Errors are one-line `bigssl_med.errors.DataError`s naming the file and `where` (the row
or image that named it).
"""

from __future__ import annotations

import dataclasses
import io
import os

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from bigssl_med import files
from bigssl_med.errors import DataError
from tfds_builders import common

# What reading or decoding a damaged or unsupported file raises in pydicom 2.4 to 3.x
# (besides its InvalidDicomError, a ValueError); an unsupported transfer syntax raises a
# RuntimeError or one of its subclasses.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, AttributeError, TypeError,
                IndexError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class Header:
  """The header fields the builders store; '' where the file does not have one."""
  patient_id: str
  study_id: str
  sex: str
  age: str  # as written: a DICOM age string (`045Y`) or, in some sets, a number
  view: str
  rows: int
  columns: int


def find_files(manual_dir: str) -> dict[str, str]:
  """File stem (a data set's image id) -> path of every `.dcm` file below `manual_dir`
  (hidden files and folders passed over; the extension in any letter case).

  Raises:
    DataError: two files of one stem (names both).
  """
  found: dict[str, str] = {}
  for dirpath, dirnames, filenames in files.walk(manual_dir):
    dirnames[:] = sorted(d for d in dirnames if not common.is_hidden(d))
    for name in sorted(filenames):
      stem, extension = os.path.splitext(name)
      if extension.lower() != '.dcm' or common.is_hidden(name):
        continue
      path = os.path.join(dirpath, name)
      if stem in found:
        raise DataError(f'two DICOM files of image {stem}: {found[stem]} and {path}')
      found[stem] = path
  return found


def features() -> dict[str, Any]:
  """The features every DICOM builder stores: the gray image and the header's sex, age
  and view position (`view_position`, which `config.data.views` selects by)."""
  return {
      'image': tfds.features.Image(
          shape=(None, None, 1), encoding_format='png',
          doc='Frontal chest X-ray from the DICOM pixel data, 8-bit gray (one channel).'),
      'sex': tfds.features.Text(doc='DICOM PatientSex (M, F); empty when blank.'),
      'age': tfds.features.Scalar(
          dtype=np.float32, doc='Age in years from DICOM PatientAge; NaN when blank.'),
      'view_position': tfds.features.Text(doc='DICOM ViewPosition (PA, AP); empty when blank.'),
  }


def count_unlisted(found: Mapping[str, str], listed: Iterable[str], *, what: str,
                   manual_dir: str, table: str) -> int:
  """How many found files the table does not name (a release's test images, whose labels
  were not published); one warning names the first. They are not stored."""
  unlisted = sorted(set(found) - set(listed))
  if unlisted:
    logging.warning('%s: %d .dcm file(s) under %s that %s does not list are not stored '
                    '(first: %s)', what, len(unlisted), manual_dir, os.path.basename(table),
                    found[unlisted[0]])
  return len(unlisted)


def listed_headers(listed: Sequence[tuple[str, str]], found: Mapping[str, str],
                   store: 'common.ImageStore', split_of: Callable[[str], str]
                   ) -> Iterator[tuple[str, str, Header]]:
  """`(image_id, path, header)` for each listed image whose file is found and readable,
  in list order; headers read on the store's threads.

  Args:
    listed: `(image_id, where)` pairs: the images a table names, and the row naming each.
    found: image id -> DICOM file (`find_files`).
    store: the build's store: a missing or unreadable file is skipped (listed in the
      metadata) when it skips bad images, else raised.
    split_of: the split a skipped image is listed under, from its id (its case is
      unknown without its file).

  Raises:
    DataError: an image without its file (names the row) or an unreadable file (names
      the file), unless the store skips bad images.
  """
  present = []
  for image_id, where in listed:
    path = found.get(image_id)
    if path is not None:
      present.append((image_id, path))
      continue
    message = f'{where}: no DICOM file {image_id}.dcm found under the manual dir'
    if not store.skip_bad_images:
      raise DataError(message)
    store.skip(path=f'{image_id}.dcm', where=where, split=split_of(image_id), reason=message)

  def read(item):  # on a worker thread
    image_id, path = item
    try:
      return read_header(path, f'image_id {image_id}')
    except DataError as exc:
      return common.Failed(path, f'image_id {image_id}', exc)

  for (image_id, path), header in common.in_order(read, present, threads=store.threads):
    if store.keep(header, split=split_of(image_id)):  # raises unless skipping
      yield image_id, path, header


def _text(dataset: Any, keyword: str) -> str:
  value = dataset.get(keyword, '')
  return '' if value is None else str(value).strip()


def is_dicom(data: bytes) -> bool:
  """Whether `data` (a file's bytes, or its first 132) is a DICOM file: `DICM` after the
  128-byte preamble, as every DICOM Part 10 file has."""
  return data[128:132] == b'DICM'


def _dataset(path: str, where: str, *, pixels: bool, data: bytes | None = None) -> Any:
  """The `pydicom.Dataset` of the file at `path` (read from `data` when given)."""
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
    from pydicom import errors as pydicom_errors  # pylint: disable=g-import-not-at-top
  except ImportError as exc:
    raise DataError(f'{path}: reading DICOM files needs pydicom (pip install '
                    f'"pydicom>=2.4"); {where}') from exc
  try:
    return pydicom.dcmread(path if data is None else io.BytesIO(data),
                           stop_before_pixels=not pixels)
  except pydicom_errors.InvalidDicomError as exc:
    raise DataError(f'{path}: not a DICOM file ({common.one_line(exc)}); {where}') from exc
  except _READ_ERRORS as exc:
    raise DataError(f'{path}: cannot read DICOM file ({common.one_line(exc)}); '
                    f'{where}') from exc


def read_header(path: str, where: str) -> Header:
  """The header of the DICOM file at `path`, without its pixel data.

  Raises:
    DataError: not a readable DICOM file, or without `Rows` and `Columns` (names the
      file and `where`).
  """
  dataset = _dataset(path, where, pixels=False)
  try:
    rows, columns = int(dataset.Rows), int(dataset.Columns)
  except (AttributeError, TypeError, ValueError) as exc:
    raise DataError(f'{path}: DICOM file without Rows and Columns (no image); '
                    f'{where}') from exc
  return Header(patient_id=_text(dataset, 'PatientID'),
                study_id=_text(dataset, 'StudyInstanceUID'),
                sex=_text(dataset, 'PatientSex'), age=_text(dataset, 'PatientAge'),
                view=_text(dataset, 'ViewPosition'), rows=rows, columns=columns)


def read_image(path: str, where: str, *, data: bytes | None = None) -> Image.Image:
  """The image of the DICOM file at `path` as a Pillow image: mode 'L' (8-bit gray),
  'I;16' (wider gray, scaled to 16 bits) or 'RGB' (see the module docstring).

  Args:
    path: the file.
    where: the row or image that names it, for error messages.
    data: the file's bytes, when they have been read already.

  Raises:
    DataError: not a readable DICOM file, pixel data that cannot be decoded (a
      compression neither pydicom nor Pillow decodes, damaged data), several frames, or
      samples of another shape than gray or RGB (names the file and `where`).
  """
  dataset = _dataset(path, where, pixels=True, data=data)
  try:
    pixels = np.asarray(dataset.pixel_array)
  except _READ_ERRORS as exc:
    raise DataError(f'{path}: cannot decode DICOM pixel data ({common.one_line(exc)}); '
                    f'{where}') from exc
  frames = int(dataset.get('NumberOfFrames', 1) or 1)
  if frames != 1:
    raise DataError(f'{path}: DICOM file holds {frames} frames; expected one image '
                    f'({where})')
  if pixels.ndim == 3 and pixels.shape[-1] == 3:
    return Image.fromarray(_to_8bit(pixels, dataset))
  if pixels.ndim != 2:
    raise DataError(f'{path}: DICOM pixel data of shape {pixels.shape}; expected one gray '
                    f'or RGB image ({where})')
  bits = int(dataset.get('BitsStored', 0) or pixels.dtype.itemsize * 8)
  inverted = _text(dataset, 'PhotometricInterpretation').upper() == 'MONOCHROME1'
  if pixels.dtype == np.uint8 and bits == 8 and not inverted:
    return Image.fromarray(pixels)  # as decoded: the common case, without copies
  if pixels.dtype == np.uint16 and 8 < bits <= 16:  # unsigned wide gray: in 16 bits
    top = (1 << bits) - 1
    values = np.bitwise_and(pixels, top)  # bits above BitsStored are no part of the value
    if inverted:
      np.subtract(top, values, out=values)
    values <<= 16 - bits
    return Image.fromarray(values)
  values = _unsigned(pixels, dataset, bits)
  if inverted:
    values = (1 << bits) - 1 - values
  if bits <= 8:
    return Image.fromarray(values.astype(np.uint8))
  wide = (values << (16 - bits)) if bits < 16 else values
  return Image.fromarray(wide.astype(np.uint16))


def read_png(path: str, where: str, *, data: bytes | None = None) -> bytes:
  """`read_image` as lossless PNG bytes (`common.png_bytes`, as `common.read_image_file`
  gives a DICOM file).

  Raises:
    DataError: as `read_image`.
  """
  return common.png_bytes(read_image(path, where, data=data))


def _unsigned(pixels: np.ndarray, dataset: Any, bits: int) -> np.ndarray:
  """int64 values in [0, 2**bits): signed data shifted up by half its range."""
  values = pixels.astype(np.int64)
  if int(dataset.get('PixelRepresentation', 0) or 0) == 1:
    values = values + (1 << (bits - 1))
  return np.clip(values, 0, (1 << bits) - 1)


def _to_8bit(pixels: np.ndarray, dataset: Any) -> np.ndarray:
  bits = int(dataset.get('BitsStored', 8) or 8)
  values = _unsigned(pixels, dataset, bits)
  if bits > 8:
    values = values >> (bits - 8)
  return values.astype(np.uint8)
