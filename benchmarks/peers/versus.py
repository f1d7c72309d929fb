"""FluidMoE against torchtitan on one end-to-end recipe's model, alternating in one job.

    python3 -m benchmarks.peers.versus --recipe e2e_fine_1gpu [--variant fluid] [--link nvlink] \\
        [--compile on] [--rounds 2] [--iters 12] [--peers-site /tmp/peers] --out OUT \\
        [--budget-s 550] [--dry-run]

Why: the 1-GPU hosts' speed drifts by up to 20% within half an hour (docs/benchmarks/peers.md,
raw/s13), so a ratio of two frameworks measured one after the other says as much about the host
as about either. The two sides run in ABBA order (torchtitan, FluidMoE, FluidMoE, torchtitan,
...; benchmarks.ab.abba_order), so a drift linear in time weighs both equally, and each round
pair gives its own ratio, whose spread says whether the difference is larger than the drift.

- FluidMoE: `python -m benchmarks.run RECIPE --links LINK --variants VARIANT --iters N` from this
  tree (its overlay first on PYTHONPATH, benchmarks/tree.py); iteration times after the recipe's
  warm-up.
- torchtitan: `benchmarks/peers/torchtitan/run.py --models MODEL --compile on|off --steps N
  --nproc P --ep EP` with the link's environment (benchmarks.recipes.LINKS, BASE_ENV) and
  `--peers-site` (where the torchtitan wheels were installed: `pip install --target`) first on
  PYTHONPATH; step times after its warm-up steps.

Writes OUT/versus_<recipe>_<variant>_<link>.json after every run: per run its side, round,
median ms and iteration times; the summary (benchmarks.ab.summarize with sides torchtitan and
fluid): pooled medians, `fluid_speedup` (torchtitan's pooled median over FluidMoE's; above 1:
FluidMoE faster), `round_speedups`, and model TFLOP/s per GPU of both by one formula
(fluid.testing.bench.flops). A round starts only if both its runs fit in --budget-s
(benchmarks.ab.starts). Recipes with context parallelism have no torchtitan side (refused).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TT_RUN = ROOT / "benchmarks" / "peers" / "torchtitan" / "run.py"
TT_WARMUP = 3


def torchtitan_command(recipe, compile_on: bool, steps: int, out: Path) -> list:
    return [
        sys.executable, str(TT_RUN), "--models", recipe.model,
        "--compile", "on" if compile_on else "off", "--steps", str(steps),
        "--warmup", str(TT_WARMUP), "--nproc", str(recipe.nproc), "--ep", str(recipe.ep),
        "--timeout", "150", "--timeout-compile", "240",
        "--out", str(out), "--logs", str(out.parent / "logs"),
    ]  # fmt: skip


def fluid_command(recipe, variant, link, iters, out: Path, budget_s: float, commit=None) -> list:
    cmd = [
        sys.executable, "-m", "benchmarks.run", recipe.name, "--links", link,
        "--variants", variant, "--iters", str(iters), "--out", str(out),
        "--budget-s", str(budget_s),
    ]  # fmt: skip
    return cmd + (["--commit", commit] if commit else [])


def torchtitan_env(link: str, peers_site: str) -> dict:
    """The link's environment, torchtitan's wheels and this tree's overlay (the FLOP formula and
    models run.py imports) first on PYTHONPATH."""
    from benchmarks import recipes as R

    env = {**os.environ, **R.BASE_ENV, **R.LINKS[link]}
    paths = [peers_site, str(ROOT / "overlay")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def torchtitan_result(path: Path, model: str, compile_on: bool):
    """(median ms, step times ms after the warm-up) of run.py's record, or None."""
    try:
        recs = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for rec in recs:
        if rec.get("model") == model and rec.get("compile") == compile_on and "error" not in rec:
            times = [1000.0 * t for t in rec["step_times_s"][rec.get("warmup_steps", TT_WARMUP) :]]
            if times:
                return round(statistics.median(times), 2), times
    return None


def summarize(runs: list, recipe) -> dict:
    from benchmarks.ab import summarize as ab_summarize
    from fluid.testing.bench.flops import tflops_per_gpu
    from fluid.testing.bench.models import MODELS

    s = ab_summarize(runs, base="torchtitan", head="fluid")
    r = s.pop("head_over_base")
    s["fluid_speedup"] = round(1.0 / r, 4) if r else None
    s["round_speedups"] = [round(1.0 / x, 4) for x in s.pop("round_ratios")]
    m = MODELS[recipe.model]
    tokens = m.global_batch(recipe.dp) * m.seq // recipe.nproc
    for side in ("torchtitan", "fluid"):
        ms = s[side]["pooled_median_ms"]
        s[side]["tflops_per_gpu"] = round(tflops_per_gpu(m, tokens, ms / 1000.0), 1) if ms else None
    s["tokens_per_gpu_per_step"] = tokens
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True, help="an end-to-end recipe (benchmarks/recipes.py)")
    ap.add_argument("--variant", default="fluid", help="FluidMoE's variant")
    ap.add_argument("--link", default="nvlink")
    ap.add_argument("--compile", default="on", choices=("on", "off"), help="torchtitan's")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=12, help="FluidMoE iterations, torchtitan steps")
    ap.add_argument("--peers-site", default="/tmp/peers", help="torchtitan's wheels (pip --target)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=550.0, help="a round starts only if it fits")
    ap.add_argument("--commit", default=None, help="FluidMoE's commit, for a host without git")
    ap.add_argument("--dry-run", action="store_true", help="the plan only")
    a = ap.parse_args(argv)
    from benchmarks import recipes as R
    from benchmarks.ab import PlannedRun, abba_order, run_alternating
    from benchmarks.ab import run_result as fluid_result
    from benchmarks.tree import with_tree_path

    recipe = R.RECIPES.get(a.recipe)
    if not isinstance(recipe, R.E2ERecipe):
        raise SystemExit(f"--recipe: {a.recipe!r} is not an end-to-end recipe")
    if recipe.cp > 1:
        raise SystemExit(
            f"--recipe: {a.recipe} uses context parallelism; torchtitan's peer has none"
        )
    if a.link not in recipe.links or a.link not in R.LINKS:
        raise SystemExit(f"--link: {a.link!r} is not one of {a.recipe}'s links {recipe.links}")
    if R.base_variant(a.variant) not in R.VARIANTS:
        raise SystemExit(f"--variant: unknown {a.variant!r}")
    if a.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    compile_on = a.compile == "on"
    t0 = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    doc: dict = {
        "meta": {
            "command": "python -m benchmarks.peers.versus "
            + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "recipe": a.recipe,
            "model": recipe.model,
            "variant": a.variant,
            "link": a.link,
            "torchtitan_compile": compile_on,
            "iters": a.iters,
            "rounds": a.rounds,
            "commit": a.commit,
            "order": "ABBA",
        },
        "plan": [],
        "runs": [],
    }
    path = a.out / f"versus_{a.recipe}_{a.variant}_{a.link}.json"
    envs = {
        "torchtitan": torchtitan_env(a.link, a.peers_site),
        "fluid": with_tree_path(dict(os.environ)),
    }

    def plan(rnd, side, left):
        if side == "torchtitan":
            out = a.out / "runs" / f"torchtitan_{rnd}.json"
            cmd = torchtitan_command(recipe, compile_on, a.iters, out)
            result = lambda: torchtitan_result(out, recipe.model, compile_on)  # noqa: E731
        else:
            out = a.out / "runs" / f"fluid_{rnd}"
            cmd = fluid_command(recipe, a.variant, a.link, a.iters, out, max(left, 0.0), a.commit)
            result = lambda: fluid_result(out, a.recipe, a.variant)  # noqa: E731
        return PlannedRun(
            cmd, ROOT, envs[side], result, lambda: out.parent.mkdir(parents=True, exist_ok=True)
        )

    run_alternating(
        abba_order(a.rounds, "torchtitan", "fluid"), plan, doc, path, budget_s=a.budget_s,
        t0=t0, dry_run=a.dry_run, summarize=lambda runs: summarize(runs, recipe), tag="versus",
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
