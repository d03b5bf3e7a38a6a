"""The files a run writes in its workdir, besides checkpoints.

- `config.json`: the resolved config;
- `data.json`: the build of the data set the run trains on (`train_state.start`);
- `initialised_from.json`: the checkpoint and step the run started from (or null), at
  its first start (`checkpointing.restore_or_initialize`);
- `metrics.jsonl`: one JSON object per logged step and split (`step`, `split`, metrics);
- TensorBoard events through clu's metric writer when TensorFlow is importable
  (clu's writers import it); otherwise a one-line notice, and everything else works;
- progress lines (steps/s, images/s, ETA) on the log;
- `results.json`: the final evaluation;
- `.lock`: locked (`flock`) by the run using the workdir (`locked`), so that a second
  run on it stops at once.
Only the primary host writes.
"""

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np

from bigssl_med import config_schema
from bigssl_med import files
from bigssl_med import parallel
from bigssl_med import staging
from bigssl_med.errors import ConfigError, WorkdirError, WorkdirInUse


_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
LOCK_FILE = '.lock'
# Why a lock file cannot be opened on a workdir that can still be read: a finished run
# there returns its results unlocked; anything else stops where it first writes.
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def make_workdir(workdir: str) -> None:
  """Creates `workdir` (and its parents) where missing.

  Raises:
    WorkdirError: `workdir` is a file, lies under a file, or cannot be created (a
      read-only file system, no permission); one line naming it.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise WorkdirError(f'workdir {workdir} is a file, not a folder: name a folder (made '
                         'if missing)') from None
    raise WorkdirError(f'workdir {workdir}: cannot create it ({e.strerror or e}'
                       f'{": " + os.fspath(e.filename) if e.filename else ""})') from None


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Holds `workdir`'s lock for the `with` block: one run at a time uses a workdir.

  An exclusive `flock` on `WORKDIR/.lock` (the workdir is created if missing), taken
  without waiting; the file holds the holder's process id and host. With several
  hosts only process 0 locks (the workdir is shared); where the file system has no
  locks, or for a URL (which `start` refuses), the run goes on unlocked, said once on
  the log; so it does where the lock file cannot be written (a read-only file system),
  for a finished run to return its results (a run that has to write stops at
  `check_writable`). The runs a run makes inside its workdir (the stages of
  `trainer='stages'`) each lock their own folder too, so that a run started on one of
  those directly is refused while its stage runs (and a stage, while such a run holds
  its folder).

  Raises:
    WorkdirInUse: another process holds the lock; nothing has been written.
    WorkdirError: `workdir` is a file, lies under one, or cannot be created or opened.
  """
  handle, busy = None, ''
  if jax.process_index() == 0 and not _URL.match(os.fspath(workdir)):
    path = os.path.join(workdir, LOCK_FILE)
    make_workdir(workdir)
    try:
      handle = staging.try_lock(path)
      if handle is None:
        logging.warning('%s: this file system has no locks; going on without one (make sure '
                        'no other run uses %s meanwhile)', path, workdir)
    except BlockingIOError:
      busy = _holder(path)
    except OSError as e:
      if e.errno not in _READ_ONLY:
        raise WorkdirError(f'workdir {workdir}: cannot open its lock file {path} '
                           f'({e.strerror or e})') from None
      logging.warning('%s: cannot write it (%s); going on without a lock: a finished run '
                      'there can return its results, a run that has to write stops before '
                      'it writes', path, e.strerror or e)
  if handle is not None:
    os.ftruncate(handle.fileno(), 0)
    handle.write(f'{os.getpid()} {socket.gethostname()}\n')
    handle.flush()
  if parallel.primary_value(int(bool(busy))):  # every host stops when process 0 does
    raise WorkdirInUse(f'another run is using {workdir} ({busy or "see the log of process 0"}):'
                       ' wait for it to end, or use another workdir')
  try:
    yield
  finally:
    if handle is not None:
      handle.close()


def _holder(path: str) -> str:
  """Who holds the lock file at `path`, in words, from what the holder wrote there."""
  try:
    with open(path) as f:
      pid, host = (f.read().split() + ['', ''])[:2]
  except OSError:
    pid = host = ''
  if pid.isdigit():
    return f'process {pid}{" on " + host if host else ""} holds {path}'
  return f'{path} is locked'


def start(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates `workdir`, and its `config.json` if it has none; a URL (gs://...) is an error.

  Files half-written by an attempt killed while writing them (`files.written_whole`'s
  temporaries) are removed.

  An existing `config.json` describes the run the workdir holds; a trainer replaces
  it (`write_config`) only once this run has been found consistent with that one
  (its checkpoint restored), so a rerun rejected for a changed model leaves it be.
  A workdir is written through the file system of each host: on a Cloud TPU VM, a
  bucket mounted with gcsfuse on every host, or a shared disk.

  Raises:
    WorkdirError: `workdir` is a file or cannot be created; its `config.json` cannot be
      read (`read_config`); it holds a run (`held_run`) but no `config.json`, so the
      settings that run had are unknown; or it holds no `results.json` and cannot be
      written (`check_writable`). Nothing is written then.
  """
  if _URL.match(os.fspath(workdir)):
    raise ConfigError(f'workdir {workdir!r} is a URL: pass a path of the file system, e.g. '
                      'the bucket mounted with gcsfuse on every host')
  make_workdir(workdir)
  if jax.process_index() == 0:
    removed = files.remove_stale_temporaries(workdir)
    if removed:
      logging.info('%s: removed %d file(s) half-written by a killed attempt (%s)', workdir,
                   len(removed), ', '.join(removed))
  saved = read_config(workdir)
  held = held_run(workdir)
  if saved is None and held:
    path = os.path.join(workdir, CONFIG_FILE)
    raise WorkdirError(f'{workdir} holds a run ({held}) but no {CONFIG_FILE}: the settings '
                       f'it ran with are unknown; restore {path}, or move {workdir} aside '
                       'and rerun in a new workdir')
  if held != 'results.json':
    check_writable(workdir)  # else `finished_results` checks, if the run is not finished
  if saved is None:
    write_config(workdir, config)


def check_writable(workdir: str) -> None:
  """Fails unless this process can write in `workdir`: a run that trains or tests there.

  Raises:
    WorkdirError: one line naming `workdir` and why (a read-only file system, or no
      permission), before anything else is written.
  """
  if os.access(workdir, os.W_OK):  # every host: each writes its part of a checkpoint
    return
  try:
    read_only = bool(os.statvfs(workdir).f_flag & os.ST_RDONLY)
  except OSError:
    read_only = False
  why = 'on a read-only file system' if read_only else 'no permission to write there'
  raise WorkdirError(f'workdir {workdir}: cannot write in it ({why}): this run needs to '
                     'write there; use a workdir it can write')


def held_run(workdir: str) -> str:
  """What in `workdir` a run left that a rerun would return or resume (`results.json`,
  a checkpoint's step folder), in words; '' when nothing."""
  if os.path.exists(os.path.join(workdir, 'results.json')):
    return 'results.json'
  try:
    steps = [name for name in os.listdir(os.path.join(workdir, 'checkpoints'))
             if name.isdigit()]
  except OSError:
    steps = []
  return f'checkpoints/{max(steps, key=int)}' if steps else ''


def read_config(workdir: str) -> dict[str, Any] | None:
  """The settings in `workdir/config.json`; None when there is no such file.

  Raises:
    WorkdirError: the file cannot be read or holds no JSON object (`read_record`),
      saying how to go on; it is left as it is.
  """
  def recover() -> str:  # only for a damaged file: it lists the checkpoints
    held = held_run(workdir)
    if held:
      return (f'the settings of the run {workdir} holds ({held}) are unknown: restore the '
              f'file, or move {workdir} aside and rerun in a new workdir')
    return (f'restore it, or delete it ({workdir} holds no results.json or checkpoint, so '
            'this run writes its own)')

  path = os.path.join(workdir, CONFIG_FILE)
  return read_record(path, recover)


def finished_results(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """`results.json` of a finished run of `config.trainer` in `workdir`; None when unfinished.

  Raises:
    ConfigError: when the finished run's `config.json` differs from `config` in a
      setting (`config_schema.setting_differences`: bookkeeping such as paths and
      logging aside), naming the first key: its results answer another question.
    WorkdirError: `config.json` cannot be read (`read_config`); or the run is not
      finished and `workdir` cannot be written (`check_writable`).
  """
  path = os.path.join(workdir, 'results.json')
  results = read_json(path)
  if not (isinstance(results, dict) and results.get('test') is not None
          and results.get('trainer') == config.trainer):
    check_writable(workdir)  # the run trains or tests
    return None
  saved = read_config(workdir)
  if saved is not None:
    differences = config_schema.setting_differences(saved, config.to_dict())
    if differences:
      raise ConfigError(f'{workdir} holds a finished run with other settings: '
                        f'{config_schema.describe_differences(differences)}; run in a new '
                        'workdir')
  logging.info('Finished before: %s', path)
  return results


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `workdir/config.json`, the config of the run going on there.

  Raises:
    WorkdirError: the file cannot be written (a read-only file system, say).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    write_json(path, config.to_dict())
  except OSError as e:
    raise WorkdirError(f'{path}: cannot write it ({e.strerror or e}): this run needs a '
                       'workdir it can write') from None


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename), on the primary host only."""
  if jax.process_index() != 0:
    return
  with files.written_whole(path) as tmp, open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_to_builtin)
    f.write('\n')


def digest(obj: Any) -> str:
  """SHA-256 of `obj` as `write_json` writes it, keys sorted: the same for results
  returned by a run and for its `results.json` read back."""
  builtin = json.loads(json.dumps(obj, default=_to_builtin))
  return hashlib.sha256(json.dumps(builtin, sort_keys=True).encode()).hexdigest()


def read_json(path: str) -> Any:
  """The parsed JSON file at `path`, or None when it is missing or not valid JSON.

  For files whose damage their reader handles (a `results.json` cut short is written
  again); the records that guard a rerun are read with `read_record`.
  """
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_record(path: str, recover: str | Callable[[], str], *,
                keys: tuple[str, ...] = (), null_ok: bool = False) -> Any:
  """The JSON object in the file at `path`; None when there is no such file.

  The records a run keeps in its workdir (`config.json`, `data.json`, `best.json`, ...)
  are written whole (`write_json`), so one that cannot be parsed was damaged from
  outside (a disk error, a bad copy, a hand edit): reading it as absent would skip the
  checks it feeds, and the file would then be written over.

  Args:
    path: the file.
    recover: what to do about a damaged file, for the error (or a function that says
      it, called only then).
    keys: keys the object must have.
    null_ok: a file holding `null` reads as None too (a record of "nothing").

  Raises:
    WorkdirError: the file cannot be read, is not valid JSON, or holds no JSON object
      or one without `keys`: one line naming it and `recover`; the file is left as it is.
  """
  def damaged(problem: str) -> WorkdirError:
    return WorkdirError(f'{path}: {problem}; {recover() if callable(recover) else recover}')

  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise damaged(f'cannot be read ({e.strerror or e})') from None
  try:
    found = json.loads(text)
  except ValueError as e:
    problem = 'empty' if not text.strip() else f'not valid JSON ({_first_line(e)})'
    raise damaged(f'{problem}, damaged or cut short') from None
  if found is None and null_ok:
    return None
  if not isinstance(found, dict):
    raise damaged(f'holds {type(found).__name__} {_first_line(found, 40)}, not a JSON '
                  'object (damaged?)')
  missing = [key for key in keys if key not in found]
  if missing:
    raise damaged(f'lacks the key {missing[0]!r} (damaged?)')
  return found


def _first_line(x: Any, limit: int = 200) -> str:
  lines = str(x).strip().splitlines() or ['']
  return lines[0] if len(lines[0]) <= limit else lines[0][:limit - 3] + '...'


def _read_rows(path: str) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
  """The lines of the metrics file at `path` and its rows: (number of lines, [(line,
  row)] of the lines that are JSON objects; a line cut short by a crash is not)."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0, []
  rows = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict):
      rows.append((line, row))
  return len(lines), rows


def last_row(workdir: str, split: str, step: int) -> dict[str, float] | None:
  """The metrics of the last `metrics.jsonl` row of `split` at `step` (without `step`
  and `split`), or None when there is none."""
  found = [row for _, row in _read_rows(os.path.join(workdir, METRICS_FILE))[1]
           if row.get('split') == split and row.get('step') == step]
  return {k: v for k, v in found[-1].items() if k not in ('step', 'split')} if found else None


def scalars(found: Mapping[str, Any]) -> dict[str, float]:
  """The float metrics of an evaluation (per-class dicts flattened as `name/class`)."""
  out = {}
  for key, value in found.items():
    if isinstance(value, Mapping):
      out.update({f'{key}/{k}': float(v) for k, v in value.items()})
    elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
      out[key] = float(value)
  return out


def _to_builtin(x):
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f'not JSON serialisable: {type(x).__name__}')


def _tensorboard_writer(workdir: str):
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning('TensorBoard events are off: clu\'s writer needs TensorFlow (%s); '
                    'metrics.jsonl and progress lines are still written.', e)
    return None
  return metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard'))


def _step(row: dict[str, Any]) -> int:
  return int(row.get('step', 0))


def _drop_rows_after(path: str, step: int,
                     keep_row: Callable[[dict[str, Any]], bool] | None = None
                     ) -> tuple[int, int]:
  """Rewrites the metrics file at `path` without its rows of steps after `step` (and
  without a last line cut short by a crash); `keep_row(row)`, when given, decides
  instead which rows stay. Returns (rows kept, rows kept of steps after `step`)."""
  keep_row = keep_row or (lambda row: _step(row) <= step)
  num_lines, rows = _read_rows(path)
  kept = [(line, row) for line, row in rows if keep_row(row)]
  ahead = sum(_step(row) > step for _, row in kept)
  if len(kept) < num_lines:
    logging.info('%s: %d row(s) after step %d dropped; the run logs those steps again',
                 path, num_lines - len(kept), step)
    with files.written_whole(path) as tmp, open(tmp, 'w') as f:
      f.write(''.join(line + '\n' for line, _ in kept))
  return len(kept), ahead


def _put_ahead_rows_in_place(path: str, step: int, start: int) -> None:
  """Moves the rows of steps after `step` that a resumed run kept from its earlier
  attempt (evaluations it does not repeat), among the first `start` rows of the
  metrics file at `path`, to where an uninterrupted run writes them: after that step's
  training row, before the next steps' rows and before any row that is not a training
  row (the resumed run's later evaluations, and the test and shift rows written after
  the loop, at the best step)."""
  rows = [(_step(row), row.get('split'), line) for line, row in _read_rows(path)[1]]
  earlier = [line for s, _, line in rows[:start] if s <= step]
  ahead = [(s, line) for s, _, line in rows[:start] if s > step]
  merged = []
  for s, split, line in rows[start:]:
    while ahead and (ahead[0][0] < s or split != 'train'):
      merged.append(ahead.pop(0)[1])
    merged.append(line)
  merged += [line for _, line in ahead]
  with files.written_whole(path) as tmp, open(tmp, 'w') as f:
    f.write(''.join(line + '\n' for line in earlier + merged))


class MetricWriter:
  """Appends to `metrics.jsonl`, writes TensorBoard scalars and prints progress lines."""

  def __init__(self, workdir: str, *, total_steps: int, tensorboard: bool = True,
               resume_step: int | None = None,
               keep_row: Callable[[dict[str, Any]], bool] | None = None):
    """`resume_step`: the step the run restarts from; rows logged after it (by a run
    that stopped before its next checkpoint) are dropped, as the run logs them again.
    `keep_row(row)`, when given, decides instead which earlier rows stay; those of
    steps after `resume_step` move to where an uninterrupted run writes them when
    the writer closes (till then they stay where they were, so a new kill loses none)."""
    self._primary = jax.process_index() == 0
    self._total_steps = total_steps
    self._jsonl = None
    self._tb = None
    self._path = os.path.join(workdir, METRICS_FILE)
    self._reorder = None  # (resume_step, rows before this run's) when rows were kept ahead
    if self._primary:
      os.makedirs(workdir, exist_ok=True)
      if resume_step is not None:
        kept, ahead = _drop_rows_after(self._path, resume_step, keep_row)
        if ahead:
          self._reorder = (resume_step, kept)
      self._jsonl = open(self._path, 'a')
      if tensorboard:
        self._tb = _tensorboard_writer(workdir)
    self._last_time = None
    self._last_step = None

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Logs scalars of one step and split; returns them as Python floats."""
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if self._primary:
      self._jsonl.write(json.dumps({'step': int(step), 'split': split, **scalars}) + '\n')
      self._jsonl.flush()
      if self._tb is not None:
        self._tb.write_scalars(int(step), {f'{split}/{k}': v for k, v in scalars.items()})
    return scalars

  def start_clock(self, step: int) -> None:
    """(Re)starts the rate clock at `step`: after compilation, a checkpoint or an evaluation."""
    self._last_time, self._last_step = time.perf_counter(), step

  def progress(self, step: int, scalars: Mapping[str, float],
               images_per_step: int) -> dict[str, float]:
    """Logs steps/s, images/s and ETA since the clock last started; returns the rates."""
    if self._last_time is None or step <= self._last_step:
      return {}
    now = time.perf_counter()
    steps_per_sec = (step - self._last_step) / (now - self._last_time)
    rates = {'steps_per_sec': steps_per_sec, 'images_per_sec': steps_per_sec * images_per_step}
    eta = (self._total_steps - step) / steps_per_sec
    shown = ', '.join(f'{k} {v:.4g}' for k, v in scalars.items() if math.isfinite(v))
    logging.info('step %d/%d (%.1f%%), %.2f steps/s, %.1f images/s, ETA %s; %s', step,
                 self._total_steps, 100.0 * step / max(1, self._total_steps), steps_per_sec,
                 rates['images_per_sec'], _duration(eta), shown)
    self._last_time, self._last_step = now, step
    return rates

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
      if self._reorder is not None:
        _put_ahead_rows_in_place(self._path, *self._reorder)
        self._reorder = None
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
