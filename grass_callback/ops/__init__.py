"""The FactGraSS op behind one function, from a slow reference to the fused kernels.

``factgrass(x, grad_out, plan)`` compresses every example's weight gradient of one linear layer
without forming it. ``impl`` picks the implementation:

* ``"torch"``: :func:`~grass_callback.ops.reference.factgrass_reference` (gather, batched matmul
  over tokens, ``index_add_``); always available, and the fallback;
* ``"cpu"``: the C++/OpenMP kernel (``csrc/factgrass_cpu.cpp``), built on first use;
* ``"cuda"``: the fused CUDA kernel (``csrc/factgrass_cuda.cu``), when torch has CUDA;
* ``"auto"`` (default): per shape and device the faster of the kernel for the inputs' device
  and ``"torch"``, timed once and cached (:mod:`grass_callback.ops.autotune`, which also says how
  to force one); ``"torch"`` where the kernel does not build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from grass_callback.errors import KernelInputError
from grass_callback.ops import _library, autotune
from grass_callback.ops.reference import factgrass_reference

if TYPE_CHECKING:
    from grass_callback.projection import FactGraSSPlan

__all__ = ["factgrass", "factgrass_reference", "kernel_available", "IMPLS"]

IMPLS = ("auto", "torch", "cpu", "cuda")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kernel_available() -> bool:
    """Whether the compiled kernels load (builds them on the first call)."""
    return _library.load()


def factgrass(x: Tensor, grad_out: Tensor, plan: "FactGraSSPlan", scale: Tensor | float | None = None,
              impl: str = "auto") -> Tensor:
    """Compress per-example gradients of one linear layer with FactGraSS.

    Args:
        x: layer inputs ``[B, T, d_in]`` or ``[B, d_in]`` (float32/float64/bfloat16/float16).
        grad_out: gradients of the layer outputs ``[B, T, d_out]`` or ``[B, d_out]``, same dtype.
        plan: the layer's :class:`~grass_callback.projection.FactGraSSPlan` (the bias column is
            part of the plan's input mask).
        scale: per-example factors ``[B]`` (or one float) multiplying the result.
        impl: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``[B, plan.k]`` float32 (float64 when the inputs are float64).

    Raises:
        KernelInputError: wrong ranks, mismatched ``B``/``T``, mixed or unsupported dtypes, a plan
            for another layer shape, or an unknown ``impl``.
        KernelBuildError: ``impl="cpu"``/``"cuda"`` was asked for and the kernel cannot be built.
    """
    x3, g3 = _check(x, grad_out, plan)
    scale_t = _scale_tensor(scale, x3)
    args = (x3, g3, *plan.tables(x3.device), plan.k, scale_t)
    choice = _choose(impl, x3.device)
    if choice == "torch":
        return factgrass_reference(*args)
    if impl == "auto":
        runs = (getattr(plan, "run_in", 1), getattr(plan, "run_out", 1))
        key = autotune.TuneKey(str(x3.device), str(x3.dtype).removeprefix("torch."), plan.shape.d_in,
                               plan.shape.d_out, plan.k_in, plan.k_out, plan.k, runs, autotune.token_bucket(x3.shape[1]))
        nbytes = x3.numel() * x3.element_size() + g3.numel() * g3.element_size()
        picked = autotune.choose(key, nbytes, lambda: torch.ops.grass_callback.factgrass(*args),
                                 lambda: factgrass_reference(*args), x3.device)
        if picked == "torch":
            return factgrass_reference(*args)
    return torch.ops.grass_callback.factgrass(*args)


def _choose(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise KernelInputError(f"impl must be one of {IMPLS}, got {impl!r}.")
    if impl == "torch":
        return impl
    if impl in ("cpu", "cuda"):
        if impl != device.type:
            raise KernelInputError(f"impl={impl!r} needs inputs on {impl}, got {device}; move them or use impl='auto'.")
        _library.load(raise_on_error=True)
        if impl == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "grass_callback::factgrass", "CUDA"):
            raise KernelInputError("the CUDA kernel is not built (torch has no CUDA); use impl='auto'.")
        return impl
    if device.type not in ("cpu", "cuda") or not _library.load():
        return "torch"
    return device.type


def _scale_tensor(scale: Tensor | float | None, x: Tensor) -> Tensor | None:
    if scale is None:
        return None
    if not isinstance(scale, Tensor):
        return torch.full((x.shape[0],), float(scale), dtype=torch.float32, device=x.device)
    scale = scale.detach().reshape(-1) if scale.dim() <= 1 else scale
    if scale.dim() != 1 or scale.shape[0] not in (1, x.shape[0]):
        raise KernelInputError(f"scale must be a float or a [B] tensor with B={x.shape[0]}, got shape "
                               f"{list(scale.shape)}.")
    return scale.to(device=x.device, dtype=torch.float32).expand(x.shape[0]).contiguous()


def _check(x: Tensor, grad_out: Tensor, plan: "FactGraSSPlan") -> tuple[Tensor, Tensor]:
    for name, t in (("x", x), ("grad_out", grad_out)):
        if not isinstance(t, Tensor):
            raise KernelInputError(f"{name} must be a tensor, got {type(t).__name__}.")
        if t.dim() not in (2, 3):
            raise KernelInputError(f"{name} must be [B, T, d] or [B, d], got shape {list(t.shape)}; "
                                   "flatten extra token dimensions into T.")
        if t.dtype not in _DTYPES:
            raise KernelInputError(f"{name} has dtype {t.dtype}; use one of float32, float64, bfloat16, float16.")
    if x.dim() != grad_out.dim():
        raise KernelInputError(f"x has {x.dim()} dims but grad_out has {grad_out.dim()}; pass both as [B, T, d] "
                               "or both as [B, d].")
    if x.dtype != grad_out.dtype:
        raise KernelInputError(f"x is {x.dtype} but grad_out is {grad_out.dtype}; cast both to one dtype.")
    if x.device != grad_out.device:
        raise KernelInputError(f"x is on {x.device} but grad_out on {grad_out.device}; put both on one device.")
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    g3 = grad_out.unsqueeze(1) if grad_out.dim() == 2 else grad_out
    if x3.shape[:2] != g3.shape[:2]:
        raise KernelInputError(f"x and grad_out disagree on [B, T]: {list(x3.shape[:2])} vs {list(g3.shape[:2])}.")
    shape = plan.shape
    if x3.shape[2] != shape.d_in or g3.shape[2] != shape.d_out:
        raise KernelInputError(
            f"plan {plan.name!r} is for a layer with d_in={shape.d_in}, d_out={shape.d_out}, but got "
            f"x[..., {x3.shape[2]}] and grad_out[..., {g3.shape[2]}]; build the plan for this layer.")
    return x3.contiguous(), g3.contiguous()

