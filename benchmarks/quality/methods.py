"""Scoring methods of the quality suite, all evaluated exactly from in-memory gradients.

Each method compresses every example's per-layer gradient (at the full-data model's final
weights) and scores queries with the block-diagonal Fisher influence
``Σ_l g_q^T (F_l + λ_l I)^{-1} g_i`` (:class:`grass_callback.evaluation.KernelInfluence`): one
eigendecomposition per layer gives the LDS of every damping ratio of the grid and of every
damping rule. ``exact`` uses the uncompressed gradients (Gram matrices accumulated in chunks, so
wide layers never sit in memory for all examples at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from grass_callback.evaluation import KernelInfluence, lds_per_query, oriented_targets
from grass_callback.projection import FactGraSSPlan, LayerShape, make_plan, materialize

__all__ = ["GRID", "METHODS", "compress", "exact_kernel", "method_kernel", "evaluate"]

#: Relative damping ratios of the grid (1e-4 .. 10, half decades).
GRID: tuple[float, ...] = tuple(float(f"{10 ** (e / 2):.4g}") for e in range(-8, 3))

#: method -> (plan kind, options); factgrass variants differ only in their mask sizes.
METHODS: dict[str, tuple[str, dict]] = {
    "gaussian": ("gaussian", {}),
    "factgrass": ("factgrass", {}),  # the library's default plan: masks of 2 sqrt(k)
    "factgrass-narrow": ("factgrass", {"keep_narrow": True}),  # narrow factors kept whole
    "factgrass-x4": ("factgrass", {"oversample": 16.0}),  # k' = 16 k: masks of 4 sqrt(k)
    "logra": ("logra", {}),
}


def compress(plans: Mapping[str, object], factors: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[dict, float]:
    """``{layer: [N, k] float64}`` and the seconds ``plan.compress`` took over all layers."""
    out, seconds = {}, 0.0
    for name, plan in plans.items():
        x, d = factors[name]
        plan.compress(x[:4], d[:4])  # warm-up: kernel load, allocations
        t0 = time.perf_counter()
        parts = [plan.compress(x[i:i + 512], d[i:i + 512]) for i in range(0, len(x), 512)]
        seconds += time.perf_counter() - t0
        out[name] = torch.cat(parts).to(torch.float64)
    return out, seconds


def method_kernel(method: str, shapes: Mapping[str, LayerShape], factors, n: int, k: int, seed: int) -> tuple[KernelInfluence, dict]:
    kind, options = METHODS[method]
    plans = {name: make_plan(kind, s, k=k, seed=seed, name=name, **options) for name, s in shapes.items()}
    grads, seconds = compress(plans, factors)
    info = {"compress_s": seconds}
    if kind == "factgrass":
        info["k_prime"] = sum(p.k_prime for p in plans.values() if isinstance(p, FactGraSSPlan))
    return KernelInfluence({m: g[:n] for m, g in grads.items()}, {m: g[n:] for m, g in grads.items()}), info


def exact_kernel(shapes: Mapping[str, LayerShape], factors, n: int, chunk: int = 256) -> KernelInfluence:
    """Uncompressed per-layer influence from Gram matrices of the materialized gradients."""
    grams = {}
    for name, shape in shapes.items():
        x, d = factors[name]
        N = len(x)
        rows = [materialize(x[i:i + chunk], d[i:i + chunk], shape.bias).flatten(1) for i in range(0, N, chunk)]
        full = torch.cat(rows)  # [N, D] float32, one layer at a time
        gram = torch.zeros(N, N, dtype=torch.float64)
        for i in range(0, N, 1024):
            gram[i:i + 1024] = (full[i:i + 1024] @ full.T).to(torch.float64)
        del full, rows
        grams[name] = (gram[:n, :n], gram[n:, :n], shape.numel)
    return KernelInfluence.from_grams(grams)


def evaluate(ki: KernelInfluence, masks: Tensor, targets: Tensor, target: str,
             rules: Mapping[str, Callable[[KernelInfluence], Mapping[str, float] | float]]) -> dict:
    """LDS at every grid ratio and at every damping rule's ratios (all queries)."""
    oriented = oriented_targets(targets, target)

    def value(ratio) -> float:
        return float(lds_per_query(ki.predictions(masks, ratio), oriented).mean())

    out = {"grid": {r: value(r) for r in GRID}}
    out["rules"] = {name: value(rule(ki)) for name, rule in rules.items()}
    out["best_ratio"] = max(out["grid"], key=out["grid"].get)
    out["best"] = out["grid"][out["best_ratio"]]
    return out
