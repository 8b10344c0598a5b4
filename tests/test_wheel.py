"""Installs that carry the kernel: sdist and wheel hold the sources, an installed wheel used from
another folder builds and uses the C++ kernel; the build cache's folder names; the fallback
warning's advice for each cause of a failed build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from grass_callback.ops import _advice, _library

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILES = sorted(p.name for p in _library.source_files(ROOT / "csrc"))

USE_INSTALLED = textwrap.dedent("""
    import sys, torch
    import grass_callback
    from grass_callback.ops import _library, factgrass, factgrass_reference, kernel_available
    from grass_callback.projection import FactGraSSPlan
    target = sys.argv[1]
    assert grass_callback.__file__.startswith(target), grass_callback.__file__
    assert str(_library.csrc_dir()).startswith(target), _library.csrc_dir()
    assert kernel_available(), "the kernel did not build from the installed wheel"
    plan = FactGraSSPlan(48, 40, True, k=64, k_in=12, k_out=10, c=2, name="l", mask_run=1)
    x, d = torch.randn(3, 70, 48, dtype=torch.float64), torch.randn(3, 70, 40, dtype=torch.float64)
    got = factgrass(x, d, plan, impl="cpu")
    want = factgrass_reference(x, d, *plan.tables(), plan.k)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max(), (got - want).abs().max()
    print("KERNEL OK", _library.csrc_dir())
""")


def _copy_project(dst: Path) -> Path:
    """The files a build reads, copied (building in the shared checkout would write build/ there)."""
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    shutil.copytree(ROOT / "grass_callback", dst / "grass_callback",
                    ignore=shutil.ignore_patterns("__pycache__", "_csrc"))
    return dst


def _run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.wheel
def test_sdist_and_wheel_carry_the_kernel_and_an_installed_wheel_uses_it(tmp_path):
    src, dist, wheels, target, elsewhere = (tmp_path / n for n in ("src", "dist", "wheels", "target", "elsewhere"))
    for folder in (src, dist, wheels, target, elsewhere):
        folder.mkdir()
    _copy_project(src)
    # the sdist (PEP 517 hook, no isolation: nothing downloaded) holds csrc/
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])",
          str(dist)], cwd=src)
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(n).name for n in tar.getnames() if "/csrc/" in n}
    assert set(KERNEL_FILES) <= names, set(KERNEL_FILES) - names
    # the wheel holds the same sources under grass_callback/_csrc/, byte for byte
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
         cwd=src)
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for name in KERNEL_FILES:
            assert zf.read(f"grass_callback/_csrc/{name}") == (ROOT / "csrc" / name).read_bytes(), name
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], cwd=tmp_path)
    script = elsewhere / "use_installed.py"
    script.write_text(USE_INSTALLED)
    env = {k: v for k, v in os.environ.items() if k != "GRASS_CALLBACK_NO_BUILD"}
    env.update(PYTHONPATH=str(target), GRASS_CALLBACK_BUILD_DIR=str(tmp_path / "builds"), PYTHONNOUSERSITE="1")
    done = _run([sys.executable, str(script), str(target)], cwd=elsewhere, env=env, timeout=600)
    assert "KERNEL OK" in done.stdout
    assert _library.BUILDING_MESSAGE in done.stderr  # a fresh build root: it built, and said so once
    assert done.stderr.count(_library.BUILDING_MESSAGE) == 1
    (build,) = (tmp_path / "builds").iterdir()
    assert build.name.startswith("grass_callback-0.1.0-") and (build / "grass_callback_ops.so").exists()


def test_build_folders_are_named_by_version_and_the_files_the_build_reads(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    monkeypatch.setenv("GRASS_CALLBACK_BUILD_DIR", str(tmp_path / "root"))
    cpu = [str(src / "factgrass_cpu.cpp")]
    first = _library.build_dir(cpu, ["-O3"])
    assert first.parent == tmp_path / "root" and first.name.startswith("grass_callback-0.1.0-")
    assert _library.build_dir(cpu, ["-O3"]) == first
    assert _library.build_dir(cpu, ["-O2"]) != first  # other flags, another folder
    (src / "factgrass_cuda_kernel.cuh").write_text("// another kernel's header, not read by the CPU build\n")
    assert _library.build_dir(cpu, ["-O3"]) == first
    (src / "factgrass_cpu.cpp").write_text((src / "factgrass_cpu.cpp").read_text() + "\n// edited\n")
    assert _library.build_dir(cpu, ["-O3"]) != first
    (src / "a.cu").write_text('#include "b.h"\n')
    (src / "b.h").write_text('#include "c.cuh"\n')
    (src / "c.cuh").write_text("\n")
    assert [p.name for p in _library.build_inputs([str(src / "a.cu")])] == ["a.cu", "b.h", "c.cuh"]


# Error texts as torch.utils.cpp_extension.load raises them (trimmed from real failed builds on
# this machine: CXX pointing nowhere, an undeclared name; the ninja text is torch's own message).
COMMAND = ("[1/2] c++ -MMD -MF factgrass_cpu.o.d -DTORCH_EXTENSION_NAME=grass_callback_ops -isystem "
           "/venv/lib/python3.11/site-packages/torch/include -isystem /usr/include/python3.11 -fPIC "
           "-std=c++20 -O3 -fopenmp -c /src/csrc/factgrass_cpu.cpp -o factgrass_cpu.o \nFAILED: factgrass_cpu.o \n")
FAKE_ERRORS = {
    "compiler": "Error building extension 'grass_callback_ops': " + COMMAND.replace("c++", "/nonexistent/g++")
                + "/bin/sh: 1: /nonexistent/g++: not found\nninja: build stopped: subcommand failed.\n",
    "ninja": "Ninja is required to load C++ extensions (pip install ninja to get it)",
    "python-headers": "Error building extension 'grass_callback_ops': " + COMMAND
                      + "/venv/lib/python3.11/site-packages/torch/include/torch/python.h:3:10: fatal error: "
                        "Python.h: No such file or directory\ncompilation terminated.\nninja: build stopped.\n",
    "openmp": "Error building extension 'grass_callback_ops': " + COMMAND
              + "/src/csrc/factgrass_cpu.cpp:2:10: fatal error: omp.h: No such file or directory\n",
    "compile": "Error building extension 'grass_callback_ops': " + COMMAND
               + "/src/csrc/factgrass_cpu.cpp:3:18: error: 'undefined_thing' was not declared in this scope\n"
                 "ninja: build stopped: subcommand failed.\n",
    "sources": "the kernel sources were not found: neither /x/csrc (a checkout) nor /x/grass_callback/_csrc",
}
ADVICE_WORDS = {  # words only that cause's advice uses
    "compiler": "no C++ compiler was found", "ninja": "pip install ninja", "python-headers": "python3-dev",
    "openmp": "has no OpenMP", "compile": "did not compile with this compiler", "sources": "grass_callback/_csrc/",
}


@pytest.mark.parametrize("cause", list(FAKE_ERRORS))
def test_the_warning_names_the_real_cause_and_its_fix(cause):
    assert _advice.diagnose(RuntimeError(FAKE_ERRORS[cause])) == cause
    text = _advice.advice(RuntimeError(FAKE_ERRORS[cause]))
    assert ADVICE_WORDS[cause] in text
    for other, words in ADVICE_WORDS.items():
        if other != cause:
            assert words not in text, (cause, other)


def test_the_warning_quotes_the_compiler_error():
    text = _advice.advice(RuntimeError(FAKE_ERRORS["compile"]))
    why = text.split("Why:")[1].split("How to fix:")[0]
    assert "'undefined_thing' was not declared in this scope" in why
    assert "-isystem" not in why  # the error lines, not the command line


def test_an_unknown_failure_gets_the_general_advice():
    assert _advice.diagnose(OSError("libgrass.so: cannot open shared object file")) == "unknown"
    assert _advice.GENERIC in _advice.advice(OSError("libgrass.so: cannot open shared object file"))
