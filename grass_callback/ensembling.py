"""How the in-run ensemble weighs its scoring periods (``GraSSCallback(ensemble_weighting=...)``).

The callback sums each scoring period's score matrix (TracIn / TRAK-style checkpoint ensemble).
``"uniform"`` adds every period with weight 1. ``"lr"`` weighs a period by the mean learning
rate of the optimizer steps it stored (TracIn: each checkpoint's term is scaled by the step
size in force around it), read from the trainer's first optimizer (no host synchronisation: a
Python float per step, or, for a tensor learning rate such as a capturable optimizer's on a GPU, a
running device tensor read once, when the period ends). The choice of default is measured by ``python -m benchmarks.quality
--ensemble`` on the reporting half.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ENSEMBLE_WEIGHTINGS", "PeriodLearningRate", "current_lr"]

ENSEMBLE_WEIGHTINGS = ("uniform", "lr")


def current_lr(trainer: Any) -> float | Tensor | None:
    """The learning rate of the trainer's first optimizer's first parameter group, if any (a
    tensor learning rate is returned as the tensor, detached: reading it would sync on a GPU)."""
    optimizers = getattr(trainer, "optimizers", None) or []
    if not optimizers or not optimizers[0].param_groups:
        return None
    lr = optimizers[0].param_groups[0].get("lr")
    if isinstance(lr, Tensor):
        return lr.detach()
    return float(lr) if lr is not None else None


class PeriodLearningRate:
    """Mean learning rate over the training steps of the current scoring period."""

    def __init__(self) -> None:
        self.total: float | Tensor = 0.0
        self.steps = 0

    def observe(self, trainer: Any) -> None:
        lr = current_lr(trainer)
        if lr is None:
            return
        if isinstance(lr, Tensor):  # summed where it lives, read at the period's end
            wide = torch.float32 if lr.device.type == "mps" else torch.float64
            lr = lr.to(wide).reshape(())
        self.total = self.total + lr
        self.steps += 1

    def weight(self, weighting: str) -> float:
        """The period's ensemble weight under ``weighting`` (1 when no learning rate was seen)."""
        if weighting == "uniform" or self.steps == 0:
            return 1.0
        return float(self.total) / self.steps

    def reset(self) -> None:
        self.total, self.steps = 0.0, 0

    def state_dict(self) -> dict[str, float]:
        return {"total": float(self.total), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.steps = float(state.get("total", 0.0)), int(state.get("steps", 0))
