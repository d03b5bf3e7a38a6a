"""nt_xent against an independent float64 NumPy reference of SimCLR's objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bigssl_med import losses, parallel


def reference_nt_xent(z1, z2, temperature):
  """SimCLR's add_contrastive_loss in float64, written directly from its definition."""
  z1 = np.asarray(z1, np.float64)
  z2 = np.asarray(z2, np.float64)
  z1 = z1 / np.sqrt(np.maximum((z1 ** 2).sum(1, keepdims=True), 1e-12))
  z2 = z2 / np.sqrt(np.maximum((z2 ** 2).sum(1, keepdims=True), 1e-12))
  n = len(z1)
  total = 0.0
  for a, b in ((z1, z2), (z2, z1)):
    for i in range(n):
      # Candidates: every b_j (positive j = i) and every a_j with j != i.
      logits = [a[i] @ b[j] / temperature for j in range(n)]
      logits += [a[i] @ a[j] / temperature for j in range(n) if j != i]
      logits = np.array(logits)
      m = logits.max()
      log_z = m + np.log(np.exp(logits - m).sum())
      total += log_z - logits[i]
  return total / n


@pytest.mark.parametrize('temperature', [0.1, 0.5, 1.0])
def test_matches_reference(temperature):
  rng = np.random.default_rng(0)
  z1 = rng.normal(size=(16, 8)).astype(np.float32)
  z2 = (z1 + 0.5 * rng.normal(size=(16, 8))).astype(np.float32)
  got = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature)
  np.testing.assert_allclose(float(got), reference_nt_xent(z1, z2, temperature), rtol=1e-5)


def test_default_temperature_is_point_one():
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(2, 6, 4)).astype(np.float32)
  np.testing.assert_allclose(float(losses.nt_xent(z1, z2)), reference_nt_xent(z1, z2, 0.1),
                             rtol=1e-5)


def test_scale_invariant_and_symmetric():
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(2, 10, 5)).astype(np.float32)
  base = float(losses.nt_xent(z1, z2))
  np.testing.assert_allclose(float(losses.nt_xent(3 * z1, 0.5 * z2)), base, rtol=1e-5)
  np.testing.assert_allclose(float(losses.nt_xent(z2, z1)), base, rtol=1e-5)


def test_perfect_pairs_and_accuracy():
  z = np.eye(8, dtype=np.float32)
  loss, logits = losses.nt_xent(z, z, 0.1, return_logits=True)
  assert float(losses.contrastive_accuracy(logits)) == 1.0
  # Positive logit 10, the 14 negatives 0: loss per direction log(1 + 14 e^-10).
  np.testing.assert_allclose(float(loss), 2 * np.log1p(14 * np.exp(-10.0)), atol=2e-6)
  shifted = np.roll(z, 1, axis=0)
  _, logits = losses.nt_xent(z, shifted, 0.1, return_logits=True)
  assert float(losses.contrastive_accuracy(logits)) == 0.0


def test_contrastive_entropy_is_the_mean_row_entropy_of_logits_ab():
  rng = np.random.default_rng(4)
  z1, z2 = rng.normal(size=(2, 12, 6)).astype(np.float32)
  _, logits = losses.nt_xent(z1, z2, 0.1, return_logits=True)
  a = z1.astype(np.float64) / np.linalg.norm(z1.astype(np.float64), axis=1, keepdims=True)
  b = z2.astype(np.float64) / np.linalg.norm(z2.astype(np.float64), axis=1, keepdims=True)
  x = a @ b.T / 0.1
  p = np.exp(x - x.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  want = -np.mean(np.sum(p * np.log(p + 1e-8), axis=1))
  np.testing.assert_allclose(float(losses.contrastive_entropy(logits)), want, rtol=1e-5)
  # Uniform rows: log B; one candidate per row: 0.
  np.testing.assert_allclose(float(losses.contrastive_entropy(np.zeros((12, 12)))),
                             np.log(12), rtol=1e-6)
  assert float(losses.contrastive_entropy(1e4 * np.eye(12))) < 1e-6


def test_sharded_over_8_devices_gives_the_unsharded_value():
  assert jax.device_count() == 8, 'tests run with 8 fake CPU devices (see conftest.py)'
  mesh = parallel.data_mesh()
  rng = np.random.default_rng(3)
  z1, z2 = rng.normal(size=(2, 32, 16)).astype(np.float32)
  sharding = NamedSharding(mesh, P('data'))
  s1, s2 = jax.device_put(z1, sharding), jax.device_put(z2, sharding)
  assert len(s1.sharding.device_set) == 8
  loss = jax.jit(losses.nt_xent, static_argnums=2)(s1, s2, 0.1)
  np.testing.assert_allclose(float(loss), reference_nt_xent(z1, z2, 0.1), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(losses.nt_xent(z1, z2)), rtol=1e-6)


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='one shape'):
    losses.nt_xent(jnp.ones((4, 3)), jnp.ones((5, 3)))
