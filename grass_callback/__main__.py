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

``--config FILE`` (YAML or JSON; repeatable, later files win) fills ``attribute``'s options from a
file; flags given on the command line override it. Keys are the options' names (``num_queries``
or ``num-queries``), optionally under a ``grass:`` section. A LightningCLI config file works as it
is: ``model.class_path`` gives ``--model``, ``data.class_path`` and ``data.init_args`` give
``--data`` and ``--data-args``; its ``trainer``, ``seed_everything``, ``optimizer``,
``lr_scheduler``, ``ckpt_path`` and ``model.init_args`` (the checkpoint holds those) are ignored.
An unknown key is an error that names it.
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
    att.add_argument("--config", action="append", default=None, metavar="FILE",
                     help="YAML/JSON file of these options (or a LightningCLI config: model/data class_path, "
                          "data init_args); flags given here override it; repeat to layer files")
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
    att.add_argument("--raw-sum", action="store_true",
                     help="several --ckpt: sum their raw scores (default: each checkpoint's scores divided, per "
                          "query, by their standard deviation over the training rows, as the callback's ensemble)")
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


# keys of a LightningCLI config that mean nothing to attribution (the checkpoint holds the rest)
_LIGHTNING_CLI_KEYS = ("trainer", "seed_everything", "optimizer", "lr_scheduler", "ckpt_path")


def _config_values(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The option values a config file gives, by ``dest``; a clear error for anything unknown."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        parser.error(f"--config {path}: cannot read it ({e.strerror or e})")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise their own types
        parser.error(f"--config {path}: not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'} ({e})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    data = dict(data)
    values: dict[str, Any] = {}
    for key in _LIGHTNING_CLI_KEYS:
        data.pop(key, None)
    for part in ("model", "data"):  # LightningCLI: {class_path, init_args}
        entry = data.get(part)
        if isinstance(entry, dict):
            data.pop(part)
            unknown = sorted(set(entry) - {"class_path", "init_args", "dict_kwargs"})
            if unknown:
                parser.error(f"--config {path}: unknown keys under {part}: {', '.join(unknown)} "
                             "(expected class_path, init_args)")
            if "class_path" in entry:
                values[part] = _spec(str(entry["class_path"]))
            if part == "data" and (entry.get("init_args") or entry.get("dict_kwargs")):
                values["data_args"] = {**(entry.get("init_args") or {}), **(entry.get("dict_kwargs") or {})}
    section = data.pop("grass", None) or {}
    if not isinstance(section, dict):
        parser.error(f"--config {path}: 'grass' must be a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = []
    for key, value in {**data, **section}.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            unknown.append(str(key))
            continue
        values[dest] = value
    if unknown:
        known = ", ".join(sorted(actions))
        parser.error(f"--config {path}: unknown keys {', '.join(unknown)}; the options are: {known}")
    return {dest: _coerce(parser, actions[dest], value, path) for dest, value in values.items()}


def _spec(class_path: str) -> str:
    """A LightningCLI ``class_path`` (``pkg.module.Class``) as this CLI's ``pkg.module:Class``."""
    if ":" in class_path:
        return class_path
    module, _, name = class_path.rpartition(".")
    return f"{module}:{name}" if module else class_path


def _coerce(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, path: str) -> Any:
    """A config value as the flag would have given it (lists for repeatable flags, the flag's type)."""
    name = "/".join(action.option_strings)
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [str(v) for v in items]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            parser.error(f"--config {path}: {action.dest} ({name}) must be true or false, got {value!r}")
        return value
    if action.dest == "data_args" and isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        parser.error(f"--config {path}: {action.dest} ({name}) takes one value, got {value!r}")
    try:
        if action.type is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)) or int(value) != float(value):
                raise ValueError
            value = int(value)
        elif action.type is float:
            value = float(value)
        elif action.type is not None:
            value = action.type(str(value))
        elif value is not None:
            value = str(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        parser.error(f"--config {path}: {action.dest} ({name}) got {value!r}, which the flag would not take")
    if action.choices is not None and value not in action.choices:
        parser.error(f"--config {path}: {action.dest} ({name}) must be one of {list(action.choices)}, got {value!r}")
    return value


def _with_config(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with ``sub``'s options filled from its ``--config`` files; flags win."""
    unset = object()
    saved = {a.dest: (a.default, a.required) for a in sub._actions}
    for a in sub._actions:  # a first parse tells which options the command line gave
        if a.option_strings and a.dest != "help":
            a.default, a.required = (None if isinstance(a, argparse._AppendAction) else unset), False
    try:
        args = parser.parse_args(argv)
    finally:
        for a in sub._actions:
            a.default, a.required = saved[a.dest]
    from_files: dict[str, Any] = {}
    for path in args.config or []:
        from_files.update(_config_values(path, sub))
    missing = []
    for a in sub._actions:
        if not a.option_strings or a.dest in ("help", "config"):
            continue
        given = getattr(args, a.dest)
        if given is not unset and not (isinstance(a, argparse._AppendAction) and given is None):
            continue  # on the command line: it wins
        value = from_files.get(a.dest, saved[a.dest][0])
        if value is None and saved[a.dest][1]:
            missing.append(a.option_strings[0])
        setattr(args, a.dest, value)
    if missing:
        sub.error(f"the following arguments are required: {', '.join(missing)} (on the command line or in --config)")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` by default) as a namespace, ``--config`` files applied."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] != "attribute" or not any(a == "--config" or a.startswith("--config=") for a in argv):
        return parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices["attribute"]
    return _with_config(parser, sub, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
