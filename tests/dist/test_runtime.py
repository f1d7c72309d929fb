"""Tier: dist (2 gloo ranks, EP=2). One FluidRuntime per model (fluid.runtime).

What must hold:
  - layers built from one config share one runtime: one scheduler, one CommContext per process
    group (the EP group's context is the same object in every MoE layer of the model);
  - models built from different configs keep their own settings and behaviour in one process:
    model A (`--fluid-overlap never`) runs every dW inline although model B (`always`) exists,
    B defers its expert dW into its all-to-all windows although model C (`--no-fluid-scheduler`)
    was built after it, and C runs every dW inline; each backward counts in its own model's
    scheduler only (with one process-wide scheduler and contexts, A deferred its dW because B's
    context overlaps, and C's build switched B's scheduler off);
  - the three give the same output and gradients, bit for bit (only when dW runs differs; the
    same GEMMs run on the same operands);
  - `get_backward_scheduler()` is the scheduler of the model built last.
"""

from __future__ import annotations

import torch

from tests._dist import run_distributed

H, FFN, E, TOKENS = 16, 8, 8, 24


def _body(rank, ws):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from fluid.moe import FluidMoELayer
    from fluid.schedule import get_backward_scheduler
    from fluid.testing.moe import (
        global_inputs,
        global_moe_weights,
        load_moe_weights,
        local_moe_submodules,
        moe_config,
    )

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ws)
    try:
        pg = ProcessGroupCollection.use_mpu_process_groups()

        def model(**fluid_fields):
            cfg = moe_config(hidden=H, ffn=FFN, num_experts=E, topk=2, ep=ws, **fluid_fields)
            return cfg, [
                FluidMoELayer(cfg, submodules=local_moe_submodules(), pg_collection=pg)
                for _ in range(2)
            ]

        cfg_a, model_a = model(fluid_overlap="never")
        cfg_b, model_b = model(fluid_overlap="always")
        cfg_c, model_c = model(fluid_overlap="always", fluid_scheduler=False)

        # One runtime per model, shared by its layers; one context per group.
        for layers in (model_a, model_b, model_c):
            rt = layers[0].fluid_runtime
            assert all(lay.fluid_runtime is rt for lay in layers)
            assert layers[0].comm is layers[1].comm is rt.comm(pg.ep)
            assert layers[0].experts.scheduler is rt.scheduler
            assert rt.scheduler.num_comms == 1
        runtimes = [m[0].fluid_runtime for m in (model_a, model_b, model_c)]
        assert len({id(rt) for rt in runtimes}) == 3
        assert len({id(rt.scheduler) for rt in runtimes}) == 3
        assert get_backward_scheduler() is runtimes[2].scheduler
        assert runtimes[1].scheduler.enabled and not runtimes[2].scheduler.enabled

        weights = global_moe_weights(cfg_a)
        for layers in (model_a, model_b, model_c):
            for lay in layers:
                load_moe_weights(lay, weights, rank)
        x_all, dy_all = global_inputs(TOKENS * ws, H)
        sl = slice(rank * TOKENS, (rank + 1) * TOKENS)
        for rt in runtimes:
            rt.scheduler.reset_stats()

        def step(layers, rt):
            """Both layers in sequence, fwd + bwd; returns output, dX, grads, and the stats of
            every runtime (only `rt`'s may change)."""
            x = x_all[sl].clone().unsqueeze(1).requires_grad_(True)
            h = x
            for lay in layers:
                h, _ = lay(h)
            (h.squeeze(1) * dy_all[sl]).sum().backward()
            grads = {
                f"{i}.{n}": p.grad.clone()
                for i, lay in enumerate(layers)
                for n, p in lay.named_parameters()
            }
            return h.detach(), x.grad.clone(), grads, [r.scheduler.get_stats() for r in runtimes]

        out_a, dx_a, g_a, stats = step(model_a, runtimes[0])
        a = stats[0]
        assert a["total_dw_tasks"] >= 4 and a["inline_dw_tasks"] == a["total_dw_tasks"], a
        assert stats[1]["total_dw_tasks"] == stats[2]["total_dw_tasks"] == 0, stats

        out_b, dx_b, g_b, stats = step(model_b, runtimes[1])
        b = stats[1]
        assert b["overlapped_dw_tasks"] >= 2 and b["inline_dw_tasks"] == 0, b
        assert b["completed_dw_tasks"] == b["total_dw_tasks"] and b["pending_dw_tasks"] == 0, b
        assert stats[0] == a and stats[2]["total_dw_tasks"] == 0, stats

        out_c, dx_c, g_c, stats = step(model_c, runtimes[2])
        c = stats[2]
        assert c["total_dw_tasks"] >= 4 and c["inline_dw_tasks"] == c["total_dw_tasks"], c
        assert stats[0] == a and stats[1] == b, stats

        for out, dx, g in ((out_b, dx_b, g_b), (out_c, dx_c, g_c)):
            assert torch.equal(out, out_a) and torch.equal(dx, dx_a)
            assert g.keys() == g_a.keys()
            for n in g_a:
                assert torch.equal(g[n], g_a[n]), n
    finally:
        parallel_state.destroy_model_parallel()


def test_two_models_keep_their_own_settings():
    run_distributed(_body, 2)
