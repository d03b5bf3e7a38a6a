"""The segment trainer: Dice/BCE against NumPy, joint crops, encoder maps, end-to-end runs."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from bigssl_med import build_data, checkpointing, config_schema, models, parallel, segmentation
from bigssl_med import train_state
from bigssl_med.data import fractions, segmentation_data, sources
from bigssl_med.errors import ConfigError, DataError
from bigssl_med.models import resnet
from bigssl_med.trainers import finetune, segment
from bigssl_med.trainers import pretrain
from conftest import override
from test_finetune import _write_colour_cases
from test_image_cases_builder import write_cases, write_disc_cases
from test_pretrain import tiny_config as tiny_pretrain_config
from tfds_builders.ham10000 import ham10000

_HEADER = 'lesion_id,image_id,dx,dx_type,age,sex,localization'


# --------------------------------------------------------------------------- NumPy references


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _np_dice_loss(logits, masks, smooth=1.0, per_image=False):
  p, y = _sigmoid(logits), np.asarray(masks, np.float64)
  if per_image:
    p, y = p.reshape(len(p), -1), y.reshape(len(y), -1)
    dice = (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return 1 - dice.mean()
  return 1 - (2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


def _np_bce(logits, masks):
  p, y = _sigmoid(logits), np.asarray(masks, np.float64)
  return np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _np_hard_dice(logits, masks):
  """The benchmark's `mean_dice_coef` / `dice`: threshold 0.5, 1 for two empty masks."""
  p, y = _sigmoid(logits) > 0.5, np.asarray(masks) > 0.5
  per_image = []
  for a, b in zip(p, y):
    total = a.sum() + b.sum()
    per_image.append(1.0 if total == 0 else 2.0 * (a & b).sum() / total)
  pooled = 2.0 * (p & y).sum() / (p.sum() + y.sum())
  pooled_iou = (p & y).sum() / (p | y).sum()
  return np.mean(per_image), pooled, pooled_iou


@pytest.fixture(scope='module')
def fixed_arrays():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (4, 6, 5, 1)).astype(np.float32)
  masks = (rng.random((4, 6, 5, 1)) > 0.6).astype(np.float32)
  masks[2] = 0.0                         # an image without foreground ...
  logits[2] = -np.abs(logits[2]) - 0.1   # ... predicted empty: Dice 1
  return logits, masks


@pytest.mark.parametrize('per_image', [False, True])
def test_soft_dice_loss_matches_numpy(fixed_arrays, per_image):
  logits, masks = fixed_arrays
  got = segmentation.soft_dice_loss(jnp.asarray(logits), jnp.asarray(masks),
                                    per_image=per_image)
  np.testing.assert_allclose(float(got), _np_dice_loss(logits, masks, per_image=per_image),
                             rtol=1e-5)
  # Perfect, confident predictions: loss 0 (up to the sigmoid's saturation).
  perfect = segmentation.soft_dice_loss(jnp.asarray(np.where(masks > 0, 30.0, -30.0)),
                                        jnp.asarray(masks), per_image=per_image)
  assert abs(float(perfect)) < 1e-5


def test_bce_and_combined_loss_match_numpy(fixed_arrays):
  logits, masks = fixed_arrays
  bce = segmentation.sigmoid_bce(jnp.asarray(logits), jnp.asarray(masks))
  np.testing.assert_allclose(float(bce), _np_bce(logits, masks), rtol=1e-5)
  loss, parts = segmentation.segmentation_loss(jnp.asarray(logits), jnp.asarray(masks),
                                               bce_weight=0.5, dice_weight=2.0)
  np.testing.assert_allclose(
      float(loss), 0.5 * _np_bce(logits, masks) + 2.0 * _np_dice_loss(logits, masks), rtol=1e-5)
  assert set(parts) == {'bce', 'dice_loss'}


def test_hard_dice_metrics_match_numpy(fixed_arrays):
  logits, masks = fixed_arrays
  counts = np.asarray(segmentation.dice_counts(jnp.asarray(logits),
                                               jnp.asarray(masks.astype(np.uint8))))
  assert counts.dtype == np.int32 and counts.shape == (4, 3)
  found = segmentation.dice_metrics(counts)
  dice, pooled, pooled_iou = _np_hard_dice(logits, masks)
  np.testing.assert_allclose(found['dice'], dice, rtol=1e-12)
  np.testing.assert_allclose(found['dice_pooled'], pooled, rtol=1e-12)
  np.testing.assert_allclose(found['iou_pooled'], pooled_iou, rtol=1e-12)
  assert found['num_examples'] == 4 and 0 < found['iou'] <= found['dice'] <= 1


# --------------------------------------------------------------------------- host data


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def test_joint_random_crop_keeps_image_and_mask_aligned():
  # Asymmetric blocks: the mask is the thresholded red channel, so any misalignment
  # (another box, a flip of one but not the other; about half the 40 crops are
  # flipped) breaks the agreement.
  rng = np.random.default_rng(0)
  blocks = (rng.random((6, 8)) > 0.5)
  blocks[:, :4] = np.triu(np.ones((6, 4), bool))
  image = np.zeros((48, 64, 3), np.uint8)
  image[..., 0] = np.kron(blocks, np.ones((8, 8))).astype(np.uint8) * 255
  image[..., 1] = 80
  mask = image[..., 0].copy()
  example = {'image': _png(image), 'mask': _png(mask), 'image_id': b'x'}
  img, msk = segmentation_data.decode_pair(example, 'mask', 'test record')
  agreements, against_flipped = [], []
  for seed in range(40):
    out_image, out_mask = segmentation_data.random_crop_pair(
        np.random.default_rng(seed), img, msk, 24, 0.3)
    assert out_image.shape == (24, 24, 3) and out_mask.shape == (24, 24, 1)
    assert out_image.dtype == out_mask.dtype == np.uint8 and set(np.unique(out_mask)) <= {0, 1}
    from_image = out_image[..., 0] >= 128
    agreements.append(np.mean(from_image == out_mask[..., 0].astype(bool)))
    against_flipped.append(np.mean(from_image == out_mask[:, ::-1, 0].astype(bool)))
  assert min(agreements) > 0.93, agreements   # bicubic blurs edges a little
  assert np.mean(against_flipped) < 0.8
  # Evaluation: the whole image, resized; aligned too.
  eval_image, eval_mask = segmentation_data.resize_pair(img, msk, 32)
  assert np.mean((eval_image[..., 0] >= 128) == eval_mask[..., 0].astype(bool)) > 0.95


def test_mask_size_must_match_image():
  example = {'image': _png(np.zeros((8, 8, 3), np.uint8)),
             'mask': _png(np.zeros((8, 6), np.uint8))}
  with pytest.raises(DataError, match=r'rec 3: mask .mask. is 6x8 but the image is 8x8'):
    segmentation_data.decode_pair(example, 'mask', 'rec 3')
  with pytest.raises(DataError, match=r"rec 3: no feature 'lesion'"):
    segmentation_data.decode_pair(example, 'lesion', 'rec 3')


def test_a_mask_of_zeros_and_ones_is_an_error_not_an_empty_lesion():
  lesion = np.zeros((8, 8), np.uint8)
  lesion[2:5, 3:6] = 1
  example = {'image': _png(np.zeros((8, 8, 3), np.uint8)), 'mask': _png(lesion)}
  with pytest.raises(DataError, match=r"rec 4: mask 'mask' has values up to 1 only; masks "
                                      r'are 0 \(background\) and 255 \(lesion\)'):
    segmentation_data.decode_pair(example, 'mask', 'rec 4')
  for stored in (lesion * 255, np.zeros((8, 8), np.uint8)):  # a lesion, and none
    example['mask'] = _png(stored)
    image, mask = segmentation_data.decode_pair(example, 'mask', 'rec 4')
    _, resized = segmentation_data.resize_pair(image, mask, 8)
    np.testing.assert_array_equal(resized[..., 0], stored // 255)


# --------------------------------------------------------------------------- the model


def test_encoder_maps_have_the_expected_strides_and_default_output_is_unchanged():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((2, 64, 64, 3)), jnp.float32)
  for cifar_stem in (False, True):
    model = models.ResNet(depth=18, width_multiplier=0.125, cifar_stem=cifar_stem)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False))
    same = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False,
                                                 return_maps=True))
    assert jax.tree.structure(shapes) == jax.tree.structure(same)
    # Random values from NumPy: JAX's random initialisers take long to compile on CPU.
    variables = {'params': jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype),
                                        shapes['params']),
                 'batch_stats': jax.tree.map(lambda s: np.ones(s.shape, s.dtype),
                                             shapes['batch_stats'])}
    both = jax.jit(lambda v, m=model: (m.apply(v, x, train=False, return_maps=True),
                                       m.apply(v, x, train=False)))
    maps, features = both(variables)
    strides = tuple(64 // m.shape[1] for m in maps)
    assert strides == resnet.map_strides(cifar_stem)
    assert [m.shape[-1] for m in maps] == [8, 8, 16, 32, 64]
    assert features.shape == (2, 64) and features.dtype == jnp.float32
    np.testing.assert_allclose(features, jnp.mean(maps[-1].astype(jnp.float32), (1, 2)),
                               rtol=1e-6, atol=1e-7)
  assert resnet.map_strides() == (2, 4, 8, 16, 32)


def test_unet_output_and_parameter_layout():
  cfg = config_schema.segment().model
  cfg.depth, cfg.width_multiplier = 18, 0.125
  model = models.unet_model(cfg, dtype=jnp.bfloat16, decoder_channels=(16, 8, 8, 4, 4))
  x = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert set(variables['params']) == {'encoder', 'decoder'}
  assert set(variables['batch_stats']) == {'encoder', 'decoder'}
  decoder = variables['params']['decoder']
  assert sorted(decoder) == ['block0', 'block1', 'block2', 'block3', 'block4', 'logits']
  # Block 0 reads group4 (64) upsampled + group3 (32); the last block has no skip.
  assert decoder['block0']['conv1']['conv']['kernel'].shape == (3, 3, 96, 16)
  assert decoder['block4']['conv1']['conv']['kernel'].shape == (3, 3, 4, 4)
  assert decoder['logits']['kernel'].shape == (3, 3, 4, 1)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out.shape == (2, 64, 64, 1) and out.dtype == jnp.float32
  # Under bfloat16 compute the logits convolution (the last) still runs in float32.
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
  convs = [e for e in jaxpr.eqns if e.primitive.name == 'conv_general_dilated']
  assert [v.aval.dtype for v in convs[-1].invars] == [jnp.float32, jnp.float32]
  assert convs[-2].invars[0].aval.dtype == jnp.bfloat16


# --------------------------------------------------------------------------- end to end


def _write_disc_lesions(root, num_lesions=96, seed=0):
  """HAM10000's published layout: a bright disc on noisy skin, the mask that disc."""
  rng = np.random.default_rng(seed)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  lines = [_HEADER]
  yy, xx = np.mgrid[0:24, 0:32]
  for lesion in range(num_lesions):
    image_id = f'ISIC_{24306 + lesion:07d}'
    cy, cx, r = rng.uniform(7, 17), rng.uniform(8, 24), rng.uniform(4, 8)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    pixels = rng.normal([150, 100, 90], 20, (24, 32, 3))
    pixels[disc] = rng.normal([250, 230, 220], 10, (disc.sum(), 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        root / 'images' / f'{image_id}.jpg', format='JPEG', quality=95)
    Image.fromarray(disc.astype(np.uint8) * 255).save(
        root / 'masks' / f'{image_id}_segmentation.png', format='PNG')
    dx = ham10000.CLASS_NAMES[lesion % len(ham10000.CLASS_NAMES)]
    lines.append(f'HAM_{lesion:07d},{image_id},{dx},histo,50.0,male,back')
  (root / 'HAM10000_metadata.csv').write_text('\n'.join(lines) + '\n')
  return root


def tiny_config(data_dir, **overrides):
  c = config_schema.segment()
  c.dataset = 'ham10000'
  c.data.data_dir = os.fspath(data_dir)
  c.data.build_if_missing = False
  c.data.image_size = 16
  c.data.num_workers = 0
  c.data.crop_area_min = 0.5
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.cifar_stem = True
  c.decoder_channels = (16, 16, 8, 8, 8)
  c.compute_dtype = 'float32'
  c.batch_size = 16
  c.total_steps = 40
  c.num_epochs = 0.0
  c.eval_every_steps = 20
  c.log_every_steps = 20
  c.checkpoint_every_steps = 40
  c.tensorboard = False
  c.optimizer.learning_rate = 0.08  # x 16 / 256: Adam at 5e-3
  return override(c, overrides)


@pytest.fixture(scope='module')
def discs(tmp_path_factory):
  root = tmp_path_factory.mktemp('discs')
  _write_disc_lesions(root / 'raw')
  build_data.build('ham10000', data_dir=os.fspath(root / 'data'),
                   manual_dir=os.fspath(root / 'raw'))
  return root / 'data'


@pytest.fixture(scope='module')
def pretrained(discs, tmp_path_factory):
  """A 2-step MICLe pretraining workdir on the discs."""
  workdir = os.fspath(tmp_path_factory.mktemp('pretrained'))
  pretrain.train_and_evaluate(tiny_pretrain_config(os.fspath(discs), total_steps=2, probe=False),
                              workdir)
  return workdir


@pytest.fixture(scope='module')
def segmented(discs, pretrained, tmp_path_factory):
  """A U-Net trained from the pretrained encoder on half the training lesions."""
  workdir = tmp_path_factory.mktemp('segmented')
  config = tiny_config(discs, init_from=pretrained, init='micle',
                       **{'data.label_fraction': 0.5})
  return workdir, config, segment.train_and_evaluate(config, os.fspath(workdir))


def test_segmentation_learns_the_discs(segmented):
  workdir, config, results = segmented
  assert results['trainer'] == 'segment' and results['task'] == 'segmentation'
  assert results['primary_metric'] == 'dice' and results['init'] == 'micle'
  assert results['origin'].startswith('initialised encoder from')
  assert results['initialised_from'] == {
      'init_from': config.init_from, 'step': 2, 'pretrain_seed': 0,
      'checkpoint': os.path.join(config.init_from, 'checkpoints', '2')}
  assert results['step'] == 40 and results['total_steps'] == 40
  # Measured: 0.93 (validation) and 0.93 (test). Predicting every pixel as lesion
  # scores 0.30 and 0.26 on these splits, predicting none 0.
  assert results['validation']['dice'] >= 0.8, results['validation']
  assert results['test']['dice'] >= 0.8, results['test']
  assert results['validation']['num_examples'] == 10 and results['test']['num_examples'] == 9
  assert json.loads((workdir / 'data.json').read_text()) == sources.fingerprint(
      config.dataset, config.data.data_dir, ('train', 'validation'))
  assert results['label_fraction'] == 0.5 and results['labelled_images'] == 39  # of 77
  chosen, _ = fractions.open_fraction(config.dataset, 'train', config.data.data_dir, 0.5, 0)
  assert results['labelled_cases'] == len(set(sources.scan_case_ids(chosen)))
  # The report pools runs from several pretraining runs by these.
  assert results['init_from'] == config.init_from and results['pretrain_seed'] == 0
  best = json.loads((workdir / 'best.json').read_text())
  assert best['step'] == results['best_step'] and best['value'] == results['validation']['dice']
  evals = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [e['step'] for e in evals if e['split'] == 'validation'] == [20, 40]
  assert {'loss', 'bce', 'dice_loss', 'dice', 'learning_rate'} <= set(
      next(e for e in evals if e['split'] == 'train'))


def test_second_run_returns_the_results_without_retraining(segmented):
  workdir, config, results = segmented
  mtime = os.path.getmtime(workdir / 'metrics.jsonl')
  assert segment.train_and_evaluate(config, os.fspath(workdir)) == results
  assert os.path.getmtime(workdir / 'metrics.jsonl') == mtime
  # Bookkeeping may change; a setting may not: the results would answer another question.
  moved = config.copy_and_resolve_references()
  moved.data.num_workers, moved.log_every_steps = 2, 7
  assert segment.train_and_evaluate(moved, os.fspath(workdir)) == results
  other = config.copy_and_resolve_references()
  other.data.label_fraction = 0.25
  with pytest.raises(ConfigError, match=r'holds a finished run with other settings: '
                                        r'data.label_fraction is 0.5 there, 0.25 asked; '
                                        r'run in a new workdir'):
    segment.train_and_evaluate(other, os.fspath(workdir))
  assert os.path.getmtime(workdir / 'metrics.jsonl') == mtime


def test_init_from_loads_the_pretrained_encoder_exactly(segmented, pretrained, tmp_path):
  _, config, _ = segmented
  mesh = parallel.data_mesh()
  model = models.unet_model(config.model, dtype=jnp.float32,
                            decoder_channels=config.decoder_channels)
  run = train_state.start(model, config=config, workdir=os.fspath(tmp_path), mesh=mesh,
                          make_tx=lambda _: optax.adam(1e-3), init_keys=('encoder',))
  run.checkpointer.close()
  loaded = checkpointing.load_model_variables(pretrained, parallel.replicated(mesh))
  for collection in ('params', 'batch_stats'):
    want, got = loaded[collection]['encoder'], run.variables[collection]['encoder']
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)
  assert 'decoder' in run.variables['params'] and 'decoder' not in loaded['params']


def test_a_data_set_without_masks_is_a_one_line_error(discs, tmp_path):
  _write_colour_cases(tmp_path / 'raw', per_split=(4, 2, 2))
  build_data.build('image_cases/colours', data_dir=os.fspath(tmp_path / 'data'),
                   manual_dir=os.fspath(tmp_path / 'raw'))
  cfg = tiny_config(tmp_path / 'data', dataset='image_cases/colours')
  with pytest.raises(DataError, match=r"^data set 'image_cases/colours' has no mask feature "
                     r"'mask' \(config.data.mask_key\); features: \[") as e:
    segment.train_and_evaluate(cfg, os.fspath(tmp_path / 'work'))
  assert '\n' not in str(e.value)
  with pytest.raises(DataError, match=r"^data set 'ham10000' has no mask feature 'lesion_mask' "):
    segment.train_and_evaluate(tiny_config(discs, **{'data.mask_key': 'lesion_mask'}),
                               os.fspath(tmp_path / 'work2'))


def test_segment_trains_on_an_image_cases_build_with_masks(tmp_path):
  # A user's own segmentation set: cases.csv with a mask column, built by image_cases.
  rows = write_disc_cases(tmp_path / 'raw', 80, split=True)
  build_data.build('image_cases/discs', data_dir=os.fspath(tmp_path / 'data'),
                   manual_dir=os.fspath(tmp_path / 'raw'))
  config = tiny_config(tmp_path / 'data', dataset='image_cases/discs', total_steps=40)
  results = segment.train_and_evaluate(config, os.fspath(tmp_path / 'work'))
  assert results['trainer'] == 'segment' and results['dataset'] == 'image_cases/discs'
  assert results['init'] == 'scratch' and results['step'] == 40
  assert results['labelled_images'] == sum(row['split'] == 'train' for row in rows) == 48
  assert results['validation']['num_examples'] == results['test']['num_examples'] == 16
  # Measured: 0.91 (validation) and 0.92 (test). Predicting every pixel as foreground
  # scores 0.23 and 0.22 on these splits, predicting none 0.
  assert results['validation']['dice'] >= 0.8, results['validation']
  assert results['test']['dice'] >= 0.8, results['test']


def test_a_set_of_masks_only_trains_segmentation_and_fine_tuning_refuses_it(tmp_path):
  # image_cases with a mask column and no class column: segmentation only.
  rows = write_disc_cases(tmp_path / 'raw', 20, split=True)
  write_cases(tmp_path / 'raw', rows, columns=('path', 'case_id', 'split', 'mask'))
  build_data.build('image_cases/masks', data_dir=os.fspath(tmp_path / 'data'),
                   manual_dir=os.fspath(tmp_path / 'raw'))
  config = tiny_config(tmp_path / 'data', dataset='image_cases/masks', total_steps=4, batch_size=8,
                       eval_every_steps=4, log_every_steps=4, checkpoint_every_steps=4)
  results = segment.train_and_evaluate(config, os.fspath(tmp_path / 'seg'))
  assert results['step'] == 4 and results['labelled_images'] == 12
  assert results['test']['num_examples'] == 4 and 0 <= results['test']['dice'] <= 1
  fine = config_schema.finetune()
  fine.dataset, fine.data.data_dir = 'image_cases/masks', os.fspath(tmp_path / 'data')
  with pytest.raises(ConfigError, match=r"^data set 'image_cases/masks' has no label feature"):
    finetune.train_and_evaluate(fine, os.fspath(tmp_path / 'fine'))
