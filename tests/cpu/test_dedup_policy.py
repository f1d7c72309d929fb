"""Tier: cpu. When FluidMoELayer deduplicates its all-to-alls (`fluid.moe.layer.resolve_dedup`).

The default, auto, turns dedup on only where it measured faster: a slow link (P2P off or between
nodes), top-k > 2, chunks 1 and no capacity factor (docs/benchmarks, session 5: 64 experts top-6
over P2P off 13.8-14.0 vs 15.0-15.2 ms; over NVLink slower, 9.5-9.9 vs 7.5 ms). The config field
and FLUID_MOE_DEDUP override it; a bad env value is refused with the accepted ones.
"""

from types import SimpleNamespace

import pytest

from fluid.moe.layer import resolve_dedup


class _Comm:
    def __init__(self, slow):
        self._slow = slow

    def slow_link(self):
        return self._slow


def _cfg(topk=6, capacity=None, **kw):
    return SimpleNamespace(moe_router_topk=topk, moe_expert_capacity_factor=capacity, **kw)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("FLUID_MOE_DEDUP", raising=False)


def test_auto_on_only_where_it_pays():
    assert resolve_dedup(_cfg(), _Comm(True), 1) is True
    assert resolve_dedup(_cfg(), _Comm(False), 1) is False  # NVLink, gloo
    assert resolve_dedup(_cfg(topk=2), _Comm(True), 1) is False  # top-2 gains nothing
    assert resolve_dedup(_cfg(), _Comm(True), 2) is False  # chunks > 1: not implemented
    assert resolve_dedup(_cfg(capacity=1.0), _Comm(True), 1) is False  # token dropping
    assert resolve_dedup(_cfg(), None, 1) is False


def test_config_and_env_override(monkeypatch):
    assert resolve_dedup(_cfg(fluid_moe_dedup_dispatch=True), _Comm(False), 1) is True
    assert resolve_dedup(_cfg(fluid_moe_dedup_dispatch=False), _Comm(True), 1) is False
    monkeypatch.setenv("FLUID_MOE_DEDUP", "0")
    assert resolve_dedup(_cfg(), _Comm(True), 1) is False
    monkeypatch.setenv("FLUID_MOE_DEDUP", "on")
    assert resolve_dedup(_cfg(topk=2), _Comm(False), 1) is True
    monkeypatch.setenv("FLUID_MOE_DEDUP", "auto")
    assert resolve_dedup(_cfg(), _Comm(True), 1) is True


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv("FLUID_MOE_DEDUP", "maybe")
    with pytest.raises(ValueError, match="on, off or auto"):
        resolve_dedup(_cfg(), _Comm(True), 1)
