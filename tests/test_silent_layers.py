"""Layers that get no gradient (a pooler the loss ignores): reported once, no longer tapped, and not
stored (a layer all zero in a shard is not written; readers give zeros); scores equal a run with
``exclude=[layer]``; a resumed run knows them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset
from grass_callback.store import GradientStore

N, DIM, CLASSES, BATCH = 48, 6, 3, 8


# ----------------------------------------------------------------------------- the store


def _entries(path: Path) -> list[dict]:
    return [e for m in sorted(path.glob("manifest-r*.json")) for e in json.loads(m.read_text())["shards"]]


def _keys(path: Path, entry: dict) -> set[str]:
    with safe_open(str(path / entry["file"]), framework="pt") as f:
        return set(f.keys())


def test_a_layer_all_zero_in_a_shard_is_not_written_and_reads_back_as_zeros(tmp_path: Path) -> None:
    layers = {"a": 5, "pooler": 4}
    store = GradientStore(tmp_path / "s", layer_dims=layers, rows_per_shard=6)
    rows = {}
    for step in range(4):  # 3 rows a step; shards of 6 rows
        ids = torch.arange(3 * step, 3 * step + 3)
        g = {"a": torch.randn(3, 5), "pooler": torch.zeros(3, 4)}
        if step == 3:
            g["pooler"][1, 2] = 0.5  # one non-zero row: that shard keeps the layer
        store.append(ids, step, g)
        for i, r in zip(ids.tolist(), range(3)):
            rows[i] = {n: t[r] for n, t in g.items()}
    store.flush()
    entries = _entries(tmp_path / "s")
    assert [e.get("zero_layers", []) for e in entries] == [["pooler"], []]
    assert [("g/pooler" in _keys(tmp_path / "s", e)) for e in entries] == [False, True]
    assert entries[0]["bytes"] < entries[1]["bytes"]

    def check(s: GradientStore) -> None:
        for chunk in s.iter_chunks(chunk_rows=4):
            for j, i in enumerate(chunk.ids.tolist()):
                for n in layers:
                    assert torch.equal(chunk.grads[n][j].float(), rows[i][n].half().float())
        got = s.fetch(torch.tensor([11, 1, 10, 4]))
        for j, i in enumerate([11, 1, 10, 4]):
            assert torch.equal(got["pooler"][j], rows[i]["pooler"].half().float())
            assert torch.equal(got["a"][j], rows[i]["a"].half().float())
        assert s.verify() == []

    check(store)
    reopened = GradientStore(tmp_path / "s")
    check(reopened)
    # truncation rewrites a shard: a zero layer stays unwritten, the kept rows read the same
    assert reopened.truncate_after(1) == 6
    entry, = _entries(tmp_path / "s")
    assert entry.get("zero_layers") == ["pooler"] and "g/pooler" not in _keys(tmp_path / "s", entry)
    assert sorted(reopened.fetch(torch.arange(6)).ids.tolist()) == list(range(6))
    reopened.close()


def test_a_rebuilt_manifest_keeps_the_zero_layers(tmp_path: Path) -> None:
    from grass_callback.store_tools import repair

    store = GradientStore(tmp_path / "s", layer_dims={"a": 3, "pooler": 2}, rows_per_shard=4)
    store.append(torch.arange(4), 0, {"a": torch.randn(4, 3), "pooler": torch.zeros(4, 2)})
    store.close()
    want = _entries(tmp_path / "s")
    (tmp_path / "s" / "manifest-r000.json").write_text("{ broken")
    repair(tmp_path / "s")
    assert [e.get("zero_layers") for e in _entries(tmp_path / "s")] == [w.get("zero_layers") for w in want] \
        == [["pooler"]]
    assert float(GradientStore(tmp_path / "s").fetch(torch.arange(4))["pooler"].abs().sum()) == 0.0


def test_skipped_taps_give_zero_rows_without_compressing_and_leave_the_others_as_they_were() -> None:
    from grass_callback.capture import LayerTaps

    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))

    def rows(taps: LayerTaps) -> dict:
        with taps:
            taps.set_scale(torch.ones(6))
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            return taps.collect(), taps.pop_compute_seconds()

    full, _ = rows(LayerTaps(model, k=4))
    taps = LayerTaps(model, k=4)
    taps.skip(["0"])
    calls = []
    original = taps.plans["0"].compress
    taps.plans["0"].compress = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    skipped, _ = rows(taps)
    assert calls == [] and taps.skipped == ["0"]
    assert float(full["0"].abs().sum()) > 0 and torch.equal(skipped["0"], torch.zeros_like(full["0"]))
    assert torch.equal(skipped["2"], full["2"])
    with pytest.raises(Exception, match="not tapped layers"):
        taps.skip(["nope"])


# ----------------------------------------------------------------------------- the callback


class Pooled(L.LightningModule):
    """Two linear layers on the loss's path and a BERT-like pooler that runs but feeds no loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.pooler = nn.Linear(DIM, 8), nn.Linear(8, CLASSES), nn.Linear(8, 8)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        h = torch.tanh(self.body(x))
        self.pooled = torch.tanh(self.pooler(h))  # computed, returned by a real model, unused by the loss
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _data() -> IndexedDataset:
    g = torch.Generator().manual_seed(1)
    return IndexedDataset(TensorDataset(torch.randn(N, DIM, generator=g), torch.randint(0, CLASSES, (N,), generator=g)))


def _fit(tmp_path: Path, name: str, *, epochs: int = 3, exclude=None, ckpt_path=None, save: bool = False):
    data = _data()
    L.seed_everything(0, verbose=False)
    grass = GraSSCallback(k=8, num_queries=6, topk=4, exclude=exclude, log_to_wandb=False, progress=False,
                          store_dir=tmp_path / name, rows_per_shard=16, query_loader=DataLoader(data, batch_size=6),
                          damping_ratio=0.1)
    callbacks = [grass]
    if save:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / f"{name}-ckpt", save_top_k=-1,
                                                             filename="{epoch}"))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=save,
                        num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = Pooled()
        if ckpt_path is not None:
            torch.manual_seed(0)
        trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=False), ckpt_path=ckpt_path)
    said = [str(w.message) for w in seen if "got no gradient" in str(w.message)]
    return grass, said


def _shard_keys(train_dir: Path) -> list[set[str]]:
    return [_keys(train_dir, e) for e in _entries(train_dir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("silent")
    torch.set_num_threads(1)
    out = {"root": root, "tapped": _fit(root, "tapped"), "excluded": _fit(root, "excluded", exclude=["pooler"])}
    return out


def test_a_layer_with_no_gradient_is_reported_once_then_not_tapped_or_stored(runs: dict) -> None:
    grass, said = runs["tapped"]
    assert len(said) == 1 and "['pooler']" in said[0] and "exclude=['pooler']" in said[0]  # over 3 periods
    assert grass.silent_layers == ["pooler"] and grass.taps.skipped == ["pooler"]
    train = Path(grass.store_dir) / "train"
    keys = _shard_keys(train)
    assert len(keys) >= 3 and all("g/pooler" not in k and "g/body" in k and "g/head" in k for k in keys)
    assert all(e["zero_layers"] == ["pooler"] for e in _entries(train))
    assert GradientStore(train).layers == {"body": 8, "head": 8, "pooler": 8}  # the layer set stays the store's


def test_scores_equal_a_run_that_excludes_the_layer(runs: dict) -> None:
    (tapped, _), (excluded, said) = runs["tapped"], runs["excluded"]
    assert said == []
    a, b = tapped.last_result, excluded.last_result
    assert torch.equal(a.query_ids, b.query_ids)
    assert torch.equal(a.top_ids, b.top_ids)
    torch.testing.assert_close(a.top_scores, b.top_scores, rtol=1e-5, atol=1e-6)
    order_a, order_b = a.self_influence_ids.argsort(), b.self_influence_ids.argsort()
    torch.testing.assert_close(a.self_influence[order_a], b.self_influence[order_b], rtol=1e-5, atol=1e-6)
    ids_a, val_a = tapped.data_value_tensors()
    ids_b, val_b = excluded.data_value_tensors()
    torch.testing.assert_close(val_a[ids_a.argsort()], val_b[ids_b.argsort()], rtol=1e-5, atol=1e-6)
    assert excluded.silent_layers == []


def test_a_resumed_run_knows_the_silent_layers(runs: dict) -> None:
    root = runs["root"]
    first, said = _fit(root, "resumed", epochs=1, save=True)
    assert len(said) == 1 and first.silent_layers == ["pooler"]
    ckpt, = (root / "resumed-ckpt").glob("epoch=0*.ckpt")
    assert torch.load(ckpt, weights_only=False)["callbacks"]
    second, said_again = _fit(root, "resumed", epochs=3, ckpt_path=str(ckpt))
    assert said_again == []  # known from the checkpoint: not reported again
    assert second.silent_layers == ["pooler"] and second.taps.skipped == ["pooler"]
    assert all("g/pooler" not in k for k in _shard_keys(Path(second.store_dir) / "train"))
    full, _ = runs["tapped"]
    ids_a, val_a = full.data_value_tensors()
    ids_b, val_b = second.data_value_tensors()
    torch.testing.assert_close(val_b[ids_b.argsort()], val_a[ids_a.argsort()], rtol=1e-5, atol=1e-6)
