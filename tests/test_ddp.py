"""GraSSCallback under Lightning DDP (2 CPU processes, gloo) against a single-process run.

``tests/scripts/ddp_train.py`` runs once with ``devices=2, strategy="ddp"`` and once with one
process, both in subprocesses (under pytest, ``strategy="ddp"`` would re-launch pytest itself),
at the same time. The learning rate is 0, so rows, Fisher blocks and scores must agree whatever
the batching (see the script's docstring).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from grass_callback.store import GradientStore

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
N_TRAIN, EPOCHS, K, LAYERS, NUM_QUERIES = 48, 2, 16, 2, 6
TIMEOUT_S = 300
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
             "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "GRASS_CRASH_AT", "PYTHONFAULTHANDLER")


def _start(out: Path, devices: int, wandb_dir: Path, k: int = K) -> subprocess.Popen:
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(SCRIPT.parents[2]),
               **{var: str(wandb_dir / var.lower()) for var in
                  ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")})
    log = open(out / "log.txt", "w")
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--devices", str(devices), "--k", str(k)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait(proc: subprocess.Popen, out: Path) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the run and the rank it launched (a hung collective)
        proc.wait()
        pytest.fail(f"{SCRIPT.name} did not finish in {TIMEOUT_S} s:\n{(out / 'log.txt').read_text()[-4000:]}")
    assert rc == 0, (out / "log.txt").read_text()[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    started = time.perf_counter()
    procs = {"ddp": _start(root / "ddp", 2, root / "wandb-ddp"),
             "single": _start(root / "single", 1, root / "wandb-single")}
    for name, proc in procs.items():
        _wait(proc, root / name)
    print(f"\nDDP and single-process runs took {time.perf_counter() - started:.1f} s")
    return {name: root / name for name in procs}


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _records(runs: dict[str, Path]) -> tuple[dict, dict, dict]:
    """What DDP rank 0, DDP rank 1 and the single process recorded."""
    return _load(runs["ddp"] / "rank0.pt"), _load(runs["ddp"] / "rank1.pt"), _load(runs["single"] / "rank0.pt")


def _rows(store_dir: Path, ranks: list[int] | None = None) -> dict[tuple[int, int], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean run leaves no orphans
        store = GradientStore(store_dir, readonly=True)
    rows: dict[tuple[int, int], torch.Tensor] = {}
    for chunk in store.iter_chunks(ranks=ranks):
        flat = torch.cat([chunk.grads[n] for n in store.layers], dim=1)
        for i, key in enumerate(zip(chunk.ids.tolist(), chunk.epochs.tolist())):
            assert key not in rows, f"{key} stored twice"
            rows[key] = flat[i]
    return rows


def _by_id(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort()
    return ids[order], values[order].double()


def test_stores_per_rank_hold_the_single_process_rows(runs: dict[str, Path]) -> None:
    r0, r1, single = _records(runs)
    assert (r0["world_size"], r1["world_size"], single["world_size"]) == (2, 2, 1)
    # one store directory, rank 0's, although rank 1 had another default_root_dir
    assert r0["store_dir"] == r1["store_dir"] == str(runs["ddp"] / "grass")
    assert not (runs["ddp"] / "rank1-root" / "grass").exists()
    train = runs["ddp"] / "grass" / "train"
    names = sorted(p.name for p in train.iterdir())
    assert "manifest-r000.json" in names and "manifest-r001.json" in names
    assert any(n.startswith("shard-r000-") for n in names) and any(n.startswith("shard-r001-") for n in names)
    # each rank wrote its own shards: disjoint examples per epoch, together all of them once
    by_rank = [_rows(train, ranks=[r]) for r in (0, 1)]
    assert not by_rank[0].keys() & by_rank[1].keys()
    assert len(by_rank[0]) == len(by_rank[1]) == N_TRAIN * EPOCHS // 2
    ddp_rows = {**by_rank[0], **by_rank[1]}
    single_rows = _rows(runs["single"] / "grass" / "train")
    assert ddp_rows.keys() == single_rows.keys() == {(i, e) for i in range(N_TRAIN) for e in range(EPOCHS)}
    for key, row in single_rows.items():  # batch 4 per rank vs 8: the per-example scale is per rank
        torch.testing.assert_close(ddp_rows[key], row, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    for name, w in single["weights"].items():
        assert torch.equal(r0["weights"][name], w) and torch.equal(r1["weights"][name], w)


def test_fisher_blocks_are_sum_reduced_in_place(runs: dict[str, Path]) -> None:
    r0, r1, single = _records(runs)
    assert len(single["fits"]) == len(r0["fits"]) == len(r1["fits"]) == EPOCHS
    for period, (a, b, s) in enumerate(zip(r0["fits"], r1["fits"], single["fits"])):
        assert a["count"] == b["count"] == s["count"] == N_TRAIN, period
        for name, total in s["sums"].items():
            assert torch.equal(a["sums"][name], b["sums"][name]), (period, name)  # the same reduced block
            # float32 products folded into float64 sums: the ranks' partial sums round apart
            want = total / s["count"]
            torch.testing.assert_close(a["sums"][name] / a["count"], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    for rec in (r0, r1):
        calls = rec["collectives"]
        square = [c for c in calls if [K, K] in c[1]]
        # only all_reduce moves k x k blocks: one per layer per period, never a gather
        assert {name for name, _ in square} == {"all_reduce"}, square
        assert len(square) == LAYERS * EPOCHS
        gathers = [c for c in calls if "gather" in c[0]]
        assert gathers and all(math.prod(shape) < K * K for _, shapes in gathers for shape in shapes), gathers


def test_scores_match_the_single_process_run(runs: dict[str, Path]) -> None:
    _assert_same_scores(runs)


@pytest.fixture(scope="module")
def dual_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same runs at k = 128: the first layer's 112 gradient columns hold 48 rows a period (at
    most half of them), the second layer's 51 do not."""
    root = tmp_path_factory.mktemp("ddp-dual")
    procs = {"ddp": _start(root / "ddp", 2, root / "wandb-ddp", k=128),
             "single": _start(root / "single", 1, root / "wandb-single", k=128)}
    for name, proc in procs.items():
        _wait(proc, root / name)
    return {name: root / name for name in procs}


def test_ranks_solve_a_short_period_through_all_ranks_rows_as_one_process_does(dual_runs: dict[str, Path]) -> None:
    r0, r1, single = _records(dual_runs)
    duals = [fit["duals"] for rec in (r0, r1, single) for fit in rec["fits"]]
    assert len(duals) == 6 and all(d == duals[0] for d in duals) and len(duals[0]) == 1, duals
    _assert_same_scores(dual_runs)


def _assert_same_scores(runs: dict[str, Path]) -> None:
    r0, single = _load(runs["ddp"] / "rank0.pt"), _load(runs["single"] / "rank0.pt")
    assert [r["period"] for r in r0["reports"]] == [r["period"] for r in single["reports"]] == ["epoch-0", "epoch-1"]
    for got, want in zip(r0["reports"], single["reports"]):
        g, w = got["result"], want["result"]
        # the first NUM_QUERIES validation examples, not rank 0's share of them
        assert torch.equal(g["query_ids"], w["query_ids"]) and g["query_ids"].tolist() == list(range(NUM_QUERIES))
        for kind in ("top", "bottom"):
            assert torch.equal(g[f"{kind}_ids"], w[f"{kind}_ids"]), (got["period"], kind)
            torch.testing.assert_close(g[f"{kind}_scores"], w[f"{kind}_scores"], rtol=1e-4, atol=1e-5)
        for field in ("self_influence", "data_value"):
            ids = g[f"{field}_ids"] if field == "self_influence" else g["data_value_ids"]
            wids = w[f"{field}_ids"] if field == "self_influence" else w["data_value_ids"]
            gi, gv = _by_id(ids, g[field])
            wi, wv = _by_id(wids, w[field])
            assert torch.equal(gi, wi) and gi.tolist() == list(range(N_TRAIN)), (got["period"], field)
            torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-5 * float(wv.abs().max()))
        # the running data value handed to the reporter
        gi, gv = _by_id(*got["data_value"])
        wi, wv = _by_id(*want["data_value"])
        assert torch.equal(gi, wi)
        torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-5 * float(wv.abs().max()))
    # the final data value is the same on both ranks (they merge every period) and equals the single run's
    r1 = _load(runs["ddp"] / "rank1.pt")
    for rec in (r0, r1):
        gi, gv = _by_id(*rec["data_value"])
        wi, wv = _by_id(*single["data_value"])
        assert torch.equal(gi, wi)
        torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-5 * float(wv.abs().max()))


def test_query_gradients_are_computed_once_and_broadcast(runs: dict[str, Path]) -> None:
    r0, r1 = _load(runs["ddp"] / "rank0.pt"), _load(runs["ddp"] / "rank1.pt")
    # one validation batch (of 8) holds the 6 queries: one pass per period, on rank 0 only
    assert len(r0["query_batches"]) == EPOCHS and r1["query_batches"] == []
    sent = [shapes for name, shapes in r0["collectives"] if name == "broadcast_object_list" and shapes]
    assert sent == [[[NUM_QUERIES]] + [[NUM_QUERIES, K]] * LAYERS] * EPOCHS


def test_only_rank_zero_reports(runs: dict[str, Path]) -> None:
    r0, r1 = _load(runs["ddp"] / "rank0.pt"), _load(runs["ddp"] / "rank1.pt")
    assert len(r0["reports"]) == EPOCHS and r1["reports"] == []
    wandb_runs = list((runs["ddp"] / "grass" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs
    assert list(wandb_runs[0].glob("*.wandb"))
    for period in ("epoch-0", "epoch-1"):
        folder = runs["ddp"] / "grass" / "scores" / period
        assert {p.name for p in folder.iterdir()} == {"influence.csv", "self_influence.csv", "data_value.csv",
                                                     "suspects.csv", "layers.csv", "scalars.json"}
        # the data value CSV covers both ranks' rows
        lines = [ln for ln in (folder / "data_value.csv").read_text().splitlines() if ln and not ln.startswith("#")]
        assert len(lines) == 1 + N_TRAIN


def test_data_value_and_ranking_equal_a_hand_reference_from_the_ddp_store(runs: dict[str, Path]) -> None:
    """Not DDP against the same code on one process: the data value both ranks hold against scores
    computed here from the two ranks' shards, a Fisher per epoch fitted by plain torch and exact
    query gradients at the (fixed, lr 0) weights (see ``tests/test_independent_refs.py``)."""
    sys.path.insert(0, str(SCRIPT.parent))
    sys.path.insert(0, str(SCRIPT.parents[1]))
    import ddp_train
    from test_independent_refs import exact_query_rows, hand_scores, store_rows

    from grass_callback import GraSSCallback
    from grass_callback.attribution import plans_from_store

    r0, r1 = _load(runs["ddp"] / "rank0.pt"), _load(runs["ddp"] / "rank1.pt")
    module = ddp_train.TinyModule()
    module.load_state_dict(r0["weights"])
    train_dir = runs["ddp"] / "grass" / "train"
    plans = plans_from_store(GradientStore(train_dir, readonly=True))
    val = ddp_train.data(4)[1].dataset
    queries = exact_query_rows(module, plans, [val[i][:2] for i in range(NUM_QUERIES)])
    rows = store_rows(train_dir)
    ratio = GraSSCallback(k=K).damping_ratio
    total = torch.zeros(NUM_QUERIES, N_TRAIN, dtype=torch.float64)
    want = torch.zeros(N_TRAIN, dtype=torch.float64)  # the data value: each period standardised per query
    for epoch in range(EPOCHS):
        keep = rows["epochs"] == epoch
        own = {key: t[keep] for key, t in rows.items()}
        assert sorted(own["ids"].tolist()) == list(range(N_TRAIN)), epoch
        scores, _ = hand_scores(own, queries, ratio)
        total[:, own["ids"]] += scores
        want[own["ids"]] += (scores / scores.std(1, correction=0, keepdim=True)).sum(0)
    for rec in (r0, r1):
        ids, values = _by_id(*rec["data_value"])
        assert ids.tolist() == list(range(N_TRAIN))
        torch.testing.assert_close(values, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    last = r0["reports"][-1]["result"]  # ranked by the ensemble: scores summed over both epochs
    assert torch.equal(last["top_ids"], total.argsort(dim=1, descending=True)[:, :3])
    assert torch.equal(last["bottom_ids"], total.argsort(dim=1)[:, :3])


def test_training_loss_equals_one_process_and_the_losses_at_the_fixed_weights(runs: dict[str, Path]) -> None:
    """Each rank stores its own rows' losses; a period gathers them, so both ranks hold every
    example's loss. Two epochs: the first half of training is epoch 0, where (lr 0) each example's
    loss is its cross-entropy at the initial weights, computed here by plain torch."""
    sys.path.insert(0, str(SCRIPT.parent))
    import ddp_train

    r0, r1, single = _records(runs)
    module = ddp_train.TinyModule()
    module.load_state_dict(r0["weights"])
    train = ddp_train.data(4)[0].dataset
    x = torch.stack([train[i][0] for i in range(N_TRAIN)])
    y = torch.stack([train[i][1] for i in range(N_TRAIN)])
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(module.net(x), y, reduction="none").double()
    for rec in (r0, r1, single):
        ids, values = _by_id(*rec["training_loss"])
        assert ids.tolist() == list(range(N_TRAIN))
        torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(_by_id(*r1["suspect"])[1], _by_id(*r0["suspect"])[1])  # both ranks: one suspect ranking
