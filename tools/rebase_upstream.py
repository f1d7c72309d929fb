#!/usr/bin/env python3
"""`make rebase-upstream REF=...`: move the Megatron-LM pin to REF and carry the patch series over.

In the submodule: fetch REF (from --url, else the submodule's `origin`), check it out and replay
the series (`patches.replay_3way`). A patch whose change upstream already contains (its diff
applies in reverse, or its `Probe:` no longer finds the bug it fixes) is "fixed upstream" and
dropped; the others get a strict `git apply`, then `git apply --3way` against the pin's files.
Every patch's outcome is listed. When none conflicts: rewrite the patch files in the stable
format (no timestamps, no index lines, headers kept), remove the dropped ones from patches/ and
`series`, rewrite patches/upstream.lock for REF, stage the new gitlink in the superproject
(`git add Megatron-LM`; nothing is committed), check that core-only setup can use the new lock
(the megatron-core release it names, from --dist-dir or the package index, holds the locked
blobs), run the API check (tools/api_check.py, pin -> REF) and `make test` (unless --no-test).

The lock's `megatron-core` is the release on the package index whose megatron/core files are
REF's: the version a `core_vX.Y.Z` tag on REF names, else the one REF's package_info.py declares
(MAINTENANCE.md, "The lock's megatron-core version").

On a conflict: print every patch's outcome (which patch, file and hunk failed) and put the
submodule back exactly as it was (old pin, series applied). patches/, the lock and the gitlink
are only written after the whole series applied, and are restored if a later step raises: no
half-applied state is left.

Exit status, also named on the last line of the output (`make rebase-upstream` turns any
non-zero status into its own exit status 2, printing "Error 1" or "Error 3"):
  0  rebased and everything passed;
  1  nothing changed: a conflict, an error, or the submodule held edits beyond the series;
  3  rebased, but something needs you: the API check found breaking changes, `make test`
     failed, core-only setup could not use the new lock, or a probe still finds its bug at
     REF. Fix it, or drop the rebase (MAINTENANCE.md).
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
import upstream_src  # noqa: E402

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
    """The commit REF names, fetched from `url` (or the submodule's origin) when needed. A tag
    is fetched as a tag, so the lock can name it (and the release it is)."""
    present = commit_of(sub, ref) if re.fullmatch(r"[0-9a-fA-F]{7,40}", ref) else None
    if present:
        return present  # a commit id already present: nothing to fetch
    url = url or git(sub, "remote", "get-url", "origin", check=False) or None
    if url:
        log(f"rebase-upstream: fetching {ref} from {url}")

        def run(*a: str) -> bool:
            cmd = ["git", "-C", str(sub), "fetch", "-q", url, *a]
            return subprocess.run(cmd, capture_output=True).returncode == 0

        if not ref.startswith("refs/") and run(f"+refs/tags/{ref}:refs/tags/{ref}"):
            tagged = commit_of(sub, f"refs/tags/{ref}")
            if tagged:
                return tagged
        if run(ref):
            fetched = commit_of(sub, "FETCH_HEAD")
            if fetched:
                return fetched
        # A short commit id, or a server that refuses fetching by id: fetch branches and tags.
        run("+refs/heads/*:refs/remotes/fluid-upstream/*", "+refs/tags/*:refs/tags/*")
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
        """Refuse when the submodule holds anything but the pin and the series (applied or
        not): the rebase would carry it over silently, or lose it."""
        drift = P.tree_drift(self.sub, pin, self.patch_dir)
        if drift:
            raise RebaseError(
                "the submodule holds edits that are neither the pin nor the series:\n  "
                + "\n  ".join(drift)
                + "\n  keep edits to patched files with `make refresh-patches`, or drop them, first"
            )

    def restore(self) -> None:
        git(self.sub, "reset", "-q", "--hard")  # clears conflict entries; only series files differ
        git(
            self.sub,
            "checkout",
            "-q",
            self.branch or "--detach",
            *([] if self.branch else [self.head]),
        )
        for f, data in self.saved.items():
            (self.sub / f).write_bytes(data)
        now = {f: (self.sub / f).read_bytes() for f in self.touched if (self.sub / f).exists()}
        if git(self.sub, "rev-parse", "HEAD") != self.head or now != self.saved:
            raise RebaseError("could not restore the submodule; inspect it by hand")


def outcome_report(results: list[P.ReplayResult], ref: str, new: str, patch_dir: Path) -> str:
    """Every patch's outcome at REF, with the failing hunks and the notes."""
    if any(r.status == "conflict" for r in results):
        head = f"rebase-upstream: CONFLICT: the patch series does not apply to {ref} ({new[:12]})"
    else:
        head = f"rebase-upstream: the patch series at {ref} ({new[:12]}):"
    lines = [head]
    for r in results:
        if r.status == "conflict":
            lines.append(f"  FAILED patch {r.patch} ({patch_dir / r.patch})")
            for h in r.failed:
                lines.append(f"    {h.describe()}")
            for f in r.conflicted:
                lines.append(f"    3-way merge left conflicts in {f}")
            if r.message:
                lines += ["    git apply --3way said:"] + [
                    f"      {x}" for x in r.message.splitlines()
                ]
        elif r.status == "upstream":
            lines.append(f"  {r.status_text}: {r.patch} ({r.message})")
        else:
            lines.append(f"  {r.status_text:9s} {r.patch}")
        lines += [f"    note: {n}" for n in r.notes]
    return "\n".join(lines)


def drop_patches(pdir: Path, names: list[str]) -> None:
    """Remove patches from `series` and delete their files."""
    if not names:
        return
    series = pdir / "series"
    kept = [ln for ln in series.read_text().splitlines(True) if ln.strip() not in names]
    series.write_text("".join(kept))
    for n in names:
        (pdir / n).unlink()


def core_only_problem(version: str, pdir: Path, dist_dir: Path) -> str | None:
    """Why core-only setup (what CI runs) could not use the lock in pdir, or None. It installs
    megatron-core==version from the package index and refuses unless every locked
    megatron/core file has the locked blob. The distribution is looked for in dist_dir first
    (make setup's cache), else downloaded there."""
    import setup_megatron as S

    try:
        dist = S._download_core(version, dist_dir)
    except SystemExit as e:
        first = (str(e).strip().splitlines() or ["?"])[0]
        return f"megatron-core=={version} cannot be had from the package index ({first})"
    core_files = [f for f in P.read_lock(pdir)["files"] if f.startswith(P.CORE_PREFIX)]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "core"
        S._extract_core(dist, tree)
        try:
            P.verify_lock(tree, pdir, files=core_files)
        except P.PatchError as e:
            return f"{dist.name} does not hold the new pin's megatron/core files: {e}"
    return None


def rebase(
    root: Path,
    sub_name: str,
    ref: str,
    url: str | None,
    run_tests: bool,
    overlay: Path,
    log=print,
    dist_dir: Path | None = None,
) -> int:
    sub, pdir = root / sub_name, root / "patches"
    dist_dir = dist_dir or root / ".build" / "dist"
    if not (sub / ".git").exists():
        raise RebaseError(
            f"{sub} is not a git checkout (core-only mode cannot rebase): "
            "run `make setup MEGATRON_LM_URL=<mirror>` first"
        )
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
        results = P.replay_3way(
            sub, pin, pdir, stop_on_conflict=False, log=lambda m: log("  " + m.strip())
        )
        log(outcome_report(results, ref, new, pdir))
        if any(r.status == "conflict" for r in results):
            state.restore()
            log(
                f"rebase-upstream: the submodule is back at the pin {pin[:12]} with the series "
                "applied; patches/, upstream.lock and the gitlink are unchanged."
            )
            log("rebase-upstream: exit 1: conflict, nothing changed")
            return 1
        dropped = [r.patch for r in results if r.status == "upstream"]
        with tempfile.TemporaryDirectory() as tmp:
            pristine = Path(tmp)
            P.pristine_from_git(sub, new, state.touched, pristine)
            for name, text in P.patches_from_replay(results, pdir).items():
                if (pdir / name).read_text() != text:
                    (pdir / name).write_text(text)
                    log(f"  refreshed {name}")
            drop_patches(pdir, dropped)
            for name in dropped:
                log(f"  dropped {name} (fixed upstream)")
            tags = git(sub, "tag", "--points-at", new, check=False).split()
            tag = next(
                (t for t in sorted(tags) if t.startswith("core_v")), tags[0] if tags else "none"
            )
            info = git(sub, "show", f"{new}:megatron/core/package_info.py", check=False)
            try:
                version = upstream_src.release_of(tags, info)
            except ValueError as e:
                raise RebaseError(f"cannot tell the megatron-core release of {ref}: {e}") from None
            P.write_lock(pristine, pdir, new, tag, version)
            # The replay ran the probes already; what they still find is in its notes.
            P.check(pristine, pdir, log=lambda m: log("  check:" + m), probes=False)
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
    log(
        f"rebase-upstream: the series applies to {new[:12]}; patches/ refreshed"
        + (f" ({', '.join(dropped)} dropped: fixed upstream)" if dropped else "")
        + f", upstream.lock rewritten (tag {tag}, megatron-core {version}), gitlink staged "
        "(not committed)"
    )
    needs = []
    notes = [f"{r.patch}: {n}" for r in results for n in r.notes]  # probes' (nothing conflicted)
    if notes:
        log("rebase-upstream: probes find bugs at the new pin:\n  " + "\n  ".join(notes))
        needs.append("a probe finds its bug at the new pin (extend the patch, or add one)")
    problem = core_only_problem(version, pdir, dist_dir)
    if problem:
        log(
            f"rebase-upstream: core-only setup (CI) could not use the new lock: {problem}\n"
            "  Pin a commit whose megatron/core is a release on the package index (a core_vX.Y.Z "
            "tag), or keep this pin only where the full tree is available."
        )
        needs.append("core-only setup cannot use the new lock")
    else:
        log(
            f"rebase-upstream: core-only setup can use the new lock (megatron-core {version} "
            "holds the locked files)"
        )
    verdicts = api_check.check(
        overlay, api_check.GitSource(sub, pin, pin[:12]), api_check.GitSource(sub, new, ref)
    )
    log(api_check.to_markdown(verdicts, pin[:12], ref))
    if any(v.verdict == "breaking" for v in verdicts):
        log("rebase-upstream: the API check found breaking changes: port the overlay")
        needs.append("the API check found breaking changes")
    if run_tests:
        log("rebase-upstream: make test")
        if subprocess.run(["make", "-C", str(root), "test"]).returncode:
            log("rebase-upstream: make test FAILED on the new pin")
            needs.append("make test failed")
    log(
        "rebase-upstream: review `git diff --cached` and `git diff patches/`, then commit the pin "
        "bump (gitlink + patches + lock) as its own change"
    )
    if needs:
        log(f"rebase-upstream: exit 3: rebased, but {'; '.join(needs)}")
        return 3
    log("rebase-upstream: exit 0: rebased")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ref", required=True, help="upstream tag, commit or branch")
    ap.add_argument("--submodule", default="Megatron-LM", help="submodule path in the superproject")
    ap.add_argument("--url", help="repository to fetch REF from (default: the submodule's origin)")
    ap.add_argument("--root", type=Path, default=ROOT, help="superproject (default: this repo)")
    ap.add_argument("--overlay", type=Path, help="overlay package (default: ROOT/overlay/fluid)")
    ap.add_argument("--no-test", action="store_true", help="skip `make test`")
    ap.add_argument(
        "--dist-dir",
        type=Path,
        help="megatron-core distributions, looked up before the package index "
        "(default: ROOT/.build/dist, make setup's cache)",
    )
    args = ap.parse_args(argv)
    root = args.root.resolve()
    try:
        return rebase(
            root,
            args.submodule,
            args.ref,
            args.url,
            not args.no_test,
            (args.overlay or root / "overlay" / "fluid").resolve(),
            dist_dir=args.dist_dir.resolve() if args.dist_dir else None,
        )
    except (RebaseError, P.PatchError) as e:
        print(f"rebase-upstream: {e}", file=sys.stderr)
        print("rebase-upstream: exit 1: nothing changed", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
