"""Contrastive losses.

`nt_xent` is SimCLR's `add_contrastive_loss` (public TF2 `objective.py`) on global
arrays: under `jax.jit` with the batch sharded over a mesh, the similarity matrices
span the whole global batch, so every example on every device and host is a
negative without a hand-written all-gather.
"""

import jax
import jax.numpy as jnp

LARGE_NUM = 1e9


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.1, *,
            return_logits: bool = False):
  """SimCLR's normalised-temperature cross-entropy for positive pairs `(z1[i], z2[i])`.

  Rows are L2-normalised. For row i the logits are `[z1 z2ᵀ, z1 z1ᵀ - 1e9·I] / T`
  with target i (cross-entropy over 2B - 1 candidates, self-similarity masked), plus
  the same with z1 and z2 swapped; the loss is the mean over rows of the sum of the
  two directions.

  Args:
    z1, z2: `[B, D]` projections of the two views (any float dtype; computed in float32).
    temperature: softmax temperature T.
    return_logits: also return `logits_ab = z1 z2ᵀ / T` (for contrastive accuracy).

  Returns:
    The scalar loss, or `(loss, logits_ab)`.
  """
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(f'nt_xent needs two [B, D] arrays of one shape, got {z1.shape} and {z2.shape}')
  z1 = _l2_normalize(z1.astype(jnp.float32))
  z2 = _l2_normalize(z2.astype(jnp.float32))
  batch = z1.shape[0]
  mask = jnp.eye(batch, dtype=jnp.float32) * LARGE_NUM
  logits_aa = z1 @ z1.T / temperature - mask
  logits_bb = z2 @ z2.T / temperature - mask
  logits_ab = z1 @ z2.T / temperature
  logits_ba = z2 @ z1.T / temperature
  labels = jnp.arange(batch)
  loss_a = _cross_entropy(jnp.concatenate([logits_ab, logits_aa], axis=1), labels)
  loss_b = _cross_entropy(jnp.concatenate([logits_ba, logits_bb], axis=1), labels)
  loss = jnp.mean(loss_a + loss_b)
  return (loss, logits_ab) if return_logits else loss


def contrastive_accuracy(logits_ab: jax.Array) -> jax.Array:
  """Fraction of rows whose most similar other-view row is their own positive."""
  return jnp.mean(jnp.argmax(logits_ab, axis=1) == jnp.arange(logits_ab.shape[0]))


def contrastive_entropy(logits_ab: jax.Array) -> jax.Array:
  """Mean entropy (nats) of each row's softmax over `logits_ab`, as SimCLR logs it
  (`contrast_entropy`, with 1e-8 added inside the log): log B for a representation
  that tells nothing apart, towards 0 as each row picks one candidate."""
  p = jax.nn.softmax(logits_ab.astype(jnp.float32), axis=1)
  return -jnp.mean(jnp.sum(p * jnp.log(p + 1e-8), axis=1))


def _l2_normalize(x, eps=1e-12):
  # As tf.math.l2_normalize: x / sqrt(max(sum(x²), eps)).
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]
