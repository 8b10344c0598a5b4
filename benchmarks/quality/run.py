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

Everything expensive is cached on disk beside the ground truth (:mod:`benchmarks.quality.cache`):
each (workload, method, plan seed)'s compressed gradients (the exact method's Gram matrices) and
its measured row, keyed by the resolved plan configs and the source of the scoring code, so a
rerun measures only what changed (``--no-cache`` recomputes all). The last lines print the wall
time of the run and the seconds each (workload, method) took.
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
from .cache import Cache, key_of, source_hash  # noqa: E402
from .methods import (GRID, METHODS, evaluate, exact_grams, exact_kernel, kernel_from,  # noqa: E402
                      method_grads, plan_signature)
from .rules import RULES, with_layer_scales  # noqa: E402
from .workloads import REPORTING, TUNING, WORKLOADS, config_hash, ground_truth  # noqa: E402

DEFAULT_RULE = "auto"
DEFAULT_METHODS = ("gaussian", "factgrass", "factgrass-narrow", "factgrass-x1.5", "factgrass-x2", "factgrass-x4")
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


def _row_code() -> str:
    """The source that turns a kernel into a row of figures (a change re-measures the rows)."""
    import inspect

    from grass_callback import damping, evaluation

    from . import methods, rules

    return key_of([source_hash(rules, damping, evaluation), inspect.getsource(methods.evaluate),
                   inspect.getsource(methods.kernel_from), inspect.getsource(_auroc)])


def run_workload(name: str, args, log, cache: Cache | None = None) -> dict:
    cache = cache if cache is not None else Cache(None)
    t0 = time.perf_counter()
    gt = ground_truth(name, args.cache, log)
    t_gt = time.perf_counter() - t0
    cfg = WORKLOADS[name]
    shapes, factors, n = workload_inputs(name, gt)
    masks, targets, kind = gt["masks"], gt["targets"], gt["target_kind"]
    rules = {r: RULES[r] for r in args.rules}
    rules[DEFAULT_RULE] = RULES[DEFAULT_RULE]
    rules = with_layer_scales(rules, shapes, args.k)
    out = {"version": _VERSION, "workload": name, "half": "tuning" if name in TUNING else "reporting", "n": n,
           "queries": targets.shape[1], "models": masks.shape[0], "methods": {}, "mislabel": {}, "seconds": {}}
    seeds = args.seeds if cfg["kind"] == "mlp" else args.lm_seeds
    flipped = gt.get("flipped")
    base = {"workload": name, "ground_truth": config_hash(cfg), "n": n}
    row_base = {**base, "rules": sorted(rules), "grid": list(GRID), "code": _row_code(), "mislabel": flipped is not None}

    def measure(ki) -> dict:
        row = {"row": evaluate(ki, masks, targets, kind, rules)}
        if flipped is not None:
            row["mislabel"] = _auroc(ki, flipped, rules)
        return row

    if "exact" in args.methods:
        t1 = time.perf_counter()
        grams = lambda: cache.get_or_compute("grads", {**base, "method": "exact"},  # noqa: E731
                                             lambda: exact_grams(shapes, factors))
        got = cache.get_or_compute("rows", {**row_base, "method": "exact"},
                                   lambda: measure(exact_kernel(shapes, factors, n, grams=grams())))
        out["methods"]["exact"] = [got["row"]]
        if flipped is not None:
            out["mislabel"]["exact"] = [got["mislabel"]]
        out["seconds"]["exact"] = time.perf_counter() - t1
        log(f"  {name} exact: best {got['row']['best']:.4f} auto {got['row']['rules'][DEFAULT_RULE]:.4f} "
            f"({out['seconds']['exact']:.1f} s)")
    for method in args.methods:
        if method == "exact":
            continue
        t1 = time.perf_counter()
        rows = []
        for seed in range(seeds):
            signature = {**base, **plan_signature(method, shapes, args.k, seed)}
            grads = lambda: cache.get_or_compute("grads", signature,  # noqa: E731
                                                 lambda: method_grads(method, shapes, factors, args.k, seed))

            def compute_row():
                g, info = grads()
                return {**measure(kernel_from(g, n)), "info": info}

            got = cache.get_or_compute("rows", {**row_base, "signature": signature}, compute_row)
            rows.append({**got["row"], **got["info"]})
            if flipped is not None:
                out["mislabel"].setdefault(method, []).append(got["mislabel"])
        out["methods"][method] = rows
        out["seconds"][method] = time.perf_counter() - t1
        log(f"  {name} {method}: best {fmt([r['best'] for r in rows])} auto {fmt([r['rules'][DEFAULT_RULE] for r in rows])}"
            f" ({out['seconds'][method]:.1f} s)")
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
                   "best r": f"{statistics.median([r['best_ratio'] for r in rs]):.3g}",
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


#: rough relative cost of a workload's first (uncached) run, to start the longest first with --jobs
_COST = {"gpt2-pydoc": 5, "teacher-deep": 4, "teacher-512": 2, "digits-256x2": 2, "digits-flip10": 2}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_in_worker(job) -> dict:
    name, args = job
    torch.set_num_threads(args.threads)
    cache = Cache(None if args.no_cache else args.cache)
    out = run_workload(name, args, _log, cache)
    _log(f"  {name} cache: {cache.hits} hits, {cache.misses} misses")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(TUNING + REPORTING), choices=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=["exact", *DEFAULT_METHODS], choices=["exact", *METHODS])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--seeds", type=int, default=3, help="plan seeds on the MLP workloads (default 3)")
    parser.add_argument("--lm-seeds", type=int, default=2, help="plan seeds on the language model (default 2)")
    parser.add_argument("--k", type=int, default=1024, help="compressed size per layer (default 1024)")
    parser.add_argument("--cache", default="runs/quality-cache", help="ground-truth cache folder")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute every kernel (the ground truth stays cached); default: compressed gradients "
                             "and measured rows are cached under --cache/grads and --cache/rows")
    parser.add_argument("--json", default=None, help="write every measurement here")
    parser.add_argument("--jobs", type=int, default=1,
                        help="workloads measured in parallel processes (default 1; 2 on an idle 2-core machine)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="print the tables of earlier --json files instead of measuring")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    log = _log
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
        if args.jobs > 1:  # one process per workload, longest first (GPT-2, the deep MLP)
            import concurrent.futures
            import multiprocessing

            order = sorted(args.workloads, key=lambda w: -_COST.get(w, 0))
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                done = dict(zip(order, pool.map(_run_in_worker, [(w, args) for w in order])))
            results = [done[w] for w in args.workloads]
        else:
            cache = Cache(None if args.no_cache else args.cache)
            results = [run_workload(name, args, log, cache) for name in args.workloads]
            log(f"cache: {cache.hits} hits, {cache.misses} misses")
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
    print(f"\nscoring time {sum(r['scoring_s'] for r in results):.0f} s; total wall time {total:.0f} s")
    for r in results:
        if r.get("seconds"):
            print(f"  {r['workload']}: " + ", ".join(f"{m} {s:.0f} s" for m, s in r["seconds"].items()))
    if args.json and not args.from_json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
