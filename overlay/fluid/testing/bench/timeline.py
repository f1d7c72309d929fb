"""Busy/idle arithmetic of one rank's GPU timeline (stdlib only).

A timeline row is [stream, start ms, duration ms, name] (stream "cpu" for host-side annotations
such as `fwd`, `bwd` and `stage:*`). `summarize` gives: span (first GPU start to last GPU end);
host fwd/bwd (how long the host took to issue them); compute busy (union of the non-NCCL kernel
intervals on the compute stream, the stream with the most non-NCCL kernel time); idle = span -
busy; nccl (summed NCCL kernel time on any stream); the largest compute-stream gaps with the
kernels on either side; the host time of each annotated stage.
"""

from __future__ import annotations


def union_length(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
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
    compute = max(
        per_stream, key=lambda s: sum(r[2] for r in per_stream[s] if "nccl" not in r[3].lower())
    )
    comp = sorted(
        (r for r in per_stream[compute] if "nccl" not in r[3].lower()), key=lambda r: r[1]
    )
    t0 = min(r[1] for r in gpu)
    t1 = max(r[1] + r[2] for r in gpu)
    busy = union_length([(r[1], r[1] + r[2]) for r in comp])
    holes, end, prev = [], None, None
    for r in comp:
        if end is not None and prev is not None and r[1] > end:  # set together
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
