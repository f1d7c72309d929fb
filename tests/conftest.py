"""Shared pytest setup: the repo root on sys.path (for tests/_dist.py) and tree-mode markers."""

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
