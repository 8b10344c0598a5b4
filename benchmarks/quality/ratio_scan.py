"""A finer damping scan than the suite's half-decade grid, on the cached compressed gradients.

    nice -n 10 .venv/bin/python -m benchmarks.quality.ratio_scan digits-256x2 teacher-512

For each workload, ``gaussian`` and ``factgrass`` (the library's default plan) and each plan seed,
the LDS at fixed ratios ``r`` (``λ = r · trace(F)/k`` on every layer) between 0.4 and 1.5 minus
the best ratio of the suite's grid ``1e-4 .. 10``; mean over seeds. Reads the compressed gradients
from the suite's cache (``--cache``), computing the missing ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

from .cache import Cache  # noqa: E402
from .methods import evaluate, kernel_from, method_grads, plan_signature  # noqa: E402
from .run import workload_inputs  # noqa: E402
from .workloads import WORKLOADS, config_hash, ground_truth  # noqa: E402

RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="+", choices=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=["gaussian", "factgrass"])
    parser.add_argument("--seeds", type=int, default=3, help="plan seeds on the MLPs (2 on GPT-2)")
    parser.add_argument("--cache", default="runs/quality-cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache = Cache(args.cache)
    rules = {f"r={r:g}": (lambda ki, r=r: r) for r in RATIOS}
    print("workload | method | " + " | ".join(rules) + "   (LDS(r) - LDS(best grid ratio), mean over seeds)")
    for name in args.workloads:
        gt = ground_truth(name, args.cache)
        shapes, factors, n = workload_inputs(name, gt)
        base = {"workload": name, "ground_truth": config_hash(WORKLOADS[name]), "n": n}
        for method in args.methods:
            diffs: dict[str, list[float]] = {r: [] for r in rules}
            for seed in range(args.seeds if WORKLOADS[name]["kind"] == "mlp" else 2):
                signature = {**base, **plan_signature(method, shapes, 1024, seed)}
                grads, _ = cache.get_or_compute("grads", signature,
                                                lambda: method_grads(method, shapes, factors, 1024, seed))
                out = evaluate(kernel_from(grads, n), gt["masks"], gt["targets"], gt["target_kind"], rules)
                for r in rules:
                    diffs[r].append(out["rules"][r] - out["best"])
            print(f"{name} | {method} | " + " | ".join(f"{statistics.fmean(v):+.4f}" for v in diffs.values()),
                  flush=True)


if __name__ == "__main__":
    main()
