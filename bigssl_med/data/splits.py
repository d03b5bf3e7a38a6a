"""Split names: the parts of a split string, and the split of images without labels.

A config names a split as TFDS does: `train`, a slice `train[:10%]`, or a sum
`train+unlabeled` (the records of each part in turn). `unlabeled` (`image_cases`)
holds images without labels: for pretraining and distillation, never for training on
labels or for evaluation. No TFDS import here, so configs can be checked cheaply.
"""

# The split of images without labels (image_cases), for pretraining and distillation.
UNLABELED = 'unlabeled'


def parts(split: str) -> list[str]:
  """The splits a split string names, slices left off: `'train[:10%]+unlabeled'` gives
  `['train', 'unlabeled']`."""
  return [part.split('[', 1)[0].strip() for part in split.split('+')]


def has_unlabeled(split: str) -> bool:
  """Whether `split` takes in the `unlabeled` split."""
  return UNLABELED in parts(split)


def only_unlabeled(split: str) -> bool:
  """Whether every part of `split` is the `unlabeled` split."""
  return set(parts(split)) == {UNLABELED}
