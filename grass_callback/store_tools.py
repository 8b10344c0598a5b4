"""``python -m grass_callback store verify|repair DIR``: check and repair gradient stores.

``DIR`` is a callback's ``store_dir`` (every store under it: ``train/``, ``checkpoint-*/``) or
one store (the folder holding ``meta.json``).

* ``verify`` reads every manifest and every listed shard (size, safetensors header, shapes and
  sha256) and lists leftovers (temps, unlisted shards), rows unlisted by an earlier repair and
  the lock. Exit status 0 when nothing is wrong, 1 otherwise.
* ``repair`` (refused while a live run holds the lock): unlists damaged or missing shards (the
  files are kept as ``<name>.damaged``), recording them in ``lost-rRRR.json`` so the callback knows on resume that those rows must be
  captured again (it then asks for a checkpoint taken before them); rebuilds a manifest that
  cannot be read from the shard files on disk (a shard whose every (step, id) is also in a later
  shard is a leftover of a killed write and is left out); deletes leftover temp files. Nothing
  that a manifest lists and that reads back whole is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from grass_callback._lock import LOCK_FILE, StoreLock
from grass_callback._resume import read_lost, write_lost
from grass_callback._store_format import _MANIFEST_RE, _SHARD_RE, _TMP_RE, META_FILE, _empty_manifest, _manifest_name
from grass_callback.errors import StoreError

__all__ = ["find_stores", "repair", "verify"]


def find_stores(directory: str | os.PathLike) -> list[Path]:
    """The store folders at or under ``directory`` (those with a ``meta.json``)."""
    root = Path(directory)
    if (root / META_FILE).exists():
        return [root]
    found = sorted(p.parent for p in root.glob(f"*/{META_FILE}"))
    if not found:
        raise StoreError(f"no gradient store at or under {root} (no {META_FILE} found); check the path.")
    return found


def _ranks(path: Path) -> list[int]:
    ranks = set()
    for name in os.listdir(path):
        m = _MANIFEST_RE.match(name) or _SHARD_RE.match(name)
        if m:
            ranks.add(int(m.group(1)))
    return sorted(ranks)


def _quiet_open(path: Path, **kw):
    from grass_callback.store import GradientStore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # leftovers are reported by verify itself
        return GradientStore(path, **kw)


def verify(directory: str | os.PathLike) -> list[str]:
    """Problems found in the store(s) at ``directory`` (empty: all whole). Changes nothing."""
    problems: list[str] = []
    for path in find_stores(directory):
        try:
            store = _quiet_open(path, readonly=True)
            store.num_rows  # reads every rank's manifest
        except StoreError as e:
            problems.append(f"{path}: {e}")
            continue
        for rank, entry, why in store.damaged_shards(checksum=True):
            problems.append(f"{path}: rank {rank} shard {entry['file']} ({entry['rows']} rows, batches "
                            f"{entry['min_step']}-{entry['max_step']}): {why}")
        for rank in _ranks(path):
            for entry in read_lost(path, rank):
                problems.append(f"{path}: rank {rank} lost {entry['rows']} rows of batches {entry['min_step']}-"
                                f"{entry['max_step']} ({entry['file']}, unlisted by an earlier repair): resume from "
                                f"a checkpoint at or before batch {entry['min_step']} to capture them again")
        leftovers = [p.name for p in store.orphans()]
        if leftovers:
            problems.append(f"{path}: {len(leftovers)} file(s) no manifest lists (never read): {', '.join(leftovers[:6])}")
    return problems


def repair(directory: str | os.PathLike) -> list[str]:
    """Repair the store(s) at ``directory`` (see the module docstring); returns what was done."""
    done: list[str] = []
    root = Path(directory)
    for lock_dir in {root, *[p.parent for p in find_stores(root)]}:
        lock = StoreLock(lock_dir, "store-repair")
        other = lock.read()
        if other is not None and (lock_dir / LOCK_FILE).exists() and not lock._stale(other):
            raise StoreError(f"{lock_dir} is locked by the live run {other.get('run_id')!r} (pid {other.get('pid')} on "
                             f"{other.get('host')}); stop it before repairing its store.")
    for path in find_stores(root):
        for rank in _ranks(path):  # unreadable manifests first: opening any rank reads them all
            why = _manifest_problem(path, rank)
            if why is not None:
                done += _rebuild_manifest(path, rank, why)
        for rank in _ranks(path):
            done += _repair_rank(path, rank)
        for name in sorted(os.listdir(path)):
            if _TMP_RE.match(name):
                (path / name).unlink()
                done.append(f"{path}: deleted the leftover temp file {name}")
    return done


def _manifest_problem(path: Path, rank: int) -> str | None:
    """Why rank ``rank``'s manifest cannot be read (``None``: it reads, or there is none)."""
    file = path / _manifest_name(rank)
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
        if manifest.get("format") is None or not isinstance(manifest.get("shards"), list):
            return "not a grass_callback store manifest"
        for entry in manifest["shards"]:
            for key in ("file", "seq", "rows", "min_step", "max_step", "epochs", "bytes"):
                entry[key]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{type(e).__name__}: {str(e)[:80]}"
    return None


def _repair_rank(path: Path, rank: int) -> list[str]:
    store = _quiet_open(path, rank=rank)
    bad = store.damaged_shards(ranks=[rank], checksum=True)
    if not bad:
        return []
    files = {e["file"] for _, e, _ in bad}
    manifest = json.loads(json.dumps(store._manifest))
    manifest["shards"] = [e for e in manifest["shards"] if e["file"] not in files]
    lost = read_lost(path, rank) + [dict(e, why=why) for _, e, why in bad]
    write_lost(path, rank, lost)
    store._write_manifest(manifest)
    for name in files:  # kept for inspection, under a name no reader or orphan scan picks up
        if (path / name).exists():
            os.replace(path / name, path / f"{name}.damaged")
    return [f"{path}: rank {rank}: unlisted the damaged shard {e['file']} ({e['rows']} rows of batches "
            f"{e['min_step']}-{e['max_step']}: {why}); resume from a checkpoint at or before batch "
            f"{e['min_step']} to capture them again" for _, e, why in bad]


def _shard_entry(file: Path, config_hash: str, dtype: str) -> tuple[dict, set] | None:
    """A manifest entry rebuilt from a shard file, with its (step, id) pairs; ``None`` if unreadable."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            ids, steps, epochs = f.get_tensor("ids"), f.get_tensor("steps"), f.get_tensor("epochs")
        if meta.get("config_hash") != config_hash or ids.numel() == 0:
            return None
        data = file.read_bytes()
    except Exception:  # noqa: BLE001 - a damaged file is left out, and reported
        return None
    seq = int(_SHARD_RE.match(file.name).group(2))
    entry = {"file": file.name, "seq": seq, "rows": int(ids.numel()), "min_step": int(steps.min()),
             "max_step": int(steps.max()), "epochs": sorted(int(e) for e in torch.unique(epochs).tolist()),
             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "dtype": dtype}
    zero = json.loads(meta.get("zero_layers") or "[]")  # layers all zero in this shard, not written
    if zero:
        entry["zero_layers"] = zero
    return entry, set(zip(steps.tolist(), ids.tolist()))


def _rebuild_manifest(path: Path, rank: int, why: str) -> list[str]:
    from grass_callback._store_format import _write_json_atomic

    meta = json.loads((path / META_FILE).read_bytes().decode("utf-8"))  # opening the store reads every manifest
    config_hash, dtype = str(meta["config_hash"]), str(meta["dtype"])
    files = sorted((p for p in path.iterdir() if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) == rank),
                   key=lambda p: int(_SHARD_RE.match(p.name).group(2)))
    read = [(f, _shard_entry(f, config_hash, dtype)) for f in files]
    good = [(f, r) for f, r in read if r is not None]
    kept, later = [], set()
    for f, (entry, pairs) in reversed(good):  # newest first: an older shard fully repeated later is a leftover
        if pairs <= later:
            continue
        later |= pairs
        kept.append(entry)
    kept.reverse()
    manifest = _empty_manifest(rank, config_hash)
    manifest["shards"] = kept
    manifest["next_seq"] = max([e["seq"] + 1 for e in kept] + [0])
    target = path / _manifest_name(rank)
    aside = path / f"{_manifest_name(rank)}.damaged"
    os.replace(target, aside)
    _write_json_atomic(target, manifest)
    skipped = [f.name for f, r in read if r is None]
    return [f"{path}: rank {rank}: the manifest could not be read ({why}); rebuilt it from "
            f"{len(kept)} shard file(s) on disk ({sum(e['rows'] for e in kept)} rows), the old one kept as "
            f"{aside.name}" + (f"; left out unreadable shards {', '.join(skipped[:6])}" if skipped else "")
            + ". Resume from a checkpoint: rows newer than it are dropped and captured again."]


def main(args) -> int:
    """The ``store`` subcommand (``args.action``, ``args.dir``); errors are printed, exit status 2."""
    try:
        return _main(args)
    except StoreError as e:
        print(f"error: {e}")
        return 2


def _main(args) -> int:
    if args.action == "verify":
        problems = verify(args.dir)
        for line in problems:
            print(line)
        print("store is whole" if not problems else f"{len(problems)} problem(s); "
              f"`python -m grass_callback store repair {args.dir}` fixes what can be fixed")
        return 1 if problems else 0
    for line in repair(args.dir) or ["nothing to repair"]:
        print(line)
    return 0
