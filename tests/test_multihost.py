"""Several hosts: `main.py` in two processes of 4 CPU devices each against one process of 8.

The two processes join through `jax.distributed` on localhost (`--coordinator_address`,
`--num_processes`, `--process_id`), exactly as two hosts of a pod would; each reads its
own share of every batch, and the collectives cross the process boundary. A run on
2 x 4 devices must compute what the same run on 1 x 8 devices computes, write each file
once, build a missing data set once, stop every host at one step when only one of them
receives SIGTERM, and resume as if never stopped.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from bigssl_med import config_schema
from bigssl_med.trainers import stages
from conftest import override
from test_pretrain import tiny_config as tiny_pretrain_config

REPO = Path(__file__).resolve().parents[1]
HOSTS, DEVICES_PER_HOST = 2, 4
PRETRAIN_STEPS = 12


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(config_file: Path, workdir: Path, *flags: str) -> list[subprocess.Popen]:
  """`main.py` as HOSTS processes of DEVICES_PER_HOST CPU devices; stderr to workdir.HOST.log."""
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES_PER_HOST}')
  address = f'localhost:{_free_port()}'
  procs = []
  for host in range(HOSTS):
    log = open(f'{workdir}.{host}.log', 'w')  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(
        [sys.executable, 'main.py', f'--config={config_file}', f'--workdir={workdir}',
         f'--coordinator_address={address}', f'--num_processes={HOSTS}',
         f'--process_id={host}', *flags],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log))
    log.close()
  return procs


def _wait(procs: list[subprocess.Popen], workdir: Path, timeout: float = 600) -> list[int]:
  deadline = time.time() + timeout
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(timeout=max(1.0, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail(f'the hosts did not finish in {timeout:.0f} s (a host waiting for another?); '
                  f'last log lines: {_log_tail(workdir)}')
  return codes


def _log_tail(workdir: Path) -> str:
  tails = []
  for host in range(HOSTS):
    lines = Path(f'{workdir}.{host}.log').read_text().splitlines()
    tails.append(f'host {host}: ' + ' | '.join(
        line for line in lines[-6:] if '[Gloo]' not in line))
  return '\n'.join(tails)


def _config_file(path: Path, function: str, *args) -> Path:
  """A config file for `main.py` whose `get_config()` returns `function(*args)` of this module."""
  path.write_text(
      'import sys\n'
      f'sys.path.insert(0, {os.fspath(REPO / "tests")!r})\n'
      'import test_multihost\n'
      'def get_config():\n'
      f'  return test_multihost.{function}(*{args!r})\n')
  return path


def _metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _without_rates(entries: list[dict]) -> list[dict]:
  return [{k: v for k, v in e.items() if k not in ('steps_per_sec', 'images_per_sec')}
          for e in entries]


def _assert_close(two, one, where: str, rtol: float = 1e-3) -> None:
  """Same structure; numbers within `rtol`.

  The collectives sum in another order, which moves losses by about 1e-6; a wrong
  batch or reduction moves them by far more.
  """
  if isinstance(one, dict):
    assert isinstance(two, dict) and sorted(two) == sorted(one), where
    for k in one:
      _assert_close(two[k], one[k], f'{where}.{k}', rtol)
  elif isinstance(one, (list, tuple)):
    assert len(two) == len(one), where
    for i, (a, b) in enumerate(zip(two, one)):
      _assert_close(a, b, f'{where}[{i}]', rtol)
  elif isinstance(one, float) and not isinstance(two, str):
    np.testing.assert_allclose(two, one, rtol=rtol, atol=1e-6, err_msg=where)
  else:
    assert two == one, where


# --------------------------------------------------------------------------- configs


def pretrain_then_tasks(data_dir: str, manual_dir: str) -> ml_collections.ConfigDict:
  """MICLe pretraining, then fine-tuning from it, then the report.

  The data set is built first. Pretraining is long enough to be interrupted, at a
  learning rate at which two runs that differ only by rounding stay together (at
  SimCLR's rate this tiny model is chaotic: 1e-6 grows to 1e-2 in ten steps).
  Fine-tuning stands for the trainers that share `model_selection.train_loop` with it
  (linear evaluation, distillation, segmentation).
  """
  config = config_schema.stages()
  config.order = ('pretrain', 'finetune')
  config.stages.pretrain = tiny_pretrain_config(data_dir, **{
      'total_steps': PRETRAIN_STEPS, 'checkpoint_every_steps': 1000,
      'optimizer.learning_rate': 0.002, 'data.build_if_missing': True,
      'data.manual_dir': manual_dir})
  config.stages.finetune = override(config_schema.finetune(), {
      'dataset': 'ham10000', 'data.data_dir': data_dir, 'data.build_if_missing': False,
      'data.image_size': 16, 'data.num_workers': 0, 'data.crop_area_min': 0.5,
      'data.label_fraction': 0.5, 'model.depth': 18, 'model.width_multiplier': 0.125,
      'model.cifar_stem': True, 'model.head_out_dim': 16, 'compute_dtype': 'float32',
      'batch_size': 16, 'total_steps': 4, 'num_epochs': 0.0, 'eval_every_steps': 2,
      'log_every_steps': 1, 'checkpoint_every_steps': 2, 'tensorboard': False,
      'init_from': '@pretrain', 'optimizer.learning_rate': 0.2})
  config.report = True
  return config


# --------------------------------------------------------------------------- tests


def test_two_hosts_stop_together_resume_and_compute_what_one_host_computes(small_ham10000,
                                                                          tmp_path):
  _, manual_dir = small_ham10000
  two = tmp_path / 'two'
  cfg = _config_file(tmp_path / 'cfg.py', 'pretrain_then_tasks', os.fspath(tmp_path / 'data2'),
                     manual_dir)

  # SIGTERM reaches host 0 only, during pretraining: both hosts stop after one step.
  procs = _launch(cfg, two)
  metrics = two / 'pretrain' / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and
                                         metrics.read_text().count('\n') >= 2):
    time.sleep(0.2)
  procs[0].send_signal(signal.SIGTERM)
  assert _wait(procs, two) == [143] * HOSTS, _log_tail(two)
  steps = [int(s) for s in os.listdir(two / 'pretrain' / 'checkpoints') if s.isdigit()]
  assert len(steps) == 1 and 2 <= steps[0] < PRETRAIN_STEPS, steps
  for host in range(HOSTS):
    assert f'stopped by SIGTERM at step {steps[0]}' in Path(f'{two}.{host}.log').read_text()
  # The data set was built once, by process 0, into a complete version folder.
  built = list((tmp_path / 'data2' / 'ham10000').glob('*/*/dataset_info.json'))
  assert len(built) == 1, built
  assert not list((tmp_path / 'data2').glob('.build-*'))

  # The same command again resumes and runs every stage; meanwhile, in this process,
  # the whole thing on one host of 8 devices without interruption.
  procs = _launch(cfg, two)
  one = tmp_path / 'one'
  stages.train_and_evaluate(pretrain_then_tasks(os.fspath(tmp_path / 'data1'), manual_dir),
                            os.fspath(one))
  assert _wait(procs, two) == [0] * HOSTS, _log_tail(two)
  origin = json.loads((two / 'pretrain' / 'results.json').read_text())['origin']
  assert origin == f'resumed from {two / "pretrain" / "checkpoints" / str(steps[0])}'

  for name in ('pretrain', 'finetune'):
    # Every line written once, by process 0, with the uninterrupted run's values.
    logged = _without_rates(_metrics(two / name))
    if name == 'pretrain':
      steps = [e['step'] for e in logged if e['split'] == 'train']
      assert steps == list(range(1, PRETRAIN_STEPS + 1))
    _assert_close(logged, _without_rates(_metrics(one / name)), f'{name}/metrics.jsonl')
    # The same results, but for timings and the workdirs' own paths.
    results_two = json.loads((two / name / 'results.json').read_text().replace(
        os.fspath(two), os.fspath(one)))
    results_one = json.loads((one / name / 'results.json').read_text())
    for r in (results_one, results_two):
      for key in ('eval_seconds', 'origin'):
        r.pop(key, None)
      for key in ('steps_per_sec', 'images_per_sec'):
        r.get('train', {}).pop(key, None)
    _assert_close(results_two, results_one, f'{name}/results.json')
  predictions = [np.load(d / 'finetune' / 'test_predictions.npz') for d in (two, one)]
  assert sorted(predictions[0].files) == sorted(predictions[1].files)
  for key in predictions[1].files:
    if predictions[1][key].dtype.kind == 'f':
      np.testing.assert_allclose(predictions[0][key], predictions[1][key], rtol=1e-4,
                                 atol=1e-6, err_msg=key)
    else:
      np.testing.assert_array_equal(predictions[0][key], predictions[1][key])
  report = (two / 'report.md').read_text()
  assert report.count('\n| ') == (one / 'report.md').read_text().count('\n| ') > 0
  assert json.loads((two / 'stages.json').read_text())['report'] == os.fspath(two / 'report.md')


def missing_raw_files(data_dir: str, manual_dir: str):
  return tiny_pretrain_config(data_dir, **{'data.build_if_missing': True,
                                           'data.manual_dir': manual_dir})


def test_a_build_that_fails_on_process_0_is_a_one_line_error_on_every_host(tmp_path):
  cfg = _config_file(tmp_path / 'cfg.py', 'missing_raw_files', os.fspath(tmp_path / 'data'),
                     os.fspath(tmp_path / 'nowhere'))
  workdir = tmp_path / 'two'
  assert _wait(_launch(cfg, workdir), workdir, timeout=300) == [2] * HOSTS
  errors = [Path(f'{workdir}.{host}.log').read_text().strip().splitlines()[-1]
            for host in range(HOSTS)]
  assert errors[0].startswith('error: ') and 'nowhere' in errors[0], errors[0]
  assert errors[1] == (f"error: data set 'ham10000': process 0 failed to build it in "
                       f"{tmp_path / 'data'} (its log has the error)")
  assert not (workdir / 'checkpoints').exists()
