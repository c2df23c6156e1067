"""Issue 13: several --data files mixed by --data-weights, and --chat-template.

Real files, the real demo tokenizer and base: the CLI and TOML spellings, the
documented sampling rule (counts, repeats, seeding), per-file formats, the metadata
and resume records, refusals before the model loads, and one short real training
run on two weighted files with a template override whose adapter directory carries
the template."""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from qlora_serve.errors import FailedPrecondition, InvalidArgument
from qlora_serve.training.chat_template import TEMPLATE_FILE, check_job_chat_template
from qlora_serve.training.config import TrainConfig
from qlora_serve.training.data import file_digest
from qlora_serve.training.mixing import load_training_data
from qlora_serve.training.trainer import prepare, train

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant says {% endif %}")
MSGS = [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three four"}]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    """a: 10 prompt/completion records; b (a name with ',' and ':'): 4 sharegpt records; all distinct."""
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"one {'two ' * i}", "completion": " three"} for i in range(10)])
    b = _jsonl(tmp_path / "b,c:d.jsonl", [{"conversations": [{"from": "human", "value": "one" + " two" * i},
                                                             {"from": "gpt", "value": "four"}]} for i in range(4)])
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def tok(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.base)


def _cfg(demo, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(base=str(demo.base), out=str(tmp_path / "out"), compute_dtype="float32", **kw)


def _parser():
    from qlora_serve.training.cli import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    return parser


# ---------------------------------------------------------------- spellings
def test_cli_repeats_data_and_toml_takes_arrays_or_one_string(tmp_path):
    from qlora_serve.training.cli import config_from_args

    args = _parser().parse_args(["train", "--data", "a.jsonl", "--data", "b,c:d.jsonl", "--data-weights", "0.7,0.3",
                                 "--chat-template", "t.jinja"])
    cfg = config_from_args(args)
    assert (cfg.data, cfg.data_weights, cfg.chat_template) == (["a.jsonl", "b,c:d.jsonl"], [0.7, 0.3], "t.jinja")
    one = config_from_args(_parser().parse_args(["train", "--data", "x,y.jsonl"]))
    assert one.data == "x,y.jsonl" and one.data_files == ["x,y.jsonl"]  # one file: a string, as before
    toml = tmp_path / "run.toml"
    toml.write_text('data = ["a.jsonl", "b.parquet"]\ndata_weights = [7, 3]\nchat_template = "{{ messages }}"\n')
    cfg = TrainConfig.from_toml(toml)
    assert (cfg.data, cfg.data_weights, cfg.chat_template) == (["a.jsonl", "b.parquet"], [7.0, 3.0], "{{ messages }}")
    toml.write_text('data = "a.jsonl"\n')
    assert TrainConfig.from_toml(toml).data == "a.jsonl"
    assert TrainConfig(data=["only.jsonl"]).data == "only.jsonl"


@pytest.mark.parametrize("values,named", [
    (dict(data=["a", "b"], data_weights=[1.0]), "data_weights has 1 value.*data names 2 file"),
    (dict(data="a", data_weights=[0.5, 0.5]), "data_weights has 2 value.*data names 1 file"),
    (dict(data=["a", "b"], data_weights=[1.0, 0.0]), "data_weights must all be finite numbers > 0"),
    (dict(data=["a", "b"], data_weights=[1.0, -2]), "data_weights must all be finite numbers > 0"),
    (dict(data=["a", "b"], data_weights=[1.0, float("inf")]), "data_weights must all be finite numbers > 0"),
    (dict(data=["a", "b"], data_weights="0.5,x"), "data_weights must be comma-separated numbers"),
    (dict(data=["a", "b"], data_weights=[True, 1]), "data_weights must be a list of numbers"),
    (dict(data=["a", "a"]), "data lists 'a' twice"),
    (dict(data=["a", 3]), "data must be a path or a list of paths"),
    (dict(data=5), "data must be a path or a list of paths"),
    (dict(data="a", chat_template=" "), "chat_template is empty"),
])
def test_bad_data_lists_and_weights_are_refused_naming_the_field(values, named):
    with pytest.raises(InvalidArgument, match=f"config: {named}"):
        TrainConfig.from_dict(values)


def test_cli_weight_mismatch_exits_2_before_anything_loads(demo, tmp_path, files, capsys):
    from qlora_serve.server.cli import main

    code = main(["train", "--base", str(demo.base), "--data", str(files["a"]), "--data", str(files["b"]),
                 "--data-weights", "1,2,3", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "data_weights has 3 value(s) but data names 2 file(s)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the mix
def test_without_weights_every_file_is_taken_once_each_in_its_own_format(demo, tmp_path, files, tok):
    train_set, _ = load_training_data(_cfg(demo, tmp_path, data=[str(files["a"]), str(files["b"])]), tok)
    a, _ = load_training_data(_cfg(demo, tmp_path, data=str(files["a"])), tok)
    b, _ = load_training_data(_cfg(demo, tmp_path, data=str(files["b"])), tok)
    assert [e.input_ids for e in train_set.examples] == [e.input_ids for e in a.examples + b.examples]
    assert train_set.format == "mixed" and [(s["format"], s["taken"], s["weight"]) for s in train_set.sources] == [
        ("prompt_completion", 10, None), ("messages", 4, None)]
    assert [s["sha256"] for s in train_set.sources] == [file_digest(files["a"]), file_digest(files["b"])]


def test_one_file_is_exactly_as_before(demo, tmp_path, files, tok):
    from qlora_serve.training.data import load_dataset

    run = prepare(_cfg(demo, tmp_path, data=[str(files["a"])], val_fraction=0.2))
    alone = load_dataset(files["a"], tok, 1024)
    assert run.config.data == str(files["a"]) and run.train_data.digest == file_digest(files["a"])
    assert {tuple(e.input_ids) for e in run.train_data.examples + run.eval_data.examples} == {
        tuple(e.input_ids) for e in alone.examples}
    assert len(run.eval_data) == 2 and run.train_data.sources[0]["validation"] == 2


def test_weights_set_each_files_share_with_the_documented_counts(demo, tmp_path, files, tok):
    data = [str(files["a"]), str(files["b"])]
    mixed, _ = load_training_data(_cfg(demo, tmp_path, data=data, data_weights=[0.3, 0.7]), tok)
    # T = 14 examples; a: round(0.3 * 14) = 4 of its 10 (no repeats); b: round(0.7 * 14) = 10 of its 4:
    # every example twice (10 // 4) plus 2 (10 % 4) drawn without replacement.
    assert [(s["examples"], s["taken"], s["weight"]) for s in mixed.sources] == [(10, 4, 0.3), (4, 10, 0.7)]
    a_part, b_part = mixed.examples[:4], mixed.examples[4:]
    assert len({tuple(e.input_ids) for e in a_part}) == 4
    b_counts = Counter(tuple(e.input_ids) for e in b_part)
    assert len(b_counts) == 4 and sorted(b_counts.values()) == [2, 2, 3, 3]
    assert len(mixed) == 14 and mixed.label_tokens == sum(sum(x != -100 for x in e.labels) for e in mixed.examples)
    # Seeded: the same seed draws the same examples, another seed other ones.
    again, _ = load_training_data(_cfg(demo, tmp_path, data=data, data_weights=[3, 7]), tok)
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in mixed.examples]
    draws = {tuple(tuple(e.input_ids) for e in load_training_data(
        _cfg(demo, tmp_path, data=data, data_weights=[0.3, 0.7], seed=s), tok)[0].examples[:4]) for s in range(6)}
    assert len(draws) > 1
    # The mix's digest covers files, order and shares: each change is another training set.
    digests = {mixed.digest}
    for other in (dict(data=data, data_weights=[0.5, 0.5]), dict(data=data[::-1], data_weights=[0.7, 0.3]),
                  dict(data=data)):
        digests.add(load_training_data(_cfg(demo, tmp_path, **other), tok)[0].digest)
    assert len(digests) == 4 and again.digest == mixed.digest


def test_validation_split_of_a_mix_never_repeats_held_out_examples(demo, tmp_path, files, tok):
    run = prepare(_cfg(demo, tmp_path, data=[str(files["a"]), str(files["b"])], data_weights=[1, 3], val_fraction=0.3))
    held = {tuple(e.input_ids) for e in run.eval_data.examples}
    assert len(held) == len(run.eval_data) == round(0.3 * 14)
    assert not held & {tuple(e.input_ids) for e in run.train_data.examples}
    assert sum(s["validation"] for s in run.train_data.sources) == len(held)
    assert len(run.train_data) == sum(s["taken"] for s in run.train_data.sources)


def test_a_bad_file_in_the_list_is_named_before_the_model_loads(demo, tmp_path, files):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"prompt": "no completion"}])
    with pytest.raises(InvalidArgument, match=r"bad.jsonl:2: 'completion' must be a string"):
        train(_cfg(demo, tmp_path, data=[str(files["a"]), str(bad)], data_weights=[1, 1]))
    with pytest.raises(InvalidArgument, match=r"data file .*missing.jsonl does not exist"):
        train(_cfg(demo, tmp_path, data=[str(files["a"]), str(tmp_path / "missing.jsonl")]))
    # Two one-example files, half held out: one file would be left with nothing to mix.
    ones = [str(_jsonl(tmp_path / f"{w}.jsonl", [{"text": w}])) for w in ("one", "two")]
    with pytest.raises(InvalidArgument, match=r"val_fraction=0.5 holds out every example of .*(one|two).jsonl"):
        prepare(_cfg(demo, tmp_path, data=ones, val_fraction=0.5))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- chat template
def test_chat_template_file_or_inline_renders_the_messages(demo, tmp_path, files, tok):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    msgs = _jsonl(tmp_path / "m.jsonl", [{"messages": MSGS}])
    for value in (str(tmp_path / "t.jinja"), TEMPLATE):
        run = prepare(_cfg(demo, tmp_path, data=str(msgs), chat_template=value))
        assert run.tokenizer.chat_template == TEMPLATE
        served = run.tokenizer(run.tokenizer.apply_chat_template(MSGS[:1], tokenize=False, add_generation_prompt=True))
        ex = run.train_data.examples[0]
        assert ex.input_ids[:len(served["input_ids"])] == served["input_ids"]
        assert ex.labels[:len(served["input_ids"])] == [-100] * len(served["input_ids"])  # the prompt is context
    plain = prepare(_cfg(demo, tmp_path, data=str(msgs)))
    assert plain.train_data.examples[0].input_ids != run.train_data.examples[0].input_ids  # the override was used


@pytest.mark.parametrize("template,named", [
    ("{% for m in messages %}{{ m['content'] }", r"does not render a sample conversation \(template line 1\): "
                                                 r"TemplateSyntaxError"),
    ("{% for m in messages %}{{ m['content'] | nosuch }}{% endfor %}", "TemplateAssertionError: No filter named"),
    ("{{ raise_exception('roles must alternate') }}", "TemplateError: roles must alternate"),
    ("{% for m in messages %}{{ m['text'] }}{% endfor %}", "leaves the messages' content out"),
])
def test_broken_chat_template_names_the_file_and_the_jinja_error_before_the_model_loads(
        demo, tmp_path, files, template, named):
    path = tmp_path / "broken.jinja"
    path.write_text(template)
    with pytest.raises(InvalidArgument, match=f"chat_template file {path} .*{named}"):
        train(_cfg(demo, tmp_path, data=str(files["b"]), chat_template=str(path)))
    with pytest.raises(InvalidArgument, match=r"chat_template \(inline text\)"):
        train(_cfg(demo, tmp_path, data=str(files["b"]), chat_template=template))
    assert not (tmp_path / "out").exists()


def test_unreadable_chat_template_files_are_refused(demo, tmp_path, files):
    cases = {"missing.jinja": (None, "does not exist"), "latin1.jinja": (b"{{ caf\xe9 }}", "not UTF-8 text"),
             "empty.jinja": (b"\n", "is empty"), "huge.jinja": (b"x" * (2 << 20), "is at most")}
    for name, (body, named) in cases.items():
        if body is not None:
            (tmp_path / name).write_bytes(body)
        with pytest.raises(InvalidArgument, match=f"chat_template file .*{name}.*{named}"):
            prepare(_cfg(demo, tmp_path, data=str(files["a"]), chat_template=str(tmp_path / name)))
    with pytest.raises(InvalidArgument, match=r"chat_template \(inline text\) has over 1048576 bytes"):
        prepare(_cfg(demo, tmp_path, data=str(files["a"]), chat_template="{{ x }}" * (1 << 18)))


def test_job_chat_template_is_the_text_never_a_server_path(tok, tmp_path):
    check_job_chat_template(TEMPLATE, tok)
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    with pytest.raises(InvalidArgument, match="not a path: a path would name a file on the server"):
        check_job_chat_template(str(tmp_path / "t.jinja"), tok)
    with pytest.raises(InvalidArgument, match="does not render"):
        check_job_chat_template("{% if %}", tok)


# ---------------------------------------------------------------- a real run
def test_two_weighted_files_train_and_the_adapter_carries_the_template(demo, tmp_path, files):
    from transformers import AutoTokenizer

    (tmp_path / "t.jinja").write_text(TEMPLATE)
    steps = dict(max_steps=2, save_steps=2, logging_steps=1, batch_size=2, grad_accum=1, lora_r=4,
                 progress_bar=False, gradient_checkpointing=False)
    data = [str(files["a"]), str(files["b"])]
    result = train(_cfg(demo, tmp_path, data=data, data_weights=[0.3, 0.7], chat_template=str(tmp_path / "t.jinja"),
                        **steps))
    out = tmp_path / "out"
    assert result.global_step == 2 and result.train_loss is not None
    meta = result.metadata
    assert meta["dataset"]["path"] == data and meta["dataset"]["examples"] == 14
    assert [(f["path"], f["format"], f["taken"], f["weight"]) for f in meta["dataset"]["files"]] == [
        (data[0], "prompt_completion", 4, 0.3), (data[1], "messages", 10, 0.7)]
    assert json.loads((out / "qlora_serve_metadata.json").read_text())["dataset"]["files"][1]["sha256"] == \
        file_digest(files["b"])
    # The adapter directory carries the template: a tokenizer given it renders what training rendered.
    assert (out / TEMPLATE_FILE).read_text() == TEMPLATE
    assert meta["chat_template"]["source"] == str(tmp_path / "t.jinja") and len(meta["chat_template"]["sha256"]) == 64
    served = AutoTokenizer.from_pretrained(demo.base)
    served.chat_template = (out / TEMPLATE_FILE).read_text()
    run = prepare(_cfg(demo, tmp_path, data=data, data_weights=[0.3, 0.7], chat_template=str(tmp_path / "t.jinja")))
    conv = [{"role": "user", "content": "one two two"}, {"role": "assistant", "content": "four"}]
    prompt = served(served.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True))["input_ids"]
    assert any(e.input_ids[:len(prompt)] == prompt for e in run.train_data.examples[4:])
    # Another mix or another template is a data change for --resume (checkpoint-2 is on disk).
    same = dict(data=data, data_weights=[0.3, 0.7], chat_template=str(tmp_path / "t.jinja"), resume=True, **steps)
    for change, named in ((dict(data_weights=[0.5, 0.5]), r"data_sha256.*data_weights: \[0.3, 0.7\] -> \[0.5, 0.5\]"),
                          (dict(data=data[::-1], data_weights=[0.7, 0.3]), "data_sha256"),
                          (dict(chat_template=TEMPLATE.replace("says", "said")), "chat_template_sha256")):
        with pytest.raises(FailedPrecondition, match=f"cannot resume: .*{named}"):
            prepare(_cfg(demo, tmp_path, **{**same, **change}))
    # The same files, weights and template (given inline now) resume fine.
    prepare(_cfg(demo, tmp_path, **{**same, "chat_template": TEMPLATE}))
    # A merged model chats with the adapter's template.
    from qlora_serve.training.merge import merge

    merged = merge(str(demo.base), out, tmp_path / "merged", max_new_tokens=2)
    assert AutoTokenizer.from_pretrained(merged.out_dir).chat_template == TEMPLATE
    # A later run into the same OUT without a template leaves none behind (it would be served).
    shutil.rmtree(out / "checkpoints")
    train(_cfg(demo, tmp_path, data=data, data_weights=[0.3, 0.7], **{**steps, "max_steps": 1}))
    assert not (out / TEMPLATE_FILE).exists()
