"""BatchNorm (+ ReLU) with a hand-written gradient: fewer passes over the activations.

`BatchNorm` is a drop-in for the `flax.linen.BatchNorm` the encoder uses: the same
variables (`params`: `scale`, `bias`; `batch_stats`: `mean`, `var`), the same
statistics (float32, variance as E[x²] − E[x]², biased, over every axis but the
last), the same running averages, and the same forward values. Only the training
gradient differs in how it is computed:

- it keeps as residuals the BN input (the convolution's output, in the compute
  dtype) and per-channel vectors, never a float32 copy of a centred activation;
- with `relu=True` the ReLU's mask is recomputed from that input inside the
  gradient instead of being read from the layer's output, so the gradient reads
  two activation-sized tensors (the incoming gradient and the BN input) in each of
  its two passes, the per-channel reduction and the element-wise input gradient
  `a·(g − Σg/n − x̂·Σ(g·x̂)/n)`, formed in float32.

Under `jax.jit` with the batch sharded, the reductions span the global batch, as
with the Flax module. In inference mode (`use_running_average`) it is plain JAX.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _reduction_axes(x) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def _statistics(x):
  """Per-channel batch mean and biased variance in float32 (Flax's fast variance)."""
  x32 = x.astype(jnp.float32)
  axes = _reduction_axes(x)
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(0.0, jnp.mean(x32 * x32, axes) - mean * mean)
  return mean, var


def _normalize(x, mean, inv, bias, relu: bool, dtype):
  """`(x − mean)·inv + bias` in float32 (inv = scale / √(var + ε)), ReLU, cast to `dtype`."""
  y = (x.astype(jnp.float32) - mean) * inv + bias
  if relu:
    y = jnp.maximum(y, 0.0)
  return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, relu: bool):
  """Training-mode BatchNorm (+ ReLU) of `x` `[..., C]`: returns `(y, mean, var)`.

  `y` has `x`'s dtype; `mean` and `var` are the float32 batch statistics the
  running averages are updated with. Differentiable in `x`, `scale` and `bias`
  (and through `mean` and `var`, though the encoder uses them for statistics only).
  """
  y, stats, _ = _forward(x, scale, bias, epsilon, relu)
  return (y,) + stats


def _forward(x, scale, bias, epsilon, relu):
  mean, var = _statistics(x)
  rstd = lax.rsqrt(var + epsilon)
  y = _normalize(x, mean, scale * rstd, bias, relu, x.dtype)
  return y, (mean, var), (x, mean, rstd, scale, bias)


def _fwd(x, scale, bias, epsilon, relu):
  y, stats, residuals = _forward(x, scale, bias, epsilon, relu)
  return (y,) + stats, residuals


def _bwd(epsilon, relu, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale, bias = residuals
  g, g_mean, g_var = cotangents
  axes = _reduction_axes(x)
  n = x.size // x.shape[-1]
  centred = x.astype(jnp.float32) - mean
  inv = scale * rstd
  g = g.astype(jnp.float32)
  if relu:
    g = jnp.where(centred * inv + bias > 0, g, 0.0)
  sum_g = jnp.sum(g, axes)
  sum_g_centred = jnp.sum(g * centred, axes)
  dx = (inv * (g - sum_g / n - centred * (rstd * rstd * sum_g_centred / n))
        + g_mean / n + centred * (2.0 * g_var / n))
  return dx.astype(x.dtype), sum_g_centred * rstd, sum_g


batch_norm_train.defvjp(_fwd, _bwd)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis with an optional fused ReLU and the gradient above.

  Attributes:
    use_running_average: inference mode (normalise with the stored statistics).
    momentum, epsilon: as `nn.BatchNorm` (running = momentum·running + (1−momentum)·batch).
    use_bias: learn an offset (`bias`); without it the offset is 0.
    relu: apply a ReLU to the output.
    dtype: output (compute) dtype; statistics and arithmetic are float32.
    scale_init: initialiser of `scale` (zeros for a residual block's last BN).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  use_bias: bool = True
  relu: bool = False
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    x = jnp.asarray(x, self.dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', self.scale_init, features, jnp.float32)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    else:
      bias = jnp.zeros(features, jnp.float32)
    if self.use_running_average:
      inv = scale * lax.rsqrt(ra_var.value + self.epsilon)
      return _normalize(x, ra_mean.value, inv, bias, self.relu, self.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.relu)
    if not self.is_initializing():
      mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
