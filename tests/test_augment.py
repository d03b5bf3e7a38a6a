"""Tests of bigssl_med.augment against independent float64 NumPy references."""

import colorsys
import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigssl_med import augment

ATOL = 2e-6


def _image(seed=0, shape=(32, 32, 3)):
  """A random float32 image in [0, 1] with a few special pixels."""
  image = np.random.default_rng(seed).random(shape).astype(np.float32)
  if shape[-1] == 3 and shape[1] >= 5:
    image[0, :5] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0.5, 0.5],
                    [0.2, 0.7, 0.7]]
  return image


# ----------------------------------------------------------------------------
# float64 references.
# ----------------------------------------------------------------------------


def _ref_contrast(x, factor):
  x = x.astype(np.float64)
  mean = x.mean(axis=(0, 1), keepdims=True)
  return (x - mean) * factor + mean


def _ref_per_pixel(x, fn):
  flat = x.astype(np.float64).reshape(-1, 3)
  return np.array([fn(*p) for p in flat]).reshape(x.shape)


def _ref_saturation(x, factor):
  def one(r, g, b):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    return colorsys.hsv_to_rgb(h, min(max(s * factor, 0.0), 1.0), v)
  return _ref_per_pixel(x, one)


def _ref_hue(x, delta):
  def one(r, g, b):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    return colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
  return _ref_per_pixel(x, one)


def _ref_grayscale(x):
  gray = x.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140])
  return np.repeat(gray[..., None], 3, axis=-1)


def _ref_blur(x, sigma, kernel_size):
  """Direct 2-D convolution with the outer-product kernel, zero padded."""
  radius = kernel_size // 2
  taps = np.exp(-np.arange(-radius, radius + 1)**2 / (2.0 * sigma**2))
  kernel = np.outer(taps, taps) / taps.sum()**2
  height, width = x.shape[:2]
  padded = np.pad(x.astype(np.float64), ((radius, radius), (radius, radius),
                                         (0, 0)))
  out = np.zeros(x.shape, np.float64)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out += kernel[dy, dx] * padded[dy:dy + height, dx:dx + width]
  return out


def _ref_jitter(x, order, b, c, s, h, impl):
  x = x.astype(np.float64)
  for op in order:
    if op == augment.BRIGHTNESS:
      x = x * b if impl == 'simclrv2' else x + b
    elif op == augment.CONTRAST:
      x = _ref_contrast(x, c)
    elif op == augment.SATURATION:
      x = _ref_saturation(x, s)
    else:
      x = _ref_hue(x, h)
    x = np.clip(x, 0.0, 1.0)
  return x


# ----------------------------------------------------------------------------
# Named ops.
# ----------------------------------------------------------------------------


def test_adjust_brightness_v2_multiplies_v1_adds():
  x = _image()
  np.testing.assert_allclose(augment.adjust_brightness(x, 1.3), x * 1.3,
                             atol=ATOL)
  np.testing.assert_allclose(
      augment.adjust_brightness(x, -0.2, impl='simclrv1'), x - 0.2, atol=ATOL)
  with pytest.raises(ValueError, match='impl'):
    augment.adjust_brightness(x, 1.0, impl='v3')


@pytest.mark.parametrize('factor', [0.2, 1.0, 1.8])
def test_adjust_contrast_matches_reference(factor):
  x = _image()
  np.testing.assert_allclose(augment.adjust_contrast(x, factor),
                             _ref_contrast(x, factor), atol=ATOL)


@pytest.mark.parametrize('factor', [0.0, 0.2, 0.9, 1.8])
def test_adjust_saturation_matches_colorsys(factor):
  x = _image(1)
  np.testing.assert_allclose(augment.adjust_saturation(x, factor),
                             _ref_saturation(x, factor), atol=ATOL)


@pytest.mark.parametrize('delta', [-0.5, -0.2, 0.0, 0.07, 0.2, 0.5])
def test_adjust_hue_matches_colorsys(delta):
  x = _image(2)
  np.testing.assert_allclose(augment.adjust_hue(x, delta), _ref_hue(x, delta),
                             atol=ATOL)


def test_rgb_to_hsv_matches_colorsys_and_round_trips():
  x = _image(3)
  hsv = np.asarray(augment.rgb_to_hsv(x))
  ref = _ref_per_pixel(x, colorsys.rgb_to_hsv)
  hue_gap = np.abs(hsv[..., 0] - ref[..., 0])
  np.testing.assert_allclose(np.minimum(hue_gap, 1.0 - hue_gap), 0.0,
                             atol=ATOL)
  np.testing.assert_allclose(hsv[..., 1:], ref[..., 1:], atol=ATOL)
  assert hsv[..., 0].min() >= 0.0 and hsv[..., 0].max() < 1.0
  np.testing.assert_allclose(augment.hsv_to_rgb(hsv), x, atol=ATOL)
  np.testing.assert_allclose(augment.hsv_to_rgb(ref.astype(np.float32)),
                             _ref_per_pixel(ref, colorsys.hsv_to_rgb),
                             atol=ATOL)


def test_to_grayscale_weights():
  x = _image(4)
  out = np.asarray(augment.to_grayscale(x))
  assert out.shape == x.shape
  np.testing.assert_allclose(out, _ref_grayscale(x), atol=ATOL)


@pytest.mark.parametrize('shape,sigma,kernel_size', [
    ((32, 32, 3), 0.5, 3),
    ((32, 32, 3), 2.0, 6),  # even size: 7 taps, as SimCLR
    ((24, 32, 3), 1.3, 22),  # non-square, radius close to the height
    ((32, 32, 1), 0.9, 3),
])
def test_gaussian_blur_matches_direct_convolution(shape, sigma, kernel_size):
  x = _image(5, shape)
  np.testing.assert_allclose(augment.gaussian_blur(x, sigma, kernel_size),
                             _ref_blur(x, sigma, kernel_size), atol=ATOL)


def test_gaussian_blur_takes_a_traced_sigma():
  x = _image(6)
  blur = jax.jit(augment.gaussian_blur, static_argnums=2)
  for sigma in (0.3, 1.7):
    np.testing.assert_allclose(blur(x, sigma, 3), _ref_blur(x, sigma, 3),
                               atol=ATOL)


def test_gaussian_blur_with_zero_radius_is_identity():
  x = _image(7)
  np.testing.assert_array_equal(augment.gaussian_blur(x, 1.0, 1), x)


# ----------------------------------------------------------------------------
# Colour jitter.
# ----------------------------------------------------------------------------


# The public op picks a lowering per platform; both are checked here on CPU.
_JITTER_PATHS = {
    'public': augment.color_jitter,
    # pylint: disable-next=protected-access
    'fused': augment._color_jitter_fused,
    # pylint: disable-next=protected-access
    'stepwise': augment._color_jitter_stepwise,
}


@pytest.mark.parametrize('path', sorted(_JITTER_PATHS))
@pytest.mark.parametrize('impl', ['simclrv2', 'simclrv1'])
def test_color_jitter_matches_reference_in_every_order(impl, path):
  x = _image(8, (8, 8, 3))
  b = 1.3 if impl == 'simclrv2' else 0.2
  c, s, h = 0.6, 1.6, 0.15
  jitter = jax.jit(lambda img, p: _JITTER_PATHS[path](
      img, p, impl=impl, hue=True, saturation=True))
  for order in itertools.permutations(range(4)):
    params = augment.JitterParams(
        order=jnp.array(order, jnp.int32), brightness=jnp.float32(b),
        contrast=jnp.float32(c), saturation=jnp.float32(s),
        hue=jnp.float32(h))
    np.testing.assert_allclose(jitter(x, params),
                               _ref_jitter(x, order, b, c, s, h, impl),
                               atol=5 * ATOL, err_msg=f'order {order}')


@pytest.mark.parametrize('path', sorted(_JITTER_PATHS))
def test_color_jitter_switches_make_ops_identity(path):
  x = _image(9, (8, 8, 3))
  params = augment.JitterParams(
      order=jnp.array([3, 2, 1, 0], jnp.int32), brightness=jnp.float32(1.2),
      contrast=jnp.float32(0.7), saturation=jnp.float32(0.3),
      hue=jnp.float32(0.2))
  out = _JITTER_PATHS[path](x, params, impl='simclrv2', hue=False,
                            saturation=False)
  np.testing.assert_allclose(out, _ref_jitter(x, [1, 0], 1.2, 0.7, 1.0, 0.0,
                                              'simclrv2'), atol=ATOL)
  out = _JITTER_PATHS[path](x, params, impl='simclrv2', hue=False,
                            saturation=True)
  np.testing.assert_allclose(out, _ref_jitter(x, [2, 1, 0], 1.2, 0.7, 0.3, 0.0,
                                              'simclrv2'), atol=ATOL)


def test_jitter_params_ranges_and_uniform_order():
  keys = jax.random.split(jax.random.key(0), 2400)
  params = jax.vmap(lambda k: augment.sample_jitter_params(k, 1.0))(keys)
  for value, (low, high) in [(params.brightness, (0.2, 1.8)),
                             (params.contrast, (0.2, 1.8)),
                             (params.saturation, (0.2, 1.8)),
                             (params.hue, (-0.2, 0.2))]:
    value = np.asarray(value)
    assert value.min() >= low and value.max() < high
    assert value.min() < low + 0.05 and value.max() > high - 0.05
  orders = np.asarray(params.order)
  np.testing.assert_array_equal(np.sort(orders, axis=1),
                                np.tile(np.arange(4), (len(orders), 1)))
  counts = np.unique(orders @ (4**np.arange(4)), return_counts=True)[1]
  assert len(counts) == 24 and counts.min() > 60 and counts.max() < 140
  v1 = augment.sample_jitter_params(jax.random.key(1), 0.5, 'simclrv1')
  assert -0.4 <= float(v1.brightness) < 0.4


def test_jitter_strength_checks():
  assert augment.jitter_ranges(1.0)[augment.BRIGHTNESS] == (
      pytest.approx(0.2), pytest.approx(1.8))
  assert augment.jitter_ranges(1.25)[augment.BRIGHTNESS] == (
      0.0, pytest.approx(2.0))
  with pytest.raises(ValueError, match='strength'):
    augment.jitter_ranges(1.5)
  with pytest.raises(ValueError, match='impl'):
    augment.jitter_ranges(1.0, 'simclrv3')
  x = _image()
  np.testing.assert_array_equal(
      augment.random_color_jitter(jax.random.key(0), x, 0.0, p=1.0), x)


# ----------------------------------------------------------------------------
# Random wrappers: probabilities, determinism, jit and vmap.
# ----------------------------------------------------------------------------

_N_DRAWS = 4000


def _applied_fraction(fn, image):
  keys = jax.random.split(jax.random.key(42), _N_DRAWS)
  out = np.asarray(jax.jit(jax.vmap(fn, in_axes=(0, None)))(keys, image))
  return out, np.mean(np.any(out != image, axis=(1, 2, 3)))


def test_random_color_jitter_probability():
  image = _image(10, (4, 4, 3))
  _, frac = _applied_fraction(
      lambda k, x: augment.random_color_jitter(k, x, 1.0), image)
  assert abs(frac - 0.8) < 0.03


def test_random_grayscale_probability():
  image = _image(11, (4, 4, 3))
  out, frac = _applied_fraction(augment.random_grayscale, image)
  assert abs(frac - 0.2) < 0.03
  gray = np.ptp(out, axis=-1).max(axis=(1, 2)) == 0
  assert np.array_equal(gray, np.any(out != image, axis=(1, 2, 3)))


def test_random_blur_probability():
  image = _image(12, (20, 20, 3))  # kernel 2 -> 3 taps
  _, frac = _applied_fraction(
      lambda k, x: augment.random_blur(k, x, sigma_range=(1.0, 2.0)), image)
  assert abs(frac - 0.5) < 0.03


def test_random_wrappers_vmap_equals_loop():
  images = np.stack([_image(i, (16, 16, 3)) for i in range(4)])
  keys = jax.random.split(jax.random.key(3), 4)
  fns = [lambda k, x: augment.random_color_jitter(k, x, 1.0, p=1.0),
         lambda k, x: augment.random_grayscale(k, x, p=0.5),
         lambda k, x: augment.random_blur(k, x, p=1.0)]
  for fn in fns:
    batched = jax.jit(jax.vmap(fn))(keys, images)
    one = jax.jit(fn)
    for i in range(4):
      np.testing.assert_allclose(batched[i], one(keys[i], images[i]),
                                 atol=ATOL)


def _uint8_batch(n=6, size=32, channels=3, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (n, size, size, channels), dtype=np.uint8)


_JIT_AUGMENT = jax.jit(augment.simclr_augment,
                       static_argnames=('hue', 'saturation', 'jitter_p',
                                        'grayscale_p', 'blur_p', 'rotation_deg'))


def test_simclr_augment_shape_range_and_determinism():
  images = _uint8_batch()
  key = jax.random.key(0)
  out = _JIT_AUGMENT(key, images)
  assert out.shape == (6, 32, 32, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  np.testing.assert_array_equal(out, _JIT_AUGMENT(key, images))
  other = _JIT_AUGMENT(jax.random.key(1), images)
  assert not np.allclose(out, other)
  # Equal images in one batch get distinct draws.
  same = np.repeat(images[:1], 6, axis=0)
  out_same = np.asarray(_JIT_AUGMENT(key, same))
  assert len({o.tobytes() for o in out_same}) > 1


def test_simclr_augment_jit_equals_eager():
  images = _uint8_batch()
  key = jax.random.key(5)
  eager = augment.simclr_augment(key, images)
  jitted = _JIT_AUGMENT(key, images)
  np.testing.assert_allclose(jitted, eager, atol=ATOL)


def test_simclr_augment_grayscale_input_stays_gray():
  images = _uint8_batch(channels=1)
  for switches in ({}, {'hue': False, 'saturation': False}):
    out = np.asarray(_JIT_AUGMENT(jax.random.key(2), images, **switches))
    assert out.shape == (6, 32, 32, 3)
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=ATOL)
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=ATOL)


def test_simclr_augment_with_all_probabilities_zero_is_to_float():
  images = _uint8_batch()
  out = _JIT_AUGMENT(jax.random.key(0), images, jitter_p=0.0,
                     grayscale_p=0.0, blur_p=0.0)
  np.testing.assert_array_equal(out, augment.to_float(images))


def test_to_float():
  images = _uint8_batch(n=2, channels=1)
  out = np.asarray(augment.to_float(images))
  assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 2], images[..., 0] / 255.0, atol=1e-7)
  floats = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(augment.to_float(floats), floats)
  with pytest.raises(ValueError, match='channels'):
    augment.to_float(np.zeros((1, 4, 4, 2), np.uint8))


_SHARDING_SCRIPT = textwrap.dedent("""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bigssl_med import augment

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3),
                                               dtype=np.uint8)
    key = jax.random.key(7)
    augment_fn = jax.jit(augment.simclr_augment)
    whole = augment_fn(key, images)
    sharded_in = jax.device_put(images, NamedSharding(mesh, P('data')))
    sharded = augment_fn(key, sharded_in)
    assert len(sharded.sharding.device_set) == 8, sharded.sharding
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(whole),
                               atol=2e-6)
    print('max abs diff', np.abs(np.asarray(sharded) - np.asarray(whole)).max())
""")


def test_simclr_augment_independent_of_sharding():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _SHARDING_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------
# Rotation (the chest X-ray recipe).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(13, 17, 3), (16, 16, 1)])
@pytest.mark.parametrize('degrees', [-45.0, -7.5, 0.0, 30.0, 90.0, 180.0])
def test_rotate_matches_scipy_in_float64(shape, degrees):
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).random(shape)
  want = scipy.ndimage.rotate(image, degrees, axes=(1, 0), reshape=False, order=1,
                              mode='grid-constant', cval=0.0)
  got = jax.jit(augment.rotate)(jnp.asarray(image, jnp.float32), degrees)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_rotate_turns_counter_clockwise_and_blackens_the_corners():
  image = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(augment.rotate(image, 90.0), np.rot90(image), atol=1e-5)
  turned = np.asarray(augment.rotate(np.ones((33, 33, 3), np.float32), 45.0))
  assert turned[0, 0].max() == 0.0 and turned[16, 16].min() == pytest.approx(1.0)


def test_random_rotation_angle_range_and_key():
  image = np.zeros((21, 21, 1), np.float32)
  image[10, 10:] = 1.0  # a ray from the centre to the right edge
  angles = []
  for i in range(200):
    turned = np.asarray(augment.random_rotation(jax.random.key(i), image, 30.0))[..., 0]
    ys, xs = np.nonzero(turned > 0.5)
    far = np.argmax(np.hypot(ys - 10, xs - 10))
    angles.append(np.degrees(np.arctan2(10 - ys[far], xs[far] - 10)))
  angles = np.asarray(angles)
  assert angles.min() >= -31 and angles.max() <= 31
  assert angles.min() < -20 and angles.max() > 20  # the whole range is drawn
  np.testing.assert_array_equal(augment.random_rotation(jax.random.key(3), image, 30.0),
                                augment.random_rotation(jax.random.key(3), image, 30.0))


def test_simclr_augment_rotates_first_and_leaves_the_other_draws_alone():
  images = _uint8_batch()
  key = jax.random.key(4)
  rotated = _JIT_AUGMENT(key, images, rotation_deg=45.0, jitter_p=0.0, grayscale_p=0.0,
                         blur_p=0.0)
  keys = jax.random.split(key, images.shape[0])
  want = jax.vmap(lambda k, x: augment.random_rotation(jax.random.fold_in(k, 3), x, 45.0))(
      keys, augment.to_float(images))
  np.testing.assert_allclose(rotated, want, atol=1e-5)
  # With it, jitter, grayscale and blur draw what they draw without it: the augmentation
  # of the rotated images without rotation.
  np.testing.assert_allclose(_JIT_AUGMENT(key, images, rotation_deg=45.0),
                             _JIT_AUGMENT(key, want), atol=1e-5)


@pytest.mark.parametrize('key, value, message', [
    ('rotation_deg', 200.0, r'config.augment.rotation_deg: rotation_deg must be in \[0, 180\]'),
    ('color_strength', 2.0, r'config.augment.color_strength: colour-jitter strength must be'),
    ('blur_p', 1.5, r'config.augment.blur_p must be a probability in \[0, 1\], got 1.5'),
    ('impl', 'simclrv3', r"config.augment.impl: impl must be one of"),
])
def test_from_config_names_the_bad_key(key, value, message):
  from bigssl_med import config_schema  # pylint: disable=g-import-not-at-top
  from bigssl_med.errors import ConfigError  # pylint: disable=g-import-not-at-top
  a = config_schema.pretrain().augment
  a[key] = value
  with pytest.raises(ConfigError, match=message):
    augment.from_config(a)


def test_is_identity():
  from bigssl_med import config_schema  # pylint: disable=g-import-not-at-top
  assert augment.is_identity(config_schema.finetune().augment)
  assert not augment.is_identity(config_schema.pretrain().augment)
  a = config_schema.finetune().augment
  a.rotation_deg = 10.0
  assert not augment.is_identity(a)
