"""grain input of segmentation: each image with its mask, cropped and flipped together.

Batches are `{'image': uint8 [b, S, S, 3], 'mask': uint8 [b, S, S, 1], 'valid': float32
[b]}` for this host (b = global batch / hosts); mask pixels are 1 (the stored value is
at least 128) or 0. A stored mask whose values are all below 128 but not all 0 (a 0/1
mask) is an error naming the record, not an empty lesion.

- Training (`train_dataset`): endless, epochs are permutations of the records from
  `(seed, epoch)`, split over hosts and positioned exactly as
  `bigssl_med.data.pipeline.image_dataset` does. Each example is one
  `host_ops.sample_crop_box` box (SimCLR's random crop, area in `[crop_area_min, 1]`)
  applied to the image (bicubic, antialiased) and to its mask (nearest neighbour,
  so it stays binary), and one left-right flip of both with probability 0.5, all
  drawn from `(seed, global position)`. `valid` is 1.
- Evaluation (`eval_dataset`): one pass in record order; the whole image resized to
  S x S (bicubic) and its mask likewise (nearest), so every lesion pixel is
  scored. The last global batch is padded with `valid == 0` rows (zeros), so
  every record counts exactly once.
"""

import dataclasses

import grain
import numpy as np
from PIL import Image

from bigssl_med.data import host_ops
from bigssl_med.data import pipeline
from bigssl_med.errors import DataError

FOREGROUND = 128  # stored mask values from this one up are lesion


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """How the host turns an encoded image and its mask into fixed-size uint8 arrays."""
  image_size: int = 224
  crop_area_min: float = 0.08
  mask_key: str = 'mask'


def check_mask_feature(info, dataset: str, mask_key: str) -> None:
  """Fails with a one-line DataError unless `info` has an image feature `mask_key`.

  Args:
    info: the data set's `tfds.core.DatasetInfo`.
    dataset: the data set's name, for the message.
    mask_key: the mask feature (`config.data.mask_key`).
  """
  if mask_key not in info.features:
    raise DataError(f'data set {dataset!r} has no mask feature {mask_key!r} '
                    f'(config.data.mask_key); features: {sorted(info.features)}')
  shape = tuple(getattr(info.features[mask_key], 'shape', ()) or ())
  if len(shape) != 3:
    raise DataError(f'feature {mask_key!r} of data set {dataset!r} (config.data.mask_key) is '
                    f'not an image mask (shape {shape})')


def decode_pair(example: dict, mask_key: str, where: str) -> tuple[Image.Image, Image.Image]:
  """The record's RGB image and its mask (mode 'L'), both decoded, of one size."""
  if mask_key not in example:
    raise DataError(f'{where}: no feature {mask_key!r} (config.data.mask_key); '
                    f'features are {sorted(example)}')
  image, _ = host_ops.decode_pil(example['image'], channels=3, name=where)
  mask, _ = host_ops.decode_pil(example[mask_key], channels=1, name=f'{where} {mask_key}')
  if image.size != mask.size:
    raise DataError(f'{where}: mask {mask_key!r} is {mask.size[0]}x{mask.size[1]} but the image '
                    f'is {image.size[0]}x{image.size[1]}')
  highest = mask.getextrema()[1]
  if 0 < highest < FOREGROUND:
    raise DataError(f'{where}: mask {mask_key!r} has values up to {highest} only; masks are '
                    f'0 (background) and 255 (lesion), foreground from {FOREGROUND} (a 0/1 '
                    'mask must be scaled by 255 when the data set is built)')
  return image, mask


def _resize_pair(image: Image.Image, mask: Image.Image, size: int,
                 box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Crops `box` (left, top, right, bottom) of both, to size x size; uint8 arrays."""
  out_image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
  out_mask = mask.resize((size, size), Image.Resampling.NEAREST, box=box)
  return (np.asarray(out_image, np.uint8),
          (np.asarray(out_mask, np.uint8) >= FOREGROUND).astype(np.uint8)[:, :, None])


def random_crop_pair(rng: np.random.Generator, image: Image.Image, mask: Image.Image,
                     size: int, crop_area_min: float) -> tuple[np.ndarray, np.ndarray]:
  """One random resized crop box and one random flip, the same for image and mask.

  Returns:
    uint8 `[size, size, 3]` image and uint8 `[size, size, 1]` mask in {0, 1}.
  """
  width, height = image.size
  y, x, h, w = host_ops.sample_crop_box(rng, height, width, area_range=(crop_area_min, 1.0))
  out_image, out_mask = _resize_pair(image, mask, size, (x, y, x + w, y + h))
  if rng.random() < 0.5:
    out_image, out_mask = out_image[:, ::-1], out_mask[:, ::-1]
  return np.ascontiguousarray(out_image), np.ascontiguousarray(out_mask)


def resize_pair(image: Image.Image, mask: Image.Image, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The whole image and mask resized to size x size (evaluation)."""
  return _resize_pair(image, mask, size, (0, 0) + image.size)


class _LoadTrainPair(grain.transforms.Map):
  """`(record, position)` -> `{'image', 'mask', 'valid'}`: a joint random crop, flipped."""

  def __init__(self, source, spec: MaskSpec, seed: int, name: str):
    self._source = source
    self._spec = spec
    self._seed = seed
    self._name = name

  def map(self, element):
    record, position = element
    rng = np.random.default_rng([self._seed, 3, position])
    example = self._source[record]
    image_id = pipeline.as_text(example.get('image_id', ''))
    where = f'{self._name} record {record} ({image_id})'
    image, mask = decode_pair(example, self._spec.mask_key, where)
    image, mask = random_crop_pair(rng, image, mask, self._spec.image_size,
                                   self._spec.crop_area_min)
    return {'image': image, 'mask': mask, 'valid': np.float32(1)}


class _LoadEvalPair(grain.transforms.Map):
  """`record` (-1: padding) -> `{'image', 'mask', 'valid'}`, the whole image resized."""

  def __init__(self, source, spec: MaskSpec, name: str):
    self._source = source
    self._spec = spec
    self._name = name

  def map(self, record):
    size = self._spec.image_size
    if record < 0:
      return {'image': np.zeros((size, size, 3), np.uint8),
              'mask': np.zeros((size, size, 1), np.uint8), 'valid': np.float32(0)}
    example = self._source[record]
    image_id = pipeline.as_text(example.get('image_id', ''))
    where = f'{self._name} record {record} ({image_id})'
    image, mask = resize_pair(*decode_pair(example, self._spec.mask_key, where), size)
    return {'image': image, 'mask': mask, 'valid': np.float32(1)}


def train_dataset(source, spec: MaskSpec, *, global_batch: int, host_index: int,
                  host_count: int, seed: int, num_workers: int,
                  name: str = 'data', start_batch: int = 0) -> grain.IterDataset:
  """Endless training batches for this host (see the module docstring).

  Args:
    source: random-access records with encoded `image` and `spec.mask_key` bytes.
    spec: output size, crop area and mask feature.
    global_batch, host_index, host_count: the global batch and this host's share.
    seed: the stream's seed.
    num_workers: grain worker processes decoding in parallel (0: this process).
    name: data set and split, for error messages.
    start_batch: begin with this batch of the stream (`pipeline.resume_iterator`).
  """
  positions = pipeline.TrainPositions(len(source), global_batch=global_batch,
                                      host_index=host_index, host_count=host_count, seed=seed,
                                      start_batch=start_batch)
  ds = positions.map(_LoadTrainPair(source, spec, seed, name))
  return pipeline.batched(ds, global_batch // host_count, num_workers)


def eval_dataset(source, spec: MaskSpec, *, global_batch: int, host_index: int,
                 host_count: int, num_workers: int = 0, name: str = 'data') -> grain.IterDataset:
  """One pass over `source` in record order for this host, padded with `valid == 0` rows."""
  ds = pipeline.EvalPositions(len(source), global_batch=global_batch, host_index=host_index,
                              host_count=host_count)
  ds = ds.map(_LoadEvalPair(source, spec, name))
  return pipeline.batched(ds, global_batch // host_count, num_workers)
