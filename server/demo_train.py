"""The short training runs that make the demo read: the tiny base on the mixed
corpus, then one LoRA adapter per style, in plain torch (full precision, CPU).

Why not the bundled trainer (qlora_serve.training): its 4-bit base, checkpointing
and HF Trainer set-up cost more than these whole runs on 2 cores, and the demo is
built on every first start and once per test session. The adapters come out as
plain PEFT adapters all the same (`PeftModel.save_pretrained`).
"""

from __future__ import annotations

import torch


def windows(lines_ids: list[list[int]], seq_len: int, batch: int, steps: int, seed: int):
    """Yield `steps` batches [batch, seq_len] of token ids: each row starts at the
    start of a random line and runs on through the lines after it (so a prompt at
    position 0 looks like a line start, as at inference)."""
    gen = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    starts: list[int] = []
    for ids in lines_ids:
        starts.append(len(stream))
        stream.extend(ids)
    stream.extend(stream[:seq_len])  # wrap around so late starts still fill a row
    data = torch.tensor(stream, dtype=torch.long)
    starts_t = torch.tensor(starts, dtype=torch.long)
    offsets = torch.arange(seq_len)
    for _ in range(steps):
        picks = starts_t[torch.randint(len(starts), (batch,), generator=gen)]
        yield data[picks[:, None] + offsets[None, :]]


def train_lm(model, batches, lr: float, steps: int, params=None) -> float:
    """Next-token training of `model` (causal LM) on `batches` with AdamW and a
    linear decay to 0; returns the last loss (nats per token)."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())
