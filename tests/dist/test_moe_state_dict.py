"""Tier: dist. FluidMoELayer checkpoints are interchangeable with the stock local-spec MoELayer (EP=2).

The stock MoELayer (local spec: TopKRouter, SequentialMLP of MLP experts, SharedExpertMLP) is built
on CPU; only its dispatcher's class-wide CUDA stream is pre-set to a placeholder (it is created in
the constructor and never used here). Checked, SwiGLU and GELU:
  - state_dict(): identical key sets and shapes (SequentialMLP layout, _extra_state included);
  - stock -> Fluid -> stock: loading the stock state dict into Fluid (strict) and reading it back
    gives the stock tensors bit for bit, and the Fluid layer then computes the reference MoE of
    those weights (so the stacked layout is really used, not just stored);
  - sharded_state_dict(): after building every factory, the same ShardedTensors / ShardedObjects
    (sharded key, global shape, global offset, local shape, replica id): distributed checkpoints
    interchange too. The state-dict structure differs only where it must: Fluid has one factory
    per stacked weight (`experts.weight1/2`, whose `data` is the Parameter, so optimizers find
    it; tests/dist/test_moe_optimizer_checkpoint.py) where stock has one entry per expert.
"""

from __future__ import annotations

import torch

from tests._dist import run_distributed

# Same fp32 tolerance and reasoning as tests/dist/test_moe_layer.py.
RTOL, ATOL = 1e-4, 1e-5
H, FFN, E, TOKENS = 16, 8, 4, 10


def stock_layer(cfg, pg, submodules):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()  # CPU host: never used here
    return MoELayer(cfg, submodules=submodules, pg_collection=pg)


def _leaves(sharded):
    """Sorted descriptions of what a distributed checkpoint stores for `sharded`.

    Factories are built recursively (a factory may build lists of tensors or further factories).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    out = []
    for v in nested_values(sharded):
        if isinstance(v, ShardedTensorFactory):
            out += _leaves(v.build())
        else:
            out.append(
                str(
                    (
                        type(v).__name__,
                        v.key,
                        tuple(v.global_shape),
                        tuple(v.global_offset),
                        tuple(getattr(v, "local_shape", ())),
                        v.replica_id,
                    )
                )
            )
    return sorted(out)


def _check(rank, ws, pg, glu):
    from fluid.moe import FluidMoELayer
    from fluid.moe.reference import reference_activation, reference_moe
    from fluid.testing.moe import global_inputs, local_moe_submodules, moe_config

    cfg = moe_config(hidden=H, ffn=FFN, num_experts=E, topk=2, ep=ws, shared=12, glu=glu)
    sub = local_moe_submodules()
    torch.manual_seed(100 + rank)
    stock = stock_layer(cfg, pg, sub)
    fluid = FluidMoELayer(cfg, submodules=sub, pg_collection=pg)

    stock_sd, fluid_sd = stock.state_dict(), fluid.state_dict()
    assert list(stock_sd) == list(fluid_sd), (sorted(stock_sd), sorted(fluid_sd))
    for k, v in stock_sd.items():
        if isinstance(v, torch.Tensor):
            assert v.shape == fluid_sd[k].shape, k

    fluid.load_state_dict(stock_sd, strict=True)
    back = fluid.state_dict()
    for k, v in stock_sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, back[k]), k
        else:
            assert v is None and back[k] is None, k

    # The loaded Fluid layer computes the reference MoE of the stock weights; the reference
    # needs every rank's experts, so gather them over the EP group.
    G = E // ws

    def gather(i):
        mine = torch.stack(
            [stock_sd[f"experts.local_experts.{g}.linear_fc{i}.weight"] for g in range(G)]
        )
        parts = [torch.empty_like(mine) for _ in range(ws)]
        torch.distributed.all_gather(parts, mine, group=pg.ep)
        return torch.cat(parts)

    w1, w2 = gather(1), gather(2)
    x, _ = global_inputs(TOKENS, H, seed=7 + rank)

    def shared_fn(t):
        h = t @ stock_sd["shared_experts.linear_fc1.weight"].t()
        return reference_activation(h, cfg) @ stock_sd["shared_experts.linear_fc2.weight"].t()

    with torch.no_grad():
        ref = reference_moe(x, stock_sd["router.weight"], w1, w2, cfg, shared_fn)
        out, _ = fluid(x.unsqueeze(1))
    torch.testing.assert_close(out.squeeze(1), ref, rtol=RTOL, atol=ATOL)

    prefix = "decoder.layers.0.mlp."
    stock_weights = {
        f"{prefix}experts.local_experts.{g}.linear_fc{i}.weight" for g in range(G) for i in (1, 2)
    }
    fluid_weights = {f"{prefix}experts.weight1", f"{prefix}experts.weight2"}
    # Default layout (one key per weight, expert axis prepended) and singleton_local_shards
    # (one key per global expert, e.g. `experts.3.linear_fc1.weight`, GLU as `_w`/`_v`).
    for singleton, expert_key in (
        (False, "experts.experts.linear_fc1.weight"),
        (True, f"experts.experts.{rank * G}.linear_fc1.weight"),
    ):
        metadata = {"singleton_local_shards": singleton}
        sh_stock = stock.sharded_state_dict(prefix=prefix, metadata=metadata)
        sh_fluid = fluid.sharded_state_dict(prefix=prefix, metadata=metadata)
        assert stock_weights <= set(sh_stock) and fluid_weights <= set(sh_fluid)
        assert sorted(set(sh_stock) - stock_weights) == sorted(set(sh_fluid) - fluid_weights)
        leaves_stock, leaves_fluid = _leaves(sh_stock), _leaves(sh_fluid)
        assert any(f"mlp.{expert_key}" in v for v in leaves_stock), leaves_stock
        assert leaves_stock == leaves_fluid, sorted(set(leaves_stock) ^ set(leaves_fluid))


def ep_worker(rank, ws, check, *args):
    """EP = ws over the gloo world; runs `check(rank, ws, pg, glu, *args)` for SwiGLU and GELU."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ws)
    try:
        pg = ProcessGroupCollection.use_mpu_process_groups()
        for glu in (True, False):
            check(rank, ws, pg, glu, *args)
    finally:
        parallel_state.destroy_model_parallel()


def test_state_dict_interchangeable_with_stock():
    run_distributed(ep_worker, 2, _check)
