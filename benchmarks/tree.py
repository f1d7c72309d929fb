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


def with_tree_path(env: dict, root: Path = ROOT) -> dict:
    """`env` with PYTHONPATH = root/overlay, root, then what it had (a copy; `env` untouched).
    `root`: this tree by default; benchmarks.ab passes a snapshot's."""
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root / "overlay"), str(root), env.get("PYTHONPATH")) if p
    )
    return out
