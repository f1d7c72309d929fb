"""FluidMoELayer: a drop-in for Megatron's MoELayer that hides its all-to-alls behind compute.

Shape legend: S sequence, B micro-batch, H hidden; T = S*B local tokens.

`forward(hidden [S, B, H]) -> (output [S, B, H], None)`, the MoELayer contract. One forward:
  1. route (Megatron's TopKRouter: top-k, score functions, aux losses, z-loss, expert bias,
     capacity-factor token dropping);
  2. permute and start the dispatch all-to-alls chunk by chunk (FluidTokenDispatcher, one
     device->host sync for the split sizes);
  3. shared experts, while the dispatch all-to-all is in flight;
  4. per chunk c: wait its dispatch, grouped experts (FluidGroupedMLP), start its combine; chunk
     c+1's dispatch is on the wire meanwhile (forward pipelining, `num_chunks` > 1);
  5. wait the combines, unpermute, add the shared output.
In backward every all-to-all (fluid_all_to_all) lets the BackwardScheduler run the expert dW
(deferred by FluidGroupedMLP) while the gradient is on the wire.

It subclasses MoELayer (Megatron checks `isinstance(mlp, MoELayer)` for aux-loss logging and
more) but does not run MoELayer.__init__, whose dispatcher creates CUDA streams and which
builds experts from the spec: the router and shared experts come from the spec's
MoESubmodules, the experts and dispatcher are Fluid's. State-dict keys equal those of the stock
layer built from the local spec (router.*, experts.local_experts.{i}.linear_fc{1,2}.*,
shared_experts.*), see FluidGroupedMLP.

The stage methods used by Megatron's combined-1F1B schedule (route, preprocess, dispatch,
routed_experts_compute, combine, postprocess) work with num_chunks = 1, which that schedule
(`overlap_moe_expert_parallel_comm`) requires (fluid.megatron.validate; docs/CORE_CONCEPT.md).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron.core import utils
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import BaseMoELayer, MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoECudaGraphTensorStore
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from fluid.comm import CommContext
from fluid.config import FluidConfig, FluidConfigError
from fluid.moe.dispatcher import FluidTokenDispatcher
from fluid.moe.experts import FluidGroupedMLP
from fluid.moe.router import FluidTopKRouter
from fluid.runtime import runtime_for


# Megatron dispatcher settings FluidTokenDispatcher stands in for (see validate_config).
SUPPORTED_DISPATCHER_SETTINGS = ("alltoall", "allgather")


def resolve_num_chunks(config: TransformerConfig, num_chunks: Optional[int] = None) -> int:
    """Pipelining depth: the argument, else `--fluid-moe-chunks` (FluidConfig.moe_chunks, 1 = off)."""
    if num_chunks is not None:
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise FluidConfigError(f"FluidMoELayer num_chunks must be an int >= 1, got {num_chunks!r}")
        return num_chunks
    return FluidConfig.from_config(config).moe_chunks


def resolve_dedup(config: TransformerConfig, comm: Optional[CommContext] = None,
                  num_chunks: int = 1) -> bool:
    """Deduplicated dispatch (a token sent once per destination rank; see dispatcher.py):
    `--fluid-moe-dedup` (FluidConfig.moe_dedup) on or off, or auto (the default): on where it
    measured faster, i.e. over a slow link (`comm.slow_link()`: P2P off, between nodes) with
    top-k > 2 and a setting it supports (chunks 1, no capacity factor). Measured on 4x H200, P2P
    off, 64 experts top-6: 13.8-14.0 vs 15.0-15.2 ms fwd+bwd; over NVLink it is slower (9.5-9.9
    vs 7.5 ms), and top-2 of 8 experts gains nothing (raw/s5a, s5b)."""
    mode = FluidConfig.from_config(config).moe_dedup
    if mode != "auto":
        return mode == "on"
    return (
        comm is not None
        and comm.slow_link()
        and config.moe_router_topk > 2
        and num_chunks == 1
        and config.moe_expert_capacity_factor is None
    )


def validate_config(config: TransformerConfig, pg_collection: ProcessGroupCollection) -> None:
    """Reject, with the reason, every setting FluidMoELayer does not implement."""
    ep_size = utils.get_pg_size(pg_collection.ep)
    if config.num_moe_experts is None or config.num_moe_experts % ep_size:
        raise ValueError(
            f"FluidMoELayer: num_moe_experts ({config.num_moe_experts}) must be divisible by the "
            f"expert-parallel size ({ep_size})"
        )
    if utils.get_pg_size(pg_collection.expt_tp) != 1:
        raise ValueError("FluidMoELayer supports expert_tensor_parallel_size = 1 only")
    # FluidTokenDispatcher replaces Megatron's dispatcher whichever of the two classic ones is
    # configured (Megatron's default is allgather): routing and token dropping are the router's,
    # so the math does not depend on it. The flex (DeepEP/HybridEP) dispatcher's own features are
    # not implemented.
    if config.moe_token_dispatcher_type not in SUPPORTED_DISPATCHER_SETTINGS:
        raise ValueError(
            "FluidMoELayer replaces Megatron's token dispatcher with its own all-to-all one and "
            f"does not implement {config.moe_token_dispatcher_type!r}: set "
            "--moe-token-dispatcher-type alltoall (or leave Megatron's default, allgather)"
        )
    unsupported = {
        "overlap_dispatch_backward_with_experts_wgrad": "TE's delayed expert wgrad (the "
        "BackwardScheduler does this)",
        "moe_shared_expert_overlap": "the stock shared-expert side stream (FluidMoELayer always "
        "computes the shared experts during the dispatch all-to-all)",
        "moe_pad_expert_input_to_capacity": "padding expert inputs to capacity (capacity factor "
        "with dropping but without padding is supported)",
        "moe_router_padding_for_quantization": "fp8/fp4 routing-map padding",
        "moe_latent_size": "MoE latent projections",
        "fp8": "fp8 experts",
        "fp4": "fp4 experts",
    }
    for attr, what in unsupported.items():
        if getattr(config, attr, None):
            raise ValueError(f"FluidMoELayer does not support {attr}: {what}")
    if getattr(config, "cuda_graph_impl", "none") != "none":
        raise ValueError("FluidMoELayer does not support CUDA graphs (cuda_graph_impl)")
    if getattr(config, "transformer_impl", None) == "inference_optimized":
        raise ValueError("FluidMoELayer does not support transformer_impl='inference_optimized'")
    if config.recompute_granularity == "selective" and (
        {"moe", "shared_experts"} & set(config.recompute_modules or [])
    ):
        raise ValueError(
            "FluidMoELayer does not support selective recompute of 'moe'/'shared_experts' "
            "(deferred dW closures would be re-created inside the recompute)"
        )


class FluidMoELayer(MoELayer):
    """MoELayer with Fluid dispatcher and experts (see the module docstring).

    Args (MoELayer's at core_v0.19):
        config: TransformerConfig.
        submodules: the spec's MoESubmodules; `router` (TopKRouter is swapped for
            FluidTopKRouter, same parameters) and `shared_experts` are used, `experts` is replaced
            by FluidGroupedMLP.
        layer_number, is_mtp_layer, name: as MoELayer.
        pg_collection: process groups (`ep`, `tp`, `expt_tp`, `expt_dp`, router's `cp`,
            `tp_cp`, `tp_dp_cp`); if None they are taken from Megatron's parallel_state once,
            here, as the stock layer does.
        num_chunks: forward pipelining depth; default `--fluid-moe-chunks` (`resolve_num_chunks`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        num_chunks: Optional[int] = None,
    ):
        if submodules is None:
            raise ValueError("FluidMoELayer needs the spec's MoESubmodules (router, shared_experts)")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        validate_config(config, pg_collection)
        BaseMoELayer.__init__(
            self,
            config=config,
            layer_number=layer_number,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
        )
        self.submodules = submodules
        self.tp_group = pg_collection.tp
        self.moe_layer_recompute = False
        self.shared_experts_recompute = False
        self.shared_expert_overlap = False

        router_cls = FluidTopKRouter if submodules.router is TopKRouter else submodules.router
        self.router = router_cls(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)

        # The model's runtime: its settings, its scheduler, the EP group's one CommContext.
        self.fluid_runtime = runtime_for(config)
        self.fluid_config = self.fluid_runtime.config
        self.scheduler = self.fluid_runtime.scheduler
        self.comm = self.fluid_runtime.comm(self.ep_group)
        self.num_chunks = resolve_num_chunks(config, num_chunks)
        self.token_dispatcher = FluidTokenDispatcher(
            self.num_local_experts, self.local_expert_indices, config, self.comm, self.num_chunks,
            dedup=resolve_dedup(config, self.comm, self.num_chunks),
        )
        self.experts = FluidGroupedMLP(
            self.num_local_experts,
            config,
            pg_collection=pg_collection,
            name=(name + ".experts") if name is not None else "experts",
        )
        if self.use_shared_expert:
            if submodules.shared_experts is None:
                raise ValueError("moe_shared_expert_intermediate_size is set but the spec has no "
                                 "shared_experts builder")
            self.shared_experts = submodules.shared_experts(
                config=config,
                pg_collection=pg_collection,
                gate=config.moe_shared_expert_gate,
                name=(name + ".shared_experts") if name is not None else None,
            )
        self.cudagraph_tensor_store = MoECudaGraphTensorStore()
        self.fwd_execution_map = ["route", "expert_compute", "postprocess"]
        self._delayed_wgrad_event = None
        self._delayed_wgrad_stream = None

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Stage API (num_chunks = 1): sort by expert, experts, unsort."""
        disp = self.token_dispatcher
        tokens, tokens_per_expert, probs, offs = disp.dispatch_postprocess(hidden_states, probs)
        out, bias = self.experts(tokens, tokens_per_expert, probs, offs)
        return disp.combine_preprocess(out), bias

    def forward(
        self,
        hidden_states: torch.Tensor,
        intermediate_tensors=None,
        padding_mask: Optional[torch.Tensor] = None,
    ):
        """`[S, B, H]` -> `([S, B, H], None)`; padding_mask `[B, S]` (True = real token)."""
        if intermediate_tensors is not None:
            raise ValueError("FluidMoELayer does not support partial CUDA-graph intermediates")
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError(
                "During training, MoE with tensor parallelism needs sequence parallelism."
            )
        self.scheduler.on_forward()
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        disp = self.token_dispatcher

        probs, routing_map = self.route(hidden_states, padding_mask)
        rows, row_probs = disp.dispatch_preprocess(hidden_states, routing_map, probs)
        parts, ready = disp.dispatch_chunks(rows, row_probs)
        del rows, row_probs
        C = len(parts)
        sent = [[None, None] for _ in range(C)]  # per chunk: (received, handle) of rows, probs

        def launch(c, part):
            sent[c][part] = disp.launch_dispatch_part(parts[c][part], c, ready)

        # Launch order is the pipeline (CommContext.all_to_all_single): with one hardware queue,
        # a launch is processed only once the previous all-to-all on the stream is done, and
        # what was queued after it waits too. So the compute meant to overlap an all-to-all is
        # queued before the next launch, and the small probs all-to-all goes after that compute.
        launch(0, 0)
        shared = None
        if self.use_shared_expert:  # beside chunk 0's rows all-to-all
            with self.comm.beside_comm():
                shared = self.shared_experts(hidden_states)
        launch(0, 1)
        if C > 1:
            launch(1, 0)
        # With C > 1 another chunk's all-to-all is in flight during every chunk's experts.
        beside = self.comm.beside_comm if C > 1 else contextlib.nullcontext

        combines = []
        for c in range(C):
            # Take the chunk out of the list: the received buffer is freed once sorted by expert
            # (with G > 1 the sort copies), not held to the end of the forward.
            (tokens, h_rows), (tok_probs, h_probs) = sent[c]
            sent[c] = parts[c] = None
            h_rows.wait()
            h_probs.wait()
            tokens, tokens_per_expert, tok_probs, offs = disp.dispatch_postprocess(
                tokens, tok_probs, c
            )
            with beside():
                out, _ = self.experts(tokens, tokens_per_expert, tok_probs, offs)
            del tokens
            if c + 1 < C:  # chunk c's experts are queued: now the next chunk's launches
                if c >= 1:
                    launch(c + 1, 0)
                launch(c + 1, 1)
            combines.append(disp.launch_combine(disp.combine_preprocess(out, c), c))
        outs = []
        for out, handle in combines:
            handle.wait()
            outs.append(out)
        output = disp.combine_postprocess(outs)
        if shared is not None:
            output = output + shared
        return output, None
