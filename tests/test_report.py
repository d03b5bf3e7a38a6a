"""The report on synthetic workdirs: statistics against NumPy/SciPy, files, CLI, errors."""

import csv
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
from PIL import Image
import pytest
from scipy import stats

from bigssl_med import report
from bigssl_med.errors import DataError

# ham10000 top1 per (init, label fraction), seeds 0, 1, 2. At 10% MICLe is best, SimCLR
# is close (p > 0.05) and scratch is far; at 100% SimCLR is best.
HAM = {
    ('scratch', 0.1): [0.50, 0.52, 0.51],
    ('simclr', 0.1): [0.60, 0.66, 0.63],
    ('micle', 0.1): [0.64, 0.65, 0.66],
    ('scratch', 1.0): [0.70, 0.71, 0.72],
    ('simclr', 1.0): [0.83, 0.84, 0.85],
    ('micle', 1.0): [0.80, 0.81, 0.805],
}
# chexpert auc_mean: supervised has a single seed at 1%.
CXR = {
    ('supervised', 0.01): [0.70],
    ('micle', 0.01): [0.75, 0.77, 0.76],
    ('supervised', 1.0): [0.85, 0.86, 0.84],
    ('micle', 1.0): [0.86, 0.87, 0.88],
}
CXR_NAMES = ['No Finding', 'Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema',
             'Pleural Effusion', 'Fracture']


def write_run(workdir, dataset, init, fraction, seed, value, *, metric='top1',
              trainer='finetune', predictions=None, **extra):
  os.makedirs(workdir, exist_ok=True)
  results = {'trainer': trainer, 'dataset': dataset, 'init': init,
             'label_fraction': fraction, 'seed': seed, 'primary_metric': metric,
             'validation': {metric: value + 0.01}, 'test': {metric: value, 'loss': 1 - value},
             **extra}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f)
  if predictions is not None:
    np.savez(os.path.join(workdir, 'test_predictions.npz'), **predictions)


def multiclass_predictions(seed, k=7, n=70):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % k
  logits = rng.normal(size=(n, k)) + 2 * np.eye(k)[labels]
  scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return {'scores': scores.astype(np.float32), 'labels': labels,
          'class_names': np.array(['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc'])}


def multilabel_predictions(seed, n=60):
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, len(CXR_NAMES))) < 0.4).astype(np.float32)
  scores = 1 / (1 + np.exp(-(rng.normal(size=labels.shape) + 1.5 * labels)))
  return {'scores': scores.astype(np.float32), 'labels': labels,
          'mask': rng.random(labels.shape) < 0.8, 'class_names': np.array(CXR_NAMES)}


@pytest.fixture
def runs_root(tmp_path):
  root = tmp_path / 'runs'
  for (init, fraction), values in HAM.items():
    for seed, value in enumerate(values):
      write_run(root / 'ham' / f'{init}_{fraction}_{seed}', 'ham10000', init, fraction,
                seed, value, predictions=multiclass_predictions(seed))
  for (init, fraction), values in CXR.items():
    for seed, value in enumerate(values):
      predictions = multilabel_predictions(seed) if fraction == 1.0 else None
      write_run(root / 'cxr' / init / f'{fraction}' / f'seed{seed}', 'chexpert', init,
                fraction, seed, value, metric='auc_mean', predictions=predictions)
  # Skipped: a pretraining run and a file without a trainer.
  (root / 'pretrain').mkdir()
  (root / 'pretrain' / 'results.json').write_text(json.dumps(
      {'trainer': 'pretrain', 'dataset': 'ham10000', 'step': 10}))
  (root / 'other').mkdir()
  (root / 'other' / 'results.json').write_text('{"step": 3}')
  return root


def expected_cells(table, lower_is_better=False):
  """{(init, fraction): (mean, std, is_best, p or None)} from NumPy and SciPy."""
  out = {}
  for fraction in sorted({f for _, f in table}):
    column = {init: np.array(v) for (init, f), v in table.items() if f == fraction}
    means = {init: v.mean() for init, v in column.items()}
    best = (min if lower_is_better else max)(means, key=means.get)
    for init, values in column.items():
      std = values.std(ddof=1) if len(values) > 1 else None
      p = None
      if init != best and len(values) > 1 and len(column[best]) > 1:
        p = stats.ttest_ind(values, column[best], equal_var=False).pvalue
      out[(init, fraction)] = (means[init], std, init == best, p)
  return out


def holm_by_hand(p_values):
  """Holm's adjustment as its definition reads: the i-th smallest of m p-values becomes
  max over j <= i of min(1, (m - j + 1) p_(j))."""
  order = np.argsort(p_values, kind='stable')
  m = len(p_values)
  scaled = np.minimum(1.0, (m - np.arange(m)) * np.asarray(p_values, np.float64)[order])
  out = np.empty(m)
  out[order] = np.maximum.accumulate(scaled)
  return list(out)


def expected_holm(expected):
  """{(init, fraction): (Holm p, comparisons)} of `expected_cells`'s p-values."""
  out = {}
  for fraction in {f for _, f in expected}:
    keys = [k for k in expected if k[1] == fraction and expected[k][3] is not None]
    for key, adjusted in zip(keys, holm_by_hand([expected[k][3] for k in keys])):
      out[key] = (adjusted, len(keys))
  return out


def test_collect(runs_root):
  runs = report.collect([str(runs_root)])
  assert len(runs) == 18 + 10
  assert {r['trainer'] for r in runs} == {'finetune'}
  # The same files through overlapping arguments count once.
  assert len(report.collect([str(runs_root), str(runs_root / 'ham')])) == 28
  assert report.collect([str(runs_root / 'other')]) == []


def test_summary_matches_numpy_and_scipy(runs_root):
  summary = report.summarize(report.collect([str(runs_root)]))
  for dataset, table in (('ham10000', HAM), ('chexpert', CXR)):
    expected = expected_cells(table)
    adjusted = expected_holm(expected)
    cells = [c for c in summary if c['dataset'] == dataset]
    assert len(cells) == len(table)
    for cell in cells:
      mean, std, is_best, p = expected[(cell['init'], cell['label_fraction'])]
      assert cell['metric'] == ('top1' if dataset == 'ham10000' else 'auc_mean')
      assert cell['values'] == table[(cell['init'], cell['label_fraction'])]
      assert cell['seeds'] == list(range(cell['n']))
      assert cell['mean'] == pytest.approx(mean, abs=1e-12)
      if std is None:
        assert cell['std'] is None
      else:
        assert cell['std'] == pytest.approx(std, abs=1e-12)
      assert cell['is_best'] == is_best
      if p is None:
        assert cell['p_value_vs_best'] is None
        assert not cell['equivalent_to_best']
      else:
        assert cell['p_value_vs_best'] == pytest.approx(p, rel=1e-12)
        p_holm, m = adjusted[(cell['init'], cell['label_fraction'])]
        assert cell['p_holm'] == pytest.approx(p_holm, rel=1e-12)
        assert cell['num_comparisons'] == m
        assert cell['equivalent_to_best'] == (p_holm > 0.05)
  # The case this data was built for: one cell equivalent to the best, some not.
  assert sum(c['equivalent_to_best'] for c in summary) >= 1
  assert sum(c['p_value_vs_best'] is not None and not c['equivalent_to_best']
             for c in summary) >= 1


def test_holm_against_values_by_hand():
  # Sorted 0.01, 0.03, 0.04: 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04).
  assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert report.holm([0.5, 0.6]) == [1.0, 1.0]  # 2 * 0.5 = 1, capped; then monotone
  assert report.holm([0.01, 0.01]) == pytest.approx([0.02, 0.02])
  assert report.holm([0.2, 0.01, 0.04, 0.03]) == pytest.approx([0.2, 0.04, 0.09, 0.09])
  assert report.holm([0.02]) == [0.02] and report.holm([]) == []
  rng = np.random.default_rng(0)
  for _ in range(20):
    p = list(rng.random(int(rng.integers(1, 7))) ** 3)
    assert report.holm(p) == pytest.approx(holm_by_hand(p), rel=1e-15)


# top1: at 10% micle is best, simclr is below it at raw p = 0.032 (Holm p = 0.064 over
# two comparisons), scratch close to it; at 100% there is no scratch row.
MULTIPLE = {
    ('scratch', 0.1): [0.79, 0.81, 0.80],
    ('simclr', 0.1): [0.76, 0.79, 0.77],
    ('micle', 0.1): [0.80, 0.82, 0.81],
    ('simclr', 1.0): [0.85, 0.86],
    ('micle', 1.0): [0.90, 0.91],
}


def _write_table(root, table):
  for (init, fraction), values in table.items():
    for seed, value in enumerate(values):
      write_run(root / f'{init}_{fraction}_{seed}', 'ham10000', init, fraction, seed, value)


def test_p_values_against_the_best_are_holm_adjusted(tmp_path):
  _write_table(tmp_path / 'runs', MULTIPLE)
  runs = report.collect([str(tmp_path / 'runs')])
  cells = {(c['init'], c['label_fraction']): c for c in report.summarize(runs)}
  best = MULTIPLE[('micle', 0.1)]
  p_simclr = stats.ttest_ind(MULTIPLE[('simclr', 0.1)], best, equal_var=False).pvalue
  p_scratch = stats.ttest_ind(MULTIPLE[('scratch', 0.1)], best, equal_var=False).pvalue
  assert p_simclr < 0.05 < 2 * p_simclr < p_scratch
  simclr, scratch = cells[('simclr', 0.1)], cells[('scratch', 0.1)]
  assert simclr['p_value_vs_best'] == pytest.approx(p_simclr, rel=1e-12)
  assert simclr['p_holm'] == pytest.approx(2 * p_simclr, rel=1e-12)
  assert scratch['p_holm'] == pytest.approx(p_scratch, rel=1e-12)
  assert simclr['num_comparisons'] == 2 and simclr['compared_with'] == 'micle'
  assert simclr['equivalent_to_best']  # by the adjusted p, not the raw one
  # One comparison: Holm's p is the raw one, and the table shows the raw p only.
  one = cells[('simclr', 1.0)]
  assert one['num_comparisons'] == 1 and one['p_holm'] == one['p_value_vs_best']
  report.write_report(runs, str(tmp_path / 'r.md'))
  text = (tmp_path / 'r.md').read_text()
  _, rows = _table_rows(text, 'ham10000: top1')
  assert rows['simclr'][0] == (f'0.773 ± 0.015 (n=3), p={p_simclr:.3f}, '
                               f'Holm p={2 * p_simclr:.3f} ≈')
  assert rows['simclr'][1] == f"0.855 ± 0.007 (n=2), {report.format_p(one['p_value_vs_best'])}"
  assert 'Holm p: p adjusted by Holm' in text
  assert "the column's best, chosen after seeing the data (a post hoc comparison" in text
  with open(tmp_path / 'r.csv', newline='') as f:
    found = {(r['init'], r['label_fraction']): r for r in csv.DictReader(f)}
  assert float(found[('simclr', '0.1')]['p_holm']) == pytest.approx(2 * p_simclr, rel=1e-12)
  assert found[('simclr', '0.1')]['equivalent_to_best'] == 'True'
  assert found[('micle', '0.1')]['p_holm'] == ''


def test_a_reference_row_named_in_advance(tmp_path, capsys):
  _write_table(tmp_path / 'runs', MULTIPLE)
  runs = report.collect([str(tmp_path / 'runs')])
  cells = {(c['init'], c['label_fraction']): c
           for c in report.summarize(runs, reference='scratch')}
  scratch = MULTIPLE[('scratch', 0.1)]
  p = {init: stats.ttest_ind(MULTIPLE[(init, 0.1)], scratch, equal_var=False).pvalue
       for init in ('simclr', 'micle')}
  micle, simclr = cells[('micle', 0.1)], cells[('simclr', 0.1)]
  assert micle['is_best'] and cells[('scratch', 0.1)]['is_reference']
  assert cells[('scratch', 0.1)]['p_value_vs_best'] is None
  assert micle['p_value_vs_best'] == pytest.approx(p['micle'], rel=1e-12)
  assert simclr['p_value_vs_best'] == pytest.approx(p['simclr'], rel=1e-12)
  assert [micle['p_holm'], simclr['p_holm']] == pytest.approx(
      holm_by_hand([p['micle'], p['simclr']]), rel=1e-12)
  assert micle['compared_with'] == 'scratch' and not micle['reference_missing']
  # 100% has no scratch row: against its best, said in the legend.
  full = cells[('simclr', 1.0)]
  assert full['compared_with'] == 'micle' and full['reference_missing']
  assert full['p_value_vs_best'] == pytest.approx(stats.ttest_ind(
      MULTIPLE[('simclr', 1.0)], MULTIPLE[('micle', 1.0)], equal_var=False).pvalue)
  out = tmp_path / 'r.md'
  assert report.main([str(tmp_path / 'runs'), '--out', str(out), '--reference', 'scratch']) == 0
  text = out.read_text()
  _, rows = _table_rows(text, 'ham10000: top1')
  assert rows['scratch'][0] == '0.800 ± 0.010 (n=3)'
  assert rows['micle'][0].startswith('**0.810 ± 0.010 (n=3)**, p=')
  assert ', Holm p=' in rows['micle'][0]
  assert ('against scratch, the reference row named before the analysis (--reference; the '
          'best, in bold, is chosen after seeing the data); in 100%, which has no scratch '
          "row, against the column's best") in text
  assert 'not significantly different from the reference' in text
  with open(tmp_path / 'r.csv', newline='') as f:
    assert {r['compared_with'] for r in csv.DictReader(f)} == {'scratch', 'micle'}
  # A reference that names no row (a typo) is an error, not a silent comparison with the best.
  assert report.main([str(tmp_path / 'runs'), '--out', str(out), '--reference', 'scrach']) == 2
  assert capsys.readouterr().err.strip().endswith(
      "--reference 'scrach' names no row; the rows are: 'micle', 'scratch', 'simclr'")


def _student_p(a, b):
  """Two-sided p of Student's two-sample t-test, written out in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  dof = len(a) + len(b) - 2
  pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / dof
  t = (a.mean() - b.mean()) / np.sqrt(pooled * (1 / len(a) + 1 / len(b)))
  return 2 * stats.t.sf(abs(t), dof)


def test_student_t_test_on_request(runs_root, tmp_path):
  runs = report.collect([str(runs_root)])
  welch = report.summarize(runs)
  student = report.summarize(runs, test='student')
  checked = 0
  for w, s in zip(welch, student):
    assert (w['row'], w['label_fraction'], w['mean']) == (s['row'], s['label_fraction'],
                                                          s['mean'])
    if s['p_value_vs_best'] is None:
      assert w['p_value_vs_best'] is None
      continue
    best = next(c for c in student if c['is_best'] and c['dataset'] == s['dataset']
                and c['label_fraction'] == s['label_fraction'])
    assert s['p_value_vs_best'] == pytest.approx(_student_p(s['values'], best['values']),
                                                 rel=1e-9)
    checked += 1
  assert checked and any(w['p_value_vs_best'] != s['p_value_vs_best']
                         for w, s in zip(welch, student))
  out = tmp_path / 'r.md'
  assert report.main([str(runs_root), '--out', str(out), '--test', 'student']) == 0
  assert "p: Student's two-sample t-test, pooled variance" in out.read_text()
  with pytest.raises(SystemExit):
    report.main([str(runs_root), '--out', str(out), '--test', 'paired'])


def test_summary_with_metric_and_lower_is_better(runs_root):
  runs = report.collect([str(runs_root / 'ham')])
  summary = report.summarize(runs, metric='loss')
  expected = expected_cells({k: [1 - v for v in vs] for k, vs in HAM.items()},
                            lower_is_better=True)
  for cell in summary:
    mean, _, is_best, p = expected[(cell['init'], cell['label_fraction'])]
    assert cell['metric'] == 'loss'
    assert cell['mean'] == pytest.approx(mean)
    assert cell['is_best'] == is_best
    assert (cell['p_value_vs_best'] is None) == (p is None)
  validation = report.summarize(runs, split='validation')
  assert validation[0]['split'] == 'validation'
  assert validation[0]['mean'] == pytest.approx(np.mean(HAM[('scratch', 0.1)]) + 0.01)


def _table_rows(text, heading):
  """{row label: [cells]} of the table under `## heading`."""
  lines = text[text.index(f'## {heading}\n'):].splitlines()
  rows = {}
  for line in lines[4:]:
    if not line.startswith('|'):
      break
    cells = [c.strip() for c in line.strip('|').split('|')]
    rows[cells[0]] = cells[1:]
  return lines[2], rows


def test_markdown_tables(runs_root, tmp_path):
  out = tmp_path / 'out' / 'report.md'
  paths = report.write_report(report.collect([str(runs_root)]), str(out))
  text = out.read_text()
  for dataset, metric, table in (('ham10000', 'top1', HAM), ('chexpert', 'auc_mean', CXR)):
    header, rows = _table_rows(text, f'{dataset}: {metric}')
    fractions = sorted({f for _, f in table})
    assert header == '| initialisation | ' + ' | '.join(
        f'{100 * f:g}%' for f in fractions) + ' |'
    inits = [i for i in ('scratch', 'supervised', 'simclr', 'micle')
             if any(k[0] == i for k in table)]
    assert list(rows) == inits
    expected = expected_cells(table)
    adjusted = expected_holm(expected)
    for (init, fraction), (mean, std, is_best, p) in expected.items():
      cell = rows[init][fractions.index(fraction)]
      body = f'{mean:.3f}' + (f' ± {std:.3f}' if std is not None else '')
      body += f' (n={len(table[(init, fraction)])})'
      if is_best:
        assert cell == f'**{body}**'
        continue
      p_text = report.format_p(p)
      p_holm, m = adjusted.get((init, fraction), (p, 1))
      if m >= 2:
        p_text += f', Holm {report.format_p(p_holm)}'
      assert cell == f'{body}, {p_text}' + (' ≈' if p is not None and p_holm > 0.05 else '')
  assert 'ham10000: top1' in text and 'Welch' in text and '≈: adjusted p > 0.05' in text
  assert "against the column's best, chosen after seeing the data" in text
  assert 'Spread between pretraining runs' not in text and '→' not in text
  assert text.count('| **') == 2 * 2  # One best per column, 2 columns per table.
  stem = str(tmp_path / 'out' / 'report')
  assert paths == [str(out), f'{stem}.csv', f'{stem}_label_efficiency_chexpert.png',
                   f'{stem}_roc_chexpert.png', f'{stem}_label_efficiency_ham10000.png',
                   f'{stem}_roc_ham10000.png']
  for path in paths[2:]:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with Image.open(path) as image:
      image.verify()


def test_csv_rows(runs_root, tmp_path):
  out = tmp_path / 'report.md'
  report.write_report(report.collect([str(runs_root)]), str(out))
  with open(tmp_path / 'report.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(HAM) + len(CXR)
  assert list(rows[0]) == list(report.CSV_COLUMNS)
  for row in rows:
    table = HAM if row['dataset'] == 'ham10000' else CXR
    fraction = float(row['label_fraction'])
    mean, std, is_best, p = expected_cells(table)[(row['init'], fraction)]
    values = [float(v) for v in row['values'].split(';')]
    assert values == table[(row['init'], fraction)]
    assert row['seeds'] == ';'.join(str(s) for s in range(len(values)))
    assert int(row['n']) == len(values)
    assert float(row['mean']) == pytest.approx(mean, abs=1e-12)
    assert row['std'] == ('' if std is None else row['std'])
    if std is not None:
      assert float(row['std']) == pytest.approx(std, abs=1e-12)
    assert row['is_best'] == str(is_best)
    assert row['p_value_vs_best'] == ('' if p is None else row['p_value_vs_best'])
    if p is not None:
      assert float(row['p_value_vs_best']) == pytest.approx(p, rel=1e-12)
    p_holm = expected_holm(expected_cells(table)).get((row['init'], fraction), (p, 1))[0]
    assert row['p_holm'] == ('' if p is None else row['p_holm'])
    if p is not None:
      assert float(row['p_holm']) == pytest.approx(p_holm, rel=1e-12)
    assert row['equivalent_to_best'] == str(p is not None and p_holm > 0.05)
    assert row['split'] == 'test' and row['trainer'] == 'finetune'


def test_mixed_trainers_get_separate_rows(tmp_path):
  for trainer, offset in (('finetune', 0.0), ('linear_eval', -0.1)):
    for seed in range(2):
      write_run(tmp_path / trainer / str(seed), 'ham10000', 'micle', 0.5, seed,
                0.8 + offset + 0.01 * seed, trainer=trainer)
  summary = report.summarize(report.collect([str(tmp_path)]))
  assert [c['row'] for c in summary] == ['micle (finetune)', 'micle (linear_eval)']


def test_runs_of_another_evaluation_protocol_get_a_table_of_their_own(tmp_path):
  """Per-study or frontal-only metrics never share a column with per-image ones."""
  protocols = {'image': {}, 'study': {'eval_unit': 'study', 'eval_reduce': 'max'},
               'frontal': {'views': 'frontal', 'eval_unit': 'image'},
               'both': {'views': 'frontal', 'eval_unit': 'study', 'eval_reduce': 'mean'}}
  for name, extra in protocols.items():
    for init, value in (('micle', 0.8), ('scratch', 0.7)):
      for seed in range(2):
        write_run(tmp_path / name / init / str(seed), 'chexpert', init, 0.1, seed,
                  value + 0.01 * seed, metric='auc_mean', **extra)
  summary = report.summarize(report.collect([str(tmp_path)]))
  assert sorted({c['dataset'] for c in summary}) == [
      'chexpert', 'chexpert (frontal)', 'chexpert (frontal; per study, mean)',
      'chexpert (per study, max)']
  assert all(c['n'] == 2 and c['row'] in ('micle', 'scratch') for c in summary)
  paths = report.write_report(report.collect([str(tmp_path)]), str(tmp_path / 'r.md'))
  assert f'{tmp_path}/r_label_efficiency_chexpert_per_study_max_.png' in paths


def test_eval_reduce_of_per_image_runs_is_no_setting(tmp_path):
  """Images are not combined per image: task.eval_reduce does not tell runs apart."""
  for seed, reduce in enumerate(('max', 'mean', '', 'max')):
    workdir = tmp_path / str(seed)
    write_run(workdir, 'chexpert', 'micle', 0.1, seed, 0.8, metric='auc_mean')
    (workdir / 'config.json').write_text(json.dumps(
        {'trainer': 'finetune', 'task': {'eval_unit': 'image', 'eval_reduce': reduce}}))
  summary = report.summarize(report.collect([str(tmp_path)]))
  assert [(c['row'], c['n']) for c in summary] == [('micle', 4)]


def test_no_predictions_skips_roc(tmp_path, caplog):
  write_run(tmp_path / 'a', 'ham10000', 'micle', 1.0, 0, 0.8)
  with caplog.at_level('INFO'):
    paths = report.write_report(report.collect([str(tmp_path)]), str(tmp_path / 'r.md'))
  assert [os.path.basename(p) for p in paths] == ['r.md', 'r.csv',
                                                   'r_label_efficiency_ham10000.png']
  assert 'No test_predictions.npz for ham10000' in caplog.text
  assert '0.800 (n=1)' in (tmp_path / 'r.md').read_text()


def test_binary_roc_and_bad_predictions(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.arange(40) % 2
  write_run(tmp_path / 'a', 'pcam', 'micle', 1.0, 0, 0.9, metric='auc', predictions={
      'scores': rng.random((40, 2)), 'labels': labels})
  curves = report.roc_curves(str(tmp_path / 'a' / 'test_predictions.npz'))
  assert [c[0] for c in curves] == ['positive class']
  write_run(tmp_path / 'b', 'pcam', 'simclr', 1.0, 0, 0.9, metric='auc', predictions={
      'scores': rng.random((40, 2))})
  with pytest.raises(DataError, match=r"b/test_predictions.npz: missing key 'labels'"):
    report.write_report(report.collect([str(tmp_path)]), str(tmp_path / 'r.md'))


def test_multiclass_roc_legend_says_micro_auc(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  write_run(tmp_path / 'a', 'derm', 'micle', 1.0, 0, 0.9, metric='auc_macro', predictions={
      'scores': rng.random((60, 3)), 'labels': np.arange(60) % 3})
  figures = []
  figure = report._figure  # pylint: disable=protected-access
  monkeypatch.setattr(report, '_figure', lambda n: figures.append(figure(n)) or figures[-1])
  report.write_report(report.collect([str(tmp_path)]), str(tmp_path / 'r.md'))
  (ax,) = figures[-1][1]
  assert ax.get_title() == 'derm: micro-averaged one-vs-rest'
  assert [t.get_text().split(': ', 1)[1][:10] for t in ax.get_legend().get_texts()] == [
      'micro-AUC ']


def test_label_efficiency_plot_says_what_its_bars_are_and_shows_n(runs_root, tmp_path,
                                                                   monkeypatch):
  figures = []
  figure = report._figure  # pylint: disable=protected-access
  monkeypatch.setattr(report, '_figure', lambda n: figures.append(figure(n)) or figures[-1])
  cells = report.summarize(report.collect([str(runs_root / 'cxr')]))
  report.plot_label_efficiency(cells, str(tmp_path / 'p.png'))
  (ax,) = figures[-1][1]
  assert ax.get_ylabel() == 'auc_mean (test), mean ± SD over runs'
  assert sorted(t.get_text() for t in ax.texts) == ['n=1', 'n=3', 'n=3', 'n=3']
  # supervised at 1% has one run: a hollow marker, and no error bar there.
  hollow = [line for line in ax.lines if line.get_markerfacecolor() == 'none']
  assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [0.01]
  assert list(hollow[0].get_ydata()) == [0.70]
  bars = [c for c in ax.containers if hasattr(c, 'has_yerr') and c.has_yerr]
  assert sorted(len(c.lines[2][0].get_segments()) for c in bars) == [1, 2]
  assert 'hollow: n=1' in ax.get_legend().get_title().get_text()


def test_title_names_the_trainer_and_linear_evaluation_says_what_scratch_is(tmp_path):
  for trainer in ('linear_eval', 'segment'):
    for init in ('scratch', 'micle'):
      for seed in range(2):
        write_run(tmp_path / trainer / init / str(seed), 'pneumoniamnist', init, 1.0, seed,
                  0.8 + seed / 100, trainer=trainer)
  titles = {}
  for case in ('linear_eval', 'segment', ''):
    out = tmp_path / f'{case or "mixed"}.md'
    report.write_report(report.collect([str(tmp_path / case)]), str(out))
    titles[case] = out.read_text()
  assert titles['linear_eval'].startswith('# Linear evaluation results (test split)\n')
  assert titles['segment'].startswith('# Segmentation results (test split)\n')
  assert titles[''].startswith('# Results (test split)\n')
  assert ('scratch (linear evaluation): a frozen, randomly initialised encoder under a '
          'trained linear layer') in titles['linear_eval']
  assert 'frozen, randomly initialised' not in titles['segment']
  assert report.title([{'trainer': 'finetune'}]) == 'Fine-tuning results'
  assert report.title([{'trainer': 'distill'}]) == 'Distillation results'
  assert report.title([{'trainer': 'other'}]) == 'Results'


def test_column_headers_give_the_labelled_cases_and_images(tmp_path):
  counts = {0.1: [{'labelled_cases': 22, 'labelled_images': 47}] * 2,
            0.5: [{'labelled_images': 400}, {'labelled_images': 400}],  # older: images only
            0.25: [{'labelled_cases': 50, 'labelled_images': 100},
                   {'labelled_cases': 50, 'labelled_images': 101}],  # runs that disagree
            1.0: [{}, {}]}
  for fraction, extras in counts.items():
    for seed, extra in enumerate(extras):
      write_run(tmp_path / f'{fraction}' / str(seed), 'nih', 'micle', fraction, seed, 0.5,
                **extra)
  report.write_report(report.collect([str(tmp_path)]), str(tmp_path / 'r.md'))
  header, _ = _table_rows((tmp_path / 'r.md').read_text(), 'nih: top1')
  assert header == ('| initialisation | 10% (22 cases, 47 images) | 25% (50 cases) | '
                    '50% (400 images) | 100% |')


def test_cells_on_one_draw_of_the_labelled_cases_say_so(tmp_path):
  for fraction in (0.1, 1.0):
    for seed in range(3):
      write_run(tmp_path / 'one' / f'{fraction}' / str(seed), 'ham10000', 'micle', fraction,
                seed, 0.8 + seed / 100, fraction_seed=0)
      write_run(tmp_path / 'linked' / f'{fraction}' / str(seed), 'ham10000', 'micle',
                fraction, seed, 0.8 + seed / 100, fraction_seed=seed)
  report.write_report(report.collect([str(tmp_path / 'one')]), str(tmp_path / 'one.md'))
  text = (tmp_path / 'one.md').read_text()
  assert ('In the columns 10% (fraction_seed 0), the runs of a cell share one draw of the '
          'labelled cases: the std and p cover the training seeds on that draw') in text
  assert '`launch/sweep.py --set seed+data.fraction_seed=0,1,2`' in text
  report.write_report(report.collect([str(tmp_path / 'linked')]), str(tmp_path / 'l.md'))
  assert 'one draw of the labelled cases' not in (tmp_path / 'l.md').read_text()


def test_main_exit_0(runs_root, tmp_path, capsys):
  out = tmp_path / 'cli' / 'summary.md'
  assert report.main([str(runs_root / 'ham'), str(runs_root / 'cxr'), '--out', str(out),
                      '--metric', 'loss']) == 0
  printed = capsys.readouterr().out.split()
  assert printed[0] == str(out) and os.path.isfile(tmp_path / 'cli' / 'summary.csv')
  assert '## ham10000: loss' in out.read_text()


def test_a_pretraining_workdir_among_others_is_named_in_a_warning(tmp_path, caplog):
  write_run(tmp_path / 'ft', 'ham10000', 'micle', 1.0, 0, 0.8)
  write_run(tmp_path / 'pre', 'ham10000', 'micle', 1.0, 0, 0.8, trainer='pretrain')
  with caplog.at_level('WARNING'):
    runs = report.collect([str(tmp_path / 'ft'), str(tmp_path / 'pre')])
  assert len(runs) == 1
  assert f'{tmp_path / "pre"}: holds only results the report leaves out' in caplog.text
  assert f'{tmp_path / "ft"}:' not in caplog.text


def test_cli_empty_dir_exits_2(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'bigssl_med.report', str(empty), '--out',
       str(tmp_path / 'r.md')], capture_output=True, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2
  assert result.stderr.startswith('error: no results.json of a fine-tuning run under')
  assert len(result.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / 'r.md')


def test_missing_dir_exits_2(tmp_path, capsys):
  assert report.main([str(tmp_path / 'nope')]) == 2
  assert capsys.readouterr().err.strip() == f'error: {tmp_path / "nope"} does not exist'


def test_malformed_results_name_file(tmp_path, capsys):
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'results.json').write_text('{"trainer": "finetune", ')
  assert report.main([str(tmp_path), '--out', str(tmp_path / 'r.md')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {bad / "results.json"}: not valid JSON')
  assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('drop, match', [
    ('init', "missing key 'init'"),
    ('test', "missing key 'test'"),
])
def test_missing_keys_name_file_and_key(tmp_path, drop, match):
  write_run(tmp_path / 'a', 'ham10000', 'micle', 0.1, 0, 0.8)
  path = tmp_path / 'a' / 'results.json'
  results = json.loads(path.read_text())
  del results[drop]
  path.write_text(json.dumps(results))
  with pytest.raises(DataError, match=re.escape(f'{path}: {match}')):
    report.summarize(report.collect([str(tmp_path)]))


def test_bad_values_and_duplicates(tmp_path):
  write_run(tmp_path / 'a', 'ham10000', 'micle', 10, 0, 0.8)
  with pytest.raises(DataError, match=r"'label_fraction' must be a number in \(0, 1\]"):
    report.collect([str(tmp_path)])
  write_run(tmp_path / 'a', 'ham10000', 'micle', 0.1, 0, 0.8)
  write_run(tmp_path / 'b', 'ham10000', 'micle', 0.1, 0, 0.7)
  with pytest.raises(DataError, match='are the same run'):
    report.collect([str(tmp_path)])
  with pytest.raises(DataError, match=r"missing key 'test.auc'"):
    report.summarize(report.collect([str(tmp_path / 'a')]), metric='auc')


def _write_config(workdir, **settings):
  """A config.json as a run's workdir has it: nested keys from dotted `a__b` names."""
  config = {'trainer': 'finetune', 'seed': 0, 'data': {'data_dir': '/data'},
            'task': {'uncertain': 'ones', 'blank': 'zeros'}, 'num_epochs': 30.0}
  for dotted, value in settings.items():
    node = config
    *parents, leaf = dotted.split('__')
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  (workdir / 'config.json').write_text(json.dumps(config))


def test_runs_that_differ_in_a_setting_get_a_row_each(tmp_path):
  values = {('ones', 0.1): [0.70, 0.72], ('zeros', 0.1): [0.60, 0.64],
            ('ones', 1.0): [0.80, 0.82], ('zeros', 1.0): [0.78, 0.80]}
  for (policy, fraction), found in values.items():
    for seed, value in enumerate(found):
      workdir = tmp_path / policy / f'{fraction}' / f'seed={seed}'
      write_run(workdir, 'chexpert', 'micle', fraction, seed, value, metric='auc_mean')
      # Seeds, data paths and epochs per label fraction are not settings under study.
      _write_config(workdir, task__uncertain=policy, seed=seed,
                    data__data_dir=f'/disk{seed}', num_epochs=10.0 / fraction)
  for seed, value in enumerate([0.5, 0.52]):  # one policy only: no variant
    workdir = tmp_path / 'scratch' / f'seed={seed}'
    write_run(workdir, 'chexpert', 'scratch', 0.1, seed, value, metric='auc_mean')
    _write_config(workdir, seed=seed)
  runs = report.collect([str(tmp_path)])
  summary = report.summarize(runs)
  rows = {(c['row'], c['label_fraction']): c for c in summary}
  assert sorted(rows) == [('micle (task.uncertain=ones)', 0.1),
                          ('micle (task.uncertain=ones)', 1.0),
                          ('micle (task.uncertain=zeros)', 0.1),
                          ('micle (task.uncertain=zeros)', 1.0), ('scratch', 0.1)]
  for (policy, fraction), found in values.items():
    cell = rows[(f'micle (task.uncertain={policy})', fraction)]
    assert cell['variant'] == f'task.uncertain={policy}'
    assert cell['mean'] == pytest.approx(np.mean(found))
    assert cell['n'] == 2
  assert rows[('micle (task.uncertain=zeros)', 0.1)]['p_value_vs_best'] == pytest.approx(
      stats.ttest_ind([0.60, 0.64], [0.70, 0.72], equal_var=False).pvalue)
  report.write_report(runs, str(tmp_path / 'r.md'))
  assert '| micle (task.uncertain=zeros) |' in (tmp_path / 'r.md').read_text()
  with open(tmp_path / 'r.csv') as f:
    assert {row['variant'] for row in csv.DictReader(f)} == {
        '', 'task.uncertain=ones', 'task.uncertain=zeros'}


def test_a_run_without_config_json_among_variants_gets_a_row_of_its_own(tmp_path, caplog):
  for lr, found in ((0.1, [0.81, 0.82, 0.83]), (0.3, [0.83, 0.84, 0.835])):
    for seed, value in enumerate(found):
      workdir = tmp_path / f'lr={lr}' / f'seed={seed}'
      write_run(workdir, 'ham10000', 'micle', 1.0, seed, value)
      _write_config(workdir, seed=seed, optimizer__learning_rate=lr)
  lost = tmp_path / 'lr=0.3' / 'seed=2'
  (lost / 'config.json').unlink()  # its settings are unknown: either row could be its own
  (lost / 'results.json').write_text(
      (lost / 'results.json').read_text().replace('0.835', '0.85'))
  with caplog.at_level('WARNING'):
    summary = report.summarize(report.collect([str(tmp_path)]))
  rows = {c['row']: c for c in summary}
  assert sorted(rows) == ['micle (optimizer.learning_rate=0.1)',
                          'micle (optimizer.learning_rate=0.3)',
                          'micle (settings unknown: no readable config.json)']
  assert rows['micle (optimizer.learning_rate=0.3)']['n'] == 2
  assert rows['micle (settings unknown: no readable config.json)']['values'] == [0.85]
  assert f'get a row "(settings unknown: no readable config.json)" of their own: {lost}' in (
      caplog.text)
  # Where no setting is under study, such a run pools with the others, unsaid.
  caplog.clear()
  with caplog.at_level('WARNING'):
    (cell,) = report.summarize(report.collect([str(tmp_path / 'lr=0.3')]))
  assert (cell['row'], cell['n']) == ('micle', 3) and not caplog.text


def test_runs_from_before_a_key_existed_pool_with_runs_at_its_default(tmp_path):
  for seed in range(4):
    workdir = tmp_path / f'seed={seed}'
    write_run(workdir, 'ham10000', 'micle', 1.0, seed, 0.7 + seed / 100)
    if seed < 2:  # written before augment.* and optimizer.schedule existed
      _write_config(workdir, seed=seed)
    else:
      _write_config(workdir, seed=seed, augment__rotation_deg=0.0, augment__blur_p=0.0,
                    optimizer__schedule='cosine')
  (cell,) = report.summarize(report.collect([str(tmp_path)]))
  assert (cell['row'], cell['n']) == ('micle', 4)


def test_unfinished_runs_are_named_in_a_warning(tmp_path, caplog):
  for seed in range(3):
    write_run(tmp_path / f'seed={seed}', 'ham10000', 'micle', 1.0, seed, 0.8)
    _write_config(tmp_path / f'seed={seed}')
  (tmp_path / 'seed=2' / 'results.json').unlink()  # crashed before it finished
  (tmp_path / 'pretrain').mkdir()
  (tmp_path / 'pretrain' / 'config.json').write_text('{"trainer": "pretrain"}')
  (tmp_path / 'imported').mkdir()  # bigssl_med.convert's workdir, beside the runs it starts
  (tmp_path / 'imported' / 'config.json').write_text('{"trainer": "imported"}')
  with caplog.at_level('WARNING'):
    runs = report.collect([str(tmp_path)])
  assert len(runs) == 2
  assert ('Left out, with a config.json but no results.json (unfinished or failed runs): '
          f'{tmp_path / "seed=2"}\n') in caplog.text


def test_left_out_runs_are_listed_in_the_report(tmp_path):
  for fraction in (0.1, 1.0):
    for seed in range(3):
      workdir = tmp_path / f'{fraction}' / f'seed={seed}'
      write_run(workdir, 'ham10000', 'micle', fraction, seed, 0.8 + seed / 100)
      _write_config(workdir, seed=seed, dataset='ham10000', init='micle',
                    data__label_fraction=fraction)
  (tmp_path / '0.1' / 'seed=2' / 'results.json').unlink()  # stopped before it finished
  for seed in range(2):  # a whole column failed
    workdir = tmp_path / '0.01' / f'seed={seed}'
    workdir.mkdir(parents=True)
    _write_config(workdir, seed=seed, dataset='ham10000', init='', init_from='',
                  data__label_fraction=0.01)
  (tmp_path / 'bare').mkdir()  # a config.json with little in it
  (tmp_path / 'bare' / 'config.json').write_text('{"trainer": "finetune"}')
  left_out = []
  runs = report.collect([str(tmp_path), str(tmp_path / '0.01')], left_out)
  assert len(runs) == 5
  assert [e['workdir'] for e in left_out] == [
      str(tmp_path / '0.01' / 'seed=0'), str(tmp_path / '0.01' / 'seed=1'),
      str(tmp_path / '0.1' / 'seed=2'), str(tmp_path / 'bare')]
  assert left_out[2]['config'] == {'trainer': 'finetune', 'dataset': 'ham10000',
                                   'init': 'micle', 'data.label_fraction': 0.1, 'seed': 2}
  assert left_out[3]['config'] == {'trainer': 'finetune'}
  out = tmp_path / 'r.md'
  assert report.main([str(tmp_path), '--out', str(out)]) == 0
  text = out.read_text()
  assert ('\n5 finished runs; 4 left out (no results.json: unfinished or failed), listed at '
          'the end.\n') in text
  section = text[text.index('## Left out: no results.json (unfinished or failed runs)'):]
  assert ('Columns with left-out runs and no finished run, so missing from the tables: '
          'ham10000 1% (2 left out).') in section
  assert (f"- `{tmp_path / '0.01' / 'seed=1'}`: trainer=finetune, dataset=ham10000, "
          "init_from='' (random weights), data.label_fraction=0.01, seed=1\n") in section
  assert (f"- `{tmp_path / '0.1' / 'seed=2'}`: trainer=finetune, dataset=ham10000, "
          'init=micle, data.label_fraction=0.1, seed=2\n') in section
  assert f"- `{tmp_path / 'bare'}`: trainer=finetune\n" in section
  # Nothing left out: the count as before, and no section.
  assert report.main([str(tmp_path / '1.0'), '--out', str(out)]) == 0
  assert '\n3 runs.\n' in out.read_text() and 'Left out' not in out.read_text()


def test_settings_that_differ_along_a_row_or_between_rows_are_noted(tmp_path):
  depth = {('scratch', 0.1): 18, ('scratch', 1.0): 34, ('micle', 0.1): 18, ('micle', 1.0): 18}
  for (init, fraction), value in depth.items():
    for seed in range(2):
      workdir = tmp_path / init / f'{fraction}' / str(seed)
      write_run(workdir, 'ham10000', init, fraction, seed, 0.7 + seed / 100)
      _write_config(workdir, seed=seed, model__depth=value, num_epochs=3.0 / fraction,
                    init_from='' if init == 'scratch' else '/runs/micle',
                    data__label_fraction=fraction)
  runs = report.collect([str(tmp_path)])
  cells = report.summarize(runs)
  assert [c['row'] for c in cells] == ['scratch', 'scratch', 'micle', 'micle']  # no refusal
  notes = '\n'.join(report.settings_notes(cells))
  assert ('Settings that differ between the columns of a row (config.json; the row, and its '
          'line in the plot, joins runs of these settings):\n\n'
          '- scratch: model.depth 18 (10%), 34 (100%)\n') in notes
  assert '- micle: model.depth' not in notes
  assert ('(usually set per label fraction on purpose):\n\n'
          '- scratch: num_epochs 30.0 (10%), 3.0 (100%)\n'
          '- micle: num_epochs 30.0 (10%), 3.0 (100%)\n') in notes
  # Between rows: the depth at 100%, not init_from, nor the epochs (alike in each column).
  assert ('Settings that differ between rows, besides the initialisation (init, init_from, '
          'teacher) and the settings in the row labels:\n\n'
          '- model.depth: scratch 18/34; micle 18\n') in notes
  assert 'init_from' not in notes.split('row labels:')[1] and notes.count('- ') == 4
  report.write_report(runs, str(tmp_path / 'r.md'))
  assert '- scratch: model.depth 18 (10%), 34 (100%)' in (tmp_path / 'r.md').read_text()
  # A setting the rows are split by is in their labels, not in the notes.
  for lr in (0.1, 0.3):
    for seed in range(2):
      workdir = tmp_path / 'lr' / str(lr) / str(seed)
      write_run(workdir, 'chexpert', 'micle', 1.0, seed, 0.8, metric='auc_mean')
      _write_config(workdir, seed=seed, optimizer__learning_rate=lr)
  cells = report.summarize(report.collect([str(tmp_path / 'lr')]))
  assert len(cells) == 2 and report.settings_notes(cells) == []


def test_same_settings_are_still_the_same_run(tmp_path):
  for name in ('a', 'b'):
    write_run(tmp_path / name, 'ham10000', 'micle', 0.1, 0, 0.8)
    _write_config(tmp_path / name, data__num_workers=4 if name == 'a' else 8)
  with pytest.raises(DataError, match='are the same run .* and the same settings'):
    report.collect([str(tmp_path)])


def test_same_run_with_an_unreadable_config_says_so(tmp_path):
  for name in ('a', 'b'):
    write_run(tmp_path / name, 'ham10000', 'micle', 0.1, 0, 0.8)
    _write_config(tmp_path / name, total_steps=20 if name == 'a' else 40)
  (tmp_path / 'a' / 'config.json').write_text('{"trainer": "fine')
  with pytest.raises(DataError, match=r'are the same run .* settings that cannot be compared: '
                     rf'no readable config.json in {tmp_path / "a"}\)$'):
    report.collect([str(tmp_path)])


def test_undefined_values_are_left_out_and_counted(tmp_path):
  for seed, value in enumerate([0.8, None, 0.7]):
    write_run(tmp_path / 'micle' / str(seed), 'ham10000', 'micle', 1.0, seed, 0.0)
    path = tmp_path / 'micle' / str(seed) / 'results.json'
    results = json.loads(path.read_text())
    results['test']['top1'] = value
    path.write_text(json.dumps(results))
  for seed, value in enumerate([0.5, 0.52]):
    write_run(tmp_path / 'scratch' / str(seed), 'ham10000', 'scratch', 1.0, seed, value)
  runs = report.collect([str(tmp_path)])
  micle = next(c for c in report.summarize(runs) if c['init'] == 'micle')
  assert (micle['n'], micle['num_undefined']) == (2, 1)
  assert micle['mean'] == pytest.approx(0.75)
  assert micle['std'] == pytest.approx(np.std([0.8, 0.7], ddof=1))
  assert micle['is_best']
  report.write_report(runs, str(tmp_path / 'r.md'))
  text = (tmp_path / 'r.md').read_text()
  assert '**0.750 ± 0.071 (n=2, 1 NaN)**' in text
  assert 'K NaN: K runs whose value is undefined' in text
  assert report.format_p(float('nan')) == 'p=n/a'


def test_constant_samples_give_no_p_value_and_tied_means_are_both_best(tmp_path, capsys):
  # 0.7 is not a binary fraction: scipy's t-test of two constant samples then divides
  # a difference by rounding noise and answers p ~ 1e-30.
  for init, found in (('micle', [0.75] * 3), ('scratch', [0.7] * 3), ('simclr', [0.5] * 3)):
    for seed, value in enumerate(found):
      write_run(tmp_path / init / str(seed), 'ham10000', init, 1.0, seed, value)
  cells = {c['init']: c for c in report.summarize(report.collect([str(tmp_path)]))}
  assert cells['micle']['is_best'] and np.isnan(cells['scratch']['p_value_vs_best'])
  assert np.isnan(report.p_value([0.7] * 3, [0.75] * 3))
  assert np.isnan(report.p_value([0.7] * 3, [0.7] * 3, 'student'))
  with warnings.catch_warnings():  # scipy's notice for a sample without spread
    warnings.simplefilter('ignore')
    want = stats.ttest_ind([0.5] * 3, [0.75, 0.76, 0.74], equal_var=False).pvalue
  assert report.p_value([0.5] * 3, [0.75, 0.76, 0.74]) == pytest.approx(want)
  # One set of scores in another order: means that differ in the last bits, both best.
  for init, found in (('micle', [0.1, 0.2, 0.3]), ('simclr', [0.3, 0.2, 0.1])):
    for seed, value in enumerate(found):
      write_run(tmp_path / 'tie' / init / str(seed), 'ham10000', init, 1.0, seed, value)
  cells = report.summarize(report.collect([str(tmp_path / 'tie')]))
  assert cells[0]['mean'] != cells[1]['mean']
  assert all(c['is_best'] for c in cells)
  assert report.main([str(tmp_path / 'tie'), '--out', str(tmp_path / 'r.md')]) == 0
  assert (tmp_path / 'r.md').read_text().count('**0.200 ± 0.100 (n=3)**') == 2


def test_the_run_count_includes_undefined_values(tmp_path):
  for seed, value in enumerate([0.8, None, float('nan')]):
    write_run(tmp_path / str(seed), 'ham10000', 'micle', 1.0, seed, 0.0)
    path = tmp_path / str(seed) / 'results.json'
    results = json.loads(path.read_text())
    results['test']['top1'] = value
    path.write_text(json.dumps(results))
  report.write_report(report.collect([str(tmp_path)]), str(tmp_path / 'r.md'))
  assert '\n3 runs.\n' in (tmp_path / 'r.md').read_text()


def test_data_sets_whose_names_sanitise_alike_get_a_plot_each(tmp_path):
  assert report.file_names(['image_cases/derm', 'ham10000']) == ['image_cases_derm', 'ham10000']
  names = report.file_names(['dérm', 'dörm'])
  assert len(set(names)) == 2 and all(re.fullmatch(r'd_rm_[0-9a-f]{8}', n) for n in names)
  for dataset in ('dérm', 'dörm'):
    write_run(tmp_path / dataset, dataset, 'micle', 1.0, 0, 0.8)
  paths = report.write_report(report.collect([str(tmp_path)]), str(tmp_path / 'out' / 'r.md'))
  plots = [p for p in paths if '_label_efficiency_' in p]
  assert len(set(plots)) == 2 and all(os.path.isfile(p) for p in plots)


@pytest.mark.parametrize('digits', ['-1', '16', 'two'])
def test_bad_digits_is_a_one_line_error(runs_root, tmp_path, digits):
  result = subprocess.run(
      [sys.executable, '-m', 'bigssl_med.report', str(runs_root / 'ham'), '--out',
       str(tmp_path / 'r.md'), '--digits', digits], capture_output=True, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2
  assert ': error: argument --digits: ' in result.stderr.strip().splitlines()[-1], result.stderr
  assert 'Traceback' not in result.stderr and not os.path.exists(tmp_path / 'r.md')


def test_means_over_fewer_classes_are_marked(tmp_path):
  for seed, classes in enumerate([3, 2]):
    write_run(tmp_path / str(seed), 'chexpert', 'micle', 1.0, seed, 0.8, metric='auc_mean',
              shift={'dataset': 'nih_chest_xray14',
                     'metrics': {'auc_mean': 0.7, 'auc_mean_classes': 3,
                                 'auc_mean_of_classes': 3}})
    path = tmp_path / str(seed) / 'results.json'
    results = json.loads(path.read_text())
    results['test'].update(auc_mean_classes=classes, auc_mean_of_classes=3)
    path.write_text(json.dumps(results))
  runs = report.collect([str(tmp_path)])
  cells = report.summarize(runs)
  assert [(c['shifted'], c['num_fewer_classes']) for c in cells] == [(False, 1), (True, 0)]
  report.write_report(runs, str(tmp_path / 'r.md'))
  text = (tmp_path / 'r.md').read_text()
  assert '**0.800 ± 0.000 (n=2)†**' in text and '**0.700 ± 0.000 (n=2)** |' in text
  assert '†: in some runs the mean is over fewer classes than asked' in text


def test_predictions_with_and_without_record_ids_give_the_same_curves(tmp_path):
  """Fine-tuning writes each row's image_id and case_id; files from before lack them."""
  old = multiclass_predictions(0)
  ids = {'image_id': np.array([f'ISIC_{i:07d}' for i in range(len(old['labels']))]),
         'case_id': np.array([f'HAM_{i // 2:07d}' for i in range(len(old['labels']))])}
  write_run(tmp_path / 'old', 'ham10000', 'micle', 1.0, 0, 0.8, predictions=old)
  write_run(tmp_path / 'new', 'ham10000', 'micle', 1.0, 1, 0.8, predictions={**old, **ids})
  (before,), (after,) = (report.roc_curves(str(tmp_path / run / 'test_predictions.npz'))
                         for run in ('old', 'new'))
  assert before[0] == after[0] == report.MICRO_AVERAGED
  np.testing.assert_array_equal(before[1], after[1])
  np.testing.assert_array_equal(before[2], after[2])
  paths = report.write_report(report.collect([str(tmp_path)]), str(tmp_path / 'r.md'))
  assert os.path.basename(paths[-1]) == 'r_roc_ham10000.png'


def _predictions_file(tmp_path, name, content):
  write_run(tmp_path / name, 'pcam', name, 1.0, 0, 0.9, metric='auc')
  path = tmp_path / name / 'test_predictions.npz'
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    np.savez(path, **content)
  return path


def test_unreadable_predictions_are_one_line_errors(tmp_path, capsys):
  good = _predictions_file(tmp_path / 'cut', 'micle', {'scores': np.zeros((4, 2)),
                                                       'labels': np.arange(4) % 2})
  good.write_bytes(good.read_bytes()[:100])
  _predictions_file(tmp_path / 'empty', 'micle', b'')
  for case in ('cut', 'empty'):
    assert report.main([str(tmp_path / case), '--out', str(tmp_path / f'{case}.md')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {tmp_path / case / "micle" / "test_predictions.npz"}: '
                          'cannot be read as .npz')
    assert len(err.strip().splitlines()) == 1


def test_predictions_without_both_classes_give_no_roc(tmp_path, capsys):
  _predictions_file(tmp_path / 'binary', 'micle', {'scores': np.full((4, 2), 0.5),
                                                   'labels': np.ones(4, np.int64)})
  _predictions_file(tmp_path / 'multilabel', 'micle', {'scores': np.full((4, 3), 0.5),
                                                       'labels': np.zeros((4, 3))})
  for case in ('binary', 'multilabel'):
    out = tmp_path / f'{case}.md'
    assert report.main([str(tmp_path / case), '--out', str(out)]) == 0
    assert out.is_file() and not (tmp_path / f'{case}_roc_pcam.png').exists()


def test_out_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
  write_run(tmp_path / 'a', 'ham10000', 'micle', 1.0, 0, 0.8)
  (tmp_path / 'out.md').mkdir()
  assert report.main([str(tmp_path / 'a'), '--out', str(tmp_path / 'out.md')]) == 2
  err = capsys.readouterr().err
  assert err.strip() == f'error: cannot write {tmp_path / "out.md"}: Is a directory'


def test_percent():
  assert [report.percent(f) for f in (0.01, 0.1, 0.005, 1.0, 0.25)] == [
      '1%', '10%', '0.5%', '100%', '25%']


def test_runs_without_test_metrics_are_left_out(tmp_path, caplog):
  write_run(tmp_path / 'a', 'ham10000', 'micle', 0.1, 0, 0.8)
  write_run(tmp_path / 'b', 'chexpert', 'micle', 0.1, 0, 0.7, metric='auc_mean')
  path = tmp_path / 'b' / 'results.json'
  results = json.loads(path.read_text())
  results['test'] = {}  # CheXpert has no test split.
  path.write_text(json.dumps(results))
  runs = report.collect([str(tmp_path)])
  summary = report.summarize(runs)
  assert [c['dataset'] for c in summary] == ['ham10000']
  assert f'1 of 2 runs have no test metrics and are left out: {path}' in caplog.text
  assert [c['dataset'] for c in report.summarize(runs, split='validation')] == [
      'chexpert', 'ham10000']
  with pytest.raises(DataError, match='none of the 1 runs has test metrics'):
    report.summarize([r for r in runs if r['dataset'] == 'chexpert'])


def test_fraction_seed_and_nested_metrics(tmp_path):
  for fraction_seed in (0, 1):
    workdir = tmp_path / str(fraction_seed)
    write_run(workdir, 'chexpert', 'micle', 0.1, 0, 0.8, metric='auc_mean')
    path = workdir / 'results.json'
    results = json.loads(path.read_text())
    results['fraction_seed'] = fraction_seed
    results['test']['auc_per_class'] = {'Edema': 0.9 - 0.1 * fraction_seed}
    path.write_text(json.dumps(results))
  runs = report.collect([str(tmp_path)])
  assert [r['fraction_seed'] for r in runs] == [0, 1]
  (cell,) = report.summarize(runs, metric='auc_per_class/Edema')
  assert cell['values'] == [0.9, 0.8] and cell['n'] == 2


# simclr and micle top1 at 10%: {pretrain_seed: [fine-tuning seeds 0, 1]}. SimCLR's
# pretraining runs spread widely (means 0.60, 0.70, 0.80); MICLe's do not (0.72, 0.74,
# 0.76); scratch has no pretraining run.
PRETRAINED = {
    'simclr': {0: [0.59, 0.61], 1: [0.69, 0.71], 2: [0.79, 0.81]},
    'micle': {0: [0.71, 0.73], 1: [0.73, 0.75], 2: [0.75, 0.77]},
}
SCRATCH = [0.50, 0.52]


@pytest.fixture
def pretrained_root(tmp_path):
  root = tmp_path / 'runs'
  for init, by_pretraining in PRETRAINED.items():
    for pretrain_seed, values in by_pretraining.items():
      for seed, value in enumerate(values):
        write_run(root / init / f'p{pretrain_seed}' / f's{seed}', 'ham10000', init, 0.1, seed,
                  value, pretrain_seed=pretrain_seed)
  for seed, value in enumerate(SCRATCH):
    write_run(root / 'scratch' / f's{seed}', 'ham10000', 'scratch', 0.1, seed, value,
              pretrain_seed=None)
  return root


def test_pretraining_runs_are_distinct_runs_pooled_in_one_cell(pretrained_root, tmp_path):
  runs = report.collect([str(pretrained_root)])
  assert len(runs) == 14
  summary = report.summarize(runs)
  assert [c['row'] for c in summary] == ['scratch', 'simclr', 'micle']
  scratch, simclr, micle = summary
  assert scratch['seeds'] == [0, 1] and scratch['pretrain_seeds'] == []
  assert simclr['seeds'] == ['p0/s0', 'p0/s1', 'p1/s0', 'p1/s1', 'p2/s0', 'p2/s1']
  assert simclr['n'] == 6 and simclr['pretrain_seeds'] == [0, 1, 2]
  pooled = [v for values in PRETRAINED['simclr'].values() for v in values]
  assert simclr['values'] == pooled
  assert simclr['mean'] == pytest.approx(np.mean(pooled))
  assert simclr['std'] == pytest.approx(np.std(pooled, ddof=1))
  assert micle['is_best']
  # The t-test's units are the pretraining runs: their means, not the 6 runs.
  assert (simclr['n_units'], simclr['unit']) == (3, 'pretraining run')
  assert simclr['p_value_vs_best'] == pytest.approx(stats.ttest_ind(
      [0.60, 0.70, 0.80], [0.72, 0.74, 0.76], equal_var=False).pvalue)
  # The same fine-tuning seed from the same pretraining run twice is a duplicate.
  write_run(tmp_path / 'again', 'ham10000', 'simclr', 0.1, 1, 0.7, pretrain_seed=2)
  with pytest.raises(DataError, match=r'are the same run \(.*pretrain_seed = ham10000, '
                                      r'finetune, simclr, 0.1, 1, None, 2, and settings '
                                      r'that cannot be compared: no readable config.json'):
    report.collect([str(pretrained_root), str(tmp_path / 'again')])


def _welch_p(a, b):
  """Two-sided p of Welch's t-test, written out in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  t = (a.mean() - b.mean()) / np.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  return 2 * stats.t.sf(abs(t), dof)


def test_nested_runs_are_tested_by_their_pretraining_runs(pretrained_root, tmp_path):
  """Fine-tuning seeds of one pretraining run are not independent: the pretraining run is
  the unit of a cell with several, a run the unit of a scratch cell or of one model."""
  # A null value leaves its pretraining run's mean over the other seed; a run without a
  # pretraining seed among micle's is a unit of its own.
  write_run(pretrained_root / 'simclr' / 'p2' / 's2', 'ham10000', 'simclr', 0.1, 2, 0.0,
            pretrain_seed=2, test={'top1': None})
  write_run(pretrained_root / 'micle' / 'old', 'ham10000', 'micle', 0.1, 9, 0.78)
  # One pretraining run at 100%: its fine-tuning seeds are its units.
  for init, values in (('micle', [0.80, 0.84, 0.83]), ('scratch', [0.70, 0.73, 0.71])):
    for seed, value in enumerate(values):
      write_run(pretrained_root / f'{init}_full' / str(seed), 'ham10000', init, 1.0, seed,
                value, pretrain_seed=0 if init == 'micle' else None)
  runs = report.collect([str(pretrained_root)])
  cells = {(c['row'], c['label_fraction']): c for c in report.summarize(runs)}
  simclr, micle, scratch = (cells[(i, 0.1)] for i in ('simclr', 'micle', 'scratch'))
  micle_units = [0.72, 0.74, 0.76, 0.78]  # by hand: pretraining runs 0, 1, 2 and the old run
  assert micle['unit'] == 'pretraining run'
  assert sorted(micle['units']) == pytest.approx(micle_units)
  assert micle['n'] == 7 and micle['n_units'] == 4 and micle['is_best']
  # Mean and std stay over every run.
  assert micle['mean'] == pytest.approx(np.mean([0.71, 0.73, 0.73, 0.75, 0.75, 0.77, 0.78]))
  assert simclr['units'] == pytest.approx([0.60, 0.70, 0.80])
  assert (simclr['n'], simclr['num_undefined'], simclr['n_units']) == (6, 1, 3)
  assert simclr['p_value_vs_best'] == pytest.approx(
      _welch_p([0.60, 0.70, 0.80], micle_units), rel=1e-9)
  assert scratch['unit'] == 'run' and scratch['n_units'] == 2
  assert scratch['p_value_vs_best'] == pytest.approx(_welch_p(SCRATCH, micle_units), rel=1e-9)
  full = cells[('scratch', 1.0)]
  assert cells[('micle', 1.0)]['unit'] == 'run' and cells[('micle', 1.0)]['n_units'] == 3
  assert full['p_value_vs_best'] == pytest.approx(
      _welch_p([0.70, 0.73, 0.71], [0.80, 0.84, 0.83]), rel=1e-9)

  out = tmp_path / 'r.md'
  report.write_report(runs, str(out))
  text = out.read_text()
  _, rows = _table_rows(text, 'ham10000: top1')
  assert rows['micle'][0] == '**0.746 ± 0.024 (n=7 from 4 pretraining runs)**'
  assert rows['simclr'][0].startswith('0.700 ± 0.090 (n=6 from 3 pretraining runs, 1 NaN), p=')
  assert rows['scratch'][0].startswith('0.510 ± 0.014 (n=2), p')
  assert rows['micle'][1] == '**0.823 ± 0.021 (n=3)**'
  assert 'Units of the p-values: in a cell with runs from two or more pretraining runs' in text
  assert 'its p-value is conditional on that pretrained model' in text
  with open(tmp_path / 'r.csv', newline='') as f:
    found = list(csv.DictReader(f))
  assert list(found[0])[21:23] == ['n_units', 'unit']  # after the columns from before
  assert [(r['init'], r['label_fraction'], r['n_units'], r['unit']) for r in found] == [
      ('scratch', '0.1', '2', 'run'), ('scratch', '1.0', '3', 'run'),
      ('simclr', '0.1', '3', 'pretraining run'), ('micle', '0.1', '4', 'pretraining run'),
      ('micle', '1.0', '3', 'run')]


def test_by_pretraining_gives_a_row_per_pretraining_run(pretrained_root, tmp_path):
  write_run(pretrained_root / 'simclr' / 'p10' / 's0', 'ham10000', 'simclr', 0.1, 0, 0.7,
            pretrain_seed=10)
  runs = report.collect([str(pretrained_root)])
  summary = report.summarize(runs, by_pretraining=True)
  assert [c['row'] for c in summary] == [
      'scratch', 'simclr (pretraining seed 0)', 'simclr (pretraining seed 1)',
      'simclr (pretraining seed 2)', 'simclr (pretraining seed 10)',
      'micle (pretraining seed 0)', 'micle (pretraining seed 1)', 'micle (pretraining seed 2)']
  for cell in summary[1:4]:
    assert cell['values'] == PRETRAINED['simclr'][cell['pretrain_seed']]
    assert cell['pooled_row'] == 'simclr' and cell['n'] == 2
  assert [c['row'] for c in summary if c['is_best']] == ['simclr (pretraining seed 2)']
  assert summary[-1]['mean'] == pytest.approx(0.76)
  out = tmp_path / 'r.md'
  assert report.main([str(pretrained_root), '--out', str(out), '--by_pretraining']) == 0
  _, rows = _table_rows(out.read_text(), 'ham10000: top1')
  assert list(rows) == [c['row'] for c in summary]
  assert rows['simclr (pretraining seed 10)'] == ['0.700 (n=1), p=n/a']
  assert 'n counts their fine-tuning seeds' in out.read_text()


def test_spread_between_pretraining_runs(pretrained_root, tmp_path):
  runs = report.collect([str(pretrained_root)])
  spread = report.pretraining_spread(runs)
  assert [e['row'] for e in spread] == ['scratch', 'simclr', 'micle']
  scratch, simclr, micle = spread
  assert simclr['pretrain_seeds'] == [0, 1, 2]
  assert simclr['pretraining_means'] == pytest.approx([0.60, 0.70, 0.80])
  assert simclr['pretraining_std'] == pytest.approx(0.1)
  assert micle['pretraining_std'] == pytest.approx(0.02)
  assert scratch['pretraining_std'] is None and scratch['pretrain_seeds'] == []
  assert micle['best_row'] == 'micle' and micle['difference_to_best'] == 0.0
  assert micle['within_spread'] is None
  # SimCLR is 0.04 below MICLe, less than the spread of SimCLR's pretraining runs (0.1).
  assert simclr['difference_to_best'] == pytest.approx(0.70 - 0.74)
  assert simclr['within_spread'] is True and simclr['n'] == 6
  assert scratch['difference_to_best'] == pytest.approx(0.51 - 0.74)
  assert scratch['within_spread'] is False

  out = tmp_path / 'r.md'
  paths = report.write_report(runs, str(out))
  assert paths[:3] == [str(out), str(tmp_path / 'r.csv'),
                       str(tmp_path / 'r_pretraining_spread.csv')]
  text = out.read_text()
  section = text[text.index('## Spread between pretraining runs'):]
  assert ('| ham10000 | top1 | 10% | simclr | p0: 0.600, p1: 0.700, p2: 0.800 | 0.100 | '
          '0.700 (6) | -0.040 (vs micle) | yes |') in section
  assert '| ham10000 | top1 | 10% | micle | p0: 0.720, p1: 0.740, p2: 0.760 | 0.020 | ' \
         '0.740 (6) | best | — |' in section
  assert '| ham10000 | top1 | 10% | scratch | — | — | 0.510 (2) | -0.230 (vs micle) | no |' \
         in section
  assert 'Runs fine-tuned from different pretraining runs of an initialisation are pooled' \
      in text
  with open(tmp_path / 'r_pretraining_spread.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(report.SPREAD_CSV_COLUMNS)
  assert [r['init'] for r in rows] == ['scratch', 'simclr', 'micle']
  assert rows[1]['pretrain_seeds'] == '0;1;2' and rows[1]['within_spread'] == 'True'
  assert float(rows[1]['pretraining_std']) == pytest.approx(0.1)
  assert rows[0]['pretraining_std'] == '' and rows[2]['within_spread'] == ''
  with open(tmp_path / 'r.csv', newline='') as f:
    main_rows = list(csv.DictReader(f))
  assert [r['seeds'] for r in main_rows][1] == 'p0/s0;p0/s1;p1/s0;p1/s1;p2/s0;p2/s1'


# ham10000 top1 at 10% and 100% (seeds 0, 1, 2) and on derm7pt through a label mapping.
SHIFT = {
    ('simclr', 0.1): ([0.60, 0.62, 0.64], [0.40, 0.45, 0.50]),
    ('micle', 0.1): ([0.64, 0.65, 0.66], [0.55, 0.56, 0.57]),
    ('simclr', 1.0): ([0.83, 0.84, 0.85], [0.70, 0.72, 0.71]),
    ('micle', 1.0): ([0.80, 0.81, 0.82], [0.60, 0.62, 0.61]),
}


def _write_shifted_runs(root):
  for (init, fraction), (values, shifted) in SHIFT.items():
    for seed, (value, on_shift) in enumerate(zip(values, shifted)):
      write_run(root / f'{init}_{fraction}_{seed}', 'ham10000', init, fraction, seed, value,
                shift={'dataset': 'derm7pt', 'split': 'test', 'label_map': {'mel': 'melanoma'},
                       'images': 100, 'images_left_out': 3,
                       'metrics': {'top1': on_shift, 'num_examples': 97}})


def test_shift_columns_follow_their_fraction(tmp_path):
  _write_shifted_runs(tmp_path / 'runs')
  # A run without shift and one whose shift metrics lack the metric add no shift cell.
  write_run(tmp_path / 'runs' / 'scratch', 'ham10000', 'scratch', 0.1, 0, 0.5)
  write_run(tmp_path / 'runs' / 'scratch1', 'ham10000', 'scratch', 0.1, 1, 0.52,
            shift={'dataset': 'derm7pt', 'split': 'test', 'metrics': {'auc_macro': 0.6}})
  runs = report.collect([str(tmp_path / 'runs')])
  summary = report.summarize(runs)
  shifted = [c for c in summary if c['shifted']]
  assert len(shifted) == 4 and {c['evaluated_on'] for c in shifted} == {'derm7pt'}
  assert all(c['split'] == 'test' and c['dataset'] == 'ham10000' for c in shifted)
  expected = expected_cells({k: v[1] for k, v in SHIFT.items()})
  for cell in shifted:
    mean, std, is_best, p = expected[(cell['init'], cell['label_fraction'])]
    assert cell['mean'] == pytest.approx(mean) and cell['std'] == pytest.approx(std)
    assert cell['is_best'] == is_best
    assert (cell['p_value_vs_best'] is None) == (p is None)
    if p is not None:
      assert cell['p_value_vs_best'] == pytest.approx(p, rel=1e-12)
  # In-distribution best and p-values are unchanged by the shifted cells.
  inside = expected_cells({k: v[0] for k, v in SHIFT.items()})
  for cell in summary:
    if not cell['shifted'] and cell['init'] != 'scratch':
      assert cell['is_best'] == inside[(cell['init'], cell['label_fraction'])][2]

  out = tmp_path / 'r.md'
  report.write_report(runs, str(out))
  text = out.read_text()
  header, rows = _table_rows(text, 'ham10000: top1')
  # These results.json name no label_names: the labels the label_map reaches instead.
  assert header == ('| initialisation | 10% | 10% → derm7pt (over melanoma) | 100% | '
                    '100% → derm7pt (over melanoma) |')
  assert list(rows) == ['scratch', 'simclr', 'micle']
  assert rows['scratch'][1] == rows['scratch'][3] == '—'
  assert rows['micle'][1] == '**0.560 ± 0.010 (n=3)**'
  assert rows['simclr'][3] == '**0.710 ± 0.010 (n=3)**'
  p = stats.ttest_ind(SHIFT[('simclr', 0.1)][1], SHIFT[('micle', 0.1)][1],
                      equal_var=False).pvalue
  assert rows['simclr'][1] == f'0.450 ± 0.050 (n=3), p={p:.3f}' + (' ≈' if p > 0.05 else '')
  assert '14 runs.' in text and 'distribution shift' in text
  with open(tmp_path / 'r.csv', newline='') as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == len(summary) == 9
  on_shift = [r for r in csv_rows if r['evaluated_on'] == 'derm7pt']
  assert len(on_shift) == 4 and all(r['shifted'] == 'True' for r in on_shift)
  assert {r['evaluated_on'] for r in csv_rows if r['shifted'] == 'False'} == {'ham10000'}
  # Validation reports have no shift columns: the shift is evaluated with the test split.
  assert not any(c['shifted'] for c in report.summarize(runs, split='validation'))


NIH14 = ['Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule',
         'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis',
         'Pleural_Thickening', 'Hernia']


def test_shift_columns_name_the_labels_their_mean_is_over(tmp_path):
  """A CheXpert auc_mean over five labels, on ChestX-ray14 over the mapped labels only."""
  shifts = {'one': ['No Finding'], 'all': NIH14}
  for seed in range(2):
    for name, labels in shifts.items():
      write_run(tmp_path / name / str(seed), 'chexpert', name, 1.0, seed, 0.8 + seed / 100,
                metric='auc_mean',
                shift={'dataset': 'nih_chest_xray14', 'split': 'test', 'label_names': labels,
                       'label_map': {n: n for n in labels},
                       'metrics': {'auc_mean': 0.6 + seed / 100,
                                   'auc_per_class': {n: 0.6 for n in labels}}})
  runs = report.collect([str(tmp_path)])
  cells = report.summarize(runs)
  assert {tuple(c['shift_labels']) for c in cells if c['shifted']} == {
      ('No Finding',), tuple(NIH14)}
  assert all(c['shift_labels'] == [] for c in cells if not c['shifted'])
  # Two mappings, two columns: a mean over one label is no mean over fourteen.
  assert all(c['is_best'] for c in cells if c['shifted'])
  report.write_report(runs, str(tmp_path / 'r.md'))
  header, rows = _table_rows((tmp_path / 'r.md').read_text(), 'chexpert: auc_mean')
  assert header == ('| initialisation | 100% | 100% → nih_chest_xray14 (over 14 labels) | '
                    '100% → nih_chest_xray14 (over No Finding) |')
  assert rows['one'][1] == '—' and rows['all'][2] == '—'
  assert rows['one'][2] == '**0.605 ± 0.007 (n=2)**'
  assert 'the labels the mapping reaches only' in (tmp_path / 'r.md').read_text()
  with open(tmp_path / 'r.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(report.CSV_COLUMNS)
  assert sorted(r['shift_labels'] for r in rows) == ['', '', ';'.join(NIH14), 'No Finding']
  # A per-label value is over that label alone: no list of the mapping's labels.
  write_run(tmp_path / 'per_label', 'chexpert', 'one', 1.0, 0, 0.8, metric='auc_mean',
            test={'auc_per_class': {'No Finding': 0.8}},
            shift={'dataset': 'nih_chest_xray14', 'label_names': NIH14,
                   'metrics': {'auc_per_class': {'No Finding': 0.7}}})
  cells = report.summarize(report.collect([str(tmp_path / 'per_label')]),
                           metric='auc_per_class/No Finding')
  assert [(c['mean'], c['shift_labels']) for c in cells if c['shifted']] == [(0.7, [])]
  assert report.over_labels(['Effusion', 'Edema']) == 'over Effusion, Edema'
  assert report.over_labels([]) == ''
  write_run(tmp_path / 'bad', 'chexpert', 'x', 1.0, 0, 0.8, metric='auc_mean',
            shift={'dataset': 'nih_chest_xray14', 'label_names': 'Edema',
                   'metrics': {'auc_mean': 0.6}})
  with pytest.raises(DataError, match=r"bad/results.json: key 'shift.label_names' must be a "
                                      r"list of strings, got 'Edema'$"):
    report.collect([str(tmp_path / 'bad')])


def test_old_results_and_bad_new_keys(tmp_path):
  write_run(tmp_path / 'old', 'ham10000', 'micle', 0.1, 0, 0.8)
  (run,) = report.collect([str(tmp_path / 'old')])
  assert run['pretrain_seed'] is None
  write_run(tmp_path / 'a', 'ham10000', 'micle', 0.1, 0, 0.8, pretrain_seed='0')
  with pytest.raises(DataError, match=r"a/results.json: key 'pretrain_seed' must be an "
                                      r"integer or null, got '0'"):
    report.collect([str(tmp_path / 'a')])
  write_run(tmp_path / 'b', 'ham10000', 'micle', 0.1, 0, 0.8, shift={'split': 'test',
                                                                    'metrics': {}})
  with pytest.raises(DataError, match=r"b/results.json: key 'shift.dataset' must be"):
    report.collect([str(tmp_path / 'b')])
  write_run(tmp_path / 'c', 'ham10000', 'micle', 0.1, 0, 0.8,
            shift={'dataset': 'derm7pt', 'metrics': {'top1': 'high'}})
  with pytest.raises(DataError, match=r"c/results.json: key 'shift.metrics.top1' is not a "
                                      'number'):
    report.summarize(report.collect([str(tmp_path / 'c')]))


@pytest.mark.parametrize('out', ['results.json', 'report.csv', 'report'])
def test_out_must_be_a_markdown_file_so_nothing_else_is_replaced(tmp_path, capsys, out):
  write_run(tmp_path / 'run', 'ham10000', 'micle', 1.0, 0, 0.8)
  results = (tmp_path / 'run' / 'results.json').read_text()
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path), '--out', str(tmp_path / 'run' / out)])
  assert e.value.code == 2
  assert "does not end in .md" in capsys.readouterr().err
  assert (tmp_path / 'run' / 'results.json').read_text() == results
  assert sorted(os.listdir(tmp_path / 'run')) == ['results.json']
