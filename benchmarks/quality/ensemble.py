"""The in-run ensemble on a workload trained through the callback.

    nice -n 10 .venv/bin/python -m benchmarks.quality.ensemble teacher-deep [--periods-per-epoch 1 2]
    nice -n 10 .venv/bin/python -m benchmarks.quality.ensemble gpt2-pydoc-tune gpt2-pydoc --plan-seeds 0 1 2

The workload's full-data model is trained by Lightning with the workload's own recipe (same
initialisation, AdamW, warm-up + cosine schedule, minibatch order), :class:`GraSSCallback`
attached (k = 1024, default damping and masks, every query scored each period). MLP workloads:
cross-entropy on ``(x, y)``; the GPT-2 workloads (:mod:`benchmarks.quality.lm`): a minibatch's
loss is the mean of its passages' mean token losses, so a query's gradient is that of its mean
token loss, the ground truth's target. The run prints how far its final model is from the ground
truth's full-data model (the GPT-2's: weights and query losses). A second callback reads each
period's score matrix off the ensemble (``ensemble_scores`` after minus before), the training
rows the period scored and the mean learning rate of its steps, so every weighting is evaluated
on the same run: the last period alone, the plain sum, the learning-rate (TracIn) weighting, the
sums over the later half of the periods, and the same with every period standardised per query
over its own rows first (the callback's default, ``ensemble_standardise=True``: ``S_p[q] / σ_p[q]``).
The run's own ``ensemble_weighting="lr"`` sum is checked against the sum computed here, and the
default row against :class:`~grass_callback.scoring.ScoreEnsemble`'s standardised sum of the same
periods. With ``--periods-per-epoch`` above 1 a period scores only the rows stored in it, and the
last one can be a short remainder (a period closes at the end of training). LDS against the
workload's subset-retrained models (cached ground truth); ``--plan-seeds``: one run per projection
seed, then each weighting's mean ± SE and its gain over the last period paired on the seed.
"""

from __future__ import annotations

import argparse
import json
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

from . import lm as lm_mod  # noqa: E402
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


def _module(cfg: dict, n: int, net: torch.nn.Module | None = None, step_loss=None, losses: bool = False):
    """``net`` trained by the workload's recipe (AdamW, one warm-up epoch, cosine to zero by step):
    ``step_loss(net, batch)`` is the minibatch's loss, the mean of its examples' own losses.
    Without them: the MLP workload's network from its initialisation, cross-entropy on ``(x, y)``.
    ``losses=True`` (the MLP only): ``training_step`` returns ``{"loss", "per_example_loss"}``, the
    examples' own losses for the callback's ``training_loss``."""
    import lightning as L

    if net is None:
        net, step_loss = mlp.to_module(cfg, mlp.init_params(cfg)), (_mlp_losses if losses else _mlp_loss)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return step_loss(self.net, batch)

        def configure_optimizers(self):
            return recipe_optimizers(cfg, n, self.parameters())

    return Module()


def recipe_optimizers(cfg: dict, n: int, params) -> dict:
    """The workloads' optimiser for Lightning: AdamW, the learning rate of :func:`mlp.lr_at` per
    step (one warm-up epoch, then cosine to zero) over ``n`` examples an epoch."""
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    per_epoch = math.ceil(n / cfg["batch"])
    total = per_epoch * cfg["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: mlp.lr_at(cfg, s, total, per_epoch) / cfg["lr"])
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _mlp_loss(net, batch):
    return F.cross_entropy(net(batch[0]), batch[1])


def _mlp_losses(net, batch):
    per_example = F.cross_entropy(net(batch[0]), batch[1], reduction="none")
    return {"loss": per_example.mean(), "per_example_loss": per_example}


def _lm_loss(net, batch):
    return lm_mod.token_losses(net, batch[0], batch[1]).mean()


def _workload(cfg: dict, gt: dict):
    """``(train dataset, query dataset, net, step loss, check)`` of a workload; ``check(net)`` ->
    how far the trained ``net`` is from the ground truth's full-data model (a sentence)."""
    if cfg["kind"] == "mlp":
        Xtr, ytr, Xq, yq = mlp.load_data(cfg)
        ytr = gt.get("y_train", ytr)

        def check(net):
            drift = max(float((a.detach() - b).abs().max()) for a, b in zip(net.parameters(), gt["full"]))
            return f"final weights vs the ground truth's full-data model: max abs diff {drift:.1e}"

        data = torch.utils.data.TensorDataset(Xtr, ytr), torch.utils.data.TensorDataset(Xq, yq)
        return (*data, mlp.to_module(cfg, mlp.init_params(cfg)), _mlp_loss, check)
    ids, mask, q_ids, q_mask, vocab = lm_mod.load_passages(cfg)
    if vocab != gt["vocab"]:
        raise ValueError(f"the tokenizer's vocabulary is {vocab}, the ground truth's {gt['vocab']}: rebuild it")

    def check(net):
        ref = lm_mod.build_lm(cfg, vocab)
        ref.load_state_dict(gt["full_state"])
        mine, theirs = net.state_dict(), ref.state_dict()
        drift = max(float((mine[k] - theirs[k]).abs().max()) for k in theirs)
        scale = max(float(theirs[k].abs().max()) for k in theirs)
        la, lb = lm_mod.passage_losses(net.eval(), q_ids, q_mask), lm_mod.passage_losses(ref.eval(), q_ids, q_mask)
        gap = float((la - lb).abs().max())
        return (f"final weights vs the ground truth's full-data model: max abs diff {drift:.1e} (largest weight "
                f"{scale:.2f}); query losses: max abs diff {gap:.1e}, mean {float(la.mean()):.4f} vs "
                f"{float(lb.mean()):.4f} nats")

    data = torch.utils.data.TensorDataset(ids, mask), torch.utils.data.TensorDataset(q_ids, q_mask)
    return (*data, lm_mod.build_lm(cfg, vocab), _lm_loss, check)


def quiet_trainer(epochs: int, callbacks: list, root: str):
    """A CPU ``Trainer`` for the suite's callback runs: no logger, checkpoints, bars or sanity steps."""
    import lightning as L

    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=callbacks, default_root_dir=str(root))


def _recorder(grass):
    import lightning as L

    class PeriodRecorder(L.Callback):
        """Each period's score matrix (difference of the ensemble's sums), the training rows it
        scored (``[n]`` bool: standardising is over them, as in the callback) and its mean lr."""

        def __init__(self) -> None:
            self.periods, self.seen, self.lrs, self._lr, self._prev, self._seen = [], [], [], [], None, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._lr.append(trainer.optimizers[0].param_groups[0]["lr"])  # the lr this step uses

        def _check(self) -> None:
            ens = grass._ensemble
            if ens is None or ens.periods == self._seen:
                return
            if ens.periods != self._seen + 1:
                raise RuntimeError(f"the recorder missed a scoring period ({self._seen} -> {ens.periods})")
            total = grass.ensemble_scores.clone()
            weight = ens.weights[-1]
            delta = (total - (self._prev if self._prev is not None else 0)) / weight
            self.periods.append(delta)
            # the ids the period scored: an id it did not store adds exactly 0 to every query's sum
            self.seen.append(delta.ne(0).any(0))
            self.lrs.append(sum(self._lr) / max(1, len(self._lr)))
            self._prev, self._seen, self._lr = total, ens.periods, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._check()

        def on_train_epoch_end(self, trainer, pl_module):
            self._check()

        def on_train_end(self, trainer, pl_module):  # a period closed at the end of training
            self._check()

    return PeriodRecorder()


def callback_run(name: str, gt: dict, periods_per_epoch: int, weighting: str, seed: int = 0,
                 plan_options: dict | None = None) -> dict:
    import lightning as L

    from grass_callback import GraSSCallback, IndexedDataset

    cfg = WORKLOADS[name]
    train_set, query_set, net, step_loss, check = _workload(cfg, gt)
    n, m = len(train_set), len(query_set)
    train = torch.utils.data.DataLoader(IndexedDataset(train_set), batch_sampler=_EpochOrder(cfg, n))
    queries = torch.utils.data.DataLoader(query_set, batch_size=256)
    per_epoch = math.ceil(n / cfg["batch"])
    every = None if periods_per_epoch == 1 else per_epoch // periods_per_epoch
    store = tempfile.mkdtemp(prefix="quality-ensemble-")
    grass = GraSSCallback(k=1024, seed=seed, num_queries=m, query_loader=queries, log_to_wandb=False, progress=False,
                          store_dir=store, score_every_n_steps=every, ensemble_weighting=weighting,
                          ensemble_standardise=False,  # raw sums: the recorder reads each period off them
                          plan_options=plan_options)
    rec = _recorder(grass)
    module = _module(cfg, n, net, step_loss)
    trainer = quiet_trainer(cfg["epochs"], [grass, rec], store)
    t0 = time.perf_counter()
    trainer.fit(module, train)
    seconds = time.perf_counter() - t0
    return {"periods": rec.periods, "seen": rec.seen, "lrs": rec.lrs, "ensemble": grass.ensemble_scores.clone(),
            "weights": list(grass._ensemble.weights), "seconds": seconds, "check": check(module.net)}


def weightings(periods: list[torch.Tensor], lrs: list[float],
               seen: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every weighting of the recorded periods ``[m, n]`` (``seen``: each period's scored rows, the
    ones its standard deviation is taken over; default all)."""
    P = len(periods)
    half = P // 2
    out = {"last period": periods[-1], "uniform sum": sum(periods),
           "lr-weighted (TracIn)": sum(w * s for w, s in zip(lrs, periods)),
           "later half, uniform": sum(periods[half:]),
           "later half, lr-weighted": sum(w * s for w, s in zip(lrs[half:], periods[half:])),
           "last quarter, uniform": sum(periods[P - max(1, P // 4):])}
    z = [standardise(S, None if seen is None else m) for S, m in zip(periods, seen or periods)]
    out["standardised, uniform (default)"] = sum(z)
    out["standardised, lr-weighted"] = sum(w * s for w, s in zip(lrs, z))
    out["standardised, later half, lr-weighted"] = sum(w * s for w, s in zip(lrs[half:], z[half:]))
    return out


def library_standardised_sum(periods: list[torch.Tensor], seen: list[torch.Tensor]) -> torch.Tensor:
    """The callback's own default sum (:class:`ScoreEnsemble`, ``standardise=True``) of the periods."""
    from grass_callback.scoring import ScoreEnsemble

    ens = ScoreEnsemble(periods[0].shape[1])
    query_ids = torch.arange(periods[0].shape[0])
    for S, m in zip(periods, seen):
        ens.add(query_ids, S, m.to(torch.float64), standardise=True)
    return ens.total


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", default=["teacher-deep"], choices=list(WORKLOADS))
    parser.add_argument("--periods-per-epoch", type=int, nargs="+", default=[1])
    parser.add_argument("--plan-seeds", type=int, nargs="+", default=[0],
                        help="the callback's projection seeds (one run each); with several, a mean ± SE summary")
    parser.add_argument("--cache", default="runs/quality-cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plan-options", type=json.loads, default=None, metavar="JSON",
                        help="the callback's plan_options, e.g. '{\"oversample\": 1024, \"c\": 2}'")
    args = parser.parse_args(argv)
    if min(args.periods_per_epoch) < 1:
        parser.error("--periods-per-epoch must be at least 1")
    torch.set_num_threads(args.threads)
    print("in-run ensemble, k = 1024, default damping and masks; LDS over all queries")
    print("workload | half | periods | plan seed | weighting | LDS")
    for name in args.workloads:
        gt = ground_truth(name, args.cache)
        half = "tuning" if name in TUNING else "reporting" if name in REPORTING else "-"
        for ppe in args.periods_per_epoch:
            table: dict[str, list[float]] = {}
            for seed in args.plan_seeds:
                run = callback_run(name, gt, ppe, "lr", seed=seed, plan_options=args.plan_options)
                results = weightings(run["periods"], run["lrs"], run["seen"])
                check = _relative(run["ensemble"], results["lr-weighted (TracIn)"])
                std_check = _relative(library_standardised_sum(run["periods"], run["seen"]),
                                      results["standardised, uniform (default)"])
                for label, scores in results.items():
                    value = float(lds(gt["masks"], gt["targets"], scores.T, target=gt["target_kind"]))
                    table.setdefault(label, []).append(value)
                    print(f"{name} | {half} | {len(run['periods'])} | {seed} | {label} | {value:.4f}", flush=True)
                print(f"  ({run['seconds']:.0f} s through the callback; its own lr-weighted ensemble vs the sum here: "
                      f"max rel diff {check:.1e}; ScoreEnsemble's standardised sum of the recorded periods vs "
                      f"the default row here: {std_check:.1e}; {run['check']})", flush=True)
            if len(args.plan_seeds) > 1:
                last = table["last period"]
                print(f"{name}, {ppe} period(s) an epoch, {len(last)} plan seeds: mean ± SE | minus the last "
                      "period, paired on the seed")
                for label, values in table.items():
                    m, se = _mean_se(values)
                    dm, dse = _mean_se([v - b for v, b in zip(values, last)])
                    print(f"  {label} | {m:.4f} ± {se:.4f} | {dm:+.4f} ± {dse:.4f}", flush=True)


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


if __name__ == "__main__":
    main()
