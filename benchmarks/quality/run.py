"""Attribution quality that holds on data it was not tuned to: one command, one table.

    nice -n 10 .venv/bin/python -m benchmarks.quality                 # everything (ground truth cached)
    nice -n 10 .venv/bin/python -m benchmarks.quality --workloads teacher-deep --seeds 3
    nice -n 10 .venv/bin/python -m benchmarks.quality --json runs/quality.json

Workloads and their split into a tuning half and a reporting half: :mod:`benchmarks.quality.workloads`
(ground truth: subset-retrained models, cached under ``--cache`` by config hash and rebuilt when
missing). Methods: :mod:`benchmarks.quality.methods`, damping rules: :mod:`benchmarks.quality.rules`.
For every workload, method and plan seed the LDS is measured at every damping ratio of the grid
(1e-4 .. 10) and at every rule; a figure is the mean over plan seeds ± its standard error, and a
difference between two methods (or between a rule and the best ratio of the grid) is the mean of
the per-seed differences ± their standard error (paired on the seed). ``exact`` (uncompressed)
has no seed. Mislabel AUROC: self-influence on the workloads trained with flipped labels.
The in-run ensemble (scores summed over the callback's scoring periods) is
:mod:`benchmarks.quality.ensemble` (``--ensemble``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/quality/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

from grass_callback.evaluation import mislabel_detection  # noqa: E402

from . import lm as lm_mod  # noqa: E402
from . import mlp  # noqa: E402
from .methods import GRID, METHODS, exact_kernel, evaluate, method_kernel  # noqa: E402
from .rules import RULES  # noqa: E402
from .workloads import REPORTING, TUNING, WORKLOADS, ground_truth  # noqa: E402

DEFAULT_RULE = "auto"
DEFAULT_METHODS = ("gaussian", "factgrass", "factgrass-narrow", "factgrass-x4")
_VERSION = 2


def _upgrade(result: dict) -> dict:
    """Results written before version 2 named the narrow-factor masks ``factgrass`` and the
    2 sqrt(k) masks ``factgrass-2sqrtk``, and their ``auto`` rule was the placeholder r = 0.1:
    relabel them, and read the default from the rule the library adopted (``nk1``, r = k / N)."""
    if result.get("version") == _VERSION:
        return result
    names = {"factgrass": "factgrass-narrow", "factgrass-2sqrtk": "factgrass"}
    for key in ("methods", "mislabel"):
        result[key] = {names.get(m, m): v for m, v in result[key].items()}
    for key in ("methods", "mislabel"):
        for method in list(result[key]):
            rule = _equivalent_rule(result["workload"], method)
            for r in result[key][method]:
                if rule is None:  # the rule mixes both forms on this workload's blocks: not measured
                    r.pop("rules", {}).clear() if key == "methods" else r.pop(DEFAULT_RULE, None)
                    if key == "methods":
                        r["rules"] = {}
                elif key == "methods":
                    r["rules"][DEFAULT_RULE] = r["rules"][rule]
                elif rule in r:
                    r[DEFAULT_RULE] = r[rule]
        if key == "methods":
            result[key] = {m: rs for m, rs in result[key].items() if all(DEFAULT_RULE in r["rules"] for r in rs)}
        else:
            result[key] = {m: rs for m, rs in result[key].items() if all(DEFAULT_RULE in r for r in rs)}
    return result


def _equivalent_rule(workload: str, method: str) -> str | None:
    """The measured rule equal to r = max(1, k/N) on every block of (workload, method): ``r=1``
    when every block has k <= N, ``nk1`` (r = k/N) when every block has k >= N, else None."""
    cfg = WORKLOADS[workload]
    if method == "training loss":
        return DEFAULT_RULE
    if cfg["kind"] == "mlp":
        shapes = mlp.mlp_shapes(cfg)
    else:
        shapes = lm_mod.lm_shapes(lm_mod.build_lm(cfg, cfg["vocab"]))
    ks = [s.numel if method == "exact" else min(s.numel, 1024) for s in shapes.values()]
    n = cfg["n_train"]
    if all(k <= n for k in ks):
        return "r=1"
    if all(k >= n for k in ks):
        return "nk1"
    return None


def mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else float("nan")), 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], signed: bool = False) -> str:
    m, se = mean_se(values)
    return f"{m:+.4f} ± {se:.4f}" if signed else f"{m:.4f} ± {se:.4f}"


def workload_inputs(name: str, gt: dict):
    """``(shapes, factors of train + queries, n, masks, targets, target kind, extras)``."""
    cfg = WORKLOADS[name]
    if cfg["kind"] == "mlp":
        Xtr, ytr, Xq, yq = mlp.load_data(cfg)
        if "y_train" in gt:
            ytr = gt["y_train"]
        params = [p.unsqueeze(0) for p in gt["full"]]
        factors = mlp.mlp_factors(cfg, params, torch.cat([Xtr, Xq]), torch.cat([ytr, yq]))
        return mlp.mlp_shapes(cfg), factors, len(Xtr)
    ids, mask, q_ids, q_mask, vocab = lm_mod.load_passages(cfg)
    model = lm_mod.build_lm(cfg, vocab)
    model.load_state_dict(gt["full_state"])
    model.eval()
    factors = lm_mod.lm_factors(model, torch.cat([ids, q_ids]), torch.cat([mask, q_mask]))
    return lm_mod.lm_shapes(model), factors, len(ids)


def run_workload(name: str, args, log) -> dict:
    t0 = time.perf_counter()
    gt = ground_truth(name, args.cache, log)
    t_gt = time.perf_counter() - t0
    cfg = WORKLOADS[name]
    shapes, factors, n = workload_inputs(name, gt)
    masks, targets, kind = gt["masks"], gt["targets"], gt["target_kind"]
    rules = {r: RULES[r] for r in args.rules}
    rules[DEFAULT_RULE] = RULES[DEFAULT_RULE]
    out = {"version": _VERSION, "workload": name, "half": "tuning" if name in TUNING else "reporting", "n": n,
           "queries": targets.shape[1], "models": masks.shape[0], "methods": {}, "mislabel": {}}
    seeds = args.seeds if cfg["kind"] == "mlp" else args.lm_seeds
    flipped = gt.get("flipped")
    if "exact" in args.methods:
        ki = exact_kernel(shapes, factors, n)
        out["methods"]["exact"] = [evaluate(ki, masks, targets, kind, rules)]
        if flipped is not None:
            out["mislabel"]["exact"] = [_auroc(ki, flipped, rules)]
        del ki
        log(f"  {name} exact: best {out['methods']['exact'][0]['best']:.4f} "
            f"auto {out['methods']['exact'][0]['rules'][DEFAULT_RULE]:.4f}")
    for method in args.methods:
        if method == "exact":
            continue
        rows = []
        for seed in range(seeds):
            ki, info = method_kernel(method, shapes, factors, n, args.k, seed)
            row = {**evaluate(ki, masks, targets, kind, rules), **info}
            if flipped is not None:
                out["mislabel"].setdefault(method, []).append(_auroc(ki, flipped, rules))
            rows.append(row)
            del ki
        out["methods"][method] = rows
        log(f"  {name} {method}: best {fmt([r['best'] for r in rows])} auto {fmt([r['rules'][DEFAULT_RULE] for r in rows])}")
    out["ground_truth_s"] = gt.get("seconds")
    out["scoring_s"] = time.perf_counter() - t0 - t_gt
    if flipped is not None:
        Xtr, _, _, _ = mlp.load_data(cfg)
        model = mlp.to_module(cfg, [p.unsqueeze(0) for p in gt["full"]])
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(Xtr), gt["y_train"], reduction="none").double()
        out["mislabel"]["training loss"] = [{DEFAULT_RULE: float(mislabel_detection(loss, flipped)["auroc"])}]
    return out


def _auroc(ki, flipped, rules) -> dict:
    out = {name: float(mislabel_detection(ki.self_influence(rule(ki)), flipped)["auroc"]) for name, rule in rules.items()}
    out["best_grid"] = max(float(mislabel_detection(ki.self_influence(r), flipped)["auroc"]) for r in GRID)
    return out


def table(results: list[dict], reference: str = "gaussian") -> list[dict]:
    """One row per (workload, method): LDS at the default damping, the best ratio of the grid,
    default − best and method − reference (both at their default damping), paired on the seed."""
    rows = []
    for res in results:
        ref = res["methods"].get(reference)
        for method, rs in res["methods"].items():
            default = [r["rules"][DEFAULT_RULE] for r in rs]
            best = [r["best"] for r in rs]
            row = {"half": res["half"], "workload": res["workload"], "method": method, "seeds": len(rs),
                   "LDS default": fmt(default), "LDS best r": fmt(best),
                   "best r": statistics.median([r["best_ratio"] for r in rs]),
                   "default - best": fmt([d - b for d, b in zip(default, best)], signed=True)}
            if ref is not None and method not in ("exact", reference):
                row[f"- {reference}"] = fmt([d - r["rules"][DEFAULT_RULE] for d, r in zip(default, ref)], signed=True)
            if "compress_s" in rs[0]:
                row["compress s"] = f"{statistics.fmean(r['compress_s'] for r in rs):.2f}"
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def rule_table(results: list[dict], method: str = "factgrass") -> list[dict]:
    """Each damping rule's LDS minus the best grid ratio, per workload (paired on the seed)."""
    rows = []
    for rule in sorted({r for res in results for r in res["methods"].get(method, [{}])[0].get("rules", {})}):
        row = {"rule": rule}
        for res in results:
            rs = res["methods"].get(method)
            if rs:
                row[res["workload"]] = fmt([r["rules"][rule] - r["best"] for r in rs], signed=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(TUNING + REPORTING), choices=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=["exact", *DEFAULT_METHODS], choices=["exact", *METHODS])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--seeds", type=int, default=3, help="plan seeds on the MLP workloads (default 3)")
    parser.add_argument("--lm-seeds", type=int, default=2, help="plan seeds on the language model (default 2)")
    parser.add_argument("--k", type=int, default=1024, help="compressed size per layer (default 1024)")
    parser.add_argument("--cache", default="runs/quality-cache", help="ground-truth cache folder")
    parser.add_argument("--json", default=None, help="write every measurement here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="print the tables of earlier --json files instead of measuring")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.from_json:
        merged: dict[str, dict] = {}
        for path in args.from_json:  # a later file's (workload, method) replaces an earlier one's
            for r in json.loads(Path(path).read_text())["results"]:
                r = _upgrade(r)
                if r["workload"] in merged:
                    merged[r["workload"]]["methods"].update(r["methods"])
                    merged[r["workload"]]["mislabel"].update(r["mislabel"])
                else:
                    merged[r["workload"]] = r
        results = list(merged.values())
        order = {name: i for i, name in enumerate(TUNING + REPORTING)}
        results.sort(key=lambda r: order.get(r["workload"], 99))
    else:
        results = [run_workload(name, args, log) for name in args.workloads]
    print(f"\nLDS at k = {args.k} per layer; default damping = rule {DEFAULT_RULE!r}; mean ± SE over plan seeds, "
          "differences paired on the seed")
    print_table(table(results))
    print("\ndamping rules, factgrass: LDS(rule) - LDS(best ratio of the grid 1e-4..10), paired on the seed")
    print_table(rule_table(results))
    mis = [{"workload": res["workload"], "method": m, "AUROC default": fmt([v[DEFAULT_RULE] for v in vs]),
            "AUROC best r": fmt([v.get("best_grid", v[DEFAULT_RULE]) for v in vs])}
           for res in results for m, vs in res["mislabel"].items()]
    if mis:
        print("\nmislabel detection (self-influence, 10% labels flipped): AUROC")
        print_table(mis)
    total = time.perf_counter() - start
    print(f"\nscoring time {sum(r['scoring_s'] for r in results):.0f} s; total {total:.0f} s")
    if args.json and not args.from_json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
