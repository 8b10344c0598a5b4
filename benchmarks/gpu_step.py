"""Training-step cost of the callback on a GPU: a 12-layer GPT-2 at sequence 1024, with vs without.

    python benchmarks/gpu_step.py                    # B = 8, T = 1024, k = 1024, bf16-mixed
    python benchmarks/gpu_step.py --batch 16 --rounds 3 --json out/gpu_step.json

Needs a CUDA GPU. The model is GPT-2 small's shape (12 layers, 768 wide, 50257 tokens; random
weights, built offline from a config) trained with AdamW in ``precision="bf16-mixed"`` on random
tokens. Each round runs a plain ``Trainer`` and one with ``GraSSCallback`` (every Conv1D/Linear
layer tapped, ``k`` per layer, the default masks, rows stored as float16) for ``--warmup`` +
``--steps`` steps each, in turn. A step is timed on the GPU between two CUDA events recorded at
``on_train_batch_start`` and ``on_train_batch_end`` (forward, backward, the callback's capture and
recording, the optimizer), without any host sync inside the steps. Printed: the median and mean
step of each run, and the ratio callback / plain as the ratio of medians and of means (target
<= 1.05). The scoring pass at the end of each callback run is not timed (it is reported by the
callback itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per example (default 1024)")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (default 12)")
    p.add_argument("--k", type=int, default=1024, help="compressed size per layer (default 1024)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="plain/callback run pairs (default 2)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # the script's logic on a CPU
    return p.parse_args(argv)


def _module(layers: int, seq: int, width: int = 768, vocab: int = 50257):
    import lightning as L
    from transformers import GPT2Config, GPT2LMHeadModel

    class GPT2(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_positions=seq, n_embd=width, n_head=width // 64,
                                                  vocab_size=vocab))

        def training_step(self, batch, batch_idx):
            tokens = batch[0]
            return self.net(input_ids=tokens, labels=tokens).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    return GPT2()


class _WallEvent:
    """torch.cuda.Event's timing interface on the host clock (for --cpu-smoke)."""

    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def elapsed_time(self, end: "_WallEvent") -> float:
        return (end.t - self.t) * 1e3


def _timer(cuda: bool):
    from lightning.pytorch.callbacks import Callback

    event = torch.cuda.Event if cuda else _WallEvent

    class StepTimer(Callback):
        """CUDA events around each training step; read once, after training."""

        def __init__(self):
            self.events: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            start = event(enable_timing=True)
            start.record()
            self.events.append((start, event(enable_timing=True)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.events[-1][1].record()

        def milliseconds(self) -> list[float]:
            if cuda:
                torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self.events]

    return StepTimer()


def run_once(args: argparse.Namespace, with_callback: bool, workdir: Path) -> list[float]:
    """Per-step milliseconds of the timed steps of one training run."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from grass_callback import GraSSCallback, IndexedDataset

    n = (args.warmup + args.steps) * args.batch
    g = torch.Generator().manual_seed(0)
    vocab, width = (97, 64) if args.cpu_smoke else (50257, 768)
    tokens = torch.randint(0, vocab, (n + 8, args.seq), generator=g)
    train = DataLoader(IndexedDataset(TensorDataset(tokens[:n], tokens[:n, 0])), batch_size=args.batch)
    query = DataLoader(IndexedDataset(TensorDataset(tokens[n:], tokens[n:, 0])), batch_size=4)
    timer = _timer(not args.cpu_smoke)
    callbacks = [timer]
    if with_callback:
        callbacks.insert(0, GraSSCallback(k=args.k, num_queries=4, topk=3, store_dir=workdir / "grass",
                                          damping_ratio=1.0, progress=False, log_to_wandb=False,
                                          query_loader=query))
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator="cpu" if args.cpu_smoke else "gpu",
                        devices=1, precision="bf16-mixed",
                        logger=False, callbacks=callbacks, default_root_dir=str(workdir),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    trainer.fit(_module(args.layers, args.seq, width, vocab), train)
    return timer.milliseconds()[args.warmup:]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.cpu_smoke:
        args.layers, args.seq, args.batch, args.steps, args.warmup, args.rounds, args.k = 1, 32, 2, 2, 1, 1, 64
    elif not torch.cuda.is_available():
        print("gpu_step: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.", file=sys.stderr)
        return 2
    device = "CPU (smoke run)" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"gpu_step: {device} | GPT-2 {args.layers} layers, B={args.batch}, T={args.seq}, "
          f"k={args.k}, bf16-mixed | {args.steps} timed steps after {args.warmup} per run, {args.rounds} rounds",
          flush=True)
    runs: dict[str, list[float]] = {"plain": [], "callback": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in ("plain", "callback"):
                ms = run_once(args, name == "callback", Path(tmp) / f"{name}-{r}")
                runs[name] += ms
                print(f"gpu_step: round {r} {name:8s} median {statistics.median(ms):8.2f} ms  "
                      f"mean {statistics.fmean(ms):8.2f} ms  max {max(ms):8.2f} ms", flush=True)
    med = {name: statistics.median(ms) for name, ms in runs.items()}
    mean = {name: statistics.fmean(ms) for name, ms in runs.items()}
    figures = {"median_ms": med, "mean_ms": mean, "ratio_of_medians": med["callback"] / med["plain"],
               "ratio_of_means": mean["callback"] / mean["plain"], "steps": {n: len(v) for n, v in runs.items()}}
    print(f"gpu_step: step ratio callback/plain = {figures['ratio_of_medians']:.3f} (medians), "
          f"{figures['ratio_of_means']:.3f} (means); plain {med['plain']:.2f} ms, callback {med['callback']:.2f} ms "
          f"(target <= 1.05)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
