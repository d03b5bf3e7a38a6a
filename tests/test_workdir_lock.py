"""One run at a time on a workdir: `main.py` holds `WORKDIR/.lock` (bigssl_med.workdir.locked)."""

import errno
import fcntl
import logging
import os
from pathlib import Path
import subprocess
import sys

import pytest

from bigssl_med import staging
from bigssl_med import workdir as workdir_lib
from bigssl_med.errors import WorkdirInUse

REPO = Path(__file__).resolve().parents[1]


def _hold(path):
  """Locks `path` through an open file of this process's own: as another run would."""
  handle = open(path, 'a+')  # pylint: disable=consider-using-with
  fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  handle.write('4321 otherhost\n')
  handle.flush()
  return handle


def test_a_second_main_py_on_a_workdir_in_use_stops_before_touching_it(tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  holder = _hold(workdir / '.lock')
  try:
    result = subprocess.run([sys.executable, 'main.py', '--config=configs/demo.py',
                             f'--workdir={workdir}'], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
  finally:
    holder.close()
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: another run is using {workdir} (process 4321 on otherhost holds '
      f'{workdir}/.lock): wait for it to end, or use another workdir')
  assert os.listdir(workdir) == ['.lock']
  assert (workdir / '.lock').read_text() == '4321 otherhost\n'


def test_the_lock_is_held_while_the_run_goes_on_and_freed_after(tmp_path):
  workdir = os.fspath(tmp_path / 'w')
  with workdir_lib.locked(workdir):
    with pytest.raises(BlockingIOError):
      staging.try_lock(os.path.join(workdir, '.lock'))
    with pytest.raises(WorkdirInUse, match=f'process {os.getpid()} on .* holds'):
      with workdir_lib.locked(workdir):
        pass
  staging.try_lock(os.path.join(workdir, '.lock')).close()


def test_without_locks_the_run_goes_on_and_says_so(tmp_path, monkeypatch, caplog):
  def no_locks(*_):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(fcntl, 'flock', no_locks)
  with caplog.at_level(logging.WARNING):
    with workdir_lib.locked(os.fspath(tmp_path)):
      pass
  assert [r.getMessage() for r in caplog.records if 'no locks' in r.getMessage()] == [
      f'{tmp_path}/.lock: this file system has no locks; going on without one (make sure no '
      f'other run uses {tmp_path} meanwhile)']
  monkeypatch.undo()
  with workdir_lib.locked('gs://bucket/run'):  # refused by the trainer, with its own error
    pass
