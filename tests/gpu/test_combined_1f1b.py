"""Tier: gpu (2 GPUs). Fluid layers under Megatron's combined-1F1B schedule
(tests/gpu/combined_1f1b_script.py): Fluid + combined vs Fluid plain (bitwise over NVLink) and vs
stock Megatron plain and combined (bf16 tolerance), same weights; prints the step time of each.
The plain variants run with CUDA_DEVICE_MAX_CONNECTIONS=1 (Fluid's launch order), all of them
again with 32 (Megatron's combined schedule needs several hardware queues)."""

from tests.gpu._torchrun import require_gpus, torchrun


def test_combined_1f1b_with_fluid_layers(tmp_path):
    require_gpus(2)
    out = str(tmp_path)
    res = torchrun(
        "combined_1f1b_script.py",
        2,
        "--out",
        out,
        "--variants",
        "fluid_plain,stock_plain",
        env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"},
    )
    assert res.returncode == 0, "see PASS/FAIL lines above"
    res = torchrun(
        "combined_1f1b_script.py",
        2,
        "--out",
        out,
        "--variants",
        "fluid_plain,fluid_combined,stock_plain,stock_combined",
        env={"CUDA_DEVICE_MAX_CONNECTIONS": "32"},
    )
    assert res.returncode == 0, "see PASS/FAIL lines above"
    assert "PASS fluid_combined-cdmc32 vs fluid_plain-cdmc32" in res.stdout
