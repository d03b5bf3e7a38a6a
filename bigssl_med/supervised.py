"""Jitted steps of supervised training: one loss per task, logits for evaluation.

Tasks:

* `Task(kind='multiclass')`: softmax cross-entropy on integer labels.
* `Task(kind='multilabel', uncertain=..., blank=...)`: sigmoid cross-entropy over
  the label entries that `bigssl_med.label_policies.apply_policy` keeps, with
  CheXpert's uncertainty policies (U-Ignore, U-Zeros, U-Ones, LSR-Ones).

Images arrive as uint8 random crops (training) or centre crops (evaluation) and are
scaled to [0, 1] here; fine-tuning may also augment the training crops on the device
(`augment_images`: rotation, colour jitter, blur, as `config.augment` asks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigssl_med import augment
from bigssl_med import optim
from bigssl_med import label_policies


@dataclasses.dataclass(frozen=True)
class Task:
  """What the labels are and how the loss treats them."""
  kind: str                      # 'multiclass' or 'multilabel'
  num_outputs: int
  names: tuple[str, ...] = ()    # class or label names
  uncertain: str = 'ones'        # multilabel: policy for -1 labels
  blank: str = 'zeros'           # multilabel: blank (NaN) labels, 'zeros' or 'ignore'


def make_train_step(model, tx, schedule, task: Task, *, l2_heads: tuple[str, ...] = (),
                    weight_decay: float = 0.0, augment_images=None):
  """`(state, batch, key) -> (state, metrics)`; `batch` has `image` and `label`.

  `l2_heads`: top-level heads whose kernels the loss regularises by
  `optim.head_l2(params, weight_decay, l2_heads)` (the classifier under LARS, as SimCLR
  treats its supervised head); `metrics['loss']` is the task's loss alone.
  `augment_images`: `(key, uint8 images) -> float images in [0, 1]` applied to the
  training crops (`augment.from_config`), or None for none. `lr_scale`: the plateau
  schedule's factor on the update (`optim.gradient_step`).
  """

  def train_step(state, batch, key, lr_scale=None):
    variables, opt = state['model'], state['opt']
    labels = batch['label']
    step_key = jax.random.fold_in(key, opt['step'])
    if augment_images is None:
      images = augment.to_float(batch['image'])
    else:
      images = augment_images(jax.random.fold_in(step_key, 1), batch['image'])

    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
          mutable=['batch_stats'])
      logits = logits.astype(jnp.float32)
      if task.kind == 'multiclass':
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        metrics = {'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
      else:
        targets, mask = label_policies.apply_policy(
            labels, task.uncertain, step_key if task.uncertain == 'lsr_ones' else None,
            blank=task.blank)
        loss = label_policies.masked_sigmoid_bce(logits, targets, mask)
        metrics = {'labelled_fraction': jnp.mean(mask.astype(jnp.float32))}
      metrics['loss'] = loss
      return (loss + optim.head_l2(params, weight_decay, l2_heads),
              (updates['batch_stats'], metrics))

    return optim.gradient_step(state, loss_fn, tx, schedule, lr_scale)

  return train_step


def make_distill_step(model, teacher, tx, schedule, task: Task, temperature: float, *,
                      l2_heads: tuple[str, ...] = (), weight_decay: float = 0.0):
  """`(state, teacher_variables, batch, key) -> (state, metrics)`: SimCLRv2's distillation.

  The teacher (inference mode) sees the student's augmented images; its softened
  predictions are the targets. Multi-class: `-sum_y softmax(t/τ)_y log softmax(s/τ)_y`;
  multi-label: sigmoid cross-entropy of `s/τ` against `sigmoid(t/τ)`. Averaged over
  the batch (and labels); labels are not used. `l2_heads`, `weight_decay`, `lr_scale`:
  as `make_train_step`.
  """

  def train_step(state, teacher_variables, batch, key, lr_scale=None):
    del key
    variables = state['model']
    images = augment.to_float(batch['image'])
    teacher_logits = teacher.apply(teacher_variables, images, train=False).astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher_logits) / temperature

    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
          mutable=['batch_stats'])
      logits = logits.astype(jnp.float32) / temperature
      if task.kind == 'multiclass':
        loss = optax.softmax_cross_entropy(logits, jax.nn.softmax(teacher_logits)).mean()
        agree = jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
      else:
        loss = optax.sigmoid_binary_cross_entropy(logits, jax.nn.sigmoid(teacher_logits)).mean()
        agree = (logits > 0) == (teacher_logits > 0)
      return (loss + optim.head_l2(params, weight_decay, l2_heads),
              (updates['batch_stats'], {'loss': loss, 'teacher_agreement': jnp.mean(agree)}))

    return optim.gradient_step(state, loss_fn, tx, schedule, lr_scale)

  return train_step


def ten_crops(images: jax.Array, size: int) -> jax.Array:
  """`[N, H, W, C] -> [10, N, size, size, C]`: the four corners, the centre, and mirrors.

  The benchmark paper's test-time augmentation (torchvision's `TenCrop`): crops
  at the top-left, top-right, bottom-left and bottom-right corners and the centre
  (offset `(H - size) // 2`), then the same five of the horizontally flipped image.
  """
  height, width = images.shape[1:3]
  if size > min(height, width):
    raise ValueError(f'ten_crops: crop size {size} exceeds the image ({height}x{width})')
  top, left = (height - size) // 2, (width - size) // 2
  corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
             (top, left)]
  crops = [images[:, y:y + size, x:x + size] for y, x in corners]
  crops += [crop[:, :, ::-1] for crop in crops]
  return jnp.stack(crops)


def make_eval_step(model, task: Task | None = None, ten_crop_size: int = 0):
  """`(variables, batch) -> float32 logits` of evaluation images.

  With `ten_crop_size`, images are the larger ten-crop views: the model scores
  the ten crops of `ten_crops`, their probabilities (softmax for multi-class,
  sigmoid for multi-label `task`) are averaged, and the step returns logits of
  the averaged probabilities (log p, or log(p / (1 - p))). The average is taken in
  log space (logsumexp), so a confident prediction keeps its value where float32
  probabilities would round to 1 and tie.
  """

  def eval_step(variables, batch):
    images = augment.to_float(batch['image'])
    if not ten_crop_size:
      return model.apply(variables, images, train=False).astype(jnp.float32)
    crops = ten_crops(images, ten_crop_size)
    n = images.shape[0]
    logits = model.apply(variables, crops.reshape((10 * n,) + crops.shape[2:]), train=False)
    logits = logits.astype(jnp.float32).reshape((10, n, -1))
    log_ten = jnp.log(10.0)
    if task is None or task.kind == 'multiclass':
      return jax.nn.logsumexp(jax.nn.log_softmax(logits, -1), axis=0) - log_ten
    # log p̄ - log(1 - p̄), where 1 - p̄ is the mean of the sigmoids of -logits.
    return (jax.nn.logsumexp(jax.nn.log_sigmoid(logits), axis=0)
            - jax.nn.logsumexp(jax.nn.log_sigmoid(-logits), axis=0))

  return eval_step


def eval_targets(labels: np.ndarray, blank: str) -> tuple[np.ndarray, np.ndarray]:
  """Multi-label evaluation targets and mask from stored labels (host NumPy).

  Positives (1) and negatives (0) count; uncertain (-1) entries are left out of
  the AUCs (and of the loss, unless `policy_targets` gives the validation loss's);
  blank (NaN) entries count as negatives with `blank='zeros'` and are left out with
  `blank='ignore'`.
  """
  labels = np.asarray(labels, np.float64)
  blank_entries = np.isnan(labels)
  mask = (labels == 0) | (labels == 1)
  if blank == 'zeros':
    mask |= blank_entries
  targets = np.where(labels == 1, 1.0, 0.0)
  return targets, mask


# What the validation loss does with uncertain (-1) labels (`config.task.eval_uncertain`):
# leave them out, as the AUCs do, or count them with the training policy's targets.
EVAL_UNCERTAIN = ('ignore', 'train_policy')
# Folded into a run's seed for the validation draws, apart from the training keys.
_VALIDATION_DRAWS = 0x76616C


def validation_key(seed: int, step: int) -> jax.Array:
  """The PRNG key of the validation draws of the evaluation at `step` of a run of `seed`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _VALIDATION_DRAWS), step)


def policy_targets(labels: np.ndarray, task: Task, *, seed: int, step: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Targets (float64) and mask of stored labels under the task's training policy.

  The validation loss's with `config.task.eval_uncertain='train_policy'`:
  `label_policies.apply_policy(labels, task.uncertain, blank=task.blank)` on the
  host. LSR-Ones draws each uncertain entry's target from uniform [0.55, 0.85) with
  `validation_key(seed, step)`: the draws of one evaluation are fixed by the run's
  seed and the step evaluated (a resumed run that evaluates that step again repeats
  them), and each evaluation draws afresh, as the transfer-learning benchmark's code
  draws them every time it reads an image.
  """
  key = validation_key(seed, step) if task.uncertain == 'lsr_ones' else None
  targets, mask = label_policies.apply_policy(np.asarray(labels, np.float32), task.uncertain,
                                              key, blank=task.blank)
  return np.asarray(targets, np.float64), np.asarray(mask, bool)
