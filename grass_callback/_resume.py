"""Resume bookkeeping for the callback: exactly-once rows, the store's health, what the state records.

* :class:`PairLedger`: which (id, epoch) pairs this rank's store holds, rebuilt from the store on
  resume. After a mid-epoch resume a loader that is not resumable replays the epoch's first
  batches; a replayed row is skipped and counted. The rule is per (id, epoch) *occurrence*: the
  n-th time id ``i`` comes in epoch ``e`` after the resume is a replay when the store already
  held at least ``n`` rows of ``(i, e)`` before it. Without replacement that is "skip what is
  stored"; with a sampler that draws with replacement, a repeat inside one session (no resume in
  between) is kept as its own row: training saw the example twice, so the Fisher counts it twice
  and the data value sums both rows' scores (``ScoreResult.data_value`` sums rows per id). After
  a mid-epoch resume such a sampler's repeats of examples drawn before the kill can be taken for
  replays; they are skipped and counted too.
* An index field that is not an index (far fewer distinct values over an epoch than rows, e.g.
  labels read as ids) is flagged once per fit.
* :func:`shard_problems`: damaged or missing shards of this rank found on resume, split into
  those the resume drops anyway (newer than the checkpoint, captured again) and those it cannot
  recover.
* :class:`Fingerprint`: a sha256 over the query batches' tensors, so a resume with another query
  set is noticed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grass_callback.errors import GraSSError, ScoringError, StoreError

LOST_FILE = "lost-r{rank:03d}.json"  # written by `store repair`: rows unlisted from the manifest

RESUMABLE_HINT = ("use a resumable loader, e.g. torchdata.stateful_dataloader.StatefulDataLoader "
                  "(Lightning restores it mid-epoch), or checkpoint only at epoch ends")


class PairLedger:
    """Counts of stored rows per (id, epoch): those stored before the resume, those of this session.

    ``before`` holds, per epoch at or after the resumed one, the sorted unique ids and their
    counts (from the store); ``session`` holds dense per-epoch occurrence counts of this session
    (grown as ids come). All on the CPU, from the batch's index tensor: no device sync.
    """

    def __init__(self) -> None:
        self.before: dict[int, tuple[Tensor, Tensor]] = {}
        self.session: dict[int, Tensor] = {}
        self.replayed: dict[int, int] = {}  # epoch -> rows skipped as replays
        self.rows: dict[int, int] = {}  # epoch -> rows admitted this session
        self.flagged = False

    def load(self, ids: Tensor, epochs: Tensor) -> None:
        """The stored rows' ``ids`` and ``epochs`` (int64 [n]) this session continues from."""
        self.before, self.session, self.replayed, self.rows = {}, {}, {}, {}
        for e in torch.unique(epochs).tolist():
            uniq, counts = torch.unique(ids[epochs == e], return_counts=True)
            self.before[int(e)] = (uniq, counts)

    def may_replay(self, epoch: int) -> bool:
        """Whether rows of ``epoch`` were stored before this session (a replayed epoch)."""
        return epoch in self.before

    def stored_rows(self, epoch: int) -> int:
        """Rows of ``epoch`` stored before this session plus those admitted in it."""
        before = self.before.get(epoch)
        return (int(before[1].sum()) if before is not None else 0) + self.rows.get(epoch, 0)

    def admit(self, ids: Tensor, epoch: int) -> Tensor | None:
        """Count one batch's ids (int64 [B], CPU); the rows to keep as a bool mask [B], or ``None``
        when every row is kept."""
        if ids.numel() == 0:
            return None
        counts = self._session_counts(epoch, int(ids.max()) + 1)
        # occurrence number of each row in this session (a repeat inside the batch counts too)
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        group_start = torch.cummax(torch.where(first, torch.arange(ids.numel()), 0), 0).values
        within = torch.empty_like(ids)
        within[order] = torch.arange(ids.numel()) - group_start
        occurrence = counts[ids] + within + 1
        counts.index_add_(0, ids, torch.ones_like(ids))
        keep = None
        before = self.before.get(epoch)
        if before is not None:
            uniq, stored = before
            held = torch.zeros_like(ids)
            if uniq.numel():
                pos = torch.searchsorted(uniq, ids).clamp(max=uniq.numel() - 1)
                held = torch.where(uniq[pos] == ids, stored[pos], held)
            replay = occurrence <= held
            if bool(replay.any()):
                keep = ~replay
                self.replayed[epoch] = self.replayed.get(epoch, 0) + int(replay.sum())
        self.rows[epoch] = self.rows.get(epoch, 0) + (ids.numel() if keep is None else int(keep.sum()))
        return keep

    def _session_counts(self, epoch: int, size: int) -> Tensor:
        counts = self.session.get(epoch)
        if counts is None or counts.numel() < size:
            grown = torch.zeros(max(size, 2 * (counts.numel() if counts is not None else 0)), dtype=torch.int64)
            if counts is not None:
                grown[:counts.numel()] = counts
            counts = self.session[epoch] = grown
        for old in [e for e in self.session if e < epoch - 1]:
            del self.session[old]  # epochs only go forward
        return counts

    def not_an_index(self, epoch: int, min_rows: int = 64, ratio: int = 4) -> tuple[int, int] | None:
        """``(distinct, rows)`` of ``epoch`` in this session the first time fewer than one value in
        ``ratio`` rows is distinct (after ``min_rows`` rows): the field is probably not an index. A
        uniform sampler with replacement keeps about 63% distinct over an epoch."""
        counts = self.session.get(epoch)
        if self.flagged or counts is None:
            return None
        rows = int(counts.sum())
        distinct = int((counts > 0).sum())
        if rows >= min_rows and distinct * ratio <= rows:
            self.flagged = True
            return distinct, rows
        return None


def describe_index_field(index_key: Any) -> str:
    """How the batch's index field is named in a message."""
    from grass_callback.data import _IndexedKey

    if isinstance(index_key, _IndexedKey):
        return "the IndexedDataset's index (the last element of a tuple batch, or the 'index' key)"
    if index_key is None:
        return "the batch's 'index' key"
    return f"index_key={index_key!r}"


def is_resumable(loader: Any) -> bool:
    """Whether Lightning can restore ``loader`` mid-epoch (it has ``state_dict``/``load_state_dict``)."""
    loaders = loader if isinstance(loader, (list, tuple)) else list(loader.values()) \
        if isinstance(loader, Mapping) else [loader]
    return bool(loaders) and all(callable(getattr(x, "state_dict", None))
                                 and callable(getattr(x, "load_state_dict", None)) for x in loaders)


def shard_problems(store: Any, resume_batch: int,
                   checksum_from: int | None = None) -> tuple[list[tuple[dict, str]], list[tuple[dict, str]]]:
    """This rank's damaged or missing listed shards, and the rows ``store repair`` unlisted:
    ``(recoverable, lost)``. Recoverable ones hold only rows of batches ``>= resume_batch``, which
    the resume drops and captures again; lost ones hold older rows, which it cannot. Every shard's
    size and header are checked; the sha256 of those holding rows of batches ``>= checksum_from``
    (the ones the resumed run reads again: its Fisher and scores) too."""
    recoverable, lost = [], []
    for _rank, entry, why in store.damaged_shards(ranks=[store.rank], checksum_from=checksum_from):
        (recoverable if int(entry["min_step"]) >= resume_batch else lost).append((entry, why))
    for entry in read_lost(store.path, store.rank):
        if int(entry["min_step"]) < resume_batch:
            lost.append((entry, "unlisted by `store repair`; its rows are not in the store"))
    return recoverable, lost


def lost_rows_message(store: Any, lost: list[tuple[dict, str]], resume_batch: int) -> str:
    first = min(int(e["min_step"]) for e, _ in lost)
    parts = "; ".join(f"{e['file']} ({e['rows']} rows of batches {e['min_step']}-{e['max_step']}, epochs "
                      f"{e['epochs']}): {why}" for e, why in lost[:4])
    return (f"grass_callback: resuming at batch {resume_batch}, but rank {store.rank}'s store {store.path} "
            f"has lost rows of earlier batches: {parts}{' ...' if len(lost) > 4 else ''}. Resuming would "
            "leave them out of the Fisher and the scores, silently. To repair: run `python -m "
            f"grass_callback store repair {store.path}` (unlists damaged shards), then resume from a "
            f"checkpoint taken at or before batch {first} (its replay captures them again), or start "
            "a new store_dir.")


def read_lost(path: Path, rank: int) -> list[dict]:
    file = Path(path) / LOST_FILE.format(rank=rank)
    try:
        entries = json.loads(file.read_bytes().decode("utf-8")).get("shards", [])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError) as e:
        raise StoreError(f"{file} (rows unlisted by `store repair`) is unreadable ({e}); delete it only "
                         "if a resume from a checkpoint before those rows follows.") from e
    return [e for e in entries if isinstance(e, dict)]


def write_lost(path: Path, rank: int, entries: list[dict]) -> None:
    from grass_callback._store_format import _write_json_atomic

    file = Path(path) / LOST_FILE.format(rank=rank)
    if entries:
        _write_json_atomic(file, {"rank": rank, "shards": entries})
    elif file.exists():
        file.unlink()


class Fingerprint:
    """An iterable wrapper that hashes every tensor of every batch it yields (sha256)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.dataset = getattr(loader, "dataset", None)
        self._h = hashlib.sha256()

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self._update(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _update(self, obj: Any) -> None:
        if isinstance(obj, Tensor):
            t = obj.detach().cpu().contiguous()
            self._h.update(f"{t.dtype}{list(t.shape)}".encode())
            if t.numel():
                self._h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, Mapping):
            for key in sorted(obj, key=str):
                self._h.update(str(key).encode())
                self._update(obj[key])
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                self._update(value)
        elif isinstance(obj, (int, float, str, bool)):
            self._h.update(repr(obj).encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def shapes(batch: Any) -> dict[str, list]:
    """Field -> shape without the batch dimension, of a (nested) batch's tensors."""
    out: dict[str, list] = {}

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, Tensor):
            out[name or "batch"] = list(obj.shape[1:])
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]" if name else f"[{i}]")

    walk(batch, "")
    return out


def checked_loss_fn(loss_fn: Any, train_shapes: dict[str, list] | None) -> Any:
    """``loss_fn`` whose failures on query batches name the batch and what differs from training."""
    state = {"batch": 0}

    def wrapped(module: Any, batch: Any) -> Tensor:
        state["batch"] += 1
        try:
            loss = loss_fn(module, batch)
        except GraSSError:
            raise
        except Exception as e:
            got = shapes(batch)
            diff = ""
            if train_shapes:
                differs = [f"{k}: training [*, {', '.join(map(str, v))}], query {[None, *got[k]][1:]}"
                           for k, v in train_shapes.items() if k in got and got[k] != v]
                if differs:
                    diff = " Feature sizes differ from the training batches: " + "; ".join(differs[:4]) + "."
            raise ScoringError(f"the query loss failed on query batch {state['batch']} ({type(e).__name__}: "
                               f"{str(e)[:200]}).{diff} Query batches must look like training batches (same "
                               "fields and feature sizes), or pass query_loss_fn=fn(pl_module, batch) that "
                               "handles them.") from e
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            what = type(loss).__name__ if not isinstance(loss, Tensor) else f"a tensor of shape {list(loss.shape)}"
            raise ScoringError(f"the query loss returned {what} on query batch {state['batch']}; it must return "
                               "a scalar loss tensor still attached to the graph (return the loss itself, "
                               "not loss.item() or a float).")
        return loss

    return wrapped


def check_query_gradients(ids: Tensor, grads: Mapping[str, Tensor]) -> None:
    """A :class:`ScoringError` naming the queries whose compressed gradients hold NaN/Inf."""
    bad = torch.zeros(ids.numel(), dtype=torch.bool)
    layers: list[str] = []
    for name, g in grads.items():
        rows = ~torch.isfinite(g).all(dim=1).cpu()
        if bool(rows.any()):
            layers.append(name)
            bad |= rows
    if bool(bad.any()):
        raise ScoringError(f"query ids {ids[bad].tolist()[:8]} have NaN/Inf gradients (layers "
                           f"{layers[:4]}): their loss is not finite. Fix or remove those query examples "
                           "(query_loader=...), or make the query loss finite for them.")
