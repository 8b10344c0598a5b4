"""Attribution quality on scikit-learn's digits: LDS of FactGraSS vs exact influence and baselines.

    .venv/bin/python benchmarks/quality.py --quick                       # ~3 min on 2 cores
    .venv/bin/python benchmarks/quality.py --json runs/quality.json      # full, ~20 min
    .venv/bin/python benchmarks/quality.py --cache runs/quality-cache    # where ground truth is kept

**Ground truth** (cached under ``--cache``, keyed by its settings). An MLP 64-128-128-10 (ReLU,
three ``nn.Linear`` layers with biases) on digits (pixels / 16): ``n = 1000`` training examples,
the other 797 are queries. ``M`` subset models are trained on random halves (α = 0.5) of the
training set; every model, the full-data model and the flipped-label model are trained the same
way: full-batch Adam (lr 1e-2, 300 steps, L2 1e-3 on the weights) from one shared initialisation
(seed 0), so a model is a deterministic function of its training subset. All subset models train
at once as batched parameters ``[M, ...]`` (``baddbmm``). Target of query ``q`` under model ``j``:
the correct-class margin ``z_y - logsumexp_{c != y} z_c`` (larger = better, the sign of our
scores).

**Methods.** Per-example gradients of the per-example cross-entropy at the full-data model's
final weights (train and queries; queries use the loss too), compressed per layer by each plan
(``plan.compress(x, δ)``: FactGraSS and LoGra from the factors, flat baselines materialize the
gradient first), scored with per-layer Fisher influence ``Σ_l g_q^T (F_l + λ_l I)^{-1} g_i``,
``λ_l = r · trace(F_l) / k_l``, computed exactly by :class:`grass_callback.evaluation.KernelInfluence`
(checked against ``FisherStats.fit`` + ``score_chunks`` below). ``exact``: uncompressed per-layer
gradients; ``*-joint``: the TRAK-style scorer, one Fisher over all layers concatenated;
``factgrass`` uses the default masks (``mask_run="auto"``: runs of neighbouring columns where a
mask keeps at most a quarter of a layer's columns: here runs of 2 at k = 64 and of 4 on fc1's
output at k = 256, none at k = 1024); ``factgrass-coord``: the paper's coordinate-wise masks
everywhere (``mask_run=1``), same SJLT tables;
``factgrass-sel``: FactGraSS with learned (selective) masks, same SJLT tables as ``factgrass``;
``dot``: gradient dot products; ``random``: Gaussian scores. The damping ratio ``r`` is chosen per
method, k and seed from ``1e-6 .. 1e1`` on the first half of the queries
(:func:`grass_callback.evaluation.choose_damping`); the LDS is reported on the other half.
Mean ± std over plan seeds. ``compress ms``: one ``plan.compress`` call per layer over all
1797 examples (one thread by default: the machine is shared, and two OpenMP threads on a busy
2-core box make small products 50x slower), summed over layers; for ``factgrass-sel`` the
mask learning time is reported separately.

Also: checkpoint ensembling (scores summed over 5 evenly spaced checkpoints of the full-data
run) vs the last checkpoint; mislabel detection by self-influence on a model trained with 10%
of the training labels flipped (AUROC, precision at the number flipped); the paper's targets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import print_table, write_json  # noqa: E402

from grass_callback.evaluation import (  # noqa: E402
    DAMPING_GRID, KernelInfluence, choose_damping, dot_product_scores, lds, mislabel_detection)
from grass_callback.projection import LayerShape, make_plan, materialize  # noqa: E402
from grass_callback.selective import collect_factors, selective_plans  # noqa: E402

HIDDEN = 128
LAYERS = ("fc1", "fc2", "fc3")


# ----------------------------------------------------------------------------- data and models


def load_data(n_train: int, split_seed: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(split_seed))
    tr, te = perm[:n_train], perm[n_train:]
    return X[tr], y[tr], X[te], y[te]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def init_params(seed: int) -> list[torch.Tensor]:
    """PyTorch's default Linear initialisation, from one seed: [W1, b1, W2, b2, W3, b3]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for d_in, d_out in ((64, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 10)):
        bound = 1.0 / math.sqrt(d_in)
        out.append((torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound)
        out.append((torch.rand(d_out, generator=gen) * 2 - 1) * bound)
    return out


def batched_forward(params: list[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    W1, b1, W2, b2, W3, b3 = params
    h = torch.relu(torch.baddbmm(b1.unsqueeze(1), X, W1.transpose(1, 2)))
    h = torch.relu(torch.baddbmm(b2.unsqueeze(1), h, W2.transpose(1, 2)))
    return torch.baddbmm(b3.unsqueeze(1), h, W3.transpose(1, 2))


def train_batched(X: torch.Tensor, y: torch.Tensor, cfg: dict, checkpoints: int = 1) -> list[list[torch.Tensor]]:
    """Full-batch Adam on ``M`` models at once: ``X [M, s, 64]``, ``y [M, s]``.

    Returns the parameters at ``checkpoints`` evenly spaced steps (the last is the final model).
    """
    M = X.shape[0]
    params = [p.unsqueeze(0).repeat(M, *([1] * p.dim())).requires_grad_(True) for p in init_params(cfg["init_seed"])]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    steps = cfg["steps"]
    save_at = {round(steps * (c + 1) / checkpoints) for c in range(checkpoints)}
    saved = []
    for step in range(1, steps + 1):
        logits = batched_forward(params, X)
        loss = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="none").reshape(M, -1).mean(1).sum()
        loss = loss + cfg["l2"] / 2 * sum((p * p).sum() for p in params[::2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in save_at:
            saved.append([p.detach().clone() for p in params])
    return saved


def margins(params: list[torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct-class margins ``[M, m]``: ``z_y - logsumexp_{c != y} z_c``."""
    with torch.no_grad():
        logits = batched_forward(params, X.expand(params[0].shape[0], -1, -1))
        idx = y.view(1, -1, 1).expand(logits.shape[0], -1, 1)
        correct = logits.gather(2, idx).squeeze(-1)
        others = logits.scatter(2, idx, float("-inf")).logsumexp(-1)
    return correct - others


def to_module(params: list[torch.Tensor], j: int = 0) -> MLP:
    model = MLP()
    with torch.no_grad():
        for (name, p), value in zip(model.named_parameters(), params):
            p.copy_(value[j])
    return model


def ground_truth(args, cfg: dict, data) -> dict:
    """Subset masks, targets, full-data checkpoints and the flipped-label model (cached)."""
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(args.cache) / f"ground-truth-{key}.pt"
    if path.exists():
        print(f"ground truth: cached {path}")
        return torch.load(path, weights_only=True)
    Xtr, ytr, Xq, yq = data
    n, M = len(Xtr), cfg["models"]
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg["subset_seed"])
    size = int(round(cfg["alpha"] * n))
    subsets = torch.stack([torch.randperm(n, generator=gen)[:size].sort().values for _ in range(M)])
    masks = torch.zeros(M, n, dtype=torch.bool).scatter_(1, subsets, True)
    targets = []
    for start in range(0, M, cfg["train_chunk"]):
        part = subsets[start:start + cfg["train_chunk"]]
        (params,) = train_batched(Xtr[part], ytr[part], cfg)
        targets.append(margins(params, Xq, yq))
        print(f"  trained subset models {start + len(part)}/{M} ({time.perf_counter() - t0:.0f} s)", flush=True)
    targets = torch.cat(targets)
    full = train_batched(Xtr.unsqueeze(0), ytr.unsqueeze(0), cfg, checkpoints=cfg["checkpoints"])
    gen = torch.Generator().manual_seed(cfg["flip_seed"])
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: int(round(cfg["flip_fraction"] * n))]] = True
    y_flip = ytr.clone()
    y_flip[flipped] = (ytr[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=gen)) % 10
    (flip_params,) = train_batched(Xtr.unsqueeze(0), y_flip.unsqueeze(0), cfg)
    gt = {"masks": masks, "targets": targets, "full": [[p[0] for p in ck] for ck in full],
          "flipped": flipped, "y_flip": y_flip, "flip_params": [p[0] for p in flip_params]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(gt, path)
    acc = (margins([p.unsqueeze(0) for p in gt["full"][-1]], Xq, yq) > 0).float().mean()
    print(f"ground truth: {M} subset models + full + flipped in {time.perf_counter() - t0:.0f} s; full-data "
          f"model query accuracy {float(acc):.3f}; saved {path}")
    return gt


def factors_of(params: list[torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-example ``(x, δ)`` of every layer for the per-example cross-entropy."""
    model = to_module([p.unsqueeze(0) for p in params])
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum")  # noqa: E731
    return collect_factors(model, [(X, y)], loss_fn, reduction="sum", max_examples=len(X))


def shapes_of() -> dict[str, LayerShape]:
    return {"fc1": LayerShape(64, HIDDEN, True), "fc2": LayerShape(HIDDEN, HIDDEN, True),
            "fc3": LayerShape(HIDDEN, 10, True)}


# ----------------------------------------------------------------------------- methods


def compress_all(plans: dict, factors: dict) -> tuple[dict, float]:
    """Compressed gradients of every example (``{layer: [N, k]}``) and the compression ms."""
    out, seconds = {}, 0.0
    for name, plan in plans.items():
        x, d = factors[name]
        plan.compress(x[:8], d[:8])  # warm-up (kernel load, allocations)
        t0 = time.perf_counter()
        out[name] = plan.compress(x, d).to(torch.float64)
        seconds += time.perf_counter() - t0
    return out, 1e3 * seconds


def exact_gradients(factors: dict, shapes: dict) -> tuple[dict, float]:
    out, seconds = {}, 0.0
    for name, shape in shapes.items():
        x, d = factors[name]
        t0 = time.perf_counter()
        out[name] = materialize(x, d, shape.bias).flatten(1).to(torch.float64)
        seconds += time.perf_counter() - t0
    return out, 1e3 * seconds


def split(grads: dict, n: int) -> tuple[dict, dict]:
    return {k: v[:n] for k, v in grads.items()}, {k: v[n:] for k, v in grads.items()}


class Evaluator:
    """Damping chosen on the held-out queries, LDS on the report queries."""

    def __init__(self, masks: torch.Tensor, targets: torch.Tensor, held: torch.Tensor, report: torch.Tensor) -> None:
        self.masks, self.targets, self.held, self.report = masks, targets, held, report

    def sweep(self, scores_for) -> dict:
        """``scores_for(ratio, queries)`` -> ``[n, len(queries)]`` scores of those query columns."""
        choice = choose_damping(self.masks, self.targets[:, self.held], lambda r: scores_for(r, self.held),
                                grid=DAMPING_GRID)
        value = float(lds(self.masks, self.targets[:, self.report], scores_for(choice.ratio, self.report)))
        out = {"lds": value, "ratio": choice.ratio, "held_lds": choice.best_lds,
               "held_by_ratio": {f"{r:g}": v for r, v in choice.lds.items()}}
        if choice.ratio == max(DAMPING_GRID):  # at the grid's top: is a larger ratio better still?
            above = 10 * max(DAMPING_GRID)
            out["held_lds_above_grid"] = float(lds(self.masks, self.targets[:, self.held], scores_for(above, self.held)))
        return out

    def fixed(self, scores: torch.Tensor) -> dict:
        return {"lds": float(lds(self.masks, self.targets[:, self.report], scores[:, self.report])),
                "ratio": None}


def run_methods(args, gt, data, ev: Evaluator, shapes: dict) -> tuple[list[dict], dict]:
    Xtr, ytr, Xq, yq = data
    n = len(Xtr)
    final = gt["full"][-1]
    X_all, y_all = torch.cat([Xtr, Xq]), torch.cat([ytr, yq])
    factors = factors_of(final, X_all, y_all)
    rows: list[dict] = []
    cache: dict = {}

    def record(method: str, k, seed, result: dict, ms: float | None, **extra) -> None:
        row = {"method": method, "k": k, "seed": seed, **result, "compress_ms": ms, **extra}
        rows.append(row)
        ratio = f"{result['ratio']:g}" if result.get("ratio") is not None else "-"
        ms_text = f"{ms:.0f} ms" if ms is not None else "-"
        print(f"  {method:>14} k={str(k):>5} seed={seed}: LDS {result['lds']:+.4f} (r={ratio}, {ms_text})", flush=True)

    t0 = time.perf_counter()
    exact, ms = exact_gradients(factors, shapes)
    tr, q = split(exact, n)
    ki = KernelInfluence(tr, q)
    record("exact", "full", 0, ev.sweep(ki.scores), ms)
    cache["exact_kernel"] = ki
    if "exact-joint" in args.methods:
        record("exact-joint", "full", 0, ev.sweep(KernelInfluence(tr, q, joint=True).scores), ms)
    if "dot" in args.methods:
        record("dot", "full", 0, ev.fixed(dot_product_scores(tr, q)), ms)
    del exact, tr, q
    if "random" in args.methods:
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(1000 + seed)
            record("random", "-", seed, ev.fixed(torch.randn(n, len(Xq), generator=gen, dtype=torch.float64)), None)
    print(f"  (uncompressed references in {time.perf_counter() - t0:.0f} s)")

    sample = {name: (x[: args.selective_sample], d[: args.selective_sample]) for name, (x, d) in factors.items()}
    flat_kinds = {"logra": "logra", "mask": "mask", "sjlt": "sjlt", "grass": "grass", "fjlt": "fjlt",
                  "gaussian": "gaussian"}
    for k in args.ks:
        for seed in range(args.seeds):
            plans = {name: make_plan("factgrass", s, k=k, seed=seed, name=name, mask_run=args.mask_run)
                     for name, s in shapes.items()}
            grads, ms = compress_all(plans, factors)
            tr, q = split(grads, n)
            ki = KernelInfluence(tr, q)
            record("factgrass", k, seed, ev.sweep(ki.scores), ms)
            if k == max(args.ks):
                cache.setdefault("factgrass_top", {})[seed] = (plans, ki)
            if "factgrass-joint" in args.methods:
                record("factgrass-joint", k, seed, ev.sweep(KernelInfluence(tr, q, joint=True).scores), ms)
            if "factgrass-coord" in args.methods:
                coord = {name: make_plan("factgrass", s, k=k, seed=seed, name=name, mask_run=1)
                         for name, s in shapes.items()}
                grads, ms_coord = compress_all(coord, factors)
                tr, q = split(grads, n)
                record("factgrass-coord", k, seed, ev.sweep(KernelInfluence(tr, q).scores), ms_coord)
            if "factgrass-sel" in args.methods:
                t1 = time.perf_counter()
                sel = selective_plans(sample, shapes, k=k, seed=seed, steps=args.selective_steps)
                learn_s = time.perf_counter() - t1
                grads, ms_sel = compress_all(sel, factors)
                tr, q = split(grads, n)
                record("factgrass-sel", k, seed, ev.sweep(KernelInfluence(tr, q).scores), ms_sel,
                       mask_learning_s=learn_s)
            for method, kind in flat_kinds.items():
                if method not in args.methods:
                    continue
                plans = {name: make_plan(kind, s, k=k, seed=seed, name=name) for name, s in shapes.items()}
                grads, ms = compress_all(plans, factors)
                tr, q = split(grads, n)
                record(method, k, seed, ev.sweep(KernelInfluence(tr, q).scores), ms)
    cache["factors"] = factors
    return rows, cache


def library_check(cache: dict, n: int) -> dict:
    """KernelInfluence vs the library's FisherStats.fit + precondition_queries + score_chunks, and
    compressing from the factors vs LayerTaps.gradients on the model."""
    from grass_callback.fisher import FisherStats
    from grass_callback.scoring import precondition_queries, score_chunks

    plans, ki = cache["factgrass_top"][0]
    factors = cache["factors"]
    grads = {name: plan.compress(*factors[name]).to(torch.float64) for name, plan in plans.items()}
    tr = {k: v[:n] for k, v in grads.items()}
    q = {k: v[n:] for k, v in grads.items()}
    stats = FisherStats({name: p.k for name, p in plans.items()})
    stats.update(tr)
    ratio = 1e-3
    pre = precondition_queries(stats.fit(ratio), q)
    lib = score_chunks(pre, [(torch.arange(n), tr)], topk=1, full=True).full.T
    mine = ki.scores(ratio)
    rel = float((lib - mine).abs().max() / mine.abs().max())
    return {"kernel_vs_library_max_rel_diff": rel, "ratio": ratio}


def taps_check(gt, data, shapes: dict, k: int) -> float:
    """Compressed gradients from LayerTaps (the capture path) equal plan.compress on the factors."""
    from grass_callback.capture import LayerTaps, per_example_scale

    Xtr, ytr, _, _ = data
    model = to_module([p.unsqueeze(0) for p in gt["full"][-1]])
    plans = {name: make_plan("factgrass", s, k=k, seed=0, name=name) for name, s in shapes.items()}
    x, y = Xtr[:64], ytr[:64]
    taps = LayerTaps(model, plans=plans)
    with taps, taps.recording():
        loss = F.cross_entropy(model(x), y)
        taps.set_scale(per_example_scale(len(x), "mean"))
        via_taps = taps.gradients(loss)
    factors = factors_of(gt["full"][-1], x, y)
    direct = {name: plan.compress(*factors[name]) for name, plan in plans.items()}
    return max(float((via_taps[n] - direct[n]).abs().max() / direct[n].abs().max()) for n in plans)


# ----------------------------------------------------------------------------- extras


def ensemble(args, gt, data, ev: Evaluator, shapes: dict, cache: dict) -> list[dict]:
    """Scores summed over the full-data run's checkpoints vs the last checkpoint alone."""
    Xtr, ytr, Xq, yq = data
    n = len(Xtr)
    X_all, y_all = torch.cat([Xtr, Xq]), torch.cat([ytr, yq])
    k = max(args.ks)
    kernels: dict[str, list] = {"exact": [], **{f"factgrass-{k}/seed{s}": [] for s in range(args.ensemble_seeds)}}
    for params in gt["full"]:
        factors = factors_of(params, X_all, y_all)
        exact, _ = exact_gradients(factors, shapes)
        kernels["exact"].append(KernelInfluence(*split(exact, n)))
        del exact
        for s in range(args.ensemble_seeds):
            plans = cache["factgrass_top"][s][0]
            grads = {name: plan.compress(*factors[name]).to(torch.float64) for name, plan in plans.items()}
            kernels[f"factgrass-{k}/seed{s}"].append(KernelInfluence(*split(grads, n)))
    out = []
    for label, kis in kernels.items():
        last = ev.sweep(kis[-1].scores)
        ens = ev.sweep(lambda r, q, kis=kis: sum(ki.scores(r, q) for ki in kis))
        out.append({"method": label, "checkpoints": len(kis), "lds_last": last["lds"], "ratio_last": last["ratio"],
                    "lds_ensemble": ens["lds"], "ratio_ensemble": ens["ratio"]})
        print(f"  ensemble {label}: last {last['lds']:+.4f}  ensemble of {len(kis)} {ens['lds']:+.4f}", flush=True)
    return out


def mislabel(args, gt, data, shapes: dict, ratio_by_k: dict) -> list[dict]:
    Xtr, _, _, _ = data
    flipped, y_flip = gt["flipped"], gt["y_flip"]
    factors = factors_of(gt["flip_params"], Xtr, y_flip)
    k = max(args.ks)
    out = []

    def report(label: str, ki: KernelInfluence, ratio: float) -> None:
        det = mislabel_detection(ki.self_influence(ratio), flipped)
        grid = {f"{r:g}": float(mislabel_detection(ki.self_influence(r), flipped)["auroc"]) for r in DAMPING_GRID}
        out.append({"method": label, "ratio": ratio, "auroc": float(det["auroc"]),
                    "precision_at_k": float(det["precision_at_k"]), "k_flipped": int(det["k"]), "auroc_by_ratio": grid})
        print(f"  mislabel {label}: AUROC {float(det['auroc']):.3f}, precision@{int(det['k'])} "
              f"{float(det['precision_at_k']):.3f} (r={ratio:g}; best AUROC over the grid {max(grid.values()):.3f})",
              flush=True)

    exact, _ = exact_gradients(factors, shapes)
    report("exact", KernelInfluence(exact), ratio_by_k.get("exact", 1e-3))
    del exact
    for s in range(args.seeds):
        plans = {name: make_plan("factgrass", sh, k=k, seed=s, name=name) for name, sh in shapes.items()}
        grads = {name: plan.compress(*factors[name]).to(torch.float64) for name, plan in plans.items()}
        report(f"factgrass-{k}/seed{s}", KernelInfluence(grads), ratio_by_k.get(k, 1e-3))
    model = to_module([p.unsqueeze(0) for p in gt["flip_params"]])
    with torch.no_grad():
        loss = F.cross_entropy(model(Xtr), y_flip, reduction="none").to(torch.float64)
    det = mislabel_detection(loss, flipped)
    out.append({"method": "training loss", "auroc": float(det["auroc"]), "precision_at_k": float(det["precision_at_k"]),
                "k_flipped": int(det["k"])})
    print(f"  mislabel training loss (baseline): AUROC {float(det['auroc']):.3f}, precision@{int(det['k'])} "
          f"{float(det['precision_at_k']):.3f}")
    return out


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], str(r["k"])), []).append(r)
    out = []
    for (method, k), rs in groups.items():
        vals = [r["lds"] for r in rs]
        ratios = [r["ratio"] for r in rs if r.get("ratio") is not None]
        ms = [r["compress_ms"] for r in rs if r.get("compress_ms") is not None]
        out.append({"method": method, "k": k, "seeds": len(rs), "lds_mean": statistics.fmean(vals),
                    "lds_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "lds": f"{statistics.fmean(vals):+.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f}",
                    "damping": f"{Counter(ratios).most_common(1)[0][0]:g}" if ratios else "-",
                    "compress ms": statistics.fmean(ms) if ms else None,
                    "mask learning s": statistics.fmean([r["mask_learning_s"] for r in rs]) if "mask_learning_s" in rs[0] else None})
    return out


def damping_per_k(rows: list[dict]) -> dict:
    """The best relative damping for FactGraSS per k: the ratio with the best held-out LDS summed
    over seeds (the per-seed choices are in the rows)."""
    out = {}
    for k in sorted({r["k"] for r in rows if r["method"] == "factgrass"}):
        totals: dict[str, float] = {}
        for r in rows:
            if r["method"] == "factgrass" and r["k"] == k:
                for ratio, v in r["held_by_ratio"].items():
                    totals[ratio] = totals.get(ratio, 0.0) + v
        out[k] = float(max(totals, key=lambda key: totals[key]))
    exact = [r for r in rows if r["method"] == "exact"]
    if exact:
        out["exact"] = exact[0]["ratio"]
    return out


def targets(summary: list[dict]) -> list[dict]:
    by = {(s["method"], s["k"]): s for s in summary}
    out = []
    top = max(int(s["k"]) for s in summary if s["method"] == "factgrass")
    fg, ex = by[("factgrass", str(top))], by[("exact", "full")]
    frac = fg["lds_mean"] / ex["lds_mean"]
    out.append({"target": f"FactGraSS k={top} LDS >= 85% of exact", "value": f"{100 * frac:.1f}%", "met": frac >= 0.85})
    if ("gaussian", str(top)) in by:
        ga = by[("gaussian", str(top))]
        diff = fg["lds_mean"] - ga["lds_mean"]
        out.append({"target": f"FactGraSS k={top} within Gaussian's seed spread (mean >= Gaussian mean - Gaussian std)",
                    "value": f"Δ={diff:+.4f}, Gaussian std {ga['lds_std']:.4f}, FactGraSS std {fg['lds_std']:.4f}",
                    "met": abs(diff) <= ga["lds_std"] or diff >= 0})
    return out


# ----------------------------------------------------------------------------- main


ALL_METHODS = ("exact-joint", "dot", "random", "factgrass-joint", "factgrass-coord", "factgrass-sel", "logra", "mask", "sjlt", "grass",
               "fjlt", "gaussian")
QUICK_METHODS = ("dot", "random", "factgrass-joint", "factgrass-coord", "factgrass-sel", "logra", "gaussian")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer models, k values and methods (~3 min)")
    parser.add_argument("--cache", default="runs/quality-cache", help="ground-truth cache folder")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--models", type=int, default=None, help="subset models (default 100; quick 40)")
    parser.add_argument("--seeds", type=int, default=None, help="plan seeds (default 3)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="k per layer (default 64 256 1024)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {ALL_METHODS} (factgrass and exact always run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    parser.add_argument("--no-extras", action="store_true", help="skip ensembling and mislabel detection")
    parser.add_argument("--mask-run", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="mask_run of the factgrass plans (default auto; factgrass-coord always uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.models = args.models or (40 if args.quick else 100)
    args.seeds = args.seeds or 3
    args.ks = args.ks or ([64, 1024] if args.quick else [64, 256, 1024])
    args.methods = tuple(args.methods or (QUICK_METHODS if args.quick else ALL_METHODS))
    args.selective_sample, args.selective_steps = 512, 200
    args.ensemble_seeds = 1 if args.quick else args.seeds
    start = time.perf_counter()

    cfg = {"n_train": 1000, "models": args.models, "alpha": 0.5, "subset_seed": 1, "init_seed": 0, "lr": 1e-2,
           "steps": 300, "l2": 1e-3, "checkpoints": 5, "flip_fraction": 0.1, "flip_seed": 2, "train_chunk": 50,
           "split_seed": 0}
    data = load_data(cfg["n_train"], cfg["split_seed"])
    sections: dict[str, float] = {}
    t_section = time.perf_counter()
    gt = ground_truth(args, cfg, data)
    sections["ground truth"] = time.perf_counter() - t_section
    m = len(data[2])
    order = torch.randperm(m, generator=torch.Generator().manual_seed(3))
    held, report = order[: m // 2].sort().values, order[m // 2:].sort().values
    ev = Evaluator(gt["masks"], gt["targets"], held, report)
    shapes = shapes_of()
    print(f"digits MLP 64-{HIDDEN}-{HIDDEN}-10: n={cfg['n_train']} train, {m} queries ({len(held)} choose the "
          f"damping, {len(report)} report the LDS), M={args.models} subset models (alpha=0.5), seeds={args.seeds}, "
          f"k={args.ks}, threads={torch.get_num_threads()}")

    t_section = time.perf_counter()
    rows, cache = run_methods(args, gt, data, ev, shapes)
    sections["methods"] = time.perf_counter() - t_section
    checks = library_check(cache, cfg["n_train"])
    checks["taps_vs_factors_max_rel_diff"] = taps_check(gt, data, shapes, max(args.ks))
    print(f"checks: KernelInfluence vs FisherStats+score_chunks max rel diff {checks['kernel_vs_library_max_rel_diff']:.2e}; "
          f"LayerTaps vs plan.compress on factors {checks['taps_vs_factors_max_rel_diff']:.2e}")
    summary = summarize(rows)
    ratios = damping_per_k(rows)
    ens = mis = None
    if not args.no_extras:
        print("checkpoint ensembling:")
        t_section = time.perf_counter()
        ens = ensemble(args, gt, data, ev, shapes, cache)
        sections["ensembling"] = time.perf_counter() - t_section
        print("mislabel detection (10% flipped labels, self-influence):")
        t_section = time.perf_counter()
        mis = mislabel(args, gt, data, shapes, ratios)
        sections["mislabel"] = time.perf_counter() - t_section

    print()
    print(f"LDS on {len(report)} report queries (mean ± std over seeds), damping ratio chosen on {len(held)} held-out "
          "queries (most frequent choice), compression time of all 1797 examples summed over layers:")
    print_table(summary, ["method", "k", "seeds", "lds", "damping", "compress ms", "mask learning s"])
    print()
    edge = [r for r in rows if "held_lds_above_grid" in r]
    for r in edge:
        better = r["held_lds_above_grid"] > r["held_lds"]
        print(f"note: {r['method']} k={r['k']} seed={r['seed']} chose the grid's top ratio {r['ratio']:g}; held-out LDS "
              f"at {10 * r['ratio']:g} is {r['held_lds_above_grid']:+.4f} vs {r['held_lds']:+.4f} "
              f"({'BETTER: the grid truncates it' if better else 'worse: the optimum is inside the grid'})")
    print("best relative damping per k (FactGraSS, best summed held-out LDS over seeds): "
          + ", ".join(f"k={k}: {v:g}" for k, v in ratios.items()))
    if ens:
        print()
        print_table(ens, ["method", "checkpoints", "lds_last", "lds_ensemble", "ratio_last", "ratio_ensemble"])
    if mis:
        print()
        print_table(mis, ["method", "ratio", "auroc", "precision_at_k", "k_flipped"])
    tg = targets(summary)
    print()
    for t in tg:
        print(f"target: {t['target']}: {t['value']} -> {'MET' if t['met'] else 'NOT MET'}")
    if mis:
        fg = [r for r in mis if r["method"].startswith("factgrass")]
        print(f"target: self-influence finds flipped labels (FactGraSS): AUROC "
              f"{statistics.fmean(r['auroc'] for r in fg):.3f} (chance 0.5; no threshold set in the issue)")
    total = time.perf_counter() - start
    print(f"total {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items()) + ")")
    write_json(args.json, {"config": cfg, "args": {k: v for k, v in vars(args).items()}, "rows": rows,
                           "summary": summary, "damping_per_k": {str(k): v for k, v in ratios.items()},
                           "ensemble": ens, "mislabel": mis, "targets": tg, "checks": checks, "seconds": total,
                           "sections_s": sections})


if __name__ == "__main__":
    main()
