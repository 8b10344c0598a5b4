"""MLP workloads of the quality suite: offline data, many MLPs trained at once, per-example factors.

Every model of a workload (the full-data model, each subset model, the flipped-label model) is
trained by one recipe from one shared initialisation, so a model is a function of its training
subset and the minibatch order: AdamW on minibatches for ``epochs`` epochs, the learning rate
warmed up for one epoch and cosine-decayed to zero (so a TracIn learning-rate weighting differs
from a plain sum). ``M`` subset models train at once as batched parameters ``[M, ...]``: batch
``b`` of model ``j`` is ``subset_j[perm_e[b]]`` with one permutation ``perm_e`` of subset
positions per epoch shared by all models (each model still sees its own examples).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grass_callback.projection import LayerShape

__all__ = ["load_data", "MLP", "init_params", "train_models", "lr_at", "margins", "to_module",
           "mlp_factors", "mlp_shapes", "flip_labels"]


# ----------------------------------------------------------------------------- data


def load_data(cfg: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train [n, d], y_train [n], X_query [m, d], y_query [m])`` of a workload config."""
    if cfg["data"] == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    elif cfg["data"] == "teacher":
        X, y = _teacher_data(cfg)
    else:
        raise ValueError(f"unknown data {cfg['data']!r}")
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(cfg["split_seed"]))
    tr, te = perm[: cfg["n_train"]], perm[cfg["n_train"]: cfg["n_train"] + cfg["n_queries"]]
    return X[tr], y[tr], X[te], y[te]


def _teacher_data(cfg: dict) -> tuple[Tensor, Tensor]:
    """Gaussian inputs labelled by a random tanh teacher MLP with Gumbel noise on its logits."""
    gen = torch.Generator().manual_seed(cfg["data_seed"])
    n, d, h, c = cfg["n_train"] + cfg["n_queries"], cfg["dim"], cfg["teacher_width"], cfg["classes"]
    X = torch.randn(n, d, generator=gen)
    W1 = torch.randn(d, h, generator=gen) / math.sqrt(d)
    W2 = torch.randn(h, c, generator=gen) * 2 / math.sqrt(h)
    logits = torch.tanh(2 * X @ W1) @ W2
    gumbel = -torch.log(-torch.log(torch.rand(n, c, generator=gen).clamp_min(1e-12)))
    return X, (logits + cfg["label_noise"] * gumbel).argmax(1)


def flip_labels(y: Tensor, fraction: float, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(y with `fraction` of labels changed to another class, flipped [n] bool)``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: int(round(fraction * n))]] = True
    out = y.clone()
    out[flipped] = (y[flipped] + torch.randint(1, classes, (int(flipped.sum()),), generator=gen)) % classes
    return out, flipped


# ----------------------------------------------------------------------------- models


def _dims(cfg: dict) -> list[int]:
    return [cfg["dim"], *cfg["widths"], cfg["classes"]]


class MLP(nn.Module):
    """``fc1 .. fcL`` (``nn.Linear`` with biases), ReLU between them."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.names = [f"fc{i + 1}" for i in range(len(dims) - 1)]
        for name, d_in, d_out in zip(self.names, dims, dims[1:]):
            setattr(self, name, nn.Linear(d_in, d_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, name in enumerate(self.names):
            x = getattr(self, name)(x)
            if i < len(self.names) - 1:
                x = torch.relu(x)
        return x


def init_params(cfg: dict) -> list[Tensor]:
    """PyTorch's default Linear initialisation from one seed: ``[W1, b1, W2, b2, ...]``."""
    gen = torch.Generator().manual_seed(cfg["init_seed"])
    out = []
    dims = _dims(cfg)
    for d_in, d_out in zip(dims, dims[1:]):
        bound = 1.0 / math.sqrt(d_in)
        out.append((torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound)
        out.append((torch.rand(d_out, generator=gen) * 2 - 1) * bound)
    return out


def batched_forward(params: list[Tensor], X: Tensor) -> Tensor:
    """``X [M, b, d]`` through ``M`` MLPs at once -> logits ``[M, b, classes]``."""
    h = X
    L = len(params) // 2
    for i in range(L):
        W, b = params[2 * i], params[2 * i + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))
        if i < L - 1:
            h = torch.relu(h)
    return h


def lr_at(cfg: dict, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): one warm-up epoch, cosine to zero."""
    warm = steps_per_epoch
    if step < warm:
        return cfg["lr"] * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_orders(cfg: dict, size: int) -> list[Tensor]:
    """The minibatch order of every epoch over ``size`` positions (shared by all models)."""
    gen = torch.Generator().manual_seed(cfg["order_seed"])
    return [torch.randperm(size, generator=gen) for _ in range(cfg["epochs"])]


def train_models(cfg: dict, X: Tensor, y: Tensor, subsets: Tensor, *, checkpoints: bool = False) -> Any:
    """Train one model per row of ``subsets [M, s]`` (indices into ``X``, ``y``) at once.

    Returns the final parameters ``[M, ...]`` per tensor, or with ``checkpoints=True`` also the
    parameters at every epoch end and the mean learning rate of every epoch.
    """
    M, s = subsets.shape
    params = [p.unsqueeze(0).repeat(M, *([1] * p.dim())).requires_grad_(True) for p in init_params(cfg)]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    b = cfg["batch"]
    per_epoch = math.ceil(s / b)
    total, step = per_epoch * cfg["epochs"], 0
    saved, lrs = [], []
    for order in epoch_orders(cfg, s):
        epoch_lrs = []
        for start in range(0, s, b):
            rows = subsets[:, order[start:start + b]]  # [M, b] dataset indices
            lr = lr_at(cfg, step, total, per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            epoch_lrs.append(lr)
            logits = batched_forward(params, X[rows])
            loss = F.cross_entropy(logits.flatten(0, 1), y[rows].flatten(), reduction="none").view(M, -1).mean(1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        if checkpoints:
            saved.append([p.detach().clone() for p in params])
            lrs.append(sum(epoch_lrs) / len(epoch_lrs))
    final = [p.detach() for p in params]
    return (final, saved, lrs) if checkpoints else final


def margins(params: list[Tensor], X: Tensor, y: Tensor) -> Tensor:
    """Correct-class margins ``[M, m]``: ``z_y - logsumexp_{c != y} z_c`` (larger = better)."""
    with torch.no_grad():
        logits = batched_forward(params, X.expand(params[0].shape[0], -1, -1))
        idx = y.view(1, -1, 1).expand(logits.shape[0], -1, 1)
        correct = logits.gather(2, idx).squeeze(-1)
        others = logits.scatter(2, idx, float("-inf")).logsumexp(-1)
    return correct - others


def to_module(cfg: dict, params: list[Tensor], j: int = 0) -> MLP:
    model = MLP(_dims(cfg))
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value[j] if value.dim() > p.dim() else value)
    return model


def mlp_shapes(cfg: dict) -> dict[str, LayerShape]:
    dims = _dims(cfg)
    return {f"fc{i + 1}": LayerShape(d_in, d_out, True) for i, (d_in, d_out) in enumerate(zip(dims, dims[1:]))}


def mlp_factors(cfg: dict, params: list[Tensor], X: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-example ``(x [N, 1, d_in], δ [N, 1, d_out])`` of every layer for each example's own
    cross-entropy (the gradient a training step sees, scaled to one example)."""
    from grass_callback.selective import collect_factors

    model = to_module(cfg, params)
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum")  # noqa: E731
    return collect_factors(model, [(X, y)], loss_fn, reduction="sum", max_examples=len(X))
