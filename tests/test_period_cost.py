"""What a scoring period leaves out to stay cheap: the tables' cadence, the self-influence solve.

Timings are in ``benchmarks/period_cost_mlp.py``; here only that the cheap paths give the same
results: the tables written at the end of fit equal those an every-period run writes, skipped
periods still log their scalars, and the self-influence of half-precision rows by triangular
solves matches a float64 reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from grass_callback import GraSSCallback
from grass_callback.errors import ConfigError
from grass_callback.fisher import FisherStats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_callback import fit  # noqa: E402

TABLES = {"influence.csv", "self_influence.csv", "data_value.csv", "suspects.csv", "layers.csv", "scalars.json"}


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


class _Recorder:
    """Which report calls the callback makes, in order (wraps the real reporter)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def wrap(self, reporter) -> None:
        report, scalars = reporter.report, reporter.report_scalars

        def tables(result, **kw):
            self.calls.append(("tables", kw["period"]))
            return report(result, **kw)

        def only_scalars(**kw):
            self.calls.append(("scalars", kw["period"]))
            return scalars(**kw)

        reporter.report, reporter.report_scalars = tables, only_scalars


def test_tables_every_nth_period_and_the_last_one_at_the_end_of_fit(tmp_path, monkeypatch):
    import grass_callback.callback as callback_module

    rec = _Recorder()
    make = callback_module.GraSSCallback._make_reporter

    def make_reporter(self, trainer, root):
        reporter = make(self, trainer, root)
        rec.wrap(reporter)
        return reporter

    monkeypatch.setattr(callback_module.GraSSCallback, "_make_reporter", make_reporter)
    _, _, every = fit(tmp_path / "every", epochs=4, report_every_n_periods=1, log_to_wandb=False)
    assert rec.calls == [("tables", f"epoch-{e}") for e in range(4)]
    rec.calls.clear()
    _, _, sparse = fit(tmp_path / "sparse", epochs=4, report_every_n_periods=2, log_to_wandb=False)
    # periods 0 and 2 write their tables; 1 and 3 log scalars; 3, the last, is written at the end of fit
    assert rec.calls == [("tables", "epoch-0"), ("scalars", "epoch-1"), ("tables", "epoch-2"),
                         ("scalars", "epoch-3"), ("tables", "epoch-3")]
    a, b = Path(every.store_dir) / "scores", Path(sparse.store_dir) / "scores"
    for e in (0, 2, 3):
        assert _files(b / f"epoch-{e}") == TABLES
        for name in ("influence.csv", "self_influence.csv", "data_value.csv", "suspects.csv", "layers.csv"):
            assert (b / f"epoch-{e}" / name).read_text() == (a / f"epoch-{e}" / name).read_text(), (e, name)
    assert _files(b / "epoch-1") == {"scalars.json"}
    skipped = json.loads((b / "epoch-1" / "scalars.json").read_text())
    full = json.loads((a / "epoch-1" / "scalars.json").read_text())
    assert skipped["step"] == full["step"] and skipped["period"] == "epoch-1"
    assert skipped["scalars"]["rows_scored"] == full["scalars"]["rows_scored"] == 48
    assert skipped["scalars"]["fisher_condition_max"] == pytest.approx(full["scalars"]["fisher_condition_max"])
    assert sparse.last_report_folder == b / "epoch-3"
    assert torch.equal(sparse.ensemble_scores, every.ensemble_scores)


def test_skipped_periods_log_their_scalars_to_the_run(tmp_path):
    from grass_callback.report import InfluenceReporter, RunHandle

    class Run:
        step = 0

        def __init__(self) -> None:
            self.logged: list[tuple[dict, int | None]] = []

        def log(self, data, step=None):
            self.logged.append((data, step))

        def define_metric(self, *a, **k):
            pass

    run = Run()
    folder = InfluenceReporter(tmp_path, RunHandle(run, owned=False)).report_scalars(
        step=7, period="epoch-1", scalars={"rows_scored": 48, "seconds/fit": 0.5})
    assert run.logged == [({"grass/rows_scored": 48.0, "grass/seconds/fit": 0.5}, 7)]
    assert json.loads((folder / "scalars.json").read_text())["scalars"] == {"rows_scored": 48.0, "seconds/fit": 0.5}
    run.step = 9  # the run is ahead (a logger counts its own steps): logged at its step, with ours as a field
    InfluenceReporter(tmp_path, RunHandle(run, owned=False)).report_scalars(step=7, period="e", scalars={"a": 1})
    assert run.logged[-1] == ({"grass/a": 1.0, "trainer/global_step": 7}, None)


@pytest.mark.parametrize("bad", [0, -1])
def test_report_every_n_periods_must_be_positive(bad):
    with pytest.raises(ConfigError, match="report_every_n_periods"):
        GraSSCallback(report_every_n_periods=bad)


def test_self_influence_of_half_precision_rows_matches_a_float64_reference():
    """``quadratic`` by triangular solves in float32 against ``g^T (F + λI)^{-1} g`` computed in
    float64 with an explicit inverse, on rows stored in float16 (as the store keeps them)."""
    gen = torch.Generator().manual_seed(3)
    layers = {"a": 64, "b": 24}
    stats = FisherStats(layers)
    rows = {n: (torch.randn(300, k, generator=gen) * torch.linspace(0.1, 3, k)).half() for n, k in layers.items()}
    stats.update({n: g.float() for n, g in rows.items()})
    fitted = stats.fit(0.1)
    got = fitted.quadratic({n: g.float() for n, g in rows.items()})
    want = torch.zeros(300, dtype=torch.float64)
    for n, k in layers.items():
        g = rows[n].double()
        fisher = g.T @ g / 300
        lam = 0.1 * float(fisher.trace()) / k
        want += ((g @ torch.linalg.inv(fisher + lam * torch.eye(k, dtype=torch.float64))) * g).sum(1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)
    # float64 rows take the float64 path
    got64 = fitted.quadratic({n: g.double() for n, g in rows.items()})
    torch.testing.assert_close(got64, want, rtol=1e-10, atol=0)


def test_score_store_with_the_queries_preconditioned_once_gives_the_same_result(tmp_path):
    """The callback preconditions the queries once (for the scores and the duplicate search) and
    hands them to ``score_store``: the same result, field for field, as ``score_store`` doing it."""
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from grass_callback import IndexedDataset, attribute
    from grass_callback.attribution import score_store
    from grass_callback.errors import ScoringError
    from grass_callback.scoring import precondition_queries

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    train = DataLoader(IndexedDataset(TensorDataset(x[:32], y[:32])), batch_size=8)
    queries = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=4)
    run = attribute(model, train, queries, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), k=16,
                    store_dir=tmp_path / "s", progress=False)
    pre = precondition_queries(run.fisher, {n: g.float() for n, g in run.query_grads.items()})
    once = score_store(run.store, run.fisher, run.query_ids, run.query_grads, topk=3, full=True, progress=False,
                       preconditioned=pre)
    again = score_store(run.store, run.fisher, run.query_ids, run.query_grads, topk=3, full=True, progress=False)
    assert once.to_dict().keys() == again.to_dict().keys()
    for name, value in again.to_dict().items():
        assert torch.equal(getattr(once, name), value), name
    with pytest.raises(ScoringError, match="lack the store's layers"):
        score_store(run.store, run.fisher, run.query_ids, run.query_grads, progress=False,
                    preconditioned={n: p for n, p in list(pre.items())[:1]})
