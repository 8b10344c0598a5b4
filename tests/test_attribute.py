"""The functional pipeline: attribute() against dense references and exact (uncompressed) influence."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import IndexedDataset, attribute
from grass_callback.attribution import plans_from_store
from grass_callback.errors import CaptureError, GraSSError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_independent_refs import exact_query_rows  # noqa: E402


def make_problem(n=96, m=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    y = (x @ w + 0.5 * torch.randn(n + m, 3, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(60):  # a little training so gradients are not all alike
        opt.zero_grad()
        F.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    opt.zero_grad()
    train = DataLoader(IndexedDataset(TensorDataset(x[:n], y[:n])), batch_size=16)
    query = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=4)
    return model, train, query


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def dense_scores(result, store, damping):
    """s(i, q) = Σ_l q_l^T (F_l + λ_l I)^{-1} g_il from the stored rows, in float64."""
    rows = store.fetch(store.ids(), dtype=torch.float64)
    total = 0
    for name in store.layers:
        g = rows[name]
        fisher = g.T @ g / g.shape[0]
        lam = damping * torch.trace(fisher) / g.shape[1]
        h = fisher + lam * torch.eye(g.shape[1], dtype=torch.float64)
        total = total + result.query_grads[name].double() @ torch.linalg.solve(h, g.T)
    return rows.ids, total


def test_attribute_scores_equal_a_dense_reference(tmp_path):
    model, train, query = make_problem()
    before = [p.detach().clone() for p in model.parameters()]
    res = attribute(model, train, query, loss_fn, k=64, store_dir=tmp_path / "store", dtype="float32",
                    damping_ratio=1e-2, topk=5, progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # the query gradients against exact per-example autograd gradients through a dense sketch
    # (tests/test_independent_refs.py), so dense_scores below does not reuse the engine's output
    examples = [(x, y) for xb, yb in query for x, y in zip(xb, yb)]
    exact = exact_query_rows(model, plans_from_store(res.store), examples, net=None)
    for name, want in exact.items():
        torch.testing.assert_close(res.query_grads[name].double(), want, rtol=1e-4,
                                   atol=1e-5 * float(want.abs().max()))
    ids, dense = dense_scores(res, res.store, 1e-2)
    assert sorted(ids.tolist()) == list(range(96))
    order = dense.argsort(dim=1, descending=True)
    torch.testing.assert_close(res.scores.top_ids, ids[order[:, :5]])
    torch.testing.assert_close(res.scores.top_scores.double(), dense.gather(1, order[:, :5]), rtol=1e-4, atol=1e-6)
    value = torch.zeros(96, dtype=torch.float64).index_add_(0, ids, dense.sum(0))
    got = torch.zeros(96, dtype=torch.float64).index_add_(0, res.scores.data_value_ids, res.scores.data_value.double())
    torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5)
    # the store carries the plans, rebuilt identically for later query gradients
    plans = plans_from_store(res.store)
    assert set(plans) == {"0", "2", "4"} and plans["2"].k == 64
    assert (plans["2"].run_in, plans["2"].run_out) == (1, 1)  # "auto": 16 of 32 columns, no runs


def test_mask_run_reaches_the_plans_and_the_store(tmp_path):
    model, train, query = make_problem(n=32, m=4)
    kw = dict(k=64, dtype="float32", progress=False, self_influence=False)
    res = attribute(model, train, query, loss_fn, mask_run=1, store_dir=tmp_path / "a", **kw)
    plans = plans_from_store(res.store)
    assert all((p.run_in, p.run_out) == (1, 1) for p in plans.values())
    again = attribute(model, train, query, loss_fn, mask_run=1, store_dir=tmp_path / "b", **kw)
    torch.testing.assert_close(again.scores.top_scores, res.scores.top_scores)
    runs = plans_from_store(attribute(model, train, query, loss_fn, mask_run=2, store_dir=tmp_path / "c", **kw).store)
    assert (runs["2"].run_in, runs["2"].run_out) == (2, 2)
    assert not torch.equal(runs["2"].in_idx, plans["2"].in_idx)


def spearman(a, b):
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_compressed_scores_approach_exact_influence_as_k_grows(tmp_path):
    model, train, query = make_problem(seed=1)
    kw = dict(damping_ratio=1e-1, store_dir=None, dtype="float32", progress=False, self_influence=False)
    # k above every layer's size: identity sketches, i.e. exact block-diagonal Fisher influence
    exact = attribute(model, train, query, loss_fn, k=4096, **kw)
    assert all(p.identity_sketch and p.k == p.shape.numel for p in plans_from_store(exact.store).values())
    ids, exact_dense = dense_scores(exact, exact.store, 1e-1)
    corr = {}
    for k in (8, 32, 128):
        runs = []
        for seed in range(3):
            res = attribute(model, train, query, loss_fn, k=k, seed=seed, **kw)
            rid, dense = dense_scores(res, res.store, 1e-1)
            assert torch.equal(rid, ids)
            runs.append(sum(spearman(dense[q], exact_dense[q]) for q in range(dense.shape[0])) / dense.shape[0])
        corr[k] = sum(runs) / len(runs)
    assert corr[8] < corr[32] < corr[128], corr
    assert corr[128] > 0.8, corr


def test_attribute_errors_are_clear():
    model, train, query = make_problem(n=16, m=4)
    plain = DataLoader(TensorDataset(torch.randn(8, 10), torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(CaptureError, match="IndexedDataset"):
        attribute(model, plain, query, loss_fn, k=16, progress=False)
    with pytest.raises(GraSSError, match="query set is empty"):
        attribute(model, train, [], loss_fn, k=16, progress=False)


def test_auto_damping_with_ground_truth_picks_the_ratio_that_explains_it():
    """Targets built from the scores at r = 0.1 make 0.1 the only ratio with a perfect LDS."""
    model, train, query = make_problem(n=48, m=8, seed=3)
    kw = dict(k=32, dtype="float32", progress=False, self_influence=False)
    truth = attribute(model, train, query, loss_fn, damping_ratio=0.1, **kw)
    ids, dense = dense_scores(truth, truth.store, 0.1)                 # [m, n]
    masks = torch.rand(60, 48, generator=torch.Generator().manual_seed(0)) < 0.5
    per_example = torch.zeros(48, dense.shape[0], dtype=torch.float64)
    per_example[ids] = dense.T
    targets = masks.double() @ per_example                            # [M, m]: what the scores predict
    chosen = attribute(model, train, query, loss_fn, damping_ratio="auto", ground_truth=(masks, targets), **kw)
    assert chosen.fisher.requested_damping_ratio == pytest.approx(0.1)
    fixed = attribute(model, train, query, loss_fn, **kw)                # no ground truth: the rule
    assert fixed.fisher.requested_damping_ratio == "auto"
    rows = fixed.store.fetch(fixed.store.ids(), dtype=torch.float64)
    for name in fixed.store.layers:                                     # λ = trace(F) / min(k, N)
        g = rows[name]
        want = float(torch.trace(g.T @ g / g.shape[0])) / min(g.shape[1], g.shape[0])
        assert fixed.fisher.damping[name] == pytest.approx(want, rel=1e-6), name
