"""Tests of bigssl_med.data.host_ops (decode, SimCLR's crops, flip)."""

import io

import numpy as np
import pytest
from PIL import Image
from PIL import JpegImagePlugin

from bigssl_med import errors
from bigssl_med.data import host_ops


def _encode(array, fmt='PNG', **kw):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, **kw)
  return buffer.getvalue()


def _rgb(height=32, width=40, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                              dtype=np.uint8)


def _smooth_rgb(height, width):
  """A smooth colour image, on which a JPEG's reduced-scale decode is close."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  channels = [0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(5 * y),
              x * 0.5 + y * 0.5]
  return np.round(np.stack(channels, -1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# decode_image.
# ----------------------------------------------------------------------------


def test_decode_png_round_trip():
  image = _rgb()
  out = host_ops.decode_image(_encode(image))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, image)


def test_decode_jpeg_shape():
  out = host_ops.decode_image(_encode(_rgb(), 'JPEG'))
  assert out.shape == (32, 40, 3) and out.dtype == np.uint8


def test_decode_grayscale_to_three_channels_and_back():
  gray = _rgb()[..., 0]
  out = host_ops.decode_image(_encode(gray), channels=3)
  assert out.shape == (32, 40, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)
  out1 = host_ops.decode_image(_encode(gray), channels=1)
  np.testing.assert_array_equal(out1[..., 0], gray)


def test_decode_colour_to_one_channel_is_luma():
  image = _rgb().astype(np.float64)
  out = host_ops.decode_image(_encode(_rgb()), channels=1)
  assert out.shape == (32, 40, 1)
  luma = image @ np.array([0.299, 0.587, 0.114])
  assert np.abs(out[..., 0] - luma).max() <= 1.0


def test_decode_16_bit_png_is_scaled_to_8_bits():
  wide = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
  out = host_ops.decode_image(_encode(wide), channels=1)
  np.testing.assert_array_equal(out[..., 0], [[0, 1, 255, 128]])


def test_every_16_bit_value_becomes_its_nearest_8_bit_value():
  """All 65536 values, against float64 rounding of value * 255 / 65535 (no ties occur)."""
  wide = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  out = host_ops.decode_image(_encode(wide), channels=1)[..., 0]
  np.testing.assert_array_equal(out, np.round(wide.astype(np.float64) * 255 / 65535))


def test_a_16_bit_image_of_12_bit_values_is_a_warning(caplog):
  raw = np.array([[0, 1000, 4095, 2048]], dtype=np.uint16)  # raw DICOM values
  with caplog.at_level('WARNING'):
    out = host_ops.decode_image(_encode(raw), channels=1, name='cxr/0001.png')
    host_ops.decode_image(_encode(raw * 16), channels=1, name='cxr/0002.png')  # scaled up
  np.testing.assert_array_equal(out[..., 0], [[0, 4, 16, 8]])  # as PNG defines: dark
  assert ('cxr/0001.png: a 16-bit image whose values reach only 4095 (12 bits or fewer)'
          in caplog.text)
  assert 'cxr/0002.png' not in caplog.text


def test_decode_rgba_drops_alpha():
  rgba = np.concatenate([_rgb(), np.full((32, 40, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(host_ops.decode_image(_encode(rgba)), _rgb())


def test_a_floating_point_image_is_an_error_not_a_clipped_black_one():
  buffer = io.BytesIO()
  Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(buffer, format='TIFF')  # mode F
  with pytest.raises(errors.DataError, match=r'cannot decode image scan.tif: a 32-bit '
                                             r'floating-point image has no defined 8-bit range'):
    host_ops.decode_image(buffer.getvalue(), name='scan.tif')


@pytest.mark.parametrize('data', [b'not an image at all',
                                  _encode(_rgb(), 'JPEG')[:300]])
def test_decode_error_is_one_line_and_names_the_file(data):
  with pytest.raises(errors.DataError) as info:
    host_ops.decode_image(data, name='cases/p1/broken.jpg')
  message = str(info.value)
  assert 'cases/p1/broken.jpg' in message and '\n' not in message


def test_crops_report_decode_errors_by_name():
  rng = np.random.default_rng(0)
  with pytest.raises(errors.DataError, match='x.png'):
    host_ops.random_resized_crop(rng, b'garbage', 8, name='x.png')
  with pytest.raises(errors.DataError, match='y.png'):
    host_ops.center_crop(b'garbage', 8, name='y.png')


# ----------------------------------------------------------------------------
# sample_crop_box.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('height,width', [(224, 224), (480, 640), (300, 90)])
def test_crop_box_statistics(height, width):
  rng = np.random.default_rng(0)
  boxes = np.array([host_ops.sample_crop_box(rng, height, width)
                    for _ in range(2000)])
  y, x, h, w = boxes.T
  assert (y >= 0).all() and (x >= 0).all()
  assert (y + h <= height).all() and (x + w <= width).all()
  # TensorFlow's exclusive bound on the offset.
  assert ((y + h < height) | (h == height)).all()
  assert ((x + w < width) | (w == width)).all()
  area = h * w / (height * width)
  # min_object_covered=0.1 raises the effective lower bound from 0.08.
  assert area.min() >= 0.1 and area.max() <= 1.0
  assert area.min() < 0.11
  ratio = w / h
  assert (ratio >= 3 / 4 - 0.5 / h).all() and (ratio <= 4 / 3 + 0.5 / h).all()
  if height > 3 * width:
    # A width-limited crop: at most a 4:3 box 90 wide, 120 tall.
    assert area.max() <= 120 * 90 / (height * width)
  if height == width:
    # Uniform aspect draw, slightly skewed by rejections; TensorFlow's mean
    # over 20000 draws is 1.041.
    assert area.max() > 0.95
    assert abs(ratio.mean() - 1.04) < 0.015
    assert abs(area.mean() - 0.42) < 0.02  # TensorFlow: 0.4225
    assert abs((y / np.maximum(height - h, 1)).mean() - 0.49) < 0.03


def test_crop_box_is_deterministic_for_a_seed():
  def draw(seed):
    return [host_ops.sample_crop_box(np.random.default_rng(seed), 100, 120)
            for _ in range(5)]
  assert draw(3) == draw(3)
  assert draw(3) != draw(4)


def test_crop_box_falls_back_to_the_whole_image():
  rng = np.random.default_rng(0)
  assert host_ops.sample_crop_box(rng, 1, 1) == (0, 0, 1, 1)
  impossible = dict(area_range=(0.5, 1.0), aspect_ratio_range=(10.0, 20.0))
  assert host_ops.sample_crop_box(rng, 10, 10, **impossible) == (0, 0, 10, 10)
  uncoverable = dict(area_range=(0.1, 0.5), min_object_covered=0.9)
  assert host_ops.sample_crop_box(rng, 50, 50, **uncoverable) == (0, 0, 50, 50)


def test_crop_box_rejects_bad_arguments():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match='area_range'):
    host_ops.sample_crop_box(rng, 10, 10, area_range=(0.0, 1.0))
  with pytest.raises(ValueError, match='aspect_ratio_range'):
    host_ops.sample_crop_box(rng, 10, 10, aspect_ratio_range=(-1.0, 1.0))


# ----------------------------------------------------------------------------
# random_resized_crop, center_crop, random_flip.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
@pytest.mark.parametrize('channels', [1, 3])
def test_random_resized_crop_shapes(fmt, channels):
  data = _encode(_rgb(48, 64), fmt)
  out = host_ops.random_resized_crop(np.random.default_rng(0), data, 24,
                                     channels=channels)
  assert out.shape == (24, 24, channels) and out.dtype == np.uint8


def test_random_resized_crop_takes_a_pil_image_and_crop_kw():
  image = Image.fromarray(np.full((40, 30, 3), 77, np.uint8))
  out = host_ops.random_resized_crop(np.random.default_rng(1), image, 16,
                                     area_range=(0.5, 0.6))
  np.testing.assert_array_equal(out, 77)


def test_random_resized_crop_covers_the_sampled_box():
  # A crop of the whole image (area fraction forced to 1) at the same size is
  # the image itself.
  image = _rgb(32, 32)
  out = host_ops.random_resized_crop(
      np.random.default_rng(0), _encode(image), 32, area_range=(1.0, 1.0),
      aspect_ratio_range=(1.0, 1.0))
  np.testing.assert_array_equal(out, image)


def test_random_resized_crop_drafts_large_jpegs(monkeypatch):
  data = _encode(_smooth_rgb(768, 1024), 'JPEG', quality=95)
  scales = []
  original_draft = JpegImagePlugin.JpegImageFile.draft

  def recording_draft(self, mode, size):
    result = original_draft(self, mode, size)
    scales.append(1024 / result[1][2])
    return result

  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft', recording_draft)
  for seed in range(5):
    drafted = host_ops.random_resized_crop(np.random.default_rng(seed), data,
                                           32)
    full = Image.open(io.BytesIO(data))
    full.load()  # A decoded image: no draft.
    reference = host_ops.random_resized_crop(np.random.default_rng(seed), full,
                                             32)
    difference = np.abs(drafted.astype(int) - reference.astype(int))
    assert difference.mean() < 2.0, (seed, difference.mean())
  assert len(scales) == 5 and max(scales) >= 4


def test_center_crop_matches_simclr_geometry():
  image = _rgb(32, 40)
  # side = rint(0.875 * 32) = 28, top = (32 - 28 + 1) // 2 = 2,
  # left = (40 - 28 + 1) // 2 = 6; resizing 28 -> 28 is the identity.
  out = host_ops.center_crop(_encode(image), 28)
  np.testing.assert_array_equal(out, image[2:30, 6:34])
  tall = _rgb(41, 20, seed=1)
  out = host_ops.center_crop(Image.fromarray(tall), 18)  # side rint(17.5)=18
  np.testing.assert_array_equal(out, tall[12:30, 1:19])


def test_center_crop_shape_follows_simclr():
  assert host_ops.center_crop_shape(32, 40) == (28, 28)
  assert host_ops.center_crop_shape(40, 32) == (28, 28)
  assert host_ops.center_crop_shape(4, 4) == (4, 4)  # rint(3.5) = 4
  assert host_ops.center_crop_shape(100, 100, 0.5, aspect_ratio=2.0) == (25, 50)


def test_center_crop_of_a_large_jpeg_is_close_to_full_decode():
  data = _encode(_smooth_rgb(600, 800), 'JPEG', quality=95)
  drafted = host_ops.center_crop(data, 64, channels=1)
  full = Image.open(io.BytesIO(data))
  full.load()
  reference = host_ops.center_crop(full, 64, channels=1)
  assert drafted.shape == (64, 64, 1)
  assert np.abs(drafted.astype(int) - reference.astype(int)).mean() < 2.0


def test_random_flip_probability_and_result():
  rng = np.random.default_rng(0)
  image = _rgb(4, 6)
  flips = 0
  for _ in range(4000):
    out = host_ops.random_flip(rng, image)
    if not np.array_equal(out, image):
      np.testing.assert_array_equal(out, image[:, ::-1])
      flips += 1
  assert abs(flips / 4000 - 0.5) < 0.03


def _scan(height, width):
  """A gray picture with edges everywhere and a bright band along the right border."""
  y, x = np.mgrid[0:height, 0:width]
  pixels = 128 + 60 * np.sin(x / 23.0) * np.cos(y / 17.0) + 40 * ((x // 50 + y // 50) % 2)
  pixels[:, -40:] = 250
  return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_load_for_side_decodes_a_long_jpeg_at_reduced_scale_to_the_same_picture(mode):
  """A JPEG four times longer than its stored side is decoded at 1/4 scale (a width not
  divisible by 4 included); downscaled through the box it returns, it is the picture the
  full decode gives, at the same size."""
  gray = _scan(803, 1001)
  array = gray if mode == 'L' else np.stack([gray, gray // 2, 255 - gray], -1)
  data = _encode(array, 'JPEG', quality=95)
  image, image_format, size, box = host_ops.load_for_side(data, 200)
  assert image_format == 'JPEG' and image.mode == mode
  assert image.size == (251, 201) and size == (200, 160)
  assert box == (0.0, 0.0, 1001 / 4, 803 / 4)
  reduced = np.asarray(image.resize(size, Image.Resampling.BICUBIC, box=box), np.float64)
  with Image.open(io.BytesIO(data)) as full:
    want = np.asarray(host_ops.downscale(full.convert(mode), 200), np.float64)
  assert reduced.shape == want.shape
  # (Through the whole image instead of the box: 3.3 and 86, the picture stretched.)
  assert np.abs(reduced - want).mean() < 1.5
  assert np.abs(reduced - want).max() < 20


def test_load_for_side_decodes_fully_what_it_need_not_reduce():
  png = _encode(_scan(803, 1001))
  jpeg = _encode(_scan(803, 1001), 'JPEG')
  for data, max_side, size in ((png, 200, (200, 160)), (jpeg, 600, (600, 481)),
                               (jpeg, None, None), (jpeg, 1001, None)):
    image, _, got_size, box = host_ops.load_for_side(data, max_side)
    assert image.size == (1001, 803) and got_size == size and box is None
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))
  with pytest.raises(errors.DataError, match='^cannot decode image x.jpg: '):
    host_ops.load_for_side(jpeg[:100], 200, name='x.jpg')
