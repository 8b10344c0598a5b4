"""Tests for grass_callback.report: renderers, W&B run resolution, local files and offline W&B records."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from grass_callback import report
from grass_callback.report import (
    SIGN_CONVENTION,
    InfluenceReporter,
    RunHandle,
    make_renderer,
    render_example,
    resolve_wandb_run,
)
from grass_callback.scoring import ScoreResult

NAN = float("nan")


# ----------------------------------------------------------------------------- helpers


def make_result(with_self_influence: bool = True) -> ScoreResult:
    """Two queries, topk 3, with -1 / NaN padding."""
    return ScoreResult(
        query_ids=torch.tensor([7, 9]),
        top_ids=torch.tensor([[3, 1, -1], [2, -1, -1]]),
        top_scores=torch.tensor([[2.5, 1.0, NAN], [0.5, NAN, NAN]]),
        bottom_ids=torch.tensor([[4, 0, -1], [5, -1, -1]]),
        bottom_scores=torch.tensor([[-3.0, -0.25, NAN], [-1.5, NAN, NAN]]),
        data_value_ids=torch.tensor([0, 1, 2, 3, 4, 5]),
        data_value=torch.tensor([-0.25, 1.0, 0.5, 2.5, -3.0, -1.5]),
        self_influence_ids=torch.tensor([0, 1, 2, 3, 4, 5]) if with_self_influence else None,
        self_influence=torch.tensor([1.0, 3.0, 2.0, 0.5, 4.0, 0.25]) if with_self_influence else None,
    )


# (query_id, rank, train_id, score, kind) expected from make_result(), padding skipped
EXPECTED_INFLUENCE = [
    (7, 1, 3, 2.5, "proponent"), (7, 2, 1, 1.0, "proponent"),
    (7, 1, 4, -3.0, "opponent"), (7, 2, 0, -0.25, "opponent"),
    (9, 1, 2, 0.5, "proponent"),
    (9, 1, 5, -1.5, "opponent"),
]


def read_csv(path: Path) -> tuple[str, list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        first = fh.readline()
        return first, list(csv.DictReader(fh))


class FakeTokenizer:
    def decode(self, ids: list[int]) -> str:
        return " ".join(f"tok{i}" for i in ids)


class RecordingRun:
    """Stands in for a wandb run: records log/finish calls, can fail on log."""

    def __init__(self, fail: bool = False, step: int = 0) -> None:
        self.fail, self.step = fail, step
        self.summary: dict[str, Any] = {}
        self.logged: list[tuple[dict[str, Any], int | None]] = []
        self.artifacts: list[Any] = []
        self.finished = 0

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.fail:
            raise RuntimeError("network is down")
        self.logged.append((data, step))

    def log_artifact(self, artifact: Any) -> None:
        self.artifacts.append(artifact)

    def finish(self) -> None:
        self.finished += 1


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging) if the body takes longer than ``seconds`` (POSIX main thread)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_dir(save_dir: Path) -> Path:
    dirs = sorted((save_dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def inspect_records(run_path: Path) -> list[dict[str, Any]]:
    """All records of an offline run, via ``wandb leet inspect --json``."""
    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe)] if exe.exists() else [shutil.which("wandb") or "wandb"]
    out = subprocess.run([*cmd, "leet", "inspect", "--json", str(run_path)], capture_output=True, text=True,
                         timeout=60, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip().startswith("{")]


def history_items(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["history"] for r in records if r["type"] == "history"]


def logged_table(run_path: Path, item: dict[str, Any], key: str) -> dict[str, Any]:
    assert item[f"{key}._type"] == "table-file"
    return json.loads((run_path / "files" / item[f"{key}.path"]).read_text())


# ----------------------------------------------------------------------------- rendering


def test_render_float_image_tensor_is_normalized_wandb_image() -> None:
    import wandb

    x = torch.linspace(-2.0, 5.0, 3 * 8 * 6).reshape(3, 8, 6)
    img = render_example(x)
    assert isinstance(img, wandb.Image) and img.image.size == (6, 8) and img.image.mode == "RGB"
    expected = np.round((x.permute(1, 2, 0).double().numpy() + 2.0) / 7.0 * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(img.image), expected)  # min-max scaled to the full range


def pixels(cell: Any) -> np.ndarray:
    """The uint8 pixels a rendered wandb.Image holds, ``[H, W]`` or ``[H, W, 3]``."""
    import wandb

    assert isinstance(cell, wandb.Image), type(cell)
    arr = np.asarray(cell.image)
    if arr.ndim == 3 and arr.shape[2] == 3 and (arr == arr[..., :1]).all():
        return arr[..., 0]  # grey stored as RGB
    return arr


_G = torch.Generator().manual_seed(3)
_U8 = torch.randint(0, 256, (8, 8, 3), generator=_G, dtype=torch.uint8).numpy()


@pytest.mark.parametrize("example, expected", [
    # channels first, one channel: floats in [0, 1] scaled by 255 and rounded
    (torch.tensor([[[0.0, 1.0], [0.5, 0.25]]]), np.array([[0, 255], [128, 64]], dtype=np.uint8)),
    # [H, W]
    (torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), np.array([[255, 0, 0], [0, 255, 0]], dtype=np.uint8)),
    # channels last uint8: kept exactly
    (_U8, _U8),
    # channels last, one float channel
    (np.full((5, 7, 1), 0.5, dtype=np.float32), np.full((5, 7), 128, dtype=np.uint8)),
    # a flat vector of a square length (digits: 64 = 8 x 8), row-major
    (torch.arange(64, dtype=torch.float32) / 63.0, np.round(np.arange(64).reshape(8, 8) / 63.0 * 255).astype(np.uint8)),
])
def test_render_image_pixels(example: Any, expected: np.ndarray) -> None:
    assert np.array_equal(pixels(render_example(example)), expected)


def test_render_channels_first_rgb_moves_channels_last() -> None:
    x = torch.rand(3, 4, 5, generator=_G)
    got = pixels(render_example(x))
    assert got.shape == (4, 5, 3)
    assert np.array_equal(got, np.round(x.permute(1, 2, 0).double().numpy() * 255).astype(np.uint8))


def test_render_pil_image_and_image_shape_and_scale() -> None:
    from PIL import Image

    arr = torch.randint(0, 256, (6, 4, 3), generator=_G, dtype=torch.uint8).numpy()
    assert np.array_equal(pixels(render_example(Image.fromarray(arr))), arr)
    flat = torch.rand(12, generator=_G)  # not a square: shown as an image only with image_shape
    assert isinstance(render_example(flat), str)
    got = pixels(render_example(flat, image_shape=(3, 4), image_scale=5))
    assert got.shape == (15, 20)
    small = np.round(flat.reshape(3, 4).double().numpy() * 255).astype(np.uint8)
    assert np.array_equal(got[::5, ::5], small) and np.array_equal(got, small.repeat(5, 0).repeat(5, 1))


def test_render_float_in_unit_range_is_kept() -> None:
    img = render_example(torch.full((4, 4), 0.5))
    assert np.asarray(img.image).max() == 128  # 0.5 * 255 rounded, not rescaled to 255


def test_render_tokens_with_tokenizer_and_truncation() -> None:
    tok = FakeTokenizer()
    assert render_example(torch.tensor([1, 2, 3]), tokenizer=tok) == "tok1 tok2 tok3"
    assert render_example([4, 5], tokenizer=tok) == "tok4 tok5"
    long = render_example(torch.arange(100), tokenizer=tok, max_chars=20)
    assert len(long) == 20 and long.startswith("tok0 tok1") and long.endswith("\u2026")


def test_render_tokenizer_gets_skip_special_tokens_when_supported() -> None:
    class HFLike:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "".join("" if (skip_special_tokens and i == 0) else chr(96 + i) for i in ids)

    assert render_example(torch.tensor([0, 1, 2, 0]), tokenizer=HFLike()) == "ab"


def test_render_samples_pick_their_main_field() -> None:
    tok = FakeTokenizer()
    sample = {"labels": torch.tensor([1]), "input_ids": torch.tensor([8, 9]), "index": 3}
    assert render_example(sample, tokenizer=tok) == "tok8 tok9"
    x = torch.rand(1, 8, 8, generator=_G)
    expected = np.round(x[0].double().numpy() * 255).astype(np.uint8)
    assert np.array_equal(pixels(render_example((x, 3, 17))), expected)  # (x, y, index)
    assert np.array_equal(pixels(render_example({"meta": "a", "pixels": x[0]})), expected)


class PadTokenizer(FakeTokenizer):
    pad_token_id = 0


def test_render_text_drops_padding_and_masked_positions() -> None:
    tok = PadTokenizer()
    assert render_example(torch.tensor([5, 6, 0, 0]), tokenizer=tok) == "tok5 tok6"  # trailing pad
    assert render_example(torch.tensor([0, 0, 5, 6]), tokenizer=tok) == "tok5 tok6"  # left padding
    sample = {"input_ids": torch.tensor([7, 8, 9, 3]), "attention_mask": torch.tensor([1, 1, 0, 0]),
              "labels": torch.tensor([7, 8, -100, -100])}
    assert render_example(sample, tokenizer=tok) == "tok7 tok8"  # the mask wins, pad id or not
    assert render_example(sample) == render_example(sample["input_ids"])  # no tokenizer: the ids' repr


def test_example_label() -> None:
    from grass_callback.render import example_label

    assert example_label((torch.rand(64), torch.tensor(7), 3)) == 7
    assert example_label((torch.rand(64), 2.5)) == 2.5
    assert example_label({"input_ids": torch.tensor([1, 2]), "label": torch.tensor([4])}) == 4
    assert example_label({"x": 1, "target": "cat"}) == "cat"
    assert example_label({"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])}) is None  # per token
    assert example_label(torch.rand(8, 8)) is None and example_label([1, 2, 3]) is None


def test_resolve_renderers_per_dataset() -> None:
    from grass_callback.errors import ConfigError
    from grass_callback.render import resolve_renderers

    train_fn, query_fn = resolve_renderers({"query": lambda e: "q!"}, tokenizer=FakeTokenizer())
    assert query_fn(torch.tensor([1])) == "q!" and train_fn(torch.tensor([1])) == "tok1"
    one = lambda e: "one"  # noqa: E731
    assert resolve_renderers(one) == (one, one)
    with pytest.raises(ConfigError, match="'train' and/or 'query'"):
        resolve_renderers({"val": one})
    with pytest.raises(ConfigError, match="callable"):
        resolve_renderers({"train": 3})


def test_render_other_objects_as_truncated_repr() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "Thing(" + "x" * 500 + ")"

    out = render_example(Thing(), max_chars=50)
    assert isinstance(out, str) and len(out) == 50 and out.startswith("Thing(xxx") and out.endswith("\u2026")
    assert render_example(3.5) == "3.5"
    assert render_example(torch.tensor([1, 2, 3])) == repr(torch.tensor([1, 2, 3]))  # ids, no tokenizer
    assert render_example(torch.rand(4, 8, 8)).startswith("tensor(")  # 4 channels: not an image
    assert render_example(None) is None


def test_make_renderer() -> None:
    assert make_renderer(FakeTokenizer())(torch.tensor([1])) == "tok1"
    custom = lambda example: "custom!"  # noqa: E731
    assert make_renderer(FakeTokenizer(), custom) is custom


# ----------------------------------------------------------------------------- local files


def test_local_files_round_trip_skip_padding_and_use_data_value_override(tmp_path: Path) -> None:
    reporter = InfluenceReporter(tmp_path / "scores")
    override = (torch.tensor([10, 11, 12]), torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64))
    folder = reporter.report(make_result(), step=4, period="epoch-0", scalars={"fit_seconds": 1.5},
                             data_value=override)
    assert folder == tmp_path / "scores" / "epoch-0"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["influence.csv", "self_influence.csv", "data_value.csv", "scalars.json"])  # no temp files left

    first, rows = read_csv(folder / "influence.csv")
    assert first.startswith("# ") and "proponent" in first and "lowers" in first
    got = [(int(r["query_id"]), int(r["rank"]), int(r["train_id"]), float(r["score"]), r["kind"]) for r in rows]
    assert got == EXPECTED_INFLUENCE
    assert all(int(r["train_id"]) >= 0 and not math.isnan(float(r["score"])) for r in rows)

    first, rows = read_csv(folder / "self_influence.csv")
    assert first.startswith("# sign convention")
    assert [(int(r["train_id"]), float(r["self_influence"])) for r in rows] == [
        (4, 4.0), (1, 3.0), (2, 2.0), (0, 1.0), (3, 0.5), (5, 0.25)]

    first, rows = read_csv(folder / "data_value.csv")
    assert first.startswith("# sign convention")
    assert [(int(r["train_id"]), float(r["data_value"])) for r in rows] == [(11, 2.0), (10, 0.5), (12, -1.0)]

    scalars = json.loads((folder / "scalars.json").read_text())
    assert scalars["step"] == 4 and scalars["period"] == "epoch-0"
    assert scalars["scalars"] == {"fit_seconds": 1.5} and scalars["sign_convention"] == SIGN_CONVENTION


def test_local_files_without_self_influence_and_result_data_value(tmp_path: Path) -> None:
    folder = InfluenceReporter(tmp_path).report(make_result(with_self_influence=False), step=0, period="p/1")
    assert folder.name == "p-1"  # made file-name safe
    assert read_csv(folder / "self_influence.csv")[1] == []
    rows = read_csv(folder / "data_value.csv")[1]
    assert [int(r["train_id"]) for r in rows] == [3, 1, 2, 0, 5, 4]  # result's own data value, highest first


def test_wandb_failure_becomes_warning_and_keeps_files(tmp_path: Path) -> None:
    run = RecordingRun(fail=True)
    reporter = InfluenceReporter(tmp_path, RunHandle(run, owned=False))
    with pytest.warns(UserWarning, match="W&B failed"):
        folder = reporter.report(make_result(), step=1, period="epoch-0")
    assert len(read_csv(folder / "influence.csv")[1]) == len(EXPECTED_INFLUENCE)
    reporter.finish()
    assert run.finished == 0  # not owned: never finished


def test_finish_only_owned_runs_once(tmp_path: Path) -> None:
    run = RecordingRun()
    reporter = InfluenceReporter(tmp_path, RunHandle(run, owned=True))
    reporter.finish()
    reporter.finish()
    assert run.finished == 1


def test_step_behind_the_run_is_logged_without_step(tmp_path: Path) -> None:
    ahead, behind = RecordingRun(step=100), RecordingRun(step=2)
    InfluenceReporter(tmp_path / "a", RunHandle(ahead, owned=False)).report(make_result(), step=5, period="e")
    InfluenceReporter(tmp_path / "b", RunHandle(behind, owned=False)).report(make_result(), step=5, period="e")
    (data, step), = ahead.logged
    assert step is None and data["trainer/global_step"] == 5
    (data, step), = behind.logged
    assert step == 5
    assert {"grass/influence", "grass/self_influence", "grass/data_value"} <= set(data)


def test_renderer_failures_do_not_lose_tables(tmp_path: Path) -> None:
    def broken(example: Any) -> Any:
        raise ValueError("cannot render")

    def lookup(i: int) -> Any:
        if i == 5:
            raise IndexError(i)
        return ("sample", i)

    run = RecordingRun()
    InfluenceReporter(tmp_path, RunHandle(run, owned=False), train_example=lookup, renderer=broken).report(
        make_result(), step=0, period="e")
    (data, _), = run.logged
    table = data["grass/influence"]
    assert table.columns == ["query_id", "query", "rank", "train_id", "train_example", "train_label", "score", "kind"]
    cells = {row[3]: (row[4], row[5]) for row in table.data}
    assert cells[3] == ("('sample', 3)", 3)  # repr fallback; the label still read from the sample
    assert cells[5] == (None, None)  # lookup failed


# ----------------------------------------------------------------------------- W&B offline


def test_offline_run_tables_histograms_scalars_and_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    handle = resolve_wandb_run(save_dir=tmp_path, project="grass-test", config={"k": 16})
    assert handle is not None and handle.owned and handle.run.offline
    images = torch.rand(6, 1, 8, 8)
    reporter = InfluenceReporter(tmp_path / "scores", handle, train_example=lambda i: (images[i], 10 + i, i),
                                 query_example=lambda q: f"query text {q}", max_rows=2)
    override = (torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5.0, -1.0, 3.0, -4.0, 0.0]))
    layers = {"fc1": {"k": 16, "condition_number": 12.5}, "fc2": {"k": 16, "condition_number": 3.0}}
    reporter.report(make_result(), step=3, period="epoch-0", data_value=override, layers=layers,
                    scalars={"fisher_condition_max": 12.5, "seconds/fit": 0.25, "seconds/scoring": 0.5})
    reporter.finish()
    assert wandb.run is None  # owned run finished

    path = run_dir(tmp_path)
    records = inspect_records(path)
    items = [h["item"] for h in history_items(records) if "grass/influence._type" in h["item"]]
    assert len(items) == 1
    item = items[0]
    assert item["_step"] == 3 and item["grass/seconds/fit"] == 0.25 and item["grass/fisher_condition_max"] == 12.5
    assert item["grass/self_influence_hist._type"] == "histogram"
    assert item["grass/data_value_hist._type"] == "histogram"
    assert sum(item["grass/data_value_hist.values"]) == 5

    table = logged_table(path, item, "grass/influence")
    assert table["columns"] == ["query_id", "query", "rank", "train_id", "train_example", "train_label", "score",
                                "kind"]  # queries are strings: no query_label column
    assert [(r[0], r[2], r[3], r[6], r[7]) for r in table["data"]] == EXPECTED_INFLUENCE
    assert {r[1] for r in table["data"]} == {"query text 7", "query text 9"}
    assert [r[5] for r in table["data"]] == [10 + r[3] for r in table["data"]]  # the sample's label
    assert all(r[4] == "Image" for r in table["data"])  # the run folder's copy: a text preview

    from grass_callback.offline_run import logged_tables

    full, = logged_tables(path, "grass/influence", records)  # what W&B gets: the run_table artifact
    for row, tid in zip(full.rows, full.column("train_id")):
        png = full.image_file(row[4])
        expected = np.round(images[tid, 0].double().numpy() * 255).astype(np.uint8)
        from PIL import Image

        assert png is not None and np.array_equal(np.asarray(Image.open(png).convert("L")), expected)

    table = logged_table(path, item, "grass/self_influence")
    assert table["columns"] == ["train_id", "train_example", "train_label", "self_influence"]
    assert [(r[0], r[2], r[3]) for r in table["data"]] == [(4, 14, 4.0), (1, 11, 3.0)]  # top max_rows=2

    table = logged_table(path, item, "grass/data_value")
    assert table["columns"] == ["group", "train_id", "train_example", "train_label", "data_value"]
    assert [(r[0], r[1], r[4]) for r in table["data"]] == [
        ("most", 0, 5.0), ("most", 2, 3.0), ("least", 3, -4.0), ("least", 1, -1.0)]

    table = logged_table(path, item, "grass/layers")
    assert table["columns"] == ["layer", "k", "condition_number"]
    assert table["data"] == [["fc1", 16, 12.5], ["fc2", 16, 3.0]]
    assert (tmp_path / "scores" / "epoch-0" / "layers.csv").exists()

    summaries = {}
    for r in records:
        if r["type"] == "summary":
            summaries.update(r["summary"]["update"])
    assert summaries["grass/sign_convention"] == SIGN_CONVENTION
    assert summaries["grass/fisher_condition_max"] == 12.5
    assert not [key for key in summaries if key.startswith("grass/seconds/")]  # charts only, no summary lines

    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    scores = [a for a in artifacts if a["type"] == "grass-scores"]
    assert [a["name"] for a in scores] == ["grass-scores-epoch-0"]
    assert sorted(c["path"] for c in scores[0]["manifest"]["contents"]) == [
        "data_value.csv", "influence.csv", "layers.csv", "scalars.json", "self_influence.csv"]
    # the rendered images travel with the influence table's run_table artifact
    tables = [a for a in artifacts if a["type"] == "run_table"
              and any(c["path"] == "grass/influence.table.json" for c in a["manifest"]["contents"])]
    assert len(tables) == 1
    pngs = [c["path"] for c in tables[0]["manifest"]["contents"] if c["path"].startswith("media/images/")]
    assert len(pngs) == len({row[2] for row in EXPECTED_INFLUENCE})  # one image per distinct train id


def test_disabled_mode_returns_none_and_warns_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(report, "_warned_local_only", False)
    with pytest.warns(UserWarning, match="local files only"):
        assert resolve_wandb_run(save_dir=tmp_path) is None
    with warnings_recorded() as seen:
        assert resolve_wandb_run(save_dir=tmp_path) is None
    assert not [w for w in seen if "local files only" in str(w.message)]
    assert not (tmp_path / "wandb").exists()


@contextlib.contextmanager
def warnings_recorded():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield seen


def test_online_without_api_key_falls_back_to_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    assert not report._has_api_key()
    with time_limit(60), pytest.warns(UserWarning, match="logging offline"):
        handle = resolve_wandb_run(save_dir=tmp_path / "save")
    try:
        assert handle is not None and handle.owned and handle.run.offline
        assert run_dir(tmp_path / "save").is_dir()
    finally:
        handle.run.finish()


def test_api_key_detection_reads_netrc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_path = tmp_path / ".netrc"
    netrc_path.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    netrc_path.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert report._has_api_key()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    netrc_path.unlink()
    assert report._has_api_key()


def test_reuses_trainer_wandb_logger_run_and_logs_when_it_is_ahead(tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="grass-test")
    trainer = L.Trainer(logger=logger, accelerator="cpu", max_epochs=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    handle = resolve_wandb_run(trainer, save_dir=tmp_path / "unused", config={"grass": {"k": 8}})
    run = logger.experiment
    try:
        assert handle is not None and handle.run is run and not handle.owned
        assert not (tmp_path / "unused").exists()  # no second run started
        assert run.config["grass"] == {"k": 8}
        run.log({"train/loss": 1.0}, step=10)  # the logger's run is ahead of the reporter's step
        InfluenceReporter(tmp_path / "scores", handle).report(make_result(), step=4, period="epoch-0")
        reporter = InfluenceReporter(tmp_path / "scores", handle)
        reporter.finish()
        run.log({"after_finish": 1.0})  # the borrowed run is still open
    finally:
        run.finish()

    records = inspect_records(run_dir(tmp_path))
    histories = history_items(records)
    ours = [h for h in histories if "grass/influence._type" in h["item"]]
    assert len(ours) == 1  # not dropped for its lower step
    assert ours[0]["item"]["trainer/global_step"] == 4 and ours[0]["item"]["_step"] >= 10
    assert any("after_finish" in h["item"] for h in histories)
    table = logged_table(run_dir(tmp_path), ours[0]["item"], "grass/influence")
    assert [(r[0], r[2], r[3], r[5], r[6]) for r in table["data"]] == EXPECTED_INFLUENCE
