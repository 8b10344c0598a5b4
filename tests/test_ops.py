"""The factgrass op: C++ kernel vs torch reference vs exact per-example autograd gradients."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from grass_callback.errors import KernelInputError
from grass_callback.ops import factgrass, kernel_available
from grass_callback.projection import FactGraSSPlan

TOLERANCES = [  # dtype, atol, rtol (relative to the output's scale)
    (torch.float64, 1e-12, 1e-12),
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 1e-5, 1e-5),  # both accumulate bf16 products in float32
    (torch.float16, 1e-5, 1e-5),
]
SHAPES = [  # B, T, d_in, d_out, k, k_in, k_out, c
    (1, 1, 7, 5, 8, 3, 4, 1),
    (4, 1, 33, 17, 64, 16, 8, 2),
    (3, 13, 31, 29, 100, 10, 11, 1),  # odd everything, k' = 110 not a multiple of any block
    (2, 70, 64, 48, 256, 32, 16, 4),
    (5, 3, 128, 9, 72, 24, 9, 1),
]


@pytest.fixture(scope="module")
def needs_kernel() -> None:
    assert kernel_available(), "the C++ kernel must build on the test machine"


def _inputs(B, T, d_in, d_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.randn(B, T, d_out, generator=gen, dtype=torch.float64).to(dtype)
    return x, d


def _assert_close(got, want, atol, rtol, label):
    scale = want.abs().max().clamp_min(1.0)
    bad = ((got - want).abs() > atol * scale + rtol * want.abs()).nonzero()
    assert bad.numel() == 0, (
        f"{label}: {bad.shape[0]} mismatches, first at {bad[:5].tolist()}: "
        f"got {got[tuple(bad[0])].item()}, want {want[tuple(bad[0])].item()}")


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("mask_run", ["auto", 1, 5])  # 5: runs that straddle the kernel's panels
def test_cpu_kernel_matches_reference(needs_kernel, dtype, atol, rtol, shape, bias, with_scale, mask_run):
    B, T, d_in, d_out, k, k_in, k_out, c = shape
    plan = FactGraSSPlan(d_in, d_out, bias, k=k, k_in=k_in, k_out=k_out, c=c, seed=5, name="l",
                         mask_run=mask_run)
    x, d = _inputs(B, T, d_in, d_out, dtype)
    scale = torch.rand(B) + 0.5 if with_scale else None
    got = factgrass(x, d, plan, scale=scale, impl="cpu")
    want = factgrass(x, d, plan, scale=scale, impl="torch")
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) == want.dtype
    _assert_close(got, want, atol, rtol, f"{dtype} {shape} bias={bias}")


def test_two_dim_inputs_are_one_token(needs_kernel):
    plan = FactGraSSPlan(20, 10, True, k=32, k_in=8, k_out=8, name="l")
    x, d = _inputs(6, 1, 20, 10, torch.float32)
    torch.testing.assert_close(factgrass(x[:, 0], d[:, 0], plan, impl="cpu"), factgrass(x, d, plan, impl="cpu"))


def test_opcheck(needs_kernel):
    plan = FactGraSSPlan(24, 16, True, k=32, k_in=8, k_out=6, c=2, name="l")
    x, d = _inputs(3, 5, 24, 16, torch.float32)
    args = (x, d, *plan.tables(), plan.k, torch.rand(3))
    torch.library.opcheck(torch.ops.grass_callback.factgrass.default, args)
    torch.library.opcheck(torch.ops.grass_callback.factgrass.default, args[:-1] + (None,))


def test_torch_compile_traces_the_op(needs_kernel):
    plan = FactGraSSPlan(24, 16, True, k=32, k_in=8, k_out=6, name="l")
    x, d = _inputs(3, 5, 24, 16, torch.float32)

    def fn(x, d):
        return factgrass(x * 2, d, plan, impl="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, d), factgrass(x * 2, d, plan, impl="cpu"))


def _per_example_exact(layer_cls, d_in, d_out, bias, T, B, plan, conv1d=False):
    """Per-example weight gradients one example at a time with plain autograd (float64)."""
    torch.manual_seed(1)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(d_out, d_in).double()
    else:
        layer = torch.nn.Linear(d_in, d_out, bias=bias).double()
    head = torch.randn(d_out, dtype=torch.float64)
    xs = torch.randn(B, T, d_in, dtype=torch.float64)
    rows, deltas = [], []
    for i in range(B):
        layer.zero_grad()
        y = layer(xs[i:i + 1])
        y.retain_grad()
        loss = torch.tanh(y @ head).pow(2).sum()
        loss.backward()
        w = layer.weight.grad.T if conv1d else layer.weight.grad  # [d_out, d_in]
        g = torch.cat([w, layer.bias.grad[:, None]], 1) if (bias or conv1d) else w
        rows.append(plan.project_gradient(g[None]))
        deltas.append(y.grad)
    return xs, torch.cat(deltas), torch.cat(rows)


@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_compressed_gradient_equals_exact_per_example_gradient(needs_kernel, T, bias, impl):
    d_in, d_out, B = 40, 24, 5
    plan = FactGraSSPlan(d_in, d_out, bias, k=64, k_in=16, k_out=12, c=2, seed=3, name="l")
    xs, deltas, exact = _per_example_exact(torch.nn.Linear, d_in, d_out, bias, T, B, plan)
    got = factgrass(xs, deltas, plan, impl=impl)
    rel = (got - exact).norm() / exact.norm()
    assert rel <= 1e-10, rel


def test_conv1d_layout_gives_the_same_compressed_gradient(needs_kernel):
    plan = FactGraSSPlan(40, 24, True, k=64, k_in=16, k_out=12, seed=3, name="c")
    xs, deltas, exact = _per_example_exact(None, 40, 24, True, 6, 4, plan, conv1d=True)
    got = factgrass(xs, deltas, plan, impl="cpu")
    assert (got - exact).norm() / exact.norm() <= 1e-10


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_bad_inputs_say_what_and_how(needs_kernel, impl):
    plan = FactGraSSPlan(20, 10, True, k=32, k_in=8, k_out=8, name="l")
    x, d = _inputs(4, 3, 20, 10, torch.float32)
    cases = [
        ((x[0, 0], d[0, 0]), "must be \\[B, T, d\\] or \\[B, d\\]"),
        ((x, d[:3]), "disagree on \\[B, T\\]"),
        ((x, d[:, :2]), "disagree on \\[B, T\\]"),
        ((x, d.double()), "cast both to one dtype"),
        ((x.int(), d.int()), "use one of float32"),
        ((x[..., :19], d), "build the plan for this layer"),
        ((x, d[:, 0]), "pass both as"),
    ]
    for args, message in cases:
        with pytest.raises(KernelInputError, match=message):
            factgrass(*args, plan, impl=impl)
    with pytest.raises(KernelInputError, match="scale must be"):
        factgrass(x, d, plan, scale=torch.ones(3), impl=impl)
    with pytest.raises(KernelInputError, match="impl must be"):
        factgrass(x, d, plan, impl="gpu")


def test_kernel_refuses_index_tables_out_of_range(needs_kernel):
    plan = FactGraSSPlan(20, 10, True, k=32, k_in=8, k_out=8, name="l")
    x, d = _inputs(2, 3, 20, 10, torch.float32)
    in_idx, out_idx, bucket, weight = plan.tables()
    op = torch.ops.grass_callback.factgrass
    with pytest.raises(RuntimeError, match="in_idx values must lie"):
        op(x, d, in_idx + 5, out_idx, bucket, weight, 32, None)
    with pytest.raises(RuntimeError, match="out_idx values must lie"):
        op(x, d, in_idx, out_idx + 3, bucket, weight, 32, None)
    with pytest.raises(RuntimeError, match="bucket values must lie"):
        op(x, d, in_idx, out_idx, bucket + 32, weight, 32, None)
    with pytest.raises(RuntimeError, match="belong to another plan"):
        op(x, d, in_idx, out_idx[:4], bucket, weight, 32, None)


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from grass_callback.ops import factgrass, kernel_available
    from grass_callback.projection import FactGraSSPlan, materialize
    assert kernel_available()
    B, T, d_in, d_out = 8, 16, 4096, 11008          # full per-example gradients: 1.44 GB in fp32
    plan = FactGraSSPlan(d_in, d_out, True, k=1024, name="mlp")
    x, d = torch.randn(B, T, d_in), torch.randn(B, T, d_out)
    factgrass(x[:1], d[:1], plan, impl=sys.argv[1] if sys.argv[1] != "materialize" else "cpu")  # warm up
    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    limit = vm + 400 * 2**20                          # 400 MB above what is already mapped
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        if sys.argv[1] == "materialize":
            out = plan.project_gradient(materialize(x, d, bias=True))
        else:
            out = factgrass(x, d, plan, impl=sys.argv[1])
    except (MemoryError, RuntimeError) as e:
        print("OOM", type(e).__name__); sys.exit(3)
    print("OK", tuple(out.shape))
""")


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_kernel_never_allocates_per_example_gradients(needs_kernel, impl, tmp_path):
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    ok = subprocess.run([sys.executable, str(script), impl], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "OK (8, 1024)" in ok.stdout, ok.stdout + ok.stderr
    # the same limit stops the materializing path, so the limit is real
    bad = subprocess.run([sys.executable, str(script), "materialize"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 3 and "OOM" in bad.stdout, bad.stdout + bad.stderr


def _plan_with_tables_built_here(d_in, d_out, bias, k, k_in, k_out, c, seed):
    """A plan whose masks, buckets and signs are drawn here (not by ``projection.py``), and those tables."""
    gen = torch.Generator().manual_seed(seed)
    in_idx = torch.randperm(d_in + int(bias), generator=gen)[:k_in].sort().values
    out_idx = torch.randperm(d_out, generator=gen)[:k_out].sort().values
    block = k // c
    bucket = torch.stack([torch.randint(0, block, (k_in * k_out,), generator=gen) + j * block for j in range(c)])
    sign = torch.randint(0, 2, (c, k_in * k_out), generator=gen) * 2 - 1
    tables = (in_idx, out_idx, bucket.to(torch.int32), sign.to(torch.int8))

    class GivenTables(FactGraSSPlan):
        def _build(self):
            self.in_idx, self.out_idx, self.bucket, self.sign = tables

    plan = GivenTables(d_in, d_out, bias, k=k, k_in=k_in, k_out=k_out, c=c, name="given", mask_run=1)
    return plan, (in_idx.tolist(), out_idx.tolist(), bucket.tolist(), sign.tolist())


def _sketch_by_loops(x, d, bias, k, tables, scale):
    """``Σ_j sign_j(e) / sqrt(c) · Ĝ[e]`` into bucket ``bucket_j(e)``, by plain Python loops over a
    dense per-example gradient ``G = Σ_t δ_t x_tᵀ`` (float64)."""
    in_idx, out_idx, bucket, sign = tables
    c = len(bucket)
    root = float(torch.tensor(c ** -0.5, dtype=torch.float32))  # the op's SJLT values are float32 numbers
    x = x.double()
    if bias:
        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=torch.float64)], -1)
    grads = torch.einsum("bto,bti->boi", d.double(), x)
    out = torch.zeros(x.shape[0], k, dtype=torch.float64)
    for b in range(x.shape[0]):
        for a, o in enumerate(out_idx):
            for i_pos, i in enumerate(in_idx):
                e = a * len(in_idx) + i_pos
                for j in range(c):
                    out[b, bucket[j][e]] += sign[j][e] * root * grads[b, o, i] * float(scale[b])
    return out


@pytest.mark.parametrize("impl", ["torch", "cpu"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(3, 4, 11, 7, True, 12, 5, 4, 2), (2, 1, 9, 6, False, 8, 4, 3, 1)])
def test_op_equals_loops_over_tables_built_in_the_test(needs_kernel, impl, dtype, tol, shape):
    B, T, d_in, d_out, bias, k, k_in, k_out, c = shape
    plan, tables = _plan_with_tables_built_here(d_in, d_out, bias, k, k_in, k_out, c, seed=11)
    assert {s for row in tables[3] for s in row} == {-1, 1}  # both signs occur
    x, d = _inputs(B, T, d_in, d_out, dtype, seed=2)
    scale = torch.rand(B) + 0.5
    got = factgrass(x, d, plan, scale=scale, impl=impl).double()
    want = _sketch_by_loops(x, d, bias, k, tables, scale)
    _assert_close(got, want, tol, tol, f"{impl} {dtype} {shape}")
