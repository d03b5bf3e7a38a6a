"""TFDS builder for MedMNIST v2 / MedMNIST+: the 12 2D subsets at four sizes.

Configs. One per subset and image size, named `<subset>_<size>` (e.g.
`pneumoniamnist_28`, `dermamnist_224`), subsets in the order of `SUBSETS`, sizes
28, 64, 128, 224; the default is the first (`pathmnist_28`). The image size is
the config: `max_side` is refused. The `skip_bad_images` build option has
nothing to skip (images are arrays, not files) and is only recorded.

Input. One `.npz` file per config, as published on Zenodo (record 10519652,
doi:10.5281/zenodo.10519652): `<subset>.npz` for size 28 and
`<subset>_<size>.npz` for the others, each holding `train_images`,
`train_labels`, `val_images`, `val_labels`, `test_images` and `test_labels`.
Images are uint8 `[N, size, size]` (gray subsets) or `[N, size, size, 3]` (RGB
subsets); labels are integers `[N, 1]` (a class index) or, for ChestMNIST,
`[N, 14]` (0/1 per finding).

* With `manual_dir`, the config's file is looked up under it (the shallowest
  one). A file whose MD5 differs from the official one is accepted (users bring
  subsets or re-exports): the build logs a warning and the data set's metadata
  records `md5`, `official_md5` and `matches_official_file`.
* Without `manual_dir`, the file is downloaded from Zenodo and its MD5 must be
  the official one (`verify_md5`).

Either way the file is checked before anything is written (keys, dtypes,
shapes, row counts, label ranges); each problem is a one-line
`bigssl_med.errors.DataError` naming the file and the key. Images are streamed
from the archive a chunk at a time, so the 224 files (several GB once
decompressed) are never loaded whole.

Records. `image`: the array as a lossless PNG (`size x size x channels`);
`image_id`: `<split>_<index>` with the split as named in the file (`train`,
`val`, `test`) and the row index in that array, zero-padded to 6 digits
(`val_000012` is `val_images[12]`); `case_id`: the same as `image_id`, because
MedMNIST carries no patient ids, so every case has one image and MICLe
degenerates to SimCLR on these data; `label` (a `ClassLabel`) for the
multi-class, binary and ordinal subsets, or `labels` (float32 `[14]`, 0/1) for
ChestMNIST, whose finding names are in the metadata (`label_names`).

Splits. The official ones: `train` -> `train`, `val` -> `validation`,
`test` -> `test`.

The facts per subset (task, label names, channels, split sizes, file MD5s) are
those of the `medmnist` package's `medmnist/info.py`, version 3.0.2
(github.com/MedMNIST/MedMNIST, commit 3bb56be69bca38e5f105b21e4d6482b91354d3a4).
Version 3 re-released OrganA/C/SMNIST with slightly different split sizes and
new MD5s; older (v2.x) copies of those three still build, with a warning.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import IO, Iterator, Mapping, Sequence
import zipfile
import zlib

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from bigssl_med import files
from bigssl_med.errors import DataError
from tfds_builders import common

SIZES = (28, 64, 128, 224)
# Split prefix in the .npz file -> TFDS split name.
SPLITS = (('train', 'train'), ('val', 'validation'), ('test', 'test'))
ARRAY_KINDS = ('images', 'labels')

MULTI_CLASS = 'multi-class'
BINARY_CLASS = 'binary-class'
ORDINAL_REGRESSION = 'ordinal-regression'
MULTI_LABEL = 'multi-label, binary-class'
TASKS = (MULTI_CLASS, BINARY_CLASS, ORDINAL_REGRESSION, MULTI_LABEL)

ZENODO_RECORD = 'https://zenodo.org/records/10519652'
HOMEPAGE = 'https://medmnist.com/'
_ID_DIGITS = 6
_CHUNK_BYTES = 1 << 24  # Images read from the archive per step (about 16 MB).


@dataclasses.dataclass(frozen=True)
class Subset:
  """What the MedMNIST release says about one 2D subset.

  Attributes:
    name: the file stem, e.g. 'pneumoniamnist'.
    title: the published name, e.g. 'PneumoniaMNIST'.
    task: one of `TASKS`.
    label_names: class names (index order), or the finding names of a
      multi-label subset.
    channels: 1 (gray) or 3 (RGB).
    num_examples: official (train, val, test) sizes.
    md5: official MD5 of the file of each size.
    license: the subset's licence as MedMNIST states it.
    source: where the images come from (one line).
  """
  name: str
  title: str
  task: str
  label_names: tuple[str, ...]
  channels: int
  num_examples: tuple[int, int, int]
  md5: Mapping[int, str]
  license: str
  source: str


def _md5s(m28: str, m64: str, m128: str, m224: str) -> dict[int, str]:
  return dict(zip(SIZES, (m28, m64, m128, m224)))


_ORGANS = ('bladder', 'femur-left', 'femur-right', 'heart', 'kidney-left',
           'kidney-right', 'liver', 'lung-left', 'lung-right', 'pancreas',
           'spleen')
_CC_BY = 'CC BY 4.0'

SUBSETS: dict[str, Subset] = {s.name: s for s in (
    Subset('pathmnist', 'PathMNIST', MULTI_CLASS,
           ('adipose', 'background', 'debris', 'lymphocytes', 'mucus',
            'smooth muscle', 'normal colon mucosa', 'cancer-associated stroma',
            'colorectal adenocarcinoma epithelium'),
           3, (89996, 10004, 7180),
           _md5s('a8b06965200029087d5bd730944a56c1',
                 '55aa9c1e0525abe5a6b9d8343a507616',
                 'ac42d08fb904d92c244187169d1fd1d9',
                 '2c51a510bcdc9cf8ddb2af93af1eadec'), _CC_BY,
           'H&E colorectal histology patches (NCT-CRC-HE-100K for train and '
           'validation, CRC-VAL-HE-7K from another centre for test).'),
    Subset('chestmnist', 'ChestMNIST', MULTI_LABEL,
           ('atelectasis', 'cardiomegaly', 'effusion', 'infiltration', 'mass',
            'nodule', 'pneumonia', 'pneumothorax', 'consolidation', 'edema',
            'emphysema', 'fibrosis', 'pleural', 'hernia'),
           1, (78468, 11219, 22433),
           _md5s('02c8a6516a18b556561a56cbdd36c4a8',
                 '9de6cd0b934ebb5b7426cfba5efbae16',
                 'db107e5590b27930b62dbaf558aebee3',
                 '45bd33e6f06c3e8cdb481c74a89152aa'), _CC_BY,
           'Frontal chest X-rays of NIH ChestX-ray14 with its 14 text-mined '
           'findings, official split.'),
    Subset('dermamnist', 'DermaMNIST', MULTI_CLASS,
           ('actinic keratoses and intraepithelial carcinoma',
            'basal cell carcinoma', 'benign keratosis-like lesions',
            'dermatofibroma', 'melanoma', 'melanocytic nevi',
            'vascular lesions'),
           3, (7007, 1003, 2005),
           _md5s('0744692d530f8e62ec473284d019b0c7',
                 'b70a2f5635c6199aeaa28c31d7202e1f',
                 '2defd784463fa5243564e855ed717de1',
                 '8974907d8e169bef5f5b96bc506ae45d'), 'CC BY-NC 4.0',
           'Dermatoscopic images of HAM10000, split 7:1:2 by image (not by '
           'lesion).'),
    Subset('octmnist', 'OCTMNIST', MULTI_CLASS,
           ('choroidal neovascularization', 'diabetic macular edema', 'drusen',
            'normal'),
           1, (97477, 10832, 1000),
           _md5s('c68d92d5b585d8d81f7112f81e2d0842',
                 'e229e9440236b774d9f0dfef9d07bdaf',
                 '0a97e76651ace45c5d943ee3f65b63ae',
                 'abc493b6d529d5de7569faaef2773ba3'), _CC_BY,
           'Retinal optical coherence tomography scans, centre-cropped.'),
    Subset('pneumoniamnist', 'PneumoniaMNIST', BINARY_CLASS,
           ('normal', 'pneumonia'),
           1, (4708, 524, 624),
           _md5s('28209eda62fecd6e6a2d98b1501bb15f',
                 '8f4eceb4ccffa70c672198ea285246c6',
                 '05b46931834c231683c68f40c47b2971',
                 'd6a3c71de1b945ea11211b03746c1fe1'), _CC_BY,
           'Paediatric chest X-rays, pneumonia against normal, centre-'
           'cropped.'),
    Subset('retinamnist', 'RetinaMNIST', ORDINAL_REGRESSION,
           ('0', '1', '2', '3', '4'),
           3, (1080, 120, 400),
           _md5s('bd4c0672f1bba3e3a89f0e4e876791e4',
                 'afda852cc34dcda56f86ad2b2457dbcc',
                 'e48e916a24454daf90583d4e6efb1a18',
                 'eae7e3b6f3fcbda4ae613ebdcbe35348'), _CC_BY,
           'Fundus photographs of the DeepDRiD challenge, diabetic retinopathy '
           'grade 0-4.'),
    Subset('breastmnist', 'BreastMNIST', BINARY_CLASS,
           ('malignant', 'normal, benign'),
           1, (546, 78, 156),
           _md5s('750601b1f35ba3300ea97c75c52ff8f6',
                 '742edef2a1fd1524b2efff4bd7ba9364',
                 '363e4b3f8d712e9b5de15470a2aaadf1',
                 'b56378a6eefa9fed602bb16d192d4c8b'), _CC_BY,
           'Breast ultrasound images, malignant against normal or benign.'),
    Subset('bloodmnist', 'BloodMNIST', MULTI_CLASS,
           ('basophil', 'eosinophil', 'erythroblast',
            'immature granulocytes(myelocytes, metamyelocytes and '
            'promyelocytes)',
            'lymphocyte', 'monocyte', 'neutrophil', 'platelet'),
           3, (11959, 1712, 3421),
           _md5s('7053d0359d879ad8a5505303e11de1dc',
                 '2b94928a2ae4916078ca51e05b6b800b',
                 'adace1e0ed228fccda1f39692059dd4c',
                 'b718ff6835fcbdb22ba9eacccd7b2601'), _CC_BY,
           'Microscopy images of individual normal blood cells.'),
    Subset('tissuemnist', 'TissueMNIST', MULTI_CLASS,
           ('Collecting Duct, Connecting Tubule', 'Distal Convoluted Tubule',
            'Glomerular endothelial cells', 'Interstitial endothelial cells',
            'Leukocytes', 'Podocytes', 'Proximal Tubule Segments',
            'Thick Ascending Limb'),
           1, (165466, 23640, 47280),
           _md5s('ebe78ee8b05294063de985d821c1c34b',
                 '123ece2eba09d0aa5d698fda57103344',
                 '61b955355d7425a89687b06cca3ce0c2',
                 'b077128c4a949f0a4eb01517f9037b9c'), _CC_BY,
           'Human kidney cortex cells of BBBC051 (maximum projection of 7 '
           'slices).'),
    Subset('organamnist', 'OrganAMNIST', MULTI_CLASS, _ORGANS,
           1, (34561, 6491, 17778),
           _md5s('68e3f8846a6bd62f0c9bf841c0d9eacc',
                 '2dcccc29b88e6da5a01161ef20cda288',
                 'eeae80d0a227a8d099027e1b3cfd3b60',
                 '50747347e05c87dd3aaf92c49f9f3170'), _CC_BY,
           'Axial slices of abdominal CT (LiTS) through 11 organs\' bounding '
           'boxes.'),
    Subset('organcmnist', 'OrganCMNIST', MULTI_CLASS, _ORGANS,
           1, (12975, 2392, 8216),
           _md5s('b9ceb9546e10131b32923c5bbeaea2b1',
                 '3ce34a8724ea6f548e6db4744d03b6a9',
                 '773c1f009daa3fe5d9a2a201b2a7ed94',
                 '050f5e875dc056f6768abf94ec9995d1'), _CC_BY,
           'Coronal slices of abdominal CT (LiTS) through 11 organs\' bounding '
           'boxes.'),
    Subset('organsmnist', 'OrganSMNIST', MULTI_CLASS, _ORGANS,
           1, (13932, 2452, 8827),
           _md5s('9ab87b696fb54e2a387ebe992d6ed5f1',
                 '53a6d115339d874c25e309a994ff46d3',
                 'ded0c5fa01a95dc4978b956f613e9b8e',
                 'b354719e553fbbb2513d5533f52a4cb1'), _CC_BY,
           'Sagittal slices of abdominal CT (LiTS) through 11 organs\' '
           'bounding boxes.'),
)}


def file_name(subset: str, size: int) -> str:
  """The published file: `<subset>.npz` at 28, else `<subset>_<size>.npz`."""
  return f'{subset}.npz' if size == 28 else f'{subset}_{size}.npz'


def download_url(subset: str, size: int) -> str:
  """The Zenodo download URL of a subset's file at `size`."""
  return f'{ZENODO_RECORD}/files/{file_name(subset, size)}?download=1'


@dataclasses.dataclass
class MedmnistConfig(common.ImageConfig):
  """Config of one MedMNIST subset at one image size.

  Attributes:
    subset: the subset (a key of `SUBSETS`).
    size: the image side, one of `SIZES`.
    title: the subset's published name.
    task: one of `TASKS`.
    label_names: class names, or finding names for a multi-label subset.
    channels: 1 (gray) or 3 (RGB).
    num_examples: official split sizes, by TFDS split name.
    md5: official MD5 of this config's file.
    license: the subset's licence.
  """
  subset: str = ''
  size: int = 28
  title: str = ''
  task: str = MULTI_CLASS
  label_names: tuple[str, ...] = ()
  channels: int = 1
  num_examples: Mapping[str, int] = dataclasses.field(default_factory=dict)
  md5: str = ''
  license: str = _CC_BY

  @property
  def file_name(self) -> str:
    """The published file name of this config (`<subset>[_<size>].npz`)."""
    return file_name(self.subset, self.size)

  @property
  def url(self) -> str:
    """Where the file is downloaded from."""
    return download_url(self.subset, self.size)

  @property
  def multi_label(self) -> bool:
    """Whether labels are 0/1 per label name (ChestMNIST), not a class."""
    return self.task == MULTI_LABEL

  @property
  def image_shape(self) -> tuple[int, ...]:
    """Shape of one image in the file: (size, size) or (size, size, 3)."""
    side = (self.size, self.size)
    return side if self.channels == 1 else side + (self.channels,)


def _make_config(subset: Subset, size: int) -> MedmnistConfig:
  kind = 'gray' if subset.channels == 1 else 'RGB'
  what = 'labels' if subset.task == MULTI_LABEL else 'classes'
  return MedmnistConfig(
      name=f'{subset.name}_{size}',
      description=(f'{subset.title}, {size}x{size} {kind}: {subset.task}, '
                   f'{len(subset.label_names)} {what}. {subset.source}'),
      subset=subset.name, size=size, title=subset.title, task=subset.task,
      label_names=subset.label_names, channels=subset.channels,
      num_examples=dict(zip((split for _, split in SPLITS),
                            subset.num_examples)),
      md5=subset.md5[size], license=subset.license)


CONFIGS: list[MedmnistConfig] = [
    _make_config(subset, size) for subset in SUBSETS.values() for size in SIZES]
_CONFIGS_BY_NAME = {config.name: config for config in CONFIGS}


def verify_md5(path: str, expected: str, *, name: str | None = None) -> str:
  """Checks a downloaded file against its official MD5.

  Args:
    path: the file.
    expected: the official hex MD5.
    name: the published file name, for the message (default: the path's).

  Returns:
    The file's MD5 (equal to `expected`).

  Raises:
    DataError: the digests differ; names the file, the expected and the
      actual MD5.
  """
  actual = common.md5_file(path)
  if actual != expected:
    raise DataError(
        f'{path}: MD5 of {name or os.path.basename(path)} is {actual}, '
        f'expected the official {expected} (corrupt or incomplete download; '
        f'delete the file and build again)')
  return actual


# ----------------------------------------------------------------------------
# Reading and checking the .npz file.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckedFile:
  """A .npz file that passed `check_npz`.

  Attributes:
    path: the file.
    labels: each split's label array, by file prefix ('train', 'val', 'test').
    counts: each split's number of images, by file prefix.
  """
  path: str
  labels: Mapping[str, np.ndarray]
  counts: Mapping[str, int]


def array_keys() -> list[str]:
  """The keys a MedMNIST .npz must hold, in file order."""
  return [f'{prefix}_{kind}' for prefix, _ in SPLITS for kind in ARRAY_KINDS]


def check_npz(path: str, config: MedmnistConfig) -> CheckedFile:
  """Checks the keys, dtypes, shapes, counts and label values of a .npz file.

  Only the image arrays' headers are read here; the labels are read whole.

  Args:
    path: the file.
    config: the config it is built for (size, channels, task, label names).

  Returns:
    The labels and image counts per split.

  Raises:
    DataError: one line naming the file and the key at fault.
  """
  with _open_zip(path) as archive:
    present = {name[:-len('.npy')] for name in archive.namelist()
               if name.endswith('.npy')}
    missing = [key for key in array_keys() if key not in present]
    if missing:
      raise DataError(
          f'{path}: missing key(s) {", ".join(missing)}; a MedMNIST .npz holds '
          f'{", ".join(array_keys())} (found: '
          f'{", ".join(sorted(present)) or "none"})')
    labels, counts = {}, {}
    for prefix, _ in SPLITS:
      image_key, label_key = f'{prefix}_images', f'{prefix}_labels'
      with _open_member(archive, path, image_key) as member:
        shape, _, dtype = _read_header(member, path, image_key)
      _check_images(path, image_key, shape, dtype, config)
      counts[prefix] = shape[0]
      labels[prefix] = _read_labels(archive, path, label_key)
      _check_labels(path, label_key, labels[prefix], shape[0], image_key,
                    config)
  return CheckedFile(path=path, labels=labels, counts=counts)


def iter_images(path: str, key: str) -> Iterator[np.ndarray]:
  """Yields the images of array `key` of a .npz file one by one.

  The array is read from the archive a chunk (about 16 MB) at a time.

  Raises:
    DataError: the array cannot be read (truncated or corrupt archive); names
      the file, the key and the first image of the chunk that failed.
  """
  index = 0
  with _open_zip(path) as archive, _open_member(archive, path, key) as member:
    shape, fortran_order, dtype = _read_header(member, path, key)
    count, item_shape = shape[0], tuple(shape[1:])
    try:
      if fortran_order:  # Not what numpy.savez writes; read it whole.
        array = np.lib.format.read_array(member, allow_pickle=False)
        for index in range(count):
          yield np.ascontiguousarray(array[index])
        return
      item_bytes = max(1, math.prod(item_shape) * dtype.itemsize)
      per_chunk = max(1, _CHUNK_BYTES // item_bytes)
      while index < count:
        n = min(per_chunk, count - index)
        data = member.read(n * item_bytes)
        if len(data) != n * item_bytes:
          raise EOFError(f'{len(data)} bytes where {n * item_bytes} were '
                         'expected')
        chunk = np.frombuffer(data, dtype=dtype).reshape((n,) + item_shape)
        for item in chunk:
          yield item
          index += 1
      member.read(1)  # Reaches the end of the member: zipfile checks its CRC.
    except (OSError, EOFError, ValueError, zipfile.BadZipFile,
            zlib.error) as exc:
      raise DataError(f'{path}: key {key} cannot be read from image {index} '
                      f'on ({common.one_line(exc)})') from exc


def encode_png(array: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 `[H, W]` (gray) or `[H, W, 3]` array."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buffer, format='PNG')
  return buffer.getvalue()


class _ZipContext:
  """`zipfile.ZipFile` whose open errors are DataErrors naming the file."""

  def __init__(self, path: str):
    self._path = path
    self._archive = None

  def __enter__(self) -> zipfile.ZipFile:
    try:
      self._archive = zipfile.ZipFile(self._path)
    except FileNotFoundError:
      raise DataError(f'{self._path}: file not found') from None
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
      raise DataError(f'{self._path}: not a valid .npz file '
                      f'({common.one_line(exc)})') from exc
    return self._archive

  def __exit__(self, *exc_info) -> None:
    self._archive.close()


def _open_zip(path: str) -> _ZipContext:
  return _ZipContext(path)


def _open_member(archive: zipfile.ZipFile, path: str, key: str) -> IO[bytes]:
  try:
    return archive.open(f'{key}.npy')
  except (OSError, zipfile.BadZipFile, ValueError, RuntimeError) as exc:
    # RuntimeError covers zipfile's error for an unsupported compression method.
    raise DataError(f'{path}: key {key} cannot be opened '
                    f'({common.one_line(exc)})') from exc


def _read_header(member: IO[bytes], path: str,
                 key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) from the .npy header of an archive member."""
  fmt = np.lib.format
  try:
    version = fmt.read_magic(member)
    if version == (1, 0):
      return fmt.read_array_header_1_0(member)
    if version == (2, 0):
      return fmt.read_array_header_2_0(member)
    raise ValueError(f'unsupported .npy format version {version}')
  except (OSError, EOFError, ValueError, zipfile.BadZipFile,
          zlib.error) as exc:
    raise DataError(f'{path}: key {key} is not a readable .npy array '
                    f'({common.one_line(exc)})') from exc


def _read_labels(archive: zipfile.ZipFile, path: str, key: str) -> np.ndarray:
  with _open_member(archive, path, key) as member:
    try:
      return np.lib.format.read_array(member, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile,
            zlib.error) as exc:
      raise DataError(f'{path}: key {key} cannot be read '
                      f'({common.one_line(exc)})') from exc


def _check_images(path: str, key: str, shape: Sequence[int], dtype: np.dtype,
                  config: MedmnistConfig) -> None:
  if dtype != np.uint8:
    raise DataError(f'{path}: key {key} has dtype {dtype}, expected uint8')
  expected = ('N',) + config.image_shape
  if len(shape) != len(expected) or tuple(shape[1:]) != config.image_shape:
    kind = 'gray' if config.channels == 1 else 'RGB'
    shown = ', '.join(str(s) for s in expected)
    raise DataError(
        f'{path}: key {key} has shape {list(shape)}, expected [{shown}] '
        f'({config.title} is {kind}; config {config.name} is for '
        f'{config.size}x{config.size} images)')


def _check_labels(path: str, key: str, labels: np.ndarray, num_images: int,
                  image_key: str, config: MedmnistConfig) -> None:
  """Checks dtype, shape, row count and values of one label array."""
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{path}: key {key} has dtype {labels.dtype}, expected an '
                    'integer type')
  width = len(config.label_names) if config.multi_label else 1
  if labels.ndim != 2 or labels.shape[1] != width:
    raise DataError(f'{path}: key {key} has shape {list(labels.shape)}, '
                    f'expected [N, {width}] ({config.task})')
  if labels.shape[0] != num_images:
    raise DataError(f'{path}: key {key} has {labels.shape[0]} rows but '
                    f'{image_key} has {num_images} images')
  high = 1 if config.multi_label else len(config.label_names) - 1
  bad = np.argwhere((labels < 0) | (labels > high))
  if bad.size:
    row, column = (int(i) for i in bad[0])
    value = labels[row, column]
    what = ('0 or 1 per label' if config.multi_label else
            f'a class index in 0..{high} ({len(config.label_names)} classes)')
    raise DataError(f'{path}: key {key} row {row} holds {value}, expected '
                    f'{what}; {int(len(bad))} value(s) out of range')


# ----------------------------------------------------------------------------
# The builder.
# ----------------------------------------------------------------------------


_DESCRIPTION = """\
MedMNIST v2 and MedMNIST+: standardised biomedical image classification data
sets. Each of the 12 2D subsets (pathology, chest X-ray, dermatoscopy, retinal
OCT, fundus, ultrasound, blood cells, kidney cells, abdominal CT in three
planes) comes with official train/validation/test splits and is published at
28x28 (MedMNIST v2) and 64x64, 128x128, 224x224 (MedMNIST+) pixels. The task is
multi-class, binary-class, ordinal regression (RetinaMNIST) or multi-label
(ChestMNIST, 14 findings).

Images are stored as lossless PNG, exactly the published arrays. MedMNIST has
no patient ids: `case_id` is the image id, every case has a single image, and
MICLe's multi-instance positives degenerate to SimCLR's two views of one image.

Licence: CC BY 4.0 for the MedMNIST release (DermaMNIST CC BY-NC 4.0, after
HAM10000); each subset also follows the terms of the data set it was made from.
"""

_CITATION = """\
@article{yang2023medmnistv2,
  title={{MedMNIST} v2 -- A large-scale lightweight benchmark for {2D} and {3D}
         biomedical image classification},
  author={Yang, Jiancheng and Shi, Rui and Wei, Donglai and Liu, Zequan and
          Zhao, Lin and Ke, Bilian and Pfister, Hanspeter and Ni, Bingbing},
  journal={Scientific Data},
  volume={10},
  number={1},
  pages={41},
  year={2023},
  doi={10.1038/s41597-022-01721-8}
}
@inproceedings{yang2021medmnist,
  title={{MedMNIST} Classification Decathlon: A Lightweight {AutoML} Benchmark
         for Medical Image Analysis},
  author={Yang, Jiancheng and Shi, Rui and Ni, Bingbing},
  booktitle={IEEE 18th International Symposium on Biomedical Imaging (ISBI)},
  pages={191--195},
  year={2021},
  doi={10.1109/ISBI48211.2021.9434062}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the config's file from {ZENODO_RECORD} (`<subset>.npz` for size 28,
`<subset>_<size>.npz` for 64, 128 and 224, e.g. pneumoniamnist.npz or
dermamnist_224.npz) into a directory and pass it as --manual_dir. Without
--manual_dir the file is downloaded and checked against its official MD5.
"""


class Medmnist(common.ImageBuilder):
  """MedMNIST v2 / MedMNIST+ 2D subsets; one config per subset and image size.

  See the module docstring for inputs, records and splits.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': '12 2D subsets at 28, 64, 128 and 224; official splits; PNG.',
  }
  BUILDER_CONFIGS = CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  DOWNLOADS = True  # each config's file, from Zenodo, checked against its MD5

  @classmethod
  def make_config(cls, config: str | None = None, *,
                  max_side: int | None = None,
                  manual_dir: str | None = None) -> MedmnistConfig:
    """The config named `config` (None: the default, `pathmnist_28`).

    Returns the very object listed in `BUILDER_CONFIGS` (TFDS refuses an
    equal-named copy).

    Args:
      config: `<subset>_<size>`, e.g. `pneumoniamnist_28`.
      max_side: must be None: the image size is part of the config.
      manual_dir: unused.

    Raises:
      DataError: an unknown config name, or `max_side` given.
    """
    del manual_dir
    if max_side is not None:
      raise DataError(
          f'medmnist does not take max_side (got {max_side}): the image size '
          f'is part of the config, <subset>_<size> with size one of '
          f'{", ".join(map(str, SIZES))} (e.g. medmnist/pneumoniamnist_64)')
    if config is None:
      return cls.BUILDER_CONFIGS[0]
    found = _CONFIGS_BY_NAME.get(config)
    if found is None:
      raise DataError(
          f'unknown medmnist config {config!r}; expected <subset>_<size> with '
          f'subset one of {", ".join(SUBSETS)} and size one of '
          f'{", ".join(map(str, SIZES))} (e.g. pneumoniamnist_28)')
    return found

  def _info(self) -> tfds.core.DatasetInfo:
    config: MedmnistConfig = self.builder_config
    features = {
        'image': tfds.features.Image(
            shape=(config.size, config.size, config.channels),
            encoding_format='png',
            doc=f'{config.size}x{config.size} '
                f'{"gray" if config.channels == 1 else "RGB"} image, the '
                'published array as lossless PNG.'),
        'image_id': tfds.features.Text(
            doc='<split>_<index>: the row of <split>_images in the .npz file '
                '(split train, val or test; index zero-padded to 6 digits).'),
        'case_id': tfds.features.Text(
            doc='Same as image_id: MedMNIST has no patient ids.'),
    }
    metadata = self.new_metadata()
    metadata.update(
        subset=config.subset, size=config.size, task=config.task,
        file_name=config.file_name, official_md5=config.md5, md5=None,
        matches_official_file=None,
        official_num_examples=dict(config.num_examples))
    if config.multi_label:
      features['labels'] = tfds.features.Tensor(
          shape=(len(config.label_names),), dtype=np.float32,
          doc='1.0 where the finding is present, else 0.0 (order: '
              'metadata label_names).')
      metadata['label_names'] = list(config.label_names)
      supervised_keys = ('image', 'labels')
    else:
      features['label'] = tfds.features.ClassLabel(
          names=config.label_names, doc=f'{config.task} label.')
      supervised_keys = ('image', 'label')
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=supervised_keys,
        homepage=HOMEPAGE,
        citation=_CITATION,
        license=(f'{config.license} ({config.title}, MedMNIST); the source '
                 'data set\'s own terms also apply'),
        metadata=metadata,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Finds or downloads the file, checks it, returns a generator per split.

    Records the file's MD5 and whether it is the official file in the metadata.
    """
    config: MedmnistConfig = self.builder_config
    path, md5 = self._locate_file(dl_manager)
    matches = md5 == config.md5
    self.info.metadata.update(md5=md5, matches_official_file=matches)
    if not matches:
      logging.warning(
          '%s: MD5 %s differs from the official %s of %s; building it anyway '
          '(a subset or another copy of MedMNIST, not the official file).',
          path, md5, config.md5, config.file_name)
    checked = check_npz(path, config)
    generators = {}
    for prefix, split in SPLITS:
      count = checked.counts[prefix]
      official = config.num_examples[split]
      if count != official:
        logging.warning('%s: %s has %d images; the official %s split has %d.',
                        path, f'{prefix}_images', count, split, official)
      if not count:  # TFDS cannot write an empty split.
        logging.warning('%s: %s is empty; split %s is left out.', path,
                        f'{prefix}_images', split)
        continue
      generators[split] = self._generate_examples(
          path, prefix, checked.labels[prefix], split)
    return generators

  def _generate_examples(self, path: str, prefix: str, labels: np.ndarray,
                         split: str):
    """Yields (image_id, example) for the images of `<prefix>_images`."""
    config: MedmnistConfig = self.builder_config

    def examples():
      for index, image in enumerate(iter_images(path, f'{prefix}_images')):
        image_id = f'{prefix}_{index:0{_ID_DIGITS}d}'
        example = {'image': encode_png(image), 'image_id': image_id,
                   'case_id': image_id}
        if config.multi_label:
          example['labels'] = labels[index].astype(np.float32)
        else:
          example['label'] = int(labels[index, 0])
        yield image_id, example

    yield from common.with_progress(
        examples(), total=len(labels), what=f'medmnist/{config.name} {split}')

  def _locate_file(self, dl_manager) -> tuple[str, str]:
    """(path, MD5) of the config's file, from manual_dir or downloaded."""
    config: MedmnistConfig = self.builder_config
    manual_dir = common.manual_dir_or_none(dl_manager)
    if manual_dir is not None:
      path = find_manual_file(manual_dir, config)
      logging.info('Building medmnist/%s from %s', config.name, path)
      return path, common.md5_file(path)
    logging.info('No manual_dir: downloading %s from %s', config.file_name,
                 ZENODO_RECORD)
    try:
      path = os.fspath(dl_manager.download(config.url))
    except Exception as exc:  # pylint: disable=broad-except
      raise DataError(
          f'could not download {config.file_name} from {config.url} '
          f'({common.one_line(exc)}); download it yourself and pass its '
          'directory as --manual_dir=DIR') from exc
    return path, verify_md5(path, config.md5, name=config.file_name)


def find_manual_file(root: str, config: MedmnistConfig) -> str:
  """The config's file under `root` (also `<subset>_28.npz` for size 28).

  Raises:
    DataError: not found; lists the .npz files that are there and the configs
      they are for.
  """
  names = [config.file_name]
  if config.size == 28:
    names.append(f'{config.subset}_28.npz')
  try:
    return common.find_file(root, names, f'MedMNIST file for config '
                            f'{config.name}')
  except DataError as exc:
    found = _npz_files(root)
    if not found:
      raise
    described = []
    for relpath in found:
      other = config_of_file(os.path.basename(relpath))
      described.append(f'{relpath} (config {other})' if other else relpath)
    raise DataError(
        f'{exc}; .npz files there: {", ".join(described)}') from None


def config_of_file(name: str) -> str | None:
  """The config whose published file is called `name`, or None."""
  for config in CONFIGS:
    if name in (config.file_name, f'{config.subset}_{config.size}.npz'):
      return config.name
  return None


def _npz_files(root: str, limit: int = 10) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in files.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not common.is_hidden(d))
    for name in sorted(filenames):
      if name.endswith('.npz') and not common.is_hidden(name):
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
        if len(found) >= limit:
          return found
  return found
