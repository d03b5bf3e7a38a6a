"""Chest X-ray evaluation protocols: frontal or lateral images only (`data.views`), and
metrics per study or case (`task.eval_unit`), on a generated CheXpert tree."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
import shutil

import numpy as np
from PIL import Image
import pytest
import scipy.special
from sklearn import metrics as sk_metrics

from bigssl_med import build_data, eval_units
from bigssl_med.data import fractions, sources, views
from bigssl_med.errors import ConfigError, DataError
from bigssl_med.data import pipeline
from bigssl_med.trainers import finetune, pretrain
from test_chexpert_builder import HEADER, LABELS
from test_finetune import _write_colour_cases, tiny_config
from test_pretrain import tiny_config as tiny_pretrain_config

SMALL = 'CheXpert-v1.0-small'


def write_chexpert_studies(parent: Path, patients=(40, 12), seed: int = 0,
                           lateral_in=('train', 'valid')) -> list[dict]:
  """A CheXpert-v1.0-small tree of `patients` (train, valid) patients, one or two studies
  each, every study a frontal image and, every other study, a lateral one; the labels
  are the study's (Cardiomegaly: a brighter image; Edema and Pleural Effusion drawn,
  some uncertain; the rest blank); the split folders not in `lateral_in` have frontal
  images only. Returns the rows written."""
  rng = np.random.default_rng(seed)
  root = parent / SMALL
  rows, lines = [], {'train': [HEADER], 'valid': [HEADER]}
  number = 0
  for split_dir, count in zip(('train', 'valid'), patients):
    for _ in range(count):
      number += 1
      patient = f'patient{number:05d}'
      for study in range(1, 1 + int(rng.integers(1, 3))):
        labels = {'Cardiomegaly': float(rng.integers(0, 2)),
                  'Edema': float(rng.choice([0, 1, -1])),
                  'Pleural Effusion': float(rng.integers(0, 2))}
        views_of_study = ['frontal'] + (
            ['lateral'] if (number + study) % 2 and split_dir in lateral_in else [])
        for v, view in enumerate(views_of_study, 1):
          image_id = f'{split_dir}/{patient}/study{study}/view{v}_{view}.jpg'
          path = root / image_id
          path.parent.mkdir(parents=True, exist_ok=True)
          pixels = rng.normal(60 + 120 * labels['Cardiomegaly'], 30, (24, 24))
          Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode='L').save(path)
          frontal = view == 'frontal'
          values = [f'{SMALL}/{image_id}', 'Female', '60', 'Frontal' if frontal else 'Lateral',
                    'AP' if frontal else ''] + [
                        str(labels[name]) if name in labels else '' for name in LABELS]
          lines[split_dir].append(','.join(values))
          rows.append({'split': 'train' if split_dir == 'train' else 'validation',
                       'image_id': image_id, 'patient': patient, 'study': f'study{study}',
                       'frontal': frontal, 'labels': labels})
  for split_dir, content in lines.items():
    (root / f'{split_dir}.csv').write_text('\n'.join(content) + '\n')
  return rows


@pytest.fixture(scope='module')
def cxr(tmp_path_factory):
  """(rows, data dir) of a built `chexpert` with studies of one or two views."""
  root = tmp_path_factory.mktemp('cxr_studies')
  rows = write_chexpert_studies(root / 'raw')
  build_data.build('chexpert', data_dir=os.fspath(root / 'data'),
                   manual_dir=os.fspath(root / 'raw'))
  return rows, os.fspath(root / 'data')


@pytest.fixture(scope='module')
def colours(tmp_path_factory):
  """Separable colour images, one per case, without views or studies."""
  root = tmp_path_factory.mktemp('colours_protocol')
  _write_colour_cases(root / 'raw')
  build_data.build('image_cases/colours', data_dir=os.fspath(root / 'data'),
                   manual_dir=os.fspath(root / 'raw'))
  return root / 'data'


def cxr_config(data_dir, **overrides):
  settings = {'data.holdout': 0.25, 'data.eval_split': '', 'data.test_split': 'validation',
              'task.mean_over': 'chexpert5', 'total_steps': 12, 'eval_every_steps': 12,
              'checkpoint_every_steps': 12, 'batch_size': 8}
  settings.update(overrides)
  return tiny_config(data_dir, dataset='chexpert', **settings)


# ------------------------------------------------------------------ The index and views.


def test_build_indexes_the_view_and_study_of_every_record(cxr):
  rows, data_dir = cxr
  values = sources.record_features('chexpert', 'validation', data_dir,
                                   ('frontal_lateral', 'study', 'case_id'))
  source = sources.open_split('chexpert', 'validation', data_dir)
  scanned = sources.scan_features(source, ('frontal_lateral', 'study', 'case_id'))
  assert values == scanned
  expected = {r['image_id']: r for r in rows if r['split'] == 'validation'}
  for i, record in enumerate(source):
    row = expected[record['image_id'].decode()]
    assert values['frontal_lateral'][i] == ('Frontal' if row['frontal'] else 'Lateral')
    assert (values['case_id'][i], values['study'][i]) == (row['patient'], row['study'])


def test_an_index_without_the_features_is_scanned_then_completed_by_build_data(
    cxr, tmp_path, caplog):
  rows, data_dir = cxr
  copy = tmp_path / 'data'
  shutil.copytree(data_dir, copy)
  version_dir = sources.find_version_dir('chexpert', os.fspath(copy))
  index = Path(version_dir) / sources.CASE_INDEX_FILE
  content = json.loads(index.read_text())
  for entry in content['splits'].values():
    del entry['features']  # as an index written before the features were kept
  index.write_text(json.dumps(content))
  label_index = Path(version_dir) / sources.LABEL_INDEX_FILE
  label_index.unlink()  # and before the labels were
  assert not sources.index_is_current(version_dir)
  with caplog.at_level(logging.INFO):
    values = sources.record_features('chexpert', 'train', os.fspath(copy), ('study',))
  assert 'scanning every record' in caplog.text
  assert values == sources.record_features('chexpert', 'train', data_dir, ('study',))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    labels = sources.record_labels('chexpert', 'train', os.fspath(copy), 'labels')
  assert f'not in its {sources.LABEL_INDEX_FILE}; scanning every record' in caplog.text
  expected = sources.record_labels('chexpert', 'train', data_dir, 'labels')
  np.testing.assert_array_equal(labels, expected)
  build_data.build('chexpert', data_dir=os.fspath(copy))  # built: only the index is written
  assert sources.index_is_current(version_dir)
  assert json.loads(index.read_text())['splits']['train']['features']['study'] == (
      values['study'])
  with np.load(label_index) as npz:
    np.testing.assert_array_equal(npz['train.labels'], expected)


def _scanned_labels(source) -> np.ndarray:
  return np.stack([np.asarray(source[i]['labels']) for i in range(len(source))])


def test_build_indexes_the_labels_of_every_record(cxr):
  rows, data_dir = cxr
  for split in ('train', 'validation'):
    labels = sources.record_labels('chexpert', split, data_dir, 'labels')
    source = sources.open_split('chexpert', split, data_dir)
    assert labels.dtype == np.float32 and labels.shape == (len(source), len(LABELS))
    np.testing.assert_array_equal(labels, _scanned_labels(source))  # NaN (blank) equal
  edema = LABELS.index('Edema')
  train = sources.record_labels('chexpert', 'train', data_dir, 'labels')
  assert set(np.unique(train[:, edema])) == {-1.0, 0.0, 1.0} and np.isnan(train).any()
  both = sources.record_labels('chexpert', 'train+validation', data_dir, 'labels')
  np.testing.assert_array_equal(
      both, np.concatenate([train, sources.record_labels('chexpert', 'validation', data_dir,
                                                         'labels')]))
  held = fractions.open_holdout('chexpert', 'train', data_dir, 0.25)
  np.testing.assert_array_equal(
      eval_units.source_labels(held, 'chexpert', 'train', data_dir, 'labels'),
      _scanned_labels(held))


def test_labels_of_a_sliced_split_are_scanned(cxr, caplog):
  _, data_dir = cxr
  with caplog.at_level(logging.INFO):
    labels = sources.record_labels('chexpert', 'train[:5]', data_dir, 'labels')
  assert 'scanning every record' in caplog.text
  np.testing.assert_array_equal(
      labels, sources.record_labels('chexpert', 'train', data_dir, 'labels')[:5])


def test_starting_a_fine_tuning_reads_no_record(cxr, tmp_path, monkeypatch):
  """A label fraction's classes and the per-study validation labels come from the
  indexes: up to the training loop no record (each holds its image) is read."""
  _, data_dir = cxr

  def read(*args, **kwargs):
    raise AssertionError('read a record before training')

  class Started(Exception):
    pass

  def train_loop(**kwargs):
    raise Started

  monkeypatch.setattr(sources.CheckedSource, '__getitem__', read)
  monkeypatch.setattr(sources.CheckedSource, '__getitems__', read)
  monkeypatch.setattr(finetune.model_selection, 'train_loop', train_loop)
  with pytest.raises(Started):
    finetune.train_and_evaluate(
        cxr_config(data_dir, **{'data.label_fraction': 0.5, 'task.eval_unit': 'study'}),
        os.fspath(tmp_path / 'work'))


@pytest.mark.parametrize('damage', ['truncated', 'short'])
def test_a_damaged_label_index_is_a_one_line_error_naming_it(cxr, tmp_path, damage):
  _, data_dir = cxr
  copy = tmp_path / 'data'
  shutil.copytree(data_dir, copy)
  path = Path(sources.find_version_dir('chexpert', os.fspath(copy))) / sources.LABEL_INDEX_FILE
  if damage == 'truncated':
    path.write_bytes(path.read_bytes()[:100])
  else:
    with np.load(path) as npz:
      arrays = {name: npz[name] for name in npz.files}
    arrays['train.labels'] = arrays['train.labels'][:-1]
    with open(path, 'wb') as f:
      np.savez(f, **arrays)
  with pytest.raises(DataError) as excinfo:
    sources.record_labels('chexpert', 'train', os.fspath(copy), 'labels')
  message = str(excinfo.value)
  assert '\n' not in message and str(path) in message and '--overwrite' in message


@pytest.mark.parametrize('feature,value,view', [
    ('frontal_lateral', 'Frontal', 'frontal'), ('frontal_lateral', 'Lateral', 'lateral'),
    ('frontal_lateral', '', ''), ('view_position', 'PA', 'frontal'),
    ('view_position', 'AP', 'frontal'), ('view_position', 'LATERAL', 'lateral'),
    ('view_position', 'LL', 'lateral'), ('view_position', 'AP AXIAL', ''),
    ('view_position', 'LAO', ''), ('view_position', '', '')])
def test_view_of_each_published_value(feature, value, view):
  assert views.view_of(feature, value) == view


def test_views_select_images_and_fractions_stay_case_level_and_nested(cxr):
  rows, data_dir = cxr
  train = [r for r in rows if r['split'] == 'train']
  mask = views.keep('chexpert', 'train', data_dir, 'frontal')
  source = sources.open_split('chexpert', 'train', data_dir)
  ids = [r['image_id'].decode() for r in source]
  frontal = {r['image_id'] for r in train if r['frontal']}
  assert {ids[i] for i in np.flatnonzero(mask)} == frontal
  chosen = {}
  for fraction in (0.25, 0.5, 1.0):
    subset, groups = fractions.open_fraction('chexpert', 'train', data_dir, fraction, seed=3,
                                             holdout=0.2, views='lateral')
    images = [r['image_id'].decode() for r in subset]
    assert all('lateral' in image for image in images)
    patients = {image.split('/')[1] for image in images}
    assert sum(len(g) for g in groups) == len(images) and len(groups) == len(patients)
    assert not any(fractions.is_held_out(p, 0.2) for p in patients)
    chosen[fraction] = patients
  assert chosen[0.25] <= chosen[0.5] <= chosen[1.0]
  held = fractions.open_holdout('chexpert', 'train', data_dir, 0.2, views='frontal')
  held_ids = [r['image_id'].decode() for r in held]
  assert held_ids and all('frontal' in i and fractions.is_held_out(i.split('/')[1], 0.2)
                          for i in held_ids)


@pytest.mark.parametrize('micle', [True, False])
def test_pretraining_on_one_view_pairs_only_images_of_it(cxr, tmp_path, monkeypatch, micle):
  rows, data_dir = cxr
  seen = []
  original = pipeline.pair_dataset

  def spy(source, groups, *args, **kwargs):
    seen.append(([r['image_id'].decode() for r in source], groups))
    return original(source, groups, *args, **kwargs)

  monkeypatch.setattr(pipeline, 'pair_dataset', spy)
  cfg = tiny_pretrain_config(data_dir, dataset='chexpert', micle=micle, probe=False,
                             batch_size=8, total_steps=2, **{'data.views': 'lateral',
                                                              'data.eval_split': ''})
  results = pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  assert results['views'] == 'lateral'
  images, groups = seen[0]
  lateral = [r for r in rows if r['split'] == 'train' and not r['frontal']]
  assert sorted(images) == sorted(r['image_id'] for r in lateral)
  if micle:  # each case: the positions of its lateral images in the source
    patients = [[images[i].split('/')[1] for i in group] for group in groups]
    assert all(len(set(p)) == 1 for p in patients)
    assert sorted(p[0] for p in patients) == sorted({r['patient'] for r in lateral})
  else:
    assert groups is None


def test_views_on_a_data_set_without_views_is_a_one_line_error(tmp_path):
  with pytest.raises(ConfigError, match=r"views='frontal': data set ham10000 has no view "
                     r'feature \(frontal_lateral or view_position\)'):
    views.view_feature('frontal', {'image': None, 'case_id': None}, 'ham10000')
  with pytest.raises(ConfigError, match="views='front' is not one of"):
    views.view_feature('front', {'frontal_lateral': None}, 'chexpert')


# ------------------------------------------------------------------ Combining a unit's images.


def test_combine_matches_a_float64_reference():
  rng = np.random.default_rng(0)
  keys = np.asarray([f's{k}' for k in rng.integers(0, 9, 40)])
  unit_labels = {k: rng.choice([0.0, 1.0, -1.0, np.nan], size=3) for k in set(keys)}
  labels = np.stack([unit_labels[k] for k in keys])
  logits = rng.normal(0, 6, (40, 3)).astype(np.float32)
  first_seen = list(dict.fromkeys(keys))
  for reduce, combine in (('max', np.max), ('mean', np.mean)):
    got, got_labels, units = eval_units.combine(logits, labels, keys, kind='multilabel',
                                                reduce=reduce)
    assert list(units) == first_seen
    for row, unit in enumerate(units):
      p = scipy.special.expit(logits[keys == unit].astype(np.float64))
      np.testing.assert_allclose(scipy.special.expit(got[row]), combine(p, axis=0),
                                 rtol=1e-12)
      np.testing.assert_array_equal(got_labels[row], unit_labels[unit])
  classes = {k: int(rng.integers(0, 4)) for k in set(keys)}
  labels = np.asarray([classes[k] for k in keys])
  logits = rng.normal(0, 3, (40, 4))
  for reduce in ('mean', ''):  # '' : a multi-class task's images are averaged
    got, got_labels, units = eval_units.combine(logits, labels, keys, kind='multiclass',
                                                reduce=reduce)
    for row, unit in enumerate(units):
      p = np.mean(scipy.special.softmax(logits[keys == unit], axis=1), axis=0)
      np.testing.assert_allclose(np.exp(got[row]), p, rtol=1e-12)
      assert got_labels[row] == classes[unit]
  # Per-class maxima are no distribution: refused for multi-class tasks.
  with pytest.raises(ConfigError, match=r"eval_reduce='max' takes each label's highest"):
    eval_units.combine(logits, labels, keys, kind='multiclass', reduce='max')
  assert eval_units.check_reduce('', 'multilabel') == 'max'


def test_a_confident_unit_keeps_its_rank():
  """Probabilities within 1e-17 of 1 still order: combined in log space, not clipped."""
  logits = np.asarray([[40.0], [45.0], [39.0], [44.0]])
  got, _, _ = eval_units.combine(logits, np.zeros((4, 1)), np.asarray(['a', 'b', 'a', 'b']),
                                 kind='multilabel', reduce='mean')
  assert np.all(np.isfinite(got)) and got[1, 0] > got[0, 0]


def test_images_of_one_unit_with_different_labels_is_a_one_line_error():
  with pytest.raises(DataError, match=r'^chexpert/validation: the images of p1/study1 have '
                     r'different labels'):
    eval_units.combine(np.zeros((3, 2)), np.asarray([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]),
                       np.asarray(['p1/study1', 'p2/study1', 'p1/study1']), kind='multilabel',
                       reduce='max', where='chexpert/validation')


def test_a_long_label_vector_stays_on_one_line():
  labels = np.zeros((2, 30))
  labels[1, 29] = 1.0
  with pytest.raises(DataError) as excinfo:
    eval_units.combine(np.zeros((2, 30)), labels, np.asarray(['s1', 's1']), kind='multilabel',
                       reduce='max')
  assert '\n' not in str(excinfo.value) and '0.,1.]' in str(excinfo.value)


def test_unknown_units_and_reductions_are_one_line_errors():
  with pytest.raises(ConfigError, match="eval_unit='study': data set ham10000 has no "
                     'study_id or study feature'):
    eval_units.unit_features('study', {'case_id': None}, 'ham10000')
  with pytest.raises(ConfigError, match="eval_unit='patient' is not one of"):
    eval_units.unit_features('patient', {'case_id': None}, 'ham10000')
  with pytest.raises(ConfigError, match="eval_reduce='median' is not one of"):
    eval_units.check_reduce('median')
  assert eval_units.unit_features('study', {'study_id': None}, 'mimic_cxr_jpg') == (
      'study_id',)


# ------------------------------------------------------------------ Fine-tuning end to end.


def _study_metrics(npz_path: str, label_names, reduce=np.max) -> dict[str, float]:
  """Per-study AUCs computed from per-image test predictions, independently of
  eval_units: the study's highest probability of each label, its images' labels."""
  found = np.load(npz_path)
  studies = np.asarray([os.path.dirname(i).split('/', 1)[1] for i in found['image_id']])
  aucs = {}
  for k, name in enumerate(label_names):
    scores, targets = [], []
    for study in dict.fromkeys(studies):
      rows = studies == study
      if found['mask'][rows, k].all():
        scores.append(reduce(found['scores'][rows, k]))
        targets.append(found['labels'][rows, k][0])
    if 0 < sum(targets) < len(targets):
      aucs[name] = sk_metrics.roc_auc_score(targets, scores)
  return aucs


def test_per_study_test_metrics_combine_the_per_image_predictions(cxr, tmp_path):
  rows, data_dir = cxr
  per_image = finetune.train_and_evaluate(cxr_config(data_dir), os.fspath(tmp_path / 'image'))
  per_study = finetune.train_and_evaluate(cxr_config(data_dir, **{'task.eval_unit': 'study'}),
                                          os.fspath(tmp_path / 'study'))
  assert (per_image['eval_unit'], per_study['eval_unit']) == ('image', 'study')
  assert per_study['eval_reduce'] == 'max' and per_image['eval_reduce'] is None
  valid = [r for r in rows if r['split'] == 'validation']
  assert per_image['test']['num_examples'] == len(valid)
  studies = {(r['patient'], r['study']) for r in valid}
  assert per_study['test']['num_examples'] == len(studies) < len(valid)
  expected = _study_metrics(os.fspath(tmp_path / 'image' / 'test_predictions.npz'),
                            per_image['label_names'])
  assert set(expected) >= {'Cardiomegaly', 'Pleural Effusion'}
  for name, auc in expected.items():
    assert per_study['test']['auc_per_class'][name] == pytest.approx(auc, abs=1e-6), name
  saved = np.load(tmp_path / 'study' / 'test_predictions.npz')
  assert sorted(saved['unit_id']) == sorted(f'{p}/{s}' for p, s in studies)
  # The model selection counted studies too: fewer examples than the held-out images.
  assert per_study['validation']['num_examples'] < per_image['validation']['num_examples']


def test_frontal_only_fine_tuning_reads_and_tests_only_frontal_images(cxr, tmp_path):
  rows, data_dir = cxr
  results = finetune.train_and_evaluate(cxr_config(data_dir, **{'data.views': 'frontal'}),
                                        os.fspath(tmp_path / 'work'))
  assert results['views'] == 'frontal'
  train = [r for r in rows if r['split'] == 'train' and r['frontal']
           and not fractions.is_held_out(r['patient'], 0.25)]
  assert results['labelled_images'] == len(train)
  valid = [r for r in rows if r['split'] == 'validation' and r['frontal']]
  saved = np.load(tmp_path / 'work' / 'test_predictions.npz')
  assert sorted(saved['image_id']) == sorted(r['image_id'] for r in valid)


@pytest.mark.parametrize('key,value,message', [
    ('data.views', 'frontal', "views='frontal': data set image_cases/colours has no view"),
    ('task.eval_unit', 'study', "eval_unit='study': data set image_cases/colours has no"),
    ('task.eval_reduce', 'median', "eval_reduce='median' is not one of"),
])
def test_a_protocol_the_data_set_cannot_give_fails_before_training(colours, tmp_path, key,
                                                                    value, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
    finetune.train_and_evaluate(tiny_config(colours, **{key: value}),
                                os.fspath(tmp_path / 'work'))
  assert not (tmp_path / 'work' / 'checkpoints').exists()


def test_per_case_evaluation_on_one_image_per_case_is_per_image(colours, tmp_path):
  cfg = tiny_config(colours, **{'task.eval_unit': 'case', 'total_steps': 10,
                                'eval_every_steps': 10})
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  assert results['eval_unit'] == 'case' and results['test']['top1'] >= 0.0
  assert results['test']['num_examples'] == 16


def test_per_study_test_on_the_split_that_holds_the_validation_cases(cxr, tmp_path):
  """The held-out cases and the test split are two sources of one split: each gets the
  units of its own records."""
  rows, data_dir = cxr
  results = finetune.train_and_evaluate(
      cxr_config(data_dir, **{'data.test_split': 'train', 'task.eval_unit': 'study'}),
      os.fspath(tmp_path / 'work'))
  train = [r for r in rows if r['split'] == 'train']
  assert results['test']['num_examples'] == len({(r['patient'], r['study']) for r in train})
  held = {(r['patient'], r['study']) for r in train if fractions.is_held_out(r['patient'], 0.25)}
  assert results['validation']['num_examples'] == len(held)


def test_a_protocol_a_split_cannot_give_fails_before_training(cxr, tmp_path):
  _, data_dir = cxr
  # A patient's studies have different labels: no label per patient.
  with pytest.raises(DataError, match=r'the images of patient\d+ have different labels'):
    finetune.train_and_evaluate(cxr_config(data_dir, **{'task.eval_unit': 'case'}),
                                os.fspath(tmp_path / 'case'))
  assert not (tmp_path / 'case' / 'checkpoints').exists()
  # The test split has no lateral image.
  write_chexpert_studies(tmp_path / 'raw', patients=(12, 4), lateral_in=('train',))
  build_data.build('chexpert', data_dir=os.fspath(tmp_path / 'data'),
                   manual_dir=os.fspath(tmp_path / 'raw'))
  with pytest.raises(ConfigError, match="config.data.views='lateral': no image of "
                     'chexpert/validation is lateral'):
    finetune.train_and_evaluate(cxr_config(tmp_path / 'data', **{'data.views': 'lateral'}),
                                os.fspath(tmp_path / 'lateral'))
  assert not (tmp_path / 'lateral' / 'checkpoints').exists()


def test_a_shift_data_set_without_studies_is_evaluated_per_image(cxr, tmp_path, caplog):
  _, data_dir = cxr
  _write_colour_cases(tmp_path / 'raw', multi_label=True)
  build_data.build('image_cases/multi', data_dir=data_dir, manual_dir=os.fspath(tmp_path / 'raw'))
  cfg = cxr_config(data_dir, **{'task.eval_unit': 'study', 'shift.dataset': 'image_cases/multi',
                                'shift.label_map': 'Cardiomegaly=red,Edema=green'})
  with caplog.at_level(logging.WARNING):
    results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  assert ("eval_unit='study': image_cases/multi (config.shift.dataset) has no such unit; it "
          'is evaluated per image') in caplog.text
  assert results['shift']['eval_unit'] == 'image' and results['shift']['images'] == 16
  assert results['eval_unit'] == 'study'


def test_a_student_on_other_views_than_its_teacher_is_warned(cxr, tmp_path, caplog):
  _, data_dir = cxr
  teacher = os.fspath(tmp_path / 'teacher')
  finetune.train_and_evaluate(cxr_config(data_dir, **{'data.views': 'frontal'}), teacher)
  cfg = cxr_config(data_dir, trainer='distill', teacher=teacher,
                   **{'data.views': 'lateral', 'total_steps': 2, 'eval_every_steps': 2})
  with caplog.at_level(logging.WARNING):
    finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'student'))
  assert ('was trained on frontal images only; here it labels lateral images only '
          '(config.data.views)') in caplog.text
