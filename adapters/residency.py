"""Where each adapter's weights live: device slots, host cache, or disk only.

Pure bookkeeping, owned by the engine thread (not thread-safe by design): the
engine asks which slot to use and does the copying itself, between steps.
Two tiers as in vLLM's LoRA model manager: device slots bounded by a count and by
bytes (each adapter counts its own device footprint; LRU among unpinned adapters)
and a size-bounded host cache (LRU) of parsed adapters, so a re-load after
eviction skips disk and parsing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from qlora_serve.adapters.peft_format import LoraAdapter


@dataclass
class SlotState:
    key: str
    pins: int = 0  # running requests using it: never evicted while > 0
    unload_when_idle: bool = False


@dataclass
class Residency:
    """Device slot table plus host cache. Keys are adapter digests.

    num_slots: most adapters on the device at once. device_bytes: bound on the sum of
    the resident adapters' device footprints (None = no byte bound).
    """

    num_slots: int
    host_cache_bytes: int
    device_bytes: int | None = None
    _sizes: dict = field(init=False, default_factory=dict)  # key -> device bytes
    _device_used: int = field(init=False, default=0)
    _slots: list[SlotState | None] = field(init=False)
    _lru: "OrderedDict[str, int]" = field(init=False, default_factory=OrderedDict)  # key -> slot, oldest first
    _host: "OrderedDict[str, LoraAdapter]" = field(init=False, default_factory=OrderedDict)
    _host_bytes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        self._slots = [None] * self.num_slots

    # -- device tier -------------------------------------------------------
    def slot_of(self, key: str) -> int | None:
        return self._lru.get(key)

    def resident_keys(self) -> list[str]:
        return list(self._lru)

    def touch(self, key: str) -> None:
        self._lru.move_to_end(key)

    def device_used(self) -> int:
        """Bytes of the resident adapters' device footprints."""
        return self._device_used

    def fits_ever(self, nbytes: int) -> bool:
        """Whether an adapter of `nbytes` fits the byte budget at all (with nothing else resident)."""
        return self.device_bytes is None or nbytes <= self.device_bytes

    def make_room(self, key: str, nbytes: int = 0) -> list[str] | None:
        """The unpinned adapters (oldest first) to evict so that `key` (nbytes) gets a
        free slot within the byte budget: [] when it fits now, None when running rows
        pin too much. Does not change state: the caller releases them, then `assign`s."""
        if key in self._lru:
            return []
        need_slot = None not in self._slots
        used = self._device_used + nbytes
        victims = []
        for victim, slot in self._lru.items():  # oldest first
            if not need_slot and (self.device_bytes is None or used <= self.device_bytes):
                break
            if self._slots[slot].pins == 0:
                victims.append(victim)
                used -= self._sizes.get(victim, 0)
                need_slot = False
        if need_slot or (self.device_bytes is not None and used > self.device_bytes):
            return None
        return victims

    def free_slot(self) -> int | None:
        return next((i for i, s in enumerate(self._slots) if s is None), None)

    def assign(self, key: str, slot: int, nbytes: int = 0) -> None:
        """Record that `key`'s weights (nbytes on the device) now occupy `slot`."""
        old = self._slots[slot]
        if old is not None:
            self._forget_slot(old.key)
        self._slots[slot] = SlotState(key)
        self._lru[key] = slot
        self._sizes[key] = nbytes
        self._device_used += nbytes

    def _forget_slot(self, key: str) -> int:
        slot = self._lru.pop(key)
        self._slots[slot] = None
        self._device_used -= self._sizes.pop(key, 0)
        return slot

    def release(self, key: str) -> int | None:
        """Forget `key`'s slot now (caller frees its weights); refuses if pinned. Returns the freed slot."""
        slot = self._lru.get(key)
        if slot is None:
            return None
        if self._slots[slot].pins:
            raise RuntimeError(f"adapter {key} is pinned")
        return self._forget_slot(key)

    def pins(self, key: str) -> int:
        slot = self._lru.get(key)
        return 0 if slot is None else self._slots[slot].pins

    def pin(self, key: str) -> None:
        self._slots[self._lru[key]].pins += 1
        self.touch(key)

    def unpin(self, key: str) -> bool:
        """Drop one pin; True when the adapter is now idle and was asked to unload."""
        state = self._slots[self._lru[key]]
        state.pins -= 1
        return state.pins == 0 and state.unload_when_idle

    def unload_when_idle(self, key: str, value: bool = True) -> None:
        """Ask (or, with value=False, stop asking) for `key` to leave its slot once idle."""
        self._slots[self._lru[key]].unload_when_idle = value

    # -- host tier ---------------------------------------------------------
    def host_get(self, key: str) -> LoraAdapter | None:
        adapter = self._host.get(key)
        if adapter is not None:
            self._host.move_to_end(key)
        return adapter

    def host_put(self, key: str, adapter: LoraAdapter) -> list[str]:
        """Cache a parsed adapter; returns the keys evicted to stay within budget.
        An adapter larger than the whole budget is not cached."""
        if key in self._host:
            self._host.move_to_end(key)
            return []
        size = adapter.nbytes
        if size > self.host_cache_bytes:
            return []
        evicted = []
        while self._host and self._host_bytes + size > self.host_cache_bytes:
            old_key, old = self._host.popitem(last=False)
            self._host_bytes -= old.nbytes
            evicted.append(old_key)
        self._host[key] = adapter
        self._host_bytes += size
        return evicted

    def host_drop(self, key: str) -> None:
        old = self._host.pop(key, None)
        if old is not None:
            self._host_bytes -= old.nbytes

    def in_host(self, key: str) -> bool:
        return key in self._host
