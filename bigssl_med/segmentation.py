"""Binary segmentation: Dice + BCE loss, Dice and IoU metrics, and the jitted steps.

Loss, on logits `z` and masks `y` in {0, 1} of shape `[N, H, W, 1]`, `p = sigmoid(z)`:

    bce  = mean over every pixel of the batch of -(y log p + (1 - y) log(1 - p))
    dice_loss = 1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s),   s = 1 (smooth)
    loss = bce_weight * bce + dice_weight * dice_loss

The soft Dice loss is that of the transfer-learning benchmark's code
(`torch_dice_coef_loss` in MR-HosseinzadehTaher/BenchmarkTransferLearning,
`utils.py`: both tensors flattened, smooth = 1): the sums run over the whole
batch. segmentation_models_pytorch's binary `DiceLoss` sums over the batch too
(`dims=(0, 2)`, with `smooth=0` by default). With `per_image=True` the sums run
over each image instead and the loss is `1 - mean_i(dice_i)`. `bce + dice_loss` is
segmentation_models' `bce_dice_loss`.

Metrics (hard, threshold 0.5 on `p`, as the benchmark's `dice` / `mean_dice_coef`):
per image `I = |P ∩ Y|`, `|P|`, `|Y|` (`dice_counts`, on the device), then on the host
(`dice_metrics`):

    dice = mean_i 2 I_i / (|P_i| + |Y_i|)   (1 for an image with both P and Y empty)
    dice_pooled = 2 sum I / (sum |P| + sum |Y|),  iou_pooled = sum I / sum |P ∪ Y|
    iou = mean_i I_i / |P_i ∪ Y_i|          (1 for an image with both empty)

Images arrive as uint8 and are only scaled to [0, 1] on the device.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigssl_med import augment
from bigssl_med import optim

SMOOTH = 1.0
THRESHOLD = 0.5


def sigmoid_bce(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Binary cross-entropy with logits, the mean over every pixel of the batch."""
  logits = logits.astype(jnp.float32)
  return optax.sigmoid_binary_cross_entropy(logits, masks.astype(jnp.float32)).mean()


def soft_dice_loss(logits: jax.Array, masks: jax.Array, *, smooth: float = SMOOTH,
                   per_image: bool = False) -> jax.Array:
  """`1 - (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth)`, `p = sigmoid(logits)`.

  Sums over the whole batch (the benchmark's `torch_dice_coef_loss`), or over each
  image `[H, W, C]` with `per_image`, then averaged over the images.
  """
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))
  masks = masks.astype(jnp.float32)
  axes = tuple(range(1, probs.ndim)) if per_image else None
  intersection = jnp.sum(probs * masks, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(masks, axis=axes)
  return 1.0 - jnp.mean((2.0 * intersection + smooth) / (total + smooth))


def segmentation_loss(logits: jax.Array, masks: jax.Array, *, bce_weight: float = 1.0,
                      dice_weight: float = 1.0, smooth: float = SMOOTH,
                      per_image: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`bce_weight * bce + dice_weight * dice_loss`, and both parts."""
  bce = sigmoid_bce(logits, masks)
  dice_loss = soft_dice_loss(logits, masks, smooth=smooth, per_image=per_image)
  return bce_weight * bce + dice_weight * dice_loss, {'bce': bce, 'dice_loss': dice_loss}


def dice_counts(logits: jax.Array, masks: jax.Array, threshold: float = THRESHOLD) -> jax.Array:
  """int32 `[N, 3]`: per image `|P ∩ Y|`, `|P|` and `|Y|`, `P = sigmoid(logits) > threshold`."""
  predicted = jax.nn.sigmoid(logits.astype(jnp.float32)) > threshold
  truth = masks > 0.5 if jnp.issubdtype(masks.dtype, jnp.floating) else masks > 0
  axes = tuple(range(1, predicted.ndim))
  return jnp.stack([jnp.sum(predicted & truth, axis=axes, dtype=jnp.int32),
                    jnp.sum(predicted, axis=axes, dtype=jnp.int32),
                    jnp.sum(truth, axis=axes, dtype=jnp.int32)], axis=-1)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 1 where the denominator is 0 (both masks empty)."""
  return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 1.0)


def dice_metrics(counts: np.ndarray) -> dict[str, Any]:
  """Hard Dice and IoU, per image averaged and pooled, from `dice_counts` rows (host)."""
  counts = np.asarray(counts, np.float64).reshape(-1, 3)
  intersection, predicted, truth = counts[:, 0], counts[:, 1], counts[:, 2]
  union = predicted + truth - intersection
  if not len(counts):
    return {**{k: float('nan') for k in ('dice', 'iou', 'dice_pooled', 'iou_pooled')},
            'num_examples': 0}
  return {
      'dice': float(np.mean(_ratio(2.0 * intersection, predicted + truth))),
      'iou': float(np.mean(_ratio(intersection, union))),
      'dice_pooled': float(_ratio(2.0 * intersection.sum(), predicted.sum() + truth.sum())),
      'iou_pooled': float(_ratio(intersection.sum(), union.sum())),
      'num_examples': int(len(counts)),
  }


def _intersection_and_total(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  counts = counts.astype(jnp.float32)
  return counts[:, 0], counts[:, 1] + counts[:, 2]


def make_train_step(model, tx, schedule, *, bce_weight: float = 1.0, dice_weight: float = 1.0,
                    smooth: float = SMOOTH, per_image: bool = False):
  """`(state, batch, key[, lr_scale]) -> (state, metrics)`; `batch` has uint8 `image` and
  `mask`; `lr_scale` as `optim.gradient_step`."""

  def train_step(state, batch, key, lr_scale=None):
    del key  # the input pipeline did the random crops and flips
    variables = state['model']
    images = augment.to_float(batch['image'])
    masks = batch['mask'].astype(jnp.float32)

    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
          mutable=['batch_stats'])
      loss, parts = segmentation_loss(logits, masks, bce_weight=bce_weight,
                                      dice_weight=dice_weight, smooth=smooth,
                                      per_image=per_image)
      intersection, total = _intersection_and_total(dice_counts(logits, masks))
      dice = jnp.where(total > 0, 2 * intersection / jnp.maximum(total, 1), 1.0).mean()
      return loss, (updates['batch_stats'], {'loss': loss, **parts, 'dice': dice})

    return optim.gradient_step(state, loss_fn, tx, schedule, lr_scale)

  return train_step


def make_eval_step(model, threshold: float = THRESHOLD):
  """`(variables, batch) -> int32 [B, 3]` `dice_counts` of the batch's images and masks."""

  def eval_step(variables, batch):
    logits = model.apply(variables, augment.to_float(batch['image']), train=False)
    return dice_counts(logits, batch['mask'], threshold)

  return eval_step

