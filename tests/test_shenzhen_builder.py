"""Tests of the shenzhen TFDS builder, on generated trees in the published layout."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from bigssl_med import build_data, config_schema
from bigssl_med.data import sources
from bigssl_med.errors import DataError
from bigssl_med.trainers import finetune
from conftest import shrunk
from conftest import assert_manual_only, assert_one_line_error, nlm_image_ids, records_by_split
import tfds_builders
from tfds_builders import nlm_tb
from tfds_builders.shenzhen import shenzhen

NAME = 'shenzhen'
BUILD = 'shenzhen/original'
BENCHMARK = 'shenzhen/benchmark_original'
LISTS = {'train': 'ShenzenCXR_train_data.txt', 'validation': 'ShenzenCXR_valid_data.txt',
         'test': 'ShenzenCXR_test_data.txt'}


@dataclasses.dataclass
class FakeShenzhen:
  """A generated `ChinaSet_AllFiles/` under `parent`; dicts are keyed by image id."""
  parent: Path
  root: Path
  images: dict[str, Path]
  readings: dict[str, Path]

  def image_id(self, split: str, index: int = 0) -> str:
    return [i for i in sorted(self.images) if shenzhen.split_for_case(i) == split][index]


def _image_ids(per_split: dict[str, int]) -> list[str]:
  return nlm_image_ids('CHNCXR', per_split)


# Clinical reading texts of several forms, by image position, and what they give:
# (sex, age, reading).
READINGS = (
    ('male 45yrs\nnormal\n', ('M', 45.0, 'normal')),
    ('female 32yrs\r\n\r\nPTB in the left upper field\r\n',
     ('F', 32.0, 'PTB in the left upper field')),
    ('Male, 28 yrs\nnormal\n', ('M', 28.0, 'normal')),
    ('F 60yr \nSTB in the right upper field\nbilateral pleuritis\n',
     ('F', 60.0, 'STB in the right upper field\nbilateral pleuritis')),
    ('M 7\nnormal\n', ('M', 7.0, 'normal')),
    ('\n  FEMALE 6 months\nnormal\n', ('F', 0.5, 'normal')),
    ('male\nnormal\n', ('M', math.nan, 'normal')),
    ('normal\n', ('', math.nan, 'normal')),
    ('female ?\nnormal\n', ('F', math.nan, 'normal')),
    ('34yrs\nnormal\n', ('', 34.0, 'normal')),
)


def write_fake_shenzhen(parent: Path, per_split=(7, 3, 3), seed: int = 0,
                        ids: list[str] | None = None) -> FakeShenzhen:
  """Writes `parent/ChinaSet_AllFiles` as the release unpacks: CXR_png/,
  ClinicalReadings/ and the ReadMe; gray noisy images, those of tuberculosis brighter.

  Image i has the clinical reading `READINGS[i % len(READINGS)]`, but the last image
  has none. Sizes alternate between 32x24 and 24x32.
  """
  rng = np.random.default_rng(seed)
  root = parent / 'ChinaSet_AllFiles'
  (root / 'CXR_png').mkdir(parents=True)
  (root / 'ClinicalReadings').mkdir()
  (root / 'NLM-ChinaCXRSet-ReadMe.docx').write_bytes(b'PK\x03\x04 not read')
  fake = FakeShenzhen(parent=parent, root=root, images={}, readings={})
  if ids is None:
    ids = _image_ids(dict(zip(('train', 'validation', 'test'), per_split)))
  for index, image_id in enumerate(ids):
    width, height = (32, 24) if index % 2 else (24, 32)
    base = 170 if image_id.endswith('_1') else 80
    pixels = rng.normal(base, 20, (height, width))
    fake.images[image_id] = root / 'CXR_png' / f'{image_id}.png'
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(fake.images[image_id])
    if index < len(ids) - 1:
      fake.readings[image_id] = root / 'ClinicalReadings' / f'{image_id}.txt'
      fake.readings[image_id].write_bytes(READINGS[index % len(READINGS)][0].encode())
  return fake


def write_lists(folder: Path, assignment: dict[str, list[str]]) -> dict[str, Path]:
  """The benchmark's three split lists in `folder`: `NAME.png,LABEL` per image id."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = {}
  for split, ids in assignment.items():
    paths[split] = folder / LISTS[split]
    paths[split].write_text(''.join(f'{i}.png,{i[-1]}\n' for i in ids))
  return paths


def _by_position(ids: list[str]) -> dict[str, list[str]]:
  """A split that is not the case hash's: by position, 3/1/1 of every 5; the last image
  is in no list."""
  assignment = {'train': [], 'validation': [], 'test': []}
  for index, image_id in enumerate(ids[:-1]):
    assignment[('train', 'train', 'train', 'validation', 'test')[index % 5]].append(image_id)
  return assignment


@pytest.fixture
def fake(tmp_path) -> FakeShenzhen:
  return write_fake_shenzhen(tmp_path / 'raw')


@pytest.fixture
def listed(fake) -> tuple[FakeShenzhen, dict[str, list[str]], dict[str, Path]]:
  """`fake` with the benchmark's lists beside the set (in `parent/dataset/`)."""
  assignment = _by_position(sorted(fake.images))
  return fake, assignment, write_lists(fake.parent / 'dataset', assignment)


def _build(fake, data_dir, name=BUILD, manual_dir=None, **kwargs) -> str:
  return build_data.build(name, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(manual_dir or fake.parent), **kwargs)


def _records(data_dir, name=BUILD) -> dict[str, dict[str, dict]]:
  return records_by_split(data_dir, name)


_assert_one_line_error = assert_one_line_error


def test_registered_manual_only_with_side512_default():
  assert tfds_builders.BUILDERS[NAME] is tfds_builders.Shenzhen
  assert tfds_builders.Shenzhen.name == NAME
  assert str(tfds_builders.Shenzhen.VERSION) == '1.0.0'
  assert tfds_builders.Shenzhen.DOWNLOADS is False
  configs = tfds_builders.Shenzhen.BUILDER_CONFIGS
  assert [(c.name, c.max_side, c.split_lists) for c in configs] == [
      ('side512', 512, False), ('original', None, False),
      ('benchmark_side512', 512, True), ('benchmark_original', None, True)]


@pytest.mark.parametrize('name, max_side, expected', [
    (None, None, ('side512', 512, False)),
    (None, 64, ('side64', 64, False)),
    ('benchmark_side512', None, ('benchmark_side512', 512, True)),
    ('benchmark_side64', None, ('benchmark_side64', 64, True)),
    ('benchmark_side64', 64, ('benchmark_side64', 64, True)),
    ('original', None, ('original', None, False)),
])
def test_make_config(name, max_side, expected):
  config = tfds_builders.Shenzhen.make_config(name, max_side=max_side)
  if expected[0] in tfds_builders.Shenzhen.builder_configs:  # the listed object itself
    assert config is tfds_builders.Shenzhen.builder_configs[expected[0]]
  assert (config.name, config.max_side, config.split_lists) == expected


@pytest.mark.parametrize('name, max_side, parts', [
    ('benchmark', None, ['benchmark_side512']),
    ('benchmark_', None, ['benchmark_side512']),
    ('lists', None, ['benchmark_original']),
    ('benchmark_side64', 32, ["'benchmark_side64' contradicts max_side=32"]),
])
def test_make_config_errors(name, max_side, parts):
  with pytest.raises(DataError) as excinfo:
    tfds_builders.Shenzhen.make_config(name, max_side=max_side)
  _assert_one_line_error(excinfo, *parts)


def test_split_rule_matches_docstring():
  for case_id in ('CHNCXR_0001_0', 'CHNCXR_0662_1', 'x'):
    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    expected = 'train' if bucket < 80 else 'validation' if bucket < 90 else 'test'
    assert shenzhen.split_for_case(case_id) == expected


def test_build_counts_labels_and_images(fake, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = _build(fake, data_dir)
  assert version_dir == os.fspath(data_dir / NAME / 'original' / '1.0.0')
  records = _records(data_dir)
  assert {split: len(r) for split, r in records.items()} == {
      'train': 7, 'validation': 3, 'test': 3}
  info = sources.dataset_info(BUILD, os.fspath(data_dir))
  assert info.features['label'].names == ['normal', 'tuberculosis']
  assert info.features['image'].shape == (None, None, 1)
  for split, by_id in records.items():
    for image_id, record in by_id.items():
      assert shenzhen.split_for_case(image_id) == split
      assert record['case_id'].decode() == image_id
      assert info.features['label'].int2str(record['label']) == (
          'tuberculosis' if image_id.endswith('_1') else 'normal')
      # 8-bit gray PNGs within the config's side: stored as published.
      assert record['image'] == fake.images[image_id].read_bytes()
      with Image.open(io.BytesIO(record['image'])) as image:
        assert (image.format, image.mode) == ('PNG', 'L')
  labels = collections.Counter(r['label'] for by_id in records.values() for r in by_id.values())
  assert sum(labels.values()) == 13 and set(labels) == {0, 1}
  metadata = info.metadata
  assert metadata['split_lists'] == {} and metadata['num_unlisted_images'] == 0
  assert metadata['num_skipped_images'] == 0


def test_sex_age_and_reading(fake, tmp_path):
  data_dir = tmp_path / 'data'
  _build(fake, data_dir)
  by_id = {i: r for split in _records(data_dir).values() for i, r in split.items()}
  ids = sorted(fake.images)
  expected = {index: values for index, (_, values) in enumerate(READINGS)}
  expected[len(ids) - 1] = ('', math.nan, '')  # no clinical reading
  for index, (sex, age, text) in expected.items():
    record = by_id[ids[index]]
    assert record['sex'].decode() == sex, index
    assert record['reading'].decode() == text, index
    if math.isnan(age):
      assert math.isnan(record['age']), index
    else:
      assert record['age'] == pytest.approx(age), index
  metadata = sources.dataset_info(BUILD, os.fspath(data_dir)).metadata
  assert metadata['images_without_reading'] == [ids[-1]]
  # 'normal' alone: no sex and age line; named, not silently empty.
  assert metadata['readings_without_sex_age'] == [ids[7]]


@pytest.mark.parametrize('text, expected', [
    ('male 35yrs\nnormal', ('M', 35.0, 'normal')),
    ('Female 35 yrs\n\nnormal\n', ('F', 35.0, 'normal')),
    ('female,35yr\nnormal', ('F', 35.0, 'normal')),
    ('m 35\nnormal', ('M', 35.0, 'normal')),
    ('male35yrs\nnormal', ('M', 35.0, 'normal')),
    ('MALE 35 years\nnormal', ('M', 35.0, 'normal')),
    ('female 10 days\nnormal', ('F', 10 / 365.25, 'normal')),
    ('male unknown\nnormal', ('M', math.nan, 'normal')),
    ('f\nPTB in the left upper field', ('F', math.nan, 'PTB in the left upper field')),
    ('F/U: PTB\nleft upper field', ('', math.nan, 'F/U: PTB\nleft upper field')),
    ('male 45yrs', ('M', 45.0, '')),
    ('', ('', math.nan, '')),
    # The reading may start on the first line, after the age and its punctuation.
    ('male 45yrs PTB in the left\nupper field', ('M', 45.0, 'PTB in the left\nupper field')),
    ('male 35 yrs PTB', ('M', 35.0, 'PTB')),
    ('male 45yrs\tnormal', ('M', 45.0, 'normal')),
    ('Female 35yrs,\nnormal', ('F', 35.0, 'normal')),
    ('male\uff0c45yrs\nnormal', ('M', 45.0, 'normal')),
    ('male 45 yrs\u3002\nnormal', ('M', 45.0, 'normal')),
    ('male 16month\nnormal', ('M', 16 / 12, 'normal')),
    # The release's misspellings of female.
    ('femal 32yrs\nnormal', ('F', 32.0, 'normal')),
    ('fmale 45yrs\nnormal', ('F', 45.0, 'normal')),
])
def test_read_reading(tmp_path, text, expected):
  path = tmp_path / 'CHNCXR_0001_0.txt'
  path.write_bytes(text.encode())
  reading = shenzhen.read_reading(os.fspath(path))
  assert (reading.sex, reading.text) == (expected[0], expected[2])
  assert (math.isnan(reading.age) and math.isnan(expected[1])) or (
      reading.age == pytest.approx(expected[1]))


def test_a_reading_in_latin1_is_read(tmp_path):
  path = tmp_path / 'CHNCXR_0001_0.txt'
  path.write_bytes('male 35yrs\nnormal \xe9\n'.encode('latin-1'))
  assert shenzhen.read_reading(os.fspath(path)).text == 'normal \xe9'
  # Byte 0x85 (U+0085 in Latin-1) is no line end: errors name the right line.
  path.write_bytes(b' \x85\nmale old\nnormal\n')
  with pytest.raises(DataError, match='line 2: age'):
    shenzhen.read_reading(os.fspath(path))


@pytest.mark.parametrize('header', ['male old', 'female 35hours', 'M 3x5', 'male PTB 35yrs'])
def test_a_sex_without_an_age_after_it_is_a_one_line_error(tmp_path, header):
  path = tmp_path / 'CHNCXR_0001_0.txt'
  path.write_text(f'\n{header}\nnormal\n')
  with pytest.raises(DataError) as excinfo:
    shenzhen.read_reading(os.fspath(path))
  _assert_one_line_error(excinfo, path, 'line 2', 'is not an age', 'male 45yrs')


@pytest.mark.parametrize('text, years', [('45yrs', 45.0), ('45 yrs', 45.0), ('45yr', 45.0),
                                         ('45', 45.0), ('045Y', 45.0), ('6 months', 0.5),
                                         ('2wks', 14 / 365.25), ('n/a', math.nan)])
def test_shared_parse_age(text, years):
  got = nlm_tb.parse_age(text, where='x.txt line 1', expected='45yrs')
  assert (math.isnan(got) and math.isnan(years)) or got == pytest.approx(years)
  with pytest.raises(DataError, match=r"^x.txt line 1: age '45 hours' is not an age"):
    nlm_tb.parse_age('45 hours', where='x.txt line 1', expected='45yrs')


def test_an_unparseable_reading_stops_the_build(fake, tmp_path):
  image_id = fake.image_id('validation')
  fake.readings[image_id].write_text('female old\nnormal\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.readings[image_id], 'line 1', "'old'")


def test_hash_splits_are_case_disjoint_deterministic_and_indexed(fake, tmp_path):
  version_dir = _build(fake, tmp_path / 'a')
  _build(fake, tmp_path / 'b', num_threads=1)
  first, second = _records(tmp_path / 'a'), _records(tmp_path / 'b')
  assignment = {split: sorted(by_id) for split, by_id in first.items()}
  assert assignment == {split: sorted(by_id) for split, by_id in second.items()}
  assert assignment == {split: sorted(i for i in fake.images
                                      if shenzhen.split_for_case(i) == split)
                        for split in ('train', 'validation', 'test')}
  cases = [r['case_id'] for by_id in first.values() for r in by_id.values()]
  assert len(cases) == len(set(cases)) == 13
  with open(os.path.join(version_dir, sources.CASE_INDEX_FILE)) as f:
    index = json.load(f)
  assert index['dataset'] == NAME
  for split, entry in index['splits'].items():
    assert sorted(entry['case_ids']) == assignment[split]


def test_the_default_config_ignores_the_benchmark_lists(listed, tmp_path):
  fake, _, _ = listed
  _build(fake, tmp_path / 'data')
  assert {split: sorted(by_id) for split, by_id in _records(tmp_path / 'data').items()} == {
      split: sorted(i for i in fake.images if shenzhen.split_for_case(i) == split)
      for split in ('train', 'validation', 'test')}


@pytest.mark.parametrize('where', ['set', 'parent', 'grandparent'])
def test_manual_dir_is_the_set_or_a_folder_above_it(tmp_path, where):
  fake = write_fake_shenzhen(tmp_path / 'zip' / 'ChinaSet')
  manual_dir = {'set': fake.root, 'parent': fake.parent, 'grandparent': tmp_path / 'zip'}[where]
  (tmp_path / 'zip' / '__MACOSX' / 'ChinaSet_AllFiles' / 'CXR_png').mkdir(parents=True)
  _build(fake, tmp_path / 'data', manual_dir=manual_dir)
  assert sum(len(r) for r in _records(tmp_path / 'data').values()) == 13


def test_side_config_downscales_images(fake, tmp_path):
  data_dir = tmp_path / 'data'
  assert _build(fake, data_dir, name=NAME, max_side=16) == os.fspath(
      data_dir / NAME / 'side16' / '1.0.0')
  for by_id in _records(data_dir, f'{NAME}/side16').values():
    for image_id, record in by_id.items():
      with Image.open(fake.images[image_id]) as published:
        width, height = published.size
      with Image.open(io.BytesIO(record['image'])) as image:
        assert image.mode == 'L'
        assert image.size == ((16, 12) if width > height else (12, 16))


# The benchmark's split lists.


@pytest.mark.parametrize('where', ['beside the set', 'in the set'])
def test_benchmark_config_takes_the_splits_from_the_lists(fake, tmp_path, where):
  assignment = _by_position(sorted(fake.images))
  folder = fake.parent / 'dataset' if where == 'beside the set' else fake.root
  lists = write_lists(folder, assignment)
  data_dir = tmp_path / 'data'
  manual_dir = fake.parent if where == 'beside the set' else fake.root
  assert _build(fake, data_dir, name=BENCHMARK, manual_dir=manual_dir) == os.fspath(
      data_dir / NAME / 'benchmark_original' / '1.0.0')
  records = _records(data_dir, BENCHMARK)
  assert {split: sorted(by_id) for split, by_id in records.items()} == {
      split: sorted(ids) for split, ids in assignment.items()}
  assert assignment != {split: sorted(i for i in fake.images
                                      if shenzhen.split_for_case(i) == split)
                        for split in assignment}  # not the case hash's
  info = sources.dataset_info(BENCHMARK, os.fspath(data_dir))
  last = sorted(fake.images)[-1]
  assert info.metadata['unlisted_images'] == [last]
  assert info.metadata['num_unlisted_images'] == 1
  assert info.metadata['split_lists'] == {split: os.fspath(p) for split, p in lists.items()}
  for by_id in records.values():
    for image_id, record in by_id.items():
      assert info.features['label'].int2str(record['label']) == (
          'tuberculosis' if image_id.endswith('_1') else 'normal')
  # The hash-split build of the same set lands beside it.
  _build(fake, data_dir, manual_dir=manual_dir)
  assert sources.built_configs(NAME, os.fspath(data_dir)) == [
      f'{NAME}/benchmark_original', f'{NAME}/original']


def _append(path: Path, line: str) -> int:
  """Appends `line` to `path`; returns its line number."""
  text = path.read_text()
  path.write_text(text + line + '\n')
  return text.count('\n') + 1


def test_a_listed_file_that_cxr_png_lacks(listed, tmp_path):
  fake, _, lists = listed
  number = _append(lists['validation'], 'CHNCXR_0999_1.png,1')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data', name=BENCHMARK)
  _assert_one_line_error(excinfo, lists['validation'], f'line {number}', 'CHNCXR_0999_1.png',
                         'is not in', fake.root / 'CXR_png')
  assert not (tmp_path / 'data' / NAME / 'benchmark_original').exists()


def test_a_listed_label_that_the_name_contradicts(listed, tmp_path):
  fake, assignment, lists = listed
  image_id = assignment['test'][0]
  lines = lists['test'].read_text().splitlines()
  lines[0] = f'{image_id}.png,{1 - int(image_id[-1])}'
  lists['test'].write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data', name=BENCHMARK)
  _assert_one_line_error(excinfo, lists['test'], 'line 1', f'{image_id}.png', 'its name says')


@pytest.mark.parametrize('other', ['test', 'train'])
def test_an_image_in_two_lists_or_twice_in_one(listed, tmp_path, other):
  fake, assignment, lists = listed
  image_id = assignment['train'][1]
  number = _append(lists[other], f'{image_id}.png,{image_id[-1]}')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data', name=BENCHMARK)
  _assert_one_line_error(excinfo, f'{image_id}.png is listed twice', lists['train'], 'line 2',
                         f'{lists[other]} line {number}')


@pytest.mark.parametrize('line', ['CHNCXR_0001_0.png', 'CHNCXR_0001_0.png,2',
                                  'CHNCXR_0001_0.png,0,extra', ',1'])
def test_a_bad_list_line(listed, tmp_path, line):
  fake, _, lists = listed
  number = _append(lists['train'], line)
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data', name=BENCHMARK)
  _assert_one_line_error(excinfo, lists['train'], f'line {number}', 'CHNCXR_0578_1.png,1',
                         repr(line))


def test_a_missing_list(listed, tmp_path):
  fake, _, lists = listed
  os.remove(lists['test'])
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data', name=BENCHMARK)
  _assert_one_line_error(excinfo, lists['test'], 'not found', 'read from one folder')


def test_the_lists_are_read_from_one_folder(listed, tmp_path):
  """A stray train list above the others is not mixed with them."""
  fake, _, lists = listed
  stray = fake.parent / 'stray'
  stray.mkdir()
  (stray / 'ShenzenCXR_train_data.txt').write_text(lists['train'].read_text())
  moved = fake.parent / 'stray' / 'deeper'
  moved.mkdir()
  for path in lists.values():
    os.replace(path, moved / path.name)
  os.replace(stray / 'ShenzenCXR_train_data.txt', fake.parent / 'ShenzenCXR_train_data.txt')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data', name=BENCHMARK)
  _assert_one_line_error(excinfo, 'read from one folder', fake.parent)


def test_an_empty_list(listed, tmp_path):
  fake, _, lists = listed
  lists['validation'].write_text('\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data', name=BENCHMARK)
  _assert_one_line_error(excinfo, lists['validation'], 'no images listed')


def test_skip_bad_images_skips_listed_files_that_are_missing_or_broken(listed, tmp_path):
  fake, assignment, lists = listed
  number = _append(lists['validation'], 'CHNCXR_0999_1.png,1')
  broken = assignment['test'][0]
  fake.images[broken].write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, name=BENCHMARK, skip_bad_images=True)
  records = _records(data_dir, BENCHMARK)
  assert {split: sorted(by_id) for split, by_id in records.items()} == {
      split: sorted(set(ids) - {broken}) for split, ids in assignment.items()}
  metadata = sources.dataset_info(BENCHMARK, os.fspath(data_dir)).metadata
  assert metadata['skip_bad_images'] is True and metadata['num_skipped_images'] == 2
  missing, undecodable = metadata['skipped_images']
  assert missing['split'] == 'validation'
  assert missing['path'] == os.fspath(fake.root / 'CXR_png' / 'CHNCXR_0999_1.png')
  assert missing['where'] == f'{lists["validation"]} line {number}'
  assert 'is not in' in missing['reason']
  assert undecodable['split'] == 'test' and undecodable['path'] == os.fspath(fake.images[broken])
  assert f'image_id {broken}' in undecodable['where']


# Bad input: each a one-line DataError that names the file.


def test_an_undecodable_image(fake, tmp_path):
  image_id = fake.image_id('train', 1)
  fake.images[image_id].write_bytes(fake.images[image_id].read_bytes()[:60])
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.images[image_id], image_id)


def test_skip_bad_images_lists_them_in_metadata(fake, tmp_path):
  broken, also = fake.image_id('train', 0), fake.image_id('test', 1)
  fake.images[broken].write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  fake.images[also].write_bytes(b'not a png')
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, skip_bad_images=True)
  kept = {i for split in _records(data_dir).values() for i in split}
  assert kept == set(fake.images) - {broken, also}
  metadata = sources.dataset_info(BUILD, os.fspath(data_dir)).metadata
  assert metadata['skip_bad_images'] is True and metadata['num_skipped_images'] == 2
  skipped = {entry['where'].split('image_id ')[-1]: entry for entry in metadata['skipped_images']}
  assert set(skipped) == {broken, also}
  assert skipped[broken]['path'] == os.fspath(fake.images[broken])
  assert {entry['split'] for entry in skipped.values()} == {'train', 'test'}


@pytest.mark.parametrize('name', ['CHNCXR_0999_2.png', 'CHNCXR_0999.png'])
def test_an_image_name_without_its_label(fake, tmp_path, name):
  path = fake.root / 'CXR_png' / name
  path.write_bytes(next(iter(fake.images.values())).read_bytes())
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, '_0', '_1', 'CHNCXR_0001_0.png')


def test_no_cxr_png_folder(fake, tmp_path):
  (fake.root / 'CXR_png').rename(fake.root / 'images')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'no CXR_png folder', fake.parent, 'ChinaSet_AllFiles')


def test_other_files_in_cxr_png_are_ignored(fake, tmp_path):
  (fake.root / 'CXR_png' / 'Thumbs.db').write_bytes(b'\0')
  (fake.root / 'CXR_png' / '.DS_Store').write_bytes(b'\0')
  _build(fake, tmp_path / 'data')
  assert sum(len(r) for r in _records(tmp_path / 'data').values()) == 13


def test_without_manual_dir_it_says_where_to_get_the_set(tmp_path):
  assert_manual_only(NAME, tfds_builders.Shenzhen, tmp_path,
                     'Tuberculosis Chest X-ray Image Data Sets')


# The benchmark config's protocol, shrunk, on a build.


def test_benchmark_protocol_fine_tunes_on_a_shenzhen_build(tmp_path):
  from test_configs import load  # pylint: disable=g-import-not-at-top
  ids = [f'CHNCXR_{n:04d}_{n % 2}' for n in range(1, 49)]
  fake = write_fake_shenzhen(tmp_path / 'raw', seed=1, ids=ids)
  write_lists(fake.root, {'train': ids[:32], 'validation': ids[32:40], 'test': ids[40:]})
  config = load('benchmark_cxr', 'shenzhen,r18')
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, name=config.dataset)  # shenzhen/benchmark_side512
  shrunk(config, data_dir)
  config_schema.validate(config)
  results = finetune.train_and_evaluate(config, os.fspath(tmp_path / 'work'))
  assert results['trainer'] == 'finetune' and results['dataset'] == config.dataset
  # Selected on the validation loss; a two-class task logs the AUC of its second class.
  assert results['task'] == 'multiclass' and results['selected_on'] == 'loss'
  assert results['primary_metric'] == 'auc'  # a two-class task's headline
  assert results['validation']['num_examples'] == 8 and results['test']['num_examples'] == 8
  assert 'auc' in results['validation'] and 'auc' in results['test']
  assert results['step'] == 40
  # Measured: 1.0 (validation and test) on these images, the tuberculosis ones brighter;
  # a constant score is 0.5.
  assert results['test']['auc'] >= 0.9, results['test']
