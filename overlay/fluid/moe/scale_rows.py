"""Per-row routing-probability scaling of the expert activation, in row blocks.

Shape legend: T rows (dispatched tokens), F features (expert FFN size).

`scale_rows(a [T, F], probs [T])` returns `(a * probs[:, None]).to(a.dtype)`, the expression stock
`MLP.forward` applies with `per_token_scale` (unfused path), with the same values and gradients.
Why a Function: with bf16 activations and fp32 probs the product is an fp32 `[T, F]` temporary in
forward and another (the fp32 incoming gradient) in backward. Stock SequentialMLP makes it per
expert; FluidGroupedMLP runs all local experts at once, so that temporary was G times larger: for
the Mixtral-like layer (T = 8192, F = 14336) 448 MiB instead of 224 MiB, by this arithmetic most
of the 0.30 GB peak memory Fluid measured above stock (docs/benchmarks/HISTORY.md). Here it is made
`rows_per_block` rows at a time, straight into a preallocated output.

Numerics: forward and the activation gradient are elementwise, so each element is computed by the
same operations as the plain expression (bit-identical). The probs gradient is a per-row sum over
F; blocking changes only which rows one reduction kernel sees, not a row's terms, but the kernel
may order a row's additions differently, so it is equal within fp32 rounding (tests/cpu).
`scale_rows_reference` is the plain expression.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK_BYTES = 64 << 20  # fp32 temporary per block


def scale_rows_reference(a: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The plain expression (stock MLP.forward): `(a * probs[:, None]).to(a.dtype)`."""
    return (a * probs.unsqueeze(-1)).to(a.dtype)


def _rows_per_block(a: torch.Tensor, probs: torch.Tensor, block_bytes: int) -> int:
    wide = torch.promote_types(a.dtype, probs.dtype)
    row_bytes = max(1, a.shape[-1]) * wide.itemsize
    return max(1, block_bytes // row_bytes)


class _ScaleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, probs, rows):
        ctx.save_for_backward(a, probs)
        ctx.rows = rows
        out = torch.empty_like(a)
        same = torch.promote_types(a.dtype, probs.dtype) == a.dtype
        for s in range(0, a.shape[0], rows):
            blk, p_blk = a[s : s + rows], probs[s : s + rows].unsqueeze(-1)
            if same:  # the product is already in a's dtype: write it in place, no copy
                torch.mul(blk, p_blk, out=out[s : s + rows])
            else:
                out[s : s + rows].copy_(blk * p_blk)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, probs = ctx.saved_tensors
        rows = ctx.rows
        wide = torch.promote_types(a.dtype, probs.dtype)
        need_a, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a = torch.empty_like(a) if need_a else None
        grad_p = torch.empty_like(probs) if need_p else None
        for s in range(0, a.shape[0], rows):
            g = grad[s : s + rows].to(wide)  # the .to(a.dtype) of forward, backward
            if need_a and wide == a.dtype:
                torch.mul(g, probs[s : s + rows].unsqueeze(-1), out=grad_a[s : s + rows])
            elif need_a:
                grad_a[s : s + rows].copy_(g * probs[s : s + rows].unsqueeze(-1))
            if need_p and grad_p.dtype == wide:  # the sum straight into grad_p: no copy kernel
                torch.sum(g * a[s : s + rows], -1, out=grad_p[s : s + rows])
            elif need_p:
                grad_p[s : s + rows].copy_((g * a[s : s + rows]).sum(-1))
        return grad_a, grad_p, None


def scale_rows(
    a: torch.Tensor, probs: torch.Tensor, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> torch.Tensor:
    """`[T, F]`, `[T]` -> `[T, F]` in a's dtype: each row of `a` times its prob (module doc)."""
    if a.dim() != 2 or probs.shape != a.shape[:1]:
        raise ValueError(
            f"scale_rows: expected a [T, F] and probs [T], got {a.shape}, {probs.shape}"
        )
    return _ScaleRows.apply(a, probs, _rows_per_block(a, probs, block_bytes))
