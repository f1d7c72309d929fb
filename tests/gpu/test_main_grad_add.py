"""Tier: gpu. fluid.schedule.main_grad_add's Triton kernel against `main_grad.add_(grad)` (what
Megatron DDP runs), and the grouped experts' auto path that uses it, on one GPU.

Bitwise: both compute `fp32(main) + fp32(g)` with one rounding (an exact widening, then one fp32
add), so any difference is a bug, not rounding. Sizes: the 64-expert model's two expert weights,
and odd sizes that leave a partial last block; bf16 and fp16 dW. Then `grouped_linear` over 64
experts with bf16 weights under emulated DDP: auto (the kernel, placeholder hand-over) and unfused
(DDP's add) give bitwise-equal main_grad over two micro-batches, scheduler on and off.
"""

import pytest
import torch

from tests.gpu._torchrun import require_gpus


@pytest.mark.parametrize("shape", [(64, 2816, 2048), (64, 2048, 1408), (4097,), (3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_add_equals_torch_add(shape, dtype):
    require_gpus(1)
    pytest.importorskip("triton")
    from fluid.schedule.main_grad_add import add_into, add_kernel

    gen = torch.Generator(device="cuda").manual_seed(5)
    main = torch.randn(shape, device="cuda", generator=gen) * 1e3
    g = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    want = main.clone().add_(g)
    assert add_kernel(main, g) == "triton"
    add_into(main, g, "triton")
    assert torch.equal(main, want)


def test_grouped_auto_add_equals_ddp_add():
    require_gpus(1)
    pytest.importorskip("triton")
    from fluid.moe.grouped_gemm import GroupedMMFallbacks, _grouped_mm_supported, grouped_linear
    from fluid.schedule import BackwardScheduler
    from fluid.testing.moe import emulate_ddp_grads, reset_ddp_flags

    dev = torch.device("cuda")
    if not _grouped_mm_supported(torch.empty(1, device=dev, dtype=torch.bfloat16)):
        pytest.skip("torch._grouped_mm needs compute capability 9.0")
    G, H, F, T = 64, 256, 128, 4096
    torch.manual_seed(1)
    counts = torch.distributions.Multinomial(T, torch.ones(G)).sample().long().tolist()
    counts[3] = 0  # an empty expert: its dW must stay zero
    counts[0] += T - sum(counts)
    offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    results = {}
    for mode in ("auto", "unfused"):
        for on in (True, False):
            torch.manual_seed(0)
            w1 = torch.nn.Parameter(torch.randn(G, 2 * F, H, device=dev).bfloat16() / 16)
            w2 = torch.nn.Parameter(torch.randn(G, H, F, device=dev).bfloat16() / 11)
            nodes = emulate_ddp_grads([w1, w2])  # noqa: F841
            sched = BackwardScheduler(enabled=on)
            kw = dict(scheduler=sched, wgrad_accumulation=mode, fallbacks=GroupedMMFallbacks())
            reset_ddp_flags([w1, w2])
            for mb in range(2):
                gen = torch.Generator(device=dev).manual_seed(10 + mb)
                x = torch.randn(T, H, device=dev, generator=gen).bfloat16()
                dy = torch.randn(T, H, device=dev, generator=gen).bfloat16()
                h = grouped_linear(x, w1, counts, offs, **kw)
                a, b = h.chunk(2, dim=-1)
                y = grouped_linear(
                    (torch.nn.functional.silu(a) * b).contiguous(), w2, counts, offs, **kw
                )
                y.backward(dy)
                assert sched.num_pending == 0
            assert w1.grad_added_to_main_grad == (mode == "auto")
            results[mode, on] = [w1.main_grad.clone(), w2.main_grad.clone()]
    ref = results["unfused", False]
    for key, grads in results.items():
        for g, r in zip(grads, ref, strict=True):
            assert torch.equal(g, r), key
    assert ref[0][3].abs().sum() == 0
