"""Checkpoint-time attribution: influence tables from saved ``.ckpt`` files, no callback in training.

    python examples/attribute_checkpoint.py          # trains 3 epochs, then attributes 2 checkpoints

It trains the digits MLP with plain ``ModelCheckpoint`` (one file per epoch), then runs the same
thing a user would type afterwards::

    PYTHONPATH=examples python -m grass_callback attribute \\
        --ckpt runs/ckpt/epoch=1.ckpt --ckpt runs/ckpt/epoch=2.ckpt \\
        --model attribute_checkpoint:DigitsModule --data attribute_checkpoint:DigitsData \\
        --renderer attribute_checkpoint:digit_image

Two checkpoints are ensembled (their scores summed). Tables land in ``<out>/scores`` and an
offline W&B run under ``<out>/wandb``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_mlp import load_digits_split  # noqa: E402  (same data as the main demo)

from grass_callback import IndexedDataset  # noqa: E402
from grass_callback.render import make_renderer  # noqa: E402

# table cells: each sample's 64 pixels as an 8x8 image, 12x enlarged (labels come from the sample)
digit_image = make_renderer(image_shape=(8, 8), image_scale=12)


class DigitsModule(L.LightningModule):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y, _index = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class DigitsData(L.LightningDataModule):
    def __init__(self, seed: int = 0, batch_size: int = 32) -> None:
        super().__init__()
        self.seed, self.batch_size = seed, batch_size

    def setup(self, stage: str) -> None:
        train, val, self.flipped = load_digits_split(self.seed)
        self.train_set, self.val_set = IndexedDataset(train), IndexedDataset(val)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=64)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="runs/attribute_checkpoint")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="no progress bars, no W&B (tests)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(args.out)
    L.seed_everything(0, verbose=False)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, callbacks=[ckpt],
                        enable_progress_bar=not args.quick, enable_model_summary=False)
    trainer.fit(DigitsModule(), DigitsData())
    paths = sorted((out / "ckpt").glob("epoch=*.ckpt"))[-2:]  # the last two checkpoints

    from grass_callback.__main__ import main as cli

    cli_args = ["attribute", *[a for p in paths for a in ("--ckpt", str(p))],
                "--model", "attribute_checkpoint:DigitsModule", "--data", "attribute_checkpoint:DigitsData",
                "--renderer", "attribute_checkpoint:digit_image",
                "--out", str(out / "attribution"), "--k", str(args.k), "--num-queries", "8", "--topk", "5"]
    if args.quick:
        cli_args += ["--no-wandb", "--quiet"]
    print("running: PYTHONPATH=examples python -m grass_callback " + " ".join(cli_args))
    cli(cli_args)
    return out / "attribution"


if __name__ == "__main__":
    main()
