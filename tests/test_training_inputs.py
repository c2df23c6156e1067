"""Issue 13: refusals before training (lm_head, typos, gzip / non-UTF-8 / save_to_disk
data, unknown keys), the record formats (alpaca, sharegpt, JSON array, CSV, JSONL.gz),
train-on-inputs, the validation split, bos handling with chat templates, and the
adapter directory staying exactly PEFT's. Real files, the real demo tokenizer and base."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from qlora_serve.errors import InvalidArgument
from qlora_serve.training.config import TrainConfig
from qlora_serve.training.data import IGNORE_INDEX, load_dataset, read_jsonl
from qlora_serve.training.trainer import prepare, train


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(demo, tmp_path, **kw) -> TrainConfig:
    kw.setdefault("data", str(tmp_path / "train.jsonl"))
    return TrainConfig(base=str(demo.base), out=str(tmp_path / "out"), compute_dtype="float32", **kw)


@pytest.fixture()
def tok(demo):
    """The demo tokenizer without its chat template: messages use the plain format."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.base)
    tok.chat_template = None
    return tok


@pytest.fixture()
def good_data(tmp_path):
    return _jsonl(tmp_path / "train.jsonl", [{"prompt": "one two", "completion": " three"}] * 4)


# ---------------------------------------------------------------- defect 1, 7
@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["lm_head"]])
def test_output_head_in_target_modules_is_refused_before_training(demo, tmp_path, good_data, targets):
    with pytest.raises(InvalidArgument, match=r"\['lm_head'\] is the output head.*cannot serve"):
        train(_cfg(demo, tmp_path, target_modules=targets))
    assert not (tmp_path / "out").exists()


def test_target_module_typo_names_the_closest(demo, tmp_path, good_data):
    with pytest.raises(InvalidArgument, match=r"\['q_projj'\] match no Linear layer.*did you mean 'q_proj'"):
        prepare(_cfg(demo, tmp_path, target_modules=["q_projj"]))


def test_all_linear_is_every_linear_but_the_head(demo, tmp_path, good_data):
    run = prepare(_cfg(demo, tmp_path, target_modules="all-linear"))
    assert run.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(InvalidArgument, match="all-linear.*alone"):
        prepare(_cfg(demo, tmp_path, target_modules="all-linear,q_proj"))


# ---------------------------------------------------------------- defect 4, 5
def test_non_utf8_data_is_a_clear_cli_error(demo, tmp_path, capsys):
    from qlora_serve.server.cli import main

    (tmp_path / "train.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert main(["train", "--base", str(demo.base), "--data", str(tmp_path / "train.jsonl"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2: not UTF-8 text (byte 0xe9)" in err and "Traceback" not in err


def test_gzipped_jsonl_is_read(demo, tmp_path, tok):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "one two", "completion": " three"}\n' * 2))
    ds = load_dataset(path, tok, 64)
    assert ds.format == "prompt_completion" and len(ds) == 2
    # A truncated gzip stream is a data error naming the file, not a traceback.
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:30])
    with pytest.raises(InvalidArgument, match="bad.jsonl.gz"):
        read_jsonl(bad)


def test_save_to_disk_folder_and_parquet_are_read(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "add", "input": "one", "output": "two"}, {"instruction": "say hi", "input": None, "output": "hello"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hfdict"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for path in (tmp_path / "hf", tmp_path / "hfdict", tmp_path / "d.parquet"):
        ds = load_dataset(path, tok, 64)
        assert len(ds) == 2 and _trained(tok, ds.examples[1]) == _ids(tok, "hello", eos=True) and len(ds.digest) == 64
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(InvalidArgument, match="without a 'train' split"):
        read_jsonl(tmp_path / "notrain")


def test_broken_dataset_folder_is_a_precise_error_not_missing(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    with pytest.raises(InvalidArgument) as exc:
        read_jsonl(folder)
    assert "does not exist" not in str(exc.value) and str(folder) in str(exc.value)
    with pytest.raises(InvalidArgument, match="is a directory; pass a JSONL"):
        read_jsonl(tmp_path / "hf" / ".." / "hf" / "..")


# ---------------------------------------------------------------- defect 9
def test_unknown_key_suggests_the_closest_and_hides_server_keys():
    with pytest.raises(InvalidArgument) as exc:
        TrainConfig.from_dict({"lora_rank": 8}, source="config_toml", hidden=("data", "out", "base"))
    msg = str(exc.value)
    assert "did you mean 'lora_r'?" in msg
    valid = msg.split("valid keys are: ")[1].split(", ")
    assert "lora_r" in valid and not {"data", "out", "base"} & set(valid)


# ---------------------------------------------------------------- defect 11
def test_chat_template_training_prefix_equals_serving_encoding(demo, tmp_path, tok):
    from tokenizers import processors

    # A tokenizer that adds bos (as Llama's do) with a template that does not write it.
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ex = load_dataset(_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]), tok, 128).examples[0]
    rendered = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    served = tok(rendered)["input_ids"]  # how the server encodes a text prompt
    assert ex.input_ids[:len(served)] == served and served[0] == tok.bos_token_id
    # A template that writes bos itself gets no second one.
    tok.chat_template = "<s>" + tok.chat_template
    ex = load_dataset(_jsonl(tmp_path / "e.jsonl", [{"messages": msgs}]), tok, 128).examples[0]
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[1] != tok.bos_token_id


# ---------------------------------------------------------------- formats
def _trained(tok, ex) -> list[int]:
    """The token ids the example trains on (compared as ids: the demo's word-level
    decoder puts spaces between words)."""
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]


def _ids(tok, text: str, eos: bool = False) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])


def _starts_with(tok, ex, text: str) -> bool:
    want = _ids(tok, text)
    ids = [t for t in ex.input_ids if t != tok.bos_token_id]
    return ids[:len(want)] == want


def test_alpaca_and_sharegpt_are_detected_and_train_the_answer(tmp_path, tok):
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "add", "input": "one two", "output": "three"},
                                            {"instruction": "say hi", "output": "hello"}])
    ds = load_dataset(alpaca, tok, 128)
    assert ds.format == "messages" and _trained(tok, ds.examples[0]) == _ids(tok, "three", eos=True)
    assert _starts_with(tok, ds.examples[0], "user: add\n\none two\nassistant: three")
    share = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "be brief"},
                                                             {"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "hello"}]}])
    ds = load_dataset(share, tok, 128)
    assert _trained(tok, ds.examples[0]) == _ids(tok, "hello", eos=True)
    assert _starts_with(tok, ds.examples[0], "system: be brief\nuser: hi\nassistant: hello")
    bad = _jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(InvalidArgument, match=r"b.jsonl:1: conversations\[0\] must be"):
        read_jsonl(bad)


def test_ambiguous_record_needs_format_and_format_selects(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "one two three", "prompt": "one", "completion": " two"}])
    with pytest.raises(InvalidArgument, match=r"fit formats \['prompt_completion', 'text'\]; pass --format"):
        read_jsonl(path)
    assert read_jsonl(path, "text")[0] == "text"
    assert _trained(tok, load_dataset(path, tok, 64, fmt="prompt_completion").examples[0]) == _ids(tok, " two", eos=True)
    with pytest.raises(ValueError, match="format must be one of"):
        TrainConfig(format="yaml")


def test_json_array_and_csv_files(tmp_path, tok):
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"prompt": "one", "completion": " two"}] * 3))
    assert len(load_dataset(arr, tok, 64)) == 3
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('instruction,input,output\nadd,"one, two",three\nsay hi,,hello\n')
    ds = load_dataset(csv_path, tok, 64, fmt="alpaca")
    assert len(ds) == 2 and _trained(tok, ds.examples[1]) == _ids(tok, "hello", eos=True)
    bad = tmp_path / "e.csv"
    bad.write_text("prompt,completion\none,\n")
    with pytest.raises(InvalidArgument, match=r"e.csv:2: 'completion' is empty"):
        read_jsonl(bad)


def test_train_on_inputs_puts_loss_on_the_prompt(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "one two", "completion": " three"}])
    masked = load_dataset(path, tok, 64).examples[0]
    full = load_dataset(path, tok, 64, train_on_inputs=True).examples[0]
    assert masked.input_ids == full.input_ids
    assert IGNORE_INDEX in masked.labels and full.labels == full.input_ids


def test_val_fraction_holds_out_a_seeded_split(demo, tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"prompt": f"one {'two ' * i}", "completion": " three"} for i in range(10)])
    run = prepare(_cfg(demo, tmp_path, val_fraction=0.2))
    again = prepare(_cfg(demo, tmp_path, val_fraction=0.2))
    assert (len(run.train_data), len(run.eval_data)) == (8, 2)
    assert [e.input_ids for e in run.eval_data.examples] == [e.input_ids for e in again.eval_data.examples]
    train_ids = {tuple(e.input_ids) for e in run.train_data.examples}
    assert not train_ids & {tuple(e.input_ids) for e in run.eval_data.examples}
    with pytest.raises(ValueError, match="val_fraction and eval_data are exclusive"):
        _cfg(demo, tmp_path, val_fraction=0.2, eval_data="x.jsonl")
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 0.5\]"):
        TrainConfig(val_fraction=0.9)
