"""The checkpoint CLI on text as a user builds it: variable-length passages, a padding collate_fn,
a shuffling train loader, a tokenizer for the tables (a tiny GPT-2 from a config, a BPE trained
here; nothing downloaded)."""

from __future__ import annotations

import csv
import functools
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_lm  # noqa: E402  (corpus and tokenizer of the tiny LM example)

from grass_callback import IndexedDataset  # noqa: E402

NUM_TRAIN, NUM_VAL, BATCH = 40, 6, 8


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The BPE the data and the CLI's ``--tokenizer test_cli_text:tokenizer`` share."""
    return tiny_lm.train_tokenizer(tiny_lm.corpus()[:400], 300)


class Passages(Dataset):
    """``{"input_ids": [n_i]}``, lengths 6..30 tokens: they cannot be stacked without padding."""

    def __init__(self, start: int, count: int) -> None:
        tok = tokenizer()
        ids = tok(tiny_lm.corpus()[start:start + 4 * count])["input_ids"]
        self.items = [torch.tensor(x[: 6 + (i * 7) % 25]) for i, x in enumerate(ids) if len(x) >= 31][:count]
        assert len(self.items) == count

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.items[i]}


def pad_collate(samples: list[dict]) -> dict:
    """Right-pads ``input_ids`` to the longest in the batch; ``attention_mask`` marks the tokens."""
    pad = tokenizer().pad_token_id
    T = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), T), pad, dtype=torch.int64)
    mask = torch.zeros(len(samples), T, dtype=torch.int64)
    for r, s in enumerate(samples):
        ids[r, : len(s["input_ids"])] = s["input_ids"]
        mask[r, : len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor([s["index"] for s in samples])}


class TextData(L.LightningDataModule):
    def __init__(self, batch_size: int = BATCH) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train_set = IndexedDataset(Passages(0, NUM_TRAIN))
        self.val_set = IndexedDataset(Passages(900, NUM_VAL))

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=pad_collate)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=4, collate_fn=pad_collate)


class TextLM(L.LightningModule):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = tokenizer()
        cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=width, n_layer=1, n_head=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        self.lm = GPT2LMHeadModel(cfg)

    def training_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.lm(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T-1]
        per_example = per_token.sum(1) / mask[:, 1:].sum(1)
        return per_example.mean()  # mean over the batch: the CLI's default reduction

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _checkpoints(tmp_path: Path) -> list[Path]:
    L.seed_everything(0, verbose=False)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[ckpt], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(TextLM(), TextData())
    return sorted((tmp_path / "ckpt").glob("epoch=*.ckpt"))


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


def test_cli_on_padded_text_keeps_the_collate_fn_and_decodes_the_tables(tmp_path: Path, one_thread) -> None:
    from grass_callback.__main__ import main
    from grass_callback.callback import training_step_loss
    from grass_callback.checkpoints import attribute_checkpoints
    from grass_callback.offline_run import logged_tables

    paths = _checkpoints(tmp_path)
    assert len(paths) == 2
    out = tmp_path / "attribution"
    main(["attribute", *[a for p in paths for a in ("--ckpt", str(p))], "--model", "test_cli_text:TextLM",
          "--data", "test_cli_text:TextData", "--tokenizer", "test_cli_text:tokenizer", "--out", str(out),
          "--k", "64", "--topk", "3", "--num-queries", "4", "--quiet"])

    # the same scores as the engine on a loader built by hand with the user's collate_fn, in order
    dm = TextData()
    dm.setup("fit")
    train = DataLoader(dm.train_set, batch_size=BATCH, shuffle=False, collate_fn=pad_collate)
    val = DataLoader(dm.val_set, batch_size=4, collate_fn=pad_collate)
    expected = attribute_checkpoints(lambda p: TextLM.load_from_checkpoint(p, map_location="cpu"), paths, train, val,
                                     training_step_loss, tmp_path / "reference", k=64, topk=3, num_queries=4,
                                     progress=False)
    folder, = (out / "scores").iterdir()
    got = {int(r["train_id"]): float(r["self_influence"]) for r in _rows(folder / "self_influence.csv")}
    assert sorted(got) == list(range(NUM_TRAIN))  # every example once, though the loader shuffles
    want = dict(zip(expected.self_influence_ids.tolist(), expected.self_influence.tolist()))
    for i in range(NUM_TRAIN):
        assert got[i] == pytest.approx(want[i], rel=1e-5)
    rows = _rows(folder / "influence.csv")
    top1 = {int(r["query_id"]): int(r["train_id"]) for r in rows if r["kind"] == "proponent" and r["rank"] == "1"}
    assert top1 == {int(q): int(expected.top_ids[r, 0]) for r, q in enumerate(expected.query_ids)}

    # the W&B table shows the passages as text: decoded without padding
    run, = (out / "wandb").glob("offline-run-*")
    table = logged_tables(run, "grass/influence")[-1]
    tok = tokenizer()
    for qid, query, tid, train_text in zip(table.column("query_id"), table.column("query"),
                                           table.column("train_id"), table.column("train_example")):
        assert query == tok.decode(dm.val_set[qid]["input_ids"].tolist(), skip_special_tokens=True)
        assert train_text == tok.decode(dm.train_set[tid]["input_ids"].tolist(), skip_special_tokens=True)
        assert "<pad>" not in query + train_text and train_text and query


def test_cli_help_shows_its_own_name(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("grass-callback")  # the console script the install made
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("usage: grass-callback ")
    out = subprocess.run([sys.executable, "-m", "grass_callback", "attribute", "--help"], capture_output=True,
                         text=True, timeout=120, check=True, cwd=tmp_path).stdout
    assert out.startswith("usage: python -m grass_callback attribute ")
    assert "--tokenizer" in out and "--renderer" in out
