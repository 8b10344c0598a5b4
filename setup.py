"""Packaging hook: ship the kernel sources inside the package.

``csrc/`` at the repository root stays the one source of truth (the JIT build in a checkout
reads it there). A wheel or a non-editable install cannot reach the repository root, so this
``build_py`` copies the kernel sources into ``grass_callback/_csrc/`` of the build; the sdist
carries ``csrc/`` itself (``MANIFEST.in``). ``grass_callback.ops._library.csrc_dir`` looks for
``csrc/`` next to the package first and for ``_csrc/`` inside it second. Everything else about
the project is in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")
ROOT = Path(__file__).resolve().parent


def kernel_sources(root: Path = ROOT) -> list[Path]:
    """The files of ``csrc/`` that the kernel build may read (sorted)."""
    return sorted(p for p in (root / "csrc").iterdir() if p.suffix in KERNEL_SUFFIXES)


class BuildPyWithKernel(build_py):
    """``build_py`` that also copies ``csrc/`` into ``grass_callback/_csrc/`` of the build."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads csrc/ in place
            return
        sources = kernel_sources()
        if not sources:
            raise RuntimeError(f"no kernel sources in {ROOT / 'csrc'}; build from a checkout or a complete sdist.")
        target = Path(self.build_lib) / "grass_callback" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sources:
            shutil.copy2(src, target / src.name)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "grass_callback" / "_csrc"
            outputs += [str(target / p.name) for p in kernel_sources()]
        return outputs


setup(cmdclass={"build_py": BuildPyWithKernel})
