"""Tests of the siim_acr_pneumothorax TFDS builder and the DICOM reader, on generated
trees in the competition's published layout (DICOM files written with pydicom)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from pathlib import Path

from dicom_files import write_dicom
import numpy as np
from PIL import Image
import pydicom
import pytest

from bigssl_med import build_data
from bigssl_med.data import sources
from bigssl_med.errors import DataError
from conftest import assert_manual_only, assert_one_line_error, ids_per_split, records_by_split
import tfds_builders
from tfds_builders import common
from tfds_builders import dicom
from tfds_builders.siim_acr_pneumothorax import siim_acr_pneumothorax as siim

NAME = 'siim_acr_pneumothorax'
BUILD = f'{NAME}/original'
WIDTH, HEIGHT = 32, 24  # not square, so that a transposed mask cannot pass
UID_ROOT = '1.2.276.0.7230010.3.1'  # the prefix of the competition's UIDs


# ----------------------------------------------------------------------------
# Writing RLE tables, independently of the code under test.
# ----------------------------------------------------------------------------


def rle(mask: np.ndarray, form: str) -> str:
  """The runs of a bool [height, width] mask, column-major, in the `form` of the
  competition's tables: 'relative' (stage 1) or 'absolute' (1-based starts)."""
  flat = np.concatenate([[0], mask.T.reshape(-1).astype(np.int64), [0]])
  edges = np.flatnonzero(np.diff(flat))
  numbers, end = [], 0
  for begin, stop in zip(edges[0::2], edges[1::2]):
    numbers += [begin + 1, stop - begin] if form == 'absolute' else [begin - end, stop - begin]
    end = stop
  return ' '.join(str(int(n)) for n in numbers)


def blob(rng, height=HEIGHT, width=WIDTH) -> np.ndarray:
  """A random ellipse spanning several columns (so its runs number more than one)."""
  yy, xx = np.mgrid[0:height, 0:width]
  cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.2, 0.8) * width
  ry, rx = rng.uniform(3, 6), rng.uniform(3, 7)
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


@dataclasses.dataclass
class Image_:
  image_id: str
  patient: str
  path: Path
  jpeg: bytes
  regions: list[np.ndarray]


@dataclasses.dataclass
class FakeSiim:
  """A generated competition tree under `root`; `images` keyed by ImageId."""
  root: Path
  table: Path
  images: dict[str, Image_]
  unannotated: list[Path]

  def image_id(self, split: str, index: int = 0, *, regions: bool | None = None) -> str:
    ids = [i for i, im in sorted(self.images.items())
           if siim.split_for_case(im.patient) == split
           and (regions is None or bool(im.regions) == regions)]
    return ids[index]

  def write_table(self, form: str = 'relative', name: str | None = None,
                  duplicate: bool = True) -> Path:
    """The annotation table, one row per region or `-1`, as stage 1 writes it (a space
    after each comma); the first image with a region has its first row twice."""
    path = self.root / (name or self.table.name)
    lines = ['ImageId, EncodedPixels']
    duplicated = not duplicate
    for image_id, image in self.images.items():
      if not image.regions:
        lines.append(f'{image_id}, -1')
      for region in image.regions:
        lines.append(f'{image_id}, {rle(region, form)}')
        if not duplicated:
          lines.append(lines[-1])
          duplicated = True
    path.write_text('\n'.join(lines) + '\n')
    return path


def _patients(per_split: dict[str, int]) -> list[str]:
  """Patient ids of the competition's form (UUIDs), `per_split[split]` in each split."""
  found = ids_per_split(lambda number: f'{number:08x}-a0d2-4901-b33a-63906aa48d9f',
                        siim.split_for_case, per_split)
  return [p for split in per_split for p in found[split]]


def write_fake_siim(parent: Path, per_split=(5, 2, 2), seed: int = 0) -> FakeSiim:
  """`parent/siim` as the competition's stage 1 files unpack: `train-rle.csv`,
  `dicom-images-train/<study>/<series>/<ImageId>.dcm` and two unannotated images in
  `dicom-images-test/`. The first patient of each split has two images (two studies);
  every other image has one or two pneumothorax regions (bright ellipses) or none."""
  rng = np.random.default_rng(seed)
  root = parent / 'siim'
  root.mkdir(parents=True)
  fake = FakeSiim(root=root, table=root / 'train-rle.csv', images={}, unannotated=[])
  patients = _patients(dict(zip(siim.SPLIT_NAMES, per_split)))
  firsts = {siim.split_for_case(p): p for p in reversed(patients)}
  number = 0
  for patient in patients:
    for _ in range(2 if patient in firsts.values() else 1):
      number += 1
      image_id = f'{UID_ROOT}.4.8323329.{1000 + number}.1517875166.{8500 + number}'
      study = f'{UID_ROOT}.2.8323329.{1000 + number}.1517875166.{8400 + number}'
      series = f'{UID_ROOT}.3.8323329.{1000 + number}.1517875166.{8300 + number}'
      regions = [blob(rng) for _ in range(number % 3)]  # 0, 1 or 2 regions
      pixels = rng.normal(90, 12, (HEIGHT, WIDTH))
      for region in regions:
        pixels[region] += 80
      path = root / 'dicom-images-train' / study / series / f'{image_id}.dcm'
      jpeg = write_dicom(path, np.clip(pixels, 0, 255).astype(np.uint8), PatientID=patient,
                         StudyInstanceUID=study, SeriesInstanceUID=series,
                         PatientSex='MF'[number % 2], PatientAge=str(20 + number),
                         ViewPosition=('PA', 'AP')[number % 2])
      fake.images[image_id] = Image_(image_id, patient, path, jpeg, regions)
  for k in range(2):
    image_id = f'{UID_ROOT}.4.8323329.{9000 + k}.1517875166.{9900 + k}'
    path = root / 'dicom-images-test' / f'{UID_ROOT}.2.{k}' / f'{UID_ROOT}.3.{k}' / (
        f'{image_id}.dcm')
    write_dicom(path, np.full((HEIGHT, WIDTH), 50, np.uint8), PatientID=f'test-{k}')
    fake.unannotated.append(path)
  fake.write_table()
  return fake


@pytest.fixture
def fake(tmp_path) -> FakeSiim:
  return write_fake_siim(tmp_path / 'raw')


def _build(fake, data_dir, name=BUILD, manual_dir=None, **kwargs) -> str:
  return build_data.build(name, data_dir=os.fspath(data_dir),
                          manual_dir=os.fspath(manual_dir or fake.root.parent), **kwargs)


def _decoded(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    assert (image.format, image.mode) == ('PNG', 'L')
    return np.asarray(image)


def _union(image: Image_) -> np.ndarray:
  union = np.zeros((HEIGHT, WIDTH), bool)
  for region in image.regions:
    union |= region
  return union


# ----------------------------------------------------------------------------
# Registration, splits and a build.
# ----------------------------------------------------------------------------


def test_registered_manual_only_with_side512_default():
  assert tfds_builders.BUILDERS[NAME] is tfds_builders.SiimAcrPneumothorax
  assert tfds_builders.SiimAcrPneumothorax.name == NAME
  assert tfds_builders.SiimAcrPneumothorax.DOWNLOADS is False
  assert [c.name for c in tfds_builders.SiimAcrPneumothorax.BUILDER_CONFIGS] == [
      'side512', 'original']


def test_split_rule_matches_docstring():
  import hashlib  # pylint: disable=g-import-not-at-top
  for case_id in ('17d405a3-a0d2-4901-b33a-63906aa48d9f', 'x'):
    bucket = int(hashlib.sha256(case_id.encode()).hexdigest(), 16) % 100
    expected = 'train' if bucket < 80 else 'validation' if bucket < 90 else 'test'
    assert siim.split_for_case(case_id) == expected


def test_build_stores_images_masks_labels_and_header_fields(fake, tmp_path):
  data_dir = tmp_path / 'data'
  version_dir = _build(fake, data_dir)
  assert version_dir == os.fspath(data_dir / NAME / 'original' / '1.0.0')
  records = records_by_split(data_dir, BUILD)
  assert {split: len(r) for split, r in records.items()} == {
      'train': 6, 'validation': 3, 'test': 3}
  info = sources.dataset_info(BUILD, os.fspath(data_dir))
  assert info.features['label'].names == ['no_pneumothorax', 'pneumothorax']
  numbers = sorted(fake.images)
  for split, by_id in records.items():
    for image_id, record in by_id.items():
      image = fake.images[image_id]
      number = int(image_id.split('.')[-3]) - 1000
      assert siim.split_for_case(image.patient) == split
      assert record['case_id'].decode() == image.patient
      assert record['study_id'].decode() == f'{UID_ROOT}.2.8323329.{1000 + number}.1517875166.' \
                                             f'{8400 + number}'
      assert record['sex'].decode() == 'MF'[number % 2]
      assert record['age'] == pytest.approx(20 + number)
      assert record['view_position'].decode() == ('PA', 'AP')[number % 2]
      assert record['num_regions'] == len(image.regions)
      assert info.features['label'].int2str(record['label']) == (
          'pneumothorax' if image.regions else 'no_pneumothorax')
      # The pixels are the file's JPEG decoded (by Pillow, without pydicom).
      np.testing.assert_array_equal(_decoded(record['image']),
                                    np.asarray(Image.open(io.BytesIO(image.jpeg))))
      stored = _decoded(record['mask'])
      assert stored.shape == (HEIGHT, WIDTH) and set(np.unique(stored)) <= {0, 255}
      np.testing.assert_array_equal(stored == 255, _union(image))
  assert len(numbers) == 12
  assert {len(im.regions) for im in fake.images.values()} == {0, 1, 2}
  metadata = info.metadata
  assert metadata['annotation_file'] == 'train-rle.csv'
  assert metadata['rle_encoding'] == 'relative'
  assert metadata['num_unannotated_images'] == 2
  assert metadata['num_images_without_patient_id'] == 0
  assert metadata['num_skipped_images'] == 0


def test_a_patients_images_share_a_split_and_the_index(fake, tmp_path):
  version_dir = _build(fake, tmp_path / 'data')
  records = records_by_split(tmp_path / 'data', BUILD)
  split_of = {}
  for split, by_id in records.items():
    for record in by_id.values():
      assert split_of.setdefault(record['case_id'], split) == split
  counts = {}
  for image in fake.images.values():
    counts[image.patient] = counts.get(image.patient, 0) + 1
  assert sorted(counts.values()).count(2) == 3  # one patient of two images per split
  with open(os.path.join(version_dir, sources.CASE_INDEX_FILE)) as f:
    index = json.load(f)
  assert index['dataset'] == NAME
  for split, entry in index['splits'].items():
    assert sorted(entry['case_ids']) == sorted(r['case_id'].decode()
                                               for r in records[split].values())


def test_stage_2_table_in_absolute_form_is_preferred_and_read(fake, tmp_path):
  """stage_2_train.csv beside train-rle.csv is read; its 1-based starts are detected."""
  fake.write_table('absolute', name='stage_2_train.csv', duplicate=False)
  (fake.root / 'train-rle.csv').write_text('ImageId, EncodedPixels\nnot read, -1\n')
  data_dir = tmp_path / 'data'
  _build(fake, data_dir)
  info = sources.dataset_info(BUILD, os.fspath(data_dir))
  assert info.metadata['annotation_file'] == 'stage_2_train.csv'
  assert info.metadata['rle_encoding'] == 'absolute'
  for by_id in records_by_split(data_dir, BUILD).values():
    for image_id, record in by_id.items():
      np.testing.assert_array_equal(_decoded(record['mask']) == 255,
                                    _union(fake.images[image_id]))


def test_side_config_downscales_images_and_masks(fake, tmp_path):
  data_dir = tmp_path / 'data'
  assert _build(fake, data_dir, name=NAME, max_side=16) == os.fspath(
      data_dir / NAME / 'side16' / '1.0.0')
  for by_id in records_by_split(data_dir, f'{NAME}/side16').values():
    for record in by_id.values():
      assert _decoded(record['image']).shape == _decoded(record['mask']).shape == (12, 16)
      assert set(np.unique(_decoded(record['mask']))) <= {0, 255}


def test_without_manual_dir_it_says_where_to_get_the_set(tmp_path):
  assert_manual_only(NAME, tfds_builders.SiimAcrPneumothorax, tmp_path,
                     'kaggle.com/c/siim-acr-pneumothorax-segmentation', 'train-rle.csv')


# ----------------------------------------------------------------------------
# Run-length encoding.
# ----------------------------------------------------------------------------


def test_decode_mask_by_hand():
  """4 high, 3 wide; pixels numbered down each column: relative `1 2 3 1` covers
  pixels 1-2 and 6 (0-based), absolute `2 2 7 1` the same."""
  expected = np.zeros((4, 3), bool)
  expected[1, 0] = expected[2, 0] = expected[2, 1] = True
  for numbers, form in (((1, 2, 3, 1), 'relative'), ((2, 2, 7, 1), 'absolute')):
    got = siim.decode_mask([numbers], form, height=4, width=3)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('form', ['relative', 'absolute'])
def test_decode_mask_inverts_an_independent_encoder(form):
  rng = np.random.default_rng(3)
  for _ in range(20):
    masks = [rng.random((HEIGHT, WIDTH)) < 0.3, blob(rng)]
    regions = [tuple(int(n) for n in rle(m, form).split()) for m in masks]
    got = siim.decode_mask(regions, form, height=HEIGHT, width=WIDTH)
    np.testing.assert_array_equal(got, masks[0] | masks[1])


def test_rle_encoding_is_read_from_the_runs():
  def annotations(*texts):
    return [siim.Annotation(f'i{k}', (tuple(int(n) for n in t.split()),), 'w')
            for k, t in enumerate(texts)]
  rng = np.random.default_rng(4)
  masks = [blob(rng) for _ in range(5)]
  assert siim.rle_encoding(annotations(*(rle(m, 'relative') for m in masks))) == 'relative'
  assert siim.rle_encoding(annotations(*(rle(m, 'absolute') for m in masks))) == 'absolute'
  assert siim.rle_encoding(annotations('5 3', '10 2')) == 'relative'  # one run each
  assert siim.rle_encoding([]) == 'relative'


# ----------------------------------------------------------------------------
# The DICOM reader.
# ----------------------------------------------------------------------------


def _png(data: bytes) -> tuple[str, np.ndarray]:
  with Image.open(io.BytesIO(data)) as image:
    return image.mode, np.asarray(image)


def test_read_png_keeps_8_bit_and_inverts_monochrome1(tmp_path):
  pixels = np.arange(HEIGHT * WIDTH, dtype=np.uint8).reshape(HEIGHT, WIDTH)
  write_dicom(tmp_path / 'a.dcm', pixels, jpeg=False)
  write_dicom(tmp_path / 'b.dcm', pixels, jpeg=False, photometric='MONOCHROME1')
  assert _png(dicom.read_png(os.fspath(tmp_path / 'a.dcm'), 'w'))[1].tolist() == \
      pixels.tolist()
  mode, got = _png(dicom.read_png(os.fspath(tmp_path / 'b.dcm'), 'w'))
  assert mode == 'L'
  np.testing.assert_array_equal(got, 255 - pixels)


def test_read_png_scales_12_bit_to_16_and_shifts_signed(tmp_path):
  pixels = np.array([[0, 1, 2048, 4095]], np.uint16)
  write_dicom(tmp_path / 'a.dcm', pixels, jpeg=False, bits_stored=12)
  mode, got = _png(dicom.read_png(os.fspath(tmp_path / 'a.dcm'), 'w'))
  assert mode in ('I;16', 'I')
  np.testing.assert_array_equal(got, [[0, 16, 32768, 65520]])
  signed = np.array([[-2048, -1, 0, 2047]], np.int16)
  write_dicom(tmp_path / 's.dcm', signed, jpeg=False, bits_stored=12, signed=True)
  _, got = _png(dicom.read_png(os.fspath(tmp_path / 's.dcm'), 'w'))
  np.testing.assert_array_equal(got, [[0, 2047 * 16, 2048 * 16, 4095 * 16]])


@pytest.mark.parametrize('bits', [10, 12, 14, 16])
@pytest.mark.parametrize('photometric', ['MONOCHROME2', 'MONOCHROME1'])
def test_wide_gray_is_scaled_to_16_bits_as_the_definition_says(tmp_path, bits, photometric):
  """Every stored value, and values with bits above BitsStored set (not part of the value:
  masked, as pydicom 3 itself does and 2.x does not), against the definition in int64:
  the low `bits` bits, inverted for MONOCHROME1, scaled by 2^(16 - bits)."""
  top = (1 << bits) - 1
  values = np.concatenate([np.arange(top + 1), [top + 1, 65535, (top + 1) | 7]])
  side = math.ceil(math.sqrt(values.size))
  pixels = np.resize(values, side * side).reshape(side, side).astype(np.uint16)
  write_dicom(tmp_path / 'w.dcm', pixels, jpeg=False, bits_stored=bits,
              photometric=photometric)
  image = dicom.read_image(os.fspath(tmp_path / 'w.dcm'), 'w')
  want = pixels.astype(np.int64) % (top + 1)
  if photometric == 'MONOCHROME1':
    want = top - want
  assert image.mode == 'I;16'
  np.testing.assert_array_equal(np.asarray(image), want << (16 - bits))


def test_read_png_keeps_rgb_and_the_header(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
  write_dicom(tmp_path / 'c.dcm', pixels, jpeg=False, PatientID='p', PatientAge='045Y',
              PatientSex='F', ViewPosition='PA', StudyInstanceUID='1.2')
  mode, got = _png(dicom.read_png(os.fspath(tmp_path / 'c.dcm'), 'w'))
  assert mode == 'RGB'
  np.testing.assert_array_equal(got, pixels)
  assert dicom.read_header(os.fspath(tmp_path / 'c.dcm'), 'w') == dicom.Header(
      patient_id='p', study_id='1.2', sex='F', age='045Y', view='PA', rows=HEIGHT,
      columns=WIDTH)


def test_read_png_refuses_what_is_not_one_image(tmp_path):
  pixels = np.zeros((HEIGHT, WIDTH), np.uint8)
  write_dicom(tmp_path / 'm.dcm', pixels, jpeg=False, frames=2)
  with pytest.raises(DataError) as excinfo:
    dicom.read_png(os.fspath(tmp_path / 'm.dcm'), 'image_id m')
  assert_one_line_error(excinfo, tmp_path / 'm.dcm', '2 frames', 'image_id m')
  (tmp_path / 'n.dcm').write_bytes(b'\0' * 200 + b'not dicom')
  for read in (dicom.read_png, dicom.read_header):
    with pytest.raises(DataError) as excinfo:
      read(os.fspath(tmp_path / 'n.dcm'), 'image_id n')
    assert_one_line_error(excinfo, tmp_path / 'n.dcm', 'not a DICOM file', 'image_id n')


def test_pydicom_is_needed_only_to_read_dicom(tmp_path, monkeypatch):
  """The other builders (and a GPU machine's benchmark) import tfds_builders without
  pydicom; reading a DICOM file without it is a one-line error."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys, tfds_builders, bigssl_med.data.sources, bigssl_med.build_data; '
          "print('pydicom' in sys.modules)")
  out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                       text=True, cwd=Path(__file__).parents[1])
  assert out.stdout.strip() == 'False'
  write_dicom(tmp_path / 'a.dcm', np.zeros((4, 4), np.uint8), jpeg=False)
  monkeypatch.setitem(sys.modules, 'pydicom', None)
  with pytest.raises(DataError) as excinfo:
    dicom.read_header(os.fspath(tmp_path / 'a.dcm'), 'image_id a')
  assert_one_line_error(excinfo, tmp_path / 'a.dcm', 'needs pydicom', 'image_id a')


def test_the_store_takes_the_decoded_pixels_as_it_would_their_png(tmp_path):
  """`ImageStore` gets a DICOM file's pixels as a decoded image (`common.read_image`),
  never encoded to PNG only to be decoded again: what it stores is what it would store
  from the PNG (8-bit, 12-bit and RGB; kept in size or downscaled; each channels)."""
  rng = np.random.default_rng(1)
  write_dicom(tmp_path / 'gray.dcm', rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8),
              jpeg=False)
  write_dicom(tmp_path / 'wide.dcm', rng.integers(0, 4096, (HEIGHT, WIDTH), dtype=np.uint16),
              jpeg=False, bits_stored=12)
  write_dicom(tmp_path / 'rgb.dcm', rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8),
              jpeg=False)
  write_dicom(tmp_path / 'jpeg.dcm', rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8))
  for name, mode in (('gray', 'L'), ('wide', 'I;16'), ('rgb', 'RGB'), ('jpeg', 'L')):
    path = os.fspath(tmp_path / f'{name}.dcm')
    image = common.read_image(path, 'w')
    assert isinstance(image, Image.Image) and image.mode == mode, name
    png = dicom.read_png(path, 'w')
    assert common.read_image_file(path, 'w') == png
    for max_side in (None, WIDTH, WIDTH - 3):
      for channels in (None, 1, 3):
        assert common.encode_image(image, name=name, max_side=max_side, channels=channels) \
            == common.encode_image(png, name=name, max_side=max_side, channels=channels), \
            (name, max_side, channels)
      assert common.encode_gray_image(image, name=name, max_side=max_side) == \
          common.encode_gray_image(png, name=name, max_side=max_side), (name, max_side)


def test_read_png_names_a_compression_it_cannot_decode(tmp_path):
  """JPEG-LS needs a decoder plugin neither pydicom nor Pillow brings: a one-line error."""
  path = tmp_path / 'jls.dcm'
  write_dicom(path, np.zeros((HEIGHT, WIDTH), np.uint8))
  dataset = pydicom.dcmread(path)
  dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
  dataset.save_as(path)
  with pytest.raises(DataError) as excinfo:
    dicom.read_png(os.fspath(path), 'image_id jls')
  assert_one_line_error(excinfo, path, 'cannot decode DICOM pixel data', 'image_id jls')


# ----------------------------------------------------------------------------
# Bad input: one-line errors naming the file (and row); skips where asked.
# ----------------------------------------------------------------------------


def _table_lines(fake) -> list[str]:
  return fake.table.read_text().splitlines()


def _replace_line(fake, number: int, text: str) -> None:
  lines = _table_lines(fake)
  lines[number - 1] = text
  fake.table.write_text('\n'.join(lines) + '\n')


@pytest.mark.parametrize('field, expected', [
    ('', 'EncodedPixels is empty'),
    ('12 x3', "'x3'"),
    ('12 3 4', '3 numbers'),
    ('12 -3', 'holds -3'),
    ('12 0', 'length 0'),
])
def test_a_bad_encoded_pixels_field(fake, tmp_path, field, expected):
  image_id = _table_lines(fake)[3].split(',')[0]
  _replace_line(fake, 4, f'{image_id}, {field}')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.table, 'line 4', expected)
  assert not (tmp_path / 'data' / NAME / 'original').exists()


def test_missing_columns(fake, tmp_path):
  _replace_line(fake, 1, 'ImageId,Mask')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.table, 'EncodedPixels')


def test_an_image_marked_empty_and_given_a_region(fake, tmp_path):
  image_id = fake.image_id('train', regions=True)
  with fake.table.open('a') as f:
    f.write(f'{image_id}, -1\n')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, image_id, 'marked -1', 'has a region', fake.table)


def test_a_run_outside_its_image(fake, tmp_path):
  image_id = fake.image_id('validation', regions=False)
  line = next(k for k, text in enumerate(_table_lines(fake), 1) if text.startswith(image_id))
  _replace_line(fake, line, f'{image_id}, {HEIGHT * WIDTH - 2} 3')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.table, f'line {line}', f'{WIDTH}x{HEIGHT}',
                        fake.images[image_id].path, 'relative')


def test_two_files_of_one_image(fake, tmp_path):
  image = fake.images[fake.image_id('test')]
  copy = fake.root / 'dicom-images-test' / 'copy' / image.path.name
  copy.parent.mkdir(parents=True)
  copy.write_bytes(image.path.read_bytes())
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, 'two DICOM files', image.image_id, copy)


def test_no_annotation_table(fake, tmp_path):
  fake.table.unlink()
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, 'stage_2_train.csv or train-rle.csv', fake.root.parent)


def test_a_bad_age(fake, tmp_path):
  image = fake.images[fake.image_id('train', 1)]
  dataset = pydicom.dcmread(image.path)
  with pydicom.config.disable_value_validation():  # not a DICOM age string
    dataset.PatientAge = 'old'
  dataset.save_as(image.path)
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, image.path, 'PatientAge', "'old'")


def test_missing_and_undecodable_images_stop_the_build_or_are_skipped(fake, tmp_path):
  missing = fake.images[fake.image_id('train', 0)]
  broken = fake.images[fake.image_id('train', 2)]
  not_dicom = fake.images[fake.image_id('test', 0)]
  missing.path.unlink()
  data = broken.path.read_bytes()
  start = data.index(b'\xff\xd8')  # the encapsulated JPEG
  broken.path.write_bytes(data[:start + 40] + b'\0' * (len(data) - start - 40))
  not_dicom.path.write_bytes(b'not a DICOM file at all')
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, fake.table, missing.image_id, 'no DICOM file')
  missing_line = fake.table.read_text().splitlines().index(
      next(t for t in _table_lines(fake) if t.startswith(missing.image_id))) + 1
  assert f'line {missing_line}' in str(excinfo.value)
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, skip_bad_images=True)
  kept = {i for split in records_by_split(data_dir, BUILD).values() for i in split}
  assert kept == set(fake.images) - {missing.image_id, broken.image_id, not_dicom.image_id}
  metadata = sources.dataset_info(BUILD, os.fspath(data_dir)).metadata
  assert metadata['num_skipped_images'] == 3
  reasons = {entry['path']: entry['reason'] for entry in metadata['skipped_images']}
  assert 'no DICOM file' in reasons[f'{missing.image_id}.dcm']
  assert 'cannot decode DICOM pixel data' in reasons[os.fspath(broken.path)]
  assert 'not a DICOM file' in reasons[os.fspath(not_dicom.path)]


def test_an_undecodable_image_names_its_file(fake, tmp_path):
  broken = fake.images[fake.image_id('validation', 0)]
  data = broken.path.read_bytes()
  start = data.index(b'\xff\xd8')
  broken.path.write_bytes(data[:start + 40] + b'\0' * (len(data) - start - 40))
  with pytest.raises(DataError) as excinfo:
    _build(fake, tmp_path / 'data')
  assert_one_line_error(excinfo, broken.path, 'cannot decode DICOM pixel data',
                        broken.image_id)


def test_images_without_a_patient_id_are_their_own_cases(fake, tmp_path):
  image = fake.images[fake.image_id('train', 1)]
  dataset = pydicom.dcmread(image.path)
  del dataset.PatientID
  dataset.save_as(image.path)
  data_dir = tmp_path / 'data'
  _build(fake, data_dir)
  records = {i: r for split in records_by_split(data_dir, BUILD).values()
             for i, r in split.items()}
  assert records[image.image_id]['case_id'].decode() == image.image_id
  metadata = sources.dataset_info(BUILD, os.fspath(data_dir)).metadata
  assert metadata['num_images_without_patient_id'] == 1
  assert math.isfinite(records[image.image_id]['age'])


# ----------------------------------------------------------------------------
# A tiny segmentation run on a build.
# ----------------------------------------------------------------------------


def test_segment_trains_on_a_siim_acr_build(tmp_path):
  from bigssl_med.trainers import segment  # pylint: disable=g-import-not-at-top
  from test_segment import tiny_config  # pylint: disable=g-import-not-at-top
  fake = write_fake_siim(tmp_path / 'raw', per_split=(24, 6, 6), seed=1)
  data_dir = tmp_path / 'data'
  _build(fake, data_dir, name=NAME)  # the default config, side512
  config = tiny_config(data_dir, dataset=NAME)
  results = segment.train_and_evaluate(config, os.fspath(tmp_path / 'work'))
  assert results['trainer'] == 'segment' and results['dataset'] == NAME
  assert results['step'] == 40 and results['labelled_images'] == 25
  assert results['validation']['num_examples'] == 7 and results['test']['num_examples'] == 7
  # Measured: 0.92 (validation) and 0.92 (test) Dice at the image size of 16 the run
  # scores at. Predicting no pneumothorax anywhere scores the share of images without a
  # region, about a third.
  assert results['validation']['dice'] >= 0.7, results['validation']
  assert results['test']['dice'] >= 0.7, results['test']
