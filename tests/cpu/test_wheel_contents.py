"""Tier: cpu. The built wheel is the product: `fluid.testing` (test harnesses that set up
`parallel_state`, benchmark helpers) is left out by `overlay/pyproject.toml`, the product
subpackages are in, and the editable install still imports `fluid.testing` for tests."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRODUCT = (
    "fluid/__init__.py",
    "fluid/config.py",
    "fluid/moe/layer.py",
    "fluid/attention/layer.py",
    "fluid/comm/all_to_all.py",
    "fluid/schedule/scheduler.py",
    "fluid/megatron/spec_hook.py",
)


def test_wheel_has_the_product_and_not_the_test_harness(tmp_path):
    # The build copies the sources into build/ under overlay/; build into a copy of the overlay so
    # that a run leaves no files in the tree (and two runs do not share one build/ folder).
    src = tmp_path / "overlay"
    subprocess.run(["cp", "-r", str(ROOT / "overlay"), str(src)], check=True)
    for stale in ("build", "fluidmoe.egg-info"):
        subprocess.run(["rm", "-rf", str(src / stale)], check=True)
    out = tmp_path / "wheel"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            str(src),
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    wheels = list(out.glob("fluidmoe-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    missing = [f for f in PRODUCT if f not in names]
    assert not missing, f"product modules missing from the wheel: {missing}"
    leaked = [n for n in names if n.startswith("fluid/testing/")]
    assert not leaked, f"test-only modules in the wheel: {leaked}"
    # The entry points Megatron loads ship with it.
    ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "fluid.megatron.spec_hook:transform_layer_specs"
        in zipfile.ZipFile(wheels[0]).read(ep).decode()
    )


def test_editable_install_imports_the_test_package():
    import fluid.testing.bench.timing
    import fluid.testing.moe

    assert Path(fluid.testing.moe.__file__).is_relative_to(ROOT / "overlay" / "fluid" / "testing")
    assert callable(fluid.testing.bench.timing.alternating_rounds)
