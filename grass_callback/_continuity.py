"""The callback's continuity across kills and resumes: lock, resume, exactly-once rows, what the
checkpoint records. Functions over a :class:`~grass_callback.GraSSCallback` (``cb``), kept out of
``callback.py`` so its hooks stay thin; the bookkeeping classes are in :mod:`grass_callback._resume`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from grass_callback._lock import StoreLock, StoreLockError, new_run_id
from grass_callback._resume import (
    RESUMABLE_HINT,
    PairLedger,
    describe_index_field,
    is_resumable,
    lost_rows_message,
    read_lost,
    shard_problems,
    write_lost,
)
from grass_callback.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from pathlib import Path

    import lightning.pytorch as pl


def init_state(cb: Any) -> None:
    """The continuity fields of a new callback."""
    cb.run_id = None
    cb._lock = None
    cb._ledger = PairLedger()
    cb._keep = None
    cb._train_shapes = None
    cb._num_train = None
    cb._query_digest = None  # of the query batches last scored (saved in checkpoints)
    cb._query_digest_saved = None  # the checkpoint's, compared at the first period after a resume
    cb._query_digest_now = None
    cb._plans_digest_saved = None
    cb._num_train_saved = None
    cb.replayed_rows = 0  # rows skipped because the store already held their (id, epoch)
    cb.missed_rows = 0  # rows of earlier epochs that a replay never reached
    cb.resumes = 0


# ---------------------------------------------------------------------- lock


def acquire_lock(cb: Any, trainer: "pl.Trainer", root: "Path") -> None:
    """Rank 0 takes the store directory's lock; its run id (or its failure) is broadcast."""
    payload, error = None, None
    if trainer.is_global_zero:
        lock = StoreLock(root, new_run_id())
        try:
            lock.acquire()
            cb._lock, payload = lock, ("ok", lock.run_id)
        except StoreError as e:
            error, payload = e, ("error", str(e))
    if trainer.world_size > 1:
        payload = trainer.strategy.broadcast(payload, src=0)
    if error is not None:
        raise error
    if payload[0] != "ok":
        raise StoreLockError(payload[1])
    cb.run_id = payload[1]


def release_lock(cb: Any) -> None:
    if getattr(cb, "_lock", None) is not None:
        cb._lock.release()
        cb._lock = None


# ---------------------------------------------------------------------- checkpoint state


def state_extras(cb: Any) -> dict[str, Any]:
    """What the checkpoint records besides progress and the data value (plain values only)."""
    plans = cb.store.meta.get("plans_digest") if cb.store is not None else cb._plans_digest_saved
    return {"num_train": cb._num_train if cb._num_train is not None else cb._num_train_saved,
            "query_digest": cb._query_digest if cb._query_digest is not None else cb._query_digest_saved,
            "plans_digest": plans, "replayed_rows": cb.replayed_rows, "missed_rows": cb.missed_rows,
            "resumes": cb.resumes}


def load_plain_state(cb: Any, state: Mapping[str, Any]) -> None:
    """Progress, data value and ensemble from a checkpoint, at once: a fit on a finished run never
    reaches ``on_train_start``, and its ``data_value_tensors()`` must still hold the result."""
    cb.batches_seen = int(state.get("batches_seen", 0))
    cb.period_start = int(state.get("period_start", 0))
    cb.periods_scored = int(state.get("periods_scored", 0))
    cb.last_batch_epoch = int(state.get("last_batch_epoch", -1))
    cb.scored_epoch = int(state.get("scored_epoch", -1))
    ids, values = state.get("data_value_ids"), state.get("data_value")
    cb.data_value = {} if ids is None else dict(zip(ids.tolist(), values.double().tolist()))
    cb._pending_ensemble, cb._ensemble = state.get("ensemble"), None
    cb._num_train_saved = state.get("num_train")
    cb._query_digest_saved = state.get("query_digest")
    cb._plans_digest_saved = state.get("plans_digest")
    cb.replayed_rows = int(state.get("replayed_rows", 0))
    cb.missed_rows = int(state.get("missed_rows", 0))
    cb.resumes = int(state.get("resumes", 0))


# ---------------------------------------------------------------------- resume / fresh start


def _agree(trainer: "pl.Trainer", problem: str | None) -> None:
    """Raise ``problem`` on this rank; every rank raises when any rank has one (no rank hangs)."""
    ok = problem is None
    if trainer.world_size > 1:
        ok = bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
    if problem is not None:
        raise StoreError(problem)
    if not ok:
        raise StoreError("grass_callback: another rank found lost rows in its store on resume; see its error.")


def resume(cb: Any, trainer: "pl.Trainer") -> None:
    """Continue the store from the checkpoint's state (already loaded by ``load_plain_state``).

    Damaged or missing shards of this rank: those newer than the checkpoint are dropped with the
    other newer rows and captured again; older ones stop the fit with how to repair. Then rows
    newer than the checkpoint are dropped, the period's Fisher and the (id, epoch) ledger are
    rebuilt from the store, and a changed training set or plan is dealt with.
    """
    store, at = cb.store, cb.batches_seen
    read_again = cb.period_start if cb.keep_history == "period" else 0  # rows the resumed run reads
    recoverable, lost = shard_problems(store, at, checksum_from=read_again)
    _agree(trainer, lost_rows_message(store, lost, at) if lost else None)
    if recoverable:
        warnings.warn(f"grass_callback: rank {store.rank}'s store {store.path} has {len(recoverable)} damaged "
                      f"shard(s) newer than the checkpoint ({', '.join(e['file'] for e, _ in recoverable[:4])}: "
                      f"{recoverable[0][1]}); they are dropped and their rows captured again.", stacklevel=3)
    if cb._plans_digest_saved and cb._plans_digest_saved != store.meta.get("plans_digest"):
        raise ConfigError(f"grass_callback: the checkpoint's rows were compressed with other plans than the "
                          f"store {store.path} holds now (was the store replaced?); resume with the store the "
                          "checkpoint was written with, or start a new store_dir without ckpt_path.")
    dropped = cb._drop_rows_after(at)
    if read_lost(store.path, store.rank):
        write_lost(store.path, store.rank, [])  # every lost row was newer: the replay captures it
    cb.fisher.reset()
    min_step = cb.period_start if cb.keep_history == "period" else None
    for chunk in store.iter_chunks(min_step=min_step, ranks=[store.rank]):
        cb.fisher.update(chunk.grads)
    cb._ledger.load(*store.pairs(ranks=[store.rank], min_epoch=max(cb.last_batch_epoch, 0)))
    cb.resumes += 1
    _check_training_set(cb, trainer)
    rank_zero_info(f"grass_callback: resumed at batch {at}; dropped {dropped} rows newer than the checkpoint, "
                   f"rebuilt the Fisher from {cb.fisher.count} stored rows.")


def _check_training_set(cb: Any, trainer: "pl.Trainer") -> None:
    n, saved = cb._num_train, cb._num_train_saved
    if n is not None and saved is not None and int(saved) != n:
        rank_zero_warn(f"grass_callback: the training set has {n} examples, the checkpoint's had {saved}: ids "
                       "may name other examples now, so the data value and the checkpoint ensemble restart "
                       "from here (the stored rows are kept). Resume with the same training set to continue "
                       "them, or start a new store_dir.")
        cb.data_value, cb._ensemble, cb._pending_ensemble = {}, None, None


def start_fresh(cb: Any) -> None:
    """A fit without a checkpoint: nothing is stored before it, nothing is lost."""
    write_lost(cb.store.path, cb.store.rank, [])
    cb._ledger = PairLedger()


def start_message(cb: Any, trainer: "pl.Trainer") -> None:
    """Say at the start what a kill would cost, and warn about a schedule longer than the run."""
    if not is_resumable(trainer.train_dataloader):
        rank_zero_info("grass_callback: the train loader is not resumable mid-epoch: after a resume from a "
                       "mid-epoch checkpoint Lightning restarts the epoch from its first batch; examples "
                       "already stored are skipped (counted) and the rest of that epoch is missed (reported). "
                       f"To avoid it, {RESUMABLE_HINT}.")
    every = cb.score_every_n_steps
    total = _run_batches(trainer)
    if every and total is not None and every > total:
        rank_zero_warn(f"grass_callback: score_every_n_steps={every} is longer than the run ({total} training "
                       "batches), so no scoring period ends during training; the rows are scored once, at the "
                       f"end of training. Use score_every_n_steps <= {total} to score during training.")


def _run_batches(trainer: "pl.Trainer") -> int | None:
    import math

    per_epoch = trainer.num_training_batches
    if not isinstance(per_epoch, int) or math.isinf(per_epoch) or trainer.max_epochs in (None, -1):
        return None
    total = per_epoch * int(trainer.max_epochs)
    if trainer.max_steps and trainer.max_steps > 0:
        total = min(total, trainer.max_steps * trainer.accumulate_grad_batches)
    return total


# ---------------------------------------------------------------------- each batch


def note_batch(cb: Any, batch: Any) -> None:
    """Remember the first training batch's field shapes (compared on resume)."""
    from grass_callback._resume import shapes

    if cb._train_shapes is None:
        cb._train_shapes = shapes(batch)


def admit(cb: Any, trainer: "pl.Trainer", ids: Tensor) -> Tensor | None:
    """The rows of this batch to store (bool mask [B], ``None``: all); replays are skipped."""
    epoch = trainer.current_epoch
    keep = cb._ledger.admit(ids, epoch)
    if keep is not None:
        cb.replayed_rows += int((~keep).sum())
    flagged = cb._ledger.not_an_index(epoch)
    if flagged is not None:
        warnings.warn(f"grass_callback: {describe_index_field(cb._index_key)} took only {flagged[0]} distinct "
                      f"values over {flagged[1]} training rows of epoch {epoch}: it does not look like a dataset "
                      "index (labels?). Each example needs its own index: wrap the dataset with "
                      "grass_callback.IndexedDataset, or pass index_key= naming the field that holds it.",
                      stacklevel=3)
    return keep


def end_of_epoch(cb: Any, trainer: "pl.Trainer") -> None:
    """After a replayed epoch: report the rows skipped, and those the replay never reached."""
    epoch = trainer.current_epoch
    replayed = cb._ledger.replayed.pop(epoch, 0)
    if not replayed:
        return
    expected = _epoch_rows(cb, trainer)
    missed = max(0, expected - cb._ledger.stored_rows(epoch)) if expected is not None else replayed
    cb.missed_rows += missed
    warnings.warn(f"grass_callback: epoch {epoch} was resumed mid-epoch and the train loader replayed it from "
                  f"its first batch: {replayed} rows already stored were skipped (no duplicates), and "
                  f"{missed} examples of the epoch were never reached, so their rows are missing from epoch "
                  f"{epoch}. To avoid it, {RESUMABLE_HINT}.", stacklevel=3)


def _epoch_rows(cb: Any, trainer: "pl.Trainer") -> int | None:
    """Rows an uninterrupted epoch stores on this rank, when the loader tells (else ``None``)."""
    loader = trainer.train_dataloader
    sampler, size = getattr(loader, "sampler", None), getattr(loader, "batch_size", None)
    if cb.capture_every_n_steps != 1 or sampler is None or not size:
        return None
    try:
        return min(len(sampler), int(trainer.num_training_batches) * int(size))
    except (TypeError, ValueError, OverflowError):
        return None


def final_count(cb: Any, trainer: "pl.Trainer") -> None:
    """At the end of a resumed fit: count, from the store itself, the rows of each finished epoch
    that no session stored (a replay that never reached them), whatever kills came in between."""
    import torch

    expected = _epoch_rows(cb, trainer)
    if not cb.resumes or expected is None:
        return
    (cb.recorder if getattr(cb, "recorder", None) is not None else cb.store).flush()
    _ids, epochs = cb.store.pairs(ranks=[cb.store.rank])
    done = int(trainer.current_epoch)  # epochs completed (a stop inside an epoch leaves it out)
    counts = torch.bincount(epochs[epochs >= 0], minlength=max(done, 1))[:done]
    missed = int((expected - counts).clamp(min=0).sum()) - int(cb.store.skipped_nonfinite)
    cb.missed_rows = max(0, missed)
    if cb.missed_rows:
        rank_zero_warn(f"grass_callback: {cb.missed_rows} rows of finished epochs are missing from the store: "
                       "after a mid-epoch resume the train loader replayed the epoch from its first batch and "
                       f"never reached them (the replayed rows were skipped, no duplicates). To avoid it, "
                       f"{RESUMABLE_HINT}.")
