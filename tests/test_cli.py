"""bigssl_med.cli: which log lines the commands show."""

import logging
import os
import sys

import orbax.checkpoint

from bigssl_med import cli, predict


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
