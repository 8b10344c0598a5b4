"""Command line: ``python -m grass_callback attribute --ckpt A.ckpt [--ckpt B.ckpt] --model M --data D``
(``--method daunce`` for Daunce), and ``python -m grass_callback query --store DIR --ckpt C --model M --data D``
(new queries against a finished run's store, see :func:`grass_callback.explain`).

``--model`` names a LightningModule class (``package.module:Class``) loaded with
``Class.load_from_checkpoint``; ``--data`` names a LightningDataModule class built with
``--data-args`` (JSON). Training batches come from ``train_dataloader()``'s dataset in a fixed
order (it must carry indices, see ``IndexedDataset``), queries from ``val_dataloader()``. The loss
is the one ``training_step`` returns. Writes the same CSV tables as the callback (and W&B
tables unless ``--no-wandb``) under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any


def _import(spec: str) -> Any:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"expected package.module:Class, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grass_callback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    att = sub.add_parser("attribute", help="influence tables from saved checkpoints")
    att.add_argument("--ckpt", action="append", required=True, help="checkpoint path; repeat to ensemble")
    att.add_argument("--model", required=True, help="LightningModule class, package.module:Class")
    att.add_argument("--data", required=True, help="LightningDataModule class, package.module:Class")
    att.add_argument("--data-args", default="{}", help="JSON keyword arguments of the data module")
    att.add_argument("--out", default="grass-attribution", help="output folder (stores, CSV tables, W&B run)")
    att.add_argument("--k", type=int, default=1024)
    att.add_argument("--seed", type=int, default=0)
    att.add_argument("--mask-run", default="auto", type=_mask_run,
                     help="mask columns kept in runs of this many (auto: runs of 8 on layers where a mask keeps at most a quarter of the columns; 1: coordinate-wise)")
    att.add_argument("--topk", type=int, default=10)
    att.add_argument("--num-queries", type=int, default=16)
    att.add_argument("--damping-ratio", default="auto", help="a number, or auto (the benchmark's best for k)")
    att.add_argument("--batch-size", type=int, default=64)
    att.add_argument("--include", action="append", default=None)
    att.add_argument("--exclude", action="append", default=None)
    att.add_argument("--no-wandb", action="store_true")
    att.add_argument("--quiet", action="store_true", help="no progress bars")
    att.add_argument("--method", default="influence", choices=["influence", "daunce"],
                     help="influence (FactGraSS, default) or daunce (loss covariance of perturbed fine-tuned copies)")
    att.add_argument("--num-models", type=int, default=8, help="daunce: perturbed copies")
    att.add_argument("--epochs", type=float, default=1.0, help="daunce: fine-tuning epochs per copy")
    from grass_callback.explain import add_query_parser

    add_query_parser(sub)
    return parser


def _mask_run(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "query":
        from grass_callback.explain import run_query_cli

        return run_query_cli(args)
    if args.method == "daunce":
        from grass_callback.daunce import run_daunce_cli

        return run_daunce_cli(args)
    import torch

    from grass_callback.callback import training_step_loss
    from grass_callback.checkpoints import attribute_checkpoints
    from grass_callback.report import InfluenceReporter, make_renderer, resolve_wandb_run

    module_cls, data_cls = _import(args.model), _import(args.data)
    dm = data_cls(**json.loads(args.data_args))
    dm.setup("fit")
    train_ds = dm.train_dataloader().dataset
    train = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=False)
    query = dm.val_dataloader()
    out = Path(args.out)

    def load(path: str) -> Any:
        return module_cls.load_from_checkpoint(path, map_location="cpu")

    result = attribute_checkpoints(load, args.ckpt, train, query, training_step_loss, out / "stores", k=args.k,
                                   seed=args.seed, topk=args.topk, num_queries=args.num_queries,
                                   include=args.include, exclude=args.exclude,
                                   damping_ratio=args.damping_ratio if args.damping_ratio == "auto"
                                   else float(args.damping_ratio),
                                   progress=not args.quiet,
                                   mask_run=args.mask_run)
    run = None if args.no_wandb else resolve_wandb_run(save_dir=str(out), project="grass-callback",
                                                         config={"checkpoints": args.ckpt, "k": args.k})
    query_ds = getattr(query, "dataset", None)
    reporter = InfluenceReporter(out / "scores", run, renderer=make_renderer(),
                                 train_example=lambda i: train_ds[int(i)],
                                 query_example=(lambda i: query_ds[int(i)]) if query_ds is not None else None)
    folder = reporter.report(result, step=0, period=f"checkpoints-{len(args.ckpt)}",
                             data_value=(result.data_value_ids, result.data_value))
    reporter.finish()
    print(f"scores of {len(args.ckpt)} checkpoint(s) written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
