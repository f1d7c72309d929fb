#!/usr/bin/env python3
"""The patch series on the pinned Megatron-LM: apply, check, refresh, lock.

The series lives in `patches/`: `series` lists one patch file a line (quilt order), each patch is
a DEP-3-style header (Description / Test / Forwarded, optionally Probe), a line `---`, then a
git-style unified diff with `a/` and `b/` prefixes and no `index` lines. `Test:` names the test
files (`path` or `path::test_name`, relative to the repository root) that cover the patch; each
must exist. `Probe: tools/probes.py:<function>` marks a patch that fixes an upstream bug: the
probe must find the bug at the pin and nothing once the series is applied (see tools/probes.py).
`patches/upstream.lock` records the pinned commit
and the git blob hash of every upstream file the series touches, so a tree that is not a git
checkout (the `megatron-core` wheel or sdist in core-only mode) can still be checked byte for byte.

A "tree" is a directory that holds `megatron/core/...`: the submodule, or the core-only copy.

Commands (all exit non-zero with a message on failure):
  apply   --tree DIR      apply the series (zero fuzz; patches already applied are skipped;
                          patches that only touch files absent from a core-only tree are skipped)
  verify  --tree DIR      the pristine files in DIR match the blob hashes in upstream.lock
  check   --tree DIR      DIR is pristine: series/files agree, headers complete (every Test:
                          path exists, every Probe: resolves), lock matches, the whole series
                          applies with no fuzz to a copy, probes agree, refresh is a no-op
                          (--root: the repository the Test:/Probe: paths are relative to)
  refresh --tree DIR      rewrite the patch files from an applied tree (DIR) against the pristine
                          files of the pinned commit (taken from DIR's git, or from --pristine)
  lock    --tree DIR      rewrite upstream.lock from the pristine files of DIR

Library functions used by the upstream tools (rebase_upstream.py, diff_report.py,
check_patches.py): `replay_3way` applies the series to a git work tree at a new upstream commit
with `git apply --3way` as the fallback and tells which patches upstream already contains,
`failing_hunks` names the hunks of a patch that no longer apply, and `tree_drift` names the files
and lines of a checkout that are neither the pin nor the pin with the series.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HEADER_FIELDS = ("Description", "Test", "Forwarded")
CORE_PREFIX = "megatron/core/"


class PatchError(RuntimeError):
    """A user-facing failure: the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Patch:
    name: str
    path: Path
    header: str  # everything before the `---` separator line, with its trailing newline
    diff: str  # the unified diff, starting at the first `diff --git`

    @property
    def files(self) -> list[str]:
        return re.findall(r"^diff --git a/(\S+) b/\S+$", self.diff, flags=re.M)


def git_blob_hash(data: bytes) -> str:
    """The id git gives a file's content (`git hash-object`), computed without git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_patch(path: Path) -> Patch:
    text = path.read_text()
    head, sep, rest = text.partition("\n---\n")
    if not sep or "diff --git " not in rest:
        raise PatchError(f"{path.name}: no header/diff separator ('---' line, then 'diff --git')")
    diff = rest[rest.index("diff --git ") :]
    return Patch(path.name, path, head + "\n", diff)


def read_series(patch_dir: Path) -> list[Patch]:
    series = patch_dir / "series"
    if not series.exists():
        raise PatchError(f"{series} is missing")
    names = [ln.strip() for ln in series.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    missing = [n for n in names if not (patch_dir / n).exists()]
    if missing:
        raise PatchError(f"patches named in series but missing: {', '.join(missing)}")
    return [read_patch(patch_dir / n) for n in names]


def read_lock(patch_dir: Path) -> dict:
    lock: dict[str, Any] = {"files": {}}
    for line in (patch_dir / "upstream.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key in ("commit", "tag", "megatron-core"):
            lock[key] = value.strip()
        else:  # "<blob> <path>"
            lock["files"][value.strip()] = key
    return lock


def header_field(header: str, name: str) -> str | None:
    """The value of a header field, its continuation lines (starting with a blank) joined."""
    m = re.search(rf"^{name}:(.*(?:\n[ \t].*)*)", header, flags=re.M)
    return " ".join(m.group(1).split()) if m else None


TEST_REF_RE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]+\.py)(?:::([A-Za-z_]\w*))?")


def cited_tests(header: str) -> list[tuple[str, str | None]]:
    """The (path, test name or None) pairs the `Test:` field names."""
    refs = TEST_REF_RE.findall(header_field(header, "Test") or "")
    return [(path, name or None) for path, name in refs]


def check_test_refs(patches: list[Patch], root: Path) -> None:
    """Every `Test:` names at least one test file, and every file (and test) it names exists."""
    bad = []
    for p in patches:
        refs = cited_tests(p.header)
        if not refs:
            bad.append(f"{p.name}: 'Test:' names no test file (tests/.../test_x.py[::test_name])")
        for path, name in refs:
            f = root / path
            if not f.is_file():
                bad.append(f"{p.name}: 'Test:' names {path}, which does not exist")
            elif name and not re.search(
                rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", f.read_text(), flags=re.M
            ):
                bad.append(f"{p.name}: 'Test:' names {path}::{name}, which {path} does not define")
    if bad:
        raise PatchError("patch headers cite tests that do not exist:\n  " + "\n  ".join(bad))


def load_probe(patch: Patch, root: Path):
    """The probe function a patch's `Probe: path.py:function` names, or None without one."""
    spec = header_field(patch.header, "Probe")
    if spec is None:
        return None
    m = re.match(r"(\S+\.py):(\w+)", spec)
    if not m or not (root / m.group(1)).is_file():
        raise PatchError(f"{patch.name}: 'Probe: {spec}' is not <existing file>.py:<function>")
    mod_spec = importlib.util.spec_from_file_location(
        "fluid_probe_" + re.sub(r"\W", "_", m.group(1)), root / m.group(1)
    )
    if mod_spec is None or mod_spec.loader is None:
        raise PatchError(f"{patch.name}: cannot load the probe file {root / m.group(1)}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    fn = getattr(module, m.group(2), None)
    if not callable(fn):
        raise PatchError(f"{patch.name}: 'Probe: {spec}': {m.group(1)} has no {m.group(2)}()")
    fn.label = f"{m.group(1)}:{m.group(2)}"
    return fn


def run_probe(probe, tree: Path) -> dict[str, str] | None:
    """{instance: description} of the bug the probe finds in `tree` (None: cannot tell there)."""
    found = probe(tree)
    return None if found is None else dict(found)


def check_series_files(patch_dir: Path, patches: list[Patch], root: Path | None = None) -> None:
    """Every *.patch in the folder is in series, every header has the DEP-3 fields, every test
    a `Test:` line names exists, every `Probe:` resolves."""
    root = patch_dir.parent if root is None else root
    listed = {p.name for p in patches}
    unlisted = sorted(p.name for p in patch_dir.glob("*.patch") if p.name not in listed)
    if unlisted:
        raise PatchError(f"patch files not listed in patches/series: {', '.join(unlisted)}")
    for p in patches:
        for name in HEADER_FIELDS:
            if not re.search(rf"^{name}: \S", p.header, flags=re.M):
                raise PatchError(f"{p.name}: header lacks a '{name}:' line")
    check_test_refs(patches, root)
    for p in patches:
        load_probe(p, root)


def is_core_only(tree: Path) -> bool:
    return not (tree / "megatron" / "training").is_dir() or not (tree / "pretrain_gpt.py").exists()


def applicable(patch: Patch, tree: Path) -> bool:
    """False for a patch whose files are absent (megatron/training in a core-only tree)."""
    present = [(tree / f).exists() for f in patch.files]
    if all(present):
        return True
    if not any(present) and not all(f.startswith(CORE_PREFIX) for f in patch.files):
        return False
    missing = [f for f, ok in zip(patch.files, present, strict=True) if not ok]
    raise PatchError(f"{patch.name}: files missing from {tree}: {', '.join(missing)}")


def _git_apply(tree: Path, patch: Patch, *extra: str) -> subprocess.CompletedProcess:
    # Paths are relative to `tree`, so git runs from there. git apply never fuzzes: any context
    # mismatch is a failure.
    return subprocess.run(
        ["git", "apply", "--whitespace=nowarn", *extra, "-"],
        cwd=tree,
        input=patch.diff,
        text=True,
        capture_output=True,
        # Outside a checkout, stop git from finding an enclosing repository (it would then resolve
        # the patch's paths against that repository's root instead of `tree`).
        env=None
        if (tree / ".git").exists()
        else {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)},
    )


def apply_series(tree: Path, patch_dir: Path, log=print) -> list[str]:
    """Apply every patch not yet applied; return the names applied now or already present."""
    done = []
    for p in read_series(patch_dir):
        if not applicable(p, tree):
            log(f"  skip {p.name}: touches {', '.join(p.files)}, absent in a core-only tree")
            continue
        if _git_apply(tree, p, "--check").returncode == 0:
            res = _git_apply(tree, p)
            if res.returncode:
                raise PatchError(f"{p.name} failed to apply:\n{res.stderr}")
            log(f"  applied {p.name}")
        elif _git_apply(tree, p, "--check", "--reverse").returncode == 0:
            log(f"  already applied {p.name}")
        else:
            res = _git_apply(tree, p, "--check", "-v")
            raise PatchError(f"{p.name} does not apply (no fuzz allowed) to {tree}:\n{res.stderr}")
        done.append(p.name)
    return done


def apply_verified(tree: Path, patch_dir: Path, log=print) -> list[str]:
    """What `make setup` and `patches.py apply` do: check the touched files against the lock,
    then apply the series.

    The tree may already carry some patches (a checkout set up before `git pull` brought a new
    one). On a copy, every patch found applied is undone (last first); what remains must be the
    pin byte for byte. So an edit anywhere in a touched file, on a patched line or elsewhere, is
    refused, and a new patch on a file an older patch already changed is not."""
    patches = [p for p in read_series(patch_dir) if applicable(p, tree)]
    touched = sorted({f for p in patches for f in p.files})
    undone_names = []
    with tempfile.TemporaryDirectory() as tmp:
        undone = Path(tmp)
        _copy_tree_files(tree, undone, [f for f in touched if (tree / f).exists()])
        for p in reversed(patches):
            if _git_apply(undone, p, "--check", "--reverse").returncode == 0:
                _git_apply(undone, p, "--reverse")
                undone_names.append(p.name)
        try:
            verify_lock(undone, patch_dir, files=touched)
        except PatchError as e:
            hint = f" (with {', '.join(reversed(undone_names))} undone)" if undone_names else ""
            raise PatchError(
                f"{e}\nThe touched files{hint} are not the pin: an edit the series does not "
                "make. `make check-patches` names the lines; `make refresh-patches` turns the "
                "edit into the series, or `git -C Megatron-LM checkout -- <file>` drops it."
            ) from None
    return apply_series(tree, patch_dir, log=log)


def verify_lock(tree: Path, patch_dir: Path, files: list[str] | None = None) -> None:
    """Each locked upstream file present in `tree` has the locked blob hash (pristine check)."""
    lock = read_lock(patch_dir)
    bad = []
    for rel, blob in sorted(lock["files"].items()):
        if files is not None and rel not in files:
            continue
        f = tree / rel
        if not f.exists():
            if rel.startswith(CORE_PREFIX):
                bad.append(f"{rel}: missing")
            continue
        got = git_blob_hash(f.read_bytes())
        if got != blob:
            bad.append(f"{rel}: blob {got}, locked {blob}")
    if bad:
        raise PatchError(
            "upstream files differ from patches/upstream.lock (pinned "
            f"{lock.get('commit', '?')}):\n  " + "\n  ".join(bad)
        )


def render_diff(rel: str, old: str, new: str) -> str:
    """A git-style unified diff (a/ b/ prefixes, 3 lines of context, no index line)."""
    body = difflib.unified_diff(
        old.splitlines(True), new.splitlines(True), f"a/{rel}", f"b/{rel}", n=3
    )
    lines = list(body)
    if not lines:
        return ""
    for i, ln in enumerate(lines):
        if not ln.endswith("\n"):
            lines[i] = ln + "\n\\ No newline at end of file\n"
    # difflib writes "--- a/x\n" with no trailing tab/date when no dates are given.
    return f"diff --git a/{rel} b/{rel}\n" + "".join(lines)


def _copy_tree_files(src: Path, dst: Path, rels: list[str]) -> None:
    for rel in rels:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)


def refreshed_patches(
    applied: Path, pristine: Path, patch_dir: Path, log=lambda m: None
) -> dict[str, str]:
    """Re-derive each patch's text from the applied tree, keeping headers.

    Patches are replayed one by one on a scratch copy of the pristine files, so each patch's diff
    is computed against the state left by the patches before it, as quilt does.
    """
    patches = read_series(patch_dir)
    rels = sorted({f for p in patches for f in p.files})
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        present = [r for r in rels if (pristine / r).exists()]
        _copy_tree_files(pristine, work, present)
        (work / "megatron" / "core").mkdir(parents=True, exist_ok=True)
        for p in patches:
            if not all((work / f).exists() for f in p.files):
                out[p.name] = p.path.read_text()  # not in this tree: keep as is
                continue
            before = {f: (work / f).read_text() for f in p.files}
            res = _git_apply(work, p)
            if res.returncode:
                raise PatchError(f"{p.name} does not apply to the pristine files:\n{res.stderr}")
            diff = ""
            for f in p.files:
                final = (applied / f).read_text()
                # This patch's change is what it did to `before`; later patches touching the same
                # file are attributed to themselves when their turn comes.
                after = (work / f).read_text()
                if final != after and not any(
                    f in q.files for q in patches[patches.index(p) + 1 :]
                ):
                    after = final  # the applied tree was edited: fold the edit into this patch
                    (work / f).write_text(final)
                    log(
                        f"  {f}: an edit beyond the series goes into {p.name} (the last patch "
                        "touching the file)"
                    )
                diff += render_diff(f, before[f], after)
            out[p.name] = p.header + "---\n" + diff
    return out


def pristine_from_git(tree: Path, commit: str, rels: list[str], dst: Path) -> None:
    for rel in rels:
        res = subprocess.run(
            ["git", "-C", str(tree), "show", f"{commit}:{rel}"], capture_output=True
        )
        if res.returncode:
            continue  # file absent at that commit
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(res.stdout)


def check(
    tree: Path, patch_dir: Path, log=print, root: Path | None = None, probes: bool = True
) -> None:
    """The full consistency check (make check-patches). `tree` must be pristine. `root`: where
    the Test:/Probe: paths are (default: the folder above patch_dir). `probes`: also require each
    probe to find its bug before its patch and nothing after the series."""
    root = patch_dir.parent if root is None else root
    patches = read_series(patch_dir)
    check_series_files(patch_dir, patches, root)
    lock = read_lock(patch_dir)
    rels = sorted({f for p in patches for f in p.files})
    unlocked = [r for r in rels if r not in lock["files"]]
    if unlocked:
        raise PatchError(f"files touched by the series but not in upstream.lock: {unlocked}")
    verify_lock(tree, patch_dir)
    log(f"  lock: {len(lock['files'])} upstream files match {lock.get('commit', '?')[:12]}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "tree"
        work.mkdir()
        present = [r for r in rels if (tree / r).exists()]
        _copy_tree_files(tree, work, present)
        if not is_core_only(tree):  # keep the mode of the original tree
            (work / "megatron" / "training").mkdir(parents=True, exist_ok=True)
            (work / "pretrain_gpt.py").write_text("")
        if probes:
            check_probes(work, patch_dir, root, log=log)
        apply_series(work, patch_dir, log=lambda m: log("  " + m.strip()))
        fresh = refreshed_patches(work, tree, patch_dir)
        stale = [n for n, text in fresh.items() if text != (patch_dir / n).read_text()]
        if stale:
            raise PatchError(
                f"refreshing would change {', '.join(stale)}: run `make refresh-patches`"
            )
    log("  refresh: no-op")


def check_probes(pristine: Path, patch_dir: Path, root: Path, log=print) -> None:
    """Each probe finds its bug just before its patch (the patch is needed at the pin) and
    nothing once the whole series is applied (the series fixes every instance)."""
    patches = read_series(patch_dir)
    probed = [(p, load_probe(p, root)) for p in patches]
    if not any(fn for _, fn in probed):
        return
    rels = sorted({f for p in patches for f in p.files})
    bad, found_before = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _copy_tree_files(pristine, work, [r for r in rels if (pristine / r).exists()])
        if (pristine / "megatron" / "training").is_dir():
            (work / "megatron" / "training").mkdir(parents=True, exist_ok=True)
        if (pristine / "pretrain_gpt.py").exists():
            (work / "pretrain_gpt.py").write_text("")
        for p, fn in probed:
            if not applicable(p, work):
                continue
            if fn is not None:
                found = run_probe(fn, work)
                if found:
                    found_before[p.name] = found
                elif found is not None:
                    bad.append(
                        f"{p.name}: its probe {fn.label} finds nothing before the "
                        "patch: upstream fixed the bug, the patch is not needed "
                        "(fixed upstream: drop it)"
                    )
            res = _git_apply(work, p)
            if res.returncode:
                return  # apply_series, next, says which patch and why
        for p, fn in probed:
            if fn is None or p.name not in found_before:
                continue
            left = run_probe(fn, work) or {}
            if left:
                bad.append(
                    f"{p.name}: its probe {fn.label} still finds the bug with the series "
                    "applied: " + "; ".join(left.values())
                )
            else:
                n = len(found_before[p.name])
                log(
                    f"  probe {fn.label}: {n} instance{'s' if n != 1 else ''} at the pin, "
                    f"none after {p.name}"
                )
    if bad:
        raise PatchError("probes disagree with the series:\n  " + "\n  ".join(bad))


def _changed_lines(expected: str, actual: str, limit: int = 6) -> list[str]:
    """'line N: ...' for each place `actual` differs from `expected` (line numbers of actual)."""
    out = []
    a, b = expected.splitlines(), actual.splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        where = f"line {j1 + 1}" if j2 - j1 <= 1 else f"lines {j1 + 1}-{j2}"
        if tag == "delete":
            where = f"after line {j1}"
        got = b[j1] if j2 > j1 else "(removed)"
        want = a[i1] if i2 > i1 else "(nothing)"
        out.append(f"{where}: {got.strip()!r}, expected {want.strip()!r}")
    if len(out) > limit:
        out = out[:limit] + [f"... {len(out) - limit} more"]
    return out


def tree_drift(sub: Path, commit: str, patch_dir: Path) -> list[str]:
    """What a git checkout of upstream holds beyond the pin and the series, one line per file
    (with the lines): HEAD not at `commit`; a file the series does not touch that is changed,
    deleted or untracked (and not ignored); a file the series touches whose content is neither
    the pin's nor the pin's with the series' patches applied in order (a prefix of them)."""
    head = _git(sub, "rev-parse", "HEAD").stdout.decode().strip()
    if head != commit:
        return [
            f"{sub.name} is at {head[:12] or '?'}, not the pin {commit[:12]} of "
            "patches/upstream.lock: run `make setup` (or move the pin with "
            "`make rebase-upstream`)"
        ]
    patches = read_series(patch_dir)
    touched = sorted({f for p in patches for f in p.files})
    out = []
    status = _git(sub, "status", "--porcelain=v1", "-z", "--untracked-files=all").stdout.decode()
    entries = status.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":
            i += 1  # the rename's source path follows
        if path in touched:
            continue
        if code == "??":
            out.append(f"{path}: untracked, neither upstream nor made by the series")
            continue
        if not (sub / path).exists():
            out.append(f"{path}: deleted; the series does not touch it")
            continue
        pin = _git(sub, "show", f"{commit}:{path}").stdout.decode(errors="replace")
        now = (sub / path).read_text(errors="replace")
        lines = _changed_lines(pin, now) or ["mode or content changed"]
        out.append(f"{path}: changed, and the series does not touch it: " + "; ".join(lines))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pristine_from_git(sub, commit, touched, work)
        if not is_core_only(sub):
            (work / "megatron" / "training").mkdir(parents=True, exist_ok=True)
            (work / "pretrain_gpt.py").write_text("")
        states = {f: [(work / f).read_bytes() if (work / f).exists() else None] for f in touched}
        for p in patches:
            if not applicable(p, work):
                continue
            if _git_apply(work, p).returncode:
                out.append(f"{p.name} does not apply to the pin (make check-patches says why)")
                return out
            for f in p.files:
                states[f].append((work / f).read_bytes())
        for f in touched:
            now = (sub / f).read_bytes() if (sub / f).exists() else None
            if now in states[f]:
                continue
            if now is None:
                out.append(f"{f}: missing; the series patches it")
                continue
            final = states[f][-1] or b""
            lines = _changed_lines(final.decode(errors="replace"), now.decode(errors="replace"))
            out.append(f"{f}: differs from the pin with the series applied: " + "; ".join(lines))
    return out


LOCK_VERSION_RE = re.compile(r"\d+\.\d+\.\d+(?:(?:a|b|rc|\.post|\.dev)\d+)?")


def write_lock(tree: Path, patch_dir: Path, commit: str, tag: str, core_version: str) -> None:
    """Write upstream.lock. `core_version`: the megatron-core release on the package index whose
    megatron/core files are the pinned commit's (what core-only setup installs and checks
    against the blob hashes); its line stays `megatron-core X.Y.Z`, which other tools read."""
    if not LOCK_VERSION_RE.fullmatch(core_version or ""):
        raise PatchError(
            f"megatron-core version {core_version!r} is not a release version "
            "(X.Y.Z, optionally rcN/aN/bN/.devN/.postN)"
        )
    rels = sorted({f for p in read_series(patch_dir) for f in p.files})
    lines = [
        "# Pinned upstream and the git blob hash of each upstream file the series touches.",
        "# Written by `tools/patches.py lock`; checked by `make check-patches` and `make setup`.",
        f"commit {commit}",
        f"tag {tag}",
        f"megatron-core {core_version}",
    ]
    for rel in rels:
        lines.append(f"{git_blob_hash((tree / rel).read_bytes())} {rel}")
    (patch_dir / "upstream.lock").write_text("\n".join(lines) + "\n")


def split_hunks(diff: str) -> list[tuple[str, str, list[str]]]:
    """The hunks of a unified diff: (file, file header, [hunk text, ...]) per file section.

    The file header is the `diff --git`/`---`/`+++` lines; each hunk text starts at its `@@` line.
    """
    out = []
    for section in re.split(r"(?m)^(?=diff --git )", diff):
        if not section.strip():
            continue
        m = re.match(r"diff --git a/(\S+) b/\S+\n", section)
        if not m:
            continue
        parts = re.split(r"(?m)^(?=@@ )", section)
        out.append((m.group(1), parts[0], [h for h in parts[1:] if h.strip()]))
    return out


@dataclass(frozen=True)
class FailedHunk:
    file: str
    header: str  # the `@@ -a,b +c,d @@` line
    first_change: str  # the first -/+ line of the hunk, to recognise it by eye
    reason: str  # "file missing" or "context or removed lines do not match"

    def describe(self) -> str:
        return f"{self.file}: hunk {self.header} ({self.reason}); first change: {self.first_change}"


def failing_hunks(tree: Path, patch: Patch) -> list[FailedHunk]:
    """The hunks of `patch` that do not apply (with no fuzz) to the files in `tree`.

    Each hunk is checked alone (`git apply --check` of a one-hunk diff), so a hunk that fails only
    because an earlier hunk of the same patch failed is not blamed; git's own offset search
    still applies, so a hunk whose context merely moved is not reported.
    """
    failed = []
    for rel, file_header, hunks in split_hunks(patch.diff):
        for hunk in hunks:
            header = hunk.splitlines()[0]
            header = header[: header.index("@@", 2) + 2] if "@@" in header[2:] else header
            change = next(
                (ln for ln in hunk.splitlines()[1:] if ln[:1] in "+-" and ln[1:].strip()), ""
            )
            if not (tree / rel).exists():
                failed.append(FailedHunk(rel, header, change, "file missing"))
                continue
            one = Patch(patch.name, patch.path, patch.header, file_header + hunk)
            if _git_apply(tree, one, "--check").returncode:
                failed.append(
                    FailedHunk(rel, header, change, "context or removed lines do not match")
                )
    return failed


def _git(repo: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True)


def _with_index_lines(diff: str, blobs: dict[str, tuple[str, str]]) -> str:
    """Insert `index PRE..POST` lines so that `git apply --3way` can find the preimage blobs."""

    def add(m: re.Match) -> str:
        rel = m.group(1)
        if rel not in blobs:
            return m.group(0)
        pre, post = blobs[rel]
        return f"{m.group(0)}index {pre}..{post}\n"

    return re.sub(r"(?m)^diff --git a/(\S+) b/\S+\n", add, diff)


@dataclass
class ReplayResult:
    patch: str
    status: str  # clean | 3way | conflict | upstream | skipped | not-tried
    files: list[str]
    failed: list[FailedHunk]  # hunks that do not apply strictly (for 3way and conflict)
    conflicted: list[str]  # files left with conflict markers by the 3-way merge
    message: str = ""  # why (conflict: git's words; upstream: how we know)
    before: dict[str, str] = field(default_factory=dict)  # the patch's files before it (applied)
    after: dict[str, str] = field(default_factory=dict)  # and after it
    notes: list[str] = field(default_factory=list)  # worth a look, whatever the status

    STATUS_TEXT = {
        "clean": "clean",
        "3way": "3way",
        "conflict": "conflict",
        "upstream": "fixed upstream: drop it",
        "skipped": "skipped",
        "not-tried": "not tried",
    }

    @property
    def status_text(self) -> str:
        return self.STATUS_TEXT.get(self.status, self.status)


def patches_from_replay(results: list[ReplayResult], patch_dir: Path) -> dict[str, str]:
    """The patch files re-derived from a replay (headers kept, stable diff format): what
    `refresh` would write, also for patches that needed the 3-way merge. Patches upstream
    already contains are left out."""
    out = {}
    for r in results:
        if r.status == "upstream":
            continue
        p = read_patch(patch_dir / r.patch)
        if r.status not in ("clean", "3way"):
            out[r.patch] = p.path.read_text()
            continue
        out[r.patch] = (
            p.header
            + "---\n"
            + "".join(render_diff(f, r.before.get(f, ""), r.after.get(f, "")) for f in r.files)
        )
    return out


def _upstream_has(
    repo: Path, p: Patch, probe, at_pin: dict | None, fixed: set[str]
) -> tuple[str, list[str]]:
    """(why the upstream work tree of `repo` already contains the patch's change, or ""; notes).

    `at_pin`: what the patch's probe finds at the pin just before the patch; `fixed`: the
    instances the patch fixes there."""
    present = all((repo / f).exists() for f in p.files)
    if (
        present
        and _git_apply(repo, p, "--check").returncode
        and _git_apply(repo, p, "--check", "--reverse").returncode == 0
    ):
        return "upstream already has this very change", []
    if probe is None or not at_pin:
        return "", []
    now = run_probe(probe, repo)
    if now is None:
        return "", []
    new = [now[k] for k in sorted(set(now) - set(at_pin))]
    notes = (
        [f"upstream has the bug elsewhere, which this patch does not fix: {'; '.join(new)}"]
        if new
        else []
    )
    if fixed and not fixed & set(now):
        return (
            f"upstream fixed the bug its own way: probe {probe.label} no longer finds "
            f"{', '.join(sorted(fixed))}"
        ), notes
    return "", notes


def replay_3way(
    repo: Path,
    base_rev: str,
    patch_dir: Path,
    stop_on_conflict: bool = False,
    log=print,
    root: Path | None = None,
) -> list[ReplayResult]:
    """Apply the series to the work tree of git repository `repo`, falling back to a 3-way merge.

    `repo`'s work tree must hold the new upstream files, pristine; `base_rev` is a commit of
    `repo` holding the old pin, to which the series applies with no fuzz. For each patch, first:
    does upstream already contain its change (its diff applies in reverse, or the bug its probe
    finds at the pin is gone upstream)? Then it is "upstream" ("fixed upstream: drop it") and
    left out. Else a strict `git apply`; when that fails, its preimage (the pin's file with the
    earlier patches applied, computed here and written to repo's object store) is put in
    `index` lines and `git apply --3way` merges the patch's change into the new file.

    On a conflict the patch's files are put back as they were before that patch (no conflict
    markers are left behind). Every patch gets an outcome: later patches are still tried,
    on the files without the failed one (noted in their result), unless stop_on_conflict. The
    index of `repo` is left matching HEAD for every file the series touches (the 3-way merge
    stages its result; that is undone here) so the tree looks like `tools/patches.py apply`
    made it. `root`: where the patches' Probe: paths are (default: above patch_dir).
    """
    root = patch_dir.parent if root is None else root
    patches = read_series(patch_dir)
    touched = sorted({f for p in patches for f in p.files})
    results: list[ReplayResult] = []
    failed_on: dict[str, str] = {}  # file -> the first patch that conflicted on it
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)  # the pin's files with the patches so far applied (quilt's view)
        pristine_from_git(repo, base_rev, touched, base)
        for i, p in enumerate(patches):
            present = [(repo / f).exists() for f in p.files]
            outside_core = not all(f.startswith(CORE_PREFIX) for f in p.files)
            if is_core_only(repo) and outside_core and not any(present):
                results.append(ReplayResult(p.name, "skipped", p.files, [], [], "files absent"))
                continue
            probe = load_probe(p, root)
            at_pin = run_probe(probe, base) if probe else None
            blobs = {}
            base_ok = _git_apply(base, p, "--check").returncode == 0
            if base_ok:
                for f in p.files:
                    pre = (base / f).read_bytes() if (base / f).exists() else b""
                    pre_id = _git(repo, "hash-object", "-w", "--stdin", input=pre).stdout
                    blobs[f] = (pre_id.decode().strip(), "")
                _git_apply(base, p)
                for f in p.files:
                    post = (base / f).read_bytes() if (base / f).exists() else b""
                    blobs[f] = (blobs[f][0], git_blob_hash(post))
            fixed = set(at_pin or {}) - set((run_probe(probe, base) or {}) if probe else {})
            why, upstream_notes = _upstream_has(repo, p, probe, at_pin, fixed)
            earlier = sorted({failed_on[f] for f in p.files if f in failed_on})
            notes = (
                [f"tried on the files without {', '.join(earlier)} (which conflicted)"]
                if earlier
                else []
            )
            if why:  # judged on upstream's files alone: earlier failures do not matter
                results.append(
                    ReplayResult(p.name, "upstream", p.files, [], [], why, notes=upstream_notes)
                )
                log(f"  fixed upstream: {p.name} ({why}): drop it")
                continue

            # Both are called within this iteration; the defaults bind this patch and its probe.
            def texts(files=p.files) -> dict[str, str]:
                return {f: (repo / f).read_text() for f in files if (repo / f).exists()}

            before = texts()

            def left_by_probe(probe=probe) -> list[str]:
                left = run_probe(probe, repo) if probe else None
                return (
                    [
                        f"its probe still finds the bug with the patch applied: "
                        f"{'; '.join(left.values())}"
                    ]
                    if left
                    else []
                )

            if _git_apply(repo, p, "--check").returncode == 0:
                _git_apply(repo, p)
                notes += left_by_probe()
                results.append(
                    ReplayResult(p.name, "clean", p.files, [], [], "", before, texts(), notes)
                )
                log(f"  applied {p.name}")
                continue
            failed = failing_hunks(repo, p)
            saved = {f: (repo / f).read_bytes() for f in p.files if (repo / f).exists()}
            res = None
            if base_ok and all((repo / f).exists() for f in p.files):
                # --3way implies --index: the index must match the work tree for these files.
                _git(repo, "add", "--", *p.files)
                diff3 = _with_index_lines(p.diff, blobs)
                res = subprocess.run(
                    ["git", "apply", "--3way", "--whitespace=nowarn", "-"],
                    cwd=repo,
                    input=diff3,
                    text=True,
                    capture_output=True,
                )
            if res is not None and res.returncode == 0:
                notes += left_by_probe()
                results.append(
                    ReplayResult(p.name, "3way", p.files, failed, [], "", before, texts(), notes)
                )
                log(f"  applied {p.name} with a 3-way merge")
                continue
            conflicted = [
                f
                for f in p.files
                if (repo / f).exists() and b"\n<<<<<<< " in b"\n" + (repo / f).read_bytes()
            ]
            why = res.stderr.strip() if res is not None else "no 3-way merge possible"
            # Put the patch's files back as they were before this patch; clear unmerged entries.
            _git(repo, "reset", "-q", "--", *p.files)
            for f, data in saved.items():
                (repo / f).write_bytes(data)
            results.append(
                ReplayResult(p.name, "conflict", p.files, failed, conflicted, why, notes=notes)
            )
            log(f"  CONFLICT in {p.name}")
            for f in p.files:
                failed_on.setdefault(f, p.name)
            if stop_on_conflict:
                for q in patches[i + 1 :]:
                    results.append(ReplayResult(q.name, "not-tried", q.files, [], [], "stopped"))
                break
    _git(repo, "reset", "-q", "--", *touched)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", choices=["apply", "verify", "check", "refresh", "lock"])
    ap.add_argument("--tree", type=Path, required=True, help="directory holding megatron/")
    ap.add_argument("--patches", type=Path, default=ROOT / "patches")
    ap.add_argument("--pristine", type=Path, help="pristine tree for refresh (default: git)")
    ap.add_argument("--commit", help="commit for lock/refresh (default: upstream.lock's)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--core-version", default=None)
    ap.add_argument(
        "--root",
        type=Path,
        default=None,
        help="repository the Test:/Probe: paths are relative to (default: above --patches)",
    )
    args = ap.parse_args(argv)
    tree, pdir = args.tree.resolve(), args.patches.resolve()
    try:
        if args.command == "apply":
            apply_verified(tree, pdir)
        elif args.command == "verify":
            verify_lock(tree, pdir)
        elif args.command == "check":
            check(tree, pdir, root=args.root.resolve() if args.root else None)
            print("check-patches: OK")
        elif args.command == "refresh":
            commit = args.commit or read_lock(pdir)["commit"]
            with tempfile.TemporaryDirectory() as tmp:
                pristine = args.pristine
                if pristine is None:
                    pristine = Path(tmp)
                    rels = sorted({f for p in read_series(pdir) for f in p.files})
                    pristine_from_git(tree, commit, rels, pristine)
                for name, text in refreshed_patches(
                    tree, pristine.resolve(), pdir, log=print
                ).items():
                    if (pdir / name).read_text() != text:
                        (pdir / name).write_text(text)
                        print(f"  refreshed {name}")
        elif args.command == "lock":
            old = read_lock(pdir) if (pdir / "upstream.lock").exists() else {}
            write_lock(
                tree,
                pdir,
                args.commit or old["commit"],
                args.tag or old.get("tag", "?"),
                args.core_version or old.get("megatron-core", "?"),
            )
    except PatchError as e:
        print(f"patches: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
