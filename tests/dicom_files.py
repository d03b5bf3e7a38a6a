"""DICOM files for the builder tests, written with pydicom as the published sets ship them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
import pydicom
from pydicom import encaps
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset


def write_dicom(path: Path, pixels: np.ndarray, *, jpeg: bool = True, bits_stored: int = 8,
                photometric: str = 'MONOCHROME2', signed: bool = False, frames: int = 1,
                **header) -> bytes | None:
  """Writes a DICOM file of `pixels` (uint8/uint16 [rows, cols] or uint8 RGB); JPEG
  baseline (as SIIM-ACR's files) when `jpeg`, else explicit VR little endian.
  Returns the JPEG bytes it encapsulated (None when uncompressed). The SOP instance UID
  is the file stem where that is a UID (SIIM-ACR's names), else made up."""
  path.parent.mkdir(parents=True, exist_ok=True)
  is_uid = '.' in path.stem and all(part.isdigit() for part in path.stem.split('.'))
  sop = header.pop('SOPInstanceUID', path.stem if is_uid else '1.2.3')
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = sop
  meta.TransferSyntaxUID = uid.JPEGBaseline8Bit if jpeg else uid.ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = uid.SecondaryCaptureImageStorage
  ds.SOPInstanceUID = sop
  ds.Modality = 'CR'
  with pydicom.config.disable_value_validation():  # the competition writes PatientAge `38`
    for keyword, value in header.items():
      setattr(ds, keyword, value)
  ds.Rows, ds.Columns = pixels.shape[:2]
  colour = pixels.ndim == 3
  ds.SamplesPerPixel = 3 if colour else 1
  ds.PhotometricInterpretation = 'RGB' if colour else photometric
  if colour:
    ds.PlanarConfiguration = 0
  allocated = 8 if pixels.dtype.itemsize == 1 else 16
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
  ds.PixelRepresentation = int(signed)
  if frames != 1:
    ds.NumberOfFrames = frames
  if jpeg:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    ds.PixelData = encaps.encapsulate([buffer.getvalue()])
    ds['PixelData'].VR = 'OB'
  else:
    data = np.concatenate([pixels.ravel()] * frames)
    ds.PixelData = data.astype(pixels.dtype.newbyteorder('<')).tobytes()
  if int(pydicom.__version__.split('.')[0]) >= 3:
    ds.save_as(path, enforce_file_format=True)
  else:  # pydicom 2.x (setup.py's minimum is 2.4): the encoding is set on the dataset
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)
  return buffer.getvalue() if jpeg else None
