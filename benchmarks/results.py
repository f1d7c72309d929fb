"""Derived numbers of one recipe's raw JSON (what the page shows): per link the variants' times,
the ratios with their spread, the stock-vs-stock spread, peak memory, hidden/exposed communication,
and per slow link the step-level hidden fraction (fluid.testing.bench.overlap). Pure: the page and the
runner compute the same numbers from the same JSON."""

from __future__ import annotations

import statistics

from benchmarks import recipes as R
from fluid.testing.bench.overlap import link_hidden_fraction, relative_noise

# (label, numerator variant, denominator variant): ratio num/den > 1 means den is faster.
RATIOS = {
    "speedup": ("stock", "fluid"),  # Fluid (defaults) against stock
    "kernels": ("stock", "fluid_off"),  # Fluid with overlap off against stock: kernel choice
    "overlap": ("fluid_off", "fluid"),  # Fluid with overlap on against off
    "speedup_1f1b": ("stock", "fluid_1f1b"),  # Fluid under the combined-1F1B schedule vs stock
    "overlap_1f1b": ("fluid_off", "fluid_1f1b"),  # ... against Fluid with overlap off
    "stock_1f1b": ("stock", "stock_1f1b"),  # Megatron's combined 1F1B on stock layers
    "speedup_q32": ("stock", "fluid_q32"),  # Fluid with 32 hardware queues vs stock (one queue)
    "overlap_q32": ("fluid_off_q32", "fluid_q32"),  # overlap on vs off, both with 32 queues
    "overlap_measure": ("fluid_off", "fluid_measure"),  # overlap decided by timing vs off
    "overlap_chunks2": ("fluid_off", "fluid_chunks2"),  # forward pipelining (2 chunks) vs off
    "wgrad_fused": ("fluid_unfused", "fluid"),  # fused fp32 dW accumulation (default) vs unfused
    "fused_adam": ("fluid_foreach", "fluid"),  # torch's fused AdamW (default) vs foreach
    "jit_fusions": ("fluid", "fluid_jit"),  # Megatron's torch.compile fusions on, Fluid
    "speedup_jit": ("stock_jit", "fluid_jit"),  # Fluid vs stock, both with those fusions
    "stock_vs_stock": ("stock", "stock#2"),  # noise: stock against itself, same job
    "fluid_off_vs_fluid_off": ("fluid_off", "fluid_off#2"),  # noise where there is no stock side
}

# (overlap on, overlap off, key suffix) for the hidden fraction.
HIDDEN_PAIRS = (
    ("fluid", "fluid_off", ""),
    ("fluid_1f1b", "fluid_off", "_1f1b"),
    ("fluid_q32", "fluid_off_q32", "_q32"),
    ("fluid_measure", "fluid_off", "_measure"),
    ("fluid_chunks2", "fluid_off", "_chunks2"),
)


def _ratio(job: dict, num: str, den: str):
    """{median, min, max} of num/den: per round where the job has paired rounds, else (e2e) the
    ratio of the per-iteration medians (min/max None)."""
    key = f"{num}/{den}"
    if key in job.get("ratios", {}):
        r = job["ratios"][key]
        return {k: r.get(k) for k in ("median", "min", "max")}
    v = job.get("variants", {})
    a, b = v.get(num, {}).get("ms"), v.get(den, {}).get("ms")
    if a and b:
        return {"median": a / b, "min": None, "max": None}
    return None


def pooled_ms(job: dict) -> dict:
    """{variant: (median ms over every timed iteration of the variant and its repeats `name#k`,
    number of iterations)} for the variants with per-iteration times (e2e). One run's pooled
    median is its `ms`; with repeats it uses all their iterations: single iterations of a
    host-bound model spread by +-12% (docs/benchmarks/overlap.md), and the median of 14 is
    steadier than either median of 7."""
    pools: dict = {}
    for name, r in job.get("variants", {}).items():
        if r.get("iters_ms") and r.get("ms") is not None:
            pools.setdefault(name.split("#")[0], []).extend(r["iters_ms"])
    return {k: (statistics.median(x), len(x)) for k, x in pools.items()}


def link_summary(job: dict) -> dict:
    v = job.get("variants", {})
    out = {
        "ms": {k: r.get("ms") for k, r in v.items()},
        "peak_gb": {k: r.get("peak_gb") for k, r in v.items() if "#" not in k},
        "tflops": {k: r.get("tflops") for k, r in v.items() if r.get("tflops") is not None},
        "failed": sorted(
            k for k, r in v.items() if r.get("rc") not in (None, 0) or r.get("ms") is None
        ),
    }
    for label, (num, den) in RATIOS.items():
        r = _ratio(job, num, den)
        if r:
            out[label] = r
    comm = {k: r["comm"] for k, r in v.items() if r.get("comm")}
    if comm:
        out["comm"] = comm
    pooled = pooled_ms(job)
    if any("#" in name and name.split("#")[0] in pooled for name in v):  # a variant repeated
        out["pooled_ms"] = {k: m for k, (m, _) in pooled.items()}
        out["pooled_iters"] = {k: n for k, (_, n) in pooled.items()}
    return out


def _noise(s: dict) -> float:
    for key in ("stock_vs_stock", "fluid_off_vs_fluid_off"):
        if key in s:
            r = s[key]
            n = relative_noise(r)
            if n is None:  # one pair only (e2e): its distance from 1
                n = abs(r["median"] - 1.0)
            return n
    return 0.0


def summarize(doc: dict) -> dict:
    """{links: {link: link_summary}, hidden_fraction_key: {slow link: {value, low, high, ...}}}.
    The hidden fraction compares Fluid with overlap on against Fluid with overlap off, each over
    the slow link and NVLink: `fluid` / `fluid_off` under the key, and under the key plus a suffix
    the pairs of HIDDEN_PAIRS (combined 1F1B; 32 hardware queues). Each time is the variant's
    pooled median over its repeats' iterations where the link has repeats (`pooled_ms`), else its
    run's median; the band still comes from the stock-vs-stock (or off-vs-off) pair."""
    links = {name: link_summary(job) for name, job in doc.get("links", {}).items()}
    out = {"links": links}
    # Per variant, the pooled median where the link repeated variants (`pooled_ms`), else the run's.
    times = {name: {**s["ms"], **s.get("pooled_ms", {})} for name, s in links.items()}
    key = "e2e_hidden_fraction" if doc.get("recipe", {}).get("kind") == "e2e" else "hidden_fraction"
    nv = links.get("nvlink")
    for on, off, suffix in HIDDEN_PAIRS:
        hf = {}
        for slow in R.SLOW_LINKS:
            s = links.get(slow)
            if not (nv and s):
                continue
            ts, tn = times[slow], times["nvlink"]
            t = [ts.get(on), tn.get(on), ts.get(off), tn.get(off)]
            if any(x is None for x in t):
                continue
            hf[slow] = link_hidden_fraction(*t, noise_slow=_noise(s), noise_nv=_noise(nv))
        if hf:
            out[key + suffix] = hf
    return out
