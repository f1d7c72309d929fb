"""Render benchmarks/bench_moe.py's JSON as a markdown table (+ a bar chart PNG if matplotlib).

    python benchmarks/moe_report.py docs/benchmarks/raw/nvlink/bench_moe.json \
        --md docs/benchmarks/moe_nvlink.md --png docs/benchmarks/moe_nvlink.png
"""

from __future__ import annotations

import argparse
import json

COLS = ("fwd_ms", "fwdbwd_ms", "bwd_ms", "peak_gb", "speedup_vs_stock", "overlap_eta")


def _fmt(v):
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def to_markdown(doc: dict) -> str:
    env = doc.get("env", {})
    lines = [
        f"# MoE layer benchmark ({doc['card']}, {doc['world_size']} ranks, "
        f"NCCL_P2P_DISABLE={env.get('NCCL_P2P_DISABLE')})",
        "",
        f"Command: `{doc['command']}`  (torch {doc.get('torch')})",
        "",
    ]
    for name, res in doc["results"].items():
        lines += [
            f"## {name}: {res['shape']}, {res['tokens_per_rank']} tokens/rank",
            "",
            f"dW {_fmt(res.get('dw_ms'))} ms, one dispatch a2a {_fmt(res.get('a2a_ms'))} ms",
            "",
            "| variant | " + " | ".join(COLS) + " |",
            "|---" * (len(COLS) + 1) + "|",
        ]
        for v, r in res["variants"].items():
            lines.append(f"| {v} | " + " | ".join(_fmt(r.get(c)) for c in COLS) + " |")
        lines.append("")
        po = res.get("paired_onoff")
        if po:
            lines += [
                f"Scheduler on / off, alternating ({len(po['rounds'])} rounds): fwd+bwd time ratio "
                f"median {_fmt(po['on_over_off_median'])}, range {_fmt(po['on_over_off_min'])}-"
                f"{_fmt(po['on_over_off_max'])} (> 1: on is slower)",
                "",
            ]
        ab = res.get("paired_ab")
        if ab:
            lines += [
                f"{ab['b']} / {ab['a']}, alternating ({len(ab['rounds'])} rounds): fwd+bwd time "
                f"ratio median {_fmt(ab['b_over_a_median'])}, range {_fmt(ab['b_over_a_min'])}-"
                f"{_fmt(ab['b_over_a_max'])} (> 1: {ab['b']} is slower)",
                "",
            ]
        pr = res.get("paired")
        if pr:
            lines += [
                f"Paired rounds (stock, Fluid {pr.get('variant', 'fluid_on_c1')} alternating, "
                f"{len(pr['rounds'])} rounds): speedup "
                f"median {_fmt(pr['speedup_median'])}, range {_fmt(pr['speedup_min'])}-{_fmt(pr['speedup_max'])}; "
                "stock ms per round: " + ", ".join(_fmt(r["stock"]) for r in pr["rounds"]),
                "",
            ]
    return "\n".join(lines)


def to_png(doc: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(doc["results"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        variants = doc["results"][name]["variants"]
        labels = list(variants)
        ax.bar(labels, [variants[v]["fwdbwd_ms"] for v in labels], label="fwd+bwd")
        ax.bar(labels, [variants[v]["fwd_ms"] for v in labels], label="fwd")
        ax.set_title(name)
        ax.set_ylabel("ms")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.suptitle(f"{doc['card']}, NCCL_P2P_DISABLE={doc.get('env', {}).get('NCCL_P2P_DISABLE')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--md", required=True)
    p.add_argument("--png")
    args = p.parse_args()
    with open(args.json) as f:
        doc = json.load(f)
    with open(args.md, "w") as f:
        f.write(to_markdown(doc) + "\n")
    if args.png and not to_png(doc, args.png):
        print("matplotlib not installed: no PNG")


if __name__ == "__main__":
    main()
