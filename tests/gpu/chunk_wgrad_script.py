"""One MoE layer of the 64-expert model's structure (64 experts top-6, a shared expert, SwiGLU),
EP = 1 over an emulated link (`--fluid-emulate-link-gbps`, so the all-to-alls and their windows
exist on one GPU), 3 micro-batches under emulated Megatron DDP, three ways from one set of
weights: one chunk, two chunks with the scheduler on, two chunks with it off. Checks on the GPU
path (bf16, torch._grouped_mm with device offsets, which the CPU tests cannot reach) that the
experts' dW runs once per weight over both chunks (fluid.moe.chunk_wgrad):
  - two chunks have as many dW tasks per micro-batch as one chunk (one per weight, not per chunk);
  - scheduler on vs off: every main_grad bitwise equal (the same merged dW, deferred or inline);
  - two chunks vs one: each main_grad within a relative Frobenius distance of 2 * 2^-8 (the
    chunks' forward and dX GEMMs run on other row sets, each bf16 result rounded once more or
    less; a lost chunk or a wrong row order is O(1)).
Prints PASS/FAIL lines; exit code 1 on any FAIL. Runs on CPU (gloo, fp32, the per-expert loop)
too, for checking the script itself.

    torchrun --nproc-per-node 1 tests/gpu/chunk_wgrad_script.py
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

FAILS: list[str] = []


def check(name: str, ok: bool, info="") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {info}", flush=True)
    if not ok:
        FAILS.append(name)


def build(fluid: dict, state, device, dtype, chunks: int):
    from fluid.testing.moe import fine_grained_test_layer

    return fine_grained_test_layer(
        256,
        ffn=128,
        shared=256,
        num_chunks=chunks,
        device=device,
        dtype=dtype,
        state=state,
        **fluid,
    )


def train(layer, device, dtype, n=3):
    from fluid.testing.moe import reset_ddp_flags

    reset_ddp_flags(layer.parameters())
    sched = layer.scheduler
    g = torch.Generator(device=device).manual_seed(11)
    tasks, a2a = [], []
    for _ in range(n):
        x = torch.randn(1024, 1, 256, device=device, generator=g).to(dtype).requires_grad_(True)
        dy = torch.randn(1024, 1, 256, device=device, generator=g).to(dtype)
        before = sched.get_stats()
        out, _ = layer(x)
        out.backward(dy)
        after = sched.get_stats()
        tasks.append(after["total_dw_tasks"] - before["total_dw_tasks"])
        a2a.append(after["a2a_calls"] - before["a2a_calls"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {k: p.main_grad.clone() for k, p in layer.named_parameters()}, tasks, a2a


def main() -> int:
    from megatron.core import parallel_state

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    parallel_state.initialize_model_parallel()
    emul = {"fluid_emulate_link_gbps": 50.0}
    one, accs1 = build(emul, None, device, dtype, 1)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in one.state_dict().items()}
    g1, t1, a1 = train(one, device, dtype)
    two, accs2 = build(emul, state, device, dtype, 2)
    g2, t2, a2 = train(two, device, dtype)
    two_off, accs3 = build({**emul, "fluid_scheduler": False}, state, device, dtype, 2)
    g3, t3, _ = train(two_off, device, dtype)
    stats = two.scheduler.get_stats()
    # backward all-to-alls (the scheduler counts those): twice as many with two chunks
    check("two chunks ran", a2 == [2 * a for a in a1] and a1[0] > 0, f"{a2} vs {a1}")
    check("gradients not zero", all(float(v.float().norm()) > 0 for v in g1.values()))
    check(
        "merged dW ran in windows", stats["overlapped_dw_tasks"] > 0, stats["overlapped_dw_tasks"]
    )
    check("dW tasks per micro-batch: two chunks = one chunk", t2 == t1, f"{t2} vs {t1}")
    for k in g1:
        check(f"on vs off bitwise: {k}", torch.equal(g2[k], g3[k]))
        rel = float((g2[k] - g1[k]).float().norm() / g1[k].float().norm().clamp_min(1e-30))
        bound = 2 * 2.0**-8 if cuda else 1e-5
        check(f"two chunks vs one: {k}", rel <= bound, f"rel {rel:.2e} <= {bound:.1e}")
    del accs1, accs2, accs3
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    print(f"{'FAILED ' + str(FAILS) if FAILS else 'all passed'}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
