"""The one table of per-dtype tolerances for comparing against a float64 reference."""

import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
# Gradients sum over whole rows or columns of the weights, so they carry more rounding.
GRAD_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=2e-4),
    torch.bfloat16: dict(atol=1.2e-1, rtol=1.2e-1),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, grad: bool = False, **kw
) -> None:
    """``actual`` (any dtype) against a float64 ``expected``, with ``dtype``'s tolerances.

    ``grad=True`` takes the gradient row of the table.
    """
    tol = {**(GRAD_TOL if grad else TOL)[dtype], **kw}
    torch.testing.assert_close(actual.double(), expected.double(), **tol)
