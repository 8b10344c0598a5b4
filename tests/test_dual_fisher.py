"""The dual solve (grass_callback.dual_fisher) against dense float64 inverses of the definition, and
FisherStats' choice of it against the k x k factors on the same statistics."""

from __future__ import annotations

import pytest
import torch

from grass_callback.dual_fisher import DualBlock, max_rows
from grass_callback.errors import FisherError
from grass_callback.fisher import FisherStats, FittedFisher, JointFisherStats


def _rows(n: int, k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, k, dtype=torch.float64)  # an uneven spectrum, as compressed gradients have
    return (torch.randn(n, k, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _damped(rows: torch.Tensor, count: int, lam: float) -> torch.Tensor:
    """``GᵀG / N + λI`` from the definition, float64 (a sum of outer products)."""
    g = rows.double()
    fisher = sum(torch.outer(r, r) for r in g) / count
    return fisher + lam * torch.eye(g.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_dual_block_solve_quadratic_condition_and_factor_match_the_dense_inverse(dtype, tol):
    rows, count, lam = _rows(30, 96, seed=0), 27, 0.05  # 3 zero rows stand for rows a keep mask dropped
    rows[[4, 11, 20]] = 0.0
    block = DualBlock(rows, count, lam, dtype)
    damped = _damped(rows, count, lam)
    inverse = torch.linalg.inv(damped)
    x = _rows(7, 96, seed=1)
    x[0] = rows[2]  # a vector in the rows' span, where the two terms of the formulas cancel most
    want = x @ inverse
    got = block.solve(x)
    assert got.dtype == torch.float64
    assert ((got - want).abs().max() / want.abs().max()) < tol
    quad_want = (want * x).sum(1)
    assert ((block.quadratic(x) - quad_want).abs() / quad_want).max() < tol
    eig = torch.linalg.eigvalsh(damped)
    exact = float(eig[-1] / eig[0])
    assert abs(block.condition_number(exact=True) / exact - 1) < 1e-8
    estimate = block.condition_number()
    assert estimate <= exact * (1 + 1e-9) and estimate > 0.5 * exact  # a lower bound, and a close one
    factor = block.factor().double()
    assert ((factor @ factor.T - damped).abs().max() / damped.abs().max()) < tol


def test_dual_block_rejects_what_it_cannot_solve():
    with pytest.raises(FisherError, match="0 < R < k"):
        DualBlock(_rows(8, 8, seed=0), 8, 0.1, torch.float64)
    with pytest.raises(FisherError, match="damping > 0"):
        DualBlock(_rows(4, 8, seed=0), 4, 0.0, torch.float64)
    bad = _rows(4, 8, seed=0)
    bad[1, 2] = float("nan")
    with pytest.raises(FisherError, match="not finite"):
        DualBlock(bad, 4, 0.1, torch.float64)


def _batches(n: int, dims: dict[str, int], seed: int, batch: int = 8):
    full = {name: _rows(n, k, seed=seed + i) for i, (name, k) in enumerate(dims.items())}
    for start in range(0, n, batch):
        yield {name: g[start:start + batch] for name, g in full.items()}


def test_fit_solves_layers_with_few_rows_through_their_kernel_and_matches_the_factors():
    dims = {"wide": 128, "narrow": 24}  # 40 rows: at most k/2 of the wide layer's, more than the narrow's 12
    stats = FisherStats(dims)
    keep = torch.ones(40, dtype=torch.bool)
    keep[[3, 17]] = False  # dropped rows: zeroed, not counted
    for b, batch in enumerate(_batches(40, dims, seed=3)):
        stats.update(batch, keep=keep[8 * b:8 * b + 8])
    assert stats.count == 38
    for ratio in (1.0, "auto"):
        dual, factors = stats.fit(ratio), stats.fit(ratio, dual=False)
        assert list(dual.duals) == ["wide"] and factors.duals == {}
        assert dual.damping == pytest.approx(factors.damping, rel=1e-12)
        q = {name: _rows(5, k, seed=9) for name, k in dims.items()}
        for name in dims:
            torch.testing.assert_close(dual.solve(q)[name], factors.solve(q)[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(dual.quadratic(q), factors.quadratic(q), rtol=1e-9, atol=0)
        exact_d, exact_f = dual.condition_numbers(exact=True), factors.condition_numbers(exact=True)
        assert exact_d == pytest.approx(exact_f, rel=1e-8)
        torch.testing.assert_close(dual.factors["wide"], factors.factors["wide"], rtol=1e-9, atol=1e-12)


def test_float16_rows_get_float32_products_within_a_quarter_of_their_rounding():
    dims = {"wide": 256}
    stats = FisherStats(dims)
    g = _rows(100, 256, seed=5).half().double()  # what the recorder passes: the store's float16 rows
    g[:, :8] *= 40.0
    stats.update({"wide": g})
    ref, fast = stats.fit(1.0, dual=False), stats.fit(1.0, rows_dtype=torch.float16)
    assert fast.duals["wide"].dtype == torch.float32
    q = {"wide": _rows(6, 256, seed=6)}
    want, got = ref.solve(q)["wide"].double(), fast.solve(q)["wide"].double()
    err = ((got - want).norm(dim=1) / want.norm(dim=1)).max()
    assert err < torch.finfo(torch.float16).eps / 4


def test_rows_are_let_go_past_half_of_k_and_when_the_sums_stop_being_theirs():
    dims = {"a": 64}
    stats = FisherStats(dims)
    for batch in _batches(32, dims, seed=0):
        stats.update(batch)
    assert max_rows(64) == 32 and list(stats.fit(0.1).duals) == ["a"]
    stats.update({"a": _rows(1, 64, seed=1)})  # the 33rd row
    assert stats.fit(0.1).duals == {}
    stats.reset()  # a new period keeps its rows again
    stats.update({"a": _rows(4, 64, seed=2)})
    assert list(stats.fit(0.1).duals) == ["a"]

    loaded = FisherStats(dims)
    loaded.update({"a": _rows(4, 64, seed=3)})
    loaded.load_state_dict(stats.state_dict())  # the saved sums, not the rows it saw
    assert loaded.fit(0.1).duals == {}
    torch.testing.assert_close(loaded.fit(0.1).solve({"a": _rows(2, 64, seed=4)})["a"],
                               stats.fit(0.1).solve({"a": _rows(2, 64, seed=4)})["a"], rtol=1e-9, atol=1e-12)

    reduced = FisherStats(dims)
    reduced.update({"a": _rows(4, 64, seed=3)})
    reduced.all_reduce_(lambda t: t)  # a reduction that changes nothing keeps them
    assert list(reduced.fit(0.1).duals) == ["a"]
    reduced.all_reduce_(lambda t: t * 2)  # another rank's rows: the sums are no longer these rows'
    assert reduced.fit(0.1).duals == {}


def test_a_saved_dual_fit_loads_as_factors_that_solve_alike(tmp_path):
    stats = FisherStats({"a": 64, "b": 48})
    for batch in _batches(16, {"a": 64, "b": 48}, seed=7):
        stats.update(batch)
    fitted = stats.fit(0.3)
    assert set(fitted.duals) == {"a", "b"}
    fitted.save(tmp_path / "fit.safetensors")
    loaded = FittedFisher.load(tmp_path / "fit.safetensors")
    assert loaded.duals == {} and loaded.damping == fitted.damping
    q = {"a": _rows(3, 64, seed=8), "b": _rows(3, 48, seed=9)}
    for name in q:
        torch.testing.assert_close(loaded.solve(q)[name], fitted.solve(q)[name], rtol=1e-9, atol=1e-12)


def test_a_joint_fisher_over_many_layers_is_solved_through_its_kernel():
    dims = {"x": 40, "y": 40}  # K = 80 joint columns, 24 rows
    joint = JointFisherStats(dims)
    for batch in _batches(24, dims, seed=11):
        joint.update(batch)
    dual = joint.fit(0.2)
    assert list(dual.fitted.duals) == ["__joint__"]
    rows = torch.cat([_rows(24, 40, seed=11), _rows(24, 40, seed=12)], dim=1)
    inverse = torch.linalg.inv(_damped(rows, 24, dual.damping["__joint__"]))
    q = {"x": _rows(4, 40, seed=13), "y": _rows(4, 40, seed=14)}
    want = torch.cat([q["x"], q["y"]], dim=1) @ inverse
    got = dual.solve(q)
    torch.testing.assert_close(torch.cat([got["x"], got["y"]], dim=1), want, rtol=1e-9, atol=1e-12)


def test_the_gpu_checks_dual_solve_holds_on_the_cpu():
    """The body of ``tests/test_gpu.py``'s dual check, run here on the CPU so it cannot rot unseen
    (the GPU test runs it on CUDA, where the rows and the kernel stay on the device)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_gpu import check_dual_fisher_on

    check_dual_fisher_on("cpu")


def test_float32_products_that_overflow_are_redone_in_float64():
    # bfloat16 rows reach float32's square root of its range: G Gᵀ and G xᵀ overflow in float32
    rows, count, lam = _rows(20, 64, seed=4) * 1e20, 20, 1e38
    block = DualBlock(rows, count, lam, torch.float32)
    assert block.dtype == torch.float64  # the kernel overflowed: float64 products for this block
    damped = _damped(rows, count, lam)
    x = _rows(3, 64, seed=5) * 1e20
    want = x @ torch.linalg.inv(damped)
    assert ((block.solve(x) - want).abs().max() / want.abs().max()) < 1e-9
    quad = (want * x).sum(1)
    assert ((block.quadratic(x) - quad).abs() / quad).max() < 1e-9

    small = DualBlock(_rows(20, 64, seed=4), count, 0.1, torch.float32)  # float32 kernel, huge queries
    assert small.dtype == torch.float32
    huge = _rows(2, 64, seed=6) * 1e36
    want = huge @ torch.linalg.inv(_damped(_rows(20, 64, seed=4), count, 0.1))
    got = small.solve(huge)
    assert bool(torch.isfinite(got).all()) and ((got - want).abs().max() / want.abs().max()) < 1e-4
    assert bool(torch.isfinite(small.quadratic(huge)).all())


def _gloo_dual_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dims = {"wide": 64, "narrow": 12}
        full = {name: _rows(22, k, seed=20 + i) for i, (name, k) in enumerate(dims.items())}
        start, stop = (0, 9) if rank == 0 else (9, 22)  # uneven shares of the 22 rows
        stats = FisherStats(dims)
        keep = torch.ones(stop - start, dtype=torch.bool)
        if rank == 1:
            keep[2] = False  # row 11: dropped on its rank, zero in every rank's copy
        stats.update({name: g[start:stop] for name, g in full.items()}, keep=keep)
        stats.all_reduce_()
        fitted = stats.fit(0.3)
        q = {name: _rows(3, k, seed=30 + i) for i, (name, k) in enumerate(dims.items())}
        torch.save({"duals": sorted(fitted.duals), "count": stats.count, "damping": fitted.damping,
                    "solve": fitted.solve(q), "quad": fitted.quadratic({n: full[n][:9] for n in dims})},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_share_their_rows_so_every_rank_solves_through_the_whole_kernel(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_dual_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    dims = {"wide": 64, "narrow": 12}
    full = {name: _rows(22, k, seed=20 + i) for i, (name, k) in enumerate(dims.items())}
    counted = torch.ones(22, dtype=torch.bool)
    counted[11] = False
    q = {name: _rows(3, k, seed=30 + i) for i, (name, k) in enumerate(dims.items())}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["duals"] == ["wide"] and got["count"] == 21  # 22 rows > 6 = 12/2 for the narrow layer
        for name in dims:
            rows = full[name] * counted[:, None]
            damped = _damped(rows, 21, got["damping"][name])
            want = q[name] @ torch.linalg.inv(damped)
            torch.testing.assert_close(got["solve"][name], want, rtol=1e-9, atol=1e-12)
        quad = sum((full[n][:9] @ torch.linalg.inv(_damped(full[n] * counted[:, None], 21, got["damping"][n]))
                    * full[n][:9]).sum(1) for n in dims)
        torch.testing.assert_close(got["quad"], quad, rtol=1e-9, atol=0)


def test_a_kernel_float32_cannot_factor_is_redone_in_float64_and_a_failed_one_leaves_the_k_x_k_factor(monkeypatch):
    rows = _rows(4, 64, seed=1)
    rows[1] = rows[0]
    rows[1, 3] += 1e-3  # two near-copies: GGᵀ has an eigenvalue 1e-9 of its largest
    # N λ is below float32's rounding of GGᵀ, so whether the float32 products' kernel factors is
    # up to the CPU's summation order (it failed on one machine and factored on another): the
    # factorisation of the first kernel is made to fail, as the rounding does where it fails
    import grass_callback.dual_fisher as dual_module

    real, calls = dual_module.cholesky_ex, []

    def first_fails(matrix, *args, **kwargs):
        factor, info = real(matrix, *args, **kwargs)
        calls.append(matrix.shape)
        return (factor, torch.ones_like(info)) if len(calls) == 1 else (factor, info)

    monkeypatch.setattr(dual_module, "cholesky_ex", first_fails)
    block = DualBlock(rows, 4, 1e-6, torch.float32)
    monkeypatch.setattr(dual_module, "cholesky_ex", real)
    assert calls == [(4, 4), (4, 4)]
    assert block.dtype == torch.float64
    x = _rows(2, 64, seed=2)
    want = x @ torch.linalg.inv(_damped(rows, 4, 1e-6))
    assert ((block.solve(x) - want).abs().max() / want.abs().max()) < 1e-7

    import grass_callback.fisher as fisher_module

    def failing(*args, **kwargs):
        raise FisherError("the dual kernel G Gᵀ + NλI is not positive definite in float64")

    stats = FisherStats({"a": 64})
    stats.update({"a": _rows(8, 64, seed=3)})
    monkeypatch.setattr(fisher_module, "DualBlock", failing)
    fallback = stats.fit(0.1)
    assert fallback.duals == {}
    reference = stats.fit(0.1, dual=False)
    torch.testing.assert_close(fallback.factors["a"], reference.factors["a"], rtol=0, atol=0)


def test_a_resumed_period_rebuilt_from_the_store_is_solved_through_the_same_rows(tmp_path):
    """A resume rebuilds the period's statistics from the stored rows (``_continuity``): they keep
    those rows, so the period after a crash is solved through the kernel of exactly the rows an
    uninterrupted run would have used (batches 4..6 of 3 rows, float32 store)."""
    import sys
    from pathlib import Path

    from grass_callback.store import GradientStore

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_crash import _resumed_callback

    store = GradientStore(tmp_path / "train", layer_dims={"a": 64, "b": 6}, dtype="float32", rows_per_shard=5)
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for step in range(10):
        grads = {"a": torch.randn(3, 64, generator=gen), "b": torch.randn(3, 6, generator=gen)}
        store.append(torch.arange(step * 3, step * 3 + 3) % 12, step, grads, epoch=step // 4)
        rows[step] = grads
    store.flush()
    cb = _resumed_callback(tmp_path, store, batches_seen=7, period_start=4, last_batch_epoch=1)
    fitted = cb.fisher.fit(0.2)
    assert list(fitted.duals) == ["a"]  # 9 rows: at most 32 for "a", more than 3 for "b"
    for name in ("a", "b"):
        g = torch.cat([rows[s][name] for s in (4, 5, 6)]).double()
        q = _rows(2, g.shape[1], seed=9)
        want = q @ torch.linalg.inv(_damped(g, 9, fitted.damping[name]))
        torch.testing.assert_close(fitted.solve({name: q})[name], want, rtol=1e-6, atol=1e-9)


def test_fits_merged_under_prefixes_solve_as_their_parts_and_form_no_k_x_k_factor():
    """What checkpoint attribution does with one fit per checkpoint: a layer solved through its
    rows' kernel stays so in the merged fit."""
    small, large = FisherStats({"a": 64}), FisherStats({"a": 64})
    small.update({"a": _rows(10, 64, seed=40)})  # 10 rows: the kernel
    large.update({"a": _rows(40, 64, seed=41)})  # 40 > 32 rows: a k x k factor
    parts = {"ckpt0": small.fit(0.2), "ckpt1": large.fit(0.2)}
    merged = FittedFisher.merged(parts, requested_damping_ratio=0.2)
    assert list(merged.layers) == ["ckpt0/a", "ckpt1/a"] and list(merged.duals) == ["ckpt0/a"]
    assert "ckpt0/a" not in merged._factors
    q = _rows(3, 64, seed=42)
    for part, fit in parts.items():
        key = f"{part}/a"
        assert merged.damping[key] == fit.damping["a"]
        torch.testing.assert_close(merged.solve({key: q})[key], fit.solve({"a": q})["a"], rtol=0, atol=0)
        torch.testing.assert_close(merged.quadratic({key: q}), fit.quadratic({"a": q}), rtol=0, atol=0)
