"""The project's TFDS builders.

Callers look builders up in `BUILDERS` (name -> builder class) rather than through
TFDS's registry, so that which builder runs never depends on import side effects.
"""

from tfds_builders.chexpert import Chexpert
from tfds_builders.drive import Drive
from tfds_builders.ham10000 import Ham10000
from tfds_builders.image_cases import ImageCases
from tfds_builders.medmnist import Medmnist
from tfds_builders.mimic_cxr_jpg import MimicCxrJpg
from tfds_builders.montgomery import Montgomery
from tfds_builders.nih_chest_xray14 import NihChestXray14
from tfds_builders.rsna_pneumonia import RsnaPneumonia
from tfds_builders.shenzhen import Shenzhen
from tfds_builders.siim_acr_pneumothorax import SiimAcrPneumothorax

BUILDERS = {
    'chexpert': Chexpert,
    'drive': Drive,
    'ham10000': Ham10000,
    'image_cases': ImageCases,
    'medmnist': Medmnist,
    'mimic_cxr_jpg': MimicCxrJpg,
    'montgomery': Montgomery,
    'nih_chest_xray14': NihChestXray14,
    'rsna_pneumonia': RsnaPneumonia,
    'shenzhen': Shenzhen,
    'siim_acr_pneumothorax': SiimAcrPneumothorax,
}

__all__ = ['BUILDERS', 'Chexpert', 'Drive', 'Ham10000', 'ImageCases', 'Medmnist',
           'MimicCxrJpg', 'Montgomery', 'NihChestXray14', 'RsnaPneumonia',
           'Shenzhen', 'SiimAcrPneumothorax']
