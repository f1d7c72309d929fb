"""Turn benchmarks/e2e.py JSON into a markdown table and a loss-curve plot.

Usage: python benchmarks/e2e_report.py RAW.json [RAW2.json ...] --md OUT.md --png OUT.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    rows = [
        "| link | variant | loaded from | rc | median iter ms (it >= 10) | speedup vs stock | "
        "max rel. loss diff | max rel. grad-norm diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        runs = res["runs"]
        stock = runs.get("stock")
        for name, r in runs.items():
            link = "P2P disabled" if r["p2p_disabled"] else "NVLink"
            cmp = None
            for key, val in res.items():
                if key.startswith(f"{name}_vs_"):
                    cmp = val
            speed = None
            if stock and r["seq_length"] == stock["seq_length"] and r["median_iter_ms_after_10"]:
                speed = stock["median_iter_ms_after_10"] / r["median_iter_ms_after_10"]
            rows.append(
                f"| {link} | {name} | {r.get('loaded') or '-'} | {r['rc']} | "
                f"{_fmt(r['median_iter_ms_after_10'])} | {_fmt(speed, '.3f')} | "
                f"{_fmt(cmp and cmp.get('max_rel_diff_loss'), '.4f')} | "
                f"{_fmt(cmp and cmp.get('max_rel_diff_grad_norm'), '.4f')} |"
            )
    return "\n".join(rows)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for name, r in res["runs"].items():
            if name in ("init",) or "from_fluid" in name:
                continue
            its = sorted((int(i), v["loss"]) for i, v in r["iterations"].items() if "loss" in v)
            if its:
                ax.plot([i for i, _ in its], [v for _, v in its], label=name)
        link = "P2P disabled" if any(r["p2p_disabled"] for r in res["runs"].values()) else "NVLink"
        ax.set_title(f"lm loss, {res.get('card')}, {link}")
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw", nargs="+", type=Path)
    ap.add_argument("--md", type=Path, required=True)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    results = [json.loads(p.read_text()) for p in args.raw]
    md = ["# End to end: stock pretrain_gpt.py vs --use-fluid-moe", ""]
    for p, res in zip(args.raw, results):
        md.append(f"- `{p}`: {res.get('card')}; command `{' '.join(res.get('argv', []))}`")
    md += ["", table(results), ""]
    args.md.write_text("\n".join(md) + "\n")
    if args.png:
        plot(results, args.png)
    print("\n".join(md))


if __name__ == "__main__":
    main()
