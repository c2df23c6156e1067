"""Batching: padding-free packing (default) or padding, never masking the eos label.

Packing uses transformers' `DataCollatorWithFlattening`: a micro-batch becomes ONE
row with `position_ids` restarting at 0 for each example and no attention mask.
transformers (>= 4.5x `masking_utils`) turns such position ids into a block-diagonal
causal mask, so packed examples do not attend to each other, and each example
keeps its own labels (the prompt stays masked). `packing_is_isolated` checks this
on the real model before training and the trainer falls back to padding if not.

Padding uses `DataCollatorForSeq2Seq`, which pads `labels` with -100 *by position*:
the label of a real eos token survives even when pad_token_id == eos_token_id (the
seed recipe's `DataCollatorForLanguageModeling` masks every label equal to the pad
id, so with pad == eos the model never learns to stop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import IGNORE_INDEX


@dataclass
class TokenCounter:
    """Counts the real (non-pad) tokens handed to the model, for tokens/s."""

    tokens: int = 0
    label_tokens: int = 0


@dataclass
class CountingCollator:
    """Wraps a collator and counts the real tokens of each batch it builds."""

    inner: object
    counter: TokenCounter = field(default_factory=TokenCounter)

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.counter.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.counter.label_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        return batch


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one (eos). Safe here because labels are
    padded with -100 by position, not by comparing ids with the pad id."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def make_collator(tokenizer, packing: bool) -> CountingCollator:
    """The collator for training and eval: packed (one row, no padding) or padded."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return CountingCollator(DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX))
    ensure_pad_token(tokenizer)
    return CountingCollator(
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    )


def packing_is_isolated(model, vocab_size: int) -> bool:
    """True when, with two examples packed in one row (position_ids restarting, no
    attention mask), the second example's logits do not depend on the first.

    Measured exactly: the gradient of the second example's logits with respect to
    the first example's input embeddings must be zero. A model whose attention
    ignores packed-sequence boundaries would let examples read each other;
    training on that is wrong, so the caller falls back to padding.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (1, 12), generator=gen).to(device)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()  # no dropout; the caller disabled bnb's CPU inference repacking
    try:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, position_ids=pos, use_cache=False).logits[0, 7:]
        (grad,) = torch.autograd.grad(logits.float().sum(), emb)
    finally:
        model.train(was_training)
    return bool(grad[0, :7].abs().max() == 0 and grad[0, 7:].abs().max() > 0)
