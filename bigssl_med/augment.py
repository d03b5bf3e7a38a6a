"""SimCLR's per-pixel augmentations in JAX, run on the accelerator.

The host decodes, crops and flips (`bigssl_med.data.host_ops`); this module does
the rest of SimCLR's augmentation inside the jitted train step: colour jitter
(p=0.8), grayscale (p=0.2), then Gaussian blur (p=0.5), with the semantics of
SimCLR's `data_util.py` (v1 and tf2) and of the TensorFlow ops it calls; and,
where a recipe asks for it (chest X-rays), a random rotation before them.

Layout of this module:
  * small named ops on one image `[H, W, C]` float32 in [0, 1], each taking its
    factor(s) as arguments (no randomness);
  * random wrappers taking a PRNG key; every random choice is a `jnp.where`
    select, so they work under `jax.jit` and `jax.vmap`;
  * `simclr_augment`, the batch entry point: one key per image from
    `jax.random.split(key, N)` and a `vmap`, so an image's augmentation depends
    only on its key and its pixels, not on how the batch is sharded.

Arguments that shape the computation (`strength`, `impl`, `hue`, `saturation`,
kernel sizes) are Python values: static under `jax.jit`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bigssl_med import errors

# Op ids of SimCLR's `color_jitter_rand`, in its order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
IMPLS = ('simclrv1', 'simclrv2')

# tf.image.rgb_to_grayscale's luma weights.
GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)


# ----------------------------------------------------------------------------
# Colour-space and colour ops on one image [H, W, C] float32 in [0, 1].
# ----------------------------------------------------------------------------


def adjust_brightness(image, factor, *, impl='simclrv2'):
  """SimCLR's brightness change.

  Args:
    image: `[..., C]` float image.
    factor: for 'simclrv2' a multiplicative factor (SimCLR v2's
      `random_brightness`); for 'simclrv1' an additive delta
      (`tf.image.adjust_brightness`).
    impl: 'simclrv2' or 'simclrv1'.

  Returns:
    The image, not clipped.
  """
  _check_impl(impl)
  if impl == 'simclrv2':
    return image * factor
  return image + factor


def adjust_contrast(image, factor):
  """`tf.image.adjust_contrast`: `(x - mean) * factor + mean`, not clipped.

  The mean is taken per channel over the image's height and width.

  Args:
    image: `[H, W, C]` float image.
    factor: contrast factor.

  Returns:
    The adjusted image.
  """
  mean = jnp.mean(image, axis=(-3, -2), keepdims=True)
  return (image - mean) * factor + mean


def rgb_to_hsv(image):
  """RGB `[..., 3]` in [0, 1] to HSV `[..., 3]`, all three in [0, 1].

  Same conventions as TensorFlow's kernel: hue in [0, 1) (hue 0 where the
  pixel is gray), saturation `(max - min) / max` (0 where max is 0), value max.
  """
  return _stack(_rgb_to_hsv_planes(_planes(image)))


def hsv_to_rgb(hsv):
  """HSV `[..., 3]` to RGB `[..., 3]`; inverse of `rgb_to_hsv`.

  Branch-free form of the piecewise formula: channel n (5 for red, 3 for
  green, 1 for blue) is `v - v*s*clip(min(k, 4 - k), 0, 1)` with
  `k = (n + 6h) mod 6`. Hue 1.0 is the same as hue 0.0.
  """
  return _stack(_hsv_to_rgb_planes(_planes(hsv)))


def adjust_saturation(image, factor):
  """`tf.image.adjust_saturation`: HSV saturation times `factor`, in [0, 1].

  Computed in RGB without the HSV round trip, with the same result: with hue
  and value fixed every channel is `v - s*v*t(hue)`, so changing the chroma
  `c = s*v` to `c' = clip(c*factor, 0, v)` maps channel x to
  `v - (v - x) * c'/c`. Gray pixels (c = 0) are unchanged.

  Args:
    image: `[..., 3]` float image in [0, 1].
    factor: saturation factor.

  Returns:
    The adjusted image.
  """
  value = jnp.max(image, axis=-1, keepdims=True)
  return _rescale_chroma(image, value, jnp.min(image, axis=-1, keepdims=True),
                         factor)


def adjust_hue(image, delta):
  """`tf.image.adjust_hue`: rotates the HSV hue by `delta`, wrapping mod 1.

  Args:
    image: `[..., 3]` float image in [0, 1].
    delta: hue shift, in turns (TensorFlow's range is [-0.5, 0.5]).

  Returns:
    The adjusted image; saturation and value are unchanged.
  """
  return _stack(_hue_planes(_planes(image), delta))


# The colour ops on channel planes: a tuple (r, g, b) of `[...]` arrays. Written
# this way, an op that mixes channels reads the other channels at the same
# index, so XLA:GPU fuses a chain of such ops into one per-pixel loop without
# recomputing each producer once per channel (which, in the `[..., 3]` layout,
# compounds along the chain: 3x per mixing op). See `color_jitter` for CPU.


def _planes(image):
  return image[..., 0], image[..., 1], image[..., 2]


def _stack(planes):
  return jnp.stack(planes, axis=-1)


def _select(pred, on_true, on_false):
  return tuple(jnp.where(pred, a, b) for a, b in zip(on_true, on_false))


def _clip(planes):
  return tuple(jnp.clip(x, 0.0, 1.0) for x in planes)


def _rgb_to_hsv_planes(rgb):
  r, g, b = rgb
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0),
                         0.0)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
  # The channel that is the maximum by comparisons of the channels, not `value == r`:
  # XLA may compute a channel twice, once contracted into a fused multiply-add and once
  # not (newer XLA:CPU does, after a contrast or saturation step), and then no channel
  # equals the maximum, which put the pixel in the blue sextant. Ties pick red, then
  # green, as TensorFlow's kernel does; hue is continuous across sextant borders.
  red_is_max = (r >= g) & (r >= b)
  hue6 = jnp.where(
      red_is_max, (g - b) / safe_chroma,
      jnp.where(g >= b, (b - r) / safe_chroma + 2.0,
                (r - g) / safe_chroma + 4.0))
  hue = jnp.where(chroma > 0, hue6 / 6.0, 0.0)
  hue = jnp.where(hue < 0, hue + 1.0, hue)
  return hue, saturation, value


def _hsv_to_rgb_planes(hsv):
  hue, saturation, value = hsv

  def channel(n):
    k = jnp.mod(n + hue * 6.0, 6.0)
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0,
                                                 1.0)

  return channel(5.0), channel(3.0), channel(1.0)


def _rescale_chroma(x, value, minimum, factor):
  """Channel x after scaling the chroma `value - minimum` by `factor`."""
  chroma = value - minimum
  new_chroma = jnp.clip(chroma * factor, 0.0, value)
  ratio = jnp.where(chroma > 0, new_chroma / jnp.where(chroma > 0, chroma, 1.0),
                    1.0)
  return value - (value - x) * ratio


def _saturation_planes(rgb, factor):
  r, g, b = rgb
  value = jnp.maximum(jnp.maximum(r, g), b)
  minimum = jnp.minimum(jnp.minimum(r, g), b)
  return tuple(_rescale_chroma(x, value, minimum, factor) for x in rgb)


def _hue_planes(rgb, delta):
  hue, saturation, value = _rgb_to_hsv_planes(rgb)
  return _hsv_to_rgb_planes((jnp.mod(hue + delta, 1.0), saturation, value))


def to_grayscale(image):
  """`tf.image.rgb_to_grayscale` tiled to 3 channels (SimCLR's `to_grayscale`).

  The weighted sum is written out (not a matrix product) so that it stays in
  full float32 on accelerators whose default matmul precision is lower.
  """
  r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
  wr, wg, wb = GRAYSCALE_WEIGHTS
  gray = r * wr + g * wg + b * wb
  return jnp.broadcast_to(gray, image.shape)


def gaussian_band_matrix(size, sigma, radius):
  """The `[size, size]` matrix of a 1-D 'SAME' zero-padded Gaussian filter.

  Row i holds the taps `exp(-d^2 / (2 sigma^2))` for `|d| = |i - j| <= radius`,
  normalised by the sum of all `2*radius + 1` taps (SimCLR's
  `gaussian_blur`); taps that fall outside the image are the zero padding, so
  border rows sum to less than 1, as in `tf.nn.depthwise_conv2d` with
  padding='SAME'.

  Args:
    size: image height or width (static).
    sigma: scalar, may be traced.
    radius: static int.

  Returns:
    float32 `[size, size]`, symmetric.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  two_var = 2.0 * sigma * sigma
  taps = jnp.exp(-jnp.square(jnp.arange(-radius, radius + 1, dtype=jnp.float32))
                 / two_var)
  index = jnp.arange(size)
  offset = (index[:, None] - index[None, :]).astype(jnp.float32)
  band = jnp.where(jnp.abs(offset) <= radius, jnp.exp(-jnp.square(offset) /
                                                      two_var), 0.0)
  return band / jnp.sum(taps)


def gaussian_blur(image, sigma, kernel_size, *, precision=None):
  """SimCLR's separable Gaussian blur with 'SAME' zero padding.

  As in SimCLR, `radius = kernel_size // 2` and the filter has
  `2 * radius + 1` taps (an even `kernel_size` gives one tap more).

  The separable convolution is written as two matrix products with banded
  Gaussian matrices, `M_H @ X` over rows and `X @ M_W` over columns (both `M`
  symmetric). A batch under `vmap` becomes two batched GEMMs, which run on GPU
  tensor cores / TPU MXUs and take a per-image, traced `sigma` with no
  per-image kernel shapes. It costs `2*H*W*C*(H + W)` flops per image instead
  of `4*H*W*C*(2*radius + 1)` for a direct separable convolution (about 10x
  more at SimCLR's `kernel_size = H // 10`), which matrix units absorb: at
  512 x 224 x 224 x 3 it is 69 GFLOP, measured at 1.4 ms on one H100 (TF32),
  where XLA's depthwise convolution with per-image kernels took 18 ms.

  Args:
    image: `[H, W, C]` float32.
    sigma: scalar standard deviation in pixels, may be traced.
    kernel_size: static int (SimCLR: image height // 10).
    precision: `jax.lax.Precision` of the two matrix products; None keeps
      JAX's default (on recent NVIDIA GPUs that may be TF32, about 1e-3
      relative error, well below 8-bit image quantisation).

  Returns:
    The blurred `[H, W, C]` image.
  """
  radius = int(kernel_size) // 2
  height, width = image.shape[-3], image.shape[-2]
  rows = gaussian_band_matrix(height, sigma, radius)
  cols = rows if width == height else gaussian_band_matrix(width, sigma, radius)
  out = jnp.einsum('hk,kwc->hwc', rows, image, precision=precision)
  return jnp.einsum('hkc,kw->hwc', out, cols, precision=precision)


# ----------------------------------------------------------------------------
# Colour jitter with SimCLR's random order.
# ----------------------------------------------------------------------------


class JitterParams(NamedTuple):
  """The random draws of one colour jitter (SimCLR's `color_jitter_rand`).

  Attributes:
    order: int32 `[4]`, a permutation of the op ids (BRIGHTNESS, CONTRAST,
      SATURATION, HUE) in the order they are applied.
    brightness: factor ('simclrv2') or additive delta ('simclrv1').
    contrast: contrast factor.
    saturation: saturation factor.
    hue: hue delta.
  """
  order: jax.Array
  brightness: jax.Array
  contrast: jax.Array
  saturation: jax.Array
  hue: jax.Array


def jitter_ranges(strength, impl='simclrv2'):
  """SimCLR's sampling ranges `{op: (low, high)}` for a jitter strength.

  Brightness 0.8s (v2: factor in [max(1 - 0.8s, 0), 1 + 0.8s); v1: delta in
  [-0.8s, 0.8s)), contrast and saturation factors in [1 - 0.8s, 1 + 0.8s),
  hue delta in [-0.2s, 0.2s).

  Raises:
    ValueError: for an unknown `impl` or a strength outside [0, 1.25], where
      TensorFlow's `random_contrast`/`random_saturation` reject the range.
  """
  strength = _static_strength(strength)
  _check_impl(impl)
  delta = 0.8 * strength
  if impl == 'simclrv2':
    brightness = (max(1.0 - delta, 0.0), 1.0 + delta)
  else:
    brightness = (-delta, delta)
  return {
      BRIGHTNESS: brightness,
      CONTRAST: (1.0 - delta, 1.0 + delta),
      SATURATION: (1.0 - delta, 1.0 + delta),
      HUE: (-0.2 * strength, 0.2 * strength),
  }


def sample_jitter_params(key, strength, impl='simclrv2'):
  """Draws one `JitterParams` with SimCLR's ranges (`jitter_ranges`)."""
  ranges = jitter_ranges(strength, impl)
  k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)

  def uniform(k, op):
    low, high = ranges[op]
    return jax.random.uniform(k, (), jnp.float32, low, high)

  return JitterParams(
      order=jax.random.permutation(k_order, 4).astype(jnp.int32),
      brightness=uniform(k_b, BRIGHTNESS),
      contrast=uniform(k_c, CONTRAST),
      saturation=uniform(k_s, SATURATION),
      hue=uniform(k_h, HUE))


def color_jitter(image, params, *, impl='simclrv2', hue=True, saturation=True):
  """SimCLR's `color_jitter_rand` with given draws: four ops, each then clipped.

  The ops run in `params.order`; `hue=False` / `saturation=False` make those
  ops the identity (as SimCLR does for a zero range), e.g. for grayscale
  X-rays, where they would not change a gray pixel anyway.

  How the random order is computed. Selecting among the four ops at each of
  the four positions would evaluate 16 ops, four of them HSV hue rotations
  (the expensive op). Instead the hue op is evaluated once, with the three
  other ops in three slots before it and three after it, each slot active
  only on its side of the hue position (`_slot_schedule`); a slot evaluates
  brightness, contrast and the RGB-form saturation (cheap) and selects one.

  Two lowerings of the same arithmetic, picked per platform
  (`jax.lax.platform_dependent`), because XLA fuses the chain very
  differently on CPU and on accelerators:
    * GPU/TPU (`_color_jitter_fused`): the steps on channel planes, run twice
      (to get the image entering contrast and its means, then the output),
      fused into one reduction and one per-pixel kernel. On one H100 at
      512 x 224 x 224 this takes 1.9 ms, where the `[H, W, 3]` form took 26 ms
      (XLA recomputes producers once per channel per channel-mixing op) and
      materialising every step 5 ms.
    * CPU (`_color_jitter_stepwise`): the steps on `[H, W, 3]`, whose channel
      reductions XLA:CPU materialises after every step (13 ms for 64 x 64 x
      64 on two cores). XLA:CPU fuses the planar chain into one loop that
      recomputes shared values along the chain: 37 s for the same batch.

  Args:
    image: `[H, W, 3]` float32 in [0, 1].
    params: `JitterParams`.
    impl: 'simclrv2' (multiplicative brightness) or 'simclrv1' (additive).
    hue: whether the hue op is on.
    saturation: whether the saturation op is on.

  Returns:
    The jittered image, in [0, 1].
  """
  _check_impl(impl)
  kw = dict(impl=impl, hue=hue, saturation=saturation)
  return jax.lax.platform_dependent(
      image, params,
      cpu=functools.partial(_color_jitter_stepwise, **kw),
      default=functools.partial(_color_jitter_fused, **kw))


def _slot_schedule(order, hue):
  """Op ids of the slots before and after the hue op; -1 marks an idle slot.

  The three non-hue ops keep their order; those before hue in `order` are
  active in the first three slots, the others in the last three. Without hue
  there are only the first three slots.
  """
  is_hue = (order == HUE).astype(jnp.int32)
  others = order[jnp.argsort(is_hue, stable=True)[:3]]
  if not hue:
    return [others[k] for k in range(3)], []
  hue_pos = jnp.argmax(is_hue)  # How many of `others` precede hue.
  before = [jnp.where(k < hue_pos, others[k], -1) for k in range(3)]
  after = [jnp.where(k >= hue_pos, others[k], -1) for k in range(3)]
  return before, after


def _color_jitter_fused(image, params, *, impl, hue, saturation):
  """`color_jitter` on channel planes, in two fusable passes (accelerators)."""
  rgb = _planes(image)
  kw = dict(impl=impl, hue=hue, saturation=saturation)
  _, entering = _planes_steps(rgb, params, None, **kw)
  means = tuple(jnp.mean(x, axis=(-2, -1), keepdims=True) for x in entering)
  jittered, _ = _planes_steps(rgb, params, means, **kw)
  return _stack(jittered)


def _planes_steps(rgb, params, means, *, impl, hue, saturation):
  """The jitter on planes: (output planes, planes entering the contrast op).

  With `means=None` contrast is left out; the planes entering it are still
  right, since only the ops before it shape them.
  """
  before, after = _slot_schedule(params.order, hue)
  entering = rgb

  def slot(rgb, entering, op):
    entering = _select(op == CONTRAST, rgb, entering)
    out = _select(op == BRIGHTNESS,
                  tuple(adjust_brightness(x, params.brightness, impl=impl)
                        for x in rgb), rgb)
    if means is not None:
      out = _select(op == CONTRAST,
                    tuple((x - m) * params.contrast + m
                          for x, m in zip(rgb, means)), out)
    if saturation:
      out = _select(op == SATURATION,
                    _saturation_planes(rgb, params.saturation), out)
    return _clip(out), entering

  for op in before:
    rgb, entering = slot(rgb, entering, op)
  if hue:
    rgb = _clip(_hue_planes(rgb, params.hue))
  for op in after:
    rgb, entering = slot(rgb, entering, op)
  return rgb, entering


def _color_jitter_stepwise(image, params, *, impl, hue, saturation):
  """`color_jitter` on `[H, W, 3]`, one materialised step at a time (CPU)."""
  before, after = _slot_schedule(params.order, hue)

  def slot(x, op):
    out = jnp.where(op == BRIGHTNESS,
                    adjust_brightness(x, params.brightness, impl=impl), x)
    out = jnp.where(op == CONTRAST, adjust_contrast(x, params.contrast), out)
    if saturation:
      out = jnp.where(op == SATURATION,
                      adjust_saturation(x, params.saturation), out)
    return jnp.clip(out, 0.0, 1.0)

  for op in before:
    image = slot(image, op)
  if hue:
    image = jnp.clip(adjust_hue(image, params.hue), 0.0, 1.0)
  for op in after:
    image = slot(image, op)
  return image


def rotate(image, degrees):
  """`image` `[H, W, C]` turned counter-clockwise by `degrees` about its centre.

  Output pixel (y, x) samples the input at the point the inverse rotation takes it
  to, about the centre `((H - 1) / 2, (W - 1) / 2)`, by bilinear interpolation, with
  0 (black) beyond the image (`jax.scipy.ndimage.map_coordinates`, order 1, mode
  'constant'); the output keeps the input's size, so the corners of a turned image
  are black. This is `scipy.ndimage.rotate(image, degrees, reshape=False, order=1,
  mode='grid-constant')`.
  """
  height, width = image.shape[-3], image.shape[-2]
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - (height - 1) / 2,
                      jnp.arange(width, dtype=jnp.float32) - (width - 1) / 2, indexing='ij')
  # Counter-clockwise as displayed, with rows growing downwards: the output pixel at
  # offset (y, x) from the centre samples the input at (y, x) turned clockwise.
  source_y = cos * y + sin * x + (height - 1) / 2
  source_x = cos * x - sin * y + (width - 1) / 2

  def channel(plane):
    return jax.scipy.ndimage.map_coordinates(plane, [source_y, source_x], order=1,
                                             mode='constant', cval=0.0)

  return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


# ----------------------------------------------------------------------------
# Random wrappers on one image.
# ----------------------------------------------------------------------------


def random_rotation(key, image, max_degrees):
  """`rotate(image, angle)`, the angle uniform in `[-max_degrees, max_degrees]`."""
  angle = jax.random.uniform(key, (), jnp.float32, -max_degrees, max_degrees)
  return rotate(image, angle)


def random_color_jitter(key, image, strength, p=0.8, impl='simclrv2', hue=True,
                        saturation=True):
  """With probability `p`, SimCLR's colour jitter of the given strength.

  The key is split into (apply, params): `uniform(apply) < p` decides, and
  `sample_jitter_params(params, strength, impl)` draws the order and factors.

  Args:
    key: PRNG key.
    image: `[H, W, 3]` float32 in [0, 1].
    strength: Python float in [0, 1.25] (SimCLR: 1.0 on ImageNet).
    p: probability of jittering.
    impl: 'simclrv2' or 'simclrv1' brightness.
    hue: whether the hue op is on.
    saturation: whether the saturation op is on.

  Returns:
    `[H, W, 3]` float32 in [0, 1] (the input where not applied).
  """
  if _static_strength(strength) == 0.0:
    return image
  k_apply, k_params = jax.random.split(key)
  params = sample_jitter_params(k_params, strength, impl)
  apply = jax.random.uniform(k_apply) < p
  jittered = color_jitter(image, params, impl=impl, hue=hue,
                          saturation=saturation)
  return jnp.where(apply, jittered, image)


def random_grayscale(key, image, p=0.2):
  """With probability `p`, `to_grayscale(image)`."""
  return jnp.where(jax.random.uniform(key) < p, to_grayscale(image), image)


def blur_kernel_size(height, kernel_frac=0.1):
  """SimCLR's blur kernel size, `height // 10` for the default 0.1."""
  return int(height * kernel_frac + 1e-6)


def random_blur(key, image, p=0.5, kernel_frac=0.1, sigma_range=(0.1, 2.0)):
  """With probability `p`, a Gaussian blur with sigma uniform in `sigma_range`.

  SimCLR's `random_blur`: kernel size `height * kernel_frac` (height // 10),
  'SAME' zero padding. The key is split into (apply, sigma).
  """
  k_apply, k_sigma = jax.random.split(key)
  sigma = jax.random.uniform(k_sigma, (), jnp.float32, sigma_range[0],
                             sigma_range[1])
  blurred = gaussian_blur(image, sigma,
                          blur_kernel_size(image.shape[-3], kernel_frac))
  return jnp.where(jax.random.uniform(k_apply) < p, blurred, image)


# ----------------------------------------------------------------------------
# Batch entry points.
# ----------------------------------------------------------------------------


def to_float(images):
  """uint8 (or float in [0, 1]) `[..., H, W, C]` to float32 with 3 channels.

  uint8 is divided by 255; one channel is repeated to three. Used as is at
  evaluation time and as the first step of `simclr_augment`.
  """
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  else:
    images = images.astype(jnp.float32)
  channels = images.shape[-1]
  if channels == 1:
    images = jnp.broadcast_to(images, images.shape[:-1] + (3,))
  elif channels != 3:
    raise ValueError(f'images must have 1 or 3 channels, got shape '
                     f'{images.shape}')
  return images


def simclr_augment(key, images, *, strength=1.0, jitter_p=0.8, grayscale_p=0.2,
                   blur_p=0.5, hue=True, saturation=True, impl='simclrv2', rotation_deg=0.0):
  """SimCLR's device-side augmentation of a batch of host-cropped images.

  For each image: a random rotation when `rotation_deg` > 0 (not SimCLR's; the
  chest X-ray recipe turns images by up to 45 degrees), then in SimCLR's order:
  colour jitter with probability `jitter_p`, grayscale with probability
  `grayscale_p`, Gaussian blur with probability `blur_p`, then a clip to [0, 1].
  Image i uses key `jax.random.split(key, N)[i]`, so results do not depend on how
  the batch is sharded over devices. An op whose probability (or `rotation_deg`) is
  a Python 0 is not traced.

  Cost, measured on one H100 (JAX 0.11): 3.4 ms for 512 x 224 x 224 x 3
  (jitter 1.9 ms, blur 1.4 ms); on a 2-core CPU about 30 ms for
  64 x 64 x 64 x 3. The rotation (not timed on a GPU) takes about as long as the
  jitter on a 2-core CPU: 3.2 ms more for 64 x 64 x 64 x 3 at strength 0.5 without
  blur (3.0 ms without it).

  Args:
    key: PRNG key.
    images: `[N, H, W, C]` uint8 (or float in [0, 1]), C = 1 or 3.
    strength: colour-jitter strength (Python float, static).
    jitter_p: probability of colour jitter.
    grayscale_p: probability of grayscale.
    blur_p: probability of blur.
    hue: whether the jitter's hue op is on (off for grayscale X-rays).
    saturation: whether the jitter's saturation op is on.
    impl: 'simclrv2' or 'simclrv1' brightness.
    rotation_deg: largest rotation in degrees, either way (Python float, static;
      0: none).

  Returns:
    float32 `[N, H, W, 3]` in [0, 1].
  """
  _check_impl(impl)
  _static_strength(strength)
  rotation_deg = _static_rotation(rotation_deg)
  images = to_float(images)
  keys = jax.random.split(key, images.shape[0])

  def augment_one(k, image):
    if rotation_deg:
      # Its own key, so that the other ops draw as they do without rotation.
      image = random_rotation(jax.random.fold_in(k, 3), image, rotation_deg)
    k_jitter, k_gray, k_blur = jax.random.split(k, 3)
    if not _is_static_zero(jitter_p):
      image = random_color_jitter(k_jitter, image, strength, jitter_p, impl,
                                  hue, saturation)
    if not _is_static_zero(grayscale_p):
      image = random_grayscale(k_gray, image, grayscale_p)
    if not _is_static_zero(blur_p):
      image = random_blur(k_blur, image, blur_p)
    return jnp.clip(image, 0.0, 1.0)

  return jax.vmap(augment_one)(keys, images)


def from_config(a):
  """`simclr_augment` with the settings of a config's `augment` block `a`.

  Raises:
    ConfigError: a setting out of range, naming its `config.augment` key.
  """
  checks = (('impl', lambda: _check_impl(a.impl)),
            ('color_strength', lambda: _static_strength(a.color_strength)),
            ('rotation_deg', lambda: _static_rotation(a.rotation_deg)))
  for key, check in checks:
    try:
      check()
    except (TypeError, ValueError) as e:
      raise errors.ConfigError(f'config.augment.{key}: {e}') from None
  for key in ('jitter_p', 'grayscale_p', 'blur_p'):
    if not 0.0 <= a[key] <= 1.0:
      raise errors.ConfigError(f'config.augment.{key} must be a probability in [0, 1], '
                               f'got {a[key]}')
  return functools.partial(simclr_augment, strength=a.color_strength, jitter_p=a.jitter_p,
                           grayscale_p=a.grayscale_p, blur_p=a.blur_p, hue=a.hue,
                           saturation=a.saturation, impl=a.impl, rotation_deg=a.rotation_deg)


def is_identity(a) -> bool:
  """Whether a config's `augment` block `a` changes no image (every op off)."""
  return (not a.rotation_deg and (a.jitter_p <= 0 or a.color_strength == 0)
          and a.grayscale_p <= 0 and a.blur_p <= 0)


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


def _check_impl(impl):
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')


def _static_float(value, name):
  """`value` as a Python float; TypeError (naming `name`) for a traced or other value."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f'{name} must be a Python number (static under jit), '
                    f'got {value!r}') from e


def _static_strength(strength):
  """Returns `strength` as a float in [0, 1.25] or raises."""
  strength = _static_float(strength, 'strength')
  if not 0.0 <= strength <= 1.25:
    raise ValueError('colour-jitter strength must be in [0, 1.25] (contrast '
                     'and saturation factors 1 +- 0.8*strength must stay >= 0, '
                     f'as TensorFlow requires), got {strength}')
  return strength


def _static_rotation(degrees):
  """Returns `degrees` as a float in [0, 180] or raises."""
  degrees = _static_float(degrees, 'rotation_deg')
  if not 0.0 <= degrees <= 180.0:
    raise ValueError(f'rotation_deg must be in [0, 180], got {degrees}')
  return degrees


def _is_static_zero(p):
  return isinstance(p, (int, float)) and p <= 0
