"""SIIM-ACR Pneumothorax Segmentation TFDS builder."""

from tfds_builders.siim_acr_pneumothorax.siim_acr_pneumothorax import SiimAcrPneumothorax

__all__ = ['SiimAcrPneumothorax']
