"""MedMNIST v2 / MedMNIST+ TFDS builder: 12 2D subsets at 28, 64, 128, 224."""

from tfds_builders.medmnist.medmnist import Medmnist
from tfds_builders.medmnist.medmnist import MedmnistConfig

__all__ = ['Medmnist', 'MedmnistConfig']
