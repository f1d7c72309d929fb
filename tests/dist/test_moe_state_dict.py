"""Tier: dist. FluidMoELayer checkpoints are interchangeable with the stock local-spec MoELayer (EP=2).

The stock MoELayer (local spec: TopKRouter, SequentialMLP of MLP experts, SharedExpertMLP) is built
on CPU; only its dispatcher's class-wide CUDA stream is pre-set to a placeholder (it is created in
the constructor and never used here). Checked, SwiGLU and GELU:
  - state_dict(): identical key sets and shapes (SequentialMLP layout, _extra_state included);
  - stock -> Fluid -> stock: loading the stock state dict into Fluid (strict) and reading it back
    gives the stock tensors bit for bit, and the Fluid layer then computes the reference MoE of
    those weights (so the stacked layout is really used, not just stored);
  - sharded_state_dict(): identical keys, and for every ShardedTensor (GLU factories built) the
    same global shape, global offset and replica id: distributed checkpoints interchange too.
"""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed

# Same fp32 tolerance and reasoning as tests/dist/test_moe_layer.py.
RTOL, ATOL = 1e-4, 1e-5
H, FFN, E, TOKENS = 16, 8, 4, 10


def _stock_layer(cfg, pg, submodules):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()  # CPU host: never used here
    return MoELayer(cfg, submodules=submodules, pg_collection=pg)


def _normalize(sharded):
    """{key: comparable description} for ShardedTensor / ShardedObject / factories."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    out = {}
    for k, v in sharded.items():
        if isinstance(v, ShardedTensorFactory):
            built = v.build_fn(v.key, v.data, v.replica_id, v.flattened_range)
            if isinstance(built, (list, tuple)):
                built = dict(enumerate(built))
            out[k] = sorted(str(d) for d in _normalize(built).values())
        elif hasattr(v, "global_shape"):
            out[k] = (v.key, tuple(v.global_shape), tuple(v.global_offset), tuple(v.replica_id))
        else:
            out[k] = (v.key, getattr(v, "global_shape", None), getattr(v, "replica_id", None))
    return out


def _check(rank, ws, pg, glu):
    from fluid.moe import FluidMoELayer
    from fluid.moe.reference import reference_activation, reference_moe
    from fluid.moe.testing import global_inputs, local_moe_submodules, moe_config

    cfg = moe_config(hidden=H, ffn=FFN, num_experts=E, topk=2, ep=ws, shared=12, glu=glu)
    sub = local_moe_submodules()
    torch.manual_seed(100 + rank)
    stock = _stock_layer(cfg, pg, sub)
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
        mine = torch.stack([stock_sd[f"experts.local_experts.{g}.linear_fc{i}.weight"] for g in range(G)])
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

    sh_stock = _normalize(stock.sharded_state_dict(prefix="decoder.layers.0.mlp."))
    sh_fluid = _normalize(fluid.sharded_state_dict(prefix="decoder.layers.0.mlp."))
    assert sorted(sh_stock) == sorted(sh_fluid), (sorted(sh_stock), sorted(sh_fluid))
    assert any("mlp.experts.experts.linear_fc1.weight" in str(v) for v in sh_stock.values()), sh_stock
    for k in sh_stock:
        assert sh_stock[k] == sh_fluid[k], (k, sh_stock[k], sh_fluid[k])


def _worker(rank, ws):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ws)
    try:
        pg = ProcessGroupCollection.use_mpu_process_groups()
        for glu in (True, False):
            _check(rank, ws, pg, glu)
    finally:
        parallel_state.destroy_model_parallel()


def test_state_dict_interchangeable_with_stock():
    run_distributed(_worker, 2)
