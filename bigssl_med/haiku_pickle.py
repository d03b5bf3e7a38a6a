"""Reading pickles written by JAX/Haiku programs (BYOL's checkpoints) without their code.

BYOL saves its checkpoints with `dill.dump(..., protocol=2)`: a dict holding its
experiment state (a named tuple of Haiku parameter and state mappings and the
optimiser's state), NumPy arrays at the leaves. `read` unpickles such a file without
Haiku, dill or BYOL installed and without running any code the file names: NumPy's
own reconstruction rebuilds the arrays, Haiku's immutable mappings become dicts, and
every other class becomes a `Kept` stand-in that holds the values the file gives it.
"""

import collections
import os
import pickle
from typing import Any, Mapping

import numpy as np

from bigssl_med.errors import CheckpointError


def _numpy_reconstruct(subtype, shape, dtype_code):
  """`numpy.core.multiarray._reconstruct` for plain ndarrays: an empty array to fill."""
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError(f'an array of class {subtype!r:.60}, not numpy.ndarray')
  del dtype_code  # b'b', whatever the dtype; __setstate__ gives the real one
  return np.ndarray.__new__(np.ndarray, shape, np.uint8)


def _numpy_scalar(dtype, data=None):
  """`numpy.core.multiarray.scalar`: a NumPy scalar of `dtype` from its bytes."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError(f'a scalar of dtype {dtype!r:.60}')
  return np.frombuffer(data if data is not None else b'\0' * dtype.itemsize, dtype)[0]


def _latin1_bytes(text, encoding):
  """`_codecs.encode`, as protocol 2 pickles bytes from Python 3: latin-1 only."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise pickle.UnpicklingError(f'_codecs.encode with {encoding!r:.20}')
  return text.encode('latin-1')


def _dill_create_array(f, args, state, npdict=None):
  """`dill._dill._create_array`: an array built with NumPy's reconstruction."""
  del npdict  # attributes of an ndarray subclass; a plain array has none
  if f is not _numpy_reconstruct:
    raise pickle.UnpicklingError(f'an array built by {f!r:.60}')
  array = f(*args)
  array.__setstate__(state)
  return array


class Kept:
  """Stands for an object of another class in a pickle (BYOL's experiment state, its
  optimiser's state): built from nothing the file says, so no code of the file runs,
  but keeping what the file gives it (`args` of its construction, its `state`, and
  `items` set on it) so the arrays inside can be found."""

  def __new__(cls, *args, **kwargs):
    self = super().__new__(cls)
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, {}
    return self

  def __init__(self, *args, **kwargs):
    del args, kwargs  # kept by __new__

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.items[len(self.items)] = value

  def extend(self, values):
    for value in values:
      self.append(value)


def _kept_class(module: str, name: str) -> type:
  return type(f'{module}.{name}', (Kept,), {})


class _HaikuMapping(dict):
  """Haiku's immutable mappings (`frozendict`, `FlatMapping`, `FlatMap`) as dicts.

  Each pickles as its class called with one mapping, or as its slots' state holding
  the mapping (`_storage`, `_mapping`); either way the dict gets the mapping's items.
  """

  def __new__(cls, *args, **kwargs):
    self = super().__new__(cls)
    if args and isinstance(args[0], Mapping):
      self.update(args[0])
    self.update(kwargs)
    return self

  def __init__(self, *args, **kwargs):
    del args, kwargs  # filled by __new__

  def __setstate__(self, state):
    if isinstance(state, tuple):  # (dict state, slots state)
      state = next((part for part in reversed(state) if isinstance(part, Mapping)), {})
    for slot in ('_storage', '_mapping'):
      if isinstance(state, Mapping) and isinstance(state.get(slot), Mapping):
        self.update(state[slot])
        return


class _HaikuUnpickler(pickle.Unpickler):
  """Unpickles a BYOL checkpoint (written by `dill` with protocol 2) safely.

  Arrays are rebuilt by NumPy's own reconstruction, Haiku's mappings become dicts, and
  any other class the file names becomes a `Kept` stand-in (never the real one: no
  code of the file runs, and neither Haiku nor BYOL need be installed).
  """

  def find_class(self, module, name):
    if (module, name) in (('numpy.core.multiarray', '_reconstruct'),
                          ('numpy._core.multiarray', '_reconstruct')):
      return _numpy_reconstruct
    if (module, name) in (('numpy.core.multiarray', 'scalar'),
                          ('numpy._core.multiarray', 'scalar')):
      return _numpy_scalar
    if (module, name) in (('numpy', 'ndarray'), ('numpy', 'dtype')):
      return getattr(np, name)
    if (module, name) == ('_codecs', 'encode'):
      return _latin1_bytes
    if (module, name) == ('dill._dill', '_create_array'):
      return _dill_create_array
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module.startswith('haiku.') and name in ('frozendict', 'FlatMapping', 'FlatMap'):
      return _HaikuMapping
    return _kept_class(module, name)


def read(path: str) -> Any:
  """The object the pickle file `path` holds, read by `_HaikuUnpickler`."""
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  try:
    with open(path, 'rb') as f:
      return _HaikuUnpickler(f).load()
  except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError,
          IndexError, MemoryError, OSError) as e:
    raise CheckpointError(f'{path}: not a readable pickle (damaged or cut short?): '
                          f'{type(e).__name__}: {str(e)[:200]}') from e


def is_plain_pickle(path: str) -> bool:
  """Whether `path` is a pickle (BYOL's `.pkl` checkpoints), not a PyTorch file: it
  starts with a pickle's protocol opcode, and not with the magic number that opens
  every `torch.save` file from before PyTorch 1.6 (later ones are zip files)."""
  try:
    with open(path, 'rb') as f:
      start = f.read(4)
  except OSError:
    return False
  return (len(start) == 4 and start[0] == 0x80 and 2 <= start[1] <= 5
          and start[2:4] != b'\x8a\x0a')
