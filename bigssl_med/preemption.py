"""SIGTERM during training: every host saves a checkpoint after one step, then stops.

`main.py` turns `Preempted` into exit status 143; running the command again
resumes from that checkpoint.

One host: a SIGTERM handler sets a flag that the loop reads after each step.

Several hosts: the scheduler's SIGTERM may reach one host only, or each host at
another step. A host that saved and stopped alone would leave the others waiting
for it in the next step's collectives, so the decision is JAX's preemption service
(started by `jax.distributed.initialize`): it catches SIGTERM on any host and names
one step at which `reached_sync_point(step)` is true on every host. No Python handler
is installed then, as it would hide the signal from that service.

A Ctrl-C (SIGINT) stops at once, with no checkpoint of its own: it leaves the loop as
`Interrupted`, which names the last step done, and `main.py` reports it in one line
with the checkpoint a rerun resumes from (exit status 130).
"""

import logging
import signal
from typing import Callable

import jax


class Preemption:
  """Answers, after each step, whether every host should now save and stop."""

  def __init__(self, reached_sync_point: Callable[[int], bool]):
    """`reached_sync_point(step)`: JAX's multi-host preemption notice (orbax's
    `CheckpointManager.reached_preemption`); used when several hosts run."""
    self._reached_sync_point = reached_sync_point
    self._several_hosts = jax.process_count() > 1
    self._requested = False
    self._previous = None
    self.step = None  # the last step trained (`step_done`, `should_stop`)

  def __enter__(self):
    if self._several_hosts:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint, then stopping.')
    self._requested = True

  def step_done(self, step: int) -> None:
    """Records that `step` has trained, for the message of a Ctrl-C that comes before
    `should_stop` is asked about it (during that step's evaluation, say)."""
    self.step = step

  def should_stop(self, step: int) -> bool:
    """Whether to save a checkpoint at `step` and stop (the same answer on every host)."""
    self.step = step
    if self._several_hosts:
      return self._reached_sync_point(step)
    return self._requested

  def __exit__(self, exc_type, exc, traceback):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        and not isinstance(exc, Interrupted)):
      raise Interrupted(self.step) from exc


class Interrupted(KeyboardInterrupt):
  """A Ctrl-C (SIGINT) in the training loop; `step`: the last step done (None: none)."""

  def __init__(self, step: int | None):
    super().__init__(f'interrupted at step {step}')
    self.step = step


class Preempted(Exception):
  """Raised after a SIGTERM-triggered checkpoint; `main.py` exits with status 143."""

  def __init__(self, step: int):
    super().__init__(f'stopped by SIGTERM at step {step}; rerun to resume')
    self.step = step
