"""Crash safety: SIGKILL a training run at many points, resume from the last checkpoint, compare.

The runs are ``tests/scripts/crash_train.py`` (a tiny 3-epoch fit with ``GraSSCallback`` and
``ModelCheckpoint(every_n_train_steps=3, save_last=True)``), forked by that script's ``serve``
mode so Lightning is imported once. For every case: the run is killed at a point (a
``GRASS_CRASH_AT`` value; some cases kill the resumed run once more), then resumed from
``last.ckpt`` (from scratch when no checkpoint was written) to the end. Then the store must
open, verify and hold each (example, epoch) exactly once with the reference run's rows, and the
final data value must equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from grass_callback.store import GradientStore

SCRIPT = Path(__file__).parent / "scripts" / "crash_train.py"
N_TRAIN, EPOCHS, STEPS, PERIODS = 48, 3, 18, 3  # as in the script
JOB_TIMEOUT_S = 180

# Each case: the crash points of successive runs ("point:n", the n-th call in that run), and whether
# the final run resumes from last.ckpt (False: the kill came before the first checkpoint, so it
# starts from scratch); after the last crash a run without one resumes to the end. Call counts in one full run: capture 42
# (36 training batches x 2 layers, then 2 per query pass), append / optimizer_step 18, checkpoint
# saves 12 (a top-k one and last.ckpt at steps 3, 6, ..., 18), shard writes 12 (+1 plans file),
# scoring periods 3 (epoch ends, after the checkpoint of their last batch).
CASES: list[tuple[tuple[str, ...], bool]] = [
    # capture (inside the backward hook; the query pass of a scoring period)
    (("capture:1",), False),                # first batch, nothing on disk but the store's meta
    (("capture:15",), True),               # mid epoch 1
    (("capture:28",), True),               # the query pass of epoch 1's scoring
    # rows appended, no checkpoint for them yet
    (("append:3",), False),                 # a shard was committed inside append; no checkpoint exists yet
    (("optimizer_step:9",), True),         # step 9's rows buffered, its checkpoint not written
    (("append:16",), True),
    # shard and manifest writes
    (("shard_tmp:1",), False),              # the plans file's temp at store creation (before meta.json)
    (("shard_tmp:2",), False),              # first shard: temp written and fsync'ed, not renamed
    (("shard_tmp:7",), True),
    (("shard_renamed:1",), False),          # shard renamed, manifest not updated: an orphan shard
    (("shard_renamed:6",), True),
    (("manifest_tmp:1",), False),           # meta.json's temp written, not renamed
    (("manifest_tmp:4",), True),           # a manifest's temp written, not renamed
    (("manifest_done:5",), True),          # manifest renamed (shard committed), then killed
    (("flush:4",), True),                  # a checkpoint's flush about to start
    # Fisher fit and scoring (epoch ends)
    (("fisher_fit:1",), True),             # epoch 0's scoring; last.ckpt is from its last batch
    (("fisher_fit:2",), True),
    (("fisher_fit:3",), True),             # the last epoch: last.ckpt is at the final step
    (("query:2",), True),                  # query gradients of epoch 1
    (("score_chunk:1",), True),            # streamed scores of epoch 0
    (("report_file:6",), True),            # half of epoch 1's report files written
    (("epoch_end:3",), True),              # everything scored, the run not finished
    # checkpoint save
    (("ckpt_hook:1",), False),              # store flushed for the first checkpoint, nothing saved
    (("ckpt_hook:6",), True),
    (("ckpt_dump:3",), True),              # checkpoint serialised in memory, no file
    (("ckpt_tmp:4",), True),               # checkpoint bytes in the temp file, not moved into place
    (("ckpt_written:5",), True),           # top-k checkpoint in place, last.ckpt still the older one
    (("ckpt_written:12",), True),          # the final last.ckpt in place, the last epoch not scored
    (("ckpt_remove:2",), True),            # new checkpoint saved, the previous not removed
    # a second crash while resuming
    (("manifest_done:5", "truncate:1"), True),         # before dropping the rows newer than the checkpoint
    (("manifest_done:5", "manifest_done:1"), True),    # rows dropped from the manifest, their files not deleted
    (("append:11", "shard_renamed:1"), True),          # in the first shard write after resuming
    (("ckpt_written:7", "fisher_fit:1"), True),        # in the catch-up scoring of an epoch whose end was missed
]
# cases whose kill leaves a temp file or an unlisted shard behind: the store must ignore it
LEAVES_ORPHAN = {"shard_tmp", "shard_renamed", "manifest_tmp"}
ORPHAN_CASES = {("manifest_done:5", "manifest_done:1")}


class ForkServer:
    """``crash_train.py serve`` in a subprocess: one JSON job per line, one JSON reply per job."""

    def __init__(self, tmp: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONFAULTHANDLER", "GRASS_CRASH_AT")}
        env.update(WANDB_MODE="disabled", TMPDIR=str(tmp), PYTHONPATH=str(SCRIPT.parents[2]))
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self._reply(JOB_TIMEOUT_S) == {"ready": True}

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            pytest.fail(f"crash_train.py serve gave no answer in {timeout} s (a hung run?)")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"crash_train.py serve exited with {self.proc.wait()}")
        return json.loads(line)

    def start(self, workdir: Path, tag: str, crash: str | None = None, resume: bool = False,
              loader: str = "ordered", announce: bool = False, ckpt_every: int = 3, k: int | None = None) -> int | None:
        """Send a job; with ``announce`` return the child's pid (then call :meth:`wait`)."""
        job = {"workdir": str(workdir), "tag": tag, "crash": crash, "resume": resume, "loader": loader,
               "announce": announce, "ckpt_every": ckpt_every, **({"k": k} if k is not None else {})}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self._reply(JOB_TIMEOUT_S)["pid"]) if announce else None

    def wait(self) -> dict:
        return self._reply(JOB_TIMEOUT_S)

    def run(self, workdir: Path, tag: str, crash: str | None = None, resume: bool = False,
            loader: str = "ordered", ckpt_every: int = 3, k: int | None = None) -> dict:
        self.start(workdir, tag, crash, resume, loader, ckpt_every=ckpt_every, k=k)
        return self.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def read_store(workdir: Path) -> tuple[GradientStore, dict[tuple[int, int], torch.Tensor], list[tuple[int, int]], int]:
    """The store (readonly), its rows by (id, epoch), every (id, epoch) read, and the orphan count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the orphans left by a kill are reported on open
        store = GradientStore(workdir / "grass" / "train", readonly=True)
    rows, pairs = {}, []
    for chunk in store.iter_chunks(chunk_rows=64):
        flat = torch.cat([chunk.grads[name] for name in store.layers], dim=1)
        for i, (idx, epoch) in enumerate(zip(chunk.ids.tolist(), chunk.epochs.tolist())):
            pairs.append((idx, epoch))
            rows[(idx, epoch)] = flat[i]
    return store, rows, pairs, len(store.orphans())


def log_tail(workdir: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(workdir.glob("log-*.txt")))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ForkServer(tmp_path_factory.mktemp("crash-tmp"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference(server: ForkServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run: its rows by (id, epoch) and its final data value."""
    ref_dir = tmp_path_factory.mktemp("reference")
    assert server.run(ref_dir, "ref") == {"exitcode": 0, "signal": None}, log_tail(ref_dir)
    ref = torch.load(ref_dir / "result.pt")
    assert (ref["batches_seen"], ref["periods_scored"]) == (STEPS, PERIODS)
    _, rows, pairs, _ = read_store(ref_dir)
    assert sorted(pairs) == [(i, e) for i in range(N_TRAIN) for e in range(EPOCHS)]
    value = dict(zip(ref["ids"].tolist(), ref["values"].tolist()))
    assert len(value) == N_TRAIN
    assert sorted(ref["training_loss"][0].tolist()) == list(range(N_TRAIN))  # the steps' losses were kept
    return {"rows": rows, "pairs": pairs, "value": value, "training_loss": ref["training_loss"], "suspect": ref["suspect"]}


def assert_matches_reference(workdir: Path, reference: dict, what: object) -> tuple[dict, int]:
    """Every (example, epoch) once with the reference's gradient, a whole store, the same data value."""
    res = torch.load(workdir / "result.pt")
    assert (res["batches_seen"], res["periods_scored"]) == (STEPS, PERIODS), what
    store, rows, pairs, orphans = read_store(workdir)
    assert len(pairs) == len(set(pairs)) == N_TRAIN * EPOCHS, (what, len(pairs), len(set(pairs)))
    assert set(pairs) == set(reference["pairs"]), what
    for key, row in rows.items():
        torch.testing.assert_close(row, reference["rows"][key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{what} {key}: {m}")
    # the listed shards are whole (size and sha256); what a kill left unlisted is never read
    assert store.verify() == [], what
    assert store.corrupt_shards == 0, what
    value = dict(zip(res["ids"].tolist(), res["values"].tolist()))
    assert value.keys() == reference["value"].keys(), what
    ids = sorted(reference["value"])
    got_v = torch.tensor([value[i] for i in ids], dtype=torch.float64)
    want_v = torch.tensor([reference["value"][i] for i in ids], dtype=torch.float64)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-6 * float(want_v.abs().max()),
                               msg=lambda m: f"{what}: {m}")
    if "training_loss" in reference:  # each step's losses once, from the store beside the rows
        for key in ("training_loss", "suspect"):
            got_ids, got = res[key]
            want_ids, want = reference[key]
            assert sorted(got_ids.tolist()) == sorted(want_ids.tolist()), (what, key)
            torch.testing.assert_close(got[got_ids.argsort()], want[want_ids.argsort()], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{what} {key}: {m}")
    return res, orphans


@pytest.mark.parametrize("case", CASES, ids=["+".join(c[0]) for c in CASES])
def test_sigkill_then_resume_gives_the_uninterrupted_result(server: ForkServer, reference: dict, tmp_path: Path,
                                                            case: tuple) -> None:
    """One kill point (or two, the second while resuming): resume from ``last.ckpt`` (or from scratch
    when the kill came before the first checkpoint), then the uninterrupted run's rows and data value."""
    crashes, from_checkpoint = case
    workdir = tmp_path / "run"
    for r, crash in enumerate(crashes):
        got = server.run(workdir, f"crash{r}", crash=crash, resume=r > 0)
        assert got["signal"] == signal.SIGKILL, (crashes, crash, got, log_tail(workdir))
    got = server.run(workdir, "resume", resume=True)
    assert got == {"exitcode": 0, "signal": None}, (crashes, got, log_tail(workdir))
    res, orphans = assert_matches_reference(workdir, reference, crashes)
    assert (res["resumed_from"] is not None) == from_checkpoint, (crashes, res["resumed_from"])
    if {crash.partition(":")[0] for crash in crashes} & LEAVES_ORPHAN or crashes in ORPHAN_CASES:
        assert orphans > 0, f"{crashes}: the kill should have left a temp file or an unlisted shard"
    log = (workdir / "log-resume.txt").read_text()
    if from_checkpoint:  # the resume said what it dropped and from how many rows it rebuilt the Fisher
        assert "grass_callback: resumed at batch" in log, log[-2000:]


# A period's 48 rows are at most half of the first layer's 112 gradient columns at k = 128: its Fisher
# is solved through the rows' kernel, and a resume rebuilds it from the stored rows.
DUAL_K = 128
DUAL_CASES = [("capture:15",), ("capture:28",), ("optimizer_step:9",), ("fisher_fit:2",), ("score_chunk:1",),
              ("ckpt_written:7", "fisher_fit:1"), ("manifest_done:5", "truncate:1")]


@pytest.fixture(scope="module")
def dual_reference(server: ForkServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ref_dir = tmp_path_factory.mktemp("reference-dual")
    assert server.run(ref_dir, "ref", k=DUAL_K) == {"exitcode": 0, "signal": None}, log_tail(ref_dir)
    ref = torch.load(ref_dir / "result.pt")
    _, rows, pairs, _ = read_store(ref_dir)
    return {"rows": rows, "pairs": pairs, "value": dict(zip(ref["ids"].tolist(), ref["values"].tolist())),
            "training_loss": ref["training_loss"], "suspect": ref["suspect"]}


@pytest.mark.parametrize("crashes", DUAL_CASES, ids=["+".join(c) for c in DUAL_CASES])
def test_sigkill_then_resume_with_kernel_solved_periods_gives_the_uninterrupted_result(
        server: ForkServer, dual_reference: dict, tmp_path: Path, crashes: tuple) -> None:
    workdir = tmp_path / "run"
    for r, crash in enumerate(crashes):
        got = server.run(workdir, f"crash{r}", crash=crash, resume=r > 0, k=DUAL_K)
        assert got["signal"] == signal.SIGKILL, (crashes, crash, got, log_tail(workdir))
    got = server.run(workdir, "resume", resume=True, k=DUAL_K)
    assert got == {"exitcode": 0, "signal": None}, (crashes, got, log_tail(workdir))
    assert_matches_reference(workdir, dual_reference, crashes)


# ---------------------------------------------------------------------- fast, in-process resume checks


def _store_with_steps(path: Path, steps: int = 10) -> tuple[GradientStore, dict[int, tuple]]:
    """A float32 store with 3 rows per step (steps 0..steps-1, 4 steps per epoch, small shards)."""
    store = GradientStore(path, layer_dims={"a": 4, "b": 3}, dtype="float32", rows_per_shard=5)
    g = torch.Generator().manual_seed(0)
    rows = {}
    for step in range(steps):
        ids, epoch = torch.arange(step * 3, step * 3 + 3) % 12, step // 4
        grads = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(3, 3, generator=g)}
        store.append(ids, step, grads, epoch=epoch)
        rows[step] = (ids, epoch, grads)
    store.flush()
    return store, rows


def _resumed_callback(tmp_path: Path, store: GradientStore, **state):
    from types import SimpleNamespace

    from grass_callback import GraSSCallback
    from grass_callback._continuity import load_plain_state
    from grass_callback.fisher import FisherStats

    cb = GraSSCallback(k=4, store_dir=tmp_path, log_to_wandb=False, progress=False)
    cb.store, cb.fisher = store, FisherStats(store.layers)
    load_plain_state(cb, state)
    cb._resume(SimpleNamespace(world_size=1))
    return cb


def test_resume_keeps_exactly_the_rows_before_the_checkpoint_and_rebuilds_the_period_fisher(tmp_path: Path) -> None:
    """Checkpoint after batch 6 (``batches_seen=7``), period from batch 4: rows of batches 0..6 stay
    (one step more or less fails), and the Fisher is the sum of g g^T over batches 4..6, computed here
    from the appended rows."""
    store, rows = _store_with_steps(tmp_path / "train")
    cb = _resumed_callback(tmp_path, store, batches_seen=7, period_start=4, last_batch_epoch=1)
    steps = torch.cat([c.steps for c in store.iter_chunks()])
    assert sorted(set(steps.tolist())) == list(range(7))
    assert steps.numel() == 7 * 3
    assert cb.fisher.count == 3 * 3
    for name in ("a", "b"):
        g = torch.cat([rows[s][2][name] for s in (4, 5, 6)]).double()
        torch.testing.assert_close(cb.fisher.sums[name].double(), g.T @ g, rtol=1e-6, atol=1e-8)


def test_resume_ledger_skips_rows_already_stored_in_the_resumed_epoch(tmp_path: Path) -> None:
    """After the resume at batch 6 (epoch 1 holds batches 4, 5), a replay of epoch 1's ids is skipped
    and counted; new ids of that epoch and any id of epoch 2 are kept."""
    store, rows = _store_with_steps(tmp_path / "train")
    cb = _resumed_callback(tmp_path, store, batches_seen=6, period_start=4, last_batch_epoch=1)
    stored_e1 = torch.cat([rows[4][0], rows[5][0]])
    keep = cb._ledger.admit(stored_e1[:4], 1)
    assert keep is not None and not bool(keep.any())
    assert cb._ledger.replayed[1] == 4
    fresh = torch.tensor([i for i in range(12) if i not in set(stored_e1.tolist())][:3])
    assert cb._ledger.admit(fresh, 1) is None
    assert cb._ledger.admit(stored_e1[:3], 2) is None
