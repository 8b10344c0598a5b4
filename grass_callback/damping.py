"""The default damping rule: a relative damping from each Fisher block alone (no ground truth).

``λ_l = r_l · trace(F_l) / k_l``. ``damping_ratio="auto"`` resolves ``r_l`` when the block is
fitted (``FisherStats.fit("auto")``)::

    r_l = max(1, k_l / N)        i.e.   λ_l = trace(F_l) / min(k_l, N)

where ``N`` is the number of rows the Fisher ``F_l = (1/N) Σ_i g_i g_i^T`` averages. ``F_l`` has
rank at most ``min(k_l, N)``, so ``λ_l`` is the mean of its non-zero eigenvalues: the mean
eigenvalue when the block has more rows than dimensions (the field's usual ``0.1 ×`` mean
eigenvalue, ten times larger), and the mean over the ``N`` non-zero eigenvalues when it has fewer
(uncompressed or wide blocks), where a ratio on ``trace(F)/k`` would put the damping orders of
magnitude below every eigenvalue that carries signal. Chosen on the tuning half of
``python -m benchmarks.quality`` among fixed ratios, ``k/N`` rules and spectrum-based rules; the
README reports it on the other half.

A vocabulary head (:func:`grass_callback.projection.is_vocabulary_head`: an output at least 8x
wider than a not-narrow input, such as a language model's ``lm_head``) gets
``VOCABULARY_HEAD_SCALE = 0.1`` times that ratio (:func:`auto_scales`). Its Fisher is far flatter
than the other layers'; scaling one layer at a time on the suite's tuning language model
(``python -m benchmarks.quality.layer_damping``), the head's ratio x 0.1 gained 0.03 LDS for
FactGraSS with the head's masks of then (``16 x 256``), 0.06 with today's ``4 x 1024`` and 0.06 for
the dense and uncompressed gradients, while every other layer moved it by at most 0.007 at any
factor. A ratio the user gives (a number) is used as it is on every layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from grass_callback.errors import FisherValueError

__all__ = ["AUTO", "VOCABULARY_HEAD_SCALE", "auto_damping_ratio", "auto_damping_ratio_from_moments", "auto_scales"]

AUTO = "auto"
VOCABULARY_HEAD_SCALE = 0.1  # the rule's ratio on a vocabulary head (chosen on the tuning language model)


def auto_damping_ratio_from_moments(trace: float, trace_sq: float | None, k: int, count: int) -> float:
    """The rule's ratio ``r = max(1, k / N)`` for a block of size ``k`` fitted on ``N = count`` rows.

    ``trace`` (``trace(F)``) and ``trace_sq`` (``trace(F²)``) are part of the signature so that
    spectrum-based rules compare on equal terms in the benchmark (``None`` where it was not
    computed: ``FisherStats.fit`` does not compute it); this rule checks only that
    ``trace`` is finite (a zero-trace block is left to ``FisherStats.fit``'s tiny absolute
    damping, as with any ratio).
    """
    if not math.isfinite(trace):
        raise FisherValueError(f"the automatic damping needs a Fisher block with a finite trace, got {trace}; "
                               "NaN/Inf gradients were accumulated.")
    if int(count) < 1 or int(k) < 1:
        raise FisherValueError(f"the automatic damping needs k >= 1 and N >= 1 rows, got k={k}, N={count}.")
    return max(1.0, int(k) / int(count))


def auto_damping_ratio(fisher: Tensor, count: int) -> float:
    """The relative damping ``r`` the rule gives one Fisher block ``F`` (``[k, k]``, ``N = count`` rows)."""
    f = fisher.to(torch.float64)
    trace_sq = float(torch.linalg.vector_norm(f)) ** 2
    return auto_damping_ratio_from_moments(float(f.diagonal().sum()), trace_sq, int(f.shape[0]), int(count))


def auto_scales(plans: Mapping[str, Any]) -> dict[str, float]:
    """``{layer: multiplier of the rule's ratio}`` for the layers that get one: every vocabulary head
    among ``plans`` (layer name -> a plan, or a plan's saved config as a store keeps it) gets
    :data:`VOCABULARY_HEAD_SCALE`; other layers, and a flat plan built without its layer's shape,
    are left out (a multiplier of 1). For :attr:`grass_callback.fisher.FisherStats.auto_scales`."""
    from grass_callback.projection import is_vocabulary_head

    out = {}
    for name, plan in plans.items():
        shape = _layer_shape(plan)
        if shape is not None and is_vocabulary_head(shape[2], shape[0], shape[1]):
            out[name] = VOCABULARY_HEAD_SCALE
    return out


def _layer_shape(plan: Any) -> tuple[int, int, int] | None:
    """``(d_in_eff, d_out, k)`` of a plan or a plan's config (``None``: the shape is not known)."""
    if isinstance(plan, Mapping):
        if "d_in" in plan:
            d_in, d_out, bias = plan["d_in"], plan["d_out"], plan.get("bias", False)
        elif "layer" in plan:
            d_in, d_out, bias = plan["layer"]
        else:
            return None
        return int(d_in) + int(bool(bias)), int(d_out), int(plan["k"])
    shape = getattr(plan, "shape", None)
    return None if shape is None else (shape.d_in_eff, shape.d_out, int(plan.k))
