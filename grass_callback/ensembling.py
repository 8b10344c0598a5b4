"""How the in-run ensemble weighs its scoring periods (``GraSSCallback(ensemble_weighting=...)``).

The callback sums each scoring period's score matrix (TracIn / TRAK-style checkpoint ensemble).
``"uniform"`` adds every period with weight 1. ``"lr"`` weighs a period by the mean learning
rate of the optimizer steps it stored (TracIn: each checkpoint's term is scaled by the step
size in force around it), read from the trainer's first optimizer (no host synchronisation: a
Python float per step). The choice of default is measured by ``python -m benchmarks.quality
--ensemble`` on the reporting half.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENSEMBLE_WEIGHTINGS", "PeriodLearningRate", "current_lr"]

ENSEMBLE_WEIGHTINGS = ("uniform", "lr")


def current_lr(trainer: Any) -> float | None:
    """The learning rate of the trainer's first optimizer's first parameter group, if any."""
    optimizers = getattr(trainer, "optimizers", None) or []
    if not optimizers or not optimizers[0].param_groups:
        return None
    lr = optimizers[0].param_groups[0].get("lr")
    if hasattr(lr, "item"):  # a tensor learning rate
        lr = float(lr.detach().cpu())
    return float(lr) if lr is not None else None


class PeriodLearningRate:
    """Mean learning rate over the training steps of the current scoring period."""

    def __init__(self) -> None:
        self.total, self.steps = 0.0, 0

    def observe(self, trainer: Any) -> None:
        lr = current_lr(trainer)
        if lr is not None:
            self.total += lr
            self.steps += 1

    def weight(self, weighting: str) -> float:
        """The period's ensemble weight under ``weighting`` (1 when no learning rate was seen)."""
        if weighting == "uniform" or self.steps == 0:
            return 1.0
        return self.total / self.steps

    def reset(self) -> None:
        self.total, self.steps = 0.0, 0

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.steps = float(state.get("total", 0.0)), int(state.get("steps", 0))
