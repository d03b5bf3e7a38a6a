"""A workdir's records that are missing, damaged or cannot be written: one-line errors
that name the file, and nothing already written is changed."""

import errno
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

from bigssl_med import staging
from bigssl_med import workdir as workdir_lib
from bigssl_med.errors import CheckpointError, WorkdirError
from bigssl_med.trainers import finetune, pretrain, stages
from conftest import assert_one_line_error
from test_finetune import _write_colour_cases, colours, tiny_config  # noqa: F401
from test_pretrain import tiny_config as tiny_pretrain_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def finished(colours, tmp_path_factory):  # noqa: F811
  """A finished fine-tuning run: checkpoints at 20 and 40, `best/`, results."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  results = finetune.train_and_evaluate(tiny_config(colours), os.fspath(workdir))
  return workdir, results


def _copy(finished, tmp_path, unfinish=False):
  """A copy of the finished run; `unfinish`: as a kill after step 40's checkpoint leaves it,
  before the test (no results.json, no test predictions)."""
  workdir = tmp_path / 'run'
  shutil.copytree(finished[0], workdir)
  if unfinish:
    for name in ('results.json', 'test_predictions.npz'):
      (workdir / name).unlink(missing_ok=True)
  return workdir


def _files(folder):
  """Every file under `folder` with its bytes, but the lock (`locked` rewrites it)."""
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*'))
          if p.is_file() and p.name != workdir_lib.LOCK_FILE}


@pytest.mark.parametrize('unfinish', [False, True])
def test_a_run_without_config_json_is_refused_and_none_is_written(
    colours, finished, tmp_path, unfinish):  # noqa: F811
  workdir = _copy(finished, tmp_path, unfinish)
  (workdir / 'config.json').unlink()
  before = _files(workdir)
  other = tiny_config(colours, **{'optimizer.learning_rate': 0.9})
  with pytest.raises(WorkdirError) as excinfo:
    finetune.train_and_evaluate(other, os.fspath(workdir))
  held = 'checkpoints/40' if unfinish else 'results.json'
  assert_one_line_error(excinfo, f'{workdir} holds a run ({held}) but no config.json',
                        'settings it ran with are unknown', f'restore {workdir}/config.json')
  assert _files(workdir) == before
  # A workdir holding no run of its own gets one: a `stages` run's, its stages below.
  top = tmp_path / 'stages'
  (top / 'pretrain' / 'checkpoints' / '2').mkdir(parents=True)
  workdir_lib.start(os.fspath(top), other)
  assert workdir_lib.read_json(os.fspath(top / 'config.json'))['trainer'] == 'finetune'


_DAMAGED = '{"trainer": "finetune", "tem'


@pytest.mark.parametrize('unfinish', [False, True])
def test_a_damaged_config_json_is_an_error_and_left_as_it_is(
    colours, finished, tmp_path, unfinish):  # noqa: F811
  workdir = _copy(finished, tmp_path, unfinish)
  (workdir / 'config.json').write_text(_DAMAGED)
  before = _files(workdir)
  other = tiny_config(colours, **{'data.label_fraction': 0.5})
  with pytest.raises(WorkdirError) as excinfo:
    finetune.train_and_evaluate(other, os.fspath(workdir))
  assert_one_line_error(excinfo, f'{workdir}/config.json: not valid JSON', 'cut short',
                        'are unknown', f'move {workdir} aside')
  assert _files(workdir) == before


def test_a_damaged_pretraining_config_json_stops_the_resumed_run(
    small_ham10000, tmp_path):
  data_dir, _ = small_ham10000
  workdir = tmp_path / 'pre'
  pretrain.train_and_evaluate(tiny_pretrain_config(data_dir), os.fspath(workdir))
  shutil.rmtree(workdir / 'checkpoints' / '4')
  (workdir / 'results.json').unlink()
  (workdir / 'config.json').write_text('[1, 2]')
  before = _files(workdir)
  other = tiny_pretrain_config(data_dir, micle=False, temperature=0.5)
  with pytest.raises(WorkdirError) as excinfo:
    pretrain.train_and_evaluate(other, os.fspath(workdir))
  assert_one_line_error(excinfo, f'{workdir}/config.json: holds list', 'not a JSON object',
                        '(checkpoints/2) are unknown')
  assert _files(workdir) == before


@pytest.mark.parametrize('name, text, recover', [
    ('data.json', '{"dataset": "ima', 'delete it to go on with the data as it is now'),
    ('data.json', '{"dataset": "image_cases/colours"}', 'delete it to go on with the data'),
    ('best.json', '{"step": 10, "val', 'delete it and {workdir}/best to select among the '
     'evaluations after the checkpoint this run resumes from only'),
    ('best.json', '', 'restore it'),
    ('initialised_from.json', '{"init_from": "/tm', 'delete it to go on with the checkpoint '
     'and step this run started from recorded as unknown'),
])
def test_a_damaged_record_of_a_resumed_run_is_an_error_and_left_as_it_is(
    colours, finished, tmp_path, name, text, recover):  # noqa: F811
  workdir = _copy(finished, tmp_path, unfinish=True)
  shutil.rmtree(workdir / 'checkpoints' / '40')  # resumes from step 20
  (workdir / name).write_text(text)
  before = _files(workdir)
  with pytest.raises(WorkdirError) as excinfo:
    finetune.train_and_evaluate(tiny_config(colours), os.fspath(workdir))
  assert_one_line_error(excinfo, f'{workdir}/{name}: ', recover.format(workdir=workdir))
  assert _files(workdir) == before


def test_a_damaged_stage_inputs_record_is_an_error_and_left_as_it_is(tmp_path):
  stage_dir = tmp_path / 'micle'
  (stage_dir / 'checkpoints' / '2').mkdir(parents=True)
  record = stage_dir / stages.INPUTS_FILE
  record.write_text('{"inputs": {')
  with pytest.raises(WorkdirError) as excinfo:
    stages.check_inputs('micle', None, os.fspath(stage_dir), {'init_from': 'pretrain'},
                        {'pretrain': {'step': 4}}, os.fspath(tmp_path))
  assert_one_line_error(excinfo, f'{record}: not valid JSON', 'delete it to accept stage '
                        'micle\'s results as they are', f'or remove {stage_dir} to redo')
  assert record.read_text() == '{"inputs": {'


@pytest.mark.parametrize('damage', ['missing', 'cut short'])
def test_a_missing_or_damaged_best_model_is_a_one_line_error(
    colours, finished, tmp_path, damage, capfd):  # noqa: F811
  workdir = _copy(finished, tmp_path, unfinish=True)
  best = workdir / 'best'
  if damage == 'missing':
    shutil.rmtree(best)
  else:
    for array in (p for p in best.rglob('*') if p.is_file() and '/d/' in os.fspath(p)):
      os.truncate(array, 10)
  with pytest.raises(CheckpointError) as excinfo:
    finetune.train_and_evaluate(tiny_config(colours), os.fspath(workdir))
  assert_one_line_error(excinfo, f'{best}: the selected model (step ', damage,
                        f'{workdir}/best.json to select the final checkpoint')
  assert 'Event loop is closed' not in capfd.readouterr().err


def test_a_damaged_checkpoint_metadata_is_damage_not_a_config_change(
    colours, finished, tmp_path):  # noqa: F811
  workdir = _copy(finished, tmp_path, unfinish=True)
  (workdir / 'checkpoints' / '40' / 'model' / '_METADATA').write_text('{x')
  with pytest.raises(CheckpointError) as excinfo:
    finetune.train_and_evaluate(tiny_config(colours), os.fspath(workdir))
  assert_one_line_error(excinfo, f'checkpoint {workdir}/checkpoints/40 cannot be read, damaged',
                        'delete it to resume from step 20')


def test_a_workdir_that_is_a_file_or_under_one_is_a_one_line_error(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  for workdir in (a_file, a_file / 'sub'):
    with pytest.raises(WorkdirError) as excinfo:
      with workdir_lib.locked(os.fspath(workdir)):
        pass
    assert_one_line_error(excinfo, f'workdir {workdir}')
  assert 'is a file, not a folder' in str(excinfo.value) or 'Not a directory' in str(
      excinfo.value)
  result = subprocess.run([sys.executable, 'main.py', '--config=configs/demo.py',
                           f'--workdir={a_file}'], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: workdir {a_file} is a file, not a folder: name a folder (made if missing)')
  assert 'going on without a lock' not in result.stderr
  assert a_file.read_text() == 'x'


def _run(config, workdir):
  """As `main.run`: the trainer, holding the workdir's lock."""
  with workdir_lib.locked(workdir):
    return finetune.train_and_evaluate(config, workdir)


def _read_only(monkeypatch, workdir):
  """`workdir` as on a read-only file system: its lock file cannot be opened, and
  `os.access` says it cannot be written (the tests run as root, for whom a mode does not)."""
  def try_lock(path):
    raise OSError(errno.EROFS, 'Read-only file system', path)
  access = os.access

  def no_writes(path, mode, **kwargs):
    if mode & os.W_OK and os.fspath(path).startswith(os.fspath(workdir)):
      return False
    return access(path, mode, **kwargs)
  monkeypatch.setattr(staging, 'try_lock', try_lock)
  monkeypatch.setattr(os, 'access', no_writes)


def test_a_read_only_workdir_returns_finished_results_and_stops_an_unfinished_run(
    colours, finished, tmp_path, monkeypatch):  # noqa: F811
  done = _copy(finished, tmp_path)
  unfinished = tmp_path / 'unfinished'
  shutil.copytree(done, unfinished)
  (unfinished / 'results.json').unlink()
  before = {w: _files(w) for w in (done, unfinished)}
  _read_only(monkeypatch, tmp_path)
  results = _run(tiny_config(colours), os.fspath(done))
  assert results['test'] == finished[1]['test']
  with pytest.raises(WorkdirError) as excinfo:
    _run(tiny_config(colours), os.fspath(unfinished))
  assert_one_line_error(excinfo, f'workdir {unfinished}: cannot write in it')
  new = tmp_path / 'new'
  new.mkdir()
  with pytest.raises(WorkdirError):
    _run(tiny_config(colours), os.fspath(new))
  assert {w: _files(w) for w in (done, unfinished)} == before
  assert not list(new.iterdir())
