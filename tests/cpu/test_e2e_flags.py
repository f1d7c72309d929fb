"""Tier: cpu (full tree). Every variant of benchmarks/e2e.py, the end-to-end GPU driver, passes
Megatron's own `parse_args` + `validate_args` for 4 ranks, and `--use-fluid-moe` variants also pass
FluidMoE's build-time validation of the resulting TransformerConfig: a bad flag combination fails
here on CPU instead of costing a GPU run."""

import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import needs_full_tree

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.e2e import VARIANTS, variant_args  # noqa: E402


def _argv(name, tmp_path):
    return ["pretrain_gpt.py", *variant_args(name, 50, tmp_path).split()]


@needs_full_tree
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_accepted(name, tmp_path, monkeypatch):
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32" if "ep_overlap" in name else "1")
    with mock.patch.object(sys, "argv", _argv(name, tmp_path)):
        args = parse_args()
    with mock.patch("megatron.training.arguments.get_device_arch_version", return_value=9):
        validate_args(args, {})
    if args.use_fluid_moe:
        from fluid.megatron.validate import validate_config

        validate_config(core_transformer_config_from_args(args))
