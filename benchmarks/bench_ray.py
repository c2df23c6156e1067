"""Ray Serve vs one direct server (issue 14): added latency, replica throughput, placement.

    pip install -c .ci/constraints-cpu.txt -e ".[dev,ray]"
    python benchmarks/bench_ray.py                 # demo model; ~3 min on 2 CPU cores
    python benchmarks/bench_ray.py --calls 50 --seconds 20

Same model, same prompts. Measures (medians):
- unary: Generate with max_new_tokens=1, direct vs through Ray's gRPC proxy (added ms per call);
- stream: the gap between streamed messages of a 32-token GenerateStream (added ms per message);
- throughput: generated tokens/s of `--clients` concurrent callers for `--seconds`, adapters
  spread over `--adapters` names, on 1 replica and on 2 (goal on a machine with cores for
  both: 2 >= 1.8x 1; on 2 shared cores both replicas compete for the same CPUs);
- placement: of the adapters used, how many were served by more than one replica;
- cold placement (2 replicas, first thing after start), on `--adapters` adapters of their
  own that no replica holds yet: `--burst` concurrent requests per adapter, one adapter
  after another ("sequential"), then all adapters' bursts at once ("mixed": loads change
  while the routing stats refresh); how many adapters were served by (so loaded on) more
  than one replica, and how the adapters spread over the replicas.
Prints a table and writes bench-results/ray-<timestamp>.json (--out). Never asserts timing.
Starts a local Ray head on 127.0.0.1 and stops it at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from machine import machine_info, write_results  # benchmarks/machine.py (the script's folder is on sys.path)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback (read at import)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROMPT = "hello world, this is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stub(port: int):
    import grpc

    from qlora_serve.v1 import inference_pb2_grpc

    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def _md(adapter: str):
    return (("multiplexed_model_id", adapter),) if adapter else ()


def unary_ms(stub, calls: int) -> float:
    from qlora_serve.v1 import inference_pb2

    req = inference_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=1)
    stub.Generate(req, timeout=120)  # warm-up
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        stub.Generate(req, timeout=120)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def stream_gap_ms(stub, calls: int) -> float:
    from qlora_serve.v1 import inference_pb2

    req = inference_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=32, ignore_eos=True)
    gaps = []
    for _ in range(max(3, calls // 10)):
        last = None
        for _msg in stub.GenerateStream(req, timeout=120):
            now = time.perf_counter()
            if last is not None:
                gaps.append((now - last) * 1000)
            last = now
    return statistics.median(gaps)


def throughput(stub, adapters: list[str], clients: int, seconds: float) -> tuple[float, dict[str, set]]:
    """Generated tokens/s, and adapter -> replicas that served it (from the trailer)."""
    from qlora_serve.v1 import inference_pb2

    tokens, served, lock = [0], defaultdict(set), threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        n = i
        while time.monotonic() < stop:
            adapter = adapters[n % len(adapters)]
            n += clients
            resp, call = stub.Generate.with_call(
                inference_pb2.GenerateRequest(adapter=adapter, prompt=PROMPT, max_new_tokens=16, ignore_eos=True),
                metadata=_md(adapter), timeout=120)
            with lock:
                tokens[0] += resp.completion_tokens
                served[adapter].add(dict(call.trailing_metadata() or ()).get("qlora-replica", "direct"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.monotonic() - start), served


def cold_placement(stub, adapters: list[str], burst: int, mixed: bool) -> dict:
    """`burst` concurrent Generate calls per cold adapter, one adapter after another (or
    all at once: mixed): adapters served by more than one replica, adapters per replica."""
    from concurrent.futures import ThreadPoolExecutor

    from qlora_serve.v1 import inference_pb2

    def call(adapter: str) -> tuple[str, str]:
        req = inference_pb2.GenerateRequest(adapter=adapter, prompt=PROMPT, max_new_tokens=8, ignore_eos=True)
        _, c = stub.Generate.with_call(req, metadata=_md(adapter), timeout=120)
        return adapter, dict(c.trailing_metadata() or ()).get("qlora-replica", "?")

    served: dict[str, set] = defaultdict(set)
    with ThreadPoolExecutor(burst * len(adapters) if mixed else burst) as pool:
        for group in ([[a for _ in range(burst) for a in adapters]] if mixed else [[a] * burst for a in adapters]):
            for adapter, replica in pool.map(call, group):
                served[adapter].add(replica)
    per_replica: dict[str, int] = defaultdict(int)
    for replicas in served.values():
        for r in replicas:
            per_replica[r] += 1
    return {"adapters": len(adapters), "burst": burst, "mode": "mixed" if mixed else "sequential",
            "on_several_replicas": sum(len(r) > 1 for r in served.values()),
            "adapters_per_replica": sorted(per_replica.values(), reverse=True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=30, help="unary calls per measurement")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each throughput run, seconds")
    p.add_argument("--clients", type=int, default=8, help="concurrent callers in the throughput runs")
    p.add_argument("--adapters", type=int, default=6, help="adapter names the throughput runs spread over")
    p.add_argument("--burst", type=int, default=4, help="concurrent requests per cold adapter (cold placement)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from qlora_serve.server.app import QloraServer, ServerConfig
    from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter, ensure_demo
    from qlora_serve.server.ray_app import deployment, grpc_options

    demo = ensure_demo()
    work = Path(tempfile.mkdtemp(prefix="qbench"))
    names = [f"a{i}" for i in range(args.adapters)]
    cold = {mode: [f"{mode[0]}{i}" for i in range(args.adapters)] for mode in ("sequential", "mixed")}
    # Distinct weights per name: names sharing a digest share residency (and would count
    # as "on several replicas" although the engine loads that content once per replica).
    adapters = [(n, str(build_random_adapter(demo.base, work / "adapters" / n,
                                             DemoAdapterSpec(name=n, r=8, alpha=16, seed=1000 + i))))
                for i, n in enumerate(names + cold["sequential"] + cold["mixed"])]
    config = ServerConfig(base=str(demo.base), compute_dtype="float32", data_dir=work / "store", adapters=adapters,
                          port=0, metrics_port=None, http_port=None, grace_s=1.0)
    results: dict = {"machine": machine_info(), "machine_cpus": os.cpu_count(), "args": vars(args) | {"out": str(args.out)}}
    direct = QloraServer(config).start().load()
    try:
        stub = _stub(direct.port)
        results["direct"] = {"unary_ms": unary_ms(stub, args.calls), "stream_gap_ms": stream_gap_ms(stub, args.calls),
                             "tokens_per_s": throughput(stub, names, args.clients, args.seconds)[0]}
    finally:
        direct.stop(0)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=80 << 20,
             log_to_driver=False, _temp_dir=str(work / "ray"))
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()}, grpc_options=grpc_options(port))
        cpus = max(0.25, (os.cpu_count() or 2) / 2)
        for replicas in (1, 2):
            serve.run(deployment(config, replicas=replicas, num_cpus=cpus / replicas if replicas > 1 else cpus),
                      name="qlora")
            stub = _stub(port)
            if replicas == 2:  # first: these adapters are still cold on both replicas
                results["cold_placement"] = [cold_placement(stub, cold[m], args.burst, m == "mixed") for m in cold]
            row = {"unary_ms": unary_ms(stub, args.calls), "stream_gap_ms": stream_gap_ms(stub, args.calls)}
            row["tokens_per_s"], served = throughput(stub, names, args.clients, args.seconds)
            row["adapters_on_several_replicas"] = sum(len(v) > 1 for v in served.values())
            results[f"ray_{replicas}"] = row
            serve.delete("qlora")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    d, r1, r2 = results["direct"], results["ray_1"], results["ray_2"]
    print(f"{'':24}{'direct':>10}{'ray x1':>10}{'ray x2':>10}")
    for key, label in (("unary_ms", "unary call, ms"), ("stream_gap_ms", "stream message gap, ms"),
                       ("tokens_per_s", "tokens/s")):
        print(f"{label:24}{d[key]:>10.1f}{r1[key]:>10.1f}{r2[key]:>10.1f}")
    print(f"added per unary call: {r1['unary_ms'] - d['unary_ms']:.1f} ms; per streamed message: "
          f"{r1['stream_gap_ms'] - d['stream_gap_ms']:.1f} ms; 2 replicas / 1: {r2['tokens_per_s'] / r1['tokens_per_s']:.2f}x; "
          f"adapters on >1 replica (2 replicas): {r2['adapters_on_several_replicas']} of {len(names)}")
    for c in results["cold_placement"]:
        print(f"cold placement, {c['mode']} ({c['burst']} concurrent requests per cold adapter): "
              f"{c['on_several_replicas']} of {c['adapters']} adapters on >1 replica; "
              f"adapters per replica: {c['adapters_per_replica']}")
    print(f"wrote {write_results('ray', results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
