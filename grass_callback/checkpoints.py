"""Attribution from saved checkpoints, several of them ensembled (scores summed, as in TracIn/TRAK).

Each checkpoint gets its own pass over the training set (in a fixed order) and the queries, with
the same plans (same seed), into its own store. The ensemble score is
``s(i, q) = Σ_c s_c(i, q) / σ_c(q)`` with ``s_c(i, q) = Σ_l q_{c,l}^T (F_{c,l} + λ I)^{-1} g_{c,i,l}``
and ``σ_c(q)`` the standard deviation of ``s_c(·, q)`` over the training rows (population; a query
with ``σ_c = 0`` adds nothing from that checkpoint), as the callback's ensemble standardises its
periods (``standardise=False``: the raw sum, ``σ_c = 1``). The scale goes into the preconditioned
queries, so the checkpoints' layers are scored together as if they were more layers: top-k,
self-influence (unscaled: ``Σ_c s_c(i, i)``) and data value are those of the summed score,
streamed without a full matrix; the spreads cost one more pass of products over each store.
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
from grass_callback.damping import auto_scales
from grass_callback.fisher import FisherStats, FittedFisher
from grass_callback.scoring import ScoreResult, precondition_queries, score_chunks
from grass_callback.store import GradientStore, StoreChunk

__all__ = ["attribute_checkpoints", "ordered_loader", "load_tokenizer", "import_object", "run_attribute_cli"]


def attribute_checkpoints(load_model: Callable[[str], nn.Module], checkpoints: Sequence[str | Path],
                          train_loader: Iterable, query_loader: Iterable, loss_fn: LossFn, out_dir: str | Path, *,
                          index_key: Any = None, include: Any = None, exclude: Any = None, k: int = 1024,
                          seed: int = 0, damping_ratio: float | str = DEFAULT_DAMPING_RATIO, topk: int = 10,
                          reduction: str = "mean", num_queries: int | None = None, dtype: str = "float16",
                          progress: bool = True, mask_run: int | str = "auto",
                          standardise: bool = True) -> ScoreResult:
    """Ensembled influence over ``checkpoints``; ``load_model(path)`` returns the model at a checkpoint.

    ``train_loader`` must yield the same examples in the same order on every pass (no shuffling).
    Stores go under ``out_dir/ckpt-<i>``. Returns the scores of the summed ensemble: with several
    checkpoints and ``standardise`` (default) each checkpoint's scores are divided, per query, by
    their standard deviation over the training rows first (one checkpoint: its own scores).
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
        stats.auto_scales = auto_scales(taps.plans)
        with taps:
            capture_pass(model, taps, train_loader, loss_fn, store=store, fisher=stats, index_key=index_key,
                         reduction=reduction, progress=progress)
            ids, grads = query_gradients(model, taps, query_loader, loss_fn, reduction=reduction,
                                         max_queries=num_queries, progress=progress)
        if q_ids is not None and not torch.equal(ids, q_ids):
            raise GraSSError("the query loader gave different examples for different checkpoints; it must not shuffle.")
        q_ids = ids
        fit = stats.fit(resolve_damping(damping_ratio, k), rows_dtype=store.dtype)
        fitted[f"ckpt{c}"] = fit
        for name in taps.layer_dims:
            queries[f"ckpt{c}/{name}"] = grads[name]
        stores.append(store)
        store.close()
    joint = FittedFisher.merged(fitted, requested_damping_ratio=resolve_damping(damping_ratio, k))
    pre = precondition_queries(joint, queries)
    if standardise and len(checkpoints) > 1:
        for c, store in enumerate(stores):
            mine = {key: q for key, q in pre.items() if key.startswith(f"ckpt{c}/")}
            spread = score_spread({key.split("/", 1)[1]: q for key, q in mine.items()}, store)
            scale = torch.where(spread > 0, 1.0 / spread, torch.zeros_like(spread)).to(torch.float32)
            for key, q in mine.items():
                pre[key] = q * scale[:, None]
    return score_chunks(pre, _aligned_chunks(stores), query_ids=q_ids, topk=topk, self_influence=joint)


def score_spread(pre: dict[str, torch.Tensor], store: GradientStore, chunk_rows: int = 4096) -> torch.Tensor:
    """Population standard deviation over ``store``'s rows of each query's score ``Σ_l pre_l · g_l``
    (``pre[layer]``: ``[m, k]`` preconditioned queries): float64 ``[m]``. Chunks are merged by
    their counts, means and squared deviations (no ``E[s²] - E[s]²`` cancellation)."""
    count, mean, m2 = 0, None, None
    for chunk in store.iter_chunks(chunk_rows=chunk_rows, layers=list(pre)):
        s = sum(chunk.grads[name] @ q.T for name, q in pre.items()).double()  # [rows, m]
        n = s.shape[0]
        if n == 0:
            continue
        c_mean = s.mean(0)
        c_m2 = (s - c_mean).square().sum(0)
        if mean is None:
            count, mean, m2 = n, c_mean, c_m2
            continue
        delta, total = c_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + c_m2 + delta.square() * (count * n / total)
        count = total
    if mean is None:
        raise GraSSError(f"{store.path} holds no rows to standardise the scores over.")
    return (m2 / count).sqrt()


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


# ----------------------------------------------------------------------------- the CLI's data


def ordered_loader(loader: Any, batch_size: int | None = None) -> Any:
    """``loader`` as the user built it (collate function, workers, pinning, batch size), in a fixed
    order: the same dataset through a ``SequentialSampler``, so every checkpoint's pass sees the
    examples in the same order. ``batch_size`` overrides the loader's. A loader that is not a
    ``DataLoader``, or one over an ``IterableDataset`` (its order is its own), is returned as is.
    """
    from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    size = batch_size or loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1
    workers = loader.num_workers
    return DataLoader(loader.dataset, batch_size=size, sampler=SequentialSampler(loader.dataset),
                      collate_fn=loader.collate_fn, num_workers=workers, pin_memory=loader.pin_memory,
                      drop_last=False, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context if workers else None,
                      persistent_workers=loader.persistent_workers if workers else False,
                      prefetch_factor=loader.prefetch_factor if workers else None)


def import_object(spec: str, what: str) -> Any:
    """``package.module:attr`` imported (``what`` names it in the error).

    Raises:
        GraSSError: no ``:``, or the module or attribute cannot be found.
    """
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise GraSSError(f"--{what} expects package.module:attr, got {spec!r}.")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise GraSSError(f"--{what} {spec!r}: cannot import it ({exc}); is the module on PYTHONPATH?") from exc
    return obj


def load_tokenizer(spec: str | None) -> Any:
    """A tokenizer from ``--tokenizer``: a local folder (``AutoTokenizer``, no download), a
    ``tokenizer.json`` file, or ``package.module:attr`` (a tokenizer, or a function returning one).

    Raises:
        GraSSError: nothing with a ``decode`` method came of it.
    """
    if spec is None:
        return None
    path = Path(spec)
    if path.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    elif path.is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        tok = import_object(spec, "tokenizer")
        if not hasattr(tok, "decode") and callable(tok):
            tok = tok()
    if not hasattr(tok, "decode"):
        raise GraSSError(f"--tokenizer {spec!r} gave a {type(tok).__name__}, which has no decode(ids) method; "
                         "pass a tokenizer folder, a tokenizer.json, or module:attr naming a tokenizer.")
    return tok


def run_attribute_cli(args: Any) -> int:
    """The ``attribute`` subcommand: ensembled influence over ``args.ckpt`` on the data module's data.

    Training batches: the data module's ``train_dataloader()`` with its collate function, workers
    and batch size (``--batch-size`` overrides), in a fixed order; queries: ``val_dataloader()``
    the same way. Tables render with ``--renderer`` / ``--tokenizer``.
    """
    import json

    from grass_callback.callback import training_step_loss
    from grass_callback.render import resolve_renderers
    from grass_callback.report import InfluenceReporter, resolve_wandb_run

    module_cls, data_cls = import_object(args.model, "model"), import_object(args.data, "data")
    tokenizer = load_tokenizer(args.tokenizer)
    renderer = import_object(args.renderer, "renderer") if args.renderer else None
    train_renderer, query_renderer = resolve_renderers(renderer, tokenizer)
    dm = data_cls(**json.loads(args.data_args))
    dm.setup("fit")
    train = ordered_loader(dm.train_dataloader(), args.batch_size)
    query = ordered_loader(dm.val_dataloader())
    out = Path(args.out)

    def load(path: str) -> Any:
        return module_cls.load_from_checkpoint(path, map_location="cpu")

    damping = args.damping_ratio if args.damping_ratio == "auto" else float(args.damping_ratio)
    result = attribute_checkpoints(load, args.ckpt, train, query, training_step_loss, out / "stores", k=args.k,
                                   seed=args.seed, topk=args.topk, num_queries=args.num_queries,
                                   include=args.include, exclude=args.exclude, damping_ratio=damping,
                                   progress=not args.quiet, mask_run=args.mask_run,
                                   standardise=not args.raw_sum)
    run = None if args.no_wandb else resolve_wandb_run(save_dir=str(out), project="grass-callback",
                                                         config={"checkpoints": args.ckpt, "k": args.k})
    train_ds, query_ds = train.dataset, getattr(query, "dataset", None)
    reporter = InfluenceReporter(out / "scores", run, renderer=train_renderer, query_renderer=query_renderer,
                                 train_example=lambda i: train_ds[int(i)],
                                 query_example=(lambda i: query_ds[int(i)]) if query_ds is not None else None)
    folder = reporter.report(result, step=0, period=f"checkpoints-{len(args.ckpt)}",
                             data_value=(result.data_value_ids, result.data_value))
    reporter.finish()
    print(f"scores of {len(args.ckpt)} checkpoint(s) written to {folder}")
    return 0
