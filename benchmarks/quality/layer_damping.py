"""Which layer wants another damping: one layer's ratio scaled, the others left at the default.

    nice -n 10 .venv/bin/python -m benchmarks.quality.layer_damping gpt2-pydoc-tune digits-256x2 teacher-512
    nice -n 10 .venv/bin/python -m benchmarks.quality.layer_damping gpt2-pydoc-tune --methods factgrass gaussian exact

Reads the compressed gradients the suite cached (``python -m benchmarks.quality`` fills the cache;
a missing entry is an error naming that command). For each layer in turn, its ratio is multiplied
by each factor of ``--factors`` while every other layer keeps the rule's ratio ``max(1, k/N)``
(``"auto"`` without its vocabulary-head factor, which this study chose; see
:mod:`grass_callback.damping`); printed: the LDS change against all-default (mean over plan seeds ± the paired
standard error) beside the layer's spectrum statistics (effective rank over ``min(k, N)``, the
share of ``tr(F)`` in the top 1% of eigenvalues, the share of eigenvalues above the default
damping ``λ``, the median eigenvalue over ``λ``), and the LDS with every layer at its best factor
(chosen with hindsight on the same queries: an upper bound of what a per-layer rule could gain).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

from .cache import Cache  # noqa: E402
from .methods import exact_kernel, kernel_from, lds_per_query, oriented_targets  # noqa: E402
from .run import fmt  # noqa: E402
from .spectra import cached_grads, shapes_of, train_size  # noqa: E402
from .workloads import TUNING, WORKLOADS, ground_truth  # noqa: E402

FACTORS = (0.03, 0.1, 0.3, 3.0)


def spectrum_stats(ev: torch.Tensor, k: int, n: int) -> dict[str, float]:
    """Of one block's non-zero-rank eigenvalues: ``r_eff / m``, the top 1%'s share of the trace, the
    share of the ``m = min(k, N)`` eigenvalues above ``λ = tr / m`` and the median over ``λ``."""
    m = min(k, n)
    ev = torch.cat([ev.to(torch.float64).clamp_min(0), torch.zeros(max(0, m - ev.numel()), dtype=torch.float64)])
    ev = ev.sort(descending=True).values[:m]
    tr, tr2 = float(ev.sum()), float((ev * ev).sum())
    if tr <= 0:
        return {"reff_m": 0.0, "top1": 0.0, "above": 0.0, "median": 0.0}
    lam = tr / m
    return {"reff_m": tr * tr / tr2 / m, "top1": float(ev[:max(1, m // 100)].sum()) / tr,
            "above": float((ev > lam).sum()) / m, "median": float(ev[m // 2]) / lam}


def layer_gains(ki, masks: torch.Tensor, oriented: torch.Tensor, factors=FACTORS) -> dict:
    """``{"base": LDS at the default, layer: {"stats", "gain": {factor: LDS change}}, "best": LDS
    with each layer at its best factor (1 included)}`` for one kernel."""
    eig = ki.eigenvalues()
    auto = {b: max(1.0, k / ki.count) for b, (_ev, k, _u) in eig.items()}

    def lds(ratios) -> float:
        return float(lds_per_query(ki.predictions(masks, ratios), oriented).mean())

    out: dict = {"base": lds(auto)}
    best = dict(auto)
    for b, (ev, k, _u) in eig.items():
        gain = {c: lds({**auto, b: c * auto[b]}) - out["base"] for c in factors}
        top = max(gain, key=gain.get)
        if gain[top] > 0:
            best[b] = top * auto[b]
        out[b] = {"stats": spectrum_stats(ev, k, ki.count), "gain": gain}
    out["best"] = lds(best)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workloads", nargs="+", choices=list(WORKLOADS))
    p.add_argument("--methods", nargs="+", default=["factgrass"])
    p.add_argument("--factors", nargs="+", type=float, default=list(FACTORS))
    p.add_argument("--seeds", type=int, default=None, help="plan seeds (default: 3 on MLPs, 2 on GPT-2)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--cache", default="runs/quality-cache")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Cache(args.cache)
    for name in args.workloads:
        gt = ground_truth(name, args.cache)
        n, oriented = train_size(name, gt), oriented_targets(gt["targets"], gt["target_kind"])
        for method in args.methods:
            seeds = 1 if method == "exact" else args.seeds or (3 if WORKLOADS[name]["kind"] == "mlp" else 2)

            def kernel(seed: int):
                grads = cached_grads(cache, name, gt, method, args.k, seed)
                return (exact_kernel(shapes_of(name, gt), None, n, grams=grads) if method == "exact"
                        else kernel_from(grads, n))

            runs = [layer_gains(kernel(s), gt["masks"], oriented, tuple(args.factors)) for s in range(seeds)]
            layers = [b for b in runs[0] if b not in ("base", "best")]
            print(f"\n{name} {method} ({'tuning' if name in TUNING else 'reporting'} half), {seeds} plan seeds: "
                  f"LDS at the default {fmt([r['base'] for r in runs])}, each layer at its best factor "
                  f"{fmt([r['best'] for r in runs])}")
            print("| layer | r_eff/m | top 1% | above λ | median/λ | "
                  + " | ".join(f"x{c:g}" for c in args.factors) + " |")
            print("|---|---|---|---|---|" + "---|" * len(args.factors))
            for b in layers:
                s = runs[0][b]["stats"]
                cells = [fmt([r[b]["gain"][c] for r in runs], signed=True) for c in args.factors]
                print(f"| {b} | {s['reff_m']:.3f} | {s['top1']:.3f} | {s['above']:.3f} | {s['median']:.4f} | "
                      + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
