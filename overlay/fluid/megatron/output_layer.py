"""Entry point called by the patched `GPTModel.__init__` (patch 0005) for the output layer.

Installed by overlay/pyproject.toml under the entry-point group
`megatron.core.gpt_output_layer_hooks`; Megatron calls it only when `config.use_fluid_moe` is set.
For an untied output layer that would be Megatron's local ColumnParallelLinear it returns
FluidColumnParallelLinear (same parameters, state-dict key `output_layer.weight`), whose dW is
deferred: in backward the output layer comes first, so its dW (`[vocab, hidden]`, 2 x tokens x
hidden x vocab FLOPs: 0.54 TFLOP per micro-batch for the 64-expert benchmark model, the largest
single dW of the step) waits for the top MoE layer's combine-backward all-to-all, a window that
otherwise has no dW (docs/CORE_CONCEPT.md, section 2).

Everything else keeps Megatron's class:
  - a tied output layer (`share_embeddings_and_output_weights`): the weight is the embedding's,
    whose own gradient reaches the same AccumulateGrad at the end of backward; a deferred dW
    handed over separately would fire Megatron DDP's hook for it twice per backward;
  - multi-token prediction (`mtp_num_layers`): the output layer runs once per prediction depth,
    and each deferred dW would be handed over on its own, again firing DDP's hook more than once;
  - `defer_embedding_wgrad_compute` (pipeline parallelism): Megatron defers this dW itself;
  - Transformer Engine's output layer (MXFP8 output projection) or any other class.
"""

from __future__ import annotations

import functools


def output_layer_class(config, output_layer_cls, share_embeddings_and_output_weights: bool):
    """The class (or a callable taking ColumnParallelLinear's arguments) for GPTModel's output
    layer; see the module docstring."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from fluid.linear import FluidColumnParallelLinear

    if (
        output_layer_cls is not ColumnParallelLinear
        or share_embeddings_and_output_weights
        or getattr(config, "mtp_num_layers", None)
        or getattr(config, "defer_embedding_wgrad_compute", False)
    ):
        return output_layer_cls
    return functools.partial(FluidColumnParallelLinear, name="output_layer")
