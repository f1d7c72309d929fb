"""Shared pytest setup: the repo root on sys.path (for tests/_dist.py), tree-mode markers, and
eager Megatron fusions in the cpu tier (`eager_megatron_fusions`)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def full_tree_available() -> bool:
    """megatron.training from the Megatron-LM tree (full mode), not core-only."""
    spec = importlib.util.find_spec("megatron.core")
    if spec is None:
        return False
    return (Path(spec.origin).parent.parent / "training" / "training.py").exists()


needs_full_tree = pytest.mark.skipif(
    not full_tree_available(),
    reason="needs the full Megatron-LM tree (megatron.training); core-only mode "
    "(run `make setup MEGATRON_LM_URL=<mirror>`)",
)


@pytest.fixture(autouse=True)
def eager_megatron_fusions(request):
    """cpu tier: Megatron's fused activations (megatron/core/jit.py: `jit_fuser = torch.compile`,
    e.g. the weighted SwiGLU stock MoE uses by default) run their Python code eagerly: the same
    math and autograd Functions, without Inductor. On CPU Inductor generates and compiles C++,
    which no production run uses (GPUs get Triton kernels, covered by tests/gpu's fused-SwiGLU
    parity) and which cost 30-60 s per process and shape on the 2-core CI machine. The dist
    tier's workers do the same (tests/_dist.py); tests/gpu is left alone.
    """
    if not Path(str(request.node.path)).is_relative_to(ROOT / "tests" / "cpu"):
        yield
        return
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield
