"""Tier: cpu. The FluidMoE settings are Megatron flags (patch 0001): TransformerConfig fields with
the defaults FluidConfig expects; with the full tree, `pretrain_gpt.py --help` lists every flag and
Megatron's parser carries the values into the TransformerConfig the model is built from."""

import dataclasses
import sys

import pytest
import torch

from fluid.config import FIELDS, FluidConfig
from tests.conftest import needs_full_tree


def test_every_knob_is_a_transformer_config_field_with_fluidconfigs_default():
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    defaults = FluidConfig()
    for name, (cfg_field, _) in FIELDS.items():
        assert cfg_field in fields, cfg_field
        assert fields[cfg_field].default == getattr(defaults, name), cfg_field
    assert set(FIELDS) == {f.name for f in dataclasses.fields(FluidConfig)}


def test_fields_reach_fluidconfig():
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=4,
        use_cpu_initialization=True,
        use_fluid_moe=True,
        fluid_scheduler=False,
        fluid_overlap="never",
        fluid_min_window_bytes=0,
        fluid_sm_carveout=16,
        fluid_moe_chunks=2,
        fluid_moe_dedup="off",
        fluid_grouped_gemm="on",
        fluid_wgrad_accumulation="unfused",  # not the default (auto)
        fluid_torch_adam="fused",  # not the default (auto)
        fluid_scheduler_timing=True,
    )
    assert FluidConfig.from_config(cfg) == FluidConfig(
        scheduler=False,
        scheduler_timing=True,
        overlap="never",
        min_window_bytes=0,
        sm_carveout=16,
        moe_chunks=2,
        moe_dedup="off",
        grouped_gemm="on",
        wgrad_accumulation="unfused",
        torch_adam="fused",
    )


ARGV = [
    "pretrain_gpt.py",
    "--use-fluid-moe",
    "--num-experts",
    "4",
    "--no-fluid-scheduler",
    "--fluid-scheduler-timing",
    "--fluid-overlap",
    "always",
    "--fluid-min-window-bytes",
    "4096",
    "--fluid-sm-carveout",
    "8",
    "--fluid-moe-chunks",
    "2",
    "--fluid-moe-dedup",
    "on",
    "--fluid-grouped-gemm",
    "off",
    "--fluid-wgrad-accumulation",
    "fused",
    "--fluid-torch-adam",
    "foreach",
]


@needs_full_tree
def test_parse_args_carries_every_flag_into_the_config(monkeypatch):
    from megatron.training.arguments import core_transformer_config_from_args, parse_args

    # --no-rope-fusion: Megatron's default rope fusion needs Transformer Engine (not installed).
    monkeypatch.setattr(
        sys,
        "argv",
        ARGV
        + [
            "--num-layers",
            "2",
            "--hidden-size",
            "64",
            "--num-attention-heads",
            "4",
            "--no-rope-fusion",
        ],
    )
    args = parse_args(ignore_unknown_args=True)
    assert args.fluid_scheduler is False and args.fluid_overlap == "always"
    # validate_args derives params_dtype from --bf16/--fp16 but needs a launched world; fp32 here.
    args.params_dtype = torch.float32
    cfg = core_transformer_config_from_args(args)
    assert FluidConfig.from_config(cfg) == FluidConfig(
        scheduler=False,
        scheduler_timing=True,
        overlap="always",
        min_window_bytes=4096,
        sm_carveout=8,
        moe_chunks=2,
        moe_dedup="on",
        grouped_gemm="off",
        wgrad_accumulation="fused",
        torch_adam="foreach",
    )


@needs_full_tree
@pytest.mark.parametrize(
    "flag,bad",
    [
        ("--fluid-overlap", "sometimes"),
        ("--fluid-grouped-gemm", "1"),
        ("--fluid-wgrad-accumulation", "on"),
        ("--fluid-torch-adam", "on"),
        ("--fluid-moe-chunks", "two"),
    ],
)
def test_parser_refuses_a_bad_value_naming_the_flag(monkeypatch, capsys, flag, bad):
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", flag, bad])
    with pytest.raises(SystemExit):
        parse_args(ignore_unknown_args=True)
    assert flag in capsys.readouterr().err


@needs_full_tree
def test_pretrain_gpt_help_lists_every_fluid_flag():
    import subprocess
    from pathlib import Path

    import megatron.core

    script = Path(megatron.core.__file__).parents[2] / "pretrain_gpt.py"
    res = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for _, fl in FIELDS.values():
        assert fl in res.stdout, fl
    assert "--use-fluid-moe" in res.stdout
