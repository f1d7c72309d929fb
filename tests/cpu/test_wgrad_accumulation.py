"""Tier: cpu. `--fluid-wgrad-accumulation`: dW added into Megatron DDP's fp32 `main_grad` inside the
GEMM (fluid.schedule.wgrad.accumulation_kernel) instead of a dW tensor DDP's hook adds.

What must hold, under emulated Megatron DDP (fp32 `main_grad` and a hook on each AccumulateGrad,
fluid.testing.moe.emulate_ddp_grads), for the dense linear (`deferred_linear`) and the experts
(`grouped_linear`, `sequential_experts`), scheduler on (dW deferred) and off (inline):
  - auto (on CPU: `accumulate_reference`) gives main_grad equal to the unfused path's within fp32
    rounding (fp32 parameters: both sums of the same fp32 products, bound below), sets
    `grad_added_to_main_grad`, and fires each parameter's hook once per backward with the
    placeholder gradient (param-shaped, param dtype), as apex's path does;
  - unfused is today's hand-over bit for bit: the hook sees exactly `torch.matmul(dy^T, x)` and
    main_grad is the sum of those dWs;
  - scheduler on and off give bitwise-equal main_grad under auto (the same kernel on the same
    operands);
  - bf16 parameters: auto's main_grad is within fp32 rounding of the fp64 product (it never rounds
    dW to bf16), unfused's within bf16 rounding of it (bounds below);
  - fused refuses a weight without an fp32 main_grad, at backward, naming the flag.

Bounds, per element, with A = sum over micro-batches of |dy|^T |x| (fp64) and K the rows summed:
an fp32 dot product of K terms is off by at most K * u32 * A (u32 = 2^-24), and each add into
main_grad by u32 * |main_grad|; a bf16 rounding of dW adds u_bf16 * |dW| <= u_bf16 * A
(u_bf16 = 2^-8). So reference vs fp64: (K + 2) * u32 * A; reference vs unfused in fp32: twice
that; unfused bf16 vs fp64: u_bf16 * A + (K + 2) * u32 * A.
"""

import re

import pytest
import torch

from fluid.config import FluidConfigError
from fluid.moe.expert_loop import sequential_experts
from fluid.moe.grouped_gemm import grouped_linear
from fluid.schedule import BackwardScheduler, deferred_linear
from fluid.schedule.wgrad import accumulate_reference, accumulation_kernel
from fluid.testing.moe import emulate_ddp_grads, reset_ddp_flags

U32, U_BF16 = 2.0**-24, 2.0**-8
H, F, COUNTS = 12, 10, (5, 0, 7, 3)  # expert 1 gets no rows
T = sum(COUNTS)


def _watch(params):
    """Emulated Megatron DDP on `params`, plus a record of what each hook saw: (index, grad shape,
    grad dtype, grad_added_to_main_grad, grad clone). Keep the returned nodes alive."""
    seen: list = []
    nodes = []
    for i, p in enumerate(params):
        acc = p.expand_as(p).grad_fn.next_functions[0][0]

        def record(*_, p=p, i=i):  # registered first: runs before DDP's hook drops p.grad
            g = p.grad
            seen.append((i, tuple(g.shape), g.dtype, p.grad_added_to_main_grad, g.clone()))

        acc.register_hook(record)
        nodes.append(acc)
    nodes += emulate_ddp_grads(params)
    return seen, nodes


def _dense_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter((torch.randn(16, 24, generator=gen) / 24**0.5).to(dtype))
    return [w]


def _dense_inputs(mb, dtype):
    gen = torch.Generator().manual_seed(100 + mb)
    return torch.randn(3, 5, 24, generator=gen).to(dtype), torch.randn(3, 5, 16, generator=gen).to(
        dtype
    )


def _dense_step(params, mb, dtype, mode, sched):
    x, dy = _dense_inputs(mb, dtype)
    y = deferred_linear(x.requires_grad_(True), params[0], wgrad_accumulation=mode, scheduler=sched)
    y.backward(dy)
    return [(dy.reshape(-1, 16), x.detach().reshape(-1, 24))]  # (dy_2d, x_2d) per weight


def _expert_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.nn.Parameter((torch.randn(len(COUNTS), 2 * F, H, generator=gen) / H**0.5).to(dtype))
    w2 = torch.nn.Parameter((torch.randn(len(COUNTS), H, F, generator=gen) / F**0.5).to(dtype))
    return [w1, w2]


def _swiglu(h, p):
    x_glu, x_lin = torch.chunk(h, 2, dim=-1)
    return (torch.nn.functional.silu(x_glu) * x_lin * p.unsqueeze(-1)).to(h.dtype)


def _expert_step(params, mb, dtype, mode, sched, sequential):
    gen = torch.Generator().manual_seed(200 + mb)
    x = torch.randn(T, H, generator=gen).to(dtype)
    p = torch.rand(T, generator=gen)
    dy = torch.randn(T, H, generator=gen).to(dtype)
    if sequential:
        out = sequential_experts(
            x, p, *params, COUNTS, _swiglu, scheduler=sched, wgrad_accumulation=mode
        )
    else:
        kw = dict(scheduler=sched, wgrad_accumulation=mode)
        h = grouped_linear(x, params[0], COUNTS, None, **kw)
        out = grouped_linear(_swiglu(h, p), params[1], COUNTS, None, **kw)
    out.backward(dy)
    return None


def _run(kind, dtype, mode, scheduler_on, micro_batches=2):
    """Two micro-batches of one optimizer step under emulated DDP; returns (params, seen, operands
    per micro-batch for the dense op)."""
    sched = BackwardScheduler(enabled=scheduler_on)
    params = _dense_params(dtype) if kind == "dense" else _expert_params(dtype)
    seen, nodes = _watch(params)
    operands = []
    for mb in range(micro_batches):
        if kind == "dense":
            operands.append(_dense_step(params, mb, dtype, mode, sched))
        else:
            _expert_step(params, mb, dtype, mode, sched, sequential=(kind == "sequential"))
        assert sched.num_pending == 0
    del nodes
    return params, seen, operands


KINDS = ["dense", "grouped", "sequential"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheduler_on", [True, False], ids=["deferred", "inline"])
def test_auto_adds_into_main_grad_with_the_placeholder_protocol(kind, scheduler_on):
    if kind == "sequential" and scheduler_on:
        pytest.skip("sequential_experts is taken only where dW runs inline (expert_loop doc)")
    got, seen, _ = _run(kind, torch.float32, "auto", scheduler_on)
    ref, ref_seen, _ = _run(kind, torch.float32, "unfused", scheduler_on)
    n = len(got)
    # each parameter's hook once per backward: 2 micro-batches
    assert sorted(s[0] for s in seen) == sorted(list(range(n)) * 2)
    assert sorted(s[0] for s in ref_seen) == sorted(list(range(n)) * 2)
    for i, shape, dtype, flag, _g in seen:
        assert (shape, dtype, flag) == (tuple(got[i].shape), got[i].dtype, True), "not apex's"
    if kind != "sequential":  # sequential_experts adds into main_grad[g] itself either way
        for _i, _shape, _dtype, flag, _g in ref_seen:
            assert flag is False, "unfused must hand dW to the hook"
    for p, r in zip(got, ref, strict=True):
        assert p.grad is None and p.grad_added_to_main_grad
        k = T if kind != "dense" else 15
        a = _magnitude(r)
        torch.testing.assert_close(p.main_grad, r.main_grad, rtol=0, atol=2 * (k + 2) * U32 * a)
        if kind != "dense":
            assert not p.main_grad[1].any(), "an expert without rows got a dW"


def _magnitude(param):
    """Stands in for A (module doc) where the operands are internal to the op (the experts'
    activations): 8 * max |main_grad|, i.e. cancellation up to 8x in random O(1) operands. The
    dense tests check A itself, elementwise."""
    return 8 * max(1.0, param.main_grad.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_scheduler_on_and_off_are_bitwise_equal_under_auto(kind):
    if kind == "sequential":
        pytest.skip("sequential_experts runs inline only")
    on, _, _ = _run(kind, torch.float32, "auto", True)
    off, _, _ = _run(kind, torch.float32, "auto", False)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a.main_grad, b.main_grad)


def test_sequential_experts_match_the_composition_under_auto():
    seq, _, _ = _run("sequential", torch.float32, "auto", False)
    comp, _, _ = _run("grouped", torch.float32, "auto", False)
    for a, b in zip(seq, comp, strict=True):
        scale = max(1.0, b.main_grad.abs().max().item())
        torch.testing.assert_close(a.main_grad, b.main_grad, rtol=0, atol=2 * (T + 2) * U32 * scale)


@pytest.mark.parametrize("scheduler_on", [True, False], ids=["deferred", "inline"])
def test_unfused_is_todays_hand_over_bit_for_bit(scheduler_on):
    params, seen, operands = _run("dense", torch.float32, "unfused", scheduler_on)
    expect = torch.zeros_like(params[0].main_grad)
    for mb, [(dy2, x2)] in enumerate(operands):
        dw = torch.matmul(dy2.t(), x2)  # the op deferred_linear's unfused task runs
        assert torch.equal(seen[mb][4], dw) and seen[mb][3] is False
        expect.add_(dw)  # DDP's hook
    assert torch.equal(params[0].main_grad, expect)
    assert params[0].grad_added_to_main_grad is False


@pytest.mark.parametrize("scheduler_on", [True, False], ids=["deferred", "inline"])
def test_bf16_weights_auto_is_fp32_accurate_and_unfused_rounds_dw(scheduler_on):
    auto, _, operands = _run("dense", torch.bfloat16, "auto", scheduler_on)
    unfused, _, _ = _run("dense", torch.bfloat16, "unfused", scheduler_on)
    exact = sum(dy.double().t() @ x.double() for [(dy, x)] in operands)
    a = sum(dy.double().abs().t() @ x.double().abs() for [(dy, x)] in operands)
    k = operands[0][0][0].shape[0]
    err_auto = (auto[0].main_grad.double() - exact).abs()
    err_unfused = (unfused[0].main_grad.double() - exact).abs()
    assert (err_auto <= (k + 2) * U32 * a).all(), "fused dW is not fp32-accurate"
    assert (err_unfused <= (U_BF16 + (k + 2) * U32) * a).all()
    # and the fused path really skips the bf16 rounding somewhere (not the same numbers)
    assert err_auto.max() < err_unfused.max()


def test_accumulate_reference_is_the_fp64_product_within_fp32_rounding():
    gen = torch.Generator().manual_seed(7)
    dy, x = torch.randn(33, 6, generator=gen), torch.randn(33, 5, generator=gen)
    mg = torch.randn(6, 5, generator=gen)
    before = mg.double().clone()
    accumulate_reference(mg, dy.bfloat16(), x.bfloat16())
    exact = before + dy.bfloat16().double().t() @ x.bfloat16().double()
    a = dy.bfloat16().double().abs().t() @ x.bfloat16().double().abs() + before.abs()
    assert ((mg.double() - exact).abs() <= (33 + 2) * U32 * a).all()


def test_kernel_choice():
    w = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert accumulation_kernel(w, cpu, "auto") is None  # no DDP: nothing to fuse into
    w.main_grad = torch.zeros(4, 3)
    assert accumulation_kernel(w, cpu, "auto") == "reference"
    assert accumulation_kernel(w, cuda, "auto") == "torch"  # reads the device type only
    assert accumulation_kernel(w, cuda, "fused") == "torch"
    assert accumulation_kernel(w, cuda, "unfused") is None
    w.main_grad = torch.zeros(4, 3, dtype=torch.bfloat16)  # DDP without fp32 accumulation
    assert accumulation_kernel(w, cuda, "auto") is None
    with pytest.raises(FluidConfigError, match=re.escape("--fluid-wgrad-accumulation")):
        accumulation_kernel(w, cuda, "fused")


@pytest.mark.parametrize("kind", KINDS)
def test_fused_without_fp32_main_grad_fails_naming_the_flag(kind):
    sched = BackwardScheduler(enabled=False)
    params = _dense_params(torch.float32) if kind == "dense" else _expert_params(torch.float32)
    nodes = emulate_ddp_grads(params)
    for p in params:
        p.main_grad = p.main_grad.bfloat16()
    reset_ddp_flags(params)
    with pytest.raises(FluidConfigError, match=re.escape("--fluid-wgrad-accumulation")):
        if kind == "dense":
            _dense_step(params, 0, torch.float32, "fused", sched)
        else:
            _expert_step(params, 0, torch.float32, "fused", sched, kind == "sequential")
    sched.clear()
    del nodes


def test_auto_keeps_grouped_gemm_experts_unfused(monkeypatch):
    """auto fuses dW computed per expert, and grouped dW over at most FUSED_WGRAD_MAX_GROUPS
    experts, not grouped dW over more: fused, it would be one addmm per expert in place of one
    kernel (fluid.moe.grouped_gemm.wgrad_mode_for, measured slower with 64 experts); `fused`
    fuses all. Backward asks the question the forward's kernel choice answers
    (`_grouped_mm_supported`), faked True here as on Hopper; the limit is lowered to 3 so that
    this test's 4 experts are over it."""
    import fluid.moe.grouped_gemm as gg

    many, few = gg.FUSED_WGRAD_MAX_GROUPS + 1, gg.FUSED_WGRAD_MAX_GROUPS
    assert gg.wgrad_mode_for("auto", many, grouped=True) == "unfused"
    assert gg.wgrad_mode_for("auto", few, grouped=True) == "auto"
    assert gg.wgrad_mode_for("auto", many, grouped=False) == "auto"
    assert gg.wgrad_mode_for("fused", many, grouped=True) == "fused"
    assert gg.wgrad_mode_for("unfused", few, grouped=False) == "unfused"
    monkeypatch.setattr(gg, "_grouped_mm_supported", lambda x: True)
    monkeypatch.setattr(gg, "FUSED_WGRAD_MAX_GROUPS", len(COUNTS) - 1)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    results = {}
    for mode in ("auto", "fused", "unfused"):
        for scheduler_on in (True, False):
            sched = BackwardScheduler(enabled=scheduler_on)
            params = _expert_params(torch.float32)
            seen, nodes = _watch(params)
            gen = torch.Generator().manual_seed(7)
            x = torch.randn(T, H, generator=gen)
            p = torch.rand(T, generator=gen)
            dy = torch.randn(T, H, generator=gen)
            kw = dict(scheduler=sched, wgrad_accumulation=mode, fallbacks=gg.GroupedMMFallbacks())
            h = gg.grouped_linear(x, params[0], COUNTS, offs, **kw)
            gg.grouped_linear(_swiglu(h, p), params[1], COUNTS, offs, **kw).backward(dy)
            assert sched.num_pending == 0
            assert sorted(s[0] for s in seen) == [0, 1]  # each hook once
            fused = {s[3] for s in seen}
            assert fused == ({True} if mode == "fused" else {False}), (mode, scheduler_on)
            results[mode, scheduler_on] = [q.main_grad.clone() for q in params]
            del nodes
    # auto here runs unfused's operations (dW GEMM, then DDP's add): bitwise equal, scheduler on
    # or off; fused's accuracy is test_auto_adds_into_main_grad_with_the_placeholder_protocol's.
    for key, grads in results.items():
        if key[0] != "fused":
            for g, ref in zip(grads, results["unfused", False], strict=True):
                assert torch.equal(g, ref), key


def test_auto_adds_unfused_grouped_bf16_dw_itself(monkeypatch):
    """Where auto keeps a grouped dW unfused (over FUSED_WGRAD_MAX_GROUPS experts) and dW is bf16
    with an fp32 main_grad, FluidMoE adds it into main_grad itself (fluid.schedule.main_grad_add:
    Triton on CUDA, `main_grad.add_` on CPU) and hands autograd the placeholder: the hook sees
    `grad_added_to_main_grad` set, once per parameter and backward. The sum is the one DDP's hook
    computes from the handed-over dW (`main_grad.add_(grad)`, the same op on CPU): main_grad after
    two micro-batches equals unfused's bitwise, scheduler on and off. Explicit `unfused` keeps the
    hand-over (flag never set)."""
    import fluid.moe.grouped_gemm as gg

    monkeypatch.setattr(gg, "_grouped_mm_supported", lambda x: True)
    monkeypatch.setattr(gg, "FUSED_WGRAD_MAX_GROUPS", len(COUNTS) - 1)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    results = {}
    for mode in ("auto", "unfused"):
        for scheduler_on in (True, False):
            sched = BackwardScheduler(enabled=scheduler_on)
            params = _expert_params(torch.bfloat16)
            seen, nodes = _watch(params)
            kw = dict(scheduler=sched, wgrad_accumulation=mode, fallbacks=gg.GroupedMMFallbacks())
            for mb in range(2):
                gen = torch.Generator().manual_seed(70 + mb)
                x = torch.randn(T, H, generator=gen).bfloat16()
                p = torch.rand(T, generator=gen)
                dy = torch.randn(T, H, generator=gen).bfloat16()
                h = gg.grouped_linear(x, params[0], COUNTS, offs, **kw)
                gg.grouped_linear(_swiglu(h, p), params[1], COUNTS, offs, **kw).backward(dy)
                assert sched.num_pending == 0
            assert sorted(s[0] for s in seen) == [0, 0, 1, 1]  # each hook once per backward
            added = {s[3] for s in seen}
            assert added == ({True} if mode == "auto" else {False}), (mode, scheduler_on)
            assert {(s[1], s[2]) for s in seen} == {
                (tuple(q.shape), torch.bfloat16) for q in params
            }  # placeholder or dW: param-shaped, param dtype
            results[mode, scheduler_on] = [q.main_grad.clone() for q in params]
            del nodes
    for key, grads in results.items():
        for g, ref in zip(grads, results["unfused", False], strict=True):
            assert torch.equal(g, ref), key


def test_main_grad_add_kernel_choice(monkeypatch):
    """add_kernel: "reference" on CPU for fp32 main_grad + bf16/fp16 grad of as many elements, both
    contiguous; None for an fp32 grad, a non-contiguous operand, another size or no main_grad; on
    CUDA None without Triton (the caller hands dW to autograd)."""
    import fluid.schedule.main_grad_add as mga

    mg = torch.zeros(4, 6)
    assert mga.add_kernel(mg, torch.ones(4, 6, dtype=torch.bfloat16)) == "reference"
    assert mga.add_kernel(mg, torch.ones(2, 2, 6, dtype=torch.float16)) == "reference"
    assert mga.add_kernel(mg, torch.ones(4, 6)) is None
    assert mga.add_kernel(mg, torch.ones(6, 4, dtype=torch.bfloat16).t()) is None
    assert mga.add_kernel(mg.t(), torch.ones(6, 4, dtype=torch.bfloat16)) is None
    assert mga.add_kernel(mg, torch.ones(4, 5, dtype=torch.bfloat16)) is None
    assert mga.add_kernel(None, torch.ones(4, 6, dtype=torch.bfloat16)) is None
    g = torch.randn(4, 6).bfloat16()
    want = mg.clone().add_(g)
    mga.add_into(mg, g, "reference")
    assert torch.equal(mg, want)
    with pytest.raises(ValueError, match="unknown kernel"):
        mga.add_into(mg, g, "cuda")
    if torch.cuda.is_available():  # the no-Triton answer on a GPU machine
        monkeypatch.setattr(mga, "_triton_add", lambda index=0: None)
        mgc = torch.zeros(4, 6, device="cuda")
        assert mga.add_kernel(mgc, torch.ones(4, 6, device="cuda", dtype=torch.bfloat16)) is None
