"""Test-only (not in the wheel): measurement helpers shared by `benchmarks/` and `tests/` (tests do
not import benchmarks/).

- `timing`: `Timer` (median ms with CUDA events, wall clock on CPU) and alternating rounds.
- `overlap`: hidden and exposed communication from the scheduler's per-window CUDA events, and
  the whole-step hidden fraction from a slow link against NVLink; the definitions
  docs/benchmarks/README.md states.
- `stages`: host-time hooks around FluidMoELayer's forward stages.
- `timeline`: busy/idle arithmetic of a GPU timeline.
- `models`: the benchmark models (`MODELS`: mixtral, fine, small).
- `flops`: the one model-FLOPs formula for FluidMoE and its peers (docs/benchmarks/peers.md).
- `launch`: a logged subprocess that survives an outer timeout, and Megatron training-log parsing.
"""
