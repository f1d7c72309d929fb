"""Test-only (not in the wheel): helpers shared by the attention tests, the GPU parity script and
the benchmarks; training never imports them.

`attention_config(...)`: a one-layer TransformerConfig for self-attention (dropout off).
`build_attention(kind, config, pg)`: stock `SelfAttention` or `FluidSelfAttention` from Megatron's
local GPT spec (the Fluid one through `fluid_self_attention_spec`), seeded identically.
`pg_collection(tp, cp)`: an explicit ProcessGroupCollection.
`megatron_shard(x, cp_group)`: this rank's part of `[S, b, ...]` through Megatron's own
`get_batch_on_this_cp_rank` (the data path's CP layout).
`fwd_bwd(layer, x, emb, grad_out)`: one forward + backward; output, dX, parameter grads, scheduler
stats.
`init_cp_run(device)`: torchrun script set-up: process group (NCCL or gloo), Megatron model
parallel state with CP = world, the RNG tracker on CUDA, and the groups the scripts use.
`rope_emb(seq, head_dim, cp_group, device)`: this CP rank's rotary angles `[s, 1, 1, hn]`; on CUDA
through Megatron's own `RotaryEmbedding.forward(seq, cp_group=...)` (its CP slicing uses `.cuda()`),
on CPU with the same formula and `shard_sequence`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fluid.attention.cp_layout import shard_sequence


def attention_config(
    *,
    heads: int,
    groups: int,
    head_dim: int,
    cp: int = 1,
    qk_layernorm: bool = False,
    bias: bool = False,
    gate: bool = False,
    dtype: torch.dtype = torch.float32,
    **extra,
):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        context_parallel_size=cp,
        qk_layernorm=qk_layernorm,
        add_bias_linear=bias,
        attention_output_gate=gate,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        init_method_std=0.2,  # large enough that attention is far from uniform in tests
    )
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def pg_collection(tp, cp):
    from megatron.core.process_groups_config import ProcessGroupCollection

    p = ProcessGroupCollection()
    p.tp, p.cp = tp, cp
    return p


def build_attention(kind: str, config, pg, seed: int = 1234, device=None):
    """`kind` "stock" or "fluid"; with qk-layernorm the norm weights are drawn in [0.5, 1.5] so
    that a misplaced norm shows."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from fluid.attention import fluid_self_attention_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm).submodules.self_attention
    if kind == "fluid":
        spec = fluid_self_attention_spec(spec)
    elif kind != "stock":
        raise ValueError(kind)
    torch.manual_seed(seed)
    layer = build_module(spec, config=config, layer_number=1, pg_collection=pg)
    if config.qk_layernorm:
        with torch.no_grad():
            for norm in (layer.q_layernorm, layer.k_layernorm):
                norm.weight.uniform_(0.5, 1.5)
    # Megatron's Float16Module casts every parameter (norms included, which torch builds in fp32)
    # to the training dtype; do the same so bf16 layers see bf16 norm weights.
    layer = layer.to(dtype=config.params_dtype)
    return layer.to(device) if device is not None else layer


def rope_angles(seq: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """`[seq, 1, 1, dim]` angles as Megatron's RotaryEmbedding (non-interleaved) makes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def rope_emb(seq: int, head_dim: int, cp_group, device) -> torch.Tensor:
    """This CP rank's rotary angles for a `seq`-token sequence (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        return RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, cp_group=cp_group).forward(
            seq, cp_group=cp_group
        )
    cp = dist.get_world_size(cp_group)
    return shard_sequence(rope_angles(seq, head_dim), cp, dist.get_rank(cp_group))


def init_cp_run(device: str):
    """Returns `(rank, cp, tp_group, cp_group, single_rank_group, torch.device)`; CP = world."""
    import os

    from megatron.core import parallel_state

    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    tp = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    single = [dist.new_group([r]) for r in range(cp)][rank]  # collective: every rank makes all
    return rank, cp, tp, cp_group, single, torch.device(device)


def megatron_shard(x_sbh: torch.Tensor, cp_group) -> torch.Tensor:
    """Shard `[S, b, ...]` exactly as Megatron's data path does (batch dicts are `[b, S, ...]`)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = {"x": x_sbh.transpose(0, 1).contiguous(), "cu_seqlens": None}
    return get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)["x"].transpose(0, 1)


def fwd_bwd(layer, x, emb, grad_out):
    """`(output + bias, dX, {param name: grad}, scheduler stats)` of one forward + backward."""
    from fluid.schedule import get_backward_scheduler

    sched = getattr(layer, "scheduler", None) or get_backward_scheduler()  # the layer's model's
    sched.reset_stats()
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, bias = layer(x, None, rotary_pos_emb=emb)
    if bias is not None:
        out = out + bias
    out.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads, sched.get_stats()
