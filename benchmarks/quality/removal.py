"""Data removal: does removing the lowest-valued training examples help a retrained model?

    nice -n 10 .venv/bin/python -m benchmarks.quality.removal                  # every workload, one table
    nice -n 10 .venv/bin/python -m benchmarks.quality.removal --workloads r-flip20 --seeds 5
    nice -n 10 .venv/bin/python -m benchmarks.quality.removal --workloads t-flip20 --auroc-only  # study rankings

For each workload (teacher-MLP data; clean labels, and 20% of the training labels flipped), the
workload's MLP is trained once through :class:`GraSSCallback` (every validation query scored at
each epoch end, uniform ensemble) and a recorder keeps every period's score matrix ``[m, n]``, its
self-influence ``[n]`` and mean learning rate, so every signal of :mod:`grass_callback.data_value`
is computed offline from one run. ``training_step`` returns its examples' losses, which a second
recorder keeps per epoch: the callback's ``training_loss`` (their sum over the first half of the
epochs) and the ``suspect`` with it are computed offline too, at loss weights 0.2-0.7. Each signal ranks the training set; the lowest ``f`` (5, 10, 20,
30%) are removed and the MLP is retrained from scratch on the rest with ``--seeds`` seeds
(initialisation and minibatch order; the models of one seed and fraction train at once, batched).
Reported: held-out test accuracy (a test split neither trained on nor used as queries), its
difference from random removal paired on the seed (± its standard error over seeds), the
flip-detection AUROC of each signal, and on flipped workloads the oracle (exactly the flipped
examples removed) and the share of the full-data -> oracle gap each signal closes at its best
fraction. The workloads' ``half`` says which were used to choose (``tuning``) and which are
reported (``reporting``): distinct data seeds, input sizes and widths.

Everything is cached under ``--cache`` (default ``runs/quality-cache/removal/``): the callback run
per workload config, each retrain by (config, kept subset, seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

from grass_callback import data_value as dv  # noqa: E402
from grass_callback.evaluation import binary_auroc  # noqa: E402

from . import mlp  # noqa: E402
from .ensemble import _EpochOrder, _module, quiet_trainer  # noqa: E402

_BASE = {"kind": "mlp", "data": "teacher", "label_noise": 0.3, "classes": 10, "n_train": 2000, "n_val": 500,
         "n_test": 1000, "init_seed": 0, "order_seed": 1, "lr": 3e-3, "weight_decay": 1e-2, "batch": 64,
         "epochs": 20, "k": 1024}
_TUNE = {**_BASE, "data_seed": 20, "dim": 24, "teacher_width": 64, "widths": [256], "split_seed": 20}
_REPORT = {**_BASE, "data_seed": 21, "dim": 32, "teacher_width": 96, "widths": [256, 128], "split_seed": 21}
WORKLOADS: dict[str, dict] = {
    "t-clean": {**_TUNE, "half": "tuning", "flip_fraction": 0.0},
    "t-flip20": {**_TUNE, "half": "tuning", "flip_fraction": 0.2, "flip_seed": 5},
    "r-clean": {**_REPORT, "half": "reporting", "flip_fraction": 0.0},
    "r-flip20": {**_REPORT, "half": "reporting", "flip_fraction": 0.2, "flip_seed": 6},
}
FRACTIONS = (0.05, 0.10, 0.20, 0.30)
_RUN_VERSION, _RETRAIN_VERSION = 6, 2  # 3: training_step returns per-example losses; 4: their weight 0.5; 5: one-token plans; 6: weight 0.4


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def load(cfg: dict) -> dict:
    """Train / validation (queries) / test splits of a workload, labels flipped where asked."""
    data_cfg = {**cfg, "n_train": cfg["n_train"], "n_queries": cfg["n_val"] + cfg["n_test"]}
    Xtr, ytr, Xrest, yrest = mlp.load_data(data_cfg)
    flipped = torch.zeros(len(ytr), dtype=torch.bool)
    if cfg["flip_fraction"]:
        ytr, flipped = mlp.flip_labels(ytr, cfg["flip_fraction"], cfg["classes"], cfg["flip_seed"])
    v = cfg["n_val"]
    return {"Xtr": Xtr, "ytr": ytr, "Xval": Xrest[:v], "yval": yrest[:v], "Xte": Xrest[v:], "yte": yrest[v:],
            "flipped": flipped}


# ----------------------------------------------------------------------------- the callback run


def _recorder(grass):
    import lightning as L

    class PeriodRecorder(L.Callback):
        """Each period's score matrix and self-influence (differences of the ensemble's sums)."""

        def __init__(self) -> None:
            self.scores, self.self_influence, self.lrs, self._lr = [], [], [], []
            self._prev, self._prev_self, self._seen = None, None, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._lr.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_epoch_end(self, trainer, pl_module):  # after the callback's (it comes first)
            ens = grass._ensemble
            if ens is None or ens.periods == self._seen:
                return
            total, own = grass.ensemble_scores.clone(), grass.ensemble_self_influence.clone()
            self.scores.append((total - (self._prev if self._prev is not None else 0)).float())
            self.self_influence.append(own - (self._prev_self if self._prev_self is not None else 0))
            self.lrs.append(sum(self._lr) / max(1, len(self._lr)))
            self._prev, self._prev_self, self._seen, self._lr = total, own, ens.periods, []

    return PeriodRecorder()


def _step_losses(n: int):
    import lightning as L

    class StepLosses(L.Callback):
        """Each epoch's per-example losses as ``training_step`` returned them (``[epochs, n]``)."""

        def __init__(self) -> None:
            self.per_epoch: list[torch.Tensor] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.per_epoch.append(torch.zeros(n, dtype=torch.float64))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.per_epoch[-1].index_add_(0, batch[2], outputs["per_example_loss"].detach().double())

    return StepLosses()


def callback_run(cfg: dict, data: dict) -> dict:
    """Train the workload's MLP through the callback (``training_step`` returning the examples'
    losses); every period's matrices, the callback's own data value / self-influence / training
    loss / suspect, each epoch's step losses, the final model's per-example training loss."""
    Xtr, ytr = data["Xtr"], data["ytr"]
    n = len(Xtr)
    module = _module(cfg, n, losses=True)
    steps = _step_losses(n)
    grass, rec, seconds = train_through_callback(cfg, module, (Xtr, ytr), (data["Xval"], data["yval"]), 256,
                                                 extra=[steps])
    with torch.no_grad():
        logits = module.net(Xtr)
        loss = F.cross_entropy(logits, ytr, reduction="none")
        test_acc = float((module.net(data["Xte"]).argmax(1) == data["yte"]).float().mean())
    return {**recorded(grass, rec, n), "loss": loss, "step_losses": torch.stack(steps.per_epoch), "test_acc": test_acc,
            "seconds": seconds}


def train_through_callback(cfg: dict, module, train: tuple, queries: tuple, query_batch: int, extra=()):
    """Fit ``module`` on the tensors ``train`` (in the workload's per-epoch order) with
    :class:`GraSSCallback` scoring every query of ``queries`` at each epoch end, the period
    recorder and the callbacks ``extra``: ``(callback, recorder, seconds)``. The ensemble is raw
    (unstandardised): the recorder reads each period's matrix off its sums."""
    from grass_callback import GraSSCallback, IndexedDataset

    n = len(train[0])
    loader = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(*train)),
                                         batch_sampler=_EpochOrder(cfg, n))
    query_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*queries), batch_size=query_batch)
    store = tempfile.mkdtemp(prefix="quality-removal-")
    grass = GraSSCallback(k=cfg["k"], num_queries=len(queries[0]), query_loader=query_loader, log_to_wandb=False,
                          progress=False, store_dir=store, ensemble_standardise=False,
                          plan_options=cfg.get("plan_options"))
    rec = _recorder(grass)
    trainer = quiet_trainer(cfg["epochs"], [grass, rec, *extra], store)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return grass, rec, time.perf_counter() - t0


def recorded(grass, rec, n: int) -> dict:
    """What a callback run leaves for the benchmark: the recorder's per-period matrices, and the
    callback's own signals dense by training id (to check them against the offline definitions)."""
    out = {"scores": torch.stack(rec.scores), "self_influence": torch.stack(rec.self_influence),
           "lrs": torch.tensor(rec.lrs, dtype=torch.float64)}
    for name, pair in (("data_value", grass.data_value_tensors()), ("self_influence", grass.self_influence),
                       ("suspect", grass.suspect), ("training_loss", grass.training_loss)):
        out[f"callback_{name}"] = torch.zeros(n, dtype=torch.float64).index_put_((pair[0],), pair[1].double())
    out["suspect_value_weight"] = dv.SUSPECT_VALUE_WEIGHT  # the weights the callback's suspect was made with
    out["suspect_loss_weight"] = dv.SUSPECT_LOSS_WEIGHT
    return out


def run_suspect_weight(run: dict) -> float:
    """The data value's weight in the callback's ``suspect`` of a recorded run (runs recorded before
    the weight was stored were made with equal weights)."""
    return float(run.get("suspect_value_weight", 0.5))


def cached_torch(path: Path, make) -> dict:
    """``torch.load(path)``, or ``make()`` saved there first (atomically: a killed run leaves no file)."""
    if path.exists():
        return torch.load(path, weights_only=False)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return value


def cached_run(name: str, cache: Path, log=print) -> dict:
    cfg = WORKLOADS[name]

    def make() -> dict:
        log(f"{name}: training through the callback ({cfg['epochs']} epochs, {cfg['n_val']} queries) ...")
        run = callback_run(cfg, load(cfg))
        log(f"{name}: {run['seconds']:.0f} s through the callback, test accuracy {run['test_acc']:.3f}")
        return run

    return cached_torch(cache / f"run-{name}-{_hash({**cfg, '_v': _RUN_VERSION})}.pt", make)


# ----------------------------------------------------------------------------- retraining


def retrain(cfg: dict, data: dict, kept: list[torch.Tensor], seed: int, cache: Path) -> list[float]:
    """Test accuracy of the MLP retrained on each kept subset (all the same size) with ``seed``."""
    key = {**{k: v for k, v in cfg.items() if k not in ("half", "plan_options")}, "_seed": seed, "_v": _RETRAIN_VERSION}
    out: list[float | None] = []
    todo = []
    paths = []
    for j, rows in enumerate(kept):
        path = cache / "retrain" / f"{_hash({**key, '_rows': hashlib.sha256(rows.numpy().tobytes()).hexdigest()})}.json"
        paths.append(path)
        if path.exists():
            out.append(json.loads(path.read_text())["test_acc"])
        else:
            out.append(None)
            todo.append(j)
    if todo:
        run_cfg = {**cfg, "init_seed": 1000 + seed, "order_seed": 2000 + seed}
        params = mlp.train_models(run_cfg, data["Xtr"], data["ytr"], torch.stack([kept[j] for j in todo]))
        with torch.no_grad():
            logits = mlp.batched_forward(params, data["Xte"].expand(len(todo), -1, -1))
        acc = (logits.argmax(-1) == data["yte"]).float().mean(1)  # argmax accuracy
        for j, a in zip(todo, acc.tolist()):
            out[j] = a
            paths[j].parent.mkdir(parents=True, exist_ok=True)
            paths[j].write_text(json.dumps({"test_acc": a}))
    return out  # type: ignore[return-value]


def kept_rows(value: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices kept after removing the lowest ``fraction`` of ``value`` (ties broken by index)."""
    n = value.numel()
    drop = int(round(fraction * n))
    order = torch.argsort(value.double(), stable=True)
    return order[drop:].sort().values


def random_value(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(777 + seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- signals


def signals(run: dict) -> dict[str, torch.Tensor]:
    """Every ranking studied: ``name -> [n]``, low = remove first."""
    S, SI, lrs, loss = run["scores"], run["self_influence"], run["lrs"], run["loss"].double()
    out = dv.candidate_signals(S, SI, lrs)
    out["final training loss (high removed)"] = -loss
    if "step_losses" in run:  # the steps' own losses, summed over the first half of the epochs
        early = early_loss(run)
        out["early training loss (high removed)"] = -early
        for w in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7):  # the loss's weight beside the influence suspect
            out[f"suspect + early loss {1 - w:.1f}/{w:.1f}"] = -dv.suspect_with_loss(-out[dv.SUSPECT_NAME], early, w)
    out["suspect (last self-infl.) + loss"] = -dv.rank_combine([-out[dv.DEFAULT_NAME], SI[-1], loss])
    if "callback_suspect" in run:  # the library's default rankings, as the callback computed them
        out["callback .data_value (default)"] = run["callback_data_value"].double()
        w = run_suspect_weight(run)
        label = "default" if w == dv.SUSPECT_VALUE_WEIGHT else f"as recorded, value weight {w:g}"
        out[f"callback .suspect ({label})"] = -run["callback_suspect"].double()
    return out


def early_loss(run: dict) -> torch.Tensor:
    """Each example's step losses summed over the first half of the epochs (offline definition of
    the callback's ``training_loss``)."""
    L_ = run["step_losses"]
    return L_[: len(L_) // 2].sum(0)


def study_signals(run: dict) -> dict[str, torch.Tensor]:
    """Further rankings studied for the suspect (``--auroc-only``: flip-detection AUROC only, no
    retraining): ``name -> [n]``, low = flagged first. Self-influence normalised per period (by its
    median or mean over the rows, its per-period unit rank, its per-period z-score), the fraction of
    periods an example is in the top q of self-influence, self-influence over the mean |standardised
    score| (about itself vs about the queries), the standardised value's weight in the suspect
    (0.1-0.6), other ways of joining the two unit ranks (geometric mean, max, min), the most negative
    standardised scores only, and the neighbour agreement (mean cosine of an example's standardised
    score column with its 50 most similar columns by |cosine|, summed over periods: O(n^2 m) a
    period, so not online)."""
    S, SI = run["scores"].double(), run["self_influence"].double()
    std = torch.stack([dv.standardise(x) for x in S])  # [P, m, n]
    per_period = std.sum(1)  # [P, n]
    value, own = per_period.sum(0), SI.sum(0)
    low, high = dv.unit_ranks(-value), dv.unit_ranks(own)
    mean_abs = std.abs().mean(1).clamp_min(torch.finfo(torch.float64).tiny)
    norm = {
        "self-infl. / its median, per period": (SI / SI.median(1, keepdim=True).values).sum(0),
        "self-infl. / its mean, per period": (SI / SI.mean(1, keepdim=True)).sum(0),
        "self-infl. unit rank, per period": torch.stack([dv.unit_ranks(x) for x in SI]).mean(0),
        "self-infl. z-score, per period": ((SI - SI.mean(1, keepdim=True)) / SI.std(1, correction=0, keepdim=True)).sum(0),
        "self-infl. / mean |standardised score|, per period": (SI / mean_abs).sum(0),
    }
    out = {f"{k} (high removed)": -v for k, v in norm.items()}
    for q in (0.1, 0.2, 0.3):
        top = (SI >= SI.quantile(1 - q, dim=1, keepdim=True)).double().mean(0)
        out[f"share of periods in the top {q:g} of self-infl. (high removed)"] = -(top + 1e-6 * high)  # ties: summed
    for k, v in norm.items():
        out[f"suspect: standardised + {k}"] = -dv.suspect(value, v, 0.5)
    for w in (0.1, 0.2, 0.4, 0.5, 0.6):  # 0.3: the default, in signals()
        out[f"suspect {w:g}/{1 - w:g}: standardised + summed self-infl."] = -dv.suspect(value, own, w)
    out["geometric mean of the two unit ranks"] = -(low * high).sqrt()
    out["max of the two unit ranks"] = -torch.maximum(low, high)
    out["min of the two unit ranks"] = -torch.minimum(low, high)
    bottom = std.sort(1).values
    for k in (25, 100, 250):
        most_negative = bottom[:, :k].sum(1).sum(0)
        out[f"{k} most negative standardised scores"] = most_negative
        out[f"suspect: {k} most negative standardised + summed self-infl."] = -dv.suspect(most_negative, own, 0.5)
    agree = torch.zeros(S.shape[2], dtype=torch.float64)
    for z in std:
        X = z / z.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        C = X.T @ X
        C.fill_diagonal_(0)
        agree += C.gather(1, C.abs().topk(50, dim=1).indices).mean(1)
    out["neighbour agreement (50 nearest columns)"] = agree
    out["suspect: neighbour agreement + summed self-infl."] = -dv.suspect(agree, own, 0.5)
    return out


def auroc_table(name: str, cache: Path) -> None:
    """Flip-detection AUROC of every signal and study ranking on one (flipped) workload's run."""
    data = load(WORKLOADS[name])
    if not data["flipped"].any():
        raise SystemExit(f"{name} has no flipped labels: no AUROC to print.")
    run = cached_run(name, cache)
    print(f"\n## {name} ({WORKLOADS[name]['half']} half): flip-detection AUROC, no retraining")
    for label, value in {**signals(run), **study_signals(run)}.items():
        print(f"{auroc(value, data['flipped']):.3f} | {label}", flush=True)


def score_scales(run: dict) -> str:
    """How unequal the queries' score scales are (what standardising changes): per period, the
    largest per-query standard deviation over the training rows against the median, the share of
    the scores' variance held by the top 10% of queries, and the first vs last period's median."""
    sig = run["scores"].double().std(2, correction=0)  # [P, m]
    ratio = sig.max(1).values / sig.median(1).values
    var = sig ** 2
    top = max(1, sig.shape[1] // 10)
    share = (var.sort(1, descending=True).values[:, :top].sum(1) / var.sum(1)).mean()
    med = sig.median(1).values
    return (f"score scales: largest / median query std per period {float(ratio.min()):.1f}-{float(ratio.max()):.1f}x, "
            f"top 10% of queries hold {float(share):.2f} of the variance, median std first / last period "
            f"{float(med[0]):.3g} / {float(med[-1]):.3g}")


def callback_check(run: dict) -> str:
    """How far the callback's own values are from the offline definitions on the recorded periods."""
    if "callback_data_value" not in run:
        return ""
    want = dv.standardised_sum(run["scores"])
    own = run["self_influence"].double().sum(0)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    base = dv.suspect(want, own, run_suspect_weight(run))
    extra = ""
    if "step_losses" in run and "callback_training_loss" in run:
        early = early_loss(run)
        base = dv.suspect_with_loss(base, early, run["suspect_loss_weight"])
        extra = f", training_loss max rel diff {rel(run['callback_training_loss'], early):.1e} (with it in suspect)"
    return (f"callback vs offline definitions: data_value max rel diff {rel(run['callback_data_value'], want):.1e}, "
            f"self_influence {rel(run['callback_self_influence'], own):.1e}, suspect max abs diff "
            f"{float((run['callback_suspect'] - base).abs().max()):.1e}"
            f" (value weight {run_suspect_weight(run):g}){extra}")


def auroc(value: torch.Tensor, flipped: torch.Tensor) -> float:
    """AUROC of ``-value`` (low value = flagged) as a detector of the flipped examples."""
    return float(binary_auroc(dv.unit_ranks(-value), flipped.long()))  # ranks in [0, 1]: no sigmoid


def _mean_se(xs: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return mean, se


def evaluate(name: str, seeds: int, cache: Path, only: list[str] | None = None, log=print) -> dict:
    cfg = WORKLOADS[name]
    data = load(cfg)
    run = cached_run(name, cache, log)
    sig = signals(run)
    if only:
        sig = {k: v for k, v in sig.items() if k in only}
    n = len(data["ytr"])
    full = [retrain(cfg, data, [torch.arange(n)], s, cache)[0] for s in range(seeds)]
    res: dict = {"full": full, "signals": {}, "auroc": {}, "half": cfg["half"], "seconds": run["seconds"],
                 "check": callback_check(run), "scales": score_scales(run)}
    flipped = data["flipped"]
    if flipped.any():
        res["oracle"] = [retrain(cfg, data, [torch.nonzero(~flipped).squeeze(1)], s, cache)[0] for s in range(seeds)]
        for label, value in sig.items():
            res["auroc"][label] = auroc(value, flipped)
    for f in FRACTIONS:
        for s in range(seeds):
            kept = [kept_rows(random_value(n, s), f)] + [kept_rows(v, f) for v in sig.values()]
            accs = retrain(cfg, data, kept, s, cache)
            res.setdefault("random", {}).setdefault(f, []).append(accs[0])
            for label, a in zip(sig, accs[1:]):
                res["signals"].setdefault(label, {}).setdefault(f, []).append(a)
    return res


def fraction_cells(by_f: dict, rnd: dict, scale: float, digits: int) -> tuple[str, str]:
    """A ranking's table cells: its mean result at each removed fraction, and its difference from
    random removal paired on the seed (± SE), each times ``scale`` to ``digits`` decimals."""
    means = " | ".join(f"{scale * statistics.fmean(by_f[f]):.{digits}f}" for f in FRACTIONS)
    diffs = []
    for f in FRACTIONS:
        m, se = _mean_se([a - r for a, r in zip(by_f[f], rnd[f])])
        diffs.append(f"{scale * m:+.{digits}f} ± {scale * se:.{digits}f}")
    return means, " | ".join(diffs)


def print_table(name: str, res: dict) -> None:
    full_m, full_se = _mean_se(res["full"])
    line = f"\n## {name} ({res['half']} half): full data {100 * full_m:.1f} ± {100 * full_se:.1f}"
    if "oracle" in res:
        om, ose = _mean_se(res["oracle"])
        line += f", oracle (flips removed) {100 * om:.1f} ± {100 * ose:.1f}"
    print(line + f"; callback run {res['seconds']:.0f} s")
    head = " | ".join(f"{int(100 * f)}%" for f in FRACTIONS)
    print(f"signal | test acc removing lowest {head} | minus random (paired SE) {head} | AUROC | gap closed")
    rnd = res["random"]
    rows = [("random", rnd)] + list(res["signals"].items())
    for label, by_f in rows:
        accs, diffs = fraction_cells(by_f, rnd, scale=100, digits=1)
        au = res["auroc"].get(label)
        gap = ""
        if "oracle" in res and label != "random":
            best = max(statistics.fmean(by_f[f]) for f in FRACTIONS)
            denom = statistics.fmean(res["oracle"]) - full_m
            gap = f"{100 * (best - full_m) / denom:.0f}%" if denom > 0 else "-"
        print(f"{label} | {accs} | {diffs} | {'' if au is None else f'{au:.3f}'} | {gap}", flush=True)
    if res["check"]:
        print(f"({res['check']})")
    print(f"({res['scales']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--signals", nargs="*", default=None, help="only these signals (names as printed)")
    parser.add_argument("--cache", default="runs/quality-cache/removal")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs-only", action="store_true", help="only the callback runs (cached)")
    parser.add_argument("--auroc-only", action="store_true",
                        help="only the flip-detection AUROC of every signal and study ranking (no retraining)")
    parser.add_argument("--plan-options", type=json.loads, default=None, metavar="JSON",
                        help='the callback\'s plan_options for every workload, e.g. \'{"oversample": 1024, "c": 2}\' '
                             "(part of the run's cache key)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if args.plan_options:
        for name in args.workloads:
            WORKLOADS[name] = {**WORKLOADS[name], "plan_options": args.plan_options}
    print(f"data removal, teacher MLPs: {_BASE['n_train']} train / {_BASE['n_val']} validation queries / "
          f"{_BASE['n_test']} test, {_BASE['epochs']} epochs, k = {_BASE['k']}; retrained with {args.seeds} seeds; "
          "test accuracy in %, differences paired on the seed (± SE over seeds)")
    for name in args.workloads:
        if args.runs_only:
            cached_run(name, cache)
            continue
        if args.auroc_only:
            auroc_table(name, cache)
            continue
        print_table(name, evaluate(name, args.seeds, cache, args.signals))


if __name__ == "__main__":
    main()
