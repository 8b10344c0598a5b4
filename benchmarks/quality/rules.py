"""Damping rules compared by the suite: each maps a fitted kernel to a ratio per layer.

A rule sees what the library's ``FisherStats.fit`` sees (each layer's Fisher, its size ``k``, the
number of rows ``N``), never ground truth. Candidates:

* ``r=<c>``: one ratio everywhere (``r = 0.1`` is the field's usual 0.1 x mean eigenvalue);
* ``table``: the earlier per-k table fitted on the old digits benchmark;
* ``erank<c>``: ``λ = c · tr(F²) / tr(F)``, the eigenvalue-weighted mean eigenvalue (as a
  ratio ``r = c · k / r_eff`` with the effective rank ``r_eff = tr(F)² / tr(F²)``);
* ``nk<c>``: ``r = c · k / N``.
* ``auto<c>``: ``r = c · max(1, k / N)``, ``λ = c · trace(F) / min(k, N)``: a fraction of the
  mean non-zero eigenvalue;
* ``pow<α>``: ``r = max(1, k / N) · (r_eff / m)^α`` with ``m = min(k, N)``: the mean non-zero
  eigenvalue shrunk as the effective rank falls below the rank bound (heavy-tailed spectra);
* ``N/k<c>``: ``r = min(1, c · N / k)``, ``λ = min(1, c N / k) · trace(F) / k``: damping that
  falls with fewer rows per dimension, capped at the mean eigenvalue;
* ``auto/L<c>``: ``r = (c / L) · max(1, k / N)`` with ``L`` the number of blocks;
* ``auto``: the library's rule (:func:`grass_callback.damping.auto_damping_ratio`):
  ``r = max(1, k / N)``, ``λ = trace(F) / min(k, N)``, the mean non-zero eigenvalue, times the
  layer's :func:`grass_callback.damping.auto_scales` (0.1 on a vocabulary head) once
  :func:`with_layer_scales` has given it the workload's layer shapes, as ``FisherStats.fit`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from grass_callback.evaluation import KernelInfluence

__all__ = ["RULES", "with_layer_scales"]


def _per_block(fn: Callable[[object, int, float, int], float]) -> Callable[[KernelInfluence], dict]:
    def rule(ki: KernelInfluence) -> dict:
        return {name: fn(ev, k, unit, ki.count) for name, (ev, k, unit) in ki.eigenvalues().items()}
    return rule


def _erank(c: float):
    def fn(ev, k, unit, n):
        tr, tr2 = float(ev.sum()), float((ev * ev).sum())
        return c * tr2 / tr / unit
    return fn


def _table(ev, k, unit, n):
    """The earlier default: 0.01 at k = 64, 0.1 at 256, 1 at 1024 (log-linear, constant outside)."""
    t = min(1.0, max(0.0, (math.log(k) - math.log(64)) / (math.log(1024) - math.log(64))))
    return 10 ** (-2 + 2 * t)


def _scaled_auto(c: float):
    def fn(ev, k, unit, n):
        return c * max(1.0, k / n)
    return fn


def _pow(alpha: float):
    def fn(ev, k, unit, n):
        tr, tr2 = float(ev.sum()), float((ev * ev).sum())
        m = min(k, n)
        return max(1.0, k / n) * ((tr * tr / tr2) / m) ** alpha if tr2 > 0 else max(1.0, k / n)
    return fn


def _rows_per_dim(c: float):
    def fn(ev, k, unit, n):
        return min(1.0, c * n / k)
    return fn


def _per_blocks(c: float):
    """``r = (c / L) · max(1, k / N)``: the library's rule over the number of blocks ``L`` (a
    statistic outside the rule's contract: ``fit`` sees one block at a time)."""
    def rule(ki: KernelInfluence) -> dict:
        eig = ki.eigenvalues()
        return {name: c / len(eig) * max(1.0, k / ki.count) for name, (ev, k, unit) in eig.items()}
    return rule


def _auto(ev, k, unit, n):
    from grass_callback.damping import auto_damping_ratio_from_moments

    return auto_damping_ratio_from_moments(float(ev.sum()), float((ev * ev).sum()), k, n)


RULES: dict[str, Callable[[KernelInfluence], dict]] = {
    **{f"r={c:g}": _per_block(lambda ev, k, unit, n, c=c: c) for c in (0.01, 0.03, 0.1, 0.3, 0.5, 1.0)},
    "table": _per_block(_table),
    **{f"erank{c:g}": _per_block(_erank(c)) for c in (0.003, 0.01, 0.03, 0.1, 0.3)},
    **{f"nk{c:g}": _per_block(lambda ev, k, unit, n, c=c: c * k / n) for c in (0.1, 0.3, 1.0)},
    **{f"auto{c:g}": _per_block(_scaled_auto(c)) for c in (0.1, 0.2, 0.3, 0.5)},
    **{f"pow{a:g}": _per_block(_pow(a)) for a in (0.1, 0.25, 0.5, 1.0)},
    **{f"N/k{c:g}": _per_block(_rows_per_dim(c)) for c in (0.2, 0.3, 0.35, 0.4, 0.5)},
    **{f"auto/L{c:g}": _per_blocks(c) for c in (1.0, 2.0)},
    "auto": _per_block(_auto),
}


def with_layer_scales(rules: dict, shapes: dict, k: int) -> dict:
    """``rules`` with ``auto`` as the library applies it to layers of these shapes (name ->
    :class:`~grass_callback.projection.LayerShape`) compressed to ``k``: each block's ratio times
    :func:`grass_callback.damping.auto_scales`. The uncompressed ``exact`` blocks are classified
    at the same ``k``. Other rules are left as they are."""
    from grass_callback.damping import auto_scales

    scales = auto_scales({name: {"d_in": s.d_in, "d_out": s.d_out, "bias": s.bias, "k": k} for name, s in shapes.items()})
    if "auto" not in rules or not scales:
        return dict(rules)
    base = rules["auto"]

    def auto(ki: KernelInfluence) -> dict:
        return {name: r * scales.get(name, 1.0) for name, r in base(ki).items()}

    return {**rules, "auto": auto}
