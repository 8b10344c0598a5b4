"""Which training passages make a tiny language model predict a held-out passage? GraSSCallback on a GPT-2.

    python examples/tiny_lm.py                    # about a minute on an idle 2-core CPU (63 s CPU time)
    python examples/tiny_lm.py --arch llama       # the same with a Llama (nn.Linear projections)
    python examples/tiny_lm.py --quick            # ~10 s after imports, for tests

Real English text shipped with Python (``pydoc_data.topics``, the help pages of the language
reference, ~465 KB), a byte-level BPE trained on it in a fraction of a second, a 2-layer GPT-2
built from a config (nothing is downloaded) and trained with Lightning, the callback attached.
Some passages are held out as queries (the validation loader); one of them is an exact copy of a
training passage, planted on purpose: its top proponent should be that training passage (it was
first in seeds 0-2 of the full run and in 30 of 30 quick runs, gpt2 and llama). At the
end it prints the top proponents / opponents of a few held-out passages, decoded, and where the
W&B offline run (``wandb sync <folder>``) and the local CSVs are.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

# -- config ---------------------------------------------------------------------------------
# (full run, --quick run)
CONTEXT = 64              # tokens per passage (T); shorter passages are right-padded
VOCAB = (1024, 512)       # BPE vocabulary
WIDTH = (128, 64)         # n_embd / hidden_size
LAYERS = 2
HEADS = 4
PASSAGES = (None, 320)    # training passages used (None: all 2968 with seed 0)
NUM_VAL = 48              # held-out passages (queries), the planted duplicate included
BATCH_SIZE = 16
LR = 3e-3
THREADS = 1               # torch threads; see main()
PAD, EOS = "<pad>", "<|endoftext|>"


# -- data -----------------------------------------------------------------------------------

def corpus() -> list[str]:
    """The help topics as paragraphs (blank-line separated), in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        paragraphs += [p.strip("\n") for p in topics[name].split("\n\n") if p.strip()]
    return paragraphs


def train_tokenizer(paragraphs: list[str], vocab_size: int):
    """A byte-level BPE trained on the corpus, wrapped so it has ``.decode`` / ``.pad_token_id``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(paragraphs, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)


def make_passages(paragraphs: list[str], tokenizer, T: int) -> list[list[int]]:
    """Consecutive paragraphs packed greedily into passages of at most ``T`` tokens.

    Passages end on paragraph boundaries, so their lengths vary (hence padding and the
    token-mean loss below); a paragraph longer than ``T`` is cut into ``T``-token pieces.
    """
    sep = tokenizer("\n\n")["input_ids"]
    passages, current = [], []
    for ids in tokenizer(paragraphs)["input_ids"]:
        pieces = [ids[i:i + T] for i in range(0, len(ids), T)]
        for piece in pieces:
            joined = current + sep + piece if current else piece
            if len(joined) <= T:
                current = joined
            else:
                passages.append(current)
                current = piece
    passages.append(current)
    return [p for p in passages if len(p) >= 8]   # headings alone teach little


class Passages(Dataset):
    """``{"input_ids": [T], "attention_mask": [T]}`` per passage, right-padded."""

    def __init__(self, passages: list[list[int]], T: int, pad_id: int) -> None:
        self.passages, self.T, self.pad_id = passages, T, pad_id

    def __len__(self) -> int:
        return len(self.passages)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.passages[i]
        n = len(ids)
        input_ids = torch.full((self.T,), self.pad_id, dtype=torch.int64)
        input_ids[:n] = torch.tensor(ids)
        mask = torch.zeros(self.T, dtype=torch.int64)
        mask[:n] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def split(passages: list[list[int]], num_train: int | None, seed: int) -> tuple[list, list, int]:
    """Train / held-out passages, with one training passage copied into the held-out set.

    Returns ``(train, held_out, planted_train_id)``; the copy is held-out passage 0, so it is
    always among the queries the callback scores. The planted passage is a full-length one whose
    tokens appear nowhere else in the training set: its only exact match is the one we plant.
    """
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    held_out = [passages[i] for i in order[:NUM_VAL - 1]]
    train = [passages[i] for i in order[NUM_VAL - 1:]]
    if num_train is not None:
        train = train[:num_train]
    counts: dict[tuple, int] = {}
    for p in train:
        counts[tuple(p)] = counts.get(tuple(p), 0) + 1
    candidates = [i for i, p in enumerate(train) if len(p) >= CONTEXT - 4 and counts[tuple(p)] == 1]
    planted = rng.choice(candidates)
    return train, [list(train[planted])] + held_out, planted


def token_counts(batch: dict) -> torch.Tensor:
    """Predicted tokens per example ``[B]``: position t predicts t+1, so the first token is never a
    target and a passage of n tokens has n-1 targets. This is exactly the set of labels HF's loss
    averages over (labels shifted by one, padding = -100), so the callback's ``token_mean``
    rescaling (N / n_i) turns the batch gradient into each passage's own mean-loss gradient."""
    return batch["attention_mask"][:, 1:].sum(1)


# -- model ----------------------------------------------------------------------------------

def build_lm(arch: str, vocab_size: int, width: int, pad_id: int, eos_id: int):
    """A tiny causal LM from a config (random init, nothing downloaded)."""
    lm = _build_lm(arch, vocab_size, width, dict(pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id))
    lm.loss_type = "ForCausalLM"          # what HF falls back to anyway, minus a warning per run
    return lm


def _build_lm(arch: str, vocab_size: int, width: int, ids: dict):
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        # dropout off: the query gradient (eval mode) and the training gradient of the planted
        # copy (train mode) then come from the same function; with ~2k passages it hardly overfits
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=CONTEXT, n_embd=width, n_layer=LAYERS, n_head=HEADS,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return GPT2LMHeadModel(cfg)       # c_attn/c_proj/c_fc are Conv1D, lm_head nn.Linear (tied to wte)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      max_position_embeddings=CONTEXT, tie_word_embeddings=True, **ids)
    return LlamaForCausalLM(cfg)          # q/k/v/o and gate/up/down projections are nn.Linear


def build_module(lm):
    import lightning as L

    class TinyLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def loss(self, batch: dict) -> torch.Tensor:
            ids, mask = batch["input_ids"], batch["attention_mask"]           # [B, T], [B, T]
            labels = ids.masked_fill(mask == 0, -100)                          # padding is no target
            # HF shifts the labels by one and averages cross-entropy over all the batch's valid
            # targets: Σ_i Σ_t ℓ_it / Σ_i n_i, with n_i = token_counts(batch)[i] -> "token_mean"
            return self.lm(input_ids=ids, attention_mask=mask, labels=labels).loss

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.loss(batch), prog_bar=True)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.01)
            # nanoGPT's schedule: linear warm-up, cosine decay to LR / 10. It also matters for the
            # attribution: the last epoch's gradients are stored as they pass, the queries are taken
            # at the end; a small final learning rate keeps the two close (without it the planted
            # copy fell out of the top 10 in 1 of 14 quick runs, with it it was first in 20 of 20)
            total = self.trainer.estimated_stepping_batches
            warmup = max(1, total // 10)

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TinyLM()


# -- main -----------------------------------------------------------------------------------

def overlap(a: list[int], b: list[int]) -> float:
    """Jaccard overlap of two passages' token sets."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(1, len(sa | sb))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="default 3 (--quick: 2)")
    parser.add_argument("--k", type=int, default=256, help="compressed size per layer")
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--num-queries", type=int, default=16)
    parser.add_argument("--out", default="runs/tiny_lm", help="logs, store, W&B offline run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller everything, no progress bars (tests)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 3)

    import lightning as L

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # no fork warnings from the loaders
    L.seed_everything(args.seed, verbose=False)
    # One thread: a [1024, 64] @ [64, 256] matmul gains nothing from a second one, and when the
    # other core is busy OpenMP's barriers make it ~30x slower (measured 0.7 ms vs 24 ms here).
    threads, _ = torch.get_num_threads(), torch.set_num_threads(THREADS)
    try:
        return _run(args, epochs, out=Path(args.out))
    finally:
        torch.set_num_threads(threads)   # main() is also called from tests: leave the process as found


def _run(args: argparse.Namespace, epochs: int, out: Path) -> dict:
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from grass_callback import GraSSCallback, IndexedDataset

    q = int(args.quick)                       # index into the (full, quick) config pairs
    out.mkdir(parents=True, exist_ok=True)
    if (out / "grass").exists():  # the example's own store from an earlier run: start afresh
        print(f"removing the previous run's store {out / 'grass'}")
        shutil.rmtree(out / "grass")

    paragraphs = corpus()
    tokenizer = train_tokenizer(paragraphs, VOCAB[q])
    passages = make_passages(paragraphs, tokenizer, CONTEXT)
    train_p, held_p, planted = split(passages, PASSAGES[q], args.seed)
    train_set = Passages(train_p, CONTEXT, tokenizer.pad_token_id)
    held_set = Passages(held_p, CONTEXT, tokenizer.pad_token_id)
    print(f"{len(passages)} passages of <= {CONTEXT} tokens (BPE vocab {len(tokenizer)}); "
          f"{len(train_set)} for training, {len(held_set)} held out; held-out passage 0 is a copy "
          f"of training passage #{planted}")
    train = DataLoader(IndexedDataset(train_set), batch_size=BATCH_SIZE, shuffle=True)
    val = DataLoader(IndexedDataset(held_set), batch_size=BATCH_SIZE)   # not shuffled: the copy stays query 0

    # Every Conv1D / Linear is tapped, lm_head included. GPT-2 ties lm_head.weight to the token
    # embedding wte; the taps see only the Linear use of that weight (the output projection), not
    # its use as an embedding lookup. Its gradient is still the most passage-specific signal (which
    # tokens a passage predicts), and at width 128 x vocab 1024 it costs about as much as one MLP
    # layer, so we keep it; pass exclude=["lm_head"] to attribute through the blocks only.
    grass = GraSSCallback(k=args.k, num_queries=args.num_queries, topk=10, store_dir=out / "grass",
                          loss_reduction="token_mean", token_counts=token_counts, tokenizer=tokenizer,
                          progress=not args.quick)
    logger = WandbLogger(project="grass-callback-demo", name=f"tiny-{args.arch}", save_dir=str(out), offline=True)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, callbacks=[grass],
                        default_root_dir=str(out), enable_progress_bar=not args.quick,
                        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0)
    lm = build_lm(args.arch, len(tokenizer), WIDTH[q], tokenizer.pad_token_id, tokenizer.eos_token_id)
    trainer.fit(build_module(lm), train, val)

    # -- what the last scoring period found ------------------------------------------------
    result = grass.last_result            # the last epoch's rows scored at the end of that epoch
    query_ids = [int(i) for i in result.query_ids]
    top0 = [int(i) for i in result.top_ids[query_ids.index(0)]]
    planted_rank = top0.index(planted) + 1 if planted in top0 else None
    print(f"\nplanted duplicate: held-out passage 0 = training passage #{planted}; its rank among the "
          f"proponents of the copy: {planted_rank if planted_rank else 'not in the top 10'}")

    # a second, weaker check on the real held-out passages: proponents share more vocabulary
    real = [r for r, qid in enumerate(query_ids) if qid != 0]
    rng = random.Random(args.seed)
    top_overlap = sum(overlap(held_p[query_ids[r]], train_p[int(result.top_ids[r, 0])]) for r in real) / len(real)
    rand_overlap = sum(overlap(held_p[query_ids[r]], train_p[rng.randrange(len(train_p))])
                       for r in real for _ in range(20)) / (20 * len(real))
    print(f"token overlap (Jaccard) of a held-out passage with its top proponent: {top_overlap:.3f}, "
          f"with a random training passage: {rand_overlap:.3f} (mean over {len(real)} queries)")

    def show(ids: list[int], width: int = 110) -> str:
        text = " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())   # one line
        return repr(text[:width] + ("…" if len(text) > width else ""))

    for r in [query_ids.index(0)] + real[:2]:
        qid = query_ids[r]
        print(f"\nheld-out passage {qid}{' (the planted copy)' if qid == 0 else ''}: {show(held_p[qid])}")
        for label, ids, scores in (("proponent", result.top_ids[r], result.top_scores[r]),
                                   ("opponent ", result.bottom_ids[r], result.bottom_scores[r])):
            tid, score = int(ids[0]), float(scores[0])
            print(f"  top {label} #{tid} ({score:+.3g}): {show(train_p[tid])}")

    run_dir = Path(logger.experiment.dir).parent if logger.experiment is not None else None
    print(f"\nlocal score files (influence.csv per period): {out / 'grass' / 'scores'}")
    if run_dir is not None:
        print(f"W&B offline run: {run_dir}\n  upload it with: wandb sync {run_dir}")
        # close the run: a second main() in the same process (tests) would otherwise log into it
        logger.experiment.finish()
    return {"result": result, "grass": grass, "planted_train_id": planted, "planted_rank": planted_rank,
            "top_overlap": top_overlap, "random_overlap": rand_overlap, "train_passages": train_p,
            "held_out_passages": held_p, "tokenizer": tokenizer, "run_dir": run_dir, "store_dir": out / "grass"}


if __name__ == "__main__":
    main()
