"""grain input pipelines: positive pairs for pretraining, single images for evaluation.

Pairs (SimCLR and MICLe). A *unit* is what one row of the global batch is drawn
from: an image (SimCLR) or a case, i.e. a patient or lesion (MICLe). Each epoch is a
permutation of the units from `(seed, epoch)`; the global batch at step t holds the
units at positions `[t*B, (t+1)*B)` of that epoch's permutation, and host h reads its
own slice `[h*b, (h+1)*b)` of it (b = B / hosts), so no unit appears twice in a global
batch (an epoch's remainder is dropped, never carried into the next batch; a
duration in epochs still counts N/B steps an epoch, `optim.run_length`). For a
case with two or more images the two views come from two different images; a case
with one image gives two crops of that image. Everything random about an example
(which images, crop boxes, flips) comes from `(seed, global position)`, so the
stream is deterministic for a seed whatever the number of worker processes, and its
position is a small grain state saved with every checkpoint.

The host only decodes, crops to a fixed size and flips; colour jitter, grayscale and
blur run on the accelerator inside the jitted step (`bigssl_med.augment`).
"""

import atexit
import dataclasses
import json
import os
import queue
import signal
import sys
import threading
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from absl import flags
from absl import logging

from bigssl_med.data import host_ops
from bigssl_med.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """How the host turns an encoded image into a fixed-size uint8 view."""
  image_size: int = 224
  crop_area_min: float = 0.08
  label_key: str = ''
  label_shape: tuple[int, ...] = ()  # () : an int class; (K,) : a float vector (multi-label)
  eval_resize: str = 'square'  # evaluation views: one of EVAL_RESIZES (`eval_view`)


def as_text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def _label(example: dict, key: str, where: str) -> int:
  if key not in example:
    raise DataError(f'{where}: no feature {key!r} (config.data.label_key); '
                    f'features are {sorted(example)}')
  return int(example[key])


def _label_value(example: dict, spec: ViewSpec, where: str) -> np.ndarray:
  """The example's label as `spec` says: int32 scalar, or float32 `[K]` vector."""
  if not spec.label_shape:
    return np.int32(_label(example, spec.label_key, where))
  if spec.label_key not in example:
    _label(example, spec.label_key, where)  # raises, naming the feature
  value = np.asarray(example[spec.label_key], np.float32)
  if value.shape != tuple(spec.label_shape):
    raise DataError(f'{where}: feature {spec.label_key!r} has shape {value.shape}, expected '
                    f'{tuple(spec.label_shape)}')
  return value


def _padding_label(spec: ViewSpec) -> np.ndarray:
  return np.zeros(spec.label_shape, np.float32) if spec.label_shape else np.int32(0)


def read_options(num_workers: int) -> grain.ReadOptions:
  """How many batches are made at once, and how many at most are made ahead, in each
  worker process (or, with no workers, in threads of this process).

  grain's default (16 threads, 500 ahead) counts batches here, since the batching comes
  before the read: 500 batches a worker, which at 2 x 256 views of 224 x 224 is 38 GB
  of shared memory per worker, filled while the step runs slower than the workers. A
  worker makes one batch at a time and keeps at most two ahead (the worker processes
  are the parallelism: on 2 cores with 2 workers this read 1,074-1,098 views/s against
  603-665 with 16 threads, and held 19-34 MB of shared memory against 250-347 MB and
  growing); with no workers, up to 8 threads make batches behind the training loop.
  """
  if num_workers > 0:
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  threads = max(1, min(8, os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)


def batched(ds: grain.MapDataset, batch_size: int, num_workers: int) -> grain.IterDataset:
  """`ds` in batches of `batch_size` (a last, smaller one dropped), made in `num_workers`
  grain worker processes (in this process when 0), in order either way.

  A worker stacks each batch straight into the shared memory grain hands it over in;
  a batch stacked elsewhere is copied there again by grain, which took about 80% of a
  worker's time on 224 x 224 pairs (`benchmarks/input_pipeline.py`).
  """
  ds = ds.batch(batch_size, drop_remainder=True)
  read = read_options(num_workers)
  if num_workers <= 0:
    return ds.to_iter_dataset(read)
  if hasattr(ds, 'enable_shared_memory_output'):
    ds.enable_shared_memory_output()
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a plain script has none
    flags.FLAGS.mark_as_parsed()
  unsent = UnsentBatches()
  ds = ds.map(unsent.made).to_iter_dataset(read).map(unsent.handed_over)
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=ignore_sigint)


def _shared_memory_blocks(tree) -> Iterator[shared_memory.SharedMemory]:
  """The shared memory blocks under the arrays of a batch (a dict, list or tuple of them)."""
  if isinstance(tree, dict):
    tree = tree.values()
  elif not isinstance(tree, (list, tuple)):
    block = getattr(tree, 'shm', None)
    if isinstance(block, shared_memory.SharedMemory):
      yield block
    return
  for leaf in tree:
    yield from _shared_memory_blocks(leaf)


class UnsentBatches:
  """The shared memory of the batches a grain worker process made but never handed over.

  A worker makes up to `read_options`'s two batches ahead in shared memory; grain frees a
  batch once the main process has read it, or when it is in the queue between the two
  processes as the stream stops, but not the ones still ahead in the worker, which stayed
  in /dev/shm until the main process exited (the resource tracker then removed them, with
  a "leaked shared_memory objects" warning): two batches of each worker at every stream
  closed, a training run's or an unfinished evaluation's. `made` (after the batching,
  in the worker's read-ahead thread) notes each batch's blocks, `handed_over` (after the
  read-ahead, as the worker gives the batch to grain) forgets them, and whatever is
  left when the worker process exits is unlinked then.
  """

  def __init__(self):
    self._names: set[str] = set()
    self._pid = 0

  def made(self, batch):
    if self._pid != os.getpid():  # the first batch of this (worker) process
      self._pid, self._names = os.getpid(), set()
      atexit.register(self.unlink)
    self._names.update(block.name for block in _shared_memory_blocks(batch))
    return batch

  def handed_over(self, batch):
    self._names.difference_update(block.name for block in _shared_memory_blocks(batch))
    return batch

  def unlink(self) -> int:
    """Unlinks the blocks of the batches made and not handed over; returns their number."""
    count = 0
    while self._names:
      name = self._names.pop()
      try:
        block = shared_memory.SharedMemory(name)
      except FileNotFoundError:
        continue
      block.close()
      block.unlink()
      count += 1
    return count


def finish_shared_memory_releases() -> None:
  """Waits until the shared memory of the batches this process has dropped is unlinked.

  grain unlinks a batch's blocks in a thread pool of its own once the batch is deleted.
  A process that exits just after a stream stops (a Ctrl-C, a SIGTERM, an error) would
  drop the unlinks still queued, and the resource tracker would report those blocks as
  leaked at exit. grain has no public call for this: its pool (a private class
  attribute) is taken out of use, so later deletions unlink at once, closed and joined.
  """
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:  # another grain layout: nothing to wait for that is known here
    return
  arrays = shared_memory_array.SharedMemoryArray
  thread_pool = getattr(arrays, '_del_thread_pool', None)
  if thread_pool is None:
    return
  arrays._del_thread_pool = None  # pylint: disable=protected-access
  thread_pool.close()
  thread_pool.join()


def ignore_sigint(worker_index: int, worker_count: int) -> None:
  """In each grain worker process: a Ctrl-C, which reaches every process of the
  terminal's process group, is the main process's to handle (it shuts the workers
  down), not a traceback from each worker."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


_CACHED_EPOCHS = 4


class TrainPositions(grain.MapDataset):
  """Endless stream of this host's `(unit, global position)`; see the module docstring."""

  def __init__(self, num_units: int, *, global_batch: int, host_index: int, host_count: int,
               seed: int, start_batch: int = 0):
    """`start_batch`: the stream starts at that batch (a resumed run's step)."""
    super().__init__([])
    if num_units < global_batch:
      raise ConfigError(f'config.batch_size={global_batch} is larger than the {num_units} '
                        'units (images, or cases with MICLe) of the training split')
    self._num_units = num_units
    self._global_batch = global_batch
    self._local_batch = global_batch // host_count
    self._host_offset = host_index * self._local_batch
    self._steps_per_epoch = num_units // global_batch
    self._seed = seed
    self._start = start_batch * self._local_batch
    # epoch -> permutation, the newest few kept. grain's prefetch threads read
    # several epochs at once near a boundary, so the cache is shared under a lock.
    self._permutations = {}
    self._lock = threading.Lock()

  def __getstate__(self):  # worker processes get their own (empty) cache and lock
    state = self.__dict__.copy()
    state['_permutations'], state['_lock'] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      permutation = self._permutations.get(epoch)
    if permutation is None:
      permutation = np.random.default_rng([self._seed, 0, epoch]).permutation(self._num_units)
      with self._lock:
        self._permutations[epoch] = permutation
        for old in sorted(self._permutations)[:-_CACHED_EPOCHS]:
          del self._permutations[old]
    return permutation

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, j = divmod(index + self._start, self._local_batch)
    epoch, step_in_epoch = divmod(step, self._steps_per_epoch)
    position = step_in_epoch * self._global_batch + self._host_offset + j
    global_position = step * self._global_batch + self._host_offset + j
    return int(self._permutation(epoch)[position]), int(global_position)

  def __str__(self) -> str:
    return f'PairPositions(units={self._num_units}, batch={self._global_batch})'


class CaseGroups(Sequence):
  """The record indices of each unit (`groups[u]`: a sorted int64 array), held as one
  flat array and its offsets.

  Each grain worker receives its own pickled copy of the groups: a list of one small
  array per case pickles object by object (51,300 cases of 1 to 7 images: 3.2 MB in
  180 ms), the flat form as two arrays (2.1 MB in 2 ms).
  """

  def __init__(self, groups: Sequence[np.ndarray]):
    sizes = np.fromiter((len(g) for g in groups), np.int64, count=len(groups))
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._flat = (np.concatenate([np.asarray(g, np.int64) for g in groups]) if len(groups)
                  else np.zeros(0, np.int64))

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, unit):
    if not -len(self) <= unit < len(self):
      raise IndexError(f'unit {unit} of {len(self)}')
    unit %= len(self)
    return self._flat[self._offsets[unit]:self._offsets[unit + 1]]


def _compact(groups: Sequence[np.ndarray] | None) -> CaseGroups | None:
  return groups if groups is None or isinstance(groups, CaseGroups) else CaseGroups(groups)


class _LoadPair(grain.transforms.Map):
  """`(unit, position)` -> `{'views': uint8 [2, S, S, C], 'label'?: int32 [2]}`: each
  view's own image's label (MICLe pairs two images, which may differ in label, or lack
  one: -1)."""

  def __init__(self, source, groups: Sequence[np.ndarray] | None, spec: ViewSpec, seed: int,
               name: str):
    self._source = source
    self._groups = _compact(groups)
    self._spec = spec
    self._seed = seed
    self._name = name

  def map(self, element):
    unit, position = element
    rng = np.random.default_rng([self._seed, 1, position])
    records = self._groups[unit] if self._groups is not None else (unit,)
    if len(records) >= 2:
      first, second = (int(r) for r in rng.choice(records, size=2, replace=False))
    else:
      first = second = int(records[0])
    ex1 = self._source[first]
    ex2 = ex1 if second == first else self._source[second]
    views = [self._view(rng, ex, record) for ex, record in ((ex1, first), (ex2, second))]
    out = {'views': np.stack(views)}
    if self._spec.label_key:
      out['label'] = np.asarray(
          [_label(ex, self._spec.label_key, f'{self._name} record {record}')
           for ex, record in ((ex1, first), (ex2, second))], np.int32)
    return out

  def _view(self, rng, example, record):
    name = f'{self._name} record {record} ({as_text(example.get("image_id", ""))})'
    view = host_ops.random_resized_crop(
        rng, example['image'], self._spec.image_size,
        area_range=(self._spec.crop_area_min, 1.0), name=name)
    return host_ops.random_flip(rng, view)


def _num_units(source, groups) -> int:
  return len(source) if groups is None else len(groups)


def pair_dataset(source, groups: Sequence[np.ndarray] | None, spec: ViewSpec, *,
                 global_batch: int,
                 host_index: int, host_count: int, seed: int, num_workers: int,
                 name: str = 'data', start_batch: int = 0) -> grain.IterDataset:
  """Endless batches `{'views': uint8 [b, 2, S, S, C], 'label'?: int32 [b, 2]}` for this host.

  Args:
    source: random-access records with encoded `image` bytes (a TFDS data source).
    groups: record indices per unit, the records of each case (MICLe); None makes
      every record its own unit (SimCLR).
    spec: crop size, crop area and label feature.
    global_batch, host_index, host_count: the global batch and this host's share.
    seed: the stream's seed.
    num_workers: grain worker processes decoding in parallel (0: this process).
    name: data set and split, for error messages.
    start_batch: begin with this batch of the stream (see `resume_iterator`).
  """
  positions = TrainPositions(_num_units(source, groups), global_batch=global_batch,
                             host_index=host_index, host_count=host_count, seed=seed,
                             start_batch=start_batch)
  ds = positions.map(_LoadPair(source, groups, spec, seed, name))
  return batched(ds, global_batch // host_count, num_workers)


class _LoadView(grain.transforms.Map):
  """`(record, position)` -> `{'image': uint8 [S, S, C], 'label'?}`: a random crop, flipped."""

  def __init__(self, source, spec: ViewSpec, seed: int, name: str):
    self._source = source
    self._spec = spec
    self._seed = seed
    self._name = name

  def map(self, element):
    record, position = element
    rng = np.random.default_rng([self._seed, 2, position])
    example = self._source[record]
    where = f'{self._name} record {record} ({as_text(example.get("image_id", ""))})'
    view = host_ops.random_resized_crop(
        rng, example['image'], self._spec.image_size,
        area_range=(self._spec.crop_area_min, 1.0), name=where)
    out = {'image': host_ops.random_flip(rng, view)}
    if self._spec.label_key:
      out['label'] = _label_value(example, self._spec, where)
    return out


def image_dataset(source, spec: ViewSpec, *, global_batch: int, host_index: int,
                  host_count: int, seed: int, num_workers: int,
                  name: str = 'data', start_batch: int = 0) -> grain.IterDataset:
  """Endless batches `{'image': uint8 [b, S, S, C], 'label'?}` for supervised training.

  Epochs are permutations of the records from `(seed, epoch)`, split over hosts as
  the pairs are (see the module docstring); each image is a random resized crop
  (area in `[spec.crop_area_min, 1]`) and a random flip, from `(seed, position)`.
  `start_batch`: as `pair_dataset`.
  """
  positions = TrainPositions(len(source), global_batch=global_batch, host_index=host_index,
                             host_count=host_count, seed=seed, start_batch=start_batch)
  ds = positions.map(_LoadView(source, spec, seed, name))
  return batched(ds, global_batch // host_count, num_workers)


class EvalPositions(grain.MapDataset):
  """One pass over `num_records` in order, padded to whole global batches, this host's slice."""

  def __init__(self, num_records: int, *, global_batch: int, host_index: int, host_count: int):
    super().__init__([])
    self._n = num_records
    self._global_batch = global_batch
    self._local_batch = global_batch // host_count
    self._host_offset = host_index * self._local_batch
    self._steps = -(-num_records // global_batch)

  def __len__(self) -> int:
    return self._steps * self._local_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, j = divmod(index, self._local_batch)
    position = step * self._global_batch + self._host_offset + j
    return position if position < self._n else -1


CENTRE_CROP_PROPORTION = 0.875


def eval_crop(image_size: int, ten_crop: bool = False) -> tuple[int, float]:
  """The host's evaluation view: `(side, proportion of the shorter side kept)`.

  A single view is SimCLR's centre crop (`image_size`, 0.875). Ten-crop
  evaluation takes the whole central square at `image_size / 0.875` (256 for
  224) and leaves the ten `image_size` crops to the device
  (`bigssl_med.supervised.ten_crops`).
  """
  if ten_crop:
    return int(round(image_size / CENTRE_CROP_PROPORTION)), 1.0
  return image_size, CENTRE_CROP_PROPORTION


# How an evaluation view is made of the whole image (`config.data.eval_resize`).
EVAL_RESIZES = ('square', 'squash')


def check_eval_resize(resize: str) -> str:
  """`resize` when it is one of `EVAL_RESIZES`; a one-line ConfigError otherwise."""
  if resize not in EVAL_RESIZES:
    raise ConfigError(f'config.data.eval_resize={resize!r} is not one of '
                      f'{", ".join(EVAL_RESIZES)}')
  return resize


def eval_view(data, side: int, proportion: float, resize: str = 'square', *,
              channels: int = 3, name: str = '') -> np.ndarray:
  """The uint8 `[side, side, channels]` evaluation view of an encoded image.

  `(side, proportion)` come from `eval_crop`. `resize='square'`: SimCLR's centre
  crop, the central square of `proportion` of the shorter side resized (bicubic)
  to `side` (`host_ops.center_crop`). `resize='squash'`: the transfer-learning
  benchmark's, the whole image resized (bilinear) to a square of
  `round(side / proportion)`, aspect ratio not kept, and its central `side`
  (`host_ops.squash_crop`): the squashed 256 x 256 itself for ten-crop at 224, its
  central 224 for a single view. Evaluation in training and `bigssl_med.predict`
  both make their views here.
  """
  if check_eval_resize(resize) == 'squash':
    return host_ops.squash_crop(data, side, proportion, channels=channels, name=name)
  return host_ops.center_crop(data, side, proportion, channels=channels, name=name)


class _LoadCentreCrop(grain.transforms.Map):

  def __init__(self, source, spec: ViewSpec, channels: int, name: str, ten_crop: bool = False):
    self._source = source
    self._spec = spec
    self._channels = channels
    self._name = name
    self._size, self._proportion = eval_crop(spec.image_size, ten_crop)
    self._resize = check_eval_resize(spec.eval_resize)

  def map(self, record):
    size = self._size
    if record < 0:  # padding
      out = {'image': np.zeros((size, size, self._channels), np.uint8), 'mask': np.float32(0),
             'record': np.int32(-1)}
      if self._spec.label_key:
        out['label'] = _padding_label(self._spec)
      return out
    example = self._source[record]
    image = eval_view(example['image'], size, self._proportion, self._resize,
                      channels=self._channels, name=f'{self._name} record {record}')
    out = {'image': image, 'mask': np.float32(1), 'record': np.int32(record)}
    if self._spec.label_key:
      out['label'] = _label_value(example, self._spec, f'{self._name} record {record}')
    return out


def eval_image_dataset(source, spec: ViewSpec, *, global_batch: int, host_index: int,
                       host_count: int, channels: int = 3, num_workers: int = 0,
                       name: str = 'data', ten_crop: bool = False) -> grain.IterDataset:
  """One pass of evaluation views: `{'image', 'mask', 'record', 'label'?}` batches.

  The last global batch is padded with `mask == 0` rows so every record counts once;
  `record` is each row's index in `source` (-1 for padding), so that whatever the
  batch's rows are gathered into can be matched with the records' other features.
  Views are `eval_view`'s as `spec.eval_resize` says; with `ten_crop`, the larger
  views of `eval_crop(..., ten_crop=True)`.
  """
  ds = EvalPositions(len(source), global_batch=global_batch, host_index=host_index,
                   host_count=host_count)
  ds = ds.map(_LoadCentreCrop(source, spec, channels, name, ten_crop))
  return batched(ds, global_batch // host_count, num_workers)


def eval_pair_dataset(source, groups: Sequence[np.ndarray] | None, spec: ViewSpec, *,
                      global_batch: int, host_index: int, host_count: int, seed: int,
                      num_workers: int = 0, name: str = 'data',
                      max_batches: int = 0) -> grain.IterDataset | None:
  """One epoch of pairs in a fixed order (deterministic crops) for contrastive metrics.

  Only whole global batches are used, so the metrics are comparable with training;
  None when the split has fewer units than one global batch. `max_batches` (> 0): the
  first that many batches only: the caller reads the stream to its end, and no worker
  makes batches past the last one read.
  """
  num_units = _num_units(source, groups)
  if num_units < global_batch:
    return None
  steps = num_units // global_batch
  if max_batches > 0:
    steps = min(steps, max_batches)
  positions = TrainPositions(num_units, global_batch=global_batch, host_index=host_index,
                             host_count=host_count, seed=seed)
  ds = positions.slice(slice(0, steps * (global_batch // host_count)))
  ds = ds.map(_LoadPair(source, groups, spec, seed, name))
  return batched(ds, global_batch // host_count, num_workers)


def saved_workers(state: dict[str, Any]) -> int:
  """The number of grain worker processes of the iterator that saved `state`."""
  return len(state.get('iterators_in_use_indices', ()))


def resume_iterator(make_dataset: Callable[[int], grain.IterDataset], data_state: bytes | None,
                    *, step: int, num_workers: int) -> Iterator:
  """The training stream of a run at `step`, from its checkpoint's iterator state.

  `make_dataset(start_batch)` builds the stream from a batch. grain's state holds one
  position per worker process, so it only restores into as many workers as saved it;
  with another `config.data.num_workers` the stream is built from batch `step`
  instead, which gives the same batches: every example is a function of the seed and
  its position in the stream (see the module docstring), not of the workers.
  """
  if data_state is None:
    return iter(make_dataset(start_batch=0))
  state = json.loads(data_state)
  saved, now = saved_workers(state), max(0, num_workers)
  if saved == now:
    iterator = iter(make_dataset(start_batch=0))
    iterator.set_state(state)
    return iterator
  logging.warning('The input state at step %d was saved with %d worker process(es), this run '
                  'has %d: the stream restarts at batch %d, the same batches.', step, saved,
                  now, step)
  return iter(make_dataset(start_batch=step))


_CLOSE_TIMEOUT_S = 30.0


def device_prefetch(iterator: Iterator[dict[str, np.ndarray]], to_device, size: int = 2
                    ) -> Iterator[tuple[Any, bytes | None]]:
  """Moves batches to the devices `size` steps ahead in a background thread.

  Yields `(device_batch, state)`, where `state` is the grain iterator state right after
  that batch was drawn (JSON bytes; None if the iterator has no state): the position
  to save once the step has consumed the batch.

  Takes `iterator` over: when the generator ends, is closed (`contextlib.closing`) or
  fails, the thread stops and `iterator.close()` shuts grain's worker processes down
  then, not at exit.
  """
  done = object()
  q: queue.Queue = queue.Queue(maxsize=max(1, size))
  stop = threading.Event()

  def producer():
    try:
      for batch in iterator:
        state = None
        if hasattr(iterator, 'get_state'):
          state = json.dumps(iterator.get_state()).encode()
        item = (to_device(batch), state)
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(done)
    except BaseException as e:  # pylint: disable=broad-except
      q.put(e)

  thread = threading.Thread(target=producer, daemon=True, name='device_prefetch')
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=_CLOSE_TIMEOUT_S)  # it stops once the batch in hand is placed
    if hasattr(iterator, 'close') and not thread.is_alive():
      iterator.close()
