"""Tests of the ham10000 TFDS builder and `bigssl_med.build_data`."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from bigssl_med import build_data
from bigssl_med.data import sources
from bigssl_med.errors import DataError
from conftest import REAL_HAM10000_BUILD
import tfds_builders
from tfds_builders.ham10000 import ham10000

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = 'ham10000'


def _build(fake, data_dir, **kwargs) -> str:
  return build_data.build(NAME, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(fake.root), **kwargs)


def _records(data_dir) -> dict[str, dict[str, dict]]:
  """split -> image_id -> record, read back through bigssl_med.data.sources."""
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  out = {}
  for split in info.splits:
    source = sources.open_split(NAME, split, os.fspath(data_dir))
    out[split] = {r['image_id'].decode(): r for r in source}
  return out


def _assert_one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for part in parts:
    assert str(part) in message, (part, message)


def test_image_and_mask_folders_may_be_links(fake_ham10000, tmp_path):
  # Raw data linked into place: images/ and masks/ are links to folders elsewhere, and a
  # link loop inside images/ does not make the walk go round.
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  for folder in ('images', 'masks'):
    (fake_ham10000.root / folder).rename(elsewhere / folder)
    (fake_ham10000.root / folder).symlink_to(elsewhere / folder)
  (elsewhere / 'images' / 'loop').symlink_to(fake_ham10000.root)
  _build(fake_ham10000, tmp_path / 'data')
  records = _records(tmp_path / 'data')
  assert sum(len(r) for r in records.values()) == len(fake_ham10000.rows) == 12


def test_builders_dict_and_version():
  assert tfds_builders.BUILDERS['ham10000'] is tfds_builders.Ham10000
  assert str(tfds_builders.Ham10000.VERSION) == '1.1.0'
  assert tfds_builders.Ham10000.name == 'ham10000'


def test_split_rule_matches_docstring():
  for case_id in ('HAM_0000118', 'HAM_0002730', 'HAM_0001466', 'x'):
    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    expected = ('train' if bucket < 80 else
                'validation' if bucket < 90 else 'test')
    assert ham10000.split_for_case(case_id) == expected


def test_build_published_layout(fake_ham10000, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = _build(fake_ham10000, data_dir)
  assert version_dir == os.fspath(data_dir / NAME / 'original' / '1.1.0')
  records = _records(data_dir)
  rows = {row['image_id']: row for row in fake_ham10000.rows}

  assert sum(len(r) for r in records.values()) == len(rows) == 12
  assert sorted(records) == ['test', 'train', 'validation']
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  assert info.features['label'].names == list(ham10000.CLASS_NAMES)
  for split, by_id in records.items():
    assert info.splits[split].num_examples == len(by_id)
    for image_id, record in by_id.items():
      row = rows[image_id]
      assert ham10000.split_for_case(row['lesion_id']) == split
      assert record['case_id'].decode() == row['lesion_id']
      assert info.features['label'].int2str(record['label']) == row['dx']
      assert record['dx_type'].decode() == row['dx_type']
      assert record['sex'].decode() == row['sex']
      assert record['localization'].decode() == row['localization']
      if row['age']:
        assert record['age'] == pytest.approx(float(row['age']))
      else:
        assert math.isnan(record['age'])
      # JPEG bytes are stored unchanged.
      assert record['image'] == fake_ham10000.images[image_id].read_bytes()

  # One blank age in the fixture, read back as NaN.
  ages = [r['age'] for by_id in records.values() for r in by_id.values()]
  assert sum(math.isnan(a) for a in ages) == 1


def test_masks_stored_as_8bit_single_channel_png(fake_ham10000, tmp_path):
  _build(fake_ham10000, tmp_path / 'data')
  records = _records(tmp_path / 'data')
  for by_id in records.values():
    for image_id, record in by_id.items():
      source = fake_ham10000.masks[image_id]
      with Image.open(io.BytesIO(record['mask'])) as mask:
        assert (mask.format, mask.mode) == ('PNG', 'L')
        stored = np.asarray(mask)
      with Image.open(source) as original:
        converted = original.mode != 'L'
        expected = np.asarray(original.convert('L'))
      np.testing.assert_array_equal(stored, expected)
      assert set(np.unique(stored)) <= {0, 255}
      if not converted:  # Already 8-bit grayscale PNG: bytes kept as given.
        assert record['mask'] == source.read_bytes()
  modes = [Image.open(p).mode for p in fake_ham10000.masks.values()]
  assert '1' in modes  # The fixture has one 1-bit mask that gets converted.


def test_non_rgb_image_is_stored_as_rgb_jpeg(fake_ham10000, tmp_path):
  image_id = fake_ham10000.rows[3]['image_id']
  path = fake_ham10000.images[image_id]
  with Image.open(path) as image:
    gray = image.convert('L')
  gray.save(path, format='JPEG')
  _build(fake_ham10000, tmp_path / 'data')
  stored = next(r[image_id] for r in _records(tmp_path / 'data').values()
                if image_id in r)['image']
  with Image.open(io.BytesIO(stored)) as image:
    assert (image.format, image.mode, image.size) == ('JPEG', 'RGB', gray.size)


def test_splits_are_lesion_disjoint_and_case_index_groups(fake_ham10000,
                                                          tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = _build(fake_ham10000, data_dir)
  split_of_case = collections.defaultdict(set)
  for split, by_id in _records(data_dir).items():
    for record in by_id.values():
      split_of_case[record['case_id']].add(split)
  assert all(len(splits) == 1 for splits in split_of_case.values())
  assert len(split_of_case) == 7

  with open(os.path.join(version_dir, sources.CASE_INDEX_FILE)) as f:
    index = json.load(f)
  assert index['dataset'] == NAME and index['version'] == '1.1.0'
  expected = collections.defaultdict(set)
  for row in fake_ham10000.rows:
    expected[row['lesion_id']].add(row['image_id'])
  for split, entry in index['splits'].items():
    source = sources.open_split(NAME, split, os.fspath(data_dir))
    assert entry['num_records'] == len(source) == len(entry['case_ids'])
    assert entry['case_ids'] == [r['case_id'].decode() for r in source]
    for group in sources.case_index(NAME, split, os.fspath(data_dir)):
      ids = {source[int(i)]['image_id'].decode() for i in group}
      case_id = source[int(group[0])]['case_id'].decode()
      assert ids == expected[case_id]


@pytest.mark.parametrize('metadata_name', [None, 'HAM10000_metadata'])
def test_build_dataverse_layout(make_fake_ham10000, tmp_path, metadata_name):
  published = make_fake_ham10000(tmp_path / 'published')
  dataverse = make_fake_ham10000(tmp_path / 'dataverse', layout='dataverse',
                                 metadata_name=metadata_name)
  assert (tmp_path / 'dataverse' / 'HAM10000_images_part_2').is_dir()
  _build(published, tmp_path / 'data_a')
  _build(dataverse, tmp_path / 'data_b')
  a, b = _records(tmp_path / 'data_a'), _records(tmp_path / 'data_b')
  assert a.keys() == b.keys()
  for split in a:
    assert a[split].keys() == b[split].keys()
    for image_id in a[split]:
      ra, rb = a[split][image_id], b[split][image_id]
      assert ra['label'] == rb['label'] and ra['case_id'] == rb['case_id']
      assert ra['image'] == rb['image'] and ra['mask'] == rb['mask']
      assert (math.isnan(ra['age']) and math.isnan(rb['age'])) or (
          ra['age'] == rb['age'])


def test_direct_tfds_api(fake_ham10000, tmp_path):
  builder = tfds_builders.Ham10000(data_dir=os.fspath(tmp_path / 'data'),
                                   file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(fake_ham10000.root)))
  assert sum(s.num_examples for s in builder.info.splits.values()) == 12


def test_build_and_read_without_tensorflow(fake_ham10000, tmp_path):
  script = textwrap.dedent('''
      import sys
      sys.path.insert(0, 'tests')
      from no_tensorflow import is_tensorflow as _is_tf

      from bigssl_med import build_data
      from bigssl_med.data import sources
      manual_dir, data_dir = sys.argv[1:]
      build_data.build('ham10000', data_dir=data_dir, manual_dir=manual_dir)
      total = 0
      for split in ('train', 'validation', 'test'):
        source = sources.open_split('ham10000', split, data_dir)
        assert source[0]['image'][:2] == b'\\xff\\xd8', 'not JPEG bytes'
        total += len(source)
        sources.case_index('ham10000', split, data_dir)
      loaded = [m for m in sys.modules if _is_tf(m) and sys.modules[m]]
      assert not loaded, loaded
      print('records', total)
  ''')
  result = subprocess.run(
      [sys.executable, '-c', script, os.fspath(fake_ham10000.root),
       os.fspath(tmp_path / 'data')],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'records 12' in result.stdout


def test_cli(fake_ham10000, tmp_path, capsys):
  data_dir = tmp_path / 'data'
  argv = [NAME, f'--manual_dir={fake_ham10000.root}', f'--data_dir={data_dir}']
  assert build_data.main(argv) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == os.fspath(data_dir / NAME / 'original' / '1.1.0')  # After TFDS's lines.
  assert build_data.main([NAME, '--manual_dir=/no/such/dir',
                          f'--data_dir={data_dir}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == 'error: manual_dir /no/such/dir does not exist'


def test_ensure_built(fake_ham10000, tmp_path):
  data_dir = os.fspath(tmp_path / 'data')
  with pytest.raises(DataError) as excinfo:
    build_data.ensure_built(NAME, data_dir=data_dir,
                            manual_dir=os.fspath(fake_ham10000.root))
  _assert_one_line_error(excinfo, 'python -m bigssl_med.build_data ham10000')
  assert build_data.ensure_built(
      NAME, data_dir=data_dir, manual_dir=os.fspath(fake_ham10000.root),
      build_if_missing=True) == data_dir
  os.remove(fake_ham10000.metadata)  # Already built: the raw data is not read.
  assert build_data.ensure_built(NAME, data_dir=data_dir) == data_dir


def test_existing_build_is_kept_without_overwrite(fake_ham10000, tmp_path):
  data_dir = tmp_path / 'data'
  _build(fake_ham10000, data_dir)
  os.remove(fake_ham10000.metadata)  # Would fail a real rebuild.
  assert _build(fake_ham10000, data_dir) == os.fspath(data_dir / NAME / 'original' / '1.1.0')
  assert sum(len(r) for r in _records(data_dir).values()) == 12


def test_overwrite_replaces_a_complete_build(fake_ham10000, tmp_path):
  data_dir = tmp_path / 'data'
  _build(fake_ham10000, data_dir)
  lines = fake_ham10000.metadata.read_text().splitlines()
  fake_ham10000.metadata.write_text('\n'.join(lines[:-1]) + '\n')  # 11 rows.
  _build(fake_ham10000, data_dir, overwrite=True)
  assert sum(len(r) for r in _records(data_dir).values()) == 11
  assert sorted(os.listdir(data_dir / NAME / 'original')) == ['1.1.0']


def test_failed_overwrite_keeps_earlier_build(fake_ham10000, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = Path(_build(fake_ham10000, data_dir))
  before = {p.name: p.read_bytes() for p in version_dir.iterdir()}
  image_id = fake_ham10000.rows[-1]['image_id']
  fake_ham10000.images[image_id].write_bytes(b'\xff\xd8 truncated')
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, data_dir, overwrite=True)
  _assert_one_line_error(excinfo, fake_ham10000.images[image_id])
  assert {p.name: p.read_bytes() for p in version_dir.iterdir()} == before
  assert sum(len(r) for r in _records(data_dir).values()) == 12
  assert sorted(os.listdir(data_dir / NAME / 'original')) == ['1.1.0']
  assert not [p for p in os.listdir(data_dir) if p.startswith('.build-')]


def test_failed_first_build_leaves_nothing(fake_ham10000, tmp_path):
  data_dir = tmp_path / 'data'
  os.remove(fake_ham10000.masks[fake_ham10000.rows[3]['image_id']])
  with pytest.raises(DataError):
    _build(fake_ham10000, data_dir)
  assert not (data_dir / NAME / 'original' / '1.1.0').exists()
  with pytest.raises(DataError, match='not built'):
    sources.open_split(NAME, 'train', os.fspath(data_dir))


# Bad input: each a one-line DataError that names what and where.


def test_manual_dir_missing(tmp_path):
  with pytest.raises(DataError) as excinfo:
    build_data.build(NAME, data_dir=os.fspath(tmp_path / 'data'),
                     manual_dir=os.fspath(tmp_path / 'nope'))
  _assert_one_line_error(excinfo, tmp_path / 'nope', 'does not exist')


def test_manual_dir_not_a_directory(tmp_path):
  path = tmp_path / 'file.csv'
  path.write_text('x')
  with pytest.raises(DataError) as excinfo:
    build_data.build(NAME, data_dir=os.fspath(tmp_path / 'data'),
                     manual_dir=os.fspath(path))
  _assert_one_line_error(excinfo, path, 'not a directory')


def test_unknown_dataset(tmp_path):
  with pytest.raises(DataError) as excinfo:
    build_data.build('ham1000', data_dir=os.fspath(tmp_path))
  _assert_one_line_error(excinfo, 'ham1000', 'ham10000')


def test_metadata_missing(fake_ham10000, tmp_path):
  os.remove(fake_ham10000.metadata)
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake_ham10000.root, 'HAM10000_metadata.csv')


def test_metadata_missing_columns(fake_ham10000, tmp_path):
  text = fake_ham10000.metadata.read_text()
  fake_ham10000.metadata.write_text(
      text.replace('lesion_id,', 'lesion,', 1).replace(',dx,', ',diagnosis,', 1))
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake_ham10000.metadata, 'lesion_id', 'dx')


@pytest.mark.parametrize('change, message', [(lambda f: f[:3], 'fewer fields'),
                                             (lambda f: f + ['extra'], 'more fields')])
def test_metadata_row_with_the_wrong_number_of_fields(fake_ham10000, tmp_path, change, message):
  lines = fake_ham10000.metadata.read_text().splitlines()
  lines[3] = ','.join(change(lines[3].split(',')))
  fake_ham10000.metadata.write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'HAM10000_metadata.csv line 4', message)


def test_image_file_missing(fake_ham10000, tmp_path):
  row = fake_ham10000.rows[4]  # Line 6 of the file (header is line 1).
  os.remove(fake_ham10000.images[row['image_id']])
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake_ham10000.metadata, 'line 6',
                         row['image_id'], 'image file')


def test_mask_file_missing(fake_ham10000, tmp_path):
  row = fake_ham10000.rows[2]
  os.remove(fake_ham10000.masks[row['image_id']])
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake_ham10000.metadata, 'line 4',
                         row['image_id'], 'mask file')


def test_image_cannot_be_decoded(fake_ham10000, tmp_path):
  row = fake_ham10000.rows[7]
  path = fake_ham10000.images[row['image_id']]
  path.write_bytes(path.read_bytes()[:100])  # Truncated JPEG.
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'cannot decode image', 'line 9',
                         row['image_id'])


def test_mask_cannot_be_decoded(fake_ham10000, tmp_path):
  row = fake_ham10000.rows[1]
  path = fake_ham10000.masks[row['image_id']]
  path.write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'cannot decode mask', 'line 3',
                         row['image_id'])


def test_mask_size_differs_from_image(fake_ham10000, tmp_path):
  row = fake_ham10000.rows[0]
  path = fake_ham10000.masks[row['image_id']]
  Image.new('L', (7, 5)).save(path)
  for skip in (False, True):  # a wrong pairing is not a bad file: never skipped
    with pytest.raises(DataError) as excinfo:
      _build(fake_ham10000, tmp_path / 'data', skip_bad_images=skip)
    _assert_one_line_error(excinfo, path, '7x5', 'line 2')


def test_unknown_dx_and_bad_age(fake_ham10000, tmp_path):
  lines = fake_ham10000.metadata.read_text().splitlines()
  original = list(lines)
  lines[3] = lines[3].replace(f',{fake_ham10000.rows[2]["dx"]},', ',melanoma,')
  fake_ham10000.metadata.write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'HAM10000_metadata.csv', 'line 4',
                         "'melanoma'")
  lines = list(original)
  lines[5] = lines[5].replace(f',{fake_ham10000.rows[4]["age"]},', ',old,')
  fake_ham10000.metadata.write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'HAM10000_metadata.csv', 'line 6', "'old'")


def test_skip_bad_images_lists_them_in_metadata(fake_ham10000, tmp_path):
  missing, broken_mask = fake_ham10000.rows[4], fake_ham10000.rows[1]
  os.remove(fake_ham10000.images[missing['image_id']])
  fake_ham10000.masks[broken_mask['image_id']].write_bytes(b'\x89PNG garbage')
  data_dir = tmp_path / 'data'
  _build(fake_ham10000, data_dir, skip_bad_images=True)
  records = _records(data_dir)
  kept = {image_id for split in records.values() for image_id in split}
  assert kept == ({row['image_id'] for row in fake_ham10000.rows}
                  - {missing['image_id'], broken_mask['image_id']})
  metadata = sources.dataset_info(NAME, os.fspath(data_dir)).metadata
  assert metadata['skip_bad_images'] is True
  assert metadata['num_skipped_images'] == 2
  skipped = {entry['where'].split('image_id ')[-1]: entry
             for entry in metadata['skipped_images']}
  assert set(skipped) == {missing['image_id'], broken_mask['image_id']}
  assert 'not found' in skipped[missing['image_id']]['reason']
  assert 'cannot decode mask' in skipped[broken_mask['image_id']]['reason']
  for image_id, entry in skipped.items():
    assert entry['split'] == ham10000.split_for_case(
        next(r['lesion_id'] for r in fake_ham10000.rows
             if r['image_id'] == image_id))


@pytest.mark.parametrize('how', ['missing', 'undecodable'])
def test_skipping_every_image_of_a_split_is_an_error(fake_ham10000, tmp_path, how):
  rows = [row for row in fake_ham10000.rows
          if ham10000.split_for_case(row['lesion_id']) == 'validation']
  for row in rows:
    path = fake_ham10000.images[row['image_id']]
    if how == 'missing':
      os.remove(path)
    else:
      path.write_bytes(b'\xff\xd8 truncated')
  data_dir = tmp_path / 'data'
  with pytest.raises(DataError) as excinfo:
    _build(fake_ham10000, data_dir, skip_bad_images=True)
  _assert_one_line_error(excinfo, f'all {len(rows)} images of split validation', 'skipped',
                         rows[0]['image_id'])
  with pytest.raises(DataError, match='not built'):
    sources.dataset_info(NAME, os.fspath(data_dir))


@pytest.mark.parametrize('blank', [',,,,,,', '   ', ''])
def test_blank_metadata_rows_are_ignored(fake_ham10000, tmp_path, blank):
  lines = fake_ham10000.metadata.read_text().splitlines()
  lines[4:4] = [blank]
  fake_ham10000.metadata.write_text('\n'.join(lines + [blank]) + '\n')
  data_dir = tmp_path / 'data'
  _build(fake_ham10000, data_dir)
  assert sum(len(r) for r in _records(data_dir).values()) == len(fake_ham10000.rows)


def test_side_config_downscales_images_and_masks(fake_ham10000, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = build_data.build(f'{NAME}/side16', data_dir=os.fspath(data_dir),
                                 manual_dir=os.fspath(fake_ham10000.root))
  assert version_dir == os.fspath(data_dir / NAME / 'side16' / '1.1.0')
  info = sources.dataset_info(f'{NAME}/side16', os.fspath(data_dir))
  assert info.metadata['max_side'] == 16
  assert build_data.build(NAME, data_dir=os.fspath(data_dir), max_side=16) == (
      version_dir)  # Same config by option: already built, nothing read.
  count = 0
  for split in info.splits:
    for record in sources.open_split(f'{NAME}/side16', split, os.fspath(data_dir)):
      image_id = record['image_id'].decode()
      with Image.open(fake_ham10000.images[image_id]) as original:
        width, height = original.size
      with Image.open(io.BytesIO(record['image'])) as image:
        assert max(image.size) == 16 and image.mode == 'RGB'
        expected = ((16, round(16 * height / width)) if width >= height else
                    (round(16 * width / height), 16))
        assert image.size == expected
        size = image.size
      with Image.open(io.BytesIO(record['mask'])) as mask:
        assert mask.size == size and mask.mode == 'L'
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
      count += 1
  assert count == len(fake_ham10000.rows)
  with pytest.raises(DataError, match='contradicts max_side=32'):
    build_data.build(f'{NAME}/side16', data_dir=os.fspath(data_dir), max_side=32)
  with pytest.raises(DataError, match="unknown builder config 'small'"):
    build_data.build(f'{NAME}/small', data_dir=os.fspath(data_dir))


class _OfflineDownloadManager:
  """Stands in for tfds' DownloadManager with no manual_dir and no network."""

  def __init__(self, fake=None):
    self.fake = fake
    self.requested = None

  @property
  def manual_dir(self):
    raise AssertionError('Manual directory not enabled.')

  def download_and_extract(self, resources):
    self.requested = resources
    if self.fake is None:
      raise ConnectionError('Failed to resolve dataverse.harvard.edu\nsecond')
    return {key: self.fake.root for key in resources}

  def download(self, url):
    assert url == ham10000.DOWNLOAD_URLS['metadata']
    return self.fake.metadata


def test_online_path_without_network_says_to_download_manually(tmp_path):
  builder = tfds_builders.Ham10000(data_dir=os.fspath(tmp_path))
  with pytest.raises(DataError) as excinfo:
    # pylint: disable-next=protected-access
    builder._split_generators(_OfflineDownloadManager())
  _assert_one_line_error(excinfo, 'could not download', '--manual_dir',
                         'doi.org/10.7910/DVN/DBW86T')


def test_online_path_uses_downloaded_files(fake_ham10000, tmp_path):
  builder = tfds_builders.Ham10000(data_dir=os.fspath(tmp_path))
  manager = _OfflineDownloadManager(fake_ham10000)
  # pylint: disable-next=protected-access
  generators = builder._split_generators(manager)
  assert {key: r.url for key, r in manager.requested.items()} == {
      key: url for key, url in ham10000.DOWNLOAD_URLS.items()
      if key != 'metadata'}
  assert all(r.extract_method == tfds.download.ExtractMethod.ZIP
             for r in manager.requested.values())
  assert sum(len(list(g)) for g in generators.values()) == 12


# The real data (../shared/data/ham10000); skipped when absent.

_PUBLISHED_COUNTS = {'nv': 6705, 'mel': 1113, 'bkl': 1099, 'bcc': 514,
                     'akiec': 327, 'vasc': 142, 'df': 115}


def test_real_ham10000(ham10000_data_dir):
  name = REAL_HAM10000_BUILD
  info = sources.dataset_info(name, ham10000_data_dir)
  assert sum(s.num_examples for s in info.splits.values()) == 10015
  names = info.features['label'].names
  assert names == sorted(_PUBLISHED_COUNTS)
  counts = collections.Counter()
  split_of_case = collections.defaultdict(set)
  multi_image_cases = 0
  for split in ('train', 'validation', 'test'):
    source = sources.open_split(name, split, ham10000_data_dir)
    for record in source.__getitems__(list(range(len(source)))):
      counts[names[record['label']]] += 1
      split_of_case[record['case_id']].add(split)
    groups = sources.case_index(name, split, ham10000_data_dir)
    assert sum(len(g) for g in groups) == len(source)
    multi_image_cases += sum(len(g) > 1 for g in groups)
  assert dict(counts) == _PUBLISHED_COUNTS
  assert len(split_of_case) == 7470
  assert all(len(s) == 1 for s in split_of_case.values())
  assert multi_image_cases == 1956
  # Images and masks (4:3) are stored at a longest side of 96.
  for record in sources.open_split(name, 'test', ham10000_data_dir).__getitems__([0, 1, 2]):
    for key in ('image', 'mask'):
      with Image.open(io.BytesIO(record[key])) as image:
        assert image.size == (96, 72), (key, record['image_id'], image.size)
