"""Find mislabelled digits with GraSSCallback while an MLP trains.

    python examples/digits_mlp.py                 # about a minute on a 2-core CPU
    python examples/digits_mlp.py --epochs 2 --quick

scikit-learn's bundled digits (1797 8x8 images, no download), 10% of the training labels
flipped on purpose, a small MLP trained by Lightning with the callback attached. At the end it
prints how many flipped labels are among the examples with the highest self-influence (chance is
10%), and the top proponents / opponents of a few validation images. W&B runs offline; the
tables are in the run folder it prints (``wandb sync <folder>`` uploads them later).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# -- config ---------------------------------------------------------------------------------
FLIP_FRACTION = 0.10   # share of training labels replaced by a wrong class
HIDDEN = 128
BATCH_SIZE = 32
LR = 3e-3


def load_digits_split(seed: int) -> tuple[TensorDataset, TensorDataset, torch.Tensor]:
    """Train/val datasets of digits with flipped training labels; returns the flipped ids too."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0        # [1797, 64], pixels in 0..1
    y = torch.tensor(data.target, dtype=torch.int64)                # [1797]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    train_idx, val_idx = order[:1437], order[1437:]
    y_train = y[train_idx].clone()
    flipped = torch.randperm(len(train_idx), generator=g)[: int(FLIP_FRACTION * len(train_idx))]
    # a wrong class for each flipped example: shift by 1..9 so it never stays correct
    y_train[flipped] = (y_train[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
    return TensorDataset(x[train_idx], y_train), TensorDataset(x[val_idx], y[val_idx]), flipped.sort().values


def build_module():
    import lightning as L

    class DigitsMLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 64), nn.ReLU(),
                                     nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, _index = batch                     # IndexedDataset appends each example's index
            losses = F.cross_entropy(self(x), y, reduction="none")
            loss = losses.mean()                     # mean over the batch (the callback's default)
            self.log("train/loss", loss, prog_bar=True)
            # each example's own loss: the callback keeps it as training_loss and ranks suspects by it too
            return {"loss": loss, "per_example_loss": losses}

        def validation_step(self, batch, batch_idx):
            x, y, _index = batch
            self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)

    return DigitsMLP()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--k", type=int, default=256, help="compressed size per layer")
    parser.add_argument("--num-queries", type=int, default=16)
    parser.add_argument("--out", default="runs/digits", help="logs, store, W&B offline run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="no progress bars (tests)")
    args = parser.parse_args(argv)

    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from grass_callback import GraSSCallback, IndexedDataset
    from grass_callback.render import make_renderer

    os.environ.setdefault("WANDB_MODE", "offline")
    L.seed_everything(args.seed, verbose=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "grass").exists():  # the demo's own store from an earlier run: start afresh
        print(f"removing the previous demo run's store {out / 'grass'}")
        shutil.rmtree(out / "grass")
    train_set, val_set, flipped = load_digits_split(args.seed)
    train = DataLoader(IndexedDataset(train_set), batch_size=BATCH_SIZE, shuffle=True)
    val = DataLoader(IndexedDataset(val_set), batch_size=64)

    # each sample is (pixels [64], label, index): show the pixels as an 8x8 image, 12x enlarged
    # (the tables' label columns come from the sample's second field)
    digits = make_renderer(image_shape=(8, 8), image_scale=12)
    grass = GraSSCallback(k=args.k, num_queries=args.num_queries, topk=5, store_dir=out / "grass",
                          renderer=digits, progress=not args.quick)
    logger = WandbLogger(project="grass-callback-demo", save_dir=str(out), offline=True)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=logger, callbacks=[grass],
                        default_root_dir=str(out), enable_progress_bar=not args.quick,
                        enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(build_module(), train, val)

    # -- what the last scoring period found ------------------------------------------------
    result = grass.last_result
    n_flip = len(flipped)
    top = result.self_influence_ids[result.self_influence.argsort(descending=True)[:n_flip]]
    caught = int(torch.isin(top, flipped).sum())
    print(f"\nflipped labels among the {n_flip} highest self-influence examples: {caught} "
          f"({caught / n_flip:.0%}; chance {FLIP_FRACTION:.0%})")
    suspects = grass.suspect[0][:n_flip]  # influence, self-influence and the early training loss
    caught_suspect = int(torch.isin(suspects, flipped).sum())
    print(f"flipped labels among the {n_flip} most suspect examples: {caught_suspect} ({caught_suspect / n_flip:.0%})")
    ranked = grass.ensemble_result or result  # tables rank by scores summed over the epochs
    for q in range(min(3, len(ranked.query_ids))):
        qid = int(ranked.query_ids[q])
        print(f"validation image {qid} (label {int(val_set[qid][1])}):")
        for label, ids, scores in (("proponents", ranked.top_ids[q], ranked.top_scores[q]),
                                   ("opponents", ranked.bottom_ids[q], ranked.bottom_scores[q])):
            shown = ", ".join(f"#{int(i)} (label {int(train_set[int(i)][1])}, {float(s):+.3g})"
                              for i, s in zip(ids[:3], scores[:3]))
            print(f"  top {label}: {shown}")
    run_dir = Path(logger.experiment.dir).parent if logger.experiment is not None else None
    logger.experiment.finish()  # Lightning leaves the logger's run open; close it so its files are complete
    print(f"\nlocal score files: {out / 'grass' / 'scores'}")
    if run_dir is not None:
        print(f"W&B offline run: {run_dir}\n  upload it with: wandb sync {run_dir}")
    return {"caught": caught, "caught_suspect": caught_suspect, "n_flipped": n_flip, "result": result, "run_dir": run_dir,
            "store_dir": out / "grass"}


if __name__ == "__main__":
    main()
