"""Prometheus metrics, on a registry owned by one server (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric the server exports. Label values are adapter names (not
    versions) and tenants, both bounded by the registry and the key file."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Counted by the request guard (server/interceptors.py), the one place that sees every RPC.
        self.requests = Counter("qlora_requests", "Finished RPCs by method, adapter, tenant and gRPC status code.",
                                ["method", "adapter", "tenant", "code"], registry=r)
        self.latency = Histogram("qlora_request_latency_seconds", "End-to-end generation latency (s).",
                                 ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("qlora_time_to_first_token_seconds", "Arrival to first sampled token (s).",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("qlora_generated_tokens", "Generated tokens by adapter and tenant.",
                              ["adapter", "tenant"], registry=r)
        self.prompt_tokens = Counter("qlora_prompt_tokens", "Prompt tokens by adapter and tenant.",
                                     ["adapter", "tenant"], registry=r)
        self.queue_depth = Gauge("qlora_queue_depth", "Requests accepted but not yet running.", registry=r)
        self.running = Gauge("qlora_running_requests", "Rows in the running batch.", registry=r)
        self.resident = Gauge("qlora_resident_adapters", "Adapters in device slots.", registry=r)
        self.lora_bytes = Gauge("qlora_lora_device_bytes", "Device bytes held by resident adapters' LoRA weights.", registry=r)
        self.lora_budget = Gauge("qlora_lora_budget_bytes", "Device bytes the resident adapters may hold (--lora-memory-bytes).", registry=r)
        self.lora_fit = Gauge("qlora_lora_adapters_fit", "All-linear adapters of a rank that fit the LoRA budget.", ["rank"], registry=r)
        self.loads = Counter("qlora_adapter_loads", "Adapter reads from disk by result.", ["result"], registry=r)
        self.load_seconds = Histogram("qlora_adapter_load_seconds", "Adapter read+parse+check time (s).",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.host_cache_lookups = Counter("qlora_adapter_host_cache", "Adapter lookups at submit: device, hit, miss.",
                                          ["result"], registry=r)
        self.evictions = Counter("qlora_adapter_evictions", "Adapters evicted by tier (device, host).",
                                 ["tier"], registry=r)
        self.rejections = Counter("qlora_rejections", "Requests refused before running, by reason and tenant.",
                                  ["reason", "tenant"], registry=r)

    # Engine-side hooks (called from the engine thread).
    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def set_queue(self, queued: int, running: int) -> None:
        self.queue_depth.set(queued)
        self.running.set(running)

    def set_resident(self, n: int) -> None:
        self.resident.set(n)

    def set_lora_bytes(self, held: int) -> None:
        self.lora_bytes.set(held)

    def set_lora_capacity(self, budget: int, fit: dict[int, int]) -> None:
        """budget: bytes; fit: rank -> how many all-linear adapters of that rank fit."""
        self.lora_budget.set(budget)
        for rank, n in fit.items():
            self.lora_fit.labels(str(rank)).set(n)

    def adapter_loaded(self, result: str, seconds: float) -> None:
        self.loads.labels(result).inc()
        if result == "ok":
            self.load_seconds.observe(seconds)

    def host_cache(self, result: str) -> None:
        self.host_cache_lookups.labels(result).inc()

    def evicted(self, tier: str, n: int) -> None:
        self.evictions.labels(tier).inc(n)

    def rejected(self, reason: str, tenant: str = "") -> None:
        self.rejections.labels(reason, tenant).inc()

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics on host:port (loopback unless told otherwise: the labels name
        adapters and tenants); returns the (server, thread) pair."""
        return start_http_server(port, addr=host, registry=self.registry)
