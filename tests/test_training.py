"""Training input handling: config, data, collation. Real files and the real demo
tokenizer/base; every check here must fire before any weights are loaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from qlora_serve.errors import FailedPrecondition, InvalidArgument
from qlora_serve.training.collate import make_collator
from qlora_serve.training.config import TrainConfig
from qlora_serve.training.data import IGNORE_INDEX, load_dataset
from qlora_serve.training.trainer import prepare, train


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def good_data(tmp_path):
    return _jsonl(tmp_path / "train.jsonl", [{"prompt": "one two", "completion": " three"}] * 3)


def _cfg(demo, tmp_path, **kw) -> TrainConfig:
    kw.setdefault("data", str(tmp_path / "train.jsonl"))
    return TrainConfig(base=str(demo.base), out=str(tmp_path / "out"), compute_dtype="float32", **kw)


def _assert_nothing_started(tmp_path):
    # train() creates OUT only after every check passed, right before loading the model.
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_line_is_named(demo, tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, {"text": "also fine"}, '{"text": "broken', {"text": "x"}])
    with pytest.raises(InvalidArgument, match=r"train\.jsonl:3: not valid JSON"):
        train(_cfg(demo, tmp_path))
    _assert_nothing_started(tmp_path)


def test_wrong_record_shape_is_named(demo, tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, {"prompt": "p"}])
    with pytest.raises(InvalidArgument, match=r":2: .*'completion' must be a string"):
        train(_cfg(demo, tmp_path))
    _jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(InvalidArgument, match=r":2: format 'prompt_completion' differs"):
        train(_cfg(demo, tmp_path))


def test_empty_dataset_is_refused(demo, tmp_path):
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(InvalidArgument, match="empty"):
        train(_cfg(demo, tmp_path))
    _assert_nothing_started(tmp_path)


def test_unknown_target_modules_are_refused(demo, tmp_path, good_data):
    with pytest.raises(InvalidArgument, match=r"\['qproj'\] match no Linear layer.*available: .*q_proj"):
        train(_cfg(demo, tmp_path, target_modules=["q_proj", "qproj"]))
    _assert_nothing_started(tmp_path)


def test_default_targets_are_all_linear_but_the_head(demo, tmp_path, good_data):
    run = prepare(_cfg(demo, tmp_path))
    assert run.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "lm_head" not in run.target_modules


def test_unknown_config_key_is_named(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "x.jsonl"\nlora_rank = 8\n')
    with pytest.raises(InvalidArgument, match="unknown key 'lora_rank'"):
        TrainConfig.from_toml(cfg)


@pytest.mark.parametrize("toml,field", [
    ('learning_rate = "1e-4"', "learning_rate"),  # a string where a number belongs
    ("lora_r = 8.5", "lora_r"),
    ('packing = "no"', "packing"),
    ("name = 7", "name"),
    ("lora_alpha = true", "lora_alpha"),
])
def test_wrong_value_type_is_invalid_argument_naming_the_field(tmp_path, capsys, toml, field):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "x.jsonl"\n{toml}\n')
    with pytest.raises(InvalidArgument, match=f"{field} must be"):
        TrainConfig.from_toml(cfg)
    # The CLI prints it as a usage error (exit 2), not a traceback.
    from qlora_serve.server.cli import main

    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert f"{field} must be" in capsys.readouterr().err
    # Integers are fine floats; paths are fine paths.
    assert TrainConfig.from_dict({"learning_rate": 1, "data": tmp_path / "x.jsonl"}).learning_rate == 1


def test_register_with_modules_to_save_is_refused_before_training(demo, tmp_path, good_data):
    with pytest.raises(InvalidArgument, match="modules_to_save.*register"):
        TrainConfig.from_dict({"modules_to_save": "lm_head", "register": "localhost:1"}, source="command line")
    from qlora_serve.server.cli import main

    assert main(["train", "--base", str(demo.base), "--data", str(good_data), "--out", str(tmp_path / "out"),
                 "--modules-to-save", "lm_head", "--register", "localhost:1"]) == 2
    _assert_nothing_started(tmp_path)
    TrainConfig(modules_to_save=["lm_head"])  # without --register it may be trained (and merged)


def test_missing_base_path_is_refused(tmp_path, good_data):
    cfg = TrainConfig(base=str(tmp_path / "no-such-model"), data=str(good_data), out=str(tmp_path / "out"))
    with pytest.raises(InvalidArgument, match="no-such-model does not exist"):
        train(cfg)
    _assert_nothing_started(tmp_path)


def test_unknown_compute_dtype_is_refused_naming_the_choices():
    # float16 is accepted (loss scaling on CUDA; refused on CPU, see test_training_options.py).
    assert TrainConfig(compute_dtype="fp16").compute_dtype == "float16"
    with pytest.raises(InvalidArgument, match="compute_dtype must be one of"):
        TrainConfig.from_dict({"compute_dtype": "float8"})


@pytest.mark.parametrize(
    "field,value", [("lora_r", 0), ("lora_dropout", 1.0), ("warmup_ratio", -0.1), ("optim", "adamw"), ("max_steps", 0)]
)
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_resume_without_checkpoint_is_refused(demo, tmp_path, good_data):
    with pytest.raises(InvalidArgument, match="no checkpoint"):
        train(_cfg(demo, tmp_path, resume=True))


def test_register_with_no_server_fails_before_training(demo, tmp_path, good_data):
    with pytest.raises(FailedPrecondition, match="no qlora-serve server answers"):
        train(_cfg(demo, tmp_path, register="localhost:1"))
    _assert_nothing_started(tmp_path)


def test_cli_flags_match_config_keys_and_override_the_file(tmp_path):
    from qlora_serve.training.cli import add_merge_parser, add_train_parser, config_from_args

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_train_parser(sub)
    add_merge_parser(sub)
    train_parser = sub.choices["train"]
    flags = {a.dest for a in train_parser._actions}
    assert set(TrainConfig.field_names()) <= flags
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('data = "d.jsonl"\nout = "o"\nlora_r = 4\npacking = false\ntarget_modules = ["q_proj"]\n')
    args = parser.parse_args(["train", "--config", str(cfg_file), "--lora-r", "8", "--target-modules", "q_proj,v_proj"])
    cfg = config_from_args(args)
    assert (cfg.lora_r, cfg.packing, cfg.target_modules, cfg.data) == (8, False, ["q_proj", "v_proj"], "d.jsonl")
    assert callable(args.func)
    bad = parser.parse_args(["train", "--compute-dtype", "float8"])
    assert bad.func(bad) == 2  # refused with a message, exit code 2


def _tokenizer_with_pad_eq_eos(demo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.base)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


@pytest.mark.parametrize("packing", [False, True])
def test_eos_label_survives_pad_equal_eos(demo, tmp_path, packing):
    tok = _tokenizer_with_pad_eq_eos(demo)
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "one two", "completion": " three"},
                                         {"prompt": "hello", "completion": " world, this is a longer answer"}])
    ds = load_dataset(data, tok, max_seq_len=64)
    batch = make_collator(tok, packing)([ds[0], ds[1]])
    eos = tok.eos_token_id
    labels, ids = batch["labels"], batch["input_ids"]
    for row in range(labels.shape[0]):
        # Every example's real last token is eos and is a training target.
        real = batch["attention_mask"][row].bool() if "attention_mask" in batch else slice(None)
        assert (labels[row][real] == eos).sum() == (2 if packing else 1)
    if not packing:
        # The short row is padded with pad == eos ids, but those are masked by position.
        short = int(batch["attention_mask"].sum(1).argmin())
        pad_pos = ~batch["attention_mask"][short].bool()
        assert pad_pos.any() and (ids[short][pad_pos] == eos).all() and (labels[short][pad_pos] == IGNORE_INDEX).all()


def test_prompt_is_masked_and_completion_trained(demo, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.base)
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Question: what is", "completion": " Paris."}])
    ex = load_dataset(data, tok, max_seq_len=64).examples[0]
    n_prompt = len(tok("Question: what is")["input_ids"])
    assert ex.input_ids[:n_prompt] == tok("Question: what is")["input_ids"]  # as at inference
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.labels[-1] == tok.eos_token_id


def test_messages_plain_format_trains_assistant_turns_only(demo, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.base)
    tok.chat_template = None  # without a template the documented plain format applies
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "world"}]
    ex = load_dataset(_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]), tok, 128).examples[0]

    def ids(text):  # compared as ids: the demo's word-level decoder puts spaces between words
        return tok(text, add_special_tokens=False)["input_ids"]

    eos = tok.eos_token_id
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert trained == ids("hello") + [eos] + ids("world") + [eos]
    assert ex.input_ids[:len(ids("user: hi\nassistant: hello")) + 1] == ids("user: hi\nassistant: hello") + [eos]


def test_messages_with_chat_template(demo, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.base)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ex = load_dataset(_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]), tok, 128).examples[0]
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    # The generation prompt "<s>assistant\n" is context, not target.
    assert trained == tok("hello", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids[-1] == tok.eos_token_id and ex.input_ids.count(tok.eos_token_id) == 2


def test_truncation_is_counted(demo, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.base)
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "one two three four five six seven eight nine ten"}, {"text": "one"}])
    ds = load_dataset(data, tok, max_seq_len=4)
    full = len(tok("one two three four five six seven eight nine ten")["input_ids"]) + 1
    assert ds.truncated_examples == 1 and ds.truncated_tokens == full - 4
    assert all(len(e.input_ids) <= 4 for e in ds.examples)
