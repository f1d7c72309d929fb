"""Tier: cpu. Every benchmark recipe runs in the runner's dry-run mode (CPU, gloo, 2 ranks, tiny
shapes of the same structure: experts, top-k, shared expert, GQA), so a broken recipe fails CI
instead of a GPU run: layer recipes through the layer path with every variant's config fields
(stock is built; its router needs CUDA, so only Fluid runs); end-to-end recipes build every
variant's pretrain_gpt.py command line, check each flag name, and run their model's MoE layer and
attention through the layer path. The runner is driven as a subprocess (tests do not import
benchmarks/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The recipes the issue names; more may exist.
NAMED = [
    "moe_mixtral_ep2",
    "moe_fine64_ep2",
    "attn_cp4_32k",
    "e2e_mixtral_ep2",
    "e2e_fine_ep2",
    "e2e_mixtral_1gpu",
]


def _run(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _listed():
    p = _run("benchmarks.run", "--list")
    assert p.returncode == 0, p.stderr
    return [
        line.split()[0]
        for line in p.stdout.splitlines()
        if line and not line.startswith(("variants", "links"))
    ]


def test_list_names_the_recipes():
    names = _listed()
    assert set(NAMED) <= set(names), names
    assert len(names) == len(set(names))


def test_every_recipe_dry_runs(tmp_path):
    names = _listed()
    p = _run("benchmarks.run", "all", "--dry-run", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in names:
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["meta"]["dry_run"] is True
        job = doc["links"]["nvlink"]
        if doc["recipe"]["kind"] == "e2e":
            cmds = job["commands"]
            want = {v for v in doc["recipe"]["variants"] if "#" not in v}
            assert {"fluid_off", "fluid"} <= want
            if doc["recipe"]["ep"] > 1 and doc["recipe"]["cp"] == 1:  # combined 1F1B: EP > 1
                assert {"stock", "fluid_1f1b", "stock_1f1b"} <= want
                for v in ("fluid_1f1b", "stock_1f1b"):
                    assert "--overlap-moe-expert-parallel-comm" in cmds[v]["argv"]
                assert "--use-fluid-moe" in cmds["fluid_1f1b"]["argv"]
            if doc["recipe"]["cp"] > 1:  # Megatron's local attention has no CP: no stock side
                assert "stock" not in want
                assert "--context-parallel-size" in cmds["fluid"]["argv"]
            assert set(cmds) == want
            if "stock" in want:
                assert "--use-fluid-moe" not in cmds["stock"]["argv"]
            assert "--use-fluid-moe" in cmds["fluid"]["argv"]
            assert "--no-fluid-scheduler" in cmds["fluid_off"]["argv"]
            layers = job["layers"]
            assert layers["moe"]["variants"]["fluid"]["ms"] > 0
            assert layers["attn"]["variants"]["fluid"]["ms"] > 0
        else:
            v = job["variants"]
            assert v["fluid"]["ms"] > 0 and v["fluid_off"]["ms"] > 0
            assert (
                v["fluid_off"]["sched_stats"]["inline_dw_tasks"]
                == v["fluid_off"]["sched_stats"]["total_dw_tasks"]
            )
            assert not job.get("errors")
    page = (tmp_path / "README.md").read_text()
    assert all(f"`{n}`" in page for n in names)


def test_combined_1f1b_variants_env_and_hidden_fraction():
    """The combined-1F1B variants run with several hardware queues (the others with one), and the
    summary derives their hidden fraction against Fluid with overlap off, as for `fluid`."""
    from benchmarks import recipes as R
    from benchmarks.results import summarize

    assert R.variant_env("fluid_1f1b") == {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}
    assert R.variant_env("fluid") == {} and R.variant_env("stock#2") == {}
    assert R.is_schedule_variant("stock_1f1b") and not R.is_schedule_variant("fluid")

    def job(**ms):
        return {"variants": {k: {"ms": v, "rc": 0} for k, v in ms.items()}}

    doc = {
        "recipe": {"kind": "e2e"},
        "links": {
            "nvlink": job(stock=100, fluid_off=80, fluid=80, fluid_1f1b=78, **{"stock#2": 100}),
            "p2poff_1ch": job(
                stock=140, fluid_off=120, fluid=110, fluid_1f1b=88, **{"stock#2": 140}
            ),
        },
    }
    s = summarize(doc)
    assert s["e2e_hidden_fraction"]["p2poff_1ch"]["value"] == pytest.approx(1 - 30 / 40)
    assert s["e2e_hidden_fraction_1f1b"]["p2poff_1ch"]["value"] == pytest.approx(1 - 10 / 40)
    assert s["links"]["p2poff_1ch"]["overlap_1f1b"]["median"] == pytest.approx(120 / 88)


def test_fused_accumulation_variant_sets_its_flag():
    """`fluid_unfused` is Fluid with `--fluid-wgrad-accumulation unfused` (the default is auto) and
    nothing else different."""
    from benchmarks import e2e_job as E
    from benchmarks import recipes as R

    r = R.get("e2e_mixtral_1gpu")
    a, b = E.variant_argv(r, "fluid_unfused", 15), E.variant_argv(r, "fluid", 15)
    assert a[: len(b)] == b and a[len(b) :] == ["--fluid-wgrad-accumulation", "unfused"]
    assert R.variant_env("fluid_unfused") == {}


def test_foreach_adam_variant_sets_its_flag():
    """`fluid_foreach` is Fluid with `--fluid-torch-adam foreach` (Megatron's own fallback; the
    default is auto, fused on CUDA) and nothing else different; its ratio is fluid over it."""
    from benchmarks import e2e_job as E
    from benchmarks import recipes as R
    from benchmarks.results import RATIOS

    r = R.get("e2e_mixtral_1gpu")
    a, b = E.variant_argv(r, "fluid_foreach", 15), E.variant_argv(r, "fluid", 15)
    assert a[: len(b)] == b and a[len(b) :] == ["--fluid-torch-adam", "foreach"]
    assert R.variant_env("fluid_foreach") == {}
    assert RATIOS["fused_adam"] == ("fluid_foreach", "fluid")


@pytest.mark.parametrize("base", ["stock", "fluid"])
def test_jit_variants_only_drop_the_two_no_fusion_flags(base):
    """`stock_jit` / `fluid_jit` are stock / Fluid with Megatron's torch.compile fusions (weighted
    SwiGLU, bias-dropout-add) left on: the argv loses exactly `--no-bias-swiglu-fusion` and
    `--no-bias-dropout-fusion` and gains nothing; every other variant keeps both."""
    from benchmarks import e2e_job as E
    from benchmarks import recipes as R

    r = R.get("e2e_mixtral_1gpu")
    plain, jit = E.variant_argv(r, base, 15), E.variant_argv(r, f"{base}_jit", 15)
    assert "--no-bias-swiglu-fusion" in plain and "--no-bias-dropout-fusion" in plain
    assert [
        a for a in plain if a not in ("--no-bias-swiglu-fusion", "--no-bias-dropout-fusion")
    ] == jit
    assert E.check_flag_names(jit) == []


def test_merge_adds_variants_to_a_link_measured_before(tmp_path):
    """A second device call at the same commit that measures other variants of a link keeps the
    first call's variants of that link (its other fields come from the newer job)."""
    from benchmarks import recipes as R
    from benchmarks.run import merge

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    recipe, meta = R.get("e2e_fine_ep2").to_dict(), {"commit": "c", "dry_run": False}
    first = {"nvlink": {"variants": {"fluid": {"ms": 1.0}}, "iters": 12}}
    second = {
        "nvlink": {"variants": {"fluid_off": {"ms": 2.0}}, "iters": 30},
        "p2poff": {"variants": {"fluid": {"ms": 3.0}}},
    }
    for d, links in ((dst, first), (src, second)):
        doc = {"recipe": recipe, "meta": meta, "links": links}
        (d / "e2e_fine_ep2.json").write_text(json.dumps(doc))
    assert merge(src, dst) == ["e2e_fine_ep2"]
    links = json.loads((dst / "e2e_fine_ep2.json").read_text())["links"]
    assert links["nvlink"]["variants"] == {"fluid": {"ms": 1.0}, "fluid_off": {"ms": 2.0}}
    assert links["nvlink"]["iters"] == 30
    assert links["p2poff"]["variants"] == {"fluid": {"ms": 3.0}}


def test_hidden_fraction_pools_the_iterations_of_repeated_variants():
    """With `fluid#2` / `fluid_off#2` in a link, each variant's time is the median over all timed
    iterations of its runs (`pooled_ms`); without repeats the run's median, as before."""
    from benchmarks.results import pooled_ms, summarize

    def run(its):
        return {"ms": sorted(its)[len(its) // 2], "iters_ms": its, "rc": 0}

    nv = {"fluid_off": run([100, 101, 140]), "fluid_off#2": run([99, 98, 97])}
    nv |= {"fluid": run([100, 130, 131]), "fluid#2": run([96, 95, 94])}
    slow = {"fluid_off": run([150, 151, 152]), "fluid": run([120, 121, 122])}
    doc = {
        "recipe": {"kind": "e2e"},
        "links": {"nvlink": {"variants": nv}, "p2poff_1ch": {"variants": slow}},
    }
    assert pooled_ms(doc["links"]["nvlink"]) == {"fluid_off": (99.5, 6), "fluid": (98.0, 6)}
    s = summarize(doc)
    assert s["links"]["nvlink"]["pooled_ms"] == {"fluid_off": 99.5, "fluid": 98.0}
    assert "pooled_ms" not in s["links"]["p2poff_1ch"]  # no repeats there: the run's medians
    # exposed: on 121 - 98 = 23, off 151 - 99.5 = 51.5 (per-run medians: 121 - 130, 151 - 101)
    assert s["e2e_hidden_fraction"]["p2poff_1ch"]["value"] == pytest.approx(1 - 23 / 51.5)


def test_emulated_links_only_on_one_gpu_fluid_recipes():
    """An emulated link (fluid.comm.emulated_link) exists only at EP = 1 and only in Fluid's
    layers: a recipe listing one runs on one GPU without a stock variant, and its Fluid variants
    get the link's flag on that link only."""
    import benchmarks.e2e_job as E
    from benchmarks import recipes as R

    emulated = [r for r in R.RECIPES.values() if set(r.links) & set(R.LINK_FIELDS)]
    assert {r.kind for r in emulated} == {"e2e", "moe"}
    for r in emulated:
        assert r.nproc == 1 and r.ep == 1 and r.stock_side is None, r.name
        assert not [v for v in r.variants if R.base_variant(v).startswith("stock")], r.name
        assert "nvlink" in r.links, r.name  # the same layers without a link: the fast side
    e2e = R.RECIPES["e2e_fine_1gpu_emul"]
    argv = E.variant_argv(e2e, "fluid", 10, "emul9")
    assert argv[argv.index("--fluid-emulate-link-gbps") + 1] == "9.0"
    assert "--fluid-emulate-link-gbps" not in E.variant_argv(e2e, "fluid", 10, "nvlink")
    assert "--fluid-emulate-link-gbps" not in E.variant_argv(e2e, "stock", 10, "emul9")
