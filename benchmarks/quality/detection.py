"""Two flip-detection studies for ``suspect``: self-influence at other dampings, and the training loss.

    nice -n 10 .venv/bin/python -m benchmarks.quality.detection                       # t-flip20 (tuning)
    nice -n 10 .venv/bin/python -m benchmarks.quality.detection --workloads r-flip20  # the reporting half

The removal benchmark's flipped workload is trained once through :class:`GraSSCallback` (the run of
``benchmarks.quality.removal``, its store kept), with a second callback that evaluates every
training example's cross-entropy under the model at each epoch end. No retraining: AUROC of
finding the flipped labels only. Printed:

1. **Self-influence at other dampings.** Each period's stored rows are read back and every layer's
   period Fisher is eigendecomposed once (:class:`~grass_callback.evaluation.KernelInfluence`), so
   the summed ``Σ_p Σ_l g_{p,i,l}^T (F_{p,l} + r λ_{p,l} I)^{-1} g_{p,i,l}`` costs one product per
   ratio ``r`` (``λ`` the default ``"auto"`` damping: ``r = 1`` is the callback's own
   self-influence, checked). Per ratio: the AUROC of the self-influence and of ``suspect`` made
   with it and the run's standardised data value (value weight 0.3, the default, and 0.5).
2. **The training loss.** The per-example loss summed over epochs (the area under its curve, as in
   loss- and margin-based mislabel detection), over the first half of them, and at the last
   epoch alone, each alone and joined with the default ``suspect`` by unit rank (loss weight 0.2,
   1/3, 0.5). Here the loss is re-evaluated at each epoch end by a second callback; what the library
   built from this study (``GraSSCallback.training_loss``) takes the training steps' own losses instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

from grass_callback import data_value as dv  # noqa: E402
from grass_callback.evaluation import KernelInfluence  # noqa: E402
from grass_callback.store import GradientStore  # noqa: E402

from . import removal  # noqa: E402

RATIOS = (1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
LOSS_WEIGHTS = (0.2, 1 / 3, 0.5)


def period_self_influence(store: GradientStore, n: int, ratios) -> torch.Tensor:
    """``[P, len(ratios), n]``: each period's (epoch's) self-influence at each ratio x ``"auto"``,
    from the store's rows, the period's Fisher over its own rows."""
    epochs = sorted({int(e) for c in store.iter_chunks(chunk_rows=1 << 16) for e in c.epochs.tolist()})
    out = []
    for e in epochs:
        chunks = list(store.iter_chunks(chunk_rows=1 << 16, epochs=e))
        ids = torch.cat([c.ids for c in chunks])
        kern = KernelInfluence({name: torch.cat([c.grads[name] for c in chunks]) for name in store.layers})
        per = torch.zeros(len(ratios), n, dtype=torch.float64)
        for j, r in enumerate(ratios):
            auto = {name: max(1.0, k / len(ids)) for name, k in store.layers.items()}  # r = max(1, k/N)
            per[j].index_add_(0, ids, kern.self_influence({name: r * a for name, a in auto.items()}))
        out.append(per)
    return torch.stack(out)


def _loss_recorder(net, X: torch.Tensor, y: torch.Tensor):
    import lightning as L

    class EpochLoss(L.Callback):
        """Every training example's loss under the model at each epoch end."""

        def __init__(self) -> None:
            self.losses: list[torch.Tensor] = []

        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                self.losses.append(F.cross_entropy(net(X), y, reduction="none").double())

    return EpochLoss()


def study(name: str, ratios=RATIOS, log=print) -> dict:
    cfg = removal.WORKLOADS[name]
    data = removal.load(cfg)
    n = len(data["Xtr"])
    module = removal._module(cfg, n)
    losses = _loss_recorder(module.net, data["Xtr"], data["ytr"])
    grass, rec, seconds = removal.train_through_callback(cfg, module, (data["Xtr"], data["ytr"]),
                                                         (data["Xval"], data["yval"]), 256, extra=[losses])
    log(f"{name} ({cfg['half']} half): trained through the callback in {seconds:.1f} s")
    SI = period_self_influence(GradientStore(Path(grass.store_dir) / "train", readonly=True), n, ratios)
    own = torch.stack(rec.self_influence).double()  # the callback's, per period
    if 1.0 in ratios:
        at1 = SI[:, list(ratios).index(1.0)]
        log(f"  ratio 1 against the callback's own self-influence: max rel diff "
            f"{float((at1 - own).abs().max() / own.abs().max()):.1e}")
    value = dv.standardised_sum([s.double() for s in rec.scores])
    flipped = data["flipped"]

    def auroc(high):  # high = flagged
        return removal.auroc(-high, flipped)

    default = dv.suspect(value, own.sum(0))
    log(f"  data value alone {auroc(-value):.3f}; default suspect {auroc(default):.3f}")
    log("\n  | self-influence damping, x auto | self-influence | suspect 0.3/0.7 | suspect 0.5/0.5 |")
    log("  |---|---|---|---|")
    table = {}
    for j, r in enumerate(ratios):
        total = SI[:, j].sum(0)
        table[r] = (auroc(total), auroc(dv.suspect(value, total, 0.3)), auroc(dv.suspect(value, total, 0.5)))
        log(f"  | {r:g} | " + " | ".join(f"{a:.3f}" for a in table[r]) + " |")
    L_ = torch.stack(losses.losses)  # [epochs, n]
    half = max(1, len(L_) // 2)
    log("\n  | training loss | alone | " + " | ".join(f"joined with suspect, weight {w:.2g}" for w in LOSS_WEIGHTS) + " |")
    log("  |---|---|" + "---|" * len(LOSS_WEIGHTS))
    loss_rows = {}
    for label, signal in ((f"summed over all {len(L_)} epochs", L_.sum(0)), (f"summed over the first {half}", L_[:half].sum(0)),
                          ("last epoch", L_[-1])):
        loss_rows[label] = [auroc(signal)] + [auroc(dv.weighted_rank_combine([default, signal], [1 - w, w]))
                                              for w in LOSS_WEIGHTS]
        log(f"  | {label} | " + " | ".join(f"{a:.3f}" for a in loss_rows[label]) + " |")
    return {"self_influence": table, "loss": loss_rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["t-flip20"],
                   choices=[k for k, v in removal.WORKLOADS.items() if v["flip_fraction"]])
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    for name in args.workloads:
        study(name, tuple(args.ratios))


if __name__ == "__main__":
    main()
