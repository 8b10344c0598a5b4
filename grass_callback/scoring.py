"""Streamed influence scores: top proponents / opponents, self-influence, data value.

Score of training row ``i`` for query ``q`` (sum over layers ``l``)::

    s(i, q) = sum_l g_{q,l}^T (F_l + lambda_l I)^{-1} g_{i,l}

**Sign convention: a positive score means training on ``i`` lowers the query's loss** (a
proponent); a negative score means it raises it (an opponent).

Queries are preconditioned once (:func:`precondition_queries`); :func:`score_chunks` then
streams the stored training gradients chunk by chunk, so memory is ``O(m * (topk + chunk))``
whatever the number of stored rows (``full=True`` aside).

Example::

    fisher = stats.fit(1e-3)
    qp = precondition_queries(fisher, query_grads)            # name -> [m, k_l]
    result = score_chunks(qp, store.iter_chunks(), topk=10, self_influence=fisher)
    result.top_ids[0]           # the 10 strongest proponents of query 0
"""

from __future__ import annotations

import warnings

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .errors import ScoringError
from .fisher import FittedFisher

__all__ = ["ScoreResult", "ScoringError", "precondition_queries", "score_chunks", "merge_results"]


@dataclass
class ScoreResult:
    """Influence of stored training rows on ``m`` queries (all tensors on the CPU).

    ``top_*`` are proponents, highest score first; ``bottom_*`` are opponents, most negative
    first; both ``[m, topk]``, padded with id ``-1`` and score ``NaN`` when fewer rows exist.
    A training id seen in several rows (epochs) appears once per row there. ``data_value`` is
    the sum over queries and over rows with the same id of ``s(i, q)``, per unique id (sorted).
    ``self_influence`` is ``s(i, i)`` per stored row, in stream order. ``full`` is the whole
    ``[m, n]`` matrix, columns in stream order (``full_ids``).
    """

    query_ids: Tensor
    top_ids: Tensor
    top_scores: Tensor
    bottom_ids: Tensor
    bottom_scores: Tensor
    data_value_ids: Tensor
    data_value: Tensor
    self_influence_ids: Tensor | None = None
    self_influence: Tensor | None = None
    full: Tensor | None = None
    full_ids: Tensor | None = None

    def to_dict(self) -> dict[str, Tensor]:
        """Field name -> tensor, leaving out the fields that are ``None``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


# ----------------------------------------------------------------------------- validation


def _check_queries(grads: Mapping[str, Tensor], what: str) -> int:
    if not isinstance(grads, Mapping) or len(grads) == 0:
        raise ScoringError(f"{what} must be a non-empty mapping layer name -> Tensor[m, k].")
    m = None
    for name, g in grads.items():
        if not isinstance(g, Tensor) or g.ndim != 2 or not g.is_floating_point():
            got = (tuple(g.shape), g.dtype) if isinstance(g, Tensor) else type(g).__name__
            raise ScoringError(f"{what}[{name!r}] must be a floating Tensor[m, k], got {got}.")
        if m is not None and g.shape[0] != m:
            raise ScoringError(f"{what} layers disagree on the number of queries: {m} vs {g.shape[0]}.")
        m = g.shape[0]
    if m == 0:
        raise ScoringError(
            f"{what} holds no queries (m == 0); pass at least one query example "
            "(check num_queries and the query set)."
        )
    return int(m)


def _check_layers(expected: Mapping[str, int], got: Mapping[str, Tensor], what: str) -> None:
    missing = [n for n in expected if n not in got]
    extra = [n for n in got if n not in expected]
    if missing or extra:
        raise ScoringError(
            f"{what} layers do not match the query layers: missing {missing}, unexpected {extra}. "
            "Queries and training gradients must come from the same plan and taps."
        )
    for name, k in expected.items():
        g = got[name]
        if not isinstance(g, Tensor) or g.ndim != 2 or g.shape[1] != k:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ScoringError(f"{what}[{name!r}] must be Tensor[n, {k}] like the queries, got {shape}.")


def _unpack_chunk(chunk: Any, index: int, dims: Mapping[str, int]) -> tuple[Tensor, Mapping[str, Tensor]]:
    if hasattr(chunk, "ids") and hasattr(chunk, "grads"):
        ids, grads = chunk.ids, chunk.grads
    elif isinstance(chunk, (tuple, list)) and len(chunk) == 2:
        ids, grads = chunk
    else:
        raise ScoringError(
            f"chunk #{index} must be (ids, grads) or an object with .ids and .grads, got {type(chunk)}."
        )
    ids = torch.as_tensor(ids)
    if ids.ndim != 1 or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ScoringError(
            f"chunk #{index}: ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}."
        )
    ids = ids.to(device="cpu", dtype=torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ScoringError(f"chunk #{index}: ids must be >= 0 (-1 marks padding), got {int(ids.min())}.")
    if not isinstance(grads, Mapping):
        raise ScoringError(f"chunk #{index}: grads must be a mapping layer name -> Tensor[n, k].")
    _check_layers(dims, grads, f"chunk #{index} grads")
    for name, g in grads.items():
        if g.shape[0] != ids.shape[0]:
            raise ScoringError(
                f"chunk #{index}: {ids.shape[0]} ids but grads[{name!r}] has {g.shape[0]} rows."
            )
    return ids, grads


# ----------------------------------------------------------------------------- pieces


def precondition_queries(fisher: FittedFisher, query_grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``(F_l + lambda_l I)^{-1} g_{q,l}`` for every layer; ``query_grads[name]`` is ``[m, k_l]``.

    Raises:
        ScoringError: no queries, or layers / sizes other than the Fisher's.
    """
    _check_queries(query_grads, "query_grads")
    _check_layers(fisher.layers, query_grads, "query_grads")
    return fisher.solve(query_grads)


class _IdSums:
    """Sum of values per integer id, merged lazily (amortised ``O(n log n)`` overall)."""

    MIN_PENDING = 1 << 16  # rows buffered before the first merge

    def __init__(self) -> None:
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.values = torch.zeros(0, dtype=torch.float64)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_rows = 0

    def add(self, ids: Tensor, values: Tensor) -> None:
        self._pending.append((ids, values.to(device="cpu", dtype=torch.float64)))
        self._pending_rows += ids.numel()
        if self._pending_rows > max(self.ids.numel(), self.MIN_PENDING):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        all_ids = torch.cat([self.ids] + [i for i, _ in self._pending])
        all_values = torch.cat([self.values] + [v for _, v in self._pending])
        self.ids, inverse = torch.unique(all_ids, sorted=True, return_inverse=True)
        self.values = torch.zeros(self.ids.numel(), dtype=torch.float64).index_add_(0, inverse, all_values)
        self._pending, self._pending_rows = [], 0

    def result(self) -> tuple[Tensor, Tensor]:
        self._merge()
        return self.ids, self.values


def _merge_topk(ids: Tensor, scores: Tensor, topk: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Best ``topk`` columns per row of ``scores`` ([m, c]) with their ``ids`` ([m, c])."""
    t = min(topk, scores.shape[1])
    best, where = torch.topk(scores, t, dim=1, largest=largest, sorted=True)
    return torch.gather(ids, 1, where), best


def _pad(ids: Tensor, scores: Tensor, topk: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    m, t = ids.shape
    out_ids = torch.full((m, topk), -1, dtype=torch.int64)
    out_scores = torch.full((m, topk), float("nan"), dtype=dtype)
    out_ids[:, :t] = ids.cpu()
    out_scores[:, :t] = scores.cpu().to(dtype)
    return out_ids, out_scores


def _chunk_scores(queries: Mapping[str, Tensor], grads: Mapping[str, Tensor], n: int) -> Tensor:
    """``sum_l Qp_l @ G_l^T`` as float64 ``[m, n]``; each product in the inputs' common dtype."""
    first = next(iter(queries.values()))
    total = torch.zeros(first.shape[0], n, dtype=torch.float64, device=first.device)
    for name, q in queries.items():
        g = grads[name].detach().to(first.device)
        dtype = torch.promote_types(torch.promote_types(q.dtype, g.dtype), torch.float32)
        total += (q.to(dtype) @ g.to(dtype).T).to(torch.float64)
    return total


def _self_influence(fisher: FittedFisher, grads: Mapping[str, Tensor]) -> Tensor:
    """``sum_l g_l . (F_l + lambda_l I)^{-1} g_l`` per row, float64."""
    return fisher.quadratic(grads)


# ----------------------------------------------------------------------------- main loop


def score_chunks(
    preconditioned: Mapping[str, Tensor],
    chunks: Iterable[Any],
    *,
    query_ids: Tensor | None = None,
    topk: int = 10,
    full: bool = False,
    max_full_bytes: int = 2**30,
    self_influence: FittedFisher | None = None,
    progress: Callable[[int], None] | None = None,
) -> ScoreResult:
    """Score ``m`` preconditioned queries against streamed training rows.

    Args:
        preconditioned: layer name -> ``Tensor[m, k_l]`` from :func:`precondition_queries`.
        chunks: iterable of ``(ids[n], {name: Tensor[n, k_l]})`` or objects with ``.ids`` and
            ``.grads`` (the store's ``StoreChunk``).
        query_ids: ``[m]`` ids of the queries (default ``0..m-1``).
        topk: number of proponents and of opponents kept per query.
        full: also return the whole ``[m, n]`` matrix (only if ``m * n * 8 <= max_full_bytes``).
        self_influence: the fitted Fisher, to compute ``s(i, i)`` per row; ``None`` skips it.
        progress: called with each chunk's number of rows after it is scored (``tqdm.update``).

    Returns:
        A :class:`ScoreResult` in the queries' dtype (float32, or float64 if any query is
        float64), on the CPU. Sums over layers and data values are accumulated in float64.

    Raises:
        ScoringError: no queries, layer or size mismatches, bad ids, non-finite scores, or a
            full matrix larger than ``max_full_bytes``.
    """
    m = _check_queries(preconditioned, "preconditioned")
    dims = {name: int(q.shape[1]) for name, q in preconditioned.items()}
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise ScoringError(f"topk must be an int >= 0, got {topk!r}.")
    if query_ids is None:
        query_ids = torch.arange(m, dtype=torch.int64)
    query_ids = torch.as_tensor(query_ids).to(device="cpu", dtype=torch.int64)
    if query_ids.shape != (m,):
        raise ScoringError(
            f"query_ids must have shape ({m},) like the queries, got {tuple(query_ids.shape)}."
        )
    if self_influence is not None and dict(self_influence.layers) != dims:
        raise ScoringError(
            f"the self_influence Fisher has layers {self_influence.layers}, the queries {dims}; "
            "pass the Fisher the queries were preconditioned with."
        )
    out_dtype = torch.float32
    for q in preconditioned.values():
        out_dtype = torch.promote_types(out_dtype, q.dtype)
    device = next(iter(preconditioned.values())).device
    queries = {name: q.detach() for name, q in preconditioned.items()}

    top_ids = torch.zeros(m, 0, dtype=torch.int64, device=device)
    top_scores = torch.zeros(m, 0, dtype=torch.float64, device=device)
    bottom_ids, bottom_scores = top_ids, top_scores
    values = _IdSums()
    self_ids: list[Tensor] = []
    self_vals: list[Tensor] = []
    full_parts: list[Tensor] = []
    full_id_parts: list[Tensor] = []
    rows = 0

    for index, chunk in enumerate(chunks):
        ids, grads = _unpack_chunk(chunk, index, dims)
        n = ids.numel()
        if n == 0:
            continue
        # half-precision rows widened once, for the scores and the self-influence alike (exact)
        grads = {name: g.detach().to(device=device, dtype=torch.promote_types(g.dtype, torch.float32))
                 for name, g in grads.items()}
        if full and m * (rows + n) * 8 > max_full_bytes:
            raise ScoringError(
                f"the full score matrix would need {m} x {rows + n} x 8 bytes > max_full_bytes="
                f"{max_full_bytes}; use the top-k results (full=False) or raise max_full_bytes."
            )
        scores = _chunk_scores(queries, grads, n)
        if not bool(torch.isfinite(scores).all()):
            raise ScoringError(
                f"chunk #{index} (ids {int(ids.min())}..{int(ids.max())}) gives non-finite scores; "
                "the stored or query gradients hold NaN/inf, or the damping is too small."
            )
        chunk_ids = ids.to(device).unsqueeze(0).expand(m, n)
        top_ids, top_scores = _merge_topk(
            torch.cat([top_ids, chunk_ids], 1), torch.cat([top_scores, scores], 1), topk, largest=True
        )
        bottom_ids, bottom_scores = _merge_topk(
            torch.cat([bottom_ids, chunk_ids], 1), torch.cat([bottom_scores, scores], 1), topk, largest=False
        )
        values.add(ids, scores.sum(0))
        if self_influence is not None:
            self_ids.append(ids)
            self_vals.append(_self_influence(self_influence, grads))
        if full:
            full_parts.append(scores.to(device="cpu", dtype=out_dtype))
            full_id_parts.append(ids)
        rows += n
        if progress is not None:
            progress(n)

    top = _pad(top_ids, top_scores, topk, out_dtype)
    bottom = _pad(bottom_ids, bottom_scores, topk, out_dtype)
    value_ids, value = values.result()
    result = ScoreResult(
        query_ids=query_ids,
        top_ids=top[0],
        top_scores=top[1],
        bottom_ids=bottom[0],
        bottom_scores=bottom[1],
        data_value_ids=value_ids,
        data_value=value.to(out_dtype),
    )
    no_ids = torch.zeros(0, dtype=torch.int64)
    if self_influence is not None:
        result.self_influence_ids = torch.cat([no_ids, *self_ids])
        result.self_influence = torch.cat([torch.zeros(0, dtype=torch.float64), *self_vals]).to(out_dtype)
    if full:
        result.full = torch.cat([torch.zeros(m, 0, dtype=out_dtype), *full_parts], 1)
        result.full_ids = torch.cat([no_ids, *full_id_parts])
    return result


def merge_results(results: Sequence[ScoreResult]) -> ScoreResult:
    """Merge results over disjoint row sets (e.g. one per rank) for the same queries.

    Top-k / bottom-k are re-selected from the union of candidates (``topk`` = the inputs'
    width), data values of equal ids are summed, self-influence and full columns concatenated.
    """
    if not results:
        raise ScoringError("merge_results needs at least one ScoreResult.")
    first = results[0]
    for r in results[1:]:
        if not torch.equal(r.query_ids, first.query_ids) or r.top_ids.shape != first.top_ids.shape:
            raise ScoringError("merge_results needs results for the same queries and the same topk.")
    topk = first.top_ids.shape[1]

    def select(ids_name: str, scores_name: str, largest: bool) -> tuple[Tensor, Tensor]:
        ids = torch.cat([getattr(r, ids_name) for r in results], 1)
        scores = torch.cat([getattr(r, scores_name) for r in results], 1).to(torch.float64)
        fill = float("-inf") if largest else float("inf")
        keys = torch.where(ids >= 0, scores, torch.full_like(scores, fill))
        best_ids, best = _merge_topk(ids, keys, topk, largest)
        best = torch.where(best_ids >= 0, best, torch.full_like(best, float("nan")))
        return best_ids, best.to(getattr(first, scores_name).dtype)

    values = _IdSums()
    for r in results:
        values.add(r.data_value_ids, r.data_value)
    value_ids, value = values.result()

    def cat(name: str, dim: int = 0) -> Tensor | None:
        parts = [getattr(r, name) for r in results]
        return None if any(p is None for p in parts) else torch.cat(parts, dim)

    top_ids, top_scores = select("top_ids", "top_scores", True)
    bottom_ids, bottom_scores = select("bottom_ids", "bottom_scores", False)
    return ScoreResult(
        query_ids=first.query_ids,
        top_ids=top_ids,
        top_scores=top_scores,
        bottom_ids=bottom_ids,
        bottom_scores=bottom_scores,
        data_value_ids=value_ids,
        data_value=value.to(first.data_value.dtype),
        self_influence_ids=cat("self_influence_ids"),
        self_influence=cat("self_influence"),
        full=cat("full", 1),
        full_ids=cat("full_ids"),
    )


# ----------------------------------------------------------------------------- checkpoint ensemble


class ScoreEnsemble:
    """Scores summed over scoring periods (one checkpoint each, as in TracIn/TRAK ensembles),
    optionally each period standardised per query first (:meth:`add`).

    Holds a ``[m, num_examples]`` float64 matrix of summed scores per (query, training id), so its
    memory is bounded by the dataset, not the store. Each period adds its full score matrix
    (``score_chunks(..., full=True)``); :meth:`result` ranks by the sum. A change in the query ids
    restarts the sum.
    """

    def __init__(self, num_examples: int) -> None:
        self.num_examples = int(num_examples)
        self.query_ids: Tensor | None = None
        self.total: Tensor | None = None      # [m, num_examples]
        self.seen: Tensor | None = None       # [num_examples] bool: ids scored at least once
        self.self_total: Tensor | None = None  # [num_examples] weighted self-influence summed over periods
        self.weights: list[float] = []        # the weight of every period added
        self.periods = 0
        self.standardised: bool | None = None  # whether the periods were standardised per query

    @staticmethod
    def nbytes(num_queries: int, num_examples: int) -> int:
        return 8 * num_queries * num_examples

    def delta(self, result: ScoreResult) -> tuple[Tensor, Tensor]:
        """This period's ``(scores [m, num_examples], seen [num_examples])`` from a full result."""
        if result.full is None or result.full_ids is None:
            raise ScoringError("the ensemble needs the full score matrix: score with full=True.")
        m = result.query_ids.numel()
        scores = torch.zeros(m, self.num_examples, dtype=torch.float64)
        scores.index_add_(1, result.full_ids.long(), result.full.to(torch.float64))
        seen = torch.zeros(self.num_examples, dtype=torch.float64)
        seen[result.full_ids.long()] = 1.0
        return scores, seen

    @staticmethod
    def state_size(state: Mapping[str, Any]) -> int | None:
        """How many training examples a saved ensemble state covers (``None``: empty)."""
        total = state.get("total") if isinstance(state, Mapping) else None
        return None if total is None else int(total.shape[-1])

    def self_delta(self, result: ScoreResult) -> Tensor:
        """This period's self-influence summed per training id ``[num_examples]`` (float64)."""
        out = torch.zeros(self.num_examples, dtype=torch.float64)
        if result.self_influence is not None and result.self_influence_ids is not None:
            out.index_add_(0, result.self_influence_ids.long(), result.self_influence.to(torch.float64))
        return out

    def add(self, query_ids: Tensor, scores: Tensor, seen: Tensor, weight: float = 1.0,
            self_influence: Tensor | None = None, standardise: bool = False,
            standardised: Tensor | None = None) -> None:
        """Add one period: ``weight · scores [m, num_examples]`` (and ``weight · self_influence``).

        ``standardise=True`` adds ``weight · scores[q] / σ[q]`` instead, ``σ[q]`` the population
        standard deviation of query ``q``'s scores over the period's seen examples (a query with
        ``σ = 0`` adds nothing; :func:`grass_callback.data_value.standardise`): each period then
        counts alike for every query, whatever the size of its gradients (early periods' large
        gradients no longer swamp the sum). ``standardised``: that matrix when the caller already
        has it (the callback's data value needs it too)."""
        if scores.dim() != 2 or scores.shape[1] != self.num_examples or seen.shape != (self.num_examples,):
            raise ScoringError(f"the ensemble covers {self.num_examples} training examples but this period's scores "
                               f"have shape {list(scores.shape)}: the training set changed size; restart the "
                               "ensemble (a new ScoreEnsemble) for the new training set.")
        if self.periods and self.standardised is not None and self.standardised != bool(standardise):
            warnings.warn(f"grass_callback: the checkpoint ensemble was summed with standardise={self.standardised}, "
                          f"this period uses standardise={bool(standardise)}: the ensemble restarts here.",
                          stacklevel=2)
            self.query_ids = None
        self.standardised = bool(standardise)
        if standardise and standardised is not None:
            scores = standardised
        elif standardise:
            from grass_callback.data_value import standardise as per_query

            scores = per_query(scores, seen > 0)
        if self.query_ids is None or not torch.equal(self.query_ids, query_ids):
            self.query_ids, self.total, self.seen, self.periods = query_ids.clone(), None, None, 0
            self.self_total, self.weights = None, []
        weighted = scores if weight == 1.0 else scores * float(weight)
        self.total = weighted.clone() if self.total is None else self.total + weighted
        self.seen = (seen > 0) if self.seen is None else self.seen | (seen > 0)
        if self_influence is not None:
            part = float(weight) * self_influence.to(torch.float64)
            self.self_total = part.clone() if self.self_total is None else self.self_total + part
        self.weights.append(float(weight))
        self.periods += 1

    def result(self, topk: int, data_value: tuple[Tensor, Tensor], base: ScoreResult) -> ScoreResult:
        """Top-k by the summed scores; self-influence from ``base`` (this period), data value given."""
        k = min(topk, int(self.seen.sum()))
        top_scores, top_ids = self.total.masked_fill(~self.seen, float("-inf")).topk(k, dim=1)
        bottom_scores, bottom_ids = self.total.masked_fill(~self.seen, float("inf")).topk(k, dim=1, largest=False)
        return ScoreResult(query_ids=self.query_ids, top_ids=top_ids, top_scores=top_scores.float(),
                           bottom_ids=bottom_ids, bottom_scores=bottom_scores.float(),
                           data_value_ids=data_value[0], data_value=data_value[1],
                           self_influence_ids=base.self_influence_ids, self_influence=base.self_influence)

    def state_dict(self) -> dict[str, Any]:
        return {"query_ids": self.query_ids, "total": self.total, "seen": self.seen, "periods": self.periods,
                "self_total": self.self_total, "weights": list(self.weights), "standardised": self.standardised}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        size = self.state_size(state)
        if size is not None and size != self.num_examples:
            raise ScoringError(f"the saved ensemble covers {size} training examples, this one {self.num_examples}: "
                               "it was saved for another training set; start a new ensemble.")
        self.query_ids, self.total, self.seen = state.get("query_ids"), state.get("total"), state.get("seen")
        self.periods = int(state.get("periods", 0))
        self.self_total = state.get("self_total")
        self.weights = [float(w) for w in state.get("weights", [1.0] * self.periods)]
        self.standardised = state.get("standardised", False if self.periods else None)  # older states: raw
