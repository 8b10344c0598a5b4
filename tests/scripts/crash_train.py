"""A tiny training run that can be killed with SIGKILL at a chosen point, for tests/test_crash.py.

One run trains a small MLP for ``EPOCHS`` epochs on ``N_TRAIN`` examples (batch ``BATCH``, no
shuffling) with :class:`~grass_callback.GraSSCallback` (float32 store, small shards) and
``ModelCheckpoint(every_n_train_steps=CKPT_EVERY, save_last=True)``, then writes the callback's
final data value to ``<workdir>/result.pt``. With ``--resume`` it continues from
``<workdir>/ckpt/last.ckpt`` when that file exists (from scratch otherwise).

``GRASS_CRASH_AT="<point>:<n>"`` kills the process with SIGKILL on the n-th call (1-based) of the
function behind ``<point>`` (see ``POINTS``), before or after the call runs, so a crash lands in
the middle of capture, a shard write, a manifest update, the Fisher fit, scoring, a report or a
checkpoint save. Nothing is cleaned up: the next run finds the files as the kill left them.

Two ways to run it::

    GRASS_CRASH_AT=shard_tmp:2 python tests/scripts/crash_train.py run WORKDIR [--resume]
    python tests/scripts/crash_train.py serve       # a fork server, see serve()

Importing Lightning takes several seconds, much longer than one of these runs, so the test uses
``serve``: this process imports everything (and loads the C++ kernel) once, then forks one child
per run (JSON jobs on stdin, one JSON reply per job on stdout).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset

N_TRAIN, N_QUERY, BATCH, EPOCHS, CKPT_EVERY, ROWS_PER_SHARD, K = 48, 6, 8, 3, 3, 20, 8

# point -> (module, attribute path, "before" | "after"): where GRASS_CRASH_AT can kill the run.
POINTS: dict[str, tuple[str, str, str]] = {
    # capture: inside the backward hook that compresses one layer's gradients
    "capture": ("grass_callback.capture", "LayerTaps._add", "before"),
    # rows of a batch buffered (or a shard committed) but the optimizer step not done
    "append": ("grass_callback.store", "GradientStore.append", "after"),
    # the optimizer stepped (rows of this step appended), the batch end and its checkpoint not run
    "optimizer_step": ("torch.optim", "SGD.step", "after"),
    # shard write: temp file complete and fsync'ed, not renamed (also the plans file at creation)
    "shard_tmp": ("grass_callback.store", "_write_safetensors", "after"),
    # shard renamed onto its final name, the manifest not updated yet (an orphan shard)
    "shard_renamed": ("grass_callback.store", "GradientStore._write_shard", "after"),
    # a manifest (or meta.json) temp file written, not renamed
    "manifest_tmp": ("grass_callback._store_format", "_write_bytes", "after"),
    # a manifest renamed into place (shard committed), the caller not told yet
    "manifest_done": ("grass_callback.store", "GradientStore._write_manifest", "after"),
    # a flush (at a checkpoint, at scoring, at the end) about to start
    "flush": ("grass_callback.store", "GradientStore.flush", "before"),
    # resume: dropping the rows newer than the checkpoint
    "truncate": ("grass_callback.store", "GradientStore.truncate_after", "before"),
    # scoring period: the Fisher fit, the query pass, the streamed scores, the report files
    "fisher_fit": ("grass_callback.fisher", "FisherStats.fit", "before"),
    "query": ("grass_callback.capture", "LayerTaps.gradients", "before"),
    "score_chunk": ("grass_callback.scoring", "_chunk_scores", "after"),
    "report_file": ("grass_callback.report", "_atomic_write", "after"),
    # the period scored and the data value updated in memory, the epoch-end last.ckpt not saved
    "epoch_end": ("grass_callback.callback", "GraSSCallback.on_train_epoch_end", "after"),
    # checkpoint save: the store flushed for it, nothing written yet
    "ckpt_hook": ("grass_callback.callback", "GraSSCallback.on_save_checkpoint", "after"),
    # checkpoint serialised in memory, no file written
    "ckpt_dump": ("torch", "save", "after"),
    # checkpoint bytes in fsspec's temp file, not moved onto the .ckpt name
    "ckpt_tmp": ("fsspec.implementations.local", "LocalFileOpener.commit", "before"),
    # the .ckpt file in place; last.ckpt / removal of the previous one not done yet
    "ckpt_written": ("fsspec.implementations.local", "LocalFileOpener.commit", "after"),
    # a new top-k checkpoint saved, the previous one not removed yet
    "ckpt_remove": ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint._remove_checkpoint", "before"),
}


def install_crash_point(spec: str | None) -> None:
    """Patch the function named by ``spec`` ("point:n") to SIGKILL this process on its n-th call."""
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point not in POINTS:
        raise SystemExit(f"unknown crash point {point!r}; known: {sorted(POINTS)}")
    target_n = int(n or 1)
    module_name, path, when = POINTS[point]
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    original = getattr(owner, attr)
    calls = [0]

    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        hit = calls[0] == target_n
        if hit and when == "before":
            die()
        out = original(*args, **kwargs)
        if hit:
            die()
        return out

    setattr(owner, attr, wrapper)


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y, _ = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")  # the callback's training_loss
        return {"loss": losses.mean(), "per_example_loss": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ResumableLoader(DataLoader):
    """A non-shuffled loader Lightning can resume mid-epoch (it has ``state_dict``/``load_state_dict``).

    Without one, Lightning restarts a mid-epoch checkpoint's epoch from its first batch (it warns
    "your dataloader is not resumable"), so examples would be seen twice in that epoch whatever
    the callback does. ``consumed`` is set by :class:`TrackConsumed` at each batch end (the
    fetcher pre-fetches a batch, so the loader cannot count this itself).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["consumed"]) % len(self)
        self.consumed = self._skip


class TrackConsumed(Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer.train_dataloader.consumed = batch_idx + 1


LOADERS = ("ordered", "stateful", "shuffled")


def data(loader: str = "ordered") -> tuple[DataLoader, DataLoader]:
    """``ordered``: the resumable, unshuffled loader above; ``stateful``: torchdata's
    ``StatefulDataLoader`` (Lightning restores it mid-epoch); ``shuffled``: a plain shuffled
    ``DataLoader``, which Lightning restarts from the epoch's first batch after a mid-epoch resume."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_QUERY, 6, generator=g)
    y = torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=g)
    train_set = IndexedDataset(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]))
    if loader == "ordered":
        train = ResumableLoader(train_set, batch_size=BATCH)
    elif loader == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        # unshuffled: a shuffled one resumes the epoch exactly but draws later epochs' orders from a
        # generator state the uninterrupted run did not have (each row still stored once)
        train = StatefulDataLoader(train_set, batch_size=BATCH, shuffle=False)
    elif loader == "shuffled":
        train = DataLoader(train_set, batch_size=BATCH, shuffle=True)
    else:
        raise SystemExit(f"unknown loader {loader!r}; known: {LOADERS}")
    query = DataLoader(IndexedDataset(TensorDataset(x[N_TRAIN:], y[N_TRAIN:])), batch_size=N_QUERY)
    return train, query


def run(workdir: str | Path, resume: bool = False, loader: str = "ordered", ckpt_every: int = CKPT_EVERY,
        k: int = K) -> dict[str, Any]:
    """One training run in ``workdir``; returns (and saves to result.pt) the final data value.

    ``ckpt_every``: ``last.ckpt`` every that many steps. With torchdata's ``StatefulDataLoader`` a
    checkpoint at an epoch's last batch resumes into an empty next epoch (Lightning restores the
    exhausted loader state into the next epoch's iterator); the callback reports those rows as
    missing, and the kill test checkpoints that loader off the epoch ends (every 5 steps)."""
    workdir = Path(workdir)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    train, query = data(loader)
    callback = GraSSCallback(k=k, num_queries=N_QUERY, topk=3, store_dir=workdir / "grass", storage_dtype="float32",
                             query_loader=query, rows_per_shard=ROWS_PER_SHARD, log_to_wandb=False, progress=False,
                             damping_ratio=0.1)  # fixed: the runs compare bit for bit, whatever "auto" does
    ckpt = ModelCheckpoint(dirpath=workdir / "ckpt", every_n_train_steps=ckpt_every, save_last=True)
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
                        callbacks=[callback, *([TrackConsumed()] if loader == "ordered" else []), ckpt],
                        default_root_dir=str(workdir),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    last = workdir / "ckpt" / "last.ckpt"
    ckpt_path = str(last) if resume and last.exists() else None
    trainer.fit(TinyModule(), train, ckpt_path=ckpt_path)
    ids, values = callback.data_value_tensors()
    result = {"ids": ids, "values": values, "training_loss": callback.training_loss, "suspect": callback.suspect,
              "batches_seen": callback.batches_seen,
              "periods_scored": callback.periods_scored, "resumed_from": ckpt_path,
              "replayed_rows": callback.replayed_rows, "missed_rows": callback.missed_rows}
    torch.save(result, workdir / "result.pt.tmp")
    os.replace(workdir / "result.pt.tmp", workdir / "result.pt")
    return result


def _child(job: dict[str, Any]) -> int:
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    log = os.open(workdir / f"log-{job.get('tag', 'run')}.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        install_crash_point(job.get("crash"))
        run(workdir, resume=bool(job.get("resume")), loader=job.get("loader", "ordered"),
            ckpt_every=int(job.get("ckpt_every", CKPT_EVERY)), k=int(job.get("k", K)))
        return 0
    except BaseException:  # noqa: BLE001 - reported through the exit code and the log
        traceback.print_exc()
        return 1


def serve() -> None:
    """Fork server: for each JSON job line on stdin, fork a child that runs it, reply when it ends.

    Job: ``{"workdir": str, "crash": "point:n" | null, "resume": bool, "tag": str, "loader": str,
    "announce": bool, "ckpt_every": int}``. Reply: ``{"exitcode": int | null, "signal": int | null}``; with
    ``announce`` a line ``{"pid": int}`` comes first, as soon as the child is forked (so a test can
    kill it from outside at a time of its choosing). The child's output goes to
    ``<workdir>/log-<tag>.txt``. This process only imports; the children do all the work (with
    one thread each), so forking it is safe.
    """
    out = sys.stdout
    # load (or build) the C++ kernel here, once: a child killed in the middle of a build would leave
    # torch's build lock behind, and every later build of the same sources would wait on it forever
    from grass_callback.ops import kernel_available

    kernel_available()
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(job)
            finally:
                os._exit(code)
        if job.get("announce"):
            print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        reply = {"exitcode": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                 "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        print(json.dumps(reply), file=out, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("run", help="one run (GRASS_CRASH_AT=point:n kills it)")
    one.add_argument("workdir")
    one.add_argument("--resume", action="store_true", help="continue from <workdir>/ckpt/last.ckpt if it exists")
    one.add_argument("--loader", choices=LOADERS, default="ordered", help="the train loader (see data())")
    one.add_argument("--ckpt-every", type=int, default=CKPT_EVERY, help="last.ckpt every this many steps")
    sub.add_parser("serve", help="fork server: JSON jobs on stdin")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve()
    else:
        install_crash_point(os.environ.get("GRASS_CRASH_AT"))
        print(json.dumps({k: v for k, v in run(args.workdir, args.resume, args.loader, args.ckpt_every).items() if not isinstance(v, torch.Tensor)}))


if __name__ == "__main__":
    main()
