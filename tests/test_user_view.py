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

    # the demo's training_step returns its losses: the suspect table carries them (first half: epoch 0)
    table = logged_tables(demo["run"], "grass/suspects", records)[-1]
    assert table.columns == ["train_id", "train_example", "train_label", "suspect", "data_value", "self_influence",
                             "training_loss"]
    check_images(table, "train_id", "train_example", train)
    rows = _csv(folder / "suspects.csv")[: len(table.rows)]
    assert table.column("train_id") == [int(r["train_id"]) for r in rows]
    for key in ("suspect", "training_loss"):
        assert table.column(key) == pytest.approx([float(r[key]) for r in rows], rel=1e-6)
    assert min(table.column("training_loss")) > 0

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
    assert any(line.startswith("  training example #9 dominates query 4 (score 50") for line in lines)
    assert "duplicate" not in text
    assert "exclude=['pooler']" in text and "last period took 0.75 s" in text and "\r" not in text
    text = fit_report(result, periods=2, period="epoch-1", csv_dir=None,
                      duplicates=[(5, 3, 0.91, 2, True), (6, 8, 0.995, 1, False)])
    assert "  duplicate of query 5: training example #3 (the same values as the query; gradient cosine 0.910, " \
           "2nd closest)" in text.splitlines()
    assert "duplicate of query 6: training example #8 (a gradient nearly identical to the query's; gradient " \
           "cosine 0.995, the closest)" in text


def test_gradient_neighbours_match_a_brute_force_reference() -> None:
    from grass_callback._store_format import StoreChunk
    from grass_callback.console import find_duplicates, gradient_neighbours

    g = torch.Generator().manual_seed(3)
    m, n, dims = 4, 37, {"a": 5, "b": 3}
    rows = {name: torch.randn(n, k, generator=g) for name, k in dims.items()}
    rows["a"][11] = 0.0  # a zero row in one layer
    ids = torch.randperm(1000, generator=g)[:n]
    q = {name: torch.randn(m, k, generator=g) for name, k in dims.items()}
    metric = {name: torch.randn(k, k, generator=g, dtype=torch.float64) for name, k in dims.items()}
    metric = {name: a @ a.T + torch.eye(a.shape[0], dtype=torch.float64) for name, a in metric.items()}  # F^-1, SPD
    pre = {name: (q[name].double() @ metric[name]).float() for name in dims}
    q_self = sum(((q[name].double() @ metric[name]) * q[name].double()).sum(1) for name in dims)
    g_self = sum(((rows[name].double() @ metric[name]) * rows[name].double()).sum(1) for name in dims)
    by_id = dict(zip(ids.tolist(), g_self.tolist()))
    steps = torch.zeros(n, dtype=torch.int64)
    chunks = [StoreChunk(ids[a:b], steps[a:b], steps[a:b], {k: v[a:b] for k, v in rows.items()})
              for a, b in ((0, 9), (9, 10), (10, 10), (10, 30), (30, n))]
    got_ids, got_cos = gradient_neighbours(pre, q_self, chunks,
                                           lambda i: torch.tensor([by_id[v] for v in i.tolist()]), candidates=6)
    score = sum(q[name].double() @ metric[name] @ rows[name].double().T for name in dims)
    cos = score / (q_self[:, None] * g_self[None]).sqrt()
    want_cos, at = cos.topk(6, dim=1)
    torch.testing.assert_close(got_cos, want_cos, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_ids, ids[at])
    assert float(got_cos.max()) <= 1 + 1e-6
    # duplicates: the examples' own values decide; without them only a cosine of nearly 1 counts
    qids = torch.tensor([100, 101, 102, 103])
    copy = (101, int(got_ids[1, 2]))
    found = find_duplicates(qids, got_ids, got_cos, same=lambda a, b: (a, b) == copy)
    assert found == [(101, copy[1], float(got_cos[1, 2]), 3, True)]
    near = float(want_cos[2, 0]) - 1e-4  # query 102's closest, and any closer neighbour of the others
    want = [(int(qids[r]), int(ids[at[r, j]]), float(want_cos[r, j]), j + 1, False)
            for r in range(m) for j in range(6) if float(want_cos[r, j]) >= near]
    got = find_duplicates(qids, got_ids, got_cos, same=None, near=near)
    assert [f[:2] + f[3:] for f in got] == [w[:2] + w[3:] for w in want] and (102, int(ids[at[2, 0]])) in \
        [f[:2] for f in got]


def test_same_example_compares_values() -> None:
    from PIL import Image

    from grass_callback.console import same_example

    x = torch.arange(6.0).reshape(2, 3)
    assert same_example((x, 3), (x.clone(), 3)) and not same_example((x, 3), (x, 4))
    assert not same_example(x, x.reshape(3, 2)) and not same_example(x, x.numpy())
    assert same_example({"input_ids": torch.tensor([1, 2]), "text": "a"}, {"text": "a", "input_ids": torch.tensor([1, 2])})
    assert not same_example({"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([1, 3])})
    assert same_example(np.zeros(3), np.zeros(3)) and not same_example(np.zeros(3), np.ones(3))
    img = Image.new("L", (4, 4), 7)
    assert same_example(img, Image.new("L", (4, 4), 7)) and not same_example(img, Image.new("L", (4, 4), 8))


def _digits_run(tmp_path: Path, planted: list[int]):
    """A small digits MLP (600 training examples, 3 epochs, k = 32) with validation examples
    ``planted`` copied into its training set; returns the callback and the copies' training ids."""
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from digits_mlp import build_module, load_digits_split
    from grass_callback import GraSSCallback, IndexedDataset

    train, val, _ = load_digits_split(0)
    x, y = train.tensors[0][:600], train.tensors[1][:600]
    vx, vy = val.tensors
    x, y = torch.cat([x, vx[planted]]), torch.cat([y, vy[planted]])
    L.seed_everything(0, verbose=False)
    grass = GraSSCallback(k=32, num_queries=12, log_to_wandb=False, progress=False, store_dir=tmp_path / "g")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, callbacks=[grass], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(build_module(), DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=32, shuffle=True),
                    DataLoader(IndexedDataset(val), batch_size=64))
    return grass, list(range(600, 600 + len(planted)))


def test_planted_duplicates_are_found_and_a_clean_run_finds_none(tmp_path: Path, one_thread, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO)  # the fit report is a log record of Lightning's rank-zero logger
    planted = [1, 4, 7, 10]  # validation examples among the 12 queries, copied into the training set
    grass, copies = _digits_run(tmp_path / "planted", planted)
    assert [(q, t, identical) for q, t, _, _, identical in grass.duplicates] == \
        [(q, t, True) for q, t in zip(planted, copies)]
    text = caplog.text
    assert "scoring period(s), last epoch-2" in text
    for q, t in zip(planted, copies):
        assert f"duplicate of query {q}: training example #{t} (the same values as the query" in text
    caplog.clear()
    clean, _ = _digits_run(tmp_path / "clean", [])
    assert clean.duplicates == []
    assert "scoring period(s), last epoch-2" in caplog.text and "duplicate of query" not in caplog.text


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
