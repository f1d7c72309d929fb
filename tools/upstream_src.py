"""Upstream sources for the maintenance tools (diff_report.py, rebase_upstream.py, api_check.py).

A "side" of a comparison is either a git ref of the Megatron-LM repository (the submodule, or any
clone/mirror) or a `megatron-core` release from the package index (its wheel or sdist holds
`megatron/core/**` only: the core files are byte-identical to the tag's blobs, package_info.py
aside). `build_scratch` puts two sides into one scratch git repository, as two commits, so every
later step (diff --stat, hunks, patch replay, API check) is a plain git operation whatever the
sides were made of.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST_CACHE = ROOT / ".build" / "dist"
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+(?:(?:a|b|rc|\.post|\.dev)\d+)?$")
CORE = "megatron/core"


def git(repo: Path, *args: str, check: bool = True, input: bytes | None = None) -> str:
    res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, input=input)
    if check and res.returncode:
        raise RuntimeError(f"git {' '.join(args)} (in {repo}) failed:\n{res.stderr.decode()}")
    return res.stdout.decode()


def is_git_repo(path: Path | None) -> bool:
    return path is not None and (path / ".git").exists()


def resolve_commit(repo: Path, ref: str) -> str | None:
    res = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "-q", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    return res.stdout.strip() if res.returncode == 0 else None


def latest_core_version(python: str = sys.executable) -> str:
    """The newest megatron-core release on the package index (pip's configured index)."""
    res = subprocess.run(
        [python, "-m", "pip", "index", "versions", "--timeout", "30", "megatron-core"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    m = re.search(r"^Available versions: (.+)$", res.stdout, flags=re.M)
    if res.returncode == 0 and m:
        return m.group(1).split(",")[0].strip()
    # Older pips lack `pip index`: download the newest and read the version off the file name.
    tmp = DIST_CACHE / "latest-probe"
    shutil.rmtree(tmp, ignore_errors=True)
    res2 = subprocess.run(
        [python, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), "megatron-core"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    names = [p.name for p in tmp.glob("megatron_core-*")]
    if res2.returncode or not names:
        raise RuntimeError(
            "cannot reach the package index for megatron-core:\n" + res.stderr + res2.stderr
        )
    m = re.match(r"megatron_core-([^-]+?)(?:\.tar\.gz|-)", names[0])
    if m is None:
        raise RuntimeError(f"unexpected megatron-core distribution name: {names[0]}")
    return m.group(1)


def _package_info_values(package_info: str) -> dict:
    """Module-level `NAME = <literal>` assignments of package_info.py, whatever the quoting."""
    vals: dict = {}
    try:
        tree = ast.parse(package_info)
    except SyntaxError:  # read the four lines alone
        for m in re.finditer(
            r"^(MAJOR|MINOR|PATCH|PRE_RELEASE)\s*=\s*(.+?)\s*(?:#.*)?$", package_info, re.M
        ):
            try:
                vals[m.group(1)] = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                pass
        return vals
    for node in tree.body:
        target, value = None, None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and value is not None:
            try:
                vals[target.id] = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError):
                pass  # computed (`__version__ = '.'.join(...)`): not a declaration
    return vals


def normalize_version(text: str) -> str:
    """PEP 440 normal form ('0.20.0rc0', '0.19.1'), the spelling pip and the index use."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # the tools also run outside the venv
        if VERSION_RE.match(text):
            return text
        raise ValueError(f"{text!r} is not a release version") from None
    try:
        v = Version(text)
    except InvalidVersion:
        raise ValueError(f"{text!r} is not a release version") from None
    return v.public


def core_version_of(package_info: str) -> str:
    """The version megatron/core/package_info.py declares, e.g. '0.19.1' or '0.20.0rc0'.

    MAJOR, MINOR, PATCH and PRE_RELEASE as Python literals (single or double quotes, ints or
    strings, PRE_RELEASE '' or None), else a literal `__version__`. Raises ValueError when the
    file declares no version, so a lock never records a malformed one.
    """
    vals = _package_info_values(package_info)
    if {"MAJOR", "MINOR", "PATCH"} <= vals.keys():
        pre = vals.get("PRE_RELEASE") or ""
        text = f"{vals['MAJOR']}.{vals['MINOR']}.{vals['PATCH']}{pre}"
    elif isinstance(vals.get("__version__"), str):
        text = vals["__version__"]
    else:
        raise ValueError("package_info.py declares no MAJOR/MINOR/PATCH and no literal __version__")
    return normalize_version(str(text).strip())


def release_of(tags: list[str], package_info: str) -> str:
    """The megatron-core release whose files a Megatron-LM commit holds.

    A `core_vX.Y.Z` tag on the commit names it, whatever package_info.py says there: a release
    tag can sit on the bump to the next version (core_v0.19.0's package_info.py says 0.19.1,
    while the 0.19.0 wheel on the package index, whose core files are the tag's, says 0.19.0).
    Without such a tag, package_info.py's version.
    """
    for tag in sorted(tags):
        m = re.fullmatch(r"core_v(.+)", tag)
        if m:
            try:
                return normalize_version(m.group(1))
            except ValueError:
                continue
    return core_version_of(package_info)


@dataclass(frozen=True)
class Side:
    spec: str  # as the user wrote it
    kind: str  # "git" | "index"
    commit: str | None = None  # kind git
    version: str | None = None  # kind index (or the release a git tag is for)

    @property
    def label(self) -> str:
        if self.kind == "index":
            return f"megatron-core {self.version} (package index)"
        short = self.commit[:12] if self.commit else "?"
        return f"{self.spec} ({short})" if self.spec != self.commit else short


def resolve_side(spec: str, repo: Path | None) -> Side:
    """A git ref of `repo` if it resolves there (a version X tries tag core_vX), else a version of
    megatron-core on the package index."""
    if repo is not None and is_git_repo(repo):
        if VERSION_RE.match(spec):
            commit = resolve_commit(repo, f"core_v{spec}")
            if commit:
                return Side(f"core_v{spec}", "git", commit=commit, version=spec)
        commit = resolve_commit(repo, spec)
        if commit:
            return Side(spec, "git", commit=commit)
    if VERSION_RE.match(spec):
        return Side(spec, "index", version=spec)
    where = f"the repository {repo}" if is_git_repo(repo) else "(no Megatron-LM git checkout)"
    raise RuntimeError(f"'{spec}' is neither a git ref of {where} nor a megatron-core version")


def materialize(side: Side, repo: Path | None, dest: Path, extra: list[str]) -> None:
    """Write megatron/core (and, for a git side, the `extra` paths that exist) into dest."""
    if side.kind == "index":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import setup_megatron as S  # the download/extract of megatron-core dists `make setup` uses

        assert side.version is not None  # an index side always has one
        dist = S._download_core(side.version, DIST_CACHE)
        tmp = dest.parent / (dest.name + ".extract")
        shutil.rmtree(tmp, ignore_errors=True)
        S._extract_core(dist, tmp)
        shutil.copytree(tmp / "megatron", dest / "megatron", dirs_exist_ok=True)
        shutil.rmtree(tmp)
        return
    assert side.commit is not None  # a git side always has one
    paths = [CORE] + [
        p
        for p in extra
        if subprocess.run(
            ["git", "-C", str(repo), "cat-file", "-e", f"{side.commit}:{p}"], capture_output=True
        ).returncode
        == 0
    ]
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", side.commit, *paths],
        capture_output=True,
        check=True,
    ).stdout
    tar_path = dest.parent / (dest.name + ".tar")
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as t:
        t.extractall(dest, filter="data")
    tar_path.unlink()


def _python_files_only(dest: Path) -> None:
    """Core-only comparisons: keep *.py with one file mode. A wheel drops the READMEs and adds
    compiled helpers, and modes differ between git and dists; none of that is an upstream change."""
    for f in list((dest / "megatron").rglob("*")):
        if f.is_file():
            if f.suffix != ".py":
                f.unlink()
            else:
                f.chmod(0o644)


@dataclass(frozen=True)
class Scratch:
    repo: Path
    old: str  # commit holding the FROM side
    new: str  # commit holding the TO side (checked out)
    core_only: bool


def build_scratch(old: Side, new: Side, repo: Path | None, extra: list[str], dest: Path) -> Scratch:
    """A scratch git repository at `dest` with one commit per side, the TO side checked out.

    Full mode (both sides git): megatron/core plus the `extra` paths (the files the patches touch
    outside core, and pretrain_gpt.py so the tree counts as full). Core-only when either side
    comes from the package index: megatron/core only, on both sides.
    """
    core_only = "index" in (old.kind, new.kind)
    extra = [] if core_only else sorted(set(extra) | {"pretrain_gpt.py"})
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    git(dest, "init", "-q")
    commits = []
    for side in (old, new):
        for child in dest.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        materialize(side, repo, dest, extra)
        if core_only:
            _python_files_only(dest)
        # A fresh index: `git add` trusts the stat data the index holds, and the two sides'
        # files can share size and mtime second (git archive stamps the commit time), so with
        # the old index a changed file would keep the FROM content.
        (dest / ".git" / "index").unlink(missing_ok=True)
        git(dest, "add", "-A")
        git(
            dest,
            "-c",
            "user.name=fluid",
            "-c",
            "user.email=fluid@localhost",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            side.label,
        )
        commits.append(git(dest, "rev-parse", "HEAD").strip())
    return Scratch(dest, commits[0], commits[1], core_only)
