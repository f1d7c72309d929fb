"""FluidSelfAttention: Ulysses all-to-all context parallelism for Megatron, without TE.

from fluid.attention import FluidSelfAttention, fluid_self_attention_spec
spec.submodules.self_attention = fluid_self_attention_spec(spec.submodules.self_attention)
"""

from __future__ import annotations

import dataclasses
import functools

from fluid.attention.core import FluidCoreAttention
from fluid.attention.layer import FluidSelfAttention, fluid_submodules

__all__ = [
    "FluidSelfAttention",
    "FluidCoreAttention",
    "fluid_self_attention_spec",
    "fluid_submodules",
]


def fluid_self_attention_spec(stock_attention_spec):
    """Turn a stock SelfAttention spec (local or TE) into the FluidSelfAttention one.

    Accepts `ModuleSpec(module=SelfAttention, params=..., submodules=SelfAttentionSubmodules)` or
    `functools.partial(SelfAttention, submodules=..., ...)`; returns a new spec of the same form
    (the input is not modified) with module FluidSelfAttention, Fluid linear_qkv / linear_proj,
    the SDPA core attention, and the same params (attn_mask_type) and q/k layernorm specs.

    Raises ValueError for a non-SelfAttention module (e.g. MLA) or a layernorm-fused linear_qkv.
    """
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(stock_attention_spec, functools.partial):
        module, kwargs = stock_attention_spec.func, dict(stock_attention_spec.keywords)
    elif isinstance(stock_attention_spec, ModuleSpec):
        module, kwargs = stock_attention_spec.module, None
    else:
        raise ValueError(f"not a ModuleSpec or partial: {stock_attention_spec!r}")
    if not (isinstance(module, type) and issubclass(module, SelfAttention)):
        raise ValueError(f"fluid_self_attention_spec needs a SelfAttention spec, got {module!r}")
    if kwargs is not None:
        kwargs["submodules"] = fluid_submodules(kwargs["submodules"])
        return functools.partial(FluidSelfAttention, *stock_attention_spec.args, **kwargs)
    return dataclasses.replace(
        stock_attention_spec,
        module=FluidSelfAttention,
        submodules=fluid_submodules(stock_attention_spec.submodules),
        params=dict(stock_attention_spec.params),
    )
