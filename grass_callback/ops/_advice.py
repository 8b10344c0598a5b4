"""What to tell a user whose kernel build failed: the cause read from the error, and its fix.

:func:`torch.utils.cpp_extension.load` reports every failure as one exception whose text holds
the compiler's and ninja's output. :func:`diagnose` reads that text and names the cause; each
cause has its own advice, so a user with g++ and ninja installed is not told to install them.
"""

from __future__ import annotations

import re

__all__ = ["CAUSES", "advice", "diagnose"]

# cause -> (patterns in the error text, any of which names it; the fix). Checked in this order:
# a missing compiler also makes ninja fail, a missing header also stops the compile.
CAUSES: dict[str, tuple[tuple[str, ...], str]] = {
    "disabled": (
        (r"GRASS_CALLBACK_NO_BUILD=1",),
        "unset GRASS_CALLBACK_NO_BUILD to build the kernel."),
    "sources": (
        (r"kernel sources were not found",),
        "reinstall grass-callback from a wheel or sdist built by its setup.py (`pip install .` in "
        "a checkout ships the sources in grass_callback/_csrc/), or use `pip install -e .`."),
    "ninja": (
        (r"Ninja is required", r"ninja: (?:command )?not found", r"No such file or directory: '?ninja"),
        "ninja is missing: `pip install ninja` (or `apt-get install ninja-build`), then restart Python."),
    "compiler": (
        (r"(?:c\+\+|g\+\+|clang\+\+|cc1plus|x86_64-linux-gnu-g\+\+)[^\n]*: (?:command )?not found",
         r"No such file or directory: '[^']*(?:c\+\+|g\+\+|clang\+\+)'",
         r"unable to execute '[^']*(?:c\+\+|g\+\+|clang\+\+)'",
         r"Error checking compiler version"),
        "no C++ compiler was found: install one with OpenMP (`apt-get install g++`, or set CXX to "
        "a working compiler), then restart Python."),
    "python-headers": (
        (r"Python\.h: No such file", r"fatal error: Python\.h"),
        "the Python development headers are missing: install them (`apt-get install python3-dev` "
        "on Debian/Ubuntu, `dnf install python3-devel` on Fedora, or a Python from python.org/pyenv "
        "that ships them), then restart Python."),
    "openmp": (
        (r"omp\.h: No such file", r"cannot find -l(?:g|i)?omp", r"unsupported option '-fopenmp'"),
        "the compiler has no OpenMP: install g++ (libgomp) or, with clang, libomp-dev, then restart "
        "Python."),
    "compile": (
        (r"error: ", r"FAILED: ", r"Error building extension", r"Error compiling objects"),
        "the kernel did not compile with this compiler and torch (the compiler's message is above). "
        "With an old compiler try a newer g++ (C++17); if the error names an instruction set, set "
        "GRASS_CALLBACK_NATIVE=0; otherwise please report it with the output of "
        "GRASS_CALLBACK_VERBOSE_BUILD=1."),
}
GENERIC = ("set GRASS_CALLBACK_VERBOSE_BUILD=1 to see the build's output, and check that a C++ "
           "compiler with OpenMP and ninja are installed.")


def diagnose(error: object) -> str:
    """The name of the cause (a key of :data:`CAUSES`), or ``"unknown"``."""
    text = str(error)
    for cause, (patterns, _) in CAUSES.items():
        if any(re.search(p, text) for p in patterns):
            return cause
    return "unknown"


def _why(text: str) -> str:
    """The lines of the error worth showing: compiler errors first, else its last lines."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|not found|No such file|required", ln)]
    return "\n".join((errors or lines)[-8:]) if lines else "(no message)"


def advice(error: object) -> str:
    """The fallback warning: what failed, why (from the error text), and the fix for that cause."""
    cause = diagnose(error)
    fix = CAUSES[cause][1] if cause in CAUSES else GENERIC
    return ("grass_callback: the C++ FactGraSS kernel could not be built, so the (slower) torch "
            f"reference is used instead.\nWhy: {_why(str(error))}\nHow to fix: {fix} Set "
            "GRASS_CALLBACK_NO_BUILD=1 to silence this warning and always use the reference.")
