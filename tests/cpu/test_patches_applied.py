"""Tier: cpu. The patch series is what Python imports: the `use_fluid_moe` field (0001), the
`--use-fluid-moe` flag in Megatron's own argument parser (full tree), the log-hook seam (0003),
TransformerConfig help strings that argparse can format (0004), the output-layer hook in GPTModel
(0005), the torch-Adam class and keyword hook in the optimizer builder (0006)."""

import inspect
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_full_tree


def _cfg(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def test_config_has_use_fluid_moe_default_false():
    cfg = _cfg(num_moe_experts=4)
    assert cfg.use_fluid_moe is False
    assert _cfg(num_moe_experts=4, use_fluid_moe=True).use_fluid_moe is True


def test_use_fluid_moe_on_dense_model_fails_with_a_message():
    with pytest.raises(ValueError, match="num_moe_experts"):
        _cfg(use_fluid_moe=True)


@needs_full_tree
def test_megatron_parser_accepts_use_fluid_moe(monkeypatch):
    import sys

    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", "--use-fluid-moe"])
    assert parse_args(ignore_unknown_args=True).use_fluid_moe is True
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"])
    assert parse_args(ignore_unknown_args=True).use_fluid_moe is False


@needs_full_tree
def test_training_log_calls_the_log_hook_group():
    from megatron.training import training

    src = inspect.getsource(training.training_log)
    assert 'entry_points(group="megatron.training.log_hooks")' in src


def test_fluid_log_hook_is_installed_as_entry_point():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="megatron.training.log_hooks")}
    assert "fluid.megatron.log_hook:log_scheduler_stats" in names


@needs_full_tree
def test_pretrain_gpt_help_lists_use_fluid_moe():
    """Stock `pretrain_gpt.py --help` works (patch 0004) and lists the flag (patch 0001)."""
    import subprocess
    import sys
    from pathlib import Path

    import megatron.core

    script = Path(megatron.core.__file__).parents[2] / "pretrain_gpt.py"
    res = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--use-fluid-moe" in res.stdout
    assert "Build attention and MoE layers from the FluidMoE overlay" in " ".join(
        res.stdout.split()
    )


def test_config_help_strings_survive_argparse():
    """Patch 0004, in either mode: every TransformerConfig field docstring of the imported
    megatron.core (Megatron's `--help` text for the field's flag) can be %-formatted by argparse.
    The probe is the one `make check-patches` runs: at the pristine pin it finds
    moe_paged_stash_buffer_size_factor_cuda's "10%)"."""
    import megatron.core

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import probes

    tree = Path(megatron.core.__file__).resolve().parents[2]
    assert probes.percent_safe_config_help(tree) == {}


def test_gpt_model_output_layer_goes_through_the_hook_group(monkeypatch):
    """Patch 0005: with use_fluid_moe, GPTModel builds its output layer with the class the
    `megatron.core.gpt_output_layer_hooks` group returns (FluidMoE's: FluidColumnParallelLinear for
    an untied layer, Megatron's class for a tied one); without the flag the hook is not called."""
    from importlib.metadata import entry_points

    from megatron.core.models.gpt import gpt_model
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    import fluid.megatron.output_layer as hook
    from fluid.linear import FluidColumnParallelLinear

    names = {ep.value for ep in entry_points(group=gpt_model.OUTPUT_LAYER_HOOK_GROUP)}
    assert "fluid.megatron.output_layer:output_layer_class" in names
    calls = []

    def spy(config, cls, tied):
        calls.append((cls, tied))
        return hook.__dict__["_real"](config, cls, tied)

    monkeypatch.setitem(hook.__dict__, "_real", hook.output_layer_class)
    monkeypatch.setattr(hook, "output_layer_class", spy)
    cfg = _cfg(use_fluid_moe=True, num_moe_experts=2)
    assert gpt_model._apply_output_layer_hooks(cfg, ColumnParallelLinear, False).func is (
        FluidColumnParallelLinear
    )
    assert gpt_model._apply_output_layer_hooks(cfg, ColumnParallelLinear, True) is (
        ColumnParallelLinear
    )
    assert calls == [(ColumnParallelLinear, False), (ColumnParallelLinear, True)]
    # multi-token prediction calls the output layer once per depth: Megatron's class
    mtp = _cfg(use_fluid_moe=True, num_moe_experts=2, mtp_num_layers=1)
    assert hook._real(mtp, ColumnParallelLinear, False) is ColumnParallelLinear
    src = inspect.getsource(gpt_model.GPTModel.__init__)
    assert 'getattr(config, "use_fluid_moe", False)' in src
    assert "_apply_output_layer_hooks(" in src


def test_optimizer_builder_calls_the_torch_adam_hook_group():
    """Patch 0006: where Megatron falls back to torch's Adam/AdamW and use_fluid_moe is set, the
    class and keyword arguments go through the `megatron.core.torch_adam_hooks` group (FluidMoE's:
    its subclass of the torch class, and fused=True for --fluid-torch-adam fused) and the builder
    calls the class returned; the builder itself: tests/cpu/test_torch_adam.py."""
    from importlib.metadata import entry_points

    import megatron.core.optimizer as mopt

    from fluid.megatron.optimizer import keep_implementation

    names = {ep.value for ep in entry_points(group=mopt.TORCH_ADAM_HOOK_GROUP)}
    assert "fluid.megatron.optimizer:torch_adam" in names
    p = mopt.torch.nn.Parameter(mopt.torch.zeros(2))
    cfg = _cfg(use_fluid_moe=True, num_moe_experts=2, fluid_torch_adam="fused")
    cls, kwargs = mopt._apply_torch_adam_hooks(cfg, mopt.torch.optim.AdamW, {"params": [p]})
    assert cls is keep_implementation(mopt.torch.optim.AdamW) and kwargs["fused"] is True
    src = inspect.getsource(mopt._get_megatron_optimizer_based_on_param_groups)
    start = src.index("if USING_PYTORCH_OPTIMIZER:")  # the torch branch of the adam case
    branch = src[start : src.index('kwargs["adam_w_mode"]', start)]
    assert 'getattr(transformer_config, "use_fluid_moe", False)' in branch
    assert "adam_cls, kwargs = _apply_torch_adam_hooks(" in branch
    assert "optimizer = adam_cls(**kwargs)" in src[start:]
