"""The GPT-2 data-removal benchmark's data helpers: the corruption, the test split, the workload splits."""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality import removal_lm as R


def _passages(n=50, T=12, vocab=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = torch.randint(R.FIRST_TOKEN, vocab, (n, T), generator=gen)
    return torch.where(mask > 0, ids, torch.ones_like(ids)), mask  # padding = 1


@pytest.mark.parametrize("mode", R.CORRUPTIONS)
def test_corrupt_exact_fraction_and_only_those_rows(mode):
    ids, mask = _passages()
    before = ids.clone()
    out, corrupted = R.corrupt_passages(ids, mask, 0.2, 40, seed=3, mode=mode)
    assert torch.equal(ids, before)  # input untouched
    assert int(corrupted.sum()) == 10
    assert torch.equal(out[~corrupted], ids[~corrupted])
    assert torch.equal(out[mask == 0], ids[mask == 0])  # padding kept
    body = corrupted[:, None] & (mask > 0)
    assert bool(((out[body] >= R.FIRST_TOKEN) & (out[body] < 40)).all())
    assert (out[body] != ids[body]).float().mean() > 0.8  # almost every token rewritten
    again, same = R.corrupt_passages(ids, mask, 0.2, 40, seed=3, mode=mode)
    assert torch.equal(again, out) and torch.equal(same, corrupted)
    _, other = R.corrupt_passages(ids, mask, 0.2, 40, seed=4, mode=mode)
    assert not torch.equal(other, corrupted)


def test_cipher_is_one_permutation_of_the_ordinary_tokens():
    ids, mask = _passages(n=200, vocab=30)
    out, corrupted = R.corrupt_passages(ids, mask, 0.5, 30, seed=1, mode="cipher")
    body = corrupted[:, None] & (mask > 0)
    pairs = {}
    for a, b in zip(ids[body].tolist(), out[body].tolist()):
        assert pairs.setdefault(a, b) == b  # one image per token, in every passage
    assert len(set(pairs.values())) == len(pairs)  # injective
    assert sum(a != b for a, b in pairs.items()) > len(pairs) // 2


def test_corrupt_rejects_bad_input():
    ids, mask = _passages()
    with pytest.raises(ValueError, match="fraction"):
        R.corrupt_passages(ids, mask, 1.5, 40, 0)
    with pytest.raises(ValueError, match="mode"):
        R.corrupt_passages(ids, mask, 0.2, 40, 0, mode="shuffle")
    with pytest.raises(ValueError, match="one shape"):
        R.corrupt_passages(ids, mask[:, :-1], 0.2, 40, 0)
    bad = ids.clone()
    bad[:, 0] = 0  # a special token inside every passage
    with pytest.raises(ValueError, match="outside"):
        R.corrupt_passages(bad, mask, 1.0, 40, 0, mode="cipher")


def test_unseen_rows_drops_copies_whatever_the_padding():
    seen_ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 1]])
    seen_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    cand = torch.tensor([[5, 6, 7, 2], [5, 6, 1, 1], [8, 9, 3, 3], [4, 4, 4, 4], [8, 9, 4, 1]])
    cmask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    # rows 0 and 2 copy a seen passage (their padding differs); 1, 3, 4 do not
    assert R.unseen_rows(cand, cmask, [(seen_ids, seen_mask)], 3).tolist() == [1, 3, 4]
    assert R.unseen_rows(cand, cmask, [(seen_ids, seen_mask)], 2).tolist() == [1, 3]
    with pytest.raises(ValueError, match="only 3"):
        R.unseen_rows(cand, cmask, [(seen_ids, seen_mask)], 4)


def test_workload_splits():
    from benchmarks.quality import lm
    from benchmarks.quality.workloads import WORKLOADS

    clean, bad = R.load(R.WORKLOADS["lm-clean"]), R.load(R.WORKLOADS["lm-corrupt20"])
    suite = WORKLOADS["gpt2-pydoc"]
    s_ids, s_mask, s_q, _, _ = lm.load_passages(suite)
    assert torch.equal(clean["ids"], s_ids) and torch.equal(clean["val_ids"], s_q)  # the suite's splits

    def texts(ids, mask):
        return {tuple(r[m > 0].tolist()) for r, m in zip(ids, mask)}

    test = texts(clean["test_ids"], clean["test_mask"])
    assert len(clean["test_ids"]) == R.WORKLOADS["lm-clean"]["n_test"]
    assert not test & texts(clean["ids"], clean["mask"]) and not test & texts(clean["val_ids"], clean["val_mask"])
    # the oracle's mask is exactly the rewritten passages, 20% of them; the rest and the other splits as clean
    changed = (bad["ids"] != clean["ids"]).any(1)
    assert torch.equal(changed, bad["corrupted"]) and int(changed.sum()) == round(0.2 * len(changed))
    assert not clean["corrupted"].any()
    for key in ("mask", "val_ids", "test_ids"):
        assert torch.equal(bad[key], clean[key])


def test_unigram_loss_by_hand():
    import math

    data = {"vocab": 4, "ids": torch.tensor([[2, 3, 3, 1]]), "mask": torch.tensor([[1, 1, 1, 0]]),
            "test_ids": torch.tensor([[2, 3, 2, 1], [3, 0, 1, 1]]), "test_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    # training targets 3, 3 -> add-one probabilities [1, 1, 1, 3] / 6; the first token is no target
    want = (-(math.log(3 / 6) + math.log(1 / 6)) / 2 - math.log(1 / 6)) / 2
    assert R.unigram_loss(data) == pytest.approx(want, rel=1e-12)
