"""The training step's rows: Fisher sums on the training device, a background writer into the store.

:class:`StepRecorder` takes one batch of compressed rows (``{layer: [B, k]}`` on the training
device, from :meth:`~grass_callback.capture.LayerTaps.collect`) per call of :meth:`record`:

1. casts them to the store's dtype on the device, so the Fisher sees exactly what the store keeps
   (a resumed run rebuilds the Fisher from the store and gets the same sums);
2. marks rows with NaN/Inf in any layer (after the cast, judged from the rows' largest ``|value|``) in a bool
   tensor ``keep [B]`` that never leaves the device; the Fisher zeroes those rows and counts ``keep.sum()`` as a device tensor;
3. adds the rows to the :class:`~grass_callback.fisher.FisherStats` on the device (its layers fold
   their buffers in turn, so every step pays about the same);
4. on CUDA copies the rows into pinned host memory with ``non_blocking=True`` and records an
   event; on the CPU the cast rows are already in host memory;
5. hands ``(ids, step, epoch, rows, event)`` to a daemon writer thread, which waits for the event
   and calls :meth:`GradientStore.append` (which drops and counts the non-finite rows again, by
   the same rule, and commits shards). At most ``max_pending`` batches are in flight; a further
   :meth:`record` blocks until the writer catches up (back-pressure instead of growing memory).

:meth:`flush` waits for the writer, raises what it raised (chained), and commits the store's
buffered rows, so every row recorded before a checkpoint is on disk before the checkpoint exists.
An error in the writer thread surfaces on the calling thread at the next :meth:`record` or
:meth:`flush`. :meth:`close` drains and joins the thread (with a timeout; the thread is a daemon,
so a stuck store cannot hang the interpreter at exit).

No call in :meth:`record` reads a value back from the device (no ``.item()``, ``.cpu()``,
``bool(tensor)``): ``tests/test_recorder.py`` patches them on a CPU run to check.

GPU budget per training step (``B`` rows, ``L`` layers of ``k``, storage dtype of ``s`` bytes,
float32 rows from the kernel; Fisher in float32 products folded into float64 every 1024 rows;
numbers for GPT-2 small, ``B = 32``, ``L = 49``, ``k = 1024``, float16 storage)::

    piece                         FLOPs / step            device bytes / step         host syncs
    cast to storage dtype         -                       (4 + s) B L k     = 9.6 MB      0
    finite mask (amax, amin)      2 B L k   = 3.2 M       2 s B L k         = 6.4 MB      0
    rows to float32, zero dropped -                       (s + 12) B L k    = 22 MB       0
    Fisher, upper block triangle  1.25 B L k^2 = 2.1 G    5 L k^2 B / 128   = 64 MB       0
      (4 row panels; a fold of a 128-row buffer reads and writes 10/16 of a float32 k x k)
    fold float32 -> float64       L k^2 B / 1024 = 1.6 M  24 L k^2 B / 1024 = 38 MB       0
    copy to pinned host memory    -                       s B L k = 3.2 MB over PCIe      0
                                                          (async, on the current stream)
    event record                  -                       -                               0
    per-example losses (given)    -                       8 B (copy, then pinned)         0
    writer thread (host)          finite check, shard writes: off the training thread     0

About 2.1 GFLOP of float32 GEMM (some 40 us on an H100) and 140 MB of device traffic (about
50 us at 3 TB/s) per step: well under a millisecond. Per-step host syncs: none in the recorder.
Kernel launches: about 10 per layer and step (cast, 5 for the mask, 2 for the Fisher rows, a
copy) plus 4 per fold, some 500 at ``L = 49``: 2-3 ms of host time that overlaps the GPU's work
while the step is GPU-bound; fusing the layers into one ``[B, sum k]`` buffer would cut it to a
handful (not done).
Not yet measured on a GPU (no GPU was at hand). The batch's dataset indices reach the host
without a sync too (:mod:`grass_callback._batch_ids`).

Example::

    recorder = StepRecorder(store, fisher)
    keep = recorder.record(ids, taps.collect(), step=7, epoch=0)   # bool [B] on the device
    recorder.flush()                                              # before a checkpoint
    recorder.close()
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grass_callback.errors import StoreError
from grass_callback.fisher import FisherStats
from grass_callback.store import row_maxima

__all__ = ["StepRecorder", "finite_rows"]

_STOP = object()


@dataclass
class _Batch:
    ids: Tensor  # int64 [B], host
    step: int
    epoch: int
    rows: dict[str, Tensor]  # layer -> [B, k] in the storage dtype, host (pinned on CUDA)
    event: Any  # torch.cuda.Event after the copies, or None
    loss: Tensor | None = None  # float [B], host (pinned on CUDA): each row's training loss, or None


def finite_rows(rows: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """bool ``[B]``: rows finite in every layer (once cast to ``dtype``, when given), on the rows'
    device, without a sync.

    A row is kept when its largest ``|value|`` is finite after the cast: the store's own rule
    (rounding is monotonic, so the cast of the row maximum decides, and NaN propagates through
    ``abs``/``amax``). Reducing the float32 rows is far cheaper than reducing half-precision
    ones on the CPU; the layers' maxima are judged together, in two kernels.
    """
    stacked = row_maxima(rows.values())  # [L, B]: two kernels per layer, then two in all
    return torch.isfinite(stacked if dtype is None else stacked.to(dtype)).all(dim=0)


class StepRecorder:
    """One batch's compressed rows into the Fisher (on the device) and the store (in the background).

    Args:
        store: a writable :class:`~grass_callback.store.GradientStore`, or ``None`` (Fisher only).
        fisher: the :class:`~grass_callback.fisher.FisherStats` to add to, or ``None``.
        max_pending: batches handed to the writer and not yet appended (memory bound: ``max_pending
            * B * L * k`` storage-dtype values in host memory). :meth:`record` blocks beyond it.
        background: ``False`` appends on the calling thread (no thread, same results).
        join_timeout: seconds :meth:`close` waits for the writer thread.

    Raises:
        StoreError: from :meth:`record`/:meth:`flush` when the writer failed (the original error
            chained); the rows of that batch and the later ones were not stored.
    """

    def __init__(self, store: Any | None, fisher: FisherStats | None, *, max_pending: int = 4,
                 background: bool = True, join_timeout: float = 60.0) -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise StoreError(f"max_pending must be a positive integer, got {max_pending!r}.")
        self.store, self.fisher = store, fisher
        self.max_pending, self.background, self.join_timeout = max_pending, background, join_timeout
        self.peak_pending = 0  # most batches in flight at once (for tests and benchmarks)
        self._slots = threading.BoundedSemaphore(max_pending)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self._error: BaseException | None = None  # sticky until close(): later batches are dropped
        self._reported = False

    # ------------------------------------------------------------------ training thread

    @torch.no_grad()
    def record(self, ids: Tensor, grads: Mapping[str, Tensor], step: int, epoch: int = 0,
               loss: Tensor | None = None) -> Tensor:
        """Add one batch: ``ids`` int ``[B]``, ``grads`` layer -> ``[B, k]``; returns ``keep`` bool ``[B]``.
        ``loss`` (float ``[B]``, optional, on any device): the rows' training losses, stored beside them.

        ``keep`` (on the rows' device) marks the rows finite after the cast to the storage dtype:
        the ones the Fisher counts and the store keeps. Nothing is read back from the device.
        """
        self._raise_error()
        dtype = self.store.dtype if self.store is not None else next(iter(grads.values())).dtype
        # a fresh tensor per layer: the caller may reuse its own, the writer reads these later
        cast = {n: g.detach().to(dtype=dtype, copy=True) for n, g in grads.items()}
        keep = finite_rows(grads, dtype)
        if self.fisher is not None:
            self.fisher.update(cast, keep=keep)
        if self.store is not None:
            loss = None if loss is None else loss.detach().to(torch.float32, copy=True)
            self._submit(ids, step, epoch, cast, loss)
        return keep

    def _submit(self, ids: Tensor, step: int, epoch: int, cast: dict[str, Tensor],
                loss: Tensor | None = None) -> None:
        event = None
        if any(t.is_cuda for t in cast.values()) or ids.is_cuda or (loss is not None and loss.is_cuda):
            cast = {n: _to_pinned(t) for n, t in cast.items()}
            ids = _to_pinned(ids)
            loss = None if loss is None else _to_pinned(loss)
            event = torch.cuda.Event()
            event.record()
        batch = _Batch(ids.detach(), int(step), int(epoch), cast, event, loss)
        if not self.background:
            self.store.append(batch.ids, batch.step, batch.rows, epoch=batch.epoch, owned=True, loss=batch.loss)
            return
        self._start()
        self._slots.acquire()  # back-pressure: wait while max_pending batches are in flight
        with self._lock:
            self._in_flight += 1
            self.peak_pending = max(self.peak_pending, self._in_flight)
        self._queue.put(batch)

    @property
    def pending(self) -> int:
        """Batches handed to the writer and not yet appended."""
        return self._in_flight

    def drain(self) -> None:
        """Wait until the writer has appended every batch handed to it (no shard is committed)."""
        if self._thread is not None:
            self._queue.join()
        self._raise_error()

    def flush(self) -> None:
        """Wait for the writer, raise its error (chained), then commit the store's buffered rows."""
        self.drain()
        if self.store is not None and not self.store.closed:
            self.store.flush()

    def close(self) -> None:
        """Drain and stop the writer thread (waits at most ``join_timeout`` s). Never raises: an
        error the writer hit and nobody was told about is turned into a warning."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(self.join_timeout)
            if thread.is_alive():
                warnings.warn(f"grass_callback: the store writer did not finish within {self.join_timeout:g} s; "
                              f"{self._in_flight} batches of rows may be missing from the store.", stacklevel=2)
        error, reported, self._error, self._reported = self._error, self._reported, None, False
        if error is not None and not reported:
            warnings.warn(f"grass_callback: the store writer failed and its rows were not stored: "
                          f"{type(error).__name__}: {error}", stacklevel=2)

    def __enter__(self) -> StepRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
        self.close()

    def _raise_error(self) -> None:
        error = self._error
        if error is None:
            return
        self._reported = True
        raise StoreError(f"grass_callback: the background store writer failed: {type(error).__name__}: {error} "
                         "(the rows of that batch and the ones after it were not stored; rows committed "
                         "before it are intact)") from error

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._write_loop, args=(self._queue,),
                                            name="grass-store-writer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self, jobs: queue.Queue) -> None:
        while True:
            batch = jobs.get()
            try:
                if batch is _STOP:
                    return
                if self._error is None:  # after a failure the rest is dropped (until close)
                    if batch.event is not None:
                        batch.event.synchronize()
                    self.store.append(batch.ids, batch.step, batch.rows, epoch=batch.epoch, owned=True,
                                      loss=batch.loss)
            except BaseException as e:  # reported on the training thread
                self._error = e
            finally:
                if batch is not _STOP:
                    with self._lock:
                        self._in_flight -= 1
                    self._slots.release()
                jobs.task_done()


def _to_pinned(t: Tensor) -> Tensor:
    """``t`` copied into pinned host memory without waiting for the device (CPU tensors as they are)."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
