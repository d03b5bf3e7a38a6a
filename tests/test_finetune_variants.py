"""Linear evaluation, distillation, ten-crop testing and distribution-shift evaluation."""

import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bigssl_med import build_data, config_schema, label_mapping, supervised
from bigssl_med import metrics as metrics_lib
from bigssl_med.data import fractions, sources
from bigssl_med.errors import CheckpointError, ConfigError
from bigssl_med.trainers import finetune, pretrain
from test_finetune import _write_colour_cases, tiny_config
from test_pretrain import tiny_config as tiny_pretrain_config


@pytest.fixture(scope='module')
def colours(tmp_path_factory):
  """The separable colour cases, and the same images under other class names."""
  root = tmp_path_factory.mktemp('colours_variants')
  _write_colour_cases(root / 'raw')
  build_data.build('image_cases/colours', data_dir=os.fspath(root / 'data'),
                   manual_dir=os.fspath(root / 'raw'))
  renamed = root / 'raw_fr'
  renamed.mkdir()
  (renamed / 'images').symlink_to(root / 'raw' / 'images')
  text = (root / 'raw' / 'cases.csv').read_text()
  (renamed / 'cases.csv').write_text(text.replace(',red,', ',rouge,').replace(',green,', ',vert,'))
  build_data.build('image_cases/couleurs', data_dir=os.fspath(root / 'data'),
                   manual_dir=os.fspath(renamed))
  return root / 'data'


@pytest.fixture(scope='module')
def teacher(colours, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('teacher')
  # SimCLRv2's fine-tuning keeps a projection-head layer; the student (distill's
  # default) keeps none, so teacher and student have different variable trees.
  cfg = tiny_config(colours, init='scratch', head_layers_kept=1, **{
      'data.test_ten_crop': True, 'shift.dataset': 'image_cases/couleurs',
      'shift.label_map': 'red=rouge,green=vert'})
  return workdir, finetune.train_and_evaluate(cfg, os.fspath(workdir))


# ------------------------------------------------------------------------- Ten crops.


def test_ten_crops_are_torchvision_s_corners_centre_and_mirrors():
  images = np.arange(2 * 6 * 7 * 1, dtype=np.float32).reshape(2, 6, 7, 1)
  crops = np.asarray(supervised.ten_crops(jnp.asarray(images), 4))
  assert crops.shape == (10, 2, 4, 4, 1)
  expected = [images[:, 0:4, 0:4], images[:, 0:4, 3:7], images[:, 2:6, 0:4],
              images[:, 2:6, 3:7], images[:, 1:5, 1:5]]
  expected += [e[:, :, ::-1] for e in expected]
  for got, want in zip(crops, expected):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match='exceeds'):
    supervised.ten_crops(jnp.asarray(images), 7)


class _FakeModel:
  """Logits from the mean of each image: a crop-dependent, known function."""

  def apply(self, variables, images, train=False):
    del train
    m = images.mean(axis=(1, 2, 3))
    return jnp.stack([variables['w'] * m, -m, 0.5 * m], axis=-1)


@pytest.mark.parametrize('kind', ['multiclass', 'multilabel'])
def test_ten_crop_step_averages_probabilities(kind):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (3, 9, 9, 3)).astype(np.uint8)
  task = supervised.Task(kind, 3)
  step = supervised.make_eval_step(_FakeModel(), task, ten_crop_size=7)
  got = np.asarray(step({'w': 2.0}, {'image': jnp.asarray(images)}), np.float64)
  crops = np.asarray(supervised.ten_crops(jnp.asarray(images / 255.0), 7), np.float64)
  m = crops.mean(axis=(2, 3, 4))                     # [10, N]
  logits = np.stack([2.0 * m, -m, 0.5 * m], axis=-1)  # [10, N, 3]
  if kind == 'multiclass':
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = np.log(p.mean(0))
    np.testing.assert_allclose(np.exp(got), np.exp(want), atol=1e-6)
  else:
    p = (1 / (1 + np.exp(-logits))).mean(0)
    np.testing.assert_allclose(1 / (1 + np.exp(-got)), p, atol=1e-6)


class _ConstantModel:
  """The same logits for every crop: the ten-crop average must give them back."""

  def apply(self, variables, images, train=False):
    del train
    return jnp.broadcast_to(variables['logits'], (images.shape[0], 9))


@pytest.mark.parametrize('kind', ['multiclass', 'multilabel'])
def test_ten_crop_keeps_confident_predictions_apart(kind):
  # Probabilities averaged in float32 round to 1 from a logit of about 17 and tie;
  # the average in log space keeps every value.
  logits = jnp.asarray([-20.0, 5.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0])
  step = supervised.make_eval_step(_ConstantModel(), supervised.Task(kind, 9), ten_crop_size=7)
  got = np.asarray(step({'logits': logits}, {'image': jnp.zeros((2, 9, 9, 3), jnp.uint8)}))
  want = np.asarray(logits, np.float64)
  if kind == 'multiclass':
    want = want - np.log(np.exp(want - want.max()).sum()) - want.max()  # log softmax
  np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------- Label mapping.


def test_label_map_errors_name_what_is_unknown():
  model, target = ('mel', 'nv', 'bcc'), ('melanoma', 'naevus', 'other')
  with pytest.raises(ConfigError, match=r"unknown model label\(s\) \['akiec'\]"):
    label_mapping.resolve('akiec=melanoma', model, target, multi_label=False)
  with pytest.raises(ConfigError, match=r"label\(s\) \['scc'\] that 'x' does not have"):
    label_mapping.resolve('mel=melanoma,nv=scc', model, target, multi_label=False, target="'x'")
  with pytest.raises(ConfigError, match='more than once'):
    label_mapping.resolve('mel=melanoma,mel=naevus', model, target, multi_label=False)
  with pytest.raises(ConfigError, match='one to one'):
    label_mapping.resolve('mel=melanoma,nv=melanoma', model, target, multi_label=True)
  with pytest.raises(ConfigError, match='not MODEL_NAME=TARGET_NAME'):
    label_mapping.resolve('mel', model, target, multi_label=False)
  with pytest.raises(ConfigError, match='share no name'):
    label_mapping.resolve('', model, target, multi_label=False)
  shared = label_mapping.resolve('', ('a', 'b', 'c'), ('c', 'x', 'a'), multi_label=True)
  assert shared.as_dict() == {'a': 'a', 'c': 'c'}


def test_many_to_one_multiclass_mapping_adds_probabilities():
  model = ('mel', 'nv', 'bcc', 'bkl')
  target = ('benign', 'malignant', 'unknown')
  label_map = label_mapping.resolve('mel=malignant,bcc=malignant,nv=benign', model, target,
                                    multi_label=False)
  logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.3, 0.1],
                            [0.25, 0.25, 0.25, 0.25]]))
  labels = np.array([0, 1, 2])
  log_probs, mapped, names, left_out = label_mapping.map_multiclass(logits, labels, label_map)
  assert names == ('benign', 'malignant') and left_out == 1
  np.testing.assert_array_equal(mapped, [0, 1])
  # benign = nv; malignant = mel + bcc; renormalised over the two (bkl dropped).
  np.testing.assert_allclose(np.exp(log_probs), [[0.4 / 0.7, 0.3 / 0.7], [0.1 / 0.9, 0.8 / 0.9]])
  # An over-confident model: p(malignant) ~ 1e-20 on every image. The two target classes'
  # AUCs must agree (p(benign) = 1 - p(malignant)): the benign ranking is no tie.
  confident = np.array([[-50.0, 0.0, -48.0, -60.0], [-47.0, 0.0, -49.0, -60.0],
                        [-46.0, 0.0, -52.0, -60.0], [-44.0, 0.0, -45.0, -60.0]])
  log_probs, mapped, _, _ = label_mapping.map_multiclass(confident, np.array([0, 1, 0, 1]),
                                                         label_map)
  assert len(set(log_probs[:, 0])) == 4 and np.all(log_probs[:, 0] < 0)  # not rounded to 0
  auc = metrics_lib.multiclass_metrics(log_probs, mapped, ('benign', 'malignant'))
  assert auc['auc_per_class']['benign'] == auc['auc_per_class']['malignant'] == 0.75


def test_multilabel_mapping_pairs_columns_in_target_order():
  label_map = label_mapping.resolve('Effusion=Pleural Effusion,Edema=Edema',
                                    ('Edema', 'Effusion', 'Mass'),
                                    ('Pleural Effusion', 'Cardiomegaly', 'Edema'),
                                    multi_label=True)
  logits = np.array([[1.0, 2.0, 3.0]])
  targets = np.array([[1.0, 0.0, 0.0]])
  mask = np.array([[True, True, False]])
  got_logits, got_targets, got_mask, names = label_mapping.map_multilabel(
      logits, targets, mask, label_map)
  assert names == ('Pleural Effusion', 'Edema')
  np.testing.assert_array_equal(got_logits, [[2.0, 1.0]])
  np.testing.assert_array_equal(got_targets, [[1.0, 0.0]])
  np.testing.assert_array_equal(got_mask, [[True, False]])


# ------------------------------------------------------------------------- Trainers.


def test_ten_crop_test_and_shift_evaluation(teacher):
  _, results = teacher
  assert results['ten_crop'] and results['test']['top1'] >= 0.8
  assert results['label_names'] == ['green', 'red']
  shift = results['shift']
  assert shift['dataset'] == 'image_cases/couleurs' and shift['images'] == 16
  assert shift['label_map'] == {'red': 'rouge', 'green': 'vert'}
  assert shift['label_names'] == ['rouge', 'vert']  # the classes the metrics are over
  assert shift['images_left_out'] == 0
  # The same test images under other names: the same accuracy.
  assert shift['metrics']['top1'] == pytest.approx(results['test']['top1'])


def test_shift_mapping_to_unknown_class_fails_before_training(colours, tmp_path):
  cfg = tiny_config(colours, **{'shift.dataset': 'image_cases/couleurs',
                                'shift.label_map': 'red=rot'})
  with pytest.raises(ConfigError, match=r"\['rot'\] that 'image_cases/couleurs' does not have"):
    finetune.train_and_evaluate(cfg, os.fspath(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


class _TinyClassifier(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(3, name='classifier')(x)


@pytest.mark.parametrize('distill', [False, True])
def test_step_regularises_the_l2_heads_in_its_loss(distill):
  """`l2_heads` add `wd·Σk²/2` of those heads' kernels to the loss, not to the logged loss."""
  model, tx = _TinyClassifier(), optax.sgd(1.0)
  images = np.random.default_rng(0).integers(0, 256, (4, 2, 2, 3), np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((4, 2, 2, 3)), train=False)
  task = supervised.Task(kind='multiclass', num_outputs=3)
  batch = {'image': images, 'label': np.array([0, 1, 2, 0])}
  new_kernels, losses = [], []
  for l2 in [dict(), dict(l2_heads=('classifier',), weight_decay=0.5)]:
    state = {'model': variables, 'opt': {'step': jnp.zeros((), jnp.int32),
                                         'opt_state': tx.init(variables['params'])}}
    if distill:
      step = supervised.make_distill_step(model, model, tx, optax.constant_schedule(1.0), task,
                                          2.0, **l2)
      state, metrics = step(state, variables, batch, jax.random.key(1))
    else:
      step = supervised.make_train_step(model, tx, optax.constant_schedule(1.0), task, **l2)
      state, metrics = step(state, batch, jax.random.key(1))
    new_kernels.append(np.asarray(state['model']['params']['classifier']['kernel']))
    losses.append(float(metrics['loss']))
  kernel = np.asarray(variables['params']['classifier']['kernel'])
  np.testing.assert_allclose(new_kernels[1] - new_kernels[0], -0.5 * kernel, atol=1e-6)
  assert losses[0] == losses[1]


def test_step_trains_on_the_augmented_crops():
  """With `augment_images`, the model sees what it returns, not the crops."""
  model, tx = _TinyClassifier(), optax.sgd(1.0)
  images = np.random.default_rng(0).integers(0, 256, (4, 2, 2, 3), np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((4, 2, 2, 3)), train=False)
  task = supervised.Task(kind='multiclass', num_outputs=3)
  keys = []

  def black(key, crops):
    keys.append(key)
    return jnp.zeros(crops.shape, jnp.float32)

  kernels = []
  for augment_images, batch_images in [(black, images), (None, np.zeros_like(images)),
                                       (None, images)]:
    state = {'model': variables, 'opt': {'step': jnp.zeros((), jnp.int32),
                                         'opt_state': tx.init(variables['params'])}}
    step = supervised.make_train_step(model, tx, optax.constant_schedule(1.0), task,
                                      augment_images=augment_images)
    state, _ = step(state, {'image': batch_images, 'label': np.array([0, 1, 2, 0])},
                    jax.random.key(1))
    kernels.append(np.asarray(state['model']['params']['classifier']['kernel']))
  np.testing.assert_array_equal(kernels[0], kernels[1])
  assert not np.array_equal(kernels[0], kernels[2])
  assert len(keys) == 1


def test_finetune_config_augment_reaches_the_step(colours, tmp_path, monkeypatch):
  seen = []
  from_config = finetune.augment.from_config

  def spy(a):
    seen.append(a.to_dict())
    return from_config(a)

  monkeypatch.setattr(finetune.augment, 'from_config', spy)
  cfg = tiny_config(colours, total_steps=2, eval_every_steps=2,
                    **{'augment.rotation_deg': 30.0, 'augment.jitter_p': 0.8})
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'augmented'))
  assert results['step'] == 2
  assert [(a['rotation_deg'], a['jitter_p'], a['blur_p']) for a in seen] == [(30.0, 0.8, 0.0)]
  finetune.train_and_evaluate(tiny_config(colours, total_steps=2, eval_every_steps=2),
                              os.fspath(tmp_path / 'plain'))
  assert len(seen) == 1  # crops and flips only: no augmentation traced


def test_holdout_validates_on_training_cases_and_tests_on_the_validation_split(
    colours, tmp_path):
  cfg = tiny_config(colours, total_steps=4, eval_every_steps=2,
                    **{'data.holdout': 0.25, 'data.eval_split': '',
                       'data.test_split': 'validation'})
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'held'))
  held = fractions.open_holdout('image_cases/colours', 'train', os.fspath(colours), 0.25)
  assert 0 < len(held) < 64
  assert results['labelled_images'] == 64 - len(held)
  cases = sources.cases('image_cases/colours', 'train', os.fspath(colours))
  assert results['labelled_cases'] == sum(not fractions.is_held_out(c, 0.25) for c in cases)
  assert 0 < results['labelled_cases'] < len(cases)
  assert results['validation']['num_examples'] == len(held)
  assert results['validation_split'] == 'image_cases/colours/train (held-out 0.25 of its cases)'
  assert results['test']['num_examples'] == 16  # the validation split, tested once
  rows = [json.loads(line) for line in (tmp_path / 'held' / 'metrics.jsonl').read_text()
          .splitlines()]
  assert [r['split'] for r in rows if r['split'] != 'train'] == [
      'holdout', 'holdout', 'test']  # the last: the best model on the validation split
  assert results['test_split'] == 'image_cases/colours/validation'
  with pytest.raises(ConfigError, match=r"data.eval_split is 'validation': pass "
                                        r"--config.data.eval_split='' with it"):
    finetune.train_and_evaluate(tiny_config(colours, **{'data.holdout': 0.25}),
                                os.fspath(tmp_path / 'both'))


def test_linear_eval_trains_only_the_classifier(colours, tmp_path):
  source = os.fspath(tmp_path / 'pretrained')
  pretrain.train_and_evaluate(
      tiny_pretrain_config(os.fspath(colours), dataset='image_cases/colours', micle=False,
                           probe=False, total_steps=2), source)
  cfg = tiny_config(colours, trainer='linear_eval', init_from=source, total_steps=30,
                    **{'optimizer.learning_rate': 1.0})
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'linear'))
  assert results['trainer'] == 'linear_eval' and results['pretrain_seed'] == 0
  assert results['test']['top1'] >= 0.8
  best = ocp.StandardCheckpointer().restore(os.fspath(tmp_path / 'linear' / 'best'))
  pretrained = ocp.StandardCheckpointer().restore(
      os.fspath(tmp_path / 'pretrained' / 'checkpoints' / '2' / 'model'))
  for collection in ('params', 'batch_stats'):
    chex_equal = jax.tree.map(np.array_equal, best[collection]['encoder'],
                              pretrained[collection]['encoder'])
    assert all(jax.tree.leaves(chex_equal)), collection
  assert set(best['params']) == {'encoder', 'classifier'}
  assert set(best['batch_stats']) == {'encoder'}  # SimCLR's linear layer on the raw features


@pytest.mark.parametrize('trainer', ['finetune', 'linear_eval', 'distill'])
def test_classifier_starts_at_zero_and_reads_raw_features_by_default(trainer):
  config = config_schema.defaults(trainer)
  config.model.depth, config.model.width_multiplier, config.model.cifar_stem = 18, 0.125, True
  x = jnp.ones((2, 8, 8, 3))

  def initial(**changes):
    c = config.copy_and_resolve_references()
    for key, value in changes.items():
      c[key] = value
    return finetune.build_model(c, 5).init(jax.random.key(0), x, train=False)

  variables = initial()
  np.testing.assert_array_equal(variables['params']['classifier']['kernel'], 0)
  np.testing.assert_array_equal(variables['params']['classifier']['bias'], 0)
  assert 'feature_bn' not in variables['batch_stats']
  kernel = initial(classifier_init='normal')['params']['classifier']['kernel']
  assert 0.005 < np.std(kernel) < 0.02
  if trainer == 'linear_eval':
    assert 'feature_bn' in initial(feature_bn=True)['batch_stats']
  with pytest.raises(ConfigError, match=r"config.classifier_init='uniform' is not one of "):
    initial(classifier_init='uniform')


def test_a_run_config_without_the_newer_keys_reads_as_it_ran(tmp_path):
  saved = config_schema.defaults('linear_eval').to_dict()
  del saved['classifier_init'], saved['feature_bn']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = finetune.read_run_config(os.fspath(tmp_path))
  assert (config.classifier_init, config.feature_bn) == ('normal', True)
  settings = config_schema.saved_settings(saved)
  assert (settings['classifier_init'], settings['feature_bn']) == ('normal', True)
  differences = config_schema.setting_differences(saved, config_schema.defaults('linear_eval'))
  assert [d[0] for d in differences] == ['classifier_init', 'feature_bn']


def test_init_from_a_run_trained_on_labels_names_its_model(teacher, colours, tmp_path):
  teacher_dir, teacher_results = teacher
  cfg = tiny_config(colours, init_from=os.fspath(teacher_dir), total_steps=2)
  with pytest.raises(CheckpointError, match=(
      rf"^init_from='{teacher_dir}' is a finetune run \(trained on the labels of "
      r"'image_cases/colours', label fraction 1.0\), not a pretraining run: to start from "
      rf"it, name its selected model \(init_from='{teacher_dir}/best'\) or a step folder")):
    finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'from_workdir'))
  assert not list((tmp_path / 'from_workdir').glob('checkpoints/[0-9]*'))  # nothing trained
  cfg.init_from = os.fspath(teacher_dir / 'best')  # named: the selected model
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'from_best'))
  assert results['origin'] == (f'initialised encoder from {teacher_dir}/best '
                               f'(step {teacher_results["best_step"]})')
  assert results['initialised_from'] == {'init_from': cfg.init_from, 'checkpoint': cfg.init_from,
                                         'step': teacher_results['best_step'],
                                         'pretrain_seed': None}  # a fine-tuned model


def test_init_from_an_unfinished_pretraining_run_warns(colours, tmp_path, caplog):
  source = tmp_path / 'pretrained'
  pretrain.train_and_evaluate(
      tiny_pretrain_config(os.fspath(colours), dataset='image_cases/colours', micle=False,
                           probe=False, total_steps=2), os.fspath(source))
  (source / 'results.json').unlink()  # as a run stopped before its end leaves it
  cfg = tiny_config(colours, init_from=os.fspath(source), total_steps=2)
  with caplog.at_level(logging.WARNING):
    results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'tuned'))
  assert (f"init_from='{source}' is a pretraining run without results.json (unfinished?): "
          'starting from its newest checkpoint, step 2') in caplog.text
  assert results['origin'] == f'initialised encoder from {source} (step 2)'


def test_linear_eval_without_init_from_warns(colours, tmp_path, caplog):
  cfg = tiny_config(colours, trainer='linear_eval', total_steps=2)
  with caplog.at_level(logging.WARNING):
    results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'random'))
  assert results['init'] == 'scratch'
  assert 'no config.init_from: the classifier is trained on a frozen, randomly' in caplog.text


def test_distillation_from_a_fine_tuned_teacher(teacher, colours, tmp_path, caplog,
                                                monkeypatch):
  teacher_dir, teacher_results = teacher
  monkeypatch.chdir(teacher_dir.parent)  # the teacher named relative to here
  cfg = tiny_config(colours, trainer='distill', teacher=teacher_dir.name,
                    **{'model.width_multiplier': 0.0625})
  results = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'student'))
  assert results['trainer'] == 'distill' and results['init'] == 'distilled from scratch'
  assert results['teacher']['workdir'] == os.fspath(teacher_dir)  # findable from anywhere
  assert results['labelled_images'] == results['labelled_cases'] == 0
  assert results['teacher']['test'] == teacher_results['test']
  assert results['test']['top1'] >= 0.8
  logged = [json.loads(line) for line in
            (tmp_path / 'student' / 'metrics.jsonl').read_text().splitlines()]
  agreement = [e['teacher_agreement'] for e in logged if e['split'] == 'train']
  assert agreement[-1] >= 0.8
  # A teacher of another data set, or no teacher: one-line errors.
  other = tiny_config(colours, trainer='distill', teacher=os.fspath(teacher_dir),
                      dataset='image_cases/couleurs', **{'data.image_size': 32})
  with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match='was trained on'):
    finetune.train_and_evaluate(other, os.fspath(tmp_path / 'other'))
  assert 'trained on 16-pixel images; here it scores the student\'s 32-pixel' in caplog.text
  # A run of another trainer, a distillation among them, is named as such.
  again = tiny_config(colours, trainer='distill', teacher=os.fspath(tmp_path / 'student'))
  with pytest.raises(ConfigError, match=r"is a run of the 'distill' trainer; a teacher is a "
                                        'finished finetune or linear_eval run'):
    finetune.train_and_evaluate(again, os.fspath(tmp_path / 'again'))
  other.teacher = os.fspath(tmp_path / 'nowhere')
  with pytest.raises(ConfigError, match='config.json: missing'):
    finetune.train_and_evaluate(other, os.fspath(tmp_path / 'other2'))


@pytest.mark.parametrize('kind', ['multilabel', 'multiclass'])
def test_saved_predictions_reproduce_the_metrics_auc(tmp_path, kind):
  # Two float32 logits one ulp apart whose float32 probabilities are one value: the file
  # must keep them apart, or an AUC computed from it scores a tie the metrics did not.
  high = np.float32(5.0)
  logits = np.array([[high], [np.nextafter(high, np.float32(10))], [-1.0], [6.0]], np.float32)
  assert (1 / (1 + np.exp(-logits[0]))) == (1 / (1 + np.exp(-logits[1])))  # in float32
  if kind == 'multilabel':
    labels = np.array([[0.0], [1.0], [0.0], [1.0]], np.float32)
    task = supervised.Task('multilabel', 1)
    want = metrics_lib.multilabel_metrics(logits, labels)['auc_mean']
  else:
    logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    labels = np.array([0, 1, 0, 1])
    task = supervised.Task('multiclass', 2)
    want = metrics_lib.multiclass_metrics(logits, labels)['auc_per_class']['1']
  path = os.fspath(tmp_path / 'test_predictions.npz')
  finetune._save_predictions(path, logits, labels, task)  # pylint: disable=protected-access
  saved = np.load(path)
  assert saved['scores'].dtype == saved['log_scores'].dtype == np.float64
  np.testing.assert_allclose(np.exp(saved['log_scores']), saved['scores'], rtol=1e-12)
  positive = (saved['labels'][:, 0] if kind == 'multilabel' else saved['labels'] == 1) > 0
  got = metrics_lib._auc(positive, saved['scores'][:, -1])  # pylint: disable=protected-access
  assert got == want == 1.0
