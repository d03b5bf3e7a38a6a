"""End-to-end tests of the fine-tuning trainer on small generated and built data."""

import json
import os

import numpy as np
from PIL import Image
import pytest
from sklearn import metrics as sk_metrics

from bigssl_med import build_data, checkpointing, config_schema, model_selection, supervised
from bigssl_med.data import fractions, sources
from bigssl_med.errors import CheckpointError, ConfigError
from bigssl_med.trainers import finetune, pretrain
from conftest import override
from test_pretrain import tiny_config as tiny_pretrain_config


def _write_colour_cases(root, per_split=(64, 16, 16), multi_label=False):
  """Separable images: 'red' and 'green' dominated, noisy; one image per case."""
  rng = np.random.default_rng(0)
  (root / 'images').mkdir(parents=True)
  lines = ['path,case_id,' + ('labels' if multi_label else 'label') + ',split']
  n = 0
  for split, count in zip(('train', 'validation', 'test'), per_split):
    for i in range(count):
      red = i % 2 == 0
      image = rng.integers(0, 90, (20, 20, 3)).astype(np.uint8)
      image[..., 0 if red else 1] += 150
      path = root / 'images' / f'{n:04d}.png'
      Image.fromarray(image).save(path)
      if multi_label:
        label = 'red' if red else ('green|round' if i % 4 == 1 else 'green')
      else:
        label = 'red' if red else 'green'
      lines.append(f'images/{path.name},case{n:04d},{label},{split}')
      n += 1
  (root / 'cases.csv').write_text('\n'.join(lines) + '\n')
  return root


def tiny_config(data_dir, dataset='image_cases/colours', trainer='finetune', **overrides):
  c = config_schema.defaults(trainer)
  c.dataset = dataset
  c.data.data_dir = os.fspath(data_dir)
  c.data.build_if_missing = False
  c.data.image_size = 16
  c.data.num_workers = 0
  c.data.crop_area_min = 0.5
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.cifar_stem = True
  c.model.head_out_dim = 16
  c.compute_dtype = 'float32'
  c.batch_size = 16
  c.total_steps = 40
  c.num_epochs = 0.0
  c.eval_every_steps = 10
  c.log_every_steps = 10
  c.checkpoint_every_steps = 20
  c.head_layers_kept = 0
  c.tensorboard = False
  c.optimizer.learning_rate = 0.2
  return override(c, overrides)


@pytest.fixture(scope='module')
def colours(tmp_path_factory):
  root = tmp_path_factory.mktemp('colours')
  _write_colour_cases(root / 'raw')
  build_data.build('image_cases/colours', data_dir=os.fspath(root / 'data'),
                   manual_dir=os.fspath(root / 'raw'))
  return root / 'data'


@pytest.fixture(scope='module')
def finetuned(colours, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('finetuned')
  results = finetune.train_and_evaluate(tiny_config(colours), os.fspath(workdir))
  return workdir, results


def test_scratch_fine_tune_beats_chance_on_separable_data(finetuned):
  _, results = finetuned
  assert results['trainer'] == 'finetune' and results['init'] == 'scratch'
  assert results['task'] == 'multiclass' and results['primary_metric'] == 'top1'
  assert results['test']['top1'] >= 0.8
  assert results['validation']['top1'] >= 0.8
  assert results['test']['num_examples'] == 16


def test_workdir_has_best_model_selection_and_predictions(finetuned, colours):
  workdir, results = finetuned
  best = json.loads((workdir / 'best.json').read_text())
  assert best['step'] == results['best_step'] and best['last_eval_step'] == 40
  assert best['value'] == results['validation']['top1']
  evals = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  validation = [e for e in evals if e['split'] == 'validation']
  assert [e['step'] for e in validation] == [10, 20, 30, 40]
  assert best['value'] == max(e['top1'] for e in validation)
  # The build it trained on, which a resumed run must read again.
  assert json.loads((workdir / 'data.json').read_text()) == sources.fingerprint(
      'image_cases/colours', os.fspath(colours), ('train', 'validation'))
  predictions = np.load(workdir / 'test_predictions.npz')
  assert predictions['scores'].shape == (16, 2)
  np.testing.assert_allclose(predictions['scores'].sum(1), 1.0, rtol=1e-5)
  assert list(predictions['class_names']) == ['green', 'red']
  # Two classes: binary metrics of the second class's probability, as scikit-learn has them.
  labels = predictions['labels']
  assert results['test']['auc'] == pytest.approx(
      sk_metrics.roc_auc_score(labels, predictions['scores'][:, 1]), abs=1e-6)
  assert 0.0 <= results['test']['sensitivity_at_specificity_0.9'] <= 1.0


def test_test_predictions_name_the_image_and_case_of_each_row(tmp_path):
  """13 test records in batches of 8: the padding of the last batch is left out, and each
  row's image_id and case_id are those of the record its label and scores come from."""
  _write_colour_cases(tmp_path / 'raw', per_split=(64, 16, 13))
  data_dir = os.fspath(tmp_path / 'data')
  build_data.build('image_cases/colours', data_dir=data_dir,
                   manual_dir=os.fspath(tmp_path / 'raw'))
  cfg = tiny_config(data_dir, total_steps=2, eval_every_steps=0, batch_size=8)
  finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  saved = np.load(tmp_path / 'work' / 'test_predictions.npz', allow_pickle=False)
  source = sources.open_split('image_cases/colours', 'test', data_dir)
  records = [source[i] for i in range(len(source))]
  assert saved['scores'].shape == (13, 2)
  assert list(saved['image_id']) == [r['image_id'].decode() for r in records]
  assert list(saved['case_id']) == [r['case_id'].decode() for r in records]
  np.testing.assert_array_equal(saved['labels'], [r['label'] for r in records])
  # The generated images alternate red and green by case number: ids and labels agree.
  red = list(saved['class_names']).index('red')
  for case_id, label in zip(saved['case_id'], saved['labels']):
    assert (label == red) == (int(case_id[len('case'):]) % 2 == 0), (case_id, label)


def test_second_run_returns_the_results_without_retraining(finetuned, colours):
  workdir, results = finetuned
  mtime = os.path.getmtime(workdir / 'metrics.jsonl')
  again = finetune.train_and_evaluate(tiny_config(colours), os.fspath(workdir))
  assert again == results
  assert os.path.getmtime(workdir / 'metrics.jsonl') == mtime
  changed = tiny_config(colours, **{'optimizer.learning_rate': 0.5, 'task.blank': 'ignore'})
  with pytest.raises(ConfigError, match=r'holds a finished run with other settings: '
                                        r'optimizer.learning_rate is .* there, 0.5 asked '
                                        r'and 1 more; run in a new workdir'):
    finetune.train_and_evaluate(changed, os.fspath(workdir))


def test_a_relative_workdir(colours, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  results = finetune.train_and_evaluate(tiny_config(colours, total_steps=4, eval_every_steps=2),
                                        os.path.join('runs', 'relative'))
  assert results['step'] in (2, 4)
  assert (tmp_path / 'runs' / 'relative' / 'best').is_dir()


def test_each_validation_and_the_end_of_the_run_are_logged(colours, tmp_path, caplog):
  cfg = tiny_config(colours, total_steps=6, eval_every_steps=2,
                    **{'optimizer.learning_rate': 0.0})  # nothing improves after step 2
  with caplog.at_level('INFO'):
    results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path))
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith(('Step ', 'Done at step'))]
  value = results['validation']['top1']
  assert lines == [
      f'Step 2: validation top1 {value:.6g}, the new best',
      f'Step 4: validation top1 {value:.6g}; best so far {value:.6g} at step 2 (1 evaluation '
      'without improvement)',
      f'Step 6: validation top1 {value:.6g}; best so far {value:.6g} at step 2 (2 evaluations '
      'without improvement)',
      f'Done at step 6: best validation top1 {value:.6g} (step 2); test top1 '
      f"{results['test']['top1']:.6g} on image_cases/colours/test"]


def test_early_stopping_stops_and_tests_the_best(colours, tmp_path):
  cfg = tiny_config(colours, total_steps=200, eval_every_steps=4, early_stopping_patience=2,
                    **{'optimizer.learning_rate': 0.0})  # nothing improves after step 4
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path))
  assert results['stopped_early'] and results['step'] == 12
  assert results['best_step'] == 4


def test_multi_label_fine_tune_reports_mean_auc(tmp_path):
  _write_colour_cases(tmp_path / 'raw', multi_label=True)
  build_data.build('image_cases/multi', data_dir=os.fspath(tmp_path / 'data'),
                   manual_dir=os.fspath(tmp_path / 'raw'))
  cfg = tiny_config(tmp_path / 'data', dataset='image_cases/multi',
                    **{'task.mean_over': 'green,red'})
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  assert results['task'] == 'multilabel' and results['primary_metric'] == 'auc_mean'
  assert results['test']['auc_mean'] >= 0.8
  with pytest.raises(ConfigError, match='unknown labels'):
    finetune.train_and_evaluate(
        tiny_config(tmp_path / 'data', dataset='image_cases/multi',
                    **{'task.mean_over': 'green,blue'}), os.fspath(tmp_path / 'w2'))


@pytest.fixture(scope='module')
def multi_colours(tmp_path_factory):
  """Labels red, green and round; 'round' only with green, on every fourth case."""
  root = tmp_path_factory.mktemp('multi_colours')
  _write_colour_cases(root / 'raw', multi_label=True)
  build_data.build('image_cases/multi', data_dir=os.fspath(root / 'data'),
                   manual_dir=os.fspath(root / 'raw'))
  return root / 'data'


def test_a_label_without_a_positive_training_example_is_a_warning(multi_colours, tmp_path,
                                                                  caplog):
  # Fraction seed 24 draws 10 of the 64 training cases, none of them 'green|round'.
  chosen = fractions.select_cases([f'case{n:04d}' for n in range(64)], 0.15, 24)
  assert len(chosen) == 10 and not any(int(c[len('case'):]) % 4 == 1 for c in chosen)
  cfg = tiny_config(multi_colours, dataset='image_cases/multi', total_steps=1,
                    eval_every_steps=0, batch_size=8,
                    **{'data.label_fraction': 0.15, 'data.fraction_seed': 24})
  with caplog.at_level('WARNING'):
    finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  warnings = [r.getMessage() for r in caplog.records if 'no positive training' in r.getMessage()]
  assert warnings == ["image_cases/multi/train: no positive training example of label(s) round "
                      "(uncertain labels counted as task.uncertain='ones' makes them); the "
                      'classifier cannot learn them (raise config.data.label_fraction)']


@pytest.mark.parametrize('policy, missing', [('ones', 'round'), ('lsr_ones', 'round'),
                                             ('zeros', 'green, round'),
                                             ('ignore', 'green, round')])
def test_uncertain_labels_count_as_positive_where_the_policy_makes_them_so(caplog, policy,
                                                                         missing):
  """'green' is only ever uncertain; 'round' never positive (blank or 0)."""
  labels = np.array([[-1.0, 1.0, np.nan], [-1.0, 0.0, 0.0]], np.float32)
  task = supervised.Task('multilabel', 3, ('green', 'red', 'round'), uncertain=policy)
  with caplog.at_level('WARNING'):
    finetune._warn_missing_classes(labels, task, 'data/train')
  assert [r.getMessage().split(' (')[0] for r in caplog.records] == [
      f'data/train: no positive training example of label(s) {missing}']


def test_a_class_without_a_training_example_is_a_warning(caplog):
  task = supervised.Task('multiclass', 4, ('a', 'b', 'c', 'd'))
  with caplog.at_level('WARNING'):
    finetune._warn_missing_classes(np.array([0, 2, 2, 0]), task, 'data/train')
  assert [r.getMessage().split(';')[0] for r in caplog.records] == [
      'data/train: no training example of class(es) b, d']


class _WithUncertain:
  """A split whose `labels` are uncertain (-1) in places: the first label of every third
  record and the last of every fourth."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, record):
    example = dict(self._source[record])
    labels = np.array(example['labels'], np.float32)
    if record % 3 == 0:
      labels[0] = -1.0
    if record % 4 == 0:
      labels[-1] = -1.0
    example['labels'] = labels
    return example


def _bce(logits, targets, mask):
  """Mean sigmoid cross-entropy over `mask`, from its definition (NumPy, float64)."""
  p = 1 / (1 + np.exp(-logits))
  losses = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
  return losses[mask].mean()


@pytest.mark.parametrize('policy', ['ones', 'lsr_ones'])
def test_train_policy_validation_loss_counts_uncertain_labels(tmp_path, monkeypatch, policy):
  """task.eval_uncertain='train_policy': the validation loss counts uncertain labels with
  the training policy's targets; the AUCs, and the test split's loss, leave them out."""
  _write_colour_cases(tmp_path / 'raw', multi_label=True)
  build_data.build('image_cases/multi', data_dir=os.fspath(tmp_path / 'data'),
                   manual_dir=os.fspath(tmp_path / 'raw'))
  open_split = sources.open_split
  monkeypatch.setattr(sources, 'open_split', lambda *a, **k: _WithUncertain(open_split(*a, **k)))
  # Validation and test on one split, evaluated once (step 4): one model, one set of logits.
  cfg = tiny_config(tmp_path / 'data', dataset='image_cases/multi', total_steps=4,
                    eval_every_steps=0, seed=5,
                    **{'task.uncertain': policy, 'task.eval_uncertain': 'train_policy',
                       'data.test_split': 'validation', 'optimizer.learning_rate': 2.0})
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  assert results['best_step'] == 4
  saved = np.load(tmp_path / 'work' / 'test_predictions.npz')
  scores = saved['scores'].astype(np.float64)
  logits = np.log(scores) - np.log1p(-scores)
  source = _WithUncertain(open_split('image_cases/multi', 'validation',
                                     os.fspath(tmp_path / 'data')))
  labels = np.stack([source[i]['labels'] for i in range(len(source))]).astype(np.float64)
  uncertain = labels == -1
  assert uncertain.sum() >= 8 and not np.isnan(labels).any()
  targets = np.where(uncertain, 1.0, labels)
  if policy == 'lsr_ones':  # the draws of the evaluation at step 4 of seed 5
    task = supervised.Task('multilabel', labels.shape[1], uncertain='lsr_ones')
    drawn, _ = supervised.policy_targets(labels, task, seed=5, step=4)
    assert ((drawn[uncertain] >= 0.55) & (drawn[uncertain] < 0.85)).all()
    targets = np.where(uncertain, drawn, labels)
  validation, test = results['validation'], results['test']
  # (The scores are float32: the logits recovered from them are good to about 1e-7.)
  want = _bce(logits, targets, np.ones_like(uncertain))
  assert validation['loss'] == pytest.approx(want, rel=2e-6)
  ignored = _bce(logits, labels, ~uncertain)
  assert test['loss'] == pytest.approx(ignored, rel=2e-6)
  assert abs(want - ignored) > 1e-5
  for key in ('auc_mean', 'auc_per_class'):  # the AUCs leave uncertain labels out
    assert validation[key] == test[key]
  np.testing.assert_array_equal(saved['mask'], ~uncertain)


@pytest.mark.parametrize('key, value, message', [
    ('task.eval_uncertain', 'always', "config.task.eval_uncertain='always' is not one of "
                                      'ignore, train_policy'),
    ('data.eval_resize', 'stretch', "config.data.eval_resize='stretch' is not one of "
                                    'square, squash'),
])
def test_unknown_evaluation_settings_are_one_line_errors(colours, tmp_path, key, value,
                                                         message):
  with pytest.raises(ConfigError, match=f'^{message}$'):
    finetune.train_and_evaluate(tiny_config(colours, **{key: value}), os.fspath(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_fine_tune_from_a_pretraining_run(small_ham10000, tmp_path):
  data_dir, _ = small_ham10000
  source = os.fspath(tmp_path / 'pretrained')
  pretrain.train_and_evaluate(tiny_pretrain_config(data_dir, total_steps=2, probe=False),
                              source)
  cfg = tiny_config(data_dir, dataset='ham10000', init_from=source, head_layers_kept=1,
                    total_steps=4, eval_every_steps=2, **{'data.label_fraction': 0.5})
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'ft'))
  assert results['origin'].startswith('initialised encoder+head from')
  assert results['init'] == 'pretrained' and results['label_fraction'] == 0.5
  assert set(results['test']) >= {'top1', 'top3', 'balanced_accuracy', 'auc_macro'}
  # Another architecture: a one-line error naming the checkpoint.
  wrong = tiny_config(data_dir, dataset='ham10000', init_from=source, total_steps=2,
                      **{'model.width_multiplier': 0.25})
  with pytest.raises(CheckpointError, match='init_from'):
    finetune.train_and_evaluate(wrong, os.fspath(tmp_path / 'wrong'))


@pytest.mark.parametrize('path, name', [
    ('runs/micle', 'micle'),
    ('runs/micle/checkpoints', 'micle'),
    ('runs/micle/checkpoints/12', 'micle'),
    ('runs/micle/seed=0', 'micle'),  # launch/sweep.py's workdirs: the seeds of one method pool
    ('runs/micle/seed=1,optimizer.learning_rate=0.3', 'micle/optimizer.learning_rate=0.3'),
    ('runs/micle/seed=1/checkpoints/4', 'micle'),
    ('runs/micle/temperature=0.2', 'temperature=0.2'),
])
def test_init_name_is_the_source_run_not_a_step_or_seed_folder(tmp_path, path, name):
  run = tmp_path / path.split('/checkpoints')[0]
  (run / 'checkpoints' / '12' / 'model').mkdir(parents=True)
  (run / 'config.json').write_text('{}')
  assert checkpointing.init_name(os.fspath(tmp_path / path)) == name
  # Without config.json (a copied checkpoint folder), by the layout alone.
  (run / 'config.json').unlink()
  assert checkpointing.init_name(os.fspath(tmp_path / path)) == name


def test_an_undefined_metric_never_becomes_the_best(tmp_path):
  variables = {'w': np.zeros(2, np.float32)}

  def run(values, patience):
    best = model_selection.BestModel(os.fspath(tmp_path / f'run{len(list(tmp_path.iterdir()))}'),
                                     metric='auc', patience=patience)
    os.makedirs(os.path.dirname(best.path), exist_ok=True)
    stops = [best.update(100 * (k + 1), variables, {'auc': v}) for k, v in enumerate(values)]
    return best, stops

  nan = float('nan')
  best, stops = run([nan, 0.7, 0.8, 0.85], patience=3)  # NaN first, then numbers
  assert (best.step, best.record['value'], stops) == (400, 0.85, [False] * 4)
  best, stops = run([nan] * 5, patience=2)  # never a number: the newest model, no stop
  assert best.step == 500 and stops == [False] * 5 and best.record['evals_since_best'] == 0
  best, stops = run([0.7, nan, nan], patience=2)  # NaN after a number: no improvement
  assert (best.step, best.record['value'], stops) == (100, 0.7, [False, False, True])


def test_micle_on_one_image_per_case_is_a_warning(colours, tmp_path, caplog):
  config = tiny_pretrain_config(os.fspath(colours), total_steps=1, probe=False,
                                dataset='image_cases/colours')
  with caplog.at_level('WARNING'):
    pretrain.train_and_evaluate(config, os.fspath(tmp_path / 'micle'))
  assert ('config.micle: no case of image_cases/colours/train has two images, so every pair '
          'is two views of one image, as in SimCLR') in caplog.text


@pytest.mark.parametrize('trainer,key', [('finetune', 'data.train_split'),
                                         ('linear_eval', 'data.eval_split'),
                                         ('distill', 'data.test_split'),
                                         ('finetune', 'shift.split')])
def test_a_split_of_unlabeled_images_is_refused_where_labels_count(colours, tmp_path, trainer,
                                                                    key):
  workdir = tmp_path / 'work'
  config = tiny_config(colours, trainer=trainer, **{key: 'train+unlabeled',
                                                    'shift.dataset': 'image_cases/colours'})
  with pytest.raises(ConfigError, match=rf"^config.{key}='train\+unlabeled' takes in "
                                        r'split unlabeled, whose images have no labels'):
    finetune.train_and_evaluate(config, os.fspath(workdir))
  assert not workdir.exists()
  # A student learns from the teacher, so its training split may hold unlabeled images.
  config = tiny_config(colours, trainer='distill', **{'data.train_split': 'train+unlabeled'})
  with pytest.raises(ConfigError, match='config.teacher is empty'):
    finetune.train_and_evaluate(config, os.fspath(workdir))
  # ... unless its validation cases are held out of that split.
  config = tiny_config(colours, trainer='distill', **{'data.train_split': 'train+unlabeled',
                                                      'data.holdout': 0.2,
                                                      'data.eval_split': ''})
  with pytest.raises(ConfigError, match=r"^config.data.train_split='train\+unlabeled' takes"):
    finetune.train_and_evaluate(config, os.fspath(workdir))
