#!/usr/bin/env python
"""Engine benchmark: multi-LoRA throughput and latency (issue 5, "Benchmark").

Same model, same prompts, measured in ONE run, for N distinct adapters:

  (a) seed   the seed recipe: one PeftModel holding all N adapters,
             `set_adapter` + `generate` per request, one request at a time;
  (b) mixed  PEFT mixed batch: one `generate(..., adapter_names=[...])` over the batch;
  (c) engine our engine, the batch's requests spread round-robin over N adapters;
  (d) one    our engine, every request on one adapter;
  (e) base   our engine, no adapter.

(c)-(e) drive the `Engine` of an in-process `QloraServer` directly (`engine.submit`),
so the same engine also answers the gRPC phase: a closed batch through gRPC
(streaming and unary) for the in-process / gRPC throughput ratio, then an
open-loop Poisson load (fixed count, fixed seed, loopback) for TTFT and
time-per-output-token p50/p99, both in-process and through gRPC. The gRPC client
runs in a child process (a real client is not in the server's interpreter).

Every configuration decodes greedily exactly --max-new-tokens tokens per request:
EOS is switched off (PEFT: generation_config.eos_token_id = None; engine:
base.eos_token_ids = {}), so the work is identical across configurations.

Prints a table, writes JSON to bench-results/engine-<timestamp>.json (--out).
Never asserts timing. See benchmarks/README.md for the command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine_assets import ADAPTER_TARGETS, adapter_rank, build_7b_assets, build_cpu_assets  # benchmarks/engine_assets.py (the script's folder is on sys.path)
from engine_drivers import engine_closed, engine_poisson, latency_summary, make_prompts, profile_engine, timing_record
from engine_report import CONFIG_NAMES, CONFIGS, goals, render
from machine import machine_info, results_path  # benchmarks/machine.py (the script's folder is on sys.path)
from peft_baselines import PeftRunner

BENCH_RECIPE_VERSION = 2  # v2: adapter ranks 8/16/64


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """What to build and how big a run is by default."""

    name: str
    # cpu: TinyModelSpec fields; 7b: LlamaConfig fields
    model: dict
    requests: int
    max_new_tokens: int
    prompt_len: int
    poisson_requests: int
    n_adapters: tuple[int, ...]


PRESETS = {
    # A bigger tiny Llama than the demo; every Linear in_features is a multiple of 64
    # (bitsandbytes' packed 4-bit CPU path needs it).
    "cpu": Preset("cpu", dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=4, max_position_embeddings=1024, vocab_size=384, seed=0),
                  requests=32, max_new_tokens=32, prompt_len=32, poisson_requests=48, n_adapters=(1, 4, 16, 64)),
    # Llama-2-7B shapes, random weights (speed only).
    "7b": Preset("7b", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                            rms_norm_eps=1e-5),
                 requests=32, max_new_tokens=64, prompt_len=128, poisson_requests=64, n_adapters=(1, 4, 16, 64)),
}
QUICK = dict(requests=16, max_new_tokens=16, prompt_len=24, poisson_requests=24, n_adapters=(1, 4, 16))


# --------------------------------------------------------------------------- gRPC client (child process)
def client_main(job_path: str) -> None:
    """Runs in a child process: the gRPC jobs described in job_path; results to job_path + '.out'."""
    from qlora_serve.server.client import Client

    job = json.loads(Path(job_path).read_text())
    client = Client(job["address"], timeout=job.get("timeout_s", 600))
    max_new = job["max_new_tokens"]

    def one(name: str, prompt: list[int], mode: str, sink: list, t_send: float) -> None:
        kw = dict(adapter=name or "", prompt_token_ids=prompt, max_new_tokens=max_new, temperature=0.0)
        times, n, err = [], 0, None
        try:
            if mode == "unary":
                resp = client.generate(**kw)
                n = len(resp.token_ids)
                times = [time.perf_counter()] if n else []
            else:
                for chunk in client.stream(**kw):
                    if chunk.token_ids:
                        now = time.perf_counter()
                        times.extend([now] * len(chunk.token_ids))
                        n += len(chunk.token_ids)
        except Exception as exc:  # report, never crash the load generator
            err = f"{type(exc).__name__}: {str(exc)[:200]}"
        rec = timing_record(t_send, times, n, time.perf_counter(), err)
        if mode == "unary":  # unary has no per-token timing
            rec.pop("ttft_s", None), rec.pop("tpot_s", None)
        sink.append(rec)

    results = []
    for task in job["tasks"]:
        sink: list = []
        threads = []
        t0 = time.perf_counter()
        arrivals = task.get("arrivals") or [0.0] * len(task["prompts"])
        for name, prompt, off in zip(task["adapters"], task["prompts"], arrivals):
            delay = t0 + off - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=one, args=(name, prompt, task["mode"], sink, time.perf_counter()), daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        tokens = sum(r["n_tokens"] for r in sink)
        seconds = max(r["e2e_s"] + 0.0 for r in sink) if task.get("closed") else time.perf_counter() - t0
        results.append({"name": task["name"], "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
                        "short_rows": sum(1 for r in sink if r["n_tokens"] != max_new),
                        "errors": [r["error"] for r in sink if r["error"]][:5], **latency_summary(sink)})
    client.close()
    Path(job_path + ".out").write_text(json.dumps(results))


def run_client(job: dict, timeout_s: float) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(job, fh)
        path = fh.name
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_client", path], env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"gRPC client process failed with exit code {proc.returncode}")
    out = json.loads(Path(path + ".out").read_text())
    os.unlink(path), os.unlink(path + ".out")
    return out


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: 4-layer 512-wide tiny Llama (default); 7b: Llama-2-7B shapes, random weights, for a GPU")
    p.add_argument("--quick", action="store_true", help="CI-sized run: N in {1,4,16}, 16 requests x 16 tokens")
    p.add_argument("--n-adapters", default=None, help="comma-separated N values (default 1,4,16,64; quick 1,4,16)")
    p.add_argument("--configs", default="a,b,c,d,e", help="subset of a,b,c,d,e to measure")
    p.add_argument("--requests", type=int, default=None, help="batch size: requests per measurement")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per request (EOS ignored)")
    p.add_argument("--prompt-len", type=int, default=None, help="longest prompt; lengths are uniform in [len/2, len]")
    p.add_argument("--repeats", type=int, default=1, help="measure each configuration this many times; report the median")
    p.add_argument("--grpc-n", type=int, default=None, help="N for the gRPC phase (default 16 if measured, else the largest N)")
    p.add_argument("--poisson-requests", type=int, default=None, help="requests in the open-loop Poisson phase")
    p.add_argument("--poisson-rate", type=float, default=None,
                   help="arrivals per second (default: 0.5 x the engine's measured closed-batch request rate at --grpc-n)")
    p.add_argument("--skip-grpc", action="store_true", help="skip the gRPC / Poisson phase")
    p.add_argument("--profile", action="store_true", help="cProfile + torch.profiler the engine thread over one (c) batch")
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--lora-dtype", default=None, choices=["float32", "compute"],
                   help="engine --lora-dtype (default: the server's default)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="prompts and Poisson arrivals")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the model and adapters are built once")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench-results/engine-<timestamp>.json)")
    p.add_argument("--_client", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS[args.model_preset]
    defaults = dict(requests=preset.requests, max_new_tokens=preset.max_new_tokens, prompt_len=preset.prompt_len,
                    poisson_requests=preset.poisson_requests, n_adapters=preset.n_adapters)
    if args.quick:
        defaults.update(QUICK)
    for k in ("requests", "max_new_tokens", "prompt_len", "poisson_requests"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    args.n_list = sorted({int(x) for x in args.n_adapters.split(",")}) if args.n_adapters else list(defaults["n_adapters"])
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.config_list if c not in CONFIGS]
    if bad or any(n < 1 for n in args.n_list):
        p.error(f"--configs must be a subset of {','.join(CONFIGS)} and N >= 1 (got {args.configs!r}, {args.n_list})")
    if args.grpc_n is None:
        args.grpc_n = 16 if 16 in args.n_list else max(args.n_list)
    return args


def median_result(runs: list[dict]) -> dict:
    """The run with the median throughput, plus every run's tok/s."""
    ordered = sorted(runs, key=lambda r: r["tok_s"])
    best = dict(ordered[len(ordered) // 2])
    best["tok_s_runs"] = [round(r["tok_s"], 2) for r in runs]
    return best


def agreement(x: list[list[int]], y: list[list[int]]) -> float:
    """Fraction of requests whose greedy outputs are identical (numerics differ slightly between paths)."""
    return sum(1 for a, b in zip(x, y) if a == b) / max(1, len(x))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._client:
        client_main(args._client)
        return 0

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from qlora_serve.server.app import QloraServer, ServerConfig, handle_of
    from qlora_serve.server.demo import default_cache_dir
    from qlora_serve.server.engine.config import EngineConfig
    from qlora_serve.server.engine.loader import pick_device

    preset = PRESETS[args.model_preset]
    device = pick_device(args.device)
    n_max = max(args.n_list + [args.grpc_n])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = results_path("engine", args.out)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    cache = (args.cache_dir or default_cache_dir()) / f"bench-{preset.name}-v{BENCH_RECIPE_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    log(f"building/reusing {preset.name} model and {n_max} adapters in {cache}")
    if preset.name == "7b":
        base_dir, adapter_dirs = build_7b_assets(cache, preset.model, n_max, str(device))
    else:
        base_dir, adapter_dirs = build_cpu_assets(cache, preset.model, n_max)
    log(f"assets ready in {time.perf_counter() - t_build:.1f}s")

    vocab = int(json.loads((base_dir / "config.json").read_text())["vocab_size"])
    # A row for N adapters sends max(requests, N) requests, so every adapter is used; the batch
    # width stays --requests (engine max_running; PEFT mixed batch chunks).
    prompts_all = make_prompts(max(args.requests, n_max), args.prompt_len, vocab, args.seed)
    prompts = prompts_all[: args.requests]
    names = [f"a{i}" for i in range(n_max)]
    result: dict = {"benchmark": "engine", "timestamp": stamp, "machine": machine_info(device),
                    "settings": {"preset": preset.name, "model": preset.model, "quick": args.quick,
                                 "n_adapters": args.n_list, "configs": args.config_list, "requests": args.requests,
                                 "max_new_tokens": args.max_new_tokens, "prompt_len": args.prompt_len,
                                 "prompt_lens": [len(p) for p in prompts_all], "repeats": args.repeats,
                                 "compute_dtype": args.compute_dtype, "adapter_ranks": "mixed 8/16/64 (alpha=2r)",
                                 "engine_flags": "server defaults, except max_running = --requests",
                                 "adapter_targets": list(ADAPTER_TARGETS), "seed": args.seed, "decoding": "greedy, EOS ignored"},
                    "rows": []}

    peft_runner = None
    if {"a", "b"} & set(args.config_list):
        log("loading PEFT model with all adapters")
        peft_runner = PeftRunner(base_dir, adapter_dirs, args.compute_dtype, args.device)

    max_rank = max(adapter_rank(i) for i in range(n_max))
    # The server's default LoRA flags (max_resident_adapters, max_lora_rank, lora_memory_bytes,
    # lora_dtype): what a user gets. Only the batch width follows --requests (PEFT's chunk too).
    lora_kw = {"lora_dtype": args.lora_dtype} if args.lora_dtype else {}
    engine_cfg = EngineConfig(max_running=max(args.requests, 1), max_waiting=max(256, 2 * args.poisson_requests),
                              max_prefill_tokens=max(2048, args.requests * args.prompt_len),
                              max_new_tokens=max(1024, args.max_new_tokens), **lora_kw)
    result["settings"]["engine_config"] = asdict(engine_cfg)
    data_dir = Path(tempfile.mkdtemp(prefix="qlora-bench-data-"))
    server = QloraServer(ServerConfig(base=str(base_dir), host="127.0.0.1", port=0, metrics_port=None, http_port=None,
                                      compute_dtype=args.compute_dtype, device=args.device, data_dir=data_dir,
                                      adapters=[(n, str(d)) for n, d in zip(names, adapter_dirs)],
                                      engine=engine_cfg, grace_s=5.0))
    log("starting server (in-process engine + gRPC on loopback)")
    server.start().load()
    engine = server.runtime.engine
    engine.base.eos_token_ids = frozenset()  # decode exactly max_new_tokens (bench only)
    handles = {n: handle_of(server.runtime.registry.resolve(n)) for n in names}
    for n in names:  # all adapters resident before timing: no cold loads inside a measurement
        engine.load_adapter(handles[n]).result()
    log(f"server up on port {server.port}; {n_max} adapters resident (max rank {max_rank})")
    result["memory"] = lora_memory(engine)
    log(f"LoRA memory: {result['memory']}")

    # Warm-up: first calls pay one-off costs (allocations, bnb kernels).
    warm_prompts = prompts[: min(4, len(prompts))]
    engine_closed(engine, [handles["a0"]] * len(warm_prompts), warm_prompts, 4, "warm")
    engine_closed(engine, [None] * len(warm_prompts), warm_prompts, 4, "warm2")
    if peft_runner:
        peft_runner.seed_recipe(["a0"], warm_prompts[:1], 2)
        peft_runner.mixed_batch(["a0", "a1" if n_max > 1 else "a0"], warm_prompts[:2], 2, args.requests)

    T = args.max_new_tokens
    outputs_for_check: dict = {}
    try:
        for n in args.n_list:
            count = max(args.requests, n)
            spread = [names[i % n] for i in range(count)]
            prompts = prompts_all[:count]
            row = {"n_adapters": n, "requests": count, "distinct_adapters": len(set(spread))}
            for c in args.config_list:
                runs = []
                for rep in range(args.repeats):
                    if c == "a":
                        r = peft_runner.seed_recipe(spread, prompts, T)
                    elif c == "b":
                        r = peft_runner.mixed_batch(spread, prompts, T, args.requests)
                    elif c == "c":
                        r = engine_closed(engine, [handles[s] for s in spread], prompts, T, f"c{n}-{rep}")
                    elif c == "d":
                        r = engine_closed(engine, [handles["a0"]] * len(prompts), prompts, T, f"d{n}-{rep}")
                    else:
                        r = engine_closed(engine, [None] * len(prompts), prompts, T, f"e{n}-{rep}")
                    runs.append(r)
                r = median_result(runs)
                outputs_for_check[(n, c)] = r.pop("outputs")
                row[c] = r
                log(f"N={n:>3} ({c}) {CONFIG_NAMES[c]:<40} {r['tok_s']:9.1f} tok/s  ({r['seconds']:.2f}s, runs {r['tok_s_runs']})")
            if "c" in row and "d" in row:
                row["c_over_d"] = row["c"]["tok_s"] / row["d"]["tok_s"]
            if "c" in row and "a" in row:
                row["c_over_a"] = row["c"]["tok_s"] / row["a"]["tok_s"]
            if "c" in row and "e" in row:
                row["c_over_e"] = row["c"]["tok_s"] / row["e"]["tok_s"]
            if "b" in row and "d" in row:
                row["b_over_d"] = row["b"]["tok_s"] / row["d"]["tok_s"]
            if (n, "a") in outputs_for_check and (n, "c") in outputs_for_check:
                row["greedy_agreement_a_vs_c"] = agreement(outputs_for_check[(n, "a")], outputs_for_check[(n, "c")])
            result["rows"].append(row)

        if peft_runner is not None:  # free it before the latency phase
            del peft_runner
            import gc

            gc.collect()

        prompts = prompts_all[: args.requests]
        if not args.skip_grpc:
            n = args.grpc_n
            spread = [names[i % n] for i in range(args.requests)]
            log(f"gRPC phase at N={n}: closed batch in-process vs gRPC")
            inproc = median_result([engine_closed(engine, [handles[s] for s in spread], prompts, T, f"g-in-{k}")
                                    for k in range(args.repeats)])
            inproc.pop("outputs", None)
            address = f"127.0.0.1:{server.port}"
            closed_tasks = [{"name": f"closed-{mode}-{k}", "mode": mode, "closed": True, "adapters": spread,
                             "prompts": prompts} for k in range(args.repeats) for mode in ("stream", "unary")]
            grpc_closed = run_client({"address": address, "max_new_tokens": T, "tasks": closed_tasks}, timeout_s=3600)
            by_mode = {m: median_result([x for x in grpc_closed if x["name"].startswith(f"closed-{m}")])
                       for m in ("stream", "unary")}
            # Open-loop Poisson: same arrivals for both paths.
            rate = args.poisson_rate or 0.5 * inproc["tok_s"] / T
            rng = random.Random(args.seed + 1)
            arrivals, t = [], 0.0
            for _ in range(args.poisson_requests):
                t += rng.expovariate(rate)
                arrivals.append(t)
            p_prompts = make_prompts(args.poisson_requests, args.prompt_len, vocab, args.seed + 2)
            p_spread = [names[i % n] for i in range(args.poisson_requests)]
            log(f"Poisson phase: {args.poisson_requests} requests at {rate:.2f} req/s (in-process, then gRPC stream)")
            p_in = engine_poisson(engine, [handles[s] for s in p_spread], p_prompts, arrivals, T, "p-in")
            p_grpc = run_client({"address": address, "max_new_tokens": T,
                                 "tasks": [{"name": "poisson", "mode": "stream", "adapters": p_spread,
                                            "prompts": p_prompts, "arrivals": arrivals}]}, timeout_s=3600)[0]
            result["grpc"] = {
                "n_adapters": n, "address": "loopback", "client": "separate process, one thread per request",
                "closed_in_process": inproc, "closed_grpc_stream": by_mode["stream"], "closed_grpc_unary": by_mode["unary"],
                "grpc_stream_over_in_process": by_mode["stream"]["tok_s"] / inproc["tok_s"],
                "grpc_unary_over_in_process": by_mode["unary"]["tok_s"] / inproc["tok_s"],
                "poisson": {"rate_req_s": rate, "requests": args.poisson_requests, "seed": args.seed + 1,
                            "in_process": p_in, "grpc_stream": p_grpc},
            }

        if args.profile:
            n = args.grpc_n
            spread = [names[i % n] for i in range(args.requests)]
            log(f"profiling the engine thread over one (c) batch at N={n}")
            result["profile"] = profile_engine(engine, [handles[s] for s in spread], prompts, T, out_path.parent, stamp)
    finally:
        server.stop(grace_s=2.0)

    result["goals"] = goals(result, args.grpc_n)
    out_path.write_text(json.dumps(result, indent=2, default=str))
    print(render(result))
    if args.profile and "profile" in result:
        print("\n--- engine thread, torch.profiler (self CPU) ---")
        print(result["profile"]["torch_top_self_cpu"])
        print("--- engine thread, cProfile (tottime) ---")
        print(result["profile"]["cprofile_by_tottime"])
    print(f"\nJSON: {out_path}")
    return 0


def lora_memory(engine) -> dict:
    """Benchmark 3: LoRA device bytes held / the resident adapters' own bytes in the slot dtype."""
    import torch

    lora, res = engine.lora, engine.residency
    elem = torch.empty((), dtype=lora.dtype).element_size()
    own = 0
    for key in res.resident_keys():
        ad = res.host_get(key)
        if ad is None:
            return {"error": "an adapter left the host cache; own bytes unknown"}
        own += sum(m.lora_a.numel() + m.lora_b.numel() for m in ad.modules.values()) * elem
    held = lora.nbytes()
    return {"lora_bytes": held, "own_bytes": own, "ratio": held / own if own else float("nan"),
            "resident": len(res.resident_keys()), "dtype": str(lora.dtype), "budget_bytes": res.device_bytes}


if __name__ == "__main__":
    sys.exit(main())
