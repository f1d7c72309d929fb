"""`print_status()`: what FluidMoE runs on: pinned upstream, mode, patches, scheduler settings.

The pin comes from `patches/upstream.lock` of the checkout the overlay is installed from (editable
install), the mode and the applied patches from `.build/setup-state.json`, which `make setup`
writes, and both are cross-checked against what Python actually imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = REPO_ROOT / ".build" / "setup-state.json"
LOCK_FILE = REPO_ROOT / "patches" / "upstream.lock"


def _lock(path: Path = LOCK_FILE) -> dict:
    """The pin as patches/upstream.lock states it (its one source): `commit`, `tag` and
    `megatron-core`, each None when there is no lock (the overlay not installed from a checkout)."""
    lock = dict.fromkeys(("commit", "tag", "megatron-core"))
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.strip().partition(" ")
            if key in lock:
                lock[key] = value.strip()
    return lock


def _imported_megatron() -> dict:
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or spec.origin is None:
        return {"megatron_core": None, "megatron_training": False, "patched": False}
    core_dir = Path(spec.origin).parent
    training = (
        importlib.util.find_spec("megatron.training") is not None
        and (core_dir.parent / "training" / "training.py").exists()
    )
    cfg = (core_dir / "transformer" / "transformer_config.py").read_text()
    specs = (core_dir / "models" / "gpt" / "gpt_layer_specs.py").read_text()
    return {
        "megatron_core": str(core_dir),
        "megatron_training": training,
        "patched": "use_fluid_moe: bool = False" in cfg and "_apply_layer_spec_hooks" in specs,
    }


def status(config=None) -> dict:
    """Everything print_status shows, as a dict. The FluidMoE settings are the resolved
    FluidConfig of `config` (a TransformerConfig or a FluidConfig) and, for a model's config, the
    state of that model's runtime (fluid.runtime); without one, of the model built last in this
    process (the defaults and the scheduler of model-less code before any)."""
    from fluid.config import FluidConfig
    from fluid.runtime import latest_runtime, live_runtimes
    from fluid.schedule import get_backward_scheduler

    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    if config is None:
        rt = latest_runtime()
        fc = rt.config if rt is not None else FluidConfig()
    elif isinstance(config, FluidConfig):
        rt, fc = None, config
    else:
        rt, fc = getattr(config, "_fluid_runtime", None), FluidConfig.from_config(config)
    sched = rt.scheduler if rt is not None else get_backward_scheduler()
    auto = lambda v: "auto" if v is None else v  # noqa: E731
    return {
        "fluid_version": __import__("fluid").__version__,
        "upstream": _lock(),
        "mode": state.get("mode", "unknown (make setup not run)"),
        "applied_patches": state.get("applied_patches", []),
        "skipped_patches": state.get("skipped_patches", []),
        **_imported_megatron(),
        # Resolved settings (TransformerConfig fluid_* fields, i.e. the --fluid-* flags).
        "fluid_config": fc.as_dict(),
        "scheduler": {
            "enabled": sched.enabled,
            "timing": sched.timing,
            "overlap": fc.overlap,
            "min_window_bytes": auto(fc.min_window_bytes),
            # With the process's CommContexts as built so far: False means dW runs inline
            # (no group overlaps, e.g. one NVLink node under the auto policy).
            "defers_dw": sched.defers_dw(),
            "comm_groups": sched.num_comms,
            "models": len(live_runtimes()),  # runtimes alive: one per model (or model chunk)
            "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
            # GEMMs beside an all-to-all leave SMs to NCCL (CommContext.beside_comm); auto =
            # 8 over a slow link, 0 otherwise.
            "sm_carveout": auto(fc.sm_carveout),
        },
        # MoE layer knobs: deduplicated all-to-alls (auto: slow link and top-k > 2), forward
        # chunks, and the expert GEMMs (auto: grouped, per expert for experts of >=
        # LOOP_MIN_EXPERT_GFLOP).
        "moe": {
            "dedup": fc.moe_dedup,
            "chunks": fc.moe_chunks,
            "grouped_mm": fc.grouped_gemm,
            "wgrad_accumulation": fc.wgrad_accumulation,
        },
        # SDPA's flash and cuDNN backward accumulate dQ with atomics unless deterministic
        # algorithms are on (Megatron --deterministic-mode); benchmarks/probes/determinism.py.
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def print_status(config=None) -> dict:
    """Print and return `status(config)`."""
    s = status(config)
    up = s["upstream"]
    print("FluidMoE", s["fluid_version"])
    print(
        f"  upstream pin : {up['tag']} {up['commit']} (megatron-core {up['megatron-core']})"
        if up["commit"]
        else f"  upstream pin : unknown (no {LOCK_FILE})"
    )
    print(f"  mode         : {s['mode']}")
    print(f"  megatron.core: {s['megatron_core']} (patched: {s['patched']})")
    print(
        f"  training     : {'available' if s['megatron_training'] else 'unavailable (core-only)'}"
    )
    print(f"  patches      : {', '.join(s['applied_patches']) or 'none'}")
    if s["skipped_patches"]:
        print(f"  skipped      : {', '.join(s['skipped_patches'])}")
    sc = s["scheduler"]
    print(
        f"  scheduler    : enabled={sc['enabled']} timing={sc['timing']} overlap={sc['overlap']}"
        f" min_window_bytes={sc['min_window_bytes']}"
        f" CUDA_DEVICE_MAX_CONNECTIONS={sc['CUDA_DEVICE_MAX_CONNECTIONS']}"
    )
    print(
        f"  dW deferral  : {'on' if sc['defers_dw'] else 'off (inline)'}"
        f" ({sc['comm_groups']} communication group(s) built so far,"
        f" {sc['models']} model(s)),"
        f" SM carve-out beside all-to-alls={sc['sm_carveout']}"
    )
    print(
        f"  MoE          : dedup={s['moe']['dedup']} chunks={s['moe']['chunks']}"
        f" grouped_mm={s['moe']['grouped_mm']}"
        f" wgrad_accumulation={s['moe']['wgrad_accumulation']}"
    )
    gbps = s["fluid_config"].get("emulate_link_gbps")
    if gbps is not None:  # a testing aid: say so wherever the status is printed
        print(f"  emulated link: expert all-to-alls as over {gbps:g} GB/s (EP = 1, one GPU)")
    det = s["deterministic_algorithms"]
    print(
        "  reproducible : "
        + (
            "bitwise (deterministic algorithms on)"
            if det
            else "not bitwise on GPU (SDPA flash/cuDNN dQ uses atomics); add --deterministic-mode"
        )
    )
    return s
