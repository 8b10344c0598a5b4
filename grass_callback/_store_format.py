"""Internal to :mod:`grass_callback.store`: the on-disk format's names and constants, the row
containers, and the small helpers (dtypes, canonical JSON and hashes, atomic writes, messages).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import numbers
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from grass_callback.errors import StoreInputError

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


def _as_losses(loss: Any, batch: int, owned: bool = False) -> Tensor:
    """A batch's per-row training losses as float32 ``[batch]`` on the CPU (NaN for ``None``);
    ``owned``: a float32 CPU tensor nobody else writes to is kept without a copy."""
    if loss is None:
        return torch.full((batch,), float("nan"), dtype=torch.float32)
    if not isinstance(loss, Tensor) or not loss.is_floating_point() or loss.shape != (batch,):
        got = (list(loss.shape), loss.dtype) if isinstance(loss, Tensor) else type(loss).__name__
        raise StoreInputError(f"loss must be a floating Tensor[{batch}] (one loss per row), got {got}")
    if owned and loss.device.type == "cpu" and loss.dtype == torch.float32:
        return loss.detach()
    return loss.detach().to(device="cpu", dtype=torch.float32, copy=True)


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
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return ("the filesystem is mounted read-only; put the store on a writable filesystem "
                "(store_dir=...) or remount it read-write")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
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


def _describe_dict_diff(stored: dict, given: dict, sep: str = "; ") -> str:
    """The keys that differ, each with both values; a pair of dicts (a layer's plan config) lists
    only its own differing keys, so the difference is not cut off by :func:`_short`."""
    keys = sorted(set(stored) | set(given), key=str)
    parts = []
    for key in keys:
        if key not in given:
            parts.append(f"{key!s} only in the store")
        elif key not in stored:
            parts.append(f"{key!s} not in the store")
        elif stored[key] != given[key]:
            if isinstance(stored[key], dict) and isinstance(given[key], dict):
                parts.append(f"{key!s}: " + _describe_dict_diff(stored[key], given[key], sep=", "))
                continue
            a, b = _short(stored[key]), _short(given[key])
            parts.append(f"{key!s}: stored {a}, given {b}")
    return sep.join(parts[:_MAX_LISTED]) + (" ..." if len(parts) > _MAX_LISTED else "")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."

