"""Staging folders: written beside their destination, locked while their writer runs.

A build or an import writes into a staging folder, then renames the result into
place. A writer killed outright (SIGKILL, a lost machine) cannot remove its staging
folder; `hold` takes an exclusive `flock` on the folder's `.lock` file for as long as
the writer lives, so `remove_dead` can tell the folders of dead writers (lock free)
from live ones and remove only those. Where the file system has no locks, nothing is
locked and nothing removed. `try_lock` locks one file without waiting (a workdir's
lock, held by the run using it).
"""

import contextlib
import fcntl
import os
import shutil
from typing import IO, Iterator

from absl import logging

LOCK_FILE = '.lock'


def hold(folder: str) -> IO | None:
  """Locks `folder` until the returned handle is closed (None where there are no locks).

  The lock file is locked under another name, then renamed to `LOCK_FILE`: a
  `remove_dead` running meanwhile never finds it unlocked.
  """
  unnamed = os.path.join(folder, LOCK_FILE + '.new')
  handle = open(unnamed, 'w')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(unnamed, os.path.join(folder, LOCK_FILE))
  except OSError:
    handle.close()
    try:
      os.remove(unnamed)
    except OSError:
      pass
    return None
  return handle


def try_lock(path: str) -> IO | None:
  """Locks the file at `path` (created if missing; its contents are left as they are)
  with an exclusive `flock`, without waiting, until the returned handle is closed.

  Returns:
    the handle, or None where the file system has no locks.
  Raises:
    BlockingIOError: another open file of it (another process) holds the lock.
    OSError: the file cannot be opened.
  """
  handle = open(path, 'a+')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise
  except OSError:  # ENOLCK, EOPNOTSUPP, ...: no locks here
    handle.close()
    return None
  return handle


@contextlib.contextmanager
def exclusive(folder: str) -> Iterator[None]:
  """Holds an exclusive `flock` on the folder itself, waiting for it, for the `with`
  block: writers that rename entries of the same folder take turns, and no lock file
  is left behind. Where the folder cannot be locked (no locks), nothing is held."""
  fd = None
  try:
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
  except OSError:
    pass
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)


def release(folder: str, handle: IO | None) -> None:
  """Removes `folder`'s lock file, then unlocks it: before the folder is renamed into
  place, so that its contents are all that arrives."""
  if handle is None:
    return
  try:
    os.remove(os.path.join(folder, LOCK_FILE))
  except OSError:
    pass
  handle.close()


def remove_dead(parent: str, prefix: str, what: str) -> None:
  """Removes the folders in `parent` named `prefix*` whose lock is free: their writer
  died. Folders without a lock file, or with one held, are left alone.

  Args:
    parent: the folder holding the staging folders.
    prefix: their name's start (`.build-NAME-`).
    what: what wrote them, for the log (`a build`).
  """
  try:
    entries = os.listdir(parent)
  except OSError:
    return
  for entry in entries:
    path = os.path.join(parent, entry)
    if not entry.startswith(prefix) or not os.path.isdir(path):
      continue
    try:
      with open(os.path.join(path, LOCK_FILE), 'r+') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: its writer is gone
    except OSError:  # a live writer holds it, or no lock file: left alone
      continue
    logging.info('Removing %s, left by %s that stopped before it finished', path, what)
    shutil.rmtree(path, ignore_errors=True)
