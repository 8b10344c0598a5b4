"""The Lightning callback: orchestration only, over the engine in ``capture``/``store``/``fisher``/``scoring``.

Timeline of one fit:

* ``setup``: find the layers, build the plans, open the store (per rank) and the reporter.
* each training batch: indices and the per-example scale are set at batch start; the taps ride on
  the real backward; ``on_after_backward`` moves the compressed rows to the store and the Fisher
  statistics. Rows are labelled with a running batch counter (saved in checkpoints).
* each scoring period (epoch end by default): flush, sum-reduce a copy of the Fisher statistics
  across ranks, fit, compute query gradients (eval mode, ``param.grad`` untouched), score the
  period's rows, add to the running data value, log the scalars; the tables at the first period,
  every ``report_every_n_periods``-th and the last (at the end of fit).
* checkpoints: the store is flushed first; on resume rows newer than the checkpoint are dropped
  and the period's Fisher statistics are rebuilt from the store, so nothing is counted twice. A
  fit that starts without a checkpoint drops the rows a killed run left in the store (a store
  whose run finished, marked by ``train-finished.json``, is refused instead). An epoch
  whose end-of-epoch scoring was lost (the checkpoint came from its last batch) is scored when
  training resumes. The data value lives in the checkpoint only, so a kill anywhere (capture,
  shard write, scoring, checkpoint save) and a resume from the last checkpoint give the
  uninterrupted run's result (``tests/test_crash.py``). Mid-epoch resume also needs a resumable
  train loader (``state_dict``/``load_state_dict``), or Lightning replays the epoch's first batches.

Distributed (Lightning DDP): every rank taps its own batches and writes its own shards and
manifest into one store directory (rank 0's choice, broadcast in ``setup``; with
``Trainer(num_nodes>1)`` it must be on a filesystem every node shares). At a scoring period the
Fisher sums are all-reduced in place (``k x k`` per layer, never gathered), rank 0 computes the
query gradients and broadcasts them, each rank scores its own rows, and the per-rank results
(top-k candidates, per-row self-influence, per-id data values) are merged on every rank. Only rank
0 writes W&B and the local report files. Every rank runs the same collectives in the same order,
including ranks that captured nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from grass_callback import _continuity, _resume as _resume_checks
from grass_callback.attribution import (
    DEFAULT_DAMPING_RATIO,
    capture_pass,
    open_store,
    query_gradients,
    resolve_damping,
    score_store,
)
from grass_callback.capture import LayerTaps, find_layers, per_example_scale
from grass_callback.projection import plan_from_state
from grass_callback._batch_ids import BatchIds
from grass_callback.data import batch_index_field, check_batch_indices, resolve_index_key
from grass_callback.errors import ConfigError, GraSSError
from grass_callback.damping import auto_scales
from grass_callback.fisher import FisherStats, JointFisherStats
from grass_callback.recorder import StepRecorder
from grass_callback.ensembling import ENSEMBLE_WEIGHTINGS, PeriodLearningRate
from grass_callback.scoring import ScoreEnsemble, ScoreResult, merge_results, precondition_queries
from grass_callback.data_value import DataValueSums, ValueTable
from grass_callback.data_value import standardise as standardise_per_query
from grass_callback.sharding import has_sharded_parameters

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["GraSSCallback", "training_step_loss"]

_STATE_VERSION = 1
_MAX_ENSEMBLE_BYTES = 256 * 2**20
_MAX_JOINT_K = 16384  # a joint Fisher of K x K float64: 2 GiB at this size
_DTYPES = ("float16", "bfloat16", "float32")


class GraSSCallback(Callback):
    """Training-data attribution with FactGraSS, during training and at checkpoints.

    Args:
        include, exclude: glob patterns over layer names (default: every ``nn.Linear``/``Conv1D``).
        k: compressed size per layer and example (default 1024). seed: seed of the plans.
        storage_dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        store_dir: where compressed gradients go (default ``<trainer.log_dir>/grass``). Under DDP
            rank 0's choice is used by every rank; with ``num_nodes > 1`` it must be on a
            filesystem all nodes share.
        capture_every_n_steps: capture every n-th training batch; 0 turns in-training capture off.
        score_every_n_steps: score every n training batches; ``None`` (default) scores at each
            epoch end.
        query_loader: the query examples (a ``DataLoader`` or any iterable of batches, or a
            dataset, batched by ``query_batch_size``); default: the validation loader.
        num_queries: how many query examples are scored (default 16).
        topk: proponents and opponents kept per query (default 10).
        damping_ratio: relative damping of each Fisher block, ``λ = r · trace(F) / k``; ``"auto"``
            (default) resolves it per layer at each fit from the layer's Fisher: ``λ = trace(F) /
            min(k, N)``, the mean non-zero eigenvalue, a tenth of it on a vocabulary head such as
            an ``lm_head`` (:mod:`grass_callback.damping`); a number applies to every layer.
        index_key: the batch field holding dataset indices (default: from ``IndexedDataset``).
        loss_reduction: how the training loss reduces over the batch: ``"mean"``, ``"sum"`` or
            ``"token_mean"`` (then ``token_counts(batch) -> [B]`` is required).
        query_loss_fn: ``fn(pl_module, batch) -> scalar loss`` for query batches; default: the
            loss returned by ``training_step`` (its ``self.log`` calls are silenced).
        checkpoint_attribution: ``"off"`` (default), ``"end"`` (one pass over the training set
            at the final weights) or ``"save"`` (at every checkpoint save).
        keep_history: ``"period"`` (default: each period scores its own rows, the data value
            sums periods) or ``"all"`` (every stored row is scored each time).
        renderer, tokenizer: how examples are shown in tables: ``renderer(example) -> cell``, or
            ``{"train": fn, "query": fn}`` per dataset; default: images for image-like samples,
            text decoded with ``tokenizer``, else a short repr (:mod:`grass_callback.render`).
            Label columns come from the samples (``(x, y, index)``, ``label``/``target`` keys).
        wandb_project: project of the run started when the trainer has no ``WandbLogger``.
        log_to_wandb: ``False`` writes local files only. impl: the op implementation.
        progress: progress bars on long passes.
        ensemble: rank the influence tables by scores summed over the scoring periods so far (one
            checkpoint each, TracIn/TRAK-style; better LDS in ``benchmarks/quality.py``); the
            period's own scores stay in ``last_result``. On by default; off past 256 MB. The summed
            matrix is :attr:`ensemble_scores` (``[m, n]``), the summed self-influence
            :attr:`ensemble_self_influence` (``[n]``).
        ensemble_weighting: how periods are weighed in the ensemble and the data value:
            ``"uniform"`` (default, a plain sum) or ``"lr"`` (TracIn: each period times the mean
            learning rate of its steps); see :mod:`grass_callback.ensembling`.
        ensemble_standardise: ``True`` (default): each period's scores are divided, per query, by
            their standard deviation over the period's rows before they are added, so every period
            counts alike (``False``: raw scores, dominated by the periods with the largest
            gradients). Chosen on the quality suite's tuning half (README "In-run ensemble").
        scorer: ``"block"`` (default): a Fisher block per layer; ``"joint"``: one TRAK-style
            ``K x K`` Fisher over all layers together (``K = Σ k``; for few or small layers).
        mask: ``"random"`` (default) masks, or ``"selective"``: the paper's learned masks, fitted at
            the start of training on the factors of ``selective_sample`` training examples (on
            rank 0, shared with the others; a resumed run reuses the store's plans).
        mask_run: random masks keep columns in runs of this many neighbours (``"auto"``: 8 at the
            default ``k`` on layers where the mask keeps at most a quarter of the columns, else 1;
            ``1``: the paper's coordinate-wise masks, slower to gather on wide layers; see
            :func:`grass_callback.projection.run_mask`).
        plan_options: options for every layer's random-mask plan, passed to
            :class:`~grass_callback.projection.FactGraSSPlan`: ``oversample`` (the mask budget
            ``k' ≈ oversample · k``, default 4), ``keep_narrow``, ``wide_output_skew`` (a vocabulary
            head's output-mask skew, default 16) and ``c`` (SJLT non-zeros per coordinate). E.g.
            ``{"oversample": 16}`` narrows the MLPs' gap to a dense projection at about 2-4x the
            kernel time (README "Attribution quality"). Part of the run's config: a resume with
            other options stops with an error.
        rows_per_shard: rows per store shard (default 8192); buffered rows are also committed at
            every checkpoint and scoring period.
        report_every_n_periods: the period's tables (CSVs in ``<store_dir>/scores/<period>/``, the
            W&B tables, histograms and artifact) are written at the first scoring period and every
            n-th after it (default 10), and the last period of ``fit`` is always written (at the
            end of fit). The scalars (condition number, seconds per part, ...) go to W&B every
            period. 1: every period, as before (the tables cost seconds per period with hundreds
            of queries: ``benchmarks/period_cost_mlp.py``).
        per_example_loss_key: when ``training_step`` returns a dict with this key (default
            ``"per_example_loss"``) holding each example's own loss (a float ``[B]`` tensor in
            batch order, e.g. ``F.cross_entropy(logits, y, reduction="none")``), the losses are
            stored beside the rows; those of the first half of training, summed per example, are
            :attr:`training_loss`, and :attr:`suspect` ranks by them too (flipped labels are found
            better: README "Data value"). ``None`` ignores the key.

    Raises:
        ConfigError: an option out of range (at construction).
        CaptureError: no tappable layer, or training batches without dataset indices (at setup /
            first batch), with how to fix it.

    Example::

        import lightning as L
        from grass_callback import GraSSCallback, IndexedDataset

        train = DataLoader(IndexedDataset(train_set), batch_size=32, shuffle=True)
        trainer = L.Trainer(max_epochs=3, callbacks=[GraSSCallback(k=256, num_queries=8)])
        trainer.fit(model, train, val_loader)   # tables under grass/ in W&B, CSVs in the store dir
    """

    def __init__(self, *, include: Any = None, exclude: Any = None, k: int = 1024, seed: int = 0,
                 storage_dtype: str = "float16", store_dir: str | Path | None = None,
                 capture_every_n_steps: int = 1, score_every_n_steps: int | None = None,
                 query_loader: Any = None, query_batch_size: int = 32, num_queries: int = 16, topk: int = 10,
                 damping_ratio: float | str = DEFAULT_DAMPING_RATIO, index_key: str | int | None = None,
                 loss_reduction: str = "mean", token_counts: Callable[[Any], Tensor] | None = None,
                 query_loss_fn: Callable[[Any, Any], Tensor] | None = None, checkpoint_attribution: str = "off",
                 keep_history: str = "period", renderer: Callable[[Any], Any] | None = None, tokenizer: Any = None,
                 wandb_project: str = "grass-callback", log_to_wandb: bool = True, impl: str = "auto",
                 progress: bool = True, rows_per_shard: int = 8192, mask: str = "random",
                 selective_sample: int = 256, scorer: str = "block", ensemble: bool = True,
                 mask_run: int | str = "auto", ensemble_weighting: str = "uniform", ensemble_standardise: bool = True,
                 report_every_n_periods: int = 10, plan_options: Mapping[str, Any] | None = None,
                 per_example_loss_key: str | None = "per_example_loss") -> None:
        self._arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}  # a second fit
        _check_positive(k=k, num_queries=num_queries, topk=topk, query_batch_size=query_batch_size,
                        rows_per_shard=rows_per_shard, report_every_n_periods=report_every_n_periods)
        if not isinstance(capture_every_n_steps, int) or capture_every_n_steps < 0:
            raise ConfigError(f"capture_every_n_steps must be an integer >= 0 (0 = off), got {capture_every_n_steps!r}.")
        if score_every_n_steps is not None:
            _check_positive(score_every_n_steps=score_every_n_steps)
        _check_choice("storage_dtype", storage_dtype, _DTYPES)
        _check_choice("loss_reduction", loss_reduction, ("mean", "sum", "token_mean"))
        _check_choice("checkpoint_attribution", checkpoint_attribution, ("off", "end", "save"))
        _check_choice("keep_history", keep_history, ("period", "all"))
        _check_choice("impl", impl, ("auto", "torch", "cpu", "cuda"))
        _check_choice("mask", mask, ("random", "selective"))
        _check_choice("scorer", scorer, ("block", "joint"))
        _check_choice("ensemble_weighting", ensemble_weighting, ENSEMBLE_WEIGHTINGS)
        if not isinstance(ensemble_standardise, bool):
            raise ConfigError(f"ensemble_standardise must be True or False, got {ensemble_standardise!r}.")
        _check_positive(selective_sample=selective_sample)
        if mask_run != "auto" and (not isinstance(mask_run, int) or isinstance(mask_run, bool) or mask_run < 1):
            raise ConfigError(f"mask_run must be 'auto' or a positive integer (1: coordinate-wise masks), got {mask_run!r}.")
        self.plan_options = _check_plan_options(plan_options, k, mask)
        if per_example_loss_key is not None and not isinstance(per_example_loss_key, str):
            raise ConfigError(f"per_example_loss_key must be a string (a key of the dict training_step returns) "
                              f"or None, got {per_example_loss_key!r}.")
        self.per_example_loss_key = per_example_loss_key
        if loss_reduction == "token_mean" and token_counts is None:
            raise ConfigError("loss_reduction='token_mean' needs token_counts=fn(batch) -> [B] token counts.")
        self.include, self.exclude, self.k, self.seed = include, exclude, k, seed
        self.storage_dtype, self.store_dir = storage_dtype, store_dir
        self.capture_every_n_steps, self.score_every_n_steps = capture_every_n_steps, score_every_n_steps
        self.query_loader, self.query_batch_size = query_loader, query_batch_size
        self.num_queries, self.topk = num_queries, topk
        self.damping_ratio = resolve_damping(damping_ratio, k)
        self.index_key, self.loss_reduction, self.token_counts = index_key, loss_reduction, token_counts
        self.query_loss_fn, self.checkpoint_attribution = query_loss_fn, checkpoint_attribution
        self.keep_history, self.renderer, self.tokenizer = keep_history, renderer, tokenizer
        self.wandb_project, self.log_to_wandb, self.impl, self.progress = wandb_project, log_to_wandb, impl, progress
        self.rows_per_shard, self.report_every_n_periods = rows_per_shard, report_every_n_periods
        self._unreported: dict[str, Any] | None = None  # the last period's tables, when not written yet
        self.mask, self.selective_sample, self.scorer = mask, selective_sample, scorer
        self.ensemble, self.mask_run = bool(ensemble), mask_run
        self.ensemble_weighting, self._period_lr = ensemble_weighting, PeriodLearningRate()
        self.ensemble_standardise = bool(ensemble_standardise)
        self._ensemble: ScoreEnsemble | None = None
        self._pending_ensemble: dict[str, Any] | None = None
        self._ensemble_warned = False
        self.ensemble_result: ScoreResult | None = None
        # built in setup
        self.taps: LayerTaps | None = None
        self.store = None
        self.fisher: FisherStats | None = None
        self.recorder: StepRecorder | None = None
        self.reporter = None
        # progress, saved in checkpoints
        self.batches_seen = 0
        self.period_start = 0
        self.periods_scored = 0
        self.last_batch_epoch = -1  # epoch of the last training batch counted
        self.scored_epoch = -1  # last epoch whose epoch-end scoring ran
        self.data_value: dict[int, float] = {}
        self.last_result: ScoreResult | None = None
        # per batch
        self._ids: BatchIds | None = None  # this batch's dataset indices, on their way to the host
        self._ids_hint, self._host_ids = "", None
        self._rows: tuple[Tensor, dict[str, Tensor], Tensor | None] | None = None  # collected, not yet recorded
        self._loss_window: int | None = None  # rows of batches before it add their loss to training_loss
        self._capture_seconds = 0.0
        self._captured_batches = 0
        self._pending_state: dict[str, Any] | None = None
        self._index_key: Any = None
        self.silent_layers: list[str] = []  # layers reported as getting no gradient
        self.duplicates: list[tuple[int, int, float, int, bool]] = []  # copies of queries, found at the end of fit
        self.period_seconds: dict[str, float] = {}  # the last period's parts (report included)
        self.last_period, self.last_report_folder = "", None
        _continuity.init_state(self)  # lock, (id, epoch) ledger, what checkpoints record

    # ------------------------------------------------------------------ configuration

    @property
    def config(self) -> dict[str, Any]:
        """What must match for a resumed run to continue the same store."""
        return {"k": self.k, "seed": self.seed, "include": self.include, "exclude": self.exclude,
                "loss_reduction": self.loss_reduction, "storage_dtype": self.storage_dtype, "mask": self.mask,
                "scorer": self.scorer, "mask_run": self.mask_run, **_plan_options_config(self.plan_options)}

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.__dict__.get("_fit_ended"):
            self._start_over()
        if stage != "fit" or self.taps is not None:
            return
        if not pl_module.automatic_optimization and self.query_loss_fn is None:
            raise ConfigError(
                "with manual optimization (automatic_optimization=False) the default query loss, which "
                "calls training_step, would run your manual_backward and optimizer.step() on query "
                "batches; pass GraSSCallback(query_loss_fn=fn(pl_module, batch) -> scalar loss).")
        if self.mask == "selective":  # masks are learned from training batches in on_train_start
            find_layers(pl_module, self.include, self.exclude)  # fail now if nothing can be tapped
            return
        self._build(trainer, pl_module, plans=None)

    def _build(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", plans: Any) -> None:
        self.taps = LayerTaps(pl_module, plans=plans, include=self.include, exclude=self.exclude, k=self.k,
                              seed=self.seed, impl=self.impl,
                              plan_options={"mask_run": self.mask_run, **self.plan_options})
        root = self._agreed_root(trainer)
        self.store_dir = str(root)
        _continuity.acquire_lock(self, trainer, root)  # one run per store_dir (rank 0 for all ranks)
        self.store = self._open_train_store(root / "train", trainer.global_rank)
        self.fisher = self._new_fisher()
        self.recorder = StepRecorder(self.store, self.fisher)  # Fisher on the device, rows written in the background
        if trainer.is_global_zero:
            self.reporter = self._make_reporter(trainer, root)
        rank_zero_info(f"grass_callback: tapping {len(self.taps.layers)} layers "
                       f"(k={self.k} each, {self.mask} masks), store at {root}")

    def _open_train_store(self, path: Path, rank: int) -> Any:
        """The run's store; a store written before one-token plans existed gets a mismatch error that
        names the option continuing it (its plans lack only the one-token sizes)."""
        from grass_callback.errors import StoreMismatchError
        from grass_callback.projection import only_one_token_added
        from grass_callback.store import GradientStore

        try:
            return open_store(path, self.taps, dtype=self.storage_dtype, config=self.config, rank=rank,
                              rows_per_shard=self.rows_per_shard)
        except StoreMismatchError as e:
            given = json.loads(json.dumps({n: p.to_state()[0] for n, p in self.taps.plans.items()}))
            if not only_one_token_added(GradientStore(path, readonly=True).plan_config, given):
                raise
            raise StoreMismatchError(f"{e}\nThe store was written before layers without a token axis got their own "
                                     "plan: continue it with GraSSCallback(plan_options={'one_token': False}) (the "
                                     "masks it was written with), or start a new store_dir for the new plans.") from e

    def _new_fisher(self) -> FisherStats:
        if self.scorer == "joint":
            total = sum(self.taps.layer_dims.values())
            if total > _MAX_JOINT_K:
                raise ConfigError(f"scorer='joint' needs a {total} x {total} Fisher over {len(self.taps.layers)} "
                                  f"layers (limit {_MAX_JOINT_K}); tap fewer layers, lower k or use scorer='block'.")
            return JointFisherStats(self.taps.layer_dims)
        stats = FisherStats(self.taps.layer_dims, compute_dtype=torch.float32)
        stats.auto_scales = auto_scales(self.taps.plans)  # a vocabulary head's smaller "auto" damping
        return stats

    def _selective_plans(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, Any]:
        """Learned-mask plans: the store's when resuming, else learned on rank 0 and broadcast."""
        from grass_callback.attribution import plans_from_store
        from grass_callback.capture import layer_shape
        from grass_callback.selective import collect_factors, selective_plans
        from grass_callback.store import GradientStore

        train_dir = self._agreed_root(trainer) / "train"
        if (train_dir / "meta.json").exists():
            return plans_from_store(GradientStore(train_dir, readonly=True))
        states = None
        if trainer.is_global_zero:
            layers = find_layers(pl_module, self.include, self.exclude)[0]
            loader = _on_device(trainer.train_dataloader, pl_module.device)
            with _silenced_logging(pl_module), torch.inference_mode(False), torch.enable_grad():
                factors = collect_factors(pl_module, loader, self.query_loss_fn or _training_step_loss,
                                          layers=layers, reduction=self.loss_reduction,
                                          max_examples=self.selective_sample)
            plans = selective_plans(factors, {n: layer_shape(m) for n, m in layers.items()}, k=self.k,
                                    seed=self.seed)
            states = {n: p.to_state() for n, p in plans.items()}
        if trainer.world_size > 1:
            states = trainer.strategy.broadcast(states, src=0)
        return {n: plan_from_state(cfg, tensors) for n, (cfg, tensors) in states.items()}

    def _agreed_root(self, trainer: "pl.Trainer") -> Path:
        """The store root, rank 0's choice on every rank (``trainer.log_dir`` may differ per rank).

        Every rank writes its own shards and manifest into this one directory, so a multi-node run
        (``Trainer(num_nodes=...)``) needs it on a filesystem all nodes share.
        """
        root = self.store_dir
        if root is None:
            root = Path(trainer.log_dir or trainer.default_root_dir) / "grass"
        if trainer.world_size > 1:
            root = trainer.strategy.broadcast(str(root), src=0)
        return Path(root)

    def _make_reporter(self, trainer: "pl.Trainer", root: Path) -> Any:
        from grass_callback.render import resolve_renderers
        from grass_callback.report import InfluenceReporter, resolve_wandb_run

        train_renderer, query_renderer = resolve_renderers(self.renderer, self.tokenizer)  # one, or per dataset
        run = resolve_wandb_run(trainer, save_dir=str(root), project=self.wandb_project,
                                config={"grass": self.config}) if self.log_to_wandb else None
        return InfluenceReporter(root / "scores", run, renderer=train_renderer, query_renderer=query_renderer,
                                 train_example=_lookup(lambda: self._train_dataset(trainer)),
                                 query_example=_lookup(lambda: self._query_dataset(trainer)))

    def _bars(self, trainer: "pl.Trainer") -> Any:
        """Progress of the long passes: off, or drawn beside Lightning's bar (none in a pipe)."""
        from grass_callback.console import ProgressHost

        return ProgressHost(trainer) if self.progress and trainer.is_global_zero else False

    # ------------------------------------------------------------------ training steps

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.taps is None and self.mask == "selective":
            self._build(trainer, pl_module, plans=self._selective_plans(trainer, pl_module))
        if self.taps is None:
            return
        self._index_key = resolve_index_key(trainer.train_dataloader, self.index_key)
        self._num_train = _dataset_len(trainer.train_dataloader)
        self._loss_window = _loss_window(trainer)
        if self._pending_state is not None:
            self._resume(trainer)
            self._pending_state = None
        else:
            self._start_without_checkpoint()
        _continuity.start_message(self, trainer)
        self.taps.skip([n for n in self.silent_layers if n in self.taps.plans])  # found silent before a resume
        self.taps.attach()
        self._score_missed_epoch(trainer, pl_module)

    def _capturing(self, trainer: "pl.Trainer") -> bool:
        return self.capture_every_n_steps > 0 and self.batches_seen % self.capture_every_n_steps == 0

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.taps is None:
            return
        self._ids, self._rows = None, None
        self._period_lr.observe(trainer)  # the learning rate this step will use
        self.taps.clear()  # a backward whose rows were not stored must not leak into this batch
        self.taps.enabled = self._capturing(trainer)
        if self.taps.enabled:
            self._begin_batch(trainer, batch)

    def _begin_batch(self, trainer: "pl.Trainer", batch: Any) -> None:
        value, self._ids_hint = batch_index_field(batch, self._index_key)
        self._ids, self._keep, self._host_ids = BatchIds(value), None, None  # _host_ids: set once admitted
        _continuity.note_batch(self, batch)
        # on a GPU the indices come to the host during the step and are checked after backward; an
        # epoch a resume may replay reads them now, so a batch stored before is skipped before any work
        if (not self._ids.in_flight or self._ledger.may_replay(trainer.current_epoch)) and not self._admit(trainer):
            self._ids, self._keep, self.taps.enabled = None, None, False
            return
        counts = self.token_counts(batch) if self.token_counts is not None else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grad_scale = _grad_scale(scaler) if scaler is not None and scaler.is_enabled() else None
        self.taps.set_scale(per_example_scale(self._ids.numel, self.loss_reduction, token_counts=counts,
                                              accumulate_grad_batches=trainer.accumulate_grad_batches,
                                              grad_scale=grad_scale, device=trainer.strategy.root_device))

    def _admit(self, trainer: "pl.Trainer") -> bool:
        """Check the batch's host indices and admit its rows (replays after a resume are left out in
        ``self._keep``); ``False`` when no row of the batch is to be stored."""
        ids = self._host_ids = self._ids.host()
        check_batch_indices(ids, self._index_key, num_examples=_dataset_len(trainer.train_dataloader),
                            hint=self._ids_hint)
        self._keep = _continuity.admit(self, trainer, ids)
        return self._keep is None or bool(self._keep.any())

    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # manual optimization may call manual_backward several times per batch: its rows are
        # stored at on_train_batch_end, the sum of the batch's backward passes
        if self.taps is not None and self._ids is not None and pl_module.automatic_optimization:
            self._store_rows(trainer)

    def _store_rows(self, trainer: "pl.Trainer") -> None:
        """Collect the batch's rows from the taps (admitted, replays left out); they are recorded
        at the batch's end, with the per-example losses ``training_step`` returned."""
        start = time.perf_counter()
        grads = self.taps.collect()
        if grads is None:
            return
        if next(iter(grads.values())).shape[0] != self._ids.numel:
            raise GraSSError(f"the batch carries {self._ids.numel} indices but the tapped layers saw "
                             f"{next(iter(grads.values())).shape[0]} examples; is the batch dimension first?")
        if self._host_ids is None and not self._admit(trainer):  # the indices landed during the step
            self._ids, self._keep = None, None
            return
        self._rows = (self._host_ids, grads, self._keep)
        self._keep = None
        self._capture_seconds += time.perf_counter() - start + self.taps.pop_compute_seconds()
        self._captured_batches += 1
        self._ids = None

    def _record_rows(self, trainer: "pl.Trainer", outputs: Any) -> None:
        """Record the collected rows (Fisher on the device, store in the background), with the
        rows' losses when ``training_step`` returned ``per_example_loss_key`` (no host sync)."""
        rows, self._rows = self._rows, None
        if rows is None:
            return
        ids, grads, keep = rows
        loss = self._batch_losses(outputs, len(ids))
        if keep is not None:  # rows whose (id, epoch) the store already holds are left out
            ids, grads = ids[keep], {n: g[keep.to(g.device)] for n, g in grads.items()}
            loss = None if loss is None else loss[keep.to(loss.device)]
        self.recorder.record(ids, grads, self.batches_seen, trainer.current_epoch, loss=loss)

    def _batch_losses(self, outputs: Any, batch: int) -> Tensor | None:
        """The batch's per-example losses from ``training_step``'s dict, checked: float ``[B]``."""
        key = self.per_example_loss_key
        if key is None or not isinstance(outputs, Mapping) or outputs.get(key) is None:
            return None
        loss = outputs[key]
        if not isinstance(loss, Tensor) or not loss.is_floating_point() or loss.shape != (batch,):
            got = f"{tuple(loss.shape)} {loss.dtype}" if isinstance(loss, Tensor) else type(loss).__name__
            raise GraSSError(f"training_step returned {key!r} = {got}; it must be a floating tensor of shape "
                             f"[{batch}], each example's own loss in batch order (e.g. F.cross_entropy(logits, y, "
                             f"reduction='none')), or leave the key out (per_example_loss_key=None ignores it).")
        return loss.detach()

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.taps is None:
            return
        if self._ids is not None:  # manual optimization, or no backward
            self._store_rows(trainer)
        self._record_rows(trainer, outputs)
        self.batches_seen += 1
        self.last_batch_epoch = trainer.current_epoch
        if self.score_every_n_steps and self.batches_seen % self.score_every_n_steps == 0:
            self._score_period(trainer, pl_module, f"step-{self.batches_seen}")

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.taps is not None:
            self._score_missed_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.taps is not None:
            _continuity.end_of_epoch(self, trainer)  # a replayed epoch: what was skipped and missed
        if self.taps is not None and not self.score_every_n_steps:
            self._score_period(trainer, pl_module, f"epoch-{trainer.current_epoch}")
            self.scored_epoch = trainer.current_epoch

    def _score_missed_epoch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Score an epoch whose end hook never ran in this process.

        A checkpoint saved at the last batch of epoch ``e`` (``every_n_train_steps``) comes before
        that epoch's end-of-epoch scoring; resuming from it, Lightning goes straight on to epoch
        ``e + 1`` (or ends), calling neither ``on_train_epoch_end`` for ``e`` nor
        ``on_train_epoch_start`` for ``e + 1``. Called from ``on_train_start``,
        ``on_train_epoch_start`` and ``on_train_end``; the weights have not moved since that batch,
        so scoring now gives what the uninterrupted run got.
        """
        if self.score_every_n_steps or not self.scored_epoch < self.last_batch_epoch < trainer.current_epoch:
            return
        self._score_period(trainer, pl_module, f"epoch-{self.last_batch_epoch}")
        self.scored_epoch = self.last_batch_epoch

    # ------------------------------------------------------------------ scoring

    def _score_period(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", period: str) -> None:
        from grass_callback.console import PeriodClock

        clock = PeriodClock()  # seconds per part of the period, logged as grass/seconds/<part>
        self.recorder.flush()
        clock.lap("flush")
        # reduced across ranks into a copy, so the running sums stay this rank's; one process: no copy
        # (fit only reads the sums; a k x k float64 copy per layer cost 6 s of 59 in period_cost.py)
        stats = copy.deepcopy(self.fisher) if trainer.world_size > 1 else self.fisher
        if trainer.world_size > 1:  # one process: nothing to reduce (and the last rows stay unfolded)
            stats.all_reduce_(_reducer(trainer))
        clock.lap("reduce")
        if stats.count == 0:
            rank_zero_warn(f"grass_callback: no training gradients were captured in {period}; nothing to score.")
            self._end_period()
            return
        fitted = self._fit(stats, period)
        clock.lap("fit")
        q_ids, q_grads = self._query_gradients(trainer, pl_module)
        clock.lap("query_gradients")
        self._check_query_set()
        min_step = self.period_start if self.keep_history == "period" else None
        ensemble = self._ensemble_for(trainer, q_ids)
        # F⁻¹q once: for the scores, and kept for the end-of-fit search for duplicates of queries
        pre = precondition_queries(fitted, {name: q_grads[name].float() for name in self.store.layers})
        self._note_queries(q_ids, q_grads, pre)
        result = score_store(self.store, fitted, q_ids, q_grads, topk=self.topk, min_step=min_step,
                             ranks=[trainer.global_rank], full=ensemble is not None,
                             progress=self._bars(trainer), preconditioned=pre)
        if ensemble is not None:
            self._add_to_ensemble(trainer, ensemble, result)
        result = _merge_across_ranks(trainer, result)
        self._add_data_value(result)
        self._add_losses(trainer, min_step)
        self.last_result = result
        self.periods_scored += 1
        if ensemble is not None:
            result = self.ensemble_result = ensemble.result(self.topk, self.data_value_tensors(), result)
        clock.lap("scoring")
        if trainer.is_global_zero and self.reporter is not None:
            self._report_period(trainer, result, fitted, period, clock)
        self.period_seconds, self.last_period = dict(clock.seconds), period  # report included
        if trainer.is_global_zero:  # the period's row range, for explain() on the finished run
            from grass_callback.explaining import record_period

            record_period(Path(self.store_dir), period=period, min_step=min_step, max_step=self.batches_seen - 1,
                          global_step=trainer.global_step,
                          damping_ratio=getattr(fitted, "requested_damping_ratio", None) or self.damping_ratio,
                          keep_history=self.keep_history, rows=stats.count)
        self._end_period()

    def _fit(self, stats: FisherStats, period: str) -> Any:
        """Fit the Fisher blocks; layers that got no gradient are reported once, with the
        ``exclude=`` to use, instead of a zero-trace warning every period, and are no longer tapped:
        from the next step on their hooks do nothing, and the store writes no rows of them (a layer
        all zero in a shard is not written; it reads back as zeros and scores 0). The list is saved
        in checkpoints, so a resumed run skips them too."""
        from grass_callback.console import silent_layers

        silent = silent_layers(stats)
        new = [n for n in silent if n not in self.silent_layers]
        if new:
            self.silent_layers += new
            self.taps.skip(new)
            rank_zero_warn(f"grass_callback: {len(new)} layer(s) got no gradient in {period} (all their "
                           f"gradients are zero, e.g. a pooler the loss does not use): {new}. They score 0 and are "
                           f"no longer tapped or stored; leave them out with "
                           f"GraSSCallback(exclude={self.silent_layers!r}).")
        with warnings.catch_warnings():
            if silent:
                warnings.filterwarnings("ignore", message=r"Fisher of layer .* has zero trace")
            return stats.fit(self.damping_ratio, rows_dtype=self.store.dtype)

    def _report_period(self, trainer: "pl.Trainer", result: ScoreResult, fitted: Any, period: str,
                       clock: Any) -> None:
        """Scalars (a handful) and per-layer figures of the period, then the reporter (rank 0): the
        tables at the first period and every ``report_every_n_periods``-th, else the scalars only
        (the period's tables are kept, and written at the end of fit if it was the last)."""
        from grass_callback.console import period_figures

        scalars, layers = period_figures(
            fitted, rows_scored=int(result.data_value.numel()), store_bytes=int(self.store.size_bytes()),
            capture_seconds_per_step=self._capture_seconds / max(1, self._captured_batches),
            seconds=clock.seconds, silent=self.silent_layers)
        clock.lap("conditions")  # O(k^2) per layer; not in the logged seconds, which it reports
        tables = {"result": result, "step": trainer.global_step, "period": period, "scalars": scalars,
                  "data_value": self.data_value_tensors(), "layers": layers}
        if (self.periods_scored - 1) % self.report_every_n_periods == 0:
            self._unreported = None
            self.last_report_folder = self.reporter.report(**tables)
        else:
            self._unreported = tables
            self.reporter.report_scalars(step=trainer.global_step, period=period, scalars=scalars)
        clock.lap("report")

    def _report_last_period(self) -> None:
        """Write the last period's tables at the end of fit when its period did not (rank 0)."""
        tables, self._unreported = self._unreported, None
        if tables is not None and self.reporter is not None:
            self.last_report_folder = self.reporter.report(**tables)

    def _print_fit_report(self, trainer: "pl.Trainer") -> None:
        """One short report at the end of ``fit`` (rank 0): tables, top self-influence, findings."""
        result = self.ensemble_result or self.last_result
        if not trainer.is_global_zero or result is None:
            return
        from grass_callback.console import fit_report

        run = self.reporter.run if self.reporter is not None else None
        self.duplicates = self._find_duplicates(trainer)
        rank_zero_info(fit_report(result, periods=self.periods_scored, period=self.last_period,
                                  csv_dir=self.last_report_folder, run=run, silent_layers=self.silent_layers,
                                  seconds=self.period_seconds, duplicates=self.duplicates))

    def _find_duplicates(self, trainer: "pl.Trainer") -> list[tuple[int, int, float, int, bool]]:
        """Training examples that copy a query (rank 0, end of fit): the 64 rows of the last period
        whose gradients are closest to each query's in the Fisher's metric, kept when the examples
        hold the same values or the cosine is >= 0.99 (:func:`grass_callback.console.find_duplicates`).
        Costs one pass over the last period's rows and up to 64 reads of training examples per
        query; a failure is a warning, never a failed fit."""
        noted, result = getattr(self, "_dup_queries", None), self.last_result
        if noted is None or result is None or result.self_influence is None or self.store is None:
            return []
        from grass_callback.console import find_duplicates, gradient_neighbours

        try:
            order = result.self_influence_ids.argsort()
            known_ids, known = result.self_influence_ids[order], result.self_influence.double()[order]

            def row_self(ids: Tensor) -> Tensor:  # the period's gᵀF⁻¹g of each row
                at = torch.searchsorted(known_ids, ids).clamp(max=max(known_ids.numel() - 1, 0))
                hit = known_ids[at] == ids if known_ids.numel() else torch.zeros_like(ids, dtype=torch.bool)
                return torch.where(hit, known[at], torch.zeros((), dtype=torch.float64))

            chunks = self.store.iter_chunks(min_step=noted["min_step"], max_step=noted["max_step"],
                                            dtype=torch.float32)
            ids, cos = gradient_neighbours(noted["pre"], noted["self"], chunks, row_self, candidates=64)
            same = _same_examples(self._train_dataset(trainer), self._query_dataset(trainer), self._index_key)
            return find_duplicates(noted["ids"], ids, cos, same=same)
        except Exception as exc:  # noqa: BLE001 - the report is a courtesy
            rank_zero_warn(f"grass_callback: could not look for duplicates of the queries ({type(exc).__name__}: {exc}).")
            return []

    def _ensemble_for(self, trainer: "pl.Trainer", q_ids: Tensor) -> ScoreEnsemble | None:
        """The running checkpoint ensemble, or ``None`` when it is off or would not fit."""
        if not self.ensemble:
            return None
        n = _dataset_len(trainer.train_dataloader)
        if n is None or ScoreEnsemble.nbytes(q_ids.numel(), n) > _MAX_ENSEMBLE_BYTES:
            if not self._ensemble_warned:
                rank_zero_warn(f"grass_callback: the checkpoint ensemble ({q_ids.numel()} queries x {n} examples) "
                               "is off: the dataset size is unknown or the matrix exceeds 256 MB.")
                self._ensemble_warned = True
            return None
        if self._ensemble is None or self._ensemble.num_examples != n:
            self._ensemble = ScoreEnsemble(n)
            pending, self._pending_ensemble = self._pending_ensemble, None
            if pending is not None and ScoreEnsemble.state_size(pending) not in (None, n):
                rank_zero_warn(f"grass_callback: the saved checkpoint ensemble covers {ScoreEnsemble.state_size(pending)} "
                               f"training examples, the training set now has {n}: the ensemble restarts.")
            elif pending is not None:
                self._ensemble.load_state_dict(pending)
        return self._ensemble

    def _add_to_ensemble(self, trainer: "pl.Trainer", ensemble: ScoreEnsemble, result: ScoreResult) -> None:
        scores, seen, own = ensemble.delta(result) + (ensemble.self_delta(result),)
        if trainer.world_size > 1:  # each rank scored its own rows: sum the pieces
            scores = trainer.strategy.reduce(scores, reduce_op="sum")
            seen = trainer.strategy.reduce(seen, reduce_op="sum")
            own = trainer.strategy.reduce(own, reduce_op="sum")
        z = standardise_per_query(scores, seen > 0)  # once: for the data value and (by default) the ensemble
        self._period_matrix = (scores, seen, z)  # the period's full matrix, for the standardised data value
        ensemble.add(result.query_ids, scores, seen, weight=self._period_lr.weight(self.ensemble_weighting),
                     self_influence=own, standardise=self.ensemble_standardise, standardised=z)
        result.full = result.full_ids = None  # not merged across ranks: the ensemble has it

    @property
    def ensemble_scores(self) -> Tensor | None:
        """The ensemble's summed scores ``[m, n]`` (float64; rows in the order of
        ``ensemble_result.query_ids``, columns = training ids), or ``None`` before the first period."""
        return None if self._ensemble is None else self._ensemble.total

    @property
    def ensemble_self_influence(self) -> Tensor | None:
        """Self-influence summed (weighted) over the ensemble's periods ``[n]`` (0 for ids never
        stored), or ``None`` before the first period."""
        return None if self._ensemble is None else self._ensemble.self_total

    def _end_period(self) -> None:
        self._capture_seconds, self._captured_batches = 0.0, 0
        self._period_lr.reset()
        if self.keep_history == "period":
            self.period_start = self.batches_seen
            self.fisher.reset()

    def _add_data_value(self, result: ScoreResult) -> None:
        """Add the period to the running data values (:class:`~grass_callback.data_value.DataValueSums`):
        the standardised sum from the period's full matrix (kept by ``_add_to_ensemble``), the plain
        sum, the self-influence; each times the period's ensemble weight."""
        matrix = getattr(self, "_period_matrix", None)
        self._period_matrix = None
        sums = self._value_sums()
        if matrix is None and sums.complete and not getattr(self, "_plain_value_warned", False):
            rank_zero_warn("grass_callback: the checkpoint ensemble is off, so a period's full score matrix is not "
                           "kept and data_value is the plain sum over queries and periods (not standardised per "
                           "query); turn the ensemble on (ensemble=True, at most 256 MB of scores) for the default.")
            self._plain_value_warned = True
        sums.add_period(result.data_value_ids, result.data_value, self._period_lr.weight(self.ensemble_weighting),
                        matrix=None if matrix is None else matrix[0], seen=None if matrix is None else matrix[1],
                        standardised=None if matrix is None else matrix[2],
                        self_influence=(result.self_influence_ids, result.self_influence),
                        replace=self.keep_history == "all")  # "all": every row rescored, the latest replaces

    def _add_losses(self, trainer: "pl.Trainer", min_step: int | None) -> None:
        """Add the period's stored training losses of the first half of training (this rank's rows
        from the store, gathered across ranks) to the running ``training_loss``. With
        ``keep_history="all"`` the period reads every stored loss (``min_step`` None) into sums
        that ``_add_data_value`` has just reset."""
        window = self._loss_window
        end = self.batches_seen if window is None else min(self.batches_seen, window)
        ids, losses = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
        if end > (min_step or 0):
            ids, steps, losses = self.store.losses(ranks=[trainer.global_rank], min_step=min_step, max_step=end - 1)
        if trainer.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, (ids, losses))
            ids, losses = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
        periods_without = self.__dict__.pop("_losses_missing_before", 0) if ids.numel() else 0
        if periods_without:
            rank_zero_warn(f"grass_callback: the checkpoint this run resumed from was written by a grass_callback "
                           f"that did not sum training losses, so its {periods_without} scoring "
                           f"period(s) add none: training_loss, and the loss part of suspect, count only the "
                           f"steps recorded since the resume.")
        self._value_sums().add_losses(ids, losses)

    def _value_sums(self) -> DataValueSums:
        if "_data_value_sums" not in self.__dict__:
            self._data_value_sums = DataValueSums()
        return self._data_value_sums

    @property
    def data_value(self) -> dict[int, float]:
        """Training id -> data value: per-query standardised influence summed over queries and
        scoring periods, ``Σ_p w_p Σ_q S_p[q, i] / σ_p[q]`` (:mod:`grass_callback.data_value`; low =
        hurts the queries). The plain sum when the checkpoint ensemble is off (see
        :attr:`data_value_plain`). Assigning ``{}`` restarts every running data value."""
        return self._value_sums().value

    @data_value.setter
    def data_value(self, value: dict[int, float]) -> None:
        sums = self._value_sums()
        if not value:
            sums.reset()
        else:
            sums.sums[sums.value_key] = {int(i): float(v) for i, v in value.items()}

    def data_value_tensors(self) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` of the running data value, highest first; the pair also carries
        ``.suspects = (ids, suspect, data_value, self_influence)`` (and ``training_loss`` fifth
        when the run records per-example losses), most suspect first."""
        sums = self._value_sums()
        ids, values = sums.tensors("value")
        s_ids, s_values = sums.suspects()
        value_of = dict(zip(ids.tolist(), values.tolist()))
        table = (s_ids, s_values, torch.tensor([value_of[i] for i in s_ids.tolist()], dtype=torch.float64),
                 sums.column("self_influence", s_ids))
        if sums.sums["training_loss"]:
            table += (sums.column("training_loss", s_ids),)
        return ValueTable(ids, values, table)

    @property
    def data_value_plain(self) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` highest first: the plain sum ``Σ_p w_p Σ_q S_p[q, i]`` (the data value
        before standardisation; what each period's ``ScoreResult.data_value`` holds)."""
        return self._value_sums().tensors("plain")

    @property
    def self_influence(self) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` highest first: self-influence ``s(i, i)`` summed over the scoring
        periods (times each period's ensemble weight; high = unusual or mislabelled)."""
        return self._value_sums().tensors("self_influence")

    @property
    def training_loss(self) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` highest first: each example's training losses summed over the steps of
        the first half of training that stored its row (as ``training_step`` returned them under
        ``per_example_loss_key``; high = not learnt early). Empty when the run records none."""
        return self._value_sums().tensors("training_loss")

    @property
    def suspect(self) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` most suspect first: 0.3 x the unit rank of ``-data_value`` + 0.7 x that
        of :attr:`self_influence`, in ``[0, 1]`` (:func:`grass_callback.data_value.suspect`); when
        the run records per-example losses, the mean of the unit rank of that and the unit rank of
        :attr:`training_loss` (:func:`grass_callback.data_value.suspect_with_loss`). The examples
        to look at, fix or drop first."""
        return self._value_sums().suspects()

    def _query_source(self, trainer: "pl.Trainer") -> Iterable:
        source = self.query_loader
        if source is None:
            source = trainer.val_dataloaders
            if isinstance(source, (list, tuple)):
                source = source[0] if source else None
            source = _unsharded(source)  # under DDP Lightning gives each rank a share of the validation set
        if source is None:
            raise GraSSError("no query examples: give GraSSCallback(query_loader=...) or a validation loader.")
        if isinstance(source, torch.utils.data.Dataset) and not isinstance(source, torch.utils.data.IterableDataset):
            source = torch.utils.data.DataLoader(source, batch_size=self.query_batch_size)
        return source

    def _query_gradients(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> tuple[Tensor, dict]:
        """The query gradients, computed once on rank 0 and broadcast to the other ranks.

        Under DDP every rank holds the same weights, so one pass is enough; the other ranks wait in
        the broadcast. A failure on rank 0 is broadcast too, so no rank is left waiting.
        """
        if trainer.world_size <= 1 or has_sharded_parameters(pl_module):
            # sharded weights (FSDP) are gathered by every rank in each forward: all ranks compute
            return self._compute_query_gradients(trainer, pl_module)
        payload, error = None, None
        if trainer.is_global_zero:
            try:
                payload = ("ok", self._compute_query_gradients(trainer, pl_module))
            except Exception as exc:
                error, payload = exc, ("error", f"{type(exc).__name__}: {exc}")
        payload = trainer.strategy.broadcast(payload, src=0)
        if error is not None:
            raise error
        if payload[0] != "ok":
            raise GraSSError(f"grass_callback: rank 0 could not compute the query gradients ({payload[1]}).")
        self._query_digest_now = trainer.strategy.broadcast(self._query_digest_now, src=0)
        return payload[1]

    def _note_queries(self, ids: Tensor, grads: Mapping[str, Tensor], pre: Mapping[str, Tensor]) -> None:
        """Keep the period's preconditioned queries ``F⁻¹q`` (``[m, K]``, small; the scores' own) and
        ``qᵀF⁻¹q = Σ_l q_l · (F⁻¹q)_l`` for the end-of-fit search for duplicates of queries; the fit
        itself is not kept."""
        query_self = sum((grads[name].double() * p.double()).sum(1) for name, p in pre.items())
        prev_end = getattr(self, "_dup_prev_end", 0)
        self._dup_queries = {"ids": ids.cpu(), "self": query_self.cpu(), "pre": {n: t.cpu() for n, t in pre.items()},
                             "min_step": self.period_start if self.keep_history == "period" else prev_end,
                             "max_step": self.batches_seen - 1}
        self._dup_prev_end = self.batches_seen

    def _compute_query_gradients(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> tuple[Tensor, dict]:
        # failures name the query batch; a float loss and NaN queries are clear errors
        loss_fn = _resume_checks.checked_loss_fn(self.query_loss_fn or _training_step_loss, self._train_shapes)
        source = _resume_checks.Fingerprint(self._query_source(trainer))  # notices another query set
        loader = _on_device(source, pl_module.device)
        with _silenced_logging(pl_module), torch.inference_mode(False), torch.enable_grad():
            ids, grads = query_gradients(pl_module, self.taps, loader, loss_fn, reduction=self.loss_reduction,
                                         token_counts=self.token_counts, max_queries=self.num_queries,
                                         progress=self._bars(trainer))
        _resume_checks.check_query_gradients(ids, grads)
        self._query_digest_now = source.hexdigest()
        return ids, grads

    def _check_query_set(self) -> None:
        """At the first period after a resume: another query set restarts the data value and ensemble."""
        saved, self._query_digest_saved = self._query_digest_saved, None
        if saved is not None and saved != self._query_digest_now:
            rank_zero_warn("grass_callback: the query examples differ from those the checkpoint's scoring periods "
                           "used (another query set on resume, or a shuffled query loader: use shuffle=False); "
                           "the data value and the checkpoint ensemble restart from this period, since sums over "
                           "different queries mean nothing. Resume with the same queries to continue them.")
            self.data_value, self._ensemble, self._pending_ensemble = {}, None, None
        self._query_digest = self._query_digest_now

    # ------------------------------------------------------------------ checkpoint-time attribution

    def _checkpoint_attribution(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", tag: str) -> None:
        root = Path(self.store_dir) / f"checkpoint-{tag}"
        store = open_store(root, self.taps, dtype=self.storage_dtype, config={**self.config, "mode": tag},
                           rank=trainer.global_rank)
        fisher = self._new_fisher()
        loader = _on_device(trainer.train_dataloader, pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with self.taps, torch.enable_grad(), _silenced_logging(pl_module):
                capture_pass(pl_module, self.taps, loader, self.query_loss_fn or _training_step_loss,
                             store=store, fisher=fisher, index_key=self._index_key or self.index_key,
                             reduction=self.loss_reduction, token_counts=self.token_counts,
                             step=trainer.global_step, progress=self._bars(trainer))
                q_ids, q_grads = self._query_gradients(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        fisher.all_reduce_(_reducer(trainer))
        fitted = fisher.fit(self.damping_ratio, rows_dtype=store.dtype)
        result = _merge_across_ranks(trainer, score_store(store, fitted, q_ids, q_grads, topk=self.topk,
                                                          ranks=[trainer.global_rank], progress=False))
        store.close()
        if trainer.is_global_zero and self.reporter is not None:
            self.reporter.report(result, step=trainer.global_step, period=f"checkpoint-{tag}",
                                 data_value=(result.data_value_ids, result.data_value))
        self.last_checkpoint_result = result

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.taps is None:
            return
        self._score_missed_epoch(trainer, pl_module)  # resumed from a checkpoint at the very last batch
        if self.score_every_n_steps and self.batches_seen % self.score_every_n_steps:  # the last, short period
            self._score_period(trainer, pl_module, f"step-{self.batches_seen}")
        self.recorder.flush()
        _continuity.final_count(self, trainer)  # rows a replay never reached, counted from the store
        if trainer.is_global_zero:
            _write_json_atomic(self._finished_marker(), {"batches_seen": self.batches_seen,
                                                         "global_step": trainer.global_step,
                                                         "world_size": trainer.world_size})
        self._report_last_period()
        if self.checkpoint_attribution == "end":
            self.taps.remove()
            self._checkpoint_attribution(trainer, pl_module, f"end-step{trainer.global_step}")
        self._print_fit_report(trainer)

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        if self.recorder is not None:
            self.recorder.flush()  # every row up to this checkpoint is committed before it exists
        if self.checkpoint_attribution == "save" and self.taps is not None:
            attached = self.taps.attached
            self.taps.remove()
            self._checkpoint_attribution(trainer, pl_module, f"step{trainer.global_step}")
            if attached:
                self.taps.attach()

    @override
    def state_dict(self) -> dict[str, Any]:
        ids, values = self.data_value_tensors()
        return {"version": _STATE_VERSION, "store_dir": self.store_dir, "config": dict(self.config),
                "batches_seen": self.batches_seen, "period_start": self.period_start,
                "periods_scored": self.periods_scored, "last_batch_epoch": self.last_batch_epoch,
                "scored_epoch": self.scored_epoch, "data_value_ids": ids, "data_value": values,
                "data_values": self._value_sums().state_dict(),  # every running sum of grass_callback.data_value
                # loaded but not used yet (a resume before the next period) is saved as it came
                "ensemble": self._ensemble.state_dict() if self._ensemble is not None else self._pending_ensemble,
                "silent_layers": list(self.silent_layers), **_continuity.state_extras(self)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            rank_zero_warn(f"grass_callback: checkpoint state version {state_dict.get('version')} differs from "
                           f"{_STATE_VERSION}; reading what matches.")
        saved = state_dict.get("config", {})
        if saved and saved != self.config:
            raise ConfigError(f"this checkpoint was written with GraSSCallback settings {saved}, but the "
                              f"callback now has {self.config}; resume with the same settings or start a new "
                              "store_dir.")
        if state_dict.get("store_dir") and self.store_dir is None:
            self.store_dir = state_dict["store_dir"]
        self._pending_state = dict(state_dict)
        self.silent_layers = list(state_dict.get("silent_layers", []))  # not tapped again on resume
        _continuity.load_plain_state(self, state_dict)  # progress and data value now, the store at train start
        sums = self._value_sums()
        if state_dict.get("data_values") is not None:
            sums.load_state_dict(state_dict["data_values"])
            # written before training losses were summed: its periods' losses are not in the sums
            missing = "training_loss_ids" not in state_dict["data_values"]
            self._losses_missing_before = sums.periods if missing else 0  # the periods without losses
        elif sums.value:  # written before the standardised data value: its data value was the plain sum
            plain = dict(sums.value)
            sums.reset()
            sums.sums["plain"], sums.complete = plain, False
        if self.taps is not None and self.store is not None and self.store.path != Path(self.store_dir) / "train":
            rank_zero_warn("grass_callback: the checkpoint's store_dir differs from the one opened; "
                           "pass store_dir= explicitly to continue the old store.")

    def _resume(self, trainer: "pl.Trainer") -> None:
        """Continue from the loaded state: damaged shards checked, newer rows dropped, the Fisher and
        the (id, epoch) ledger rebuilt from the store (see ``grass_callback._continuity.resume``)."""
        _continuity.resume(self, trainer)

    def _start_without_checkpoint(self) -> None:
        """A fit that does not resume: refuse a store a finished run wrote; drop what a killed one left.

        A killed run's rows are useless without its checkpoint (a fresh fit re-creates them), and
        keeping them would store each (example, epoch) twice. A finished run's rows are kept: the
        fit stops with a ConfigError instead. The marker file is the same for every rank, so all
        ranks take the same branch.
        """
        marker = self._finished_marker()
        if self.batches_seen == 0 and marker.exists() and self.store.num_rows:
            raise ConfigError(f"grass_callback: store_dir {self.store_dir} already holds {self.store.num_rows} "
                              f"rows of a finished run ({marker.name}); continue that run with "
                              "trainer.fit(..., ckpt_path=...), or give this one a new store_dir.")
        self._drop_rows_after(self.batches_seen, warn="no checkpoint to resume from")
        _continuity.start_fresh(self)

    def _finished_marker(self) -> Path:
        return Path(self.store_dir) / "train-finished.json"

    def _drop_rows_after(self, batches: int, warn: str | None = None) -> int:
        """Drop this rank's stored rows of batches ``>= batches``: a killed run wrote them after the
        state we continue from, and they are about to be captured again (each (example, epoch) once).
        ``warn``: why, when the user should hear about it.
        """
        dropped = self.store.truncate_after(batches - 1)
        if dropped and warn:
            warnings.warn(f"grass_callback: {warn}, so dropped {dropped} rows of rank {self.store.rank} that "
                          f"{self.store.path} held from batch {batches} on (left by a run killed before it "
                          "finished); use a new store_dir to keep them.", stacklevel=2)
        return dropped

    # ------------------------------------------------------------------ clean-up

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._close()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._close()

    def _start_over(self) -> None:
        """A second ``fit`` with this callback: its first fit closed the store and tapped another
        module (or the same one, in another trainer), so it starts as a new ``GraSSCallback`` with the
        same arguments would. The first fit's results stay on disk; a resume (``ckpt_path``) then
        continues from the checkpoint, and a fit without one meets the store_dir's usual checks (a
        finished run's store is refused, a killed run's rows are dropped, each with its message)."""
        arguments = self._arguments
        self.__dict__.clear()
        self.__init__(**arguments)

    def _close(self) -> None:
        self._fit_ended = True  # the next fit starts over (setup)
        try:
            if self.taps is not None:
                self.taps.remove()
            if self.recorder is not None:
                self.recorder.close()  # drains and joins the writer thread; never raises
            if self.store is not None and not self.store.closed:
                self.store.close()
            if self.reporter is not None:
                self.reporter.finish()
                self.reporter = None
        finally:  # a failed final flush (disk full) must not leave the store locked
            _continuity.release_lock(self)

    def _train_dataset(self, trainer: "pl.Trainer") -> Any:
        return getattr(trainer.train_dataloader, "dataset", None)

    def _query_dataset(self, trainer: "pl.Trainer") -> Any:
        try:
            return getattr(self._query_source(trainer), "dataset", None)
        except GraSSError:
            return None


# ---------------------------------------------------------------------- helpers


def _loss_window(trainer: "pl.Trainer") -> int | None:
    """The first batch after the first half of training (rows before it add their loss to
    ``training_loss``): half of the fit's batches, from Lightning's estimate of its optimizer steps;
    ``None`` (every batch) when the fit has no end (``max_epochs=-1`` without ``max_steps``)."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - no estimate (e.g. an iterable loader without a length)
        return None
    if not math.isfinite(steps) or steps <= 0:
        return None
    return int(math.ceil(steps * max(1, int(trainer.accumulate_grad_batches)) / 2))


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


_PLAN_OPTIONS = ("oversample", "keep_narrow", "wide_output_skew", "c", "one_token")


def _check_plan_options(options: Mapping[str, Any] | None, k: int, mask: str) -> dict[str, Any]:
    """``plan_options`` as a plain dict, checked now by building a small plan with them."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"plan_options must be a mapping of option -> value, got {type(options).__name__}.")
    unknown = sorted(set(options) - set(_PLAN_OPTIONS))
    if unknown:
        hint = " (use GraSSCallback(mask_run=...))" if "mask_run" in unknown else ""
        raise ConfigError(f"plan_options takes {list(_PLAN_OPTIONS)}, got {unknown}{hint}.")
    if options and mask != "random":
        raise ConfigError(f"plan_options apply to mask='random' plans; mask={mask!r} learns its own masks.")
    from grass_callback.errors import PlanError
    from grass_callback.projection import FactGraSSPlan

    try:
        FactGraSSPlan(64, 64 * 64, k=k, name="plan_options check", **dict(options))
    except (PlanError, TypeError) as e:
        raise ConfigError(f"plan_options {dict(options)!r} are not valid for k={k}: {e}") from e
    return dict(options)


def _plan_options_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """``plan_options`` as the run's config records them. ``one_token`` is left out: the store's
    plan configs already say whether each layer has a one-token plan, and a store written before
    there were any is continued with ``one_token=False`` under the config it was written with."""
    kept = {key: value for key, value in options.items() if key != "one_token"}
    return {"plan_options": kept} if kept else {}


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}.")


def _dataset_len(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except Exception:
        return None


def _same_examples(train: Any, query: Any, index_key: Any) -> Callable[[int, int], bool | None] | None:
    """``same(query_id, train_id)``: whether the two samples hold the same values, their index
    field left out (``None`` when a sample cannot be read)."""
    from grass_callback.console import same_example
    from grass_callback.data import IndexedDataset

    if train is None or query is None:
        return None

    def raw(ds: Any, i: int) -> Any:
        if isinstance(ds, IndexedDataset):
            return ds.dataset[i]
        sample = ds[i]
        if isinstance(index_key, str) and isinstance(sample, Mapping):
            return {k: v for k, v in sample.items() if k != index_key}
        if isinstance(index_key, int) and isinstance(sample, tuple):
            return sample[:index_key] + sample[index_key + 1:] if index_key >= 0 else \
                sample[:index_key] + (sample[index_key + 1:] if index_key != -1 else ())
        return sample

    def same(qid: int, tid: int) -> bool | None:
        try:
            return same_example(raw(query, qid), raw(train, tid))
        except Exception:  # noqa: BLE001 - an unreadable sample: not compared
            return None

    return same


def _lookup(get_dataset: Callable[[], Any]) -> Callable[[int], Any]:
    def lookup(i: int) -> Any:
        ds = get_dataset()
        return None if ds is None else ds[int(i)]

    return lookup


def training_step_loss(pl_module: Any, batch: Any) -> Tensor:
    """The loss ``pl_module.training_step(batch, 0)`` returns, its ``self.log`` calls dropped.

    The callback's default query loss, and a ready ``loss_fn`` for
    :func:`grass_callback.attribute` on a LightningModule (the CLI uses it).
    """
    with _silenced_logging(pl_module):
        return _training_step_loss(pl_module, batch)


def _training_step_loss(pl_module: Any, batch: Any) -> Tensor:
    out = pl_module.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor):
        raise GraSSError("training_step returned no loss for a query batch; pass query_loss_fn=fn(module, batch).")
    return loss


@contextlib.contextmanager
def _silenced_logging(pl_module: Any) -> Iterator[None]:
    """``self.log`` calls in ``training_step`` are dropped while queries are computed (re-entrant)."""
    if "log" in vars(pl_module):  # an outer call already silenced it and will restore it
        yield
        return
    pl_module.log = lambda *a, **k: None
    pl_module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def _on_device(loader: Iterable, device: torch.device) -> Iterable:
    from grass_callback.data import move_to_device

    class _Moved:
        dataset = getattr(loader, "dataset", None)

        def __iter__(self) -> Iterator[Any]:
            for batch in loader:
                yield move_to_device(batch, device)

        def __len__(self) -> int:
            return len(loader)  # type: ignore[arg-type]

    return _Moved()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def _unsharded(loader: Any) -> Any:
    """``loader`` without the ``DistributedSampler`` Lightning adds under DDP (same dataset, batches,
    collate), so every rank sees the same first ``num_queries`` examples as a single process."""
    from torch.utils.data import DataLoader, DistributedSampler

    if not isinstance(loader, DataLoader):
        return loader
    sampler = loader.sampler if loader.batch_sampler is None else getattr(loader.batch_sampler, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def _grad_scale(scaler: Any) -> Tensor | float:
    """The GradScaler's current scale as its device tensor (``get_scale()`` would sync on a GPU);
    before the first scaled step there is no tensor yet, and ``get_scale()`` returns the initial float."""
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else float(scaler.get_scale())


def _reducer(trainer: "pl.Trainer") -> Callable[[Tensor], Tensor] | None:
    if trainer.world_size <= 1:
        return lambda t: t
    return None  # FisherStats' default: torch.distributed all_reduce(SUM) in place


def _merge_across_ranks(trainer: "pl.Trainer", result: ScoreResult) -> ScoreResult:
    """Every rank's scores of its own rows, merged (top-k re-selected, data values summed) on every
    rank, so the running data value (and the checkpoint rank 0 writes) covers all ranks' rows.
    Only top-k candidates, per-row values and per-id sums travel; never a ``k x k`` matrix."""
    if trainer.world_size <= 1:
        return result
    import torch.distributed as dist

    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, result)
    return merge_results(gathered)
