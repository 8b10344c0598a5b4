"""The callback's results against references computed here by plain torch, not by the engine.

Every expected value in this file comes from the stored rows read straight from the store's
safetensors shards, Fisher blocks fitted here (``F = GᵀG / N``, ``λ = r · trace(F) / k``,
``torch.linalg.solve``), query gradients taken here by plain autograd at the weights of each
scoring period (float64, eval mode) and compressed by a dense sketch matrix built by loops from
the plan's masks and tables. Nothing goes through ``score_store``, ``attribute``, ``FisherStats``
or the taps, so a bug there cannot hide in the expected values:

* the plain data value sums the periods (a bug that keeps only the last period's scores fails);
* the checkpoint ensemble ranks by scores summed over periods;
* ``keep_history="all"`` rescores every stored row against the Fisher of all rows;
* query gradients are eval-mode gradients (a model with dropout).

The helpers (``dense_sketch``, ``exact_query_rows``, ``store_rows``, ``hand_scores``) are used by
``tests/test_ddp.py`` as well.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset
from grass_callback.attribution import query_gradients
from grass_callback.capture import LayerTaps
from grass_callback.projection import FactGraSSPlan

N_TRAIN, N_VAL, NUM_QUERIES, K, RATIO = 48, 12, 6, 16, 0.1


# ---------------------------------------------------------------------- references


def dense_sketch(plan) -> Tensor:
    """The FactGraSS plan as a dense ``[k, d_out * d_in_eff]`` float64 matrix, built entry by entry.

    Column ``o * d_in_eff + i`` is weight-gradient entry ``G[o, i]`` (bias column last). The mask
    keeps ``(out_idx[a], in_idx[b])`` as coordinate ``e = a * k_in + b``, which row ``j`` of the
    SJLT sends to ``bucket[j, e]`` with value ``sign[j, e] / sqrt(c)``.
    """
    d_in_eff = plan.shape.d_in_eff
    c = plan.bucket.shape[0]
    matrix = torch.zeros(plan.k, plan.shape.d_out * d_in_eff, dtype=torch.float64)
    for a, o in enumerate(plan.out_idx.tolist()):
        for b, i in enumerate(plan.in_idx.tolist()):
            e = a * plan.k_in + b
            for j in range(c):
                matrix[int(plan.bucket[j, e]), o * d_in_eff + i] += int(plan.sign[j, e]) / math.sqrt(c)
    return matrix


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def exact_query_rows(module: nn.Module, plans: dict, examples: list[tuple[Tensor, Tensor]],
                     net: str | None = "net") -> dict[str, Tensor]:
    """Compressed gradients ``{layer: [m, k]}`` of each example's own cross-entropy loss.

    The gradients are taken one example at a time by plain autograd on a float64 copy of
    ``module.<net>`` (``module`` itself when ``net`` is ``None``) in eval mode, then multiplied by
    :func:`dense_sketch` of the layer's plan. The examples go in alone as ``[1, d]``, without a
    token axis, so a FactGraSS plan projects them with its one-token plan (``input_plan(False)``).
    """
    model = copy.deepcopy(getattr(module, net) if net else module).double().eval()
    layers = linear_layers(model)
    prefix = f"{net}." if net else ""
    out: dict[str, list[Tensor]] = {f"{prefix}{n}": [] for n in layers}
    sketches = {name: dense_sketch(plans[name].input_plan(False) if isinstance(plans[name], FactGraSSPlan)
                                   else plans[name]) for name in out}
    for x, y in examples:
        loss = F.cross_entropy(model(x[None].double()), y[None])
        params = [p for m in layers.values() for p in (m.weight, m.bias)]
        grads = torch.autograd.grad(loss, params)
        for j, name in enumerate(layers):
            g = torch.cat([grads[2 * j], grads[2 * j + 1][:, None]], 1)  # [d_out, d_in + 1]
            out[f"{prefix}{name}"].append(sketches[f"{prefix}{name}"] @ g.reshape(-1))
    return {name: torch.stack(rows) for name, rows in out.items()}


def store_rows(train_dir: Path) -> dict[str, Tensor]:
    """Every committed row of a store, read with safetensors from the shards its manifests list.

    Returns ``ids``, ``steps``, ``epochs`` ``[n]`` and ``g/<layer>`` ``[n, k]`` (float64).
    """
    parts: dict[str, list[Tensor]] = {}
    for manifest in sorted(Path(train_dir).glob("manifest-r*.json")):
        for entry in json.loads(manifest.read_text())["shards"]:
            for key, t in load_file(str(Path(train_dir) / entry["file"])).items():
                parts.setdefault(key, []).append(t)
    assert parts, f"no committed shard in {train_dir}"
    return {key: torch.cat(ts).double() if key.startswith("g/") else torch.cat(ts).long()
            for key, ts in parts.items()}


def hand_damping(fisher: Tensor, n: int, ratio: float | str, head: bool = False) -> Tensor:
    """``λ = ratio · trace(F) / k``; ``ratio="auto"`` is the default rule written out here:
    ``λ = trace(F) / min(k, n)``, the mean non-zero eigenvalue of a rank-``min(k, n)`` Fisher, and a
    tenth of that on a vocabulary head (``head``)."""
    k = fisher.shape[0]
    if ratio == "auto":
        return torch.trace(fisher) / min(k, n) * (0.1 if head else 1.0)
    return ratio * torch.trace(fisher) / k


def hand_fisher_inverse_apply(rows: Tensor, ratio: float | str, rhs: Tensor, head: bool = False) -> Tensor:
    """``(F + λI)^{-1} rhs`` with ``F = rowsᵀ rows / n`` and ``λ`` from :func:`hand_damping`."""
    n, k = rows.shape
    fisher = rows.T @ rows / n
    damped = fisher + hand_damping(fisher, n, ratio, head) * torch.eye(k, dtype=torch.float64)
    return torch.linalg.solve(damped, rhs)


def hand_scores(rows: dict[str, Tensor], queries: dict[str, Tensor], ratio: float | str,
                heads: tuple[str, ...] = ()) -> tuple[Tensor, Tensor]:
    """``(scores [m, n], self_influence [n])``: ``Σ_l q_l (F_l + λ_l I)^{-1} g_l`` over the layers
    (``heads``: the layers :func:`hand_damping` treats as vocabulary heads)."""
    scores, self_inf = 0.0, 0.0
    for name, q in queries.items():
        g = rows[f"g/{name}"]
        solved = hand_fisher_inverse_apply(g, ratio, g.T, name in heads)        # [k, n]
        scores = scores + q.double() @ solved
        self_inf = self_inf + (g * solved.T).sum(1)
    return scores, self_inf


# ---------------------------------------------------------------------- a tiny fit


class DropoutModule(L.LightningModule):
    """Two linear layers with dropout between them: train-mode query gradients are random."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class WeightsAtEpochEnd(Callback):
    """Keeps a copy of the module at each epoch end (the weights each scoring period used)."""

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        module = type(pl_module)()  # a fresh one: a deep copy would carry the taps' hooks along
        module.load_state_dict(pl_module.state_dict())
        self.modules.append(module)


class VocabularyHeadModule(DropoutModule):
    """A 16 -> 160 output layer: 160 >= 8 x 17 outputs, a vocabulary head to the damping rule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 160))


def _data(classes: int = 3) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = torch.randint(0, classes, (N_TRAIN + N_VAL,), generator=g)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


def _fit(tmp_path: Path, epochs: int, k: int = K, callback=GraSSCallback, module=DropoutModule, classes: int = 3,
         damping_ratio: float | str = RATIO, **kw) -> tuple[GraSSCallback, WeightsAtEpochEnd]:
    L.seed_everything(0, verbose=False)
    train_set, val_set = _data(classes)
    cb = callback(k=k, num_queries=NUM_QUERIES, topk=N_TRAIN, store_dir=tmp_path / "grass",
                  storage_dtype="float32", damping_ratio=damping_ratio, progress=False, log_to_wandb=False, **kw)
    weights = WeightsAtEpochEnd()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=[cb, weights],
                        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0)
    train = DataLoader(IndexedDataset(train_set), batch_size=16, shuffle=True)
    cb.query_loader = DataLoader(IndexedDataset(val_set), batch_size=8)
    trainer.fit(module(), train)
    return cb, weights


def _queries(module: nn.Module, plans: dict, classes: int = 3) -> dict[str, Tensor]:
    _, val_set = _data(classes)
    return exact_query_rows(module, plans, [val_set[i] for i in range(NUM_QUERIES)])


def _per_epoch(rows: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
    keep = rows["epochs"] == epoch
    return {key: t[keep] for key, t in rows.items()}


def _close(got: Tensor, want: Tensor, what: str) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _data_value_tensor(cb: GraSSCallback) -> Tensor:
    """The plain data value (scores summed over queries and periods; the standardised default:
    ``tests/test_data_value.py``)."""
    plain = dict(zip(*(t.tolist() for t in cb.data_value_plain)))
    assert sorted(plain) == list(range(N_TRAIN))
    return torch.tensor([plain[i] for i in range(N_TRAIN)], dtype=torch.float64)


# ---------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def period_run(tmp_path_factory) -> tuple[GraSSCallback, WeightsAtEpochEnd, dict, list]:
    """Three epochs, ``keep_history="period"``: the rows, and the hand scores of each period."""
    cb, weights = _fit(tmp_path_factory.mktemp("period"), epochs=3)
    rows = store_rows(Path(cb.store_dir) / "train")
    periods = []
    for epoch, module in enumerate(weights.modules):
        own = _per_epoch(rows, epoch)
        assert sorted(own["ids"].tolist()) == list(range(N_TRAIN)), epoch
        scores, self_inf = hand_scores(own, _queries(module, cb.taps.plans), RATIO)
        dense = torch.zeros(NUM_QUERIES, N_TRAIN, dtype=torch.float64)
        dense[:, own["ids"]] = scores
        periods.append({"scores": dense, "self": dict(zip(own["ids"].tolist(), self_inf.tolist()))})
    return cb, weights, rows, periods


def test_data_value_is_the_sum_of_every_period_scores(period_run):
    cb, weights, rows, periods = period_run
    assert len(weights.modules) == 3 and rows["ids"].numel() == 3 * N_TRAIN
    want = sum(p["scores"].sum(0) for p in periods)
    _close(_data_value_tensor(cb), want, "data value")
    # each period adds something of its own: the last period alone is far from the sum
    last = periods[-1]["scores"].sum(0)
    assert (last - want).norm() > 0.1 * want.norm()


def test_last_period_scores_and_self_influence_match_the_hand_reference(period_run):
    cb, _, _, periods = period_run
    want = periods[-1]["scores"]
    result = cb.last_result
    assert result.top_ids.shape == (NUM_QUERIES, N_TRAIN)
    _close(result.top_scores, want.gather(1, result.top_ids), "period scores by id")
    assert torch.equal(result.top_ids, want.argsort(dim=1, descending=True))
    got_self = dict(zip(result.self_influence_ids.tolist(), result.self_influence.double().tolist()))
    ids = sorted(got_self)
    _close(torch.tensor([got_self[i] for i in ids]), torch.tensor([periods[-1]["self"][i] for i in ids],
                                                                   dtype=torch.float64), "self-influence")
    assert all(v > 0 for v in got_self.values())  # s(i, i) = gᵀ H⁻¹ g with H positive definite


def per_query_standardised(scores: torch.Tensor) -> torch.Tensor:
    """``scores [m, n]`` (every column scored) divided row by row by the row's population standard
    deviation: how the callback's ensemble adds a period (``ensemble_standardise=True``)."""
    return scores / scores.std(dim=1, correction=0, keepdim=True)


def test_ensemble_ranks_by_scores_summed_over_periods(period_run):
    cb, _, _, periods = period_run
    total = sum(per_query_standardised(p["scores"]) for p in periods)
    ens = cb.ensemble_result
    assert torch.equal(ens.top_ids, total.argsort(dim=1, descending=True))
    _close(ens.top_scores, total.gather(1, ens.top_ids), "ensemble top scores")
    _close(ens.bottom_scores, total.gather(1, ens.bottom_ids), "ensemble bottom scores")
    assert torch.equal(ens.bottom_ids, total.argsort(dim=1))
    # the ensemble is not the last period alone (else the test could not tell them apart)
    assert not torch.equal(ens.top_ids[:, :3], periods[-1]["scores"].argsort(dim=1, descending=True)[:, :3])


class RecordingFits(GraSSCallback):
    """Keeps each period's fit, to see which layers were solved through their rows' kernel."""

    def _fit(self, stats, period):
        fitted = super()._fit(stats, period)
        self.__dict__.setdefault("fits", []).append(fitted)
        return fitted


def test_a_period_of_fewer_rows_than_half_of_k_is_solved_through_its_kernel_and_matches_the_hand_reference(tmp_path):
    cb, weights = _fit(tmp_path, epochs=2, k=256, callback=RecordingFits)
    dims = cb.taps.layer_dims
    wide = [name for name, k in dims.items() if 2 * N_TRAIN <= k]
    assert wide and len(wide) < len(dims)  # one layer each way
    assert all(sorted(fit.duals) == sorted(wide) for fit in cb.fits)
    own = _per_epoch(store_rows(Path(cb.store_dir) / "train"), 1)
    scores, self_inf = hand_scores(own, _queries(weights.modules[1], cb.taps.plans), RATIO)
    _check_last_period(cb, own, scores, self_inf)


def _check_last_period(cb: GraSSCallback, own: dict[str, Tensor], scores: Tensor, self_inf: Tensor) -> None:
    """The callback's last period (scores by id, their order, self-influence) against the hand
    ``scores [m, rows]`` and ``self_inf [rows]`` of the period's rows ``own``."""
    want = torch.zeros(NUM_QUERIES, N_TRAIN, dtype=torch.float64)
    want[:, own["ids"]] = scores
    result = cb.last_result
    _close(result.top_scores, want.gather(1, result.top_ids), "period scores by id")
    assert torch.equal(result.top_ids, want.argsort(dim=1, descending=True))
    got_self = dict(zip(result.self_influence_ids.tolist(), result.self_influence.double().tolist()))
    want_self = dict(zip(own["ids"].tolist(), self_inf.tolist()))
    ids = sorted(got_self)
    _close(torch.tensor([got_self[i] for i in ids]), torch.tensor([want_self[i] for i in ids], dtype=torch.float64),
           "self-influence")


def test_auto_damping_gives_a_vocabulary_head_a_tenth_of_the_rule_and_matches_the_hand_reference(tmp_path):
    cb, weights = _fit(tmp_path, epochs=2, callback=RecordingFits, module=VocabularyHeadModule, classes=160,
                       damping_ratio="auto")
    assert all(fit.damping_ratio == {"net.0": 1.0, "net.2": pytest.approx(0.1)} for fit in cb.fits)  # k = 16 < N = 48
    own = _per_epoch(store_rows(Path(cb.store_dir) / "train"), 1)
    queries = _queries(weights.modules[1], cb.taps.plans, classes=160)
    scores, self_inf = hand_scores(own, queries, "auto", heads=("net.2",))
    _check_last_period(cb, own, scores, self_inf)
    # the head's factor is visible in the scores: the rule without it is far from them
    plain, _ = hand_scores(own, queries, "auto")
    assert (plain - scores).abs().max() > 0.05 * scores.abs().max()


def test_keep_history_all_rescores_every_stored_row_each_period(tmp_path):
    cb, weights = _fit(tmp_path, epochs=2, keep_history="all")
    rows = store_rows(Path(cb.store_dir) / "train")
    assert rows["ids"].numel() == 2 * N_TRAIN
    # the last period: the Fisher of all 96 rows, every row scored with the final weights
    scores, self_inf = hand_scores(rows, _queries(weights.modules[-1], cb.taps.plans), RATIO)
    want = torch.zeros(N_TRAIN, dtype=torch.float64).index_add_(0, rows["ids"], scores.sum(0))
    _close(_data_value_tensor(cb), want, "data value (latest scores of all rows)")
    result = cb.last_result
    assert result.self_influence.numel() == 2 * N_TRAIN
    got = sorted(zip(result.self_influence_ids.tolist(), result.self_influence.double().tolist()))
    ref = sorted(zip(rows["ids"].tolist(), self_inf.tolist()))
    assert [i for i, _ in got] == [i for i, _ in ref]
    # rows of one id are paired by value order within the id: compare the sorted pairs per id
    _close(torch.tensor(sorted(got)), torch.tensor(sorted(ref), dtype=torch.float64), "self-influence")


def test_query_gradients_of_a_dropout_model_are_eval_mode_gradients():
    torch.manual_seed(3)
    module = DropoutModule()
    module.train()
    taps = LayerTaps(module, k=K)
    _, val_set = _data()
    loader = DataLoader(IndexedDataset(val_set), batch_size=4)
    with taps:
        ids, got = query_gradients(module, taps, loader, lambda m, b: F.cross_entropy(m.net(b[0]), b[1]),
                                   max_queries=NUM_QUERIES, progress=False)
    assert module.training, "query_gradients must restore the module's mode"
    assert ids.tolist() == list(range(NUM_QUERIES))
    want = exact_query_rows(module, taps.plans, [val_set[i] for i in range(NUM_QUERIES)])
    for name, w in want.items():
        _close(got[name], w, name)
    # with dropout active the same gradients differ (so the comparison above can fail)
    with taps, taps.recording():
        taps.set_scale(None)
        x, y = val_set[:NUM_QUERIES]
        noisy = taps.gradients(F.cross_entropy(module.net(x), y, reduction="sum"))
    assert any((noisy[n].double() - w).norm() > 1e-2 * w.norm() for n, w in want.items())
