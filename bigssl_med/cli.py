"""What the command-line entry points (`python -m bigssl_med.X`) share."""

import logging
import os
import sys
from typing import Callable


# The folders of this package and of `tfds_builders` (installed beside each other).
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_PROJECT, name) for name in ('bigssl_med', 'tfds_builders'))


class QuietLibraries(logging.Filter):
  """Passes the INFO records of this project and of the script run (`main.py`); of the
  libraries' (orbax, JAX, TFDS), warnings and errors only."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    script = getattr(sys.modules.get('__main__'), '__file__', None)
    return ((script is not None and path == os.path.abspath(script))
            or any(path.startswith(folder + os.sep) for folder in _OURS))


def log_info_to_stderr() -> None:
  """Shows this project's log records of level INFO and up on stderr, and the
  libraries' warnings (`QuietLibraries`).

  `logging.basicConfig` does nothing once the root logger has a handler, and a library
  may add one at import time with the root level left at WARNING, which would hide
  what a command reports at INFO (what an import leaves out, a build's progress); so
  the root level is set here too.
  """
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in root.handlers:
    if not any(isinstance(f, QuietLibraries) for f in handler.filters):
      handler.addFilter(QuietLibraries())


def run(main: Callable[[], int]) -> int:
  """Runs a command's `main()` as the process; returns its exit status for `sys.exit`.

  After a failure (a non-zero status, its one-line error printed) nothing more is
  printed: `silence_after_error`.
  """
  status = main()
  if status:
    silence_after_error()
  return status


def silence_after_error() -> None:
  """Drops what a failing process would still print on its way out.

  The exception of a failed checkpoint read keeps orbax's unfinished reads alive until
  exit, and their deletion prints a traceback each ('Exception ignored in: <coroutine
  ...>', or asyncio's log record 'exception was never retrieved'), up to thousands of
  lines under the one-line error. Only for a process that is ending: stderr,
  `sys.unraisablehook` and logging are turned off for good.
  """
  sys.stderr.flush()
  logging.disable(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  sys.stderr = open(os.devnull, 'w')  # pylint: disable=consider-using-with
