"""Summarize the GPU timelines of `bench_moe.py --trace` (stdlib only; not collected by pytest).

    python3 benchmarks/timeline_summary.py docs/benchmarks/raw/<run>/bench_moe.json [--gaps 5]

A timeline row is [stream, start ms, duration ms, name] (stream "cpu" for the host-side `fwd` and
`bwd` annotations). Per configuration, traced variant and rank it prints:
  span: first GPU start to last GPU end; host fwd/bwd: how long the host took to issue the
  forward and the backward (the backward's includes its waits on the device);
  compute busy: union of the non-NCCL kernel intervals on the compute stream (the stream with the
  most non-NCCL kernel time); idle = span - busy, the time the compute stream had nothing to run, whether it waited for
  an all-to-all or for the host; nccl: summed NCCL kernel time on any stream (an NCCL kernel also spins while it waits for its peers);
  the largest compute-stream gaps with the kernels on either side; with FluidMoELayer's stage
  annotations (bench_moe.FLUID_STAGES), the host time of each forward stage under the profiler.
Reading: idle on one rank while the same all-to-all is short on the other means that rank arrived
late (host or compute skew); idle with no collective around it means the host was too slow.
"""

from __future__ import annotations

import argparse
import json


def _union(intervals):
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(rows: list, gaps: int = 5) -> dict:
    """Numbers of one rank's timeline (see the module docstring)."""
    host: dict = {}
    for r in rows:
        if r[0] == "cpu":  # fwd, bwd and the stage:* annotations (summed over calls)
            host[r[3]] = host.get(r[3], 0.0) + r[2]
    gpu = [r for r in rows if r[0] != "cpu" and r[3] not in host]  # not the annotations' GPU rows
    if not gpu:
        return {"host_fwd_ms": host.get("fwd"), "host_bwd_ms": host.get("bwd")}
    per_stream: dict = {}
    for r in gpu:
        per_stream.setdefault(r[0], []).append(r)
    compute = max(per_stream, key=lambda s: sum(r[2] for r in per_stream[s] if "nccl" not in r[3].lower()))
    comp = sorted((r for r in per_stream[compute] if "nccl" not in r[3].lower()), key=lambda r: r[1])
    t0 = min(r[1] for r in gpu)
    t1 = max(r[1] + r[2] for r in gpu)
    busy = _union([(r[1], r[1] + r[2]) for r in comp])
    holes, end, prev = [], None, None
    for r in comp:
        if end is not None and r[1] > end:
            holes.append((r[1] - end, round(end, 3), prev[3][:40], r[3][:40]))
        if end is None or r[1] + r[2] > end:
            end, prev = r[1] + r[2], r
    holes.sort(reverse=True)
    return {
        "span_ms": t1 - t0,
        "host_fwd_ms": host.get("fwd"),
        "host_bwd_ms": host.get("bwd"),
        "compute_stream": compute,
        "compute_busy_ms": busy,
        "compute_idle_ms": (t1 - t0) - busy,
        "nccl_ms": sum(r[2] for r in gpu if "nccl" in r[3].lower()),
        "kernels": len(gpu),
        "largest_gaps": [(round(h[0], 3),) + h[1:] for h in holes[:gaps]],
        "host_stages_ms": {k[6:]: v for k, v in host.items() if k.startswith("stage:")},
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--gaps", type=int, default=5)
    args = p.parse_args()
    doc = json.load(open(args.json))
    for cname, res in doc["results"].items():
        per_variant = res.get("timeline_ranks") or {k: [v] for k, v in res.get("timeline", {}).items()}
        for vname, ranks in per_variant.items():
            for rank, rows in enumerate(ranks):
                s = summarize(rows, args.gaps)
                if "span_ms" not in s:
                    print(f"{cname} {vname} rank {rank}: no GPU events")
                    continue
                print(f"{cname} {vname} rank {rank}: span {s['span_ms']:.2f} ms, host fwd "
                      f"{s['host_fwd_ms'] or 0:.2f} / bwd {s['host_bwd_ms'] or 0:.2f}, compute busy "
                      f"{s['compute_busy_ms']:.2f}, idle {s['compute_idle_ms']:.2f}, nccl "
                      f"{s['nccl_ms']:.2f}, {s['kernels']} kernels")
                if s["host_stages_ms"]:
                    print("    host per stage (profiled) ms: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in s["host_stages_ms"].items()))
                for g in s["largest_gaps"]:
                    print(f"    gap {g[0]:.3f} ms at {g[1]} after {g[2]!r} before {g[3]!r}")


if __name__ == "__main__":
    main()
