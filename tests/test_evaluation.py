"""LDS, mislabel detection, in-memory influence and damping choice (grass_callback.evaluation)."""

from __future__ import annotations

import math

import pytest
import torch

from grass_callback.errors import FisherError, GraSSError
from grass_callback.evaluation import (
    DAMPING_GRID, EvaluationError, KernelInfluence, LinearDatamodelingScore, MislabelDetection, choose_damping,
    dot_product_scores, fisher_scores, lds, lds_per_query, library_scores_for, mislabel_detection, precision_at_k,
    subset_predictions)
from grass_callback.fisher import FisherStats
from grass_callback.scoring import precondition_queries, score_chunks


pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_case(M: int = 12, n: int = 8, m: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(M, n, generator=gen) < 0.5
    # integer scores: subset sums are exact, so equal subsets tie in predictions and targets alike
    scores = torch.randint(-50, 50, (n, m), generator=gen).to(torch.float64)
    return masks, scores, subset_predictions(masks, scores)


# ----------------------------------------------------------------------------- Spearman / LDS


def test_spearman_known_ranks() -> None:
    preds = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    targets = torch.tensor([[1.0], [3.0], [2.0], [4.0]])
    # rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert float(lds_per_query(preds, targets)[0]) == pytest.approx(0.8)


def test_spearman_ties_get_average_ranks() -> None:
    preds = torch.tensor([[1.0, 4.0], [2.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    targets = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    # column 0 ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5); column 1 reversed
    got = lds_per_query(preds, targets)
    assert float(got[0]) == pytest.approx(4.5 / math.sqrt(4.5 * 5), abs=1e-6)
    assert float(got[1]) == pytest.approx(-1.0)


def test_perfect_scores_give_one_and_reversed_minus_one() -> None:
    masks, scores, sums = _linear_case()
    assert float(lds(masks, sums, scores)) == pytest.approx(1.0)
    assert float(lds(masks, -sums, scores)) == pytest.approx(-1.0)
    per_query = lds(masks, sums, scores, reduction="none")
    assert per_query.shape == (5,) and torch.allclose(per_query, torch.ones(5, dtype=torch.float64))


def test_loss_targets_are_negated() -> None:
    """Positive scores mean lower loss: a loss that falls as the summed score rises is a perfect LDS."""
    masks, scores, sums = _linear_case()
    losses = 3.0 - sums
    assert float(lds(masks, losses, scores, target="loss")) == pytest.approx(1.0)
    assert float(lds(masks, losses, scores, target="margin")) == pytest.approx(-1.0)


def _hand_spearman(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per column: Pearson correlation of the ranks (inputs without ties), by plain torch."""
    def ranks(t):
        return t.argsort(0).argsort(0).double()

    a, b = ranks(preds), ranks(targets)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


@pytest.mark.parametrize("signal", [0.0, 0.3, 3.0])
def test_lds_equals_a_hand_spearman_of_subset_sums(signal: float) -> None:
    """Random scores give an LDS near zero, planted ones a high LDS, and both equal the hand value
    (so a function returning 0, or the wrong correlation, fails)."""
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(200, 50, generator=gen) < 0.5
    scores = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    sums = masks.double() @ scores                                   # [200, 40] subset-sum predictions
    targets = signal * sums + torch.randn(200, 40, generator=gen, dtype=torch.float64)
    want = _hand_spearman(sums, targets)
    got = lds(masks, targets, scores, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # torchmetrics ranks in float32
    mean = float(lds(masks, targets, scores))
    assert mean == pytest.approx(float(want.mean()), abs=1e-6)
    if signal == 0.0:
        assert abs(mean) < 0.05
    else:
        assert mean > (0.5 if signal < 1 else 0.95)


def test_lds_input_errors() -> None:
    masks, scores, sums = _linear_case()
    with pytest.raises(EvaluationError, match="bool"):
        lds(masks.float(), sums, scores)
    with pytest.raises(EvaluationError, match="rows"):
        lds(masks, sums, scores[:-1])
    with pytest.raises(EvaluationError, match="subset models"):
        lds(masks, sums[:-1], scores)
    with pytest.raises(EvaluationError, match="target"):
        lds(masks, sums, scores, target="accuracy")
    with pytest.raises(GraSSError):  # one catchable type
        lds(masks, sums, scores, reduction="sum")


def test_metric_equals_functional_on_split_updates() -> None:
    gen = torch.Generator().manual_seed(2)
    masks = torch.rand(30, 10, generator=gen) < 0.5
    targets = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    scores = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    metric = LinearDatamodelingScore()
    for part in (slice(0, 7), slice(7, 19), slice(19, 30)):
        metric.update(masks[part], targets[part], scores)
    assert float(metric.compute()) == pytest.approx(float(lds(masks, targets, scores)), abs=1e-12)
    per_query = LinearDatamodelingScore(target="loss", per_query=True)
    per_query.update(masks[:15], targets[:15], scores)
    per_query.update(masks[15:], targets[15:], scores)
    assert torch.allclose(per_query.compute(), lds(masks, targets, scores, target="loss", reduction="none"))
    metric.reset()
    metric.update(masks, targets, scores)
    assert float(metric.compute()) == pytest.approx(float(lds(masks, targets, scores)), abs=1e-12)


# ----------------------------------------------------------------------------- mislabel detection


def test_auroc_and_precision_against_hand_count() -> None:
    # large self-influence values: torchmetrics would read them as logits and saturate a sigmoid
    scores = torch.tensor([50.0, 3.0, 120.0, 7.0, 7.0, 80.0, 1.0, 200.0], dtype=torch.float64)
    flags = torch.tensor([True, False, True, False, True, False, False, False])
    pos, neg = scores[flags], scores[~flags]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    hand = float(wins.mean())  # 50: 3 wins, 120: 4, 7: 2 and a tie -> 9.5 / 15
    out = mislabel_detection(scores, flags)
    assert float(out["auroc"]) == pytest.approx(hand) and hand == pytest.approx(9.5 / 15)
    # top 3 by score: 200 (clean), 120 (flipped), 80 (clean) -> 1 / 3
    assert float(out["precision_at_k"]) == pytest.approx(1 / 3) and int(out["k"]) == 3
    assert float(precision_at_k(scores, flags, k=2)) == pytest.approx(0.5)


def test_mislabel_metric_equals_functional() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(40, generator=gen) * 30
    flags = torch.rand(40, generator=gen) < 0.25
    metric = MislabelDetection()
    metric.update(scores[:13], flags[:13])
    metric.update(scores[13:], flags[13:])
    got, want = metric.compute(), mislabel_detection(scores, flags)
    assert all(float(got[key]) == pytest.approx(float(want[key])) for key in want)
    with pytest.raises(EvaluationError):
        mislabel_detection(scores, torch.zeros(40, dtype=torch.bool))


# ----------------------------------------------------------------------------- influence


def _grads(n: int, dims: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, k, generator=gen, dtype=torch.float64) for name, k in dims.items()}


@pytest.mark.parametrize("n", [40, 6])  # primal (k <= n) and dual (n < k) forms
def test_kernel_influence_matches_direct_solve_and_library(n: int) -> None:
    dims = {"a": 8, "b": 12}
    train, queries = _grads(n, dims, 0), _grads(3, dims, 1)
    ki = KernelInfluence(train, queries)
    for ratio in (1e-4, 1e-1):
        direct = torch.zeros(n, 3, dtype=torch.float64)
        for name, k in dims.items():
            fisher = train[name].T @ train[name] / n
            lam = ratio * float(fisher.trace()) / k
            direct += train[name] @ torch.linalg.solve(fisher + lam * torch.eye(k, dtype=torch.float64), queries[name].T)
        assert torch.allclose(ki.scores(ratio), direct, rtol=1e-7, atol=1e-9)
        assert torch.allclose(ki.scores(ratio, [2, 0]), direct[:, [2, 0]], rtol=1e-7, atol=1e-9)
        stats = FisherStats(dims)
        stats.update(train)
        pre = precondition_queries(stats.fit(ratio), queries)
        lib = score_chunks(pre, [(torch.arange(n), train)], topk=1, full=True).full.T
        assert torch.allclose(lib, direct, rtol=1e-6, atol=1e-8)
        self_ki = KernelInfluence(train)
        assert torch.allclose(self_ki.self_influence(ratio), KernelInfluence(train, train).scores(ratio).diagonal(),
                              rtol=1e-7, atol=1e-9)


def test_joint_kernel_is_one_fisher_over_concatenated_layers() -> None:
    dims = {"a": 5, "b": 7}
    train, queries = _grads(30, dims, 2), _grads(4, dims, 3)
    g, q = torch.cat([train["a"], train["b"]], 1), torch.cat([queries["a"], queries["b"]], 1)
    fisher = g.T @ g / 30
    lam = 1e-2 * float(fisher.trace()) / 12
    direct = g @ torch.linalg.solve(fisher + lam * torch.eye(12, dtype=torch.float64), q.T)
    assert torch.allclose(fisher_scores(train, queries, 1e-2, joint=True), direct, rtol=1e-7, atol=1e-9)
    assert torch.allclose(dot_product_scores(train, queries), g @ q.T)


# ----------------------------------------------------------------------------- damping


def test_choose_damping_picks_the_right_ratio() -> None:
    gen = torch.Generator().manual_seed(4)
    masks = torch.rand(40, 20, generator=gen) < 0.5
    truth = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    targets = subset_predictions(masks, truth)
    noise = {r: torch.randn(20, 6, generator=gen, dtype=torch.float64) for r in DAMPING_GRID}

    def scores_for(ratio: float) -> torch.Tensor:  # perfect at 1e-2, noisier the further away
        w = min(1.0, abs(math.log10(ratio) + 2) / 3)
        return (1 - w) * truth + w * 3 * noise[ratio]

    choice = choose_damping(masks, targets, scores_for)
    assert choice.ratio == 1e-2 and choice.best_lds == pytest.approx(1.0)
    assert set(choice.lds) == set(DAMPING_GRID)
    held = choose_damping(masks, targets, scores_for, queries=[0, 2, 4])
    assert held.ratio == 1e-2


def test_choose_damping_ties_failures_and_library_path() -> None:
    masks, scores, sums = _linear_case(M=20, n=10, m=3)
    # every ratio perfect: the larger ratio wins the tie
    assert choose_damping(masks, sums, lambda r: scores, grid=[1e-3, 1e-1]).ratio == 1e-1

    def failing(ratio: float) -> torch.Tensor:
        if ratio < 1e-2:
            raise FisherError("not positive definite")
        return scores if ratio == 1e-2 else torch.full_like(scores, float("nan"))

    choice = choose_damping(masks, sums, failing, grid=[1e-4, 1e-2, 1.0])
    assert choice.ratio == 1e-2 and choice.lds[1e-4] == float("-inf") and choice.lds[1.0] == float("-inf")
    with pytest.raises(EvaluationError):
        choose_damping(masks, sums, lambda r: torch.full_like(scores, float("nan")), grid=[1.0])
    # the library path (FisherStats.fit + score_chunks) gives the KernelInfluence scores
    dims = {"a": 4}
    train, queries = _grads(10, dims, 5), _grads(3, dims, 6)
    stats = FisherStats(dims)
    stats.update(train)
    ids = torch.arange(10)
    chunks = lambda: [(ids[:6], {"a": train["a"][:6]}), (ids[6:], {"a": train["a"][6:]})]  # noqa: E731
    scores_for = library_scores_for(stats, chunks, queries, num_train=10)
    assert torch.allclose(scores_for(1e-2), KernelInfluence(train, queries).scores(1e-2), rtol=1e-5, atol=1e-7)


def test_kernel_influence_per_layer_ratios_and_predictions_match_dense_scores() -> None:
    gen = torch.Generator().manual_seed(5)
    train = {"a": torch.randn(30, 4, generator=gen, dtype=torch.float64),
             "b": torch.randn(30, 40, generator=gen, dtype=torch.float64)}  # b: k > n, the dual form
    queries = {n: torch.randn(3, g.shape[1], generator=gen, dtype=torch.float64) for n, g in train.items()}
    ratios = {"a": 0.3, "b": 2.0}
    want = 0
    for name, g in train.items():
        fisher = g.T @ g / 30
        h = fisher + ratios[name] * torch.trace(fisher) / g.shape[1] * torch.eye(g.shape[1], dtype=torch.float64)
        want = want + g @ torch.linalg.solve(h, queries[name].T)
    ki = KernelInfluence(train, queries)
    torch.testing.assert_close(ki.scores(ratios), want)
    masks = torch.rand(9, 30, generator=gen) < 0.5
    torch.testing.assert_close(ki.predictions(masks, ratios), masks.double() @ want)
    grams = {n: (g @ g.T, queries[n] @ g.T, g.shape[1]) for n, g in train.items()}
    torch.testing.assert_close(KernelInfluence.from_grams(grams).scores(ratios), want)
