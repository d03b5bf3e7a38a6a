"""Imported first in a subprocess, makes TensorFlow look absent (a bare GPU box).

`import tensorflow` raises ModuleNotFoundError and `importlib.util.find_spec`
answers None for it, as when the package is not installed.
"""

import importlib.abc
import importlib.util
import sys


def is_tensorflow(name: str) -> bool:
  return name == 'tensorflow' or name.startswith('tensorflow.')


class _BlockTensorFlow(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):
    if is_tensorflow(name):
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)
    return None


_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if is_tensorflow(name) else _find_spec(name, package))
sys.meta_path.insert(0, _BlockTensorFlow())
