"""DICOM files as a user's own images: `image_cases` builds them, with masks, and
`bigssl_med.predict` scores them as a build of them stores them."""

from __future__ import annotations

import io
import os
from pathlib import Path

from dicom_files import write_dicom
import numpy as np
from PIL import Image
import pydicom
from pydicom import encaps
import pytest

from bigssl_med import build_data
from bigssl_med import predict
from bigssl_med.data import host_ops
from bigssl_med.data import sources
from bigssl_med.errors import DataError
from conftest import assert_one_line_error, records_by_split
from tfds_builders import common
from tfds_builders import dicom

NAME = 'image_cases/scans'
HEIGHT, WIDTH = 24, 32


def _scan(index: int) -> np.ndarray:
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
  return (yy * 7 + xx * 3 + index * 11) % 256


def write_scans(root: Path, count: int = 12) -> dict[str, np.ndarray]:
  """`root/cases.csv` listing `count` DICOM scans (two per case; alternately JPEG
  baseline 8-bit and uncompressed 12-bit MONOCHROME1), each with a PNG mask of a
  rectangle; returns the 8-bit gray each should be stored as, by file name."""
  expected, lines = {}, ['path,case_id,label,mask']
  for i in range(count):
    name = f'scans/{i:03d}.dcm'
    if i % 2:
      values = (_scan(i) * 16).astype(np.uint16)  # 12 bits
      write_dicom(root / name, values, jpeg=False, bits_stored=12, photometric='MONOCHROME1')
      wide = (4095 - values.astype(np.int64)) << 4  # inverted, then scaled to 16 bits
      expected[name] = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    else:
      jpeg = write_dicom(root / name, _scan(i).astype(np.uint8))
      expected[name] = np.asarray(Image.open(io.BytesIO(jpeg)))
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[4:12, 5 + i:15 + i] = 255
    (root / 'masks').mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(root / 'masks' / f'{i:03d}.png')
    lines.append(f'{name},case{i // 2},{("normal", "abnormal")[i // 2 % 2]},masks/{i:03d}.png')
  (root / 'cases.csv').write_text('\n'.join(lines) + '\n')
  return expected


def test_image_cases_builds_dicom_files_gray_with_their_masks(tmp_path):
  expected = write_scans(tmp_path / 'raw')
  data_dir = tmp_path / 'data'
  build_data.build(NAME, data_dir=os.fspath(data_dir), manual_dir=os.fspath(tmp_path / 'raw'))
  info = sources.dataset_info(NAME, os.fspath(data_dir))
  assert info.features['image'].shape[-1] == 1  # DICOM X-rays are gray: one channel
  records = {i: r for split in records_by_split(data_dir, NAME).values()
             for i, r in split.items()}
  assert len(records) == len(expected)
  for image_id, record in records.items():
    with Image.open(io.BytesIO(record['image'])) as image:
      assert (image.format, image.mode) == ('PNG', 'L')
      np.testing.assert_array_equal(np.asarray(image), expected[image_id], err_msg=image_id)
    with Image.open(io.BytesIO(record['mask'])) as mask:
      assert mask.size == (WIDTH, HEIGHT)


def test_a_mask_of_another_size_than_its_dicom_image(tmp_path):
  write_scans(tmp_path / 'raw', count=4)
  Image.new('L', (WIDTH + 1, HEIGHT)).save(tmp_path / 'raw' / 'masks' / '002.png')
  with pytest.raises(DataError) as excinfo:
    build_data.build(NAME, data_dir=os.fspath(tmp_path / 'data'),
                     manual_dir=os.fspath(tmp_path / 'raw'))
  assert_one_line_error(excinfo, '002.png', f'{WIDTH + 1}x{HEIGHT}')


def test_an_undecodable_dicom_file_names_its_line(tmp_path):
  write_scans(tmp_path / 'raw', count=4)
  path = tmp_path / 'raw' / 'scans' / '001.dcm'
  path.write_bytes(path.read_bytes()[:-100])  # pixel data cut short
  with pytest.raises(DataError) as excinfo:
    build_data.build(NAME, data_dir=os.fspath(tmp_path / 'data'),
                     manual_dir=os.fspath(tmp_path / 'raw'))
  assert_one_line_error(excinfo, path, 'cases.csv line 3')


def test_read_image_file_reads_dicom_and_leaves_other_files_alone(tmp_path):
  write_dicom(tmp_path / 'a.dcm', _scan(0).astype(np.uint8), jpeg=False)
  png = common.read_image_file(os.fspath(tmp_path / 'a.dcm'), 'row 2')
  assert png[:8] == b'\x89PNG\r\n\x1a\n'
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), _scan(0))
  Image.fromarray(_scan(1).astype(np.uint8)).save(tmp_path / 'b.png')
  assert common.read_image_file(os.fspath(tmp_path / 'b.png'), 'row 3') == (
      tmp_path / 'b.png').read_bytes()
  assert dicom.is_dicom((tmp_path / 'a.dcm').read_bytes()[:132])
  assert not dicom.is_dicom((tmp_path / 'b.png').read_bytes())


def test_predict_scores_dicom_files_as_their_build_stores_them(tmp_path):
  write_scans(tmp_path / 'raw')
  data_dir = tmp_path / 'data'
  build_data.build(NAME, data_dir=os.fspath(data_dir), manual_dir=os.fspath(tmp_path / 'raw'),
                   max_side=16)
  source = sources.open_split(NAME, 'train', os.fspath(data_dir))
  for i in range(len(source)):
    name = source[i]['image_id'].decode()
    item = predict.Item(path=name, file=os.fspath(tmp_path / 'raw' / name), where='',
                        columns=())
    got = predict.load_image(item, 8, 0.875, {'max_side': 16, 'channels': 1})
    want = host_ops.center_crop(source[i]['image'], 8, 0.875, channels=3)
    np.testing.assert_array_equal(got, want, err_msg=name)
    # Unbuilt, the decoded pixels give the view their PNG gives.
    png = dicom.read_png(item.file, name)
    for resize, view in (('square', host_ops.center_crop), ('squash', host_ops.squash_crop)):
      np.testing.assert_array_equal(predict.load_image(item, 8, 0.875, resize=resize),
                                    view(png, 8, 0.875, channels=3), err_msg=name)
  listed = predict._folder_images(os.fspath(tmp_path / 'raw' / 'scans'))  # pylint: disable=protected-access
  assert [Path(item.file).suffix for item in listed] == ['.dcm'] * 12


@pytest.mark.parametrize('bits', [8, 12])
def test_jpeg_2000_lossless_decodes_exactly_without_plugins(tmp_path, bits):
  """JPEG 2000, as many archives store X-rays, decodes through Pillow's OpenJPEG: no
  pydicom plugin needed (JPEG Lossless and JPEG-LS do need one; pydicom's error, inside
  ours, names it)."""
  values = np.arange(64 * 48).reshape(48, 64) % (1 << bits)
  pixels = values.astype(np.uint8 if bits == 8 else np.uint16)
  path = tmp_path / 'j2k.dcm'
  write_dicom(path, pixels, jpeg=False, bits_stored=bits)
  codestream = io.BytesIO()
  Image.fromarray(pixels).save(codestream, format='JPEG2000', no_jp2=True, irreversible=False)
  dataset = pydicom.dcmread(path)
  dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
  dataset.PixelData = encaps.encapsulate([codestream.getvalue()])
  dataset['PixelData'].VR = 'OB'
  dataset.save_as(path)
  image = dicom.read_image(os.fspath(path), 'row 2')
  want = values if bits == 8 else values << (16 - bits)
  assert image.mode == ('L' if bits == 8 else 'I;16')
  np.testing.assert_array_equal(np.asarray(image), want)
