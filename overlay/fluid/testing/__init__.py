"""Test-only helpers: not part of the product, and not in the built wheel.

They set up process groups and Megatron's `parallel_state` and patch Megatron objects for a test
process, which no training run should do. The editable install (`make setup`) makes them importable
for `tests/` and `benchmarks/`; `overlay/pyproject.toml` excludes this package from the wheel
(`tests/cpu/test_wheel_contents.py` checks it).

- `fluid.testing.moe`: one-layer MoE configs, seeded expert weights, stock / Fluid MoE layers,
  DDP gradient emulation, expert-parallel world set-up.
- `fluid.testing.attention`: one-layer attention configs, stock / Fluid self-attention, CP
  sharding and rotary angles, torchrun set-up.
- `fluid.testing.gpt`: the small GPTModel (MoE layers, Fluid or stock spec) of whole-model tests.
- `fluid.testing.world`: a one-process gloo group and Megatron parallel state for CPU tests.
- `fluid.testing.autograd`: an identity op whose backward runs a callback, and a CommContext
  stand-in with only its policy (scheduler tests).
- `fluid.testing.bench`: the measurement helpers `benchmarks/` and the tests share (timer,
  alternating rounds, overlap measures, stage hooks, timeline arithmetic, launcher).
"""
