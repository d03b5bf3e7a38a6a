"""What the commands show on stderr: log lines (bigssl_med.cli), failed reads."""

import logging
import os
import sys
import threading
import time

import orbax.checkpoint

from bigssl_med import checkpointing, cli, predict


def _record(path, level=logging.INFO):
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_the_commands_show_their_info_lines_and_the_libraries_warnings(monkeypatch):
  quiet = cli.QuietLibraries()
  library = orbax.checkpoint.__file__
  assert not quiet.filter(_record(library))
  assert quiet.filter(_record(library, logging.WARNING))
  assert quiet.filter(_record(predict.__file__))
  builders = os.path.join(os.path.dirname(os.path.dirname(predict.__file__)), 'tfds_builders',
                          'common.py')
  assert quiet.filter(_record(builders))
  # The script run (main.py, wherever the package is installed) is the project's too.
  script = os.path.join(os.sep, 'elsewhere', 'main.py')
  monkeypatch.setattr(sys.modules['__main__'], '__file__', script, raising=False)
  assert quiet.filter(_record(script))
  assert not quiet.filter(_record(os.path.join(os.sep, 'elsewhere', 'other.py')))


def _native_thread_write(text):
  """Writes `text` to stderr from a thread Python did not start, as tensorstore's
  callbacks do (ctypes calls a Python function from a new C thread)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  callback_type = ctypes.CFUNCTYPE(None)
  callback = callback_type(lambda: sys.stderr.write(text))
  libc = ctypes.CDLL(None)
  thread = ctypes.c_ulong()
  start = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda _: callback() or None)
  assert libc.pthread_create(ctypes.byref(thread), None, start, None) == 0
  libc.pthread_join(thread, None)


def test_failed_restores_hold_back_only_native_threads_output(capsys):
  def failing(wait):
    try:
      with checkpointing.quiet_failed_reads():
        time.sleep(wait)
        _native_thread_write('Event loop is closed\n')
        raise RuntimeError('read failed')
    except RuntimeError:
      pass

  before = sys.stderr
  threads = [threading.Thread(target=failing, args=(w,)) for w in (0.05, 0.2)]
  threads.append(threading.Thread(target=lambda: (time.sleep(0.1), print(
      'a warning of the program', file=sys.stderr))))
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert sys.stderr is before  # overlapping blocks put back what was there
  err = capsys.readouterr().err
  assert 'a warning of the program' in err and 'Event loop is closed' not in err
  # A restore that succeeds lets what was held through.
  with checkpointing.quiet_failed_reads():
    _native_thread_write('held, then shown\n')
  assert capsys.readouterr().err == 'held, then shown\n'
