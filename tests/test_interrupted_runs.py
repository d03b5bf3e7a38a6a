"""Runs and builds cut off at an unlucky moment, then run again: what was written stays right.

A kill is simulated by raising `Killed` from inside the run at the moment named: no
checkpoint, `best.json` or results file is written after it, as after a SIGKILL.
"""

import fcntl
import json
import logging
import os
import shutil
import time

import pytest

from bigssl_med import build_data, checkpointing, model_selection
from bigssl_med import workdir as workdir_lib
from bigssl_med.data import sources
from bigssl_med.trainers import finetune, pretrain
from test_finetune import _write_colour_cases, colours, tiny_config  # noqa: F401
from test_pretrain import tiny_config as tiny_pretrain_config


class Killed(BaseException):
  """The process dies here."""


def _kill_after_update_of(step, monkeypatch):
  update = model_selection.BestModel.update

  def dying(self, at, variables, found):
    out = update(self, at, variables, found)
    if at == step:
      raise Killed
    return out
  monkeypatch.setattr(model_selection.BestModel, 'update', dying)


def _rows(workdir, split):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [row for row in map(json.loads, f) if row['split'] == split]


def test_a_rerun_with_other_settings_does_not_keep_a_killed_attempts_best_model(
    colours, tmp_path, monkeypatch):  # noqa: F811
  workdir = os.fspath(tmp_path / 'run')
  _kill_after_update_of(30, monkeypatch)  # before the first checkpoint (step 40)
  with pytest.raises(Killed):
    finetune.train_and_evaluate(tiny_config(colours, checkpoint_every_steps=40), workdir)
  assert os.path.exists(os.path.join(workdir, 'best.json'))
  monkeypatch.undo()
  # Rerun at another learning rate: nothing to resume, so the run starts afresh.
  other = {'checkpoint_every_steps': 40, 'optimizer.learning_rate': 1e-4}
  rerun = finetune.train_and_evaluate(tiny_config(colours, **other), workdir)
  clean = finetune.train_and_evaluate(tiny_config(colours, **other),
                                      os.fspath(tmp_path / 'clean'))
  for key in ('best_step', 'validation', 'test'):
    assert rerun[key] == clean[key], key
  assert [r['step'] for r in _rows(workdir, 'validation')] == [10, 20, 30, 40]


@pytest.mark.parametrize('killed_at', [30, 40])  # 40: the last, before its test row
def test_validation_rows_of_steps_evaluated_before_a_kill_are_kept(
    colours, tmp_path, monkeypatch, killed_at):  # noqa: F811
  workdir = os.fspath(tmp_path / 'run')
  _kill_after_update_of(killed_at, monkeypatch)  # checkpoint at 20; evaluated, not saved
  with pytest.raises(Killed):
    finetune.train_and_evaluate(tiny_config(colours), workdir)
  monkeypatch.undo()
  results = finetune.train_and_evaluate(tiny_config(colours), workdir)
  uninterrupted = os.fspath(tmp_path / 'uninterrupted')
  finetune.train_and_evaluate(tiny_config(colours), uninterrupted)
  assert _rows(workdir, 'validation') == _rows(uninterrupted, 'validation')
  assert [r['step'] for r in _rows(workdir, 'train')] == [10, 20, 30, 40]
  assert results['best_step'] in [r['step'] for r in _rows(workdir, 'validation')]
  # In the order an uninterrupted run writes them: the validation row kept from the
  # killed attempt follows its step's training row again (and precedes step 40's test).
  def order(path):
    with open(os.path.join(path, 'metrics.jsonl')) as f:
      return [(row['step'], row['split']) for row in map(json.loads, f)]
  assert order(workdir) == order(uninterrupted)


def test_a_kill_after_testing_leaves_one_test_row(colours, tmp_path, monkeypatch):  # noqa: F811
  workdir = os.fspath(tmp_path / 'run')
  save = finetune._save_predictions  # pylint: disable=protected-access

  def dying(*args, **kwargs):
    save(*args, **kwargs)
    raise Killed  # before results.json
  monkeypatch.setattr(finetune, '_save_predictions', dying)
  with pytest.raises(Killed):
    finetune.train_and_evaluate(tiny_config(colours), workdir)
  monkeypatch.undo()
  finetune.train_and_evaluate(tiny_config(colours), workdir)
  assert len(_rows(workdir, 'test')) == 1


def test_the_last_checkpoint_is_committed_before_results_json(
    colours, tmp_path, monkeypatch):  # noqa: F811
  events = []
  close, write_json = checkpointing.Checkpointer.close, workdir_lib.write_json

  def closing(self):
    events.append('checkpoint committed')
    return close(self)

  def writing(path, value):
    if os.path.basename(path) == 'results.json':
      events.append('results.json')
    return write_json(path, value)
  monkeypatch.setattr(checkpointing.Checkpointer, 'close', closing)
  monkeypatch.setattr(workdir_lib, 'write_json', writing)
  finetune.train_and_evaluate(tiny_config(colours), os.fspath(tmp_path / 'run'))
  assert events == ['checkpoint committed', 'results.json']


def test_a_pretraining_run_killed_before_results_json_logs_its_last_steps_once(
    small_ham10000, tmp_path, monkeypatch):
  """Killed after the final evaluation (the last checkpoint committed), the rerun resumes
  at the last step: one row per step and split, and the last training metrics in
  results.json, as an uninterrupted run has them."""
  data_dir, _ = small_ham10000
  config = tiny_pretrain_config(data_dir, **{'data.eval_split': 'validation'})
  clean = pretrain.train_and_evaluate(config, os.fspath(tmp_path / 'clean'))
  workdir = os.fspath(tmp_path / 'run')
  write_json = workdir_lib.write_json

  def dying(path, value):
    if os.path.basename(path) == 'results.json':
      raise Killed
    return write_json(path, value)
  with monkeypatch.context() as patch:
    patch.setattr(workdir_lib, 'write_json', dying)
    with pytest.raises(Killed):
      pretrain.train_and_evaluate(config, workdir)
  assert [r['step'] for r in _rows(workdir, 'validation')] == [4]
  rerun = pretrain.train_and_evaluate(config, workdir)

  def without_timing(row):
    return {k: v for k, v in row.items() if not k.endswith('_per_sec')}
  for split in ('train', 'validation'):
    assert [without_timing(r) for r in _rows(workdir, split)] == [
        without_timing(r) for r in _rows(os.fspath(tmp_path / 'clean'), split)], split
  assert without_timing(rerun['train']) == without_timing(clean['train'])
  assert rerun['validation'] == clean['validation']
  assert rerun['origin'].startswith('resumed from')


def test_a_resumed_fine_tune_names_the_source_step_it_was_initialised_from(
    small_ham10000, tmp_path, monkeypatch, caplog):
  """The pretraining run goes on while the fine-tuning run it started is interrupted:
  the resumed run's results still name the checkpoint and step it started from."""
  data_dir, _ = small_ham10000
  source = os.fspath(tmp_path / 'pretrained')
  pretrain.train_and_evaluate(tiny_pretrain_config(data_dir, total_steps=2, probe=False),
                              source)
  config = tiny_config(data_dir, dataset='ham10000', init_from=source, total_steps=4,
                       eval_every_steps=2, checkpoint_every_steps=2)
  workdir = os.fspath(tmp_path / 'ft')
  save = checkpointing.Checkpointer.save

  def committed(self, *args, **kwargs):  # killed once the checkpoint at 2 is on disk
    out = save(self, *args, **kwargs)
    self._manager.wait_until_finished()  # pylint: disable=protected-access
    return out
  monkeypatch.setattr(checkpointing.Checkpointer, 'save', committed)
  _kill_after_update_of(4, monkeypatch)
  with pytest.raises(Killed):
    finetune.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  used = {'init_from': source, 'checkpoint': os.path.join(source, 'checkpoints', '2'),
          'step': 2, 'pretrain_seed': 0}
  assert workdir_lib.read_json(os.path.join(workdir, 'initialised_from.json')) == used
  # A workdir written before the record existed: resumed, with the step unknown.
  legacy = os.fspath(tmp_path / 'legacy')
  shutil.copytree(workdir, legacy)
  os.remove(os.path.join(legacy, 'initialised_from.json'))
  # Meanwhile the pretraining run is continued to step 4.
  continued = pretrain.train_and_evaluate(
      tiny_pretrain_config(data_dir, total_steps=4, probe=False), source)
  assert continued['step'] == 4 and continued['initialised_from'] is None
  # ... and its workdir is then reused by a pretraining run of another seed.
  source_config = workdir_lib.read_json(os.path.join(source, 'config.json'))
  workdir_lib.write_json(os.path.join(source, 'config.json'), {**source_config, 'seed': 7})
  results = finetune.train_and_evaluate(config, workdir)
  assert results['origin'].startswith('resumed from')
  assert results['initialised_from'] == used and results['pretrain_seed'] == 0
  assert workdir_lib.read_json(os.path.join(workdir, 'results.json'))['initialised_from'] == used
  assert finetune.train_and_evaluate(config, workdir)['initialised_from'] == used
  with caplog.at_level(logging.WARNING):
    old = finetune.train_and_evaluate(config, legacy)
  assert 'no initialised_from.json (deleted, or the run was started by an' in caplog.text
  assert old['origin'].startswith('resumed from')
  assert old['initialised_from'] == {'init_from': source, 'checkpoint': None, 'step': None}
  assert old['pretrain_seed'] == 7  # not recorded then: read from the source as it is now


def test_a_build_set_aside_by_a_killed_rebuild_is_put_back(colours):  # noqa: F811
  version_dir = sources.find_version_dir('image_cases/colours', os.fspath(colours))
  # The state a rebuild killed between its two renames leaves: the earlier, complete
  # build set aside, nothing in its place.
  os.rename(version_dir, sources.set_aside_path(version_dir))
  try:
    assert sources.find_version_dir('image_cases/colours', os.fspath(colours)) == version_dir
  finally:
    if not os.path.exists(version_dir):
      os.rename(sources.set_aside_path(version_dir), version_dir)
  assert not os.path.exists(sources.set_aside_path(version_dir))


def test_staging_left_by_a_dead_build_is_removed_and_a_live_one_kept(tmp_path):
  raw = tmp_path / 'raw'
  _write_colour_cases(raw, per_split=(4, 2, 2))
  data_dir = tmp_path / 'data'
  dead = data_dir / '.build-image_cases-dead'
  live = data_dir / '.build-image_cases-live'
  for staging in (dead, live):
    (staging / 'image_cases').mkdir(parents=True)
    (staging / 'image_cases' / 'part.array_record').write_bytes(b'x' * 100)
  (dead / '.lock').touch()
  other_data_set = data_dir / '.build-ham10000-dead'
  other_data_set.mkdir()
  with open(live / '.lock', 'w') as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a build still running
    build_data.build('image_cases/colours', data_dir=os.fspath(data_dir),
                     manual_dir=os.fspath(raw))
    assert not dead.exists() and live.exists() and other_data_set.exists()
  assert sorted(p.name for p in data_dir.iterdir() if p.name.startswith('.build-')) == [
      '.build-ham10000-dead', '.build-image_cases-live']  # the build's own is gone


def test_a_kill_between_an_early_stop_and_its_checkpoint_stops_at_that_step_again(
    colours, tmp_path, monkeypatch):  # noqa: F811
  settings = {'early_stopping_patience': 1, 'checkpoint_every_steps': 10, 'total_steps': 80}
  uninterrupted = os.fspath(tmp_path / 'uninterrupted')
  want = finetune.train_and_evaluate(tiny_config(colours, **settings), uninterrupted)
  stop = want['step']
  assert 10 < stop < 80, want  # stopped early, after its first checkpoint
  workdir = os.fspath(tmp_path / 'run')
  _kill_after_update_of(stop, monkeypatch)  # best.json says stopped; its checkpoint is not saved
  with pytest.raises(Killed):
    finetune.train_and_evaluate(tiny_config(colours, **settings), workdir)
  assert json.load(open(os.path.join(workdir, 'best.json')))['stopped_early']
  # The step before's checkpoint is there (its save may still be committing: wait).
  deadline = time.monotonic() + 60
  while _checkpoint_steps(workdir) != [stop - 10] and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _checkpoint_steps(workdir) == [stop - 10]
  monkeypatch.undo()
  results = finetune.train_and_evaluate(tiny_config(colours, **settings), workdir)
  assert results['step'] == stop and results['best_step'] == want['best_step']
  assert results['test'] == want['test']
  for split in ('train', 'validation', 'test'):
    assert [r['step'] for r in _rows(workdir, split)] == [
        r['step'] for r in _rows(uninterrupted, split)], split
  assert _checkpoint_steps(workdir)[-1] == stop


def _checkpoint_steps(workdir):
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints'))
                if name.isdigit())
