"""Training-loop compatibility table (docs/benchmarks/compat.md) from one or more benchmarks/probes/compat.py JSON files.

    python -m benchmarks.probes.compat_report A.json B.json ... --md docs/benchmarks/compat.md \
        --pair stock:fluid_recompute_full --pair stock_ddp_overlap:fluid_ddp_overlap ...

Runs are looked up by variant name across the files (a later file wins on a repeated name, and the
table says which file each run came from); `NAME@K` names the run in the K-th file (1-based). Each `--pair REF:OTHER` row gives OTHER's return code,
median iteration time, and its max relative loss / grad-norm difference to REF over the
iterations both logged (benchmarks.probes.compat.compare).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.probes.compat import compare  # noqa: E402


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw", nargs="+", type=Path)
    ap.add_argument("--md", type=Path, required=True)
    ap.add_argument("--pair", action="append", default=[], help="REF:OTHER variant names")
    args = ap.parse_args()
    runs, source, cards = {}, {}, set()
    for k, p in enumerate(args.raw, 1):
        doc = json.loads(p.read_text())
        cards.add(doc.get("card"))
        for name, r in doc["runs"].items():
            runs[name], source[name] = r, p
            runs[f"{name}@{k}"], source[f"{name}@{k}"] = r, p
    md = [
        "# Training-loop compatibility: `pretrain_gpt.py --use-fluid-moe` with other Megatron flags",
        "",
    ]
    md += [f"Cards: {', '.join(sorted(c for c in cards if c))}. Sources:"]
    md += [f"- `{p}`" for p in args.raw]
    md += [
        "",
        "| variant | reference | rc | median iter ms (it >= 10) | reference median ms | iterations compared | "
        "max rel. loss diff | max rel. grad-norm diff | from |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in args.pair:
        ref_name, name = pair.split(":")
        r, ref = runs.get(name), runs.get(ref_name)
        if r is None or ref is None:
            md.append(f"| {name} | {ref_name} | not run | | | | | | |")
            continue
        c = compare(ref, r)
        common = sorted(set(ref["iterations"]) & set(r["iterations"]), key=int)
        span = f"{common[0]}-{common[-1]}" if common else "none"
        same_file = source[name] == source[ref_name]
        md.append(
            f"| {name} | {ref_name} | {r['rc']} | {_fmt(r['median_iter_ms_after_10'], '.1f')} | "
            f"{_fmt(ref['median_iter_ms_after_10'], '.1f')} | {span} | "
            f"{_fmt(c.get('max_rel_diff_loss'), '.4f')} | {_fmt(c.get('max_rel_diff_grad_norm'), '.4f')} | "
            f"{source[name].parent.parent.name}/{source[name].parent.name}"
            f"{'' if same_file else ' (reference from another call)'} |"
        )
    args.md.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
