"""The embedded demo reads: greedy output of the base and of the `pirate` / `poet`
adapters, served by a real server, is plain words in three visibly different
styles; the CLI escapes control characters before they reach a terminal."""

from __future__ import annotations

import re

import pytest

from qlora_serve.server.cli_checks import terminal_text
from qlora_serve.server.demo_corpus import ACTIONS, OPENERS, PLACES, SUBJECTS, TIMES

PROMPTS = ["hello", "the little cat"]
# Lower-case words and the corpus's punctuation, single spaces: what the word-level
# tokenizer's decoder writes. A byte-level random model fails this at once.
READABLE = re.compile(r"[a-z,.!?:]+( [a-z,.!?:]+)*")


def _style_words(style: int) -> set[str]:
    """Words that only the given style's variants use (1 = pirate, 2 = poet)."""
    own: set[str] = set()
    other: set[str] = set()
    for group in (SUBJECTS, ACTIONS, PLACES, TIMES, OPENERS):
        for variants in group:
            for i, text in enumerate(variants):
                (own if i == style else other).update(text.split())
    return own - other


@pytest.fixture(scope="module")
def outputs(start_server):
    """{(prompt, adapter): greedy text} from a real server with the demo adapters."""
    from qlora_serve.server.client import Client

    server = start_server()
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        return {(p, a): c.generate(p, adapter=a, max_new_tokens=16).text for p in PROMPTS for a in ("", "pirate", "poet")}


def test_demo_output_is_readable_words(outputs):
    for key, text in outputs.items():
        assert "\ufffd" not in text and not re.search(r"[\x00-\x1f\x7f-\x9f]", text), (key, text)
        assert READABLE.fullmatch(text.strip()), (key, text)
        assert len(text.split()) >= 8, (key, text)  # 16 tokens: words, not empty strings


def test_demo_adapters_have_their_own_style(outputs):
    pirate, poet = _style_words(1), _style_words(2)
    assert {"matey", "arr", "be"} <= pirate and {"gentle", "moon"} <= poet  # the corpus is what we think
    for p in PROMPTS:
        base, pir, poe = outputs[(p, "")], outputs[(p, "pirate")], outputs[(p, "poet")]
        assert len({base, pir, poe}) == 3, (base, pir, poe)
        assert set(re.findall(r"[a-z]+", pir)) & pirate, pir
        assert set(re.findall(r"[a-z]+", poe)) & poet, poe
    assert not set(re.findall(r"[a-z]+", outputs[("hello", "")])) & (pirate | poet), outputs[("hello", "")]


def test_terminal_text_escapes_control_characters():
    assert terminal_text("a\x1b[31mb\r\x07\x9b\u202ec\x7f") == "a\\x1b[31mb\\r\\x07\\x9b\\u202ec\\x7f"
    assert terminal_text("line one\n\tline two, é ü 日本") == "line one\n\tline two, é ü 日本"  # kept as is
