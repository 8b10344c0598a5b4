"""A tiny fit with GraSSCallback on one process or under Lightning DDP (gloo, CPU), for tests/test_ddp.py.

    python tests/scripts/ddp_train.py OUT --devices 1     # batch 8 per step
    python tests/scripts/ddp_train.py OUT --devices 2     # strategy="ddp": batch 4 per rank and step

The learning rate is 0, so the weights stay at their (seeded) initial values and every
per-example gradient, Fisher block and score is the same whatever the batching: under DDP
Lightning's DistributedSampler gives each rank a seeded random half of the examples each epoch,
the single process sees them in order, and the callback's rows (matched by example and epoch),
Fisher blocks, query gradients and scores must still agree up to float rounding. The
per-example scale must use each rank's own batch size for that to hold.

Under DDP, Lightning starts rank 1 by running this same command again. Rank 1 gets its own
``default_root_dir`` (``OUT/rank1-root``) to check that the callback agrees on rank 0's store
directory. Each rank writes ``OUT/rank<r>.pt``: the Fisher statistics each scoring period fitted,
what it reported (only rank 0 should), the torch.distributed collectives it called (name and
tensor shapes), the final data value and the store directory.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset
from grass_callback.capture import LayerTaps
from grass_callback.fisher import FisherStats
from grass_callback.report import InfluenceReporter

N_TRAIN, N_VAL, GLOBAL_BATCH, EPOCHS, K = 48, 12, 8, 2, 16

RECORD: dict[str, list] = {"fits": [], "reports": [], "collectives": [], "query_batches": []}


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        loss = losses.mean()
        self.log("loss", loss)
        return {"loss": loss, "per_example_loss": losses}  # the callback's training_loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights fixed: see the module docstring


def _shapes(obj: Any) -> list:
    """Shapes of the tensors in ``obj`` (a tensor, a list of them, or a dataclass like ScoreResult)."""
    if isinstance(obj, torch.Tensor):
        return [list(obj.shape)]
    if isinstance(obj, (list, tuple)):
        return [s for o in obj for s in _shapes(o)]
    if isinstance(obj, dict):
        return [s for o in obj.values() for s in _shapes(o)]
    if hasattr(obj, "__dataclass_fields__"):
        return [s for name in obj.__dataclass_fields__ for s in _shapes(getattr(obj, name))]
    return []


def install_spies() -> None:
    """Record collectives, fitted Fisher statistics, query passes and reports (test instrumentation only)."""
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "gather",
                 "gather_object", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter"):
        original = getattr(dist, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            RECORD["collectives"].append((_name, _shapes(args[:2])))
            return _original(*args, **kwargs)

        setattr(dist, name, functools.wraps(original)(spy))

    fit = FisherStats.fit

    def fit_spy(self: FisherStats, *args: Any, **kwargs: Any) -> Any:
        record = {"count": self.count, "sums": {n: t.clone() for n, t in self.sums.items()}}
        fitted = fit(self, *args, **kwargs)
        record["duals"] = sorted(fitted.duals)  # layers solved through the rows' kernel
        RECORD["fits"].append(record)
        return fitted

    FisherStats.fit = fit_spy
    gradients = LayerTaps.gradients

    def gradients_spy(self: LayerTaps, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = gradients(self, loss, *args, **kwargs)
        RECORD["query_batches"].append(next(iter(out.values())).shape[0])
        return out

    LayerTaps.gradients = gradients_spy
    report = InfluenceReporter.report

    def report_spy(self: InfluenceReporter, result: Any, **kwargs: Any) -> Any:
        RECORD["reports"].append({"period": kwargs.get("period"), "result": result.to_dict(),
                                  "data_value": kwargs.get("data_value")})
        return report(self, result, **kwargs)

    InfluenceReporter.report = report_spy


def data(per_rank_batch: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = torch.randint(0, 3, (N_TRAIN + N_VAL,), generator=g)
    train = DataLoader(IndexedDataset(TensorDataset(x[:N_TRAIN], y[:N_TRAIN])), batch_size=per_rank_batch)
    val = DataLoader(IndexedDataset(TensorDataset(x[N_TRAIN:], y[N_TRAIN:])), batch_size=8)
    return train, val


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--k", type=int, default=K)
    args = parser.parse_args(argv)
    out = Path(args.out)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    root = out if local_rank == 0 else out / f"rank{local_rank}-root"
    torch.set_num_threads(1)
    install_spies()
    L.seed_everything(0, verbose=False)
    train, val = data(GLOBAL_BATCH // args.devices)
    callback = GraSSCallback(k=args.k, num_queries=6, topk=3, storage_dtype="float32", rows_per_shard=16,
                             progress=False, log_to_wandb=True)
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", logger=False, callbacks=[callback],
                        default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(TinyModule(), train, val)
    ids, values = callback.data_value_tensors()
    torch.save({**RECORD, "rank": trainer.global_rank, "world_size": trainer.world_size,
                "store_dir": callback.store_dir, "data_value": (ids, values),
                "training_loss": callback.training_loss, "suspect": callback.suspect,
                "weights": {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()}},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
