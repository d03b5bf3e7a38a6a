"""Metrics against scikit-learn computed independently, and hand-computed cases."""

import math

import numpy as np
import pytest
from sklearn import metrics as sk

from bigssl_med import metrics


def _multiclass_case(n=60, k=5, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % k
  logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
  return logits.astype(np.float32), labels


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def test_multiclass_matches_sklearn():
  logits, labels = _multiclass_case()
  names = ['akiec', 'bcc', 'bkl', 'df', 'mel']
  got = metrics.multiclass_metrics(logits, labels, class_names=names)
  probs = _softmax(logits)
  assert got['num_examples'] == 60
  assert got['top1'] == pytest.approx(sk.accuracy_score(labels, probs.argmax(1)))
  assert got['top3'] == pytest.approx(
      sk.top_k_accuracy_score(labels, probs, k=3, labels=np.arange(5)))
  assert got['balanced_accuracy'] == pytest.approx(
      sk.balanced_accuracy_score(labels, probs.argmax(1)))
  assert got['auc_macro'] == pytest.approx(
      sk.roc_auc_score(labels, probs, multi_class='ovr', average='macro'))
  assert list(got['auc_per_class']) == names
  for k, name in enumerate(names):
    assert got['auc_per_class'][name] == pytest.approx(
        sk.roc_auc_score(labels == k, probs[:, k]))


def test_multiclass_hand_computed():
  # Rows predict 0, 1, 2, 2; labels 0, 1, 1, 3. Top-3 misses only the last row.
  logits = np.array([[3., 2., 1., 0.], [1., 3., 2., 0.], [0., 2., 3., 1.], [3., 2., 1., 0.]])
  labels = np.array([0, 1, 1, 3])
  got = metrics.multiclass_metrics(logits, labels)
  assert got['top1'] == 0.5
  assert got['top3'] == 0.75
  # Recalls: class 0 1/1, class 1 1/2, class 3 0/1; class 2 is absent.
  assert got['balanced_accuracy'] == pytest.approx((1 + 0.5 + 0) / 3)
  assert math.isnan(got['auc_per_class']['2'])
  defined = [v for v in got['auc_per_class'].values() if not math.isnan(v)]
  assert len(defined) == 3
  assert got['auc_macro'] == pytest.approx(np.mean(defined))
  assert (got['auc_macro_classes'], got['auc_macro_of_classes']) == (3, 4)


def test_multiclass_two_classes_has_no_top3():
  logits = np.array([[2., 0.], [0., 1.], [1., 0.5]])
  got = metrics.multiclass_metrics(logits, np.array([0, 1, 1]))
  assert 'top3' not in got
  assert got['top1'] == pytest.approx(2 / 3)
  assert got['auc_per_class']['1'] == pytest.approx(
      sk.roc_auc_score([0, 1, 1], _softmax(logits)[:, 1]))


@pytest.mark.parametrize('logits, labels, match', [
    (np.zeros((4, 3)), np.zeros(5, int), 'labels must have shape'),
    (np.zeros(4), np.zeros(4, int), r'logits must be \[N, K\]'),
    (np.zeros((4, 1)), np.zeros(4, int), 'K >= 2'),
    (np.zeros((2, 3)), np.array([0, 3]), r'in \[0, 3\)'),
    (np.zeros((2, 3)), np.array([0, -1]), r'in \[0, 3\)'),
    (np.zeros((2, 3)), np.array([0.5, 1.0]), 'integers'),
    (np.array([[0., np.nan, 1.], [0., 0., 0.]]), np.array([0, 1]), 'non-finite'),
])
def test_multiclass_bad_input(logits, labels, match):
  with pytest.raises(ValueError, match=match):
    metrics.multiclass_metrics(logits, labels)


def test_multiclass_bad_class_names():
  logits, labels = _multiclass_case(k=3)
  with pytest.raises(ValueError, match='class_names has 2 names for 3'):
    metrics.multiclass_metrics(logits, labels, class_names=['a', 'b'])


def _multilabel_case(n=80, seed=1):
  rng = np.random.default_rng(seed)
  names = ['Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Pleural Effusion',
           'Fracture']
  targets = (rng.random((n, len(names))) < 0.4).astype(np.float64)
  logits = rng.normal(size=targets.shape) + 1.2 * targets
  mask = rng.random(targets.shape) < 0.75
  return logits, targets, mask, names


def test_multilabel_masked_auc_matches_sklearn():
  logits, targets, mask, names = _multilabel_case()
  got = metrics.multilabel_metrics(logits, targets, mask, label_names=names)
  expected = [sk.roc_auc_score(targets[mask[:, k], k], logits[mask[:, k], k])
              for k in range(len(names))]
  for k, name in enumerate(names):
    assert got['auc_per_class'][name] == pytest.approx(expected[k])
  assert got['auc_mean'] == pytest.approx(np.mean(expected))
  assert got['auc_mean_classes'] == len(names)
  assert got['num_examples'] == 80
  # The masked-out entries do matter when unmasked: the mask is really applied.
  unmasked = metrics.multilabel_metrics(logits, targets, label_names=names)
  assert unmasked['auc_per_class']['Edema'] != pytest.approx(got['auc_per_class']['Edema'])


def test_multilabel_default_mask_is_finite_targets():
  logits, targets, mask, names = _multilabel_case(seed=2)
  with_nan = np.where(mask, targets, np.nan)
  got = metrics.multilabel_metrics(logits, with_nan, label_names=names)
  explicit = metrics.multilabel_metrics(logits, targets, mask, label_names=names)
  assert got == explicit


def test_multilabel_mean_over_competition_excludes_nan():
  logits, targets, mask, names = _multilabel_case(seed=3)
  targets[:, names.index('Edema')] = 0.0  # Edema: negatives only, so no AUC.
  got = metrics.multilabel_metrics(logits, targets, mask, label_names=names,
                                   mean_over=metrics.CHEXPERT_COMPETITION)
  assert math.isnan(got['auc_per_class']['Edema'])
  kept = [n for n in metrics.CHEXPERT_COMPETITION if n != 'Edema']
  expected = [sk.roc_auc_score(targets[mask[:, names.index(n)], names.index(n)],
                               logits[mask[:, names.index(n)], names.index(n)]) for n in kept]
  assert (got['auc_mean_classes'], got['auc_mean_of_classes']) == (4, 5)
  assert got['auc_mean'] == pytest.approx(np.mean(expected))


def test_multilabel_all_undefined_mean_is_nan():
  got = metrics.multilabel_metrics(np.zeros((3, 2)), np.ones((3, 2)))
  assert math.isnan(got['auc_mean'])
  assert (got['auc_mean_classes'], got['auc_mean_of_classes']) == (0, 2)


def test_multilabel_bad_input():
  logits, targets, mask, names = _multilabel_case()
  with pytest.raises(ValueError, match='targets have shape'):
    metrics.multilabel_metrics(logits, targets[:, :3])
  with pytest.raises(ValueError, match='mask has shape'):
    metrics.multilabel_metrics(logits, targets, mask[:10])
  with pytest.raises(ValueError, match='0 or 1'):
    metrics.multilabel_metrics(logits, np.where(mask, targets, -1.0), np.ones_like(mask))
  with pytest.raises(ValueError, match="mean_over names \\['Hernia'\\]"):
    metrics.multilabel_metrics(logits, targets, mask, label_names=names,
                               mean_over=['Hernia'])
  bad = logits.copy()
  bad[0, 0] = np.inf
  with pytest.raises(ValueError, match='logits contain 1 non-finite'):
    metrics.multilabel_metrics(bad, targets, mask)


def test_constants():
  assert len(metrics.NIH_FINDINGS) == 14
  assert metrics.NIH_FINDINGS[2] == 'Effusion' and metrics.NIH_FINDINGS[-1] == 'Hernia'
  assert len(metrics.CHEXPERT_COMPETITION) == 5


def test_sensitivity_at_specificity_hand_computed():
  # 10 negatives scored 0..9, 5 positives scored 5.5, 7.5, 8.5, 9.5, 10.
  negatives = np.arange(10.0)
  positives = np.array([5.5, 7.5, 8.5, 9.5, 10.0])
  scores = np.concatenate([negatives, positives])
  labels = np.array([0] * 10 + [1] * 5)
  # Specificity 0.9 allows 1 false positive of 10: the lowest such threshold is 8.5
  # (positive for scores >= 8.5: the negative 9 and the positives 8.5, 9.5, 10).
  assert metrics.sensitivity_at_specificity(scores, labels, 0.9) == pytest.approx(0.6)
  # Specificity 0.95 allows 0.5 false positives, so none: threshold 9.5 catches 2.
  assert metrics.sensitivity_at_specificity(scores, labels, 0.95) == pytest.approx(0.4)
  # Specificity 0.8 allows 2 (the negatives 8 and 9): threshold 7.5 catches 4.
  assert metrics.sensitivity_at_specificity(scores, labels, 0.8) == pytest.approx(0.8)
  assert metrics.sensitivity_at_specificity(scores, labels, 0.0) == 1.0
  assert metrics.sensitivity_at_specificity(scores, labels, 1.0) == pytest.approx(0.4)


def test_sensitivity_at_specificity_matches_roc_definition():
  rng = np.random.default_rng(4)
  labels = rng.random(200) < 0.3
  scores = rng.normal(size=200) + labels
  fpr, tpr, _ = sk.roc_curve(labels, scores, drop_intermediate=False)
  for s in (0.5, 0.9, 0.95, 0.99):
    expected = tpr[fpr <= 1 - s + 1e-12].max()
    assert metrics.sensitivity_at_specificity(scores, labels, s) == pytest.approx(expected)


def test_binary_metrics():
  rng = np.random.default_rng(5)
  labels = (rng.random(100) < 0.4).astype(int)
  scores = rng.normal(size=100) + labels
  got = metrics.binary_metrics(scores, labels)
  assert got['auc'] == pytest.approx(sk.roc_auc_score(labels, scores))
  assert set(got) == {'auc', 'sensitivity_at_specificity_0.9',
                      'sensitivity_at_specificity_0.95', 'num_examples'}
  assert got['sensitivity_at_specificity_0.9'] == metrics.sensitivity_at_specificity(
      scores, labels, 0.9)
  one_class = metrics.binary_metrics(scores, np.zeros(100))
  assert math.isnan(one_class['auc'])
  assert math.isnan(one_class['sensitivity_at_specificity_0.95'])


def test_binary_bad_input():
  with pytest.raises(ValueError, match='labels have shape'):
    metrics.binary_metrics(np.zeros(4), np.zeros(3))
  with pytest.raises(ValueError, match='0 or 1'):
    metrics.binary_metrics(np.zeros(3), np.array([0, 1, 2]))
  with pytest.raises(ValueError, match='non-finite'):
    metrics.binary_metrics(np.array([0.0, np.nan]), np.array([0, 1]))
  with pytest.raises(ValueError, match='specificity must be in'):
    metrics.sensitivity_at_specificity(np.zeros(2), np.array([0, 1]), 1.5)


def test_roc_points():
  scores = np.array([0.1, 0.4, 0.35, 0.8])
  labels = np.array([0, 0, 1, 1])
  fpr, tpr = metrics.roc_points(scores, labels)
  expected_fpr, expected_tpr, _ = sk.roc_curve(labels, scores)
  np.testing.assert_allclose(fpr, expected_fpr)
  np.testing.assert_allclose(tpr, expected_tpr)
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
  with pytest.raises(ValueError, match='both positive and negative'):
    metrics.roc_points(scores, np.ones(4))


def test_flatten():
  flat = metrics.flatten({'top1': np.float32(0.5), 'auc_per_class': {'a': 0.7, 'b': 0.8},
                          'num_examples': 3})
  assert flat == {'top1': 0.5, 'auc_per_class/a': pytest.approx(0.7),
                  'auc_per_class/b': pytest.approx(0.8), 'num_examples': 3.0}


def test_validation_losses_match_float64_references():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (50, 4))
  labels = rng.integers(0, 4, 50)
  probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  assert metrics.softmax_cross_entropy(logits, labels) == pytest.approx(
      -np.mean(np.log(probabilities[np.arange(50), labels])), rel=1e-12)
  assert metrics.softmax_cross_entropy(np.array([[1000.0, 0.0]]), [1]) == pytest.approx(1000.0)
  targets = (rng.random((50, 4)) < 0.3).astype(float)
  mask = rng.random((50, 4)) < 0.8
  p = 1 / (1 + np.exp(-logits))
  want = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))[mask].mean()
  assert metrics.sigmoid_cross_entropy(logits, targets, mask) == pytest.approx(want, rel=1e-12)
  assert metrics.sigmoid_cross_entropy(np.array([[-800.0]]), [[1.0]]) == pytest.approx(800.0)
  assert math.isnan(metrics.sigmoid_cross_entropy(logits, targets, np.zeros((50, 4), bool)))


def test_lower_is_better_reads_the_metrics_own_name():
  assert metrics.lower_is_better('loss') and metrics.lower_is_better('probe_loss')
  assert metrics.lower_is_better('error_rate')
  assert not metrics.lower_is_better('auc_mean')
  assert not metrics.lower_is_better('auc_per_class/error_of_refraction')


def test_log_softmax_matches_float64_and_keeps_the_order_of_probabilities_near_one():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (50, 5))
  shifted = logits - logits.max(axis=1, keepdims=True)
  reference = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  np.testing.assert_allclose(metrics.log_softmax(logits), reference, rtol=1e-12, atol=1e-14)
  # Margins of 40 and 41: both probabilities are 1.0 in float64, their logs are not.
  confident = np.array([[0.0, 40.0], [0.0, 41.0], [0.0, -5.0], [3.0, 0.0]])
  log_probs = metrics.log_softmax(confident)
  assert log_probs[0, 1] < log_probs[1, 1] < 0.0
  np.testing.assert_allclose(log_probs[:2, 1], -np.exp([-40.0, -41.0]), rtol=1e-12)
  assert np.all(np.isfinite(log_probs)) and np.all(log_probs <= 0)
  # So a class's one-vs-rest AUC ranks them, and both AUCs of two classes agree.
  labels = np.array([0, 1, 0, 0])
  result = metrics.multiclass_metrics(confident, labels)
  assert result['auc_per_class'] == {'0': 1.0, '1': 1.0}
