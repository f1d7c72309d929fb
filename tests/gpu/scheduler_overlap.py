"""GPU script (torchrun, 2+ GPUs): does a queued dW really run while the backward all-to-all is in
flight, and does that make the step faster than the scheduler off?

Model per rank (bf16): x[T,H] -> L1(H->F) -> relu -> L2(F->H) -> a2a -> L3(H->F) -> relu ->
L4(F->H) -> a2a -> loss. In backward, L4's and L3's dW (2 GEMMs of 2*T*H*F flops) are queued and
fill the window of the first backward all-to-all (T*H*2 bytes per rank); sizes are chosen so the
two are of similar length when the link is slow (NCCL_P2P_DISABLE=1, about 30 GB/s).

Usage: torchrun --nproc-per-node 4 tests/gpu/scheduler_overlap.py --out OUT.json
Prints one JSON line and PASS/FAIL lines; exit code 1 on FAIL (checks apply only where overlap is
on, i.e. the link is slow or --fluid-overlap always).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fluid.testing.bench.timing import Timer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    from fluid.comm import CommContext, fluid_all_to_all
    from fluid.schedule import deferred_linear, get_backward_scheduler

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = CommContext(dist.group.WORLD)
    sched = get_backward_scheduler()
    torch.manual_seed(0)
    T, H, F = args.tokens, args.hidden, args.ffn

    def mk(o, i):
        return torch.nn.Parameter(torch.randn(o, i, device="cuda", dtype=torch.bfloat16) / i**0.5)

    ws = [mk(F, H), mk(H, F), mk(F, H), mk(H, F)]
    torch.manual_seed(1 + rank)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        h = deferred_linear(torch.relu(deferred_linear(x, ws[0], name="L1")), ws[1], name="L2")
        h = fluid_all_to_all(comm, h)
        h = deferred_linear(torch.relu(deferred_linear(h, ws[2], name="L3")), ws[3], name="L4")
        h = fluid_all_to_all(comm, h)
        h.float().square().mean().backward()

    def timed(enabled, n):
        sched.enable() if enabled else sched.disable()
        return Timer(cuda=True, barrier=False)(step, warmup=3, iters=n)  # median ms

    # Gradients on vs off must be identical (same kernels, same order of accumulation).
    for w in ws:
        w.grad = None
    sched.enable()
    step()
    g_on = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    sched.disable()
    step()
    g_off = [w.grad.clone() for w in ws]
    identical = all(torch.equal(a, b) for a, b in zip(g_on, g_off, strict=True))

    t_off = timed(False, args.iters)
    t_on = timed(True, args.iters)
    # Component times, each alone: the backward a2a and the two queued dW GEMMs.
    buf = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(buf)
    dy = torch.randn(T, F, device="cuda", dtype=torch.bfloat16)

    def a2a():
        dist.all_to_all_single(out, buf)

    def dw():
        torch.matmul(dy.t(), buf)
        torch.matmul(buf.t(), dy)

    def alone(fn, n=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / n

    t_a2a, t_dw = alone(a2a), alone(dw)

    sched.enable()
    sched.set_timing(True)
    sched.reset_stats()
    for _ in range(5):
        step()
    stats = sched.get_stats()
    sched.set_timing(False)

    overlap_on = comm.should_overlap()
    res = {
        "card": torch.cuda.get_device_name(),
        "world": world,
        "NCCL_P2P_DISABLE": os.environ.get("NCCL_P2P_DISABLE", "0"),
        "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
        "overlap_policy_on": overlap_on,
        "shape": {"tokens": T, "hidden": H, "ffn": F},
        "step_ms_scheduler_off": t_off,
        "step_ms_scheduler_on": t_on,
        "speedup_on_vs_off": t_off / t_on,
        "a2a_alone_ms": t_a2a,
        "window_dw_alone_ms": t_dw,
        "grads_identical_on_off": identical,
        "stats_5_steps": stats,
        "command": " ".join(sys.argv),
    }
    if rank == 0:
        print("SCHEDULER_GPU_JSON " + json.dumps(res))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)
        ok = identical
        print(("PASS" if identical else "FAIL") + ": gradients identical with scheduler on and off")
        if overlap_on:
            ov = stats.get("dw_in_window_ms") or 0.0
            ok &= ov > 0 and stats["overlapped_dw_tasks"] > 0
            print(
                ("PASS" if ov > 0 else "FAIL")
                + f": dW ran inside a2a windows ({ov:.2f} ms over 5 steps)"
            )
            faster = t_on < t_off
            ok &= faster
            print(
                ("PASS" if faster else "FAIL")
                + f": on {t_on:.3f} ms vs off {t_off:.3f} ms per step"
            )
        else:
            print(
                f"INFO: overlap policy off on this link (fast); on {t_on:.3f} ms vs off {t_off:.3f} ms"
            )
        sys.stdout.flush()
        code = 0 if ok else 1
    else:
        code = 0
    dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
