"""Tier: cpu. The measurement helpers the benchmarks and probes share (fluid.testing.bench): the timeline
busy/idle arithmetic on a hand-made timeline; stage_hooks wrapping a FluidMoELayer's stages and
restoring them (a GPU run that reports wrong numbers or leaves wrappers behind would cost device
time); the overlap measures (docs/benchmarks/README.md): at most 1, 0 when nothing overlapped,
below 0 when overlap cost more than it hid; alternating rounds and their ratio spread; every
benchmark child importing its own tree's `fluid`; benchmarks.ab's order, summary and dry run."""

import contextlib
import math

import pytest

from fluid.testing.bench.overlap import link_hidden_fraction, relative_noise, window_comm
from fluid.testing.bench.stages import FLUID_STAGES, stage_hooks
from fluid.testing.bench.timeline import summarize
from fluid.testing.bench.timing import alternating_rounds, round_ratios


def test_summarize_busy_idle_and_gaps():
    rows = [
        ["cpu", 0.0, 5.0, "fwd"],
        ["cpu", 0.5, 1.0, "stage:route"],
        ["cpu", 2.0, 0.5, "stage:route"],  # two calls: summed
        [7, 0.0, 5.0, "fwd"],  # the annotation's GPU row: not a kernel
        [7, 1.0, 1.0, "gemm_a"],
        [7, 1.5, 1.0, "gemm_b"],  # overlaps gemm_a: busy 1.0-2.5
        [7, 4.0, 0.5, "gemm_c"],  # gap 1.5 ms before it
        [7, 3.0, 0.2, "ncclDevKernel_SendRecv"],  # NCCL on the compute stream: not compute
        [30, 2.0, 3.0, "ncclDevKernel_SendRecv"],
    ]
    s = summarize(rows)
    assert s["compute_stream"] == 7
    assert abs(s["span_ms"] - 4.0) < 1e-9  # first GPU start 1.0 (kernels), last end 5.0 (nccl)
    assert abs(s["compute_busy_ms"] - 2.0) < 1e-9
    assert abs(s["compute_idle_ms"] - 2.0) < 1e-9
    assert abs(s["nccl_ms"] - 3.2) < 1e-9
    assert s["largest_gaps"][0][:2] == (1.5, 2.5)
    assert s["host_fwd_ms"] == 5.0 and s["host_stages_ms"] == {"route": 1.5}


class _Obj:
    def __init__(self, *names):
        for n in names:
            setattr(self, n, lambda *a, _n=n: (_n, a))


def test_stage_hooks_wrap_and_restore():
    layer = _Obj("route")
    layer.token_dispatcher = _Obj(*[m for p, m in FLUID_STAGES if p == "token_dispatcher"])
    layer.experts = _Obj("forward")
    seen = []

    @contextlib.contextmanager
    def record(name):
        seen.append(name)
        yield

    with stage_hooks(layer, record):
        assert layer.route(1) == ("route", (1,))
        layer.token_dispatcher.dispatch_chunks()
        layer.experts.forward()
    assert seen == [
        "stage:route",
        "stage:token_dispatcher.dispatch_chunks",
        "stage:experts.forward",
    ]
    layer.route(2)  # the wrappers are gone, the original attributes back
    layer.token_dispatcher.dispatch_chunks()
    assert len(seen) == 3 and layer.route(3) == ("route", (3,))


def test_stage_hooks_leave_a_stock_layer_alone():
    layer = _Obj("route")
    layer.token_dispatcher = _Obj("token_dispatch")  # no dispatch_chunks: stock's dispatcher
    with stage_hooks(layer, lambda name: contextlib.nullcontext()):
        assert "route" in vars(layer)  # the instance's own attribute, not a wrapper
        assert layer.route() == ("route", ())


def test_stage_hooks_on_class_methods():
    class Dispatcher:
        def dispatch_chunks(self):
            return "chunks"

    class Layer:
        def route(self):
            return "routed"

    layer = Layer()
    layer.token_dispatcher = Dispatcher()
    layer.experts = _Obj("forward")
    for _, m in FLUID_STAGES:  # the rest of the stages, as instance attributes
        obj = layer.token_dispatcher
        if m not in ("route", "forward", "dispatch_chunks"):
            setattr(obj, m, lambda: None)
    seen = []
    with stage_hooks(layer, lambda name: contextlib.nullcontext(seen.append(name))):
        assert layer.route() == "routed" and layer.token_dispatcher.dispatch_chunks() == "chunks"
    assert seen == ["stage:route", "stage:token_dispatcher.dispatch_chunks"]
    assert "route" not in vars(layer) and "dispatch_chunks" not in vars(layer.token_dispatcher)


def _old_overlap_efficiency(s):
    """The scheduler's overlap_efficiency for one window: (T_a2a + T_dW - T_window) / min(...)."""
    return (s["a2a_ms"] + s["dw_in_window_ms"] - s["window_ms"]) / min(
        s["a2a_ms"], s["dw_in_window_ms"]
    )


def test_window_measure_cannot_exceed_one():
    # One filled window: the all-to-all (2 ms) started before the dW was issued, the dW took 1 ms
    # and the compute stream then waited 0.1 ms. overlap_efficiency calls this 1.9.
    s = {
        "a2a_ms": 2.0,
        "overlapped_a2a_ms": 2.0,
        "dw_in_window_ms": 1.0,
        "window_ms": 1.1,
        "a2a_calls": 1,
        "overlapped_windows": 1,
    }
    assert _old_overlap_efficiency(s) > 1.5
    c = window_comm(s, steps=1)
    assert c["exposed_ms_per_step"] == pytest.approx(0.1)
    assert c["hidden_ms_per_step"] == pytest.approx(1.9)
    assert c["hidden_fraction"] == pytest.approx(0.95) and c["hidden_fraction"] <= 1


def test_window_measure_zero_when_nothing_overlapped_and_negative_when_it_costs():
    none = {
        "a2a_ms": 3.0,
        "a2a_calls": 3,
        "overlapped_a2a_ms": 0.0,
        "dw_in_window_ms": 0.0,
        "window_ms": 0.0,
        "overlapped_windows": 0,
    }
    c = window_comm(none, steps=3)
    assert c["hidden_fraction"] == 0 and c["exposed_ms_per_step"] == pytest.approx(1.0)
    assert c["windows_per_step"] == 1 and c["filled_windows_per_step"] == 0
    # The compute stream waited 1.5 ms after its dW for a 1 ms all-to-all: overlap cost 0.5 ms.
    costly = {
        "a2a_ms": 1.0,
        "a2a_calls": 1,
        "overlapped_a2a_ms": 1.0,
        "dw_in_window_ms": 1.0,
        "window_ms": 2.5,
        "overlapped_windows": 1,
    }
    assert window_comm(costly, steps=1)["hidden_fraction"] == pytest.approx(-0.5)
    assert window_comm({"total_dw_tasks": 1}, steps=1) is None  # timing off: no measure


def test_link_measure_bounds():
    # Overlap off exposes 20 ms over the slow link; on, 5 ms: 0.75 hidden.
    h = link_hidden_fraction(on_slow=105, on_nv=100, off_slow=120, off_nv=100)
    assert h["value"] == pytest.approx(0.75) and h["low"] == h["value"] == h["high"]
    # Slow link measured faster than NVLink (noise): exposed floored at 0, the fraction is 1, not more.
    assert link_hidden_fraction(98, 100, 120, 100)["value"] == 1.0
    # Overlap changed nothing: 0. Overlap cost more than it hid: below 0.
    assert link_hidden_fraction(120, 100, 120, 100)["value"] == 0.0
    assert link_hidden_fraction(130, 100, 120, 100)["value"] == pytest.approx(-0.5)
    # Nothing to hide: no value.
    assert link_hidden_fraction(100, 100, 99, 100)["value"] is None


def test_link_measure_band():
    h = link_hidden_fraction(105, 100, 120, 100, noise_slow=0.01, noise_nv=0.01)
    assert h["low"] < h["value"] < h["high"] <= 1
    # d_on = 2.05, d_off = 2.2: low = 1 - 7.05/17.8, high = 1 - 2.95/22.2
    assert h["low"] == pytest.approx(1 - 7.05 / 17.8) and h["high"] == pytest.approx(
        1 - 2.95 / 22.2
    )
    wide = link_hidden_fraction(105, 100, 120, 100, noise_slow=0.2, noise_nv=0.2)
    assert wide["low"] is None and wide["high"] <= 1  # the noise could swallow all exposed time
    assert relative_noise({"median": 1.0, "min": 0.97, "max": 1.01}) == pytest.approx(0.03)


def test_alternating_rounds_and_ratio_spread():
    calls = []
    steps = {n: (lambda n=n: calls.append(n)) for n in ("a", "b")}
    ms = {"a": iter([10.0, 12.0]), "b": iter([5.0, 4.0])}

    def timer(fn, warmup, iters):
        for _ in range(warmup + iters):
            fn()
        return next(ms[calls[-1]])

    rounds = alternating_rounds(steps, ["a", "b"], rounds=2, warmup=1, iters=2, timer=timer)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # A B A B, not A A B B
    r = round_ratios(rounds, "a", "b")
    assert r["rounds"] == [2.0, 3.0] and r["min"] == 2.0 and r["max"] == 3.0
    assert math.isclose(r["median"], 2.5)


def test_dry_run_without_out_leaves_the_committed_results_alone(monkeypatch, tmp_path):
    """`benchmarks.run RECIPE --dry-run` without --out once wrote its CPU check into
    docs/benchmarks/raw/<recipe>.json, replacing the committed GPU results. Without --out a dry
    run goes to a temporary folder; a real run still defaults to docs/benchmarks/raw."""
    from benchmarks import run as bench_run

    seen = {}

    def fake_dry_run(selected, out, meta):
        seen["out"] = out
        return 0

    monkeypatch.setattr(bench_run, "dry_run", fake_dry_run)
    monkeypatch.setattr(bench_run, "git_commit", lambda *a, **k: "0" * 40)
    monkeypatch.setattr("benchmarks.render.render_to", lambda *a, **k: None)
    assert bench_run.main(["e2e_fine_ep2", "--dry-run"]) == 0
    assert seen["out"].resolve() != bench_run.RAW.resolve()
    assert bench_run.RAW.resolve() not in seen["out"].resolve().parents
    assert bench_run.main(["e2e_fine_ep2", "--dry-run", "--out", str(tmp_path)]) == 0
    assert seen["out"] == tmp_path


def test_every_benchmark_child_imports_its_own_trees_fluid(monkeypatch):
    """A benchmark run from a copy of the tree (a snapshot of an older commit) measured the
    `fluid` that benchmarks/gpu_env.sh had put on PYTHONPATH (the first tree's), not its own:
    every child environment now starts with this tree's overlay and root (benchmarks.tree), for
    benchmarks.run's layer jobs, the end-to-end runs and the breakdown probe."""
    import os
    from pathlib import Path

    from benchmarks import e2e_job
    from benchmarks import run as bench_run
    from benchmarks.probes import breakdown as probe
    from benchmarks.tree import ROOT, with_tree_path

    other = "/elsewhere/overlay" + os.pathsep + "/elsewhere"
    monkeypatch.setenv("PYTHONPATH", other)
    want = [str(ROOT / "overlay"), str(ROOT)]
    env = with_tree_path({"PYTHONPATH": other, "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [*want, *other.split(os.pathsep)]
    assert env["X"] == "1"
    assert with_tree_path({})["PYTHONPATH"].split(os.pathsep) == want
    for got in (
        bench_run._child_env("nvlink"),
        probe.run_env("nvlink", "fluid", dict(os.environ)),
    ):
        assert got["PYTHONPATH"].split(os.pathsep)[:2] == want
    seen = {}

    def fake_run_logged(cmd, env, log, **kw):
        seen["env"] = env
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text("")
        return {"rc": 0}

    monkeypatch.setattr("fluid.testing.bench.launch.run_logged", fake_run_logged)
    # core-only checkouts (CI) have no pretrain_gpt.py: the script path does not matter here
    monkeypatch.setattr(e2e_job, "pretrain_script", lambda: ROOT / "pretrain_gpt.py")
    recipe = __import__("benchmarks.recipes", fromlist=["RECIPES"]).RECIPES["e2e_fine_1gpu"]
    with contextlib.suppress(Exception):  # only the environment matters here
        e2e_job.run_variant(recipe, "fluid", "nvlink", Path("/tmp/fluid_tree_test"), 6, 10.0)
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[:2] == want


def test_ab_order_and_summary():
    """benchmarks.ab: ABBA order (a drift linear in time weighs both sides equally); the summary
    pools each side's iterations, head over base below 1 when head is faster, and the ratio per
    round pair."""
    from benchmarks.ab import abba_order
    from benchmarks.ab import summarize as ab_summarize

    assert abba_order(3) == [
        (0, "base"), (0, "head"), (1, "head"), (1, "base"), (2, "base"), (2, "head"),
    ]  # fmt: skip
    runs = [
        {"round": 0, "side": "base", "ms": 100.0, "iters_ms": [99.0, 100.0, 101.0]},
        {"round": 0, "side": "head", "ms": 90.0, "iters_ms": [89.0, 90.0, 91.0]},
        {"round": 1, "side": "head", "ms": 99.0, "iters_ms": [98.0, 99.0, 100.0]},
        {"round": 1, "side": "base", "ms": 110.0, "iters_ms": [109.0, 110.0, 111.0]},
    ]
    s = ab_summarize(runs)
    assert s["base"]["runs_ms"] == [100.0, 110.0] and s["base"]["iterations"] == 6
    assert s["base"]["pooled_median_ms"] == 105.0 and s["head"]["pooled_median_ms"] == 94.5
    assert s["head_over_base"] == round(94.5 / 105.0, 4)
    assert s["round_ratios"] == [0.9, 0.9]
    assert ab_summarize(runs[:1])["head_over_base"] is None


def test_ab_dry_run_snapshots_and_checks_each_sides_fluid(tmp_path):
    """`benchmarks.ab --dry-run`: both snapshots written, `import fluid` resolved inside each
    (a snapshot importing another tree's fluid is refused), the ABBA plan of benchmarks.run
    commands, nothing run. Both sides are HEAD: a CI clone may hold no older commit."""
    import json
    import subprocess
    import sys

    from benchmarks.tree import ROOT

    out = tmp_path / "ab"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", "--base", "HEAD", "--head", "HEAD",
         "--recipe", "e2e_fine_1gpu", "--rounds", "2", "--out", str(out), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "ab_e2e_fine_1gpu_fluid.json").read_text())
    for side in ("base", "head"):
        snap = (out / f"snap_{side}").resolve()
        assert doc["meta"][f"{side}_fluid"] == str(snap / "overlay" / "fluid")
        assert (snap / "benchmarks" / "run.py").exists()
    assert [(p["round"], p["side"]) for p in doc["plan"]] == [
        (0, "base"), (0, "head"), (1, "head"), (1, "base"),
    ]  # fmt: skip
    assert all(p["cmd"][1:4] == ["-m", "benchmarks.run", "e2e_fine_1gpu"] for p in doc["plan"])
    assert doc["runs"] == [] and not (out / "runs").exists()
    # snapshots made once and reused (a GPU host has no git): marked with their commit; a
    # folder holding another commit is refused
    sha = (out / "snap_head" / ".ab_commit").read_text().strip()
    assert len(sha) == 40
    again = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", "--base", sha[:9], "--head", sha,
         "--recipe", "e2e_fine_1gpu", "--snapshots", str(out), "--out", str(tmp_path / "o2"),
         "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    (out / "snap_base" / ".ab_commit").write_text("f" * 40 + "\n")
    other = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", "--base", sha, "--head", sha,
         "--recipe", "e2e_fine_1gpu", "--snapshots", str(out), "--out", str(tmp_path / "o3"),
         "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert other.returncode != 0 and "use another --snapshots folder" in other.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", "--base", "HEAD", "--head", "HEAD",
         "--recipe", "moe_fine64_ep4", "--out", str(tmp_path / "x"), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "not an end-to-end recipe" in bad.stderr


def test_ab_budget_starts_only_rounds_that_fit(tmp_path, monkeypatch):
    """benchmarks.ab under --budget-s, with runs of 65 s on a fake clock and a stand-in for
    benchmarks.run that, as run.py does, skips its variant with less than E2E_MIN_LEFT_S of its
    budget left: every run ab starts gives a result, and a round runs whole or not at all (ab
    used to start a run that benchmarks.run then skipped: the head side of a 150 s budget)."""
    import json
    import subprocess
    from pathlib import Path

    from benchmarks import ab
    from benchmarks.run import E2E_MIN_LEFT_S

    clock = [1000.0]
    monkeypatch.setattr(ab.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ab, "snapshot", lambda rev, path: rev * 40)
    monkeypatch.setattr(ab, "link_staged", lambda snap: None)
    monkeypatch.setattr(ab, "fluid_origin", lambda snap, env: str(snap / "overlay" / "fluid"))

    def fake_run(cmd, cwd, env):
        budget = float(cmd[cmd.index("--budget-s") + 1])
        out = Path(cmd[cmd.index("--out") + 1])
        clock[0] += 3.0  # start-up, then run.py's budget check
        if budget - 3.0 >= E2E_MIN_LEFT_S:
            v = {"ms": 100.0, "iters_ms": [100.0, 100.0]}
        else:
            v = {"skipped": "time budget", "ms": None}
        clock[0] += 62.0
        out.mkdir(parents=True)
        doc = {"links": {"nvlink": {"variants": {"fluid": v}}}}
        (out / "e2e_fine_1gpu.json").write_text(json.dumps(doc))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    for budget, want in ((150, []), (250, [(0, "base"), (0, "head")]), (420, 4)):
        out = tmp_path / f"b{budget}"
        args = ["--base", "a", "--head", "b", "--recipe", "e2e_fine_1gpu", "--rounds", "3",
                "--out", str(out), "--budget-s", str(budget)]  # fmt: skip
        assert ab.main(args) == 0
        doc = json.loads((out / "ab_e2e_fine_1gpu_fluid.json").read_text())
        ran = [(r["round"], r["side"]) for r in doc["runs"]]
        assert all("ms" in r for r in doc["runs"]), doc["runs"]  # no run started to be skipped
        if isinstance(want, int):
            assert len(ran) == want and ran == [(0, "base"), (0, "head"), (1, "head"), (1, "base")]
        else:
            assert ran == want
        assert len(doc["plan"]) == 6
        assert sum("skipped" in p for p in doc["plan"]) == 6 - len(ran)


def test_versus_alternates_torchtitan_and_fluid(tmp_path, monkeypatch):
    """benchmarks.peers.versus: torchtitan and FluidMoE in ABBA order in one job (fake clock
    and runs: torchtitan 480 ms steps, FluidMoE 400 ms iterations); torchtitan gets the link's
    environment and its wheels first on PYTHONPATH, FluidMoE this tree's overlay; the summary's
    speedup is torchtitan's pooled median over FluidMoE's, per round too, with model TFLOP/s by
    one formula; context parallelism and unknown links are refused."""
    import json
    import os
    import subprocess
    from pathlib import Path

    import pytest

    from benchmarks import ab
    from benchmarks.peers import versus
    from benchmarks.tree import ROOT
    from fluid.testing.bench.flops import tflops_per_gpu
    from fluid.testing.bench.models import MODELS

    clock = [0.0]
    monkeypatch.setattr(ab.time, "monotonic", lambda: clock[0])
    seen = []

    def fake_run(cmd, cwd, env):
        clock[0] += 70.0
        seen.append((cmd, env))
        out = Path(cmd[cmd.index("--out") + 1])
        if "benchmarks.run" in cmd:
            out.mkdir(parents=True)
            v = {"ms": 400.0, "iters_ms": [398.0, 400.0, 402.0]}
            doc = {"links": {"p2poff": {"variants": {"fluid": v}}}}
            (out / "e2e_fine_ep2.json").write_text(json.dumps(doc))
        else:
            rec = {"model": "fine", "compile": True, "warmup_steps": 3,
                   "step_times_s": [9.0, 2.0, 1.0, 0.478, 0.480, 0.482]}  # fmt: skip
            out.write_text(json.dumps([rec]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(ab.subprocess, "run", fake_run)  # the runner both tools share
    out = tmp_path / "v"
    args = ["--recipe", "e2e_fine_ep2", "--link", "p2poff", "--rounds", "2", "--out", str(out),
            "--peers-site", "/opt/peers", "--commit", "c" * 40]  # fmt: skip
    assert versus.main(args) == 0
    doc = json.loads((out / "versus_e2e_fine_ep2_fluid_p2poff.json").read_text())
    order = [(r["round"], r["side"]) for r in doc["runs"]]
    assert order == [(0, "torchtitan"), (0, "fluid"), (1, "fluid"), (1, "torchtitan")]
    tt_cmd, tt_env = seen[0]
    assert tt_cmd[tt_cmd.index("--models") + 1] == "fine" and "--compile" in tt_cmd
    assert tt_cmd[tt_cmd.index("--nproc") + 1] == "2" and tt_cmd[tt_cmd.index("--ep") + 1] == "2"
    assert tt_env["NCCL_P2P_DISABLE"] == "1" and tt_env["NCCL_NVLS_ENABLE"] == "0"
    assert tt_env["PYTHONPATH"].split(os.pathsep)[0] == "/opt/peers"
    fl_cmd, fl_env = seen[1]
    assert fl_cmd[fl_cmd.index("--links") + 1] == "p2poff" and fl_cmd[-2:] == ["--commit", "c" * 40]
    assert fl_env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "overlay")
    s = doc["summary"]
    assert s["torchtitan"]["pooled_median_ms"] == 480.0 and s["fluid"]["pooled_median_ms"] == 400.0
    assert s["fluid_speedup"] == 1.2 and s["round_speedups"] == [1.2, 1.2]
    m = MODELS["fine"]
    tokens = m.global_batch(2) * m.seq // 2
    assert s["tokens_per_gpu_per_step"] == tokens
    assert s["fluid"]["tflops_per_gpu"] == round(tflops_per_gpu(m, tokens, 0.4), 1)
    for bad in (
        ["--recipe", "e2e_fine_cp2_ep2"],
        ["--recipe", "e2e_fine_1gpu", "--link", "p2poff"],
    ):
        with pytest.raises(SystemExit):
            versus.main(bad + ["--out", str(tmp_path / "bad"), "--dry-run"])
