"""bigssl_med.files: files written whole or not at all, with a new file's usual mode."""

import os

import pytest

from bigssl_med import files


def _usual_mode():
  mask = os.umask(0o022)
  os.umask(mask)
  return 0o666 & ~mask


def test_a_file_is_replaced_whole_with_the_usual_mode(tmp_path):
  path = tmp_path / 'new' / 'report.png'
  with files.written_whole(os.fspath(path)) as tmp:
    assert os.path.dirname(tmp) == os.fspath(path.parent)  # one file system: one rename
    assert tmp.endswith('.png') and not path.exists()
    with open(tmp, 'w') as f:
      f.write('new')
  assert path.read_text() == 'new'
  assert os.stat(path).st_mode & 0o777 == _usual_mode()  # not mkstemp's 0o600
  assert os.listdir(path.parent) == ['report.png']


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
  path = tmp_path / 'results.json'
  path.write_text('old')
  with pytest.raises(RuntimeError, match='killed'):
    with files.written_whole(os.fspath(path)) as tmp:
      with open(tmp, 'w') as f:
        f.write('half')
      raise RuntimeError('killed')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['results.json']


def test_a_folder_that_cannot_be_made_is_an_os_error_naming_the_file(tmp_path):
  (tmp_path / 'file').write_text('')
  path = os.fspath(tmp_path / 'file' / 'x.csv')
  with pytest.raises(OSError) as e:
    with files.written_whole(path):
      pass
  assert e.value.filename == path


def test_a_link_is_written_through(tmp_path):
  (tmp_path / 'shared').mkdir()
  (tmp_path / 'shared' / 'report.md').write_text('old')
  (tmp_path / 'report.md').symlink_to(tmp_path / 'shared' / 'report.md')
  with files.written_whole(os.fspath(tmp_path / 'report.md')) as tmp:
    with open(tmp, 'w') as f:
      f.write('new')
  assert (tmp_path / 'report.md').is_symlink()
  assert (tmp_path / 'shared' / 'report.md').read_text() == 'new'
  assert sorted(os.listdir(tmp_path / 'shared')) == ['report.md']


def test_a_folder_in_the_way_is_an_os_error_naming_it(tmp_path):
  (tmp_path / 'out.md').mkdir()
  with pytest.raises(IsADirectoryError) as e:
    with files.written_whole(os.fspath(tmp_path / 'out.md')) as tmp:
      with open(tmp, 'w') as f:
        f.write('x')
  assert e.value.filename == os.fspath(tmp_path / 'out.md')
  assert os.listdir(tmp_path) == ['out.md']


def test_the_bytes_and_the_rename_are_synced_to_disk(tmp_path, monkeypatch):
  synced = []
  fsync = os.fsync
  monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(os.readlink(
      f'/proc/self/fd/{fd}')), fsync(fd)))
  path = tmp_path / 'results.json'
  with files.written_whole(os.fspath(path)) as tmp:
    with open(tmp, 'w') as f:
      f.write('{}')
  assert synced == [tmp, os.fspath(tmp_path)]


def test_temporaries_left_by_a_killed_write_are_removed_at_the_next_start(tmp_path):
  from bigssl_med import config_schema  # pylint: disable=g-import-not-at-top
  from bigssl_med import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  left = []
  for name in ('data.json', 'report.md', 'LICENSE'):  # what a kill mid-write leaves
    with pytest.raises(KeyboardInterrupt):
      with files.written_whole(os.fspath(tmp_path / name)) as tmp:
        left.append(os.path.basename(tmp))
        os.link(tmp, tmp + '.kept')  # the kill: `finally` never runs in a killed process
        raise KeyboardInterrupt
  for name in left:
    os.rename(tmp_path / (name + '.kept'), tmp_path / name)
  kept = ['.data.json.notes', 'data.json', '.lock', 'x.tmp.json', '.a.b.tmp.json']
  for name in kept:
    (tmp_path / name).write_text('mine')
  (tmp_path / 'checkpoints' / '.x.abcdefgh.tmp.json').parent.mkdir()
  (tmp_path / 'checkpoints' / '.x.abcdefgh.tmp.json').write_text('below: not touched')
  workdir_lib.start(os.fspath(tmp_path), config_schema.finetune())
  assert sorted(os.listdir(tmp_path)) == sorted(kept + ['checkpoints', 'config.json'])
  assert os.listdir(tmp_path / 'checkpoints') == ['.x.abcdefgh.tmp.json']


def test_walk_follows_links_to_folders_and_walks_each_real_folder_once(tmp_path):
  outside = tmp_path / 'outside'
  (outside / 'sub').mkdir(parents=True)
  (outside / 'sub' / 'a.txt').write_text('a')
  top = tmp_path / 'top'
  top.mkdir()
  (top / 'b.txt').write_text('b')
  (top / 'linked').symlink_to(outside)  # raw data linked into place
  (top / 'again').symlink_to(outside / 'sub')  # a second way to a folder already walked
  (outside / 'sub' / 'loop').symlink_to(top)  # a loop back to the top
  walked = [(os.path.relpath(d, top), sorted(f)) for d, _, f in files.walk(os.fspath(top))]
  found = sorted(os.path.join(d, name) for d, names in walked for name in names)
  assert found == ['./b.txt', 'again/a.txt'] or found == ['./b.txt', 'linked/sub/a.txt']
  real = [os.path.realpath(os.path.join(top, d)) for d, _ in walked]
  assert len(real) == len(set(real)) == 3  # top, outside, outside/sub


def test_walk_lets_the_caller_prune(tmp_path):
  (tmp_path / 'skip').mkdir()
  (tmp_path / 'skip' / 'x.txt').write_text('x')
  (tmp_path / 'keep').mkdir()
  (tmp_path / 'keep' / 'y.txt').write_text('y')
  found = []
  for dirpath, dirnames, names in files.walk(os.fspath(tmp_path)):
    dirnames[:] = [d for d in dirnames if d != 'skip']
    found += names
  assert found == ['y.txt']
