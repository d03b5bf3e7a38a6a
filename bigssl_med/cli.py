"""What the command-line entry points (`python -m bigssl_med.X`) share."""

import logging


def log_info_to_stderr() -> None:
  """Shows log records of level INFO and up on stderr.

  `logging.basicConfig` does nothing once the root logger has a handler, and a library
  may add one at import time with the root level left at WARNING, which would hide
  what a command reports at INFO (what an import leaves out, a build's progress); so
  the root level is set here too.
  """
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  logging.getLogger().setLevel(logging.INFO)
