"""Which layer holds the gap between FactGraSS and the dense Gaussian, from the cached gradients.

    nice -n 10 .venv/bin/python -m benchmarks.quality.layer_swap gpt2-pydoc
    nice -n 10 .venv/bin/python -m benchmarks.quality.layer_swap gpt2-pydoc --layer lm_head \\
        --masks 64x64 32x128 16x256 8x512 4x1024

Without ``--masks``: for each layer in turn, the LDS (default damping, mean over plan seeds) of
the default FactGraSS gradients with that one layer's replaced by the dense Gaussian's. With
``--layer L --masks KINxKOUT ...``: FactGraSS everywhere, layer ``L`` compressed with explicit
mask sizes ``k_in x k_out`` (the other layers keep the default plan's gradients).
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

from grass_callback.projection import FactGraSSPlan  # noqa: E402

from .cache import Cache  # noqa: E402
from .methods import compress, evaluate, kernel_from, method_grads, plan_signature  # noqa: E402
from .rules import RULES, with_layer_scales  # noqa: E402
from .run import DEFAULT_RULE, workload_inputs  # noqa: E402
from .workloads import WORKLOADS, config_hash, ground_truth  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("--layer", default=None)
    parser.add_argument("--masks", nargs="+", default=None, help="k_in x k_out pairs, e.g. 4x1024")
    parser.add_argument("--seeds", type=int, default=None, help="plan seeds (default: 3 on MLPs, 2 on GPT-2)")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--cache", default="runs/quality-cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache = Cache(args.cache)
    name = args.workload
    gt = ground_truth(name, args.cache)
    shapes, factors, n = workload_inputs(name, gt)
    base = {"workload": name, "ground_truth": config_hash(WORKLOADS[name]), "n": n}
    seeds = args.seeds or (3 if WORKLOADS[name]["kind"] == "mlp" else 2)
    rules = with_layer_scales({DEFAULT_RULE: RULES[DEFAULT_RULE]}, shapes, args.k)

    def grads(method: str, seed: int) -> dict:
        signature = {**base, **plan_signature(method, shapes, args.k, seed)}
        return cache.get_or_compute("grads", signature,
                                    lambda: method_grads(method, shapes, factors, args.k, seed))[0]

    def lds(g: dict) -> float:
        return evaluate(kernel_from(g, n), gt["masks"], gt["targets"], gt["target_kind"], rules)["rules"][DEFAULT_RULE]

    def report(label: str, values: list[float]) -> None:
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
        print(f"{name} | {label} | {statistics.fmean(values):.4f} ± {se:.4f}", flush=True)

    print("workload | gradients | LDS at default damping (mean ± SE over plan seeds)")
    report("factgrass everywhere", [lds(grads("factgrass", s)) for s in range(seeds)])
    report("gaussian everywhere", [lds(grads("gaussian", s)) for s in range(seeds)])
    if args.masks is None:
        for layer, shape in shapes.items():
            values = [lds({**grads("factgrass", s), layer: grads("gaussian", s)[layer]}) for s in range(seeds)]
            report(f"factgrass, gaussian on {layer} ({shape.d_in} x {shape.d_out})", values)
        return
    if args.layer not in shapes:
        parser.error(f"--layer must be one of {sorted(shapes)}")
    s = shapes[args.layer]
    for spec in args.masks:
        k_in, k_out = (int(v) for v in spec.lower().split("x"))
        values = []
        for seed in range(seeds):
            plan = FactGraSSPlan(s.d_in, s.d_out, s.bias, k=args.k, k_in=k_in, k_out=k_out, seed=seed, name=args.layer)
            g, _ = compress({args.layer: plan}, {args.layer: factors[args.layer]})
            values.append(lds({**grads("factgrass", seed), args.layer: g[args.layer].to(torch.float32)}))
        report(f"factgrass, {args.layer} masks {k_in} x {k_out}", values)


if __name__ == "__main__":
    main()
