"""explain(): new queries against a finished run's store equal attribute() and the callback's tables."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset, attribute
from grass_callback.errors import StoreMismatchError
from grass_callback.explaining import PERIODS_FILE, QueryFieldError, explain, read_periods

N_TRAIN, N_VAL = 48, 12


class Tiny(L.LightningModule):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = torch.randint(0, 3, (N_TRAIN + N_VAL,), generator=g)
    train = DataLoader(IndexedDataset(TensorDataset(x[:N_TRAIN], y[:N_TRAIN])), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    val = DataLoader(IndexedDataset(TensorDataset(x[N_TRAIN:], y[N_TRAIN:])), batch_size=8)
    return train, val


def loss_fn(module, batch):
    return F.cross_entropy(module.net(batch[0]), batch[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run (one period per epoch, ensemble on) with a checkpoint per epoch."""
    tmp = tmp_path_factory.mktemp("run")
    L.seed_everything(0, verbose=False)
    train, val = loaders()
    cb = GraSSCallback(k=16, num_queries=N_VAL, topk=4, store_dir=tmp / "grass", storage_dtype="float32",
                       progress=False, log_to_wandb=False, damping_ratio=0.1, query_loader=val)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[cb, ckpt],
                        enable_progress_bar=False, enable_model_summary=False)
    model = Tiny()
    trainer.fit(model, train)
    ckpts = [Tiny.load_from_checkpoint(tmp / "ckpt" / f"epoch={e}.ckpt") for e in range(2)]
    return {"root": tmp / "grass", "cb": cb, "model": model, "ckpts": ckpts, "val": val}


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_callback_records_each_period_row_range(run):
    periods = read_periods(run["root"])
    assert [p.name for p in periods] == ["epoch-0", "epoch-1"]
    assert (periods[0].min_step, periods[0].max_step) == (0, 2)   # 48 rows / 16 = 3 batches per epoch
    assert (periods[1].min_step, periods[1].max_step) == (3, 5)
    assert periods[0].damping_ratio == pytest.approx(0.1)


def test_explain_equals_the_callbacks_last_period_tables(run):
    cb, model = run["cb"], run["ckpts"][1]
    before = tree_hash(run["root"] / "train")
    got = explain(run["root"], model, run["val"], periods=["epoch-1"], topk=4, progress=False).scores
    want = cb.last_result
    assert torch.equal(got.query_ids, want.query_ids)
    assert torch.equal(got.top_ids, want.top_ids) and torch.equal(got.bottom_ids, want.bottom_ids)
    torch.testing.assert_close(got.top_scores, want.top_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.bottom_scores, want.bottom_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.self_influence_ids, want.self_influence_ids)
    torch.testing.assert_close(got.self_influence, want.self_influence, rtol=1e-5, atol=1e-6)
    assert tree_hash(run["root"] / "train") == before


def test_explain_with_a_checkpoint_per_period_equals_the_callbacks_ensemble(run):
    cb = run["cb"]
    got = explain(run["root"], run["ckpts"], run["val"], topk=4, progress=False).scores
    want = cb.ensemble_result
    assert torch.equal(got.top_ids, want.top_ids) and torch.equal(got.bottom_ids, want.bottom_ids)
    torch.testing.assert_close(got.top_scores, want.top_scores, rtol=1e-5, atol=1e-6)
    ids, values = cb.data_value_plain  # explain() sums the periods' plain data values
    order = ids.argsort()
    assert torch.equal(got.data_value_ids, ids[order])
    torch.testing.assert_close(got.data_value.double(), values[order], rtol=1e-5, atol=1e-6)


def test_explain_equals_attribute_at_the_same_weights(tmp_path, run):
    model = run["ckpts"][1]
    train = DataLoader(IndexedDataset(TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))), batch_size=8)
    ref = attribute(model, train, run["val"], loss_fn, k=16, seed=3, damping_ratio=0.05, topk=5,
                    store_dir=tmp_path / "att", progress=False)
    ref.store.close()
    before = tree_hash(tmp_path / "att")
    got = explain(tmp_path / "att", model, run["val"], loss_fn, damping_ratio=0.05, topk=5, progress=False)
    assert [p.name for p in got.periods] == ["all"]
    for name in ("top_ids", "bottom_ids", "self_influence_ids", "data_value_ids", "query_ids"):
        assert torch.equal(getattr(got.scores, name), getattr(ref.scores, name)), name
    for name in ("top_scores", "bottom_scores", "self_influence", "data_value"):
        torch.testing.assert_close(getattr(got.scores, name), getattr(ref.scores, name), rtol=1e-5, atol=1e-6)
    assert tree_hash(tmp_path / "att") == before
    # the refitted Fisher is cached beside the store; a second call reads it and gives the same scores
    assert list((tmp_path / "att-explain-cache").glob("fisher-*.safetensors"))
    again = explain(tmp_path / "att", model, run["val"], loss_fn, damping_ratio=0.05, topk=5, progress=False)
    assert torch.equal(again.scores.top_scores, got.scores.top_scores)


def test_errors_leave_the_store_untouched(run):
    root = run["root"]
    before = tree_hash(root / "train")
    with pytest.raises(StoreMismatchError, match="shapes differ"):
        explain(root, Tiny(hidden=8), run["val"], progress=False)  # another model: other widths

    class Renamed(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    with pytest.raises(StoreMismatchError, match="does not have"):
        explain(root, Renamed(), run["val"], loss_fn=lambda m, b: m.body(b[0]).sum(), progress=False)
    no_labels = DataLoader(TensorDataset(torch.randn(4, 6)), batch_size=2)
    with pytest.raises(QueryFieldError, match="could not read the query batch"):
        explain(root, run["model"], no_labels, loss_fn, progress=False)
    with pytest.raises(Exception, match="2 periods"):
        explain(root, [run["model"]] * 3, run["val"], progress=False)
    assert tree_hash(root / "train") == before
    assert (root / PERIODS_FILE).exists()


class TinyData(L.LightningDataModule):
    def setup(self, stage=None):
        self.train, self.val = loaders()

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return self.val


def test_query_cli_writes_the_tables_explain_gives(run, tmp_path):
    import csv

    from grass_callback.__main__ import main

    ckpts = [str(p) for p in sorted((run["root"].parent / "ckpt").glob("*.ckpt"))]
    args = ["query", "--store", str(run["root"]), "--model", "test_explain:Tiny", "--data", "test_explain:TinyData",
            "--out", str(tmp_path / "q"), "--topk", "4", "--num-queries", "5", "--no-wandb", "--quiet"]
    assert main(args + sum((["--ckpt", c] for c in ckpts), [])) == 0
    rows = list(csv.reader(line for line in open(next((tmp_path / "q" / "scores").glob("*/influence.csv")))
                           if not line.startswith("#")))[1:]
    want = explain(run["root"], run["ckpts"], run["val"], topk=4, num_queries=5, progress=False).scores
    proponents = [(int(q), int(r), int(t)) for q, r, t, _s, kind in rows if kind == "proponent"]
    assert proponents == [(int(q), r + 1, int(t)) for i, q in enumerate(want.query_ids)
                          for r, t in enumerate(want.top_ids[i].tolist())]


def test_package_names_call_the_functions():
    import grass_callback
    import grass_callback.daunce_method  # noqa: F401  (importing the modules keeps the names functions)
    import grass_callback.explaining  # noqa: F401
    from grass_callback import daunce, explain

    assert explain is grass_callback.explaining.explain and daunce is grass_callback.daunce_method.daunce
    with pytest.raises(Exception, match="no gradient store"):
        grass_callback.explain("/nonexistent-store", nn.Linear(2, 2), [])
    with pytest.raises(Exception, match="num_models"):
        grass_callback.daunce(nn.Linear(2, 2), None, None, None, num_models=1)
