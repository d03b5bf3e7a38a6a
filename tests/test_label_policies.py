"""CheXpert uncertainty policies and the masked BCE, eager and under jax.jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigssl_med import label_policies, supervised
from bigssl_med.errors import ConfigError

NAN = np.nan
# Rows mix positive, negative, uncertain and blank entries.
LABELS = np.array([[1.0, 0.0, -1.0, NAN],
                   [-1.0, -1.0, 1.0, 0.0],
                   [NAN, 1.0, NAN, -1.0]], dtype=np.float32)
UNCERTAIN = LABELS == -1
BLANK = np.isnan(LABELS)
KNOWN = ~UNCERTAIN & ~BLANK


@pytest.mark.parametrize('policy, uncertain_target, uncertain_mask', [
    ('ignore', 0.0, False),
    ('zeros', 0.0, True),
    ('ones', 1.0, True),
])
@pytest.mark.parametrize('blank, blank_mask', [('zeros', True), ('ignore', False)])
def test_fixed_policies(policy, uncertain_target, uncertain_mask, blank, blank_mask):
  targets, mask = label_policies.apply_policy(jnp.asarray(LABELS), policy, blank=blank)
  targets, mask = np.asarray(targets), np.asarray(mask)
  expected_targets = np.where(KNOWN, np.nan_to_num(LABELS), 0.0)
  expected_targets[UNCERTAIN] = uncertain_target if uncertain_mask else 0.0
  expected_mask = KNOWN | (UNCERTAIN & uncertain_mask) | (BLANK & blank_mask)
  np.testing.assert_array_equal(targets, expected_targets)
  np.testing.assert_array_equal(mask, expected_mask)
  assert targets.dtype == np.float32 and mask.dtype == np.bool_


def test_u_ones_by_hand():
  targets, mask = label_policies.apply_policy(LABELS, 'ones')
  np.testing.assert_array_equal(np.asarray(targets), [[1, 0, 1, 0], [1, 1, 1, 0], [0, 1, 0, 1]])
  assert np.asarray(mask).all()
  targets, mask = label_policies.apply_policy(LABELS, 'ignore', blank='ignore')
  np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0]])
  assert not np.isnan(np.asarray(targets)).any()


def test_lsr_ones_range_and_determinism():
  key = jax.random.key(0)
  targets, mask = label_policies.apply_policy(LABELS, 'lsr_ones', key)
  targets = np.asarray(targets)
  assert np.asarray(mask).all()
  soft = targets[UNCERTAIN]
  assert ((soft >= 0.55) & (soft <= 0.85)).all()
  np.testing.assert_array_equal(targets[KNOWN], LABELS[KNOWN])
  np.testing.assert_array_equal(targets[BLANK], 0.0)
  again, _ = label_policies.apply_policy(LABELS, 'lsr_ones', key)
  np.testing.assert_array_equal(np.asarray(again), targets)
  other, _ = label_policies.apply_policy(LABELS, 'lsr_ones', jax.random.key(1))
  assert not np.array_equal(np.asarray(other)[UNCERTAIN], soft)


def test_lsr_ones_roughly_uniform():
  labels = -np.ones((200, 50), np.float32)
  targets, _ = label_policies.apply_policy(labels, 'lsr_ones', jax.random.PRNGKey(3),
                                           lsr_range=(0.55, 0.85))
  targets = np.asarray(targets)
  assert targets.min() >= 0.55 and targets.max() <= 0.85
  assert abs(targets.mean() - 0.70) < 0.005
  # A uniform on [0.55, 0.85] has std 0.3 / sqrt(12), and each decile holds ~10%.
  assert abs(targets.std() - 0.3 / np.sqrt(12)) < 0.003
  counts, _ = np.histogram(targets, bins=10, range=(0.55, 0.85))
  assert (np.abs(counts / targets.size - 0.1) < 0.01).all()


def test_under_jit():
  @functools.partial(jax.jit, static_argnames=('policy', 'blank'))
  def run(labels, key, policy, blank):
    return label_policies.apply_policy(labels, policy, key, blank=blank)

  key = jax.random.key(7)
  for policy in label_policies.POLICIES:
    for blank in ('zeros', 'ignore'):
      jitted = run(jnp.asarray(LABELS), key, policy, blank)
      eager = label_policies.apply_policy(LABELS, policy, key, blank=blank)
      for a, b in zip(jitted, eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors():
  with pytest.raises(ConfigError, match="unknown label policy 'u_ones'; expected one of "
                     'ignore, zeros, ones, lsr_ones'):
    label_policies.apply_policy(LABELS, 'u_ones')
  with pytest.raises(ConfigError, match="blank label rule 'negative'"):
    label_policies.apply_policy(LABELS, 'zeros', blank='negative')
  with pytest.raises(ValueError, match='needs a PRNG key'):
    label_policies.apply_policy(LABELS, 'lsr_ones')
  with pytest.raises(ConfigError, match='lsr_range'):
    label_policies.apply_policy(LABELS, 'lsr_ones', jax.random.key(0), lsr_range=(0.9, 0.5))
  with pytest.raises(ValueError, match='found 2.0'):
    label_policies.apply_policy(np.array([[1.0, 2.0]]), 'zeros')


def reference_bce(logits, targets, mask):
  """Sigmoid BCE in float64, from its definition, averaged over the masked-in entries."""
  logits = np.asarray(logits, np.float64)
  targets = np.asarray(targets, np.float64)
  p = 1 / (1 + np.exp(-logits))
  losses = -(targets * np.log(p) + (1 - targets) * np.log1p(-p))
  return losses[mask].mean() if mask.any() else 0.0


def test_masked_bce_matches_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(16, 5)).astype(np.float32)
  targets = rng.choice([0.0, 1.0, 0.7], size=(16, 5)).astype(np.float32)
  mask = rng.random((16, 5)) < 0.6
  targets_with_nan = np.where(mask, targets, np.nan).astype(np.float32)
  got = label_policies.masked_sigmoid_bce(logits, targets_with_nan, mask)
  np.testing.assert_allclose(float(got), reference_bce(logits, targets, mask), rtol=1e-5)
  jitted = jax.jit(label_policies.masked_sigmoid_bce)(logits, targets_with_nan, mask)
  np.testing.assert_allclose(float(jitted), float(got), rtol=1e-6)
  full = label_policies.masked_sigmoid_bce(logits, targets, None)
  np.testing.assert_allclose(float(full), reference_bce(logits, targets, np.ones_like(mask)),
                             rtol=1e-5)


def test_masked_bce_stable_and_empty():
  logits = np.array([[100.0, -100.0]], np.float32)
  targets = np.array([[0.0, 1.0]], np.float32)
  got = label_policies.masked_sigmoid_bce(logits, targets, np.ones((1, 2), bool))
  np.testing.assert_allclose(float(got), 100.0, rtol=1e-5)
  empty = label_policies.masked_sigmoid_bce(logits, targets, np.zeros((1, 2), bool))
  assert float(empty) == 0.0


def test_masked_bce_gradient_ignores_masked_out():
  logits = jnp.array([[0.5, -1.0, 2.0]])
  targets = jnp.array([[1.0, jnp.nan, 0.0]])
  mask = jnp.array([[True, False, True]])
  grad = jax.grad(label_policies.masked_sigmoid_bce)(logits, targets, mask)
  grad = np.asarray(grad)
  assert np.isfinite(grad).all() and grad[0, 1] == 0.0
  expected = (1 / (1 + np.exp(-np.array([0.5, 2.0]))) - np.array([1.0, 0.0])) / 2
  np.testing.assert_allclose(grad[0, [0, 2]], expected, rtol=1e-5)


def test_policy_then_loss():
  targets, mask = label_policies.apply_policy(LABELS, 'ignore', blank='ignore')
  logits = np.linspace(-2, 2, LABELS.size, dtype=np.float32).reshape(LABELS.shape)
  got = label_policies.masked_sigmoid_bce(logits, targets, mask)
  np.testing.assert_allclose(float(got), reference_bce(logits, np.nan_to_num(LABELS), KNOWN),
                             rtol=1e-5)


@pytest.mark.parametrize('blank', ['zeros', 'ignore'])
def test_validation_policy_targets_are_the_training_policy_s(blank):
  """`supervised.policy_targets`: the targets of task.eval_uncertain='train_policy'."""
  task = supervised.Task('multilabel', 4, uncertain='ones', blank=blank)
  targets, mask = supervised.policy_targets(LABELS, task, seed=0, step=10)
  want = np.where(UNCERTAIN, 1.0, np.nan_to_num(LABELS))  # U-Ones by hand
  want_mask = KNOWN | UNCERTAIN | (BLANK & (blank == 'zeros'))
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_array_equal(targets[want_mask], want[want_mask])
  assert targets.dtype == np.float64
  # The evaluation's own targets (AUCs, test) leave uncertain labels out.
  _, eval_mask = supervised.eval_targets(LABELS, blank)
  np.testing.assert_array_equal(eval_mask, want_mask & ~UNCERTAIN)


def test_validation_lsr_ones_draws_are_fixed_by_seed_and_step():
  task = supervised.Task('multilabel', 4, uncertain='lsr_ones')
  labels = np.tile(LABELS, (50, 1))
  uncertain, known = np.tile(UNCERTAIN, (50, 1)), np.tile(KNOWN, (50, 1))
  targets, mask = supervised.policy_targets(labels, task, seed=3, step=100)
  assert mask.all()
  soft = targets[uncertain]
  assert (soft >= 0.55).all() and (soft < 0.85).all() and soft.std() > 0.05
  np.testing.assert_array_equal(targets[known], labels[known])
  np.testing.assert_array_equal(targets[np.isnan(labels)], 0.0)
  again, _ = supervised.policy_targets(labels, task, seed=3, step=100)  # a resumed run
  np.testing.assert_array_equal(again, targets)
  for seed, step in ((3, 200), (4, 100)):  # another evaluation, another run
    other, _ = supervised.policy_targets(labels, task, seed=seed, step=step)
    assert not np.isin(other[uncertain], soft).any()
    np.testing.assert_array_equal(other[~uncertain], targets[~uncertain])
