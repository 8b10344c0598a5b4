"""Attribution quality: the linear datamodeling score (LDS), mislabel detection, damping choice.

**LDS.** ``M`` models are trained on random subsets ``S_1..S_M`` of the ``n`` training examples
(``masks [M, n]``, bool). For every query ``q`` a *target* is measured under each subset model
(``targets [M, m]``). An attribution method gives ``scores [n, m]``; it predicts the subset
model's target by the summed score ``Σ_{i ∈ S_j} s(i, q)``. Per query, the LDS is the Spearman
rank correlation, across the ``M`` models, between the predictions and the targets; the reported
number is the mean over queries. It lies in ``[-1, 1]``; random scores give about 0.

**Sign convention.** Scores of this package are positive when training on ``i`` *lowers* the
query's loss (``i`` is a proponent). So a larger summed score predicts a *better* query: a larger
correct-class margin, a larger log-probability, a *lower* loss. Targets are therefore read as
"goodness" by default (``target="margin"``: margins, log-probabilities, accuracies). Pass
``target="loss"`` when the targets are losses; they are then negated before the correlation, so a
perfect method still scores +1. Nothing else flips a sign.

**Mislabel detection.** Self-influence ``s(i, i)`` is large for examples the rest of the data does
not explain, such as flipped labels. :func:`mislabel_detection` reports the binary AUROC
(torchmetrics) of self-influence as a detector of the flipped examples, and the precision among
the ``n_flipped`` examples with the highest self-influence.

**Damping.** Without ground truth the library's rule decides (``damping_ratio="auto"``,
:mod:`grass_callback.damping`). :func:`choose_damping` picks the relative damping ratio ``r``
(``λ_l = r · trace(F_l) / k_l``) with the best LDS on a held-out slice of queries when subset
ground truth is available; :class:`KernelInfluence` gives exact Fisher-preconditioned scores of in-memory
compressed gradients for a whole grid of ratios from one eigendecomposition per block (per layer,
or one joint block over all layers: the TRAK-style kernel).

Every formula lives in a small pure function shared by the functional API and the torchmetrics
``Metric`` classes (whose ``update`` only appends to states, ``compute`` only reads them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import binary_auroc

from grass_callback.errors import GraSSError

__all__ = [
    "DAMPING_GRID",
    "TARGET_KINDS",
    "subset_predictions",
    "oriented_targets",
    "lds_per_query",
    "lds",
    "LinearDatamodelingScore",
    "precision_at_k",
    "mislabel_detection",
    "MislabelDetection",
    "KernelInfluence",
    "dot_product_scores",
    "fisher_scores",
    "library_scores_for",
    "DampingChoice",
    "choose_damping",
]

#: The relative damping ratios searched by default (``1e-6 .. 1e1``, one per decade).
DAMPING_GRID: tuple[float, ...] = tuple(10.0 ** e for e in range(-6, 2))
#: ``"margin"``: larger target = better query (margin, log-prob, accuracy); ``"loss"``: smaller is better.
TARGET_KINDS = ("margin", "loss")


class EvaluationError(GraSSError, ValueError):
    """Inputs of an evaluation metric have the wrong shape, type or value."""


# ----------------------------------------------------------------------------- pure maths


def _check_target_kind(target: str) -> str:
    if target not in TARGET_KINDS:
        raise EvaluationError(f"target must be one of {TARGET_KINDS} (how to read the targets), got {target!r}.")
    return target


def _check_lds_inputs(masks: Tensor, targets: Tensor, scores: Tensor) -> None:
    for name, t, ndim in (("masks", masks, 2), ("targets", targets, 2), ("scores", scores, 2)):
        if not isinstance(t, Tensor) or t.ndim != ndim:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise EvaluationError(f"{name} must be a {ndim}-D tensor, got {got}.")
    M, n = masks.shape
    if targets.shape[0] != M:
        raise EvaluationError(f"masks has {M} subset models (rows) but targets has {targets.shape[0]}; "
                              "targets must be [M, m] (one row per subset model).")
    if scores.shape[0] != n:
        raise EvaluationError(f"masks covers {n} training examples but scores has {scores.shape[0]} rows; "
                              "scores must be [n, m] (training examples x queries).")
    if scores.shape[1] != targets.shape[1]:
        raise EvaluationError(f"scores has {scores.shape[1]} queries (columns) but targets has "
                              f"{targets.shape[1]}.")
    if masks.dtype != torch.bool:
        raise EvaluationError(f"masks must be bool (True = example in the subset), got {masks.dtype}.")
    if not scores.is_floating_point() or not targets.is_floating_point():
        raise EvaluationError("scores and targets must be floating point tensors.")


def subset_predictions(masks: Tensor, scores: Tensor) -> Tensor:
    """Summed scores of each subset's examples: ``masks [M, n] @ scores [n, m] -> [M, m]`` (float64)."""
    return masks.to(torch.float64) @ scores.to(device=masks.device, dtype=torch.float64)


def oriented_targets(targets: Tensor, target: str = "margin") -> Tensor:
    """Targets as "goodness" (float64): unchanged for margins, negated for losses."""
    out = targets.to(torch.float64)
    return -out if _check_target_kind(target) == "loss" else out


def lds_per_query(predictions: Tensor, targets: Tensor) -> Tensor:
    """Spearman correlation per column across rows: ``[M, m] x [M, m] -> [m]``.

    ``targets`` must already be oriented (larger = better, see :func:`oriented_targets`). Ties get
    average ranks; a constant column gives 0.
    """
    if predictions.shape != targets.shape or predictions.ndim != 2:
        raise EvaluationError(f"predictions and targets must both be [M, m], got {tuple(predictions.shape)} "
                              f"and {tuple(targets.shape)}.")
    if predictions.shape[0] < 2:
        raise EvaluationError("the LDS needs at least 2 subset models.")
    p, t = predictions.to(torch.float64), targets.to(device=predictions.device, dtype=torch.float64)
    if p.shape[1] == 1:  # torchmetrics treats [M, 1] as one output only when squeezed
        return spearman_corrcoef(p[:, 0], t[:, 0]).reshape(1).to(torch.float64)
    return spearman_corrcoef(p, t).to(torch.float64)  # (its ranks are float32)


def lds(masks: Tensor, targets: Tensor, scores: Tensor, *, target: str = "margin",
        reduction: str = "mean") -> Tensor:
    """Linear datamodeling score of ``scores`` (see the module docstring).

    Args:
        masks: ``[M, n]`` bool, row ``j`` marks the training examples of subset model ``j``.
        targets: ``[M, m]`` each query's target under each subset model.
        scores: ``[n, m]`` attribution scores (positive = training on ``i`` lowers ``q``'s loss).
        target: ``"margin"`` (larger target = better query) or ``"loss"`` (smaller = better).
        reduction: ``"mean"`` (a scalar) or ``"none"`` (``[m]``, one LDS per query).

    Returns:
        float64 tensor: the mean LDS over queries, or per query.
    """
    _check_lds_inputs(masks, targets, scores)
    per_query = lds_per_query(subset_predictions(masks, scores), oriented_targets(targets, target))
    if reduction == "none":
        return per_query
    if reduction != "mean":
        raise EvaluationError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    return per_query.mean()


class LinearDatamodelingScore(Metric):
    """The LDS as a torchmetrics ``Metric``, accumulated over batches of *subset models*.

    ``update(masks, targets, scores)`` takes a batch of subset models (``masks [b, n]``, their
    ``targets [b, m]``) and the fixed ``scores [n, m]``; it appends the summed-score predictions
    and the oriented targets (``cat`` states, so it works under DDP). ``compute()`` returns the
    mean (or per-query, with ``per_query=True``) Spearman correlation over all models seen:
    equal to :func:`lds` on the concatenated inputs.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    predictions: list[Tensor]
    targets: list[Tensor]

    def __init__(self, target: str = "margin", per_query: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = _check_target_kind(target)
        self.per_query = bool(per_query)
        self.add_state("predictions", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, masks: Tensor, targets: Tensor, scores: Tensor) -> None:  # type: ignore[override]
        _check_lds_inputs(masks, targets, scores)
        self.predictions.append(subset_predictions(masks, scores))
        self.targets.append(oriented_targets(targets, self.target).to(masks.device))

    def compute(self) -> Tensor:
        preds = self.predictions if isinstance(self.predictions, Tensor) else torch.cat(self.predictions)
        targs = self.targets if isinstance(self.targets, Tensor) else torch.cat(self.targets)
        per_query = lds_per_query(preds, targs)
        return per_query if self.per_query else per_query.mean()


# ----------------------------------------------------------------------------- mislabel detection


def _check_detection_inputs(scores: Tensor, flags: Tensor) -> None:
    if not isinstance(scores, Tensor) or not isinstance(flags, Tensor) or scores.ndim != 1 or flags.shape != scores.shape:
        raise EvaluationError("self-influence scores and flipped flags must be 1-D tensors of one length [n].")
    if flags.dtype != torch.bool:
        raise EvaluationError(f"flipped flags must be bool (True = label flipped), got {flags.dtype}.")


def _unit_ranks(scores: Tensor) -> Tensor:
    """Order-preserving map of scores into ``[0, 1]`` (dense ranks; ties stay ties), float64.

    torchmetrics' binary AUROC applies a sigmoid to predictions outside ``[0, 1]`` (it reads
    them as logits), which saturates large scores such as self-influence into ties; the AUROC
    only depends on the order, so it is given ranks instead.
    """
    values, inverse = torch.unique(scores.to(torch.float64), sorted=True, return_inverse=True)
    return inverse.to(torch.float64) / max(1, values.numel() - 1)


def precision_at_k(scores: Tensor, flags: Tensor, k: int | None = None) -> Tensor:
    """Fraction of flagged examples among the ``k`` highest scores (default ``k`` = number flagged)."""
    _check_detection_inputs(scores, flags)
    k = int(flags.sum()) if k is None else int(k)
    if k < 1:
        raise EvaluationError("precision at k needs k >= 1 (at least one flipped example).")
    top = torch.topk(scores.to(torch.float64), min(k, scores.numel())).indices
    return flags[top].to(torch.float64).sum() / k


def mislabel_detection(self_influence: Tensor, flipped: Tensor) -> dict[str, Tensor]:
    """Self-influence as a detector of flipped labels: higher self-influence = more suspicious.

    Returns ``{"auroc": binary AUROC, "precision_at_k": precision among the n_flipped highest,
    "k": n_flipped}`` (float64 scalars, ``k`` int64).
    """
    _check_detection_inputs(self_influence, flipped)
    if bool(flipped.all()) or not bool(flipped.any()):
        raise EvaluationError("mislabel detection needs both flipped and clean examples.")
    auroc = binary_auroc(_unit_ranks(self_influence), flipped.to(torch.long))
    return {"auroc": auroc.to(torch.float64), "precision_at_k": precision_at_k(self_influence, flipped),
            "k": flipped.sum().to(torch.int64)}


class MislabelDetection(Metric):
    """:func:`mislabel_detection` accumulated over batches of ``(self_influence [b], flipped [b])``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    scores: list[Tensor]
    flags: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("flags", default=[], dist_reduce_fx="cat")

    def update(self, self_influence: Tensor, flipped: Tensor) -> None:  # type: ignore[override]
        _check_detection_inputs(self_influence, flipped)
        self.scores.append(self_influence.to(torch.float64))
        self.flags.append(flipped)

    def compute(self) -> dict[str, Tensor]:
        scores = self.scores if isinstance(self.scores, Tensor) else torch.cat(self.scores)
        flags = self.flags if isinstance(self.flags, Tensor) else torch.cat(self.flags)
        return mislabel_detection(scores, flags.to(torch.bool))


# ----------------------------------------------------------------------------- in-memory influence


@dataclass
class _Block:
    """One Fisher block in its eigenbasis: ``scores(r) = A diag(1/(ev + λ(r))) B^T``."""

    a: Tensor | None  # [m, r] queries in the eigenbasis (None: no queries)
    b: Tensor  # [n, r] training rows in the eigenbasis (dual form: U)
    ev: Tensor  # [r] eigenvalues of F = G^T G / N (>= 0)
    self_weight: Tensor  # [r] factor of b^2 in the self-influence (1 primal, N ev dual)
    unit: float  # trace(F) / k: λ = r · unit


def _eig_block(g: Tensor, q: Tensor | None, count: int) -> _Block:
    n, k = g.shape
    trace = float((g * g).sum()) / count
    if k <= n:  # primal: F = V diag(f) V^T, k x k
        f, v = torch.linalg.eigh(g.T @ g / count)
        f = f.clamp_min(0)
        return _Block(a=q @ v if q is not None else None, b=g @ v, ev=f, self_weight=torch.ones_like(f),
                      unit=trace / k)
    # dual (n < k): push-through identity Q (G^T G / N + λ)^{-1} G^T = Q G^T (G G^T / N + λ)^{-1}
    e, u = torch.linalg.eigh(g @ g.T)
    ev = e.clamp_min(0) / count
    return _Block(a=(q @ g.T) @ u if q is not None else None, b=u, ev=ev, self_weight=count * ev,
                  unit=trace / k)


class KernelInfluence:
    """Exact Fisher-preconditioned influence of in-memory compressed gradients, for any damping.

    Per block ``l`` (a layer, or all layers concatenated with ``joint=True``), with ``G_l [n, k_l]``
    the training rows, ``Q_l [m, k_l]`` the queries, ``F_l = G_l^T G_l / N`` and ``λ_l = r ·
    trace(F_l) / k_l``::

        scores[i, q] = Σ_l  Q_l[q] (F_l + λ_l I)^{-1} G_l[i]

    the same quantity as ``FisherStats.fit(r)`` + ``precondition_queries`` + ``score_chunks``.
    Each block is eigendecomposed once (``k x k``, or ``n x n`` by the push-through identity when
    ``n < k``), so a whole damping grid costs one matrix product per ratio. ``joint=True`` is
    the TRAK-style scorer: one ``K x K`` Fisher over the concatenated gradients (``K = Σ k_l``),
    which also keeps the cross-layer covariances.

    Args:
        train: layer name -> ``[n, k_l]`` compressed training gradients.
        queries: layer name -> ``[m, k_l]`` compressed query gradients (``None``: only
            :meth:`self_influence`).
        joint: one block over all layers instead of one per layer.
        count: the ``N`` dividing the Fisher (default ``n``).
    """

    def __init__(self, train: Mapping[str, Tensor], queries: Mapping[str, Tensor] | None = None, *,
                 joint: bool = False, count: int | None = None) -> None:
        if not train:
            raise EvaluationError("KernelInfluence needs at least one layer of training gradients.")
        names = list(train)
        if queries is not None and set(queries) != set(names):
            raise EvaluationError(f"query layers {sorted(queries)} differ from training layers {sorted(names)}.")
        g64 = {n: train[n].detach().to(torch.float64) for n in names}
        q64 = {n: queries[n].detach().to(torch.float64) for n in names} if queries is not None else None
        rows = {g.shape[0] for g in g64.values()}
        if len(rows) != 1:
            raise EvaluationError(f"training layers disagree on the number of rows: {sorted(rows)}.")
        self.n = rows.pop()
        self.count = int(count) if count is not None else self.n
        self.joint = bool(joint)
        if joint:
            groups = {"joint": names}
        else:
            groups = {n: [n] for n in names}
        self.blocks: dict[str, _Block] = {}
        for block, members in groups.items():
            g = torch.cat([g64[n] for n in members], 1)
            q = torch.cat([q64[n] for n in members], 1) if q64 is not None else None
            self.blocks[block] = _eig_block(g, q, self.count)

    @classmethod
    def from_grams(cls, grams: Mapping[str, tuple[Tensor, Tensor | None, int]], count: int | None = None) -> "KernelInfluence":
        """Per-layer influence from Gram matrices only: ``{layer: (G G^T [n, n], Q G^T [m, n] or
        None, k_l)}``, so an uncompressed layer too wide to hold for all examples at once can be
        accumulated chunk by chunk (the dual form of :class:`KernelInfluence`)."""
        self = cls.__new__(cls)
        self.blocks, self.joint = {}, False
        for name, (gram, cross, k) in grams.items():
            n = gram.shape[0]
            c = int(count) if count is not None else n
            e, u = torch.linalg.eigh(gram.to(torch.float64))
            ev = e.clamp_min(0) / c
            self.blocks[name] = _Block(a=cross.to(torch.float64) @ u if cross is not None else None, b=u, ev=ev,
                                       self_weight=c * ev, unit=float(gram.diagonal().sum()) / c / int(k))
            self.n, self.count = n, c
        return self

    def eigenvalues(self) -> dict[str, tuple[Tensor, int, float]]:
        """Per block ``(non-zero-rank eigenvalues of F_l, k_l, trace(F_l) / k_l)``; the ``k_l``
        minus ``len`` missing eigenvalues are zero (dual form)."""
        return {name: (b.ev, int(round(float(b.ev.sum()) / b.unit)) if b.unit > 0 else 0, b.unit)
                for name, b in self.blocks.items()}

    def _ratio(self, damping_ratio: float | Mapping[str, float], block: str) -> float:
        return float(damping_ratio[block]) if isinstance(damping_ratio, Mapping) else float(damping_ratio)

    def scores(self, damping_ratio: float | Mapping[str, float], queries: Tensor | Sequence[int] | None = None) -> Tensor:
        """``[n, m]`` float64 scores at relative damping ``damping_ratio`` (one ratio, or one per
        block name) (only the ``queries`` columns, in that order, when given)."""
        total = None
        index = None if queries is None else torch.as_tensor(queries, dtype=torch.long)
        for name, block in self.blocks.items():
            if block.a is None:
                raise EvaluationError("KernelInfluence was built without queries; pass queries= to score.")
            w = 1.0 / (block.ev + self._ratio(damping_ratio, name) * block.unit)
            a = block.a if index is None else block.a.index_select(0, index)
            part = block.b @ (a * w).T
            total = part if total is None else total + part
        return total  # type: ignore[return-value]

    def predictions(self, masks: Tensor, damping_ratio: float | Mapping[str, float]) -> Tensor:
        """Summed scores of each subset, ``masks [M, n] @ scores [n, m] -> [M, m]`` (float64),
        without forming ``scores``: ``masks @ B_l`` is kept per block, so a damping grid costs
        ``O(M r m)`` per ratio instead of ``O(n r m)``."""
        key = id(masks)
        if getattr(self, "_mask_key", None) != key:
            m64 = masks.to(torch.float64)
            self._mask_key, self._masked_b = key, {name: m64 @ b.b for name, b in self.blocks.items()}
        total = None
        for name, block in self.blocks.items():
            w = 1.0 / (block.ev + self._ratio(damping_ratio, name) * block.unit)
            part = self._masked_b[name] @ (block.a * w).T
            total = part if total is None else total + part
        return total  # type: ignore[return-value]

    def self_influence(self, damping_ratio: float | Mapping[str, float]) -> Tensor:
        """``[n]`` float64 self-influence ``s(i, i) = Σ_l g_{i,l}^T (F_l + λ_l I)^{-1} g_{i,l}``."""
        total = torch.zeros(self.n, dtype=torch.float64)
        for name, block in self.blocks.items():
            w = block.self_weight / (block.ev + self._ratio(damping_ratio, name) * block.unit)
            total += (block.b * block.b) @ w
        return total


def dot_product_scores(train: Mapping[str, Tensor], queries: Mapping[str, Tensor]) -> Tensor:
    """Gradient dot products (identity preconditioner): ``Σ_l G_l Q_l^T`` as float64 ``[n, m]``."""
    return sum(train[n].to(torch.float64) @ queries[n].to(torch.float64).T for n in train)  # type: ignore[return-value]


def fisher_scores(train: Mapping[str, Tensor], queries: Mapping[str, Tensor], damping_ratio: float, *,
                  joint: bool = False) -> Tensor:
    """Block-diagonal (or joint, TRAK-style) Fisher influence ``[n, m]`` at one damping ratio."""
    return KernelInfluence(train, queries, joint=joint).scores(damping_ratio)


def library_scores_for(stats: Any, chunks: Callable[[], Iterable[Any]], query_grads: Mapping[str, Tensor],
                       num_train: int) -> Callable[[float], Tensor]:
    """``ratio -> scores [num_train, m]`` through the library path (``FisherStats.fit``,
    ``precondition_queries``, ``score_chunks(full=True)``); rows placed by training id.

    ``chunks()`` must return a fresh iterable of ``(ids, grads)`` chunks (e.g.
    ``lambda: store.iter_chunks()``). Ids seen twice are summed. This is what a callback's
    ``damping="auto"`` would hand to :func:`choose_damping`.
    """
    from grass_callback.scoring import precondition_queries, score_chunks

    def scores_for(ratio: float) -> Tensor:
        fitted = stats.fit(ratio)
        pre = precondition_queries(fitted, {n: g if g.dtype == torch.float64 else g.float() for n, g in query_grads.items()})
        result = score_chunks(pre, chunks(), topk=0, full=True)
        out = torch.zeros(num_train, result.full.shape[0], dtype=torch.float64)
        out.index_add_(0, result.full_ids, result.full.T.to(torch.float64))
        return out

    return scores_for


# ----------------------------------------------------------------------------- damping


@dataclass
class DampingChoice:
    """The chosen relative damping and the held-out LDS of every ratio tried."""

    ratio: float
    lds: dict[float, float] = field(default_factory=dict)
    queries: Tensor | None = None

    @property
    def best_lds(self) -> float:
        return self.lds[self.ratio]


def _select_columns(t: Tensor, queries: Tensor | slice | Sequence[int] | None) -> Tensor:
    if queries is None:
        return t
    if isinstance(queries, slice):
        return t[:, queries]
    return t.index_select(1, torch.as_tensor(queries, dtype=torch.long, device=t.device))


def choose_damping(masks: Tensor, targets: Tensor, scores_for: Callable[[float], Tensor], *,
                   grid: Sequence[float] = DAMPING_GRID, queries: Tensor | slice | Sequence[int] | None = None,
                   target: str = "margin") -> DampingChoice:
    """Pick the relative damping ratio with the best LDS on a held-out slice of queries.

    Args:
        masks: ``[M, n]`` subsets of the subset-trained models (ground truth).
        targets: ``[M, m]`` each query's target under each subset model.
        scores_for: ``ratio -> scores [n, m]`` (e.g. :meth:`KernelInfluence.scores`, or
            :func:`library_scores_for`), same query columns as ``targets``.
        grid: the ratios tried (default :data:`DAMPING_GRID`, ``1e-6 .. 1e1``).
        queries: the held-out query columns used for the choice (default: all columns). Report
            the LDS of the chosen ratio on the *other* queries.
        target: how to read ``targets`` (``"margin"`` or ``"loss"``).

    Returns:
        :class:`DampingChoice`; a ratio whose scores fail (non-finite, or an error from the fit)
        gets LDS ``-inf``. On equal LDS the larger ratio wins (the better conditioned one).

    Raises:
        EvaluationError: an empty grid, or every ratio failed.
    """
    grid = [float(r) for r in grid]
    if not grid or any(not (r > 0 and math.isfinite(r)) for r in grid):
        raise EvaluationError(f"the damping grid must hold finite positive ratios, got {grid}.")
    held_targets = _select_columns(targets, queries)
    results: dict[float, float] = {}
    for ratio in grid:
        try:
            scores = scores_for(ratio)
        except GraSSError:
            results[ratio] = float("-inf")
            continue
        held_scores = _select_columns(scores, queries)
        if not bool(torch.isfinite(held_scores).all()):
            results[ratio] = float("-inf")
            continue
        value = float(lds(masks, held_targets, held_scores, target=target))
        results[ratio] = value if math.isfinite(value) else float("-inf")
    best = max(results.values())
    if best == float("-inf"):
        raise EvaluationError(f"every damping ratio in {grid} failed to give finite scores.")
    ratio = max(r for r, v in results.items() if v == best)
    q = None if queries is None or isinstance(queries, slice) else torch.as_tensor(queries)
    return DampingChoice(ratio=ratio, lds=results, queries=q)
