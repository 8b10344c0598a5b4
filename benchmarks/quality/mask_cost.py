"""What the mask sizes cost in kernel time: FactGraSS ``plan.compress`` per layer shape.

    nice -n 10 .venv/bin/python -m benchmarks.quality.mask_cost            # every shape and candidate
    nice -n 10 .venv/bin/python -m benchmarks.quality.mask_cost --heads    # wide_output_skew on vocabulary heads
    nice -n 10 .venv/bin/python -m benchmarks.quality.mask_cost --whole    # one-token layers kept whole, c = 1 / 2 / 4

For each layer shape of the suite's workloads (and ``T`` tokens per example), the candidate
mask sizes are timed side by side (interleaved rounds, median, CPU time of this process on one
thread), with ``k'`` and the ratio to the ``2 sqrt(k)`` masks: ``2 sqrt(k)`` (``oversample=4``),
``keep_narrow`` (a factor kept whole when its mask would keep half of it or more),
``oversample=6``, ``oversample=8`` with and without ``keep_narrow``, ``oversample=16`` (masks of ``4 sqrt(k)``), and
the library's current default (whatever ``FactGraSSPlan``'s defaults are); then explicit splits of
GPT-2's LM head, and ``wide_output_skew`` 1 / 4 / 8 / 16 on vocabulary heads.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import time_interleaved  # noqa: E402

from grass_callback.projection import FactGraSSPlan  # noqa: E402

VARIANTS = {"2sqrt(k)": {"oversample": 4.0, "keep_narrow": False, "wide_output_skew": 1.0},
            "keep_narrow": {"oversample": 4.0, "keep_narrow": True},
            "oversample 6": {"oversample": 6.0, "keep_narrow": False},
            "oversample 8": {"oversample": 8.0, "keep_narrow": False},
            "oversample 8 + keep_narrow": {"oversample": 8.0, "keep_narrow": True},
            "oversample 16": {"oversample": 16.0, "keep_narrow": False},
            "default": {}}
# (d_in, d_out, T, B): MLP layers of the suite (T = 1) and the GPT-2 workload's (T = 48)
SHAPES = [(64, 256, 1, 1024), (256, 256, 1, 1024), (24, 512, 1, 1024), (48, 256, 1, 1024), (256, 128, 1, 1024),
          (128, 256, 1, 1024), (64, 128, 1, 1024), (128, 384, 1, 1024), (128, 384, 48, 64), (128, 128, 48, 64),
          (128, 512, 48, 64), (512, 128, 48, 64), (128, 1024, 48, 64)]

# explicit mask sizes on GPT-2's LM head (128 x 1024, no bias): the same budget k' = 4096 split otherwise
EXPLICIT = [(128, 1024, False, 48, 64, [(64, 64), (16, 256), (8, 512), (4, 1024)])]
# vocabulary heads (no bias) under wide_output_skew: the suite's LM heads, the overhead benchmark's
# GPT-2/Llama head (256 x 8192, T = 128) and GPT-2 small's (768 x 50257, T = 64), B = 8
# a one-token (MLP) layer's whole gradient, sketched with c non-zeros per coordinate (the quality
# suite's factgrass-all, -all-c2, -all-c4), against the default masks
WHOLE = {"default": {}, **{f"whole, c={c}": {"oversample": 1024.0, "keep_narrow": False, "c": c} for c in (1, 2, 4)}}
HEADS = [(96, 1024, 48, 64), (128, 1024, 48, 64), (256, 8192, 128, 8), (768, 50257, 64, 8)]
SKEWS = (1.0, 4.0, 8.0, 16.0)


def _time_plans(where: str, plans: dict, B: int, T: int, d_in: int, d_out: int, base: str | None = None) -> None:
    """Time every plan on one random batch side by side; print ms per call and the ratio to ``base``
    (default: the first plan)."""
    x, d = torch.randn(B, T, d_in), torch.randn(B, T, d_out)
    times = time_interleaved({label: (lambda p=p: p.compress(x, d)) for label, p in plans.items()},
                             repeat=9, clock=__import__("time").process_time)
    ref = times[base or next(iter(times))]
    for label, p in plans.items():
        print(f"{where} | {label} | {p.k_in} x {p.k_out} = {p.k_prime} | "
              f"{1e3 * times[label]:.2f} | {times[label] / ref:.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", action="store_true", help="only the vocabulary heads' wide_output_skew rows")
    parser.add_argument("--whole", action="store_true", help="only the one-token layers kept whole (c = 1, 2, 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("layer (d_in x d_out, T, B) | masks | k_in' x k_out' = k' | ms per call | x the first (2sqrt(k))")
    if args.whole:
        for d_in, d_out, T, B in [s for s in SHAPES if s[2] == 1]:
            plans = {label: FactGraSSPlan(d_in, d_out, True, k=1024, name="l", **opt) for label, opt in WHOLE.items()}
            _time_plans(f"{d_in}x{d_out}, T={T}, B={B}", plans, B, T, d_in, d_out, base="default")
        return
    for d_in, d_out, T, B in ([] if args.heads else SHAPES):
        plans = {label: FactGraSSPlan(d_in, d_out, True, k=1024, name="l", **opt) for label, opt in VARIANTS.items()}
        _time_plans(f"{d_in}x{d_out}, T={T}, B={B}", plans, B, T, d_in, d_out, base="2sqrt(k)")
    for d_in, d_out, bias, T, B, sizes in ([] if args.heads else EXPLICIT):
        plans = {f"explicit {a} x {b}": FactGraSSPlan(d_in, d_out, bias, k=1024, k_in=a, k_out=b, name="l")
                 for a, b in sizes}
        _time_plans(f"{d_in}x{d_out} (bias={bias}), T={T}, B={B}", plans, B, T, d_in, d_out)
    for d_in, d_out, T, B in HEADS:
        plans = {f"wide_output_skew {s:g}": FactGraSSPlan(d_in, d_out, False, k=1024, wide_output_skew=s, name="l")
                 for s in SKEWS}
        _time_plans(f"{d_in}x{d_out} (head), T={T}, B={B}", plans, B, T, d_in, d_out)


if __name__ == "__main__":
    main()
