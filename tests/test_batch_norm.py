"""BatchNorm with a hand-written gradient: against float64 NumPy, Flax's module and sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigssl_med import parallel
from bigssl_med.models import batch_norm, resnet

EPS = 1e-5


def numpy_objective(x, scale, bias, w, u, v, relu):
  """float64: sum(w * BN(x)) + sum(u * batch mean) + sum(v * batch variance)."""
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = ((x - mean) ** 2).mean(axes)
  y = (x - mean) / np.sqrt(var + EPS) * scale + bias
  if relu:
    y = np.maximum(y, 0.0)
  return np.sum(w * y) + np.sum(u * mean) + np.sum(v * var)


def numerical_gradient(f, array, h=1e-6):
  grad = np.zeros_like(array)
  for i in np.ndindex(array.shape):
    up, down = array.copy(), array.copy()
    up[i] += h
    down[i] -= h
    grad[i] = (f(up) - f(down)) / (2 * h)
  return grad


@pytest.mark.parametrize('relu', [False, True])
def test_values_and_gradients_match_float64_numpy(relu):
  rng = np.random.default_rng(1 + relu)
  x = rng.normal(0.7, 1.8, (6, 3, 2, 4))
  scale, bias = rng.normal(size=4), rng.normal(size=4)
  w, u, v = rng.normal(size=x.shape), rng.normal(size=4), rng.normal(size=4)

  def objective(x, scale, bias):
    y, mean, var = batch_norm.batch_norm_train(x, scale, bias, EPS, relu)
    return jnp.sum(w * y) + jnp.sum(u * mean) + jnp.sum(v * var)

  def as32(a):
    return jnp.asarray(a, jnp.float32)
  value, grads = jax.value_and_grad(objective, argnums=(0, 1, 2))(as32(x), as32(scale),
                                                                   as32(bias))
  want = numpy_objective(x, scale, bias, w, u, v, relu)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  want_grads = (
      numerical_gradient(lambda a: numpy_objective(a, scale, bias, w, u, v, relu), x),
      numerical_gradient(lambda a: numpy_objective(x, a, bias, w, u, v, relu), scale),
      numerical_gradient(lambda a: numpy_objective(x, scale, a, w, u, v, relu), bias))
  for got, expected, name in zip(grads, want_grads, ('x', 'scale', 'bias')):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize('relu,use_bias,zero_scale', [(False, True, False), (True, True, False),
                                                      (False, False, False),
                                                      (False, True, True)])
def test_module_matches_flax_batchnorm(relu, use_bias, zero_scale):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(1.0, 2.0, (8, 5, 5, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS,
                         use_bias=use_bias, scale_init=scale_init)
  ours = batch_norm.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS,
                              use_bias=use_bias, relu=relu, scale_init=scale_init)
  variables = flax_bn.init(jax.random.key(0), x)
  our_variables = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(our_variables) == jax.tree.structure(variables)
  assert jax.tree.all(jax.tree.map(np.array_equal, our_variables, variables))
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                        variables['params'])
  stats = {'mean': jnp.asarray(rng.normal(size=6), jnp.float32),
           'var': jnp.asarray(rng.uniform(0.5, 2, size=6), jnp.float32)}

  def objective(module, activation):
    def f(params, x):
      y, updates = module.apply({'params': params, 'batch_stats': stats}, x,
                                mutable=['batch_stats'])
      y = activation(y)
      return jnp.sum(w * y), (y, updates['batch_stats'])
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)

  (_, (y_flax, stats_flax)), grads_flax = objective(flax_bn, nn.relu if relu else lambda y: y)
  (_, (y_ours, stats_ours)), grads_ours = objective(ours, lambda y: y)
  np.testing.assert_allclose(y_ours, y_flax, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(stats_ours), jax.tree.leaves(stats_flax)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(grads_ours), jax.tree.leaves(grads_flax)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  # Inference mode normalises with the stored statistics.
  flax_eval = flax_bn.clone(use_running_average=True).apply(
      {'params': params, 'batch_stats': stats}, x)
  ours_eval = ours.clone(use_running_average=True).apply(
      {'params': params, 'batch_stats': stats}, x)
  np.testing.assert_allclose(ours_eval, nn.relu(flax_eval) if relu else flax_eval,
                             rtol=1e-6, atol=1e-6)


# Each kind of block with fused BatchNorm, as a whole network where that is cheap to
# compile: ResNet-18, ResNet-18 with the SK stem and average-pool shortcuts, and one
# strided bottleneck block with a selective-kernel convolution (ResNet-50 and up).
_FUSED_BN_CASES = {
    'resnet18': (lambda fused: resnet.ResNet(depth=18, width_multiplier=0.125, fused_bn=fused),
                 (4, 32, 32, 3)),
    'resnet18_sk': (lambda fused: resnet.ResNet(depth=18, width_multiplier=0.125,
                                                sk_ratio=0.0625, fused_bn=fused),
                    (4, 32, 32, 3)),
    'bottleneck_sk': (lambda fused: resnet.BottleneckBlock(16, strides=2, projection=True,
                                                           sk_ratio=0.0625, fused_bn=fused),
                      (4, 8, 8, 32)),
}


@pytest.mark.parametrize('case', sorted(_FUSED_BN_CASES))
def test_resnet_with_fused_bn_is_the_same_function(case):
  make, shape = _FUSED_BN_CASES[case]
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  plain, fused = make(False), make(True)
  variables = plain.init(jax.random.key(0), x, train=False)
  fused_variables = fused.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(fused_variables) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(fused_variables), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  # Perturb so that no scale is zero and every gradient is non-trivial.
  params = jax.tree.map(lambda p: p + 0.1, variables['params'])

  def objective(model):
    def f(params):
      features, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                      x, train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(features)), (features, updates)
    return jax.jit(jax.grad(f, has_aux=True))(params)

  grads_plain, (features_plain, stats_plain) = objective(plain)
  grads_fused, (features_fused, stats_fused) = objective(fused)
  np.testing.assert_allclose(features_fused, features_plain, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats_fused), jax.tree.leaves(stats_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Leaves whose gradient is near zero differ by float32 rounding only: compare the
  # whole gradient, as one vector.
  def flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  assert jax.tree.structure(grads_fused) == jax.tree.structure(grads_plain)
  difference = np.abs(flat(grads_fused) - flat(grads_plain))
  assert difference.max() <= 1e-5 * np.abs(flat(grads_plain)).max()
  assert np.linalg.norm(difference) <= 1e-5 * np.linalg.norm(flat(grads_plain))


def test_sharded_over_eight_devices_equals_unsharded():
  assert jax.device_count() == 8, 'tests run with 8 fake CPU devices (see conftest.py)'
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(16, 4, 4, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  scale = jnp.asarray(rng.normal(size=8), jnp.float32)
  bias = jnp.asarray(rng.normal(size=8), jnp.float32)

  def objective(x, scale, bias):
    y, _, _ = batch_norm.batch_norm_train(x, scale, bias, EPS, True)
    return jnp.sum(w * y.astype(jnp.float32))

  step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))
  value, grads = step(x, scale, bias)
  sharded_x = jax.device_put(x, parallel.batch_sharding(parallel.data_mesh()))
  assert len(sharded_x.sharding.device_set) == 8
  sharded_value, sharded_grads = step(sharded_x, scale, bias)
  np.testing.assert_allclose(float(sharded_value), float(value), rtol=1e-5)
  assert grads[0].dtype == jnp.bfloat16
  for a, b in zip(sharded_grads, grads):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-2, atol=1e-2)
