"""Checkpoint-time attribution: the ensemble equals the sum of per-checkpoint scores; the CLI works."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from grass_callback.checkpoints import attribute_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_attribute import dense_scores, loss_fn, make_problem  # noqa: E402


def _two_checkpoints():
    models = {}
    for seed in (0, 1):
        model, train, query = make_problem(seed=2)
        torch.manual_seed(seed)  # a second "checkpoint": the same model nudged
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * seed * torch.randn_like(p))
        models[f"ckpt{seed}"] = model
    return models, train, query


def _dense_per_checkpoint(models, query, root):
    """Each checkpoint's dense score matrix ``[m, n]`` from its store, by the plain reference."""
    from grass_callback.attribution import AttributionResult, plans_from_store, query_gradients
    from grass_callback.capture import LayerTaps
    from grass_callback.store import GradientStore

    out = []
    for c, name in enumerate(["ckpt0", "ckpt1"]):
        store = GradientStore(root / f"ckpt-{c}", readonly=True)
        taps = LayerTaps(models[name], plans=plans_from_store(store))
        with taps:
            q_ids, q_grads = query_gradients(models[name], taps, query, loss_fn, progress=False)
        ids, dense = dense_scores(AttributionResult(None, None, store, q_ids, q_grads), store, 1e-2)
        out.append(dense)
    return ids, out


@pytest.mark.parametrize("standardise", [False, True])
def test_ensemble_is_the_sum_of_checkpoint_scores(tmp_path, standardise):
    models, train, query = _two_checkpoints()
    result = attribute_checkpoints(lambda p: models[p], ["ckpt0", "ckpt1"], train, query, loss_fn, tmp_path,
                                   k=32, dtype="float32", topk=4, damping_ratio=1e-2, progress=False,
                                   standardise=standardise)
    ids, dense = _dense_per_checkpoint(models, query, tmp_path)
    if standardise:  # each checkpoint's scores over its std across the training rows, per query
        dense = [d / d.std(dim=1, correction=0, keepdim=True) for d in dense]
        assert not torch.allclose(dense[0] * dense[1].abs().mean() / dense[0].abs().mean(), dense[1], rtol=0.1)
    total = dense[0] + dense[1]
    order = total.argsort(dim=1, descending=True)
    assert torch.equal(result.top_ids, ids[order[:, :4]])
    torch.testing.assert_close(result.top_scores.double(), total.gather(1, order[:, :4]), rtol=1e-4, atol=1e-5)
    got = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, result.data_value_ids, result.data_value.double())
    want = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, ids, total.sum(0))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_score_spread_merges_chunks_into_the_population_std(tmp_path):
    # the checkpoint test's stores fit in one chunk, so the merge of chunks is tested here: chunks
    # of 5 rows (the last one 3) whose means differ a lot, so a merge without the between-chunk
    # term (or with n - 1) is off
    from grass_callback.checkpoints import score_spread
    from grass_callback.errors import GraSSError
    from grass_callback.store import GradientStore

    dims = {"a": 6, "b": 4}
    gen = torch.Generator().manual_seed(5)
    store = GradientStore(tmp_path / "st", layer_dims=dims, dtype=torch.float32, rows_per_shard=8)
    rows = {n: torch.randn(23, k, generator=gen) + torch.arange(23.0)[:, None] / 4 for n, k in dims.items()}
    for start in range(0, 23, 6):
        store.append(torch.arange(start, min(start + 6, 23)), start, {n: g[start : start + 6] for n, g in rows.items()})
    store.close()
    pre = {n: torch.randn(3, k, generator=gen) for n, k in dims.items()}
    dense = sum(rows[n].double() @ pre[n].double().T for n in dims)  # [23, 3]
    want = dense.std(dim=0, correction=0)
    ro = GradientStore(tmp_path / "st", readonly=True)
    for chunk_rows in (5, 4096):
        got = score_spread(pre, ro, chunk_rows=chunk_rows)
        assert got.dtype == torch.float64 and got.shape == (3,)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    one = score_spread({"b": pre["b"]}, ro, chunk_rows=5)  # only the layers asked for
    torch.testing.assert_close(one, (rows["b"].double() @ pre["b"].double().T).std(dim=0, correction=0),
                               rtol=1e-5, atol=0)
    empty = GradientStore(tmp_path / "empty", layer_dims=dims, dtype=torch.float32)
    empty.close()
    with pytest.raises(GraSSError, match="no rows"):
        score_spread(pre, GradientStore(tmp_path / "empty", readonly=True))


def test_cli_example_finds_flipped_labels(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import attribute_checkpoint
    from digits_mlp import load_digits_split

    folder = attribute_checkpoint.main(["--quick", "--epochs", "2", "--out", str(tmp_path)])
    period = next((folder / "scores").iterdir())

    def rows(name):
        lines = (line for line in open(period / name) if not line.startswith("#"))
        return list(csv.DictReader(lines))

    influence = rows("influence.csv")
    assert influence and all(0 <= int(r["train_id"]) < 1437 for r in influence)
    _, _, flipped = load_digits_split(0)
    top = [int(r["train_id"]) for r in rows("self_influence.csv")[: len(flipped)]]
    caught = len(set(top) & set(flipped.tolist()))
    assert caught >= 0.25 * len(flipped), caught  # chance is 10%
    # the sign convention (self-influence is positive whatever the sign of the scores): a flipped
    # label raises the loss of queries of its true class, so flipped examples fill the opponent
    # rows more than the proponent rows, and their data value is below the clean examples'
    flips = set(flipped.tolist())

    def flipped_share(kind):
        ids = [int(r["train_id"]) for r in influence if r["kind"] == kind]
        assert ids, kind
        return sum(i in flips for i in ids) / len(ids)

    assert flipped_share("opponent") > 1.5 * flipped_share("proponent"), (
        flipped_share("opponent"), flipped_share("proponent"))
    values = {int(r["train_id"]): float(r["data_value"]) for r in rows("data_value.csv")}
    flipped_mean = sum(values[i] for i in flips) / len(flips)
    clean_mean = sum(v for i, v in values.items() if i not in flips) / (len(values) - len(flips))
    assert flipped_mean < 0 and flipped_mean < clean_mean, (flipped_mean, clean_mean)


def test_cli_mask_run_argument(capsys):
    from grass_callback.__main__ import _parser

    base = ["attribute", "--ckpt", "a.ckpt", "--model", "pkg:Model", "--data", "pkg:Data"]
    assert _parser().parse_args(base).mask_run == "auto"
    assert _parser().parse_args(base + ["--mask-run", "4"]).mask_run == 4
    for bad in ("0", "-2", "eight"):
        with pytest.raises(SystemExit):
            _parser().parse_args(base + ["--mask-run", bad])
        assert "expected 'auto' or a positive integer" in capsys.readouterr().err
