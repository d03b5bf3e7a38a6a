"""What the project's image builders share: configs, tables, images, splits.

* `ImageConfig`: the builder config of every image data set here. `max_side`
  is the longest side images are stored at (antialiased downscaling, never
  upscaling; None keeps them as published). Config names are `original` or
  `side<N>`; `ImageBuilder.make_config` makes one from build options.
* `ImageBuilder(skip_bad_images=True)` turns a missing or undecodable image from
  an error into a skipped record that is counted and listed in the data set's
  metadata (`metadata.json`: `skipped_images`, `num_skipped_images`). It is a
  build option rather than a config field, so that a build that skips lands in
  the same place (`NAME/CONFIG/VERSION`) as one that does not.
* `read_table`: CSV (or tab-separated, optionally gzipped) files with a check of
  the required columns; the error names the file and the missing columns.
* `encode_image` / `ImageStore`: read, check, convert and resize one image into the
  encoded bytes a record stores; `in_order` runs that work on several threads
  (`ImageBuilder(num_threads=...)`, all cores by default) and keeps the order, so a
  build's records do not depend on the number of threads.
* `hash_split` and `check_case_disjoint`: case-disjoint splits.
* `mask_foreground`, `encode_mask`, `MaskSizeError`: the binary masks of a
  segmentation set, read and stored.
* `with_progress`: progress lines while examples are generated.
* `parse_label(s)`, `Item`, `check_unique_keys`, `generate_examples`: the
  CheXpert label encoding (1, 0, -1, blank -> NaN) and turning listed images
  into examples, shared by the chest X-ray builders.

Everything raises `bigssl_med.errors.DataError` with a one-line message that
names the file and, where there is one, the row.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import gzip
import hashlib
import io
import math
import os
import re
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from bigssl_med import files
from bigssl_med.data import host_ops
from bigssl_med.errors import DataError

ORIGINAL = 'original'
_SIDE_RE = re.compile(r'^side(?P<side>[1-9][0-9]*)$')
_WINDOWS_DRIVE_RE = re.compile(r'^[A-Za-z]:[\\/]')
_JPEG_QUALITY = 95
# zlib level of the PNGs a build writes (downscaled or converted lossless images; DICOM
# pixels). Pillow's default, 6, took three times as long as 4 on 512 x 512 X-rays for
# files no smaller, and decoding takes the same time (README: Data, Threads).
PNG_COMPRESS_LEVEL = 4
_MIN_SIDE = 8


# ----------------------------------------------------------------------------
# Builder configs.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class ImageConfig(tfds.core.BuilderConfig):
  """Config of an image builder.

  Attributes:
    max_side: longest side of stored images (antialiased downscaling only);
      None stores them at their published size.
  """
  max_side: int | None = None


def downscaled_configs(max_side: int, published: str) -> list[ImageConfig]:
  """`[side<max_side>, original]` configs (the downscaled one is the default).

  Args:
    max_side: the default config's longest side.
    published: what the `original` config stores, e.g. 'Images as published.'.
  """
  return [ImageConfig(name=config_name(max_side), max_side=max_side,
                      description=_describe(max_side)),
          ImageConfig(name=ORIGINAL, description=published)]


def config_name(max_side: int | None) -> str:
  """`original` for None, else `side<max_side>`."""
  return ORIGINAL if max_side is None else f'side{int(max_side)}'


def is_size_name(name: str) -> bool:
  """Whether `name` has the form of a size config: `original` or `side<N>`."""
  return name == ORIGINAL or _SIDE_RE.match(name) is not None


def max_side_of(name: str) -> int | None:
  """Inverse of `config_name`.

  Raises:
    DataError: `name` is neither `original` nor `side<N>`, or N is below 8.
  """
  if name == ORIGINAL:
    return None
  match = _SIDE_RE.match(name)
  if match is None:
    raise DataError(f'unknown builder config {name!r}; expected {ORIGINAL!r} or '
                    "'side<N>' (images stored with longest side N)")
  side = int(match['side'])
  if side < _MIN_SIDE:
    raise DataError(f'builder config {name!r}: the longest side must be at least '
                    f'{_MIN_SIDE}, got {side}')
  return side


class ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of builders configured by `ImageConfig`.

  Subclasses set `BUILDER_CONFIGS` (the first is the default) and call
  `self.image_store()` to turn files into stored bytes.

  Args (constructor, besides TFDS's `data_dir`, `config`, `file_format`, ...):
    skip_bad_images: skip (count and list in the metadata) images that are
      missing or cannot be decoded, instead of stopping the build.
    num_threads: threads that read, decode, resize and encode images (Pillow
      releases the GIL for that work); None for one per core. The records do not
      depend on it.
  """

  BUILDER_CONFIGS = [ImageConfig(name=ORIGINAL)]
  # Whether the builder fetches its raw files itself when it is given no manual_dir;
  # the others (registration or credentials required, or the user's own files) need one.
  DOWNLOADS = False

  def __init_subclass__(cls, skip_registration: bool = True, **kwargs):
    # Builders are looked up in `tfds_builders.BUILDERS`, never in TFDS's global
    # registry, where names such as `chexpert` are taken by TFDS's own builders.
    super().__init_subclass__(skip_registration=skip_registration, **kwargs)

  def __init__(self, *, skip_bad_images: bool = False, num_threads: int | None = None,
               **kwargs):
    self.skip_bad_images = bool(skip_bad_images)
    self.num_threads = default_threads() if num_threads is None else int(num_threads)
    if self.num_threads < 1:
      raise DataError(f'num_threads must be at least 1, got {num_threads}')
    super().__init__(**kwargs)

  @classmethod
  def check_unchanged(cls, version_dir: str, manual_dir: str) -> None:
    """Fails when the build in `version_dir` no longer matches the raw files in
    `manual_dir` (a builder of files users edit checks it; published releases do not
    change)."""
    del version_dir, manual_dir

  @classmethod
  def make_config(cls, config: str | None = None, *, max_side: int | None = None,
                  manual_dir: str | None = None) -> ImageConfig:
    """The config to build for the given build options.

    A config the class lists in `BUILDER_CONFIGS` is returned as that very
    object (TFDS refuses an equal-named copy).

    Args:
      config: a config name (`original`, `side<N>`), or None for the builder's
        default, or `side<max_side>` when `max_side` is given.
      max_side: longest stored side; must agree with `config` when both are given.
      manual_dir: the raw files (unused here; builders whose features depend on
        the data, such as `image_cases`, read it).

    Raises:
      DataError: an unknown config name, or one that contradicts `max_side`.
    """
    del manual_dir
    if max_side is not None and int(max_side) < _MIN_SIDE:
      raise DataError(f'max_side must be at least {_MIN_SIDE}, got {max_side}')
    if config is None:
      if max_side is None:
        default = cls.BUILDER_CONFIGS[0]
        config, max_side = default.name, default.max_side
      else:
        config = config_name(max_side)
    elif max_side is not None and max_side_of(config) != int(max_side):
      raise DataError(f'builder config {config!r} contradicts max_side={max_side}')
    else:
      max_side = max_side_of(config)
    listed = cls.builder_configs.get(config)
    if listed is not None and getattr(listed, 'max_side', None) == max_side:
      return listed
    return ImageConfig(name=config, max_side=max_side,
                       description=_describe(max_side))

  def image_store(self, *, channels: int | None = None) -> 'ImageStore':
    """An `ImageStore` for this build's config, recording skips in the metadata."""
    return ImageStore(max_side=getattr(self.builder_config, 'max_side', None),
                      channels=channels, skip_bad_images=self.skip_bad_images,
                      metadata=self.info.metadata, threads=self.num_threads)

  def new_metadata(self) -> tfds.core.MetadataDict:
    """Metadata for `_info`: the build options, and the skipped-image list."""
    return tfds.core.MetadataDict(
        max_side=getattr(self.builder_config, 'max_side', None),
        skip_bad_images=self.skip_bad_images,
        num_skipped_images=0, skipped_images=[])


def _describe(max_side: int | None) -> str:
  if max_side is None:
    return 'Images as published.'
  return f'Images downscaled (antialiased) to a longest side of at most {max_side}.'


# ----------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
  """One data row of a table: its line number (the header is line 1) and fields.

  Rows of one table share `columns` (name -> position), so a table of hundreds
  of thousands of rows costs a tuple of strings per row.
  """
  line: int
  fields: tuple[str, ...]
  columns: Mapping[str, int]

  def get(self, column: str) -> str:
    """The stripped value of `column` ('' when empty or absent)."""
    i = self.columns.get(column)
    return self.fields[i].strip() if i is not None and i < len(self.fields) else ''

  @property
  def values(self) -> dict[str, str]:
    """The row as a dict, column name -> raw field."""
    return {name: self.fields[i] for name, i in self.columns.items()
            if i < len(self.fields)}

  def where(self, path: str) -> str:
    return f'{path} line {self.line}'


def read_table(path: str, required: Sequence[str]) -> tuple[list[str], list[Row]]:
  """Reads a comma- or tab-separated table, `.gz` compressed or not.

  The delimiter is taken from the header line (tab if it has one). Column names
  are stripped; a UTF-8 byte order mark is ignored.

  Args:
    path: the file.
    required: columns that must be present.

  Returns:
    (column names, rows).

  Raises:
    DataError: the file cannot be read or parsed (for text that is not UTF-8 the
      message names the line), lacks a header, misses required columns (the message
      names the file and every missing column), or has a row with more fields than
      the header or fewer than its named columns (the message names the line).
  """
  try:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt', newline='', encoding='utf-8-sig') as f:
      header = f.readline()
      if not header.strip():
        raise DataError(f'{path}: empty file, expected a header line with columns '
                        f'{", ".join(required)}')
      delimiter = '\t' if '\t' in header else ','
      f.seek(0)
      reader = csv.reader(f, delimiter=delimiter)
      columns = [c.strip() for c in next(reader)]
      missing = [c for c in required if c not in columns]
      if missing:
        raise DataError(f'{path}: missing column(s) {", ".join(missing)} (found: '
                        f'{", ".join(c for c in columns if c) or "none"})')
      repeated = sorted({c for c in columns if c and columns.count(c) > 1})
      if repeated:
        raise DataError(f'{path}: column {repeated[0]!r} appears more than once in the header')
      positions = {}
      for i, name in enumerate(columns):
        positions.setdefault(name, i)
      rows = []
      for values in reader:
        if not any(v.strip() for v in values):
          continue
        if len(values) > len(columns) and any(v.strip() for v in values[len(columns):]):
          raise DataError(f'{path} line {reader.line_num}: {len(values)} fields but '
                          f'the header has {len(columns)}')
        if len(values) < len(columns) and any(columns[len(values):]):
          # A cut row would read as blank labels; only unnamed trailing columns may lack a field.
          raise DataError(f'{path} line {reader.line_num}: {len(values)} fields but the '
                          f'header has {len(columns)} (no {columns[len(values)]!r} field)')
        rows.append(Row(line=reader.line_num, fields=tuple(values), columns=positions))
  except UnicodeDecodeError as exc:
    raise DataError(f'{path}: {_first_bad_byte(path, opener)} is not UTF-8 text; save the '
                    'file as UTF-8 (in Excel: CSV UTF-8)') from exc
  except (OSError, EOFError, csv.Error) as exc:
    raise DataError(f'{path}: cannot read table ({one_line(exc)})') from exc
  return columns, rows


def _first_bad_byte(path: str, opener: Callable[..., Any]) -> str:
  """`line N (byte 0xXX)`: where `path` first stops being UTF-8 ('a byte' if unknown)."""
  try:
    with opener(path, 'rb') as f:
      data = f.read()
    data.decode('utf-8-sig')
  except UnicodeDecodeError as exc:
    line = data.count(b'\n', 0, exc.start) + 1
    return f'line {line} (byte 0x{data[exc.start]:02x})'
  except (OSError, EOFError):
    pass
  return 'a byte'


def find_file(root: str, names: Sequence[str], what: str) -> str:
  """The shallowest file under `root` named one of `names` (earlier names first).

  Raises:
    DataError: none found; the message lists the names and says what it is for.
  """
  preference = {name: i for i, name in enumerate(names)}
  best = None
  for dirpath, dirnames, filenames in files.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
    depth = 0 if dirpath == root else os.path.relpath(dirpath, root).count(os.sep) + 1
    for name in filenames:
      if name in preference:
        key = (depth, preference[name], dirpath)
        if best is None or key < best[0]:
          best = (key, os.path.join(dirpath, name))
  if best is None:
    raise DataError(f'no {what} ({" or ".join(names)}) found under {root}')
  return best[1]


def md5_file(path: str) -> str:
  """Hex MD5 digest of a file."""
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


# ----------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------


def encode_image(data: bytes | Image.Image, *, name: str, max_side: int | None = None,
                 channels: int | None = None) -> bytes:
  """Checks one encoded image and returns the bytes to store.

  The image is decoded fully (a JPEG at least twice as long as its stored size at
  1/2, 1/4 or 1/8 scale: `host_ops.load_for_side`). The bytes are returned unchanged
  when the image is an 8-bit JPEG or PNG already in the wanted mode and within
  `max_side`; otherwise it is converted (`channels`: 1 -> 'L', 3 -> 'RGB', None keeps
  gray gray and makes the rest RGB; 16-bit gray is scaled to 8 bits), downscaled with
  Pillow's antialiased bicubic filter so that its longest side is `max_side`, and
  re-encoded: as PNG when it was a PNG (lossless stays lossless), else as JPEG
  (quality 95). `data` may also be a decoded Pillow image (a DICOM file's pixels,
  `read_image`), converted and downscaled alike and stored as PNG.

  Raises:
    DataError: the bytes are not a decodable image (names `name`).
  """
  decoded = _decoded(data, max_side, name)
  return _stored_bytes(data, decoded, host_ops.as_8bit(decoded.image, channels=channels,
                                                      name=name))


_GRAY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')


def is_grayscale(image: Image.Image) -> bool:
  """Whether a decoded image has one channel, or colour channels all equal."""
  if image.mode in _GRAY_MODES:
    return True
  rgb = np.asarray(image.convert('RGB'))
  return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and
              np.array_equal(rgb[..., 1], rgb[..., 2]))


def encode_gray_image(data: bytes | Image.Image, *, name: str,
                      max_side: int | None = None) -> tuple[bytes, bool]:
  """`encode_image(channels=1)`, and whether the image had colour (`is_grayscale`
  false), from one decode."""
  decoded = _decoded(data, max_side, name)
  image = host_ops.as_8bit(decoded.image, name=name)  # 'L', or else 'RGB'
  colour = not is_grayscale(image)
  if image.mode != 'L':
    image = image.convert('L')
  return _stored_bytes(data, decoded, image), colour


@dataclasses.dataclass(frozen=True)
class _Decoded:
  """An image decoded for storing (`host_ops.load_for_side`): `image` in its file's mode,
  `image_format` (a decoded image given as such counts as PNG: it is stored losslessly),
  `size` to store it at (None: as it is) and the `box` of `image` to resize."""
  image: Image.Image
  image_format: str
  size: tuple[int, int] | None
  box: tuple[float, ...] | None


def _decoded(data: bytes | Image.Image, max_side: int | None, name: str) -> _Decoded:
  if isinstance(data, Image.Image):
    return _Decoded(data, 'PNG', host_ops.stored_size(data.size, max_side), None)
  return _Decoded(*host_ops.load_for_side(data, max_side, name=name))


def _stored_bytes(data: bytes | Image.Image, decoded: _Decoded, image: Image.Image) -> bytes:
  """What `encode_image` stores for `data`, decoded as `image` in the mode to store."""
  if decoded.size is not None:
    image = image.resize(decoded.size, Image.Resampling.BICUBIC, box=decoded.box)
  elif not isinstance(data, Image.Image) and decoded.image_format in ('JPEG', 'PNG') and \
      decoded.image.mode == image.mode:
    return bytes(data)
  if decoded.image_format == 'PNG':
    return png_bytes(image)
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=_JPEG_QUALITY)
  return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class Failed:
  """A file of one example that could not be stored: the file, the row naming it, why."""
  path: str
  where: str
  error: DataError


# Skipped images logged one by one; the metadata lists them all.
LOGGED_SKIPS = 20


class ImageStore:
  """Reads image files into stored bytes; skips bad ones when asked to.

  A skipped image is appended to `metadata['skipped_images']` as
  `{'split', 'path', 'where', 'reason'}` and counted in
  `metadata['num_skipped_images']`; the build logs a warning for each of the first
  `LOGGED_SKIPS` (a partial download can miss hundreds of thousands) and then one
  line saying the rest are in the metadata only.

  `try_load` / `try_convert` do the work and may run on `threads` threads
  (`each`, through `in_order`); `keep` then decides, in the builder's thread and
  order, whether an outcome is stored, skipped or an error, so the skip list is the
  same whatever the number of threads.
  """

  def __init__(self, *, max_side: int | None, channels: int | None,
               skip_bad_images: bool, metadata: dict | None, threads: int = 1):
    self.max_side = max_side
    self.channels = channels
    self.skip_bad_images = skip_bad_images
    self.threads = threads
    self._metadata = metadata if metadata is not None else {}
    self._metadata.setdefault('skipped_images', [])
    self._metadata.setdefault('num_skipped_images', 0)

  def try_load(self, path: str, *, where: str) -> bytes | Failed:
    """The stored bytes of the image file `path`, or its `Failed` record (thread-safe)."""
    return self.try_convert(lambda: read_image(path, where), path=path, where=where)

  def try_load_gray(self, path: str, *, where: str) -> tuple[bytes, bool] | Failed:
    """The stored one-channel bytes of `path` and whether the file had colour, or its
    `Failed` record (thread-safe; one decode)."""
    try:
      return encode_gray_image(read_image(path, where), name=f'{path} ({where})',
                               max_side=self.max_side)
    except DataError as exc:
      return Failed(path, where, exc)

  def try_convert(self, read: Callable[[], bytes | Image.Image], *, path: str,
                  where: str) -> bytes | Failed:
    """Like `try_load`, with `read()` giving the encoded bytes (e.g. from an archive), or
    a decoded image (`read_image`)."""
    try:
      return encode_image(read(), name=f'{path} ({where})', max_side=self.max_side,
                          channels=self.channels)
    except DataError as exc:
      return Failed(path, where, exc)

  def keep(self, outcome: Any, *, split: str) -> bool:
    """False for a `Failed` outcome, recorded as skipped; True for anything else.

    Raises:
      DataError: the failure, when bad images are not skipped.
    """
    if not isinstance(outcome, Failed):
      return True
    if not self.skip_bad_images:
      raise outcome.error
    self.skip(path=outcome.path, where=outcome.where, split=split, reason=str(outcome.error))
    return False

  def skip(self, *, path: str, where: str, split: str, reason: str) -> None:
    """Records a skipped image."""
    count = len(self._metadata['skipped_images'])
    if count < LOGGED_SKIPS:
      logging.warning('Skipping %s (%s): %s', path, where, reason)
    elif count == LOGGED_SKIPS:
      logging.warning('Skipping %s (%s): %s; further skipped images are not logged one by '
                      'one: the build\'s metadata lists every one (skipped_images)', path,
                      where, reason)
    self._metadata['skipped_images'].append(
        {'split': split, 'path': path, 'where': where, 'reason': reason})
    self._metadata['num_skipped_images'] = len(self._metadata['skipped_images'])

  def check_no_split_emptied(self, by_split: dict[str, Sequence[Any]], what: str) -> None:
    """Fails for a split left without items by the images skipped so far (files found
    missing before decoding): TFDS would leave the split out and the build look complete.

    Args:
      by_split: the items kept for each split.
      what: the data set, for the message.

    Raises:
      DataError: a split with skipped images and none kept.
    """
    for split, items in by_split.items():
      skipped = [entry for entry in self._metadata['skipped_images'] if entry['split'] == split]
      if not items and skipped:
        raise DataError(f'{what}: all {len(skipped)} images of split {split} were skipped '
                        f'as missing (first: {skipped[0]["reason"]}); nothing to write')

  def each(self, items: Sequence[Any], load: Callable[[Any], Any], *, split: str,
           what: str) -> Iterator[tuple[Any, Any]]:
    """`(item, load(item))` for the `items` whose load did not fail, in their order.

    `load` (thread-safe: `try_load`, `try_convert` and the like) runs on `threads`
    threads (`in_order`); a `Failed` outcome goes through `keep` (skipped and listed,
    or raised). Progress is logged as `what`.

    Raises:
      DataError: a bad image when bad images are not skipped, or every one of
        `items` skipped (TFDS cannot write an empty split).
    """
    kept, first_failure = 0, None
    for item, loaded in with_progress(in_order(load, items, threads=self.threads),
                                      total=len(items), what=what):
      if self.keep(loaded, split=split):
        kept += 1
        yield item, loaded
      elif first_failure is None:
        first_failure = loaded
    if items and not kept:
      raise DataError(f'{what}: all {len(items)} images of split {split} were skipped '
                      f'as missing or undecodable (first: {first_failure.path}, '
                      f'{first_failure.where}); nothing to write')


def default_threads() -> int:
  """Image threads of a build by default: one per core this process may use."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def in_order(fn: Callable[[Any], Any], items: Iterable[Any], *,
             threads: int) -> Iterator[tuple[Any, Any]]:
  """Yields `(item, fn(item))` for `items`, in their order, with `fn` on `threads` threads.

  At most `4 * threads` items are worked on ahead of the consumer, so memory does
  not grow with the data set. An exception from `fn` is raised here when its item's
  turn comes. With one thread, `fn` runs in the calling thread.
  """
  if threads <= 1:
    for item in items:
      yield item, fn(item)
    return
  pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix='build-images')
  pending = collections.deque()
  try:
    for item in items:
      pending.append((item, pool.submit(fn, item)))
      if len(pending) >= 4 * threads:
        first, future = pending.popleft()
        yield first, future.result()
    while pending:
      first, future = pending.popleft()
      yield first, future.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def listed_file(listed: str, root: str, where: str) -> str:
  """The file that a path listed in a table names: `~` expanded, relative to `root`,
  normalised. Where the separator is `/`, a `\\` separates folders too (a list made on
  Windows), unless a file has that very name.

  Raises:
    DataError: a Windows drive path (`C:\\...`) where there are none (names `where`).
  """
  file = os.path.normpath(os.path.join(root, os.path.expanduser(listed)))
  if os.sep == '/' and ('\\' in listed or _WINDOWS_DRIVE_RE.match(listed)):
    if os.path.lexists(file):
      return file
    if _WINDOWS_DRIVE_RE.match(listed):
      raise DataError(f'{where}: {listed} is a Windows path; give paths relative to the '
                      "list's folder (or absolute on this machine)")
    file = os.path.normpath(os.path.join(root, os.path.expanduser(listed.replace('\\', '/'))))
  return file


class CaseBlindFinder:
  """Finds files listed with other letter case than on disk (`a.jpg` for `A.JPG`), as
  lists made on Windows or macOS are; thread-safe, each folder listed once."""

  def __init__(self):
    self._listings: dict[str, dict[str, list[str]]] = {}
    self._lock = threading.Lock()

  def find(self, path: str) -> str:
    """`path` when it exists; else the one existing file that `path` names when letter
    case is ignored; else `path` (so that reading it reports it missing)."""
    if os.path.lexists(path):
      return path
    head, missing = path, []
    while not os.path.isdir(head):
      head, tail = os.path.split(head)
      if not tail:
        return path
      missing.append(tail)
    for name in reversed(missing):
      matches = self._listing(head).get(name.casefold(), [])
      if len(matches) != 1:
        return path
      head = os.path.join(head, matches[0])
    return head if os.path.isfile(head) else path

  def _listing(self, folder: str) -> dict[str, list[str]]:
    with self._lock:
      listing = self._listings.get(folder)
    if listing is None:
      listing = collections.defaultdict(list)
      try:
        for name in sorted(os.listdir(folder)):
          listing[name.casefold()].append(name)
      except OSError:
        pass
      with self._lock:
        self._listings[folder] = listing
    return listing


def warn_found_ignoring_case(found: Sequence[tuple[str, str]], what: str, listing: str) -> None:
  """One warning for the listed images `(where, file)` that `CaseBlindFinder` found only
  with letter case ignored (none: no warning)."""
  if found:
    logging.warning('%s: %d image file(s) found only with letter case ignored (first: %s, '
                    'read from %s); correct %s to silence this', what, len(found), *found[0],
                    listing)


def read_image(path: str, where: str) -> bytes | Image.Image:
  """An image file as the store takes it (`encode_image`): the file's own bytes, or for
  a DICOM file its decoded pixels (`tfds_builders.dicom.read_image`, a Pillow image, so
  that they are not encoded only to be decoded again); DataError naming the file and
  `where` if it is unreadable (or a DICOM file undecodable)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise DataError(f'{where}: image file {path} not found') from None
  except OSError as exc:
    raise DataError(f'{where}: cannot read image file {path} ({one_line(exc)})') from exc
  from tfds_builders import dicom  # pylint: disable=g-import-not-at-top  (dicom imports common)
  return dicom.read_image(path, where, data=data) if dicom.is_dicom(data) else data


def read_image_file(path: str, where: str) -> bytes:
  """The encoded bytes of an image file: the file's own, or for a DICOM file its decoded
  pixels as PNG (`png_bytes`); DataError as `read_image`."""
  image = read_image(path, where)
  return png_bytes(image) if isinstance(image, Image.Image) else image


def png_bytes(image: Image.Image) -> bytes:
  """`image` as PNG, at the builds' compression level (`PNG_COMPRESS_LEVEL`)."""
  buffer = io.BytesIO()
  image.save(buffer, format='PNG', compress_level=PNG_COMPRESS_LEVEL)
  return buffer.getvalue()


# ----------------------------------------------------------------------------
# CheXpert-style labels (CheXpert, MIMIC-CXR-JPG) and examples from items.
# ----------------------------------------------------------------------------

_CHEXPERT_VALUES = {1.0: 1.0, 0.0: 0.0, -1.0: -1.0}


def parse_label(text: str, *, where: str, column: str) -> float:
  """One CheXpert-style label: 1.0, 0.0, -1.0, or NaN for a blank.

  `1`, `1.0`, `0`, `-1`, ... are accepted (any text that is a float equal to
  1, 0 or -1); surrounding blanks are ignored.

  Args:
    text: the CSV value.
    where: the file and line, for the error message.
    column: the column, for the error message.

  Raises:
    DataError: any other value (e.g. '2', 'yes', 'nan'); names `where` and
      `column`.
  """
  text = text.strip()
  if not text:
    return math.nan
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if value not in _CHEXPERT_VALUES:  # NaN is never in it.
    raise DataError(f'{where}: column {column!r} is {text!r}; expected 1.0 '
                    '(positive), 0.0 (negative), -1.0 (uncertain) or blank')
  return _CHEXPERT_VALUES[value]  # -0.0 becomes 0.0.


def parse_labels(row: Row, names: Sequence[str], where: str) -> np.ndarray:
  """The labels of `row` for columns `names`, as a float32 vector (see `parse_label`)."""
  return np.asarray([parse_label(row.get(name), where=where, column=name)
                     for name in names], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to store: its example key, file, referring row and features."""
  key: str
  path: str
  where: str
  split: str
  features: Mapping[str, Any]


def check_unique_keys(items: Iterable[Item]) -> None:
  """Raises DataError when two rows name the same image."""
  seen: dict[str, str] = {}
  for item in items:
    first = seen.setdefault(item.key, item.where)
    if first != item.where:
      raise DataError(f'image {item.key} is listed twice: {first} and {item.where}')


def generate_examples(items: Sequence[Item], store: ImageStore,
                      name: str) -> Iterator[tuple[str, dict]]:
  """Yields (key, example) for `items` (of one split), leaving out images `store` skips.

  Raises:
    DataError: from `store` for a bad image (unless skipped), or when every image
      of a split was skipped (TFDS cannot write an empty split).
  """
  split = items[0].split if items else ''
  for item, image in store.each(items, lambda item: store.try_load(item.path, where=item.where),
                                split=split, what=f'{name} {split}'):
    yield item.key, {'image': image, **item.features}


# ----------------------------------------------------------------------------
# Splits.
# ----------------------------------------------------------------------------


def hash_bucket(case_id: str) -> int:
  """`int(sha256(case_id).hexdigest(), 16) % 100`: a case's fixed bucket, 0-99."""
  return int(hashlib.sha256(case_id.encode('utf-8')).hexdigest(), 16) % 100


def hash_split(case_id: str, *, validation: int = 10, test: int = 10) -> str:
  """'train', 'validation' or 'test' from the case's hash bucket.

  Buckets `[0, 100 - validation - test)` are train, the next `validation`
  buckets validation, the last `test` buckets test; a case's split never
  depends on which other cases exist.
  """
  bucket = hash_bucket(case_id)
  if bucket < 100 - validation - test:
    return 'train'
  if bucket < 100 - test:
    return 'validation'
  return 'test'


def check_case_disjoint(assignments: Iterable[tuple[str, str, str]]) -> None:
  """Checks that no case is in two splits.

  Args:
    assignments: (case_id, split, where) triples; `where` says which file and
      row put the case there.

  Raises:
    DataError: naming the case, both splits and both rows.
  """
  first: dict[str, tuple[str, str]] = {}
  for case_id, split, where in assignments:
    seen = first.setdefault(case_id, (split, where))
    if seen[0] != split:
      raise DataError(f'case {case_id} is in two splits: {seen[0]} ({seen[1]}) and '
                      f'{split} ({where}); splits must be case-disjoint')


def with_progress(examples: Iterable[Any], *, total: int, what: str,
                  every_seconds: float = 10.0) -> Iterator[Any]:
  """Yields `examples`, logging `what: i/total (rate/s)` every `every_seconds`."""
  start = last = time.monotonic()
  count = 0
  for count, example in enumerate(examples, 1):
    yield example
    now = time.monotonic()
    if now - last >= every_seconds:
      last = now
      logging.info('%s: %d/%d examples (%.0f/s)', what, count, total,
                   count / max(now - start, 1e-9))
  logging.info('%s: %d examples in %.1f s', what, count, time.monotonic() - start)


# ----------------------------------------------------------------------------
# Small helpers.
# ----------------------------------------------------------------------------


def is_hidden(name: str) -> bool:
  """Hidden files and macOS archive folders, skipped when walking inputs."""
  return name.startswith('.') or name == '__MACOSX'


def one_line(exc: BaseException) -> str:
  """`Type: message` on one line."""
  text = ' '.join(str(exc).split())
  return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


def manual_dir_or_none(dl_manager: tfds.download.DownloadManager) -> str | None:
  """The manual dir given to the build, or None (then the builder downloads)."""
  try:
    manual_dir = dl_manager.manual_dir
  except AssertionError:  # TFDS: manual_dir not given, missing or empty.
    return None
  return None if manual_dir is None else os.fspath(manual_dir)


# Lossy formats: compression leaves small nonzero values along every edge of a mask.
LOSSY_FORMATS = ('JPEG', 'MPO')


def mask_foreground(image: Image.Image) -> np.ndarray:
  """bool [height, width]: the foreground of a decoded mask file, read from its own
  values (before any conversion that would scale them): the pixels nonzero in any colour
  band (alpha ignored; a palette image by its colours; 0/1, 16-bit and dark colours
  alike); in a JPEG, those of 128 or more, since compression leaves small values along
  the mask's edges."""
  lossy = image.format in LOSSY_FORMATS
  if image.mode == 'P':
    image = image.convert('RGBA')
  elif image.mode in ('CMYK', 'YCbCr', 'LAB', 'HSV'):
    image = image.convert('RGB')
  array = np.asarray(image)
  on = (lambda a: a >= 128) if lossy and array.dtype == np.uint8 else (lambda a: a != 0)
  if array.ndim == 2:
    return on(array)
  colour = [i for i, band in enumerate(image.getbands()) if band != 'A']
  return np.any(on(array[..., colour]), axis=-1)


class MaskSizeError(DataError):
  """A mask whose size is not its image's: an error even with `skip_bad_images`, which
  skips missing and undecodable files only (the pairing is wrong, not a file)."""


def load_mask_foreground(path: str, where: str, original_size: tuple[int, int], *,
                         what: str = 'mask') -> np.ndarray:
  """The foreground pixels (bool, height x width) of the mask file at `path`: those not 0
  in the file's own values (`mask_foreground`: 0/1, 16-bit, palette and colour masks
  alike).

  Args:
    path: the mask file.
    where: which image it belongs to, for error messages.
    original_size: the (width, height) of the image as published; the mask must have it.
    what: what the mask is, for error messages ('mask', 'manual annotation').

  Raises:
    DataError: the file cannot be read or decoded (names the file).
    MaskSizeError: its size differs from the published image's (names the file); never
      skipped, since the pairing is wrong, not the file.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as exc:
    raise DataError(f'{path}: cannot read {what} ({one_line(exc)}); {what} of '
                    f'{where}') from exc
  try:
    with Image.open(io.BytesIO(data)) as mask:
      mask.load()
      size, foreground = mask.size, mask_foreground(mask)
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
    raise DataError(f'{path}: cannot decode {what} ({one_line(exc)}); {what} of '
                    f'{where}') from exc
  if size != original_size:
    raise MaskSizeError(f'{path}: {what} is {size[0]}x{size[1]} but its image is '
                        f'{original_size[0]}x{original_size[1]} ({where})')
  return foreground


def encode_mask(foreground: np.ndarray, size: tuple[int, int]) -> bytes:
  """The stored form of a binary mask: 8-bit one-channel PNG bytes of 0 and 255, resized
  to `size` (width, height) with the nearest-neighbour filter, so that it stays binary."""
  mask = Image.fromarray(np.asarray(foreground, bool).astype(np.uint8) * 255, 'L')
  if mask.size != size:
    mask = mask.resize(size, Image.Resampling.NEAREST)
  buffer = io.BytesIO()
  mask.save(buffer, format='PNG')
  return buffer.getvalue()


def encoded_size(data: bytes) -> tuple[int, int]:
  """The (width, height) of encoded image bytes, from their header."""
  with Image.open(io.BytesIO(data)) as image:
    return image.size
