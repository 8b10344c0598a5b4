#!/usr/bin/env bash
# Compile the fused FactGraSS CUDA kernel (csrc/factgrass_cuda.cu) for sm_80 and sm_90 with
# warnings as errors. Needs only nvcc (no GPU, no torch). Skips (exit 0) without nvcc.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/csrc/factgrass_cuda.cu"

if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda: nvcc is not on PATH; skipped compiling $src"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "check_cuda: $(nvcc --version | tail -n 1)"
status=0
for arch in sm_80 sm_90; do
  obj="$tmp/factgrass_cuda_${arch}.o"
  cmd=(nvcc -c "-arch=$arch" -std=c++17 -O3 -Xcompiler -Wall,-Wextra -Werror all-warnings
       -Xptxas -warn-spills,-warn-lmem-usage -I "$root/csrc" "$src" -o "$obj")
  if "${cmd[@]}"; then
    echo "check_cuda: ok   $arch  csrc/factgrass_cuda.cu -> $(stat -c %s "$obj") bytes"
  else
    echo "check_cuda: FAIL $arch  ${cmd[*]}" >&2
    status=1
  fi
done
exit "$status"
