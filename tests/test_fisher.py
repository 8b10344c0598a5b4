"""Tests of grass_callback.fisher against dense float64 references."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grass_callback.errors import FisherError, GraSSError
from grass_callback.fisher import FisherStats, FisherValueError, FittedFisher

DIMS = {"encoder.fc1": 12, "encoder.fc2": 5, "head": 7}


def _grads(n: int, seed: int, dims=DIMS, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # a different scale per layer, so a mixed-up layer or damping shows
    return {
        name: torch.randn(n, k, generator=gen, dtype=dtype) * (i + 1.5)
        for i, (name, k) in enumerate(dims.items())
    }


def _reference(grads: dict[str, torch.Tensor], ratio: float):
    """F, lambda and the damped matrix computed directly from the definition, in float64."""
    out = {}
    for name, g in grads.items():
        g = g.to(torch.float64)
        n, k = g.shape
        fisher = sum(torch.outer(g[i], g[i]) for i in range(n)) / n
        lam = ratio * torch.trace(fisher).item() / k
        out[name] = (fisher, lam, fisher + lam * torch.eye(k, dtype=torch.float64))
    return out


def _split(grads, sizes):
    start = 0
    for size in sizes:
        yield {name: g[start : start + size] for name, g in grads.items()}
        start += size


def test_fisher_damping_and_solve_match_dense_reference():
    grads = _grads(40, seed=0)
    stats = FisherStats(DIMS)
    stats.update(grads)
    assert stats.count == 40
    ref = _reference(grads, ratio=0.05)
    for name in DIMS:
        torch.testing.assert_close(stats.fisher(name), ref[name][0], rtol=1e-12, atol=1e-12)

    fitted = stats.fit(damping_ratio=0.05)
    queries = _grads(6, seed=1)
    solved = fitted.solve(queries)
    for name, (_, lam, damped) in ref.items():
        assert fitted.damping[name] == pytest.approx(lam, rel=1e-12)
        assert fitted.damping_ratio[name] == 0.05
        expected = torch.linalg.solve(damped, queries[name].to(torch.float64).T).T
        assert solved[name].dtype == torch.float32
        torch.testing.assert_close(solved[name].to(torch.float64), expected, rtol=1e-5, atol=1e-6)
        cond = torch.linalg.cond(damped).item()
        assert fitted.condition_numbers(exact=True)[name] == pytest.approx(cond, rel=1e-6)
        assert cond / 2 < fitted.condition_numbers()[name] <= cond * (1 + 1e-9)  # the cheap lower bound
    # float64 in, float64 out, at full precision
    q64 = {name: q.to(torch.float64) for name, q in queries.items()}
    name = "head"
    out = fitted.solve({name: q64[name]})
    assert out[name].dtype == torch.float64 and list(out) == [name]
    expected = torch.linalg.solve(ref[name][2], q64[name].T).T
    torch.testing.assert_close(out[name], expected, rtol=1e-10, atol=1e-12)


def test_float32_accumulation_is_close_to_float64():
    grads = _grads(30, seed=2)
    s64, s32 = FisherStats(DIMS), FisherStats(DIMS, dtype=torch.float32)
    s64.update(grads)
    s32.update(grads)
    q = _grads(3, seed=3)
    a, b = s64.fit(1e-2).solve(q), s32.fit(1e-2).solve(q)
    for name in DIMS:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_update_in_batches_equals_one_batch():
    grads = _grads(37, seed=4, dtype=torch.float64)
    whole, parts = FisherStats(DIMS), FisherStats(DIMS)
    whole.update(grads)
    for batch in _split(grads, [1, 10, 0, 26]):
        parts.update(batch)
    assert parts.count == whole.count == 37
    for name in DIMS:
        torch.testing.assert_close(parts.sums[name], whole.sums[name], rtol=1e-13, atol=1e-12)


def test_all_reduce_with_fake_reduce_fn_gives_union_stats():
    grads = _grads(20, seed=5, dtype=torch.float64)
    first, second = list(_split(grads, [8, 12]))
    mine, other, union = FisherStats(DIMS), FisherStats(DIMS), FisherStats(DIMS)
    mine.update(first)
    other.update(second)
    union.update(grads)
    # the "other process" contributes its sums in the order they are reduced (layers, then count)
    others = [*other.sums.values(), torch.tensor([other.count])]
    calls = []

    def fake_reduce(t: torch.Tensor) -> None:
        calls.append(tuple(t.shape))
        t.add_(others[len(calls) - 1].to(t.dtype))

    mine.all_reduce_(fake_reduce)
    assert calls == [(12, 12), (5, 5), (7, 7), (1,)]  # k x k per layer, never gathered
    assert mine.count == 20
    for name in DIMS:
        torch.testing.assert_close(mine.sums[name], union.sums[name], rtol=1e-13, atol=1e-12)


def test_all_reduce_without_process_group_is_a_no_op():
    assert not dist.is_initialized()
    stats = FisherStats(DIMS)
    stats.update(_grads(4, seed=6))
    before = {n: t.clone() for n, t in stats.sums.items()}
    stats.all_reduce_()
    assert stats.count == 4
    assert all(torch.equal(before[n], stats.sums[n]) for n in DIMS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        grads = _grads(22, seed=7, dtype=torch.float64)
        half = list(_split(grads, [9, 13]))[rank]
        stats = FisherStats(DIMS)
        stats.update(half)
        stats.all_reduce_()
        torch.save(stats.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes(tmp_path):
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    full = FisherStats(DIMS)
    full.update(_grads(22, seed=7, dtype=torch.float64))
    for rank in range(2):
        sd = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert sd["count"] == 22
        for name in DIMS:
            torch.testing.assert_close(sd["sums"][name], full.sums[name], rtol=1e-13, atol=1e-12)


def test_cholesky_failure_warns_and_raises_damping(monkeypatch):
    stats = FisherStats(DIMS)
    stats.update(_grads(50, seed=8))
    real = torch.linalg.cholesky_ex
    failures = {"head": 2}

    def flaky(matrix, **kwargs):
        factor, info = real(matrix, **kwargs)
        if matrix.shape[0] == DIMS["head"] and failures["head"] > 0:
            failures["head"] -= 1
            return factor, torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    with pytest.warns(RuntimeWarning, match="'head'") as record:
        fitted = stats.fit(damping_ratio=1e-3)
    assert len([w for w in record if "Cholesky" in str(w.message)]) == 2
    assert fitted.damping_ratio["head"] == pytest.approx(1e-1)
    assert fitted.damping_ratio["encoder.fc1"] == 1e-3
    _, lam, _ = _reference(_grads(50, seed=8), ratio=1e-1)["head"]
    assert fitted.damping["head"] == pytest.approx(lam, rel=1e-10)


def test_cholesky_of_singular_float32_fisher_fails_after_retries():
    # every gradient is the all-ones vector: F is the all-ones matrix (rank 1, exact in float32),
    # and a ratio of 1e-30 vanishes next to the diagonal, so the second pivot is exactly 0.
    dims = {"lin": 6}
    stats = FisherStats(dims, dtype=torch.float32)
    stats.update({"lin": torch.ones(4, 6)})
    with pytest.warns(RuntimeWarning, match="'lin'"):
        with pytest.raises(FisherError, match="'lin'.*not positive definite"):
            stats.fit(damping_ratio=1e-30, max_retries=3)
    # a usable ratio fits
    fitted = stats.fit(damping_ratio=1e-2)
    assert fitted.damping["lin"] == pytest.approx(1e-2)


def test_zero_gradients_use_absolute_damping_with_warning():
    stats = FisherStats({"lin": 3})
    stats.update({"lin": torch.zeros(5, 3)})
    with pytest.warns(RuntimeWarning, match="zero trace"):
        fitted = stats.fit()
    assert fitted.damping["lin"] > 0
    out = fitted.solve({"lin": torch.ones(2, 3, dtype=torch.float64)})["lin"]
    torch.testing.assert_close(out, torch.full((2, 3), 1.0 / fitted.damping["lin"], dtype=torch.float64))


def test_count_zero_and_bad_damping_errors():
    stats = FisherStats(DIMS)
    with pytest.raises(FisherError, match="no gradients were accumulated"):
        stats.fit()
    stats.update(_grads(3, seed=9))
    for bad in (0.0, -1e-3, float("nan"), float("inf"), "1e-3", True):
        with pytest.raises(FisherValueError, match="damping_ratio"):
            stats.fit(damping_ratio=bad)
    assert issubclass(FisherValueError, GraSSError) and issubclass(FisherValueError, ValueError)


def test_update_validates_layers_and_shapes():
    stats = FisherStats(DIMS)
    good = _grads(4, seed=10)
    with pytest.raises(FisherError, match="missing \\['head'\\]"):
        stats.update({n: g for n, g in good.items() if n != "head"})
    with pytest.raises(FisherError, match="unexpected \\['extra'\\]"):
        stats.update({**good, "extra": torch.zeros(4, 2)})
    with pytest.raises(FisherError, match="Tensor\\[B, 7\\]"):
        stats.update({**good, "head": torch.zeros(4, 6)})
    with pytest.raises(FisherError, match="number of rows"):
        stats.update({**good, "head": torch.zeros(3, 7)})
    assert stats.count == 0  # nothing half-applied
    with pytest.raises(FisherValueError):
        FisherStats({})
    with pytest.raises(FisherValueError):
        FisherStats({"a": 0})
    with pytest.raises(FisherValueError):
        FisherStats({"a": 2}, dtype=torch.float16)


def test_stats_state_dict_save_load_round_trip_is_bit_identical(tmp_path):
    stats = FisherStats(DIMS)
    stats.update(_grads(25, seed=11))
    path = tmp_path / "fisher_stats.safetensors"
    stats.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    loaded = FisherStats.load(path)
    sd = stats.state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    via_torch = FisherStats(DIMS)
    via_torch.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    for other in (loaded, via_torch):
        assert other.count == stats.count and other.layers == stats.layers
        assert list(other.layers) == list(DIMS)
        assert all(torch.equal(other.sums[n], stats.sums[n]) for n in DIMS)
    with pytest.raises(FisherError, match="layers"):
        FisherStats({"other": 3}).load_state_dict(sd)


def test_fitted_save_load_round_trip_is_bit_identical(tmp_path):
    stats = FisherStats(DIMS)
    stats.update(_grads(25, seed=12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = stats.fit(1e-3)
    path = tmp_path / "fitted.safetensors"
    fitted.save(path)
    loaded = FittedFisher.load(path)
    assert loaded.damping == fitted.damping and loaded.damping_ratio == fitted.damping_ratio
    assert loaded.count == 25 and loaded.requested_damping_ratio == 1e-3
    q = _grads(4, seed=13)
    a, b = fitted.solve(q), loaded.solve(q)
    assert all(torch.equal(a[n], b[n]) for n in DIMS)
    torch.save(fitted.state_dict(), tmp_path / "fitted.pt")
    again = FittedFisher.from_state_dict(torch.load(tmp_path / "fitted.pt", weights_only=True))
    assert all(torch.equal(again.factors[n], fitted.factors[n]) for n in DIMS)
    with pytest.raises(FisherError, match="FisherStats"):
        FittedFisher.load(_save_stats(tmp_path))


def _save_stats(tmp_path):
    stats = FisherStats({"a": 2})
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    return path


def test_solve_validates_inputs():
    stats = FisherStats(DIMS)
    stats.update(_grads(10, seed=14))
    fitted = stats.fit()
    with pytest.raises(FisherError, match="unknown|does not have"):
        fitted.solve({"nope": torch.zeros(1, 3)})
    with pytest.raises(FisherError, match="Tensor\\[m, 7\\]"):
        fitted.solve({"head": torch.zeros(2, 3)})
    assert fitted.solve({"head": torch.zeros(0, 7)})["head"].shape == (0, 7)


# ----------------------------------------------------------------------------- float32 factors for half rows


@pytest.mark.parametrize("rows, k, ratio, want", [
    (torch.float16, 1024, 1.0, torch.float32),    # (1 + 1024) eps32 = 1.2e-4 <= eps16 / 4 = 2.4e-4
    (torch.float16, 1024, 0.25, torch.float64),   # 4097 eps32 = 4.9e-4 > 2.4e-4
    (torch.bfloat16, 1024, 0.1, torch.float32),   # 10241 eps32 = 1.2e-3 <= eps_bf16 / 4 = 2.0e-3
    (torch.bfloat16, 1024, 0.01, torch.float64),
    (torch.float32, 16, 10.0, torch.float64),     # float32 rows: the factor stays in float64
    (None, 16, 10.0, torch.float64),
])
def test_factor_dtype_follows_the_condition_bound(rows, k, ratio, want):
    from grass_callback.fisher import factor_dtype

    assert factor_dtype(torch.float64, rows, k, ratio) == want
    assert factor_dtype(torch.float32, rows, k, ratio) == torch.float32  # float32 statistics: as before


def test_float32_factor_for_half_rows_solves_within_a_quarter_of_their_rounding():
    # N < k: the Fisher is rank deficient, so the damping alone sets the smallest eigenvalue and
    # the condition number is near its bound 1 + k / r: the hardest case the rule admits.
    dims = {"wide": 256, "narrow": 24}
    g = _grads(100, seed=11, dims=dims, dtype=torch.float64)
    g["wide"][:, :8] *= 40.0  # a few directions far above the rest
    stats = FisherStats(dims)
    stats.update(g)
    ref = stats.fit(1.0)
    fast = stats.fit(1.0, rows_dtype=torch.float16)
    assert all(f.dtype == torch.float64 for f in ref.factors.values())
    assert all(f.dtype == torch.float32 for f in fast.factors.values())
    assert fast.damping == ref.damping
    q = _grads(7, seed=12, dims=dims, dtype=torch.float32)
    want, got = ref.solve({n: x.double() for n, x in q.items()}), fast.solve(q)
    eps16 = torch.finfo(torch.float16).eps
    for name in dims:
        err = (got[name].double() - want[name]).norm() / want[name].norm()
        assert err <= eps16 / 4, (name, float(err))
        assert err > 0  # it did run in float32
    # self-influence and the condition-number bound from the float32 factor
    torch.testing.assert_close(fast.quadratic(q), ref.quadratic({n: x.double() for n, x in q.items()}),
                               rtol=eps16 / 4, atol=0)
    exact = ref.condition_numbers(exact=True)
    for name, c in fast.condition_numbers().items():
        assert c <= exact[name] * (1 + 1e-4) and c <= 1 + dims[name] / 1.0 + 1e-6


def test_failed_float32_factor_is_redone_in_float64_at_the_same_ratio(monkeypatch):
    stats = FisherStats(DIMS)
    stats.update(_grads(50, seed=8))
    real = torch.linalg.cholesky_ex

    def no_float32(matrix, **kwargs):
        factor, info = real(matrix, **kwargs)
        return (factor, torch.ones_like(info)) if matrix.dtype == torch.float32 else (factor, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", no_float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no retry warning: the ratio is not raised
        fitted = stats.fit(damping_ratio=10.0, rows_dtype=torch.bfloat16)
    assert all(f.dtype == torch.float64 for f in fitted.factors.values())
    assert all(r == 10.0 for r in fitted.damping_ratio.values())


@pytest.mark.parametrize("failing", ["float32_fails", "head_fails_twice"])
def test_factor_after_failed_attempts_is_that_of_its_reported_damping(monkeypatch, failing):
    # the attempts share one k x k matrix (F's diagonal restored before each) and the float64
    # redo builds its own: the factor that succeeds is F + lambda I at the lambda it reports,
    # with nothing left of the failed attempts
    grads = _grads(50, seed=8, dtype=torch.float64)
    stats = FisherStats(DIMS)
    stats.update(grads)
    real = torch.linalg.cholesky_ex
    head_failures = [2]

    def flaky(matrix, **kwargs):
        factor, info = real(matrix, **kwargs)
        if failing == "float32_fails" and matrix.dtype == torch.float32:
            return factor, torch.ones_like(info)
        if failing == "head_fails_twice" and matrix.shape[0] == DIMS["head"] and head_failures[0] > 0:
            head_failures[0] -= 1
            return factor, torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the retry ladder's warnings
        if failing == "float32_fails":
            fitted = stats.fit(damping_ratio=10.0, rows_dtype=torch.bfloat16)
        else:
            fitted = stats.fit(damping_ratio=1e-3)
    want_ratio = {n: 10.0 for n in DIMS} if failing == "float32_fails" else {**{n: 1e-3 for n in DIMS}, "head": 1e-1}
    assert fitted.damping_ratio == pytest.approx(want_ratio)
    for name in DIMS:
        _, lam, damped = _reference(grads, want_ratio[name])[name]
        factor = fitted.factors[name]
        assert factor.dtype == torch.float64
        assert fitted.damping[name] == pytest.approx(lam, rel=1e-12)
        torch.testing.assert_close(factor @ factor.T, damped, rtol=1e-12, atol=1e-12)


def test_sums_beyond_float32_range_fall_back_to_float64_factors_not_an_error():
    # bfloat16 rows reach float32's range: sums past 3.4e38 (F itself below it) would turn inf in
    # float32, so the layer is factored from its float64 statistics instead
    g = {"a": torch.randn(40, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5e18}
    stats = FisherStats({"a": 16})
    stats.update(g)
    big = torch.finfo(torch.float32).max
    assert float(stats.sums["a"].abs().max()) > big > float((stats.sums["a"] / 40).abs().max())
    fitted = stats.fit(1.0, rows_dtype=torch.bfloat16)
    assert fitted.factors["a"].dtype == torch.float64
    torch.testing.assert_close(fitted.factors["a"], stats.fit(1.0).factors["a"], rtol=0, atol=0)


@pytest.mark.parametrize("rows_dtype", [None, torch.float16])
def test_layers_wider_than_a_factor_block_solve_as_the_dense_inverse(rows_dtype):
    # k = 600 > _linalg.BLOCK (the CPU fit factors it in blocks; 600 is not a multiple of 256) and
    # 1500 rows > k/2 (the k x k factor, not the rows' kernel): solve and self-influence against
    # the float64 inverse of F + λI computed from the rows. Half-precision rows get float32
    # factors at this damping (fisher.factor_dtype).
    from grass_callback._linalg import BLOCK

    dims = {"wide": 600, "narrow": 40}
    assert dims["wide"] > BLOCK and dims["wide"] % BLOCK
    gen = torch.Generator().manual_seed(11)
    grads = {name: torch.randn(1500, k, generator=gen) * torch.linspace(0.1, 3.0, k) for name, k in dims.items()}
    stats = FisherStats(dims)
    stats.update(grads)
    fitted = stats.fit(damping_ratio=1.0, rows_dtype=rows_dtype)
    assert not fitted.duals
    if rows_dtype is not None:
        assert fitted.factors["wide"].dtype == torch.float32
    q = {name: torch.randn(5, k, generator=gen) for name, k in dims.items()}
    quad_want = torch.zeros(7, dtype=torch.float64)
    for name, g in grads.items():
        g = g.double()
        damped = g.T @ g / len(g)
        lam = float(damped.trace()) / dims[name]
        assert fitted.damping[name] == pytest.approx(lam, rel=1e-9)
        inverse = torch.linalg.inv(damped + lam * torch.eye(dims[name], dtype=torch.float64))
        tol = 1e-10 if rows_dtype is None else 1e-5
        got = fitted.solve({name: q[name].double()})[name]
        want = q[name].double() @ inverse
        assert float((got - want).abs().max() / want.abs().max()) < tol
        quad_want += ((g[:7] @ inverse) * g[:7]).sum(1)
    got = fitted.quadratic({name: g[:7].double() if rows_dtype is None else g[:7] for name, g in grads.items()})
    assert float(((got - quad_want).abs() / quad_want).max()) < (1e-10 if rows_dtype is None else 1e-5)
