"""PEFT baselines of the engine benchmark (bench_engine.py): (a) the seed recipe and (b) PEFT's
mixed batch, over one PeftModel that holds every adapter."""

from __future__ import annotations

import time
from pathlib import Path


class PeftRunner:
    """One PeftModel over an NF4 base with all adapters loaded (the seed recipe's model)."""

    def __init__(self, base_dir: Path, adapter_dirs: list[Path], compute_dtype: str, device: str):
        import torch
        from peft import PeftModel

        from qlora_serve.server.engine.loader import load_base

        self.torch = torch
        base = load_base(str(base_dir), compute_dtype=compute_dtype, device=device)
        self.device = base.device
        self.pad_id = next(i for i in (base.tokenizer.pad_token_id, base.tokenizer.eos_token_id, 0) if i is not None)
        base.model.generation_config.eos_token_id = None  # decode exactly max_new_tokens
        base.model.generation_config.pad_token_id = self.pad_id
        self.model = PeftModel.from_pretrained(base.model, str(adapter_dirs[0]), adapter_name="a0")
        for i, d in enumerate(adapter_dirs[1:], start=1):
            self.model.load_adapter(str(d), adapter_name=f"a{i}")
        self.model.eval()

    def _gen(self, ids, mask, max_new: int, **kw):
        with self.torch.inference_mode():
            return self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                       pad_token_id=self.pad_id, **kw)

    def seed_recipe(self, names: list[str | None], prompts: list[list[int]], max_new: int) -> dict:
        """(a): set_adapter + generate, one request at a time."""
        torch = self.torch
        outs, t0 = [], time.perf_counter()
        for name, p in zip(names, prompts):
            ids = torch.tensor([p], dtype=torch.long, device=self.device)
            mask = torch.ones_like(ids)
            if name is None:
                with self.model.disable_adapter():
                    out = self._gen(ids, mask, max_new)
            else:
                self.model.set_adapter(name)
                out = self._gen(ids, mask, max_new)
            outs.append(out[0, len(p):].tolist())
        return self._result(outs, time.perf_counter() - t0, max_new)

    def mixed_batch(self, names: list[str | None], prompts: list[list[int]], max_new: int, max_batch: int) -> dict:
        """(b): left-padded generate calls with per-row adapter_names, max_batch rows each."""
        outs, seconds = [], 0.0
        for i in range(0, len(prompts), max_batch):
            r = self._mixed_chunk(names[i:i + max_batch], prompts[i:i + max_batch], max_new)
            outs += r["outputs"]
            seconds += r["seconds"]
        return self._result(outs, seconds, max_new)

    def _mixed_chunk(self, names: list[str | None], prompts: list[list[int]], max_new: int) -> dict:
        torch = self.torch
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p)
            mask[i, length - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        adapter_names = [n if n is not None else "__base__" for n in names]
        t0 = time.perf_counter()
        out = self._gen(ids, mask, max_new, adapter_names=adapter_names)
        dt = time.perf_counter() - t0
        return self._result([row[length:].tolist() for row in out], dt, max_new)

    @staticmethod
    def _result(outs: list[list[int]], seconds: float, max_new: int) -> dict:
        tokens = sum(len(o) for o in outs)
        return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
                "short_rows": sum(1 for o in outs if len(o) != max_new), "outputs": outs}
