"""Which of FluidMoE's GPU kernels are run-to-run nondeterministic? (one GPU, not collected by pytest)

Runs each kernel's forward and backward twice on the same inputs and reports whether the results
are bitwise equal, with and without `torch.use_deterministic_algorithms(True)` (what Megatron's
`--deterministic-mode` turns on). Kernels: SDPA core attention (the e2e model's shape, causal,
bf16) per backend, and the grouped-GEMM dW of the experts. Writes `--out`/determinism.json.

    python3 -m benchmarks.probes.determinism --out OUT
"""

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _sdpa_twice(backend, deterministic: bool):
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, n, s, d = 1, 16, 4096, 128  # e2e model: 16 heads x 128, sequence 4096
    q, k, v, dy = (
        torch.randn(b, n, s, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4)
    )
    outs = []
    try:
        for _ in range(2):
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
            y.backward(dy)
            outs.append([y.detach(), qq.grad, kk.grad, vv.grad])
    except RuntimeError as exc:  # backend unavailable, or no deterministic implementation
        return {"error": str(exc).splitlines()[0][:300]}
    finally:
        torch.use_deterministic_algorithms(False)
    names = ["out", "dq", "dk", "dv"]
    return {n: bool(torch.equal(a, b)) for n, a, b in zip(names, outs[0], outs[1], strict=True)}


def _grouped_dw_twice(deterministic: bool):
    from fluid.moe.grouped_gemm import gmm_wgrad, offsets_for

    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    g = torch.Generator(device="cuda").manual_seed(1)
    counts = [4100, 4092]  # two local experts, Mixtral-like shapes
    x = torch.randn(sum(counts), 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(sum(counts), 14336, device="cuda", generator=g, dtype=torch.bfloat16)
    offs = offsets_for(counts, x.device)
    try:
        a, b = (gmm_wgrad(dy, x, counts, offs) for _ in range(2))
        return {"dw": bool(torch.equal(a, b))}
    except RuntimeError as exc:
        return {"error": str(exc).splitlines()[0][:300]}
    finally:
        torch.use_deterministic_algorithms(False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as --deterministic-mode sets
    res = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "sdpa": {},
        "grouped_dw": {},
    }
    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    for det in (False, True):
        key = "deterministic" if det else "default_mode"
        res["sdpa"][key] = {name: _sdpa_twice(be, det) for name, be in backends.items()}
        res["grouped_dw"][key] = _grouped_dw_twice(det)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "determinism.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
