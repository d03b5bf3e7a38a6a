"""Tests of the chexpert TFDS builder, on generated trees in CheXpert's layout."""

from __future__ import annotations

import dataclasses
import io
import math
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from bigssl_med import build_data
from bigssl_med.data import host_ops
from bigssl_med.data import sources
from bigssl_med.errors import DataError
import tfds_builders
from tfds_builders.chexpert import chexpert

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = 'chexpert'
SMALL = 'CheXpert-v1.0-small'
FULL = 'CheXpert-v1.0'
# The header of the published train.csv and valid.csv.
HEADER = ('Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,'
          'Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,'
          'Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,'
          'Support Devices')
LABELS = tuple(HEADER.split(',')[5:])

# (split folder, patient, study, view, sex, age, frontal/lateral, AP/PA, labels);
# labels not given are blank.
_ROWS = (
    ('train', 'patient00001', 'study1', 'view1_frontal', 'Female', '68', 'Frontal',
     'AP', {'No Finding': '1.0', 'Pneumothorax': '0.0', 'Support Devices': '1.0'}),
    ('train', 'patient00002', 'study2', 'view1_frontal', 'Female', '87', 'Frontal',
     'AP', {'Cardiomegaly': '-1.0', 'Lung Opacity': '1.0', 'Edema': '-1.0',
            'Consolidation': '-1.0', 'Atelectasis': '-1.0',
            'Pleural Effusion': '-1.0', 'Fracture': '1.0'}),
    ('train', 'patient00002', 'study1', 'view1_frontal', 'Female', '83', 'Frontal',
     'AP', {'Lung Opacity': '1.0', 'Fracture': '1.0'}),
    ('train', 'patient00002', 'study1', 'view2_lateral', 'Female', '83', 'Lateral',
     '', {'Lung Opacity': '1.0', 'Fracture': '1.0'}),
    ('train', 'patient00003', 'study1', 'view1_frontal', 'Unknown', '', 'Frontal',
     'PA', {'No Finding': '0.0', 'Edema': '1.0', 'Pleural Effusion': '0.0'}),
    ('valid', 'patient64541', 'study1', 'view1_frontal', 'Male', '73', 'Frontal',
     'AP', {name: '1.0' if i % 3 == 0 else '0.0' for i, name in enumerate(LABELS)}),
    ('valid', 'patient64542', 'study1', 'view2_lateral', 'Male', '70', 'Lateral',
     '', {name: '0.0' for name in LABELS}),
    ('valid', 'patient64542', 'study1', 'view1_frontal', 'Male', '70', 'Frontal',
     'PA', {name: '0.0' for name in LABELS}),
)
_SPLITS = {'train': 'train', 'valid': 'validation'}


@dataclasses.dataclass
class FakeChexpert:
  """A generated tree: `rows` in file order (per CSV), `images` by image id."""
  parent: Path
  folder: Path
  csv: dict[str, Path]  # TFDS split -> CSV file.
  rows: list[dict]
  images: dict[str, Path]

  def line_of(self, image_id: str) -> int:
    """The CSV line of an image (the header is line 1)."""
    row = next(r for r in self.rows if r['image_id'] == image_id)
    same = [r for r in self.rows if r['split'] == row['split']]
    return same.index(row) + 2


def write_fake_chexpert(parent: Path, folder: str = SMALL,
                        prefix: str | None = None) -> FakeChexpert:
  """Writes a CheXpert tree: `parent/folder/{train,valid}.csv` and images.

  Args:
    parent: the folder that holds the data set folder.
    folder: the data set folder's name.
    prefix: first component of the CSV `Path`s (default: `folder`, as published).
  """
  prefix = folder if prefix is None else prefix
  root = parent / folder
  rng = np.random.default_rng(0)
  rows, images, lines = [], {}, {'train': [HEADER], 'valid': [HEADER]}
  for split_dir, patient, study, view, sex, age, fl, appa, labels in _ROWS:
    image_id = f'{split_dir}/{patient}/{study}/{view}.jpg'
    path = root / image_id
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = (40, 32) if fl == 'Frontal' else (32, 40)
    ramp = np.linspace(0, 200, width)[None, :] + rng.normal(0, 20, (height, width))
    Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8), mode='L').save(
        path, format='JPEG')
    images[image_id] = path
    values = [f'{prefix}/{image_id}', sex, age, fl, appa] + [
        labels.get(name, '') for name in LABELS]
    lines[split_dir].append(','.join(values))
    rows.append({'split': _SPLITS[split_dir], 'image_id': image_id,
                 'case_id': patient, 'study': study, 'view': view, 'sex': sex,
                 'age': age, 'frontal_lateral': fl, 'ap_pa': appa,
                 'labels': labels})
  csv = {}
  for split_dir, split in _SPLITS.items():
    csv[split] = root / f'{split_dir}.csv'
    csv[split].write_text('\n'.join(lines[split_dir]) + '\n')
  return FakeChexpert(parent=parent, folder=root, csv=csv, rows=rows,
                      images=images)


def expected_labels(row: dict) -> np.ndarray:
  return np.asarray([float(row['labels'][name]) if name in row['labels'] else np.nan
                     for name in LABELS], dtype=np.float32)


def _build(manual_dir, data_dir, name=NAME, **kwargs) -> str:
  return build_data.build(name, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(manual_dir), **kwargs)


def _records(data_dir, name=NAME) -> dict[str, dict[str, dict]]:
  """split -> image_id -> record, read back through bigssl_med.data.sources."""
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


def _edit_line(path: Path, line: int, old: str, new: str) -> None:
  lines = path.read_text().splitlines()
  assert old in lines[line - 1], (old, lines[line - 1])
  lines[line - 1] = lines[line - 1].replace(old, new, 1)
  path.write_text('\n'.join(lines) + '\n')


@pytest.fixture
def fake(tmp_path) -> FakeChexpert:
  return write_fake_chexpert(tmp_path / 'raw')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(fake tree, data dir) with the default config built from the parent folder."""
  root = tmp_path_factory.mktemp('chexpert')
  fake = write_fake_chexpert(root / 'raw')
  version_dir = _build(fake.parent, root / 'data')
  return fake, root / 'data', version_dir


def test_registered_with_configs():
  assert tfds_builders.BUILDERS['chexpert'] is chexpert.Chexpert
  assert chexpert.Chexpert.name == 'chexpert'
  assert str(chexpert.Chexpert.VERSION) == '1.0.0'
  assert [c.name for c in chexpert.Chexpert.BUILDER_CONFIGS] == ['side512', 'original']
  assert chexpert.LABEL_NAMES == LABELS


def test_build_small_layout_from_parent(built):
  fake, data_dir, version_dir = built
  assert version_dir == os.fspath(data_dir / NAME / 'side512' / '1.0.0')
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  assert info.metadata['label_names'] == list(LABELS)
  assert info.metadata['max_side'] == 512
  assert info.metadata['num_skipped_images'] == 0
  records = _records(data_dir)
  assert {split: len(r) for split, r in records.items()} == {
      'train': 5, 'validation': 3}
  for row in fake.rows:
    record = records[row['split']][row['image_id']]
    for key in ('case_id', 'study', 'view', 'sex', 'frontal_lateral', 'ap_pa'):
      assert record[key].decode() == row[key], key
    if row['age']:
      assert record['age'] == pytest.approx(float(row['age']))
    else:
      assert math.isnan(record['age'])
    np.testing.assert_array_equal(record['labels'], expected_labels(row))
    assert record['labels'].dtype == np.float32
    # Small grayscale JPEGs are kept as published.
    assert record['image'] == fake.images[row['image_id']].read_bytes()
    image, _ = host_ops.decode_pil(record['image'])
    assert image.mode == 'L'


def test_labels_keep_uncertain_blank_and_negative_apart(built):
  _, data_dir, _ = built
  record = _records(data_dir)['train']['train/patient00002/study2/view1_frontal.jpg']
  labels = dict(zip(LABELS, record['labels']))
  assert labels['Cardiomegaly'] == -1.0
  assert labels['Lung Opacity'] == 1.0
  assert math.isnan(labels['No Finding'])
  negative = _records(data_dir)['train']['train/patient00001/study1/view1_frontal.jpg']
  assert dict(zip(LABELS, negative['labels']))['Pneumothorax'] == 0.0
  values = np.concatenate([r['labels'] for by_id in _records(data_dir).values()
                           for r in by_id.values()])
  assert set(values[~np.isnan(values)].tolist()) == {-1.0, 0.0, 1.0}
  assert np.isnan(values).any()


def test_case_index_groups_by_patient(built):
  fake, data_dir, _ = built
  for split in ('train', 'validation'):
    source = sources.open_split(NAME, split, os.fspath(data_dir))
    groups = sources.case_index(NAME, split, os.fspath(data_dir))
    got = {}
    for group in groups:
      ids = {source[int(i)]['image_id'].decode() for i in group}
      cases = {source[int(i)]['case_id'].decode() for i in group}
      assert len(cases) == 1
      got[cases.pop()] = ids
    expected = {}
    for row in fake.rows:
      if row['split'] == split:
        expected.setdefault(row['case_id'], set()).add(row['image_id'])
    assert got == expected
  assert len(expected['patient64542']) == 2


@pytest.mark.parametrize('folder, prefix, manual', [
    (SMALL, None, 'folder'),
    (FULL, None, 'parent'),
    (FULL, None, 'folder'),
    ('chexpert_renamed', SMALL, 'folder'),
])
def test_layouts_and_manual_dirs(tmp_path, folder, prefix, manual):
  fake = write_fake_chexpert(tmp_path / 'raw', folder=folder, prefix=prefix)
  (tmp_path / 'raw' / 'README.txt').write_text('unrelated file')
  manual_dir = fake.folder if manual == 'folder' else fake.parent
  _build(manual_dir, tmp_path / 'data')
  records = _records(tmp_path / 'data')
  for row in fake.rows:
    record = records[row['split']][row['image_id']]
    assert record['image'] == fake.images[row['image_id']].read_bytes()
  assert sum(len(r) for r in records.values()) == len(fake.rows)


def test_max_side_and_single_channel(fake, tmp_path):
  version_dir = _build(fake.parent, tmp_path / 'data', name='chexpert/side16')
  assert version_dir == os.fspath(tmp_path / 'data' / NAME / 'side16' / '1.0.0')
  info = sources.dataset_info('chexpert/side16', os.fspath(tmp_path / 'data'))
  assert info.metadata['max_side'] == 16
  for split in ('train', 'validation'):
    for record in sources.open_split('chexpert/side16', split,
                                     os.fspath(tmp_path / 'data')):
      image, image_format = host_ops.decode_pil(record['image'])
      assert (image_format, image.mode) == ('JPEG', 'L')
      assert max(image.size) == 16
      with Image.open(io.BytesIO(record['image'])) as stored:
        assert len(stored.getbands()) == 1
      lateral = record['frontal_lateral'] == b'Lateral'
      assert image.size == ((13, 16) if lateral else (16, 13))


def test_patient_in_two_splits(fake, tmp_path):
  lines = fake.csv['validation'].read_text().splitlines()
  lines.append(lines[1].replace('valid/patient64541/study1',
                                'valid/patient00002/study9'))
  (fake.folder / 'valid/patient00002/study9').mkdir(parents=True)
  fake.csv['validation'].write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'patient00002', 'train', 'validation',
                         f'{fake.csv["train"]} line 3', f'{fake.csv["validation"]} line 5')


def test_missing_columns(fake, tmp_path):
  text = fake.csv['train'].read_text()
  fake.csv['train'].write_text(text.replace('Path,', 'path,', 1)
                               .replace(',Edema,', ',Oedema,', 1))
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, fake.csv['train'], 'missing column', 'Path',
                         'Edema')


def test_a_cut_row_is_an_error_not_blank_labels(fake, tmp_path):
  lines = fake.csv['train'].read_text().splitlines()
  lines[2] = ','.join(lines[2].split(',')[:5])  # Path, Sex, Age, Frontal/Lateral, AP/PA only
  fake.csv['train'].write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.csv["train"]} line 3', '5 fields', "'No Finding'")
  assert not (tmp_path / 'data' / 'chexpert').exists() or not any(
      (tmp_path / 'data' / 'chexpert').rglob('dataset_info.json'))


def test_missing_image(fake, tmp_path):
  image_id = 'train/patient00002/study1/view1_frontal.jpg'
  os.remove(fake.images[image_id])
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.csv["train"]} line {fake.line_of(image_id)}',
                         fake.images[image_id], 'not found')


def test_skip_bad_images(fake, tmp_path):
  missing = 'train/patient00002/study1/view1_frontal.jpg'
  corrupt = 'valid/patient64542/study1/view1_frontal.jpg'
  os.remove(fake.images[missing])
  fake.images[corrupt].write_bytes(b'not a jpeg at all')
  _build(fake.parent, tmp_path / 'data', skip_bad_images=True)
  records = _records(tmp_path / 'data')
  assert {split: len(r) for split, r in records.items()} == {
      'train': 4, 'validation': 2}
  assert missing not in records['train'] and corrupt not in records['validation']
  metadata = sources.dataset_info(NAME, os.fspath(tmp_path / 'data')).metadata
  assert metadata['skip_bad_images'] is True
  assert metadata['num_skipped_images'] == 2
  skipped = {entry['split']: entry for entry in metadata['skipped_images']}
  assert skipped['train']['path'] == os.fspath(fake.images[missing])
  assert f'line {fake.line_of(missing)}' in skipped['train']['where']
  assert skipped['validation']['path'] == os.fspath(fake.images[corrupt])
  groups = sources.case_index(NAME, 'train', os.fspath(tmp_path / 'data'))
  assert sum(len(g) for g in groups) == 4


def test_every_image_of_a_split_skipped(fake, tmp_path):
  for image_id, path in fake.images.items():
    if image_id.startswith('valid/'):
      os.remove(path)
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data', skip_bad_images=True)
  _assert_one_line_error(excinfo, 'all 3 images of split validation', 'skipped',
                         fake.csv['validation'])
  assert not (tmp_path / 'data' / NAME / 'side512' / '1.0.0').exists()


@pytest.mark.parametrize('value', ['2', 'yes', 'nan', '1.0.0'])
def test_bad_label_value(fake, tmp_path, value):
  # Line 2 of train.csv: 'Support Devices' (the last column) is 1.0.
  lines = fake.csv['train'].read_text().splitlines()
  assert lines[1].endswith(',1.0')
  lines[1] = lines[1][:lines[1].rindex(',') + 1] + value
  fake.csv['train'].write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.csv["train"]} line 2', 'Support Devices',
                         repr(value))


def test_bad_age_and_path(fake, tmp_path):
  _edit_line(fake.csv['validation'], 3, ',70,', ',seventy,')
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.csv["validation"]} line 3', 'Age',
                         "'seventy'")
  _edit_line(fake.csv['validation'], 3, ',seventy,', ',70,')
  _edit_line(fake.csv['validation'], 3, 'patient64542/', 'someone/')
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, f'{fake.csv["validation"]} line 3', 'someone')


def test_duplicate_image(fake, tmp_path):
  lines = fake.csv['train'].read_text().splitlines()
  fake.csv['train'].write_text('\n'.join(lines + [lines[2]]) + '\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'listed twice', 'line 3', 'line 7')


def test_missing_tables(fake, tmp_path):
  os.remove(fake.csv['validation'])
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'valid.csv', fake.csv['validation'])
  os.remove(fake.csv['train'])
  with pytest.raises(DataError) as excinfo:
    _build(fake.parent, tmp_path / 'data')
  _assert_one_line_error(excinfo, 'train.csv', fake.parent)


def test_without_manual_dir(tmp_path):
  with pytest.raises(DataError) as excinfo:
    build_data.build(NAME, data_dir=os.fspath(tmp_path / 'data'))
  _assert_one_line_error(excinfo, 'CheXpert', '--manual_dir', 'registration')


def test_cli(fake, tmp_path):
  data_dir = tmp_path / 'data'
  command = [sys.executable, '-m', 'bigssl_med.build_data', NAME,
             f'--manual_dir={fake.folder}', f'--data_dir={data_dir}',
             '--max_side=16']
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == os.fspath(
      data_dir / NAME / 'side16' / '1.0.0')
  _edit_line(fake.csv['train'], 1, ',Edema,', ',Oedema,')
  result = subprocess.run(command + ['--overwrite'], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith('error: ') and 'Edema' in error, error
  assert os.fspath(fake.csv['train']) in error
