"""Tier: cpu. FluidColumnParallelLinear / FluidRowParallelLinear against Megatron's stock linears.

Single process (a 1-rank gloo group, TP=1). Same weights in both; checked:
  - forward output and returned bias (skip_bias_add both ways), dX, dW, db bit-identical to the
    stock layers (torch.equal: the Fluid op runs the same matmuls on the same tensors, only later);
  - with the scheduler queueing (inside backward) dW lands only at the end-of-backward flush, and
    scheduler on/off gives bit-identical gradients;
  - parameters and state-dict keys are the stock ones, and stock state dicts load;
  - gradient_accumulation_fusion=True builds without apex (stock raises) and still gives the same
    gradients through the unfused fallback.
"""

from __future__ import annotations

import pytest
import torch

from fluid.testing.world import single_rank_megatron


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    with single_rank_megatron():
        yield


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )
    base.update(kw)
    return TransformerConfig(**base)


def _pair(kind, config, bias, skip_bias_add, fluid_config=None):
    """(stock, fluid) layers of `kind` ("column" | "row") with identical parameters."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from fluid.linear import FluidColumnParallelLinear, FluidRowParallelLinear

    init = torch.nn.init.normal_
    if kind == "column":
        cls_s, cls_f, extra = (
            ColumnParallelLinear,
            FluidColumnParallelLinear,
            {"gather_output": False},
        )
        size = (32, 48)
    else:
        cls_s, cls_f, extra = RowParallelLinear, FluidRowParallelLinear, {"input_is_parallel": True}
        size = (48, 32)
    kw = dict(init_method=init, bias=bias, skip_bias_add=skip_bias_add, **extra)
    stock = cls_s(*size, config=config, **kw)
    fluid = cls_f(*size, config=fluid_config or config, name=f"test.{kind}", **kw)
    with torch.no_grad():
        if bias:
            stock.bias.normal_()
    fluid.load_state_dict(stock.state_dict())
    return stock, fluid


def _run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, bias = layer(x)
    total = out if bias is None else out + bias
    total.backward(dy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.detach(), None if bias is None else bias.detach(), x.grad, grads


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias,skip_bias_add", [(True, False), (True, True), (False, False)])
def test_matches_stock_bitwise(kind, bias, skip_bias_add):
    from fluid.schedule import get_backward_scheduler

    stock, fluid = _pair(kind, _config(), bias, skip_bias_add)
    torch.manual_seed(0)
    x = torch.randn(6, 3, stock.weight.shape[1])
    dy = torch.randn(6, 3, stock.weight.shape[0])
    ref = _run(stock, x, dy)
    sched = get_backward_scheduler()
    sched.enable()
    on = _run(fluid, x, dy)
    sched.disable()
    off = _run(fluid, x, dy)
    sched.enable()
    for got in (on, off):
        assert torch.equal(got[0], ref[0])
        assert (got[1] is None) == (ref[1] is None) == (not skip_bias_add or not bias)
        if ref[1] is not None:
            assert torch.equal(got[1], ref[1])
        assert torch.equal(got[2], ref[2])
        assert ref[3].keys() == got[3].keys()
        for n in ref[3]:
            assert torch.equal(got[3][n], ref[3][n]), n


def test_dw_is_deferred_to_end_of_backward():
    """Inside backward the dW is queued (no inline run) and flushed when the backward ends."""
    from fluid.schedule import get_backward_scheduler

    _, fluid = _pair("column", _config(), True, False)
    sched = get_backward_scheduler()
    sched.enable()
    sched.reset_stats()
    seen = []
    x = torch.randn(4, 2, 32, requires_grad=True)
    out, _ = fluid(x)
    # a hook on dX runs inside the backward, after the linear's backward: dW must be pending
    x.register_hook(lambda g: seen.append((sched.num_pending, fluid.weight.grad is None)))
    out.sum().backward()
    assert seen == [(1, True)]
    stats = sched.get_stats()
    assert stats["flushed_dw_tasks"] == 1 and stats["inline_dw_tasks"] == 0, stats
    assert fluid.weight.grad is not None and fluid.bias.grad is not None


@pytest.mark.parametrize("kind", ["column", "row"])
def test_state_dict_keys_and_param_attributes(kind):
    stock, fluid = _pair(kind, _config(), True, False)
    assert list(fluid.state_dict().keys()) == list(stock.state_dict().keys())
    for (ns, ps), (nf, pf) in zip(stock.named_parameters(), fluid.named_parameters(), strict=True):
        assert ns == nf and ps.shape == pf.shape
        for attr in ("tensor_model_parallel", "partition_dim", "allreduce"):
            assert getattr(ps, attr, None) == getattr(pf, attr, None), (nf, attr)
    fluid.backward_dw()  # no-op, exists like stock's


def test_gradient_accumulation_fusion_without_apex():
    from megatron.core.tensor_parallel.layers import _grad_accum_fusion_available

    if _grad_accum_fusion_available:
        pytest.skip("apex is installed: stock and Fluid both use the fused kernel")
    stock, fluid = _pair(
        "column", _config(), True, False, fluid_config=_config(gradient_accumulation_fusion=True)
    )
    assert fluid.gradient_accumulation_fusion and fluid.config.gradient_accumulation_fusion
    x, dy = torch.randn(5, 2, 32), torch.randn(5, 2, 48)
    ref, got = _run(stock, x, dy), _run(fluid, x, dy)
    for n in ref[3]:
        assert torch.equal(got[3][n], ref[3][n]), n
