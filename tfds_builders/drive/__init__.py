"""DRIVE retinal vessel segmentation TFDS builder."""

from tfds_builders.drive.drive import Drive

__all__ = ['Drive']
