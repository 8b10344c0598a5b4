"""Layer taps: compressed per-example gradients of a model's linear layers, without changing it.

:class:`LayerTaps` attaches a forward hook to each chosen ``nn.Linear`` / transformers ``Conv1D``.
The hook keeps the layer input ``x`` and registers a tensor hook on the output, which receives
``δ = ∂loss/∂y`` during backward and compresses ``Σ_t δ_t x_t^T`` for every example through the
layer's plan (:func:`grass_callback.ops.factgrass`). Nothing else is touched: the model's
outputs, ``state_dict`` keys and ``param.grad`` are the same with and without taps.

Two ways to get gradients:

* riding on a backward the user runs (training): ``loss.backward()`` then :meth:`LayerTaps.collect`;
* :meth:`LayerTaps.gradients` inside :meth:`LayerTaps.recording` (queries): ``torch.autograd.grad``
  on the tapped outputs only, so no ``param.grad`` and no weight-gradient product is computed.

Shapes: inputs ``[B, ..., d_in]`` with the batch first; extra dimensions are tokens.

How the taps behave with common model set-ups (each checked against exact per-example gradients
in ``tests/test_loop_variants.py``):

* ``torch.compile``: the hooks sit on the original layers inside the ``OptimizedModule`` and still
  fire. Layer names leave out wrapper components (``_orig_mod``, ``_checkpoint_wrapped_module``,
  ``_fsdp_wrapped_module``), so plans and stores are the same with and without compiling. Dynamo
  cannot trace the tensor-hook registration, so it graph-breaks once per tapped layer (the code
  between taps stays compiled).
* Activation checkpointing: each layer is counted once, reentrant or not. Query gradients through
  reentrant checkpointing (which ``torch.autograd.grad`` refuses) use a full backward with every
  ``param.grad`` saved and put back.
* Tied weights (GPT-2's ``lm_head`` sharing ``wte``): only the ``nn.Linear`` use is tapped; the
  rows are the gradient through ``lm_head``, not the embedding's share of the shared parameter.
* Frozen layers (``weight.requires_grad`` False, e.g. a LoRA ``base``) are skipped with one
  warning; trainable adapters inside the same wrapper are tapped.
* Padding: the rows are the gradient of the loss as written, so padded positions count exactly as
  much as the loss lets them (nothing when it ignores them: ``ignore_index``, a masked mean, an
  attention mask). There is no separate token mask: zeroing padded inputs in the taps would give
  the gradient of no loss at all when the loss does count them (``tests/test_capture.py``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
import warnings
from functools import partial
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from grass_callback.errors import CaptureError
from grass_callback.projection import FactGraSSPlan, LayerShape, Plan, make_plan

__all__ = ["LayerTaps", "find_layers", "layer_shape", "per_example_scale", "is_tappable", "clean_layer_name"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: only nn.Linear is tapped
        return None
    return Conv1D


def is_tappable(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (weight stored ``[d_in, d_out]``)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def layer_shape(module: nn.Module) -> LayerShape:
    """The gradient shape of a tappable layer (``Conv1D`` always has a bias)."""
    if isinstance(module, nn.Linear):
        return LayerShape(module.in_features, module.out_features, module.bias is not None)
    if hasattr(module, "nx") and hasattr(module, "nf"):  # Conv1D's own sizes: its weight may be a flat FSDP shard
        return LayerShape(int(module.nx), int(module.nf), getattr(module, "bias", None) is not None)
    d_in, d_out = module.weight.shape  # Conv1D of a transformers without nx
    return LayerShape(int(d_in), int(d_out), getattr(module, "bias", None) is not None)


#: Path components added by wrappers that do not change the layer: ``torch.compile``'s
#: ``OptimizedModule``, ``checkpoint_wrapper`` and FSDP (the names ``state_dict`` strips too).
_WRAPPER_COMPONENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def clean_layer_name(name: str) -> str:
    """A layer's name without wrapper components, so plans (seeded by name) and stores are the
    same whether or not the model was wrapped: ``"net._orig_mod.0"`` -> ``"net.0"``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


def find_layers(model: nn.Module, include: Sequence[str] | str | None = None,
                exclude: Sequence[str] | str | None = None) -> tuple[dict[str, nn.Module], list[str]]:
    """Tappable layers whose names match ``include`` globs and no ``exclude`` glob.

    Returns ``(layers, frozen)``: frozen layers (weight without ``requires_grad``) are skipped and
    named in the second list. Names leave out wrapper components (see :func:`clean_layer_name`):
    a model whose submodule went through ``torch.compile`` has the same layer names, plans and
    store as the plain model, and ``include``/``exclude`` match those names.

    Raises:
        CaptureError: nothing matches; the message lists the layer names that exist.
    """
    include = [include] if isinstance(include, str) else list(include or ["*"])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
    raw = [(name, m) for name, m in model.named_modules() if name and is_tappable(m)]
    clean = [clean_layer_name(name) for name, _ in raw]
    if len(set(clean)) != len(clean):  # two layers differ only by a wrapper: keep the full names
        clean = [name for name, _ in raw]
    candidates = {name: m for name, (_, m) in zip(clean, raw)}
    if not candidates:
        names = [n for n, _ in model.named_modules() if n][:20]
        raise CaptureError(
            f"{type(model).__name__} has no nn.Linear or transformers Conv1D layer to tap (modules: "
            f"{names}); attribution needs at least one linear layer.")
    chosen, frozen = {}, []
    for name, module in candidates.items():
        if not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if not module.weight.requires_grad:
            frozen.append(name)
            continue
        chosen[name] = module
    if not chosen:
        raise CaptureError(
            f"no trainable linear layer matches include={include} exclude={exclude}"
            + (f" (frozen, skipped: {frozen})" if frozen else "")
            + f"; the linear layers are: {list(candidates)[:40]}")
    return chosen, frozen


def per_example_scale(batch_size: int, reduction: str = "mean", token_counts: Tensor | None = None,
                      accumulate_grad_batches: int = 1, grad_scale: float | Tensor | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """The factor turning hook gradients of the batch loss into each example's own gradient.

    Hooks see ``δ`` of the batch objective. With ``reduction="mean"`` (loss averaged over the
    batch) each example's share was divided by ``B``; with ``"sum"`` it was not; with
    ``"token_mean"`` (averaged over all ``N`` valid tokens of the batch, the example's own loss
    averaged over its ``n_i`` tokens) it was multiplied by ``n_i / N``. Lightning divides the loss
    by ``accumulate_grad_batches``, and fp16 AMP multiplies it by the GradScaler scale.

    ``grad_scale`` may be the GradScaler's scale tensor (``scaler._scale``): it is then used where
    it lives, without reading it back to the host (no sync on a GPU), and not validated. The
    result is computed on ``device`` (default: where ``token_counts`` or a tensor ``grad_scale``
    lives, else the CPU), in float64, then rounded to float32.

    Returns:
        float32 ``[B]``: multiply the hook's compressed gradients by it.
    """
    if batch_size < 1:
        raise CaptureError(f"batch_size must be positive, got {batch_size}.")
    if device is None:
        device = token_counts.device if isinstance(token_counts, Tensor) else \
            grad_scale.device if isinstance(grad_scale, Tensor) else "cpu"
    device = torch.device(device)
    wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    if reduction == "mean":
        scale = torch.full((batch_size,), float(batch_size), dtype=wide, device=device)
    elif reduction == "sum":
        scale = torch.ones(batch_size, dtype=wide, device=device)
    elif reduction == "token_mean":
        if token_counts is None or token_counts.numel() != batch_size:
            raise CaptureError("reduction='token_mean' needs token_counts [B]: the number of tokens "
                               "that count in each example's loss (e.g. attention_mask.sum(1)).")
        counts = token_counts.detach().to(device, wide).reshape(-1)
        scale = counts.sum() / counts.clamp_min(1)
    else:
        raise CaptureError(f"reduction must be 'mean', 'sum' or 'token_mean', got {reduction!r}.")
    scale = scale * int(accumulate_grad_batches)
    if isinstance(grad_scale, Tensor):
        scale = scale / grad_scale.detach().to(device, wide)  # a GradScaler's scale is positive
    elif grad_scale is not None:
        gs = float(grad_scale)
        if not gs > 0:
            raise CaptureError(f"grad_scale must be positive, got {gs}.")
        scale = scale / gs
    return scale.to(torch.float32)


class LayerTaps:
    """Compressed per-example gradients of a model's linear layers.

    Args:
        model: any ``nn.Module``; its tappable layers are found by name.
        plans: ready-made plans by layer name (e.g. loaded from a store); built when ``None``.
        include, exclude: glob patterns on layer names (default: every linear layer).
        k, seed, plan_kind, plan_options: how plans are built (``plan_kind="factgrass"``).
        impl: the op implementation (``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"``).

    Raises:
        CaptureError: no tappable layer, nothing matching, or plans that do not fit the layers.

    Example::

        taps = LayerTaps(model, k=256)
        with taps:
            taps.set_scale(per_example_scale(len(x)))
            loss_fn(model(x), y).backward()
            grads = taps.collect()          # {layer name: [B, k]}
    """

    def __init__(self, model: nn.Module, plans: Mapping[str, Plan] | None = None, *,
                 include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
                 k: int = 1024, seed: int = 0, plan_kind: str = "factgrass",
                 plan_options: Mapping[str, Any] | None = None, impl: str = "auto") -> None:
        self.model = model
        self.layers, self.frozen = find_layers(model, include, exclude)
        if self.frozen:
            warnings.warn(f"grass_callback: skipping frozen linear layers {self.frozen}.", stacklevel=2)
        if plans is None:
            plans = {name: make_plan(plan_kind, layer_shape(m), k=k, seed=seed, name=name,
                                     **dict(plan_options or {})) for name, m in self.layers.items()}
        else:
            missing = [n for n in self.layers if n not in plans]
            if missing:
                raise CaptureError(f"no plan for layers {missing}; the plans cover {list(plans)}.")
            for name, m in self.layers.items():
                if getattr(plans[name], "shape", None) != layer_shape(m):
                    raise CaptureError(f"the plan for {name!r} is for {plans[name].shape}, the layer is "
                                       f"{layer_shape(m)}: the plans belong to another model.")
        self.plans = {name: plans[name] for name in self.layers}
        self.impl = impl
        self._handles: list[Any] = []
        self._acc: dict[str, Tensor] = {}
        self._records: list[tuple[str, Tensor, Tensor]] = []
        self._recording = False
        self._enabled = True
        self._scale: Tensor | float | None = None
        self._compute_seconds = 0.0
        self._skipped: set[str] = set()
        # per layer: whether its inputs had a token axis ([B, T, d]) when it was first compressed
        self.token_axis: dict[str, bool] = {}

    # ------------------------------------------------------------------ life cycle

    def plan_for(self, name: str) -> Plan:
        """The plan that compresses layer ``name``'s inputs: a FactGraSS plan's one-token plan once
        the layer has been seen with inputs without a token axis (:meth:`FactGraSSPlan.input_plan`),
        else the layer's plan."""
        plan = self.plans[name]
        if isinstance(plan, FactGraSSPlan) and name in self.token_axis:
            return plan.input_plan(self.token_axis[name])
        return plan

    @property
    def layer_dims(self) -> dict[str, int]:
        """Output size ``k`` of each tapped layer, in tap order."""
        return {name: plan.k for name, plan in self.plans.items()}

    @property
    def skipped(self) -> list[str]:
        """Layers no longer tapped (see :meth:`skip`), in tap order."""
        return [name for name in self.plans if name in self._skipped]

    def skip(self, names: Sequence[str]) -> None:
        """Stop tapping ``names`` (e.g. layers found to get no gradient): their hooks do nothing
        from the next forward on and :meth:`collect` gives them zero rows, at no compute."""
        unknown = [n for n in names if n not in self.plans]
        if unknown:
            raise CaptureError(f"cannot skip {unknown}: not tapped layers ({list(self.plans)}).")
        self._skipped.update(names)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "LayerTaps":
        if not self._handles:
            self._handles = [m.register_forward_hook(partial(self._forward_hook, name))
                             for name, m in self.layers.items()]
        return self

    def remove(self) -> None:
        """Detach every hook and drop what was buffered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._acc, self._records = {}, []

    def __enter__(self) -> "LayerTaps":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def enabled(self) -> bool:
        """Whether forward/backward passes feed the taps (see also :meth:`paused`)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward/backward passes inside do not feed the taps."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Forwards inside record tapped outputs for :meth:`gradients` instead of hooking backward.

        Recording is an explicit request: it works even while the taps are switched off for
        training batches (``_enabled`` False, e.g. between captured steps); only :meth:`paused`
        inside it turns recording off.
        """
        previous, self._recording = self._recording, True
        enabled, self._enabled = self._enabled, True
        self._records = []
        try:
            yield
        finally:
            self._recording = previous
            self._enabled = enabled
            self._records = []

    # ------------------------------------------------------------------ per-batch settings

    def set_scale(self, scale: Tensor | float | None) -> None:
        """Per-example factors ``[B]`` applied to the next gradients (see :func:`per_example_scale`)."""
        self._scale = scale

    # ------------------------------------------------------------------ hooks

    def _forward_hook(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not self._enabled or not torch.is_grad_enabled() or name in self._skipped:
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return  # e.g. the no-grad first pass of reentrant activation checkpointing
        x = inputs[0].detach()
        if self._recording:
            self._records.append((name, x, output))
        else:
            output.register_hook(partial(self._on_output_grad, name, x))

    def _on_output_grad(self, name: str, x: Tensor, grad: Tensor) -> None:
        if self._enabled:
            self._add(name, x, grad)

    def pop_compute_seconds(self) -> float:
        """Seconds spent compressing in hooks since the last call."""
        seconds, self._compute_seconds = self._compute_seconds, 0.0
        return seconds

    def _add(self, name: str, x: Tensor, grad: Tensor) -> None:
        start = time.perf_counter()
        plan = self.plans[name]
        if isinstance(plan, FactGraSSPlan):  # inputs without a token axis get the plan made for them
            token_axis = x.dim() > 2
            first = self.token_axis.setdefault(name, token_axis)
            if first != token_axis and plan.input_plan(False) is not plan:
                raise CaptureError(
                    f"layer {name!r} was first seen with inputs {'with' if first else 'without'} a token axis "
                    f"and now gets {tuple(x.shape)}: its rows would be compressed by two plans. Feed it one "
                    "kind of input, or keep the masks for both with plan_options={'one_token': False}.")
            plan = plan.input_plan(token_axis=x.dim() > 2)
        B = x.shape[0]
        x3 = x.reshape(B, -1, x.shape[-1])
        g3 = grad.detach().reshape(B, -1, grad.shape[-1])
        if x3.dtype != g3.dtype:  # autocast: float32 inputs, half-precision output gradients
            x3, g3 = x3.float(), g3.float()
        out = plan.compress(x3, g3, scale=self._scale, **({"impl": self.impl} if isinstance(plan, FactGraSSPlan) else {}))
        if name in self._acc:
            if self._acc[name].shape != out.shape:
                raise CaptureError(f"layer {name!r} saw batches of different sizes in one step "
                                   f"({self._acc[name].shape[0]} and {out.shape[0]}).")
            self._acc[name] = self._acc[name] + out  # shared/tied layer: contributions add up
        else:
            self._acc[name] = out
        self._compute_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ results

    def clear(self) -> None:
        """Drop the gradients buffered since the last :meth:`collect` (e.g. at a new batch, so a
        backward pass whose rows were never collected cannot leak into the next batch's rows)."""
        self._acc = {}

    def collect(self) -> dict[str, Tensor] | None:
        """The compressed gradients since the last call (``{layer: [B, k]}``), then reset.

        Layers that got no gradient (unused in this pass) come back as zeros. ``None`` when no
        tapped layer saw a gradient at all.
        """
        acc, self._acc = self._acc, {}
        if not acc:
            return None
        first = next(iter(acc.values()))
        return {name: acc[name] if name in acc else first.new_zeros(first.shape[0], plan.k)
                for name, plan in self.plans.items()}

    def gradients(self, loss: Tensor, retain_graph: bool = False) -> dict[str, Tensor]:
        """Compressed gradients of ``loss`` for the forward run inside :meth:`recording`.

        Uses ``torch.autograd.grad`` on the tapped outputs only: ``param.grad`` is untouched and
        no weight gradient is formed. A graph with reentrant activation checkpointing
        (``checkpoint(..., use_reentrant=True)``) cannot be differentiated that way (its layers
        run under ``no_grad`` in the forward and are only recomputed in backward): then a full
        ``loss.backward()`` is run instead, with every parameter's ``.grad`` saved before and put
        back after, so ``param.grad`` is still unchanged.

        Raises:
            CaptureError: nothing was recorded (no forward inside ``recording()``, or the forward
                ran under ``torch.no_grad``), or ``loss`` is not a scalar with a graph.
        """
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise CaptureError("gradients(loss) needs a scalar loss tensor.")
        reentrant = loss.requires_grad and _has_reentrant_checkpoint(loss)
        if not self._records and not reentrant:
            raise CaptureError(
                "no tapped layer was recorded: run the model's forward inside `with taps.recording():` "
                "with gradients enabled (not under torch.no_grad / inference_mode), then call "
                "gradients(loss)." + ("" if torch.is_grad_enabled() else
                                      " Gradients are disabled here: wrap the forward and this call in "
                                      "`with torch.enable_grad():` (and `torch.inference_mode(False)`)."))
        if not loss.requires_grad:
            raise CaptureError("gradients(loss) needs a scalar loss that requires grad (it has no graph: "
                               "was the forward run under torch.no_grad?).")
        records, self._records = self._records, []
        self._acc = {}
        if reentrant:
            self._backward_keeping_param_grads(loss, records, retain_graph)
        else:
            grads = torch.autograd.grad(loss, [r[2] for r in records], allow_unused=True,
                                        retain_graph=retain_graph)
            for (name, x, _), grad in zip(records, grads):
                if grad is not None:
                    self._add(name, x, grad)
        out = self.collect()
        if out is None:
            raise CaptureError("the loss does not depend on any tapped layer.")
        return out

    def _backward_keeping_param_grads(self, loss: Tensor, records: list, retain_graph: bool) -> None:
        """``loss.backward()`` feeding the taps through tensor hooks; ``param.grad`` restored after."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        handles = [out.register_hook(partial(self._on_output_grad, name, x)) for name, x, out in records]
        previous, self._recording = self._recording, False  # recomputed forwards hook their outputs
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            self._recording = previous
            for handle in handles:
                handle.remove()
            for p, g in zip(params, saved):
                p.grad = g


def _has_reentrant_checkpoint(loss: Tensor) -> bool:
    """Whether ``loss``'s graph holds a reentrant ``torch.utils.checkpoint`` segment."""
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False
