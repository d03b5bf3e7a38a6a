"""Models: SimCLR's ResNet encoder, the SimCLRv2 projection head, and builders."""

from bigssl_med.models.heads import ContrastiveModel, ProjectionHead
from bigssl_med.models.resnet import DEPTHS, ResNet, feature_dim

__all__ = ['ContrastiveModel', 'DEPTHS', 'ProjectionHead', 'ResNet', 'contrastive_model',
           'feature_dim']


def contrastive_model(model_config, *, dtype, probe_classes: int = 0) -> ContrastiveModel:
  """The encoder + projection head (+ probe) that `config.model` describes."""
  return ContrastiveModel(
      encoder=ResNet(depth=model_config.depth, width_multiplier=model_config.width_multiplier,
                     sk_ratio=model_config.sk_ratio, cifar_stem=model_config.cifar_stem,
                     dtype=dtype),
      head=ProjectionHead(num_layers=model_config.head_layers, out_dim=model_config.head_out_dim,
                          hidden_dim=model_config.head_hidden_dim, dtype=dtype),
      probe_classes=probe_classes)
