"""New questions to a finished run: score new queries against the gradients a run already stored.

A run (the callback, :func:`~grass_callback.attribute` or the CLI) leaves a store holding every
compressed training gradient and the plans that compressed them. :func:`explain` needs only the
new queries' gradients: it rebuilds the plans from the store, taps the given model with them,
refits each scoring period's Fisher from that period's stored rows, and streams the rows once.

Periods: the callback scores each period's rows (``keep_history="period"``) with that period's
Fisher; it records each period's row range (the ``step`` column of the store is its batch
counter) in ``<run>/train-periods.json`` (:func:`record_period`). ``explain`` scores each
period's rows with that period's Fisher and sums the scores per training id over the periods,
as the callback's checkpoint ensemble does. A store without that file (an ``attribute()`` store,
a run from before it existed, ``keep_history="all"``) is one period holding every row.

Example::

    result = explain("logs/grass", model, query_loader)      # model at its final weights
    result.scores.top_ids       # [m, topk] proponents of each new query
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from grass_callback.attribution import LossFn, plans_from_store, query_gradients, resolve_damping
from grass_callback.capture import LayerTaps, find_layers, layer_shape
from grass_callback.errors import CaptureError, GraSSError, PlanError, StoreError, StoreMismatchError
from grass_callback.damping import auto_scales
from grass_callback.fisher import FisherStats, FittedFisher, JointFisherStats
from grass_callback.scoring import ScoreResult, _chunk_scores, precondition_queries, score_chunks
from grass_callback.store import GradientStore

__all__ = ["explain", "ExplainResult", "Period", "record_period", "read_periods", "QueryFieldError", "PERIODS_FILE"]

PERIODS_FILE = "train-periods.json"
_CACHE_VERSION = 1


class QueryFieldError(GraSSError, ValueError):
    """The query batches lack a field the loss function reads."""


@dataclass(frozen=True)
class Period:
    """One scoring period: the stored rows with ``min_step <= step <= max_step`` (``None``: open)."""

    name: str
    min_step: int | None
    max_step: int | None
    damping_ratio: float | None = None


@dataclass
class ExplainResult:
    """What :func:`explain` returns: the scores, the periods and the Fisher fit of each."""

    scores: ScoreResult
    periods: list[Period]
    fisher: list[FittedFisher]
    query_ids: Tensor
    query_grads: list[dict[str, Tensor]]


# ----------------------------------------------------------------------------- the period sidecar


def record_period(root: str | Path, *, period: str, min_step: int | None, max_step: int, global_step: int,
                  damping_ratio: float | str | None, keep_history: str, rows: int) -> None:
    """Add one scoring period to ``root/train-periods.json`` (atomic rewrite; the callback calls it).

    ``damping_ratio``: the ratio the period's fit used (a rule's name such as ``"auto"`` is kept as it is).

    Entries a killed run left past this period's start are replaced (a resumed run re-scores them).
    """
    path = Path(root) / PERIODS_FILE
    entries = _read_entries(path)
    start = min_step if min_step is not None else max_step
    entries = [e for e in entries if int(e["max_step"]) < start]
    ratio = damping_ratio if damping_ratio is None or isinstance(damping_ratio, str) else float(damping_ratio)
    entries.append({"period": str(period), "min_step": min_step, "max_step": int(max_step),
                    "global_step": int(global_step), "damping_ratio": ratio,
                    "keep_history": keep_history, "rows": int(rows)})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": "grass_callback.periods", "periods": entries}, indent=1) + "\n")
    os.replace(tmp, path)


def _read_entries(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise StoreError(f"could not read the period file {path} ({e}); delete it to treat the run as one "
                         "period.") from e
    return list(data.get("periods", []))


def read_periods(root: str | Path) -> list[Period]:
    """The run's scoring periods from its sidecar, or one open period when there is none.

    With ``keep_history="all"`` the last period scored every row with a Fisher of every row: one period.
    """
    entries = _read_entries(Path(root) / PERIODS_FILE)
    if not entries:
        return [Period("all", None, None)]
    if entries[-1].get("keep_history") == "all":
        e = entries[-1]
        return [Period(e["period"], None, int(e["max_step"]), e.get("damping_ratio"))]
    return [Period(e["period"], e["min_step"], int(e["max_step"]), e.get("damping_ratio")) for e in entries]


# ----------------------------------------------------------------------------- store, plans, taps


def _locate(store_dir: str | Path) -> tuple[Path, Path, Path]:
    """``(store path, sidecar folder, default cache folder)`` for a run folder or a store folder."""
    path = Path(store_dir)
    if (path / "train" / "meta.json").exists():
        return path / "train", path, path / "explain-cache"
    if (path / "meta.json").exists():
        run = path.parent if path.name == "train" and (path.parent / PERIODS_FILE).exists() else path
        return path, run, path.parent / f"{path.name}-explain-cache"
    raise StoreError(f"no gradient store at {path}: expected {path / 'meta.json'} (a store) or "
                     f"{path / 'train' / 'meta.json'} (a callback run's store_dir).")


def _open_readonly(path: Path) -> tuple[GradientStore, dict]:
    from grass_callback._store_format import _plans_digest

    store = GradientStore(path, readonly=True)
    if store.num_rows == 0:
        raise StoreError(f"the gradient store at {path} holds no committed rows; nothing to explain.")
    try:
        digest_ok = _plans_digest(store.plan_tensors()) == store.meta.get("plans_digest")
        plans = plans_from_store(store)
    except PlanError as e:
        raise StoreMismatchError(f"the plans saved in {path} do not rebuild ({e}); the store was written by "
                                 "another version of grass_callback or its plans file was replaced.") from e
    if not digest_ok:
        raise StoreMismatchError(f"{path}/plans.safetensors does not match the digest in meta.json: the plans "
                                 "file was replaced after the run; restore it.")
    return store, plans


def _taps_for(model: nn.Module, store: GradientStore, plans: Mapping[str, Any], impl: str) -> LayerTaps:
    """Taps on exactly the store's layers, each checked against its plan's layer shape."""
    try:
        found = dict(find_layers(model)[0])
    except CaptureError as e:
        raise StoreMismatchError(f"the model has no layer of the store at {store.path} ({e}).") from e
    missing = [n for n in store.layers if n not in found]
    if missing:
        raise StoreMismatchError(
            f"the store at {store.path} was written for layers {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"which this {type(model).__name__} does not have as trainable linear layers (it has "
            f"{list(found)[:8]}); pass the model (or checkpoint) the run trained.")
    wrong = [f"{n}: store {plans[n].shape}, model {layer_shape(found[n])}" for n in store.layers
             if plans[n].shape != layer_shape(found[n])]
    if wrong:
        raise StoreMismatchError(f"layer shapes differ between the store at {store.path} and the model: "
                                 f"{'; '.join(wrong[:5])}; the checkpoint belongs to another model.")
    return LayerTaps(model, plans={n: plans[n] for n in store.layers},
                     include=[_glob_literal(n) for n in store.layers], impl=impl)


def _glob_literal(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


# ----------------------------------------------------------------------------- Fisher per period


def _stats_for(store: GradientStore, period: Period, joint: bool, chunk_rows: int, cache: Path | None,
               progress: bool) -> FisherStats:
    """The period's Fisher sums from its stored rows (read from / written to ``cache`` when given)."""
    shards = [(e["file"], e.get("sha256"), e["rows"]) for _r, e in store.shards()]
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, store.config_hash, shards, period.min_step,
                                     period.max_step, joint]).encode()).hexdigest()[:24]
    path = cache / f"fisher-{key}.safetensors" if cache is not None else None
    if path is not None and path.exists():
        try:
            return _load_joint(path, store) if joint else _with_auto_scales(FisherStats.load(path), store)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            pass
    stats = JointFisherStats(store.layers) if joint else _with_auto_scales(FisherStats(store.layers), store)
    chunks = store.iter_chunks(chunk_rows=chunk_rows, min_step=period.min_step, max_step=period.max_step)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"grass: Fisher of {period.name}", leave=False)
    for chunk in chunks:
        stats.update(chunk.grads)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(path)
        except OSError:
            pass  # a read-only place: the next call refits
    return stats


def _with_auto_scales(stats: FisherStats, store: GradientStore) -> FisherStats:
    """``stats`` with the ``"auto"`` rule's per-layer multipliers of the store's plans, as in training."""
    stats.auto_scales = auto_scales(store.plan_config)
    return stats


def _load_joint(path: Path, store: GradientStore) -> JointFisherStats:
    stats = JointFisherStats(store.layers)
    loaded = FisherStats.load(path)
    stats.load_state_dict(loaded.state_dict())
    return stats


# ----------------------------------------------------------------------------- the API


def explain(store_dir: str | Path, model: nn.Module | Sequence[nn.Module], queries: Iterable, loss_fn: LossFn | None = None,
            *, topk: int = 10, damping_ratio: float | str | None = None, num_queries: int | None = None,
            reduction: str | None = None, token_counts: Callable[[Any], Tensor] | None = None,
            index_key: str | int | None = None, query_batch_size: int = 32, device: torch.device | str | None = None,
            self_influence: bool = True, chunk_rows: int = 4096, fisher_cache: str | Path | bool = True,
            max_matrix_bytes: int = 2**30, periods: Sequence[str] | None = None, impl: str = "auto",
            progress: bool = True, standardise: bool = True) -> ExplainResult:
    """Influence of a finished run's stored training rows on new queries.

    **Which weights.** The query gradients are taken at ``model``'s weights, usually the final
    or a saved checkpoint's. The training rows were captured during training, each at the weights
    of its own step, so a score pairs a query gradient at the final weights with training
    gradients from earlier weights (the callback's in-training tables pair each period's query
    gradients with that period's rows instead). Pass one model per period (``model=[m_0, m_1,
    ...]``, e.g. the checkpoints saved at each period's end) to reproduce the callback's ensemble
    exactly; with one model, every period's rows are scored against the same query gradients.

    Args:
        store_dir: a callback run's ``store_dir`` (holding ``train/``) or a store folder.
        model: the model (or one per period); its layers must be the store's, with the same shapes.
        queries: a DataLoader / iterable of query batches, or a map-style dataset.
        loss_fn: ``loss_fn(model, batch) -> loss``; default: the loss ``training_step`` returns.
        topk: proponents and opponents per query. damping_ratio: default the one the run used
            (recorded per period), else ``"auto"`` for the store's ``k``. num_queries: use at most so many.
        reduction: how ``loss_fn`` reduces over the batch (default: the store's setting).
        self_influence: ``s(i, i)`` per row (per id, summed over periods, when there are several).
        fisher_cache: where the refitted Fisher sums are kept between calls: ``True`` (default) a
            folder beside the store (``<run>/explain-cache``), a path, or ``False``. Never the store.
        max_matrix_bytes: with several periods the ``[m, num_ids]`` float64 sums are built for as
            many queries at a time as fit in this budget (one scan of the store per group).
        periods: score only these periods (names as in the run's tables, e.g. ``["epoch-2"]``).
        standardise: with several periods, divide each period's scores per query by their standard
            deviation over its rows before summing, as the callback's ensemble does by default
            (``GraSSCallback(ensemble_standardise=...)``); the data value stays the plain sum.

    Returns:
        :class:`ExplainResult`; ``scores`` is a :class:`~grass_callback.scoring.ScoreResult` (positive:
        training on the example lowers the query's loss), for :class:`~grass_callback.report.InfluenceReporter`.

    Raises:
        StoreError: no store there, or no rows. StoreMismatchError: the model's layers or shapes
            are not the store's, or the store's plans do not rebuild. QueryFieldError: the query
            batches lack a field ``loss_fn`` reads. The store is opened read-only in every case.
    """
    store_path, root, default_cache = _locate(store_dir)
    store, plans = _open_readonly(store_path)
    periods = _select(read_periods(root), periods)
    models = [model] if isinstance(model, nn.Module) else list(model)
    if len(models) not in (1, len(periods)):
        raise GraSSError(f"got {len(models)} models for a run with {len(periods)} periods "
                         f"({[p.name for p in periods]}): pass one model, or one per period.")
    cfg = store.config
    reduction = reduction or cfg.get("loss_reduction") or cfg.get("reduction") or "mean"
    joint = cfg.get("scorer") == "joint"
    cache = None if fisher_cache is False else default_cache if fisher_cache is True else Path(fisher_cache)
    if isinstance(queries, torch.utils.data.Dataset) and not isinstance(queries, torch.utils.data.IterableDataset):
        queries = torch.utils.data.DataLoader(queries, batch_size=query_batch_size)
    if loss_fn is None:
        from grass_callback.callback import training_step_loss as loss_fn
    grads, q_ids = [], None
    for m in models:
        taps = _taps_for(m, store, plans, impl)
        with taps:
            ids, g = _query_gradients(m, taps, queries, loss_fn, reduction, token_counts, index_key, num_queries,
                                      device, progress)
        if q_ids is not None and not torch.equal(ids, q_ids):
            raise GraSSError("the query loader gave other examples for another model; it must not shuffle.")
        q_ids = ids
        grads.append({n: g[n] for n in store.layers})
    k = next(iter(store.layers.values()))
    fitted = []
    for p in periods:
        ratio = damping_ratio if damping_ratio is not None else p.damping_ratio or "auto"
        stats = _stats_for(store, p, joint, chunk_rows, cache, progress)
        if stats.count == 0:
            raise StoreError(f"period {p.name!r} (steps {p.min_step}..{p.max_step}) has no rows in {store.path}.")
        fitted.append(stats.fit(resolve_damping(ratio, k), rows_dtype=store.dtype))
    per_period = [grads[i if len(grads) > 1 else 0] for i in range(len(periods))]
    if len(periods) == 1:
        pre = precondition_queries(fitted[0], per_period[0])
        chunks = store.iter_chunks(chunk_rows=chunk_rows, min_step=periods[0].min_step, max_step=periods[0].max_step)
        scores = score_chunks(pre, chunks, query_ids=q_ids, topk=topk,
                              self_influence=fitted[0] if self_influence else None)
    else:
        scores = _ensemble_scores(store, periods, fitted, per_period, q_ids, topk, self_influence, chunk_rows,
                                  max_matrix_bytes, standardise=standardise)
    return ExplainResult(scores=scores, periods=periods, fisher=fitted, query_ids=q_ids, query_grads=grads)


def _select(found: list[Period], names: Sequence[str] | None) -> list[Period]:
    if names is None:
        return found
    unknown = [n for n in names if n not in {p.name for p in found}]
    if unknown or not names:
        raise GraSSError(f"no period named {unknown or names} in this run; its periods are {[p.name for p in found]}.")
    return [p for p in found if p.name in set(names)]


def _query_gradients(model, taps, queries, loss_fn, reduction, token_counts, index_key, num_queries, device,
                     progress) -> tuple[Tensor, dict[str, Tensor]]:
    """Query gradients; a missing batch field becomes a :class:`QueryFieldError` that names the fields."""
    try:
        return query_gradients(model, taps, queries, loss_fn, reduction=reduction, token_counts=token_counts,
                               index_key=index_key, max_queries=num_queries, device=device, progress=progress)
    except (KeyError, IndexError, AttributeError) as e:
        batch = next(iter(queries))
        fields = list(batch) if isinstance(batch, Mapping) else \
            f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (list, tuple)) else type(batch).__name__
        raise QueryFieldError(f"the loss function could not read the query batch ({type(e).__name__}: {e}); the "
                              f"batches hold {fields}. Give queries with the fields the training batches had "
                              "(e.g. labels), or a loss_fn for these batches.") from e


def _ensemble_scores(store: GradientStore, periods: list[Period], fitted: list[FittedFisher],
                     grads: list[dict[str, Tensor]], q_ids: Tensor, topk: int, self_influence: bool,
                     chunk_rows: int, max_bytes: int, standardise: bool = True) -> ScoreResult:
    """Scores summed per training id over the periods, each period's rows with its own Fisher
    (each period standardised per query first, as the callback's ensemble, unless
    ``standardise=False``); the data value is the plain sum."""
    from grass_callback.data_value import standardise as per_query

    n = int(store.ids().max()) + 1
    m = q_ids.numel()
    group = max(1, min(m, max_bytes // (8 * n)))
    pre = [precondition_queries(f, g) for f, g in zip(fitted, grads)]
    tops, bottoms = [], []
    value = torch.zeros(n, dtype=torch.float64)
    self_sum = torch.zeros(n, dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.bool)
    for a in range(0, m, group):
        total = torch.zeros(min(group, m - a), n, dtype=torch.float64)
        for p, period in enumerate(periods):
            queries = {name: q[a:a + group] for name, q in pre[p].items()}
            part = torch.zeros_like(total) if standardise else total
            seen_p = torch.zeros(n, dtype=torch.bool)
            for chunk in store.iter_chunks(chunk_rows=chunk_rows, min_step=period.min_step, max_step=period.max_step):
                s = _chunk_scores(queries, chunk.grads, chunk.ids.numel())
                part.index_add_(1, chunk.ids, s)
                seen_p[chunk.ids] = True
                if a == 0 and self_influence:
                    self_sum.index_add_(0, chunk.ids, fitted[p].quadratic(chunk.grads))
            seen |= seen_p
            if standardise:  # as the callback's ensemble: each period per query over its own rows
                value += part.sum(0)
                total += per_query(part, seen_p)
        if not standardise:
            value += total.sum(0)
        kk = min(topk, int(seen.sum()))
        hi = total.masked_fill(~seen, float("-inf")).topk(kk, dim=1)
        lo = total.masked_fill(~seen, float("inf")).topk(kk, dim=1, largest=False)
        tops.append((hi.indices, hi.values))
        bottoms.append((lo.indices, lo.values))
    ids = torch.nonzero(seen).flatten()
    result = ScoreResult(query_ids=q_ids, top_ids=torch.cat([t[0] for t in tops]),
                         top_scores=torch.cat([t[1] for t in tops]).float(),
                         bottom_ids=torch.cat([b[0] for b in bottoms]),
                         bottom_scores=torch.cat([b[1] for b in bottoms]).float(),
                         data_value_ids=ids, data_value=value[ids].float())
    if self_influence:
        result.self_influence_ids, result.self_influence = ids, self_sum[ids].float()
    return result


# ----------------------------------------------------------------------------- command line


def add_query_parser(sub: Any) -> None:
    """The ``query`` subcommand of ``python -m grass_callback``."""
    q = sub.add_parser("query", help="new queries against a finished run's store (no pass over the training set)")
    q.add_argument("--store", required=True, help="the run's store_dir (holding train/) or a store folder")
    q.add_argument("--ckpt", action="append", required=True,
                   help="checkpoint whose weights give the query gradients; repeat once per period to "
                        "reproduce the callback's ensemble")
    q.add_argument("--model", required=True, help="LightningModule class, package.module:Class")
    q.add_argument("--data", required=True, help="LightningDataModule class, package.module:Class")
    q.add_argument("--data-args", default="{}", help="JSON keyword arguments of the data module")
    q.add_argument("--split", default="val", choices=["val", "test", "train"], help="where the queries come from")
    q.add_argument("--out", default="grass-query", help="output folder (CSV tables, W&B run)")
    q.add_argument("--topk", type=int, default=10)
    q.add_argument("--num-queries", type=int, default=16)
    q.add_argument("--damping-ratio", default=None, help="a number or auto; default: the one the run used")
    q.add_argument("--period", action="append", default=None, help="score only this period (repeatable)")
    q.add_argument("--no-wandb", action="store_true")
    q.add_argument("--quiet", action="store_true", help="no progress bars")


def run_query_cli(args: Any) -> int:
    """``python -m grass_callback query ...``: :func:`explain`, then the callback's tables."""
    import importlib

    from grass_callback.report import InfluenceReporter, make_renderer, resolve_wandb_run

    def load(spec: str) -> Any:
        module, _, name = spec.partition(":")
        if not name:
            raise SystemExit(f"expected package.module:Class, got {spec!r}")
        return getattr(importlib.import_module(module), name)

    module_cls, data_cls = load(args.model), load(args.data)
    dm = data_cls(**json.loads(args.data_args))
    dm.setup("fit" if args.split != "test" else "test")
    query = {"val": dm.val_dataloader, "test": dm.test_dataloader, "train": dm.train_dataloader}[args.split]()
    models = [module_cls.load_from_checkpoint(c, map_location="cpu") for c in args.ckpt]
    ratio = args.damping_ratio if args.damping_ratio in (None, "auto") else float(args.damping_ratio)
    result = explain(args.store, models if len(models) > 1 else models[0], query, topk=args.topk,
                     damping_ratio=ratio, num_queries=args.num_queries, periods=args.period,
                     progress=not args.quiet)
    out = Path(args.out)
    run = None if args.no_wandb else resolve_wandb_run(save_dir=str(out), project="grass-callback",
                                                         config={"store": str(args.store), "checkpoints": args.ckpt})
    train_ds = getattr(dm.train_dataloader(), "dataset", None) if args.split != "test" else None
    query_ds = getattr(query, "dataset", None)
    reporter = InfluenceReporter(out / "scores", run, renderer=make_renderer(),
                                 train_example=(lambda i: train_ds[int(i)]) if train_ds is not None else None,
                                 query_example=(lambda i: query_ds[int(i)]) if query_ds is not None else None)
    folder = reporter.report(result.scores, step=0, period=f"query-{len(result.periods)}-periods")
    reporter.finish()
    print(f"scores of {result.query_ids.numel()} queries over {len(result.periods)} period(s) written to {folder}")
    return 0
