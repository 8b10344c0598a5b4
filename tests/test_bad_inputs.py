"""Bad inputs to GraSSCallback and the engine: each gets a clear error (or the documented fallback),
and nothing already stored is lost.

Where an error happens mid-training, the rows of the earlier steps must be committed and readable
after the exception: Lightning calls the callback's ``on_exception``, which closes (flushes) the
store.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from grass_callback import GraSSCallback, IndexedDataset
from grass_callback.attribution import attribute, plans_from_store, query_gradients, score_store
from grass_callback.capture import LayerTaps, per_example_scale
from grass_callback.errors import CaptureError, ConfigError, GraSSError, PlanError, StoreError, StoreMismatchError
from grass_callback.fisher import FisherStats
from grass_callback.store import GradientStore

N, BATCH = 24, 6  # 4 training batches per epoch


class Tiny(L.LightningModule):
    def __init__(self, hidden=8, lr=0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        self.lr = lr

    def loss(self, batch):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[:2]
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def on_before_optimizer_step(self, optimizer):
        # like a GradScaler: a step with non-finite gradients is skipped (keeps the weights finite
        # in the NaN/Inf test; a no-op otherwise)
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.parameters()):
            for p in self.parameters():
                p.grad = None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_loss(m, b):
    return m.loss(b)


def tensors(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def loader(n=N, seed=0, batch_size=BATCH, collate_fn=None, dicts=False):
    x, y = tensors(n, seed)
    data = [{"x": x[i], "y": y[i]} for i in range(n)] if dicts else TensorDataset(x, y)
    return DataLoader(IndexedDataset(data), batch_size=batch_size, collate_fn=collate_fn)


def callback(tmp_path, **kw):
    opts = dict(k=8, storage_dtype="float32", store_dir=tmp_path / "grass", num_queries=4, topk=2,
                log_to_wandb=False, progress=False, query_loader=loader(6, seed=1))
    opts.update(kw)
    return GraSSCallback(**opts)


def fit(tmp_path, cb, module=None, train=None, epochs=1, val=None, ckpt_path=None, callbacks=(), **kw):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=bool(callbacks),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1, default_root_dir=str(tmp_path), callbacks=[cb, *callbacks], **kw)
    module = module or Tiny()
    trainer.fit(module, train or loader(), val, ckpt_path=ckpt_path)
    return trainer, module


def committed(store_path):
    """``(ids, steps)`` of every committed row, read back by a fresh reader."""
    store = GradientStore(store_path, readonly=True)
    ids, steps = [], []
    for chunk in store.iter_chunks():
        ids += chunk.ids.tolist()
        steps += chunk.steps.tolist()
    return ids, steps


def bad_at(step, how, dicts=False):
    """A collate_fn that breaks the indices of training batch ``step`` (0-based, batches in order)."""

    def collate(samples):
        batch = default_collate(samples)
        index = batch["index"] if dicts else batch[-1]
        if int(index[0]) // BATCH != step:
            return batch
        if how == "missing":
            if dicts:
                return {k: v for k, v in batch.items() if k != "index"}
            return batch[:-1]
        if how == "duplicate":  # half the batch repeated: not a sampler with replacement
            index[1], index[3], index[5] = index[0], index[2], index[4]
        elif how == "outside":
            index += 1000
        return batch

    return collate


# ---------------------------------------------------------------------- sample identity


@pytest.mark.parametrize("how, match", [
    ("missing", r"carries no dataset indices \(the batch of an IndexedDataset has no 'index' key\); "
                r"wrap the training dataset with grass_callback.IndexedDataset"),
    ("duplicate", r"duplicate dataset indices in one batch \(\[12, 12, 14, 14, 16, 16\]\): only 3 distinct of 6"),
    ("outside", r"dataset indices must lie in \[0, 24\), got min 1012, max 1017"),
])
def test_bad_indices_at_step_2_keep_the_earlier_rows(tmp_path, how, match):
    cb = callback(tmp_path)
    with pytest.raises(CaptureError, match=match):
        fit(tmp_path, cb, train=loader(collate_fn=bad_at(2, how, dicts=True), dicts=True))
    ids, steps = committed(cb.store.path)
    assert sorted(ids) == list(range(2 * BATCH)) and sorted(set(steps)) == [0, 1]
    assert cb.store.closed  # on_exception closed it


def test_tuple_batch_whose_collate_dropped_the_index_is_flagged(tmp_path):
    """A tuple batch of an IndexedDataset that lost its index: its last element (the labels) would
    be read as the index. The labels repeat, so the duplicate error fires, with a note saying why."""
    cb = callback(tmp_path)
    with pytest.raises(CaptureError, match=r"duplicate dataset indices.*a collate_fn probably dropped the index"):
        fit(tmp_path, cb, train=loader(collate_fn=bad_at(1, "missing")))
    assert sorted(committed(cb.store.path)[0]) == list(range(BATCH))


def test_plain_dataset_without_indices_says_how_to_fix(tmp_path):
    x, y = tensors()
    plain = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    with pytest.raises(CaptureError, match=r"no index field was named.*IndexedDataset.*index_key="):
        fit(tmp_path, callback(tmp_path), train=plain)


# ---------------------------------------------------------------------- layers and plans


def test_no_tappable_layer(tmp_path):
    class ConvOnly(Tiny):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())

    with pytest.raises(CaptureError, match=r"ConvOnly has no nn.Linear or transformers Conv1D layer to tap "
                                           r"\(modules: \['net', 'net.0', 'net.1'\]\)"):
        fit(tmp_path, callback(tmp_path), module=ConvOnly())


def test_include_pattern_matching_nothing_lists_the_layers(tmp_path):
    with pytest.raises(CaptureError, match=r"no trainable linear layer matches include=\['encoder\.\*'\] "
                                           r"exclude=\[\]; the linear layers are: \['net.0', 'net.2'\]"):
        fit(tmp_path, callback(tmp_path, include="encoder.*"))
    module = Tiny()
    module.net[0].requires_grad_(False)
    with pytest.raises(CaptureError, match=r"include=\['net.0'\].*\(frozen, skipped: \['net.0'\]\)"):
        LayerTaps(module, include="net.0")


def test_explicit_mask_sizes_too_large():
    """Default sizes are clipped (small layers kept exactly); explicit ``k_in``/``k_out`` are not."""
    module = Tiny(hidden=8)  # net.0: 8 x (4 + bias), net.2: 3 x (8 + bias)
    with pytest.raises(PlanError, match=r"layer 'net.0' \(8x5 gradient incl. bias=True\) cannot give masks "
                                        r"k_in=16, k_out=4; use k_in <= 5 and k_out <= 8"):
        LayerTaps(module, k=8, plan_options={"k_in": 16, "k_out": 4})
    with pytest.raises(PlanError, match=r"layer 'net.0': k' = k_in\*k_out = 6 is below k = 8; "
                                        r"raise k_in/k_out or lower k"):
        LayerTaps(module, k=8, plan_options={"k_in": 3, "k_out": 2})
    assert issubclass(PlanError, GraSSError) and issubclass(PlanError, ValueError)
    # a k above the layer's size with default mask sizes: the whole gradient, exactly
    taps = LayerTaps(module, k=4096)
    assert taps.layer_dims == {"net.0": 40, "net.2": 27}
    x, y = tensors(5)
    with taps:
        taps.set_scale(per_example_scale(5, "sum"))
        F.cross_entropy(module.net(x), y, reduction="sum").backward()
        rows = taps.collect()
    module.zero_grad()
    F.cross_entropy(module.net(x[:1]), y[:1]).backward()
    first = torch.cat([module.net[0].weight.grad, module.net[0].bias.grad[:, None]], 1)
    torch.testing.assert_close(rows["net.0"][0], first.flatten(), rtol=1e-5, atol=1e-7)


def test_callback_with_k_above_every_layer_stores_whole_gradients(tmp_path):
    cb = callback(tmp_path, k=100_000)
    fit(tmp_path, cb)
    store = GradientStore(cb.store.path, readonly=True)
    assert store.layers == {"net.0": 40, "net.2": 27} and store.num_rows == N


# ---------------------------------------------------------------------- the store


def test_store_dir_that_cannot_be_created(tmp_path):
    """A store path under a regular file fails for root too (root ignores permission bits)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"could not lock the store directory .*a-file/grass .*writable"):
        fit(tmp_path, callback(tmp_path, store_dir=blocker / "grass"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: permission bits are not enforced (covered by the file-path test)")
def test_store_dir_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(StoreError, match="not writable; check its permissions"):
            fit(tmp_path, callback(tmp_path, store_dir=locked / "grass"))
    finally:
        locked.chmod(0o700)


def test_disk_full_mid_training_keeps_committed_shards(tmp_path, monkeypatch):
    """Shards are committed at every scoring (each step here); writes fail from step 2 on."""
    import grass_callback.store as store_mod

    real = store_mod._write_safetensors
    calls = {"shards": 0}

    def failing(path, tensors, metadata):
        if "ids" in tensors:  # a shard, not the plans file
            calls["shards"] += 1
            if calls["shards"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(store_mod, "_write_safetensors", failing)
    cb = callback(tmp_path, score_every_n_steps=1)
    with pytest.raises(StoreError, match=r"could not write the gradient shard .*the disk is full; free some space"):
        fit(tmp_path, cb)
    monkeypatch.setattr(store_mod, "_write_safetensors", real)
    ids, steps = committed(cb.store.path)
    assert sorted(steps) == [0] * BATCH + [1] * BATCH and sorted(ids) == list(range(2 * BATCH))


@pytest.mark.parametrize("change, match", [
    (dict(k=4), r"layers: other k: net.0 \(k 8 -> 4\)(.|\n)*config: k: stored 8, given 4"),
    (dict(seed=1), r"config: seed: stored 0, given 1\n  - plan tensors: values differ"),
    (dict(module=lambda: Tiny(hidden=6)), r"plan_config: net.0: d_out: stored 8, given 6, "),
])
def test_reusing_a_store_with_another_plan_or_model(tmp_path, change, match):
    cb = callback(tmp_path)
    fit(tmp_path, cb)
    before = committed(cb.store.path)
    change = dict(change)
    module = change.pop("module", Tiny)()
    cb2 = callback(tmp_path, **change)
    with pytest.raises(StoreMismatchError, match=match) as info:
        fit(tmp_path, cb2, module=module)
    assert "Use a new directory" in str(info.value)
    assert committed(cb.store.path) == before  # the old store is untouched


def test_fresh_fit_into_a_used_store_dir_is_refused(tmp_path):
    """A second, non-resumed fit into a finished run's store_dir would store every (example, epoch)
    twice: it is refused, naming the way out, and the old rows stay."""
    cb = callback(tmp_path)
    fit(tmp_path, cb)
    before = committed(cb.store.path)
    with pytest.raises(ConfigError, match=r"already holds 24 rows of a finished run.*ckpt_path=.*new store_dir"):
        fit(tmp_path, callback(tmp_path))
    assert committed(cb.store.path) == before


# ---------------------------------------------------------------------- non-finite losses


def test_nan_and_inf_examples_are_skipped_counted_and_warned_once(tmp_path):
    x, y = tensors()
    x[5, 0] = float("nan")
    x[13, 2] = float("inf")
    train = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH)
    cb = callback(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, module = fit(tmp_path, cb, train=train, epochs=2)
    nonfinite = [str(w.message) for w in caught if "NaN/Inf" in str(w.message)]
    assert len(nonfinite) == 1 and "dropped 1 of 6 rows" in nonfinite[0] and "(ids 5)" in nonfinite[0]
    assert cb.store.skipped_nonfinite == 4  # 2 examples x 2 epochs
    store = GradientStore(cb.store.path, readonly=True)
    ids = store.ids().tolist()
    assert len(ids) == 2 * (N - 2) and 5 not in ids and 13 not in ids
    # the last epoch's scores are finite and equal the engine run on the stored (finite) rows:
    # the Fisher the callback fitted was not poisoned
    result = cb.last_result
    assert torch.isfinite(result.top_scores).all() and torch.isfinite(result.data_value).all()
    stats = FisherStats(store.layers)
    for chunk in store.iter_chunks(epochs=[1]):
        stats.update(chunk.grads)
    assert stats.count == N - 2
    taps = LayerTaps(module, plans=plans_from_store(store))
    with taps:
        q_ids, q_grads = query_gradients(module, taps, loader(6, seed=1), tiny_loss, max_queries=4, progress=False)
    direct = score_store(store, stats.fit(cb.damping_ratio), q_ids, q_grads, topk=2, epochs=[1], progress=False)
    assert torch.equal(direct.top_ids, result.top_ids)
    torch.testing.assert_close(direct.top_scores, result.top_scores, rtol=1e-4, atol=1e-6)


def test_attribute_leaves_nonfinite_rows_out_of_the_fisher(tmp_path):
    x, y = tensors()
    x[3, 1] = float("nan")
    module = Tiny()
    with pytest.warns(UserWarning, match=r"dropped 1 of 6 rows with NaN/Inf gradients at step 0 \(ids 3\)"):
        out = attribute(module, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH),
                        loader(4, seed=1), tiny_loss, k=8, store_dir=tmp_path / "s", progress=False)
    assert out.store.skipped_nonfinite == 1 and out.store.num_rows == N - 1
    assert torch.isfinite(out.scores.top_scores).all() and torch.isfinite(out.scores.self_influence).all()


# ---------------------------------------------------------------------- queries


def test_empty_query_set(tmp_path):
    empty = DataLoader(IndexedDataset(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))),
                       batch_size=4)
    cb = callback(tmp_path, query_loader=empty)
    with pytest.raises(GraSSError, match="the query set is empty: pass a query loader with at least one batch"):
        fit(tmp_path, cb)
    assert sorted(committed(cb.store.path)[0]) == list(range(N))  # the epoch's rows are kept


def test_no_query_source_at_all(tmp_path):
    cb = callback(tmp_path, query_loader=None)
    with pytest.raises(GraSSError, match=r"no query examples: give GraSSCallback\(query_loader=...\)"):
        fit(tmp_path, cb)
    assert len(committed(cb.store.path)[0]) == N


def test_taps_gradients_under_no_grad_is_a_clear_error():
    module = Tiny()
    x, y = tensors(4)
    taps = LayerTaps(module, k=8)
    with taps, taps.recording(), torch.no_grad():
        loss = F.cross_entropy(module.net(x), y)
        with pytest.raises(CaptureError, match=r"not under torch.no_grad.*wrap the forward and this call in "
                                               r"`with torch.enable_grad\(\):`"):
            taps.gradients(loss)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_engine_passes_work_when_called_under_no_grad(tmp_path, context):
    """``query_gradients``/``attribute`` turn gradients on for their passes (a hook inside
    Lightning's validation loop runs under inference mode)."""
    module = Tiny()
    taps = LayerTaps(module, k=8)
    with taps:
        want = query_gradients(module, taps, loader(4, seed=1), tiny_loss, progress=False)[1]
        with context():
            got = query_gradients(module, taps, loader(4, seed=1), tiny_loss, progress=False)[1]
    with context():
        out = attribute(module, loader(), loader(4, seed=1), tiny_loss, k=8, store_dir=tmp_path / "s",
                        progress=False)
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    assert out.store.num_rows == N and torch.isfinite(out.scores.top_scores).all()
    assert all(p.grad is None for p in module.parameters())


def test_checkpoint_attribution_at_the_end(tmp_path):
    cb = callback(tmp_path, checkpoint_attribution="end")
    fit(tmp_path, cb)
    result = cb.last_checkpoint_result
    assert result.data_value.numel() == N and torch.isfinite(result.top_scores).all()


def test_checkpoint_attribution_saved_inside_the_validation_loop(tmp_path):
    """``checkpoint_attribution="save"`` with a ModelCheckpoint that saves in ``on_validation_end``:
    the pass runs inside Lightning's ``torch.inference_mode`` and must still get gradients."""
    cb = callback(tmp_path, checkpoint_attribution="save", query_loader=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=False, monitor="val_loss")
    fit(tmp_path, cb, val=loader(6, seed=1), callbacks=[ckpt])
    assert ckpt.best_model_path and Path(ckpt.best_model_path).exists()
    result = cb.last_checkpoint_result
    assert result.data_value.numel() == N and torch.isfinite(result.top_scores).all()


# ---------------------------------------------------------------------- W&B


def _scores_written(cb):
    return (Path(cb.store_dir) / "scores" / "epoch-0" / "influence.csv").is_file()


@pytest.mark.parametrize("how", ["missing", "disabled", "offline"])
def test_training_completes_and_writes_local_files_whatever_wandb(tmp_path, monkeypatch, how):
    import grass_callback.report as report

    monkeypatch.setattr(report, "_warned_local_only", False)  # the reason is warned once per process
    if how == "missing":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    else:
        monkeypatch.setenv("WANDB_MODE", how)
    cb = callback(tmp_path, log_to_wandb=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, cb)
    assert cb.last_result is not None and _scores_written(cb)
    messages = " ".join(str(w.message) for w in caught)
    runs = list(Path(cb.store_dir).glob("wandb/offline-run-*/*.wandb"))
    if how == "missing":
        assert "wandb is not installed" in messages and not runs
    elif how == "disabled":
        assert "W&B is disabled" in messages and not runs
    else:
        assert len(runs) == 1


# ---------------------------------------------------------------------- resume


def test_resume_with_another_configuration(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = callback(tmp_path)
    fit(tmp_path, cb, callbacks=[ckpt])
    before = committed(cb.store.path)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    # same store_dir, other k: the store refuses first, naming what it holds and what was given
    with pytest.raises(StoreMismatchError, match=r"config: k: stored 8, given 4"):
        fit(tmp_path, callback(tmp_path, k=4), epochs=2, ckpt_path=last)
    # a new store_dir, other k: the checkpoint's callback state refuses, naming both configurations
    with pytest.raises(ConfigError, match=r"written with GraSSCallback settings \{'k': 8, .*but the callback now "
                                          r"has \{'k': 4, .*start a new store_dir"):
        fit(tmp_path, callback(tmp_path, k=4, store_dir=tmp_path / "other"), epochs=2, ckpt_path=last)
    assert committed(cb.store.path) == before


# ---------------------------------------------------------------------- plan options


@pytest.mark.parametrize("options, match", [
    ({"bogus": 1}, r"plan_options takes \['oversample', 'keep_narrow', 'wide_output_skew', 'c', 'one_token'\], got \['bogus'\]"),
    ({"mask_run": 1}, r"use GraSSCallback\(mask_run=\.\.\.\)"),
    ([("oversample", 2)], "must be a mapping"),
    ({"oversample": -1}, r"plan_options \{'oversample': -1\} are not valid for k=8: oversample must be a positive number"),
    ({"c": 3}, r"not valid for k=8: the SJLT needs c >= 1 dividing k"),
    ({"wide_output_skew": 0.5}, "wide_output_skew must be a number >= 1"),
    ({"one_token": "yes"}, "one_token must be True, False or None"),
])
def test_bad_plan_options_are_refused_when_the_callback_is_made(tmp_path, options, match):
    with pytest.raises(ConfigError, match=match):
        callback(tmp_path, plan_options=options)
    with pytest.raises(ConfigError, match="mask='random'"):
        callback(tmp_path, plan_options={"oversample": 8}, mask="selective")


def test_plan_options_reach_every_plan_and_a_resume_with_others_stops(tmp_path):
    from grass_callback.projection import mask_sizes

    cb = callback(tmp_path, k=16, plan_options={"oversample": 16})
    fit(tmp_path, cb, module=Tiny(hidden=64))
    first = cb.taps.plans["net.0"]  # 4 (+ bias) -> 64: the narrow input kept whole, the output gets the rest
    assert (first.k_in, first.k_out) == mask_sizes(16, 5, 64, oversample=16) == (5, 52)
    assert mask_sizes(16, 5, 64) == (5, 13)  # the default budget would keep a quarter of that
    assert cb.config["plan_options"] == {"oversample": 16}
    # the same store, other plans: the error names the mask sizes that differ
    with pytest.raises(StoreMismatchError, match=r"plan_config: net\.0: k_out: stored 52, given 13; net\.2: k_in: "
                                                 r"stored 65, given 22\n  - config: plan_options only in the store"):
        fit(tmp_path, callback(tmp_path, k=16), module=Tiny(hidden=64))
