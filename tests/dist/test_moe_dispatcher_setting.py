"""Tier: dist (2 gloo ranks). FluidMoELayer replaces Megatron's token dispatcher whichever classic one
is configured, so `--use-fluid-moe` also works with Megatron's default `--moe-token-dispatcher-type
allgather`: a layer configured with allgather gives the same output and gradients (torch.equal:
the same code runs) as one configured with alltoall, with token dropping (capacity factor 1.0) too,
since dropping is the router's. The flex dispatcher is refused at build time with the flag to change.
"""

import pytest
import torch

from tests._dist import run_distributed

H, FFN, E, TOKENS = 16, 8, 4, 12


def _run(rank, ws, pg, dispatcher, capacity):
    from fluid.moe import FluidMoELayer
    from fluid.testing.moe import (
        global_inputs,
        global_moe_weights,
        load_moe_weights,
        local_moe_submodules,
        moe_config,
    )

    cfg = moe_config(
        hidden=H,
        ffn=FFN,
        num_experts=E,
        topk=2,
        ep=ws,
        moe_token_dispatcher_type=dispatcher,
        moe_expert_capacity_factor=capacity,
    )
    layer = FluidMoELayer(cfg, submodules=local_moe_submodules(), pg_collection=pg)
    load_moe_weights(layer, global_moe_weights(cfg), rank)
    x_all, dy_all = global_inputs(TOKENS * ws, H)
    x = x_all[rank * TOKENS : (rank + 1) * TOKENS].clone().unsqueeze(1).requires_grad_(True)
    out, _ = layer(x)
    (out.squeeze(1) * dy_all[rank * TOKENS : (rank + 1) * TOKENS]).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _worker(rank, ws):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from fluid.moe import FluidMoELayer
    from fluid.testing.moe import local_moe_submodules, moe_config

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ws)
    try:
        pg = ProcessGroupCollection.use_mpu_process_groups()
        for capacity in (None, 1.0):
            a = _run(rank, ws, pg, "alltoall", capacity)
            b = _run(rank, ws, pg, "allgather", capacity)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert a[2].keys() == b[2].keys()
            for n in a[2]:
                assert torch.equal(a[2][n], b[2][n]), n
        flex = moe_config(
            hidden=H, ffn=FFN, num_experts=E, topk=2, ep=ws, moe_token_dispatcher_type="flex"
        )
        with pytest.raises(ValueError, match="--moe-token-dispatcher-type alltoall"):
            FluidMoELayer(flex, submodules=local_moe_submodules(), pg_collection=pg)
    finally:
        parallel_state.destroy_model_parallel()


def test_allgather_setting_equals_alltoall_and_flex_is_refused():
    run_distributed(_worker, 2)
