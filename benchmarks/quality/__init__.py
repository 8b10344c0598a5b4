"""The attribution quality suite: ``python -m benchmarks.quality`` (see :mod:`benchmarks.quality.run`)."""
