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


def resolve_references(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, ml_collections.ConfigDict]:
  """Each stage's config with `@NAME` references replaced by earlier stages' workdirs."""
  resolved, done = {}, []
  for name in config.order:
    stage = ml_collections.ConfigDict(config.stages[name].to_dict())
    for key in REFERENCE_KEYS:
      value = stage.get(key)
      if isinstance(value, str) and value.startswith('@'):
        target = value[1:]
        if target not in done:
          raise ConfigError(f'config.stages.{name}.{key}={value!r} does not name an earlier '
                            f'stage (earlier: {done or "none"})')
        stage[key] = os.path.join(workdir, target)
    resolved[name] = stage
    done.append(name)
  return resolved


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage of `config` in `workdir`; returns their results."""
  from bigssl_med import trainers  # pylint: disable=g-import-not-at-top (imports this module)
  config_schema.validate(config)
  stages = resolve_references(config, workdir)
  workdir_lib.start(workdir, config)
  results: dict[str, Any] = {'trainer': 'stages', 'stages': {}}
  for name, stage in stages.items():
    logging.info('Stage %s (%s) in %s', name, stage.trainer, os.path.join(workdir, name))
    results['stages'][name] = trainers.TRAINERS[stage.trainer](stage, os.path.join(workdir, name))
  workdir_lib.write_config(workdir, config)  # every stage accepted this config
  reported = [os.path.join(workdir, name) for name, stage in stages.items()
              if stage.trainer in REPORTED_TRAINERS]
  if config.report and reported:
    out = os.path.join(workdir, 'report.md')
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
