"""CheXpert TFDS builder."""

from tfds_builders.chexpert.chexpert import Chexpert

__all__ = ['Chexpert']
