"""Selective masks: learn which factor coordinates FactGraSS keeps (the paper's learned mask).

A random FactGraSS mask keeps ``k_in`` input and ``k_out`` output coordinates of a linear layer
uniformly at random. A *selective* mask learns them from a sample of per-example gradient
factors so that inner products of the masked gradients keep the ranking of the full ones.

For a layer with inputs ``x_{i,t}`` (bias column appended) and output gradients ``δ_{i,t}``, soft
gates ``a = sigmoid(α)`` on the input coordinates and ``b = sigmoid(β)`` on the output
coordinates multiply the gradient, ``Ĝ = diag(b) G diag(a)``, so the gated inner product is::

    <Ĝ_i, Ĝ_j> = Σ_{t,s} (x_{i,t}^T diag(a²) x_{j,s}) (δ_{i,t}^T diag(b²) δ_{j,s})

(with ``a = b = 1`` it is the full ``<G_i, G_j>``; with 0/1 gates it is the masked gradients'
inner product), computed from the factors without forming ``G``. This is the GraSS paper's
selective-mask objective (correlation of gated vs full gradient dot products per query, L1 on
the gates) applied to the two factors of a linear layer. The sample is split into
"query" rows and "training" columns; the objective maximized is the mean over rows of the
Pearson correlation between the gated and the full inner products, minus an L1 penalty
``l1 · mean(gates)`` that pushes unimportant gates to zero. After ``steps`` of Adam the
``k_in`` / ``k_out`` coordinates with the largest logits are kept (sorted), giving the
``in_idx`` / ``out_idx`` of a :class:`~grass_callback.projection.SelectiveFactGraSSPlan`.

:func:`learn_flat_mask` does the same for one flat gradient vector (a selective MASK).

Example::

    factors = collect_factors(model, batches, loss_fn, max_examples=512)  # {layer: (x, δ)}
    plans = selective_plans(factors, shapes, k=1024, seed=0)            # {layer: plan}
    taps = LayerTaps(model, plans=plans)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from grass_callback.errors import GraSSError
from grass_callback.projection import FactGraSSPlan, LayerShape, SelectiveFactGraSSPlan, derive_generator

__all__ = [
    "SelectiveMaskError",
    "FactorMasks",
    "gated_inner_products",
    "row_correlation",
    "mask_correlation",
    "learn_factor_masks",
    "learn_flat_mask",
    "selective_factgrass_plan",
    "selective_plans",
    "collect_factors",
]


class SelectiveMaskError(GraSSError, ValueError):
    """A selective mask could not be learned from the given sample."""


# ----------------------------------------------------------------------------- pure pieces


def _factors(x: Tensor, grad_out: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """``[N, T, d_in_eff]`` and ``[N, T, d_out]`` float64, bias column appended to ``x``."""
    x3 = (x.unsqueeze(1) if x.dim() == 2 else x).detach().to(torch.float64)
    g3 = (grad_out.unsqueeze(1) if grad_out.dim() == 2 else grad_out).detach().to(torch.float64)
    if x3.dim() != 3 or g3.dim() != 3 or x3.shape[:2] != g3.shape[:2]:
        raise SelectiveMaskError(f"x and grad_out must be [N, (T,) d] with one N and T, got {tuple(x.shape)} "
                                 f"and {tuple(grad_out.shape)}.")
    if bias:
        x3 = torch.cat([x3, x3.new_ones(*x3.shape[:2], 1)], dim=-1)
    return x3, g3


def gated_inner_products(x_rows: Tensor, d_rows: Tensor, x_cols: Tensor, d_cols: Tensor,
                         in_weight: Tensor, out_weight: Tensor) -> Tensor:
    """``[r, c]`` gated gradient inner products from factors (see the module docstring).

    ``x_*``: ``[., T, d_in_eff]``; ``d_*``: ``[., T, d_out]``; weights ``[d_in_eff]``, ``[d_out]``
    multiply the inner products coordinate-wise (gates squared for gated gradients).
    Memory ``O(r c T^2)``.
    """
    r, t = x_rows.shape[:2]
    c, s = x_cols.shape[:2]
    kx = (x_rows * in_weight).reshape(r * t, -1) @ x_cols.reshape(c * s, -1).T
    kd = (d_rows * out_weight).reshape(r * t, -1) @ d_cols.reshape(c * s, -1).T
    return (kx * kd).reshape(r, t, c, s).sum((1, 3))


def row_correlation(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean over rows of the Pearson correlation between ``a[i]`` and ``b[i]`` (``[r, c]`` each)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    num = (a * b).sum(1)
    den = (a.square().sum(1) * b.square().sum(1)).clamp_min(eps).sqrt()
    return (num / den).mean()


def _split(n: int, num_rows: int | None, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    if n < 4:
        raise SelectiveMaskError(f"a selective mask needs a sample of at least 4 examples, got {n}.")
    rows = n // 2 if num_rows is None else int(num_rows)
    if not 2 <= rows <= n - 2:
        raise SelectiveMaskError(f"num_rows must leave >= 2 rows and >= 2 columns of {n}, got {rows}.")
    perm = torch.randperm(n, generator=gen)
    return perm[:rows], perm[rows:]


def _hard(size: int, idx: Tensor) -> Tensor:
    w = torch.zeros(size, dtype=torch.float64)
    w[idx] = 1.0
    return w


def mask_correlation(x: Tensor, grad_out: Tensor, in_idx: Tensor, out_idx: Tensor, *, bias: bool = False,
                     num_rows: int | None = None, seed: int = 0) -> float:
    """Row-wise correlation between masked and full gradient inner products on a sample.

    The score the selective mask optimizes, evaluated for hard masks (``1`` = perfect).
    """
    x3, g3 = _factors(x, grad_out, bias)
    rows, cols = _split(x3.shape[0], num_rows, derive_generator(seed, "", "selective/split"))
    full = gated_inner_products(x3[rows], g3[rows], x3[cols], g3[cols],
                                torch.ones(x3.shape[-1], dtype=torch.float64),
                                torch.ones(g3.shape[-1], dtype=torch.float64))
    masked = gated_inner_products(x3[rows], g3[rows], x3[cols], g3[cols], _hard(x3.shape[-1], in_idx),
                                  _hard(g3.shape[-1], out_idx))
    return float(row_correlation(masked, full))


# ----------------------------------------------------------------------------- learning


@dataclass
class FactorMasks:
    """Learned masks of one layer: kept indices (sorted int64), final logits, objective history."""

    in_idx: Tensor
    out_idx: Tensor
    in_logits: Tensor
    out_logits: Tensor
    history: list[float] = field(default_factory=list)  # soft correlation per logged step
    correlation: float = float("nan")  # hard-mask correlation on the sample


def _top(logits: Tensor, k: int) -> Tensor:
    return torch.topk(logits, k).indices.sort().values


def learn_factor_masks(x: Tensor, grad_out: Tensor, k_in: int, k_out: int, *, bias: bool = False,
                       steps: int = 200, lr: float = 0.1, l1: float = 0.01, num_rows: int | None = None,
                       seed: int = 0) -> FactorMasks:
    """Learn input/output masks of sizes ``k_in`` / ``k_out`` for one linear layer.

    Args:
        x: ``[N, (T,) d_in]`` layer inputs of a sample of training examples.
        grad_out: ``[N, (T,) d_out]`` their per-example output gradients.
        k_in, k_out: mask sizes (``k_in`` counts the bias column when ``bias``).
        bias: append the constant-1 input column (index ``d_in``).
        steps, lr: Adam steps on the logits and its learning rate.
        l1: weight of the sparsity penalty ``mean(sigmoid(logits))`` (both sides).
        num_rows: sample rows used as "queries" (default half); the rest are the columns.
        seed: the sample split.

    Returns:
        :class:`FactorMasks` whose ``in_idx`` / ``out_idx`` feed a ``SelectiveFactGraSSPlan``.
    """
    x3, g3 = _factors(x, grad_out, bias)
    d_in, d_out = x3.shape[-1], g3.shape[-1]
    if not (1 <= k_in <= d_in and 1 <= k_out <= d_out):
        raise SelectiveMaskError(f"mask sizes k_in={k_in}, k_out={k_out} must lie in 1..{d_in} and 1..{d_out}.")
    gen = derive_generator(seed, "", "selective/split")
    rows, cols = _split(x3.shape[0], num_rows, gen)
    xr, dr, xc, dc = x3[rows], g3[rows], x3[cols], g3[cols]
    # scale each side to unit mean square so one learning rate suits every layer
    xs = xr.square().mean().clamp_min(1e-300).sqrt()
    ds = dr.square().mean().clamp_min(1e-300).sqrt()
    xr, xc, dr, dc = xr / xs, xc / xs, dr / ds, dc / ds
    full = gated_inner_products(xr, dr, xc, dc, torch.ones(d_in, dtype=torch.float64),
                                torch.ones(d_out, dtype=torch.float64))
    alpha = torch.zeros(d_in, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(d_out, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([alpha, beta], lr=lr)
    history: list[float] = []
    for step in range(int(steps)):
        a, b = torch.sigmoid(alpha), torch.sigmoid(beta)  # gates on the gradient: both sides of <.,.>
        corr = row_correlation(gated_inner_products(xr, dr, xc, dc, a * a, b * b), full)
        loss = -corr + l1 * 0.5 * (a.mean() + b.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            history.append(float(corr.detach()))
    alpha, beta = alpha.detach(), beta.detach()
    in_idx, out_idx = _top(alpha, k_in), _top(beta, k_out)
    hard = gated_inner_products(xr, dr, xc, dc, _hard(d_in, in_idx), _hard(d_out, out_idx))
    return FactorMasks(in_idx=in_idx, out_idx=out_idx, in_logits=alpha, out_logits=beta, history=history,
                       correlation=float(row_correlation(hard, full)))


def learn_flat_mask(grads: Tensor, k: int, *, steps: int = 200, lr: float = 0.1, l1: float = 0.01,
                    num_rows: int | None = None, seed: int = 0) -> Tensor:
    """Selective MASK of a flat gradient: the ``k`` coordinates (sorted int64) whose gated inner
    products ``Σ_e w_e g_i[e] g_j[e]`` best keep the full ones' row-wise correlation."""
    g = grads.detach().flatten(1).to(torch.float64)
    n, dim = g.shape
    if not 1 <= k <= dim:
        raise SelectiveMaskError(f"mask size k={k} must lie in 1..{dim}.")
    rows, cols = _split(n, num_rows, derive_generator(seed, "", "selective/split"))
    g = g / g.square().mean().clamp_min(1e-300).sqrt()
    gr, gc = g[rows], g[cols]
    full = gr @ gc.T
    logits = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(int(steps)):
        w = torch.sigmoid(logits)
        loss = -row_correlation((gr * w * w) @ gc.T, full) + l1 * w.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _top(logits.detach(), k)


# ----------------------------------------------------------------------------- plans


def selective_factgrass_plan(x: Tensor, grad_out: Tensor, shape: LayerShape, k: int = 1024, *, seed: int = 0,
                             name: str = "", c: int = 1, **learn_options: Any) -> SelectiveFactGraSSPlan:
    """A :class:`SelectiveFactGraSSPlan` with the mask sizes a random ``FactGraSSPlan(k)`` would
    use (``2 sqrt(k)`` a side, clipped), masks learned from the sample ``(x, grad_out)``.

    A layer small enough to be kept whole gets the full masks (nothing to learn).
    """
    ref = FactGraSSPlan(shape.d_in, shape.d_out, shape.bias, k=k, c=c, seed=seed, name=name)
    if ref.k_in == shape.d_in_eff and ref.k_out == shape.d_out:
        in_idx, out_idx = torch.arange(ref.k_in), torch.arange(ref.k_out)
    else:
        masks = learn_factor_masks(x, grad_out, ref.k_in, ref.k_out, bias=shape.bias, seed=seed, **learn_options)
        in_idx, out_idx = masks.in_idx, masks.out_idx
    return SelectiveFactGraSSPlan(shape.d_in, shape.d_out, shape.bias, k=ref.k, in_idx=in_idx, out_idx=out_idx,
                                  c=ref.c, seed=seed, name=name)


def selective_plans(factors: Mapping[str, tuple[Tensor, Tensor]], shapes: Mapping[str, LayerShape], k: int = 1024,
                    *, seed: int = 0, **learn_options: Any) -> dict[str, SelectiveFactGraSSPlan]:
    """One :func:`selective_factgrass_plan` per layer (``factors[name] = (x, grad_out)``)."""
    missing = [n for n in shapes if n not in factors]
    if missing:
        raise SelectiveMaskError(f"no sampled factors for layers {missing}.")
    return {name: selective_factgrass_plan(factors[name][0], factors[name][1], shape, k, seed=seed, name=name,
                                           **learn_options) for name, shape in shapes.items()}


def collect_factors(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor], *,
                    layers: Mapping[str, nn.Module] | None = None, reduction: str = "mean",
                    max_examples: int = 512) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-example factors ``(x [N, T, d_in], δ [N, T, d_out])`` of a sample of training examples.

    Runs ``loss_fn(model, batch)`` (reduced over the batch as ``reduction`` says) on batches
    until ``max_examples`` examples are seen, taking ``δ`` with ``torch.autograd.grad`` on the
    layer outputs (``param.grad`` untouched), scaled to each example's own loss. ``layers``
    defaults to every tappable layer. Factors are kept on the CPU in float32.
    """
    from grass_callback.capture import find_layers, per_example_scale

    if layers is None:
        layers, _ = find_layers(model)
    out: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    seen = 0
    for batch in batches:
        if seen >= max_examples:
            break
        records: list[tuple[str, Tensor, Tensor]] = []
        hooks = [m.register_forward_hook(lambda mod, inp, outp, name=name: records.append((name, inp[0].detach(), outp)))
                 for name, m in layers.items()]
        try:
            with torch.enable_grad():
                loss = loss_fn(model, batch)
        finally:
            for h in hooks:
                h.remove()
        if not records:
            raise SelectiveMaskError("the loss function ran none of the layers with gradients enabled.")
        grads = torch.autograd.grad(loss, [r[2] for r in records], allow_unused=True)
        B = records[0][1].shape[0]
        scale = per_example_scale(B, reduction if reduction != "token_mean" else "sum").to(torch.float32)
        keep = min(B, max_examples - seen)
        per_layer: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for (name, x, _), g in zip(records, grads):
            if g is None:
                continue
            x3 = x.reshape(B, -1, x.shape[-1])[:keep].float().cpu()
            g3 = (g.detach().reshape(B, -1, g.shape[-1])[:keep].float() * scale[:keep, None, None].to(g.device)).cpu()
            per_layer.setdefault(name, []).append((x3, g3))
        for name, uses in per_layer.items():  # a layer used twice: its uses are more tokens
            out[name].append((torch.cat([u[0] for u in uses], 1), torch.cat([u[1] for u in uses], 1)))
        seen += keep
    result = {}
    for name, parts in out.items():
        if parts:
            result[name] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    if not result:
        raise SelectiveMaskError("no layer received a gradient from the sampled batches.")
    return result
