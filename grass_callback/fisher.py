"""Per-layer Fisher statistics in the compressed gradient space.

For layer ``l`` with compressed per-example gradients ``g_{i,l}`` (``k_l`` floats each)::

    F_l      = (1/N) sum_i g_{i,l} g_{i,l}^T           (k_l x k_l)
    lambda_l = r * trace(F_l) / k_l                     (relative damping, ratio r)

:class:`FisherStats` accumulates the sums (``update`` only adds), sum-reduces them in place
across ranks and fits a :class:`FittedFisher`, which holds the Cholesky factors of
``F_l + lambda_l I`` and applies their inverse (``solve``). Both save to a safetensors file
(tensors plus JSON metadata) written atomically.

Example::

    stats = FisherStats({"fc1": 8, "fc2": 4})
    stats.update({"fc1": torch.randn(32, 8), "fc2": torch.randn(32, 4)})
    stats.all_reduce_()                 # no-op unless torch.distributed is initialised
    fisher = stats.fit(damping_ratio=1e-3)
    preconditioned = fisher.solve({"fc1": torch.randn(5, 8), "fc2": torch.randn(5, 4)})
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._linalg import cholesky_ex
from .dual_fisher import DualBlock, max_rows
from .errors import FisherError, FisherValueError

__all__ = ["FisherStats", "FittedFisher", "FisherValueError"]

_STATS_FORMAT = "grass_callback.FisherStats"
_FITTED_FORMAT = "grass_callback.FittedFisher"
_VERSION = 1
_FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ----------------------------------------------------------------------------- helpers


def _check_layer_dims(layer_dims: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(layer_dims, Mapping) or len(layer_dims) == 0:
        raise FisherValueError(
            f"layer_dims must be a non-empty mapping layer name -> k, got {layer_dims!r}."
        )
    out: dict[str, int] = {}
    for name, k in layer_dims.items():
        if not isinstance(name, str) or isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise FisherValueError(
                f"layer_dims needs str names and positive int sizes, got {name!r}: {k!r}."
            )
        out[name] = k
    return out


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise FisherValueError(f"Fisher statistics need float32 or float64, got {dtype}.")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: Any) -> torch.dtype:
    if name not in _FLOAT_DTYPES:
        raise FisherError(f"unknown Fisher dtype {name!r}; expected one of {list(_FLOAT_DTYPES)}.")
    return _FLOAT_DTYPES[name]


def _check_damping_ratio(damping_ratio: Any) -> float:
    ok = isinstance(damping_ratio, (int, float)) and not isinstance(damping_ratio, bool)
    if not ok or not math.isfinite(damping_ratio) or damping_ratio <= 0:
        raise FisherValueError(
            f"damping_ratio must be a finite number > 0 (lambda = ratio * trace(F) / k), got "
            f"{damping_ratio!r}. Typical values are 1e-4 .. 1e-1."
        )
    return float(damping_ratio)


def _auto_ratio(trace: float, k: int, count: int) -> float:
    from grass_callback.damping import auto_damping_ratio_from_moments

    return auto_damping_ratio_from_moments(trace, None, k, count)  # the rule reads no trace(F²)


def _check_grads(grads: Mapping[str, Tensor], layers: Mapping[str, int], what: str) -> int:
    """Check ``grads`` has exactly ``layers`` with shapes ``[B, k_l]``; return ``B``."""
    if not isinstance(grads, Mapping):
        raise FisherError(f"{what} must be a mapping layer name -> Tensor[B, k], got {type(grads)}.")
    missing = [n for n in layers if n not in grads]
    extra = [n for n in grads if n not in layers]
    if missing or extra:
        raise FisherError(
            f"{what} layers do not match the Fisher layers: missing {missing}, unexpected {extra}."
        )
    rows = None
    for name, k in layers.items():
        g = grads[name]
        if not isinstance(g, Tensor) or g.ndim != 2 or g.shape[1] != k:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise FisherError(f"{what}[{name!r}] must be a Tensor[B, {k}], got {got}.")
        if not g.is_floating_point():
            raise FisherError(f"{what}[{name!r}] must be floating point, got {g.dtype}.")
        if rows is not None and g.shape[0] != rows:
            raise FisherError(
                f"{what} layers disagree on the number of rows: {rows} vs {g.shape[0]} "
                f"for {name!r}; every layer needs one row per example."
            )
        rows = g.shape[0]
    return int(rows or 0)


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a safetensors file to a temporary name, fsync it, then rename it into place."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        cpu = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
        save_file(cpu, tmp, metadata={"grass_callback": json.dumps(metadata)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable; not possible on every platform
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _read_safetensors(path: str | os.PathLike, expected_format: str) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("grass_callback")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise FisherError(f"cannot read {path} as a safetensors file: {e}") from e
    try:
        meta = json.loads(raw) if raw is not None else {}
    except json.JSONDecodeError as e:
        raise FisherError(f"{path}: metadata is not valid JSON: {e}") from e
    if meta.get("format") != expected_format:
        raise FisherError(
            f"{path} holds {meta.get('format')!r}, expected {expected_format!r}; "
            "was it written by FisherStats.save / FittedFisher.save?"
        )
    return tensors, meta


def _save_layered(state: dict[str, Any], field: str, prefix: str, path: str | os.PathLike) -> None:
    """Save a state dict whose ``field`` maps layers to tensors, as ``<prefix>/<layer>`` tensors."""
    tensors = {f"{prefix}/{name}": t for name, t in state.pop(field).items()}
    state["layers"] = list(state["layers"].items())  # JSON objects lose no order, but be explicit
    _atomic_save(tensors, state, path)


def _load_layered(path: str | os.PathLike, expected_format: str, field: str, prefix: str) -> dict[str, Any]:
    """The state dict :func:`_save_layered` wrote."""
    tensors, meta = _read_safetensors(path, expected_format)
    layers = {str(n): int(k) for n, k in meta["layers"]}
    return {**meta, "layers": layers, field: {name: tensors[f"{prefix}/{name}"] for name in layers}}


def _reduce_into(fn: Callable[[Tensor], Tensor | None], tensor: Tensor) -> Tensor:
    """``fn(tensor)`` with the result left in ``tensor`` (``fn`` may reduce in place or return it)."""
    out = fn(tensor)
    if isinstance(out, Tensor) and out is not tensor:
        tensor.copy_(out)
    return tensor


def _copy_rows(pieces: list[Tensor], out: Tensor, start: int = 0) -> Tensor:
    """The row blocks ``pieces`` copied (and cast) one after another into ``out`` from row ``start``."""
    at = start
    for g in pieces:
        out[at:at + g.shape[0]].copy_(g)
        at += g.shape[0]
    return out


def _default_reduce(tensor: Tensor) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        # NCCL only reduces CUDA tensors: go through the current device and copy back.
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


# ----------------------------------------------------------------------------- statistics


class FisherStats:
    """Running sums ``sum_i g_{i,l} g_{i,l}^T`` and the example count ``N``, per layer.

    Args:
        layer_dims: layer name -> compressed size ``k_l``; the order is kept.
        dtype: accumulation dtype, ``torch.float64`` (default) or ``torch.float32``.
        device: where the ``k x k`` sums live (the training device: no copy of the rows).
        buffer_rows: rows a layer collects before they are added to its sum in one product.
            Adding a few rows at a time sweeps every ``k x k`` sum per step (memory-bound); a
            buffer of 128 rows makes the update one larger, compute-bound product (float64, one
            thread, k = 1024: 0.054 ms per row at 128 rows, 0.059 at 64). The layers' first folds
            are staggered (layer ``i`` of ``L`` folds first at ``128 (i+1)/L`` rows), so each step
            folds about ``L B / 128`` layers instead of every 16th step folding all of them.
        compute_dtype: dtype of the products. Default: ``dtype``, except float32 on CUDA for a
            float64 ``dtype`` (fast GEMMs on every GPU); float32 products then go into a float32
            partial sum per layer that is folded into the ``dtype`` sum every ``fold_rows`` rows.
        fold_rows: rows per layer between folds of a float32 partial sum (bounds its rounding).

    Only the upper block triangle of a sum (row panels of ``k/4``) is updated, which saves 3/8 of
    the multiply-adds; the lower blocks are mirrored whenever the sums are read.
    A layer also keeps its rows (the same tensors its buffer holds, no copy) while they number at
    most ``k/2`` (:data:`grass_callback.dual_fisher.MAX_ROW_SHARE`): :meth:`fit` then solves it
    through the rows' ``R x R`` kernel instead of a ``k x k`` factor
    (:class:`~grass_callback.dual_fisher.DualBlock`). Past ``k/2`` rows, or once the sums stop
    being the rows' own (loaded, count set), the rows are let go; :meth:`all_reduce_` gives every
    rank all ranks' rows while they number at most ``k/2`` in all.
    ``update`` never synchronises with the device: with a ``keep`` mask the count stays a tensor
    until :attr:`count` is read.

    Raises:
        FisherValueError: empty ``layer_dims``, non-positive sizes or an unsupported dtype.
    """

    def __init__(
        self,
        layer_dims: Mapping[str, int],
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        buffer_rows: int = 128,
        compute_dtype: torch.dtype | None = None,
        fold_rows: int = 1024,
    ) -> None:
        self._layers = _check_layer_dims(layer_dims)
        self.dtype = _check_dtype(dtype)
        self.device = torch.device(device)
        self.buffer_rows = max(1, int(buffer_rows))
        if compute_dtype is None:
            on_gpu = self.device.type == "cuda" and self.dtype == torch.float64
            compute_dtype = torch.float32 if on_gpu else self.dtype
        self.compute_dtype = _check_dtype(compute_dtype)
        self.fold_rows = max(1, int(fold_rows))
        self._totals = {
            name: torch.zeros(k, k, dtype=self.dtype, device=self.device)
            for name, k in self._layers.items()
        }
        self._partial: dict[str, Tensor] = {}  # float32 partial sums (compute_dtype != dtype)
        self._auto_scales: dict[str, float] = {}
        self._clear_buffers()

    @property
    def auto_scales(self) -> dict[str, float]:
        """Per-layer multipliers of the ``"auto"`` rule's ratio (a layer not listed: 1), e.g.
        :func:`grass_callback.damping.auto_scales` of the layers' plans. A fixed ratio given to
        :meth:`fit` is used as it is. Not part of :meth:`state_dict` (it follows from the plans)."""
        return dict(self._auto_scales)

    @auto_scales.setter
    def auto_scales(self, scales: Mapping[str, float] | None) -> None:
        scales = dict(scales or {})
        unknown = sorted(set(scales) - set(self._layers))
        if unknown:
            raise FisherValueError(f"auto_scales names layers these statistics do not have: {unknown}.")
        for name, c in scales.items():
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
                raise FisherValueError(f"auto_scales[{name!r}] must be a finite number > 0, got {c!r}.")
        self._auto_scales = {name: float(c) for name, c in scales.items()}

    def _clear_buffers(self) -> None:
        n = len(self._layers)
        self._pending: dict[str, list[Tensor]] = {name: [] for name in self._layers}
        self._pending_rows = {name: 0 for name in self._layers}
        # staggered first folds: the layers' folds spread over the steps of one buffer
        self._threshold = {name: max(1, round(self.buffer_rows * (i + 1) / n))
                           for i, name in enumerate(self._layers)}
        self._partial_rows = {name: 0 for name in self._layers}
        for p in self._partial.values():
            p.zero_()
        self._mirrored = {name: True for name in self._layers}
        self._count = 0
        self._count_pending: Tensor | None = None
        # the period's rows per layer for the dual solve; None once past k/2 rows or not the sums' own
        self._rows: dict[str, list[Tensor] | None] = {name: [] for name in self._layers}
        self._rows_seen = 0  # rows given to update() since the last reset, counted or not

    def _drop_rows(self) -> None:
        self._rows = {name: None for name in self._layers}

    @property
    def count(self) -> int:
        """Rows accumulated, ``N`` (reading it resolves a device count: a sync on a GPU)."""
        if self._count_pending is not None:
            self._count += int(self._count_pending)
            self._count_pending = None
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        if int(value) != self.count:  # no longer the kept rows' count
            self._drop_rows()
        self._count, self._count_pending = int(value), None

    @property
    def _sums(self) -> dict[str, Tensor]:
        """The running sums with every buffered row added, lower blocks mirrored."""
        for name in self._layers:
            self._sum(name)
        return self._totals

    def _sum(self, name: str) -> Tensor:
        """One layer's running sum with its buffered rows added, lower blocks mirrored."""
        self._fold(name, early=True)
        if name in self._partial and self._partial_rows[name]:
            self._fold_partial(name)
        if not self._mirrored[name]:
            _mirror_upper(self._totals[name])
            self._mirrored[name] = True
        return self._totals[name]

    def _fold(self, name: str, early: bool = False) -> None:
        """Add the layer's buffered rows to its sum (or its float32 partial sum) in one product.

        ``early``: a fold because the sums are read; the layer's next fold stays where it was
        due, so the staggering survives a scoring period.
        """
        rows = self._pending_rows[name]
        if not rows:
            return
        parts = self._pending[name]
        g = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.compute_dtype == self.dtype:
            _gram_upper_(self._totals[name], g)
        else:
            if name not in self._partial:
                k = self._layers[name]
                self._partial[name] = torch.zeros(k, k, dtype=self.compute_dtype, device=self.device)
            with _full_precision_matmul():
                _gram_upper_(self._partial[name], g)
            self._partial_rows[name] += g.shape[0]
            if self._partial_rows[name] >= self.fold_rows:
                self._fold_partial(name)
        self._pending[name], self._pending_rows[name] = [], 0
        self._threshold[name] = max(1, self._threshold[name] - rows) if early else self.buffer_rows
        self._mirrored[name] = False

    def _fold_partial(self, name: str) -> None:
        self._totals[name].add_(self._partial[name])
        self._partial[name].zero_()
        self._partial_rows[name] = 0

    @property
    def layers(self) -> dict[str, int]:
        """Layer name -> ``k_l``."""
        return dict(self._layers)

    @torch.no_grad()
    def traces(self) -> dict[str, float]:
        """``trace(sum_l)`` per layer (float64 sums), without adding the buffered rows to the sums:
        the diagonal of the sum (and of a float32 partial sum) plus the buffered rows' squared norms."""
        out = {}
        for name in self._layers:
            total = self._totals[name].diagonal().sum(dtype=torch.float64)
            if name in self._partial:
                total = total + self._partial[name].diagonal().sum(dtype=torch.float64)
            for g in self._pending[name]:
                total = total + g.square().sum(dtype=torch.float64)
            out[name] = float(total)
        return out

    @property
    def sums(self) -> dict[str, Tensor]:
        """Layer name -> ``Tensor[k_l, k_l]`` running sum (the live tensors, not copies)."""
        return dict(self._sums)

    @torch.no_grad()
    def update(self, grads: Mapping[str, Tensor], keep: Tensor | None = None) -> None:
        """Add a batch: ``grads[name]`` is ``Tensor[B, k_l]`` for every layer (all of them).

        ``keep``: optional bool ``[B]`` (any device): rows where it is False count as absent (they
        are zeroed, so NaN/Inf in them cannot reach the sums) and are not counted. Nothing here
        reads a value back from the device.
        """
        rows = _check_grads(grads, self._layers, "grads")
        drop = None
        if keep is not None:
            if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != (rows,):
                got = (tuple(keep.shape), keep.dtype) if isinstance(keep, Tensor) else type(keep).__name__
                raise FisherError(f"keep must be a bool Tensor[{rows}] (one flag per row), got {got}.")
            drop = ~keep.to(self.device)[:, None]
        seen = self._rows_seen + rows
        for name, k in self._layers.items():
            # one copy, straight into the product dtype (the caller may reuse its tensors)
            g = grads[name].detach().to(device=self.device, dtype=self.compute_dtype, copy=True)
            if drop is not None:
                g.masked_fill_(drop, 0.0)
            kept = self._rows[name]
            if kept is not None:
                if seen <= max_rows(k):
                    kept.append(g)
                else:
                    self._rows[name] = None
            self._pending[name].append(g)
            self._pending_rows[name] += rows
            if self._pending_rows[name] >= self._threshold[name]:
                self._fold(name)
        self._rows_seen = seen
        if keep is None:
            self._count += rows
        else:
            kept = keep.sum()
            self._count_pending = kept if self._count_pending is None else self._count_pending + kept

    @torch.no_grad()
    def all_reduce_(self, reduce_fn: Callable[[Tensor], Tensor | None] | None = None) -> None:
        """Sum-reduce every layer's sum and the count in place, across processes.

        ``reduce_fn(t)`` must leave the sum over processes in ``t`` (it may instead return the
        reduced tensor, which is copied into ``t``). The default uses
        ``torch.distributed.all_reduce(SUM)`` when a process group is initialised and does
        nothing otherwise. Every rank must call this the same number of times; call it once
        per accumulation window (calling it twice counts the other ranks twice).

        Under an initialised process group, layers whose rows every rank still holds, at most
        ``k/2`` of them in all, also get every rank's rows (each rank's placed at its offset in a
        zero ``[R, k]`` buffer, then sum-reduced: ``R k`` numbers, at most half the ``k x k`` sum's),
        so that :meth:`fit` solves them through the rows' kernel on every rank alike. Other
        layers' rows are let go.
        """
        fn = _default_reduce if reduce_fn is None else reduce_fn
        gathered, seen = self._gather_rows(fn)
        for total in self._sums.values():
            _reduce_into(fn, total)
        self.count = int(_reduce_into(fn, torch.tensor([self.count], dtype=torch.int64, device=self.device)).item())
        if seen is not None:  # a process group: the gathered rows, on every rank alike
            self._rows = {name: [gathered[name]] if name in gathered else None for name in self._layers}
            self._rows_seen = seen

    def _gather_rows(self, fn: Callable[[Tensor], Tensor | None]) -> tuple[dict[str, Tensor], int | None]:
        """Every rank's kept rows of the layers that can still be solved through them (see
        :meth:`all_reduce_`), and the rows given to ``update`` on all ranks; ``({}, None)`` without
        a process group of two or more ranks. Every rank makes the same calls in the same order:
        the choice of layers is made from the reduced counts."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return {}, None
        world, rank, names = dist.get_world_size(), dist.get_rank(), list(self._layers)
        meta = torch.zeros(world + len(names), dtype=torch.int64)
        meta[rank] = self._rows_seen
        meta[world:] = torch.tensor([self._rows[name] is not None for name in names], dtype=torch.int64)
        meta = _reduce_into(fn, meta.to(self.device)).tolist()
        seen, holding = meta[:world], meta[world:]
        total, start = sum(seen), sum(seen[:rank])
        gathered = {}
        for name, held in zip(names, holding):
            k = self._layers[name]
            if held != world or not 0 < total <= max_rows(k):
                continue
            buf = torch.zeros(total, k, dtype=self.compute_dtype, device=self.device)
            gathered[name] = _reduce_into(fn, _copy_rows(self._rows[name], buf, start))
        return gathered, total

    def reset(self) -> None:
        """Zero the sums and the count."""
        for total in self._totals.values():
            total.zero_()
        self._clear_buffers()

    def fisher(self, name: str) -> Tensor:
        """``F_l = sum / N`` for one layer (``Tensor[k_l, k_l]``, a new tensor)."""
        if self.count == 0:
            raise FisherError("no gradients were accumulated (count == 0); call update() first.")
        return self._sums[name] / self.count

    @torch.no_grad()
    def fit(self, damping_ratio: float | str = 1e-3, *, max_retries: int = 4,
            rows_dtype: torch.dtype | None = None, dual: bool = True) -> FittedFisher:
        """Factor ``F_l + lambda_l I`` for every layer, ``lambda_l = ratio * trace(F_l) / k_l``.

        ``damping_ratio="auto"`` takes each layer's ratio from its own Fisher
        (:func:`grass_callback.damping.auto_damping_ratio`), times its :attr:`auto_scales` entry.

        ``rows_dtype``: the dtype of the rows the fit will score (the store's). With half-precision
        rows a well-damped layer is factored in float32 (half the time of float64, and the solves
        after it too): see :func:`factor_dtype`. ``None`` (default) factors in the statistics' dtype.

        When a Cholesky factorisation fails, warns (naming the layer) and retries with the
        ratio multiplied by 10, up to ``max_retries`` times.

        ``dual`` (default): a layer that still holds its rows (at most ``k/2`` of them, see the
        class) is solved through their ``R x R`` kernel (:class:`~grass_callback.dual_fisher.DualBlock`):
        the same ``(F + λI)⁻¹`` to rounding, without the ``k x k`` factor. ``False``: ``k x k``
        factors for every layer.

        Raises:
            FisherValueError: ``damping_ratio`` is not a finite number > 0.
            FisherError: no gradients were accumulated, the statistics are not finite, or a
                layer is still not positive definite after the retries.
        """
        auto = isinstance(damping_ratio, str) and damping_ratio == "auto"
        ratio = None if auto else _check_damping_ratio(damping_ratio)
        if self.count == 0:
            raise FisherError(
                "cannot fit the Fisher: no gradients were accumulated (count == 0). Call "
                "update() with per-example gradients (and all_reduce_() under DDP) before fit()."
            )
        factors, duals, damping, ratios = {}, {}, {}, {}
        for name, k in self._layers.items():
            kept = self._rows[name] if dual else None  # a dual layer's k x k sum is never read (nor folded)
            if kept:
                trace = float(sum(g.square().sum(dtype=torch.float64) for g in kept)) / self.count
            else:
                trace = float(self._sum(name).diagonal().sum()) / self.count
            if not math.isfinite(trace):
                raise _not_finite(name)
            layer_ratio = _auto_ratio(trace, k, self.count) * self._auto_scales.get(name, 1.0) if auto else ratio
            dtype = factor_dtype(self.dtype, rows_dtype, k, layer_ratio)
            rows = self._kept_rows(name, dtype) if kept and trace > 0.0 else None
            if rows is not None:
                lam = layer_ratio * trace / k
                try:
                    duals[name], damping[name], ratios[name] = DualBlock(rows, self.count, lam, dtype), lam, layer_ratio
                    continue
                except FisherError:  # the damping is below the kernel's rounding: the k x k factor's retries
                    pass
            factors[name], damping[name], ratios[name] = _factor(name, self._sum(name), self.count, trace, k,
                                                                 layer_ratio, max_retries, dtype)
        return FittedFisher(factors, damping, ratios, count=self.count,
                            requested_damping_ratio="auto" if auto else ratio, duals=duals)

    def _kept_rows(self, name: str, dtype: torch.dtype) -> Tensor | None:
        """The layer's rows ``[R, k]`` in ``dtype`` since the last reset when it kept them all, else ``None``."""
        kept = self._rows[name]
        if not kept:
            return None
        out = torch.empty(sum(g.shape[0] for g in kept), self._layers[name], dtype=dtype, device=self.device)
        return _copy_rows(kept, out)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "format": _STATS_FORMAT,
            "version": _VERSION,
            "layers": dict(self._layers),
            "dtype": _dtype_name(self.dtype),
            "count": int(self.count),
            "sums": {name: t.detach().clone() for name, t in self._sums.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the sums and count; the layers must match this object's layers."""
        if state_dict.get("format", _STATS_FORMAT) != _STATS_FORMAT:
            raise FisherError(f"not a FisherStats state dict: format {state_dict.get('format')!r}.")
        layers = dict(state_dict.get("layers", {}))
        if layers != self._layers:
            raise FisherError(
                f"FisherStats state dict has layers {layers}, this object has {self._layers}; "
                "the compression plan changed since it was saved."
            )
        sums = state_dict["sums"]
        for name in self._layers:
            self._sums[name].copy_(sums[name].to(device=self.device, dtype=self.dtype))
        self.count = int(state_dict["count"])
        self._drop_rows()  # the sums are the saved ones, not the rows this object saw

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], device: torch.device | str = "cpu"
    ) -> FisherStats:
        stats = cls(state_dict["layers"], dtype=_parse_dtype(state_dict["dtype"]), device=device)
        stats.load_state_dict(state_dict)
        return stats

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write a safetensors file (one ``sum/<layer>`` tensor per layer)."""
        _save_layered(self.state_dict(), "sums", "sum", path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FisherStats:
        return cls.from_state_dict(_load_layered(path, _STATS_FORMAT, "sums", "sum"), device=device)

    def __repr__(self) -> str:
        return f"FisherStats(layers={self._layers}, count={self.count}, dtype={self.dtype})"


def _panels(k: int) -> int:
    """Row panels of the block-triangular update: 4 for sums of k >= 256 (10/16 of the
    multiply-adds; measured 3.8 vs 5.0 ms for 64 rows at k = 1024, float64, one thread), else 1."""
    return 4 if k >= 256 else 1


def _gram_upper_(total: Tensor, g: Tensor) -> None:
    """``total += g^T g`` on the upper block triangle only (``g`` is ``[n, k]``, ``total`` ``[k, k]``).

    Row panel ``i`` (rows ``[a_i, a_{i+1})``) gets columns ``a_i ..`` : every product of the full
    update above the block diagonal, and the diagonal blocks whole. :func:`_mirror_upper` fills
    the rest. Each element is the same dot product over the rows as in a full ``addmm_``.
    """
    k = total.shape[0]
    panels = _panels(k)
    if panels == 1:
        total.addmm_(g.T, g)
        return
    bounds = [k * i // panels for i in range(panels + 1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        total[a:b, a:].addmm_(g[:, a:b].T, g[:, a:])


def _mirror_upper(total: Tensor) -> None:
    """Copy the upper block triangle :func:`_gram_upper_` updates onto the lower blocks."""
    k = total.shape[0]
    panels = _panels(k)
    bounds = [k * i // panels for i in range(panels + 1)]
    for a, b in zip(bounds[1:-1], bounds[2:]):
        total[a:b, :a].copy_(total[:a, a:b].T)


@contextlib.contextmanager
def _full_precision_matmul():
    """float32 products in full float32 (no TF32), whatever the user set for training."""
    cuda = torch.backends.cuda.matmul
    previous = cuda.allow_tf32
    cuda.allow_tf32 = False
    try:
        yield
    finally:
        cuda.allow_tf32 = previous


def factor_dtype(stats_dtype: torch.dtype, rows_dtype: torch.dtype | None, k: int, ratio: float) -> torch.dtype:
    """The dtype a layer's ``F + lambda I`` is factored and solved in.

    float32 when the statistics are float64 but the rows to be scored are half precision and the
    float32 solve's relative error is under a quarter of the rows' own rounding: with relative
    damping ``r`` the condition number is at most ``1 + k / r`` (``lambda = r trace(F) / k >=
    r lambda_max / k``), so the test is ``(1 + k / r) eps_32 <= eps_rows / 4`` (float16 rows at
    ``k = 1024``: ``r >= 0.5``; bfloat16: ``r >= 0.0625``; the default ``"auto"`` gives ``r >= 1``,
    and ``r >= 0.1`` on a vocabulary head, which float16 rows then have factored in float64).
    Otherwise the statistics' dtype, as before.
    """
    if stats_dtype != torch.float64 or rows_dtype is None or rows_dtype not in (torch.float16, torch.bfloat16):
        return stats_dtype
    bound = 1.0 + k / ratio
    return torch.float32 if bound * torch.finfo(torch.float32).eps <= torch.finfo(rows_dtype).eps / 4 else stats_dtype


def _not_finite(name: str) -> FisherError:
    return FisherError(f"the Fisher statistics of layer {name!r} are not finite (NaN/inf gradients were "
                       "accumulated); check the loss and the per-example gradient scale.")


def _fisher_in(sums: Tensor, count: int, dtype: torch.dtype, name: str) -> Tensor:
    """``F = sums / count`` as a new tensor in ``dtype`` (the sums cast first: one pass of the
    smaller dtype after it), checked finite. Sums beyond float32's range (possible with bfloat16
    rows) are done in the sums' own dtype instead."""
    fisher = sums.to(dtype, copy=True).div_(count)
    if not math.isfinite(float(fisher.sum(dtype=torch.float64))):  # a NaN or inf anywhere
        if dtype != sums.dtype:
            return _fisher_in(sums, count, sums.dtype, name)
        raise _not_finite(name)
    return fisher


def _factor(name: str, sums: Tensor, count: int, trace: float, k: int, ratio: float, max_retries: int,
            dtype: torch.dtype | None = None):
    """Cholesky factor of ``sums / count + lambda I`` in ``dtype`` (default: the sums') with the
    retry ladder; returns (L, lambda, ratio). A float32 factorisation that fails is redone in the
    sums' dtype at the same ratio before the ratio is raised."""
    dtype = sums.dtype if dtype is None else dtype
    fisher = _fisher_in(sums, count, dtype, name)
    if trace <= 0.0 or ratio * trace / k == 0.0:
        tiny = float(torch.finfo(sums.dtype).eps)
        warnings.warn(
            f"Fisher of layer {name!r} has zero trace (all its gradients are zero); using an "
            f"absolute damping of {tiny:g} instead of the relative one.",
            RuntimeWarning,
            stacklevel=4,
        )
        fisher = fisher if dtype == sums.dtype else _fisher_in(sums, count, sums.dtype, name)
        fisher.diagonal().add_(tiny)
        return torch.linalg.cholesky(fisher), tiny, ratio
    diagonal = fisher.diagonal().clone()  # F's own, restored for each attempt (no k x k copy)
    for attempt in range(max_retries + 1):
        lam = ratio * trace / k
        for precision in dict.fromkeys((dtype, sums.dtype)):
            if precision == dtype:
                matrix = fisher
                matrix.diagonal().copy_(diagonal)
            else:  # the float32 factorisation failed: the sums' own dtype
                matrix = _fisher_in(sums, count, precision, name)
            matrix.diagonal().add_(lam)
            factor, info = cholesky_ex(matrix)
            if int(info) == 0:
                return factor, lam, ratio
        if attempt < max_retries:
            warnings.warn(
                f"Cholesky of the Fisher of layer {name!r} failed with damping ratio {ratio:g} "
                f"(lambda={lam:g}); retrying with ratio {ratio * 10:g}.",
                RuntimeWarning,
                stacklevel=4,
            )
            ratio *= 10.0
    raise FisherError(
        f"the Fisher of layer {name!r} is not positive definite even with damping ratio "
        f"{ratio:g} (lambda={lam:g}) in {sums.dtype}; use a larger damping_ratio or accumulate "
        "the statistics in float64."
    )


# ----------------------------------------------------------------------------- fitted


class FittedFisher:
    """Cholesky factors of ``F_l + lambda_l I`` per layer; applies the inverse with ``solve``.

    Built by :meth:`FisherStats.fit`. Attributes: ``layers`` (name -> k), ``damping`` (absolute
    ``lambda_l``), ``damping_ratio`` (ratio actually used per layer, raised by the retries),
    ``requested_damping_ratio``, ``count`` (``N``), ``factors`` (lower-triangular ``L``),
    ``duals`` (layers solved through their rows' kernel,
    :class:`~grass_callback.dual_fisher.DualBlock`; their ``factors`` entry is formed, ``O(k³)``,
    only when read).
    """

    def __init__(
        self,
        factors: Mapping[str, Tensor],
        damping: Mapping[str, float],
        damping_ratio: Mapping[str, float],
        *,
        count: int = 0,
        requested_damping_ratio: float | None = None,
        duals: Mapping[str, Any] | None = None,
    ) -> None:
        duals = dict(duals or {})
        if not factors and not duals:
            raise FisherValueError("FittedFisher needs at least one layer.")
        for name, f in factors.items():
            if f.ndim != 2 or f.shape[0] != f.shape[1]:
                raise FisherValueError(f"factor of {name!r} must be square, got {tuple(f.shape)}.")
        self._factors = dict(factors)
        self.duals = duals
        sizes = {**{name: int(f.shape[0]) for name, f in factors.items()},
                 **{name: int(block.k) for name, block in duals.items()}}
        order = list(damping) if set(damping) == set(sizes) else list(sizes)
        self.layers = {name: sizes[name] for name in order}
        self.damping = {name: float(damping[name]) for name in self.layers}
        self.damping_ratio = {name: float(damping_ratio[name]) for name in self.layers}
        self.count = int(count)
        self.requested_damping_ratio = requested_damping_ratio

    @classmethod
    def merged(cls, parts: Mapping[str, FittedFisher], requested_damping_ratio: float | str | None = None
               ) -> FittedFisher:
        """One fit holding every layer of ``parts`` (name -> fit) as ``<name>/<layer>``, each solved
        as its own fit solves it (a layer through its rows' kernel stays so: no ``k x k`` factor is
        formed)."""
        factors, duals, damping, ratios = {}, {}, {}, {}
        for part, fit in parts.items():
            for name in fit.layers:
                key = f"{part}/{name}"
                if name in fit.duals:
                    duals[key] = fit.duals[name]
                else:
                    factors[key] = fit._factors[name]
                damping[key], ratios[key] = fit.damping[name], fit.damping_ratio[name]
        return cls(factors, damping, ratios, requested_damping_ratio=requested_damping_ratio, duals=duals)

    @property
    def factors(self) -> dict[str, Tensor]:
        """Layer -> lower Cholesky factor ``L`` of ``F + λI``; a dual layer's is formed on first read."""
        for name, block in self.duals.items():
            if name not in self._factors:
                self._factors[name] = block.factor()
        return {name: self._factors[name] for name in self.layers}

    @torch.no_grad()
    def solve(self, q: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``(F_l + lambda_l I)^{-1} q_l`` for each ``q[name]`` of shape ``[m, k_l]``.

        ``q`` may hold a subset of the layers. Computed in the factor dtype; returned on ``q``'s
        device in ``q``'s dtype (float32 for half-precision inputs).
        """
        if not isinstance(q, Mapping):
            raise FisherError(f"solve needs a mapping layer name -> Tensor[m, k], got {type(q)}.")
        unknown = [n for n in q if n not in self.layers]
        if unknown:
            raise FisherError(
                f"solve got layers {unknown} that the Fisher does not have {list(self.layers)}."
            )
        out = {}
        for name, x in q.items():
            k = self.layers[name]
            if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != k or not x.is_floating_point():
                got = (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x).__name__
                raise FisherError(f"solve: q[{name!r}] must be a floating Tensor[m, {k}], got {got}.")
            out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            if name in self.duals:
                sol = self.duals[name].solve(x) if x.shape[0] else x.detach().double()
                out[name] = sol.to(device=x.device, dtype=out_dtype).contiguous()
                continue
            factor = self._factors[name]
            rhs = x.detach().to(device=factor.device, dtype=factor.dtype).T
            sol = torch.cholesky_solve(rhs, factor).T if x.shape[0] else rhs.T.clone()
            out[name] = sol.to(device=x.device, dtype=out_dtype).contiguous()
        return out

    @torch.no_grad()
    def quadratic(self, g: Mapping[str, Tensor]) -> Tensor:
        """``Σ_l g_l^T (F_l + λ_l I)^{-1} g_l`` per row, float64 ``[n]`` (e.g. self-influence).

        With ``F + λI = L L^T`` this is ``‖L^{-1} g‖²``: one triangular solve of the rows against
        ``L`` per layer (in float64 for float64 rows, else float32), ``n k² / 2`` multiply-adds, the
        cost of a product with a precomputed ``L^{-1}`` without the ``k³`` of forming it (which was
        most of a scoring period's self-influence when a period holds a few thousand rows).
        """
        total = None
        for name, x in g.items():
            if name in self.duals:
                part = self.duals[name].quadratic(x)
                total = part if total is None else total + part.to(total.device)
                continue
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            lower = self._lower_factor(name, dtype)
            rows = x.detach().to(device=lower.device, dtype=dtype)
            # the columns of L^{-1} x^T: a left solve (2x the speed of x L^{-T} on one CPU thread)
            part = torch.linalg.solve_triangular(lower, rows.T, upper=False).square().sum(0)
            part = part.to(torch.float64)
            total = part if total is None else total + part
        return (total if total is not None else torch.zeros(0, dtype=torch.float64)).cpu()

    def _lower_factor(self, name: str, dtype: torch.dtype) -> Tensor:
        """``L`` of a layer in ``dtype`` (the factor itself when it has that dtype), made once per fit."""
        factor = self._factors[name]
        return factor if factor.dtype == dtype else self._cached(("lower", name, dtype), lambda: factor.to(dtype))

    def _upper_factor(self, name: str, dtype: torch.dtype) -> Tensor:
        """``L^T`` of a layer in ``dtype`` (contiguous), made once per fit and dtype."""
        return self._cached(("upper", name, dtype), lambda: self._lower_factor(name, dtype).T.contiguous())

    def _cached(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """A copy of a factor, made on first use; cleared with the fit (``load_state_dict``)."""
        cache = self.__dict__.setdefault("_factor_copies", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    @torch.no_grad()
    def condition_numbers(self, exact: bool = False, iterations: int = 8) -> dict[str, float]:
        """2-norm condition number of ``A_l = F_l + lambda_l I = L L^T`` per layer.

        Default: a **lower bound** (an estimate that is exact in the limit), from the Cholesky
        factor already computed, ``O(iterations k^2)`` per layer, no ``O(k^3)`` work:

        * ``lambda_max >= max_i A_ii = max_i ||L_i||^2`` and ``lambda_min <= min_i L_ii^2`` (each
          pivot ``L_ii^2 = 1 / (A_{1:i,1:i}^{-1})_ii`` lies in ``[lambda_min, lambda_max]``);
        * tightened by ``iterations`` steps of power iteration on ``A`` (Rayleigh quotients are
          lower bounds on ``lambda_max``) and of inverse iteration through the factor
          (two triangular solves; upper bounds on ``lambda_min``).

        The ratio of the two is never above the true condition number of ``L L^T`` (to the
        rounding of the factor's dtype: the products run in it, with no copy of the factor). With
        relative damping ``r`` the true value is also at most ``1 + k / r``. ``exact=True``:
        ``eigvalsh`` of ``L L^T`` in float64, ``O(k^3)`` per layer.
        """
        result = {}
        for name in self.layers:
            if name in self.duals:
                result[name] = self.duals[name].condition_number(exact=exact, iterations=iterations)
                continue
            factor = self._factors[name]
            if exact:
                L = factor.to(torch.float64)
                eig = torch.linalg.eigvalsh(L @ L.T)
                result[name] = float(eig[-1] / eig[0])
                continue
            upper = self._upper_factor(name, factor.dtype)  # L^T, contiguous: its columns are L's rows
            hi = float(upper.square().sum(0).max())
            lo = float(upper.diagonal().square().min())
            gen = torch.Generator(device=upper.device).manual_seed(0)
            v = torch.randn(upper.shape[0], 1, generator=gen, dtype=upper.dtype, device=upper.device)
            w = v.clone()
            for _ in range(iterations):  # each pass reads the factor once: O(k^2), memory bound
                v = upper.T @ (upper @ v)
                v /= v.norm()
                w = torch.linalg.solve_triangular(upper.T, w, upper=False)  # A^{-1} w: two O(k^2) solves
                w = torch.linalg.solve_triangular(upper, w, upper=True)
                w /= w.norm()
            for vec, is_hi in ((v, True), (w, False)):  # Rayleigh quotients x^T A x / x^T x = |L^T x|^2 / |x|^2
                quotient = float((upper @ vec).double().square().sum() / vec.double().square().sum())
                hi, lo = (max(hi, quotient), lo) if is_hi else (hi, min(lo, quotient))
            result[name] = hi / lo
        return result

    @property
    def device(self) -> torch.device:
        return next(iter([*self._factors.values(), *self.duals.values()])).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter([*self._factors.values(), *self.duals.values()])).dtype

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors only (a dual layer's ``k x k`` factor is formed for it)."""
        return {
            "format": _FITTED_FORMAT,
            "version": _VERSION,
            "layers": dict(self.layers),
            "damping": dict(self.damping),
            "damping_ratio": dict(self.damping_ratio),
            "requested_damping_ratio": self.requested_damping_ratio,
            "count": self.count,
            "factors": {name: f.detach().clone() for name, f in self.factors.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace this fit with the saved one (kept on this object's device)."""
        loaded = type(self).from_state_dict(state_dict, device=self.device)
        self.__dict__.clear()  # no cached factors of the fit it replaces
        self.__dict__.update(loaded.__dict__)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], device: torch.device | str = "cpu"
    ) -> FittedFisher:
        if state_dict.get("format", _FITTED_FORMAT) != _FITTED_FORMAT:
            raise FisherError(f"not a FittedFisher state dict: format {state_dict.get('format')!r}.")
        factors = {name: state_dict["factors"][name].to(device) for name in state_dict["layers"]}
        return cls(
            factors,
            state_dict["damping"],
            state_dict["damping_ratio"],
            count=state_dict.get("count", 0),
            requested_damping_ratio=state_dict.get("requested_damping_ratio"),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write a safetensors file (one ``factor/<layer>`` tensor per layer)."""
        _save_layered(self.state_dict(), "factors", "factor", path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FittedFisher:
        return cls.from_state_dict(_load_layered(path, _FITTED_FORMAT, "factors", "factor"), device=device)

    def __repr__(self) -> str:
        return f"FittedFisher(layers={self.layers}, damping_ratio={self.damping_ratio}, count={self.count})"


# ----------------------------------------------------------------------------- joint (TRAK-style) kernel

JOINT = "__joint__"


class JointFisherStats(FisherStats):
    """One ``K x K`` Fisher over all layers' compressed gradients concatenated (``K = Σ k_l``).

    The TRAK-style alternative to per-layer blocks: the same ``update``/``fit`` interface over
    per-layer gradients; :meth:`fit` returns a :class:`JointFittedFisher` that solves jointly and
    hands per-layer pieces back, so scoring code works unchanged. Damping is relative to the
    joint trace: ``λ = r · trace(F) / K``.
    """

    def __init__(self, layer_dims: Mapping[str, int], dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", buffer_rows: int = 64) -> None:
        self.layer_dims = _check_layer_dims(layer_dims)
        super().__init__({JOINT: sum(self.layer_dims.values())}, dtype=dtype, device=device,
                         buffer_rows=buffer_rows)

    def update(self, grads: Mapping[str, Tensor], keep: Tensor | None = None) -> None:
        _check_grads(grads, self.layer_dims, "grads")
        super().update({JOINT: torch.cat([grads[name] for name in self.layer_dims], dim=1)}, keep=keep)

    def fit(self, damping_ratio: float = 1e-3, *, max_retries: int = 4,
            rows_dtype: torch.dtype | None = None) -> "JointFittedFisher":
        return JointFittedFisher(super().fit(damping_ratio, max_retries=max_retries, rows_dtype=rows_dtype),
                                 self.layer_dims)


class JointFittedFisher:
    """A joint fit seen per layer: ``solve``/``quadratic`` take and give ``{layer: [m, k_l]}``."""

    def __init__(self, fitted: FittedFisher, layer_dims: Mapping[str, int]) -> None:
        self.fitted, self.layers = fitted, dict(layer_dims)
        self.damping, self.damping_ratio = fitted.damping, fitted.damping_ratio
        self.count = fitted.count

    def _joined(self, q: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [name for name in self.layers if name not in q]
        if missing:
            raise FisherError(f"the joint Fisher needs every layer; missing {missing}.")
        return {JOINT: torch.cat([q[name] for name in self.layers], dim=1)}

    def solve(self, q: Mapping[str, Tensor]) -> dict[str, Tensor]:
        joint = self.fitted.solve(self._joined(q))[JOINT]
        return dict(zip(self.layers, joint.split(list(self.layers.values()), dim=1)))

    def quadratic(self, g: Mapping[str, Tensor]) -> Tensor:
        return self.fitted.quadratic(self._joined(g))

    def condition_numbers(self, exact: bool = False, iterations: int = 8) -> dict[str, float]:
        return self.fitted.condition_numbers(exact=exact, iterations=iterations)
