"""SIGTERM during training: save a checkpoint, then stop with `Preempted`.

`main.py` turns `Preempted` into exit status 143; running the command again
resumes from that checkpoint.
"""

import logging
import signal


class Preemption:
  """Turns SIGTERM into a flag the loop checks: save a checkpoint, then stop."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint, then stopping.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):
  """Raised after a SIGTERM-triggered checkpoint; `main.py` exits with status 143."""

  def __init__(self, step: int):
    super().__init__(f'stopped by SIGTERM at step {step}; rerun to resume')
    self.step = step
