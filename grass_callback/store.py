"""Sharded, crash-safe on-disk store of compressed per-example gradients.

The store keeps, for every training example seen, its compressed gradient (``k_l`` floats per
tapped layer ``l``) together with the example's dataset index, the global step and the epoch
at which it was taken. Writers buffer rows in memory and commit them as *shards*; readers
stream shards back in bounded chunks.

On-disk layout
--------------
Everything lives in one directory, readable with standard tools (``json`` and
``safetensors.torch.load_file``)::

    <path>/
      meta.json                        format version, layers [{name, k}] in order, storage
                                       dtype, plan_config, config, config_hash (sha256 of the
                                       canonical JSON of layers + dtype + plan_config + config),
                                       digest and shapes of the plan tensors
      plans.safetensors                the projection plan tensors (opaque to the store)
      manifest-r000.json               rank 0's committed shards: file, seq, rows, min/max
                                       step, epochs present, byte size, sha256
      shard-r000-000000.safetensors    tensors "ids", "steps", "epochs" (int64 [n]) and one
      shard-r000-000001.safetensors    "g/<layer name>" [n, k_l] per layer in the storage dtype
      manifest-r001.json               rank 1 of a DDP run, and so on: each rank writes only
      shard-r001-000000.safetensors    its own manifest and shards
      .<name>.<pid>-<hex>.tmp          a file being written (or left by a crash)

Crash-safety argument
---------------------
Every file (meta, plans, shards, manifests) is written under a temporary name in the store
directory, flushed and ``fsync``'ed, and only then ``os.replace``'d onto its final name;
``os.replace`` within one directory is atomic, so a final name always holds a complete file,
either the old one or the new one, never a mix. The directory is fsync'ed after each rename.

A shard is *committed* when the manifest that lists it has been renamed into place: the
manifest is the single source of truth, and readers open only the shards a manifest lists;
they never look for shards by listing the directory. A commit runs: (1) write the shard temp,
(2) rename it to ``shard-rRRR-SSSSSS.safetensors``, (3) write the manifest temp, (4) rename it
onto ``manifest-rRRR.json``. A crash

* during (1) leaves a temp file: not listed, never read, reported as a leftover on open;
* between (2) and (4) leaves an *orphan* shard: complete but not listed, so never read (its
  rows were not committed; resuming from the last checkpoint re-creates them); reported on
  open and never overwritten, as new shards skip sequence numbers whose file exists;
* after (4) leaves a committed shard, complete because it was fsync'ed before the rename.

Hence a reader never sees a half-written shard: a listed shard was complete before it was
listed. A shard damaged afterwards (disk error, a user truncating it) is detected by its byte
size and safetensors header and skipped with a warning (``corrupt_shards`` counts them);
``verify()`` also checks the sha256 recorded in the manifest.

``truncate_after(step)`` keeps the same discipline: shards that are partly newer are rewritten
with their kept rows as *new* shards (steps 1-2), then one manifest rename (the commit point)
swaps the old entries for the new ones, then the dropped and replaced files are deleted. A crash
before the manifest rename leaves orphans and the old, intact manifest; after it, leftover old
files are orphans. So resuming from a checkpoint at step ``S`` with ``truncate_after(S)`` and
re-running the later steps stores every (example, epoch) exactly once.

A failed write (disk full, permission) raises :class:`StoreError` chained to the cause, removes
its temp file (and a renamed but unlisted shard), leaves the manifest and the committed shards
as they were, and keeps the buffered rows in memory, so ``flush()`` can be retried.

Concurrency: one writer per (directory, rank); any number of readers. A reader takes the
manifests as they are when it starts a pass. The class is not thread-safe.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import numbers
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import StoreError, StoreInputError, StoreMismatchError

__all__ = [
    "FORMAT_VERSION",
    "FetchResult",
    "GradientStore",
    "StoreChunk",
    "StoreInputError",
]

FORMAT_NAME = "grass_callback.store"
FORMAT_VERSION = 1
META_FILE = "meta.json"
PLANS_FILE = "plans.safetensors"

_SHARD_RE = re.compile(r"^shard-r(\d+)-(\d+)\.safetensors$")
_MANIFEST_RE = re.compile(r"^manifest-r(\d+)\.json$")
_TMP_RE = re.compile(r"^\.(?P<final>.+)\.(\d+)-([0-9a-f]+)\.tmp$")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_CANONICAL_DTYPE: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
}
_DEFAULT_DTYPE = "float16"
_MAX_LISTED = 8  # how many ids / names an error message lists


@dataclasses.dataclass
class StoreChunk:
    """A block of committed rows read back from the store.

    ``ids``, ``steps`` and ``epochs`` are int64 ``[n]``; ``grads`` maps each requested layer
    name to a ``[n, k_l]`` tensor in the requested dtype.
    """

    ids: Tensor
    steps: Tensor
    epochs: Tensor
    grads: dict[str, Tensor]

    def __len__(self) -> int:
        return int(self.ids.numel())


class FetchResult(dict):
    """What :meth:`GradientStore.fetch` returns: a ``dict`` layer name -> ``[len(ids), k]``.

    The attributes ``ids``, ``steps`` and ``epochs`` (int64 ``[len(ids)]``) give, for each
    requested id, the id itself and the step and epoch of the row that was returned.
    """

    def __init__(self, grads: Mapping[str, Tensor], ids: Tensor, steps: Tensor, epochs: Tensor):
        super().__init__(grads)
        self.ids = ids
        self.steps = steps
        self.epochs = epochs


class _BadShard(Exception):
    """Internal: a listed shard failed a consistency check."""


# --------------------------------------------------------------------------------------------
# small helpers


def _dtype_name(dtype: str | torch.dtype, what: str = "dtype") -> str:
    """Canonical storage dtype name ("float16", "bfloat16" or "float32")."""
    if isinstance(dtype, torch.dtype):
        name = _CANONICAL_DTYPE.get(dtype)
    elif isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        name = _CANONICAL_DTYPE.get(_DTYPE_NAMES[key]) if key in _DTYPE_NAMES else None
    else:
        name = None
    if name is None:
        raise StoreInputError(
            f"{what} must be one of 'float16', 'bfloat16', 'float32' (or the torch dtype), "
            f"got {dtype!r}"
        )
    return name


def _read_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """dtype asked of a read: None keeps the storage dtype; any floating torch dtype works."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return _DTYPE_NAMES[_dtype_name(dtype)]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise StoreInputError(f"dtype must be a floating torch dtype or None, got {dtype!r}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, torch.Size):
        return list(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _normalize_json(obj: Mapping | None, what: str) -> dict:
    """A JSON round trip, so given settings compare equal to what meta.json holds."""
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise StoreInputError(f"{what} must be a mapping, got {type(obj).__name__}")
    try:
        return json.loads(json.dumps(dict(obj), default=_json_default))
    except (TypeError, ValueError) as e:
        raise StoreInputError(f"{what} must be JSON-serialisable: {e}") from e


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _config_hash(layers: list[list], dtype: str, plan_config: dict, config: dict) -> str:
    payload = {"layers": layers, "dtype": dtype, "plan_config": plan_config, "config": config}
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()


def _normalize_layers(layer_dims: Mapping[str, int]) -> list[list]:
    if not isinstance(layer_dims, Mapping):
        raise StoreInputError(
            f"layer_dims must be a mapping layer name -> k, got {type(layer_dims).__name__}"
        )
    if len(layer_dims) == 0:
        raise StoreInputError("layer_dims is empty: the store needs at least one layer")
    layers = []
    for name, k in layer_dims.items():
        if not isinstance(name, str) or not name:
            raise StoreInputError(f"layer names must be non-empty strings, got {name!r}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) <= 0:
            raise StoreInputError(f"layer {name!r}: k must be a positive int, got {k!r}")
        layers.append([name, int(k)])
    return layers


def _cpu_tensors(tensors: Mapping[str, Tensor] | None, what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, t in (tensors or {}).items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise StoreInputError(
                f"{what} must map str -> Tensor, got {name!r}: {type(t).__name__}"
            )
        out[name] = t.detach().to("cpu").contiguous().clone()  # clone: no shared storage
    return out


def _plans_digest(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(_canonical_json([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise StoreInputError(
                f"{what} must be an int, got a tensor {value.dtype} {list(value.shape)}"
            )
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
        raise StoreInputError(f"{what} must be an int, got {shown}")
    return int(value)


def _as_ids(ids: Any, what: str = "ids") -> Tensor:
    if not isinstance(ids, Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise StoreInputError(
                f"{what} must be a 1-D integer tensor, got {type(ids).__name__}"
            ) from e
    if ids.dim() != 1:
        raise StoreInputError(
            f"{what} must be a 1-D tensor of dataset indices [B], got shape {list(ids.shape)}"
        )
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise StoreInputError(f"{what} must have an integer dtype (int64 indices), got {ids.dtype}")
    return ids.detach().to(device="cpu", dtype=torch.int64, copy=True)


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable; best effort (not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _atomic_write(final: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` must write and fsync ``tmp``; then it is renamed onto ``final``.

    On any failure the temp file is removed and ``final`` is left as it was.
    """
    tmp = _tmp_path(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(final.parent)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(final: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=1) + "\n").encode("utf-8")
    _atomic_write(final, lambda tmp: _write_bytes(tmp, data))


def _write_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str]) -> str:
    """Write ``tensors`` to ``path``, fsync it and return the file's sha256."""
    with open(path, "wb"):  # created under the umask, like every other file of the store
        pass
    mode = os.stat(path).st_mode & 0o777
    save_file(dict(tensors), str(path), metadata=metadata)
    os.chmod(path, mode)  # safetensors writes 0600 files; keep them readable like meta.json
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def _describe_os_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "the disk is full; free some space"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the directory is not writable; check its permissions"
    return "check that the directory is writable and has free space"


def _few(values: Iterable, n: int = _MAX_LISTED) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


def _shard_name(rank: int, seq: int) -> str:
    return f"shard-r{rank:03d}-{seq:06d}.safetensors"


def _manifest_name(rank: int) -> str:
    return f"manifest-r{rank:03d}.json"


def _empty_manifest(rank: int, config_hash: str) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "rank": rank,
        "config_hash": config_hash,
        "next_seq": 0,
        "shards": [],
    }


# --------------------------------------------------------------------------------------------


class GradientStore:
    """Sharded on-disk store of compressed per-example gradients (see the module docstring).

    Create a store by giving ``layer_dims`` (ordered layer name -> k) for a directory without
    ``meta.json``; open an existing one with the same settings (checked: a difference raises
    :class:`StoreMismatchError`) or with none (e.g. ``readonly=True``). ``dtype`` is checked on
    open when ``layer_dims`` is given or when it is not the default ``"float16"``.

    Writing: :meth:`append` batches, which commit a shard every ``rows_per_shard`` rows;
    :meth:`flush` / :meth:`close` commit the rest. Reading (:meth:`iter_chunks`, :meth:`fetch`,
    :meth:`ids`, :attr:`num_rows`) covers the committed rows of *all* ranks' manifests in the
    directory; rows still buffered in memory are not seen until :meth:`flush`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layer_dims: Mapping[str, int] | None = None,
        dtype: str | torch.dtype = _DEFAULT_DTYPE,
        plan_tensors: Mapping[str, Tensor] | None = None,
        plan_config: Mapping | None = None,
        config: Mapping | None = None,
        rank: int = 0,
        rows_per_shard: int = 8192,
        readonly: bool = False,
    ):
        self._path = Path(path)
        self._rank = _as_int(rank, "rank")
        if self._rank < 0:
            raise StoreInputError(f"rank must be >= 0, got {self._rank}")
        self._rows_per_shard = _as_int(rows_per_shard, "rows_per_shard")
        if self._rows_per_shard < 1:
            raise StoreInputError(f"rows_per_shard must be >= 1, got {self._rows_per_shard}")
        self._readonly = bool(readonly)
        self._closed = False
        self.skipped_nonfinite = 0
        self._warned_nonfinite = False
        self._corrupt: set[str] = set()
        self._clear_buffer()

        meta_path = self._path / META_FILE
        if meta_path.exists():
            self._meta = self._load_meta()
            self._check_match(layer_dims, dtype, plan_tensors, plan_config, config)
        else:
            if self._readonly:
                raise StoreError(
                    f"no gradient store at {self._path} ({META_FILE} is missing); "
                    "check the path, or open it with readonly=False and layer_dims to create one"
                )
            if layer_dims is None:
                raise StoreInputError(
                    f"creating a new gradient store at {self._path} needs layer_dims "
                    "(layer name -> k); to open an existing store, check the path"
                )
            self._meta = self._create(layer_dims, dtype, plan_tensors, plan_config, config)

        self._layers: dict[str, int] = {name: int(k) for name, k in self._meta["layers_list"]}
        self._dtype: torch.dtype = _DTYPE_NAMES[self._meta["dtype"]]
        self._manifest = self._load_manifest(self._path / _manifest_name(self._rank), self._rank)
        if self._manifest is None:
            self._manifest = _empty_manifest(self._rank, self.config_hash)
        self._warn_orphans()

    # ---------------------------------------------------------------- create / open / check

    def _create(self, layer_dims, dtype, plan_tensors, plan_config, config) -> dict:
        layers = _normalize_layers(layer_dims)
        dtype_name = _dtype_name(dtype)
        pc = _normalize_json(plan_config, "plan_config")
        cfg = _normalize_json(config, "config")
        plans = _cpu_tensors(plan_tensors, "plan_tensors")
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layers": [{"name": n, "k": k} for n, k in layers],
            "dtype": dtype_name,
            "plan_config": pc,
            "config": cfg,
            "config_hash": _config_hash(layers, dtype_name, pc, cfg),
            "plans_file": PLANS_FILE,
            "plans_digest": _plans_digest(plans),
            "plans": {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                      for n, t in plans.items()},
            "created_unix": time.time(),
        }
        try:
            self._path.mkdir(parents=True, exist_ok=True)
            # plans first: a meta.json on disk means the store (plans included) is complete
            _atomic_write(self._path / PLANS_FILE,
                          lambda tmp: _write_safetensors(tmp, plans, {"format": FORMAT_NAME}))
            _write_json_atomic(self._path / META_FILE, meta)
        except Exception as e:
            raise StoreError(
                f"could not create the gradient store at {self._path}: {e}; {_describe_os_error(e)}"
            ) from e
        meta["layers_list"] = layers
        return meta

    def _load_meta(self) -> dict:
        meta_path = self._path / META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"could not read {meta_path}: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise StoreError(f"{meta_path} is not a grass_callback gradient store meta file")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"{meta_path} has format_version {version!r}; this grass_callback reads up to "
                f"{FORMAT_VERSION}: upgrade grass_callback"
            )
        try:
            meta["layers_list"] = [[str(e["name"]), int(e["k"])] for e in meta["layers"]]
            _DTYPE_NAMES[meta["dtype"]]
            meta["config_hash"] = str(meta["config_hash"])
            meta.setdefault("plan_config", {})
            meta.setdefault("config", {})
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{meta_path} is malformed ({e!r})") from e
        return meta

    def _check_match(self, layer_dims, dtype, plan_tensors, plan_config, config) -> None:
        meta = self._meta
        stored_layers = meta["layers_list"]
        diffs: list[str] = []
        layers = stored_layers
        if layer_dims is not None:
            layers = _normalize_layers(layer_dims)
            if layers != stored_layers:
                diffs.append("layers: " + _describe_layer_diff(stored_layers, layers))
        dtype_name = meta["dtype"]
        dtype_given = layer_dims is not None or _dtype_name(dtype) != _DEFAULT_DTYPE
        if dtype_given and _dtype_name(dtype) != meta["dtype"]:
            dtype_name = _dtype_name(dtype)
            diffs.append(f"dtype: stored {meta['dtype']!r}, given {dtype_name!r}")
        pc = meta["plan_config"]
        if plan_config is not None:
            pc = _normalize_json(plan_config, "plan_config")
            if pc != meta["plan_config"]:
                diffs.append("plan_config: " + _describe_dict_diff(meta["plan_config"], pc))
        cfg = meta["config"]
        if config is not None:
            cfg = _normalize_json(config, "config")
            if cfg != meta["config"]:
                diffs.append("config: " + _describe_dict_diff(meta["config"], cfg))
        if not diffs and _config_hash(layers, dtype_name, pc, cfg) != meta["config_hash"]:
            diffs.append(
                "config_hash: meta.json's config_hash does not match its own layers/dtype/"
                "plan_config/config (the file was edited by hand?)"
            )
        if plan_tensors is not None:
            given = _cpu_tensors(plan_tensors, "plan_tensors")
            if _plans_digest(given) != meta.get("plans_digest"):
                diffs.append("plan tensors: " + self._describe_plan_diff(given))
        if diffs:
            raise StoreMismatchError(
                f"the gradient store at {self._path} was written with other settings:\n  - "
                + "\n  - ".join(diffs)
                + f"\nUse a new directory for a run with new settings, or open this store with "
                f"the settings it was written with (see {self._path / META_FILE}); to only read "
                f"it, open it with readonly=True and no settings."
            )

    def _describe_plan_diff(self, given: dict[str, Tensor]) -> str:
        try:
            stored = self.plan_tensors()
        except StoreError as e:
            return f"the stored plans could not be read ({e})"
        only_stored = sorted(set(stored) - set(given))
        only_given = sorted(set(given) - set(stored))
        changed = []
        for name in sorted(set(stored) & set(given)):
            a, b = stored[name], given[name]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                changed.append(name)
        parts = []
        if changed:
            parts.append(f"values differ for {_few(changed)}")
        if only_stored:
            parts.append(f"missing from the given plans: {_few(only_stored)}")
        if only_given:
            parts.append(f"not in the stored plans: {_few(only_given)}")
        return "; ".join(parts) or "digest differs"

    def _load_manifest(self, path: Path, rank: int) -> dict | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"could not read the manifest {path}: {e}") from e
        try:
            manifest = json.loads(text)
            if manifest.get("format") != FORMAT_NAME or not isinstance(manifest["shards"], list):
                raise ValueError("not a grass_callback store manifest")
            for entry in manifest["shards"]:
                for key in ("file", "seq", "rows", "min_step", "max_step", "epochs", "bytes"):
                    entry[key]
            manifest["next_seq"] = int(manifest.get("next_seq", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(
                f"the manifest {path} is unreadable ({e!r}); it is only ever replaced atomically, "
                "so it was damaged outside grass_callback: restore it or move it away"
            ) from e
        if manifest.get("config_hash") != self.config_hash:
            raise StoreMismatchError(
                f"the manifest {path} (rank {rank}) was written for config_hash "
                f"{manifest.get('config_hash')!r}, but {self._path / META_FILE} has "
                f"{self.config_hash!r}: shards from another run were mixed into this directory; "
                "move them to their own directory"
            )
        return manifest

    def _all_manifests(self, ranks: set[int] | None = None) -> list[tuple[int, dict]]:
        """(rank, manifest) for every rank's manifest in the directory, sorted by rank."""
        found: dict[int, Path] = {}
        try:
            names = os.listdir(self._path)
        except OSError as e:
            raise StoreError(f"could not list the store directory {self._path}: {e}") from e
        for name in names:
            m = _MANIFEST_RE.match(name)
            if m:
                found[int(m.group(1))] = self._path / name
        if not self._readonly:
            found[self._rank] = self._path / _manifest_name(self._rank)
        out = []
        for rank in sorted(found):
            if ranks is not None and rank not in ranks:
                continue
            if rank == self._rank and not self._readonly:
                manifest = self._manifest
            else:
                manifest = self._load_manifest(found[rank], rank)
            if manifest is not None:
                out.append((rank, manifest))
        return out

    def orphans(self, rank: int | None = None) -> list[Path]:
        """Files in the directory that no manifest lists: leftover temps and orphan shards.

        They are never read. ``rank`` limits the list to that rank's files (temps of meta or
        plans have no rank and are listed only when ``rank`` is None).
        """
        listed = {e["file"] for _, m in self._all_manifests() for e in m["shards"]}
        try:
            names = sorted(os.listdir(self._path))
        except OSError as e:
            raise StoreError(f"could not list the store directory {self._path}: {e}") from e
        out = []
        for name in names:
            tmp = _TMP_RE.match(name)
            if tmp is not None:
                target = tmp.group("final")
                m = _SHARD_RE.match(target) or _MANIFEST_RE.match(target)
                if m is None and target not in (META_FILE, PLANS_FILE):
                    continue  # not one of ours
            else:
                m = _SHARD_RE.match(name)
                if m is None or name in listed:
                    continue
            file_rank = int(m.group(1)) if m is not None else None
            if rank is not None and file_rank != rank:
                continue
            out.append(self._path / name)
        return out

    def _warn_orphans(self) -> None:
        found = self.orphans(None if self._readonly else self._rank)
        if found:
            warnings.warn(
                f"GradientStore {self._path}: ignoring {len(found)} file(s) not listed in any "
                f"manifest (temps or shards left by an interrupted write, or being written by "
                f"another process right now): {_few(p.name for p in found)}. They are never "
                f"read; delete them once no writer is running.",
                stacklevel=3,
            )

    # ---------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def layers(self) -> dict[str, int]:
        """Ordered layer name -> k."""
        return dict(self._layers)

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the gradients."""
        return self._dtype

    @property
    def meta(self) -> dict:
        """A copy of the contents of meta.json."""
        meta = copy.deepcopy(self._meta)
        meta.pop("layers_list", None)
        return meta

    @property
    def plan_config(self) -> dict:
        return copy.deepcopy(self._meta["plan_config"])

    @property
    def config(self) -> dict:
        return copy.deepcopy(self._meta["config"])

    @property
    def config_hash(self) -> str:
        return self._meta["config_hash"]

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def rows_per_shard(self) -> int:
        return self._rows_per_shard

    @property
    def buffered_rows(self) -> int:
        """Rows appended but not committed yet (not visible to readers)."""
        return self._buffered

    @property
    def corrupt_shards(self) -> int:
        """Number of distinct listed shards found missing, truncated or corrupt so far."""
        return len(self._corrupt)

    @property
    def num_rows(self) -> int:
        """Committed rows over all ranks' manifests (buffered rows excluded)."""
        return sum(int(e["rows"]) for _, m in self._all_manifests() for e in m["shards"])

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self._path)!r}, layers={len(self._layers)}, "
            f"dtype={self._meta['dtype']}, rank={self._rank}, readonly={self._readonly})"
        )

    def plan_tensors(self) -> dict[str, Tensor]:
        """The plan tensors saved with the store (``plans.safetensors``)."""
        path = self._path / PLANS_FILE
        try:
            return load_file(str(path))
        except Exception as e:
            raise StoreError(f"could not read the plan tensors {path}: {e}") from e

    def size_bytes(self) -> int:
        """Bytes on disk of meta, plans, manifests and the committed shards of all ranks."""
        total = 0
        for name in (META_FILE, PLANS_FILE):
            with contextlib.suppress(OSError):
                total += (self._path / name).stat().st_size
        for rank, manifest in self._all_manifests():
            with contextlib.suppress(OSError):
                total += (self._path / _manifest_name(rank)).stat().st_size
            total += sum(int(e["bytes"]) for e in manifest["shards"])
        return total

    def shards(self, ranks: Iterable[int] | int | None = None) -> list[tuple[int, dict]]:
        """(rank, manifest entry) of every committed shard, in read order."""
        rank_set = _int_set(ranks, "ranks")
        return [(r, dict(e)) for r, m in self._all_manifests(rank_set) for e in m["shards"]]

    # ---------------------------------------------------------------- writing

    def _clear_buffer(self) -> None:
        self._buf_ids: list[Tensor] = []
        self._buf_steps: list[Tensor] = []
        self._buf_epochs: list[Tensor] = []
        self._buf_grads: dict[str, list[Tensor]] = {}
        self._buffered = 0

    def _check_writable(self) -> None:
        if self._readonly:
            raise StoreError(f"the gradient store at {self._path} was opened readonly")
        if self._closed:
            raise StoreError(f"the gradient store at {self._path} is closed")

    def append(
        self, ids: Tensor, step: int, grads: Mapping[str, Tensor], epoch: int = 0
    ) -> None:
        """Buffer one batch: ``ids`` int [B], ``grads`` layer -> [B, k_l] (any float dtype/device).

        Rows are cast to the storage dtype; rows with NaN/Inf in any layer (after the cast) are
        dropped and counted in ``skipped_nonfinite``. A shard is committed whenever
        ``rows_per_shard`` rows are buffered. If that commit fails the StoreError propagates but
        the batch stays buffered: call :meth:`flush` to retry, do not append it again.
        """
        self._check_writable()
        ids_t = _as_ids(ids)
        step = _as_int(step, "step")
        epoch = _as_int(epoch, "epoch")
        if not isinstance(grads, Mapping):
            raise StoreInputError(
                f"grads must be a mapping layer name -> Tensor[B, k], got {type(grads).__name__}"
            )
        missing = [n for n in self._layers if n not in grads]
        extra = [str(n) for n in grads if n not in self._layers]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing layers {_few(missing)}")
            if extra:
                parts.append(f"unknown layers {_few(extra)}")
            raise StoreInputError(
                f"grads must have exactly the store's layers: {'; '.join(parts)} "
                f"(the store has {_few(self._layers)})"
            )
        batch = ids_t.numel()
        cast: dict[str, Tensor] = {}
        finite = torch.ones(batch, dtype=torch.bool)
        finite_in = torch.ones(batch, dtype=torch.bool)
        for name, k in self._layers.items():
            g = grads[name]
            if not isinstance(g, Tensor):
                raise StoreInputError(f"grads[{name!r}] must be a Tensor, got {type(g).__name__}")
            if g.dim() != 2 or g.shape[1] != k:
                raise StoreInputError(
                    f"grads[{name!r}] must have shape [B, {k}], got {list(g.shape)}"
                )
            if g.shape[0] != batch:
                raise StoreInputError(
                    f"grads[{name!r}] has {g.shape[0]} rows but ids has {batch}: they must match"
                )
            if not g.is_floating_point():
                raise StoreInputError(f"grads[{name!r}] must be floating point, got {g.dtype}")
            g = g.detach()
            # A row is kept when its largest |value| is finite once cast to the storage dtype:
            # rounding is monotonic, so this is exact (NaN propagates through amax), and far
            # cheaper than isfinite over every element (slow for half types on the CPU).
            row_max = torch.maximum(g.amax(dim=1), g.amin(dim=1).neg())  # NaN propagates
            finite_in &= torch.isfinite(row_max).cpu()
            finite &= torch.isfinite(row_max.to(self._dtype)).cpu()
            if g.device.type == "cpu":
                cast[name] = g.to(dtype=self._dtype, copy=True)
            else:
                cast[name] = g.to(dtype=self._dtype).cpu()
        if not bool(finite.all()):
            bad = ~finite
            n_bad = int(bad.sum())
            self.skipped_nonfinite += n_bad
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                overflow = int((bad & finite_in).sum())
                hint = ""
                if overflow:
                    fix = "check the gradient scale"
                    if self._dtype == torch.float16:
                        fix = "store in bfloat16 or float32 (dtype=...), or " + fix
                    hint = (
                        f" {overflow} of them were finite but overflow {self._meta['dtype']}: "
                        f"{fix}."
                    )
                warnings.warn(
                    f"GradientStore: dropped {n_bad} of {batch} rows with NaN/Inf gradients at "
                    f"step {step} (ids {_few(ids_t[bad].tolist())}).{hint} Later drops are only "
                    f"counted in store.skipped_nonfinite.",
                    stacklevel=2,
                )
            ids_t = ids_t[finite]
            cast = {n: t[finite] for n, t in cast.items()}
        n = ids_t.numel()
        if n == 0:
            return
        self._buf_ids.append(ids_t)
        self._buf_steps.append(torch.full((n,), step, dtype=torch.int64))
        self._buf_epochs.append(torch.full((n,), epoch, dtype=torch.int64))
        for name, t in cast.items():
            self._buf_grads.setdefault(name, []).append(t)
        self._buffered += n
        while self._buffered >= self._rows_per_shard:
            self._commit_buffered(self._rows_per_shard)

    def _consolidate(self) -> None:
        """Concatenate the buffered batches into one piece per tensor."""
        if len(self._buf_ids) > 1:
            self._buf_ids = [torch.cat(self._buf_ids)]
            self._buf_steps = [torch.cat(self._buf_steps)]
            self._buf_epochs = [torch.cat(self._buf_epochs)]
            self._buf_grads = {n: [torch.cat(ts)] for n, ts in self._buf_grads.items()}

    def _commit_buffered(self, n: int) -> None:
        """Commit the first ``n`` buffered rows as one shard; they leave the buffer on success."""
        self._consolidate()
        ids, steps, epochs = self._buf_ids[0], self._buf_steps[0], self._buf_epochs[0]
        grads = {name: self._buf_grads[name][0] for name in self._layers}
        self._commit_rows(ids[:n], steps[:n], epochs[:n], {k: v[:n] for k, v in grads.items()})
        if n >= ids.numel():
            self._clear_buffer()
        else:  # clone the remainder so the committed rows' memory is released
            self._buf_ids = [ids[n:].clone()]
            self._buf_steps = [steps[n:].clone()]
            self._buf_epochs = [epochs[n:].clone()]
            self._buf_grads = {k: [v[n:].clone()] for k, v in grads.items()}
            self._buffered = int(self._buf_ids[0].numel())

    def _next_seq(self, at_least: int = 0) -> int:
        seq = max(int(self._manifest["next_seq"]), at_least)
        while (self._path / _shard_name(self._rank, seq)).exists():  # never overwrite an orphan
            seq += 1
        return seq

    def _write_shard(self, seq: int, ids: Tensor, steps: Tensor, epochs: Tensor,
                     grads: Mapping[str, Tensor]) -> dict:
        """Write one shard file (temp, fsync, rename); returns its manifest entry."""
        name = _shard_name(self._rank, seq)
        final = self._path / name
        tensors = {"ids": ids.contiguous(), "steps": steps.contiguous(),
                   "epochs": epochs.contiguous()}
        for layer in self._layers:
            tensors[f"g/{layer}"] = grads[layer].contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "rank": str(self._rank),
            "seq": str(seq),
            "config_hash": self.config_hash,
            "layers": json.dumps(list(self._layers)),
        }
        digest: list[str] = []
        try:
            _atomic_write(
                final, lambda tmp: digest.append(_write_safetensors(tmp, tensors, metadata))
            )
            size = final.stat().st_size
        except Exception as e:
            raise StoreError(
                f"could not write the gradient shard {final} ({e}): {_describe_os_error(e)}. "
                f"Nothing was committed; the rows are kept in memory, call flush() to retry."
            ) from e
        return {
            "file": name,
            "seq": seq,
            "rows": int(ids.numel()),
            "min_step": int(steps.min()),
            "max_step": int(steps.max()),
            "epochs": sorted(int(e) for e in torch.unique(epochs).tolist()),
            "bytes": int(size),
            "sha256": digest[0],
            "dtype": self._meta["dtype"],
        }

    def _write_manifest(self, manifest: dict) -> None:
        final = self._path / _manifest_name(self._rank)
        try:
            _write_json_atomic(final, manifest)
        except Exception as e:
            raise StoreError(
                f"could not write the manifest {final} ({e}): {_describe_os_error(e)}. The "
                f"previous manifest and its shards are intact; the rows are kept in memory, call "
                f"flush() to retry."
            ) from e
        self._manifest = manifest

    def _commit_rows(self, ids: Tensor, steps: Tensor, epochs: Tensor,
                     grads: Mapping[str, Tensor]) -> None:
        entry = self._write_shard(self._next_seq(), ids, steps, epochs, grads)
        manifest = copy.deepcopy(self._manifest)
        manifest["shards"].append(entry)
        manifest["next_seq"] = entry["seq"] + 1
        try:
            self._write_manifest(manifest)
        except StoreError:
            with contextlib.suppress(OSError):  # renamed but never listed: remove it
                (self._path / entry["file"]).unlink()
            raise

    def flush(self) -> None:
        """Commit the buffered rows (as one shard; more if over ``rows_per_shard``).

        Does nothing when the buffer is empty. On failure raises StoreError and keeps the rows.
        """
        while self._buffered > 0:
            self._commit_buffered(min(self._buffered, self._rows_per_shard))

    def close(self) -> None:
        """Flush and mark the store closed (reading stays possible). Idempotent."""
        if self._closed:
            return
        if not self._readonly:
            self.flush()
        self._closed = True

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # do not hide the error already on its way
            warnings.warn(f"GradientStore {self._path}: close failed while handling an error: {e}",
                          stacklevel=2)

    def truncate_after(self, step: int) -> int:
        """Drop this rank's rows with step > ``step``, committed and buffered. Returns how many.

        Call it when resuming from a checkpoint taken at ``step`` so the steps re-run after it
        are stored once. Committed shards are swapped atomically (see the module docstring).
        """
        self._check_writable()
        step = _as_int(step, "step")
        kept: list[dict] = []
        written: list[dict] = []
        remove: list[str] = []
        dropped_rows = 0
        next_seq = int(self._manifest["next_seq"])
        try:
            for entry in self._manifest["shards"]:
                if int(entry["max_step"]) <= step:
                    kept.append(entry)
                    continue
                if int(entry["min_step"]) > step:
                    remove.append(entry["file"])
                    dropped_rows += int(entry["rows"])
                    continue
                data = self._load_whole_shard(entry)
                if data is None:  # unreadable: unlist it, leave the file for inspection
                    dropped_rows += int(entry["rows"])
                    continue
                keep = data["steps"] <= step
                new = self._write_shard(
                    self._next_seq(next_seq), data["ids"][keep], data["steps"][keep],
                    data["epochs"][keep], {n: data[f"g/{n}"][keep] for n in self._layers})
                written.append(new)
                next_seq = new["seq"] + 1
                kept.append(new)
                remove.append(entry["file"])
                dropped_rows += int(entry["rows"]) - int(keep.sum())
            manifest = copy.deepcopy(self._manifest)
            manifest["shards"] = kept
            manifest["next_seq"] = next_seq
            if kept != self._manifest["shards"]:
                self._write_manifest(manifest)
        except StoreError:
            for entry in written:
                with contextlib.suppress(OSError):
                    (self._path / entry["file"]).unlink()
            raise
        for name in remove:
            try:
                (self._path / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                warnings.warn(f"GradientStore: could not delete the dropped shard {name} ({e}); "
                              f"it is unlisted and ignored", stacklevel=2)
        if self._buffered:
            self._consolidate()
            keep = self._buf_steps[0] <= step
            dropped_rows += int((~keep).sum())
            ids = self._buf_ids[0][keep]
            steps = self._buf_steps[0][keep]
            epochs = self._buf_epochs[0][keep]
            grads = {n: self._buf_grads[n][0][keep] for n in self._layers}
            self._clear_buffer()
            if ids.numel():
                self._buf_ids, self._buf_steps, self._buf_epochs = [ids], [steps], [epochs]
                self._buf_grads = {n: [t] for n, t in grads.items()}
                self._buffered = int(ids.numel())
        return dropped_rows

    # ---------------------------------------------------------------- reading

    def _mark_bad(self, entry: dict, why: str) -> None:
        self._corrupt.add(entry["file"])
        warnings.warn(
            f"GradientStore {self._path}: skipping shard {entry['file']} ({entry['rows']} rows): "
            f"{why}. Its rows are not read; re-run attribution for them or restore the file.",
            stacklevel=4,
        )

    @contextlib.contextmanager
    def _open_shard(self, entry: dict) -> Iterator[Any]:
        """Yield an open safe_open handle of a listed shard, or None (warned) if it is bad."""
        path = self._path / entry["file"]
        with contextlib.ExitStack() as stack:
            handle = None
            try:
                size = path.stat().st_size
                if size != int(entry["bytes"]):
                    raise _BadShard(f"it has {size} bytes, the manifest says {entry['bytes']} "
                                    f"(truncated?)")
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                self._validate_shard(handle, entry)
            except FileNotFoundError:
                handle = None
                self._mark_bad(entry, "the file is missing")
            except Exception as e:
                handle = None
                self._mark_bad(entry, str(e))
            yield handle

    def _validate_shard(self, handle: Any, entry: dict) -> None:
        rows = int(entry["rows"])
        keys = set(handle.keys())
        for name in ("ids", "steps", "epochs"):
            if name not in keys or handle.get_slice(name).get_shape() != [rows]:
                raise _BadShard(f"tensor {name!r} is missing or not of shape [{rows}]")
        for layer, k in self._layers.items():
            key = f"g/{layer}"
            if key not in keys or handle.get_slice(key).get_shape() != [rows, k]:
                raise _BadShard(f"tensor {key!r} is missing or not of shape [{rows}, {k}]")

    def _load_whole_shard(self, entry: dict) -> dict[str, Tensor] | None:
        with self._open_shard(entry) as f:
            if f is None:
                return None
            try:
                return {name: f.get_tensor(name) for name in f.keys()}
            except Exception as e:
                self._mark_bad(entry, str(e))
                return None

    def _select(self, ranks: set[int] | None, epochs: set[int] | None,
                min_step: int | None, max_step: int | None) -> list[tuple[int, dict]]:
        out = []
        for rank, manifest in self._all_manifests(ranks):
            for entry in manifest["shards"]:
                if min_step is not None and int(entry["max_step"]) < min_step:
                    continue
                if max_step is not None and int(entry["min_step"]) > max_step:
                    continue
                if epochs is not None and not epochs.intersection(int(e) for e in entry["epochs"]):
                    continue
                out.append((rank, entry))
        return out

    def _resolve_layers(self, layers: Iterable[str] | str | None) -> list[str]:
        if layers is None:
            return list(self._layers)
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        unknown = [n for n in layers if n not in self._layers]
        if unknown:
            raise StoreInputError(
                f"unknown layers {_few(unknown)}; the store has {_few(self._layers)}"
            )
        return layers

    @staticmethod
    def _row_mask(steps: Tensor, epochs_t: Tensor, epochs: set[int] | None,
                  min_step: int | None, max_step: int | None) -> Tensor | None:
        mask = None
        if epochs is not None:
            mask = torch.isin(epochs_t, torch.tensor(sorted(epochs), dtype=torch.int64))
        if min_step is not None:
            m = steps >= min_step
            mask = m if mask is None else mask & m
        if max_step is not None:
            m = steps <= max_step
            mask = m if mask is None else mask & m
        return mask

    def _iter_pieces(self, piece_rows: int, layers: list[str], ranks, epochs, min_step, max_step,
                     dtype: torch.dtype | None) -> Iterator[StoreChunk]:
        """Stream selected rows shard by shard, in pieces of at most ``piece_rows`` rows."""
        for _rank, entry in self._select(ranks, epochs, min_step, max_step):
            with self._open_shard(entry) as f:
                if f is None:
                    continue
                try:
                    # copies: views into the shard's memory map would keep every shard a
                    # reader has seen mapped for as long as it holds the ids (scoring does)
                    ids = f.get_tensor("ids").clone()
                    steps = f.get_tensor("steps").clone()
                    eps = f.get_tensor("epochs").clone()
                except Exception as e:
                    self._mark_bad(entry, str(e))
                    continue
                mask = self._row_mask(steps, eps, epochs, min_step, max_step)
                rows = ids.numel()
                for a in range(0, rows, piece_rows):
                    b = min(a + piece_rows, rows)
                    sel = None if mask is None else mask[a:b]
                    if sel is not None and not bool(sel.any()):
                        continue
                    try:
                        grads = {n: f.get_slice(f"g/{n}")[a:b] for n in layers}
                    except Exception as e:
                        self._mark_bad(entry, str(e))
                        break
                    piece = StoreChunk(ids[a:b], steps[a:b], eps[a:b], grads)
                    if sel is not None and not bool(sel.all()):
                        piece = StoreChunk(piece.ids[sel], piece.steps[sel], piece.epochs[sel],
                                           {n: g[sel] for n, g in grads.items()})
                    if dtype is not None:
                        piece.grads = {n: g.to(dtype) for n, g in piece.grads.items()}
                    yield piece

    def iter_chunks(
        self,
        chunk_rows: int = 4096,
        layers: Iterable[str] | str | None = None,
        epochs: Iterable[int] | int | None = None,
        min_step: int | None = None,
        max_step: int | None = None,
        ranks: Iterable[int] | int | None = None,
        dtype: torch.dtype | str | None = torch.float32,
    ) -> Iterator[StoreChunk]:
        """Stream the committed rows of all ranks as StoreChunks of <= ``chunk_rows`` rows.

        Only rows committed to a manifest are read: call :meth:`flush` first to include rows
        still buffered. Filters: ``layers`` (default all, in store order), ``epochs``,
        ``min_step``/``max_step`` (inclusive), ``ranks``. ``dtype`` is the output dtype
        (``None``: the storage dtype). One shard is open at a time and at most about two
        chunks of rows are in memory. Shards listed but missing or damaged are skipped with a
        warning and counted in :attr:`corrupt_shards`. Chunks are full except the last one.
        """
        chunk_rows = _as_int(chunk_rows, "chunk_rows")
        if chunk_rows < 1:
            raise StoreInputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        layer_list = self._resolve_layers(layers)
        epoch_set = _int_set(epochs, "epochs")
        rank_set = _int_set(ranks, "ranks")
        min_step = None if min_step is None else _as_int(min_step, "min_step")
        max_step = None if max_step is None else _as_int(max_step, "max_step")
        out_dtype = _read_dtype(dtype)
        pieces = self._iter_pieces(chunk_rows, layer_list, rank_set, epoch_set, min_step,
                                   max_step, out_dtype)
        return _rechunk(pieces, chunk_rows, layer_list)

    def ids(self, epochs: Iterable[int] | int | None = None,
            ranks: Iterable[int] | int | None = None) -> Tensor:
        """All committed ids (int64), all ranks, in read order (an id may repeat)."""
        epoch_set = _int_set(epochs, "epochs")
        out = []
        for _rank, entry in self._select(_int_set(ranks, "ranks"), epoch_set, None, None):
            with self._open_shard(entry) as f:
                if f is None:
                    continue
                try:
                    ids = f.get_tensor("ids")
                    if epoch_set is not None:
                        eps = f.get_tensor("epochs")
                        ids = ids[self._row_mask(ids, eps, epoch_set, None, None)]
                except Exception as e:
                    self._mark_bad(entry, str(e))
                    continue
                out.append(ids)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def fetch(
        self,
        ids: Tensor,
        layers: Iterable[str] | str | None = None,
        dtype: torch.dtype | str | None = torch.float32,
        *,
        epochs: Iterable[int] | int | None = None,
        window_rows: int = 4096,
    ) -> FetchResult:
        """Rows of the given ids: a dict layer -> ``[len(ids), k]`` with ``.steps``/``.epochs``.

        When an id was stored several times (several epochs), the row with the latest step wins
        (``epochs`` restricts the candidates). Committed rows only. Raises StoreError listing a
        few ids when some are not in the store.
        """
        want = _as_ids(ids)
        layer_list = self._resolve_layers(layers)
        out_dtype = _read_dtype(dtype)
        epoch_set = _int_set(epochs, "epochs")
        uniq, inverse = torch.unique(want, sorted=True, return_inverse=True)
        n_uniq = uniq.numel()
        lowest = torch.iinfo(torch.int64).min
        best_step = torch.full((n_uniq,), lowest, dtype=torch.int64)
        best_epoch = torch.zeros(n_uniq, dtype=torch.int64)
        best_src = torch.full((n_uniq,), -1, dtype=torch.int64)
        best_row = torch.full((n_uniq,), -1, dtype=torch.int64)
        selected = self._select(None, epoch_set, None, None) if n_uniq else []
        for si, (_rank, entry) in enumerate(selected):
            with self._open_shard(entry) as f:
                if f is None:
                    continue
                try:
                    sids = f.get_tensor("ids")
                    ssteps = f.get_tensor("steps")
                    seps = f.get_tensor("epochs")
                except Exception as e:
                    self._mark_bad(entry, str(e))
                    continue
            pos = torch.searchsorted(uniq, sids).clamp(max=n_uniq - 1)
            match = uniq[pos] == sids
            if epoch_set is not None:
                match &= self._row_mask(ssteps, seps, epoch_set, None, None)
            rows = torch.nonzero(match).flatten()
            if rows.numel() == 0:
                continue
            p, s = pos[rows], ssteps[rows]
            # order by (position, step, row); the last of each position is its best row here
            order = torch.argsort(s, stable=True)
            order = order[torch.argsort(p[order], stable=True)]
            p, s, rows = p[order], s[order], rows[order]
            last = torch.ones_like(p, dtype=torch.bool)
            last[:-1] = p[1:] != p[:-1]
            p, s, rows = p[last], s[last], rows[last]
            better = s >= best_step[p]  # ties: the later shard wins
            p, s, rows = p[better], s[better], rows[better]
            best_step[p] = s
            best_epoch[p] = seps[rows]
            best_src[p] = si
            best_row[p] = rows
        missing = uniq[best_src < 0]
        if missing.numel():
            raise StoreError(
                f"{missing.numel()} of {n_uniq} requested ids are not in the store at "
                f"{self._path}: {_few(missing.tolist())} (only committed rows are read: call "
                f"flush() first; check the epochs filter)"
            )
        grads = {}
        for name in layer_list:
            grads[name] = torch.empty(
                n_uniq, self._layers[name], dtype=out_dtype or self._dtype)
        for si in torch.unique(best_src).tolist():
            entry = selected[si][1]
            at = torch.nonzero(best_src == si).flatten()
            rows = best_row[at]
            order = torch.argsort(rows)
            rows, at = rows[order], at[order]
            with self._open_shard(entry) as f:
                if f is None:
                    raise StoreError(f"shard {entry['file']} became unreadable during fetch")
                i, n = 0, rows.numel()
                try:
                    while i < n:
                        a = int(rows[i])
                        b = min(a + window_rows, int(entry["rows"]))
                        j = int(torch.searchsorted(rows, b))
                        for name in layer_list:
                            block = f.get_slice(f"g/{name}")[a:b]
                            grads[name][at[i:j]] = block[rows[i:j] - a].to(grads[name].dtype)
                        i = j
                except Exception as e:
                    self._corrupt.add(entry["file"])
                    raise StoreError(
                        f"could not read shard {entry['file']} during fetch: {e}"
                    ) from e
        result = {name: g[inverse] for name, g in grads.items()}
        return FetchResult(result, want, best_step[inverse], best_epoch[inverse])

    def verify(self) -> list[str]:
        """Check every listed shard's size and sha256; returns a list of problems (empty: ok)."""
        problems = []
        for rank, manifest in self._all_manifests():
            for entry in manifest["shards"]:
                path = self._path / entry["file"]
                try:
                    h = hashlib.sha256()
                    size = 0
                    with open(path, "rb") as f:
                        while block := f.read(1 << 22):
                            h.update(block)
                            size += len(block)
                except OSError as e:
                    problems.append(f"rank {rank} {entry['file']}: unreadable ({e})")
                    continue
                if size != int(entry["bytes"]):
                    problems.append(
                        f"rank {rank} {entry['file']}: {size} bytes, expected {entry['bytes']}"
                    )
                elif entry.get("sha256") and h.hexdigest() != entry["sha256"]:
                    problems.append(
                        f"rank {rank} {entry['file']}: sha256 differs from the manifest"
                    )
        return problems


# --------------------------------------------------------------------------------------------


def _int_set(values: Iterable[int] | int | None, what: str) -> set[int] | None:
    if values is None:
        return None
    if isinstance(values, Tensor):
        values = values.reshape(-1).tolist()
    elif isinstance(values, numbers.Integral):
        return {_as_int(values, what)}
    return {_as_int(v, what) for v in values}


def _rechunk(
    pieces: Iterator[StoreChunk], chunk_rows: int, layers: list[str]
) -> Iterator[StoreChunk]:
    """Regroup pieces (each <= chunk_rows rows) into chunks of exactly chunk_rows (last: fewer)."""
    pending: list[StoreChunk] = []
    count = 0

    def emit() -> StoreChunk:
        if len(pending) == 1:
            return pending[0]
        return StoreChunk(
            torch.cat([p.ids for p in pending]),
            torch.cat([p.steps for p in pending]),
            torch.cat([p.epochs for p in pending]),
            {n: torch.cat([p.grads[n] for p in pending]) for n in layers},
        )

    for piece in pieces:
        n = len(piece)
        if n == 0:
            continue
        room = chunk_rows - count
        if n >= room:
            head = _slice_chunk(piece, 0, room)
            pending.append(head)
            yield emit()
            pending, count = [], 0
            piece = _slice_chunk(piece, room, n)
            n -= room
            if n == 0:
                continue
        pending.append(piece)
        count += n
    if pending:
        yield emit()


def _slice_chunk(c: StoreChunk, a: int, b: int) -> StoreChunk:
    if a == 0 and b == len(c):
        return c
    grads = {n: g[a:b] for n, g in c.grads.items()}
    return StoreChunk(c.ids[a:b], c.steps[a:b], c.epochs[a:b], grads)


def _describe_layer_diff(stored: list[list], given: list[list]) -> str:
    s, g = dict((n, k) for n, k in stored), dict((n, k) for n, k in given)
    parts = []
    removed = [n for n in s if n not in g]
    added = [n for n in g if n not in s]
    changed = [f"{n} (k {s[n]} -> {g[n]})" for n in s if n in g and s[n] != g[n]]
    if removed:
        parts.append(f"not given: {_few(removed)}")
    if added:
        parts.append(f"not in the store: {_few(added)}")
    if changed:
        parts.append(f"other k: {_few(changed)}")
    if not parts:
        parts.append("same layers in another order")
    return "; ".join(parts)


def _describe_dict_diff(stored: dict, given: dict) -> str:
    keys = sorted(set(stored) | set(given), key=str)
    parts = []
    for key in keys:
        if key not in given:
            parts.append(f"{key!s} only in the store")
        elif key not in stored:
            parts.append(f"{key!s} not in the store")
        elif stored[key] != given[key]:
            a, b = _short(stored[key]), _short(given[key])
            parts.append(f"{key!s}: stored {a}, given {b}")
    return "; ".join(parts[:_MAX_LISTED]) + (" ..." if len(parts) > _MAX_LISTED else "")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
