"""CheXpert's policies for uncertain labels, and the masked loss that uses them.

CheXpert-style labels (CheXpert, MIMIC-CXR-JPG) take four values per observation:
1 positive, 0 negative, -1 uncertain (the report hedges) and NaN blank (the report
does not mention it). `apply_policy` turns them into training targets and a mask of
the entries that count, with Irvin et al.'s (2019) policies for the uncertain ones:

| policy     | uncertain (-1) becomes                            |
|------------|---------------------------------------------------|
| `ignore`   | left out of the loss (U-Ignore)                   |
| `zeros`    | 0 (U-Zeros)                                       |
| `ones`     | 1 (U-Ones)                                        |
| `lsr_ones` | a draw from uniform [0.55, 0.85) (LSR-Ones)       |

Everything is `jax.numpy` and works under `jax.jit`, with the policy, the blank rule
and the range as static arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigssl_med.errors import ConfigError

POLICIES = ('ignore', 'zeros', 'ones', 'lsr_ones')
BLANK_RULES = ('zeros', 'ignore')
UNCERTAIN = -1.0


def apply_policy(labels, policy: str, key: jax.Array | None = None, *,
                 blank: str = 'zeros', lsr_range: tuple[float, float] = (0.55, 0.85)
                 ) -> tuple[jax.Array, jax.Array]:
  """Targets and loss mask for CheXpert-style labels under an uncertainty policy.

  Args:
    labels: `[..., K]` floats: 1 positive, 0 negative, -1 uncertain, NaN blank. Other
      values are an error when `labels` are concrete; under `jax.jit` they cannot be
      checked and end up as target 0 with mask True.
    policy: one of `POLICIES`, for the uncertain entries.
    key: PRNG key for `lsr_ones` (one fresh key per batch); unused otherwise.
    blank: `'zeros'` (default, as the CheXpert paper: an unmentioned observation is
      negative): target 0, mask True; `'ignore'`: mask False.
    lsr_range: `(low, high)` of the uniform draw for `lsr_ones`.

  Returns:
    `(targets, mask)`: `targets` in the float dtype of `labels` (float32 for integer
    labels), 0 wherever `mask` is False, never NaN; `mask` boolean, False for the
    entries a loss must leave out.

  Raises:
    ConfigError: for an unknown policy or blank rule, or a bad `lsr_range`.
    ValueError: for `lsr_ones` without a key, or concrete labels with other values.
  """
  if policy not in POLICIES:
    raise ConfigError(f"unknown label policy '{policy}'; expected one of "
                      f"{', '.join(POLICIES)}")
  if blank not in BLANK_RULES:
    raise ConfigError(f"unknown blank label rule '{blank}'; expected one of "
                      f"{', '.join(BLANK_RULES)}")
  low, high = (float(v) for v in lsr_range)
  if not 0.0 <= low <= high <= 1.0:
    raise ConfigError(f'lsr_range must satisfy 0 <= low <= high <= 1, got {tuple(lsr_range)}')
  if policy == 'lsr_ones' and key is None:
    raise ValueError("label policy 'lsr_ones' needs a PRNG key")
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    labels = labels.astype(jnp.float32)
  if not isinstance(labels, jax.core.Tracer):
    _check_values(np.asarray(labels))

  is_blank = jnp.isnan(labels)
  is_uncertain = labels == UNCERTAIN
  is_positive = labels == 1.0
  zeros = jnp.zeros_like(labels)
  targets = jnp.where(is_positive, 1.0, zeros)
  mask = jnp.ones(labels.shape, dtype=bool)
  if blank == 'ignore':
    mask = mask & ~is_blank
  if policy == 'ignore':
    mask = mask & ~is_uncertain
  elif policy == 'ones':
    targets = jnp.where(is_uncertain, 1.0, targets)
  elif policy == 'lsr_ones':
    soft = jax.random.uniform(key, labels.shape, dtype=labels.dtype, minval=low,
                              maxval=high)
    targets = jnp.where(is_uncertain, soft, targets)
  # 'zeros': uncertain entries already hold 0.
  return jnp.where(mask, targets, zeros), mask


def masked_sigmoid_bce(logits, targets, mask=None) -> jax.Array:
  """Mean sigmoid binary cross-entropy over the entries where `mask` is True.

  Args:
    logits: `[..., K]` unnormalised scores (computed in float32).
    targets: targets in [0, 1] of the same shape (soft targets are fine); entries where
      `mask` is False may hold anything, NaN included.
    mask: booleans of the same shape; None counts every entry.

  Returns:
    The scalar mean loss, 0 when no entry is masked in. Masked-out entries contribute
    neither value nor gradient.
  """
  logits = jnp.asarray(logits, dtype=jnp.float32)
  targets = jnp.asarray(targets, dtype=jnp.float32)
  if logits.shape != targets.shape:
    raise ValueError(f'logits have shape {logits.shape}, targets {targets.shape}')
  if mask is None:
    mask = jnp.ones(logits.shape, dtype=bool)
  mask = jnp.asarray(mask, dtype=bool)
  if mask.shape != logits.shape:
    raise ValueError(f'mask has shape {mask.shape}, logits {logits.shape}')
  losses = optax.sigmoid_binary_cross_entropy(logits, jnp.where(mask, targets, 0.0))
  total = jnp.sum(jnp.where(mask, losses, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _check_values(labels: np.ndarray) -> None:
  valid = np.isnan(labels) | (labels == 1) | (labels == 0) | (labels == UNCERTAIN)
  if not valid.all():
    raise ValueError('labels must be 1, 0, -1 (uncertain) or NaN (blank), found '
                     f'{labels[~valid].flat[0]}')
