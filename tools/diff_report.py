#!/usr/bin/env python3
"""`make diff-report [FROM=<pin>] [TO=<ref>]`: what changed upstream, and what it means for us.

A markdown report comparing two upstream states:
  - `git diff --stat` and per-symbol summaries of the hunks for
    megatron/core/transformer/attention.py, megatron/core/transformer/moe/, and every file the
    patch series touches; a short list of the rest of megatron/core;
  - each patch's outcome at TO: applies cleanly, with a 3-way merge, not at all (which hunk), or
    "fixed upstream: drop it" (TO already has its change: its diff applies in reverse, or its
    Probe no longer finds the bug it fixes, however upstream fixed it); every patch is tried,
    also after one conflicts; and whether the series still applies to the pin (`--check-pin`);
  - the API check (tools/api_check.py) of the upstream surface the overlay uses.

FROM and TO are git refs of the Megatron-LM checkout (`--tree`, default the submodule), or
megatron-core versions (0.19.2, or `latest` = the newest on the package index). A version is
the tag core_vX when the checkout has it, else the release from the package index (wheel or
sdist; core files only, so both sides are then compared as megatron/core only). Defaults: FROM
is the pin of patches/upstream.lock (its megatron-core version without a checkout), TO `latest`.

Exit status: 0, or 1 on error or when --check-pin is given and the series fails on the pin.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api_check  # noqa: E402
import upstream_src as U  # noqa: E402

import patches as P  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ATTENTION = "megatron/core/transformer/attention.py"
MOE = "megatron/core/transformer/moe/"
MAX_FILES = 60  # rows of the "rest of megatron/core" list


def symbol_spans(text: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every class and function in a module."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")

    visit(tree, "")
    return out


def enclosing(spans, line: int) -> str:
    best = None
    for lo, hi, name in spans:
        if lo <= line <= hi and (best is None or lo >= best[0]):
            best = (lo, name)
    return best[1] if best else "<module level>"


def hunk_summary(repo: Path, old: str, new: str, rel: str) -> list[str]:
    """One line per changed symbol: `name`: +added -removed (hunks)."""
    diff = U.git(repo, "diff", "-U0", old, new, "--", rel)
    new_text = U.git(repo, "show", f"{new}:{rel}", check=False)
    old_text = U.git(repo, "show", f"{old}:{rel}", check=False)
    if not new_text and not old_text:
        return []
    if not new_text:
        return ["file removed"]
    if not old_text:
        return ["file added"]
    new_spans, old_spans = symbol_spans(new_text), symbol_spans(old_text)
    per: dict[str, list[int]] = {}
    for m in re.finditer(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", diff, flags=re.M):
        a, b = int(m.group(1)), int(m.group(2) or 1)
        c, d = int(m.group(3)), int(m.group(4) or 1)
        name = enclosing(new_spans, c) if d else enclosing(old_spans, a)
        acc = per.setdefault(name, [0, 0, 0])
        acc[0] += d
        acc[1] += b
        acc[2] += 1
    old_names = {n for _, _, n in old_spans}
    new_names = {n for _, _, n in new_spans}
    lines = [
        f"`{n}`: +{v[0]} -{v[1]} ({v[2]} hunk{'s' if v[2] > 1 else ''})"
        for n, v in sorted(per.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
    ]
    gone = sorted(old_names - new_names)
    born = sorted(new_names - old_names)
    if gone:
        lines.append("removed: " + ", ".join(f"`{n}`" for n in gone))
    if born:
        lines.append("added: " + ", ".join(f"`{n}`" for n in born))
    return lines


def section(repo: Path, old: str, new: str, title: str, paths: list[str]) -> list[str]:
    stat = U.git(repo, "diff", "--stat=110", old, new, "--", *paths).rstrip()
    out = [f"### {title}", ""]
    if not stat:
        return out + ["No change.", ""]
    out += ["```", stat, "```", ""]
    files = U.git(repo, "diff", "--name-only", old, new, "--", *paths).split()
    for rel in files:
        summary = hunk_summary(repo, old, new, rel)
        out.append(f"- `{rel}`")
        out += [f"  - {s}" for s in summary[:25]]
        if len(summary) > 25:
            out.append(f"  - ... {len(summary) - 25} more")
    return out + [""]


def pin_status(
    pin: U.Side, repo: Path | None, pdir: Path, scratch: U.Scratch, old: U.Side
) -> tuple[bool, str]:
    """Does the series apply (zero fuzz, lock hashes, refresh no-op) to the pin itself?"""
    touched = sorted({f for p in P.read_series(pdir) for f in p.files})
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "pin"
        if (pin.kind, pin.commit, pin.version if pin.kind == "index" else None) == (
            old.kind,
            old.commit,
            old.version if old.kind == "index" else None,
        ):
            P.pristine_from_git(scratch.repo, scratch.old, touched, tree)
        else:
            U.materialize(pin, repo, tree, [] if pin.kind == "index" else touched)
        log: list[str] = []
        try:
            P.check(tree, pdir, log=log.append)
            return True, "\n".join(log)
        except P.PatchError as e:
            return False, str(e)


def build_report(args) -> tuple[str, bool, str]:
    """(markdown, pin ok, one-paragraph summary)."""
    pdir, repo = args.patches.resolve(), args.tree.resolve()
    repo = repo if U.is_git_repo(repo) else None
    lock = P.read_lock(pdir)
    pin_spec = (
        lock["commit"] if repo and U.resolve_commit(repo, lock["commit"]) else lock["megatron-core"]
    )
    from_spec = args.old or pin_spec
    to_spec = args.new or "latest"
    if to_spec == "latest":
        to_spec = U.latest_core_version()
    if from_spec == "latest":
        from_spec = U.latest_core_version()
    old, new = U.resolve_side(from_spec, repo), U.resolve_side(to_spec, repo)
    pin = U.resolve_side(pin_spec, repo)
    series = P.read_series(pdir)
    touched = sorted({f for p in series for f in p.files})
    with tempfile.TemporaryDirectory() as tmp:
        sc = U.build_scratch(
            old, new, repo, [f for f in touched if not f.startswith(U.CORE)], Path(tmp) / "scratch"
        )
        pin_ok, pin_log = pin_status(pin, repo, pdir, sc, old)
        results = P.replay_3way(sc.repo, sc.old, pdir, stop_on_conflict=False, log=lambda m: None)
        U.git(sc.repo, "reset", "-q", "--hard")
        verdicts = api_check.check(
            args.overlay.resolve(),
            api_check.GitSource(sc.repo, sc.old, old.label),
            api_check.GitSource(sc.repo, sc.new, new.label),
        )
        shortstat = U.git(sc.repo, "diff", "--shortstat", sc.old, sc.new, "--", U.CORE).strip()
        body = []
        body += section(
            sc.repo, sc.old, sc.new, "megatron/core/transformer/attention.py", [ATTENTION]
        )
        body += section(sc.repo, sc.old, sc.new, "megatron/core/transformer/moe/", [MOE])
        others = [f for f in touched if f != ATTENTION and not f.startswith(MOE)]
        body += section(sc.repo, sc.old, sc.new, "Files the patch series touches", others)
        numstat = U.git(sc.repo, "diff", "--numstat", sc.old, sc.new, "--", U.CORE)
        rest = [
            r
            for r in (line.split("\t") for line in numstat.splitlines())
            if r[2] != ATTENTION and not r[2].startswith(MOE) and r[2] not in touched
        ]
    kinds = ("breaking", "compatible", "unchanged", "unresolved")
    counts = {k: sum(v.verdict == k for v in verdicts) for k in kinds}
    status = {r.patch: r.status_text for r in results}
    bad = [r.patch for r in results if r.status in ("conflict", "not-tried")]
    drop = [r.patch for r in results if r.status == "upstream"]
    mode = "core-only (megatron/core of both sides)" if sc.core_only else "full tree (git)"
    summary = (
        f"upstream {old.label} -> {new.label}: megatron/core {shortstat or 'unchanged'}; "
        f"series on the pin: {'applies' if pin_ok else 'FAILS'}; at TO: "
        + ", ".join(f"{n} {s}" for n, s in status.items())
        + f"; API: {counts['breaking']} breaking, {counts['compatible']} compatible, "
        f"{counts['unchanged']} unchanged, {counts['unresolved']} unresolved"
    )
    md = [
        f"# Upstream diff report: {old.label} -> {new.label}",
        "",
        f"Generated by `{args.command_line}` (mode: {mode}).",
        "",
        "## Summary",
        "",
        f"- megatron/core: {shortstat or 'no change'}",
        f"- The series on the pin ({pin.label}): "
        + ("applies with no fuzz, lock matches, refresh is a no-op" if pin_ok else "FAILS"),
        f"- The series at {new.label}: "
        + (
            f"does NOT apply: {', '.join(bad)}"
            if bad
            else ("applies without the patches fixed upstream" if drop else "every patch applies")
            + f" ({', '.join(sorted({status[r.patch] for r in results if r.patch not in drop}))})"
        )
        + (f"; fixed upstream, drop: {', '.join(drop)}" if drop else ""),
        f"- API check: {counts['breaking']} breaking, {counts['compatible']} compatible, "
        f"{counts['unchanged']} unchanged, {counts['unresolved']} unresolved",
        "",
        "## The patch series",
        "",
        "| patch | at the pin | at TO | failing hunks | notes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        hunks = "<br>".join(h.describe().replace("|", "\\|") for h in r.failed) or "-"
        extra = f" (conflicts in {', '.join(r.conflicted)})" if r.conflicted else ""
        if r.status == "upstream":
            extra = f" ({r.message})"
        notes = "<br>".join(n.replace("|", "\\|") for n in r.notes) or "-"
        md.append(
            f"| {r.patch} | {'ok' if pin_ok else 'see below'} | {r.status_text}{extra} "
            f"| {hunks} | {notes} |"
        )
    md += [
        "",
        "Status at TO: clean = `git apply` with no fuzz; 3way = applies only with "
        "`git apply --3way` (run `make rebase-upstream` and the patch is refreshed); conflict = "
        "must be ported by hand; fixed upstream: drop it = TO already has the change, or its "
        "probe no longer finds the bug the patch fixes (`make rebase-upstream` drops it); "
        "skipped = touches files absent in core-only mode. A patch after a conflicting one is "
        "tried on the files without it (noted).",
        "",
    ]
    if not pin_ok:
        md += ["Series on the pin:", "```", pin_log, "```", ""]
    md += ["## Upstream changes", ""] + body
    md += ["### The rest of megatron/core", ""]
    if rest:
        md += ["| file | + | - |", "|---|---|---|"]
        md += [f"| `{r[2]}` | {r[0]} | {r[1]} |" for r in rest[:MAX_FILES]]
        if len(rest) > MAX_FILES:
            md.append(f"| ... {len(rest) - MAX_FILES} more files | | |")
    else:
        md.append("No other change.")
    md += ["", "## API check", "", api_check.to_markdown(verdicts, old.label, new.label)]
    return "\n".join(md), pin_ok, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--from", dest="old", help="git ref or megatron-core version (default: the pin)"
    )
    ap.add_argument("--to", dest="new", help="git ref, megatron-core version, or latest (default)")
    ap.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    ap.add_argument("--tree", type=Path, default=ROOT / "Megatron-LM", help="Megatron-LM checkout")
    ap.add_argument("--patches", type=Path, default=ROOT / "patches")
    ap.add_argument("--overlay", type=Path, default=ROOT / "overlay" / "fluid")
    ap.add_argument(
        "--check-pin",
        action="store_true",
        help="exit 1 when the series does not apply to the pin (CI)",
    )
    args = ap.parse_args(argv)
    args.command_line = "tools/diff_report.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    try:
        md, pin_ok, summary = build_report(args)
    except (RuntimeError, P.PatchError, subprocess.CalledProcessError) as e:
        print(f"diff-report: {e}", file=sys.stderr)
        return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        print(f"diff-report: wrote {args.out}")
    else:
        print(md)
    print(f"diff-report: {summary}", file=sys.stderr if not args.out else sys.stdout)
    if args.check_pin and not pin_ok:
        print("diff-report: the pinned series no longer applies to the pin", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
