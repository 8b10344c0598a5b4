"""Small helpers shared by the benchmarks: timing, peak resident memory, table printing."""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path
from typing import Callable


def time_it(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, max_seconds: float = 20.0,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of ``fn`` in seconds by ``clock`` (fewer repeats when one call is slow).

    On a shared machine pass ``clock=time.process_time`` with one torch thread: CPU time of the
    process does not count the time other jobs hold the cores.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat and (not times or time.perf_counter() - start < max_seconds):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], object]], repeat: int = 7, max_seconds: float = 60.0,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time of each function in seconds, the functions called in turn (round ``r`` calls
    every function once, starting at a different one each round), so that a slow spell of a
    shared machine hits them alike. Fewer rounds when a round is slow (at least three)."""
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeat):
        if r >= 3 and time.perf_counter() - start > max_seconds:
            break
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_during(fn: Callable[[], object]) -> int:
    """Bytes of resident memory ``fn`` added at its peak (Linux: resets VmHWM first)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = _status("VmRSS")
    fn()
    return max(0, _status("VmHWM") - before)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
