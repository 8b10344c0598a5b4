"""GraSSCallback in a real tiny Trainer: tables in W&B (offline), resume, errors, the demo."""

from __future__ import annotations

import csv
import glob
import json
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset
from grass_callback.attribution import plans_from_store, query_gradients
from grass_callback.capture import LayerTaps
from grass_callback.errors import CaptureError, ConfigError
from grass_callback.store import GradientStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_independent_refs import (WeightsAtEpochEnd, exact_query_rows, hand_damping, hand_scores,  # noqa: E402
                                   per_query_standardised, store_rows)

N_TRAIN, N_VAL = 48, 12


class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = torch.randint(0, 3, (N_TRAIN + N_VAL,), generator=g)
    train = DataLoader(IndexedDataset(TensorDataset(x[:N_TRAIN], y[:N_TRAIN])), batch_size=16)
    val = DataLoader(IndexedDataset(TensorDataset(x[N_TRAIN:], y[N_TRAIN:])), batch_size=8)
    return train, val


def fit(tmp_path, epochs=2, callback=None, logger=None, ckpt_path=None, extra_callbacks=(), **kw):
    L.seed_everything(0, verbose=False)
    callback = callback or GraSSCallback(k=16, num_queries=6, topk=3, store_dir=tmp_path / "grass",
                                         storage_dtype="float32", progress=False, **kw)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger if logger is not None else False,
                        callbacks=[callback, *extra_callbacks], default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    model = TinyModule()
    train, val = data()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer, model, callback


def hand_score_matrices(cb, modules):
    """Per scoring period, ``[6, N_TRAIN]`` scores computed by hand (``test_independent_refs``): the
    epoch's rows read from the shards, its Fisher fitted by plain torch, exact query gradients at
    the epoch-end weights ``modules[epoch]``."""
    rows = store_rows(Path(cb.store_dir) / "train")
    _, val = data()
    examples = [val.dataset[i][:2] for i in range(6)]
    out = []
    for epoch, module in enumerate(modules):
        keep = rows["epochs"] == epoch
        own = {key: t[keep] for key, t in rows.items()}
        assert sorted(own["ids"].tolist()) == list(range(N_TRAIN)), epoch
        scores, _ = hand_scores(own, exact_query_rows(module, cb.taps.plans, examples), cb.damping_ratio)
        dense = torch.zeros(6, N_TRAIN, dtype=torch.float64)
        dense[:, own["ids"]] = scores
        out.append(dense)
    return out


def read_tables(save_dir):
    """W&B tables by name, oldest first (the file names carry W&B's step counter: ``influence_3_<hash>``)."""
    tables = {}
    paths = glob.glob(str(Path(save_dir) / "wandb" / "offline-run-*" / "files" / "media" / "table" / "grass" / "*.json"))
    for path in sorted(paths, key=lambda p: int(re.search(r"_(\d+)_", Path(p).name)[1])):
        name = Path(path).name.split("_")[0]
        tables.setdefault(name, []).append(json.loads(Path(path).read_text()))
    return tables


def test_tables_land_in_wandb_and_hold_the_hand_computed_scores(tmp_path):
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="t")
    weights = WeightsAtEpochEnd()
    trainer, model, cb = fit(tmp_path, epochs=2, logger=logger, extra_callbacks=[weights])
    logger.experiment.finish()  # the logger's run stays open otherwise (Lightning does not finish it)
    tables = read_tables(tmp_path)
    assert {"influence", "self", "data"} <= set(tables), tables.keys()
    infl = tables["influence"][-1]
    assert {"query_id", "rank", "train_id", "kind", "score"} <= set(infl["columns"])
    col = {c: i for i, c in enumerate(infl["columns"])}
    # the last table ranks by the ensemble: both epochs' scores, each standardised per query, summed (by hand)
    total = sum(per_query_standardised(P) for P in hand_score_matrices(cb, weights.modules))
    want_top = total.argsort(dim=1, descending=True)[:, :3]
    want_bottom = total.argsort(dim=1)[:, :3]
    seen = set()
    for row in infl["data"]:
        q, rank, train_id, kind = (row[col[c]] for c in ("query_id", "rank", "train_id", "kind"))
        want = want_top if kind == "proponent" else want_bottom
        assert kind in ("proponent", "opponent") and train_id == int(want[q, rank - 1]), (q, rank, kind)
        assert row[col["score"]] == pytest.approx(float(total[q, train_id]), rel=1e-4, abs=1e-6)
        assert (row[col["score"]] > 0) == (kind == "proponent")  # the sign convention of the tables
        seen.add((q, rank, kind))
    assert len(seen) == 6 * 3 * 2
    # local copies exist without W&B
    rows = list(csv.reader(line for line in open(Path(cb.store_dir) / "scores" / "epoch-1" / "influence.csv") if not line.startswith("#")))
    assert rows[0][:3] == ["query_id", "rank", "train_id"] and len(rows) == 1 + 6 * 3 * 2


def test_resume_keeps_each_example_once_and_the_same_data_value(tmp_path):
    _, _, full = fit(tmp_path / "a", epochs=2)
    ck = ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt", save_last=True, every_n_epochs=1)
    first, then = WeightsAtEpochEnd(), WeightsAtEpochEnd()
    fit(tmp_path / "b", epochs=1, extra_callbacks=[ck, first])
    # a crash after the checkpoint leaves rows the resumed run must not count twice
    _, _, resumed = fit(tmp_path / "b", epochs=2, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"),
                        extra_callbacks=[ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt2"), then])
    assert len(first.modules) == len(then.modules) == 1
    # the resumed run against a reference computed by hand from its store and each epoch's weights
    periods = hand_score_matrices(resumed, first.modules + then.modules)
    total = per_query_standardised(periods[0]) + per_query_standardised(periods[1])
    got = torch.tensor([resumed.data_value[i] for i in range(N_TRAIN)], dtype=torch.float64)
    want = sum((P / P.std(1, correction=0, keepdim=True)).sum(0) for P in periods)  # standardised per query
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(resumed.ensemble_result.top_ids, total.argsort(dim=1, descending=True)[:, :3])
    store = GradientStore(resumed.store.path, readonly=True)
    pairs = []
    for chunk in store.iter_chunks():
        pairs += list(zip(chunk.ids.tolist(), chunk.epochs.tolist()))
    assert len(pairs) == len(set(pairs)) == 2 * N_TRAIN
    # the checkpoint ensemble survives the resume too
    assert torch.equal(full.ensemble_result.top_ids, resumed.ensemble_result.top_ids)
    torch.testing.assert_close(full.ensemble_result.top_scores, resumed.ensemble_result.top_scores,
                               rtol=1e-5, atol=1e-7)
    a_ids, a_val = full.data_value_tensors()
    b_ids, b_val = resumed.data_value_tensors()
    order_a, order_b = a_ids.argsort(), b_ids.argsort()
    assert torch.equal(a_ids[order_a], b_ids[order_b])
    torch.testing.assert_close(a_val[order_a], b_val[order_b], rtol=1e-5, atol=1e-7)


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        GraSSCallback(k=0)
    with pytest.raises(ConfigError, match="storage_dtype"):
        GraSSCallback(storage_dtype="int8")
    with pytest.raises(ConfigError, match="token_counts"):
        GraSSCallback(loss_reduction="token_mean")
    with pytest.raises(ConfigError, match="mask_run must be 'auto' or a positive integer"):
        GraSSCallback(mask_run=0)

    class NoIndex(TinyModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[GraSSCallback(k=8, store_dir=tmp_path / "g", progress=False)],
                        default_root_dir=str(tmp_path), enable_checkpointing=False)
    plain = DataLoader(TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(CaptureError, match="IndexedDataset"):
        trainer.fit(NoIndex(), plain)

    class NoLinear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3)

        def training_step(self, batch, batch_idx):
            return self.conv(batch[0][:, None]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[GraSSCallback(k=8, store_dir=tmp_path / "h", progress=False)],
                        default_root_dir=str(tmp_path), enable_checkpointing=False)
    with pytest.raises(CaptureError, match="no nn.Linear"):
        trainer.fit(NoLinear(), plain)


def test_demo_finds_flipped_labels_better_than_chance(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import digits_mlp

    out = digits_mlp.main(["--epochs", "4", "--k", "64", "--quick", "--out", str(tmp_path / "demo")])
    # chance: 10% of the top-n; a binomial tail of >= 2.5x chance has probability < 1e-6
    assert out["caught"] >= 0.25 * out["n_flipped"], out["caught"]
    assert out["caught_suspect"] >= 0.25 * out["n_flipped"], out["caught_suspect"]  # the loss is in suspect
    # the sign convention: a flipped label raises the loss of queries of its true class, so flipped
    # examples are opponents more often than proponents and their data value is negative on average
    # (seed 0 with the damping rule damping_ratio="auto": 78% of the opponent slots vs 54% of the
    # proponent slots; with the earlier per-k table, 71% vs 34%: a weaker separation at k = 64)
    from digits_mlp import load_digits_split

    flipped = load_digits_split(0)[2]
    result = out["result"]
    among_opponents = torch.isin(result.bottom_ids, flipped).double().mean()
    among_proponents = torch.isin(result.top_ids, flipped).double().mean()
    assert among_opponents > among_proponents + 0.1, (among_opponents, among_proponents)
    is_flipped = torch.isin(result.data_value_ids, flipped)
    flipped_value = result.data_value[is_flipped].double().mean()
    assert flipped_value < 0 < result.data_value[~is_flipped].double().mean() - flipped_value, flipped_value
    assert out["run_dir"] is not None and list(Path(out["run_dir"]).glob("*.wandb"))
    # run again into the same folder (a second `make demo`): a fresh store, the same finding
    again = digits_mlp.main(["--epochs", "4", "--k", "64", "--quick", "--out", str(tmp_path / "demo")])
    assert again["caught"] == out["caught"]


def test_checkpoint_attribution_at_the_end_equals_attribute_at_the_final_weights(tmp_path):
    from grass_callback import attribute

    trainer, model, cb = fit(tmp_path, epochs=1, checkpoint_attribution="end")
    result = cb.last_checkpoint_result
    train, val = data()

    def loss_fn(m, b):
        return F.cross_entropy(m.net(b[0]), b[1])

    direct = attribute(model, train, val, loss_fn, k=16, num_queries=6, topk=3, dtype="float32",
                       damping_ratio=cb.damping_ratio, progress=False)
    assert torch.equal(result.top_ids, direct.scores.top_ids)
    torch.testing.assert_close(result.top_scores, direct.scores.top_scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.self_influence, direct.scores.self_influence, rtol=1e-4, atol=1e-6)
    assert (Path(cb.store_dir) / "scores").exists()
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_selective_masks_are_learned_once_and_used_everywhere(tmp_path):
    from grass_callback import attribute
    from grass_callback.projection import FactGraSSPlan, SelectiveFactGraSSPlan

    trainer, model, cb = fit(tmp_path, epochs=1, mask="selective", selective_sample=32,
                             checkpoint_attribution="end")
    store = GradientStore(cb.store.path, readonly=True)
    plans = plans_from_store(store)
    assert all(isinstance(p, SelectiveFactGraSSPlan) for p in plans.values())
    # the first layer (6 inputs + bias -> 16 outputs = 112 entries > k = 16) gets a learned mask,
    # which is not the random mask of the same seed
    random_plan = FactGraSSPlan(6, 16, True, k=16, seed=0, name="net.0")
    learned = plans["net.0"]
    assert (learned.k_in, learned.k_out) == (random_plan.k_in, random_plan.k_out)
    assert not (torch.equal(learned.in_idx, random_plan.in_idx) and torch.equal(learned.out_idx, random_plan.out_idx))
    train, val = data()

    def loss_fn(m, b):
        return F.cross_entropy(m.net(b[0]), b[1])

    direct = attribute(model, train, val, loss_fn, plans=plans, num_queries=6, topk=3, dtype="float32",
                       damping_ratio=cb.damping_ratio, progress=False)
    result = cb.last_checkpoint_result
    assert torch.equal(result.top_ids, direct.scores.top_ids)
    torch.testing.assert_close(result.top_scores, direct.scores.top_scores, rtol=1e-4, atol=1e-6)
    # resuming the same store reuses its learned plans instead of learning new ones
    cb2 = GraSSCallback(k=16, num_queries=6, topk=3, store_dir=tmp_path / "grass", storage_dtype="float32",
                        progress=False, mask="selective", selective_sample=32)
    t2 = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[cb2], enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False)
    cb2.setup(t2, model, "fit")
    assert cb2._selective_plans(t2, model)["net.0"] == learned


def test_joint_scorer_equals_a_dense_joint_reference(tmp_path):
    trainer, model, cb = fit(tmp_path, epochs=1, scorer="joint")
    store = GradientStore(cb.store.path, readonly=True)
    names = list(store.layers)
    rows = store.fetch(store.ids(), dtype=torch.float64)
    g = torch.cat([rows[n] for n in names], 1)                       # [n, K]
    fisher = g.T @ g / g.shape[0]
    lam = hand_damping(fisher, g.shape[0], cb.damping_ratio)
    h = fisher + lam * torch.eye(g.shape[1], dtype=torch.float64)
    taps = LayerTaps(model, plans=plans_from_store(store))
    _, val = data()
    with taps:
        _, q = query_gradients(model, taps, val, lambda m, b: F.cross_entropy(m.net(b[0]), b[1]), max_queries=6,
                               progress=False)
    dense = torch.cat([q[n] for n in names], 1).double() @ torch.linalg.solve(h, g.T)   # [m, n]
    order = dense.argsort(dim=1, descending=True)[:, :3]
    assert torch.equal(cb.last_result.top_ids, rows.ids[order])
    torch.testing.assert_close(cb.last_result.top_scores.double(), dense.gather(1, order), rtol=1e-4, atol=1e-6)
    self_ref = (g * torch.linalg.solve(h, g.T).T).sum(1)
    got = dict(zip(cb.last_result.self_influence_ids.tolist(), cb.last_result.self_influence.double().tolist()))
    torch.testing.assert_close(torch.tensor([got[i] for i in rows.ids.tolist()], dtype=torch.float64), self_ref,
                               rtol=1e-4, atol=1e-6)
