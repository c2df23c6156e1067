"""The recipes the training benchmark (bench_training.py) compares this trainer with, as their
users would write them: NF4 + double quant through `BitsAndBytesConfig`,
`prepare_model_for_kbit_training`, the same `LoraConfig`, paged AdamW 8-bit, gradient
checkpointing, then either

  seed      plain `transformers.Trainer` + `DataCollatorForLanguageModeling` (pads each
            micro-batch to its longest example, loss on every token), or
  trl       trl's `SFTTrainer` with its defaults for a prompt/completion dataset: loss on
            the completion only, `packing=False` (trl's default): each micro-batch is
            padded to its longest example, or
  trl_pack  the same with `packing=True` (trl's default strategy "bfd": best-fit-decreasing
            bins, padding-free rows with per-example position ids).

`spec` (a dict from bench_training.py) carries the shared settings: base, data (JSONL of
{"prompt", "completion"} or {"text"}), steps, batch_size, grad_accum, max_seq_len, and the
optimizer recipe (`recipe`: learning_rate, warmup_ratio, max_grad_norm, lora_dropout, ...).
Every run returns its Meter's figures (training_memory.py), and with `spec["adapter_out"]`
it also saves the trained adapter there (for the accuracy check).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from training_memory import Meter, meter_callback  # benchmarks/training_memory.py


def read_records(path: str) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def compute_dtype():
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_kbit_model(base: str):
    """The seed recipe's model: NF4 + double quant, `prepare_model_for_kbit_training`."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_serve.training.model import device_map

    dtype = compute_dtype()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=dtype, device_map=device_map())
    return prepare_model_for_kbit_training(model)


def lora_config(model, recipe: dict):
    """r / alpha / dropout as in the recipe, on every Linear but the head (as our trainer's default)."""
    import torch
    from peft import LoraConfig

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Linear4bit"} - {"lm_head"})
    return LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def common_args(spec: dict, out_dir: str) -> dict:
    """TrainingArguments fields every baseline shares with our trainer's run."""
    import torch

    r = spec["recipe"]
    return dict(output_dir=out_dir, per_device_train_batch_size=spec["batch_size"],
                gradient_accumulation_steps=spec["grad_accum"], learning_rate=r["learning_rate"],
                max_steps=spec["steps"], lr_scheduler_type="cosine", warmup_steps=r["warmup_ratio"],
                optim="paged_adamw_8bit", gradient_checkpointing=True, bf16=compute_dtype() == torch.bfloat16,
                logging_steps=spec["steps"], save_strategy="no", report_to="none", seed=0, data_seed=0,
                disable_tqdm=True, max_grad_norm=r["max_grad_norm"], weight_decay=0.0,
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)


class Recording:
    """Wraps a collator; appends each micro-batch's real (non-pad) token count to the meter."""

    def __init__(self, inner, meter: Meter):
        self.inner, self.meter = inner, meter
        self.padded_tokens = 0  # tokens the model computes on, padding included

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.meter.batch_tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        self.padded_tokens += int(batch["input_ids"].numel())
        return batch


def _finish(meter: Meter, model, rec: Recording, spec: dict, extra: dict | None = None) -> dict:
    out = meter.finish()
    out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["pad_fraction"] = 1 - sum(meter.batch_tokens) / rec.padded_tokens if rec.padded_tokens else None
    if spec.get("adapter_out"):
        model.save_pretrained(spec["adapter_out"])
    return {**out, **(extra or {})}


def run_seed(spec: dict) -> dict:
    """The plain recipe most QLoRA tutorials use (transformers.Trainer, padding, loss on all tokens)."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments
    import tempfile

    tok = AutoTokenizer.from_pretrained(spec["base"])
    data = []
    for r in read_records(spec["data"]):
        ids = (tok(r["prompt"])["input_ids"] + tok(r["completion"], add_special_tokens=False)["input_ids"]
               if "prompt" in r else tok(r["text"])["input_ids"])
        data.append({"input_ids": (ids + [tok.eos_token_id])[:spec["max_seq_len"]]})
    meter = Meter(spec["warmup_steps"], spec["grad_accum"])
    model = load_kbit_model(spec["base"])
    model = get_peft_model(model, lora_config(model, spec["recipe"]))
    rec = Recording(DataCollatorForLanguageModeling(tok, mlm=False), meter)
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(model=model, args=TrainingArguments(**common_args(spec, d)), train_dataset=data,
                          data_collator=rec, callbacks=[meter_callback(meter)])
        trainer.train()
        return _finish(meter, model, rec, spec)


def pack_length(tok, records: list[dict], batch_size: int) -> int:
    """trl packing's bin length for one packed row per micro-batch with the same token budget as
    `batch_size` average examples (never below the longest example: bfd would truncate it)."""
    lengths = [len(tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"]) for r in records]
    return max(max(lengths), math.ceil(batch_size * sum(lengths) / len(lengths)))


def run_trl(spec: dict, packing: bool) -> dict:
    """trl's SFTTrainer on the prompt/completion data, its defaults but for the shared recipe.

    packing=False: trl's default (pads each micro-batch). packing=True: best-fit-decreasing
    bins of `pack_length` tokens, one bin per micro-batch (per_device_train_batch_size=1), so a
    step trains about as many tokens and examples as the other variants' steps."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    import tempfile

    from qlora_serve.training.collate import packing_is_isolated

    tok = AutoTokenizer.from_pretrained(spec["base"])
    records = [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_records(spec["data"])]
    extra = {"trl_packing": packing}
    meter = Meter(spec["warmup_steps"], spec["grad_accum"])
    model = load_kbit_model(spec["base"])
    peft_config = lora_config(model, spec["recipe"])
    args = common_args(spec, "")
    if packing:
        extra["pack_length"] = max_length = pack_length(tok, records, spec["batch_size"])
        args["per_device_train_batch_size"] = 1
    else:
        max_length = spec["max_seq_len"]
    with tempfile.TemporaryDirectory() as d:
        args["output_dir"] = d
        config = SFTConfig(**args, max_length=max_length, packing=packing)
        trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tok, peft_config=peft_config, callbacks=[meter_callback(meter)])
        extra["trl_padding_free"] = bool(trainer.padding_free)
        if packing:
            extra["packed_rows"] = len(trainer.train_dataset)
            # Padding-free rows are only correct if attention stays within each example.
            extra["packing_isolated"] = packing_is_isolated(trainer.model, trainer.model.config.vocab_size)
        rec = Recording(trainer.data_collator, meter)
        trainer.data_collator = rec
        trainer.train()
        return _finish(meter, trainer.model, rec, spec, extra)
