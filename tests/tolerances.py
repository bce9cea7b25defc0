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

# float32 against float32, the same maths by another route (engine vs engine, cached decoding vs
# one forward, ring shards vs one process): both round alike, tighter than TOL[float32].
SAME_ROUTE_F32 = dict(atol=1e-5, rtol=1e-5)
# ... through a whole model (the chapter's GPT: a few layers add their roundings up).
SAME_MODEL_F32 = dict(atol=2e-5, rtol=1e-5)
# Numbers the chapter prints with 4 decimals: at most half a unit of the last printed digit.
PRINTED = dict(atol=5e-5, rtol=0)
# Whole models against transformers in float32: attention implementations against "eager"
# (the bound of issue 12), and the rebuilt MiniLM encoder against BertModel (six layers).
HF_EAGER_F32 = dict(atol=1e-5, rtol=0)
ENCODER_F32 = dict(atol=1e-4, rtol=0)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, grad: bool = False, **kw
) -> None:
    """``actual`` (any dtype) against a float64 ``expected``, with ``dtype``'s tolerances.

    ``grad=True`` takes the gradient row of the table.
    """
    tol = {**(GRAD_TOL if grad else TOL)[dtype], **kw}
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# The chapter's GPT with GPT-2's weights against transformers' GPT2LMHeadModel, float32 logits
# (issue 19's bound).
HF_GPT2_F32 = dict(atol=1e-4, rtol=0)

# Attention weights (in [0, 1]) stored as float16, against float32 ones: float16's rounding is at
# most half a unit in the last place, 2^-12 just under 1, plus SAME_MODEL_F32's route.
STORED_F16 = dict(atol=2.5e-4 + 2e-5, rtol=0)

# Training losses of a run split across processes (data or context parallel) against one
# process's on the same global batches, float32: the same maths summed in another order.
TRAIN_LOSS_ABS = 1e-4
