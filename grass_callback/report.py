"""Influence results as W&B tables, histograms and artifacts, with a local copy on disk.

Three pieces:

* :func:`render_example` / :func:`make_renderer` (from :mod:`grass_callback.render`): how one
  training or query example is shown in a table cell (an image, decoded text, or a short
  ``repr``), and :func:`~grass_callback.render.example_label`: the label column.
* :func:`resolve_wandb_run`: which W&B run to log to (the Trainer's ``WandbLogger`` run, an
  already active run, or a new run that defaults to offline mode), as a :class:`RunHandle`
  that remembers whether we started it.
* :class:`InfluenceReporter`: writes one scoring period's results to ``out_dir/<period>/``
  (always, first) and then logs them to the run (if any).

**Sign convention** (stated in every CSV and in the run summary ``grass/sign_convention``): a
positive score means training on the example lowers the query's loss (a *proponent*); a
negative score means it raises it (an *opponent*). The data value of a training example is
its score summed over the queries (and over the periods it was scored in).

``wandb`` is imported only inside the functions that need it, so ``import grass_callback``
stays fast.

Example::

    handle = resolve_wandb_run(trainer, save_dir="logs")           # None: local files only
    reporter = InfluenceReporter("logs/grass/scores", handle, train_example=train_ds.__getitem__,
                                 renderer=make_renderer(tokenizer))
    folder = reporter.report(result, step=trainer.global_step, period="epoch-0")
    reporter.finish()
"""

from __future__ import annotations

import csv
import io
import json
import math
import netrc
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from grass_callback.data_value import SUSPECT_LOSS_WEIGHT, SUSPECT_VALUE_WEIGHT
from grass_callback.render import _truncate, example_label, make_renderer, render_example

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

    from .scoring import ScoreResult

__all__ = [
    "SIGN_CONVENTION",
    "RunHandle",
    "render_example",
    "make_renderer",
    "resolve_wandb_run",
    "InfluenceReporter",
]

SIGN_CONVENTION = (
    "score > 0: training on train_id lowers the query's loss (proponent); "
    "score < 0: training on train_id raises the query's loss (opponent); "
    "data_value = score summed over queries (the callback's running value: each query's scores divided "
    "by their standard deviation over the training rows, summed over periods); "
    f"suspect in [0, 1]: {SUSPECT_VALUE_WEIGHT:g} x the unit rank of low data_value + "
    f"{1 - SUSPECT_VALUE_WEIGHT:g} x that of high self-influence; when training_step returns per-example "
    f"losses, {1 - SUSPECT_LOSS_WEIGHT:g} x that + {SUSPECT_LOSS_WEIGHT:g} x the unit rank of high "
    "training_loss (each example's losses summed over the first half of training)"
)

# ----------------------------------------------------------------------------- W&B run


@dataclass
class RunHandle:
    """A W&B run and whether grass_callback started it (only owned runs are finished)."""

    run: Any
    owned: bool


_warned_local_only = False


def _warn(message: str, trainer: Any = None) -> None:
    if trainer is not None:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(message)
    else:
        warnings.warn(message, stacklevel=3)


def _info(message: str, trainer: Any = None) -> None:
    if trainer is not None:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(message)


def _local_only(reason: str, trainer: Any) -> None:
    global _warned_local_only
    if not _warned_local_only:
        _warned_local_only = True
        _warn(f"grass_callback: {reason}; influence results are written to local files only.", trainer)


def _trainer_wandb_logger(trainer: Any) -> Any:
    loggers = getattr(trainer, "loggers", None)
    if loggers is None:
        single = getattr(trainer, "logger", None)
        loggers = [] if single is None else [single]
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning is a dependency
        WandbLogger = None  # noqa: N806
    for logger in loggers:
        if (WandbLogger is not None and isinstance(logger, WandbLogger)) or type(logger).__name__ == "WandbLogger":
            return logger
    return None


def _has_api_key() -> bool:
    """Whether W&B credentials are configured, without touching the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:  # wandb's own lookup (session login, netrc); internal API, so guarded
        from wandb.sdk.lib import wbauth

        if wbauth.session_credentials(host=base_url) is not None or wbauth.read_netrc_auth(host=base_url):
            return True
    except Exception:  # noqa: BLE001 - fall back to reading the netrc file ourselves
        pass
    host = urlparse(base_url).hostname or base_url
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_run(trainer: pl.Trainer | Any = None, save_dir: str | os.PathLike | None = None,
                      project: str = "grass-callback", name: str | None = None,
                      config: Mapping[str, Any] | None = None) -> RunHandle | None:
    """The W&B run to log influence results to, or ``None`` for local files only.

    In order:

    1. the ``.experiment`` of a ``WandbLogger`` among ``trainer.loggers`` (not owned);
    2. ``None`` (with a one-time warning) if wandb is not installed or ``WANDB_MODE=disabled``;
    3. the already active ``wandb.run``, if any (not owned);
    4. a new run (owned) in ``save_dir`` (default: the trainer's log dir), with
       ``mode = WANDB_MODE or "offline"``. ``WANDB_MODE=online`` without an API key
       (``WANDB_API_KEY``, a login in this process, or ``~/.netrc``) falls back to offline
       with a warning, so nothing waits on the network.

    ``config`` is added to the run's config. A failing ``wandb.init`` gives a warning and
    ``None``.
    """
    if trainer is not None:
        logger = _trainer_wandb_logger(trainer)
        if logger is not None:
            try:
                run = logger.experiment
                if config:
                    run.config.update(dict(config), allow_val_change=True)
                return RunHandle(run, owned=False)
            except Exception as exc:  # noqa: BLE001 - never fail training over W&B
                _local_only(f"the Trainer's WandbLogger could not start its run ({exc!r})", trainer)
                return None
    mode = (os.environ.get("WANDB_MODE") or "offline").strip().lower()
    if mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        _local_only("W&B is disabled (WANDB_MODE=disabled)", trainer)
        return None
    try:
        import wandb
    except ImportError:
        _local_only("wandb is not installed", trainer)
        return None
    if getattr(wandb, "run", None) is not None:
        run = wandb.run
        if config:
            try:
                run.config.update(dict(config), allow_val_change=True)
            except Exception as exc:  # noqa: BLE001
                _warn(f"grass_callback: could not add the config to the active W&B run ({exc!r}).", trainer)
        return RunHandle(run, owned=False)
    if mode == "dryrun":
        mode = "offline"
    elif mode == "run":
        mode = "online"
    if mode not in ("online", "offline", "shared"):
        _warn(f"grass_callback: unknown WANDB_MODE={mode!r}; using offline mode.", trainer)
        mode = "offline"
    if mode != "offline" and not _has_api_key():
        _warn(f"grass_callback: WANDB_MODE={mode} but no W&B API key is configured (WANDB_API_KEY, "
              "`wandb login` or ~/.netrc); logging offline instead. Upload later with `wandb sync`.", trainer)
        mode = "offline"
    if save_dir is None and trainer is not None:
        save_dir = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None)
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
    try:
        run = wandb.init(mode=mode, dir=None if save_dir is None else str(save_dir), project=project, name=name,
                         config=dict(config) if config else None)
    except Exception as exc:  # noqa: BLE001
        _local_only(f"wandb.init failed ({exc!r})", trainer)
        return None
    _info(f"grass_callback: logging influence results to W&B run {run.id} ({mode}) in {run.dir}", trainer)
    return RunHandle(run, owned=True)


# ----------------------------------------------------------------------------- local files


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "period"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _scalars_json(step: int, period: str, scalars: Mapping[str, float]) -> str:
    return json.dumps({"step": int(step), "period": str(period), "sign_convention": SIGN_CONVENTION,
                       "scalars": dict(scalars)}, indent=2, allow_nan=True) + "\n"


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    buf.write(f"# sign convention: {SIGN_CONVENTION}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _ids_values(ids: Tensor | None, values: Tensor | None, what: str) -> tuple[list[int], list[float]]:
    if ids is None or values is None:
        return [], []
    ids = torch.as_tensor(ids).reshape(-1)
    values = torch.as_tensor(values).reshape(-1)
    if ids.numel() != values.numel():
        raise ValueError(f"{what}: {ids.numel()} ids but {values.numel()} values.")
    return [int(i) for i in ids.tolist()], [float(v) for v in values.double().tolist()]


def _sorted_desc(ids: list[int], values: list[float]) -> list[tuple[int, float]]:
    """Pairs highest value first (NaN last), ties by id."""
    return sorted(zip(ids, values), key=lambda p: (math.isnan(p[1]), -p[1] if not math.isnan(p[1]) else 0.0, p[0]))


def _influence_rows(result: ScoreResult) -> list[tuple[int, int, int, float, str]]:
    """``(query_id, rank, train_id, score, kind)``; rank 1 is the strongest; -1 padding skipped."""
    rows = []
    query_ids = [int(q) for q in torch.as_tensor(result.query_ids).reshape(-1).tolist()]
    parts = ((result.top_ids, result.top_scores, "proponent"), (result.bottom_ids, result.bottom_scores, "opponent"))
    for r, qid in enumerate(query_ids):
        for ids, scores, kind in parts:
            id_row, score_row = ids[r].tolist(), scores[r].double().tolist()
            for rank, (tid, score) in enumerate(zip(id_row, score_row), start=1):
                if int(tid) >= 0:
                    rows.append((qid, rank, int(tid), float(score), kind))
    return rows


# ----------------------------------------------------------------------------- reporter

class InfluenceReporter:
    """Writes each scoring period's influence results to disk, then to a W&B run.

    Args:
        out_dir: root folder; each period goes to ``out_dir/<period>/``.
        run_handle: from :func:`resolve_wandb_run`; ``None`` writes local files only.
        train_example / query_example: ``id -> example`` lookups for the table cells
            (``None``: the example columns hold ``None``).
        renderer: ``example -> cell`` for training examples (default :func:`render_example`);
            also for queries unless ``query_renderer`` is given. A failing renderer falls back to
            a short ``repr``.
        label: ``example -> label or None`` (default :func:`~grass_callback.render.example_label`);
            a table gets a label column (``query_label`` / ``train_label``) when some of its
            examples carry one.
        max_rows: rows in the self-influence table, and in each group (most / least valuable)
            of the data-value table.

    Files per period (each CSV starts with a ``# sign convention`` comment line):
    ``influence.csv`` (query_id, rank, train_id, score, kind; rank 1 = strongest, kind
    proponent / opponent, padding skipped), ``self_influence.csv`` (train_id,
    self_influence, highest first), ``data_value.csv`` (train_id, data_value, highest first),
    ``suspects.csv`` (train_id, suspect, data_value, self_influence, and training_loss when the run
    recorded per-example losses; most suspect first; when the data value carries a suspect table,
    as the callback's does),
    ``layers.csv`` (one row of per-layer figures per layer, when given), ``scalars.json`` (step,
    period, sign_convention, scalars).

    A period the caller does not write the tables of goes to :meth:`report_scalars` instead:
    ``scalars.json`` and the scalars to the run.

    W&B (one ``run.log`` call per period): tables ``grass/influence`` (query_id, query,
    [query_label], rank, train_id, train_example, [train_label], score, kind),
    ``grass/self_influence``, ``grass/data_value``, ``grass/suspects`` (with ``suspects.csv``),
    ``grass/layers``, histograms
    ``grass/self_influence_hist``, ``grass/data_value_hist``, scalars ``grass/<name>``. Scalars
    named ``seconds/<part>`` stay out of the run summary (``define_metric(..., summary="none")``),
    so it keeps a handful of lines; the sign convention is the summary key ``grass/sign_convention``; the period folder
    is the artifact ``grass-scores-<period>`` (type ``grass-scores``).
    """

    def __init__(self, out_dir: str | os.PathLike, run_handle: RunHandle | None = None, *,
                 train_example: Callable[[int], Any] | None = None,
                 query_example: Callable[[int], Any] | None = None,
                 renderer: Callable[[Any], Any] | None = None, query_renderer: Callable[[Any], Any] | None = None,
                 label: Callable[[Any], Any] | None = example_label, max_rows: int = 50) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}.")
        self.out_dir = Path(out_dir)
        self.run_handle = run_handle
        self.train_example, self.query_example = train_example, query_example
        self.renderer = renderer if renderer is not None else make_renderer()
        self.query_renderer = query_renderer if query_renderer is not None else self.renderer
        self.label = label
        self.max_rows = max_rows
        self._metrics_defined: set[str] = set()

    @property
    def run(self) -> Any:
        return None if self.run_handle is None else self.run_handle.run

    # ------------------------------------------------------------------ public

    def report(self, result: ScoreResult, *, step: int, period: str, scalars: Mapping[str, float] | None = None,
               data_value: tuple[Tensor, Tensor] | None = None,
               layers: Mapping[str, Mapping[str, float]] | None = None) -> Path:
        """Write ``result`` to ``out_dir/<period>/`` and log it to the run; returns the folder.

        ``data_value``: ``(ids, values)`` written instead of ``result.data_value*`` (the
        caller's running, accumulated value); one with a ``suspects`` attribute
        (:class:`~grass_callback.data_value.ValueTable`) also writes the suspect table. ``layers``: per-layer figures, ``{layer: {name:
        value}}`` (e.g. the Fisher condition number), written as ``layers.csv`` and the W&B
        table ``grass/layers``. ``period`` is made file-name safe. A W&B failure is a warning;
        the local files are written before W&B is touched.
        """
        folder = self.out_dir / _safe_name(period)
        folder.mkdir(parents=True, exist_ok=True)
        influence = _influence_rows(result)
        self_inf = _sorted_desc(*_ids_values(result.self_influence_ids, result.self_influence, "self_influence"))
        if data_value is None:
            data_value = (result.data_value_ids, result.data_value)
        value = _sorted_desc(*_ids_values(data_value[0], data_value[1], "data_value"))
        suspects = _suspect_rows(getattr(data_value, "suspects", None))
        scalar_values = {str(k): float(v) for k, v in (scalars or {}).items()}
        layer_header, layer_rows = _layer_rows(layers or {})

        files = {
            "influence.csv": _csv_text(["query_id", "rank", "train_id", "score", "kind"], [list(r) for r in influence]),
            "self_influence.csv": _csv_text(["train_id", "self_influence"], [list(p) for p in self_inf]),
            "data_value.csv": _csv_text(["train_id", "data_value"], [list(p) for p in value]),
            "scalars.json": _scalars_json(step, period, scalar_values),
        }
        if suspects is not None:
            files["suspects.csv"] = _csv_text(_SUSPECT_COLUMNS[: len(suspects[0]) if suspects else 4], suspects)
        if layer_rows:
            files["layers.csv"] = _csv_text(layer_header, layer_rows)
        for filename, text in files.items():
            _atomic_write(folder / filename, text)

        if self.run is not None:
            try:
                self._log_to_wandb(folder, list(files), influence, self_inf, value, scalar_values, int(step), period,
                                   (layer_header, layer_rows), suspects)
            except Exception as exc:  # noqa: BLE001 - results are safe on disk
                warnings.warn(f"grass_callback: logging {period!r} to W&B failed ({exc!r}); "
                              f"the results are in {folder}.", stacklevel=2)
        return folder

    def report_scalars(self, *, step: int, period: str, scalars: Mapping[str, float]) -> Path:
        """A period whose tables are not written: ``out_dir/<period>/scalars.json`` and the scalars
        to the run (``grass/<name>``, one ``run.log`` call); returns the folder. Milliseconds, where
        :meth:`report` writes and logs the tables (seconds with hundreds of queries)."""
        folder = self.out_dir / _safe_name(period)
        folder.mkdir(parents=True, exist_ok=True)
        values = {str(k): float(v) for k, v in scalars.items()}
        _atomic_write(folder / "scalars.json", _scalars_json(step, period, values))
        if self.run is not None:
            try:
                run = self.run
                self._define_metrics(run, list(values))
                payload: dict[str, Any] = {f"grass/{name}": v for name, v in values.items()}
                current = getattr(run, "step", None)
                if isinstance(current, int) and step < current:  # as in report(): W&B drops a lower step
                    payload["trainer/global_step"] = step
                    run.log(payload)
                else:
                    run.log(payload, step=step)
            except Exception as exc:  # noqa: BLE001 - the scalars are safe on disk
                warnings.warn(f"grass_callback: logging {period!r} scalars to W&B failed ({exc!r}); "
                              f"they are in {folder}.", stacklevel=2)
        return folder

    def finish(self) -> None:
        """Finish the run if this package started it; a run borrowed from a logger stays open."""
        handle, self.run_handle = self.run_handle, None
        if handle is not None and handle.owned:
            try:
                handle.run.finish()
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"grass_callback: finishing the W&B run failed ({exc!r}).", stacklevel=2)

    # ------------------------------------------------------------------ W&B

    def _cell(self, lookup: Callable[[int], Any] | None, renderer: Callable[[Any], Any], i: int,
              cache: dict[int, tuple[Any, Any]]) -> tuple[Any, Any]:
        """``(cell, label)`` of example ``i``, looked up and rendered once per period."""
        if lookup is None:
            return None, None
        if i not in cache:
            try:
                example = lookup(i)
            except Exception:  # noqa: BLE001 - e.g. an id outside the dataset
                cache[i] = (None, None)
                return cache[i]
            try:
                cell = renderer(example)
            except Exception:  # noqa: BLE001 - a broken renderer must not lose the tables
                cell = None if example is None else _truncate(repr(example), 200)
            try:
                label = self.label(example) if self.label is not None else None
            except Exception:  # noqa: BLE001
                label = None
            cache[i] = (cell, label)
        return cache[i]

    def _tables(self, influence: list[tuple[int, int, int, float, str]], self_inf: list[tuple[int, float]],
                value: list[tuple[int, float]],
                suspects: list[list[Any]] | None = None) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """Columns and rows of the three example tables; label columns only where labels exist."""
        trains: dict[int, tuple[Any, Any]] = {}
        queries: dict[int, tuple[Any, Any]] = {}

        def train(i: int) -> tuple[Any, Any]:
            return self._cell(self.train_example, self.renderer, i, trains)

        def query(i: int) -> tuple[Any, Any]:
            return self._cell(self.query_example, self.query_renderer, i, queries)

        most = value[: self.max_rows]
        rest = value[len(most):]
        least = list(reversed(rest[-self.max_rows:])) if rest else []
        rows = {
            "influence": [[q, *query(q), rank, t, *train(t), s, kind] for q, rank, t, s, kind in influence],
            "self_influence": [[t, *train(t), v] for t, v in self_inf[: self.max_rows]],
            "data_value": [[g, t, *train(t), v] for g, part in (("most", most), ("least", least)) for t, v in part],
        }
        columns = {
            "influence": ["query_id", "query", "query_label", "rank", "train_id", "train_example", "train_label",
                          "score", "kind"],
            "self_influence": ["train_id", "train_example", "train_label", "self_influence"],
            "data_value": ["group", "train_id", "train_example", "train_label", "data_value"],
        }
        if suspects is not None:  # the most suspect examples, with both signals behind the ranking
            rows["suspects"] = [[r[0], *train(r[0]), *r[1:]] for r in suspects[: self.max_rows]]
            columns["suspects"] = ["train_id", "train_example", "train_label",
                                   *_SUSPECT_COLUMNS[1: len(suspects[0]) if suspects else 4]]
        out = {}
        for name, cols in columns.items():
            drop = [c for c, col in enumerate(cols) if col.endswith("_label")
                    and all(row[c] is None for row in rows[name])]
            out[name] = ([col for c, col in enumerate(cols) if c not in drop],
                         [[v for c, v in enumerate(row) if c not in drop] for row in rows[name]])
        return out

    def _define_metrics(self, run: Any, names: list[str]) -> None:
        """Per-part seconds (``grass/seconds/<part>``): charts, no summary lines. Each name is
        defined exactly: a ``WandbLogger`` run's ``"*"`` glob would win over a glob of ours."""
        for name in names:
            if name.startswith("seconds/") and name not in self._metrics_defined:
                self._metrics_defined.add(name)
                try:
                    run.define_metric(f"grass/{name}", summary="none")
                except Exception:  # noqa: BLE001 - an old wandb or a stand-in run: summary lines are cosmetic
                    pass

    def _log_to_wandb(self, folder: Path, filenames: list[str], influence: list[tuple[int, int, int, float, str]],
                      self_inf: list[tuple[int, float]], value: list[tuple[int, float]],
                      scalars: Mapping[str, float], step: int, period: str,
                      layers: tuple[list[str], list[list[Any]]], suspects: list[list[Any]] | None = None) -> None:
        import numpy as np
        import wandb

        run = self.run
        self._define_metrics(run, list(scalars))
        payload: dict[str, Any] = {}
        for name, (columns, rows) in self._tables(influence, self_inf, value, suspects).items():
            payload[f"grass/{name}"] = wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
        for name, pairs in (("self_influence", self_inf), ("data_value", value)):
            finite = np.array([v for _, v in pairs if math.isfinite(v)], dtype=np.float64)
            if finite.size:
                payload[f"grass/{name}_hist"] = wandb.Histogram(finite)
        if layers[1]:
            payload["grass/layers"] = wandb.Table(columns=layers[0], data=layers[1], allow_mixed_types=True)
        for name, v in scalars.items():
            payload[f"grass/{name}"] = v

        run.summary["grass/sign_convention"] = SIGN_CONVENTION
        current = getattr(run, "step", None)
        if isinstance(current, int) and step < current:
            # The run is ahead (a WandbLogger counts its own steps): W&B would drop a lower step.
            payload["trainer/global_step"] = step
            run.log(payload)
        else:
            run.log(payload, step=step)

        artifact = wandb.Artifact(name=f"grass-scores-{_safe_name(period)}", type="grass-scores",
                                  metadata={"step": step, "period": str(period), "sign_convention": SIGN_CONVENTION})
        for filename in filenames:
            artifact.add_file(str(folder / filename), name=filename)
        run.log_artifact(artifact)


_SUSPECT_COLUMNS = ["train_id", "suspect", "data_value", "self_influence", "training_loss"]


def _suspect_rows(table: Any) -> list[list[Any]] | None:
    """``[train_id, suspect, data_value, self_influence(, training_loss)]`` rows of a suspect table
    ``(ids, suspect, data_value, self_influence)``, with a fifth tensor ``training_loss`` when the
    run recorded per-example losses (most suspect first), or ``None``."""
    if table is None:
        return None
    parts = [torch.as_tensor(t) for t in table]
    if len(parts) not in (4, 5) or parts[0].ndim != 1 or any(t.shape != parts[0].shape for t in parts):
        raise ValueError(f"the suspect table needs four or five [n] tensors, got {[tuple(t.shape) for t in parts]}.")
    columns = [parts[0].tolist(), *(t.double().tolist() for t in parts[1:])]
    return [[int(row[0]), *map(float, row[1:])] for row in zip(*columns)]


def _layer_rows(layers: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[Any]]]:
    """``layer`` plus the union of the figures' names (first-seen order) as rows, one per layer."""
    names: list[str] = []
    for figures in layers.values():
        names += [n for n in figures if n not in names]
    return ["layer", *names], [[layer, *(figures.get(n) for n in names)] for layer, figures in layers.items()]
