"""Test-only (not in the wheel): helpers shared by the MoE tests, the GPU parity script and the
benchmarks; training never imports them.

`moe_config(...)`: a TransformerConfig for one MoE layer (alltoall dispatcher, no expert bias).
`global_moe_weights(...)`: every expert's weights for the whole model, identical on all ranks
(seeded), in SequentialMLP layout; `load_moe_weights(layer, weights, ep_rank)` loads this rank's
slice into a stock MoELayer or a FluidMoELayer through the stock state-dict keys, which is
itself the checkpoint-compatibility path.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def moe_config(
    *,
    hidden: int,
    ffn: int,
    num_experts: int,
    topk: int,
    ep: int,
    shared: Optional[int] = None,
    glu: bool = True,
    dtype: torch.dtype = torch.float32,
    cpu_init: bool = True,
    **extra,
) -> TransformerConfig:
    """One-layer MoE TransformerConfig; `extra` overrides any field."""
    kwargs = dict(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=4,
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=ffn,
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        expert_model_parallel_size=ep,
        moe_token_dispatcher_type="alltoall",
        moe_shared_expert_intermediate_size=shared,
        gated_linear_unit=glu,
        activation_func=F.silu if glu else F.gelu,
        add_bias_linear=False,
        use_cpu_initialization=cpu_init,
        gradient_accumulation_fusion=False,
        moe_aux_loss_coeff=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        moe_router_pre_softmax=topk == 1,  # Megatron requires it for top-1
    )
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def tiny_config(**fields) -> TransformerConfig:
    """The smallest TransformerConfig the config and optimizer tests build (2 layers, hidden 64,
    4 heads, 4 experts, CPU initialization), with `fields` set; nothing else from Megatron's
    defaults changed (unlike `moe_config`)."""
    return TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=4,
        use_cpu_initialization=True,
        **fields,
    )


def local_moe_submodules():
    """The stock local-spec MoESubmodules (SequentialMLP experts, SharedExpertMLP, TopKRouter)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    return get_moe_module_spec(use_te=False, num_experts=1).keywords["submodules"]


def global_moe_weights(config: TransformerConfig, seed: int = 1234, dead_experts=(), std=None):
    """All weights of one MoE layer, identical on every rank (CPU, fp32).

    Returns a dict: router `[E, H]`, w1 `[E, F1, H]`, w2 `[E, H, F]`, and shared_fc1/shared_fc2
    when shared experts are configured. `dead_experts` get router rows of -1: with positive
    inputs (see `global_inputs`) they are never selected, which makes routing uneven and leaves
    experts (and with consecutive ids, whole ranks) without tokens.
    """
    g = torch.Generator().manual_seed(seed)
    H, Fe, E = config.hidden_size, config.moe_ffn_hidden_size, config.num_moe_experts
    F1 = 2 * Fe if config.gated_linear_unit else Fe
    s = std if std is not None else H**-0.5
    w = {
        "router": torch.randn(E, H, generator=g) * s,
        "w1": torch.randn(E, F1, H, generator=g) * s,
        "w2": torch.randn(E, H, Fe, generator=g) * Fe**-0.5,
    }
    for e in dead_experts:
        w["router"][e] = -1.0
    S = config.moe_shared_expert_intermediate_size
    if S:
        S1 = 2 * S if config.gated_linear_unit else S
        w["shared_fc1"] = torch.randn(S1, H, generator=g) * s
        w["shared_fc2"] = torch.randn(H, S, generator=g) * S**-0.5
    return w


def global_inputs(num_tokens: int, hidden: int, seed: int = 99):
    """Positive inputs `[num_tokens, H]` and an output gradient of the same shape (CPU, fp32)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, hidden, generator=g), torch.randn(num_tokens, hidden, generator=g)


def load_moe_weights(layer, weights: dict, ep_rank: int) -> None:
    """Load this rank's slice of `weights` through the stock (SequentialMLP) state-dict keys."""
    sd = layer.state_dict()
    G = layer.num_local_experts
    new = {}
    for k, v in sd.items():
        if k.endswith("_extra_state"):
            new[k] = v
            continue
        if k == "router.weight":
            src = weights["router"]
        elif k.startswith("experts.local_experts."):
            g = int(k.split(".")[2])
            which = "w1" if ".linear_fc1." in k else "w2"
            src = weights[which][ep_rank * G + g]
        elif k == "shared_experts.linear_fc1.weight":
            src = weights["shared_fc1"]
        elif k == "shared_experts.linear_fc2.weight":
            src = weights["shared_fc2"]
        else:
            new[k] = v
            continue
        new[k] = src.to(dtype=v.dtype, device=v.device)
    layer.load_state_dict(new, strict=True)


def stock_and_fluid(cfg: TransformerConfig, pg, device, num_chunks: int = 1):
    """A stock local-spec MoELayer and a FluidMoELayer holding the same weights, on `device`.

    The Fluid layer receives the stock layer's state dict (the checkpoint path), so any layout
    mismatch shows up as a parity failure. On a CPU host the stock dispatcher's class-wide CUDA
    stream is replaced by a placeholder so that the stock layer can at least be built.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from fluid.moe import FluidMoELayer

    if torch.device(device).type != "cuda" and MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()
    sub = local_moe_submodules()
    stock = MoELayer(cfg, submodules=sub, pg_collection=pg).to(device)
    fluid = FluidMoELayer(cfg, submodules=sub, pg_collection=pg, num_chunks=num_chunks).to(device)
    fluid.load_state_dict(stock.state_dict(), strict=True)
    return stock, fluid


def set_num_chunks(layer, num_chunks: int) -> None:
    """Change a FluidMoELayer's forward pipelining depth between iterations."""
    layer.num_chunks = num_chunks
    layer.token_dispatcher.num_chunks = num_chunks


def set_dedup(layer, on: bool) -> None:
    """Switch a FluidMoELayer's deduplicated dispatch between iterations (chunks must be 1)."""
    from fluid.moe.dispatcher import check_dedup_settings

    if on:
        check_dedup_settings(layer.config, layer.token_dispatcher.num_chunks)
    layer.token_dispatcher.dedup = bool(on)


def init_expert_parallel_world(cuda: bool, seed: int = 1234):
    """For the torchrun GPU scripts (and their CPU dry runs): NCCL (or gloo) default group, one
    GPU per rank, Megatron's model-parallel state with EP = world size, the CUDA RNG tracker.

    Returns (rank, world_size, device, pg_collection).
    """
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    dist.init_process_group("nccl" if cuda else "gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ws)
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    return rank, ws, device, ProcessGroupCollection.use_mpu_process_groups()


def emulate_ddp_grads(params, on_hook=None) -> list:
    """Give `params` what Megatron DDP gives them (benchmarks' --ddp-grads, tests).

    Each trainable parameter gets an fp32 `main_grad`, `grad_added_to_main_grad = False`, and a
    hook on its AccumulateGrad node that adds `param.grad` into `main_grad` unless the flag is
    set, then drops `param.grad` (DistributedDataParallel._make_backward_post_hook without the
    bucket bookkeeping). `on_hook(index)` is called after each hook, for tests to count them.
    Returns the AccumulateGrad nodes: keep them alive as DDP does (`grad_accs`), or the hooks go.
    Call `reset_ddp_flags` before each step, as DDP's zero_grad_buffer does. The buffers are
    persistent, so a benchmark's peak above the steady state measures what a backward adds
    under DDP: the transient gradients.
    """
    accs = []
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        p.grad_added_to_main_grad = False

        def hook(*_, p=p, i=i):
            if p.grad is not None and not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad.data)
            p.grad = None
            if on_hook is not None:
                on_hook(i)

        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(hook)
        accs.append(acc)
    return accs


def reset_ddp_flags(params) -> None:
    """What DDP's zero_grad_buffer does to the flags: `grad_added_to_main_grad = False`."""
    for p in params:
        if hasattr(p, "main_grad"):
            p.grad_added_to_main_grad = False


def fine_grained_test_layer(
    hidden: int = 64,
    dedup: Optional[bool] = None,
    *,
    ffn: int = 32,
    shared: int = 64,
    num_chunks: int = 1,
    device=None,
    dtype: torch.dtype = torch.float32,
    state: Optional[dict] = None,
    **extra,
):
    """A tiny FluidMoELayer of the 64-expert model's structure for single-rank tests (64
    experts top-6, a shared expert, SwiGLU, aux loss, EP = 1, `num_chunks` chunks), seeded, layer
    number set (the aux-loss tracker indexes by it), on `device` in `dtype` (default CPU, fp32),
    weights from `state` if given, under emulated Megatron DDP. `dedup` sets `fluid_moe_dedup`
    on/off (None: the default); `extra` overrides config fields (`fluid_*` ones are set on the
    config after it is built, as Megatron's argument mapping does). Needs Megatron's parallel state
    (fluid.testing.world.single_rank_megatron on CPU). Returns `(layer, accs)`: keep `accs` alive
    (emulate_ddp_grads)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from fluid.moe import FluidMoELayer

    fields: dict[str, Any] = dict(
        moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss",
        bias_activation_fusion=False,
    )
    fluid = {k: v for k, v in extra.items() if k.startswith("fluid_")}  # set as pretrain_gpt does
    fields.update({k: v for k, v in extra.items() if k not in fluid})
    cfg = moe_config(
        hidden=hidden, ffn=ffn, num_experts=64, topk=6, ep=1, shared=shared, dtype=dtype, **fields
    )
    if dedup is not None:
        fluid["fluid_moe_dedup"] = "on" if dedup else "off"
    for k, v in fluid.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    layer = FluidMoELayer(
        cfg,
        submodules=local_moe_submodules(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        num_chunks=num_chunks,
    )
    if device is not None:
        layer = layer.to(device)
    layer.set_layer_number(1)
    if state is not None:
        layer.load_state_dict(state)
    return layer, emulate_ddp_grads(layer.parameters())
