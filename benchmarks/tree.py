"""The tree a benchmark measures is the tree it runs from.

Every process the benchmarks launch (torchrun of the layer job, of stock `pretrain_gpt.py`, of a
probe) gets this tree's `overlay/` and root first on PYTHONPATH. On a GPU host
`benchmarks/gpu_env.sh` puts the tree it was sourced in on PYTHONPATH; a run started from another
copy (a snapshot of an older commit, to time a change against the commit before it) would
otherwise import that first tree's `fluid` and measure it instead of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def with_tree_path(env: dict) -> dict:
    """`env` with PYTHONPATH = ROOT/overlay, ROOT, then what it had (a copy; `env` untouched)."""
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "overlay"), str(ROOT), env.get("PYTHONPATH")) if p
    )
    return out
