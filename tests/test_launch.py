"""The sweep launcher builds one main.py command per grid point, each with its workdir."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'launch'))
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top


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
