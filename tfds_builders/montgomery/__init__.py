"""Montgomery County chest X-ray TFDS builder."""

from tfds_builders.montgomery.montgomery import Montgomery

__all__ = ['Montgomery']
