"""The project's TFDS builders.

Callers look builders up in `BUILDERS` (name -> builder class) rather than through
TFDS's registry, so that which builder runs never depends on import side effects.
"""

from tfds_builders.ham10000 import Ham10000

BUILDERS = {
    'ham10000': Ham10000,
}

__all__ = ['BUILDERS', 'Ham10000']
