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

# Each case: the crash points of successive runs ("point:n", the n-th call in that run); after
# the last one a run without a crash resumes to the end. Call counts in one full run: capture 42
# (36 training batches x 2 layers, then 2 per query pass), append / optimizer_step 18, checkpoint
# saves 12 (a top-k one and last.ckpt at steps 3, 6, ..., 18), shard writes 12 (+1 plans file),
# scoring periods 3 (epoch ends, after the checkpoint of their last batch).
CASES: list[tuple[str, ...]] = [
    # capture (inside the backward hook; the query pass of a scoring period)
    ("capture:1",),                # first batch, nothing on disk but the store's meta
    ("capture:15",),               # mid epoch 1
    ("capture:28",),               # the query pass of epoch 1's scoring
    # rows appended, no checkpoint for them yet
    ("append:3",),                 # a shard was committed inside append; no checkpoint exists yet
    ("optimizer_step:9",),         # step 9's rows buffered, its checkpoint not written
    ("append:16",),
    # shard and manifest writes
    ("shard_tmp:1",),              # the plans file's temp at store creation (before meta.json)
    ("shard_tmp:2",),              # first shard: temp written and fsync'ed, not renamed
    ("shard_tmp:7",),
    ("shard_renamed:1",),          # shard renamed, manifest not updated: an orphan shard
    ("shard_renamed:6",),
    ("manifest_tmp:1",),           # meta.json's temp written, not renamed
    ("manifest_tmp:4",),           # a manifest's temp written, not renamed
    ("manifest_done:5",),          # manifest renamed (shard committed), then killed
    ("flush:4",),                  # a checkpoint's flush about to start
    # Fisher fit and scoring (epoch ends)
    ("fisher_fit:1",),             # epoch 0's scoring; last.ckpt is from its last batch
    ("fisher_fit:2",),
    ("fisher_fit:3",),             # the last epoch: last.ckpt is at the final step
    ("query:2",),                  # query gradients of epoch 1
    ("score_chunk:1",),            # streamed scores of epoch 0
    ("report_file:6",),            # half of epoch 1's report files written
    ("epoch_end:3",),              # everything scored, the run not finished
    # checkpoint save
    ("ckpt_hook:1",),              # store flushed for the first checkpoint, nothing saved
    ("ckpt_hook:6",),
    ("ckpt_dump:3",),              # checkpoint serialised in memory, no file
    ("ckpt_tmp:4",),               # checkpoint bytes in the temp file, not moved into place
    ("ckpt_written:5",),           # top-k checkpoint in place, last.ckpt still the older one
    ("ckpt_written:12",),          # the final last.ckpt in place, the last epoch not scored
    ("ckpt_remove:2",),            # new checkpoint saved, the previous not removed
    # a second crash while resuming
    ("manifest_done:5", "truncate:1"),         # before dropping the rows newer than the checkpoint
    ("manifest_done:5", "manifest_done:1"),    # rows dropped from the manifest, their files not deleted
    ("append:11", "shard_renamed:1"),          # in the first shard write after resuming
    ("ckpt_written:7", "fisher_fit:1"),        # in the catch-up scoring of an epoch whose end was missed
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

    def run(self, workdir: Path, tag: str, crash: str | None = None, resume: bool = False) -> dict:
        job = {"workdir": str(workdir), "tag": tag, "crash": crash, "resume": resume}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._reply(JOB_TIMEOUT_S)

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


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_result(server: ForkServer, tmp_path: Path) -> None:
    started = time.perf_counter()
    ref_dir = tmp_path / "reference"
    assert server.run(ref_dir, "ref") == {"exitcode": 0, "signal": None}, log_tail(ref_dir)
    ref = torch.load(ref_dir / "result.pt")
    assert (ref["batches_seen"], ref["periods_scored"]) == (STEPS, PERIODS)
    _, ref_rows, ref_pairs, _ = read_store(ref_dir)
    assert sorted(ref_pairs) == [(i, e) for i in range(N_TRAIN) for e in range(EPOCHS)]
    ref_value = dict(zip(ref["ids"].tolist(), ref["values"].tolist()))
    assert len(ref_value) == N_TRAIN

    outcomes = []
    for c, crashes in enumerate(CASES):
        workdir = tmp_path / f"case{c:02d}-{'+'.join(crashes).replace(':', '_')}"
        for r, crash in enumerate(crashes):
            got = server.run(workdir, f"crash{r}", crash=crash, resume=r > 0)
            assert got["signal"] == signal.SIGKILL, (crashes, crash, got, log_tail(workdir))
        got = server.run(workdir, "resume", resume=True)
        assert got == {"exitcode": 0, "signal": None}, (crashes, got, log_tail(workdir))

        res = torch.load(workdir / "result.pt")
        assert (res["batches_seen"], res["periods_scored"]) == (STEPS, PERIODS), crashes
        store, rows, pairs, orphans = read_store(workdir)
        # every (example, epoch) exactly once, with the reference run's gradient
        assert len(pairs) == len(set(pairs)) == N_TRAIN * EPOCHS, (crashes, len(pairs), len(set(pairs)))
        assert set(pairs) == set(ref_pairs), crashes
        for key, row in rows.items():
            torch.testing.assert_close(row, ref_rows[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{crashes} {key}: {m}")
        # the listed shards are whole (size and sha256); what a kill left unlisted is never read
        assert store.verify() == [], crashes
        assert store.corrupt_shards == 0, crashes
        if {crash.partition(":")[0] for crash in crashes} & LEAVES_ORPHAN or crashes in ORPHAN_CASES:
            assert orphans > 0, f"{crashes}: the kill should have left a temp file or an unlisted shard"
        # the final data value is the uninterrupted run's
        value = dict(zip(res["ids"].tolist(), res["values"].tolist()))
        assert value.keys() == ref_value.keys(), crashes
        got_v = torch.tensor([value[i] for i in sorted(ref_value)], dtype=torch.float64)
        want_v = torch.tensor([ref_value[i] for i in sorted(ref_value)], dtype=torch.float64)
        torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-6 * float(want_v.abs().max()),
                                   msg=lambda m: f"{crashes}: {m}")
        outcomes.append((crashes, res["resumed_from"] is not None, orphans))
    elapsed = time.perf_counter() - started
    print(f"\n{len(CASES)} crash cases in {elapsed:.1f} s")
    for crashes, resumed, orphans in outcomes:
        how = "resumed from last.ckpt" if resumed else "restarted from scratch"
        print(f"  {' then '.join(crashes):40s} {how}, {orphans} orphan file(s) ignored")
    assert len(CASES) >= 20
    assert any(resumed for _, resumed, _ in outcomes) and not all(resumed for _, resumed, _ in outcomes)
