"""The training benchmark's report (bench_training.py): variant names, the ratios and goals
(issue 4: QLoRA vs 16-bit LoRA memory, vs the seed recipe's speed; issue 13: vs trl's
SFTTrainer on mixed lengths, speed, memory and accuracy) and the printed table."""

from __future__ import annotations

VARIANT_NAMES = {
    "qlora": "(a) this trainer, QLoRA (NF4+DQ, packing)",
    "lora16": "(b) this trainer, LoRA on 16-bit base",
    "seed": "(c) seed recipe (HF Trainer, padding, QLoRA)",
    "trl": "(d) trl SFTTrainer, defaults (padding)",
    "trl_pack": "(e) trl SFTTrainer, packing=True (bfd)",
    "base": "base model, no adapter",
}
def fmt_mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(result: dict) -> str:
    m, s, r, acc = result["machine"], result["settings"], result["results"], result["accuracy"]
    ex = s["example_tokens_min_median_mean_max"]
    lines = [f"training benchmark  {result['stamp']}  preset={s['preset']}  base={s['base_label']}",
             f"machine: {m.get('gpu') or m['cpu_model']} ({m['device']}, {m['cpu_cores']} cores, load {m.get('load_average')})",
             f"torch {m['torch']}  transformers {m['transformers']}  peft {m['peft']}  bitsandbytes {m['bitsandbytes']}  "
             f"trl {m.get('trl')}",
             f"batch {s['batch_size']} x accum {s['grad_accum']}, {s['steps']} steps ({s['warmup_steps']} warm-up), "
             f"max_seq_len {s['max_seq_len']}, {s['examples']} examples / {s['dataset_tokens']} tokens "
             f"(min/median/mean/max {ex[0]}/{ex[1]}/{ex[2]}/{ex[3]}), compute {s['compute_dtype']}",
             f"memory: {next((x.get('memory_method') for x in r.values() if 'error' not in x), '?')}; peak = training "
             f"phase incl. the resident model; tokens/s = real tokens, best of {s['repeats']} interleaved run(s), "
             f"{s['threads'] or 'default'} thread(s)",
             "",
             f"{'variant':<46} {'peak MiB':>9} {'load+train':>10} {'model MiB':>9} {'tokens/s':>9} {'pad %':>6} {'mean loss':>9}"]
    for v, x in r.items():
        if "error" in x:
            lines.append(f"{VARIANT_NAMES[v]:<46} error: {x['error'][:80]}")
            continue
        pad = x.get("pad_fraction")
        lines.append(f"{VARIANT_NAMES[v]:<46} {fmt_mib(x['peak_train_bytes']):>9} {fmt_mib(x['peak_bytes']):>10} "
                     f"{fmt_mib(x['model_resident_bytes']):>9} {x['tokens_per_s'] or 0:>9.1f} "
                     f"{fmt(None if pad is None else 100 * pad, '.1f'):>6} {fmt(x['final_loss']):>9}")
    if acc:
        a = result["settings"]["accuracy"]
        lines += ["", f"accuracy: Caesar shift, tiny byte-level base, {a['steps']} steps x batch {a['batch_size']}, "
                      f"lr {a['learning_rate']}, greedy exact match on {a['held_out']} held-out / {a['held_out']} training words",
                  f"{'variant':<46} {'held-out':>9} {'train':>9} {'mean loss':>9} {'wall s':>7}"]
        for v, x in acc.items():
            if "error" in x:
                lines.append(f"{VARIANT_NAMES[v]:<46} error: {x['error'][:80]}")
                continue
            lines.append(f"{VARIANT_NAMES[v]:<46} {x['held_out_exact']:>9.3f} {x['train_exact']:>9.3f} "
                         f"{fmt(x['final_loss']):>9} {x['wall_s']:>7.0f}")
    lines.append("")
    for k, v in result["ratios"].items():
        lines.append(f"{k:<46} {fmt(v)}")
    lines.append("")
    for k, (ok, text) in result["goals"].items():
        lines.append(f"goal {k}: {text} -> {'MET' if ok else 'NOT MET'}")
    return "\n".join(lines)


def ratios_and_goals(results: dict, acc: dict) -> tuple[dict, dict]:
    ok = {v: x for v, x in results.items() if "error" not in x}
    ratio = lambda a, b, key: (ok[a][key] / ok[b][key]) if a in ok and b in ok and ok[b][key] else None
    ratios = {
        "peak memory (a)/(b)  [issue 4 goal <= 0.40]": ratio("qlora", "lora16", "peak_train_bytes"),
        "tokens/s (a)/(c)  [issue 4 goal >= 1.0]": ratio("qlora", "seed", "tokens_per_s"),
        "tokens/s (a)/(d)  [goal >= 1.3]": ratio("qlora", "trl", "tokens_per_s"),
        "peak memory (a)/(d)  [goal <= 0.9]": ratio("qlora", "trl", "peak_train_bytes"),
        "tokens/s (a)/(e)": ratio("qlora", "trl_pack", "tokens_per_s"),
        "peak memory (a)/(e)": ratio("qlora", "trl_pack", "peak_train_bytes"),
        "peak memory (a)/(c)": ratio("qlora", "seed", "peak_train_bytes"),
        "load+train peak (a)/(b)": ratio("qlora", "lora16", "peak_bytes"),
        "tokens/s (a)/(b)": ratio("qlora", "lora16", "tokens_per_s"),
    }
    r4 = lambda x: x if x is None else round(x, 3)
    mem4, speed4 = ratios["peak memory (a)/(b)  [issue 4 goal <= 0.40]"], ratios["tokens/s (a)/(c)  [issue 4 goal >= 1.0]"]
    speed, mem = ratios["tokens/s (a)/(d)  [goal >= 1.3]"], ratios["peak memory (a)/(d)  [goal <= 0.9]"]
    goals = {
        "memory vs 16-bit (issue 4)": (mem4 is not None and mem4 <= 0.40, f"QLoRA peak / 16-bit LoRA peak = {r4(mem4)} (<= 0.40)"),
        "speed vs seed (issue 4)": (speed4 is not None and speed4 >= 1.0, f"tokens/s (a)/(c) = {r4(speed4)} (>= 1.0)"),
        "speed vs SFTTrainer": (speed is not None and speed >= 1.3, f"tokens/s (a)/(d) = {r4(speed)} (>= 1.3)"),
        "memory vs SFTTrainer": (mem is not None and mem <= 0.9, f"peak (a)/(d) = {r4(mem)} (<= 0.9)"),
    }
    accs = {v: x["held_out_exact"] for v, x in acc.items() if "error" not in x}
    if "qlora" in accs and "trl" in accs:
        goals["accuracy vs SFTTrainer"] = (accs["qlora"] >= accs["trl"],
                                           f"held-out exact match (a) {accs['qlora']:.3f} vs (d) {accs['trl']:.3f} (not lower)")
    return ratios, goals
