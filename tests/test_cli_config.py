"""``attribute --config FILE``: options from YAML/JSON (a LightningCLI file as it is), flags override,
unknown keys named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grass_callback.__main__ import main, parse_args

FLAGS = ["attribute", "--ckpt", "a.ckpt", "--ckpt", "b.ckpt", "--model", "pkg.models:LM", "--data",
         "pkg.data:TextData", "--data-args", '{"batch_size": 8, "root": "x"}', "--k", "64", "--num-queries", "4",
         "--damping-ratio", "0.5", "--mask-run", "1", "--exclude", "pooler*", "--quiet"]


def _without_config(args) -> dict:
    out = dict(vars(args))
    out.pop("config")
    return out


def test_a_lightning_cli_config_gives_what_the_flags_give(tmp_path: Path) -> None:
    # the user's training config (LightningCLI layout) plus a grass section
    (tmp_path / "fit.yaml").write_text(
        "seed_everything: 3\n"
        "trainer:\n  max_epochs: 2\n  accelerator: cpu\n"
        "model:\n  class_path: pkg.models.LM\n  init_args:\n    width: 32\n"
        "data:\n  class_path: pkg.data.TextData\n  init_args:\n    batch_size: 8\n    root: x\n"
        "optimizer:\n  class_path: torch.optim.Adam\n"
        "grass:\n  ckpt: [a.ckpt, b.ckpt]\n  k: 64\n  num-queries: 4\n  damping_ratio: 0.5\n"
        "  mask_run: 1\n  exclude: pooler*\n  quiet: true\n")
    from_file = parse_args(["attribute", "--config", str(tmp_path / "fit.yaml")])
    from_flags = parse_args(FLAGS)
    assert _without_config(from_file) == _without_config(from_flags)
    assert from_file.mask_run == 1 and from_file.k == 64 and from_file.exclude == ["pooler*"]
    assert json.loads(from_file.data_args) == {"batch_size": 8, "root": "x"}

    # a JSON file of the CLI's own keys works the same
    (tmp_path / "own.json").write_text(json.dumps({
        "ckpt": ["a.ckpt", "b.ckpt"], "model": "pkg.models:LM", "data": "pkg.data:TextData",
        "data_args": {"batch_size": 8, "root": "x"}, "k": 64, "num_queries": 4, "damping_ratio": 0.5,
        "mask_run": "1", "exclude": ["pooler*"], "quiet": True}))
    assert _without_config(parse_args(["attribute", "--config", str(tmp_path / "own.json")])) == \
        _without_config(from_flags)


def test_flags_override_the_file_and_later_files_override_earlier(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("ckpt: [a.ckpt, b.ckpt]\nmodel: m:M\ndata: d:D\nk: 64\ntopk: 7\n")
    (tmp_path / "b.yaml").write_text("topk: 3\n")
    args = parse_args(["attribute", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"),
                       "--k", "128", "--ckpt", "c.ckpt"])
    assert args.k == 128 and args.topk == 3
    assert args.ckpt == ["c.ckpt"]  # a repeatable flag on the command line replaces the file's list
    assert args.seed == 0 and args.data_args == "{}" and args.quiet is False  # untouched defaults


@pytest.mark.parametrize("text, words", [
    ("ckpt: a\nmodel: m:M\ndata: d:D\nnum_querie: 4\n", ["unknown keys num_querie", "num_queries"]),
    ("grass:\n  topk_: 2\n", ["unknown keys topk_"]),
    ("data:\n  class_path: d.D\n  init_arg: {}\n", ["unknown keys under data: init_arg"]),
    ("k: 3.5\n", ["k (--k) got 3.5"]),
    ("quiet: 1\n", ["quiet (--quiet) must be true or false"]),
    ("method: trak\n", ["method (--method) must be one of"]),
    ("- k\n", ["expected a mapping"]),
    ("k: 64\n", ["required: --ckpt, --model, --data"]),
])
def test_bad_config_files_are_errors_that_say_what_is_wrong(tmp_path: Path, capsys, text: str, words) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_args(["attribute", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_a_missing_config_file_is_named(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["attribute", "--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml: cannot read it" in capsys.readouterr().err


def test_main_runs_attribute_with_the_merged_options(tmp_path: Path, monkeypatch) -> None:
    import grass_callback.checkpoints as checkpoints

    seen = []
    monkeypatch.setattr(checkpoints, "run_attribute_cli", lambda args: seen.append(args) or 0)
    (tmp_path / "c.yaml").write_text("model: {class_path: pkg.models.LM}\ndata: {class_path: pkg.data.D}\n")
    assert main(["attribute", "--config", str(tmp_path / "c.yaml"), "--ckpt", "x.ckpt"]) == 0
    assert seen[0].model == "pkg.models:LM" and seen[0].data == "pkg.data:D" and seen[0].ckpt == ["x.ckpt"]
