"""On a CUDA GPU: the fused kernels, the op's contract and the callback end to end.

Every test skips with a reason when torch sees no CUDA GPU (the development machines have none:
this file has never run there). ``benchmarks/gpu_check.sh`` runs it on a GPU machine:

* ``torch.ops.grass_callback.factgrass`` on CUDA against a float64 reference over a
  (dtype, atol, rtol) table on the emulator's awkward shapes and two real layer sizes, tf32 on and
  off; two calls bit-identical; bad inputs rejected; ``torch.library.opcheck``;
* the callback in a real ``Trainer(precision="bf16-mixed")`` on the GPU: its stored rows against
  exact per-example gradients (float64 autograd, dense sketch built by loops), and no host sync
  in any training step (``torch.cuda.set_sync_debug_mode("error")`` from the third step on,
  around every callback hook of the step, on a tiny GPT-2).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_kernel import DTYPE_IDS, DTYPE_TOLERANCES, assert_matches, cases_for_gpu, expected_for, make_inputs  # noqa: E402

# benchmarks/gpu_check.sh sets GRASS_REQUIRE_GPU=1: there a missing GPU fails instead of skipping
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("GRASS_REQUIRE_GPU") != "1",
                               reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
pytestmark = needs_gpu

GPU_CASES = cases_for_gpu()


@pytest.fixture(scope="module")
def cuda_op():
    from grass_callback.ops import _library

    _library.load(raise_on_error=True)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("grass_callback::factgrass", "CUDA"), (
        "torch.ops.grass_callback.factgrass has no CUDA kernel: csrc/factgrass_cuda.cu and "
        "csrc/factgrass_cuda_binding.cpp were not built")
    return torch.ops.grass_callback.factgrass


class _Tf32:
    """torch.backends.cuda.matmul.allow_tf32 set for a block (the binding follows it)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.before


def _on_cuda(inputs: dict) -> list:
    cuda = {key: (v.cuda() if isinstance(v, torch.Tensor) else v) for key, v in inputs.items()}
    return [cuda["x"], cuda["grad_out"], cuda["in_idx"], cuda["out_idx"], cuda["bucket"], cuda["weight"],
            cuda["k"], cuda["scale"]]


@pytest.mark.parametrize("dtype,tf32,atol,rtol", DTYPE_TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_kernel_matches_reference(cuda_op, name, dtype, tf32, atol, rtol):
    case = GPU_CASES[name]
    inputs = make_inputs(case, dtype)
    want = expected_for(inputs, tf32)
    with _Tf32(tf32):
        got = cuda_op(*_on_cuda(inputs))
    assert got.is_cuda and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grow = max(1.0, math.sqrt(case.T))  # float32 sums over T tokens
    assert_matches(got.cpu(), want, atol * grow, rtol * grow, f"gpu {name}/{dtype}/tf32={tf32}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_gpu_kernel_is_deterministic(cuda_op, dtype):
    inputs = make_inputs(GPU_CASES["paper_plan_coordinatewise"], dtype)
    args = _on_cuda(inputs)
    first, second = cuda_op(*args), cuda_op(*args)
    assert torch.equal(first.view(torch.int32), second.view(torch.int32))


def test_gpu_kernel_rejects_bad_inputs(cuda_op):
    args = _on_cuda(make_inputs(GPU_CASES["basic"], torch.float32))
    for position, bad, match in ((1, args[1].double(), "grad_out"), (4, args[4].long(), "bucket"),
                                 (2, args[2].cpu(), "in_idx")):
        broken = list(args)
        broken[position] = bad
        with pytest.raises(RuntimeError, match=match):
            cuda_op(*broken)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_gpu_opcheck(cuda_op, dtype):
    args = tuple(_on_cuda(make_inputs(GPU_CASES["runs_straddle"], dtype)))
    torch.library.opcheck(torch.ops.grass_callback.factgrass.default, args)
    torch.library.opcheck(torch.ops.grass_callback.factgrass.default, args[:-1] + (None,))


def test_gpu_factgrass_api_on_a_plan(cuda_op):
    """ops.factgrass(impl="cuda") on a real plan equals impl="torch" on the same device."""
    from grass_callback.ops import factgrass
    from grass_callback.projection import FactGraSSPlan

    plan = FactGraSSPlan(d_in=768, d_out=3072, bias=True, k=1024, seed=1, name="mlp.c_fc")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, 768, generator=g).to("cuda", torch.bfloat16)
    grad = torch.randn(4, 128, 3072, generator=g).to("cuda", torch.bfloat16)
    got = factgrass(x, grad, plan, scale=2.0, impl="cuda")
    want = factgrass(x, grad, plan, scale=2.0, impl="torch")
    assert_matches(got.cpu(), want.cpu(), 1e-3, 1e-4, "ops.factgrass cuda vs torch")


# ---------------------------------------------------------------------------------------------
# the callback in a real Trainer on the GPU


def _mlp_fit(tmp_path: Path, precision: str, accelerator: str = "gpu"):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from grass_callback import GraSSCallback, IndexedDataset
    from test_callback import TinyModule

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    train = DataLoader(IndexedDataset(TensorDataset(x[:32], y[:32])), batch_size=16)
    query = DataLoader(IndexedDataset(TensorDataset(x[32:], y[32:])), batch_size=8)
    cb = GraSSCallback(k=16, num_queries=4, topk=3, store_dir=tmp_path / "grass", storage_dtype="float32",
                       damping_ratio=1.0, progress=False, log_to_wandb=False, query_loader=query)
    model = TinyModule()
    start = copy.deepcopy(model).cpu()
    trainer = L.Trainer(max_steps=1, accelerator=accelerator, devices=1, precision=precision, logger=False,
                        callbacks=[cb], default_root_dir=str(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, train)
    return cb, start, train.dataset


def check_rows_equal_exact(tmp_path: Path, precision: str, accelerator: str, rel: float) -> None:
    """The first step's stored rows vs exact per-example gradients at the initial weights."""
    from grass_callback.attribution import plans_from_store
    from grass_callback.store import GradientStore
    from test_independent_refs import exact_query_rows, store_rows

    cb, start, dataset = _mlp_fit(tmp_path, precision, accelerator)
    rows = store_rows(Path(cb.store.path))
    plans = plans_from_store(GradientStore(cb.store.path, readonly=True))
    ids = rows["ids"].tolist()
    assert sorted(ids) == list(range(16)), ids
    want = exact_query_rows(start, plans, [dataset[i][:2] for i in ids])
    for name, expected in want.items():
        got = rows[f"g/{name}"]
        err = (got - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-12)
        assert float(err.max()) < rel, f"{name}: relative row errors {err.tolist()}"


def test_gpu_callback_bf16_mixed_rows_equal_exact_gradients(tmp_path):
    # bf16 autocast: the layer inputs and output gradients carry about 3 significant digits
    check_rows_equal_exact(tmp_path, "bf16-mixed", "gpu", rel=3e-2)


def _token_model():
    """A tiny token model of plain torch layers (no library code that could sync on its own)."""
    import lightning as L
    import torch.nn.functional as F
    from torch import nn

    class TokenMLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Embedding(97, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32),
                                     nn.Linear(32, 97))

        def training_step(self, batch, batch_idx):
            tokens = batch[0]                                  # [B, T] (then targets, indices)
            logits = self.net(tokens[:, :-1])                  # [B, T - 1, 97]
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return TokenMLP()


def test_gpu_callback_bf16_mixed_no_host_sync_per_step(tmp_path):
    """From the third step on, every training step (the callback's hooks and layer taps, forward,
    backward and the optimizer) runs under torch.cuda.set_sync_debug_mode("error"): a host sync
    anywhere in the step raises. Tokens [B, T] through linear layers: the [B, T, d] kernel path."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from grass_callback import GraSSCallback, IndexedDataset

    steps_guarded = []

    class Arm(Callback):  # first in the list: on before the callback's batch-start hook
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 2:
                torch.cuda.set_sync_debug_mode("error")

    class Disarm(Callback):  # last in the list: off after the callback's batch-end hook
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.get_sync_debug_mode() != 0:
                steps_guarded.append(batch_idx)
            torch.cuda.set_sync_debug_mode("default")

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (72, 32), generator=g)
    train = DataLoader(IndexedDataset(TensorDataset(tokens[:64], tokens[:64, 0])), batch_size=8)
    query = DataLoader(IndexedDataset(TensorDataset(tokens[64:], tokens[64:, 0])), batch_size=8)
    cb = GraSSCallback(k=64, num_queries=4, topk=3, store_dir=tmp_path / "grass", damping_ratio=1.0,
                       progress=False, log_to_wandb=False, query_loader=query)
    trainer = L.Trainer(max_epochs=1, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                        callbacks=[Arm(), cb, Disarm()], default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    try:
        trainer.fit(_token_model(), train)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps_guarded == list(range(2, 8)), steps_guarded
    from test_independent_refs import store_rows

    rows = store_rows(Path(cb.store.path))  # every example's rows reached the store
    assert sorted(rows["ids"].tolist()) == list(range(64))
    assert all(bool(t.isfinite().all()) and float(t.abs().sum()) > 0 for key, t in rows.items() if key.startswith("g/"))


def check_dual_fisher_on(device: str) -> None:
    """A period of fewer rows than k/2 on ``device``: the statistics keep the rows there (float32,
    the GPU's product dtype), the fit solves through their kernel, and the solves, self-influence
    and condition number equal a float64 dense inverse of the same float32 rows on the CPU."""
    from grass_callback.fisher import FisherStats

    gen = torch.Generator().manual_seed(0)
    k, n = 256, 96
    rows = (torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64))
    keep = torch.ones(n, dtype=torch.bool)
    keep[[5, 50]] = False
    stats = FisherStats({"a": k}, device=device)
    for b in range(0, n, 16):
        stats.update({"a": rows[b:b + 16].float().to(device)}, keep=keep[b:b + 16].to(device))
    ref = rows.float().double() * keep[:, None]  # what the statistics hold: float32 rows, dropped ones zero
    count = int(keep.sum())
    fisher = ref.T @ ref / count
    q = torch.randn(4, k, generator=gen, dtype=torch.float64)
    for rows_dtype, tol in ((None, 1e-9), (torch.bfloat16, torch.finfo(torch.bfloat16).eps / 4)):
        fitted = stats.fit(0.1, rows_dtype=rows_dtype)
        block = fitted.duals["a"]
        assert block.device.type == torch.device(device).type
        assert block.dtype == (torch.float64 if rows_dtype is None else torch.float32)
        damped = fisher + fitted.damping["a"] * torch.eye(k, dtype=torch.float64)
        want = torch.linalg.solve(damped, q.T).T
        got = fitted.solve({"a": q.to(device)})["a"].cpu().double()
        assert float(((got - want).norm(dim=1) / want.norm(dim=1)).max()) < tol
        some = ref[keep][:8]  # rows the statistics counted
        self_want = (some @ torch.linalg.inv(damped) * some).sum(1)
        self_got = fitted.quadratic({"a": some.float().to(device)})
        assert float(((self_got - self_want).abs() / self_want).max()) < tol
        eig = torch.linalg.eigvalsh(damped)
        assert fitted.condition_numbers(exact=True)["a"] == pytest.approx(float(eig[-1] / eig[0]), rel=1e-6)


def test_gpu_dual_fisher_matches_the_dense_float64_inverse():
    check_dual_fisher_on("cuda")
