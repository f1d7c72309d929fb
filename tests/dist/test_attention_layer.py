"""Tier: dist. FluidSelfAttention as a drop-in: state dict, CP=1 math, spec transform, refusals.

Two gloo ranks (the default CP group is both ranks). Checked:
  - state-dict keys (and shapes) equal stock SelfAttention's from the local GPT spec, with and
    without qk-layernorm, and a stock state dict loads;
  - CP=1 output and gradients equal the plain-PyTorch reference (fluid/attention/reference.py:
    explicit fp32 causal softmax, independent RoPE and interleaved-QKV code);
  - fluid_self_attention_spec on ModuleSpec and functools.partial specs; a layernorm-fused
    linear_qkv is refused;
  - clear errors: num_attention_heads not divisible by cp (build), TP=2 (build), inference
    context, packed sequences.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from fluid.testing.attention import build_attention, rope_angles
from fluid.testing.attention import pg_collection as pgc
from tests._dist import run_distributed
from tests.dist.test_attention_cp import assert_close, build_layer, make_config


def _check_state_dict(tp_group, single):
    for qk_ln in (False, True):
        cfg1 = make_config(8, 2, qk_ln, True, cp=1)  # stock local core asserts cp == 1
        stock = build_attention("stock", cfg1, pgc(tp_group, single))
        fluid = build_layer(cfg1, pgc(tp_group, single))
        s_sd, f_sd = stock.state_dict(), fluid.state_dict()
        assert list(s_sd.keys()) == list(f_sd.keys()), (list(s_sd), list(f_sd))
        for k in s_sd:
            if torch.is_tensor(s_sd[k]):
                assert s_sd[k].shape == f_sd[k].shape, k
        fluid.load_state_dict(s_sd)
        for k in s_sd:
            if torch.is_tensor(s_sd[k]):
                assert torch.equal(fluid.state_dict()[k], s_sd[k]), k


def _check_cp1_against_reference(tp_group, single):
    from fluid.attention.reference import reference_self_attention

    for num_heads, ng, qk_ln in ((8, 2, True), (8, 8, False)):
        cfg = make_config(num_heads, ng, qk_ln, True, cp=1)
        layer = build_layer(cfg, pgc(tp_group, single))
        torch.manual_seed(3)
        S, b = 16, 2
        x = torch.randn(S, b, cfg.hidden_size, requires_grad=True)
        emb = rope_angles(S, cfg.kv_channels)
        out, bias = layer(x, None, rotary_pos_emb=emb)
        (out + bias).square().sum().backward()

        xr = x.detach().clone().requires_grad_(True)
        w_qkv = layer.linear_qkv.weight.detach().clone().requires_grad_(True)
        b_qkv = layer.linear_qkv.bias.detach().clone().requires_grad_(True)
        w_proj = layer.linear_proj.weight.detach().clone().requires_grad_(True)
        ref = reference_self_attention(
            xr,
            w_qkv,
            b_qkv,
            w_proj,
            num_heads=num_heads,
            num_groups=ng,
            rotary_pos_emb=emb,
            q_norm=layer.q_layernorm,
            k_norm=layer.k_layernorm,
        )
        (ref + layer.linear_proj.bias.detach()).square().sum().backward()
        tag = f"cp=1 np={num_heads} ng={ng} qk_ln={qk_ln}"
        assert_close(out.detach(), ref.detach(), f"{tag}: output")
        assert_close(x.grad, xr.grad, f"{tag}: dX")
        assert_close(layer.linear_qkv.weight.grad, w_qkv.grad, f"{tag}: dW_qkv")
        assert_close(layer.linear_qkv.bias.grad, b_qkv.grad, f"{tag}: db_qkv")
        assert_close(layer.linear_proj.weight.grad, w_proj.grad, f"{tag}: dW_proj")


def _check_spec_transform():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.attention import SelfAttention

    from fluid.attention import FluidCoreAttention, FluidSelfAttention, fluid_self_attention_spec
    from fluid.linear import FluidColumnParallelLinear, FluidRowParallelLinear

    stock = get_gpt_layer_local_spec(qk_layernorm=True).submodules.self_attention
    spec = fluid_self_attention_spec(stock)
    assert spec.module is FluidSelfAttention and stock.module is SelfAttention  # input untouched
    assert spec.params == stock.params
    sub = spec.submodules
    assert sub.linear_qkv is FluidColumnParallelLinear
    assert sub.linear_proj is FluidRowParallelLinear
    assert sub.core_attention is FluidCoreAttention
    assert sub.q_layernorm is stock.submodules.q_layernorm
    assert sub.k_layernorm is stock.submodules.k_layernorm

    part = functools.partial(SelfAttention, submodules=stock.submodules, attn_mask_type="x")
    p2 = fluid_self_attention_spec(part)
    assert p2.func is FluidSelfAttention and p2.keywords["attn_mask_type"] == "x"
    assert p2.keywords["submodules"].linear_qkv is FluidColumnParallelLinear

    class TELayerNormColumnParallelLinear:  # stand-in for TE's fused norm+linear
        pass

    fused = dataclasses.replace(
        stock,
        submodules=dataclasses.replace(
            stock.submodules, linear_qkv=TELayerNormColumnParallelLinear
        ),
    )
    with pytest.raises(ValueError, match="fuses the input layernorm"):
        fluid_self_attention_spec(fused)


def _check_refusals(rank, tp_group, cp_group):
    from megatron.core.packed_seq_params import PackedSeqParams

    cfg = make_config(8, 2, False, False, cp=2)
    layer = build_layer(cfg, pgc(tp_group, cp_group))
    x = torch.randn(8, 1, cfg.hidden_size)
    with pytest.raises(NotImplementedError, match="training-only"):
        layer(x, None, inference_context=object())
    with pytest.raises(NotImplementedError, match="packed"):
        layer(x, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    # 12 heads on cp=2 is fine, 6 heads with cp=4 is not: build with heads=3 on cp=2
    bad = make_config(3, 3, False, False, cp=2)
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        build_layer(bad, pgc(tp_group, cp_group))


def _check_tp2_refused():
    from megatron.core import parallel_state

    from fluid.linear import FluidColumnParallelLinear

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        cfg = make_config(8, 2, False, False, cp=1)
        cfg.tensor_model_parallel_size = 2
        with pytest.raises(ValueError, match="tensor_model_parallel_size=1"):
            FluidColumnParallelLinear(
                16,
                16,
                config=make_config(8, 2, False, False, cp=1),
                init_method=torch.nn.init.normal_,
            )
        with pytest.raises(ValueError, match="tensor_model_parallel_size=1"):
            build_layer(cfg, pgc(parallel_state.get_tensor_model_parallel_group(), None))
    finally:
        parallel_state.destroy_model_parallel()


def _worker(rank, world_size):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(context_parallel_size=world_size)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    singles = [dist.new_group([r]) for r in range(world_size)]
    try:
        _check_state_dict(tp_group, singles[rank])
        _check_cp1_against_reference(tp_group, singles[rank])
        _check_spec_transform()
        _check_refusals(rank, tp_group, cp_group)
    finally:
        parallel_state.destroy_model_parallel()
    _check_tp2_refused()


def test_attention_layer_contract():
    run_distributed(_worker, 2)
