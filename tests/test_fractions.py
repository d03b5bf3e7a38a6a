"""Tests of case-level, nested label fractions."""

import math
import random

import numpy as np
import pytest

from bigssl_med.data import fractions
from bigssl_med.data import sources
from bigssl_med.errors import ConfigError


def _cases(num_cases=500, seed=0):
  """A random case -> records mapping with 1 to 4 records per case."""
  rng = random.Random(seed)
  case_ids = []
  for c in range(num_cases):
    case_ids += [f'patient{c:05d}'] * rng.randint(1, 4)
  rng.shuffle(case_ids)
  return sources.group_cases(case_ids), case_ids


def test_fractions_are_nested_and_case_level():
  cases, case_ids = _cases()
  previous = set()
  for fraction in (0.01, 0.1, 0.25, 0.5, 1.0):
    records = fractions.fraction_records(cases, fraction, seed=3)
    chosen = {case_ids[i] for i in records}
    assert len(chosen) == math.ceil(fraction * len(cases))
    # Every image of a chosen case is in, none of the others.
    assert sorted(records.tolist()) == sorted(
        i for i, c in enumerate(case_ids) if c in chosen)
    assert previous <= chosen
    previous = chosen
  assert len(previous) == len(cases)


def test_fraction_depends_on_seed_not_on_record_order():
  cases, case_ids = _cases()
  chosen = fractions.select_cases(list(cases), 0.1, seed=7)
  reordered = dict(reversed(list(cases.items())))
  assert fractions.select_cases(list(reordered), 0.1, seed=7) == chosen
  assert fractions.select_cases(list(cases), 0.1, seed=8) != chosen
  # Removing unchosen cases keeps the chosen ones first in rank order.
  order = fractions.case_order(list(cases), seed=7)
  assert order[:len(chosen)] == chosen


def test_fraction_matches_an_independent_sha256_ranking():
  import hashlib  # pylint: disable=g-import-not-at-top
  ids = [f'c{i}' for i in range(40)]
  expected = sorted(ids, key=lambda c: hashlib.sha256(
      f'11:{c}'.encode()).hexdigest())[:4]
  assert fractions.select_cases(ids, 0.1, seed=11) == expected


def test_draw_is_roughly_uniform_over_cases():
  ids = [f'c{i}' for i in range(50)]
  counts = np.zeros(50)
  for seed in range(400):
    for c in fractions.select_cases(ids, 0.2, seed):
      counts[int(c[1:])] += 1
  # Each case is drawn with p = 0.2: 80 expected of 400, sd ~8.
  assert counts.min() > 50 and counts.max() < 110


def test_tiny_fraction_keeps_at_least_one_case():
  assert len(fractions.select_cases(['a', 'b', 'c'], 0.01, seed=0)) == 1


@pytest.mark.parametrize('fraction', [0, -0.1, 1.5, 10, 'ten', None])
def test_bad_fraction_is_a_config_error(fraction):
  with pytest.raises(ConfigError, match='label fraction'):
    fractions.select_cases(['a'], fraction, seed=0)


def test_no_cases_is_a_config_error():
  with pytest.raises(ConfigError, match='no cases'):
    fractions.select_cases([], 0.5, seed=0)


def test_open_fraction_of_a_built_data_set(small_ham10000):
  data_dir, _ = small_ham10000
  full, all_groups = fractions.open_fraction('ham10000', 'train', data_dir, 1.0, seed=0)
  assert len(full) == sum(len(g) for g in all_groups)
  previous = set()
  for fraction in (0.05, 0.3, 0.6):
    subset, groups = fractions.open_fraction('ham10000', 'train', data_dir, fraction,
                                             seed=5)
    assert len(subset) == sum(len(g) for g in groups)
    assert len(groups) == math.ceil(fraction * len(all_groups))
    by_case = {}
    for group in groups:
      ids = {subset[int(i)]['case_id'] for i in group}
      assert len(ids) == 1  # A group is one case, whole.
      by_case[ids.pop()] = len(group)
    full_sizes = {full[int(g[0])]['case_id']: len(g) for g in all_groups}
    assert all(full_sizes[c] == n for c, n in by_case.items())
    assert previous <= set(by_case)
    previous = set(by_case)
    records = subset.__getitems__([0, len(subset) - 1])
    assert records[0]['image_id'] == subset[0]['image_id']


def test_holdout_matches_an_independent_hash_and_its_size():
  ids = [f'patient{i:05d}' for i in range(4000)]
  held = [c for c in ids if fractions.is_held_out(c, 0.1)]
  want = [c for c in ids
          if int(__import__('hashlib').sha256(f'holdout:{c}'.encode()).hexdigest()[:16], 16)
          < 0.1 * 2**64]
  assert held == want
  assert abs(len(held) / len(ids) - 0.1) < 0.02
  # Growing holdouts are nested, and a case's fate does not depend on the others.
  assert set(held) <= {c for c in ids if fractions.is_held_out(c, 0.2)}
  assert not any(fractions.is_held_out(c, 0.0) for c in ids)


@pytest.mark.parametrize('holdout', [-0.1, 1.0, 'ten', None])
def test_bad_holdout_is_a_config_error(holdout):
  with pytest.raises(ConfigError, match=r'^config.data.holdout must be a fraction of cases'):
    fractions.check_holdout(holdout)


def test_holdout_and_label_fractions_of_a_built_data_set(small_ham10000):
  data_dir, _ = small_ham10000
  full, all_groups = fractions.open_fraction('ham10000', 'train', data_dir, 1.0, seed=0)
  every_case = {full[int(g[0])]['case_id'] for g in all_groups}
  held = fractions.open_holdout('ham10000', 'train', data_dir, 0.2)
  held_cases = {r['case_id'] for r in held}
  assert held_cases == {c for c in every_case if fractions.is_held_out(c.decode(), 0.2)}
  assert len(held) == sum(len(g) for g in all_groups
                          if full[int(g[0])]['case_id'] in held_cases)  # whole cases
  previous = set()
  for fraction in (0.3, 1.0):
    subset, groups = fractions.open_fraction('ham10000', 'train', data_dir, fraction, seed=5,
                                             holdout=0.2)
    cases = {subset[int(g[0])]['case_id'] for g in groups}
    assert not cases & held_cases and previous <= cases
    assert len(cases) == math.ceil(fraction * len(every_case - held_cases))
    previous = cases
  assert previous == every_case - held_cases
  with pytest.raises(ConfigError, match='holds out 0 of the'):
    fractions.open_holdout('ham10000', 'train', data_dir, 1e-9)
