"""A Fisher block of fewer rows than its size, solved through the rows' own ``R x R`` kernel.

A period of ``N`` training examples gives a layer the Fisher ``F = GᵀG / N`` of its compressed
rows ``G`` (``[R, k]``, ``R >= N``: rows a ``keep`` mask dropped are zero). When ``R`` is well
below ``k`` (a short period, a small fine-tuning set, a joint Fisher over many layers), ``F`` has
rank at most ``R`` and the damped inverse has the closed form (Woodbury)

    (F + λI)⁻¹ = (I − Gᵀ M⁻¹ G) / λ,        M = G Gᵀ + N λ I   (R x R),

so a fit is one ``R x R`` product and Cholesky factor of ``M`` instead of a ``k x k`` factor:
``(10/16) R² k + R³/3`` multiply-adds (the product on its upper block triangle) against
``k³/3``: 2.9x fewer at the 400 rows of a period on a ``k = 1024`` layer, 1.7x at ``R = k/2``.
Applying it to a row costs ``R k + R²/2`` (``gᵀ(F + λI)⁻¹g = (‖g‖² − ‖C⁻¹ G g‖²) / λ`` with
``M = C Cᵀ``), about the ``k²/2`` of a triangular solve with the ``k x k`` factor at ``R = 0.4 k``
and less below; ``2 R k + R²`` per solved vector against ``k²``.

Rounding: the products with ``G`` run in the dtype :func:`grass_callback.fisher.factor_dtype`
picks for the layer (float32 for half-precision rows when the condition bound allows it, as the
``k x k`` factors do); the ``R x R`` algebra and every difference are float64. The subtraction
in both formulas loses about ``κ(F + λI)`` ulps of the product dtype, the same amplification a
solve through a ``k x k`` factor has, so the rule that admits float32 factors admits these.

Used by :meth:`grass_callback.fisher.FisherStats.fit` for layers whose statistics still hold
every row (they keep rows while ``R <= k/2``); the results are those of the ``k x k`` factor to
rounding (``tests/test_dual_fisher.py`` checks them against it and against dense inverses).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grass_callback._linalg import cholesky_ex
from grass_callback.errors import FisherError

#: A layer's statistics keep their rows (for this solve) while the rows are at most this share of k.
MAX_ROW_SHARE = 0.5


def max_rows(k: int) -> int:
    """Rows a ``k``-wide layer keeps for the dual solve (``floor(k * MAX_ROW_SHARE)``)."""
    return int(k * MAX_ROW_SHARE)


class DualBlock:
    """``F + λI`` of one layer, ``F = GᵀG / N``, applied through ``M = GGᵀ + NλI``.

    Args:
        rows: ``G``, ``[R, k]`` with ``1 <= R < k`` (kept as given when already in ``dtype``).
        count: ``N``, the examples the rows stand for (``>= 1``; zero rows may pad ``G``).
        lam: the absolute damping ``λ > 0``.
        dtype: float32 or float64, the dtype of the products with ``G``.

    Raises:
        FisherError: bad shapes or values, or ``M`` not positive definite even with float64
            products (``G`` not finite, or ``Nλ`` below the rounding of ``GGᵀ``: ``M >= NλI`` in
            exact arithmetic). :meth:`~grass_callback.fisher.FisherStats.fit` then factors the
            layer's ``k x k`` sum instead, with its retries.
    """

    def __init__(self, rows: Tensor, count: int, lam: float, dtype: torch.dtype) -> None:
        if rows.ndim != 2 or not 0 < rows.shape[0] < rows.shape[1]:
            raise FisherError(f"a dual block needs rows [R, k] with 0 < R < k, got {tuple(rows.shape)}.")
        if not (count >= 1 and lam > 0.0):
            raise FisherError(f"a dual block needs count >= 1 and damping > 0, got {count} and {lam}.")
        self.count, self.lam, self.k = int(count), float(lam), int(rows.shape[1])
        from grass_callback.fisher import _gram_upper_, _mirror_upper

        for attempt in dict.fromkeys((dtype, torch.float64)):
            self.rows = rows.to(attempt)  # from the rows as given, not their float32 rounding
            kernel = torch.zeros(rows.shape[0], rows.shape[0], dtype=attempt, device=self.rows.device)
            with _exact_products():  # GGᵀ from its upper block triangle: 10/16 of the product, exactly symmetric
                _gram_upper_(kernel, self.rows.T)
            if not bool(torch.isfinite(kernel).all()):
                continue  # float32 products overflowed (rows above ~1e17): float64 products
            _mirror_upper(kernel)
            self.kernel = kernel.double()
            damped = self.kernel.clone()
            damped.diagonal().add_(self.count * self.lam)
            chol, info = cholesky_ex(damped)
            if int(info) == 0:
                break  # else the products' rounding outweighs N λ (a tiny damping): float64 products
        else:
            raise FisherError(f"the dual kernel G Gᵀ + NλI (λ = {self.lam:g}) is not positive definite in "
                              "float64: the rows are not finite, or the damping is below their rounding.")
        self.chol = chol  # C, lower, float64: M = C Cᵀ

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` in the product dtype and ``G xᵀ`` (float64, ``[R, m]``); float64 throughout for
        an ``x`` whose float32 product overflows."""
        xd = x.detach().to(device=self.rows.device, dtype=self.rows.dtype)
        with _exact_products():
            u = (self.rows @ xd.T).double()
        if self.rows.dtype != torch.float64 and not bool(torch.isfinite(u).all()) and bool(torch.isfinite(x).all()):
            xd = x.detach().to(device=self.rows.device, dtype=torch.float64)
            u = self.rows.double() @ xd.T
        return xd, u

    @torch.no_grad()
    def solve(self, x: Tensor) -> Tensor:
        """``(F + λI)⁻¹ xᵀ`` row by row: ``[m, k]`` -> ``[m, k]`` float64, on the block's device."""
        xd, u = self._project(x)
        y = torch.cholesky_solve(u, self.chol)  # M⁻¹ G xᵀ, [R, m]
        rows = self.rows if xd.dtype == self.rows.dtype else self.rows.double()
        with _exact_products():
            back = (y.to(rows.dtype).T @ rows).double()  # (Gᵀ M⁻¹ G xᵀ)ᵀ
        if rows.dtype != torch.float64 and not bool(torch.isfinite(back).all()) and bool(torch.isfinite(y).all()):
            back = y.T @ rows.double()  # M⁻¹ G xᵀ beyond float32's range (N λ < 1 and a huge x)
        return (xd.double() - back) / self.lam

    @torch.no_grad()
    def quadratic(self, x: Tensor) -> Tensor:
        """``x_i (F + λI)⁻¹ x_iᵀ`` per row, float64 ``[m]`` (``>= 0``), on the block's device."""
        xd, u = self._project(x)
        v = torch.linalg.solve_triangular(self.chol, u, upper=False)  # C⁻¹ G xᵀ
        return ((xd.double().square().sum(1) - v.square().sum(0)) / self.lam).clamp_(min=0.0)

    @torch.no_grad()
    def condition_number(self, exact: bool = False, iterations: int = 8) -> float:
        """``κ(F + λI) = (λ_max(GGᵀ)/N + λ) / λ``: the smallest eigenvalue is ``λ`` exactly (``F``
        has rank at most ``R < k``). ``λ_max(GGᵀ)`` is bounded from below by its largest diagonal
        entry and ``iterations`` power steps (``O(R²)`` each) as the ``k x k`` factors' estimate
        is, or is ``eigvalsh``'s (``exact=True``, ``O(R³)``)."""
        kernel = self.kernel
        if exact:
            top = float(torch.linalg.eigvalsh(kernel)[-1])
        else:
            top = float(kernel.diagonal().max())
            gen = torch.Generator(device=kernel.device).manual_seed(0)
            v = torch.randn(kernel.shape[0], 1, generator=gen, dtype=kernel.dtype, device=kernel.device)
            for _ in range(iterations):
                v = kernel @ v
                v /= v.norm()
            top = max(top, float((v.T @ kernel @ v).squeeze()))
        return (max(top, 0.0) / self.count + self.lam) / self.lam

    @torch.no_grad()
    def factor(self) -> Tensor:
        """The ``k x k`` Cholesky factor of ``F + λI`` in the product dtype (``O(k³)``: for saving
        a fit or reading ``FittedFisher.factors``, never needed to score)."""
        with _exact_products():
            fisher = (self.rows.T @ self.rows) / self.count
        fisher = (fisher + fisher.T) / 2
        fisher.diagonal().add_(self.lam)
        factor, info = cholesky_ex(fisher)
        if int(info) != 0:  # float32 rounding of a badly conditioned block: float64
            fisher = self.rows.double().T @ self.rows.double() / self.count
            fisher.diagonal().add_(self.lam)
            factor = torch.linalg.cholesky(fisher).to(self.rows.dtype)
        return factor


def _exact_products():
    from grass_callback.fisher import _full_precision_matmul

    return _full_precision_matmul()
