"""The quality suite's damping-rule candidates against their formulas, computed from F directly."""

import math

import pytest
import torch

from benchmarks.quality.rules import RULES
from benchmarks.quality.spectra import layer_stats
from grass_callback.damping import auto_damping_ratio
from grass_callback.evaluation import KernelInfluence


def _kernel(n: int, ks: dict[str, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # a decaying column scale gives a spectrum far from flat (r_eff well below min(k, N))
    train = {name: torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.linspace(1, 0.02, k).double() ** 2
             for name, k in ks.items()}
    queries = {name: torch.randn(3, k, generator=gen, dtype=torch.float64) for name, k in ks.items()}
    return KernelInfluence(train, queries), train


def _moments(g: torch.Tensor) -> tuple[float, float, int, int]:
    n, k = g.shape
    f = g.T @ g / n  # k x k, formed directly (the rules see only the kernel's eigenvalues)
    return float(f.trace()), float((f * f).sum()), k, n


@pytest.mark.parametrize("n", [40, 200])  # dual (n < k for the wide layer) and primal
def test_candidate_rules_equal_their_formulas(n):
    ki, train = _kernel(n, {"a": 24, "b": 96})
    for name, g in train.items():
        tr, tr2, k, N = _moments(g)
        m, reff = min(k, N), tr * tr / tr2
        assert reff < 0.5 * m  # the spectrum is not flat, so pow<α> differs from auto
        for alpha in (0.1, 0.25, 0.5, 1.0):
            want = max(1.0, k / N) * (reff / m) ** alpha
            assert RULES[f"pow{alpha:g}"](ki)[name] == pytest.approx(want, rel=1e-9)
        for c in (0.2, 0.35, 0.5):
            assert RULES[f"N/k{c:g}"](ki)[name] == pytest.approx(min(1.0, c * N / k), rel=1e-12)
        assert RULES["auto"](ki)[name] == pytest.approx(auto_damping_ratio(g.T @ g / N, N), rel=1e-12)
        for c in (0.01, 0.1):  # erank<c>: λ = c tr(F²)/tr(F), as a ratio of tr(F)/k
            assert RULES[f"erank{c:g}"](ki)[name] == pytest.approx(c * tr2 / tr / (tr / k), rel=1e-9)
        for c in (1.0, 2.0):  # auto/L<c>: the library's ratio over the number of blocks (here 2)
            assert RULES[f"auto/L{c:g}"](ki)[name] == pytest.approx(c / 2 * max(1.0, k / N), rel=1e-12)


def test_layer_stats_effective_rank_from_the_fisher():
    ki, train = _kernel(50, {"a": 30, "b": 80}, seed=1)
    stats = layer_stats(ki)
    for name, g in train.items():
        tr, tr2, k, N = _moments(g)
        assert stats[name]["k"] == k and stats[name]["N"] == N and stats[name]["m"] == min(k, N)
        assert stats[name]["reff_m"] == pytest.approx(tr * tr / tr2 / min(k, N), rel=1e-9)
        f = g.T @ g / N
        top = max(1, min(k, N) // 100)
        share = float(torch.linalg.eigvalsh(f).flip(0)[:top].sum()) / tr
        assert stats[name]["top1pct"] == pytest.approx(share, rel=1e-9)
        assert 0 < stats[name]["reff_m"] <= 1 and not math.isnan(share)


def test_the_suites_default_rule_gives_a_vocabulary_head_its_scale_as_fit_does():
    from benchmarks.quality.rules import with_layer_scales
    from grass_callback.fisher import FisherStats
    from grass_callback.projection import LayerShape

    ki, train = _kernel(200, {"a": 24, "b": 96})
    shapes = {"a": LayerShape(16, 32), "b": LayerShape(16, 160)}  # b: 160 >= 8 x 16 outputs, a vocabulary head at k = 16
    rules = with_layer_scales({"auto": RULES["auto"], "r=1": RULES["r=1"]}, shapes, k=16)
    stats = FisherStats({"a": 24, "b": 96})
    stats.update(train)
    stats.auto_scales = {"b": 0.1}
    fitted = stats.fit("auto")
    assert rules["auto"](ki) == pytest.approx(fitted.damping_ratio, rel=1e-12)
    assert rules["auto"](ki)["b"] == pytest.approx(0.1 * RULES["auto"](ki)["b"], rel=1e-12)
    assert rules["r=1"](ki) == RULES["r=1"](ki)  # other rules untouched
    assert with_layer_scales({"auto": RULES["auto"]}, {"a": shapes["a"], "b": LayerShape(16, 32)}, k=16)["auto"](ki) \
        == RULES["auto"](ki)
