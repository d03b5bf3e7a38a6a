"""The jitted steps of contrastive pretraining, as pure functions of a model and optimiser.

Shared by the `pretrain` trainer and `benchmarks/pretrain_step.py`, so the benchmark
times exactly the trainer's step. Nothing here reads configs or touches the input
pipeline.
"""

import jax
import jax.numpy as jnp
import optax

from bigssl_med import augment
from bigssl_med import losses
from bigssl_med import optim


def make_train_step(model, tx, schedule, *, augment_views, temperature: float,
                    weight_decay: float):
  """`(state, batch, key) -> (state, metrics)` for one global batch of positive pairs.

  `batch['views']` is uint8 `[B, 2, S, S, C]`; the two views of row i are interleaved
  into one `[2B, ...]` forward pass (BatchNorm sees both views, as in SimCLR). With a
  linear probe, `batch['label']` is int `[B, 2]`, the label of each view's image; a label
  of -1 (an unlabeled image) is left out of the probe's loss and accuracy.
  """

  def train_step(state, batch, key):
    variables, opt = state['model'], state['opt']
    views = batch['views']
    b = views.shape[0]
    images = augment_views(jax.random.fold_in(key, opt['step']),
                           views.reshape((2 * b,) + views.shape[2:]))

    def loss_fn(params):
      (_, z, logits), updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
          mutable=['batch_stats'])
      z = z.reshape(b, 2, -1)
      loss, logits_ab = losses.nt_xent(z[:, 0], z[:, 1], temperature, return_logits=True)
      metrics = {'contrastive_loss': loss,
                 'contrastive_accuracy': losses.contrastive_accuracy(logits_ab),
                 'contrastive_entropy': losses.contrastive_entropy(logits_ab)}
      total = loss
      if logits is not None:
        labels = batch['label'].reshape(2 * b)
        labeled = labels >= 0
        count = jnp.maximum(jnp.sum(labeled), 1)
        per_image = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        probe_loss = jnp.sum(jnp.where(labeled, per_image, 0.0)) / count
        total = total + probe_loss + optim.head_l2(params, weight_decay)
        metrics['probe_loss'] = probe_loss
        metrics['probe_accuracy'] = jnp.sum((jnp.argmax(logits, -1) == labels) & labeled) / count
      metrics['loss'] = total
      return total, (updates['batch_stats'], metrics)

    return optim.gradient_step(state, loss_fn, tx, schedule)

  return train_step


def make_eval_steps(model, *, augment_views, temperature: float):
  """Jit-able evaluation steps: contrastive metrics on pairs, probe accuracy on images."""

  def pairs_step(variables, batch, key):
    views = batch['views']
    b = views.shape[0]
    images = augment_views(key, views.reshape((2 * b,) + views.shape[2:]))
    _, z, _ = model.apply(variables, images, train=False)
    z = z.reshape(b, 2, -1)
    loss, logits_ab = losses.nt_xent(z[:, 0], z[:, 1], temperature, return_logits=True)
    return {'contrastive_loss': loss,
            'contrastive_accuracy': losses.contrastive_accuracy(logits_ab),
            'contrastive_entropy': losses.contrastive_entropy(logits_ab)}

  def images_step(variables, batch):
    _, _, logits = model.apply(variables, augment.to_float(batch['image']), train=False)
    counted = batch['mask'] * (batch['label'] >= 0)  # padding and unlabeled images left out
    correct = (jnp.argmax(logits, -1) == batch['label']) * counted
    return {'correct': jnp.sum(correct), 'count': jnp.sum(counted)}

  return pairs_step, images_step
