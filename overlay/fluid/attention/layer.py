"""FluidSelfAttention: Megatron SelfAttention with Ulysses all-to-all context parallelism.

Drop-in for `megatron.core.transformer.attention.SelfAttention` (core_v0.19): same constructor,
same `forward` signature and `(output, bias)` return, same parameters and state-dict keys
(`linear_qkv` with Megatron's per-query-group interleaved rows `[q.. k v | q.. k v | ...]`,
`linear_proj`, `q_layernorm`/`k_layernorm`). Stock Megatron without Transformer Engine has no
context parallelism; this layer brings it without TE.

Forward on a CP rank (`s` = S/cp local tokens in Megatron's load-balanced layout, see cp_layout):

    hidden [s, b, h] --linear_qkv (Fluid, dW deferred)--> q [s,b,np,hn], k/v [s,b,ng,hn]
      (q/k layernorm inside Megatron's get_query_key_value_tensors)
    v                 --sp2hp a2a (async)------------------------------------------+
    q --RoPE-->       --sp2hp a2a (async)------------------------------------------+  in flight
    k --RoPE-->(KV replication if cp does not divide ng) --sp2hp a2a (async)--------+  together
    wait; zigzag -> natural order: q [S,b,np/cp,hn], k/v [S,b,ng'/cp,hn]
    core attention (SDPA, causal, over the full sequence) -> [S, b, np/cp*hn]
    natural -> zigzag; hp2sp a2a -> [s, b, np*hn]; linear_proj (Fluid, dW deferred)

RoPE is applied before the all-to-all, on the local tokens, with the `rotary_pos_emb` Megatron
passes: `RotaryEmbedding.forward(..., cp_group)` already sliced it to this rank's two chunks
(`get_pos_emb_on_this_cp_rank`), so each token gets its global position. v goes first because it
needs no work, so its exchange overlaps q's and k's RoPE.

Backward: linear_proj's dW is queued and runs in the window of the hp2sp all-to-all's backward
(the first window); linear_qkv's dW is queued after the q/k/v windows, so it waits for the next
layer's first window (or the end-of-backward flush). See fluid/schedule/scheduler.py.

GQA: the sp2hp all-to-all gives rank r a contiguous block of heads. With ng % cp == 0 rank r gets
query heads [r*np/cp, (r+1)*np/cp) and exactly their kv groups. Otherwise every kv head is
repeated rep = cp/gcd(ng, cp) times (ng*rep = lcm(ng, cp) heads, which np is a multiple of), so
each rank again holds the kv heads of its query heads; the backward of the repeat sums the
copies' gradients. np % cp != 0 is refused at build time.

Refused (clear errors, never silently different): tensor parallel size > 1, inference / KV-cache
calls, packed sequences (THD), attention_bias, cross attention (key_value_states), non-causal
masks with cp > 1, fused single-QKV RoPE.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import get_pg_size

from fluid.attention.core import FluidCoreAttention
from fluid.attention.cp_layout import natural_to_zigzag, zigzag_to_natural
from fluid.attention.rope import RotaryCosSin, apply_rope
from fluid.comm import fluid_all_to_all_hp2sp, fluid_all_to_all_sp2hp
from fluid.linear import FluidColumnParallelLinear, FluidRowParallelLinear
from fluid.megatron.validate import check_tensor_parallel_size, validate_config
from fluid.runtime import runtime_for


def fluid_submodules(submodules: SelfAttentionSubmodules) -> SelfAttentionSubmodules:
    """The same submodules with Fluid linears and the SDPA core (q/k layernorm kept).

    Any linear_qkv / linear_proj (local or Transformer Engine) becomes the Fluid one with the
    same parameters, except a linear that fuses the input layernorm (TE's
    `TELayerNormColumnParallelLinear`): replacing it would silently drop the layer's input norm
    (such specs set `input_layernorm=IdentityOp`), so it is refused.
    """

    def swap(cls, fluid):
        if isinstance(cls, type) and issubclass(cls, fluid):
            return cls
        name = getattr(cls, "__name__", repr(cls))
        if "LayerNorm" in name:
            raise ValueError(
                f"FluidSelfAttention cannot replace {name}: it fuses the input layernorm. Use "
                "a spec with a separate input_layernorm, e.g. get_gpt_layer_local_spec "
                "(--transformer-impl local)."
            )
        return fluid

    return dataclasses.replace(
        submodules,
        linear_qkv=swap(submodules.linear_qkv, FluidColumnParallelLinear),
        linear_proj=swap(submodules.linear_proj, FluidRowParallelLinear),
        core_attention=FluidCoreAttention,
    )


class FluidSelfAttention(SelfAttention):
    """Self-attention with Ulysses context parallelism over `pg_collection.cp` (module doc).

    Args: exactly `SelfAttention.__init__`'s at core_v0.19 (config, submodules, layer_number,
    attn_mask_type, cp_comm_type, pg_collection, pp_layer_offset, name). `cp_comm_type` is
    accepted and ignored (the all-to-all is the only CP scheme here). `submodules` go through
    `fluid_submodules`, so the core attention is always the SDPA one.
    """

    def __init__(
        self,
        config,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        cp_comm_type: str | None = None,
        pg_collection=None,
        pp_layer_offset: Optional[int] = None,
        name: str | None = None,
    ):
        check_tensor_parallel_size(config.tensor_model_parallel_size, "FluidSelfAttention")
        super().__init__(
            config=config,
            submodules=fluid_submodules(submodules),
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            pp_layer_offset=pp_layer_offset,
            name=name,
        )
        # The one validator, on the groups this layer runs on (TP 1, CP divides the heads, ...).
        validate_config(config, self.pg_collection, moe=False)
        cp_group = getattr(self.pg_collection, "cp", None)
        self.cp_size = get_pg_size(cp_group) if cp_group is not None else 1
        ng = config.num_query_groups
        # kv heads are repeated `kv_repeat` times so that cp divides their number (module doc).
        self.kv_repeat = self.cp_size // math.gcd(ng, self.cp_size)
        # The model's runtime (fluid.runtime): settings, scheduler, the CP group's one context.
        self.fluid_runtime = runtime_for(config)
        self.fluid_config = self.fluid_runtime.config
        self.scheduler = self.fluid_runtime.scheduler
        self.cp_comm = self.fluid_runtime.comm(cp_group) if self.cp_size > 1 else None
        self.rope_cos_sin = RotaryCosSin()  # cos/sin of the rotary angles, once per tensor

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        key_value_states: Optional[torch.Tensor] = None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        rotary_pos_cos_sin: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        sequence_len_offset: Optional[int] = None,
        *,
        inference_params=None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`hidden_states` `[s, b, h]` (this CP rank's tokens) -> `(output [s, b, h], bias)`.

        `bias` is linear_proj's bias (skip_bias_add, applied later by the layer's bias-dropout-add)
        or None. `rotary_pos_emb`: `[s, 1, 1, rot_dim]` for this rank (or a (q, k) pair), as
        Megatron's RotaryEmbedding returns it.
        """
        self.scheduler.on_forward()
        self._refuse_unsupported(
            key_value_states,
            inference_context if inference_context is not None else inference_params,
            rotary_pos_cos,
            rotary_pos_sin,
            rotary_pos_cos_sin,
            attention_bias,
            packed_seq_params,
            attention_mask,
        )
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            rotary_pos_emb = None
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        q_emb, k_emb = rotary_pos_emb if rotary_pos_emb is not None else (None, None)

        qkv = self.get_query_key_value_tensors(
            hidden_states, None, output_gate=self.config.attention_output_gate, split_qkv=True
        )
        query, key, value = qkv[:3]
        gate = qkv[3] if self.config.attention_output_gate else None
        s, b = hidden_states.shape[:2]

        if self.cp_size == 1:
            query, key = self._rope(query, q_emb), self._rope(key, k_emb)
            core_out = self._core(query, key, value, attention_mask)
        else:
            core_out = self._ulysses_core(query, key, value, q_emb, k_emb, attention_mask)
            core_out = core_out.view(s, b, -1)

        if gate is not None:
            # Megatron's _apply_output_gate math, eager (its torch.compile'd version costs a
            # minute of compilation on CPU and gains nothing measurable here).
            core_out = (core_out * torch.sigmoid(gate.reshape(core_out.shape).float())).to(
                core_out.dtype
            )
        return self.linear_proj(core_out)

    def _ulysses_core(self, query, key, value, q_emb, k_emb, attention_mask) -> torch.Tensor:
        """Local q `[s,b,np,hn]`, k/v `[s,b,ng,hn]` -> core output `[s*b, np*hn]` (local tokens)."""
        comm, cp = self.cp_comm, self.cp_size
        s, b, _, hn = query.shape
        S = s * cp
        # Launch order v, q, k: each exchange is in flight while the next tensor is prepared.
        # sp2hp takes [tokens, heads*hn]: the heads must be flattened into the hidden dim.
        v_h, v_handle = fluid_all_to_all_sp2hp(
            self._repeat_kv(value).flatten(2), comm, async_op=True
        )
        query = self._rope(query, q_emb)
        q_h, q_handle = fluid_all_to_all_sp2hp(query.flatten(2), comm, async_op=True)
        key = self._repeat_kv(self._rope(key, k_emb))
        k_h, k_handle = fluid_all_to_all_sp2hp(key.flatten(2), comm, async_op=True)
        heads = []
        for t, handle in ((q_h, q_handle), (k_h, k_handle), (v_h, v_handle)):
            handle.wait()
            # [cp*s*b, n/cp*hn] zigzag rows -> [S, b, n/cp, hn] in natural sequence order
            heads.append(zigzag_to_natural(t, cp).view(S, b, -1, hn))
        q, k, v = heads
        out = self._core(q, k, v, attention_mask)  # [S, b, np/cp*hn]
        out = natural_to_zigzag(out, cp)
        return fluid_all_to_all_hp2sp(out, comm)

    # -- pieces -----------------------------------------------------------------------------
    def _rope(self, t: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        if emb is None:
            return t
        # Megatron's unfused RoPE, bit for bit, with fewer launches (fluid/attention/rope.py)
        return apply_rope(
            t,
            emb,
            self.config,
            self._yarn_concentration_factor,
            self.pg_collection.cp,
            self.rope_cos_sin,
        )

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        """`[s, b, ng, hn]` -> `[s, b, ng*kv_repeat, hn]` (each head repeated in place)."""
        return t if self.kv_repeat == 1 else t.repeat_interleave(self.kv_repeat, dim=2)

    def _core(self, query, key, value, attention_mask) -> torch.Tensor:
        if self.checkpoint_core_attention and self.training:
            return self._checkpointed_attention_forward(
                query, key, value, attention_mask, attn_mask_type=self.attn_mask_type
            )
        return self.core_attention(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=self.attn_mask_type,
            attention_bias=None,
            packed_seq_params=None,
        )

    def _refuse_unsupported(
        self,
        key_value_states,
        inference_context,
        rotary_pos_cos,
        rotary_pos_sin,
        rotary_pos_cos_sin,
        attention_bias,
        packed_seq_params,
        attention_mask,
    ) -> None:
        from megatron.core.inference.utils import InferenceMode

        if inference_context is not None or InferenceMode.is_active():
            raise NotImplementedError(
                "FluidSelfAttention is training-only: inference / KV-cache calls are not "
                "supported; build the model with Megatron's stock SelfAttention for inference."
            )
        if any(t is not None for t in (rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin)):
            raise NotImplementedError(
                "FluidSelfAttention: rotary cos/sin inputs are inference-only"
            )
        if packed_seq_params is not None:
            raise NotImplementedError(
                "FluidSelfAttention does not support packed sequences (THD / packed_seq_params)"
            )
        if attention_bias is not None:
            raise NotImplementedError("FluidSelfAttention does not support attention_bias")
        if key_value_states is not None:
            raise NotImplementedError(
                "FluidSelfAttention is self-attention: key_value_states unsupported"
            )
        if (
            self.cp_size > 1
            and attention_mask is not None
            and self.attn_mask_type != AttnMaskType.causal
        ):
            raise NotImplementedError(
                "FluidSelfAttention with context parallelism supports causal attention only "
                f"(attn_mask_type={self.attn_mask_type}, explicit attention_mask given)"
            )
