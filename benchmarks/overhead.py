"""Training-step overhead of capturing FactGraSS gradients in a small GPT-2 (CPU).

    .venv/bin/python benchmarks/overhead.py            # 40 timed rounds (about 6 min quiet, 12 min loaded)
    .venv/bin/python benchmarks/overhead.py --quick    # 6 timed rounds (about 1-2 min)
    .venv/bin/python benchmarks/overhead.py --json out/overhead.json

Model: ``GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192,
n_positions=128))``, random token batches ``B=8, T=128``, AdamW, ``loss = model(input_ids,
labels=input_ids).loss``. Every variant owns an identical copy of the model and optimizer and
runs the same batches; the variants are stepped interleaved (round ``i`` runs every variant once
on batch ``i``, in an order rotated by ``i``), so machine noise hits them alike. Reported: the
median step time of each variant, its ratio to the plain step (ratio of medians, and the median
of the per-round paired ratios), and where the extra time goes.

The verdict is the **paired** figure, the median over rounds of (variant step / plain step in
the same round), plus the amortised shard commit. A spell of load on the shared machine slows
every variant of the rounds it covers (even in CPU time: caches and memory bandwidth are
shared), so a ratio of medians taken over different rounds swings with where the spells fall:
three runs of this script gave 1.051, 1.032 and 1.130 for the full path while the paired
figure gave 1.028, 1.034 and 1.018.

Threads: by default torch runs single-threaded (``--threads 1``) and the verdict uses process
CPU time per step. On a shared 2-core machine a 2-thread OpenMP step is slowed 10-50x, unevenly,
whenever another process wants a core (one thread waits for the other at every parallel region),
which drowns a 5% effect; a single thread's CPU time is not affected by other processes' load.
``--threads 0`` keeps torch's default (verdict on wall time), for a quiet machine.

Variants:

* ``plain``: zero_grad, forward, backward, optimizer step;
* ``full``: the in-training path of the callback: ``LayerTaps(model, k)`` on every linear layer
  (16 ``Conv1D`` + the tied ``lm_head``), ``set_scale(per_example_scale(B, "token_mean",
  token_counts=T-1 each))`` (HF averages over all ``B*(T-1)`` label tokens, so this equals
  ``"mean"``), ``collect()`` after backward, the rows cast to float16 and appended to a
  ``GradientStore`` (float16, in a temporary directory), then ``FisherStats.update`` on the
  finite rows as float32 (as the callback does; the sums are float64 by default);
* ``compress``: taps + ``collect()`` only (no store, no Fisher): the cost of compression alone;
* extra rows (``--no-extras`` drops them), each one knob on ``full``: the Fisher sums in float32
  (``fisher32``), ``k=256``, both, the Fisher updated once per ``--fisher-every`` steps with the
  buffered rows (``fisher/8``; its update cost is averaged over the steps), the ``lm_head``
  excluded (``no lm_head``), and the torch reference op instead of the C++ kernel
  (``impl=torch``). None changes the library; they only show which knob would meet the target.

Also printed: one layer's compression with the C++ kernel vs the torch reference, per layer
shape, and the amortised cost of committing a shard. ``min ratio`` (fastest step vs fastest
plain step) is the least noise-sensitive figure on a loaded machine.

Shard commits happen every ``rows_per_shard`` (8192) rows, i.e. every 1024 steps at ``B=8``,
so none falls inside the timed steps; the cost of one commit is measured separately at the end
and reported amortised per step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import print_table, write_json  # noqa: E402

from grass_callback.attribution import open_store  # noqa: E402
from grass_callback.capture import LayerTaps, per_example_scale  # noqa: E402
from grass_callback.fisher import FisherStats  # noqa: E402
from grass_callback.store import GradientStore  # noqa: E402

TARGET = 1.05
PARTS = ["fwd+bwd", "compress", "collect", "cast", "store", "finite", "fisher", "optim"]


@dataclass
class Variant:
    name: str
    k: int | None = None  # None: no taps
    store: bool = False
    fisher_dtype: torch.dtype | None = None
    fisher_every: int = 1  # > 1: buffer rows, one FisherStats.update per this many steps
    exclude: str | None = None
    impl: str = "auto"
    model: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    taps: LayerTaps | None = None
    gstore: GradientStore | None = None
    fisher: FisherStats | None = None
    pending: list[dict[str, torch.Tensor]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per step (all threads)
    parts: dict[str, list[float]] = field(default_factory=dict)


def build_model(seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=128)
    return GPT2LMHeadModel(config)


def finite_rows(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 rows that are finite in every layer (what the callback feeds the Fisher)."""
    keep = None
    for r in rows.values():
        ok = torch.isfinite(r).all(dim=1)
        keep = ok if keep is None else keep & ok
    everything = bool(keep.all())
    return {n: (r if everything else r[keep]).float() for n, r in rows.items()}


def setup_variant(v: Variant, base: torch.nn.Module, lr: float, root: str) -> None:
    v.model = copy.deepcopy(base).train()
    v.opt = torch.optim.AdamW(v.model.parameters(), lr=lr)
    if v.k is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v.taps = LayerTaps(v.model, k=v.k, exclude=v.exclude, impl=v.impl)
    v.taps.attach()
    if v.store:
        folder = "".join(c if c.isalnum() else "_" for c in v.name)
        v.gstore = open_store(os.path.join(root, folder), v.taps, dtype="float16")
        v.fisher = FisherStats(v.taps.layer_dims, dtype=v.fisher_dtype or torch.float64)


def run_step(v: Variant, batch: torch.Tensor, step: int, scale: torch.Tensor,
             clock=time.process_time) -> dict[str, float]:
    """One training step; ``total`` is wall seconds, ``cpu`` process CPU seconds, the parts are
    measured with ``clock`` (except ``compress``: the taps' own wall-clock count)."""
    parts: dict[str, float] = {}
    w0 = time.perf_counter()
    c0 = time.process_time()
    t0 = clock()
    v.opt.zero_grad(set_to_none=True)
    if v.taps is not None:
        v.taps.set_scale(scale)
    loss = v.model(input_ids=batch, labels=batch).loss
    loss.backward()
    t1 = clock()
    parts["fwd+bwd"] = t1 - t0
    if v.taps is not None:
        grads = v.taps.collect()
        t2 = clock()
        parts["collect"] = t2 - t1
        parts["compress"] = v.taps.pop_compute_seconds()  # inside backward, part of fwd+bwd
        if v.gstore is not None:
            rows = {n: g.detach().to("cpu").to(v.gstore.dtype) for n, g in grads.items()}
            t3 = clock()
            B = batch.shape[0]
            v.gstore.append(torch.arange(step * B, (step + 1) * B), step, rows)
            t4 = clock()
            fin = finite_rows(rows)
            t5 = clock()
            if v.fisher_every <= 1:
                v.fisher.update(fin)
            else:
                v.pending.append(fin)
                if (step + 1) % v.fisher_every == 0:
                    v.fisher.update({n: torch.cat([p[n] for p in v.pending]) for n in fin})
                    v.pending = []
            t6 = clock()
            parts.update(cast=t3 - t2, store=t4 - t3, finite=t5 - t4, fisher=t6 - t5)
        t1 = clock()
    v.opt.step()
    parts["optim"] = clock() - t1
    parts["cpu"] = time.process_time() - c0
    parts["total"] = time.perf_counter() - w0
    return parts


def measure_commit(layer_dims: dict[str, int], batch: int, root: str) -> dict[str, float]:
    """Seconds to commit one full shard (``rows_per_shard`` float16 rows) and that per step."""
    store = GradientStore(root, layer_dims=layer_dims, dtype="float16")
    n = store.rows_per_shard - 1  # stays buffered; flush() below commits it
    gen = torch.Generator().manual_seed(1)
    rows = {name: torch.randn(n, k, generator=gen).to(torch.float16) for name, k in layer_dims.items()}
    store.append(torch.arange(n), 0, rows)
    t0 = time.perf_counter()
    store.flush()
    seconds = time.perf_counter() - t0
    size = store.size_bytes()
    return {"rows": n, "seconds": seconds, "shard MB": size / 2**20,
            "per step ms": seconds * 1e3 * batch / n}


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def compress_by_layer(taps: LayerTaps, B: int, T: int, scale: torch.Tensor, repeat: int) -> list[dict]:
    """Per distinct layer shape: one layer's compression with the C++ kernel and the torch
    reference, interleaved call by call on the same random inputs (medians)."""
    gen = torch.Generator().manual_seed(2)
    groups: dict[tuple, list[str]] = {}
    for name in taps.layers:
        shape = taps.plans[name].shape
        groups.setdefault((shape.d_in, shape.d_out), []).append(name)
    rows = []
    for (d_in, d_out), names in groups.items():
        plan = taps.plans[names[0]]
        x = torch.randn(B, T, d_in, generator=gen)
        g = torch.randn(B, T, d_out, generator=gen)
        times: dict[str, list[float]] = {"cpu": [], "torch": []}
        for i in range(repeat + 1):
            for impl in times:
                t0 = time.perf_counter()
                plan.compress(x, g, scale=scale, impl=impl)
                if i:  # first call of each: warm-up
                    times[impl].append(time.perf_counter() - t0)
        kernel, ref = med(times["cpu"]) * 1e3, med(times["torch"]) * 1e3
        rows.append({"layers": names[0] if len(names) == 1 else f"{len(names)} x {names[0]}",
                     "d_in x d_out": f"{d_in}x{d_out}", "k": plan.k, "kernel ms": kernel,
                     "torch ms": ref, "kernel/torch": kernel / ref, "kernel ms total": kernel * len(names)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 timed steps (about 1-2 minutes)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 40, quick 6)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--fisher-every", type=int, default=8,
                        help="steps per FisherStats.update in the deferred-Fisher extra row")
    parser.add_argument("--no-extras", action="store_true", help="only the plain / full / compress rows")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1; 0: torch's default). With 1 thread the "
                             "verdict uses CPU time, otherwise wall time")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else (6 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    B, T = args.batch, args.seq
    if args.threads:
        torch.set_num_threads(args.threads)
    primary = "cpu" if torch.get_num_threads() == 1 else "wall"
    clock = time.process_time if primary == "cpu" else time.perf_counter
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the bos/eos id warnings of a small-vocab GPT2Config
    except Exception:
        pass

    variants = [
        Variant("plain"),
        Variant("full", k=args.k, store=True),
        Variant("compress", k=args.k),
    ]
    if not args.no_extras:
        variants += [
            Variant("full fisher32", k=args.k, store=True, fisher_dtype=torch.float32),
            Variant("full k256", k=256, store=True),
            Variant("full k256 fisher32", k=256, store=True, fisher_dtype=torch.float32),
            Variant(f"full fisher/{args.fisher_every}", k=args.k, store=True, fisher_every=args.fisher_every),
            Variant("full no lm_head", k=args.k, store=True, exclude="lm_head"),
            Variant("full impl=torch", k=args.k, store=True, impl="torch"),
        ]

    base = build_model(0)
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    batches = [torch.randint(0, vocab, (B, T), generator=gen) for _ in range(warmup + steps)]
    counts = torch.full((B,), T - 1)  # labels=input_ids: HF shifts, T-1 label tokens per example
    scale = per_example_scale(B, "token_mean", token_counts=counts)
    assert torch.equal(scale, per_example_scale(B, "mean")), "token_mean with equal counts must be mean"

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grass-overhead-") as root:
        for v in variants:
            setup_variant(v, base, 1e-4, root)
        n_layers = len(variants[1].taps.layers)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (verdict on {primary} time); "
              f"GPT-2 4x256, vocab 8192, "
              f"B={B}, T={T}; {n_layers} tapped layers (k={args.k}); {warmup} warm-up + {steps} timed "
              f"rounds of {len(variants)} variants, interleaved", flush=True)
        for i, batch in enumerate(batches):
            timed = i >= warmup
            shift = i % len(variants)
            for v in variants[shift:] + variants[:shift]:
                parts = run_step(v, batch, i, scale, clock)
                if timed:
                    v.times.append(parts["total"])
                    v.cpu.append(parts["cpu"])
                    for key, val in parts.items():
                        v.parts.setdefault(key, []).append(val)
            if timed:
                print(f"  round {i - warmup + 1}/{steps} ({primary} ms): "
                      + ", ".join(f"{v.name} {(v.cpu if primary == 'cpu' else v.times)[-1] * 1e3:.0f}"
                                  for v in variants), flush=True)
            else:
                print(f"  warm-up {i + 1}/{warmup}", flush=True)
        commits: dict[tuple, dict] = {}  # one full-shard commit per distinct layer set
        for v in variants:
            key = (v.k, v.exclude)
            if v.store and key not in commits:
                commits[key] = measure_commit(v.taps.layer_dims, B, os.path.join(root, f"commit-{len(commits)}"))
        layer_rows = compress_by_layer(variants[1].taps, B, T, scale, repeat=9 if args.quick else 21)
        for v in variants:
            if v.gstore is not None:
                v.gstore.close()
            if v.taps is not None:
                v.taps.remove()

    plain = variants[0]
    rows = []
    for v in variants:
        wall_s, cpu_s = v.times, v.cpu
        if v.fisher_every > 1:  # the update lands on one step in fisher_every: amortise it
            fisher = v.parts["fisher"]
            mean_fisher = sum(fisher) / len(fisher)
            cpu_s = [c - f + mean_fisher for c, f in zip(v.cpu, fisher)] if primary == "cpu" else v.cpu
            wall_s = [t - f + mean_fisher for t, f in zip(v.times, fisher)] if primary == "wall" else v.times
        row = {"variant": v.name, "k": v.k if v.k is not None else "-",
               "fisher": ("f32" if v.fisher_dtype == torch.float32 else "f64") if v.store else "-",
               "wall ms": med(wall_s) * 1e3, "wall ratio": med(wall_s) / med(plain.times),
               "wall paired": med([t / p for t, p in zip(wall_s, plain.times)]),
               "wall min ratio": min(wall_s) / min(plain.times),
               "cpu ms": med(cpu_s) * 1e3, "cpu ratio": med(cpu_s) / med(plain.cpu),
               "cpu paired": med([t / p for t, p in zip(cpu_s, plain.cpu)])}
        row["step ms"], row["ratio"] = row[f"{primary} ms"], row[f"{primary} paired"]
        for key in PARTS:
            if key in v.parts:
                vals = v.parts[key]
                mean = key == "fisher" and v.fisher_every > 1
                row[f"{key} ms"] = (sum(vals) / len(vals) if mean else med(vals)) * 1e3
        if v.store:
            commit_ms = commits[(v.k, v.exclude)]["per step ms"]
            row["commit/step ms"] = commit_ms
            row["ratio+commit"] = row["ratio"] + commit_ms / rows[0]["step ms"]
        row["meets 1.05"] = "yes" if row.get("ratio+commit", row["ratio"]) <= TARGET else "no"
        rows.append(row)

    print()
    print("wall: median wall time per step, its ratio to plain's median, the median over rounds of the ratio "
          "within a round (paired), fastest vs fastest plain (min ratio); cpu: process CPU time, "
          f"insensitive to other processes' load when single-threaded. Verdict: {primary} paired + commit.")
    print_table(rows, ["variant", "k", "fisher", "wall ms", "wall ratio", "wall paired", "wall min ratio",
                       "cpu ms", "cpu ratio", "cpu paired", "ratio+commit", "meets 1.05"])
    print()
    print(f"where the time goes ({primary} ms per step, medians; compress is the taps' wall-clock count and "
          "runs inside backward, so it is part of fwd+bwd; deferred Fisher: mean per step):")
    print_table(rows, ["variant", "step ms"] + [f"{p} ms" for p in PARTS] + ["commit/step ms"])
    print()
    print(f"compression of one layer, C++ kernel (impl='cpu', what 'auto' picks) vs torch reference "
          f"(B={B}, T={T}, k={args.k}, random inputs, interleaved, median wall ms):")
    print_table(layer_rows, ["layers", "d_in x d_out", "k", "kernel ms", "torch ms", "kernel/torch",
                             "kernel ms total"])
    print()
    full = rows[1]
    extra = {p: full.get(f"{p} ms", 0.0) for p in ("compress", "collect", "cast", "store", "finite", "fisher")}
    commit = commits[(args.k, None)]
    print(f"full path, extra over plain ({primary}): {full['step ms'] - rows[0]['step ms']:.1f} ms/step = "
          f"{100 * (full['step ms'] / rows[0]['step ms'] - 1):.1f}% of the plain step "
          f"({', '.join(f'{p} {ms:.1f}' for p, ms in extra.items())} ms; "
          f"shard commit {commit['seconds']:.2f} s wall per {commit['rows']} rows ({commit['shard MB']:.0f} MB) = "
          f"{commit['per step ms']:.2f} ms/step amortised)")
    print(f"HEADLINE: (b) full / (a) plain, paired {primary} + commit = {full['ratio+commit']:.3f} "
          f"(paired {full['cpu paired']:.3f} cpu / {full['wall paired']:.3f} wall; ratio of medians "
          f"{full['cpu ratio']:.3f} cpu / {full['wall ratio']:.3f} wall); (c) compress / (a) plain, paired = "
          f"{rows[2]['cpu paired']:.3f} cpu / {rows[2]['wall paired']:.3f} wall; target (b)/(a) <= {TARGET}")
    if full["ratio+commit"] > TARGET:
        tried = [r for r in rows[3:] if r["variant"].startswith("full")]
        winners = [f"{r['variant']} ({r['ratio+commit']:.3f})" for r in tried if r["ratio+commit"] <= TARGET]
        if not tried:
            print("above target; rerun without --no-extras to try the float32 Fisher, k=256 and other knobs")
        elif winners:
            print(f"above target ({full['ratio+commit']:.3f}); knobs that bring the full path under "
                  f"{TARGET}: {', '.join(winners)}")
        else:
            best = min(tried, key=lambda r: r["ratio+commit"])
            print(f"above target ({full['ratio+commit']:.3f}); no knob tried gets the full path under {TARGET} "
                  f"(best: {best['variant']} at {best['ratio+commit']:.3f})")
    else:
        print(f"meets the target ({full['ratio+commit']:.3f}, paired {primary} time + commit)")
    print(f"wall time {time.perf_counter() - wall:.0f} s")

    write_json(args.json, {
        "batch": B, "seq": T, "k": args.k, "steps": steps, "warmup": warmup,
        "threads": torch.get_num_threads(), "target": TARGET, "verdict_on": primary,
        "commits": {f"k={k} exclude={e}": c for (k, e), c in commits.items()}, "rows": rows,
        "compress_by_layer": layer_rows,
        "raw_ms": {v.name: [t * 1e3 for t in v.times] for v in variants},
        "raw_cpu_ms": {v.name: [t * 1e3 for t in v.cpu] for v in variants},
    })


if __name__ == "__main__":
    main()
