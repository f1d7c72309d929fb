"""Layer specs with Fluid attention and Fluid MoE, built from Megatron's own specs.

`fluidize_layer_spec(spec, config, use_te)` takes one stock TransformerLayer spec (local or TE
backend, dense or MoE) and returns a copy where
  - `self_attention` (SelfAttention) becomes FluidSelfAttention with Fluid linears and the SDPA
    core (fluid.attention.fluid_self_attention_spec), q/k norms kept;
  - an MoE `mlp` (MoELayer, as a functools.partial at 0.19 or a ModuleSpec before) becomes
    FluidMoELayer with the same MoESubmodules (router, experts, shared experts);
  - everything else (norms, dense MLP, bias-dropout-add) is the backend's own.
With the TE backend, whose QKV linear fuses the input LayerNorm, the unfused Fluid QKV linear needs
the layer's `input_layernorm` to be a real norm; it is set to the backend's norm then.

`get_fluid_moe_layer_spec(config, ...)` is the public entry: Megatron's decoder block spec
(`get_gpt_decoder_block_spec`: moe_layer_freq pattern, pipeline-stage slicing) with every layer
fluidized. It does not need the patched hook, so it also serves programmatic model builds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional


def _target(spec):
    if isinstance(spec, functools.partial):
        return spec.func
    return getattr(spec, "module", spec)


def _is_subclass(spec, base) -> bool:
    t = _target(spec)
    return isinstance(t, type) and issubclass(t, base)


def _fluid_moe_mlp(mlp_spec):
    from fluid.moe import FluidMoELayer

    if isinstance(mlp_spec, functools.partial):
        return functools.partial(FluidMoELayer, *mlp_spec.args, **mlp_spec.keywords)
    return dataclasses.replace(mlp_spec, module=FluidMoELayer)


def fluidize_layer_spec(layer_spec, config, use_transformer_engine: bool = False):
    """One TransformerLayer spec with Fluid attention and (for MoE layers) Fluid MoE."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from fluid.attention import FluidSelfAttention, fluid_self_attention_spec
    from fluid.moe import FluidMoELayer

    subs = layer_spec.submodules
    changes = {}
    attn = subs.self_attention
    if _is_subclass(attn, FluidSelfAttention):
        pass  # already Fluid (a spec transformed twice stays the same)
    elif _is_subclass(attn, SelfAttention) and _target(attn).__name__ == "SelfAttention":
        changes["self_attention"] = fluid_self_attention_spec(attn)
        if use_transformer_engine and subs.input_layernorm is IdentityOp:
            from megatron.core.extensions.transformer_engine import TENorm

            changes["input_layernorm"] = TENorm
    else:
        raise ValueError(
            f"--use-fluid-moe supports standard self-attention only, not "
            f"{getattr(_target(attn), '__name__', attn)} (e.g. multi-latent attention): drop "
            "--multi-latent-attention / the experimental attention variant, or --use-fluid-moe"
        )
    if _is_subclass(subs.mlp, MoELayer) and not _is_subclass(subs.mlp, FluidMoELayer):
        changes["mlp"] = _fluid_moe_mlp(subs.mlp)
    if not changes:
        return layer_spec
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(subs, **changes))


def get_fluid_moe_layer_spec(
    config,
    use_transformer_engine: Optional[bool] = None,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
):
    """Decoder block spec (TransformerBlockSubmodules) with Fluid layers; see module doc.

    Args:
        config: the model's TransformerConfig (an MoE model: num_moe_experts set).
        use_transformer_engine: TE modules for the rest of the layer; default: True iff
            config.transformer_impl == "transformer_engine" and TE is installed.
        normalization, qk_l2_norm, vp_stage, pp_rank: as Megatron's get_gpt_decoder_block_spec.
    """
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from fluid.megatron.validate import validate_config

    if use_transformer_engine is None:
        from megatron.core.extensions.transformer_engine import HAVE_TE

        use_transformer_engine = HAVE_TE and config.transformer_impl == "transformer_engine"
    validate_config(config)
    # Build the stock block without going through the registration hook, then fluidize.
    stock_cfg = copy.copy(config)
    stock_cfg.use_fluid_moe = False
    block = get_gpt_decoder_block_spec(
        stock_cfg,
        use_transformer_engine=use_transformer_engine,
        normalization=normalization if normalization is not None else config.normalization,
        qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    cache = {}
    layers = []
    for spec in block.layer_specs:  # dense and MoE specs are shared objects: transform each once
        if id(spec) not in cache:
            cache[id(spec)] = fluidize_layer_spec(spec, config, use_transformer_engine)
        layers.append(cache[id(spec)])
    return dataclasses.replace(block, layer_specs=layers)
