"""Entry point called by the patched `get_gpt_decoder_layer_specs` (patch 0002).

Installed by overlay/pyproject.toml under the entry-point group
`megatron.core.gpt_layer_spec_hooks`. Megatron calls it only when `config.use_fluid_moe` is set,
with the dense and MoE layer specs it just built, before it applies `moe_layer_freq` and slices
the layers for the pipeline stage, so patterns, pipeline slicing and MTP all see the Fluid specs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

_override: Optional[Callable] = None


@contextlib.contextmanager
def override_transform(fn: Callable):
    """Replace the transformation for a test: fn(config, dense, moe, use_te) -> (dense, moe)."""
    global _override
    old, _override = _override, fn
    try:
        yield
    finally:
        _override = old


def transform_layer_specs(config, dense_layer_spec, moe_layer_spec, use_transformer_engine):
    """Return the (dense, moe) layer specs with Fluid attention and Fluid MoE swapped in."""
    if _override is not None:
        return _override(config, dense_layer_spec, moe_layer_spec, use_transformer_engine)
    from fluid.megatron.specs import fluidize_layer_spec
    from fluid.megatron.validate import validate_config

    validate_config(config)
    return (
        fluidize_layer_spec(dense_layer_spec, config, use_transformer_engine),
        fluidize_layer_spec(moe_layer_spec, config, use_transformer_engine),
    )
