"""Goals and the printed table of the engine benchmark (bench_engine.py), from its result dict."""

from __future__ import annotations

CONFIGS = ("a", "b", "c", "d", "e")
CONFIG_NAMES = {
    "a": "seed: PEFT set_adapter+generate, serial",
    "b": "PEFT mixed batch (adapter_names)",
    "c": "engine, spread over N adapters",
    "d": "engine, all on one adapter",
    "e": "engine, base only",
}


def goals(result: dict, goal_n: int) -> dict:
    g: dict = {}
    row = next((r for r in result["rows"] if r["n_adapters"] == 16), None)
    if row is not None:
        for key, target in (("c_over_d", 0.95), ("c_over_a", 10.0), ("c_over_e", 0.75)):
            if key in row:
                g[f"{key}_at_16"] = {"value": round(row[key], 3), "target": f">= {target}", "met": row[key] >= target}
    if "ratio" in result.get("memory", {}):
        ratio = result["memory"]["ratio"]
        g["lora_bytes_over_own"] = {"value": round(ratio, 3), "target": "<= 1.25", "met": ratio <= 1.25}
    if "grpc" in result:
        overhead = 1.0 - result["grpc"]["grpc_stream_over_in_process"]
        g["grpc_overhead_stream"] = {"value": round(overhead, 3), "target": "< 0.05", "met": overhead < 0.05,
                                     "n_adapters": result["grpc"]["n_adapters"]}
    return g


def render(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"qlora-serve engine benchmark  {result['timestamp']}",
             f"machine: {m['cpu_model']}, {m['cpu_cores']} cores (torch threads {m['torch_threads']}), device {m['device']}"
             + (f" [{m['gpu']}]" if m.get("gpu") else ""),
             f"versions: torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, peft {m['peft']}, transformers {m['transformers']}",
             f"model: {s['preset']} {s['model']}  dtype {s['compute_dtype']}",
             f"workload: {s['requests']} requests x {s['max_new_tokens']} new tokens (greedy, EOS ignored), "
             f"prompts {min(s['prompt_lens'])}-{max(s['prompt_lens'])} tokens, adapters {s['adapter_ranks']}, repeats {s['repeats']}",
             "",
             "generated tokens/s"]
    hdr = (f"{'N':>4} | {'reqs':>4} | " + " | ".join(f"{'(' + c + ')':>9}" for c in CONFIGS)
           + f" | {'c/d':>6} | {'c/a':>6} | {'c/e':>6} | {'b/d':>6} | {'a==c':>5}")
    lines += [hdr, "-" * len(hdr)]
    for row in result["rows"]:
        cells = [f"{row[c]['tok_s']:9.1f}" if c in row else f"{'-':>9}" for c in CONFIGS]
        ratio = lambda k: f"{row[k]:6.2f}" if k in row else f"{'-':>6}"  # noqa: E731
        agree = f"{row['greedy_agreement_a_vs_c']:5.2f}" if "greedy_agreement_a_vs_c" in row else f"{'-':>5}"
        lines.append(f"{row['n_adapters']:>4} | {row['requests']:>4} | " + " | ".join(cells) + f" | {ratio('c_over_d')} | {ratio('c_over_a')} | {ratio('c_over_e')} | {ratio('b_over_d')} | {agree}")
    lines.append("  " + "; ".join(f"({c}) {CONFIG_NAMES[c]}" for c in CONFIGS))
    lines.append("  reqs: requests per measurement (max(--requests, N), so every adapter is used); batch width "
                 f"{s['requests']} (engine max_running, PEFT mixed-batch chunk)")
    lines.append("  a==c: fraction of requests whose greedy tokens are identical in (a) and (c) (info only)")
    if "ratio" in result.get("memory", {}):
        mem = result["memory"]
        lines += ["", f"LoRA device memory: {mem['lora_bytes'] / 2**20:.2f} MiB held for {mem['resident']} adapters whose own "
                      f"weights are {mem['own_bytes'] / 2**20:.2f} MiB in {mem['dtype']} (ratio {mem['ratio']:.3f}); "
                      f"budget {mem['budget_bytes'] / 2**20:.0f} MiB"]
    if "grpc" in result:
        g = result["grpc"]
        lines += ["", f"in-process vs gRPC (N={g['n_adapters']}, closed batch of {s['requests']}, loopback, client in a separate process)",
                  f"  in-process   {g['closed_in_process']['tok_s']:9.1f} tok/s",
                  f"  gRPC stream  {g['closed_grpc_stream']['tok_s']:9.1f} tok/s  ratio {g['grpc_stream_over_in_process']:.3f}",
                  f"  gRPC unary   {g['closed_grpc_unary']['tok_s']:9.1f} tok/s  ratio {g['grpc_unary_over_in_process']:.3f}"]
        p = g["poisson"]
        lines += ["", f"open-loop Poisson: {p['requests']} requests at {p['rate_req_s']:.2f} req/s (seed {p['seed']}), "
                      f"{s['max_new_tokens']} tokens each",
                  f"  {'path':<12} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'e2e p50':>9} {'e2e p99':>9}  (ms)  errors"]
        for label, d in (("in-process", p["in_process"]), ("gRPC stream", p["grpc_stream"])):
            f = lambda k: f"{d[k]:9.1f}" if d.get(k) is not None else f"{'-':>9}"  # noqa: E731
            lines.append(f"  {label:<12} {f('ttft_p50_ms')} {f('ttft_p99_ms')} {f('tpot_p50_ms')} {f('tpot_p99_ms')} "
                         f"{f('e2e_p50_ms')} {f('e2e_p99_ms')}        {d['errors']}")
    if result.get("goals"):
        lines += ["", "goals:"]
        for k, v in result["goals"].items():
            lines.append(f"  {k:<24} {v['value']:>8}  target {v['target']:<7}  {'MET' if v['met'] else 'NOT MET'}")
    return "\n".join(lines)
