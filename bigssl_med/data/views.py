"""Chest X-ray records by view (`config.data.views`): frontal or lateral only.

Chest X-ray studies hold frontal (PA or AP) and lateral images, and many results are
reported on frontal images only. The view is read from the data set's features:

- `frontal_lateral` (CheXpert's `Frontal/Lateral` column): `Frontal` or `Lateral`;
- `view_position` (MIMIC-CXR's `ViewPosition`, ChestX-ray14's `View Position`):
  `PA` and `AP` are frontal, `LATERAL` and `LL` lateral; other positions (`AP AXIAL`,
  `LAO`, `SWIMMERS`, ... in MIMIC-CXR) and a blank one are neither, and are left out
  under either setting.

The values come from the build's `case_index.json` (`sources.record_features`), so
selecting views reads no images, unless the index predates them (or the split is
sliced): the records are then scanned.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from bigssl_med.data import sources
from bigssl_med.errors import ConfigError

VIEWS = ('', 'frontal', 'lateral')  # '': every image
VIEW_FEATURES = ('frontal_lateral', 'view_position')  # in this order of preference
FRONTAL_POSITIONS = frozenset({'PA', 'AP'})
LATERAL_POSITIONS = frozenset({'LATERAL', 'LL'})


def view_feature(views: str, features: Mapping[str, Any], name: str) -> str | None:
  """The feature that `views` is read from in a data set with `features` (None for '').

  Raises:
    ConfigError: `views` is not one of `VIEWS`, or the data set has no view feature.
  """
  if views not in VIEWS:
    raise ConfigError(f'config.data.views={views!r} is not one of '
                      f'{", ".join(repr(v) for v in VIEWS)}')
  if not views:
    return None
  for feature in VIEW_FEATURES:
    if feature in features:
      return feature
  raise ConfigError(f'config.data.views={views!r}: data set {name} has no view feature '
                    f'({" or ".join(VIEW_FEATURES)}); set it to \'\' for every image')


def view_of(feature: str, value: str) -> str:
  """'frontal', 'lateral' or '' (neither, or unknown) for a record's value of `feature`."""
  value = value.strip().upper()
  if feature == 'frontal_lateral':
    return {'FRONTAL': 'frontal', 'LATERAL': 'lateral'}.get(value, '')
  if value in FRONTAL_POSITIONS:
    return 'frontal'
  if value in LATERAL_POSITIONS:
    return 'lateral'
  return ''


def keep(name: str, split: str, data_dir: str, views: str) -> np.ndarray | None:
  """Boolean mask over the records of `split`: those of `views` (None for '': all).

  Raises:
    ConfigError: as `view_feature`, or no record of the split has that view.
    DataError: the data set or split is missing.
  """
  feature = view_feature(views, sources.dataset_info(name, data_dir).features, name)
  if feature is None:
    return None
  values = sources.record_features(name, split, data_dir, (feature,))[feature]
  found = np.asarray([view_of(feature, v) for v in values], dtype=object)
  mask = found == views
  if not mask.any():
    raise ConfigError(f'config.data.views={views!r}: no image of {name}/{split} is '
                      f'{views} ({feature} values: {_counts(values)})')
  other = int((found == '').sum())
  logging.info('%s/%s: %d of %d images are %s (config.data.views)%s.', name, split,
               int(mask.sum()), len(mask), views,
               f'; {other} of neither view left out' if other else '')
  return mask


def keep_cases(cases: Mapping[str, np.ndarray], mask: np.ndarray | None
               ) -> dict[str, np.ndarray]:
  """`cases` (case_id -> record indices) with only the records `mask` keeps; cases left
  with none are dropped."""
  if mask is None:
    return dict(cases)
  kept = {case_id: records[mask[records]] for case_id, records in cases.items()}
  return {case_id: records for case_id, records in kept.items() if len(records)}


def open_split(name: str, split: str, data_dir: str, views: str) -> Sequence[dict[str, Any]]:
  """`sources.open_split`, with only the records of `views` ('' : all of them)."""
  return open_cases(name, split, data_dir, views, by_case=False)[0]


def open_cases(name: str, split: str, data_dir: str, views: str, *, by_case: bool
               ) -> tuple[Sequence[dict[str, Any]], list[np.ndarray] | None]:
  """The records of `split` (only those of `views`, unless '') and, with `by_case`,
  their positions in that source grouped by case (`sources.case_index` order)."""
  source = sources.open_split(name, split, data_dir)
  mask = keep(name, split, data_dir, views)
  if mask is None:
    return source, (sources.case_index(name, split, data_dir) if by_case else None)
  kept = np.flatnonzero(mask)
  if not by_case:
    return sources.Subset(source, kept), None
  position = np.full(len(mask), -1, np.int64)
  position[kept] = np.arange(len(kept))
  cases = keep_cases(sources.cases(name, split, data_dir), mask)
  return sources.Subset(source, kept), [position[records] for records in cases.values()]


def _counts(values: Sequence[str]) -> str:
  counts = {}
  for value in values:
    counts[value] = counts.get(value, 0) + 1
  return ', '.join(f'{v!r}: {n}' for v, n in sorted(counts.items())[:10]) or 'none'
