"""Tier: dist (2 gloo ranks, EP=2). FluidMoELayer is built by MoELayer.__init__ and checked by the
one validator.

What must hold:
  - every attribute a stock MoELayer has after its constructor, FluidMoELayer has too (upstream's
    own __init__ sets them, so state a pin move adds to MoELayer.__init__ exists in Fluid's layer
    as well, instead of an AttributeError in training); only the dispatcher and the experts are
    Fluid's, and the caller's config is left as it was;
  - a bad configuration fails when the layer is built, with a FluidConfigError naming the flag:
    top-k larger than the number of experts (which used to fail at the first forward with
    "selected index k out of range"), a bad --fluid-* value, an unsupported MoE feature; and a
    layer without explicit process groups is refused (no parallel_state fallback).
"""

from __future__ import annotations

import pytest

from tests._dist import run_distributed

H, FFN, E = 16, 8, 8


def _body(rank, ws):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from fluid.config import FluidConfigError
    from fluid.moe import FluidMoELayer
    from fluid.moe.dispatcher import FluidTokenDispatcher
    from fluid.moe.experts import FluidGroupedMLP
    from fluid.testing.moe import local_moe_submodules, moe_config

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ws)
    try:
        pg = ProcessGroupCollection.use_mpu_process_groups()

        def cfg(**kw):
            base = dict(hidden=H, ffn=FFN, num_experts=E, topk=2, ep=ws, shared=FFN)
            base.update(kw)
            return moe_config(**base)

        # allgather: the stock alltoall dispatcher's constructor needs CUDA
        stock = MoELayer(
            cfg(moe_token_dispatcher_type="allgather"),
            submodules=local_moe_submodules(),
            pg_collection=pg,
        )
        fluid_cfg = cfg()
        fluid = FluidMoELayer(fluid_cfg, submodules=local_moe_submodules(), pg_collection=pg)
        missing = set(vars(stock)) - set(vars(fluid))
        assert missing == set(), f"set by MoELayer.__init__, missing on FluidMoELayer: {missing}"
        assert isinstance(fluid.token_dispatcher, FluidTokenDispatcher)
        assert isinstance(fluid.experts, FluidGroupedMLP)
        assert fluid_cfg.moe_token_dispatcher_type == "alltoall"  # restored after the build
        assert set(fluid.state_dict()) == set(stock.state_dict())

        def refused(match, config, **kw):
            kw.setdefault("pg_collection", pg)
            with pytest.raises(FluidConfigError, match=match):
                FluidMoELayer(config, submodules=local_moe_submodules(), **kw)

        refused(
            r"--moe-router-topk 9 is larger than --num-experts 8",
            cfg(topk=9, moe_router_load_balancing_type="none"),
        )
        refused(r"--fluid-overlap", cfg(fluid_overlap="sometimes"))
        refused(r"--fluid-moe-chunks", cfg(fluid_moe_chunks=0))
        refused(r"--moe-shared-expert-overlap", cfg(moe_shared_expert_overlap=True))
        refused(r"--moe-token-dispatcher-type flex", cfg(moe_token_dispatcher_type="flex"))
        with pytest.raises(ValueError, match="pg_collection"):
            FluidMoELayer(cfg(), submodules=local_moe_submodules())
    finally:
        parallel_state.destroy_model_parallel()


def test_fluid_moe_layer_is_a_moe_layer_built_by_upstream():
    run_distributed(_body, 2)
