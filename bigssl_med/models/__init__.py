"""Models: SimCLR's ResNet encoder, the SimCLRv2 projection head, and builders."""

from bigssl_med.errors import ConfigError
from bigssl_med.models.heads import Classifier, ContrastiveModel, ProjectionHead
from bigssl_med.models.resnet import (DEPTHS, INPUT_NORMALIZATIONS, STEM_POOL_PADDINGS, ResNet,
                                      feature_dim)
from bigssl_med.models.unet import UNet

__all__ = ['Classifier', 'ContrastiveModel', 'DEPTHS', 'ProjectionHead', 'ResNet', 'classifier',
           'contrastive_model',
           'UNet', 'unet_model',
           'encoder', 'feature_dim']


def encoder(model_config, *, dtype) -> ResNet:
  """The ResNet encoder that `config.model` describes.

  `fused_bn`, `stem_pool_padding`, `identity_shortcuts` and `input_normalization` may
  be absent: run configs (`config.json`) written before they existed.
  """
  stem_pool_padding = model_config.get('stem_pool_padding', 'same')
  if stem_pool_padding not in STEM_POOL_PADDINGS:
    raise ConfigError(f'config.model.stem_pool_padding={stem_pool_padding!r} is not one of '
                      f'{STEM_POOL_PADDINGS}')
  input_normalization = model_config.get('input_normalization', 'none')
  if input_normalization not in INPUT_NORMALIZATIONS:
    raise ConfigError(f'config.model.input_normalization={input_normalization!r} is not one '
                      f'of {tuple(INPUT_NORMALIZATIONS)}')
  return ResNet(depth=model_config.depth, width_multiplier=model_config.width_multiplier,
                sk_ratio=model_config.sk_ratio, cifar_stem=model_config.cifar_stem,
                dtype=dtype, fused_bn=model_config.get('fused_bn', False),
                stem_pool_padding=stem_pool_padding,
                identity_shortcuts=model_config.get('identity_shortcuts', False),
                input_normalization=input_normalization)


def contrastive_model(model_config, *, dtype, probe_classes: int = 0) -> ContrastiveModel:
  """The encoder + projection head (+ probe) that `config.model` describes."""
  return ContrastiveModel(
      encoder=encoder(model_config, dtype=dtype),
      head=ProjectionHead(num_layers=model_config.head_layers, out_dim=model_config.head_out_dim,
                          hidden_dim=model_config.head_hidden_dim, dtype=dtype),
      probe_classes=probe_classes)


def classifier(model_config, *, dtype, num_outputs: int, head_layers_kept: int,
               freeze_encoder: bool = False) -> Classifier:
  """The encoder + first `head_layers_kept` head layers + classifier of `config.model`."""
  return Classifier(
      encoder=encoder(model_config, dtype=dtype),
      head=ProjectionHead(num_layers=model_config.head_layers, out_dim=model_config.head_out_dim,
                          hidden_dim=model_config.head_hidden_dim, dtype=dtype,
                          keep_layers=head_layers_kept),
      num_outputs=num_outputs, freeze_encoder=freeze_encoder)


def unet_model(model_config, *, dtype, decoder_channels=(256, 128, 64, 32, 16),
         num_outputs: int = 1) -> UNet:
  """The U-Net with the encoder of `config.model` (no projection head) and its decoder."""
  return UNet(
      encoder=encoder(model_config, dtype=dtype),
      decoder_channels=tuple(decoder_channels), num_outputs=num_outputs, dtype=dtype)
