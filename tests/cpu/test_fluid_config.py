"""Tier: cpu. FluidConfig, the one place FluidMoE's settings are read and checked.

What must hold: every bad value fails when the config is built with a FluidConfigError naming the
flag (not a bare `int()` error, not accepted as "on"); a FLUID_* environment variable (how older
versions were configured) changes nothing and is reported with its flag; no module of the overlay
outside fluid/config.py reads a FLUID_* variable.
"""

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from fluid.config import RETIRED_ENV, FluidConfig, FluidConfigError

OVERLAY = Path(__file__).resolve().parents[2] / "overlay" / "fluid"


@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("fluid_scheduler", 2, "--no-fluid-scheduler"),
        ("fluid_scheduler", "off", "--no-fluid-scheduler"),
        ("fluid_scheduler_timing", "bogus", "--fluid-scheduler-timing"),
        ("fluid_overlap", "sometimes", "--fluid-overlap"),
        ("fluid_min_window_bytes", -1, "--fluid-min-window-bytes"),
        ("fluid_min_window_bytes", "1M", "--fluid-min-window-bytes"),
        ("fluid_sm_carveout", -3, "--fluid-sm-carveout"),
        ("fluid_sm_carveout", "auto", "--fluid-sm-carveout"),
        ("fluid_moe_chunks", 0, "--fluid-moe-chunks"),
        ("fluid_moe_chunks", "2", "--fluid-moe-chunks"),
        ("fluid_moe_dedup", True, "--fluid-moe-dedup"),
        ("fluid_grouped_gemm", "1", "--fluid-grouped-gemm"),
        ("fluid_wgrad_accumulation", "on", "--fluid-wgrad-accumulation"),
        ("fluid_torch_adam", "on", "--fluid-torch-adam"),
        ("fluid_torch_adam", True, "--fluid-torch-adam"),
    ],
)
def test_bad_value_fails_naming_the_flag(field, value, flag):
    with pytest.raises(FluidConfigError, match=re.escape(flag)):
        FluidConfig.from_config(SimpleNamespace(**{field: value}))


def test_defaults_and_good_values():
    assert FluidConfig.from_config(SimpleNamespace()) == FluidConfig()
    fc = FluidConfig.from_config(
        SimpleNamespace(
            fluid_sm_carveout=0,
            fluid_min_window_bytes=0,
            fluid_moe_chunks=4,
            fluid_overlap="never",
            fluid_torch_adam="foreach",
        )
    )
    assert (fc.sm_carveout, fc.min_window_bytes, fc.moe_chunks, fc.overlap) == (0, 0, 4, "never")
    assert fc.torch_adam == "foreach"
    with pytest.raises(dataclasses_frozen_error()):
        fc.overlap = "always"


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_environment_variables_change_nothing_and_are_reported(monkeypatch):
    for name in RETIRED_ENV:
        monkeypatch.setenv(name, "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fc = FluidConfig.from_config(SimpleNamespace())
    assert fc == FluidConfig()
    text = "\n".join(str(w.message) for w in caught)
    for name, flag in RETIRED_ENV.items():
        assert f"{name}: set {flag}" in text


def test_no_fluid_env_read_outside_config_construction():
    pattern = re.compile(r"environ[^\n]*FLUID_|getenv\([^\n]*FLUID_")
    offenders = [
        str(p.relative_to(OVERLAY))
        for p in OVERLAY.rglob("*.py")
        if p.name != "config.py" and ("FLUID_" in p.read_text() and pattern.search(p.read_text()))
    ]
    assert offenders == []
    # and no variable's name at all outside config.py (docstrings name the flags instead)
    names = re.compile(r"\b(" + "|".join(RETIRED_ENV) + r")\b")
    named = [
        str(p.relative_to(OVERLAY))
        for p in OVERLAY.rglob("*.py")
        if p.name != "config.py" and names.search(p.read_text())
    ]
    assert named == []


@pytest.mark.parametrize(
    "fields,flag",
    [
        ({"fluid_overlap": "bogus"}, "--fluid-overlap"),
        ({"fluid_min_window_bytes": -1}, "--fluid-min-window-bytes"),
        ({"fluid_torch_adam": "bogus"}, "--fluid-torch-adam"),
        ({"moe_router_topk": 5, "moe_router_load_balancing_type": "none"}, "--moe-router-topk 5"),
        ({"fluid_moe_dedup": "on", "fluid_moe_chunks": 2}, "--fluid-moe-chunks 1"),
    ],
)
def test_model_build_validator_names_the_flag(fields, flag):
    """What the layer-spec hook and get_fluid_moe_layer_spec run when the model is built."""
    from fluid.megatron.validate import validate_config

    with pytest.raises(FluidConfigError, match=re.escape(flag)):
        validate_config(_moe_config(**fields))


def _moe_config(**fields):
    """A small Fluid MoE TransformerConfig with `fields` set."""
    from fluid.testing.moe import tiny_config

    return tiny_config(use_fluid_moe=True, **fields)


def test_fused_wgrad_accumulation_is_refused_at_build_without_a_kernel(monkeypatch):
    """--fluid-wgrad-accumulation fused where neither torch's addmm(out_dtype=) nor apex's kernel
    exists fails when the model is built, naming the flag; auto and unfused build there."""
    import fluid.schedule.wgrad as wgrad
    from fluid.megatron.validate import validate_config

    def cfg(mode):
        return _moe_config(fluid_wgrad_accumulation=mode)

    assert validate_config(cfg("fused")).wgrad_accumulation == "fused"  # torch 2.11 has it
    monkeypatch.setattr(wgrad, "torch_fused_kernel_available", lambda: False)
    with pytest.raises(FluidConfigError, match=re.escape("--fluid-wgrad-accumulation fused")):
        validate_config(cfg("fused"))
    for mode in ("auto", "unfused"):
        assert validate_config(cfg(mode)).wgrad_accumulation == mode
