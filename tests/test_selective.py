"""FJLT plan, selective-mask FactGraSS plan and mask learning (grass_callback.selective)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grass_callback.capture import LayerTaps
from grass_callback.errors import PlanError
from grass_callback.projection import (
    FactGraSSPlan, FJLTPlan, LayerShape, SelectiveFactGraSSPlan, fwht, make_plan, materialize, plan_from_state)
from grass_callback.selective import (
    collect_factors, learn_factor_masks, learn_flat_mask, mask_correlation, selective_factgrass_plan, selective_plans)


pytestmark = pytest.mark.usefixtures("one_thread")


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ----------------------------------------------------------------------------- FJLT


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fwht_matches_dense_hadamard(n: int) -> None:
    v = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(fwht(v), v @ _hadamard(n) / math.sqrt(n), atol=1e-12)
    with pytest.raises(PlanError):
        fwht(torch.randn(2, 12))


@pytest.mark.parametrize("dim,k", [(13, 5), (16, 16), (77, 32)])
def test_fjlt_matches_dense_reference(dim: int, k: int) -> None:
    plan = FJLTPlan(dim, k=k, seed=3, name="layer")
    n = plan.padded
    assert n == 1 << (dim - 1).bit_length()
    dense = _hadamard(n)[plan.index][:, :dim] / math.sqrt(n) * plan.sign.to(torch.float64) * math.sqrt(n / k)
    x = torch.randn(4, dim, dtype=torch.float64)
    assert torch.allclose(plan.project(x), x @ dense.T, atol=1e-12)


def test_fjlt_is_an_isometry_in_expectation() -> None:
    dim, k = 12, 4
    # E over the plan of P^T P = I, estimated over many seeds
    acc = torch.zeros(dim, dim, dtype=torch.float64)
    seeds = 600
    eye = torch.eye(dim, dtype=torch.float64)
    for seed in range(seeds):
        p = FJLTPlan(dim, k=k, seed=seed).project(eye).T  # [k, dim] matrix of the map
        acc += p.T @ p
    mean = acc / seeds
    assert torch.allclose(mean.diagonal(), torch.ones(dim, dtype=torch.float64), atol=0.15)
    assert (mean - torch.diag(mean.diagonal())).abs().max() < 0.2
    # given the signs, the average over all coordinate subsets is exact: ||H D g|| = ||g||
    plan = FJLTPlan(dim, k=k, seed=0)
    g = torch.randn(1, dim, dtype=torch.float64)
    signed = torch.nn.functional.pad(g * plan.sign.to(torch.float64), (0, plan.padded - dim))
    assert float(fwht(signed).square().sum()) == pytest.approx(float(g.square().sum()))


def test_fjlt_plan_state_and_factory() -> None:
    shape = LayerShape(10, 7, True)
    plan = make_plan("fjlt", shape, k=32, seed=1, name="fc")
    assert isinstance(plan, FJLTPlan) and plan.dim == shape.numel
    assert plan_from_state(*plan.to_state()) == plan
    x, d = torch.randn(5, 10), torch.randn(5, 7)
    assert torch.allclose(plan.compress(x, d), plan.project_gradient(materialize(x, d, True)))
    with pytest.raises(PlanError):
        FJLTPlan(10, k=17)


# ----------------------------------------------------------------------------- selective plan


def test_selective_plan_uses_learned_masks_and_the_random_plans_sketch() -> None:
    plan = SelectiveFactGraSSPlan(20, 12, True, k=16, in_idx=[20, 3, 7, 11, 0, 5], out_idx=[9, 1, 4, 2],
                                  seed=4, name="fc")
    assert plan.in_idx.tolist() == [0, 3, 5, 7, 11, 20] and plan.out_idx.tolist() == [1, 2, 4, 9]
    assert plan.k == 16 and not plan.identity_sketch
    twin = FactGraSSPlan(20, 12, True, k=16, k_in=6, k_out=4, seed=4, name="fc")
    assert torch.equal(plan.bucket, twin.bucket) and torch.equal(plan.sign, twin.sign)
    rebuilt = plan_from_state(*plan.to_state())
    assert rebuilt == plan and isinstance(rebuilt, SelectiveFactGraSSPlan)
    x, d = torch.randn(3, 2, 20), torch.randn(3, 2, 12)
    want = plan.project_gradient(materialize(x, d, True))
    assert torch.allclose(plan.compress(x, d, impl="torch"), want, atol=1e-5)
    assert torch.allclose(plan.compress(x, d), want, atol=1e-5)
    unlearned = SelectiveFactGraSSPlan(20, 12, True, k=16, seed=4, name="fc")  # the random plan's masks
    random_plan = FactGraSSPlan(20, 12, True, k=16, seed=4, name="fc")
    assert torch.equal(unlearned.in_idx, random_plan.in_idx) and torch.equal(unlearned.out_idx, random_plan.out_idx)
    with pytest.raises(PlanError, match="both"):
        SelectiveFactGraSSPlan(20, 12, True, k=16, in_idx=[1, 2])
    small = SelectiveFactGraSSPlan(20, 12, False, k=64, in_idx=[1, 2], out_idx=[3, 4, 5])
    assert small.k == 6 and small.identity_sketch
    for bad in ([1, 1], [21], []):
        with pytest.raises(PlanError):
            SelectiveFactGraSSPlan(20, 12, False, k=4, in_idx=bad, out_idx=[0])


def test_selective_plans_work_in_layer_taps() -> None:
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum")  # noqa: E731
    factors = collect_factors(model, [(x[:20], y[:20]), (x[20:], y[20:])], loss_fn, reduction="sum",
                              max_examples=32)
    assert factors["0"][0].shape == (32, 1, 12) and factors["2"][1].shape == (32, 1, 3)
    # the factors are each example's own gradient
    per_example = torch.autograd.grad(loss_fn(model, (x[:1], y[:1])), model[0].weight)[0]
    assert torch.allclose(materialize(*factors["0"], bias=True)[0, :, :12], per_example, atol=1e-5)
    shapes = {"0": LayerShape(12, 16, True), "2": LayerShape(16, 3, True)}
    plans = selective_plans(factors, shapes, k=16, seed=0, steps=20)
    assert plans["2"].in_idx.numel() == 17 and plans["2"].out_idx.numel() == 3  # small layer: whole masks
    taps = LayerTaps(model, plans=plans)
    with taps, taps.recording():
        grads = taps.gradients(loss_fn(model, (x[:4], y[:4])))
    assert grads["0"].shape == (4, plans["0"].k)


# ----------------------------------------------------------------------------- learning


def _signal_case(N: int = 192, d_in: int = 48, d_out: int = 40, seed: int = 0):
    """A few coordinates on each side carry large, structured factors; the rest small noise."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(N, d_in, generator=gen)
    d = 0.3 * torch.randn(N, d_out, generator=gen)
    x[:, 10:15] += 3 * torch.randn(N, 3, generator=gen) @ torch.randn(3, 5, generator=gen)
    d[:, 20:24] += 3 * torch.randn(N, 3, generator=gen) @ torch.randn(3, 4, generator=gen)
    return x, d


def test_selective_mask_keeps_correlation_better_than_random() -> None:
    x, d = _signal_case()
    masks = learn_factor_masks(x, d, 6, 6, steps=120)
    assert set(range(10, 15)) <= set(masks.in_idx.tolist()) and set(range(20, 24)) <= set(masks.out_idx.tolist())
    learned = mask_correlation(x, d, masks.in_idx, masks.out_idx)
    gen = torch.Generator().manual_seed(1)
    random = [mask_correlation(x, d, torch.randperm(48, generator=gen)[:6].sort().values,
                               torch.randperm(40, generator=gen)[:6].sort().values) for _ in range(8)]
    assert learned > 0.95 and learned > max(random) + 0.1
    assert masks.correlation == pytest.approx(learned, abs=1e-9)


def test_flat_selective_mask_finds_the_signal_coordinates() -> None:
    gen = torch.Generator().manual_seed(2)
    g = 0.2 * torch.randn(160, 60, generator=gen)
    g[:, [3, 17, 42]] += 2 * torch.randn(160, 3, generator=gen)
    assert learn_flat_mask(g, 3, steps=120).tolist() == [3, 17, 42]


def test_selective_factgrass_plan_sizes_match_the_random_plan() -> None:
    x, d = _signal_case(N=64)
    shape = LayerShape(48, 40, True)
    plan = selective_factgrass_plan(x, d, shape, k=64, seed=2, name="fc", steps=30)
    ref = FactGraSSPlan(48, 40, True, k=64, seed=2, name="fc")
    assert (plan.k, plan.k_in, plan.k_out) == (ref.k, ref.k_in, ref.k_out)
    assert torch.equal(plan.bucket, ref.bucket)
