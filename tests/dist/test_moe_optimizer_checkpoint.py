"""Tier: dist. FluidMoELayer model + optimizer distributed checkpoints (torch_dist on gloo, EP=2).

Megatron's optimizers find each parameter's sharding by identity: the entry of the model's
sharded state dict whose `.data` IS the Parameter (get_param_id_to_sharded_param_map). The Fluid
experts store stacked `weight1 [G, F1, H]` / `weight2 [G, H, F]` but present SequentialMLP's
per-expert layout, so they must do it through a ShardedTensorFactory over the stacked Parameter.
Checked, SwiGLU and GELU:
  - every parameter of a torch optimizer over the layer, and over a whole Fluid-spec GPTModel,
    maps to a sharded entry (this raised KeyError in `pretrain_gpt.py --save` before the factory);
  - save model + optimizer (Megatron's FP32Optimizer over Adam, after two steps) with
    dist_checkpointing.save, load into a differently seeded Fluid layer: weights, exp_avg,
    exp_avg_sq and step come back bit for bit;
  - load that checkpoint into the stock local-spec MoELayer (SequentialMLP) and its optimizer:
    expert g's weights and Adam moments equal slice g of the Fluid tensors, so optimizer state
    interchanges with stock per expert, not only model weights.
Bit-exact comparisons (torch.equal): a checkpoint round trip copies fp32 values, no arithmetic.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests._dist import run_distributed
from tests.dist.test_moe_state_dict import ep_worker, stock_layer

H, FFN, E = 16, 8, 4


def _init_adam_state(opt, config=None):
    """Megatron's Adam init_state_fn (megatron/core/optimizer/__init__.py): zero moments."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _megatron_adam(module):
    """Megatron's FP32Optimizer (non-distributed optimizer) over torch Adam, on CPU.

    FP32Optimizer.__init__ allocates a CUDA loss-scale tensor that the checkpoint path never
    reads, so the base initialiser is called directly; sharded_state_dict / load_state_dict are
    the real ones.
    """
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer

    opt = FP32Optimizer.__new__(FP32Optimizer)
    MegatronOptimizer.__init__(
        opt, torch.optim.Adam(module.parameters(), lr=1e-2), OptimizerConfig(), _init_adam_state
    )
    opt.is_stub_optimizer = False
    return opt


def _save(layer, opt, ckpt_dir):
    from megatron.core import dist_checkpointing

    model_sd = layer.sharded_state_dict()
    state = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}
    dist_checkpointing.save(state, ckpt_dir)


def _load(layer, opt, ckpt_dir):
    from megatron.core import dist_checkpointing

    model_sd = layer.sharded_state_dict()
    state = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(state, ckpt_dir)
    layer.load_state_dict(loaded["model"], strict=True)
    opt.load_state_dict(loaded["optimizer"])


def _check_param_map(rank, ws, pg, glu):
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    from fluid.moe import FluidMoELayer
    from fluid.testing.moe import local_moe_submodules, moe_config

    cfg = moe_config(hidden=H, ffn=FFN, num_experts=E, topk=2, ep=ws, shared=12, glu=glu)
    layer = FluidMoELayer(cfg, submodules=local_moe_submodules(), pg_collection=pg)
    params = list(layer.parameters())
    id_map = get_param_id_to_sharded_param_map(
        layer.sharded_state_dict(prefix="decoder.layers.0.mlp."), params
    )
    assert sorted(id_map) == list(range(len(params))), (sorted(id_map), len(params))
    for i, p in enumerate(params):
        assert id_map[i].data is p, (i, id_map[i].key)


def _check_round_trip(rank, ws, pg, glu, root):
    from fluid.moe import FluidMoELayer
    from fluid.testing.moe import local_moe_submodules, moe_config

    if not torch.cuda.is_available():
        # The torch_dist writer assumes CUDA in two places: torch.cuda.synchronize() after its
        # host copies (filesystem_async.preload_tensors; CPU tensors: nothing to wait for) and
        # `device=torch.cuda.current_device()` for a one-int failure all-reduce
        # (state_dict_saver.save_state_dict_async_finalize; gloo reduces it on the CPU). This is
        # a worker process of its own (tests/_dist.py), so the patch dies with it.
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: "cpu"
    ckpt_dir = f"{root}/glu{int(glu)}"

    cfg = moe_config(hidden=H, ffn=FFN, num_experts=E, topk=2, ep=ws, shared=12, glu=glu)
    sub = local_moe_submodules()

    # Router and shared expert are replicated over EP (one copy is saved), so they and their
    # gradients are equal on all ranks as after a DP all-reduce; experts differ per rank.
    torch.manual_seed(100)
    src = FluidMoELayer(cfg, submodules=sub, pg_collection=pg)
    params = dict(src.named_parameters())
    gen = {False: torch.Generator().manual_seed(7), True: torch.Generator().manual_seed(8 + rank)}
    with torch.no_grad():
        for p in (src.experts.weight1, src.experts.weight2):
            p.copy_(torch.randn(p.shape, generator=gen[True]))

    # Two Adam steps on arbitrary gradients, so the moments and step are non-trivial.
    opt = _megatron_adam(src)
    for _ in range(2):
        for name, p in params.items():
            p.grad = torch.randn(p.shape, generator=gen[name.startswith("experts.")])
        opt.optimizer.step()
    _save(src, opt, ckpt_dir)

    # Fluid -> Fluid.
    torch.manual_seed(200)
    dst = FluidMoELayer(cfg, submodules=sub, pg_collection=pg)
    dst_opt = _megatron_adam(dst)
    for p, q in zip(params.values(), dst.parameters(), strict=True):
        assert not torch.equal(p, q)
    _load(dst, dst_opt, ckpt_dir)
    for (name, p), q in zip(src.named_parameters(), dst.parameters(), strict=True):
        assert torch.equal(p, q), name
        s, d = opt.optimizer.state[p], dst_opt.optimizer.state[q]
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[k], d[k]), (name, k)
        assert int(d["step"]) == int(s["step"]) == 2, (name, d["step"])

    # Fluid -> stock SequentialMLP: expert g's weights and moments are slice g of the stacked ones.
    stock = stock_layer(cfg, pg, sub)
    stock_opt = _megatron_adam(stock)
    _load(stock, stock_opt, ckpt_dir)
    stock_params = dict(stock.named_parameters())
    for stacked, fc in (("weight1", "linear_fc1"), ("weight2", "linear_fc2")):
        p = getattr(src.experts, stacked)
        for g in range(src.experts.num_local_experts):
            q = stock_params[f"experts.local_experts.{g}.{fc}.weight"]
            assert torch.equal(p[g], q), (stacked, g)
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.optimizer.state[p][k][g], stock_opt.optimizer.state[q][k])
    for name, p in params.items():
        if not name.startswith("experts."):
            q = stock_params[name]
            assert torch.equal(p, q), name
            assert torch.equal(
                opt.optimizer.state[p]["exp_avg"], stock_opt.optimizer.state[q]["exp_avg"]
            )


def _check_gpt_param_map(rank, ws):
    """The whole Fluid-spec GPTModel of tests/dist/test_gpt_model.py, as pretrain_gpt.py saves it."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    from tests.dist.test_gpt_model import _build

    model, _ = _build(ws)  # initialises EP = ws
    try:
        names = [n for n, _ in model.named_parameters()]
        id_map = get_param_id_to_sharded_param_map(model.sharded_state_dict(), model.parameters())
        assert not [n for i, n in enumerate(names) if i not in id_map], (names, sorted(id_map))
    finally:
        parallel_state.destroy_model_parallel()


def test_optimizer_finds_every_parameter():
    run_distributed(ep_worker, 2, _check_param_map)
    run_distributed(_check_gpt_param_map, 2)


@pytest.mark.skipif(
    importlib.util.find_spec("psutil") is None,
    reason="Megatron's torch_dist writer needs psutil (filesystem_async._process_memory)",
)
def test_model_and_optimizer_round_trip(tmp_path):
    for glu in (True, False):
        (tmp_path / f"glu{int(glu)}").mkdir()
    run_distributed(ep_worker, 2, _check_round_trip, str(tmp_path))
