#!/usr/bin/env python3
"""`make check-patches`: the patch series against a pristine tree of the pin, and the submodule's
working files against the pin plus the series.

1. `patches.check` on pristine files: series and files agree, headers complete (every `Test:`
   path exists, every `Probe:` resolves and agrees), the lock matches, the series applies with
   no fuzz, refresh is a no-op. Full mode (the submodule is a git checkout): the touched files
   at the pinned commit, read with git. Core-only mode: megatron/core extracted from the
   megatron-core distribution on the package index.
2. Full mode only: the submodule holds nothing but the pin and the series (`patches.tree_drift`):
   its HEAD is the pinned commit, every file the series touches is the pin's with the series (or
   a prefix of it) applied, and no other file is changed, deleted or untracked. Each stray file
   is named with its lines. Such an edit would otherwise pass `make setup` and be swept by
   `make refresh-patches` into the last patch that touches the file.

Exit status: 0 OK, 1 a check failed (the message says which and what to do).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import setup_megatron as S  # noqa: E402

import patches as P  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", type=Path, default=S.ROOT, help="the repository (default: this one)")
    ap.add_argument("--submodule", default="Megatron-LM", help="submodule path under --root")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    pdir, sub = root / "patches", root / args.submodule
    try:
        lock = P.read_lock(pdir)
        full = (sub / ".git").exists()
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "pristine"
            if full:
                if P._git(sub, "cat-file", "-e", f"{lock['commit']}^{{commit}}").returncode:
                    raise P.PatchError(
                        f"{args.submodule} lacks the pinned commit "
                        f"{lock['commit'][:12]}: run `make setup`"
                    )
                rels = sorted({f for p in P.read_series(pdir) for f in p.files})
                P.pristine_from_git(sub, lock["commit"], rels, tree)
                print(
                    f"check-patches: pristine files from {args.submodule} at {lock['commit'][:12]}"
                )
            else:
                dist = S._download_core(lock["megatron-core"], root / ".build" / "dist")
                S._extract_core(dist, tree)
                print(f"check-patches: pristine megatron/core from {dist.name} (core-only)")
            P.check(tree, pdir, root=root)
        if full:
            drift = P.tree_drift(sub, lock["commit"], pdir)
            if drift:
                raise P.PatchError(
                    f"{args.submodule}/ holds edits that are neither the pin nor the series:\n  "
                    + "\n  ".join(drift)
                    + "\n  Keep an edit to a patched file with `make refresh-patches` (it goes "
                    "into the last patch touching the file; better write its own patch), or drop "
                    f"it: `git -C {args.submodule} checkout -- <file>` and `make setup`."
                )
            print(f"check-patches: {args.submodule}/ is the pin with the series applied")
    except P.PatchError as e:
        print(f"check-patches: FAILED: {e}", file=sys.stderr)
        return 1
    print("check-patches: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
