"""Attribution from saved checkpoints, several of them ensembled (scores summed, as in TracIn/TRAK).

Each checkpoint gets its own pass over the training set (in a fixed order) and the queries, with
the same plans (same seed), into its own store. The ensemble score is
``s(i, q) = Σ_c Σ_l q_{c,l}^T (F_{c,l} + λ I)^{-1} g_{c,i,l}``: the checkpoints' layers are
scored together as if they were more layers, so top-k, self-influence and data value are those
of the summed score, streamed without a full matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grass_callback.attribution import (
    DEFAULT_DAMPING_RATIO,
    LossFn,
    capture_pass,
    open_store,
    query_gradients,
    resolve_damping,
)
from grass_callback.capture import LayerTaps
from grass_callback.errors import GraSSError
from grass_callback.fisher import FisherStats, FittedFisher
from grass_callback.scoring import ScoreResult, precondition_queries, score_chunks
from grass_callback.store import GradientStore, StoreChunk

__all__ = ["attribute_checkpoints"]


def attribute_checkpoints(load_model: Callable[[str], nn.Module], checkpoints: Sequence[str | Path],
                          train_loader: Iterable, query_loader: Iterable, loss_fn: LossFn, out_dir: str | Path, *,
                          index_key: Any = None, include: Any = None, exclude: Any = None, k: int = 1024,
                          seed: int = 0, damping_ratio: float | str = DEFAULT_DAMPING_RATIO, topk: int = 10,
                          reduction: str = "mean", num_queries: int | None = None, dtype: str = "float16",
                          progress: bool = True, mask_run: int | str = "auto") -> ScoreResult:
    """Ensembled influence over ``checkpoints``; ``load_model(path)`` returns the model at a checkpoint.

    ``train_loader`` must yield the same examples in the same order on every pass (no shuffling).
    Stores go under ``out_dir/ckpt-<i>``. Returns the scores of the summed ensemble.
    """
    if not checkpoints:
        raise GraSSError("attribute_checkpoints needs at least one checkpoint path.")
    stores, fitted, queries, q_ids = [], {}, {}, None
    for c, path in enumerate(checkpoints):
        model = load_model(str(path))
        taps = LayerTaps(model, include=include, exclude=exclude, k=k, seed=seed,
                         plan_options={"mask_run": mask_run})
        store = open_store(Path(out_dir) / f"ckpt-{c}", taps, dtype=dtype,
                           config={"k": k, "seed": seed, "checkpoint": str(path), "reduction": reduction,
                                   "mask_run": mask_run})
        if store.num_rows:
            raise GraSSError(f"{store.path} already holds rows; use a fresh out_dir for a new attribution.")
        stats = FisherStats(taps.layer_dims)
        with taps:
            capture_pass(model, taps, train_loader, loss_fn, store=store, fisher=stats, index_key=index_key,
                         reduction=reduction, progress=progress)
            ids, grads = query_gradients(model, taps, query_loader, loss_fn, reduction=reduction,
                                         max_queries=num_queries, progress=progress)
        if q_ids is not None and not torch.equal(ids, q_ids):
            raise GraSSError("the query loader gave different examples for different checkpoints; it must not shuffle.")
        q_ids = ids
        fit = stats.fit(resolve_damping(damping_ratio, k))
        for name in taps.layer_dims:
            key = f"ckpt{c}/{name}"
            fitted[key] = (fit.factors[name], fit.damping[name], fit.damping_ratio[name])
            queries[key] = grads[name]
        stores.append(store)
        store.close()
    joint = FittedFisher({n: f for n, (f, _, _) in fitted.items()}, {n: d for n, (_, d, _) in fitted.items()},
                         {n: r for n, (_, _, r) in fitted.items()}, requested_damping_ratio=resolve_damping(damping_ratio, k))
    pre = precondition_queries(joint, queries)
    return score_chunks(pre, _aligned_chunks(stores), query_ids=q_ids, topk=topk, self_influence=joint)


def _aligned_chunks(stores: list[GradientStore], chunk_rows: int = 4096) -> Iterator[tuple[torch.Tensor, dict]]:
    """Rows of every checkpoint's store side by side, layers prefixed ``ckpt<c>/``."""
    iters = [s.iter_chunks(chunk_rows=chunk_rows) for s in stores]
    for parts in zip(*iters):
        parts: tuple[StoreChunk, ...]
        ids = parts[0].ids
        for p in parts[1:]:
            if not torch.equal(p.ids, ids):
                raise GraSSError("checkpoint passes saw training examples in different orders; the training "
                                 "loader must not shuffle for checkpoint attribution.")
        yield ids, {f"ckpt{c}/{name}": g for c, p in enumerate(parts) for name, g in p.grads.items()}
