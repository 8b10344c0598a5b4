"""What the callback shows on the console: progress of its long passes, timings, one fit report.

* :class:`ProgressHost` / :func:`open_bar` / :func:`progress_iter`: progress bars that share the
  screen with Lightning's bar. Under a ``RichProgressBar`` our passes become tasks of its Rich
  progress display; otherwise a ``tqdm`` bar (``leave=False``, so it disappears when done) when
  stderr is a terminal; nothing at all when it is not (a pipe, a log file, a CI job).
* :class:`PeriodClock`: seconds per part of a scoring period (flush, reduce, fit, ...).
* :func:`fit_report`: the few lines printed once (rank 0) at the end of ``fit``: where the
  tables are, the highest self-influence examples, duplicates of queries, silent layers.
* :func:`gradient_neighbours` / :func:`find_duplicates`: training examples that are copies of a
  query: the closest training gradients to each query (cosine in the Fisher's metric), confirmed
  by comparing the examples themselves, or a cosine of nearly 1.
* :func:`dominant_proponents`: queries whose top proponent is far above the rest.

Example::

    host = ProgressHost(trainer)                       # or True outside a Trainer
    for batch in progress_iter(loader, "grass: training gradients", host):
        ...
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["ProgressHost", "open_bar", "progress_iter", "PeriodClock", "silent_layers", "period_figures",
           "fit_report", "dominant_proponents", "gradient_neighbours", "find_duplicates", "same_example"]


class _RichTask:
    """One task on Lightning's Rich progress display, removed when closed."""

    def __init__(self, progress: Any, desc: str, total: int | None) -> None:
        from rich.progress import Progress

        self.progress, self._last, self._done = progress, 0.0, 0
        # Lightning's columns need a total: an unknown one grows with the work done
        self._grow = total is None
        self.task = Progress.add_task(progress, desc, total=0 if total is None else total)

    def update(self, n: int = 1) -> None:
        self._done += n
        self.progress.update(self.task, advance=n, **({"total": self._done} if self._grow else {}))
        now = time.monotonic()
        if now - self._last > 0.1:  # Lightning's Live display does not refresh on its own
            self._last = now
            self.progress.refresh()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.progress.remove_task(self.task)
            self.progress.refresh()


class ProgressHost:
    """Where progress bars go: Lightning's Rich display, a tqdm bar on a terminal, or nowhere.

    Args:
        trainer: the Trainer whose progress bar callback is shared (``None``: no Trainer).
        stream: the stream tqdm would write to (default ``sys.stderr``); bars are drawn only
            when it is a terminal, so pipes and log files stay clean.
    """

    def __init__(self, trainer: Any = None, stream: Any = None) -> None:
        self.trainer, self.stream = trainer, stream

    def _rich_progress(self) -> Any:
        bar = getattr(self.trainer, "progress_bar_callback", None)
        if bar is None or type(bar).__name__ != "RichProgressBar" or bar.is_disabled:
            return None
        return getattr(bar, "progress", None)

    def bar(self, desc: str, total: int | None = None, unit: str = "it") -> Any:
        """A bar with ``update(n)`` and ``close()``, or None when nothing should be drawn."""
        rich = self._rich_progress()
        if rich is not None:  # Lightning's Rich display: one more task on it, on a terminal only
            return _RichTask(rich, desc, total) if getattr(rich.console, "is_terminal", False) else None
        stream = self.stream if self.stream is not None else sys.stderr
        if not _is_terminal(stream):
            return None
        from tqdm.auto import tqdm

        return tqdm(desc=desc, total=total, unit=unit, leave=False, file=stream, dynamic_ncols=True)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or stand-in streams
        return False


def open_bar(desc: str, enabled: bool | ProgressHost | None, total: int | None = None, unit: str = "it") -> Any:
    """A progress bar for ``desc`` (``enabled``: a host, ``True`` for the default host, or off)."""
    if not enabled:
        return None
    host = enabled if isinstance(enabled, ProgressHost) else ProgressHost()
    return host.bar(desc, total=total, unit=unit)


def progress_iter(iterable: Iterable, desc: str, enabled: bool | ProgressHost | None,
                  total: int | None = None) -> Iterable:
    """``iterable``, advancing a bar per item when one is drawn (else ``iterable`` itself)."""
    if total is None:
        with contextlib.suppress(TypeError):
            total = len(iterable)  # type: ignore[arg-type]
    bar = open_bar(desc, enabled, total=total)
    if bar is None:
        return iterable

    def items() -> Iterator[Any]:
        try:
            for item in iterable:
                yield item
                bar.update(1)
        finally:
            bar.close()

    return items()


class PeriodClock:
    """Wall seconds per named part: ``clock.lap("fit")`` gives the seconds since the previous lap
    (or since the clock was made) to ``clock.seconds["fit"]``; ``with clock("fit"): ...`` too.

    ``PeriodClock.timer`` is the clock read (``time.perf_counter``); a benchmark on a shared
    machine may set it to ``time.process_time`` to count the process's CPU seconds instead."""

    timer: Any = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = self.timer()

    def lap(self, part: str) -> None:
        now = self.timer()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        self._mark = self.timer()
        try:
            yield
        finally:
            self.lap(part)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


# ----------------------------------------------------------------------------- period figures


def silent_layers(stats: Any) -> list[str]:
    """Layers whose Fisher sum has zero trace: every compressed gradient of the period was zero
    (e.g. a pooler the loss does not use). ``stats``: a :class:`~grass_callback.fisher.FisherStats`."""
    return [name for name, trace in stats.traces().items() if trace == 0.0]


def period_figures(fitted: Any, *, rows_scored: int, store_bytes: int, capture_seconds_per_step: float,
                   seconds: Mapping[str, float], silent: Sequence[str] = ()
                   ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """A period's scalars (a handful; per-part seconds as ``seconds/<part>``) and per-layer figures.

    The condition numbers are :meth:`~grass_callback.fisher.FittedFisher.condition_numbers`'
    cheap lower bounds (``O(k^2)`` per layer from the Cholesky factors already computed).
    """
    conds = fitted.condition_numbers()
    scalars = {"fisher_condition_max": max(conds.values()), "rows_scored": float(rows_scored),
               "store_bytes": float(store_bytes), "capture_seconds_per_step": float(capture_seconds_per_step),
               "period_seconds": float(sum(seconds.values())),
               **{f"seconds/{part}": float(v) for part, v in seconds.items()}}
    blocks = getattr(fitted, "fitted", fitted)  # a joint fit: one block over all layers
    layers = {name: {"k": int(blocks.layers[name]), "condition_number": conds[name],
                     "damping": float(blocks.damping[name]), "damping_ratio": float(blocks.damping_ratio[name]),
                     "zero_gradient": name in silent} for name in conds}
    return scalars, layers


# ----------------------------------------------------------------------------- fit report


def dominant_proponents(query_ids: Tensor, top_ids: Tensor, top_scores: Tensor, ratio: float = 3.0
                        ) -> list[tuple[int, int, float, float]]:
    """``(query_id, train_id, score, times_next)`` for queries whose top proponent scores at least
    ``ratio`` times the second one (both positive), strongest first: a training example that a
    query looks like a copy of (a planted duplicate, a leaked test example)."""
    found = []
    for r in range(top_ids.shape[0]):
        if top_ids.shape[1] < 2 or int(top_ids[r, 1]) < 0:
            continue
        first, second = float(top_scores[r, 0]), float(top_scores[r, 1])
        if math.isfinite(first) and math.isfinite(second) and second > 0 and first >= ratio * second:
            found.append((int(query_ids[r]), int(top_ids[r, 0]), first, first / second))
    return sorted(found, key=lambda f: -f[3])


def gradient_neighbours(pre: Mapping[str, Tensor], query_self: Tensor, chunks: Iterable[Any],
                        row_self: Callable[[Tensor], Tensor], candidates: int = 10) -> tuple[Tensor, Tensor]:
    """The training rows whose gradients point most nearly the query's way, per query.

    The cosine is taken in the metric of the fitted Fisher, ``c(q, g) = qᵀF⁻¹g / sqrt(qᵀF⁻¹q ·
    gᵀF⁻¹g)``: the influence score over both self-influences, so the directions every example of a
    class shares (which make raw gradient cosines of 0.95+ common) weigh little.

    Args:
        pre: ``F⁻¹q`` per layer, ``[m, k_l]`` (:func:`~grass_callback.scoring.precondition_queries`).
        query_self: ``qᵀF⁻¹q`` ``[m]``.
        chunks: store chunks (``.ids``, ``.grads``) of the rows to search (one period's).
        row_self: ``ids -> gᵀF⁻¹g`` for a chunk's rows (the period's self-influence).
        candidates: how many neighbours are kept per query.

    Returns:
        ``(ids, cosines)``, ``[m, c]`` each, closest first (``c`` = ``candidates`` or fewer rows;
        ids ``-1`` and cosines ``-inf`` pad queries that met fewer rows).
    """
    import torch

    m = int(query_self.numel())
    best = torch.full((m, 0), float("-inf"), dtype=torch.float64)
    best_ids = torch.zeros((m, 0), dtype=torch.int64)
    q_norm = query_self.to(torch.float64).clamp_min(0).sqrt()
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        score = None
        for name, p in pre.items():
            part = p.to(torch.float64) @ chunk.grads[name].to(torch.float64).T
            score = part if score is None else score + part
        norm = q_norm[:, None] * row_self(chunk.ids).to(torch.float64).clamp_min(0).sqrt()[None]
        cos = torch.where(norm > 0, score / norm.clamp_min(1e-300), torch.zeros_like(score))
        best = torch.cat([best, cos], 1)
        best_ids = torch.cat([best_ids, chunk.ids[None].expand(m, -1)], 1)
        if best.shape[1] > candidates:
            best, at = best.topk(candidates, dim=1)
            best_ids = best_ids.gather(1, at)
    order = best.argsort(dim=1, descending=True)
    return best_ids.gather(1, order), best.gather(1, order)


def same_example(a: Any, b: Any) -> bool:
    """Whether two samples hold the same values (tensors, arrays, numbers, strings, PIL images,
    and tuples, lists or dicts of them)."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.shape == b.shape and bool(torch.equal(a.detach().cpu(), b.detach().cpu().to(a.dtype)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and \
            bool(np.array_equal(a, b))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and set(a) == set(b) and all(same_example(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(same_example, a, b))
    if hasattr(a, "tobytes") and hasattr(a, "size") and hasattr(a, "mode"):  # PIL images
        return hasattr(b, "tobytes") and a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare
        return False


def find_duplicates(query_ids: Tensor, neighbour_ids: Tensor, cosines: Tensor, *,
                    same: Callable[[int, int], bool | None] | None = None, near: float = 0.99
                    ) -> list[tuple[int, int, float, int, bool]]:
    """``(query_id, train_id, cosine, rank, identical)`` for training examples that copy a query.

    A neighbour (from :func:`gradient_neighbours`) is a duplicate when ``same(query_id, train_id)``
    says the two examples hold the same values (``identical``), or when its cosine is at least
    ``near`` (a gradient nearly identical to the query's: an augmented or re-encoded copy; ``same``
    returning ``None`` means the examples could not be compared). ``rank``: 1 for the query's
    closest training gradient. Why both: the stored row of a copy was taken during the period and
    the query's gradient at its end, so on a model still moving fast a copy's cosine is well below
    1 (0.6-0.95 on a small digits run) and other examples of its class come closer (a copy ranked
    1st to 19th of 604 rows there); comparing the candidates' contents finds it anyway, at the cost
    of reading ``candidates`` examples per query.
    """
    found = []
    for r, qid in enumerate(query_ids.tolist()):
        for rank, (tid, cos) in enumerate(zip(neighbour_ids[r].tolist(), cosines[r].tolist()), start=1):
            if tid < 0 or not math.isfinite(cos):
                continue
            identical = same(int(qid), int(tid)) if same is not None else None
            if identical or cos >= near:
                found.append((int(qid), int(tid), float(cos), rank, bool(identical)))
    return found


def _ordinal(n: int) -> str:
    return {1: "the", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _run_dir(run: Any) -> Path | None:
    try:
        return Path(run.dir).parent
    except Exception:  # noqa: BLE001 - a finished or stand-in run
        return None


def fit_report(result: Any, *, periods: int, period: str, csv_dir: Path | None, run: Any = None,
               silent_layers: Sequence[str] = (), seconds: Mapping[str, float] | None = None,
               top: int = 5, duplicates: Sequence[tuple[int, int, float, int, bool]] = ()) -> str:
    """The lines printed once at the end of ``fit`` (plain text, no colour, no carriage returns).

    ``result``: the ranked result of the last period (a :class:`~grass_callback.scoring.ScoreResult`);
    ``csv_dir``: the last period's local folder; ``run``: the W&B run or None; ``seconds``: the
    last period's parts; ``duplicates``: from :func:`find_duplicates`.
    """
    n_train = int(result.data_value_ids.numel()) if result.data_value_ids is not None else 0
    lines = [f"grass_callback: {periods} scoring period(s), last {period}: {int(result.query_ids.numel())} "
             f"queries against {n_train} training examples"]
    run_dir = _run_dir(run) if run is not None else None
    if run_dir is not None:
        offline = bool(getattr(run, "offline", False))
        lines.append(f"  W&B tables: {run_dir}" + (f" (offline; upload: wandb sync {run_dir})" if offline else ""))
    if csv_dir is not None:
        lines.append(f"  CSV tables: {csv_dir}")
    if seconds:
        parts = ", ".join(f"{name} {value:.2f}" for name, value in seconds.items())
        lines.append(f"  last period took {sum(seconds.values()):.2f} s ({parts})")
    if result.self_influence is not None and result.self_influence.numel():
        order = result.self_influence.argsort(descending=True)[:top]
        shown = ", ".join(f"#{int(result.self_influence_ids[i])} ({float(result.self_influence[i]):.3g})"
                          for i in order)
        lines.append(f"  highest self-influence (outliers or mislabelled?): {shown}")
    for qid, tid, cos, rank, identical in list(duplicates)[:5]:
        how = "the same values as the query" if identical else "a gradient nearly identical to the query's"
        lines.append(f"  duplicate of query {qid}: training example #{tid} ({how}; gradient cosine {cos:.3f}, "
                     f"{_ordinal(rank)} closest)")
    if len(duplicates) > 5:
        lines.append(f"  ... {len(duplicates) - 5} more duplicates of queries")
    for qid, tid, score, times in dominant_proponents(result.query_ids, result.top_ids, result.top_scores)[:3]:
        lines.append(f"  training example #{tid} dominates query {qid} "
                     f"(score {score:.3g}, {times:.1f}x the next proponent)")
    if silent_layers:
        lines.append(f"  layers with no gradient: {', '.join(silent_layers)}; leave them out with "
                     f"GraSSCallback(exclude={list(silent_layers)!r})")
    return "\n".join(lines)
