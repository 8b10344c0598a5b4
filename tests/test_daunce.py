"""Daunce: scores are the loss covariance across perturbed copies; the sign; Lightning = plain loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import IndexedDataset
from grass_callback.daunce_method import daunce
from grass_callback.errors import ConfigError, GraSSError


def per_example_ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def problem(n=40, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=g)
    x = torch.randn(n + 6, d, generator=g)
    y = (x @ w + 0.5 * torch.randn(n + 6, classes, generator=g)).argmax(1)
    model = nn.Linear(d, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):  # near the optimum, as a trained model is
        opt.zero_grad()
        F.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    return model, x, y


def loaders(x, y, n):
    train = DataLoader(IndexedDataset(TensorDataset(x[:n], y[:n])), batch_size=8)
    query = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=4)
    return train, query


def test_scores_are_the_covariance_of_the_copies_losses(one_thread):
    model, x, y = problem()
    train, query = loaders(x, y, 40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = daunce(model, train, query, per_example_ce, num_models=6, epochs=2, lr=0.2, topk=5, full=True,
                 use_lightning=False, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    tl, ql = out.train_losses.double().numpy(), out.query_losses.double().numpy()
    cov = np.cov(np.concatenate([ql, tl], axis=1), rowvar=False)  # independent reference: numpy's covariance
    m = ql.shape[1]
    want = torch.from_numpy(cov[:m, m:])
    torch.testing.assert_close(out.scores.full.double(), want, rtol=1e-5, atol=1e-8)
    top = want.topk(5, dim=1)
    assert torch.equal(out.scores.top_ids, out.train_ids[top.indices])
    assert torch.equal(out.scores.bottom_ids, out.train_ids[want.topk(5, dim=1, largest=False).indices])
    torch.testing.assert_close(out.scores.self_influence.double(), torch.from_numpy(np.diag(cov)[m:].copy()),
                               rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.scores.data_value.double(), want.sum(0), rtol=1e-5, atol=1e-8)
    # the copies differ (perturbation works) and each was trained on its own subset of half the data
    assert float(out.train_losses.std(0).min()) > 0
    assert all(s.numel() == 20 for s in out.subsets) and not torch.equal(out.subsets[0], out.subsets[1])


def test_a_duplicate_of_the_query_is_its_top_proponent(one_thread):
    model, x, y = problem(n=30, seed=1)
    with torch.no_grad():
        q = int(F.cross_entropy(model(x[30:]), y[30:], reduction="none").argmax())  # a misfit query
    # training set: 30 examples plus an exact copy (id 30) of query q; training on it lowers q's loss
    xt, yt = torch.cat([x[:30], x[30 + q:31 + q]]), torch.cat([y[:30], y[30 + q:31 + q]])
    train = DataLoader(IndexedDataset(TensorDataset(xt, yt)), batch_size=8)
    query = DataLoader(TensorDataset(x[30:], y[30:]), batch_size=6)
    out = daunce(model, train, query, per_example_ce, num_models=16, epochs=3, lr=0.3, topk=3,
                 use_lightning=False, progress=False, seed=2)
    assert int(out.scores.top_ids[q, 0]) == 30
    assert float(out.scores.top_scores[q, 0]) > 2 * float(out.scores.top_scores[q, 1]) > 0
    assert 30 not in out.scores.bottom_ids[q].tolist()


def test_lightning_copies_take_the_same_steps_as_the_plain_loop(one_thread):
    model, x, y = problem(n=24)
    train, query = loaders(x, y, 24)
    kw = dict(num_models=2, epochs=1, lr=0.2, topk=3, progress=False, seed=5)
    plain = daunce(model, train, query, per_example_ce, use_lightning=False, **kw)
    lit = daunce(model, train, query, per_example_ce, use_lightning=True,
                 trainer_kwargs={"accelerator": "cpu"}, **kw)
    torch.testing.assert_close(lit.train_losses, plain.train_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lit.query_losses, plain.query_losses, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    model, x, y = problem(n=16)
    train, query = loaders(x, y, 16)
    with pytest.raises(ConfigError, match="num_models"):
        daunce(model, train, query, per_example_ce, num_models=1)
    with pytest.raises(GraSSError, match="one loss per example"):
        daunce(model, train, query, lambda m, b: per_example_ce(m, b).mean(), num_models=2,
               use_lightning=False, progress=False)


class TinyModule(__import__("lightning").LightningModule):  # no per_example_loss: the CLI's fallback is used
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(5, 3)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(__import__("lightning").LightningDataModule):
    def setup(self, stage=None):
        _, x, y = problem(n=24)
        self.train, self.val = IndexedDataset(TensorDataset(x[:24], y[:24])), IndexedDataset(TensorDataset(x[24:], y[24:]))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=8)


def test_cli_method_daunce_writes_the_tables_daunce_gives(tmp_path, one_thread):
    import csv

    import lightning as L

    from grass_callback.__main__ import main

    dm = TinyData()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    module = TinyModule()
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert main(["attribute", "--method", "daunce", "--ckpt", str(tmp_path / "m.ckpt"), "--model",
                 "test_daunce:TinyModule", "--data", "test_daunce:TinyData", "--out", str(tmp_path / "out"),
                 "--num-models", "3", "--epochs", "1", "--topk", "3", "--num-queries", "4", "--batch-size", "8",
                 "--no-wandb", "--quiet"]) == 0
    rows = [r for r in csv.reader(line for line in open(next((tmp_path / "out" / "scores").glob("*/influence.csv")))
                                  if not line.startswith("#"))][1:]
    dm.setup()
    want = daunce(module, DataLoader(dm.train, batch_size=8), DataLoader(torch.utils.data.Subset(dm.val, range(4)),
                  batch_size=8), lambda m, b: F.cross_entropy(m.net(b[0]), b[1], reduction="none"),
                  num_models=3, epochs=1, topk=3, seed=0, progress=False).scores
    got = [(int(q), int(t)) for q, _r, t, _s, kind in rows if kind == "proponent"]
    assert got == [(int(q), int(t)) for i, q in enumerate(want.query_ids) for t in want.top_ids[i].tolist()]
