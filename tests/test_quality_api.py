"""API gaps met by the quality suite: attribute(query_loss_fn=, full=True) and the callback's
weighted ensemble (ensemble_scores, ensemble_self_influence), each against a dense reference
computed here from exact per-example autograd gradients (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import IndexedDataset, attribute

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n: int = 40, m: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, 5, generator=g)
    y = torch.randint(0, 3, (n + m,), generator=g)
    torch.manual_seed(seed)
    # 3x6 and 3x7 weight gradients (with bias): k = 64 keeps every coordinate (identity sketch),
    # so the compressed rows are the exact gradients and the reference needs no projection
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, x[:n], y[:n], x[n:], y[n:]


def _per_example_grads(model: nn.Module, loss_of_one, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: [N, d_out * (d_in + 1)]} exact gradients of each example's own loss, float64."""
    model64 = copy.deepcopy(model).double()
    layers = {name: mod for name, mod in model64.named_modules() if isinstance(mod, nn.Linear)}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for x, y in zip(xs.double(), ys):
        loss = loss_of_one(model64, x.unsqueeze(0), y.unsqueeze(0))
        params = [p for mod in layers.values() for p in (mod.weight, mod.bias)]
        grads = torch.autograd.grad(loss, params)
        for i, name in enumerate(layers):
            w, b = grads[2 * i], grads[2 * i + 1]
            rows[name].append(torch.cat([w, b.unsqueeze(1)], 1).flatten())
    return {name: torch.stack(r) for name, r in rows.items()}


def _reference(train: dict, queries: dict, ratio: float) -> torch.Tensor:
    """[m, n] Σ_l q_l^T (F_l + r tr(F_l)/k I)^{-1} g_il with F_l = G^T G / N."""
    total = 0
    for name, g in train.items():
        fisher = g.T @ g / g.shape[0]
        h = fisher + ratio * torch.trace(fisher) / g.shape[1] * torch.eye(g.shape[1], dtype=torch.float64)
        total = total + queries[name] @ torch.linalg.solve(h, g.T)
    return total


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def _first_logit(model, x, y):  # a query loss other than the training loss
    return model(x)[:, 0].mean()


def test_attribute_full_matrix_with_a_query_loss_equals_a_dense_reference(tmp_path):
    model, xt, yt, xq, yq = _problem()
    train = DataLoader(IndexedDataset(TensorDataset(xt, yt)), batch_size=8)
    query = DataLoader(TensorDataset(xq, yq), batch_size=4)
    res = attribute(model, train, query, lambda m, b: _ce(m, b[0], b[1]), k=64, dtype="float32",
                    damping_ratio=0.05, store_dir=tmp_path / "s", progress=False, full=True,
                    query_loss_fn=lambda m, b: _first_logit(m, b[0], b[1]))
    g = _per_example_grads(model, _ce, xt, yt)
    q = _per_example_grads(model, _first_logit, xq, yq)
    want = _reference(g, q, 0.05)
    assert res.full_scores.shape == (len(xq), len(xt))
    torch.testing.assert_close(res.full_scores, want, rtol=2e-3, atol=1e-6 * float(want.abs().max()))
    # the training loss as query loss gives other scores: the option is used
    q_ce = _per_example_grads(model, _ce, xq, yq)
    assert (want - _reference(g, q_ce, 0.05)).abs().max() > 0.1 * want.abs().max()
    # top proponents come from the same matrix
    assert torch.equal(res.scores.top_ids[:, 0], want.argmax(1))


def _run_callback(tmp_path, weighting: str, epochs: int = 3):
    """A Trainer whose optimizer moves only a dummy parameter: the model is fixed, the lr is not."""
    import lightning as L

    from grass_callback import GraSSCallback

    model, xt, yt, xq, yq = _problem(seed=1)

    class Fixed(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.dummy = model, nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return _ce(self.net, batch[0], batch[1]) + 0.0 * self.dummy

        def configure_optimizers(self):
            opt = torch.optim.SGD([self.dummy], lr=1.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    train = DataLoader(IndexedDataset(TensorDataset(xt, yt)), batch_size=10)
    query = DataLoader(TensorDataset(xq, yq), batch_size=6)
    cb = GraSSCallback(k=64, num_queries=len(xq), query_loader=query, storage_dtype="float32", damping_ratio=0.05,
                       log_to_wandb=False, progress=False, store_dir=tmp_path / "grass", ensemble_weighting=weighting)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(Fixed(), train)
    return cb, model, xt, yt, xq, yq


@pytest.mark.parametrize("weighting", ["uniform", "lr"])
def test_callback_ensemble_scores_and_self_influence_are_the_weighted_sums(tmp_path, weighting):
    epochs, steps = 3, 4  # 40 examples in batches of 10
    cb, model, xt, yt, xq, yq = _run_callback(tmp_path, weighting, epochs)
    g = _per_example_grads(model, _ce, xt, yt)
    q = _per_example_grads(model, _ce, xq, yq)
    per_period = _reference(g, q, 0.05)  # the model is fixed: every period scores the same
    selfinf = sum(torch.einsum("nk,nk->n", g[n], torch.linalg.solve(
        g[n].T @ g[n] / len(g[n]) + 0.05 * torch.trace(g[n].T @ g[n] / len(g[n])) / g[n].shape[1]
        * torch.eye(g[n].shape[1], dtype=torch.float64), g[n].T).T) for n in g)
    if weighting == "uniform":
        weights = [1.0] * epochs
    else:  # mean lr of each epoch's steps: lr of step s is 1 / (1 + s)
        weights = [sum(1.0 / (1 + s) for s in range(e * steps, (e + 1) * steps)) / steps for e in range(epochs)]
    total = sum(weights)
    z = per_period / per_period.std(dim=1, correction=0, keepdim=True)  # each period standardised per query
    torch.testing.assert_close(cb.ensemble_scores, total * z, rtol=2e-3, atol=1e-6 * float(z.abs().max()))
    torch.testing.assert_close(cb.ensemble_self_influence, total * selfinf, rtol=2e-3, atol=1e-9)
    assert cb._ensemble.weights == pytest.approx(weights, rel=1e-6)
    assert not math.isclose(total, epochs) or weighting == "uniform"


def test_score_ensemble_standardises_each_period_over_its_own_rows():
    """``add(standardise=True)``: each query's scores over the period's seen ids divided by their
    population standard deviation (computed here by loops), unseen ids add nothing; a period
    added with the other setting restarts the sum with a warning."""
    from grass_callback.scoring import ScoreEnsemble

    gen = torch.Generator().manual_seed(4)
    n, m = 9, 3
    ens = ScoreEnsemble(n)
    want = torch.zeros(m, n, dtype=torch.float64)
    for period, weight in enumerate((1.0, 0.5)):
        seen = (torch.rand(n, generator=gen) > 0.3).double()
        seen[:2] = 1.0
        scores = torch.randn(m, n, generator=gen, dtype=torch.float64) * (10.0 ** period) * seen
        for q in range(m):
            vals = [float(scores[q, i]) for i in range(n) if seen[i] > 0]
            mean = sum(vals) / len(vals)
            sd = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
            for i in range(n):
                if seen[i] > 0:
                    want[q, i] += weight * float(scores[q, i]) / sd
        ens.add(torch.arange(m), scores, seen, weight=weight, standardise=True)
    torch.testing.assert_close(ens.total, want, rtol=1e-12, atol=1e-12)
    assert ens.state_dict()["standardised"] is True
    with pytest.warns(UserWarning, match="ensemble restarts"):
        ens.add(torch.arange(m), scores, seen, standardise=False)
    assert ens.periods == 1 and torch.equal(ens.total, scores)


def test_ensemble_standardise_must_be_a_bool():
    from grass_callback import GraSSCallback
    from grass_callback.errors import ConfigError

    with pytest.raises(ConfigError, match="ensemble_standardise must be True or False"):
        GraSSCallback(ensemble_standardise="yes")
