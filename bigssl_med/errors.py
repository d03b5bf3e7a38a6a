"""Errors that carry a one-line, user-facing message.

Entry points (`main.py`, `python -m bigssl_med.build_data`) print these as a single
line naming the file, row or key at fault, instead of a traceback.
"""


class UserError(ValueError):
  """Bad input from the user: a file, a row, a config key. The message is one line."""


class DataError(UserError):
  """A data set, data directory, CSV row or image that cannot be used."""


class DamagedBuild(DataError):
  """A built data set with a file missing or damaged; the message names the file and the
  command that rebuilds it."""


class ConfigError(UserError):
  """A config key that is unknown, unused or has an invalid value."""


class CheckpointError(UserError):
  """A checkpoint that is missing, cannot be written or does not match the model it should
  initialise."""


class WorkdirError(UserError):
  """A workdir that cannot be used, or a record a run keeps there that cannot be read."""


class WorkdirInUse(UserError):
  """Another run holds the workdir's lock."""
