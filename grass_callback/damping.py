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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grass_callback.errors import FisherValueError

__all__ = ["AUTO", "auto_damping_ratio", "auto_damping_ratio_from_moments"]

AUTO = "auto"


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
