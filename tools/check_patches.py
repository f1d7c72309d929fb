#!/usr/bin/env python3
"""`make check-patches`: run `patches.check` against a pristine tree of the pin.

Full mode (the submodule is there): the touched files at the pinned commit, read with git.
Core-only mode: megatron/core extracted from the megatron-core distribution of the package index.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import patches as P  # noqa: E402
import setup_megatron as S  # noqa: E402


def main() -> int:
    pdir = S.ROOT / "patches"
    lock = P.read_lock(pdir)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "pristine"
        if (S.SUBMODULE / ".git").exists():
            rels = sorted({f for p in P.read_series(pdir) for f in p.files})
            P.pristine_from_git(S.SUBMODULE, lock["commit"], rels, tree)
            print(f"check-patches: pristine files from Megatron-LM at {lock['commit'][:12]}")
        else:
            dist = S._download_core(lock["megatron-core"], S.BUILD / "dist")
            S._extract_core(dist, tree)
            print(f"check-patches: pristine megatron/core from {dist.name} (core-only)")
        try:
            P.check(tree, pdir)
        except P.PatchError as e:
            print(f"check-patches: FAILED: {e}", file=sys.stderr)
            return 1
    print("check-patches: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
