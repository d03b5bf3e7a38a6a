"""Tests of the nih_chest_xray14 TFDS builder, on a generated tree in NIH's layout."""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from bigssl_med import build_data
from bigssl_med.data import sources
from bigssl_med.errors import DataError
import tfds_builders
from tfds_builders import common
from tfds_builders.nih_chest_xray14 import nih_chest_xray14 as nih

NAME = 'nih_chest_xray14'
# The published header: the bracketed names split into two columns each, and
# every line of the 2017 file ends with a comma.
HEADER_2017 = ('Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,'
               'Patient Gender,View Position,OriginalImage[Width,Height],'
               'OriginalImagePixelSpacing[x,y],')
# Follow-ups per patient, for patients that land in each split.
_PATIENTS = {'train': (3, 1, 2), 'validation': (2, 1), 'test': (2, 1)}
_FINDINGS = ('No Finding', 'Cardiomegaly', 'Effusion|Infiltration',
             'Pleural_Thickening', 'Hernia|Mass|Nodule', 'No Finding',
             'Emphysema', 'Atelectasis|Pneumonia|Pneumothorax',
             'Consolidation|Edema|Fibrosis')
_RGBA_ROW = 2  # Index (in `rows`) of the image written as an RGBA PNG.


@dataclasses.dataclass
class FakeNih:
  """A generated NIH tree; `rows` are the listed images, in label-file order."""
  root: Path
  labels: Path
  train_val: Path
  test: Path
  rows: list[dict]
  unlisted: dict
  images: dict[str, Path]

  def rewrite_labels(self, edit) -> None:
    """Replaces the label file's lines by `edit(lines)`."""
    lines = self.labels.read_text().splitlines()
    self.labels.write_text('\n'.join(edit(lines)) + '\n')


def _patients() -> dict[str, list[int]]:
  """Patient numbers, in order, that land in each split."""
  found = {split: [] for split in _PATIENTS}
  number = 1
  while any(len(found[s]) < len(n) for s, n in _PATIENTS.items()):
    case_id = nih.case_id_of(str(number))
    split = 'test' if number % 3 == 0 else nih.train_val_split(case_id)
    if len(found[split]) < len(_PATIENTS[split]):
      found[split].append(number)
    number += 1
  return found


def _row_line(row: dict, trailing_comma: bool = True) -> str:
  fields = [row['image_id'], row['findings'], str(row['follow_up']),
            str(row['patient']), row['age'], row['sex'], row['view'],
            '2500', '2048', '0.168', '0.168']
  return ','.join(fields) + (',' if trailing_comma else '')


def write_fake_nih(root: Path, *, labels_name: str = 'Data_Entry_2017.csv',
                   sex_column: str = 'Patient Gender',
                   trailing_comma: bool = True) -> FakeNih:
  """Writes labels, split lists and PNGs in `images_00N/images/`."""
  rng = np.random.default_rng(0)
  rows = []
  for split, numbers in _patients().items():
    for number, follow_ups in zip(numbers, _PATIENTS[split]):
      for follow_up in range(follow_ups):
        i = len(rows)
        rows.append({
            'image_id': f'{number:08d}_{follow_up:03d}.png', 'patient': number,
            'case_id': f'{number:08d}', 'follow_up': follow_up, 'split': split,
            'findings': _FINDINGS[i % len(_FINDINGS)],
            'age': '' if i == 1 else ('061Y' if i == 3 else str(30 + i)),
            'sex': 'F' if i % 2 else 'M', 'view': 'AP' if i % 3 else 'PA'})
  unlisted = {'image_id': '00009999_000.png', 'patient': 9999,
              'case_id': '00009999', 'follow_up': 0, 'split': None,
              'findings': 'Mass', 'age': '40', 'sex': 'M', 'view': 'PA'}
  header = HEADER_2017.replace('Patient Gender', sex_column)
  if not trailing_comma:
    header = header.rstrip(',')
  lines = [header] + [_row_line(r, trailing_comma) for r in rows[:4]]
  lines += [_row_line(unlisted, trailing_comma)]
  lines += [_row_line(r, trailing_comma) for r in rows[4:]]
  root.mkdir(parents=True, exist_ok=True)
  labels = root / labels_name
  labels.write_text('\n'.join(lines) + '\n')
  train_val, test = root / 'train_val_list.txt', root / 'test_list.txt'
  train_val.write_text(''.join(f'{r["image_id"]}\n' for r in rows
                               if r['split'] != 'test'))
  test.write_text(''.join(f'{r["image_id"]}\n' for r in rows
                          if r['split'] == 'test'))
  images = {}
  for i, row in enumerate(rows + [unlisted]):
    folder = root / f'images_{1 + i * 2 // len(rows):03d}' / 'images'
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / row['image_id']
    size = (24 + 2 * i, 20 + i)
    pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    if i == _RGBA_ROW:
      rgba = np.stack([pixels, pixels // 2, 255 - pixels,
                       np.full_like(pixels, 255)], axis=-1)
      Image.fromarray(rgba, 'RGBA').save(path)
    else:
      Image.fromarray(pixels, 'L').save(path)
    images[row['image_id']] = path
  return FakeNih(root=root, labels=labels, train_val=train_val, test=test,
                 rows=rows, unlisted=unlisted, images=images)


@pytest.fixture
def fake(tmp_path) -> FakeNih:
  return write_fake_nih(tmp_path / 'nih')


def _build(fake_nih: FakeNih, data_dir, name: str = NAME, **kwargs) -> str:
  return build_data.build(name, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(fake_nih.root), **kwargs)


def _records(data_dir, name: str = NAME) -> dict[str, dict[str, dict]]:
  """split -> image_id -> record."""
  info = sources.dataset_info(name, os.fspath(data_dir))
  return {split: {r['image_id'].decode(): r
                  for r in sources.open_split(name, split, os.fspath(data_dir))}
          for split in info.splits}


def _assert_one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for part in parts:
    assert str(part) in message, (part, message)


def _expected_labels(findings: str) -> np.ndarray:
  names = set(findings.split('|')) - {'No Finding'}
  return np.array([float(n in names) for n in nih.FINDINGS], dtype=np.float32)


def test_registered_with_configs():
  assert tfds_builders.BUILDERS[NAME] is nih.NihChestXray14
  assert [c.name for c in nih.NihChestXray14.BUILDER_CONFIGS] == ['side512',
                                                                  'original']
  assert nih.NihChestXray14.make_config() is nih.NihChestXray14.BUILDER_CONFIGS[0]
  assert nih.case_id_of('1') == nih.case_id_of('00000001') == '00000001'
  for case_id in ('00000001', '00000002', '00030805'):
    expected = 'train' if common.hash_bucket(case_id) < 90 else 'validation'
    assert nih.train_val_split(case_id) == expected


def test_build_published_layout(fake, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = _build(fake, data_dir)
  assert version_dir == os.fspath(data_dir / NAME / 'side512' / '1.0.0')
  records = _records(data_dir)
  counts = collections.Counter(row['split'] for row in fake.rows)
  assert {split: len(r) for split, r in records.items()} == dict(counts)
  assert dict(counts) == {'train': 6, 'validation': 3, 'test': 3}
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  assert info.metadata['label_names'] == list(nih.FINDINGS)
  assert info.metadata['num_unlisted'] == 1
  assert info.metadata['num_skipped_images'] == 0
  assert info.features['labels'].shape == (14,)
  rows = {row['image_id']: row for row in fake.rows}
  no_finding = 0
  for split, by_id in records.items():
    for image_id, record in by_id.items():
      row = rows[image_id]
      assert row['split'] == split
      assert record['case_id'].decode() == row['case_id']
      assert record['labels'].dtype == np.float32
      np.testing.assert_array_equal(record['labels'],
                                    _expected_labels(row['findings']))
      no_finding += row['findings'] == 'No Finding'
      if row['findings'] == 'No Finding':
        assert not record['labels'].any()
      assert nih.findings_of(record['labels']) == [
          f for f in nih.FINDINGS if f in row['findings'].split('|')]
      assert record['follow_up'] == row['follow_up']
      if row['age']:
        assert record['age'] == float(row['age'].rstrip('Y'))
      else:
        assert math.isnan(record['age'])
      assert record['sex'].decode() == row['sex']
      assert record['view_position'].decode() == row['view']
      with Image.open(io.BytesIO(record['image'])) as image:
        assert (image.format, image.mode) == ('PNG', 'L')
        stored = np.asarray(image)
      with Image.open(fake.images[image_id]) as original:
        assert original.size == image.size
        np.testing.assert_array_equal(stored, np.asarray(original.convert('L')))
        if original.mode == 'L':  # Gray PNG within 512: bytes kept as given.
          assert record['image'] == fake.images[image_id].read_bytes()
  assert no_finding == sum(r['findings'] == 'No Finding' for r in fake.rows) == 3
  assert fake.unlisted['image_id'] not in {i for r in records.values() for i in r}
  assert Image.open(fake.images[fake.rows[_RGBA_ROW]['image_id']]).mode == 'RGBA'


def test_splits_patient_disjoint_and_case_index(fake, tmp_path):
  data_dir = tmp_path / 'data'
  _build(fake, data_dir)
  splits_of_patient = collections.defaultdict(set)
  for split, by_id in _records(data_dir).items():
    for record in by_id.values():
      splits_of_patient[record['case_id'].decode()].add(split)
  assert all(len(s) == 1 for s in splits_of_patient.values())
  assert len(splits_of_patient) == 7
  expected = collections.defaultdict(set)
  for row in fake.rows:
    expected[row['case_id']].add(row['image_id'])
  for split in ('train', 'validation', 'test'):
    source = sources.open_split(NAME, split, os.fspath(data_dir))
    groups = sources.case_index(NAME, split, os.fspath(data_dir))
    assert sum(len(g) for g in groups) == len(source)
    for group in groups:
      case_id = source[int(group[0])]['case_id'].decode()
      assert {source[int(i)]['image_id'].decode() for i in group} == (
          expected[case_id])
  assert any(len(g) > 1 for g in sources.case_index(NAME, 'train',
                                                     os.fspath(data_dir)))


def test_2020_label_file_is_preferred_and_patient_sex_accepted(tmp_path):
  fake = write_fake_nih(tmp_path / 'nih', labels_name='Data_Entry_2017_v2020.csv',
                        sex_column='Patient Sex', trailing_comma=False)
  # An older label file beside it, with a finding the builder would refuse.
  (fake.root / 'Data_Entry_2017.csv').write_text(
      HEADER_2017 + '\n' + _row_line(dict(fake.rows[0], findings='Tumour')) + '\n')
  _build(fake, tmp_path / 'data')
  records = _records(tmp_path / 'data')
  assert sum(len(r) for r in records.values()) == len(fake.rows)
  row = fake.rows[4]
  assert records[row['split']][row['image_id']]['sex'].decode() == row['sex']


def test_side16_config_resizes_to_one_channel(fake, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = _build(fake, data_dir, name=f'{NAME}/side16')
  assert version_dir == os.fspath(data_dir / NAME / 'side16' / '1.0.0')
  assert _build(fake, data_dir, max_side=16) == version_dir  # Already built.
  info = sources.dataset_info(f'{NAME}/side16', os.fspath(data_dir))
  assert info.metadata['max_side'] == 16
  assert info.features['image'].shape == (None, None, 1)
  for by_id in _records(data_dir, f'{NAME}/side16').values():
    for image_id, record in by_id.items():
      with Image.open(io.BytesIO(record['image'])) as image:
        assert image.mode == 'L' and max(image.size) == 16
        stored_size = image.size
      with Image.open(fake.images[image_id]) as original:
        width, height = original.size
      assert stored_size == (16, round(16 * height / width))


def test_original_config(fake, tmp_path):
  version_dir = _build(fake, tmp_path / 'data', name=f'{NAME}/original')
  assert version_dir == os.fspath(tmp_path / 'data' / NAME / 'original' / '1.0.0')


# Bad input: one-line DataErrors naming the file and line.


def test_patient_in_both_lists(fake, tmp_path):
  test_row = next(r for r in fake.rows if r['split'] == 'test')
  other = next(r for r in fake.rows if r['split'] == 'train')
  # Another image of the test patient, listed for train/validation.
  extra = dict(other, image_id=f'{test_row["patient"]:08d}_007.png',
               patient=test_row['patient'])
  fake.rewrite_labels(lambda lines: lines + [_row_line(extra)])
  with open(fake.train_val, 'a') as f:
    f.write(extra['image_id'] + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, test_row['case_id'], 'two splits',
                         fake.train_val, fake.test)


def test_image_in_both_lists(fake, tmp_path):
  row = next(r for r in fake.rows if r['split'] == 'train')
  with open(fake.test, 'a') as f:
    f.write(row['image_id'] + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, row['case_id'], 'two splits', 'test_list.txt')


def test_unknown_finding(fake, tmp_path):
  def edit(lines):
    lines[3] = lines[3].replace(fake.rows[2]['findings'], 'Effusion|Tumour', 1)
    return lines
  fake.rewrite_labels(edit)
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.labels, 'line 4', "'Tumour'",
                         fake.rows[2]['image_id'])


def test_missing_image_is_an_error(fake, tmp_path):
  row = fake.rows[5]  # Line 8 of the label file (header, 4 rows, unlisted row).
  os.remove(fake.images[row['image_id']])
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.labels, 'line 8', row['image_id'],
                         'not found')


def test_skip_bad_images_lists_them(fake, tmp_path):
  missing, broken = fake.rows[5], fake.rows[0]
  os.remove(fake.images[missing['image_id']])
  fake.images[broken['image_id']].write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, skip_bad_images=True)
  kept = {i for r in _records(data_dir).values() for i in r}
  assert kept == {r['image_id'] for r in fake.rows} - {missing['image_id'],
                                                       broken['image_id']}
  metadata = sources.dataset_info(NAME, os.fspath(data_dir)).metadata
  assert metadata['num_skipped_images'] == 2
  skipped = {entry['where']: entry for entry in metadata['skipped_images']}
  assert set(skipped) == {f'{fake.labels} line 8', f'{fake.labels} line 2'}
  assert skipped[f'{fake.labels} line 8']['split'] == missing['split']
  assert 'not found' in skipped[f'{fake.labels} line 8']['reason']
  assert 'cannot decode' in skipped[f'{fake.labels} line 2']['reason']


@pytest.mark.parametrize('how', ['missing', 'undecodable'])
def test_skipping_every_image_of_a_split_is_an_error(fake, tmp_path, how):
  """With every test image gone (an archive not unpacked), the build must not end as
  a complete data set without its test split."""
  test_rows = [row for row in fake.rows if row['split'] == 'test']
  for row in test_rows:
    if how == 'missing':
      os.remove(fake.images[row['image_id']])
    else:
      fake.images[row['image_id']].write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  data_dir = tmp_path / 'data'
  with pytest.raises(DataError) as excinfo:
    _build(fake, data_dir, skip_bad_images=True)
  _assert_one_line_error(excinfo, f'all {len(test_rows)} images of split test',
                         'skipped', test_rows[0]['image_id'])
  with pytest.raises(DataError, match='not built'):
    sources.dataset_info(NAME, os.fspath(data_dir))


def test_a_patient_id_of_digits_outside_ascii_is_kept_as_written():
  assert nih.case_id_of('42') == '00000042'
  assert nih.case_id_of('\u00b2') == '\u00b2'  # str.isdigit() is True; int() fails


def test_listed_image_not_in_label_file(fake, tmp_path):
  with open(fake.test, 'a') as f:
    f.write('\n00012345_000.png\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.test, 'line 5', '00012345_000.png',
                         'not in the label file')


def test_missing_columns(fake, tmp_path):
  fake.rewrite_labels(lambda lines: [lines[0].replace('Patient ID', 'Patient')]
                      + lines[1:])
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.labels, 'Patient ID')


def test_missing_sex_column(fake, tmp_path):
  fake.rewrite_labels(lambda lines: [lines[0].replace('Patient Gender', 'Sexe')]
                      + lines[1:])
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.labels, 'Patient Gender or Patient Sex')


def test_missing_split_list(fake, tmp_path):
  os.remove(fake.test)
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'test_list.txt', fake.root)


def test_bad_age(fake, tmp_path):
  def edit(lines):
    lines[2] = lines[2].replace(',,', ',old,', 1)  # Row 1 has an empty age.
    return lines
  fake.rewrite_labels(edit)
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.labels, 'line 3', "'old'")


class _OfflineDownloadManager:
  """Stands in for TFDS's DownloadManager with no manual_dir and no network."""

  def __init__(self, fake_nih=None):
    self.fake = fake_nih
    self.extracted = None
    self.downloaded = None

  @property
  def manual_dir(self):
    raise AssertionError('Manual directory not enabled.')

  def download_and_extract(self, resources):
    self.extracted = resources
    if self.fake is None:
      raise ConnectionError('Failed to resolve nihcc.box.com\nsecond line')
    return {key: self.fake.root for key in resources}

  def download(self, urls):
    self.downloaded = urls
    return {'labels': self.fake.labels, 'train_val': self.fake.train_val,
            'test': self.fake.test}


def test_download_failure_says_to_pass_manual_dir(tmp_path):
  builder = nih.NihChestXray14(data_dir=os.fspath(tmp_path))
  with pytest.raises(DataError) as excinfo:
    # pylint: disable-next=protected-access
    builder._split_generators(_OfflineDownloadManager())
  _assert_one_line_error(excinfo, 'could not download', '--manual_dir',
                         'nihcc.app.box.com/v/ChestXray-NIHCC')


def test_download_path_uses_the_downloaded_files(fake, tmp_path):
  builder = nih.NihChestXray14(data_dir=os.fspath(tmp_path))
  manager = _OfflineDownloadManager(fake)
  # pylint: disable-next=protected-access
  generators = builder._split_generators(manager)
  assert [r.url for r in manager.extracted.values()] == list(
      nih.IMAGE_ARCHIVE_URLS)
  assert sorted(manager.extracted) == [f'images_{i:03d}' for i in range(1, 13)]
  assert all(r.extract_method == tfds.download.ExtractMethod.TAR_GZ
             for r in manager.extracted.values())
  assert manager.downloaded == nih.TABLE_URLS
  assert sum(len(list(g)) for g in generators.values()) == len(fake.rows)
