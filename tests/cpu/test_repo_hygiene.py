"""Tier: cpu. The repository stands on its own: no tracked file refers to a path outside it.

A clone has only what git tracks (plus the Megatron-LM submodule, whose content is not this
repository's files and is not checked). Flagged, in every tracked text file:

- `../shared`, the development workspace's shared folder, which a clone does not have;
- a relative path that climbs out of the repository: one with a `..` component (and a `/`) that
  resolves outside the root from the file's folder (how Markdown links resolve), or, in anything
  but Markdown, from the root too (the project's scripts and commands run from the root);
- an absolute path under the development machine's `/work`;
- a file of that shared folder named without its path (`baseline.md`, `gpu-wheelhouse.sh`, ...)
  while the repository has no file of that name.

Captured program output (`docs/benchmarks/raw/`, `examples/logs/`: logs, JSON, tables written by
benchmark and test runs) keeps its absolute `/work` paths: there they are data (where a traceback
pointed, the command a run executed), not references a reader must follow, and editing them would
falsify the record. The `..` rules still apply to those files.

Binary files (a NUL byte or not UTF-8: the PNG figures) are skipped. A tracked symbolic link is
checked by its target.
"""

import os
import posixpath
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CAPTURED_OUTPUT = ("docs/benchmarks/raw/", "examples/logs/")
SELF = "tests/cpu/test_repo_hygiene.py"
# Written in two pieces so that this file does not match its own patterns.
_WORK = "/" + "work"
_SHARED = re.compile(r"(?<![\w.\-])\.\./shared(?![\w.\-])")
_ABSOLUTE_WORK = re.compile(r"(?<![\w.\-/~$])" + re.escape(_WORK) + r"(?![\w.\-])")
_PATH_TOKEN = re.compile(r"[\w.\-/]+")
# Files of the workspace's shared folder; a clone has them only if the repository tracks them.
WORKSPACE_FILES = (
    "baseline.md",
    "landscape.md",
    "megatron-api.md",
    "style.md",
    "gpu-wheelhouse.sh",
)
_WORKSPACE_FILE = re.compile(
    r"(?<![\w.\-])(?:[\w.\-]+/)*(" + "|".join(map(re.escape, WORKSPACE_FILES)) + r")(?![\w\-])"
)


def _climbs_out(token: str, base: str) -> bool:
    """True when the relative path `token`, read from the repo folder `base` ('' = root), resolves
    outside the repository."""
    resolved = posixpath.normpath(posixpath.join(base, token))
    return resolved == ".." or resolved.startswith("../")


def outside_refs(relpath: str, text: str, tracked_names=frozenset()) -> list[tuple[int, str, str]]:
    """(line number, offending text, reason) for each reference in `text`, the content of the
    tracked file `relpath` (posix, relative to the root), to a path outside the repository.
    `tracked_names`: base names of the tracked files."""
    folder = posixpath.dirname(relpath)
    bases = [folder] if relpath.endswith(".md") or folder == "" else [folder, ""]
    captured = relpath.startswith(CAPTURED_OUTPUT)
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _SHARED.finditer(line):
            found.append((lineno, m.group(0), "the workspace's shared folder, not in a clone"))
        for m in _WORKSPACE_FILE.finditer(line):
            if m.group(1) not in tracked_names and "../shared" not in m.group(0):
                found.append(
                    (lineno, m.group(0), "a file of the workspace's shared folder, not in a clone")
                )
        if not captured:
            for m in _ABSOLUTE_WORK.finditer(line):
                found.append(
                    (
                        lineno,
                        line[m.start() : m.start() + 60].split()[0],
                        "absolute path on the development machine",
                    )
                )
        for m in _PATH_TOKEN.finditer(line):
            token = m.group(0)
            # A path has a separator: a bare `..` is a range or a column ("gather .. False").
            if token.startswith("/") or "/" not in token or ".." not in token.split("/"):
                continue
            if "../shared" in token:
                continue  # reported above
            outside = [b or "." for b in bases if _climbs_out(token, b)]
            if outside:
                found.append(
                    (lineno, token, f"climbs out of the repository from {', '.join(outside)}")
                )
    return found


def _tracked() -> list[tuple[str, str]]:
    """(mode, path) of every tracked entry."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-s", "-z"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    entries = []
    for rec in out.decode().split("\0"):
        if rec:
            meta, path = rec.split("\t", 1)
            entries.append((meta.split()[0], path))
    return entries


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_tracked_file_refers_outside_the_repo():
    entries = _tracked()
    assert any(p == "README.md" for _, p in entries), "git ls-files listed no README.md"
    problems = []
    checked = 0
    names = frozenset(posixpath.basename(p) for _, p in entries)
    for mode, rel in entries:
        path = ROOT / rel
        if mode == "160000":  # submodule (Megatron-LM): not this repository's files
            continue
        if rel == SELF:  # the detector names what it detects; its cases are checked below
            continue
        if mode == "120000":
            target = os.readlink(path)
            if target.startswith("/") or _climbs_out(target, posixpath.dirname(rel)):
                problems.append(f"{rel}: symbolic link to {target}, outside the repository")
            continue
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = _text(path)
        if text is None:
            continue
        checked += 1
        problems += [
            f"{rel}:{n}: {what} ({why})" for n, what, why in outside_refs(rel, text, names)
        ]
    assert checked > 50, f"only {checked} tracked text files read"
    assert not problems, (
        "tracked files refer to paths outside the repository (bring what they need into the repo: "
        "facts into docs/, tools into tools/):\n  " + "\n  ".join(problems)
    )


# The detector itself, on inputs with a known answer.


@pytest.mark.parametrize(
    "relpath, line",
    [
        ("docs/QUICKSTART.md", "hosts we measured, `../shared/docs/baseline.md`). Constraints"),
        ("tools/stage_gpu.sh", "[ -d .whl ] || bash ../shared/tools/gpu-wheelhouse.sh .whl"),
        ("overlay/fluid/comm/context.py", "    ../shared/docs/baseline.md. Through host memory"),
        ("README.md", "see [the notes](../notes.md)"),
        ("docs/upstream/README.md", "see ../../../elsewhere/x.md"),
        ("tools/stage_gpu.sh", "cp ../other/file ."),
        ("benchmarks/x.py", 'open("overlay/../../x")'),
        ("docs/upstream/README.md", "Done on `git clone " + _WORK + "/main /tmp/scratch-super`"),
        ("docs/x.md", "--url " + _WORK + "/.mirror/NVIDIA+Megatron-LM/repo"),
        ("docs/benchmarks/raw/s1/run.log", "bash ../shared/tools/x.sh"),
        (
            "benchmarks/bench_moe.py",
            "  the scheduler off (chunks 1): baseline.md's eta = (T_serial",
        ),
        ("docs/CORE_CONCEPT.md", "(4% for the Mixtral-like layer in baseline.md) and"),
        ("tools/stage_gpu.sh", "bash tools/gpu-wheelhouse.sh .whl"),
    ],
)
def test_detector_flags(relpath, line):
    assert outside_refs(relpath, "first line\n" + line + "\n"), (relpath, line)


@pytest.mark.parametrize(
    "relpath, line",
    [
        ("docs/benchmarks/README.md", "`../img/timeline.png` (`docs/make_timeline.py`)"),
        ("benchmarks/gpu_env.sh", "cp overlay/fluid/../pyproject.toml /tmp/pyproject.toml"),
        ("tools/stage_gpu.sh", 'cd "$(dirname "$0")/.."'),
        ("docs/x.md", "`pretrain_gpt.py ... --use-fluid-moe` and x[..., 0], range 1..4"),
        ("docs/x.md", "https://example.org" + _WORK + "/x and /tmp/bench_moe"),
        (
            "docs/benchmarks/raw/s1/run.log",
            _WORK + "/main/.megatron/megatron/core/models/backends.py:34",
        ),
        ("examples/logs/x.log", "  megatron.core: " + _WORK + "/main/.megatron/megatron/core"),
        ("docs/hardware.md", "the shared folder ./shared and sub../shared_x are other names"),
        (
            "docs/benchmarks/raw/s1/run.log",
            "  megatron_fsdp_enable_fine_grained_param_gather .. False",
        ),
        ("tools/patches.py", '        return f"{m.group(0)}index {pre}..{post}\\n"'),
        ("docs/x.md", "see mybaseline.md, baseline.mdx and tools/gpu_wheelhouse.sh"),
    ],
)
def test_detector_passes(relpath, line):
    assert outside_refs(relpath, line + "\n") == [], (relpath, line)


def test_detector_reports_line_numbers():
    text = "ok\nsee ../shared/docs/baseline.md\nok\n"
    assert [n for n, _, _ in outside_refs("docs/a.md", text)] == [2]


# LICENSE and NOTICE.

# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, which starts with one blank line.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_is_the_apache_2_0_text():
    import hashlib

    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(b"\n" + text.lstrip(b"\n")).hexdigest() == APACHE_2_0_SHA256


def test_notice_names_every_patch_and_the_upstream_files_it_modifies():
    notice = (ROOT / "NOTICE").read_text()
    assert "Copyright 2026 The FluidMoE authors" in notice
    assert "Megatron-LM" in notice and "NVIDIA CORPORATION" in notice
    series = [
        line.strip()
        for line in (ROOT / "patches" / "series").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert series
    lines = notice.splitlines()
    for name in series:
        files = sorted(
            set(re.findall(r"(?m)^\+\+\+ b/(\S+)", (ROOT / "patches" / name).read_text()))
        )
        assert files, name
        named = [line for line in lines if name in line]
        assert named, f"NOTICE does not name {name}"
        for f in files:
            assert any(f in line for line in named), (
                f"NOTICE: {name} modifies {f}; say so on its line"
            )


def test_workspace_file_names_pass_once_the_repo_has_them():
    line = "eta as defined in docs/baseline.md\n"
    assert outside_refs("docs/x.md", line)
    assert outside_refs("docs/x.md", line, frozenset({"baseline.md"})) == []
