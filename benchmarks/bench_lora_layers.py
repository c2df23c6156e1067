#!/usr/bin/env python
"""Layer-shape multi-LoRA benchmark (issue 11, benchmark 2): Llama-7B widths, NF4, CPU.

A stack of --layers Llama decoder layers with Llama-2-7B widths (hidden 4096,
intermediate 11008, 32 heads), random weights quantized to NF4 + double quant
(bitsandbytes Linear4bit, as the server loads a base), bf16 compute. Every Linear
is wrapped by the engine's MultiLoRA. One forward of the stack is timed for:

  decode   --rows rows x 1 token
  prefill  --prefill-rows rows x --prefill-len tokens

over adapter sets {1, 16, 32} adapters of r=16 and {16, 32} of mixed ranks 8..64
(all modules targeted), rows spread round-robin, and these paths in the same run:

  base        rows all -1 (no LoRA work at all)
  new         MultiLoRA at the engine's defaults (float32 slots, rank classes,
              grouped_mm; per-adapter matmul loop for a lone adapter)
  new-loop    the same stacks, per-adapter matmul loop for any count (for the crossover)
  new-bf16    slots in the compute dtype (--lora-dtype compute)
  old         the previous gathered path: float32 slots zero-padded to max_lora_rank=64,
              per-row index_select of A/B for each layer, two bmm (no gather cache:
              one 7B row's gathers exceed its 256 MiB budget)

Ratios: x/base (higher is better; 1.0 = LoRA costs nothing). Memory: LoRA bytes
held / the adapters' own bytes in the slot dtype (benchmark 3), new and old.
Prints a table, writes JSON (--out). Never asserts timing.

    python benchmarks/bench_lora_layers.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from machine import machine_info, write_results  # benchmarks/machine.py

import torch
from torch import nn

HIDDEN, INTER, HEADS = 4096, 11008, 32
OLD_MAX_RANK = 64  # the old default --max-lora-rank


def build_layers(n_layers: int, compute_dtype: torch.dtype) -> nn.Module:
    """`n_layers` LlamaDecoderLayers with 7B widths; every Linear replaced by an NF4 +
    double-quant bnb Linear4bit with random weights. Returns a module with .layers."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      num_hidden_layers=n_layers, vocab_size=1024, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    root = nn.Module()
    with torch.device("meta"):
        root.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(n_layers))
    gen = torch.Generator().manual_seed(0)
    for name, lin in [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear)]:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
        w = (torch.randn(lin.out_features, lin.in_features, generator=gen) * lin.in_features ** -0.5).to(compute_dtype)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cpu")
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, q)
    root.to_empty(device="cpu", recurse=False)
    for layer in root.layers:  # norms: ones (materialize the meta parameters)
        for mod in (layer.input_layernorm, layer.post_attention_layernorm):
            mod.weight = nn.Parameter(torch.ones(HIDDEN, dtype=compute_dtype), requires_grad=False)
    root.rotary = LlamaRotaryEmbedding(config=cfg)
    root.config = cfg
    return root.eval()


def random_adapter(shapes: dict, rank: int, seed: int):
    from qlora_serve.adapters.peft_format import AdapterConfig, LoraAdapter, LoraModule

    gen = torch.Generator().manual_seed(seed)
    mods = {n: LoraModule(lora_a=(torch.randn(rank, i, generator=gen) * i ** -0.5).to(torch.bfloat16),
                          lora_b=(torch.randn(o, rank, generator=gen) * 0.5 * rank ** -0.5).to(torch.bfloat16),
                          scaling=2.0) for n, (i, o) in shapes.items()}
    config = AdapterConfig(r=rank, lora_alpha=2 * rank, target_modules=tuple(n.rsplit(".", 1)[-1] for n in shapes))
    return LoraAdapter(path=Path(f"random-r{rank}-{seed}"), config=config, modules=mods)


class GatheredLinear(nn.Module):
    """The previous path, for comparison: rank-padded float32 slots, per-row gathers, bmm."""

    def __init__(self, base: nn.Module, n_slots: int, max_rank: int):
        super().__init__()
        self.base = base
        self.a = torch.zeros(n_slots, max_rank, base.in_features)
        self.b = torch.zeros(n_slots, base.out_features, max_rank)
        self.scaling = torch.zeros(n_slots)
        self.slot_ids: torch.Tensor | None = None

    def forward(self, x):
        out = self.base(x)
        ids = self.slot_ids
        if ids is None:  # base rows only
            return out
        a, b = self.a.index_select(0, ids), self.b.index_select(0, ids)
        delta = torch.bmm(torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype), a.transpose(1, 2)),
                          b.transpose(1, 2)) * self.scaling.index_select(0, ids).view(-1, 1, 1)
        return (out + delta.view(out.shape)).to(out.dtype)


def forward(root, x: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    pe = root.rotary(x, pos)
    for layer in root.layers:
        x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
        x = x[0] if isinstance(x, tuple) else x
    return x


def paired(fn_path, fn_base, iters: int) -> tuple[float, float]:
    """(path, base) seconds, fastest of `iters` each after a warm-up, measured alternately
    so both see the same machine load (the minimum is the least disturbed estimate)."""
    path, base = [], []
    fn_path(), fn_base()
    for _ in range(iters):
        for fn, out in ((fn_base, base), (fn_path, path)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return min(path), min(base)


def own_bytes(adapters, elem: int) -> int:
    return sum(m.lora_a.numel() + m.lora_b.numel() for ad in adapters for m in ad.modules.values()) * elem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=32, help="decode rows")
    p.add_argument("--prefill-rows", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sets", default="1x16,16x16,32x16,16xmix,32xmix", help="adapter sets: COUNTxRANK or COUNTxmix")
    p.add_argument("--paths", default="new,new-loop,new-bf16,old")
    p.add_argument("--quick", action="store_true", help="--iters 2, sets 1x16,16x16,32xmix, no prefill for old")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.sets = 2, "1x16,16x16,32xmix"
    if args.threads:
        torch.set_num_threads(args.threads)
    from qlora_serve.server.engine.multi_lora import MultiLoRA

    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    dtype = torch.bfloat16
    mixed_ranks = (8, 16, 32, 64)
    sets = []
    for spec in args.sets.split(","):
        count, _, rank = spec.partition("x")
        ranks = [mixed_ranks[i % 4] if rank == "mix" else int(rank) for i in range(int(count))]
        sets.append((spec, ranks))
    log(f"building {args.layers} NF4 decoder layers with 7B widths")
    root = build_layers(args.layers, dtype)
    n_max = max(len(r) for _, r in sets)
    gen = torch.Generator().manual_seed(1)
    x_dec = torch.randn(args.rows, 1, HIDDEN, generator=gen).to(dtype)
    x_pre = torch.randn(args.prefill_rows, args.prefill_len, HIDDEN, generator=gen).to(dtype)
    paths = args.paths.split(",")
    rows_out = []
    result = {"benchmark": "lora_layers", "machine": machine_info(torch.device("cpu")),
              "settings": {**vars(args), "out": str(args.out), "hidden": HIDDEN, "intermediate": INTER,
                           "compute_dtype": str(dtype), "weights": "NF4 + double quant, random"}, "rows": rows_out}
    with torch.inference_mode():
        for slot_dtype, tag in ((torch.float32, "new"), (dtype, "new-bf16")):
            want = [t for t in (tag, "new-loop" if tag == "new" else None) if t and t in paths]
            if not want:
                continue
            lora = MultiLoRA(root, max_slots=n_max, max_rank=64, dtype=slot_dtype)
            shapes = lora.linear_shapes
            for spec, ranks in sets:
                adapters = [random_adapter(shapes, r, seed=i) for i, r in enumerate(ranks)]
                for s in list(lora.loaded_slots):
                    lora.unload(s)
                for i, ad in enumerate(adapters):
                    lora.load(i, ad)
                mem = lora.nbytes() / own_bytes(adapters, torch.empty((), dtype=slot_dtype).element_size())
                for path in want:
                    lora.loop_max_adapters = 10**6 if path == "new-loop" else 1
                    row = {"set": spec, "path": path, "lora_bytes_over_own": round(mem, 4)}
                    for phase, x in (("decode", x_dec), ("prefill", x_pre)):
                        slots = [i % len(ranks) for i in range(x.shape[0])]

                        def run_path(x=x, slots=slots):
                            with lora.row_slots(slots):
                                forward(root, x)
                        t, tb = paired(run_path, lambda x=x: forward(root, x), args.iters)
                        row[f"{phase}_ms"], row[f"{phase}_base_ms"] = round(t * 1e3, 2), round(tb * 1e3, 2)
                        row[f"{phase}_over_base"] = round(tb / t, 3)
                    rows_out.append(row)
                    log(row)
            for name, layer in lora._layers.items():  # unwrap for the next path
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, layer.base_layer)
        if "old" in paths:
            lins = [(n, m) for n, m in root.named_modules() if type(m).__name__ == "Linear4bit"]
            wrapped = {}
            for name, lin in lins:
                g = GatheredLinear(lin, n_max, OLD_MAX_RANK)
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, g)
                wrapped[name] = g
            shapes = {n: (m.base.in_features, m.base.out_features) for n, m in wrapped.items()}
            for spec, ranks in sets:
                adapters = [random_adapter(shapes, r, seed=i) for i, r in enumerate(ranks)]
                for g in wrapped.values():
                    g.a.zero_(), g.b.zero_()
                for i, ad in enumerate(adapters):
                    for n, m in ad.modules.items():
                        g = wrapped[n]
                        g.a[i, : m.rank] = m.lora_a.float()
                        g.b[i, :, : m.rank] = m.lora_b.float()
                        g.scaling[i] = m.scaling
                held = sum((g.a[: len(ranks)].numel() + g.b[: len(ranks)].numel()) * 4 for g in wrapped.values())
                row = {"set": spec, "path": "old", "lora_bytes_over_own": round(held / own_bytes(adapters, 4), 4)}
                for phase, x in (("decode", x_dec), ("prefill", x_pre)):
                    if phase == "prefill" and args.quick:
                        continue
                    ids = torch.tensor([i % len(ranks) for i in range(x.shape[0])])

                    def set_ids(v):
                        for g in wrapped.values():
                            g.slot_ids = v

                    t, tb = paired(lambda x=x: (set_ids(ids), forward(root, x)), lambda x=x: (set_ids(None), forward(root, x)),
                                   args.iters)
                    row[f"{phase}_ms"], row[f"{phase}_base_ms"] = round(t * 1e3, 2), round(tb * 1e3, 2)
                    row[f"{phase}_over_base"] = round(tb / t, 3)
                rows_out.append(row)
                log(row)
    out = write_results("lora-layers", result, args.out)
    print(render(result))
    print(f"\nJSON: {out}")
    return 0


def render(result: dict) -> str:
    s = result["settings"]
    lines = [f"LoRA layer benchmark: {s['layers']} Llama decoder layers, 7B widths ({HIDDEN}/{INTER}), NF4, bf16 compute, CPU",
             f"decode {s['rows']} rows x 1 token; prefill {s['prefill_rows']} rows x {s['prefill_len']} tokens; "
             f"fastest of {s['iters']}, base measured alternately with each path",
             "", f"{'set':>8} | {'path':>9} | {'decode ms':>9} | {'dec/base':>8} | {'prefill ms':>10} | {'pre/base':>8} | {'mem/own':>7}"]
    lines.append("-" * len(lines[-1]))
    f = lambda r, k, w: f"{r[k]:>{w}}" if k in r else f"{'-':>{w}}"  # noqa: E731
    for r in result["rows"]:
        lines.append(f"{r['set']:>8} | {r['path']:>9} | {f(r, 'decode_ms', 9)} | {f(r, 'decode_over_base', 8)} | "
                     f"{f(r, 'prefill_ms', 10)} | {f(r, 'prefill_over_base', 8)} | {r['lora_bytes_over_own']:>7}")
    lines.append("  set: COUNTxRANK (mix = ranks 8/16/32/64 cycled); rows spread round-robin over the set's adapters")
    lines.append("  goal: new dec/base >= 0.8; mem/own <= 1.25 (own = adapters' bytes in the slot dtype)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
