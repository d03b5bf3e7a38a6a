"""HAM10000 TFDS builder."""

from tfds_builders.ham10000.ham10000 import Ham10000

__all__ = ['Ham10000']
