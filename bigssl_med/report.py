"""Report of fine-tuning runs: label efficiency of each initialisation, over seeds.

    python -m bigssl_med.report DIR [DIR ...] --out report.md [--metric NAME] [--split test] \
        [--by_pretraining] [--test welch|student] [--reference ROW]

Each DIR is a run's workdir, a folder searched recursively for `results.json`, or a
`results.json` itself. A run's `results.json` holds

    {"trainer": "finetune", "dataset": "ham10000", "init": "micle",
     "label_fraction": 0.1, "seed": 0, "primary_metric": "top1",
     "pretrain_seed": 1,
     "validation": {"top1": 0.8, ...}, "test": {"top1": 0.79, ...},
     "shift": {"dataset": "derm7pt", "split": "test", "label_names": ["melanoma", ...],
               "metrics": {"top1": 0.6, ...}}}

(`init` names the starting weights: scratch, supervised, simclr, micle or any string;
`label_fraction` is in (0, 1]; `pretrain_seed`, the seed of the pretraining run the
weights come from, and `shift`, the best model evaluated on another data set, are
optional; `shift.label_names` lists the shifted data set's labels its metrics are over,
the ones the label mapping reaches, and older files without it are read through
`shift.label_map`). Files without `trainer`, or from the `pretrain` trainer, are
skipped. Beside it, `test_predictions.npz` (`<split>_predictions.npz`) may hold `scores` `[N, K]`
probabilities (and `log_scores`, their logarithms, which the curves then rank), `labels`
(`[N]` classes or `[N, K]` multi-label targets), optionally
`mask` `[N, K]` and `class_names`, for ROC curves, and `image_id` and `case_id` `[N]`
(strings naming each row's record; files written before them lack them, and the
report does not need them), or `unit_id` for rows of studies or cases.

Runs evaluated by another protocol (results.json `views`: frontal or lateral images
only; `eval_unit`: metrics per study or case, combined by `eval_reduce`) are another
data set to the report, named with it: `chexpert (frontal; per study, max)`. Their
figures are not comparable with per-image ones on every image, so they never share a
table.

Runs of one initialisation that differ in a setting (the workdir's `config.json`: a
key such as `task.uncertain` or `optimizer.learning_rate` that takes two values among
the runs of one label fraction; seeds, paths and logging keys aside) get a row each,
`init (key=value, ...)`. A run is identified by data set, trainer, initialisation,
those settings, label fraction, seed, fraction_seed and pretrain_seed: fine-tuning
seed k from pretraining runs 0, 1 and 2 of one initialisation are three runs, pooled
in one cell (n, the mean and the std are over all of them; their seeds read `p0/sk`,
`p1/sk`, `p2/sk`). Such runs are not independent: the t-test of a cell with runs from
two or more pretraining runs takes the per-pretraining-run means (each over its
fine-tuning seeds) as its units, shown as `(n=9 from 3 pretraining runs)`; a cell from
one pretraining run, or from none (scratch), takes its runs, so the comparison of a
cell from one pretrained model is conditional on that model.
With `--by_pretraining`, each pretraining run gets its own row, `init (pretraining
seed S)` (runs without a pretraining seed, such as scratch, keep one row).
Settings that differ from one label fraction to another within a row, or between the
rows of a table (besides the initialisation and the settings in the row labels), are
not refused: notes under the table name them with their values, e.g. `scratch:
model.depth 18 (10%), 34 (100%)` and `model.depth: scratch 34; pre_nih 18`, the run
length and evaluation schedule (epochs, steps, warm-up, evaluation intervals) grouped
apart, as they usually change with the label fraction on purpose.

Written next to `--out`:
- `report.md`, titled by the trainer of its runs (`Fine-tuning results`, `Linear
  evaluation results`, `Distillation results`, `Segmentation results`; `Results` when
  mixed): per data set and metric (`--metric`, or each run's `primary_metric`),
  a table of initialisations x label fractions; a cell is mean ± std over runs, the
  column's best in bold, the others with Welch's t-test p-value against it, over the
  units above (`--test student`: Student's two-sample t-test, pooled variance). The
  best is chosen after seeing the data, so where a column makes two or more such
  comparisons each also gets its p adjusted by Holm's step-down method over them
  (`p=0.028, Holm p=0.056`), and `≈` marks an adjusted p > 0.05 (not significantly
  different; no claim of equivalence). `--reference ROW` (`scratch`) compares every
  row with that row instead, in the columns that have it (the others: with the best,
  said in the legend; a ROW in no table is an error); the best stays bold. Null
  values (an undefined AUC) are left out of the statistics and counted in the cell; `†`
  marks a mean over fewer classes than asked (`<metric>_classes` <
  `<metric>_of_classes`). Runs with `shift` add, right after the column of each label
  fraction, a column `FRACTION → SHIFT_DATASET` (`/SPLIT` unless the split is `test`)
  `(over LABELS)` of the metric on the shifted data set, over the labels the mapping
  reaches only (`LABELS` names them, or counts them when the names are long; runs
  whose mappings reach other labels get columns of their own), with its own best and
  p-values (test reports only: the shift is evaluated once, with the test split). When an
  initialisation has runs from two or more pretraining runs, a section "Spread
  between pretraining runs" puts, per column, the std of the per-pretraining-run
  means next to each initialisation's pooled mean minus the column's best, so a
  difference between methods can be set against the spread between pretraining
  runs of one. A column header gives the labelled cases and images the runs trained
  on, `10% (22 cases, 47 images)`, where every run's results.json records them
  (`labelled_cases`, `labelled_images`) and they agree. The notes under a table say
  that linear evaluation's `scratch` is a frozen random encoder, and, where the runs
  of a cell below 100% share one `fraction_seed`, that its std covers training seeds
  on one draw of the labelled cases;
- `report.csv`: one row per data set, metric, row, label fraction and evaluation
  (`evaluated_on`: the data set the metric was measured on, with `split`; a shifted
  evaluation has `shifted` True and in `shift_labels` the labels its metric is over,
  `;`-separated; `n_units` and `unit`, `run` or `pretraining run`: what the p-value
  compares; `p_value_vs_best`, the raw p, and `p_holm`, the adjusted one, against the
  row `compared_with`; `equivalent_to_best` by `p_holm`);
- `report_pretraining_spread.csv`: that section's rows, when it is written;
- `report_label_efficiency_<dataset>.png`: the metric against the label fraction
  (shifted evaluations dashed), mean ± SD over runs, each point with its n (a cell of
  one run hollow, without a bar);
- `report_roc_<dataset>.png`: ROC curves of each initialisation's first seed at its
  largest label fraction with predictions.
A data set with runs of several trainers gets rows `init (trainer)`. Runs whose split
metrics are `{}` (the data set has no such split) are left out with a warning.
Workdirs with a config.json but no results.json (unfinished or failed runs) are left
out too: the header of report.md counts them (`12 finished runs; 7 left out ...`), and
its last section lists each with its trainer, data set, init, label fraction and seed
from its config.json, and names the columns that have left-out runs but no finished
one. Bad
input (no runs, a malformed results.json) is a one-line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import logging
import math
import os
import re
import sys
from typing import Any, Iterable, Sequence
import warnings
import zipfile

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

from bigssl_med import cli
from bigssl_med import config_schema
from bigssl_med import files
from bigssl_med import metrics as metrics_lib
from bigssl_med.errors import DataError, UserError

RESULTS_FILE = 'results.json'
CONFIG_FILE = 'config.json'
# Config keys that never make two runs of one initialisation different settings, beside
# bookkeeping (`config_schema.is_bookkeeping`): seeds and the runs they start from (their
# own columns and pooling), and `shift.*` (an evaluation on another data set, in columns
# of its own).
NOT_SETTINGS = frozenset(('seed', 'init', 'init_from', 'teacher', 'data.label_fraction',
                          'data.fraction_seed'))
ABSENT_SETTING = '(absent)'
REQUIRED_KEYS = ('dataset', 'init', 'label_fraction', 'seed', 'primary_metric')
# Workdirs without results of a labelled task: pretraining runs, and models imported by
# `bigssl_med.convert` (kept beside the runs they start).
SKIPPED_TRAINERS = ('pretrain', 'imported')
# Rows come in this order, then any other initialisation alphabetically.
INIT_ORDER = ('scratch', 'supervised', 'simclr', 'micle')
ALPHA = 0.05
EQUIVALENT = '≈'
FEWER_CLASSES = '†'
MISSING = '—'
MAX_ROC_PANELS = 5
MICRO_AVERAGED = 'micro-averaged one-vs-rest'  # the ROC panel of a multi-class task


# ------------------------------------------------------------------------- Collecting.


def collect(dirs: Iterable[str], left_out: list[dict[str, Any]] | None = None
            ) -> list[dict[str, Any]]:
  """The fine-tuning runs whose `results.json` lie in or under `dirs`.

  Args:
    dirs: run workdirs, folders to search recursively, or `results.json` files.
    left_out: where given, gets a `left_out_run` dict for each workdir found with a
      config.json of a labelled task but no results.json (an unfinished or failed run),
      each once.

  Returns:
    One dict per run, in path order: `path` (of results.json), `workdir`, `trainer`,
    `dataset`, `init`, `label_fraction`, `seed`, `fraction_seed` and `pretrain_seed`
    (None when absent), `primary_metric`, `results` (the whole parsed file),
    `settings` (the workdir's config.json flattened, or None) and `variant` (the
    settings that set the run apart from other runs of its initialisation, see
    `_mark_variants`; '' for none). A file reached twice counts once. Empty when none
    is found.

  Raises:
    DataError: for a DIR that does not exist, a results.json that is not a JSON object
      or lacks a key, or two files that are the same run (data set, trainer,
      initialisation, label fraction, seed, fraction_seed, pretrain_seed and variant).
  """
  runs, seen, by_key = [], set(), {}
  unfinished = []
  for top in dirs:
    found = skipped = 0
    for path in _results_files(top, unfinished):
      real = os.path.realpath(path)
      if real in seen:
        continue
      seen.add(real)
      run = _load_run(path)
      if run is not None:
        runs.append(run)
        found += 1
      else:
        skipped += 1
    if skipped and not found:
      logging.warning('%s: holds only results the report leaves out (pretraining runs, or '
                      'files without a trainer); it compares fine-tuning, linear evaluation, '
                      'distillation and segmentation runs', top)
  if left_out is not None:
    known = {os.path.realpath(entry['workdir']) for entry in left_out}
    for workdir in unfinished:
      if os.path.realpath(workdir) not in known:
        known.add(os.path.realpath(workdir))
        left_out.append(left_out_run(workdir))
  _mark_variants(runs)
  for run in runs:
    key = (run['dataset'], run['trainer'], run['init'], run['label_fraction'],
           run['seed'], run['fraction_seed'], run['pretrain_seed'])
    if key + (run['variant'],) in by_key:
      other = by_key[key + (run['variant'],)]
      unreadable = [r['workdir'] for r in (run, other) if r['settings'] is None]
      same = ('and settings that cannot be compared: no readable '
              f'{CONFIG_FILE} in {" and ".join(unreadable)}' if unreadable
              else 'and the same settings')
      raise DataError(f"{run['path']} and {other['path']} are the same run (dataset, "
                      'trainer, init, label_fraction, seed, fraction_seed, pretrain_seed = '
                      f'{", ".join(map(str, key))}, {same})')
    by_key[key + (run['variant'],)] = run
  return runs


def _results_files(top: str, unfinished: list[str]) -> list[str]:
  """The results.json files in or under `top`; adds the workdirs with a config.json of a
  labelled task but no results.json to `unfinished`."""
  if os.path.isfile(top):
    return [top]
  if not os.path.isdir(top):
    raise DataError(f'{top} does not exist')
  found, here = [], []
  for root, subdirs, names in files.walk(top):
    subdirs.sort()
    if RESULTS_FILE in names:
      found.append(os.path.join(root, RESULTS_FILE))
    elif CONFIG_FILE in names and _trainer_of(os.path.join(root, CONFIG_FILE)) not in (
        None, *SKIPPED_TRAINERS, 'stages'):
      here.append(root)
  if here:
    logging.warning('Left out, with a config.json but no %s (unfinished or failed '
                    'runs): %s', RESULTS_FILE, ', '.join(here))
  unfinished.extend(here)
  return found


# What the report's list of left-out runs gives of each one's config.json.
LEFT_OUT_KEYS = ('trainer', 'dataset', 'init', 'init_from', 'data.label_fraction', 'seed')


def left_out_run(workdir: str) -> dict[str, Any]:
  """A workdir without results.json: `workdir` and `config` (`{key: value}` of the
  LEFT_OUT_KEYS its config.json has, `init` where it is set, else `init_from`; None
  when it cannot be read)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      saved = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError):
    return {'workdir': workdir, 'config': None}
  if not isinstance(saved, dict):
    return {'workdir': workdir, 'config': None}
  found = dict(config_schema.leaves(saved))
  config = {key: found[key] for key in LEFT_OUT_KEYS if key in found}
  config.pop('init_from' if config.get('init') else 'init', None)
  return {'workdir': workdir, 'config': config}


def _trainer_of(path: str) -> str | None:
  """The `trainer` of a config.json, or None when it cannot be read."""
  try:
    with open(path) as f:
      trainer = json.load(f).get('trainer')
  except (OSError, UnicodeDecodeError, ValueError, AttributeError):
    return None
  return trainer if isinstance(trainer, str) else None


def _load_run(path: str) -> dict[str, Any] | None:
  """Parses and checks one results.json; None when it is not a fine-tuning run's."""
  try:
    with open(path) as f:
      results = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not valid JSON ({e.msg} at line {e.lineno}, '
                    f'column {e.colno})') from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: cannot be read ({e})') from None
  if not isinstance(results, dict):
    raise DataError(f'{path}: expected a JSON object, got {type(results).__name__}')
  trainer = results.get('trainer')
  if trainer is None or trainer in SKIPPED_TRAINERS:
    logging.debug('Skipping %s: trainer %s.', path, trainer)
    return None
  for key in REQUIRED_KEYS:
    if key not in results:
      raise DataError(f"{path}: missing key '{key}'")
  for key in ('trainer', 'dataset', 'init', 'primary_metric'):
    if not isinstance(results[key], str) or not results[key]:
      raise DataError(f"{path}: key '{key}' must be a non-empty string, "
                      f'got {results[key]!r}')
  fraction = results['label_fraction']
  if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
      or not 0.0 < fraction <= 1.0):
    raise DataError(f"{path}: key 'label_fraction' must be a number in (0, 1], "
                    f'got {fraction!r}')
  seed = results['seed']
  if isinstance(seed, bool) or not isinstance(seed, (int, str)):
    raise DataError(f"{path}: key 'seed' must be an integer or a string, got {seed!r}")
  for key in ('fraction_seed', 'pretrain_seed'):
    value = results.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
      raise DataError(f"{path}: key '{key}' must be an integer or null, got {value!r}")
  _check_shift(results.get('shift'), path)
  return {'path': path, 'workdir': os.path.dirname(path), 'trainer': trainer,
          'dataset': results['dataset'] + protocol(results), 'init': results['init'],
          'label_fraction': float(fraction), 'seed': seed,
          'fraction_seed': results.get('fraction_seed'),
          'pretrain_seed': results.get('pretrain_seed'),
          'primary_metric': results['primary_metric'], 'results': results,
          'settings': _settings(os.path.join(os.path.dirname(path), CONFIG_FILE)),
          'variant': '', 'studied': []}


def protocol(results: dict[str, Any]) -> str:
  """` (frontal; per study, max)`: how a run's metrics were taken, where not from every
  image, one by one (results.json `views`, `eval_unit`, `eval_reduce`); '' otherwise."""
  parts = []
  views = results.get('views')
  if isinstance(views, str) and views not in ('', 'all'):
    parts.append(views)
  unit = results.get('eval_unit')
  if isinstance(unit, str) and unit not in ('', 'image'):
    parts.append(f"per {unit}, {results.get('eval_reduce') or 'max'}")
  return f" ({'; '.join(parts)})" if parts else ''


def _settings(path: str) -> dict[str, str] | None:
  """The run's config (`config.json` beside results.json) as `{dotted key: JSON value}`,
  keys it lacks (written by an earlier version) at their defaults.

  None when the file is absent, or unreadable (with a warning): such a run takes part
  in no comparison of settings.
  """
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    logging.warning('%s: cannot be read (%s); its settings are not compared.', path, e)
    return None
  if not isinstance(config, dict):
    logging.warning('%s: not a JSON object; its settings are not compared.', path)
    return None
  settings = config_schema.saved_settings(config)
  if settings.get('task.eval_unit', 'image') == 'image':
    settings.pop('task.eval_reduce', None)  # images are not combined: no setting of the run
  return {key: json.dumps(value, sort_keys=True) for key, value in settings.items()}


def _is_setting(key: str) -> bool:
  """Whether runs that differ in `key` are runs of different settings (see NOT_SETTINGS)."""
  return not (key in NOT_SETTINGS or key.startswith('shift.')
              or config_schema.is_bookkeeping(key))


# The variant of a run without a readable config.json among runs that study a setting.
UNKNOWN_SETTINGS = 'settings unknown: no readable config.json'


def _mark_variants(runs: Sequence[dict[str, Any]]) -> None:
  """Sets each run's `variant`: the settings that tell it apart from its init's other runs.

  Runs of one data set, trainer and initialisation are compared within each label
  fraction; a config key (bookkeeping aside) that takes two values there is a setting
  under study (a label policy, a learning rate ...), and every run of that
  initialisation gets `key=value` for it, in key order. A key that changes only from
  one label fraction to another (epochs per fraction) is not one. Runs without a
  readable `config.json` get no variant where their initialisation's other runs
  study no setting, and the variant `UNKNOWN_SETTINGS` where they do: a row of its
  own, not pooled with runs whose settings may differ.
  """
  groups = collections.defaultdict(list)
  for run in runs:
    groups[(run['dataset'], run['trainer'], run['init'])].append(run)
  unknown = []
  for everything in groups.values():
    group = [run for run in everything if run['settings'] is not None]
    if not group:
      continue
    keys = [key for key in set().union(*(run['settings'] for run in group))
            if _is_setting(key)]
    values = collections.defaultdict(lambda: collections.defaultdict(set))
    for run in group:
      for key in keys:
        values[key][run['label_fraction']].add(run['settings'].get(key, ABSENT_SETTING))
    studied = sorted(key for key, by_fraction in values.items()
                     if any(len(v) > 1 for v in by_fraction.values()))
    for run in group:
      run['studied'] = studied
      run['variant'] = ', '.join(
          f"{key}={_setting_text(run['settings'].get(key, ABSENT_SETTING))}"
          for key in studied)
    if studied:
      for run in everything:
        if run['settings'] is None:
          run['variant'] = UNKNOWN_SETTINGS
          unknown.append(run['workdir'])
  if unknown:
    logging.warning('Runs without a readable %s, among runs of their initialisation that '
                    'differ in a setting, get a row "(%s)" of their own: %s', CONFIG_FILE,
                    UNKNOWN_SETTINGS, ', '.join(unknown))



def _setting_text(value: str) -> str:
  """A JSON value as a row label shows it: strings without quotes."""
  try:
    parsed = json.loads(value)
  except json.JSONDecodeError:
    return value
  return parsed if isinstance(parsed, str) else value


def _check_shift(shift: Any, path: str) -> None:
  """Checks the optional `shift` entry: `{dataset, split?, metrics, ...}` or null."""
  if shift is None:
    return
  if not isinstance(shift, dict):
    raise DataError(f"{path}: key 'shift' must be an object, got {type(shift).__name__}")
  for key in ('dataset', 'split'):
    value = shift.get(key, 'test' if key == 'split' else None)
    if not isinstance(value, str) or not value:
      raise DataError(f"{path}: key 'shift.{key}' must be a non-empty string, got {value!r}")
  if not isinstance(shift.get('metrics'), dict):
    raise DataError(f"{path}: key 'shift.metrics' must be an object, "
                    f"got {shift.get('metrics')!r}")
  names = shift.get('label_names')
  if names is not None and (not isinstance(names, list)
                            or not all(isinstance(n, str) for n in names)):
    raise DataError(f"{path}: key 'shift.label_names' must be a list of strings, got "
                    f'{names!r}')


def metric_value(run: dict[str, Any], metric: str, split: str = 'test') -> float:
  """`run`'s value of `metric` on `split`; `a/b` also reaches nested dicts; null is NaN.

  Raises:
    DataError: naming the file and the key when the split or the metric is missing or
      not a number.
  """
  values = run['results'].get(split)
  if not isinstance(values, dict):
    raise DataError(f"{run['path']}: missing key '{split}' (the {split} metrics)")
  value = _find(values, metric)
  if value is _ABSENT:
    raise DataError(f"{run['path']}: missing key '{split}.{metric}'")
  return _number(value, run['path'], f'{split}.{metric}')


def shift_value(run: dict[str, Any], metric: str
                ) -> tuple[str, str, float, tuple[str, ...]] | None:
  """`(shift data set, its split, value of metric, labels)` of `run`'s shift evaluation.

  `labels` (`shift_labels`): the shifted data set's labels the value is over. None when
  the run has no `shift`, or its shift metrics lack `metric` (a metric of the training
  data set only, such as the AUC of a class the mapping leaves out).

  Raises:
    DataError: naming the file and the key when the value is not a number.
  """
  shift = run['results'].get('shift')
  if not shift:
    return None
  value = _find(shift['metrics'], metric)
  if value is _ABSENT:
    logging.debug('%s: no shift.metrics.%s', run['path'], metric)
    return None
  return (shift['dataset'], shift.get('split', 'test'),
          _number(value, run['path'], f'shift.metrics.{metric}'), shift_labels(shift, metric))


def shift_labels(shift: dict[str, Any], metric: str) -> tuple[str, ...]:
  """The shifted data set's labels (classes) that `metric` of a `shift` entry is over.

  `shift.label_names` where recorded, else the labels `shift.label_map` maps onto
  (results.json files written before `label_names`); () for a value of one label
  (`auc_per_class/NAME`) or when neither is recorded.
  """
  if metric not in shift['metrics'] and '/' in metric:
    return ()
  names = shift.get('label_names')
  if names is None:
    label_map = shift.get('label_map')
    names = list(label_map.values()) if isinstance(label_map, dict) else []
  return tuple(dict.fromkeys(str(n) for n in names))


_ABSENT = object()


def _find(values: dict[str, Any], metric: str) -> Any:
  """`values[metric]`, or the nested `values[a][b]` for `a/b`; `_ABSENT` when missing."""
  if metric in values:
    return values[metric]
  value = values
  for part in metric.split('/'):
    if not isinstance(value, dict) or part not in value:
      return _ABSENT
    value = value[part]
  return value


def _number(value: Any, path: str, key: str) -> float:
  if value is None:
    return math.nan
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise DataError(f"{path}: key '{key}' is not a number: {value!r}")
  return float(value)


# ------------------------------------------------------------------------ Statistics.


def summarize(runs: Sequence[dict[str, Any]], metric: str | None = None,
              split: str = 'test', *, by_pretraining: bool = False,
              test: str = 'welch', reference: str | None = None) -> list[dict[str, Any]]:
  """Statistics over seeds of each data set, metric, row, label fraction and evaluation.

  A run whose `split` metrics are an empty dict (a data set without that split, such as
  CheXpert without a test split) is left out with a logged warning. With
  `split='test'`, a run's `shift` evaluation adds a cell in a column of its own.

  Args:
    runs: from `collect`.
    metric: the metric of every run; None: each run's `primary_metric`.
    split: the results.json key of the metrics (`test`, `validation`).
    by_pretraining: a row per pretraining run (`pretrain_seed`) of an initialisation
      instead of one pooling them.
    test: 'welch' or 'student', the t-test of `p_value_vs_best` (`p_value`).
    reference: the row every other row of a column is compared with, where the column
      has it; None (or a column without it): the column's best.

  Returns:
    One dict per cell, ordered by data set, metric, row, label fraction and evaluation:
    `dataset`, `metric`, `split` (of the data set evaluated on), `evaluated_on` (the
    data set the metric was measured on: `dataset`, or the shift's), `shifted`,
    `shift_labels` (of a shifted cell, the labels its metric is over: `shift_labels`;
    runs whose shifted metric is over other labels are cells of their own), `row`
    (the row label: the init, `init (trainer)` when the data set has runs of several
    trainers, and with `by_pretraining` `init (pretraining seed S)` or `init (trainer,
    pretraining seed S)`), `pooled_row` (the label without the pretraining seed),
    `init`, `trainer`, `variant` (see `collect`), `pretrain_seed` (the row's, with
    `by_pretraining`; else None), `pretrain_seeds` (those of the cell's runs),
    `label_fraction`, `seeds` (`pS/sK` for runs with a pretraining seed) and `values`
    (in seed order, NaN for a null value), `n` (the values that are defined),
    `num_undefined` (the NaN ones, left out of every statistic), `num_fewer_classes`
    (runs whose mean over classes is over fewer than asked), `mean`, `std` (ddof=1;
    None when n < 2; mean and std are over every run), `units`, `n_units` and `unit`
    (the values the t-test compares, their number, and `run` or `pretraining run`:
    see `replication_units`), `is_best` (the column's best mean: highest, or lowest
    for losses and errors), `compared_with` (the row the column's p-values compare
    with: `reference`, or the column's first best row), `is_reference` (that row, and
    rows tied with the best when it is the best), `reference_missing` (the column lacks
    `reference`), `p_value_vs_best` (`test`'s t-test, see `p_value`, of the cell's
    units against those of `compared_with`; None for the reference and when either
    side has fewer than 2 units), `p_holm` (Holm's adjustment, `holm`, over the
    column's defined p-values; the raw p when it is the only one),
    `num_comparisons` (how many that is) and `equivalent_to_best` (`p_holm` > ALPHA:
    not significantly different).

  Raises:
    DataError: when a run lacks the split or the metric, no run has `split` metrics,
      or `reference` names no row of any table.
  """
  runs = with_metrics(runs, split)
  trainers = collections.defaultdict(set)
  for run in runs:
    trainers[run['dataset']].add(run['trainer'])
  cells = collections.defaultdict(list)
  for run in runs:
    name = metric or run['primary_metric']
    pooled = _row_label(run, trainers[run['dataset']])
    group = run['pretrain_seed'] if by_pretraining else None
    row = _row_label(run, trainers[run['dataset']], group)
    where = (run['dataset'], name, row, pooled, run['init'], run['trainer'], run['variant'],
             group, run['label_fraction'])
    entry = (_run_order(run), _seed_label(run), run['pretrain_seed'])
    cells[where + (False, run['dataset'], split, ())].append(
        entry + (metric_value(run, name, split),
                 _fewer_classes(run['results'][split], name), run))
    shifted = shift_value(run, name) if split == 'test' else None
    if shifted is not None:
      cells[where + (True, shifted[0], shifted[1], shifted[3])].append(
          entry + (shifted[2], _fewer_classes(run['results']['shift']['metrics'], name), run))

  def order(key):
    (dataset, name, _, pooled, init, _, _, group, fraction, shifted, evaluated_on, on_split,
     labels) = key
    return (dataset, name, _row_order(init, pooled), _pretrain_order(group), fraction,
            shifted, evaluated_on, on_split, labels)

  summary = []
  for key in sorted(cells, key=order):
    (dataset, name, row, pooled, init, trainer, variant, group, fraction, shifted,
     evaluated_on, on_split, labels) = key
    _, seeds, pretrain_seeds, values, fewer, members = zip(
        *sorted(cells[key], key=lambda c: c[0]))
    values = np.asarray(values, dtype=np.float64)
    defined = values[np.isfinite(values)]
    units, unit = replication_units(pretrain_seeds, values)
    summary.append({
        'dataset': dataset, 'metric': name, 'split': on_split, 'evaluated_on': evaluated_on,
        'shifted': shifted, 'shift_labels': list(labels), 'row': row, 'pooled_row': pooled,
        'init': init, 'trainer': trainer, 'variant': variant, 'pretrain_seed': group,
        'pretrain_seeds': sorted({p for p in pretrain_seeds if p is not None}),
        'label_fraction': fraction, 'seeds': list(seeds), 'values': values.tolist(),
        'n': len(defined), 'num_undefined': len(values) - len(defined),
        'num_fewer_classes': sum(fewer),
        'mean': float(np.mean(defined)) if len(defined) else math.nan,
        'std': float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
        'is_best': False, 'p_value_vs_best': None, 'equivalent_to_best': False,
        'units': units, 'n_units': len(units), 'unit': unit, 'p_holm': None,
        'num_comparisons': 0, 'compared_with': None, 'is_reference': False,
        'reference_missing': False,
        'settings': [run['settings'] for run in members],
        'fraction_seeds': [run['fraction_seed'] for run in members],
        'labelled': [(_count(run['results'].get('labelled_cases')),
                      _count(run['results'].get('labelled_images'))) for run in members],
        'studied': sorted({key for run in members for key in run['studied']})})

  rows = sorted({cell['row'] for cell in summary})
  if reference is not None and reference not in rows:
    raise DataError(f'--reference {reference!r} names no row; the rows are: '
                    + ', '.join(repr(row) for row in rows))
  columns = collections.defaultdict(list)
  for cell in summary:
    columns[_column(cell)].append(cell)
  for column in columns.values():
    finite = [cell for cell in column if math.isfinite(cell['mean'])]
    if not finite:
      continue
    pick = min if metrics_lib.lower_is_better(column[0]['metric']) else max
    best_mean = pick(cell['mean'] for cell in finite)
    best = next(cell for cell in finite if cell['mean'] == best_mean)
    named = None
    if reference is not None:
      named = next((cell for cell in finite if cell['row'] == reference), None)
    for cell in column:
      # Means of one set of scores summed in another order differ in the last bits.
      cell['is_best'] = math.isclose(cell['mean'], best_mean, rel_tol=1e-9, abs_tol=1e-12)
    against = named or best
    for cell in column:
      cell['compared_with'] = against['row']
      cell['reference_missing'] = reference is not None and named is None
      # Against the best, rows tied with it are the best too: no comparison.
      cell['is_reference'] = cell is against or (named is None and cell['is_best'])
      if cell['is_reference'] or cell['n_units'] < 2 or against['n_units'] < 2:
        continue
      cell['p_value_vs_best'] = p_value(cell['units'], against['units'], test)
    family = [cell for cell in column if cell['p_value_vs_best'] is not None
              and not math.isnan(cell['p_value_vs_best'])]
    for cell, adjusted in zip(family, holm([cell['p_value_vs_best'] for cell in family])):
      cell['p_holm'] = adjusted
      cell['num_comparisons'] = len(family)
      cell['equivalent_to_best'] = adjusted > ALPHA
    for cell in column:
      if cell['p_value_vs_best'] is not None and cell['p_holm'] is None:
        cell['p_holm'] = cell['p_value_vs_best']  # NaN: two constant samples
  return summary


def _count(value: Any) -> int | None:
  """A count from results.json, or None where it is missing or not a whole number."""
  return value if isinstance(value, int) and not isinstance(value, bool) else None


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjustment of `p_values`, in their order.

  The i-th smallest of m p-values becomes the largest of (m - j + 1) * p_(j) over j <= i
  (so the adjusted values keep the order of the raw ones), capped at 1. One p-value is
  its own adjustment.
  """
  m = len(p_values)
  adjusted = [0.0] * m
  running = 0.0
  for rank, i in enumerate(sorted(range(m), key=lambda k: p_values[k])):
    running = max(running, min(1.0, (m - rank) * p_values[i]))
    adjusted[i] = running
  return adjusted


UNIT_RUN = 'run'
UNIT_PRETRAINING = 'pretraining run'


def replication_units(pretrain_seeds: Sequence[int | None], values: Sequence[float]
                      ) -> tuple[list[float], str]:
  """The values a cell's t-test compares, and what each stands for.

  Fine-tuning runs of one pretraining run are not independent of each other: where a
  cell holds runs from two or more pretraining runs (`pretrain_seeds`), its units are
  the pretraining runs, each the mean of its runs' defined values (a run without a
  pretraining seed is a unit of its own), and the unit is `UNIT_PRETRAINING`. A cell
  from one pretraining run, or from none (scratch), has its runs' defined values as
  units (`UNIT_RUN`): a comparison of such a cell is conditional on its pretrained
  model. NaN values are left out; a pretraining run without a defined value gives no
  unit.

  Returns:
    (units, unit): the unit values in order of first appearance, and `UNIT_RUN` or
    `UNIT_PRETRAINING`.
  """
  distinct = {p for p in pretrain_seeds if p is not None}
  if len(distinct) < 2:
    return [float(v) for v in values if math.isfinite(v)], UNIT_RUN
  groups = collections.defaultdict(list)
  for k, (pretrain_seed, value) in enumerate(zip(pretrain_seeds, values)):
    if math.isfinite(value):
      groups[('pretrain', pretrain_seed) if pretrain_seed is not None else ('run', k)].append(
          float(value))
  return [float(np.mean(group)) for group in groups.values()], UNIT_PRETRAINING


def _fewer_classes(values: dict[str, Any], metric: str) -> bool:
  """Whether `metric`, a mean over classes, is over fewer than asked (`_classes` < `_of_classes`).

  A class without positives or without negatives in the evaluated split has no AUC
  and is left out of the mean (`bigssl_med.metrics`).
  """
  found, asked = _find(values, f'{metric}_classes'), _find(values, f'{metric}_of_classes')
  return (isinstance(found, int) and isinstance(asked, int) and not isinstance(found, bool)
          and found < asked)


def with_metrics(runs: Sequence[dict[str, Any]], split: str) -> list[dict[str, Any]]:
  """The runs whose `split` metrics are not `{}`; the others are named in a warning.

  Raises:
    DataError: when no run has `split` metrics.
  """
  kept = [run for run in runs if run['results'].get(split) != {}]
  if len(kept) < len(runs):
    left_out = [run['path'] for run in runs if run['results'].get(split) == {}]
    logging.warning('%d of %d runs have no %s metrics and are left out: %s', len(left_out),
                    len(runs), split, ', '.join(left_out))
    if not kept:
      raise DataError(f'none of the {len(runs)} runs has {split} metrics (for example '
                      f'{left_out[0]}); choose another --split')
  return kept


def _column(cell: dict[str, Any]) -> tuple:
  """What a cell is compared within: data set, metric, label fraction and evaluation."""
  return (cell['dataset'], cell['metric']) + _place(cell)


def pretraining_spread(runs: Sequence[dict[str, Any]], metric: str | None = None,
                       split: str = 'test') -> list[dict[str, Any]]:
  """The spread between pretraining runs of an initialisation, against method differences.

  For every column (data set, metric, label fraction, evaluation) in which some row has
  runs from two or more pretraining runs, one dict per pooled row of that column:
  `dataset`, `metric`, `split`, `evaluated_on`, `shifted`, `shift_labels`, `row`, `init`,
  `trainer`, `label_fraction`, `pretrain_seeds`, `pretraining_means` (the mean over fine-tuning
  seeds of each pretraining run, in that order), `pretraining_std` (their std, ddof=1;
  None with fewer than 2 pretraining runs), `mean` and `n` (pooled over every run of
  the row), `best_row`, `difference_to_best` (`mean` minus the best pooled mean; 0 for
  the best) and `within_spread`: whether |difference| is at most the larger
  `pretraining_std` of this row and the best row (None for the best row, or when
  neither has one). Empty when no initialisation has two pretraining runs.
  """
  if not any(run['pretrain_seed'] is not None for run in runs):
    return []
  pooled = summarize(runs, metric, split)
  split_up = summarize(runs, metric, split, by_pretraining=True)
  means = collections.defaultdict(list)
  for cell in split_up:
    if cell['pretrain_seed'] is not None:
      means[_column(cell) + (cell['pooled_row'],)].append((cell['pretrain_seed'],
                                                            cell['mean']))
  columns = collections.defaultdict(list)
  for cell in pooled:
    columns[_column(cell)].append(cell)
  out = []
  for key, column in columns.items():
    found = {cell['row']: sorted(means.get(key + (cell['row'],), [])) for cell in column}
    if max(len(v) for v in found.values()) < 2:
      continue
    best = next((cell for cell in column if cell['is_best']), None)
    spread = {row: (float(np.std([m for _, m in v], ddof=1)) if len(v) > 1 else None)
              for row, v in found.items()}
    for cell in column:
      difference = None if best is None else cell['mean'] - best['mean']
      within = None
      if best is not None and cell is not best:
        stds = [s for s in (spread[cell['row']], spread[best['row']]) if s is not None]
        within = (abs(difference) <= max(stds)) if stds else None
      out.append({
          'dataset': cell['dataset'], 'metric': cell['metric'], 'split': cell['split'],
          'evaluated_on': cell['evaluated_on'], 'shifted': cell['shifted'],
          'shift_labels': cell['shift_labels'],
          'row': cell['row'], 'init': cell['init'], 'trainer': cell['trainer'],
          'variant': cell['variant'], 'label_fraction': cell['label_fraction'],
          'pretrain_seeds': [p for p, _ in found[cell['row']]],
          'pretraining_means': [m for _, m in found[cell['row']]],
          'pretraining_std': spread[cell['row']], 'mean': cell['mean'], 'n': cell['n'],
          'best_row': None if best is None else best['row'],
          'difference_to_best': difference, 'within_spread': within})
  return out


# The t-tests of `p_value`, and how the report names them.
TESTS = {
    'welch': "Welch's t-test (scipy.stats.ttest_ind, equal_var=False)",
    'student': "Student's two-sample t-test, pooled variance (scipy.stats.ttest_ind)",
}


def p_value(a: Sequence[float], b: Sequence[float], test: str = 'welch') -> float:
  """Two-sided p-value of `a` against `b`: Welch's t-test (unequal variances) or
  Student's independent two-sample t-test (`test='student'`, equal variances)."""
  if test not in TESTS:
    raise ValueError(f'test must be one of {sorted(TESTS)}, got {test!r}')
  if np.ptp(a) == 0 and np.ptp(b) == 0:
    # No spread on either side: t is undefined (0/0, or a difference over rounding
    # noise that scipy turns into p ~ 0 with a warning).
    return math.nan
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # scipy's precision-loss notice for nearly constant data
    return float(stats.ttest_ind(a, b, equal_var=test == 'student').pvalue)


def file_names(names: Sequence[str]) -> list[str]:
  """A file-name part for each of `names`: its letters, digits and `._-`, the rest `_`;
  names that come out alike get a part of their SHA-1 each, so no file is written twice."""
  safe = [re.sub(r'[^A-Za-z0-9._-]+', '_', name) for name in names]
  counts = collections.Counter(safe)
  return [f'{s}_{hashlib.sha1(name.encode()).hexdigest()[:8]}' if counts[s] > 1 else s
          for name, s in zip(names, safe)]


def _row_label(run: dict[str, Any], trainers: set[str], pretrain_seed: int | None = None
               ) -> str:
  """The init, then in brackets: the trainer (with several), variant and pretraining seed."""
  notes = [] if len(trainers) == 1 else [run['trainer']]
  if run['variant']:
    notes.append(run['variant'])
  if pretrain_seed is not None:
    notes.append(f'pretraining seed {pretrain_seed}')
  return f"{run['init']} ({', '.join(notes)})" if notes else run['init']


def _row_order(init: str, row: str) -> tuple:
  rank = INIT_ORDER.index(init) if init in INIT_ORDER else len(INIT_ORDER)
  return (rank, init, row)


def _seed_order(seed) -> tuple:
  return (isinstance(seed, str), seed)


def _pretrain_order(pretrain_seed: int | None) -> tuple:
  return (pretrain_seed is not None, pretrain_seed or 0)


def _run_order(run: dict[str, Any]) -> tuple:
  """Runs of a cell: by pretraining seed, fine-tuning seed, then fraction seed."""
  fraction_seed = -1 if run['fraction_seed'] is None else run['fraction_seed']
  return (_pretrain_order(run['pretrain_seed']), _seed_order(run['seed']), fraction_seed)


def _seed_label(run: dict[str, Any]):
  """The seed as tables list it: the seed, or `pS/sK` for a run with a pretraining seed."""
  if run['pretrain_seed'] is None:
    return run['seed']
  return f"p{run['pretrain_seed']}/s{run['seed']}"


# --------------------------------------------------------------------------- Writing.


def write_report(runs: Sequence[dict[str, Any]], out_path: str, *,
                 metric: str | None = None, split: str = 'test', digits: int = 3,
                 by_pretraining: bool = False, test: str = 'welch',
                 reference: str | None = None,
                 left_out: Sequence[dict[str, Any]] = ()) -> list[str]:
  """Writes the Markdown report, its CSVs and PNG plots; returns the paths written.

  Args:
    runs: from `collect`.
    out_path: the Markdown file; the CSVs and PNGs share its stem and folder.
    metric: see `summarize`.
    split: see `summarize`; ROC curves read `<split>_predictions.npz`.
    digits: decimals of means and standard deviations in the tables.
    by_pretraining, test, reference: see `summarize`.
    left_out: `collect`'s left-out workdirs, counted in the header and listed in a
      final section.
  """
  if not runs:
    raise DataError('no fine-tuning runs to report')
  runs = with_metrics(runs, split)  # warns once about runs left out
  summary = summarize(runs, metric, split, by_pretraining=by_pretraining, test=test,
                      reference=reference)
  spread = pretraining_spread(runs, metric, split)
  stem = os.path.splitext(out_path)[0]
  with files.written_whole(out_path) as tmp, open(tmp, 'w') as f:
    f.write(markdown(summary, split=split, digits=digits,
                     num_runs=sum(cell['n'] + cell['num_undefined'] for cell in summary
                                  if not cell['shifted']),
                     spread=spread, test=test, reference=reference, left_out=left_out,
                     finished=runs))
  paths = [out_path, f'{stem}.csv']
  write_csv(summary, paths[1])
  if spread:
    paths.append(f'{stem}_pretraining_spread.csv')
    write_spread_csv(spread, paths[-1])
  datasets = sorted({cell['dataset'] for cell in summary})
  for dataset, safe in zip(datasets, file_names(datasets)):
    path = f'{stem}_label_efficiency_{safe}.png'
    plot_label_efficiency([c for c in summary if c['dataset'] == dataset], path)
    paths.append(path)
    path = f'{stem}_roc_{safe}.png'
    if plot_roc([r for r in runs if r['dataset'] == dataset], path, split=split):
      paths.append(path)
  return paths


def markdown(summary: Sequence[dict[str, Any]], *, split: str = 'test', digits: int = 3,
             num_runs: int | None = None,
             spread: Sequence[dict[str, Any]] = (), test: str = 'welch',
             reference: str | None = None, left_out: Sequence[dict[str, Any]] = (),
             finished: Sequence[dict[str, Any]] = ()) -> str:
  """The Markdown tables of `summarize`'s cells, one per data set and metric.

  `spread` (from `pretraining_spread`) adds the section "Spread between pretraining
  runs" after the tables; `reference`: the one given to `summarize`, for the legends;
  `left_out` (`collect`'s) adds a final section listing them, and the columns that
  have left-out runs but no finished one among the runs `finished` (`collect`'s).
  """
  lines = [f'# {title(summary)} ({split} split)', '']
  if num_runs is not None and left_out:
    lines += [f'{num_runs} finished runs; {len(left_out)} left out (no {RESULTS_FILE}: '
              'unfinished or failed), listed at the end.', '']
  elif num_runs is not None:
    lines += [f'{num_runs} runs.', '']
  tables = collections.defaultdict(list)
  for cell in summary:
    tables[(cell['dataset'], cell['metric'])].append(cell)
  for (dataset, name), cells in tables.items():
    fractions = sorted({cell['label_fraction'] for cell in cells})
    places = {_place(cell) for cell in cells}
    shifts = sorted({place[2:] for place in places if place[1]})  # (on, split, labels)
    columns = []
    for fraction in fractions:
      columns.append((fraction, False, dataset, split, ()))
      columns += [(fraction, True) + shift for shift in shifts
                  if (fraction, True) + shift in places]
    rows = list(dict.fromkeys(cell['row'] for cell in cells))
    by_place = {(cell['row'],) + _place(cell): cell for cell in cells}
    direction = 'lower' if metrics_lib.lower_is_better(name) else 'higher'
    labelled = {fraction: _labelled_text(c for c in cells if c['label_fraction'] == fraction
                                         and not c['shifted'])
                for fraction in fractions}
    lines += [f'## {dataset}: {name}', '',
              '| initialisation | ' + ' | '.join(
                  _column_title(*c) + ('' if c[1] else labelled[c[0]]) for c in columns)
              + ' |',
              '|---|' + '---|' * len(columns)]
    for row in rows:
      texts = [format_cell(by_place.get((row,) + c), digits) for c in columns]
      lines.append(f'| {_escape(row)} | ' + ' | '.join(texts) + ' |')
    lines += ['', f'Mean ± std over runs (n = number of runs; std with ddof=1) of '
              f'{name} on {split}. **Bold**: the best mean of the column ({direction} '
              f'is better). p: {TESTS[test]} against ' + _reference_text(cells, reference)
              + '; Holm p: p adjusted by Holm\'s step-down method over the k−1 '
              "comparisons of a column of k rows with a p-value, shown when there are two "
              f'or more; {EQUIVALENT}: adjusted p > {ALPHA}, not significantly different '
              f'from {"the reference" if reference else "the best"} (which does not show '
              'that they are equivalent); n/a: fewer than 2 units on one side, or both '
              f'constant; {MISSING}: no runs.' + _table_notes(cells), '']
    lines += settings_notes(cells)
  if spread:
    lines += spread_markdown(spread, digits)
  if left_out:
    lines += left_out_markdown(left_out, finished)
  return '\n'.join(lines)


# The report's title by the trainer of its runs.
TITLES = {'finetune': 'Fine-tuning results', 'linear_eval': 'Linear evaluation results',
          'distill': 'Distillation results', 'segment': 'Segmentation results'}


def title(summary: Sequence[dict[str, Any]]) -> str:
  """`Fine-tuning results` and the like when every cell is of one trainer of TITLES,
  `Results` otherwise."""
  trainers = {cell['trainer'] for cell in summary}
  return TITLES.get(trainers.pop(), 'Results') if len(trainers) == 1 else 'Results'


def left_out_markdown(left_out: Sequence[dict[str, Any]],
                      finished: Sequence[dict[str, Any]] = ()) -> list[str]:
  """The lines of the section that lists the runs left out (`collect`'s `left_out`)."""
  lines = [f'## Left out: no {RESULTS_FILE} (unfinished or failed runs)', '']
  have = {(run['results']['dataset'], run['label_fraction']) for run in finished}
  empty = collections.Counter()
  for entry in left_out:
    config = entry['config'] or {}
    fraction = config.get('data.label_fraction')
    dataset = config.get('dataset')
    if (isinstance(dataset, str) and isinstance(fraction, (int, float))
        and not isinstance(fraction, bool) and (dataset, float(fraction)) not in have):
      empty[(dataset, float(fraction))] += 1
  if empty:
    lines += ['Columns with left-out runs and no finished run, so missing from the tables: '
              + '; '.join(f'{_escape(dataset)} {percent(fraction)} ({count} left out)'
                          for (dataset, fraction), count in sorted(empty.items())) + '.', '']
  for entry in left_out:
    config = entry['config']
    if config is None:
      what = f'its {CONFIG_FILE} cannot be read'
    else:
      what = ', '.join(
          f'{key}={_setting_text(json.dumps(value))}' if value != '' else
          f"{key}=''" + (' (random weights)' if key == 'init_from' else '')
          for key, value in config.items()) or f'nothing of it in {CONFIG_FILE}'
    lines.append(f"- `{entry['workdir']}`: {_escape(what)}")
  lines.append('')
  return lines


# Config keys (last part) that set a run's length and its evaluation schedule: they
# usually change with the label fraction on purpose (epochs of a smaller set).
RUN_LENGTH_KEYS = re.compile(
    r'(num_epochs|total_steps|eval_every_\w+|checkpoint_every_\w+|warmup_\w+)')


def _is_run_length(key: str) -> bool:
  return RUN_LENGTH_KEYS.fullmatch(key.rsplit('.', 1)[-1]) is not None


def _cell_settings(cell: dict[str, Any]) -> dict[str, set[str]] | None:
  """`{setting key: its values}` among a cell's runs with a readable config.json."""
  known = [settings for settings in cell['settings'] if settings is not None]
  if not known:
    return None
  keys = {key for settings in known for key in settings if _is_setting(key)}
  return {key: {settings.get(key, ABSENT_SETTING) for settings in known} for key in keys}


def _values_text(values: Iterable[str]) -> str:
  return '/'.join(str(_setting_text(v)) for v in sorted(values))


def settings_notes(cells: Sequence[dict[str, Any]]) -> list[str]:
  """Lines under a table naming the settings (config.json keys, as `_mark_variants`
  compares them) that differ between the columns of a row, and between its rows.

  Along a row: keys whose values differ between its label fractions, with the values
  per column; those of the run's length and evaluation schedule (`RUN_LENGTH_KEYS`)
  grouped apart, as they usually change with the label fraction on purpose. Between
  rows (of one trainer): keys whose values differ between rows within a column,
  besides the initialisation (NOT_SETTINGS) and the settings rows are split by
  (`variant`), with each row's values. [] when there is none.
  """
  found = collections.defaultdict(dict)  # row -> {fraction: {key: values}}
  studied = collections.defaultdict(set)
  trainer = {}
  for cell in cells:
    settings = None if cell['shifted'] else _cell_settings(cell)
    if settings is not None:
      found[cell['row']][cell['label_fraction']] = settings
      studied[cell['row']].update(cell['studied'])
      trainer[cell['row']] = cell['trainer']
  along, schedule = [], []
  for row, by_fraction in found.items():
    fractions = sorted(by_fraction)
    if len(fractions) < 2:
      continue
    parts = {False: [], True: []}
    for key in sorted(set().union(*by_fraction.values())):
      seen = [by_fraction[f].get(key, {ABSENT_SETTING}) for f in fractions]
      if any(values != seen[0] for values in seen):
        parts[_is_run_length(key)].append(
            f'{key} ' + ', '.join(f'{_values_text(values)} ({percent(f)})'
                                  for f, values in zip(fractions, seen)))
    if parts[False]:
      along.append(f'- {_escape(row)}: ' + '; '.join(_escape(p) for p in parts[False]))
    if parts[True]:
      schedule.append(f'- {_escape(row)}: ' + '; '.join(_escape(p) for p in parts[True]))
  between = []
  for name in sorted(set(trainer.values())):
    rows = [row for row in found if trainer[row] == name]
    keys = set()
    for fraction in {f for row in rows for f in found[row]}:
      here = [row for row in rows if fraction in found[row]]
      for key in set().union(*(found[row][fraction] for row in here)):
        if any(key in studied[row] for row in here):
          continue
        seen = [found[row][fraction].get(key, {ABSENT_SETTING}) for row in here]
        if any(values != seen[0] for values in seen):
          keys.add(key)
    for key in sorted(keys):
      per_row = []
      for row in rows:
        values = set().union(*(by_key.get(key, {ABSENT_SETTING})
                               for by_key in found[row].values()))
        per_row.append(f'{row} {_values_text(values)}')
      between.append(f'- {_escape(key)}: ' + '; '.join(_escape(p) for p in per_row))
  lines = []
  if along:
    lines += ['Settings that differ between the columns of a row (config.json; the row, '
              'and its line in the plot, joins runs of these settings):', ''] + along + ['']
  if schedule:
    lines += ['Run length and evaluation schedule that differ between the columns of a row '
              '(usually set per label fraction on purpose):', ''] + schedule + ['']
  if between:
    lines += ['Settings that differ between rows, besides the initialisation (init, '
              'init_from, teacher) and the settings in the row labels:', ''] + between + ['']
  return lines


def _labelled_text(cells: Iterable[dict[str, Any]]) -> str:
  """` (22 cases, 47 images)`: what the runs of a column trained on (results.json
  `labelled_cases`, `labelled_images`), each where every run records it and they agree;
  '' when neither does."""
  counts = [pair for cell in cells for pair in cell.get('labelled', ())]
  parts = []
  for k, noun in enumerate(('cases', 'images')):
    found = {pair[k] for pair in counts}
    if len(found) == 1 and None not in found and 0 not in found:  # 0: a distilled student
      parts.append(f'{found.pop()} {noun}')
  return f" ({', '.join(parts)})" if parts else ''


def _reference_text(cells: Sequence[dict[str, Any]], reference: str | None) -> str:
  """What a table's p-values compare with, for its legend."""
  post_hoc = ("the column's best, chosen after seeing the data (a post hoc comparison, "
              'which the Holm adjustment does not make a pre-planned one)')
  if reference is None:
    return post_hoc
  text = (f'{_escape(reference)}, the reference row named before the analysis '
          '(--reference; the best, in bold, is chosen after seeing the data)')
  missing = sorted({_column_title(*_place(cell)) for cell in cells
                    if cell['reference_missing']})
  if missing:
    text += (f"; in {', '.join(missing)}, which {'has' if len(missing) == 1 else 'have'} no "
             f'{_escape(reference)} row, against {post_hoc}')
  return text


def _place(cell: dict[str, Any]) -> tuple:
  """A cell's column within its table: label fraction and evaluation."""
  return (cell['label_fraction'], cell['shifted'], cell['evaluated_on'], cell['split'],
          tuple(cell['shift_labels']))


# Longer lists of a shifted column's labels are counted, not named.
MAX_LABELS_TEXT = 40


def over_labels(labels: Sequence[str]) -> str:
  """`over A, B` for the labels a shifted metric is over, `over N labels` when long;
  '' for none."""
  if not labels:
    return ''
  text = ', '.join(labels)
  if len(text) > MAX_LABELS_TEXT:
    text = f'{len(labels)} labels'
  return f'over {text}'


def _column_title(fraction: float, shifted: bool, evaluated_on: str, split: str,
                  labels: Sequence[str] = ()) -> str:
  """`10%`, or `10% → DATASET` (`/SPLIT` unless test) `(over LABELS)` for a shifted
  evaluation (`over_labels`)."""
  if not shifted:
    return percent(fraction)
  over = over_labels(labels)
  return f'{percent(fraction)} → {_escape(evaluated_on)}' + (
      '' if split == 'test' else f'/{_escape(split)}') + (f' ({_escape(over)})' if over else '')


def _table_notes(cells: Sequence[dict[str, Any]]) -> str:
  """Sentences that explain shifted columns and pretraining seeds, where a table has them."""
  notes = ''
  if any(cell.get('num_undefined', 0) for cell in cells):
    notes += (' K NaN: K runs whose value is undefined (null in results.json, such as an '
              'AUC on a split without positives) are left out of n, the mean, the std '
              'and p.')
  if any(cell.get('num_fewer_classes', 0) for cell in cells):
    notes += (f' {FEWER_CLASSES}: in some runs the mean is over fewer classes than asked; '
              'a class without positives or without negatives in the split has no AUC '
              'and is left out (results.json `<metric>_classes` of `<metric>_of_classes`).')
  if any(cell['shifted'] for cell in cells):
    notes += (' FRACTION → DATA SET (over LABELS): the same models evaluated on another '
              'data set (distribution shift: results.json `shift`, its label mapping), the '
              'metric computed over the labels the mapping reaches only (results.json '
              '`shift.label_names`), so a mean over labels is not the in-distribution '
              "column's; best and p-values within that column.")
  if any(cell['pretrain_seed'] is not None for cell in cells):
    notes += (' (pretraining seed S): the runs fine-tuned from pretraining run S; n counts '
              'their fine-tuning seeds.')
  elif any(len(cell['pretrain_seeds']) > 1 for cell in cells):
    notes += (' Runs fine-tuned from different pretraining runs of an initialisation are '
              'pooled: n, the mean and the std are over all of them (--by_pretraining gives '
              'a row per pretraining run).')
  notes += _unit_note(cells)
  if any(cell['trainer'] == 'linear_eval' and cell['init'] == 'scratch' for cell in cells):
    notes += (' scratch (linear evaluation): a frozen, randomly initialised encoder under a '
              'trained linear layer (a random-features baseline), not a network trained '
              'from scratch.')
  notes += _fraction_seed_note(cells)
  return notes


def _fraction_seed_note(cells: Sequence[dict[str, Any]]) -> str:
  """Where every run of a cell below 100% shares one fraction_seed: that its std is over
  training seeds on one draw of the labelled cases."""
  one_draw = collections.defaultdict(set)
  for cell in cells:
    seeds = set(cell.get('fraction_seeds', ()))
    if (cell['label_fraction'] < 1.0 and not cell['shifted'] and len(seeds) == 1
        and None not in seeds and len(cell['values']) > 1):
      one_draw[cell['label_fraction']].update(seeds)
  if not one_draw:
    return ''
  where = ', '.join(f"{percent(f)} (fraction_seed {', '.join(map(str, sorted(s)))})"
                    for f, s in sorted(one_draw.items()))
  return (f' In the columns {where}, the runs of a cell share one draw of the labelled '
          'cases: the std and p cover the training seeds on that draw, not the choice of '
          'labelled cases; '
          'to cover it, link the draw to the seed (`launch/sweep.py --set '
          'seed+data.fraction_seed=0,1,2`).')


def _unit_note(cells: Sequence[dict[str, Any]]) -> str:
  """What the p-values of a table take as their independent units (`replication_units`)."""
  nested = any(cell.get('unit') == UNIT_PRETRAINING for cell in cells)
  one_model = any(len(cell['pretrain_seeds']) == 1 for cell in cells)
  note = ''
  if nested:
    note += (' Units of the p-values: in a cell with runs from two or more pretraining runs '
             '("n=9 from 3 pretraining runs"), the per-pretraining-run means (each over its '
             'fine-tuning seeds; a run without a pretraining seed counts as one), since '
             'fine-tuning seeds of one pretraining run are not independent; elsewhere the '
             'runs.')
  else:
    note += ' Units of the p-values: the runs.'
  if one_model:
    note += (' A cell whose runs come from a single pretraining run takes its fine-tuning '
             'seeds as units: its p-value is conditional on that pretrained model (the '
             'protocol of the papers), not a comparison of pretraining methods.')
  return note


def spread_markdown(spread: Sequence[dict[str, Any]], digits: int = 3) -> list[str]:
  """The lines of the section "Spread between pretraining runs" (see `pretraining_spread`)."""
  lines = ['## Spread between pretraining runs', '',
           '| data set | metric | column | initialisation | mean per pretraining run | '
           'std between pretraining runs | pooled mean (n) | pooled mean − best | '
           'within the spread |', '|---|' + '---|' * 8]
  for entry in spread:
    per_run = ', '.join(f'p{p}: {m:.{digits}f}' for p, m in
                        zip(entry['pretrain_seeds'], entry['pretraining_means'])) or MISSING
    std = entry['pretraining_std']
    if entry['best_row'] is None:
      difference = MISSING
    elif entry['best_row'] == entry['row']:
      difference = 'best'
    else:
      difference = f"{entry['difference_to_best']:+.{digits}f} (vs {_escape(entry['best_row'])})"
    within = {None: 'n/a', True: 'yes', False: 'no'}[entry['within_spread']]
    if entry['best_row'] == entry['row']:
      within = MISSING
    column = _column_title(entry['label_fraction'], entry['shifted'], entry['evaluated_on'],
                           entry['split'], entry['shift_labels'])
    lines.append(
        f"| {_escape(entry['dataset'])} | {_escape(entry['metric'])} | {column} | "
        f"{_escape(entry['row'])} | {per_run} | "
        f"{MISSING if std is None else f'{std:.{digits}f}'} | "
        f"{entry['mean']:.{digits}f} ({entry['n']}) | {difference} | {within} |")
  lines += ['', 'Each pretraining run\'s mean is over its fine-tuning seeds; their std '
            '(ddof=1) is the spread between pretraining runs of one initialisation. '
            'Pooled mean − best: the difference between this initialisation and the '
            "column's best, every run pooled. Within the spread: yes when that "
            'difference is no larger than the larger spread of the two initialisations, '
            'so the methods differ by less than pretraining runs of one method do; n/a: '
            f'neither has 2 pretraining runs; {MISSING}: the best row.', '']
  return lines


def format_cell(cell: dict[str, Any] | None, digits: int = 3) -> str:
  """A table cell: `mean ± std (n=3)`, bold when best; unless it is the column's
  reference, with p, the Holm-adjusted p (two or more comparisons) and `≈`.

  `(n=9 from 3 pretraining runs)` where the cell's p-values take its pretraining runs
  as units (`replication_units`).
  """
  if cell is None:
    return MISSING
  text = f"{cell['mean']:.{digits}f}"
  if cell['std'] is not None:
    text += f" ± {cell['std']:.{digits}f}"
  count = f"n={cell['n']}"
  n_units = cell.get('n_units', cell['n'])
  if n_units != cell['n']:
    count += f" from {n_units} pretraining run{'' if n_units == 1 else 's'}"
  undefined = cell.get('num_undefined', 0)
  text += f' ({count}, {undefined} NaN)' if undefined else f' ({count})'
  if cell.get('num_fewer_classes', 0):
    text += FEWER_CLASSES
  if cell['is_best']:
    text = f'**{text}**'
  if cell.get('is_reference', cell['is_best']):
    return text
  p = cell['p_value_vs_best']
  text += f', {format_p(p)}'
  if cell.get('num_comparisons', 0) >= 2:
    text += f", Holm {format_p(cell['p_holm'])}"
  if cell['equivalent_to_best']:
    text += f' {EQUIVALENT}'
  return text


def format_p(p: float | None) -> str:
  """`p=0.123`, `p<0.001`, or `p=n/a` for None or NaN (two constant samples)."""
  if p is None or math.isnan(p):
    return 'p=n/a'
  if p < 0.001:
    return 'p<0.001'
  return f'p={p:.3f}'


def percent(fraction: float) -> str:
  """A label fraction as a percentage: 0.1 -> `10%`, 0.005 -> `0.5%`."""
  return f'{100.0 * fraction:.6g}%'


def _escape(text: str) -> str:
  return text.replace('|', '\\|')


CSV_COLUMNS = ('dataset', 'metric', 'split', 'evaluated_on', 'shifted', 'shift_labels', 'init',
               'trainer', 'variant', 'pretrain_seed', 'label_fraction', 'mean', 'std', 'n',
               'num_undefined', 'num_fewer_classes', 'p_value_vs_best', 'is_best',
               'equivalent_to_best', 'seeds', 'values', 'n_units', 'unit', 'p_holm',
               'compared_with')
SPREAD_CSV_COLUMNS = ('dataset', 'metric', 'split', 'evaluated_on', 'shifted', 'shift_labels',
                      'init', 'trainer', 'variant', 'label_fraction', 'pretrain_seeds',
                      'pretraining_means', 'pretraining_std', 'mean', 'n', 'best_row',
                      'difference_to_best', 'within_spread')


def write_csv(summary: Sequence[dict[str, Any]], path: str,
              columns: Sequence[str] = CSV_COLUMNS) -> None:
  """One row per cell (or entry); lists are `;`-separated, None is empty."""
  with files.written_whole(path) as tmp, open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for cell in summary:
      row = []
      for column in columns:
        value = cell[column]
        if isinstance(value, (list, tuple)):
          value = ';'.join(repr(v) if isinstance(v, float) else str(v) for v in value)
        elif value is None:
          value = ''
        elif isinstance(value, float):
          value = repr(value)
        row.append(value)
      writer.writerow(row)


def write_spread_csv(spread: Sequence[dict[str, Any]], path: str) -> None:
  """`pretraining_spread`'s entries, one row each (as `write_csv`)."""
  write_csv(spread, path, SPREAD_CSV_COLUMNS)


# --------------------------------------------------------------------------- Plotting.


def _figure(num_panels: int):
  # The object-oriented API: no pyplot, no global backend; savefig renders with Agg.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5.0 * num_panels, 4.2), layout='constrained')
  axes = fig.subplots(1, num_panels, squeeze=False)[0]
  return fig, axes


def plot_label_efficiency(cells: Sequence[dict[str, Any]], path: str) -> None:
  """The metric against the label fraction (log axis), one line per row, std bars.

  `cells` are `summarize`'s of one data set; each metric gets its own panel. Each point
  is a cell's mean over runs with ± SD bars, annotated with its n; a cell of one run
  is a hollow marker without a bar. Shifted evaluations are dashed lines `row →
  DATASET (over LABELS)`.
  """
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  names = list(dict.fromkeys(cell['metric'] for cell in cells))
  fig, axes = _figure(len(names))
  for ax, name in zip(axes, names):
    mine = [cell for cell in cells if cell['metric'] == name]
    lines = collections.defaultdict(list)
    for cell in mine:
      lines[(cell['shifted'], cell['evaluated_on'], cell['split'],
             tuple(cell['shift_labels']), cell['row'])].append(cell)
    colours = {}  # a row's shifted lines share its colour
    for (shifted, evaluated_on, split, labels, row), line in sorted(
        lines.items(), key=lambda item: item[0][:4]):
      line = sorted(line, key=lambda c: c['label_fraction'])
      label = row
      if shifted:
        label += f' → {evaluated_on}' + ('' if split == 'test' else f'/{split}')
        if labels:
          label += f' ({over_labels(labels)})'
      (drawn,) = ax.plot([c['label_fraction'] for c in line], [c['mean'] for c in line],
                         label=label, linestyle='--' if shifted else '-',
                         color=colours.get(row) if shifted else None)
      colour = colours.setdefault(row, drawn.get_color())
      spread = [c for c in line if c['std'] is not None]
      if spread:
        ax.errorbar([c['label_fraction'] for c in spread], [c['mean'] for c in spread],
                    yerr=[c['std'] for c in spread], fmt='o', capsize=3, color=colour)
      single = [c for c in line if c['std'] is None]  # one run: no spread to draw
      if single:
        ax.plot([c['label_fraction'] for c in single], [c['mean'] for c in single], 'o',
                markerfacecolor='none', color=colour)
      for cell in line:
        ax.annotate(f"n={cell['n']}", (cell['label_fraction'], cell['mean']),
                    textcoords='offset points', xytext=(4, 4), fontsize='x-small',
                    color=colour)
    fractions = sorted({cell['label_fraction'] for cell in mine})
    ax.set_xscale('log')
    ax.xaxis.set_major_locator(ticker.FixedLocator(fractions))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([percent(f) for f in fractions]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    if len(fractions) == 1:
      ax.set_xlim(fractions[0] / 2, fractions[0] * 2)
    ax.set_xlabel('label fraction')
    ax.set_ylabel(f"{name} ({next(c for c in mine if not c['shifted'])['split']}), "
                  'mean ± SD over runs')
    ax.set_title(f"{mine[0]['dataset']}: {name}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small', title='bars: ± SD (ddof=1); hollow: n=1',
              title_fontsize='x-small')
  with files.written_whole(path) as tmp:
    fig.savefig(tmp, dpi=100)


def plot_roc(runs: Sequence[dict[str, Any]], path: str, *, split: str = 'test') -> bool:
  """ROC curves of one data set's runs; False (and a logged notice) without predictions.

  For each row (initialisation), the run with predictions at its largest label fraction
  and, there, its first seed. Binary tasks: one panel; multi-class: the micro-averaged
  one-vs-rest curve (every class's scores pooled), its legend giving the micro-AUC,
  which is not the macro mean AUC of the tables; multi-label: one panel per label, at
  most five (CheXpert's competition labels when all are present).
  """
  trainers = {run['trainer'] for run in runs}
  chosen = {}
  for run in sorted(runs, key=lambda r: (-r['label_fraction'], _run_order(r))):
    predictions = os.path.join(run['workdir'], f'{split}_predictions.npz')
    row = _row_label(run, trainers)
    if row not in chosen and os.path.isfile(predictions):
      chosen[row] = (run, predictions)
  dataset = runs[0]['dataset'] if runs else '?'
  if not chosen:
    logging.info('No %s_predictions.npz for %s: no ROC plot.', split, dataset)
    return False
  panels = collections.defaultdict(list)
  for row in sorted(chosen, key=lambda r: _row_order(chosen[r][0]['init'], r)):
    run, predictions = chosen[row]
    label = f"{row}, {percent(run['label_fraction'])}, seed {_seed_label(run)}"
    for title, fpr, tpr in roc_curves(predictions):
      panels[title].append((label, fpr, tpr))
  titles = list(panels)[:MAX_ROC_PANELS]
  if not titles:
    logging.warning('No label of %s has both classes in its predictions: no ROC plot.',
                    dataset)
    return False
  fig, axes = _figure(len(titles))
  for ax, title in zip(axes, titles):
    auc_name = 'micro-AUC' if title == MICRO_AVERAGED else 'AUC'
    for label, fpr, tpr in panels[title]:
      ax.plot(fpr, tpr, label=f'{label}: {auc_name} {sk_metrics.auc(fpr, tpr):.3f}')
    ax.plot([0, 1], [0, 1], linestyle='--', color='grey', linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel('false positive rate')
    ax.set_ylabel('true positive rate')
    ax.set_title(f'{dataset}: {title}', fontsize='medium')
    ax.legend(fontsize='x-small', loc='lower right')
  with files.written_whole(path) as tmp:
    fig.savefig(tmp, dpi=100)
  return True


def roc_curves(path: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """`(panel title, fpr, tpr)` of one predictions file (see `plot_roc`).

  Raises:
    DataError: naming the file, for missing keys or arrays that do not fit together.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {key: data[key] for key in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'{path}: cannot be read as .npz ({e or type(e).__name__})') from None
  for key in ('scores', 'labels'):
    if key not in arrays:
      raise DataError(f"{path}: missing key '{key}'")
  # Log-probabilities, where the file has them, rank as the probabilities do without
  # rounding those near 1 to ties (a curve and its AUC as the run's metrics rank).
  scores = arrays.get('log_scores', arrays['scores']).astype(np.float64)
  labels = arrays['labels']
  names = [str(n) for n in arrays['class_names']] if 'class_names' in arrays else None
  num_columns = scores.shape[1] if scores.ndim == 2 else 1
  if names is not None and len(names) != num_columns:
    names = None
  try:
    if labels.ndim == 1 and (scores.ndim == 1 or num_columns <= 2):
      column = scores if scores.ndim == 1 else scores[:, -1]
      title = names[-1] if names else 'positive class'
      if len(np.unique(labels)) < 2:
        logging.warning('%s: every label is %s; no ROC curve.', path, labels[0] if
                        len(labels) else 'missing')
        return []
      return [(title, *metrics_lib.roc_points(column, labels))]
    if labels.ndim == 1:
      classes = labels.astype(np.int64)
      if scores.ndim != 2 or np.any((classes < 0) | (classes >= num_columns)):
        raise ValueError(f'labels must be classes in [0, {num_columns}) for scores of '
                         f'shape {scores.shape}')
      one_hot = classes[:, None] == np.arange(num_columns)[None, :]
      return [(MICRO_AVERAGED,
               *metrics_lib.roc_points(scores.ravel(), one_hot.ravel()))]
    if labels.shape != scores.shape:
      raise ValueError(f'labels have shape {labels.shape}, scores {scores.shape}')
    labels = labels.astype(np.float64)
    mask = arrays['mask'].astype(bool) if 'mask' in arrays else np.isfinite(labels)
    if mask.shape != labels.shape:
      raise ValueError(f'mask has shape {mask.shape}, labels {labels.shape}')
    names = names or [str(k) for k in range(num_columns)]
    columns = range(num_columns)
    if set(metrics_lib.CHEXPERT_COMPETITION) <= set(names):
      columns = [names.index(n) for n in metrics_lib.CHEXPERT_COMPETITION]
    curves = []
    for k in columns:
      rows = mask[:, k]
      positive = labels[rows, k] == 1
      if positive.all() or not positive.any():
        continue  # No ROC curve without both classes.
      curves.append((names[k], *metrics_lib.roc_points(scores[rows, k], positive)))
      if len(curves) == MAX_ROC_PANELS:
        break
    return curves
  except ValueError as e:
    raise DataError(f'{path}: {e}') from None


# ------------------------------------------------------------------------------- CLI.


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status."""
  parser = argparse.ArgumentParser(
      prog='python -m bigssl_med.report',
      description='Tables, CSV and plots of fine-tuning runs over initialisations, '
                  'label fractions and seeds.')
  parser.add_argument('dirs', nargs='+', metavar='DIR',
                      help='run workdirs, or folders searched recursively for '
                           f'{RESULTS_FILE}')
  parser.add_argument('--out', type=_markdown_path, default='report.md',
                      help='Markdown report to write; the .csv and .png files get its '
                           'stem (default: report.md)')
  parser.add_argument('--metric', default=None,
                      help="metric to tabulate (default: each run's primary_metric)")
  parser.add_argument('--split', default='test',
                      help='results.json key of the metrics (default: test)')
  parser.add_argument('--digits', type=_digits, default=3,
                      help='decimals of means and stds (default: 3)')
  parser.add_argument('--test', choices=sorted(TESTS), default='welch',
                      help="the t-test against each column's best: welch (unequal "
                           "variances, the default) or student (pooled variance)")
  parser.add_argument('--by_pretraining', action='store_true',
                      help='a row per pretraining run (pretrain_seed) of each '
                           'initialisation instead of one pooling them')
  parser.add_argument('--reference', default=None, metavar='ROW',
                      help="the row (its label in the tables, such as scratch) every other "
                           "row is compared with, in the columns that have it (default: "
                           "each column's best)")
  args = parser.parse_args(argv)
  cli.log_info_to_stderr()
  left_out = []
  try:
    runs = collect(args.dirs, left_out)
    if not runs:
      raise DataError(f'no {RESULTS_FILE} of a fine-tuning run under '
                      f'{", ".join(args.dirs)}')
    paths = write_report(runs, args.out, metric=args.metric, split=args.split,
                         digits=args.digits, by_pretraining=args.by_pretraining,
                         test=args.test, reference=args.reference, left_out=left_out)
  except UserError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  except OSError as exc:  # --out names a folder, or a place that cannot be written
    print(f'error: cannot write {exc.filename or args.out}: {exc.strerror or exc}',
          file=sys.stderr)
    return 2
  for path in paths:
    print(path)
  return 0


def _markdown_path(text: str) -> str:
  """`--out`: a `.md` file, so that neither the report's own CSV (its stem + `.csv`) nor
  a run's results.json or config.json can be the file it replaces."""
  if not text.endswith('.md'):
    raise argparse.ArgumentTypeError(f'{text!r} does not end in .md (the Markdown report; '
                                     'the .csv and .png files get its stem)')
  return text


def _digits(text: str) -> int:
  """`--digits`: a count of decimals, 0 to 15."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
  if not 0 <= value <= 15:
    raise argparse.ArgumentTypeError(f'{value} is not between 0 and 15')
  return value


if __name__ == '__main__':
  sys.exit(cli.run(main))
