"""The default damping rule (grass_callback.damping) and FisherStats.fit("auto") against a dense
reference computed here from the raw rows."""

from __future__ import annotations

import pytest
import torch

from grass_callback.attribution import resolve_damping
from grass_callback.damping import auto_damping_ratio
from grass_callback.errors import ConfigError, FisherValueError
from grass_callback.fisher import FisherStats, JointFisherStats


def _rows(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, k, dtype=torch.float64)


@pytest.mark.parametrize("n,k", [(200, 16), (30, 64)])  # more rows than k, and fewer
def test_auto_damping_is_the_mean_nonzero_eigenvalue(n, k):
    g = _rows(n, k, 0)
    fisher = g.T @ g / n
    ratio = auto_damping_ratio(fisher, n)
    lam = ratio * float(torch.trace(fisher)) / k
    ev = torch.linalg.eigvalsh(fisher)
    nonzero = ev[ev > 1e-9 * ev.max()]
    assert nonzero.numel() == min(n, k)
    assert lam == pytest.approx(float(nonzero.mean()), rel=1e-9)


def test_fit_auto_damps_each_layer_by_its_own_rule_and_solves_with_it():
    rows = {"a": _rows(120, 8, 1), "b": 5.0 * _rows(120, 240, 2)}  # b: more dimensions than rows
    stats = FisherStats({"a": 8, "b": 240})
    for i in range(0, 120, 40):  # in three updates
        stats.update({n: g[i:i + 40] for n, g in rows.items()})
    fitted = stats.fit("auto")
    assert fitted.requested_damping_ratio == "auto"
    q = {n: torch.randn(3, g.shape[1], dtype=torch.float64) for n, g in rows.items()}
    solved = fitted.solve(q)
    for name, g in rows.items():
        fisher = g.T @ g / len(g)
        lam = float(torch.trace(fisher)) / min(g.shape)
        assert fitted.damping[name] == pytest.approx(lam, rel=1e-6)
        want = torch.linalg.solve(fisher + lam * torch.eye(g.shape[1], dtype=torch.float64), q[name].T).T
        torch.testing.assert_close(solved[name].to(torch.float64), want, rtol=1e-5, atol=1e-8)
    assert fitted.damping["a"] != pytest.approx(fitted.damping["b"])  # per layer, not one number


def test_joint_fit_auto_uses_the_joint_block():
    rows = {"a": _rows(50, 4, 3), "b": _rows(50, 6, 4)}
    stats = JointFisherStats({"a": 4, "b": 6})
    stats.update(rows)
    fitted = stats.fit("auto")
    g = torch.cat([rows["a"], rows["b"]], 1)
    assert next(iter(fitted.damping.values())) == pytest.approx(float((g * g).sum()) / 50 / 10, rel=1e-6)


def test_resolve_damping_keeps_auto_for_fit_time_and_checks_numbers():
    assert resolve_damping("auto", 1024) == "auto"
    assert resolve_damping(0.3, 1024) == 0.3
    for bad in (0, -1.0, "fast", True):
        with pytest.raises(ConfigError):
            resolve_damping(bad, 1024)


def test_auto_damping_checks_its_inputs_and_an_all_zero_block_still_fits():
    with pytest.raises(FisherValueError, match="finite trace"):
        auto_damping_ratio(torch.full((4, 4), float("nan")), 10)
    with pytest.raises(FisherValueError):
        FisherStats({"a": 4}).fit("fast")
    stats = FisherStats({"a": 4})
    stats.update({"a": torch.zeros(5, 4, dtype=torch.float64)})
    with pytest.warns(RuntimeWarning, match="zero trace"):
        fitted = stats.fit("auto")
    assert 0 < fitted.damping["a"] < 1e-6
