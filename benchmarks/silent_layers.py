"""What a layer with no gradient (BERT's pooler under a mean-pooled loss) costs, before and now.

    nice -n 10 python benchmarks/silent_layers.py              # 2 BERT layers of MiniLM width, k = 256
    nice -n 10 python benchmarks/silent_layers.py --layers 6 --k 1024   # MiniLM-shaped (slow here)

A BERT of MiniLM width (384, 12 heads, MLP 1536; random weights, nothing downloaded) whose loss
mean-pools the last hidden states into a linear classifier, so the pooler runs in every forward
and gets no gradient. Three runs of 2 epochs (400 random token sequences, batch 16, a scoring
period per epoch) side by side, one torch thread, CPU seconds of the process:

* ``before``: as the callback was, the pooler tapped and its zero rows written to every shard;
* ``now``: the pooler is reported at the first period and no longer tapped, and no shard holds
  its rows (a layer all zero in a shard is not written);
* ``exclude``: ``GraSSCallback(exclude=["bert.pooler.dense"])``, what the report advises.

Prints the store's bytes, the CPU seconds of each epoch (training with capture) and of each
scoring period, and whether the three runs give the same scores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from period_cost import BATCH, EXAMPLES, VOCAB, Tokens  # noqa: E402  (random token sequences of 32)

POOLER = "bert.pooler.dense"


def build_module(layers: int):
    import lightning as L
    from transformers import BertConfig, BertModel

    class MeanPooled(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=384,
                             num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536)
            self.bert = BertModel(cfg)  # with its pooler, which this loss never uses
            self.head = torch.nn.Linear(384, 2)

        def training_step(self, batch, batch_idx):
            hidden = self.bert(input_ids=batch["input_ids"]).last_hidden_state
            return torch.nn.functional.cross_entropy(self.head(hidden.mean(1)), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    return MeanPooled


def run(variant: str, args: argparse.Namespace, root: Path) -> dict:
    import lightning as L

    import grass_callback.attribution as attribution
    from grass_callback import GraSSCallback, IndexedDataset
    from grass_callback.capture import LayerTaps
    from grass_callback.store import GradientStore

    class WriteAll(GradientStore):
        """The store as it was: every layer written to every shard, zero or not."""

        def _commit_buffered(self, n: int) -> None:
            self._consolidate()
            self._buf_nonzero = {k: [torch.ones_like(v[0])] for k, v in self._buf_nonzero.items()}
            super()._commit_buffered(n)

    saved = attribution.GradientStore, LayerTaps.skip
    if variant == "before":
        attribution.GradientStore, LayerTaps.skip = WriteAll, lambda self, names: None
    times: dict[str, list[float]] = {"epoch": [], "period": []}

    class Clock(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, *a):
            self.end = time.process_time()

        def on_train_epoch_end(self, trainer, pl_module):  # runs before GraSSCallback's (listed first)
            times["epoch"].append(self.end - self.t)

    try:
        L.seed_everything(0, verbose=False)
        train = IndexedDataset(Tokens(EXAMPLES, 0))
        grass = GraSSCallback(k=args.k, num_queries=16, exclude=[POOLER] if variant == "exclude" else None,
                              store_dir=root / variant, log_to_wandb=False, progress=False, damping_ratio=0.1,
                              query_loader=DataLoader(IndexedDataset(Tokens(16, 1)), batch_size=16))
        period_of = grass._score_period

        def timed_period(*a, **kw):
            t = time.process_time()
            period_of(*a, **kw)
            times["period"].append(time.process_time() - t)

        grass._score_period = timed_period
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[Clock(), grass],
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            num_sanity_val_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(build_module(args.layers)(), DataLoader(train, batch_size=BATCH))
        store_bytes = grass.store.size_bytes()
        ids, values = grass.data_value_tensors()
        return {"bytes": store_bytes, "rows": grass.store.num_rows, "layers": len(grass.taps.layers),
                "epoch": times["epoch"], "period": times["period"], "silent": list(grass.silent_layers),
                "top": grass.last_result.top_ids.clone(), "value": values[ids.argsort()].clone()}
    finally:
        attribution.GradientStore, LayerTaps.skip = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="BERT layers (MiniLM: 6)")
    parser.add_argument("--k", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {v: run(v, args, Path(tmp)) for v in ("before", "now", "exclude")}
    base = results["before"]
    print(f"BERT {args.layers} layers of width 384 + mean-pooled head, k = {args.k}, {EXAMPLES} examples x 2 epochs, "
          f"1 torch thread, CPU s")
    print(f"{'run':8} {'tapped':>6} {'store MB':>9} {'bytes/row':>9} {'epoch 0 s':>9} {'epoch 1 s':>9} "
          f"{'period 0 s':>10} {'period 1 s':>10}  silent")
    for name, r in results.items():
        print(f"{name:8} {r['layers']:6d} {r['bytes'] / 2**20:9.2f} {r['bytes'] / r['rows']:9.0f} "
              f"{r['epoch'][0]:9.2f} {r['epoch'][1]:9.2f} {r['period'][0]:10.2f} {r['period'][1]:10.2f}  {r['silent']}")
    saved = base["bytes"] - results["now"]["bytes"]
    print(f"store bytes saved: {saved} of {base['bytes']} ({100 * saved / base['bytes']:.1f}%; "
          f"the pooler's rows are {args.k} x 2 bytes of {args.k * base['layers'] * 2} per example)")
    for name in ("now", "exclude"):
        same_top = torch.equal(results[name]["top"], base["top"])
        diff = float((results[name]["value"] - base["value"]).abs().max() / base["value"].abs().max())
        print(f"{name} vs before: same top proponents {same_top}, data value max rel. difference {diff:.2e}")


if __name__ == "__main__":
    main()
