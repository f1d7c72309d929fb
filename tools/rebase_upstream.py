#!/usr/bin/env python3
"""`make rebase-upstream REF=...`: move the Megatron-LM pin to REF and carry the patch series over.

In the submodule: fetch REF (from --url, else the submodule's `origin`), check it out, apply the
series (strict `git apply`, then `git apply --3way` against the pin's files as the fallback). On
success: rewrite the patch files in the stable format (`tools/patches.py refresh`: no
timestamps, no index lines, headers kept), rewrite patches/upstream.lock for REF, stage the new
gitlink in the superproject (`git add Megatron-LM`; nothing is committed), run the API check
(tools/api_check.py, pin -> REF) and `make test` (unless --no-test).

On a conflict: print which patch, file and hunk failed, and put the submodule back exactly as it
was (old pin, series applied). patches/, the lock and the gitlink are only written after the
whole series applied, and are restored if a later step raises: no half-applied state is left.

Exit status: 0 rebased and everything passed; 1 nothing changed (conflict or error);
3 rebased, but the API check found breaking changes or `make test` failed (fix the overlay, or
`git checkout patches && git submodule update` to drop the rebase).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api_check  # noqa: E402
import patches as P  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class RebaseError(RuntimeError):
    pass


def git(repo: Path, *args: str, check: bool = True) -> str:
    res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if check and res.returncode:
        raise RebaseError(f"git {' '.join(args)} (in {repo}) failed:\n{res.stderr.strip()}")
    return res.stdout.strip()


def commit_of(repo: Path, ref: str) -> str | None:
    out = git(repo, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
    return out or None


def fetch_ref(sub: Path, ref: str, url: str | None, log=print) -> str:
    """The commit REF names, fetched from `url` (or the submodule's origin) when needed."""
    if re.fullmatch(r"[0-9a-fA-F]{7,40}", ref) and commit_of(sub, ref):
        return commit_of(sub, ref)  # a commit id already present: nothing to fetch
    url = url or git(sub, "remote", "get-url", "origin", check=False) or None
    if url:
        log(f"rebase-upstream: fetching {ref} from {url}")
        if subprocess.run(["git", "-C", str(sub), "fetch", "-q", url, ref],
                          capture_output=True).returncode == 0:
            return commit_of(sub, "FETCH_HEAD")
        # A short commit id, or a server that refuses fetching by id: fetch branches and tags.
        subprocess.run(["git", "-C", str(sub), "fetch", "-q", url,
                        "+refs/heads/*:refs/remotes/fluid-upstream/*", "+refs/tags/*:refs/tags/*"],
                       capture_output=True)
    commit = commit_of(sub, ref) or commit_of(sub, f"fluid-upstream/{ref}")
    if not commit:
        raise RebaseError(f"cannot find {ref} (fetched from {url or 'nowhere'})")
    return commit


class Submodule:
    """The submodule's state before the rebase, and how to put it back."""

    def __init__(self, sub: Path, patch_dir: Path):
        self.sub, self.patch_dir = sub, patch_dir
        self.series = P.read_series(patch_dir)
        self.touched = sorted({f for p in self.series for f in p.files})
        self.head = git(sub, "rev-parse", "HEAD")
        self.branch = git(sub, "symbolic-ref", "-q", "--short", "HEAD", check=False)
        self.saved = {f: (sub / f).read_bytes() for f in self.touched if (sub / f).exists()}

    def check_clean(self, pin: str) -> None:
        """Refuse when the work tree holds anything the series would not reproduce."""
        if self.head != pin:
            raise RebaseError(
                f"the submodule is at {self.head[:12]}, not the pin {pin[:12]} of "
                "patches/upstream.lock: run `make setup` (or fix the lock) first"
            )
        dirty = git(self.sub, "diff", "--name-only", "HEAD").split()
        stray = sorted(set(dirty) - set(self.touched))
        if stray:
            raise RebaseError(f"the submodule has changes outside the series: {stray}")
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            P.pristine_from_git(self.sub, pin, self.touched, t)
            pristine = {f: (t / f).read_bytes() for f in self.touched if (t / f).exists()}
            P.apply_series(t, self.patch_dir, log=lambda m: None)
            applied = {f: (t / f).read_bytes() for f in self.touched if (t / f).exists()}
        if self.saved not in (pristine, applied):
            edited = [f for f in self.touched if self.saved.get(f) != applied.get(f)]
            raise RebaseError(
                f"the submodule's patched files differ from the series ({edited}): run "
                "`make refresh-patches` to keep those edits, or re-apply the series, first"
            )

    def restore(self) -> None:
        git(self.sub, "reset", "-q", "--hard")  # clears conflict entries; only series files differ
        git(self.sub, "checkout", "-q", self.branch or "--detach", *([] if self.branch else [self.head]))
        for f, data in self.saved.items():
            (self.sub / f).write_bytes(data)
        now = {f: (self.sub / f).read_bytes() for f in self.touched if (self.sub / f).exists()}
        if git(self.sub, "rev-parse", "HEAD") != self.head or now != self.saved:
            raise RebaseError("could not restore the submodule; inspect it by hand")


def conflict_report(results: list[P.ReplayResult], ref: str, new: str, patch_dir: Path) -> str:
    lines = [f"rebase-upstream: CONFLICT: the patch series does not apply to {ref} ({new[:12]})"]
    for r in results:
        if r.status == "conflict":
            lines.append(f"  FAILED patch {r.patch} ({patch_dir / r.patch})")
            for h in r.failed:
                lines.append(f"    {h.describe()}")
            for f in r.conflicted:
                lines.append(f"    3-way merge left conflicts in {f}")
            if r.message:
                lines += ["    git apply --3way said:"] + [f"      {x}" for x in r.message.splitlines()]
        else:
            lines.append(f"  {r.status:9s} {r.patch}")
    return "\n".join(lines)


def rebase(root: Path, sub_name: str, ref: str, url: str | None, run_tests: bool,
           overlay: Path, log=print) -> int:
    sub, pdir = root / sub_name, root / "patches"
    if not (sub / ".git").exists():
        raise RebaseError(f"{sub} is not a git checkout (core-only mode cannot rebase): "
                          "run `make setup MEGATRON_LM_URL=<mirror>` first")
    lock = P.read_lock(pdir)
    pin = lock["commit"]
    state = Submodule(sub, pdir)
    state.check_clean(pin)
    new = fetch_ref(sub, ref, url, log)
    if new == pin:
        log(f"rebase-upstream: {ref} is the pin {pin[:12]} already; nothing to do")
        return 0
    saved_pdir = {p: p.read_bytes() for p in pdir.iterdir() if p.is_file()}
    gitlink = git(root, "ls-files", "-s", "--", sub_name)
    log(f"rebase-upstream: {pin[:12]} -> {ref} ({new[:12]})")
    git(sub, "checkout", "-q", "--", *[f for f in state.touched if f in state.saved])
    git(sub, "checkout", "-q", "--detach", new)
    try:
        results = P.replay_3way(sub, pin, pdir, stop_on_conflict=True,
                                log=lambda m: log("  " + m.strip()))
        if any(r.status == "conflict" for r in results):
            log(conflict_report(results, ref, new, pdir))
            state.restore()
            log(f"rebase-upstream: the submodule is back at the pin {pin[:12]} with the series "
                "applied; patches/, upstream.lock and the gitlink are unchanged.")
            return 1
        with tempfile.TemporaryDirectory() as tmp:
            pristine = Path(tmp)
            P.pristine_from_git(sub, new, state.touched, pristine)
            for name, text in P.patches_from_replay(results, pdir).items():
                if (pdir / name).read_text() != text:
                    (pdir / name).write_text(text)
                    log(f"  refreshed {name}")
            tag = git(sub, "describe", "--tags", "--exact-match", new, check=False) or "none"
            info = git(sub, "show", f"{new}:megatron/core/package_info.py", check=False)
            version = _core_version(info)
            P.write_lock(pristine, pdir, new, tag, version)
            P.check(pristine, pdir, log=lambda m: log("  check:" + m))
        git(root, "add", "--", sub_name)
    except BaseException:
        for p, data in saved_pdir.items():
            p.write_bytes(data)
        state.restore()
        if gitlink:
            mode, sha = gitlink.split()[:2]
            git(root, "update-index", "--cacheinfo", f"{mode},{sha},{sub_name}")
        log("rebase-upstream: failed after the series applied; everything was put back")
        raise
    log(f"rebase-upstream: the series applies to {new[:12]}; patches/ refreshed, upstream.lock "
        f"rewritten (tag {tag}, megatron-core {version}), gitlink staged (not committed)")
    status = 0
    verdicts = api_check.check(overlay, api_check.GitSource(sub, pin, pin[:12]),
                               api_check.GitSource(sub, new, ref))
    log(api_check.to_markdown(verdicts, pin[:12], ref))
    if any(v.verdict == "breaking" for v in verdicts):
        log("rebase-upstream: the API check found breaking changes: port the overlay")
        status = 3
    if run_tests:
        log("rebase-upstream: make test")
        if subprocess.run(["make", "-C", str(root), "test"]).returncode:
            log("rebase-upstream: make test FAILED on the new pin")
            status = 3
    log("rebase-upstream: review `git diff --cached` and `git diff patches/`, then commit the pin "
        "bump (gitlink + patches + lock) as its own change")
    return status


def _core_version(package_info: str) -> str:
    import upstream_src

    return upstream_src.core_version_of(package_info)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ref", required=True, help="upstream tag, commit or branch")
    ap.add_argument("--submodule", default="Megatron-LM", help="submodule path in the superproject")
    ap.add_argument("--url", help="repository to fetch REF from (default: the submodule's origin)")
    ap.add_argument("--root", type=Path, default=ROOT, help="superproject (default: this repo)")
    ap.add_argument("--overlay", type=Path, help="overlay package (default: ROOT/overlay/fluid)")
    ap.add_argument("--no-test", action="store_true", help="skip `make test`")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    try:
        return rebase(root, args.submodule, args.ref, args.url, not args.no_test,
                      (args.overlay or root / "overlay" / "fluid").resolve())
    except (RebaseError, P.PatchError) as e:
        print(f"rebase-upstream: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
