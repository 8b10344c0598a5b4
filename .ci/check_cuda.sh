#!/usr/bin/env bash
# Compile the fused FactGraSS CUDA kernels (csrc/factgrass_cuda.cu) for sm_75, sm_80 and sm_90
# with warnings as errors (register spills and local memory included), and print each kernel's
# registers (ptxas -v). Needs only nvcc (no GPU, no torch). Skips (exit 0) without nvcc.
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
for arch in sm_75 sm_80 sm_90; do
  obj="$tmp/factgrass_cuda_${arch}.o"
  cmd=(nvcc -c "-arch=$arch" -std=c++17 -O3 -Xcompiler -Wall,-Wextra -Werror all-warnings
       -Xptxas -v,-warn-spills,-warn-lmem-usage -I "$root/csrc" "$src" -o "$obj")
  if "${cmd[@]}" >"$tmp/log_${arch}" 2>&1; then
    echo "check_cuda: ok   $arch  csrc/factgrass_cuda.cu -> $(stat -c %s "$obj") bytes"
    # one line per kernel: registers (the name demangled when c++filt is there)
    grep -E "Compiling entry|Used [0-9]+ registers" "$tmp/log_${arch}" | paste - - |
      sed -E 's/.*function .([^ ]*). for .*Used ([0-9]+) registers.*/\2 \1/' |
      { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; } |
      sed -E 's/grass_cuda:://g; s/\((Reduce|Sketch)Params<[^)]*\)//' | awk '{printf "check_cuda:        %3d registers  %s\n", $1, substr($0, index($0, $2))}'
  else
    cat "$tmp/log_${arch}" >&2
    echo "check_cuda: FAIL $arch  ${cmd[*]}" >&2
    status=1
  fi
done
exit "$status"
