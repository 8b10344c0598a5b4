"""GraSSCallback inside real Lightning loops, checked against exact per-example gradients.

Every test trains a tiny model with a real ``Trainer`` and ``GraSSCallback(storage_dtype="float32")``.
A recorder callback keeps the weights and the batch at each ``on_train_batch_start`` (the weights
the taps see in that batch's forward/backward), so the optimiser may move the weights (lr > 0):
after training, each stored row ``(step, id)`` is compared with the store's own plans
(:func:`plans_from_store`) applied to that example's exact gradient, computed alone with plain
autograd in float64 on a copy of the model holding the recorded weights.
"""

from __future__ import annotations

from functools import partial
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from grass_callback import GraSSCallback, IndexedDataset
from grass_callback.attribution import plans_from_store, query_gradients
from grass_callback.capture import LayerTaps, clean_layer_name
from grass_callback.errors import ConfigError, GraSSError
from grass_callback.projection import FactGraSSPlan
from grass_callback.store import GradientStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_independent_refs import exact_query_rows, hand_scores, store_rows  # noqa: E402

N_TRAIN, BATCH = 24, 8


# ---------------------------------------------------------------------- harness


class Recorder(Callback):
    """Weights and batch at every training batch start, numbered like the callback's steps."""

    def __init__(self):
        self.seen = []  # (step, state_dict copy, batch copy)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.seen.append((len(self.seen), state, _clone(batch)))


def _clone(batch):
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, dict):
        return {k: _clone(v) for k, v in batch.items()}
    return type(batch)(_clone(v) for v in batch)


def _example(batch, i):
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    if isinstance(batch, dict):
        return {k: _example(v, i) for k, v in batch.items()}
    return type(batch)(_example(v, i) for v in batch)


def _batch_size(batch):
    return len(batch["index"]) if isinstance(batch, dict) else len(batch[-1])


def layer_gradient(module):
    """The weight (+bias column) gradient of a tapped layer as ``[d_out, d_in(+1)]``."""
    w = module.weight.grad if isinstance(module, nn.Linear) else module.weight.grad.T  # Conv1D: [d_in, d_out]
    return torch.cat([w, module.bias.grad[:, None]], 1) if module.bias is not None else w


def exact_rows(ref, plans, loss_fn, batch, layer_grad=None):
    """Each example alone through ``ref`` (float64), its layer gradients projected with ``plans``
    (a FactGraSS plan's one-token plan for a layer whose input, seen here, has no token axis)."""
    out = {name: [] for name in plans}
    token_axis = {}

    def seen(name, module, inputs):  # returns None: the inputs go on unchanged
        token_axis.setdefault(name, inputs[0].dim() > 2)

    hooks = [ref.get_submodule(name).register_forward_pre_hook(partial(seen, name)) for name in plans]
    for i in range(_batch_size(batch)):
        ref.zero_grad(set_to_none=True)
        loss_fn(ref, _example(batch, i)).backward()
        for name, plan in plans.items():
            if isinstance(plan, FactGraSSPlan) and name in token_axis:
                plan = plan.input_plan(token_axis[name])
            g = layer_grad(ref, name) if layer_grad is not None else layer_gradient(ref.get_submodule(name))
            out[name].append(plan.project_gradient(g[None].double()))
    for h in hooks:
        h.remove()
    ref.zero_grad(set_to_none=True)
    return {name: torch.cat(rows) for name, rows in out.items()}


def stored_rows(store_path):
    """``{(step, id): {layer: row}}`` of every committed row, read back from disk."""
    store = GradientStore(store_path, readonly=True)
    rows = {}
    for chunk in store.iter_chunks():
        for j, key in enumerate(zip(chunk.steps.tolist(), chunk.ids.tolist())):
            assert key not in rows, f"row {key} stored twice"
            rows[key] = {name: g[j] for name, g in chunk.grads.items()}
    return store, rows


def check_exact(cb, recorder, make_ref, loss_fn, tol, layer_grad=None, steps=None):
    """Every recorded batch's stored rows equal the plans applied to exact per-example gradients.

    Returns the worst relative error per layer (so a test can also check it is not trivially 0).
    """
    store, rows = stored_rows(cb.store.path)
    plans = plans_from_store(store)
    assert set(plans) == set(store.layers) and plans
    ref = make_ref()
    worst = {name: 0.0 for name in plans}
    checked = 0
    for step, state, batch in recorder.seen:
        if steps is not None and step not in steps:
            continue
        ref.load_state_dict({clean_layer_name(k): v for k, v in state.items()})  # compiled: net._orig_mod.0
        ref.double()
        want = exact_rows(ref, plans, loss_fn, batch, layer_grad)
        ids = (batch["index"] if isinstance(batch, dict) else batch[-1]).tolist()
        for name in plans:
            got = torch.stack([rows[(step, i)][name] for i in ids]).double()
            rel = ((got - want[name]).norm() / want[name].norm()).item()
            assert want[name].norm() > 0, (name, step)
            assert rel <= tol, (name, step, rel)
            worst[name] = max(worst[name], rel)
        checked += 1
    expected = sum(_batch_size(b) for step, _, b in recorder.seen if steps is None or step in steps)
    assert checked > 0 and len(rows) == expected
    return worst


def make_callback(tmp_path, **kw):
    opts = dict(k=16, storage_dtype="float32", store_dir=tmp_path / "grass", num_queries=4, topk=2,
                log_to_wandb=False, progress=False)
    opts.update(kw)
    return GraSSCallback(**opts)


def train(tmp_path, module, train_loader, cb, epochs=1, val=None, plugins=None, **trainer_kw):
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1, default_root_dir=str(tmp_path), callbacks=[recorder, cb],
                        plugins=plugins, **trainer_kw)
    trainer.fit(module, train_loader, val)
    return trainer, recorder


def xy_data(n=N_TRAIN, d=6, classes=3, seed=0, batch_size=BATCH, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch_size, shuffle=shuffle)


class MLPModule(L.LightningModule):
    """x -> Linear -> tanh -> Linear -> tanh -> Linear, cross-entropy averaged over the batch."""

    def __init__(self, dtype=torch.float64, lr=0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
        self.net.to(dtype)

    def loss(self, batch):
        x, y, _ = batch
        w = next(p for p in self.parameters())
        return F.cross_entropy(self.net(x.to(w.dtype)), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def mlp_loss(m, b):
    return m.loss(b)


# ---------------------------------------------------------------------- loop variants


def test_plain_loop_rows_are_exact_and_weights_move(tmp_path):
    """The baseline the variants build on: lr > 0, rows exact at each step's own weights."""
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    module = MLPModule()
    _, rec = train(tmp_path, module, xy_data(), cb, epochs=1)
    check_exact(cb, rec, MLPModule, mlp_loss, tol=1e-6)
    # the weights did move between steps, so comparing at the step's weights matters
    w0, w2 = rec.seen[0][1]["net.0.weight"], rec.seen[2][1]["net.0.weight"]
    assert not torch.equal(w0, w2)


def test_accumulate_grad_batches(tmp_path):
    """Lightning divides the loss by 4; the per-example scale multiplies it back."""
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    _, rec = train(tmp_path, MLPModule(), xy_data(n=32, batch_size=4), cb, accumulate_grad_batches=4)
    worst = check_exact(cb, rec, MLPModule, mlp_loss, tol=1e-6)
    assert len(rec.seen) == 8 and max(worst.values()) < 1e-6
    # weights change only every 4th batch
    assert torch.equal(rec.seen[1][1]["net.0.weight"], rec.seen[3][1]["net.0.weight"])
    assert not torch.equal(rec.seen[3][1]["net.0.weight"], rec.seen[4][1]["net.0.weight"])


def test_bf16_mixed(tmp_path):
    """bf16 autocast: half-precision output gradients; rows agree with the float64 reference to bf16
    precision (tolerance 2e-2 relative; a wrong scale would be off by a factor)."""
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    trainer, rec = train(tmp_path, MLPModule(dtype=torch.float32), xy_data(), cb, precision="bf16-mixed")
    assert "bf16" in str(trainer.precision_plugin.precision)
    worst = check_exact(cb, rec, lambda: MLPModule(dtype=torch.float32), mlp_loss, tol=2e-2)
    assert max(worst.values()) > 1e-4  # bf16 really ran (measured ~5e-3; bf16 eps 3.9e-3; float32 ~1e-7)


def test_fp16_mixed_with_a_real_grad_scaler(tmp_path):
    """fp16 AMP with a GradScaler whose scale doubles every step: rows are divided by that step's scale.

    ``Trainer(precision="16-mixed")`` on CPU silently falls back to bf16 in Lightning 2.6, so the
    fp16 path is driven with Lightning's own ``MixedPrecision`` plugin given a CPU GradScaler.
    """
    from lightning.pytorch.plugins import MixedPrecision

    with pytest.warns(UserWarning, match="not supported on CPU"):
        fallback = L.Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert fallback.precision_plugin.precision == "bf16-mixed"  # why the plugin is built by hand below
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    trainer, rec = train(tmp_path, MLPModule(dtype=torch.float32), xy_data(), cb, plugins=[plugin])
    assert trainer.precision_plugin.scaler is scaler and scaler.get_scale() == 2.0 ** 13  # 3 steps of growth
    worst = check_exact(cb, rec, lambda: MLPModule(dtype=torch.float32), mlp_loss, tol=3e-3)
    assert max(worst.values()) > 1e-6  # fp16 really ran (measured ~6e-4; fp16 eps ~1e-3)


def test_fp16_scale_overflow_drops_that_steps_rows(tmp_path):
    """A loss scale so large that the fp16 output gradients overflow: GradScaler skips the step and
    backs off; the callback's rows of that step are Inf, so the store drops and counts them (one
    warning), and the later steps' rows are exact."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, backoff_factor=2.0 ** -8)
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    with pytest.warns(UserWarning, match=r"dropped 8 of 8 rows with NaN/Inf gradients at step 0"):
        _, rec = train(tmp_path, MLPModule(dtype=torch.float32), xy_data(), cb,
                       plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() == 2.0 ** 16 and cb.store.skipped_nonfinite == BATCH
    _, rows = stored_rows(cb.store.path)
    assert sorted({step for step, _ in rows}) == [1, 2]
    check_exact(cb, rec, lambda: MLPModule(dtype=torch.float32), mlp_loss, tol=3e-3, steps={1, 2})


class ForwardMLP(MLPModule):
    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y, _ = batch
        return F.cross_entropy(self(x.to(next(self.parameters()).dtype)), y)


@pytest.mark.parametrize("what", ["inner_net", "lightning_module"])
def test_torch_compile(tmp_path, what):
    """A compiled model: the forward hooks on the original submodules still fire and rows are exact.

    ``torch.compile(net)`` returns an ``OptimizedModule`` whose ``_orig_mod`` holds the layers; the
    taps hook those layers and name them without ``_orig_mod`` (same plans and store as the plain
    model). Dynamo cannot trace the tensor-hook registration inside the forward hook, so it
    graph-breaks once per tapped layer (the segments between taps stay compiled). The
    ``aot_eager`` backend is used to keep the test fast; AOTAutograd is where backward hooks on
    compiled intermediates would go missing, and the inductor backend behaves the same (checked
    by hand; its first compile costs ~30 s on 2 cores).
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module = ForwardMLP()
    if what == "inner_net":
        module.net = torch.compile(module.net, backend="aot_eager")
        fitted = module
    else:
        fitted = torch.compile(module, backend="aot_eager")
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    _, rec = train(tmp_path, fitted, xy_data(), cb)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # Dynamo really compiled something
    assert list(cb.taps.layers) == ["net.0", "net.2", "net.4"]
    if what == "inner_net":
        assert any("_orig_mod" in n for n, _ in module.named_modules())
    check_exact(cb, rec, ForwardMLP, mlp_loss, tol=1e-6)
    # the plans are those of the uncompiled model: a later attribution from the plain model matches
    plain = LayerTaps(ForwardMLP(), k=16)
    assert plans_from_store(GradientStore(cb.store.path, readonly=True)) == plain.plans


class CheckpointedMLP(MLPModule):
    """The middle and last layers run inside ``torch.utils.checkpoint`` (recomputed in backward)."""

    def __init__(self, mode="non_reentrant", **kw):
        super().__init__(**kw)
        self.mode = mode
        if mode == "wrapper":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            self.net[2] = checkpoint_wrapper(self.net[2])

    def loss(self, batch):
        x, y, _ = batch
        h = torch.tanh(self.net[0](x.to(next(self.parameters()).dtype)))
        if self.mode == "wrapper":
            out = self.net[4](torch.tanh(self.net[2](h)))
        else:
            out = checkpoint(lambda t: self.net[4](torch.tanh(self.net[2](t))), h,
                             use_reentrant=self.mode == "reentrant")
        return F.cross_entropy(out, y)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant", "wrapper"])
def test_activation_checkpointing(tmp_path, mode):
    """Recomputed layers are counted once: the reentrant first pass runs under no_grad (the hook
    skips it) and the non-reentrant recomputation's outputs never receive a gradient.
    ``checkpoint_wrapper`` adds a ``_checkpoint_wrapped_module`` level the layer names leave out."""
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    module = CheckpointedMLP(mode)
    _, rec = train(tmp_path, module, xy_data(), cb)
    assert list(cb.taps.layers) == ["net.0", "net.2", "net.4"]
    check_exact(cb, rec, MLPModule, mlp_loss, tol=1e-6)
    assert cb.last_result is not None  # the epoch-end query pass ran through the checkpointed model
    # query gradients through the same model (reentrant: a full backward, param.grad put back),
    # also when every tapped layer runs only inside the checkpoint
    plans = plans_from_store(GradientStore(cb.store.path, readonly=True))
    queries = xy_data(6, seed=2, batch_size=3)
    ref = MLPModule()
    ref.load_state_dict(module.state_dict())
    for include in (None, ["net.2", "net.4"]):
        taps = LayerTaps(module, plans=plans, include=include)
        sentinel = [torch.full_like(p, 7.0) for p in module.parameters()]
        for p, g in zip(module.parameters(), sentinel):
            p.grad = g.clone()
        with taps:
            _, got = query_gradients(module, taps, queries, mlp_loss, progress=False)
        assert all(torch.equal(p.grad, g) for p, g in zip(module.parameters(), sentinel))
        for b in queries:
            want = exact_rows(ref, taps.plans, mlp_loss, b)
            ids = b[-1]
            for name in taps.plans:
                rel = (got[name][ids].double() - want[name]).norm() / want[name].norm()
                assert rel < 1e-6, (include, name, rel)


def _lm_batches(n=12, T=6, vocab=40, batch_size=4):
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": torch.randint(0, vocab, (T,), generator=g)} for _ in range(n)]
    return DataLoader(IndexedDataset(rows), batch_size=batch_size)


class TiedGPT2(L.LightningModule):
    """GPT-2 whose ``lm_head`` (an ``nn.Linear``) shares its weight with the ``wte`` embedding."""

    def __init__(self, lr=0.05):
        super().__init__()
        import transformers

        cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8,
                                      tie_word_embeddings=True, attn_pdrop=0, embd_pdrop=0, resid_pdrop=0)
        self.model = transformers.GPT2LMHeadModel(cfg).double()
        self.lr = lr

    def loss(self, batch):  # each example's tokens summed, averaged over examples
        ids = batch["input_ids"]
        logits = self.model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum") / ids.shape[0]

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_gpt2_tied_lm_head_rows_are_the_linear_use_only(tmp_path):
    """The taps see the ``lm_head`` *use* of the tied weight, not the embedding's share of its gradient.

    Reference: a copy with ``lm_head`` untied (its own Parameter), so ``lm_head.weight.grad`` is
    the gradient through the Linear only. The tied gradient (both uses) differs, so the stored
    rows are not the projection of the shared parameter's full gradient: documented behaviour.
    """
    module = TiedGPT2()
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    cb = make_callback(tmp_path, query_loader=_lm_batches(4))
    _, rec = train(tmp_path, module, _lm_batches(), cb)
    assert "model.lm_head" in cb.taps.layers and len(cb.taps.layers) == 5  # c_attn, c_proj, c_fc, c_proj, lm_head
    assert module.model.lm_head.weight is module.model.transformer.wte.weight  # the taps untied nothing

    def untied():
        ref = TiedGPT2()
        ref.model.lm_head.weight = nn.Parameter(ref.model.lm_head.weight.detach().clone())
        assert ref.model.lm_head.weight is not ref.model.transformer.wte.weight
        return ref

    check_exact(cb, rec, untied, lambda m, b: m.loss(b), tol=1e-6)
    # the full gradient of the shared parameter (embedding + lm_head uses) is something else
    store, rows = stored_rows(cb.store.path)
    plan = plans_from_store(store)["model.lm_head"]
    tied = TiedGPT2()
    step, state, batch = rec.seen[0]
    tied.load_state_dict(state)
    assert tied.model.lm_head.weight is tied.model.transformer.wte.weight
    full = exact_rows(tied, {"model.lm_head": plan}, lambda m, b: m.loss(b), batch)["model.lm_head"]
    got = torch.stack([rows[(step, i)]["model.lm_head"] for i in batch["index"].tolist()]).double()
    assert (got - full).norm() / full.norm() > 0.05


class ManualMLP(MLPModule):
    """Manual optimisation: ``manual_backward`` once per batch, or twice (the loss in two halves)."""

    def __init__(self, backwards=1, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False
        self.backwards = backwards

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        for _ in range(self.backwards):
            self.manual_backward(self.loss(batch) / self.backwards)
        opt.step()


def test_manual_optimization_single_backward(tmp_path):
    """``manual_backward`` runs the precision plugin's post-backward, so ``on_after_backward``
    fires and stores the rows (the ``on_train_batch_end`` fallback is not needed)."""
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1), query_loss_fn=mlp_loss)
    calls = []
    original = cb.on_after_backward
    cb.on_after_backward = lambda trainer, pl_module: (calls.append(cb._ids is not None), original(trainer, pl_module))
    _, rec = train(tmp_path, ManualMLP(), xy_data(), cb)
    assert calls == [True, True, True]
    check_exact(cb, rec, MLPModule, mlp_loss, tol=1e-6)
    assert not torch.equal(rec.seen[0][1]["net.0.weight"], rec.seen[1][1]["net.0.weight"])


def test_manual_optimization_two_backwards_per_batch(tmp_path):
    """Two ``manual_backward`` calls in one batch: the rows must be the batch's whole gradient."""
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1), query_loss_fn=mlp_loss)
    _, rec = train(tmp_path, ManualMLP(backwards=2), xy_data(), cb)
    check_exact(cb, rec, MLPModule, mlp_loss, tol=1e-6)


def test_several_validation_loaders_use_the_first(tmp_path):
    """``val_dataloaders`` a list: the queries are the first loader's examples (the others are
    ignored); the scores equal the engine run directly on the first loader."""
    first, second = xy_data(4, seed=1, batch_size=4), xy_data(6, seed=2, batch_size=3)
    cb = make_callback(tmp_path, num_queries=16)
    module = MLPModule(lr=0.0)  # fixed weights: the direct run below sees the same model
    train(tmp_path, module, xy_data(), cb, val=[first, second])
    result = cb.last_result
    assert result.query_ids.tolist() == [0, 1, 2, 3]  # 4 queries: the first loader's, not 6 or 10
    want = _hand_scores_of(cb, module, first)
    order = want.argsort(dim=1, descending=True)[:, :2]
    assert torch.equal(result.top_ids, order)
    torch.testing.assert_close(result.top_scores.double(), want.gather(1, order), rtol=1e-4, atol=1e-6)


def _hand_scores_of(cb, module, queries):
    """``[m, max id + 1]`` scores of every stored row, computed by hand (``tests/test_independent_refs.py``):
    rows read from the shards, a plain-torch Fisher, exact query gradients of ``module`` (one period)."""
    rows = store_rows(cb.store.path)
    examples = [(x, y) for batch in queries for x, y in zip(batch[0], batch[1])]
    scores, _ = hand_scores(rows, exact_query_rows(module, cb.taps.plans, examples), cb.damping_ratio)
    dense = torch.zeros(len(examples), int(rows["ids"].max()) + 1, dtype=torch.float64)
    dense.index_add_(1, rows["ids"], scores)
    return dense


def test_query_loader_given_as_a_list_of_loaders_is_a_clear_error(tmp_path):
    """``GraSSCallback(query_loader=[a, b])``: one loader is expected; the error says how to combine."""
    cb = make_callback(tmp_path, query_loader=[xy_data(4, seed=1), xy_data(4, seed=2)])
    with pytest.raises(GraSSError, match="ConcatDataset"):
        train(tmp_path, MLPModule(), xy_data(), cb)
    _, rows = stored_rows(cb.store.path)  # the epoch's rows were committed before the error
    assert len(rows) == N_TRAIN


def test_frozen_layers_are_skipped_with_one_warning(tmp_path):
    module = MLPModule()
    module.net[0].requires_grad_(False)
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rec = train(tmp_path, module, xy_data(), cb, epochs=2)
    frozen = [str(w.message) for w in caught if "frozen" in str(w.message)]
    assert frozen == ["grass_callback: skipping frozen linear layers ['net.0']."]
    store, rows = stored_rows(cb.store.path)
    assert list(store.layers) == ["net.2", "net.4"]
    assert all(set(r) == {"net.2", "net.4"} for r in rows.values())
    check_exact(cb, rec, MLPModule, mlp_loss, tol=1e-6)


class LoRALinear(nn.Module):
    """``base`` frozen, ``y = base(x) + 2 * lora_B(lora_A(x))`` with trainable adapters."""

    def __init__(self, d_in, d_out, r=2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.3)  # LoRA starts B at 0; nonzero keeps A's rows nonzero

    def forward(self, x):
        return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))


class LoRAModule(MLPModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = nn.Sequential(LoRALinear(6, 16), nn.Tanh(), LoRALinear(16, 3)).double()


def test_lora_adapters_are_tapped_and_exact(tmp_path):
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    with pytest.warns(UserWarning, match=r"frozen linear layers \['net.0.base', 'net.2.base'\]"):
        _, rec = train(tmp_path, LoRAModule(), xy_data(), cb)
    assert list(cb.taps.layers) == ["net.0.lora_A", "net.0.lora_B", "net.2.lora_A", "net.2.lora_B"]
    check_exact(cb, rec, LoRAModule, mlp_loss, tol=1e-6)


def test_manual_optimization_without_query_loss_fn_is_refused_up_front(tmp_path):
    class ReturnsLoss(ManualMLP):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = self.loss(batch)
            self.manual_backward(loss)
            opt.step()
            return loss

    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1))
    with pytest.raises(ConfigError, match="query_loss_fn"):
        train(tmp_path, ReturnsLoss(), xy_data(), cb)


def test_capture_every_other_step_and_score_after_an_uncaptured_batch(tmp_path):
    """``capture_every_n_steps=2`` over 4 batches: steps 0 and 2 are stored (exactly); the last batch
    (step 3) is not captured, and the epoch-end query pass must still see the taps."""
    cb = make_callback(tmp_path, query_loader=xy_data(8, seed=1), capture_every_n_steps=2)
    module = MLPModule()
    _, rec = train(tmp_path, module, xy_data(n=32), cb)
    _, rows = stored_rows(cb.store.path)
    assert sorted({step for step, _ in rows}) == [0, 2]
    check_exact(cb, rec, MLPModule, mlp_loss, tol=1e-6, steps={0, 2})
    # the epoch-end scores: the 16 stored rows against exact query gradients at the final weights
    want = _hand_scores_of(cb, module, xy_data(8, seed=1))[:4]  # num_queries=4
    stored = sorted(set(torch.cat([b[-1] for _, _, b in rec.seen[0::2]]).tolist()))
    ids, values = cb.last_result.data_value_ids, cb.last_result.data_value.double()
    assert ids.tolist() == stored
    torch.testing.assert_close(values, want.sum(0)[ids], rtol=1e-4, atol=1e-6)
