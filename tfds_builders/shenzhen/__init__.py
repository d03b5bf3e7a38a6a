"""Shenzhen chest X-ray TFDS builder."""

from tfds_builders.shenzhen.shenzhen import Shenzhen

__all__ = ['Shenzhen']
