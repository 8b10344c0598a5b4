"""GraSSCallback under Lightning's FSDP strategies on GPUs, against an unsharded run (a device check).

    python benchmarks/gpu_fsdp.py --devices 1            # one GPU: FSDP wrapping with a single shard
    python benchmarks/gpu_fsdp.py --devices 2            # two GPUs: weights sharded across them

What runs on the CPU is tested in ``tests/test_sharded.py`` (FSDP2 ``fully_shard`` under gloo, by
hand and through ``ModelParallelStrategy``). Lightning's ``FSDPStrategy`` (FSDP1, flat parameters)
refuses a CPU accelerator and torch's FSDP1 needs an accelerator device, so this script is the
check for it: for each strategy (``fsdp``: ``FSDPStrategy(use_orig_params=True)``; ``fsdp2``:
``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``) it trains a small GPT-2-style
stack (``Linear`` and transformers' ``Conv1D``) with learning rate 0 for two epochs, then compares
the store's rows by (example, epoch) and the last period's top-k with an unsharded single-GPU
run. Prints one line per strategy and exits 1 on a mismatch. Each fit runs in its own subprocess
(Lightning re-launches the script for ranks > 0).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_CHILD = "--child"


def _fit(out: Path, strategy: str, devices: int) -> None:
    import lightning as L
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from transformers.pytorch_utils import Conv1D

    from grass_callback import GraSSCallback, IndexedDataset

    class Stack(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), Conv1D(96, 128), nn.Tanh(), nn.Linear(96, 10))

        def configure_model(self) -> None:
            mesh = getattr(self, "_device_mesh", None)
            if strategy != "fsdp2" or mesh is None:
                return
            from torch.distributed.fsdp import fully_shard

            for m in self.net:
                if hasattr(m, "weight"):
                    fully_shard(m, mesh=mesh["data_parallel"])
            fully_shard(self.net, mesh=mesh["data_parallel"])

        def training_step(self, batch, i):
            x, y, _ = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 64, generator=g), torch.randint(0, 10, (300,), generator=g)
    train = DataLoader(IndexedDataset(TensorDataset(x[:256], y[:256])), batch_size=32 // devices)
    val = DataLoader(IndexedDataset(TensorDataset(x[256:], y[256:])), batch_size=16)
    L.seed_everything(0, verbose=False)
    cb = GraSSCallback(k=256, num_queries=16, topk=5, store_dir=out / "grass", storage_dtype="float32",
                       progress=False, log_to_wandb=False, query_loader=val, damping_ratio=0.1)
    kw: dict = {"devices": devices}
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        kw["strategy"] = FSDPStrategy(use_orig_params=True)
    elif strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        kw["strategy"] = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    trainer = L.Trainer(max_epochs=2, accelerator="gpu", logger=False, enable_checkpointing=False, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out), **kw)
    trainer.fit(Stack(), train)
    if trainer.is_global_zero:
        torch.save(cb.last_result.to_dict(), out / "last.pt")


def _rows(out: Path) -> dict:
    from grass_callback.store import GradientStore

    rows = {}
    for chunk in GradientStore(out / "grass" / "train", readonly=True).iter_chunks():
        for j, (i, e) in enumerate(zip(chunk.ids.tolist(), chunk.epochs.tolist())):
            rows[(i, e)] = torch.cat([g[j] for g in chunk.grads.values()])
    return rows


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD:
        _fit(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategies", nargs="+", default=["fsdp", "fsdp2"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fsdp: no CUDA device; the CPU side of this check is tests/test_sharded.py")
        return 0
    ok = True
    with tempfile.TemporaryDirectory(prefix="grass-fsdp-") as tmp:
        runs = {"plain": 1, **{s: args.devices for s in args.strategies}}
        for name, devices in runs.items():
            out = Path(tmp) / name
            out.mkdir()
            env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
            proc = subprocess.run([sys.executable, __file__, _CHILD, str(out), name, str(devices)], env=env,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode:
                print(f"{name}: the fit failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                ok = False
        if not ok:
            return 1
        ref_rows, ref = _rows(Path(tmp) / "plain"), torch.load(Path(tmp) / "plain" / "last.pt", weights_only=False)
        for name in args.strategies:
            rows, last = _rows(Path(tmp) / name), torch.load(Path(tmp) / name / "last.pt", weights_only=False)
            same_keys = rows.keys() == ref_rows.keys()
            err = max(float((rows[k] - ref_rows[k]).abs().max() / ref_rows[k].abs().max().clamp_min(1e-12))
                      for k in ref_rows) if same_keys else float("nan")
            top = torch.equal(last["top_ids"], ref["top_ids"])
            good = same_keys and err < 1e-3 and top
            ok &= good
            print(f"{name} on {args.devices} GPU(s): {len(rows)} rows (unsharded {len(ref_rows)}), max relative row "
                  f"difference {err:.2e}, same top-5: {top} -> {'OK' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
