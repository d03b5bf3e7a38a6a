"""The `stages` trainer: pretrain → fine-tune → report in one workdir, and the demo."""

import importlib.util
import json
import os
from pathlib import Path
import shutil

import pytest

from bigssl_med import config_schema, preemption
from bigssl_med import workdir as workdir_lib
from bigssl_med.errors import ConfigError, WorkdirInUse
from bigssl_med.trainers import stages
from conftest import REAL_HAM10000_BUILD
from test_finetune import _write_colour_cases, colours, tiny_config  # noqa: F401
from test_pretrain import tiny_config as tiny_pretrain_config

REPO = Path(__file__).resolve().parents[1]


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _demo_config():
  return _load('demo', REPO / 'configs' / 'demo.py').get_config()


def _tiny_stages(data_dir, pretrain_steps=2, micle_steps=4):
  """pretrain (SimCLR on the colour cases) → micle (fine-tuned from `@pretrain`), no report."""
  config = config_schema.stages()
  config.order = ('pretrain', 'micle')
  config.stages.pretrain = tiny_pretrain_config(
      os.fspath(data_dir), dataset='image_cases/colours', micle=False, probe=False,
      total_steps=pretrain_steps, eval_batches=1)
  config.stages.micle = tiny_config(data_dir, init_from='@pretrain', total_steps=micle_steps,
                                    eval_every_steps=2, log_every_steps=2,
                                    checkpoint_every_steps=2)
  config.report = False
  return config


def _text(path):
  return Path(path).read_text()


def test_a_stage_started_from_an_earlier_stage_that_changed_since_is_an_error(
    colours, tmp_path):  # noqa: F811
  workdir = os.fspath(tmp_path / 'w')
  first = stages.train_and_evaluate(_tiny_stages(colours), workdir)
  inputs = workdir_lib.read_json(f'{workdir}/micle/stage_inputs.json')
  assert stages.train_and_evaluate(_tiny_stages(colours), workdir) == json.loads(
      json.dumps(first))  # unchanged: the finished stages return their results
  micle_results = _text(f'{workdir}/micle/results.json')
  # Pretraining continued for a step more: the fine-tuning came from the encoder before.
  with pytest.raises(ConfigError, match=(
      rf'^stage micle \({workdir}/micle\) started from stage pretrain as it was before, and '
      rf'stage pretrain has changed since \(.*\): remove {workdir}/micle to redo stage micle '
      r'from stage pretrain as it is now, or use a new workdir$')):
    stages.train_and_evaluate(_tiny_stages(colours, pretrain_steps=3), workdir)
  assert json.loads(_text(f'{workdir}/pretrain/results.json'))['step'] == 3
  assert _text(f'{workdir}/micle/results.json') == micle_results
  assert inputs['inputs']['init_from']['stage'] == 'pretrain'
  assert workdir_lib.read_json(f'{workdir}/micle/stage_inputs.json') == inputs
  shutil.rmtree(f'{workdir}/micle')  # as the error says
  again = stages.train_and_evaluate(_tiny_stages(colours, pretrain_steps=3), workdir)
  assert again['stages']['micle']['origin'] == (
      f'initialised encoder from {workdir}/pretrain (step 3)')


def test_a_moved_stages_workdir_reruns_from_any_current_directory(
    colours, tmp_path, monkeypatch):  # noqa: F811
  old = tmp_path / 'old'
  with monkeypatch.context() as patch:  # micle stopped at step 3 (pretrain has 2 steps)
    patch.setattr(preemption.Preemption, 'should_stop', lambda self, step: step == 3)
    with pytest.raises(preemption.Preempted):
      stages.train_and_evaluate(_tiny_stages(colours, micle_steps=6), os.fspath(old))
  pretrained = json.loads(_text(old / 'pretrain' / 'results.json'))
  shutil.copytree(old, tmp_path / 'new', symlinks=True)  # cp -a
  shutil.rmtree(old)
  monkeypatch.chdir(tmp_path)  # a relative workdir
  results = stages.train_and_evaluate(_tiny_stages(colours, micle_steps=6), 'new')
  new = os.fspath(tmp_path / 'new')
  assert results['stages']['pretrain'] == pretrained  # finished: returned as it was
  assert results['stages']['micle']['origin'].startswith('resumed from')
  assert json.loads(_text(f'{new}/micle/config.json'))['init_from'] == f'{new}/pretrain'
  monkeypatch.chdir(new)  # the same workdir from elsewhere: both stages finished
  # Through main.py's run, which locks the workdir: the stages inside it run all the same.
  again = _load('main_module', REPO / 'main.py').run(_tiny_stages(colours, micle_steps=6), '.')
  assert again == json.loads(json.dumps(results))
  # Another folder named pretrain is another init_from, not the stage moved.
  other = _tiny_stages(colours, micle_steps=6)
  other.stages.micle.init_from = os.fspath(tmp_path / 'elsewhere' / 'pretrain')
  with pytest.raises(ConfigError, match=r'holds a finished run with other settings: init_from'):
    stages.train_and_evaluate(other, new)


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


def test_a_stage_holds_its_folders_lock_and_the_report_path_is_absolute(
    colours, tmp_path, monkeypatch):  # noqa: F811
  from bigssl_med import trainers  # pylint: disable=g-import-not-at-top
  finetune_run = trainers.TRAINERS['finetune']
  refused = []

  def micle_while_someone_tries_its_folder(config, workdir):
    with pytest.raises(WorkdirInUse, match=f'another run is using {workdir} '):
      with workdir_lib.locked(workdir):  # a run started on the stage folder directly
        pass
    refused.append(workdir)
    return finetune_run(config, workdir)
  monkeypatch.setitem(trainers.TRAINERS, 'finetune', micle_while_someone_tries_its_folder)
  monkeypatch.chdir(tmp_path)
  config = _tiny_stages(colours)
  config.report = True
  results = stages.train_and_evaluate(config, 'w')  # relative, as on a command line
  assert refused == ['w/micle']
  assert results['report'] == os.fspath(tmp_path / 'w' / 'report.md')
  assert workdir_lib.read_json(tmp_path / 'w' / 'stages.json')['report'] == results['report']
  # A stage whose folder another run holds is refused, nothing of it written.
  shutil.rmtree(tmp_path / 'w' / 'micle')
  with workdir_lib.locked(os.fspath(tmp_path / 'w' / 'micle')):
    with pytest.raises(WorkdirInUse):
      stages.train_and_evaluate(_tiny_stages(colours), 'w')
  assert os.listdir(tmp_path / 'w' / 'micle') == ['.lock']
