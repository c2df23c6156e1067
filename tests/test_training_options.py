"""Training options users expect: early stopping and keep-best, --report-to
tensorboard, the loss-curve PNG, fp16 compute (CUDA), merge --dtype with
safetensors shards. Real runs of the tiny demo base (2-6 steps), real files."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_serve.errors import InvalidArgument
from qlora_serve.training.config import TrainConfig
from qlora_serve.training.export import read_metadata
from qlora_serve.training.feedback import StopCallback
from qlora_serve.training.reporting import LOSS_CURVE_FILE, render_loss_curve
from qlora_serve.training.trainer import train

ADAPTER_FILE = "adapter_model.safetensors"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(lo: int, hi: int) -> str:
    return "".join(json.dumps({"prompt": f"word {i} =", "completion": f" {i + 1}"}) + "\n" for i in range(lo, hi))


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    (tmp_path / "train.jsonl").write_text(_rows(0, 32))
    (tmp_path / "eval.jsonl").write_text(_rows(40, 48))
    return {"train": tmp_path / "train.jsonl", "eval": tmp_path / "eval.jsonl", "out": tmp_path / "out"}


def _cfg(demo, files, **kw) -> TrainConfig:
    values = dict(base=str(demo.base), data=str(files["train"]), eval_data=str(files["eval"]), out=str(files["out"]),
                  compute_dtype="float32", max_steps=6, logging_steps=1, eval_steps=1, batch_size=4, grad_accum=1,
                  progress_bar=False, lr_scheduler="constant", warmup_ratio=0.0)
    values.update(kw)
    return TrainConfig(**values)


def _evals(log) -> list[tuple[int, float]]:
    return [(e["step"], e["eval_loss"]) for e in log if e.get("event") == "eval"]


def _colors(png: bytes) -> set[tuple[int, int, int]]:
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (800, 600)
    return {c[:3] for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}


TRAIN_BLUE, EVAL_ORANGE, LR_GREEN = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)  # matplotlib tab:*


# ------------------------------------------------------------- early stopping / keep-best
def test_keep_best_writes_the_best_checkpoints_adapter_and_early_stopping_stops(demo, files):
    # lr 0.5, constant: the eval loss falls, then jumps up (deterministic with the seed), so the best
    # evaluation is not the last one and patience 2 stops the run before max_steps.
    result = train(_cfg(demo, files, learning_rate=0.5, keep_best=True, early_stopping_patience=2))
    evals = _evals(result.log)
    best_step, best_loss = min(evals, key=lambda e: e[1])
    # Patience 2: the run stops at the second evaluation in a row that does not beat the best so far.
    best, misses, stop = None, 0, None
    for step, loss in evals:
        misses = 0 if best is None or loss < best else misses + 1
        best = loss if best is None else min(best, loss)
        if misses == 2:
            stop = step
            break
    meta = read_metadata(result.adapter_dir)
    assert best_step < result.global_step == stop < 6, evals
    assert meta["stopped_by_early_stopping"] and meta["stopped_early"]
    assert (meta["best_step"], meta["adapter_step"]) == (best_step, best_step)
    assert meta["best_eval_loss"] == pytest.approx(best_loss) and meta["final_eval_loss"] == pytest.approx(best_loss)
    # The adapter written is the best checkpoint's, not the last step's.
    written = load_file(result.adapter_dir / ADAPTER_FILE)
    ckpts = result.adapter_dir / "checkpoints"
    best = load_file(ckpts / f"checkpoint-{best_step}" / ADAPTER_FILE)
    last = load_file(ckpts / f"checkpoint-{result.global_step}" / ADAPTER_FILE)
    assert written.keys() == best.keys()
    assert all(torch.equal(written[k], best[k]) for k in written)
    assert not all(torch.equal(written[k], last[k]) for k in written)
    summary = json.loads((result.adapter_dir / "metrics.json").read_text())["summary"]
    assert summary["best_step"] == best_step and summary["stopped_by_early_stopping"]
    assert (result.adapter_dir / LOSS_CURVE_FILE).read_bytes().startswith(PNG_MAGIC)  # on an early-stopped run too


def test_early_stopping_threshold_counts_small_gains_as_none_and_keeps_the_last_adapter(demo, files):
    # No eval loss can fall by 100 nats: the second evaluation already exhausts patience 1.
    result = train(_cfg(demo, files, learning_rate=1e-3, early_stopping_patience=1, early_stopping_threshold=100.0,
                        save_steps=1))
    meta = read_metadata(result.adapter_dir)
    assert result.global_step == 2 and meta["stopped_by_early_stopping"]
    assert meta["adapter_step"] == 2 and meta["best_step"] in (1, 2)  # without keep_best: the last step's adapter
    written = load_file(result.adapter_dir / ADAPTER_FILE)
    last = load_file(result.adapter_dir / "checkpoints" / "checkpoint-2" / ADAPTER_FILE)
    assert all(torch.equal(written[k], last[k]) for k in written)


@pytest.mark.parametrize("option", [{"keep_best": True}, {"early_stopping_patience": 3}])
def test_best_tracking_without_evaluations_is_refused_before_loading(demo, files, option, capsys):
    with pytest.raises(ValueError, match="need validation data: pass --eval-data"):
        _cfg(demo, files, eval_data=None, eval_steps=0, **option)
    with pytest.raises(InvalidArgument, match="need evaluations during training: pass --eval-steps"):
        TrainConfig.from_dict({"data": "d.jsonl", "out": "o", "eval_data": "e.jsonl", **option})
    from qlora_serve.server.cli import main

    flag = ["--keep-best"] if "keep_best" in option else ["--early-stopping-patience", "3"]
    assert main(["train", "--data", str(files["train"]), "--out", str(files["out"]), "--val-fraction", "0.2", *flag]) == 2
    assert "--eval-steps" in capsys.readouterr().err
    assert not files["out"].exists()


# ------------------------------------------------------------- report_to / loss curve
def test_report_to_tensorboard_writes_event_files_under_out_runs(demo, files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_cfg(demo, files, max_steps=2, report_to="tensorboard"))
    runs = result.adapter_dir / "runs"
    assert list(runs.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(runs))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("eval/loss")] == [1, 2]
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(result.log[-2]["loss"], rel=1e-6)


def test_report_to_tensorboard_without_the_package_names_the_pip_command(demo, files, monkeypatch, capsys):
    # A machine without tensorboard: the import system finds neither package.
    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(InvalidArgument, match=r"pip install tensorboard"):
        train(_cfg(demo, files, report_to="tensorboard"))
    assert not files["out"].exists()
    with pytest.raises(ValueError, match="report_to must be one of"):
        _cfg(demo, files, report_to="wandb")


def test_loss_curve_png_is_written_beside_metrics_and_on_a_cancelled_run(demo, files):
    result = train(_cfg(demo, files, max_steps=4, learning_rate=1e-3), callbacks=[StopCallback(after_steps=2)])
    assert result.stopped_early and result.global_step == 2
    png = (result.adapter_dir / LOSS_CURVE_FILE).read_bytes()
    assert png.startswith(PNG_MAGIC) and (result.adapter_dir / "metrics.json").is_file()
    colors = _colors(png)
    assert {TRAIN_BLUE, EVAL_ORANGE, LR_GREEN} <= colors  # train loss, eval loss and the learning rate are drawn
    no_eval = render_loss_curve([e for e in result.log if e.get("event") == "log"])
    assert TRAIN_BLUE in _colors(no_eval) and EVAL_ORANGE not in _colors(no_eval)
    assert render_loss_curve([]).startswith(PNG_MAGIC)  # nothing logged yet: still a PNG (saying so)


def test_a_run_that_fails_mid_training_still_writes_its_curve(demo, files):
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise RuntimeError("boom at step 2")

    with pytest.raises(RuntimeError, match="boom"):
        train(_cfg(demo, files, max_steps=4, eval_steps=0, eval_data=None), callbacks=[Boom()])
    png = (files["out"] / LOSS_CURVE_FILE).read_bytes()
    assert TRAIN_BLUE in _colors(png) and EVAL_ORANGE not in _colors(png)


# ------------------------------------------------------------- fp16
def test_fp16_lora_weights_stay_float32(demo):
    from qlora_serve.training.model import attach_lora, load_quantized_base

    cfg = TrainConfig(base=str(demo.base), compute_dtype="float16", data="d", out="o")
    model = attach_lora(load_quantized_base(str(demo.base), cfg), cfg, ["q_proj", "v_proj"])
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    assert model.base_model.model.config.quantization_config.bnb_4bit_compute_dtype == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; CUDA trains (test_fp16_trains_with_loss_scaling_on_cuda)")
def test_fp16_on_cpu_is_refused_before_loading(demo, files):
    with pytest.raises(InvalidArgument, match="float16 needs a CUDA GPU.*float32"):
        train(_cfg(demo, files, compute_dtype="fp16"))
    assert not files["out"].exists()


@pytest.mark.cuda
def test_fp16_trains_with_loss_scaling_on_cuda(demo, files):
    from transformers import TrainerCallback

    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kw):
            seen["scaler"] = getattr(optimizer, "scaler", None)
            seen["lora"] = {p.dtype for n, p in model.named_parameters() if p.requires_grad}

    result = train(_cfg(demo, files, compute_dtype="float16", learning_rate=1e-3, max_steps=4), callbacks=[Probe()])
    assert seen["scaler"] is not None, "fp16 must train with a GradScaler"
    assert seen["lora"] == {torch.float32}
    losses = [e["loss"] for e in result.log if e.get("event") == "log"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert result.metadata["hyperparameters"]["compute_dtype"] == "float16"


# ------------------------------------------------------------- merge --dtype, shards
@pytest.fixture(scope="module")
def adapter(demo, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    (d / "train.jsonl").write_text(_rows(0, 16))
    cfg = TrainConfig(base=str(demo.base), data=str(d / "train.jsonl"), out=str(d / "adapter"), compute_dtype="float32",
                      max_steps=3, batch_size=4, grad_accum=1, learning_rate=5e-2, progress_bar=False)
    return train(cfg).adapter_dir


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_merge_writes_safetensors_shards_that_load_and_reproduce_greedy_tokens(demo, adapter, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_serve.server.cli import main

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(demo.base), "--adapter", str(adapter), "--out", str(out),
                 "--dtype", dtype, "--max-shard-size", "200KB", "--prompt", "word 3 =", "--max-new-tokens", "8"]) == 0
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 200_000 or len(load_file(p)) == 1 for p in shards)  # one tensor may exceed it
    for p in shards:
        assert {t.dtype for t in load_file(p).values()} == {getattr(torch, dtype)}
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
    assert model.dtype == getattr(torch, dtype)
    ids = tok("word 3 =", return_tensors="pt")
    with torch.no_grad():
        got = model.generate(**ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)[0, ids["input_ids"].shape[1]:].tolist()
    from qlora_serve.training.merge import merge

    ref = merge(str(demo.base), adapter, tmp_path / "ref", prompt="word 3 =", max_new_tokens=8, dtype=dtype)
    assert got == ref.generated_ids and ref.weight_files == ["model.safetensors"]  # default 5GB: one file


def test_merge_bad_shard_size_is_refused_before_loading(demo, adapter, tmp_path, capsys):
    from qlora_serve.server.cli import main

    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--max-shard-size", "5XB"]) == 2
    assert "max_shard_size must be" in capsys.readouterr().err and not (tmp_path / "m").exists()
    with pytest.raises(SystemExit):
        main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "float8"])
