"""``impl="auto"``: per shape and device, the faster of the fused kernel and the gather + bmm path.

Neither path wins everywhere: the fused kernel saves the gathered copies and the torch calls, the
gather + ``bmm`` + ``index_add_`` path (:func:`~grass_callback.ops.reference.factgrass_reference`)
runs torch's own gather and BLAS. On the first call for a key ``(device, dtype, d_in, d_out,
k_in, k_out, k, mask runs, T bucket)`` :func:`choose` times both on the call's own inputs (a few rounds,
interleaved, median of wall time), keeps the faster in an in-memory cache for the rest of the
process and logs the choice once (logger ``grass_callback.ops``, rank zero only). Calls whose
inputs are smaller than :data:`MIN_TUNED_BYTES` (there the kernel wins by its lower overhead and
the gather is not yet bound by memory; this also keeps small runs deterministic from process to
process), calls under ``torch.compile`` tracing or CUDA graph capture are never timed: they take
the kernel (or the cached choice).

Override with the environment variable ``GRASS_CALLBACK_AUTO_IMPL`` or :func:`set_mode`:
``"tune"`` (default), ``"kernel"`` (always the fused kernel) or ``"torch"`` (always the gather +
bmm path). ``impl="cpu"``/``"cuda"``/``"torch"`` in :func:`~grass_callback.ops.factgrass` bypass
all of this.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from grass_callback.errors import KernelInputError

__all__ = ["MODES", "MIN_TUNED_BYTES", "TuneKey", "cache", "choose", "clear", "mode", "set_mode", "token_bucket"]

MODES = ("tune", "kernel", "torch")
MIN_TUNED_BYTES = 16 * 2**20  # x and grad_out together below this: the kernel, untimed
ROUNDS = 5
_log = logging.getLogger("grass_callback.ops")
_CACHE: dict["TuneKey", str] = {}
_MODE: list[str | None] = [None]  # set_mode's value; None: the environment decides


class TuneKey(NamedTuple):
    device: str
    dtype: str
    d_in: int
    d_out: int
    k_in: int
    k_out: int
    k: int
    runs: tuple[int, int]  # the masks' run lengths (plan.run_in, plan.run_out): they set the gather's cost
    tokens: int  # token_bucket(T)


def token_bucket(T: int) -> int:
    """The power of two at or above ``T``: sequence lengths in one bucket share a choice."""
    return 1 << max(0, int(T) - 1).bit_length()


def set_mode(value: str | None) -> None:
    """Force ``"kernel"`` or ``"torch"`` for every ``impl="auto"`` call, ``"tune"`` to time, or
    ``None`` to follow ``GRASS_CALLBACK_AUTO_IMPL`` again."""
    if value is not None and value not in MODES:
        raise KernelInputError(f"the auto mode must be one of {MODES} or None, got {value!r}.")
    _MODE[0] = value


def mode() -> str:
    """The mode in force: :func:`set_mode`'s value, else ``GRASS_CALLBACK_AUTO_IMPL``, else ``"tune"``."""
    if _MODE[0] is not None:
        return _MODE[0]
    value = os.environ.get("GRASS_CALLBACK_AUTO_IMPL", "tune").strip().lower() or "tune"
    if value not in MODES:
        raise KernelInputError(f"GRASS_CALLBACK_AUTO_IMPL must be one of {MODES}, got {value!r}; unset it or "
                               "pick one.")
    return value


def cache() -> dict[TuneKey, str]:
    """The choices made so far (a copy): key -> ``"kernel"`` or ``"torch"``."""
    return dict(_CACHE)


def clear() -> None:
    """Forget every choice (the next call of each key is timed again)."""
    _CACHE.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_paths(paths: dict[str, Callable[[], Tensor]], device: torch.device, rounds: int = ROUNDS) -> dict[str, float]:
    """Median wall seconds of each path, called in turn (round ``r`` starts at a different one)."""
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:  # warm-up (first-touch allocations, BLAS set-up)
            paths[name]()
        _sync(device)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                paths[name]()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def choose(key: TuneKey, nbytes: int, kernel: Callable[[], Tensor], reference: Callable[[], Tensor],
           device: torch.device) -> str:
    """``"kernel"`` or ``"torch"`` for this call (see the module docstring for the rules).

    Args:
        key: the call's :class:`TuneKey`.
        nbytes: bytes of the call's ``x`` and ``grad_out`` together.
        kernel, reference: the call on the fused kernel and on the gather + bmm path.
        device: where the inputs live (timing synchronizes CUDA).
    """
    forced = mode()
    if forced != "tune":
        return forced
    if key in _CACHE:
        return _CACHE[key]
    if nbytes < MIN_TUNED_BYTES or _untimeable_device(device):
        return "kernel"
    seconds = time_paths({"kernel": kernel, "torch": reference}, device)
    choice = "kernel" if seconds["kernel"] <= seconds["torch"] else "torch"
    _CACHE[key] = choice
    if _is_rank_zero():
        _log.info("grass_callback: impl='auto' uses the %s path for %s %s d_in=%d d_out=%d k_in=%d k_out=%d "
                  "k=%d runs=%s T<=%d (fused kernel %.3g ms, gather+bmm %.3g ms)",
                  "fused kernel" if choice == "kernel" else "gather+bmm", key.device, key.dtype, key.d_in,
                  key.d_out, key.k_in, key.k_out, key.k, key.runs, key.tokens, seconds["kernel"] * 1e3, seconds["torch"] * 1e3)
    return choice


def _untimeable_device(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
