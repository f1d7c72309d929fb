"""SDPA core attention with the semantics of Megatron's local `DotProductAttention`.

`FluidCoreAttention` is built by `Attention.__init__` through `submodules.core_attention` (the
`CoreAttentionBuilder` protocol) and called as `core(q, k, v, attention_mask, *, attn_mask_type,
attention_bias, packed_seq_params)`. It runs `torch.nn.functional.scaled_dot_product_attention`
(flash / cuDNN / memory-efficient kernels on GPU, the math kernel on CPU), so there is no
`[b, np, s, s]` score buffer and no CUDA-only global memory buffer (local DotProductAttention needs
both and asserts context_parallel_size == 1). Under Ulysses context parallelism it sees the full
sequence on `heads/cp` heads, so it never needs to know about CP.

Semantics kept from DotProductAttention:
  - scale: `softmax_scale` if given, else 1/sqrt(kv_channels). `apply_query_key_layer_scaling`
    divides the scale by the layer number and multiplies the fp32 scores back by it inside the
    softmax: a numerical device with no effect on the result, so it is not replicated.
  - causal: for `AttnMaskType.causal` the mask is the upper triangle in natural order; a passed
    `attention_mask` is ignored, as Megatron's fused causal softmax and Transformer Engine do.
    Other mask types use `attention_mask` (bool, True = masked out) when given.
  - GQA: k/v heads are repeated (`repeat_interleave`) to the number of query heads, as
    DotProductAttention does; this keeps every SDPA backend eligible.
  - dropout: `config.attention_dropout` in training only, drawn inside Megatron's CUDA RNG
    tracker fork (as DotProductAttention, unless sequence_parallel) on CUDA.
Refused (ValueError / NotImplementedError, never silently different): softmax_type other than
"vanilla", sliding-window layers, attention_bias, packed sequences (THD).

Shapes: q `[sq, b, nq, hn]`, k/v `[sk, b, nk, hn]` (nq % nk == 0) -> `[sq, b, nq*hn]`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention


class FluidCoreAttention(MegatronModule):
    """Scaled-dot-product core attention (see module docstring). No parameters.

    Args: those of the `CoreAttentionBuilder` protocol (Megatron core_v0.19) plus
    `attention_dropout` (as DotProductAttention). `cp_comm_type` and `pg_collection` are accepted
    and unused: context parallelism is done by the caller's all-to-alls.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"FluidCoreAttention supports softmax_type='vanilla' only, not {config.softmax_type!r}"
            )
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            raise ValueError("FluidCoreAttention does not support sliding-window attention layers")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """q `[sq, b, nq, hn]`, k/v `[sk, b, nk, hn]`, mask `[b or 1, 1, sq, sk]` bool or None
        -> `[sq, b, nq*hn]`."""
        if packed_seq_params is not None:
            raise NotImplementedError("FluidCoreAttention does not support packed sequences (THD)")
        if attention_bias is not None:
            raise NotImplementedError("FluidCoreAttention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, nq, hn = query.shape
        nk = key.shape[2]
        if nq != nk:
            if nq % nk:
                raise ValueError(f"{nq} query heads are not a multiple of {nk} key/value heads")
            key = key.repeat_interleave(nq // nk, dim=2)
            value = value.repeat_interleave(nq // nk, dim=2)

        causal = mask_type == AttnMaskType.causal and sq > 1
        if causal and sq != key.shape[0]:
            raise ValueError("causal mask is only for self attention (sq == sk)")
        attn_mask = None
        if not causal and attention_mask is not None:
            attn_mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend

        dropout_p = self.dropout_p if self.training else 0.0
        rng = contextlib.nullcontext()
        if dropout_p > 0.0 and query.is_cuda and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            # [s, b, n, hn] -> [b, n, s, hn] (views; SDPA needs only the last dim contiguous)
            out = F.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3),
                key.permute(1, 2, 0, 3),
                value.permute(1, 2, 0, 3),
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=causal,
                scale=self.softmax_scale,
            )
        # [b, nq, sq, hn] -> [sq, b, nq*hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)
