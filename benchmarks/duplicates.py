"""How the end-of-fit search finds copies of queries planted in the training set (digits MLP).

    nice -n 10 python benchmarks/duplicates.py                                # the demo's run: 1437 rows, k = 256, 8 epochs
    nice -n 10 python benchmarks/duplicates.py --train 600 --k 32 --epochs 3  # tests/test_user_view.py's run

The demo's MLP on scikit-learn's digits, with ``--plant`` validation examples (every other one of
the 16 queries) copied into the training set, then a clean run without them. For each copy it
prints where it ranks among the last period's rows by the report's cosine (the influence score
over both self-influences) and by the raw gradient cosine, its rank among the query's proponents
(ensemble scores), and the robust z-score of the query's top proponent score (median / MAD over
all training examples); for the clean run the largest cosine any training row reaches. Then what
``GraSSCallback`` reported and the CPU seconds of the search.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def run(args: argparse.Namespace, plant: int) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    import grass_callback.console as console
    from digits_mlp import build_module, load_digits_split
    from grass_callback import GraSSCallback, IndexedDataset

    train, val, _ = load_digits_split(0)
    x, y = train.tensors[0][: args.train], train.tensors[1][: args.train]
    planted = list(range(0, 2 * plant, 2))
    x, y = torch.cat([x, val.tensors[0][planted]]), torch.cat([y, val.tensors[1][planted]])
    copies = list(range(args.train, args.train + plant))
    wide, original = {}, console.gradient_neighbours

    def every_row(pre, query_self, chunks, row_self, candidates=10):  # all rows ranked, for the table
        wide["chunks"] = list(chunks)
        wide["out"] = original(pre, query_self, wide["chunks"], row_self, candidates=10**9)
        return tuple(t[:, :candidates] for t in wide["out"])

    console.gradient_neighbours = every_row
    raw = {}
    note = GraSSCallback._note_queries

    def keep_raw(self, ids, grads, pre):  # the period's query gradients, kept for the raw cosines
        raw["q"] = (ids, grads)
        return note(self, ids, grads, pre)

    try:
        GraSSCallback._note_queries = keep_raw
        L.seed_everything(0, verbose=False)
        grass = GraSSCallback(k=args.k, num_queries=16, log_to_wandb=False, progress=False,
                              store_dir=tempfile.mkdtemp(prefix="grass-dup-"))
        trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, callbacks=[grass],
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            num_sanity_val_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(build_module(), DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=32, shuffle=True),
                        DataLoader(IndexedDataset(val), batch_size=64))
    finally:
        console.gradient_neighbours, GraSSCallback._note_queries = original, note
    start = time.process_time()
    grass._find_duplicates(trainer)
    search = time.process_time() - start
    ids, cos = wide["out"]
    q_ids, q_grads = raw["q"]
    rows = {n: torch.cat([c.grads[n] for c in wide["chunks"]]) for n in grass.taps.layers}
    row_ids = torch.cat([c.ids for c in wide["chunks"]])
    qv = torch.cat([q_grads[n].float() for n in grass.taps.layers], 1)
    gv = torch.cat([rows[n] for n in grass.taps.layers], 1)
    raw_cos = torch.nn.functional.normalize(qv, dim=1) @ torch.nn.functional.normalize(gv, dim=1).T
    full = grass.ensemble_scores
    out = {"duplicates": grass.duplicates, "search": search, "rows": int(row_ids.numel()), "copies": [],
           "max_cos": float(cos[:, 0].max())}
    for q, c in zip(planted, copies):
        r = q_ids.tolist().index(q)
        rank = int((ids[r] == c).nonzero()[0]) + 1
        raw_rank = int((row_ids[raw_cos[r].argsort(descending=True)] == c).nonzero()[0]) + 1
        score_rank = int((full[r].argsort(descending=True) == c).nonzero()[0]) + 1
        out["copies"].append((q, c, rank, float(cos[r, rank - 1]), raw_rank, score_rank))
    med = full.median(dim=1, keepdim=True).values
    mad = (full - med).abs().median(dim=1).values * 1.4826
    out["z_top"] = ((full.max(dim=1).values - med[:, 0]) / mad).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1437, help="training examples before the copies")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--plant", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    planted, clean = run(args, args.plant), run(args, 0)
    print(f"digits MLP, {args.train} training examples + {args.plant} copies of queries, k = {args.k}, "
          f"{args.epochs} epochs, 16 queries; last period: {planted['rows']} rows")
    print(f"{'query':>5} {'copy':>5} {'rank (report cosine)':>21} {'cosine':>7} {'rank (raw cosine)':>18} "
          f"{'rank (score)':>12}")
    for q, c, rank, cos, raw_rank, score_rank in planted["copies"]:
        print(f"{q:5d} {c:5d} {rank:21d} {cos:7.3f} {raw_rank:18d} {score_rank:12d}")
    zp, zc = planted["z_top"], clean["z_top"]
    print(f"robust z of each query's top proponent score: planted run {min(zp):.1f}-{max(zp):.1f}, "
          f"clean run {min(zc):.1f}-{max(zc):.1f}")
    print(f"clean run: largest report cosine of any query with any row {clean['max_cos']:.3f}")
    print(f"reported, planted run: {[(q, t, identical) for q, t, _, _, identical in planted['duplicates']]}")
    print(f"reported, clean run: {clean['duplicates']}")
    print(f"search: {planted['search']:.3f} CPU s (planted run), {clean['search']:.3f} CPU s (clean run)")


if __name__ == "__main__":
    main()
