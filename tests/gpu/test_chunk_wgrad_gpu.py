"""Tier: gpu (1 GPU). Forward chunks' expert dW merged into one per weight on the GPU path
(bf16, torch._grouped_mm with device offsets): tests/gpu/chunk_wgrad_script.py."""

from tests.gpu._torchrun import require_gpus, torchrun


def test_chunk_wgrad_on_gpu():
    require_gpus(1)
    res = torchrun("chunk_wgrad_script.py", 1)
    assert res.returncode == 0, "see PASS/FAIL lines above"
    assert "all passed" in res.stdout
