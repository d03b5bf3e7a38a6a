"""Tests of the mimic_cxr_jpg TFDS builder, on generated trees in PhysioNet's layout."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from bigssl_med import build_data
from bigssl_med.data import host_ops
from bigssl_med.data import sources
from bigssl_med.errors import DataError
import tfds_builders
from tfds_builders.mimic_cxr_jpg import mimic_cxr_jpg

NAME = 'mimic_cxr_jpg'
# Where `wget -r` puts the release, below the folder it runs in.
RELEASE = Path('physionet.org', 'files', 'mimic-cxr-jpg', '2.0.0')
# Published headers.
LABEL_HEADER = ('subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,'
                'Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,'
                'No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,'
                'Support Devices')
SPLIT_HEADER = 'dicom_id,study_id,subject_id,split'
METADATA_HEADER = ('dicom_id,subject_id,study_id,PerformedProcedureStepDescription,'
                   'ViewPosition,Rows,Columns,StudyDate,StudyTime,'
                   'ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,'
                   'PatientOrientationCodeSequence_CodeMeaning')
LABELS = tuple(LABEL_HEADER.split(',')[2:])

# (split value, subject_id, [(study_id, [ViewPosition of each image])]).
_SUBJECTS = (
    ('train', '10000032', [('50414267', ['PA', 'LATERAL']), ('53189527', ['AP'])]),
    ('train', '10000764', [('57375967', ['AP'])]),
    ('validate', '10001217', [('58913004', ['PA', 'LATERAL'])]),
    ('test', '10002428', [('59258269', [''])]),
)
# Label rows by study; study 57375967 has none. Labels not given are blank.
_STUDY_LABELS = {
    '50414267': {'Atelectasis': '-1.0', 'Edema': '0.0', 'Pneumonia': '1.0'},
    '53189527': {'No Finding': '1.0'},
    '58913004': {'Cardiomegaly': '1.0', 'Pleural Effusion': '-1.0',
                 'Support Devices': '0.0'},
    '59258269': {'Fracture': '1.0', 'Lung Opacity': '0.0'},
}
_SPLITS = {'train': 'train', 'validate': 'validation', 'test': 'test'}


@dataclasses.dataclass
class FakeMimic:
  """A generated tree; `rows` are the split file's rows in order (line = index + 2)."""
  root: Path  # What `wget -r` ran in: the manual_dir.
  release: Path  # The release folder (files/ and the tables).
  split_file: Path
  label_file: Path
  metadata_file: Path
  rows: list[dict]
  images: dict[str, Path]  # dicom_id -> file.

  def line_of(self, dicom_id: str) -> int:
    return next(i for i, r in enumerate(self.rows) if r['dicom_id'] == dicom_id) + 2


def dicom_id_of(*parts: str) -> str:
  digest = hashlib.sha1('/'.join(parts).encode()).hexdigest()
  return '-'.join(digest[i:i + 8] for i in range(0, 40, 8))


def read_lines(path: Path) -> list[str]:
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rt') as f:
    return f.read().splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'wt') as f:
    f.write('\n'.join(lines) + '\n')


def write_fake_mimic(root: Path, *, compressed: bool = True,
                     with_metadata: bool = True) -> FakeMimic:
  """Writes the release under `root/physionet.org/files/mimic-cxr-jpg/2.0.0/`."""
  release = root / RELEASE
  suffix = '.csv.gz' if compressed else '.csv'
  rng = np.random.default_rng(0)
  rows, images = [], {}
  split_lines, metadata_lines = [SPLIT_HEADER], [METADATA_HEADER]
  for split, subject_id, studies in _SUBJECTS:
    for study_id, views in studies:
      for k, view in enumerate(views):
        dicom_id = dicom_id_of(subject_id, study_id, str(k))
        path = (release / 'files' / f'p{subject_id[:2]}' / f'p{subject_id}' /
                f's{study_id}' / f'{dicom_id}.jpg')
        path.parent.mkdir(parents=True, exist_ok=True)
        width, height = (32, 40) if view == 'LATERAL' else (40, 32)
        pixels = np.linspace(0, 220, height)[:, None] + rng.normal(0, 20, (height, width))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode='L').save(
            path, format='JPEG')
        images[dicom_id] = path
        split_lines.append(f'{dicom_id},{study_id},{subject_id},{split}')
        metadata_lines.append(
            f'{dicom_id},{subject_id},{study_id},CHEST (PA AND LAT),{view},{height},'
            f'{width},21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect')
        rows.append({'dicom_id': dicom_id, 'subject_id': subject_id,
                     'study_id': study_id, 'split': _SPLITS[split],
                     'view_position': view,
                     'key': path.relative_to(release).as_posix()})
  label_lines = [LABEL_HEADER]
  for _, subject_id, studies in _SUBJECTS:
    for study_id, _ in studies:
      if study_id in _STUDY_LABELS:
        label_lines.append(','.join([subject_id, study_id] + [
            _STUDY_LABELS[study_id].get(name, '') for name in LABELS]))
  # A labelled study with no images in the split file is ignored.
  label_lines.append('19999999,50000001' + ',1.0' * len(LABELS))
  fake = FakeMimic(root=root, release=release,
                   split_file=release / f'mimic-cxr-2.0.0-split{suffix}',
                   label_file=release / f'mimic-cxr-2.0.0-chexpert{suffix}',
                   metadata_file=release / f'mimic-cxr-2.0.0-metadata{suffix}',
                   rows=rows, images=images)
  write_lines(fake.split_file, split_lines)
  write_lines(fake.label_file, label_lines)
  if with_metadata:
    write_lines(fake.metadata_file, metadata_lines)
  (release / 'LICENSE.txt').write_text('license')
  return fake


def expected_labels(study_id: str) -> np.ndarray:
  labels = _STUDY_LABELS.get(study_id)
  if labels is None:
    return np.full((len(LABELS),), np.nan, np.float32)
  return np.asarray([float(labels[n]) if n in labels else np.nan for n in LABELS],
                    dtype=np.float32)


def _build(manual_dir, data_dir, name=NAME, **kwargs) -> str:
  return build_data.build(name, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(manual_dir), **kwargs)


def _records(data_dir, name=NAME) -> dict[str, dict[str, dict]]:
  """split -> dicom_id -> record, read back through bigssl_med.data.sources."""
  info = sources.dataset_info(name, os.fspath(data_dir))
  out = {}
  for split in info.splits:
    source = sources.open_split(name, split, os.fspath(data_dir))
    out[split] = {r['image_id'].decode(): r for r in source}
  return out


def _assert_one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for part in parts:
    assert str(part) in message, (part, message)


@pytest.fixture
def fake(tmp_path) -> FakeMimic:
  return write_fake_mimic(tmp_path / 'raw')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(fake tree, data dir, version dir): the default config built once."""
  root = tmp_path_factory.mktemp('mimic')
  fake = write_fake_mimic(root / 'raw')
  version_dir = _build(fake.root, root / 'data')
  return fake, root / 'data', version_dir


def test_registered_with_configs():
  assert tfds_builders.BUILDERS['mimic_cxr_jpg'] is mimic_cxr_jpg.MimicCxrJpg
  assert mimic_cxr_jpg.MimicCxrJpg.name == 'mimic_cxr_jpg'
  assert str(mimic_cxr_jpg.MimicCxrJpg.VERSION) == '1.0.0'
  assert [c.name for c in mimic_cxr_jpg.MimicCxrJpg.BUILDER_CONFIGS] == [
      'side512', 'original']
  assert mimic_cxr_jpg.LABEL_NAMES == LABELS


def test_build_published_layout(built):
  fake, data_dir, version_dir = built
  assert version_dir == os.fspath(data_dir / NAME / 'side512' / '1.0.0')
  metadata = sources.dataset_info(NAME, os.fspath(data_dir)).metadata
  assert metadata['label_names'] == list(LABELS)
  assert metadata['num_studies_without_labels'] == 1
  assert metadata['num_skipped_images'] == 0
  records = _records(data_dir)
  assert {split: len(r) for split, r in records.items()} == {
      'train': 4, 'validation': 2, 'test': 1}
  for row in fake.rows:
    record = records[row['split']][row['dicom_id']]
    assert record['case_id'].decode() == row['subject_id']
    assert record['study_id'].decode() == row['study_id']
    assert record['view_position'].decode() == row['view_position']
    np.testing.assert_array_equal(record['labels'], expected_labels(row['study_id']))
    assert record['image'] == fake.images[row['dicom_id']].read_bytes()


def test_labels_keep_uncertain_blank_and_negative_apart(built):
  fake, data_dir, _ = built
  records = _records(data_dir)
  first = dict(zip(LABELS, records['train'][fake.rows[0]['dicom_id']]['labels']))
  assert first['Atelectasis'] == -1.0
  assert first['Edema'] == 0.0
  assert first['Pneumonia'] == 1.0
  assert math.isnan(first['No Finding'])
  unlabelled = next(r for r in fake.rows if r['study_id'] == '57375967')
  assert np.isnan(records['train'][unlabelled['dicom_id']]['labels']).all()


def test_case_index_groups_by_subject(built):
  fake, data_dir, _ = built
  for split in ('train', 'validation', 'test'):
    source = sources.open_split(NAME, split, os.fspath(data_dir))
    got = {}
    for group in sources.case_index(NAME, split, os.fspath(data_dir)):
      cases = {source[int(i)]['case_id'].decode() for i in group}
      assert len(cases) == 1
      got[cases.pop()] = {source[int(i)]['image_id'].decode() for i in group}
    expected = {}
    for row in fake.rows:
      if row['split'] == split:
        expected.setdefault(row['subject_id'], set()).add(row['dicom_id'])
    assert got == expected
  assert len(expected) == 1 and len(got['10002428']) == 1


def test_uncompressed_tables_and_release_folder_as_manual_dir(tmp_path):
  fake = write_fake_mimic(tmp_path / 'raw', compressed=False)
  assert fake.split_file.name == 'mimic-cxr-2.0.0-split.csv'
  _build(fake.release, tmp_path / 'data')
  records = _records(tmp_path / 'data')
  assert sum(len(r) for r in records.values()) == len(fake.rows)
  for row in fake.rows:
    assert records[row['split']][row['dicom_id']]['view_position'].decode() == (
        row['view_position'])


def test_without_metadata_file_view_position_is_empty(tmp_path):
  fake = write_fake_mimic(tmp_path / 'raw', with_metadata=False)
  _build(fake.root, tmp_path / 'data')
  records = _records(tmp_path / 'data')
  assert {r['view_position'] for by_id in records.values()
          for r in by_id.values()} == {b''}


def test_max_side_and_single_channel(fake, tmp_path):
  version_dir = _build(fake.root, tmp_path / 'data', max_side=16)
  assert version_dir == os.fspath(tmp_path / 'data' / NAME / 'side16' / '1.0.0')
  records = _records(tmp_path / 'data', name='mimic_cxr_jpg/side16')
  views = {row['dicom_id']: row['view_position'] for row in fake.rows}
  for by_id in records.values():
    for dicom_id, record in by_id.items():
      image, image_format = host_ops.decode_pil(record['image'])
      assert (image_format, image.mode) == ('JPEG', 'L')
      with Image.open(io.BytesIO(record['image'])) as stored:
        assert len(stored.getbands()) == 1
      assert image.size == ((13, 16) if views[dicom_id] == 'LATERAL' else (16, 13))


def test_subject_in_two_splits(fake, tmp_path):
  lines = read_lines(fake.split_file)
  moved = fake.rows[2]  # Subject 10000032's second study, line 4.
  assert moved['subject_id'] == '10000032'
  lines[3] = lines[3].replace(',train', ',test')
  write_lines(fake.split_file, lines)
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'case 10000032', 'train', 'test',
                         f'{fake.split_file} line 2', f'{fake.split_file} line 4')


@pytest.mark.parametrize('table, column', [('label_file', 'Edema'),
                                           ('split_file', 'split'),
                                           ('metadata_file', 'ViewPosition')])
def test_missing_column(fake, tmp_path, table, column):
  path = getattr(fake, table)
  lines = read_lines(path)
  names = lines[0].split(',')
  names[names.index(column)] = column.lower() + '_x'
  write_lines(path, [','.join(names)] + lines[1:])
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, path, 'missing column', column)


def test_missing_image(fake, tmp_path):
  row = fake.rows[4]
  os.remove(fake.images[row['dicom_id']])
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.split_file} line {fake.line_of(row["dicom_id"])}',
                         row['dicom_id'], fake.images[row['dicom_id']], 'not found')


def test_skip_bad_images(fake, tmp_path):
  missing, corrupt = fake.rows[0], fake.rows[5]
  os.remove(fake.images[missing['dicom_id']])
  fake.images[corrupt['dicom_id']].write_bytes(b'\xff\xd8 not a whole jpeg')
  _build(fake.root, tmp_path / 'data', skip_bad_images=True)
  records = _records(tmp_path / 'data')
  assert {split: len(r) for split, r in records.items()} == {
      'train': 3, 'validation': 1, 'test': 1}
  metadata = sources.dataset_info(NAME, os.fspath(tmp_path / 'data')).metadata
  assert metadata['num_skipped_images'] == 2
  skipped = {entry['path']: entry for entry in metadata['skipped_images']}
  entry = skipped[os.fspath(fake.images[missing['dicom_id']])]
  assert entry['split'] == 'train'
  assert f'line {fake.line_of(missing["dicom_id"])}' in entry['where']
  assert skipped[os.fspath(fake.images[corrupt['dicom_id']])]['split'] == 'validation'
  groups = sources.case_index(NAME, 'train', os.fspath(tmp_path / 'data'))
  assert sorted(len(g) for g in groups) == [1, 2]


@pytest.mark.parametrize('value', ['2', 'yes', '1.5'])
def test_bad_label_value(fake, tmp_path, value):
  lines = read_lines(fake.label_file)
  assert lines[3].startswith('10001217,58913004,,1.0,')  # Cardiomegaly is 1.0.
  lines[3] = lines[3].replace(',,1.0,', f',,{value},', 1)
  write_lines(fake.label_file, lines)
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.label_file} line 4', 'Cardiomegaly',
                         repr(value))


def test_bad_rows_in_split_file(fake, tmp_path):
  original = read_lines(fake.split_file)
  lines = list(original)
  lines[5] = lines[5].replace(',validate', ',val')
  write_lines(fake.split_file, lines)
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.split_file} line 6', "'val'", 'validate')
  lines = list(original)
  lines[2] = lines[2].replace(',10000032,', ',p10000032,')
  write_lines(fake.split_file, lines)
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.split_file} line 3', 'subject_id',
                         "'p10000032'")


def test_label_row_of_another_subject(fake, tmp_path):
  lines = read_lines(fake.label_file)
  assert lines[1].startswith('10000032,50414267,')
  lines[1] = lines[1].replace('10000032,', '10000764,', 1)
  write_lines(fake.label_file, lines)
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.split_file} line 2', 'study 50414267',
                         '10000764', f'{fake.label_file} line 2')


def test_duplicate_label_row(fake, tmp_path):
  lines = read_lines(fake.label_file)
  write_lines(fake.label_file, lines + [lines[2]])
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.label_file} line {len(lines) + 1}',
                         'line 3', 'study 53189527')


def test_missing_inputs(fake, tmp_path):
  os.rename(fake.release / 'files', fake.release / 'images')
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'files/', fake.split_file)
  os.remove(fake.label_file)
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'mimic-cxr-2.0.0-chexpert.csv.gz', fake.root)
  os.remove(fake.split_file)
  with pytest.raises(DataError) as excinfo:
    _build(fake.root, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'mimic-cxr-2.0.0-split.csv.gz', fake.root)


def test_without_manual_dir(tmp_path):
  with pytest.raises(DataError) as excinfo:
    build_data.build(NAME, data_dir=os.fspath(tmp_path / 'data'))
  _assert_one_line_error(excinfo, 'MIMIC-CXR-JPG', 'PhysioNet', '--manual_dir')
