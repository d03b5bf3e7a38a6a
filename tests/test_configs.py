"""Every config in configs/ loads, validates against its trainer, and keeps its promises."""

import importlib.util
import json
from pathlib import Path

import pytest

from bigssl_med import augment, config_schema
from bigssl_med.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize('name', sorted(p.stem for p in CONFIGS.glob('*.py')))
def test_config_validates(name):
  config = load(name)
  config_schema.validate(config)
  runs = [config.stages[n] for n in config.order] if config.trainer == 'stages' else [config]
  for run in runs:
    for key in ('trainer', 'dataset', 'batch_size', 'total_steps', 'num_epochs', 'seed',
                'init_from', 'log_every_steps', 'checkpoint_every_steps'):
      assert key in run, key


@pytest.mark.parametrize('key', ['log_every_steps', 'checkpoint_every_steps', 'batch_size',
                                 'data.image_size'])
@pytest.mark.parametrize('name', ['micle_derm', 'finetune_derm', 'segment_ham10000',
                                  'segment_montgomery', 'segment_drive', 'segment_siim_acr'])
def test_steps_and_sizes_must_be_positive(name, key):
  config = load(name)
  *parents, leaf = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = 0
  with pytest.raises(ConfigError, match=rf'^config.{key} must be positive, got 0$'):
    config_schema.validate(config)


def test_required_configs_exist():
  names = {p.stem for p in CONFIGS.glob('*.py')}
  assert {'simclr_imagenet', 'simclr_cxr', 'micle_cxr', 'micle_derm', 'demo'} <= names


def test_imagenet_config_is_simclrs():
  c = load('simclr_imagenet')
  assert (c.model.depth, c.model.width_multiplier, c.batch_size, c.dataset) == (
      50, 1.0, 4096, 'imagenet2012')
  assert c.optimizer.name == 'lars' and c.optimizer.lr_scaling == 'linear'
  assert c.optimizer.learning_rate == 0.3 and c.optimizer.weight_decay == 1e-6
  assert c.optimizer.momentum == 0.9 and c.optimizer.trust_coefficient == 1e-3
  assert c.temperature == 0.1 and c.model.head_layers == 3 and c.model.head_out_dim == 128


def test_model_variants():
  c = load('micle_derm', 'r152x3sk')
  assert (c.model.depth, c.model.width_multiplier, c.model.sk_ratio) == (152, 3.0, 0.0625)
  with pytest.raises(ConfigError, match='r7'):
    load('micle_derm', 'r7')


def test_medical_configs():
  assert load('micle_derm').micle and load('micle_cxr').micle
  assert not load('simclr_cxr').micle
  cxr = load('micle_cxr')
  assert not cxr.augment.hue and not cxr.augment.saturation and not cxr.probe
  # The chest X-ray recipe: rotation up to 45 degrees, jitter strength 0.5, no blur.
  for name in ('micle_cxr', 'simclr_cxr'):
    a = load(name).augment
    assert (a.rotation_deg, a.color_strength, a.blur_p) == (45.0, 0.5, 0.0), name
  assert load('micle_derm').augment.rotation_deg == 0.0  # SimCLR's own augmentation
  # Fine-tuning as the MICLe paper: rotation, colour and blur besides crops and flips.
  for name in ('finetune_derm', 'finetune_chexpert'):
    a = load(name).augment
    assert (a.rotation_deg, a.color_strength, a.jitter_p, a.blur_p) == (45.0, 0.5, 0.8, 0.5)
  assert augment.is_identity(load('finetune_nih14').augment)
  assert 'augment' not in load('linear_eval_derm') and 'augment' not in load('distill_derm')


def test_benchmark_config_is_the_transfer_learning_benchmarks_protocol():
  c = load('benchmark_cxr')
  assert (c.dataset, c.batch_size, c.optimizer.name, c.optimizer.weight_decay) == (
      'nih_chest_xray14', 32, 'adamw', 0.0)
  assert c.optimizer.learning_rate * c.batch_size / 256 == pytest.approx(2e-4)
  o = c.optimizer
  assert (o.schedule, o.plateau_factor, o.plateau_patience, o.plateau_threshold) == (
      'plateau', 0.5, 5, 1e-4)
  assert (c.task.primary_metric, c.early_stopping_patience, c.eval_every_epochs) == (
      'loss', 11, 1.0)
  assert c.data.test_ten_crop and c.augment.rotation_deg == 7.0 and c.head_layers_kept == 0
  assert c.data.eval_resize == 'squash'  # its Resize((256, 256)), whatever the aspect ratio
  assert config_schema.finetune().data.eval_resize == 'square'
  assert (c.model.stem_pool_padding, c.model.input_normalization) == ('symmetric', 'imagenet')
  assert not c.model.identity_shortcuts  # ResNet-50: torchvision's has a projection
  assert (c.augment.jitter_p, c.augment.grayscale_p, c.augment.blur_p) == (0.0, 0.0, 0.0)
  x = load('benchmark_cxr', 'chexpert,r18')
  assert (x.dataset, x.model.depth, x.task.uncertain, x.data.holdout, x.data.test_split) == (
      'chexpert', 18, 'lsr_ones', 0.1, 'validation')
  assert x.model.identity_shortcuts  # torchvision's ResNet-18
  # Its CheXpert validation set has LSR-Ones' labels: so does the validation loss here.
  assert (x.task.eval_uncertain, c.task.eval_uncertain) == ('train_policy', 'ignore')
  demo = load('demo')
  assert demo.trainer == 'stages' and demo.order == ('pretrain', 'micle', 'scratch')
  assert demo.stages.pretrain.micle and demo.stages.pretrain.data.manual_dir
  assert demo.stages.micle.init_from == '@pretrain' and not demo.stages.scratch.init_from
  for name in demo.order:
    assert demo.stages[name].dataset == 'ham10000/side96'


def test_benchmark_config_on_shenzhen():
  c, nih = load('benchmark_cxr', 'shenzhen'), load('benchmark_cxr')
  config_schema.validate(c)
  # The benchmark's split lists (the builder's benchmark config): validation and test.
  assert c.dataset == 'shenzhen/benchmark_side512'
  assert (c.data.eval_split, c.data.test_split, c.data.holdout) == ('validation', 'test', 0.0)
  assert c.task.primary_metric == 'loss' and not c.task.mean_over
  assert c.task.uncertain == nih.task.uncertain and c.task.eval_uncertain == 'ignore'
  # Everything else is the protocol of the other data sets.
  different = {key for key, *_ in config_schema.setting_differences(nih.to_dict(), c)}
  assert different == {'dataset'}, different
  x = load('benchmark_cxr', 'r18,shenzhen')
  assert (x.dataset, x.model.depth, x.model.identity_shortcuts) == (
      'shenzhen/benchmark_side512', 18, True)
  with pytest.raises(ValueError, match='takes one DATASET'):
    load('benchmark_cxr', 'shenzhen,chexpert')
  with pytest.raises(ValueError, match=r"^configs/benchmark_cxr.py: 'nih41' is neither a "
                     r'DATASET \(nih14, chexpert, shenzhen, rsna\) nor a MODEL \(r101, '):
    load('benchmark_cxr', 'nih41')


def test_segment_montgomery_config():
  c = load('segment_montgomery')
  assert (c.trainer, c.dataset, c.data.image_size, c.data.mask_key) == (
      'segment', 'montgomery/side512', 224, 'mask')
  assert c.optimizer.name == 'adamw' and c.optimizer.weight_decay == 0.0
  assert c.optimizer.learning_rate * c.batch_size / 256 == pytest.approx(2e-4)
  assert c.data.image_size % 32 == 0 and c.early_stopping_patience > 0
  assert load('segment_montgomery', 'r18').model.depth == 18


def test_segment_drive_config():
  c = load('segment_drive')
  assert (c.trainer, c.dataset, c.data.image_size, c.data.mask_key) == (
      'segment', 'drive/original', 512, 'mask')
  assert (c.data.eval_split, c.data.test_split) == ('validation', 'test')
  assert c.optimizer.name == 'adamw' and c.optimizer.weight_decay == 0.0
  assert c.optimizer.lr_scaling == 'linear' and c.batch_size == 4
  assert c.optimizer.learning_rate * c.batch_size / 256 == pytest.approx(2e-4)
  assert c.data.image_size % 32 == 0 and c.early_stopping_patience > 0
  assert c.eval_every_epochs > 0 and c.eval_every_steps == 0
  assert load('segment_drive', 'r18').model.depth == 18


def test_benchmark_cxr_rsna_config():
  c = load('benchmark_cxr', 'rsna')
  assert (c.trainer, c.dataset, c.data.image_size) == ('finetune', 'rsna_pneumonia', 224)
  config_schema.validate(c)
  # Everything but the data set is the protocol of the other data sets.
  different = {key for key, *_ in config_schema.setting_differences(
      load('benchmark_cxr').to_dict(), c)}
  assert different == {'dataset'}, different
  assert load('benchmark_cxr', 'rsna,r18').model.depth == 18


def test_segment_siim_acr_config():
  c = load('segment_siim_acr')
  assert (c.trainer, c.dataset, c.data.image_size, c.data.mask_key) == (
      'segment', 'siim_acr_pneumothorax/side512', 224, 'mask')
  assert (c.data.eval_split, c.data.test_split) == ('validation', 'test')
  assert c.optimizer.name == 'adamw' and c.optimizer.weight_decay == 0.0
  assert c.optimizer.lr_scaling == 'linear' and c.batch_size == 32
  assert c.optimizer.learning_rate * c.batch_size / 256 == pytest.approx(2e-4)
  assert c.eval_every_epochs == 2.0 and c.early_stopping_patience == 25
  assert load('segment_siim_acr', 'r18').model.depth == 18


def test_setting_differences_leave_out_bookkeeping_and_compare_values():
  config = config_schema.finetune()
  saved = json.loads(json.dumps(config.to_dict()))  # as config.json holds it
  assert config_schema.setting_differences(saved, config) == []
  saved['num_epochs'] = 30  # an int where the config has 30.0: the same value
  saved['data']['data_dir'] = '/elsewhere'
  saved['data']['num_workers'] = 1
  saved['log_every_steps'] = 1
  saved['retired_key'] = 1  # a key of another version: not compared
  assert config_schema.setting_differences(saved, config) == []
  saved['task']['uncertain'] = 'zeros'
  saved['optimizer']['learning_rate'] = 0.2
  assert config_schema.setting_differences(saved, config) == [
      ('optimizer.learning_rate', 0.2, 0.1), ('task.uncertain', 'zeros', 'ones')]


def test_a_key_an_older_config_lacks_counts_as_its_default():
  config = config_schema.finetune()
  saved = json.loads(json.dumps(config.to_dict()))
  del saved['augment'], saved['data']['holdout'], saved['optimizer']['schedule']
  assert config_schema.setting_differences(saved, config) == []
  config.augment.rotation_deg = 45.0  # a recipe that now augments: not the old run
  config.optimizer.schedule = 'plateau'
  assert config_schema.setting_differences(saved, config) == [
      ('augment.rotation_deg', 0.0, 45.0), ('optimizer.schedule', 'cosine', 'plateau')]


def test_setting_differences_compare_run_folders_as_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_schema.finetune()
  config.init_from = 'runs/micle'
  saved = json.loads(json.dumps(config.to_dict()))
  saved['init_from'] = str(tmp_path / 'runs' / 'x' / '..' / 'micle')
  assert config_schema.setting_differences(saved, config) == []
  saved['init_from'] = str(tmp_path / 'runs' / 'simclr')
  assert [d[0] for d in config_schema.setting_differences(saved, config)] == ['init_from']


def test_a_depth_set_over_the_benchmark_config_is_refused_unless_the_layout_follows():
  # configs/benchmark_cxr.py picks torchvision's shortcuts from its MODEL argument; a
  # depth set afterwards must not silently train SimCLR's ResNet-18 in torchvision's stem.
  c = load('benchmark_cxr')
  c.model.depth = 18
  with pytest.raises(ConfigError, match=r"^config.model.depth=18 in torchvision's layout "
                     r".*--config.model.identity_shortcuts=True"):
    config_schema.validate(c)
  c.model.identity_shortcuts = True
  config_schema.validate(c)
  c.model.identity_shortcuts, c.model.stem_pool_padding = False, 'same'  # SimCLR's ResNet-18
  config_schema.validate(c)
  c.model.stem_pool_padding, c.init_from = 'symmetric', '/imported/r18'  # its own check
  config_schema.validate(c)
  config_schema.validate(load('benchmark_cxr', 'chexpert,r18'))


def test_an_initialisation_named_without_init_from_is_a_warning(caplog):
  c = load('benchmark_cxr')
  c.init = 'imagenet_supervised'
  with caplog.at_level('WARNING'):
    config_schema.validate(c)
  assert ("config.init='imagenet_supervised' names an initialisation, but config.init_from "
          'is empty: this run starts from random weights') in caplog.text
  caplog.clear()
  for init, init_from in (('scratch', ''), ('imagenet_supervised', '/imported/r50'), ('', '')):
    c.init, c.init_from = init, init_from
    with caplog.at_level('WARNING'):
      config_schema.validate(c)
  assert 'names an initialisation' not in caplog.text


def test_a_contrastive_run_needs_a_positive_temperature_and_negatives():
  c = config_schema.pretrain()
  c.temperature = 0.0
  with pytest.raises(ConfigError, match=r'^config.temperature must be positive, got 0.0$'):
    config_schema.validate(c)
  c.temperature, c.batch_size = 0.1, 1
  with pytest.raises(ConfigError, match=r'^config.batch_size=1 gives the contrastive loss no '
                     'negatives'):
    config_schema.validate(c)
  c.batch_size = 2
  config_schema.validate(c)
  f = config_schema.finetune()
  f.batch_size = 1  # a supervised batch of one is a batch
  config_schema.validate(f)
