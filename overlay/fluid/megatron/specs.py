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

`get_fluid_moe_layer_spec()` without a config (the form FluidMoE v0.5's documentation showed, like
Megatron's bare `get_gpt_layer_local_spec()`) returns a layer ModuleSpec whose module,
`FluidLayerFromConfig`, reads the config when TransformerBlock builds each layer: it builds the
TransformerLayer that the block spec of `get_fluid_moe_layer_spec(config)` has at that position
(dense or MoE by moe_layer_freq, this pipeline stage's slice), so the model is the same module for
module. Megatron's `get_gpt_mtp_block_spec` does not take such a spec: MTP models pass the config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron.core.transformer.transformer_layer import BaseTransformerLayer


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
    config=None,
    use_transformer_engine: Optional[bool] = None,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
):
    """Decoder block spec (TransformerBlockSubmodules) with Fluid layers; see module doc.

    Args:
        config: the model's TransformerConfig (an MoE model: num_moe_experts set). None: a layer
            ModuleSpec that reads the config when each layer is built (`FluidLayerFromConfig`;
            GPTModel and TransformerBlock take it as they take a stock layer spec).
        use_transformer_engine: TE modules for the rest of the layer; default: True iff
            config.transformer_impl == "transformer_engine" and TE is installed.
        normalization, qk_l2_norm, vp_stage, pp_rank: as Megatron's get_gpt_decoder_block_spec
            (with config None, vp_stage and pp_rank come from the block that builds the layer).
    """
    if config is None:
        if vp_stage is not None or pp_rank is not None:
            raise ValueError(
                "get_fluid_moe_layer_spec() without a config takes the pipeline stage from the "
                "block that builds the layer: pass vp_stage/pp_rank only together with a config"
            )
        from megatron.core.transformer.spec_utils import ModuleSpec

        return ModuleSpec(
            module=FluidLayerFromConfig,
            params=dict(
                use_transformer_engine=use_transformer_engine,
                normalization=normalization,
                qk_l2_norm=qk_l2_norm,
            ),
        )
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


class FluidLayerFromConfig(BaseTransformerLayer):
    """Target of the config-less `get_fluid_moe_layer_spec()`: building it builds a layer.

    TransformerBlock turns a layer ModuleSpec whose module subclasses BaseTransformerLayer into
    one copy per layer of its stage, and builds each with `config`, `layer_number` (1-based within
    the stage), `pg_collection` and `vp_stage`. `FluidLayerFromConfig(...)` then returns the
    module that `get_fluid_moe_layer_spec(config, ...)`'s block spec gives that layer (a
    TransformerLayer with FluidSelfAttention, and FluidMoELayer where moe_layer_freq puts an MoE
    layer), built with the same arguments: never an instance of this class. The block's final
    norm is what TransformerBlock gives any layer spec (as for Megatron's bare
    `get_gpt_layer_local_spec()`).
    """

    def __new__(
        cls,
        config,
        layer_number: int = 1,
        *,
        use_transformer_engine: Optional[bool] = None,
        normalization: Optional[str] = None,
        qk_l2_norm: bool = False,
        vp_stage: Optional[int] = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        **kwargs,
    ):
        from megatron.core.transformer.spec_utils import build_module
        from megatron.core.utils import get_pg_rank

        if is_mtp_layer:
            raise ValueError(
                "multi-token prediction layers need the explicit form: build the MTP block spec "
                "from get_fluid_moe_layer_spec(config)"
            )
        pp_rank = None
        if pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
            pp_rank = get_pg_rank(pg_collection.pp)
        block = get_fluid_moe_layer_spec(
            config,
            use_transformer_engine=use_transformer_engine,
            normalization=normalization,
            qk_l2_norm=qk_l2_norm,
            vp_stage=vp_stage,
            pp_rank=pp_rank,
        )
        spec = block.layer_specs[layer_number - 1]
        return build_module(
            spec,
            config=config,
            layer_number=layer_number,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            **kwargs,
        )
