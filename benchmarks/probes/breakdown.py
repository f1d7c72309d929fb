"""Probe (not a benchmark): where one training iteration's time goes, stock against Fluid, from a
GPU timeline.

    python3 -m benchmarks.probes.breakdown --recipes e2e_mixtral_1gpu,e2e_fine_1gpu \
        --variants stock,fluid --out OUT [--step 5] [--budget-s 500]
    python3 -m benchmarks.probes.breakdown --recipes e2e_mixtral_1gpu --dry-run   # CPU: argv, JSON
    python3 -m benchmarks.probes.breakdown --print-command   # the one-call GPU command

Per recipe (benchmarks/recipes.py, end-to-end) and variant: one torchrun of stock
`pretrain_gpt.py` with the recipe's flags (benchmarks/e2e_job.variant_argv) plus Megatron's
PyTorch-profiler flags, `--profile --use-pytorch-profiler --profile-step-start N
--profile-step-end N+1 --profile-ranks 0 .. nproc-1 --tensorboard-dir D/tb`, and `--train-iters
N+1`. Megatron (training.py at the pin) then records iteration N (`ProfilerStep#N`) on every rank
and writes it with `export_chrome_trace` to `D/torch_profile/rank-<r>.json.gz`: plain JSON, no
tensorboard package (Megatron's tensorboard writer is skipped with a warning when the package is
missing). The breakdown is rank 0's, with `host_pace` (each module's host time beside the GPU
time it launched, and the host's waits for the device); with several ranks, `peer_wait` (from
every rank's trace) splits each rank's all-to-all kernel time into waiting for the other ranks
and the rest.

The script runs under this module's `--worker` mode, which installs
`fluid.testing.bench.breakdown.module_scope_hooks` (an `nn.Module: <Class>` range around every
module's forward, which the categorizer needs to tell expert GEMMs from dense ones) and then runs
`pretrain_gpt.py` as `__main__`: no patch, and no `with_stack` Python tracer inflating host time.

The trace goes through `fluid.testing.bench.breakdown`; OUT/breakdown_<recipe>.json (per variant:
the breakdown, the logged per-iteration ms, rc) and OUT/breakdown_<recipe>.md (the table) are
written after every run, so a timeout keeps what finished; the trace itself is kept as
OUT/trace_<recipe>_<variant>.json.gz when under --keep-trace-mb. The profiled iteration is slower
than the others (profiler overhead): compare its logged ms with the neighbours' in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_RECIPES = ("e2e_mixtral_1gpu", "e2e_fine_1gpu")


def profile_flags(step: int, tb_dir, nproc: int = 1) -> list:
    """Megatron's PyTorch-profiler flags recording iteration `step` on every rank: the breakdown is
    rank 0's, the other ranks' traces give `peer_wait` (profiling one rank only would also slow
    that rank's host alone and skew the ranks against each other)."""
    return [
        "--profile",
        "--use-pytorch-profiler",
        "--profile-step-start",
        str(step),
        "--profile-step-end",
        str(step + 1),
        "--profile-ranks",
        *(str(r) for r in range(nproc)),
        "--tensorboard-dir",
        str(tb_dir),
    ]


def probe_argv(recipe, variant: str, step: int, tb_dir, link: str = "nvlink") -> list:
    """pretrain_gpt.py arguments of one run: the recipe's variant for step+1 iterations over
    `link` (an emulated link is a flag), profiled."""
    from benchmarks import e2e_job

    return e2e_job.variant_argv(recipe, variant, step + 1, link) + profile_flags(
        step, tb_dir, recipe.nproc
    )


def torchrun_cmd(recipe, script, argv: list) -> list:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={recipe.nproc}",
        "-m",
        "benchmarks.probes.breakdown",
        "--worker",
        str(script),
        *argv,
    ]


def trace_path(tb_dir, rank: int = 0) -> Path:
    """Where Megatron's trace handler writes a rank's trace: `{tensorboard_dir}/../torch_profile`."""
    return Path(tb_dir).parent / "torch_profile" / f"rank-{rank}.json.gz"


def dry_run(names, step: int, variants=("stock", "fluid_off", "fluid"), link="nvlink") -> dict:
    """Every run's command line and environment; the recipe's own flags checked by
    e2e_job.check_flag_names, the whole argv by Megatron's parse_args + validate_args where
    megatron.training is importable."""
    from benchmarks import e2e_job
    from benchmarks import recipes as R

    out = {}
    for r in R.select(names):
        if r.kind != "e2e":
            raise SystemExit(f"{r.name} is not an end-to-end recipe")
        out[r.name] = {}
        check_link(r, link)
        for v in variants:
            base = e2e_job.variant_argv(r, v, step + 1, link)
            bad = e2e_job.check_flag_names(base)
            if bad:
                raise SystemExit(f"{r.name} {v}: unknown flag(s) {bad}")
            tb = Path("WORK") / f"{r.name}_{v}" / "tb"
            argv = probe_argv(r, v, step, tb, link)
            out[r.name][v] = {
                "argv": argv,
                "cmd": torchrun_cmd(r, "PRETRAIN_GPT", argv),
                "env": run_env(link, v, {}),
                "trace": str(trace_path(tb)),
                "megatron_parse": e2e_job.megatron_validate(argv, r.nproc),
            }
    return out


def gpu_command(
    recipes=DEFAULT_RECIPES, variants="stock,fluid", budget_s: int = 500, commit=None, link="nvlink"
) -> str:
    """The one device call (repository root of the GPU host, `.megatron` and `.whl` carried)."""
    return (
        "source benchmarks/gpu_env.sh && timeout 560 python3 -m benchmarks.probes.breakdown "
        f"--recipes {','.join(recipes)} --variants {variants} --out $OUT --budget-s {budget_s}"
        + (f" --link {link}" if link != "nvlink" else "")
        + (f" --commit {commit}" if commit else "")
    )


def run_env(link: str, variant: str, base: dict) -> dict:
    """A run's environment: `base` (the caller's), the recipes' BASE_ENV, the link's (P2P off and
    NCCL channels: benchmarks.recipes.LINKS) and the variant's (the combined-1F1B variants' 32
    hardware queues), as benchmarks.run gives the same run."""
    from benchmarks import recipes as R
    from benchmarks.tree import with_tree_path

    return with_tree_path({**base, **R.BASE_ENV, **R.LINKS[link], **R.variant_env(variant)})


def check_link(recipe, link: str) -> None:
    """Refuse, before any run, a link the recipe does not list."""
    if link not in recipe.links:
        raise SystemExit(
            f"{recipe.name} has no link {link!r} (its links: {', '.join(recipe.links)})"
        )


def out_name(recipe: str, link: str) -> str:
    """File stem of a recipe's results: the recipe, and the link where it is not NVLink."""
    return recipe if link == "nvlink" else f"{recipe}_{link}"


def _run_one(
    recipe, variant, step, work: Path, out: Path, timeout, keep_mb, script=None, link="nvlink"
) -> dict:
    from benchmarks import e2e_job
    from fluid.testing.bench.breakdown import (
        all_to_all_spans,
        breakdown,
        host_pace,
        load,
        peer_wait,
    )
    from fluid.testing.bench.launch import parse_megatron_log, run_logged

    d = work / f"{recipe.name}_{variant}"
    shutil.rmtree(d, ignore_errors=True)
    (d / "tb").mkdir(parents=True)
    argv = probe_argv(recipe, variant, step, d / "tb", link)
    cmd = torchrun_cmd(recipe, script or e2e_job.pretrain_script(), argv)
    env = run_env(link, variant, dict(os.environ))
    name = out_name(recipe.name, link)
    log = out / f"breakdown_{name}_{variant}.log"
    r = run_logged(cmd, env, log, cwd=ROOT, timeout=timeout)
    its = parse_megatron_log(log.read_text())
    res = {**r, "argv": argv, "iters_ms": {str(i): v.get("ms") for i, v in sorted(its.items())}}
    tp = trace_path(d / "tb")
    if not tp.exists():
        res["error"] = f"no trace at {tp}"
        return res
    res["trace_mb"] = round(tp.stat().st_size / 2**20, 2)
    trace = tp  # read once below: breakdown, host_pace and peer_wait all use rank 0's
    try:
        trace = load(tp)
        res["breakdown"] = breakdown(trace, step=step)
    except Exception as exc:  # keep the run's other results
        res["error"] = f"breakdown: {type(exc).__name__}: {exc}"
    try:
        res["host_pace"] = host_pace(trace, step=step)
    except Exception as exc:
        res["host_pace"] = {"error": f"{type(exc).__name__}: {exc}"}
    others = [trace_path(d / "tb", r) for r in range(1, recipe.nproc)]
    if others and all(p.exists() for p in others):
        try:
            res["peer_wait"] = peer_wait(
                {r: all_to_all_spans(t, step=step) for r, t in enumerate([trace, *others])}
            )
        except Exception as exc:
            res["peer_wait"] = {"error": f"{type(exc).__name__}: {exc}"}
    if res["trace_mb"] <= keep_mb:
        shutil.copy(tp, out / f"trace_{name}_{variant}.json.gz")
    shutil.rmtree(d, ignore_errors=True)
    return res


def _write(out: Path, name: str, doc: dict) -> None:
    from fluid.testing.bench.breakdown import host_pace_markdown, markdown

    (out / f"breakdown_{name}.json").write_text(json.dumps(doc, indent=1))
    done = {v: r["breakdown"] for v, r in doc["variants"].items() if "breakdown" in r}
    text = f"# {name}: one iteration (step {doc['step']}), rank 0\n\n"
    text += markdown(done) if done else "no breakdown\n"
    paces = {
        v: r["host_pace"] for v, r in doc["variants"].items() if "modules" in r.get("host_pace", {})
    }
    if paces:
        text += host_pace_markdown(paces)
    for v, r in doc["variants"].items():
        pw = r.get("peer_wait") or {}
        if pw.get("matched"):
            per = "; ".join(
                f"rank {k}: {x['kernel_ms']} ms in all-to-all kernels, {x['wait_ms']} waiting "
                f"for the other ranks, {x['rest_ms']} after the last rank started"
                for k, x in pw["ranks"].items()
            )
            text += f"\n{v}, {pw['count']} all-to-alls per rank: {per}\n"
        elif pw:
            text += f"\n{v}: peer wait not computed: {pw}\n"
    (out / f"breakdown_{name}.md").write_text(text)


def worker(argv: list) -> None:
    """`--worker SCRIPT ARGS...`: pretrain_gpt.py as __main__ with module-scope ranges."""
    import runpy

    from fluid.testing.bench.breakdown import module_scope_hooks

    script, rest = argv[0], argv[1:]
    module_scope_hooks()
    sys.argv = [script, *rest]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    ap.add_argument("--variants", default="stock,fluid")
    ap.add_argument(
        "--link",
        default="nvlink",
        help="benchmarks.recipes.LINKS: nvlink, p2poff, p2poff_1ch (the recipe must list it)",
    )
    ap.add_argument("--step", type=int, default=5, help="the profiled iteration (1-based)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--budget-s", type=float, default=500, help="start no run after this")
    ap.add_argument("--timeout-s", type=float, default=240, help="per run")
    ap.add_argument("--keep-trace-mb", type=float, default=15)
    ap.add_argument("--commit", default=None, help="commit to record where the tree has no .git")
    ap.add_argument(
        "--script", type=Path, default=None, help="instead of pretrain_gpt.py (tests: a stand-in)"
    )
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--print-command", action="store_true")
    args = ap.parse_args(argv)
    names = args.recipes.split(",")
    if args.print_command:
        from benchmarks.run import git_commit

        print(
            gpu_command(
                names, args.variants, int(args.budget_s), git_commit(args.commit), args.link
            )
        )
        return 0
    if args.dry_run:
        print(json.dumps(dry_run(names, args.step, args.variants.split(","), args.link)))
        return 0
    if args.out is None:
        ap.error("--out is required")
    from benchmarks import recipes as R
    from benchmarks.run import git_commit, host_meta
    from fluid.testing.bench.launch import install_sigterm

    meta = host_meta(git_commit(args.commit), dry=False)

    install_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fluid_breakdown_"))
    deadline = time.time() + args.budget_s
    for r in R.select(names):
        check_link(r, args.link)
        name = out_name(r.name, args.link)
        doc = {
            "recipe": r.name,
            "link": args.link,
            "step": args.step,
            "meta": {
                **meta,
                "command": shlex.join(["python3", "-m", "benchmarks.probes.breakdown", *argv]),
            },
            "variants": {},
        }
        for v in args.variants.split(","):
            if time.time() > deadline:
                doc["variants"][v] = {"skipped": "time budget"}
                continue
            timeout = min(args.timeout_s, max(30.0, deadline + 60 - time.time()))
            res = _run_one(
                r, v, args.step, work, args.out, timeout, args.keep_trace_mb, args.script, args.link
            )
            doc["variants"][v] = res
            _write(args.out, name, doc)
            b = res.get("breakdown")
            print(
                f"{r.name} {v}: rc={res['rc']} wall={b['wall_ms'] if b else None} ms "
                f"{res.get('error', '')}",
                flush=True,
            )
        _write(args.out, name, doc)
        print((args.out / f"breakdown_{name}.md").read_text(), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
