"""Build-time validation of a TransformerConfig for FluidMoE.

Every unsupported combination fails here, when the model is built, with a message that says what
to change; nothing is left to fail (or hang) in the first step. The Fluid layers check their own
shapes again in their constructors (the checks here are the ones that concern the whole model).
"""

from __future__ import annotations


from fluid.config import FluidConfig, FluidConfigError

__all__ = ["FluidConfigError", "validate_config"]


def validate_config(config) -> FluidConfig:
    """Check `config` for FluidMoE; return its FluidConfig (the --fluid-* flags, checked too)."""
    from fluid.moe.layer import SUPPORTED_DISPATCHER_SETTINGS

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise FluidConfigError(f"--use-fluid-moe: {msg}")

    need(bool(config.num_moe_experts), "needs an MoE model: set --num-experts")
    fluid = FluidConfig.from_config(config)
    topk = config.moe_router_topk
    need(
        topk <= config.num_moe_experts,
        f"--moe-router-topk {topk} is larger than --num-experts {config.num_moe_experts}",
    )
    if fluid.moe_dedup == "on":
        need(fluid.moe_chunks == 1, f"--fluid-moe-dedup on needs --fluid-moe-chunks 1, got "
             f"{fluid.moe_chunks}: drop one of them")
        need(config.moe_expert_capacity_factor is None, "--fluid-moe-dedup on does not support "
             "--moe-expert-capacity-factor (token dropping): unset one of them")
    tp = config.tensor_model_parallel_size
    need(
        tp == 1,
        f"tensor parallelism is not supported (--tensor-model-parallel-size {tp}); use 1 and "
        "scale with --context-parallel-size (Ulysses) and --expert-model-parallel-size",
    )
    etp = config.expert_tensor_parallel_size or 1
    need(etp == 1, f"expert tensor parallelism is not supported (--expert-tensor-parallel-size {etp}); use 1")
    ep = config.expert_model_parallel_size
    need(
        config.num_moe_experts % ep == 0,
        f"--num-experts {config.num_moe_experts} is not divisible by --expert-model-parallel-size {ep}",
    )
    cp = config.context_parallel_size
    need(
        config.num_attention_heads % cp == 0,
        f"--num-attention-heads {config.num_attention_heads} is not divisible by "
        f"--context-parallel-size {cp} (Ulysses splits heads over CP ranks)",
    )
    need(
        not config.multi_latent_attention,
        "multi-latent attention is not supported: drop --multi-latent-attention",
    )
    if config.overlap_moe_expert_parallel_comm:  # combined 1F1B: docs/CORE_CONCEPT.md
        from fluid.moe.layer import resolve_num_chunks

        chunks = resolve_num_chunks(config)
        need(chunks == 1, "--overlap-moe-expert-parallel-comm (combined 1F1B) runs the layer's "
             f"stages one at a time and needs --fluid-moe-chunks 1, got {chunks}: drop one of them")
    need(
        not config.delay_wgrad_compute,
        "--delay-wgrad-compute is Transformer Engine's dW deferral; FluidMoE defers dW itself: drop it",
    )
    need(
        config.moe_token_dispatcher_type in SUPPORTED_DISPATCHER_SETTINGS,
        f"--moe-token-dispatcher-type {config.moe_token_dispatcher_type} is not implemented by "
        "FluidMoE's all-to-all dispatcher (which replaces alltoall and allgather alike); use alltoall",
    )
    return fluid
