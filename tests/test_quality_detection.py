"""The quality studies' helpers against their definitions: per-period self-influence, spectrum statistics."""

import pytest
import torch

from benchmarks.quality.detection import period_self_influence
from grass_callback.store import GradientStore


def test_period_self_influence_equals_dense_inverse_per_period(tmp_path):
    gen = torch.Generator().manual_seed(3)
    ks, n = {"a": 6, "b": 40}, 30  # "b" wider than a period's rows: the auto ratio is k/N there
    store = GradientStore(tmp_path / "s", layer_dims=ks, dtype="float32", rows_per_shard=7)
    periods = []
    for epoch, ids in enumerate((torch.randperm(n, generator=gen)[:25], torch.randperm(n, generator=gen)[:18])):
        rows = {name: torch.randn(len(ids), k, generator=gen) * torch.linspace(2, 0.1, k) for name, k in ks.items()}
        for start in range(0, len(ids), 5):  # batches of 5 rows
            store.append(ids[start:start + 5], epoch * 10 + start, {m: r[start:start + 5] for m, r in rows.items()}, epoch)
        periods.append((ids, rows))
    store.close()
    ratios = (0.01, 1.0, 4.0)
    got = period_self_influence(GradientStore(tmp_path / "s", readonly=True), n, ratios)
    assert got.shape == (2, len(ratios), n)
    for p, (ids, rows) in enumerate(periods):
        for j, r in enumerate(ratios):
            want = torch.zeros(n, dtype=torch.float64)
            for name, g in rows.items():
                g = g.double()
                fisher = g.T @ g / len(ids)
                lam = r * max(1.0, ks[name] / len(ids)) * float(fisher.trace()) / ks[name]
                inv = torch.linalg.inv(fisher + lam * torch.eye(ks[name], dtype=torch.float64))
                want.index_add_(0, ids, ((g @ inv) * g).sum(1))
            torch.testing.assert_close(got[p, j], want, rtol=1e-9, atol=1e-9)
    assert (got[1, :, :].sum(0) > 0).sum() == 18  # only the period's own rows get a value


def test_layer_damping_spectrum_stats_from_their_definitions():
    from benchmarks.quality.layer_damping import spectrum_stats

    # primal: 4 eigenvalues, m = min(k, N) = 4, λ = tr / m = 2
    s = spectrum_stats(torch.tensor([1.0, 4.0, 1.0, 2.0]), k=4, n=10)
    assert s["reff_m"] == pytest.approx(8.0 ** 2 / 22.0 / 4)
    assert s["top1"] == pytest.approx(4 / 8)  # the single largest eigenvalue's share
    assert s["above"] == pytest.approx(1 / 4)  # only 4 > λ
    assert s["median"] == pytest.approx(1 / 2)  # sorted descending, entry m // 2 = 1, over λ
    # dual: fewer eigenvalues than m are padded with zeros (k = 6, N = 5: m = 5, λ = 10 / 5)
    d = spectrum_stats(torch.tensor([6.0, 4.0]), k=6, n=5)
    assert d["above"] == pytest.approx(2 / 5) and d["median"] == 0.0
    assert d["reff_m"] == pytest.approx(100 / 52 / 5)
