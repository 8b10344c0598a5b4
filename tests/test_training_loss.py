"""The per-example training loss: stored beside the rows, summed over the first half of training,
and part of ``suspect`` when ``training_step`` returns it (``per_example_loss_key``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset
from grass_callback import data_value as dv
from grass_callback.errors import ConfigError, GraSSError, StoreInputError
from grass_callback.store import GradientStore

N, BATCH, EPOCHS = 96, 32, 4  # 3 batches an epoch, 12 in all: the first half is batches 0-5


class LossModule(L.LightningModule):
    """An MLP whose ``training_step`` returns its examples' losses under ``key`` (``shorten``: one
    loss too few, a user's mistake)."""

    def __init__(self, key: str | None = "per_example_loss", shorten: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.key, self.shorten = key, shorten

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        out = {"loss": losses.mean()}
        if self.key is not None:
            out[self.key] = losses[:-1] if self.shorten else losses
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class StepLosses(L.Callback):
    """What ``training_step`` returned, with the batch's ids and its index in the fit."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((len(self.batches), batch[2].clone(), outputs["per_example_loss"].detach().double()))


def _data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N + 8, 8, generator=g), torch.randint(0, 3, (N + 8,), generator=g)
    y[:10] = (y[:10] + 1) % 3  # a few wrong labels
    train = DataLoader(IndexedDataset(TensorDataset(x[:N], y[:N])), batch_size=BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(2))
    queries = DataLoader(IndexedDataset(TensorDataset(x[N:], y[N:])), batch_size=8)
    return train, queries


def _fit(tmp_path: Path, module: LossModule, *, extra=(), accumulate: int = 1, **kwargs) -> GraSSCallback:
    train, queries = _data()
    grass = GraSSCallback(k=16, num_queries=8, query_loader=queries, log_to_wandb=False, progress=False,
                          store_dir=tmp_path / "grass", **kwargs)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[grass, *extra], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accumulate_grad_batches=accumulate)
    trainer.fit(module, train)
    return grass


def _dense(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, values = pair
    return torch.zeros(N, dtype=torch.float64).index_put_((ids,), values.double())


@pytest.mark.parametrize("keep_history,accumulate", [("period", 1), ("all", 1), ("period", 3)])
def test_training_loss_sums_the_steps_own_losses_over_the_first_half(tmp_path, keep_history, accumulate):
    """Half of the fit's batches, also when 3 batches make an optimizer step (6 batches: 2 steps)."""
    steps = StepLosses()
    grass = _fit(tmp_path, LossModule(), extra=[steps], keep_history=keep_history, accumulate=accumulate)
    window = math.ceil(EPOCHS * math.ceil(N / BATCH) / 2)
    want = torch.zeros(N, dtype=torch.float64)
    for index, ids, losses in steps.batches:
        if index < window:
            want.index_add_(0, ids, losses)
    assert window == 6 and len(steps.batches) == 12
    ids, values = grass.training_loss
    assert sorted(ids.tolist()) == list(range(N))
    assert values.tolist() == sorted(values.tolist(), reverse=True)  # highest first
    torch.testing.assert_close(_dense(grass.training_loss), want, rtol=1e-6, atol=1e-6)
    # every step's losses went to the store (float32), those of the later half too
    _, stored_steps, stored = GradientStore(tmp_path / "grass" / "train", readonly=True).losses()
    assert stored.numel() == N * EPOCHS and sorted(set(stored_steps.tolist())) == list(range(12))

    # suspect: 0.3 x the unit rank of the influence suspect + 0.7 x that of the training loss
    value, own = _dense(grass.data_value_tensors()), _dense(grass.self_influence)
    base = dv.suspect(value, own)
    with_loss = dv.suspect_with_loss(base, want)
    torch.testing.assert_close(_dense(grass.suspect), with_loss, rtol=0, atol=1e-6)
    assert (_dense(grass.suspect) - base).abs().max() > 0.05  # the loss changed the ranking

    # the suspect table (W&B and suspects.csv) carries the loss as its fifth column
    table = grass.data_value_tensors().suspects
    assert len(table) == 5
    torch.testing.assert_close(table[4], want[table[0]], rtol=1e-6, atol=1e-6)
    folder = Path(grass.last_report_folder)
    rows = [r for r in csv.reader(line for line in open(folder / "suspects.csv") if not line.startswith("#"))]
    assert rows[0] == ["train_id", "suspect", "data_value", "self_influence", "training_loss"]
    got = {int(r[0]): float(r[4]) for r in rows[1:]}
    assert got.keys() == set(range(N))
    assert max(abs(got[i] - float(want[i])) for i in got) < 1e-4 * float(want.abs().max())


def test_without_losses_the_suspect_is_the_influence_one_and_the_table_has_four_columns(tmp_path):
    grass = _fit(tmp_path, LossModule(key=None))
    assert grass.training_loss[0].numel() == 0
    torch.testing.assert_close(_dense(grass.suspect), dv.suspect(_dense(grass.data_value_tensors()),
                                                                 _dense(grass.self_influence)), rtol=0, atol=1e-12)
    assert len(grass.data_value_tensors().suspects) == 4


def test_per_example_loss_key_none_ignores_what_training_step_returns(tmp_path):
    grass = _fit(tmp_path, LossModule(), per_example_loss_key=None)
    assert grass.training_loss[0].numel() == 0
    _, _, stored = GradientStore(tmp_path / "grass" / "train", readonly=True).losses()
    assert stored.numel() == 0


def test_another_key_is_read_when_named(tmp_path):
    grass = _fit(tmp_path, LossModule(key="losses"), per_example_loss_key="losses")
    assert grass.training_loss[0].numel() == N


def test_per_example_losses_of_the_wrong_shape_are_a_clear_error(tmp_path):
    with pytest.raises(GraSSError, match=r"'per_example_loss' = \(31,\).*shape \[32\].*reduction='none'"):
        _fit(tmp_path, LossModule(shorten=True))


def test_a_key_that_is_not_a_string_is_a_config_error():
    with pytest.raises(ConfigError, match="per_example_loss_key"):
        GraSSCallback(per_example_loss_key=3)


def test_store_keeps_losses_beside_the_rows_through_drops_shards_and_truncation(tmp_path):
    store = GradientStore(tmp_path, layer_dims={"a": 4}, rows_per_shard=3)
    rows = torch.randn(2, 4)
    bad = rows.clone()
    bad[1, 0] = float("nan")  # this row is dropped, and its loss with it
    store.append(torch.tensor([0, 1]), 0, {"a": rows}, loss=torch.tensor([1.0, 2.0]))
    store.append(torch.tensor([2, 3]), 1, {"a": rows})  # no loss: not read by losses()
    store.append(torch.tensor([4, 5]), 2, {"a": bad}, loss=torch.tensor([5.0, 6.0]))
    store.append(torch.tensor([6, 7]), 3, {"a": rows}, loss=torch.tensor([7.0, 8.0]))
    store.flush()
    ids, steps, losses = store.losses()
    assert ids.tolist() == [0, 1, 4, 6, 7] and steps.tolist() == [0, 0, 2, 3, 3]
    assert losses.tolist() == [1.0, 2.0, 5.0, 7.0, 8.0]
    assert store.losses(min_step=1, max_step=2)[0].tolist() == [4]
    assert store.truncate_after(2) == 2  # a shard cut in two keeps its rows' losses
    reopened = GradientStore(tmp_path, readonly=True)
    assert reopened.losses()[2].tolist() == [1.0, 2.0, 5.0]
    with pytest.raises(StoreInputError, match=r"loss must be a floating Tensor\[2\]"):
        store.append(torch.tensor([8, 9]), 4, {"a": rows}, loss=torch.tensor([1.0]))


class StopAt(L.Callback):
    """Stops the fit with an error when ``global_step`` reaches ``step`` (a crash mid-epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


class RowLosses(L.Callback):
    """``(batch number, id) -> loss`` of every training step (the batch number is the callback's
    step: ``global_step`` before the step's update)."""

    def __init__(self) -> None:
        self.loss: dict[tuple[int, int], float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for i, v in zip(batch[2].tolist(), outputs["per_example_loss"].tolist()):
            self.loss[(trainer.global_step - 1, i)] = v


def test_a_resume_that_replays_part_of_an_epoch_keeps_each_stored_row_with_its_own_loss(tmp_path):
    """A crash in epoch 2 resumed from a mid-epoch checkpoint with a plain (not resumable) loader:
    the epoch restarts, its batches mix rows stored before the checkpoint (replays, left out) with
    new ones. Every stored row keeps the loss of the step that stored it, and ``training_loss`` is
    the sum of those of the first half."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, queries = _data()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_last=True)
    seen = RowLosses()

    def trainer(*extra):
        return L.Trainer(max_epochs=EPOCHS, callbacks=[grass(), *extra, seen, ckpt], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)

    def grass():
        return GraSSCallback(k=16, num_queries=8, query_loader=queries, log_to_wandb=False, progress=False,
                             store_dir=tmp_path / "grass")

    module = LossModule()
    with pytest.raises(RuntimeError, match="crash"):
        trainer(StopAt(8)).fit(module, train)
    second = trainer()
    with pytest.warns(UserWarning):  # the replayed epoch's rows were skipped and the rest missed: said so
        second.fit(LossModule(), train, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    callback = second.callbacks[0]
    assert callback.replayed_rows > 0  # the case under test: batches with rows left out
    store = GradientStore(tmp_path / "grass" / "train", readonly=True)
    ids, steps, losses = store.losses()
    assert ids.numel() == store.num_rows  # every stored row has its loss
    for i, step, loss in zip(ids.tolist(), steps.tolist(), losses.tolist()):
        assert loss == pytest.approx(seen.loss[(step, i)], rel=1e-6), (i, step)
    first_half = steps < 6
    want = torch.zeros(N, dtype=torch.float64).index_add_(0, ids[first_half], losses[first_half].double())
    torch.testing.assert_close(_dense(callback.training_loss), want, rtol=1e-6, atol=1e-6)


def test_a_checkpoint_without_loss_sums_warns_and_counts_the_steps_after_the_resume(tmp_path):
    """A checkpoint written by a version that kept no ``training_loss`` sums (its ``data_values``
    lack the key): the resumed run says that its earlier periods add no losses, and
    ``training_loss`` is the first half's losses from the resume on, not a silently short sum."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, queries = _data()
    seen = RowLosses()  # the resumed run's steps (made anew for it)

    def trainer(*extra):
        return L.Trainer(max_epochs=EPOCHS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[
                             GraSSCallback(k=16, num_queries=8, query_loader=queries, log_to_wandb=False,
                                           progress=False, store_dir=tmp_path / "grass"),
                             *extra, seen, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])

    with pytest.raises(RuntimeError, match="crash"):
        trainer(StopAt(4)).fit(LossModule(), train)  # last.ckpt: the end of epoch 0 (steps 0-2, one period)
    path = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("GraSSCallback")]
    assert state["data_values"]["periods"] == 1 and state["data_values"]["training_loss_ids"].numel() == N
    for key in ("training_loss", "training_loss_ids"):
        del state["data_values"][key]
    torch.save(ckpt, path)
    seen = RowLosses()
    second = trainer()
    with pytest.warns(UserWarning, match="did not sum training losses, so its 1 scoring period"):
        second.fit(LossModule(), train, ckpt_path=str(path))
    losses = {(step, i): v for (step, i), v in seen.loss.items() if 3 <= step < 6}  # after the resume, first half
    want = torch.zeros(N, dtype=torch.float64)
    for (_, i), v in losses.items():
        want[i] += v
    assert len(losses) == N  # the resumed epoch 1 stored every example once
    torch.testing.assert_close(_dense(second.callbacks[0].training_loss), want, rtol=1e-6, atol=1e-6)
