"""Benchmark: FluidSelfAttention (Ulysses CP = world, scheduler on/off) vs stock SelfAttention.

    CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 \
        torchrun --nproc-per-node 4 benchmarks/bench_attention.py --out docs/benchmarks/raw/attn_nvlink
    # the multi-node stand-in: same with NCCL_P2P_DISABLE=1 (see docs/hardware.md)
    # CPU dry run (tiny sizes, gloo, catches crashes; numbers meaningless; no stock layer):
    torchrun --nproc-per-node 2 benchmarks/bench_attention.py --device cpu --out /tmp/bench_attn

Layer: hidden 4096, 32 heads / 8 query groups (head dim 128), RoPE, causal, bf16, micro-batch 1,
no bias, --layers stacked attention layers (default 2: in backward each layer's hp2sp window then
holds its proj dW plus the next layer's qkv dW, as in a real model; with 1 layer only the proj dW
can overlap and the whole gain, ~0.4 ms, is within run-to-run noise). Medians over --iters after --warmup,
CUDA events on rank 0 after a barrier.
  fluid_cp:  CP = world at --seq total tokens (--seq/world per rank): fwd_ms, fwdbwd_ms,
             bwd_ms = fwdbwd - fwd, peak_gb (max over ranks of torch.cuda.max_memory_allocated
             during one fwd+bwd, everything included: params, grads, inputs), for the scheduler
             on and off; speedup_on_vs_off.
  a2a:       each all-to-all of the layer timed alone (q, k, v sp2hp; output hp2sp), ms;
             a2a_fwd_ms = their sum; the backward runs the same four, a2a_fwdbwd_ms = 2x.
  dw:        the proj and qkv dW GEMMs timed alone, ms.
  overlap:   eta_e2e = (bwd_off - bwd_on) / sum over backward windows of min(T_dW in window,
             T_a2a of the window) (docs/hardware.md: (T_serial - T_measured) / (T_serial - T_ideal);
             one layer: only proj dW can overlap, in the hp2sp window; with --layers > 1 the
             next layer's qkv dW joins it). sched_stats: the scheduler's own counters and in-window
             timings (a2a_ms, dw_in_window_ms, window_ms, overlap_efficiency) of --iters extra
             iterations in timing mode. The scheduler overlaps only where the link is slow
             (CommContext.should_overlap: NCCL_P2P_DISABLE set, multi-node, or FLUID_OVERLAP=always).
  cp1 (rank 0 alone, one GPU): stock SelfAttention (local spec, DotProductAttention) and Fluid at
             --stock-seq (8k), and Fluid at --seq if it fits (for the memory target:
             fluid_cp peak_gb / fluid CP=1 peak_gb at the same total sequence).
Writes <out>/bench_attention.json (command, card, env, results, targets) and bench_attention.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._timing import Timer  # noqa: E402

TINY = dict(seq=64, hidden=64, heads=8, groups=2, stock_seq=32)


def peak_gb(fn, cuda: bool) -> float:
    if not cuda:
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def bench_stack(layers, x, emb, dy, timer, args, cuda):
    """fwd / fwd+bwd medians and peak memory of `layers` applied in sequence to `x`."""

    def fwd():
        with torch.no_grad():
            h = x
            for layer in layers:
                h, _ = layer(h, None, rotary_pos_emb=emb)

    def fwdbwd():
        h = x
        for layer in layers:
            h, _ = layer(h, None, rotary_pos_emb=emb)
        h.backward(dy)

    r = {"fwd_ms": timer(fwd, args.warmup, args.iters), "fwdbwd_ms": timer(fwdbwd, args.warmup, args.iters)}
    r["bwd_ms"] = r["fwdbwd_ms"] - r["fwd_ms"]
    r["peak_gb"] = peak_gb(fwdbwd, cuda)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seq", type=int, default=32768, help="total sequence length (all CP ranks)")
    ap.add_argument("--stock-seq", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-cp1", action="store_true", help="skip the one-GPU stock/Fluid runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cuda = args.device == "cuda"
    if not cuda:
        for k, v in TINY.items():
            setattr(args, k, v)
        args.warmup, args.iters = 1, 2
    from megatron.core import parallel_state

    from fluid.attention.testing import attention_config, build_attention, init_cp_run, pg_collection, rope_emb
    from fluid.comm import CommContext, fluid_all_to_all_hp2sp, fluid_all_to_all_sp2hp
    from fluid.schedule import get_backward_scheduler

    rank, cp, tp, cp_group, single, device = init_cp_run(args.device)
    dtype = torch.bfloat16 if cuda else torch.float32
    H, hd, b = args.hidden, args.hidden // args.heads, args.batch
    timer = Timer(cuda)
    sched = get_backward_scheduler()

    def cfg(cp_size):
        return attention_config(
            heads=args.heads, groups=args.groups, head_dim=hd, cp=cp_size, dtype=dtype,
            init_method_std=0.02,
        )

    def make_inputs(s_local, emb_group):
        g = torch.Generator(device=device).manual_seed(11 + rank)
        x = torch.randn(s_local, b, H, device=device, dtype=dtype, generator=g).requires_grad_(True)
        dy = torch.randn(s_local, b, H, device=device, dtype=dtype, generator=g)
        return x, dy, rope_emb(s_local * dist.get_world_size(emb_group), hd, emb_group, device)

    results: dict = {}
    # -- Fluid, CP = world ---------------------------------------------------------------------
    s_local = args.seq // cp
    layers = [
        build_attention("fluid", cfg(cp), pg_collection(tp, cp_group), seed=1 + i, device=device)
        for i in range(args.layers)
    ]
    x, dy, emb = make_inputs(s_local, cp_group)
    fl = {}
    for mode in ("on", "off"):
        sched.enable() if mode == "on" else sched.disable()
        r = bench_stack(layers, x, dy=dy, emb=emb, timer=timer, args=args, cuda=cuda)
        peak = torch.tensor([r["peak_gb"]], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        r["peak_gb"] = peak.item()
        fl[f"scheduler_{mode}"] = r
    sched.enable()
    sched.set_timing(True)
    sched.reset_stats()
    for _ in range(args.iters):
        h = x
        for layer in layers:
            h, _ = layer(h, None, rotary_pos_emb=emb)
        h.backward(dy)
    stats = sched.get_stats()
    sched.set_timing(False)
    for k in ("a2a_ms", "overlapped_a2a_ms", "dw_in_window_ms", "window_ms"):
        if isinstance(stats.get(k), float):
            stats[k + "_per_iter"] = stats[k] / args.iters
    fl["sched_stats"] = stats
    fl["speedup_on_vs_off"] = fl["scheduler_off"]["fwdbwd_ms"] / fl["scheduler_on"]["fwdbwd_ms"]
    del layers
    results["fluid_cp"] = fl

    # -- isolated all-to-alls and dW GEMMs --------------------------------------------------
    comm = CommContext(cp_group)
    layer0 = build_attention("fluid", cfg(cp), pg_collection(tp, cp_group), device=device)
    kv_heads = args.groups * layer0.kv_repeat
    del layer0
    tok = s_local * b
    q_in = torch.randn(tok, H, device=device, dtype=dtype)
    kv_in = torch.randn(tok, kv_heads * hd, device=device, dtype=dtype)
    o_in = torch.randn(tok * cp, H // cp, device=device, dtype=dtype)
    with torch.no_grad():
        a2a = {
            "q_sp2hp_ms": timer(lambda: fluid_all_to_all_sp2hp(q_in, comm), args.warmup, args.iters),
            "kv_sp2hp_ms_each": timer(lambda: fluid_all_to_all_sp2hp(kv_in, comm), args.warmup, args.iters),
            "out_hp2sp_ms": timer(lambda: fluid_all_to_all_hp2sp(o_in, comm), args.warmup, args.iters),
        }
    a2a["a2a_fwd_ms"] = a2a["q_sp2hp_ms"] + 2 * a2a["kv_sp2hp_ms_each"] + a2a["out_hp2sp_ms"]
    a2a["a2a_fwdbwd_ms"] = 2 * a2a["a2a_fwd_ms"] * args.layers
    a2a["bytes_per_rank"] = {
        "q": q_in.numel() * q_in.element_size(),
        "k_or_v": kv_in.numel() * kv_in.element_size(),
        "out": o_in.numel() * o_in.element_size(),
    }
    results["a2a"] = a2a
    qkv_rows = (args.heads + 2 * args.groups) * hd
    with torch.no_grad():
        act, d_proj, d_qkv = q_in, torch.randn(tok, H, device=device, dtype=dtype), torch.randn(
            tok, qkv_rows, device=device, dtype=dtype
        )
        dw = {
            "proj_dw_ms": timer(lambda: d_proj.t() @ act, args.warmup, args.iters),
            "qkv_dw_ms": timer(lambda: d_qkv.t() @ act, args.warmup, args.iters),
        }
    results["dw"] = dw
    del q_in, kv_in, o_in, act, d_proj, d_qkv

    # overlap: windows of the backward (hp2sp of each layer, last layer first)
    t_a2a = a2a["out_hp2sp_ms"]
    ideal_gain = min(dw["proj_dw_ms"], t_a2a) + (args.layers - 1) * min(
        dw["proj_dw_ms"] + dw["qkv_dw_ms"], t_a2a
    )
    gain = fl["scheduler_off"]["bwd_ms"] - fl["scheduler_on"]["bwd_ms"]
    results["overlap"] = {
        "overlap_enabled_by_policy": comm.should_overlap(),
        "bwd_gain_ms": gain,
        "ideal_gain_ms": ideal_gain,
        "eta_e2e": gain / ideal_gain if ideal_gain > 0 else None,
        "eta_in_window": stats.get("overlap_efficiency"),
    }

    # -- one GPU: stock and Fluid at CP=1 (rank 0), the others wait ---------------------------
    if not args.skip_cp1 and rank == 0:
        lt = Timer(cuda, barrier=False)  # rank 0 alone
        cp1 = {}
        runs = [("fluid", args.stock_seq), ("fluid", args.seq)]
        if cuda:
            runs.insert(0, ("stock", args.stock_seq))
        else:
            cp1["stock"] = "skipped: stock DotProductAttention needs CUDA"
        for kind, seq in runs:
            key = f"{kind}_seq{seq}"
            if cuda:
                torch.cuda.empty_cache()
            try:
                layers = [
                    build_attention(kind, cfg(1), pg_collection(tp, single), seed=1 + i, device=device)
                    for i in range(args.layers)
                ]
                x1, dy1, emb1 = make_inputs(seq, single)
                cp1[key] = bench_stack(layers, x1, emb1, dy1, lt, args, cuda)
                del layers, x1, dy1, emb1
            except torch.OutOfMemoryError as e:
                cp1[key] = f"out of memory: {str(e).splitlines()[0]}"
        results["cp1"] = cp1
    dist.barrier()

    if rank == 0:
        report(args, results, cp, cuda)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


def report(args, results, cp, cuda) -> None:
    fl, cp1 = results["fluid_cp"], results.get("cp1", {})
    on, off = fl["scheduler_on"], fl["scheduler_off"]
    targets = {"scheduler_on_not_slower": on["fwdbwd_ms"] <= off["fwdbwd_ms"] * 1.01}
    eta = results["overlap"]["eta_in_window"]
    if os.environ.get("NCCL_P2P_DISABLE", "0") not in ("", "0"):
        targets["overlap_eta_in_window_ge_0.7"] = eta is not None and eta >= 0.7
        e2e = results["overlap"]["eta_e2e"]
        targets["overlap_eta_e2e_ge_0.7"] = e2e is not None and e2e >= 0.7
    full = cp1.get(f"fluid_seq{args.seq}")
    if isinstance(full, dict) and full["peak_gb"] > 0:
        ratio = on["peak_gb"] / full["peak_gb"]
        results["memory_ratio_cp_vs_cp1"] = ratio
        targets["memory_ratio_le_0.35"] = ratio <= 0.35
    env_keys = ("NCCL_P2P_DISABLE", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_NVLS_ENABLE", "FLUID_OVERLAP",
                "FLUID_SCHEDULER")
    doc = {
        "command": f"torchrun --nproc-per-node {cp} " + " ".join(sys.argv),
        "argv": sys.argv,
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "world_size": cp,
        "torch": torch.__version__,
        "env": {k: os.environ.get(k) for k in env_keys},
        "args": vars(args),
        "results": results,
        "targets": targets,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    link = "P2P disabled" if doc["env"]["NCCL_P2P_DISABLE"] not in (None, "", "0") else "NVLink"
    if not cuda:
        link = "gloo dry run"
    rows = [
        "| layer | GPUs | seq total | fwd ms | fwd+bwd ms | peak GB |",
        "|---|---|---|---|---|---|",
        f"| Fluid CP={cp}, scheduler on | {cp} | {args.seq} | {on['fwd_ms']:.2f} | {on['fwdbwd_ms']:.2f} | {on['peak_gb']:.2f} |",
        f"| Fluid CP={cp}, scheduler off | {cp} | {args.seq} | {off['fwd_ms']:.2f} | {off['fwdbwd_ms']:.2f} | {off['peak_gb']:.2f} |",
    ]
    for key, r in cp1.items():
        if isinstance(r, dict):
            kind, seq = key.split("_seq")
            rows.append(f"| {kind.capitalize()} CP=1 | 1 | {seq} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | {r['peak_gb']:.2f} |")
        else:
            rows.append(f"| {key} | 1 | | {r} | | |")
    a2a, ov = results["a2a"], results["overlap"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    md = "\n".join(
        [f"### Attention, {doc['card']}, {link}, {args.layers} layer(s), hidden {args.hidden}, "
         f"{args.heads} heads / {args.groups} groups, {'bf16' if cuda else 'fp32'}", "", *rows, "",
         f"- all-to-all alone: fwd {a2a['a2a_fwd_ms']:.2f} ms, fwd+bwd {a2a['a2a_fwdbwd_ms']:.2f} ms "
         f"(q {a2a['q_sp2hp_ms']:.3f}, k/v {a2a['kv_sp2hp_ms_each']:.3f} each, out {a2a['out_hp2sp_ms']:.3f})",
         f"- dW GEMMs alone: proj {results['dw']['proj_dw_ms']:.3f} ms, qkv {results['dw']['qkv_dw_ms']:.3f} ms",
         f"- overlap on by policy: {ov['overlap_enabled_by_policy']}; eta in-window {fmt(ov['eta_in_window'])}, "
         f"eta end-to-end {fmt(ov['eta_e2e'])} (bwd gain {ov['bwd_gain_ms']:.3f} of ideal {ov['ideal_gain_ms']:.3f} ms)",
         f"- scheduler on/off fwd+bwd speedup {fl['speedup_on_vs_off']:.3f}",
         f"- memory CP={cp} / CP=1 at seq {args.seq}: {fmt(results.get('memory_ratio_cp_vs_cp1'))}",
         f"- targets: {targets}", ""]
    )
    with open(os.path.join(args.out, "bench_attention.md"), "w") as f:
        f.write(md)
    print(md)
    print(json.dumps(doc, default=str))


if __name__ == "__main__":
    sys.exit(main())
