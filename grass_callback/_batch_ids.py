"""A training batch's dataset indices, brought to the host without a host sync.

Lightning moves the batch to the training device before the callback sees it, so on a GPU the
index field lives there. Reading it at the start of the step (``.cpu()``, ``.tolist()``) would
stall the host until the GPU has finished the previous step: a bubble in every step.

:class:`BatchIds` instead queues a copy into pinned host memory at the start of the step and
records an event. The host reads the copy after backward, when the GPU is long past that point
of the stream (the copy was queued before the step's forward): :meth:`BatchIds.host` asks the
event (``query()``, which never blocks) and only waits for it if the copy has not landed, a wait
for the copy, never for the step's compute. CPU indices are used as they are; indices on another
device (MPS, XLA) are read back at once, as before.

The callback checks the host copy (:func:`~grass_callback.data.check_batch_indices`) and admits
the rows (:meth:`~grass_callback._resume.PairLedger.admit`) after backward instead of before the
forward. Only an epoch that a resume may replay (the store already holds rows of it) reads the
indices at the start of the step, so that a batch it stored before is skipped before any work.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BatchIds"]


class BatchIds:
    """The indices ``value`` (an integer ``[B]`` tensor anywhere) on their way to the host."""

    def __init__(self, value: Tensor) -> None:
        value = value.detach()
        self.numel = value.numel()
        self.device = value.device
        self._event = None
        if value.device.type == "cuda":
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = value.to("cpu")  # the CPU: no copy; another device: read back now

    @property
    def in_flight(self) -> bool:
        """Whether the host copy may still be on its way (then :meth:`host` may have to wait)."""
        return self._event is not None

    def host(self) -> Tensor:
        """The indices as int64 ``[B]`` on the host."""
        if self._event is not None:
            if not self._event.query():  # queued before this step's forward: almost always done
                self._event.synchronize()
            self._event = None
        return self._host.to(torch.int64)
