"""Tests of grass_callback.store: round trips, resume, truncation, crash simulations, DDP ranks."""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grass_callback import _store_format as format_mod
from grass_callback import _store_read as read_mod
from grass_callback.errors import GraSSError, StoreError, StoreMismatchError
from grass_callback.store import GradientStore, StoreChunk

LAYERS = {"encoder.fc1": 6, "head": 3}


def _batch(ids, k=LAYERS, scale=1.0):
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return ids, {n: torch.randn(len(ids), kk) * scale for n, kk in k.items()}


def _append(store, ids, step, **kw):
    ids, grads = _batch(ids)
    store.append(ids, step, grads, **kw)
    return grads


def _read_all(store, **kw) -> StoreChunk:
    chunks = list(store.iter_chunks(**kw))
    assert chunks, "no chunks read"
    return StoreChunk(
        torch.cat([c.ids for c in chunks]),
        torch.cat([c.steps for c in chunks]),
        torch.cat([c.epochs for c in chunks]),
        {n: torch.cat([c.grads[n] for c in chunks]) for n in chunks[0].grads},
    )


def _shard_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("shard-*.safetensors"))


def _manifest(path: Path, rank: int = 0) -> dict:
    return json.loads((path / f"manifest-r{rank:03d}.json").read_text())


def _fill(path, steps, rows_per_shard=4, batch=3, epoch=0, **kw):
    """Write `steps` batches of `batch` rows: ids step*batch + j. Returns the store and the data."""
    s = GradientStore(path, layer_dims=LAYERS, rows_per_shard=rows_per_shard, **kw)
    written = {}
    for step in steps:
        ids, grads = _batch(range(step * batch, step * batch + batch))
        s.append(ids, step, grads, epoch=epoch)
        for j, i in enumerate(ids.tolist()):
            written[(i, epoch)] = (step, {n: g[j] for n, g in grads.items()})
    return s, written


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", torch.float32])
def test_round_trip_cast_and_metadata(tmp_path, dtype):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS, dtype=dtype, rows_per_shard=7,
                      plan_tensors={"head.mask": torch.arange(5)}, plan_config={"seed": 3},
                      config={"k": 1024})
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
    all_ids, all_steps, all_epochs, all_grads = [], [], [], {n: [] for n in LAYERS}
    for step in range(6):
        ids, grads = _batch(torch.randperm(100)[:5] + 1000 * step)
        epoch = step // 3
        s.append(ids, step, grads, epoch=epoch)
        all_ids.append(ids)
        all_steps.append(torch.full((5,), step))
        all_epochs.append(torch.full((5,), epoch))
        for n in LAYERS:
            all_grads[n].append(grads[n])
    assert s.buffered_rows == 30 - 4 * 7  # four shards of 7 committed automatically
    assert len(s) == 28
    s.close()
    assert s.buffered_rows == 0 and len(s) == 30
    assert s.dtype == torch_dtype

    ro = GradientStore(tmp_path / "st", readonly=True)
    assert ro.layers == LAYERS and list(ro.layers) == list(LAYERS)
    assert ro.dtype == torch_dtype
    assert ro.plan_config == {"seed": 3} and ro.config == {"k": 1024}
    assert torch.equal(ro.plan_tensors()["head.mask"], torch.arange(5))
    meta = json.loads((tmp_path / "st" / "meta.json").read_text())
    assert meta["config_hash"] == ro.meta["config_hash"] and len(meta["config_hash"]) == 64

    got = _read_all(ro)
    assert torch.equal(got.ids, torch.cat(all_ids))
    assert torch.equal(got.steps, torch.cat(all_steps))
    assert torch.equal(got.epochs, torch.cat(all_epochs))
    for n in LAYERS:
        expect = torch.cat(all_grads[n]).to(torch_dtype).to(torch.float32)
        assert got.grads[n].dtype == torch.float32
        assert torch.equal(got.grads[n], expect)
    # storage dtype on request, and standard tools read the shards
    raw = _read_all(ro, dtype=None)
    assert raw.grads["head"].dtype == torch_dtype
    first = load_file(str(tmp_path / "st" / _shard_files(tmp_path / "st")[0]))
    assert set(first) == {"ids", "steps", "epochs", "g/encoder.fc1", "g/head"}
    assert first["g/head"].dtype == torch_dtype and first["ids"].dtype == torch.int64
    assert ro.verify() == []
    assert ro.size_bytes() > sum(p.stat().st_size for p in (tmp_path / "st").glob("shard-*"))


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 10, 64])
def test_chunked_iteration_is_bounded_and_complete(tmp_path, chunk_rows):
    s, _ = _fill(tmp_path / "st", range(10), rows_per_shard=7, batch=3)
    s.close()
    whole = _read_all(s, chunk_rows=10_000)
    chunks = list(s.iter_chunks(chunk_rows=chunk_rows))
    lengths = [len(c) for c in chunks]
    assert all(1 <= n <= chunk_rows for n in lengths)
    assert all(n == chunk_rows for n in lengths[:-1])  # full except the last
    assert sum(lengths) == 30
    assert torch.equal(torch.cat([c.ids for c in chunks]), whole.ids)
    for n in LAYERS:
        assert torch.equal(torch.cat([c.grads[n] for c in chunks]), whole.grads[n])


def test_read_filters(tmp_path):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS, rows_per_shard=4)
    for step in range(8):
        _append(s, [step, step + 100], step, epoch=step // 4)
    s.flush()
    got = _read_all(s, epochs=1, layers=["head"], min_step=5, max_step=6)
    assert got.steps.tolist() == [5, 5, 6, 6]
    assert set(got.epochs.tolist()) == {1}
    assert list(got.grads) == ["head"]
    assert torch.equal(s.ids(epochs=0), torch.tensor([0, 100, 1, 101, 2, 102, 3, 103]))
    with pytest.raises(StoreError, match="unknown layers"):
        list(s.iter_chunks(layers=["nope"]))


# ------------------------------------------------------------------------------ reopen / resume


def test_reopen_continues_sequence_and_reads_both_sessions(tmp_path):
    path = tmp_path / "st"
    s, written = _fill(path, range(0, 4), rows_per_shard=5)
    s.close()
    first_files = _shard_files(path)
    assert first_files == ["shard-r000-000000.safetensors", "shard-r000-000001.safetensors",
                           "shard-r000-000002.safetensors"]
    with GradientStore(path, layer_dims=LAYERS, rows_per_shard=5) as s2:
        for step in range(4, 6):
            ids, grads = _batch(range(step * 3, step * 3 + 3))
            s2.append(ids, step, grads)
    assert s2.closed
    assert _shard_files(path) == first_files + ["shard-r000-000003.safetensors",
                                                "shard-r000-000004.safetensors"]
    assert [e["seq"] for e in _manifest(path)["shards"]] == [0, 1, 2, 3, 4]
    ro = GradientStore(path, readonly=True)
    assert sorted(ro.ids().tolist()) == list(range(18))
    assert ro.num_rows == 18 == len(ro)
    with pytest.raises(StoreError, match="closed"):
        _append(s2, [1], 9)
    with pytest.raises(StoreError, match="readonly"):
        _append(ro, [1], 9)


def test_truncate_after_then_reappend_stores_each_example_once(tmp_path):
    path = tmp_path / "st"
    # 3 rows per step, 4 rows per shard: shards straddle steps
    s, written = _fill(path, range(8), rows_per_shard=4)
    assert len(s) == 24 and s.buffered_rows == 0
    _append(s, [900, 901], 8)  # buffered, newer than the checkpoint
    _append(s, [902], 2)  # buffered, older: kept
    before = {e["file"]: e for e in _manifest(path)["shards"]}
    dropped = s.truncate_after(4)
    assert dropped == 9 + 2  # steps 5, 6, 7 committed + the two buffered step-8 rows
    after = _manifest(path)["shards"]
    assert max(e["max_step"] for e in after) == 4
    # a partly newer shard (steps 3-4 / 4-5) was rewritten under a new sequence number
    assert any(e["file"] not in before for e in after)
    assert set(_shard_files(path)) == {e["file"] for e in after}  # replaced files deleted
    assert s.buffered_rows == 1
    # resume: re-run steps 5..7 with new gradients
    for step in range(5, 8):
        ids, grads = _batch(range(step * 3, step * 3 + 3))
        s.append(ids, step, grads)
        for j, i in enumerate(ids.tolist()):
            written[(i, 0)] = (step, {n: g[j] for n, g in grads.items()})
    s.close()
    got = _read_all(GradientStore(path, readonly=True))
    pairs = Counter(zip(got.ids.tolist(), got.epochs.tolist()))
    assert all(c == 1 for c in pairs.values())
    assert set(pairs) == set(written) | {(902, 0)}
    for row, (i, e) in enumerate(zip(got.ids.tolist(), got.epochs.tolist())):
        if i == 902:
            continue
        step, grads = written[(i, e)]
        assert got.steps[row] == step
        assert torch.equal(got.grads["head"][row], grads["head"].half().float())


def test_truncate_fully_newer_shards_only(tmp_path):
    s, _ = _fill(tmp_path / "st", range(4), rows_per_shard=3)  # one shard per step
    assert len(_shard_files(tmp_path / "st")) == 4
    assert s.truncate_after(1) == 6
    assert _shard_files(tmp_path / "st") == ["shard-r000-000000.safetensors",
                                             "shard-r000-000001.safetensors"]
    assert s.truncate_after(10) == 0
    _append(s, [50, 51, 52], 2)
    assert _shard_files(tmp_path / "st")[-1] == "shard-r000-000004.safetensors"  # never reused


# ------------------------------------------------------------------------------ crash simulations


def test_leftover_temp_and_orphan_shard_are_ignored_with_warning(tmp_path):
    path = tmp_path / "st"
    s, _ = _fill(path, range(2), rows_per_shard=3)  # shards 0 and 1
    s.close()
    # crash between shard rename and manifest write: a complete shard nobody lists
    orphan = path / "shard-r000-000002.safetensors"
    orphan.write_bytes((path / "shard-r000-000000.safetensors").read_bytes())
    # crash while writing: a half temp file
    tmp = path / ".shard-r000-000003.safetensors.4242-deadbeef.tmp"
    tmp.write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="not listed in any manifest") as rec:
        ro = GradientStore(path, readonly=True)
    text = str(rec[0].message)
    assert orphan.name in text and tmp.name in text
    assert ro.num_rows == 6
    assert sorted(ro.ids().tolist()) == list(range(6))  # the orphan's rows are not read twice
    assert {p.name for p in ro.orphans()} == {orphan.name, tmp.name}
    with pytest.warns(UserWarning, match="not listed"):
        w = GradientStore(path, layer_dims=LAYERS, rows_per_shard=3)
    _append(w, [10, 11, 12], 5)
    # the next shard skips the orphan's name instead of overwriting it
    assert _manifest(path)["shards"][-1]["file"] == "shard-r000-000003.safetensors"
    assert orphan.exists() and tmp.exists()
    assert sorted(w.ids().tolist()) == [0, 1, 2, 3, 4, 5, 10, 11, 12]


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_damaged_listed_shard_is_skipped_with_warning(tmp_path, damage):
    path = tmp_path / "st"
    s, _ = _fill(path, range(3), rows_per_shard=3)
    s.close()
    victim = path / "shard-r000-000001.safetensors"
    if damage == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(b"\xff" * victim.stat().st_size)  # same size, bad header
    ro = GradientStore(path, readonly=True)
    with pytest.warns(UserWarning, match="skipping shard shard-r000-000001"):
        got = _read_all(ro, chunk_rows=2)
    assert sorted(got.ids.tolist()) == [0, 1, 2, 6, 7, 8]
    assert ro.corrupt_shards == 1
    assert ro.verify()  # reports the problem
    with pytest.warns(UserWarning, match="skipping shard"):
        with pytest.raises(StoreError, match=r"not in the store.*\b3\b"):
            ro.fetch([0, 3])


def _no_new_files(path: Path, before: set[str]) -> None:
    assert {p.name for p in path.iterdir()} == before


def test_failed_shard_write_keeps_rows_and_manifest(tmp_path, monkeypatch):
    path = tmp_path / "st"
    s, written = _fill(path, range(2), rows_per_shard=100)
    s.flush()
    _append(s, [40, 41], 2)
    manifest_before = (path / "manifest-r000.json").read_bytes()
    files_before = {p.name for p in path.iterdir()}
    real_save = format_mod.save_file

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # a half written temp
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(format_mod, "save_file", disk_full)
    with pytest.raises(StoreError, match="disk is full") as info:
        s.flush()
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    _no_new_files(path, files_before)  # temp removed, no new shard
    assert (path / "manifest-r000.json").read_bytes() == manifest_before
    assert s.buffered_rows == 2
    assert sorted(GradientStore(path, readonly=True).ids().tolist()) == list(range(6))

    monkeypatch.setattr(format_mod, "save_file", real_save)
    s.flush()
    assert s.buffered_rows == 0
    assert sorted(GradientStore(path, readonly=True).ids().tolist()) == list(range(6)) + [40, 41]


@pytest.mark.parametrize("failing", ["shard", "manifest"])
def test_failed_rename_leaves_store_consistent(tmp_path, monkeypatch, failing):
    path = tmp_path / "st"
    s, _ = _fill(path, range(2), rows_per_shard=100)
    s.flush()
    _append(s, [40, 41], 2)
    manifest_before = (path / "manifest-r000.json").read_bytes()
    files_before = {p.name for p in path.iterdir()}
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if (failing == "shard" and str(dst).endswith(".safetensors")) or (
            failing == "manifest" and str(dst).endswith(".json")
        ):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StoreError, match="not writable") as info:
        s.flush()
    assert isinstance(info.value.__cause__, PermissionError)
    monkeypatch.setattr(os, "replace", real_replace)
    _no_new_files(path, files_before)  # neither temp nor unlisted shard left behind
    assert (path / "manifest-r000.json").read_bytes() == manifest_before
    assert s.buffered_rows == 2
    assert GradientStore(path, readonly=True).num_rows == 6
    s.close()
    assert sorted(GradientStore(path, readonly=True).ids().tolist()) == list(range(6)) + [40, 41]


def test_failed_auto_commit_in_append_keeps_batch(tmp_path, monkeypatch):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS, rows_per_shard=4)

    def fail(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(format_mod, "save_file", fail)
    with pytest.raises(StoreError):
        _append(s, [0, 1, 2, 3, 4], 0)
    assert s.buffered_rows == 5 and len(s) == 0
    monkeypatch.undo()
    s.flush()
    assert sorted(s.ids().tolist()) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------ mismatch


def test_mismatched_settings_on_reopen(tmp_path):
    path = tmp_path / "st"
    plans = {"fc1.mask": torch.arange(8), "head.sign": torch.ones(4)}
    GradientStore(path, layer_dims=LAYERS, plan_tensors=plans, plan_config={"seed": 0},
                  config={"k": 1024}).close()
    same = dict(layer_dims=LAYERS, plan_tensors=plans, plan_config={"seed": 0}, config={"k": 1024})
    GradientStore(path, **same).close()  # identical settings open fine
    cases = [
        ({"plan_config": {"seed": 1}}, "plan_config: seed"),
        ({"config": {"k": 2048}}, "config: k"),
        ({"layer_dims": {"encoder.fc1": 6, "head": 4}}, r"layers: other k: head"),
        ({"layer_dims": {"encoder.fc1": 6}}, "layers: not given: head"),
        ({"dtype": "bfloat16"}, "dtype: stored 'float16'"),
        ({"plan_tensors": {**plans, "fc1.mask": torch.arange(8).flip(0)}},
         "plan tensors: values differ for fc1.mask"),
        ({"plan_tensors": {"fc1.mask": torch.arange(8)}},
         "missing from the given plans: head.sign"),
    ]
    for change, pattern in cases:
        with pytest.raises(StoreMismatchError, match=pattern) as info:
            GradientStore(path, **{**same, **change})
        assert "new directory" in str(info.value)
        assert isinstance(info.value, GraSSError)
    # no settings: just opens
    ro = GradientStore(path, readonly=True)
    assert ro.plan_config == {"seed": 0}


def test_creation_errors(tmp_path):
    with pytest.raises(StoreError, match="needs layer_dims"):
        GradientStore(tmp_path / "a")
    with pytest.raises(StoreError, match="meta.json is missing"):
        GradientStore(tmp_path / "b", readonly=True)
    with pytest.raises(StoreError, match="float16"):
        GradientStore(tmp_path / "c", layer_dims=LAYERS, dtype="int8")
    with pytest.raises(StoreError, match="positive int"):
        GradientStore(tmp_path / "d", layer_dims={"x": 0})


# ------------------------------------------------------------------------------ writing checks


def test_nonfinite_rows_dropped_and_counted(tmp_path):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS)
    ids, grads = _batch([0, 1, 2, 3])
    grads["head"][1, 0] = float("nan")
    grads["encoder.fc1"][3, 2] = float("inf")
    with pytest.warns(UserWarning, match="dropped 2 of 4 rows"):
        s.append(ids, 0, grads)
    ids, grads = _batch([4, 5])
    grads["head"][0, 0] = 1e6  # finite in float32, overflows float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given only once
        s.append(ids, 1, grads)
    assert s.skipped_nonfinite == 3
    s.flush()
    assert s.ids().tolist() == [0, 2, 5]
    got = _read_all(s)
    assert all(torch.isfinite(g).all() for g in got.grads.values())
    fresh = GradientStore(tmp_path / "st2", layer_dims=LAYERS)
    ids, grads = _batch([0, 1])
    grads["head"][1] = 7e4
    with pytest.warns(UserWarning, match="1 of them were finite but overflow float16"):
        fresh.append(ids, 0, grads)
    assert fresh.skipped_nonfinite == 1 and fresh.buffered_rows == 1


def test_bad_inputs_raise_clear_errors(tmp_path):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS)
    ids, grads = _batch([0, 1, 2])
    with pytest.raises(StoreError, match="missing layers head"):
        s.append(ids, 0, {"encoder.fc1": grads["encoder.fc1"]})
    with pytest.raises(StoreError, match="unknown layers extra"):
        s.append(ids, 0, {**grads, "extra": grads["head"]})
    with pytest.raises(StoreError, match=r"grads\['head'\] must have shape \[B, 3\], got \[3, 4\]"):
        s.append(ids, 0, {**grads, "head": torch.randn(3, 4)})
    with pytest.raises(StoreError, match=r"shape \[B, 3\], got \[3\]"):
        s.append(ids, 0, {**grads, "head": torch.randn(3)})
    with pytest.raises(StoreError, match="1-D"):
        s.append(ids.view(3, 1), 0, grads)
    with pytest.raises(StoreError, match="integer dtype"):
        s.append(ids.float(), 0, grads)
    with pytest.raises(StoreError, match="has 2 rows but ids has 3"):
        s.append(ids, 0, {**grads, "head": torch.randn(2, 3)})
    with pytest.raises(StoreError, match="step must be an int"):
        s.append(ids, 1.5, grads)
    with pytest.raises(ValueError):  # input errors are also ValueErrors
        s.append(ids, 0, {**grads, "head": torch.randint(0, 3, (3, 3))})
    assert s.buffered_rows == 0  # nothing half-appended
    s.append(ids, 0, grads)
    assert s.buffered_rows == 3


def test_appended_tensors_are_copied(tmp_path):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS, dtype="float32")
    ids, grads = _batch([0, 1])
    keep = grads["head"].clone()
    s.append(ids, 0, grads)
    grads["head"].zero_()  # caller reuses its buffers
    ids.fill_(7)
    s.flush()
    got = _read_all(s)
    assert got.ids.tolist() == [0, 1]
    assert torch.equal(got.grads["head"], keep)


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float32"])
def test_kept_rows_equal_an_elementwise_reference_over_mixed_input_dtypes(tmp_path, storage):
    """The row check runs on every layer's row maxima at once; the reference casts every element
    and asks isfinite of each. Layers in float64, float32 and bfloat16, with NaN, Inf and values
    that overflow the storage type (or just fit) planted at random."""
    gen = torch.Generator().manual_seed(5)
    dims = {"a": 7, "b": 5, "c": 4}
    dtypes = {"a": torch.float64, "b": torch.float32, "c": torch.bfloat16}
    s = GradientStore(tmp_path / "st", layer_dims=dims, dtype=storage)
    big = torch.finfo(getattr(torch, storage)).max
    kept_ref, kept = [], []
    for step in range(12):
        grads = {n: torch.randn(6, k, generator=gen, dtype=torch.float64) for n, k in dims.items()}
        for n in dims:
            for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
                r, c = int(torch.randint(0, 6, (1,), generator=gen)), int(torch.randint(0, dims[n], (1,), generator=gen))
                grads[n][r, c] = [float("nan"), float("inf"), -float("inf"), big * 1.01, -big * 0.99, 0.0][
                    int(torch.randint(0, 6, (1,), generator=gen))]
        grads = {n: g.to(dtypes[n]) for n, g in grads.items()}
        ref = torch.stack([torch.isfinite(g.to(getattr(torch, storage))).all(1) for g in grads.values()]).all(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = s.append(torch.arange(6 * step, 6 * step + 6), step, grads)
        kept_ref.append(ref)
        kept.append(mask)
    assert torch.equal(torch.cat(kept), torch.cat(kept_ref))
    assert 0 < int(torch.cat(kept).sum()) < 72  # the draw planted both kinds
    assert s.skipped_nonfinite == int((~torch.cat(kept_ref)).sum())


def test_owned_rows_are_buffered_without_a_copy_and_others_are_copied(tmp_path):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS, dtype="float16")
    ids, grads = _batch([0, 1])
    half = {n: g.half() for n, g in grads.items()}
    s.append(ids, 0, half, owned=True)
    assert s._buf_grads["head"][-1].data_ptr() == half["head"].data_ptr()
    s.append(ids + 2, 1, half)
    assert s._buf_grads["head"][-1].data_ptr() != half["head"].data_ptr()


def test_flush_of_empty_buffer_writes_nothing(tmp_path):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS)
    s.flush()
    s.close()
    assert _shard_files(tmp_path / "st") == []
    assert len(GradientStore(tmp_path / "st", readonly=True)) == 0
    assert list(GradientStore(tmp_path / "st", readonly=True).iter_chunks()) == []


# ------------------------------------------------------------------------------ ranks and fetch


def test_two_ranks_in_one_directory_are_both_read(tmp_path):
    path = tmp_path / "st"
    r0 = GradientStore(path, layer_dims=LAYERS, rank=0, rows_per_shard=4)
    r1 = GradientStore(path, layer_dims=LAYERS, rank=1, rows_per_shard=4)
    for step in range(3):
        _append(r0, [2 * step, 2 * step + 100], step)  # interleaved like DDP
        _append(r1, [2 * step + 1, 2 * step + 101], step)
    r0.close()
    r1.close()
    assert (path / "manifest-r000.json").exists() and (path / "manifest-r001.json").exists()
    assert any(n.startswith("shard-r001-") for n in _shard_files(path))
    ro = GradientStore(path, readonly=True)
    assert ro.num_rows == 12
    got = _read_all(ro, chunk_rows=5)
    assert sorted(got.ids.tolist()) == sorted([0, 2, 4, 100, 102, 104, 1, 3, 5, 101, 103, 105])
    assert sorted(_read_all(ro, ranks=[1]).ids.tolist()) == [1, 3, 5, 101, 103, 105]
    # a rank sees the other's rows too, and truncation touches only its own
    r1b = GradientStore(path, layer_dims=LAYERS, rank=1, rows_per_shard=4)
    r1b.truncate_after(0)
    assert sorted(ro.ids(ranks=1).tolist()) == [1, 101]
    assert ro.num_rows == 6 + 2


def test_fetch_by_id_latest_step_wins(tmp_path):
    s = GradientStore(tmp_path / "st", layer_dims=LAYERS, dtype="float32", rows_per_shard=3)
    expected = {}
    for step, epoch in ((0, 0), (1, 0), (2, 1), (3, 1)):
        ids = torch.tensor([0, 1, 2, 3]) if epoch == 0 else torch.tensor([3, 2, 1, 0])
        ids = ids[step % 2 * 2: step % 2 * 2 + 2]
        _, grads = _batch(ids)
        s.append(ids, step, grads, epoch=epoch)
        for j, i in enumerate(ids.tolist()):
            expected[(i, epoch)] = (step, {n: g[j] for n, g in grads.items()})
    s.flush()
    want = torch.tensor([2, 0, 2])
    got = s.fetch(want, dtype=torch.float64)
    assert isinstance(got, dict) and set(got) == set(LAYERS)
    for row, i in enumerate(want.tolist()):
        step, grads = expected[(i, 1)]  # epoch 1 rows are the latest
        assert got.steps[row] == step and got.epochs[row] == 1
        assert got["head"].dtype == torch.float64
        assert torch.equal(got["head"][row], grads["head"].double())
    old = s.fetch([1], layers="head", epochs=0)
    assert list(old) == ["head"] and old.steps.tolist() == [expected[(1, 0)][0]]
    assert torch.equal(old["head"][0], expected[(1, 0)][1]["head"])
    with pytest.raises(StoreError, match=r"2 of 3 requested ids are not in the store.*77, 99"):
        s.fetch([0, 77, 99])


def test_fetch_latest_step_wins_whatever_the_read_order(tmp_path):
    path = tmp_path / "st"
    r0 = GradientStore(path, layer_dims=LAYERS, dtype="float32", rank=0)
    r1 = GradientStore(path, layer_dims=LAYERS, dtype="float32", rank=1)
    new = _append(r0, [5, 6], 10)  # rank 0 is read first but holds the newer rows
    _append(r1, [6, 5, 7], 3)
    r0.close()
    r1.close()
    got = GradientStore(path, readonly=True).fetch([5, 7, 6])
    assert got.steps.tolist() == [10, 3, 10]
    assert torch.equal(got["head"][0], new["head"][0])
    assert torch.equal(got["head"][2], new["head"][1])


def test_iter_chunks_reads_shards_lazily(tmp_path, monkeypatch):
    """Only one shard is open at a time: a memory bound that does not grow with the store."""
    s, _ = _fill(tmp_path / "st", range(6), rows_per_shard=3)
    s.close()
    opened, open_now, peak = [], [0], [0]
    real = read_mod.safe_open

    class Counting:
        def __init__(self, *a, **kw):
            self._cm = real(*a, **kw)

        def __enter__(self):
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
            opened.append(1)
            return self._cm.__enter__()

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self._cm.__exit__(*exc)

    monkeypatch.setattr(read_mod, "safe_open", Counting)
    it = s.iter_chunks(chunk_rows=2)
    first = next(it)
    assert len(first) == 2 and len(opened) == 1  # the first chunk needs only the first shard
    rest = list(it)
    assert sum(len(c) for c in rest) == 16 and peak[0] == 1 and len(opened) == 6


def test_store_cli_verify_and_repair(tmp_path, capsys):
    """``python -m grass_callback store verify|repair``: exit 1 and the shard named when one is
    damaged; repair unlists it (kept as ``.damaged``) and records the lost rows; verify then says so."""
    from grass_callback.__main__ import main

    store = GradientStore(tmp_path / "s", layer_dims={"a": 2}, dtype="float32", rows_per_shard=3)
    store.append(torch.arange(6), 0, {"a": torch.randn(6, 2)})
    store.close()
    assert main(["store", "verify", str(tmp_path / "s")]) == 0
    assert "store is whole" in capsys.readouterr().out
    victim = tmp_path / "s" / "shard-r000-000001.safetensors"
    victim.write_bytes(victim.read_bytes()[:40])
    assert main(["store", "verify", str(tmp_path / "s")]) == 1
    assert "shard-r000-000001.safetensors (3 rows, batches 0-0)" in capsys.readouterr().out
    assert main(["store", "repair", str(tmp_path / "s")]) == 0
    assert "unlisted the damaged shard shard-r000-000001.safetensors" in capsys.readouterr().out
    assert (tmp_path / "s" / "shard-r000-000001.safetensors.damaged").exists()
    assert GradientStore(tmp_path / "s", readonly=True).num_rows == 3
    assert main(["store", "verify", str(tmp_path / "s")]) == 1  # the lost rows are still reported
    assert "lost 3 rows of batches 0-0" in capsys.readouterr().out
    assert main(["store", "verify", str(tmp_path / "nothing")]) == 2
