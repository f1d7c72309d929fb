"""Test-only (not in the wheel): the small whole-model GPTModel that the GPTModel tests
(tests/dist/test_gpt_model.py, test_combined_1f1b.py, test_v05_interface.py, test_stock_parity.py)
and the combined-1F1B GPU script build; training never imports it.

`gpt_config(...)`: a TransformerConfig for a GPTModel with MoE layers (SwiGLU, RMSNorm, no
biases, dropout off, CPU initialization); the defaults are the 3-layer model of the dist tests.
`build_gpt(config, ...)`: the GPTModel itself (untied embeddings), seeded, with Fluid's layer spec
or stock Megatron's local one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

# Megatron is imported where used: the dist tests import this module in the pytest process, whose
# workers (not the process itself) build the models.
if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig


def gpt_config(
    *,
    layers: int = 3,
    hidden: int = 32,
    ffn: int = 48,
    heads: int = 4,
    groups: int = 2,
    experts: int = 4,
    topk: int = 2,
    moe_ffn: int = 24,
    moe_layer_freq: Union[int, Sequence[int]] = (1, 0, 1),
    ep: int = 2,
    fluid: bool = True,
    dtype: torch.dtype = torch.float32,
    **extra: Any,
) -> TransformerConfig:
    """A GPTModel TransformerConfig; `extra` overrides any field.

    `hidden` is the model width H, `ffn` the dense MLPs' hidden size, `moe_ffn` each expert's;
    `heads` attention heads in `groups` query groups (head dim H / heads); `experts` routed
    experts, top-`topk`, alltoall dispatcher, no aux loss; `moe_layer_freq` 1/0 per layer (MoE /
    dense; the default (1, 0, 1) has a dense middle layer) or an int (every n-th layer MoE);
    expert parallel size `ep`; `fluid` sets `use_fluid_moe`; parameters in `dtype` (bf16 sets
    `bf16`).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=moe_ffn,
        moe_layer_freq=moe_layer_freq if isinstance(moe_layer_freq, int) else list(moe_layer_freq),
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=ep,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        use_fluid_moe=fluid,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def build_gpt(
    config: TransformerConfig,
    *,
    vocab: int,
    seq: int,
    seed: int,
    spec: Optional[Any] = None,
    rope: bool = False,
):
    """GPTModel over `config` with untied input/output embeddings, vocabulary `vocab`, at most
    `seq` positions; it takes tokens `[b, seq]` and gives per-token losses `[b, seq]` (or logits
    `[b, seq, vocab]` without labels).

    `spec`: the transformer layer spec; None gives `get_fluid_moe_layer_spec(config)` when
    `config.use_fluid_moe`, else stock Megatron's local spec (`get_gpt_decoder_block_spec`), both
    without Transformer Engine. Parameters are initialized after `torch.manual_seed(seed)`.
    Positions: learned absolute embeddings, or RoPE with `rope` (whose `inv_freq` goes to CUDA,
    so CPU runs use learned ones).
    """
    from megatron.core.models.gpt import GPTModel

    if spec is None:
        if config.use_fluid_moe:
            from fluid import get_fluid_moe_layer_spec

            spec = get_fluid_moe_layer_spec(config, use_transformer_engine=False)
        else:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

            spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        position_embedding_type="rope" if rope else "learned_absolute",
        share_embeddings_and_output_weights=False,
    )
