"""How much do a GEMM and an all-to-all slow each other down when they run at the same time?

Chunked forward pipelining (FLUID_MOE_CHUNKS) lost in every measured configuration because the
expert GEMMs ran slower beside the all-to-alls (session 3 kernel profile: +14% GEMM time), and
capping NCCL at 4 thread blocks did not help (session 4). This probe isolates that effect from the
MoE layer: one bf16 GEMM of the Mixtral-like expert shape and one even all-to-all of the dispatch
volume, each timed alone and then together (the all-to-all launched first on its own stream, as
FluidMoE does), with CUDA events on each stream. Run it under different NCCL settings
(NCCL_P2P_DISABLE, NCCL_MAX_CTAS, NCCL_NTHREADS...) to see which one the slowdown follows.

    torchrun --nproc-per-node 4 benchmarks/contention_probe.py --out OUT [--tag NAME]

Writes OUT/contention_<tag>.json (rank 0): gemm_ms, a2a_ms (alone), both_ms (wall, launch of the
first to end of the last), gemm_overlapped_ms and a2a_overlapped_ms (each on its own stream while
the other runs), and their ratios to alone. Medians over --iters after --warmup. A CPU/gloo dry run
(--device cpu) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="default")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rows", type=int, default=8192, help="GEMM M and all-to-all rows (4096 tokens x top-2)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
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
    a = torch.randn(rows, args.hidden, device=dev, dtype=dtype)
    w = torch.randn(args.hidden, 2 * args.ffn, device=dev, dtype=dtype)  # fc1 of SwiGLU
    send = torch.randn(rows, args.hidden, device=dev, dtype=dtype)
    recv = torch.empty_like(send)
    comm_stream = torch.cuda.Stream() if cuda else None

    def gemm():
        return a @ w

    def a2a():
        dist.all_to_all_single(recv, send)

    def timed(fn, stream=None):
        """(start, end) events around fn on `stream` (current stream if None)."""
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            s.record()
            fn()
            e.record()
        return s, e

    res = {"tag": args.tag, "world_size": ws, "rows": rows, "hidden": args.hidden, "ffn": args.ffn,
           "env": {k: os.environ.get(k) for k in ("NCCL_P2P_DISABLE", "NCCL_MAX_CTAS", "NCCL_MIN_CTAS",
                                                  "NCCL_NTHREADS", "CUDA_DEVICE_MAX_CONNECTIONS")}}
    if cuda:
        res["card"] = torch.cuda.get_device_name()
        samples = {k: [] for k in ("gemm", "a2a", "both", "gemm_ov", "a2a_ov")}
        for i in range(args.warmup + args.iters):
            dist.barrier()
            torch.cuda.synchronize()
            g = timed(gemm)
            torch.cuda.synchronize()
            dist.barrier()
            c = timed(a2a, comm_stream)
            torch.cuda.synchronize()
            dist.barrier()
            # Together: the all-to-all first on its stream, then the GEMM on the compute stream.
            comm_stream.wait_stream(torch.cuda.current_stream())
            c2 = timed(a2a, comm_stream)
            g2 = timed(gemm)
            torch.cuda.synchronize()
            if i >= args.warmup:
                samples["gemm"].append(g[0].elapsed_time(g[1]))
                samples["a2a"].append(c[0].elapsed_time(c[1]))
                samples["a2a_ov"].append(c2[0].elapsed_time(c2[1]))
                samples["gemm_ov"].append(g2[0].elapsed_time(g2[1]))
                samples["both"].append(max(c2[0].elapsed_time(c2[1]), c2[0].elapsed_time(g2[1])))
        med = {k: statistics.median(v) for k, v in samples.items()}
        res.update(
            gemm_ms=med["gemm"], a2a_ms=med["a2a"], both_ms=med["both"],
            gemm_overlapped_ms=med["gemm_ov"], a2a_overlapped_ms=med["a2a_ov"],
            gemm_slowdown=med["gemm_ov"] / med["gemm"], a2a_slowdown=med["a2a_ov"] / med["a2a"],
            serial_ms=med["gemm"] + med["a2a"],
            hidden_fraction=(med["gemm"] + med["a2a"] - med["both"]) / min(med["gemm"], med["a2a"]),
        )
    else:  # dry run: exercise the ops only
        gemm()
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
