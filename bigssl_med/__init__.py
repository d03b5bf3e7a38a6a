"""bigssl_med: big self-supervised models (SimCLR, MICLe) for medical imaging in JAX/Flax."""

__version__ = '0.1.0'
