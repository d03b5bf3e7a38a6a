"""Random-access sources over data sets built by `python -m bigssl_med.build_data`.

Images stay encoded bytes (`tfds.decode.SkipDecoding`): decoding and cropping happen
later, in the input pipeline. Nothing here imports TensorFlow, grain or JAX.

`case_index.json` (written next to `dataset_info.json` by `write_case_index` at the
end of a build) records, for each split, the `case_id` of every record in record
order, so that grouping records by case (MICLe) needs no scan of the records, and
the same for the small features of `INDEX_FEATURES` the data set has (the chest
X-ray view and the study), which select records by view (`bigssl_med.data.views`)
and group predictions by study (`bigssl_med.eval_units`):

    {"format_version": 1, "dataset": NAME, "version": "1.0.0",
     "splits": {"train": {"num_records": N, "case_ids": ["HAM_...", ...],
                          "features": {"study": ["study1", ...], ...}}, ...}}

`label_index.npz`, written beside it, holds the label features of `LABEL_FEATURES`
(a class index `label`, or a vector of per-label values `labels`) of every record as
one array per split and feature, member `SPLIT.FEATURE`, in record order, so that
counting a label fraction's classes or checking the labels of a validation split
reads no image (`record_labels`).

An index written before `features` or `label_index.npz` existed lacks them: they are
then read by a scan of the records, and `python -m bigssl_med.build_data NAME
--data_dir=...` on the finished build adds them to the index without rebuilding.
"""

from __future__ import annotations

import collections.abc
import json
import os
from typing import Any, Sequence
import zipfile

from absl import logging
from google.protobuf import message as protobuf_message
import numpy as np
import tensorflow_datasets as tfds

from bigssl_med import files
from bigssl_med import staging
from bigssl_med.data import splits
from bigssl_med.errors import DamagedBuild, DataError
import tfds_builders

CASE_INDEX_FILE = 'case_index.json'
LABEL_INDEX_FILE = 'label_index.npz'
DATASET_INFO_FILE = 'dataset_info.json'
CASE_INDEX_FORMAT_VERSION = 1
_SCAN_CHUNK = 1024
# Per-record features `case_index.json` keeps beside `case_id`, where a data set has
# them: the view of a chest X-ray (CheXpert's `frontal_lateral`, MIMIC-CXR's and
# ChestX-ray14's `view_position`) and its study (CheXpert's `study` within the patient,
# MIMIC-CXR's `study_id`).
INDEX_FEATURES = ('frontal_lateral', 'view_position', 'study', 'study_id')
# Label features `label_index.npz` keeps as arrays, where a data set has them: a class
# index, or a vector of per-label values (CheXpert's 1, 0, -1 and NaN for blank).
LABEL_FEATURES = ('label', 'labels')


def build_command(name: str, data_dir: str) -> str:
  """The command line that builds `name` into `data_dir`.

  This project's builders build with `bigssl_med.build_data`; any other name (a TFDS
  catalog data set such as `imagenet2012`) with TFDS's own command, in array_record.
  """
  if split_name(name)[0] in tfds_builders.BUILDERS:
    return (f'python -m bigssl_med.build_data {name} --manual_dir=... '
            f'--data_dir={data_dir}')
  return (f'tfds build {name} --file_format=array_record --manual_dir=... '
          f'--data_dir={data_dir}')


def rebuild_hint(name: str, data_dir: str) -> str:
  """`rebuild with: COMMAND --overwrite`, the end of a damaged build's errors."""
  return f'rebuild with: {build_command(name, os.path.abspath(data_dir))} --overwrite'


def has_info(version_dir: str) -> bool:
  """Whether `version_dir` holds a `dataset_info.json`: a build was put there (complete,
  or damaged since: `build_damage` tells)."""
  return os.path.isfile(os.path.join(version_dir, DATASET_INFO_FILE))


def is_complete_build(version_dir: str) -> bool:
  """Whether `version_dir` holds a finished TFDS build whose files are all in place:
  a `dataset_info.json` and nothing `build_damage` finds wrong."""
  return has_info(version_dir) and not build_damage(version_dir)


def build_damage(version_dir: str) -> str:
  """What cheap checks find wrong with the build in `version_dir`: '' when nothing,
  otherwise one line that starts with the file at fault (`PATH: missing`).

  `dataset_info.json` and `features.json` must load, every shard file they list must
  exist, and an array_record shard's index (at its end, so a truncated file fails)
  must read and count the records `dataset_info.json` says. No record is read, and a
  shard found sound is not read again in this process while it is the same file
  (inode, size and modification time).
  """
  try:
    builder = _open_builder(version_dir)
  except DataError as exc:
    return str(exc)
  array_record = builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  for split, info in builder.info.splits.items():
    for instruction in info.file_instructions:
      path = os.fspath(instruction.filename)
      try:
        stat = os.stat(path)
      except OSError:
        return f'{path}: missing (a shard of split {split} in {DATASET_INFO_FILE})'
      key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns, instruction.examples_in_shard)
      if array_record and key not in _SOUND_SHARDS:
        problem = _array_record_damage(path, instruction.examples_in_shard)
        if problem:
          return f'{path}: {problem}'
        _SOUND_SHARDS.add(key)
  return ''


# (path, inode, size, modification time, records) of the shards found sound.
_SOUND_SHARDS: set[tuple[str, int, int, int, int]] = set()


def _array_record_damage(path: str, num_records: int) -> str:
  """'' when the array_record file's index reads and counts `num_records` records."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(path, options='readahead_buffer_size:0')
    ok, found = reader.ok(), reader.num_records()
    reader.close()  # raises the reader's error, if it had one
  except (OSError, RuntimeError, ValueError) as exc:
    return f'damaged ({_detail(exc)})'
  if not ok:
    return 'damaged (its index cannot be read)'
  if found != num_records:
    return f'damaged (holds {found} records, {DATASET_INFO_FILE} says {num_records})'
  return ''


def _detail(exc: BaseException) -> str:
  """`Type: message`, on one line."""
  return f'{type(exc).__name__}: {" ".join(str(exc).split())}'


def check_build(version_dir: str, name: str, data_dir: str) -> None:
  """Raises a one-line DamagedBuild naming the file at fault and the rebuild command when
  `build_damage` finds the build in `version_dir` damaged."""
  damage = build_damage(version_dir)
  if damage:
    raise DamagedBuild(f'{damage}; {rebuild_hint(name, data_dir)}')


def set_aside_path(version_dir: str) -> str:
  """Where `build_data --overwrite` keeps the earlier build while the new one moves in."""
  return f'{version_dir}.old'


def restore_set_aside_build(version_dir: str | None, *, lock: bool = True) -> None:
  """Puts back an earlier build that a rebuild set aside and did not replace (killed
  between its two renames), so a complete build is never lost.

  Args:
    version_dir: the build's place (None: nothing to do).
    lock: lock the folder holding `version_dir` first (`staging.exclusive`), as a
      build does for its two renames, so that a rebuild between them is waited for
      rather than undone; False for a caller holding that lock.
  """
  if version_dir is None or os.path.exists(version_dir):
    return
  old = set_aside_path(version_dir)
  if not has_info(old):
    return
  if lock:
    with staging.exclusive(os.path.dirname(version_dir)):
      restore_set_aside_build(version_dir, lock=False)
    return
  logging.warning('%s: put back in place (a rebuild set it aside, then stopped)', old)
  try:
    os.rename(old, version_dir)
  except OSError:  # another process, without locks, put it back first
    pass


def split_name(name: str) -> tuple[str, str | None]:
  """`'chexpert/side320'` -> `('chexpert', 'side320')`; `'ham10000'` -> `('ham10000', None)`."""
  base, _, config = name.partition('/')
  return base, (config or None)


def version_dir_of(name: str, data_dir: str) -> str | None:
  """Where `build_data` puts data set `name` (`NAME[/CONFIG]`) under `data_dir`.

  `data_dir/NAME/CONFIG/VERSION` for a builder of `tfds_builders.BUILDERS` with
  configs (CONFIG defaults to the builder's first config), `data_dir/NAME/VERSION`
  for one without; None for a name that is not one of the project's builders.
  """
  base, config = split_name(name)
  builder_cls = tfds_builders.BUILDERS.get(base)
  if builder_cls is None:
    return None
  parts = [os.path.abspath(os.fspath(data_dir)), base]
  if builder_cls.BUILDER_CONFIGS:
    parts.append(config or builder_cls.BUILDER_CONFIGS[0].name)
  elif config:
    raise DataError(f'data set {base} has no builder configs, got {name!r}')
  return os.path.join(*parts, str(builder_cls.VERSION))


def built_configs(name: str, data_dir: str) -> list[str]:
  """`NAME/CONFIG` of each build of data set `name`'s builder (any config, the builder's
  version; a `dataset_info.json` there) under `data_dir`, sorted; [] for a name that is
  not one of the project's builders or a builder without configs."""
  base, _ = split_name(name)
  builder_cls = tfds_builders.BUILDERS.get(base)
  if builder_cls is None or not builder_cls.BUILDER_CONFIGS:
    return []
  root = os.path.join(os.path.abspath(os.fspath(data_dir)), base)
  try:
    entries = sorted(os.listdir(root))
  except OSError:
    return []
  return [f'{base}/{entry}' for entry in entries if not entry.startswith('.')
          and has_info(os.path.join(root, entry, str(builder_cls.VERSION)))]


def built_here(name: str, data_dir: str, prefix: str = ' ') -> str:
  """`{prefix}built here: NAME/A, NAME/B` for the configs of `name`'s builder built in
  `data_dir` (`built_configs`); '' when there are none."""
  built = built_configs(name, data_dir)
  return f'{prefix}built here: {", ".join(built)}' if built else ''


def find_version_dir(name: str, data_dir: str) -> str:
  """Returns the directory of the built data set `name` under `data_dir`.

  `name` is `NAME` or `NAME/CONFIG` (e.g. `chexpert/side320`). For a builder in
  `tfds_builders.BUILDERS` this is `version_dir_of(name, data_dir)`; for another
  name, the newest complete version found under `data_dir/NAME[/CONFIG]`.

  Raises:
    DataError: the data dir or a complete build is missing; the message says
      where it looked, the command that builds the data set and the configs of
      its builder that are built there (`built_configs`). Or the build is damaged
      (`build_damage`): the message names the file and the command that rebuilds it.
  """
  data_dir = os.path.abspath(os.fspath(data_dir))
  how = f'build it with: {build_command(name, data_dir)}'
  if not os.path.isdir(data_dir):
    raise DataError(f'data dir {data_dir} does not exist (looking for data set '
                    f'{name}); {how}')
  version_dir = version_dir_of(name, data_dir)
  if version_dir is not None:
    restore_set_aside_build(version_dir)
    if has_info(version_dir):
      check_build(version_dir, name, data_dir)
      return version_dir
    raise DataError(f'data set {name} is not built in {data_dir} (no '
                    f'{os.path.join(version_dir, DATASET_INFO_FILE)}); {how}'
                    f'{built_here(name, data_dir, "; ")}')
  dataset_dir = os.path.join(data_dir, name)
  versions = []
  if os.path.isdir(dataset_dir):
    for entry in os.listdir(dataset_dir):
      if has_info(os.path.join(dataset_dir, entry)):
        try:
          versions.append((tfds.core.Version(entry), entry))
        except ValueError:  # Not a version directory, e.g. incomplete.*.
          continue
  if not versions:
    raise DataError(f'data set {name} is not built in {data_dir} (no complete '
                    f'version under {dataset_dir}); {how}')
  version_dir = os.path.join(dataset_dir, max(versions)[1])
  check_build(version_dir, name, data_dir)
  return version_dir


def dataset_info(name: str, data_dir: str) -> tfds.core.DatasetInfo:
  """The `tfds.core.DatasetInfo` of a built data set (class names, split sizes).

  Raises:
    DataError: the data set is not built in `data_dir` (says how to build it).
  """
  return _builder(name, data_dir).info


def open_split(name: str, split: str, data_dir: str) -> Sequence[dict[str, Any]]:
  """Opens one split of a built data set as a random-access TFDS data source.

  `source[i]` is a dict of NumPy values; image features (`image`, and `mask`
  where the data set has one) are the encoded bytes as stored, Text features are
  `bytes`. TFDS slicing syntax (`'train[:10%]'`) and sums of splits
  (`'train+unlabeled'`: the records of each, in that order) are accepted.

  Raises:
    DataError: the data set is not built in `data_dir` (says how to build it),
      or the split does not exist (names the available splits).
  """
  builder = _builder(name, data_dir)
  _check_split(builder.info, name, split)
  return _data_source(builder, name, split, data_dir)


def case_index(name: str, split: str, data_dir: str) -> list[np.ndarray]:
  """Record indices of `split` grouped by `case_id`.

  Returns:
    One sorted int64 array per case, cases ordered by first appearance in the
    records (the values of `cases(name, split, data_dir)`).

  Raises:
    DataError: data set or split missing, or a `case_index.json` that does not
      match the split (says to rebuild).
  """
  return list(cases(name, split, data_dir).values())


def cases(name: str, split: str, data_dir: str) -> dict[str, np.ndarray]:
  """`case_id` -> sorted int64 record indices of `split`, by first appearance.

  Read from `case_index.json` when the build wrote one; otherwise (or for a
  sliced split such as 'train[:10%]') computed by scanning the records'
  `case_id`, with a logged notice. A data set without a `case_id` feature (a TFDS
  catalog set such as `imagenet2012`) has one case per record, keyed by the
  record's index ('0', '1', ...), also with a logged notice. For a sum of splits
  (`'train+unlabeled'`) the indices are into the records of each split in turn, and
  a case with records in several of them is one case.

  Raises:
    DataError: data set or split missing, or a `case_index.json` that does not
      match the split (says to rebuild).
  """
  builder = _builder(name, data_dir)
  _check_split(builder.info, name, split)
  version_dir = os.fspath(builder.data_dir)
  if not has_cases(builder.info):
    num_records = len(_data_source(builder, name, split, data_dir))
    logging.info('Notice: data set %s has no case_id feature: each of the %d records of split '
                 '%s is a case of its own.', name, num_records, split)
    return {str(i): np.asarray([i], np.int64) for i in range(num_records)}
  path = os.path.join(version_dir, CASE_INDEX_FILE)
  if '[' not in split and os.path.exists(path):
    case_ids = []
    for part in splits.parts(split):
      num_records = builder.info.splits[part].num_examples
      case_ids += _read_index(path, name, part, num_records, data_dir)['case_ids']
  else:
    logging.info('Notice: no %s for %s split %s in %s; scanning the case_id of '
                 'every record.', CASE_INDEX_FILE, name, split, version_dir)
    case_ids = scan_case_ids(_data_source(builder, name, split, data_dir))
  return group_cases(case_ids)


def record_features(name: str, split: str, data_dir: str,
                    keys: Sequence[str]) -> dict[str, list[str]]:
  """`{feature: [its value as text for each record of split, in record order]}`.

  Read from `case_index.json` where the build recorded them (`case_id` and the
  `INDEX_FEATURES`);
  otherwise (an index written before these features were kept, a sliced split, a
  feature that is not indexed) by scanning the records, with a logged notice. A sum
  of splits gives the values of each in turn.

  Raises:
    DataError: the data set, the split or a feature is missing, or a
      `case_index.json` that does not match the split (says to rebuild).
  """
  builder = _builder(name, data_dir)
  _check_split(builder.info, name, split)
  _check_features(builder.info, name, keys)
  path = os.path.join(os.fspath(builder.data_dir), CASE_INDEX_FILE)
  values = {key: [] for key in keys}
  if '[' not in split and os.path.exists(path):
    for part in splits.parts(split):
      entry = _read_index(path, name, part, builder.info.splits[part].num_examples, data_dir)
      indexed = {'case_id': entry['case_ids'], **entry['features']}
      if not all(key in indexed for key in keys):
        break
      for key in keys:
        values[key] += [str(v) for v in indexed[key]]
    else:
      return values
  logging.info('Notice: %s of %s split %s not in its %s; scanning every record (`python -m '
               'bigssl_med.build_data %s --data_dir=%s` adds them to the index).',
               ', '.join(keys), name, split, CASE_INDEX_FILE, name, os.path.abspath(data_dir))
  return scan_features(_data_source(builder, name, split, data_dir), keys)


def record_labels(name: str, split: str, data_dir: str, key: str) -> np.ndarray:
  """The label feature `key` of every record of `split`, in record order, stacked:
  shape `(records, *feature shape)`, the feature's dtype.

  Read from `label_index.npz` where the build recorded it (`LABEL_FEATURES`); otherwise
  (a build indexed before labels were kept, a sliced split, another feature) by
  scanning the records, with a logged notice. A sum of splits gives the values of each
  in turn.

  Raises:
    DataError: the data set, the split or the feature is missing, or a
      `label_index.npz` that is unreadable or does not match the split (says to rebuild).
  """
  builder = _builder(name, data_dir)
  _check_split(builder.info, name, split)
  _check_features(builder.info, name, (key,))
  spec = _array_spec(builder.info.features[key])
  path = os.path.join(os.fspath(builder.data_dir), LABEL_INDEX_FILE)
  if '[' not in split and key in LABEL_FEATURES and os.path.exists(path):
    parts = [_read_label_index(path, name, part, key, builder.info.splits[part].num_examples,
                               spec[0], data_dir) for part in splits.parts(split)]
    if all(part is not None for part in parts):
      return np.concatenate(parts).astype(spec[1], copy=False)
  logging.info('Notice: %s of %s split %s not in its %s; scanning every record (`python -m '
               'bigssl_med.build_data %s --data_dir=%s` adds it to the index).',
               key, name, split, LABEL_INDEX_FILE, name, os.path.abspath(data_dir))
  return _scan(_data_source(builder, name, split, data_dir), (), {key: spec})[1][key]


def index_is_current(version_dir: str) -> bool:
  """Whether the build in `version_dir` has a `case_index.json` that holds every
  `INDEX_FEATURES` feature the data set has, and a `label_index.npz` that holds every
  `LABEL_FEATURES` one, for each split (False when unreadable)."""
  path = os.path.join(version_dir, CASE_INDEX_FILE)
  if not os.path.exists(path):
    return False
  try:
    info = _open_builder(version_dir).info
    wanted = [key for key in INDEX_FEATURES if key in info.features]
    with open(path) as f:
      entries = json.load(f)['splits']
    if not all(key in (entries[split].get('features') or {})
               for split in info.splits for key in wanted):
      return False
    labels = [key for key in LABEL_FEATURES if key in info.features]
    if not labels:
      return True
    with np.load(os.path.join(version_dir, LABEL_INDEX_FILE), allow_pickle=False) as npz:
      members = set(npz.files)
    return all(_label_member(split, key) in members for split in info.splits for key in labels)
  except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile):
    return False


def fingerprint(name: str, data_dir: str, read: Sequence[str]) -> dict[str, Any]:
  """What tells one build of the splits a run reads from another: the data set's name,
  config and version, and the records and bytes of each split, not where it lies.

  `read`: the split strings the run trains and selects its model on (slices and sums
  allowed, empty ones ignored); other splits may change between attempts of a run.
  A run records this in its workdir (`data.json`) and a resumed run compares: the
  stream's saved position points into the records as they were built, so another
  build (more images, another size) would go on with other examples, unsaid.
  """
  info = dataset_info(name, data_dir)
  names = sorted({part for split in read if split for part in splits.parts(split)})
  return {'dataset': info.full_name,
          'splits': {split: {'num_examples': int(info.splits[split].num_examples),
                             'num_bytes': int(info.splits[split].num_bytes)}
                     for split in names if split in info.splits}}


def fingerprint_differences(saved: Any, now: dict[str, Any]) -> str:
  """The first way `now` differs from a `saved` fingerprint, in words; '' when alike."""
  if not isinstance(saved, dict) or not isinstance(saved.get('splits'), dict):
    return ''  # nothing readable to compare
  if saved.get('dataset') != now['dataset']:
    return f'data set {saved.get("dataset")} there, {now["dataset"]} now'
  before, after = saved['splits'], now['splits']
  for split in sorted(set(before) | set(after)):
    if split not in after:
      return f'{now["dataset"]} had a split {split!r} there, none now'
    if split not in before:
      return f'{now["dataset"]} has a split {split!r} now, none there'
    was, now_split = before[split], after[split]
    if was != now_split:
      def said(s):
        return f'{s.get("num_examples")} records of {s.get("num_bytes")} bytes'
      return f'{now["dataset"]} split {split!r} had {said(was)} there, {said(now_split)} now'
  return ''


def has_cases(info: tfds.core.DatasetInfo) -> bool:
  """Whether the data set's records say which case (patient, lesion) they belong to."""
  return 'case_id' in info.features


def group_cases(case_ids: Sequence[str]) -> dict[str, np.ndarray]:
  """`case_id` -> sorted positions with that id, in order of first appearance."""
  groups: dict[str, list[int]] = {}
  for i, case_id in enumerate(case_ids):
    groups.setdefault(case_id, []).append(i)
  return {case_id: np.asarray(indices, dtype=np.int64)
          for case_id, indices in groups.items()}


def group_by_case(case_ids: Sequence[str]) -> list[np.ndarray]:
  """Groups positions by value: sorted arrays, in order of first appearance."""
  return list(group_cases(case_ids).values())


class Subset(collections.abc.Sequence):
  """The records `indices` of a random-access data source, as a data source."""

  def __init__(self, source: Sequence[dict[str, Any]], indices: Sequence[int]):
    self._source = source
    self._indices = np.asarray(indices, dtype=np.int64)
    if self._indices.size and (self._indices.min() < 0
                               or self._indices.max() >= len(source)):
      raise IndexError(f'subset indices outside [0, {len(source)})')

  @property
  def indices(self) -> np.ndarray:
    return self._indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, key):
    if isinstance(key, slice):
      raise TypeError('Subset takes integer keys')
    return self._source[int(self._indices[key])]

  def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    wanted = [int(self._indices[k]) for k in keys]
    if hasattr(self._source, '__getitems__'):
      return list(self._source.__getitems__(wanted))
    return [self._source[k] for k in wanted]

  def __repr__(self) -> str:
    return f'Subset({len(self)} of {len(self._source)} records)'


def scan_case_ids(source: Sequence[dict[str, Any]]) -> list[str]:
  """Reads `case_id` of every record of a data source, in record order."""
  return scan_features(source, ('case_id',))['case_id']


def scan_features(source: Sequence[dict[str, Any]],
                  keys: Sequence[str]) -> dict[str, list[str]]:
  """Reads the features `keys` of every record of a data source as text, in record order."""
  return _scan(source, keys, {})[0]


def _scan(source: Sequence[dict[str, Any]], text_keys: Sequence[str],
          array_keys: dict[str, tuple[tuple[int, ...], np.dtype]]
          ) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
  """One pass over the records of a data source: the features `text_keys` as text and
  the features `array_keys` (`{key: (shape, dtype)}`) stacked, each in record order."""
  text = {key: [] for key in text_keys}
  arrays = {key: [] for key in array_keys}
  for start in range(0, len(source), _SCAN_CHUNK):
    indices = list(range(start, min(start + _SCAN_CHUNK, len(source))))
    for record in source.__getitems__(indices):
      for key in text_keys:
        value = record[key]
        text[key].append(value.decode('utf-8') if isinstance(value, bytes) else str(value))
      for key in array_keys:
        arrays[key].append(record[key])
  stacked = {key: np.asarray(arrays[key], dtype=dtype).reshape((-1, *shape))
             for key, (shape, dtype) in array_keys.items()}
  return text, stacked


def write_case_index(version_dir: str) -> str:
  """Scans each split of the build in `version_dir` once, writes `label_index.npz` (where
  the data set has `LABEL_FEATURES`), then `case_index.json`.

  Each file is written atomically (temporary file, then rename).

  Returns:
    The path of the written `case_index.json`.
  """
  version_dir = os.fspath(version_dir)
  builder = tfds.builder_from_directory(version_dir)
  features = builder.info.features
  indexed = [key for key in INDEX_FEATURES if key in features]
  labelled = {key: _array_spec(features[key]) for key in LABEL_FEATURES if key in features}
  splits, labels = {}, {}
  for split in sorted(builder.info.splits):
    source = builder.as_data_source(
        split, decoders=_skip_image_decoders(builder.info))
    values, arrays = _scan(source, ('case_id', *indexed), labelled)
    case_ids = values.pop('case_id')
    splits[split] = {'num_records': len(case_ids), 'case_ids': case_ids, 'features': values}
    labels.update({_label_member(split, key): array for key, array in arrays.items()})
  if labels:
    with files.written_whole(os.path.join(version_dir, LABEL_INDEX_FILE)) as tmp, \
        open(tmp, 'wb') as f:
      np.savez(f, **labels)
  content = {
      'format_version': CASE_INDEX_FORMAT_VERSION,
      'dataset': builder.info.name,
      'version': str(builder.info.version),
      'splits': splits,
  }
  path = os.path.join(version_dir, CASE_INDEX_FILE)
  with files.written_whole(path) as tmp, open(tmp, 'w') as f:
    json.dump(content, f)
  return path


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  return _open_builder(find_version_dir(name, data_dir), rebuild_hint(name, data_dir))


def _open_builder(version_dir: str, rebuild: str = '') -> tfds.core.DatasetBuilder:
  """`tfds.builder_from_directory`, with an unreadable `dataset_info.json` or
  `features.json` a one-line DamagedBuild error naming the file (and ending `; {rebuild}`)."""
  try:
    return tfds.builder_from_directory(version_dir)
  except Exception as exc:  # pylint: disable=broad-except  (TFDS's errors have no common type)
    culprit = version_dir
    for file_name in (DATASET_INFO_FILE, 'features.json'):
      path = os.path.join(version_dir, file_name)
      try:
        with open(path) as f:
          json.load(f)
      except (OSError, ValueError):
        culprit = path
        break
    hint = f'; {rebuild}' if rebuild else ''
    raise DamagedBuild(f'{culprit}: unreadable ({_detail(exc)}){hint}') from exc


def _data_source(builder: tfds.core.DatasetBuilder, name: str, split: str,
                 data_dir: str) -> CheckedSource:
  """A split's data source with images left encoded, its read errors one line."""
  source = builder.as_data_source(split, decoders=_skip_image_decoders(builder.info))
  shards = [(os.fspath(f.filename), int(f.skip), int(f.take))
            for f in builder.info.splits[split].file_instructions]
  return CheckedSource(source, shards, f'{name} split {split}', rebuild_hint(name, data_dir))


_READ_ERRORS = (OSError, RuntimeError, protobuf_message.Error)


class CheckedSource(collections.abc.Sequence):
  """A TFDS data source whose read errors (a missing, truncated or damaged shard) are
  one-line DamagedBuild errors naming the shard file, the record and the rebuild command.

  Picklable, as grain's worker processes need.
  """

  def __init__(self, source: Sequence[dict[str, Any]], shards: Sequence[tuple[str, int, int]],
               where: str, rebuild: str):
    """`shards`: `(file, first record read, records read)` of each, in the source's order."""
    self._source = source
    self._shards = tuple(shards)
    self._where = where
    self._rebuild = rebuild

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, key):
    if isinstance(key, slice):
      raise TypeError('CheckedSource takes integer keys')
    try:
      return self._source[key]
    except _READ_ERRORS as exc:
      raise self._error(int(key), exc) from exc

  def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    try:
      return list(self._source.__getitems__(keys))
    except _READ_ERRORS as exc:
      for key in keys:  # the record at fault, for the message
        self[key]
      raise self._error(int(keys[0]), exc) from exc

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f'CheckedSource({self._where}, {len(self)} records)'

  def _error(self, key: int, exc: BaseException) -> DamagedBuild:
    """The error for record `key`, naming the shard it lies in."""
    path, before = self._where, 0
    for shard, _, take in self._shards:
      if key < before + take:
        path = shard
        break
      before += take
    state = 'missing' if path != self._where and not os.path.exists(path) else 'damaged'
    return DamagedBuild(f'{path}: {state} (reading record {key} of {self._where}: '
                        f'{_detail(exc)}); {self._rebuild}')


def _check_split(info: tfds.core.DatasetInfo, name: str, split: str) -> None:
  for base in splits.parts(split):
    if base not in info.splits:
      available = ', '.join(sorted(info.splits)) or 'none'
      raise DataError(f'data set {name} has no split {base!r}; available splits: '
                      f'{available}')


def _skip_image_decoders(info: tfds.core.DatasetInfo) -> dict[str, Any]:
  """SkipDecoding for every top-level image feature (`image`, `mask`)."""
  return {key: tfds.decode.SkipDecoding()
          for key, feature in info.features.items()
          if isinstance(feature, tfds.features.Image)}


def _check_features(info: tfds.core.DatasetInfo, name: str, keys: Sequence[str]) -> None:
  missing = [key for key in keys if key not in info.features]
  if missing:
    raise DataError(f'data set {name} has no feature {", ".join(missing)}; its features: '
                    f'{", ".join(sorted(info.features))}')


def _array_spec(feature: tfds.features.FeatureConnector) -> tuple[tuple[int, ...], np.dtype]:
  """`(shape, dtype)` of one record's value of `feature`."""
  return tuple(feature.shape), np.dtype(feature.np_dtype)


def _label_member(split: str, key: str) -> str:
  """The member of `label_index.npz` that holds feature `key` of `split`."""
  return f'{split}.{key}'


def _read_label_index(path: str, name: str, split: str, key: str, num_records: int,
                      shape: tuple[int, ...], data_dir: str) -> np.ndarray | None:
  """Feature `key` of `split` from a label_index.npz (None when the file lacks it),
  checked against the split's record count and the feature's shape."""
  rebuild = rebuild_hint(name, data_dir)
  try:
    with np.load(path, allow_pickle=False) as npz:
      member = _label_member(split, key)
      if member not in npz.files:
        return None
      values = npz[member]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
    raise DataError(f'{path}: unreadable label index ({_detail(exc)}); {rebuild}') from exc
  if values.shape != (num_records, *shape):
    raise DataError(f'{path}: label index {member} has shape {values.shape}, split {split} '
                    f'needs {(num_records, *shape)}; {rebuild}')
  return values


def _read_index(path: str, name: str, split: str, num_records: int,
                data_dir: str) -> dict[str, Any]:
  """Reads and checks the `split` entry of a case_index.json: `case_ids` (text) and
  `features` (`{feature: values}`, absent or partial in an older index)."""
  rebuild = rebuild_hint(name, data_dir)
  try:
    with open(path) as f:
      entry = json.load(f)['splits'][split]
    case_ids = entry['case_ids']
    recorded = int(entry['num_records'])
    features = dict(entry.get('features') or {})
  except (OSError, ValueError, KeyError, TypeError) as exc:
    raise DataError(f'{path}: unreadable case index for split {split} '
                    f'({_detail(exc)}); {rebuild}') from exc
  if recorded != num_records or len(case_ids) != num_records:
    raise DataError(f'{path}: case index lists {len(case_ids)} records for split '
                    f'{split} but the split has {num_records}; {rebuild}')
  for key, values in features.items():
    if not isinstance(values, list) or len(values) != num_records:
      raise DataError(f'{path}: case index feature {key} of split {split} does not list '
                      f'{num_records} records; {rebuild}')
  return {'case_ids': [str(case_id) for case_id in case_ids], 'features': features}
