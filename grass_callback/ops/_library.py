"""Build (JIT, cached) and load the C++/CUDA kernels registered as ``torch.ops.grass_callback``.

The first call compiles the kernel sources with :func:`torch.utils.cpp_extension.load` (about
10-30 s on two cores, announced by one line on stderr); later calls reuse the cached build. The
sources are ``csrc/`` of a checkout (editable installs) or the copy a wheel carries in
``grass_callback/_csrc/``. Each build lives in a folder named by the package version and a hash
of the sources and build settings, so checkouts, versions and edits never build over each other.
The CUDA sources join the build only when torch itself has CUDA. If the build fails,
:func:`load` returns ``False`` after one warning that names the cause and its fix
(:func:`advice`), and callers fall back to the torch reference.

Environment:
    GRASS_CALLBACK_BUILD_DIR: root of the build folders (default: torch's extension cache,
        ``~/.cache/torch_extensions`` or ``TORCH_EXTENSIONS_DIR``).
    GRASS_CALLBACK_NO_BUILD=1: never compile; use the torch reference.
    GRASS_CALLBACK_VERBOSE_BUILD=1: show the compiler's output.
    GRASS_CALLBACK_NATIVE=0: build without ``-march=native`` (for a cache shared by machines).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import torch

from grass_callback.errors import KernelBuildError
from grass_callback.ops._advice import advice

__all__ = ["advice", "build_dir", "build_inputs", "csrc_dir", "load", "source_files"]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {"loaded": None, "error": None}
_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
BUILDING_MESSAGE = "grass_callback: building the C++ kernel (about 20 s, once)..."


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` of a checkout, else the copy in ``grass_callback/_csrc/``."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if (candidate / "factgrass_cpu.cpp").exists():
            return candidate
    raise KernelBuildError(
        f"the kernel sources were not found: neither {package.parent / 'csrc'} (a checkout) nor "
        f"{package / '_csrc'} (a wheel) holds factgrass_cpu.cpp. Reinstall grass-callback from a "
        "wheel or sdist built by its setup.py (`pip install .` in a checkout), or install the "
        "checkout in place with `pip install -e .`.")


def source_files(root: Path) -> list[Path]:
    """Every kernel source and header of the folder (what a wheel must carry), sorted."""
    return sorted(p for p in root.iterdir() if p.suffix in _SUFFIXES)


def build_inputs(sources: list[str]) -> list[Path]:
    """The sources and every local header they include (``#include "..."``, recursively), sorted:
    the files a build reads, so that editing another kernel's files does not force a rebuild."""
    seen: set[Path] = set()
    todo = [Path(s) for s in sources]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        todo += [path.parent / name for name in _INCLUDE.findall(path.read_text(errors="replace"))]
    return sorted(seen)


def _sources(root: Path) -> tuple[list[str], bool]:
    sources = [str(root / "factgrass_cpu.cpp")]
    with_cuda = bool(torch.version.cuda) and torch.cuda.is_available()
    if with_cuda:
        sources += [str(root / "factgrass_cuda.cu"), str(root / "factgrass_cuda_binding.cpp")]
    return sources, with_cuda


def _version() -> str:
    import grass_callback

    return str(getattr(grass_callback, "__version__", "0"))


def build_dir(sources: list[str], settings: list[str]) -> Path:
    """``<build root>/grass_callback-<version>-<hash>``: the hash covers the files the build reads
    (:func:`build_inputs`), the build settings, torch's and Python's versions (a changed input
    never reuses an old build)."""
    digest = hashlib.sha256()
    for path in build_inputs(sources):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\0".join([torch.__version__, sys.version, *settings]).encode())
    base = os.environ.get("GRASS_CALLBACK_BUILD_DIR")
    if not base:
        from torch.utils import cpp_extension

        base = cpp_extension.get_default_build_root()
    return Path(base) / f"grass_callback-{_version()}-{digest.hexdigest()[:12]}"


def _build() -> None:
    from torch.utils import cpp_extension

    root = csrc_dir()
    sources, with_cuda = _sources(root)
    cflags = ["-O3", "-fopenmp"]
    if os.environ.get("GRASS_CALLBACK_NATIVE", "1") == "1":
        cflags.append("-march=native")
    name = "grass_callback_ops_cuda" if with_cuda else "grass_callback_ops"
    target = build_dir(sources, [name, *cflags])
    target.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("GRASS_CALLBACK_VERBOSE_BUILD") == "1"
    if not (target / f"{name}.so").exists():
        print(BUILDING_MESSAGE, file=sys.stderr, flush=True)
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        extra_include_paths=[str(root)],
        build_directory=str(target),
        is_python_module=False,
        verbose=verbose,
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
                    warnings.warn(advice(e), stacklevel=3)
        if not _STATE["loaded"] and raise_on_error:
            raise KernelBuildError(advice(_STATE["error"])) from (
                _STATE["error"] if isinstance(_STATE["error"], BaseException) else None)
        return bool(_STATE["loaded"])
