"""Label fractions drawn at the case level: nested, seeded, order-independent.

Label-efficiency experiments fine-tune on 1%, 10%, ... of the labelled training
data. Here a fraction is a fraction of *cases* (patients, lesions), never of
images, so that the images of one case are all in or all out, and the subsets
are nested: for one seed, the 1% cases are among the 10% cases, which are among
the 50% cases, and so on.

Each case gets a rank key `sha256(f'{seed}:{case_id}')`; a fraction `f` of `n`
cases keeps the `ceil(f * n)` cases with the smallest keys. The subset depends
only on the seed and the set of case ids, not on the order of the records, the
number of hosts or which other fractions are drawn.

A holdout (`is_held_out`) sets cases of the training split aside for model
selection, for data sets whose other labelled split is the one results are reported
on (CheXpert's official validation split). A case is held out when
`sha256(f'holdout:{case_id}')`, read as a number in [0, 1), is below the holdout
fraction: the same cases for every seed and label fraction, whatever other cases
the split has. Label fractions are then drawn from the cases not held out.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import numpy as np

from bigssl_med.data import sources
from bigssl_med.data import views as views_lib
from bigssl_med.errors import ConfigError


def check_fraction(fraction: float) -> float:
  """`fraction` as a float in (0, 1].

  Raises:
    ConfigError: it is not a number in (0, 1] (e.g. a percentage such as 10).
  """
  try:
    value = float(fraction)
  except (TypeError, ValueError):
    raise ConfigError(f'label fraction must be a number in (0, 1], got '
                      f'{fraction!r}') from None
  if not 0.0 < value <= 1.0:
    raise ConfigError(f'label fraction must be in (0, 1] (0.01 for 1%), got '
                      f'{fraction!r}')
  return value


def case_order(case_ids: Sequence[str], seed: int) -> list[str]:
  """The case ids sorted by their rank key for `seed` (ties by id)."""
  def key(case_id):
    digest = hashlib.sha256(f'{int(seed)}:{case_id}'.encode('utf-8')).digest()
    return digest, case_id
  return sorted(set(case_ids), key=key)


def select_cases(case_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
  """The `ceil(fraction * n)` cases of the fraction, in rank order.

  Args:
    case_ids: the distinct cases to draw from (duplicates are ignored).
    fraction: in (0, 1]; 1 keeps every case.
    seed: the draw; the same seed gives nested subsets for growing fractions.

  Raises:
    ConfigError: a fraction outside (0, 1], or no cases.
  """
  fraction = check_fraction(fraction)
  ordered = case_order(case_ids, seed)
  if not ordered:
    raise ConfigError('cannot draw a label fraction from a split with no cases')
  return ordered[:max(1, math.ceil(fraction * len(ordered) - 1e-9))]


def fraction_records(cases: Mapping[str, np.ndarray], fraction: float,
                     seed: int) -> np.ndarray:
  """Sorted record indices of every image of the selected cases.

  Args:
    cases: `case_id` -> record indices, as `bigssl_med.data.sources.cases`.
    fraction: in (0, 1].
    seed: the draw.
  """
  chosen = select_cases(list(cases), fraction, seed)
  return np.sort(np.concatenate([np.asarray(cases[c], np.int64) for c in chosen]))


def check_holdout(holdout: float) -> float:
  """`holdout` as a float in [0, 1).

  Raises:
    ConfigError: it is not a number in [0, 1), naming `config.data.holdout`.
  """
  try:
    value = float(holdout)
  except (TypeError, ValueError):
    value = math.nan
  if not 0.0 <= value < 1.0:
    raise ConfigError(f'config.data.holdout must be a fraction of cases in [0, 1) (0.1 for '
                      f'10%), got {holdout!r}')
  return value


def is_held_out(case_id: str, holdout: float) -> bool:
  """Whether `case_id` is among the cases a holdout of `holdout` sets aside."""
  digest = hashlib.sha256(f'holdout:{case_id}'.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64 < holdout


def open_holdout(name: str, split: str, data_dir: str, holdout: float,
                 views: str = '') -> Sequence[dict]:
  """The records of the cases of `split` that a holdout of `holdout` sets aside; with
  `views` ('frontal', 'lateral'; `bigssl_med.data.views`), only their images of it.

  The cases held out are the same whatever `views` is.

  Raises:
    DataError: the data set or split is missing. ConfigError: a bad holdout, or one
      that holds out no case or every case.
  """
  holdout = check_holdout(holdout)
  cases = views_lib.keep_cases(sources.cases(name, split, data_dir),
                               views_lib.keep(name, split, data_dir, views))
  held = [c for c in cases if is_held_out(c, holdout)]
  if not held or len(held) == len(cases):
    raise ConfigError(f'config.data.holdout={holdout:g} holds out {len(held)} of the '
                      f'{len(cases)} cases of {name}/{split}; it must leave some on either '
                      'side')
  indices = np.sort(np.concatenate([np.asarray(cases[c], np.int64) for c in held]))
  return sources.Subset(sources.open_split(name, split, data_dir), indices)


def open_fraction(name: str, split: str, data_dir: str, fraction: float, seed: int,
                  holdout: float = 0.0, views: str = ''
                  ) -> tuple[Sequence[dict], list[np.ndarray]]:
  """Opens the records of a label fraction of a split, grouped by case.

  Args:
    name: the data set (`NAME[/CONFIG]`).
    split: the split to draw from (usually 'train').
    data_dir: the TFDS data dir.
    fraction: in (0, 1]; 1 opens the whole split (less the holdout).
    seed: the draw (nested over fractions for one seed).
    holdout: the fraction of cases set aside first (`is_held_out`; 0: none); the
      label fraction is a fraction of the others.
    views: '' (every image), or 'frontal' or 'lateral' (`bigssl_med.data.views`):
      only the images of that view are opened, and the fraction is drawn from the
      cases that have one.

  Returns:
    (source, groups): a random-access source over the chosen records (record
    order kept) and, per chosen case, its positions in that source.

  Raises:
    DataError: the data set or split is missing. ConfigError: a bad fraction.
  """
  fraction = check_fraction(fraction)
  holdout = check_holdout(holdout)
  source = sources.open_split(name, split, data_dir)
  cases = views_lib.keep_cases(sources.cases(name, split, data_dir),
                               views_lib.keep(name, split, data_dir, views))
  if holdout:
    cases = {c: records for c, records in cases.items() if not is_held_out(c, holdout)}
    if not cases:
      raise ConfigError(f'config.data.holdout={holdout:g} holds out every case of '
                        f'{name}/{split}')
  if fraction == 1.0 and not holdout and not views:
    return source, list(cases.values())
  indices = fraction_records(cases, fraction, seed)
  position = {int(record): i for i, record in enumerate(indices)}
  chosen = set(select_cases(list(cases), fraction, seed))
  groups = [np.asarray([position[int(r)] for r in records], np.int64)
            for case_id, records in cases.items() if case_id in chosen]
  return sources.Subset(source, indices), groups
