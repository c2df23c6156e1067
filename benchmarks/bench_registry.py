#!/usr/bin/env python
"""Adapter registry / residency benchmark (issue 3, "Benchmark").

A real server (`QloraServer`, in-process, NF4 + double-quant base) answers a
gRPC client on loopback. Measured in ONE run:

  cold      disk -> resident -> first token: time from sending GenerateStream for a
            freshly registered adapter (never loaded: not on the device, not in the
            host cache) to its first token chunk. One sample per adapter.
  host      host-cache hit: the same adapters after UnloadAdapter (device -> host
            cache), time to first token.
  device    already resident: time to first token (the floor the others add to).
  steady    tokens/s of --streams concurrent streams round-robin over --stream-adapters
            adapters (all resident), for --duration s, without churn, then with a
            churner that, in a loop, uploads a new adapter version, loads it, re-points
            an alias, unloads one of the streamed adapters and deletes the new version
            (so streams hit evictions, host-cache hits and disk loads; --churn-interval
            paces it, default flat out); then without
            churn again. Ratio = churn / mean(no churn before, no churn after).

Every request decodes exactly its max_new_tokens (EOS switched off on the engine,
benchmark only). The server's page cache is warm (the adapter files were just
written): "disk" here is our residency tier (read + parse + validate + verify the
digest), not a cold storage read. Prints a table, writes JSON to
bench-results/registry-<timestamp>.json (--out). Never asserts timing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from machine import machine_info, write_results  # benchmarks/machine.py (the script's folder is on sys.path)

BENCH_RECIPE_VERSION = 1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def build_base(cache: Path, preset: str) -> Path:
    """The base model: the demo base, or a bigger tiny Llama built once and cached."""
    from qlora_serve.server.demo import TinyModelSpec, build_tiny_base, ensure_demo

    if preset == "demo":
        return ensure_demo().base
    root = cache / f"registry-bench-v{BENCH_RECIPE_VERSION}" / "base"
    if not (root / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        build_tiny_base(tmp / "base", TinyModelSpec(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                                    num_attention_heads=8, num_key_value_heads=4))
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "base", root)
    return root


def build_adapters(base: Path, out: Path, n: int, rank: int) -> list[Path]:
    """One real PEFT adapter (rank `rank` on every Linear), then n-1 variants with
    scaled weights: distinct digests, same shapes, cheap to make."""
    from safetensors.torch import load_file, save_file

    from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter

    first = build_random_adapter(base, out / "a0", DemoAdapterSpec(name="a0", r=rank, alpha=2 * rank, seed=1,
                                                                  target_modules=TARGETS))
    state = load_file(str(first / "adapter_model.safetensors"))
    config = (first / "adapter_config.json").read_text()
    dirs = [first]
    for i in range(1, n):
        d = out / f"a{i}"
        d.mkdir(parents=True)
        scale = 1.0 + 0.01 * i
        save_file({k: v * scale for k, v in state.items()}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(config)
        dirs.append(d)
    return dirs


def first_token_s(client, adapter: str, prompt: str) -> float:
    """Seconds from sending a stream to its first token chunk (the stream is drained)."""
    t0 = time.perf_counter()
    first = None
    for chunk in client.stream(prompt, adapter=adapter, max_new_tokens=2):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - t0
    return first


def steady(client, adapters: list[str], streams: int, duration: float, tokens: int, churn=None) -> dict:
    """Closed-loop streams for `duration` s; optional churn(stop_event) thread."""
    stop = threading.Event()
    counts = [0] * streams
    errors: list[str] = []

    def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                for chunk in client.stream("The quick brown fox", adapter=adapters[(i + n) % len(adapters)],
                                           max_new_tokens=tokens):
                    counts[i] += len(chunk.token_ids)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                errors.append(f"{type(exc).__name__}: {getattr(exc, 'code', lambda: '')()}")
            n += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(streams)]
    churner = threading.Thread(target=churn, args=(stop,), daemon=True) if churn else None
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if churner:
        churner.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(120)
    if churner:
        churner.join(120)
    elapsed = time.perf_counter() - t0
    return {"tokens": sum(counts), "seconds": elapsed, "tokens_per_s": sum(counts) / elapsed,
            "errors": len(errors), "error_kinds": sorted(set(errors))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["bench", "demo"], default="bench",
                   help="bench: tiny Llama hidden 512 x 4 layers (built once, cached); demo: the embedded demo base")
    p.add_argument("--rank", type=int, default=16, help="adapter rank (on all 7 Linear kinds)")
    p.add_argument("--samples", type=int, default=12, help="cold / host-hit samples (one adapter each)")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams in the steady phase")
    p.add_argument("--stream-adapters", type=int, default=4, help="adapters the steady streams use")
    p.add_argument("--max-resident", type=int, default=4, help="--max-resident-adapters of the server")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per steady phase")
    p.add_argument("--tokens", type=int, default=16, help="max_new_tokens per steady request")
    p.add_argument("--churn-interval", type=float, default=0.0,
                   help="seconds the churner sleeps between cycles (0 = as fast as it can: the worst case)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from qlora_serve.server.app import QloraServer, ServerConfig
    from qlora_serve.server.client import Client
    from qlora_serve.server.demo import default_cache_dir
    from qlora_serve.server.engine.config import EngineConfig

    cache = default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    base = build_base(cache, args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    n_churn = 8
    dirs = build_adapters(base, work / "adapters", args.samples + args.stream_adapters + n_churn, args.rank)
    cold_dirs = dirs[:args.samples]
    stream_dirs = dirs[args.samples:args.samples + args.stream_adapters]
    churn_dirs = dirs[args.samples + args.stream_adapters:]
    print(f"built base ({args.preset}) and {len(dirs)} adapters (r={args.rank}) in {time.perf_counter() - t_build:.1f}s",
          flush=True)

    cfg = ServerConfig(base=str(base), port=0, metrics_port=None, http_port=None, compute_dtype=args.compute_dtype, device=args.device,
                       data_dir=work / "data",
                       engine=EngineConfig(max_resident_adapters=args.max_resident, max_lora_rank=max(16, args.rank),
                                           max_running=max(16, args.streams)))
    server = QloraServer(cfg).start().load()
    server.runtime.engine.base.eos_token_ids = frozenset()  # decode exactly max_new_tokens (bench only)
    results: dict = {}
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=300) as c:
            size = c.upload("warm", cold_dirs[0]).size_bytes
            for _ in range(3):  # warm-up: first forward, first load, gRPC channel
                first_token_s(c, "warm", "hello")
            first_token_s(c, "", "hello")
            c.delete("warm")
            # The same first adapter's files under a new name would be a host/device hit: skip it.
            for i, d in enumerate(cold_dirs):
                c.upload(f"cold{i}", d)
            cold, host, device = [], [], []
            for i in range(len(cold_dirs)):
                name = f"cold{i}"
                if i == 0:
                    continue  # same digest as "warm": already in the host cache
                cold.append(first_token_s(c, name, "hello world"))
                device.append(first_token_s(c, name, "hello world"))
                c.unload(name)
                host.append(first_token_s(c, name, "hello world"))
            base_ttft = [first_token_s(c, "", "hello world") for _ in range(len(cold))]
            metrics = server.metrics
            load_sum = metrics.load_seconds._sum.get()  # noqa: SLF001 - server-side read+parse+verify time
            load_count = sum(b.get() for b in metrics.load_seconds._buckets)  # noqa: SLF001

            stream_names = []
            for i, d in enumerate(stream_dirs):
                c.upload(f"s{i}", d)
                c.load(f"s{i}")
                stream_names.append(f"s{i}")
            c.upload("churny", churn_dirs[0], set_default=True)
            ops = {"n": 0, "errors": []}

            def churn(stop: threading.Event) -> None:
                i = 0
                while not stop.is_set():
                    try:
                        info = c.upload("churny", churn_dirs[1 + i % (len(churn_dirs) - 1)])
                        try:
                            c.load(f"churny@{info.version}")
                        except Exception as exc:  # noqa: BLE001 - slots pinned: documented RESOURCE_EXHAUSTED
                            ops["errors"].append(str(exc.code() if hasattr(exc, "code") else exc))
                        c.set_alias("churny", "default", info.version)
                        c.unload(stream_names[i % len(stream_names)])
                        c.set_alias("churny", "default", 1)
                        c.delete("churny", info.version)
                        ops["n"] += 1
                    except Exception as exc:  # noqa: BLE001
                        ops["errors"].append(f"{type(exc).__name__}: {getattr(exc, 'code', lambda: '')()}")
                    i += 1
                    stop.wait(args.churn_interval)

            steady(c, stream_names, args.streams, min(3.0, args.duration), args.tokens)  # warm-up
            before = steady(c, stream_names, args.streams, args.duration, args.tokens)
            loads0 = metrics.loads.labels("ok")._value.get()  # noqa: SLF001
            ev0 = metrics.evictions.labels("device")._value.get()  # noqa: SLF001
            churned = steady(c, stream_names, args.streams, args.duration, args.tokens, churn=churn)
            churned["churn_cycles"] = ops["n"]
            churned["churn_cycles_per_s"] = ops["n"] / churned["seconds"]
            churned["churn_refusals"] = sorted(set(ops["errors"]))
            churned["disk_loads"] = metrics.loads.labels("ok")._value.get() - loads0  # noqa: SLF001
            churned["device_evictions"] = metrics.evictions.labels("device")._value.get() - ev0  # noqa: SLF001
            for n in stream_names:  # same start state as `before`
                c.load(n)
            after = steady(c, stream_names, args.streams, args.duration, args.tokens)
    finally:
        server.stop(0)

    ms = lambda xs: [round(x * 1000, 2) for x in xs]  # noqa: E731
    no_churn = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    results = {
        "machine": machine_info(server.runtime.engine.base.device),
        "config": {**vars(args), "out": str(args.out) if args.out else None, "adapter_bytes": size},
        "first_token_ms": {
            "cold_disk": {"p50": pct(ms(cold), 50), "p95": pct(ms(cold), 95), "samples": ms(cold)},
            "host_cache_hit": {"p50": pct(ms(host), 50), "p95": pct(ms(host), 95), "samples": ms(host)},
            "device_resident": {"p50": pct(ms(device), 50), "p95": pct(ms(device), 95), "samples": ms(device)},
            "base_no_adapter": {"p50": pct(ms(base_ttft), 50), "p95": pct(ms(base_ttft), 95)},
        },
        "server_load_seconds_mean": load_sum / load_count if load_count else None,
        "steady": {"no_churn_before": before, "churn": churned, "no_churn_after": after,
                   "ratio_churn_vs_no_churn": churned["tokens_per_s"] / no_churn},
    }
    f = results["first_token_ms"]
    print()
    print(f"{'measure':44s} {'p50':>10s} {'p95':>10s}")
    for key, label in (("cold_disk", "cold load: disk -> resident -> 1st token (ms)"),
                       ("host_cache_hit", "host-cache hit -> resident -> 1st token (ms)"),
                       ("device_resident", "already resident: 1st token (ms)"),
                       ("base_no_adapter", "base, no adapter: 1st token (ms)")):
        print(f"{label:44s} {f[key]['p50']:>10.1f} {f[key]['p95']:>10.1f}")
    print(f"{'server-side load (read+parse+verify), mean ms':44s} {1000 * (results['server_load_seconds_mean'] or 0):>10.1f}")
    print()
    print(f"{'steady state':44s} {'tokens/s':>10s}")
    print(f"{'no churn (before)':44s} {before['tokens_per_s']:>10.1f}")
    print(f"{'with churn':44s} {churned['tokens_per_s']:>10.1f}")
    print(f"{'no churn (after)':44s} {after['tokens_per_s']:>10.1f}")
    print(f"{'ratio churn / no churn':44s} {results['steady']['ratio_churn_vs_no_churn']:>10.2f}")
    print(f"churn: {churned['churn_cycles']} cycles ({churned['churn_cycles_per_s']:.1f}/s), "
          f"{churned['disk_loads']:.0f} disk loads, {churned['device_evictions']:.0f} device evictions, "
          f"stream errors {churned['errors']}, churn refusals {churned['churn_refusals']}")
    print(f"wrote {write_results('registry', results, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
