"""grass_callback: which training examples drive a model's behaviour, inside Lightning training.

The public API is imported lazily so ``import grass_callback`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GraSSCallback": "grass_callback.callback",
    "attribute": "grass_callback.attribution",
    "AttributionResult": "grass_callback.attribution",
    "IndexedDataset": "grass_callback.data",
    "LayerTaps": "grass_callback.capture",
    "per_example_scale": "grass_callback.capture",
    "GradientStore": "grass_callback.store",
    "FisherStats": "grass_callback.fisher",
    "FactGraSSPlan": "grass_callback.projection",
    "LoGraPlan": "grass_callback.projection",
    "factgrass": "grass_callback.ops",
    "GraSSError": "grass_callback.errors",
    "lds": "grass_callback.evaluation",
    "LinearDatamodelingScore": "grass_callback.evaluation",
    "choose_damping": "grass_callback.evaluation",
    "SelectiveFactGraSSPlan": "grass_callback.projection",
    "explain": "grass_callback.explaining",
    "ExplainResult": "grass_callback.explaining",
    "daunce": "grass_callback.daunce_method",
    "DaunceResult": "grass_callback.daunce_method",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'grass_callback' has no attribute {name!r}")
