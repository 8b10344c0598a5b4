"""The language-model workload: a 2-layer GPT-2 from a config on ``pydoc_data.topics``.

Passages of at most ``context`` tokens (byte-level BPE trained on the corpus, see
``examples/tiny_lm.py``); training examples and queries are disjoint passages. The target of a
query under a model is its mean token loss (``target="loss"``: lower is better). Every model
(full data, each subset) trains by one recipe from one initialisation: AdamW on minibatches, a
one-epoch warm-up and a cosine decay to zero, one minibatch order per epoch over subset positions.
Per-example gradients are those of each passage's own mean token loss.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grass_callback.projection import LayerShape

from .mlp import epoch_orders, lr_at

__all__ = ["load_passages", "build_lm", "train_lm", "passage_losses", "lm_factors", "lm_shapes"]

_EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def load_passages(cfg: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(train ids [n, T], train mask [n, T], query ids [m, T], query mask [m, T], vocab)``."""
    sys.path.insert(0, os.path.abspath(_EXAMPLES))
    try:
        from tiny_lm import corpus, make_passages, train_tokenizer
    finally:
        sys.path.pop(0)
    paragraphs = corpus()
    tok = train_tokenizer(paragraphs, cfg["vocab"])
    T = cfg["context"]
    passages = [p for p in make_passages(paragraphs, tok, T) if len(p) >= cfg["min_tokens"]]
    perm = torch.randperm(len(passages), generator=torch.Generator().manual_seed(cfg["split_seed"])).tolist()
    n, m = cfg["n_train"], cfg["n_queries"]
    if n + m > len(passages):
        raise ValueError(f"the corpus has {len(passages)} passages, the config asks for {n + m}")
    ids = torch.full((n + m, T), tok.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(n + m, T, dtype=torch.int64)
    for row, i in enumerate(perm[: n + m]):
        p = passages[i]
        ids[row, : len(p)] = torch.tensor(p)
        mask[row, : len(p)] = 1
    return ids[:n], mask[:n], ids[n:], mask[n:], len(tok)


def build_lm(cfg: dict, vocab: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg["init_seed"])
    conf = GPT2Config(vocab_size=vocab, n_positions=cfg["context"], n_embd=cfg["width"], n_layer=cfg["layers"],
                      n_head=cfg["heads"], bos_token_id=0, eos_token_id=0, pad_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lm = GPT2LMHeadModel(conf)
    lm.loss_type = "ForCausalLM"
    return lm


def token_losses(lm: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Per-passage mean token loss ``[B]`` (position t predicts t+1; padding is no target)."""
    logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = ids[:, 1:]
    valid = mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(valid)
    return (nll * valid).sum(1) / valid.sum(1).clamp_min(1)


def train_lm(cfg: dict, vocab: int, ids: Tensor, mask: Tensor, subset: Tensor) -> nn.Module:
    """One model trained on ``subset`` (indices into ``ids``) by the workload's recipe."""
    lm = build_lm(cfg, vocab)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    s, b = len(subset), cfg["batch"]
    per_epoch = math.ceil(s / b)
    total, step = per_epoch * cfg["epochs"], 0
    lm.train()
    for order in epoch_orders(cfg, s):
        for start in range(0, s, b):
            rows = subset[order[start:start + b]]
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, total, per_epoch)
            loss = token_losses(lm, ids[rows], mask[rows]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return lm.eval()


def passage_losses(lm: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([token_losses(lm, ids[i:i + 256], mask[i:i + 256]) for i in range(0, len(ids), 256)])


def lm_shapes(lm: nn.Module) -> dict[str, LayerShape]:
    from grass_callback.capture import find_layers

    layers, _ = find_layers(lm)
    out = {}
    for name, mod in layers.items():
        if isinstance(mod, nn.Linear):
            out[name] = LayerShape(mod.in_features, mod.out_features, mod.bias is not None)
        else:  # transformers' Conv1D: weight [d_in, d_out]
            out[name] = LayerShape(mod.weight.shape[0], mod.weight.shape[1], mod.bias is not None)
    return out


def lm_factors(lm: nn.Module, ids: Tensor, mask: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-passage factors ``(x [N, T, d_in], δ [N, T, d_out])`` of its own mean token loss."""
    from grass_callback.selective import collect_factors

    batches = [(ids[i:i + 64], mask[i:i + 64]) for i in range(0, len(ids), 64)]
    loss_fn = lambda m, b: token_losses(m, b[0], b[1]).sum()  # noqa: E731
    return collect_factors(lm, batches, loss_fn, reduction="sum", max_examples=len(ids))
