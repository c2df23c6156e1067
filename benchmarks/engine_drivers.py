"""In-process load for the engine benchmark (bench_engine.py): closed batches and open-loop Poisson
arrivals submitted straight to the `Engine`, per-request timing records and their latency
percentiles, and profiling of the engine thread."""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path


def pct(values: list[float], q: float) -> float | None:
    """Percentile by linear interpolation (q in [0, 100]); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def latency_summary(records: list[dict]) -> dict:
    ttft = [r["ttft_s"] for r in records if r.get("ttft_s") is not None]
    tpot = [r["tpot_s"] for r in records if r.get("tpot_s") is not None]
    e2e = [r["e2e_s"] for r in records if r.get("e2e_s") is not None]
    return {"requests": len(records), "errors": sum(1 for r in records if r.get("error")),
            "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
            "tpot_p50_ms": _ms(pct(tpot, 50)), "tpot_p99_ms": _ms(pct(tpot, 99)),
            "e2e_p50_ms": _ms(pct(e2e, 50)), "e2e_p99_ms": _ms(pct(e2e, 99))}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 2)


def make_prompts(count: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids (no specials: ids >= 3), lengths uniform in [max_len/2, max_len]."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(max(1, max_len // 2), max_len))] for _ in range(count)]


def timing_record(t_send: float, token_times: list[float], n_tokens: int, t_end: float, error: str | None = None) -> dict:
    rec = {"n_tokens": n_tokens, "e2e_s": t_end - t_send, "error": error}
    if token_times:
        rec["ttft_s"] = token_times[0] - t_send
        if n_tokens > 1:
            rec["tpot_s"] = (token_times[-1] - token_times[0]) / (n_tokens - 1)
    return rec


# --------------------------------------------------------------------------- engine (c), (d), (e)
def _drain(req, t_send: float, sink: dict) -> None:
    """Collect one request's events with receive timestamps (runs in its own thread)."""
    from qlora_serve.server.engine.request import ErrorEvent, FinalEvent, TokenEvent

    times, n, err, toks = [], 0, None, []
    while True:
        ev = req.events.get()
        now = time.perf_counter()
        if isinstance(ev, TokenEvent):
            times.extend([now] * len(ev.token_ids))
            n += len(ev.token_ids)
        elif isinstance(ev, FinalEvent):
            toks = list(ev.token_ids)
            break
        elif isinstance(ev, ErrorEvent):
            err = f"{type(ev.error).__name__}: {ev.error}"
            break
    rec = timing_record(t_send, times, n, time.perf_counter(), err)
    rec["token_ids"] = toks
    sink[req.request_id] = rec


def _make_request(tag: str, i: int, prompt: list[int], handle, max_new: int):
    from qlora_serve.server.engine.request import Request, SamplingParams

    return Request(request_id=f"{tag}-{i}", prompt_ids=list(prompt), params=SamplingParams(max_new_tokens=max_new),
                   adapter=handle, tenant="bench")


def engine_closed(engine, handles: list, prompts: list[list[int]], max_new: int, tag: str) -> dict:
    """Submit the whole batch at once; throughput = generated tokens / (last answer - first submit)."""
    sink: dict = {}
    reqs = [_make_request(tag, i, p, h, max_new) for i, (p, h) in enumerate(zip(prompts, handles))]
    threads = []
    t0 = time.perf_counter()
    for r in reqs:
        engine.submit(r)
        th = threading.Thread(target=_drain, args=(r, t0, sink), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    seconds = max(rec["e2e_s"] for rec in sink.values())
    recs = [sink[r.request_id] for r in reqs]
    tokens = sum(rec["n_tokens"] for rec in recs)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
            "short_rows": sum(1 for rec in recs if rec["n_tokens"] != max_new),
            "errors": [rec["error"] for rec in recs if rec["error"]],
            "outputs": [rec["token_ids"] for rec in recs], "latency": latency_summary(recs)}


def engine_poisson(engine, handles: list, prompts: list[list[int]], arrivals: list[float], max_new: int, tag: str) -> dict:
    """Open loop: request i is submitted at t0 + arrivals[i] whatever the engine is doing."""
    sink: dict = {}
    threads = []
    t0 = time.perf_counter()
    for i, (p, h, off) in enumerate(zip(prompts, handles, arrivals)):
        delay = t0 + off - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        r = _make_request(tag, i, p, h, max_new)
        t_send = time.perf_counter()
        engine.submit(r)
        th = threading.Thread(target=_drain, args=(r, t_send, sink), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    recs = list(sink.values())
    wall = time.perf_counter() - t0
    return {"seconds": wall, "tokens": sum(r["n_tokens"] for r in recs), **latency_summary(recs)}


# --------------------------------------------------------------------------- profiling
def profile_engine(engine, handles, prompts, max_new: int, out_dir: Path, stamp: str) -> dict:
    """cProfile and torch.profiler on the ENGINE thread (started/stopped through engine.call) over one (c) batch."""
    import cProfile
    import io
    import pstats

    import torch

    found: dict = {}
    prof = cProfile.Profile()
    engine.call(prof.enable).result()
    r = engine_closed(engine, handles, prompts, max_new, "prof-cprofile")
    engine.call(prof.disable).result()
    found["cprofile_run_seconds"] = r["seconds"]
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(30)
        found[f"cprofile_by_{key}"] = s.getvalue()
    prof.dump_stats(str(out_dir / f"engine-{stamp}.cprofile"))

    tprof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                   + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
                                   record_shapes=True)
    engine.call(tprof.__enter__).result()
    r = engine_closed(engine, handles, prompts, max_new, "prof-torch")
    engine.call(lambda: tprof.__exit__(None, None, None)).result()
    found["torch_profile_run_seconds"] = r["seconds"]
    found["torch_top_self_cpu"] = tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    found["torch_top_by_shape"] = tprof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=30)
    return found
