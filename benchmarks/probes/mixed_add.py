"""Probe (not a benchmark): the fp32 `main_grad += bf16 dW` add, torch's kernel against a
vectorized one.

Without apex, Megatron DDP adds every bf16 dW into its fp32 `main_grad` with `main_grad.add_(g)`.
For mixed dtypes torch runs its non-vectorized `unrolled_elementwise_kernel`; on the 64-expert
model's 1-GPU step that add is the largest kernel (65.6 ms in 176 launches, 2a71cfe,
docs/benchmarks/breakdown.md), because its grouped expert dW stays unfused (one `torch._grouped_mm`
cannot accumulate into fp32). This times, on the GPU, for the model's weight shapes: torch's add,
the Triton kernel of fluid.schedule.main_grad_add (load fp32 and bf16, add in fp32, store: the
same rounding, checked bitwise) at three block sizes (`tritonBLOCKwWARPS`), and `torch.compile` of the add; with the bytes moved (10 per element) as GB/s
and the host time per call.

    python3 -m benchmarks.probes.mixed_add --out OUT   # GPU, Triton, benchmarks/gpu_env.sh sourced
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHAPES = ((64, 2816, 2048), (64, 2048, 1408), (2048, 2048))  # fc1, fc2 of 64 experts; a dense one


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    import torch
    import triton

    from fluid.schedule.main_grad_add import triton_launcher

    launchers = {bw: triton_launcher(*bw) for bw in ((4096, 8), (2048, 4), (8192, 8))}

    def acc(out, g, block=4096, warps=8):
        launchers[block, warps](out, g)

    @torch.compile(dynamic=False)
    def acc_compiled(out, g):
        out.add_(g)

    print("triton", triton.__version__, "torch", torch.__version__)
    res = {}  # "<shape>_<kernel>": {ms, GBps, host_us}
    for shape in SHAPES:
        a32 = torch.randn(shape, device="cuda")
        g = torch.randn(shape, device="cuda").bfloat16()
        want = a32.clone().add_(g)
        for f in (acc, acc_compiled):
            got = a32.clone()
            f(got, g)
            assert torch.equal(got, want), f  # same rounding: fp32 + float(bf16)
        kinds = {
            "torch": lambda a32=a32, g=g: a32.add_(g),
            "triton4096w8": lambda a32=a32, g=g: acc(a32, g),
            "triton2048w4": lambda a32=a32, g=g: acc(a32, g, 2048, 4),
            "triton8192w8": lambda a32=a32, g=g: acc(a32, g, 8192, 8),
            "compile": lambda a32=a32, g=g: acc_compiled(a32, g),
        }
        for name, fn in kinds.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(a.iters):
                fn()
            e1.record()
            torch.cuda.synchronize()
            ms = e0.elapsed_time(e1) / a.iters
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            host_us = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            row = {
                "ms": round(ms, 4),
                "GBps": round(a32.numel() * 10 / ms / 1e6),
                "host_us": round(host_us, 1),
            }
            res[f"{shape}_{name}"] = row
            print(shape, name, row, flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "mixed_add.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
