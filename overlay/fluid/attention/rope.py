"""Rotary embedding for FluidSelfAttention: Megatron's unfused RoPE, same bits, fewer launches.

`apply_rope(t, freqs, config, mscale, cp_group)` returns exactly what Megatron's
`apply_rotary_pos_emb(t, freqs, config=config, cu_seqlens=None, mscale=mscale, cp_group=...)`
returns (the unfused `_apply_rotary_pos_emb_bshd`: `t * cos + rotate_half(t) * sin`), bit for bit,
values and gradients. The model is host-bound at small per-layer work, so launches count; per layer
forward + backward Megatron's version launches, for q and for k each:
  - cos, sin, two `* mscale`, two casts: of the same `freqs` tensor, in every layer and step
    (Megatron's RotaryEmbedding.forward is lru_cached, so every layer gets the same tensor);
  - `torch.cat((t, t_pass))` with an empty `t_pass` (a copy), whose backward is a zero-filled
    full-size `slice_backward` plus an add;
  - `-x2` in `rotate_half`, and its backward's negation.
Here cos and sin are computed once per `freqs` tensor and layer (`RotaryCosSin`, kept while that
tensor is the layer's latest and unmodified), the pass-through part is skipped when the rotation covers the whole head,
and the sign of `-x2` is folded into the cached sin: `(-x2) * s == x2 * (-s)` exactly in IEEE
arithmetic (round to nearest is symmetric in sign), forward and backward. (One difference no
value shows: where a gradient element of q or k is exactly -0.0, Megatron's, which adds the zeros of
the pass-through slice's backward, has +0.0.) Double backward is refused (once_differentiable), as
by the Fluid linears around it.

Anything else (fused RoPE, interleaved rotation, partial rotary dim, freqs that require grad)
goes to Megatron's `apply_rotary_pos_emb` unchanged.
"""

from __future__ import annotations

import weakref

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb


class RotaryCosSin:
    """`(cos, sin_signed)` of rotary angles `freqs` `[s, ..., d]` in `dtype`: Megatron's
    `(torch.cos(freqs) * mscale).to(dtype)` and the same for sin with its first half negated.

    One per FluidSelfAttention (the layer owns it): kept for the last `freqs` tensor it was asked
    about (identity, version counter, dtype, mscale), so each step after the first reuses them
    (Megatron's RotaryEmbedding.forward is lru_cached: the same tensor every step). Holds the
    tensor only weakly; not pickled (`__getstate__`)."""

    def __init__(self):
        self._entry: tuple | None = None  # (key, weakref to freqs, freqs._version, cos, sin)

    def __call__(
        self, freqs: torch.Tensor, dtype: torch.dtype, mscale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, mscale, torch.is_inference_mode_enabled())
        e = self._entry
        if e is not None and e[0] == key and e[1]() is freqs and e[2] == freqs._version:
            return e[3], e[4]
        cos = (torch.cos(freqs) * mscale).to(dtype)
        sin = (torch.sin(freqs) * mscale).to(dtype)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        self._entry = (key, weakref.ref(freqs), freqs._version, cos, sin)
        return cos, sin

    def __getstate__(self):
        return {"_entry": None}


def apply_rope(
    t: torch.Tensor, freqs: torch.Tensor, config, mscale: float, cp_group, cos_sin: RotaryCosSin
) -> torch.Tensor:
    """RoPE of `t` `[s, b, n, hn]` with angles `freqs` `[s, 1, 1, rot]` (module docstring);
    `cos_sin`: the calling layer's RotaryCosSin."""
    rot = freqs.shape[-1]
    if (
        config.apply_rope_fusion
        or config.rotary_interleaved
        or rot != t.shape[-1]
        or rot % 2
        or freqs.requires_grad
    ):
        return apply_rotary_pos_emb(
            t, freqs, config=config, cu_seqlens=None, mscale=mscale, cp_group=cp_group
        )
    return _Rope.apply(t, *cos_sin(freqs, t.dtype, mscale))


class _Rope(torch.autograd.Function):
    """`t * cos + cat(-x2, x1) * sin` with the sign folded into `sin_signed` (module docstring).

    A Function so that the output and the gradient of `t` are contiguous (the first operand of
    each add is a cat's result), as Megatron's are (its final cat, and the zero-filled
    slice_backward its gradient is added to): a layout-sensitive reduction upstream (q/k
    layernorm's weight gradient on CPU) then sums in the same order. Plain autograd would give the
    gradient the layout of SDPA's dq.
    """

    @staticmethod
    def forward(ctx, t, cos, sin_signed):
        ctx.save_for_backward(cos, sin_signed)
        x1, x2 = torch.chunk(t, 2, dim=-1)
        # contiguous first operand, contiguous result; a + b == b + a exactly
        return torch.cat((x2, x1), dim=-1) * sin_signed + t * cos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin_signed = ctx.saved_tensors
        # Megatron's: grad * cos + cat(g2 * s2, -(g1 * s1)); the sign is in sin_signed
        r1, r2 = torch.chunk(grad * sin_signed, 2, dim=-1)
        return torch.cat((r2, r1), dim=-1) + grad * cos, None, None
