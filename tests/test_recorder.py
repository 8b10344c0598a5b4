"""StepRecorder: the training step's rows against today's synchronous path and exact gradients,
the Fisher against float64 references, flush ordering, writer errors, back-pressure, no host sync."""

from __future__ import annotations

import threading
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import grass_callback.fisher as fisher_mod
from grass_callback import GraSSCallback, IndexedDataset
from grass_callback.capture import LayerTaps, layer_shape, per_example_scale
from grass_callback.errors import StoreError
from grass_callback.fisher import FisherStats
from grass_callback.recorder import StepRecorder
from grass_callback.store import GradientStore

DIMS = {"a": 24, "b": 300}  # "b" is wide enough for the block-triangular update (4 panels)


def _rows(n, seed, dims=DIMS, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(n, k, generator=gen) * (i + 0.5)).to(dtype) for i, (name, k) in enumerate(dims.items())}


def _store(path, dims=DIMS, dtype="float16", **kw):
    return GradientStore(path, layer_dims=dims, dtype=dtype, **kw)


def _stored(store):
    """(ids, steps, {layer: rows}) of everything committed, in commit order."""
    chunks = list(GradientStore(store.path, readonly=True).iter_chunks())
    return (torch.cat([c.ids for c in chunks]), torch.cat([c.steps for c in chunks]),
            {n: torch.cat([c.grads[n] for c in chunks]) for n in chunks[0].grads})


def _reference_sums(rows):
    """sum_i g_i g_i^T in float64, one outer product at a time."""
    return {n: sum(torch.outer(r, r) for r in g.double()) for n, g in rows.items()}


# ---------------------------------------------------------------------- rows


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _exact(model, taps, x, y):
    """Each example's own weight(+bias) gradient, alone through plain autograd, projected."""
    out = {name: [] for name in taps.plans}
    with taps.paused():
        for i in range(len(x)):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            for name, m in taps.layers.items():
                g = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) if layer_shape(m).bias else m.weight.grad
                out[name].append(taps.plan_for(name).project_gradient(g[None].double()))
    return {name: torch.cat(r) for name, r in out.items()}


def test_recorded_rows_equal_the_synchronous_path_and_exact_gradients(tmp_path):
    torch.manual_seed(0)
    model = MLP().double()
    taps = LayerTaps(model, k=32)
    dims = taps.layer_dims
    ours, theirs = _store(tmp_path / "rec", dims, "float32"), _store(tmp_path / "sync", dims, "float32")
    fisher = FisherStats(dims)
    recorder = StepRecorder(ours, fisher, max_pending=2)
    exact, batches = {n: [] for n in dims}, []
    with taps:
        for step in range(5):
            x, y = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 3, (6,))
            ids = torch.arange(6 * step, 6 * step + 6)
            taps.set_scale(per_example_scale(6, "mean"))
            F.cross_entropy(model(x), y).backward()
            grads = taps.collect()
            recorder.record(ids, grads, step, epoch=0)
            theirs.append(ids, step, {n: g.detach().cpu().float() for n, g in grads.items()})  # today's cast + append
            batches.append(grads)
            for n, g in _exact(model, taps, x, y).items():
                exact[n].append(g)
    recorder.flush()
    theirs.flush()
    recorder.close()
    got_ids, got_steps, got = _stored(ours)
    want_ids, want_steps, want = _stored(theirs)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_steps, want_steps)
    assert torch.equal(got_ids, torch.arange(30))
    for n in dims:
        assert torch.equal(got[n], want[n])  # row for row, bit for bit
        ref = torch.cat(exact[n])
        assert ((got[n].double() - ref).norm() / ref.norm()) < 1e-6  # float32 storage of exact rows
    sums = _reference_sums(got)
    for n in dims:
        torch.testing.assert_close(fisher.sums[n], sums[n], rtol=1e-12, atol=1e-12)
    assert fisher.count == 30


def test_fisher_equals_a_float64_reference_and_a_resume_rebuilds_it_bit_for_bit(tmp_path):
    """float16 storage: the live Fisher (rows cast first, staggered folds, block-triangular update)
    equals the float64 sum over the stored rows, and rebuilding it from the store as a resume does
    (chunks of another size) gives the identical bits."""
    store = _store(tmp_path / "s", rows_per_shard=50)
    live = FisherStats(DIMS)
    recorder = StepRecorder(store, live)
    sizes = [7, 8, 1, 16, 8, 8, 13, 8, 8, 5, 8, 8]
    start = 0
    for step, b in enumerate(sizes):
        rows = _rows(b, seed=step)
        if step == 3:
            rows["a"][2, 5] = float("nan")
        recorder.record(torch.arange(start, start + b), rows, step)
        start += b
    recorder.flush()
    recorder.close()
    _, _, stored = _stored(store)
    assert stored["a"].shape[0] == sum(sizes) - 1 and live.count == sum(sizes) - 1
    ref = _reference_sums(stored)
    rebuilt = FisherStats(DIMS)
    for chunk in GradientStore(store.path, readonly=True).iter_chunks(chunk_rows=40):
        rebuilt.update(chunk.grads)
    for n in DIMS:
        torch.testing.assert_close(live.sums[n], ref[n], rtol=1e-13, atol=0)
        assert torch.equal(live.sums[n], rebuilt.sums[n])
        assert torch.equal(live.sums[n], live.sums[n].T)  # mirrored lower blocks
    assert live.count == rebuilt.count


def test_float32_products_folded_into_float64_match_the_reference():
    """The GPU set-up (float32 GEMMs into a float32 partial sum, folded every fold_rows rows) on
    the CPU: close to the float64 reference, and exact on integer rows."""
    stats = FisherStats(DIMS, compute_dtype=torch.float32, fold_rows=20, buffer_rows=8)
    exact = FisherStats(DIMS, compute_dtype=torch.float32, fold_rows=20, buffer_rows=8)
    all_rows, ints = [], []
    for step in range(9):
        rows = _rows(6, seed=100 + step)
        stats.update(rows)
        all_rows.append(rows)
        r = {n: torch.round(g * 4) for n, g in rows.items()}
        exact.update(r)
        ints.append(r)
    ref = _reference_sums({n: torch.cat([r[n] for r in all_rows]) for n in DIMS})
    ref_int = _reference_sums({n: torch.cat([r[n] for r in ints]) for n in DIMS})
    for n in DIMS:
        assert stats.sums[n].dtype == torch.float64
        torch.testing.assert_close(stats.sums[n], ref[n], rtol=1e-5, atol=1e-4)
        assert torch.equal(exact.sums[n], ref_int[n])


def test_folds_are_spread_over_the_steps(monkeypatch):
    """17 layers, 8 rows a step, 64-row buffers: about 2 layers fold per step (never all 17 at
    once), also after the sums were read in between (a scoring period)."""
    dims = {f"l{i}": 4 for i in range(17)}
    folds = []
    real = fisher_mod._gram_upper_
    monkeypatch.setattr(fisher_mod, "_gram_upper_", lambda total, g: (folds.append(g.shape[0]), real(total, g)))
    stats = FisherStats(dims, buffer_rows=64)
    per_step, rows = [], []
    for step in range(48):
        r = _rows(8, seed=step, dims=dims)
        rows.append(r)
        before = len(folds)
        stats.update(r)
        per_step.append(len(folds) - before)
        if step == 20:
            stats.sums  # noqa: B018 (a read folds every buffer)
    assert max(per_step) <= 3 and min(per_step[1:]) >= 1, per_step
    assert max(per_step[21:]) <= 3, per_step
    ref = _reference_sums({n: torch.cat([r[n] for r in rows]) for n in dims})
    for n in dims:
        torch.testing.assert_close(stats.sums[n], ref[n], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- non-finite rows


def test_nan_inf_and_float16_overflow_rows_are_dropped_and_counted(tmp_path):
    store = _store(tmp_path / "s")
    fisher = FisherStats(DIMS)
    recorder = StepRecorder(store, fisher)
    rows = _rows(6, seed=3)
    rows["a"][1, 0] = float("nan")
    rows["b"][3, 7] = float("inf")
    rows["b"][4, 2] = 70000.0  # finite in float32, Inf in the float16 store
    with pytest.warns(UserWarning, match=r"dropped 3 of 6 rows"):
        keep = recorder.record(torch.arange(10, 16), rows, 0)
        recorder.flush()
    assert keep.tolist() == [True, False, True, False, False, True]
    assert store.skipped_nonfinite == 3 and fisher.count == 3
    ids, _, stored = _stored(store)
    assert ids.tolist() == [10, 12, 15]
    ref = _reference_sums({n: g[keep].to(torch.float16) for n, g in rows.items()})
    for n in DIMS:
        assert torch.isfinite(fisher.sums[n]).all()
        torch.testing.assert_close(fisher.sums[n], ref[n], rtol=1e-13, atol=0)
    recorder.close()


# ---------------------------------------------------------------------- writer thread


def test_writer_errors_surface_on_the_training_thread_chained(tmp_path, monkeypatch):
    store = _store(tmp_path / "s")
    real, calls = GradientStore.append, []

    def failing(self, ids, step, grads, epoch=0, **kw):
        calls.append(step)
        if step == 1:
            raise OSError("disk on fire")
        return real(self, ids, step, grads, epoch=epoch, **kw)

    monkeypatch.setattr(GradientStore, "append", failing)
    recorder = StepRecorder(store, None)
    recorder.record(torch.arange(4), _rows(4, 0), 0)
    recorder.record(torch.arange(4, 8), _rows(4, 1), 1)
    with pytest.raises(StoreError, match="background store writer failed: OSError: disk on fire") as info:
        for step in range(2, 6):
            recorder.record(torch.arange(4 * step, 4 * step + 4), _rows(4, step), step)
        recorder.flush()
    assert isinstance(info.value.__cause__, OSError) and str(info.value.__cause__) == "disk on fire"
    with pytest.raises(StoreError, match="disk on fire"):  # stays failed: no silent gap in the rows
        recorder.flush()
    assert 0 in calls and 1 in calls and max(calls) <= 2  # nothing after the failure reached the store
    thread = recorder._thread
    recorder.close()  # reported already: no warning, no exception
    assert thread is not None and not thread.is_alive()
    assert store.buffered_rows == 4  # batch 0 is still there, intact


def test_back_pressure_bounds_the_batches_in_flight(tmp_path, monkeypatch):
    """With the writer held, two batches are accepted and the third ``record`` blocks until the
    writer moves (no timing: the writer waits on an event the test sets)."""
    store = _store(tmp_path / "s")
    real = GradientStore.append
    go = threading.Event()

    def held(self, ids, step, grads, epoch=0, **kw):
        go.wait(30)
        return real(self, ids, step, grads, epoch=epoch, **kw)

    monkeypatch.setattr(GradientStore, "append", held)
    recorder = StepRecorder(store, None, max_pending=2)
    for step in range(2):
        recorder.record(torch.arange(4 * step, 4 * step + 4), _rows(4, step), step)
    third = threading.Thread(target=recorder.record, args=(torch.arange(8, 12), _rows(4, 2), 2))
    third.start()
    third.join(0.5)
    assert third.is_alive() and recorder.pending == 2  # blocked: memory does not grow
    go.set()
    third.join(30)
    assert not third.is_alive()
    for step in range(3, 8):
        recorder.record(torch.arange(4 * step, 4 * step + 4), _rows(4, step), step)
        assert recorder.pending <= 2
    recorder.flush()
    recorder.close()
    assert recorder.peak_pending == 2
    assert store.num_rows == 32


def test_close_joins_the_writer_and_a_later_record_starts_a_new_one(tmp_path):
    store = _store(tmp_path / "s")
    recorder = StepRecorder(store, None)
    recorder.record(torch.arange(3), _rows(3, 0), 0)
    first = recorder._thread
    recorder.close()
    assert not first.is_alive() and store.buffered_rows == 3  # drained before the thread stopped
    recorder.record(torch.arange(3, 6), _rows(3, 1), 1)
    recorder.flush()
    recorder.close()
    assert store.num_rows == 6
    assert not any(t.name == "grass-store-writer" for t in threading.enumerate())


# ---------------------------------------------------------------------- in the callback


class Tiny(L.LightningModule):
    def __init__(self, losses: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.losses = losses

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        if self.losses:  # each example's loss too: the callback stores it beside the rows
            per_example = F.cross_entropy(self.net(x), y, reduction="none")
            return {"loss": per_example.mean(), "per_example_loss": per_example}
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n=40, batch=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch)


def _train(tmp_path, callbacks, module=None, **kw):
    loader = _loader()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=callbacks,
                        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, **kw)
    trainer.fit(module or Tiny(), loader)


def _callback(tmp_path):
    return GraSSCallback(k=16, num_queries=4, topk=2, store_dir=tmp_path / "grass", progress=False,
                         log_to_wandb=False, ensemble=False, query_loader=_loader())


def test_a_checkpoint_finds_every_earlier_row_committed(tmp_path, monkeypatch):
    """A slow store lets the writer fall behind; each checkpoint still sees every row of the steps
    before it on disk (flush in on_save_checkpoint)."""
    real = GradientStore.append

    def slow(self, *a, **k):
        time.sleep(0.05)
        return real(self, *a, **k)

    monkeypatch.setattr(GradientStore, "append", slow)
    cb = _callback(tmp_path)
    seen = []

    class Spy(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            on_disk = GradientStore(cb.store.path, readonly=True)
            seen.append((cb.batches_seen, on_disk.num_rows))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    _train(tmp_path, [cb, Spy(), ckpt])
    assert len(seen) >= 5 and all(rows == 8 * batches for batches, rows in seen), seen


_SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _watch_syncs(monkeypatch, active):
    """Record calls of Tensor methods that read a value back to the host, made on the main thread
    while ``active["on"]`` is set."""
    calls = []
    main = threading.main_thread()
    for name in _SYNCS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            if active["on"] and threading.current_thread() is main:
                calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_the_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    active = {"on": False}
    calls = _watch_syncs(monkeypatch, active)
    active["on"] = True
    bool(torch.tensor(True))  # the watch sees a sync
    active["on"] = False
    assert calls == ["__bool__"]
    calls.clear()
    cb = _callback(tmp_path)
    ran = []

    def watch(name):  # the rows are collected after backward and recorded, with their losses, at the batch end
        real = getattr(cb, name)

        def watched(*args):
            active["on"] = True
            try:
                real(*args)
            finally:
                active["on"] = False
            ran.append(name)

        monkeypatch.setattr(cb, name, watched)

    watch("_store_rows")
    watch("_record_rows")
    _train(tmp_path, [cb], module=Tiny(losses=True))
    assert sorted(ran) == ["_record_rows"] * 5 + ["_store_rows"] * 5 and calls == [], calls
    store = GradientStore(cb.store.path, readonly=True)
    assert store.num_rows == 40 and store.losses()[2].numel() == 40
    # the per-example scale from a GradScaler's scale tensor stays a tensor too
    active["on"] = True
    scale = per_example_scale(4, "mean", accumulate_grad_batches=2, grad_scale=torch.tensor(1024.0))
    active["on"] = False
    assert calls == []
    torch.testing.assert_close(scale, torch.full((4,), 8 / 1024))


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_finite_rows_equal_an_elementwise_reference(dtype):
    """Every element cast and asked isfinite, against the row maxima judged together; layers in
    float64 / float32 / bfloat16 with NaN, +-Inf, values that overflow the cast (or just fit) and zeros."""
    from grass_callback.recorder import finite_rows

    gen = torch.Generator().manual_seed(11)
    big = torch.finfo(dtype or torch.float32).max
    kinds = [float("nan"), float("inf"), -float("inf"), big * 1.01, -big * 0.99, 0.0]
    seen = set()
    for trial in range(20):
        rows = {n: torch.randn(5, k, generator=gen, dtype=torch.float64) for n, k in (("a", 6), ("b", 3), ("c", 4))}
        for n, g in rows.items():
            for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
                g[int(torch.randint(0, 5, (1,), generator=gen)), 0] = kinds[int(torch.randint(0, 6, (1,), generator=gen))]
        rows = {"a": rows["a"], "b": rows["b"].float(), "c": rows["c"].to(torch.bfloat16)}
        ref = torch.stack([torch.isfinite(g if dtype is None else g.to(dtype)).all(1) for g in rows.values()]).all(0)
        got = finite_rows(rows, dtype)
        assert torch.equal(got, ref), trial
        seen |= set(got.tolist())
    assert seen == {True, False}
