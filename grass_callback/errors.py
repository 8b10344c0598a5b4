"""Exception classes raised by grass_callback.

Every error the package raises on purpose is a :class:`GraSSError`, so users can catch one
type. Messages say what was expected, what came, and how to fix it.
"""

from __future__ import annotations


class GraSSError(Exception):
    """Base class of every error raised on purpose by grass_callback."""


class PlanError(GraSSError, ValueError):
    """A compression plan was asked for sizes the layer cannot give, or does not fit its input."""


class KernelInputError(GraSSError, ValueError):
    """The ``factgrass`` op got inputs of the wrong rank, shape, dtype or range."""


class KernelBuildError(GraSSError, RuntimeError):
    """The C++/CUDA kernels could not be compiled or loaded."""


class StoreError(GraSSError, RuntimeError):
    """The gradient store could not be written or read."""


class StoreMismatchError(StoreError):
    """A store was opened with a plan or configuration other than the one it was written with."""


class StoreInputError(StoreError, ValueError):
    """Arguments given to the store have the wrong type, shape or value."""


class CaptureError(GraSSError, ValueError):
    """Layer taps could not be attached or fed (no tappable layers, missing indices, ...)."""


class FisherError(GraSSError, RuntimeError):
    """The Fisher statistics could not be fitted or used."""


class FisherValueError(FisherError, ValueError):
    """An argument of the Fisher code (damping ratio, layer sizes, dtype) is out of range."""


class ScoringError(GraSSError, ValueError):
    """Scores could not be computed from the given queries, chunks or options."""


class ConfigError(GraSSError, ValueError):
    """An option of the callback or the pipeline is out of range or inconsistent."""
