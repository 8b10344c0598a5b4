"""Does the in-training data value agree with checkpoint-time attribution?

    python benchmarks/data_value_agreement.py            # digits MLP, 8 epochs, about a minute
    python benchmarks/data_value_agreement.py --seeds 0 1 2

Trains the digits demo's MLP (10% flipped labels) with ``GraSSCallback(checkpoint_attribution=
"end")``: the callback accumulates each training example's data value over the epochs from the
gradients the training steps produced, then runs one pass over the training set at the final
weights. Prints the Spearman correlation of the two data values (and of the last epoch's
in-training self-influence with the checkpoint-time one) per seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(a.float(), b.float()))


def by_id(ids: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64).index_add_(0, ids, values.double())


def run(seed: int, epochs: int, k: int) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from digits_mlp import build_module, load_digits_split
    from grass_callback import GraSSCallback, IndexedDataset

    L.seed_everything(seed, verbose=False)
    train_set, val_set, _ = load_digits_split(seed)
    n = len(train_set)
    with tempfile.TemporaryDirectory() as tmp:
        grass = GraSSCallback(k=k, num_queries=16, store_dir=tmp, checkpoint_attribution="end", progress=False,
                              log_to_wandb=False)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=[grass],
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(build_module(), DataLoader(IndexedDataset(train_set), batch_size=32, shuffle=True),
                    DataLoader(IndexedDataset(val_set), batch_size=64))
        in_training = by_id(*grass.data_value_tensors(), n)
        ckpt = grass.last_checkpoint_result
        at_end = by_id(ckpt.data_value_ids, ckpt.data_value, n)
        last = grass.last_result
        return {"seed": seed, "data_value_spearman": spearman(in_training, at_end),
                "last_epoch_data_value_spearman": spearman(by_id(last.data_value_ids, last.data_value, n), at_end),
                "self_influence_spearman": spearman(by_id(last.self_influence_ids, last.self_influence, n),
                                                    by_id(ckpt.self_influence_ids, ckpt.self_influence, n))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--k", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run(s, args.epochs, args.k) for s in args.seeds]
    print("seed  data value (all epochs) vs checkpoint  data value (last epoch) vs checkpoint  self-influence (last epoch) vs checkpoint")
    for r in rows:
        print(f"{r['seed']:4d}  {r['data_value_spearman']:+.3f}  {r['last_epoch_data_value_spearman']:+.3f}  "
              f"{r['self_influence_spearman']:+.3f}")


if __name__ == "__main__":
    main()
