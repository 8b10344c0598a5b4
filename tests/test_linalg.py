"""The CPU blocked Cholesky of the fit (grass_callback/_linalg.py) against LAPACK's."""

import pytest
import torch

from grass_callback._linalg import cholesky_ex


def _spd(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(2 * n, n, generator=gen, dtype=torch.float64)
    matrix = rows.T @ rows / (2 * n) + 1e-2 * torch.eye(n, dtype=torch.float64)
    return matrix.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,block", [(50, 7), (64, 16), (300, 256), (1024, 256), (1030, 256)])
def test_blocked_factor_equals_lapack(n, block, dtype):
    matrix = _spd(n, dtype, seed=n)
    before = matrix.clone()
    factor, info = cholesky_ex(matrix, block=block)
    want, want_info = torch.linalg.cholesky_ex(matrix)
    assert int(info) == 0 == int(want_info)
    assert torch.equal(matrix, before)  # the input is left alone
    assert torch.equal(factor, factor.tril())  # lower triangular, zeros above
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(factor, want, rtol=tol, atol=tol * float(want.abs().max()))
    # and it is a factor: L Lᵀ gives the matrix back
    torch.testing.assert_close(factor.double() @ factor.double().T, matrix.double(), rtol=0,
                               atol=10 * tol * float(matrix.abs().max()))


@pytest.mark.parametrize("bad", [3, 37, 63])  # in the first block, a middle one, the last one
def test_failure_reports_the_leading_minor_as_lapack(bad):
    n, block = 64, 16
    matrix = torch.eye(n, dtype=torch.float64) + 0.01 * _spd(n, torch.float64, seed=1)
    matrix[bad, bad] = -1.0
    _, info = cholesky_ex(matrix, block=block)
    _, want = torch.linalg.cholesky_ex(matrix)
    assert int(want) == bad + 1
    assert int(info) == int(want)


def test_a_schur_complement_that_fails_is_caught():
    # every diagonal block alone is positive definite; the matrix is not (the off-diagonal block
    # makes the second block's Schur complement indefinite), so only the trailing update finds it
    n, block = 32, 16
    matrix = torch.eye(n, dtype=torch.float64)
    matrix[16:, :16] = matrix[:16, 16:] = 1.5 * torch.eye(16, dtype=torch.float64)
    assert all(int(torch.linalg.cholesky_ex(matrix[a:a + 16, a:a + 16])[1]) == 0 for a in (0, 16))
    _, info = cholesky_ex(matrix, block=block)
    assert int(info) == int(torch.linalg.cholesky_ex(matrix)[1]) == 17
