"""A tenant's chat template renders within bounds (qlora_serve.chat_render), wherever the
server runs it: a job's `chat_template` at submit (training/chat_template.py), an
adapter's `chat_template.jinja` at registration (adapters/registry.py) and on every chat
request to that adapter (server/engine/chat.py). Jinja's sandbox alone caps only
range(): these templates took seconds and hundreds of MB, or pinned the thread forever.
Real Jinja, the demo base's real tokenizer, a real registry server in-process."""

from __future__ import annotations

import shutil

import pytest

from qlora_serve.errors import InvalidArgument
from qlora_serve.server.engine.chat import render_chat
from qlora_serve.training.chat_template import check_job_chat_template

# Each would hang the render, or build a string of hundreds of MB, without the bounds.
BOMBS = {
    "repeat": "{{ 'x' * (3*10**8) }}",
    "nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "replace": "{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}",
    "format width": "{{ '%0999999999d' % 1 }}",
    "doubling": "{% set ns = namespace(s='xx') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
}
ECHO = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
LIMIT = "TemplateLimit|exceeds the server's bounds"


@pytest.fixture(scope="module")
def tok(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.base)


def _triggered(bomb: str) -> str:
    """A template that renders the sample chats fine and explodes on one message."""
    return "{% if messages[-1]['content'] == 'boom' %}" + BOMBS[bomb] + "{% endif %}" + ECHO


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_jobs_template_over_the_bounds_is_refused_at_submit(tok, bomb):
    with pytest.raises(InvalidArgument, match=r"chat_template \(inline text\) does not render.*TemplateLimit"):
        check_job_chat_template(ECHO + BOMBS[bomb], tok)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_an_adapters_template_is_bounded_on_every_chat_request(tok, bomb):
    template = _triggered(bomb)
    with pytest.raises(InvalidArgument, match=LIMIT):
        render_chat(tok, [("user", "boom")], template=template)
    msgs = [{"role": "user", "content": "hi"}]  # the same template still serves other chats
    assert render_chat(tok, msgs, template=template) == tok.apply_chat_template(
        msgs, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_the_bounded_renderer_gives_apply_chat_templates_tokens(tok):
    """The base's own (real-world) template, rendered as a tenant's: the same token ids."""
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi <b>there</b>"}, {"role": "user", "content": "and you?"}]
    template = tok.chat_template
    assert template
    assert render_chat(tok, msgs, template=template) == tok.apply_chat_template(
        msgs, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.timeout(120)
def test_registration_test_renders_the_adapters_template(demo, tmp_path):
    from qlora_serve.server.app import QloraServer, ServerConfig

    server = QloraServer(ServerConfig(role="registry", base=str(demo.base), port=0, metrics_port=None,
                                      http_port=None, data_dir=tmp_path / "registry", compute_dtype="float32"))
    server.start().load()
    try:
        reg = server.runtime.registry
        adapter = tmp_path / "templated"
        shutil.copytree(demo.adapters["poet"], adapter)
        for bomb in ("repeat", "nested loops"):
            (adapter / "chat_template.jinja").write_text(ECHO + BOMBS[bomb])
            with pytest.raises(InvalidArgument, match="chat_template.jinja exceeds the server's bounds on a sample"):
                reg.register_path("bomb", adapter, trusted=True)
        (adapter / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
        with pytest.raises(InvalidArgument, match=r"chat_template.jinja is not a valid Jinja template \(line 1\)"):
            reg.register_path("bomb", adapter, trusted=True)
        assert reg.list(name="bomb") == []
        (adapter / "chat_template.jinja").write_text(_triggered("nested loops"))  # the sample renders: accepted
        assert reg.register_path("bomb", adapter, trusted=True).version == 1
    finally:
        server.stop(0)
