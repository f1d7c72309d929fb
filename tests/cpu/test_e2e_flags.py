"""Tier: cpu. The pretrain_gpt.py arguments the GPU drivers pass: every variant of every end-to-end
recipe (`python -m benchmarks.e2e_job` prints them, checked against the TransformerConfig fields
and its list of training flags) and every run of the compatibility probe
(`python -m benchmarks.probes.compat --print-argv`). With the full tree each also passes Megatron's
own `parse_args` + `validate_args` (2 or 4 ranks), and `--use-fluid-moe` ones FluidMoE's build-time
validation of the resulting TransformerConfig: a bad flag fails here on CPU instead of costing a
GPU run. The drivers run as subprocesses (tests do not import benchmarks/)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import needs_full_tree

ROOT = Path(__file__).resolve().parents[2]


def _json_of(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recipe_argvs():
    return _json_of("benchmarks.e2e_job")


@pytest.fixture(scope="module")
def compat_argvs():
    return _json_of(
        "benchmarks.probes.compat", "--print-argv", "--ckpt-dir", "/tmp/fluid_compat_ckpt"
    )


def test_recipe_variants_are_checked(recipe_argvs):
    assert {"e2e_mixtral_ep2", "e2e_fine_ep2", "e2e_mixtral_1gpu"} <= set(recipe_argvs)
    from benchmarks import recipes as R

    for recipe, variants in recipe_argvs.items():
        want = {v for v in R.get(recipe).variants if "#" not in v}
        assert {"fluid_off", "fluid"} <= want and set(variants) == want, recipe
        for v in variants.values():
            assert v["megatron_parse"] == "ok" or v["megatron_parse"].startswith("skipped")


def _parse(argv, world, ep_overlap=False):
    from megatron.training.arguments import (
        core_transformer_config_from_args,
        parse_args,
        validate_args,
    )

    env = {
        "WORLD_SIZE": str(world),
        "RANK": "0",
        "CUDA_DEVICE_MAX_CONNECTIONS": "32" if ep_overlap else "1",
    }
    with (
        mock.patch.dict(os.environ, env),
        mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]),
    ):
        args = parse_args()
    with mock.patch("megatron.training.arguments.get_device_arch_version", return_value=9):
        validate_args(args, {})
    if args.use_fluid_moe:
        from fluid.megatron.validate import validate_config

        validate_config(core_transformer_config_from_args(args))
    return args


@needs_full_tree
def test_recipe_variants_pass_megatron(recipe_argvs):
    for recipe, variants in recipe_argvs.items():
        for name, v in variants.items():
            assert v["megatron_parse"] == "ok", (recipe, name)
            world = 4 if "ep4" in recipe else 2 if "ep2" in recipe else 1
            args = _parse(v["argv"], world)
            assert args.use_fluid_moe == (name != "stock")
            if name == "fluid_off":
                assert args.fluid_scheduler is False


@needs_full_tree
def test_compat_variants_pass_megatron(compat_argvs):
    for name, argv in compat_argvs.items():
        _parse(argv, 4, ep_overlap="ep_overlap" in name)
