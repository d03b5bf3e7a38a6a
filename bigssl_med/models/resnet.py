"""ResNet v1.5 encoder as in SimCLR (v1 and v2), in Flax Linen.

Faithful to SimCLR's public TF2 `resnet.py`:
- convolutions without bias, TF "fixed padding" for strided convolutions
  (pad (k-1)//2 before and the rest after, then VALID) and SAME otherwise;
  kernels initialised with variance scaling (scale 1, fan-in, truncated normal);
- BatchNorm momentum 0.9, epsilon 1e-5; the last BN of every residual block has its
  scale initialised to zero;
- v1.5: in bottleneck blocks the stride sits on the 3x3 convolution;
- the first block of every group has a projection shortcut (1x1 conv + BN); with
  `identity_shortcuts` only a block whose input and output shapes differ has one,
  as in torchvision's ResNets (it differs for ResNet-18/34's first block only);
- `width_multiplier` scales every layer, the stem included;
- `sk_ratio > 0` (SimCLRv2) switches on selective kernels in the bottleneck, a
  ResNet-D stem (three 3x3 convolutions) and ResNet-D average-pool shortcuts;
- features are the spatial mean of the last block group: 2048 * width for depth >= 50.

`ResNet(depth=50)` has 23,508,032 convolution and BatchNorm parameters, exactly
torchvision's ResNet-50 without its classifier.

Under `jax.jit` with the batch sharded over a mesh, BatchNorm statistics are
computed over the whole global batch (SimCLR's global BN) with no axis names.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigssl_med.models import batch_norm

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# depth -> (residual block kind, blocks per group)
_LAYOUTS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}
DEPTHS = tuple(sorted(_LAYOUTS))

conv_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


def feature_dim(depth: int, width_multiplier: float = 1) -> int:
  """Size of the pooled features of `ResNet(depth, width_multiplier)`."""
  kind, _ = layout(depth)
  expansion = 4 if kind == 'bottleneck' else 1
  return channels(512, width_multiplier) * expansion


def layout(depth: int) -> tuple[str, tuple[int, ...]]:
  """('bottleneck' or 'basic', blocks per group) of a ResNet depth."""
  if depth not in _LAYOUTS:
    raise ValueError(f'ResNet depth {depth} is not one of {DEPTHS}')
  return _LAYOUTS[depth]


def channels(base: int, width_multiplier: float) -> int:
  """A layer's channels: `base` (64, 128, 256, 512) times the width, rounded, at least 1."""
  return max(1, int(round(base * width_multiplier)))


STEM_POOL_PADDINGS = ('same', 'symmetric')
# How a strided convolution pads: 'fixed' (SimCLR's `conv2d_fixed_padding`, and
# torchvision's: (k - 1) // 2 before, the rest after, whatever the input's size) or 'same'
# (TensorFlow's and Haiku's SAME, BYOL's: as much as the input's size needs for
# ceil(n / stride) outputs, the odd pixel after). Unstrided convolutions pad the same
# either way.
CONV_PADDINGS = ('fixed', 'same')

# Per-channel (mean, std) the encoder standardises its [0, 1] RGB input with. SimCLR feeds
# [0, 1] as is; torchvision's ResNets (and most models published in their layout) were
# trained on images standardised with ImageNet's RGB statistics.
INPUT_NORMALIZATIONS = {
    'none': None,
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _pool_pads(size: int, padding: str) -> tuple[int, int, int]:
  """Padding (before, after) and output size of a 3-wide, stride-2 max-pooling window.

  'same' is TF's SAME padding (SimCLR: windows start on the first pixel, the one
  pixel of padding goes after); 'symmetric' pads one pixel on each side, as
  torchvision's `MaxPool2d(3, 2, padding=1)` (windows centred on the even pixels).
  """
  if padding == 'symmetric':
    out = (size - 1) // 2 + 1
    return 1, 2 * out - size, out
  out = -(-size // 2)
  total = max((out - 1) * 2 + 3 - size, 0)
  return total // 2, total - total // 2, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_3x3_s2(x, padding: str = 'same'):
  """3x3 max-pooling with stride 2 (the stem's pooling), padded as `_pool_pads` says.

  Its gradient is XLA's own (the gradient goes to the first maximum of each window
  in row-major order), written as nine strided selects and interior pads instead
  of a select-and-scatter: the same values, but fusible element-wise work where
  XLA's GPU scatter is slow (about 3% of a ResNet-50 step on an H100).
  """
  (h_lo, h_hi, _), (w_lo, w_hi, _) = _pool_pads(x.shape[1], padding), _pool_pads(x.shape[2],
                                                                               padding)
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((h_lo, h_hi), (w_lo, w_hi)))


def _max_pool_fwd(x, padding):
  y = max_pool_3x3_s2(x, padding)
  return y, (x, y)


def _max_pool_bwd(padding, residuals, g):
  x, y = residuals
  (h_lo, h_hi, oh), (w_lo, w_hi, ow) = _pool_pads(x.shape[1], padding), _pool_pads(x.shape[2],
                                                                                 padding)
  xp = jnp.pad(x, ((0, 0), (h_lo, h_hi), (w_lo, w_hi), (0, 0)),
               constant_values=jnp.array(-jnp.inf, x.dtype))
  hp, wp = xp.shape[1], xp.shape[2]
  taken = jnp.zeros(y.shape, jnp.bool_)
  zero = jnp.zeros((), jnp.float32)
  dxp = jnp.zeros(xp.shape, jnp.float32)
  for i in range(3):
    for j in range(3):
      window = xp[:, i:i + 2 * oh - 1:2, j:j + 2 * ow - 1:2, :]
      chosen = (window == y) & ~taken
      taken = taken | chosen
      contribution = jnp.where(chosen, g.astype(jnp.float32), zero)
      dxp = dxp + jax.lax.pad(contribution, zero, (
          (0, 0, 0), (i, hp - i - (2 * oh - 1), 1), (j, wp - j - (2 * ow - 1), 1), (0, 0, 0)))
  return (dxp[:, h_lo:h_lo + x.shape[1], w_lo:w_lo + x.shape[2], :].astype(g.dtype),)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


class ConvFixedPadding(nn.Module):
  """Bias-free convolution with TF's fixed padding when strided (SAME otherwise).

  `padding='same'` pads strided convolutions as TF's SAME does too (see CONV_PADDINGS).
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32
  padding: str = 'fixed'

  @nn.compact
  def __call__(self, x):
    if self.strides > 1 and self.padding == 'fixed':
      total = self.kernel_size - 1
      padding = [(total // 2, total - total // 2)] * 2
    else:
      padding = 'SAME'
    return nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                   strides=(self.strides, self.strides), padding=padding,
                   use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                   name='conv')(x)


class BatchNormRelu(nn.Module):
  """BatchNorm (momentum 0.9, eps 1e-5), optional zero-initialised scale, optional ReLU.

  `fused` switches from `nn.BatchNorm` + `nn.relu` to `batch_norm.BatchNorm`, which
  has the same variables and forward values and a hand-written gradient.
  """
  relu: bool = True
  init_zero: bool = False
  center: bool = True
  dtype: Any = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    scale_init = nn.initializers.zeros if self.init_zero else nn.initializers.ones
    if self.fused:
      return batch_norm.BatchNorm(
          use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
          use_bias=self.center, relu=self.relu, dtype=self.dtype, scale_init=scale_init,
          name='bn')(x)
    x = nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        use_bias=self.center, dtype=self.dtype, scale_init=scale_init, name='bn')(x)
    return nn.relu(x) if self.relu else x


class SelectiveKernel(nn.Module):
  """SimCLRv2's selective-kernel convolution: two 3x3 streams mixed by a softmax."""
  features: int
  strides: int
  sk_ratio: float
  min_dim: int = 32
  dtype: Any = jnp.float32
  fused_bn: bool = False
  conv_padding: str = 'fixed'

  @nn.compact
  def __call__(self, x, train: bool):
    x = ConvFixedPadding(2 * self.features, 3, self.strides, self.dtype, self.conv_padding,
                         name='conv')(x)
    x = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='bn')(x, train)
    streams = jnp.stack(jnp.split(x, 2, axis=-1))  # [2, N, H, W, C]
    pooled = jnp.mean(streams.sum(axis=0), axis=(1, 2), keepdims=True)
    mid = max(int(self.features * self.sk_ratio), self.min_dim)
    g = nn.Conv(mid, (1, 1), use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                name='fc_reduce')(pooled)
    g = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='bn_reduce')(g, train)
    mixing = nn.Conv(2 * self.features, (1, 1), use_bias=False, kernel_init=conv_init,
                     dtype=self.dtype, name='fc_mix')(g)
    mixing = nn.softmax(jnp.stack(jnp.split(mixing, 2, axis=-1)), axis=0)
    return jnp.sum(streams * mixing, axis=0)


class Shortcut(nn.Module):
  """Projection shortcut: 1x1 conv + BN, with ResNet-D average pooling when `resnet_d`."""
  features: int
  strides: int
  resnet_d: bool
  dtype: Any = jnp.float32
  fused_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.resnet_d:
      if self.strides > 1:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = nn.avg_pool(x, (2, 2), strides=(self.strides, self.strides), padding='VALID')
      else:
        # TF average pooling with SAME padding averages over the valid pixels only.
        x = nn.avg_pool(x, (2, 2), strides=(1, 1), padding='SAME', count_include_pad=False)
      x = ConvFixedPadding(self.features, 1, 1, self.dtype, name='proj')(x)
    else:
      x = ConvFixedPadding(self.features, 1, self.strides, self.dtype, name='proj')(x)
    return BatchNormRelu(relu=False, dtype=self.dtype, fused=self.fused_bn,
                         name='proj_bn')(x, train)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided; selective kernel when sk_ratio > 0) -> 1x1 (x4), v1.5."""
  features: int
  strides: int
  projection: bool
  sk_ratio: float = 0.0
  dtype: Any = jnp.float32
  fused_bn: bool = False
  conv_padding: str = 'fixed'

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    if self.projection:
      shortcut = Shortcut(4 * self.features, self.strides, self.sk_ratio > 0, self.dtype,
                          self.fused_bn, name='shortcut')(x, train)
    y = ConvFixedPadding(self.features, 1, 1, self.dtype, name='conv1')(x)
    y = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='bn1')(y, train)
    if self.sk_ratio > 0:
      y = SelectiveKernel(self.features, self.strides, self.sk_ratio, dtype=self.dtype,
                          fused_bn=self.fused_bn, conv_padding=self.conv_padding,
                          name='sk')(y, train)
    else:
      y = ConvFixedPadding(self.features, 3, self.strides, self.dtype, self.conv_padding,
                           name='conv2')(y)
      y = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='bn2')(y, train)
    y = ConvFixedPadding(4 * self.features, 1, 1, self.dtype, name='conv3')(y)
    y = BatchNormRelu(relu=False, init_zero=True, dtype=self.dtype, fused=self.fused_bn,
                      name='bn3')(y, train)
    return nn.relu(y + shortcut)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  features: int
  strides: int
  projection: bool
  sk_ratio: float = 0.0
  dtype: Any = jnp.float32
  fused_bn: bool = False
  conv_padding: str = 'fixed'

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    if self.projection:
      shortcut = Shortcut(self.features, self.strides, self.sk_ratio > 0, self.dtype,
                          self.fused_bn, name='shortcut')(x, train)
    y = ConvFixedPadding(self.features, 3, self.strides, self.dtype, self.conv_padding,
                         name='conv1')(x)
    y = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='bn1')(y, train)
    y = ConvFixedPadding(self.features, 3, 1, self.dtype, name='conv2')(y)
    y = BatchNormRelu(relu=False, init_zero=True, dtype=self.dtype, fused=self.fused_bn,
                      name='bn2')(y, train)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """SimCLR's ResNet encoder; returns pooled float32 features `[N, feature_dim]`.

  With `return_maps=True` it returns instead the feature maps a segmentation
  decoder reads, in `dtype`: `[stem, group1, group2, group3, group4]`, the stem's
  output after its BN and ReLU (before max-pooling) and each block group's output.
  Their strides are 2, 4, 8, 16 and 32 (1, 1, 2, 4 and 8 with `cifar_stem`; see
  `map_strides`). Parameters are the same either way.

  Attributes:
    depth: 18, 34, 50, 101, 152 or 200.
    width_multiplier: scales every layer's channels (SimCLR uses 1, 2, 3 and 4;
      fractions make tiny test models).
    sk_ratio: selective-kernel ratio (SimCLRv2 uses 0.0625); 0 turns SK off.
    cifar_stem: a 3x3 stride-1 stem without max-pooling, as SimCLR uses for
      images of 32 pixels or less.
    dtype: computation dtype (e.g. bfloat16); parameters stay float32.
    fused_bn: BatchNorm layers with a hand-written gradient (`models.batch_norm`):
      the same variables and forward values, fewer passes over the activations in
      the backward pass. Checkpoints work with either setting.
    stem_pool_padding: 'same' (SimCLR's TF SAME max-pooling) or 'symmetric' (one
      pixel each side, as torchvision's ResNets: the models `bigssl_med.convert`
      imports from torchvision's layout). The two differ by where the pooling
      windows sit, not by any parameter.
    identity_shortcuts: a block has a projection shortcut only where its input and
      output shapes differ (torchvision's rule) instead of the first block of every
      group (SimCLR's). This removes the projection of ResNet-18/34's first block
      (64 -> 64 channels, stride 1); deeper ResNets have the same blocks either way.
    conv_padding: 'fixed' (SimCLR's and torchvision's padding of strided
      convolutions) or 'same' (TF's and Haiku's SAME: BYOL's models, which
      `bigssl_med.convert` imports); see `CONV_PADDINGS`. No parameter differs.
    input_normalization: 'none' (SimCLR: the [0, 1] images as they come) or
      'imagenet' (`(x - mean) / std` with ImageNet's RGB statistics, in float32,
      before the stem: what torchvision-layout models were trained on; see
      `INPUT_NORMALIZATIONS`).
  """
  depth: int = 50
  width_multiplier: float = 1
  sk_ratio: float = 0.0
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  fused_bn: bool = False
  stem_pool_padding: str = 'same'
  identity_shortcuts: bool = False
  input_normalization: str = 'none'
  conv_padding: str = 'fixed'

  @nn.compact
  def __call__(self, x, train: bool = True, return_maps: bool = False):
    kind, blocks_per_group = layout(self.depth)
    if self.stem_pool_padding not in STEM_POOL_PADDINGS:
      raise ValueError(f'stem_pool_padding={self.stem_pool_padding!r} is not one of '
                       f'{STEM_POOL_PADDINGS}')
    if self.conv_padding not in CONV_PADDINGS:
      raise ValueError(f'conv_padding={self.conv_padding!r} is not one of {CONV_PADDINGS}')
    if self.input_normalization not in INPUT_NORMALIZATIONS:
      raise ValueError(f'input_normalization={self.input_normalization!r} is not one of '
                       f'{tuple(INPUT_NORMALIZATIONS)}')
    block = BottleneckBlock if kind == 'bottleneck' else BasicBlock
    expansion = 4 if kind == 'bottleneck' else 1
    width = channels(64, self.width_multiplier)
    statistics = INPUT_NORMALIZATIONS[self.input_normalization]
    if statistics is not None:
      if x.shape[-1] != len(statistics[0]):
        raise ValueError(f'input_normalization={self.input_normalization!r} needs RGB images, '
                         f'got {x.shape[-1]} channels')
      mean, std = (jnp.asarray(v, jnp.float32) for v in statistics)
      x = (jnp.asarray(x, jnp.float32) - mean) / std
    x = jnp.asarray(x, self.dtype)

    if self.cifar_stem:
      x = ConvFixedPadding(width, 3, 1, self.dtype, name='stem_conv')(x)
      x = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='stem_bn')(x, train)
      maps = [x]
    else:
      if self.sk_ratio > 0:  # ResNet-D stem
        x = ConvFixedPadding(width // 2, 3, 2, self.dtype, self.conv_padding,
                             name='stem_conv1')(x)
        x = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='stem_bn1')(x, train)
        x = ConvFixedPadding(width // 2, 3, 1, self.dtype, name='stem_conv2')(x)
        x = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='stem_bn2')(x, train)
        x = ConvFixedPadding(width, 3, 1, self.dtype, name='stem_conv')(x)
      else:
        x = ConvFixedPadding(width, 7, 2, self.dtype, self.conv_padding, name='stem_conv')(x)
      x = BatchNormRelu(dtype=self.dtype, fused=self.fused_bn, name='stem_bn')(x, train)
      maps = [x]
      x = max_pool_3x3_s2(x, self.stem_pool_padding)

    for g, num_blocks in enumerate(blocks_per_group):
      features = channels(64 * 2**g, self.width_multiplier)
      for b in range(num_blocks):
        strides = 2 if g > 0 and b == 0 else 1
        reshapes = strides > 1 or x.shape[-1] != expansion * features
        projection = b == 0 and (reshapes or not self.identity_shortcuts)
        x = block(features, strides=strides, projection=projection, sk_ratio=self.sk_ratio,
                  dtype=self.dtype, fused_bn=self.fused_bn, conv_padding=self.conv_padding,
                  name=f'group{g + 1}_block{b}')(x, train)
      maps.append(x)
    if return_maps:
      return maps
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def map_strides(cifar_stem: bool = False) -> tuple[int, ...]:
  """Strides of the maps `ResNet(...)(x, return_maps=True)` returns, stem first."""
  return (1, 1, 2, 4, 8) if cifar_stem else (2, 4, 8, 16, 32)

