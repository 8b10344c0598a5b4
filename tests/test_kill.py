"""SIGKILL from outside at random wall-clock times, then resume: exactly once, nothing missing.

Each trial runs ``tests/scripts/crash_train.py``'s 3-epoch fit (48 examples, batches of 8,
``last.ckpt`` every 3 steps) in a child of the fork server, kills it with SIGKILL after a random
delay (a third of the trials kill the resumed run once more), then resumes from ``last.ckpt`` (or
from scratch when none was written) to the end. Delays are drawn from a seeded generator over the
length of an uninterrupted run measured here (up to 0.8 of it: a busy machine slows some runs
down, others not), so the kills land anywhere: capture, shard and
manifest writes, the Fisher fit, scoring, checkpoint saves, or after the end.

* ``stateful``: torchdata's ``StatefulDataLoader`` (unshuffled: see ``crash_train.data``), which
  Lightning restores mid-epoch (``last.ckpt`` every 5 steps, never at an epoch's last batch: see
  ``crash_train.run``).
  The store holds every (example, epoch) exactly once with the uninterrupted run's gradient, and
  the final data value is the uninterrupted run's.
* ``shuffled``: a plain shuffled ``DataLoader``; after a mid-epoch resume Lightning restarts the
  epoch from its first batch. No (example, epoch) is stored twice, and the rows the replay never
  reached are exactly the ones the callback reports (``missed_rows``).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from test_crash import EPOCHS, N_TRAIN, PERIODS, STEPS, ForkServer, assert_matches_reference, log_tail, read_store

TRIALS = 12  # per loader: 24 in all, a third of them killed twice
SEED = 20261201


CKPT_EVERY = {"stateful": 5, "shuffled": 3}  # stateful: no checkpoint at an epoch's last batch (see crash_train.run)


def reference_run(server: ForkServer, workdir: Path, loader: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    assert server.run(workdir, "ref", loader=loader, ckpt_every=CKPT_EVERY[loader]) == {"exitcode": 0, "signal": None}, log_tail(workdir)
    seconds = time.perf_counter() - t0
    hint = "torchdata.stateful_dataloader.StatefulDataLoader (Lightning restores it mid-epoch)"
    assert (hint in (workdir / "log-ref.txt").read_text()) == (loader == "shuffled")  # the start message
    res = torch.load(workdir / "result.pt")
    assert (res["batches_seen"], res["periods_scored"]) == (STEPS, PERIODS)
    _, rows, pairs, _ = read_store(workdir)
    assert sorted(pairs) == [(i, e) for i in range(N_TRAIN) for e in range(EPOCHS)]
    return {"rows": rows, "pairs": pairs, "value": dict(zip(res["ids"].tolist(), res["values"].tolist()))}, seconds


def kill_after(server: ForkServer, workdir: Path, tag: str, loader: str, delay: float, resume: bool) -> bool:
    """Start a run, SIGKILL it after ``delay`` seconds; whether the kill landed before it ended."""
    pid = server.start(workdir, tag, resume=resume, loader=loader, announce=True, ckpt_every=CKPT_EVERY[loader])
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already ended and reaped
    got = server.wait()
    if got["signal"] is None:
        assert got["exitcode"] == 0, (tag, got, log_tail(workdir))
    return got["signal"] == signal.SIGKILL


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ForkServer(tmp_path_factory.mktemp("kill-tmp"))
    yield srv
    srv.close()


@pytest.mark.parametrize("loader", ["stateful", "shuffled"])
def test_sigkill_at_random_times_then_resume(server: ForkServer, tmp_path: Path, loader: str) -> None:
    reference, seconds = reference_run(server, tmp_path / "reference", loader)
    rng = random.Random(f"{SEED}-{loader}")
    killed = twice = replayed = missed_total = 0
    for trial in range(TRIALS):
        workdir = tmp_path / f"trial{trial:02d}"
        kills = 2 if trial % 3 == 2 else 1
        landed = []
        for k in range(kills):
            landed.append(kill_after(server, workdir, f"kill{k}", loader, rng.uniform(0.0, 0.8 * seconds),
                                     resume=k > 0))
        got = server.run(workdir, "resume", resume=True, loader=loader, ckpt_every=CKPT_EVERY[loader])
        assert got == {"exitcode": 0, "signal": None}, (trial, got, log_tail(workdir))
        killed += landed[0]
        twice += kills == 2 and all(landed)
        what = (loader, trial, landed)
        res = torch.load(workdir / "result.pt")
        what = (*what, f"replayed {res['replayed_rows']}, missed {res['missed_rows']}")
        if loader == "stateful":
            assert_matches_reference(workdir, reference, what)
            continue
        # a replayed epoch may run more batches than an uninterrupted one (Lightning restarts an epoch
        # whose last-batch checkpoint it cannot resume): the batch count differs, the periods do not
        assert res["periods_scored"] == PERIODS, what
        store, _, pairs, _ = read_store(workdir)
        assert len(pairs) == len(set(pairs)), (what, "an (example, epoch) stored twice")
        assert store.verify() == [], what
        missing = N_TRAIN * EPOCHS - len(pairs)
        assert res["missed_rows"] == missing, (what, res["missed_rows"], missing, log_tail(workdir))
        replayed += res["replayed_rows"] > 0
        missed_total += missing
    print(f"\n{loader}: {TRIALS} trials, {killed} killed mid-run ({twice} twice); "
          f"a reference run takes {seconds:.1f} s" + (f"; {replayed} trials replayed rows, {missed_total} "
                                                     "rows missed in all (each reported)" if loader == "shuffled" else ""))
    assert killed >= TRIALS // 3, "too few kills landed inside a run: the delays are off"
