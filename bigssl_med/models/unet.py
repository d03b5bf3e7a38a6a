"""U-Net decoder on the project's ResNet encoder, as segmentation_models builds it.

The architecture of `segmentation_models_pytorch.Unet` with a ResNet encoder (the
transfer-learning benchmark's segmentation model):

- the encoder's five maps (`ResNet(..., return_maps=True)`: the stem before its
  max-pooling, then the four block groups) are the skips; the deepest is the
  decoder's input, with no centre block;
- each of the five decoder blocks upsamples by nearest neighbour to the next
  skip's resolution (2x for the standard stem), concatenates that skip (the last
  block, back at the input resolution, has none), then applies two 3x3
  convolutions without bias, each followed by BatchNorm and ReLU;
- a 3x3 convolution with bias maps the last block's channels to `num_outputs`
  logits.

Decoder convolutions are initialised as segmentation_models does (He uniform,
fan-in; BatchNorm scale 1 and offset 0), the output convolution by Glorot uniform
with zero bias. BatchNorm uses the encoder's momentum (0.9) and epsilon (1e-5).
Parameters live under `encoder` (loadable from a pretraining checkpoint) and
`decoder`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bigssl_med.models.resnet import BN_EPSILON, BN_MOMENTUM, ResNet

DECODER_CHANNELS = (256, 128, 64, 32, 16)
decoder_conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')
head_conv_init = nn.initializers.glorot_uniform()


def upsample_nearest(x, size: tuple[int, int]):
  """Nearest-neighbour upsampling of `[N, H, W, C]` to `size`, an integer multiple of (H, W)."""
  (h, w), (out_h, out_w) = x.shape[1:3], size
  if out_h % h or out_w % w:
    raise ValueError(f'cannot upsample {h}x{w} to {out_h}x{out_w} by an integer factor: the '
                     'image size must be a multiple of the encoder\'s stride')
  return jnp.repeat(jnp.repeat(x, out_h // h, axis=1), out_w // w, axis=2)


class ConvBnRelu(nn.Module):
  """3x3 convolution without bias, BatchNorm, ReLU (segmentation_models' Conv2dReLU)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=False,
                kernel_init=decoder_conv_init, dtype=self.dtype, name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


class DecoderBlock(nn.Module):
  """Nearest upsampling to the skip's size, concatenation of the skip, two ConvBnRelu."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, size: tuple[int, int], skip=None, train: bool = True):
    x = upsample_nearest(x, size)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    x = ConvBnRelu(self.features, self.dtype, name='conv1')(x, train)
    return ConvBnRelu(self.features, self.dtype, name='conv2')(x, train)


class UNetDecoder(nn.Module):
  """Five decoder blocks from the deepest map to the input resolution, and the logits."""
  channels: Sequence[int] = DECODER_CHANNELS
  num_outputs: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps, size: tuple[int, int], train: bool = True):
    skips = list(maps[:-1])[::-1]  # group3, group2, group1, stem
    if len(self.channels) != len(skips) + 1:
      raise ValueError(f'decoder_channels {tuple(self.channels)} must have {len(skips) + 1} '
                       f'entries, one per decoder block')
    x = maps[-1]
    for i, features in enumerate(self.channels):
      skip = skips[i] if i < len(skips) else None
      target = skip.shape[1:3] if skip is not None else size
      x = DecoderBlock(features, self.dtype, name=f'block{i}')(x, target, skip, train)
    # The logits in float32 (one output channel: cheap), as the classifiers' are; in
    # bfloat16 a logit near 10 would be off by up to 0.03.
    return nn.Conv(self.num_outputs, (3, 3), padding='SAME', kernel_init=head_conv_init,
                   dtype=jnp.float32, name='logits')(x.astype(jnp.float32))


class UNet(nn.Module):
  """ResNet encoder + U-Net decoder; returns float32 logits `[N, H, W, num_outputs]`.

  Attributes:
    encoder: the ResNet (its parameters are the `encoder` of a pretraining checkpoint).
    decoder_channels: output channels of the five decoder blocks, deepest first.
    num_outputs: logit channels (1 for a binary mask).
    dtype: computation dtype of the decoder; parameters stay float32.
  """
  encoder: ResNet
  decoder_channels: Sequence[int] = DECODER_CHANNELS
  num_outputs: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    maps = self.encoder(x, train, return_maps=True)
    return UNetDecoder(tuple(self.decoder_channels), self.num_outputs, self.dtype,
                       name='decoder')(maps, x.shape[1:3], train)
