r"""Times a data set build (read, decode, resize, encode, write) against its threads.

Big collections are built from full-size files: CheXpert's 224,316 JPEGs of about
2,320 x 2,828, MIMIC-CXR-JPG's 377,110 JPEGs, ChestX-ray14's 112,120 1024 x 1024 PNGs.
Each build decodes every file and stores it downscaled, which `--num_threads` spreads
over the cores. This script makes an `image_cases` collection of `--images` files of
that kind from the real images of `--source` (enlarged with bicubic resampling, plus
mild Gaussian noise, sigma `--noise`, so that they compress like scans rather than
like smooth upscales), then builds it at `--max_side` with each of `--threads` and
prints, per thread count, one JSON line: build seconds, images/s, speed-up over the
first count, the stored images' mean size, and whether the records equal the first
build's.

  python benchmarks/build_data.py --source ../shared/data/nih_chestxray14_sample \
      --size 2320x2828 --mode L --format JPEG --images 200 --max_side 512 --threads 1,2
                                                   # CheXpert-sized gray JPEGs
  python benchmarks/build_data.py --source ../shared/data/ham10000/images \
      --size 600x450 --mode RGB --format JPEG --images 1000 --max_side 256 --threads 1,2
                                                   # HAM10000 as published
  python benchmarks/build_data.py --source ../shared/data/nih_chestxray14_sample \
      --size 1024x1024 --mode L --format DICOM --images 400 --max_side 512 --threads 1,2
                                                   # SIIM-ACR's DICOM files
  python benchmarks/build_data.py --source ../shared/data/nih_chestxray14_sample \
      --size 2048x2048 --mode L --format DICOM --bits 12 --images 100 --max_side 512
                                                   # 12-bit uncompressed radiographs

`--format DICOM` writes the files as SIIM-ACR publishes them instead (JPEG baseline
DICOM, 8-bit gray; with `--bits 12`, say, uncompressed 12-bit values in 16-bit samples,
as many archives hold radiographs), in `dicom-images-train/<study>/<series>/`, with a
`train-rle.csv` giving every other image a region) and builds `siim_acr_pneumothorax`: pydicom reads
each header, then the pixels, and the mask is decoded from its runs.

The whole build is timed, TFDS's writing and shuffling included, in a fresh data dir
each time; the files are written once, before the first build.
"""

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bigssl_med import build_data  # noqa: E402  pylint: disable=g-import-not-at-top
from bigssl_med.data import sources  # noqa: E402  pylint: disable=g-import-not-at-top
from tfds_builders.common import config_name  # noqa: E402  pylint: disable=g-import-not-at-top

NAME = 'image_cases/benchmark'
DICOM_NAME = 'siim_acr_pneumothorax'


def source_files(root: str) -> list[str]:
  """The image files under `root`, sorted."""
  found = []
  for folder, _, names in os.walk(root):
    found += [os.path.join(folder, n) for n in names
              if n.lower().endswith(('.png', '.jpg', '.jpeg'))]
  if not found:
    raise SystemExit(f'error: no .png/.jpg files under {root}')
  return sorted(found)


def write_collection(root: str, sources_: list[str], count: int, size: tuple[int, int],
                     mode: str, image_format: str, noise: float) -> int:
  """Writes `count` enlarged images and cases.csv (two images per case); total bytes."""
  rng = np.random.default_rng(0)
  total = 0
  lines = ['path,case_id,label']
  for i in range(count):
    with Image.open(sources_[i % len(sources_)]) as image:
      enlarged = image.convert('L' if mode == 'RGB_GRAY' else mode)
      enlarged = enlarged.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(enlarged, dtype=np.float32)
    pixels += rng.normal(0.0, noise, pixels.shape)
    enlarged = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if mode == 'RGB_GRAY':  # a gray scan in an RGB file, as some collections ship them
      enlarged = enlarged.convert('RGB')
    name = f'images/{i:06d}.{"png" if image_format == "PNG" else "jpg"}'
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if image_format == 'PNG':
      enlarged.save(path, format='PNG')
    else:
      enlarged.save(path, format='JPEG', quality=95)
    total += os.path.getsize(path)
    lines.append(f'{name},case{i // 2},{"ab" if i % 3 else "normal"}')
  with open(os.path.join(root, 'cases.csv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return total


def write_dicom_collection(root: str, sources_: list[str], count: int, size: tuple[int, int],
                           noise: float, bits: int = 8) -> int:
  """Writes `count` enlarged gray images as SIIM-ACR's JPEG baseline DICOM files (with
  `bits` > 8: uncompressed, `bits` bits stored in 16, as many archives' radiographs),
  and its `train-rle.csv` (stage 1's relative runs; every other image one rectangular
  region, the rest -1); total bytes of the DICOM files."""
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom import encaps, uid  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  total, lines = 0, ['ImageId, EncodedPixels']
  width, height = size
  for i in range(count):
    with Image.open(sources_[i % len(sources_)]) as image:
      pixels = np.asarray(image.convert('L').resize(size, Image.Resampling.BICUBIC),
                          np.float32)
    pixels = np.clip(pixels + rng.normal(0.0, noise, pixels.shape), 0, 255)
    wide = np.rint(pixels * ((1 << bits) - 1) / 255).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.rint(pixels).astype(np.uint8)).save(buffer, format='JPEG', quality=95)
    image_id = f'1.2.276.0.7230010.3.1.4.8323329.{i}.1517875166.{i}'
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = image_id
    meta.TransferSyntaxUID = uid.JPEGBaseline8Bit if bits == 8 else uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = uid.SecondaryCaptureImageStorage, image_id
    ds.PatientID, ds.StudyInstanceUID = f'patient-{i // 2}', f'1.2.3.{i}'
    ds.PatientSex, ds.PatientAge, ds.ViewPosition = 'MF'[i % 2], f'{30 + i % 50:03d}Y', 'PA'
    ds.Rows, ds.Columns, ds.SamplesPerPixel = height, width, 1
    ds.PhotometricInterpretation = 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        8 if bits == 8 else 16, bits, bits - 1, 0)
    if bits == 8:
      ds.PixelData = encaps.encapsulate([buffer.getvalue()])
      ds['PixelData'].VR = 'OB'
    else:
      ds.PixelData = wide.astype('<u2').tobytes()
    path = os.path.join(root, 'dicom-images-train', ds.StudyInstanceUID, f'1.2.4.{i}',
                        f'{image_id}.dcm')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    total += os.path.getsize(path)
    if i % 2:  # a region of height/4 rows in each of width/4 columns: relative runs
      runs = [height * (width // 2) + height // 2, height // 4]
      runs += [height - height // 4, height // 4] * (width // 4 - 1)
      lines.append(f'{image_id}, {" ".join(map(str, runs))}')
    else:
      lines.append(f'{image_id}, -1')
  with open(os.path.join(root, 'train-rle.csv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return total


def records(name: str, data_dir: str) -> dict:
  """split -> list of records (values as bytes), to compare two builds."""
  info = sources.dataset_info(name, data_dir)
  return {split: [{k: np.asarray(v).tobytes() for k, v in r.items()}
                  for r in sources.open_split(name, split, data_dir)]
          for split in info.splits}


def stored_kb_mean(built: dict) -> float:
  """Mean size of the stored images (their encoded bytes) in kB."""
  sizes = [len(r['image']) for split in built.values() for r in split]
  return sum(sizes) / max(len(sizes), 1) / 1e3


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--source', required=True, help='folder of real images to enlarge')
  p.add_argument('--size', default='2320x2828', help='WIDTHxHEIGHT of the files written')
  p.add_argument('--mode', choices=['L', 'RGB', 'RGB_GRAY'], default='L',
                 help='RGB_GRAY: gray images written as RGB files (stored gray)')
  p.add_argument('--format', choices=['JPEG', 'PNG', 'DICOM'], default='JPEG',
                 help='DICOM: SIIM-ACR\'s files and table, built by siim_acr_pneumothorax')
  p.add_argument('--noise', type=float, default=3.0, help='Gaussian noise sigma, 0-255 scale')
  p.add_argument('--bits', type=int, default=8, choices=range(8, 17), metavar='8..16',
                 help='DICOM: bits stored; above 8, uncompressed 16-bit pixel data')
  p.add_argument('--images', type=int, default=200)
  p.add_argument('--max_side', type=int, default=512)
  p.add_argument('--threads', default='1,2', help='comma-separated thread counts')
  p.add_argument('--work_dir', default='', help='where the files and builds go (default: '
                 'a temporary folder, removed at the end)')
  p.add_argument('--out', default='', help='append the JSON lines here')
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  size = tuple(int(x) for x in args.size.lower().split('x'))
  thread_counts = [int(t) for t in args.threads.split(',')]
  if args.work_dir:
    os.makedirs(args.work_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=args.work_dir or None) as work:
    manual_dir = os.path.join(work, 'raw')
    t = time.perf_counter()
    if args.format == 'DICOM':
      name = DICOM_NAME
      os.makedirs(manual_dir)
      written = write_dicom_collection(manual_dir, source_files(args.source), args.images,
                                       size, args.noise, args.bits)
    else:
      name = NAME
      written = write_collection(manual_dir, source_files(args.source), args.images, size,
                                 args.mode, args.format, args.noise)
    print(f'wrote {args.images} {args.format} files of {size[0]}x{size[1]} {args.mode}, '
          f'{written / args.images / 1e3:.0f} kB each, in {time.perf_counter() - t:.1f} s',
          flush=True)
    first = None
    for threads in thread_counts:
      data_dir = os.path.join(work, f'data_threads{threads}')
      t = time.perf_counter()
      build_data.build(name, data_dir=data_dir, manual_dir=manual_dir,
                       max_side=args.max_side, num_threads=threads)
      seconds = time.perf_counter() - t
      built = records(f'{name}/{config_name(args.max_side)}' if name == DICOM_NAME else name,
                      data_dir)
      if first is None:
        first = (seconds, built)
      result = {
          'benchmark': 'build_data', 'threads': threads, 'images': args.images,
          'file_size': list(size), 'mode': args.mode, 'format': args.format,
          'bits': args.bits if args.format == 'DICOM' else 8,
          'file_kb_mean': written / args.images / 1e3, 'max_side': args.max_side,
          'seconds': seconds, 'images_per_sec': args.images / seconds,
          'stored_kb_mean': stored_kb_mean(built),
          'speedup': first[0] / seconds, 'records_equal_first': built == first[1],
          'cores': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                   else os.cpu_count(),
          'machine': platform.processor() or platform.machine(), 'python': sys.version.split()[0]}
      print(json.dumps(result), flush=True)
      if args.out:
        with open(args.out, 'a') as f:
          f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
  main()
