"""`python -m bigssl_med.build_data`: where builds go, and what a failure leaves."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
import threading

import numpy as np
from PIL import Image
import pytest

from bigssl_med import build_data
from bigssl_med import files
from bigssl_med import staging
from bigssl_med.data import sources
from bigssl_med.errors import DataError
import tfds_builders

NAME = 'image_cases/tiny'


def _raw(root: Path, cases: int = 4) -> Path:
  """A small image_cases tree: `cases` cases of one gray image each."""
  rows = ['path,case_id,label']
  for i in range(cases):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10), 20 * i, np.uint8)).save(root / f'{i}.png')
    rows.append(f'{i}.png,c{i},{"ab"[i % 2]}')
  (root / 'cases.csv').write_text('\n'.join(rows) + '\n')
  return root


def _build(raw: Path, data_dir: Path, **kwargs) -> str:
  return build_data.build(NAME, data_dir=os.fspath(data_dir), manual_dir=os.fspath(raw),
                          **kwargs)


def _num_records(data_dir: Path) -> int:
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  return sum(split.num_examples for split in info.splits.values())


def _run_main(argv, capsys) -> tuple[int, str]:
  status = build_data.main(argv)
  return status, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize('where', ['file', 'file/sub'])
def test_a_data_dir_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, capsys, where):
  raw = _raw(tmp_path / 'raw')
  (tmp_path / 'file').write_text('not a folder')
  data_dir = tmp_path / where
  status, last = _run_main([NAME, f'--manual_dir={raw}', f'--data_dir={data_dir}'], capsys)
  assert status == 2
  assert last.startswith('error: data_dir ') and os.fspath(data_dir) in last, last


def test_a_data_dir_that_cannot_be_written_is_a_one_line_error(tmp_path, monkeypatch):
  raw = _raw(tmp_path / 'raw')

  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied', os.fspath(tmp_path / 'data' / '.build-x'))

  monkeypatch.setattr(build_data.tempfile, 'mkdtemp', refuse)
  with pytest.raises(DataError, match='Permission denied') as excinfo:
    _build(raw, tmp_path / 'data')
  assert '\n' not in str(excinfo.value)


def test_an_interrupted_build_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
  raw, data_dir = _raw(tmp_path / 'raw'), tmp_path / 'data'
  _build(raw, data_dir)
  real = build_data.tfds_builders.BUILDERS['image_cases']

  class Interrupted(real):  # pylint: disable=abstract-method

    def download_and_prepare(self, *args, **kwargs):
      raise KeyboardInterrupt

  monkeypatch.setitem(build_data.tfds_builders.BUILDERS, 'image_cases', Interrupted)
  status, last = _run_main([NAME, '--overwrite', f'--manual_dir={raw}',
                            f'--data_dir={data_dir}'], capsys)
  assert status == 130
  assert last.startswith('error: interrupted') and NAME in last, last
  assert _num_records(data_dir) == 4
  assert not [p for p in os.listdir(data_dir) if p.startswith('.build-')]


@pytest.mark.parametrize('damage', ['truncated shard', 'missing shard', 'dataset_info.json'])
def test_a_damaged_build_is_a_one_line_error_until_overwritten(tmp_path, capsys, damage):
  raw, data_dir = _raw(tmp_path / 'raw'), tmp_path / 'data'
  version_dir = Path(_build(raw, data_dir))
  shard = version_dir / 'image_cases-train.array_record-00000-of-00001'
  if damage == 'truncated shard':
    with open(shard, 'r+b') as f:
      f.truncate(shard.stat().st_size // 2)
    culprit = f'{shard}: damaged'
  elif damage == 'missing shard':
    shard.unlink()
    culprit = f'{shard}: missing'
  else:
    info = version_dir / 'dataset_info.json'
    info.write_text(info.read_text()[:100])
    culprit = f'{info}: unreadable'
  argv = [NAME, f'--manual_dir={raw}', f'--data_dir={data_dir}']
  status, last = _run_main(argv, capsys)
  assert status == 2
  assert last.startswith(f'error: {culprit}') and last.endswith(' --overwrite'), last
  assert not sources.is_complete_build(os.fspath(version_dir))
  status, _ = _run_main([*argv, '--overwrite'], capsys)
  assert status == 0
  assert sources.is_complete_build(os.fspath(version_dir)) and _num_records(data_dir) == 4


@pytest.mark.parametrize('earlier', [True, False])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_build(tmp_path, capsys, monkeypatch,
                                                             earlier):
  raw, data_dir = _raw(tmp_path / 'raw'), tmp_path / 'data'
  if earlier:
    _build(raw, data_dir)
  real = build_data.tfds_builders.BUILDERS['image_cases']

  class DiskFull(real):  # pylint: disable=abstract-method

    def download_and_prepare(self, *args, **kwargs):  # as TFDS's array_record writer says it
      raise RuntimeError('Failed to finalize writing of split "train": write() failed: No '
                         f'space left on device; writing {self.data_dir}/image_cases-train.'
                         'array_record-00000-of-00001')

  monkeypatch.setitem(build_data.tfds_builders.BUILDERS, 'image_cases', DiskFull)
  status, last = _run_main([NAME, '--overwrite', f'--manual_dir={raw}',
                            f'--data_dir={data_dir}'], capsys)
  assert status == 2
  kept = 'an earlier complete build is kept' if earlier else 'its partial files are removed'
  assert last == (f'error: building {NAME} in {data_dir}: No space left on device; {kept}')
  if earlier:
    assert _num_records(data_dir) == 4
  assert not [p for p in os.listdir(data_dir) if p.startswith('.build-')]


def test_a_dead_builds_staging_is_removed_even_when_nothing_is_rebuilt(tmp_path):
  raw, data_dir = _raw(tmp_path / 'raw'), tmp_path / 'data'
  _build(raw, data_dir)
  dead = data_dir / '.build-image_cases-dead'
  (dead / 'incomplete').mkdir(parents=True)
  (dead / staging.LOCK_FILE).write_text('')  # its writer's lock, now free
  _build(raw, data_dir)
  assert not dead.exists()


def test_a_staging_folder_is_never_removed_while_its_writer_takes_the_lock(tmp_path,
                                                                           monkeypatch):
  folder = tmp_path / '.build-image_cases-live'
  folder.mkdir()
  real_flock = fcntl.flock
  raced = []

  def flock(fd, operation):  # another build's remove_dead, just before the lock is taken
    if not raced:
      raced.append(True)
      staging.remove_dead(os.fspath(tmp_path), '.build-image_cases-', 'a build')
    return real_flock(fd, operation)

  monkeypatch.setattr(staging.fcntl, 'flock', flock)
  handle = staging.hold(os.fspath(folder))
  monkeypatch.undo()
  assert raced and folder.is_dir() and handle is not None
  assert os.listdir(folder) == [staging.LOCK_FILE]
  staging.remove_dead(os.fspath(tmp_path), '.build-image_cases-', 'a build')
  assert folder.is_dir()  # held
  handle.close()
  staging.remove_dead(os.fspath(tmp_path), '.build-image_cases-', 'a build')
  assert not folder.exists()


def test_a_reader_between_a_rebuilds_two_renames_waits_for_it(tmp_path, monkeypatch):
  """A reader that finds the earlier build set aside puts it back only after the
  rebuild's swap, which then finds its place taken: the reader must wait instead."""
  raw, data_dir = _raw(tmp_path / 'raw'), tmp_path / 'data'
  version_dir = _build(raw, data_dir)
  _raw(raw, cases=6)
  real_rename = os.rename
  reader = []

  def rename(src, dst):
    real_rename(src, dst)
    if dst == sources.set_aside_path(version_dir):
      thread = threading.Thread(target=sources.restore_set_aside_build, args=(version_dir,))
      thread.start()
      thread.join(timeout=1.0)  # without the lock, it puts the old build back now
      reader.append(thread)

  monkeypatch.setattr(build_data.os, 'rename', rename)
  assert _build(raw, data_dir, overwrite=True) == version_dir
  reader[0].join()
  assert _num_records(data_dir) == 6
  assert sorted(os.listdir(os.path.dirname(version_dir))) == [os.path.basename(version_dir)]


def test_of_two_builds_at_once_without_overwrite_the_first_to_finish_is_kept(tmp_path,
                                                                            monkeypatch):
  raw, data_dir = _raw(tmp_path / 'raw'), tmp_path / 'data'
  other_raw = _raw(tmp_path / 'other', cases=6)
  real_move = build_data._move_into_place
  first = []

  def move(built_dir, version_dir, *, overwrite):
    if not first:  # the other build finishes while this one writes its records
      first.append(None)
      first[0] = _build(other_raw, data_dir)
    return real_move(built_dir, version_dir, overwrite=overwrite)

  monkeypatch.setattr(build_data, '_move_into_place', move)
  assert _build(raw, data_dir) == first[0]
  assert _num_records(data_dir) == 6
  assert not [p for p in os.listdir(data_dir) if p.startswith('.build-')]


def test_a_build_reaches_the_disk_before_it_takes_its_place(tmp_path, monkeypatch):
  raw, data_dir = _raw(tmp_path / 'raw'), tmp_path / 'data'
  synced, real_fsync = [], os.fsync

  def fsync(fd):
    synced.append(os.readlink(f'/proc/self/fd/{fd}'))
    return real_fsync(fd)

  monkeypatch.setattr(files.os, 'fsync', fsync)
  version_dir = _build(raw, data_dir)
  staged = {rel.split(os.sep, 1)[1]  # the staging folder's name left out
            for rel in (os.path.relpath(p, os.path.realpath(data_dir)) for p in synced)
            if rel.startswith('.build-') and os.sep in rel}
  built = {os.path.relpath(os.path.join(parent, name), data_dir)
           for parent, _, names in os.walk(version_dir) for name in names}
  assert built and built <= staged, built - staged


def _fake_build(data_dir: Path, name: str) -> None:
  """A folder that reads as a complete build of `name` (NAME/CONFIG)."""
  version_dir = Path(sources.version_dir_of(name, os.fspath(data_dir)))
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text('{}')


@pytest.mark.parametrize('build_if_missing', [True, False])
def test_a_missing_data_set_without_download_or_manual_dir_says_what_is_built(
    tmp_path, build_if_missing):
  data_dir = tmp_path / 'data'
  for name in ('chexpert/side64', 'chexpert/original', 'nih_chest_xray14/side64'):
    _fake_build(data_dir, name)
  (data_dir / 'chexpert' / 'side128').mkdir()  # an unfinished build is not listed
  with pytest.raises(DataError) as e:
    build_data.ensure_built('chexpert', data_dir=os.fspath(data_dir),
                            build_if_missing=build_if_missing)
  message = str(e.value)
  assert '\n' not in message
  assert message.endswith('; built here: chexpert/original, chexpert/side64'), message
  if build_if_missing:
    assert message == (f'data set chexpert is not built in {data_dir} and chexpert cannot be '
                       'downloaded: it needs config.data.manual_dir (its raw files); built '
                       'here: chexpert/original, chexpert/side64')
  else:
    assert message.startswith(f'data set chexpert is not built in {data_dir} (no ')
  # Nothing built of it: nothing listed. The caller names its own manual_dir key.
  with pytest.raises(DataError, match=r'^data set mimic_cxr_jpg is not built in .* and '
                                      r'mimic_cxr_jpg cannot be downloaded: it needs '
                                      r'config.shift.manual_dir \(its raw files\)$'):
    build_data.ensure_built('mimic_cxr_jpg', data_dir=os.fspath(data_dir),
                            build_if_missing=True, manual_dir_key='config.shift.manual_dir')
  assert not any(p.name.startswith('.build-') for p in data_dir.iterdir())


def test_a_missing_data_set_with_a_download_is_built_from_it(tmp_path, monkeypatch, caplog):
  data_dir = tmp_path / 'data'
  _fake_build(data_dir, 'nih_chest_xray14/side64')
  built = []
  monkeypatch.setattr(build_data, 'build', lambda name, **kwargs: built.append((name, kwargs)))
  with caplog.at_level('INFO'):
    assert build_data.ensure_built('nih_chest_xray14', data_dir=os.fspath(data_dir),
                                   build_if_missing=True) == os.fspath(data_dir)
  assert built == [('nih_chest_xray14', {'data_dir': os.fspath(data_dir), 'manual_dir': None})]
  assert (f'nih_chest_xray14 is not built in {data_dir}: building it from its public download '
          '(built here: nih_chest_xray14/side64).') in caplog.text
  assert [name for name, cls in tfds_builders.BUILDERS.items() if cls.DOWNLOADS] == [
      'ham10000', 'medmnist', 'nih_chest_xray14']
