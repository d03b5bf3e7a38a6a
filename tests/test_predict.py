"""`python -m bigssl_med.predict` on a tiny fine-tuned workdir: agreement with the run, errors."""

import csv
import dataclasses
import io
import json
import logging
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest

from bigssl_med import build_data, predict, supervised
from bigssl_med.data import host_ops, sources
from bigssl_med.errors import CheckpointError, ConfigError, DataError
from bigssl_med.trainers import finetune
from test_finetune import _write_colour_cases, tiny_config
from tfds_builders import common


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, raw folder with cases.csv and images/, test image paths in record order)."""
  root = tmp_path_factory.mktemp('predict')
  raw = _write_colour_cases(root / 'raw')
  build_data.build('image_cases/colours', data_dir=os.fspath(root / 'data'),
                   manual_dir=os.fspath(raw))
  workdir = root / 'work'
  config = tiny_config(root / 'data', total_steps=40, eval_every_steps=20)
  finetune.train_and_evaluate(config, os.fspath(workdir))
  source = sources.open_split('image_cases/colours', 'test', os.fspath(root / 'data'))
  test_paths = [source[i]['image_id'].decode() for i in range(len(source))]
  return workdir, raw, test_paths


def _read(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _scores(rows, names=('green', 'red')):
  return np.array([[float(row[n]) for n in names] for row in rows])


def _write_csv(path, header, rows):
  path.write_text('\n'.join([','.join(header)] + [','.join(r) for r in rows]) + '\n')
  return path


def test_csv_predictions_match_the_runs_test_predictions(run, tmp_path, capsys):
  workdir, raw, test_paths = run
  listing = _write_csv(raw / 'test_list.csv', ['note', 'path'],
                       [[f'n{i}', p] for i, p in enumerate(test_paths)])
  out = tmp_path / 'out' / 'predictions.csv'
  assert predict.main(['--workdir', str(workdir), '--images', str(listing), '--out', str(out),
                       '--batch_size', '5']) == 0
  assert capsys.readouterr().out.strip() == f'{out}: 16 images'
  rows = _read(out)
  assert list(rows[0]) == ['path', 'note', 'green', 'red', 'predicted']
  assert [r['path'] for r in rows] == test_paths
  assert [r['note'] for r in rows] == [f'n{i}' for i in range(16)]
  saved = np.load(workdir / 'test_predictions.npz')
  np.testing.assert_allclose(_scores(rows), saved['scores'], atol=1e-4)
  assert [r['predicted'] for r in rows] == [['green', 'red'][k]
                                           for k in saved['scores'].argmax(1)]
  assert not [p for p in os.listdir(out.parent) if p != 'predictions.csv']  # no temporary file
  mask = os.umask(0o022)
  os.umask(mask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask  # as any new file, not private


def test_folder_input_is_recursive_sorted_and_skips_hidden_and_other_files(run, tmp_path,
                                                                          caplog):
  workdir, raw, test_paths = run
  folder = tmp_path / 'images'
  for i, path in enumerate(test_paths[:6]):
    target = folder / ('sub' if i % 2 else 'top') / f'{i}.PNG'
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(raw / path, target)
  with Image.open(raw / test_paths[6]) as image:  # WebP, lossless: the same pixels,
    image.save(folder / 'top' / '6.webp', lossless=True)  # which a build stores as JPEG
  (folder / 'notes.txt').write_text('not an image')
  (folder / '.hidden.png').write_bytes(b'not an image either')
  (folder / '.cache').mkdir()
  shutil.copy(raw / test_paths[0], folder / '.cache' / 'x.png')
  out = tmp_path / 'p.csv'
  with caplog.at_level(logging.WARNING):
    assert predict.main(['--workdir', str(workdir), '--images', str(folder), '--out',
                         str(out)]) == 0
  assert '1 file(s) passed over, not named as images (1 .txt)' in caplog.text
  rows = _read(out)
  names = [f'{"sub" if i % 2 else "top"}/{i}.PNG' for i in range(6)] + ['top/6.webp']
  expected = sorted(names)
  assert [r['path'] for r in rows] == [os.path.join(str(folder), p) for p in expected]
  saved = np.load(workdir / 'test_predictions.npz')['scores']
  by_name = {name: saved[i] for i, name in enumerate(names)}
  got = dict(zip(expected, _scores(rows)))
  webp = got.pop('top/6.webp')
  np.testing.assert_allclose(list(got.values()), [by_name[p] for p in got], atol=1e-4)
  # The WebP is scored as a build would store it, re-encoded as JPEG (quality 95).
  np.testing.assert_allclose(webp, by_name['top/6.webp'], atol=0.02)
  item = predict.Item(path='', file=os.fspath(folder / 'top' / '6.webp'), where='', columns=())
  with open(folder / 'top' / '6.webp', 'rb') as f:
    stored = Image.open(io.BytesIO(common.encode_image(f.read(), name='6.webp')))
  assert stored.format == 'JPEG'
  np.testing.assert_array_equal(
      predict.load_image(item, 16, 0.875, {'max_side': None, 'channels': 3}),
      host_ops.center_crop(stored, 16, 0.875, channels=3))


def test_ten_crop_changes_the_preprocessing_but_still_classifies(run, tmp_path):
  workdir, raw, test_paths = run
  loaded = predict.load_run(str(workdir))
  assert loaded.results['ten_crop'] is False
  items = [predict.Item(path=p, file=str(raw / p)) for p in test_paths]
  _, single = predict.predict(loaded, items)
  _, ten = predict.predict(loaded, items, ten_crop=True, batch_size=7)
  # The flags: --ten_crop overrides the run's single crop, --no_ten_crop keeps it.
  listing = _write_csv(tmp_path / 'list.csv', ['path'], [[str(raw / p)] for p in test_paths])
  for flag, expected in (('--ten_crop', ten), ('--no_ten_crop', single)):
    out = tmp_path / f'{flag}.csv'
    assert predict.main(['--workdir', str(workdir), '--images', str(listing), '--out',
                         str(out), flag]) == 0
    np.testing.assert_allclose(_scores(_read(out)), expected, atol=1e-6)
  labels = np.load(workdir / 'test_predictions.npz')['labels']
  assert ten.shape == (16, 2)
  np.testing.assert_allclose(ten.sum(1), 1.0, rtol=1e-6)
  assert np.abs(ten - single).max() > 1e-3
  assert np.mean(ten.argmax(1) == labels) >= 0.8


def test_a_squash_run_is_predicted_with_the_whole_image_squashed(run, tmp_path):
  """`data.eval_resize='squash'` in a run's config.json: predict resizes the whole image
  to 18 x 18 (16 / 0.875), bilinear, and scores its central 16 (or its ten crops)."""
  workdir, _, _ = run
  copy = tmp_path / 'squash'
  shutil.copytree(workdir, copy)
  config = json.loads((copy / 'config.json').read_text())
  assert config['data']['eval_resize'] == 'square'
  config['data']['eval_resize'] = 'squash'
  (copy / 'config.json').write_text(json.dumps(config))
  square, squash = predict.load_run(str(workdir)), predict.load_run(str(copy))
  pixels = np.zeros((20, 34, 3), np.uint8)  # wide: a green left, a red right half
  pixels[:, :17, 1], pixels[:, 17:, 0] = 200, 230
  pixels += np.random.default_rng(0).integers(0, 25, pixels.shape).astype(np.uint8)
  path = tmp_path / 'wide.png'
  Image.fromarray(pixels).save(path)
  squashed = np.asarray(Image.fromarray(pixels).resize((18, 18), Image.Resampling.BILINEAR))
  item = predict.Item(path='wide.png', file=os.fspath(path))
  stored = squash.results['stored_images']
  np.testing.assert_array_equal(predict.load_image(item, 16, 0.875, stored, 'squash'),
                                squashed[1:17, 1:17])
  for ten_crop, view in ((False, squashed[1:17, 1:17]), (True, squashed)):
    step = supervised.make_eval_step(squash.model, squash.task, 16 if ten_crop else 0)
    logits = np.asarray(step(squash.variables, {'image': view[None]}), np.float64)
    want = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    _, got = predict.predict(squash, [item], ten_crop=ten_crop)
    np.testing.assert_allclose(got, want, atol=1e-6)
    _, other = predict.predict(square, [item], ten_crop=ten_crop)  # the same weights
    assert np.abs(other - got).max() > 1e-4


def test_a_squash_run_tests_as_predict_predicts(run, tmp_path):
  """The trainer's test views follow data.eval_resize as predict's do (ten-crop here)."""
  _, raw, test_paths = run
  data_dir = tmp_path / 'data'
  build_data.build('image_cases/colours', data_dir=os.fspath(data_dir),
                   manual_dir=os.fspath(raw))
  workdir = tmp_path / 'work'
  config = tiny_config(data_dir, total_steps=4, eval_every_steps=0,
                       **{'data.eval_resize': 'squash', 'data.test_ten_crop': True})
  finetune.train_and_evaluate(config, os.fspath(workdir))
  items = [predict.Item(path=p, file=str(raw / p)) for p in test_paths]
  _, got = predict.predict(predict.load_run(str(workdir)), items)
  saved = np.load(workdir / 'test_predictions.npz')['scores']
  np.testing.assert_allclose(got, saved, atol=1e-5)
  config = json.loads((workdir / 'config.json').read_text())
  config['data']['eval_resize'] = 'square'
  (workdir / 'config.json').write_text(json.dumps(config))
  _, square = predict.predict(predict.load_run(str(workdir)), items)
  assert np.abs(square - saved).max() > 1e-4


def test_multi_label_models_give_sigmoids_and_no_predicted_column(run, tmp_path):
  workdir, raw, test_paths = run
  loaded = predict.load_run(str(workdir))
  items = [predict.Item(path=p, file=str(raw / p)) for p in test_paths[:4]]
  _, softmax = predict.predict(loaded, items)
  multi = dataclasses.replace(loaded, task=supervised.Task('multilabel', 2, ('green', 'red')))
  kept, sigmoid = predict.predict(multi, items)
  # The same logits: softmax's log-ratio equals the difference of the sigmoids' logits.
  logit = np.log(sigmoid) - np.log1p(-sigmoid)
  np.testing.assert_allclose(logit[:, 1] - logit[:, 0],
                             np.log(softmax[:, 1]) - np.log(softmax[:, 0]), atol=1e-4)
  assert predict.output_columns(multi.task, ['note']) == ['path', 'note', 'green', 'red']
  # A data set's own list holds its labels under the names of the probabilities.
  assert predict.output_columns(multi.task, ['red', 'path', 'Sex']) == [
      'path', 'red (input)', 'path (input)', 'Sex', 'green', 'red']
  predict.write_predictions(str(tmp_path / 'm.csv'), multi, kept, [], sigmoid)
  assert list(_read(tmp_path / 'm.csv')[0]) == ['path', 'green', 'red']


def test_bad_images_name_the_file_and_line_unless_skipped(run, tmp_path, capsys, caplog):
  workdir, raw, test_paths = run
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'not a png')
  listing = _write_csv(tmp_path / 'list.csv', ['path'],
                       [[str(raw / test_paths[0])], ['missing.png'], [str(broken)],
                        [str(raw / test_paths[1])]])
  out = tmp_path / 'p.csv'
  out.write_text('earlier output\n')
  args = ['--workdir', str(workdir), '--images', str(listing), '--out', str(out)]
  assert predict.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {listing} line 3: cannot read image {tmp_path / "missing.png"}')
  assert len(err.strip().splitlines()) == 1
  assert out.read_text() == 'earlier output\n'  # left as it was
  with caplog.at_level('WARNING'):
    assert predict.main(args + ['--skip_bad_images']) == 0
  assert [r['path'] for r in _read(out)] == [str(raw / test_paths[0]), str(raw / test_paths[1])]
  assert 'Left out 2 of 4 images' in caplog.text
  assert f'line 4: cannot decode image {broken}' in caplog.text
  # Without the missing row, the undecodable file is the error.
  _write_csv(listing, ['path'], [[str(broken)]])
  assert predict.main(args) == 2
  assert capsys.readouterr().err.startswith(
      f'error: {listing} line 2: cannot decode image {broken}')


def test_a_csv_made_on_windows_finds_its_files(tmp_path, caplog):
  files = [tmp_path / 'scans' / 'p1' / 'a.png', tmp_path / 'scans' / 'P2' / 'B.PNG']
  for file in files:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b'')
  listing = _write_csv(tmp_path / 'list.csv', ['path', 'note'],
                       [['scans\\p1\\a.png', 'x'], ['scans/p2/b.png', 'y']])
  with caplog.at_level('WARNING'):
    items, extra = predict.list_images(str(listing))
  assert [(i.path, i.file, i.columns) for i in items] == [
      ('scans\\p1\\a.png', str(files[0]), (('note', 'x'),)),
      ('scans/p2/b.png', str(files[1]), (('note', 'y'),))]
  assert extra == ['note']
  assert (f'1 image file(s) found only with letter case ignored (first: {listing} line 3, '
          f'read from {files[1]})') in caplog.text
  _write_csv(listing, ['path'], [['D:\\scans\\a.png']])
  with pytest.raises(DataError, match=r'line 2: D:\\scans\\a.png is a Windows path'):
    predict.list_images(str(listing))


def test_csv_errors(run, tmp_path, capsys):
  workdir, raw, test_paths = run
  out = tmp_path / 'p.csv'
  cases = [
      (['file'], [[test_paths[0]]], 'missing column(s) path'),
      (['path', 'red', 'red (input)'], [[str(raw / test_paths[0]), 'x', 'y']],
       'has column(s) red (input) beside columns copied under that name'),
      (['path', 'note'], [[' ', 'x']], 'line 2: empty path'),
  ]
  for header, rows, message in cases:
    listing = _write_csv(tmp_path / 'list.csv', header, rows)
    assert predict.main(['--workdir', str(workdir), '--images', str(listing), '--out',
                         str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and len(err.strip().splitlines()) == 1
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert predict.main(['--workdir', str(workdir), '--images', str(empty), '--out',
                       str(out)]) == 2
  assert f'error: {empty}: no image files' in capsys.readouterr().err
  assert not out.exists()
  # The list itself as --out (a link to it too): refused, the list kept.
  listing = _write_csv(tmp_path / 'list.csv', ['path'], [[str(raw / test_paths[0])]])
  before = listing.read_text()
  (tmp_path / 'link.csv').symlink_to(listing)
  for target in (listing, tmp_path / 'link.csv'):
    assert predict.main(['--workdir', str(workdir), '--images', str(listing), '--out',
                         str(target)]) == 2
    assert 'is the --images list itself' in capsys.readouterr().err
  assert listing.read_text() == before


def test_a_chexpert_layout_list_is_read_with_path_column_and_image_root(run, tmp_path,
                                                                        monkeypatch, capsys):
  """CheXpert's valid.csv: a `Path` column, paths relative to the CSV's parent folder."""
  workdir, raw, test_paths = run
  root = tmp_path / 'chexpert'
  listed = []
  for i, path in enumerate(test_paths[:5]):
    name = f'CheXpert-v1.0-small/valid/patient{64541 + i}/study1/view1_frontal.png'
    (root / name).parent.mkdir(parents=True)
    shutil.copy(raw / path, root / name)
    listed.append(name)
  listed.append(str(raw / test_paths[5]))  # an absolute path is used as it is
  # The list's labels have the names of the model's labels (CheXpert's observations).
  header = ['Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA', 'red']
  fields = [[p, 'Female' if i % 2 else 'Male', str(60 + i), 'Frontal', 'AP', str(i % 2)]
            for i, p in enumerate(listed)]
  listing = _write_csv(root / 'CheXpert-v1.0-small' / 'valid.csv', header, fields)
  plain = _write_csv(tmp_path / 'plain.csv', ['path'], [[str(raw / p)] for p in test_paths[:6]])
  out, want = tmp_path / 'chexpert.csv', tmp_path / 'plain_out.csv'
  assert predict.main(['--workdir', str(workdir), '--images', str(plain), '--out',
                       str(want)]) == 0
  args = ['--workdir', str(workdir), '--images', str(listing), '--out', str(out),
          '--path_column', 'Path']
  assert predict.main(args + ['--image_root', str(root)]) == 0
  rows = _read(out)
  copied = ['Sex', 'Age', 'Frontal/Lateral', 'AP/PA', 'red (input)']
  assert list(rows[0]) == ['path', *copied, 'green', 'red', 'predicted']
  assert [[r[c] for c in ['path', *copied]] for r in rows] == fields
  np.testing.assert_allclose(_scores(rows), _scores(_read(want)), atol=1e-6)
  # A relative --image_root is relative to the working folder.
  monkeypatch.chdir(tmp_path)
  assert predict.main(args + ['--image_root', 'chexpert']) == 0
  np.testing.assert_allclose(_scores(_read(out)), _scores(_read(want)), atol=1e-6)
  # Without --image_root the paths are relative to the CSV's own folder: not there.
  assert predict.main(args) == 2
  assert capsys.readouterr().err.startswith(
      f'error: {listing} line 2: cannot read image '
      f'{root / "CheXpert-v1.0-small" / listed[0]}: No such file')
  items, extra = predict.list_images(str(listing), 'Path')
  assert extra == header[1:]
  assert items[0].file == str(root / 'CheXpert-v1.0-small' / listed[0])
  assert items[5].file == listed[5]


def test_path_column_and_image_root_errors(run, tmp_path, capsys):
  workdir, raw, test_paths = run
  listing = _write_csv(tmp_path / 'valid.csv', ['Path', 'Sex'],
                       [[str(raw / test_paths[0]), 'Male']])
  out = tmp_path / 'p.csv'

  def error(*args):
    assert predict.main(['--workdir', str(workdir), '--images', str(listing), '--out',
                         str(out), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    return err

  for args, column in (((), 'path'), (('--path_column', 'File'), 'File')):
    assert error(*args) == (f'error: {listing}: missing column(s) {column} (found: Path, '
                            'Sex); --path_column names the column of image paths\n')
  empty = _write_csv(tmp_path / 'empty.csv', ['Path', 'Sex'], [[' ', 'Male']])
  with pytest.raises(DataError, match=re.escape(f'{empty} line 2: empty Path')):
    predict.list_images(str(empty), 'Path')
  # The output's `path` is the listed path: another input column of that name is copied
  # as `path (input)`, unless the CSV has that one too.
  _write_csv(listing, ['Path', 'path', 'path (input)'], [[str(raw / test_paths[0]), 'x', 'y']])
  assert error('--path_column', 'Path') == (
      'error: the --images CSV has column(s) path (input) beside columns copied under that '
      'name (a column named like an output column is copied as NAME (input)); rename them\n')
  # --image_root: for a CSV only, and a folder.
  folder = str(raw / 'images')
  assert predict.main(['--workdir', str(workdir), '--images', folder, '--out', str(out),
                       '--image_root', str(raw)]) == 2
  assert capsys.readouterr().err == (f'error: --image_root applies to a CSV of images; '
                                     f'--images {folder} is a folder\n')
  assert predict.main(['--workdir', str(workdir), '--images', folder, '--out', str(out),
                       '--path_column', 'Path']) == 2
  assert capsys.readouterr().err == (f'error: --path_column applies to a CSV of images; '
                                     f'--images {folder} is a folder\n')
  assert error('--path_column', 'Path', '--image_root', str(tmp_path / 'nowhere')) == (
      f'error: --image_root {tmp_path / "nowhere"} is not a folder\n')
  assert not out.exists()


def test_unfinished_other_trainer_and_mismatched_workdirs(run, tmp_path, capsys):
  workdir, raw, test_paths = run
  images = str(raw / 'images')
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  shutil.copy(workdir / 'config.json', unfinished / 'config.json')
  with pytest.raises(ConfigError, match='has not finished'):
    predict.load_run(str(unfinished))
  assert predict.main(['--workdir', str(unfinished), '--images', images, '--out',
                       str(tmp_path / 'p.csv')]) == 2
  err = capsys.readouterr().err
  assert err == f'error: {unfinished / "results.json"} not found: the run in {unfinished} ' \
                'has not finished\n'
  with pytest.raises(ConfigError, match='not a run config'):
    predict.load_run(str(tmp_path))
  pretrained = tmp_path / 'pretrained'
  pretrained.mkdir()
  (pretrained / 'config.json').write_text(json.dumps({'trainer': 'pretrain'}))
  with pytest.raises(ConfigError, match="the 'pretrain' trainer"):
    predict.load_run(str(pretrained))
  stages = tmp_path / 'demo'
  stages.mkdir()
  (stages / 'config.json').write_text(json.dumps({
      'trainer': 'stages', 'order': ['pre', 'ft'],
      'stages': {'pre': {'trainer': 'pretrain'}, 'ft': {'trainer': 'finetune'}}}))
  with pytest.raises(ConfigError, match=re.escape(f'{stages} holds several stages; pass the '
                                                  f'workdir of one that fine-tunes: '
                                                  f'{stages / "ft"}')):
    predict.load_run(str(stages))
  # A config that describes another model than best/ holds.
  other = tmp_path / 'other'
  shutil.copytree(workdir, other)
  config = json.loads((other / 'config.json').read_text())
  config['model']['width_multiplier'] = 0.25
  (other / 'config.json').write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=re.escape(f'{other / "best"}: does not fit the '
                                                     'model its config.json describes (')
                     + r'.* has shape \(8,\), the model \(16,\)'):
    predict.load_run(str(other))
  shutil.rmtree(other / 'best')
  (other / 'best').mkdir()
  with pytest.raises(CheckpointError, match=f'{other / "best"}: holds no arrays'):
    predict.load_run(str(other))


def test_a_relative_workdir_works(run, tmp_path, monkeypatch):
  workdir, raw, _ = run
  monkeypatch.chdir(workdir.parent)
  assert predict.main(['--workdir', workdir.name, '--images', str(raw / 'images'), '--out',
                       str(tmp_path / 'p.csv')]) == 0


# orbax's abandoned reads of a damaged checkpoint end with errors pytest reports as
# unraisable; the command itself fails with one line.
def test_config_files_of_other_versions_and_damaged_best_models(run, tmp_path, capsys):
  workdir, raw, _ = run
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  config = json.loads((copy / 'config.json').read_text())
  del config['early_stopping_patience']  # a key the file lacks takes its default
  config['retired_key'] = 1              # one the trainer no longer has is left out
  (copy / 'config.json').write_text(json.dumps(config))
  assert predict.load_run(str(copy)).config.early_stopping_patience == 0
  config['data']['image_size'] = 'abc'
  (copy / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=re.escape(f"{copy / 'config.json'}: key "
                                                  "'data.image_size' should be a int, got "
                                                  "'abc'")):
    predict.load_run(str(copy))
  shutil.copy(workdir / 'config.json', copy / 'config.json')
  for path in (copy / 'best' / 'ocdbt.process_0' / 'd').iterdir():
    path.write_bytes(path.read_bytes()[:10])  # the arrays' data cut short
  assert predict.main(['--workdir', str(copy), '--images', str(raw / 'images'), '--out',
                       str(tmp_path / 'p.csv')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {copy / "best"}: cannot restore the model its config.json '
                        'describes (') and len(err.strip().splitlines()) == 1


def test_images_are_stored_as_the_data_set_stores_them_before_the_crop(tmp_path):
  """A data set stored at a smaller side: predict downscales new files the same way."""
  raw = _write_colour_cases(tmp_path / 'raw', per_split=(8, 4, 6))  # 20 x 20 PNGs
  build_data.build('image_cases/colours', data_dir=os.fspath(tmp_path / 'data'),
                   manual_dir=os.fspath(raw), max_side=14)
  workdir = tmp_path / 'work'
  config = tiny_config(tmp_path / 'data', total_steps=2, eval_every_steps=2, batch_size=8)
  results = finetune.train_and_evaluate(config, os.fspath(workdir))
  assert results['stored_images'] == {'max_side': 14, 'channels': 3}
  source = sources.open_split('image_cases/colours', 'test', os.fspath(tmp_path / 'data'))
  listing = _write_csv(raw / 'test_list.csv', ['path'],
                       [[source[i]['image_id'].decode()] for i in range(len(source))])
  saved = np.load(workdir / 'test_predictions.npz')['scores']
  out = tmp_path / 'p.csv'
  assert predict.main(['--workdir', str(workdir), '--images', str(listing), '--out',
                       str(out)]) == 0
  np.testing.assert_allclose(_scores(_read(out)), saved, atol=1e-5)  # PNG: stored losslessly
  # Cropping the published 20 x 20 files directly scores other pixels.
  path = workdir / 'results.json'
  path.write_text(json.dumps({k: v for k, v in results.items() if k != 'stored_images'}))
  assert predict.main(['--workdir', str(workdir), '--images', str(listing), '--out',
                       str(out)]) == 0
  assert np.abs(_scores(_read(out)) - saved).max() > 1e-4


def test_new_jpegs_reach_the_model_with_the_pixels_a_build_stores(tmp_path):
  """A data set of JPEGs stored at a smaller side is re-encoded by its build: predict
  replays that, so a listed file's crop is the stored record's crop, pixel for pixel."""
  rng = np.random.default_rng(1)
  (tmp_path / 'raw' / 'images').mkdir(parents=True)
  lines = ['path,case_id,label,split']
  for i in range(8):
    pixels = rng.integers(0, 256, (40, 30, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / 'raw' / 'images' / f'{i}.jpg', quality=80)
    lines.append(f'images/{i}.jpg,c{i},{"red" if i % 2 else "green"},'
                 f'{("train", "test")[i % 2]}')
  (tmp_path / 'raw' / 'cases.csv').write_text('\n'.join(lines) + '\n')
  build_data.build('image_cases/colours', data_dir=os.fspath(tmp_path / 'data'),
                   manual_dir=os.fspath(tmp_path / 'raw'), max_side=24)
  source = sources.open_split('image_cases/colours', 'test', os.fspath(tmp_path / 'data'))
  for i in range(len(source)):
    name = source[i]['image_id'].decode()
    item = predict.Item(path=name, file=os.fspath(tmp_path / 'raw' / name), where='',
                        columns=())
    got = predict.load_image(item, 16, 0.875, {'max_side': 24, 'channels': 3})
    want = host_ops.center_crop(source[i]['image'], 16, 0.875, channels=3)
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_a_gray_data_set_sees_new_colour_images_in_gray(tmp_path):
  rgb = (np.arange(24 * 30 * 3) % 251).astype(np.uint8).reshape(24, 30, 3)
  path = tmp_path / 'x.png'
  Image.fromarray(rgb).save(path)
  item = predict.Item(path='x.png', file=os.fspath(path), where='', columns=())
  got = predict.load_image(item, 8, 0.875, {'channels': 1, 'max_side': None})
  gray = Image.fromarray(rgb).convert('L')
  np.testing.assert_array_equal(got, host_ops.center_crop(gray, 8, 0.875, channels=3))
  assert np.all(got[..., 0] == got[..., 2])
  assert not np.array_equal(got, predict.load_image(item, 8, 0.875))
