"""Synthetic upstream and superproject for the maintenance-tool tests (not a test module).

`make_upstream(dir)` builds a tiny fake Megatron-LM git repository: commit `pin` (tag core_v0.1.0)
holds megatron/core/transformer/{transformer_config.py, moe/moe_layer.py} and package_info.py;
branches off the pin each change one thing:
  clean     5 lines inserted at the top of moe_layer.py (every hunk moves), a new optional
            parameter on MoELayer.forward, a new config field at the end
  drift     an upstream edit two lines above a patch's insertion: strict `git apply` fails on the
            context, `git apply --3way` merges it
  conflict  upstream rewrites the very line a patch inserts after: a real conflict
  rename    MoELayer.forward's `hidden_states` renamed to `x`
`make_superproject(dir, upstream)` builds a superproject with the upstream as its `Megatron-LM`
submodule at the pin, a two-patch series with a lock, an overlay subclassing MoELayer, and the
series applied to the submodule, all committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
import patches as P  # noqa: E402

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
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
'''

PKG = 'MAJOR = 0\nMINOR = {minor}\nPATCH = 0\nPRE_RELEASE = ""\n'

# The series: one patch per file, as in the real one.
CFG_PATCHED = CFG_V1.replace("    hidden_size: int = 0\n",
                             "    hidden_size: int = 0\n    use_fluid_moe: bool = False\n")
MOE_PATCHED = MOE_V1.replace("        output = hidden_states * scale + bias\n",
                             "        output = hidden_states * scale + bias\n"
                             "        self.fluid_seen = True\n")

OVERLAY = '''from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig


class FluidMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None):
        super().__init__(config, submodules, layer_number)

    def forward(self, hidden_states, padding_mask=None):
        probs, routing_map = self.route(hidden_states)
        return super().forward(hidden_states, padding_mask)


def make_config():
    return TransformerConfig(num_layers=1, hidden_size=4)
'''


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
    refs = {"pin": _commit(path, {MOE: MOE_V1, CFG: CFG_V1,
                                  "megatron/core/package_info.py": PKG.format(minor=1)}, "v1")}
    sh(path, "git", "tag", "core_v0.1.0")
    variants = {
        "clean": {
            MOE: '"""Fake MoE layer."""\n\nimport math\n\nSCALE = math.sqrt(1.0)\n\n'
            + MOE_V1.split('"""Fake MoE layer."""\n', 1)[1].replace(
                "def forward(self, hidden_states, padding_mask=None):",
                "def forward(self, hidden_states, padding_mask=None, inference_context=None):"),
            CFG: CFG_V1 + "    moe_new_knob: bool = False\n",
            "megatron/core/package_info.py": PKG.format(minor=2),
        },
        "drift": {MOE: MOE_V1.replace("        scale = 1\n", "        scale = 2  # upstream\n")},
        "conflict": {MOE: MOE_V1.replace("        output = hidden_states * scale + bias\n",
                                         "        output = hidden_states * scale - bias\n")},
        "rename": {MOE: MOE_V1.replace(
            "def forward(self, hidden_states, padding_mask=None):\n"
            "        probs, routing_map = self.route(hidden_states)",
            "def forward(self, x, padding_mask=None):\n        probs, routing_map = self.route(x)")},
    }
    for name, files in variants.items():
        sh(path, "git", "checkout", "-q", "-b", name, refs["pin"])
        refs[name] = _commit(path, files, name)
    sh(path, "git", "tag", "core_v0.2.0", refs["clean"])
    sh(path, "git", "checkout", "-q", "main")
    return refs


def patch_text(name: str, rel: str, old: str, new: str) -> str:
    header = (f"Description: {name} (synthetic).\nTest: tests/cpu/test_rebase_upstream.py\n"
              "Forwarded: not-needed (test fixture).\n---\n")
    return header + P.render_diff(rel, old, new)


def make_superproject(path: Path, upstream: Path, pin: str) -> Path:
    """The superproject at `path`, its submodule at `pin` with the series applied; all committed."""
    path.mkdir(parents=True)
    sh(path, "git", "init", "-q", "-b", "main")
    sh(path, "git", "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(upstream),
       "Megatron-LM")
    sub = path / "Megatron-LM"
    sh(sub, "git", "checkout", "-q", "--detach", pin)
    pdir = path / "patches"
    _write(path, {
        "patches/series": "0001-config-flag.patch\n0002-moe-hook.patch\n",
        "patches/0001-config-flag.patch": patch_text("config flag", CFG, CFG_V1, CFG_PATCHED),
        "patches/0002-moe-hook.patch": patch_text("moe hook", MOE, MOE_V1, MOE_PATCHED),
        "overlay/fluid/__init__.py": "",
        "overlay/fluid/moe.py": OVERLAY,
    })
    P.write_lock(sub, pdir, pin, "core_v0.1.0", "0.1.0")
    P.apply_series(sub, pdir, log=lambda m: None)
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-q", "-m", "superproject")
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Bytes of patches/*, and the submodule's series files, to prove nothing changed."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in (root / "patches").iterdir()}
    for rel in (MOE, CFG):
        out[f"Megatron-LM/{rel}"] = (root / "Megatron-LM" / rel).read_bytes()
    return out
