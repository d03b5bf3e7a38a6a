"""Data sets of TFDS's catalog, built by TFDS itself: ImageNet's layout, no `case_id`.

`configs/simclr_imagenet.py` reads TFDS's own `imagenet2012` build (array_record), which
this project does not build. Here a builder with that name, version and feature layout
(`image` JPEG, `label`, `file_name`; splits train and validation) writes a few generated
images with TFDS's Python API, and the trainers read it as they would the real one.
"""

import io
import logging
import os

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from bigssl_med.data import fractions, sources
from bigssl_med.errors import ConfigError, DataError
from bigssl_med.trainers import finetune, pretrain
from conftest import override
from test_configs import load
from test_finetune import tiny_config as tiny_finetune_config

NAME = 'imagenet2012'
CLASSES = ('n01440764', 'n01443537', 'n01484850', 'n01491361')
SIZES = {'train': 32, 'validation': 16}


def _jpeg(rng: np.random.Generator, label: int) -> bytes:
  """A noisy 24 x 20 image whose dominant channel and brightness follow the class."""
  image = rng.integers(0, 80, (20, 24, 3)).astype(np.uint8)
  image[..., label % 3] += 120 + 40 * (label // 3)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def build_imagenet_layout(data_dir: str, code_dir: str) -> str:
  """Builds `imagenet2012` 5.1.0 in TFDS's array_record layout; returns its folder.

  `code_dir`, an empty folder, stands for the builder's package (where TFDS looks for
  a builder's checksums and README).
  """
  with tfds.core.registered.skip_registration():

    class Imagenet2012(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version('5.1.0')
      pkg_dir_path = epath.Path(code_dir)

      def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=CLASSES),
                'file_name': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n) for split, n in SIZES.items()}

      def _generate_examples(self, split, n):
        rng = np.random.default_rng(len(split))
        for i in range(n):
          label = i % len(CLASSES)
          name = f'{CLASSES[label]}_{split}_{i:05d}.JPEG'
          yield name, {'image': _jpeg(rng, label), 'label': label, 'file_name': name}

    builder = Imagenet2012(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp('catalog')
  version_dir = build_imagenet_layout(os.fspath(root),
                                      os.fspath(tmp_path_factory.mktemp('builder_code')))
  assert version_dir == os.fspath(root / NAME / '5.1.0')
  # An older complete version and an unfinished build beside it: the newest complete one
  # is read, the others are left alone.
  older = root / NAME / '5.0.0'
  older.mkdir()
  (older / 'dataset_info.json').write_text('{}')
  (root / NAME / 'incomplete.ABC123_5.2.0').mkdir()
  return os.fspath(root)


def test_the_newest_complete_version_is_read(data_dir):
  assert sources.find_version_dir(NAME, data_dir) == os.path.join(data_dir, NAME, '5.1.0')
  assert len(sources.open_split(NAME, 'train', data_dir)) == SIZES['train']
  # A missing one names TFDS's command: this project's build_data does not build it.
  with pytest.raises(DataError, match=r'data set imagenet2013 is not built .*; build it with: '
                     r'tfds build imagenet2013 --file_format=array_record'):
    sources.find_version_dir('imagenet2013', data_dir)


def test_without_case_id_each_record_is_a_case(data_dir, caplog):
  with caplog.at_level(logging.INFO):
    cases = sources.cases(NAME, 'validation', data_dir)
  assert list(cases) == [str(i) for i in range(SIZES['validation'])]
  assert [c.tolist() for c in cases.values()] == [[i] for i in range(SIZES['validation'])]
  assert 'no case_id feature' in caplog.text
  # Label fractions are then fractions of the images, nested as ever.
  half, groups = fractions.open_fraction(NAME, 'train', data_dir, 0.5, seed=0)
  quarter, _ = fractions.open_fraction(NAME, 'train', data_dir, 0.25, seed=0)
  assert len(half) == len(groups) == SIZES['train'] // 2
  assert len(quarter) == SIZES['train'] // 4
  assert set(quarter.indices) < set(half.indices)


def _tiny_imagenet_config(data_dir: str, **overrides):
  """configs/simclr_imagenet.py, with a model and a run small enough for a CPU test."""
  return override(load('simclr_imagenet'), {
      'data.data_dir': data_dir, 'data.image_size': 16, 'data.num_workers': 0,
      'model.depth': 18, 'model.width_multiplier': 0.125, 'model.cifar_stem': True,
      'model.head_out_dim': 16, 'compute_dtype': 'float32', 'batch_size': 16,
      'total_steps': 2, 'num_epochs': 0.0, 'optimizer.warmup_epochs': 0.0,
      'optimizer.warmup_steps': 1, 'log_every_steps': 1, 'checkpoint_every_steps': 2,
      'eval_every_steps': 2, 'eval_batches': 1, 'tensorboard': False, **overrides})


def test_simclr_imagenet_config_pretrains_on_tfds_imagenet_layout(data_dir, tmp_path):
  results = pretrain.train_and_evaluate(_tiny_imagenet_config(data_dir),
                                        os.fspath(tmp_path / 'simclr'))
  assert results['step'] == 2
  assert np.isfinite(results['validation']['contrastive_loss'])
  assert 0.0 <= results['validation']['probe_top1'] <= 1.0
  # The encoder then starts a fine-tuning run on a fraction of the images.
  cfg = tiny_finetune_config(data_dir, dataset=NAME, init_from=os.fspath(tmp_path / 'simclr'),
                             total_steps=2, eval_every_steps=2,
                             **{'data.label_fraction': 0.5})
  tuned = finetune.train_and_evaluate(cfg, os.fspath(tmp_path / 'finetune'))
  assert tuned['origin'].startswith('initialised encoder from')
  assert tuned['label_fraction'] == 0.5 and tuned['step'] == 2


def test_micle_on_a_data_set_without_cases_is_a_one_line_error(data_dir, tmp_path):
  workdir = tmp_path / 'micle'
  with pytest.raises(ConfigError) as excinfo:
    pretrain.train_and_evaluate(_tiny_imagenet_config(data_dir, micle=True), os.fspath(workdir))
  message = str(excinfo.value)
  assert '\n' not in message
  assert "data set 'imagenet2012' has no case_id feature" in message
  assert 'config.micle=False' in message
  assert not (workdir / 'checkpoints').exists()
