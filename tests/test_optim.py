"""LARS as SimCLR's LARSOptimizer, its exclusion masks, schedules and durations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import numpy as np
import pytest

from bigssl_med import models, optim
from bigssl_med.errors import ConfigError


def _model():
  cfg = ml_collections.ConfigDict(dict(depth=18, width_multiplier=0.125, sk_ratio=0.0625,
                                       cifar_stem=False, head_layers=3, head_hidden_dim=0,
                                       head_out_dim=16))
  return models.contrastive_model(cfg, dtype=jnp.float32, probe_classes=3)


def _bn_and_bias_paths(model, x):
  """Paths of BN parameters and biases, found from the modules that own them."""
  owners = {}

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, nn.BatchNorm):
      owners[m.path] = ('scale', 'bias')
    elif isinstance(m, (nn.Dense, nn.Conv)) and m.use_bias:
      owners[m.path] = ('bias',)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  excluded = set()
  for path, leaves in owners.items():
    for leaf in leaves:
      node = variables['params']
      for key in path:
        node = node.get(key, {})  # a BatchNorm without scale and offset has no params
      if leaf in node:
        excluded.add(tuple(path) + (leaf,))
  return variables['params'], excluded


def test_masks_cover_exactly_bn_parameters_and_biases():
  params, excluded = _bn_and_bias_paths(_model(), jnp.zeros((1, 32, 32, 3)))
  mask = optim.decay_mask(params)
  flat = {tuple(getattr(k, 'key', k) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  not_decayed = {p for p, v in flat.items() if not v}
  probe = {p for p in flat if p[0] == 'probe'}
  # Excluded: every BN parameter and every bias (the probe's bias among them), and the
  # probe's kernel, which SimCLR regularises in the loss instead.
  assert not_decayed == excluded | probe
  assert any(p[-1] == 'scale' for p in excluded) and ('probe', 'bias') in excluded
  assert all(p[-1] == 'kernel' for p, v in flat.items() if v)
  assert sum(flat.values()) > 20


def reference_lars(params, grads_seq, lr_seq, *, momentum, weight_decay, eeta, decayed):
  """SimCLR's LARSOptimizer (classic momentum) in float64, one leaf at a time."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  velocity = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lr_seq):
    for k in params:
      g = np.asarray(grads[k], np.float64)
      w = params[k]
      if decayed[k]:
        g = g + weight_decay * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        trust = eeta * w_norm / g_norm if (w_norm > 0 and g_norm > 0) else 1.0
      else:
        trust = 1.0
      velocity[k] = momentum * velocity[k] + lr * trust * g
      params[k] = w - velocity[k]
  return params


@pytest.mark.parametrize('batched_norms', [False, True])
def test_lars_matches_simclr_reference(batched_norms):
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
            'bn': {'scale': rng.normal(size=(8,)).astype(np.float32),
                   'bias': rng.normal(size=(8,)).astype(np.float32)},
            'zero': {'kernel': np.zeros((5,), np.float32)}}
  grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
               for _ in range(3)]
  def schedule(step):
    return 0.5 + 0.25 * step
  cfg = ml_collections.ConfigDict(dict(name='lars', momentum=0.9, weight_decay=1e-2,
                                       trust_coefficient=1e-3, lars_batched_norms=batched_norms))
  tx = optim.build_optimizer(cfg, schedule, params)
  state = tx.init(params)
  p = jax.tree.map(jnp.asarray, params)
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  def flat(t):
    return {'/'.join(getattr(k, 'key', str(k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  decayed = flat(optim.decay_mask(params))
  assert decayed == {'conv/kernel': True, 'bn/scale': False, 'bn/bias': False, 'zero/kernel': True}
  want = reference_lars(flat(params), [flat(g) for g in grads_seq], [schedule(i) for i in range(3)],
                        momentum=0.9, weight_decay=1e-2, eeta=1e-3, decayed=decayed)
  got = flat(p)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-7, err_msg=k)


def test_sums_of_squares_in_one_reduction_match_numpy():
  rng = np.random.default_rng(2)
  shapes = [(7, 7, 3, 64), (1,), (1024,), (1025,), (3, 0), (2, 2048)]
  leaves = [rng.normal(size=shape) for shape in shapes]
  got = optim.sums_of_squares([jnp.asarray(x, jnp.float32) for x in leaves])
  np.testing.assert_allclose(np.asarray(got), [np.sum(x.astype(np.float64) ** 2) for x in leaves],
                             rtol=1e-5)


def test_lars_state_is_the_same_with_batched_norms():
  params, _ = _bn_and_bias_paths(_model(), jnp.zeros((1, 32, 32, 3)))
  states = [optim.lars(optax.constant_schedule(0.1), weight_decay=1e-6,
                       mask=optim.decay_mask(params), trust_coefficient=1e-3, momentum=0.9,
                       batched_norms=batched).init(params) for batched in (False, True)]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])


def test_head_l2_is_simclr_head_regulariser():
  params = {'probe': {'kernel': jnp.full((2, 3), 2.0), 'bias': jnp.ones(3)},
            'classifier': {'kernel': jnp.full((3, 1), 3.0), 'bias': jnp.ones(1)}}
  np.testing.assert_allclose(float(optim.head_l2(params, 1e-6)), 1e-6 * 0.5 * 4 * 6)
  np.testing.assert_allclose(float(optim.head_l2(params, 1e-6, ('probe', 'classifier'))),
                             1e-6 * 0.5 * (4 * 6 + 9 * 3))
  assert float(optim.head_l2({'encoder': {}}, 1e-6)) == 0.0


def _finetune_params():
  rng = np.random.default_rng(3)
  return {'encoder': {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
                      'bn': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}},
          'classifier': {'kernel': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                         'bias': jnp.asarray(rng.normal(size=5), jnp.float32)}}


@pytest.mark.parametrize('name', ['lars', 'momentum'])
def test_lars_leaves_the_classifier_to_the_loss_as_simclr_fine_tunes(name):
  """Under LARS the classifier is out of the decay and the trust ratio (SimCLR's
  head_supervised, regularised in the loss); other optimisers decay it as any kernel."""
  params = _finetune_params()
  cfg = ml_collections.ConfigDict(dict(name=name, weight_decay=1e-2, trust_coefficient=1e-3,
                                       momentum=0.9, lars_batched_norms=False))
  mask = optim.decay_mask(params, optim.lars_heads(cfg))
  assert bool(mask['classifier']['kernel']) is (name != 'lars')
  assert bool(mask['encoder']['conv']['kernel']) and not mask['encoder']['bn']['scale']
  if name != 'lars':
    return
  lr = 0.5
  tx = optim.build_optimizer(cfg, optax.constant_schedule(lr), params)
  rng = np.random.default_rng(4)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  # The loss's L2 term, as the fine-tuning step adds it, enters the classifier's gradient.
  l2_grads = jax.grad(lambda p: optim.head_l2(p, cfg.weight_decay, ('classifier',)))(params)
  total = jax.tree.map(jnp.add, grads, l2_grads)
  updates, _ = tx.update(total, tx.init(params), params)
  k, g = (np.asarray(t['classifier']['kernel'], np.float64) for t in (params, grads))
  np.testing.assert_allclose(np.asarray(updates['classifier']['kernel']),
                             -lr * (g + cfg.weight_decay * k), rtol=1e-5)
  w, gw = (np.asarray(t['encoder']['conv']['kernel'], np.float64) for t in (params, grads))
  u = gw + cfg.weight_decay * w
  trust = 1e-3 * np.linalg.norm(w) / np.linalg.norm(u)
  np.testing.assert_allclose(np.asarray(updates['encoder']['conv']['kernel']), -lr * trust * u,
                             rtol=1e-5)
  # The optimiser state does not depend on the mask: checkpoints resume either way.
  old = optim.lars(optax.constant_schedule(lr), weight_decay=1e-2, mask=optim.decay_mask(params),
                   trust_coefficient=1e-3, momentum=0.9).init(params)
  assert jax.tree.structure(old) == jax.tree.structure(tx.init(params))


def test_learning_rate_scaling():
  assert optim.peak_learning_rate(0.3, 'linear', 4096) == pytest.approx(4.8)
  assert optim.peak_learning_rate(0.075, 'sqrt', 4096) == pytest.approx(4.8)
  with pytest.raises(ConfigError, match='lr_scaling'):
    optim.peak_learning_rate(0.3, 'cubic', 256)


def test_warmup_then_cosine_to_zero():
  s = optim.warmup_cosine(2.0, total_steps=110, warmup_steps=10)
  np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10)], [0.0, 1.0, 2.0], atol=1e-6)
  # Cosine over the remaining 100 steps: half-way it is half the peak.
  np.testing.assert_allclose(float(s(60)), 1.0, atol=1e-6)
  np.testing.assert_allclose(float(s(110)), 0.0, atol=1e-6)
  no_warmup = optim.warmup_cosine(2.0, total_steps=100, warmup_steps=0)
  np.testing.assert_allclose([float(no_warmup(0)), float(no_warmup(50))], [2.0, 1.0], atol=1e-6)
  with pytest.raises(ConfigError, match='warm-up'):
    optim.warmup_cosine(1.0, total_steps=10, warmup_steps=11)


def test_durations_in_steps_or_epochs():
  assert optim.resolve_steps(steps=500, epochs=0, steps_per_epoch=10, what='x') == 500
  assert optim.resolve_steps(steps=0, epochs=2.5, steps_per_epoch=10, what='x') == 25
  assert optim.resolve_steps(steps=0, epochs=0, steps_per_epoch=10, what='w', allow_zero=True) == 0
  with pytest.raises(ConfigError, match='both total_steps/num_epochs'):
    optim.resolve_steps(steps=5, epochs=1, steps_per_epoch=10, what='total_steps/num_epochs')
  with pytest.raises(ConfigError, match='neither'):
    optim.resolve_steps(steps=0, epochs=0, steps_per_epoch=10, what='total_steps/num_epochs')


def test_unknown_optimizer_is_a_config_error():
  cfg = ml_collections.ConfigDict(dict(name='rmsprop', momentum=0.9, weight_decay=0.0,
                                       trust_coefficient=1e-3))
  with pytest.raises(ConfigError, match='rmsprop'):
    optim.build_optimizer(cfg, 0.1, {'w': {'kernel': jnp.ones(2)}})


def test_run_length_from_epochs_caps_warmup_and_rejects_a_batch_larger_than_the_data():
  cfg = ml_collections.ConfigDict(dict(batch_size=10, total_steps=0, num_epochs=2.0,
                                       optimizer=dict(warmup_steps=0, warmup_epochs=5.0)))
  # An epoch is N/B steps, as SimCLR counts them: 2 epochs of 95 images at 10 a step are
  # 19 steps, not 2 x 9.
  assert optim.run_length(cfg, 95, 'images of x/train') == (9.5, 19, 19)
  cfg.num_epochs, cfg.optimizer.warmup_epochs = 100.0, 10.0
  assert optim.run_length(cfg, 1000, 'images of x/train')[1:] == (round(100 * 1000 / 10),
                                                                  round(10 * 1000 / 10))
  cfg.batch_size = 256  # SimCLR's counts for 1,000 images: 1000·100//256 + 1 = 391 and 39
  assert optim.run_length(cfg, 1000, 'images of x/train')[1:] == (391, 39)
  with pytest.raises(ConfigError, match=r'batch_size=256 is larger than the 9 images of x/train'):
    optim.run_length(cfg, 9, 'images of x/train')


def test_a_warm_up_as_long_as_the_run_is_a_warning(caplog):
  with caplog.at_level('WARNING'):
    schedule = optim.warmup_cosine(0.4, 10, 10)
  assert float(schedule(10)) == pytest.approx(0.4)
  assert 'The warm-up takes all 10 steps: the learning rate ends at its peak 0.4' in caplog.text
  caplog.clear()
  with caplog.at_level('WARNING'):
    optim.warmup_cosine(0.4, 10, 2)
  assert not caplog.text
