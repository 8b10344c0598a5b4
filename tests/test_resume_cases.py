"""Issue 12's cases, one test each: what used to end in a silent wrong result (or a crash from deep
inside) now ends in the right result or a clear error that says how to fix it.

The runs are tiny in-process fits (``tests/test_bad_inputs.py``'s module and loaders: 24 training
examples, batches of 6). Expected values come from the stored rows or from a run without the fault.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset
from grass_callback.errors import ConfigError, ScoringError
from grass_callback.store import GradientStore
from test_bad_inputs import BATCH, N, Tiny, callback, committed, fit, loader, tensors, tiny_loss


def last_ckpt(tmp_path):
    return str(tmp_path / "ckpt" / "last.ckpt")


def ckpt_cb(tmp_path):
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)


# ---------------------------------------------------------------------- callback state at every checkpoint


def test_state_saved_between_resume_and_next_period_keeps_the_ensemble(tmp_path):
    """Resume -> checkpoint before the next period -> crash -> resume used to lose the ensemble: the
    loaded one waited in ``_pending_ensemble`` and ``state_dict()`` saved ``None``."""
    cb = callback(tmp_path)
    fit(tmp_path, cb, callbacks=[ckpt_cb(tmp_path)])
    saved = torch.load(last_ckpt(tmp_path), weights_only=True)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("GraSSCallback"))
    assert state["ensemble"] is not None and state["ensemble"]["total"] is not None
    fresh = callback(tmp_path)
    fresh.load_state_dict(state)  # as Lightning does on resume, before on_train_start
    again = fresh.state_dict()
    assert again["ensemble"] is not None
    assert torch.equal(again["ensemble"]["total"], state["ensemble"]["total"])
    assert torch.equal(again["data_value"], state["data_value"])


def test_fit_on_a_finished_run_still_holds_its_data_value(tmp_path):
    cb = callback(tmp_path)
    fit(tmp_path, cb, callbacks=[ckpt_cb(tmp_path)])
    ids, values = cb.data_value_tensors()
    again = callback(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(tmp_path, again, callbacks=[ckpt_cb(tmp_path)], ckpt_path=last_ckpt(tmp_path))  # nothing left to train
    got_ids, got_values = again.data_value_tensors()
    assert ids.numel() == N
    assert torch.equal(got_ids, ids) and torch.equal(got_values, values)


# ---------------------------------------------------------------------- one callback object, two fits


class CrashAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def _values(cb):
    ids, values = cb.data_value_tensors()
    order = ids.argsort()
    return ids[order], values[order]


def test_a_second_fit_with_the_same_callback_taps_the_new_module(tmp_path):
    """The same callback in a second trainer, on another module: it kept the first fit's taps (on the
    old module) and closed store, and stopped with "the gradient store is closed". Now it scores
    the new module exactly as a callback made for it does."""
    cb = callback(tmp_path, store_dir=None)  # each trainer's store under its own default_root_dir
    fit(tmp_path / "first", cb)
    torch.manual_seed(3)
    fit(tmp_path / "second", cb, module=Tiny(hidden=5))
    fresh = callback(tmp_path, store_dir=None)
    torch.manual_seed(3)
    fit(tmp_path / "fresh", fresh, module=Tiny(hidden=5))
    assert cb.periods_scored == fresh.periods_scored == 1
    ids, values = _values(cb)
    want_ids, want = _values(fresh)
    assert ids.numel() == N and torch.equal(ids, want_ids)
    torch.testing.assert_close(values, want, rtol=1e-6, atol=1e-9)
    assert cb.taps.layer_dims == fresh.taps.layer_dims  # the new module's layers (width 5)


def test_a_second_fit_on_a_finished_store_with_the_same_callback_is_the_usual_clear_error(tmp_path):
    cb = callback(tmp_path)
    fit(tmp_path, cb)
    with pytest.raises(ConfigError, match="already holds 24 rows of a finished run"):
        fit(tmp_path, cb)


def test_a_crashed_fit_resumes_with_the_same_callback_object(tmp_path):
    """A notebook's way: the fit crashes, and the same callback object goes into ``fit(...,
    ckpt_path=...)``. The result is the uninterrupted run's."""
    torch.manual_seed(0)
    reference = callback(tmp_path / "ref")
    fit(tmp_path / "ref", reference, module=Tiny(), epochs=2)
    cb = callback(tmp_path)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="crash"):  # epoch 0 ends with last.ckpt; epoch 1 dies
        fit(tmp_path, cb, module=Tiny(), epochs=2, callbacks=[ckpt_cb(tmp_path), CrashAt(6)])
    fit(tmp_path, cb, module=Tiny(), epochs=2, callbacks=[ckpt_cb(tmp_path)], ckpt_path=last_ckpt(tmp_path))
    assert cb.periods_scored == reference.periods_scored == 2
    ids, values = _values(cb)
    want_ids, want = _values(reference)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-8)
    assert committed(tmp_path / "grass" / "train") == committed(tmp_path / "ref" / "grass" / "train")


def test_a_store_from_before_one_token_plans_names_the_option_that_continues_it(tmp_path):
    """A store written before layers without a token axis got their own plan (its plan configs lack
    ``one_token``): resuming into it stops with the option that continues it, and with
    ``plan_options={"one_token": False}`` the run goes on with the masks its rows were made with."""
    import json

    from grass_callback.errors import StoreMismatchError

    fit(tmp_path, callback(tmp_path), callbacks=[ckpt_cb(tmp_path)])
    meta = tmp_path / "grass" / "train" / "meta.json"
    stored = json.loads(meta.read_text())
    assert all("one_token" in cfg for cfg in stored["plan_config"].values())  # the case: MLP layers
    for cfg in stored["plan_config"].values():  # as an earlier version wrote it
        del cfg["one_token"]
    from grass_callback._store_format import _config_hash

    layers = [[str(e["name"]), int(e["k"])] for e in stored["layers"]]
    stored["config_hash"] = _config_hash(layers, stored["dtype"], stored["plan_config"], stored["config"])
    meta.write_text(json.dumps(stored))
    for manifest in meta.parent.glob("manifest-r*.json"):  # each manifest names the hash it was written for
        entry = json.loads(manifest.read_text())
        entry["config_hash"] = stored["config_hash"]
        manifest.write_text(json.dumps(entry))
    with pytest.raises(StoreMismatchError, match=r"plan_options=\{'one_token': False\}"):
        fit(tmp_path, callback(tmp_path), epochs=2, callbacks=[ckpt_cb(tmp_path)], ckpt_path=last_ckpt(tmp_path))
    old = callback(tmp_path, plan_options={"one_token": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the resume's usual notes (loader, finished epochs)
        fit(tmp_path, old, epochs=2, callbacks=[ckpt_cb(tmp_path)], ckpt_path=last_ckpt(tmp_path))
    assert old.periods_scored == 2 and GradientStore(tmp_path / "grass" / "train", readonly=True).num_rows == 2 * N


# ---------------------------------------------------------------------- what the state records


def test_resume_with_another_query_set_restarts_the_data_value(tmp_path):
    """Summing scores of other queries under the same query ids meant nothing: a warning, and the data
    value after the resumed epoch is that epoch's alone."""
    cb = callback(tmp_path)
    fit(tmp_path, cb, callbacks=[ckpt_cb(tmp_path)])
    other = callback(tmp_path, query_loader=loader(6, seed=7))
    with pytest.warns(UserWarning, match="query examples differ from those the checkpoint's"):
        fit(tmp_path, other, epochs=2, callbacks=[ckpt_cb(tmp_path)], ckpt_path=last_ckpt(tmp_path))
    ids, values = other.data_value_plain
    last = other.last_result
    want = dict(zip(last.data_value_ids.tolist(), last.data_value.double().tolist()))
    assert dict(zip(ids.tolist(), values.tolist())) == pytest.approx(want, rel=1e-9)


def test_resume_with_a_bigger_training_set_restarts_the_ensemble_instead_of_crashing(tmp_path):
    cb = callback(tmp_path)
    fit(tmp_path, cb, callbacks=[ckpt_cb(tmp_path)])
    bigger = callback(tmp_path)
    with pytest.warns(UserWarning, match=r"the training set has 30 examples, the checkpoint's had 24"):
        fit(tmp_path, bigger, train=loader(30), epochs=2, callbacks=[ckpt_cb(tmp_path)],
            ckpt_path=last_ckpt(tmp_path))
    assert bigger.ensemble_result is not None and bigger._ensemble.num_examples == 30
    assert bigger._ensemble.periods == 1  # restarted: only the resumed epoch


# ---------------------------------------------------------------------- scoring schedule


def test_score_every_n_steps_longer_than_the_run_warns_and_scores_at_the_end(tmp_path):
    cb = callback(tmp_path, score_every_n_steps=50)
    with pytest.warns(UserWarning, match=r"score_every_n_steps=50 is longer than the run \(4 training batches\)"):
        fit(tmp_path, cb)
    assert cb.periods_scored == 1
    assert sorted(cb.last_result.data_value_ids.tolist()) == list(range(N))


def test_the_last_short_period_is_scored(tmp_path):
    """score_every_n_steps=3 over 8 batches: periods end at 3 and 6, and the tail (batches 6, 7)
    is scored at the end of training (it used to be left out, like batches 195-199 of 200 at 13)."""
    cb = callback(tmp_path, score_every_n_steps=3)
    fit(tmp_path, cb, epochs=2)
    assert cb.periods_scored == 3
    ids, steps = committed(cb.store.path)
    tail = sorted(i for i, s in zip(ids, steps) if s >= 6)
    assert sorted(cb.last_result.data_value_ids.tolist()) == sorted(set(tail))


# ---------------------------------------------------------------------- sample identity across batches


def label_loader(n=64, batch=8):
    """Labels 0..7 in every batch (unique within it) named as the index field."""
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 3
    fake = torch.arange(n) % batch
    return DataLoader(TensorDataset(x, y, fake), batch_size=batch)


def test_an_index_field_that_is_not_an_index_is_named_in_a_warning(tmp_path):
    cb = callback(tmp_path, index_key=2)
    with pytest.warns(UserWarning, match=r"index_key=2 took only 8 distinct values over 64 training rows"):
        fit(tmp_path, cb, train=label_loader())


def test_a_sampler_with_replacement_keeps_each_draw_as_its_own_row(tmp_path):
    """A repeat inside an epoch (no resume) is a row of its own: training saw the example twice."""
    x, y = tensors()
    data = IndexedDataset(TensorDataset(x, y))
    sampler = RandomSampler(data, replacement=True, num_samples=N, generator=torch.Generator().manual_seed(3))
    draws = list(RandomSampler(data, replacement=True, num_samples=N, generator=torch.Generator().manual_seed(3)))
    cb = callback(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "not an index" warning for ~63% distinct
        warnings.filterwarnings("ignore", message=".*(does not have many workers|val_dataloader|LeafSpec).*")
        fit(tmp_path, cb, train=DataLoader(data, batch_size=BATCH, sampler=sampler))
    ids, _ = committed(cb.store.path)
    assert len(set(draws)) < N  # the draw does repeat
    assert sorted(ids) == sorted(draws)
    assert cb.replayed_rows == 0


# ---------------------------------------------------------------------- query set


def test_query_loss_returning_a_float_is_a_clear_error(tmp_path):
    cb = callback(tmp_path, query_loss_fn=lambda m, b: float(tiny_loss(m, b)))
    with pytest.raises(ScoringError, match=r"returned float on query batch 1; it must return a scalar loss tensor"):
        fit(tmp_path, cb)
    assert len(committed(cb.store.path)[0]) == N  # nothing stored is lost


def test_query_batches_of_another_feature_size_name_the_sizes(tmp_path):
    g = torch.Generator().manual_seed(1)
    queries = DataLoader(IndexedDataset(TensorDataset(torch.randn(6, 5, generator=g), torch.zeros(6, dtype=torch.long))),
                         batch_size=6)
    cb = callback(tmp_path, query_loader=queries)
    with pytest.raises(ScoringError, match=r"query batch 1 .*Feature sizes differ from the training batches: "
                                           r"\[0\]: training \[\*, 4\], query \[5\]"):
        fit(tmp_path, cb)
    assert len(committed(cb.store.path)[0]) == N


def test_one_nan_query_is_named(tmp_path):
    x, y = tensors(6, seed=1)
    x[2, 0] = float("nan")
    cb = callback(tmp_path, query_loader=DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=6))
    with pytest.raises(ScoringError, match=r"query ids \[2\] have NaN/Inf gradients"):
        fit(tmp_path, cb)
    assert len(committed(cb.store.path)[0]) == N


def test_garbage_manifest_binary_is_a_store_error(tmp_path):
    store = GradientStore(tmp_path / "s", layer_dims={"a": 2})
    store.append(torch.arange(3), 0, {"a": torch.randn(3, 2)})
    store.close()
    (tmp_path / "s" / "manifest-r000.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    from grass_callback.errors import StoreError

    with pytest.raises(StoreError, match=r"manifest .* is unreadable \(UnicodeDecodeError.*store repair"):
        GradientStore(tmp_path / "s", readonly=True).num_rows
