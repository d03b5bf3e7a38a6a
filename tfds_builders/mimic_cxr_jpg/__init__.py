"""MIMIC-CXR-JPG TFDS builder."""

from tfds_builders.mimic_cxr_jpg.mimic_cxr_jpg import MimicCxrJpg

__all__ = ['MimicCxrJpg']
