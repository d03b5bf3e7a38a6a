"""SimCLRv2 projection head and the contrastive model (encoder + head).

Faithful to SimCLR's public TF2 `model.py` (`proj_head_mode='nonlinear'`): hidden
layers are Dense without bias (kernel ~ N(0, 0.01)) + BN (with beta) + ReLU at the
input width; the last layer is Dense without bias to `out_dim` + BN without beta,
and no ReLU. The head returns every intermediate output, so fine-tuning can start
from any head layer (SimCLRv2 fine-tunes from the first). The last layer computes in
float32 whatever the compute dtype, so the vectors the contrastive loss compares at
temperature 0.1 are not rounded to bfloat16 (a 128-wide layer: no measurable cost).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigssl_med.models.resnet import BN_EPSILON, BN_MOMENTUM, ResNet

dense_init = nn.initializers.normal(stddev=0.01)


class ProjectionHead(nn.Module):
  """`num_layers` Dense+BN layers; returns `(input, layer_1, ..., layer_num_layers)`.

  `hidden_dim=0` keeps the input width in the hidden layers (SimCLR's choice);
  `num_layers=0` is no head at all (the encoder's features are used directly).
  `keep_layers=k` (0 <= k <= num_layers) builds and runs only the first k layers,
  with the names and shapes they have in the whole head, so that fine-tuning can
  load them from a pretrained head; -1 keeps all.
  """
  num_layers: int = 3
  out_dim: int = 128
  hidden_dim: int = 0
  dtype: Any = jnp.float32
  keep_layers: int = -1

  @nn.compact
  def __call__(self, h, train: bool = True):
    hiddens = [h]
    keep = self.num_layers if self.keep_layers < 0 else self.keep_layers
    if keep > self.num_layers:
      raise ValueError(f'keep_layers={keep} exceeds the head\'s {self.num_layers} layers')
    for j in range(keep):
      last = j == self.num_layers - 1
      width = self.out_dim if last else (self.hidden_dim or h.shape[-1])
      dtype = jnp.float32 if last else self.dtype
      x = nn.Dense(width, use_bias=False, kernel_init=dense_init, dtype=dtype,
                   name=f'dense{j}')(hiddens[-1])
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                       epsilon=BN_EPSILON, use_bias=not last, dtype=dtype,
                       name=f'bn{j}')(x)
      hiddens.append(x if last else nn.relu(x))
    return tuple(jnp.asarray(x, jnp.float32) for x in hiddens)


class ContrastiveModel(nn.Module):
  """Encoder + projection head, with SimCLR's optional linear probe.

  Returns `(features, projections, probe_logits)`: pooled encoder features, the head's
  last output (the vectors the contrastive loss compares) and, when
  `probe_classes > 0`, logits of a linear classifier on the stop-gradient features
  (SimCLR's `lineareval_while_pretraining`: it measures the representation during
  pretraining and never changes it). `probe_logits` is None otherwise.
  Parameters live under `encoder`, `head` and `probe`.

  Unlike SimCLR, the probe's input is first standardised by a BatchNorm without
  scale or offset (`probe_bn`): the probe is trained by plain momentum SGD at the
  pretraining learning rate, which diverges on raw features whose squared norm is
  large; standardised inputs keep it stable for any encoder width.
  """
  encoder: ResNet
  head: ProjectionHead
  probe_classes: int = 0

  @nn.compact
  def __call__(self, x, train: bool = True):
    features = self.encoder(x, train)
    projections = self.head(features, train)[-1]
    logits = None
    if self.probe_classes:
      inputs = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                            epsilon=BN_EPSILON, use_scale=False, use_bias=False,
                            name='probe_bn')(jax.lax.stop_gradient(features))
      logits = nn.Dense(self.probe_classes, kernel_init=dense_init, name='probe')(inputs)
    return features, projections, logits


class Classifier(nn.Module):
  """Encoder, the first projection-head layers, and a linear classifier.

  SimCLRv2 fine-tunes from the first layer of the projection head: with
  `head.keep_layers=1` the classifier reads that layer's output. Parameters live
  under `encoder`, `head` and `classifier`, so `encoder` and `head` load from a
  `ContrastiveModel` checkpoint.

  With `freeze_encoder` (linear evaluation) the encoder and the kept head layers run
  in inference mode (BatchNorm with its stored statistics, as SimCLR's frozen
  blocks do) and their output is a stop-gradient; the trainer keeps the frozen
  parameters fixed. SimCLR's linear layer reads those features as they are; with
  `feature_bn` they are first standardised by a BatchNorm without scale or offset
  (as the pretraining probe's).

  `zero_init` starts the classifier at zero (SimCLR's `zero_init_logits_layer`,
  which its fine-tuning and linear-evaluation commands set); otherwise its kernel
  is drawn from N(0, 0.01) and its bias is zero.
  """
  encoder: ResNet
  head: ProjectionHead
  num_outputs: int
  freeze_encoder: bool = False
  feature_bn: bool = False
  zero_init: bool = True

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.freeze_encoder:
      features = jax.lax.stop_gradient(self.head(self.encoder(x, False), False)[-1])
    else:
      features = self.head(self.encoder(x, train), train)[-1]
    if self.feature_bn:
      features = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                              epsilon=BN_EPSILON, use_scale=False, use_bias=False,
                              name='feature_bn')(features)
    kernel_init = nn.initializers.zeros if self.zero_init else dense_init
    return nn.Dense(self.num_outputs, kernel_init=kernel_init, name='classifier')(features)
