"""What the recorder's per-step work costs, part by part (CPU, one thread, process CPU time).

    .venv/bin/python benchmarks/recorder_parts.py                    # Llama shape: 29 layers, B = 8, k = 1024
    .venv/bin/python benchmarks/recorder_parts.py --layers 17         # GPT-2 shape of benchmarks/overhead.py

The parts of ``StepRecorder.record`` plus the writer's ``GradientStore.append``, timed apart on
random rows (float32 from the kernel, float16 storage), each as the mean over many calls so the
Fisher's staggered folds are amortised as a training run pays them: the cast to the storage
dtype, the finite mask (``finite_rows``), the float64 Fisher update (``FisherStats.update``),
and the store's append (no shard commit: ``benchmarks/overhead.py`` measures that apart).
The sum is the recorder's CPU cost per step; ``benchmarks/overhead.py`` sets it against the
training step itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from grass_callback.fisher import FisherStats
from grass_callback.recorder import finite_rows
from grass_callback.store import GradientStore


def per_call_ms(fn, calls: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=29)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=256, help="calls per part (the Fisher folds every 128 rows)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dims = {f"layer{i}": args.k for i in range(args.layers)}
    gen = torch.Generator().manual_seed(0)
    rows = {n: torch.randn(args.batch, k, generator=gen) for n, k in dims.items()}
    cast = {n: g.to(torch.float16, copy=True) for n, g in rows.items()}
    keep = finite_rows(rows, torch.float16)
    fisher = FisherStats(dims)
    store = GradientStore(tempfile.mkdtemp(prefix="recorder-parts-"), layer_dims=dims, dtype="float16",
                          rows_per_shard=10 ** 9)
    ids, step = torch.arange(args.batch), [0]

    def append() -> None:
        step[0] += 1
        store.append(ids + args.batch * step[0], step[0], {n: t.clone() for n, t in cast.items()}, owned=True)

    clone_ms = per_call_ms(lambda: {n: t.clone() for n, t in cast.items()}, args.calls)
    parts = {
        "cast to float16": per_call_ms(lambda: {n: g.to(torch.float16, copy=True) for n, g in rows.items()}, args.calls),
        "finite mask": per_call_ms(lambda: finite_rows(rows, torch.float16), args.calls),
        "Fisher update (float64)": per_call_ms(lambda: fisher.update(cast, keep=keep), args.calls),
        "store append (writer thread)": per_call_ms(append, args.calls) - clone_ms,
    }
    print(f"{args.layers} layers x k = {args.k}, B = {args.batch}, one thread, process CPU ms per step "
          f"(mean of {args.calls} calls)")
    for name, ms in parts.items():
        print(f"  {name:30s} {ms:7.2f}")
    print(f"  {'total':30s} {sum(parts.values()):7.2f}")


if __name__ == "__main__":
    main()
