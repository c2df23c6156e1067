"""End-to-end QLoRA training on CPU: real NF4 double-quantized layers, real files.

The tiny base here has a byte-level tokenizer with no merges (vocab 259 = 256 bytes
+ 3 specials), so every letter is one token and a per-character task is well posed.
Compute dtype is float32 in these tests because bf16 matmuls are slow on CPU; the
library default is bfloat16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from caesar_task import RECIPE, char_base, exact_match, write_caesar_data  # noqa: F401, F811 (char_base: a fixture)
from qlora_serve.training.config import TrainConfig
from qlora_serve.training.export import METADATA_FILE, read_metadata
from qlora_serve.training.feedback import StopCallback
from qlora_serve.training.trainer import train

HELD_OUT = 40


@pytest.fixture(scope="module")
def caesar_data(tmp_path_factory) -> dict[str, Path | list[str]]:
    """2000 training words and HELD_OUT words never seen in training."""
    return write_caesar_data(tmp_path_factory.mktemp("caesar"), HELD_OUT)


def _load_4bit(base: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=torch.float32, device_map="cpu")


def _caesar_config(char_base, caesar_data, out, **kw) -> TrainConfig:
    values = dict(base=str(char_base), data=str(caesar_data["train"]), out=str(out), progress_bar=False, **RECIPE)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(char_base, caesar_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("caesar-run") / "adapter"
    cfg = _caesar_config(char_base, caesar_data, out, eval_data=str(caesar_data["eval"]), name="caesar")
    return train(cfg)


def test_learning_is_real_on_held_out_words(char_base, caesar_data, trained):
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(char_base)
    held_out = caesar_data["held_out"]
    base = _load_4bit(char_base)
    before = exact_match(base, tok, held_out)
    # Plain PEFT loads the adapter directory as written.
    model = PeftModel.from_pretrained(base, str(trained.adapter_dir))
    after = exact_match(model, tok, held_out)
    assert before <= 0.05, before
    assert after >= 0.9, (before, after)

    meta = read_metadata(trained.adapter_dir)
    assert meta["name"] == "caesar" and meta["global_step"] == 300 and not meta["stopped_early"]
    assert len(meta["base_fingerprint"]) >= 16 and len(meta["dataset"]["sha256"]) == 64
    assert meta["hyperparameters"]["lora_r"] == 16 and meta["hyperparameters"]["packing"] is True
    assert meta["final_train_loss"] < 0.2 and meta["final_eval_loss"] < 0.2
    assert meta["final_eval_perplexity"] == pytest.approx(torch.tensor(meta["final_eval_loss"]).exp().item())
    metrics = json.loads((trained.adapter_dir / "metrics.json").read_text())
    logs = [e for e in metrics["log"] if e["event"] == "log"]
    assert len(logs) == 6 and all(e["tokens_per_s"] > 0 and e["peak_memory_mb"] > 0 and "learning_rate" in e for e in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert trained.trainable_params == meta["trainable_params"] > 0


def test_adapter_is_servable_by_our_reader(char_base, trained):
    from qlora_serve.adapters.peft_format import load_lora_adapter

    adapter = load_lora_adapter(trained.adapter_dir)
    assert adapter.rank == 16 and "lm_head" not in adapter.target_modules
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == set(adapter.target_modules)
    assert (trained.adapter_dir / METADATA_FILE).is_file()


def test_merge_equals_base_plus_adapter(char_base, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_serve.training.merge import merge

    result = merge(str(char_base), trained.adapter_dir, tmp_path / "merged", prompt="qrst=", max_new_tokens=6)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.decode(result.generated_ids) == "rstu</s>"
    # The saved model is standalone: plain transformers, no PEFT, same greedy output.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = tok("qrst=", return_tensors="pt")
    out = merged.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0, ids["input_ids"].shape[1]:].tolist() == result.generated_ids


def test_resume_gives_the_same_adapter(char_base, caesar_data, tmp_path):
    from safetensors.torch import load_file

    # Dropout on and the default paged 8-bit AdamW, so RNG and optimizer state must both be restored.
    common = dict(max_steps=8, save_steps=4, batch_size=4, grad_accum=2, lora_r=4, lora_dropout=0.1,
                  optim="paged_adamw_8bit", learning_rate=5e-3, logging_steps=4)
    full = train(_caesar_config(char_base, caesar_data, tmp_path / "full", **common))
    stopped = train(_caesar_config(char_base, caesar_data, tmp_path / "split", **common), callbacks=[StopCallback(after_steps=4)])
    assert stopped.stopped_early and stopped.global_step == 4
    resumed = train(_caesar_config(char_base, caesar_data, tmp_path / "split", resume=True, **common))
    assert resumed.global_step == 8 and not resumed.stopped_early

    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    mid = load_file(str(tmp_path / "split" / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # ...and the comparison has teeth: steps 5-8 moved the B matrices well beyond that tolerance.
    assert max((a[k] - mid[k]).abs().max().item() for k in a if "lora_B" in k) > 1e-3


def test_job_in_subprocess_streams_progress_and_cancels(char_base, caesar_data, tmp_path):
    from qlora_serve.training.jobs import run_job_in_subprocess

    job = run_job_in_subprocess(_caesar_config(char_base, caesar_data, tmp_path / "job", max_steps=5000, logging_steps=2))
    events = []
    for event in job:
        events.append(event)
        if event["event"] == "log" and len([e for e in events if e["event"] == "log"]) == 1:
            job.cancel()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and "log" in kinds and kinds[-1] == "done", events
    done = events[-1]
    assert done["cancelled"] and done["stopped_early"] and done["global_step"] < 5000
    assert (tmp_path / "job" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "job" / "checkpoints" / f"checkpoint-{done['global_step']}").is_dir()  # resumable


def test_job_reports_bad_input_as_error_event(char_base, tmp_path):
    from qlora_serve.training.jobs import run_job_in_subprocess

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    job = run_job_in_subprocess(TrainConfig(base=str(char_base), data=str(tmp_path / "bad.jsonl"), out=str(tmp_path / "o")))
    events = list(job)
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "InvalidArgument"
    assert "bad.jsonl:2" in events[-1]["message"]
