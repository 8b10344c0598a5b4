"""GPU kernel table: the fused FactGraSS kernel vs gather + bmm + index_add_ vs LoGra (CUDA events).

    python benchmarks/gpu_kernels.py                  # the issue's grid, bf16 (about 1-2 min on an H100)
    python benchmarks/gpu_kernels.py --quick          # 4096x4096 only
    python benchmarks/gpu_kernels.py --dtype float32 --json out/gpu_kernels.json

Needs a CUDA GPU and the compiled kernel (built on first use, see grass_callback/ops/_library.py).
Grid: layers 4096x4096 and 14336x4096 (d_in x d_out), T = 512 and 4096 tokens, B = 8 and 32
examples, k = 1024 and 4096. Per shape, on the same inputs (random, on the GPU):

* ``fused``: ``torch.ops.grass_callback.factgrass`` (grass_callback.ops.factgrass, impl="cuda")
  on the default plan (masks in runs of 8, ``mask_run="auto"``);
* ``fused coord``: the same on the paper's coordinate-wise masks (``mask_run=1``);
* ``bmm``: grass_callback.ops.reference.factgrass_reference on the same plan: gather the masked
  columns (``index_select``), cast to float32, cuBLAS ``bmm`` over tokens, ``index_add_``;
* ``logra``: LoGra at the same k (``k_in = k_out = sqrt(k)``) as two dense bf16 GEMMs
  ``x P_in^T``, ``δ P_out^T`` and a ``bmm`` over tokens (the fast way to run it).

Each method is called ``--warmup`` times, then ``--repeat`` times in turn with the others (round
robin), each call between two CUDA events; the table shows the median milliseconds a call and the
ratios ``bmm / fused`` and ``logra / fused`` (above 1: the fused kernel is faster). ``max rel diff``
compares the fused output with the bmm path's. Nothing here is a test: the figures are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

GRID_SHAPES = [(4096, 4096), (14336, 4096)]   # (d_in, d_out)
GRID_T = [512, 4096]
GRID_B = [8, 32]
GRID_K = [1024, 4096]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the 4096x4096 layer")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="input dtype (default bfloat16)")
    p.add_argument("--repeat", type=int, default=15, help="timed calls per method (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method first (default 3)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p.parse_args(argv)


def _elapsed_ms(fn, device: str) -> float:
    if device == "cpu":  # for smoke runs of this script without a GPU
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _time_round_robin(fns: dict, repeat: int, warmup: int, device: str) -> dict[str, float]:
    """Median milliseconds per call of each function, called in turn, timed by CUDA events."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_elapsed_ms(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _logra_fn(x: torch.Tensor, grad: torch.Tensor, k: int, seed: int):
    side = math.isqrt(k)
    g = torch.Generator(device=x.device).manual_seed(seed)
    p_in = torch.randn(side, x.shape[-1], device=x.device, generator=g).div_(math.sqrt(side)).to(x.dtype)
    p_out = torch.randn(side, grad.shape[-1], device=x.device, generator=g).div_(math.sqrt(side)).to(x.dtype)

    def run() -> torch.Tensor:
        xp, dp = x @ p_in.T, grad @ p_out.T                       # [B, T, side] each
        return torch.bmm(dp.transpose(1, 2).float(), xp.float()).flatten(1)  # [B, k]
    return run


def measure_row(d_in: int, d_out: int, T: int, B: int, k: int, dtype: torch.dtype, repeat: int,
                warmup: int, device: str = "cuda") -> dict:
    from grass_callback.ops import factgrass, factgrass_reference
    from grass_callback.projection import FactGraSSPlan

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, T, d_in, device=device, generator=gen).to(dtype)
    grad = torch.randn(B, T, d_out, device=device, generator=gen).to(dtype)
    plan = FactGraSSPlan(d_in, d_out, bias=False, k=k, seed=0, name="bench")
    coord = FactGraSSPlan(d_in, d_out, bias=False, k=k, seed=0, name="bench", mask_run=1)
    tables = plan.tables(device)
    fns = {
        "fused": lambda: factgrass(x, grad, plan, impl=device),
        "fused coord": lambda: factgrass(x, grad, coord, impl=device),
        "bmm": lambda: factgrass_reference(x, grad, *tables, plan.k),
        "logra": _logra_fn(x, grad, k, seed=1),
    }
    ms = _time_round_robin(fns, repeat, warmup, device)
    fused, ref = fns["fused"](), fns["bmm"]()
    rel = float((fused - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    del x, grad
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"layer": f"{d_in}x{d_out}", "T": T, "B": B, "k": k, "k_in x k_out": f"{plan.k_in}x{plan.k_out}",
            "runs": f"{plan.run_in},{plan.run_out}", **{f"{n} ms": round(v, 4) for n, v in ms.items()},
            "bmm/fused": round(ms["bmm"] / ms["fused"], 2), "logra/fused": round(ms["logra"] / ms["fused"], 2),
            "max rel diff": f"{rel:.1e}"}


COLUMNS = ["layer", "T", "B", "k", "k_in x k_out", "runs", "fused ms", "fused coord ms", "bmm ms",
           "logra ms", "bmm/fused", "logra/fused", "max rel diff"]
WIDTH = 14


def _line(values: list) -> str:
    return " ".join(str(v).rjust(WIDTH) for v in values)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False  # the bmm path's float32 GEMMs in full precision
    print(f"gpu_kernels: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
          f"dtype {args.dtype} | median of {args.repeat} calls (CUDA events), {args.warmup} warm-up calls")
    shapes = GRID_SHAPES[:1] if args.quick else GRID_SHAPES
    rows = []
    print(_line(COLUMNS), flush=True)
    for d_in, d_out in shapes:
        for T in GRID_T:
            for B in GRID_B:
                for k in GRID_K:
                    rows.append(measure_row(d_in, d_out, T, B, k, dtype, args.repeat, args.warmup))
                    print(_line([rows[-1][c] for c in COLUMNS]), flush=True)
    t4096 = [r["bmm/fused"] for r in rows if r["T"] == 4096]
    print(f"gpu_kernels: bmm/fused at T=4096: min {min(t4096)}, median {statistics.median(t4096)} "
          f"(target >= 1.5); logra/fused median {statistics.median(r['logra/fused'] for r in rows)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
