"""The torchtitan peer (benchmarks/peers/torchtitan/run.py) on the CPU.

test_job_args_*: the torchtitan CLI arguments carry the recipe's numbers (no torchtitan needed).
The rest needs torchtitan: importable already, or installed from .whl-peers/ (tools/stage_peers.sh)
into a temporary folder; skipped otherwise (CI does not stage the wheels).
  - the Qwen3 model torchtitan builds from a benchmark model has exactly the parameters that model
    has by hand count (GQA k/v widths, shared expert 2 x ffn, untied output, no q/k norm);
  - the runner trains the tiny model for two steps through torchtitan's own Trainer on the CPU and
    writes a record whose throughput follows from its step times by fluid.testing.bench.flops.
The runner's functions are called in a subprocess (`_runner`): tests do not import benchmarks/.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluid.testing.bench import flops
from fluid.testing.bench.models import MODELS, Model

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "benchmarks" / "peers" / "torchtitan" / "run.py"


def _runner(expr: str):
    """The JSON value of `expr`, evaluated with the runner imported as `run`, in a subprocess."""
    code = (
        "import dataclasses, json\nfrom benchmarks.peers.torchtitan import run\n"
        f"print(json.dumps({expr}))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _tiny() -> Model:
    return Model(**_runner("dataclasses.asdict(run.TINY)"))


def _flag(args, name):
    return args[args.index(name) + 1]


@pytest.mark.parametrize("name,world", [("mixtral", 1), ("fine", 1), ("mixtral", 2)])
def test_job_args_carry_the_recipe(name, world):
    m = MODELS[name]
    args, args_compiled = _runner(
        f"[run.job_args(run.ALL_MODELS[{name!r}], compile_=c, ep={world}, world={world}, steps=13, "
        f"dump='/tmp/x') for c in (False, True)]"
    )
    assert _flag(args, "--model.flavor") == name
    assert int(_flag(args, "--training.seq_len")) == m.seq
    assert int(_flag(args, "--training.local_batch_size")) == m.micro_batch
    # global batch = micro-batch x 8 accumulation steps x DP; torchtitan derives the accumulation
    assert int(_flag(args, "--training.global_batch_size")) == m.micro_batch * m.grad_accum * world
    assert float(_flag(args, "--optimizer.lr")) == m.lr
    assert (float(_flag(args, "--optimizer.beta1")), float(_flag(args, "--optimizer.beta2"))) == (
        0.9,
        0.999,
    )
    assert float(_flag(args, "--optimizer.eps")) == 1e-8
    assert float(_flag(args, "--optimizer.weight_decay")) == 0.1
    assert float(_flag(args, "--training.max_norm")) == 1.0
    assert _flag(args, "--activation_checkpoint.mode") == "none"
    assert int(_flag(args, "--parallelism.expert_parallel_degree")) == world
    assert "--compile.enable" not in args
    assert "--compile.enable" in args_compiled


@pytest.fixture(scope="module")
def torchtitan_path(tmp_path_factory):
    """PYTHONPATH entry under which torchtitan imports, or skip."""
    if importlib.util.find_spec("torchtitan") is not None:
        return ""
    wheels = sorted((REPO / ".whl-peers").glob("*.whl"))
    if not wheels:
        pytest.skip("torchtitan not installed and no .whl-peers/ (run tools/stage_peers.sh)")
    target = tmp_path_factory.mktemp("peers")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *map(str, wheels),
        ],
        check=True,
        capture_output=True,
    )
    return str(target)


def _env(path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (path, str(REPO), env.get("PYTHONPATH", "")) if p
    )
    return env


def hand_param_count(m):
    h, hd = m.hidden, m.head_dim
    attn = h * m.heads * hd * 2 + h * m.groups * hd * 2  # wq, wo, wk, wv
    moe = m.experts * 3 * h * m.ffn + h * m.experts + 3 * h * (m.shared_ffn or 0)
    norms = 2 * h
    return m.layers * (attn + moe + norms) + 2 * m.vocab * h + h  # embedding, output, final norm


def test_models_match_hand_count(torchtitan_path):
    names = ["tiny", "mixtral", "fine"]
    code = (
        "import json, torch\n"
        "from benchmarks.peers.torchtitan import run\n"
        "run.install_shims()\n"
        "from torchtitan.models.qwen3 import Qwen3Model\n"
        "out = {}\n"
        f"for name in {names!r}:\n"
        "    with torch.device('meta'):\n"
        "        model = Qwen3Model(run.model_args(run.ALL_MODELS[name]))\n"
        "    blk = model.layers['0']\n"
        "    shared = blk.moe.shared_experts\n"
        "    out[name] = dict(params=sum(p.numel() for p in model.parameters()),\n"
        "                     qk_norm=blk.attention.q_norm is not None,\n"
        "                     kv=blk.attention.wk.weight.shape[0],\n"
        "                     shared=shared.w1.weight.shape[0] if shared is not None else None,\n"
        "                     ffn=blk.moe.experts.w1.shape[1], experts=blk.moe.experts.w1.shape[0],\n"
        "                     tied=model.output.weight is model.tok_embeddings.weight)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(torchtitan_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        m = MODELS[name] if name in MODELS else _tiny()
        assert got[name] == dict(
            params=hand_param_count(m),
            qk_norm=False,
            kv=m.groups * m.head_dim,
            shared=m.shared_ffn,
            ffn=m.ffn,
            experts=m.experts,
            tied=False,
        ), name


def test_shared_expert_must_be_a_multiple_of_ffn():
    # checked before torchtitan is imported
    code = (
        "import dataclasses\nfrom benchmarks.peers.torchtitan import run\n"
        "run.model_args(dataclasses.replace(run.TINY, shared_ffn=48))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env(""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "ValueError" in p.stderr and "shared_ffn" in p.stderr, p.stderr[
        -2000:
    ]


def test_dry_run_tiny_trains(torchtitan_path, tmp_path):
    out = tmp_path / "tt.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            "--device",
            "cpu",
            "--models",
            "tiny",
            "--compile",
            "off",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--timeout",
            "500",
            "--out",
            str(out),
            "--logs",
            str(tmp_path / "logs"),
        ],
        env=_env(torchtitan_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (rec,) = json.loads(out.read_text())
    assert "error" not in rec, rec.get("log_tail")
    assert rec["framework"] == "torchtitan" and rec["torchtitan"] == "0.2.2"
    assert rec["model"] == "tiny" and rec["compile"] is False and rec["param_dtype"] == "float32"
    assert len(rec["step_times_s"]) == 2 and rec["warmup_steps"] == 1
    m = _tiny()
    assert rec["tokens_per_step_per_gpu"] == m.seq * m.micro_batch * m.grad_accum
    med = rec["step_time_median_s"]
    assert med == rec["step_times_s"][1]
    assert rec["tokens_per_s_per_gpu"] == pytest.approx(rec["tokens_per_step_per_gpu"] / med)
    assert rec["tflops_per_gpu"] == pytest.approx(
        flops.tflops_per_gpu(m, rec["tokens_per_step_per_gpu"], med)
    )
    # torchtitan's own Trainer logged the steps it trained (loss near ln(vocab) at init)
    log = next((tmp_path / "logs").glob("tiny_*.log")).read_text()
    losses = [
        float(line.split("loss:")[1].split()[0]) for line in log.splitlines() if "loss:" in line
    ]
    assert losses and all(abs(x - 5.55) < 1.5 for x in losses), losses
