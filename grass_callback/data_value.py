"""Per-example data values from a run's scoring periods: which training examples to drop or fix.

Notation: scoring period ``p = 1..P`` has the score matrix ``S_p[q, i]`` (query ``q``, training
example ``i``; positive = training on ``i`` lowers the query's loss, :mod:`grass_callback.scoring`),
computed over the rows the period stored (``seen_p``: the examples stored in that period), the
self-influence ``SI_p[i] = s_p(i, i)`` and a period weight ``w_p`` (1, or the period's mean learning
rate under ``ensemble_weighting="lr"``). Examples a period did not store get 0 from that period.

Signals (each a vector over training ids; the ranking direction is stated with it):

* :func:`plain_sum` -- ``Σ_p w_p Σ_q S_p[q, i]``: the sum over queries and periods (the callback's
  ``data_value`` before per-query standardisation; still the value of a period's ``ScoreResult``).
  Low = hurts the queries.
* :func:`standardised_sum` -- ``Σ_p w_p Σ_q S_p[q, i] / σ_p[q]``, ``σ_p[q]`` the standard
  deviation of ``S_p[q, ·]`` over ``seen_p`` (population; a query with ``σ = 0`` adds nothing): each
  query and period counts alike, whatever the scale of its gradients. Low = hurts the queries.
* :func:`rank_mean` -- mean over periods and queries of the centred unit rank of ``S_p[q, i]``
  among ``seen_p`` (``(rank - 1) / (|seen_p| - 1) - 1/2``, ties averaged). Low = hurts.
* self-influence -- ``SI_P[i]`` (last period) or ``Σ_p w_p SI_p[i]``. High = unusual or mislabelled.
* the training loss -- ``L[i] = Σ_t loss_t(i)`` over the steps ``t`` of the first half of training
  that stored a row of ``i`` (its loss in that training step, as ``training_step`` returned it;
  about the area under the example's early loss curve). High = not learnt early: mislabelled or
  hard. Only when the run records per-example losses (the callback's ``per_example_loss_key``).
* :func:`rank_combine` / :func:`weighted_rank_combine` -- the (weighted) mean of the unit ranks of
  several signals oriented alike; the ``suspect`` ranking is :func:`suspect` of the standardised
  data value and the summed self-influence: ``0.3 x`` the unit rank of ``-data_value`` ``+ 0.7 x``
  the unit rank of ``Σ_p w_p SI_p`` (:data:`SUSPECT_VALUE_WEIGHT`; high = suspect). Self-influence
  is the stronger detector of flipped labels alone, so it gets the larger weight (0.3 chosen on the
  benchmark's tuning half; equal weights before). With a training loss, :func:`suspect_with_loss`:
  ``0.6 x`` the unit rank of that suspect ``+ 0.4 x`` the unit rank of ``L``
  (:data:`SUSPECT_LOSS_WEIGHT`, chosen on the tuning half too: larger weights found the flips
  better there but removed clean examples that helped; 0.5 before the one-token plans).

The callback keeps the running sums of :class:`DataValueSums` (one float64 per training id and
signal), so the values need no per-period matrices once a period is added, and they travel in
checkpoints. Which definition is the default was measured by ``python -m benchmarks.quality.removal``
(the data-removal benchmark; README "Data value").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import GraSSError

__all__ = ["standardise", "centred_ranks", "plain_sum", "standardised_sum", "rank_mean", "unit_ranks",
           "rank_combine", "weighted_rank_combine", "suspect", "suspect_with_loss", "candidate_signals",
           "DataValueSums", "ValueTable", "DEFAULT_NAME", "SUSPECT_NAME", "SUSPECT_VALUE_WEIGHT",
           "SUSPECT_LOSS_WEIGHT"]

DEFAULT_NAME = "standardised per query"  # the callback's data_value
SUSPECT_NAME = "suspect 0.3/0.7: standardised + summed self-infl."  # the callback's suspect
SUSPECT_VALUE_WEIGHT = 0.3  # the data value's weight in the suspect ranking (self-influence: the rest)
SUSPECT_LOSS_WEIGHT = 0.4  # the early training loss's weight beside that suspect, when a run records losses


class DataValueError(GraSSError, ValueError):
    """Bad input to a data-value function (shapes, dtypes, non-finite values)."""


# ----------------------------------------------------------------------------- input checks


def _check_matrix(scores: Tensor, what: str = "scores") -> None:
    if not isinstance(scores, Tensor) or scores.ndim != 2 or not scores.is_floating_point():
        got = (tuple(scores.shape), scores.dtype) if isinstance(scores, Tensor) else type(scores).__name__
        raise DataValueError(f"{what} must be a floating Tensor[m, n] (queries x training examples), got {got}.")
    if not bool(torch.isfinite(scores).all()):
        raise DataValueError(f"{what} holds NaN or inf.")


def _check_seen(seen: Tensor | None, n: int) -> Tensor:
    if seen is None:
        return torch.ones(n, dtype=torch.bool)
    if not isinstance(seen, Tensor) or seen.shape != (n,):
        raise DataValueError(f"seen must be a Tensor[{n}] (one flag per training example), got "
                             f"{tuple(seen.shape) if isinstance(seen, Tensor) else type(seen).__name__}.")
    return seen.to(device="cpu") > 0


# ----------------------------------------------------------------------------- one period


def standardise(scores: Tensor, seen: Tensor | None = None) -> Tensor:
    """``S[q, i] / σ[q]`` on the seen columns (0 elsewhere); ``σ[q]`` = population standard
    deviation of row ``q`` over the seen columns; a row with ``σ = 0`` is all 0. float64."""
    _check_matrix(scores)
    seen = _check_seen(seen, scores.shape[1])
    S = scores.to(torch.float64)[:, seen]
    if S.shape[1] == 0:
        return torch.zeros(scores.shape, dtype=torch.float64)
    sigma = S.std(dim=1, correction=0, keepdim=True)
    z = torch.where(sigma > 0, S / sigma.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))
    out = torch.zeros(scores.shape, dtype=torch.float64)
    out[:, seen] = z
    return out


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dim of a 2-D tensor, ties given their mean rank (float64)."""
    order = x.argsort(dim=1, stable=True)
    sorted_x = x.gather(1, order)
    m, n = x.shape
    pos = torch.arange(1, n + 1, dtype=torch.float64).expand(m, n)
    # runs of equal values: the mean position of each run
    new_run = torch.ones(m, n, dtype=torch.bool)
    new_run[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    run_id = new_run.cumsum(1) - 1  # [m, n], 0-based run index per row
    sums = torch.zeros(m, n, dtype=torch.float64).scatter_add_(1, run_id, pos)
    counts = torch.zeros(m, n, dtype=torch.float64).scatter_add_(1, run_id, torch.ones(m, n, dtype=torch.float64))
    mean_pos = (sums / counts.clamp_min(1)).gather(1, run_id)
    return torch.empty(m, n, dtype=torch.float64).scatter_(1, order, mean_pos)


def centred_ranks(scores: Tensor, seen: Tensor | None = None) -> Tensor:
    """``(rank - 1) / (s - 1) - 1/2`` of ``S[q, i]`` among the ``s`` seen columns of row ``q``
    (ties averaged), in ``[-1/2, 1/2]``; 0 on unseen columns and when ``s < 2``. float64."""
    _check_matrix(scores)
    seen = _check_seen(seen, scores.shape[1])
    out = torch.zeros(scores.shape, dtype=torch.float64)
    s = int(seen.sum())
    if s < 2:
        return out
    out[:, seen] = (_average_ranks(scores.to(torch.float64)[:, seen]) - 1) / (s - 1) - 0.5
    return out


# ----------------------------------------------------------------------------- over periods


def _periods(scores: Tensor | Sequence[Tensor], weights: Sequence[float] | Tensor | None,
             start: int) -> tuple[list[Tensor], list[float]]:
    mats = list(scores.unbind(0)) if isinstance(scores, Tensor) and scores.ndim == 3 else list(scores)
    if not mats:
        raise DataValueError("no scoring periods given.")
    w = [1.0] * len(mats) if weights is None else [float(x) for x in weights]
    if len(w) != len(mats):
        raise DataValueError(f"{len(mats)} periods but {len(w)} weights.")
    if not 0 <= start < len(mats):
        raise DataValueError(f"start must be in [0, {len(mats)}) (the first period kept), got {start}.")
    return mats[start:], w[start:]


def plain_sum(scores: Tensor | Sequence[Tensor], weights=None, start: int = 0) -> Tensor:
    """``Σ_{p >= start} w_p Σ_q S_p[q, i]`` over periods ``S_p [m, n]`` (a ``[P, m, n]`` tensor or a
    list). float64 ``[n]``."""
    mats, w = _periods(scores, weights, start)
    for S in mats:
        _check_matrix(S)
    return sum(wp * S.to(torch.float64).sum(0) for wp, S in zip(w, mats))


def standardised_sum(scores, weights=None, start: int = 0, seen: Sequence[Tensor] | None = None) -> Tensor:
    """``Σ_{p >= start} w_p Σ_q standardise(S_p)[q, i]``. float64 ``[n]``."""
    mats, w = _periods(scores, weights, start)
    seens = [None] * len(mats) if seen is None else list(seen)[start:]
    return sum(wp * standardise(S, m).sum(0) for wp, S, m in zip(w, mats, seens))


def rank_mean(scores, weights=None, start: int = 0, seen: Sequence[Tensor] | None = None) -> Tensor:
    """``Σ_p w_p mean_q centred_ranks(S_p)[q, i] / Σ_p w_p``. float64 ``[n]``."""
    mats, w = _periods(scores, weights, start)
    seens = [None] * len(mats) if seen is None else list(seen)[start:]
    total = sum(wp * centred_ranks(S, m).mean(0) for wp, S, m in zip(w, mats, seens))
    return total / sum(w)


def unit_ranks(value: Tensor) -> Tensor:
    """``(rank - 1) / (n - 1)`` of each entry of a 1-D tensor (ties averaged), in ``[0, 1]``."""
    if not isinstance(value, Tensor) or value.ndim != 1 or value.numel() < 2:
        raise DataValueError(f"unit_ranks needs a 1-D tensor of at least 2 values, got "
                             f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}.")
    return (_average_ranks(value.to(torch.float64).unsqueeze(0))[0] - 1) / (value.numel() - 1)


def rank_combine(values: Sequence[Tensor]) -> Tensor:
    """Mean of :func:`unit_ranks` of several ``[n]`` signals oriented alike (high = more of it):
    :func:`weighted_rank_combine` with equal weights."""
    if not values:
        raise DataValueError("rank_combine needs at least one signal.")
    return weighted_rank_combine(values, [1.0] * len(values))


def weighted_rank_combine(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ_j a_j unit_ranks(v_j) / Σ_j a_j`` of ``[n]`` signals oriented alike, weights ``a_j >= 0``."""
    if len(values) != len(weights) or not values:
        raise DataValueError(f"weighted_rank_combine needs one weight per signal, got {len(values)} signals and "
                             f"{len(weights)} weights.")
    a = [float(x) for x in weights]
    if any(not x >= 0 for x in a) or sum(a) <= 0:
        raise DataValueError(f"weighted_rank_combine needs weights >= 0 with a positive sum, got {a}.")
    n = values[0].numel()
    if any(v.shape != (n,) for v in values):
        raise DataValueError(f"weighted_rank_combine needs signals of one shape [n], got {[tuple(v.shape) for v in values]}.")
    return sum(x * unit_ranks(v) for x, v in zip(a, values)) / sum(a)


def suspect(data_value: Tensor, self_influence: Tensor, value_weight: float = SUSPECT_VALUE_WEIGHT) -> Tensor:
    """The suspect ranking: ``value_weight`` x the unit rank of ``-data_value`` (hurts the queries)
    plus ``1 - value_weight`` x the unit rank of ``self_influence`` (unusual); in ``[0, 1]``, high =
    suspect (look at, fix or drop first). ``value_weight=0.5``: the equal-weight mean (the default
    before)."""
    w = float(value_weight)
    if not 0 <= w <= 1:
        raise DataValueError(f"value_weight must be in [0, 1], got {value_weight!r}.")
    return weighted_rank_combine([-data_value.to(torch.float64), self_influence.to(torch.float64)], [w, 1 - w])


def suspect_with_loss(base: Tensor, training_loss: Tensor, loss_weight: float = SUSPECT_LOSS_WEIGHT) -> Tensor:
    """The suspect ranking of a run that records per-example losses: ``1 - loss_weight`` x the unit
    rank of ``base`` (:func:`suspect`) plus ``loss_weight`` x the unit rank of ``training_loss``
    (the early training loss summed per example; high = not learnt early); in ``[0, 1]``, high =
    suspect."""
    w = float(loss_weight)
    if not 0 <= w <= 1:
        raise DataValueError(f"loss_weight must be in [0, 1], got {loss_weight!r}.")
    return weighted_rank_combine([base.to(torch.float64), training_loss.to(torch.float64)], [1 - w, w])


def candidate_signals(scores: Tensor, self_influence: Tensor, lrs: Tensor) -> dict[str, Tensor]:
    """Every data value studied by the removal benchmark from one run's periods: ``scores
    [P, m, n]``, ``self_influence [P, n]``, ``lrs [P]`` -> ``name -> [n]``, low = remove first
    (self-influence and suspect negated)."""
    P = scores.shape[0]
    late = P // 2
    lr = [float(x) for x in lrs]
    std = [standardise(S) for S in scores]
    sums = torch.stack([z.sum(0) for z in std])  # [P, n]
    ranks = torch.stack([centred_ranks(S).mean(0) for S in scores])
    raw = scores.to(torch.float64).sum(1)  # [P, n]
    si = self_influence.to(torch.float64)
    lr_t = torch.tensor(lr, dtype=torch.float64)
    out = {
        "data value: plain sum (old)": raw.sum(0),
        "plain sum, lr-weighted (TracIn)": (lr_t[:, None] * raw).sum(0),
        DEFAULT_NAME: sums.sum(0),
        "standardised, lr-weighted": (lr_t[:, None] * sums).sum(0),
        "standardised, later half": sums[late:].sum(0),
        "standardised, last period": sums[-1],
        "standardised, negative part": torch.stack([z.clamp_max(0).sum(0) for z in std]).sum(0),
        "rank-averaged": ranks.mean(0),
        "rank-averaged, later half": ranks[late:].mean(0),
        "sign vote": torch.stack([torch.sign(S.double()).mean(0) for S in scores]).mean(0),
        "plain sum / sqrt(self-infl.) per period": (raw / si.clamp_min(1e-12).sqrt()).sum(0),
        "self-influence, last period (high removed)": -si[-1],
        "self-influence, summed (high removed)": -si.sum(0),
    }
    # "suspect: A + B" = equal weights (the default before); "suspect 0.3/0.7" = 0.3 x A + 0.7 x B
    out["suspect: standardised + last self-infl."] = -suspect(out[DEFAULT_NAME], si[-1], 0.5)
    out["suspect: standardised + summed self-infl."] = -suspect(out[DEFAULT_NAME], si.sum(0), 0.5)
    out["suspect: rank-avg + last self-infl."] = -suspect(out["rank-averaged"], si[-1], 0.5)
    out["suspect: negative part + last self-infl."] = -suspect(out["standardised, negative part"], si[-1], 0.5)
    out["suspect: negative part + summed self-infl."] = -suspect(out["standardised, negative part"], si.sum(0), 0.5)
    # relative influence (as RelatIF): each period's standardised value over sqrt(its self-influence)
    relative = (sums / si.clamp_min(torch.finfo(torch.float64).tiny).sqrt()).sum(0)
    out["relative (standardised / sqrt self-infl.)"] = relative
    out["suspect: relative + summed self-infl."] = -suspect(relative, si.sum(0), 0.5)
    out[SUSPECT_NAME] = -suspect(out[DEFAULT_NAME], si.sum(0), SUSPECT_VALUE_WEIGHT)
    out["suspect 0.3/0.7: relative + summed self-infl."] = -suspect(relative, si.sum(0), SUSPECT_VALUE_WEIGHT)
    return out


# ----------------------------------------------------------------------------- the callback's running sums


class DataValueSums:
    """The callback's running per-id sums, one scoring period at a time (float64 per id).

    * ``standardised`` -- :func:`standardised_sum` over the periods added (the ``data_value``);
    * ``plain`` -- :func:`plain_sum` (the definition before standardisation);
    * ``self_influence`` -- ``Σ_p w_p SI_p[i]`` (rows of one id in a period summed);
    * ``training_loss`` -- the rows' training losses in the first half of training, summed per id
      (:meth:`add_losses`; empty when the run records none).

    :meth:`add_period` takes the period's plain data value per scored id and, when the period's
    full score matrix is at hand (the callback's checkpoint ensemble), the matrix: from it the
    standardised part. A period without it adds nothing there and makes :attr:`complete` ``False``;
    :attr:`value` is then the plain sum (standardising needs every score of the period).
    """

    KEYS = ("standardised", "plain", "self_influence", "training_loss")

    def __init__(self) -> None:
        self.sums: dict[str, dict[int, float]] = {k: {} for k in self.KEYS}
        self.periods = 0
        self.complete = True

    def reset(self) -> None:
        self.sums, self.periods, self.complete = {k: {} for k in self.KEYS}, 0, True

    @property
    def value_key(self) -> str:
        return "standardised" if self.complete else "plain"

    @property
    def value(self) -> dict[int, float]:
        """The data value per id: standardised, or plain when a period lacked its matrix."""
        return self.sums[self.value_key]

    @staticmethod
    def _add(target: dict[int, float], ids: list[int], values: list[float]) -> None:
        for i, v in zip(ids, values):
            target[i] = target.get(i, 0.0) + v

    def add_period(self, ids: Tensor, plain: Tensor, weight: float = 1.0, *, matrix: Tensor | None = None,
                   seen: Tensor | None = None, self_influence: tuple[Tensor, Tensor] | None = None,
                   replace: bool = False, standardised: Tensor | None = None) -> None:
        """Add one period: ``ids [r]`` with their plain data value ``plain [r]``; ``matrix [m, n]``
        (columns = training ids ``0..n-1``) with ``seen [n]`` (the columns the period scored);
        ``self_influence = (row ids, s(i, i) per row)``; ``weight`` = the period's ensemble weight.
        ``replace=True`` (``keep_history="all"``: every period rescores every stored row) makes
        the period's values replace the sums instead of adding to them. ``standardised``:
        :func:`standardise` of ``matrix`` when the caller already has it."""
        if not isinstance(ids, Tensor) or not isinstance(plain, Tensor) or ids.shape != plain.shape or ids.ndim != 1:
            raise DataValueError("add_period needs ids [r] and plain [r] tensors of one shape.")
        if replace:
            self.reset()
        w = float(weight)
        self._add(self.sums["plain"], ids.tolist(), (w * plain.to(torch.float64)).tolist())
        if matrix is not None:
            seen_b = _check_seen(seen, matrix.shape[1])
            z = (standardised if standardised is not None else standardise(matrix, seen_b)).sum(0)
            cols = torch.nonzero(seen_b).squeeze(1)
            self._add(self.sums["standardised"], cols.tolist(), (w * z[cols]).tolist())
        else:
            self.complete = False
        if self_influence is not None and self_influence[0] is not None and self_influence[1] is not None:
            sid, sval = self_influence[0].to(torch.int64), self_influence[1].to(torch.float64)
            uniq, inv = torch.unique(sid, return_inverse=True)
            per_id = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, sval)
            self._add(self.sums["self_influence"], uniq.tolist(), (w * per_id).tolist())
        self.periods += 1

    def add_losses(self, ids: Tensor, losses: Tensor) -> None:
        """Add rows' training losses (``ids`` int ``[r]``, ``losses`` float ``[r]``) to the
        ``training_loss`` sums (rows of one id summed)."""
        if not isinstance(ids, Tensor) or not isinstance(losses, Tensor) or ids.shape != losses.shape or ids.ndim != 1:
            raise DataValueError("add_losses needs ids [r] and losses [r] tensors of one shape.")
        if ids.numel():
            uniq, inv = torch.unique(ids.to(torch.int64), return_inverse=True)
            per_id = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, losses.to(torch.float64))
            self._add(self.sums["training_loss"], uniq.tolist(), per_id.tolist())

    def tensors(self, key: str) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` of one running sum (or ``"value"``), highest value first."""
        d = self.value if key == "value" else self.sums[key]
        if not d:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
        ids = torch.tensor(list(d), dtype=torch.int64)
        values = torch.tensor(list(d.values()), dtype=torch.float64)
        order = values.argsort(descending=True, stable=True)
        return ids[order], values[order]

    def suspects(self) -> tuple[Tensor, Tensor]:
        """``(ids, suspect)`` over the ids with a data value, most suspect first: :func:`suspect` of
        the data value and the summed self-influence (0 for an id without one), weights
        :data:`SUSPECT_VALUE_WEIGHT` / ``1 -`` it; with training losses recorded,
        :func:`suspect_with_loss` of that and the loss sums (0 for an id without one). Computed
        from the sums, so nothing more is saved."""
        ids, value = self.tensors("value")
        if ids.numel() < 2:
            return ids, torch.zeros(ids.numel(), dtype=torch.float64)
        score = suspect(value, self.column("self_influence", ids))
        if self.sums["training_loss"]:
            score = suspect_with_loss(score, self.column("training_loss", ids))
        order = score.argsort(descending=True, stable=True)
        return ids[order], score[order]

    def column(self, key: str, ids: Tensor) -> Tensor:
        """float64 ``[len(ids)]``: the running sum ``key`` of each id (0 for an id without one)."""
        d = self.sums[key]
        return torch.tensor([d.get(i, 0.0) for i in ids.tolist()], dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"periods": self.periods, "complete": self.complete}
        for key in self.KEYS:
            d = self.sums[key]
            out[f"{key}_ids"] = torch.tensor(list(d), dtype=torch.int64)
            out[key] = torch.tensor(list(d.values()), dtype=torch.float64)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.periods, self.complete = int(state.get("periods", 0)), bool(state.get("complete", True))
        for key in self.KEYS:
            ids, values = state.get(f"{key}_ids"), state.get(key)
            if ids is not None and values is not None:
                self.sums[key] = dict(zip(ids.tolist(), values.double().tolist()))


class ValueTable(tuple):
    """``(ids, values)`` of the data value, highest first, that also carries the suspect table:
    ``.suspects = (ids, suspect, data_value, self_influence)`` most suspect first (or ``None``).
    Unpacks as the plain pair."""

    suspects: tuple[Tensor, Tensor, Tensor, Tensor] | None

    def __new__(cls, ids: Tensor, values: Tensor, suspects=None) -> "ValueTable":
        out = super().__new__(cls, (ids, values))
        out.suspects = suspects
        return out

    def __reduce__(self):  # pickles (torch.save) as itself, suspect table included
        return (ValueTable, (self[0], self[1], self.suspects))
