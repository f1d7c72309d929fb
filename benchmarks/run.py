"""The one benchmark entry point: named recipes (benchmarks/recipes.py), stock and Fluid in the same
job, raw JSON per recipe, and the regenerated results page.

    python -m benchmarks.run --list
    python -m benchmarks.run RECIPE... [--links nvlink,p2poff] [--out DIR] [--commit SHA]
    python -m benchmarks.run all --dry-run --out /tmp/bench    # CPU: tiny shapes, gloo, 2 ranks
    python -m benchmarks.run --merge FILES_AT/raw              # a device call's JSON into raw/
    make bench RECIPE="moe_mixtral_ep2 e2e_mixtral_ep2"

On a GPU host: `source benchmarks/gpu_env.sh` first (wheels, the patched Megatron tree). Layer
recipes run one torchrun per link (benchmarks/layer_job.py: alternating rounds of stock, Fluid
with overlap off, Fluid, stock again); end-to-end recipes one torchrun of stock pretrain_gpt.py per
variant and link, variants in alternating order (benchmarks/e2e_job.py). Each link's environment:
recipes.BASE_ENV (NCCL_NVLS_ENABLE=0, CUDA_DEVICE_MAX_CONNECTIONS=1) plus recipes.LINKS[link].

Writes DIR/<recipe>.json (host, GPU, SM clocks, commit, command, versions, every link's raw
results, the derived summary) after every job, so a timeout keeps what finished; a later run of
the same recipe at the same commit adds or replaces links. Logs go to DIR/logs/. Then renders the
page (benchmarks/render.py): docs/benchmarks/README.md when DIR is docs/benchmarks/raw, else
DIR/README.md from DIR's JSON plus the committed raw JSON of the other recipes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import recipes as R

ROOT = Path(__file__).resolve().parent.parent
# An end-to-end variant starts only with this much of --budget-s left (a torchrun of the whole
# model: start-up, warm-up, the timed iterations).
E2E_MIN_LEFT_S = 90.0
RAW = ROOT / "docs" / "benchmarks" / "raw"
PAGE = ROOT / "docs" / "benchmarks" / "README.md"


def _sh(cmd: list) -> str:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=30, cwd=ROOT
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit(given: str = None, dirty: bool = True) -> str:
    """--commit, else `git rev-parse HEAD` (+ "-dirty" with uncommitted changes under benchmarks/ or
    overlay/), else "unknown" (a GPU host's copy of the tree may carry no .git)."""
    if given:
        return given
    sha = _sh(["git", "rev-parse", "--short=12", "HEAD"])
    if not sha:
        return "unknown"
    changed = dirty and _sh(
        ["git", "status", "--porcelain", "--", "benchmarks", "overlay", "patches"]
    )
    return sha + ("-dirty" if changed else "")


def host_meta(commit: str, dry: bool) -> dict:
    """Host, GPU, clocks, versions, commit, command: what a number needs to be reproduced."""
    meta = {
        "commit": commit,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "dry_run": dry,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["cuda"] = torch.version.cuda
        meta["gpus"] = torch.cuda.device_count()  # NVML: no CUDA context in the driver
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        meta["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001 - a tree on PYTHONPATH without distribution metadata
        try:
            import megatron.core

            meta["megatron_core"] = getattr(megatron.core, "__version__", "unknown")
        except ImportError:
            meta["megatron_core"] = None
    smi = _sh(
        [
            "nvidia-smi",
            "--query-gpu=index,name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version",
            "--format=csv,noheader",
        ]
    )
    if smi:
        meta["nvidia_smi"] = smi.splitlines()
        meta["gpu"] = smi.splitlines()[0].split(",")[1].strip()
    return meta


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_recipe(out: Path, recipe: R.Recipe, meta: dict, link: str, job: dict) -> dict:
    """Add one link's job to out/<recipe>.json (kept if the file is of the same commit, recipe
    and mode; replaced otherwise) and refresh its summary."""
    from benchmarks.results import summarize

    path = out / f"{recipe.name}.json"
    doc = _load(path)
    same = (
        doc
        and doc.get("meta", {}).get("commit") == meta["commit"]
        and doc.get("recipe") == json.loads(json.dumps(recipe.to_dict()))
        and doc.get("meta", {}).get("dry_run") == meta["dry_run"]
    )
    if not same:
        doc = {"recipe": recipe.to_dict(), "meta": meta, "links": {}}
    doc["links"][link] = {
        **job,
        "job_meta": {"date_utc": meta["date_utc"], "command": meta["command"]},
    }
    doc["summary"] = summarize(doc)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc


def merge(src: Path, dst: Path = RAW) -> list:
    """Merge every <recipe>.json of `src` (a device call's --out) into `dst`: links (and, for a
    link measured before, variants) are added to a JSON of the same commit, recipe and mode,
    anything else is replaced. Returns the recipes."""
    from benchmarks.results import summarize

    done = []
    for p in sorted(Path(src).glob("*.json")):
        if p.stem not in R.RECIPES:
            continue
        new, old = json.loads(p.read_text()), _load(dst / p.name)
        if (
            old
            and all(
                old.get("meta", {}).get(k) == new.get("meta", {}).get(k)
                for k in ("commit", "dry_run")
            )
            and old.get("recipe") == new.get("recipe")
        ):
            for link, job in new["links"].items():  # a link measured again: variant by variant
                kept = old["links"].get(link, {})
                variants = {**kept.get("variants", {}), **job.get("variants", {})}
                old["links"][link] = {**kept, **job, "variants": variants}
            new = old
        new["summary"] = summarize(new)
        (dst / p.name).write_text(json.dumps(new, indent=1, default=str) + "\n")
        done.append(p.stem)
    return done


def _torchrun(nproc: int) -> list:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]


def _child_env(link: str) -> dict:
    from benchmarks.tree import with_tree_path

    return with_tree_path({**os.environ, **R.BASE_ENV, **R.LINKS[link]})


def run_layer(recipe, link, args, out: Path, meta: dict, timeout: float) -> dict:
    from fluid.testing.bench.launch import run_logged

    tmp = out / "logs" / f"{recipe.name}_{link}.json"
    cmd = _torchrun(recipe.nproc) + [
        "-m",
        "benchmarks.layer_job",
        "--recipes",
        recipe.name,
        "--link",
        link,
        "--out",
        str(tmp),
    ]
    if args.rounds:
        cmd += ["--rounds", str(args.rounds)]
    if args.iters:
        cmd += ["--iters", str(args.iters)]
    if args.variants:
        cmd += ["--variants", args.variants]
    r = run_logged(
        cmd, _child_env(link), out / "logs" / f"{recipe.name}_{link}.log", cwd=ROOT, timeout=timeout
    )
    res = (_load(tmp) or {}).get(recipe.name)
    job = (
        res
        if res
        else {
            "variants": {},
            "error": f"no result (rc {r['rc']}, see logs/{recipe.name}_{link}.log)",
        }
    )
    if res and res.get("errors"):
        job["error"] = "; ".join(res["errors"])
    job["run"] = r
    return job


def run_e2e(recipe, link, args, out: Path, meta: dict, timeout: float, deadline: float) -> dict:
    from benchmarks.e2e_job import run_variant

    iters = args.iters or recipe.iters
    order = list(recipe.variants)
    if args.variants:  # any known variant, in the order given (e.g. the `_q32` ones)
        order = args.variants.split(",")
        unknown = [v for v in order if R.base_variant(v) not in R.VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; `--list` lists them")
    job = {"variants": {}, "order": order, "iters": iters, "warmup": recipe.warmup}
    for v in order:
        if deadline - time.time() < E2E_MIN_LEFT_S:
            job["variants"][v] = {"skipped": "time budget", "ms": None}
            continue
        job["variants"][v] = run_variant(
            recipe, v, link, out / "logs", iters, min(timeout, max(deadline - time.time(), 30))
        )
        print(
            f"  {recipe.name} {link} {v}: {job['variants'][v]['ms']} ms/iter "
            f"(rc {job['variants'][v]['rc']})",
            flush=True,
        )
        save_recipe(out, recipe, meta, link, job)  # partial results survive a later failure
        if job["variants"][v].get("terminated"):
            break
    return job


def dry_run(selected, out: Path, meta: dict) -> int:
    """CPU: every selected recipe through the layer path at tiny shapes on gloo (2 ranks, one
    job), end-to-end recipes' command lines checked (benchmarks.e2e_job.dry_run)."""
    from benchmarks.e2e_job import dry_run as e2e_dry
    from fluid.testing.bench.launch import run_logged

    rc = 0
    checks = {}
    for r in selected:
        if r.kind == "e2e":
            checks[r.name] = e2e_dry(r)
    tmp = out / "logs" / "dry_run.json"
    env = _child_env("nvlink")
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = _torchrun(2) + [
        "-m",
        "benchmarks.layer_job",
        "--dry-run",
        "--out",
        str(tmp),
        "--recipes",
        ",".join(r.name for r in selected),
    ]
    res = run_logged(cmd, env, out / "logs" / "dry_run.log", cwd=ROOT, timeout=900)
    jobs = _load(tmp) or {}
    for r in selected:
        job = jobs.get(r.name)
        errors = (job or {}).get("errors") or [
            e for part in ("moe", "attn") for e in ((job or {}).get(part) or {}).get("errors", [])
        ]
        if job is None or errors:
            why = errors or [f"no result (rc {res['rc']})"]
            print(f"DRY RUN FAILED: {r.name}: {why[0][-3000:]}", flush=True)
            rc = 1
            continue
        if r.kind == "e2e":  # its model's layers at tiny size; the command lines
            job = {"layers": job, "commands": checks[r.name], "variants": {}}
        save_recipe(out, r, meta, "nvlink", job)
        print(f"dry run ok: {r.name}", flush=True)
    if rc and not jobs:
        print((out / "logs" / "dry_run.log").read_text()[-6000:], file=sys.stderr)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("recipes", nargs="*", help="recipe names, 'all', or 'gpus=N'")
    ap.add_argument("--list", action="store_true", help="list the recipes and exit")
    ap.add_argument(
        "--merge",
        type=Path,
        default=None,
        metavar="DIR",
        help="merge DIR/<recipe>.json (a device call's --out) into docs/benchmarks/raw, "
        "render the page, exit",
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny shapes, 2 ranks")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="raw JSON folder (default docs/benchmarks/raw; with --dry-run a temporary folder, "
        "so a CPU check never replaces committed GPU results)",
    )
    ap.add_argument("--page", type=Path, default=None, help="page to render (see the module doc)")
    ap.add_argument("--links", default=None, help="comma-separated subset of each recipe's links")
    ap.add_argument("--rounds", type=int, default=None, help="override the layer recipes' rounds")
    ap.add_argument(
        "--iters", type=int, default=None, help="override iterations per round / e2e run"
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of each recipe's variants (default: all of them)",
    )
    ap.add_argument("--commit", default=None, help="commit to record where the tree has no .git")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="start no job after this many seconds (a device call's limit)",
    )
    ap.add_argument("--job-timeout-s", type=float, default=400.0, help="one torchrun at most")
    args = ap.parse_args(argv)
    if args.list:
        for r in R.RECIPES.values():
            print(R.describe(r))
        print("\nvariants: " + "; ".join(f"{k} = {v or 'stock'}" for k, v in R.VARIANTS.items()))
        print("links: " + "; ".join(f"{k} = {v or 'default NCCL'}" for k, v in R.LINKS.items()))
        return 0
    if args.merge:
        from benchmarks.render import render_to

        print("merged: " + ", ".join(merge(args.merge)))
        render_to(PAGE, [RAW], commit=git_commit(dirty=False))
        print(f"page: {PAGE}")
        return 0
    if not args.recipes:
        ap.error("name recipes (or --list)")
    selected = R.select(args.recipes)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="fluid_dry_run_")) if args.dry_run else RAW
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    meta = host_meta(git_commit(args.commit), args.dry_run)
    t_start = time.time()
    deadline = t_start + args.budget_s
    rc = 0
    if args.dry_run:
        rc = dry_run(selected, args.out, meta)
    else:
        from fluid.testing.bench.launch import Terminated, install_sigterm

        install_sigterm()
        gpus = meta.get("gpus", 0)
        try:
            for r in selected:
                if r.nproc > gpus:
                    print(f"skip {r.name}: needs {r.nproc} GPUs, this host has {gpus}", flush=True)
                    continue
                links = [
                    link for link in r.links if not args.links or link in args.links.split(",")
                ]
                for link in links:
                    if time.time() > deadline:
                        print(
                            f"skip {r.name} {link}: time budget ({args.budget_s:.0f} s) spent",
                            flush=True,
                        )
                        continue
                    print(f"{r.name} {link} ...", flush=True)
                    if r.kind == "e2e":
                        job = run_e2e(r, link, args, args.out, meta, args.job_timeout_s, deadline)
                    else:
                        job = run_layer(
                            r,
                            link,
                            args,
                            args.out,
                            meta,
                            min(args.job_timeout_s, max(deadline - time.time(), 60)),
                        )
                    doc = save_recipe(args.out, r, meta, link, job)
                    s = doc["summary"]["links"][link]
                    print(f"  {r.name} {link}: ms {s['ms']} speedup {s.get('speedup')}", flush=True)
                    if job.get("error"):
                        rc = 1
        except Terminated:
            print("terminated: the JSON written so far is kept", flush=True)
            rc = 143
    from benchmarks.render import render_to

    page = args.page or (PAGE if args.out.resolve() == RAW.resolve() else args.out / "README.md")
    render_to(
        page,
        [args.out, RAW] if args.out.resolve() != RAW.resolve() else [RAW],
        commit=meta["commit"],
    )
    print(f"page: {page}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
