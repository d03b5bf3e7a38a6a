"""Checkpoints in `WORKDIR/checkpoints` (orbax) and where a run's weights come from.

A checkpoint step holds three items:
- `model`: `{'params', 'batch_stats'}` (plain nested dicts, loadable on its own by
  `init_from` of a later run);
- `opt`: `{'step', 'opt_state'}`;
- `data`: each host's input-iterator state (grain's per-process JSON files), so a
  resumed run sees exactly the examples an uninterrupted run would.

Where the starting weights come from, in this order (`restore_or_initialize`):
1. the newest checkpoint in this run's workdir (resume: weights, optimiser, step
   and data position);
2. `config.init_from` (another workdir, its `checkpoints/` folder, one step folder, or a
   run's selected model `best/`): encoder weights, and the head's when asked; fresh
   optimiser and step 0. Where the run that wrote it left a `config.json`, its encoder
   architecture (`models.ARCHITECTURE_KEYS`) must be this run's: a different
   `stem_pool_padding`, say, has the same shapes but computes another function. The
   workdir of a run trained on labels (`SUPERVISED_TRAINERS`) is refused: its newest
   checkpoint is not its selected model, and a label-efficiency study would count
   neither its labels nor its method; name its `best/` or a step folder to start from it.
   A pretraining run without its results yet (unfinished) gives a warning;
3. the random initialisation.

A run that starts from 2. or 3. records which in `WORKDIR/initialised_from.json`
(`INIT_FILE`) before its first checkpoint; a resumed run reads it back, so its
results name the checkpoint and step it was initialised from, even where the source
run has gone on since.
"""

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable
import weakref

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from bigssl_med import files
from bigssl_med import models
from bigssl_med import workdir as workdir_lib
from bigssl_med.errors import CheckpointError


@dataclasses.dataclass
class _DataState:
  """Adapter that lets grain's orbax handler save and restore a recorded iterator state.

  The trainer prefetches batches ahead of the step, so the live iterator is ahead of
  the training step; the state saved is the one recorded after the last batch
  the step consumed.
  """
  state: bytes = b''

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    pass


def absolute(path: str) -> str:
  """`path` with `~` expanded, made absolute: orbax reads and writes absolute paths only."""
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _handlers():
  return {'model': ocp.StandardCheckpointHandler(), 'opt': ocp.StandardCheckpointHandler(),
          'data': grain.checkpoint.CheckpointHandler()}


class Checkpointer:
  """orbax `CheckpointManager` keeping the last `keep_last` steps and every `keep_every`-th."""

  def __init__(self, workdir: str, *, keep_last: int = 3, keep_every: int = 0,
               async_save: bool = True):
    self.directory = epath.Path(absolute(workdir)) / 'checkpoints'  # orbax needs it absolute
    policies = [ocp.checkpoint_managers.LatestN(max(1, keep_last))]
    if keep_every > 0:
      policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
    # cleanup_tmp_directories: a save cut off (a kill, a second Ctrl-C) left its
    # `N.orbax-checkpoint-tmp` folder, which is no checkpoint; the run that owns the
    # workdir (holding its lock) removes it as it starts.
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_handlers())
    self._async = async_save
    self._in_flight: tuple[int, _SaveOutput] | None = None  # an async save not waited for
    _OPEN.add(self)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, *, model: Any, opt: Any, data_state: bytes | None,
           force: bool = False) -> bool:
    """Starts saving `step` (in the background when async), once the save before it
    has completed; a Ctrl-C meanwhile waits for the save to be under way (`sigint_held`).

    Raises:
      CheckpointError: this save or the one before it could not be written (a full
        disk, a read-only folder): one line naming the folder, the reason and the
        checkpoint a rerun resumes from. What orbax's threads print about it is dropped.
    """
    items = {'model': ocp.args.StandardSave(model), 'opt': ocp.args.StandardSave(opt)}
    if data_state is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_DataState(data_state))
    with sigint_held():
      self._finish_save()
      output = _SaveOutput()
      try:
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
      except Exception as e:  # pylint: disable=broad-except  (re-raised, or said in one line)
        raise self._save_failed(step, output, e) from e
      if saved and self._async:
        self._in_flight = (step, output)
      else:
        output.end(None)
      return saved

  def _finish_save(self) -> None:
    """Waits for the save in flight (`save`'s errors)."""
    step, output = self._in_flight or (None, None)
    self._in_flight = None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (re-raised, or said in one line)
      raise self._save_failed(step, output, e) from e
    if output is not None:
      output.end(None)

  def _save_failed(self, step: int | None, output: '_SaveOutput | None',
                   error: Exception) -> Exception:
    """The error to raise for a failed save: a one-line CheckpointError for a write
    that failed (`files.write_failure`), dropping what orbax's threads printed about it;
    `error` itself, with that output let through, for any other failure."""
    reason = files.write_failure(error)
    if output is not None:
      output.end(None if reason is None else error)
    if reason is None:
      return error
    kept = [s for s in self.saved_steps() if step is None or s < step]
    what = f'checkpoint {step}' if step is not None else 'a checkpoint'
    after = (f'the earlier checkpoints are kept: rerun the command once it can be written to '
             f'resume from step {kept[-1]}' if kept else
             'no earlier checkpoint: rerun the command once it can be written to start again')
    return CheckpointError(f'{self.directory}: {what} could not be written ({reason}); '
                           f'{after}')

  def restore(self, step: int, *, model: Any, opt: Any) -> tuple[Any, Any, bytes | None]:
    """Restores `step` onto the abstract targets; returns (model, opt, data_state).

    Raises:
      CheckpointError: the step's folder lacks an item, its files cannot be read or
        decoded (a metadata file that is not JSON), or it does not fit `model`/`opt`;
        one line naming the folder and, for a damaged one, the earlier step the run
        would resume from without it.
    """
    folder = self.directory / str(step)
    earlier = [s for s in self._manager.all_steps() if s < step]
    instead = (f'; delete it to resume from step {max(earlier)}' if earlier else
               '; delete it to start from the beginning')
    missing = [name for name in ('model', 'opt') if not (folder / name).is_dir()]
    if missing:
      raise CheckpointError(f'checkpoint {folder} is incomplete (no {", ".join(missing)}/)'
                            f'{instead}')
    items = {'model': ocp.args.StandardRestore(model), 'opt': ocp.args.StandardRestore(opt)}
    has_data = (folder / 'data').exists()
    if has_data:
      items['data'] = grain.checkpoint.CheckpointRestore(_DataState())
    try:
      with quiet_failed_reads():
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore errors)
      if isinstance(e, (ValueError, KeyError, TypeError)) and not (
          _READ_ERROR.match(first_line(e)) or _undecodable(e)):
        raise CheckpointError(
            f'checkpoint {folder} does not match this run\'s model or optimiser (was the '
            f'config changed since it was written?): {first_line(e)}') from e
      raise CheckpointError(f'checkpoint {folder} cannot be read, damaged or cut short '
                            f'({first_line(e)}){instead}') from e
    data_state = restored['data'].get_state() if has_data else None
    if data_state is not None:
      try:
        json.loads(data_state)
      except ValueError:
        raise CheckpointError(f'checkpoint {folder / "data"} does not hold the input '
                              f'pipeline\'s state (JSON){instead}') from None
    return restored['model'], restored['opt'], data_state

  def reached_preemption(self, step: int) -> bool:
    """Whether JAX's multi-host preemption notice asks every host to save at `step`."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for the save in flight, then closes; a Ctrl-C meanwhile waits for it."""
    with sigint_held():
      self._finish_save()
      self._manager.close()
    _OPEN.discard(self)

  def saved_steps(self) -> list[int]:
    """The steps whose checkpoint is complete on disk (a save still in flight, or one
    abandoned, is a `N.orbax-checkpoint-tmp...` folder until it completes)."""
    try:
      return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    except OSError:
      return []


# The Checkpointers not closed yet, for `finish_saves`.
_OPEN: 'weakref.WeakSet[Checkpointer]' = weakref.WeakSet()


def finish_saves() -> list[tuple[str, int | None]]:
  """For a run stopped by Ctrl-C: waits for the checkpoint saves still in flight, so
  that each completes; returns `(checkpoints folder, newest complete step or None)` of
  each Checkpointer not closed.

  A save that fails, or a second Ctrl-C while waiting, abandons it: its
  `N.orbax-checkpoint-tmp` folder is not a checkpoint, and the next run removes it.
  """
  done = []
  for checkpointer in list(_OPEN):
    try:
      checkpointer._finish_save()  # pylint: disable=protected-access
    except (Exception, KeyboardInterrupt):  # pylint: disable=broad-except  (abandoned)
      pass
    steps = checkpointer.saved_steps()
    done.append((os.fspath(checkpointer.directory), steps[-1] if steps else None))
  return done


class _HeldOrbaxErrors(logging.Filter):
  """Holds orbax's error records (each with a traceback) instead of logging them."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname:
      self.held.append(record)
      return False
    return True


class _SaveOutput:
  """What a save's threads print while it runs, held until its outcome is known.

  A save that fails to write (a full disk) fails in each of orbax's threads and in
  each of tensorstore's writes, and each prints its traceback, most of them while the
  training goes on, long before the error reaches `Checkpointer.save`: orbax's error
  records and what threads Python did not start write to stderr (`quiet_failed_reads`)
  are held from the save's start. `end(None)` lets them through; `end(error)` drops
  them, once the writes still in flight have failed in turn.
  """

  def __init__(self):
    self._stderr = quiet_failed_reads()
    self._stderr.__enter__()  # pylint: disable=unnecessary-dunder-call
    self._records = _HeldOrbaxErrors()
    logging.getLogger('absl').addFilter(self._records)
    self._ended = False

  def end(self, error: BaseException | None) -> None:
    if self._ended:
      return
    self._ended = True
    if error is None:
      logging.getLogger('absl').removeFilter(self._records)
      self._stderr.__exit__(None, None, None)
      for record in self._records.held:
        logging.getLogger('absl').handle(record)
    else:  # waits for the writes in flight, holding what they print, then drops it
      self._stderr.__exit__(type(error), error, error.__traceback__)
      logging.getLogger('absl').removeFilter(self._records)


@contextlib.contextmanager
def sigint_held():
  """Holds a SIGINT (Ctrl-C) that comes while the block runs until it ends, then raises
  KeyboardInterrupt: a checkpoint save is not cut off half-way, with orbax's error and
  traceback for it. A second SIGINT meanwhile raises at once. Only in the main thread,
  and only where Python's own SIGINT handler is in place; elsewhere a plain block.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  received = []

  def hold(signum, frame):
    del frame
    if received:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    received.append(signum)

  signal.signal(signal.SIGINT, hold)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if received:
    raise KeyboardInterrupt


# tensorstore's status codes for files it cannot read (a config change gives none of them).
_READ_ERROR = re.compile(r'^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|UNKNOWN|INTERNAL|'
                         r'FAILED_PRECONDITION|UNAVAILABLE): ')


def _undecodable(e: BaseException) -> bool:
  """Whether `e` or an exception it came from is a file that does not decode (a metadata
  file such as `model/_METADATA` that is not JSON): damage, not a config change."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
      return True
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return False


def _damaged(e: Exception) -> str:
  """' (damaged or cut short?)' for tensorstore's read errors, else ''."""
  cause = e.__cause__ or e
  return ' (damaged or cut short?)' if (_READ_ERROR.match(first_line(e))
                                        or _READ_ERROR.match(first_line(cause))) else ''


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first line of `e`'s message, without tensorstore's spec dump, at most `limit` long.

  Where orbax wraps a tensorstore read error (`e.__cause__`) in a message of its own
  (which array index it was reading), the read error's status line is the one that
  says what is wrong, and is taken instead.
  """
  text = str(e).strip()
  line = text.splitlines()[0] if text else type(e).__name__
  line = line.split(' [tensorstore_spec')[0].split(' See full TensorStore details')[0]
  cause = e.__cause__
  if cause is not None and not _READ_ERROR.match(line):
    cause_line = first_line(cause, limit)
    if _READ_ERROR.match(cause_line):
      line = cause_line
  return line if len(line) <= limit else line[:limit - 3] + '...'


# How long a failed read waits for the reads still in flight to fail in turn.
_SETTLE_S = 0.5


class _NativeThreadsHeld(io.TextIOBase):
  """`sys.stderr` while restores run: what threads Python did not start (tensorstore's
  callbacks) write is held back; every other thread writes through at once."""

  def __init__(self, real):
    super().__init__()
    self.real, self.held, self.failed, self.users = real, [], False, 0

  def write(self, text: str) -> int:
    if isinstance(threading.current_thread(), getattr(threading, '_DummyThread', ())):
      self.held.append(text)
      return len(text)
    return self.real.write(text)

  def flush(self) -> None:
    self.real.flush()

  def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty ... of the real one
    return getattr(self.real, name)


_HOLDING = threading.Lock()
_held: list[_NativeThreadsHeld] = []  # the one in place, while restores run


@contextlib.contextmanager
def quiet_failed_reads():
  """Keeps what a failed orbax restore's leftover reads print out of stderr.

  When one array of a damaged checkpoint cannot be read, orbax stops its event loop
  while tensorstore still reads the others; each of those then fails into the closed
  loop and prints a traceback ('Event loop is closed') from one of tensorstore's
  threads, from a few lines to thousands, around the one-line error. Within this
  block (any number at once, in any threads) what those threads write to stderr is
  held; the program's own threads write through. On failure the block waits
  `_SETTLE_S` for the reads in flight, and what was held is dropped once the last
  block ends (the error raised says what went wrong); otherwise it goes on to stderr.
  The failed reads' coroutines report once more when deleted, at exit:
  `cli.silence_after_error` quiets that.
  """
  with _HOLDING:
    if not _held:
      _held.append(_NativeThreadsHeld(sys.stderr))
      sys.stderr = _held[0]
    hold = _held[0]
    hold.users += 1
  try:
    yield
  except BaseException:
    hold.failed = True
    time.sleep(_SETTLE_S)
    raise
  finally:
    with _HOLDING:
      hold.users -= 1
      if not hold.users:
        _held.clear()
        if sys.stderr is hold:
          sys.stderr = hold.real
        if not hold.failed:
          hold.real.write(''.join(hold.held))


SUPERVISED_TRAINERS = ('finetune', 'linear_eval', 'distill', 'segment')


def find_model_item(path: str, name: str | None = None) -> epath.Path:
  """The `model` item folder that `path` names: a workdir, its checkpoints, one step, or
  a run's selected model (`best/`, beside its `best.json`).

  `name`: how errors name `path` (default `init_from='PATH'`, the config key).
  """
  name = name or f'init_from={path!r}'
  p = epath.Path(absolute(path))
  convert = (f'import it with python -m bigssl_med.convert --checkpoint={path} '
             '--workdir=DIR, then name DIR')
  if not p.exists():
    if epath.Path(absolute(path) + '.index').is_file():
      raise CheckpointError(f'{name} is a TensorFlow checkpoint, not a run of this project: '
                            f'{convert}')
    raise CheckpointError(f'{name}: no such file or directory')
  if not p.is_dir():
    raise CheckpointError(f'{name} is a file, not a run of this project (a workdir, its '
                          f'checkpoints or a step folder): to start from published weights, '
                          f'{convert}')
  if (p / 'model').is_dir():
    return p / 'model'
  if p.name == 'best' and (p.parent / 'best.json').is_file():
    return p
  if (p / 'checkpoints').is_dir():
    p = p / 'checkpoints'
  steps = [int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / 'model').is_dir()]
  if not steps:
    raise CheckpointError(f'{name}: no checkpoint found (expected a workdir, '
                          'its checkpoints/ folder or a step folder holding model/)')
  return p / str(max(steps)) / 'model'


def _run_config_path(path: str) -> epath.Path | None:
  """The `config.json` of the run that `init_from=path` names (workdir, checkpoints, step)."""
  p = epath.Path(os.path.expanduser(path))
  for d in (p, p.parent, p.parent.parent):
    if (d / 'config.json').is_file() and (d / 'checkpoints').is_dir():
      return d / 'config.json'
  return None


def init_source(init_from: str) -> dict[str, Any]:
  """What `init_from` names, checked as a starting point (see the module docstring).

  Returns `{'item': the model item folder, 'checkpoint': the step folder or `best/`
  holding it, 'step': its step (None if unknown), 'trainer': the trainer of the run
  holding it (None without its config.json)}`.

  Raises:
    CheckpointError: `init_from` is the workdir (or checkpoints folder) of a run
      trained on labels, or names no checkpoint.
  """
  named = epath.Path(absolute(init_from))
  item = find_model_item(init_from)
  explicit = (named / 'model').is_dir() or item == named  # a step folder, or best/
  step = int(item.parent.name) if item.parent.name.isdigit() else None
  if item.name == 'best':
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
      step = int(json.loads((item.parent / 'best.json').read_text())['step'])
  config_path = _run_config_path(os.fspath(named))
  run = None
  if config_path is not None:
    with contextlib.suppress(OSError, ValueError):
      run = json.loads(config_path.read_text())
  trainer = run.get('trainer') if isinstance(run, dict) else None
  trainer = trainer if isinstance(trainer, str) else None
  if trainer in SUPERVISED_TRAINERS and not explicit:
    data = run.get('data') if isinstance(run.get('data'), dict) else {}
    raise CheckpointError(
        f'init_from={init_from!r} is a {trainer} run (trained on the labels of '
        f'{run.get("dataset")!r}, label fraction {data.get("label_fraction", "?")}), not '
        f'a pretraining run: to start from it, name its selected model '
        f'(init_from={os.path.join(os.fspath(config_path.parent), "best")!r}) or a step '
        'folder of its checkpoints')
  if (trainer == 'pretrain' and not explicit
      and not (config_path.parent / 'results.json').is_file()):
    logging.warning('init_from=%r is a pretraining run without results.json (unfinished?): '
                    'starting from its newest checkpoint, step %s', init_from, step)
  checkpoint = item if item.name == 'best' else item.parent
  return {'item': item, 'checkpoint': checkpoint, 'step': step, 'trainer': trainer}


def init_name(init_from: str) -> str:
  """The name reports give an initialisation loaded from `init_from`: its run's workdir.

  A step or `checkpoints` folder names the workdir holding it. A sweep's seed (a
  workdir named `seed=0` or `seed=1,lr=0.3`, as `launch/sweep.py` names them) is left
  out, and the folder above names the run instead (`micle/seed=0` -> `micle`,
  `micle/seed=1,lr=0.3` -> `micle/lr=0.3`), so the seeds of one method pool together.
  """
  p = epath.Path(os.path.normpath(os.path.expanduser(init_from)))
  config_path = _run_config_path(os.fspath(p))
  if config_path is not None:
    p = config_path.parent
  else:
    if p.name.isdigit() and p.parent.name == 'checkpoints':
      p = p.parent
    if p.name == 'checkpoints':
      p = p.parent
  parts = p.name.split(',')
  rest = [part for part in parts if not re.fullmatch(r'seed=\d+', part.strip())]
  if len(rest) == len(parts):
    return p.name
  return '/'.join([p.parent.name] + ([','.join(rest)] if rest else []))


def pretrain_seed(init_from: str) -> int | None:
  """The seed of the pretraining run `init_from` names; None for any other source.

  Reports pool fine-tuning runs by it (several pretraining runs of one method).
  """
  config_path = _run_config_path(os.path.normpath(init_from))
  if config_path is None:
    return None
  try:
    found = json.loads(config_path.read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(found, dict) or found.get('trainer') != 'pretrain':
    return None
  seed = found.get('seed')
  return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def recorded_pretrain_seed(initialised_from: dict[str, Any] | None, init_from: str
                           ) -> int | None:
  """The pretraining seed of a run's source as recorded at its first start (`INIT_FILE`),
  so that moving or reusing the source later changes nothing; for a record written
  before the seed was kept, read from `init_from` now."""
  if isinstance(initialised_from, dict) and 'pretrain_seed' in initialised_from:
    return initialised_from['pretrain_seed']
  return pretrain_seed(init_from) if init_from else None


def check_encoder_architecture(init_from: str, model_config: Any) -> None:
  """Fails when the run at `init_from` had an encoder other than `model_config` describes.

  Reads `config.json` beside the checkpoints (absent: nothing to compare, the shapes
  are still checked when loading) and compares `models.encoder_architecture` of both.
  """
  config_path = _run_config_path(init_from)
  if config_path is None:
    return
  try:
    run_config = json.loads(config_path.read_text())
  except (ValueError, OSError) as e:
    raise CheckpointError(f'init_from={init_from!r}: cannot read {config_path}: '
                          f'{first_line(e)}') from e
  theirs = run_config.get('model') if isinstance(run_config, dict) else None
  if not isinstance(theirs, dict):
    return
  source = run_config.get('source')
  if (run_config.get('trainer') == 'imported' and isinstance(source, dict)
      and source.get('format') == 'torchvision' and 'input_normalization' not in theirs):
    raise CheckpointError(f'init_from={init_from!r} was imported from {source.get("checkpoint")} '
                          'by an earlier bigssl_med.convert, without torchvision\'s input '
                          'standardisation and shortcuts: import it again into a new workdir')
  try:
    theirs = models.encoder_architecture(theirs)
  except KeyError as e:
    raise CheckpointError(f'init_from={init_from!r}: {config_path} "model" lacks {e}') from None
  ours = models.encoder_architecture(model_config)
  for key, there in theirs.items():
    if there != (here := ours[key]):
      raise CheckpointError(
          f'init_from={init_from!r} has an encoder with config.model.{key}={there!r} '
          f'({config_path}), this run has {here!r}: set --config.model.{key}={there}')


def load_model_variables(path: str, sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Loads `{'params', 'batch_stats'}` of the newest checkpoint at `path`, placed on `sharding`."""
  return restore_model_item(find_model_item(path), sharding)


def restore_model_item(item: epath.Path | str, sharding: jax.sharding.Sharding
                       ) -> dict[str, Any]:
  """The arrays of one saved model item (`.../model`, or a run's `best/`), on `sharding`."""
  item = epath.Path(absolute(os.fspath(item)))  # orbax refuses relative paths
  # The item's own handler: a Checkpointer would also look for the step's metadata file,
  # which a CheckpointManager keeps one folder up, and log its absence.
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(item)
    tree = getattr(metadata, 'item_metadata', metadata)
    tree = getattr(tree, 'tree', tree)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          tree)
    with quiet_failed_reads():
      return handler.restore(item, args=ocp.args.StandardRestore(target))
  except Exception as e:  # pylint: disable=broad-except  (orbax raises bare Exceptions too)
    raise CheckpointError(f'{item}: cannot read the checkpoint{_damaged(e)}: '
                          f'{first_line(e)}') from e
  finally:
    handler.close()


def merge_pretrained(variables: dict[str, Any], loaded: dict[str, Any], *, keys: tuple[str, ...],
                     source: str, partial: tuple[str, ...] = ()) -> dict[str, Any]:
  """Replaces the top-level modules `keys` (e.g. 'encoder', 'head') of `variables`.

  Every loaded array must match the model's shape; otherwise a `CheckpointError` names
  the first parameter that differs (the checkpoint is of another architecture). The
  modules in `partial` may hold more in the checkpoint than in the model (the first
  layers of a projection head, kept for fine-tuning); only the model's part is taken.
  """
  out = {c: dict(variables.get(c, {})) for c in variables}
  for collection in ('params', 'batch_stats'):
    for key in keys:
      if key not in variables.get(collection, {}):
        continue
      if key not in loaded.get(collection, {}):
        raise CheckpointError(
            f'init_from={source!r} has no {collection}/{key}' + (
                ': it holds an encoder alone (an imported model?); start a fresh head with '
                'config.init_head=False (pretrain) or config.head_layers_kept=0 (finetune)'
                if key == 'head' else ': is it a checkpoint of this kind of model?'))
      taken = loaded[collection][key]
      if key in partial:
        taken = _common_part(variables[collection][key], taken)
      check_same_structure(variables[collection][key], taken, f'{collection}/{key}',
                           f'init_from={source!r}',
                           **({'why': _SHORTER_HEAD} if key == 'head' and _is_first_part(
                               taken, variables[collection][key]) else {}))
      out[collection][key] = jax.tree.map(lambda new, old: new.astype(old.dtype),
                                          taken, variables[collection][key])
  return out


_SHORTER_HEAD = ('its projection head has only the first layers of this model\'s (a '
                 'fine-tuned model keeps config.head_layers_kept of them); start a fresh head '
                 'with config.init_head=False (pretrain), or keep as many layers with '
                 'config.head_layers_kept (finetune)')


def _is_first_part(got: Any, expected: Any) -> bool:
  """Whether the arrays of `got` are some of `expected`'s, in its shapes, and fewer."""
  have = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
  want = {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
  return len(have) < len(want) and all(
      name in want and tuple(want[name]) == tuple(shape) for name, shape in have.items())


def _common_part(expected: Any, got: Any) -> Any:
  """`got` restricted to the keys of the nested dict `expected` (missing keys stay out)."""
  if not isinstance(expected, dict) or not isinstance(got, dict):
    return got
  return {k: _common_part(v, got[k]) for k, v in expected.items() if k in got}


def check_same_structure(expected: Any, got: Any, prefix: str, source: str,
                         why: str = 'it was trained with another architecture (config.model)'
                         ) -> None:
  """Fails with the first array of `expected` that `got` lacks, has extra or in another shape.

  The error names `source` (e.g. "init_from='...'"), the array and `why`.
  """
  want = {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
  have = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
  for name, shape in want.items():
    if name not in have:
      raise CheckpointError(f'{source} lacks {prefix}{name} that this model has: {why}')
    if tuple(have[name]) != tuple(shape):
      raise CheckpointError(f'{source}: {prefix}{name} has shape {tuple(have[name])}, this model '
                            f'expects {tuple(shape)}: {why}')
  extra = sorted(set(have) - set(want))
  if extra:
    raise CheckpointError(f'{source} has {prefix}{extra[0]} that this model lacks: {why}')


INIT_FILE = 'initialised_from.json'


def recorded_init(workdir: str, init_from: str) -> dict[str, Any] | None:
  """What the run in `workdir` was initialised from, as its `INIT_FILE` records it.

  `{'init_from': config.init_from as given, 'checkpoint': the step folder or `best/`
  loaded, 'step': its step}`, or None for random weights. In a workdir written before
  the record existed, a run with `init_from` gets its checkpoint and step as None
  (unknown), with a warning; so does one whose record was deleted. A record that
  cannot be read is a `WorkdirError` (`workdir.read_record`).
  """
  recorded = workdir_lib.read_record(
      os.path.join(workdir, INIT_FILE), 'restore it, or delete it to go on with the '
      'checkpoint and step this run started from recorded as unknown', null_ok=True)
  if recorded is not None:
    return recorded
  if not init_from:
    return None
  logging.warning('%s: no %s (deleted, or the run was started by an earlier version): the '
                  'checkpoint and step of init_from=%r this run started from are unknown',
                  workdir, INIT_FILE, init_from)
  return {'init_from': init_from, 'checkpoint': None, 'step': None}


def restore_or_initialize(checkpointer: Checkpointer, *, init_fn: Callable[[], tuple[Any, Any]],
                          abstract_model: Any, abstract_opt: Any, init_from: str,
                          init_keys: tuple[str, ...], model_sharding: jax.sharding.Sharding,
                          finalize_opt: Callable[[Any], Any],
                          partial_keys: tuple[str, ...] = (),
                          model_config: Any = None
                          ) -> tuple[Any, Any, bytes | None, str, dict[str, Any] | None]:
  """Starting point of a run, in the one priority order of this module's docstring.

  Args:
    checkpointer: this run's checkpointer.
    init_fn: returns freshly initialised `(model_variables, opt)`.
    abstract_model, abstract_opt: shape/sharding targets for a restore.
    init_from: `config.init_from` ('' for none).
    init_keys: top-level modules taken from `init_from` (e.g. ('encoder', 'head')).
    model_sharding: where loaded arrays go.
    finalize_opt: rebuilds the optimiser state for model variables loaded from
      `init_from` (fresh state for the loaded parameters).
    partial_keys: modules of `init_keys` that may be larger in the checkpoint
      (see `merge_pretrained`).
    model_config: this run's `config.model`, checked against the encoder of the run
      at `init_from` (`check_encoder_architecture`); None skips that check.

  Returns:
    `(model_variables, opt, data_state, origin, initialised_from)`; origin says which
    case applied, in words; initialised_from is what the run was first initialised
    from (`recorded_init`), written to the workdir's `INIT_FILE` when not resumed.
  """
  workdir = os.fspath(checkpointer.directory.parent)
  step = checkpointer.latest_step()
  if step is not None:
    model, opt, data_state = checkpointer.restore(step, model=abstract_model, opt=abstract_opt)
    return (model, opt, data_state, f'resumed from {checkpointer.directory / str(step)}',
            recorded_init(workdir, init_from))
  model, opt = init_fn()
  record = None
  if init_from:
    source = init_source(init_from)
    if model_config is not None and 'encoder' in init_keys:
      check_encoder_architecture(init_from, model_config)
    loaded = restore_model_item(source['item'], model_sharding)
    model = merge_pretrained(model, loaded, keys=init_keys, source=init_from,
                             partial=partial_keys)
    opt = finalize_opt(model)
    at = '' if source['step'] is None else f' (step {source["step"]})'
    logging.info('Initialised %s from %s%s', '+'.join(init_keys), init_from, at)
    origin = f'initialised {"+".join(init_keys)} from {init_from}{at}'
    record = {'init_from': init_from, 'checkpoint': os.fspath(source['checkpoint']),
              'step': source['step'], 'pretrain_seed': pretrain_seed(init_from)}
  else:
    origin = 'initialised from scratch'
  workdir_lib.write_json(os.path.join(workdir, INIT_FILE), record)  # before any checkpoint
  return model, opt, None, origin, record
