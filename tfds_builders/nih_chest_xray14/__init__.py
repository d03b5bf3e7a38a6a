"""NIH ChestX-ray14 TFDS builder."""

from tfds_builders.nih_chest_xray14.nih_chest_xray14 import NihChestXray14

__all__ = ['NihChestXray14']
