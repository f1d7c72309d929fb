"""Tier: cpu. The layer-spec hook of patch 0002: with `use_fluid_moe` the registered hook is
called and its replacements land in the specs, in the `moe_layer_freq` pattern and after
pipeline slicing; with the flag off the specs are upstream's."""

import functools

import pytest


def _cfg(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=4,
        use_cpu_initialization=True,
        moe_layer_freq=[1, 0, 1, 1],
    )
    base.update(kw)
    return TransformerConfig(**base)


class DummyAttention:  # stand-ins: the hook's job is to route specs, not to build layers
    pass


class DummyMoE:
    pass


def _dummy_transform(calls):
    import dataclasses

    def fn(config, dense, moe, use_te):
        calls.append((config.use_fluid_moe, use_te))

        def swap(spec, mlp):
            subs = dataclasses.replace(
                spec.submodules,
                self_attention=dataclasses.replace(
                    spec.submodules.self_attention, module=DummyAttention
                ),
                mlp=mlp if mlp is not None else spec.submodules.mlp,
            )
            return dataclasses.replace(spec, submodules=subs)

        return swap(dense, None), swap(moe, functools.partial(DummyMoE))

    return fn


def _describe(spec):
    """A structural description of a layer spec (partials and classes by name)."""
    s = spec.submodules

    def name(x):
        t = x.func if isinstance(x, functools.partial) else getattr(x, "module", x)
        return getattr(t, "__name__", repr(t))

    return (name(spec), name(s.self_attention), name(s.mlp), name(s.input_layernorm))


def _override(monkeypatch, fn):
    """Replace the installed hook's transformation (Megatron loads the entry point per call)."""
    monkeypatch.setattr("fluid.megatron.spec_hook.transform_layer_specs", fn)


def test_hook_called_and_replacement_in_pattern(monkeypatch):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

    calls = []
    _override(monkeypatch, _dummy_transform(calls))
    specs = get_gpt_decoder_layer_specs(_cfg(use_fluid_moe=True), use_transformer_engine=False)
    assert calls == [(True, False)]
    assert [_describe(s)[1] for s in specs] == ["DummyAttention"] * 4
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    dense_mlp = _describe(get_gpt_layer_local_spec(num_experts=None))[2]
    assert [_describe(s)[2] for s in specs] == ["DummyMoE", dense_mlp, "DummyMoE", "DummyMoE"]


def test_hook_reaches_pipeline_sliced_block_spec(monkeypatch):
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    cfg = _cfg(use_fluid_moe=True, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    _override(monkeypatch, _dummy_transform([]))
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, pp_rank=1)
    # Layers 2 and 3 of the pattern [1, 0, 1, 1] live on the second stage.
    assert [_describe(s)[2] for s in block.layer_specs] == ["DummyMoE", "DummyMoE"]


def test_flag_off_specs_equal_upstream(monkeypatch):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_layer_specs,
        get_gpt_layer_local_spec,
    )

    def boom(*a):
        raise AssertionError("hook must not be called with use_fluid_moe off")

    _override(monkeypatch, boom)
    specs = get_gpt_decoder_layer_specs(_cfg(), use_transformer_engine=False)
    moe = _describe(get_gpt_layer_local_spec(num_experts=4))
    dense = _describe(get_gpt_layer_local_spec(num_experts=None))
    assert [_describe(s) for s in specs] == [moe, dense, moe, moe]
    assert moe[1] == "SelfAttention" and moe[2] == "MoELayer"


def test_hook_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = entry_points(group="megatron.core.gpt_layer_spec_hooks")
    assert [ep.value for ep in eps] == ["fluid.megatron.spec_hook:transform_layer_specs"]


def test_validation_rejects_bad_configs_at_build_time():
    from fluid.megatron.validate import FluidConfigError, validate_config

    validate_config(_cfg(use_fluid_moe=True))
    with pytest.raises(FluidConfigError, match="--expert-model-parallel-size"):
        validate_config(_cfg(num_moe_experts=6, expert_model_parallel_size=4))
    with pytest.raises(FluidConfigError, match="--context-parallel-size"):
        validate_config(_cfg(num_attention_heads=6, context_parallel_size=4))
    # Megatron's combined-1F1B schedule runs Fluid layers (tests/dist/test_combined_1f1b.py).
    validate_config(
        _cfg(
            overlap_moe_expert_parallel_comm=True,
            expert_model_parallel_size=2,
            moe_token_dispatcher_type="alltoall",
            bf16=True,
        )
    )


def test_real_hook_swaps_in_fluid_layers_and_keeps_the_pattern():
    """The installed hook (no override): Fluid attention everywhere, FluidMoELayer where the
    moe_layer_freq pattern puts MoE, the dense MLP untouched; the same through the public
    get_fluid_moe_layer_spec with the flag off."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

    from fluid import get_fluid_moe_layer_spec

    specs = get_gpt_decoder_layer_specs(_cfg(use_fluid_moe=True), use_transformer_engine=False)
    described = [_describe(s) for s in specs]
    assert [d[1] for d in described] == ["FluidSelfAttention"] * 4
    assert [d[2] == "FluidMoELayer" for d in described] == [True, False, True, True]
    block = get_fluid_moe_layer_spec(_cfg(), use_transformer_engine=False, pp_rank=0)
    assert [_describe(s) for s in block.layer_specs] == described
