"""ResNet and projection head: parameter counts, feature sizes, SimCLR's details."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigssl_med import models
from bigssl_med.errors import ConfigError
from bigssl_med.models import resnet


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_variables(model, size=224):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           train=False))


@pytest.mark.parametrize('depth,width,sk,expected', [
    # torchvision's ResNet-50 (25,557,032) without its fc layer (2,049,000).
    (50, 1, 0.0, 23_508_032),
    # SimCLRv2's published sizes: R50 (1x+SK) 35M, R152 (3x+SK) 795M.
    (50, 1, 0.0625, 35_215_584),
    (152, 3, 0.0625, 794_704_160),
])
def test_parameter_counts(depth, width, sk, expected):
  variables = _abstract_variables(models.ResNet(depth=depth, width_multiplier=width, sk_ratio=sk))
  assert _count(variables['params']) == expected


@pytest.mark.parametrize('depth,expected', [
    # torchvision's ResNet-18 (11,689,512) and ResNet-34 (21,797,672) without fc (513,000).
    (18, 11_176_512),
    (34, 21_284_672),
    (50, 23_508_032),  # its blocks are the same either way
])
def test_identity_shortcuts_give_torchvisions_parameter_counts(depth, expected):
  model = models.ResNet(depth=depth, identity_shortcuts=True)
  params = _abstract_variables(model)['params']
  assert _count(params) == expected
  assert ('shortcut' in params['group1_block0']) == (depth == 50)
  assert all('shortcut' in params[f'group{g}_block0'] for g in (2, 3, 4))
  simclr = _abstract_variables(models.ResNet(depth=depth))['params']
  assert 'shortcut' in simclr['group1_block0']
  assert models.encoder(_model_config(depth=depth, identity_shortcuts=True),
                        dtype=jnp.float32).identity_shortcuts
  assert not models.encoder(_model_config(depth=depth), dtype=jnp.float32).identity_shortcuts


@pytest.mark.parametrize('depth', models.DEPTHS)
def test_feature_size_for_every_depth(depth):
  model = models.ResNet(depth=depth, width_multiplier=2)
  variables = _abstract_variables(model, 64)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, 64, 64, 3)), train=False), variables)
  assert out.shape == (3, models.feature_dim(depth, 2))
  assert out.shape[1] == (4096 if depth >= 50 else 1024)


def test_width_multiplier_scales_the_stem_too():
  p = _abstract_variables(models.ResNet(depth=50, width_multiplier=2))['params']
  assert p['stem_conv']['conv']['kernel'].shape == (7, 7, 3, 128)
  p = _abstract_variables(models.ResNet(depth=50, width_multiplier=2, sk_ratio=0.0625))['params']
  assert p['stem_conv1']['conv']['kernel'].shape == (3, 3, 3, 64)  # ResNet-D stem
  assert p['stem_conv']['conv']['kernel'].shape == (3, 3, 64, 128)


def test_last_bn_scale_of_each_block_is_zero_and_others_one():
  model = models.ResNet(depth=50, width_multiplier=0.25)
  init = jax.jit(lambda r: model.init(r, jnp.zeros((1, 32, 32, 3)), train=False))
  params = init(jax.random.key(0))['params']
  blocks = [k for k in params if k.startswith('group')]
  assert len(blocks) == 16
  for name in blocks:
    assert not np.any(params[name]['bn3']['bn']['scale'])
    assert np.all(params[name]['bn1']['bn']['scale'] == 1)
  basic_model = models.ResNet(depth=18, width_multiplier=0.25)
  basic = jax.jit(lambda r: basic_model.init(r, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(0))['params']
  assert not np.any(basic['group2_block1']['bn2']['bn']['scale'])


def test_batchnorm_momentum_and_epsilon():
  found = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      found.append((context.module.momentum, context.module.epsilon))
    return next_fun(*args, **kwargs)

  model = models.contrastive_model(_model_config(), dtype=jnp.float32)
  with nn.intercept_methods(interceptor):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  assert found and set(found) == {(0.9, 1e-5)}


def _model_config(**kw):
  import ml_collections
  c = dict(depth=18, width_multiplier=0.25, sk_ratio=0.0, cifar_stem=False, head_layers=3,
           head_hidden_dim=0, head_out_dim=128)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_projection_head_layout():
  head = models.ProjectionHead(num_layers=3, out_dim=128)
  h = jnp.ones((4, 512))
  variables = head.init(jax.random.key(0), h, train=False)
  p = variables['params']
  assert p['dense0']['kernel'].shape == (512, 512) and 'bias' not in p['dense0']
  assert p['dense1']['kernel'].shape == (512, 512)
  assert p['dense2']['kernel'].shape == (512, 128) and 'bias' not in p['dense2']
  assert set(p['bn0']) == {'scale', 'bias'} and set(p['bn2']) == {'scale'}  # last BN: no beta
  outs = head.apply(variables, h, train=False)
  assert [o.shape for o in outs] == [(4, 512), (4, 512), (4, 512), (4, 128)]
  assert np.all(np.asarray(outs[1]) >= 0) and np.all(np.asarray(outs[2]) >= 0)  # ReLU
  kernel = np.asarray(p['dense0']['kernel'])
  assert abs(kernel.std() - 0.01) < 0.001


def test_projection_head_configurable():
  head = models.ProjectionHead(num_layers=2, out_dim=64, hidden_dim=256)
  variables = head.init(jax.random.key(0), jnp.ones((2, 32)), train=False)
  assert variables['params']['dense0']['kernel'].shape == (32, 256)
  assert variables['params']['dense1']['kernel'].shape == (256, 64)
  none = models.ProjectionHead(num_layers=0)
  out = none.apply(none.init(jax.random.key(0), jnp.ones((2, 32)), train=False),
                   jnp.ones((2, 32)), train=False)
  assert len(out) == 1 and out[0].shape == (2, 32)


def test_bfloat16_compute_keeps_float32_parameters():
  model = models.contrastive_model(_model_config(), dtype=jnp.bfloat16, probe_classes=7)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  features, z, logits = model.apply(variables, x, train=False)
  assert features.dtype == z.dtype == jnp.float32
  assert features.shape == (2, 128) and z.shape == (2, 128) and logits.shape == (2, 7)
  conv_dtypes, head_dtypes = [], {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv):
      conv_dtypes.append(out.dtype)
    if isinstance(context.module, nn.Dense) and 'head' in context.module.path:
      head_dtypes[context.module.name] = out.dtype
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, train=False)
  assert set(conv_dtypes) == {jnp.dtype(jnp.bfloat16)}
  # The head's hidden layers compute in bfloat16, its last layer (the loss's z) in float32.
  assert head_dtypes == {'dense0': jnp.bfloat16, 'dense1': jnp.bfloat16, 'dense2': jnp.float32}


def test_probe_sees_no_gradient_into_encoder():
  model = models.contrastive_model(_model_config(), dtype=jnp.float32, probe_classes=3)
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)

  def probe_only(params):
    _, _, logits = model.apply({**variables, 'params': params}, x, train=False)
    return jnp.sum(logits ** 2)

  grads = jax.grad(probe_only)(variables['params'])
  assert not any(np.any(g) for g in jax.tree.leaves(grads['encoder']))
  assert any(np.any(g) for g in jax.tree.leaves(grads['probe']))


def test_fixed_padding_matches_tf_for_strided_convs():
  # A strided 3x3 conv pads 1 before and 1 after (TF fixed padding), a 7x7 pads 3 and 3:
  # 224 -> 112 for the stem and 56 -> 28 for group 2, as in SimCLR.
  conv = resnet.ConvFixedPadding(features=1, kernel_size=7, strides=2)
  x = jnp.zeros((1, 224, 224, 1)).at[0, 0, 0, 0].set(1.0)
  variables = conv.init(jax.random.key(0), x)
  kernel = jnp.zeros((7, 7, 1, 1)).at[3, 3, 0, 0].set(1.0)  # identity tap at the centre
  y = conv.apply({'params': {'conv': {'kernel': kernel}}}, x)
  assert y.shape == (1, 112, 112, 1)
  # Output (0, 0) is centred on input (0, 0) because the padding before is 3.
  assert float(y[0, 0, 0, 0]) == 1.0
  del variables


def test_invalid_depth_is_a_clear_error():
  with pytest.raises(ValueError, match='depth 42'):
    _abstract_variables(models.ResNet(depth=42), 32)


@pytest.mark.parametrize('padding, xla_padding', [
    ('same', 'SAME'),
    ('symmetric', ((1, 1), (1, 1))),  # torchvision's MaxPool2d(3, 2, padding=1)
])
@pytest.mark.parametrize('shape', [(2, 16, 16, 3), (1, 7, 9, 2), (2, 6, 5, 1)])
def test_stem_max_pool_matches_xla_value_and_gradient(shape, padding, xla_padding):
  def reference(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=xla_padding)
  rng = np.random.default_rng(0)
  # Small integers: many ties, where the gradient must go to the first maximum.
  x = jnp.asarray(rng.integers(-2, 3, shape), jnp.float32)
  y, vjp = jax.vjp(lambda x: resnet.max_pool_3x3_s2(x, padding), x)
  y_ref, vjp_ref = jax.vjp(reference, x)
  np.testing.assert_array_equal(y, y_ref)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)


def test_input_normalization_standardises_rgb_input_before_the_stem():
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  plain = models.ResNet(depth=18, width_multiplier=0.25)
  variables = plain.init(jax.random.key(1), images, train=False)
  mean = jnp.array([0.485, 0.456, 0.406])
  std = jnp.array([0.229, 0.224, 0.225])
  want = plain.apply(variables, (images - mean) / std, train=False)
  normalising = models.encoder(_model_config(input_normalization='imagenet'), dtype=jnp.float32)
  np.testing.assert_allclose(normalising.apply(variables, images, train=False), want,
                             rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(plain.apply(variables, images, train=False) - want)).max() > 1e-3
  with pytest.raises(ValueError, match="input_normalization='imagenet' needs RGB images, got 1"):
    normalising.init(jax.random.key(1), images[..., :1], train=False)
  with pytest.raises(ConfigError, match=r"input_normalization='caffe' is not one of"):
    models.encoder(_model_config(input_normalization='caffe'), dtype=jnp.float32)


def test_stem_pool_padding_is_read_from_the_config_and_checked():
  assert models.encoder(_model_config(), dtype=jnp.float32).stem_pool_padding == 'same'
  encoder = models.encoder(_model_config(stem_pool_padding='symmetric'), dtype=jnp.float32)
  assert encoder.stem_pool_padding == 'symmetric'
  with pytest.raises(ConfigError, match=r"stem_pool_padding='torch' is not one of"):
    models.encoder(_model_config(stem_pool_padding='torch'), dtype=jnp.float32)


def test_conv_padding_same_pads_strided_convolutions_as_tf_same():
  assert models.encoder(_model_config(), dtype=jnp.float32).conv_padding == 'fixed'
  with pytest.raises(ConfigError, match=r"conv_padding='valid' is not one of"):
    models.encoder(_model_config(conv_padding='valid'), dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 2)), jnp.float32)
  kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 2, 4)), jnp.float32)
  variables = {'params': {'conv': {'kernel': kernel}}}
  for size, stride, pads in ((3, 2, ((0, 1), (0, 1))), (3, 1, ((1, 1), (1, 1)))):
    same = resnet.ConvFixedPadding(4, size, stride, padding='same').apply(variables, x)
    want = jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision='highest')
    np.testing.assert_allclose(same, want, rtol=1e-5, atol=1e-5)  # TF SAME: the odd pixel after
  fixed = resnet.ConvFixedPadding(4, 3, 2).apply(variables, x)
  want = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision='highest')
  np.testing.assert_allclose(fixed, want, rtol=1e-5, atol=1e-5)  # SimCLR's: one each side
