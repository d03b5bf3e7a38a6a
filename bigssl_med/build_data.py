r"""Builds one of the project's TFDS data sets through TFDS's Python API.

Usage:

  python -m bigssl_med.build_data NAME[/CONFIG] --manual_dir=DIR --data_dir=DIR \
      [--max_side=N] [--skip_bad_images] [--overwrite] [--num_threads=N]

NAME is a key of `tfds_builders.BUILDERS` (e.g. `ham10000`); CONFIG one of its
builder configs: `original` or `side<N>` (the longest side images are stored at;
`--max_side=N` picks `side<N>`) for the builders of files, `<subset>_<size>` for
`medmnist` (e.g. `medmnist/pneumoniamnist_28`), and for `image_cases` any name
the user gives the collection. Without --manual_dir, a builder
that can download its data does so. The data set is written under
`DATA_DIR/NAME/CONFIG/VERSION/` (array_record files), together with
`case_index.json` (see `bigssl_med.data.sources`). Neither TensorFlow nor
apache-beam is needed.

A build is staged in a temporary directory inside DATA_DIR and moved into place only
once complete, so a failed build (or a failed --overwrite rebuild) never touches an
earlier complete build. Without --overwrite, an existing complete build is kept, and
one found damaged (a shard missing or truncated, an unreadable dataset_info.json) is a
one-line error that names the file and says to rebuild with --overwrite. A
build killed outright leaves nothing that counts: its staging directory (locked while
the build runs) is removed by the next build of that data set, and an earlier build
set aside by a rebuild killed before the new one took its place is put back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Sequence

from absl import logging
import tensorflow_datasets as tfds

from bigssl_med import cli
from bigssl_med import files
from bigssl_med import staging as staging_lib
from bigssl_med.data import sources
from bigssl_med.errors import DamagedBuild, DataError
import tfds_builders
from tfds_builders import common


def build(name: str, *, data_dir: str, manual_dir: str | None = None,
          overwrite: bool = False, max_side: int | None = None,
          skip_bad_images: bool = False, num_threads: int | None = None) -> str:
  """Builds data set `name` into `data_dir` unless it is already built.

  Args:
    name: `NAME` or `NAME/CONFIG`, NAME a key of `tfds_builders.BUILDERS`
      (e.g. `chexpert/side320`; without CONFIG the builder's default config, or
      `side<max_side>` when `max_side` is given).
    data_dir: the TFDS data dir (created if missing).
    manual_dir: directory with the raw files as their owners publish them; None
      lets the builder download them where it can.
    overwrite: rebuild even when a complete build exists; the earlier build is
      replaced only after the new one has been built completely.
    max_side: store images with this longest side (antialiased downscaling).
    skip_bad_images: skip, count and list (in the data set's `metadata.json`)
      images that are missing or cannot be decoded instead of failing.
    num_threads: threads that decode, resize and encode images (None: one per
      core); the data set does not depend on it.

  Returns:
    The built data set's version directory, `data_dir/NAME/CONFIG/VERSION`.

  Raises:
    DataError: unknown name or config, bad manual_dir, or bad raw data (one line);
      `DamagedBuild` for an earlier build with a file missing or damaged, which only
      `overwrite` replaces.
  """
  base, config_name = sources.split_name(name)
  builder_cls = tfds_builders.BUILDERS.get(base)
  if builder_cls is None:
    raise DataError(f'unknown data set {base!r}; known: '
                    f'{", ".join(sorted(tfds_builders.BUILDERS))}')
  data_dir = os.path.abspath(os.fspath(data_dir))
  if manual_dir:  # None or '' (an unset config value): download if possible.
    manual_dir = _check_manual_dir(os.path.abspath(os.fspath(manual_dir)))
  else:
    manual_dir = None
  config = builder_cls.make_config(config_name, max_side=max_side,
                                   manual_dir=manual_dir)
  full_name = f'{base}/{config.name}'
  version_dir = sources.version_dir_of(full_name, data_dir)
  try:
    staging_lib.remove_dead(data_dir, f'.build-{base}-', 'a build')
    sources.restore_set_aside_build(version_dir)
    if sources.has_info(version_dir) and not overwrite:
      sources.check_build(version_dir, full_name, data_dir)
      _check_unchanged(builder_cls, version_dir, manual_dir)
      if not sources.index_is_current(version_dir):
        logging.info('Writing %s of %s (it lacks the features this version indexes).',
                     sources.CASE_INDEX_FILE, full_name)
        sources.write_case_index(version_dir)
      logging.info('%s is already built in %s (--overwrite rebuilds it).',
                   full_name, version_dir)
      return version_dir
    os.makedirs(data_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.build-{base}-', dir=data_dir)
  except OSError as exc:
    raise DataError(f'data_dir {data_dir}: {common.one_line(exc)}') from exc
  lock = staging_lib.hold(staging)
  try:
    builder = builder_cls(data_dir=staging, config=config,
                          file_format='array_record',
                          skip_bad_images=skip_bad_images, num_threads=num_threads)
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, 'downloads'),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    built_dir = os.fspath(builder.data_dir)
    sources.write_case_index(built_dir)
    files.sync_tree(built_dir)  # on disk before it takes an earlier build's place
    if not _move_into_place(built_dir, version_dir, overwrite=overwrite):
      logging.info('%s was built in %s by another build meanwhile; keeping it '
                   '(--overwrite replaces it).', full_name, version_dir)
      return version_dir
  except DataError:
    raise
  except (OSError, RuntimeError, ValueError) as exc:
    # TFDS's writers report a full disk as a RuntimeError, tensorstore's as a ValueError.
    reason = files.write_failure(exc)
    if reason is None and not isinstance(exc, OSError):
      raise
    detail = common.one_line(exc) if isinstance(exc, OSError) else reason
    earlier = ('an earlier complete build is kept' if sources.has_info(version_dir)
               else 'its partial files are removed')
    raise DataError(f'building {full_name} in {data_dir}: {detail}; {earlier}') from exc
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if lock is not None:
      lock.close()
  logging.info('Built %s in %s', full_name, version_dir)
  skipped = (builder.info.metadata or {}).get('num_skipped_images')
  if skipped:
    logging.warning('%s: %d image(s) skipped as missing or undecodable; %s lists each '
                    '(metadata skipped_images)', full_name, skipped,
                    os.path.join(version_dir, 'metadata.json'))
  return version_dir


def default_data_dir() -> str:
  """TFDS's default data dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def ensure_built(name: str, *, data_dir: str = '', manual_dir: str | None = None,
                 build_if_missing: bool = False,
                 manual_dir_key: str = 'config.data.manual_dir') -> str:
  """Returns the data dir once data set `name` is built there.

  With several hosts, process 0 builds while the others wait, then all check. The log
  line and errors about a missing data set name the configs of its builder that are
  built in the data dir (`sources.built_configs`).

  Args:
    name: the data set.
    data_dir: the TFDS data dir ('' for TFDS's default).
    manual_dir: raw files for `build` (None: the builder downloads if it can).
    build_if_missing: build the data set when it is missing; otherwise a missing
      data set is an error that gives the build command.
    manual_dir_key: what the caller calls `manual_dir`, for the error of a builder
      that cannot download (`DOWNLOADS` False) given none.

  Raises:
    DataError: not built and `build_if_missing` is False, or not built and its
      builder needs a manual_dir that was not given, or the build failed;
      `DamagedBuild` for a build with a file missing or damaged (never rebuilt here).
  """
  import jax  # pylint: disable=g-import-not-at-top  (the CLI itself needs no JAX)
  data_dir = os.fspath(data_dir) or default_data_dir()
  try:
    version_dir = sources.find_version_dir(name, data_dir)
  except DamagedBuild:
    raise
  except DataError:
    if not build_if_missing:
      raise
    if sources.split_name(name)[0] not in tfds_builders.BUILDERS:
      raise DataError(f'data set {name!r} is not built in {data_dir} and is not one of this '
                      f'project\'s builders ({", ".join(sorted(tfds_builders.BUILDERS))}): build '
                      'it with TFDS in the array_record format (tfds build NAME '
                      '--file_format=array_record --data_dir=...)') from None
  else:
    _check_unchanged(tfds_builders.BUILDERS.get(sources.split_name(name)[0]), version_dir,
                     manual_dir)
    return data_dir
  base = sources.split_name(name)[0]
  if not manual_dir and not tfds_builders.BUILDERS[base].DOWNLOADS:
    raise DataError(f'data set {name} is not built in {data_dir} and {base} cannot be '
                    f'downloaded: it needs {manual_dir_key} (its raw files)'
                    f'{sources.built_here(name, data_dir, "; ")}')
  source = manual_dir or 'its public download'
  built = sources.built_here(name, data_dir, ' (')
  built += ')' if built else ''
  if jax.process_count() == 1:
    logging.info('%s is not built in %s: building it from %s%s.', name, data_dir, source,
                 built)
    build(name, data_dir=data_dir, manual_dir=manual_dir)
    return data_dir
  # Process 0 builds; the others wait, then learn whether it succeeded.
  from bigssl_med import parallel  # pylint: disable=g-import-not-at-top
  failure = None
  if jax.process_index() == 0:
    logging.info('%s is not built in %s: building it from %s%s (the other hosts wait).', name,
                 data_dir, source, built)
    try:
      build(name, data_dir=data_dir, manual_dir=manual_dir)
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, on every host)
      failure = e
  if parallel.primary_value(failure is not None):
    if failure is not None:
      raise failure
    raise DataError(f'data set {name!r}: process 0 failed to build it in {data_dir} (its '
                    'log has the error)')
  sources.find_version_dir(name, data_dir)
  return data_dir


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status."""
  parser = argparse.ArgumentParser(
      prog='python -m bigssl_med.build_data',
      description='Build a bigssl_med TFDS data set (no TensorFlow needed).')
  parser.add_argument('name', help='data set to build: NAME or NAME/CONFIG, NAME one '
                      f'of {", ".join(sorted(tfds_builders.BUILDERS))}')
  parser.add_argument('--manual_dir', default=None,
                      help='directory with the raw files; omit to download '
                           'where the builder supports it')
  parser.add_argument('--data_dir', required=True,
                      help='TFDS data dir to write the data set into')
  parser.add_argument('--overwrite', action='store_true',
                      help='rebuild even if a complete build exists')
  parser.add_argument('--max_side', type=int, default=None,
                      help='store images with this longest side (antialiased '
                           'downscaling; config side<N>)')
  parser.add_argument('--skip_bad_images', action='store_true',
                      help='skip missing or undecodable images (counted and '
                           'listed in metadata.json) instead of failing')
  parser.add_argument('--num_threads', type=int, default=None,
                      help='threads that decode, resize and encode images (default: one '
                           'per core); the data set does not depend on it')
  args = parser.parse_args(argv)
  cli.log_info_to_stderr()
  logging.set_verbosity(logging.INFO)
  try:
    path = build(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
                 overwrite=args.overwrite, max_side=args.max_side,
                 skip_bad_images=args.skip_bad_images, num_threads=args.num_threads)
  except DataError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'error: interrupted; {args.name} was not built (an earlier complete build is '
          'kept)', file=sys.stderr)
    return 130
  print(path)
  return 0


def _check_manual_dir(manual_dir: str) -> str:
  if not os.path.exists(manual_dir):
    raise DataError(f'manual_dir {manual_dir} does not exist')
  if not os.path.isdir(manual_dir):
    raise DataError(f'manual_dir {manual_dir} is not a directory')
  if not os.listdir(manual_dir):
    raise DataError(f'manual_dir {manual_dir} is empty')
  return manual_dir


def _check_unchanged(builder_cls, version_dir: str, manual_dir: str | None) -> None:
  """The builder's check that a build matches its raw files (a project builder's,
  given the raw files)."""
  if builder_cls is not None and manual_dir:
    builder_cls.check_unchanged(version_dir, manual_dir)


def _move_into_place(built_dir: str, version_dir: str, *, overwrite: bool) -> bool:
  """Renames `built_dir` to `version_dir`, replacing any earlier build last.

  Builds of the same data set take turns here (a lock on the folder holding
  `version_dir`, as `sources.restore_set_aside_build` takes). Returns
  False, leaving `built_dir` where it is, when a complete build is in place and
  `overwrite` is off: another build finished first.
  """
  os.makedirs(os.path.dirname(version_dir), exist_ok=True)
  with staging_lib.exclusive(os.path.dirname(version_dir)):
    sources.restore_set_aside_build(version_dir, lock=False)
    if not overwrite and sources.is_complete_build(version_dir):
      return False
    old = sources.set_aside_path(version_dir)
    shutil.rmtree(old, ignore_errors=True)  # left by a rebuild killed after its swap
    if os.path.exists(version_dir):
      os.rename(version_dir, old)
    try:
      os.rename(built_dir, version_dir)
    except BaseException:
      if os.path.exists(old):
        os.rename(old, version_dir)
      raise
    shutil.rmtree(old, ignore_errors=True)
  return True


if __name__ == '__main__':
  sys.exit(cli.run(main))
