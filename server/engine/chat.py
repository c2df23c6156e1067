"""Chat `messages` -> prompt token ids, through the tokenizer's chat template (the
operator's) or an adapter's own (a tenant's: rendered by the bounded renderer)."""

from __future__ import annotations

import jinja2

from qlora_serve.chat_render import TemplateLimit, render_bounded
from qlora_serve.errors import InvalidArgument, clip


class NoChatTemplate(InvalidArgument):
    """The base (and adapter) ship no chat template: messages cannot be rendered."""


def render_chat(tokenizer, messages, *, template: str | None = None) -> list[int]:
    """Render [(role, content), ...] (or dicts with role/content) with the chat
    template (`template`, else the tokenizer's), ending with the generation prompt
    for the assistant's reply, and return its token ids: exactly what
    `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives.
    `template` is a tenant's (an adapter's own), so it renders within the bounds of
    `qlora_serve.chat_render` (time, value sizes, output). InvalidArgument when there
    is no template, the template refuses the messages, or it exceeds those bounds."""
    msgs = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
    if not msgs:
        raise InvalidArgument("messages is empty: send at least one message")
    for i, m in enumerate(msgs):
        if not m.get("role"):
            raise InvalidArgument(f"messages[{i}].role is empty: set it (e.g. system, user, assistant)")
    if template:
        return _render_bounded(tokenizer, msgs, template)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise NoChatTemplate("the base model's tokenizer has no chat template, so messages cannot be rendered; "
                             "send prompt (text) or prompt_token_ids instead")
    try:
        ids = tokenizer.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    except Exception as exc:  # jinja errors, raise_exception() in templates (e.g. roles must alternate)
        raise InvalidArgument(f"the chat template refused these messages: {clip(exc)}") from None
    return [int(t) for t in ids]


def _render_bounded(tokenizer, msgs: list[dict], template: str) -> list[int]:
    """apply_chat_template's rendering (special tokens as variables, no tools) and
    tokenizing (no added special tokens), with a tenant's template bounded."""
    try:
        text = render_bounded(template, messages=msgs, tools=None, documents=None, add_generation_prompt=True,
                              **tokenizer.special_tokens_map)
    except TemplateLimit as exc:
        raise InvalidArgument(f"the adapter's chat template exceeds the server's bounds: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - jinja errors, raise_exception() in templates
        if isinstance(exc, jinja2.TemplateSyntaxError):
            raise InvalidArgument(f"the adapter's chat template has a syntax error (line {exc.lineno}): "
                                  f"{clip(exc)}") from None
        raise InvalidArgument(f"the chat template refused these messages: {clip(exc)}") from None
    return [int(t) for t in tokenizer(text, add_special_tokens=False).input_ids]
