"""Tier: cpu. `tools/api_check.py`: discovery from overlay code and signature verdicts.

Uses the synthetic upstream of tests/cpu/upstream_fixture.py (git refs) and small overlay/upstream
trees written here; the last test runs discovery on the real overlay against the pinned tree.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the fixture module beside us
from upstream_fixture import ROOT, TOOLS, make_upstream  # noqa: E402

sys.path.insert(0, str(TOOLS))
import api_check as A  # noqa: E402

OVERLAY = """
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe import dispatcher as disp
import megatron.core.utils as mcu


class Helper:  # not upstream: ignored
    def forward(self, x):
        return x


class FluidMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None):
        super().__init__(config, submodules, layer_number)
        self.dispatcher = disp.AlltoAllDispatcher(config)

    def forward(self, hidden_states, padding_mask=None):
        probs, routing_map = self.route(hidden_states)
        out = self.dispatcher.dispatch(hidden_states, probs)
        return super().forward(out, padding_mask), mcu.get_pg_size(None)

    def fluid_only(self):
        return 1


class FluidChild(FluidMoELayer):  # upstream bases are inherited through overlay classes
    def combine(self, x):
        return x
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    path = tmp_path_factory.mktemp("up") / "Megatron-LM.git"
    return path, make_upstream(path)


@pytest.fixture
def overlay(tmp_path):
    d = tmp_path / "overlay" / "fluid"
    d.mkdir(parents=True)
    (d / "moe.py").write_text(OVERLAY)
    (d / "broken.py").write_text("def half_written(:\n")  # must not stop discovery
    return d


def verdicts(overlay, up, old, new):
    return {v.item: v for v in A.check(overlay, A.GitSource(up, old), A.GitSource(up, new))}


def test_discovery_finds_subclass_overrides_super_wrapped_and_module_calls(overlay):
    items = {i.key: i for i in A.discover(overlay)}
    moe = "megatron.core.transformer.moe.moe_layer.MoELayer"
    assert "subclassed by FluidMoELayer" in items[moe].uses
    assert "subclassed by FluidChild" in items[moe].uses
    assert "overridden by FluidMoELayer" in items[f"{moe}.forward"].uses
    assert "called via super()" in items[f"{moe}.forward"].uses
    assert "called via super()" in items[f"{moe}.__init__"].uses
    assert "inherited, called" in items[f"{moe}.route"].uses
    assert "overridden by FluidChild" in items[f"{moe}.combine"].uses
    disp = "megatron.core.transformer.moe.dispatcher.AlltoAllDispatcher"
    assert "called" in items[disp].uses
    assert "called on a wrapped instance" in items[f"{disp}.dispatch"].uses
    assert "called" in items["megatron.core.utils.get_pg_size"].uses
    assert not any("Helper" in k for k in items)
    assert items[f"{moe}.forward"].max_positional == 2  # super().forward(out, padding_mask)


def test_new_optional_parameter_is_compatible(overlay, upstream):
    up, refs = upstream
    v = verdicts(overlay, up, refs["pin"], refs["clean"])
    fwd = v["megatron.core.transformer.moe.moe_layer.MoELayer.forward"]
    assert fwd.verdict == "compatible", fwd
    assert "new optional parameter: inference_context=None" in fwd.notes
    # route did not change at all; the override that upstream never had is dropped
    assert v["megatron.core.transformer.moe.moe_layer.MoELayer.route"].verdict == "unchanged"
    assert not any(k.endswith(".fluid_only") for k in v)


def test_renamed_parameter_in_overridden_method_is_breaking(overlay, upstream):
    up, refs = upstream
    v = verdicts(overlay, up, refs["pin"], refs["rename"])
    fwd = v["megatron.core.transformer.moe.moe_layer.MoELayer.forward"]
    assert fwd.verdict == "breaking"
    assert "parameter renamed: hidden_states -> x" in fwd.notes


def test_cli_exit_status_and_json(overlay, upstream):
    up, refs = upstream
    cmd = [
        sys.executable,
        str(TOOLS / "api_check.py"),
        "--tree",
        str(up),
        "--overlay",
        str(overlay),
    ]
    ok = subprocess.run(
        cmd + ["--from", refs["pin"], "--to", "core_v0.2.0"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "| compatible | `megatron.core.transformer.moe.moe_layer.MoELayer.forward`" in ok.stdout
    bad = subprocess.run(
        cmd + ["--from", refs["pin"], "--to", "rename", "--json"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert '"verdict": "breaking"' in bad.stdout


def _tree(root, text):
    f = root / "megatron" / "m.py"
    f.parent.mkdir(parents=True)
    f.write_text(textwrap.dedent(text))
    return A.DirSource(root, root.name)


@pytest.mark.parametrize(
    "old, new, verdict, note",
    [
        (
            "def f(a, b=1): return a, b",
            "def f(a, b=2): return a, b",
            "compatible",
            "default of b: 1 -> 2",
        ),
        ("def f(a, b=1): return a, b", "def f(a): return a, a", "breaking", "parameter removed: b"),
        (
            "def f(a, b=1): return a, b",
            "def f(a, c, b=1): return a, b",
            "breaking",
            "new required parameter: c",
        ),
        (
            "def f(a, b=1): return a, b",
            "def f(a, b=1): return a, b, 3",
            "breaking",
            "return arity changed: [2] -> [3]",
        ),
        (
            "def f(a, b=1): return a, b",
            "def f(a, *, b=1): return a, b",
            "breaking",
            "b became keyword-only",
        ),
        ("def f(a, b=1): return a, b", "def f(a, b=1): return (a, b)", "unchanged", None),
        ("def f(a, b=1): return a, b", "def g(a): return a", "breaking", None),
    ],
)
def test_signature_verdicts(tmp_path, old, new, verdict, note):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "x.py").write_text("from megatron.m import f\nf(1)\n")
    src_old, src_new = _tree(tmp_path / "old", old), _tree(tmp_path / "new", new)
    v = {x.item: x for x in A.check(overlay, src_old, src_new)}["megatron.m.f"]
    assert v.verdict == verdict, v
    if note:
        assert note in v.notes, v.notes


def test_real_overlay_resolves_in_the_pinned_tree():
    """Every upstream name the real overlay uses exists in the (patched) pinned tree: a typo or
    a name missing at the pin would otherwise only show up at import time on some code path."""
    tree = ROOT / "Megatron-LM"
    if not (tree / "megatron" / "core").is_dir():
        pytest.skip("no Megatron-LM checkout (core-only mode)")
    src = A.DirSource(tree, "pin")
    vs = A.check(ROOT / "overlay" / "fluid", src, src)
    assert vs, "discovery found nothing in the overlay"
    unresolved = [v.item for v in vs if v.verdict != "unchanged"]
    assert not unresolved, unresolved
