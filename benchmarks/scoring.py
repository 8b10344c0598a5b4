"""Scoring throughput and peak memory of streaming a gradient store (CPU).

    .venv/bin/python benchmarks/scoring.py            # 200k rows, 4 layers x k=1024 (about 3-4 min on 2 cores)
    .venv/bin/python benchmarks/scoring.py --quick    # 40k rows (about 1 min)
    .venv/bin/python benchmarks/scoring.py --rows 400000 --layers 4 --k 1024 --json out/scoring.json

A synthetic store (random float16 rows, ``--layers`` layers of ``--k`` columns) is written in
chunks, never held in memory, together with two smaller stores holding the first 25% and 50% of
the same rows. A ``FisherStats`` is fitted from separate random rows and 100 random queries are
scored with :func:`grass_callback.attribution.score_store` (``chunk_rows=4096``, top-10), which
streams the store through :func:`grass_callback.scoring.score_chunks`. Every (store, mode) pair
is one call; modes: ``self_influence=True`` (the ``score_store`` default: also ``s(i, i)`` per
row) and ``self_influence=False``. Store writing is timed separately and not part of the scoring
time. The files were just written, so they are read from the page cache: the figures are the
CPU cost of scoring, not disk bandwidth.

Reported per call: seconds, throughput (training rows x queries per second) and the peak
resident memory the call added (``peak_rss_during``: VmHWM reset first, after ``malloc_trim``
so that memory freed by the previous call does not hide this one's; pages of the memory-mapped
shard being read count as resident). The headline is the ratio of that peak at
100% of the rows vs 25%: ~1 means memory does not grow with the store (the results themselves,
a few float per row, do grow, but they are small). Then, by default, the same calls again after fixing
glibc's mmap threshold (``mallopt``; ``--fixed-pass``): with glibc's default dynamic threshold,
freed 16 MB float32 chunk buffers are kept in the heap and resident memory climbs chunk after
chunk although nothing is alive, which the default pass shows. A smaller table times one chunk's
self-influence as the library computes it (``fitted.solve`` = ``cholesky_solve`` in float64) vs
one triangular solve ``||L^{-1} g||^2``, to show what that part costs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import peak_rss_during, print_table, write_json  # noqa: E402

from grass_callback.attribution import score_store  # noqa: E402
from grass_callback.fisher import FisherStats  # noqa: E402
from grass_callback.scoring import precondition_queries, score_chunks  # noqa: E402
from grass_callback.store import GradientStore  # noqa: E402

MB = 2**20


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold (it is dynamic by default: it rises to the size of the largest
    freed block, up to 32 MB, after which such blocks come from the heap and stay resident
    once freed). With a fixed threshold every large tensor is its own mapping, returned on free."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    that memory a previous call freed but glibc kept does not hide the next call's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def write_stores(root: str, dims: dict[str, int], targets: list[int], write_rows: int, seed: int) -> tuple[list[GradientStore], float]:
    """One store per target row count; store ``j`` holds the first ``targets[j]`` rows of one
    random stream (written chunk by chunk). Returns the stores and the seconds it took."""
    stores = [GradientStore(os.path.join(root, f"store-{n}"), layer_dims=dims, dtype="float16")
              for n in targets]
    gen = torch.Generator().manual_seed(seed)
    total = max(targets)
    start = time.perf_counter()
    for step, a in enumerate(range(0, total, write_rows)):
        b = min(a + write_rows, total)
        ids = torch.arange(a, b)
        grads = {name: torch.randn(b - a, k, generator=gen).to(torch.float16) for name, k in dims.items()}
        for store, n in zip(stores, targets):
            if a < n:
                m = min(b, n) - a
                store.append(ids[:m], step, {name: g[:m] for name, g in grads.items()})
    for store in stores:
        store.close()
    return stores, time.perf_counter() - start


def fit_fisher(dims: dict[str, int], rows: int, seed: int):
    stats = FisherStats(dims)
    gen = torch.Generator().manual_seed(seed)
    for a in range(0, rows, 2048):
        n = min(2048, rows - a)
        stats.update({name: torch.randn(n, k, generator=gen) for name, k in dims.items()})
    return stats.fit(1e-3)


def self_influence_chunk(fitted, store: GradientStore, chunk_rows: int, repeat: int) -> list[dict]:
    """One chunk's self-influence: the library's way (solve, then dot) vs ||L^{-1} g||^2."""
    chunk = next(iter(store.iter_chunks(chunk_rows=chunk_rows)))
    grads = chunk.grads

    def library() -> torch.Tensor:
        solved = fitted.solve(grads)
        return sum((grads[n].double() * solved[n].double()).sum(1) for n in grads)

    def triangular(dtype: torch.dtype) -> torch.Tensor:
        total = torch.zeros(len(chunk), dtype=torch.float64)
        for n, g in grads.items():
            L = fitted.factors[n].to(dtype)
            y = torch.linalg.solve_triangular(L, g.to(dtype).T, upper=False)
            total += y.square().sum(0).double()
        return total

    methods = {"solve + dot, float64 (library)": library,
               "triangular, float64": lambda: triangular(torch.float64),
               "triangular, float32": lambda: triangular(torch.float32)}
    ref = library()
    times: dict[str, list[float]] = {name: [] for name in methods}
    errors = {}
    for _ in range(repeat):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            errors[name] = float(((out - ref).abs() / ref.abs()).max())
    base = statistics.median(times["solve + dot, float64 (library)"])
    return [{"method": name, "rows": len(chunk), "ms": statistics.median(t) * 1e3,
             "speed-up": base / statistics.median(t), "max rel err": errors[name]}
            for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40k rows (about a minute)")
    parser.add_argument("--rows", type=int, default=None, help="rows of the largest store (default 200000, quick 40000)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--fractions", default="0.25,0.5,1.0", help="store sizes as fractions of --rows")
    parser.add_argument("--repeat", type=int, default=1, help="calls per (store, mode); medians reported")
    parser.add_argument("--fisher-rows", type=int, default=8192)
    parser.add_argument("--fixed-pass", choices=["none", "fast", "all"], default=None,
                        help="after the default pass, fix glibc's mmap threshold and measure again: "
                             "no mode, only self_influence=False, or both (default: all, full run: fast)")
    parser.add_argument("--mmap-threshold", type=int, default=MB, help="bytes, for the fixed pass")
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    total = args.rows if args.rows is not None else (40_000 if args.quick else 200_000)
    fractions = [float(f) for f in args.fractions.split(",")]
    fixed_pass = args.fixed_pass or ("all" if args.quick else "fast")
    targets = [max(1, int(round(f * total))) for f in fractions]
    dims = {f"layer{i}": args.k for i in range(args.layers)}
    m = args.queries
    wall = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; stores of {targets} rows, "
          f"{args.layers} layers x k={args.k} float16; {m} queries, chunk_rows={args.chunk_rows}, "
          f"topk={args.topk}", flush=True)

    with tempfile.TemporaryDirectory(prefix="grass-scoring-", dir=args.dir) as root:
        stores, write_s = write_stores(root, dims, targets, write_rows=4096, seed=0)
        sizes = [s.size_bytes() for s in stores]
        print(f"wrote {sum(s.num_rows for s in stores)} rows ({sum(sizes) / MB:.0f} MB) in {write_s:.1f} s "
              f"(not part of the scoring time)", flush=True)
        fitted = fit_fisher(dims, args.fisher_rows, seed=1)
        gen = torch.Generator().manual_seed(2)
        query_ids = torch.arange(m)
        query_grads = {name: torch.randn(m, k, generator=gen) for name, k in dims.items()}

        # warm-up: every code path once, on two chunks, so that no call below pays first-use costs
        pre = precondition_queries(fitted, query_grads)
        score_chunks(pre, itertools.islice(stores[0].iter_chunks(chunk_rows=args.chunk_rows), 2),
                     topk=args.topk, self_influence=fitted)

        modes = {"self_influence=True": True, "self_influence=False": False}
        results: dict[tuple[int, str, str], list[dict]] = {}

        def measure(malloc: str, mode_names: list[str]) -> None:
            for _ in range(args.repeat):
                for j, store in enumerate(stores):
                    for mode in mode_names:
                        box: dict = {}

                        def call(store=store, si=modes[mode], box=box) -> None:
                            t0 = time.perf_counter()
                            out = score_store(store, fitted, query_ids, query_grads, topk=args.topk,
                                              self_influence=si, chunk_rows=args.chunk_rows, progress=False)
                            box["seconds"] = time.perf_counter() - t0
                            box["rows"] = int(out.data_value.numel())
                            box["result MB"] = sum(t.numel() * t.element_size() for t in out.to_dict().values()) / MB

                        release_free_memory()
                        peak = peak_rss_during(call)
                        results.setdefault((j, mode, malloc), []).append({**box, "peak MB": peak / MB})
                        print(f"  [{malloc}] {store.num_rows} rows, {mode}: {box['seconds']:.1f} s, "
                              f"peak +{peak / MB:.0f} MB", flush=True)

        measure("default", list(modes))
        fixed_modes = {"none": [], "fast": ["self_influence=False"], "all": list(modes)}[fixed_pass]
        if fixed_modes:
            if fix_mmap_threshold(args.mmap_threshold):
                measure(f"mmap>={args.mmap_threshold // MB}MB", fixed_modes)
            else:
                print("  (mallopt unavailable: no fixed-threshold pass)")

        si_rows = self_influence_chunk(fitted, stores[0], args.chunk_rows, repeat=3)

    rows = []
    for (j, mode, malloc), runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak MB"] for r in runs)
        n = targets[j]
        assert all(r["rows"] == n for r in runs), "a scoring call did not see every row"
        rows.append({"malloc": malloc, "mode": mode, "fraction": fractions[j], "rows": n,
                     "store MB": sizes[j] / MB, "seconds": seconds, "rows x queries / s": n * m / seconds,
                     "rows / s": n / seconds, "peak MB": peak, "result MB": runs[0]["result MB"],
                     "peak / store": peak * MB / sizes[j]})
    rows.sort(key=lambda r: (r["malloc"] != "default", r["mode"] != "self_influence=True", r["rows"]))

    print()
    print_table(rows, ["malloc", "mode", "fraction", "rows", "store MB", "seconds", "rows x queries / s",
                       "rows / s", "peak MB", "result MB", "peak / store"])
    print()
    print(f"self-influence of one chunk ({args.chunk_rows} rows x {args.layers} layers x k={args.k}), "
          f"interleaved, median of 3:")
    print_table(si_rows, ["method", "rows", "ms", "speed-up", "max rel err"])
    print()
    lo, hi = min(targets), max(targets)
    for malloc, mode in dict.fromkeys((r["malloc"], r["mode"]) for r in rows):
        small = next(r for r in rows if (r["malloc"], r["mode"], r["rows"]) == (malloc, mode, lo))
        big = next(r for r in rows if (r["malloc"], r["mode"], r["rows"]) == (malloc, mode, hi))
        ratio = big["peak MB"] / small["peak MB"] if small["peak MB"] > 0 else math.nan
        print(f"HEADLINE [{malloc}] {mode}: {big['rows x queries / s'] / 1e6:.2f} M rows x queries / s at {hi} rows; "
              f"peak +{big['peak MB']:.0f} MB at {hi} rows vs +{small['peak MB']:.0f} MB at {lo} rows "
              f"= {ratio:.2f}x while the store grows {big['store MB'] / small['store MB']:.1f}x "
              f"({small['store MB']:.0f} -> {big['store MB']:.0f} MB)")
    on = next(r for r in rows if (r["malloc"], r["mode"], r["rows"]) == ("default", "self_influence=True", hi))
    off = next(r for r in rows if (r["malloc"], r["mode"], r["rows"]) == ("default", "self_influence=False", hi))
    print(f"self-influence (score_store's default) makes scoring {on['seconds'] / off['seconds']:.1f}x slower "
          f"({on['seconds']:.1f} s vs {off['seconds']:.1f} s at {hi} rows)")
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    write_json(args.json, {"rows": total, "layers": args.layers, "k": args.k, "queries": m,
                           "chunk_rows": args.chunk_rows, "threads": torch.get_num_threads(),
                           "mmap_threshold": args.mmap_threshold,
                           "write_seconds": write_s, "results": rows, "self_influence_chunk": si_rows})


if __name__ == "__main__":
    main()
