"""How much do a GEMM and an all-to-all slow each other down when they run at the same time?

Chunked forward pipelining (`--fluid-moe-chunks`) lost in every measured configuration because the
expert GEMMs ran slower beside the all-to-alls (+14% GEMM time in a kernel profile), and capping
NCCL at 4 thread blocks did not help (docs/benchmarks/HISTORY.md). This probe isolates that effect from the
MoE layer: one bf16 GEMM of the Mixtral-like expert shape and one even all-to-all of the dispatch
volume, each timed alone and then together (the all-to-all launched first on its own stream, as
FluidMoE does), with CUDA events on each stream. Run it under different NCCL settings
(NCCL_P2P_DISABLE, NCCL_MAX_CTAS, NCCL_NTHREADS...) to see which one the slowdown follows.

    torchrun --nproc-per-node 4 -m benchmarks.probes.contention --out OUT [--tag NAME]

Each GEMM kind (dense cuBLAS `mm`, grouped forward and grouped dW `torch._grouped_mm`) is measured
with every SM carve-out in --carveouts: persistent GEMM kernels give each of their one-per-SM thread
blocks a fixed share of the tiles, so blocks that find their SM held by NCCL start only when NCCL
ends, unless the grid leaves those SMs out (fluid.comm.context.sm_carveout).

Each launch mode (--modes, see launch()) is measured too: a GEMM can only run beside an all-to-all
if nothing queued between them makes the GPU wait for the all-to-all first.

Writes OUT/contention_<tag>.json (rank 0), per `<mode>_<gemm>_sm<n>`: gemm_ms, a2a_ms (alone),
both_ms (compute stream, before the launch to after the join), gemm_overlapped_ms (the GEMM's own
events while the all-to-all runs), a2a_launch_host_ms (host time of the launch call), and
hidden_fraction = (gemm + a2a - both) / min(gemm, a2a): 1 = hidden, 0 = serial. Medians over --iters after --warmup. A CPU/gloo dry run
(--device cpu) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="default")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument(
        "--rows", type=int, default=8192, help="GEMM M and all-to-all rows (4096 tokens x top-2)"
    )
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--local-experts", type=int, default=2, help="groups of the grouped GEMMs")
    ap.add_argument(
        "--carveouts",
        default="0,8,16,32",
        help="SM carve-outs to try for each GEMM (torch._C._set_sm_carveout_experimental)",
    )
    ap.add_argument(
        "--modes",
        default="sync,async,async_internal,commctx",
        help="how the all-to-all is launched beside the GEMM (see launch())",
    )
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        args.rows, args.hidden, args.ffn, args.iters, args.warmup = 64, 32, 48, 2, 1
    rows = args.rows - args.rows % ws
    G = args.local_experts
    a = torch.randn(rows, args.hidden, device=dev, dtype=dtype)
    w = torch.randn(args.hidden, 2 * args.ffn, device=dev, dtype=dtype)  # fc1 of SwiGLU
    w_g = torch.randn(G, args.hidden, 2 * args.ffn, device=dev, dtype=dtype)  # G experts' fc1
    dy = torch.randn(rows, 2 * args.ffn, device=dev, dtype=dtype)
    offs = torch.tensor([(g + 1) * rows // G for g in range(G)], device=dev, dtype=torch.int32)
    send = torch.randn(rows, args.hidden, device=dev, dtype=dtype)
    recv = torch.empty_like(send)
    comm_stream = torch.cuda.Stream() if cuda else None
    grouped_ok = (
        cuda and hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0)
    )

    # The expert GEMMs FluidMoE issues: a dense cuBLAS GEMM (per-expert loop, shared experts), the
    # grouped forward GEMM (torch._grouped_mm, CUTLASS, persistent) and the grouped dW GEMM.
    gemms = {"mm": lambda: a @ w}
    if grouped_ok:
        gemms["grouped_fwd"] = lambda: torch._grouped_mm(a, w_g, offs=offs)
        gemms["grouped_dw"] = lambda: torch._grouped_mm(dy.t(), a, offs=offs)

    def a2a():
        dist.all_to_all_single(recv, send)

    # How the all-to-all is launched beside the GEMM (--modes): "sync" = synchronous
    # dist.all_to_all_single under the side stream (what CommContext does); "async" =
    # async_op=True under the side stream, Work.wait() from the compute stream after the GEMM;
    # "async_internal" = async_op=True from the compute stream (ProcessGroupNCCL's own stream);
    # "commctx" = fluid.comm.CommContext.all_to_all_single + handle.wait(), whatever it does now.
    ctx_comm = None

    def launch(mode):
        """Start the all-to-all; returns the callable that joins it to the compute stream."""
        nonlocal ctx_comm
        if mode == "sync":
            with torch.cuda.stream(comm_stream):
                dist.all_to_all_single(recv, send)
                done = torch.cuda.Event()
                done.record()
            return lambda: torch.cuda.current_stream().wait_event(done)
        if mode == "async":
            with torch.cuda.stream(comm_stream):
                work = dist.all_to_all_single(recv, send, async_op=True)
            return work.wait
        if mode == "async_internal":
            return dist.all_to_all_single(recv, send, async_op=True).wait
        if mode == "commctx":
            from fluid.comm import CommContext

            ctx_comm = ctx_comm or CommContext(dist.group.WORLD, sm_carveout=0)
            return ctx_comm.all_to_all_single(recv, send, None, None).wait
        raise ValueError(mode)

    def timed(fn, stream=None):
        """(start, end) events around fn on `stream` (current stream if None)."""
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            s.record()
            fn()
            e.record()
        return s, e

    def measure(gemm, mode):
        samples = {k: [] for k in ("gemm", "a2a", "both", "gemm_ov", "launch_host")}
        for i in range(args.warmup + args.iters):
            dist.barrier()
            torch.cuda.synchronize()
            g = timed(gemm)
            torch.cuda.synchronize()
            dist.barrier()
            c = timed(a2a, comm_stream)
            torch.cuda.synchronize()
            dist.barrier()
            # Together: the all-to-all first, then the GEMM on the compute stream, then the join.
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record()
            h0 = time.perf_counter()
            join = launch(mode)
            h1 = time.perf_counter()
            g2 = timed(gemm)
            join()
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
            torch.cuda.synchronize()
            if i >= args.warmup:
                samples["gemm"].append(g[0].elapsed_time(g[1]))
                samples["a2a"].append(c[0].elapsed_time(c[1]))
                samples["gemm_ov"].append(g2[0].elapsed_time(g2[1]))
                samples["both"].append(t0.elapsed_time(t1))
                samples["launch_host"].append((h1 - h0) * 1e3)
        med = {k: statistics.median(v) for k, v in samples.items()}
        return dict(
            gemm_ms=med["gemm"],
            a2a_ms=med["a2a"],
            both_ms=med["both"],
            gemm_overlapped_ms=med["gemm_ov"],
            a2a_launch_host_ms=med["launch_host"],
            gemm_slowdown=med["gemm_ov"] / med["gemm"],
            serial_ms=med["gemm"] + med["a2a"],
            hidden_fraction=(med["gemm"] + med["a2a"] - med["both"]) / min(med["gemm"], med["a2a"]),
        )

    res = {
        "tag": args.tag,
        "world_size": ws,
        "rows": rows,
        "hidden": args.hidden,
        "ffn": args.ffn,
        "local_experts": G,
        "env": {
            k: os.environ.get(k)
            for k in (
                "NCCL_P2P_DISABLE",
                "NCCL_MAX_CTAS",
                "NCCL_MIN_CTAS",
                "NCCL_MAX_P2P_NCHANNELS",
                "NCCL_NTHREADS",
                "CUDA_DEVICE_MAX_CONNECTIONS",
            )
        },
    }
    if cuda:
        from fluid.comm.context import sm_carveout

        res["card"] = torch.cuda.get_device_name()
        res["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
        res["results"] = {}
        carveouts = [int(c) for c in args.carveouts.split(",")]
        for mode in args.modes.split(","):
            for name, gemm in gemms.items():
                for n in carveouts:
                    with sm_carveout(n) if n else contextlib.nullcontext():
                        r = measure(gemm, mode)
                    res["results"][f"{mode}_{name}_sm{n}"] = r
                    if rank == 0:
                        print(
                            f"[probe {args.tag}] {mode} {name} carveout {n}: gemm {r['gemm_ms']:.3f}"
                            f" (beside {r['gemm_overlapped_ms']:.3f}) a2a {r['a2a_ms']:.3f} both "
                            f"{r['both_ms']:.3f} hidden {r['hidden_fraction']:.2f} launch "
                            f"{r['a2a_launch_host_ms']:.3f} ms host",
                            flush=True,
                        )
    else:  # dry run: exercise the ops only
        gemms["mm"]()
        a2a()
        res["dry_run"] = True
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"contention_{args.tag}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
