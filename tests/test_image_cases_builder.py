"""Tests of the image_cases TFDS builder (a user's images listed in cases.csv)."""

from __future__ import annotations

import collections
import csv
import logging
import io
import os
from pathlib import Path
import re

import numpy as np
from PIL import Image, ImageFile
import pytest
import tensorflow_datasets as tfds

from bigssl_med import build_data
from bigssl_med.data import sources
from bigssl_med.errors import DataError
import tfds_builders
from tfds_builders import common
from tfds_builders.image_cases import image_cases

NAME = 'image_cases'
NIH_SAMPLE = (Path(__file__).resolve().parents[1].parent / 'shared' / 'data' /
              'nih_chestxray14_sample')


def write_image(path: Path, *, mode: str = 'RGB', size=(20, 14), seed: int = 0,
                image_format: str | None = None) -> Path:
  """Writes a random image in `mode` ('RGB', 'L', or 'RGB_GRAY': RGB, R=G=B)."""
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  shape = (size[1], size[0])
  if mode == 'L':
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), 'L')
  elif mode == 'RGB_GRAY':
    gray = rng.integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(np.stack([gray] * 3, axis=-1), 'RGB')
  else:
    image = Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8),
                            'RGB')
  image.save(path, format=image_format)
  return path


def write_cases(root: Path, rows: list[dict], columns=None) -> Path:
  """Writes `root/cases.csv` with `columns` (default: the keys of rows[0])."""
  root.mkdir(parents=True, exist_ok=True)
  columns = list(columns or rows[0])
  path = root / 'cases.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  return path


def _case_ids_by_split(per_split: int) -> dict[str, list[str]]:
  """`per_split` case ids that hash into each split."""
  found = {'train': [], 'validation': [], 'test': []}
  number = 0
  while any(len(ids) < per_split for ids in found.values()):
    case_id = f'case{number:03d}'
    ids = found[common.hash_split(case_id)]
    if len(ids) < per_split:
      ids.append(case_id)
    number += 1
  return found


def _single_label_tree(root: Path, *, mode: str = 'RGB') -> list[dict]:
  """cases.csv without split: 2 cases per split, 1-2 images each, 3 classes."""
  rows = []
  for split, case_ids in _case_ids_by_split(2).items():
    for k, case_id in enumerate(case_ids):
      for view in range(1 + k):
        i = len(rows)
        path = f'img/{case_id}/view{view}.{"png" if i % 2 else "jpg"}'
        write_image(root / path, mode=mode, seed=i, size=(20 + i, 14))
        rows.append({'path': path, 'case_id': case_id,
                     'label': ('nevus', 'melanoma', 'bcc')[i % 3],
                     'notes': f'extra column {i}', 'split_expected': split})
  write_cases(root, rows, columns=('path', 'case_id', 'label', 'notes'))
  return rows


def _build(root: Path, data_dir: Path, name: str = NAME, **kwargs) -> str:
  return build_data.build(name, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(root), **kwargs)


def _records(data_dir: Path, name: str = NAME) -> dict[str, dict[str, dict]]:
  info = sources.dataset_info(name, os.fspath(data_dir))
  return {split: {r['image_id'].decode(): r
                  for r in sources.open_split(name, split, os.fspath(data_dir))}
          for split in info.splits}


def _assert_one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for part in parts:
    assert str(part) in message, (part, message)


def test_registered():
  assert tfds_builders.BUILDERS[NAME] is image_cases.ImageCases


def test_single_label_hash_split(tmp_path):
  root = tmp_path / 'mine'
  rows = _single_label_tree(root)
  data_dir = tmp_path / 'data'
  version_dir = _build(root, data_dir)
  assert version_dir == os.fspath(data_dir / NAME / 'original' / '1.0.0')
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  names = info.features['label'].names
  assert names == ['bcc', 'melanoma', 'nevus']  # Sorted.
  assert info.features['image'].shape == (None, None, 3)
  records = _records(data_dir)
  assert sorted(records) == ['test', 'train', 'validation']
  by_path = {row['path']: row for row in rows}
  assert sum(len(r) for r in records.values()) == len(rows) == 9
  for split, by_id in records.items():
    for image_id, record in by_id.items():
      row = by_path[image_id]
      assert split == row['split_expected'] == common.hash_split(row['case_id'])
      assert record['case_id'].decode() == row['case_id']
      assert names[record['label']] == row['label']
      assert set(record) == {'image', 'image_id', 'case_id', 'label'}
      # 8-bit RGB JPEG and PNG within max_side: stored as read.
      assert record['image'] == (root / image_id).read_bytes()


def test_multi_label_with_split_column(tmp_path):
  root = tmp_path / 'mine'
  rows = []
  for i, (split, case_id, labels) in enumerate((
      ('train', 'p1', 'effusion|mass'), ('train', 'p1', ''),
      ('TRAIN', 'p2', 'atelectasis'), ('val', 'p3', 'mass | effusion'),
      ('Valid', 'p3', 'mass'), ('validation', 'p4', ''),
      ('test', 'p5', 'atelectasis|effusion|mass'))):
    path = f'{case_id}_{i}.png'
    write_image(root / path, seed=i)
    rows.append({'path': path, 'case_id': case_id, 'labels': labels,
                 'split': split})
  write_cases(root, rows)
  data_dir = tmp_path / 'data'
  _build(root, data_dir)
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  assert info.metadata['label_names'] == ['atelectasis', 'effusion', 'mass']
  assert info.features['labels'].shape == (3,)
  assert 'label' not in info.features
  records = _records(data_dir)
  assert {s: len(r) for s, r in records.items()} == {
      'train': 3, 'validation': 3, 'test': 1}
  expected = {
      'p1_0.png': [0, 1, 1], 'p1_1.png': [0, 0, 0], 'p2_2.png': [1, 0, 0],
      'p3_3.png': [0, 1, 1], 'p3_4.png': [0, 0, 1], 'p4_5.png': [0, 0, 0],
      'p5_6.png': [1, 1, 1]}
  for by_id in records.values():
    for image_id, record in by_id.items():
      assert record['labels'].dtype == np.float32
      np.testing.assert_array_equal(record['labels'], expected[image_id])


def test_absolute_paths_outside_manual_dir(tmp_path):
  elsewhere = tmp_path / 'elsewhere'
  rows = []
  for i, case_id in enumerate(('a', 'a', 'b')):
    path = write_image(elsewhere / f'{i}.jpg', seed=i)
    rows.append({'path': os.fspath(path), 'case_id': case_id,
                 'label': 'x' if i else 'y', 'split': 'train'})
  root = tmp_path / 'mine'
  write_cases(root, rows)
  data_dir = tmp_path / 'data'
  _build(root, data_dir)
  records = _records(data_dir)
  assert list(records) == ['train']  # Empty splits are left out.
  assert set(records['train']) == {row['path'] for row in rows}


@pytest.mark.parametrize('mode', ['L', 'RGB_GRAY'])
def test_grayscale_images_get_one_channel(tmp_path, mode):
  root = tmp_path / 'mine'
  _single_label_tree(root, mode=mode)
  config = image_cases.ImageCases.make_config(manual_dir=os.fspath(root))
  assert config.channels == 1
  data_dir = tmp_path / 'data'
  _build(root, data_dir)
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  assert info.features['image'].shape == (None, None, 1)
  assert info.metadata['num_gray_converted_images'] == 0
  for by_id in _records(data_dir).values():
    for image_id, record in by_id.items():
      with Image.open(io.BytesIO(record['image'])) as image:
        assert image.mode == 'L'
        stored = np.asarray(image)
      with Image.open(root / image_id) as original:
        if original.format == 'PNG':  # Lossless: the same gray values.
          np.testing.assert_array_equal(stored,
                                        np.asarray(original.convert('L')))


def test_one_colour_image_among_the_first_16_gives_three_channels(tmp_path):
  root = tmp_path / 'mine'
  rows = _single_label_tree(root, mode='L')
  write_image(root / rows[-1]['path'], mode='RGB', size=(20 + len(rows) - 1, 14))
  config = image_cases.ImageCases.make_config(manual_dir=os.fspath(root))
  assert config.channels == 3
  assert (config.class_names, config.multi_label) == (
      ('bcc', 'melanoma', 'nevus'), False)


def test_a_later_colour_image_in_a_gray_set_is_listed_and_stored_gray(tmp_path):
  root = tmp_path / 'mine'
  rows = [{'path': f'img/{i}.png', 'case_id': f'case{i}', 'label': 'ab'[i % 2], 'split': 'train'}
          for i in range(image_cases.CHANNEL_PROBES + 2)]
  for i, row in enumerate(rows):  # gray, but the last one (beyond the probes) in colour
    write_image(root / row['path'], mode='RGB' if i == len(rows) - 1 else 'L', seed=i)
  write_cases(root, rows)
  assert image_cases.ImageCases.make_config(manual_dir=os.fspath(root)).channels == 1
  data_dir = tmp_path / 'data'
  _build(root, data_dir)
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  assert info.metadata['num_gray_converted_images'] == 1
  assert info.metadata['gray_converted_images'] == [
      {'split': 'train', 'path': rows[-1]['path'], 'where': f'{root / "cases.csv"} line '
                                                            f'{len(rows) + 1}'}]
  with Image.open(io.BytesIO(_records(data_dir)['train'][rows[-1]['path']]['image'])) as image:
    assert image.mode == 'L'


@pytest.mark.parametrize('mode,colour', [('L', False), ('RGB_GRAY', False), ('RGB', True),
                                         ('P', True), ('RGBA', True), ('I;16', False)])
@pytest.mark.parametrize('max_side', [None, 9])
def test_gray_encoding_stores_what_encode_image_stores_and_says_if_there_was_colour(
    tmp_path, mode, colour, max_side):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (14, 20, 4), dtype=np.uint8)
  image = {'L': Image.fromarray(pixels[..., 0]),
           'RGB_GRAY': Image.fromarray(np.repeat(pixels[..., :1], 3, axis=-1)),
           'RGB': Image.fromarray(pixels[..., :3]),
           'P': Image.fromarray(pixels[..., :3]).convert('P'),
           'RGBA': Image.fromarray(pixels),
           'I;16': Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)}[mode]
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  data = buffer.getvalue()
  stored, had_colour = common.encode_gray_image(data, name='x.png', max_side=max_side)
  assert stored == common.encode_image(data, name='x.png', max_side=max_side, channels=1)
  assert had_colour == colour
  assert had_colour == (not common.is_grayscale(image))


def test_a_gray_set_decodes_each_image_once(tmp_path, monkeypatch):
  root = tmp_path / 'mine'
  rows = _single_label_tree(root, mode='RGB_GRAY')
  config = image_cases.ImageCases.make_config(manual_dir=os.fspath(root))
  assert config.channels == 1
  loads = collections.Counter()
  load = ImageFile.ImageFile.load
  def counted(image):
    loads[image.size] += bool(image.tile)  # tiles left to decode: this load decodes
    return load(image)
  monkeypatch.setattr(ImageFile.ImageFile, 'load', counted)
  _build(root, tmp_path / 'data')
  # Each image once, and the first ones once more where the build probes the channels.
  assert sum(loads.values()) == len(rows) + min(len(rows), image_cases.CHANNEL_PROBES)


def test_named_config_and_max_side(tmp_path):
  root = tmp_path / 'mine'
  rows = _single_label_tree(root)
  data_dir = tmp_path / 'data'
  version_dir = _build(root, data_dir, name=f'{NAME}/mine')
  assert version_dir == os.fspath(data_dir / NAME / 'mine' / '1.0.0')
  assert sum(len(r) for r in _records(data_dir, f'{NAME}/mine').values()) == 9
  # A second private set in the same data dir, stored at a longest side of 16.
  small = _build(root, data_dir, name=f'{NAME}/mine.small-16', max_side=16)
  assert small == os.fspath(data_dir / NAME / 'mine.small-16' / '1.0.0')
  info = sources.dataset_info(f'{NAME}/mine.small-16', os.fspath(data_dir))
  assert info.metadata['max_side'] == 16
  by_path = {row['path']: row for row in rows}
  for by_id in _records(data_dir, f'{NAME}/mine.small-16').values():
    for image_id, record in by_id.items():
      assert image_id in by_path
      with Image.open(io.BytesIO(record['image'])) as image:
        assert max(image.size) == 16
  assert _build(root, data_dir, name=f'{NAME}/side16') == os.fspath(
      data_dir / NAME / 'side16' / '1.0.0')
  assert _build(root, data_dir, max_side=16) == os.fspath(
      data_dir / NAME / 'side16' / '1.0.0')  # Already built.
  assert sorted(os.listdir(data_dir / NAME)) == ['mine', 'mine.small-16',
                                                  'side16']


@pytest.mark.parametrize('name', ['my set', '..', 'a/b', 'side1', 'side7'])
def test_bad_config_name(tmp_path, name):
  root = tmp_path / 'mine'
  _single_label_tree(root)
  with pytest.raises(DataError) as excinfo:
    image_cases.ImageCases.make_config(name, manual_dir=os.fspath(root))
  _assert_one_line_error(excinfo, repr(name))


def test_config_contradicting_max_side(tmp_path):
  root = tmp_path / 'mine'
  _single_label_tree(root)
  with pytest.raises(DataError) as excinfo:
    image_cases.ImageCases.make_config('side32', max_side=16,
                                       manual_dir=os.fspath(root))
  _assert_one_line_error(excinfo, 'side32', '16')


def test_manual_dir_is_required(tmp_path):
  with pytest.raises(DataError) as excinfo:
    build_data.build(NAME, data_dir=os.fspath(tmp_path / 'data'))
  _assert_one_line_error(excinfo, '--manual_dir', 'cases.csv')


def test_cases_csv_missing(tmp_path):
  root = tmp_path / 'mine'
  write_image(root / 'a.png')
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, root / 'cases.csv', 'not found')


def test_missing_columns(tmp_path):
  root = tmp_path / 'mine'
  path = write_cases(root, [{'file': 'a.png', 'patient': 'p', 'label': 'x'}])
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'path', 'case_id')


def test_a_column_named_twice_is_an_error(tmp_path):
  path = tmp_path / 'cases.csv'
  path.write_text('path,case_id,label,note,note,,\na.png,p,x,1,2,,\n')
  with pytest.raises(DataError, match="column 'note' appears more than once"):
    common.read_table(os.fspath(path), required=('path',))


@pytest.mark.parametrize('columns', [('path', 'case_id', 'label', 'labels'),
                                     ('path', 'case_id', 'split')])
def test_label_and_labels_both_or_neither(tmp_path, columns):
  root = tmp_path / 'mine'
  write_image(root / 'a.png')
  path = write_cases(root, [{'path': 'a.png', 'case_id': 'p', 'label': 'x',
                             'labels': 'x', 'split': 'train'}], columns=columns)
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'label', 'labels',
                         'both' if 'label' in columns else 'neither')


def test_duplicate_path(tmp_path):
  root = tmp_path / 'mine'
  write_image(root / 'a.png')
  write_image(root / 'b.png')
  path = write_cases(root, [
      {'path': 'a.png', 'case_id': 'p', 'label': 'x'},
      {'path': 'b.png', 'case_id': 'p', 'label': 'x'},
      {'path': './a.png', 'case_id': 'q', 'label': 'y'}])
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'line 4', 'line 2', './a.png')


def test_case_in_two_splits(tmp_path):
  root = tmp_path / 'mine'
  rows = [{'path': f'{i}.png', 'case_id': case_id, 'label': 'x', 'split': split}
          for i, (case_id, split) in enumerate(
              (('p', 'train'), ('q', 'test'), ('p', 'val')))]
  for row in rows:
    write_image(root / row['path'])
  path = write_cases(root, rows)
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'case p', 'two splits', f'{path} line 2',
                         f'{path} line 4')


def test_unknown_split(tmp_path):
  root = tmp_path / 'mine'
  write_image(root / 'a.png')
  path = write_cases(root, [{'path': 'a.png', 'case_id': 'p', 'label': 'x',
                             'split': 'train'},
                            {'path': 'a2.png', 'case_id': 'q', 'label': 'x',
                             'split': 'dev'}])
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'line 3', "'dev'")


@pytest.mark.parametrize('column,message', [('case_id', 'empty case_id'),
                                            ('label', 'empty label'),
                                            ('path', 'empty path')])
def test_empty_values(tmp_path, column, message):
  root = tmp_path / 'mine'
  write_image(root / 'a.png')
  write_image(root / 'b.png')
  rows = [{'path': 'a.png', 'case_id': 'p', 'label': 'x'},
          {'path': 'b.png', 'case_id': 'q', 'label': 'y'}]
  rows[1][column] = ''
  path = write_cases(root, rows)
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'line 3', message)


def test_bad_images_error_or_skip(tmp_path, caplog):
  root = tmp_path / 'mine'
  rows = _single_label_tree(root)
  missing, broken = rows[4], rows[7]
  os.remove(root / missing['path'])
  (root / broken['path']).write_bytes(b'not an image')
  cases = root / 'cases.csv'
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  first = min(rows.index(missing), rows.index(broken), key=lambda i: (
      ('train', 'validation', 'test').index(rows[i]['split_expected']), i))
  _assert_one_line_error(excinfo, f'{cases} line {first + 2}',
                         root / rows[first]['path'])

  data_dir = tmp_path / 'data'
  with caplog.at_level('WARNING'):
    _build(root, data_dir, skip_bad_images=True)
  assert re.search(r'2 image\(s\) skipped as missing or undecodable; .*metadata.json lists each',
                   caplog.text)
  kept = {i for r in _records(data_dir).values() for i in r}
  assert kept == {r['path'] for r in rows} - {missing['path'], broken['path']}
  metadata = sources.dataset_info(NAME, os.fspath(data_dir)).metadata
  assert metadata['num_skipped_images'] == 2
  skipped = {entry['where']: entry for entry in metadata['skipped_images']}
  assert set(skipped) == {f'{cases} line {rows.index(missing) + 2}',
                          f'{cases} line {rows.index(broken) + 2}'}
  entry = skipped[f'{cases} line {rows.index(missing) + 2}']
  assert entry['split'] == missing['split_expected']
  assert 'not found' in entry['reason']
  assert 'cannot decode' in skipped[f'{cases} line {rows.index(broken) + 2}'][
      'reason']


def test_skipped_images_are_logged_one_by_one_up_to_a_limit_and_all_listed(caplog):
  metadata = {}
  store = common.ImageStore(max_side=None, channels=3, skip_bad_images=True,
                            metadata=metadata)
  total = common.LOGGED_SKIPS + 30
  with caplog.at_level('WARNING'):
    for i in range(total):
      store.skip(path=f'img{i}.jpg', where=f'cases.csv line {i + 2}', split='train',
                 reason='not found')
  logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Skipping')]
  assert len(logged) == common.LOGGED_SKIPS + 1
  assert 'further skipped images are not logged one by one' in logged[-1]
  assert metadata['num_skipped_images'] == total
  assert [e['path'] for e in metadata['skipped_images']] == [f'img{i}.jpg' for i in range(total)]


def test_skipping_every_image_of_a_split_is_an_error(tmp_path):
  root = tmp_path / 'mine'
  rows = _single_label_tree(root)
  test_rows = [row for row in rows if row['split_expected'] == 'test']
  os.remove(root / test_rows[0]['path'])
  for row in test_rows[1:]:
    (root / row['path']).write_bytes(b'not an image')
  data_dir = tmp_path / 'data'
  with pytest.raises(DataError) as excinfo:
    _build(root, data_dir, skip_bad_images=True)
  _assert_one_line_error(excinfo, f'all {len(test_rows)} images of split test', 'skipped',
                         root / test_rows[0]['path'])
  with pytest.raises(DataError, match='not built'):
    sources.dataset_info(NAME, os.fspath(data_dir))


# The real NIH sample (../shared/data/nih_chestxray14_sample) as a user's data.

_SAMPLE_SPLITS = {'train': 'train', 'valid': 'validation', 'test': 'test'}


def _sample_rows() -> list[dict]:
  if not NIH_SAMPLE.is_dir():
    pytest.skip('../shared/data/nih_chestxray14_sample is absent: the real-data '
                'test of image_cases needs the NIH ChestX-ray14 sample there')
  rows = []
  for folder in sorted(_SAMPLE_SPLITS):
    for label_dir in sorted((NIH_SAMPLE / folder).iterdir()):
      for image in sorted(label_dir.glob('*.png')):
        assert re.fullmatch(r'[0-9]{8}_[0-9]{3}\.png', image.name), image
        rows.append({'path': os.fspath(image), 'case_id': image.name[:8],
                     'label': label_dir.name, 'split': folder})
  return rows


def test_real_nih_sample(tmp_path):
  rows = _sample_rows()
  assert len(rows) == 1000
  patients = {row['case_id'] for row in rows}
  # The sample's README says 262 patients; its file names give 264.
  assert len(patients) == 264
  root = tmp_path / 'nih_sample'

  # The sample's folders are not patient-disjoint: with them as the split
  # column, the build refuses.
  write_cases(root, rows)
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'two splits', 'splits must be case-disjoint')

  # Patient-disjoint hash splits instead.
  write_cases(root, rows, columns=('path', 'case_id', 'label'))
  data_dir = tmp_path / 'data'
  _build(root, data_dir, name=f'{NAME}/nih_sample')
  name = f'{NAME}/nih_sample'
  info = sources.dataset_info(name, os.fspath(data_dir))
  assert info.features['label'].names == ['0_normal', '1_abnormal']
  assert info.features['image'].shape == (None, None, 1)  # R=G=B X-rays.
  split_of_patient = collections.defaultdict(set)
  total = 0
  for split in info.splits:
    source = sources.open_split(name, split, os.fspath(data_dir))
    total += len(source)
    for record in source:
      split_of_patient[record['case_id'].decode()].add(split)
      assert split == common.hash_split(record['case_id'].decode())
    groups = sources.case_index(name, split, os.fspath(data_dir))
    assert sum(len(g) for g in groups) == len(source)
  assert total == 1000
  assert set(split_of_patient) == patients
  assert all(len(s) == 1 for s in split_of_patient.values())
  multi = sum(len(g) > 1 for split in info.splits
              for g in sources.case_index(name, split, os.fspath(data_dir)))
  assert multi == sum(c > 1 for c in collections.Counter(
      row['case_id'] for row in rows).values())

  # The folders as splits, with each image its own case: 600/200/200.
  for row in rows:
    row['case_id'] = Path(row['path']).stem
  write_cases(root, rows)
  _build(root, data_dir, name=f'{NAME}/nih_sample_folders')
  info = sources.dataset_info(f'{NAME}/nih_sample_folders', os.fspath(data_dir))
  assert {s: info.splits[s].num_examples for s in info.splits} == {
      'train': 600, 'validation': 200, 'test': 200}


@pytest.mark.parametrize('column,first,second,what', [
    ('label', 'Melanoma', 'melanoma', 'class name'),
    ('label', '1', '1.0', 'class name'),
    ('labels', 'Effusion|Mass', 'effusion', 'class name'),
    ('case_id', 'HAM_0006321', 'ham_0006321', 'case_id'),
    ('case_id', '13', '13.0', 'case_id'),
])
def test_a_name_spelled_two_ways_is_an_error(tmp_path, column, first, second, what):
  root = tmp_path / 'mine'
  label = 'labels' if column == 'labels' else 'label'
  rows = [{'path': f'img/{i}.png', 'case_id': f'case{i}', label: 'b'} for i in range(4)]
  rows[1][column], rows[3][column] = first, second
  for row in rows:
    write_image(root / row['path'], seed=int(row['path'][4]))
  write_cases(root, rows)
  spelled = second.split('|')[0] if column != 'labels' else second
  with pytest.raises(DataError, match=rf"cases.csv line 5: {what} '{spelled}' is "
                                      rf"'{first.split('|')[0]}' \(line 3\) spelled another"):
    image_cases.read_cases(os.fspath(root))


def test_names_that_only_look_alike_are_kept(tmp_path):
  root = tmp_path / 'mine'
  rows = [{'path': f'img/{i}.png', 'case_id': f'case{i}', 'label': name}
          for i, name in enumerate(['1', '10', 'Mel', 'Mel-2'])]
  for i, row in enumerate(rows):
    write_image(root / row['path'], seed=i)
  write_cases(root, rows)
  assert image_cases.read_cases(os.fspath(root)).class_names == ('1', '10', 'Mel', 'Mel-2')


def test_a_build_from_an_edited_cases_csv_is_not_silently_kept(tmp_path):
  root = tmp_path / 'mine'
  rows = _single_label_tree(root)
  data_dir = tmp_path / 'data'
  _build(root, data_dir)
  _build(root, data_dir)  # unchanged: kept
  rows[0]['label'] = 'nevus' if rows[0]['label'] != 'nevus' else 'bcc'
  write_cases(root, rows)
  with pytest.raises(DataError, match=r'was built from another version of .*cases.csv \(it has '
                                      r'changed since\): rebuild it with --overwrite'):
    _build(root, data_dir)
  with pytest.raises(DataError, match='was built from another version'):
    build_data.ensure_built(NAME, data_dir=os.fspath(data_dir), manual_dir=os.fspath(root))
  assert build_data.ensure_built(NAME, data_dir=os.fspath(data_dir)) == os.fspath(data_dir)


# Lists made on Windows, in Excel or elsewhere.


def test_a_csv_that_is_not_utf8_is_an_error_naming_the_line(tmp_path):
  root = tmp_path / 'mine'
  write_image(root / 'a.png')
  write_image(root / 'b.png')
  root.joinpath('cases.csv').write_bytes(
      'path,case_id,label\na.png,p,nevus\nb.png,q,caf\u00e9-au-lait\n'.encode('cp1252'))
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, root / 'cases.csv', 'line 3 (byte 0xe9) is not UTF-8',
                         'CSV UTF-8')


def test_backslash_paths_tilde_and_letter_case_find_their_files(tmp_path, monkeypatch, caplog):
  root = tmp_path / 'mine'
  monkeypatch.setenv('HOME', os.fspath(tmp_path / 'home'))
  written = {'img\\p1\\a.png': root / 'img' / 'p1' / 'a.png',
             '~/photos/b.png': tmp_path / 'home' / 'photos' / 'b.png',
             '~\\photos\\f.png': tmp_path / 'home' / 'photos' / 'f.png',
             'img/p2/c.jpg': root / 'img' / 'p2' / 'C.JPG',
             'IMG/P2/d.png': root / 'img' / 'p2' / 'd.png',
             'img/p3/e.png': root / 'img' / 'p3' / 'e.png'}
  for i, file in enumerate(written.values()):
    write_image(file, seed=i, image_format='JPEG' if file.suffix == '.JPG' else 'PNG')
  rows = [{'path': path, 'case_id': f'p{i}', 'label': 'x' if i % 2 else 'y', 'split': 'train'}
          for i, path in enumerate(written)]
  write_cases(root, rows)
  data_dir = tmp_path / 'data'
  with caplog.at_level('WARNING'):
    _build(root, data_dir)
  records = _records(data_dir)['train']
  assert sorted(records) == sorted(written)  # image ids: the paths as written
  for path, file in written.items():
    assert records[path]['image'] == file.read_bytes()
  assert re.search(r'image_cases train: 2 image file\(s\) found only with letter case ignored '
                   r'\(first: .*cases.csv line 5, read from .*C.JPG\)', caplog.text)


def test_one_file_listed_twice_in_other_letter_case_is_an_error(tmp_path):
  root = tmp_path / 'mine'
  write_image(root / 'img' / 'A.png')
  write_image(root / 'img' / 'b.png', seed=1)
  path = write_cases(root, [
      {'path': 'img/A.png', 'case_id': 'p', 'label': 'x', 'split': 'train'},
      {'path': 'img/b.png', 'case_id': 'q', 'label': 'y', 'split': 'train'},
      {'path': 'img/a.png', 'case_id': 'r', 'label': 'x', 'split': 'test'}])  # A.png again
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{path} line 4: image img/a.png is the file of {path} line 2',
                         'other letter case')
  assert not (tmp_path / 'data' / NAME).exists()


def test_names_matching_two_files_letter_case_aside_are_not_guessed(tmp_path):
  root = tmp_path / 'mine'
  write_image(root / 'A.png')
  write_image(root / 'a.PNG', seed=1)
  write_image(root / 'b.png')
  path = write_cases(root, [{'path': 'a.png', 'case_id': 'p', 'label': 'x', 'split': 'train'},
                            {'path': 'b.png', 'case_id': 'q', 'label': 'y', 'split': 'train'}])
  with pytest.raises(DataError) as excinfo:
    _build(root, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{path} line 2', 'not found', root / 'a.png')


@pytest.mark.parametrize('listed', ['C:\\derm\\a.jpg', 'c:/derm/a.jpg'])
def test_a_windows_drive_path_is_an_error_naming_the_line(tmp_path, listed):
  root = tmp_path / 'mine'
  path = write_cases(root, [{'path': listed, 'case_id': 'p', 'label': 'x'}])
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, f'{path} line 2', f'{listed} is a Windows path')


# Unlabeled images.


def _with_unlabeled(root: Path, column: str = 'label') -> tuple[list[dict], dict[str, str]]:
  """cases.csv with labeled and unlabeled rows; returns (rows, case_id -> split)."""
  ids = _case_ids_by_split(1)
  split_of = {ids['train'][0]: 'train', ids['validation'][0]: 'validation',
              ids['test'][0]: 'test', 'only_unlabeled': 'unlabeled'}
  value = 'nevus' if column == 'label' else 'effusion|mass'
  rows = []
  for case_id, split in split_of.items():
    if split != 'unlabeled':  # a labeled image, split by case hash (empty cell)
      rows.append({'path': f'{case_id}/labeled.png', 'case_id': case_id, column: value,
                   'split': ''})
    for k, spelled in enumerate(('unlabeled', 'Unlabelled')):
      rows.append({'path': f'{case_id}/u{k}.png', 'case_id': case_id, column: '',
                   'split': spelled})
  for i, row in enumerate(rows):
    write_image(root / row['path'], seed=i)
  write_cases(root, rows)
  return rows, split_of


@pytest.mark.parametrize('column', ['label', 'labels'])
def test_unlabeled_images_form_their_own_split(tmp_path, column, caplog):
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows, split_of = _with_unlabeled(root, column)
  with caplog.at_level('WARNING'):
    _build(root, data_dir)
  records = _records(data_dir)
  train_case = next(c for c, s in split_of.items() if s == 'train')
  assert {s: sorted(r) for s, r in records.items()} == {
      'train': [f'{train_case}/labeled.png'],
      'validation': [f'{c}/labeled.png' for c, s in split_of.items() if s == 'validation'],
      'test': [f'{c}/labeled.png' for c, s in split_of.items() if s == 'test'],
      # Those of a train case and of a case with no labeled image are kept.
      'unlabeled': sorted(f'{c}/u{k}.png' for c in (train_case, 'only_unlabeled')
                          for k in range(2))}
  for record in records['unlabeled'].values():
    if column == 'label':
      assert record['label'] == -1
    else:
      assert np.isnan(record['labels']).all() and record['labels'].shape == (2,)
  for split in ('train', 'validation', 'test'):
    for record in records[split].values():
      if column == 'label':
        assert record['label'] == 0
      else:
        np.testing.assert_array_equal(record['labels'], [1, 1])
  metadata = sources.dataset_info(NAME, os.fspath(data_dir)).metadata
  left_out = {entry['path'] for entry in metadata['unlabeled_images_left_out']}
  assert left_out == {f'{c}/u{k}.png' for c, s in split_of.items()
                      if s in ('validation', 'test') for k in range(2)}
  assert metadata['num_unlabeled_images_left_out'] == 4
  assert '4 unlabeled image(s) left out' in caplog.text
  # A MICLe unit of train+unlabeled is a case, whichever split its images are in.
  cases = sources.cases(NAME, 'train+unlabeled', os.fspath(data_dir))
  assert {k: len(v) for k, v in cases.items()} == {train_case: 3, 'only_unlabeled': 2}
  os.remove(os.path.join(sources.find_version_dir(NAME, os.fspath(data_dir)),
                         sources.CASE_INDEX_FILE))
  scanned = sources.cases(NAME, 'train+unlabeled', os.fspath(data_dir))
  assert {k: v.tolist() for k, v in scanned.items()} == {k: v.tolist() for k, v in cases.items()}
  source = sources.open_split(NAME, 'train+unlabeled', os.fspath(data_dir))
  assert [source[i]['case_id'].decode() for i in cases[train_case]] == [train_case] * 3
  with pytest.raises(DataError, match="has no split 'nope'; available splits: test, train, "
                                      'unlabeled, validation'):
    sources.open_split(NAME, 'train+nope', os.fspath(data_dir))


def test_a_label_on_an_unlabeled_row_and_no_labeled_row_are_errors(tmp_path):
  root = tmp_path / 'mine'
  write_image(root / 'a.png')
  rows = [{'path': 'a.png', 'case_id': 'p', 'label': 'nevus', 'split': 'unlabeled'}]
  path = write_cases(root, rows)
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, f'{path} line 2', "label 'nevus' on a row of split unlabeled")
  rows[0]['label'] = ''
  write_cases(root, rows)
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, path, 'every row is split unlabeled')


def test_a_case_split_by_hash_and_by_hand_two_ways_is_an_error(tmp_path):
  root = tmp_path / 'mine'
  case_id = _case_ids_by_split(1)['test'][0]
  rows = [{'path': 'a.png', 'case_id': case_id, 'label': 'x', 'split': ''},
          {'path': 'b.png', 'case_id': case_id, 'label': 'x', 'split': 'train'}]
  path = write_cases(root, rows)
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, f'case {case_id} is in two splits',
                         f'test ({path} line 2 by case hash)', f'train ({path} line 3)')


# Masks (segmentation).


def write_disc_cases(root: Path, num_cases: int = 9, *, size=(32, 24), seed: int = 0,
                     split: bool = False) -> list[dict]:
  """A segmentation set in a published-like layout: `images/ID.jpg`, a bright disc on noisy
  skin, and `masks/ID_segmentation.png`, that disc (0 and 255); cases.csv lists them with
  a class and an extra column, two images a case split by case hash, or with `split` one
  a case in a `split` column (train, train, train, validation, test, over again)."""
  rng = np.random.default_rng(seed)
  (root / 'images').mkdir(parents=True, exist_ok=True)
  (root / 'masks').mkdir(exist_ok=True)
  yy, xx = np.mgrid[0:size[1], 0:size[0]]
  rows = []
  for i in range(num_cases):
    image_id = f'IMG_{i:05d}'
    cy, cx = rng.uniform(0.3, 0.7) * size[1], rng.uniform(0.25, 0.75) * size[0]
    radius = rng.uniform(0.15, 0.3) * min(size)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    pixels = rng.normal([150, 100, 90], 20, (size[1], size[0], 3))
    pixels[disc] = rng.normal([250, 230, 220], 10, (disc.sum(), 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        root / 'images' / f'{image_id}.jpg', format='JPEG', quality=95)
    Image.fromarray(disc.astype(np.uint8) * 255).save(
        root / 'masks' / f'{image_id}_segmentation.png', format='PNG')
    row = {'path': f'images/{image_id}.jpg', 'case_id': f'lesion{i // 2:04d}',
           'label': ('benign', 'malignant')[i % 2],
           'mask': f'masks/{image_id}_segmentation.png', 'site': 'back'}
    if split:
      row.update(case_id=f'lesion{i:04d}',
                 split=('train', 'train', 'train', 'validation', 'test')[i % 5])
    rows.append(row)
  write_cases(root, rows)
  return rows


def _mask_of(record) -> np.ndarray:
  with Image.open(io.BytesIO(record['mask'])) as mask:
    assert mask.format == 'PNG' and mask.mode == 'L'
    return np.asarray(mask)


def _size_of(data: bytes) -> tuple[int, int]:
  with Image.open(io.BytesIO(data)) as image:
    return image.size


@pytest.mark.parametrize('name,max_side', [(NAME, None), (f'{NAME}/side16', None),
                                           (f'{NAME}/seg', 16)])
def test_masks_are_stored_binary_with_their_images(tmp_path, name, max_side):
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows = write_disc_cases(root, 6)
  # Masks as users have them: 0/1, colour, 16-bit, palette, JPEG; any nonzero pixel counts
  # (in a JPEG, 128 or more: compression leaves small values along the disc's edge).
  disc = np.asarray(Image.open(root / rows[1]['mask'])) > 0
  Image.fromarray(disc.astype(np.uint8)).save(root / rows[1]['mask'])
  colour = np.zeros(disc.shape + (3,), np.uint8)
  colour[disc] = (0, 0, 7)
  Image.fromarray(colour).save(root / rows[2]['mask'])
  Image.fromarray(disc.astype(np.uint16) * 3).save(root / rows[3]['mask'])
  Image.fromarray(disc.astype(np.uint8) * 2).convert('P').save(root / rows[4]['mask'])
  rows[5]['mask'] = rows[5]['mask'].replace('.png', '.jpg')
  Image.fromarray(disc.astype(np.uint8) * 255).save(root / rows[5]['mask'], quality=90)
  write_cases(root, rows)
  config = image_cases.ImageCases.make_config(sources.split_name(name)[1], max_side=max_side,
                                              manual_dir=os.fspath(root))
  assert config.masks and 'with binary masks' in config.description
  _build(root, data_dir, name=name, max_side=max_side)
  info = sources.dataset_info(name, os.fspath(data_dir))
  assert info.features['mask'].shape == (None, None, 1)
  assert info.features['mask'].encoding_format == 'png'
  records = {i: r for by_id in _records(data_dir, name).values() for i, r in by_id.items()}
  assert len(records) == 6
  for row in rows:
    record = records[row['path']]
    assert set(record) == {'image', 'image_id', 'case_id', 'label', 'mask'}
    stored = _mask_of(record)
    assert set(np.unique(stored)) <= {0, 255}
    with Image.open(root / row['mask']) as published:
      foreground = np.asarray(published.convert('RGB')).any(axis=-1)
    if row['mask'].endswith('.jpg'):
      foreground = disc  # the disc as drawn, not the compression's halo around it
    width, height = _size_of(record['image'])
    assert stored.shape == (height, width)
    if name == NAME:  # as published
      assert (width, height) == (32, 24)
      np.testing.assert_array_equal(stored, foreground * 255)
    else:  # downscaled with the image (longest side 16), nearest neighbour
      assert (width, height) == (16, 12)
      expected = Image.fromarray(foreground.astype(np.uint8) * 255).resize(
          (16, 12), Image.Resampling.NEAREST)
      np.testing.assert_array_equal(stored, np.asarray(expected))
  if name == NAME:  # a 0/255 gray PNG of the stored size is stored as read
    assert records[rows[0]['path']]['mask'] == (root / rows[0]['mask']).read_bytes()
  assert np.any(_mask_of(records[rows[1]['path']]) == 255)  # 0/1: scaled, not lost


def test_a_jpeg_mask_is_read_without_its_compression_halo(tmp_path):
  disc = np.zeros((24, 32), bool)
  yy, xx = np.mgrid[:24, :32]
  disc[(yy - 12) ** 2 + (xx - 15) ** 2 < 60] = True
  Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / 'm.jpg', quality=75)
  assert (np.asarray(Image.open(tmp_path / 'm.jpg')) != 0).sum() > disc.sum()  # a halo
  stored = image_cases.load_mask(os.fspath(tmp_path / 'm.jpg'), 'line 2', stored_size=(32, 24),
                                 image_size=(32, 24))
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored))), disc * 255)


def test_masks_of_images_with_an_exif_orientation(tmp_path, caplog):
  """Builds keep an image's pixels as stored, whatever its EXIF orientation says: the mask
  must match them; a mask of the displayed (turned) image is refused with a hint."""
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows = write_disc_cases(root, 4, split=True)
  image = Image.open(root / rows[1]['path']).convert('RGB')
  exif = Image.Exif()
  exif[0x0112] = 6  # displayed turned by 90 degrees
  rows[1]['path'] = rows[1]['path'].rsplit('.', 1)[0] + '_turned.jpg'
  image.save(root / rows[1]['path'], exif=exif)
  write_cases(root, rows)
  with caplog.at_level(logging.WARNING):
    _build(root, data_dir)
  assert 'has EXIF orientation 6, which builds ignore' in caplog.text
  Image.open(root / rows[1]['mask']).transpose(Image.Transpose.ROTATE_270).save(
      root / rows[1]['mask'])
  with pytest.raises(DataError, match='mask must match its pixels as stored, not as '
                     'displayed'):
    _build(root, tmp_path / 'data2')


def test_without_a_mask_column_there_is_no_mask_feature(tmp_path):
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows = write_disc_cases(root, 3)
  write_cases(root, rows, columns=('path', 'case_id', 'label'))
  assert not image_cases.ImageCases.make_config(manual_dir=os.fspath(root)).masks
  _build(root, data_dir)
  assert 'mask' not in sources.dataset_info(NAME, os.fspath(data_dir)).features


def test_a_mask_of_another_size_is_an_error_naming_the_line_and_sizes(tmp_path):
  root = tmp_path / 'mine'
  rows = write_disc_cases(root, 4, split=True)
  Image.new('L', (24, 32)).save(root / rows[2]['mask'])
  cases = root / 'cases.csv'
  for skip in (False, True):  # not a missing or undecodable file: never skipped
    with pytest.raises(DataError) as excinfo:
      _build(root, tmp_path / 'data', skip_bad_images=skip)
    _assert_one_line_error(excinfo, f'{cases} line 4', root / rows[2]['mask'],
                           'is 24x32 but its image is 32x24')


def test_a_missing_or_undecodable_mask_is_an_error_or_skipped(tmp_path):
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows = write_disc_cases(root, 5, split=True)
  os.remove(root / rows[1]['mask'])
  (root / rows[2]['mask']).write_bytes(b'not an image')
  cases = root / 'cases.csv'
  with pytest.raises(DataError) as excinfo:
    _build(root, data_dir)
  _assert_one_line_error(excinfo, f'{cases} line 3', f'mask file {root / rows[1]["mask"]} '
                         'not found')
  _build(root, data_dir, skip_bad_images=True)
  kept = {i for r in _records(data_dir).values() for i in r}
  assert kept == {rows[i]['path'] for i in (0, 3, 4)}
  metadata = sources.dataset_info(NAME, os.fspath(data_dir)).metadata
  assert metadata['num_skipped_images'] == 2
  skipped = {entry['where']: entry for entry in metadata['skipped_images']}
  assert set(skipped) == {f'{cases} line 3', f'{cases} line 4'}
  assert skipped[f'{cases} line 3']['path'] == os.fspath(root / rows[1]['mask'])
  assert 'not found' in skipped[f'{cases} line 3']['reason']
  assert 'cannot decode mask file' in skipped[f'{cases} line 4']['reason']


def test_an_empty_mask_cell_on_a_labeled_row_is_an_error(tmp_path):
  root = tmp_path / 'mine'
  rows = write_disc_cases(root, 3)
  rows[1]['mask'] = ''
  path = write_cases(root, rows)
  for skip in (False, True):
    with pytest.raises(DataError) as excinfo:
      _build(root, tmp_path / 'data', skip_bad_images=skip)
    _assert_one_line_error(excinfo, f'{path} line 3', 'empty mask')


def test_unlabeled_rows_have_no_mask_and_store_an_empty_one(tmp_path):
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows = write_disc_cases(root, 4, split=True)
  rows[3].update(label='', split='unlabeled')
  path = write_cases(root, rows)
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, f'{path} line 5', f"mask {rows[3]['mask']!r} on a row of "
                         'split unlabeled')
  rows[3]['mask'] = ''
  write_cases(root, rows)
  _build(root, data_dir, max_side=16)
  records = _records(data_dir, f'{NAME}/side16')
  (record,) = records['unlabeled'].values()
  assert record['label'] == -1
  assert _mask_of(record).shape == (12, 16) and not _mask_of(record).any()
  assert all(_mask_of(r).any() for r in records['train'].values())


def test_mask_paths_follow_the_rules_of_image_paths(tmp_path, caplog):
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows = write_disc_cases(root, 3)
  os.rename(root / rows[0]['mask'], root / 'masks' / 'IMG_00000_SEGMENTATION.PNG')
  rows[1]['mask'] = rows[1]['mask'].replace('/', '\\')
  elsewhere = tmp_path / 'elsewhere' / 'm.png'
  elsewhere.parent.mkdir()
  os.rename(root / rows[2]['mask'], elsewhere)
  rows[2]['mask'] = os.fspath(elsewhere)
  write_cases(root, rows)
  with caplog.at_level('WARNING'):
    _build(root, data_dir)
  assert 'found only with letter case ignored' in caplog.text
  assert 'IMG_00000_SEGMENTATION.PNG' in caplog.text
  records = {i: r for by_id in _records(data_dir).values() for i, r in by_id.items()}
  assert all(_mask_of(records[row['path']]).any() for row in rows)


def test_a_build_without_masks_is_not_reused_once_cases_csv_has_them(tmp_path):
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows = write_disc_cases(root, 4)
  write_cases(root, rows, columns=('path', 'case_id', 'label'))
  _build(root, data_dir)
  write_cases(root, rows)
  with pytest.raises(DataError, match='was built from another version of .*cases.csv'):
    _build(root, data_dir)
  with pytest.raises(DataError, match='was built from another version'):
    build_data.ensure_built(NAME, data_dir=os.fspath(data_dir), manual_dir=os.fspath(root))
  _build(root, data_dir, overwrite=True)
  assert 'mask' in sources.dataset_info(NAME, os.fspath(data_dir)).features
  # A config made before the column was added does not build the new cases.csv.
  write_cases(root, rows, columns=('path', 'case_id', 'label'))
  config = image_cases.ImageCases.make_config('other', manual_dir=os.fspath(root))
  write_cases(root, rows)
  builder = image_cases.ImageCases(data_dir=os.fspath(tmp_path / 'other'), config=config,
                                   file_format='array_record')
  with pytest.raises(DataError, match='has changed since config other was made from it'):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(root)))


MASKS_ONLY = ('path', 'case_id', 'split', 'mask')


def test_a_set_of_masks_only_has_no_class_feature(tmp_path):
  # Segmentation without classes: a mask column and neither label nor labels.
  root, data_dir = tmp_path / 'mine', tmp_path / 'data'
  rows = write_disc_cases(root, 6, split=True)
  rows[5].update(split='unlabeled', mask='')  # an image for pretraining only
  path = write_cases(root, rows, columns=MASKS_ONLY)
  config = image_cases.ImageCases.make_config(manual_dir=os.fspath(root))
  assert config.class_names == () and config.masks and not config.multi_label
  assert not config.has_classes and 'masks only' in config.description
  _build(root, data_dir)
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  assert set(info.features) == {'image', 'image_id', 'case_id', 'mask'}
  assert info.supervised_keys == ('image', 'mask')
  assert 'label_names' not in info.metadata
  records = _records(data_dir)
  assert {split: len(r) for split, r in records.items()} == {
      'train': 3, 'validation': 1, 'test': 1, 'unlabeled': 1}
  for row in rows[:5]:
    record = records[row['split']][row['path']]
    with Image.open(root / row['mask']) as published:
      np.testing.assert_array_equal(_mask_of(record), np.asarray(published))
  assert not _mask_of(records['unlabeled'][rows[5]['path']]).any()
  # Outside split unlabeled every row names its mask; a file of no annotated row fails.
  rows[2]['mask'] = ''
  write_cases(root, rows, columns=MASKS_ONLY)
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, f'{path} line 4', 'empty mask')
  for row in rows:
    row.update(split='unlabeled', mask='')
  write_cases(root, rows, columns=MASKS_ONLY)
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, path, 'every row is split unlabeled', 'images with masks')


def test_neither_label_nor_mask_column_names_the_mask_column_as_an_option(tmp_path):
  root = tmp_path / 'mine'
  rows = write_disc_cases(root, 2)
  path = write_cases(root, rows, columns=('path', 'case_id'))
  with pytest.raises(DataError) as excinfo:
    image_cases.read_cases(os.fspath(root))
  _assert_one_line_error(excinfo, path, 'neither of the columns label and labels',
                         'a mask column for a set of masks only')
