"""On-disk faults: each ends in a clear error (saying how to repair) or a full recovery.

Runs are ``tests/scripts/crash_train.py``'s 3-epoch fit (``last.ckpt`` every 3 steps, shards of
20 rows, 8 rows per batch: two shards per three batches). A kill right after the 11th shard is
committed leaves ``last.ckpt`` at batch 15 and that shard holding rows of batches 15-17 (newer
than the checkpoint). "Full recovery" means the
resumed run's store and data value equal the uninterrupted run's (``test_crash.reference``).

| fault | outcome |
|---|---|
| shard newer than the checkpoint truncated / deleted | full recovery (dropped, captured again) |
| shard older than the checkpoint truncated / deleted / a byte flipped | clear error naming `store repair`; after it, an error naming the checkpoint to resume from; from there, full recovery |
| manifest overwritten with text / binary garbage | clear error naming `store repair`; after it (manifest rebuilt from the shards), full recovery |
| disk full (ENOSPC) while writing a shard | clear error ("disk is full"), committed shards whole; resume: full recovery |
| read-only filesystem (EROFS) | clear error saying "read-only" (at the lock and at a shard write) |
| a second writer while a live run holds the store | clear error naming the other run; once it is dead, its lock is taken over with a warning |
| fsync before rename | the shard and manifest temps are fsync'ed before their rename, the directory after |
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from grass_callback import store_tools
from grass_callback._lock import StoreLockError
from grass_callback.errors import StoreError
from grass_callback.store import GradientStore
from test_crash import SCRIPT, ForkServer, assert_matches_reference, log_tail, reference, server  # noqa: F401

sys.path.insert(0, str(SCRIPT.parent))
import crash_train  # noqa: E402


@pytest.fixture(scope="module")
def inproc_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run in this process (the in-process runs below compare with it: this
    process's threads and kernels, not the fork server's)."""
    from test_crash import read_store

    workdir = tmp_path_factory.mktemp("inproc-reference")
    os.environ.setdefault("WANDB_MODE", "disabled")
    res = crash_train.run(workdir)
    _, rows, pairs, _ = read_store(workdir)
    return {"rows": rows, "pairs": pairs, "value": dict(zip(res["ids"].tolist(), res["values"].tolist()))}


def train_dir(workdir: Path) -> Path:
    return workdir / "grass" / "train"


def killed_after_shard_11(server: ForkServer, workdir: Path) -> list[dict]:  # noqa: F811
    got = server.run(workdir, "kill", crash="manifest_done:11")
    assert got["signal"] == 9, (got, log_tail(workdir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shards = GradientStore(train_dir(workdir), readonly=True).shards()
    return [entry for _, entry in shards]


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    elif how == "flip":  # same size, header intact: only the sha256 tells
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))


def resume(server: ForkServer, workdir: Path, tag: str) -> dict:  # noqa: F811
    return server.run(workdir, tag, resume=True)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_shard_newer_than_the_checkpoint_is_captured_again(server, reference, tmp_path, how):  # noqa: F811
    shards = killed_after_shard_11(server, tmp_path)
    newest = max(shards, key=lambda e: e["seq"])
    assert (newest["min_step"], newest["max_step"]) == (15, 17)  # rows the resume drops anyway
    damage(train_dir(tmp_path) / newest["file"], how)
    assert resume(server, tmp_path, "resume") == {"exitcode": 0, "signal": None}, log_tail(tmp_path)
    assert "damaged shard(s) newer than the checkpoint" in (tmp_path / "log-resume.txt").read_text()
    assert_matches_reference(tmp_path, reference, how)


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_damaged_shard_before_the_checkpoint_stops_until_repaired(server, reference, tmp_path, how):  # noqa: F811
    shards = killed_after_shard_11(server, tmp_path)
    # a shard the resumed run reads again (epoch 2's period starts at batch 12): a flip is caught there
    victim = next(e for e in shards if e["max_step"] < 15 and e["min_step"] >= 12)
    damage(train_dir(tmp_path) / victim["file"], how)
    assert resume(server, tmp_path, "resume1")["exitcode"] == 1
    log = (tmp_path / "log-resume1.txt").read_text()
    assert "has lost rows of earlier batches" in log and f"store repair {train_dir(tmp_path)}" in log, log[-3000:]
    assert victim["file"] in log
    # `store verify` finds it, `store repair` unlists it and records the lost rows
    assert any(victim["file"] in p for p in store_tools.verify(tmp_path / "grass"))
    done = store_tools.repair(tmp_path / "grass")
    assert any(f"unlisted the damaged shard {victim['file']}" in line for line in done), done
    assert resume(server, tmp_path, "resume2")["exitcode"] == 1
    log = (tmp_path / "log-resume2.txt").read_text()
    assert "unlisted by `store repair`" in log and f"at or before batch {victim['min_step']}" in log, log[-3000:]
    # no checkpoint that early: start again from scratch, which recaptures everything
    for ckpt in (tmp_path / "ckpt").glob("*.ckpt"):
        ckpt.unlink()
    assert resume(server, tmp_path, "resume3") == {"exitcode": 0, "signal": None}, log_tail(tmp_path)
    assert_matches_reference(tmp_path, reference, how)
    assert store_tools.verify(tmp_path / "grass") == []


@pytest.mark.parametrize("garbage", [b"this is not json at all", b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01"],
                         ids=["text", "binary"])
def test_garbage_manifest_is_a_clear_error_then_rebuilt_by_repair(server, reference, tmp_path, garbage):  # noqa: F811
    killed_after_shard_11(server, tmp_path)
    (train_dir(tmp_path) / "manifest-r000.json").write_bytes(garbage)
    assert resume(server, tmp_path, "resume1")["exitcode"] == 1
    log = (tmp_path / "log-resume1.txt").read_text()
    assert "manifest-r000.json is unreadable" in log and "store repair" in log, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("grass_callback.errors.StoreError"), log[-2000:]
    done = store_tools.repair(tmp_path / "grass")
    assert any("rebuilt it from" in line for line in done), done
    assert resume(server, tmp_path, "resume2") == {"exitcode": 0, "signal": None}, log_tail(tmp_path)
    assert_matches_reference(tmp_path, reference, garbage[:4])


def failing_write(monkeypatch, code: int, after: int = 0) -> list[int]:
    """Shard writes raise ``OSError(code)`` from call ``after + 1`` on."""
    import grass_callback.store as store_mod

    calls, original = [0], store_mod._write_safetensors

    def write(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(code, os.strerror(code))
        return original(*args, **kwargs)

    monkeypatch.setattr(store_mod, "_write_safetensors", write)
    return calls


def test_disk_full_is_a_clear_error_and_resume_recovers(inproc_reference, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    failing_write(monkeypatch, errno.ENOSPC, after=6)  # the plans file and 5 shards fit
    with pytest.raises(StoreError, match="the disk is full; free some space"):
        crash_train.run(tmp_path)
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert GradientStore(train_dir(tmp_path), readonly=True).verify() == []  # committed shards whole
    crash_train.run(tmp_path, resume=True)
    assert_matches_reference(tmp_path, inproc_reference, "ENOSPC")


def test_read_only_filesystem_is_reported_as_such(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import grass_callback._lock as lock_mod

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(lock_mod.StoreLock, "_link_new", read_only)
        with pytest.raises(StoreError, match="could not lock .*the filesystem is mounted read-only") as err:
            crash_train.run(tmp_path / "a")
        assert "permissions" not in str(err.value)
    failing_write(monkeypatch, errno.EROFS, after=1)  # remounted read-only during training
    with pytest.raises(StoreError, match="gradient shard .*the filesystem is mounted read-only") as err:
        crash_train.run(tmp_path / "b")
    assert "permissions" not in str(err.value)


def test_a_second_writer_is_refused_while_the_first_lives(inproc_reference, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = tmp_path / "grass"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from grass_callback._lock import StoreLock; "
         f"StoreLock({str(root)!r}, 'other-run').acquire(); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[2])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockError, match=rf"in use by run 'other-run' \(pid {holder.pid} on host "):
            crash_train.run(tmp_path)
        assert not (root / "train").exists()  # nothing written beside the other run's files
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=r"locked by run 'other-run' .*no longer running .*taking the lock over"):
        crash_train.run(tmp_path)
    assert_matches_reference(tmp_path, inproc_reference, "after takeover")
    assert not (root / "grass.lock").exists()  # released at the end


def test_shard_and_manifest_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    """Each temp file is fsync'ed after its last write and before ``os.replace``; the directory is
    fsync'ed after the rename (a power cut then keeps either the old or the new file, whole)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        return real_replace(src, dst, *a, **k)

    store = GradientStore(tmp_path / "s", layer_dims={"a": 4}, dtype="float32")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.append(torch.arange(5), 0, {"a": torch.randn(5, 4)})
    store.flush()
    monkeypatch.undo()
    renames = [(i, e[1].split(" -> ")) for i, e in enumerate(events) if e[0] == "replace"]
    finals = [Path(dst).name for _, (_, dst) in renames]
    assert finals == ["shard-r000-000000.safetensors", "manifest-r000.json"], events
    for i, (src, dst) in renames:
        assert ("fsync", src) in events[:i], f"{src} renamed onto {dst} without an fsync first: {events}"
        assert ("fsync", str(Path(dst).parent)) in events[i + 1:], f"directory not fsync'ed after {dst}: {events}"
    manifest = json.loads((tmp_path / "s" / "manifest-r000.json").read_text())
    assert [e["file"] for e in manifest["shards"]] == ["shard-r000-000000.safetensors"]
