"""Tests of the rsna_pneumonia TFDS builder, on generated trees in the challenge's
published layout (DICOM files written with pydicom)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

from dicom_files import write_dicom
import numpy as np
from PIL import Image
import pytest

from bigssl_med import build_data
from bigssl_med import config_schema
from bigssl_med.data import sources
from bigssl_med.errors import DataError
from bigssl_med.trainers import finetune
from conftest import assert_manual_only, assert_one_line_error, ids_per_split, records_by_split
from conftest import shrunk
import tfds_builders
from tfds_builders.rsna_pneumonia import rsna_pneumonia as rsna

NAME = 'rsna_pneumonia'
BUILD = f'{NAME}/original'
WIDTH, HEIGHT = 32, 24
PUBLISHED = {'normal': 'Normal', 'no_lung_opacity_not_normal': 'No Lung Opacity / Not Normal',
             'lung_opacity': 'Lung Opacity'}


@dataclasses.dataclass
class Patient:
  patient_id: str
  label: str
  boxes: list[tuple[int, int, int, int]]  # x, y, width, height as published
  path: Path
  jpeg: bytes


@dataclasses.dataclass
class FakeRsna:
  """A generated challenge tree under `root`; `patients` keyed by patientId, in the
  tables' order."""
  root: Path
  labels: Path
  classes: Path
  patients: dict[str, Patient]
  unlisted: list[Path]

  def patient(self, split: str, label: str | None = None, index: int = 0) -> Patient:
    found = [p for p in self.patients.values() if rsna.split_for_case(p.patient_id) == split
             and (label is None or p.label == label)]
    return found[index]

  def write_tables(self, stage: int = 2) -> None:
    """Both tables as published: one labels row per box (or one blank row of Target 0),
    and a class row for each labels row."""
    labels, classes = ['patientId,x,y,width,height,Target'], ['patientId,class']
    for patient in self.patients.values():
      rows = [f'{patient.patient_id},{x:.1f},{y:.1f},{w:.1f},{h:.1f},1'
              for x, y, w, h in patient.boxes] or [f'{patient.patient_id},,,,,0']
      labels += rows
      classes += [f'{patient.patient_id},{PUBLISHED[patient.label]}'] * len(rows)
    self.labels = self.root / f'stage_{stage}_train_labels.csv'
    self.classes = self.root / f'stage_{stage}_detailed_class_info.csv'
    self.labels.write_text('\n'.join(labels) + '\n')
    self.classes.write_text('\n'.join(classes) + '\n')


def write_fake_rsna(parent: Path, per_split=(6, 3, 3), seed: int = 0) -> FakeRsna:
  """`parent/rsna` as the challenge's stage 2 files unpack: both tables,
  `stage_2_train_images/<patientId>.dcm` and two unlisted `stage_2_test_images/`.
  Classes cycle normal, no lung opacity / not normal, lung opacity; a lung-opacity image
  has one or two bright boxes, and the first one's second box reaches past the right
  edge."""
  rng = np.random.default_rng(seed)
  root = parent / 'rsna'
  root.mkdir(parents=True)
  fake = FakeRsna(root=root, labels=root, classes=root, patients={}, unlisted=[])
  found = ids_per_split(lambda n: f'{n:08x}-14fd-4e49-80ba-63a80b6bddd6', rsna.split_for_case,
                        dict(zip(rsna.SPLIT_NAMES, per_split)))
  ids = [i for split in rsna.SPLIT_NAMES for i in found[split]]
  opacities = 0
  for number, patient_id in enumerate(ids):
    label = rsna.CLASS_NAMES[number % 3]
    boxes = []
    if label == 'lung_opacity':
      opacities += 1
      boxes = [(int(rng.integers(0, 12)), int(rng.integers(0, 10)), 8, 6)]
      if opacities % 2:
        boxes.append((WIDTH - 4, 14, 10, 6) if opacities == 1 else (3, 15, 5, 5))
    pixels = rng.normal(90, 12, (HEIGHT, WIDTH))
    for x, y, w, h in boxes:
      pixels[y:y + h, x:x + w] += 80
    path = root / 'stage_2_train_images' / f'{patient_id}.dcm'
    jpeg = write_dicom(path, np.clip(pixels, 0, 255).astype(np.uint8), PatientID=patient_id,
                       PatientSex='MF'[number % 2], PatientAge=str(30 + number),
                       ViewPosition=('PA', 'AP')[number % 2])
    fake.patients[patient_id] = Patient(patient_id, label, boxes, path, jpeg)
  for k in range(2):
    path = root / 'stage_2_test_images' / f'{k:08x}-0000-4e49-80ba-63a80b6bddd6.dcm'
    write_dicom(path, np.full((HEIGHT, WIDTH), 50, np.uint8), PatientID=path.stem)
    fake.unlisted.append(path)
  fake.write_tables()
  return fake


@pytest.fixture
def fake(tmp_path) -> FakeRsna:
  return write_fake_rsna(tmp_path / 'raw')


def _build(fake, data_dir, name=BUILD, **kwargs) -> str:
  return build_data.build(name, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(fake.root.parent), **kwargs)


def _decoded(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    assert (image.format, image.mode) == ('PNG', 'L')
    return np.asarray(image)


def _expected_mask(patient: Patient) -> np.ndarray:
  mask = np.zeros((HEIGHT, WIDTH), bool)
  for x, y, w, h in patient.boxes:
    mask[y:min(y + h, HEIGHT), x:min(x + w, WIDTH)] = True
  return mask


def test_registered_manual_only_with_side512_default():
  assert tfds_builders.BUILDERS[NAME] is tfds_builders.RsnaPneumonia
  assert tfds_builders.RsnaPneumonia.name == NAME
  assert tfds_builders.RsnaPneumonia.DOWNLOADS is False
  assert [c.name for c in tfds_builders.RsnaPneumonia.BUILDER_CONFIGS] == [
      'side512', 'original']


def test_build_stores_images_classes_boxes_masks_and_header_fields(fake, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = _build(fake, data_dir)
  records = records_by_split(data_dir, BUILD)
  assert {split: len(r) for split, r in records.items()} == {
      'train': 6, 'validation': 3, 'test': 3}
  info = sources.dataset_info(BUILD, os.fspath(data_dir))
  assert info.features['label'].names == [
      'normal', 'no_lung_opacity_not_normal', 'lung_opacity']
  numbers = {patient_id: n for n, patient_id in enumerate(fake.patients)}
  for split, by_id in records.items():
    for patient_id, record in by_id.items():
      patient, number = fake.patients[patient_id], numbers[patient_id]
      assert rsna.split_for_case(patient_id) == split
      assert record['case_id'].decode() == patient_id
      assert info.features['label'].int2str(record['label']) == patient.label
      np.testing.assert_array_equal(record['boxes'],
                                    np.asarray(patient.boxes, np.float32).reshape(-1, 4))
      np.testing.assert_array_equal(_decoded(record['image']),
                                    np.asarray(Image.open(io.BytesIO(patient.jpeg))))
      np.testing.assert_array_equal(_decoded(record['mask']) == 255, _expected_mask(patient))
      assert record['sex'].decode() == 'MF'[number % 2]
      assert record['age'] == pytest.approx(30 + number)
      assert record['view_position'].decode() == ('PA', 'AP')[number % 2]
  assert {len(p.boxes) for p in fake.patients.values()} == {0, 1, 2}
  metadata = info.metadata
  assert metadata['labels_file'] == 'stage_2_train_labels.csv'
  assert metadata['num_unlisted_images'] == 2
  assert metadata['num_clipped_boxes'] == 1
  with open(os.path.join(version_dir, sources.CASE_INDEX_FILE)) as f:
    index = json.load(f)
  assert index['dataset'] == NAME
  assert index['splits']['test']['features']['view_position']  # indexed for data.views


def test_stage_1_tables_are_read(fake, tmp_path):
  fake.labels.unlink()
  fake.classes.unlink()
  fake.write_tables(stage=1)
  _build(fake, tmp_path / 'data')
  assert sum(len(r) for r in records_by_split(tmp_path / 'data', BUILD).values()) == 12
  metadata = sources.dataset_info(BUILD, os.fspath(tmp_path / 'data')).metadata
  assert metadata['labels_file'] == 'stage_1_train_labels.csv'


def test_box_pixels_rounds_and_clips():
  assert rsna.box_pixels((2.0, 3.0, 4.0, 5.0), height=24, width=32) == (
      slice(3, 8), slice(2, 6), False)
  assert rsna.box_pixels((30.0, -2.0, 10.0, 5.0), height=24, width=32) == (
      slice(0, 3), slice(30, 32), True)
  with pytest.raises(DataError, match='lies outside the 32x24 image'):
    rsna.box_pixels((32.0, 0.0, 4.0, 4.0), height=24, width=32)


def test_without_manual_dir_it_says_where_to_get_the_set(tmp_path):
  assert_manual_only(NAME, tfds_builders.RsnaPneumonia, tmp_path,
                     'kaggle.com/c/rsna-pneumonia-detection-challenge',
                     'stage_2_train_labels.csv')


# Bad input: one-line errors naming the file and line.


def _lines(path: Path) -> list[str]:
  return path.read_text().splitlines()


def _set_line(path: Path, number: int, text: str) -> None:
  lines = _lines(path)
  lines[number - 1] = text
  path.write_text('\n'.join(lines) + '\n')


def _line_of(path: Path, patient_id: str) -> int:
  return next(n for n, text in enumerate(_lines(path), 1) if text.startswith(patient_id))


@pytest.mark.parametrize('kind, expected', [
    ('target 2', "Target is '2'"),
    ('no box', 'expected four numbers'),
    ('zero width', 'positive width'),
    ('box on target 0', 'Target is 0 but the row has a box'),
])
def test_a_bad_labels_row(fake, tmp_path, kind, expected):
  opacity = fake.patient('train', 'lung_opacity')
  normal = fake.patient('train', 'normal')
  rows = {'target 2': (normal, f'{normal.patient_id},,,,,2'),
          'no box': (opacity, f'{opacity.patient_id},,,,,1'),
          'zero width': (opacity, f'{opacity.patient_id},1,1,0,3,1'),
          'box on target 0': (normal, f'{normal.patient_id},1,1,3,3,0')}
  patient, text = rows[kind]
  line = _line_of(fake.labels, patient.patient_id)
  _set_line(fake.labels, line, text)
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.labels, f'line {line}', expected)
  assert not (tmp_path / 'data' / NAME / 'original').exists()


def test_a_patient_with_both_targets(fake, tmp_path):
  opacity = fake.patient('validation', 'lung_opacity')
  with fake.labels.open('a') as f:
    f.write(f'{opacity.patient_id},,,,,0\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, opacity.patient_id, 'Target 1', 'Target 0', fake.labels)


@pytest.mark.parametrize('kind, expected', [
    ('unknown class', "class 'Pneumonia' is not one of"),
    ('disagreeing rows', "'Normal'"),
    ('contradicts target', "'Lung Opacity' goes with Target 1"),
])
def test_a_bad_class_row(fake, tmp_path, kind, expected):
  normal = fake.patient('train', 'normal')
  line = _line_of(fake.classes, normal.patient_id)
  if kind == 'disagreeing rows':
    with fake.classes.open('a') as f:
      f.write(f'{normal.patient_id},No Lung Opacity / Not Normal\n')
  else:
    name = 'Pneumonia' if kind == 'unknown class' else 'Lung Opacity'
    _set_line(fake.classes, line, f'{normal.patient_id},{name}')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.classes, expected)
  if kind != 'contradicts target':
    assert 'line' in str(excinfo.value)


def test_patients_in_one_table_only(fake, tmp_path):
  with fake.classes.open('a') as f:
    f.write('ffffffff-14fd-4e49-80ba-63a80b6bddd6,Normal\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.classes, 'ffffffff-14fd', f'not in {fake.labels}')
  fake.write_tables()
  with fake.labels.open('a') as f:
    f.write('ffffffff-14fd-4e49-80ba-63a80b6bddd6,,,,,0\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.labels, 'ffffffff-14fd', f'no row in {fake.classes}')


def test_a_missing_class_table(fake, tmp_path):
  fake.classes.unlink()
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.classes, 'not found', fake.labels)


def test_a_box_wholly_outside_its_image(fake, tmp_path):
  opacity = fake.patient('test', 'lung_opacity')
  line = _line_of(fake.labels, opacity.patient_id)
  _set_line(fake.labels, line, f'{opacity.patient_id},{WIDTH + 5},2,4,4,1')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.labels, f'line {line}', 'outside the 32x24 image',
                        opacity.path)


def test_missing_and_undecodable_images_stop_the_build_or_are_skipped(fake, tmp_path):
  missing = fake.patient('train', index=1)
  broken = fake.patient('validation', index=0)
  missing.path.unlink()
  data = broken.path.read_bytes()
  start = data.index(b'\xff\xd8')
  broken.path.write_bytes(data[:start + 40] + b'\0' * (len(data) - start - 40))
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.labels, f'line {_line_of(fake.labels, missing.patient_id)}',
                        'no DICOM file', missing.patient_id)
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, skip_bad_images=True)
  kept = {i for split in records_by_split(data_dir, BUILD).values() for i in split}
  assert kept == set(fake.patients) - {missing.patient_id, broken.patient_id}
  metadata = sources.dataset_info(BUILD, os.fspath(data_dir)).metadata
  assert metadata['num_skipped_images'] == 2
  reasons = {entry['path']: entry['reason'] for entry in metadata['skipped_images']}
  assert 'no DICOM file' in reasons[f'{missing.patient_id}.dcm']
  assert 'cannot decode DICOM pixel data' in reasons[os.fspath(broken.path)]


# The benchmark config's protocol, shrunk, on a build.


def test_benchmark_protocol_fine_tunes_on_an_rsna_build(tmp_path):
  from test_configs import load  # pylint: disable=g-import-not-at-top
  fake = write_fake_rsna(tmp_path / 'raw', per_split=(48, 12, 12), seed=1)
  config = load('benchmark_cxr', 'rsna,r18')
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, name=config.dataset)  # rsna_pneumonia (side512)
  shrunk(config, data_dir)
  config_schema.validate(config)
  results = finetune.train_and_evaluate(config, os.fspath(tmp_path / 'work'))
  assert results['trainer'] == 'finetune' and results['dataset'] == config.dataset
  assert results['task'] == 'multiclass' and results['selected_on'] == 'loss'
  assert results['validation']['num_examples'] == 12 and results['test']['num_examples'] == 12
  assert set(results['test']['auc_per_class']) == set(rsna.CLASS_NAMES)
  assert 0.0 <= results['test']['top1'] <= 1.0 and results['step'] == 40
  # Whether it learns is the Shenzhen test's business (the same protocol); 40 steps of
  # Adam at 2e-4 tell the fixture's normal and not-normal images (alike) apart from
  # chance only.
