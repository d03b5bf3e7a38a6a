"""Jitted steps of supervised training: one loss per task, logits for evaluation.

Tasks:

* `Task(kind='multiclass')`: softmax cross-entropy on integer labels.
* `Task(kind='multilabel', uncertain=..., blank=...)`: sigmoid cross-entropy over
  the label entries that `bigssl_med.label_policies.apply_policy` keeps, with
  CheXpert's uncertainty policies (U-Ignore, U-Zeros, U-Ones, LSR-Ones).

Images arrive as uint8 random crops (training) or centre crops (evaluation) and are
only scaled to [0, 1] here: fine-tuning uses crops and flips, no colour distortion.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigssl_med import augment
from bigssl_med import label_policies


@dataclasses.dataclass(frozen=True)
class Task:
  """What the labels are and how the loss treats them."""
  kind: str                      # 'multiclass' or 'multilabel'
  num_outputs: int
  names: tuple[str, ...] = ()    # class or label names
  uncertain: str = 'ones'        # multilabel: policy for -1 labels
  blank: str = 'zeros'           # multilabel: blank (NaN) labels, 'zeros' or 'ignore'


def make_train_step(model, tx, schedule, task: Task):
  """`(state, batch, key) -> (state, metrics)`; `batch` has `image` and `label`."""

  def train_step(state, batch, key):
    variables, opt = state['model'], state['opt']
    images = augment.to_float(batch['image'])
    labels = batch['label']
    step_key = jax.random.fold_in(key, opt['step'])

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
      return loss, (updates['batch_stats'], metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(variables['params'])
    updates, opt_state = tx.update(grads, opt['opt_state'], variables['params'])
    params = optax.apply_updates(variables['params'], updates)
    metrics['learning_rate'] = schedule(opt['step'])
    new_state = {'model': {'params': params, 'batch_stats': batch_stats},
                 'opt': {'step': opt['step'] + 1, 'opt_state': opt_state}}
    return new_state, metrics

  return train_step


def make_eval_step(model):
  """`(variables, batch) -> float32 logits` of centre-cropped images."""

  def eval_step(variables, batch):
    logits = model.apply(variables, augment.to_float(batch['image']), train=False)
    return logits.astype(jnp.float32)

  return eval_step


def eval_targets(labels: np.ndarray, blank: str) -> tuple[np.ndarray, np.ndarray]:
  """Multi-label evaluation targets and mask from stored labels (host NumPy).

  Positives (1) and negatives (0) count; uncertain (-1) entries are left out of
  the AUCs; blank (NaN) entries count as negatives with `blank='zeros'` and are
  left out with `blank='ignore'`.
  """
  labels = np.asarray(labels, np.float64)
  blank_entries = np.isnan(labels)
  mask = (labels == 0) | (labels == 1)
  if blank == 'zeros':
    mask |= blank_entries
  targets = np.where(labels == 1, 1.0, 0.0)
  return targets, mask
