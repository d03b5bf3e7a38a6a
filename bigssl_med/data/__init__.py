"""Reading the project's TFDS data sets (see `bigssl_med.data.sources`)."""
