"""Tier: cpu. `fluid.moe.scale_rows` (row-blocked probs scaling) against the plain expression stock
MLP uses, `(a * probs[:, None]).to(a.dtype)`, with blocks forced small so that several blocks
and a ragged last block run.

Tolerance: forward and dA are elementwise and must be bit-identical (torch.equal). dprobs is a
per-row sum over F whose addition order may differ with the block shape: fp32, rtol 1e-6 (a few
ulp for F = 40), far below any wrong-row or wrong-block error (O(1)).
"""

import pytest
import torch

from fluid.moe.scale_rows import scale_rows, scale_rows_reference


@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_rows", [1, 3, 7, 100])
def test_scale_rows_matches_plain_expression(a_dtype, block_rows):
    g = torch.Generator().manual_seed(0)
    T, F = 23, 40
    a0 = torch.randn(T, F, generator=g).to(a_dtype)
    p0 = torch.rand(T, generator=g)  # fp32 routing probs, as Megatron's router gives them
    grad = torch.randn(T, F, generator=g).to(a_dtype)
    outs = []
    for fn in (scale_rows_reference, lambda a, p: scale_rows(a, p, block_bytes=block_rows * F * 4)):
        a, p = a0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        y = fn(a, p)
        y.backward(grad)
        outs.append((y.detach(), a.grad, p.grad))
    (y_ref, da_ref, dp_ref), (y, da, dp) = outs
    assert y.dtype == y_ref.dtype == a_dtype and da.dtype == a_dtype and dp.dtype == torch.float32
    assert torch.equal(y, y_ref)
    assert torch.equal(da, da_ref)
    torch.testing.assert_close(dp, dp_ref, rtol=1e-6, atol=1e-7)


def test_scale_rows_probs_without_grad_and_shape_check():
    a = torch.randn(5, 4, requires_grad=True)
    y = scale_rows(a, torch.rand(5), block_bytes=16)
    y.sum().backward()
    assert a.grad is not None
    with pytest.raises(ValueError, match="expected a"):
        scale_rows(a, torch.rand(4))
