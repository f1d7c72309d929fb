"""The one build-time validator of a configuration for FluidMoE.

Every unsupported combination fails when the model is built, with a FluidConfigError (a
ValueError) naming the flag to change; nothing is left to fail (or hang) in the first step. It is
called by the layer-spec hook and `get_fluid_moe_layer_spec` (the whole model, from the config),
and by every FluidMoELayer and FluidSelfAttention with its process groups (then the group sizes
are checked, since they are what the layer runs on). The layers keep only the checks that concern
their spec's submodules (e.g. a linear that fuses the input layernorm).
"""

from __future__ import annotations

from fluid.config import FluidConfig, FluidConfigError

__all__ = [
    "FluidConfigError",
    "SUPPORTED_DISPATCHER_SETTINGS",
    "check_tensor_parallel_size",
    "validate_config",
]

# Megatron dispatcher settings FluidTokenDispatcher stands in for: it replaces Megatron's
# dispatcher whichever of the two classic ones is configured (Megatron's default is allgather);
# routing and token dropping are the router's, so the math does not depend on it. The flex
# (DeepEP/HybridEP) dispatcher's own features are not implemented.
SUPPORTED_DISPATCHER_SETTINGS = ("alltoall", "allgather")

# MoE features FluidMoELayer does not implement: config field -> (flag, what it is).
_UNSUPPORTED_MOE = {
    "overlap_dispatch_backward_with_experts_wgrad": (
        "--overlap-dispatch-backward-with-experts-wgrad",
        "TE's delayed expert wgrad (the BackwardScheduler does this)",
    ),
    "moe_shared_expert_overlap": (
        "--moe-shared-expert-overlap",
        "the stock shared-expert side stream (FluidMoELayer always computes the shared experts "
        "during the dispatch all-to-all)",
    ),
    "moe_pad_expert_input_to_capacity": (
        "--moe-pad-expert-input-to-capacity",
        "padding expert inputs to capacity (a capacity factor with dropping but without padding "
        "is supported)",
    ),
    "moe_router_padding_for_quantization": (
        "--moe-router-padding-for-quantization",
        "fp8/fp4 routing-map padding",
    ),
    "moe_latent_size": ("--moe-latent-size", "MoE latent projections"),
    "fp8": ("--fp8-format", "fp8 experts"),
    "fp4": ("--fp4-format", "fp4 experts"),
}


def torch_version() -> str:
    import torch

    return torch.__version__


def _fail(msg: str) -> None:
    raise FluidConfigError(f"--use-fluid-moe: {msg}")


def _size(group) -> int:
    from megatron.core.utils import get_pg_size

    return get_pg_size(group)


def check_tensor_parallel_size(size: int, where: str = "") -> None:
    """FluidMoE runs with tensor-parallel size 1 only (every TP check in the overlay is this)."""
    if size != 1:
        _fail(
            f"tensor parallelism is not supported{' in ' + where if where else ''} "
            f"(--tensor-model-parallel-size {size}; FluidMoE needs tensor_model_parallel_size=1): "
            "scale with --context-parallel-size (Ulysses) and --expert-model-parallel-size"
        )


def validate_config(config, pg_collection=None, *, moe: bool = True) -> FluidConfig:
    """Check `config` (and the sizes of `pg_collection`'s groups, when given) for FluidMoE.

    Args:
        config: the model's TransformerConfig.
        pg_collection: a layer's process groups; None: the config's parallel sizes are checked.
        moe: include the MoE checks (the model, FluidMoELayer); False for FluidSelfAttention.
    Returns the resolved FluidConfig (the --fluid-* flags, checked too).
    """

    def need(ok: bool, msg: str) -> None:
        if not ok:
            _fail(msg)

    def group_size(name: str, config_size) -> int:
        group = getattr(pg_collection, name, None) if pg_collection is not None else None
        return _size(group) if group is not None else (config_size or 1)

    fluid = FluidConfig.from_config(config)

    # Attention and the model as a whole.
    check_tensor_parallel_size(group_size("tp", config.tensor_model_parallel_size))
    cp = group_size("cp", config.context_parallel_size)
    heads = config.num_attention_heads
    need(
        heads % cp == 0,
        f"--num-attention-heads {heads} is not divisible by --context-parallel-size {cp}: "
        f"context_parallel_size {cp} must divide num_attention_heads (Ulysses gives each CP "
        "rank heads/cp heads)",
    )
    need(
        not config.multi_latent_attention,
        "multi-latent attention is not supported: drop --multi-latent-attention",
    )
    need(
        not getattr(config, "fused_single_qkv_rope", False),
        "--fused-single-qkv-rope is not supported (Fluid attention applies RoPE to q and k "
        "before its all-to-all): drop it",
    )
    need(
        not config.delay_wgrad_compute,
        "--delay-wgrad-compute is Transformer Engine's dW deferral; FluidMoE defers dW itself: drop it",
    )
    graphs = getattr(config, "cuda_graph_impl", "none")
    need(graphs == "none", f"CUDA graphs are not supported (--cuda-graph-impl {graphs}): use none")
    need(
        getattr(config, "transformer_impl", None) != "inference_optimized",
        "--transformer-impl inference_optimized is not supported: use local or transformer_engine",
    )
    if fluid.wgrad_accumulation == "fused":
        from fluid.schedule.wgrad import fused_kernel_available

        need(
            fused_kernel_available(bool(config.gradient_accumulation_fusion)),
            f"--fluid-wgrad-accumulation fused needs a fused dW kernel: torch {torch_version()} "
            "has no addmm(out_dtype=) and apex's fused_weight_gradient_mlp_cuda is not used "
            "(not installed, or no --gradient-accumulation-fusion): use "
            "--fluid-wgrad-accumulation auto or unfused",
        )
    if fluid.overlap == "measure":  # fluid.schedule.overlap_trial
        need(
            fluid.scheduler,
            "--fluid-overlap measure times dW deferral, which --no-fluid-scheduler turns off: "
            "drop one of them",
        )
        pp = group_size("pp", config.pipeline_model_parallel_size)
        for interleaves, flag in (
            (pp > 1, f"--pipeline-model-parallel-size {pp}"),
            (config.overlap_moe_expert_parallel_comm, "--overlap-moe-expert-parallel-comm"),
        ):
            need(
                not interleaves,
                f"--fluid-overlap measure times whole micro-batches, which interleave under "
                f"{flag}: use --fluid-overlap auto there",
            )
    if not moe:
        return fluid

    # MoE layers.
    experts = config.num_moe_experts
    need(bool(experts), "needs an MoE model: set --num-experts")
    topk = config.moe_router_topk
    need(topk <= experts, f"--moe-router-topk {topk} is larger than --num-experts {experts}")
    ep = group_size("ep", config.expert_model_parallel_size)
    need(
        experts % ep == 0,
        f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}",
    )
    etp = group_size("expt_tp", config.expert_tensor_parallel_size)
    need(
        etp == 1,
        f"expert tensor parallelism is not supported (--expert-tensor-parallel-size {etp}): use 1",
    )
    need(
        config.moe_token_dispatcher_type in SUPPORTED_DISPATCHER_SETTINGS,
        f"--moe-token-dispatcher-type {config.moe_token_dispatcher_type} is not implemented by "
        "FluidMoE's all-to-all dispatcher (which replaces alltoall and allgather alike); use "
        "--moe-token-dispatcher-type alltoall (or leave Megatron's default, allgather)",
    )
    for attr, (flag, what) in _UNSUPPORTED_MOE.items():
        need(not getattr(config, attr, None), f"{flag} is not supported: {what}")
    need(
        not (
            config.recompute_granularity == "selective"
            and {"moe", "shared_experts"} & set(config.recompute_modules or [])
        ),
        "selective recompute of 'moe'/'shared_experts' (--recompute-modules) is not supported "
        "(deferred dW closures would be re-created inside the recompute)",
    )
    if fluid.emulate_link_gbps is not None:  # fluid.comm.emulated_link
        need(
            ep == 1,
            f"--fluid-emulate-link-gbps emulates a slow expert-parallel link on one GPU; with "
            f"--expert-model-parallel-size {ep} the link is real: drop the flag",
        )
    if fluid.moe_dedup == "on":
        need(
            fluid.moe_chunks == 1,
            f"--fluid-moe-dedup on needs --fluid-moe-chunks 1, got "
            f"{fluid.moe_chunks}: drop one of them",
        )
        need(
            config.moe_expert_capacity_factor is None,
            "--fluid-moe-dedup on does not support "
            "--moe-expert-capacity-factor (token dropping): unset one of them",
        )
    if config.overlap_moe_expert_parallel_comm:  # combined 1F1B: docs/CORE_CONCEPT.md
        need(
            fluid.moe_chunks == 1,
            "--overlap-moe-expert-parallel-comm (combined 1F1B) runs "
            "the layer's stages one at a time and needs --fluid-moe-chunks 1, got "
            f"{fluid.moe_chunks}: drop one of them",
        )
    return fluid
