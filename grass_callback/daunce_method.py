"""Daunce (arXiv 2505.23223): attribution through the loss covariance of perturbed, fine-tuned copies.

Each of ``K`` copies starts from the trained weights ``θ0``, draws a random subset ``D_k`` of the
training set (ratio ``subsample``) and a weight ``ξ_i ~ U(0, 1)`` per example in it, and is
fine-tuned on the perturbed objective::

    (1/|D_k|) Σ_{i∈D_k} [ ℓ_i(θ) - 2 ξ_i ∇ℓ_i(θ0)ᵀ (θ - θ0) ]  +  (λ/2) ‖θ - θ0‖²

The linear term is one vector per copy, ``G_k = (2/|D_k|) Σ ξ_i ∇ℓ_i(θ0)``, taken by one backward
pass of the ξ-weighted loss at ``θ0``, so no per-example gradient is ever formed. Every copy's
per-example losses on the training and query examples are recorded; the score of training
example ``i`` for query ``q`` is their covariance across the copies, ``Cov_k(ℓ_q(θ_k), ℓ_i(θ_k))``.

Why this is influence: linearising around ``θ0``, ``θ_k - θ0 ≈ H⁻¹ (1/|D_k|) Σ ε_i ∇ℓ_i`` with
``ε_i = 2ξ_i - 1`` (mean 0, variance 1/3), so ``Cov(ℓ_q, ℓ_i) ≈ ∇ℓ_qᵀ H⁻¹ F H⁻¹ ∇ℓ_i / (3 r n)``,
which with ``H ≈ F`` is ``∇ℓ_qᵀ F⁻¹ ∇ℓ_i / (3 r n)``: the influence score up to a positive factor.
**Sign: a positive score means training on ``i`` lowers the query's loss** (a proponent), as for
FactGraSS; self-influence is the loss variance ``Var_k ℓ_i(θ_k)``.

Left out from the paper: the black-box variant (fine-tuning through an API with perturbed
targets), its LLM-specific settings and its hyper-parameter choices; the number of copies,
subsample ratio, fine-tuning length and ``λ`` here are options with small-model defaults.

Example::

    result = daunce(model, train_loader, query_loader,
                    loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), num_models=16)
    result.scores.top_ids          # [m, topk] proponents per query
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from grass_callback.console import open_bar, progress_iter
from grass_callback.data import get_batch_indices, move_to_device, optional_batch_indices, resolve_index_key
from grass_callback.errors import ConfigError, GraSSError
from grass_callback.scoring import ScoreResult, score_chunks

__all__ = ["daunce", "DaunceResult", "covariance_scores"]

#: ``loss_fn(model, batch) -> Tensor[B]``: one loss per example (``reduction="none"``).
PerExampleLoss = Callable[[nn.Module, Any], Tensor]


@dataclass
class DaunceResult:
    """What :func:`daunce` returns: the scores and the losses they come from.

    ``train_losses`` is ``[K, n]`` (column ``j`` is training id ``train_ids[j]``), ``query_losses``
    ``[K, m]``; row ``k`` is copy ``k``. ``subsets`` holds each copy's training ids.
    """

    scores: ScoreResult
    train_ids: Tensor
    train_losses: Tensor
    query_ids: Tensor
    query_losses: Tensor
    subsets: list[Tensor]


# ----------------------------------------------------------------------------- scores from losses


def covariance_scores(train_losses: Tensor, query_losses: Tensor, train_ids: Tensor, query_ids: Tensor, *,
                      topk: int = 10, full: bool = False) -> ScoreResult:
    """Scores ``Cov_k(ℓ_q, ℓ_i)`` (unbiased, ``1/(K-1)``) with top-k, data value and self-influence.

    ``train_losses [K, n]``, ``query_losses [K, m]``; self-influence is ``Var_k ℓ_i``.
    """
    K = train_losses.shape[0]
    if K < 2 or query_losses.shape[0] != K:
        raise ConfigError(f"covariances need at least 2 copies with losses for both sets, got {K} and "
                          f"{query_losses.shape[0]}.")
    t = train_losses.double() - train_losses.double().mean(0)
    q = (query_losses.double() - query_losses.double().mean(0)) / (K - 1)
    chunks = ((train_ids[a:a + 4096], {"loss": t[:, a:a + 4096].T}) for a in range(0, t.shape[1], 4096))
    result = score_chunks({"loss": q.T.contiguous()}, chunks, query_ids=query_ids, topk=topk, full=full)
    result.self_influence_ids = train_ids.clone()
    result.self_influence = (t.square().sum(0) / (K - 1)).to(result.top_scores.dtype)
    return result


# ----------------------------------------------------------------------------- per-copy pieces


def _check_losses(losses: Any, batch_size: int) -> Tensor:
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() != batch_size:
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise GraSSError(f"daunce needs loss_fn(model, batch) -> one loss per example, shape [{batch_size}]; got "
                         f"{got}. Use reduction='none' (e.g. F.cross_entropy(..., reduction='none')).")
    return losses


@torch.no_grad()
def _losses(model: nn.Module, loader: Iterable, loss_fn: PerExampleLoss, index_key: Any, device: Any,
            desc: str | None) -> tuple[Tensor, Tensor]:
    """``(ids [n], losses [n])`` of every example in ``loader`` (eval mode, no gradients)."""
    was = model.training
    model.eval()
    ids, out, seen = [], [], 0
    if desc is not None:  # the project's bars: beside Lightning's, quiet in pipes
        loader = progress_iter(loader, desc, True)
    try:
        for batch in loader:
            b_ids = optional_batch_indices(batch, index_key)
            if device is not None:
                batch = move_to_device(batch, device)
            losses = loss_fn(model, batch)
            if b_ids is None:
                b_ids = torch.arange(seen, seen + (losses.numel() if isinstance(losses, Tensor) else 0))
            losses = _check_losses(losses, b_ids.numel())
            ids.append(b_ids)
            out.append(losses.detach().float().cpu())
            seen += losses.numel()
    finally:
        model.train(was)
    return torch.cat(ids), torch.cat(out)


def _perturbation(model: nn.Module, loader: Iterable, loss_fn: PerExampleLoss, xi: Tensor, index_key: Any,
                  device: Any, count: int) -> list[Tensor]:
    """``G_k = (2/|D_k|) Σ_{i∈D_k} ξ_i ∇ℓ_i(θ0)`` per parameter (``xi[id]`` is 0 outside ``D_k``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    was = model.training
    model.eval()  # the gradient at θ0 as the losses are recorded: no dropout noise
    try:
        for batch in loader:
            ids = get_batch_indices(batch, index_key)
            if device is not None:
                batch = move_to_device(batch, device)
            with torch.enable_grad():
                losses = _check_losses(loss_fn(model, batch), ids.numel())
                weighted = (losses * xi[ids].to(losses)).sum() * (2.0 / count)
                grads = torch.autograd.grad(weighted, params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g
    finally:
        model.train(was)
    return total


def _objective(model: nn.Module, anchor: list[Tensor], linear: list[Tensor], l2: float, losses: Tensor) -> Tensor:
    """``mean ℓ_i(θ) - Gᵀ(θ - θ0) + (λ/2)‖θ - θ0‖²`` for one batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    shift = [p - a for p, a in zip(params, anchor)]
    obj = losses.mean() - sum((g * s).sum() for g, s in zip(linear, shift))
    if l2:
        obj = obj + 0.5 * l2 * sum(s.square().sum() for s in shift)
    return obj


class _CopyModule:
    """Builds the LightningModule that fine-tunes one perturbed copy (Lightning imported lazily)."""

    @staticmethod
    def make(model: nn.Module, anchor: list[Tensor], linear: list[Tensor], loss_fn: PerExampleLoss,
             optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer], l2: float) -> Any:
        import lightning as L

        class PerturbedCopy(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.copy = model
                for i, (a, g) in enumerate(zip(anchor, linear)):  # buffers: they follow the copy's device
                    self.register_buffer(f"anchor_{i}", a)
                    self.register_buffer(f"linear_{i}", g)

            def training_step(self, batch: Any, batch_idx: int) -> Tensor:
                a = [getattr(self, f"anchor_{i}") for i in range(len(anchor))]
                g = [getattr(self, f"linear_{i}") for i in range(len(linear))]
                return _objective(self.copy, a, g, l2, loss_fn(self.copy, batch))

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return optimizer(p for p in self.copy.parameters() if p.requires_grad)

        return PerturbedCopy()


def _fine_tune_plain(model: nn.Module, loader: Iterable, anchor: list[Tensor], linear: list[Tensor],
                     loss_fn: PerExampleLoss, optimizer: Callable, l2: float, steps: int, device: Any,
                     desc: str | None) -> None:
    opt = optimizer(p for p in model.parameters() if p.requires_grad)
    model.train()
    bar = open_bar(desc, True, total=steps) if desc is not None else None
    done = 0
    while done < steps:
        for batch in loader:
            if device is not None:
                batch = move_to_device(batch, device)
            opt.zero_grad(set_to_none=True)
            _objective(model, anchor, linear, l2, loss_fn(model, batch)).backward()
            opt.step()
            done += 1
            if bar is not None:
                bar.update(1)
            if done >= steps:
                break
    if bar is not None:
        bar.close()


# ----------------------------------------------------------------------------- the API


def daunce(model: nn.Module, train_loader: Any, query_loader: Iterable, loss_fn: PerExampleLoss, *,
           num_models: int = 16, subsample: float = 0.5, epochs: float = 1.0, lr: float = 0.01,
           l2: float = 0.0, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
           batch_size: int | None = None, topk: int = 10, seed: int = 0, index_key: str | int | None = None,
           use_lightning: bool = True, trainer_kwargs: Mapping[str, Any] | None = None,
           device: torch.device | str | None = None, full: bool = False, progress: bool = True) -> DaunceResult:
    """Daunce attribution of ``model`` (at its current weights, left unchanged) to its training data.

    Args:
        model: the trained model; it is copied ``num_models`` times, never changed.
        train_loader: a DataLoader over a map-style dataset whose batches carry dataset indices
            (:class:`~grass_callback.IndexedDataset`); copies are trained on random subsets of it.
        query_loader: batches of query examples (ids from their index field, else positions).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, one loss per example.
        num_models: copies ``K`` (the paper's main knob: quality grows with it).
        subsample: fraction ``r`` of the training set each copy is fine-tuned on.
        epochs: fine-tuning length, in passes over the copy's subset (fractions allowed).
        lr: learning rate of the default optimizer (SGD); ``optimizer(params)`` overrides it.
        l2: ``λ`` of the proximal term ``(λ/2)‖θ - θ0‖²`` (0: none; early stopping regularises).
        batch_size: fine-tuning batch size (default: the train loader's).
        topk: proponents and opponents per query. seed: subsets, ξ and data order.
        use_lightning: fine-tune each copy with its own ``lightning.Trainer`` (so ``trainer_kwargs``
            such as ``strategy="ddp"``, ``devices=`` apply); ``False``: a plain loop (faster for small
            models, same steps). trainer_kwargs: extra ``Trainer`` arguments.
        device: where the copies and batches go (default: where the model is).
        full: also return the ``[m, n]`` score matrix. progress: a progress bar per copy.

    Returns:
        :class:`DaunceResult`; ``scores`` is a :class:`~grass_callback.scoring.ScoreResult`
        (positive: training on the example lowers the query's loss; self-influence = loss variance).
    """
    if not isinstance(num_models, int) or num_models < 2:
        raise ConfigError(f"num_models must be an integer >= 2 (covariances across copies), got {num_models!r}.")
    if not 0 < subsample <= 1 or not epochs > 0 or not lr > 0 or l2 < 0:
        raise ConfigError(f"need 0 < subsample <= 1, epochs > 0, lr > 0, l2 >= 0; got {subsample}, {epochs}, {lr}, {l2}.")
    dataset = getattr(train_loader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        raise ConfigError("daunce needs a train DataLoader over a map-style dataset (copies train on subsets of it).")
    index_key = resolve_index_key(train_loader, index_key)
    batch_size = batch_size or train_loader.batch_size or 32
    collate = train_loader.collate_fn
    n = len(dataset)
    device = device if device is not None else next(model.parameters()).device
    optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=lr))
    ordered = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    gen = torch.Generator().manual_seed(seed)
    train_rows, query_rows, subsets, train_ids, query_ids = [], [], [], None, None
    for k in range(num_models):
        subset = torch.randperm(n, generator=gen)[:max(1, round(subsample * n))].sort().values
        xi = torch.zeros(n)
        xi[subset] = torch.rand(subset.numel(), generator=gen)
        order_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        part = torch.utils.data.Subset(dataset, subset.tolist())
        sub_loader = torch.utils.data.DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collate)
        fit_loader = torch.utils.data.DataLoader(part, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                                 generator=torch.Generator().manual_seed(order_seed))
        copy_model = copy.deepcopy(model).to(device)
        anchor = [p.detach().clone() for p in copy_model.parameters() if p.requires_grad]
        linear = _perturbation(copy_model, sub_loader, loss_fn, xi, index_key, device, subset.numel())
        steps = max(1, math.ceil(epochs * len(fit_loader)))
        desc = f"daunce: copy {k + 1}/{num_models}" if progress else None
        if use_lightning:
            _fine_tune_lightning(copy_model, fit_loader, anchor, linear, loss_fn, optimizer, l2, steps,
                                 progress, trainer_kwargs)
            copy_model.to(device)
        else:
            _fine_tune_plain(copy_model, fit_loader, anchor, linear, loss_fn, optimizer, l2, steps, device, desc)
        ids, tr = _losses(copy_model, ordered, loss_fn, index_key, device, f"{desc}: losses" if desc else None)
        q_ids, q = _losses(copy_model, query_loader, loss_fn, resolve_index_key(query_loader, None), device, None)
        if train_ids is not None and (not torch.equal(ids, train_ids) or not torch.equal(q_ids, query_ids)):
            raise GraSSError("the query loader gave other examples for another copy; it must not shuffle.")
        train_ids, query_ids = ids, q_ids
        train_rows.append(tr)
        query_rows.append(q)
        subsets.append(subset)
    train_losses, query_losses = torch.stack(train_rows), torch.stack(query_rows)
    scores = covariance_scores(train_losses, query_losses, train_ids, query_ids, topk=topk, full=full)
    return DaunceResult(scores=scores, train_ids=train_ids, train_losses=train_losses, query_ids=query_ids,
                        query_losses=query_losses, subsets=subsets)


def _fine_tune_lightning(model: nn.Module, loader: Iterable, anchor: list[Tensor], linear: list[Tensor],
                         loss_fn: PerExampleLoss, optimizer: Callable, l2: float, steps: int, progress: bool,
                         trainer_kwargs: Mapping[str, Any] | None) -> None:
    import lightning as L

    module = _CopyModule.make(model, anchor, linear, loss_fn, optimizer, l2)
    kwargs = {"max_steps": steps, "max_epochs": -1, "logger": False, "enable_checkpointing": False,
              "enable_model_summary": False, "enable_progress_bar": progress, "num_sanity_val_steps": 0,
              "accelerator": "auto", "devices": 1, **dict(trainer_kwargs or {})}
    L.Trainer(**kwargs).fit(module, train_dataloaders=loader)


# ----------------------------------------------------------------------------- command line


def module_per_example_loss(module: nn.Module, batch: Any) -> Tensor:
    """Per-example losses of a LightningModule: its ``per_example_loss(batch) -> [B]`` when it has one,
    else the loss ``training_step`` returns for each example on its own (slower, any module)."""
    if hasattr(module, "per_example_loss"):
        return module.per_example_loss(batch)
    from grass_callback.callback import training_step_loss

    size = _batch_size(batch)
    return torch.stack([training_step_loss(module, _take(batch, i)) for i in range(size)])


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    return next(_batch_size(v) for v in values if isinstance(v, (Tensor, Mapping, list, tuple)))


def _take(batch: Any, i: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[i:i + 1]
    if isinstance(batch, Mapping):
        return {k: _take(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take(v, i) for v in batch)
    return batch


def run_daunce_cli(args: Any) -> int:
    """``python -m grass_callback attribute --method daunce ...``: one checkpoint, the callback's tables."""
    import importlib
    import json
    from pathlib import Path

    from grass_callback.report import InfluenceReporter, make_renderer, resolve_wandb_run

    if len(args.ckpt) != 1:
        raise SystemExit(f"--method daunce perturbs one trained model: give one --ckpt, got {len(args.ckpt)}.")
    load = lambda spec: getattr(importlib.import_module(spec.partition(":")[0]), spec.partition(":")[2])  # noqa: E731
    module_cls, data_cls = load(args.model), load(args.data)
    dm = data_cls(**json.loads(args.data_args))
    dm.setup("fit")
    train_ds = dm.train_dataloader().dataset
    batch_size = args.batch_size or 64
    train = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=False)
    val = dm.val_dataloader()
    query_ds = torch.utils.data.Subset(val.dataset, range(min(args.num_queries, len(val.dataset))))
    query = torch.utils.data.DataLoader(query_ds, batch_size=batch_size)
    model = module_cls.load_from_checkpoint(args.ckpt[0], map_location="cpu")
    result = daunce(model, train, query, module_per_example_loss, num_models=args.num_models, epochs=args.epochs,
                    topk=args.topk, seed=args.seed, progress=not args.quiet)
    out = Path(args.out)
    run = None if args.no_wandb else resolve_wandb_run(save_dir=str(out), project="grass-callback",
                                                         config={"method": "daunce", "checkpoint": args.ckpt[0]})
    reporter = InfluenceReporter(out / "scores", run, renderer=make_renderer(),
                                 train_example=lambda i: train_ds[int(i)], query_example=lambda i: query_ds[int(i)])
    folder = reporter.report(result.scores, step=0, period=f"daunce-{args.num_models}")
    reporter.finish()
    print(f"Daunce scores ({args.num_models} copies) written to {folder}")
    return 0
