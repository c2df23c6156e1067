"""Engine limits, validated once at the edge (CLI or API)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from qlora_serve.options import option

# Names of the torch dtypes the NF4 weights may be dequantized to (torch.<name>).
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and memory limits of the engine (counts are per server process)."""

    max_running: int = option(16, "rows decoded together in one forward pass (continuous batch size)")
    max_waiting: int = option(256, "requests queued beyond --max-running; more are refused at once (RESOURCE_EXHAUSTED)")
    max_prefill_tokens: int = option(2048, "prompt tokens prefilled per step; one longer prompt is still admitted alone")
    max_kv_tokens: int = option(65536, "KV-cache budget in token slots (sum over rows of prompt + max_new_tokens, in 16-token pages); admission waits when full")
    max_new_tokens: int = option(1024, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = option(64, "max_new_tokens when a request leaves it unset")
    max_resident_adapters: int = option(8, "device slots for adapters (LRU among adapters no running request uses)")
    max_lora_rank: int = option(64, "largest adapter rank accepted; device slots are padded to it")
    host_cache_bytes: int = option(1 << 30, "bytes of parsed adapters kept in host memory after eviction from the device")

    def __post_init__(self) -> None:
        for f in fields(self):
            minimum = 0 if f.name == "host_cache_bytes" else 1
            if getattr(self, f.name) < minimum:
                raise ValueError(f"{f.name} must be >= {minimum}, got {getattr(self, f.name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_max_new_tokens ({self.default_max_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
