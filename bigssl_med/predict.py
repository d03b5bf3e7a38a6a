"""Predictions of a finished fine-tuning run's best model on new images.

    python -m bigssl_med.predict --workdir DIR --images FOLDER_OR_CSV --out predictions.csv \
        [--path_column path] [--image_root DIR] [--batch_size 64] \
        [--ten_crop | --no_ten_crop] [--skip_bad_images] [--num_threads 4]

DIR is the workdir of a finished `finetune`, `linear_eval` or `distill` run: its
`config.json` rebuilds the model (in float32), `results.json` gives the task and the
label names, and `best/` holds the weights of the model selected on validation.

`--images` is either

* a folder, searched recursively for `.jpg`, `.jpeg`, `.png`, `.bmp`, `.tif`, `.tiff`
  and DICOM `.dcm` files (any case; hidden files and folders are skipped), in sorted
  order, or
* a CSV (or tab-separated) file with a column of image paths, `path` or the one
  `--path_column` names; relative paths are relative to `--image_root` (by default the
  CSV's folder), absolute ones are used as they are, and every other column is copied
  to the output. Paths are read as `image_cases` reads its list: `~` is the home
  directory, `\\` separates folders as `/` does, and a file named only letter case
  aside (`a.jpg` for `A.JPG`) is read, with a warning.

A data set's own list can be read as it is published: CheXpert's `valid.csv` names
the column `Path`, and its paths (`CheXpert-v1.0-small/valid/patient64541/...`) are
relative to the folder that holds `CheXpert-v1.0-small`:

    python -m bigssl_med.predict --workdir DIR --out predictions.csv \
        --images ROOT/CheXpert-v1.0-small/valid.csv --path_column Path --image_root ROOT

Images are preprocessed as the run's test images were: made what the data set
stores (gray or RGB, the longest side at most its `max_side`, re-encoded where a
build re-encodes; results.json `stored_images`), then the evaluation view of
`bigssl_med.data.pipeline.eval_view`: the size of `eval_crop(data.image_size,
ten_crop)`, made as the run's `data.eval_resize` says (its config.json: SimCLR's
central square, or the whole image squashed to a square), and with ten-crop
the probabilities averaged over the four corners, the centre and their mirrors
(`bigssl_med.supervised.make_eval_step`). `--ten_crop` / `--no_ten_crop` override
the run's own `ten_crop` (its results.json), the default.

The output CSV has one row per image: `path` (the path as listed in the CSV's path
column, whatever that column's name, or the folder joined with the path found under
it), the CSV's other columns, one column per label with its probability (softmax for
a multi-class model, sigmoid for a multi-label one) and, for a multi-class model,
`predicted`, the most probable class. A CSV column with the name of one the output
adds (`path`, a label, `predicted`) is copied as `NAME (input)`: CheXpert's
`valid.csv` holds the radiologists' labels under the names of the probabilities a
CheXpert model gives, and both are kept, side by side. The output is written to a
temporary file and renamed, so an earlier output is replaced whole or not at all.

A missing or undecodable image is a one-line error naming the file (and the CSV
line); with `--skip_bad_images` such images are listed in a warning and left out.
Every other bad input (a workdir of an unfinished run or of another trainer, a
checkpoint that does not fit the config, a CSV without the path column, which the
error names with the columns the CSV has, `--image_root` with a folder) is also a
one-line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bigssl_med import checkpointing, cli, files, supervised
from bigssl_med.data import pipeline
from bigssl_med.errors import CheckpointError, ConfigError, DataError, UserError
from bigssl_med.trainers import finetune
from tfds_builders import common
from tfds_builders import dicom

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.bmp', '.tif', '.tiff',
                    '.webp', '.gif', '.dcm')
PATH_COLUMN = 'path'
PREDICTED_COLUMN = 'predicted'
DEFAULT_BATCH_SIZE = 64
_TASKS = ('multiclass', 'multilabel')


# ---------------------------------------------------------------------------- The run.


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run's best model and what its predictions mean."""
  workdir: str
  config: Any  # ml_collections.ConfigDict
  results: dict[str, Any]
  task: supervised.Task
  model: Any  # flax.linen.Module
  variables: Any
  image_size: int


def load_run(workdir: str) -> Run:
  """The best model of the finished fine-tuning run in `workdir`.

  Raises:
    ConfigError: `workdir` has no run config, is a run of another trainer, or its
      run has not finished (no results.json with test metrics, label_names, task).
    CheckpointError: `workdir/best` is missing or does not fit the model the config
      describes.
  """
  if not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} does not exist')
  workdir = checkpointing.absolute(workdir)  # orbax restores from absolute paths only
  config = finetune.read_run_config(workdir)
  if config.trainer == 'stages':
    evaluated = [name for name in config.get('order', ())
                 if config.stages[name].get('trainer') in finetune.TRAINER_NAMES]
    raise ConfigError(f'{workdir} holds several stages; pass the workdir of one that '
                      f'fine-tunes: {", ".join(os.path.join(workdir, n) for n in evaluated)}')
  if config.trainer not in finetune.TRAINER_NAMES:
    raise ConfigError(f'{workdir} is a workdir of the {config.trainer!r} trainer; predictions '
                      f'need a run of {", ".join(finetune.TRAINER_NAMES)}')
  path = os.path.join(workdir, 'results.json')
  try:
    with open(path) as f:
      results = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f'{path} not found: the run in {workdir} has not finished') from None
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path}: cannot be read as JSON ({e})') from None
  if not isinstance(results, dict) or results.get('test') is None:
    raise ConfigError(f'{path}: no test metrics: the run in {workdir} has not finished')
  names = results.get('label_names')
  if (not isinstance(names, list) or not names
      or not all(isinstance(n, str) and n for n in names)):
    raise ConfigError(f"{path}: key 'label_names' must be a non-empty list of names, "
                      f'got {names!r}')
  if len(set(names)) != len(names):
    raise ConfigError(f"{path}: key 'label_names' repeats a name: {names}")
  kind = results.get('task')
  if kind not in _TASKS:
    raise ConfigError(f"{path}: key 'task' must be one of {', '.join(_TASKS)}, got {kind!r}")
  task = supervised.Task(kind, len(names), tuple(names))
  size = int(config.data.image_size)
  model = finetune.build_model(config, len(names), dtype=jnp.float32)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  best = os.path.join(workdir, 'best')
  if not os.path.isdir(best):
    raise CheckpointError(f'{best} does not exist: the run in {workdir} saved no best model')
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      _check_fits(best, checkpointer.metadata(best), abstract)
      with checkpointing.quiet_failed_reads():
        variables = checkpointer.restore(best, abstract)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (orbax raises bare Exceptions too)
    raise CheckpointError(f'{best}: cannot restore the model its config.json describes '
                          f'({checkpointing.first_line(e)})') from e
  return Run(workdir=workdir, config=config, results=results, task=task, model=model,
             variables=variables, image_size=size)


def _check_fits(best: str, metadata: Any, abstract: Any) -> None:
  """Compares the arrays a checkpoint holds with those of the model, before restoring.

  Raises:
    CheckpointError: naming `best` and the first array missing, unexpected or of
      another shape.
  """
  def shapes(tree):
    return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path):
            tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(leaf, 'shape')}

  stored = shapes(getattr(metadata, 'item_metadata', metadata))
  if not stored:
    raise CheckpointError(f'{best}: holds no arrays (an incomplete checkpoint, or not one '
                          'of orbax)')
  wanted = shapes(abstract)
  problems = [f'{k} has shape {stored[k]}, the model {wanted[k]}' for k in sorted(wanted)
              if k in stored and stored[k] != wanted[k]]
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  if missing:
    problems.append(f'{len(missing)} array(s) of the model missing, e.g. {missing[0]}')
  if unexpected:
    problems.append(f'{len(unexpected)} array(s) not in the model, e.g. {unexpected[0]}')
  if problems:
    more = f'; {len(problems) - 1} more' if len(problems) > 1 else ''
    raise CheckpointError(f'{best}: does not fit the model its config.json describes '
                          f'({problems[0]}{more})')


# ----------------------------------------------------------------------------- Images.


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to predict: its path as listed, the file, and where it was listed."""
  path: str
  file: str
  where: str = ''  # `CSV line N`, or '' for a file found in a folder
  columns: tuple[tuple[str, str], ...] = ()  # the CSV's other columns


def list_images(images: str, path_column: str = PATH_COLUMN,
                image_root: str | None = None) -> tuple[list[Item], list[str]]:
  """The images of a folder or CSV, and the CSV's other column names (none for a folder).

  Args:
    images: a folder, or a CSV (or tab-separated) file.
    path_column: the CSV's column of image paths.
    image_root: the folder relative paths in the CSV are relative to; None: the
      CSV's folder.

  Raises:
    DataError: `images` does not exist or holds no image, is a CSV without
      `path_column` (naming the file and the columns it has) or with an empty path
      (naming the line), or is a folder while `image_root` or another `path_column`
      is given; `image_root` is not a folder.
  """
  if os.path.isdir(images):
    for flag, value, default in (('--image_root', image_root, None),
                                 ('--path_column', path_column, PATH_COLUMN)):
      if value != default:
        raise DataError(f'{flag} applies to a CSV of images; --images {images} is a folder')
    return _folder_images(images), []
  if not os.path.isfile(images):
    raise DataError(f'--images {images} does not exist')
  if image_root is not None and not os.path.isdir(image_root):
    raise DataError(f'--image_root {image_root} is not a folder')
  return _csv_images(images, path_column,
                     os.path.dirname(images) if image_root is None else image_root)


def _folder_images(folder: str) -> list[Item]:
  found, passed_over = [], collections.Counter()
  for root, subdirs, names in files.walk(folder):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    for name in names:
      if name.startswith('.'):
        continue
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), folder))
      else:
        passed_over[os.path.splitext(name)[1].lower() or '(no extension)'] += 1
  if passed_over:
    logging.warning('%s: %d file(s) passed over, not named as images (%s); list them in a '
                    'CSV to score them', folder, sum(passed_over.values()),
                    ', '.join(f'{n} {ext}' for ext, n in sorted(passed_over.items())))
  if not found:
    raise DataError(f'{folder}: no image files ({", ".join(IMAGE_EXTENSIONS)}) in it or '
                    'its subfolders')
  paths = [os.path.join(folder, rel) for rel in sorted(found)]
  return [Item(path=p, file=p) for p in paths]


def _csv_images(path: str, path_column: str, base: str) -> tuple[list[Item], list[str]]:
  try:
    columns, rows = common.read_table(path, (path_column,))
  except DataError as e:
    if not str(e).startswith(f'{path}: missing column(s) '):
      raise
    raise DataError(f'{e}; --path_column names the column of image paths') from None
  extra = [c for c in dict.fromkeys(columns) if c and c != path_column]
  items, finder, other_case = [], common.CaseBlindFinder(), []
  for row in rows:
    value = row.get(path_column)
    if not value:
      raise DataError(f'{row.where(path)}: empty {path_column}')
    values = row.values
    listed = common.listed_file(value, base, row.where(path))
    file = finder.find(listed)
    if file != listed:
      other_case.append((row.where(path), file))
    items.append(Item(path=value, file=file, where=row.where(path),
                      columns=tuple((c, values.get(c, '')) for c in extra)))
  if not items:
    raise DataError(f'{path}: no rows after the header')
  common.warn_found_ignoring_case(other_case, 'predict', path)
  return items, extra


def load_image(item: Item, side: int, proportion: float,
               stored: dict[str, Any] | None = None, resize: str = 'square') -> np.ndarray:
  """The uint8 `[side, side, 3]` evaluation view of `item`'s file.

  `side`, `proportion` and `resize` (config.data.eval_resize) as
  `bigssl_med.data.pipeline.eval_view` takes them.

  `stored` (results.json `stored_images`): the file is first made the bytes the data
  set would store for it (`tfds_builders.common.encode_image`: `channels`, gray or
  RGB, at a longest side of at most `max_side`, and re-encoded where a build
  re-encodes), so its pixels are those the run's test images had.

  Raises:
    DataError: naming the file (and the CSV line) when it is missing or undecodable.
  """
  prefix = f'{item.where}: ' if item.where else ''
  try:
    with open(item.file, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'{prefix}cannot read image {item.file}: {e.strerror or e}') from None
  try:
    if dicom.is_dicom(data):  # its pixels (decoded), as an image_cases build takes them
      data = dicom.read_image(item.file, 'image to score', data=data)
    if stored:
      data = common.encode_image(data, name=item.file, max_side=stored.get('max_side'),
                                 channels=stored.get('channels'))
    return pipeline.eval_view(data, side, proportion, resize, channels=3, name=item.file)
  except DataError as e:
    raise DataError(f'{prefix}{e}') from None


# -------------------------------------------------------------------------- Predicting.


def predict(run: Run, items: Sequence[Item], *, ten_crop: bool | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE, skip_bad_images: bool = False,
            num_threads: int = 4) -> tuple[list[Item], np.ndarray]:
  """Probabilities `[N, labels]` of the images that could be read, and those images.

  Args:
    run: from `load_run`.
    items: from `list_images`.
    ten_crop: ten-crop test-time augmentation; None: as the run was tested.
    batch_size: images per step (the last batch is padded).
    skip_bad_images: leave out (with a warning) missing or undecodable images instead
      of raising.
    num_threads: threads decoding images.

  Raises:
    DataError: a bad image (without `skip_bad_images`), or no image could be read.
  """
  if batch_size < 1:
    raise ConfigError(f'--batch_size must be positive, got {batch_size}')
  if ten_crop is None:
    ten_crop = bool(run.results.get('ten_crop', False))
  side, proportion = pipeline.eval_crop(run.image_size, ten_crop)
  resize = pipeline.check_eval_resize(run.config.data.eval_resize)
  step = jax.jit(supervised.make_eval_step(run.model, run.task,
                                           ten_crop_size=run.image_size if ten_crop else 0))

  stored = run.results.get('stored_images')  # absent in results of earlier versions

  def load(item):
    try:
      return load_image(item, side, proportion, stored, resize)
    except DataError as e:
      if not skip_bad_images:
        raise
      return str(e)

  kept, bad, outputs = [], [], []
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for start in range(0, len(items), batch_size):
      chunk = items[start:start + batch_size]
      images = []
      for item, image in zip(chunk, pool.map(load, chunk)):
        if isinstance(image, str):
          bad.append(image)
        else:
          kept.append(item)
          images.append(image)
      if not images:
        continue
      batch = np.zeros((batch_size, side, side, 3), np.uint8)
      batch[:len(images)] = np.stack(images)
      logits = np.asarray(step(run.variables, {'image': batch}), np.float64)
      outputs.append(logits[:len(images)])
  if bad:
    logging.warning('Left out %d of %d images that cannot be read: %s', len(bad),
                    len(items), '; '.join(bad))
  if not kept:
    raise DataError(f'none of the {len(items)} images could be read')
  logits = np.concatenate(outputs)
  if run.task.kind == 'multiclass':
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return kept, shifted / shifted.sum(axis=1, keepdims=True)
  return kept, 1.0 / (1.0 + np.exp(-logits))


# The suffix of an input column copied under another name (`output_columns`).
INPUT_SUFFIX = ' (input)'


def output_columns(task: supervised.Task, columns: Sequence[str]) -> list[str]:
  """The output CSV's header: path, the input CSV's `columns`, labels, `predicted`.

  An input column with the name of one the output adds (`path`, a label, `predicted`)
  is copied as `NAME (input)`.

  Args:
    task: the run's task (its label names).
    columns: the input CSV's columns other than its path column.

  Raises:
    DataError: an input column has the name another one takes (`NAME (input)` beside
      `NAME`, where NAME is an output column).
  """
  added = list(task.names) + ([PREDICTED_COLUMN] if task.kind == 'multiclass' else [])
  taken = {PATH_COLUMN, *added}
  copied = [f'{c}{INPUT_SUFFIX}' if c in taken else c for c in columns]
  twice = sorted({c for c in copied if copied.count(c) > 1})
  if twice:
    raise DataError(f'the --images CSV has column(s) {", ".join(twice)} beside columns '
                    f'copied under that name (a column named like an output column is '
                    f'copied as NAME{INPUT_SUFFIX}); rename them')
  return [PATH_COLUMN, *copied, *added]


def write_predictions(path: str, run: Run, items: Sequence[Item], columns: Sequence[str],
                      probabilities: np.ndarray) -> None:
  """Writes the output CSV through a temporary file in its folder and a rename.

  Raises:
    DataError: two input columns would be copied under one name (`output_columns`), or
      `path` cannot be written.
  """
  header = output_columns(run.task, columns)
  names = run.task.names
  try:
    with files.written_whole(path) as tmp, open(tmp, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(header)
      for item, p in zip(items, probabilities):
        row = [item.path, *(value for _, value in item.columns),
               *(format(float(v), '.8g') for v in p)]
        if run.task.kind == 'multiclass':
          row.append(names[int(np.argmax(p))])
        writer.writerow(row)
  except OSError as e:
    raise DataError(f'{path}: cannot be written ({e.strerror or e})') from None


# ------------------------------------------------------------------------------- CLI.


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status."""
  parser = argparse.ArgumentParser(
      prog='python -m bigssl_med.predict',
      description="Probabilities of a finished fine-tuning run's best model on a folder "
                  'or CSV of images.')
  parser.add_argument('--workdir', required=True,
                      help='workdir of a finished finetune, linear_eval or distill run')
  parser.add_argument('--images', required=True,
                      help='folder searched recursively for images, or a CSV with a column '
                           'of image paths (other columns are copied)')
  parser.add_argument('--path_column', default=PATH_COLUMN,
                      help=f"the CSV's column of image paths (default: {PATH_COLUMN}); the "
                           f'output names it {PATH_COLUMN}')
  parser.add_argument('--image_root',
                      help="folder the CSV's relative paths are relative to (default: the "
                           "CSV's folder)")
  parser.add_argument('--out', required=True, help='CSV of predictions to write')
  parser.add_argument('--batch_size', type=int, default=DEFAULT_BATCH_SIZE,
                      help=f'images per step (default: {DEFAULT_BATCH_SIZE})')
  parser.add_argument('--ten_crop', dest='ten_crop', action='store_true',
                      help='ten-crop test-time augmentation (default: as the run was '
                           'tested, its results.json ten_crop)')
  parser.add_argument('--no_ten_crop', dest='ten_crop', action='store_false',
                      help='a single centre crop, whatever the run was tested with')
  parser.set_defaults(ten_crop=None)
  parser.add_argument('--skip_bad_images', action='store_true',
                      help='leave out missing or undecodable images, with a warning, '
                           'instead of failing')
  parser.add_argument('--num_threads', type=int, default=4,
                      help='threads decoding images (default: 4)')
  args = parser.parse_args(argv)
  cli.log_info_to_stderr()
  try:
    if os.path.isfile(args.images) and os.path.exists(args.out) and os.path.samefile(
        args.images, args.out):
      raise UserError(f'--out {args.out} is the --images list itself: write the '
                      'predictions to another file')
    items, columns = list_images(args.images, args.path_column, args.image_root)
    run = load_run(args.workdir)
    header = output_columns(run.task, columns)  # a clash fails before the images are read
    renamed = [c for c, copied in zip(columns, header[1:]) if c != copied]
    if renamed:
      logging.info('Input column(s) %s named like output columns: copied as NAME%s.',
                   ', '.join(renamed), INPUT_SUFFIX)
    kept, probabilities = predict(run, items, ten_crop=args.ten_crop,
                                  batch_size=args.batch_size,
                                  skip_bad_images=args.skip_bad_images,
                                  num_threads=args.num_threads)
    write_predictions(args.out, run, kept, columns, probabilities)
  except UserError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  print(f'{args.out}: {len(kept)} images')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main))
