"""TFDS builder for DRIVE (Digital Retinal Images for Vessel Extraction): retinal vessels.

Input layout: the release (`DRIVE.zip`) unpacks to `DRIVE/`:

* `training/images/21_training.tif` ... `40_training.tif`: 20 colour fundus
  photographs (RGB TIFF, 565 wide and 584 high);
* `training/1st_manual/21_manual1.gif`, ...: the manual vessel annotation of each
  training image (0 background, 255 vessel);
* `training/mask/21_training_mask.gif`, ...: the field-of-view (FOV) mask of each
  training image (0 outside, 255 inside the circular aperture);
* `test/images/01_test.tif` ... `20_test.tif` and `test/mask/01_test_mask.gif`, ...:
  the 20 test photographs and their FOV masks;
* `test/1st_manual/01_manual1.gif` and `test/2nd_manual/01_manual2.gif`, ...: the
  test images' annotations by a first and a second observer. The original release
  has them; the download offered by the challenge site today leaves them out.

`manual_dir` may be `DRIVE/` itself or any folder above it: the set's folder is the
one holding `training/images/`, looked up directly in `manual_dir`, then the
shallowest below it (between folders at the same depth, the first in sorted order;
folders whose `training/images/` holds `NN_training.tif` files come first). Files in
an `images/` folder other than `.tif` (or `.tiff`) are ignored (a warning counts
them); a `.tif` there whose name is not `NN_training.tif` (`NN_test.tif` in `test/`)
is an error, since its annotation and FOV mask are found through that number.

Features. `image`: the photograph, RGB, stored losslessly as PNG (the published TIFF
decoded and re-encoded); `mask`: the first observer's vessel annotation
(`1st_manual`; 0 background, 255 vessel; a pixel is vessel where the file's own
value is not 0, `common.mask_foreground`); `fov`: the field-of-view mask (0
outside, 255 inside, read the same way); `image_id`: the file stem (`21_training`,
`01_test`); `case_id`: the same (the release gives no subject ids: each photograph
is its own case). There is no class label. The second observer's test annotations
(`2nd_manual`) are not stored: they exist for the test images only, and serve to
compare a method with a human observer, not as a reference or for training.

Splits. `test`: the 20 official test images, scored against the first observer,
when `test/1st_manual/` is present. Without it (the challenge site's download) the
build has no test split: it logs a warning and records
`metadata['test_annotations_found'] = False` (True otherwise). `train` and
`validation` divide the 20 official training images by a hash of `case_id`
(`common.hash_split`), independent of which other images exist:

    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    bucket 0-79 -> 'train', 80-99 -> 'validation'

For the published ids this gives 15 training images and 5 validation images
(`21_training`, `25_training`, `28_training`, `37_training`, `38_training`).

Configs (`tfds_builders.common.ImageConfig`): `original` (the default) stores the
images and masks at their published size; the images are already small, so the
default keeps every vessel pixel and leaves any resizing to the input pipeline.
Any `side<N>` downscales each image (antialiased bicubic) and its masks (nearest
neighbour, so they stay binary) to a longest side of N.

Bad input stops the build with a one-line `bigssl_med.errors.DataError` naming the
file: no folder holding `training/images/`, no training image, a `.tif` image name
without its number, an image without its manual annotation or FOV mask, a mask of
another size than its image, an image or mask that cannot be decoded. With
`skip_bad_images`, an image whose image, annotation or FOV file is missing or
undecodable is skipped instead and listed in the data set's `metadata.json`; a mask
of another size is never skipped (the pairing is wrong, not the file).

The set cannot be downloaded by the builder: download it from the DRIVE challenge
site and pass it as `--manual_dir`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re

from absl import logging
import tensorflow_datasets as tfds

from bigssl_med import files
from bigssl_med.data import host_ops
from bigssl_med.errors import DataError
from tfds_builders import common

SPLIT_NAMES = ('train', 'validation', 'test')
IMAGES = 'images'
MANUAL = '1st_manual'
FOV = 'mask'
# The release's two parts: its folder, and how an image's, annotation's and FOV mask's
# names are made from the image's number.
PARTS = {
    'training': ('training', '{}_training.tif', '{}_manual1.gif', '{}_training_mask.gif'),
    'test': ('test', '{}_test.tif', '{}_manual1.gif', '{}_test_mask.gif'),
}
HOMEPAGE = 'https://drive.grand-challenge.org/'
VALIDATION_BUCKETS = 20  # of 100: the training images' hash buckets 80-99

_TIF_RE = re.compile(r'^.+\.tiff?$', re.IGNORECASE)
_NAME_RE = {part: re.compile(r'^(?P<number>\d+)_' + part + r'\.tiff?$', re.IGNORECASE)
            for part in PARTS}

_DESCRIPTION = """\
DRIVE, Digital Retinal Images for Vessel Extraction (Staal et al., 2004): 40 colour
fundus photographs (565 x 584 pixels) from a diabetic retinopathy screening programme
in the Netherlands, 20 for training and 20 for testing, each with a manual
segmentation of the retinal vessels by a first observer (`mask`, 0 or 255) and a
mask of the camera's circular field of view (`fov`, 0 or 255). One case per image.

Splits: `test` is the official test set (present when the release holds its
annotations); the 20 official training images are divided into `train` and
`validation` (80/20 by a SHA-256 hash of the image id: 15 and 5 images).
"""

_CITATION = """\
@article{staal2004ridge,
  title={Ridge-based vessel segmentation in color images of the retina},
  author={Staal, Joes and Abr{\\`a}moff, Michael D and Niemeijer, Meindert and
          Viergever, Max A and van Ginneken, Bram},
  journal={IEEE Transactions on Medical Imaging},
  volume={23},
  number={4},
  pages={501--509},
  year={2004},
  doi={10.1109/TMI.2004.825627}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The builder does not download DRIVE. Download it from the DRIVE challenge site
(https://drive.grand-challenge.org/), unzip it and pass the DRIVE folder (the one
with training/ and test/) or any folder above it as --manual_dir. The test split
needs the test images' first-observer annotations (test/1st_manual/), which the
original release has; without them the build has no test split.
"""


def split_for_case(case_id: str) -> str:
  """The split ('train' or 'validation') of an official training image: 80/20 by case
  hash (see the module docstring)."""
  return common.hash_split(case_id, validation=VALIDATION_BUCKETS, test=0)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One photograph: its id, split, and image, annotation and FOV mask files."""
  image_id: str
  split: str
  image: str
  manual: str
  fov: str


def find_root(manual_dir: str) -> str:
  """The set's folder: the one holding `training/images/` (see the module docstring).

  Raises:
    DataError: no `training/images` folder in or below `manual_dir`.
  """
  def images(folder: str) -> str:
    return os.path.join(folder, PARTS['training'][0], IMAGES)

  def ours(folder: str) -> bool:
    try:
      return any(_NAME_RE['training'].match(name) for name in os.listdir(images(folder)))
    except OSError:
      return False

  if os.path.isdir(images(manual_dir)) and ours(manual_dir):
    return manual_dir
  found = []
  for dirpath, dirnames, _ in files.walk(manual_dir):
    dirnames[:] = sorted(d for d in dirnames if not common.is_hidden(d))
    if os.path.isdir(images(dirpath)):
      depth = os.path.relpath(dirpath, manual_dir).count(os.sep) + (dirpath != manual_dir)
      found.append((not ours(dirpath), depth, dirpath))
  if not found:
    raise DataError(f'no DRIVE folder (one holding training/images/) in or below '
                    f'{manual_dir}: pass the DRIVE folder (training/, test/) or a folder '
                    'above it as --manual_dir')
  return min(found)[2]


def set_root(dl_manager: tfds.download.DownloadManager) -> str:
  """The set's folder under the manual dir (`find_root`).

  Raises:
    DataError: no manual dir (the builder does not download DRIVE), or no DRIVE
      folder in or below it.
  """
  manual_dir = common.manual_dir_or_none(dl_manager)
  if manual_dir is None:
    raise DataError('DRIVE is not downloaded by the builder: download it from the DRIVE '
                    f'challenge site ({HOMEPAGE}), unzip it and pass the DRIVE folder, or a '
                    'folder above it, as --manual_dir (main.py: --config.data.manual_dir=DIR)')
  return find_root(manual_dir)


def list_images(root: str, part: str) -> tuple[list[Entry], list[str]]:
  """The images of `root/<part>/images` in name order, and the other files found there
  (hidden files and folders are passed over).

  Args:
    root: the set's folder (`find_root`).
    part: 'training' or 'test'.

  Raises:
    DataError: the folder is missing or holds no image, or a `.tif` there is not
      named `NN_training.tif` (`NN_test.tif`); names the folder or file.
  """
  folder_name, image_name, manual_name, fov_name = PARTS[part]
  folder = os.path.join(root, folder_name, IMAGES)
  try:
    names = sorted(os.listdir(folder))
  except OSError as exc:
    raise DataError(f'{folder}: cannot list the {part} images ({common.one_line(exc)})') from exc
  entries, others = [], []
  for name in names:
    path = os.path.join(folder, name)
    if common.is_hidden(name) or not os.path.isfile(path):
      continue
    if not _TIF_RE.match(name):
      others.append(path)
      continue
    match = _NAME_RE[part].match(name)
    if match is None:
      raise DataError(f'{path}: image name is not <number>_{part}.tif, as '
                      f'{image_name.format("21" if part == "training" else "01")} is; its '
                      'annotation and field-of-view mask are found through that number')
    number = match['number']
    image_id = os.path.splitext(name)[0]
    entries.append(Entry(
        image_id=image_id,
        split='test' if part == 'test' else split_for_case(image_id),
        image=path,
        manual=os.path.join(root, folder_name, MANUAL, manual_name.format(number)),
        fov=os.path.join(root, folder_name, FOV, fov_name.format(number))))
  if not entries:
    raise DataError(f'{folder}: no {image_name.format("NN")} images')
  if others:
    logging.warning('DRIVE: %d file(s) in %s that are not .tif ignored (first: %s)',
                    len(others), folder, others[0])
  return entries, others


def to_png(data: bytes, name: str) -> tuple[bytes, tuple[int, int]]:
  """The RGB PNG bytes of an encoded photograph (a TIFF), and its (width, height).

  Raises:
    DataError: the bytes are not a decodable image (names `name`).
  """
  image, _ = host_ops.decode_pil(data, channels=3, name=name)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue(), image.size




class Drive(common.ImageBuilder):
  """DRIVE retinal photographs with vessel annotations and field-of-view masks.

  Splits: the official `test` images (when their annotations are present); the
  official training images divided by
  `int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100`: buckets 0-79
  `train`, 80-99 `validation`. Example keys are image ids.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'RGB images, first-observer vessel masks and field-of-view masks; official '
               'test split, training images split 80/20 by case hash.',
  }
  BUILDER_CONFIGS = [common.ImageConfig(
      name=common.ORIGINAL, description='Images and masks as published (565x584).')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.new_metadata()
    metadata['test_annotations_found'] = None  # set by the build
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(None, None, 3), encoding_format='png',
                doc='Colour fundus photograph, RGB PNG (the published TIFF, lossless).'),
            'mask': tfds.features.Image(
                shape=(None, None, 1), encoding_format='png',
                doc='Vessels annotated by the first observer (1st_manual): 0 background, '
                    '255 vessel.'),
            'fov': tfds.features.Image(
                shape=(None, None, 1), encoding_format='png',
                doc="The camera's field of view: 0 outside, 255 inside."),
            'image_id': tfds.features.Text(doc='File stem, e.g. 21_training or 01_test.'),
            'case_id': tfds.features.Text(
                doc='The image id (each photograph is its own case): the grouping unit.'),
        }),
        supervised_keys=('image', 'mask'),
        metadata=metadata,
        homepage=HOMEPAGE,
        citation=_CITATION,
        license='See the DRIVE challenge site for the terms of use.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = set_root(dl_manager)
    entries, _ = list_images(root, 'training')
    test_annotated = os.path.isdir(os.path.join(root, PARTS['test'][0], MANUAL))
    if test_annotated:
      entries += list_images(root, 'test')[0]
    else:
      logging.warning('DRIVE from %s: no %s folder (the test images\' annotations): no test '
                      'split is built', root, os.path.join(PARTS['test'][0], MANUAL))
    self.info.metadata['test_annotations_found'] = test_annotated
    store = self.image_store(channels=3)
    by_split = {split: [] for split in SPLIT_NAMES}
    for entry in entries:
      where = f'image_id {entry.image_id}'
      missing = next(((path, what) for path, what in ((entry.manual, 'manual annotation'),
                                                      (entry.fov, 'field-of-view mask'))
                      if not os.path.isfile(path)), None)
      if missing is not None:
        message = f'{missing[0]}: {missing[1]} of {entry.image} not found'
        if not store.skip_bad_images:
          raise DataError(message)
        store.skip(path=missing[0], where=where, split=entry.split, reason=message)
        continue
      by_split[entry.split].append((entry, where))
    store.check_no_split_emptied(by_split, 'drive')
    empty = [split for split, items in by_split.items()
             if not items and (split != 'test' or test_annotated)]
    if empty:  # TFDS cannot write an empty split; only partial inputs get here.
      logging.warning('DRIVE from %s: no image in split(s) %s; they are left out.', root,
                      ', '.join(empty))
    return {split: self._generate_examples(items, split, store)
            for split, items in by_split.items() if items}

  def _generate_examples(self, items, split, store):
    def load(item):  # on a worker thread: the stored image and masks, or a Failed
      entry, where = item
      published = []  # the photograph's published (width, height)

      def read():
        data, size = to_png(common.read_image_file(entry.image, where),
                            name=f'{entry.image} ({where})')
        published.append(size)
        return data

      image = store.try_convert(read, path=entry.image, where=where)
      if isinstance(image, common.Failed):
        return image
      masks = []
      for path, what in ((entry.manual, 'manual annotation'), (entry.fov, 'field-of-view mask')):
        try:
          masks.append(common.load_mask_foreground(path, where, published[-1], what=what))
        except common.MaskSizeError:
          raise
        except DataError as exc:
          return common.Failed(path, where, exc)
      size = common.encoded_size(image)
      return image, common.encode_mask(masks[0], size), common.encode_mask(masks[1], size)

    for (entry, _), (image, mask, fov) in store.each(items, load, split=split,
                                                     what=f'drive {split}'):
      yield entry.image_id, {
          'image': image,
          'mask': mask,
          'fov': fov,
          'image_id': entry.image_id,
          'case_id': entry.image_id,
      }
