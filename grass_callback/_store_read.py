"""Internal to :mod:`grass_callback.store`: the reading half of :class:`~grass_callback.store.GradientStore`.

Committed shards are opened only through the manifests, checked (byte size, safetensors header)
and streamed in bounded chunks, fetched by id, or verified against their sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from grass_callback._store_format import (
    FetchResult,
    StoreChunk,
    _as_ids,
    _as_int,
    _BadShard,
    _few,
    _int_set,
    _read_dtype,
    _rechunk,
)
from grass_callback.errors import StoreError, StoreInputError


class StoreReading:
    """Reading methods of :class:`~grass_callback.store.GradientStore` (a mixin: it relies on the
    store's ``_path``, manifests and layers)."""

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
        if "loss" in keys and handle.get_slice("loss").get_shape() != [rows]:
            raise _BadShard(f"tensor 'loss' is not of shape [{rows}]")
        zero = entry.get("zero_layers", ())
        unknown = [n for n in zero if n not in self._layers]
        if unknown:
            raise _BadShard(f"its manifest entry lists zero layers {_few(unknown)} the store does not have")
        for layer, k in self._layers.items():
            key = f"g/{layer}"
            if layer in zero:  # all zero in this shard: not written
                continue
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
                zero = set(entry.get("zero_layers", ()))
                for a in range(0, rows, piece_rows):
                    b = min(a + piece_rows, rows)
                    sel = None if mask is None else mask[a:b]
                    if sel is not None and not bool(sel.any()):
                        continue
                    try:
                        grads = {n: torch.zeros(b - a, self._layers[n], dtype=self._dtype) if n in zero
                                 else f.get_slice(f"g/{n}")[a:b] for n in layers}
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

    def pairs(self, ranks: Iterable[int] | int | None = None,
              min_epoch: int | None = None) -> tuple[Tensor, Tensor]:
        """``(ids, epochs)`` (int64 ``[n]``) of the committed rows, read order; only these two
        tensors are read (no gradients). ``min_epoch`` keeps rows of that epoch and later."""
        ids_out, eps_out = [], []
        for _rank, entry in self._select(_int_set(ranks, "ranks"), None, None, None):
            if min_epoch is not None and max(int(e) for e in entry["epochs"] or [-1]) < min_epoch:
                continue
            with self._open_shard(entry) as f:
                if f is None:
                    continue
                try:
                    ids, eps = f.get_tensor("ids").clone(), f.get_tensor("epochs").clone()
                except Exception as e:
                    self._mark_bad(entry, str(e))
                    continue
                if min_epoch is not None:
                    keep = eps >= min_epoch
                    ids, eps = ids[keep], eps[keep]
                ids_out.append(ids)
                eps_out.append(eps)
        empty = torch.empty(0, dtype=torch.int64)
        return (torch.cat(ids_out) if ids_out else empty), (torch.cat(eps_out) if eps_out else empty)

    def losses(self, ranks: Iterable[int] | int | None = None, min_step: int | None = None,
               max_step: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, steps, loss)`` of the committed rows that carry a training loss (int64, int64,
        float32 ``[n]``; read order), rows of steps in ``[min_step, max_step]`` when given; only
        these tensors are read. Rows appended without a loss, and shards without one, are left out."""
        min_step = None if min_step is None else _as_int(min_step, "min_step")
        max_step = None if max_step is None else _as_int(max_step, "max_step")
        out: list[list[Tensor]] = [[], [], []]
        for _rank, entry in self._select(_int_set(ranks, "ranks"), None, min_step, max_step):
            with self._open_shard(entry) as f:
                if f is None or "loss" not in f.keys():
                    continue
                try:
                    got = [f.get_tensor(n).clone() for n in ("ids", "steps", "loss")]
                except Exception as e:
                    self._mark_bad(entry, str(e))
                    continue
            keep = ~torch.isnan(got[2])
            in_range = self._row_mask(got[1], got[1], None, min_step, max_step)
            if in_range is not None:
                keep &= in_range
            for part, t in zip(out, got):
                part.append(t[keep])
        empty = (torch.empty(0, dtype=torch.int64),) * 2 + (torch.empty(0, dtype=torch.float32),)
        return tuple(torch.cat(p) if p else e for p, e in zip(out, empty))  # type: ignore[return-value]

    def damaged_shards(self, ranks: Iterable[int] | int | None = None, checksum: bool = False,
                       checksum_from: int | None = None) -> list[tuple[int, dict, str]]:
        """``(rank, manifest entry, why)`` of every listed shard that is missing, of the wrong
        size, with a bad safetensors header or wrong tensor shapes (and, with ``checksum``, or for
        shards holding steps ``>= checksum_from``, a sha256 other than the manifest's). No warning
        is issued; nothing is changed."""
        out = []
        for rank, entry in self._select(_int_set(ranks, "ranks"), None, None, None):
            full = checksum or (checksum_from is not None and int(entry["max_step"]) >= checksum_from)
            why = self._shard_problem(entry, full)
            if why is not None:
                out.append((rank, dict(entry), why))
        return out

    def _shard_problem(self, entry: dict, checksum: bool) -> str | None:
        path = self._path / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "the file is missing"
        except OSError as e:
            return f"it cannot be read ({e})"
        if size != int(entry["bytes"]):
            return f"it has {size} bytes, the manifest says {entry['bytes']} (truncated?)"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                self._validate_shard(f, entry)
        except Exception as e:
            return f"its safetensors header is damaged ({e})"
        if checksum and entry.get("sha256"):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            if h.hexdigest() != entry["sha256"]:
                return "its sha256 differs from the manifest's (the bytes were changed)"
        return None

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
                zero = set(entry.get("zero_layers", ()))
                try:
                    while i < n:
                        a = int(rows[i])
                        b = min(a + window_rows, int(entry["rows"]))
                        j = int(torch.searchsorted(rows, b))
                        for name in layer_list:
                            if name in zero:  # all zero in this shard: not written
                                grads[name][at[i:j]] = 0
                                continue
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
