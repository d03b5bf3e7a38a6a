"""RSNA Pneumonia Detection Challenge TFDS builder."""

from tfds_builders.rsna_pneumonia.rsna_pneumonia import RsnaPneumonia

__all__ = ['RsnaPneumonia']
