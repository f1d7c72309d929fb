"""Tier: cpu. `fluid.moe.expert_loop.sequential_experts` (experts one after another, dW inline) and
the --fluid-grouped-gemm policy that picks it.

What must hold (see the module docstring):
  - outputs, dX, dprobs and both expert dWs equal the composition FluidGroupedMLP uses otherwise
    with per-expert GEMMs (grouped_linear loop -> activation -> grouped_linear) within fp32
    rounding (`assert_fp32_close`, bound below). Checked with experts that get no rows, with the
    fused weighted SwiGLU (stock's default) and an unfused activation, and with probs with and
    without a gradient;
  - its backward keeps one expert's activation gradient at a time, and frees each expert's saved
    activations once that expert is done (the stock SequentialMLP memory profile it exists for);
  - the dWs are adopted as `param.grad` (not copied);
  - --fluid-grouped-gemm auto picks the loop for Mixtral-sized experts and the grouped kernel
    for the 64-expert layer and the e2e model's layer; a bad value raises.

Tolerance. Both paths run GEMMs of the same per-expert shapes, but not into the same memory: the
composition writes each expert's result into rows of a `[T, N]` buffer (`out=`, at a row offset
that need not be 32-byte aligned), the loop makes some of them as fresh tensors (`d_a`, `h_g`).
The BLAS picks its kernel, and so the accumulation order, from shape and alignment: on an AVX2
CPU (AMD EPYC, no AVX-512) `[7, 12] @ [12, 10]` into a buffer at a 200-byte offset differs from a
fresh output by 1 ulp. Bitwise equality is therefore not a property of the code. An n-term fp32
dot product changes by at most about n * eps * sum|a_k b_k| under reordering; the longest chain of
reductions after the first GEMM that may differ is d_a (H terms) then dx (2F terms), with O(1)
values, so the bound is (H + 2F) * eps * max(1, max|ref|) = 3.8e-6 at unit scale (measured: at
most 1.9 eps * scale in 1500 seeded comparisons). A wrong row, expert or probability changes
entries by > 1e-2. Exact comparisons (torch.equal) stay where both sides run the same operations
on the same buffers: a zero-row expert's explicit zero dW, and reentrant checkpointing vs the plain
run.
"""

import gc
import weakref

import pytest
import torch

from fluid.moe import grouped_gemm
from fluid.moe.expert_loop import sequential_experts
from fluid.moe.grouped_gemm import grouped_linear, use_grouped_mm
from fluid.schedule import get_backward_scheduler
from fluid.testing.moe import emulate_ddp_grads

H, F, G = 12, 10, 4
EPS = torch.finfo(torch.float32).eps  # 1.19e-7
FP32_TERMS = H + 2 * F  # the longest chain of reductions, d_a then dx (module docstring)


def assert_fp32_close(got, ref, what, micro_batches=1):
    """`got` == `ref` within fp32 rounding of the module docstring's bound (per micro-batch
    accumulated into the same tensor)."""
    atol = micro_batches * FP32_TERMS * EPS * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(
        got,
        ref,
        rtol=0,
        atol=atol,
        msg=lambda m: f"{what} differs from the composition: {m} (atol {atol:.2e})",
    )


def _swiglu_weighted(h, p):
    x_glu, x_lin = torch.chunk(h, 2, dim=-1)
    return (torch.nn.functional.silu(x_glu) * x_lin * p.unsqueeze(-1)).to(h.dtype)


def _fused_swiglu_weighted(h, p):
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

    return weighted_bias_swiglu_impl(h, None, p.unsqueeze(-1))


def _composition(x, p, w1, w2, counts, act):
    h = grouped_linear(x, w1, counts, None)
    return grouped_linear(act(h, p), w2, counts, None)


def _weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.nn.Parameter(torch.randn(G, 2 * F, H, generator=gen) / H**0.5)
    w2 = torch.nn.Parameter(torch.randn(G, H, F, generator=gen) / F**0.5)
    return w1, w2


def _run(fn, counts, act, probs_grad, seed=0, weights=None):
    w1, w2 = weights or _weights()
    gen = torch.Generator().manual_seed(100 + seed)
    T = sum(counts)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    p = torch.rand(T, generator=gen).requires_grad_(probs_grad)
    dy = torch.randn(T, H, generator=gen)
    y = fn(x, p, w1, w2, counts, act)
    y.backward(dy)
    get_backward_scheduler().flush()
    return y.detach(), x.grad, p.grad, w1.grad, w2.grad


def _seq(x, p, w1, w2, c, a):
    return sequential_experts(x, p, w1, w2, c, a)


@pytest.mark.parametrize("counts", [(5, 0, 7, 3), (0, 0, 9, 0), (4, 4, 4, 4)])
@pytest.mark.parametrize("act", [_swiglu_weighted, _fused_swiglu_weighted])
@pytest.mark.parametrize("probs_grad", [True, False])
def test_sequential_experts_match_the_composition(counts, act, probs_grad):
    ref = _run(_composition, counts, act, probs_grad)
    got = _run(_seq, counts, act, probs_grad)
    for name, r, g in zip(("y", "dx", "dprobs", "dw1", "dw2"), ref, got, strict=True):
        if r is None:
            assert g is None, name
            continue
        assert_fp32_close(g, r, name)
    for g, c in enumerate(counts):
        if c == 0:  # an expert without rows gets an explicit zero dW (exact), as SequentialMLP's
            assert not got[3][g].any() and not got[4][g].any()


def test_sequential_backward_frees_each_expert_before_the_next():
    """One expert's activation gradient at a time; earlier experts' h, a already freed."""
    counts = (6, 5, 7, 4)
    h_refs, dh_refs, violations = [], [], []

    def act(h, p):
        g = len(h_refs)
        h_refs.append(weakref.ref(h))

        def on_grad(dh, g=g):
            gc.collect()
            live_dh = [i for i, r in enumerate(dh_refs) if r() is not None]
            live_h = [i for i, r in enumerate(h_refs) if i != g and r() is not None and i in done]
            if live_dh or live_h:
                violations.append((g, live_dh, live_h))
            dh_refs.append(weakref.ref(dh))
            done.add(g)

        h.register_hook(on_grad)
        return _swiglu_weighted(h, p)

    done: set = set()
    _run(_seq, counts, act, True)
    assert len(dh_refs) == len(counts)
    assert not violations, f"(expert, live earlier d_h, live earlier h): {violations}"


def test_sequential_dw_is_adopted_not_copied(monkeypatch):
    made = []
    real_empty = torch.Tensor.new_empty

    def spy(self, *a, **k):
        t = real_empty(self, *a, **k)
        made.append(t.data_ptr())
        return t

    monkeypatch.setattr(torch.Tensor, "new_empty", spy)
    *_, dw1, dw2 = _run(_seq, (3, 4, 0, 2), _swiglu_weighted, True)
    monkeypatch.undo()
    assert dw1.data_ptr() in made and dw2.data_ptr() in made, "dW was copied into param.grad"


@pytest.mark.parametrize("first", ["sequential", "composition"])
def test_main_grad_under_ddp_hooks_matches_the_composition(first):
    """Under Megatron DDP's hook, two micro-batches (one per path, either order) leave main_grad
    equal to two composition micro-batches within fp32 rounding (module docstring; a dropped or
    doubled micro-batch is off by O(1)); the hook fires once per parameter and micro-batch; after
    the per-expert path, the flag is set and a later composition dW of the same step goes into
    main_grad directly (else DDP's hook would drop it)."""
    counts = (5, 0, 7, 3)
    ref_w, got_w = _weights(), _weights()
    ref_fired, got_fired = [], []
    keep = emulate_ddp_grads(ref_w, ref_fired.append), emulate_ddp_grads(got_w, got_fired.append)
    order = [_seq, _composition] if first == "sequential" else [_composition, _seq]
    for seed in (0, 1):  # one optimizer step of two micro-batches: the flags stay set between
        _run(_composition, counts, _fused_swiglu_weighted, True, seed=seed, weights=ref_w)
        _run(order[seed], counts, _fused_swiglu_weighted, True, seed=seed, weights=got_w)
    for r, g in zip(ref_w, got_w, strict=True):
        assert g.grad is None
        assert_fp32_close(g.main_grad, r.main_grad, "main_grad", micro_batches=2)
        assert g.grad_added_to_main_grad, "the per-expert path must set grad_added_to_main_grad"
    assert sorted(got_fired) == sorted(ref_fired) == [0, 0, 1, 1]
    del keep


def test_auto_policy_picks_the_loop_for_large_experts_only(monkeypatch):
    def rows(
        counts,
    ):  # x `[T, 0]`: the policy reads T (the counts' sum) from x, as the layer passes
        return torch.empty((sum(counts), 0))

    monkeypatch.setattr(grouped_gemm, "_grouped_mm_supported", lambda x: True)  # as on Hopper
    mixtral = 4096 * 2 * 14336 + 14336 * 4096  # H * F1 + F * H
    fine = 2048 * 2 * 1408 + 1408 * 2048
    big, many = [2048] * 4, [768] * 32
    assert not use_grouped_mm(rows(big), big, mixtral, "auto")  # 721 GFLOP per expert
    assert use_grouped_mm(rows(many), many, fine)  # 13 GFLOP per expert
    e2e = (
        2048 * 2 * 5632 + 5632 * 2048
    )  # benchmarks/e2e.py's layer: 141 GFLOP, host-bound as a loop
    assert use_grouped_mm(rows(big), big, e2e)
    assert use_grouped_mm(
        rows([16] * 4), [16] * 4, mixtral
    )  # small batch of a large expert: 5.6 GFLOP
    assert use_grouped_mm(rows(big), big, mixtral, "on")
    assert not use_grouped_mm(rows(many), many, fine, "off")
    from fluid.config import FluidConfig, FluidConfigError

    bad = "--fluid-grouped-gemm .*auto, on, off, got 'sometimes'"
    with pytest.raises(FluidConfigError, match=bad):
        FluidConfig(grouped_gemm="sometimes")


@pytest.mark.parametrize("ddp", [False, True])
def test_sequential_experts_under_reentrant_checkpointing(ddp):
    """Megatron's --recompute-granularity full wraps layers in a reentrant checkpoint: the first
    forward runs without grad (the per-expert graphs are built and dropped), backward recomputes.
    Gradients (or main_grad under DDP) must equal the plain run's bitwise: the recomputation runs
    the same `sequential_experts` calls on the same shapes into fresh buffers as the plain run."""
    counts = (4, 0, 6, 3)

    def ckpt(x, p, w1, w2, c, a):
        return torch.utils.checkpoint.checkpoint(_seq, x, p, w1, w2, c, a, use_reentrant=True)

    outs = []
    for fn in (_seq, ckpt):
        w = _weights()
        keep = emulate_ddp_grads(w) if ddp else None
        y, dx, dp, g1, g2 = _run(fn, counts, _fused_swiglu_weighted, True, weights=w)
        outs.append(
            (y, dx, dp, *(p.main_grad if ddp else g for p, g in zip(w, (g1, g2), strict=True)))
        )
        del keep
    for name, a, b in zip(("y", "dx", "dprobs", "w1", "w2"), *outs, strict=True):
        assert torch.equal(a, b), f"{name} differs under checkpointing"
