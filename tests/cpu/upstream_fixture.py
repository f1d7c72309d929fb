"""Synthetic upstream and superproject for the maintenance-tool tests (not a test module).

`make_upstream(dir)` builds a tiny fake Megatron-LM git repository: commit `pin` (tag core_v0.1.0)
holds megatron/core/transformer/{transformer_config.py, moe/moe_layer.py} and package_info.py;
branches off the pin each change one thing:
  clean     5 lines inserted at the top of moe_layer.py (every hunk moves), a new optional
            parameter on MoELayer.forward, a new config field at the end (tag core_v0.2.0)
  drift     an upstream edit two lines above a patch's insertion: strict `git apply` fails on the
            context, `git apply --3way` merges it
  conflict  upstream rewrites the very line a patch inserts after: a real conflict
  rename    MoELayer.forward's `hidden_states` renamed to `x`
  fixed     upstream fixes the docstring bug patch 0003 fixes, its own way ("10%%)" where 0003
            writes "10 percent)": a textual conflict), and adds the same bug in a new field
  same-fix  upstream makes 0003's very change
  release   package_info.py says 0.3.0 with single quotes (PRE_RELEASE = ''); no tag
All commits carry one fixed date, as release commits made in the same second do: `git archive`
then gives every side's files the same mtime.
`make_superproject(dir, upstream)` builds a superproject with the upstream as its `Megatron-LM`
submodule at the pin, a three-patch series with a lock (0003 names a Probe), the test file the
headers cite, an overlay subclassing MoELayer, and the series applied to the submodule, all
committed; its `.build/dist` (ignored) holds megatron-core "wheels" 0.1.0, 0.2.0 and 0.3.0 made
from the pin, core_v0.2.0 and release: the package index of this world.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
import patches as P  # noqa: E402

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00+0000",
}
MOE = "megatron/core/transformer/moe/moe_layer.py"
CFG = "megatron/core/transformer/transformer_config.py"

MOE_V1 = '''"""Fake MoE layer."""


class BaseMoELayer:
    def __init__(self, config, layer_number=None):
        self.config = config

    def route(self, hidden_states):
        return hidden_states, None


class MoELayer(BaseMoELayer):
    def __init__(self, config, submodules=None, layer_number=None):
        super().__init__(config, layer_number)
        self.submodules = submodules

    def route(self, hidden_states):
        probs = hidden_states
        routing_map = None
        return probs, routing_map

    def forward(self, hidden_states, padding_mask=None):
        probs, routing_map = self.route(hidden_states)
        scale = 1
        bias = 0
        output = hidden_states * scale + bias
        return output, None
'''

CFG_V1 = '''from dataclasses import dataclass


@dataclass
class TransformerConfig:
    num_layers: int = 0
    hidden_size: int = 0
    num_moe_experts: int = 0
    moe_router_topk: int = 2
    moe_buffer_factor: float = 1.10
    """Headroom of the token buffer (e.g. 1.10 = 10%)."""

    moe_router_dtype: str = "fp32"
    """Router dtype."""
'''
BAD_DOC = '    """Headroom of the token buffer (e.g. 1.10 = 10%)."""\n'

PKG = 'MAJOR = 0\nMINOR = {minor}\nPATCH = 0\nPRE_RELEASE = ""\n'

# The series, as in the real one: a config field (0001), a hook (0002), an upstream bug fix with
# a probe (0003) on the file 0001 also patches.
CFG_PATCHED = CFG_V1.replace(
    "    hidden_size: int = 0\n", "    hidden_size: int = 0\n    use_fluid_moe: bool = False\n"
)
MOE_PATCHED = MOE_V1.replace(
    "        output = hidden_states * scale + bias\n",
    "        output = hidden_states * scale + bias\n        self.fluid_seen = True\n",
)
CFG_FIXED = CFG_PATCHED.replace(BAD_DOC, BAD_DOC.replace("10%)", "10 percent)"))
SERIES = {  # name: (file, before, after)
    "0001-config-flag.patch": (CFG, CFG_V1, CFG_PATCHED),
    "0002-moe-hook.patch": (MOE, MOE_V1, MOE_PATCHED),
    "0003-escape-percent.patch": (CFG, CFG_PATCHED, CFG_FIXED),
}
PROBE = "tools/probes.py:percent_safe_config_help"
TEST_FILE = "tests/test_series.py"

OVERLAY = """from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig


class FluidMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None):
        super().__init__(config, submodules, layer_number)

    def forward(self, hidden_states, padding_mask=None):
        probs, routing_map = self.route(hidden_states)
        return super().forward(hidden_states, padding_mask)


def make_config():
    return TransformerConfig(num_layers=1, hidden_size=4)
"""


def sh(cwd: Path, *cmd: str, check: bool = True) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and res.returncode:
        raise AssertionError(f"{cmd} failed in {cwd}:\n{res.stdout}\n{res.stderr}")
    return res.stdout.strip()


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _commit(repo: Path, files: dict[str, str], msg: str) -> str:
    _write(repo, files)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", msg)
    return sh(repo, "git", "rev-parse", "HEAD")


def make_upstream(path: Path) -> dict[str, str]:
    """Build the fake upstream at `path`; return {name: commit} for pin/clean/drift/conflict/rename."""
    path.mkdir(parents=True)
    sh(path, "git", "init", "-q", "-b", "main")
    refs = {
        "pin": _commit(
            path,
            {MOE: MOE_V1, CFG: CFG_V1, "megatron/core/package_info.py": PKG.format(minor=1)},
            "v1",
        )
    }
    sh(path, "git", "tag", "core_v0.1.0")
    variants = {
        "clean": {
            MOE: '"""Fake MoE layer."""\n\nimport math\n\nSCALE = math.sqrt(1.0)\n\n'
            + MOE_V1.split('"""Fake MoE layer."""\n', 1)[1].replace(
                "def forward(self, hidden_states, padding_mask=None):",
                "def forward(self, hidden_states, padding_mask=None, inference_context=None):",
            ),
            CFG: CFG_V1 + "    moe_new_knob: bool = False\n",
            "megatron/core/package_info.py": PKG.format(minor=2),
        },
        "drift": {MOE: MOE_V1.replace("        scale = 1\n", "        scale = 2  # upstream\n")},
        "conflict": {
            MOE: MOE_V1.replace(
                "        output = hidden_states * scale + bias\n",
                "        output = hidden_states * scale - bias\n",
            )
        },
        "rename": {
            MOE: MOE_V1.replace(
                "def forward(self, hidden_states, padding_mask=None):\n"
                "        probs, routing_map = self.route(hidden_states)",
                "def forward(self, x, padding_mask=None):\n        probs, routing_map = self.route(x)",
            )
        },
        "fixed": {
            CFG: CFG_V1.replace(BAD_DOC, BAD_DOC.replace("10%)", "10%%)"))
            + '    moe_block: int = 2\n    """Every layer_number % moe_block layer."""\n'
        },
        "same-fix": {CFG: CFG_V1.replace(BAD_DOC, BAD_DOC.replace("10%)", "10 percent)"))},
        "release": {
            "megatron/core/package_info.py": "MAJOR = 0\nMINOR = 3\nPATCH = 0\nPRE_RELEASE = ''\n"
        },
    }
    for name, files in variants.items():
        sh(path, "git", "checkout", "-q", "-b", name, refs["pin"])
        refs[name] = _commit(path, files, name)
    sh(path, "git", "tag", "core_v0.2.0", refs["clean"])
    sh(path, "git", "checkout", "-q", "main")
    return refs


def patch_text(name: str, rel: str, old: str, new: str, probe: str | None = None) -> str:
    header = (
        f"Description: {name} (synthetic).\nTest: {TEST_FILE}\n"
        + (f"Probe: {probe}\n" if probe else "")
        + "Forwarded: not-needed (test fixture).\n---\n"
    )
    return header + P.render_diff(rel, old, new)


def make_wheel(upstream: Path, commit: str, version: str, dist_dir: Path) -> Path:
    """A megatron-core "wheel" of `version` holding megatron/core at `commit`: what core-only
    setup downloads from the package index (a zip of megatron/core/**)."""
    dist_dir.mkdir(parents=True, exist_ok=True)
    out = dist_dir / f"megatron_core-{version}-py3-none-any.whl"
    files = sh(upstream, "git", "ls-tree", "-r", "--name-only", commit, "megatron/core").split()
    with zipfile.ZipFile(out, "w") as z:
        for rel in files:
            data = subprocess.run(
                ["git", "-C", str(upstream), "show", f"{commit}:{rel}"],
                capture_output=True,
                check=True,
            ).stdout
            z.writestr(rel, data)
    return out


def make_superproject(path: Path, upstream: Path, pin: str) -> Path:
    """The superproject at `path`, its submodule at `pin` with the series applied; all committed."""
    path.mkdir(parents=True)
    sh(path, "git", "init", "-q", "-b", "main")
    sh(
        path,
        "git",
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "add",
        "-q",
        str(upstream),
        "Megatron-LM",
    )
    sub = path / "Megatron-LM"
    sh(sub, "git", "checkout", "-q", "--detach", pin)
    pdir = path / "patches"
    files = {
        f"patches/{name}": patch_text(
            name[5:-6].replace("-", " "), rel, old, new, PROBE if "percent" in name else None
        )
        for name, (rel, old, new) in SERIES.items()
    }
    _write(
        path,
        {
            **files,
            "patches/series": "".join(f"{name}\n" for name in SERIES),
            TEST_FILE: "def test_series():\n    pass\n",
            "overlay/fluid/__init__.py": "",
            "overlay/fluid/moe.py": OVERLAY,
            ".gitignore": ".build/\n",
        },
    )
    (path / "tools").mkdir()
    shutil.copy2(TOOLS / "probes.py", path / "tools" / "probes.py")
    P.write_lock(sub, pdir, pin, "core_v0.1.0", "0.1.0")
    P.apply_series(sub, pdir, log=lambda m: None)
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-q", "-m", "superproject")
    dist = path / ".build" / "dist"
    for ref, version in (("core_v0.1.0", "0.1.0"), ("core_v0.2.0", "0.2.0"), ("release", "0.3.0")):
        make_wheel(upstream, sh(upstream, "git", "rev-parse", ref), version, dist)
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Bytes of patches/*, and the submodule's series files, to prove nothing changed."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in (root / "patches").iterdir()}
    for rel in (MOE, CFG):
        out[f"Megatron-LM/{rel}"] = (root / "Megatron-LM" / rel).read_bytes()
    return out
