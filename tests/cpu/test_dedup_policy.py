"""Tier: cpu. When FluidMoELayer deduplicates its all-to-alls (`fluid.moe.layer.resolve_dedup`).

The default, auto, turns dedup on only where it measured faster: a slow link (P2P off or between
nodes) of more than one rank, top-k > 2, chunks 1 and no capacity factor (64 experts top-6 over P2P off: 1.44x stock;
over NVLink slower; docs/benchmarks/HISTORY.md). `--fluid-moe-dedup on|off`
(TransformerConfig.fluid_moe_dedup) overrides it; a bad value is refused naming the flag and
the accepted values.
"""

from types import SimpleNamespace

import pytest

from fluid.moe.layer import resolve_dedup


class _Comm:
    def __init__(self, slow, size=2):
        self._slow, self.size = slow, size

    def slow_link(self):
        return self._slow


def _cfg(topk=6, capacity=None, **kw):
    return SimpleNamespace(moe_router_topk=topk, moe_expert_capacity_factor=capacity, **kw)


def test_auto_on_only_where_it_pays():
    assert resolve_dedup(_cfg(), _Comm(True), 1) is True
    assert resolve_dedup(_cfg(), _Comm(False), 1) is False  # NVLink, gloo
    assert resolve_dedup(_cfg(topk=2), _Comm(True), 1) is False  # top-2 gains nothing
    assert resolve_dedup(_cfg(), _Comm(True), 2) is False  # chunks > 1: not implemented
    assert resolve_dedup(_cfg(capacity=1.0), _Comm(True), 1) is False  # token dropping
    assert resolve_dedup(_cfg(), None, 1) is False
    # one rank over an emulated slow link (--fluid-emulate-link-gbps): nothing to deduplicate
    assert resolve_dedup(_cfg(), _Comm(True, size=1), 1) is False


def test_flag_overrides():
    assert resolve_dedup(_cfg(fluid_moe_dedup="on"), _Comm(False), 1) is True
    assert resolve_dedup(_cfg(fluid_moe_dedup="off"), _Comm(True), 1) is False
    assert resolve_dedup(_cfg(topk=2, fluid_moe_dedup="on"), _Comm(False), 1) is True
    assert resolve_dedup(_cfg(fluid_moe_dedup="auto"), _Comm(True), 1) is True


@pytest.mark.parametrize("bad", ["maybe", "1", True, None])
def test_bad_value_is_refused_naming_the_flag(bad):
    from fluid.config import FluidConfigError

    with pytest.raises(FluidConfigError, match="--fluid-moe-dedup .*auto, on, off"):
        resolve_dedup(_cfg(fluid_moe_dedup=bad), _Comm(True), 1)
