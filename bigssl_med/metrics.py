"""Evaluation metrics on host NumPy arrays, for the trainers and the report.

- `multiclass_metrics`: one label per example (HAM10000, MedMNIST): top-1 / top-3
  accuracy, balanced accuracy and one-vs-rest ROC AUC.
- `multilabel_metrics`: several binary findings per example, some unlabelled
  (CheXpert, NIH ChestX-ray14, MIMIC-CXR): ROC AUC per finding over its labelled
  entries, and their mean over a chosen set of findings.
- `binary_metrics`: ROC AUC and sensitivity at fixed specificities.
- `softmax_cross_entropy` / `sigmoid_cross_entropy`: the validation loss, for model
  selection on it and the plateau schedule.

Every function validates its inputs and raises `ValueError` with a one-line message
naming the argument at fault. Metrics that are undefined on the given labels (an AUC
for a class without positives or without negatives) are NaN, never an exception.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence
import warnings

import numpy as np
from sklearn import metrics as sk_metrics

# The five observations of the CheXpert competition, averaged for its headline AUC.
CHEXPERT_COMPETITION = ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema',
                        'Pleural Effusion')
# The 14 findings of NIH ChestX-ray14, in the order of its label files.
NIH_FINDINGS = ('Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass',
                'Nodule', 'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema',
                'Emphysema', 'Fibrosis', 'Pleural_Thickening', 'Hernia')
# Rounding allowance when comparing a false positive rate with 1 - specificity.
_RATE_TOLERANCE = 1e-9


def multiclass_metrics(logits, labels, class_names: Sequence[str] | None = None
                       ) -> dict[str, Any]:
  """Metrics of a K-way classifier.

  Args:
    logits: `[N, K]` unnormalised scores, K >= 2 (the softmax is taken here).
    labels: `[N]` integer classes in `[0, K)`.
    class_names: K names, used as the keys of `auc_per_class` (default: `'0'`, `'1'`...).

  Returns:
    A dict with
    - `top1`: fraction of examples whose highest logit is their label;
    - `top3` (only when K >= 3): fraction whose label is among the three highest logits
      (ties broken towards the lower class index, as `argmax` does);
    - `balanced_accuracy`: mean recall of the top-1 prediction over the classes present
      in `labels`;
    - `auc_per_class`: `{name: AUC}`, the one-vs-rest ROC AUC of the softmax probability
      of each class, NaN for a class absent from `labels` (or the only one present);
    - `auc_macro`: the mean of the defined per-class AUCs (NaN when none is defined);
    - `auc_macro_classes` and `auc_macro_of_classes`: how many AUCs entered that mean,
      of K;
    - `num_examples`: N.

  Raises:
    ValueError: on shapes that do not match, non-finite logits, or labels that are not
      integers in `[0, K)`.
  """
  logits = _float_matrix(logits, 'logits')
  num_examples, num_classes = logits.shape
  if num_classes < 2:
    raise ValueError(f'logits need K >= 2 classes, got shape {logits.shape}')
  labels = _class_labels(labels, num_examples, num_classes)
  names = _names(class_names, num_classes, 'class_names')
  log_probs = log_softmax(logits)  # what each class's AUC ranks: no ties where p nears 1
  ranking = np.argsort(-logits, axis=1, kind='stable')
  results: dict[str, Any] = {'top1': _top_k(ranking, labels, 1)}
  if num_classes >= 3:
    results['top3'] = _top_k(ranking, labels, 3)
  with warnings.catch_warnings():
    # Predicted classes absent from `labels` have no recall; sklearn warns and drops them.
    warnings.simplefilter('ignore')
    results['balanced_accuracy'] = float(
        sk_metrics.balanced_accuracy_score(labels, ranking[:, 0]))
  per_class = {name: _auc(labels == k, log_probs[:, k]) for k, name in enumerate(names)}
  results['auc_macro'] = _nanmean(per_class.values())
  results['auc_macro_classes'] = sum(not math.isnan(v) for v in per_class.values())
  results['auc_macro_of_classes'] = num_classes
  results['auc_per_class'] = per_class
  results['num_examples'] = num_examples
  return results


def multilabel_metrics(logits, targets, mask=None, label_names: Sequence[str] | None = None,
                       mean_over: Iterable[str] | None = None) -> dict[str, Any]:
  """ROC AUC of K independent binary findings, each over its labelled entries.

  Args:
    logits: `[N, K]` unnormalised scores (a sigmoid would not change any AUC).
    targets: `[N, K]` labels, 0 or 1 wherever `mask` is True (anything elsewhere).
    mask: `[N, K]` booleans, False for an unlabelled entry, which no metric sees.
      Default: the entries where `targets` is finite (NaN = unlabelled).
    label_names: K names, the keys of `auc_per_class` (default: `'0'`, `'1'`...).
    mean_over: the names whose AUCs `auc_mean` averages (default: all K), for example
      `CHEXPERT_COMPETITION`.

  Returns:
    A dict with
    - `auc_per_class`: `{name: AUC}` over the masked-in entries of each column, NaN
      where those lack positives or negatives;
    - `auc_mean`: the mean of the `mean_over` AUCs that are not NaN (NaN when all are);
    - `auc_mean_classes` and `auc_mean_of_classes`: how many AUCs entered that mean,
      of the `mean_over` names;
    - `num_examples`: N.

  Raises:
    ValueError: on shapes that do not match, non-finite logits, masked-in targets that
      are not 0 or 1, or `mean_over` names that are not label names.
  """
  logits = _float_matrix(logits, 'logits')
  num_examples, num_labels = logits.shape
  targets = np.asarray(targets, dtype=np.float64)
  if targets.shape != logits.shape:
    raise ValueError(f'targets have shape {targets.shape}, logits {logits.shape}')
  if mask is None:
    mask = np.isfinite(targets)
  else:
    mask = np.asarray(mask)
    if mask.shape != logits.shape:
      raise ValueError(f'mask has shape {mask.shape}, logits {logits.shape}')
    if mask.dtype != np.bool_:
      raise ValueError(f'mask must be boolean, got dtype {mask.dtype}')
  labelled = targets[mask]
  if not np.all((labelled == 0) | (labelled == 1)):
    bad = labelled[(labelled != 0) & (labelled != 1)][0]
    raise ValueError(f'targets must be 0 or 1 where mask is True, found {bad}')
  names = _names(label_names, num_labels, 'label_names')
  if mean_over is None:
    mean_over = names
  else:
    mean_over = [mean_over] if isinstance(mean_over, str) else list(mean_over)
    unknown = [name for name in mean_over if name not in names]
    if unknown:
      raise ValueError(f'mean_over names {unknown} are not label names; '
                       f'expected some of {list(names)}')
  per_class = {}
  for k, name in enumerate(names):
    rows = mask[:, k]
    per_class[name] = _auc(targets[rows, k] == 1, logits[rows, k])
  defined = [per_class[name] for name in mean_over if not math.isnan(per_class[name])]
  return {'auc_per_class': per_class,
          'auc_mean': _nanmean(defined),
          'auc_mean_classes': len(defined),
          'auc_mean_of_classes': len(mean_over),
          'num_examples': num_examples}


def binary_metrics(scores, labels, specificities: Sequence[float] = (0.9, 0.95)
                   ) -> dict[str, Any]:
  """ROC AUC and sensitivity at fixed specificities of a binary classifier.

  Args:
    scores: `[N]` scores, higher meaning more likely positive.
    labels: `[N]` labels, 0 or 1 (booleans are fine).
    specificities: the specificities s of `sensitivity_at_specificity_{s}` (keys
      formatted with `{s:g}`: `sensitivity_at_specificity_0.9`).

  Returns:
    A dict with `auc`, one `sensitivity_at_specificity_{s}` per specificity (see
    `sensitivity_at_specificity`; all NaN when `labels` lack positives or negatives)
    and `num_examples`.
  """
  scores, labels = _binary(scores, labels)
  results: dict[str, Any] = {'auc': _auc(labels, scores)}
  for specificity in specificities:
    results[f'sensitivity_at_specificity_{specificity:g}'] = (
        sensitivity_at_specificity(scores, labels, specificity))
  results['num_examples'] = len(scores)
  return results


def sensitivity_at_specificity(scores, labels, specificity: float) -> float:
  """The best sensitivity of a threshold on `scores` whose specificity is at least s.

  The ROC curve's points are the (FPR, TPR) pairs of every threshold between distinct
  scores (a threshold predicts positive for scores >= it), plus (0, 0). The result is
  the largest TPR among the points with FPR <= 1 - s (up to 1e-9 of rounding), with no
  interpolation between points. Since (0, 0) always qualifies, it is defined whenever
  both classes are present, and NaN otherwise.

  Args:
    scores: `[N]` scores, higher meaning more likely positive.
    labels: `[N]` labels, 0 or 1.
    specificity: s in [0, 1].

  Returns:
    The sensitivity (TPR) as a float, or NaN when `labels` lack positives or negatives.
  """
  if not 0.0 <= specificity <= 1.0:
    raise ValueError(f'specificity must be in [0, 1], got {specificity}')
  scores, labels = _binary(scores, labels)
  if labels.all() or not labels.any():
    return math.nan
  fpr, tpr, _ = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
  return float(tpr[fpr <= 1.0 - specificity + _RATE_TOLERANCE].max())


def lower_is_better(metric: str) -> bool:
  """Whether smaller values of `metric` are better: losses and error rates.

  Judged by the metric's own name, before any `/` (`auc_per_class/<class>` is an AUC
  whatever the class is called).
  """
  return bool(re.search(r'loss|error', metric.split('/', 1)[0]))


def softmax_cross_entropy(logits, labels) -> float:
  """Mean `-log softmax(logits)[label]` over the examples, in float64."""
  logits = _float_matrix(logits, 'logits')
  labels = _class_labels(labels, logits.shape[0], logits.shape[1])
  top = logits.max(axis=1)
  log_norm = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
  return float(np.mean(log_norm - logits[np.arange(len(labels)), labels]))


def sigmoid_cross_entropy(logits, targets, mask=None) -> float:
  """Mean binary cross-entropy of `sigmoid(logits)` against `targets` in [0, 1] (0/1, or
  soft ones) over the entries `mask` keeps (all when None), in float64; NaN when it
  keeps none."""
  logits = _float_matrix(logits, 'logits')
  targets = np.asarray(targets, np.float64)
  keep = np.ones(logits.shape, bool) if mask is None else np.asarray(mask, bool)
  if targets.shape != logits.shape or keep.shape != logits.shape:
    raise ValueError(f'targets {targets.shape} and mask {keep.shape} must have the shape '
                     f'of logits {logits.shape}')
  if not keep.any():
    return math.nan
  # max(z, 0) - z t + log(1 + exp(-|z|)): stable for large |z|.
  losses = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
  return float(losses[keep].mean())


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """The ROC curve's `(fpr, tpr)` arrays, from (0, 0) to (1, 1), for plotting.

  Raises:
    ValueError: on bad inputs, or when `labels` lack positives or negatives.
  """
  scores, labels = _binary(scores, labels)
  if labels.all() or not labels.any():
    raise ValueError('a ROC curve needs both positive and negative labels')
  fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
  return fpr, tpr


def flatten(metrics: Mapping[str, Any], sep: str = '/') -> dict[str, float]:
  """Flattens nested dicts of metrics into scalars: `{'auc_per_class/Edema': 0.9, ...}`.

  For `MetricWriter.write` and `results.json`, which take scalars only.
  """
  flat = {}
  for key, value in metrics.items():
    if isinstance(value, Mapping):
      for sub_key, sub_value in flatten(value, sep).items():
        flat[f'{key}{sep}{sub_key}'] = sub_value
    else:
      flat[key] = float(value)
  return flat


# ------------------------------------------------------------------------------ Helpers.


def _float_matrix(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f'{name} must be [N, K] with N >= 1, got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} contain {int(np.sum(~np.isfinite(x)))} non-finite values')
  return x


def _class_labels(labels, num_examples: int, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (num_examples,):
    raise ValueError(f'labels must have shape ({num_examples},) to match logits, '
                     f'got {labels.shape}')
  if labels.dtype.kind not in 'iub':
    if labels.dtype.kind != 'f' or not np.all(np.isfinite(labels)) or np.any(
        labels != np.round(labels)):
      raise ValueError(f'labels must be integers, got dtype {labels.dtype}')
  labels = labels.astype(np.int64)
  out_of_range = (labels < 0) | (labels >= num_classes)
  if np.any(out_of_range):
    raise ValueError(f'labels must be in [0, {num_classes}) for {num_classes} logits, '
                     f'found {labels[out_of_range][0]}')
  return labels


def _binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(f'scores must be [N] with N >= 1, got shape {scores.shape}')
  if labels.shape != scores.shape:
    raise ValueError(f'labels have shape {labels.shape}, scores {scores.shape}')
  if not np.all(np.isfinite(scores)):
    raise ValueError(f'scores contain {int(np.sum(~np.isfinite(scores)))} '
                     'non-finite values')
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError('labels must be 0 or 1')
  return scores, labels.astype(bool)


def _names(names, count: int, arg: str) -> tuple[str, ...]:
  if names is None:
    return tuple(str(i) for i in range(count))
  names = tuple(str(name) for name in names)
  if len(names) != count:
    raise ValueError(f'{arg} has {len(names)} names for {count} columns')
  if len(set(names)) != count:
    raise ValueError(f'{arg} has repeated names: {list(names)}')
  return names


def log_softmax(logits) -> np.ndarray:
  """float64 log-probabilities of `[N, K]` logits that keep their order near p = 1.

  The usual `l_k - logsumexp(l)` is 0 for every class whose probability is within 1e-16
  of 1: over-confident rows tie, and a class's one-vs-rest AUC loses their ranking. For
  the largest logit of a row it is computed as `-log1p(sum_{j != k} exp(l_j - l_k))`
  instead (exact for margins up to about 700); for the others, as usual (their
  probability is at most 1/2).
  """
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  relative = np.exp(shifted)  # exp(l_j - l_top): 1 at each row's top class
  log_probs = shifted - np.log(relative.sum(axis=1, keepdims=True))
  rows, best = np.arange(len(logits)), np.argmax(logits, axis=1)
  relative[rows, best] = 0.0
  log_probs[rows, best] = -np.log1p(relative.sum(axis=1))
  return log_probs


def _top_k(ranking: np.ndarray, labels: np.ndarray, k: int) -> float:
  return float(np.mean(np.any(ranking[:, :k] == labels[:, None], axis=1)))


def _auc(positive: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC, or NaN when `positive` is all True or all False (or empty)."""
  if positive.all() or not positive.any():
    return math.nan
  return float(sk_metrics.roc_auc_score(positive, scores))


def _nanmean(values: Iterable[float]) -> float:
  defined = [v for v in values if not math.isnan(v)]
  return float(np.mean(defined)) if defined else math.nan
