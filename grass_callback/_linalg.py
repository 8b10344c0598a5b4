"""Dense factorisations of the scoring period, fast on one CPU thread.

LAPACK's Cholesky (``torch.linalg.cholesky_ex``, MKL in torch's CPU wheel) of a ``1024 x 1024``
float32 matrix took 17 ms on one CPU thread here, a fifth of the speed at which the same thread
multiplies matrices (its ``k³/3`` multiply-adds are 3 ms of product work). A right-looking blocked
factorisation spends almost all of its multiply-adds in one product per block column (the
trailing update), and took 5 ms. ``benchmarks/period_cost_mlp.py`` times the period's algebra
both ways side by side. On CUDA the library's own factorisation is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 256  # block columns of the CPU factorisation (128-512 timed within 20% of each other)


def cholesky_ex(matrix: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """``(L, info)`` as :func:`torch.linalg.cholesky_ex` for a square symmetric matrix (only its
    lower triangle is read): ``L`` lower triangular with ``L Lᵀ = matrix``, ``info`` 0 on success,
    else a positive int32 tensor (the order of a leading minor that is not positive definite, as
    LAPACK's). On CPU, for matrices larger than ``block``, blocked: for each block column ``j``,
    factor the diagonal block, solve the panel below it against that factor and subtract the
    panel's outer product from the trailing matrix. The input is not modified."""
    n = matrix.shape[-1]
    if matrix.device.type != "cpu" or matrix.ndim != 2 or n <= block:
        return torch.linalg.cholesky_ex(matrix)
    work = matrix.tril()  # a copy; the strict upper triangle is zero, as in LAPACK's result
    for start in range(0, n, block):
        end = min(start + block, n)
        diag, info = torch.linalg.cholesky_ex(work[start:end, start:end])
        if int(info) != 0:
            return work, info + start
        work[start:end, start:end] = diag
        if end == n:
            break
        # panel X with X Lᵀ = A[end:, start:end], solved as L Xᵀ = Aᵀ (the left solve ran 2x faster)
        panel = torch.linalg.solve_triangular(diag, work[end:, start:end].T, upper=False).T
        work[end:, start:end] = panel
        trailing = work[end:, end:]
        trailing.addmm_(panel, panel.T, alpha=-1.0)  # both triangles: one product, then kept lower
    work.tril_()
    return work, torch.zeros((), dtype=torch.int32)
