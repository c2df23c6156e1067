"""Issue 13: resume refuses changed settings or data naming them (or accepts them with
--resume-allow-changes), metrics.json keeps its history across a resume, the final
evaluation is not run twice, and the adapter directory is exactly PEFT's while the
registry still reads the base fingerprint (from the metadata file). Real training
runs of the tiny demo base, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_serve.errors import FailedPrecondition
from qlora_serve.training.config import TrainConfig
from qlora_serve.training.feedback import StopCallback
from qlora_serve.training.trainer import train

STEPS = dict(max_steps=4, save_steps=2, eval_steps=2, logging_steps=1, batch_size=2, grad_accum=1, lora_r=4,
             compute_dtype="float32", progress_bar=False, gradient_checkpointing=False)


def _data(path: Path, completion: str = " three") -> Path:
    path.write_text("".join(json.dumps({"prompt": f"one {'two ' * (i % 3)}", "completion": completion}) + "\n"
                            for i in range(12)))
    return path


def _cfg(demo, tmp_path, **kw) -> TrainConfig:
    values = dict(base=str(demo.base), data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "eval.jsonl"),
                  out=str(tmp_path / "out"), **STEPS)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def stopped(demo, tmp_path_factory):
    """A run stopped after step 2 of 4 (checkpoint-2 on disk)."""
    tmp = tmp_path_factory.mktemp("resume")
    _data(tmp / "train.jsonl")
    _data(tmp / "eval.jsonl")
    result = train(_cfg(demo, tmp), callbacks=[StopCallback(after_steps=2)])
    assert result.stopped_early and result.global_step == 2
    return tmp


@pytest.mark.parametrize("change,named", [
    (dict(learning_rate=1e-3), "learning_rate: 0.0002 -> 0.001"),
    (dict(lr_scheduler="linear"), "lr_scheduler"),
    (dict(data="other.jsonl"), "data_sha256"),
])
def test_resume_with_changed_settings_or_data_is_refused_naming_the_change(demo, stopped, change, named):
    _data(stopped / "other.jsonl", completion=" four")
    if "data" in change:
        change = {"data": str(stopped / change["data"])}
    with pytest.raises(FailedPrecondition, match=f"cannot resume: .*{named}.*--resume-allow-changes"):
        train(_cfg(demo, stopped, resume=True, **change))


def test_resume_with_another_lora_shape_is_refused_even_with_the_override(demo, stopped):
    with pytest.raises(FailedPrecondition, match=r"lora_r: 4 -> 8.*another shape \(lora_r\)"):
        train(_cfg(demo, stopped, resume=True, resume_allow_changes=True, lora_r=8))
    with pytest.raises(FailedPrecondition, match=r"target_modules"):
        train(_cfg(demo, stopped, resume=True, resume_allow_changes=True, target_modules="q_proj,v_proj"))


def test_resume_keeps_metrics_history_and_evaluates_once_per_step(demo, stopped, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)  # the module's stopped run stays for the other tests
    before = json.loads((run_dir / "out" / "metrics.json").read_text())["log"]
    assert [e["step"] for e in before if e["event"] == "log"] == [1, 2]
    assert [e["step"] for e in before if e["event"] == "eval"] == [2]  # not a second one for the final eval
    result = train(_cfg(demo, run_dir, resume=True))
    assert result.global_step == 4
    log = json.loads((run_dir / "out" / "metrics.json").read_text())["log"]
    assert [e["step"] for e in log if e["event"] == "log"] == [1, 2, 3, 4]
    assert [e["step"] for e in log if e["event"] == "eval"] == [2, 4]
    assert log[:len(before)] == before
    assert result.eval_loss == log[-1]["eval_loss"]


def test_resume_allow_changes_accepts_a_new_learning_rate(demo, stopped, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    result = train(_cfg(demo, run_dir, resume=True, resume_allow_changes=True, learning_rate=1e-3))
    assert result.global_step == 4


def test_adapter_config_is_exactly_peft_and_fingerprint_is_still_enforced(demo, stopped, tmp_path):
    import dataclasses

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from qlora_serve.adapters.registry import FINGERPRINT_KEY, AdapterRegistry
    from qlora_serve.training.export import read_metadata

    adapter = stopped / "out"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert FINGERPRINT_KEY not in config
    assert set(config) <= {f.name for f in dataclasses.fields(LoraConfig)} | {"peft_version"}  # nothing PEFT warns about
    fp = read_metadata(adapter)["base_fingerprint"]
    model = AutoModelForCausalLM.from_pretrained(demo.base, dtype=torch.float32)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    args = dict(linear_shapes=shapes, max_rank=16, allowed_roots=[stopped])
    with AdapterRegistry(tmp_path / "other", base_fingerprint="ffffffffffffffff", **args) as reg:
        with pytest.raises(FailedPrecondition, match=f"trained on base {fp} but this server runs base ffffffffffffffff"):
            reg.register_path("trained", adapter)
    with AdapterRegistry(tmp_path / "same", base_fingerprint=fp, **args) as reg:
        assert reg.register_path("trained", adapter).base_fingerprint == fp
