"""Independent float64 NumPy reference forwards of published ImageNet ResNets.

Three source layouts are covered, each written from the original library's model
definition and not from this project's Flax models, so that tests of the weight
importer compare against something built separately:

* torchvision: `resnet{depth}().state_dict()` keys (PyTorch OIHW kernels), and the
  eval-mode forward up to the global average pool (ResNet v1.5 bottlenecks).
* SimCLR v1/v2 TensorFlow-1 checkpoints: variables named by creation order
  (`conv2d_7/kernel`, `batch_normalization_3/gamma`, ...), HWIO kernels, optional
  selective-kernel (SK) convolutions with a ResNet-D stem and shortcuts, and the
  SimCLRv2 projection head under `head_contrastive/`.
* BYOL's Haiku ResNet: module names `res_net50/~/block_group_0/~/block_0/~/conv_0`,
  HWIO kernels, TF 'SAME' padding of every convolution (strided ones too) and of the
  max-pooling, BatchNorm statistics in Haiku's moving averages, ImageNet input
  standardisation.

Images are NHWC float64 arrays (N, H, W, 3). Random weight generators return float32
arrays, as real checkpoints hold; the forwards compute in float64. Widths follow
`c_g = max(1, int(round(64 * 2**g * width_multiplier)))` for block group g (the stem
uses c_0), so tiny models exist for fast tests.
"""

import re

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BN_EPSILON = 1e-5

# depth -> (block kind, blocks per group).
_ARCHS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}
_GROUP_STRIDES = (1, 2, 2, 2)


def _arch(depth):
  """Returns (block kind, blocks per group) for a ResNet depth."""
  if depth not in _ARCHS:
    raise ValueError(f'Unsupported ResNet depth {depth}; expected one of {sorted(_ARCHS)}.')
  return _ARCHS[depth]


def group_widths(width_multiplier):
  """Base widths c_0..c_3 of the four block groups (the stem uses c_0)."""
  return tuple(max(1, int(round(64 * 2**g * width_multiplier))) for g in range(4))


# ----------------------------------------------------------------------------------
# Shared NumPy primitives (NHWC, float64).


def _pad_hw(x, pads, value=0.0):
  """Pads H and W of an NHWC array by ((top, bottom), (left, right))."""
  (top, bottom), (left, right) = pads
  if not (top or bottom or left or right):
    return x
  return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def _windows(x, size, stride):
  """Strided (size x size) windows of an NHWC array: (N, Ho, Wo, C, size, size)."""
  return sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]


def _conv2d(x, kernel, stride=1, pads=((0, 0), (0, 0))):
  """Cross-correlation of NHWC `x` with an HWIO kernel, zero padding, no bias."""
  kernel = np.asarray(kernel, np.float64)
  kh, kw, cin, _ = kernel.shape
  if kh != kw:
    raise ValueError(f'Only square kernels are supported, got {kernel.shape}.')
  if x.shape[-1] != cin:
    raise ValueError(f'Input has {x.shape[-1]} channels, kernel expects {cin}.')
  x = _pad_hw(x, pads)
  if kh == 1:
    return x[:, ::stride, ::stride, :] @ kernel[0, 0]
  cols = _windows(x, kh, stride)  # (N, Ho, Wo, C, kh, kw)
  return np.tensordot(cols, kernel, axes=((4, 5, 3), (0, 1, 2)))


def _max_pool(x, size, stride, pads):
  """Max pool with -inf padding."""
  return _windows(_pad_hw(x, pads, -np.inf), size, stride).max(axis=(-2, -1))


def _batch_norm(x, mean, var, scale=None, offset=None):
  """Inference batch norm over the last axis (scale 1 / offset 0 when absent)."""
  y = (x - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + BN_EPSILON)
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if offset is not None:
    y = y + np.asarray(offset, np.float64)
  return y


def _relu(x):
  """Elementwise ReLU."""
  return np.maximum(x, 0.0)


def _images(images):
  """Validates and converts an NHWC image batch to float64."""
  images = np.asarray(images, np.float64)
  if images.ndim != 4:
    raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
  return images


def _kaiming(rng, shape, fan_in):
  """float32 N(0, sqrt(2 / fan_in)) weights."""
  return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)


def _bn_stats(rng, channels):
  """Random (scale, offset, mean, variance) float32 vectors with positive variance."""
  return (rng.uniform(0.5, 1.5, channels).astype(np.float32),
          rng.normal(0.0, 0.1, channels).astype(np.float32),
          rng.normal(0.0, 0.1, channels).astype(np.float32),
          rng.uniform(0.5, 1.5, channels).astype(np.float32))


# ----------------------------------------------------------------------------------
# torchvision layout.


def torchvision_state_dict(depth, width_multiplier=1.0, *, seed=0, num_classes=0):
  """Random weights with the keys, order and shapes of torchvision's resnet{depth}.

  Args:
    depth: 18, 34, 50, 101, 152 or 200 (200 generalises torchvision's naming).
    width_multiplier: scales every width (see `group_widths`).
    seed: NumPy random seed.
    num_classes: if > 0, adds `fc.weight` (num_classes, C) and `fc.bias`.

  Returns:
    An ordered dict of float32 arrays (`num_batches_tracked` is a 0-d int64 array).
  """
  kind, blocks = _arch(depth)
  widths = group_widths(width_multiplier)
  expansion = 1 if kind == 'basic' else 4
  rng = np.random.default_rng(seed)
  state = {}

  def conv(name, out_ch, in_ch, size):
    state[f'{name}.weight'] = _kaiming(rng, (out_ch, in_ch, size, size), in_ch * size * size)

  def bn(name, channels):
    scale, offset, mean, var = _bn_stats(rng, channels)
    state[f'{name}.weight'] = scale
    state[f'{name}.bias'] = offset
    state[f'{name}.running_mean'] = mean
    state[f'{name}.running_var'] = var
    state[f'{name}.num_batches_tracked'] = np.array(0, np.int64)

  conv('conv1', widths[0], 3, 7)
  bn('bn1', widths[0])
  in_ch = widths[0]
  for g, (planes, count) in enumerate(zip(widths, blocks)):
    out_ch = planes * expansion
    for i in range(count):
      p = f'layer{g + 1}.{i}'
      stride = _GROUP_STRIDES[g] if i == 0 else 1
      if kind == 'basic':
        conv(f'{p}.conv1', planes, in_ch, 3)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
      else:
        conv(f'{p}.conv1', planes, in_ch, 1)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
        conv(f'{p}.conv3', out_ch, planes, 1)
        bn(f'{p}.bn3', out_ch)
      if stride != 1 or in_ch != out_ch:
        conv(f'{p}.downsample.0', out_ch, in_ch, 1)
        bn(f'{p}.downsample.1', out_ch)
      in_ch = out_ch
  if num_classes > 0:
    bound = 1.0 / np.sqrt(in_ch)
    state['fc.weight'] = rng.uniform(-bound, bound, (num_classes, in_ch)).astype(np.float32)
    state['fc.bias'] = rng.uniform(-bound, bound, num_classes).astype(np.float32)
  return state


class _TorchReader:
  """Reads a torchvision state dict and records which keys were used."""

  def __init__(self, state, train=False):
    self.state = state
    self.train = train
    self.used = set()

  def get(self, key):
    self.used.add(key)
    return np.asarray(self.state[key], np.float64)

  def has(self, key):
    return key in self.state

  def conv(self, name, x, stride, padding):
    """PyTorch Conv2d (OIHW weight, symmetric padding, no bias)."""
    kernel = self.get(f'{name}.weight').transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return _conv2d(x, kernel, stride, ((padding, padding), (padding, padding)))

  def bn(self, name, x):
    """PyTorch BatchNorm2d: eval mode, or training mode (batch mean, biased variance)."""
    self.used.add(f'{name}.num_batches_tracked')
    mean, var = self.get(f'{name}.running_mean'), self.get(f'{name}.running_var')
    if self.train:
      mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return _batch_norm(x, mean, var, self.get(f'{name}.weight'), self.get(f'{name}.bias'))


def torchvision_features(state, images, depth, train=False):
  """torchvision ResNet forward up to the global average pool (eval mode by default).

  Args:
    state: a torchvision-layout state dict (NumPy arrays; any width).
    images: (N, H, W, 3) NHWC images.
    depth: the ResNet depth (selects block kind and blocks per group).
    train: BatchNorm in training mode (normalised by the batch's own statistics).

  Returns:
    (N, C) float64 pooled features (the input of `fc`).
  """
  kind, blocks = _arch(depth)
  r = _TorchReader(state, train)
  x = r.conv('conv1', _images(images), 2, 3)
  x = _relu(r.bn('bn1', x))
  x = _max_pool(x, 3, 2, ((1, 1), (1, 1)))
  for g, count in enumerate(blocks):
    for i in range(count):
      p = f'layer{g + 1}.{i}'
      stride = _GROUP_STRIDES[g] if i == 0 else 1
      if kind == 'basic':
        out = _relu(r.bn(f'{p}.bn1', r.conv(f'{p}.conv1', x, stride, 1)))
        out = r.bn(f'{p}.bn2', r.conv(f'{p}.conv2', out, 1, 1))
      else:
        out = _relu(r.bn(f'{p}.bn1', r.conv(f'{p}.conv1', x, 1, 0)))
        out = _relu(r.bn(f'{p}.bn2', r.conv(f'{p}.conv2', out, stride, 1)))
        out = r.bn(f'{p}.bn3', r.conv(f'{p}.conv3', out, 1, 0))
      if r.has(f'{p}.downsample.0.weight'):
        shortcut = r.bn(f'{p}.downsample.1', r.conv(f'{p}.downsample.0', x, stride, 0))
      else:
        shortcut = x
      if shortcut.shape != out.shape:
        raise ValueError(f'{p}: shortcut {shortcut.shape} does not match {out.shape}.')
      x = _relu(out + shortcut)
  unused = set(state) - r.used - {'fc.weight', 'fc.bias'}
  assert not unused, f'Unused torchvision keys: {sorted(unused)}'
  return x.mean(axis=(1, 2))


# ----------------------------------------------------------------------------------
# SimCLR TF1 layout.


def _tf_same_pads(size, kernel, stride):
  """TF 'SAME' padding (before, after) for one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _tf_conv(x, kernel, stride):
  """SimCLR's conv2d_fixed_padding: fixed padding if strided, else 'SAME'."""
  size = kernel.shape[0]
  if stride > 1:
    before = (size - 1) // 2
    pads = ((before, size - 1 - before),) * 2
  else:
    pads = (_tf_same_pads(x.shape[1], size, 1), _tf_same_pads(x.shape[2], size, 1))
  return _conv2d(x, kernel, stride, pads)


def _tf_max_pool_same(x, size, stride):
  """tf.layers.max_pooling2d with padding 'SAME'."""
  pads = (_tf_same_pads(x.shape[1], size, stride), _tf_same_pads(x.shape[2], size, stride))
  return _max_pool(x, size, stride, pads)


def _resnet_d_pool(x, stride):
  """ResNet-D shortcut pooling: 2x2 average pool (SimCLR SK projection)."""
  if stride > 1:
    # fixed_padding(inputs, 2) pads zeros (0, 1); VALID pool then counts them.
    return _windows(_pad_hw(x, ((0, 1), (0, 1))), 2, stride).mean(axis=(-2, -1))
  # 'SAME' average pooling: TF averages over the valid (unpadded) pixels only.
  pads = (_tf_same_pads(x.shape[1], 2, 1), _tf_same_pads(x.shape[2], 2, 1))
  total = _windows(_pad_hw(x, pads), 2, 1).sum(axis=(-2, -1))
  count = _windows(_pad_hw(np.ones_like(x[..., :1]), pads), 2, 1).sum(axis=(-2, -1))
  return total / count


_TF_LAYER_RE = re.compile(r'(conv2d|batch_normalization)(?:_(\d+))?/([A-Za-z_]+)')


class _CreationOrderReader:
  """Hands out a prefix's conv2d_k / batch_normalization_k variables in order k."""

  def __init__(self, variables, prefix):
    convs, bns = {}, {}
    for name, value in variables.items():
      if not name.startswith(prefix):
        continue
      match = _TF_LAYER_RE.fullmatch(name[len(prefix):])
      if match is None:
        continue
      layer, index, leaf = match.groups()
      index = int(index) if index is not None else 0
      if layer == 'conv2d':
        if leaf != 'kernel':
          raise ValueError(f'Unexpected conv variable {name}.')
        convs[index] = value
      else:
        bns.setdefault(index, {})[leaf] = value
    for label, found in (('conv2d', convs), ('batch_normalization', bns)):
      if sorted(found) != list(range(len(found))):
        raise ValueError(f'{prefix}{label} indices are not contiguous: {sorted(found)}.')
    self._convs = [np.asarray(convs[k], np.float64) for k in range(len(convs))]
    self._bns = [bns[k] for k in range(len(bns))]
    self._next_conv = 0
    self._next_bn = 0

  def conv(self, x, stride):
    """Applies the next conv2d kernel with SimCLR's padding rule."""
    kernel = self._convs[self._next_conv]
    self._next_conv += 1
    return _tf_conv(x, kernel, stride)

  def bn(self, x, relu=True):
    """Applies the next batch_normalization layer (inference), then optional ReLU."""
    params = self._bns[self._next_bn]
    self._next_bn += 1
    y = _batch_norm(x, params['moving_mean'], params['moving_variance'],
                    params.get('gamma'), params.get('beta'))
    return _relu(y) if relu else y

  def check_all_used(self):
    assert self._next_conv == len(self._convs), (
        f'Used {self._next_conv} of {len(self._convs)} conv2d kernels.')
    assert self._next_bn == len(self._bns), (
        f'Used {self._next_bn} of {len(self._bns)} batch_normalization layers.')


def _sk_conv(r, x, stride):
  """SimCLR's selective-kernel conv: two 3x3 streams mixed by a softmax gate."""
  x = r.bn(r.conv(x, stride))
  half = x.shape[-1] // 2
  streams = np.stack([x[..., :half], x[..., half:]])  # (2, N, H, W, c)
  pooled = streams.sum(axis=0).mean(axis=(1, 2), keepdims=True)
  gate = r.bn(r.conv(pooled, 1))
  logits = r.conv(gate, 1)
  logits = np.stack([logits[..., :half], logits[..., half:]])  # (2, N, 1, 1, c)
  weights = np.exp(logits - logits.max(axis=0))
  weights /= weights.sum(axis=0)
  return (streams * weights).sum(axis=0)


def _simclr_shortcut(r, x, stride, sk):
  """Projection shortcut (created before the block's main path)."""
  if sk:
    return r.bn(r.conv(_resnet_d_pool(x, stride), 1), relu=False)
  return r.bn(r.conv(x, stride), relu=False)


def simclr_tf1_features(variables, images, depth, sk_ratio=0.0, *, prefix='base_model/',
                        cifar_stem=False):
  """Eval-mode SimCLR (TF1 `resnet.py`) forward up to the global average pool.

  Args:
    variables: name -> array, with `{prefix}conv2d[_k]/kernel` (HWIO) and
      `{prefix}batch_normalization[_k]/{gamma,beta,moving_mean,moving_variance}`.
    images: (N, H, W, 3) NHWC images.
    depth: the ResNet depth.
    sk_ratio: > 0 selects selective-kernel blocks with ResNet-D stem/shortcuts.
    prefix: the variable scope of the backbone.
    cifar_stem: a 3x3 stride-1 stem without max pool.

  Returns:
    (N, C) float64 pooled features.
  """
  kind, blocks = _arch(depth)
  sk = sk_ratio > 0
  if sk and kind == 'basic':
    raise ValueError('Selective kernels are only supported for bottleneck ResNets (>= 50).')
  r = _CreationOrderReader(variables, prefix)
  x = _images(images)
  if cifar_stem:
    x = r.bn(r.conv(x, 1))
  else:
    if sk:
      x = r.bn(r.conv(x, 2))
      x = r.bn(r.conv(x, 1))
      x = r.bn(r.conv(x, 1))
    else:
      x = r.bn(r.conv(x, 2))
    x = _tf_max_pool_same(x, 3, 2)
  for g, count in enumerate(blocks):
    for i in range(count):
      stride = _GROUP_STRIDES[g] if i == 0 else 1
      shortcut = _simclr_shortcut(r, x, stride, sk) if i == 0 else x
      if kind == 'basic':
        out = r.bn(r.conv(x, stride))
        out = r.bn(r.conv(out, 1), relu=False)
      else:
        out = r.bn(r.conv(x, 1))
        out = _sk_conv(r, out, stride) if sk else r.bn(r.conv(out, stride))
        out = r.bn(r.conv(out, 1), relu=False)
      if shortcut.shape != out.shape:
        raise ValueError(f'Group {g} block {i}: shortcut {shortcut.shape} vs {out.shape}.')
      x = _relu(out + shortcut)
  r.check_all_used()
  return x.mean(axis=(1, 2))


def simclr_tf1_head(variables, features, *, prefix='head_contrastive/'):
  """SimCLRv2 projection head (`model_util.projection_head`), inference mode.

  Args:
    variables: name -> array with `{prefix}nl_{j}/dense/kernel` (in, out) and
      `{prefix}nl_{j}/batch_normalization/*` for j = 0, 1, ...
    features: (N, C) backbone features.
    prefix: the head's variable scope.

  Returns:
    [features, output of layer 0, ..., output of the last layer], float64. Hidden
    layers are dense + BN + ReLU; the last is dense + BN (no beta), no ReLU.
  """
  num_layers = 0
  while f'{prefix}nl_{num_layers}/dense/kernel' in variables:
    num_layers += 1
  if not num_layers:
    raise ValueError(f'No projection head layers under {prefix!r}.')
  h = np.asarray(features, np.float64)
  outputs = [h]
  for j in range(num_layers):
    scope = f'{prefix}nl_{j}/'
    h = h @ np.asarray(variables[f'{scope}dense/kernel'], np.float64)
    if f'{scope}dense/bias' in variables:
      h = h + np.asarray(variables[f'{scope}dense/bias'], np.float64)
    bn = f'{scope}batch_normalization/'
    h = _batch_norm(h, variables[f'{bn}moving_mean'], variables[f'{bn}moving_variance'],
                    variables.get(f'{bn}gamma'), variables.get(f'{bn}beta'))
    if j < num_layers - 1:
      h = _relu(h)
    outputs.append(h)
  return outputs


def simclr_tf1_variables(depth, width_multiplier=1.0, sk_ratio=0.0, *, seed=0,
                         cifar_stem=False, head_layers=3, head_out_dim=128,
                         prefix='base_model/', extras=True):
  """Random float32 variables named as a SimCLR TF1 checkpoint names them.

  Args:
    depth: the ResNet depth.
    width_multiplier: scales every width (see `group_widths`).
    sk_ratio: > 0 builds selective-kernel bottlenecks and the ResNet-D stem.
    seed: NumPy random seed.
    cifar_stem: a single 3x3 stride-1 stem conv (no max pool).
    head_layers: number of `head_contrastive/nl_{j}` layers (0 for none).
    head_out_dim: output width of the last head layer.
    prefix: the backbone's variable scope.
    extras: also add `global_step`, `/Momentum` slots and `head_supervised/`.

  Returns:
    name -> array (float32, `global_step` int64).
  """
  kind, blocks = _arch(depth)
  sk = sk_ratio > 0
  if sk and kind == 'basic':
    raise ValueError('Selective kernels are only supported for bottleneck ResNets (>= 50).')
  widths = group_widths(width_multiplier)
  rng = np.random.default_rng(seed)
  variables = {}
  trainable = []
  counts = {'conv2d': 0, 'batch_normalization': 0}

  def layer_scope(layer):
    index = counts[layer]
    counts[layer] += 1
    return f'{prefix}{layer}' + (f'_{index}' if index else '') + '/'

  def add(name, value, train=True):
    variables[name] = value
    if train:
      trainable.append(name)

  def conv(in_ch, out_ch, size):
    add(layer_scope('conv2d') + 'kernel',
        _kaiming(rng, (size, size, in_ch, out_ch), size * size * in_ch))
    return out_ch

  def bn(scope, channels, center=True):
    scale, offset, mean, var = _bn_stats(rng, channels)
    add(scope + 'gamma', scale)
    if center:
      add(scope + 'beta', offset)
    add(scope + 'moving_mean', mean, train=False)
    add(scope + 'moving_variance', var, train=False)

  def conv_bn(in_ch, out_ch, size):
    conv(in_ch, out_ch, size)
    bn(layer_scope('batch_normalization'), out_ch)
    return out_ch

  c0 = widths[0]
  if cifar_stem:
    ch = conv_bn(3, c0, 3)
  elif sk:  # ResNet-D stem; max(1, .) only matters for widths SimCLR never used.
    ch = conv_bn(3, max(1, c0 // 2), 3)
    ch = conv_bn(ch, max(1, c0 // 2), 3)
    ch = conv_bn(ch, c0, 3)
  else:
    ch = conv_bn(3, c0, 7)
  for planes, count in zip(widths, blocks):
    out_ch = planes if kind == 'basic' else 4 * planes
    for i in range(count):
      if i == 0:
        conv_bn(ch, out_ch, 1)  # Projection shortcut.
      if kind == 'basic':
        conv_bn(ch, planes, 3)
        conv_bn(planes, planes, 3)
      else:
        conv_bn(ch, planes, 1)
        if sk:
          conv_bn(planes, 2 * planes, 3)
          mid = max(int(planes * sk_ratio), 32)
          conv_bn(planes, mid, 1)
          conv(mid, 2 * planes, 1)
        else:
          conv_bn(planes, planes, 3)
        conv_bn(planes, out_ch, 1)
      ch = out_ch

  in_dim = ch
  for j in range(head_layers):
    last = j == head_layers - 1
    out_dim = head_out_dim if last else ch
    scope = f'head_contrastive/nl_{j}/'
    add(scope + 'dense/kernel', _kaiming(rng, (in_dim, out_dim), in_dim))
    bn(scope + 'batch_normalization/', out_dim, center=not last)
    in_dim = out_dim

  if extras:
    variables['global_step'] = np.array(rng.integers(1, 10**6), np.int64)
    add('head_supervised/linear_layer/dense/kernel',
        rng.normal(0.0, 0.01, (ch, 1000)).astype(np.float32))
    add('head_supervised/linear_layer/dense/bias',
        rng.normal(0.0, 0.01, 1000).astype(np.float32))
    for name in list(trainable):
      variables[f'{name}/Momentum'] = rng.normal(
          0.0, 0.01, variables[name].shape).astype(np.float32)
  return variables


# ----------------------------------------------------------------------------------
# BYOL's Haiku layout (`byol/utils/networks.py` ResNetTorso, Haiku's BlockV1).


def byol_network(depth, width_multiplier=1.0, *, seed=0, root=None, projector=True):
  """Random (params, state) named as BYOL's Haiku network names them.

  `params`: module name -> {param: array}: the encoder `ROOT/~/initial_conv` ('w',
  HWIO), `ROOT/~/initial_batchnorm` ('scale', 'offset', each (1, 1, 1, C)),
  `ROOT/~/block_group_G/~/block_B/~/conv_K`, `batchnorm_K` and, in each group's first
  block, `shortcut_conv` / `shortcut_batchnorm`; with `projector`, BYOL's projector,
  predictor and classifier beside it. `state`: `BN/~/mean_ema` and `BN/~/var_ema` ->
  {'counter', 'hidden', 'average'} (Haiku's zero-debiased moving average; only
  'average' is what evaluation reads, so 'hidden' is made to differ from it).
  ROOT defaults to Haiku's name for the class, `res_net{depth}`.
  """
  kind, blocks = _arch(depth)
  widths = group_widths(width_multiplier)
  root = root or f'res_net{depth}'
  rng = np.random.default_rng(seed)
  params, state = {}, {}

  def conv(name, size, in_ch, out_ch):
    params[name] = {'w': _kaiming(rng, (size, size, in_ch, out_ch), size * size * in_ch)}
    return out_ch

  def bn(name, channels):
    scale, offset, mean, var = _bn_stats(rng, channels)
    params[name] = {'scale': scale.reshape(1, 1, 1, -1), 'offset': offset.reshape(1, 1, 1, -1)}
    for ema, value in (('mean_ema', mean), ('var_ema', var)):
      state[f'{name}/~/{ema}'] = {'counter': np.array(1000, np.int32),
                                  'hidden': (0.5 * value).reshape(1, 1, 1, -1),
                                  'average': value.reshape(1, 1, 1, -1)}

  ch = conv(f'{root}/~/initial_conv', 7, 3, widths[0])
  bn(f'{root}/~/initial_batchnorm', ch)
  for g, (planes, count) in enumerate(zip(widths, blocks)):
    out_ch = planes if kind == 'basic' else 4 * planes
    for i in range(count):
      p = f'{root}/~/block_group_{g}/~/block_{i}/~/'
      if i == 0:  # BYOL's ResNets project in every group's first block
        bn(p + 'shortcut_batchnorm', conv(p + 'shortcut_conv', 1, ch, out_ch))
      if kind == 'basic':
        bn(p + 'batchnorm_0', conv(p + 'conv_0', 3, ch, planes))
        bn(p + 'batchnorm_1', conv(p + 'conv_1', 3, planes, planes))
      else:
        bn(p + 'batchnorm_0', conv(p + 'conv_0', 1, ch, planes))
        bn(p + 'batchnorm_1', conv(p + 'conv_1', 3, planes, planes))
        bn(p + 'batchnorm_2', conv(p + 'conv_2', 1, planes, out_ch))
      ch = out_ch
  if projector:
    for mlp, size in (('projector', ch), ('predictor', 8)):
      params[f'{mlp}/~/linear'] = {'w': _kaiming(rng, (size, 16), size),
                                   'b': np.zeros(16, np.float32)}
      bn(f'{mlp}/~/batch_norm', 16)
      params[f'{mlp}/~/linear_1'] = {'w': _kaiming(rng, (16, 8), 16)}
    params['classifier'] = {'w': _kaiming(rng, (ch, 10), ch), 'b': np.zeros(10, np.float32)}
  return params, state


def byol_features(params, state, images, depth, *, root=None):
  """BYOL's encoder in evaluation mode, up to the global average pool.

  Haiku's `Conv2D` pads every convolution as TF's 'SAME' (strided ones included) and
  `max_pool` too; BatchNorm reads the moving averages' 'average'; the [0, 1] input is
  standardised with ImageNet's mean and std first (`byol/utils/dataset.py`).

  Returns:
    (N, C) float64 pooled features.
  """
  kind, blocks = _arch(depth)
  root = root or f'res_net{depth}'
  mean = np.array([0.485, 0.456, 0.406])
  std = np.array([0.229, 0.224, 0.225])
  x = (_images(images) - mean) / std

  def conv(name, x, stride):
    kernel = np.asarray(params[name]['w'], np.float64)
    pads = tuple(_tf_same_pads(x.shape[a], kernel.shape[0], stride) for a in (1, 2))
    return _conv2d(x, kernel, stride, pads)

  def bn(name, x):
    return _batch_norm(x, state[f'{name}/~/mean_ema']['average'].reshape(-1),
                       state[f'{name}/~/var_ema']['average'].reshape(-1),
                       params[name]['scale'].reshape(-1), params[name]['offset'].reshape(-1))

  x = _relu(bn(f'{root}/~/initial_batchnorm', conv(f'{root}/~/initial_conv', x, 2)))
  x = _tf_max_pool_same(x, 3, 2)
  for g, count in enumerate(blocks):
    for i in range(count):
      p = f'{root}/~/block_group_{g}/~/block_{i}/~/'
      stride = _GROUP_STRIDES[g] if i == 0 else 1
      shortcut = x
      if i == 0:
        shortcut = bn(p + 'shortcut_batchnorm', conv(p + 'shortcut_conv', x, stride))
      if kind == 'basic':  # Haiku's BlockV1: the stride on the first 3x3
        out = _relu(bn(p + 'batchnorm_0', conv(p + 'conv_0', x, stride)))
        out = bn(p + 'batchnorm_1', conv(p + 'conv_1', out, 1))
      else:  # the stride on the 3x3 (v1.5)
        out = _relu(bn(p + 'batchnorm_0', conv(p + 'conv_0', x, 1)))
        out = _relu(bn(p + 'batchnorm_1', conv(p + 'conv_1', out, stride)))
        out = bn(p + 'batchnorm_2', conv(p + 'conv_2', out, 1))
      x = _relu(out + shortcut)
  return x.mean(axis=(1, 2))
