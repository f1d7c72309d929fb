"""Tier: cpu. Fluid ops under autograd calls that ask for some inputs only, against stock layers.

A Fluid op computes dX in its backward and hands dW to the BackwardScheduler (fluid.schedule).
`torch.autograd.grad(out, x)` and `out.backward(inputs=[x])` ask for x's gradient only: a stock
layer (Megatron's Column/RowParallelLinear, SequentialMLP's linears) then computes no dW and leaves
every weight's `.grad` (and, under Megatron DDP, `main_grad`) untouched. A gradient penalty or an
attribution pass through a Fluid layer must do the same, or its dW leaks into the next optimizer
step. Checked for FluidColumnParallelLinear, FluidRowParallelLinear, grouped_linear (the experts'
GEMM) and sequential_experts (the per-expert path, also under emulated Megatron DDP):
  - after the call every Fluid weight's `.grad` is None, no dW task was handed to the scheduler
    (`total_dw_tasks` 0) and none is pending, no hook on a weight's AccumulateGrad fired, and a
    `main_grad` stays zero;
  - the gradient returned for x equals the one a full backward of the same op gives (torch.equal:
    the same dX GEMMs on the same tensors) and, for the linears, the stock layer's;
  - a full backward afterwards gives exactly the stock gradients (nothing leaked into them).
A Fluid weight asked for directly (`autograd.grad(out, [w])`, `autograd.grad(out, [x, w])`,
`out.backward(inputs=[w])`), for the linears, the experts' two paths and FluidGroupedMLP:
  - scheduler off (the weights are autograd inputs, see fluid/schedule/wgrad.py): the stock
    layer's gradients (torch.equal: the same GEMMs) and the plain-torch math's (RTOL/ATOL, fp32
    summation order); autograd.grad fills no `.grad`, fires no hook and leaves `main_grad` and
    `grad_added_to_main_grad` alone; backward(inputs=) fills `.grad` and fires each hook once, as
    stock; no dW task reaches the scheduler. A training backward with the scheduler off fires
    each hook once, with its dW, and is bit-identical to the scheduler on;
  - scheduler on: pinned as unsupported (the weight is not an input of the Fluid op's autograd
    node while its dW is deferred; autograd reports it as unused).
Also pinned: create_graph=True (double backward) is refused instead of silently dropping the
second-order terms through the weights.
"""

from __future__ import annotations

import pytest
import torch

from fluid.testing.world import single_rank_megatron


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    with single_rank_megatron():
        yield


class _LatestScheduler:
    """`get_backward_scheduler()` at each use: the scheduler of the model built last (each
    `_pair` builds its linears from a new config, i.e. a new model with its own scheduler)."""

    def __getattr__(self, name):
        from fluid.schedule import get_backward_scheduler

        return getattr(get_backward_scheduler(), name)


@pytest.fixture()
def sched():
    s = _LatestScheduler()
    s.enable()
    s.reset_stats()
    yield s
    s.clear()


def _pair(kind, bias=True, scheduler=True):
    """(stock, fluid) Megatron linears of `kind` with identical weights (and biases); the Fluid
    one's model has `--fluid-scheduler` on or off (`scheduler`)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fluid.linear import FluidColumnParallelLinear, FluidRowParallelLinear

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
        fluid_scheduler=scheduler,
    )
    if kind == "column":
        cls_s, cls_f, size = ColumnParallelLinear, FluidColumnParallelLinear, (32, 48)
        extra = {"gather_output": False}
    else:
        cls_s, cls_f, size = RowParallelLinear, FluidRowParallelLinear, (48, 32)
        extra = {"input_is_parallel": True}
    kw = dict(init_method=torch.nn.init.normal_, bias=bias, skip_bias_add=False, **extra)
    stock = cls_s(*size, config=cfg, **kw)
    fluid = cls_f(*size, config=cfg, name=f"test.{kind}", **kw)
    if bias:
        with torch.no_grad():
            stock.bias.normal_()
    fluid.load_state_dict(stock.state_dict())
    return stock, fluid


def _node_hooks(params):
    """Hooks where Megatron DDP registers its own (each parameter's AccumulateGrad node); returns
    (calls, nodes): keep the nodes alive, as DDP does."""
    calls, nodes = [], []
    for i, p in enumerate(params):
        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(lambda *_, i=i: calls.append(i))
        nodes.append(acc)
    return calls, nodes


def _assert_no_dw(params, sched, calls):
    for p in params:
        assert p.grad is None, "a selective autograd call filled a Fluid weight's .grad"
        if hasattr(p, "main_grad"):
            assert not p.main_grad.any(), "a selective autograd call added into main_grad"
    stats = sched.get_stats()
    assert stats["total_dw_tasks"] == 0 and sched.num_pending == 0, stats
    assert calls == [], f"hooks on the weights' AccumulateGrad fired: {calls}"


SELECTIVE = {
    "grad": lambda out, x: torch.autograd.grad(out.sum(), x)[0],
    "backward_inputs": lambda out, x: (out.sum().backward(inputs=[x]), x.grad)[1],
}


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("how", sorted(SELECTIVE))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_selective_call_computes_no_dw(kind, how, bias, sched):
    stock, fluid = _pair(kind, bias)
    calls, nodes = _node_hooks(list(fluid.parameters()))
    torch.manual_seed(0)
    x0 = torch.randn(6, 3, stock.weight.shape[1])

    x_s = x0.clone().requires_grad_(True)
    ref_dx = torch.autograd.grad(stock(x_s)[0].sum(), x_s)[0]
    x_f = x0.clone().requires_grad_(True)
    dx = SELECTIVE[how](fluid(x_f)[0], x_f)
    _assert_no_dw(fluid.parameters(), sched, calls)
    assert torch.equal(dx, ref_dx)

    # A full backward afterwards: exactly the stock gradients, nothing leaked into them.
    for layer in (stock, fluid):
        x = x0.clone().requires_grad_(True)
        layer(x)[0].sum().backward()
    for (n, ps), pf in zip(stock.named_parameters(), fluid.parameters(), strict=True):
        assert torch.equal(pf.grad, ps.grad), n
    assert sorted(calls) == list(range(len(list(fluid.parameters())))), calls
    del nodes


def test_linear_gradient_of_an_upstream_tensor(sched):
    """x is not a leaf: the gradient of the leaf it came from, through the Fluid op."""
    stock, fluid = _pair("column")
    y = torch.randn(5, 2, 32, requires_grad=True)
    ref = torch.autograd.grad(stock(torch.tanh(y))[0].sum(), y)[0]
    got = torch.autograd.grad(fluid(torch.tanh(y))[0].sum(), y)[0]
    assert torch.equal(got, ref)
    _assert_no_dw(fluid.parameters(), sched, [])


def test_linear_full_backward_still_defers_dw(sched):
    """Unchanged: in a plain backward the dW is handed over and flushed at its end."""
    _, fluid = _pair("row")
    x = torch.randn(4, 2, 48, requires_grad=True)
    fluid(x)[0].sum().backward()
    stats = sched.get_stats()
    assert stats["total_dw_tasks"] == stats["flushed_dw_tasks"] == 1, stats
    assert fluid.weight.grad is not None and fluid.bias.grad is not None


def test_linear_input_without_grad_still_gets_dw(sched):
    """x needs no gradient (e.g. the first layer's input): the op stays in the graph and the
    full backward still produces dW, as stock's does."""
    stock, fluid = _pair("column")
    x = torch.randn(4, 2, 32)
    stock(x)[0].sum().backward()
    fluid(x)[0].sum().backward()
    for ps, pf in zip(stock.parameters(), fluid.parameters(), strict=True):
        assert torch.equal(pf.grad, ps.grad)


def test_probe_is_no_parameter_and_copies_with_the_weight(sched):
    """The probe lives on the weight (the model's object), not among the parameters or in the
    state dict; a weight that has run still deep-copies and pickles (EMA copies, torch.save)."""
    import copy
    import io

    _, fluid = _pair("column")
    keys = list(fluid.state_dict())
    fluid(torch.randn(2, 1, 32))[0].sum().backward()
    assert isinstance(fluid.weight._fluid_dw_probe, torch.Tensor)
    assert list(fluid.state_dict()) == keys and len(list(fluid.parameters())) == 2
    twin = copy.deepcopy(fluid.weight)
    assert torch.equal(twin, fluid.weight)
    assert getattr(twin, "_fluid_dw_probe", None) is not fluid.weight._fluid_dw_probe
    buf = io.BytesIO()
    torch.save(fluid.weight, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False), fluid.weight)


def test_weight_cannot_be_asked_for_directly(sched):
    """Pinned limitation with the scheduler on: the weight is not an input of the Fluid op's
    autograd node (its dW is handed to autograd later, after the all-to-all window; an edge to the
    weight would run its AccumulateGrad, and Megatron DDP's hook, before the dW exists). So
    autograd reports it as unused, and `backward(inputs=[w])` leaves w.grad None. With the
    scheduler off both work (test_linear_weight_asked_for_directly)."""
    _, fluid = _pair("column")
    x = torch.randn(3, 2, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(fluid(x)[0].sum(), [fluid.weight])
    fluid(x)[0].sum().backward(inputs=[fluid.weight])
    assert fluid.weight.grad is None
    assert sched.num_pending == 0


@pytest.mark.parametrize("kind", ["column", "row"])
def test_create_graph_is_refused(kind, sched):
    """Double backward (e.g. a gradient penalty's `grad(..., create_graph=True)`) would give
    gradients without the terms through the weight: refused, naming the reason."""
    _, fluid = _pair(kind)
    x = torch.randn(3, 2, fluid.weight.shape[1], requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(fluid(x)[0].sum(), x, create_graph=True)
    assert fluid.weight.grad is None and sched.num_pending == 0


# -- a Fluid weight asked for directly (scheduler off) ------------------------------------------
# fp32, summation order only: nn.functional.linear's GEMMs may block the sums differently from
# the Fluid/stock `dy^T @ x`. Each gradient entry sums at most 18 products of unit-variance
# terms; a wrong or missing gradient is off by O(1).
RTOL, ATOL = 1e-5, 1e-5


def _ask(layer, x0, how):
    """Run `layer` on x0 and ask autograd for its parameters' gradients the way `how` says:
    `grad_w` autograd.grad(out, params), `grad_x_w` autograd.grad(out, [x, *params]),
    `backward_inputs_w` out.backward(inputs=params). Returns {name: gradient} ("x" for x)."""
    names = [n for n, _ in layer.named_parameters()]
    params = list(layer.parameters())
    x = x0.clone().requires_grad_(True)
    out = layer(x)[0].sum()
    if how == "backward_inputs_w":
        out.backward(inputs=params)
        assert x.grad is None
        return {n: p.grad for n, p in zip(names, params, strict=True)}
    inputs = [x, *params] if how == "grad_x_w" else params
    grads = torch.autograd.grad(out, inputs)
    return dict(zip((["x"] if how == "grad_x_w" else []) + names, grads, strict=True))


DIRECT = ("backward_inputs_w", "grad_w", "grad_x_w")


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("how", DIRECT)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_weight_asked_for_directly(kind, how, bias):
    """With the scheduler off, `autograd.grad(out, [w, b])`, `autograd.grad(out, [x, w, b])` and
    `out.backward(inputs=[w, b])` give what the stock layer gives (torch.equal: the same GEMMs,
    as in tests/cpu/test_linear.py) and what nn.functional.linear gives (RTOL/ATOL). autograd.grad
    fills no `.grad` and fires no hook; backward(inputs=) fills each `.grad` once, as stock."""
    stock, fluid = _pair(kind, bias, scheduler=False)
    sched = fluid.fluid_scheduler
    sched.reset_stats()
    calls, nodes = _node_hooks(list(fluid.parameters()))
    torch.manual_seed(0)
    x0 = torch.randn(6, 3, stock.weight.shape[1])
    ref, got = _ask(stock, x0, how), _ask(fluid, x0, how)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k

    x = x0.clone().requires_grad_(True)
    w = stock.weight.detach().clone().requires_grad_(True)
    b = stock.bias.detach().clone().requires_grad_(True) if bias else None
    out = torch.nn.functional.linear(x, w, b).sum()
    leaves = {"x": x, "weight": w, **({"bias": b} if bias else {})}
    math = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values())), strict=True))
    for k in got:
        torch.testing.assert_close(got[k], math[k], rtol=RTOL, atol=ATOL, msg=k)

    if how == "backward_inputs_w":
        assert sorted(calls) == list(range(len(got))), calls  # each hook once, with its .grad
    else:
        assert calls == [] and all(p.grad is None for p in fluid.parameters())
    stats = sched.get_stats()  # a direct ask is no dW task of training's
    assert stats["total_dw_tasks"] == 0 and sched.num_pending == 0, stats
    del nodes


@pytest.mark.parametrize("flag", [False, True], ids=["flag_clear", "flag_set"])
def test_linear_weight_asked_for_directly_under_ddp(flag):
    """Under Megatron DDP (emulated: main_grad and a hook on each AccumulateGrad), with the
    scheduler off: autograd.grad(out, [w]) leaves main_grad and grad_added_to_main_grad alone,
    also when an earlier fused dW of the step set the flag; backward(inputs=[w]) does what stock
    does, AccumulateGrad then DDP's hook (main_grad += dW, .grad dropped)."""
    from fluid.testing.moe import emulate_ddp_grads

    stock, fluid = _pair("column", scheduler=False)
    fired = {"stock": [], "fluid": []}
    keep = [
        emulate_ddp_grads(m.parameters(), fired[k].append)
        for k, m in (("stock", stock), ("fluid", fluid))
    ]
    for p in fluid.parameters():
        p.grad_added_to_main_grad = flag
    x0 = torch.randn(4, 2, 32)
    got = _ask(fluid, x0, "grad_w")
    ref = _ask(stock, x0, "grad_w")
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    for p in fluid.parameters():
        assert not p.main_grad.any() and p.grad is None and p.grad_added_to_main_grad == flag
    assert fired["fluid"] == []

    for p in fluid.parameters():
        p.grad_added_to_main_grad = False
    _ask(stock, x0, "backward_inputs_w")
    _ask(fluid, x0, "backward_inputs_w")
    for ps, pf in zip(stock.parameters(), fluid.parameters(), strict=True):
        assert pf.grad is None and torch.equal(pf.main_grad, ps.main_grad)
    assert sorted(fired["fluid"]) == sorted(fired["stock"]) == [0, 1]
    del keep


def test_linear_full_backward_with_scheduler_off_fires_each_hook_once_under_ddp():
    """The scheduler off, two micro-batches under (emulated) Megatron DDP: main_grad equals the
    stock layer's bitwise (the same GEMMs, added in the same order), and each weight's hook fires
    once per micro-batch, with its dW present (never an empty AccumulateGrad run)."""
    from fluid.testing.moe import emulate_ddp_grads

    stock, fluid = _pair("row", scheduler=False)
    fired = {"stock": [], "fluid": []}
    keep = [
        emulate_ddp_grads(m.parameters(), fired[k].append)
        for k, m in (("stock", stock), ("fluid", fluid))
    ]
    for seed in (0, 1):
        x0 = torch.randn(4, 2, 48, generator=torch.Generator().manual_seed(seed))
        for layer in (stock, fluid):
            layer(x0.clone().requires_grad_(True))[0].sum().backward()
    for ps, pf in zip(stock.parameters(), fluid.parameters(), strict=True):
        assert torch.equal(pf.main_grad, ps.main_grad)
    assert sorted(fired["fluid"]) == sorted(fired["stock"]) == [0, 0, 1, 1]
    stats = fluid.fluid_scheduler.get_stats()
    assert stats["inline_dw_tasks"] == stats["total_dw_tasks"] == 2, stats
    del keep


@pytest.mark.parametrize("kind", ["column", "row"])
def test_linear_scheduler_on_and_off_are_bit_identical_for_a_strided_input(kind):
    """Weights attached (scheduler off) or detached (on): the same output, dX and dW bits. An
    `[s, b, in]` input that is a transpose (as attention's output is) takes torch.matmul's bmm
    path unless the weight requires grad, so the op must compute with a detached weight."""
    outs = []
    for scheduler in (True, False):
        torch.manual_seed(0)  # the same weights
        _, fluid = _pair(kind, scheduler=scheduler)
        x = torch.randn(3, 5, fluid.weight.shape[1], generator=torch.Generator().manual_seed(0))
        x = x.transpose(0, 1).requires_grad_(True)  # [5, 3, in], not contiguous
        y = fluid(x)[0]
        y.backward(torch.ones_like(y))
        outs.append([y.detach(), x.grad, *(p.grad for p in fluid.parameters())])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


# -- the experts' dW paths --------------------------------------------------------------------
H, F, G = 12, 10, 4
COUNTS = (5, 0, 7, 3)


def _expert_weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.nn.Parameter(torch.randn(G, 2 * F, H, generator=gen) / H**0.5)
    w2 = torch.nn.Parameter(torch.randn(G, H, F, generator=gen) / F**0.5)
    return w1, w2


def _swiglu(h, p):
    x_glu, x_lin = torch.chunk(h, 2, dim=-1)
    return (torch.nn.functional.silu(x_glu) * x_lin * p.unsqueeze(-1)).to(h.dtype)


def _grouped(x, p, w1, w2, scheduler=None):
    from fluid.moe.grouped_gemm import grouped_linear

    h = grouped_linear(x, w1, COUNTS, None, scheduler=scheduler)
    return grouped_linear(_swiglu(h, p), w2, COUNTS, None, scheduler=scheduler)


def _sequential(x, p, w1, w2, scheduler=None):
    from fluid.moe.expert_loop import sequential_experts

    return sequential_experts(x, p, w1, w2, COUNTS, _swiglu, scheduler=scheduler)


def _expert_math(x, p, w1, w2):
    """The experts in plain torch ops, one expert at a time (the reference)."""
    outs, start = [], 0
    for g, c in enumerate(COUNTS):
        rows = slice(start, start + c)
        start += c
        outs.append(_swiglu(x[rows] @ w1[g].t(), p[rows]) @ w2[g].t())
    return torch.cat(outs)


def _expert_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    T = sum(COUNTS)
    return torch.randn(T, H, generator=gen), torch.rand(T, generator=gen)


@pytest.mark.parametrize("path", [_grouped, _sequential], ids=["grouped_linear", "sequential"])
@pytest.mark.parametrize("how", sorted(SELECTIVE))
@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
def test_experts_selective_call_computes_no_dw(path, how, ddp, sched):
    from fluid.testing.moe import emulate_ddp_grads

    w1, w2 = _expert_weights()
    fired = []
    keep = emulate_ddp_grads((w1, w2), fired.append) if ddp else None
    calls, nodes = _node_hooks((w1, w2))
    x0, p0 = _expert_inputs()

    x = x0.clone().requires_grad_(True)
    dx = SELECTIVE[how](path(x, p0, w1, w2), x)
    _assert_no_dw((w1, w2), sched, calls)
    assert fired == []

    # The same op in a full backward: the same dX (same GEMMs), and now the dW.
    x = x0.clone().requires_grad_(True)
    path(x, p0, w1, w2).sum().backward()
    assert torch.equal(x.grad, dx)
    for w in (w1, w2):
        assert (w.main_grad if ddp else w.grad).abs().sum() > 0
    del keep, nodes


@pytest.mark.parametrize("path", [_grouped, _sequential], ids=["grouped_linear", "sequential"])
def test_experts_weight_gradients_after_selective_call_are_the_plain_ones(path, sched):
    """Selective call, then a full backward: weight gradients bitwise equal to a full backward
    alone (same ops), i.e. nothing of the selective call leaked into them."""
    x0, p0 = _expert_inputs()
    ref_w, got_w = _expert_weights(), _expert_weights()
    path(x0.clone().requires_grad_(True), p0, *ref_w).sum().backward()
    x = x0.clone().requires_grad_(True)
    torch.autograd.grad(path(x, p0, *got_w).sum(), x)
    path(x0.clone().requires_grad_(True), p0, *got_w).sum().backward()
    for r, g in zip(ref_w, got_w, strict=True):
        assert torch.equal(g.grad, r.grad)


@pytest.mark.parametrize("path", [_grouped, _sequential], ids=["grouped_linear", "sequential"])
def test_experts_create_graph_is_refused(path, sched):
    w1, w2 = _expert_weights()
    x0, p0 = _expert_inputs()
    x = x0.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(path(x, p0, w1, w2).sum(), x, create_graph=True)
    assert w1.grad is None and w2.grad is None


def _ask_experts(path, x0, p0, weights, how, scheduler=None):
    """`_ask` for an experts path: {"x"?, "w1", "w2": gradient}."""
    x = x0.clone().requires_grad_(True)
    out = path(x, p0, *weights, **({} if scheduler is None else {"scheduler": scheduler})).sum()
    if how == "backward_inputs_w":
        out.backward(inputs=list(weights))
        assert x.grad is None
        return {"w1": weights[0].grad, "w2": weights[1].grad}
    inputs = [x, *weights] if how == "grad_x_w" else list(weights)
    grads = torch.autograd.grad(out, inputs)
    return dict(zip((["x"] if how == "grad_x_w" else []) + ["w1", "w2"], grads, strict=True))


@pytest.mark.parametrize("path", [_grouped, _sequential], ids=["grouped_linear", "sequential"])
@pytest.mark.parametrize("how", DIRECT)
@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
def test_experts_weights_asked_for_directly(path, how, ddp):
    """With the scheduler off, the experts' weights asked for directly: the gradients a full
    backward of the same op gives (torch.equal: the same per-expert GEMMs) and the plain-torch
    math's (RTOL/ATOL). Under (emulated) DDP, autograd.grad leaves main_grad and the hooks alone;
    backward(inputs=) fires each hook once and main_grad gets exactly the full backward's dW."""
    from fluid.schedule import BackwardScheduler
    from fluid.testing.moe import emulate_ddp_grads

    off = BackwardScheduler(enabled=False)
    x0, p0 = _expert_inputs()
    ref_w = _expert_weights()
    x = x0.clone().requires_grad_(True)
    path(x, p0, *ref_w, scheduler=off).sum().backward()
    ref = {"x": x.grad, "w1": ref_w[0].grad, "w2": ref_w[1].grad}

    w1, w2 = _expert_weights()
    fired = []
    keep = emulate_ddp_grads((w1, w2), fired.append) if ddp else None
    got = _ask_experts(path, x0, p0, (w1, w2), how, scheduler=off)
    if how == "backward_inputs_w" and ddp:  # DDP's hook moved each .grad into main_grad
        got = {"w1": w1.main_grad, "w2": w2.main_grad}
    for k in got:
        assert torch.equal(got[k], ref[k]), k

    m_w = [w.detach().clone().requires_grad_(True) for w in (w1, w2)]
    x = x0.clone().requires_grad_(True)
    math = torch.autograd.grad(_expert_math(x, p0, *m_w).sum(), [x, *m_w])
    for k, m in zip(("x", "w1", "w2"), math, strict=True):
        if k in got:
            torch.testing.assert_close(got[k], m, rtol=RTOL, atol=ATOL, msg=k)

    if how == "backward_inputs_w":
        assert sorted(fired) == ([0, 1] if ddp else [])
    else:
        assert fired == [] and w1.grad is None and w2.grad is None
        if ddp:
            assert not w1.main_grad.any() and not w2.main_grad.any()
    # the reference's full backward: one task per op (two grouped_linear ops, or one
    # sequential_experts op); the direct ask adds none
    assert off.get_stats()["total_dw_tasks"] == 1 + (path is _grouped), off.get_stats()
    del keep


def test_grouped_mlp_weights_asked_for_directly():
    """FluidGroupedMLP built with --no-fluid-scheduler: autograd.grad of its weights (and of its
    input) equals the plain-torch math of its experts (RTOL/ATOL)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from fluid.moe.experts import FluidGroupedMLP
    from fluid.testing.moe import moe_config

    cfg = moe_config(
        hidden=H,
        ffn=F,
        num_experts=G,
        topk=2,
        ep=1,
        bias_activation_fusion=False,
        fluid_scheduler=False,
    )
    mlp = FluidGroupedMLP(G, cfg, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    x0, p0 = _expert_inputs()
    x = x0.clone().requires_grad_(True)
    out = mlp(x, list(COUNTS), p0)[0].sum()
    got = torch.autograd.grad(out, [x, mlp.weight1, mlp.weight2])
    m_w = [w.detach().clone().requires_grad_(True) for w in (mlp.weight1, mlp.weight2)]
    x = x0.clone().requires_grad_(True)
    math = torch.autograd.grad(_expert_math(x, p0, *m_w).sum(), [x, *m_w])
    for k, g, m in zip(("x", "weight1", "weight2"), got, math, strict=True):
        torch.testing.assert_close(g, m, rtol=RTOL, atol=ATOL, msg=k)
    assert mlp.weight1.grad is None and mlp.weight2.grad is None


@pytest.mark.parametrize("path", [_grouped, _sequential], ids=["grouped_linear", "sequential"])
def test_experts_weights_cannot_be_asked_for_directly_with_the_scheduler_on(path, sched):
    """As test_weight_cannot_be_asked_for_directly, for the experts (scheduler on: deferred dW)."""
    x0, p0 = _expert_inputs()
    w1, w2 = _expert_weights()
    x = x0.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(path(x, p0, w1, w2).sum(), [w1])
    path(x, p0, w1, w2).sum().backward(inputs=[w1, w2])
    assert w1.grad is None and w2.grad is None and sched.num_pending == 0
