"""Scoring methods of the quality suite, all evaluated exactly from in-memory gradients.

Each method compresses every example's per-layer gradient (at the full-data model's final
weights) and scores queries with the block-diagonal Fisher influence
``Σ_l g_q^T (F_l + λ_l I)^{-1} g_i`` (:class:`grass_callback.evaluation.KernelInfluence`): one
eigendecomposition per layer gives the LDS of every damping ratio of the grid and of every
damping rule. ``exact`` uses the uncompressed gradients (Gram matrices accumulated in chunks, so
wide layers never sit in memory for all examples at once; for one-token examples, the MLPs,
``<δ_i x_i^T, δ_j x_j^T> = (δ_i·δ_j)(x_i·x_j)`` gives the Gram matrix from the factors without
materializing a gradient).

The expensive parts are split so that :mod:`benchmarks.quality.cache` can keep them on disk:
:func:`method_grads` (the compressed gradients, or the exact Gram matrices) and
:func:`kernel_from` (the eigendecompositions).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from grass_callback.evaluation import KernelInfluence, lds_per_query, oriented_targets
from grass_callback.projection import FactGraSSPlan, LayerShape, make_plan, materialize

__all__ = ["GRID", "METHODS", "compress", "exact_grams", "exact_kernel", "method_grads", "method_kernel",
           "plan_signature", "kernel_from", "evaluate"]

#: Relative damping ratios of the grid (1e-4 .. 10, half decades).
GRID: tuple[float, ...] = tuple(float(f"{10 ** (e / 2):.4g}") for e in range(-8, 3))

def _masks(**options) -> tuple[str, dict]:
    """A FactGraSS variant that measures its masks on every layer (no one-token plan)."""
    return "factgrass", {**options, "one_token": False}


#: method -> (plan kind, options); factgrass variants differ only in their mask sizes. ``factgrass``
#: is the library's default plan (whatever its defaults are); the others pin their options.
METHODS: dict[str, tuple[str, dict]] = {
    "gaussian": ("gaussian", {}),
    "factgrass": ("factgrass", {}),
    # the default masks on every layer: the default before one-token layers got their own plan
    "factgrass-masks": _masks(),
    # masks of 2 sqrt(k), square on every layer (the default before vocabulary heads got wide_output_skew)
    "factgrass-2sqrtk": _masks(oversample=4.0, keep_narrow=False, wide_output_skew=1.0),
    "factgrass-narrow": _masks(oversample=4.0, keep_narrow=True),  # narrow factors kept whole
    "factgrass-x1.5": _masks(oversample=6.0, keep_narrow=False),  # k' = 6 k: 1.5x the budget
    "factgrass-x2": _masks(oversample=8.0, keep_narrow=False),  # k' = 8 k
    "factgrass-x2-narrow": _masks(oversample=8.0, keep_narrow=True),
    "factgrass-x4": _masks(oversample=16.0, keep_narrow=False),  # k' = 16 k: masks of 4 sqrt(k)
    "factgrass-all": _masks(oversample=1024.0, keep_narrow=False),  # masks keep layers <= 1024 wide whole: the SJLT alone
    "factgrass-all-c4": _masks(oversample=1024.0, keep_narrow=False, c=4),  # and 4 non-zeros per coordinate
    "factgrass-all-c2": _masks(oversample=1024.0, keep_narrow=False, c=2),
    "factgrass-coord": _masks(mask_run=1),  # the default sizes, coordinate-wise masks
    "factgrass-skew8": _masks(wide_output_skew=8.0),  # a vocabulary head's masks 8 x 512 at k = 1024
    "factgrass-skew16": _masks(wide_output_skew=16.0),  # 4 x 1024
    "factgrass-c2": _masks(c=2),  # the default masks, 2 non-zeros per coordinate in the SJLT
    # the same budget k' = 4k split otherwise (explicit k_in, k_out per layer, see _split_sizes):
    "factgrass-prop": _masks(split="proportional"),  # each factor keeps the same fraction
    "factgrass-wide": _masks(split="wide"),  # the wider factor kept whole, the other masked
    "logra": ("logra", {}),
    # the default sizes, masks learned from the first SELECTIVE_SAMPLE training examples' factors at the
    # scored weights (grass_callback.selective, the paper's selective mask) instead of drawn at random
    "factgrass-selective": ("factgrass_selective", {}),
    # experiment: the default masks, then a dense Gaussian k' -> k instead of the SJLT (mask loss vs sketch loss)
    "factgrass-dense2": ("factgrass_dense2", {}),
}

#: training examples whose factors a selective method learns its masks from (the callback's default)
SELECTIVE_SAMPLE = 256


def _split_sizes(split: str, s: LayerShape, k: int, budget: float = 4.0) -> dict:
    """Explicit ``k_in, k_out`` for a budget ``k' ≈ budget · k`` split by ``split``:
    ``proportional`` keeps the same fraction ``sqrt(k' / (d_in d_out))`` of each factor,
    ``wide`` keeps every column of the wider factor and ``ceil(k' / width)`` of the other.
    Layers with at most ``k`` entries keep the plan's own default (exact)."""
    d_in, d_out = s.d_in_eff, s.d_out
    if d_in * d_out <= k:
        return {}
    target = budget * k
    if split == "proportional":
        frac = min(1.0, math.sqrt(target / (d_in * d_out)))
        k_in = max(1, min(d_in, round(frac * d_in)))
        k_out = min(d_out, math.ceil(target / k_in))
    elif split == "wide":
        if d_out >= d_in:
            k_out = d_out
            k_in = min(d_in, math.ceil(target / d_out))
        else:
            k_in = d_in
            k_out = min(d_out, math.ceil(target / d_in))
    else:
        raise ValueError(f"unknown split {split!r}")
    while k_in * k_out < k:  # the plan needs k' >= k
        k_in, k_out = (k_in + 1, k_out) if k_in < d_in else (k_in, k_out + 1)
    return {"k_in": k_in, "k_out": k_out}


def _make(kind: str, s: LayerShape, k: int, seed: int, name: str, options: dict):
    options = dict(options)
    split = options.pop("split", None)
    if split is not None:
        options.update(_split_sizes(split, s, k))
    return make_plan(kind, s, k=k, seed=seed, name=name, **options)


def plan_signature(method: str, shapes: Mapping[str, LayerShape], k: int, seed: int) -> dict:
    """What a method's compressed gradients depend on: the resolved plan config of every layer
    (mask sizes and runs included, so a change of the library's defaults changes the signature)
    and the source of the plan's class and random draws."""
    from grass_callback import projection

    kind, options = METHODS[method]
    extra = []
    if kind == "factgrass_dense2":  # the default masks (their config; "method" tells it apart), then a dense sketch
        kind, options, extra = "factgrass", {"one_token": False}, [_dense_second_stage]
    if kind == "gaussian":  # building the plans would draw the k x D matrices
        layers = {name: {"dim": s.numel, "k": k, "seed": seed} for name, s in shapes.items()}
    else:
        layers = {name: _make(kind, s, k, seed, name, options).config() for name, s in shapes.items()}
    sources = [projection.PLAN_KINDS[kind], projection.derive_generator, projection.run_mask, projection.sjlt_tables,
               *extra]
    if kind == "factgrass_selective":  # the masks are learned, not drawn: the learner is part of them
        from grass_callback import selective

        sources.append(selective)
    code = hashlib.sha256("".join(inspect.getsource(obj) for obj in sources).encode()).hexdigest()[:16]
    return {"method": method, "kind": kind, "options": options, "k": k, "seed": seed, "layers": layers, "code": code}


def compress(plans: Mapping[str, object], factors: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[dict, float]:
    """``{layer: [N, k] float64}`` and the seconds ``plan.compress`` took over all layers."""
    out, seconds = {}, 0.0
    for name, plan in plans.items():
        x, d = factors[name]
        if isinstance(plan, FactGraSSPlan):  # as the taps choose: one token an example (an MLP) or several
            plan = plan.input_plan(token_axis=x.dim() > 2 and x.shape[1] > 1)
        plan.compress(x[:4], d[:4])  # warm-up: kernel load, allocations
        t0 = time.perf_counter()
        parts = [plan.compress(x[i:i + 512], d[i:i + 512]) for i in range(0, len(x), 512)]
        seconds += time.perf_counter() - t0
        out[name] = torch.cat(parts).to(torch.float64)
    return out, seconds


def method_grads(method: str, shapes: Mapping[str, LayerShape], factors, k: int, seed: int) -> tuple[dict, dict]:
    """``({layer: [N, k] float32}, info)``: every example's compressed gradient under ``method``."""
    kind, options = METHODS[method]
    if kind == "factgrass_dense2":
        return _dense_second_stage(shapes, factors, k, seed), {"compress_s": float("nan")}
    if kind == "factgrass_selective":
        from grass_callback.selective import selective_plans

        t0 = time.perf_counter()
        plans = selective_plans({name: (x[:SELECTIVE_SAMPLE], d[:SELECTIVE_SAMPLE]) for name, (x, d) in factors.items()},
                                shapes, k=k, seed=seed, **options)
        learn_s = time.perf_counter() - t0
    else:
        plans = {name: _make(kind, s, k, seed, name, options) for name, s in shapes.items()}
    grads, seconds = compress(plans, factors)
    info = {"compress_s": seconds}
    if kind == "factgrass_selective":
        info["learn_s"] = learn_s
    if kind.startswith("factgrass"):
        info["k_prime"] = sum(p.k_prime for p in plans.values() if isinstance(p, FactGraSSPlan))
    return {m: g.to(torch.float32) for m, g in grads.items()}, info


def _dense_second_stage(shapes, factors, k: int, seed: int) -> dict:
    """The default plan's masked outer products summed over tokens, projected by a dense Gaussian."""
    from grass_callback.projection import derive_generator

    out = {}
    for name, s in shapes.items():
        plan = _make("factgrass", s, k, seed, name, {"one_token": False})
        x, d = factors[name]
        x3 = x.unsqueeze(1) if x.dim() == 2 else x
        d3 = d.unsqueeze(1) if d.dim() == 2 else d
        if s.bias:
            x3 = torch.cat([x3, x3.new_ones(*x3.shape[:2], 1)], -1)
        xs, ds = x3[:, :, plan.in_idx].double(), d3[:, :, plan.out_idx].double()
        gen = derive_generator(seed, name, "dense2")
        proj = torch.randn(plan.k_in * plan.k_out, plan.k, generator=gen, dtype=torch.float64) / math.sqrt(plan.k)
        rows = [torch.einsum("nto,nti->noi", ds[i:i + 256], xs[i:i + 256]).flatten(1) @ proj
                for i in range(0, len(xs), 256)]
        out[name] = torch.cat(rows).to(torch.float32)
    return out


def kernel_from(grads: Mapping[str, Tensor], n: int) -> KernelInfluence:
    """The influence kernel of compressed gradients (first ``n`` rows train, the rest queries)."""
    return KernelInfluence({m: g[:n] for m, g in grads.items()}, {m: g[n:] for m, g in grads.items()})


def method_kernel(method: str, shapes: Mapping[str, LayerShape], factors, n: int, k: int, seed: int) -> tuple[KernelInfluence, dict]:
    grads, info = method_grads(method, shapes, factors, k, seed)
    return kernel_from(grads, n), info


def exact_grams(shapes: Mapping[str, LayerShape], factors, chunk: int = 256) -> dict[str, tuple[Tensor, int]]:
    """``{layer: (Gram [N, N] float64 of the uncompressed per-example gradients, numel)}``."""
    grams = {}
    for name, shape in shapes.items():
        x, d = factors[name]
        N = len(x)
        if x.dim() == 2 or x.shape[1] == 1:  # one token: the Gram is (x x^T + bias) * (δ δ^T)
            x64, d64 = x.reshape(N, -1).to(torch.float64), d.reshape(N, -1).to(torch.float64)
            gram = (x64 @ x64.T + (1.0 if shape.bias else 0.0)) * (d64 @ d64.T)
        else:
            rows = [materialize(x[i:i + chunk], d[i:i + chunk], shape.bias).flatten(1) for i in range(0, N, chunk)]
            full = torch.cat(rows)  # [N, D] float32, one layer at a time
            gram = torch.zeros(N, N, dtype=torch.float64)
            for i in range(0, N, 1024):
                gram[i:i + 1024] = (full[i:i + 1024] @ full.T).to(torch.float64)
            del full, rows
        grams[name] = (gram, shape.numel)
    return grams


def exact_kernel(shapes: Mapping[str, LayerShape], factors, n: int, chunk: int = 256,
                 grams: Mapping[str, tuple[Tensor, int]] | None = None) -> KernelInfluence:
    """Uncompressed per-layer influence from Gram matrices of the per-example gradients."""
    grams = grams if grams is not None else exact_grams(shapes, factors, chunk)
    return KernelInfluence.from_grams({name: (g[:n, :n], g[n:, :n], numel) for name, (g, numel) in grams.items()})


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
