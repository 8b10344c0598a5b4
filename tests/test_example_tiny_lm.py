"""examples/tiny_lm.py end to end (--quick): a planted duplicate is found, tables and CSVs are written."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_lm  # noqa: E402  (needs transformers and tokenizers, both dependencies: no skip)


def _influence_rows(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


def _last_table(run_dir: Path) -> dict:
    """The influence table of the last scoring period (file names carry a W&B counter)."""
    tables = list(run_dir.glob("files/media/table/grass/influence*.json"))
    assert tables, f"no influence table under {run_dir}"
    return json.loads(max(tables, key=lambda p: int(re.search(r"influence_(\d+)_", p.name)[1])).read_text())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_lm_finds_the_planted_duplicate(arch: str, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    out = tiny_lm.main(["--quick", "--arch", arch, "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads   # main() runs single-threaded, then restores the count
    planted, train = out["planted_train_id"], out["train_passages"]
    tokenizer = out["tokenizer"]

    # the held-out copy of training passage `planted` has it as its top proponent: first in 20 of 20
    # quick gpt2 seeds and 10 of 10 llama seeds (seed 0: score ~3e3 vs ~3e2 for the runner-up)
    assert out["planted_rank"] == 1
    # and the real held-out passages share more tokens with their top proponent than with a random
    # training passage (true in all 30 seeds tried; seed 0: ~0.18-0.22 vs ~0.13)
    assert out["top_overlap"] > out["random_overlap"]

    # W&B tables in the offline run under --out, with decoded passages in the cells
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and out["run_dir"] == runs[0]
    table = _last_table(runs[0])
    col = {name: i for i, name in enumerate(table["columns"])}
    top = [row for row in table["data"] if row[col["query_id"]] == 0 and row[col["rank"]] == 1
           and row[col["kind"]] == "proponent"]
    assert len(top) == 1 and top[0][col["train_id"]] == planted
    text = tokenizer.decode(train[planted], skip_special_tokens=True)
    cell = top[0][col["train_example"]]
    assert isinstance(cell, str) and len(cell) > 20 and text.startswith(cell.rstrip("\u2026"))
    assert top[0][col["query"]] == cell   # the query is an exact copy

    # local CSVs under the store dir: training-set ids, the planted one first for query 0
    periods = sorted((out["store_dir"] / "scores").glob("epoch-*"))
    assert [p.name for p in periods] == ["epoch-0", "epoch-1"]
    rows = _influence_rows(periods[-1] / "influence.csv")
    assert rows and all(0 <= int(r["train_id"]) < len(train) for r in rows)
    first = [r for r in rows if r["query_id"] == "0" and r["rank"] == "1" and r["kind"] == "proponent"]
    assert [int(r["train_id"]) for r in first] == [planted]


def test_token_counts_match_the_hf_loss() -> None:
    """token_mean is right only if token_counts counts exactly the targets HF's loss averages over."""
    torch.manual_seed(0)
    lm = tiny_lm.build_lm("gpt2", vocab_size=50, width=32, pad_id=0, eos_id=1)
    lengths = torch.tensor([10, 4, 7])
    T = 12
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()          # [3, T], right-padded
    ids = torch.randint(2, 50, (3, T)).masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    module = tiny_lm.build_module(lm)
    loss = module.loss(batch)

    counts = tiny_lm.token_counts(batch)
    assert counts.tolist() == (lengths - 1).tolist()
    logits = lm(input_ids=ids, attention_mask=mask).logits.float()           # [3, T, V]
    per_example = torch.stack([
        torch.nn.functional.cross_entropy(logits[i, : n - 1], ids[i, 1:n]) for i, n in enumerate(lengths.tolist())])
    # the batch loss is the token-weighted mean of the per-example token means
    torch.testing.assert_close(loss, (per_example * counts).sum() / counts.sum(), rtol=1e-5, atol=1e-6)
