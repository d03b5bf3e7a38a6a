"""Builds decode, resize and encode images on several threads: the order, the
skip list and every record stay what one thread gives."""

import os
import random
import threading
import time

import numpy as np
import pytest

from bigssl_med import build_data
from bigssl_med.data import sources
from tfds_builders import common


def test_in_order_keeps_the_order_of_the_items():
  def slow_square(x):
    time.sleep(random.Random(x).uniform(0, 0.01))  # later items often finish first
    return x * x

  assert list(common.in_order(slow_square, range(40), threads=4)) == [
      (x, x * x) for x in range(40)]


def test_in_order_raises_an_error_when_its_item_comes():
  def fail_on_five(x):
    if x == 5:
      raise ValueError('item 5')
    return x

  results = common.in_order(fail_on_five, range(20), threads=3)
  assert [next(results)[0] for _ in range(5)] == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match='item 5'):
    next(results)


def test_in_order_works_a_bounded_number_of_items_ahead():
  started = []
  lock = threading.Lock()

  def record(x):
    with lock:
      started.append(x)
    return x

  results = common.in_order(record, range(1000), threads=2)
  assert next(results) == (0, 0)
  time.sleep(0.05)
  assert len(started) <= 4 * 2
  results.close()


def test_threads_change_nothing_in_the_build(fake_ham10000, tmp_path):
  rows = fake_ham10000.rows
  os.remove(fake_ham10000.images[rows[4]['image_id']])
  fake_ham10000.masks[rows[1]['image_id']].write_bytes(b'\x89PNG garbage')
  (fake_ham10000.images[rows[2]['image_id']]).write_bytes(b'not a jpeg')
  built = {}
  for threads in (1, 3):
    data_dir = os.fspath(tmp_path / f'data{threads}')
    build_data.build('ham10000', data_dir=data_dir, manual_dir=os.fspath(fake_ham10000.root),
                     max_side=12, skip_bad_images=True, num_threads=threads)
    info = sources.dataset_info('ham10000/side12', data_dir)
    records = {split: [{k: np.asarray(v).tobytes() for k, v in record.items()}
                       for record in sources.open_split('ham10000/side12', split, data_dir)]
               for split in info.splits}
    built[threads] = records, info.metadata['skipped_images']
  assert built[1][1] and [entry['path'] for entry in built[1][1]] == [
      entry['path'] for entry in built[3][1]]
  assert built[1] == built[3]


def test_num_threads_below_one_is_an_error(fake_ham10000, tmp_path):
  with pytest.raises(common.DataError, match='num_threads must be at least 1, got 0'):
    build_data.build('ham10000', data_dir=os.fspath(tmp_path / 'data'),
                     manual_dir=os.fspath(fake_ham10000.root), num_threads=0)
