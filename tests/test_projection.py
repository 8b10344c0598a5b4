"""Plans: seeded, rebuilt bit-identically, validated; baselines keep the same interface."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from grass_callback.errors import PlanError
from grass_callback.projection import (
    PLAN_KINDS,
    FactGraSSPlan,
    GraSSPlan,
    LayerShape,
    LoGraPlan,
    MaskPlan,
    SJLTPlan,
    derive_generator,
    make_plan,
    materialize,
    plan_from_state,
    random_mask,
    run_mask,
    sjlt_apply,
    sjlt_tables,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_independent_refs import dense_sketch  # noqa: E402


def test_random_mask_sorted_without_replacement() -> None:
    idx = random_mask(1000, 300, derive_generator(3, "layer", "m"))
    assert idx.dtype == torch.int64
    assert torch.all(idx[1:] > idx[:-1])  # strictly increasing: sorted and distinct
    assert idx.min() >= 0 and idx.max() < 1000


def _runs(idx: torch.Tensor) -> int:
    """Number of maximal runs of consecutive integers in a sorted index tensor."""
    return 1 + int((idx[1:] != idx[:-1] + 1).sum())


@pytest.mark.parametrize("n, size, run", [(1000, 64, 8), (4096, 64, 8), (129, 64, 8), (65, 64, 8),
                                          (37, 10, 4), (50, 50, 8)])
def test_run_mask_keeps_sorted_distinct_runs(n: int, size: int, run: int) -> None:
    idx = run_mask(n, size, run, derive_generator(1, "layer", "m"))
    assert idx.dtype == torch.int64 and idx.numel() == size
    assert torch.all(idx[1:] > idx[:-1]) and idx.min() >= 0 and idx.max() < n
    # ceil(size/run) runs, + 1 where the wrap-around or the short end run splits one
    assert _runs(idx) <= -(-size // run) + 2
    assert torch.equal(run_mask(n, size, 1, derive_generator(1, "layer", "m")),
                       random_mask(n, size, derive_generator(1, "layer", "m")))


@pytest.mark.parametrize("n, size, run", [(13, 5, 4), (40, 16, 8), (33, 3, 2)])
def test_run_mask_keeps_every_coordinate_with_probability_size_over_n(n: int, size: int, run: int) -> None:
    draws = 6000
    gen = torch.Generator().manual_seed(5)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts[run_mask(n, size, run, gen)] += 1
    p = size / n
    sigma = (p * (1 - p) / draws) ** 0.5
    assert (counts / draws - p).abs().max() < 5 * sigma  # binomial spread, no position favoured


def test_factgrass_masks_come_in_runs_by_default_and_old_states_stay_coordinatewise() -> None:
    plan = FactGraSSPlan(4096, 4096, name="wide")
    assert (plan.run_in, plan.run_out) == (8, 8)
    assert _runs(plan.in_idx) <= 10 and _runs(plan.out_idx) <= 10
    per_coord = FactGraSSPlan(4096, 4096, name="wide", mask_run=1)
    assert _runs(per_coord.in_idx) > 50  # 64 scattered columns of 4096
    config, tensors = per_coord.to_state()
    assert config["mask_run"] == [1, 1]
    del config["mask_run"]  # a plan saved before runs existed
    assert plan_from_state(config, tensors) == per_coord
    small = FactGraSSPlan(256, 64, k=256, name="s")  # 32 a side: at least 8 runs
    assert (small.run_in, small.run_out) == (4, 1)  # no runs where a mask keeps over a quarter
    assert (FactGraSSPlan(128, 128, name="n").run_in, FactGraSSPlan(256, 256, name="n").run_in) == (1, 8)
    assert FactGraSSPlan(4096, 512, name="p", mask_run=(2, 16)).config()["mask_run"] == [2, 16]


@pytest.mark.parametrize("bad", [0, -3, "big", (1, 2, 3), 1.5, True])
def test_mask_run_validation(bad) -> None:
    with pytest.raises(PlanError, match="mask_run"):
        FactGraSSPlan(64, 64, k=256, mask_run=bad)


def test_generators_depend_on_seed_name_and_purpose() -> None:
    draws = {key: torch.randint(0, 1 << 30, (8,), generator=derive_generator(*key))
             for key in [(0, "a", "p"), (0, "a", "p2"), (0, "b", "p"), (1, "a", "p")]}
    again = torch.randint(0, 1 << 30, (8,), generator=derive_generator(0, "a", "p"))
    assert torch.equal(draws[(0, "a", "p")], again)
    values = [tuple(v.tolist()) for v in draws.values()]
    assert len(set(values)) == len(values)


@pytest.mark.parametrize("c", [1, 2, 4])
def test_sjlt_targets_distinct_per_coordinate(c: int) -> None:
    bucket, sign = sjlt_tables(500, 64, c, derive_generator(0, "x", "s"))
    assert bucket.dtype == torch.int32 and bucket.shape == (c, 500)
    assert set(sign.unique().tolist()) == {-1, 1}
    assert bucket.min() >= 0 and bucket.max() < 64
    # row j stays inside block j, so the c targets of one coordinate never collide
    for j in range(c):
        assert bucket[j].min() >= j * 64 // c and bucket[j].max() < (j + 1) * 64 // c


def test_factgrass_defaults_follow_the_paper_ratio() -> None:
    plan = FactGraSSPlan(768, 3072, bias=True, name="mlp")
    assert (plan.k, plan.k_in, plan.k_out) == (1024, 64, 64)
    assert plan.in_idx.max() <= 768 and plan.out_idx.max() < 3072
    small = FactGraSSPlan(64, 10, bias=True, name="head")  # 650 entries <= k: kept exactly
    assert (small.k, small.k_in, small.k_out) == (650, 65, 10)
    assert small.identity_sketch and torch.equal(small.in_idx, torch.arange(65))
    narrow = FactGraSSPlan(4096, 10, name="narrow")  # one side clipped, the other widened
    assert narrow.k_out == 10 and narrow.k_in * narrow.k_out >= narrow.k == 1024


def test_identity_sketch_keeps_small_layer_gradients_exactly() -> None:
    plan = FactGraSSPlan(5, 3, bias=True, k=64, name="tiny")
    g = torch.randn(4, 3, 6, dtype=torch.float64)
    assert torch.equal(plan.project_gradient(g), g.flatten(1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(k_in=100), "k_in"),
    (dict(k_out=11), "k_out"),
    (dict(k_in=8, k_out=8, k=128), "below k"),
    (dict(k=0), "positive"),
    (dict(c=3, k=64, k_in=16, k_out=8), "dividing k"),
])
def test_factgrass_plan_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        FactGraSSPlan(64, 10, bias=True, **kwargs)


@pytest.mark.parametrize("kind", sorted(PLAN_KINDS))
def test_every_plan_rebuilds_identically_from_its_state(kind: str) -> None:
    shape = LayerShape(12, 9, True)
    plan = make_plan(kind, shape, k=16, seed=7, name="blocks.0.attn")
    config, tensors = plan.to_state()
    again = plan_from_state(config, tensors)
    assert again == plan
    assert not (make_plan(kind, shape, k=16, seed=8, name="blocks.0.attn") == plan)
    g = torch.randn(3, 9, 13, dtype=torch.float64)
    assert torch.equal(plan.project_gradient(g), again.project_gradient(g))


def test_plan_from_state_refuses_tensors_of_another_plan() -> None:
    config, tensors = FactGraSSPlan(30, 20, k=16, k_in=8, k_out=4, seed=1, name="a").to_state()
    other = FactGraSSPlan(30, 20, k=16, k_in=8, k_out=4, seed=2, name="a").tensors()
    with pytest.raises(PlanError, match="differs"):
        plan_from_state(config, other)


@pytest.mark.parametrize("kind", sorted(PLAN_KINDS))
def test_compress_from_factors_equals_projecting_the_gradient(kind: str) -> None:
    shape = LayerShape(10, 7, True)
    plan = make_plan(kind, shape, k=16, seed=0, name="l")
    x, d = torch.randn(3, 5, 10, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    expected = plan.project_gradient(materialize(x, d, bias=True))
    torch.testing.assert_close(plan.compress(x, d), expected, rtol=1e-10, atol=1e-12)


def test_baselines_compose_as_described() -> None:
    dim = 200
    grass = GraSSPlan(dim, k=16, k_mask=64, name="g")
    g = torch.randn(4, dim, dtype=torch.float64)
    masked = g[:, grass.index]
    manual = torch.zeros(4, 16, dtype=torch.float64)
    manual.index_add_(1, grass.bucket[0].long(), masked * grass.sign[0].double())
    torch.testing.assert_close(grass.project(g), manual)
    mask = MaskPlan(dim, k=16, name="m")
    assert torch.equal(mask.project(g), g[:, mask.index])
    sjlt = SJLTPlan(dim, k=16, c=2, name="s")
    # each coordinate lands in two buckets with weight ±1/sqrt(2): column norms are 1
    basis = torch.eye(dim, dtype=torch.float64)
    norms = sjlt.project(basis).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(dim, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_logra_factor_form_equals_dense_form() -> None:
    plan = LoGraPlan(20, 12, bias=False, k=16, seed=3, name="l")
    x, d = torch.randn(2, 6, 20, dtype=torch.float64), torch.randn(2, 6, 12, dtype=torch.float64)
    g = materialize(x, d, bias=False)
    dense = torch.stack([torch.kron(plan.p_out.double(), plan.p_in.double()) @ gi.flatten() for gi in g])
    torch.testing.assert_close(plan.compress(x, d), dense)
    with pytest.raises(PlanError, match="square"):
        LoGraPlan(20, 12, k=15)


def test_sketch_keeps_inner_products_within_the_jl_variance() -> None:
    """<Su, Sv> estimates <u, v> with variance <= (|u|^2 |v|^2 + <u,v>^2) / k for a CountSketch."""
    torch.manual_seed(1)
    dim, pairs, plans = 4096, 64, 12
    u = torch.randn(pairs, dim, dtype=torch.float64)
    v = 0.5 * u + torch.randn(pairs, dim, dtype=torch.float64)
    exact = (u * v).sum(1)
    bound_num = (u.norm(dim=1) ** 2 * v.norm(dim=1) ** 2 + exact**2)
    mse_by_k = {}
    for k in (64, 256, 1024):
        errs = []
        for s in range(plans):
            plan = SJLTPlan(dim, k=k, seed=s, name="jl")
            errs.append((plan.project(u) * plan.project(v)).sum(1) - exact)
        err = torch.stack(errs)
        mse = (err**2).mean(0)
        # mean over 768 draws of a variance bound: allow 30% sampling slack
        assert (mse / (bound_num / k)).mean() < 1.3, k
        mse_by_k[k] = (mse / bound_num).mean().item()
    assert mse_by_k[64] > 2 * mse_by_k[256] > 4 * mse_by_k[1024]


def test_factgrass_sketch_keeps_masked_inner_products() -> None:
    """FactGraSS estimates the inner product of the *masked* gradients; the error falls with k."""
    torch.manual_seed(2)
    x = torch.randn(16, 4, 256, dtype=torch.float64)
    d = torch.randn(16, 4, 128, dtype=torch.float64)
    g = materialize(x, d, bias=False)
    rel = {}
    for k in (64, 256, 1024):
        errs = []
        for s in range(6):
            plan = FactGraSSPlan(256, 128, k=k, k_in=64, k_out=64, seed=s, name="f")
            m = plan.mask_gradient(g)
            sk = plan.compress(x, d, impl="torch")
            errs.append(((sk @ sk.T) - (m @ m.T)) / (m.norm(dim=1)[:, None] * m.norm(dim=1)[None, :]))
        rel[k] = torch.stack(errs).pow(2).mean().item()
        assert rel[k] < 2.0 / k
    assert rel[64] > rel[256] > rel[1024]


@pytest.mark.parametrize("c", [1, 2, 4])
def test_sjlt_and_factgrass_projections_equal_dense_matrices_built_by_loops(c: int) -> None:
    """``sjlt_apply`` and ``FactGraSSPlan.project_gradient`` against dense matrices filled entry by
    entry from the tables: ``M[bucket[j, e], e] += sign[j, e] / sqrt(c)`` (so a wrong ``1/c`` or a
    dropped sign fails for ``c > 1`` too)."""
    gen = torch.Generator().manual_seed(c)
    bucket, sign = sjlt_tables(90, 32, c, derive_generator(1, "d", "s"))
    dense = torch.zeros(32, 90, dtype=torch.float64)
    for j in range(c):
        for e in range(90):
            dense[int(bucket[j, e]), e] += int(sign[j, e]) / c ** 0.5
    v = torch.randn(5, 90, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sjlt_apply(v, bucket, sign, 32), v @ dense.T, rtol=1e-6, atol=1e-7)
    plan = FactGraSSPlan(13, 9, True, k=24, k_in=8, k_out=6, c=c, seed=2, name="l", mask_run=1)
    grads = torch.randn(3, 9, 14, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(plan.project_gradient(grads), grads.reshape(3, -1) @ dense_sketch(plan).T,
                               rtol=1e-6, atol=1e-7)


def test_mask_sizes_default_budget_is_four_k() -> None:
    """``mask_sizes`` called with its defaults: sides ``2 sqrt(k)`` (``k' = 4k``); a narrow factor
    keeps all its columns and the other widens to ``ceil(4k / width)``."""
    from grass_callback.projection import mask_sizes

    assert mask_sizes(1024, 769, 3072) == (64, 64)
    assert mask_sizes(1024, 769, 3072, oversample=1.0) == (32, 32)
    assert mask_sizes(1024, 17, 3072) == (17, 241)  # ceil(4096 / 17)
    assert mask_sizes(256, 1000, 20) == (52, 20)    # ceil(1024 / 20)


def test_a_vocabulary_head_spends_the_mask_budget_on_its_output() -> None:
    """Output at least 8x wider than a non-narrow input: ``k_out = min(d_out, 16 side)``, ``k_in =
    ceil(side² / k_out)``, so the budget ``side²`` is still met; other layers keep square masks;
    ``wide_output_skew=1`` is the square rule everywhere; saved plans keep their sizes."""
    from grass_callback.projection import mask_sizes, plan_from_state

    side = 64  # k = 1024
    for d_in, d_out in [(128, 1024), (96, 1024), (768, 50257), (256, 8192), (64, 512)]:
        k_in, k_out = mask_sizes(1024, d_in, d_out)
        assert k_out == min(d_out, 16 * side) and k_in == -(-side * side // k_out), (d_in, d_out)
        assert k_in * k_out >= side * side
        assert mask_sizes(1024, d_in, d_out, wide_output_skew=1.0) == (64, 64)
    assert mask_sizes(1024, 64, 512) == (8, 512)      # the whole output, 8 inputs
    assert mask_sizes(1024, 128, 1016) == (64, 64)    # 7.9x wider: not a head
    assert mask_sizes(1024, 25, 512) == (25, 164)     # a narrow input keeps the narrow-factor rule
    assert mask_sizes(4096, 128, 1024) == (16, 1024)  # side 128: 16 side > 1024 outputs, all kept
    assert mask_sizes(1024, 128, 1024, wide_output_skew=4) == (16, 256)  # the default before
    head = FactGraSSPlan(128, 1024, k=1024, seed=3, name="lm_head")
    assert (head.k_in, head.k_out, head.k) == (4, 1024, 1024)
    again = plan_from_state(*head.to_state())
    assert (again.k_in, again.k_out) == (4, 1024) and torch.equal(again.in_idx, head.in_idx)
    old = FactGraSSPlan(128, 1024, k=1024, seed=3, name="lm_head", wide_output_skew=4)  # a plan saved before
    assert (plan_from_state(*old.to_state()).k_in, plan_from_state(*old.to_state()).k_out) == (16, 256)
    with pytest.raises(PlanError, match="wide_output_skew"):
        mask_sizes(1024, 128, 1024, wide_output_skew=0.5)


def test_vocabulary_head_plan_matches_the_dense_reference() -> None:
    """The skewed masks through the compress path against the plan's own dense projection of the
    exact gradient (float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, 512, generator=gen, dtype=torch.float64)
    exact = torch.einsum("bto,bti->boi", g, x)
    # side 16: the default skew 16 keeps 1 x 256 (one input column), skew 4 keeps 4 x 64
    for skew, sizes in ((16.0, (1, 256)), (4.0, (4, 64))):
        plan = FactGraSSPlan(32, 512, k=64, seed=1, name="head", wide_output_skew=skew)
        assert (plan.k_in, plan.k_out) == sizes
        torch.testing.assert_close(plan.compress(x, g).double(), plan.project_gradient(exact), rtol=1e-6, atol=1e-8)


def test_one_token_plan_survives_a_save_and_plans_saved_before_it_keep_their_masks():
    """``to_state`` carries the one-token sizes, so a store's readers compress a one-token layer's
    queries as its rows were; a plan saved before one-token plans existed (no key) loads with
    none, so its one-token inputs keep the masks its rows were made with."""
    plan = FactGraSSPlan(48, 256, True, k=1024, seed=1, name="fc1")
    one = plan.input_plan(token_axis=False)
    assert (one.k_in, one.k_out, one.c) == (49, 256, 2) and plan.input_plan(token_axis=True) is plan
    config, tensors = plan.to_state()
    again = plan_from_state(config, tensors)
    assert again == plan and again.input_plan(token_axis=False) == one
    old = {key: value for key, value in config.items() if key != "one_token"}
    before = plan_from_state(old, tensors)
    assert before.input_plan(token_axis=False) is before
    off = FactGraSSPlan(48, 256, True, k=1024, seed=1, name="fc1", one_token=False)
    assert off.input_plan(token_axis=False) is off and "one_token" not in off.config()
    pinned = FactGraSSPlan(48, 256, True, k=1024, k_in=49, k_out=84, seed=1, name="fc1")
    assert pinned.input_plan(token_axis=False) is pinned  # sizes given: used for every input
    small = FactGraSSPlan(10, 8, True, k=1024)  # kept exactly anyway
    assert small.input_plan(token_axis=False) is small


def test_only_one_token_added_tells_an_old_store_from_other_plans():
    from grass_callback.projection import only_one_token_added

    new = {"fc": FactGraSSPlan(48, 256, True, k=1024, seed=1, name="fc").config()}
    old = {"fc": {key: value for key, value in new["fc"].items() if key != "one_token"}}
    assert only_one_token_added(old, new)
    assert not only_one_token_added(new, new)  # nothing differs
    assert not only_one_token_added({"fc": {**old["fc"], "seed": 2}}, new)  # another seed as well
    assert not only_one_token_added(old, {**new, "fc2": new["fc"]})  # other layers
