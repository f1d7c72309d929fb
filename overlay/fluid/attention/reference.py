"""Plain-PyTorch reference of Megatron self-attention, for tests (full sequence, one process).

Computes what `SelfAttention` computes, from its weights, with no Megatron code on the math path:
the interleaved per-query-group QKV split, optional q/k norm (passed in as callables), rotary
embedding with the non-interleaved `rotate_half` convention (Megatron's default), an explicit fp32
causal softmax over `[b, np, S, S]` scores, grouped-query attention by head index, and the output
projection. It is O(S^2) memory and meant for tiny shapes only.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def _rope(t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """`t` `[S, b, n, hn]`, `emb` `[S, 1, 1, rot]` (angles, [f, f] halves) -> rotated `t`."""
    rot = emb.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    x1, x2 = x[..., : rot // 2], x[..., rot // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    x = x * emb.cos() + rotated * emb.sin()
    return torch.cat((x, rest), dim=-1)


def reference_self_attention(
    hidden: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: Optional[torch.Tensor],
    w_proj: torch.Tensor,
    *,
    num_heads: int,
    num_groups: int,
    rotary_pos_emb: Optional[torch.Tensor] = None,
    q_norm: Optional[Callable] = None,
    k_norm: Optional[Callable] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal self-attention without the output bias.

    Args:
        hidden: `[S, b, h]`, the full sequence in natural order.
        w_qkv: `[ng*(np/ng+2)*hn, h]` rows interleaved per group `[q.. k v | q.. k v | ...]`;
            b_qkv: its bias or None. w_proj: `[h, np*hn]`.
        rotary_pos_emb: `[S, 1, 1, rot]` angles for positions 0..S-1, or None.
        q_norm / k_norm: applied to `[S, b, n, hn]` q / k before RoPE, or None.

    Returns:
        `[S, b, h]` = linear_proj(attention) without linear_proj's bias.
    """
    S, b, _ = hidden.shape
    per_group = num_heads // num_groups
    hn = w_proj.shape[1] // num_heads
    mixed = hidden @ w_qkv.t()
    if b_qkv is not None:
        mixed = mixed + b_qkv
    mixed = mixed.view(S, b, num_groups, (per_group + 2) * hn)
    q, k, v = torch.split(mixed, [per_group * hn, hn, hn], dim=-1)
    q = q.reshape(S, b, num_heads, hn)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    if rotary_pos_emb is not None:
        q, k = _rope(q, rotary_pos_emb), _rope(k, rotary_pos_emb)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hn)
    group_of_head = torch.arange(num_heads) // per_group
    k = k[:, :, group_of_head]  # [S, b, np, hn]
    v = v[:, :, group_of_head]
    scores = torch.einsum("sbnd,tbnd->bnst", q.float(), k.float()) * scale
    causal = torch.ones(S, S, dtype=torch.bool, device=hidden.device).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1).to(v.dtype)
    ctx = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(S, b, num_heads * hn)
    return ctx @ w_proj.t()
