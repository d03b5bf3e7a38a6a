"""TFDS builder for a user's own images listed in a `cases.csv`."""

from tfds_builders.image_cases.image_cases import ImageCases
from tfds_builders.image_cases.image_cases import ImageCasesConfig

__all__ = ['ImageCases', 'ImageCasesConfig']
