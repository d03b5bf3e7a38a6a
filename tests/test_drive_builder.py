"""Tests of the drive TFDS builder, on generated trees in the published layout."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path
import shutil

import numpy as np
from PIL import Image
import pytest

from bigssl_med import build_data
from bigssl_med.data import sources
from bigssl_med.errors import DataError
from bigssl_med.trainers import segment
from conftest import assert_manual_only, assert_one_line_error, records_by_split
import tfds_builders
from tfds_builders.drive import drive

NAME = 'drive'
BUILD = 'drive/original'
TRAINING_IDS = [f'{n}_training' for n in range(21, 41)]
TEST_IDS = [f'{n:02d}_test' for n in range(1, 21)]
# What the module docstring states for the published ids.
VALIDATION_IDS = ['21_training', '25_training', '28_training', '37_training', '38_training']
WIDTH, HEIGHT = 36, 40  # portrait, as the published 565 x 584


@dataclasses.dataclass
class FakeDrive:
  """A generated `DRIVE/` under `parent`; dicts are keyed by image id."""
  parent: Path
  root: Path
  images: dict[str, Path]
  manual: dict[str, Path]
  fov: dict[str, Path]
  pixels: dict[str, np.ndarray]  # the RGB written
  vessels: dict[str, np.ndarray]  # bool, the annotation written
  inside: dict[str, np.ndarray]  # bool, the field of view written

  def image_id(self, split: str, index: int = 0) -> str:
    return [i for i in sorted(self.images) if _split_of(i) == split][index]


def _split_of(image_id: str) -> str:
  return 'test' if image_id.endswith('_test') else drive.split_for_case(image_id)


def write_fake_drive(parent: Path, *, test_annotations: bool = True,
                     seed: int = 0) -> FakeDrive:
  """Writes `parent/DRIVE` as DRIVE.zip unpacks: training/ and test/, each with images/
  (RGB TIFF), 1st_manual/ and mask/ (GIF); test/ also with 2nd_manual/ (not read).

  Each photograph is an orange disc (the field of view) on black, crossed by three dark
  red bands 3 pixels wide (the vessels, annotated as 255). Without `test_annotations`,
  test/ has neither 1st_manual/ nor 2nd_manual/ (the challenge site's download).
  """
  rng = np.random.default_rng(seed)
  root = parent / 'DRIVE'
  fake = FakeDrive(parent=parent, root=root, images={}, manual={}, fov={}, pixels={},
                   vessels={}, inside={})
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
  for part, ids in (('training', TRAINING_IDS), ('test', TEST_IDS)):
    folders = ['images', 'mask']
    if part == 'training' or test_annotations:
      folders += ['1st_manual'] + (['2nd_manual'] if part == 'test' else [])
    for folder in folders:
      (root / part / folder).mkdir(parents=True)
    for image_id in ids:
      number = image_id.split('_')[0]
      inside = ((yy - HEIGHT / 2 + rng.uniform(-1, 1)) ** 2 +
                (xx - WIDTH / 2 + rng.uniform(-1, 1)) ** 2 <= (0.46 * WIDTH) ** 2)
      vessels = np.zeros_like(inside)
      for _ in range(3):  # a band through a random point at a random angle
        angle = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0.3, 0.7) * HEIGHT, rng.uniform(0.3, 0.7) * WIDTH
        distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        vessels |= distance < 1.5
      vessels &= inside
      pixels = np.zeros((HEIGHT, WIDTH, 3))
      pixels[inside] = (200, 100, 40) + rng.normal(0, 12, (inside.sum(), 3))
      pixels[vessels] = (110, 35, 20) + rng.normal(0, 12, (vessels.sum(), 3))
      pixels = np.clip(pixels, 0, 255).astype(np.uint8)
      fake.pixels[image_id], fake.vessels[image_id], fake.inside[image_id] = (
          pixels, vessels, inside)
      fake.images[image_id] = root / part / 'images' / f'{image_id}.tif'
      Image.fromarray(pixels).save(fake.images[image_id], format='TIFF')
      fake.manual[image_id] = root / part / '1st_manual' / f'{number}_manual1.gif'
      fake.fov[image_id] = root / part / 'mask' / f'{number}_{part}_mask.gif'
      Image.fromarray(inside.astype(np.uint8) * 255).save(fake.fov[image_id], format='GIF')
      if part == 'training' or test_annotations:
        Image.fromarray(vessels.astype(np.uint8) * 255).save(fake.manual[image_id],
                                                             format='GIF')
      if part == 'test' and test_annotations:  # the second observer's (not read)
        Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(
            root / part / '2nd_manual' / f'{number}_manual2.gif', format='GIF')
  return fake


@pytest.fixture
def fake(tmp_path) -> FakeDrive:
  return write_fake_drive(tmp_path / 'raw')


def _build(fake, data_dir, name=BUILD, manual_dir=None, **kwargs) -> str:
  return build_data.build(name, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(manual_dir or fake.parent), **kwargs)


def _decoded(data: bytes) -> tuple[str, str, np.ndarray]:
  with Image.open(io.BytesIO(data)) as image:
    return image.format, image.mode, np.asarray(image)


def _counts(data_dir, name=BUILD) -> dict[str, int]:
  return {split: len(r) for split, r in records_by_split(data_dir, name).items()}


def test_registered_manual_only_with_original_default():
  assert tfds_builders.BUILDERS[NAME] is tfds_builders.Drive is drive.Drive
  assert tfds_builders.Drive.name == NAME
  assert str(tfds_builders.Drive.VERSION) == '1.0.0'
  assert tfds_builders.Drive.DOWNLOADS is False
  assert [c.name for c in tfds_builders.Drive.BUILDER_CONFIGS] == ['original']
  default = tfds_builders.Drive.make_config()
  assert (default.name, default.max_side) == ('original', None)
  assert tfds_builders.Drive.make_config(max_side=256).name == 'side256'


def test_split_rule_matches_docstring():
  for case_id in TRAINING_IDS + ['x']:
    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    assert drive.split_for_case(case_id) == ('train' if bucket < 80 else 'validation')
  validation = [i for i in TRAINING_IDS if drive.split_for_case(i) == 'validation']
  assert validation == VALIDATION_IDS
  assert '15 training images and 5 validation images' in drive.__doc__
  assert all(f'`{i}`' in drive.__doc__ for i in VALIDATION_IDS)


def test_build_counts_splits_and_images(fake, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = _build(fake, data_dir)
  assert version_dir == os.fspath(data_dir / NAME / 'original' / '1.0.0')
  records = records_by_split(data_dir, BUILD)
  assert {split: len(r) for split, r in records.items()} == {
      'train': 15, 'validation': 5, 'test': 20}
  assert sorted(records['validation']) == VALIDATION_IDS
  assert sorted(records['test']) == TEST_IDS
  info = sources.dataset_info(BUILD, os.fspath(data_dir))
  assert 'label' not in info.features and info.metadata['test_annotations_found'] is True
  assert info.metadata['num_skipped_images'] == 0
  for split, by_id in records.items():
    for image_id, record in by_id.items():
      assert _split_of(image_id) == split
      assert record['case_id'].decode() == image_id
      image_format, mode, pixels = _decoded(record['image'])
      assert (image_format, mode) == ('PNG', 'RGB')  # the TIFF, losslessly
      np.testing.assert_array_equal(pixels, fake.pixels[image_id])
  with open(os.path.join(version_dir, sources.CASE_INDEX_FILE)) as f:
    index = json.load(f)
  assert index['dataset'] == NAME
  for split, entry in index['splits'].items():
    assert sorted(entry['case_ids']) == sorted(records[split])


def test_mask_and_fov_are_the_written_ones_as_0_and_255(fake, tmp_path):
  _build(fake, tmp_path / 'data')
  for by_id in records_by_split(tmp_path / 'data', BUILD).values():
    for image_id, record in by_id.items():
      for key, written in (('mask', fake.vessels[image_id]), ('fov', fake.inside[image_id])):
        image_format, mode, stored = _decoded(record[key])
        assert (image_format, mode) == ('PNG', 'L'), key
        assert set(np.unique(stored)) == {0, 255}, key
        np.testing.assert_array_equal(stored == 255, written, err_msg=f'{image_id} {key}')
  # The fixture's GIFs are palette images of indices 0 and 1: read by their colours.
  with Image.open(fake.manual[TRAINING_IDS[0]]) as gif:
    assert gif.mode == 'P' and np.asarray(gif).max() == 1


def test_side_config_downscales_images_and_masks_nearest(fake, tmp_path):
  data_dir = tmp_path / 'data'
  assert _build(fake, data_dir, name=NAME, max_side=20) == os.fspath(
      data_dir / NAME / 'side20' / '1.0.0')
  records = records_by_split(data_dir, f'{NAME}/side20')
  assert {split: len(r) for split, r in records.items()} == {
      'train': 15, 'validation': 5, 'test': 20}
  for by_id in records.values():
    for image_id, record in by_id.items():
      _, mode, image = _decoded(record['image'])
      assert mode == 'RGB' and image.shape == (20, 18, 3)
      for key, written in (('mask', fake.vessels[image_id]), ('fov', fake.inside[image_id])):
        _, _, stored = _decoded(record[key])
        nearest = Image.fromarray(written.astype(np.uint8) * 255).resize(
            (18, 20), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(stored, np.asarray(nearest), err_msg=key)


def test_without_test_annotations_there_is_no_test_split(tmp_path, caplog):
  fake = write_fake_drive(tmp_path / 'raw', test_annotations=False)
  assert not (fake.root / 'test' / '1st_manual').exists()
  with caplog.at_level(logging.WARNING):
    _build(fake, tmp_path / 'data')
  assert _counts(tmp_path / 'data') == {'train': 15, 'validation': 5}
  metadata = sources.dataset_info(BUILD, os.fspath(tmp_path / 'data')).metadata
  assert metadata['test_annotations_found'] is False
  assert 'no test split' in caplog.text


@pytest.mark.parametrize('where', ['set', 'parent', 'grandparent'])
def test_manual_dir_is_the_set_or_a_folder_above_it(tmp_path, where):
  fake = write_fake_drive(tmp_path / 'zip' / 'unzipped')
  manual_dir = {'set': fake.root, 'parent': fake.parent, 'grandparent': tmp_path / 'zip'}[where]
  # Folders that sort first but are not DRIVE: an archive's leftovers, another set.
  (tmp_path / 'zip' / '__MACOSX' / 'DRIVE' / 'training' / 'images').mkdir(parents=True)
  other = tmp_path / 'zip' / 'A_other' / 'training' / 'images'
  other.mkdir(parents=True)
  Image.new('RGB', (8, 8)).save(other / 'im0001.png')
  _build(fake, tmp_path / 'data', manual_dir=manual_dir)
  assert _counts(tmp_path / 'data') == {'train': 15, 'validation': 5, 'test': 20}
  assert drive.find_root(os.fspath(manual_dir)) == os.fspath(fake.root)


# Bad input: each a one-line DataError that names the file.


def test_no_drive_folder(fake, tmp_path):
  (fake.root / 'training').rename(fake.root / 'train')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, 'no DRIVE folder', 'training/images', fake.parent)


@pytest.mark.parametrize('split', ['train', 'test'])
@pytest.mark.parametrize('kind, what', [('manual', 'manual annotation'),
                                        ('fov', 'field-of-view mask')])
def test_an_image_without_its_annotation_or_fov_mask(fake, tmp_path, split, kind, what):
  image_id = fake.image_id(split, 2)
  os.remove(getattr(fake, kind)[image_id])
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, getattr(fake, kind)[image_id], what, fake.images[image_id],
                        'not found')
  assert not (tmp_path / 'data' / NAME / 'original').exists()


@pytest.mark.parametrize('kind, what', [('manual', 'manual annotation'),
                                        ('fov', 'field-of-view mask')])
def test_a_mask_of_another_size(fake, tmp_path, kind, what):
  image_id = fake.image_id('validation')
  Image.new('L', (7, 5)).save(getattr(fake, kind)[image_id], format='GIF')
  for skip in (False, True):  # a wrong pairing, not a bad file: never skipped
    with pytest.raises(DataError) as excinfo:
      _build(fake, tmp_path / 'data', skip_bad_images=skip)
    assert_one_line_error(excinfo, getattr(fake, kind)[image_id], f'{what} is 7x5',
                          f'{WIDTH}x{HEIGHT}', image_id)


@pytest.mark.filterwarnings('ignore:Truncated File Read:UserWarning')
def test_an_undecodable_image(fake, tmp_path):
  image_id = fake.image_id('train', 1)
  fake.images[image_id].write_bytes(fake.images[image_id].read_bytes()[:60])
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.images[image_id], image_id)


@pytest.mark.parametrize('kind, what', [('manual', 'manual annotation'),
                                        ('fov', 'field-of-view mask')])
def test_an_undecodable_mask(fake, tmp_path, kind, what):
  image_id = fake.image_id('test', 1)
  getattr(fake, kind)[image_id].write_bytes(b'GIF89a garbage')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, getattr(fake, kind)[image_id], f'cannot decode {what}',
                        image_id)


def test_an_image_name_without_its_number(fake, tmp_path):
  path = fake.root / 'training' / 'images' / 'extra_training.tif'
  shutil.copy(fake.images[TRAINING_IDS[0]], path)
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, path, '21_training.tif')


def test_no_training_image(fake, tmp_path):
  for image_id in TRAINING_IDS:
    os.remove(fake.images[image_id])
  (fake.root / 'training' / 'images' / 'Thumbs.db').write_bytes(b'\0')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data', manual_dir=fake.root)
  assert_one_line_error(excinfo, fake.root / 'training' / 'images', 'no NN_training.tif images')


def test_other_files_in_images_are_ignored(fake, tmp_path):
  (fake.root / 'training' / 'images' / 'Thumbs.db').write_bytes(b'\0')
  (fake.root / 'test' / 'images' / '.DS_Store').write_bytes(b'\0')
  _build(fake, tmp_path / 'data')
  assert _counts(tmp_path / 'data') == {'train': 15, 'validation': 5, 'test': 20}


@pytest.mark.filterwarnings('ignore:Corrupt EXIF data:UserWarning')
def test_skip_bad_images_lists_them_in_metadata(fake, tmp_path):
  no_fov, broken = fake.image_id('train', 0), fake.image_id('train', 3)
  bad_manual = fake.image_id('test', 1)
  os.remove(fake.fov[no_fov])
  fake.images[broken].write_bytes(b'II*\0 truncated tiff')
  fake.manual[bad_manual].write_bytes(b'not a gif')
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, skip_bad_images=True)
  kept = {i for split in records_by_split(data_dir, BUILD).values() for i in split}
  assert kept == set(fake.images) - {no_fov, broken, bad_manual}
  assert _counts(data_dir) == {'train': 13, 'validation': 5, 'test': 19}
  metadata = sources.dataset_info(BUILD, os.fspath(data_dir)).metadata
  assert metadata['skip_bad_images'] is True and metadata['num_skipped_images'] == 3
  skipped = {entry['where'].split('image_id ')[-1]: entry for entry in metadata['skipped_images']}
  assert set(skipped) == {no_fov, broken, bad_manual}
  assert skipped[no_fov]['path'] == os.fspath(fake.fov[no_fov])
  assert 'field-of-view mask' in skipped[no_fov]['reason']
  assert 'not found' in skipped[no_fov]['reason']
  assert skipped[broken]['path'] == os.fspath(fake.images[broken])
  assert skipped[bad_manual]['path'] == os.fspath(fake.manual[bad_manual])
  assert 'cannot decode manual annotation' in skipped[bad_manual]['reason']
  assert {entry['split'] for entry in skipped.values()} == {'train', 'test'}


def test_without_manual_dir_it_says_where_to_get_the_set(tmp_path):
  assert_manual_only(NAME, tfds_builders.Drive, tmp_path, 'drive.grand-challenge.org')
  assert 'drive.grand-challenge.org' in tfds_builders.Drive.MANUAL_DOWNLOAD_INSTRUCTIONS


# A tiny segmentation run on a build.


def test_segment_trains_on_a_drive_build(tmp_path):
  from test_segment import tiny_config  # pylint: disable=g-import-not-at-top
  fake = write_fake_drive(tmp_path / 'raw', seed=1)
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, name=NAME)  # the default config, original
  config = tiny_config(data_dir, dataset=NAME, batch_size=8, **{'data.image_size': 32})
  results = segment.train_and_evaluate(config, os.fspath(tmp_path / 'work'))
  assert results['trainer'] == 'segment' and results['dataset'] == NAME
  assert results['init'] == 'scratch' and results['step'] == 40
  assert results['labelled_images'] == 15
  assert results['validation']['num_examples'] == 5 and results['test']['num_examples'] == 20
  # Measured: 0.86 (validation) and 0.88 (test) Dice at the image size of 32 the run
  # scores at. Predicting every pixel as vessel scores 0.28 and 0.29.
  assert results['validation']['dice'] >= 0.7, results['validation']
  assert results['test']['dice'] >= 0.7, results['test']
