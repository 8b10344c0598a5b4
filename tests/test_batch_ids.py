"""The batch's dataset indices on a GPU: brought to the host during the step, checked after backward.

On a GPU the callback copies the index field into pinned host memory at the start of the step and
reads the copy after backward (``grass_callback/_batch_ids.py``), so no step waits for the device.
This machine has no GPU, so these tests force that path on the CPU (``BatchIds.in_flight`` patched
to ``True``: the callback then defers the check and the admission exactly as it does on a GPU) and
compare it with the immediate path: the same rows stored, the same errors, the same replays
skipped after a mid-epoch resume, and no index value read before the forward pass.
``tests/test_gpu.py`` runs the real thing under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from grass_callback._batch_ids import BatchIds
from grass_callback.errors import CaptureError
from grass_callback.store import GradientStore
from test_bad_inputs import BATCH, N, Tiny, bad_at, callback, fit, loader


def _defer(monkeypatch) -> None:
    monkeypatch.setattr(BatchIds, "in_flight", property(lambda self: True))


def _rows(store_path) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """(id, epoch) -> that row of every layer, read back from the committed store."""
    out = {}
    for chunk in GradientStore(store_path, readonly=True).iter_chunks():
        epochs = chunk.epochs if getattr(chunk, "epochs", None) is not None else torch.zeros_like(chunk.ids)
        for j, (i, e) in enumerate(zip(chunk.ids.tolist(), epochs.tolist())):
            assert (i, e) not in out, f"row ({i}, {e}) stored twice"
            out[(i, e)] = {name: g[j].clone() for name, g in chunk.grads.items()}
    return out


class Ordered(Tiny):
    """Logs 'forward' at each training forward, so a test can see what came before it."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def training_step(self, batch, batch_idx):
        self.log.append("forward")
        return super().training_step(batch, batch_idx)


def _spy_host(monkeypatch, log: list[str]) -> None:
    real = BatchIds.host

    def host(self):
        log.append("host")
        return real(self)

    monkeypatch.setattr(BatchIds, "host", host)


def test_deferred_indices_store_the_same_rows_and_data_value(tmp_path, monkeypatch):
    torch.manual_seed(0)
    now = callback(tmp_path / "now")
    fit(tmp_path / "now", now, epochs=2)
    _defer(monkeypatch)
    torch.manual_seed(0)
    later = callback(tmp_path / "later")
    fit(tmp_path / "later", later, epochs=2)
    a, b = _rows(now.store.path), _rows(later.store.path)
    assert len(a) == 2 * N and a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    ids_a, values_a = now.data_value_tensors()
    ids_b, values_b = later.data_value_tensors()
    assert torch.equal(ids_a, ids_b) and torch.equal(values_a, values_b)


def test_deferred_indices_are_read_after_the_forward_pass(tmp_path, monkeypatch):
    _defer(monkeypatch)
    log: list[str] = []
    _spy_host(monkeypatch, log)
    fit(tmp_path, callback(tmp_path), module=Ordered(log))
    train = log[: log.index("forward") + 2 * (N // BATCH)]  # the training steps (queries come after)
    steps = "".join("F" if e == "forward" else "h" for e in train)
    # each step: its forward first, then its indices read (the query pass reads none)
    assert steps.startswith("Fh" * (N // BATCH)), steps


def test_immediate_path_reads_indices_before_the_forward_pass(tmp_path, monkeypatch):
    """The reference of the test above (the CPU path): the spy can tell the two orders apart."""
    log: list[str] = []
    _spy_host(monkeypatch, log)
    fit(tmp_path, callback(tmp_path), module=Ordered(log))
    steps = "".join("F" if e == "forward" else "h" for e in log[: 2 * (N // BATCH)])
    assert steps == "hF" * (N // BATCH), steps


@pytest.mark.parametrize("how, match", [
    ("duplicate", r"duplicate dataset indices in one batch \(\[12, 12, 14, 14, 16, 16\]\): only 3 distinct of 6"),
    ("outside", r"dataset indices must lie in \[0, 24\), got min 1012, max 1017"),
])
def test_deferred_indices_still_reject_bad_indices_and_keep_the_earlier_rows(tmp_path, monkeypatch, how, match):
    _defer(monkeypatch)
    cb = callback(tmp_path)
    with pytest.raises(CaptureError, match=match):
        fit(tmp_path, cb, train=loader(collate_fn=bad_at(2, how, dicts=True), dicts=True))
    rows = _rows(cb.store.path)
    assert sorted(i for i, _ in rows) == list(range(2 * BATCH))  # batch 2's rows never reached the store


@pytest.mark.parametrize("deferred", [False, True])
def test_mid_epoch_resume_skips_the_replayed_rows(tmp_path, monkeypatch, deferred):
    """Killed (stopped) after 2 of epoch 1's 4 batches, resumed from that checkpoint: the loader
    replays epoch 1 from its first batch. The replayed rows are skipped before any work (the epoch
    may replay, so its indices are read at the start of the step even when deferred) and every
    (id, epoch) is stored once, with the uninterrupted run's rows."""
    torch.manual_seed(0)
    ref = callback(tmp_path / "ref")
    fit(tmp_path / "ref", ref, epochs=2)
    expected = _rows(ref.store.path)

    if deferred:
        _defer(monkeypatch)
    root = tmp_path / "run"
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    torch.manual_seed(0)
    first = callback(root)
    fit(root, first, epochs=2, callbacks=[ckpt], max_steps=N // BATCH + 2)
    log: list[str] = []
    _spy_host(monkeypatch, log)
    torch.manual_seed(0)
    again = callback(root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(resumed mid-epoch|not resumable|missing from the store).*")
        fit(root, again, epochs=2, callbacks=[ModelCheckpoint(dirpath=root / "ckpt2")],
            ckpt_path=str(root / "ckpt" / "last.ckpt"), module=Ordered(log))
    assert again.replayed_rows == 2 * BATCH
    # Lightning replays epoch 1 from its first batch but runs only the 2 batches it had left, so
    # the rest of that epoch is never reached (reported as missed rows), as without deferral
    assert again.missed_rows == 2 * BATCH
    missed = {(i, 1) for i in range(2 * BATCH, N)}
    got = _rows(again.store.path)
    assert got.keys() == expected.keys() - missed
    for key in got:
        for name in expected[key]:
            torch.testing.assert_close(got[key][name], expected[key][name])
    # the replayed epoch: indices read before each forward (so the replayed batches do no work)
    steps = "".join("F" if e == "forward" else "h" for e in log[:4])
    assert steps == "hFhF", steps


def test_batch_ids_on_the_cpu_are_the_batch_tensor_as_int64():
    value = torch.tensor([3, 1, 2], dtype=torch.int32)
    ids = BatchIds(value)
    assert not ids.in_flight and ids.numel == 3
    out = ids.host()
    assert out.dtype == torch.int64 and out.tolist() == [3, 1, 2]


def test_a_tensor_learning_rate_is_summed_as_a_tensor_and_read_at_the_period_end(monkeypatch):
    """A capturable optimizer keeps its lr in a (device) tensor: reading it every step would sync.
    The period's mean learning rate is still exact, read once in ``weight()``."""
    from types import SimpleNamespace

    from grass_callback.ensembling import PeriodLearningRate

    lrs = [0.5, 0.25, 0.125]
    group = {"lr": torch.tensor(lrs[0])}
    trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[group])])
    period = PeriodLearningRate()
    with monkeypatch.context() as m:
        def no_read(*_a, **_k):
            raise AssertionError("the learning-rate tensor was read during a step")
        for name in ("item", "__float__", "tolist", "cpu", "__bool__"):
            m.setattr(torch.Tensor, name, no_read)
        for lr in lrs:
            group["lr"] = torch.tensor(lr)
            period.observe(trainer)
    assert period.weight("lr") == pytest.approx(sum(lrs) / 3, rel=1e-12)
    assert period.weight("uniform") == 1.0
    assert period.state_dict() == {"total": pytest.approx(sum(lrs)), "steps": 3}
