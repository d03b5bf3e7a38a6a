"""The pretrain trainer: sharded step equality, workdir contract, resume, init_from, errors."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigssl_med import (augment, build_data, checkpointing, config_schema, contrastive, files,
                        models, optim, parallel, preemption)
from bigssl_med.data import sources
from bigssl_med.errors import CheckpointError, ConfigError, DataError
from bigssl_med.trainers import pretrain
from conftest import override

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  c = config_schema.pretrain()
  c.dataset = 'ham10000'
  c.micle = True
  c.data.data_dir = data_dir
  c.data.build_if_missing = False
  c.data.image_size = 16
  c.data.num_workers = 0
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.cifar_stem = True
  c.model.head_out_dim = 16
  c.compute_dtype = 'float32'
  c.batch_size = 16
  c.total_steps = 4
  c.num_epochs = 0.0
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.warmup_steps = 1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.tensorboard = False
  return override(c, overrides)


def _read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _params_at(workdir, step):
  from bigssl_med import checkpointing  # pylint: disable=g-import-not-at-top
  mesh = parallel.data_mesh()
  return checkpointing.load_model_variables(os.path.join(workdir, 'checkpoints', str(step)),
                                            parallel.replicated(mesh))


@pytest.fixture(scope='module')
def trained(small_ham10000, tmp_path_factory):
  """A 4-step MICLe run on the generated data: (workdir, results, data_dir)."""
  data_dir, _ = small_ham10000
  workdir = os.fspath(tmp_path_factory.mktemp('run') / 'work')
  results = pretrain.train_and_evaluate(tiny_config(data_dir), workdir)
  return workdir, results, data_dir


# --------------------------------------------------------------------------- the step


def _step_setup(mesh, probe=True, fast=False):
  cfg = ml_collections.ConfigDict(dict(depth=18, width_multiplier=0.125, sk_ratio=0.0,
                                       cifar_stem=True, head_layers=3, head_hidden_dim=0,
                                       head_out_dim=16, fused_bn=fast))
  model = models.contrastive_model(cfg, dtype=jnp.float32, probe_classes=3 if probe else 0)
  schedule = optim.warmup_cosine(0.5, 10, 2)
  variables = dict(model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False))
  opt_cfg = ml_collections.ConfigDict(dict(name='lars', momentum=0.9, weight_decay=1e-6,
                                           trust_coefficient=1e-3, lars_batched_norms=fast))
  tx = optim.build_optimizer(opt_cfg, schedule, variables['params'])
  state = {'model': variables,
           'opt': {'step': jnp.zeros((), jnp.int32), 'opt_state': tx.init(variables['params'])}}
  step = contrastive.make_train_step(model, tx, schedule, augment_views=augment.simclr_augment,
                                     temperature=0.1, weight_decay=1e-6)
  repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  jitted = jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl))
  return jax.device_put(state, repl), jitted, data, model


def _two_steps(num_devices, fast=False):
  """Losses and model variables after two train steps on `num_devices` devices."""
  rng = np.random.default_rng(0)
  batches = [{'views': rng.integers(0, 256, (16, 2, 16, 16, 3), dtype=np.uint8),
              'label': rng.integers(0, 3, (16, 2)).astype(np.int32)} for _ in range(2)]
  mesh = parallel.data_mesh(jax.devices()[:num_devices])
  state, step, data, _ = _step_setup(mesh, fast=fast)
  losses = []
  for b in batches:
    state, metrics = step(state, jax.device_put(b, data), jax.random.key(7))
    losses.append(float(metrics['loss']))
  assert len(jax.tree.leaves(state)[0].sharding.device_set) == num_devices
  return losses, jax.device_get(state['model'])


def _assert_same_steps(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert jax.tree.structure(got[1]) == jax.tree.structure(want[1])
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_train_step_on_8_devices_equals_1_device():
  assert jax.device_count() == 8
  _assert_same_steps(_two_steps(8), _two_steps(1))


def test_fused_bn_and_batched_lars_norms_give_the_same_steps():
  _assert_same_steps(_two_steps(8, fast=True), _two_steps(8))


# --------------------------------------------------------------------------- a run


def test_the_probe_leaves_unlabeled_images_out_of_its_loss_and_accuracy():
  mesh = parallel.data_mesh(jax.devices()[:1])
  state, step, data, model = _step_setup(mesh)
  rng = np.random.default_rng(1)
  views = rng.integers(0, 256, (16, 2, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (16, 2)).astype(np.int32)  # each view's image's label
  labels[::3, 0] = -1  # unlabeled images (image_cases split unlabeled)
  labels[1::4, 1] = -1
  key = jax.random.key(7)
  variables = jax.device_get(state['model'])
  _, metrics = step(state, jax.device_put({'views': views, 'label': labels}, data), key)
  # The step's forward pass, outside it: the same augmentation key and batch statistics.
  images = augment.simclr_augment(jax.random.fold_in(key, 0), views.reshape(32, 16, 16, 3))
  (_, _, logits), _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
  logits = np.asarray(logits, np.float64)
  targets = labels.reshape(32)
  kept = targets >= 0
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  want_loss = -log_p[kept, targets[kept]].mean()
  want_accuracy = (logits.argmax(-1)[kept] == targets[kept]).mean()
  np.testing.assert_allclose(float(metrics['probe_loss']), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['probe_accuracy']), want_accuracy, rtol=1e-6)

  _, images_step = contrastive.make_eval_steps(model, augment_views=augment.simclr_augment,
                                               temperature=0.1)
  batch = {'image': views[:, 0], 'label': labels[:, 0], 'mask': np.arange(16) < 12}
  counts = images_step(variables, batch)
  assert int(counts['count']) == 8  # 12 real images, 4 of them unlabeled


def test_the_probe_needs_labeled_images(tmp_path):
  config = tiny_config(os.fspath(tmp_path / 'data'), dataset='image_cases/mine',
                       **{'data.train_split': 'unlabeled'})
  with pytest.raises(ConfigError, match=r"^config.probe learns from labels, but "
                                        r"config.data.train_split='unlabeled' has none"):
    pretrain.train_and_evaluate(config, os.fspath(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def test_run_writes_the_workdir_contract(trained):
  workdir, results, _ = trained
  assert results['step'] == 4 and results['origin'] == 'initialised from scratch'
  assert results['initialised_from'] is None
  assert set(results['validation']) >= {'contrastive_loss', 'contrastive_accuracy',
                                        'contrastive_entropy', 'probe_top1'}
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['step'] == 4
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['micle'] is True
  train = [m for m in _read_metrics(workdir) if m['split'] == 'train']
  assert [m['step'] for m in train] == [1, 2, 3, 4]
  for key in ('loss', 'contrastive_loss', 'contrastive_accuracy', 'contrastive_entropy',
              'learning_rate', 'probe_accuracy'):
    assert all(np.isfinite(m[key]) for m in train), key
  assert all('images_per_sec' in m for m in train[1:])
  assert train[0]['learning_rate'] == 0.0  # linear warm-up from 0 (step 0's rate)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_second_run_resumes_and_does_not_retrain(trained):
  workdir, results, data_dir = trained
  before = _read_metrics(workdir)
  again = pretrain.train_and_evaluate(tiny_config(data_dir), workdir)
  assert again == results
  assert _read_metrics(workdir) == before


def test_resume_gives_the_same_next_steps_as_an_uninterrupted_run(trained, tmp_path):
  workdir, _, data_dir = trained
  resumed = os.fspath(tmp_path / 'resumed')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '2'),
                  os.path.join(resumed, 'checkpoints', '2'))
  shutil.copy(os.path.join(workdir, 'config.json'), resumed)  # the settings it ran with
  # The metrics of a run that went on past its step-2 checkpoint, then crashed mid-line.
  Path(resumed, 'metrics.jsonl').write_text(
      Path(workdir, 'metrics.jsonl').read_text() + '{"step": 5, "spl')
  pretrain.train_and_evaluate(tiny_config(data_dir), resumed)
  want = {m['step']: m for m in _read_metrics(workdir) if m['split'] == 'train'}
  rows = _read_metrics(resumed)  # steps after 2 dropped, then logged again: no repeats
  assert [(m['step'], m['split']) for m in rows] == [
      (m['step'], m['split']) for m in _read_metrics(workdir)]
  for m in rows:
    if m['split'] == 'train':
      np.testing.assert_allclose(m['loss'], want[m['step']]['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(_params_at(workdir, 4)), jax.tree.leaves(_params_at(resumed, 4))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_an_eval_split_smaller_than_a_batch_is_said_at_the_start(trained, tmp_path, caplog):
  _, _, data_dir = trained
  cfg = tiny_config(data_dir, batch_size=48, total_steps=1, probe=False)
  with caplog.at_level(logging.WARNING):
    results = pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'big_batch'))
  warned = [r for r in caplog.records if 'fewer than one batch of 48' in r.getMessage()]
  assert len(warned) == 1, caplog.text
  assert re.fullmatch(r'ham10000/validation has \d+ cases, fewer than one batch of 48: its '
                      r'contrastive metrics \(whole batches only\) will not be evaluated'
                      r'; a smaller config.eval_batch_size evaluates them',
                      warned[0].getMessage())
  assert results['validation'] == {}
  # A smaller evaluation batch evaluates them; it splits over the devices as a batch does.
  cfg = tiny_config(data_dir, batch_size=48, total_steps=1, probe=False, eval_batch_size=8)
  results = pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'small_eval_batch'))
  assert 0 <= results['validation']['contrastive_accuracy'] <= 1
  assert np.isfinite(results['validation']['contrastive_loss'])
  cfg = tiny_config(data_dir, batch_size=48, total_steps=1, probe=False, eval_batch_size=12)
  with pytest.raises(ConfigError, match=r'^config.eval_batch_size=12 is not a positive '
                     r'multiple of the 8 devices in use$'):
    pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'odd_eval_batch'))


@pytest.mark.parametrize('init_head', [True, False])
def test_init_from_loads_the_encoder_and_optionally_the_head(trained, tmp_path, init_head):
  source, _, data_dir = trained
  cfg = tiny_config(data_dir, init_from=source, init_head=init_head, total_steps=1)
  cfg.optimizer.learning_rate = 0.0  # the weights stay as loaded
  results = pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'cont'))
  assert results['origin'] == 'initialised ' + ('encoder+head' if init_head else 'encoder') + \
      f' from {source} (step 4)'
  assert results['initialised_from'] == {
      'init_from': source, 'checkpoint': os.path.join(source, 'checkpoints', '4'), 'step': 4,
      'pretrain_seed': 0}
  src, new = _params_at(source, 4), _params_at(os.fspath(tmp_path / 'cont'), 1)
  for a, b in zip(jax.tree.leaves(src['params']['encoder']),
                  jax.tree.leaves(new['params']['encoder'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  same_head = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(src['params']['head']), jax.tree.leaves(new['params']['head'])))
  assert same_head == init_head


def test_init_from_another_architecture_is_a_one_line_error(trained, tmp_path):
  source, _, data_dir = trained
  # The run's config.json names the encoder key that differs and the value to set ...
  for key, value, theirs, flag in (('width_multiplier', 0.25, '0.125', '0.125'),
                                   ('stem_pool_padding', 'symmetric', "'same'", 'same'),
                                   ('identity_shortcuts', True, 'False', 'False'),
                                   ('input_normalization', 'imagenet', "'none'", 'none'),
                                   ('conv_padding', 'same', "'fixed'", 'fixed')):
    cfg = tiny_config(data_dir, init_from=source, **{f'model.{key}': value})
    with pytest.raises(CheckpointError, match=(
        rf'has an encoder with config.model.{key}={theirs} .*config.json\), this run has '
        rf'{value!r}: set --config.model.{key}={flag}$')) as e:
      pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / key))
    assert '\n' not in str(e.value)
    assert not os.path.exists(tmp_path / key / 'checkpoints' / '0')
  # ... and without it (a step folder copied alone), the shapes tell.
  steps = os.path.join(source, 'checkpoints')
  step = max(int(d) for d in os.listdir(steps) if d.isdigit())
  alone = shutil.copytree(os.path.join(steps, str(step)), tmp_path / 'alone' / str(step))
  cfg = tiny_config(data_dir, init_from=os.fspath(alone), **{'model.width_multiplier': 0.25})
  with pytest.raises(CheckpointError, match='has shape .* expects .*another architecture') as e:
    pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'x'))
  assert '\n' not in str(e.value)
  with pytest.raises(CheckpointError, match='no such file'):
    pretrain.train_and_evaluate(tiny_config(data_dir, init_from='/no/such/run'),
                                os.fspath(tmp_path / 'y'))
  # Published weights named directly, before bigssl_med.convert imported them.
  weights = REPO / 'tests' / 'data' / 'torchvision_r18_w32.pth'
  (tmp_path / 'tf').mkdir()
  (tmp_path / 'tf' / 'model.ckpt-1.index').write_bytes(b'')
  for path, what in ((weights, 'is a file, not a run of this project'),
                     (tmp_path / 'tf' / 'model.ckpt-1', 'is a TensorFlow checkpoint')):
    with pytest.raises(CheckpointError) as e:
      pretrain.train_and_evaluate(tiny_config(data_dir, init_from=os.fspath(path)),
                                  os.fspath(tmp_path / 'z'))
    assert re.fullmatch(rf"init_from='{re.escape(os.fspath(path))}' {what}.*import it with "
                        rf"python -m bigssl_med.convert --checkpoint={re.escape(os.fspath(path))}"
                        r" --workdir=DIR, then name DIR", str(e.value)), str(e.value)


# --------------------------------------------------------------------------- bad input


def test_batch_not_divisible_by_the_devices(small_ham10000, tmp_path):
  with pytest.raises(ConfigError, match='batch_size=12 is not a positive multiple of the 8'):
    pretrain.train_and_evaluate(tiny_config(small_ham10000[0], batch_size=12), os.fspath(tmp_path))


def test_missing_data_dir(tmp_path):
  with pytest.raises(DataError, match='does not exist.*build_data ham10000'):
    pretrain.train_and_evaluate(tiny_config(os.fspath(tmp_path / 'nodata')),
                                os.fspath(tmp_path / 'w'))


@pytest.mark.parametrize('trainer', ['pretrain', 'finetune', 'segment', 'stages'])
def test_a_url_workdir_is_a_one_line_error_and_nothing_is_written(trainer, tmp_path,
                                                                  monkeypatch):
  from bigssl_med import trainers  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  config = config_schema.defaults(trainer)
  if trainer == 'stages':
    config.order = ('pretrain',)
    config.stages.pretrain = config_schema.pretrain()
  with pytest.raises(ConfigError, match=r"^workdir 'gs://bucket/run' is a URL: pass a path of "
                                        'the file system, e.g. the bucket mounted with gcsfuse'):
    trainers.TRAINERS[trainer](config, 'gs://bucket/run')
  assert not os.listdir(tmp_path)  # no local folder named gs:


def test_data_set_is_built_from_manual_dir_when_missing(small_ham10000, tmp_path):
  _, manual_dir = small_ham10000
  cfg = tiny_config(os.fspath(tmp_path / 'fresh'), total_steps=1, probe=False)
  cfg.data.build_if_missing = True
  cfg.data.manual_dir = manual_dir
  cfg.data.eval_split = ''
  results = pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'w'))
  assert results['step'] == 1
  assert os.path.isdir(tmp_path / 'fresh' / 'ham10000' / 'original' / '1.1.0')


def test_config_with_an_unused_key_is_rejected_by_name(small_ham10000, tmp_path):
  cfg = tiny_config(small_ham10000[0])
  cfg.model.dropout = 0.1
  with pytest.raises(ConfigError, match="'model.dropout' is not used by trainer 'pretrain'"):
    pretrain.train_and_evaluate(cfg, os.fspath(tmp_path))
  as_dict = tiny_config(small_ham10000[0]).to_dict()
  as_dict['batch_size'] = 'big'  # a config file may build any ConfigDict
  with pytest.raises(ConfigError, match="'batch_size' should be a int, got 'big'"):
    config_schema.validate(ml_collections.ConfigDict(as_dict))


@pytest.mark.parametrize('args, message', [
    (['--config=configs/demo.py', '--config.no_such_key=1'],
     "error: no config key 'no_such_key'; the config is locked: keys cannot be added"),
    (['--config=configs/micle_derm.py', '--config.total_stepz=1'],
     """error: no config key 'total_stepz' (Did you mean "total_steps" instead of """
     '"total_stepz"?); the config is locked: keys cannot be added'),
    (['--config=configs/segment_ham10000.py', '--config.model.head_out_dim=16'],
     "error: no config key 'head_out_dim' in --config.model.head_out_dim; the config is "
     'locked: keys cannot be added; model.head_out_dim is a key of the distill, finetune, '
     "linear_eval and pretrain trainers' configs, not this one"),
    (['--config=configs/finetune_derm.py', '--config.loss.bce_weight', '0'],
     "error: no config key 'loss' in --config.loss.bce_weight; the config is locked: keys "
     "cannot be added; loss.bce_weight is a key of the segment trainer's config, not this one"),
    (['--config=configs/micle_derm.py', '--config.data.label_kee=x'],
     "error: no config key 'label_kee' in --config.data.label_kee (Did you mean \"label_key\" "
     'instead of "label_kee"?); the config is locked: keys cannot be added'),
    (['--config=configs/micle_derm.py', '--config.batch_size=big'],
     "error: flag --config.batch_size=big: invalid literal for int() with base 10: 'big'"),
    (['--config=configs/ham10000_small.py:foo'],
     'error: flag --config=configs/ham10000_small.py:foo: Error whilst parsing config file: '
     "ValueError: configs/ham10000_small.py takes 'simclr', 'micle' or 'finetune', got 'foo'"),
    (['--config=configs/no_such_file.py'],
     "error: --config: [Errno 2] No such file or directory: 'configs/no_such_file.py'"),
])
def test_locked_config_and_bad_config_flags_are_one_line_errors(tmp_path, args, message):
  result = subprocess.run([sys.executable, 'main.py', *args, f'--workdir={tmp_path}'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [message]
  assert not os.listdir(tmp_path)


def _config_file(tmp_path, data_dir, **overrides):
  path = tmp_path / 'cfg.py'
  items = ''.join(f'  c.{k} = {v!r}\n' for k, v in overrides.items())
  path.write_text(
      'import sys\n'
      f'sys.path.insert(0, {os.fspath(REPO / "tests")!r})\n'
      'from test_pretrain import tiny_config\n'
      'def get_config():\n'
      f'  c = tiny_config({data_dir!r})\n' + items + '  return c\n')
  return path


def test_main_prints_one_line_errors(small_ham10000, tmp_path):
  cfg = _config_file(tmp_path, small_ham10000[0], batch_size=12)
  result = subprocess.run([sys.executable, 'main.py', f'--config={cfg}', f'--workdir={tmp_path}/w'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: config.batch_size=12 is not a positive multiple of the 8 devices in use')


def _communicate_or_kill(proc: subprocess.Popen, *, group: bool = False,
                         timeout: float = 120) -> str:
  """The stderr of `proc` once it has exited; if it has not within `timeout`, it (with
  its process group) is killed, so that it does not outlive the test, and the test fails."""
  try:
    return proc.communicate(timeout=timeout)[1]
  except subprocess.TimeoutExpired:
    if group:
      os.killpg(proc.pid, signal.SIGKILL)
    else:
      proc.kill()
    err = proc.communicate()[1]
    pytest.fail(f'the run did not stop within {timeout:.0f} s of the signal; stderr: '
                f'{err[-2000:]}')


def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes(small_ham10000, tmp_path):
  cfg = _config_file(tmp_path, small_ham10000[0], total_steps=10_000, checkpoint_every_steps=10_000)
  workdir = tmp_path / 'w'
  proc = subprocess.Popen([sys.executable, 'main.py', f'--config={cfg}', f'--workdir={workdir}'],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  err = _communicate_or_kill(proc)
  assert proc.returncode == 143, err[-2000:]
  steps = [int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()]
  assert len(steps) == 1 and 2 <= steps[0] < 10_000
  cfg2 = _config_file(tmp_path, small_ham10000[0], total_steps=steps[0] + 1)
  result = subprocess.run([sys.executable, 'main.py', f'--config={cfg2}', f'--workdir={workdir}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(workdir / 'results.json') as f:
    assert json.load(f)['origin'].startswith('resumed from')


def test_ctrl_c_is_one_line_and_a_rerun_resumes_from_the_checkpoint_it_names(small_ham10000,
                                                                             tmp_path):
  cfg = _config_file(tmp_path, small_ham10000[0], total_steps=10_000, checkpoint_every_steps=1,
                     **{'data.num_workers': 1})
  workdir = tmp_path / 'w'
  # As a terminal's Ctrl-C: SIGINT to every process of the group, grain's worker too.
  proc = subprocess.Popen([sys.executable, 'main.py', f'--config={cfg}', f'--workdir={workdir}'],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 3):
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGINT)
  err = _communicate_or_kill(proc, group=True)
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  assert 'leaked shared_memory' not in err, err[-3000:]  # the workers freed their batches
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, err[-3000:]
  match = re.fullmatch(r'error: interrupted at step (\d+); rerun the command to resume from the '
                       rf'last checkpoint \(step (\d+), in {re.escape(str(workdir))}/checkpoints\)',
                       errors[0])
  assert match, errors[0]
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert int(match[2]) == steps[-1] and steps[-1] in (int(match[1]) - 1, int(match[1]))
  cfg2 = _config_file(tmp_path, small_ham10000[0], total_steps=steps[-1] + 1)
  result = subprocess.run([sys.executable, 'main.py', f'--config={cfg2}', f'--workdir={workdir}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(workdir / 'results.json') as f:
    assert json.load(f)['origin'] == f'resumed from {workdir}/checkpoints/{steps[-1]}'


def test_a_ctrl_c_during_a_checkpoint_save_lets_the_save_complete(tmp_path, monkeypatch):
  checkpointer = checkpointing.Checkpointer(os.fspath(tmp_path))
  real = ocp.CheckpointManager.save

  def save(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the save starts
    return real(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  with pytest.raises(KeyboardInterrupt):
    checkpointer.save(1, model={'w': jnp.ones(3)}, opt={'step': jnp.int32(1)}, data_state=None)
  assert (os.fspath(tmp_path / 'checkpoints'), 1) in checkpointing.finish_saves()
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
  checkpointer.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_save_cut_off_is_removed_when_the_next_run_starts(tmp_path):
  checkpointer = checkpointing.Checkpointer(os.fspath(tmp_path))
  checkpointer.save(1, model={'w': jnp.ones(3)}, opt={'step': jnp.int32(1)}, data_state=None)
  checkpointer.close()
  folder = tmp_path / 'checkpoints'
  shutil.copytree(folder / '1', folder / '2.orbax-checkpoint-tmp')  # as a kill leaves it
  checkpointer = checkpointing.Checkpointer(os.fspath(tmp_path))  # removes it in the background
  deadline = time.time() + 30
  while time.time() < deadline and len(os.listdir(folder)) > 1:
    time.sleep(0.05)
  assert os.listdir(folder) == ['1']
  assert checkpointer.saved_steps() == [1]
  checkpointer.close()


_FULL_DISK = ('RESOURCE_EXHAUSTED: Error writing "opt_state.0/0" in OCDBT database at local file '
              '"{folder}/2.orbax-checkpoint-tmp/opt.orbax-checkpoint-tmp/ocdbt.process_0/": '
              'Failed writing: "{folder}/2.orbax-checkpoint-tmp/opt.orbax-checkpoint-tmp/'
              'ocdbt.process_0/d/882d": Failed to write 60033 bytes to file 59: No space left on '
              "device [os_error_code='28']")


def _orbax_thread_error():
  """An error record as orbax's save threads log one, with its traceback."""
  return logging.LogRecord('absl', logging.ERROR, '/venv/site-packages/orbax/checkpoint/future.py',
                           387, '_SignalingThread.run() raised an exception', None, None)


def test_a_save_that_cannot_be_written_is_one_line_naming_the_folder(tmp_path, monkeypatch,
                                                                     caplog):
  checkpointer = checkpointing.Checkpointer(os.fspath(tmp_path))
  folder = tmp_path / 'checkpoints'
  variables = {'model': {'w': jnp.ones(3)}, 'opt': {'step': jnp.int32(1)}, 'data_state': None}
  manager = checkpointer._manager  # pylint: disable=protected-access
  real_wait = manager.wait_until_finished

  def failing_with(error):
    def wait_until_finished():
      real_wait()
      logging.getLogger('absl').handle(_orbax_thread_error())  # what orbax's threads log
      raise error
    return wait_until_finished

  checkpointer.save(1, **variables)
  # An error that is no failed write is raised as it is.
  monkeypatch.setattr(manager, 'wait_until_finished', failing_with(ValueError('not a write')))
  with pytest.raises(ValueError, match='^not a write$'):
    checkpointer.save(2, **variables)
  assert '_SignalingThread' in caplog.text  # let through
  monkeypatch.undo()
  checkpointer.save(2, **variables)  # in flight: the disk fills up while it writes
  monkeypatch.setattr(manager, 'wait_until_finished',
                      failing_with(ValueError(_FULL_DISK.format(folder=folder))))
  caplog.clear()
  with pytest.raises(CheckpointError) as excinfo:
    checkpointer.save(3, **variables)
  assert str(excinfo.value) == (
      f'{folder}: checkpoint 2 could not be written (RESOURCE_EXHAUSTED: No space left on '
      'device); the earlier checkpoints are kept: rerun the command once it can be written '
      'to resume from step 1')
  assert '_SignalingThread' not in caplog.text  # dropped with the save
  monkeypatch.undo()
  checkpointer.close()


@pytest.mark.parametrize('error, reason', [
    (ValueError(_FULL_DISK), 'RESOURCE_EXHAUSTED: No space left on device'),
    (RuntimeError('Failed to finalize writing of split "train": write() failed: No space left '
                  'on device; writing /d/x.array_record'), 'No space left on device'),
    (OSError(30, 'Read-only file system', '/d/x'), 'Read-only file system'),
    (ValueError('bad shape'), None),
])
def test_write_failure_says_why_a_write_failed(error, reason):
  assert files.write_failure(error) == reason


def test_a_second_ctrl_c_is_not_held():
  with pytest.raises(KeyboardInterrupt):
    with checkpointing.sigint_held():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)  # held
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
      raise AssertionError('the second SIGINT was held')
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_in_the_training_loop_names_the_last_step():
  with pytest.raises(preemption.Interrupted) as excinfo:
    with preemption.Preemption(lambda step: False) as stopping:
      stopping.should_stop(7)
      raise KeyboardInterrupt
  assert excinfo.value.step == 7


def test_a_ctrl_c_during_an_evaluation_names_the_step_just_trained(small_ham10000, tmp_path,
                                                                   monkeypatch):
  cfg = tiny_config(small_ham10000[0], eval_every_steps=2, checkpoint_every_steps=100,
                    total_steps=4, probe=False)

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(pretrain.pipeline, 'eval_pair_dataset', interrupted)
  with pytest.raises(preemption.Interrupted) as excinfo:
    pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'w'))
  assert excinfo.value.step == 2


def test_a_sigterm_at_an_evaluation_step_keeps_the_evaluation(small_ham10000, tmp_path,
                                                               monkeypatch):
  cfg = tiny_config(small_ham10000[0], eval_every_steps=1, checkpoint_every_steps=100,
                    total_steps=2, probe=False)
  workdir = os.fspath(tmp_path / 'w')
  with monkeypatch.context() as patch:  # SIGTERM arrives during step 1, an evaluation step
    patch.setattr(preemption.Preemption, 'should_stop', lambda self, step: step == 1)
    with pytest.raises(preemption.Preempted):
      pretrain.train_and_evaluate(cfg, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1']
  assert (1, 'validation') in [(m['step'], m['split']) for m in _read_metrics(workdir)]
  pretrain.train_and_evaluate(cfg, workdir)
  assert [(m['step'], m['split']) for m in _read_metrics(workdir) if m['split'] != 'train'] == [
      (1, 'validation'), (2, 'validation')]


def test_training_works_without_tensorflow(small_ham10000, tmp_path):
  cfg = _config_file(tmp_path, small_ham10000[0], total_steps=2, tensorboard=True)
  workdir = tmp_path / 'w'
  script = ('import sys, runpy; sys.path.insert(0, "tests"); import no_tensorflow; '
            'sys.argv = sys.argv[1:]; runpy.run_path("main.py", run_name="__main__")')
  result = subprocess.run([sys.executable, '-c', script, 'main.py', f'--config={cfg}',
                           f'--workdir={workdir}'], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'TensorBoard events are off' in result.stderr
  assert (workdir / 'results.json').exists() and (workdir / 'metrics.jsonl').exists()
  assert not (workdir / 'tensorboard').exists()


def _stopped_at_step_2(trained, tmp_path):
  """A copy of the trained run as it was at step 2: (workdir, its config.json's text)."""
  workdir, _, _ = trained
  copy = os.fspath(tmp_path / 'copy')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '2'), os.path.join(copy, 'checkpoints', '2'))
  shutil.copy(os.path.join(workdir, 'config.json'), copy)
  return copy, Path(copy, 'config.json').read_text()


def test_resuming_with_other_settings_is_a_one_line_error(trained, tmp_path):
  data_dir = trained[2]
  copy, before = _stopped_at_step_2(trained, tmp_path)
  cfg = tiny_config(data_dir)
  cfg.micle, cfg.temperature = False, 0.5
  with pytest.raises(ConfigError, match=r'holds a run with other settings, stopped before its '
                                        r'end: micle is True there, False asked and 1 more; '
                                        r'rerun it as it was to resume'):
    pretrain.train_and_evaluate(cfg, copy)
  assert Path(copy, 'config.json').read_text() == before
  # Paths, workers and the run's length may change: the run goes on from step 2.
  cfg = tiny_config(data_dir, total_steps=5)
  cfg.data.num_workers, cfg.log_every_steps = 0, 5
  assert pretrain.train_and_evaluate(cfg, copy)['step'] == 5


def test_resuming_on_another_build_of_the_data_is_a_one_line_error(trained, tmp_path):
  from conftest import write_many_lesions  # pylint: disable=g-import-not-at-top
  workdir, _, data_dir = trained
  copy, before = _stopped_at_step_2(trained, tmp_path)
  shutil.copy(os.path.join(workdir, 'data.json'), copy)
  recorded = json.loads(Path(copy, 'data.json').read_text())
  assert recorded == sources.fingerprint('ham10000', data_dir, ('train', 'validation'))
  assert recorded['dataset'] == 'ham10000/original/1.1.0'
  # The same lesions and a few more, built again: the saved stream position would
  # point into other records.
  more = os.fspath(tmp_path / 'more')
  build_data.build('ham10000', data_dir=more,
                   manual_dir=os.fspath(write_many_lesions(tmp_path / 'raw', 210)))
  with pytest.raises(ConfigError, match=r"on another build of its data: ham10000/original/1.1.0 "
                                        r"split '\w+' had \d+ records of \d+ bytes there, "
                                        r"\d+ records of \d+ bytes now; rebuild the data set as "
                                        r"it was to resume, use a new workdir, or delete "
                                        r".*data.json to go on") as e:
    pretrain.train_and_evaluate(tiny_config(more), copy)
  assert '\n' not in str(e.value)
  assert Path(copy, 'config.json').read_text() == before
  assert json.loads(Path(copy, 'data.json').read_text()) == recorded
  # The same build moved elsewhere is the same data: the run goes on.
  moved = os.fspath(tmp_path / 'moved')
  shutil.copytree(data_dir, moved)
  assert pretrain.train_and_evaluate(tiny_config(moved, total_steps=3), copy)['step'] == 3
  # Deleting data.json accepts the data as it is now, and records it.
  os.remove(os.path.join(copy, 'data.json'))
  assert pretrain.train_and_evaluate(tiny_config(more, total_steps=4), copy)['step'] == 4
  assert json.loads(Path(copy, 'data.json').read_text()) == sources.fingerprint(
      'ham10000', more, ('train', 'validation'))
  # A finished run returns its results, whatever the data is now.
  finished = os.fspath(tmp_path / 'finished')
  shutil.copytree(workdir, finished)
  assert pretrain.train_and_evaluate(tiny_config(more), finished)['step'] == 4
  assert Path(finished, 'data.json').read_text() == Path(workdir, 'data.json').read_text()


def test_resuming_with_another_architecture_is_a_one_line_error(trained, tmp_path):
  data_dir = trained[2]
  copy, before = _stopped_at_step_2(trained, tmp_path)
  cfg = tiny_config(data_dir)
  cfg.model.width_multiplier = 0.25
  with pytest.raises(CheckpointError, match='does not match this run') as e:
    pretrain.train_and_evaluate(cfg, copy)
  assert '\n' not in str(e.value)
  # The rejected run leaves the workdir's config.json describing the run it holds.
  assert Path(copy, 'config.json').read_text() == before


def _cut_files(folder):
  for path in Path(folder).rglob('*'):
    if path.is_file() and path.stat().st_size > 64 and 'ocdbt' in str(path):
      path.write_bytes(path.read_bytes()[:10])


@pytest.mark.parametrize('damage, message', [
    (lambda step4: shutil.rmtree(step4 / 'opt'), r'is incomplete \(no opt/\)'),
    (lambda step4: _cut_files(step4 / 'model'), r'cannot be read, damaged or cut short'),
    (lambda step4: [p.write_text('') for p in (step4 / 'data').glob('*.json')],
     r'data does not hold the input pipeline\'s state'),
])
# orbax's reads of the other items are abandoned when one fails; their coroutines end
# with errors pytest reports as unraisable. The run itself fails with one line.
def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(trained, tmp_path, damage, message):
  workdir, _, data_dir = trained
  copy = tmp_path / 'copy'
  shutil.copytree(os.path.join(workdir, 'checkpoints'), copy / 'checkpoints')
  shutil.copy(os.path.join(workdir, 'config.json'), copy)  # the settings it ran with
  damage(copy / 'checkpoints' / '4')
  with pytest.raises(CheckpointError, match=message) as e:
    pretrain.train_and_evaluate(tiny_config(data_dir, total_steps=6), os.fspath(copy))
  assert '\n' not in str(e.value)
  assert str(copy / 'checkpoints' / '4') in str(e.value)
  assert str(e.value).endswith('; delete it to resume from step 2')
  assert sorted(os.listdir(copy / 'checkpoints')) == ['2', '4']  # nothing removed


def test_micle_on_real_chest_x_rays_as_a_users_collection(tmp_path, caplog):
  """MICLe over the NIH sample's patients, built by `image_cases` (grayscale), a quarter of
  the images unlabeled: pretraining on train+unlabeled, the probe on the labeled ones."""
  sample = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / (
      'nih_chestxray14_sample')
  if not sample.is_dir():
    pytest.skip(f'{sample} is absent: the real chest X-ray sample comes with '
                '../shared/data (see its README)')
  lines = ['path,case_id,label,split']
  for i, path in enumerate(sorted(sample.glob('*/*/*.png'))):
    label = path.parent.name.split('_', 1)[1]
    lines.append(f'{path},{path.name[:8]},' + (',unlabeled' if i % 4 == 0 else f'{label},'))
  manual_dir = tmp_path / 'raw'
  manual_dir.mkdir()
  (manual_dir / 'cases.csv').write_text('\n'.join(lines) + '\n')
  data_dir = tmp_path / 'data'
  build_data.build('image_cases/nih_sample', data_dir=os.fspath(data_dir),
                   manual_dir=os.fspath(manual_dir))
  info = sources.dataset_info('image_cases/nih_sample', os.fspath(data_dir))
  assert info.features['image'].shape[-1] == 1
  assert info.features['label'].names == ['abnormal', 'normal']
  assert info.splits['unlabeled'].num_examples > 0
  cfg = tiny_config(os.fspath(data_dir), dataset='image_cases/nih_sample',
                    total_steps=2, eval_batches=1)
  cfg.data.train_split = 'train+unlabeled'
  cfg.augment.hue = False
  cfg.augment.saturation = False
  results = pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  assert results['step'] == 2
  assert np.isfinite(results['validation']['contrastive_loss'])
  assert 0.0 <= results['validation']['probe_top1'] <= 1.0
  # Evaluated on images without labels: contrastive metrics, and no probe top-1.
  cfg.data.eval_split = 'unlabeled'
  with caplog.at_level('WARNING'):
    results = pretrain.train_and_evaluate(cfg, os.fspath(tmp_path / 'work_unlabeled'))
  assert np.isfinite(results['unlabeled']['contrastive_loss'])
  assert np.isnan(results['unlabeled']['probe_top1'])
  assert 'image_cases/nih_sample/unlabeled has no labeled image: no probe top-1' in caplog.text


def test_a_head_with_only_its_first_layers_is_refused_with_the_settings_that_help():
  # A fine-tuned model keeps config.head_layers_kept of the projection head's layers.
  def head(layers):
    return {f'dense{i}': {'kernel': np.zeros((4, 4), np.float32)} for i in range(layers)}
  model = {'params': {'encoder': {'w': np.zeros(2, np.float32)}, 'head': head(3)}}
  fine_tuned = {'params': {'encoder': {'w': np.ones(2, np.float32)}, 'head': head(1)}}
  with pytest.raises(CheckpointError) as e:
    checkpointing.merge_pretrained(model, fine_tuned, keys=('encoder', 'head'), source='ft/best')
  assert re.fullmatch(r"init_from='ft/best' lacks params/head\['dense1'\]\['kernel'\] that this "
                      r"model has: its projection head has only the first layers of this "
                      r"model's .*config.init_head=False \(pretrain\).*config.head_layers_kept "
                      r"\(finetune\)", str(e.value)), str(e.value)
  other = {'params': {'encoder': {'w': np.ones(2, np.float32)},
                      'head': {'dense0': {'kernel': np.zeros((4, 8), np.float32)}}}}
  with pytest.raises(CheckpointError, match=r'another architecture \(config.model\)$'):
    checkpointing.merge_pretrained(model, other, keys=('encoder', 'head'), source='x')
  merged = checkpointing.merge_pretrained(model, fine_tuned, keys=('encoder',), source='ft')
  np.testing.assert_array_equal(merged['params']['encoder']['w'], np.ones(2))


def test_a_finished_run_cannot_be_shortened_on_its_workdir(trained, tmp_path):
  source, results, data_dir = trained
  workdir = shutil.copytree(source, tmp_path / 'copy')
  before = {name: (workdir / name).read_text() for name in ('results.json', 'config.json')}
  with pytest.raises(ConfigError, match=r'holds a run trained to step 4, past this '
                     r"config's 2 steps .*continued for longer, not shortened"):
    pretrain.train_and_evaluate(tiny_config(data_dir, total_steps=2), os.fspath(workdir))
  assert {name: (workdir / name).read_text() for name in before} == before  # nothing written
  assert results['step'] == 4
