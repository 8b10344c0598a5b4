"""Attribution at fixed weights, without a Trainer: the engine's pipeline as plain functions.

:func:`attribute` runs one pass over the training data (compressed per-example gradients into a
store, Fisher statistics), fits the Fisher blocks, computes query gradients and scores them
against the store. The pieces (:func:`capture_pass`, :func:`query_gradients`,
:func:`score_store`) are what :class:`~grass_callback.callback.GraSSCallback` calls too.

Example::

    result = attribute(model, train_loader, query_loader, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    result.scores.top_ids        # [num_queries, topk] proponents per query
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from grass_callback.capture import LayerTaps, per_example_scale
from grass_callback.data import get_batch_indices, move_to_device, optional_batch_indices, resolve_index_key
from grass_callback.errors import CaptureError, ConfigError, GraSSError, ScoringError
from grass_callback.damping import auto_scales
from grass_callback.fisher import FisherStats, FittedFisher
from grass_callback.projection import Plan, plan_from_state
from grass_callback.recorder import StepRecorder
from grass_callback.scoring import ScoreResult, precondition_queries, score_chunks
from grass_callback.store import GradientStore

__all__ = ["attribute", "AttributionResult", "capture_pass", "query_gradients", "score_store",
           "open_store", "plans_from_store", "record_rows", "resolve_damping", "LossFn", "DEFAULT_DAMPING_RATIO"]

LossFn = Callable[[nn.Module, Any], Tensor]
#: Relative damping ``λ = r · trace(F) / k``: ``"auto"`` takes each layer's ratio from its own
#: Fisher when it is fitted (:func:`grass_callback.damping.auto_damping_ratio`).
DEFAULT_DAMPING_RATIO = "auto"


def resolve_damping(damping_ratio: float | str, k: int) -> float | str:
    """A checked relative damping: a positive number, or ``"auto"`` (resolved per layer by
    ``FisherStats.fit`` from the layer's Fisher: the rule needs no ground truth)."""
    if isinstance(damping_ratio, str) and damping_ratio == "auto":
        return "auto"
    if isinstance(damping_ratio, bool) or not isinstance(damping_ratio, (int, float)) or not damping_ratio > 0:
        raise ConfigError(f"damping_ratio must be a positive number or 'auto', got {damping_ratio!r}.")
    return float(damping_ratio)


def open_store(path: str | Path, taps: LayerTaps, *, dtype: str = "float16", config: Mapping[str, Any] | None = None,
               rank: int = 0, rows_per_shard: int = 8192) -> GradientStore:
    """Create or reopen a store for ``taps``' layers, saving their plans beside the gradients."""
    plan_config, plan_tensors = {}, {}
    for name, plan in taps.plans.items():
        cfg, tensors = plan.to_state()
        plan_config[name] = cfg
        plan_tensors.update({f"{name}/{key}": t for key, t in tensors.items()})
    return GradientStore(path, layer_dims=taps.layer_dims, dtype=dtype, plan_tensors=plan_tensors,
                         plan_config=plan_config, config=dict(config or {}), rank=rank,
                         rows_per_shard=rows_per_shard)


def plans_from_store(store: GradientStore) -> dict[str, Plan]:
    """The plans a store was written with, rebuilt and checked against the saved tensors."""
    tensors = store.plan_tensors()
    plans = {}
    for name, cfg in store.plan_config.items():
        prefix = f"{name}/"
        own = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
        plans[name] = plan_from_state(cfg, own)
    return plans


def _progress(iterable: Iterable, desc: str, enabled: Any, total: int | None = None) -> Iterable:
    """``iterable`` with a bar (``enabled``: True, a :class:`~grass_callback.console.ProgressHost`
    that shares Lightning's bar, or off); no bar when stderr is not a terminal."""
    from grass_callback.console import progress_iter

    return progress_iter(iterable, desc, enabled, total=total)


@contextlib.contextmanager
def _grad_enabled() -> Iterator[None]:
    """Gradients on, also inside ``torch.no_grad`` / ``torch.inference_mode`` blocks."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _normal_tensors(batch: Any) -> Any:
    """The batch with inference tensors (made under ``inference_mode``) cloned into normal ones,
    which autograd can save for backward."""
    if isinstance(batch, Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, Mapping):
        return {k: _normal_tensors(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_normal_tensors(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_normal_tensors(v) for v in batch)
    return batch


def _batch_gradients(model: nn.Module, taps: LayerTaps, batch: Any, loss_fn: LossFn, reduction: str,
                     token_counts: Callable[[Any], Tensor] | None) -> dict[str, Tensor]:
    with _grad_enabled(), taps.recording():
        batch = _normal_tensors(batch)
        loss = loss_fn(model, batch)
        # the batch size from a recorded layer input; with reentrant checkpointing every tapped
        # layer may run only in backward, then from the batch itself
        B = next(iter(taps._records))[1].shape[0] if taps._records else _leading_dim(batch)
        if not taps._records and not (isinstance(loss, Tensor) and loss.requires_grad) or B == 0:
            raise CaptureError("the loss function ran no tapped layer with gradients enabled.")
        counts = token_counts(batch) if token_counts is not None else None
        taps.set_scale(per_example_scale(B, reduction, token_counts=counts, device=loss.device))
        return taps.gradients(loss)


def _leading_dim(batch: Any) -> int:
    """The first dimension of the first tensor in a (nested) batch; 0 when there is none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = _leading_dim(value)
        if n:
            return n
    return 0


def record_rows(ids: Tensor, grads: Mapping[str, Tensor], step: int, epoch: int, *,
                store: GradientStore | None, fisher: FisherStats | None) -> Tensor:
    """One batch's compressed rows into the store and the Fisher; returns the finite-row mask.

    Rows are cast to the storage dtype first, so the Fisher sees exactly what the store keeps (a
    resumed run rebuilds it from the store bit for bit). Rows with NaN/Inf in any layer are left
    out of both (the store counts them). Appends on the calling thread; the training step and
    :func:`capture_pass` use a :class:`~grass_callback.recorder.StepRecorder` with its background
    writer instead.
    """
    return StepRecorder(store, fisher, background=False).record(ids, grads, step, epoch)


def capture_pass(model: nn.Module, taps: LayerTaps, loader: Iterable, loss_fn: LossFn, *,
                 store: GradientStore | None = None, fisher: FisherStats | None = None,
                 index_key: str | int | None = None, reduction: str = "mean",
                 token_counts: Callable[[Any], Tensor] | None = None, step: int = 0, epoch: int = 0,
                 device: torch.device | str | None = None, progress: bool = True,
                 num_examples: int | None = None) -> int:
    """One pass at fixed weights: each batch's compressed gradients into ``store`` and ``fisher``.

    ``param.grad`` is untouched (gradients are taken on the tapped outputs only), and the pass
    runs with gradients enabled even when called under ``torch.no_grad``/``inference_mode``
    (e.g. from a hook that runs inside Lightning's validation loop). Rows with NaN/Inf (after the
    cast to the store's dtype) are left out of ``fisher`` as the store leaves them out (it counts
    them in ``skipped_nonfinite``), so one bad example cannot poison the Fisher blocks. The rows
    go to the store through a background writer (:class:`~grass_callback.recorder.StepRecorder`);
    the store is flushed at the end. Returns the number of rows kept.
    """
    kept: Tensor | int = 0
    total = 0
    index_key = resolve_index_key(loader, index_key)
    recorder = StepRecorder(store, fisher)
    try:
        for batch in _progress(loader, "grass: training gradients", progress):
            ids = get_batch_indices(batch, index_key, num_examples=num_examples)
            if device is not None:
                batch = move_to_device(batch, device)
            grads = _batch_gradients(model, taps, batch, loss_fn, reduction, token_counts)
            if ids.numel() != next(iter(grads.values())).shape[0]:
                raise CaptureError(f"the batch has {ids.numel()} indices but the tapped layers saw "
                                   f"{next(iter(grads.values())).shape[0]} examples; is the batch dimension first?")
            kept = kept + recorder.record(ids, grads, step, epoch).sum()  # stays on the device
            total += ids.numel()
        recorder.flush()
    finally:
        recorder.close()
    rows = int(kept)
    if store is None and rows < total:
        warnings.warn(f"grass_callback: {total - rows} rows with NaN/Inf gradients left out of the Fisher "
                      "statistics.", stacklevel=2)
    return rows


def query_gradients(model: nn.Module, taps: LayerTaps, loader: Iterable, loss_fn: LossFn, *,
                    reduction: str = "mean", token_counts: Callable[[Any], Tensor] | None = None,
                    index_key: str | int | None = None, max_queries: int | None = None,
                    device: torch.device | str | None = None, progress: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Compressed gradients of query examples: ``(ids [m], {layer: [m, k]})``.

    Query ids come from the batches' index field when present, else their position in the loader.
    The model is put in eval mode for the pass and its mode restored; ``param.grad`` is untouched.
    Gradients are enabled for the pass even when called under ``torch.no_grad`` or
    ``torch.inference_mode`` (e.g. from a hook inside Lightning's validation loop).

    Raises:
        GraSSError: the query loader is empty, or it yields loaders (several loaders in a list).
    """
    was_training = model.training
    model.eval()
    ids_all: list[Tensor] = []
    grads_all: dict[str, list[Tensor]] = {}
    seen = 0
    index_key = resolve_index_key(loader, index_key)
    try:
        for batch in _progress(loader, "grass: query gradients", progress):
            if max_queries is not None and seen >= max_queries:
                break
            if isinstance(batch, torch.utils.data.DataLoader):
                raise GraSSError(
                    "the query loader yields DataLoaders, not batches: several query loaders were "
                    "given as a list. Pass one loader; to score queries from several datasets, "
                    "combine them first (torch.utils.data.ConcatDataset) and load that.")
            ids = optional_batch_indices(batch, index_key)
            if device is not None:
                batch = move_to_device(batch, device)
            grads = _batch_gradients(model, taps, batch, loss_fn, reduction, token_counts)
            B = next(iter(grads.values())).shape[0]
            ids = ids if ids is not None and ids.numel() == B else torch.arange(seen, seen + B)
            keep = B if max_queries is None else min(B, max_queries - seen)
            ids_all.append(ids[:keep])
            for name, g in grads.items():
                grads_all.setdefault(name, []).append(g[:keep].detach().cpu())
            seen += keep
    finally:
        model.train(was_training)
    if not ids_all:
        raise GraSSError("the query set is empty: pass a query loader with at least one batch "
                         "(by default the validation loader).")
    return torch.cat(ids_all), {name: torch.cat(parts) for name, parts in grads_all.items()}


def score_store(store: GradientStore, fitted: FittedFisher, query_ids: Tensor, query_grads: Mapping[str, Tensor], *,
                topk: int = 10, self_influence: bool = True, epochs: Iterable[int] | None = None,
                min_step: int | None = None, ranks: Iterable[int] | None = None, chunk_rows: int = 4096,
                full: bool = False, progress: bool = True,
                preconditioned: Mapping[str, Tensor] | None = None) -> ScoreResult:
    """Score queries against the stored rows (streamed in chunks of ``chunk_rows``).

    ``preconditioned``: the queries already preconditioned with ``fitted``
    (:func:`~grass_callback.scoring.precondition_queries` of ``query_grads``, float32), when the
    caller needs them too; they are not recomputed.
    """
    if preconditioned is None:
        pre = precondition_queries(fitted, {name: query_grads[name].float() for name in store.layers})
    else:
        missing = [name for name in store.layers if name not in preconditioned]
        if missing:
            raise ScoringError(f"preconditioned queries lack the store's layers {missing}.")
        pre = {name: preconditioned[name] for name in store.layers}
    chunks = store.iter_chunks(chunk_rows=chunk_rows, epochs=list(epochs) if epochs is not None else None,
                               min_step=min_step, ranks=list(ranks) if ranks is not None else None)
    bar = None
    if progress:
        from grass_callback.console import open_bar

        filtered = epochs is not None or min_step is not None or ranks is not None
        bar = open_bar("grass: scoring", progress, total=None if filtered else store.num_rows, unit="rows")
    try:
        return score_chunks(pre, chunks, query_ids=query_ids, topk=topk, full=full,
                            self_influence=fitted if self_influence else None,
                            progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _damping_from_ground_truth(fisher: FisherStats, store: GradientStore, query_grads: Mapping[str, Tensor],
                               ground_truth: tuple[Tensor, Tensor]) -> float:
    from grass_callback.evaluation import choose_damping, library_scores_for

    masks, targets = ground_truth
    m = next(iter(query_grads.values())).shape[0]
    if targets.shape[1] != m:
        raise ConfigError(f"ground_truth targets have {targets.shape[1]} query columns but there are {m} queries.")
    scores_for = library_scores_for(fisher, lambda: store.iter_chunks(), query_grads, masks.shape[1])
    return choose_damping(masks, targets, scores_for, queries=torch.arange(0, m, 2)).ratio


@dataclass
class AttributionResult:
    """What :func:`attribute` returns: scores, the fitted Fisher blocks and the store used."""

    scores: ScoreResult
    fisher: FittedFisher
    store: GradientStore
    query_ids: Tensor
    query_grads: dict[str, Tensor]
    full_scores: Tensor | None = None  # [m, n] by training id, with attribute(full=True)


def attribute(model: nn.Module, train_loader: Iterable, query_loader: Iterable, loss_fn: LossFn, *,
              index_key: str | int | None = None, include: Any = None, exclude: Any = None, k: int = 1024,
              seed: int = 0, damping_ratio: float | str = DEFAULT_DAMPING_RATIO, topk: int = 10,
              reduction: str = "mean", token_counts: Callable[[Any], Tensor] | None = None,
              store_dir: str | Path | None = None, dtype: str = "float16", self_influence: bool = True,
              num_queries: int | None = None, impl: str = "auto", device: torch.device | str | None = None,
              progress: bool = True, plans: Mapping[str, Plan] | None = None,
              ground_truth: tuple[Tensor, Tensor] | None = None, mask_run: int | str = "auto",
              query_loss_fn: LossFn | None = None, full: bool = False) -> AttributionResult:
    """Influence of every training example on every query, at the model's current weights.

    Args:
        model: the model; its ``nn.Linear``/``Conv1D`` layers are tapped.
        train_loader: batches carrying dataset indices (see :class:`~grass_callback.IndexedDataset`).
        query_loader: batches of query examples.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` reduced as ``reduction`` says.
        index_key: the batch field holding dataset indices (default: ``"index"`` / last element).
        include, exclude: layer-name globs. k, seed, mask_run: the FactGraSS plans (per layer;
            ``mask_run`` as in :class:`~grass_callback.projection.FactGraSSPlan`).
        damping_ratio: relative damping of each Fisher block, or ``"auto"`` (default: a ratio per
            layer from its own Fisher, a tenth of it on a vocabulary head,
            :mod:`grass_callback.damping`). topk: proponents/opponents
            per query.
        reduction: how ``loss_fn`` reduces over the batch: ``"mean"``, ``"sum"``, ``"token_mean"``
            (then ``token_counts(batch) -> [B]`` is required).
        store_dir: where compressed gradients go (default: a temporary directory).
        dtype: storage dtype of the store. self_influence: also score each example on itself.
        num_queries: use at most this many queries. impl: the op implementation.
        device: where batches are moved (default: left where the loader puts them).
        progress: show progress bars. plans: reuse plans (e.g. from an earlier store).
        ground_truth: ``(masks [M, n], targets [M, m])`` from models trained on subsets (targets
            per query, in query order, higher = better, e.g. the correct-class margin). With
            ``damping_ratio="auto"`` the ratio is then chosen by LDS on the even-numbered queries
            (:func:`grass_callback.evaluation.choose_damping`) instead of from the rule.
        query_loss_fn: ``fn(model, batch) -> scalar loss`` for query batches (default
            ``loss_fn``), e.g. a margin or a passage's loss on its answer tokens only; reduced
            over the batch as ``reduction`` says.
        full: also return the whole score matrix, ``result.full_scores [m, n]`` by training id
            (``m · n`` float64 in memory: for data sets where that fits).

    Returns:
        :class:`AttributionResult`; positive scores mean training on the example lowers the
        query's loss.
    """
    taps = LayerTaps(model, plans=plans, include=include, exclude=exclude, k=k, seed=seed, impl=impl,
                     plan_options={"mask_run": mask_run})
    store_path = Path(store_dir) if store_dir is not None else Path(tempfile.mkdtemp(prefix="grass-store-"))
    config = {"k": k, "seed": seed, "reduction": reduction, "mode": "checkpoint", "mask_run": mask_run}
    store = open_store(store_path, taps, dtype=dtype, config=config)
    fisher = FisherStats(taps.layer_dims)
    fisher.auto_scales = auto_scales(taps.plans)  # a vocabulary head's smaller "auto" damping
    with taps:
        capture_pass(model, taps, train_loader, loss_fn, store=store, fisher=fisher, index_key=index_key,
                     reduction=reduction, token_counts=token_counts, device=device, progress=progress)
        q_ids, q_grads = query_gradients(model, taps, query_loader, query_loss_fn or loss_fn, reduction=reduction,
                                         token_counts=token_counts, max_queries=num_queries, device=device,
                                         progress=progress)
    ratio = resolve_damping(damping_ratio, k)
    if damping_ratio == "auto" and ground_truth is not None:
        ratio = _damping_from_ground_truth(fisher, store, q_grads, ground_truth)
    fitted = fisher.fit(ratio, rows_dtype=store.dtype)
    scores = score_store(store, fitted, q_ids, q_grads, topk=topk, self_influence=self_influence, progress=progress,
                         full=full)
    return AttributionResult(scores=scores, fisher=fitted, store=store, query_ids=q_ids, query_grads=q_grads,
                             full_scores=_by_id(scores) if full else None)


def _by_id(scores: ScoreResult) -> Tensor:
    """``scores.full [m, rows]`` summed into ``[m, max id + 1]`` by training id (float64)."""
    ids = scores.full_ids.long()
    out = torch.zeros(scores.full.shape[0], int(ids.max()) + 1 if ids.numel() else 0, dtype=torch.float64)
    return out.index_add_(1, ids, scores.full.to(torch.float64))
