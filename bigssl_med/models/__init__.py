"""Models: SimCLR's ResNet encoder, the SimCLRv2 projection head, and builders."""

from bigssl_med.errors import ConfigError
from bigssl_med.models.heads import Classifier, ContrastiveModel, ProjectionHead
from bigssl_med.models.resnet import (CONV_PADDINGS, DEPTHS, INPUT_NORMALIZATIONS,
                                      STEM_POOL_PADDINGS, ResNet, feature_dim)
from bigssl_med.models.unet import UNet

__all__ = ['Classifier', 'ContrastiveModel', 'DEPTHS', 'ProjectionHead', 'ResNet', 'classifier',
           'contrastive_model',
           'UNet', 'unet_model',
           'ARCHITECTURE_KEYS', 'encoder', 'encoder_architecture', 'feature_dim']


# The config.model keys that make the encoder's function, and the value each of the later
# ones takes in a run config (`config.json`) written before it existed.
ARCHITECTURE_KEYS = ('depth', 'width_multiplier', 'sk_ratio', 'cifar_stem', 'stem_pool_padding',
                     'identity_shortcuts', 'input_normalization', 'conv_padding')
_ABSENT_MEANS = {'stem_pool_padding': 'same', 'identity_shortcuts': False,
                 'input_normalization': 'none', 'conv_padding': 'fixed'}


def encoder_architecture(model_config) -> dict:
  """The `ARCHITECTURE_KEYS` of `config.model` (a ConfigDict or a `config.json` dict)."""
  return {k: model_config[k] if k not in _ABSENT_MEANS else model_config.get(k, _ABSENT_MEANS[k])
          for k in ARCHITECTURE_KEYS}


def encoder(model_config, *, dtype) -> ResNet:
  """The ResNet encoder that `config.model` describes.

  `fused_bn` and the keys of `_ABSENT_MEANS` may be absent: run configs (`config.json`)
  written before they existed.
  """
  architecture = encoder_architecture(model_config)
  for key, allowed in (('stem_pool_padding', STEM_POOL_PADDINGS), ('conv_padding', CONV_PADDINGS),
                       ('input_normalization', tuple(INPUT_NORMALIZATIONS))):
    if architecture[key] not in allowed:
      raise ConfigError(f'config.model.{key}={architecture[key]!r} is not one of {allowed}')
  return ResNet(**architecture, dtype=dtype, fused_bn=model_config.get('fused_bn', False))


def contrastive_model(model_config, *, dtype, probe_classes: int = 0) -> ContrastiveModel:
  """The encoder + projection head (+ probe) that `config.model` describes."""
  return ContrastiveModel(
      encoder=encoder(model_config, dtype=dtype),
      head=ProjectionHead(num_layers=model_config.head_layers, out_dim=model_config.head_out_dim,
                          hidden_dim=model_config.head_hidden_dim, dtype=dtype),
      probe_classes=probe_classes)


def classifier(model_config, *, dtype, num_outputs: int, head_layers_kept: int,
               freeze_encoder: bool = False, feature_bn: bool = False,
               zero_init: bool = True) -> Classifier:
  """The encoder + first `head_layers_kept` head layers + classifier of `config.model`."""
  return Classifier(
      encoder=encoder(model_config, dtype=dtype),
      head=ProjectionHead(num_layers=model_config.head_layers, out_dim=model_config.head_out_dim,
                          hidden_dim=model_config.head_hidden_dim, dtype=dtype,
                          keep_layers=head_layers_kept),
      num_outputs=num_outputs, freeze_encoder=freeze_encoder, feature_bn=feature_bn,
      zero_init=zero_init)


def unet_model(model_config, *, dtype, decoder_channels=(256, 128, 64, 32, 16),
         num_outputs: int = 1) -> UNet:
  """The U-Net with the encoder of `config.model` (no projection head) and its decoder."""
  return UNet(
      encoder=encoder(model_config, dtype=dtype),
      decoder_channels=tuple(decoder_channels), num_outputs=num_outputs, dtype=dtype)
