"""The default damping rule (grass_callback.damping) and FisherStats.fit("auto") against a dense
reference computed here from the raw rows."""

from __future__ import annotations

import pytest
import torch

from grass_callback.attribution import resolve_damping
from grass_callback.damping import VOCABULARY_HEAD_SCALE, auto_damping_ratio, auto_scales
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


def test_vocabulary_heads_are_the_wide_output_layers_with_a_wide_enough_input():
    from grass_callback.projection import FactGraSSPlan, GaussianPlan, LayerShape

    # (d_in, d_out, bias, k) -> a vocabulary head? (the mask side at k = 1024 is 64, at k = 16 it is 8)
    cases = {(128, 1024, False, 1024): True,     # GPT-2-like head, exactly 8x
             (128, 1023, False, 1024): False,    # just under 8x
             (127, 1024, True, 1024): True,      # 128 columns with the bias, 1024 >= 8 x 128
             (24, 512, True, 1024): False,       # an MLP's narrow input layer (25 < 64), 20x wider output
             (768, 50257, False, 1024): True,
             (4096, 32000, False, 1024): False,  # 7.8x: not by this rule
             (16, 160, True, 16): True, (6, 160, True, 16): False}
    plans = {f"l{i}": FactGraSSPlan(d_in, d_out, bias=bias, k=k, name=f"l{i}")
             for i, (d_in, d_out, bias, k) in enumerate(cases)}
    want = {f"l{i}": 0.1 for i, head in enumerate(cases.values()) if head}
    assert VOCABULARY_HEAD_SCALE == 0.1
    assert auto_scales(plans) == want
    # a store's saved configs and another plan kind classify alike
    assert auto_scales({name: plan.to_state()[0] for name, plan in plans.items()}) == want
    dense = {"h": GaussianPlan(128 * 1024, k=16, name="h", shape=LayerShape(128, 1024))}
    assert auto_scales(dense) == auto_scales({"h": dense["h"].to_state()[0]}) == {"h": 0.1}
    assert auto_scales({"flat": GaussianPlan(128 * 1024, k=16, name="flat")}) == {}  # no shape: no scale


def test_fit_auto_multiplies_the_rule_by_the_layers_scale_and_a_given_ratio_is_kept():
    rows = {"a": _rows(120, 8, 1), "head": _rows(120, 240, 2)}
    stats = FisherStats({"a": 8, "head": 240})
    stats.update(rows)
    stats.auto_scales = {"head": 0.1}
    fitted = stats.fit("auto")
    for name, g in rows.items():
        fisher = g.T @ g / len(g)
        lam = float(torch.trace(fisher)) / min(g.shape) * (0.1 if name == "head" else 1.0)
        assert fitted.damping[name] == pytest.approx(lam, rel=1e-6)
    assert fitted.damping_ratio == {"a": 1.0, "head": pytest.approx(0.1 * 240 / 120)}
    q = {"head": torch.randn(3, 240, dtype=torch.float64)}
    fisher = rows["head"].T @ rows["head"] / 120
    want = torch.linalg.solve(fisher + fitted.damping["head"] * torch.eye(240, dtype=torch.float64), q["head"].T).T
    torch.testing.assert_close(fitted.solve(q)["head"].double(), want, rtol=1e-5, atol=1e-8)
    assert stats.fit(0.3).damping_ratio == {"a": 0.3, "head": 0.3}  # a number is used as given
    assert stats.auto_scales == {"head": 0.1}
    for bad in ({"nope": 0.1}, {"a": 0.0}, {"a": float("nan")}, {"a": True}):
        with pytest.raises(FisherValueError):
            stats.auto_scales = bad


def test_attribute_and_explain_give_a_vocabulary_head_its_scale(tmp_path):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from grass_callback import IndexedDataset, attribute
    from grass_callback.explaining import Period, _stats_for
    from grass_callback.store import GradientStore

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 160))  # 160 >= 8 x 17: a head
    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 160, (40,)))
    loader = DataLoader(IndexedDataset(data), batch_size=8)
    result = attribute(model, loader, DataLoader(data, batch_size=8),
                       lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), k=16, num_queries=4,
                       store_dir=tmp_path / "s", dtype="float32", progress=False)
    assert result.fisher.damping_ratio == {"0": 1.0, "2": pytest.approx(0.1)}  # k = 16 < N = 40
    store = GradientStore(tmp_path / "s", readonly=True)
    stats = _stats_for(store, Period("all", None, 10**9, "auto"), False, 64, None, False)
    assert stats.auto_scales == {"2": 0.1}
    assert stats.fit("auto").damping == pytest.approx(result.fisher.damping)


def test_checkpoint_attribution_gives_a_vocabulary_head_its_scale(tmp_path, monkeypatch):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from grass_callback import IndexedDataset, checkpoints
    from grass_callback.fisher import FittedFisher

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 160))
    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 160, (40,)))
    seen = []
    merged = FittedFisher.merged.__func__
    monkeypatch.setattr(FittedFisher, "merged", classmethod(lambda cls, parts, **kw: seen.append(parts) or merged(cls, parts, **kw)))
    checkpoints.attribute_checkpoints(lambda p: model, ["a"], DataLoader(IndexedDataset(data), batch_size=8),
                                      DataLoader(data, batch_size=8),
                                      lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), tmp_path, k=16,
                                      num_queries=4, dtype="float32", progress=False)
    assert seen and seen[0]["ckpt0"].damping_ratio == {"0": 1.0, "2": pytest.approx(0.1)}
