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
(deferred by FluidGroupedMLP) while the gradient is on the wire; with chunks the experts' dW runs
once over all of them, when the last chunk's backward hands its rows over (fluid.moe.chunk_wgrad).

It is a MoELayer (Megatron checks `isinstance(mlp, MoELayer)` for aux-loss logging and more)
built by MoELayer.__init__ itself, so every attribute upstream's methods read is set by upstream's
own code, at any pin. What Fluid replaces goes in through the spec or is swapped afterwards:
  - the spec's `experts` becomes FluidGroupedMLP and a stock TopKRouter FluidTopKRouter (same
    parameters), so MoELayer.__init__ builds those; router and shared experts are the spec's,
    the shared experts' local-stack linears swapped for Fluid linears (`_fluid_shared_experts`)
    whose dW is carried one window: queued just before this layer's dispatch-backward window,
    which the routed experts' dW fills, it runs in the next one, the combine backward of the
    layer below (fluid/schedule/scheduler.py, step 2);
  - the token dispatcher MoELayer.__init__ builds is replaced by FluidTokenDispatcher. It is
    built as Megatron's allgather dispatcher (whose constructor only stores sizes; the alltoall
    one creates a CUDA stream, impossible on a CPU host) and dropped.
State-dict keys equal those of the stock layer built from the local spec (router.*,
experts.local_experts.{i}.linear_fc{1,2}.*, shared_experts.*), see FluidGroupedMLP.

The stage methods used by Megatron's combined-1F1B schedule (route, preprocess, dispatch,
routed_experts_compute, combine, postprocess) work with num_chunks = 1, which that schedule
(`overlap_moe_expert_parallel_comm`) requires (fluid.megatron.validate; docs/CORE_CONCEPT.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from fluid.comm import CommContext
from fluid.config import FluidConfig, FluidConfigError
from fluid.linear import FluidColumnParallelLinear, FluidRowParallelLinear
from fluid.megatron.validate import validate_config
from fluid.moe.chunk_wgrad import ChunkedWgrad
from fluid.moe.dispatcher import FluidTokenDispatcher
from fluid.moe.experts import FluidGroupedMLP
from fluid.moe.router import FluidTopKRouter
from fluid.runtime import runtime_for


def resolve_num_chunks(config: TransformerConfig, num_chunks: Optional[int] = None) -> int:
    """Pipelining depth: the argument, else `--fluid-moe-chunks` (FluidConfig.moe_chunks; 1 is
    off)."""
    if num_chunks is not None:
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise FluidConfigError(
                f"FluidMoELayer num_chunks must be an int >= 1, got {num_chunks!r}"
            )
        return num_chunks
    return FluidConfig.from_config(config).moe_chunks


def resolve_dedup(
    config: TransformerConfig, comm: Optional[CommContext] = None, num_chunks: int = 1
) -> bool:
    """Deduplicated dispatch (a token sent once per destination rank; see dispatcher.py):
    `--fluid-moe-dedup` (FluidConfig.moe_dedup) on or off, or auto (the default): on where it
    measured faster, i.e. over a slow link (`comm.slow_link()`: P2P off, between nodes) with
    top-k > 2 and a setting it supports (chunks 1, no capacity factor). It measured 1.44x stock for
    64 experts top-6 over P2P off on 4x H200, slower over NVLink, no gain with top-2 of 8 experts
    (docs/benchmarks/HISTORY.md)."""
    mode = FluidConfig.from_config(config).moe_dedup
    if mode != "auto":
        return mode == "on"
    return (
        comm is not None
        and comm.size > 1  # one rank (an emulated link): nothing to deduplicate
        and comm.slow_link()
        and config.moe_router_topk > 2
        and num_chunks == 1
        and config.moe_expert_capacity_factor is None
    )


def _fluid_shared_experts(shared):
    """The spec's shared experts with Fluid linears (deferred dW) where their MLPSubmodules hold
    the local stack's ColumnParallelLinear / RowParallelLinear (same parameters and state-dict
    keys); anything else (Transformer Engine's linears, another module, None) unchanged."""
    subs = (
        shared.keywords.get("submodules")
        if isinstance(shared, functools.partial)
        else getattr(shared, "submodules", None)
    )
    if not (
        isinstance(subs, MLPSubmodules)
        and subs.linear_fc1 is ColumnParallelLinear
        and subs.linear_fc2 is RowParallelLinear
    ):
        return shared
    fluid_subs = dataclasses.replace(
        subs, linear_fc1=FluidColumnParallelLinear, linear_fc2=FluidRowParallelLinear
    )
    if isinstance(shared, functools.partial):
        return functools.partial(
            shared.func, *shared.args, **{**shared.keywords, "submodules": fluid_subs}
        )
    return dataclasses.replace(shared, submodules=fluid_subs)


@contextlib.contextmanager
def _stock_dispatcher_as_allgather(config):
    """MoELayer.__init__ builds the dispatcher `moe_token_dispatcher_type` names; FluidMoELayer
    replaces it. Built as allgather (the other supported setting, SUPPORTED_DISPATCHER_SETTINGS),
    whose constructor allocates nothing; the setting is restored on exit."""
    saved = config.moe_token_dispatcher_type
    config.moe_token_dispatcher_type = "allgather"
    try:
        yield
    finally:
        config.moe_token_dispatcher_type = saved


class FluidMoELayer(MoELayer):
    """MoELayer with Fluid dispatcher and experts (see the module docstring).

    Args (MoELayer's at core_v0.19):
        config: TransformerConfig.
        submodules: the spec's MoESubmodules; `router` (TopKRouter is swapped for
            FluidTopKRouter, same parameters) and `shared_experts` are used, `experts` is replaced
            by FluidGroupedMLP.
        layer_number, is_mtp_layer, name: as MoELayer.
        pg_collection: the model's process groups (`ep`, `tp`, `expt_tp`, `expt_dp`, `tp_ep`,
            router's `cp`, `tp_cp`, `tp_dp_cp`); Megatron's TransformerLayer always passes it.
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
            raise ValueError(
                "FluidMoELayer needs the spec's MoESubmodules (router, shared_experts)"
            )
        if pg_collection is None:
            raise ValueError(
                "FluidMoELayer needs the model's pg_collection (explicit process "
                "groups; Megatron's TransformerLayer passes it)"
            )
        validate_config(config, pg_collection)
        router = FluidTopKRouter if submodules.router is TopKRouter else submodules.router
        fluid_submodules = dataclasses.replace(
            submodules,
            router=router,
            experts=FluidGroupedMLP,
            shared_experts=_fluid_shared_experts(submodules.shared_experts),
        )
        with _stock_dispatcher_as_allgather(config):
            super().__init__(
                config=config,
                submodules=fluid_submodules,
                layer_number=layer_number,
                pg_collection=pg_collection,
                is_mtp_layer=is_mtp_layer,
                name=name,
            )
        # The model's runtime: its settings, its scheduler, the EP group's one CommContext.
        self.fluid_runtime = runtime_for(config)
        self.fluid_config = self.fluid_runtime.config
        self.scheduler = self.fluid_runtime.scheduler
        self.comm = self.fluid_runtime.comm(self.ep_group, expert_parallel=True)
        if self.use_shared_expert:  # their dW goes to the window after this layer's dispatch
            for m in self.shared_experts.modules():
                if isinstance(m, (FluidColumnParallelLinear, FluidRowParallelLinear)):
                    m.fluid_dw_carry = 1
        self.num_chunks = resolve_num_chunks(config, num_chunks)
        self.token_dispatcher = FluidTokenDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config,
            self.comm,
            self.num_chunks,
            dedup=resolve_dedup(config, self.comm, self.num_chunks),
        )

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Stage API (num_chunks = 1): sort by expert, experts, unsort. Under the combined-1F1B
        schedule this runs on the compute stream, the dispatch before it on the communication
        stream: the grouped GEMM's offsets come through a Handoff (fluid.moe.handoff)."""
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
        rows, row_probs = disp.dispatch_preprocess(hidden_states, routing_map, probs, staged=False)
        parts, ready = disp.dispatch_chunks(rows, row_probs)
        del rows, row_probs
        C = len(parts)
        # per chunk: (received, handle) of rows, probs; a chunk's entry is dropped once consumed
        sent: list[Any] = [[None, None] for _ in range(C)]

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
        # With C > 1 another chunk's all-to-all is in flight during every chunk's experts, and
        # the experts' dW runs once over all chunks (fluid.moe.chunk_wgrad).
        beside = self.comm.beside_comm if C > 1 else contextlib.nullcontext
        merge = None
        if C > 1:
            plan = disp.plan
            assert plan is not None  # dispatch_chunks finished it
            merge = ChunkedWgrad(plan.recv_counts, self.num_local_experts)

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
                out, _ = self.experts(
                    tokens, tokens_per_expert, tok_probs, offs, wgrad_merge=merge, chunk=c
                )
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
