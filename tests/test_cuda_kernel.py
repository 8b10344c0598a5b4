"""The fused FactGraSS CUDA kernels, tested without a GPU.

* The device code (csrc/factgrass_cuda_kernel.cuh: the reduce kernel on tensor cores or FMA units,
  the owner-per-bucket sketch kernel) runs on the CPU through a SIMT emulator
  (csrc/simt_emulation.h: threads, warps, shuffles, ballots, WMMA fragments) driven by
  csrc/emulate_factgrass.cpp, and is compared with a float64 reference written here and with
  grass_callback.ops.reference over a (dtype, atol, rtol) table on awkward shapes.
* csrc/factgrass_cuda.cu must compile with nvcc for sm_80 and sm_90 (when nvcc is on PATH; sm_75
  too in .ci/check_cuda.sh),
  and the torch binding must pass a syntax check against torch's CUDA headers.
* The real-GPU tests are in tests/test_gpu.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
SHARED_LIMIT = 48 * 1024
PATH_FMA, PATH_WMMA_SMALL, PATH_WMMA_LARGE = 0, 1, 2

# (dtype, tf32, atol, rtol) against the float64 reference computed from the same (rounded)
# inputs (tf32: rounded to tf32 as the kernel does): the only error is the kernel's float32
# accumulation (float64 for float64 inputs).
DTYPE_TOLERANCES = [
    (torch.float64, False, 1e-10, 1e-10),
    (torch.float32, False, 1e-4, 1e-5),
    (torch.float32, True, 1e-4, 1e-5),
    (torch.bfloat16, False, 2e-4, 2e-5),
    (torch.float16, False, 2e-4, 2e-5),
]
DTYPE_IDS = ["float64", "float32", "tf32", "bfloat16", "float16"]


# ---------------------------------------------------------------------------------------------
# inputs and references


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    d_in: int
    d_out: int
    k_in: int          # includes the bias column when bias=True
    k_out: int
    c: int
    k: int
    bias: bool = True
    scale: bool = True
    run_in: int = 1    # masks in runs of this many columns (grass_callback.projection.run_mask)
    run_out: int = 1
    seed: int = 0
    knobs: dict = field(default_factory=dict)  # emulator knobs (see csrc/emulate_factgrass.cpp)


def _mask(n: int, size: int, run: int, g: torch.Generator) -> torch.Tensor:
    if size == 0:
        return torch.zeros(0, dtype=torch.long)
    if run == 1:
        return torch.randperm(n, generator=g)[:size].sort().values
    from grass_callback.projection import run_mask

    return run_mask(n, size, run, g)


def make_inputs(case: Case, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.B, case.T, case.d_in, generator=g).to(dtype)
    grad_out = torch.randn(case.B, case.T, case.d_out, generator=g).to(dtype)
    n_real = case.k_in - (1 if case.bias else 0)
    in_idx = _mask(case.d_in, n_real, case.run_in, g)
    if case.bias:
        in_idx = torch.cat([in_idx, torch.tensor([case.d_in])])
    out_idx = _mask(case.d_out, case.k_out, case.run_out, g)
    kp = case.k_in * case.k_out
    bucket = torch.randint(0, case.k, (case.c, kp), generator=g, dtype=torch.int32)
    signs = torch.randint(0, 2, (case.c, kp), generator=g).float() * 2 - 1
    weight = (signs / math.sqrt(case.c)).float()
    scale = (torch.rand(case.B, generator=g) + 0.5).float() if case.scale else None
    return dict(x=x, grad_out=grad_out, in_idx=in_idx.long(), out_idx=out_idx.long(),
                bucket=bucket, weight=weight, k=case.k, scale=scale)


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest tf32 (10 mantissa bits, ties away from zero), as cvt.rna.tf32.f32."""
    bits = t.contiguous().view(torch.int32).numpy().astype(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = np.where(finite, (bits + 0x1000) & 0xFFFFE000, bits).astype(np.uint32)
    return torch.from_numpy(rounded.view(np.float32).copy()).reshape(t.shape)


def reference_f64(x, grad_out, in_idx, out_idx, bucket, weight, k, scale=None):
    """Float64 FactGraSS: gathered columns, einsum over tokens, index_add_ over the c rows."""
    B, T, d_in = x.shape
    x64 = torch.cat([x.double(), torch.ones(B, T, 1, dtype=torch.float64)], dim=2)  # col d_in = 1
    xs = x64[:, :, in_idx]                       # [B, T, k_in]
    gs = grad_out.double()[:, :, out_idx]        # [B, T, k_out]
    g_hat = torch.einsum("bta,btc->bac", gs, xs).reshape(B, -1)  # e = a * k_in + b
    out = torch.zeros(B, k, dtype=torch.float64)
    for j in range(bucket.shape[0]):
        out.index_add_(1, bucket[j].long(), g_hat * weight[j].double())
    if scale is not None:
        out = out * scale.double()[:, None]
    return out


def expected_for(inputs: dict, tf32: bool) -> torch.Tensor:
    if not tf32:
        return reference_f64(**inputs)
    return reference_f64(**{**inputs, "x": tf32_round(inputs["x"]), "grad_out": tf32_round(inputs["grad_out"])})


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad &= ~(a.isnan() & e.isnan())
    if bad.any():
        idx = bad.nonzero().tolist()
        rows = [f"  [{', '.join(map(str, i))}]: got {a[tuple(i)].item()!r}, want {e[tuple(i)].item()!r}"
                for i in idx[:10]]
        raise AssertionError(
            f"{what}: {len(idx)} of {a.numel()} values differ beyond atol={atol}, rtol={rtol}; "
            f"max abs err {(a - e).abs().nan_to_num(math.inf).max().item():.3g}; first mismatches:\n"
            + "\n".join(rows))


# ---------------------------------------------------------------------------------------------
# the emulator


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> Path:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH, so the CUDA-kernel emulator cannot be built")
    out = tmp_path_factory.mktemp("cuda_emulator") / "emulate_factgrass"
    cmd = [gxx, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wextra", "-Werror",
           str(CSRC / "emulate_factgrass.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the emulator failed:\n{' '.join(cmd)}\n{proc.stderr}"
    return out


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _knob_args(knobs: dict) -> list[str]:
    args = []
    for name, value in {"warps": 2, **knobs}.items():
        args += [f"--{name.replace('_', '-')}", str(int(value))]
    return args


def run_emulator(binary: Path, tmp_path: Path, inputs: dict, knobs: dict) -> tuple[torch.Tensor, dict]:
    x, grad_out = inputs["x"], inputs["grad_out"]
    B, T, d_in = x.shape
    d_out = grad_out.shape[2]
    bucket, scale = inputs["bucket"], inputs["scale"]
    header = struct.pack("<8s10q", b"FGEMU001", DTYPE_CODES[x.dtype], B, T, d_in, d_out,
                         inputs["in_idx"].numel(), inputs["out_idx"].numel(), bucket.shape[0],
                         inputs["k"], int(scale is not None))
    parts = [header, _raw(x), _raw(grad_out), _raw(inputs["in_idx"]), _raw(inputs["out_idx"]),
             _raw(bucket), _raw(inputs["weight"])]
    if scale is not None:
        parts.append(_raw(scale))
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(parts))
    cmd = [str(binary), str(src), str(dst), *_knob_args(knobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"emulator failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    config = json.loads(proc.stdout.strip().splitlines()[-1])
    out_dtype = np.float64 if x.dtype == torch.float64 else np.float32
    out = torch.from_numpy(np.fromfile(dst, dtype=out_dtype).copy()).reshape(B, inputs["k"])
    return out, config


def plan_of(binary: Path, dtype_code: int, sizes: tuple, knobs: dict) -> dict:
    cmd = [str(binary), "--plan", str(dtype_code), *map(str, sizes), *_knob_args(knobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# emulated kernels vs the reference

CASES = {
    # odd widths (rows not 16-byte aligned: one-column units), T not a multiple of the tile
    "basic": Case(B=3, T=20, d_in=37, d_out=29, k_in=12, k_out=10, c=1, k=64,
                  knobs=dict(max_token_tile=16)),
    # a single token, no bias, no scale, every column selected, c = 2
    "T1_full_mask": Case(B=2, T=1, d_in=5, d_out=7, k_in=5, k_out=7, c=2, k=16, bias=False,
                         scale=False),
    # 2 x 2 tiles of k' (forced 32 x 32 tiles), odd mask sizes, one example
    "multi_tile": Case(B=1, T=13, d_in=72, d_out=40, k_in=45, k_out=37, c=2, k=41, seed=1,
                       knobs=dict(path=PATH_WMMA_SMALL)),
    # masks in runs of 8 at random rotations over aligned rows: vector units, runs that straddle
    # two 16-byte vectors and the 32-column tile edge; partial token tiles
    "runs_straddle": Case(B=2, T=37, d_in=96, d_out=64, k_in=41, k_out=24, c=1, k=128, run_in=8,
                          run_out=8, seed=2, knobs=dict(path=PATH_WMMA_SMALL, max_token_tile=16)),
    # the 128-column tile layout (64 x 64 with two warps), runs of 4
    "large_tile": Case(B=1, T=21, d_in=128, d_out=96, k_in=61, k_out=50, c=1, k=200, run_in=4,
                       run_out=4, seed=3),
    # three token chunks per example, partials summed by the sketch
    "chunks": Case(B=2, T=50, d_in=40, d_out=24, k_in=20, k_out=12, c=2, k=96, seed=4,
                   knobs=dict(chunks=3, max_token_tile=16)),
    # chunks chosen by the wave model (3 SMs x 2 blocks)
    "waves": Case(B=2, T=200, d_in=32, d_out=16, k_in=9, k_out=8, c=1, k=30, seed=5,
                  knobs=dict(sms=3, min_chunk_tokens=32, max_token_tile=16)),
    # only the bias column: G = sum_t grad_out
    "bias_only": Case(B=2, T=7, d_in=6, d_out=11, k_in=1, k_out=11, c=1, k=8),
    # one input column and one output column
    "k_prime_1": Case(B=3, T=4, d_in=9, d_out=3, k_in=1, k_out=1, c=2, k=3, bias=False),
    # the sketch in rounds of 7 entries, 3 slices of 32 buckets, 3 examples per sketch block
    "sketch_rounds": Case(B=3, T=5, d_in=24, d_out=16, k_in=8, k_out=6, c=3, k=77, seed=6,
                          knobs=dict(sketch_round=7, sketch_threads=32, sms=1, blocks_per_sm=1)),
    # aligned rows read through one-column units (as for an unaligned base pointer)
    "scalar_units": Case(B=2, T=9, d_in=64, d_out=32, k_in=17, k_out=16, c=1, k=50, run_in=8,
                         seed=7, knobs=dict(vec_x=0, vec_g=0)),
    # k not a multiple of anything, masks not either
    "odd_k": Case(B=2, T=11, d_in=50, d_out=45, k_in=33, k_out=31, c=1, k=997, seed=8),
    # a vocabulary head's default skew: 4 input columns, a long output mask in runs of 8 over a
    # wide output (at k = 1024 it is 4 x 1024 of d_out >= 8 d_in)
    "vocabulary_head": Case(B=2, T=19, d_in=48, d_out=1024, k_in=4, k_out=320, c=1, k=64, bias=False,
                            run_out=8, seed=9),
}


@pytest.mark.parametrize("dtype,tf32,atol,rtol", DTYPE_TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_kernel_matches_reference(emulator, tmp_path, name, dtype, tf32, atol, rtol):
    case = CASES[name]
    inputs = make_inputs(case, dtype)
    out, config = run_emulator(emulator, tmp_path, inputs, {**case.knobs, "tf32": tf32})
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches(out, expected_for(inputs, tf32), atol, rtol, f"{name}/{dtype}/tf32={tf32}")

    # the path the launcher picks for the dtype, and the one each case is named after
    assert config["launched"] and config["shared_bytes"] <= SHARED_LIMIT, config
    wmma = dtype in (torch.bfloat16, torch.float16) or tf32
    assert (config["path"] != PATH_FMA) == wmma, config
    if name == "large_tile" and wmma:
        assert config["path"] == PATH_WMMA_LARGE and config["n_tiles"] == 1, config
    if name == "multi_tile":
        assert config["n_tiles"] == 4, config
    if name in ("chunks", "waves"):
        assert config["n_chunks"] > 1 and case.T % config["token_chunk"], config
    if name == "runs_straddle":
        assert config["vec_x"] == 16 // dtype.itemsize and config["vec_g"] == config["vec_x"], config
    if name in ("basic", "scalar_units"):
        assert config["vec_x"] == 1 and config["vec_g"] == 1, config
    if name == "sketch_rounds":
        assert config["sketch_blocks"] == 3 and config["sketch_examples"] == 3, config


@pytest.mark.parametrize("dtype,tf32,atol,rtol", DTYPE_TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["basic", "runs_straddle", "chunks", "T1_full_mask"])
def test_emulated_kernel_matches_project_reference(emulator, tmp_path, name, dtype, tf32, atol, rtol):
    """grass_callback.ops.reference (written separately, float32 accumulation) agrees too."""
    from grass_callback.ops.reference import factgrass_reference

    case = CASES[name]
    inputs = make_inputs(case, dtype)
    out, _ = run_emulator(emulator, tmp_path, inputs, {**case.knobs, "tf32": tf32})
    if tf32:
        inputs = {**inputs, "x": tf32_round(inputs["x"]), "grad_out": tf32_round(inputs["grad_out"])}
    want = factgrass_reference(**inputs)
    assert want.dtype == out.dtype
    loose = 1e-10 if dtype == torch.float64 else 1e-4
    assert_matches(out, want, max(atol, loose), max(rtol, loose / 10), f"{name}/{dtype} vs project")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
def test_emulated_production_block(emulator, tmp_path, dtype):
    """The .cu's block (8 warps, 64 x 64 tile) on the default plan of a real layer (plan tables)."""
    from grass_callback.ops.reference import factgrass_reference
    from grass_callback.projection import FactGraSSPlan

    plan = FactGraSSPlan(d_in=384, d_out=320, bias=True, k=1024, seed=3, name="layer")
    assert (plan.k_in, plan.k_out) == (64, 64) and (plan.run_in, plan.run_out) == (8, 8)
    in_idx, out_idx, bucket, weight = plan.tables()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 40, 384, generator=g).to(dtype)
    grad_out = torch.randn(2, 40, 320, generator=g).to(dtype)
    inputs = dict(x=x, grad_out=grad_out, in_idx=in_idx, out_idx=out_idx, bucket=bucket,
                  weight=weight, k=plan.k, scale=None)
    out, config = run_emulator(emulator, tmp_path, inputs, {"warps": 8, "tf32": 1})
    assert (config["threads"], config["tile_a"], config["tile_b"]) == (256, 64, 64), config
    if dtype == torch.float32:
        inputs = {**inputs, "x": tf32_round(x), "grad_out": tf32_round(grad_out)}
    assert_matches(out, factgrass_reference(**inputs), 2e-4, 2e-5, f"production block {dtype}")


def test_emulated_kernel_independent_tables(emulator, tmp_path):
    """Bucket and sign tables drawn here (numpy), heavy collisions (k = 5), summed by hand."""
    rng = np.random.default_rng(123)
    B, T, d_in, d_out, k_in, k_out, c, k = 2, 6, 16, 12, 7, 5, 2, 5
    x = rng.standard_normal((B, T, d_in)).astype(np.float32)
    grad = rng.standard_normal((B, T, d_out)).astype(np.float32)
    in_idx = np.sort(rng.choice(d_in, k_in, replace=False))
    out_idx = np.sort(rng.choice(d_out, k_out, replace=False))
    bucket = rng.integers(0, k, size=(c, k_in * k_out)).astype(np.int32)
    sign = rng.choice([-1.0, 1.0], size=(c, k_in * k_out)).astype(np.float32)
    want = np.zeros((B, k))
    for b in range(B):
        for a in range(k_out):
            for i in range(k_in):
                v = sum(float(grad[b, t, out_idx[a]]) * float(x[b, t, in_idx[i]]) for t in range(T))
                for j in range(c):
                    want[b, bucket[j, a * k_in + i]] += sign[j, a * k_in + i] * v
    inputs = dict(x=torch.from_numpy(x), grad_out=torch.from_numpy(grad),
                  in_idx=torch.from_numpy(in_idx).long(), out_idx=torch.from_numpy(out_idx).long(),
                  bucket=torch.from_numpy(bucket), weight=torch.from_numpy(sign), k=k, scale=None)
    for knobs in ({}, {"path": PATH_FMA}, {"tf32": 1, "sketch_round": 3}):
        out, _ = run_emulator(emulator, tmp_path, inputs, knobs)
        tol = 1e-2 if knobs.get("tf32") else 1e-4
        assert_matches(out, torch.from_numpy(want), tol, tol, f"independent tables {knobs}")


def test_emulated_kernel_is_deterministic(emulator, tmp_path):
    """Two runs give bit-identical results (sketch lists sorted after atomic placement)."""
    case = Case(B=2, T=40, d_in=48, d_out=40, k_in=30, k_out=20, c=2, k=6, seed=9,
                knobs=dict(chunks=3, max_token_tile=16, sketch_round=50, sketch_threads=32))
    for dtype in (torch.bfloat16, torch.float32):
        inputs = make_inputs(case, dtype)
        first, _ = run_emulator(emulator, tmp_path, inputs, case.knobs)
        second, _ = run_emulator(emulator, tmp_path, inputs, case.knobs)
        assert torch.equal(first.view(torch.int32), second.view(torch.int32)), f"{dtype}: runs differ"
        assert_matches(first, reference_f64(**inputs), 2e-4, 2e-5, f"determinism case {dtype}")


def test_emulated_kernel_ignores_out_of_range_indices(emulator, tmp_path):
    """in_idx > d_in, out_idx < 0 and buckets outside [0, k) contribute nothing (no crash)."""
    case = Case(B=2, T=5, d_in=20, d_out=16, k_in=6, k_out=5, c=2, k=10, seed=10)
    inputs = make_inputs(case, torch.float32)
    in_idx, out_idx, bucket = inputs["in_idx"].clone(), inputs["out_idx"].clone(), inputs["bucket"].clone()
    in_idx[2], out_idx[1] = case.d_in + 5, -3
    bucket[0, 3], bucket[1, 7] = -1, case.k
    bad = dict(inputs, in_idx=in_idx, out_idx=out_idx, bucket=bucket)
    out, _ = run_emulator(emulator, tmp_path, bad, {})
    # the same with the bad column of x / grad_out zeroed and the bad SJLT entries weighted 0
    x, grad = inputs["x"].clone(), inputs["grad_out"].clone()
    x[:, :, inputs["in_idx"][2]] = 0
    grad[:, :, inputs["out_idx"][1]] = 0
    weight = inputs["weight"].clone()
    weight[0, 3] = weight[1, 7] = 0
    want = reference_f64(**dict(inputs, x=x, grad_out=grad, weight=weight))
    assert_matches(out, want, 1e-4, 1e-5, "out-of-range indices")


def test_emulated_empty_problems(emulator, tmp_path):
    """T = 0 and k_out = 0 give zeros without a launch."""
    for case in (Case(B=2, T=0, d_in=4, d_out=3, k_in=2, k_out=2, c=1, k=5),
                 Case(B=2, T=3, d_in=4, d_out=3, k_in=2, k_out=0, c=1, k=5)):
        out, config = run_emulator(emulator, tmp_path, make_inputs(case, torch.float32), {})
        assert not config["launched"]
        assert torch.equal(out, torch.zeros(case.B, case.k))


@pytest.mark.parametrize("dtype,cc", [(torch.bfloat16, 90), (torch.float16, 75)],
                         ids=["bf16-wmma-gather", "f16-fma-widening"])
def test_emulated_16bit_loads_are_exact(emulator, tmp_path, dtype, cc):
    """Every 16-bit pattern (subnormals, infinities, NaNs included) reaches the sum unchanged.

    bf16 on the tensor-core path (the gather moves raw bits out of 16-byte vectors), fp16 on the
    FMA path (forced; the kernel widens the bits with integer operations).

    One token, grad_out = 1, the identity SJLT (bucket e -> e, weight 1): out[b] == float(x[b]).
    Patterns: every one whose exponent field is all zeros or all ones (zeros, subnormals,
    infinities, NaNs) and every 5th (fp16) / 4th (bf16) other one, 16384 in all.
    """
    bits = torch.arange(-32768, 32768, dtype=torch.int32)
    exp_bits = 0x7C00 if dtype == torch.float16 else 0x7F80
    special = ((bits & exp_bits) == 0) | ((bits & exp_bits) == exp_bits)
    chosen = torch.cat([bits[special], bits[~special][::5 if dtype == torch.float16 else 4]])[:16384]
    B, d = 4, 4096
    assert chosen.numel() == B * d
    x = chosen.to(torch.int16).view(dtype).reshape(B, 1, d)
    inputs = dict(x=x, grad_out=torch.ones(B, 1, 1, dtype=dtype), in_idx=torch.arange(d),
                  out_idx=torch.zeros(1, dtype=torch.long),
                  bucket=torch.arange(d, dtype=torch.int32)[None], weight=torch.ones(1, d),
                  k=d, scale=None)
    knobs = {"cc": cc, "warps": 8, "path": PATH_WMMA_LARGE if cc >= 80 else PATH_FMA}
    out, config = run_emulator(emulator, tmp_path, inputs, knobs)
    assert (config["path"] == PATH_FMA) == (cc < 80) and config["vec_x"] == 8, config
    want = x.float().reshape(B, d)
    same = (out == want) | (out.isnan() & want.isnan())
    assert same.all(), f"{(~same).sum().item()} patterns differ, first at {(~same).nonzero()[:5].tolist()}"


def test_launch_plan_on_an_h100(emulator):
    """The plan the .cu computes (8 warps, 132 SMs x 2 blocks) at the benchmark's sizes."""
    h100 = dict(warps=8, sms=132, blocks_per_sm=2)
    for dtype_code, tf32 in ((2, 0), (3, 0), (0, 1), (0, 0), (1, 0)):
        for B, T, d_in, d_out, k_in, k_out, k in [(8, 512, 4096, 4096, 64, 64, 1024),
                                                   (32, 4096, 14336, 4096, 128, 128, 4096),
                                                   (1, 1, 1, 1, 1, 1, 1), (3, 77, 30, 50, 17, 33, 100)]:
            cfg = plan_of(emulator, dtype_code, (B, T, d_in, d_out, k_in, k_out, 1, k), {**h100, "tf32": tf32})
            what = f"dtype {dtype_code} tf32 {tf32} {(B, T, k_in, k_out, k)}: {cfg}"
            wmma = dtype_code in (2, 3) or tf32
            assert (cfg["path"] != PATH_FMA) == bool(wmma), what
            assert cfg["threads"] == 256 and cfg["shared_bytes"] <= SHARED_LIMIT, what
            assert cfg["token_tile"] % cfg["kstep"] == 0 and cfg["token_chunk"] % cfg["token_tile"] == 0, what
            assert (cfg["n_chunks"] - 1) * cfg["token_chunk"] < T <= cfg["n_chunks"] * cfg["token_chunk"], what
            assert cfg["blocks"] == B * cfg["n_tiles"] * cfg["n_chunks"], what
            assert cfg["workspace_elems"] == B * cfg["n_chunks"] * k_in * k_out, what
            if (k_in, k_out) == (128, 128) and wmma:
                assert cfg["path"] == PATH_WMMA_LARGE and cfg["n_tiles"] == 1, what
            if T == 4096:  # long sequences: the grid fills (nearly) a whole wave of 264 slots
                assert cfg["blocks"] / (math.ceil(cfg["blocks"] / 264) * 264) >= 0.9, what
    # bf16 has no tensor-core path before sm_80; fp16 has one from sm_70
    assert plan_of(emulator, 2, (8, 64, 256, 256, 64, 64, 1, 1024), {"cc": 75})["path"] == PATH_FMA
    assert plan_of(emulator, 3, (8, 64, 256, 256, 64, 64, 1, 1024), {"cc": 75})["path"] != PATH_FMA


# ---------------------------------------------------------------------------------------------
# nvcc and the torch binding


def _nvcc_command(nvcc: str, arch: str, out: Path) -> list[str]:
    # the flags of .ci/check_cuda.sh: warnings (host and device) are errors, and so are register
    # spills / local memory in the kernel
    return [nvcc, "-c", f"-arch={arch}", "-std=c++17", "-O3", "-Xcompiler", "-Wall,-Wextra",
            "-Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage", "-I", str(CSRC),
            str(CSRC / "factgrass_cuda.cu"), "-o", str(out)]


def test_cuda_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    procs = {arch: subprocess.Popen(_nvcc_command(nvcc, arch, tmp_path / f"factgrass_{arch}.o"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for arch in ("sm_80", "sm_90")}
    for arch, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"nvcc -arch={arch} failed:\n{log}"
        assert (tmp_path / f"factgrass_{arch}.o").stat().st_size > 0


def test_cuda_header_is_plain_cxx(tmp_path):
    """factgrass_cuda.h must compile without CUDA headers (the torch binding includes it)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    src = tmp_path / "use_header.cpp"
    src.write_text('#include "factgrass_cuda.h"\n'
                   "int main() {\n"
                   "  auto ws = &grass_factgrass_cuda_workspace_bytes;\n"
                   "  auto f32 = &grass_factgrass_cuda_launch_float32;\n"
                   "  auto f64 = &grass_factgrass_cuda_launch_float64;\n"
                   "  auto bf16 = &grass_factgrass_cuda_launch_bfloat16;\n"
                   "  auto f16 = &grass_factgrass_cuda_launch_float16;\n"
                   "  (void)ws; (void)f32; (void)f64; (void)bf16; (void)f16;\n"
                   "  return 0;\n"
                   "}\n")
    proc = subprocess.run([gxx, "-std=c++17", "-Wall", "-Werror", "-fsyntax-only", "-I", str(CSRC),
                           str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _cuda_include_dir() -> Path | None:
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates += [Path("/usr/local/cuda/include"), *sorted(Path("/usr/local").glob("cuda-*/include"))]
    return next((c for c in candidates if (c / "cuda_runtime_api.h").exists()), None)


def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """Full C++ semantic check (-fsyntax-only) of the torch binding without a CUDA build of torch.

    Uses the c10/cuda headers that the torch wheel ships, the CUDA toolkit's runtime headers, and
    a stand-in for the one generated header a CPU wheel lacks (c10/cuda/impl/cuda_cmake_macros.h).
    """
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    torch_include = Path(torch.__file__).resolve().parent / "include"
    if not (torch_include / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch installation ships no c10/cuda headers")
    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h) found")
    shim = tmp_path / "shim"
    generated = torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.exists():
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           "-isystem", str(shim), "-isystem", str(torch_include),
           "-isystem", str(torch_include / "torch" / "csrc" / "api" / "include"),
           "-isystem", str(cuda_include), "-I", str(CSRC), str(CSRC / "factgrass_cuda_binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"


def cases_for_gpu() -> dict[str, Case]:
    """The emulated shapes plus real layer sizes, for tests/test_gpu.py (default knobs there)."""
    cases = {name: replace(case, knobs={}) for name, case in CASES.items()}
    cases["gpt2_mlp_runs"] = Case(B=8, T=300, d_in=768, d_out=3072, k_in=64, k_out=64, c=1, k=1024,
                                  run_in=8, run_out=8, seed=12)
    cases["paper_plan_coordinatewise"] = Case(B=2, T=1000, d_in=1024, d_out=1024, k_in=128,
                                              k_out=128, c=2, k=4096, seed=13)
    return cases
