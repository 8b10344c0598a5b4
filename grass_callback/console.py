"""What the callback shows on the console: progress of its long passes, timings, one fit report.

* :class:`ProgressHost` / :func:`open_bar` / :func:`progress_iter`: progress bars that share the
  screen with Lightning's bar. Under a ``RichProgressBar`` our passes become tasks of its Rich
  progress display; otherwise a ``tqdm`` bar (``leave=False``, so it disappears when done) when
  stderr is a terminal; nothing at all when it is not (a pipe, a log file, a CI job).
* :class:`PeriodClock`: seconds per part of a scoring period (flush, reduce, fit, ...).
* :func:`fit_report`: the few lines printed once (rank 0) at the end of ``fit``: where the
  tables are, the highest self-influence examples, planted-looking examples, silent layers.
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["ProgressHost", "open_bar", "progress_iter", "PeriodClock", "silent_layers", "period_figures",
           "fit_report", "dominant_proponents"]


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
    sums = stats.sums
    return [name for name, total in sums.items() if float(total.diagonal().sum()) == 0.0]


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


def _run_dir(run: Any) -> Path | None:
    try:
        return Path(run.dir).parent
    except Exception:  # noqa: BLE001 - a finished or stand-in run
        return None


def fit_report(result: Any, *, periods: int, period: str, csv_dir: Path | None, run: Any = None,
               silent_layers: Sequence[str] = (), seconds: Mapping[str, float] | None = None,
               top: int = 5) -> str:
    """The lines printed once at the end of ``fit`` (plain text, no colour, no carriage returns).

    ``result``: the ranked result of the last period (a :class:`~grass_callback.scoring.ScoreResult`);
    ``csv_dir``: the last period's local folder; ``run``: the W&B run or None; ``seconds``: the
    last period's parts.
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
    for qid, tid, score, times in dominant_proponents(result.query_ids, result.top_ids, result.top_scores)[:3]:
        lines.append(f"  looks like a copy: training example #{tid} dominates query {qid} "
                     f"(score {score:.3g}, {times:.1f}x the next proponent)")
    if silent_layers:
        lines.append(f"  layers with no gradient: {', '.join(silent_layers)}; leave them out with "
                     f"GraSSCallback(exclude={list(silent_layers)!r})")
    return "\n".join(lines)
