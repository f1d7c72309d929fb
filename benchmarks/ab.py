"""Two commits of FluidMoE on one end-to-end recipe, alternating on one machine: did a change help?

    python -m benchmarks.ab --base 2a71cfe --head d7f6205 --recipe e2e_fine_1gpu \\
        [--variant fluid] [--rounds 4] [--iters 10] --out OUT [--snapshots DIR]
        [--budget-s 550] [--dry-run]

On a GPU host (its copy of the tree has no .git) make the snapshots here first,
`python -m benchmarks.ab ... --snapshots .ab --out /tmp/ab --dry-run` (`.ab/` is git-ignored;
carry it), then run the same command there without `--dry-run`, `--out` under $OUT; give
--base and --head as commit ids (there is no git there to resolve `HEAD~1`).

Why: a change that does not add a flag (a host-side cut, a kernel swap with the same values) can
only be timed against the commit before it, and on the 1-GPU hosts an unchanged program's step
time drifted by 16% within minutes (docs/benchmarks/peers.md), more than such changes move it.
So the two sides run in ABBA order (base, head, head, base, base, head, ...): a drift that is
linear in time then weighs both sides equally. Each run is `python -m benchmarks.run RECIPE
--variants VARIANT --iters N` from a snapshot of its commit (`git archive`, plus the staged
Megatron tree and wheels linked at run time from the checkout it runs in: `.megatron`, `.whl`,
`.whl-peers`), so both
sides share Megatron and the environment and differ only in the commit's own files. Each side's
runs get its snapshot's `overlay/` first on PYTHONPATH, and before any run the tool checks that
`import fluid` resolves inside that snapshot (recorded as `meta.<side>_fluid`).

Writes OUT/ab_<recipe>_<variant>.json after every run (a budget or timeout keeps what finished):
per run its side, round, median ms and post-warm-up iteration times (`iters_ms` of the run's
JSON), and the summary (`summarize`): each side's pooled median of all its iterations, head over
base (below 1: head is faster), and the ratio per round pair (same round, adjacent in time),
whose spread says whether the difference is larger than the drift. `--dry-run` writes the
snapshots and the plan (every command) without running anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
LINKED = (".megatron", ".whl", ".whl-peers")  # staged outside git, shared by both snapshots


def abba_order(rounds: int, base: str = "base", head: str = "head") -> list:
    """[(round, side)]: base, head in even rounds and head, base in odd ones."""
    out = []
    for r in range(rounds):
        sides = (base, head) if r % 2 == 0 else (head, base)
        out += [(r, s) for s in sides]
    return out


def summarize(runs: list, base: str = "base", head: str = "head") -> dict:
    """The comparison from finished runs [{side, round, ms, iters_ms}] (see the module doc);
    `base` and `head` name the two sides (benchmarks.peers.versus: torchtitan against FluidMoE)."""
    pooled = {s: [x for r in runs if r["side"] == s for x in r["iters_ms"]] for s in (base, head)}
    out: dict = {
        s: {"runs_ms": [r["ms"] for r in runs if r["side"] == s], "iterations": len(v)}
        for s, v in pooled.items()
    }
    for s, v in pooled.items():
        out[s]["pooled_median_ms"] = round(statistics.median(v), 2) if v else None
    b, h = out[base]["pooled_median_ms"], out[head]["pooled_median_ms"]
    out["head_over_base"] = round(h / b, 4) if b and h else None
    by_round: dict = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["side"]] = r["ms"]
    out["round_ratios"] = [
        round(v[head] / v[base], 4)
        for _, v in sorted(by_round.items())
        if v.get(base) and v.get(head)
    ]
    return out


def snapshot(rev: str, dest: Path) -> str:
    """`git archive` of `rev` into `dest` (marked with its commit in `dest/.ab_commit`); returns
    the full commit id. A `dest` already marked with `rev` is reused as it is: a GPU host's copy
    of the tree has no .git, so the snapshots are made beside the checkout (a dry run) and
    carried there."""
    mark = dest / ".ab_commit"
    if mark.exists():
        sha = mark.read_text().strip()
        if sha.startswith(rev) or _rev_parse(rev) == sha:
            return sha
        raise SystemExit(f"ab: {dest} holds {sha[:12]}, not {rev}: use another --snapshots folder")
    sha = _rev_parse(rev)
    if sha is None:
        raise SystemExit(f"ab: cannot resolve {rev!r} (no git here?) and {dest} holds no snapshot")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    mark.write_text(sha + "\n")
    return sha


def _rev_parse(rev: str):
    proc = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def link_staged(snap: Path) -> None:
    """Link LINKED (the staged Megatron tree, wheels) from this checkout into `snap`, replacing
    links made elsewhere (a snapshot carried to another machine)."""
    for name in LINKED:
        target, link = ROOT / name, snap / name
        if link.is_symlink():
            link.unlink()
        if target.exists() and not link.exists():
            link.symlink_to(target)


def fluid_origin(snap: Path, env: dict) -> str:
    """The directory `import fluid` resolves to in `snap` under `env` (checked before any run)."""
    code = "import os, fluid; print(os.path.dirname(os.path.abspath(fluid.__file__)))"
    return (
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=snap,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )


def starts(left_s: float, second_of_round: bool, longest_s: float) -> bool:
    """Whether a run starts with `left_s` seconds of the budget left. benchmarks.run skips an
    end-to-end variant with less than E2E_MIN_LEFT_S of its own budget left (checked a few
    seconds after it starts), so a run needs that much, or the longest run so far if longer; a
    round's first run needs room for the round's second too, since a half round gives one side
    an extra run that the ABBA order does not balance (the caller skips a second whose first
    did not run)."""
    from benchmarks.run import E2E_MIN_LEFT_S

    one = max(E2E_MIN_LEFT_S + START_MARGIN_S, longest_s)
    return left_s >= (one if second_of_round else 2 * one)


START_MARGIN_S = 10.0  # a run's start-up before benchmarks.run checks its budget


@dataclasses.dataclass
class PlannedRun:
    """One run of an alternating job: the command, where and with what environment it runs,
    `result()` -> (median ms, iteration times ms) or None once it ran, and `before()` (make its
    output folder) called only if it runs."""

    cmd: list
    cwd: Path
    env: dict
    result: Callable[[], Optional[tuple]]
    before: Optional[Callable[[], None]] = None


def run_alternating(order, plan, doc: dict, path: Path, *, budget_s, t0, dry_run, summarize, tag):
    """Run `order` ([(round, side)], e.g. abba_order) one run after another: `plan(round, side,
    left_s)` gives each PlannedRun; a run starts only if `starts` says the budget allows it (a
    round whole or not at all). Appends to doc["plan"] (the command, or why it was skipped) and
    doc["runs"] (side, round, rc, ms, iters_ms), sets doc["summary"] = summarize(finished runs)
    and writes `path` after every run and at the end."""
    longest = 0.0
    for i, (rnd, side) in enumerate(order):
        left = budget_s - (time.monotonic() - t0)
        run_plan = plan(rnd, side, left)
        doc["plan"].append(
            {"round": rnd, "side": side, "cwd": str(run_plan.cwd), "cmd": run_plan.cmd}
        )
        if dry_run:
            continue
        second = i % 2 == 1
        if not starts(left, second, longest) or (second and "skipped" in doc["plan"][-2]):
            doc["plan"][-1]["skipped"] = "budget"
            continue
        if run_plan.before is not None:
            run_plan.before()
        t_run = time.monotonic()
        proc = subprocess.run(run_plan.cmd, cwd=run_plan.cwd, env=run_plan.env)
        longest = max(longest, time.monotonic() - t_run)
        got = run_plan.result()
        run = {"round": rnd, "side": side, "rc": proc.returncode}
        if got is not None:
            run["ms"], run["iters_ms"] = got
        doc["runs"].append(run)
        doc["summary"] = summarize([r for r in doc["runs"] if "ms" in r])
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{tag}: round {rnd} {side}: {run.get('ms')} ms (rc {proc.returncode})", flush=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")  # the plan with what the budget skipped
    print(json.dumps(doc.get("summary", {}), indent=1))


def run_command(recipe: str, variant: str, iters: int, sha: str, out: Path, budget_s: float):
    return [
        sys.executable, "-m", "benchmarks.run", recipe, "--variants", variant,
        "--iters", str(iters), "--commit", sha, "--out", str(out), "--budget-s", str(budget_s),
    ]  # fmt: skip


def run_result(run_out: Path, recipe: str, variant: str):
    """(median ms, iteration times) of the variant in a benchmarks.run output, or None."""
    try:
        doc = json.loads((run_out / f"{recipe}.json").read_text())
    except (OSError, ValueError):
        return None
    for link in doc.get("links", {}).values():
        v = link.get("variants", {}).get(variant)
        if v and v.get("ms") is not None:
            return v["ms"], list(v.get("iters_ms") or [])
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit before the change")
    ap.add_argument("--head", required=True, help="the commit with it")
    ap.add_argument("--recipe", required=True, help="an end-to-end recipe (benchmarks/recipes.py)")
    ap.add_argument("--variant", default="fluid")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--snapshots",
        type=Path,
        default=None,
        help="where snap_base/, snap_head/ are (default OUT)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=550.0,
        help="seconds for all runs: a round starts only if both its runs fit",
    )
    ap.add_argument("--dry-run", action="store_true", help="snapshots and plan only")
    a = ap.parse_args(argv)
    from benchmarks import recipes as R
    from benchmarks.tree import with_tree_path

    if a.recipe not in R.RECIPES or not isinstance(R.RECIPES[a.recipe], R.E2ERecipe):
        raise SystemExit(f"--recipe: {a.recipe!r} is not an end-to-end recipe")
    if a.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    t0 = time.monotonic()
    snaps = a.snapshots or a.out
    a.out.mkdir(parents=True, exist_ok=True)
    shas = {
        s: snapshot(rev, snaps / f"snap_{s}") for s, rev in (("base", a.base), ("head", a.head))
    }
    doc: dict = {
        "meta": {
            "command": "python -m benchmarks.ab "
            + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "base": shas["base"],
            "head": shas["head"],
            "recipe": a.recipe,
            "variant": a.variant,
            "iters": a.iters,
            "rounds": a.rounds,
            "order": "ABBA",
        },  # fmt: skip
        "plan": [],
        "runs": [],
    }
    path = a.out / f"ab_{a.recipe}_{a.variant}.json"
    envs = {}
    for side in ("base", "head"):
        snap = (snaps / f"snap_{side}").resolve()
        link_staged(snap)
        # Set here, not left to the snapshot's benchmarks.run: a commit from before
        # benchmarks/tree.py passes its children the caller's PYTHONPATH, where
        # benchmarks/gpu_env.sh put this checkout's overlay.
        envs[side] = with_tree_path(dict(os.environ), snap)
        origin = fluid_origin(snap, envs[side])
        if not Path(origin).is_relative_to(snap):
            raise SystemExit(f"ab: the {side} snapshot imports fluid from {origin}, not {snap}")
        doc["meta"][f"{side}_fluid"] = origin

    def plan(rnd, side, left):
        run_out = a.out / "runs" / f"{side}_{rnd}"
        cmd = run_command(a.recipe, a.variant, a.iters, shas[side], run_out, max(left, 0.0))
        return PlannedRun(
            cmd,
            snaps / f"snap_{side}",
            envs[side],
            lambda: run_result(run_out, a.recipe, a.variant),
        )

    run_alternating(
        abba_order(a.rounds), plan, doc, path, budget_s=a.budget_s, t0=t0, dry_run=a.dry_run,
        summarize=summarize, tag="ab",
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
