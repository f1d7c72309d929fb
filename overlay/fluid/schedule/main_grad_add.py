"""`main_grad += dW` for an fp32 `main_grad` and a bf16/fp16 dW, in one vectorized pass.

Where dW cannot be accumulated inside its GEMM (one `torch._grouped_mm` over many experts: it has
no fp32 accumulate-into-output, fluid.moe.grouped_gemm.wgrad_mode_for), Megatron DDP's hook adds the
bf16 dW into the fp32 `main_grad` with `main_grad.add_(grad)`. For mixed dtypes torch runs its
non-vectorized element-wise kernel: 2.85 TB/s on H200, against 4.26-4.29 TB/s for the Triton kernel
here, which computes the same sum (`fp32(main) + fp32(g)`, rounded once: bitwise equal, checked by
the probe for the 64-expert model's weight shapes; benchmarks/probes/mixed_add.py,
docs/benchmarks/breakdown.md). On the 64-expert model's 1-GPU step that add is the largest kernel
(65.6 ms), so the kernel here would take about 22 ms off it.

`add_kernel(main_grad, grad)` names the kernel: "triton" (CUDA, fp32 `main_grad`, bf16/fp16 dW,
both contiguous, same number of elements, Triton importable), "reference" (the same conditions
on CPU: `main_grad.add_(grad)`, what Megatron DDP runs; CPU tests run the whole protocol through
it), or None (anything else, or a Triton kernel that failed its first-use check on the device:
the caller hands dW to autograd and DDP adds it). `add_into` runs it.
The reference beside the fast path is `main_grad.add_(grad)` itself.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

_HALF = (torch.bfloat16, torch.float16)
_BLOCK, _WARPS = 4096, 8  # measured with 2048/4 and 8192/8 within 2% (the probe's JSON)


@functools.cache
def _triton_kernel():
    """The compiled Triton kernel, or None without Triton (built on first use, so that importing
    FluidMoE does not import Triton)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _add_kernel(out_ptr, g_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.load(out_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, acc + g, mask=mask)

    return _add_kernel


def triton_launcher(block: int = _BLOCK, warps: int = _WARPS):
    """`launch(out, g)`: `out += g` (contiguous fp32 `out`, bf16/fp16 `g` of as many elements)
    with the Triton kernel at this block size and warp count; None without Triton. The probe
    (benchmarks/probes/mixed_add.py) times it at several settings."""
    kernel = _triton_kernel()
    if kernel is None:
        return None

    def launch(out: torch.Tensor, g: torch.Tensor) -> None:
        n = out.numel()
        kernel[((n + block - 1) // block,)](out, g, n, BLOCK=block, num_warps=warps)

    return launch


@functools.cache
def _triton_add(device_index: int = 0):
    """The launcher at the default setting once it has matched `torch.add_` bitwise on a small
    tensor of this device (the first call compiles the kernel); None without Triton, or if it
    fails or differs there (then dW goes to DDP's add, with a warning)."""
    launch = triton_launcher()
    if launch is None:
        return None
    try:
        dev = torch.device("cuda", device_index)
        # no random numbers: the check must not advance the model's RNG streams
        i = torch.arange(4097, device=dev, dtype=torch.float32)
        main, g = (i * 0.37).sin() * 1e3, (i * 0.11).cos().bfloat16()
        want = main.clone().add_(g)
        launch(main, g)
        if torch.equal(main, want):
            return launch
        problem = "differs from main_grad.add_"
    except Exception as exc:  # a compile or launch failure: keep training on torch's add
        problem = f"{type(exc).__name__}: {exc}"
    log.warning(
        "FluidMoE: the Triton main_grad add is not used (%s); Megatron DDP adds dW instead",
        problem,
    )
    return None


def add_kernel(main_grad: Optional[torch.Tensor], grad: torch.Tensor) -> Optional[str]:
    """The kernel for `main_grad += grad`: "triton", "reference" or None (module docstring)."""
    if (
        main_grad is None
        or main_grad.dtype != torch.float32
        or grad.dtype not in _HALF
        or main_grad.numel() != grad.numel()
        or main_grad.device != grad.device
        or not (main_grad.is_contiguous() and grad.is_contiguous())
    ):
        return None
    if main_grad.device.type == "cpu":
        return "reference"
    if main_grad.is_cuda and _triton_add(main_grad.device.index or 0) is not None:
        return "triton"
    return None


def add_into(main_grad: torch.Tensor, grad: torch.Tensor, kernel: str) -> None:
    """`main_grad += grad` in place with `kernel` from `add_kernel` (same shapes' elements in the
    same order: `grad` may be `[G, N, K]` for a `main_grad` of the same layout)."""
    if kernel == "triton":
        launch = _triton_add(main_grad.device.index or 0)
        assert launch is not None
        if main_grad.numel():
            launch(main_grad, grad)
    elif kernel == "reference":
        main_grad.add_(grad.view_as(main_grad))
    else:
        raise ValueError(f"add_into: unknown kernel {kernel!r}")
