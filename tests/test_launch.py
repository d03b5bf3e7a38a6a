"""The sweep launcher builds one main.py command per grid point, each with its workdir;
under SLURM with one task per node, each process takes its node's GPUs."""

import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'launch'))
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top

from bigssl_med import parallel  # noqa: E402


def test_grid_and_commands(capsys):
  assert sweep.main(['--config=configs/demo.py', '--root=/runs/x', '--set', 'seed=0,1',
                     '--set', 'optimizer.learning_rate=0.3,1.0', '--dry_run', '--',
                     '--config.total_steps=10']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4
  assert '--workdir=/runs/x/seed=1,optimizer.learning_rate=0.3' in lines[2]
  assert '--config.seed=1 --config.optimizer.learning_rate=0.3 --config.total_steps=10' in lines[2]


def test_bad_set_is_an_error():
  with pytest.raises(SystemExit):
    sweep.main(['--config=c.py', '--root=/r', '--set', 'seed'])


def test_values_with_commas_and_empty_values(capsys):
  assert sweep.main(['--config=c.py', '--root=/r', '--set',
                     'init_from=/p/seed=0,lr=0.3;/p/seed=1,lr=0.3', '--dry_run']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [shlex.split(line)[-1] for line in lines] == ['--config.init_from=/p/seed=0,lr=0.3',
                                                      '--config.init_from=/p/seed=1,lr=0.3']
  assert sweep.main(['--config=c.py', '--root=/r', '--set', 'init_from=,/p/micle',
                     '--dry_run']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [shlex.split(line)[-1] for line in lines] == ['--config.init_from=',
                                                      '--config.init_from=/p/micle']


def test_a_failed_sbatch_is_counted_not_a_traceback(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv('PATH', str(tmp_path))  # no sbatch on the PATH
  assert sweep.main(['--config=c.py', '--root=/r', '--set', 'seed=0,1',
                     '--launcher=slurm']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and err[0].startswith('error: sbatch failed for /r/seed=0:')


def _fake_slurm(tmp_path, queued):
  """sbatch and squeue scripts on PATH: sbatch numbers its jobs from 100 and logs its
  arguments; squeue lists the jobs in `queued` (a file of ids) as PENDING."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'sbatch').write_text(
      '#!/bin/bash\nn=$(wc -l < "$LOG" 2>/dev/null || echo 0)\necho "$@" >> "$LOG"\n'
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
  args = ['--config=c.py', f'--root={tmp_path / "runs"}', '--set', 'seed=0,1',
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
  assert sweep.main(['--config=c.py', '--root=/r', '--set', 'init_from=,/p/micle',
                     '--dry_run']) == 0
  workdirs = [next(a for a in shlex.split(line) if a.startswith('--workdir='))
              for line in capsys.readouterr().out.strip().splitlines()]
  assert workdirs == ['--workdir=/r/init_from=', '--workdir=/r/init_from=p_micle']
