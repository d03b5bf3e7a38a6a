"""Evaluation under distribution shift: a model's outputs mapped onto another data set's labels.

A mapping is written `MODEL_NAME=TARGET_NAME,...` (`config.shift.label_map`), for
example `Pleural Effusion=Effusion,Cardiomegaly=Cardiomegaly` for a CheXpert model
tested on ChestX-ray14, or `mel=melanoma,nv=melanocytic nevi,...` for a HAM10000
model tested on another dermatology set. An empty mapping pairs the names the two
label sets share.

* Multi-class models on multi-class data: several model classes may map to one
  target class (their probabilities add up, e.g. the diagnoses of a benign /
  malignant split); the probabilities are renormalised over the mapped classes and
  target images whose class is not mapped are left out (and counted).
* Multi-label models on multi-label data: one model label per target label; AUCs
  over the mapped labels.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bigssl_med import metrics as metrics_lib
from bigssl_med.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """Pairs `(model output index, target label index)` and both label sets' names."""
  pairs: tuple[tuple[int, int], ...]
  model_names: tuple[str, ...]
  target_names: tuple[str, ...]

  @property
  def target_classes(self) -> tuple[int, ...]:
    """The mapped target labels, in the target's order."""
    return tuple(sorted({j for _, j in self.pairs}))

  def as_dict(self) -> dict[str, str]:
    return {self.model_names[i]: self.target_names[j] for i, j in self.pairs}


def parse(text: str, where: str = 'config.shift.label_map') -> list[tuple[str, str]]:
  """`'a=b, c=d'` -> `[('a', 'b'), ('c', 'd')]`; '' -> []."""
  pairs = []
  for item in (t.strip() for t in text.split(',')):
    if not item:
      continue
    if item.count('=') != 1:
      raise ConfigError(f'{where}: {item!r} is not MODEL_NAME=TARGET_NAME')
    source, target = (t.strip() for t in item.split('='))
    if not source or not target:
      raise ConfigError(f'{where}: {item!r} is not MODEL_NAME=TARGET_NAME')
    pairs.append((source, target))
  return pairs


def resolve(text: str, model_names: Sequence[str], target_names: Sequence[str], *,
            multi_label: bool, target: str = 'the target data set',
            where: str = 'config.shift.label_map') -> LabelMap:
  """Checks a mapping against both label sets; names what is unknown or ambiguous."""
  model_names, target_names = tuple(model_names), tuple(target_names)
  named = parse(text, where)
  if not named:
    named = [(n, n) for n in model_names if n in target_names]
    if not named:
      raise ConfigError(f'{where} is empty and the model\'s labels {list(model_names)} share '
                        f'no name with those of {target} {list(target_names)}; '
                        'give MODEL_NAME=TARGET_NAME pairs')
  unknown_model = [s for s, _ in named if s not in model_names]
  if unknown_model:
    raise ConfigError(f'{where} names unknown model label(s) {unknown_model}; the model\'s '
                      f'labels: {list(model_names)}')
  unknown_target = [t for _, t in named if t not in target_names]
  if unknown_target:
    raise ConfigError(f'{where} names label(s) {unknown_target} that {target} does not have; '
                      f'its labels: {list(target_names)}')
  sources = [s for s, _ in named]
  repeated = sorted({s for s in sources if sources.count(s) > 1})
  if repeated:
    raise ConfigError(f'{where} maps model label(s) {repeated} more than once')
  targets = [t for _, t in named]
  if multi_label:
    shared = sorted({t for t in targets if targets.count(t) > 1})
    if shared:
      raise ConfigError(f'{where} maps several model labels onto {shared}; multi-label '
                        'mappings must be one to one')
  elif len(set(targets)) < 2:
    raise ConfigError(f'{where} maps onto a single class of {target} ({targets[0]!r}); '
                      'a multi-class evaluation needs at least two')
  pairs = tuple((model_names.index(s), target_names.index(t)) for s, t in named)
  return LabelMap(pairs, model_names, target_names)


def map_multiclass(logits: np.ndarray, labels: np.ndarray, label_map: LabelMap
                   ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], int]:
  """Scores over the mapped target classes.

  Args:
    logits: `[N, K_model]` model logits on the target images.
    labels: `[N]` target class indices.
    label_map: a multi-class `LabelMap`.

  Returns:
    `(log_probabilities [M, J], labels [M] in 0..J-1, class names [J], left_out)`:
    the M images whose class is mapped, the probability of target class j being the
    sum of the model's probabilities of the classes mapped to it, renormalised over
    the J mapped classes; `left_out` = N - M.
  """
  logits = np.asarray(logits, np.float64)
  classes = label_map.target_classes
  column = {j: c for c, j in enumerate(classes)}
  # Each target class's log-sum-exp of the model logits mapped to it; their log-softmax
  # is the log of the summed probabilities, renormalised, without rounding the dominant
  # class's probability to 1 (metrics.log_softmax).
  grouped = np.full((len(logits), len(classes)), -np.inf)
  for i, j in label_map.pairs:
    grouped[:, column[j]] = np.logaddexp(grouped[:, column[j]], logits[:, i])
  labels = np.asarray(labels).astype(np.int64)
  keep = np.isin(labels, classes)
  new_labels = np.array([column[int(j)] for j in labels[keep]], np.int64)
  log_probs = metrics_lib.log_softmax(grouped[keep])
  names = tuple(label_map.target_names[j] for j in classes)
  return log_probs, new_labels, names, int((~keep).sum())


def map_multilabel(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                   label_map: LabelMap) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 tuple[str, ...]]:
  """The mapped model logits beside the target labels they stand for.

  Returns `(logits [N, P], targets [N, P], mask [N, P], target names [P])` for the P
  pairs, in the target's label order.
  """
  pairs = sorted(label_map.pairs, key=lambda pair: pair[1])
  model_idx = [i for i, _ in pairs]
  target_idx = [j for _, j in pairs]
  names = tuple(label_map.target_names[j] for j in target_idx)
  return (np.asarray(logits)[:, model_idx], np.asarray(targets)[:, target_idx],
          np.asarray(mask)[:, target_idx], names)
