"""The in-run ensemble benchmark's bookkeeping: each period's matrix and rows read off the callback
(also a period closed at the end of training), and the standardised sums over each period's rows."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.quality import ensemble as E
from grass_callback import GraSSCallback, IndexedDataset


def _hand_standardised(S: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Per query, loop by loop: population std over the seen columns, S / std there, 0 elsewhere."""
    out = torch.zeros(S.shape, dtype=torch.float64)
    cols = [j for j in range(S.shape[1]) if bool(seen[j])]
    for q in range(S.shape[0]):
        vals = [float(S[q, j]) for j in cols]
        mean = sum(vals) / len(vals)
        sd = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
        for j in cols:
            out[q, j] = float(S[q, j]) / sd if sd > 0 else 0.0
    return out


def test_standardised_rows_use_each_periods_own_rows():
    gen = torch.Generator().manual_seed(0)
    m, n = 5, 30
    seen = [torch.rand(n, generator=gen) < frac for frac in (0.4, 0.7, 1.01)]  # the last sees all
    periods = [torch.where(s, torch.randn(m, n, generator=gen, dtype=torch.float64) * scale, 0.0)
               for s, scale in zip(seen, (10.0, 1.0, 0.1))]
    periods[1][2] = torch.where(seen[1], 3.0, 0.0)  # a query constant over the period's rows: adds 0
    lrs = [0.5, 2.0, 1.0]
    out = E.weightings(periods, lrs, seen)
    z = [_hand_standardised(S, s) for S, s in zip(periods, seen)]
    torch.testing.assert_close(out["standardised, uniform (default)"], z[0] + z[1] + z[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["standardised, lr-weighted"], 0.5 * z[0] + 2.0 * z[1] + z[2],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["standardised, later half, lr-weighted"], 2.0 * z[1] + z[2],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["lr-weighted (TracIn)"], 0.5 * periods[0] + 2.0 * periods[1] + periods[2])
    # the library's own default sum (ScoreEnsemble, standardise=True) is the same
    torch.testing.assert_close(E.library_standardised_sum(periods, seen), out["standardised, uniform (default)"],
                               rtol=1e-12, atol=1e-12)
    # taking each std over all rows (the unseen zeros too) is another, wrong, answer
    assert not torch.allclose(E.weightings(periods, lrs)["standardised, uniform (default)"],
                              out["standardised, uniform (default)"], rtol=1e-3)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):  # lr of step s: 0.1 (1 - s / 10)
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_recorder_keeps_every_period_including_one_closed_at_the_end(tmp_path):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    train = DataLoader(IndexedDataset(TensorDataset(x[:32], y[:32])), batch_size=8)  # 4 steps an epoch
    queries = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)
    # every 3 steps over 8: periods end at steps 3 and 6 and one more at the end of training
    grass = GraSSCallback(k=16, num_queries=8, query_loader=queries, log_to_wandb=False, progress=False,
                          store_dir=tmp_path / "grass", storage_dtype="float32", score_every_n_steps=3,
                          ensemble_weighting="lr", ensemble_standardise=False)
    rec = E._recorder(grass)
    L.seed_everything(0, verbose=False)
    E.quiet_trainer(2, [grass, rec], tmp_path).fit(_Tiny(), train)
    assert grass._ensemble.periods == len(rec.periods) == len(rec.seen) == len(rec.lrs) == 3
    assert [int(s.sum()) for s in rec.seen] == [24, 24, 16]  # each period's rows: 3, 3 and 2 batches
    assert all(torch.equal(S.ne(0).any(0), s) for S, s in zip(rec.periods, rec.seen))
    expected = [0.1 * (1 + 0.9 + 0.8) / 3, 0.1 * (0.7 + 0.6 + 0.5) / 3, 0.1 * (0.4 + 0.3) / 2]
    assert rec.lrs == pytest.approx(expected, rel=1e-12)
    assert grass._ensemble.weights == pytest.approx(expected, rel=1e-6)  # the callback's own lr weights
    total = sum(w * S for w, S in zip(grass._ensemble.weights, rec.periods))
    torch.testing.assert_close(total, grass.ensemble_scores, rtol=1e-12, atol=1e-12)
