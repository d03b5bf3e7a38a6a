"""The sweep launcher builds one main.py command per grid point, each with its workdir;
under SLURM with one task per node, each process takes its node's GPUs."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'launch'))
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top

from bigssl_med import parallel  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / 'configs' / 'micle_derm.py')


def test_grid_and_commands(capsys):
  assert sweep.main(['--config=configs/micle_derm.py', '--root=/runs/x', '--set', 'seed=0,1',
                     '--set', 'optimizer.learning_rate=0.3,1.0', '--dry_run', '--',
                     '--config.total_steps=10']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4
  assert '--workdir=/runs/x/seed=1,optimizer.learning_rate=0.3' in lines[2]
  assert '--config.seed=1 --config.optimizer.learning_rate=0.3 --config.total_steps=10' in lines[2]


def test_bad_set_is_an_error():
  with pytest.raises(SystemExit):
    sweep.main([f'--config={CONFIG}', '--root=/r', '--set', 'seed'])


def test_values_with_commas_and_empty_values(capsys):
  assert sweep.main([f'--config={CONFIG}', '--root=/r', '--set',
                     'init_from=/p/seed=0,lr=0.3;/p/seed=1,lr=0.3', '--dry_run']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [shlex.split(line)[-1] for line in lines] == ['--config.init_from=/p/seed=0,lr=0.3',
                                                      '--config.init_from=/p/seed=1,lr=0.3']
  assert sweep.main([f'--config={CONFIG}', '--root=/r', '--set', 'init_from=,/p/micle',
                     '--dry_run']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [shlex.split(line)[-1] for line in lines] == ['--config.init_from=',
                                                      '--config.init_from=/p/micle']


def test_a_failed_sbatch_is_counted_not_a_traceback(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv('PATH', str(tmp_path))  # no sbatch on the PATH
  assert sweep.main([f'--config={CONFIG}', f'--root={tmp_path}', '--set', 'seed=0,1',
                     '--launcher=slurm']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and err[0].startswith(f'error: sbatch failed for {tmp_path}/seed=0:')


def _fake_slurm(tmp_path, queued):
  """sbatch and squeue scripts on PATH: sbatch numbers its jobs from 100 and logs its
  arguments (after $SBATCH_DELAY seconds); squeue lists the jobs in `queued` (a file of
  ids) as PENDING."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'sbatch').write_text(
      '#!/bin/bash\nsleep "${SBATCH_DELAY:-0}"\n'
      'n=$(wc -l < "$LOG" 2>/dev/null || echo 0)\necho "$@" >> "$LOG"\n'
      'echo "$((100 + n));cluster"\n')
  (bin_dir / 'squeue').write_text(
      '#!/bin/bash\njob=${2#--jobs=}\n'
      'if grep -qx TIMEOUT "$QUEUED"; then\n'
      '  echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2; exit 1\nfi\n'
      'grep -qx "$job" "$QUEUED" || { echo "slurm_load_jobs error: Invalid job id" >&2; exit 1; }\n'
      'echo PENDING\n')
  for script in bin_dir.iterdir():
    script.chmod(0o755)
  return {'PATH': f'{bin_dir}:/usr/bin:/bin', 'LOG': str(tmp_path / 'sbatch.log'),
          'QUEUED': str(queued)}


def test_slurm_sweep_leaves_out_runs_whose_job_is_still_queued(monkeypatch, tmp_path, capsys):
  queued = tmp_path / 'queued'
  queued.write_text('')
  for key, value in _fake_slurm(tmp_path, queued).items():
    monkeypatch.setenv(key, value)
  args = [f'--config={CONFIG}', f'--root={tmp_path / "runs"}', '--set', 'seed=0,1',
          '--launcher=slurm']
  assert sweep.main(args) == 0
  assert [(tmp_path / 'runs' / f'seed={s}' / 'slurm_job_id').read_text() for s in (0, 1)] == [
      '100\n', '101\n']
  queued.write_text('101\n')   # job 100 has ended, 101 still waits
  capsys.readouterr()
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  seed1 = tmp_path / 'runs' / 'seed=1'
  assert f'left out (rerun the sweep later): {seed1}: job 101 is PENDING' in out
  submitted = (tmp_path / 'sbatch.log').read_text().splitlines()
  assert len(submitted) == 3 and '--workdir=' + str(tmp_path / 'runs' / 'seed=0') in submitted[2]
  assert (tmp_path / 'runs' / 'seed=0' / 'slurm_job_id').read_text() == '102\n'
  # squeue down (a controller timeout): nothing is submitted over a job it cannot see.
  queued.write_text('TIMEOUT\n')
  capsys.readouterr()
  assert sweep.main(args) == 0
  assert 'squeue failed for job 102 (slurm_load_jobs error: Socket timed out' in (
      capsys.readouterr().out)
  assert len((tmp_path / 'sbatch.log').read_text().splitlines()) == 3


SLURM_ONE_TASK_PER_NODE = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4', 'SLURM_NNODES': '4',
                           'SLURM_PROCID': '1', 'SLURM_LOCALID': '0',
                           'SLURM_GPUS_ON_NODE': '8'}


@pytest.mark.parametrize('change, expected', [
    ({}, list(range(8))),
    ({'SLURM_GPUS_ON_NODE': None, 'CUDA_VISIBLE_DEVICES': '2,3,5,7'}, [0, 1, 2, 3]),
    ({'SLURM_NTASKS': '32'}, None),               # one task per GPU: JAX's own choice
    ({'SLURM_GPUS_ON_NODE': '1'}, None),
    ({'JAX_LOCAL_DEVICE_IDS': '0,1'}, None),      # the user's choice
    ({'SLURM_JOB_ID': None}, None),               # not under SLURM
])
def test_slurm_one_task_per_node_takes_every_gpu(change, expected):
  environ = {**SLURM_ONE_TASK_PER_NODE, **change}
  environ = {k: v for k, v in environ.items() if v is not None}
  assert parallel.slurm_local_device_ids(environ) == expected


def test_initialize_distributed_passes_the_node_gpus(monkeypatch):
  calls = []
  monkeypatch.setattr(parallel.jax.distributed, 'initialize',
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  for key in ('JAX_LOCAL_DEVICE_IDS', 'CUDA_VISIBLE_DEVICES', 'SLURM_STEP_NUM_TASKS',
              'SLURM_STEP_NUM_NODES', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(key, raising=False)
  for key, value in SLURM_ONE_TASK_PER_NODE.items():
    monkeypatch.setenv(key, value)
  parallel.initialize_distributed()
  parallel.initialize_distributed('host:1234', 4, 1)
  assert calls == [((), {'local_device_ids': list(range(8))}),
                   (('host:1234', 4, 1), {'local_device_ids': list(range(8))})]


def test_path_values_do_not_nest_workdirs(capsys):
  assert sweep.main([f'--config={CONFIG}', '--root=/r', '--set', 'init_from=,/p/micle',
                     '--dry_run']) == 0
  workdirs = [next(a for a in shlex.split(line) if a.startswith('--workdir='))
              for line in capsys.readouterr().out.strip().splitlines()]
  assert workdirs == ['--workdir=/r/init_from=', '--workdir=/r/init_from=p_micle']


def _sweep_error(capsys, *args):
  """The one line a sweep that must not start writes (nothing is printed or run)."""
  with pytest.raises(SystemExit) as e:
    sweep.main([f'--config={CONFIG}', '--root=/r', '--dry_run', *args])
  captured = capsys.readouterr()
  assert e.value.code and not captured.out, captured.out
  message = str(e.value.code) + captured.err
  assert len(message.strip().splitlines()) == 1 and message.startswith('error: '), message
  return message


@pytest.mark.parametrize('args, expected', [
    (['--set', 'seed=0', '--set', 'seed=1'], '--set gives seed twice'),
    (['--set', 'seed+stages.micle.seed=0', '--set', 'seed=1'], '--set gives seed twice'),
    (['--set', 'seed=0,1', '--', '--config.seed=7'],
     '--config.seed=7 after -- sets seed, which --set varies'),
    (['--set', 'seed=0,1', '--', '--config.seed', '7'], 'after -- sets seed'),
    (['--set', 'seed=0', '--', '--workdir=/w'], "the sweep makes each run's workdir"),
    (['--set', 'seed=0', '--', '--dry_run'], '--dry_run is an option of the sweep'),
    (['--set', 'seed=1,1'], "--set gives seed the value '1' twice"),
    (['--set', 'init_from=/a/b_c,/a_b/c,a/b/c'],
     "init_from='/a/b_c' and init_from='/a_b/c' would share the workdir 'init_from=a_b_c'"),
    (['--set', 'init_from=/' + 'p' * 300], 'bytes, over the 255 a file system allows'),
    (['--sett', 'seed=1'], 'unrecognized arguments: --sett seed=1'),
    (['--dry', '--set', 'seed=1'], 'unrecognized arguments: --dry'),
    (['--set', 'seed=0', '--config.lr=1'], 'unrecognized arguments: --config.lr=1'),
    (['--set', 'seed+=0'], '--set needs KEY=V1,V2'),
    (['--set', 'sed=0,1'], "--set sed: {config} has no config key 'sed'"),
    (['--set', 'optimizer.lr=0.1'], "has no config key 'optimizer.lr'"),
    (['--set', 'seed=0,1', '--', '--config.data.imagesize=64'],
     "--config.data.imagesize after --: {config} has no config key 'data.imagesize'"),
    (['--config=/nowhere/c.py', '--set', 'seed=0'],
     '--config=/nowhere/c.py: cannot load it: FileNotFoundError'),
    (['--config=configs/demo.py', '--set', 'seed=0,1'],
     "has no config key 'seed' (a config of stages: set stages.NAME.seed for a stage NAME "
     'of micle, pretrain, scratch)'),
])
def test_a_sweep_that_would_mislead_is_a_one_line_error(capsys, args, expected):
  assert expected.format(config=CONFIG) in _sweep_error(capsys, *args)


def test_linked_keys_take_one_value_per_point(capsys):
  assert sweep.main(['--config=configs/demo.py', '--root=/r', '--set',
                     'stages.pretrain.seed+stages.micle.seed+stages.scratch.seed=0,1',
                     '--set', 'stages.micle.optimizer.learning_rate=0.1', '--dry_run']) == 0
  lines = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [line[3:] for line in lines] == [[
      f'--workdir=/r/stages.pretrain+micle+scratch.seed={s},'
      'stages.micle.optimizer.learning_rate=0.1', f'--config.stages.pretrain.seed={s}',
      f'--config.stages.micle.seed={s}', f'--config.stages.scratch.seed={s}',
      '--config.stages.micle.optimizer.learning_rate=0.1'] for s in (0, 1)]
  assert sweep.axis_name(('seed', 'stages.micle.seed')) == 'seed+stages.micle.seed'
  assert sweep.axis_name(('a.b.c', 'a.d')) == 'a.b.c+d'


def test_slurm_workdir_is_made_before_sbatch(monkeypatch, tmp_path, capsys):
  queued = tmp_path / 'queued'
  queued.write_text('')
  for key, value in _fake_slurm(tmp_path, queued).items():
    monkeypatch.setenv(key, value)
  root = tmp_path / 'runs'
  root.mkdir()
  (root / 'seed=0').write_text('')  # a file where the workdir should be
  assert sweep.main([f'--config={CONFIG}', f'--root={root}', '--set', 'seed=0,1',
                     '--launcher=slurm']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f'error: cannot make {root}/seed=0: ')
  submitted = (tmp_path / 'sbatch.log').read_text().splitlines()
  assert len(submitted) == 1 and f'--workdir={root}/seed=1' in submitted[0]
  assert (root / 'seed=1' / 'slurm_job_id').read_text() == '100\n'


def test_two_slurm_sweeps_at_once_submit_each_run_once(tmp_path):
  queued = tmp_path / 'queued'
  queued.write_text('100\n101\n')  # every job the fake sbatch hands out stays pending
  env = {**os.environ, **_fake_slurm(tmp_path, queued), 'SBATCH_DELAY': '2'}
  cmd = [sys.executable, str(Path(sweep.__file__)), f'--config={CONFIG}',
         f'--root={tmp_path / "runs"}', '--set', 'seed=0', '--launcher=slurm']
  sweeps = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
  outs = [s.communicate(timeout=60)[0] for s in sweeps]
  assert [s.returncode for s in sweeps] == [0, 0]
  assert len((tmp_path / 'sbatch.log').read_text().splitlines()) == 1, outs
  assert sum('left out (rerun the sweep later)' in out for out in outs) == 1, outs


FAKE_MAIN = """import os, signal, sys, time
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'log')
def stop(signum, _):
  with open(log, 'a') as f:
    f.write(signal.Signals(signum).name + '\\n')
  sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
with open(log + '.pid', 'w') as f:
  f.write(str(os.getpid()))
with open(log, 'a') as f:
  f.write(' '.join(sys.argv[1:]) + '\\n')
time.sleep(120)
"""


@pytest.mark.parametrize('signum, status', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_local_sweep_stops_its_run(tmp_path, signum, status):
  (tmp_path / 'main.py').write_text(FAKE_MAIN)
  log = tmp_path / 'log'
  code = (f'import sys; sys.path.insert(0, {str(Path(sweep.__file__).parent)!r}); '
          f'import sweep; sweep.REPO = {str(tmp_path)!r}; '
          f"sys.exit(sweep.main([f'--config={CONFIG}', '--root=/r', '--set', 'seed=0,1']))")
  run = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not (log.exists() and log.read_text().endswith('\n')) and time.time() < deadline:
    time.sleep(0.1)
  run.send_signal(signum)
  try:
    out, err = run.communicate(timeout=30)
  finally:  # no fake run outlives the test, whatever the sweep did
    run.kill()
    try:
      pid = int((tmp_path / 'log.pid').read_text())
      if str(tmp_path) in Path(f'/proc/{pid}/cmdline').read_text():  # still the fake run
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
      pass
  assert run.returncode == status, (out, err)
  # The run got the signal and ended; the next point was not started.
  assert log.read_text().splitlines() == [
      f'--config={CONFIG} --workdir=/r/seed=0 --config.seed=0', signal.Signals(signum).name]
  assert err.strip() == f'stopped by {signal.Signals(signum).name}'


def test_a_local_sweep_lists_its_failed_points(tmp_path, monkeypatch, capsys):
  (tmp_path / 'main.py').write_text(
      'import sys\n'
      "sys.exit(3 if '--config.seed=1' in sys.argv else 0)\n")
  monkeypatch.setattr(sweep, 'REPO', str(tmp_path))
  assert sweep.main([f'--config={CONFIG}', f'--root={tmp_path}/r', '--set', 'seed=0,1,2']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['1 of 3 points failed:', f'  {tmp_path}/r/seed=1: exit status 3']
  assert sweep.exit_text(-9) == 'killed by SIGKILL' and sweep.exit_text(2) == 'exit status 2'


def test_tpu_vm_quotes_the_repo_for_the_remote_shell(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  # gcloud runs --command as the remote shell would; python says where it runs and with what.
  (bin_dir / 'gcloud').write_text('#!/bin/bash\nfor a in "$@"; do case $a in --command=*) '
                                  'exec bash -c "${a#--command=}";; esac; done\nexit 3\n')
  (bin_dir / 'python').write_text('#!/bin/bash\npwd\nprintf "%s\\n" "$@"\n')
  for script in bin_dir.iterdir():
    script.chmod(0o755)
  (tmp_path / 'my repo').mkdir()
  (tmp_path / 'bigssl_med').mkdir()
  script = str(Path(sweep.__file__).parent / 'tpu_vm.sh')
  env = {**os.environ, 'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path)}
  for repo, expected in (('~/my repo', tmp_path / 'my repo'), (None, tmp_path / 'bigssl_med'),
                         (str(tmp_path / 'my repo'), tmp_path / 'my repo')):
    run = subprocess.run([script, 'tpu', 'zone', '--config=a b.py', '--workdir=/w'],
                         env={**env, **({'REPO_DIR': repo} if repo else {})},
                         capture_output=True, text=True, check=False, cwd='/')
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(expected), 'main.py', '--config=a b.py',
                                       '--workdir=/w']
