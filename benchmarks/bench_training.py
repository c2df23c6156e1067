#!/usr/bin/env python
"""Training benchmark (issues 4 and 13, "Benchmark"): tokens/s, peak memory and accuracy
against the recipes users would otherwise run, same model, same data, same steps.

  (a) qlora     this trainer (`qlora_serve.training.train`): NF4 + double-quant base, LoRA,
                padding-free packing, paged AdamW 8-bit, non-reentrant checkpointing;
  (b) lora16    the same trainer and settings on the base loaded in 16-bit (bf16 on a GPU;
                fp32 on CPU, where bf16 matmuls are slow): only the quantization differs;
  (c) seed      the seed recipe: NF4 + double quant, `prepare_model_for_kbit_training`, the
                same LoRA, plain `transformers.Trainer` + `DataCollatorForLanguageModeling`
                (pads each micro-batch to its longest example), paged AdamW 8-bit,
                `gradient_checkpointing=True`;
  (d) trl       the same model recipe through trl's `SFTTrainer` with its defaults for a
                prompt/completion dataset (completion-only loss, packing=False: padding);
  (e) trl_pack  (d) with `packing=True` (trl's "bfd" strategy, padding-free rows), one packed
                row per micro-batch holding about a batch's worth of tokens.
(benchmarks/training_baselines.py has (c)-(e).)

Speed phase: the data is {"prompt", "completion"} JSONL of mixed lengths (prompt word counts
log-uniform in [min_words, max_words]: many short prompts, a long tail; completions 4-32
words), where padding costs the padded recipes and packing matters. Every variant trains
the same examples (one epoch of steps x batch x grad_accum, Trainer's seeded sampler;
(e) packs the same examples into bins), LoRA r=16, alpha=32 on every Linear but the head,
the same learning rate, schedule and compute dtype. Each run is a fresh child process, so
its peak memory is its own.

Accuracy phase (benchmarks/training_accuracy.py): (a), (c), (d), (e) train the tests'
Caesar-shift task (tests/caesar_task.py) on a tiny byte-level base with one shared recipe
and the same steps; greedy exact match on held-out words, adapter loaded with plain PEFT.

tokens/s: real (non-pad) tokens trained per second over steps warmup+1..N (the first
`--warmup-steps` steps are excluded; padding is not counted as work).

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
import importlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info, write_results  # benchmarks/machine.py (the script's folder is on sys.path)
from training_accuracy import char_base, recipe as accuracy_recipe, score, task_files  # benchmarks/training_accuracy.py
from training_baselines import run_seed, run_trl  # benchmarks/training_baselines.py
from training_memory import Meter, meter_callback  # benchmarks/training_memory.py
from training_report import VARIANT_NAMES, fmt_mib, ratios_and_goals, render  # benchmarks/training_report.py

RECIPE_VERSION = 2
VARIANTS = ("qlora", "lora16", "seed", "trl", "trl_pack")
PRESETS = {
    # Weights dominate: ~103 M Linear params (in_features multiples of 64 for bitsandbytes' CPU path), vocab 384.
    "cpu": dict(model=dict(vocab_size=384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
                steps=6, warmup_steps=1, batch_size=4, grad_accum=1, max_seq_len=512, min_words=4, max_words=160),
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


def write_dataset(path: Path, n: int, min_words: int, max_words: int, seed: int, tok, max_len: int) -> list[int]:
    """`n` {"prompt", "completion"} records: prompt word counts log-uniform in [min_words, max_words]
    (most prompts short, a long tail, like chat data), completions 4-24 words; a prompt is
    shortened until the example fits `max_len` tokens, so no variant truncates or drops one.
    Returns the examples' token counts (prompt, completion, eos)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    lines, lengths = [], []
    for _ in range(n):
        k = int(round(math.exp(rng.uniform(math.log(min_words), math.log(max_words)))))
        completion = " " + words(rng.randint(4, 24))
        while True:
            prompt = words(k) + " ="
            size = len(tok(prompt)["input_ids"]) + len(tok(completion, add_special_tokens=False)["input_ids"]) + 1
            if size <= max_len or k <= 1:
                break
            k = int(k * 0.9)
        lines.append(json.dumps({"prompt": prompt, "completion": completion}))
        lengths.append(size)
    path.write_text("\n".join(lines) + "\n")
    return lengths


# --------------------------------------------------------------------------- the variants
SPEED_RECIPE = dict(learning_rate=2e-4, warmup_ratio=0.0, max_grad_norm=0.3, lora_r=16, lora_alpha=32, lora_dropout=0.05)


def compute_dtype_name() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def train_config(spec: dict, out: Path):
    from qlora_serve.training.config import TrainConfig

    r = spec["recipe"]
    return TrainConfig(base=spec["base"], data=spec["data"], out=str(out), compute_dtype=compute_dtype_name(),
                       lora_r=r["lora_r"], lora_alpha=r["lora_alpha"], lora_dropout=r["lora_dropout"],
                       learning_rate=r["learning_rate"], warmup_ratio=r["warmup_ratio"], max_grad_norm=r["max_grad_norm"],
                       lr_scheduler="cosine", weight_decay=0.0,
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
    # train() imports these lazily; the baselines import them before their Meter (~87 MiB RSS on CPU).
    for module in ("transformers.trainer", "peft", "bitsandbytes.optim"):
        importlib.import_module(module)

    meter = Meter(spec["warmup_steps"], spec["grad_accum"])
    make = T.make_collator
    padded = [0]

    class Recording:
        """The trainer's collator, plus the real-token count of each batch it builds."""

        def __init__(self, inner):
            self.inner, self.counter = inner, inner.counter

        def __call__(self, features):
            before = self.counter.tokens
            out = self.inner(features)
            meter.batch_tokens.append(self.counter.tokens - before)
            padded[0] += int(out["input_ids"].numel())
            return out

    T.make_collator = lambda tokenizer, packing: Recording(make(tokenizer, packing))
    with tempfile.TemporaryDirectory() as d, open(os.devnull, "w") as quiet:
        out_dir = Path(spec["adapter_out"]) if spec.get("adapter_out") else Path(d) / "out"
        result = T.train(train_config(spec, out_dir), callbacks=[meter_callback(meter)], stream=quiet)
        out = meter.finish()
        out["trainable_params"] = result.trainable_params
        out["packing"] = result.metadata["hyperparameters"]["packing"]
        out["pad_fraction"] = 1 - sum(meter.batch_tokens) / padded[0] if padded[0] else None
    return out


def worker(variant: str, spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if variant == "seed":
        out = run_seed(spec)
    elif variant in ("trl", "trl_pack"):
        out = run_trl(spec, packing=variant == "trl_pack")
    else:
        out = run_ours(spec, sixteen_bit=variant == "lora16")
    if spec.get("adapter_out"):  # accuracy phase: score the adapter it wrote
        out.update(score(spec["base"], spec["adapter_out"], spec["held_out"], spec["train_sample"]))
    return out


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: hidden 1024 x 8 layers (~103 M Linear params, bf16 on disk); 7b: Llama-2-7B shapes "
                        "(random bf16 weights, ~13.5 GB written once to the cache; for a GPU)")
    p.add_argument("--base", default=None, help="benchmark this model directory / hub id instead of a preset's random model")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (preset default)")
    p.add_argument("--warmup-steps", type=int, default=None, help="leading steps left out of tokens/s")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--accuracy-steps", type=int, default=300, help="optimizer steps of each accuracy run (0: skip that phase)")
    p.add_argument("--held-out", type=int, default=100, help="held-out words scored in the accuracy phase")
    p.add_argument("--accuracy-lr", type=float, default=None, help="learning rate of the accuracy runs (default 5e-3; the tests' 1e-2 diverges on some word splits)")
    p.add_argument("--accuracy-only", action="store_true", help="skip the speed phase")
    p.add_argument("--quick", action="store_true",
                   help="~8 min on 2 shared cores: 1 repeat, 3 speed steps, 150 accuracy steps on 40 held-out words")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each variant (default: 1 on CPU, where shared cores make multi-threaded "
                        "step times erratic; torch's default on GPU)")
    p.add_argument("--no-fixed-mmap-threshold", action="store_true",
                   help="CPU: leave glibc's dynamic mmap threshold on (RSS then includes freed heap memory)")
    p.add_argument("--repeats", type=int, default=None, help="runs per variant, interleaved (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--out", default=None, help="JSON path (default bench-results/training-<timestamp>.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = args.repeats or 1
        args.steps = args.steps or 3
        args.accuracy_steps = min(args.accuracy_steps, 150)
        args.held_out = min(args.held_out, 40)
    return args


def run_worker(variant: str, spec: dict, threads: int | None, gpu: bool, fixed_mmap: bool) -> dict:
    """One variant in a fresh child process; its result dict (or {"error"})."""
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if not gpu and fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, __file__, "--_worker", variant, "--_spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("@@RESULT ")), None)
    run = json.loads(line[len("@@RESULT "):]) if line else {
        "error": f"worker exited {proc.returncode}", "stderr": proc.stderr[-4000:]}
    run["wall_s"] = round(time.perf_counter() - t0, 1)
    if "error" in run:
        print(f"  {variant} failed: {run['error']}\n{run.get('traceback') or run.get('stderr', '')}", file=sys.stderr)
    return run


def best_of(rs: list[dict]) -> dict:
    """A variant's figures over its repeats: best tokens/s (noise only slows runs), highest memory."""
    good = [r for r in rs if "error" not in r]
    if not good:
        return {"error": rs[0]["error"], "runs": rs}
    best = max(good, key=lambda r: r["tokens_per_s"] or 0)
    return {**best, **{k: max(r[k] for r in good) for k in ("peak_bytes", "peak_train_bytes", "model_resident_bytes")},
            "tokens_per_s_runs": [r["tokens_per_s"] for r in good],
            "peak_train_bytes_runs": [r["peak_train_bytes"] for r in good], "runs": len(good)}


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
    from transformers import AutoTokenizer

    lengths = sorted(write_dataset(data, n_examples, preset["min_words"], preset["max_words"], 0,
                                   AutoTokenizer.from_pretrained(base), max_len))
    import torch

    gpu = torch.cuda.is_available()
    threads = args.threads if args.threads is not None else (None if gpu else 1)
    repeats = args.repeats or (1 if gpu else 2)
    fixed_mmap = not args.no_fixed_mmap_threshold
    spec = dict(base=base, data=str(data), steps=steps, warmup_steps=warmup, batch_size=batch, grad_accum=accum,
                max_seq_len=max_len, threads=threads, recipe=SPEED_RECIPE)

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep_i in range(0 if args.accuracy_only else repeats):
        for v in variants:
            print(f"[{rep_i + 1}/{repeats}] speed: {VARIANT_NAMES[v]} ...", file=sys.stderr, flush=True)
            run = run_worker(v, spec, threads, gpu, fixed_mmap)
            if "error" not in run:
                print(f"  {run['tokens_per_s']:.1f} tok/s, peak {fmt_mib(run['peak_train_bytes'])} MiB "
                      f"({run['wall_s']} s)", file=sys.stderr, flush=True)
            runs[v].append(run)
    results = {v: best_of(rs) for v, rs in runs.items() if rs}

    accuracy: dict[str, dict] = {}
    acc_settings = None
    if args.accuracy_steps > 0:
        task = task_files(work, args.held_out)
        cbase = str(char_base(cache_root()))
        acc_recipe = accuracy_recipe(args.accuracy_steps, args.accuracy_lr or 5e-3)
        acc_settings = {**acc_recipe, "held_out": args.held_out, "base": cbase}
        before = score(cbase, None, task["held_out"], task["train_sample"])
        accuracy["base"] = {**before, "final_loss": None, "wall_s": 0.0}
        for v in [v for v in variants if v != "lora16"]:
            print(f"accuracy: {VARIANT_NAMES[v]} ...", file=sys.stderr, flush=True)
            aspec = dict(base=cbase, data=task["train"], steps=acc_recipe["steps"], warmup_steps=0,
                         batch_size=acc_recipe["batch_size"], grad_accum=acc_recipe["grad_accum"], max_seq_len=64,
                         threads=threads, recipe=acc_recipe, adapter_out=str(work / f"acc-{v}"),
                         held_out=task["held_out"], train_sample=task["train_sample"])
            run = run_worker(v, aspec, threads, gpu, fixed_mmap)
            if "error" not in run:
                print(f"  held-out {run['held_out_exact']:.3f}, train {run['train_exact']:.3f} ({run['wall_s']} s)",
                      file=sys.stderr, flush=True)
            accuracy[v] = run

    ratios, goals = ratios_and_goals(results, accuracy)
    import trl

    result = {
        "stamp": stamp,
        "machine": {**machine_info(), "trl": trl.__version__},
        "settings": {"preset": args.model_preset, "base": base,
                     "base_label": args.base or f"random Llama {preset['model']}", "steps": steps,
                     "warmup_steps": warmup, "batch_size": batch, "grad_accum": accum, "max_seq_len": max_len,
                     "examples": n_examples, "dataset_tokens": sum(lengths),
                     "example_tokens_min_median_mean_max": [lengths[0], lengths[len(lengths) // 2],
                                                            round(sum(lengths) / len(lengths), 1), lengths[-1]],
                     "compute_dtype": "bfloat16" if gpu else "float32", "recipe": SPEED_RECIPE,
                     "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "every Linear but lm_head"},
                     "optimizer": "paged_adamw_8bit", "threads": threads, "repeats": repeats, "quick": args.quick,
                     "malloc_mmap_threshold": None if gpu or not fixed_mmap else 65536, "accuracy": acc_settings},
        "results": results,
        "accuracy": accuracy,
        "ratios": ratios,
        "goals": goals,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = write_results("training", result, args.out)
    print(render(result))
    print(f"\nJSON: {out}  ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
