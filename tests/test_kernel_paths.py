"""Every path of the CPU kernel against the torch reference, and impl="auto"'s choice between them."""

from __future__ import annotations

import logging

import pytest
import torch

from grass_callback.errors import KernelInputError
from grass_callback.ops import autotune, factgrass, factgrass_reference, kernel_available
from grass_callback.projection import FactGraSSPlan

# B, T, d_in, d_out, k, k_in, k_out, c: T around the block (8) and GEMM (64) thresholds, blocks
# that do not divide T, panels that do not divide the masks
SHAPES = [
    (2, 1, 40, 24, 64, 16, 12, 2),
    (3, 7, 33, 17, 64, 16, 8, 1),
    (2, 9, 64, 48, 128, 20, 13, 2),
    (2, 63, 31, 29, 100, 10, 11, 1),
    (3, 64, 96, 40, 256, 24, 16, 4),
    (2, 131, 200, 72, 512, 40, 24, 2),
]
PATHS = [  # product (0 tile, 1 GEMM), gather (0 rows, 1 blocks), tokens per block
    (0, 0, 0), (0, 1, 1), (0, 1, 3), (0, 1, 8), (1, 0, 0), (1, 1, 5), (1, 1, 8), (1, 1, 64), (-1, -1, 0)]
TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}


@pytest.fixture(scope="module")
def needs_kernel() -> None:
    assert kernel_available(), "the C++ kernel must build on the test machine"


@pytest.fixture(autouse=True)
def _fresh_autotune(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("GRASS_CALLBACK_AUTO_IMPL", raising=False)
    monkeypatch.setattr(autotune, "MIN_TUNED_BYTES", 200_000)  # the tuned case below is above it, SHAPES[2] not
    autotune.clear()
    autotune.set_mode(None)
    yield
    autotune.clear()
    autotune.set_mode(None)


def _case(shape, dtype, mask_run, bias, seed=0):
    B, T, d_in, d_out, k, k_in, k_out, c = shape
    plan = FactGraSSPlan(d_in, d_out, bias, k=k, k_in=k_in, k_out=k_out, c=c, seed=seed, name="l",
                         mask_run=mask_run)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, d_in, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.randn(B, T, d_out, generator=gen, dtype=torch.float64).to(dtype)
    return plan, x, d


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("mask_run, bias", [(1, False), (1, True), (4, True), (3, False)])
def test_every_cpu_path_matches_the_reference(needs_kernel, shape, dtype, mask_run, bias):
    plan, x, d = _case(shape, dtype, mask_run, bias)
    scale = torch.rand(x.shape[0]) + 0.5
    args = (x, d, *plan.tables(), plan.k, scale)
    want = factgrass_reference(*args)
    tol = TOLERANCES[dtype] * want.abs().max().clamp_min(1.0)
    for product, gather, block in PATHS:
        got = torch.ops.grass_callback._factgrass_cpu_path(*args, product, gather, block)
        err = (got - want).abs().max()
        assert err <= tol, f"path {(product, gather, block)}: max error {err} > {tol}"


def test_the_default_path_is_the_path_factgrass_takes(needs_kernel):
    plan, x, d = _case(SHAPES[4], torch.float32, 1, True)
    args = (x, d, *plan.tables(), plan.k, None)
    product, g_in, g_out, block = torch.ops.grass_callback._factgrass_cpu_choice(
        x.shape[1], x.shape[2], d.shape[2], plan.in_idx, plan.out_idx)
    assert g_in == g_out  # a coordinate-wise plan: both factors the same way
    forced = torch.ops.grass_callback._factgrass_cpu_path(*args, product, g_in, block)
    assert torch.equal(torch.ops.grass_callback.factgrass(*args), forced)


def test_a_bad_path_is_refused(needs_kernel):
    plan, x, d = _case(SHAPES[0], torch.float32, 1, False)
    with pytest.raises(RuntimeError, match="product must be -1"):
        torch.ops.grass_callback._factgrass_cpu_path(x, d, *plan.tables(), plan.k, None, 3, 0, 0)
    plan, x, d = _case(SHAPES[1], torch.float32, 1, False)  # T = 7: the groups are for one token
    with pytest.raises(RuntimeError, match="needs T == 1"):
        torch.ops.grass_callback._factgrass_cpu_path(x, d, *plan.tables(), plan.k, None, 2, 0, 0)


# one token (T == 1): examples in groups of a cache line's lanes (16 float32, 8 float64); batches
# below, at and across a group, masks that keep the whole layer (as the one-token plans do) or not
ONE_TOKEN = [  # B, d_in, d_out, k, k_in, k_out, c
    (1, 40, 24, 64, 16, 12, 2),
    (7, 33, 17, 64, 34, 17, 2),
    (16, 48, 30, 128, 20, 13, 1),
    (17, 96, 40, 256, 97, 40, 2),
    (41, 64, 10, 100, 65, 10, 4),
]


@pytest.mark.parametrize("shape", ONE_TOKEN)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_one_token_groups_match_the_reference(needs_kernel, shape, dtype, bias):
    B, d_in, d_out, k, k_in, k_out, c = shape
    plan = FactGraSSPlan(d_in, d_out, bias, k=k, k_in=min(k_in, d_in + bias), k_out=k_out, c=c, seed=B, name="l",
                         mask_run=1)
    gen = torch.Generator().manual_seed(B)
    x = torch.randn(B, 1, d_in, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.randn(B, 1, d_out, generator=gen, dtype=torch.float64).to(dtype)
    scale = torch.rand(B, generator=gen) + 0.5
    for s in (None, scale):
        args = (x, d, *plan.tables(), plan.k, s)
        want = factgrass_reference(*args)
        got = torch.ops.grass_callback._factgrass_cpu_path(*args, 2, -1, 0)
        assert torch.equal(torch.ops.grass_callback.factgrass(*args), got)  # T == 1 takes the groups
        tol = TOLERANCES.get(dtype, 2e-5) * want.abs().max().clamp_min(1.0)
        assert (got - want).abs().max() <= tol


def test_a_one_token_row_does_not_depend_on_its_batch(needs_kernel):
    """The lanes of a group are independent: each example's row, alone, in any group position
    and on any number of threads, is the same to the bit."""
    plan = FactGraSSPlan(96, 40, True, k=256, k_in=97, k_out=40, c=2, seed=0, name="l", mask_run=1)
    gen = torch.Generator().manual_seed(0)
    x, d = torch.randn(37, 1, 96, generator=gen), torch.randn(37, 1, 40, generator=gen)
    tables = (*plan.tables(), plan.k, None)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = torch.ops.grass_callback.factgrass(x, d, *tables)
    finally:
        torch.set_num_threads(threads)
    for i in (0, 5, 15, 16, 36):
        alone = torch.ops.grass_callback.factgrass(x[i:i + 1], d[i:i + 1], *tables)
        shifted = torch.ops.grass_callback.factgrass(x[i:], d[i:], *tables)[:1]
        assert torch.equal(alone[0], batch[i]) and torch.equal(shifted[0], batch[i])


# ---- impl="auto" -------------------------------------------------------------------------------

TUNED = (4, 96, 128, 80, 256, 24, 16, 1)  # inputs of 320 kB


def _tuned_case():
    plan, x, d = _case(TUNED, torch.float32, 1, True, seed=3)
    args = (x, d, *plan.tables(), plan.k, None)
    return plan, x, d, torch.ops.grass_callback.factgrass(*args), factgrass_reference(*args)


class FakeTimer:
    """Stands in for autotune.time_paths: fixed seconds per path, and counts its calls."""

    def __init__(self, kernel: float, torch_: float) -> None:
        self.seconds, self.calls = {"kernel": kernel, "torch": torch_}, 0

    def __call__(self, paths, device, rounds=autotune.ROUNDS):
        self.calls += 1
        assert set(paths) == {"kernel", "torch"}
        for fn in paths.values():  # the timed callables are the real paths
            fn()
        return dict(self.seconds)


@pytest.mark.parametrize("kernel_s, torch_s, path", [(2.0, 1.0, "torch"), (1.0, 2.0, "kernel")])
def test_auto_takes_the_faster_path_once_and_caches_it(needs_kernel, monkeypatch, kernel_s, torch_s, path):
    plan, x, d, by_kernel, by_reference = _tuned_case()
    timer = FakeTimer(kernel_s, torch_s)
    monkeypatch.setattr(autotune, "time_paths", timer)
    first = factgrass(x, d, plan)
    second = factgrass(x * 2, d, plan)  # same key: not timed again
    assert timer.calls == 1
    assert list(autotune.cache().values()) == [path]
    want = by_kernel if path == "kernel" else by_reference
    assert torch.equal(first, want)
    assert torch.equal(second, want * 2)
    factgrass(torch.cat([x, x], 1), torch.cat([d, d], 1), plan)  # T = 192, another bucket: timed on its own
    assert timer.calls == 2 and len(autotune.cache()) == 2


def test_auto_with_real_timing_agrees_with_both_paths(needs_kernel):
    plan, x, d, by_kernel, by_reference = _tuned_case()
    got = factgrass(x, d, plan)
    (choice,) = autotune.cache().values()
    assert torch.equal(got, by_kernel if choice == "kernel" else by_reference)
    torch.testing.assert_close(by_kernel, by_reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["env", "set_mode"])
@pytest.mark.parametrize("forced", ["torch", "kernel"])
def test_a_forced_mode_overrides_the_timing(needs_kernel, monkeypatch, how, forced):
    plan, x, d, by_kernel, by_reference = _tuned_case()
    timer = FakeTimer(1.0, 1.0)
    monkeypatch.setattr(autotune, "time_paths", timer)
    if how == "env":
        monkeypatch.setenv("GRASS_CALLBACK_AUTO_IMPL", forced)
    else:
        monkeypatch.setenv("GRASS_CALLBACK_AUTO_IMPL", "torch" if forced == "kernel" else "kernel")
        autotune.set_mode(forced)  # wins over the environment
    got = factgrass(x, d, plan)
    assert timer.calls == 0 and autotune.cache() == {}
    assert torch.equal(got, by_kernel if forced == "kernel" else by_reference)


def test_small_calls_take_the_kernel_untimed(needs_kernel, monkeypatch):
    plan, x, d = _case(SHAPES[2], torch.float32, 1, False)  # inputs of 8 kB
    timer = FakeTimer(2.0, 1.0)
    monkeypatch.setattr(autotune, "time_paths", timer)
    got = factgrass(x, d, plan)
    assert timer.calls == 0
    assert torch.equal(got, torch.ops.grass_callback.factgrass(x, d, *plan.tables(), plan.k, None))


def test_the_choice_is_logged_once(needs_kernel, monkeypatch, caplog):
    plan, x, d, _, _ = _tuned_case()
    monkeypatch.setattr(autotune, "time_paths", FakeTimer(2.0, 1.0))
    with caplog.at_level(logging.INFO, logger="grass_callback.ops"):
        for _ in range(3):
            factgrass(x, d, plan)
    lines = [r.getMessage() for r in caplog.records if r.name == "grass_callback.ops"]
    assert len(lines) == 1 and "gather+bmm" in lines[0] and "d_in=128" in lines[0]


def test_bad_modes_say_what_is_allowed(monkeypatch):
    with pytest.raises(KernelInputError, match="one of"):
        autotune.set_mode("fast")
    monkeypatch.setenv("GRASS_CALLBACK_AUTO_IMPL", "fastest")
    with pytest.raises(KernelInputError, match="GRASS_CALLBACK_AUTO_IMPL must be one of"):
        autotune.mode()


@pytest.mark.parametrize("T, bucket", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (512, 512)])
def test_token_buckets_are_powers_of_two_at_or_above_T(T, bucket):
    assert autotune.token_bucket(T) == bucket
