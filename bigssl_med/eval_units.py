"""Metrics per study or per case instead of per image (`config.task.eval_unit`).

A chest X-ray study holds one to a few images (frontal and lateral views) that share
the study's labels; a lesion in HAM10000 has one to several images that share its
diagnosis. With `eval_unit='study'` or `'case'`, the validation and test metrics count
each study (or case) once: the model's probabilities for its images are combined
(`task.eval_reduce`: `'max'`, the highest probability of each label or class among the
images, or `'mean'`, their average) and compared with the unit's labels, which its
images must agree on.

- `'study'`: CheXpert's study (the `study` folder within the patient, e.g.
  `patient00001/study1`) or MIMIC-CXR's `study_id`;
- `'case'`: the data set's `case_id` (patient or lesion);
- `'image'`: every image on its own (the default).

Combined probabilities are handed to the metrics as logits: for a multi-label task,
the log-odds of the combined probability; for a multi-class one, the log of the combined
probabilities (a softmax of which gives them back, renormalised after `'max'`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import scipy.special

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
  if unit == 'image':
    return ()
  if unit == 'case':
    wanted = ('case_id',)
  elif 'study_id' in features:
    wanted = ('study_id',)
  else:
    wanted = ('case_id', 'study')
  missing = [key for key in wanted if key not in features]
  if missing:
    raise ConfigError(f'config.task.eval_unit={unit!r}: data set {name} has no '
                      f'{" or ".join(("study_id", "study") if unit == "study" else missing)} '
                      "feature; set it to 'image'")
  return wanted


def check_reduce(reduce: str) -> str:
  """`reduce`, when it is one of `REDUCTIONS`.

  Raises:
    ConfigError: it is not.
  """
  if reduce not in REDUCTIONS:
    raise ConfigError(f'config.task.eval_reduce={reduce!r} is not one of '
                      f'{", ".join(repr(r) for r in REDUCTIONS)}')
  return reduce


def split_indices(source: Sequence[Any], positions: np.ndarray) -> np.ndarray:
  """The split's record indices of `source`'s records `positions` (`source` is a split
  or a `sources.Subset` of one)."""
  positions = np.asarray(positions, np.int64)
  return source.indices[positions] if isinstance(source, sources.Subset) else positions


def unit_keys(name: str, split: str, data_dir: str, unit: str,
              records: np.ndarray) -> np.ndarray:
  """The unit of each of `split`'s records `records` (split indices), as text.

  Raises:
    ConfigError: as `unit_features`. DataError: the data set or split is missing.
  """
  records = np.asarray(records, np.int64)
  wanted = unit_features(unit, sources.dataset_info(name, data_dir).features, name)
  if not wanted:
    return records.astype(str)
  values = sources.record_features(name, split, data_dir, wanted)
  columns = [np.asarray(values[key], dtype=object)[records] for key in wanted]
  return np.asarray(['/'.join(parts) for parts in zip(*columns)], dtype=str)


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
    DataError: two images of one unit have different labels.
  """
  check_reduce(reduce)
  logits = np.asarray(logits, np.float64)
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
                    f'({_text(expected[bad])} and {_text(labels[bad])}); metrics '
                    'per unit need one label per unit')
  if kind == 'multilabel':
    # log p and log(1 - p) of each output, combined in log space: exact and stable.
    log_p, log_q = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)
  else:
    log_p, log_q = scipy.special.log_softmax(logits, axis=1), None
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

  if reduce == 'max':
    # max p and min (1 - p) come from the same image: the log-odds of the largest p
    combined = reduced(log_p, 'max') - (reduced(log_q, 'min') if log_q is not None else 0.0)
  else:
    combined = reduced(log_p, 'mean') - (reduced(log_q, 'mean') if log_q is not None else 0.0)
  return combined, out_labels, units[order]


def _text(labels: np.ndarray) -> str:
  return np.array2string(np.asarray(labels), separator=',')
