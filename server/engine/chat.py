"""Chat `messages` -> prompt token ids, through the tokenizer's chat template."""

from __future__ import annotations

from qlora_serve.errors import InvalidArgument, clip


class NoChatTemplate(InvalidArgument):
    """The base (and adapter) ship no chat template: messages cannot be rendered."""


def render_chat(tokenizer, messages, *, template: str | None = None) -> list[int]:
    """Render [(role, content), ...] (or dicts with role/content) with the chat
    template (`template`, else the tokenizer's), ending with the generation prompt
    for the assistant's reply, and return its token ids: exactly what
    `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives.
    InvalidArgument when there is no template or the template refuses the messages."""
    msgs = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
    if not msgs:
        raise InvalidArgument("messages is empty: send at least one message")
    for i, m in enumerate(msgs):
        if not m.get("role"):
            raise InvalidArgument(f"messages[{i}].role is empty: set it (e.g. system, user, assistant)")
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise NoChatTemplate("the base model's tokenizer has no chat template, so messages cannot be rendered; "
                             "send prompt (text) or prompt_token_ids instead")
    try:
        ids = tokenizer.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    except Exception as exc:  # jinja errors, raise_exception() in templates (e.g. roles must alternate)
        raise InvalidArgument(f"the chat template refused these messages: {clip(exc)}") from None
    return [int(t) for t in ids]
