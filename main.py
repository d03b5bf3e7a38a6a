"""Runs one stage of training: `python main.py --config=configs/NAME.py --workdir=DIR`.

Parses flags, starts multi-host JAX when several hosts run, and hands the config to
the trainer that `config.trainer` names. A workdir that holds a checkpoint resumes.
One run at a time uses a workdir: a second one ends with a one-line error at once.
Bad input (a data set, a config key, a checkpoint) ends with a one-line error and
exit status 2; a SIGTERM saves a checkpoint and exits with status 143; a Ctrl-C
(SIGINT) stops at once with a one-line error naming the step reached and the
checkpoint a rerun resumes from, and exit status 130.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/NAME.py[:arg]); override keys with --config.KEY=VALUE.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0, for multi-host runs outside TPU VMs, '
    'SLURM or MPI (where it is detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process\'s index.')
flags.mark_flags_as_required(['config', 'workdir'])


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError)


def _override_naming(key: str, argv) -> str:
  """The dotted path of the first `--config.PATH` override of `argv` that names `key`."""
  for arg in argv:
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].split('=', 1)[0]
      if key in path.split('.'):
        return path
  return ''


def _unknown_key(lines: list[str], argv) -> str:
  """One line for ml_collections' unknown key: the override that named it, where the key
  belongs when it is another trainer's, and ml_collections' suggestion."""
  key = lines[0].strip('\'"')
  path = _override_naming(key, argv)
  named = f' in --config.{path}' if path and path != key else ''
  others = ''
  if path:
    from bigssl_med import config_schema  # pylint: disable=g-import-not-at-top
    owners = config_schema.trainers_with_key(path)
    if len(owners) == 1:
      others = f'; {path} is a key of the {owners[0]} trainer\'s config, not this one'
    elif owners:
      names = f'{", ".join(owners[:-1])} and {owners[-1]}'
      others = f'; {path} is a key of the {names} trainers\' configs, not this one'
  hint = f' ({" ".join(lines[1:])})' if lines[1:] else ''
  return (f'no config key {lines[0]}{named}{hint}; the config is locked: keys cannot be '
          f'added{others}')


def _flag_error(error: BaseException, argv=()) -> str:
  """One line for an error of absl's or ml_collections' flag parsing or config loading."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(..))
    error = error.args[0]
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not line.strip().startswith('Pass --help')]
  if isinstance(error, KeyError):  # ml_collections: an unknown key, maybe a suggestion
    return _unknown_key(lines, argv)
  if any(line.startswith('Traceback') for line in lines):  # a config file's get_config failed
    return f'{lines[0].split("Traceback")[0].strip()} {lines[-1]}'
  errno = [line for line in lines if '[Errno' in line]
  return f'--config: {errno[-1]}' if errno else ' '.join(lines)


def _parse_flags(argv):
  """absl's flag parsing, with a bad --config (file, argument, key or value) a one-line error.

  ml_collections reports an unknown `--config.KEY` or a config file's failure as an
  exception from inside the parser; it ends here as `error: ...` and exit status 2.
  """
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    _exit_with_flag_error(e, argv)


def _exit_with_flag_error(error: BaseException, argv=None):
  print(f'error: {_flag_error(error, sys.argv if argv is None else argv)}', file=sys.stderr)
  sys.exit(2)


def run(config, workdir: str):
  """Runs `config.trainer` in `workdir`, holding the workdir's lock; returns its results.

  The config is validated before the workdir is made or locked; another run holding
  the lock (`bigssl_med.workdir.locked`) is a `WorkdirInUse` error before anything is
  written.
  """
  from bigssl_med import config_schema  # pylint: disable=g-import-not-at-top
  from bigssl_med import trainers  # pylint: disable=g-import-not-at-top
  from bigssl_med import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from bigssl_med.errors import UserError  # pylint: disable=g-import-not-at-top
  if config.get('trainer') not in trainers.TRAINERS:
    raise UserError(f'config.trainer={config.get("trainer")!r} is not one of '
                    f'{sorted(trainers.TRAINERS)}')
  config_schema.validate(config)
  with workdir_lib.locked(workdir):
    return trainers.TRAINERS[config.trainer](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # Imported here so that `--help` and flag errors are fast.
  from bigssl_med import cli  # pylint: disable=g-import-not-at-top
  if logging.get_verbosity() <= logging.INFO:  # --verbosity=1 shows every library's INFO
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
  from bigssl_med import parallel  # pylint: disable=g-import-not-at-top
  from bigssl_med.errors import UserError  # pylint: disable=g-import-not-at-top
  from bigssl_med.preemption import Preempted  # pylint: disable=g-import-not-at-top

  try:
    config = _CONFIG.value
    config.get('trainer')  # a config file that failed to load raises here
  except _FLAG_ERRORS as e:
    _exit_with_flag_error(e)
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    results = run(config, _WORKDIR.value)
  except Preempted as e:
    logging.warning('%s', e)
    sys.exit(143)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    cli.silence_after_error()
    sys.exit(2)
  except KeyboardInterrupt as e:
    print(f'error: {_interrupted(e)}', file=sys.stderr)
    cli.silence_after_error()
    sys.exit(130)
  finally:  # before any exit, so that Python's resource tracker has nothing to report
    from bigssl_med.data import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.finish_shared_memory_releases()
  logging.info('Results: %s', results)


def _interrupted(error: KeyboardInterrupt) -> str:
  """One line for a Ctrl-C: the step reached and the checkpoint a rerun resumes from,
  once the checkpoint saves in flight have completed (`checkpointing.finish_saves`)."""
  from bigssl_med import checkpointing  # pylint: disable=g-import-not-at-top
  std_logging.disable(std_logging.CRITICAL)  # orbax's log of a save a second Ctrl-C stops
  saved = checkpointing.finish_saves()
  step = getattr(error, 'step', None)
  where = f'interrupted at step {step}' if step is not None else 'interrupted'
  if not saved:
    return f'{where}; rerun the command to resume from its last checkpoint, if any'
  folder, last = saved[-1]
  if last is None:
    return f'{where}; no checkpoint in {folder} yet: rerun the command to start again'
  return (f'{where}; rerun the command to resume from the last checkpoint (step {last}, '
          f'in {folder})')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
