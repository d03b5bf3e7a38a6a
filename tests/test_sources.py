"""Tests of `bigssl_med.data.sources` on a small generated HAM10000 build."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigssl_med import build_data
from bigssl_med.data import sources
from bigssl_med.errors import DamagedBuild, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = 'ham10000'


@pytest.fixture
def built(fake_ham10000, tmp_path):
  """(data_dir, fake tree) with the generated tree built into tmp_path/data."""
  data_dir = os.fspath(tmp_path / 'data')
  build_data.build(NAME, data_dir=data_dir,
                   manual_dir=os.fspath(fake_ham10000.root))
  return data_dir, fake_ham10000


def _expected_groups(source, fake) -> list[list[int]]:
  """Record indices grouped by lesion, from the fixture's metadata."""
  lesion_of = {row['image_id']: row['lesion_id'] for row in fake.rows}
  groups = {}
  for i in range(len(source)):
    lesion = lesion_of[source[i]['image_id'].decode()]
    groups.setdefault(lesion, []).append(i)
  return list(groups.values())


def test_open_split_gives_encoded_bytes(built):
  data_dir, fake = built
  info = sources.dataset_info(NAME, data_dir)
  total = 0
  for split in ('train', 'validation', 'test'):
    source = sources.open_split(NAME, split, data_dir)
    assert len(source) == info.splits[split].num_examples > 0
    record = source[0]
    image_id = record['image_id'].decode()
    assert record['image'] == fake.images[image_id].read_bytes()
    assert record['mask'][:8] == b'\x89PNG\r\n\x1a\n'
    assert isinstance(record['case_id'], bytes)
    total += len(source)
  assert total == len(fake.rows)


def test_dataset_info(built):
  data_dir, _ = built
  info = sources.dataset_info(NAME, data_dir)
  assert info.name == NAME
  assert info.features['label'].names == ['akiec', 'bcc', 'bkl', 'df', 'mel',
                                          'nv', 'vasc']
  assert sorted(info.splits) == ['test', 'train', 'validation']


def test_case_index_from_sidecar(built):
  data_dir, fake = built
  for split in ('train', 'validation', 'test'):
    source = sources.open_split(NAME, split, data_dir)
    groups = sources.case_index(NAME, split, data_dir)
    assert all(g.dtype == np.int64 for g in groups)
    assert all(np.all(np.diff(g) > 0) for g in groups)  # Sorted.
    assert [g.tolist() for g in groups] == _expected_groups(source, fake)
  # Several images per lesion in the fixture: some groups have more than one.
  assert max(len(g) for g in sources.case_index(NAME, 'train', data_dir)) == 3


def test_case_index_has_the_mode_of_the_builds_other_files(built):
  data_dir, _ = built
  version_dir = sources.find_version_dir(NAME, data_dir)
  mode = os.stat(os.path.join(version_dir, 'dataset_info.json')).st_mode & 0o777
  for index in (sources.CASE_INDEX_FILE, sources.LABEL_INDEX_FILE):
    assert os.stat(os.path.join(version_dir, index)).st_mode & 0o777 == mode
  assert mode & 0o044  # readable by the group and others (umask 022 or looser)


def test_label_index_holds_each_records_class(built):
  data_dir, fake = built
  names = sources.dataset_info(NAME, data_dir).features['label'].names
  dx_of = {row['image_id']: row['dx'] for row in fake.rows}
  for split in ('train', 'validation', 'test'):
    labels = sources.record_labels(NAME, split, data_dir, 'label')
    source = sources.open_split(NAME, split, data_dir)
    assert labels.dtype == np.int64 and labels.shape == (len(source),)
    assert [names[k] for k in labels] == [dx_of[source[i]['image_id'].decode()]
                                          for i in range(len(source))]


def test_labels_of_a_feature_that_is_not_there_is_a_one_line_error(built):
  data_dir, _ = built
  with pytest.raises(DataError, match=r'data set ham10000 has no feature labels; its features: '):
    sources.record_labels(NAME, 'train', data_dir, 'labels')


def test_case_index_scans_when_sidecar_missing(built, caplog):
  data_dir, _ = built
  expected = [g.tolist() for g in sources.case_index(NAME, 'train', data_dir)]
  version_dir = sources.find_version_dir(NAME, data_dir)
  os.remove(os.path.join(version_dir, sources.CASE_INDEX_FILE))
  with caplog.at_level(logging.INFO):
    groups = sources.case_index(NAME, 'train', data_dir)
  assert [g.tolist() for g in groups] == expected
  assert 'scanning' in caplog.text


def test_case_index_of_sliced_split(built):
  data_dir, _ = built
  source = sources.open_split(NAME, 'train[:4]', data_dir)
  groups = sources.case_index(NAME, 'train[:4]', data_dir)
  assert sum(len(g) for g in groups) == len(source) == 4


def test_case_index_length_mismatch_says_rebuild(built):
  data_dir, _ = built
  path = os.path.join(sources.find_version_dir(NAME, data_dir),
                      sources.CASE_INDEX_FILE)
  with open(path) as f:
    content = json.load(f)
  content['splits']['train']['case_ids'].pop()
  content['splits']['train']['num_records'] -= 1
  with open(path, 'w') as f:
    json.dump(content, f)
  with pytest.raises(DataError) as excinfo:
    sources.case_index(NAME, 'train', data_dir)
  message = str(excinfo.value)
  assert '\n' not in message
  assert path in message and 'rebuild' in message and '--overwrite' in message


def test_missing_data_dir_says_how_to_build(tmp_path):
  data_dir = os.fspath(tmp_path / 'nowhere')
  command = (f'python -m bigssl_med.build_data {NAME} --manual_dir=... '
             f'--data_dir={data_dir}')
  for call in (lambda: sources.open_split(NAME, 'train', data_dir),
               lambda: sources.dataset_info(NAME, data_dir),
               lambda: sources.case_index(NAME, 'train', data_dir)):
    with pytest.raises(DataError) as excinfo:
      call()
    message = str(excinfo.value)
    assert '\n' not in message
    assert data_dir in message and command in message


def test_data_set_not_built_says_where_it_looked(tmp_path):
  data_dir = tmp_path / 'data'
  (data_dir / NAME / 'original' / '1.1.0').mkdir(parents=True)  # No dataset_info.json.
  with pytest.raises(DataError) as excinfo:
    sources.open_split(NAME, 'train', os.fspath(data_dir))
  message = str(excinfo.value)
  assert os.fspath(data_dir / NAME / 'original' / '1.1.0' / 'dataset_info.json') in message
  assert f'--data_dir={data_dir}' in message


def test_unknown_split_names_available_splits(built):
  data_dir, _ = built
  with pytest.raises(DataError) as excinfo:
    sources.open_split(NAME, 'valid', data_dir)
  assert str(excinfo.value) == (
      f"data set {NAME} has no split 'valid'; available splits: test, train, "
      'validation')


def test_fingerprint_says_how_two_builds_differ(built):
  data_dir, _ = built
  now = sources.fingerprint('ham10000', data_dir, ('train[:50%]+test', 'validation', ''))
  assert set(now['splits']) == {'train', 'validation', 'test'}
  assert set(sources.fingerprint('ham10000', data_dir, ('train',))['splits']) == {'train'}
  assert all(s['num_examples'] > 0 and s['num_bytes'] > 0 for s in now['splits'].values())
  assert sources.fingerprint_differences(now, now) == ''
  assert sources.fingerprint_differences(None, now) == ''  # nothing saved: nothing to compare
  other = json.loads(json.dumps(now))
  other['dataset'] = 'ham10000/original/1.0.0'
  assert sources.fingerprint_differences(other, now) == (
      'data set ham10000/original/1.0.0 there, ham10000/original/1.1.0 now')
  other = json.loads(json.dumps(now))
  other['splits']['unlabeled'] = other['splits'].pop('validation')
  assert sources.fingerprint_differences(other, now) == (
      "ham10000/original/1.1.0 had a split 'unlabeled' there, none now")
  del other['splits']['unlabeled']
  assert sources.fingerprint_differences(other, now) == (
      "ham10000/original/1.1.0 has a split 'validation' now, none there")
  other = json.loads(json.dumps(now))
  other['splits']['train']['num_bytes'] += 1
  n, b = now['splits']['train']['num_examples'], now['splits']['train']['num_bytes']
  assert sources.fingerprint_differences(other, now) == (
      f"ham10000/original/1.1.0 split 'train' had {n} records of {b + 1} bytes there, "
      f'{n} records of {b} bytes now')


def test_group_by_case():
  groups = sources.group_by_case(['b', 'a', 'b', 'c', 'a', 'b'])
  assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4], [3]]


def test_no_tensorflow_grain_or_jax_imported(built):
  data_dir, _ = built
  script = (
      'import sys\n'
      'from bigssl_med.data import sources\n'
      f'data_dir = {data_dir!r}\n'
      'sources.open_split("ham10000", "train", data_dir)[0]\n'
      'sources.case_index("ham10000", "test", data_dir)\n'
      'sources.dataset_info("ham10000", data_dir)\n'
      'bad = sorted({m.split(".")[0] for m in sys.modules} &'
      ' {"tensorflow", "grain", "jax", "jaxlib"})\n'
      'assert not bad, bad\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]


def _shard(data_dir: str, split: str) -> Path:
  version_dir = Path(sources.find_version_dir(NAME, data_dir))
  return version_dir / f'ham10000-{split}.array_record-00000-of-00001'


def _assert_rebuild_error(excinfo, data_dir: str, *parts) -> None:
  message = str(excinfo.value)
  assert '\n' not in message, message
  assert isinstance(excinfo.value, DamagedBuild), message
  command = f'python -m bigssl_med.build_data {NAME} --manual_dir=... --data_dir={data_dir}'
  assert f'rebuild with: {command} --overwrite' in message, message
  for part in parts:
    assert str(part) in message, (part, message)


@pytest.mark.parametrize('damage', ['truncated', 'missing'])
def test_a_truncated_or_missing_shard_is_a_one_line_error_naming_it(built, damage):
  data_dir, _ = built
  shard = _shard(data_dir, 'validation')
  version_dir = os.fspath(shard.parent)
  assert sources.is_complete_build(version_dir)
  if damage == 'truncated':
    with open(shard, 'r+b') as f:
      f.truncate(shard.stat().st_size - 100)
  else:
    shard.unlink()
  assert not sources.is_complete_build(version_dir)
  for call in (lambda: sources.dataset_info(NAME, data_dir),
               lambda: sources.open_split(NAME, 'train', data_dir),
               lambda: sources.find_version_dir(NAME, data_dir)):
    with pytest.raises(DataError) as excinfo:
      call()
    _assert_rebuild_error(excinfo, data_dir,
                          f'{shard}: {"missing" if damage == "missing" else "damaged"}')


@pytest.mark.parametrize('damaged', ['dataset_info.json', 'features.json'])
def test_a_damaged_dataset_info_is_a_one_line_error_naming_it(built, damaged):
  data_dir, _ = built
  path = Path(sources.find_version_dir(NAME, data_dir)) / damaged
  path.write_text(path.read_text()[:200])
  assert not sources.is_complete_build(os.fspath(path.parent))
  for call in (lambda: sources.dataset_info(NAME, data_dir),
               lambda: sources.case_index(NAME, 'train', data_dir)):
    with pytest.raises(DataError) as excinfo:
      call()
    _assert_rebuild_error(excinfo, data_dir, f'{path}: unreadable')


def _damage_a_record(data_dir: str, split: str) -> int:
  """Flips bytes among the records of `split`'s shard (they come first; the index, at the
  end, is left whole); returns the first record that no longer reads."""
  shard = _shard(data_dir, split)
  with open(shard, 'r+b') as f:
    f.seek(2000)
    flipped = bytes(255 - b for b in f.read(8))
    f.seek(2000)
    f.write(flipped)
  source = tfds.builder_from_directory(os.fspath(shard.parent)).as_data_source(
      split, decoders={'image': tfds.decode.SkipDecoding(), 'mask': tfds.decode.SkipDecoding()})
  for record in range(len(source)):
    try:
      source[record]
    except RuntimeError:
      return record
  raise AssertionError('no record damaged')


def test_a_damaged_record_is_a_one_line_error_naming_the_shard_and_record(built):
  data_dir, _ = built
  record = _damage_a_record(data_dir, 'train')
  source = sources.open_split(NAME, 'train', data_dir)  # the shard's index still reads
  with pytest.raises(DataError) as excinfo:
    source[record]
  _assert_rebuild_error(excinfo, data_dir, f'{_shard(data_dir, "train")}: damaged',
                        f'record {record} of {NAME} split train', 'RuntimeError')
  with pytest.raises(DataError) as excinfo:
    source.__getitems__([0, record])
  _assert_rebuild_error(excinfo, data_dir, f'record {record} of {NAME} split train')
  # A sum of splits names the shard the record lies in.
  both = sources.open_split(NAME, 'validation+train', data_dir)
  with pytest.raises(DataError) as excinfo:
    both[len(sources.open_split(NAME, 'validation', data_dir)) + record]
  _assert_rebuild_error(excinfo, data_dir, f'{_shard(data_dir, "train")}: damaged')


@pytest.mark.parametrize('num_workers', [0, 1])
def test_a_damaged_record_read_in_the_input_pipeline_is_the_same_error(built, num_workers):
  from bigssl_med.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir, _ = built
  record = _damage_a_record(data_dir, 'train')
  source = sources.open_split(NAME, 'train', data_dir)
  batches = pipeline.eval_image_dataset(
      source, pipeline.ViewSpec(image_size=8), global_batch=len(source), host_index=0,
      host_count=1, num_workers=num_workers, name=f'{NAME}/train')
  iterator = iter(batches)
  try:
    with pytest.raises(DataError) as excinfo:
      next(iterator)
  finally:
    iterator.close()
  _assert_rebuild_error(excinfo, data_dir, f'{_shard(data_dir, "train")}: damaged',
                        f'record {record} of {NAME} split train')
