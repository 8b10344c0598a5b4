"""Compression speed and memory: FactGraSS kernel vs its torch reference vs LoGra vs materialize+SJLT.

    python benchmarks/compress.py            # full grid (about 10-15 min on 2 cores)
    python benchmarks/compress.py --quick    # a few shapes (about 1 min)
    python benchmarks/compress.py --json out/compress.json
    python benchmarks/compress.py --coord    # the kernel vs gather + bmm on coordinate-wise masks

Every method is timed side by side in one process on the same inputs (float32, B = 8): the fast
methods are called in turn, 7 rounds, and each reports its median (materialize+SJLT, seconds a
call, is timed on its own, median of 3). By default with one torch thread and the process's CPU time as the clock, so
that other jobs on a shared machine do not count (``--threads 2 --wall`` for wall time on two
threads). ``peak MB`` is the resident memory the call added at its peak (Linux VmHWM reset
before each call).
``kernel`` and ``reference`` use the default plan, whose masks keep columns in runs of 8
(``mask_run="auto"``); ``kernel-coord`` is the kernel on the paper's coordinate-wise masks
(``mask_run=1``), whose 64 scattered columns make it read almost every cache line of a wide row;
``reference-coord`` the gather + bmm path on those masks; ``read inputs`` is one pass over ``x`` and
``grad_out`` (two ``sum`` calls), the cost of reading everything.

``--coord`` times, on coordinate-wise masks only, the kernel as it chooses its path (``fused``),
the kernel forced to gather token by token (``fused-rows``, the gather of the kernel before
blocks), the gather + bmm + ``index_add_`` path (``bmm``), these three called alike on the plan's
tables, and ``impl="auto"`` through ``factgrass`` with its input checks (``auto``, after its one
timing), prints ``bmm/fused`` per shape and counts the shapes where the fused kernel loses.
Materialize-then-SJLT forms the per-example gradients; it is skipped where they would exceed
``--materialize-limit-gb``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import peak_rss_during, print_table, time_interleaved, write_json  # noqa: E402

from grass_callback.ops import autotune, factgrass, factgrass_reference, kernel_available  # noqa: E402
from grass_callback.projection import FactGraSSPlan, LoGraPlan, SJLTPlan, materialize  # noqa: E402

SHAPES = [(768, 768), (4096, 4096), (4096, 11008), (768, 50257)]
TOKENS = [1, 128, 512]
KS = [256, 1024, 4096]


def run_case(d_in: int, d_out: int, T: int, k: int, B: int, materialize_limit: float, clock) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d_in, generator=gen)
    d = torch.randn(B, T, d_out, generator=gen)
    fact = FactGraSSPlan(d_in, d_out, bias=False, k=k, name="bench")
    coord = FactGraSSPlan(d_in, d_out, bias=False, k=k, name="bench", mask_run=1)
    logra = LoGraPlan(d_in, d_out, bias=False, k=k, name="bench")
    row: dict = {"shape": f"{d_out}x{d_in}", "T": T, "k": k}
    methods = {
        "kernel": lambda: factgrass(x, d, fact, impl="cpu"),
        "reference": lambda: factgrass(x, d, fact, impl="torch"),
        "kernel-coord": lambda: factgrass(x, d, coord, impl="cpu"),
        "reference-coord": lambda: factgrass(x, d, coord, impl="torch"),
        "read inputs": lambda: (x.sum(), d.sum()),
        "logra": lambda: logra.compress(x, d),
    }
    times = time_interleaved(methods, clock=clock)
    if B * d_in * d_out * 4 / 2**30 <= materialize_limit:  # seconds a call: timed on its own
        sjlt = SJLTPlan(d_in * d_out, k=k, name="bench")
        methods["materialize+sjlt"] = lambda: sjlt.project(materialize(x, d, bias=False).flatten(1))
        times.update(time_interleaved({"materialize+sjlt": methods["materialize+sjlt"]}, repeat=3, clock=clock))
    for name, seconds in times.items():
        row[f"{name} ms"] = seconds * 1e3
    for name, fn in methods.items():
        row[f"{name} peak MB"] = peak_rss_during(fn) / 2**20
    base = row["logra ms"]
    for name in methods:
        row[f"logra/{name}"] = base / row[f"{name} ms"]
    row["reference/kernel"] = row["reference ms"] / row["kernel ms"]
    row["reference-coord/kernel-coord"] = row["reference-coord ms"] / row["kernel-coord ms"]
    return row


def run_coord_case(d_in: int, d_out: int, T: int, k: int, B: int, clock) -> dict:
    """The kernel vs the gather + bmm path on coordinate-wise masks (``mask_run=1``)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d_in, generator=gen)
    d = torch.randn(B, T, d_out, generator=gen)
    plan = FactGraSSPlan(d_in, d_out, bias=False, k=k, name="bench", mask_run=1)
    tables = plan.tables()
    forced = torch.ops.grass_callback._factgrass_cpu_path
    autotune.clear()
    factgrass(x, d, plan)  # impl="auto" times its two paths once here
    methods = {  # the first three called alike, on the tables (no Python wrapper, no checks)
        "fused": lambda: torch.ops.grass_callback.factgrass(x, d, *tables, plan.k, None),
        "fused-rows": lambda: forced(x, d, *tables, plan.k, None, -1, 0, 0),
        "bmm": lambda: factgrass_reference(x, d, *tables, plan.k, None),
        "auto": lambda: factgrass(x, d, plan),  # through factgrass(), its checks included
    }
    times = time_interleaved(methods, clock=clock)
    row: dict = {"shape": f"{d_out}x{d_in}", "T": T, "k": k}
    row.update({f"{name} ms": seconds * 1e3 for name, seconds in times.items()})
    row["bmm/fused"] = row["bmm ms"] / row["fused ms"]
    row["bmm/fused-rows"] = row["bmm ms"] / row["fused-rows ms"]
    row["auto picks"] = next(iter(autotune.cache().values()), "kernel (untimed)")
    return row


def coord_grid(cases: list[tuple[int, int, int, int]], B: int, clock) -> list[dict]:
    rows = []
    for d_in, d_out, T, k in cases:
        rows.append(run_coord_case(d_in, d_out, T, k, B, clock))
        print(f"  done {d_out}x{d_in} T={T} k={k}: bmm/fused {rows[-1]['bmm/fused']:.2f}", flush=True)
    print()
    print_table(rows, ["shape", "T", "k", "fused ms", "fused-rows ms", "bmm ms", "auto ms", "bmm/fused",
                      "bmm/fused-rows", "auto picks"])
    for name in ("fused", "fused-rows"):
        lost = [r for r in rows if r[f"bmm/{name}"] < 1.0]
        print(f"{name} slower than bmm in {len(lost)} of {len(rows)} shapes"
              + (": " + ", ".join(f"{r['shape']} T={r['T']} k={r['k']} ({r[f'bmm/{name}']:.2f})" for r in lost)
                 if lost else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes only (about a minute)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--materialize-limit-gb", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--wall", action="store_true", help="wall time instead of process CPU time")
    parser.add_argument("--coord", action="store_true",
                        help="the kernel vs gather + bmm on coordinate-wise masks over the grid (with --quick: a few shapes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    if not kernel_available():
        sys.exit("the C++ kernel did not build; see the warning above")
    if args.quick:
        cases = [(768, 768, 128, 1024), (4096, 4096, 128, 1024), (4096, 4096, 512, 1024)]
    else:
        cases = [(di, do, T, k) for di, do in SHAPES for T in TOKENS for k in KS]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), B={args.batch}, float32, "
          f"clock: {'wall' if args.wall else 'process CPU time'}")
    if args.coord:
        rows = coord_grid(cases, args.batch, clock)
        write_json(args.json, {"batch": args.batch, "threads": torch.get_num_threads(), "coord": True, "rows": rows})
        return
    rows = []
    for d_in, d_out, T, k in cases:
        rows.append(run_case(d_in, d_out, T, k, args.batch, args.materialize_limit_gb, clock))
        print(f"  done {d_out}x{d_in} T={T} k={k}: kernel {rows[-1]['kernel ms']:.2f} ms, "
              f"{rows[-1]['logra/kernel']:.1f}x faster than LoGra", flush=True)
    print()
    print_table(rows, ["shape", "T", "k", "kernel ms", "reference ms", "kernel-coord ms", "read inputs ms", "logra ms",
                      "materialize+sjlt ms", "logra/kernel", "reference/kernel", "logra/kernel-coord",
                      "reference-coord/kernel-coord",
                      "kernel peak MB", "logra peak MB", "materialize+sjlt peak MB"])
    write_json(args.json, {"batch": args.batch, "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
