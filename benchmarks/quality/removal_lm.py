"""Data removal on the small GPT-2: does removing the lowest-valued passages lower the test loss?

    nice -n 10 .venv/bin/python -m benchmarks.quality.removal_lm                    # both workloads, one table each
    nice -n 10 .venv/bin/python -m benchmarks.quality.removal_lm --workloads lm-corrupt20 --seeds 5
    nice -n 10 .venv/bin/python -m benchmarks.quality.removal_lm --oracle-only --corrupt uniform --epochs 12

The language-model counterpart of :mod:`benchmarks.quality.removal` (issue 16). The model, data
and recipe are the quality suite's ``gpt2-pydoc`` workload (:mod:`benchmarks.quality.lm`: passages
of ``pydoc_data.topics`` of at most 48 BPE tokens, vocabulary 1024, a 2-layer GPT-2 of width 128,
600 training passages, 4 epochs of AdamW with a warm-up epoch and a cosine decay). Splits: the
600 training passages and the 60 validation passages (the queries; a query's loss is its mean
token loss) are those of ``gpt2-pydoc``; a further ``n_test`` passages, never trained on nor used as
queries and copying none of them (the corpus repeats some paragraphs), measure the result.
Workloads: ``lm-clean`` (the passages as they are) and
``lm-corrupt20`` (20% of the training passages, chosen with a fixed seed, are mis-encoded: every
token goes through one fixed random permutation of the vocabulary, :func:`corrupt_passages`), where
the oracle removes exactly the corrupted passages. At this size the model is data-starved (its
test loss is about the training unigram's cross-entropy) and losing 120 passages costs about what
the corruption does: the oracle does not clearly beat full data (README "Data value and
suspects"), so the gap column shows ``-`` unless it does by more than twice its paired SE.
``--oracle-only`` prints full data / oracle / clean data per seed, with ``--corrupt`` and
``--epochs`` to try others.

The model is trained once through :class:`GraSSCallback` (every query scored at each epoch end);
the removal benchmark's recorder keeps every period's score matrix, self-influence and learning
rate, and the rankings are computed offline from them with :mod:`grass_callback.data_value` (a
changed definition there is picked up on a rerun; the callback's own ``data_value`` / ``suspect``
are checked against them). Each ranking removes its lowest ``f`` (5, 10, 20, 30%) and the GPT-2 is
retrained from scratch on the rest with ``--seeds`` seeds (initialisation and minibatch order).
Reported: the mean token loss on the test passages (nats, lower is better), its difference from
random removal paired on the seed (± SE over seeds; negative = better than random), on
``lm-corrupt20`` the detection AUROC of each ranking and the share of the full-data -> oracle gap
closed at the ranking's best fraction.

Everything is cached under ``--cache`` (default ``runs/quality-cache/removal_lm/``): the callback
run per workload config, each retrain by (config, kept passages, seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

from grass_callback import data_value as dv  # noqa: E402

from . import lm as lm_mod  # noqa: E402
from .ensemble import recipe_optimizers  # noqa: E402
from .removal import (_mean_se, _step_losses, auroc, cached_torch, callback_check, early_loss,  # noqa: E402
                      fraction_cells, kept_rows, random_value, recorded, score_scales, train_through_callback)
from .workloads import WORKLOADS as SUITE  # noqa: E402

FRACTIONS = (0.05, 0.10, 0.20, 0.30)
_RUN_VERSION, _RETRAIN_VERSION = 6, 1  # 4: the vocabulary head's 4 x 1024 masks and 0.1 x "auto" damping; 5: losses; 6: loss weight 0.4
# the suite's gpt2-pydoc (model, data, recipe); "models" is its ground truth's, unused here
_BASE = {**{k: v for k, v in SUITE["gpt2-pydoc"].items() if k not in ("models", "n_queries")},
         "n_val": 60, "n_test": 300, "test_spare": 100, "k": 1024}
WORKLOADS: dict[str, dict] = {
    "lm-clean": {**_BASE, "corrupt_fraction": 0.0},
    "lm-corrupt20": {**_BASE, "corrupt_fraction": 0.2, "corrupt_seed": 7, "corrupt": "cipher"},
}
# the rankings retrained, low = removed first (built by signals())
RANKINGS = ("data_value (standardised, default)", "self-influence summed (high removed)", "suspect (default)",
            "plain sum", "final training loss (high removed)", "early training loss (high removed)",
            "suspect without the training loss")
FIRST_TOKEN = 2  # ids 0 and 1 are the BPE's <|endoftext|> and <pad>: corruption maps into [2, vocab)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- data


CORRUPTIONS = ("cipher", "uniform")


def corrupt_passages(ids: torch.Tensor, mask: torch.Tensor, fraction: float, vocab: int, seed: int,
                     mode: str = "cipher") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids', corrupted [n] bool)``: ``round(fraction * n)`` passages chosen with ``seed`` have
    every token under ``mask`` rewritten; padding, the mask and every other passage are unchanged
    (``ids`` itself is not modified). ``mode="cipher"``: each token ``t`` becomes ``π(t)``, one
    random permutation ``π`` (from ``seed``) of the ordinary tokens ``[FIRST_TOKEN, vocab)`` for
    all passages (mis-encoded text: a consistent wrong language); ``"uniform"``: each token becomes
    an independent uniform random token of that range."""
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"ids and mask must be [n, T] of one shape, got {tuple(ids.shape)} and {tuple(mask.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if vocab <= FIRST_TOKEN + 1:
        raise ValueError(f"vocab must exceed {FIRST_TOKEN + 1} (the special tokens and one more), got {vocab}")
    if mode not in CORRUPTIONS:
        raise ValueError(f"mode must be one of {CORRUPTIONS}, got {mode!r}")
    n = ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[: int(round(fraction * n))]
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[chosen] = True
    if mode == "cipher":
        ordinary = (ids >= FIRST_TOKEN) & (ids < vocab)
        if not bool(ordinary[corrupted[:, None] & (mask > 0)].all()):
            raise ValueError(f"a passage to corrupt holds a token outside [{FIRST_TOKEN}, {vocab}) under its mask")
        perm = torch.arange(vocab, dtype=ids.dtype)
        perm[FIRST_TOKEN:] = FIRST_TOKEN + torch.randperm(vocab - FIRST_TOKEN, generator=gen).to(ids.dtype)
        noise = perm[ids.clamp(0, vocab - 1)]
    else:
        noise = torch.randint(FIRST_TOKEN, vocab, ids.shape, generator=gen, dtype=ids.dtype)
    where = corrupted[:, None] & (mask > 0)
    return torch.where(where, noise, ids), corrupted


def unseen_rows(ids: torch.Tensor, mask: torch.Tensor, seen: list[tuple[torch.Tensor, torch.Tensor]],
                count: int) -> torch.Tensor:
    """The first ``count`` rows of ``ids`` (in order) whose passage (the tokens under its mask)
    occurs in none of the ``seen`` ``(ids, mask)`` sets; the corpus repeats some paragraphs, so a
    passage distinct by position can be a copy of a training one. Raises when too few are left."""
    def key(row: torch.Tensor, m: torch.Tensor) -> tuple:
        return tuple(row[m > 0].tolist())

    known = {key(r, m) for s_ids, s_mask in seen for r, m in zip(s_ids, s_mask)}
    rows = [i for i in range(len(ids)) if key(ids[i], mask[i]) not in known][:count]
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} passages unseen in the other splits, {count} asked")
    return torch.tensor(rows, dtype=torch.int64)


def load(cfg: dict) -> dict:
    """Train / validation (queries) / test passages, the training passages corrupted where asked.
    The train and validation passages are ``gpt2-pydoc``'s; the test passages are the next ones in
    its passage order that copy no training or validation passage (:func:`unseen_rows`)."""
    v, t = cfg["n_val"], cfg["n_test"]
    ids, mask, rest_ids, rest_mask, vocab = lm_mod.load_passages({**cfg, "n_queries": v + t + cfg["test_spare"]})
    val_ids, val_mask = rest_ids[:v], rest_mask[:v]
    test = v + unseen_rows(rest_ids[v:], rest_mask[v:], [(ids, mask), (val_ids, val_mask)], t)
    corrupted = torch.zeros(len(ids), dtype=torch.bool)
    if cfg["corrupt_fraction"]:
        ids, corrupted = corrupt_passages(ids, mask, cfg["corrupt_fraction"], vocab, cfg["corrupt_seed"],
                                          cfg["corrupt"])
    return {"ids": ids, "mask": mask, "val_ids": val_ids, "val_mask": val_mask, "test_ids": rest_ids[test],
            "test_mask": rest_mask[test], "vocab": vocab, "corrupted": corrupted}


def unigram_loss(data: dict) -> float:
    """Mean token loss on the test passages of the training passages' unigram (add-one smoothed
    token counts over the predicted positions): what a model that learnt no context scores."""
    V = data["vocab"]
    train = data["ids"][:, 1:][data["mask"][:, 1:] > 0]
    logp = (torch.bincount(train, minlength=V).double() + 1).log()
    logp -= logp.exp().sum().log()
    valid = data["test_mask"][:, 1:].double()
    nll = -logp[data["test_ids"][:, 1:]] * valid
    return float((nll.sum(1) / valid.sum(1).clamp_min(1)).mean())


# ----------------------------------------------------------------------------- the callback run


def _module(cfg: dict, vocab: int, n: int):
    """The workload's GPT-2 and recipe (:func:`lm.train_lm`'s) as a LightningModule; a batch is
    ``(ids, mask[, index])`` and its loss the mean over passages of their mean token loss; each
    passage's own loss is returned too (``per_example_loss``, the callback's ``training_loss``)."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm_mod.build_lm(cfg, vocab)

        def training_step(self, batch, batch_idx):
            losses = lm_mod.token_losses(self.lm, batch[0], batch[1])
            return {"loss": losses.mean(), "per_example_loss": losses}

        def configure_optimizers(self):
            return recipe_optimizers(cfg, n, self.parameters())

    return Module()


def callback_run(cfg: dict, data: dict) -> dict:
    """Train the workload's GPT-2 through the callback: every period's matrices, the callback's own
    data value / self-influence / suspect, the final model's per-passage training loss."""
    ids, mask = data["ids"], data["mask"]
    n = len(ids)
    module = _module(cfg, data["vocab"], n)
    steps = _step_losses(n)
    grass, rec, seconds = train_through_callback(cfg, module, (ids, mask), (data["val_ids"], data["val_mask"]), 64,
                                                 extra=[steps])
    module.lm.eval()
    loss = lm_mod.passage_losses(module.lm, ids, mask)
    test_loss = float(lm_mod.passage_losses(module.lm, data["test_ids"], data["test_mask"]).mean())
    return {**recorded(grass, rec, n), "loss": loss, "step_losses": torch.stack(steps.per_epoch), "test_loss": test_loss,
            "seconds": seconds}


def cached_run(name: str, cache: Path, log=print, cfg: dict | None = None) -> dict:
    cfg = cfg if cfg is not None else WORKLOADS[name]

    def make() -> dict:
        log(f"{name}: training through the callback ({cfg['epochs']} epochs, {cfg['n_val']} queries) ...")
        run = callback_run(cfg, load(cfg))
        log(f"{name}: {run['seconds']:.0f} s through the callback, test loss {run['test_loss']:.3f}")
        return run

    return cached_torch(cache / f"run-{name}-{_hash({**cfg, '_v': _RUN_VERSION})}.pt", make)


# ----------------------------------------------------------------------------- retraining


def retrain(cfg: dict, data: dict, kept: torch.Tensor, seed: int, cache: Path) -> float:
    """Mean token loss on the test passages of the GPT-2 retrained on ``kept`` with ``seed``."""
    key = {**cfg, "_seed": seed, "_v": _RETRAIN_VERSION,
           "_rows": hashlib.sha256(kept.numpy().tobytes()).hexdigest()}
    path = cache / "retrain" / f"{_hash(key)}.json"
    if path.exists():
        return json.loads(path.read_text())["test_loss"]
    run_cfg = {**cfg, "init_seed": 1000 + seed, "order_seed": 2000 + seed}
    t0 = time.perf_counter()
    model = lm_mod.train_lm(run_cfg, data["vocab"], data["ids"], data["mask"], kept)
    value = float(lm_mod.passage_losses(model, data["test_ids"], data["test_mask"]).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"test_loss": value, "seconds": time.perf_counter() - t0}))
    return value


# ----------------------------------------------------------------------------- signals


def signals(run: dict) -> dict[str, torch.Tensor]:
    """The rankings retrained (:data:`RANKINGS`): ``name -> [n]``, low = remove first. From the
    recorded periods by :mod:`grass_callback.data_value`'s definitions."""
    S, SI, lrs = run["scores"], run["self_influence"], run["lrs"]
    cand = dv.candidate_signals(S, SI, lrs)
    early = early_loss(run)
    with_loss = -dv.suspect_with_loss(-cand[dv.SUSPECT_NAME], early)
    values = [cand[dv.DEFAULT_NAME], -SI.double().sum(0), with_loss, dv.plain_sum(S), -run["loss"].double(), -early,
              cand[dv.SUSPECT_NAME]]
    return dict(zip(RANKINGS, values))


def config(name: str, epochs: int | None = None, corrupt: str | None = None) -> dict:
    """A workload's config, its epochs or corruption replaced where given (a new cache key)."""
    cfg = dict(WORKLOADS[name])
    if epochs is not None:
        cfg["epochs"] = epochs
    if corrupt is not None and cfg["corrupt_fraction"]:
        cfg["corrupt"] = corrupt
    return cfg


def oracle_check(cfg: dict, seeds: int, cache: Path) -> None:
    """Does the corruption hurt? Per seed: full (corrupted) data, the oracle (corrupted removed)
    and the clean passages in full, test loss of each retrain."""
    data = load(cfg)
    clean_cfg = {**{k: v for k, v in cfg.items() if k not in ("corrupt", "corrupt_seed")}, "corrupt_fraction": 0.0}
    clean = load(clean_cfg)
    n = len(data["ids"])
    rows = torch.nonzero(~data["corrupted"]).squeeze(1)
    full = [retrain(cfg, data, torch.arange(n), s, cache) for s in range(seeds)]
    oracle = [retrain(cfg, data, rows, s, cache) for s in range(seeds)]
    whole = [retrain(clean_cfg, clean, torch.arange(n), s, cache) for s in range(seeds)]
    fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    m, se = _mean_se([o - f for o, f in zip(oracle, full)])
    print(f"{cfg['corrupt']} corruption of {cfg['corrupt_fraction']:.0%}, {cfg['epochs']} epochs: test loss per seed: "
          f"full data {fmt(full)} | oracle {fmt(oracle)} | clean data {fmt(whole)}; oracle minus full "
          f"{m:+.3f} ± {se:.3f}", flush=True)


def evaluate(name: str, seeds: int, cache: Path, log=print, cfg: dict | None = None,
             only: list[str] | None = None) -> dict:
    """Retrain every ranking (``only``: just these; the AUROCs cover all of them)."""
    cfg = cfg if cfg is not None else WORKLOADS[name]
    data = load(cfg)
    run = cached_run(name, cache, log, cfg)
    every = signals(run)
    unknown = sorted(set(only or ()) - set(every))
    if unknown:
        raise SystemExit(f"unknown signals {unknown}; choose from {list(every)}")
    sig = {label: value for label, value in every.items() if only is None or label in only}
    n = len(data["ids"])
    t0 = time.perf_counter()
    full = [retrain(cfg, data, torch.arange(n), s, cache) for s in range(seeds)]
    res: dict = {"full": full, "signals": {}, "auroc": {}, "seconds": run["seconds"], "check": callback_check(run),
                 "scales": score_scales(run), "callback_test_loss": run["test_loss"], "unigram": unigram_loss(data)}
    corrupted = data["corrupted"]
    if corrupted.any():
        clean_rows = torch.nonzero(~corrupted).squeeze(1)
        res["oracle"] = [retrain(cfg, data, clean_rows, s, cache) for s in range(seeds)]
        res["auroc"] = {label: auroc(value, corrupted) for label, value in every.items()}
    for f in FRACTIONS:
        for s in range(seeds):
            res.setdefault("random", {}).setdefault(f, []).append(
                retrain(cfg, data, kept_rows(random_value(n, s), f), s, cache))
            for label, value in sig.items():
                res["signals"].setdefault(label, {}).setdefault(f, []).append(
                    retrain(cfg, data, kept_rows(value, f), s, cache))
        log(f"  {name}: {int(100 * f)}% done ({time.perf_counter() - t0:.0f} s of retraining so far)")
    return res


def print_table(name: str, res: dict) -> None:
    full_m, full_se = _mean_se(res["full"])
    line = f"\n## {name}: full data {full_m:.3f} ± {full_se:.3f}"
    if "oracle" in res:
        om, ose = _mean_se(res["oracle"])
        line += f", oracle (corrupted removed) {om:.3f} ± {ose:.3f}"
    print(line + f"; callback run {res['seconds']:.0f} s (its model's test loss {res['callback_test_loss']:.3f}; "
          f"the training passages' unigram {res['unigram']:.3f})")
    head = " | ".join(f"{int(100 * f)}%" for f in FRACTIONS)
    print(f"ranking | test loss removing lowest {head} | minus random (paired SE) {head} | AUROC | gap closed")
    rnd = res["random"]
    # the gap is only a yardstick when the oracle beats full data by more than twice its paired SE
    gap_ok = False
    if "oracle" in res:
        gm, gse = _mean_se([f - o for f, o in zip(res["full"], res["oracle"])])
        gap_ok = gm > 2 * gse if not math.isnan(gse) else gm > 0
        print(f"full minus oracle, paired on the seed: {gm:+.3f} ± {gse:.3f}"
              + ("" if gap_ok else " (not clearly above 0: no gap to close, the column shows '-')"))
    for label, by_f in [("random", rnd)] + list(res["signals"].items()):
        losses, diffs = fraction_cells(by_f, rnd, scale=1, digits=3)
        au = res["auroc"].get(label)
        gap = ""
        if "oracle" in res and label != "random":
            best = min(statistics.fmean(by_f[f]) for f in FRACTIONS)
            denom = full_m - statistics.fmean(res["oracle"])
            gap = f"{100 * (full_m - best) / denom:.0f}%" if gap_ok and denom > 0 else "-"
        print(f"{label} | {losses} | {diffs} | {'' if au is None else f'{au:.3f}'} | {gap}", flush=True)
    for label, au in res["auroc"].items():
        if label not in res["signals"]:
            print(f"{label} | not retrained (--signals) | AUROC {au:.3f}")
    print(f"({res['check']})")
    print(f"({res['scales']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache", default="runs/quality-cache/removal_lm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs-only", action="store_true", help="only the callback runs (cached)")
    parser.add_argument("--signals", nargs="*", default=None, help="retrain only these rankings (names as printed)")
    parser.add_argument("--epochs", type=int, default=None, help="train this many epochs instead (default: 4)")
    parser.add_argument("--corrupt", choices=CORRUPTIONS, default=None, help="another corruption (default: cipher)")
    parser.add_argument("--oracle-only", action="store_true",
                        help="only full data vs the oracle vs clean data per seed (does the corruption hurt?)")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    print(f"data removal, GPT-2 on pydoc passages (gpt2-pydoc): {_BASE['n_train']} train / {_BASE['n_val']} "
          f"validation queries / {_BASE['n_test']} test passages, {args.epochs or _BASE['epochs']} epochs, "
          f"k = {_BASE['k']}; "
          f"retrained with {args.seeds} seeds; test loss = mean token loss in nats (lower is better), "
          "differences paired on the seed (± SE over seeds)")
    for name in args.workloads:
        cfg = config(name, args.epochs, args.corrupt)
        if args.oracle_only:
            if cfg["corrupt_fraction"]:
                oracle_check(cfg, args.seeds, cache)
            continue
        if args.runs_only:
            cached_run(name, cache, cfg=cfg)
            continue
        print_table(name, evaluate(name, args.seeds, cache, cfg=cfg, only=args.signals))


if __name__ == "__main__":
    main()
