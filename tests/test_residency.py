"""Residency (adapters/residency.py) built directly: the device slot table (LRU among
unpinned adapters, pins, unload-when-idle) and the byte-bounded host cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora_serve.adapters.peft_format import AdapterConfig, LoraAdapter, LoraModule
from qlora_serve.adapters.residency import Residency


def adapter(nbytes: int) -> LoraAdapter:
    """A real parsed adapter holding `nbytes` of fp32 weights (one rank-1 module)."""
    width = nbytes // 8  # lora_a [1, width] + lora_b [width, 1], 4 bytes each
    cfg = AdapterConfig.parse({"peft_type": "LORA", "r": 1}, Path("a") / "adapter_config.json")
    module = LoraModule(lora_a=torch.zeros(1, width), lora_b=torch.zeros(width, 1), scaling=1.0)
    out = LoraAdapter(path=Path("a"), config=cfg, modules={"m.q_proj": module})
    assert out.nbytes == nbytes
    return out


def test_slots_are_lru_and_pins_protect():
    res = Residency(num_slots=2, host_cache_bytes=0)
    res.assign("a", 0)
    res.assign("b", 1)
    assert (res.slot_of("a"), res.slot_of("b"), res.slot_of("c")) == (0, 1, None)
    assert res.resident_keys() == ["a", "b"]  # oldest first
    res.touch("a")
    assert res.resident_keys() == ["b", "a"]
    res.pin("b")  # pinning also makes it the most recent
    assert res.resident_keys() == ["a", "b"] and res.pins("b") == 1 and res.pins("a") == 0
    with pytest.raises(RuntimeError, match="pinned"):
        res.release("b")
    assert res.unpin("b") is False  # idle, but nobody asked it to leave
    assert res.release("b") == 1 and res.slot_of("b") is None
    assert res.release("b") is None  # already gone
    res.assign("c", 1)
    assert res.resident_keys() == ["a", "c"]


def test_assign_over_a_slot_replaces_its_adapter():
    res = Residency(num_slots=1, host_cache_bytes=0)
    res.assign("a", 0)
    res.assign("b", 0)
    assert res.resident_keys() == ["b"] and res.slot_of("a") is None


def test_unload_when_idle_waits_for_the_last_pin():
    res = Residency(num_slots=1, host_cache_bytes=0)
    res.assign("a", 0)
    res.pin("a")
    res.pin("a")
    res.unload_when_idle("a")
    assert res.unpin("a") is False  # one request still uses it
    assert res.unpin("a") is True
    res.pin("a")
    res.unload_when_idle("a", False)  # asked again to stay
    assert res.unpin("a") is False


def test_host_cache_is_lru_within_its_byte_budget():
    res = Residency(num_slots=1, host_cache_bytes=1000)
    a, b, c = adapter(400), adapter(400), adapter(400)
    assert res.host_put("a", a) == [] and res.host_put("b", b) == []
    assert res.host_get("a") is a  # a is now the most recent
    assert res.host_put("c", c) == ["b"]  # 1200 > 1000: the oldest goes
    assert (res.in_host("a"), res.in_host("b"), res.in_host("c")) == (True, False, True)
    assert res.host_put("big", adapter(1600)) == [] and not res.in_host("big")  # larger than the budget
    res.host_drop("a")
    assert res.host_get("a") is None
    assert res.host_put("b", b) == []  # 800 bytes: fits after the drop
    assert res.host_put("b", b) == []  # already cached: nothing evicted


def test_no_host_cache_and_bad_slot_count():
    res = Residency(num_slots=1, host_cache_bytes=0)
    assert res.host_put("a", adapter(8)) == [] and not res.in_host("a")
    with pytest.raises(ValueError, match="num_slots"):
        Residency(num_slots=0, host_cache_bytes=0)
