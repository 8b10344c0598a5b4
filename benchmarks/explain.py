"""explain(): new queries against a stored run, against the scoring benchmark's path (CPU, one thread).

    .venv/bin/python benchmarks/explain.py                  # 100k rows, 8 layers x k=1024 (a few minutes)
    .venv/bin/python benchmarks/explain.py --rows 20000     # quick
    .venv/bin/python benchmarks/explain.py --json runs/explain.json

A model of 8 ``Linear(256, 256)`` layers is tapped with FactGraSS plans (``k = 1024``) and a store
of ``--rows`` random float16 rows is written with those plans (one period). Then, timed in CPU
seconds of this process with one torch thread (``time.process_time``; other jobs on a shared
machine do not change it):

* ``explain cold``: :func:`grass_callback.explain` with an empty Fisher cache: query gradients of
  100 queries at the model's weights, the Fisher refitted from every stored row (``k x k`` per
  row and layer, float64), one scan scoring the rows (``self_influence=False``, as the scoring
  benchmark's 1M-row figure);
* ``explain warm``: the same call again; the Fisher sums come from the cache beside the store;
* ``score_store``: the scoring benchmark's path alone (precomputed query gradients and Fisher),
  measured in the same run, so ``warm / score_store`` is the cost explain adds to a scan.

Figures at other sizes are extrapolated only when ``--extrapolate N`` asks, linearly in the rows
(the scan and the refit are both linear in rows), and printed as such.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import print_table, write_json  # noqa: E402

from grass_callback.attribution import open_store, plans_from_store, query_gradients, score_store  # noqa: E402
from grass_callback.capture import LayerTaps  # noqa: E402
from grass_callback.explaining import explain  # noqa: E402


def model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])


def write_store(path: Path, net: nn.Module, rows: int, k: int) -> float:
    taps = LayerTaps(net, k=k, seed=0, impl="torch")
    store = open_store(path, taps, dtype="float16", config={"k": k, "seed": 0, "reduction": "sum"})
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for a in range(0, rows, 8192):
        n = min(8192, rows - a)
        store.append(torch.arange(a, a + n), a // 8192, {name: torch.randn(n, k, generator=g) for name in taps.layer_dims})
    store.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--extrapolate", type=int, default=None, help="also print figures scaled to this many rows")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = model(args.layers, 256)
    x = torch.randn(args.queries, 256, generator=torch.Generator().manual_seed(2))
    queries = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=25)
    loss_fn = lambda m, b: m(b[0]).square().sum()  # noqa: E731  (a per-example sum: any differentiable loss)
    with tempfile.TemporaryDirectory(prefix="grass-explain-") as tmp:
        store_dir = Path(tmp) / "store"
        write_s = write_store(store_dir, net, args.rows, args.k)
        cache = Path(tmp) / "cache"
        results = {}
        for name in ("explain cold", "explain warm"):
            t0 = time.process_time()
            out = explain(store_dir, net, queries, loss_fn, topk=10, self_influence=False, fisher_cache=cache,
                          reduction="sum", damping_ratio=1.0, impl="torch", progress=False)
            results[name] = time.process_time() - t0
        from grass_callback.store import GradientStore

        store = GradientStore(store_dir, readonly=True)
        taps = LayerTaps(net, plans=plans_from_store(store), impl="torch")
        t0 = time.process_time()
        with taps:
            q_ids, q_grads = query_gradients(net, taps, queries, loss_fn, reduction="sum", progress=False)
        results["query gradients"] = time.process_time() - t0
        fitted = out.fisher[0]  # the same fit explain made (the refit is timed in "explain cold")
        t0 = time.process_time()
        ref = score_store(store, fitted, q_ids, q_grads, topk=10, self_influence=False, progress=False)
        results["score_store"] = time.process_time() - t0
        same = torch.equal(ref.top_ids, out.scores.top_ids)
    rows = [{"step": name, "CPU s": round(s, 2), "rows x queries / CPU s (M)": round(args.rows * args.queries / s / 1e6, 2)}
            for name, s in results.items()]
    print(f"{args.rows} rows x {args.layers} layers x k={args.k}, {args.queries} queries, one thread "
          f"(store written in {write_s:.1f} s wall)")
    print_table(rows, ["step", "CPU s", "rows x queries / CPU s (M)"])
    print(f"explain warm / score_store: {results['explain warm'] / results['score_store']:.2f}; "
          f"explain cold / score_store: {results['explain cold'] / results['score_store']:.2f}; "
          f"same top-10 as score_store: {same}")
    if args.extrapolate:
        f = args.extrapolate / args.rows
        print(f"extrapolated linearly to {args.extrapolate} rows (not measured): explain warm "
              f"{results['explain warm'] * f:.1f} CPU s, cold {results['explain cold'] * f:.1f} CPU s, "
              f"score_store {results['score_store'] * f:.1f} CPU s")
    write_json(args.json, {"args": vars(args), "cpu_seconds": results, "same_top_ids": same})


if __name__ == "__main__":
    main()
