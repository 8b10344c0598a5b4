#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the GPU device check in one command. NEVER RUN ON A GPU YET: written and
# syntax-checked on machines without one (its Python parts run with --help / --cpu-smoke there).
#
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU, torch with CUDA, nvcc
#
# Sized for about 5 of its 8 minutes on one H100/H200. Stages (each with a time limit):
#   1. environment: torch sees a GPU; the package's dependencies (pip install -e ".[dev]" with the
#      installed torch pinned, only if something is missing); nvcc for the build;
#   2. build the extension against the installed torch (torch.utils.cpp_extension via
#      grass_callback/ops/_library.py: csrc/factgrass_cpu.cpp, factgrass_cuda.cu,
#      factgrass_cuda_binding.cpp) for this GPU's architecture, in a fresh build folder;
#   3. tests/test_gpu.py (GRASS_REQUIRE_GPU=1: nothing may skip): kernel vs float64 reference over
#      a dtype/shape table, determinism, bad inputs, torch.library.opcheck, the callback end to
#      end in bf16-mixed against exact per-example gradients, no host sync per training step
#      under torch.cuda.set_sync_debug_mode("error"), the dual Fisher solve on the device against
#      a float64 dense inverse;
#   4. benchmarks/gpu_kernels.py: fused vs gather+bmm+index_add_ vs LoGra (CUDA events);
#   5. benchmarks/gpu_step.py: training-step ratio callback/plain, 12-layer GPT-2, sequence 1024.
# Exit status: 0 only if every stage passed; the benchmarks still run after a test failure, so a
# failing run prints everything it could measure. Logs and JSON under $GPU_CHECK_OUT
# (default gpu_check_out/).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline WANDB_SILENT=true
start=$SECONDS
failed=()

stage() { echo; echo "=== gpu_check [$((SECONDS - start)) s] $*"; }
die() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

stage "1/5 environment"
"$PY" - <<'PYEOF' || die "torch with a visible CUDA GPU is needed"
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PYEOF
if ! "$PY" -c "import lightning, transformers, wandb, pytest, safetensors, torchmetrics, numpy" 2>/dev/null; then
  echo "installing the package's dependencies (torch kept as installed)"
  echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" >"$OUT/constraints.txt"
  timeout 300 "$PY" -m pip install -q -c "$OUT/constraints.txt" -e ".[dev]" ||
    die "pip install -e .[dev] failed (see above)"
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  die "nvcc is not on PATH and CUDA_HOME is unset: install the CUDA toolkit matching torch.version.cuda"
fi

stage "2/5 build the extension against the installed torch"
export GRASS_CALLBACK_BUILD_DIR="$OUT/build"
rm -rf "$GRASS_CALLBACK_BUILD_DIR"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')"
  export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS build dir $GRASS_CALLBACK_BUILD_DIR"
GRASS_CALLBACK_VERBOSE_BUILD=1 timeout 420 "$PY" - >"$OUT/build.log" 2>&1 <<'PYEOF'
import time, torch
t0 = time.time()
from grass_callback.ops import _library
_library.load(raise_on_error=True)
assert torch._C._dispatch_has_kernel_for_dispatch_key("grass_callback::factgrass", "CUDA"), \
    "the build has no CUDA kernel for grass_callback::factgrass"
print(f"gpu_check: extension built and loaded with its CUDA kernel in {time.time() - t0:.0f} s")
PYEOF
rc=$?
tail -n 3 "$OUT/build.log"
[ "$rc" -eq 0 ] || { tail -n 60 "$OUT/build.log" >&2; die "building the CUDA extension (log: $OUT/build.log)"; }

stage "3/5 GPU tests (tests/test_gpu.py)"
GRASS_REQUIRE_GPU=1 timeout 420 "$PY" -m pytest -q -rfEs tests/test_gpu.py 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("GPU tests (log: $OUT/tests.log)")

stage "4/5 kernel table (benchmarks/gpu_kernels.py)"
timeout 300 "$PY" benchmarks/gpu_kernels.py --json "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/gpu_kernels.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("kernel table (log: $OUT/gpu_kernels.log)")

stage "5/5 training-step ratio (benchmarks/gpu_step.py)"
timeout 300 "$PY" benchmarks/gpu_step.py --json "$OUT/gpu_step.json" >"$OUT/gpu_step.log" 2>&1
rc=$?
grep -E "^gpu_step" "$OUT/gpu_step.log"
if [ "$rc" -ne 0 ]; then
  tail -n 40 "$OUT/gpu_step.log" >&2
  failed+=("training-step ratio (log: $OUT/gpu_step.log)")
fi

stage "summary"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1
grep -E "^gpu_kernels: bmm/fused" "$OUT/gpu_kernels.log" || true
grep -E "^gpu_step: step ratio" "$OUT/gpu_step.log" || true
echo "gpu_check: took $((SECONDS - start)) s; logs and JSON in $OUT/"
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'gpu_check: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "gpu_check: all stages passed"
