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
own --root. They come after `--`; an option the sweep does not know before `--` is an
error (abbreviations too), and so is an EXTRA flag that is a sweep option, --workdir, or
a key that --set varies (`--set seed=0,1 -- --config.seed=7`).

Values are separated by commas, or by semicolons where one of them holds a comma
(`--set "init_from=/runs/pre/seed=0,lr=0.3;/runs/pre/seed=1,lr=0.3"`); an empty value
is a value (`--set init_from=,/runs/pre/micle`: from scratch and from a run).
Keys joined by `+` are linked: each point gives them all the same value, one axis of
the grid. A seed sweep of the stages of configs/demo.py:

  python launch/sweep.py --config=configs/demo.py --root=/runs/demo \
      --set "stages.pretrain.seed+stages.micle.seed+stages.scratch.seed=0,1,2"

Linked keys name the workdir with their common leading and trailing parts written once:
`stages.pretrain+micle+scratch.seed=1`.
Before anything runs, it is an error to give a key twice or a value of a key twice, for
two points to get one workdir name (`init_from=/a/b_c` and `init_from=/a_b/c` both name
`init_from=a_b_c`), for a name to be longer than the 255 bytes a file system allows, or
for a key of --set or of an EXTRA `--config.KEY` flag not to be in the config (a config
of stages has its keys under `stages.NAME.`).

`--launcher=local` (the default) runs the points one after another; a SIGTERM or
SIGINT to the sweep goes to the running main.py (which saves a checkpoint on SIGTERM),
and the sweep waits for it and stops with status 143 or 130. When points fail, the
sweep goes on with the others, then lists the failed ones (workdir and exit status) on
stderr and exits 1.
`--launcher=slurm` submits each run with `sbatch launch/slurm.sbatch` and keeps the job's
id in `WORKDIR/slurm_job_id`; a rerun of the sweep leaves out a run whose job `squeue`
still lists (pending or running), so two jobs never train one workdir; when squeue
cannot answer, the run is left out too. A lock on `WORKDIR/slurm_job_id.lock`, held from
squeue to the id written, lets two sweeps on one root at once submit each run once.
`--launcher=print` only prints the commands (for another scheduler).
"""

import argparse
import fcntl
import importlib.util
import itertools
import os
import shlex
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_ID_FILE = 'slurm_job_id'
LOCK_FILE = 'slurm_job_id.lock'
NAME_MAX = 255  # bytes in one path component, on every common file system


def grid(settings):
  """[(keys, [v1, v2]), ...] -> list of [(keys, value), ...] combinations."""
  axes = [k for k, _ in settings]
  return [list(zip(axes, values)) for values in itertools.product(*[v for _, v in settings])]


def parse_set(text):
  """`KEY=V1,V2` (or `KEY=V1;V2` where a value holds a comma; `KEY1+KEY2=...` for
  linked keys) -> ((KEY, ...), [V1, V2])."""
  keys = tuple(k.strip() for k in text.split('=', 1)[0].split('+'))
  if '=' not in text or not all(keys):
    raise argparse.ArgumentTypeError(f'--set needs KEY=V1,V2,..., got {text!r}')
  values = text.split('=', 1)[1]
  return keys, [v.strip() for v in values.split(';' if ';' in values else ',')]


def axis_name(keys):
  """`a.x.c+a.y.c` -> `a.x+y.c`: linked keys with their common leading and trailing
  parts written once (a single key is itself)."""
  parts = [k.split('.') for k in keys]
  most = min(len(p) for p in parts) - 1  # each key keeps a part of its own
  lead = 0
  while lead < most and len({p[lead] for p in parts}) == 1:
    lead += 1
  trail = 0
  while trail < most - lead and len({p[len(p) - 1 - trail] for p in parts}) == 1:
    trail += 1
  middles = '+'.join('.'.join(p[lead:len(p) - trail]) for p in parts)
  return '.'.join(parts[0][:lead] + [middles] + parts[0][len(parts[0]) - trail:])


def point_name(point):
  # A value that is a path ('/runs/pre/micle') must not nest one workdir in another.
  return ','.join(f"{axis_name(k)}={v.strip(os.sep).replace(os.sep, '_')}"
                  for k, v in point) or 'default'


def check(settings, extra):
  """The reason the sweep must not start (a one-line message), or None."""
  keys = [k for axis, _ in settings for k in axis]
  for key in keys:
    if keys.count(key) > 1:
      return f'--set gives {key} twice'
  for axis, values in settings:
    for value in values:
      if values.count(value) > 1:
        return f'--set gives {"+".join(axis)} the value {value!r} twice'
  for flag in extra:
    name = flag.lstrip('-').split('=', 1)[0] if flag.startswith('-') else None
    if name == 'workdir':
      return f"{flag} after --: the sweep makes each run's workdir under --root"
    if name in ('config', 'root', 'set', 'launcher', 'dry_run'):
      return f'{flag} after --: --{name} is an option of the sweep and goes before --'
    if name in [f'config.{k}' for k in keys]:
      return f'{flag} after -- sets {name[7:]}, which --set varies'
  named = {}
  for point in grid(settings):
    name = point_name(point)
    if name in named:
      differ = [i for i, (a, b) in enumerate(zip(named[name], point)) if a != b]
      both = [', '.join(f'{"+".join(p[i][0])}={p[i][1]!r}' for i in differ)
              for p in (named[name], point)]
      return f'{both[0]} and {both[1]} would share the workdir {name!r}: give other values'
    if len(name.encode()) > NAME_MAX:
      return (f'the workdir name {name!r} is {len(name.encode())} bytes, over the '
              f'{NAME_MAX} a file system allows: give shorter values (a symlink to a path)')
    named[name] = point
  return None


def load_config(spec):
  """The config `main.py --config=SPEC` starts from: `PATH[:ARG]`'s `get_config(ARG)`."""
  path, *arg = spec.split(':', 1)
  if REPO not in sys.path:
    sys.path.insert(0, REPO)  # the configs import bigssl_med
  module_spec = importlib.util.spec_from_file_location('sweep_config', path)
  if module_spec is None:
    raise ImportError(f'{path} is not a Python file')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)


def unknown_key(spec, settings, extra):
  """The reason a key of --set or of an EXTRA `--config.KEY=...` flag is not in the
  config (a one-line message), or None; every run would fail on it."""
  try:
    config = load_config(spec)
  except Exception as e:  # pylint: disable=broad-except (main.py would fail on it too)
    return f'--config={spec}: cannot load it: {type(e).__name__}: {e}'
  keys = [(f'--set {k}', k) for axis, _ in settings for k in axis]
  for flag in extra:
    name = flag.lstrip('-').split('=', 1)[0]
    if flag.startswith('--config.'):
      keys.append((f'{flag.split("=", 1)[0]} after --', name[len('config.'):]))
  for where, key in keys:
    node = config
    for part in key.split('.'):
      if not (hasattr(node, 'keys') and part in node.keys()):
        hint = ''
        if getattr(config, 'trainer', None) == 'stages' and 'stages' in config.keys():
          hint = (f' (a config of stages: set stages.NAME.{key} for a stage NAME of '
                  f'{", ".join(config.stages.keys())})')
        return f'{where}: {spec} has no config key {key!r}{hint}'
      node = node[part]
  return None


def commands(config, root, settings, extra):
  for point in grid(settings):
    workdir = os.path.join(root, point_name(point))
    cmd = [sys.executable, os.path.join(REPO, 'main.py'), f'--config={config}',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for keys, v in point
                                      for k in keys] + list(extra)
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


def error(message):
  print(f'error: {message}', file=sys.stderr, flush=True)
  return False


def submit(workdir, cmd):
  """sbatch `cmd` for `workdir` unless squeue lists its job, keeping the job id there;
  False when that failed. The workdir is made first, and a lock on its LOCK_FILE is held
  from squeue to the id written, so a second sweep at once waits and then sees the job."""
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, LOCK_FILE), 'a')  # pylint: disable=consider-using-with
  except OSError as e:
    return error(f'cannot make {workdir}: {e}')
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    queued = queued_job(workdir)
    if queued:
      print(f'left out (rerun the sweep later): {workdir}: {queued}', flush=True)
      return True
    print(f"sbatch: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    try:
      out = subprocess.run(['sbatch', '--parsable',
                            f'--job-name={os.path.basename(workdir)[:60]}',
                            os.path.join(REPO, 'launch', 'slurm.sbatch')] + cmd[1:],
                           check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
      return error(f'sbatch failed for {workdir}: {e}: {e.stderr.strip()}')
    except OSError as e:
      return error(f'sbatch failed for {workdir}: {e}')
    job = out.strip().split(';')[0]  # --parsable prints 'ID' or 'ID;CLUSTER'
    print(f'submitted job {job}', flush=True)
    try:
      with open(os.path.join(workdir, JOB_ID_FILE), 'w') as f:
        f.write(job + '\n')
    except OSError as e:
      return error(f'job {job} was submitted but its id could not be kept in {workdir}: {e}')
  return True


def run_local(points):
  """Runs the `(workdir, cmd)` points one after another; a SIGTERM or SIGINT goes to the
  running one, and the sweep waits for it and stops. Returns 128 + the signal's number,
  or 1 if one failed, after listing the failed points (workdir and exit status)."""
  got, child = [], None

  def forward(signum, _):
    got.append(signum)
    if child is not None:
      child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  failed, count = [], 0
  try:
    for workdir, cmd in points:
      if got:
        break
      print(f"==> {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
      child = subprocess.Popen(cmd)  # pylint: disable=consider-using-with
      count += 1
      status = child.wait()
      if status != 0:
        failed.append((workdir, status))
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if got:
    print(f'stopped by {signal.Signals(got[0]).name}', file=sys.stderr, flush=True)
    return 128 + got[0]
  if failed:
    print(f'{len(failed)} of {count} points failed:', file=sys.stderr)
    for workdir, status in failed:
      print(f'  {workdir}: {exit_text(status)}', file=sys.stderr)
    sys.stderr.flush()
  return 1 if failed else 0


def exit_text(status):
  """`exit status 1`, or `killed by SIGKILL` for a negative status."""
  if status < 0:
    try:
      return f'killed by {signal.Signals(-status).name}'
    except ValueError:
      pass
  return f'exit status {status}'


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    sys.exit(f'error: {message}')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  ours, extra = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (
      argv, [])
  p = _Parser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
  p.add_argument('--config', required=True)
  p.add_argument('--root', required=True, help='one workdir per run is made under it')
  p.add_argument('--set', type=parse_set, action='append', default=[], dest='settings',
                 metavar='KEY=V1,V2', help='a config key (or KEY1+KEY2: linked keys) and its '
                 'values (repeatable)')
  p.add_argument('--launcher', choices=['local', 'slurm', 'print'], default='local')
  p.add_argument('--dry_run', action='store_true', help='same as --launcher=print')
  args = p.parse_args(ours)
  problem = check(args.settings, extra) or unknown_key(args.config, args.settings, extra)
  if problem:
    sys.exit(f'error: {problem}')
  launcher = 'print' if args.dry_run else args.launcher
  runs = list(commands(args.config, args.root, args.settings, extra))
  if launcher == 'print':
    for _, cmd in runs:
      print(' '.join(shlex.quote(c) for c in cmd))
    return 0
  if launcher == 'slurm':
    return 1 if sum(not submit(workdir, cmd) for workdir, cmd in runs) else 0
  return run_local(runs)


if __name__ == '__main__':
  sys.exit(main())
