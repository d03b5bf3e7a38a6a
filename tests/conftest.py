"""Shared fixtures: a generated HAM10000 raw tree, and the real HAM10000 build."""

from __future__ import annotations

import os

# Every test sees 8 CPU devices, so sharded code runs sharded (set before JAX loads).
# A process started with its own device count (the multi-host tests' 2 x 4) keeps it.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (f"{os.environ.get('XLA_FLAGS', '')} "
                             '--xla_force_host_platform_device_count=8').strip()
# The suite compiles hundreds of small programs, each run a few times: XLA's least
# optimised CPU code compiles faster, and CI starts from an empty compilation cache
# (the suite: 10 min 43 s, against 12 min 5 s at the default level, on 2 cores). The
# few tests that train for hundreds of steps run slower this way.
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'

import tempfile

# Compiled programs are cached on disk and shared by the tests and their subprocesses:
# the trainer tests compile the same steps many times.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'bigssl_med_test_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import dataclasses
from pathlib import Path
import signal
import threading
import time

import numpy as np
from PIL import Image
import pytest

from tfds_builders.ham10000 import ham10000

def pytest_configure(config):
  # A runner that starts the suite in the background (`cmd &` in a script) hands it
  # SIGINT ignored, which Python then leaves ignored, as do the commands the tests start:
  # the Ctrl-C tests would test nothing and hang. They get Python's own handler.
  if threading.current_thread() is threading.main_thread():
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
      signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
  # The tests that damage a checkpoint leave orbax's failed reads behind; they report
  # when the garbage collector gets to them, in whichever test runs then. The commands
  # keep them off stderr (bigssl_med.cli.silence_after_error); here they are expected.
  for message in (r'Exception ignored in. <coroutine object _read_array_index_and_device_put',
                  r'Exception ignored in. None[\s\S]*Event loop is closed'):
    config.addinivalue_line('filterwarnings',
                            f'ignore:{message}:pytest.PytestUnraisableExceptionWarning')
  config.addinivalue_line('filterwarnings', "ignore:coroutine '_read_array_index_and_device_put'"
                                            ' was never awaited:RuntimeWarning')


@pytest.fixture(autouse=True)
def _sigint_left_as_python_sets_it():
  """Fails a test that leaves SIGINT (Ctrl-C) ignored, handled by another handler or
  blocked in the main thread, and restores it: otherwise the Ctrl-C tests that run later
  in the same process, and the commands they start (which inherit it), fail or hang."""
  yield
  if threading.current_thread() is not threading.main_thread():
    return
  handler = signal.getsignal(signal.SIGINT)
  blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
  if handler is signal.default_int_handler and not blocked:
    return
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # a pending SIGINT is dropped, not raised
  signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
  signal.signal(signal.SIGINT, signal.default_int_handler)
  pytest.fail(f'the test left SIGINT {"blocked" if blocked else "handled by"}'
              f'{"" if blocked else f" {handler!r}"} in the main thread')


REAL_HAM10000 = (Path(__file__).resolve().parents[1].parent / 'shared' / 'data' /
                 'ham10000')
# Images per lesion, for lesions that hash into each split: 12 images, 7 lesions.
_FAKE_LESIONS = {'train': (3, 1, 2), 'validation': (2, 1), 'test': (1, 2)}
_HEADER = ('lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex', 'localization')


@dataclasses.dataclass
class FakeHam10000:
  """A generated raw tree: `rows` are metadata dicts in file order."""
  root: Path
  metadata: Path
  rows: list[dict[str, str]]
  images: dict[str, Path]
  masks: dict[str, Path]


def ids_per_split(make_id, split_of, per_split: dict[str, int], *,
                  start: int = 0) -> dict[str, list[str]]:
  """split -> the first `per_split[split]` of `make_id(start), make_id(start + 1), ...`
  that `split_of` (a builder's case hash) puts in that split, in order."""
  found = {split: [] for split in per_split}
  number = start
  while any(len(found[s]) < n for s, n in per_split.items()):
    case_id = make_id(number)
    split = split_of(case_id)
    if len(found[split]) < per_split[split]:
      found[split].append(case_id)
    number += 1
  return found


def _fake_lesion_ids() -> dict[str, list[str]]:
  """Lesion ids, in order, whose hash puts them in each split."""
  return ids_per_split(lambda number: f'HAM_{number:07d}', ham10000.split_for_case,
                       {split: len(counts) for split, counts in _FAKE_LESIONS.items()})


def write_fake_ham10000(root: Path, layout: str = 'published',
                        metadata_name: str | None = None) -> FakeHam10000:
  """Writes a small HAM10000 tree in the 'published' or 'dataverse' layout.

  'published': HAM10000_metadata.csv, images/, masks/ (as in ../shared/data).
  'dataverse': the unzipped official release: HAM10000_images_part_1/ and _2/,
  HAM10000_segmentations_lesion_tschandl/HAM10000_segmentations_lesion_tschandl/,
  and a tab-separated, quoted HAM10000_metadata.tab (or `metadata_name`, written
  comma-separated unless it ends in .tab).
  """
  rng = np.random.default_rng(0)
  rows, number = [], 24306
  for split, lesion_ids in _fake_lesion_ids().items():
    for lesion_id, count in zip(lesion_ids, _FAKE_LESIONS[split]):
      dx = ham10000.CLASS_NAMES[len(rows) % len(ham10000.CLASS_NAMES)]
      for _ in range(count):
        rows.append({'lesion_id': lesion_id, 'image_id': f'ISIC_{number:07d}',
                     'dx': dx, 'dx_type': 'histo' if len(rows) % 2 else 'follow_up',
                     'age': '' if not rows else f'{30 + 5 * len(rows):.1f}',
                     'sex': 'female' if len(rows) % 3 else 'male',
                     'localization': 'back'})
        number += 1
  if layout == 'published':
    image_dirs, mask_dir = [root / 'images'], root / 'masks'
    metadata_name = metadata_name or 'HAM10000_metadata.csv'
  elif layout == 'dataverse':
    image_dirs = [root / 'HAM10000_images_part_1', root / 'HAM10000_images_part_2']
    mask_dir = (root / 'HAM10000_segmentations_lesion_tschandl' /
                'HAM10000_segmentations_lesion_tschandl')
    metadata_name = metadata_name or 'HAM10000_metadata.tab'
    junk = root / '__MACOSX' / 'HAM10000_images_part_1' / '._ISIC_0024306.jpg'
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b'not an image')
  else:
    raise ValueError(layout)
  images, masks = {}, {}
  for i, row in enumerate(rows):
    image_id = row['image_id']
    width, height = (20, 15) if i % 2 else (16, 12)
    image_dir = image_dirs[i * len(image_dirs) // len(rows)]
    image_dir.mkdir(parents=True, exist_ok=True)
    images[image_id] = image_dir / f'{image_id}.jpg'
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images[image_id], format='JPEG')
    mask_dir.mkdir(parents=True, exist_ok=True)
    masks[image_id] = mask_dir / f'{image_id}_segmentation.png'
    mask = Image.fromarray(
        (rng.random((height, width)) > 0.5).astype(np.uint8) * 255)
    (mask.convert('1') if i == 5 else mask).save(masks[image_id], format='PNG')
  metadata = root / metadata_name
  if metadata_name.endswith('.tab'):  # Dataverse's ingested form: quoted strings.
    lines = ['\t'.join(f'"{c}"' for c in _HEADER)] + [
        '\t'.join(row[c] if c == 'age' else f'"{row[c]}"' for c in _HEADER)
        for row in rows]
  else:
    lines = [','.join(_HEADER)] + [','.join(row[c] for c in _HEADER)
                                   for row in rows]
  metadata.write_text('\n'.join(lines) + '\n')
  return FakeHam10000(root=root, metadata=metadata, rows=rows, images=images,
                      masks=masks)


@pytest.fixture
def make_fake_ham10000():
  """`write_fake_ham10000(root, layout='published', metadata_name=None)`."""
  return write_fake_ham10000


@pytest.fixture
def fake_ham10000(tmp_path) -> FakeHam10000:
  """A fresh generated tree in the published layout, under tmp_path/raw."""
  return write_fake_ham10000(tmp_path / 'raw')


# The real HAM10000 is built once per session, at the demo's resolution.
REAL_HAM10000_BUILD = 'ham10000/side96'


@pytest.fixture(scope='session')
def ham10000_data_dir(tmp_path_factory) -> str:
  """Data dir with the real HAM10000 (../shared/data/ham10000) built as REAL_HAM10000_BUILD."""
  if not (REAL_HAM10000 / 'HAM10000_metadata.csv').is_file():
    pytest.skip(f'real HAM10000 not found at {REAL_HAM10000} (see '
                '../shared/data/README.md)')
  from bigssl_med import build_data  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('ham10000_real')
  start = time.perf_counter()
  build_data.build(REAL_HAM10000_BUILD, data_dir=os.fspath(data_dir),
                   manual_dir=os.fspath(REAL_HAM10000))
  print(f'\nBuilt the real HAM10000 in {time.perf_counter() - start:.1f} s')
  return os.fspath(data_dir)


def override(config, overrides):
  """`config` with dotted keys set: `override(c, {'data.image_size': 16})`."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def shrunk(config, data_dir):
  """A real config (a benchmark protocol) shrunk to a 40-step CPU run on a tiny model,
  reading the builds in `data_dir`."""
  return override(config, {
      'data.data_dir': os.fspath(data_dir), 'data.build_if_missing': False,
      'data.image_size': 16, 'data.num_workers': 0, 'model.width_multiplier': 0.125,
      'model.cifar_stem': True, 'compute_dtype': 'float32', 'batch_size': 16,
      'num_epochs': 0.0, 'total_steps': 40, 'log_every_steps': 10,
      'checkpoint_every_steps': 20, 'tensorboard': False})


def write_many_lesions(root: Path, num_lesions: int, seed: int = 0) -> Path:
  """A HAM10000-layout tree with `num_lesions` lesions of 1-3 small images each."""
  rng = np.random.default_rng(seed)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  lines, number = [','.join(_HEADER)], 24306
  for lesion in range(num_lesions):
    dx = ham10000.CLASS_NAMES[lesion % len(ham10000.CLASS_NAMES)]
    for _ in range(int(rng.integers(1, 4))):
      image_id = f'ISIC_{number:07d}'
      number += 1
      base = np.array([40 * (lesion % 7), 30, 200 - 20 * (lesion % 7)])
      pixels = np.clip(base + rng.normal(0, 25, (16, 20, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / 'images' / f'{image_id}.jpg', format='JPEG')
      Image.fromarray(np.full((16, 20), 255, np.uint8)).save(
          root / 'masks' / f'{image_id}_segmentation.png', format='PNG')
      lines.append(f'HAM_{lesion:07d},{image_id},{dx},histo,50.0,male,back')
  (root / 'HAM10000_metadata.csv').write_text('\n'.join(lines) + '\n')
  return root


@pytest.fixture(scope='session')
def small_ham10000(tmp_path_factory):
  """(data_dir, manual_dir): 200 generated lesions in HAM10000's layout, built once."""
  from bigssl_med import build_data  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('small_ham10000')
  manual_dir = write_many_lesions(root / 'raw', 200)
  build_data.build('ham10000', data_dir=os.fspath(root / 'data'), manual_dir=os.fspath(manual_dir))
  return os.fspath(root / 'data'), os.fspath(manual_dir)


def assert_one_line_error(excinfo, *parts) -> None:
  """The error of `pytest.raises` is one line that names each of `parts`."""
  message = str(excinfo.value)
  assert '\n' not in message, message
  for part in parts:
    assert str(part) in message, (part, message)


def records_by_split(data_dir, name: str) -> dict[str, dict[str, dict]]:
  """split -> image_id -> record of a built data set, read through bigssl_med.data.sources."""
  from bigssl_med.data import sources  # pylint: disable=g-import-not-at-top
  info = sources.dataset_info(name, os.fspath(data_dir))
  return {split: {r['image_id'].decode(): r
                  for r in sources.open_split(name, split, os.fspath(data_dir))}
          for split in info.splits}


def nlm_image_ids(prefix: str, per_split: dict[str, int]) -> list[str]:
  """Published-style ids of an NLM TB set (`PREFIX_nnnn_<label>`, e.g. MCUCXR_0001_1),
  `per_split[split]` of them in each split of the sets' case hash, sorted."""
  from tfds_builders import nlm_tb  # pylint: disable=g-import-not-at-top
  found = ids_per_split(lambda number: f'{prefix}_{number:04d}_{number % 2}',
                        nlm_tb.split_for_case, per_split, start=1)
  return sorted(i for ids in found.values() for i in ids)


def assert_manual_only(name: str, builder_class, tmp_path, *instructions: str) -> None:
  """A manual-only builder without a manual dir: `ensure_built` and the builder itself
  stop with one-line errors; the builder's names where to get the set (`instructions`)."""
  from bigssl_med import build_data  # pylint: disable=g-import-not-at-top
  from bigssl_med.errors import DataError  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError) as excinfo:
    build_data.ensure_built(name, data_dir=os.fspath(tmp_path / 'data'), build_if_missing=True)
  assert_one_line_error(excinfo, f'{name} cannot be downloaded', 'config.data.manual_dir')

  class _NoManualDir:
    @property
    def manual_dir(self):
      raise AssertionError('Manual directory not enabled.')

  builder = builder_class(data_dir=os.fspath(tmp_path / 'tfds'))
  with pytest.raises(DataError) as excinfo:
    builder._split_generators(_NoManualDir())  # pylint: disable=protected-access
  assert_one_line_error(excinfo, *instructions, '--manual_dir')
