"""Tier: gpu (torchrun script). Stock MoELayer vs FluidMoELayer with the same weights, bf16, EP = world size (4; 2 on a 2-GPU host).

    CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 \
        torchrun --nproc-per-node 4 tests/gpu/moe_parity_script.py --out /tmp/moe_parity
    # CPU dry run of the Fluid code paths (no stock run, which needs CUDA):
    torchrun --nproc-per-node 2 tests/gpu/moe_parity_script.py --device cpu --out /tmp/p

Stock = Megatron's local spec (TopKRouter, alltoall dispatcher, SequentialMLP, SharedExpertMLP);
Fluid gets the stock state dict. Checks (printed PASS/FAIL per line, JSON to --out, rc 1 on any FAIL):
  1. torch._grouped_mm against the per-expert loop on uneven groups incl. an empty one;
  2. output, dX and every parameter gradient, Fluid (chunks 1 and 2) vs stock;
  3. Fluid scheduler on vs off: bit-identical output and gradients.
Settings: chunks 1/2, deduplicated dispatch, and per-expert GEMMs (--fluid-grouped-gemm off) with dW
inline and deferred (overlap forced on); last, per-expert GEMMs under emulated Megatron DDP
(fluid.moe.expert_loop's per-expert backward): main_grad == the plain gradients, bitwise.
`--model NAME` takes a benchmark recipe's layer shape (every MoE recipe's, for the multi-GPU runs:
`--model mixtral|fine|small|qwen3moe|olmoe|dbrx --tokens 4096 --basic`); `--basic` runs the
default setting only.
Tolerance for 2: relative Frobenius error ||fluid - stock|| / ||stock|| <= 2e-2. Both compute the
same bf16 GEMMs (fp32 accumulate, bf16 output) but with different kernels (grouped vs per-expert
cuBLAS) and, for gradients, different summation orders; each bf16 rounding costs up to 2^-8
relative, and a gradient passes through ~4 of them, giving errors of order 1e-3 to 1e-2. A
wrong expert, row order or probability gives errors of order 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

REL_TOL = 2e-2


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_grouped_mm(device, results):
    from fluid.moe.grouped_gemm import (
        GroupedMMFallbacks,
        gmm,
        gmm_wgrad,
        grouped_mm_available,
        offsets_for,
    )

    x = torch.randn(300, 256, device=device, dtype=torch.bfloat16)
    if not grouped_mm_available(x):
        results.append(("grouped_mm available", "SKIP", "loop fallback in use"))
        return
    counts = [100, 0, 37, 163]
    offs = offsets_for(counts, device)
    w = torch.randn(4, 512, 256, device=device, dtype=torch.bfloat16) * 0.05
    dy = torch.randn(300, 512, device=device, dtype=torch.bfloat16)
    ref = (
        gmm(x, w, counts, None, trans_w=True),
        gmm(dy, w, counts, None, trans_w=False),
        gmm_wgrad(dy, x, counts, None),
    )  # offs None: the per-expert loop
    fb = GroupedMMFallbacks("parity")  # a rejected grouped call would take the loop, recorded here
    got = (
        gmm(x, w, counts, offs, trans_w=True, fallbacks=fb),
        gmm(dy, w, counts, offs, trans_w=False, fallbacks=fb),
        gmm_wgrad(dy, x, counts, offs, fb),
    )
    for name, a, b in zip(("fwd", "dgrad", "wgrad"), got, ref, strict=True):
        e = rel_err(a, b)
        results.append((f"grouped_mm {name} vs loop", "PASS" if e <= REL_TOL else "FAIL", e))
    results.append(
        (
            "grouped_mm empty group wgrad zero",
            "PASS" if got[2][1].abs().max().item() == 0 else "FAIL",
            None,
        )
    )
    results.append(
        (
            "grouped_mm accepted every operand layout",
            "FAIL" if fb.messages else "PASS",
            fb.messages[:1],
        )
    )


def run(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(dy)
    return out.detach(), x.grad.detach(), {n: p.grad for n, p in layer.named_parameters()}


def fluid_grads_in_stock_names(grads, num_local):
    out = {}
    for n, g in grads.items():
        if n == "experts.weight1" or n == "experts.weight2":
            fc = "linear_fc1" if n.endswith("1") else "linear_fc2"
            for i in range(num_local):
                out[f"experts.local_experts.{i}.{fc}.weight"] = g[i]
        else:
            out[n] = g
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument(
        "--fused",
        action="store_true",
        help="bias_activation_fusion (stock's default fused weighted SwiGLU) in both layers",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a benchmark model's MoE layer shape (benchmarks/recipes.py MODELS: hidden, FFN, "
        "experts, top-k, shared expert) instead of the default H 1024, F 2048, 8 experts top-2",
    )
    p.add_argument(
        "--basic",
        action="store_true",
        help="only the default setting (chunks 1, auto GEMM and overlap) and the DDP check",
    )
    args = p.parse_args()

    cuda = args.device == "cuda"
    from fluid.schedule import get_backward_scheduler
    from fluid.testing.moe import (
        init_expert_parallel_world,
        moe_config,
        set_dedup,
        set_num_chunks,
        stock_and_fluid,
    )

    rank, ws, device, pg = init_expert_parallel_world(cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    H, F, E, K, S, T = (
        (1024, 2048, 8, 2, 1024, args.tokens) if cuda else (64, 32, 4 * ws, 2, 16, 64)
    )
    if args.model is not None:
        from fluid.testing.bench.models import MODELS

        m = MODELS[args.model]
        H, F, E, K, S = m.hidden, m.ffn, m.experts, m.topk, m.shared_ffn
        if not cuda:  # CPU dry run: the model's expert count and top-k, small widths
            H, F, S, T = 64, 32, (16 if S else None), 64
    cfg = moe_config(
        hidden=H,
        ffn=F,
        num_experts=E,
        topk=K,
        ep=ws,
        shared=S,
        dtype=dtype,
        init_method_std=0.02,
        bias_activation_fusion=args.fused,
    )
    torch.manual_seed(1234)  # identical stock weights on every rank's replicated parts
    stock, fluid = stock_and_fluid(cfg, pg, device)
    g = torch.Generator().manual_seed(77 + rank)
    x = torch.randn(T, 1, H, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(T, 1, H, generator=g).to(device=device, dtype=dtype)

    results = []
    if cuda:
        check_grouped_mm(device, results)
        ref = run(stock, x, dy)
    else:
        results.append(("stock MoELayer", "SKIP", "needs CUDA; dry run compares Fluid to itself"))
        ref = run(fluid, x, dy)
    ref_grads = ref[2]
    sched = get_backward_scheduler()
    # (chunks, dedup, --fluid-grouped-gemm, CommContext.overlap). At these sizes auto picks the
    # grouped kernel; "off" gives per-expert GEMMs: with dW inline (NVLink, or scheduler off) the
    # per-expert backward of fluid.moe.expert_loop, with overlap "always" and the scheduler on
    # the deferred composition, so "on == off" there compares the two paths bit for bit.
    settings = (
        (1, False, "auto", "auto"),
        (2, False, "auto", "auto"),
        (1, True, "auto", "auto"),
        (1, False, "off", "auto"),
        (1, False, "off", "always"),
        (2, False, "off", "always"),
    )
    if args.basic:
        settings = settings[:1]
    for chunks, dedup, gemm, overlap in settings:
        set_dedup(fluid, False)
        set_num_chunks(fluid, chunks)
        set_dedup(fluid, dedup)
        fluid.experts.grouped_gemm = gemm
        fluid.comm.overlap = overlap
        setting = (
            f"chunks={chunks}{' dedup' if dedup else ''}"  # the label of this setting's lines
            f"{' gemm=loop' if gemm == 'off' else ''}{' overlap=' + overlap if overlap != 'auto' else ''}"
        )
        outs = {}
        for mode in ("on", "off"):
            sched.enable() if mode == "on" else sched.disable()
            outs[mode] = run(fluid, x, dy)
        sched.enable()
        out, dx, grads = outs["on"]
        named = fluid_grads_in_stock_names(grads, fluid.num_local_experts) if cuda else grads
        for what, a, b in (("output", out, ref[0]), ("dX", dx, ref[1])):
            e = rel_err(a, b)
            results.append((f"{setting} {what}", "PASS" if e <= REL_TOL else "FAIL", e))
        missing = set(ref_grads) ^ set(named)
        results.append(
            (f"{setting} same parameter set", "FAIL" if missing else "PASS", sorted(missing))
        )
        for n in sorted(set(ref_grads) & set(named)):
            e = rel_err(named[n], ref_grads[n])
            results.append((f"{setting} grad {n}", "PASS" if e <= REL_TOL else "FAIL", e))
        off = outs["off"]
        same = (
            torch.equal(out, off[0])
            and torch.equal(dx, off[1])
            and all(torch.equal(grads[n], off[2][n]) for n in grads)
        )
        results.append(
            (f"{setting} scheduler on == off (bitwise)", "PASS" if same else "FAIL", None)
        )

    # Under Megatron DDP (main_grad + its grad hook, emulated), per-expert GEMMs with dW inline
    # take fluid.moe.expert_loop's per-expert backward, which adds each expert's dW straight into
    # main_grad: it must equal the composition's gradients (same GEMMs, fp32 0 + bf16 add: exact).
    from fluid.testing.moe import emulate_ddp_grads, reset_ddp_flags

    set_num_chunks(fluid, 1)
    fluid.experts.grouped_gemm = "off"
    fluid.comm.overlap = "never"  # dW inline on any link
    plain = run(fluid, x, dy)[2]
    accs = emulate_ddp_grads(fluid.parameters())
    reset_ddp_flags(fluid.parameters())
    run(fluid, x, dy)
    same = all(torch.equal(p.main_grad, plain[n].float()) for n, p in fluid.named_parameters())
    results.append(
        ("gemm=loop under DDP main_grad == plain grads (bitwise)", "PASS" if same else "FAIL", None)
    )
    results.append(
        (
            "gemm=loop under DDP: expert weights flagged grad_added_to_main_grad",
            "PASS" if fluid.experts.weight1.grad_added_to_main_grad else "FAIL",
            None,
        )
    )
    del accs
    fluid.experts.grouped_gemm = "auto"
    fluid.comm.overlap = "auto"

    failed = [r for r in results if r[1] == "FAIL"]
    if rank == 0:
        for name, status, val in results:
            print(f"[moe parity] {status:4s} {name} {'' if val is None else val}", flush=True)
        print(
            f"[moe parity] {'FAIL' if failed else 'PASS'} ({len(failed)} failed, "
            f"device={torch.cuda.get_device_name() if cuda else 'cpu'}, ws={ws})",
            flush=True,
        )
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "moe_parity.json"), "w") as f:
            json.dump(
                {
                    "argv": sys.argv,
                    "world_size": ws,
                    "rel_tol": REL_TOL,
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "results": results,
                },
                f,
                indent=1,
                default=str,
            )
    flag = torch.tensor([len(failed)], device=device)
    dist.all_reduce(flag)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    sys.exit(1 if int(flag.item()) else 0)


if __name__ == "__main__":
    main()
