"""Host-side image ops: decode, SimCLR's random crop, centre crops and flip.

NumPy and Pillow only (no JAX): these run in the input pipeline's workers. The
per-pixel augmentations (colour jitter, grayscale, blur) run on the accelerator
in `bigssl_med.augment`. Outputs are uint8 `[H, W, C]`, a quarter of the bytes
of float32 to move to the device.

Semantics follow SimCLR's `data_util.py` (`crop_and_resize`,
`distorted_bounding_box_crop`, `center_crop`, `random_flip_left_right`) and
TensorFlow's `sample_distorted_bounding_box` kernel. Two deliberate
differences: the crop is resized by Pillow's bicubic filter, which is
antialiased when shrinking (TensorFlow's bicubic resize is not), and the result
is rounded to uint8 (SimCLR keeps float32). `squash_crop` is the other
evaluation view, the transfer-learning benchmark's (torchvision's `Resize((S, S))`
then `CenterCrop`).
"""

import contextlib
import io
import math

from absl import logging
import numpy as np
from PIL import Image

from bigssl_med import errors

# What Pillow raises for bytes it cannot decode (UnidentifiedImageError is an
# OSError; truncated data raises OSError or SyntaxError on load).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError,
                  Image.DecompressionBombError)

# Pillow modes holding more than 8 bits per sample, scaled to 8 bits as
# TensorFlow's decode_png(dtype=uint8) does (65535 -> 255).
_WIDE_GRAY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
_GRAY_MODES = ('1', 'L', 'LA', 'La') + _WIDE_GRAY_MODES
# Wide images whose values stay below this hold raw 12-bit (or narrower) data.
_TWELVE_BITS = 4096
# 16-bit value -> 8 bits, rounded as TensorFlow's decode_png(dtype=uint8): a table
# lookup, a quarter of the time of the arithmetic on a 2048 x 2048 X-ray.
_SIXTEEN_TO_EIGHT_BITS = ((np.arange(65536, dtype=np.int64) * 255 + 32767) //
                          65535).astype(np.uint8)


# ----------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------


def decode_image(data, *, channels=3, name=''):
  """Decodes encoded image bytes (JPEG, PNG, ...) to uint8 `[H, W, channels]`.

  Args:
    data: the encoded bytes.
    channels: 3 (grayscale images are replicated) or 1 (colour images are
      turned to luma, 0.299 R + 0.587 G + 0.114 B). 16-bit grayscale is scaled
      to 8 bits (65535 -> 255); alpha is dropped; EXIF orientation is ignored,
      as by TensorFlow's decoders.
    name: the file or record name, for error messages.

  Returns:
    np.uint8 `[H, W, channels]`.

  Raises:
    bigssl_med.errors.DataError: the bytes are not a decodable image; the
      one-line message names `name`.
  """
  _check_channels(channels)
  with _decoding(name):
    image = _open(data)
    return _to_array(_as_8bit(image, channels, name), channels)


def decode_pil(data, *, channels=None, name=''):
  """Decodes encoded image bytes fully to an 8-bit Pillow image.

  Args:
    data: the encoded bytes.
    channels: None keeps grayscale images in mode 'L' and makes everything
      else 'RGB'; 1 or 3 force 'L' or 'RGB'. 16-bit grayscale is scaled to 8
      bits as in `decode_image`.
    name: the file or record name, for error messages.

  Returns:
    A loaded `PIL.Image.Image` in mode 'L' or 'RGB', and the format Pillow
    detected ('JPEG', 'PNG', ...).

  Raises:
    bigssl_med.errors.DataError: the bytes are not a decodable image.
  """
  if channels is not None:
    _check_channels(channels)
  with _decoding(name):
    image = _open(data)
    image_format = image.format
    image.load()
  return as_8bit(image, channels=channels, name=name), image_format


def as_8bit(image, *, channels=None, name=''):
  """A decoded Pillow image in 8 bits, as `decode_pil` returns it: mode 'L' or 'RGB'.

  Raises:
    bigssl_med.errors.DataError: a floating-point image (no 8-bit range); names `name`.
  """
  if channels is not None:
    _check_channels(channels)
  with _decoding(name):
    image = _as_8bit(image, channels or 3, name)
  if channels == 3 and image.mode != 'RGB':
    image = image.convert('RGB')
  return image


# ----------------------------------------------------------------------------
# SimCLR's random crop (tf.image.sample_distorted_bounding_box).
# ----------------------------------------------------------------------------


def sample_crop_box(rng, height, width, *, area_range=(0.08, 1.0),
                    aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.1,
                    max_attempts=100):
  """Samples a crop box as `tf.image.sample_distorted_bounding_box` does.

  With the whole image as the only bounding box (SimCLR's `crop_and_resize`).
  Each attempt draws an aspect ratio (width / height) uniformly from
  `aspect_ratio_range`, then a height uniformly among the integers between
  the smallest and largest heights whose area `height * round(height * ratio)`
  fits `area_range`, nudged by one where rounding leaves the area outside the
  range, then a top-left corner uniformly with `y` in `[0, height - h)` and `x`
  in `[0, width - w)` (TensorFlow's exclusive bound: a crop touches the bottom
  or right edge only when it spans the whole side). The box must also cover
  at least `min_object_covered` of the image, so with SimCLR's defaults the
  area fraction is in [0.1, 1.0], not [0.08, 1.0]. After `max_attempts`
  failures the whole image is returned.

  Args:
    rng: `np.random.Generator`.
    height: image height (> 0).
    width: image width (> 0).
    area_range: (min, max) fraction of the image area, each in (0, 1].
    aspect_ratio_range: (min, max) width / height, each > 0.
    min_object_covered: least fraction of the image the crop must cover.
    max_attempts: number of tries before falling back to the whole image.

  Returns:
    `(y, x, h, w)` ints.
  """
  min_area, max_area = (float(a) for a in area_range)
  min_ratio, max_ratio = (float(r) for r in aspect_ratio_range)
  if not (0 < min_area <= 1 and 0 < max_area <= 1):
    raise ValueError(f'area_range must be in (0, 1], got {area_range}')
  if not (min_ratio > 0 and max_ratio > 0):
    raise ValueError(
        f'aspect_ratio_range must be > 0, got {aspect_ratio_range}')
  if max_attempts <= 0 or min_object_covered < 0:
    raise ValueError('max_attempts must be > 0 and min_object_covered >= 0, '
                     f'got {max_attempts} and {min_object_covered}')
  if height <= 0 or width <= 0:
    raise ValueError(f'image size must be positive, got {height}x{width}')
  image_area = float(height * width)
  for _ in range(max_attempts):
    ratio = rng.random() * (max_ratio - min_ratio) + min_ratio
    box = _random_crop(rng, height, width, min_area * image_area,
                       max_area * image_area, ratio)
    if box is not None and box[2] * box[3] >= max(
        1.0, min_object_covered * image_area):
      return box
  return 0, 0, height, width


def _random_crop(rng, height, width, min_area, max_area, ratio):
  """One attempt of TensorFlow's `GenerateRandomCrop`; None on failure."""
  if max_area <= 0 or min_area > max_area:
    return None
  crop_h = _round(math.sqrt(min_area / ratio))
  max_h = _round(math.sqrt(max_area / ratio))
  if _round(max_h * ratio) > width:
    # The largest height whose rounded width still fits.
    max_h = int((width + 0.5 - 1e-7) / ratio)
    if _round(max_h * ratio) > width:
      max_h -= 1
  max_h = min(max_h, height)
  crop_h = min(crop_h, max_h)
  if crop_h < max_h:
    crop_h += int(rng.integers(max_h - crop_h + 1))
  crop_w = _round(crop_h * ratio)
  # Rounding may leave the area just outside the range: try one step each way.
  if crop_w * crop_h < min_area:
    crop_h += 1
    crop_w = _round(crop_h * ratio)
  if crop_w * crop_h > max_area:
    crop_h -= 1
    crop_w = _round(crop_h * ratio)
  area = crop_w * crop_h
  if (area < min_area or area > max_area or crop_w > width or crop_h > height or
      crop_w <= 0 or crop_h <= 0):
    return None
  y = int(rng.integers(height - crop_h)) if crop_h < height else 0
  x = int(rng.integers(width - crop_w)) if crop_w < width else 0
  return y, x, crop_h, crop_w


def _round(value):
  """Round half to even, as C's lrintf in the default rounding mode."""
  return int(round(value))


def random_resized_crop(rng, data_or_pil, size, *, channels=3, name='',
                        **crop_kw):
  """SimCLR's `crop_and_resize`: a `sample_crop_box` crop, bicubic to size.

  The crop and the resize are one `Image.resize(..., box=...)` call. When
  `data_or_pil` is encoded JPEG bytes and the crop is at least twice the
  output size, the JPEG is decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`,
  the largest reduction that keeps the crop at least `size` pixels on each
  side) and the box is scaled to match: the crop box is drawn on the full-size
  image either way.

  Args:
    rng: `np.random.Generator`.
    data_or_pil: encoded image bytes or a `PIL.Image.Image`.
    size: output height and width.
    channels: 3 or 1, as in `decode_image`.
    name: file or record name, for error messages.
    **crop_kw: passed to `sample_crop_box` (area_range, aspect_ratio_range,
      min_object_covered, max_attempts).

  Returns:
    np.uint8 `[size, size, channels]`.
  """
  _check_channels(channels)
  with _decoding(name):
    image = _open(data_or_pil)
  width, height = image.size
  y, x, h, w = sample_crop_box(rng, height, width, **crop_kw)
  with _decoding(name):
    return _crop_and_resize(image, (x, y, x + w, y + h), size, channels,
                            draft=not isinstance(data_or_pil, Image.Image))


def stored_size(size, max_side):
  """The `(width, height)` an image of `size` is stored at, its longest side `max_side`
  (`downscale`); None when it fits (or `max_side` is None)."""
  if max_side is None or max(size) <= max_side:
    return None
  scale = max_side / max(size)
  return tuple(max(1, round(s * scale)) for s in size)


def downscale(image, max_side):
  """`image` (Pillow) with its longest side at most `max_side`: antialiased bicubic.

  How data sets are stored (`tfds_builders.common.encode_image`); an image within
  `max_side`, or `max_side` None, is returned as it is.
  """
  size = stored_size(image.size, max_side)
  return image if size is None else image.resize(size, Image.Resampling.BICUBIC)


def load_for_side(data, max_side, *, name=''):
  """Decodes encoded image bytes for storing at a longest side of `max_side`.

  A JPEG at least twice as long as its stored size is decoded at the largest of 1/2,
  1/4 or 1/8 scale that keeps it at least that size (libjpeg's DCT scaling,
  `Image.draft`, as `random_resized_crop` does): most of the decoding time of a
  full-size X-ray saved. Other formats, and images that fit, are decoded fully.

  Args:
    data: the encoded bytes.
    max_side: the longest side stored (None: the image as it is).
    name: the file or record name, for error messages.

  Returns:
    `(image, image_format, size, box)`: the loaded Pillow image (in the file's mode), the
    format Pillow detected, the size to store it at (`stored_size` of the full-size
    image; None when it fits) and the box of `image` that is the whole picture, for
    `image.resize(size, box=box)` (None when decoded fully).

  Raises:
    bigssl_med.errors.DataError: the bytes are not a decodable image.
  """
  with _decoding(name):
    image = _open(data)
    image_format = image.format
    size = stored_size(image.size, max_side)
    box = None
    if size is not None:
      whole = (0, 0) + image.size
      scale = _draft(image, whole, size, channels=None)  # colour kept, for the gray check
      if scale != 1.0:
        box = tuple(c / scale for c in whole)
    image.load()
  return image, image_format, size, box


def center_crop(data_or_pil, size, crop_proportion=0.875, *, channels=3,
                name=''):
  """SimCLR's evaluation crop: the central square, bicubic to size x size.

  The square's side is `rint(crop_proportion * min(height, width))` and it is
  offset by `(dim - side + 1) // 2` (SimCLR's `center_crop` for a square
  output). Large JPEGs are decoded at reduced scale as in
  `random_resized_crop`.

  Args:
    data_or_pil: encoded image bytes or a `PIL.Image.Image`.
    size: output height and width.
    crop_proportion: fraction of the shorter side kept (0.875 for ImageNet).
    channels: 3 or 1, as in `decode_image`.
    name: file or record name, for error messages.

  Returns:
    np.uint8 `[size, size, channels]`.
  """
  _check_channels(channels)
  with _decoding(name):
    image = _open(data_or_pil)
  width, height = image.size
  crop_h, crop_w = center_crop_shape(height, width, crop_proportion)
  top = (height - crop_h + 1) // 2
  left = (width - crop_w + 1) // 2
  with _decoding(name):
    return _crop_and_resize(image, (left, top, left + crop_w, top + crop_h),
                            size, channels,
                            draft=not isinstance(data_or_pil, Image.Image))


def squash_crop(data_or_pil, size, crop_proportion=0.875, *, channels=3, name=''):
  """The whole image squashed to a square, then its centre: torchvision's evaluation view.

  The image, whatever its aspect ratio, is resized to `S x S` with
  `S = round(size / crop_proportion)` (256 for 224) by Pillow's bilinear filter,
  antialiased when shrinking, as torchvision's `Resize((S, S))` does on a PIL image;
  then the central `size x size` is cut out at offset `round((S - size) / 2)`
  (torchvision's `CenterCrop`). With `crop_proportion=1` the squashed image is the
  view (ten-crop evaluation cuts its crops on the device). The image is always
  decoded at full size (no JPEG draft), so the view is exactly that computation on
  the decoded pixels.

  Args:
    data_or_pil: encoded image bytes or a `PIL.Image.Image`.
    size: output height and width.
    crop_proportion: `size` over the squashed side, in (0, 1].
    channels: 3 or 1, as in `decode_image`.
    name: file or record name, for error messages.

  Returns:
    np.uint8 `[size, size, channels]`.
  """
  _check_channels(channels)
  if not 0 < crop_proportion <= 1:
    raise ValueError(f'crop_proportion must be in (0, 1], got {crop_proportion}')
  squashed = max(size, int(round(size / crop_proportion)))
  with _decoding(name):
    image = _as_8bit(_open(data_or_pil), channels, name)
    image = image.resize((squashed, squashed), Image.Resampling.BILINEAR)
  offset = int(round((squashed - size) / 2.0))
  return _to_array(image.crop((offset, offset, offset + size, offset + size)), channels)


def center_crop_shape(height, width, crop_proportion=0.875, aspect_ratio=1.0):
  """SimCLR's `_compute_crop_shape`: `(crop_height, crop_width)`.

  `aspect_ratio` is the output's width / height; the crop keeps
  `crop_proportion` of the side that limits it. Rounded half to even.
  """
  if aspect_ratio > width / height:
    crop_h = np.rint(crop_proportion / aspect_ratio * width)
    crop_w = np.rint(crop_proportion * width)
  else:
    crop_h = np.rint(crop_proportion * height)
    crop_w = np.rint(crop_proportion * aspect_ratio * height)
  return max(int(crop_h), 1), max(int(crop_w), 1)


def random_flip(rng, image):
  """Left-right flip with probability 0.5 (`tf.image.random_flip_left_right`).

  Args:
    rng: `np.random.Generator`.
    image: `[H, W, C]` array.

  Returns:
    The image, or a contiguous flipped copy.
  """
  if rng.random() < 0.5:
    return np.ascontiguousarray(image[:, ::-1])
  return image


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _crop_and_resize(image, box, size, channels, *, draft):
  """Crops `box` (left, top, right, bottom) and resizes it bicubically."""
  scale = _draft(image, box, size, channels) if draft else 1.0
  image = _as_8bit(image, channels)
  scaled_box = tuple(c / scale for c in box)
  out = image.resize((size, size), Image.Resampling.BICUBIC, box=scaled_box)
  return _to_array(out, channels)


def _draft(image, box, size, channels):
  """Asks a not-yet-decoded JPEG for a reduced-scale decode; returns the scale.

  The request keeps the crop `box` at least `size` pixels (an int: a square; or
  `(width, height)`) on each side. Other formats (and images already decoded) ignore
  drafts: scale 1.
  """
  width, height = image.size
  left, top, right, bottom = box
  out_width, out_height = (size, size) if isinstance(size, int) else size
  request = (math.ceil(width * out_width / max(right - left, 1)),
             math.ceil(height * out_height / max(bottom - top, 1)))
  result = image.draft('L' if channels == 1 else None, request)
  if result is None:
    return 1.0
  return width / result[1][2]


def _open(data_or_pil):
  """A PIL image, lazily opened from bytes (nothing decoded yet)."""
  if isinstance(data_or_pil, Image.Image):
    return data_or_pil
  if isinstance(data_or_pil, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(data_or_pil)))
  raise TypeError('expected encoded image bytes or a PIL image, got '
                  f'{type(data_or_pil).__name__}')


def _as_8bit(image, channels, name=''):
  """The image in mode 'L' or 'RGB' ('L' kept for gray, even if channels=3).

  Gray stays one channel until `_to_array`, so that resizing costs a third. A
  floating-point image has no range to scale from: an error (`_decoding` names it).
  A 16-bit image whose values all fit in 12 bits (raw DICOM values, which a 16-bit PNG
  should hold scaled up) comes out nearly black: a warning names it (`name`), for the
  first few such images of a process.
  """
  if image.mode == 'F':
    raise ValueError('a 32-bit floating-point image has no defined 8-bit range; store it '
                     'as 8- or 16-bit')
  if image.mode in _WIDE_GRAY_MODES:
    wide = np.asarray(image)
    if wide.dtype != np.uint16:  # mode 'I': int32, perhaps outside the 16-bit range
      wide = np.clip(wide.astype(np.int64), 0, 65535).astype(np.uint16)
    top = int(wide.max(initial=0))
    if 0 < top < _TWELVE_BITS:
      logging.log_first_n(
          logging.WARNING, '%s: a 16-bit image whose values reach only %d (12 bits or '
          'fewer) is scaled by 65535, as 16-bit PNG defines, and comes out nearly black; '
          'if it holds raw DICOM values, scale them to the 16-bit range first', 5,
          name or 'an image', top)
    return Image.fromarray(_SIXTEEN_TO_EIGHT_BITS[wide])
  if image.mode == 'L':
    return image
  if channels == 1 or image.mode in _GRAY_MODES:
    return image.convert('L')
  if image.mode != 'RGB':
    return image.convert('RGB')
  return image


def _to_array(image, channels):
  """uint8 `[H, W, channels]` from an 'L' or 'RGB' PIL image."""
  array = np.asarray(image, dtype=np.uint8)
  if array.ndim == 2:
    array = array[:, :, None]
  if array.shape[-1] != channels:
    array = np.repeat(array, channels, axis=-1)
  return np.ascontiguousarray(array)


def _check_channels(channels):
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')


@contextlib.contextmanager
def _decoding(name):
  """Turns Pillow's decoding errors into a one-line DataError naming `name`."""
  try:
    yield
  except _DECODE_ERRORS as e:
    if isinstance(e, Image.UnidentifiedImageError):  # its text names an in-memory buffer
      detail = 'not an image format Pillow reads'
    else:
      detail = ' '.join(str(e).split()) or type(e).__name__
    raise errors.DataError(
        f'cannot decode image {name or "<unnamed>"}: {detail}') from e
