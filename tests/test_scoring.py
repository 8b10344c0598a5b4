"""Tests of grass_callback.scoring against an explicit [m, n] score matrix."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from grass_callback import scoring
from grass_callback.errors import GraSSError
from grass_callback.fisher import FisherStats, FittedFisher
from grass_callback.scoring import (
    ScoringError,
    merge_results,
    precondition_queries,
    score_chunks,
)

DIMS = {"block.attn": 9, "block.mlp": 6, "head": 4}
RATIO = 0.03


def _grads(n: int, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(n, k, generator=gen, dtype=dtype) * (1 + i)
        for i, (name, k) in enumerate(DIMS.items())
    }


def _fit(train: dict[str, torch.Tensor]) -> FittedFisher:
    stats = FisherStats(DIMS)
    stats.update(train)
    return stats.fit(RATIO)


def _damped(train: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """F_l + lambda_l I straight from the definition."""
    out = {}
    for name, g in train.items():
        n, k = g.shape
        fisher = sum(torch.outer(g[i], g[i]) for i in range(n)) / n
        out[name] = fisher + RATIO * torch.trace(fisher) / k * torch.eye(k, dtype=torch.float64)
    return out


def _dense_scores(queries, rows, damped) -> torch.Tensor:
    """s[q, i] = sum_l g_q^T A_l^{-1} g_i, with A_l^{-1} g_i by torch.linalg.solve."""
    total = 0
    for name, a in damped.items():
        solved = torch.linalg.solve(a, rows[name].to(torch.float64).T)
        total = total + queries[name].to(torch.float64) @ solved
    return total


def _chunked(ids: torch.Tensor, grads, sizes):
    start = 0
    for size in sizes:
        yield ids[start : start + size], {n: g[start : start + size] for n, g in grads.items()}
        start += size
    assert start == ids.numel()


@pytest.fixture(scope="module")
def problem():
    train = _grads(48, seed=0)
    queries = _grads(5, seed=1)
    ids = torch.randperm(48, generator=torch.Generator().manual_seed(2)) + 100
    ids[40:] = ids[:8]  # eight examples stored twice (two epochs)
    damped = _damped(train)
    return train, queries, ids, damped, _dense_scores(queries, train, damped), _fit(train)


def test_scores_match_dense_reference(problem):
    train, queries, ids, damped, dense, fisher = problem
    qp = precondition_queries(fisher, queries)
    res = score_chunks(qp, _chunked(ids, train, [48]), topk=7, full=True, self_influence=fisher)
    torch.testing.assert_close(res.full, dense, rtol=1e-9, atol=1e-10)
    assert torch.equal(res.full_ids, ids)
    assert torch.equal(res.query_ids, torch.arange(5))

    top, where = torch.topk(dense, 7, dim=1)
    assert torch.equal(res.top_ids, ids[where])
    torch.testing.assert_close(res.top_scores, top)
    bottom, where = torch.topk(dense, 7, dim=1, largest=False)
    assert torch.equal(res.bottom_ids, ids[where])
    torch.testing.assert_close(res.bottom_scores, bottom)
    assert (res.bottom_scores < 0).all()
    assert (res.bottom_scores[:, :-1] <= res.bottom_scores[:, 1:]).all()  # most negative first

    self_ref = torch.diagonal(_dense_scores(train, train, damped))
    assert torch.equal(res.self_influence_ids, ids)
    torch.testing.assert_close(res.self_influence, self_ref, rtol=1e-9, atol=1e-10)
    assert (res.self_influence > 0).all()

    column_totals = dense.sum(0)
    unique = torch.unique(ids)
    assert torch.equal(res.data_value_ids, unique) and unique.numel() == 40
    for uid, value in zip(res.data_value_ids.tolist(), res.data_value.tolist()):
        assert value == pytest.approx(column_totals[ids == uid].sum().item(), rel=1e-9, abs=1e-9)


def test_many_small_chunks_equal_one_chunk_with_bounded_memory(problem, monkeypatch):
    train, queries, ids, _, _, fisher = problem
    qp = precondition_queries(fisher, queries)
    one = score_chunks(qp, _chunked(ids, train, [48]), topk=4, self_influence=fisher)

    widths = []
    real_topk = torch.topk

    def recording_topk(x, k, *args, **kwargs):
        widths.append(x.shape[-1])
        return real_topk(x, k, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", recording_topk)
    monkeypatch.setattr(scoring._IdSums, "MIN_PENDING", 4)  # merge data values while streaming
    sizes = [3, 0, 1, 5, 2, 5, 4, 5, 5, 5, 5, 5, 3]
    seen = []
    many = score_chunks(qp, _chunked(ids, train, sizes), topk=4, self_influence=fisher, progress=seen.append)
    monkeypatch.undo()

    assert seen == [s for s in sizes if s] and sum(seen) == 48
    assert max(widths) <= 4 + max(sizes)  # never more than top-k plus one chunk per query
    assert torch.equal(many.top_ids, one.top_ids) and torch.equal(many.bottom_ids, one.bottom_ids)
    torch.testing.assert_close(many.top_scores, one.top_scores, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(many.bottom_scores, one.bottom_scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(many.self_influence_ids, one.self_influence_ids)
    torch.testing.assert_close(many.self_influence, one.self_influence, rtol=1e-12, atol=1e-12)
    assert torch.equal(many.data_value_ids, one.data_value_ids)
    torch.testing.assert_close(many.data_value, one.data_value, rtol=1e-10, atol=1e-10)


def test_duplicate_rows_are_separate_candidates_but_one_data_value():
    fisher = FittedFisher({"lin": torch.eye(3, dtype=torch.float64)}, {"lin": 1.0}, {"lin": 1.0})
    q = {"lin": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)}
    rows = torch.tensor(
        [[5.0, 1.0, 0.0], [0.5, -2.0, 0.0], [5.0, 1.0, 0.0], [-1.0, 0.25, 9.0]], dtype=torch.float64
    )
    ids = torch.tensor([7, 3, 7, 4])
    chunks = [(ids[:2], {"lin": rows[:2]}), (ids[2:], {"lin": rows[2:]})]
    res = score_chunks(precondition_queries(fisher, q), chunks, topk=2, query_ids=torch.tensor([11, 12]))
    assert fisher.layers == {"lin": 3}
    assert res.top_ids[0].tolist() == [7, 7]  # the same example from two epochs, twice
    assert res.top_scores[0].tolist() == [5.0, 5.0]
    assert res.bottom_ids[0].tolist() == [4, 3] and res.bottom_scores[0].tolist() == [-1.0, 0.5]
    assert res.bottom_ids[1].tolist() == [3, 4] and res.bottom_scores[1].tolist() == [-2.0, 0.25]
    assert res.query_ids.tolist() == [11, 12]
    # data value of id 7: (5 + 1) twice; id 3: 0.5 - 2; id 4: -1 + 0.25
    assert res.data_value_ids.tolist() == [3, 4, 7]
    assert res.data_value.tolist() == [-1.5, -0.75, 12.0]


def test_fewer_rows_than_topk_are_padded():
    fisher = FittedFisher({"lin": torch.eye(2, dtype=torch.float64)}, {"lin": 1.0}, {"lin": 1.0})
    q = precondition_queries(fisher, {"lin": torch.ones(1, 2)})
    assert q["lin"].dtype == torch.float32
    res = score_chunks(q, [(torch.tensor([0, 1]), {"lin": torch.tensor([[1.0, 2.0], [-3.0, 0.0]])})], topk=4)
    assert res.top_scores.dtype == torch.float32
    assert res.top_ids.tolist() == [[0, 1, -1, -1]] and res.bottom_ids.tolist() == [[1, 0, -1, -1]]
    assert res.top_scores[0, :2].tolist() == [3.0, -3.0] and res.top_scores[0, 2:].isnan().all()
    assert res.self_influence is None and res.full is None
    assert set(res.to_dict()) == {
        "query_ids", "top_ids", "top_scores", "bottom_ids", "bottom_scores", "data_value_ids", "data_value",
    }
    empty = score_chunks(q, [], topk=2, self_influence=fisher)
    assert empty.top_ids.tolist() == [[-1, -1]] and empty.self_influence.numel() == 0


def test_full_matrix_limit(problem):
    train, queries, ids, _, dense, fisher = problem
    qp = precondition_queries(fisher, queries)
    exact = 5 * 48 * 8
    res = score_chunks(qp, _chunked(ids, train, [20, 28]), full=True, max_full_bytes=exact)
    torch.testing.assert_close(res.full, dense, rtol=1e-9, atol=1e-10)
    with pytest.raises(ScoringError, match="max_full_bytes"):
        score_chunks(qp, _chunked(ids, train, [20, 28]), full=True, max_full_bytes=exact - 1)


@dataclass
class _StoreChunkLike:
    ids: torch.Tensor
    steps: torch.Tensor
    epochs: torch.Tensor
    grads: dict


def test_store_chunk_objects_and_float32_inputs(problem):
    train, queries, ids, _, dense, fisher = problem
    q32 = {n: g.float() for n, g in queries.items()}
    qp = precondition_queries(fisher, q32)
    chunks = [
        _StoreChunkLike(i, torch.zeros_like(i), torch.zeros_like(i), {n: g.float() for n, g in grads.items()})
        for i, grads in _chunked(ids, train, [30, 18])
    ]
    res = score_chunks(qp, chunks, full=True)
    assert res.full.dtype == torch.float32
    torch.testing.assert_close(res.full.double(), dense, rtol=1e-4, atol=1e-4)


def test_merge_results_of_disjoint_row_sets_equals_one_pass(problem):
    train, queries, ids, _, _, fisher = problem
    qp = precondition_queries(fisher, queries)
    kw = dict(topk=6, self_influence=fisher, full=True)
    whole = score_chunks(qp, _chunked(ids, train, [48]), **kw)
    parts = [score_chunks(qp, [c], **kw) for c in _chunked(ids, train, [29, 19])]
    merged = merge_results(parts)
    for name in ("top_ids", "bottom_ids", "data_value_ids", "self_influence_ids", "full_ids", "query_ids"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    for name in ("top_scores", "bottom_scores", "data_value", "self_influence", "full"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-10, atol=1e-10)
    padded = merge_results([score_chunks(qp, [c], topk=6) for c in _chunked(ids, train, [2, 1, 45])])
    torch.testing.assert_close(padded.top_scores, whole.top_scores, rtol=1e-10, atol=1e-10)


def test_validation_errors(problem):
    train, queries, ids, _, _, fisher = problem
    qp = precondition_queries(fisher, queries)
    chunk = next(_chunked(ids, train, [48]))
    assert issubclass(ScoringError, GraSSError)
    with pytest.raises(ScoringError, match="no queries"):
        precondition_queries(fisher, {n: g[:0] for n, g in queries.items()})
    with pytest.raises(ScoringError, match="no queries"):
        score_chunks({n: g[:0] for n, g in qp.items()}, [chunk])
    with pytest.raises(ScoringError, match="non-empty"):
        score_chunks({}, [chunk])
    with pytest.raises(ScoringError, match="missing \\['head'\\]"):
        score_chunks(qp, [(chunk[0], {n: g for n, g in chunk[1].items() if n != "head"})])
    with pytest.raises(ScoringError, match="unexpected \\['other'\\]"):
        precondition_queries(fisher, {**queries, "other": torch.zeros(5, 2)})
    with pytest.raises(ScoringError, match="Tensor\\[n, 4\\]"):
        score_chunks(qp, [(chunk[0], {**chunk[1], "head": torch.zeros(48, 3)})])
    with pytest.raises(ScoringError, match="48 ids"):
        score_chunks(qp, [(chunk[0], {n: g[:40] for n, g in chunk[1].items()})])
    with pytest.raises(ScoringError, match="integer"):
        score_chunks(qp, [(chunk[0].double(), chunk[1])])
    with pytest.raises(ScoringError, match="chunk #0"):
        score_chunks(qp, [chunk[1]])
    with pytest.raises(ScoringError, match="query_ids"):
        score_chunks(qp, [chunk], query_ids=torch.arange(4))
    with pytest.raises(ScoringError, match="topk"):
        score_chunks(qp, [chunk], topk=-1)
    other = FisherStats({"lin": 2})
    other.update({"lin": torch.ones(3, 2)})
    with pytest.raises(ScoringError, match="self_influence"):
        score_chunks(qp, [chunk], self_influence=other.fit())
    with pytest.raises(ScoringError, match="non-finite"):
        bad = {n: g.clone() for n, g in chunk[1].items()}
        bad["head"][3, 0] = float("nan")
        score_chunks(qp, [(chunk[0], bad)])


def _least_squares_problem():
    gen = torch.Generator().manual_seed(3)
    d, n = 5, 12
    f64 = dict(generator=gen, dtype=torch.float64)
    x, y = torch.randn(n, d, **f64), torch.randn(n, **f64)
    xq, yq = torch.randn(3, d, **f64), torch.randn(3, **f64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)

    def loss(weights, xs, ys):  # per-example 0.5 * (x.w - y)^2
        return 0.5 * (xs @ weights - ys) ** 2

    def grads(xs, ys):  # per-example gradients by autograd, one example at a time
        rows = []
        for xi, yi in zip(xs, ys):
            wi = w.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(wi, xi, yi), wi)
            rows.append(g)
        return torch.stack(rows)

    return w, loss, (x, y), (xq, yq), grads(x, y), grads(xq, yq)


@pytest.mark.parametrize("ratio", [0.1, 1e7])
def test_positive_score_means_training_on_the_example_lowers_the_query_loss(ratio):
    w, loss, (x, y), (xq, yq), g_train, g_query = _least_squares_problem()
    stats = FisherStats({"w": w.numel()})
    stats.update({"w": g_train})
    fisher = stats.fit(ratio)
    res = score_chunks(
        precondition_queries(fisher, {"w": g_query}), [(torch.arange(len(x)), {"w": g_train})], full=True
    )
    lr = 1e-6
    for i in range(len(x)):
        # the preconditioned step on example i: w - lr (F + lambda I)^{-1} g_i
        step = fisher.solve({"w": g_train[i : i + 1]})["w"][0]
        change = loss(w - lr * step, xq, yq) - loss(w, xq, yq)  # [queries]
        assert torch.equal(torch.sign(change), -torch.sign(res.full[:, i]))
        torch.testing.assert_close(change, -lr * res.full[:, i], rtol=1e-3, atol=1e-14)
    if ratio > 1e6:
        # damping dominates: scores are the raw dot products over lambda, and a plain SGD step on
        # a proponent lowers the query loss
        lam = fisher.damping["w"]
        torch.testing.assert_close(res.full * lam, g_query @ g_train.T, rtol=1e-5, atol=1e-12)
        best = res.top_ids[:, 0]
        for q in range(len(xq)):
            before = loss(w, xq[q], yq[q])
            after = loss(w - lr * g_train[best[q]], xq[q], yq[q])
            assert after < before
