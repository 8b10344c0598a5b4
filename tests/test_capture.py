"""Layer taps against exact per-example gradients from plain autograd (float64, one at a time)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from grass_callback.capture import LayerTaps, find_layers, layer_shape, per_example_scale
from grass_callback.errors import CaptureError


def exact_compressed(model, taps, loss_fn, batches):
    """Project each example's own weight(+bias) gradient, computed alone, with the taps' plans."""
    rows = {name: [] for name in taps.plans}
    with taps.paused():
        for batch in batches:
            model.zero_grad()
            loss_fn(model, batch).backward()
            for name, module in taps.layers.items():
                shape = layer_shape(module)
                w = module.weight.grad if isinstance(module, nn.Linear) else module.weight.grad.T
                g = torch.cat([w, module.bias.grad[:, None]], 1) if shape.bias else w
                rows[name].append(taps.plan_for(name).project_gradient(g[None].double()))
    model.zero_grad()
    return {name: torch.cat(r) for name, r in rows.items()}


def assert_rel_close(got, want, tol=1e-8):
    assert got.keys() == want.keys()
    for name in want:
        rel = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-300)
        assert rel <= tol, (name, rel.item())


class MLP(nn.Module):
    def __init__(self, bias=True, tied=False):
        super().__init__()
        self.fc1 = nn.Linear(10, 16, bias=bias)
        self.fc2 = nn.Linear(16, 16, bias=bias)
        self.head = nn.Linear(16, 3, bias=bias)
        self.tied = tied

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        if self.tied:  # the same layer twice: its gradient is the sum of both uses
            h = torch.tanh(self.fc2(h))
        return self.head(h)


def ce_mean(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="mean") if out.dim() == 2 \
        else F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum") / x.shape[0]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [None, 5])
@pytest.mark.parametrize("tied", [False, True])
def test_linear_taps_equal_exact_per_example_gradients(bias, T, tied):
    torch.manual_seed(0)
    model = MLP(bias=bias, tied=tied).double()
    B = 6
    x = torch.randn(B, 10, dtype=torch.float64) if T is None else torch.randn(B, T, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (B,) if T is None else (B, T))
    taps = LayerTaps(model, k=32, impl="auto")
    with taps:
        taps.set_scale(per_example_scale(B, "mean"))
        ce_mean(model, (x, y)).backward()
        got = taps.collect()
    want = exact_compressed(model, taps, ce_mean, [(x[i:i + 1], y[i:i + 1]) for i in range(B)])
    assert_rel_close(got, want)


@pytest.mark.parametrize("T", [None, 5])
def test_one_token_layers_keep_their_whole_gradient_with_two_nonzeros_and_token_layers_the_masks(T):
    """A layer whose input has no token axis (``[B, d]``, an MLP's) is compressed by its whole
    gradient through an SJLT with 2 non-zeros per coordinate, drawn from the layer's (seed, name);
    with a token axis (``[B, T, d]``) by the default masks. The reference plans are built here
    from their sizes, not through ``input_plan``."""
    from grass_callback.projection import FactGraSSPlan

    torch.manual_seed(0)
    model = MLP(bias=True).double()
    B, k = 6, 32
    x = torch.randn(B, 10, dtype=torch.float64) if T is None else torch.randn(B, T, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (B,) if T is None else (B, T))
    taps = LayerTaps(model, k=k, seed=3)
    with taps:
        taps.set_scale(per_example_scale(B, "mean"))
        ce_mean(model, (x, y)).backward()
        got = taps.collect()
    assert taps.token_axis == {name: T is not None for name in taps.plans}
    refs, masked = {}, 0
    for name, module in taps.layers.items():
        base = taps.plans[name]
        if T is None and layer_shape(module).numel > k:
            refs[name] = FactGraSSPlan(module.in_features, module.out_features, True, k=k, k_in=module.in_features + 1,
                                       k_out=module.out_features, c=2, seed=3, name=name, mask_run=1, one_token=False)
            masked += base.k_prime < refs[name].k_prime  # the default masks would keep less of it
        else:
            refs[name] = base
    assert masked >= (2 if T is None else 0)  # fc1 and fc2: the case under test
    rows = {name: [] for name in taps.plans}
    for i in range(B):
        model.zero_grad()
        ce_mean(model, (x[i:i + 1], y[i:i + 1])).backward()
        for name, module in taps.layers.items():
            g = torch.cat([module.weight.grad, module.bias.grad[:, None]], 1)
            rows[name].append(refs[name].project_gradient(g[None]))
    assert_rel_close(got, {name: torch.cat(r) for name, r in rows.items()})


def test_a_layer_fed_inputs_with_and_without_a_token_axis_is_a_clear_error():
    """Two input ranks would put one layer's rows in two compressed spaces: the taps refuse it,
    and name the option that keeps one plan for both."""
    torch.manual_seed(0)
    model = MLP(bias=True)
    taps = LayerTaps(model, k=32)
    with taps:
        F.cross_entropy(model(torch.randn(4, 10)), torch.randint(0, 3, (4,))).backward()
        with pytest.raises(CaptureError, match=r"first seen with inputs without a token axis.*one_token"):
            model(torch.randn(4, 5, 10)).sum().backward()
    same = LayerTaps(model, k=32, plan_options={"one_token": False})
    with same:  # one plan for both: no question which
        F.cross_entropy(model(torch.randn(4, 10)), torch.randint(0, 3, (4,))).backward()
        model(torch.randn(4, 5, 10)).sum().backward()


def test_conv1d_taps_and_padding_equal_exact():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    model = nn.Sequential(Conv1D(12, 8), nn.Tanh(), Conv1D(4, 12)).double()
    B, T = 4, 7
    lengths = torch.tensor([7, 3, 5, 1])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    x = torch.randn(B, T, 8, dtype=torch.float64)

    def loss_fn(model, batch):
        xb, mb = batch
        return (model(xb).pow(2).sum(-1) * mb).sum() / xb.shape[0]

    taps = LayerTaps(model, k=16)
    with taps:
        taps.set_scale(per_example_scale(B, "mean"))
        loss_fn(model, (x * 1.0, mask)).backward()
        got = taps.collect()
    # each example alone, without its padding
    want = exact_compressed(model, taps, loss_fn,
                            [(x[i:i + 1, :lengths[i]], mask[i:i + 1, :lengths[i]]) for i in range(B)])
    assert_rel_close(got, want)


def test_padding_the_loss_counts_is_in_the_rows():
    """A loss that does not mask padding trains on the padded positions too: the rows must hold
    exactly that gradient (the taps follow the loss; they have no token mask of their own)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    B, T = 4, 6
    lengths = torch.tensor([6, 2, 4, 1])
    x = torch.randn(B, T, 8, dtype=torch.float64)
    x[torch.arange(T)[None] >= lengths[:, None]] = 0.5  # a pad "embedding": not zero, so it counts

    def loss_fn(model, batch):  # per token, summed over every position, padding included
        return model(batch).pow(2).sum() / batch.shape[0]

    taps = LayerTaps(model, k=16)
    with taps:
        taps.set_scale(per_example_scale(B, "mean"))
        loss_fn(model, x).backward()
        got = taps.collect()
    with_padding = exact_compressed(model, taps, loss_fn, [x[i:i + 1] for i in range(B)])
    assert_rel_close(got, with_padding)
    without = exact_compressed(model, taps, loss_fn, [x[i:i + 1, :lengths[i]] for i in range(B)])
    assert all((got[n] - without[n]).norm() > 1e-3 * without[n].norm() for n in got)


def test_token_mean_scale_equals_per_example_token_mean():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5)).double()
    B, T = 3, 4
    x = torch.randn(B, T, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (B, T))
    y[0, 2:] = -100  # ignored tokens: example 0 counts 2 tokens, the others 4
    counts = (y != -100).sum(1)

    def loss_fn(model, batch):  # averaged over every valid token of the batch (HF style)
        xb, yb = batch
        return F.cross_entropy(model(xb).reshape(-1, 5), yb.reshape(-1), ignore_index=-100)

    taps = LayerTaps(model, k=16)
    with taps:
        taps.set_scale(per_example_scale(B, "token_mean", token_counts=counts))
        loss_fn(model, (x, y)).backward()
        got = taps.collect()
    want = exact_compressed(model, taps, loss_fn, [(x[i:i + 1], y[i:i + 1]) for i in range(B)])
    assert_rel_close(got, want)


def _lm_loss(model, batch):
    """Summed over examples (each example's loss: its tokens summed).

    Summed, not averaged: Llama's RMSNorm runs in float32 inside a float64 model, so a 1/B factor
    would round the hook gradients at float32 precision before the taps see them.
    """
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_transformers_equal_exact(arch):
    import transformers

    torch.manual_seed(3)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                      tie_word_embeddings=False, attn_pdrop=0, embd_pdrop=0, resid_pdrop=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                                       max_position_embeddings=16)
        model = transformers.LlamaForCausalLM(cfg)
    model = model.double().eval()  # eval: no dropout, so one example alone equals its batch row
    B, T = 3, 9
    ids = torch.randint(0, 50, (B, T))
    lengths = [9, 6, 4]
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    taps = LayerTaps(model, k=64)
    kinds = {type(m).__name__ for m in taps.layers.values()}
    assert ("Conv1D" in kinds) == (arch == "gpt2") and len(taps.layers) >= 7
    with taps:
        taps.set_scale(per_example_scale(B, "sum"))
        _lm_loss(model, (ids, mask)).backward()
        got = taps.collect()
    want = exact_compressed(model, taps, _lm_loss,
                            [(ids[i:i + 1, :n], mask[i:i + 1, :n]) for i, n in enumerate(lengths)])
    assert_rel_close(got, want)


class CheckpointedMLP(MLP):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        h = checkpoint(lambda t: torch.tanh(self.fc2(torch.tanh(self.fc1(t)))), x, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_layer_once(reentrant):
    torch.manual_seed(4)
    model = CheckpointedMLP(reentrant).double()
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=reentrant)
    y = torch.randint(0, 3, (5,))
    taps = LayerTaps(model, k=32)
    with taps:
        taps.set_scale(per_example_scale(5))
        ce_mean(model, (x, y)).backward()
        got = taps.collect()
    want = exact_compressed(model, taps, ce_mean, [(x[i:i + 1], y[i:i + 1]) for i in range(5)])
    assert_rel_close(got, want)


def test_taps_never_change_the_model():
    torch.manual_seed(5)
    model = MLP().double()
    x, y = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 3, (4,))
    keys = list(model.state_dict())
    out0 = model(x)
    ce_mean(model, (x, y)).backward()
    grads0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with LayerTaps(model, k=32) as taps:
        out1 = model(x)
        ce_mean(model, (x, y)).backward()
        assert taps.collect() is not None
        assert list(model.state_dict()) == keys
    assert torch.equal(out0, out1)
    for g0, p in zip(grads0, model.parameters()):
        assert torch.equal(g0, p.grad)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_query_gradients_leave_param_grad_untouched_and_match_backward():
    torch.manual_seed(6)
    model = MLP().double()
    x, y = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 3, (4,))
    taps = LayerTaps(model, k=32)
    with taps:
        with taps.recording():
            taps.set_scale(per_example_scale(4))
            q = taps.gradients(ce_mean(model, (x, y)))
        assert all(p.grad is None for p in model.parameters())
        ce_mean(model, (x, y)).backward()
        b = taps.collect()
    assert_rel_close(q, b, tol=1e-12)
    with taps, taps.recording():
        with torch.no_grad():
            loss = ce_mean(model, (x, y))
        with pytest.raises(CaptureError, match="torch.no_grad"):
            taps.gradients(loss)


def test_layer_selection_and_errors():
    model = MLP()
    layers, _ = find_layers(model, include=["fc*"], exclude="fc2")
    assert list(layers) == ["fc1"]
    with pytest.raises(CaptureError, match=r"the linear layers are: \['fc1', 'fc2', 'head'\]"):
        find_layers(model, include="decoder.*")
    with pytest.raises(CaptureError, match="no nn.Linear"):
        find_layers(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()))
    model.fc1.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"):
        taps = LayerTaps(model, k=16)
    assert "fc1" not in taps.plans and taps.frozen == ["fc1"]
    other = LayerTaps(MLP(), k=16).plans
    other["fc2"] = LayerTaps(nn.Sequential(nn.Linear(3, 4)), k=16).plans["0"]
    with pytest.raises(CaptureError, match="another model"):
        LayerTaps(MLP(), plans=other)


def test_per_example_scale_cases():
    torch.testing.assert_close(per_example_scale(4, "mean"), torch.full((4,), 4.0))
    torch.testing.assert_close(per_example_scale(4, "sum", accumulate_grad_batches=3), torch.full((4,), 3.0))
    torch.testing.assert_close(per_example_scale(2, "mean", grad_scale=65536.0), torch.full((2,), 2 / 65536))
    torch.testing.assert_close(per_example_scale(3, "token_mean", token_counts=torch.tensor([1, 2, 5])),
                               torch.tensor([8.0, 4.0, 1.6]))
    with pytest.raises(CaptureError, match="token_counts"):
        per_example_scale(3, "token_mean")
    with pytest.raises(CaptureError, match="reduction"):
        per_example_scale(3, "avg")


def test_accumulation_and_grad_scaler_scales_recover_the_gradient():
    """A loss divided by the accumulation count and multiplied by a loss scale gives the same rows."""
    torch.manual_seed(7)
    model = MLP().double()
    x, y = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 3, (4,))
    taps = LayerTaps(model, k=32)
    with taps:
        taps.set_scale(per_example_scale(4))
        ce_mean(model, (x, y)).backward()
        plain = taps.collect()
        taps.set_scale(per_example_scale(4, accumulate_grad_batches=4, grad_scale=1024.0))
        (ce_mean(model, (x, y)) / 4 * 1024.0).backward()
        scaled = taps.collect()
    assert_rel_close(scaled, plain, tol=1e-12)
