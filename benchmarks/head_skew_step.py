"""What a vocabulary head's mask skew costs in a whole training step (CPU), side by side.

    nice -n 5 .venv/bin/python benchmarks/head_skew_step.py                 # skew 4 and 16, 32 rounds
    nice -n 5 .venv/bin/python benchmarks/head_skew_step.py --skews 1 4 8 16 --rounds 40

The overhead benchmark's GPT-2 (``GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192,
n_positions=128)``, random weights, random token batches ``B = 8, T = 128``, AdamW), one copy per
variant: ``plain`` (no taps), and the taps on every linear layer at ``k = 1024`` with the head's
``wide_output_skew`` set to each of ``--skews`` (the other 16 layers' plans are the same in every
variant). A step is zero_grad, forward, backward, optimizer step and ``collect()`` of the rows (no
store, no Fisher: the compression alone). Rounds are interleaved with a rotating order; one thread;
process CPU time. Printed: each variant's median and mean step, and every skew against the first,
as the median of per-round ratios and the ratio of means.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grass_callback.attribution import per_example_scale  # noqa: E402
from grass_callback.capture import LayerTaps  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skews", nargs="+", type=float, default=[4.0, 16.0])
    p.add_argument("--rounds", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=args.seq))
    variants: dict[str, tuple] = {}
    for skew in [None, *args.skews]:
        model = copy.deepcopy(base)
        taps = None
        if skew is not None:
            taps = LayerTaps(model, k=1024, plan_options={"wide_output_skew": skew})
            taps.__enter__()
            head = taps.plans["lm_head"]
            print(f"skew {skew:g}: lm_head masks {head.k_in} x {head.k_out}")
        variants["plain" if skew is None else f"skew {skew:g}"] = (model, torch.optim.AdamW(model.parameters(), 1e-4), taps)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.warmup + args.rounds):
        x = torch.randint(0, 8192, (args.batch, args.seq))
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, opt, taps = variants[name]
            t0 = time.process_time()
            if taps is not None:
                taps.clear()
                taps.set_scale(per_example_scale(args.batch, "mean"))
            opt.zero_grad()
            model(x, labels=x).loss.backward()
            opt.step()
            if taps is not None:
                taps.collect()
            if r >= args.warmup:
                times[name].append(time.process_time() - t0)
    for name, ts in times.items():
        print(f"{name:>8s}: median {statistics.median(ts) * 1e3:7.1f} ms, mean {statistics.fmean(ts) * 1e3:7.1f} ms")
    first = names[1]
    for name in names[2:]:
        ratios = [a / b for a, b in zip(times[name], times[first])]
        print(f"{name} / {first}: median of per-round ratios {statistics.median(ratios):.4f}, "
              f"ratio of means {statistics.fmean(times[name]) / statistics.fmean(times[first]):.4f}")
    for name in names[1:]:
        ratios = [a / b for a, b in zip(times[name], times["plain"])]
        print(f"{name} / plain: median of per-round ratios {statistics.median(ratios):.4f}, "
              f"ratio of means {statistics.fmean(times[name]) / statistics.fmean(times['plain']):.4f}")


if __name__ == "__main__":
    main()
