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
                                       (a layer whose rows in a shard are all zero is not
                                       written: the manifest entry lists it in "zero_layers"
                                       and readers give zeros; e.g. a pooler the loss ignores),
                                       and "loss" (float32 [n]: each row's training loss, NaN
                                       where none was given) when a row of the shard has one
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

Code: this module holds the writing side of :class:`GradientStore` (create/open, append, commit,
truncate); the reading side is the mixin in :mod:`grass_callback._store_read`, and the format's
names and small helpers are in :mod:`grass_callback._store_format`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from grass_callback._store_format import (
    _DEFAULT_DTYPE,
    _DTYPE_NAMES,
    _MANIFEST_RE,
    _SHARD_RE,
    _TMP_RE,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    PLANS_FILE,
    FetchResult,
    StoreChunk,
    _as_ids,
    _as_int,
    _as_losses,
    _atomic_write,
    _config_hash,
    _cpu_tensors,
    _describe_dict_diff,
    _describe_layer_diff,
    _describe_os_error,
    _dtype_name,
    _empty_manifest,
    _few,
    _int_set,
    _manifest_name,
    _normalize_json,
    _normalize_layers,
    _plans_digest,
    _shard_name,
    _write_json_atomic,
    _write_safetensors,
)
from grass_callback._store_read import StoreReading
from grass_callback.errors import StoreError, StoreInputError, StoreMismatchError

__all__ = [
    "FORMAT_VERSION",
    "FetchResult",
    "GradientStore",
    "StoreChunk",
    "StoreInputError",
    "row_maxima",
]


def row_maxima(rows) -> Tensor:
    """``[L, B]``: each row's largest ``|value|`` in each of the layers ``rows`` (``[B, k_l]``
    tensors), in one dtype every layer's converts to exactly. NaN propagates through ``abs`` and
    ``amax``, and rounding is monotonic, so a row is finite in a storage dtype exactly when its
    maximum cast to that dtype is: the store's rule for dropping rows, also the recorder's."""
    maxes = [g.abs().amax(dim=1) for g in rows]
    if not maxes:
        raise StoreInputError("row_maxima needs at least one layer of rows.")
    dtypes = {m.dtype for m in maxes}
    wide = dtypes.pop() if len(dtypes) == 1 else torch.float64 if torch.float64 in dtypes else torch.float32
    return torch.stack([m.to(wide) for m in maxes])


class GradientStore(StoreReading):
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
            meta = json.loads(meta_path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"could not read {meta_path} ({type(e).__name__}: {str(e)[:120]}); it is "
                             "only ever replaced atomically, so it was damaged outside grass_callback: "
                             "restore it, or move the store away and start a new one") from e
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
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"could not read the manifest {path}: {e}") from e
        try:
            manifest = json.loads(raw.decode("utf-8"))
            if manifest.get("format") != FORMAT_NAME or not isinstance(manifest["shards"], list):
                raise ValueError("not a grass_callback store manifest")
            for entry in manifest["shards"]:
                for key in ("file", "seq", "rows", "min_step", "max_step", "epochs", "bytes"):
                    entry[key]
            manifest["next_seq"] = int(manifest.get("next_seq", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(
                f"the manifest {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); it is only "
                "ever replaced atomically, so it was damaged outside grass_callback: restore it from a "
                f"backup, or run `python -m grass_callback store repair {self._path}` to rebuild it "
                "from the shards on disk"
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
        self._buf_loss: list[Tensor] = []  # float32 [n] per piece, NaN where a row has no loss
        self._buf_grads: dict[str, list[Tensor]] = {}
        self._buf_nonzero: dict[str, list[Tensor]] = {}  # bool [n] per piece: the row is not all zero
        self._buffered = 0

    def _check_writable(self) -> None:
        if self._readonly:
            raise StoreError(f"the gradient store at {self._path} was opened readonly")
        if self._closed:
            raise StoreError(f"the gradient store at {self._path} is closed")

    def append(
        self, ids: Tensor, step: int, grads: Mapping[str, Tensor], epoch: int = 0, *, owned: bool = False,
        loss: Tensor | None = None,
    ) -> Tensor:
        """Buffer one batch: ``ids`` int [B], ``grads`` layer -> [B, k_l] (any float dtype/device).

        ``loss`` (float [B], optional): each row's training loss at this step, kept beside the rows
        as float32 (a shard's ``"loss"`` tensor; NaN for rows given none) and read by :meth:`losses`.

        ``owned=True`` hands over CPU tensors already in the storage dtype (float32 for ``loss``)
        that nobody else will write to (the :class:`~grass_callback.recorder.StepRecorder`'s fresh
        copies): they are buffered without another copy.

        Rows are cast to the storage dtype; rows with NaN/Inf in any layer (after the cast) are
        dropped and counted in ``skipped_nonfinite``. Returns the kept rows as a bool mask [B]. A shard is committed whenever
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
        loss_t = _as_losses(loss, batch, owned)
        cast: dict[str, Tensor] = {}
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
            if g.device.type != "cpu":
                cast[name] = g.to(dtype=self._dtype).cpu()
            elif owned and g.dtype == self._dtype:
                cast[name] = g  # the caller's fresh copy (StepRecorder): kept as it is
            else:
                cast[name] = g.to(dtype=self._dtype, copy=True)
        # every layer's row maxima at once ([L, B]): three reductions per batch, not three per layer
        # a row is kept when its largest |value| is finite once cast to the storage dtype: exact
        # (row_maxima), and far cheaper than isfinite over every element (slow for half types)
        maxes = row_maxima(grads[name].detach() for name in self._layers).cpu()
        finite_in = torch.isfinite(maxes).all(dim=0)
        finite = torch.isfinite(maxes.to(self._dtype)).all(dim=0)
        nonzero = dict(zip(self._layers, maxes != 0))  # all-zero layers of a shard are not written
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
            loss_t = loss_t[finite]
            cast = {n: t[finite] for n, t in cast.items()}
            nonzero = {n: t[finite] for n, t in nonzero.items()}
        n = ids_t.numel()
        if n == 0:
            return finite
        self._buf_ids.append(ids_t)
        self._buf_steps.append(torch.full((n,), step, dtype=torch.int64))
        self._buf_epochs.append(torch.full((n,), epoch, dtype=torch.int64))
        self._buf_loss.append(loss_t)
        for name, t in cast.items():
            self._buf_grads.setdefault(name, []).append(t)
            self._buf_nonzero.setdefault(name, []).append(nonzero[name])
        self._buffered += n
        while self._buffered >= self._rows_per_shard:
            self._commit_buffered(self._rows_per_shard)
        return finite

    def _consolidate(self) -> None:
        """Concatenate the buffered batches into one piece per tensor."""
        if len(self._buf_ids) > 1:
            self._buf_ids = [torch.cat(self._buf_ids)]
            self._buf_steps = [torch.cat(self._buf_steps)]
            self._buf_epochs = [torch.cat(self._buf_epochs)]
            self._buf_loss = [torch.cat(self._buf_loss)]
            self._buf_grads = {n: [torch.cat(ts)] for n, ts in self._buf_grads.items()}
            self._buf_nonzero = {n: [torch.cat(ts)] for n, ts in self._buf_nonzero.items()}

    def _commit_buffered(self, n: int) -> None:
        """Commit the first ``n`` buffered rows as one shard; they leave the buffer on success."""
        self._consolidate()
        ids, steps, epochs = self._buf_ids[0], self._buf_steps[0], self._buf_epochs[0]
        loss = self._buf_loss[0]
        grads = {name: self._buf_grads[name][0] for name in self._layers}
        nonzero = {name: self._buf_nonzero[name][0] for name in self._layers}
        written = {k: v[:n] for k, v in grads.items() if bool(nonzero[k][:n].any())}  # all-zero layers: listed only
        self._commit_rows(ids[:n], steps[:n], epochs[:n], written, loss[:n])
        if n >= ids.numel():
            self._clear_buffer()
        else:  # clone the remainder so the committed rows' memory is released
            self._buf_ids = [ids[n:].clone()]
            self._buf_steps = [steps[n:].clone()]
            self._buf_epochs = [epochs[n:].clone()]
            self._buf_loss = [loss[n:].clone()]
            self._buf_grads = {k: [v[n:].clone()] for k, v in grads.items()}
            self._buf_nonzero = {k: [v[n:].clone()] for k, v in nonzero.items()}
            self._buffered = int(self._buf_ids[0].numel())

    def _next_seq(self, at_least: int = 0) -> int:
        seq = max(int(self._manifest["next_seq"]), at_least)
        while (self._path / _shard_name(self._rank, seq)).exists():  # never overwrite an orphan
            seq += 1
        return seq

    def _write_shard(self, seq: int, ids: Tensor, steps: Tensor, epochs: Tensor,
                     grads: Mapping[str, Tensor], loss: Tensor | None = None) -> dict:
        """Write one shard file (temp, fsync, rename); returns its manifest entry.

        ``loss`` (float32 [n], NaN where a row has none) is written as the ``"loss"`` tensor unless
        no row has one.

        A store layer missing from ``grads`` is all zero in these rows: it is not written, and the
        entry lists it in ``zero_layers`` (readers give zeros).
        """
        name = _shard_name(self._rank, seq)
        final = self._path / name
        tensors = {"ids": ids.contiguous(), "steps": steps.contiguous(),
                   "epochs": epochs.contiguous()}
        if loss is not None and not bool(torch.isnan(loss).all()):
            tensors["loss"] = loss.to(torch.float32).contiguous()
        zero_layers = [layer for layer in self._layers if layer not in grads]
        for layer in self._layers:
            if layer in grads:
                tensors[f"g/{layer}"] = grads[layer].contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "rank": str(self._rank),
            "seq": str(seq),
            "config_hash": self.config_hash,
            "layers": json.dumps([layer for layer in self._layers if layer in grads]),
            "zero_layers": json.dumps(zero_layers),
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
        entry = {
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
        if zero_layers:
            entry["zero_layers"] = zero_layers
        return entry

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
                     grads: Mapping[str, Tensor], loss: Tensor | None = None) -> None:
        entry = self._write_shard(self._next_seq(), ids, steps, epochs, grads, loss)
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
                    data["epochs"][keep], {n: data[f"g/{n}"][keep] for n in self._layers if f"g/{n}" in data},
                    data["loss"][keep] if "loss" in data else None)
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
            loss = self._buf_loss[0][keep]
            grads = {n: self._buf_grads[n][0][keep] for n in self._layers}
            nonzero = {n: self._buf_nonzero[n][0][keep] for n in self._layers}
            self._clear_buffer()
            if ids.numel():
                self._buf_ids, self._buf_steps, self._buf_epochs = [ids], [steps], [epochs]
                self._buf_loss = [loss]
                self._buf_grads = {n: [t] for n, t in grads.items()}
                self._buf_nonzero = {n: [t] for n, t in nonzero.items()}
                self._buffered = int(ids.numel())
        return dropped_rows
