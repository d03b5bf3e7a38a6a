"""The grain input pipeline: MICLe invariants, determinism, host shards, resume."""

import contextlib
import io
import json
import os
import pickle
import sys
import threading
import time
from multiprocessing import shared_memory

import grain
import numpy as np
import pytest
from PIL import Image

from bigssl_med.data import host_ops
from bigssl_med.data import pipeline
from bigssl_med.errors import ConfigError, DataError


def _png(value: int, size=(12, 10)) -> bytes:
  """A constant-colour PNG whose R, G channels encode `value` (lossless)."""
  pixels = np.zeros((size[1], size[0], 3), np.uint8)
  pixels[..., 0], pixels[..., 1] = value // 256, value % 256
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='PNG')
  return buf.getvalue()


def _record_of(view: np.ndarray) -> int:
  """Decodes the record index from a (constant) view."""
  r, g = int(view[..., 0].mean().round()), int(view[..., 1].mean().round())
  return r * 256 + g


def _source_and_groups(case_sizes):
  """Records numbered 0..N-1 grouped into cases of the given sizes; label = case % 3."""
  source, groups, r = [], [], 0
  for case, n in enumerate(case_sizes):
    groups.append(np.arange(r, r + n))
    for _ in range(n):
      source.append({'image': _png(r), 'label': case % 3, 'image_id': f'img{r}'.encode()})
      r += 1
  return source, groups


SPEC = pipeline.ViewSpec(image_size=8, crop_area_min=0.08, label_key='label')
CASE_SIZES = [1, 2, 3, 1, 4, 2, 1, 2, 5, 1, 2, 3, 1, 1, 2, 2, 3, 1, 2, 1]  # 20 cases


def _batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_micle_batches_hold_each_case_once_and_pair_distinct_images():
  source, groups = _source_and_groups(CASE_SIZES)
  source = [dict(example, label=r % 3) for r, example in enumerate(source)]  # per image
  case_of = {int(r): c for c, g in enumerate(groups) for r in g}
  ds = pipeline.pair_dataset(source, groups, SPEC, global_batch=8, host_index=0, host_count=1,
                             seed=0, num_workers=0)
  seen_cases = set()
  for batch in _batches(ds, 10):  # 10 steps > 2 epochs of 20 // 8 = 2 steps
    assert batch['views'].shape == (8, 2, 8, 8, 3) and batch['views'].dtype == np.uint8
    records = [(_record_of(v[0]), _record_of(v[1])) for v in batch['views']]
    cases = [case_of[a] for a, _ in records]
    assert len(set(cases)) == 8, 'a case appears twice in one global batch'
    for (a, b), case in zip(records, cases):
      assert case_of[b] == case
      if len(groups[case]) >= 2:
        assert a != b, 'a case with several images must pair two different images'
      else:
        assert a == b
    np.testing.assert_array_equal(batch['label'], [[a % 3, b % 3] for a, b in records])
    seen_cases.update(cases)
  assert len(seen_cases) == 20


def test_case_groups_are_the_groups_in_one_flat_array():
  _, groups = _source_and_groups(CASE_SIZES)
  compact = pipeline.CaseGroups(groups)
  assert len(compact) == len(groups)
  for unit, group in enumerate(groups):
    np.testing.assert_array_equal(compact[unit], group)
  np.testing.assert_array_equal(compact[-1], groups[-1])
  with pytest.raises(IndexError):
    compact[len(groups)]  # pylint: disable=pointless-statement
  restored = pickle.loads(pickle.dumps(compact))
  assert all(np.array_equal(restored[u], g) for u, g in enumerate(groups))
  # Two arrays, not one object per case: the pickle is about the size of the indices.
  assert len(pickle.dumps(compact)) < 8 * (sum(CASE_SIZES) + len(groups) + 1) + 400
  assert len(pipeline.CaseGroups([])) == 0
  # The pairs drawn from either form are the same.
  source, _ = _source_and_groups(CASE_SIZES)
  batches = [_batches(pipeline.pair_dataset(source, g, SPEC, global_batch=8, host_index=0,
                                            host_count=1, seed=0, num_workers=0), 3)
             for g in (groups, compact)]
  for a, b in zip(*batches):
    np.testing.assert_array_equal(a['views'], b['views'])


def test_each_epoch_is_a_new_permutation_without_repeats():
  source, groups = _source_and_groups(CASE_SIZES)
  case_of = {int(r): c for c, g in enumerate(groups) for r in g}
  ds = pipeline.pair_dataset(source, groups, SPEC, global_batch=5, host_index=0, host_count=1,
                             seed=3, num_workers=0)
  epochs = []
  for e in range(2):
    cases = [case_of[_record_of(v[0])] for b in _batches_slice(ds, 4 * e, 4) for v in b['views']]
    assert sorted(cases) == list(range(20))  # 4 steps x 5 = one full epoch, no repeats
    epochs.append(cases)
  assert epochs[0] != epochs[1]


def _batches_slice(ds, start, n):
  it = iter(ds)
  for _ in range(start):
    next(it)
  return [next(it) for _ in range(n)]


def test_positions_are_safe_under_many_threads_across_epochs():
  """grain's prefetch threads read several epochs at once near a boundary; the cache of
  epoch permutations they share must not lose an epoch under one of them."""
  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)  # switch threads as often as possible
  try:
    positions = pipeline.TrainPositions(3, global_batch=2, host_index=0, host_count=1, seed=0)
    reference = pipeline.TrainPositions(3, global_batch=2, host_index=0, host_count=1, seed=0)
    errors, indices = [], np.random.default_rng(0).integers(0, 2000, (8, 4000))

    def read(row):
      try:
        for i in row:
          assert positions[int(i)] == reference[int(i)]
      except Exception as e:  # noqa: BLE001  reported below
        errors.append(repr(e))

    threads = [threading.Thread(target=read, args=(row,)) for row in indices]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    sys.setswitchinterval(interval)
  assert not errors, errors[:3]
  restored = pickle.loads(pickle.dumps(positions))  # worker processes get a copy
  assert [restored[i] for i in range(10)] == [reference[i] for i in range(10)]


def test_deterministic_for_a_seed_and_independent_of_workers():
  source, groups = _source_and_groups(CASE_SIZES)
  kw = dict(global_batch=8, host_index=0, host_count=1)
  a = _batches(pipeline.pair_dataset(source, groups, SPEC, seed=1, num_workers=0, **kw), 3)
  b = _batches(pipeline.pair_dataset(source, groups, SPEC, seed=1, num_workers=2, **kw), 3)
  c = _batches(pipeline.pair_dataset(source, groups, SPEC, seed=2, num_workers=0, **kw), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['views'], y['views'])
  assert any(not np.array_equal(x['views'], z['views']) for x, z in zip(a, c))


def test_hosts_read_disjoint_slices_of_the_same_global_batch():
  source, groups = _source_and_groups(CASE_SIZES)
  whole = _batches(pipeline.pair_dataset(source, groups, SPEC, global_batch=8, host_index=0,
                                         host_count=1, seed=0, num_workers=0), 3)
  parts = [_batches(pipeline.pair_dataset(source, groups, SPEC, global_batch=8, host_index=h,
                                          host_count=2, seed=0, num_workers=0), 3)
           for h in range(2)]
  for step in range(3):
    joined = np.concatenate([parts[0][step]['views'], parts[1][step]['views']])
    np.testing.assert_array_equal(joined, whole[step]['views'])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resumed_iterator_continues_exactly(num_workers):
  source, groups = _source_and_groups(CASE_SIZES)
  def make():
    return pipeline.pair_dataset(source, groups, SPEC, global_batch=8, host_index=0,
                                 host_count=1, seed=0, num_workers=num_workers)
  uninterrupted = _batches(make(), 6)
  it = iter(make())
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as saved in a checkpoint
  resumed = iter(make())
  resumed.set_state(state)
  for want in uninterrupted[4:]:
    np.testing.assert_array_equal(next(resumed)['views'], want['views'])


@pytest.mark.parametrize('saved_with, resumed_with', [(2, 0), (0, 2)])
def test_resume_with_another_number_of_workers_gives_the_same_batches(saved_with, resumed_with):
  source, groups = _source_and_groups(CASE_SIZES)

  def make(workers, start_batch=0):
    return pipeline.pair_dataset(source, groups, SPEC, global_batch=8, host_index=0,
                                 host_count=1, seed=0, num_workers=workers,
                                 start_batch=start_batch)

  uninterrupted = _batches(make(0), 6)
  it = iter(make(saved_with))
  for _ in range(4):
    next(it)
  state = json.dumps(it.get_state()).encode()  # as saved in a checkpoint
  it.close()
  assert pipeline.saved_workers(json.loads(state)) == saved_with
  resumed = pipeline.resume_iterator(lambda start_batch: make(resumed_with, start_batch), state,
                                     step=4, num_workers=resumed_with)
  for want in uninterrupted[4:]:
    np.testing.assert_array_equal(next(resumed)['views'], want['views'])


def test_device_prefetch_reports_the_state_after_each_batch():
  source, groups = _source_and_groups(CASE_SIZES)
  def make():
    return pipeline.pair_dataset(source, groups, SPEC, global_batch=8, host_index=0,
                                 host_count=1, seed=0, num_workers=0)
  reference = iter(make())
  states = []
  for _ in range(3):
    next(reference)
    states.append(json.dumps(reference.get_state()).encode())
  prefetched = pipeline.device_prefetch(iter(make()), lambda b: b, size=2)
  for want in states:
    _, state = next(prefetched)
    assert state == want
  prefetched.close()


class _Closable:
  """An iterator over `items` that records `close()`; raises `fail` after them if given."""

  def __init__(self, items, fail=None):
    self._items, self._fail, self.closed = iter(items), fail, False

  def __iter__(self):
    return self

  def __next__(self):
    try:
      return next(self._items)
    except StopIteration:
      if self._fail is not None:
        raise self._fail from None
      raise

  def close(self):
    self.closed = True


def test_device_prefetch_closes_the_iterator_it_was_given():
  # Exhausted.
  it = _Closable([{'x': np.zeros(2)}] * 3)
  assert len(list(pipeline.device_prefetch(it, lambda b: b))) == 3 and it.closed
  # Stopped early (the trainers' `contextlib.closing`), with batches still prefetched.
  it = _Closable([{'x': np.zeros(2)}] * 100)
  with contextlib.closing(pipeline.device_prefetch(it, lambda b: b, size=4)) as batches:
    next(batches)
    assert not it.closed
  assert it.closed
  # The input fails: the error reaches the loop, and the iterator is closed.
  it = _Closable([{'x': np.zeros(2)}], fail=DataError('record 7 cannot be decoded'))
  with pytest.raises(DataError, match='record 7'):
    list(pipeline.device_prefetch(it, lambda b: b))
  assert it.closed


def test_eval_images_cover_every_record_once_with_padding_masked():
  source, _ = _source_and_groups([1] * 13)
  seen = []
  for host in range(2):
    ds = pipeline.eval_image_dataset(source, SPEC, global_batch=8, host_index=host, host_count=2)
    for batch in ds:
      assert batch['image'].shape == (4, 8, 8, 3)
      for image, mask in zip(batch['image'], batch['mask']):
        if mask:
          seen.append(_record_of(image))
        else:
          assert not image.any()
  assert sorted(seen) == list(range(13))


def _encoded(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='PNG')
  return buf.getvalue()


@pytest.mark.parametrize('shape', [(200, 300, 3), (310, 180)])  # wide RGB, tall gray
def test_squash_view_is_torchvision_s_resize_then_centre_crop(shape):
  pixels = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
  data = _encoded(pixels)
  # The benchmark's code: Image.open(path).convert('RGB'), Resize((256, 256)) (PIL
  # bilinear), then CenterCrop(224) (offset round(32 / 2)) or TenCrop(224).
  squashed = np.asarray(Image.open(io.BytesIO(data)).convert('RGB').resize(
      (256, 256), Image.Resampling.BILINEAR))
  single, ten = pipeline.eval_crop(224), pipeline.eval_crop(224, ten_crop=True)
  np.testing.assert_array_equal(pipeline.eval_view(data, *single, 'squash'),
                                squashed[16:240, 16:240])
  np.testing.assert_array_equal(pipeline.eval_view(data, *ten, 'squash'), squashed)
  # 'square' stays SimCLR's central square, which differs on a non-square image.
  square = pipeline.eval_view(data, *single, 'square')
  np.testing.assert_array_equal(square, host_ops.center_crop(data, 224, 0.875))
  assert square.shape == (224, 224, 3) and not np.array_equal(square, squashed[16:240, 16:240])
  # The evaluation pipeline makes its views so, padding aside.
  source = [{'image': data, 'label': 1}] * 3
  for ten_crop, want in ((False, squashed[16:240, 16:240]), (True, squashed)):
    spec = pipeline.ViewSpec(image_size=224, label_key='label', eval_resize='squash')
    batch = next(iter(pipeline.eval_image_dataset(source, spec, global_batch=4, host_index=0,
                                                  host_count=1, ten_crop=ten_crop)))
    assert list(batch['mask']) == [1, 1, 1, 0]
    for image in batch['image'][:3]:
      np.testing.assert_array_equal(image, want)


def test_an_unknown_eval_resize_is_a_one_line_config_error():
  spec = pipeline.ViewSpec(image_size=8, label_key='label', eval_resize='stretch')
  with pytest.raises(ConfigError, match=r"^config.data.eval_resize='stretch' is not one of "
                                        r'square, squash$'):
    pipeline.eval_image_dataset([{'image': _png(0), 'label': 0}], spec, global_batch=1,
                                host_index=0, host_count=1)


def test_eval_pairs_use_whole_batches_only():
  source, groups = _source_and_groups(CASE_SIZES)
  ds = pipeline.eval_pair_dataset(source, groups, SPEC, global_batch=8, host_index=0,
                                  host_count=1, seed=0)
  assert len(list(ds)) == 2
  assert pipeline.eval_pair_dataset(source, groups, SPEC, global_batch=32, host_index=0,
                                    host_count=1, seed=0) is None
  first = pipeline.eval_pair_dataset(source, groups, SPEC, global_batch=8, host_index=0,
                                     host_count=1, seed=0, max_batches=1)
  (only,) = list(first)  # the stream ends after it: nothing is left made ahead
  np.testing.assert_array_equal(only['views'], next(iter(ds))['views'])


class _Filled:
  """Position -> an array of `shape` filled with it (no decoding: a fast producer)."""

  def __init__(self, shape):
    self.shape = shape

  def __call__(self, position):
    return np.full(self.shape, position % 251, np.uint8)


def _our_shared_memory(nbytes: int) -> int:
  """Segments in /dev/shm of exactly `nbytes` (a size no other test's batches have)."""
  folder = '/dev/shm'
  count = 0
  for name in os.listdir(folder):
    with contextlib.suppress(OSError):
      count += os.path.getsize(os.path.join(folder, name)) == nbytes
  return count


@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='needs /dev/shm (Linux)')
def test_workers_make_a_bounded_number_of_batches_ahead():
  # grain's default read-ahead (500 elements) would be 500 batches a worker here.
  shape, batch, workers = (1, 100_003), 4, 2
  ds = pipeline.batched(grain.MapDataset.range(10**9).map(_Filled(shape)), batch, workers)
  iterator = iter(ds)
  try:
    for i in range(3):
      np.testing.assert_array_equal(next(iterator)[:, 0, 0], [(4 * i + j) % 251
                                                               for j in range(4)])
    time.sleep(3)  # the workers run ahead as far as they may
    held = _our_shared_memory(batch * shape[1])
  finally:
    iterator.close()
  assert held <= workers * 8, held
  assert pipeline.read_options(2).prefetch_buffer_size <= 2


@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='needs /dev/shm (Linux)')
def test_closing_a_stream_frees_the_batches_its_workers_made_ahead():
  shape, batch, workers = (1, 100_019), 4, 2  # a size of its own in /dev/shm
  iterator = iter(pipeline.batched(grain.MapDataset.range(10**9).map(_Filled(shape)), batch,
                                   workers))
  try:
    for _ in range(3):
      next(iterator)
    time.sleep(3)  # the workers make their batches ahead
    assert _our_shared_memory(batch * shape[1]) >= workers
  finally:
    iterator.close()
  del iterator
  deadline = time.monotonic() + 10  # the worker processes have exited: close joins them
  while _our_shared_memory(batch * shape[1]) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _our_shared_memory(batch * shape[1]) == 0


def test_unsent_batches_unlinks_what_was_made_and_not_handed_over():
  ds = grain.MapDataset.range(6).map(lambda i: {'a': np.full(3, i), 'b': [np.full(2, i)]})
  ds = ds.batch(2)
  if not hasattr(ds, 'enable_shared_memory_output'):
    pytest.skip('this grain batches in worker memory only, and copies to shared memory itself')
  ds.enable_shared_memory_output()
  first, second = ds[0], ds[1]
  names = [[leaf.shm.name for leaf in (batch['a'], batch['b'][0])] for batch in (first, second)]
  unsent = pickle.loads(pickle.dumps(pipeline.UnsentBatches()))  # as a worker receives it
  try:
    assert unsent.made(first) is first and unsent.made(second) is second
    assert unsent.handed_over(first) is first
    assert unsent.unlink() == 2
    for name in names[1]:
      with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name)
    assert unsent.unlink() == 0
  finally:
    for name in names[0]:
      block = shared_memory.SharedMemory(name)
      block.close()
      block.unlink()


def test_finish_shared_memory_releases_waits_for_grain_s_queued_unlinks():
  shared_memory_array = pytest.importorskip('grain._src.python.ipc.shared_memory_array')
  arrays = shared_memory_array.SharedMemoryArray
  arrays.enable_async_del(1)  # as grain's worker streams do in this process
  arrays._del_thread_pool.apply_async(time.sleep, (1.0,))  # the pool is busy for a second
  array = arrays((3,), np.uint8)
  array.unlink_on_del()
  name = array.shm.name
  del array  # its unlink is queued behind the sleep
  shared_memory.SharedMemory(name).close()  # still there
  pipeline.finish_shared_memory_releases()
  with pytest.raises(FileNotFoundError):
    shared_memory.SharedMemory(name)
  pipeline.finish_shared_memory_releases()  # nothing queued: returns at once


def test_batch_larger_than_the_data_is_a_config_error():
  source, groups = _source_and_groups(CASE_SIZES)
  with pytest.raises(ConfigError, match='batch_size=32 is larger than the 20'):
    pipeline.pair_dataset(source, groups, SPEC, global_batch=32, host_index=0, host_count=1,
                          seed=0, num_workers=0)


def test_an_image_that_fails_to_decode_names_the_record():
  source, groups = _source_and_groups(CASE_SIZES)
  source[5] = dict(source[5], image=b'\xff\xd8 not a jpeg')
  ds = pipeline.pair_dataset(source, [np.array([i]) for i in range(len(source))], SPEC,
                             global_batch=len(source), host_index=0, host_count=1, seed=0,
                             num_workers=0, name='ham10000/train')
  with pytest.raises(DataError, match=r'ham10000/train record 5 \(img5\)') as e:
    next(iter(ds))
  assert '\n' not in str(e.value)


def test_missing_label_feature_is_named():
  source, groups = _source_and_groups(CASE_SIZES)
  spec = pipeline.ViewSpec(image_size=8, label_key='dx')
  ds = pipeline.pair_dataset(source, groups, spec, global_batch=8, host_index=0, host_count=1,
                             seed=0, num_workers=0, name='mydata/train')
  with pytest.raises(DataError, match="mydata/train record .*: no feature 'dx'"):
    next(iter(ds))


def test_simclr_units_are_records_and_pairs_are_two_crops_of_one_image():
  source, _ = _source_and_groups([1] * 12)
  ds = pipeline.pair_dataset(source, None, SPEC, global_batch=6, host_index=0, host_count=1,
                             seed=0, num_workers=0)
  records = [(_record_of(v[0]), _record_of(v[1])) for b in _batches(ds, 2) for v in b['views']]
  assert all(a == b for a, b in records)
  assert sorted(a for a, _ in records) == list(range(12))  # one epoch, each image once
