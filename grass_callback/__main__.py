"""Command line: ``python -m grass_callback attribute --ckpt A.ckpt [--ckpt B.ckpt] --model M --data D``
(``--method daunce`` for Daunce), and ``python -m grass_callback query --store DIR --ckpt C --model M --data D``
(new queries against a finished run's store, see :func:`grass_callback.explain`).

``--model`` names a LightningModule class (``package.module:Class``) loaded with
``Class.load_from_checkpoint``; ``--data`` names a LightningDataModule class built with
``--data-args`` (JSON). Training batches come from ``train_dataloader()`` as the data module
builds it (collate function, workers, batch size unless ``--batch-size``) in a fixed order (a
``SequentialSampler``; batches must carry indices, see ``IndexedDataset``), queries from
``val_dataloader()`` the same way. The loss is the one ``training_step`` returns. Writes the same
CSV tables as the callback (and W&B tables unless ``--no-wandb``) under ``--out``; table cells
show decoded text with ``--tokenizer`` and whatever ``--renderer`` returns.
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


def _prog() -> str:
    """``grass-callback`` when run as the installed command, else ``python -m grass_callback``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name and name not in ("__main__.py", "-c", "-m") and not name.endswith(".py") \
        else "python -m grass_callback"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__,
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
    att.add_argument("--batch-size", type=int, default=None,
                     help="training batch size (default: the data module's train loader's)")
    att.add_argument("--tokenizer", default=None,
                     help="decode token ids in the tables: a tokenizer folder, a tokenizer.json, or package.module:attr")
    att.add_argument("--renderer", default=None,
                     help="package.module:attr, example -> table cell (or a {'train': fn, 'query': fn} dict)")
    att.add_argument("--include", action="append", default=None)
    att.add_argument("--exclude", action="append", default=None)
    att.add_argument("--no-wandb", action="store_true")
    att.add_argument("--quiet", action="store_true", help="no progress bars")
    st = sub.add_parser("store", help="check (verify) or repair a gradient store directory")
    st.add_argument("action", choices=("verify", "repair"), help="verify: report problems (exit 1 if any); "
                    "repair: unlist damaged shards, rebuild unreadable manifests, delete leftover temps")
    st.add_argument("dir", help="a store_dir (every store under it) or one store folder (holding meta.json)")
    att.add_argument("--method", default="influence", choices=["influence", "daunce"],
                     help="influence (FactGraSS, default) or daunce (loss covariance of perturbed fine-tuned copies)")
    att.add_argument("--num-models", type=int, default=8, help="daunce: perturbed copies")
    att.add_argument("--epochs", type=float, default=1.0, help="daunce: fine-tuning epochs per copy")
    from grass_callback.explaining import add_query_parser

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
    if args.command == "store":
        from grass_callback.store_tools import main as store_main

        return store_main(args)
    if args.command == "query":
        from grass_callback.explaining import run_query_cli

        return run_query_cli(args)
    if args.method == "daunce":
        from grass_callback.daunce_method import run_daunce_cli

        return run_daunce_cli(args)
    from grass_callback.checkpoints import run_attribute_cli

    return run_attribute_cli(args)


if __name__ == "__main__":
    sys.exit(main())
