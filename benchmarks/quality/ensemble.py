"""The in-run ensemble on a workload trained through the callback.

    nice -n 10 .venv/bin/python -m benchmarks.quality.ensemble teacher-deep [--periods-per-epoch 2]

The workload's full-data model is trained by Lightning with the workload's own recipe (same
initialisation, AdamW, warm-up + cosine schedule, minibatch order), :class:`GraSSCallback`
attached (k = 1024, default damping and masks, every query scored each period). A second callback
reads each period's score matrix off the ensemble (``ensemble_scores`` after minus before) and
the mean learning rate of the period's steps, so every weighting is evaluated on the same run:
the last period alone, the plain sum, the learning-rate (TracIn) weighting, the sums over the
later half of the periods, and the same with every period standardised per query first (the
callback's default, ``ensemble_standardise=True``: ``S_p[q] / σ_p[q]``). The run's own ``ensemble_weighting`` result is checked against the
sum computed here. LDS against the workload's subset-retrained models (cached ground truth).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

from grass_callback.data_value import standardise  # noqa: E402
from grass_callback.evaluation import lds  # noqa: E402

from . import mlp  # noqa: E402
from .workloads import REPORTING, TUNING, WORKLOADS, ground_truth  # noqa: E402


class _EpochOrder(torch.utils.data.Sampler):
    """Batches in the workload's per-epoch order (the ground truth's, on all ``n`` examples)."""

    def __init__(self, cfg: dict, n: int) -> None:
        self.orders, self.batch, self.epoch = mlp.epoch_orders(cfg, n), cfg["batch"], 0

    def __iter__(self):
        order = self.orders[min(self.epoch, len(self.orders) - 1)]
        self.epoch += 1
        return iter([order[i:i + self.batch].tolist() for i in range(0, len(order), self.batch)])

    def __len__(self) -> int:
        return math.ceil(len(self.orders[0]) / self.batch)


def _module(cfg: dict, n: int):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp.to_module(cfg, mlp.init_params(cfg))

        def training_step(self, batch, batch_idx):
            x, y = batch[0], batch[1]
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
            per_epoch = math.ceil(n / cfg["batch"])
            total = per_epoch * cfg["epochs"]
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: mlp.lr_at(cfg, s, total, per_epoch) / cfg["lr"])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Module()


def quiet_trainer(epochs: int, callbacks: list, root: str):
    """A CPU ``Trainer`` for the suite's callback runs: no logger, checkpoints, bars or sanity steps."""
    import lightning as L

    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=callbacks, default_root_dir=str(root))


def _recorder(grass):
    import lightning as L

    class PeriodRecorder(L.Callback):
        """Each period's score matrix (difference of the ensemble's sums) and its mean lr."""

        def __init__(self) -> None:
            self.periods, self.lrs, self._lr, self._prev, self._seen = [], [], [], None, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._lr.append(trainer.optimizers[0].param_groups[0]["lr"])  # the lr this step uses

        def _check(self) -> None:
            ens = grass._ensemble
            if ens is None or ens.periods == self._seen:
                return
            total = grass.ensemble_scores.clone()
            weight = ens.weights[-1]
            delta = (total - (self._prev if self._prev is not None else 0)) / weight
            self.periods.append(delta)
            self.lrs.append(sum(self._lr) / max(1, len(self._lr)))
            self._prev, self._seen, self._lr = total, ens.periods, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._check()

        def on_train_epoch_end(self, trainer, pl_module):
            self._check()

    return PeriodRecorder()


def callback_run(name: str, gt: dict, periods_per_epoch: int, weighting: str) -> dict:
    import lightning as L

    from grass_callback import GraSSCallback, IndexedDataset

    cfg = WORKLOADS[name]
    Xtr, ytr, Xq, yq = mlp.load_data(cfg)
    ytr = gt.get("y_train", ytr)
    n = len(Xtr)
    train = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(Xtr, ytr)),
                                        batch_sampler=_EpochOrder(cfg, n))
    queries = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xq, yq), batch_size=256)
    per_epoch = math.ceil(n / cfg["batch"])
    every = None if periods_per_epoch == 1 else per_epoch // periods_per_epoch
    store = tempfile.mkdtemp(prefix="quality-ensemble-")
    grass = GraSSCallback(k=1024, num_queries=len(Xq), query_loader=queries, log_to_wandb=False, progress=False,
                          store_dir=store, score_every_n_steps=every, ensemble_weighting=weighting,
                          ensemble_standardise=False)  # raw sums: the recorder reads each period off them
    rec = _recorder(grass)
    module = _module(cfg, n)
    trainer = quiet_trainer(cfg["epochs"], [grass, rec], store)
    t0 = time.perf_counter()
    trainer.fit(module, train)
    final = [p.detach() for p in module.net.parameters()]
    drift = max(float((a - b).abs().max()) for a, b in zip(final, gt["full"]))
    return {"periods": rec.periods, "lrs": rec.lrs, "ensemble": grass.ensemble_scores.clone(),
            "weights": list(grass._ensemble.weights), "seconds": time.perf_counter() - t0, "param_drift": drift}


def weightings(periods: list[torch.Tensor], lrs: list[float]) -> dict[str, torch.Tensor]:
    P = len(periods)
    half = P // 2
    out = {"last period": periods[-1], "uniform sum": sum(periods),
           "lr-weighted (TracIn)": sum(w * s for w, s in zip(lrs, periods)),
           "later half, uniform": sum(periods[half:]),
           "later half, lr-weighted": sum(w * s for w, s in zip(lrs[half:], periods[half:])),
           "last quarter, uniform": sum(periods[P - max(1, P // 4):])}
    z = [standardise(S) for S in periods]  # each period per query over its rows (all rows here)
    out["standardised, uniform (default)"] = sum(z)
    out["standardised, lr-weighted"] = sum(w * s for w, s in zip(lrs, z))
    out["standardised, later half, lr-weighted"] = sum(w * s for w, s in zip(lrs[half:], z[half:]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", default=["teacher-deep"])
    parser.add_argument("--periods-per-epoch", type=int, nargs="+", default=[1])
    parser.add_argument("--cache", default="runs/quality-cache")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("in-run ensemble, k = 1024, default damping and masks; LDS over all queries")
    print("workload | half | periods | weighting | LDS")
    for name in args.workloads:
        gt = ground_truth(name, args.cache)
        half = "tuning" if name in TUNING else "reporting" if name in REPORTING else "-"
        for ppe in args.periods_per_epoch:
            run = callback_run(name, gt, ppe, "lr")
            lrs = run["lrs"]
            results = weightings(run["periods"], lrs)
            check = float((run["ensemble"] - results["lr-weighted (TracIn)"]).abs().max()
                          / results["lr-weighted (TracIn)"].abs().max())
            for label, scores in results.items():
                value = float(lds(gt["masks"], gt["targets"], scores.T, target=gt["target_kind"]))
                print(f"{name} | {half} | {len(run['periods'])} | {label} | {value:.4f}", flush=True)
            print(f"  ({run['seconds']:.0f} s through the callback; its own lr-weighted ensemble vs the sum here: "
                  f"max rel diff {check:.1e}; final weights vs the ground truth's full-data model: max abs diff "
                  f"{run['param_drift']:.1e})", flush=True)


if __name__ == "__main__":
    main()
