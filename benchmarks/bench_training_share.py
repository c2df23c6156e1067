#!/usr/bin/env python
"""Inference latency beside a training job (issue 13, "Training beside inference").

For each training share (`--shares`), starts a real `qlora-serve serve` on the demo
(subprocess, `--no-http --no-metrics`, its own data dir) with that share's flags, then:
  1. idle: `--requests` sequential Generate calls (adapter pirate, `--max-new-tokens`
     tokens each, ignore_eos) after `--warmup` unmeasured ones, no job;
  2. job:  submits a training job on the server (SubmitJob: the demo base, {"text"}
     lines of the demo corpus, a step count that outlasts the measurement), waits for
     its first logged step (its process has loaded the model and is training), then
     the same sequential Generate calls; then cancels the job, waits for it to end and
     measures idle again (idle = before + after, so load drift averages out).
`--repeats` rounds run the shares interleaved (a b a b), each on a fresh server.
Reports p50 / p95 latency (client side, ms) of each phase, the ratios job/idle, and the
job's training throughput while it shared the machine (median tokens/s of its log
events), so the trade-off is visible: a smaller share costs training speed.

Shares (comma-separated names or explicit flags):
  default    the server's defaults: --training-threads max(1, cores // 2), --training-nice 10
  unbounded  --training-threads <cores> --training-nice 0 (the job as before the share existed)
  "FLAGS"    any other serve flags, e.g. "--training-threads 1 --training-nice 19"

Goal (issue 13): p50 ratio <= 1.25 at the default share. The numbers depend on what
else runs on the machine: the JSON records the load average before and after each
phase. Prints a table, writes JSON to bench-results/training-share-<timestamp>.json
(--out) with machine info. Never asserts timing. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from machine import machine_info, write_results  # benchmarks/machine.py (the script's folder is on sys.path)

JOB_CONFIG = {"compute_dtype": "float32", "max_steps": 100000, "logging_steps": 2, "save_steps": 100000,
              "batch_size": 4, "grad_accum": 1, "max_seq_len": 128, "lora_r": 8}


def share_flags(name: str) -> list[str]:
    """The serve flags of a share name (see the module docstring)."""
    if name == "default":
        return []
    if name == "unbounded":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return ["--training-threads", str(cores), "--training-nice", "0"]
    return name.split()


class Server:
    """`python -m qlora_serve.server.cli serve` on the demo, a free port, its own data dir."""

    def __init__(self, flags: list[str], data_dir: Path, log) -> None:
        cmd = [sys.executable, "-m", "qlora_serve.server.cli", "serve", "--port", "0", "--no-http", "--no-metrics",
               "--data-dir", str(data_dir), "--compute-dtype", "float32", "--grace", "5", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "ready on" in line:
                self.address = "127.0.0.1:" + line.split("ready on ", 1)[1].split()[0].rsplit(":", 1)[1]
                return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def latencies(client, n: int, warmup: int, max_new_tokens: int) -> list[float]:
    """Seconds per sequential Generate call (greedy, fixed length), warm-up calls excluded."""
    out = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        client.generate("the captain sails", adapter="pirate", max_new_tokens=max_new_tokens, ignore_eos=True)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def summary(xs: list[float]) -> dict:
    ms = sorted(x * 1000 for x in xs)
    return {"p50_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))],
            "mean_ms": statistics.fmean(ms), "n": len(ms)}


def run_share(name: str, args, data: Path, data_dir: Path, log) -> dict:
    from qlora_serve.server.client import Client
    from qlora_serve.v1 import training_pb2 as T

    server = Server(share_flags(name), data_dir, log)
    try:
        with Client(server.address, timeout=300) as client:
            load0 = os.getloadavg()
            idle = latencies(client, args.requests, args.warmup, args.max_new_tokens)
            toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in JOB_CONFIG.items())
            job = client.submit_job("share-bench", data, config_toml=toml)
            logs: list[dict] = []
            started = threading.Event()

            def follow() -> None:
                try:
                    for ev in client.watch_job(job.id):
                        if ev.event == "log":
                            logs.append(json.loads(ev.details_json))
                            started.set()
                        if ev.job.state in (T.JOB_STATE_SUCCEEDED, T.JOB_STATE_FAILED, T.JOB_STATE_CANCELLED):
                            break
                except grpc.RpcError:  # the channel closes when the measurement ends
                    pass
                started.set()

            watcher = threading.Thread(target=follow, daemon=True)
            watcher.start()
            if not started.wait(600) or not logs:
                raise RuntimeError(f"the training job did not start training: {client.get_job(job.id)}")
            load1 = os.getloadavg()
            first = len(logs)
            busy = latencies(client, args.requests, 0, args.max_new_tokens)
            during = [e["tokens_per_s"] for e in logs[first:] if e.get("tokens_per_s")]
            state = client.get_job(job.id)
            client.cancel_job(job.id)
            watcher.join(300)  # the job's process has stopped
            after = latencies(client, args.requests, 0, args.max_new_tokens)
        idle_all = idle + after  # before and after the job: load drift on a shared machine averages out
        return {"share": name, "flags": share_flags(name), "idle": summary(idle_all), "job": summary(busy),
                "idle_before": summary(idle), "idle_after": summary(after),
                "p50_ratio": statistics.median(busy) / statistics.median(idle_all),
                "p95_ratio": summary(busy)["p95_ms"] / summary(idle_all)["p95_ms"],
                "job_tokens_per_s": statistics.median(during) if during else None,
                "job_steps_during": (state.step - logs[first - 1]["step"]) if logs else None,
                "job_state_during": state.state, "load_average": {"before_idle": load0, "before_job": load1,
                                                                   "after": os.getloadavg()},
                "idle_s": [round(x, 5) for x in idle_all], "job_s": [round(x, 5) for x in busy]}
    finally:
        server.stop()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shares", default="default,unbounded", help="comma-separated share names or quoted flag sets")
    p.add_argument("--requests", type=int, default=40, help="measured Generate calls per phase")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured Generate calls before the idle phase")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="rounds over the shares, interleaved (a b a b)")
    p.add_argument("--out", default=None, help="JSON path (default bench-results/training-share-<timestamp>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from qlora_serve.server.demo_corpus import corpus

    rows = []
    with tempfile.TemporaryDirectory(prefix="share-bench-") as tmp:
        work = Path(tmp)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus("pirate", 400, seed=1)))
        with open(work / "server.log", "w") as log:
            runs = [(r, name.strip()) for r in range(args.repeats) for name in args.shares.split(",")]
            for i, (r, name) in enumerate(runs):
                print(f"round {r + 1}, share {name!r}: starting a server ...", file=sys.stderr, flush=True)
                rows.append({"round": r + 1, **run_share(name, args, data, work / f"data-{i}", log)})
                r = rows[-1]
                print(f"  idle p50 {r['idle']['p50_ms']:.1f} ms, during the job {r['job']['p50_ms']:.1f} ms "
                      f"(x{r['p50_ratio']:.2f})", file=sys.stderr, flush=True)

    print(f"\nGenerate latency beside a training job ({args.requests} sequential calls per phase, "
          f"{args.max_new_tokens} tokens, demo base; goal: p50 ratio <= 1.25 at the default share)\n")
    print("| round | share | idle p50 ms | idle p95 ms | job p50 ms | job p95 ms | p50 ratio | p95 ratio | job tokens/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tps = f"{r['job_tokens_per_s']:.0f}" if r["job_tokens_per_s"] else "-"
        print(f"| {r['round']} | {r['share']} | {r['idle']['p50_ms']:.1f} | {r['idle']['p95_ms']:.1f} | {r['job']['p50_ms']:.1f} | "
              f"{r['job']['p95_ms']:.1f} | {r['p50_ratio']:.2f} | {r['p95_ratio']:.2f} | {tps} |")
    for name in dict.fromkeys(r["share"] for r in rows):
        ratios = [r["p50_ratio"] for r in rows if r["share"] == name]
        print(f"share {name}: p50 ratio median {statistics.median(ratios):.2f} over {len(ratios)} round(s)")
    out = write_results("training-share", {"benchmark": "training_share", "settings": {**vars(args), "job_config": JOB_CONFIG},
                                           "machine": machine_info(), "results": rows}, args.out)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
