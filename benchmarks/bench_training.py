#!/usr/bin/env python
"""Training benchmark (issue 4, "Benchmark"): peak memory and tokens/s, same model, same batch.

  (a) qlora   this trainer (`qlora_serve.training.train`): NF4 + double-quant base, LoRA,
              padding-free packing, paged AdamW 8-bit, non-reentrant checkpointing;
  (b) lora16  the same trainer and settings on the base loaded in 16-bit (bf16 on a GPU;
              fp32 on CPU, where bf16 matmuls are slow): only the quantization differs;
  (c) seed    the seed recipe: NF4 + double-quant base, `prepare_model_for_kbit_training`,
              the same LoRA, plain `transformers.Trainer` with `DataCollatorForLanguageModeling`
              (pads each micro-batch to its longest example, no packing), paged AdamW 8-bit,
              `gradient_checkpointing=True`.

Every variant trains the same examples in the same order (one epoch of
steps x batch x grad_accum examples, Trainer's seeded sampler), LoRA r=16, alpha=32 on
every Linear but the head, the same learning rate and compute dtype. Each variant runs
in a fresh child process, so its peak memory is its own.

tokens/s: real (non-pad) tokens trained per second over steps warmup+1..N (the first
`--warmup-steps` steps are excluded; padding the seed recipe adds is not counted as work).

Peak memory (the headline is the training phase: the peak while training, the resident
model included, measured from a baseline taken just before the model loads):
  GPU: `torch.cuda.max_memory_allocated()` (peak stats reset before the load and again
       once it has loaded) minus the allocation before the load.
  CPU: the process's resident-set high-water mark (VmHWM in /proc/self/status, reset by
       writing 5 to /proc/self/clear_refs once the model has loaded) minus its RSS just
       before the model loads (after imports, gc and malloc_trim). No tracemalloc:
       torch's CPU tensors are not allocated through Python's allocator. Workers run
       with MALLOC_MMAP_THRESHOLD_=65536: glibc's dynamic mmap threshold otherwise keeps
       freed activation buffers (up to 32 MiB each) in the heap, and RSS then measures
       the allocator's retention, not live tensors (measured: a checkpointed 600-token
       forward+backward of the CPU preset peaks at 606 MiB RSS with the dynamic
       threshold, 130 MiB with the fixed one). With it, RSS follows live tensors, as
       `max_memory_allocated` does on a GPU. `--no-fixed-mmap-threshold` turns it off.
  The whole-run peak (load transients included: from_pretrained's conversion buffers,
  page cache of the checkpoint) is reported too, as "load+train".

Repeats (`--repeats`, default 2 on CPU, 1 on GPU) run the variants interleaved
(a b c a b c); a variant's tokens/s is its best run (noise from a shared machine only
slows a run down) and its memory the highest run.

Prints a table with the ratios, writes JSON to bench-results/training-<timestamp>.json
(--out), with machine info. Never asserts timing. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info  # benchmarks/machine.py (the script's folder is on sys.path)
from training_memory import Meter, meter_callback  # benchmarks/training_memory.py

RECIPE_VERSION = 2
VARIANTS = ("qlora", "lora16", "seed")
VARIANT_NAMES = {
    "qlora": "(a) this trainer, QLoRA (NF4+DQ, packing)",
    "lora16": "(b) this trainer, LoRA on 16-bit base",
    "seed": "(c) seed recipe (HF Trainer, padding, QLoRA)",
}
PRESETS = {
    # Weights dominate: ~103 M Linear params (in_features multiples of 64 for bitsandbytes' CPU path), vocab 384.
    "cpu": dict(model=dict(vocab_size=384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
                steps=4, warmup_steps=1, batch_size=4, grad_accum=1, max_seq_len=512, min_words=8, max_words=300),
    # Llama-2-7B shapes, random weights (for a GPU).
    "7b": dict(model=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
               steps=12, warmup_steps=2, batch_size=4, grad_accum=4, max_seq_len=1024, min_words=16, max_words=800),
}


# --------------------------------------------------------------------------- assets
def cache_root() -> Path:
    env = os.environ.get("QLORA_SERVE_CACHE")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-serve"


def build_base(preset: str, fields: dict) -> Path:
    """A random-weight Llama of the preset's shape + a byte-level BPE tokenizer, written once
    with save_pretrained in bf16 (as real checkpoints are; 7b: ~13.5 GB) and cached.

    bf16 on disk also keeps the CPU memory figures honest: a fp32 file loaded as fp32
    can stay memory-mapped, and its touched pages would count in every variant's RSS."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from qlora_serve.server.demo import build_tokenizer

    root = cache_root() / f"bench-train-{preset}-v{RECIPE_VERSION}"
    base = root / "base"
    if (base / "READY.json").is_file():
        return base
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=root))
    tok = build_tokenizer(tmp, min(fields["vocab_size"], 384))  # the embedded corpus is small; ids fit the vocab
    config = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    big = preset == "7b"
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp, max_shard_size="4GB")
    (tmp / "READY.json").write_text(json.dumps(fields))
    os.replace(tmp, base)
    return base


WORDS = ("the a of to and in is it that for on with as was by at be this from or have an they which one you were "
         "all we when there can been has more if will their what so about would out up them some into time only "
         "model adapter server token weight gradient memory batch layer rank alpha learning rate quantized").split()


def write_dataset(path: Path, n: int, min_words: int, max_words: int, seed: int) -> None:
    """`n` {"text"} records, word counts log-uniform in [min_words, max_words] (long tail, like chat data)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = int(round(math.exp(rng.uniform(math.log(min_words), math.log(max_words)))))
        lines.append(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(k))}))
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the variants
def compute_dtype_name() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def train_config(spec: dict, out: Path):
    from qlora_serve.training.config import TrainConfig

    return TrainConfig(base=spec["base"], data=spec["data"], out=str(out), compute_dtype=compute_dtype_name(),
                       lora_r=16, lora_alpha=32, lora_dropout=0.05, learning_rate=2e-4, warmup_ratio=0.0,
                       batch_size=spec["batch_size"], grad_accum=spec["grad_accum"], max_steps=spec["steps"],
                       logging_steps=spec["steps"], save_steps=10**9, max_seq_len=spec["max_seq_len"],
                       progress_bar=False, seed=0, optim="paged_adamw_8bit")


def run_ours(spec: dict, sixteen_bit: bool) -> dict:
    """(a) / (b): `train()` itself; for (b) its NF4 loader is swapped for a 16-bit one."""
    import torch

    from qlora_serve.training import trainer as T
    from qlora_serve.training.model import device_map

    if sixteen_bit:
        def load_16bit(base, cfg):
            from transformers import AutoModelForCausalLM

            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=device_map())
            # Not prepare_model_for_kbit_training: it upcasts every bf16 weight to fp32.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            model.config.use_cache = False
            return model

        T.load_quantized_base = load_16bit
    meter = Meter(spec["warmup_steps"], spec["grad_accum"])
    make = T.make_collator

    class Recording:
        """The trainer's collator, plus the real-token count of each batch it builds."""

        def __init__(self, inner):
            self.inner, self.counter = inner, inner.counter

        def __call__(self, features):
            before = self.counter.tokens
            out = self.inner(features)
            meter.batch_tokens.append(self.counter.tokens - before)
            return out

    T.make_collator = lambda tokenizer, packing: Recording(make(tokenizer, packing))
    with tempfile.TemporaryDirectory() as d, open(os.devnull, "w") as quiet:
        result = T.train(train_config(spec, Path(d) / "out"), callbacks=[meter_callback(meter)], stream=quiet)
        out = meter.finish()
        out["trainable_params"] = result.trainable_params
    return out


def run_seed(spec: dict) -> dict:
    """(c): the plain recipe most QLoRA tutorials use."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorForLanguageModeling, Trainer, TrainingArguments)

    from qlora_serve.training.model import device_map

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tok = AutoTokenizer.from_pretrained(spec["base"])
    records = [json.loads(l) for l in Path(spec["data"]).read_text().splitlines() if l.strip()]
    # Same tokens as our data loader gives a {"text"} record: the text, then eos; truncated alike.
    data = [{"input_ids": (tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:spec["max_seq_len"]]}
            for r in records]
    inner = DataCollatorForLanguageModeling(tok, mlm=False)
    meter = Meter(spec["warmup_steps"], spec["grad_accum"])

    def collate(features):
        meter.batch_tokens.append(sum(len(f["input_ids"]) for f in features))  # real tokens; padding is not work
        return inner(features)

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["base"], quantization_config=bnb, dtype=dtype,
                                                 device_map=device_map())
    model = prepare_model_for_kbit_training(model)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Linear4bit"} - {"lm_head"})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                                             bias="none", task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(
            output_dir=d, per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["grad_accum"],
            learning_rate=2e-4, max_steps=spec["steps"], lr_scheduler_type="cosine", optim="paged_adamw_8bit",
            gradient_checkpointing=True, bf16=dtype == torch.bfloat16, logging_steps=spec["steps"],
            save_strategy="no", report_to="none", seed=0, data_seed=0, disable_tqdm=True, max_grad_norm=0.3,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                          callbacks=[meter_callback(meter)])
        trainer.train()
        out = meter.finish()
    out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def worker(variant: str, spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if variant == "seed":
        return run_seed(spec)
    return run_ours(spec, sixteen_bit=variant == "lora16")


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: hidden 1024 x 8 layers (~103 M Linear params, fp32 on disk); 7b: Llama-2-7B shapes "
                        "(random bf16 weights, ~13.5 GB written once to the cache; for a GPU)")
    p.add_argument("--base", default=None, help="benchmark this model directory / hub id instead of a preset's random model")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (preset default)")
    p.add_argument("--warmup-steps", type=int, default=None, help="leading steps left out of tokens/s")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each variant (default: 1 on CPU, where shared cores make multi-threaded "
                        "step times erratic; torch's default on GPU)")
    p.add_argument("--no-fixed-mmap-threshold", action="store_true",
                   help="CPU: leave glibc's dynamic mmap threshold on (RSS then includes freed heap memory)")
    p.add_argument("--repeats", type=int, default=None, help="runs per variant, interleaved (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--out", default=None, help="JSON path (default bench-results/training-<timestamp>.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fmt_mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def render(result: dict) -> str:
    m, s, r = result["machine"], result["settings"], result["results"]
    lines = [f"training benchmark  {result['stamp']}  preset={s['preset']}  base={s['base_label']}",
             f"machine: {m.get('gpu') or m['cpu_model']} ({m['device']}, {m['cpu_cores']} cores, load {m.get('load_average')})",
             f"torch {m['torch']}  transformers {m['transformers']}  peft {m['peft']}  bitsandbytes {m['bitsandbytes']}",
             f"batch {s['batch_size']} x accum {s['grad_accum']}, {s['steps']} steps ({s['warmup_steps']} warm-up), "
             f"max_seq_len {s['max_seq_len']}, {s['examples']} examples / {s['dataset_tokens']} tokens, compute {s['compute_dtype']}",
             f"memory: {r[next(iter(r))].get('memory_method', '?') if r else '?'}; peak = training phase incl. the "
             f"resident model; tokens/s = real tokens, best of {s['repeats']} interleaved run(s), {s['threads'] or 'default'} thread(s)",
             "",
             f"{'variant':<46} {'peak MiB':>9} {'load+train':>10} {'model MiB':>9} {'tokens/s':>9} {'loss':>7}"]
    for v, x in r.items():
        if "error" in x:
            lines.append(f"{VARIANT_NAMES[v]:<46} error: {x['error'][:80]}")
            continue
        lines.append(f"{VARIANT_NAMES[v]:<46} {fmt_mib(x['peak_train_bytes']):>9} {fmt_mib(x['peak_bytes']):>10} "
                     f"{fmt_mib(x['model_resident_bytes']):>9} {x['tokens_per_s'] or 0:>9.1f} "
                     f"{x['final_loss'] if x['final_loss'] is not None else float('nan'):>7.3f}")
    lines.append("")
    for k, v in result["ratios"].items():
        lines.append(f"{k:<44} {v:.3f}" if v is not None else f"{k:<44} -")
    lines.append("")
    for k, (ok, text) in result["goals"].items():
        lines.append(f"goal {k}: {text} -> {'MET' if ok else 'NOT MET'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = json.loads(args._spec)
        try:
            out = worker(args._worker, spec)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            import traceback

            out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print("@@RESULT " + json.dumps(out), flush=True)
        return 0

    preset = PRESETS[args.model_preset]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]
    steps, warmup, batch, accum, max_len = (pick("steps"), pick("warmup_steps"), pick("batch_size"), pick("grad_accum"),
                                            pick("max_seq_len"))
    if not 0 <= warmup < steps:
        raise SystemExit("--warmup-steps must be in [0, steps)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    base = args.base or str(build_base(args.model_preset, preset["model"]))
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = work / "train.jsonl"
    n_examples = steps * batch * accum
    write_dataset(data, n_examples, preset["min_words"], preset["max_words"], seed=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    lengths = [min(len(tok(json.loads(l)["text"], add_special_tokens=False)["input_ids"]) + 1, max_len)
               for l in data.read_text().splitlines()]
    import torch

    gpu = torch.cuda.is_available()
    threads = args.threads if args.threads is not None else (None if gpu else 1)
    repeats = args.repeats or (1 if gpu else 2)
    spec = dict(base=base, data=str(data), steps=steps, warmup_steps=warmup, batch_size=batch, grad_accum=accum,
                max_seq_len=max_len, threads=threads)

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep_i in range(repeats):
        for v in variants:
            t0 = time.perf_counter()
            print(f"[{rep_i + 1}/{repeats}] running {VARIANT_NAMES[v]} ...", file=sys.stderr, flush=True)
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            if not gpu and not args.no_fixed_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            proc = subprocess.run([sys.executable, __file__, "--_worker", v, "--_spec", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("@@RESULT ")), None)
            run = json.loads(line[len("@@RESULT "):]) if line else {
                "error": f"worker exited {proc.returncode}", "stderr": proc.stderr[-4000:]}
            run["wall_s"] = round(time.perf_counter() - t0, 1)
            if "error" in run:
                print(f"  {v} failed: {run['error']}\n{run.get('traceback') or run.get('stderr', '')}", file=sys.stderr)
            else:
                print(f"  {run['tokens_per_s']:.1f} tok/s, peak {fmt_mib(run['peak_train_bytes'])} MiB "
                      f"({run['wall_s']} s)", file=sys.stderr, flush=True)
            runs[v].append(run)

    results: dict[str, dict] = {}
    for v, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        if not good:
            results[v] = {"error": rs[0]["error"], "runs": rs}
            continue
        best = max(good, key=lambda r: r["tokens_per_s"] or 0)
        results[v] = {**best, **{k: max(r[k] for r in good) for k in ("peak_bytes", "peak_train_bytes",
                                                                       "model_resident_bytes")},
                      "tokens_per_s_runs": [r["tokens_per_s"] for r in good],
                      "peak_train_bytes_runs": [r["peak_train_bytes"] for r in good], "runs": len(good)}

    ok = {v: x for v, x in results.items() if "error" not in x}
    ratio = lambda a, b, key: (ok[a][key] / ok[b][key]) if a in ok and b in ok and ok[b][key] else None
    ratios = {
        "peak memory (a)/(b)  [goal <= 0.40]": ratio("qlora", "lora16", "peak_train_bytes"),
        "load+train peak (a)/(b)": ratio("qlora", "lora16", "peak_bytes"),
        "peak memory (a)/(c)": ratio("qlora", "seed", "peak_train_bytes"),
        "tokens/s (a)/(c)  [goal >= 1.0]": ratio("qlora", "seed", "tokens_per_s"),
        "tokens/s (a)/(b)": ratio("qlora", "lora16", "tokens_per_s"),
    }
    mem, speed = ratios["peak memory (a)/(b)  [goal <= 0.40]"], ratios["tokens/s (a)/(c)  [goal >= 1.0]"]
    goals = {"memory": (mem is not None and mem <= 0.40, f"QLoRA peak / 16-bit LoRA peak = {mem if mem is None else round(mem, 3)} (<= 0.40)"),
             "speed": (speed is not None and speed >= 1.0, f"QLoRA tokens/s / seed recipe tokens/s = {speed if speed is None else round(speed, 3)} (>= 1.0)")}
    result = {
        "stamp": stamp,
        "machine": machine_info(),
        "settings": {"preset": args.model_preset, "base": base,
                     "base_label": args.base or f"random Llama {preset['model']}", "steps": steps,
                     "warmup_steps": warmup, "batch_size": batch, "grad_accum": accum, "max_seq_len": max_len,
                     "examples": n_examples, "dataset_tokens": sum(lengths),
                     "example_tokens_min_mean_max": [min(lengths), round(sum(lengths) / len(lengths), 1), max(lengths)],
                     "compute_dtype": "bfloat16" if torch.cuda.is_available() else "float32",
                     "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "every Linear but lm_head"},
                     "optimizer": "paged_adamw_8bit", "threads": threads, "repeats": repeats,
                     "malloc_mmap_threshold": None if gpu or args.no_fixed_mmap_threshold else 65536},
        "results": results,
        "ratios": ratios,
        "goals": goals,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "bench-results" / f"training-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(render(result))
    print(f"\nJSON: {out}  ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
