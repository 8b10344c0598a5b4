"""Do masks that keep columns in runs estimate a transformer's gradient inner products as well as
coordinate-wise masks?

    .venv/bin/python benchmarks/mask_runs.py                  # about 3 min on 2 cores
    .venv/bin/python benchmarks/mask_runs.py --json runs/mask_runs.json

FactGraSS keeps ``k_in`` of a layer's input columns and ``k_out`` of its output columns. The
default plans draw them in runs of neighbouring columns (``mask_run="auto"``, 8 at ``k = 1024``),
which makes the gather on wide layers several times cheaper (``benchmarks/compress.py``); every
column is still kept with probability ``k_in / d_in``. This measures what the runs cost in accuracy
on real gradients: a 2-layer GPT-2 (width 256, ``Conv1D`` layers; the default masks keep 64 of
256 or 1024 columns there, in runs of 8) trained for ``--steps`` steps on
English text (the passages of ``examples/tiny_lm.py``), then, at its final weights, the exact
per-example weight gradients of every layer for ``--train`` training passages and ``--queries``
held-out ones (float64, from plain per-example products of the layer factors).

For every layer, ``k``, mask kind and plan seed, the compressed gradients (the library's op) give
estimated inner products ``<g~_q, g~_i>``; compared with the exact ``<g_q, g_i>`` by

* ``spearman``: Spearman correlation over training examples, averaged over queries (what ranking
  proponents needs);
* ``rel err``: ``||S~ - c S||_F / ||c S||_F`` with ``c = k_in k_out / (d_in d_out)`` the kept
  fraction (the masked inner product's expectation).

Reported: mean ± std over seeds, per ``k``, summed over layers as the block-diagonal scorer would
(``spearman`` of the summed inner products) and for the worst layer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _util import print_table, write_json  # noqa: E402

from grass_callback.capture import find_layers, layer_shape  # noqa: E402
from grass_callback.projection import FactGraSSPlan, materialize  # noqa: E402
from grass_callback.selective import collect_factors  # noqa: E402


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation of ``a[r]`` and ``b[r]``."""
    ra = a.argsort(1).argsort(1).double()
    rb = b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


def trained_model(args):
    import tiny_lm

    paragraphs = tiny_lm.corpus()
    tok = tiny_lm.train_tokenizer(paragraphs, 1024)
    passages = tiny_lm.make_passages(paragraphs, tok, tiny_lm.CONTEXT)
    train, held_out, _ = tiny_lm.split(passages, None, seed=0)
    lm = tiny_lm.build_lm("gpt2", len(tok), 256, tok.pad_token_id, tok.eos_token_id)
    ds = tiny_lm.Passages(train, tiny_lm.CONTEXT, tok.pad_token_id)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        idx = torch.randint(0, len(ds), (16,), generator=gen).tolist()
        batch = torch.utils.data.default_collate([ds[i] for i in idx])
        opt.zero_grad()
        lm_loss(lm, batch).backward()
        opt.step()
    queries = tiny_lm.Passages(held_out[: args.queries], tiny_lm.CONTEXT, tok.pad_token_id)
    sample = torch.utils.data.Subset(ds, range(args.train))
    return lm, sample, queries


def lm_loss(lm, batch) -> torch.Tensor:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps before measuring")
    parser.add_argument("--train", type=int, default=256, help="training passages compared")
    parser.add_argument("--queries", type=int, default=32, help="held-out passages (queries)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    lm, sample, queries = trained_model(args)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    lm.eval()  # no dropout: the factors are those of the deterministic forward

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=16)

    layers, _ = find_layers(lm)
    # reduction="sum": each example's factors belong to its own summed token loss
    tr = collect_factors(lm, loader(sample), lm_loss, layers=layers, reduction="sum", max_examples=args.train)
    qf = collect_factors(lm, loader(queries), lm_loss, layers=layers, reduction="sum", max_examples=args.queries)
    shapes = {name: layer_shape(m) for name, m in layers.items()}
    exact = {}
    for name, shape in shapes.items():
        g_tr = materialize(tr[name][0].double(), tr[name][1].double(), shape.bias).flatten(1)
        g_q = materialize(qf[name][0].double(), qf[name][1].double(), shape.bias).flatten(1)
        exact[name] = g_q @ g_tr.T
    exact_sum = sum(exact.values())
    print(f"{len(shapes)} layers; exact per-example gradients in {time.perf_counter() - start:.0f} s", flush=True)

    rows = []
    for k in args.ks:
        for run_name, mask_run in (("coordinate-wise (mask_run=1)", 1), ("default (mask_run='auto')", "auto"),
                                   ("runs of 8 everywhere (mask_run=8)", 8)):
            summed, worst, errs, runs = [], [], [], set()
            for seed in range(args.seeds):
                total, per_layer, layer_err = 0, [], []
                for name, shape in shapes.items():
                    plan = FactGraSSPlan(shape.d_in, shape.d_out, shape.bias, k=k, seed=seed, name=name,
                                         mask_run=mask_run)
                    runs.add((plan.run_in, plan.run_out))
                    c_tr = plan.compress(tr[name][0], tr[name][1]).double()
                    c_q = plan.compress(qf[name][0], qf[name][1]).double()
                    est = c_q @ c_tr.T
                    kept = plan.k_in * plan.k_out / (shape.d_in_eff * shape.d_out)
                    total = total + est / kept
                    per_layer.append(spearman_rows(est, exact[name]))
                    layer_err.append(float((est - kept * exact[name]).norm() / (kept * exact[name]).norm()))
                summed.append(spearman_rows(total, exact_sum))
                worst.append(min(per_layer))
                errs.append(statistics.mean(layer_err))
            rows.append({"k": k, "masks": run_name, "runs (in, out)": sorted(runs),
                         "spearman summed": statistics.mean(summed), "std": statistics.stdev(summed),
                         "worst layer spearman": statistics.mean(worst), "worst std": statistics.stdev(worst),
                         "rel err (mean over layers)": statistics.mean(errs), "err std": statistics.stdev(errs)})
            r = rows[-1]
            print(f"  k={k:5d} {run_name:30s} spearman {r['spearman summed']:.4f} ± {r['std']:.4f}  "
                  f"worst layer {r['worst layer spearman']:.4f}  rel err {r['rel err (mean over layers)']:.3f}",
                  flush=True)
    print()
    print_table([{**r, "runs (in, out)": " ".join(f"{a}x{b}" for a, b in r["runs (in, out)"])} for r in rows],
                ["k", "masks", "runs (in, out)", "spearman summed", "std", "worst layer spearman", "worst std",
                 "rel err (mean over layers)", "err std"])
    print(f"\n{len(shapes)} layers, {args.train} training x {args.queries} held-out passages, {args.seeds} seeds; "
          f"total {time.perf_counter() - start:.0f} s")
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
