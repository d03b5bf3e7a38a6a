"""Several runs in one workdir, in order (`config.trainer = 'stages'`).

A config with `trainer='stages'` holds whole stage configs under `stages.NAME`
(each with its own `trainer`: pretrain, finetune, linear_eval, distill, segment)
and runs them in the order of `order`, each in `WORKDIR/NAME`. A stage's
`init_from` or `teacher` written `@NAME` is the workdir of the earlier stage NAME,
so one command can pretrain, fine-tune from the pretrained encoder and distil.
With `report`, `python -m bigssl_med.report` is then run over the stages that
evaluate a task, into `WORKDIR/report.md` (+ CSV and plots).

Every stage resumes or, when finished, returns its results, so running the
command again continues where it stopped. `WORKDIR/stages.json` lists each
stage's results and the report.

A stage that takes in an earlier one (`@NAME`) records what it took in, before it
first runs: `WORKDIR/STAGE/stage_inputs.json` holds the digest of the earlier
stage's results (`workdir.digest`) and the workdir's location. When the earlier
stage has changed since (e.g. pretraining continued for more steps) while the later
one has started (checkpoints or results), a rerun stops with a one-line error rather
than present results that came from the earlier stage as it was. A workdir moved or
copied elsewhere reruns: a stage's recorded `@NAME` path under the old location is
rewritten (in its `config.json`) to the same stage's folder under the new one.
"""

import logging
import os
from typing import Any

import jax
import ml_collections

from bigssl_med import config_schema
from bigssl_med import parallel
from bigssl_med import report as report_lib
from bigssl_med import workdir as workdir_lib
from bigssl_med.errors import ConfigError

REFERENCE_KEYS = ('init_from', 'teacher')
REPORTED_TRAINERS = ('finetune', 'linear_eval', 'distill', 'segment')
INPUTS_FILE = 'stage_inputs.json'


def references(config: ml_collections.ConfigDict) -> dict[str, dict[str, str]]:
  """`{stage: {key: earlier stage}}` of the `@NAME` references of `config`'s stages."""
  found = {}
  for name in config.order:
    for key in REFERENCE_KEYS:
      value = config.stages[name].get(key)
      if isinstance(value, str) and value.startswith('@'):
        found.setdefault(name, {})[key] = value[1:]
  return found


def resolve_references(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, ml_collections.ConfigDict]:
  """Each stage's config with `@NAME` references replaced by earlier stages' workdirs
  (absolute: a rerun from another current directory names the same folders)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  refs = references(config)
  resolved, done = {}, []
  for name in config.order:
    stage = ml_collections.ConfigDict(config.stages[name].to_dict())
    for key, target in refs.get(name, {}).items():
      if target not in done:
        raise ConfigError(f'config.stages.{name}.{key}={"@" + target!r} does not name an '
                          f'earlier stage (earlier: {done or "none"})')
      stage[key] = os.path.join(workdir, target)
    resolved[name] = stage
    done.append(name)
  return resolved


def _started(stage_dir: str) -> bool:
  """Whether the run in `stage_dir` has trained: it has results or a checkpoint."""
  if os.path.exists(os.path.join(stage_dir, 'results.json')):
    return True
  try:
    return bool(os.listdir(os.path.join(stage_dir, 'checkpoints')))
  except OSError:
    return False


def _same_reference(recorded: str, target: str, old_workdir: Any) -> bool:
  """Whether `recorded`, a stage's `@target` resolved when its workdir was elsewhere,
  names stage `target` of that workdir: `old_workdir/target` (as `INPUTS_FILE` says),
  or, where no record says where the workdir was (written before there was one) or the
  path is relative (to a current directory unknown now), a folder named `target`."""
  recorded = os.path.normpath(recorded)
  if isinstance(old_workdir, str) and os.path.isabs(recorded):
    return recorded == os.path.join(os.path.normpath(old_workdir), target)
  return os.path.basename(recorded) == target  # relative: as the current directory was


def _follow_move(stage_dir: str, stage: ml_collections.ConfigDict, refs: dict[str, str],
                 old_workdir: Any) -> None:
  """Rewrites the `@NAME` paths in `stage_dir/config.json` that name the earlier stages
  under the workdir's old location (it was moved or copied) to their folders now, so
  the run there compares as the same run. Other values are left to the trainer."""
  path = os.path.join(stage_dir, workdir_lib.CONFIG_FILE)
  saved = workdir_lib.read_config(stage_dir)
  if saved is None:  # the stage's trainer says what that means
    return
  moved = {}
  for key, target in refs.items():
    recorded = saved.get(key)
    if (isinstance(recorded, str) and recorded and recorded != stage[key]
        and _same_reference(recorded, target, old_workdir)):
      moved[key] = stage[key]
  if moved:
    logging.info('%s: the workdir moved; %s', path, ', '.join(
        f'{key} {saved[key]!r} is now {value!r}' for key, value in moved.items()))
    workdir_lib.write_json(path, {**saved, **moved})


def check_inputs(name: str, stage: ml_collections.ConfigDict, stage_dir: str,
                 refs: dict[str, str], results: dict[str, Any], workdir: str) -> None:
  """Records what stage `name` takes in from earlier stages (`INPUTS_FILE`), or, when it
  has started on earlier stages that changed since, fails; follows a moved workdir.

  Args:
    name: the stage.
    stage: its config, `@NAME` resolved.
    stage_dir: its workdir.
    refs: `{key: earlier stage}` of its `@NAME` references.
    results: the earlier stages' results, by name.
    workdir: the stages' workdir.

  Raises:
    ConfigError: the stage has started (`_started`) from an earlier stage whose results
      differ from those recorded; nothing is written then.
    WorkdirError: `INPUTS_FILE` cannot be read (`workdir.read_record`); nothing is
      written then.
  """
  path = os.path.join(stage_dir, INPUTS_FILE)
  record = workdir_lib.read_record(
      path, f'restore it, delete it to accept stage {name}\'s results as they are, from '
      f'the earlier stages as they are now, or remove {stage_dir} to redo stage {name}',
      keys=('inputs',)) or {}
  was = record.get('inputs') if isinstance(record.get('inputs'), dict) else {}
  now = {key: {'stage': target, 'results_sha256': workdir_lib.digest(results[target])}
         for key, target in refs.items()}
  changed = [now[key]['stage'] for key in refs if isinstance(was.get(key), dict)
             and was[key].get('stage') == now[key]['stage'] and was[key] != now[key]]
  other = any(isinstance(was.get(key), dict) and was[key].get('stage') != now[key]['stage']
              for key in refs)
  started = _started(stage_dir)
  stale = bool(changed) and started
  if not stale:
    if started:
      _follow_move(stage_dir, stage, refs, record.get('workdir'))
    if not (started and other):  # another stage named than before: the trainer says so
      workdir_lib.write_json(path, {'workdir': os.path.abspath(os.path.expanduser(workdir)),
                                    'inputs': now})
  # Process 0 decides (its results are the ones written); every host waits for its writes.
  if parallel.primary_value(int(stale)):
    earlier = ', '.join(changed) or ', '.join(sorted(set(refs.values())))
    raise ConfigError(
        f'stage {name} ({stage_dir}) started from stage {earlier} as it was before, and stage '
        f'{earlier} has changed since (its results differ from those {path} records): remove '
        f'{stage_dir} to redo stage {name} from stage {earlier} as it is now, or use a new '
        'workdir')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage of `config` in `workdir`; returns their results."""
  from bigssl_med import trainers  # pylint: disable=g-import-not-at-top (imports this module)
  config_schema.validate(config)
  stages = resolve_references(config, workdir)
  refs = references(config)
  workdir_lib.start(workdir, config)
  results: dict[str, Any] = {'trainer': 'stages', 'stages': {}}
  for name, stage in stages.items():
    stage_dir = os.path.join(workdir, name)
    logging.info('Stage %s (%s) in %s', name, stage.trainer, stage_dir)
    with workdir_lib.locked(stage_dir):  # a run on the stage folder itself is refused
      if name in refs:
        check_inputs(name, stage, stage_dir, refs[name], results['stages'], workdir)
      results['stages'][name] = trainers.TRAINERS[stage.trainer](stage, stage_dir)
  workdir_lib.write_config(workdir, config)  # every stage accepted this config
  reported = [os.path.join(workdir, name) for name, stage in stages.items()
              if stage.trainer in REPORTED_TRAINERS]
  if config.report and reported:
    out = os.path.join(os.path.abspath(workdir), 'report.md')
    # Process 0 writes the report; every host learns whether it succeeded.
    primary = jax.process_index() == 0
    status = parallel.primary_value(report_lib.main(reported + ['--out', out]) if primary else 0)
    if status != 0:
      raise ConfigError(f'the report of {workdir} failed (see the error above'
                        f'{"" if primary else " in the log of process 0"})')
    results['report'] = out
    if primary:
      with open(out) as f:
        logging.info('Report %s:\n%s', out, f.read())
  workdir_lib.write_json(os.path.join(workdir, 'stages.json'), results)
  return results
