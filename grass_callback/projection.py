"""Seeded compression plans: FactGraSS and the baselines it is compared with.

A *plan* holds everything random about compressing one layer's per-example gradients: masks,
sparse Johnson-Lindenstrauss (SJLT) tables, Gaussian matrices. Every random draw comes from a
generator seeded by ``(seed, layer name, purpose)`` so a plan is rebuilt bit-identically from
its config alone, and query gradients computed later use the projection the training gradients
got. Plans also serialize to ``(config, tensors)`` for the gradient store.

Shapes: a linear layer ``y = x W^T (+ b)`` with ``W`` of shape ``[d_out, d_in]``. With a bias the
input gets a constant-1 column appended, so the layer's gradient is ``G`` of shape
``[d_out, d_in + 1]`` (column ``d_in`` is the bias). The flat index of ``G[a, b]`` is
``a * d_in_eff + b``.

Plan kinds (all expose ``k``, ``project_gradient(G)``, ``compress(x, grad_out)``,
``config()``, ``tensors()``):

* :class:`FactGraSSPlan`: mask both factors, sketch the small outer product (the paper's method).
* :class:`LoGraPlan`: dense Gaussian projections of both factors.
* :class:`GaussianPlan`, :class:`SJLTPlan`, :class:`MaskPlan`, :class:`GraSSPlan`: flat-gradient
  baselines (they materialize the per-example gradient; used for evaluation and benchmarks).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from grass_callback.errors import PlanError

__all__ = [
    "LayerShape",
    "materialize",
    "Plan",
    "FactGraSSPlan",
    "LoGraPlan",
    "GaussianPlan",
    "SJLTPlan",
    "MaskPlan",
    "GraSSPlan",
    "PLAN_KINDS",
    "make_plan",
    "plan_from_state",
    "derive_generator",
    "random_mask",
    "run_mask",
    "auto_mask_run",
    "mask_sizes",
    "is_vocabulary_head",
    "sjlt_tables",
    "sjlt_apply",
]


# --------------------------------------------------------------------------- random pieces


def derive_generator(seed: int, name: str, purpose: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, name, purpose)``; same inputs, same stream, anywhere."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{purpose}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def random_mask(n: int, size: int, gen: torch.Generator) -> Tensor:
    """``size`` sorted indices drawn without replacement from ``range(n)`` (int64)."""
    if not 0 < size <= n:
        raise PlanError(f"a mask of size {size} cannot be drawn from {n} coordinates; use 1..{n}.")
    return torch.randperm(n, generator=gen)[:size].sort().values


def run_mask(n: int, size: int, run: int, gen: torch.Generator) -> Tensor:
    """``size`` sorted indices from ``range(n)`` kept in runs of ``run`` neighbouring coordinates.

    ``run = 1`` is :func:`random_mask` (the same draws). Otherwise the coordinates are rotated by a
    uniform random offset, cut into runs of ``run`` (the last one shorter when ``run`` does not
    divide ``n``), and whole runs are taken in random order until ``size`` coordinates are kept (the
    last run taken is cut short). Because of the random rotation every coordinate is kept with
    probability exactly ``size / n``, as with the coordinate-wise mask; only the joint draw
    differs. A kernel gathering ``size`` columns of a wide row then touches about ``size / run``
    memory lines instead of up to ``size``.
    """
    if run < 1:
        raise PlanError(f"mask_run must be a positive integer, got {run}.")
    if run == 1:
        return random_mask(n, size, gen)
    if not 0 < size <= n:
        raise PlanError(f"a mask of size {size} cannot be drawn from {n} coordinates; use 1..{n}.")
    shift = int(torch.randint(0, n, (1,), generator=gen))
    n_runs = -(-n // run)
    order = torch.randperm(n_runs, generator=gen)
    lengths = torch.clamp(n - order * run, max=run)  # the run at the end of the rotated frame is short
    taken = torch.cumsum(lengths, 0)
    last = int(torch.searchsorted(taken, torch.tensor(size)))  # runs 0..last cover `size`
    keep = lengths[: last + 1].clone()
    keep[-1] -= int(taken[last]) - size
    starts = order[: last + 1] * run
    idx = torch.cat([torch.arange(int(s), int(s) + int(m)) for s, m in zip(starts, keep)])
    return torch.remainder(idx + shift, n).sort().values


def auto_mask_run(size: int, n: int) -> int:
    """Default run length of a mask keeping ``size`` of ``n`` coordinates.

    Runs only where they pay: when the mask keeps at most a quarter of the coordinates (a
    coordinate-wise mask of a larger fraction touches nearly every memory line of a row anyway,
    and a narrow layer offers few runs to choose from). Then 8, shorter for small masks so that
    a mask holds at least 8 runs (1 below 16 coordinates); otherwise 1.
    """
    if size < 16 or 4 * size > n:
        return 1
    return min(8, 1 << ((size // 8).bit_length() - 1))


def sjlt_tables(n: int, k: int, c: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """SJLT tables for a map ``R^n -> R^k`` with ``c`` non-zeros per input coordinate.

    Returns ``bucket`` int32 ``[c, n]`` and ``sign`` int8 ``[c, n]`` (values ±1). Row ``j`` sends
    coordinate ``e`` to ``bucket[j, e]``, inside block ``j`` of ``k / c`` buckets, so the ``c``
    targets of one coordinate are distinct. The map is ``out[bucket[j,e]] += sign[j,e] v[e] /
    sqrt(c)``.
    """
    if c < 1 or k % c:
        raise PlanError(f"the SJLT needs c >= 1 dividing k; got c={c}, k={k}.")
    block = k // c
    offsets = (torch.arange(c, dtype=torch.int64) * block).unsqueeze(1)
    bucket = (torch.randint(0, block, (c, n), generator=gen) + offsets).to(torch.int32)
    sign = (torch.randint(0, 2, (c, n), generator=gen) * 2 - 1).to(torch.int8)
    return bucket, sign


def sjlt_apply(v: Tensor, bucket: Tensor, sign: Tensor, k: int) -> Tensor:
    """Apply SJLT tables to rows of ``v`` (``[B, n] -> [B, k]``), in ``v``'s dtype."""
    c = bucket.shape[0]
    out = v.new_zeros(v.shape[0], k)
    # the values are float32 numbers (as the kernels get them), whatever v's dtype
    w = (sign.to(torch.float32) / math.sqrt(c)).to(v.dtype)
    for j in range(c):
        out.index_add_(1, bucket[j].to(device=v.device, dtype=torch.int64), v * w[j].to(v.device))
    return out


# --------------------------------------------------------------------------- shapes and base


@dataclass(frozen=True)
class LayerShape:
    """The weight-gradient shape of a linear layer: ``[d_out, d_in (+1 with bias)]``."""

    d_in: int
    d_out: int
    bias: bool = False

    @property
    def d_in_eff(self) -> int:
        return self.d_in + int(self.bias)

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in_eff


def materialize(x: Tensor, grad_out: Tensor, bias: bool) -> Tensor:
    """Per-example weight gradients ``G_i = Σ_t δ_t x_t^T`` (with the bias column): ``[B, d_out, d_in_eff]``.

    Only for small layers, references and flat-gradient baselines: it allocates ``B d_in d_out``.
    """
    x, grad_out = _as_3d(x), _as_3d(grad_out)
    if bias:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    return torch.einsum("bto,bti->boi", grad_out, x)


def _as_3d(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


def _scaled(out: Tensor, scale: Tensor | float | None) -> Tensor:
    if scale is None:
        return out
    if not isinstance(scale, Tensor):
        return out * scale
    return out * scale.to(device=out.device, dtype=out.dtype).reshape(-1, 1)


class Plan:
    """Common interface of compression plans (see the module docstring)."""

    kind: ClassVar[str] = ""
    k: int
    seed: int
    name: str

    def config(self) -> dict[str, Any]:
        """Plain values from which the plan is rebuilt (the tensors are derived from them)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """The plan's random tensors, for saving beside compressed gradients."""
        raise NotImplementedError

    def project_gradient(self, grad: Tensor) -> Tensor:
        """Compress materialized per-example gradients ``[B, d_out, d_in_eff]`` (or flat ``[B, D]``)."""
        raise NotImplementedError

    def compress(self, x: Tensor, grad_out: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Compress from the layer's factors: ``x [B, (T,) d_in]``, ``grad_out [B, (T,) d_out]``."""
        shape = getattr(self, "shape", None)
        if shape is None:
            raise PlanError(f"a {self.kind} plan over flat gradients has no layer factors to compress.")
        return _scaled(self.project_gradient(materialize(x, grad_out, shape.bias)), scale)

    def to_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return {"kind": self.kind, **self.config()}, self.tensors()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan) or self.to_state()[0] != other.to_state()[0]:
            return False
        mine, theirs = self.tensors(), other.tensors()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({fields})"


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{key} must be a positive integer, got {value!r}.")


# --------------------------------------------------------------------------- FactGraSS


def _side(k: int, oversample: float) -> int:
    """``sqrt(oversample · k)`` rounded up (exact for squares: ``2 sqrt(k)`` at ``oversample = 4``)."""
    target = oversample * k
    root = math.isqrt(int(target)) if float(target).is_integer() else None
    if root is not None and root * root == target:
        return int(root)
    return math.ceil(math.sqrt(target))


WIDE_OUTPUT_RATIO = 8  # a layer whose output is this many times wider than its input: a vocabulary head


def is_vocabulary_head(k: int, d_in_eff: int, d_out: int, oversample: float = 4.0) -> bool:
    """Whether a ``d_out x d_in_eff`` layer gradient is a vocabulary head's: an output at least
    ``WIDE_OUTPUT_RATIO = 8`` times wider than the input, and an input not narrower than the mask
    side ``sqrt(oversample · k)`` (a narrow input layer, such as an MLP's first, is not one). Such
    a layer gets skewed masks (:func:`mask_sizes`) and, under ``damping_ratio="auto"``, a smaller
    damping (:func:`grass_callback.damping.auto_scales`)."""
    return d_out >= WIDE_OUTPUT_RATIO * d_in_eff and d_in_eff >= _side(k, float(oversample))


def mask_sizes(k: int, d_in_eff: int, d_out: int, *, oversample: float = 4.0,
               keep_narrow: bool = False, wide_output_skew: float = 16.0) -> tuple[int, int]:
    """Default FactGraSS mask sizes ``(k_in', k_out')`` for a ``d_out x d_in_eff`` gradient.

    The budget is ``k' = side²`` with ``side = sqrt(oversample · k)`` (``2 sqrt(k)`` by
    default). A factor narrower than ``side`` keeps every column and the other factor gets the
    columns that leaves unused (``ceil(side² / width)``, clipped to its width). With
    ``keep_narrow`` a factor whose mask would keep at least half of its columns keeps them all
    (the other keeps its share of the budget as before): on a layer of 128 outputs at
    ``k = 1024`` the mask keeps 128, not 64, outputs. ``k'`` is then at most twice the budget
    (four times when both factors are narrow).

    A layer whose output is at least ``WIDE_OUTPUT_RATIO = 8`` times wider than its (not narrow)
    input, such as a language model's vocabulary head, spends the same budget on the output
    side: ``k_out' = min(d_out, wide_output_skew · side)``, ``k_in' = ceil(side² / k_out')``
    (``4 x 1024`` instead of ``64 x 64`` at ``k = 1024``). An output gradient there lives on the
    few tokens of the example, which a 64-column mask mostly misses. ``wide_output_skew=1``
    turns it off. The default 16 scored best of 4 / 8 / 16 on the quality suite's tuning
    language model once the head got its smaller damping (:mod:`grass_callback.damping`); it
    costs 4-10x that layer's CPU kernel time (4: 1.0-1.6x), under 1% of the overhead benchmark's
    CPU training step (``python -m benchmarks.quality.mask_cost --heads``; README "Attribution
    quality").
    """
    if not (isinstance(oversample, (int, float)) and not isinstance(oversample, bool) and oversample > 0):
        raise PlanError(f"oversample must be a positive number (the mask budget k' = oversample * k), got {oversample!r}.")
    if not (isinstance(wide_output_skew, (int, float)) and not isinstance(wide_output_skew, bool)
            and wide_output_skew >= 1):
        raise PlanError(f"wide_output_skew must be a number >= 1 (1: off), got {wide_output_skew!r}.")
    side = _side(k, float(oversample))
    if wide_output_skew > 1 and is_vocabulary_head(k, d_in_eff, d_out, oversample):
        k_out = min(d_out, math.ceil(side * wide_output_skew))
        k_in = min(d_in_eff, math.ceil(side**2 / k_out))
    else:
        k_out = min(side, d_out)
        k_in = min(d_in_eff, max(side, math.ceil(side**2 / k_out)))
        k_out = min(d_out, max(k_out, math.ceil(side**2 / k_in)))
    if keep_narrow:
        if 2 * k_in >= d_in_eff - 1:  # half of the weight columns (the bias column aside)
            k_in = d_in_eff
        if 2 * k_out >= d_out:
            k_out = d_out
    return k_in, k_out


def _mask_runs(mask_run: Any, k_in: int, k_out: int, d_in_eff: int, d_out: int) -> tuple[int, int]:
    """``(run_in, run_out)`` from ``"auto"``, one int, or a pair."""
    if mask_run == "auto":
        return auto_mask_run(k_in, d_in_eff), auto_mask_run(k_out, d_out)
    runs = tuple(mask_run) if isinstance(mask_run, (list, tuple)) else (mask_run, mask_run)
    if len(runs) != 2 or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in runs):
        raise PlanError(f"mask_run must be 'auto', a positive integer or a pair of them; got {mask_run!r}.")
    return int(runs[0]), int(runs[1])


ONE_TOKEN_OVERSAMPLE = 128.0  # a one-token layer's mask budget k' <= 128 k (at k = 1024 a layer of about 360 x 360 whole)
ONE_TOKEN_C = 2  # and its sketch's non-zeros per coordinate


def _one_token_sizes(one_token: Any, explicit: bool, shape: LayerShape, k: int, c: int, mask_run: Any,
                     wide_output_skew: float) -> dict[str, Any] | None:
    """The one-token plan's ``{k_in, k_out, c, mask_run}``, or ``None`` (off)."""
    if isinstance(one_token, Mapping):  # a saved plan's
        return {"k_in": int(one_token["k_in"]), "k_out": int(one_token["k_out"]), "c": int(one_token["c"]),
                "mask_run": [int(r) for r in one_token["mask_run"]]}
    if one_token is not None and not isinstance(one_token, bool):
        raise PlanError(f"one_token must be True, False or None (default: on unless the sizes are given), "
                        f"got {one_token!r}.")
    if one_token is False or (one_token is None and (explicit or shape.numel <= k)):
        return None
    k_in, k_out = mask_sizes(k, shape.d_in_eff, shape.d_out, oversample=ONE_TOKEN_OVERSAMPLE, keep_narrow=False,
                             wide_output_skew=wide_output_skew)
    runs = _mask_runs(mask_run, k_in, k_out, shape.d_in_eff, shape.d_out)
    c_one = ONE_TOKEN_C if c < ONE_TOKEN_C and k % ONE_TOKEN_C == 0 else c  # the SJLT needs c dividing k
    return {"k_in": k_in, "k_out": k_out, "c": int(c_one), "mask_run": list(runs)}


def only_one_token_added(stored: Mapping[str, Any], given: Mapping[str, Any]) -> bool:
    """Whether plan configs ``given`` (layer -> config) differ from ``stored`` only by the one-token
    sizes that plans saved before them lack (:class:`FactGraSSPlan`'s ``one_token``)."""
    if set(stored) != set(given) or not any("one_token" in cfg and "one_token" not in stored[name]
                                            for name, cfg in given.items()):
        return False
    return all({key: value for key, value in cfg.items() if key != "one_token"} == dict(stored[name])
               for name, cfg in given.items())


class FactGraSSPlan(Plan):
    """FactGraSS for one linear layer: mask both factors, sketch the ``k_out x k_in`` product.

    Args:
        d_in, d_out, bias: the layer (``bias=True`` adds the constant-1 input column).
        k: output size per example. Default 1024.
        k_in, k_out: mask sizes of the input and output factor. Default
            :func:`mask_sizes`: ``sqrt(oversample · k)`` each (``2 sqrt(k)`` at the default
            ``oversample=4``, the paper's), a factor narrower than that keeps all its columns and
            gives the budget it leaves to the other, and (``keep_narrow``) a factor whose mask
            would keep half its columns or more keeps them all. When the product ``k' = k_in
            k_out`` is not above ``k``, the plan keeps every masked coordinate exactly (``k = k'``,
            identity sketch), so small layers are compressed without error. Saved plans carry
            their sizes, so these defaults never change a plan loaded from a store.
        oversample: the mask budget ``k' ≈ oversample · k`` (default 4).
        keep_narrow: keep every column of a factor whose mask would keep at least half of it
            (default ``False``: on the quality suite's tuning half it did not raise the LDS, and it
            costs up to 2x kernel time per narrow factor; see the README).
        wide_output_skew: on a layer whose output is at least 8x wider than its input (a
            vocabulary head) the output mask gets this many times ``side`` columns and the input
            mask the rest of the budget (:func:`mask_sizes`; default 16, 1 = off).
        c: non-zeros per coordinate in the SJLT (the paper uses 1).
        mask_run: the masks keep coordinates in runs of this many neighbours (:func:`run_mask`;
            every coordinate is still kept with probability ``k_in / d_in``). ``"auto"``
            (default): :func:`auto_mask_run` per factor: 8 at the default ``k`` where the mask
            keeps at most a quarter of the columns, else 1; ``1``: the paper's coordinate-wise
            masks; a pair ``(run_in, run_out)`` sets each factor.
        seed, name: where the random draws come from.
        one_token: the plan for inputs without a token axis (``[B, d_in]``, as an MLP's layers
            see them; :meth:`input_plan`): there a layer's whole gradient is only its
            ``d_out x d_in_eff`` entries, so the masks keep up to ``ONE_TOKEN_OVERSAMPLE · k``
            of them (a layer up to about 360 wide kept whole at ``k = 1024``) and the sketch puts
            ``ONE_TOKEN_C = 2`` non-zeros per coordinate: within 0.005 LDS of a dense Gaussian on
            every MLP of the quality suite, where the default masks lose 0.008-0.013 (README
            "Attribution quality"). ``None`` (default): on, unless the sizes are given or the
            layer is kept exactly anyway; ``False``: off; a saved plan passes its sizes (a dict).

    Raises:
        PlanError: explicit factor sizes above the layer's, or ``k' < k`` with explicit sizes.
    """

    kind = "factgrass"

    def __init__(self, d_in: int, d_out: int, bias: bool = False, k: int = 1024,
                 k_in: int | None = None, k_out: int | None = None, c: int = 1,
                 seed: int = 0, name: str = "", mask_run: Any = "auto", oversample: float = 4.0,
                 keep_narrow: bool = False, wide_output_skew: float = 16.0,
                 one_token: bool | Mapping[str, Any] | None = None) -> None:
        _check_positive(d_in=d_in, d_out=d_out, k=k, c=c)
        self.shape = LayerShape(int(d_in), int(d_out), bool(bias))
        self.seed, self.name, self.c = int(seed), str(name), int(c)
        self.requested = {"k": k, "k_in": k_in, "k_out": k_out}
        d_in_eff = self.shape.d_in_eff
        explicit = k_in is not None or k_out is not None
        self._one_token = _one_token_sizes(one_token, explicit, self.shape, k, c, mask_run, wide_output_skew)
        self._one_token_plan: FactGraSSPlan | None = None
        default_side = _side(k, 4.0)
        if not explicit and self.shape.numel <= k:  # the whole gradient fits: keep it exactly
            k_in, k_out = d_in_eff, d_out
        elif not explicit:
            k_in, k_out = mask_sizes(k, d_in_eff, d_out, oversample=oversample, keep_narrow=keep_narrow,
                                     wide_output_skew=wide_output_skew)
        else:
            k_in = k_in if k_in is not None else min(default_side, d_in_eff)
            k_out = k_out if k_out is not None else min(default_side, d_out)
        _check_positive(k_in=k_in, k_out=k_out)
        if k_in > d_in_eff or k_out > d_out:
            raise PlanError(
                f"layer {name!r} ({d_out}x{d_in_eff} gradient incl. bias={bias}) cannot give masks "
                f"k_in={k_in}, k_out={k_out}; use k_in <= {d_in_eff} and k_out <= {d_out}.")
        k_prime = k_in * k_out
        if k_prime < k:
            if explicit:
                raise PlanError(
                    f"layer {name!r}: k' = k_in*k_out = {k_prime} is below k = {k}; raise k_in/k_out "
                    f"or lower k.")
            k = k_prime  # small layer: keep every masked coordinate exactly
        self.k, self.k_in, self.k_out = int(k), int(k_in), int(k_out)
        self.run_in, self.run_out = _mask_runs(mask_run, self.k_in, self.k_out, d_in_eff, self.shape.d_out)
        self.identity_sketch = self.k == k_prime
        if self.identity_sketch and self.c != 1:
            self.c = 1
        self._build()
        self._tables: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def _build(self) -> None:
        gen_in = derive_generator(self.seed, self.name, "factgrass/in")
        gen_out = derive_generator(self.seed, self.name, "factgrass/out")
        self.in_idx = run_mask(self.shape.d_in_eff, self.k_in, self.run_in, gen_in)
        self.out_idx = run_mask(self.shape.d_out, self.k_out, self.run_out, gen_out)
        k_prime = self.k_in * self.k_out
        if self.identity_sketch:
            self.bucket = torch.arange(k_prime, dtype=torch.int32).unsqueeze(0)
            self.sign = torch.ones(1, k_prime, dtype=torch.int8)
        else:
            gen = derive_generator(self.seed, self.name, "factgrass/sjlt")
            self.bucket, self.sign = sjlt_tables(k_prime, self.k, self.c, gen)

    @property
    def k_prime(self) -> int:
        return self.k_in * self.k_out

    def weight(self, device: torch.device | str = "cpu") -> Tensor:
        """The SJLT values ``sign / sqrt(c)`` as float32 ``[c, k']`` on ``device``."""
        return self.tables(device)[3]

    def tables(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(in_idx, out_idx, bucket, weight)`` on ``device``, cached: the op's plan arguments."""
        device = torch.device(device)
        if device not in self._tables:
            weight = self.sign.to(torch.float32) / math.sqrt(self.c)
            self._tables[device] = tuple(  # type: ignore[assignment]
                t.to(device) for t in (self.in_idx, self.out_idx, self.bucket, weight))
        return self._tables[device]

    def config(self) -> dict[str, Any]:
        out = {"d_in": self.shape.d_in, "d_out": self.shape.d_out, "bias": self.shape.bias,
               "k": self.k, "k_in": self.k_in, "k_out": self.k_out, "c": self.c,
               "seed": self.seed, "name": self.name, "mask_run": [self.run_in, self.run_out]}
        if self._one_token is not None:  # absent: off (so plans saved before it load unchanged)
            out["one_token"] = dict(self._one_token)
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {"in_idx": self.in_idx, "out_idx": self.out_idx, "bucket": self.bucket, "sign": self.sign}

    def input_plan(self, token_axis: bool) -> "FactGraSSPlan":
        """The plan that compresses this layer's inputs: itself for inputs with a token axis
        (``[B, T, d_in]``), the one-token plan (``one_token``; made on first use, from ``(seed,
        name)``) for inputs without one (``[B, d_in]``) when it has one. The taps, and so the
        stored rows, the queries and every reader of a store, choose by the input they see."""
        if token_axis or self._one_token is None:
            return self
        if self._one_token_plan is None:
            sizes = self._one_token
            self._one_token_plan = FactGraSSPlan(
                self.shape.d_in, self.shape.d_out, self.shape.bias, k=self.k, k_in=sizes["k_in"],
                k_out=sizes["k_out"], c=sizes["c"], seed=self.seed, name=self.name, mask_run=sizes["mask_run"],
                one_token=False)
        return self._one_token_plan

    def mask_gradient(self, grad: Tensor) -> Tensor:
        """``G[:, S_out][:, :, S_in]`` flattened: ``[B, d_out, d_in_eff] -> [B, k']``."""
        grad = grad.index_select(1, self.out_idx.to(grad.device))
        return grad.index_select(2, self.in_idx.to(grad.device)).flatten(1)

    def project_gradient(self, grad: Tensor) -> Tensor:
        if grad.dim() != 3 or grad.shape[1:] != (self.shape.d_out, self.shape.d_in_eff):
            raise PlanError(
                f"expected gradients [B, {self.shape.d_out}, {self.shape.d_in_eff}] for layer "
                f"{self.name!r}, got {list(grad.shape)}.")
        return sjlt_apply(self.mask_gradient(grad), self.bucket, self.sign, self.k)

    def compress(self, x: Tensor, grad_out: Tensor, scale: Tensor | float | None = None,
                 impl: str = "auto") -> Tensor:
        from grass_callback.ops import factgrass

        return factgrass(x, grad_out, self, scale=scale, impl=impl)


# --------------------------------------------------------------------------- LoGra


class LoGraPlan(Plan):
    """LoGra: dense Gaussian projections of both factors, ``g = vec(Σ_t (P_out δ_t)(P_in x_t)^T)``.

    ``k = k_in k_out``; by default ``k_in = k_out = sqrt(k)`` (``k`` must then be a square).
    Entries are ``N(0, 1/k_in)`` and ``N(0, 1/k_out)`` so squared norms are kept in expectation.
    """

    kind = "logra"

    def __init__(self, d_in: int, d_out: int, bias: bool = False, k: int = 1024,
                 k_in: int | None = None, k_out: int | None = None, seed: int = 0,
                 name: str = "") -> None:
        _check_positive(d_in=d_in, d_out=d_out, k=k)
        self.shape = LayerShape(int(d_in), int(d_out), bool(bias))
        self.seed, self.name = int(seed), str(name)
        if k_in is None and k_out is None:
            side = math.isqrt(k)
            if side * side != k:
                raise PlanError(f"LoGra needs k_in*k_out = k; k={k} is not a square, pass k_in and k_out.")
            k_in = k_out = side
        elif k_in is None or k_out is None:
            k_in = k_in if k_in is not None else k // k_out  # type: ignore[operator]
            k_out = k_out if k_out is not None else k // k_in
        if k_in * k_out != k:
            raise PlanError(f"LoGra needs k_in*k_out = k; got {k_in}*{k_out} != {k}.")
        self.k, self.k_in, self.k_out = int(k), int(k_in), int(k_out)
        gen = derive_generator(self.seed, self.name, "logra")
        self.p_in = torch.randn(self.k_in, self.shape.d_in_eff, generator=gen) / math.sqrt(self.k_in)
        self.p_out = torch.randn(self.k_out, self.shape.d_out, generator=gen) / math.sqrt(self.k_out)

    def config(self) -> dict[str, Any]:
        return {"d_in": self.shape.d_in, "d_out": self.shape.d_out, "bias": self.shape.bias,
                "k": self.k, "k_in": self.k_in, "k_out": self.k_out, "seed": self.seed, "name": self.name}

    def tensors(self) -> dict[str, Tensor]:
        return {"p_in": self.p_in, "p_out": self.p_out}

    def project_gradient(self, grad: Tensor) -> Tensor:
        p_in, p_out = self.p_in.to(grad), self.p_out.to(grad)
        return (p_out @ grad @ p_in.T).flatten(1)

    def compress(self, x: Tensor, grad_out: Tensor, scale: Tensor | float | None = None) -> Tensor:
        x, grad_out = _as_3d(x), _as_3d(grad_out)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        p_in = self.p_in.to(x.device, dtype)
        if self.shape.bias:  # the bias column of P_in multiplies the constant 1
            xp = x.to(dtype) @ p_in[:, :-1].T + p_in[:, -1]
        else:
            xp = x.to(dtype) @ p_in.T
        dp = grad_out.to(dtype) @ self.p_out.to(x.device, dtype).T
        return _scaled(torch.bmm(dp.transpose(1, 2), xp).flatten(1), scale)


# --------------------------------------------------------------------------- flat baselines


class _FlatPlan(Plan):
    """A plan over flat gradients of dimension ``dim`` (layer gradients are flattened)."""

    def __init__(self, dim: int, k: int, seed: int, name: str, shape: LayerShape | None) -> None:
        _check_positive(dim=dim, k=k)
        self.dim, self.k, self.seed, self.name = int(dim), int(k), int(seed), str(name)
        self.shape = shape
        if shape is not None and shape.numel != self.dim:
            raise PlanError(f"dim={dim} does not match the layer's {shape.numel} gradient entries.")

    def _base_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dim": self.dim, "k": self.k, "seed": self.seed, "name": self.name}
        if self.shape is not None:
            out["layer"] = [self.shape.d_in, self.shape.d_out, self.shape.bias]
        return out

    def _flat(self, grad: Tensor) -> Tensor:
        flat = grad.flatten(1)
        if flat.shape[1] != self.dim:
            raise PlanError(f"{self.kind} plan {self.name!r} expects {self.dim} gradient entries, "
                            f"got {flat.shape[1]}.")
        return flat

    def project_gradient(self, grad: Tensor) -> Tensor:
        return self.project(self._flat(grad))

    def project(self, flat: Tensor) -> Tensor:
        raise NotImplementedError


class GaussianPlan(_FlatPlan):
    """Dense Gaussian projection ``g -> P g`` with ``P`` ``[k, dim]`` of ``N(0, 1/k)`` entries."""

    kind = "gaussian"

    def __init__(self, dim: int, k: int = 1024, seed: int = 0, name: str = "",
                 shape: LayerShape | None = None) -> None:
        super().__init__(dim, k, seed, name, shape)
        gen = derive_generator(self.seed, self.name, "gaussian")
        self.matrix = torch.randn(self.k, self.dim, generator=gen) / math.sqrt(self.k)

    def config(self) -> dict[str, Any]:
        return self._base_config()

    def tensors(self) -> dict[str, Tensor]:
        return {"matrix": self.matrix}

    def project(self, flat: Tensor) -> Tensor:
        return flat @ self.matrix.to(flat).T


class SJLTPlan(_FlatPlan):
    """Sparse Johnson-Lindenstrauss projection alone (``c`` non-zeros per coordinate)."""

    kind = "sjlt"

    def __init__(self, dim: int, k: int = 1024, c: int = 1, seed: int = 0, name: str = "",
                 shape: LayerShape | None = None) -> None:
        super().__init__(dim, k, seed, name, shape)
        self.c = int(c)
        self.bucket, self.sign = sjlt_tables(self.dim, self.k, self.c,
                                             derive_generator(self.seed, self.name, "sjlt"))

    def config(self) -> dict[str, Any]:
        return {**self._base_config(), "c": self.c}

    def tensors(self) -> dict[str, Tensor]:
        return {"bucket": self.bucket, "sign": self.sign}

    def project(self, flat: Tensor) -> Tensor:
        return sjlt_apply(flat, self.bucket, self.sign, self.k)


class MaskPlan(_FlatPlan):
    """Random mask alone: keep ``k`` coordinates of the flat gradient."""

    kind = "mask"

    def __init__(self, dim: int, k: int = 1024, seed: int = 0, name: str = "",
                 shape: LayerShape | None = None) -> None:
        super().__init__(dim, k, seed, name, shape)
        self.index = random_mask(self.dim, self.k, derive_generator(self.seed, self.name, "mask"))

    def config(self) -> dict[str, Any]:
        return self._base_config()

    def tensors(self) -> dict[str, Tensor]:
        return {"index": self.index}

    def project(self, flat: Tensor) -> Tensor:
        return flat.index_select(1, self.index.to(flat.device))


class GraSSPlan(_FlatPlan):
    """GraSS on a flat gradient: ``SJLT ∘ MASK``, mask of size ``k_mask`` (default ``4k``)."""

    kind = "grass"

    def __init__(self, dim: int, k: int = 1024, k_mask: int | None = None, c: int = 1,
                 seed: int = 0, name: str = "", shape: LayerShape | None = None) -> None:
        super().__init__(dim, k, seed, name, shape)
        self.k_mask = int(k_mask) if k_mask is not None else min(4 * self.k, self.dim)
        if not self.k <= self.k_mask <= self.dim:
            raise PlanError(f"GraSS needs k <= k_mask <= dim; got k={k}, k_mask={self.k_mask}, dim={dim}.")
        self.c = int(c)
        self.index = random_mask(self.dim, self.k_mask, derive_generator(self.seed, self.name, "grass/mask"))
        self.bucket, self.sign = sjlt_tables(self.k_mask, self.k, self.c,
                                             derive_generator(self.seed, self.name, "grass/sjlt"))

    def config(self) -> dict[str, Any]:
        return {**self._base_config(), "k_mask": self.k_mask, "c": self.c}

    def tensors(self) -> dict[str, Tensor]:
        return {"index": self.index, "bucket": self.bucket, "sign": self.sign}

    def project(self, flat: Tensor) -> Tensor:
        return sjlt_apply(flat.index_select(1, self.index.to(flat.device)), self.bucket, self.sign, self.k)


# --------------------------------------------------------------------------- factories

PLAN_KINDS: dict[str, type[Plan]] = {
    cls.kind: cls for cls in (FactGraSSPlan, LoGraPlan, GaussianPlan, SJLTPlan, MaskPlan, GraSSPlan)
}


def make_plan(kind: str, shape: LayerShape, k: int = 1024, seed: int = 0, name: str = "",
              **options: Any) -> Plan:
    """Build a plan of ``kind`` for a layer of ``shape`` (flat kinds flatten its gradient)."""
    if kind not in PLAN_KINDS:
        raise PlanError(f"unknown plan kind {kind!r}; choose one of {sorted(PLAN_KINDS)}.")
    cls = PLAN_KINDS[kind]
    if issubclass(cls, _FlatPlan):
        return cls(shape.numel, k=k, seed=seed, name=name, shape=shape, **options)
    return cls(shape.d_in, shape.d_out, shape.bias, k=k, seed=seed, name=name, **options)  # type: ignore[call-arg]


def plan_from_state(config: Mapping[str, Any], tensors: Mapping[str, Tensor] | None = None) -> Plan:
    """Rebuild a plan from :meth:`Plan.to_state`; if tensors are given they must match the rebuild."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in PLAN_KINDS:
        raise PlanError(f"unknown plan kind {kind!r} in saved state; known: {sorted(PLAN_KINDS)}.")
    cls = PLAN_KINDS[kind]
    if issubclass(cls, _FlatPlan):
        layer = config.pop("layer", None)
        shape = LayerShape(*layer) if layer is not None else None
        plan: Plan = cls(shape=shape, **config)
    else:
        if issubclass(cls, FactGraSSPlan):
            config.setdefault("mask_run", 1)  # saved before masks came in runs: coordinate-wise
        plan = cls(**config)
    if tensors is not None:
        rebuilt = plan.tensors()
        for key, value in tensors.items():
            if key not in rebuilt or not torch.equal(rebuilt[key], value.to(rebuilt[key].dtype)):
                raise PlanError(
                    f"saved tensor {key!r} of plan {config.get('name')!r} differs from the rebuild; "
                    "the plan was made by another version or seed.")
    return plan


# --------------------------------------------------------------------------- FJLT (added for the quality benchmark)


def fwht(v: Tensor, rows_per_block: int = 64) -> Tensor:
    """Orthonormal fast Walsh-Hadamard transform of the rows of ``v`` (``[B, n]``, ``n`` a power of 2).

    Natural (Sylvester) order: the result equals ``v @ H_n / sqrt(n)`` with ``H_1 = [1]`` and
    ``H_2n = [[H_n, H_n], [H_n, -H_n]]``. ``O(B n log n)`` time: ``log2 n`` in-place butterfly
    passes over blocks of ``rows_per_block`` rows (so a block stays in cache), one copy of ``v``.
    """
    B, n = v.shape
    if n & (n - 1):
        raise PlanError(f"the Walsh-Hadamard transform needs a power-of-2 width, got {n}.")
    out = v.clone(memory_format=torch.contiguous_format)
    for start in range(0, B, rows_per_block):
        block = out[start:start + rows_per_block]
        b, h = block.shape[0], 1
        while h < n:
            pairs = block.view(b, n // (2 * h), 2, h)
            first, second = pairs[:, :, 0, :], pairs[:, :, 1, :]
            old_first = first.clone()
            first.add_(second)  # a + b
            second.sub_(old_first).neg_()  # a - b
            h *= 2
    return out.div_(math.sqrt(n))


class FJLTPlan(_FlatPlan):
    """Fast Johnson-Lindenstrauss transform of the flat gradient: ``sqrt(n/k) · S H D``.

    ``D``: random signs on the ``dim`` coordinates; the result is zero-padded to ``n``, the next
    power of two, and transformed by the orthonormal Walsh-Hadamard matrix ``H`` (:func:`fwht`);
    ``S`` keeps ``k`` of the ``n`` coordinates, drawn without replacement. The scale makes it an
    isometry in expectation over ``S``: ``E ||P g||^2 = ||g||^2``. ``O(n log n)`` per example.
    """

    kind = "fjlt"

    def __init__(self, dim: int, k: int = 1024, seed: int = 0, name: str = "",
                 shape: LayerShape | None = None) -> None:
        super().__init__(dim, k, seed, name, shape)
        self.padded = 1 << max(0, (self.dim - 1).bit_length())
        if self.k > self.padded:
            raise PlanError(f"FJLT of a {self.dim}-dim gradient (padded to {self.padded}) cannot keep "
                            f"k={self.k} coordinates; use k <= {self.padded}.")
        gen = derive_generator(self.seed, self.name, "fjlt")
        self.sign = (torch.randint(0, 2, (self.dim,), generator=gen) * 2 - 1).to(torch.int8)
        self.index = random_mask(self.padded, self.k, gen)

    def config(self) -> dict[str, Any]:
        return self._base_config()

    def tensors(self) -> dict[str, Tensor]:
        return {"sign": self.sign, "index": self.index}

    def project(self, flat: Tensor) -> Tensor:
        signed = flat * self.sign.to(device=flat.device, dtype=flat.dtype)
        if self.padded > self.dim:
            signed = torch.nn.functional.pad(signed, (0, self.padded - self.dim))
        mixed = fwht(signed)
        return mixed.index_select(1, self.index.to(flat.device)) * math.sqrt(self.padded / self.k)


# --------------------------------------------------------------------------- selective-mask FactGraSS


def _index_tensor(values: Any, size: int, what: str) -> Tensor:
    idx = torch.as_tensor(values, dtype=torch.int64).reshape(-1)
    if idx.numel() == 0:
        raise PlanError(f"the learned {what} mask is empty.")
    idx = idx.sort().values
    if int(idx[0]) < 0 or int(idx[-1]) >= size or bool((idx[1:] == idx[:-1]).any()):
        raise PlanError(f"the learned {what} mask must hold distinct indices in [0, {size}); got "
                        f"{idx.tolist()[:8]}... of {idx.numel()}.")
    return idx


class SelectiveFactGraSSPlan(FactGraSSPlan):
    """FactGraSS with *learned* factor masks (the paper's selective mask) instead of random ones.

    ``in_idx`` / ``out_idx`` are the kept input (the bias column is index ``d_in``) and output
    coordinates, e.g. from :func:`grass_callback.selective.learn_factor_masks`; without them the
    plan takes the random masks :class:`FactGraSSPlan` would draw (so ``make_plan`` works). The SJLT tables
    come from ``(seed, name)`` exactly as in :class:`FactGraSSPlan`, so a selective plan and a
    random-mask plan of one seed differ only in their masks. ``k`` is clipped to ``k_in k_out``
    (an identity sketch) when the masks are smaller. The indices are part of :meth:`config`
    (plain lists), so :func:`plan_from_state` rebuilds the plan from its config alone.
    """

    kind = "factgrass_selective"

    def __init__(self, d_in: int, d_out: int, bias: bool = False, k: int = 1024, *,
                 in_idx: Any = None, out_idx: Any = None, c: int = 1, seed: int = 0, name: str = "",
                 k_in: int | None = None, k_out: int | None = None, mask_run: Any = "auto") -> None:
        _check_positive(d_in=d_in, d_out=d_out, k=k)
        if in_idx is None and out_idx is None:  # nothing learned yet: the random plan's masks, kept explicitly
            ref = FactGraSSPlan(d_in, d_out, bias, k=k, k_in=k_in, k_out=k_out, c=c, seed=seed, name=name,
                                mask_run=mask_run)
            in_idx, out_idx, k = ref.in_idx, ref.out_idx, ref.k
        elif in_idx is None or out_idx is None:
            raise PlanError("a selective plan needs both in_idx and out_idx (or neither, for random masks).")
        self._learned_in = _index_tensor(in_idx, int(d_in) + int(bool(bias)), "input")
        self._learned_out = _index_tensor(out_idx, int(d_out), "output")
        n_in, n_out = self._learned_in.numel(), self._learned_out.numel()
        if (k_in is not None and k_in != n_in) or (k_out is not None and k_out != n_out):
            raise PlanError(f"k_in/k_out ({k_in}, {k_out}) differ from the learned masks' sizes ({n_in}, {n_out}).")
        super().__init__(d_in, d_out, bias, k=min(int(k), n_in * n_out), k_in=n_in, k_out=n_out, c=c,
                         seed=seed, name=name, mask_run=mask_run)

    def _build(self) -> None:
        super()._build()  # SJLT tables from (seed, name), as the random-mask plan
        self.in_idx, self.out_idx = self._learned_in, self._learned_out

    def config(self) -> dict[str, Any]:
        return {**super().config(), "in_idx": self.in_idx.tolist(), "out_idx": self.out_idx.tolist()}


PLAN_KINDS[FJLTPlan.kind] = FJLTPlan
PLAN_KINDS[SelectiveFactGraSSPlan.kind] = SelectiveFactGraSSPlan
__all__ += ["FJLTPlan", "fwht", "SelectiveFactGraSSPlan"]
