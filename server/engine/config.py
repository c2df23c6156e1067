"""Engine limits, validated once at the edge (CLI or API)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from qlora_serve.options import option

# Names of the torch dtypes the NF4 weights may be dequantized to (torch.<name>).
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")


LORA_DTYPES = {"float32", "compute"}
AUTO_LORA_CPU_BYTES = 2 << 30  # lora_memory_bytes=0 on CPU
AUTO_LORA_GPU_FRACTION = 0.10  # lora_memory_bytes=0 on CUDA: of the free memory at start-up


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and memory limits of the engine (counts are per server process)."""

    max_running: int = option(16, "rows decoded together in one forward pass (continuous batch size)")
    max_waiting: int = option(256, "requests queued beyond --max-running; more are refused at once (RESOURCE_EXHAUSTED)")
    max_prefill_tokens: int = option(2048, "prompt tokens prefilled per step; one longer prompt is still admitted alone")
    max_kv_tokens: int = option(65536, "KV-cache budget in token slots (sum over rows of prompt + max_new_tokens, in 16-token pages); admission waits when full")
    max_new_tokens: int = option(1024, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = option(64, "max_new_tokens when a request leaves it unset")
    max_resident_adapters: int = option(128, "most adapters resident on the device at once (LRU among adapters no running "
                                        "request uses); no memory is reserved per adapter: --lora-memory-bytes bounds the bytes")
    max_lora_rank: int = option(64, "largest adapter rank accepted; each adapter's device weights use its own rank "
                                    "(rounded up to a power of two, at least 8), not this one")
    lora_memory_bytes: int = option(0, "device bytes for resident adapters' LoRA weights (LRU eviction beyond it); "
                                       "0 = auto: 10% of free GPU memory at start-up, 2 GiB on CPU")
    lora_dtype: str = option("float32", "dtype of adapter weights on the device: float32 (PEFT's own math, exact "
                                        "against PEFT) or compute (the base's compute dtype: half the bytes)")
    host_cache_bytes: int = option(1 << 30, "bytes of parsed adapters kept in host memory after eviction from the device")

    def __post_init__(self) -> None:
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {sorted(LORA_DTYPES)}, got {self.lora_dtype!r}")
        for f in fields(self):
            if not isinstance(f.default, int):
                continue
            minimum = 0 if f.name in ("host_cache_bytes", "lora_memory_bytes") else 1
            if getattr(self, f.name) < minimum:
                raise ValueError(f"{f.name} must be >= {minimum}, got {getattr(self, f.name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_max_new_tokens ({self.default_max_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
