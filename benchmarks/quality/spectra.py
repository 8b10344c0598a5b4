"""Per-layer Fisher spectra of the quality suite's cached kernels, and damping rules scored on them.

    nice -n 10 .venv/bin/python -m benchmarks.quality.spectra                      # tuning half, table
    nice -n 10 .venv/bin/python -m benchmarks.quality.spectra --rules auto pow0.5 --workloads gpt2-pydoc-tune

Reads the compressed gradients that ``python -m benchmarks.quality`` cached under
``--cache/grads`` (it never compresses: a missing entry is an error naming the command that
fills it), so a rule can be scored without re-measuring the suite's rows. For every (workload,
method, plan seed) it prints per layer ``k``, ``N``, ``m = min(k, N)`` and the effective rank
``r_eff = tr(F)^2 / tr(F^2)`` as a fraction of ``m``, then each rule's LDS minus the best ratio of
the grid 1e-4 .. 10 (paired on the seed, mean ± SE), the figure the suite's rule table prints.
``exact`` (the uncompressed Gram matrices, one seed) is read the same way.
Rules: :data:`benchmarks.quality.rules.RULES`. The figures of a rule here equal the suite's: same
kernel (:func:`benchmarks.quality.methods.kernel_from`), same evaluation
(:func:`benchmarks.quality.methods.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

from . import lm as lm_mod  # noqa: E402
from . import mlp  # noqa: E402
from .cache import Cache  # noqa: E402
from .methods import evaluate, exact_kernel, kernel_from, plan_signature  # noqa: E402
from .rules import RULES, with_layer_scales  # noqa: E402
from .run import fmt, mean_se  # noqa: E402
from .workloads import TUNING, WORKLOADS, config_hash, ground_truth  # noqa: E402


def shapes_of(name: str, gt: dict) -> dict:
    """The workload's layer shapes without computing its gradients (the LM is built, not run)."""
    cfg = WORKLOADS[name]
    if cfg["kind"] == "mlp":
        return mlp.mlp_shapes(cfg)
    return lm_mod.lm_shapes(lm_mod.build_lm(cfg, gt["vocab"]))


def train_size(name: str, gt: dict) -> int:
    return int(gt["masks"].shape[1])


def cached_grads(cache: Cache, name: str, gt: dict, method: str, k: int, seed: int) -> dict:
    """The cached compressed gradients (``exact``: the Gram matrices) of one method and plan seed."""
    base = {"workload": name, "ground_truth": config_hash(WORKLOADS[name]), "n": train_size(name, gt)}
    if method == "exact":
        signature = {**base, "method": "exact"}
    else:
        signature = {**base, **plan_signature(method, shapes_of(name, gt), k, seed)}

    def missing():
        raise SystemExit(f"no cached gradients for {name} {method} seed {seed} at k={k}; run "
                         f"`python -m benchmarks.quality --workloads {name} --methods {method}` first.")

    got = cache.get_or_compute("grads", signature, missing)
    return got if method == "exact" else got[0]  # compressed: (gradients, info)


def layer_stats(ki) -> dict:
    """Per block: k, N, m = min(k, N), r_eff / m and the share of tr(F) in the top 1% of m."""
    out = {}
    for layer, (ev, k, unit) in ki.eigenvalues().items():
        ev = ev.to(torch.float64)
        tr, tr2 = float(ev.sum()), float((ev * ev).sum())
        m = min(k, ki.count)
        top = max(1, m // 100)
        out[layer] = {"k": k, "N": ki.count, "m": m, "reff_m": (tr * tr / tr2) / m if tr2 > 0 else 0.0,
                      "top1pct": float(ev.sort(descending=True).values[:top].sum()) / tr if tr > 0 else 0.0}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(TUNING), choices=list(WORKLOADS))
    p.add_argument("--methods", nargs="+", default=["factgrass", "gaussian"])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--seeds", type=int, default=3, help="plan seeds on the MLP workloads (default 3)")
    p.add_argument("--lm-seeds", type=int, default=2, help="plan seeds on the language model (default 2)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--cache", default="runs/quality-cache")
    p.add_argument("--json", help="write the per-seed figures here")
    p.add_argument("--no-spectra", action="store_true", help="skip the per-layer table")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Cache(args.cache)
    rules = {r: RULES[r] for r in args.rules}
    results: dict = {}
    t_all = time.perf_counter()
    for name in args.workloads:
        gt = ground_truth(name, args.cache)
        n = train_size(name, gt)
        for method in args.methods:
            seeds = 1 if method == "exact" else args.seeds if WORKLOADS[name]["kind"] == "mlp" else args.lm_seeds
            t0 = time.perf_counter()
            rows = []
            for seed in range(seeds):
                grads = cached_grads(cache, name, gt, method, args.k, seed)
                ki = (exact_kernel(shapes_of(name, gt), None, n, grams=grads) if method == "exact"
                      else kernel_from(grads, n))
                row = evaluate(ki, gt["masks"], gt["targets"], gt["target_kind"],
                               with_layer_scales(rules, shapes_of(name, gt), args.k))
                row["layers"] = layer_stats(ki)
                rows.append(row)
            results.setdefault(name, {})[method] = rows
            print(f"{name} {method}: {seeds} seeds, {time.perf_counter() - t0:.1f} s", flush=True)
            if not args.no_spectra:
                print(f"  {'layer':28s} {'k':>5s} {'N':>5s} {'r_eff/m':>8s} {'top1%':>6s}")
                for layer, s in rows[0]["layers"].items():
                    vals = [r["layers"][layer]["reff_m"] for r in rows]
                    print(f"  {layer:28s} {s['k']:5d} {s['N']:5d} {sum(vals) / len(vals):8.3f} "
                          f"{s['top1pct']:6.3f}")
    for method in args.methods:
        print(f"\n{method}: LDS(rule) - LDS(best grid ratio), paired on the seed; worst = min over workloads")
        names = [w for w in args.workloads if method in results.get(w, {})]
        print(f"{'rule':16s} " + " ".join(f"{w:>18s}" for w in names) + f" {'worst':>8s}")
        ranked = []
        for rule in rules:
            means = [mean_se([r["rules"][rule] - r["best"] for r in results[w][method]])[0] for w in names]
            cells = [fmt([r["rules"][rule] - r["best"] for r in results[w][method]], signed=True) for w in names]
            ranked.append((min(means), rule, cells))
        for worst, rule, cells in sorted(ranked, reverse=True):
            print(f"{rule:16s} " + " ".join(f"{c:>18s}" for c in cells) + f" {worst:+8.4f}")
        best_line = [fmt([r["best"] for r in results[w][method]]) for w in names]
        print(f"{'(best LDS)':16s} " + " ".join(f"{c:>18s}" for c in best_line))
    print(f"\nwall {time.perf_counter() - t_all:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
