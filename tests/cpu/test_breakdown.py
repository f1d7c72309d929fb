"""Tier: cpu. The step-time breakdown (fluid.testing.bench.breakdown) on a hand-written trace with
known overlaps (exact expected numbers), the scope chain (module range -> forward op -> fwdbwd flow
-> backward node -> kernel launch) on a real CPU profiler trace, and the probe's command lines
(benchmarks/probes/breakdown.py, run as a subprocess: tests do not import benchmarks/)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluid.testing.bench.breakdown import (
    EXCLUSIVE,
    all_to_all_spans,
    breakdown,
    categorize,
    host_pace,
    host_pace_markdown,
    markdown,
    peer_wait,
)

ROOT = Path(__file__).resolve().parents[2]


def _x(cat, name, ts, dur, tid=1, **args):
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "pid": 1,
        "tid": tid,
        "ts": ts,
        "dur": dur,
        "args": args,
    }


def _kernel(name, ts, dur, stream, corr, launch_ts, launch_tid=1, cat="kernel"):
    """A GPU event on `stream` and the runtime call that launched it."""
    return [
        _x("cuda_runtime", "cudaLaunchKernel", launch_ts, 1, tid=launch_tid, correlation=corr),
        _x(cat, name, ts, dur, tid=stream, stream=stream, correlation=corr),
    ]


def synthetic_trace():
    """Times in us. Compute stream 7, NCCL stream 13, side stream 20. Iteration: ProfilerStep#5,
    host 0..110. Compute stream: a kernel of the previous step (-10..5, clipped to 0..5), expert
    GEMM (20..50, launched inside SequentialMLP), router kernel (60..62, inside TopKRouter),
    dense GEMM (50..60), element-wise (70..80), backward GEMM of the expert's forward op (96..100,
    scope through the fwdbwd flow), optimizer (102..104). NCCL: all-to-all 55..75 (hidden under
    50..62 and 70..75, exposed 62..70), all-reduce 85..95 (exposed). Side stream: attention
    22..28 (under the expert GEMM), memcpy 81..83 (in an idle gap)."""
    ev = [
        _x("user_annotation", "ProfilerStep#4", -30, 30),
        _x("user_annotation", "ProfilerStep#5", 0, 110),
        _x("user_annotation", "nn.Module: TopKRouter", 3, 2),
        _x("user_annotation", "nn.Module: SequentialMLP", 10, 20),
        _x("cpu_op", "aten::mm", 15, 2),
        {"ph": "s", "id": 9, "pid": 1, "tid": 1, "ts": 15, "cat": "fwdbwd", "name": "fwdbwd"},
        _x("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 60, 10, tid=2),
        _x("cpu_op", "MmBackward0", 61, 8, tid=2),
        {
            "ph": "f",
            "id": 9,
            "pid": 1,
            "tid": 2,
            "ts": 61,
            "cat": "fwdbwd",
            "name": "fwdbwd",
            "bp": "e",
        },
    ]
    ev += _kernel("vectorized_elementwise_kernel_prev", -10, 15, 7, 100, -20)
    ev += _kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 20, 30, 7, 1, 12)
    ev += _kernel("void at::native::sbtopk::gatherTopK<float>", 60, 2, 7, 10, 4)
    ev += _kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", 50, 10, 7, 2, 6)
    ev += _kernel("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 55, 20, 13, 3, 40)
    ev += _kernel("void at::native::vectorized_elementwise_kernel<4>", 70, 10, 7, 4, 45)
    ev += _kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 85, 10, 13, 5, 50)
    ev += _kernel("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", 96, 4, 7, 6, 62, launch_tid=2)
    ev += _kernel("void multi_tensor_apply_kernel<AdamFunctor>", 102, 2, 7, 8, 90)
    ev += _kernel("flash_fwd_kernel", 22, 6, 20, 7, 13)
    ev += _kernel("Memcpy HtoD (Pageable -> Device)", 81, 2, 20, 11, 70, cat="gpu_memcpy")
    return {"traceEvents": ev}


def test_synthetic_exact():
    b = breakdown(synthetic_trace(), step=5)
    assert b["step"] == 5 and b["wall_ms"] == pytest.approx(0.110)
    assert b["compute_stream"] == 7
    us = {k: round(v * 1e3, 6) for k, v in b["exclusive_ms"].items()}
    assert us == {
        "attention": 0,
        "expert_gemm": 34,  # 20..50 and the backward GEMM 96..100
        "gemm_other": 10,
        "router_permute": 2,
        "norm_elementwise": 15,  # 0..5 (clipped) and 70..80
        "optimizer": 2,
        "other": 0,
        "exposed_all_to_all": 8,
        "exposed_reduce": 10,
        "memcpy_memset": 2,
        "host_gap": 27,  # 5..20, 80..81, 83..85, 95..96, 100..102, 104..110
    }
    assert sum(us.values()) == pytest.approx(110)
    assert sum(b["fractions"].values()) == pytest.approx(1.0, abs=1e-3)
    k = {c: round(v * 1e3, 6) for c, v in b["kernel_ms"].items()}
    assert k["attention"] == 6 and k["nccl_all_to_all"] == 20 and k["nccl_reduce"] == 10
    assert k["expert_gemm"] == 34 and k["memcpy_memset"] == 2
    assert b["hidden_ms"] == {"all_to_all": pytest.approx(0.012), "reduce": 0.0}
    busy = {s: round(v["busy_ms"] * 1e3, 6) for s, v in b["streams"].items()}
    assert busy == {"7": 63, "13": 30, "20": 8}
    gaps = b["host_gaps"]
    assert gaps["count"] == 6
    assert [(round(g["at_ms"] * 1e3, 6), round(g["ms"] * 1e3, 6)) for g in gaps["largest"][:2]] == [
        (5, 15),
        (104, 6),
    ]
    top = [(t["name"][:8], round(t["ms"] * 1e3, 6)) for t in b["top_kernels"]["expert_gemm"]]
    assert top == [("sm90_xmm", 30), ("nvjet_ts", 4)]


def _rank_trace(a2a, base_ns=0):
    """One rank's iteration (ProfilerStep#5, host 0..200 us) with all-to-all kernels `a2a`
    [(start, dur)] in absolute us, written relative to `base_ns` as newer Kineto traces do; one
    all-to-all of the previous iteration (-20..5, clipped, so not listed) and one all-reduce."""
    b = base_ns / 1e3
    ev = [_x("user_annotation", "ProfilerStep#5", 0 - b, 200)]
    ev += _kernel("ncclDevKernel_SendRecv(prev)", -20 - b, 25, 13, 99, -30 - b)
    for i, (t, d) in enumerate(a2a):
        ev += _kernel("ncclDevKernel_SendRecv(x)", t - b, d, 13, i + 1, 1 - b)
    ev += _kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 150 - b, 10, 13, 50, 2 - b)
    return {"traceEvents": ev, "baseTimeNanoseconds": base_ns}


def test_peer_wait_splits_all_to_all_time_into_waiting_and_the_rest():
    """Rank 0 starts the first all-to-all at 10 us, rank 1 at 30: both end at 40, so rank 0 waited
    20 us and each spent 10 after the last start. Second one: rank 1 first (60 vs 70), both end at
    90: rank 1 waited 10. Rank 1's trace is written relative to another base time: the spans are
    compared on the host clock. The previous iteration's all-to-all (clipped at the window's start)
    and the all-reduce are not counted."""
    r0 = _rank_trace([(10, 30), (70, 20)])
    r1 = _rank_trace([(30, 10), (60, 30)], base_ns=7000)
    s0, s1 = all_to_all_spans(r0, step=5), all_to_all_spans(r1, step=5)
    assert s0 == [(10, 40), (70, 90)] and s1 == [(30, 40), (60, 90)]
    pw = peer_wait({0: s0, 1: s1})
    assert pw["matched"] and pw["count"] == 2
    us = {r: {k: round(v * 1e3, 6) for k, v in x.items() if k.endswith("_ms")}
          for r, x in pw["ranks"].items()}  # fmt: skip
    assert us == {
        "0": {"kernel_ms": 50, "wait_ms": 20, "rest_ms": 30},
        "1": {"kernel_ms": 40, "wait_ms": 10, "rest_ms": 30},
    }
    assert pw["ranks"]["0"]["largest_waits"][0] == {"index": 0, "ms": 0.02}
    assert pw["ranks"]["1"]["largest_waits"][0] == {"index": 1, "ms": 0.01}
    # a rank that lists another number of all-to-alls is reported, not paired
    bad = peer_wait({0: s0, 1: s1[:1]})
    assert bad == {"matched": False, "counts": {"0": 2, "1": 1}}


def test_host_pace_sets_module_host_time_beside_the_gpu_time_it_launched():
    """Times in us. Step 5 is host 0..200. FluidMoELayer 10..110 (host 100 us) launches a 20 us
    kernel and a 4 us memcpy and waits 30 us in cudaStreamSynchronize; the router inside it
    (20..40) launches a 2 us kernel, which both ranges count. A launch on another thread inside the
    layer's time (the backward thread) is not the layer's. The GPU-side copy of the layer's range
    (`gpu_user_annotation`) is not a second call. Outside every module: one cudaEventSynchronize
    of 5 us inside the step and one in the previous step (not counted)."""
    ev = [
        _x("user_annotation", "ProfilerStep#4", -100, 100),
        _x("user_annotation", "ProfilerStep#5", 0, 200),
        _x("user_annotation", "nn.Module: FluidMoELayer", 10, 100),
        _x("gpu_user_annotation", "nn.Module: FluidMoELayer", 50, 60, tid=7),
        _x("user_annotation", "nn.Module: FluidTopKRouter", 20, 20),
        *_kernel("router_kernel", 45, 2, 7, corr=1, launch_ts=25),
        *_kernel("gemm", 60, 20, 7, corr=2, launch_ts=50),
        *_kernel("Memcpy DtoH", 82, 4, 7, corr=3, launch_ts=60, cat="gpu_memcpy"),
        _x("cuda_runtime", "cudaStreamSynchronize", 61, 30, correlation=4),
        *_kernel("bwd_gemm", 90, 8, 7, corr=5, launch_ts=70, launch_tid=2),
        _x("cuda_runtime", "cudaEventSynchronize", 150, 5, correlation=6),
        _x("cuda_runtime", "cudaEventSynchronize", -50, 9, correlation=7),
    ]
    hp = host_pace({"traceEvents": ev}, step=5)
    assert list(hp["modules"]) == ["FluidMoELayer", "FluidTopKRouter"]  # by host time
    layer, router = hp["modules"]["FluidMoELayer"], hp["modules"]["FluidTopKRouter"]
    assert layer == {
        "calls": 1,
        "host_ms": 0.1,
        "gpu_ms": 0.026,
        "kernels": 3,
        "syncs": 1,
        "sync_ms": 0.03,
    }
    assert router == {
        "calls": 1,
        "host_ms": 0.02,
        "gpu_ms": 0.002,
        "kernels": 1,
        "syncs": 0,
        "sync_ms": 0.0,
    }
    assert hp["syncs_outside_modules"] == {"count": 1, "ms": 0.005}
    text = host_pace_markdown({"fluid": hp})
    assert "| FluidMoELayer | 1 | 0.10 | 0.03 | 3 | 1 | 0.03 |" in text
    assert "1 device syncs outside modules (0.01 ms waiting)" in text


def test_step_choice_and_markdown(tmp_path):
    p = tmp_path / "t.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump(synthetic_trace(), f)
    last = breakdown(p)  # default: the last ProfilerStep
    assert last["step"] == 5 and last["wall_ms"] == pytest.approx(0.110)
    with pytest.raises(ValueError, match="ProfilerStep#7"):
        breakdown(p, step=7)
    md = markdown({"stock": last, "fluid": last})
    assert md.startswith("| | stock | fluid |")
    assert all(f"| {c} |" in md for c in EXCLUSIVE)
    assert "| host_gap | 0.03 (24.5%) | 0.03 (24.5%) |" in md
    assert "stock: 6 idle stretches" in md
    assert "| `sm90_xmma_gemm_bf16bf16_bf16f32` | expert_gemm | 0.03 | 1 |" in md


@pytest.mark.parametrize(
    "name,scope,want",
    [
        ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", (), "nccl_reduce"),
        ("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t", (), "nccl_all_to_all"),
        # an emulated link's transfer time (torch.cuda._sleep), even inside the MoE layer
        (
            "at::cuda::(anonymous namespace)::spin_kernel(long)",
            ("nn.Module: MoELayer",),
            "nccl_all_to_all",
        ),
        ("cutlass::Kernel2<GroupedGemm...>", (), "expert_gemm"),
        ("nvjet_tst_128x256", ("nn.Module: SelfAttention", "nn.Module: Linear"), "gemm_other"),
        ("ampere_bf16_s16816gemm", ("nn.Module: DotProductAttention",), "attention"),
        ("scaled_masked_softmax_warp_forward", ("nn.Module: FusedScaleMaskSoftmax",), "attention"),
        (
            "nvjet_tst_128x256",
            ("nn.Module: FluidMoELayer", "nn.Module: FluidGroupedMLP"),
            "expert_gemm",
        ),
        ("nvjet_tst_64x8", ("nn.Module: MoELayer", "nn.Module: TopKRouter"), "gemm_other"),
        ("void at::native::index_elementwise_kernel", ("nn.Module: MoELayer",), "router_permute"),
        (
            "void at::native::vectorized_elementwise_kernel<silu>",
            ("nn.Module: SequentialMLP",),
            "norm_elementwise",
        ),
        (
            "void at::native::vectorized_elementwise_kernel",
            ("Optimizer.step#Adam.step",),
            "optimizer",
        ),
        ("void at::native::reduce_kernel<512, 1>", (), "norm_elementwise"),
        ("some_custom_op", (), "other"),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", (), "attention"),
    ],
)
def test_categorize_rules(name, scope, want):
    assert categorize(name, "kernel", scope) == want


def test_scope_chain_on_real_cpu_trace(tmp_path):
    """A real torch.profiler trace of a tiny model (module ranges from module_scope_hooks), with
    two launches added inside the backward nodes of its two Linear layers: the one of the layer
    inside `Experts` is an expert GEMM through the fwdbwd flow, the other a dense GEMM."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile, schedule

    from fluid.testing.bench.breakdown import load, module_scope_hooks

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Experts())
    x = torch.randn(4, 8)
    path = tmp_path / "cpu.json"
    handles = module_scope_hooks()
    try:
        with profile(
            activities=[ProfilerActivity.CPU],
            schedule=schedule(wait=0, warmup=1, active=1, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(str(path)),
        ) as prof:
            for _ in range(3):
                model(x).sum().backward()
                prof.step()
    finally:
        for h in handles:
            h.remove()
    trace = load(path)
    ev = trace["traceEvents"]
    names = {e.get("name") for e in ev}
    assert {"nn.Module: Experts", "nn.Module: Linear", "nn.Module: Sequential"} <= names
    nodes = sorted(
        (e for e in ev if e.get("ph") == "X" and e.get("name") == "AddmmBackward0"),
        key=lambda e: e["ts"],
    )
    assert len(nodes) == 2  # backward runs the Experts' Linear first, then the dense one
    t_end = max(e["ts"] + e.get("dur", 0) for e in ev if e.get("ph") == "X")
    for i, node in enumerate(nodes):
        launch_ts = node["ts"] + node["dur"] / 2
        ev += _kernel(
            f"nvjet_gemm_{i}", t_end + 10 + 10 * i, 5, 7, 90000 + i, launch_ts, node["tid"]
        )
    from fluid.testing.bench.breakdown import gpu_events

    _, gpu = gpu_events(trace)
    cats = {name: c for *_, name, c in gpu}
    assert cats == {"nvjet_gemm_0": "expert_gemm", "nvjet_gemm_1": "gemm_other"}


def _probe(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "benchmarks.probes.breakdown", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def test_probe_dry_run():
    d = json.loads(
        _probe(
            "--dry-run",
            "--recipes",
            "e2e_mixtral_1gpu,e2e_fine_1gpu",
            "--step",
            "5",
            "--variants",
            "stock,fluid_off,fluid",
        )  # fmt: skip
    )
    assert set(d) == {"e2e_mixtral_1gpu", "e2e_fine_1gpu"}
    for runs in d.values():
        assert set(runs) == {"stock", "fluid_off", "fluid"}
        for v, r in runs.items():
            a = r["argv"]
            assert a[a.index("--train-iters") + 1] == "6"
            assert a[a.index("--profile-step-start") + 1] == "5"
            assert a[a.index("--profile-step-end") + 1] == "6"
            assert a[a.index("--profile-ranks") + 1] == "0"
            assert "--profile" in a and "--use-pytorch-profiler" in a
            assert ("--use-fluid-moe" in a) == (v != "stock")
            tb = a[a.index("--tensorboard-dir") + 1]
            assert r["trace"] == str(Path(tb).parent / "torch_profile" / "rank-0.json.gz")
            assert r["cmd"][r["cmd"].index("-m", 3) + 1 :][:2] == [
                "benchmarks.probes.breakdown",
                "--worker",
            ]
            assert r["megatron_parse"] == "ok" or r["megatron_parse"].startswith("skipped")


def test_probe_dry_run_link_and_variants():
    """`--link` and `--variants` reach every run: the link's environment (P2P off, one NCCL
    channel), the combined-1F1B variant's 32 hardware queues, the others' one; a link the recipe
    does not list is refused before anything runs."""
    d = json.loads(
        _probe(
            "--dry-run",
            "--recipes",
            "e2e_fine_ep2",
            "--variants",
            "fluid_off,fluid_1f1b",
            "--link",
            "p2poff_1ch",
        )  # fmt: skip
    )
    runs = d["e2e_fine_ep2"]
    assert set(runs) == {"fluid_off", "fluid_1f1b"}
    for v, r in runs.items():
        assert r["env"]["NCCL_P2P_DISABLE"] == "1" and r["env"]["NCCL_MAX_NCHANNELS"] == "1"
        assert r["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == ("32" if v == "fluid_1f1b" else "1")
    assert "--overlap-moe-expert-parallel-comm" in runs["fluid_1f1b"]["argv"]
    for r in runs.values():  # every rank profiled: peer_wait needs both traces
        a = r["argv"]
        assert a[a.index("--profile-ranks") + 1 : a.index("--profile-ranks") + 3] == ["0", "1"]
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes.breakdown", "--dry-run", "--recipes",
         "e2e_fine_1gpu", "--link", "p2poff_1ch"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert p.returncode != 0 and "has no link 'p2poff_1ch'" in p.stderr


def test_probe_out_name_keeps_links_apart():
    from benchmarks.probes.breakdown import out_name

    assert out_name("e2e_fine_ep2", "nvlink") == "e2e_fine_ep2"
    assert out_name("e2e_fine_ep2", "p2poff_1ch") == "e2e_fine_ep2_p2poff_1ch"


def test_probe_gpu_command():
    cmd = _probe("--print-command")
    assert len(cmd) < 1500
    assert cmd.startswith("source benchmarks/gpu_env.sh && ")
    assert "--recipes e2e_mixtral_1gpu,e2e_fine_1gpu --variants stock,fluid --out $OUT" in cmd


def test_probe_worker_runs_script_with_module_scopes(tmp_path):
    """`--worker SCRIPT ARGS`: the script runs as __main__ with its arguments, and a profiler
    trace taken inside it carries the `nn.Module: <Class>` ranges of module_scope_hooks."""
    pytest.importorskip("torch")
    script = tmp_path / "fake_pretrain.py"
    script.write_text(
        "import json, sys, torch\n"
        "from torch.profiler import profile, ProfilerActivity\n"
        "if __name__ == '__main__':\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "    with profile(activities=[ProfilerActivity.CPU]) as p:\n"
        "        m(torch.randn(2, 4))\n"
        "    p.export_chrome_trace(sys.argv[2])\n"
        "    print(json.dumps(sys.argv[1:]))\n"
    )
    trace = tmp_path / "t.json"
    out = _probe("--worker", str(script), "--flag", str(trace))
    assert json.loads(out) == ["--flag", str(trace)]
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"nn.Module: Sequential", "nn.Module: Linear"} <= names


FAKE_PRETRAIN = """
import argparse, torch
from pathlib import Path
ap = argparse.ArgumentParser(allow_abbrev=False)
for f in ("--tensorboard-dir", "--profile-step-start", "--profile-step-end", "--train-iters"):
    ap.add_argument(f)
a, _ = ap.parse_known_args()
start, end, iters = int(a.profile_step_start), int(a.profile_step_end), int(a.train_iters)

def handler(p):  # Megatron's trace_handler (training.py at the pin)
    d = Path(f"{a.tensorboard_dir}/../torch_profile")
    d.mkdir(parents=True, exist_ok=True)
    p.export_chrome_trace(f"{d}/rank-0.json.gz")

sched = torch.profiler.schedule(wait=max(start - 1, 0), warmup=1, active=end - start, repeat=1)
prof = torch.profiler.profile(schedule=sched, on_trace_ready=handler)
prof.start()
m = torch.nn.Linear(8, 8)
for it in range(iters):  # Megatron's loop: prof.step() first, stop after iteration `end`
    prof.step()
    m(torch.randn(4, 8)).sum().backward()
    print(f" [t] iteration {it + 1:8d}/{iters:8d} | elapsed time per iteration (ms): {10 + it}.0 |")
    if it + 1 == end:
        prof.stop()
"""


def test_probe_runs_a_stand_in_end_to_end(tmp_path):
    """The probe's whole path on CPU: torchrun, worker mode, Megatron's profiler schedule and trace
    handler (a stand-in script), the trace found, ProfilerStep#5 broken down, JSON and markdown
    written. The CPU trace has no GPU events: the whole window is host gap."""
    pytest.importorskip("torch")
    script = tmp_path / "pretrain_stand_in.py"
    script.write_text(FAKE_PRETRAIN)
    out = tmp_path / "out"
    _probe(
        "--recipes", "e2e_fine_1gpu", "--variants", "stock", "--out", str(out),
        "--script", str(script), "--commit", "abc", "--budget-s", "200",
    )  # fmt: skip
    doc = json.loads((out / "breakdown_e2e_fine_1gpu.json").read_text())
    assert doc["meta"]["commit"] == "abc"
    r = doc["variants"]["stock"]
    assert r["rc"] == 0, (out / "breakdown_e2e_fine_1gpu_stock.log").read_text()[-2000:]
    assert r["iters_ms"] == {str(i): 9.0 + i for i in range(1, 7)}
    b = r["breakdown"]
    assert b["step"] == 5 and b["wall_ms"] > 0
    assert b["exclusive_ms"]["host_gap"] == pytest.approx(b["wall_ms"])
    assert (out / "trace_e2e_fine_1gpu_stock.json.gz").exists()
    text = (out / "breakdown_e2e_fine_1gpu.md").read_text()
    assert text.startswith("# e2e_fine_1gpu")
    # the worker's module scopes reach host_pace: the stand-in's Linear, no GPU time on CPU
    lin = r["host_pace"]["modules"]["Linear"]
    assert lin["calls"] >= 1 and lin["host_ms"] > 0 and lin["gpu_ms"] == 0
    assert "| Linear |" in text
