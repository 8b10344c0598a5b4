"""What returning per-example losses costs a training step through the callback (CPU), side by side.

    nice -n 5 .venv/bin/python benchmarks/loss_step.py              # 6 fits each way, interleaved
    nice -n 5 .venv/bin/python benchmarks/loss_step.py --fits 10

The removal benchmark's MLP (teacher data, 48-256-128-256-10 on 32 inputs, 2000 training
examples, batch 64: 32 steps an epoch) trained by Lightning through :class:`GraSSCallback` at
its defaults (k = 1024 on 4 layers, a store, W&B off, 16 queries scored at each epoch end), for 3
epochs, once with ``training_step`` returning ``{"loss", "per_example_loss"}`` and once returning
the loss alone. Fits alternate (with, without, with, ...); one thread; process CPU time. A step is
timed from ``on_train_batch_start`` to ``on_train_batch_end`` of a callback placed after the
GraSS callback, so it holds the forward, the backward with its compression hooks, the optimizer
step and the callback's recording of the rows (and of the losses). The scoring periods are not in
it. Printed: the median and mean step of each variant over all fits' steps after the first epoch,
and with / without as the ratio of medians and the ratio of means.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fit(losses: bool, epochs: int) -> list[float]:
    import lightning as L

    from benchmarks.quality import removal
    from benchmarks.quality.ensemble import _EpochOrder, _module
    from grass_callback import GraSSCallback, IndexedDataset

    cfg = removal.WORKLOADS["r-flip20"]
    data = removal.load(cfg)
    n = len(data["Xtr"])
    module = _module({**cfg, "epochs": epochs}, n, losses=losses)
    loader = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(data["Xtr"], data["ytr"])),
                                         batch_sampler=_EpochOrder(cfg, n))
    queries = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(data["Xval"][:16],
                                                                                         data["yval"][:16])),
                                          batch_size=16)

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch > 0:  # the first epoch builds and warms up
                self.seconds.append(time.process_time() - self._t)

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="loss-step-") as store:
        grass = GraSSCallback(k=cfg["k"], num_queries=16, query_loader=queries, log_to_wandb=False, progress=False,
                              store_dir=store)
        trainer = L.Trainer(max_epochs=epochs, callbacks=[grass, clock], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=store)
        trainer.fit(module, loader)
        if losses:
            assert grass.training_loss[0].numel() == n  # the losses were taken
    return clock.seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fits", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    F.cross_entropy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))  # import warm-up
    steps: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * args.fits):
        losses = i % 2 == 0
        steps[losses] += _fit(losses, args.epochs)
    for losses, label in ((True, "with per_example_loss"), (False, "loss only")):
        xs = steps[losses]
        print(f"{label}: {len(xs)} steps, median {1e3 * statistics.median(xs):.2f} ms, "
              f"mean {1e3 * statistics.fmean(xs):.2f} ms")
    w, wo = steps[True], steps[False]
    print(f"with / without: ratio of medians {statistics.median(w) / statistics.median(wo):.3f}, "
          f"ratio of means {statistics.fmean(w) / statistics.fmean(wo):.3f}")


if __name__ == "__main__":
    main()
