"""Entry point called by the patched `get_gpt_decoder_layer_specs` (patch 0002).

Installed by overlay/pyproject.toml under the entry-point group
`megatron.core.gpt_layer_spec_hooks`. Megatron calls it only when `config.use_fluid_moe` is set,
with the dense and MoE layer specs it just built, before it applies `moe_layer_freq` and slices
the layers for the pipeline stage, so patterns, pipeline slicing and MTP all see the Fluid specs.
Megatron resolves the entry point (`ep.load()`) at each call, so a test replaces the
transformation by patching this module's `transform_layer_specs` (pytest's monkeypatch); the
module keeps no state of its own.
"""

from __future__ import annotations


def transform_layer_specs(config, dense_layer_spec, moe_layer_spec, use_transformer_engine):
    """Return the (dense, moe) layer specs with Fluid attention and Fluid MoE swapped in."""
    from fluid.megatron.specs import fluidize_layer_spec
    from fluid.megatron.validate import validate_config

    validate_config(config)
    return (
        fluidize_layer_spec(dense_layer_spec, config, use_transformer_engine),
        fluidize_layer_spec(moe_layer_spec, config, use_transformer_engine),
    )
