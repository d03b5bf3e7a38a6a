r"""Runs (or prints) one `main.py` per point of a grid of config overrides.

  python launch/sweep.py --config=configs/micle_derm.py --root=/runs/derm \
      --set seed=0,1,2 --set optimizer.learning_rate=0.3,1.0 [--dry_run] \
      [--launcher=local|slurm|print] [-- EXTRA main.py FLAGS]

Every combination gets its own workdir under --root, named after its overrides
(`seed=1,optimizer.learning_rate=0.3`; a path value's slashes become `_`, so
`init_from=/runs/micle` names `init_from=runs_micle`), so rerunning the sweep resumes each run
where it stopped and skips finished ones (main.py resumes from the workdir; a
finished run asked for with other settings is an error). The EXTRA flags are shared
by every point and are not in the names: a sweep with other EXTRA flags needs its
own --root.

Values are separated by commas, or by semicolons where one of them holds a comma
(`--set "init_from=/runs/pre/seed=0,lr=0.3;/runs/pre/seed=1,lr=0.3"`); an empty value
is a value (`--set init_from=,/runs/pre/micle`: from scratch and from a run).
`--launcher=slurm` submits each run with `sbatch launch/slurm.sbatch` and keeps the job's
id in `WORKDIR/slurm_job_id`; a rerun of the sweep leaves out a run whose job `squeue`
still lists (pending or running), so two jobs never train one workdir; when squeue
cannot answer, the run is left out too.
`--launcher=print` only prints the commands (for another scheduler).
"""

import argparse
import itertools
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_ID_FILE = 'slurm_job_id'


def grid(settings):
  """[('key', [v1, v2]), ...] -> list of [(key, value), ...] combinations."""
  keys = [k for k, _ in settings]
  return [list(zip(keys, values)) for values in itertools.product(*[v for _, v in settings])]


def parse_set(text):
  """`KEY=V1,V2` (or `KEY=V1;V2` where a value holds a comma) -> (KEY, [V1, V2])."""
  if '=' not in text or not text.split('=', 1)[0].strip():
    raise argparse.ArgumentTypeError(f'--set needs KEY=V1,V2,..., got {text!r}')
  key, values = text.split('=', 1)
  return key.strip(), [v.strip() for v in values.split(';' if ';' in values else ',')]


def commands(config, root, settings, extra):
  for point in grid(settings):
    # A value that is a path ('/runs/pre/micle') must not nest one workdir in another.
    name = ','.join(f"{k}={v.strip(os.sep).replace(os.sep, '_')}" for k, v in point) or 'default'
    workdir = os.path.join(root, name)
    cmd = [sys.executable, os.path.join(REPO, 'main.py'), f'--config={config}',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in point] + list(extra)
    yield workdir, cmd


def queued_job(workdir):
  """Why `workdir` must not get a new job: 'job ID is STATE' while squeue lists the job
  last submitted for it, 'squeue failed ...' when squeue cannot say; None otherwise."""
  try:
    with open(os.path.join(workdir, JOB_ID_FILE)) as f:
      job = f.read().strip()
  except OSError:
    return None
  if not job:
    return None
  try:
    found = subprocess.run(['squeue', '--noheader', f'--jobs={job}', '--format=%T'],
                           capture_output=True, text=True, check=False)
  except OSError as e:
    return f'squeue failed for job {job} ({e})'
  if found.returncode != 0:
    # A job squeue no longer knows (it ended a while ago) is 'Invalid job id'; anything
    # else (a timeout of the controller) says nothing about the job.
    if 'invalid job id' in found.stderr.lower():
      return None
    return f"squeue failed for job {job} ({' '.join(found.stderr.split()) or found.returncode})"
  states = found.stdout.split()
  return f'job {job} is {states[0]}' if states else None


def submit(workdir, cmd):
  """sbatch `cmd` for `workdir`, keeping the job id there; False when sbatch failed."""
  try:
    out = subprocess.run(['sbatch', '--parsable', f'--job-name={os.path.basename(workdir)[:60]}',
                          os.path.join(REPO, 'launch', 'slurm.sbatch')] + cmd[1:],
                         check=True, capture_output=True, text=True).stdout
  except subprocess.CalledProcessError as e:
    print(f'error: sbatch failed for {workdir}: {e}: {e.stderr.strip()}', file=sys.stderr,
          flush=True)
    return False
  except OSError as e:
    print(f'error: sbatch failed for {workdir}: {e}', file=sys.stderr, flush=True)
    return False
  job = out.strip().split(';')[0]  # --parsable prints 'ID' or 'ID;CLUSTER'
  print(f'submitted job {job}', flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, JOB_ID_FILE), 'w') as f:
    f.write(job + '\n')
  return True


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', required=True)
  p.add_argument('--root', required=True, help='one workdir per run is made under it')
  p.add_argument('--set', type=parse_set, action='append', default=[], dest='settings',
                 metavar='KEY=V1,V2', help='a config key and its values (repeatable)')
  p.add_argument('--launcher', choices=['local', 'slurm', 'print'], default='local')
  p.add_argument('--dry_run', action='store_true', help='same as --launcher=print')
  args, extra = p.parse_known_args(argv)
  extra = [e for e in extra if e != '--']
  launcher = 'print' if args.dry_run else args.launcher
  failed = 0
  for workdir, cmd in commands(args.config, args.root, args.settings, extra):
    line = ' '.join(shlex.quote(c) for c in cmd)
    if launcher == 'print':
      print(line)
    elif launcher == 'slurm':
      queued = queued_job(workdir)
      if queued:
        print(f'left out (rerun the sweep later): {workdir}: {queued}', flush=True)
        continue
      print(f'sbatch: {line}', flush=True)
      failed += not submit(workdir, cmd)
    else:
      print(f'==> {line}', flush=True)
      failed += subprocess.run(cmd).returncode != 0
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
