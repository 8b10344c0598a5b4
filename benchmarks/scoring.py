"""Scoring throughput and peak memory of streaming a gradient store (CPU).

    .venv/bin/python benchmarks/scoring.py            # 200k rows, 4 layers x k=1024 (about 2 min; more when loaded)
    .venv/bin/python benchmarks/scoring.py --quick    # 40k rows (about 1 min)
    .venv/bin/python benchmarks/scoring.py --rows 400000 --layers 4 --k 1024 --json out/scoring.json

A synthetic store (random float16 rows, ``--layers`` layers of ``--k`` columns) is written in
chunks, never held in memory, together with two smaller stores holding the first 25% and 50% of
the same rows. A ``FisherStats`` is fitted from separate random rows and 100 random queries are
scored with :func:`grass_callback.attribution.score_store` (``chunk_rows=4096``, top-10), which
streams the store through :func:`grass_callback.scoring.score_chunks`. Every (store, mode) pair
is one call; modes: ``self_influence=True`` (the ``score_store`` default: also ``s(i, i)`` per
row; slow, so by default only on the smallest store and only through ``score_store``:
``--self-influence``) and
``self_influence=False``. Store writing is timed separately and not part of the scoring
time. The files were just written, so they are read from the page cache: the figures are the
CPU cost of scoring, not disk bandwidth.

Threads: torch runs single-threaded by default (``--threads 1``) and throughput is per CPU
second of the process, which other processes' load on a shared machine does not change
(with 2 threads, every parallel region waits whenever another process holds a core, and wall
times swing several-fold); ``--threads 0`` keeps torch's default and reports per wall second.

Reported per call: wall and CPU seconds, throughput (training rows x queries per second), the peak
resident memory the call added (``peak_rss_during``: VmHWM reset first, after ``malloc_trim`` so
that memory the previous call freed does not hide this one's), split by a sampling thread into
heap (RssAnon) and resident pages of memory-mapped shard files (RssFile). The headline is the
ratio of the peak at 100% of the rows vs 25%: ~1 means memory does not grow with the store (the
results themselves, a few numbers per row, do grow, but they are small).

Each call is followed by the same scoring through ``score_chunks`` with each chunk's ``ids``
copied out of the shard's memory map (``ids copied``; ``--no-copy-pass`` skips it): the ids that
``score_chunks`` keeps (for data values and self-influence) are otherwise views into the map,
which keep every shard read so far mapped and resident.
``--mmap-threshold BYTES`` fixes glibc's dynamic mmap threshold for the whole run, which removes
the heap growth that comes from glibc keeping freed 16 MB chunk buffers.

A smaller table times one chunk's self-influence as the library computes it (``fitted.solve`` =
``cholesky_solve`` in float64, then a dot product) vs one triangular solve ``||L^{-1} g||^2``.
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
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import peak_rss_during, print_table, write_json  # noqa: E402

from grass_callback.attribution import score_store  # noqa: E402
from grass_callback.fisher import FisherStats  # noqa: E402
from grass_callback.scoring import precondition_queries, score_chunks  # noqa: E402
from grass_callback.store import GradientStore, StoreChunk  # noqa: E402

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


def _rss_parts() -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes: heap memory vs resident pages of mapped files."""
    anon = file = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith("RssFile:"):
            file = int(line.split()[1]) * 1024
    return anon, file


class RssSampler:
    """Samples RssAnon / RssFile every few ms in a thread; ``peaks()`` is the growth of each
    over its value at start (where ``peak_rss_during``'s total goes: heap or mapped files)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = _rss_parts()
        self.peak = list(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = _rss_parts()
            self.peak = [max(self.peak[0], anon), max(self.peak[1], file)]
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self) -> tuple[float, float]:
        return (self.peak[0] - self.start[0]) / MB, (self.peak[1] - self.start[1]) / MB


def copied_ids(chunks):
    """The store's chunks with ``ids`` copied out of the shard's memory map (the gradients are
    float32 copies already), so that keeping the ids does not keep the mapped file resident."""
    for c in chunks:
        yield StoreChunk(c.ids.clone(), c.steps, c.epochs, c.grads)


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    that memory a previous call freed but glibc kept does not hide the next call's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def write_stores(root: str, dims: dict[str, int], targets: list[int], write_rows: int,
                 seed: int) -> tuple[list[GradientStore], float]:
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


def self_influence_chunk(fitted, store: GradientStore, chunk_rows: int, repeat: int,
                         clock=time.perf_counter) -> list[dict]:
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
            t0 = clock()
            out = fn()
            times[name].append(clock() - t0)
            errors[name] = float(((out - ref).abs() / ref.abs()).max())
    base = statistics.median(times["solve + dot, float64 (library)"])
    return [{"method": name, "rows": len(chunk), "ms": statistics.median(t) * 1e3,
             "speed-up": base / statistics.median(t), "max rel err": errors[name]}
            for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40k rows (about a minute)")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows of the largest store (default 200000, quick 40000)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--fractions", default="0.25,0.5,1.0", help="store sizes as fractions of --rows")
    parser.add_argument("--repeat", type=int, default=1, help="calls per (store, mode); medians reported")
    parser.add_argument("--fisher-rows", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: throughput per CPU second; 0: torch's "
                             "default, throughput per wall second)")
    parser.add_argument("--no-copy-pass", action="store_true",
                        help="skip scoring with the chunk ids copied out of the memory map")
    parser.add_argument("--self-influence", choices=["none", "smallest", "all"], default="smallest",
                        help="stores also scored with self_influence=True (slow: O(rows k^2) per layer)")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="fix glibc's mmap threshold to this many bytes for the whole run (0: glibc's "
                             "dynamic default)")
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    total = args.rows if args.rows is not None else (40_000 if args.quick else 200_000)
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    primary = "cpu" if torch.get_num_threads() == 1 else "wall"
    if args.mmap_threshold and not fix_mmap_threshold(args.mmap_threshold):
        print("mallopt unavailable: --mmap-threshold ignored")
    targets = [max(1, int(round(f * total))) for f in fractions]
    dims = {f"layer{i}": args.k for i in range(args.layers)}
    m = args.queries
    wall = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, glibc mmap threshold "
          f"{args.mmap_threshold or 'dynamic'}; stores of {targets} rows, "
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

        def scorer(way: str, store: GradientStore, si: bool):
            if way == "score_store":  # the library as it is
                return lambda: score_store(store, fitted, query_ids, query_grads, topk=args.topk,
                                           self_influence=si, chunk_rows=args.chunk_rows, progress=False)
            return lambda: score_chunks(  # what score_store does, with the ids copied
                precondition_queries(fitted, query_grads),
                copied_ids(store.iter_chunks(chunk_rows=args.chunk_rows)),
                query_ids=query_ids, topk=args.topk, self_influence=fitted if si else None)

        ways = ["score_store"] + ([] if args.no_copy_pass else ["ids copied"])
        si_stores = {"none": 0, "smallest": 1, "all": len(stores)}[args.self_influence]
        for _ in range(args.repeat):
            for j, store in enumerate(stores):
                for mode in list(modes)[::-1]:  # self_influence=False first
                    if modes[mode] and j >= si_stores:
                        continue
                    for way in (["score_store"] if modes[mode] else ways):
                        fn = scorer(way, store, modes[mode])
                        box: dict = {}

                        def call(fn=fn, box=box) -> None:
                            with RssSampler() as sampler:
                                t0, c0 = time.perf_counter(), time.process_time()
                                out = fn()
                                box["seconds"] = time.perf_counter() - t0
                                box["cpu"] = time.process_time() - c0
                            box["anon MB"], box["file MB"] = sampler.peaks()
                            box["rows"] = int(out.data_value.numel())
                            box["result MB"] = sum(t.numel() * t.element_size() for t in out.to_dict().values()) / MB

                        release_free_memory()
                        peak = peak_rss_during(call)
                        results.setdefault((j, mode, way), []).append({**box, "peak MB": peak / MB})
                        print(f"  [{way}] {store.num_rows} rows, {mode}: {box['seconds']:.1f} s wall, "
                              f"{box['cpu']:.1f} s cpu, peak +{peak / MB:.0f} MB "
                              f"(heap +{box['anon MB']:.0f}, mapped files +{box['file MB']:.0f})", flush=True)

        si_repeat = 2 if args.quick else 3
        si_rows = self_influence_chunk(fitted, stores[0], args.chunk_rows, repeat=si_repeat,
                                       clock=time.process_time if primary == "cpu" else time.perf_counter)

    rows = []
    for (j, mode, way), runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        t = cpu if primary == "cpu" else seconds
        peak = statistics.median(r["peak MB"] for r in runs)
        n = targets[j]
        assert all(r["rows"] == n for r in runs), "a scoring call did not see every row"
        rows.append({"scoring": way, "mode": mode, "fraction": fractions[j], "rows": n,
                     "store MB": sizes[j] / MB, "wall s": seconds, "cpu s": cpu,
                     "rows x queries / s": n * m / t, "rows / s": n / t, "peak MB": peak,
                     "heap MB": statistics.median(r["anon MB"] for r in runs),
                     "mapped MB": statistics.median(r["file MB"] for r in runs),
                     "result MB": runs[0]["result MB"], "peak / store": peak * MB / sizes[j]})
    rows.sort(key=lambda r: (r["scoring"] != "score_store", r["mode"] != "self_influence=True", r["rows"]))

    print()
    print("peak MB: resident memory the call added at its peak (VmHWM); heap MB / mapped MB: sampled growth "
          "of RssAnon / RssFile (pages of memory-mapped shards)")
    how = "single thread, CPU time: other processes do not count" if primary == "cpu" else "wall clock"
    print(f"throughput: per {primary} second ({how})")
    print_table(rows, ["scoring", "mode", "fraction", "rows", "store MB", "wall s", "cpu s", "rows x queries / s",
                       "rows / s", "peak MB", "heap MB", "mapped MB", "result MB", "peak / store"])
    print()
    print(f"self-influence of one chunk ({args.chunk_rows} rows x {args.layers} layers x k={args.k}), "
          f"interleaved, median {primary} ms of {si_repeat}:")
    print_table(si_rows, ["method", "rows", "ms", "speed-up", "max rel err"])
    print()
    lo, hi = min(targets), max(targets)
    if lo < 2 * 8192:
        print(f"note: the smallest store ({lo} rows) is under two shards of 8192 rows, less than what streaming "
              f"holds at once, so its peak is smaller; compare stores of several shards (e.g. --rows >= 100000)")
    for way, mode in dict.fromkeys((r["scoring"], r["mode"]) for r in rows):
        small = next((r for r in rows if (r["scoring"], r["mode"], r["rows"]) == (way, mode, lo)), None)
        big = next((r for r in rows if (r["scoring"], r["mode"], r["rows"]) == (way, mode, hi)), None)
        if small is None or big is None or small is big:
            continue
        ratio = big["peak MB"] / small["peak MB"] if small["peak MB"] > 0 else math.nan
        print(f"HEADLINE [{way}] {mode}: {big['rows x queries / s'] / 1e6:.2f} M rows x queries per {primary} "
              f"second at {hi} rows; "
              f"peak +{big['peak MB']:.0f} MB at {hi} rows vs +{small['peak MB']:.0f} MB at {lo} rows "
              f"= {ratio:.2f}x while the store grows {big['store MB'] / small['store MB']:.1f}x "
              f"({small['store MB']:.0f} -> {big['store MB']:.0f} MB)")
    def find(mode: str, n: int) -> dict | None:
        return next((r for r in rows if (r["scoring"], r["mode"], r["rows"]) == ("score_store", mode, n)), None)

    for n in sorted(targets, reverse=True):
        on, off = find("self_influence=True", n), find("self_influence=False", n)
        if on and off:
            key = f"{primary} s" if primary == "cpu" else "wall s"
            print(f"self-influence (score_store's default) makes scoring {on[key] / off[key]:.1f}x slower "
                  f"({on[key]:.1f} s vs {off[key]:.1f} s {primary} at {n} rows)")
            break
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    write_json(args.json, {"rows": total, "layers": args.layers, "k": args.k, "queries": m,
                           "chunk_rows": args.chunk_rows, "threads": torch.get_num_threads(), "throughput_per": primary,
                           "mmap_threshold": args.mmap_threshold,
                           "write_seconds": write_s, "results": rows, "self_influence_chunk": si_rows})


if __name__ == "__main__":
    main()
