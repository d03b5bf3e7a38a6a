"""File modes of what the project writes: a new file's usual mode.

`tempfile.mkstemp` (atomic writes) and some writers (safetensors) create files only
their owner can read; `usual_mode` gives such a file the mode `open()` would have
given it, `0o666` less the umask, so a data set or model on a shared disk stays
readable by the group, as the rest of its files are.
"""

import os


def usual_mode(path: str, *, folder: bool = False) -> None:
  """Sets `path`'s mode to a new file's usual one (`0o666 & ~umask`), or with
  `folder` a new folder's (`0o777 & ~umask`; `tempfile.mkdtemp` makes them private)."""
  os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _umask() -> int:
  mask = os.umask(0o022)  # the only way to read it: set, then put back
  os.umask(mask)
  return mask
