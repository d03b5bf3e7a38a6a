r"""Times the input side of pretraining on real images, against the synthetic step.

Four measurements, each printed as one line and together as one JSON object:

1. host: on ONE core (this process, no workers): decode-only and decode +
   random-resized-crop + flip images/s over the stored bytes of the data set's
   records; the same at HAM10000's published size, 600 x 450, from the stored
   images enlarged and re-encoded (JPEG, quality 95), since a development copy may
   hold smaller files; and views/s of the pipeline worker's own function
   (record reads, the pair's choice, two crops, the stack);
2. pipeline: views/s out of the grain pipeline (`pair_dataset`, MICLe or SimCLR
   pairs) with `--workers` processes, no device involved; and the hand-over alone:
   pairs of the same shape made without decoding (a constant fill), batched in the
   same worker processes (`pipeline.batched`), the ceiling of what grain passes to
   this process;
3. augment: the jitted on-device augmentation alone, and the step with and
   without it, so its share of the step;
4. loop: the whole pretrain loop (grain pipeline -> `device_prefetch` -> step) in
   views/s, and as a fraction of the same step fed synthetic device batches.

  python benchmarks/input_pipeline.py --manual_dir ../shared/data/ham10000 \
      --data_dir /tmp/tfds                                    # ResNet-50, 224, 2 x 256
  python benchmarks/input_pipeline.py --manual_dir ../shared/data/ham10000 \
      --data_dir /tmp/tfds --depth 18 --width 0.25 --image_size 64 --batch 32 \
      --workers 2 --steps 10                                  # a small CPU run

The data set is built first when missing (`bigssl_med.build_data.ensure_built`).
The pipeline and loop rates are timed over `--loop_steps` batches after a warm-up of
`2 + 2 x workers + 2` batches (workers start one after another and each builds whole
batches, so the first batches come in waves); each also reports the rate of its
second half, which matches the whole when the pipeline is steady. Each measurement
appends a line to --out as soon as it is made (`complete` false until the last).
"""

import argparse
import functools
import io
import itertools
import json
import os
import platform
import sys
import time

import grain
import jax
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bigssl_med import augment, build_data, parallel  # noqa: E402  pylint: disable=g-import-not-at-top
from bigssl_med.data import host_ops, pipeline, sources  # noqa: E402  pylint: disable=g-import-not-at-top
import pretrain_step  # noqa: E402  pylint: disable=g-import-not-at-top


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


PUBLISHED_SIZE = (600, 450)  # HAM10000's images as published (width, height)


def _crop_rate(images, image_size: int) -> float:
  rng = np.random.default_rng(0)
  t = time.perf_counter()
  for data in images:
    host_ops.random_flip(rng, host_ops.random_resized_crop(rng, data, image_size))
  return len(images) / (time.perf_counter() - t)


def _enlarged(data: bytes, size: tuple[int, int]) -> bytes:
  image, _ = host_ops.decode_pil(data, channels=3)
  buffer = io.BytesIO()
  image.resize(size, Image.Resampling.BICUBIC).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def host_rates(source, groups, spec: pipeline.ViewSpec, count: int) -> dict:
  """Rates on this one core, over `count` records (see the module doc, 1)."""
  records = [source[i % len(source)] for i in range(count)]
  images = [r['image'] for r in records]
  t = time.perf_counter()
  for data in images:
    host_ops.decode_image(data)
  decode = count / (time.perf_counter() - t)
  crop = _crop_rate(images, spec.image_size)
  published = _crop_rate([_enlarged(data, PUBLISHED_SIZE) for data in images], spec.image_size)
  load_pair = pipeline._LoadPair(source, groups, spec, seed=0, name='benchmark')  # pylint: disable=protected-access
  units = len(source) if groups is None else len(groups)
  pairs = max(1, count // 2)
  t = time.perf_counter()
  for position in range(pairs):
    load_pair.map((position % units, position))
  worker = 2 * pairs / (time.perf_counter() - t)
  return {'host_decode_images_per_sec_per_core': decode,
          'host_crop_images_per_sec_per_core': crop,
          'host_first_image_shape': list(host_ops.decode_image(images[0]).shape),
          'host_crop_images_per_sec_per_core_at_600x450': published,
          'host_worker_views_per_sec_per_core': worker}


class _Filled(grain.transforms.Map):
  """Index -> a pair of views of `shape` filled with the index (no decoding)."""

  def __init__(self, shape):
    self._shape = shape

  def map(self, element):
    return {'views': np.full(self._shape, element % 256, np.uint8)}


def warmup_batches(workers: int) -> int:
  """Batches before timing: each worker's first two, and the prefetch's."""
  return 2 + 2 * max(workers, 1) + 2


def pipeline_rate(make_iterator, batches: int, views_per_batch: int, warmup: int
                  ) -> tuple[float, float]:
  """Views/s out of a fresh pipeline iterator after `warmup` batches: all, second half."""
  iterator = make_iterator()
  try:
    for _ in range(warmup):
      next(iterator)
    t = time.perf_counter()
    for i in range(batches):
      if i == batches // 2:
        half = time.perf_counter()
      next(iterator)
    end = time.perf_counter()
    return (batches * views_per_batch / (end - t),
            (batches - batches // 2) * views_per_batch / (end - half))
  finally:
    _close(iterator)


def _close(iterator) -> None:
  """Stops a grain iterator's worker processes now rather than at exit."""
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--dataset', default='ham10000')
  p.add_argument('--data_dir', default='', help='TFDS data dir (default: TFDS default)')
  p.add_argument('--manual_dir', default='', help='raw files, to build the data set if missing')
  p.add_argument('--split', default='train')
  p.add_argument('--simclr', action='store_true', help='SimCLR pairs instead of MICLe cases')
  p.add_argument('--depth', type=int, default=50)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=256, help='global batch of pairs (2x views)')
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                 help='grain worker processes for the pipeline and loop measurements')
  p.add_argument('--host_images', type=int, default=500,
                 help='records for the one-core host measurement')
  p.add_argument('--steps', type=int, default=30,
                 help='timed steps on synthetic batches, and augmentation repeats')
  p.add_argument('--loop_steps', type=int, default=100,
                 help='timed batches of the pipeline and steps of the loop on real data')
  p.add_argument('--out', default='', help='append the JSON result here')
  args = p.parse_args(argv)

  def record(complete=False):
    result['complete'] = complete
    if args.out:
      with open(args.out, 'a') as f:
        f.write(json.dumps(result) + '\n')

  data_dir = build_data.ensure_built(args.dataset, data_dir=args.data_dir,
                                     manual_dir=args.manual_dir or None,
                                     build_if_missing=True, manual_dir_key='--manual_dir')
  source = sources.open_split(args.dataset, args.split, data_dir)
  groups = None if args.simclr else sources.case_index(args.dataset, args.split, data_dir)
  result = {'dataset': f'{args.dataset}/{args.split}', 'records': len(source),
            'units': len(source) if groups is None else len(groups),
            'pairs': 'SimCLR' if args.simclr else 'MICLe', 'workers': args.workers,
            'host': platform.node(), 'cpus': os.cpu_count(), 'jax': jax.__version__}

  # 1. One core.
  spec = pipeline.ViewSpec(args.image_size, 0.08, '')
  result.update(host_rates(source, groups, spec, args.host_images))
  print(f"host, one core: decode {result['host_decode_images_per_sec_per_core']:,.0f} "
        f"images/s, decode+crop+flip to {args.image_size} "
        f"{result['host_crop_images_per_sec_per_core']:,.0f} images/s "
        f"(stored images {result['host_first_image_shape']}), "
        f"{result['host_crop_images_per_sec_per_core_at_600x450']:,.0f} images/s at "
        f"600x450; the worker's function {result['host_worker_views_per_sec_per_core']:,.0f} "
        'views/s')
  record()

  # 2. The grain pipeline alone.
  def make_iterator():
    return iter(pipeline.pair_dataset(
        source, groups, spec, global_batch=args.batch, host_index=jax.process_index(),
        host_count=jax.process_count(), seed=0, num_workers=args.workers,
        name=f'{args.dataset}/{args.split}'))
  local_views = 2 * args.batch // jax.process_count()
  warmup = warmup_batches(args.workers)
  result['warmup_batches'] = warmup

  def measure(key, what, make):
    result[key], result[f'{key}_second_half'] = pipeline_rate(
        make, args.loop_steps, local_views, warmup)
    print(f'{what}, {args.workers} workers: {result[key]:,.0f} views/s (second half '
          f'{result[f"{key}_second_half"]:,.0f})')
    record()

  def make_handover():
    filled = grain.MapDataset.range(2**62).map(
        _Filled((2, args.image_size, args.image_size, 3)))
    return iter(pipeline.batched(filled, local_views // 2, args.workers))

  measure('pipeline_views_per_sec', 'pipeline', make_iterator)
  measure('handover_views_per_sec', 'hand-over alone', make_handover)

  # 3. Device augmentation's share of the step.
  kwargs = dict(depth=args.depth, width=args.width, image_size=args.image_size,
                batch=args.batch, dtype=args.dtype)
  plain = pretrain_step.make_step(augment_on_device=False, **kwargs)
  batches = pretrain_step.synthetic_batches(plain, 2)
  key = jax.random.key(1)

  def timed_steps(setup, feed, steps, warmup=2):
    """Seconds per step over `steps` after `warmup` steps: all, and the second half."""
    state = setup.state
    for _ in range(max(warmup, 2)):  # compile, then warm up
      state, metrics = setup.train_step(state, next(feed), key)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for i in range(steps):
      if i == steps // 2:
        jax.block_until_ready(metrics)
        half = time.perf_counter()
      state, metrics = setup.train_step(state, next(feed), key)
    jax.block_until_ready((state, metrics))
    end = time.perf_counter()
    setup.state = state
    return (end - t) / steps, (end - half) / (steps - steps // 2)

  no_augment_s, _ = timed_steps(plain, itertools.cycle(batches), args.steps)
  del plain
  setup = pretrain_step.make_step(augment_on_device=True, **kwargs)
  synthetic_s, _ = timed_steps(setup, itertools.cycle(batches), args.steps)
  views = jax.device_put(batches[0]['views'].reshape(
      (2 * args.batch, args.image_size, args.image_size, 3)), setup.batch_sharding)
  augment_jit = jax.jit(augment.simclr_augment)
  jax.block_until_ready(augment_jit(key, views))
  augment_s = _median_time(lambda: jax.block_until_ready(augment_jit(key, views)), args.steps)
  result.update({
      'model': f'ResNet-{args.depth} x{args.width:g}', 'image_size': args.image_size,
      'pairs_per_step': args.batch, 'dtype': args.dtype,
      'device': f'{setup.num_devices} x {getattr(jax.devices()[0], "device_kind", "?")}',
      'step_ms_synthetic': 1e3 * synthetic_s, 'step_ms_synthetic_no_augment': 1e3 * no_augment_s,
      'augment_ms_alone': 1e3 * augment_s,
      'augment_share_of_step': augment_s / synthetic_s,
      'augment_share_by_difference': (synthetic_s - no_augment_s) / synthetic_s,
  })
  print(f"augment on {result['device']}: {1e3 * augment_s:.1f} ms alone, step "
        f"{1e3 * synthetic_s:.1f} ms with / {1e3 * no_augment_s:.1f} ms without "
        f"({100 * result['augment_share_of_step']:.1f}% of the step alone, "
        f"{100 * result['augment_share_by_difference']:.1f}% by difference)")
  record()

  # 4. The whole loop on real data.
  to_device = functools.partial(parallel.to_global, mesh=setup.mesh)
  iterator = make_iterator()
  prefetch = pipeline.device_prefetch(iterator, to_device)
  try:
    loop_s, loop_half_s = timed_steps(setup, (batch for batch, _ in prefetch),
                                      args.loop_steps, warmup=warmup)
  finally:
    prefetch.close()
    _close(iterator)
  result.update({
      'step_ms_real_data': 1e3 * loop_s,
      'views_per_sec_synthetic': 2 * args.batch / synthetic_s,
      'views_per_sec_real_data': 2 * args.batch / loop_s,
      'views_per_sec_real_data_second_half': 2 * args.batch / loop_half_s,
      'real_over_synthetic': synthetic_s / loop_s,
  })
  print(f"loop: {result['views_per_sec_real_data']:,.0f} views/s on real data (second half "
        f"{result['views_per_sec_real_data_second_half']:,.0f}) vs "
        f"{result['views_per_sec_synthetic']:,.0f} synthetic "
        f"({100 * result['real_over_synthetic']:.1f}%)")
  record(complete=True)
  print(json.dumps(result))
  pipeline.finish_shared_memory_releases()
  return result


if __name__ == '__main__':
  main()
