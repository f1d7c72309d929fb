"""Tier: cpu. examples/run_mixtral_8x7b.sh is valid bash, and the pretrain_gpt.py command it
builds (DRY_RUN=1 prints it) is accepted by Megatron's own argument parser and validator: every
flag exists at the pinned Megatron (`parse_args` exits on an unknown one), the values are the
Mixtral-8x7B ones, and `validate_args` accepts the parallel layout for the default 4x8-GPU
cluster, one 8-GPU node with PP=4/EP=2 and the 2-GPU smoke shape. Skipped in core-only mode
(no megatron.training there).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import needs_full_tree

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "run_mixtral_8x7b.sh"

# Flags the end-to-end benchmarks (benchmarks/e2e_job.py) run stock pretrain_gpt.py with where neither TE nor apex exists.
NO_TE_FLAGS = (
    "--transformer-impl",
    "--no-rope-fusion",
    "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm",
    "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion",
)


def _dry_run(**env) -> list[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("NNODES", "PP", "EP", "CP", "TP")}
    p = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**full, **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    argv = shlex.split(p.stdout)
    i = next(k for k, a in enumerate(argv) if a.endswith("pretrain_gpt.py"))
    return argv[i:]


def test_bash_syntax():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_launcher_env():
    text = SCRIPT.read_text()
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    assert "NCCL_NVLS_ENABLE" in text
    argv = _dry_run()
    for flag in NO_TE_FLAGS + ("--use-fluid-moe", "--mock-data"):
        assert flag in argv, flag


def _parse(argv, world, monkeypatch):
    from megatron.training.arguments import parse_args, validate_args

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # the script exports it
    with mock.patch.object(sys, "argv", argv):
        args = parse_args()  # SystemExit on any unknown flag
    # With CP > 1 the validator asks the GPU's architecture; answer Hopper (9), the cards used.
    with mock.patch("megatron.training.arguments.get_device_arch_version", return_value=9):
        validate_args(args, {})
    return args


@needs_full_tree
def test_mixtral_defaults_accepted_by_megatron(monkeypatch):
    args = _parse(_dry_run(), 32, monkeypatch)
    expect = dict(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        num_experts=8,
        moe_router_topk=2,
        seq_length=4096,
        rotary_base=1000000,
        layernorm_epsilon=1e-5,
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        bf16=True,
        lr=1e-4,
        vocab_size=32000,
        normalization="RMSNorm",
        position_embedding_type="rope",
        transformer_impl="local",
        use_fluid_moe=True,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=4,
        expert_model_parallel_size=8,
        moe_token_dispatcher_type="alltoall",
        use_distributed_optimizer=True,
    )
    got = {k: getattr(args, k) for k in expect}
    assert got == expect
    assert args.data_parallel_size == 8  # 32 GPUs / PP 4


@needs_full_tree
@pytest.mark.parametrize(
    "env,world",
    [
        (dict(NNODES="1", GPUS_PER_NODE="8", PP="4", EP="2"), 8),
        (
            dict(
                NUM_LAYERS="2",
                SEQ_LENGTH="1024",
                NNODES="1",
                GPUS_PER_NODE="2",
                PP="1",
                EP="2",
                GLOBAL_BATCH="8",
                TRAIN_ITERS="5",
            ),
            2,
        ),
        (
            dict(
                NNODES="1",
                GPUS_PER_NODE="8",
                PP="1",
                EP="4",
                CP="2",
                DATA_PATH="1.0 /data/x_text_document",
                TOKENIZER_MODEL="/m/tokenizer.model",
            ),
            8,
        ),
    ],
)
def test_layouts_accepted_by_megatron(env, world, monkeypatch):
    argv = _dry_run(**env)
    args = _parse(argv, world, monkeypatch)
    assert args.expert_model_parallel_size == int(env["EP"])
    assert args.use_fluid_moe
    if "DATA_PATH" in env:
        assert args.data_path == ["1.0", "/data/x_text_document"] and not args.mock_data


@needs_full_tree
def test_unknown_flag_is_caught(monkeypatch):
    """The check above can fail: a flag Megatron does not know makes parse_args exit."""
    with pytest.raises(SystemExit):
        _parse(_dry_run(EXTRA_ARGS="--no-such-fluid-flag"), 32, monkeypatch)
