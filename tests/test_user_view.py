"""What a user sees: the demo's W&B tables read back as W&B gets them, the run summary, the console
in a pipe, the end-of-fit report and its findings."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def _csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README's demo, small: 2 epochs, k = 64, in a subprocess with stdout/stderr piped."""
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "digits_mlp.py"), "--epochs", "2", "--k", "64",
                           "--num-queries", "6", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, = (out / "wandb").glob("offline-run-*")
    return {"out": out, "run": run, "stdout": proc.stdout, "stderr": proc.stderr}


def test_demo_tables_hold_digit_images_labels_and_the_csv_values(demo: dict) -> None:
    from PIL import Image

    from digits_mlp import load_digits_split
    from grass_callback.offline_run import logged_tables, run_records

    train, val, _ = load_digits_split(0)
    records = run_records(demo["run"])
    folder = demo["out"] / "grass" / "scores" / "epoch-1"

    def digit(pixels: torch.Tensor) -> np.ndarray:  # the demo's renderer: 8x8, each pixel 12x12
        small = np.round(pixels.reshape(8, 8).double().numpy() * 255).astype(np.uint8)
        return small.repeat(12, 0).repeat(12, 1)

    def check_images(table, id_column: str, cell_column: str, dataset) -> None:
        for i, cell in zip(table.column(id_column), table.column(cell_column)):
            png = table.image_file(cell)
            assert png is not None, (table.key, cell)
            assert np.array_equal(np.asarray(Image.open(png).convert("L")), digit(dataset[i][0]))

    influence = logged_tables(demo["run"], "grass/influence", records)
    assert len(influence) == 2  # one per epoch
    table = influence[-1]
    assert table.columns == ["query_id", "query", "query_label", "rank", "train_id", "train_example",
                             "train_label", "score", "kind"]
    check_images(table, "train_id", "train_example", train)
    check_images(table, "query_id", "query", val)
    assert table.column("train_label") == [int(train[t][1]) for t in table.column("train_id")]  # flipped ones too
    assert table.column("query_label") == [int(val[q][1]) for q in table.column("query_id")]
    rows = _csv(folder / "influence.csv")
    assert [(int(r["query_id"]), int(r["rank"]), int(r["train_id"]), r["kind"]) for r in rows] == list(
        zip(table.column("query_id"), table.column("rank"), table.column("train_id"), table.column("kind")))
    assert [float(r["score"]) for r in rows] == pytest.approx(table.column("score"), rel=1e-6)

    table = logged_tables(demo["run"], "grass/self_influence", records)[-1]
    check_images(table, "train_id", "train_example", train)
    rows = _csv(folder / "self_influence.csv")[: len(table.rows)]
    assert table.column("train_id") == [int(r["train_id"]) for r in rows]
    assert table.column("self_influence") == pytest.approx([float(r["self_influence"]) for r in rows], rel=1e-6)
    assert table.column("train_label") == [int(train[t][1]) for t in table.column("train_id")]

    table = logged_tables(demo["run"], "grass/data_value", records)[-1]
    check_images(table, "train_id", "train_example", train)
    rows = _csv(folder / "data_value.csv")
    most = [(r[1], r[4]) for r in table.rows if r[0] == "most"]
    assert most == [(int(r["train_id"]), pytest.approx(float(r["data_value"]), rel=1e-6)) for r in rows[: len(most)]]

    layers = logged_tables(demo["run"], "grass/layers", records)[-1]
    assert layers.column("layer") == ["net.0", "net.2", "net.4"]
    assert all(1.0 <= c <= 1 + 64 / 0.01 for c in layers.column("condition_number"))


def test_demo_summary_holds_a_handful_of_scalars(demo: dict) -> None:
    from grass_callback.offline_run import run_records

    summary: dict = {}
    for record in run_records(demo["run"]):
        if record["type"] == "summary":
            summary.update(record["summary"]["update"])
    ours = sorted(k for k in summary if k.startswith("grass/") and "." not in k)
    media = {"grass/influence", "grass/self_influence", "grass/data_value", "grass/layers",
             "grass/self_influence_hist", "grass/data_value_hist"}
    scalars = [k for k in ours if k.split(".")[0] not in media]
    assert scalars == ["grass/capture_seconds_per_step", "grass/fisher_condition_max", "grass/period_seconds",
                       "grass/rows_scored", "grass/sign_convention", "grass/store_bytes"]
    assert summary["grass/rows_scored"] == 1437


def test_demo_console_in_a_pipe(demo: dict) -> None:
    text = demo["stdout"] + demo["stderr"]
    assert "\r" not in "".join(line for line in text.splitlines(keepends=True) if "grass" in line)
    assert "grass: training gradients" not in text and "grass: scoring" not in text  # no bars in a pipe
    assert text.count("scoring period(s), last epoch-1") == 1  # the end-of-fit report, once
    report = text[text.index("scoring period(s), last epoch-1"):]
    run = demo["run"]
    assert f"W&B tables: {run}" in report and "CSV tables: " + str(demo["out"] / "grass" / "scores" / "epoch-1") in report
    assert "highest self-influence" in report


def test_fit_report_finds_a_dominant_proponent() -> None:
    from grass_callback.console import dominant_proponents, fit_report
    from grass_callback.scoring import ScoreResult

    result = ScoreResult(
        query_ids=torch.tensor([4, 5, 6]),
        top_ids=torch.tensor([[9, 1, 2], [3, 4, 5], [7, -1, -1]]),
        top_scores=torch.tensor([[50.0, 5.0, 4.0], [3.0, 2.0, 1.0], [8.0, float("nan"), float("nan")]]),
        bottom_ids=torch.tensor([[0, 1, 2]] * 3), bottom_scores=-torch.ones(3, 3),
        data_value_ids=torch.arange(10), data_value=torch.zeros(10),
        self_influence_ids=torch.arange(10), self_influence=torch.arange(10.0))
    assert dominant_proponents(result.query_ids, result.top_ids, result.top_scores) == [(4, 9, 50.0, 10.0)]
    text = fit_report(result, periods=2, period="epoch-1", csv_dir=Path("x/epoch-1"), silent_layers=["pooler"],
                      seconds={"fit": 0.5, "scoring": 0.25})
    lines = text.splitlines()
    assert lines[0] == "grass_callback: 2 scoring period(s), last epoch-1: 3 queries against 10 training examples"
    assert "  highest self-influence (outliers or mislabelled?): #9 (9), #8 (8), #7 (7), #6 (6), #5 (5)" in lines
    assert any(line.startswith("  looks like a copy: training example #9 dominates query 4") for line in lines)
    assert "exclude=['pooler']" in text and "last period took 0.75 s" in text and "\r" not in text


def test_silent_layer_reported_once_with_exclude(tmp_path: Path) -> None:
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from grass_callback import GraSSCallback, IndexedDataset

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.unused = nn.Linear(4, 3), nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            self.unused(x).detach()  # runs, but no gradient flows through it
            return nn.functional.cross_entropy(self.body(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = IndexedDataset(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))))
    grass = GraSSCallback(k=8, num_queries=4, log_to_wandb=False, store_dir=tmp_path / "g", progress=False,
                          query_loader=DataLoader(data, batch_size=8))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[grass], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    with pytest.warns(UserWarning) as seen:
        trainer.fit(Model(), DataLoader(data, batch_size=8))
    silent = [str(w.message) for w in seen if "got no gradient" in str(w.message)]
    assert len(silent) == 1 and "exclude=['unused']" in silent[0]  # once, over two periods
    assert not [w for w in seen if "zero trace" in str(w.message)]
    layers = _csv(tmp_path / "g" / "scores" / "epoch-1" / "layers.csv")
    assert {r["layer"]: r["zero_gradient"] for r in layers} == {"body": "False", "unused": "True"}
    assert set(grass.period_seconds) == {"flush", "reduce", "fit", "query_gradients", "scoring", "conditions",
                                         "report"}


class _Stream:
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.parts = tty, []

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_draws_on_a_terminal_only() -> None:
    from grass_callback.console import ProgressHost, progress_iter

    pipe, tty = _Stream(False), _Stream(True)
    assert list(progress_iter(range(5), "grass: x", ProgressHost(stream=pipe))) == [0, 1, 2, 3, 4]
    assert pipe.parts == []  # nothing at all in a pipe
    assert list(progress_iter(range(5), "grass: x", ProgressHost(stream=tty))) == [0, 1, 2, 3, 4]
    drawn = "".join(tty.parts)
    assert "grass: x" in drawn and "0/5" in drawn
    assert drawn.rstrip("\r").rsplit("\r", 1)[-1].strip() == ""  # leave=False: the line is cleared at the end
    assert list(progress_iter(range(3), "grass: x", False)) == [0, 1, 2]


def test_progress_joins_lightnings_rich_display() -> None:
    from rich.console import Console
    from rich.progress import Progress

    from grass_callback.console import ProgressHost, progress_iter

    class RichProgressBar:  # what the host looks for on the trainer (Lightning's class name)
        is_disabled = False

        def __init__(self, terminal: bool) -> None:
            self.progress = Progress(console=Console(file=_Stream(terminal), force_terminal=terminal))

    class Trainer:
        def __init__(self, terminal: bool) -> None:
            self.progress_bar_callback = RichProgressBar(terminal)

    trainer = Trainer(True)
    seen = []
    for item in progress_iter(range(4), "grass: query gradients", ProgressHost(trainer)):
        seen.append([(t.description, t.completed, t.total) for t in trainer.progress_bar_callback.progress.tasks])
    assert seen == [[("grass: query gradients", i, 4)] for i in range(4)]  # one task on Lightning's display
    assert trainer.progress_bar_callback.progress.tasks == []  # removed when done
    piped = Trainer(False)
    for _ in progress_iter(range(2), "grass: scoring", ProgressHost(piped)):
        assert piped.progress_bar_callback.progress.tasks == []  # not a terminal: no task
