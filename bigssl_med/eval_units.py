"""Metrics per study or per case instead of per image (`config.task.eval_unit`).

A chest X-ray study holds one to a few images (frontal and lateral views) that share
the study's labels; a lesion in HAM10000 has one to several images that share its
diagnosis. With `eval_unit='study'` or `'case'`, the validation and test metrics count
each study (or case) once: the model's probabilities for its images are combined
(`task.eval_reduce`: `'max'`, the highest probability of each label among the images,
for multi-label tasks; `'mean'`, their average, for either kind; '' picks `'max'` for a
multi-label task and `'mean'` for a multi-class one) and compared with the unit's
labels, which its images must agree on (checked before training).

- `'study'`: CheXpert's study (the `study` folder within the patient, e.g.
  `patient00001/study1`) or MIMIC-CXR's `study_id`;
- `'case'`: the data set's `case_id` (patient or lesion);
- `'image'`: every image on its own (the default).

Combined probabilities are handed to the metrics as logits: for a multi-label task,
the log-odds of the combined probability; for a multi-class one, the log of the mean
probabilities (a softmax of which gives them back).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bigssl_med import metrics as metrics_lib
from bigssl_med.data import sources
from bigssl_med.errors import ConfigError, DataError

UNITS = ('image', 'study', 'case')
REDUCTIONS = ('max', 'mean')


def unit_features(unit: str, features: Mapping[str, Any], name: str) -> tuple[str, ...]:
  """The features whose values name a record's `unit` (none for 'image').

  Raises:
    ConfigError: `unit` is not one of `UNITS`, or the data set `name` (with
      `features`) has no such unit.
  """
  if unit not in UNITS:
    raise ConfigError(f'config.task.eval_unit={unit!r} is not one of '
                      f'{", ".join(repr(u) for u in UNITS)}')
  wanted = _wanted(unit, features)
  missing = [key for key in wanted if key not in features]
  if missing:
    raise ConfigError(f'config.task.eval_unit={unit!r}: data set {name} has no '
                      f'{" or ".join(("study_id", "study") if unit == "study" else missing)} '
                      "feature; set it to 'image'")
  return wanted


def has_unit(unit: str, features: Mapping[str, Any]) -> bool:
  """Whether a data set with `features` has the units `unit` (one of `UNITS`) names."""
  return all(key in features for key in _wanted(unit, features))


def _wanted(unit: str, features: Mapping[str, Any]) -> tuple[str, ...]:
  if unit == 'image':
    return ()
  if unit == 'case':
    return ('case_id',)
  return ('study_id',) if 'study_id' in features else ('case_id', 'study')


def check_reduce(reduce: str, kind: str = 'multilabel') -> str:
  """The reduction `reduce` names for a task of `kind`: '' is 'max' for a multi-label
  task and 'mean' for a multi-class one.

  Raises:
    ConfigError: it is not one of `REDUCTIONS` (or ''), or 'max' for a multi-class task.
  """
  if reduce not in ('', *REDUCTIONS):
    raise ConfigError(f'config.task.eval_reduce={reduce!r} is not one of '
                      f"{', '.join(repr(r) for r in ('', *REDUCTIONS))}")
  if not reduce:
    return 'max' if kind == 'multilabel' else 'mean'
  if reduce == 'max' and kind != 'multilabel':
    raise ConfigError("config.task.eval_reduce='max' takes each label's highest probability "
                      "(multi-label tasks); a multi-class task's images are combined by "
                      "'mean'")
  return reduce


def split_indices(source: Sequence[Any], positions: np.ndarray) -> np.ndarray:
  """The split's record indices of `source`'s records `positions` (`source` is a split
  or a `sources.Subset` of one)."""
  positions = np.asarray(positions, np.int64)
  return source.indices[positions] if isinstance(source, sources.Subset) else positions


def split_unit_keys(name: str, split: str, data_dir: str, unit: str) -> np.ndarray:
  """The unit of every record of `split`, in record order, as text (`split_indices`
  picks a source's records out of it).

  Raises:
    ConfigError: as `unit_features`. DataError: the data set or split is missing.
  """
  wanted = unit_features(unit, sources.dataset_info(name, data_dir).features, name)
  if not wanted:
    return np.arange(len(sources.open_split(name, split, data_dir))).astype(str)
  values = sources.record_features(name, split, data_dir, wanted)
  return np.asarray(['/'.join(parts) for parts in zip(*(values[key] for key in wanted))],
                    dtype=str)


def source_labels(source: Sequence[Any], name: str, split: str, data_dir: str,
                  label_key: str) -> np.ndarray:
  """The `label_key` feature of every record of `source` (split `split` of data set
  `name`, or a `sources.Subset` of it), in order, from the build's label index
  (`sources.record_labels`): no image is read."""
  labels = sources.record_labels(name, split, data_dir, label_key)
  return labels[split_indices(source, np.arange(len(source)))]


def check_labels(labels: np.ndarray, keys: np.ndarray, where: str) -> None:
  """Fails where two images of one unit (`keys`) have different `labels`.

  Raises:
    DataError: naming the unit and both labels, in one line.
  """
  _group(labels, keys, where)


def _group(labels: np.ndarray, keys: np.ndarray, where: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(units, inverse, labels)`: the units in order of first appearance, each image's
  unit's position among them, and each unit's labels; checks that they agree."""
  labels = np.asarray(labels)
  keys = np.asarray(keys)
  units, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  order = np.argsort(first, kind='stable')  # units in order of first appearance
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  inverse = rank[inverse.reshape(-1)]
  out_labels = labels[first[order]]
  expected = out_labels[inverse]
  same = (labels == expected) | (np.isnan(labels) & np.isnan(expected)
                                 if labels.dtype.kind == 'f' else False)
  if not np.all(same):
    bad = int(np.flatnonzero(~same.reshape(len(keys), -1).all(axis=1))[0])
    raise DataError(f'{where}: the images of {keys[bad]} have different labels '
                    f'({_text(expected[bad])} and {_text(labels[bad])}); metrics per '
                    'config.task.eval_unit need one label per unit (e.g. per study, or per '
                    'case where each case has one diagnosis)')
  return units[order], inverse, out_labels


def combine(logits: np.ndarray, labels: np.ndarray, keys: np.ndarray, *, kind: str,
            reduce: str, where: str = 'predictions'
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One row per unit: its images' probabilities combined, and its labels.

  Args:
    logits: `[images, outputs]`.
    labels: the images' labels (`[images]` class ids, or `[images, labels]` with
      NaN for a blank).
    keys: `[images]`, the unit of each image (`unit_keys`).
    kind: 'multiclass' (softmax) or 'multilabel' (sigmoid per output).
    reduce: 'max' or 'mean' (`REDUCTIONS`).
    where: names the predictions in an error (e.g. 'chexpert/validation').

  Returns:
    `(logits, labels, units)`, float64 logits, units in order of first appearance.

  Raises:
    ConfigError: `reduce` is not one for `kind` (`check_reduce`).
    DataError: two images of one unit have different labels.
  """
  reduce = check_reduce(reduce, kind)
  logits = np.asarray(logits, np.float64)
  keys = np.asarray(keys)
  units, inverse, out_labels = _group(labels, keys, where)
  if kind == 'multilabel':
    # log p and log(1 - p) of each output, combined in log space: exact and stable.
    log_p, log_q = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)
  else:
    log_p, log_q = metrics_lib.log_softmax(logits), None  # no ties where p rounds to 1
  by_unit = np.argsort(inverse, kind='stable')
  starts = np.searchsorted(inverse[by_unit], np.arange(len(units)))
  counts = np.diff(np.append(starts, len(keys)))[:, None]

  def reduced(values, how):
    values = values[by_unit]
    top = np.maximum.reduceat(values, starts, axis=0)
    if how == 'max':
      return top
    if how == 'min':
      return np.minimum.reduceat(values, starts, axis=0)
    # log of the mean of exp(values), shifted by the unit's largest for stability
    shifted = np.exp(values - np.repeat(top, counts[:, 0], axis=0))
    return np.log(np.add.reduceat(shifted, starts, axis=0) / counts) + top

  if reduce == 'max':  # multi-label: max p and min (1 - p) come from the same image
    combined = reduced(log_p, 'max') - reduced(log_q, 'min')
  else:
    combined = reduced(log_p, 'mean') - (reduced(log_q, 'mean') if log_q is not None else 0.0)
  return combined, out_labels, units


def _text(labels: np.ndarray) -> str:
  return np.array2string(np.asarray(labels), separator=',', max_line_width=np.inf,
                         threshold=np.inf)
