"""Daunce against FactGraSS influence on digits: LDS against retrained subsets, and CPU time per query.

    .venv/bin/python benchmarks/daunce_vs_influence.py                 # about 5 minutes on one core
    .venv/bin/python benchmarks/daunce_vs_influence.py --quick         # fewer subset models and copies
    .venv/bin/python benchmarks/daunce_vs_influence.py --json runs/daunce.json

Workload: scikit-learn's ``load_digits`` (8x8 images, 10 classes), standardised; ``--n-train``
training and ``--n-query`` query images; an MLP 64-64-10 trained with SGD (the same recipe for
every model, seeded). Ground truth: ``--subsets`` models trained on random halves of the training
set; the target of a query under a model is its correct-class margin. The LDS (Spearman, per
query, mean; :func:`grass_callback.evaluation.lds`) compares those margins with the sums of each
method's scores over the subsets.

Methods, both at the fully trained model:

* FactGraSS influence (:func:`grass_callback.attribute`, ``k`` per layer, damping ratio 0.01 / 0.1 / 1
  at k = 64 / 256 / 1024, the README's table);
* Daunce (:func:`grass_callback.daunce`, ``K`` perturbed copies fine-tuned on half the data for
  ``--daunce-epochs`` with the training learning rate, plain loop: ``use_lightning=False``; the Lightning
  path takes the same steps, plus its per-Trainer start-up, measured once and printed apart).

Time is CPU seconds of this process with one torch thread (``time.process_time``), divided by
the number of queries. "Equal compute" rows pair a Daunce ``K`` with the influence ``k`` whose
time is closest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import print_table, write_json  # noqa: E402

from grass_callback import IndexedDataset, attribute, daunce  # noqa: E402
from grass_callback.attribution import score_store  # noqa: E402
from grass_callback.evaluation import lds  # noqa: E402

LR, EPOCHS, BATCH = 0.1, 30, 32
#: the README's damping table (fixed here, so the figures do not move with the "auto" rule)
DAMPING = {64: 0.01, 256: 0.1, 1024: 1.0}


def digits(n_train: int, n_query: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, q = order[:n_train], order[n_train:n_train + n_query]
    return x[tr], y[tr], x[q], y[q]


def train(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(y), generator=g).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@torch.no_grad()
def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    return correct - logits.scatter(1, y[:, None], float("-inf")).max(1).values


def ground_truth(xt, yt, xq, yq, subsets: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    masks = torch.zeros(subsets, len(yt), dtype=torch.bool)
    targets = torch.zeros(subsets, len(yq))
    for j in range(subsets):
        masks[j, torch.randperm(len(yt), generator=g)[:len(yt) // 2]] = True
        targets[j] = margins(train(xt[masks[j]], yt[masks[j]], seed=j + 1), xq, yq)
    return masks, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-query", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=40)
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--copies", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--daunce-epochs", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.subsets, args.copies, args.ks = 20, [4, 16], [64, 256]
    torch.set_num_threads(1)
    xt, yt, xq, yq = digits(args.n_train, args.n_query)
    t0 = time.perf_counter()
    masks, targets = ground_truth(xt, yt, xq, yq, args.subsets)
    print(f"ground truth: {args.subsets} models on random halves in {time.perf_counter() - t0:.0f} s")
    model = train(xt, yt)
    train_loader = DataLoader(IndexedDataset(TensorDataset(xt, yt)), batch_size=BATCH)
    query_loader = DataLoader(TensorDataset(xq, yq), batch_size=50)
    mean_loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    per_example = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    rows = []
    for k in args.ks:
        t0 = time.process_time()
        res = attribute(model, train_loader, query_loader, mean_loss, k=k, progress=False,
                        damping_ratio=DAMPING.get(k, "auto"))
        full = score_store(res.store, res.fisher, res.query_ids, res.query_grads, full=True, self_influence=False,
                           progress=False)
        cpu = time.process_time() - t0
        scores = torch.zeros(len(yt), len(yq))
        scores[full.full_ids] = full.full.T.float()
        rows.append({"method": f"FactGraSS k={k}", "LDS": float(lds(masks, targets, scores)),
                     "CPU ms / query": round(1000 * cpu / len(yq), 2)})
    for K in args.copies:
        t0 = time.process_time()
        res = daunce(model, train_loader, query_loader, per_example, num_models=K, epochs=args.daunce_epochs,
                     lr=LR, full=True, use_lightning=False, progress=False)
        cpu = time.process_time() - t0
        scores = torch.zeros(len(yt), len(yq))
        scores[res.train_ids] = res.scores.full.T.float()
        rows.append({"method": f"Daunce K={K}", "LDS": float(lds(masks, targets, scores)),
                     "CPU ms / query": round(1000 * cpu / len(yq), 2)})
    t0 = time.perf_counter()
    daunce(model, train_loader, query_loader, per_example, num_models=2, epochs=args.daunce_epochs, lr=LR,
           use_lightning=True, progress=False, trainer_kwargs={"accelerator": "cpu"})
    lightning_s = (time.perf_counter() - t0) / 2
    print(f"{args.n_train} training and {args.n_query} query digits, MLP 64-64-10, one thread")
    print_table(rows, ["method", "LDS", "CPU ms / query"])
    print(f"Daunce with a Lightning Trainer per copy: {lightning_s:.2f} wall s per copy (the plain loop's steps "
          "plus the Trainer's start-up)")
    write_json(args.json, {"args": vars(args), "rows": rows, "lightning_seconds_per_copy": lightning_s})


if __name__ == "__main__":
    main()
