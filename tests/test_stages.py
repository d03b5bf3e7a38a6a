"""The `stages` trainer: pretrain → fine-tune → report in one workdir, and the demo."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from bigssl_med import config_schema
from bigssl_med.errors import ConfigError
from bigssl_med.trainers import stages
from conftest import REAL_HAM10000_BUILD

REPO = Path(__file__).resolve().parents[1]


def _demo_config():
  spec = importlib.util.spec_from_file_location('demo', REPO / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_references_must_name_earlier_stages(tmp_path):
  config = _demo_config()
  config.stages.micle.init_from = '@scratch'
  with pytest.raises(ConfigError, match=r"stages.micle.init_from='@scratch' does not name an "
                                        r"earlier stage \(earlier: \['pretrain'\]\)"):
    stages.train_and_evaluate(config, os.fspath(tmp_path))
  assert not os.listdir(tmp_path)
  resolved = stages.resolve_references(_demo_config(), '/runs/demo')
  assert resolved['micle'].init_from == '/runs/demo/pretrain'
  assert resolved['scratch'].init_from == ''


def test_stage_configs_are_validated_by_their_trainers():
  config = _demo_config()
  config.order = ('pretrain', 'micle')
  with pytest.raises(ConfigError, match='config.stages.scratch is not in config.order'):
    config_schema.validate(config)
  config = _demo_config()
  config.order = ('pretrain', 'micle', 'scratch', 'distill')
  with pytest.raises(ConfigError, match=r"stage\(s\) \['distill'\] that config.stages lacks"):
    config_schema.validate(config)
  config = _demo_config()
  config.stages.micle.model.dropout = 0.1
  with pytest.raises(ConfigError, match="config.stages.micle: config key 'model.dropout' is not "
                                        "used by trainer 'finetune'"):
    config_schema.validate(config)
  config = _demo_config()  # a later stage's split of unlabeled images: before any stage runs
  config.stages.micle.data.train_split = 'train+unlabeled'
  with pytest.raises(ConfigError, match=r"config.stages.micle: config.data.train_split="
                                        r"'train\+unlabeled' takes in split unlabeled"):
    config_schema.validate(config)


def test_demo_runs_every_stage_on_the_real_ham10000(ham10000_data_dir, tmp_path_factory):
  data_dir = ham10000_data_dir
  assert _demo_config().stages.pretrain.dataset == REAL_HAM10000_BUILD
  config = _demo_config()
  for name in config.order:
    stage = config.stages[name]
    stage.data.data_dir = data_dir
    stage.data.num_workers = 0
    stage.data.image_size = 32
    stage.batch_size = 32
    stage.log_every_steps = 1
  config.stages.pretrain.total_steps = 3
  config.stages.pretrain.optimizer.warmup_steps = 1
  config.stages.pretrain.eval_batches = 1
  for name in ('micle', 'scratch'):
    config.stages[name].total_steps = 4
    config.stages[name].eval_every_steps = 2
  workdir = tmp_path_factory.mktemp('demo')
  results = stages.train_and_evaluate(config, os.fspath(workdir))
  assert set(results['stages']) == {'pretrain', 'micle', 'scratch'}
  assert results['stages']['micle']['origin'].startswith('initialised encoder+head from')
  assert results['stages']['micle']['pretrain_seed'] == 0
  assert results['stages']['scratch']['origin'] == 'initialised from scratch'
  report = (workdir / 'report.md').read_text()
  assert '| micle |' in report and '| scratch |' in report
  assert (workdir / 'report.csv').exists()
  assert json.loads((workdir / 'stages.json').read_text())['report'] == os.fspath(
      workdir / 'report.md')
  # A second run returns the finished stages' results without training again.
  metrics = (workdir / 'micle' / 'metrics.jsonl').read_text()
  again = stages.train_and_evaluate(config, os.fspath(workdir))
  assert again['stages'] == json.loads(json.dumps(results['stages']))
  assert (workdir / 'micle' / 'metrics.jsonl').read_text() == metrics
