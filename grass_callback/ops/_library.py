"""Build (JIT, cached) and load the C++/CUDA kernels registered as ``torch.ops.grass_callback``.

The first call compiles ``csrc/`` with :func:`torch.utils.cpp_extension.load` (about 10-30 s on
two cores); later calls reuse the cached build. The CUDA sources join the build only when torch
itself has CUDA. If the build fails, :func:`load` returns ``False`` after one warning that says
why and how to fix it, and callers fall back to the torch reference.

Environment:
    GRASS_CALLBACK_BUILD_DIR: where builds are cached (default: torch's extension cache).
    GRASS_CALLBACK_NO_BUILD=1: never compile; use the torch reference.
    GRASS_CALLBACK_VERBOSE_BUILD=1: show the compiler's output.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from grass_callback.errors import KernelBuildError

_LOCK = threading.Lock()
_STATE: dict[str, object] = {"loaded": None, "error": None}


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` at the repository root (editable installs and checkouts)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "csrc", here.parent / "csrc"):
        if (candidate / "factgrass_cpu.cpp").exists():
            return candidate
    raise KernelBuildError(
        "the kernel sources (csrc/factgrass_cpu.cpp) were not found next to the package; install "
        "grass-callback from a checkout with `pip install -e .`.")


def _sources(root: Path) -> tuple[list[str], bool]:
    sources = [str(root / "factgrass_cpu.cpp")]
    with_cuda = bool(torch.version.cuda) and torch.cuda.is_available()
    if with_cuda:
        sources += [str(root / "factgrass_cuda.cu"), str(root / "factgrass_cuda_binding.cpp")]
    return sources, with_cuda


def _build() -> None:
    from torch.utils import cpp_extension

    root = csrc_dir()
    sources, with_cuda = _sources(root)
    build_dir = os.environ.get("GRASS_CALLBACK_BUILD_DIR")
    if build_dir:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
    cflags = ["-O3", "-fopenmp"]
    if os.environ.get("GRASS_CALLBACK_NATIVE", "1") == "1":
        cflags.append("-march=native")
    cpp_extension.load(
        name="grass_callback_ops_cuda" if with_cuda else "grass_callback_ops",
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        extra_include_paths=[str(root)],
        build_directory=build_dir or None,
        is_python_module=False,
        verbose=os.environ.get("GRASS_CALLBACK_VERBOSE_BUILD") == "1",
    )


def _register_fake() -> None:
    @torch.library.register_fake("grass_callback::factgrass")
    def _factgrass_fake(x, grad_out, in_idx, out_idx, bucket, weight, k, scale):  # noqa: ANN001
        torch._check(x.dim() == 3 and grad_out.dim() == 3)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty((x.shape[0], k), dtype=dtype)


def load(raise_on_error: bool = False) -> bool:
    """Make ``torch.ops.grass_callback.factgrass`` available; ``False`` if it cannot be built."""
    if _STATE["loaded"] is True:  # the common case, lock-free (and traceable by torch.compile)
        return True
    with _LOCK:
        if _STATE["loaded"] is None:
            if os.environ.get("GRASS_CALLBACK_NO_BUILD") == "1":
                _STATE["loaded"], _STATE["error"] = False, "GRASS_CALLBACK_NO_BUILD=1 is set"
            else:
                try:
                    if not hasattr(torch.ops.grass_callback, "factgrass"):
                        _build()
                        _register_fake()
                    _STATE["loaded"] = True
                except Exception as e:  # compiler missing, compile error, loader error
                    _STATE["loaded"], _STATE["error"] = False, e
                    warnings.warn(_advice(e), stacklevel=3)
        if not _STATE["loaded"] and raise_on_error:
            raise KernelBuildError(_advice(_STATE["error"])) from (
                _STATE["error"] if isinstance(_STATE["error"], BaseException) else None)
        return bool(_STATE["loaded"])


def _advice(error: object) -> str:
    text = str(error).strip().splitlines()
    tail = "\n".join(text[-15:]) if text else repr(error)
    return (
        "grass_callback: the C++ FactGraSS kernel could not be built, so the (slower) torch "
        "reference is used instead.\nWhy: " + tail + "\nHow to fix: install a C++ compiler with "
        "OpenMP (e.g. `apt-get install g++`) and `pip install ninja`, check that the csrc/ folder "
        "is present (install with `pip install -e .` from a checkout), then restart Python; set "
        "GRASS_CALLBACK_VERBOSE_BUILD=1 to see the compiler's output, or GRASS_CALLBACK_NO_BUILD=1 "
        "to silence this warning and always use the reference.")
