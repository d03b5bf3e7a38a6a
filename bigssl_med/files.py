"""How the project writes files: whole or not at all, with a new file's usual mode.

`written_whole(path)` gives a temporary path beside `path` to write, and renames it
over `path` once the block ends without error (the file synced to disk first), so a
reader (or a rerun after a crash or a power cut) sees the old file or the new one,
never half of one.

`tempfile.mkstemp` and some writers (safetensors) create files only their owner can
read; `usual_mode` gives such a file the mode `open()` would have given it, `0o666`
less the umask, so a data set or model on a shared disk stays readable by the group,
as the rest of its files are.
"""

import contextlib
import os
import re
import tempfile
from typing import Iterator

# The temporary files `written_whole` makes: `.NAME.` + mkstemp's 8 characters + `.tmp` +
# NAME's extension.
_TEMPORARY = re.compile(r'^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$')


@contextlib.contextmanager
def written_whole(path: str) -> Iterator[str]:
  """Yields a temporary path in `path`'s folder (made if missing) to write `path` to.

  When the block ends without error the file gets the usual mode and replaces `path`
  in one rename; when it raises, the temporary file is removed and `path` is left as
  it was. A `path` that is a symbolic link is written through: the file it points to
  is replaced, the link stays. The temporary name ends in `path`'s extension, for
  writers that choose the format by it (matplotlib's `savefig`).

  Raises:
    OSError: the folder cannot be made or written, or `path` cannot be replaced (a
      folder, say), with `path` as its `filename`.
  """
  target = os.path.realpath(path)
  name = os.path.basename(target)
  try:
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix=f'.tmp{os.path.splitext(name)[1]}',
                               dir=folder)
    os.close(fd)
  except OSError as e:  # named by `path`, not by a folder or a temporary file
    raise type(e)(e.errno, e.strerror, path) from None
  try:
    yield tmp
    usual_mode(tmp)  # mkstemp makes it private
    _sync(tmp)  # the bytes reach the disk before the name points at them
    try:
      os.replace(tmp, target)
    except OSError as e:
      raise type(e)(e.errno, e.strerror, path) from None
    _sync(folder, folder=True)  # and the rename itself
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove_stale_temporaries(folder: str) -> list[str]:
  """Removes the temporary files of `written_whole` in `folder` (not below it) that a
  process killed mid-write left; returns their names. Only for a folder no other
  process writes meanwhile (a workdir whose lock this run holds)."""
  try:
    names = sorted(name for name in os.listdir(folder) if _TEMPORARY.match(name))
  except OSError:
    return []
  removed = []
  for name in names:
    with contextlib.suppress(OSError):  # gone, a folder, or a read-only workdir
      os.remove(os.path.join(folder, name))
      removed.append(name)
  return removed


# What the OS says when a write fails for want of room or rights, as errors of other
# kinds (orbax's ValueError, tensorstore's and TFDS's RuntimeError) quote it.
_WRITE_FAILURES = ('No space left on device', 'Disk quota exceeded', 'File too large',
                   'Read-only file system', 'Permission denied', 'Input/output error')


def write_failure(error: BaseException) -> str | None:
  """Why a write failed, in a few words (`RESOURCE_EXHAUSTED: No space left on device`),
  when `error` or an error it was raised from is a failed write; None otherwise.

  An OSError is one; so is an error of another type whose message quotes the OS's
  reason (a full disk, a quota, a read-only or unwritable folder, an I/O error), with
  tensorstore's status code where it starts the message.
  """
  seen, cause = 0, error
  while cause is not None and seen < 8:
    text = str(cause)
    for reason in _WRITE_FAILURES:
      if reason in text:
        status = re.match(r'([A-Z][A-Z_]+): ', text)
        return f'{status[1]}: {reason}' if status else reason
    seen, cause = seen + 1, cause.__cause__ or cause.__context__
  if isinstance(error, OSError):
    return error.strerror or ' '.join(str(error).split()) or type(error).__name__
  return None


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """`os.walk(top)` (top-down) that follows links to folders, as raw data linked into
  place needs, and visits each real folder once: a link loop, or a second link to a
  folder already walked, is not walked again. As with `os.walk`, a caller may prune
  the folder names it is given, in place."""
  seen = set()
  for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    yield dirpath, dirnames, filenames


def sync_tree(folder: str) -> None:
  """fsync of every file and folder under `folder` (and of `folder`), before it is
  renamed into place: a power cut after the rename cannot leave it holding files
  that never reached the disk."""
  for parent, _, names in os.walk(folder, topdown=False):
    for name in names:
      _sync(os.path.join(parent, name))
    _sync(parent, folder=True)


def _sync(path: str, *, folder: bool = False) -> None:
  """fsync of the file (or folder) at `path`, so a power cut cannot leave a renamed
  file empty; a file system that cannot sync a folder (some network mounts) is let be."""
  try:
    fd = os.open(path, os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if folder else 0))
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    if not folder:
      raise


def usual_mode(path: str, *, folder: bool = False) -> None:
  """Sets `path`'s mode to a new file's usual one (`0o666 & ~umask`), or with
  `folder` a new folder's (`0o777 & ~umask`; `tempfile.mkdtemp` makes them private)."""
  os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _umask() -> int:
  mask = os.umask(0o022)  # the only way to read it: set, then put back
  os.umask(mask)
  return mask
