#!/usr/bin/env python
"""KV-cache benchmark (issue 11, benchmark 4): what a join, a leave and a decode step
cost while long rows run, old left-padded DynamicCache vs the paged pool, in ONE run.

Goal: (join while `--rows` long rows of `--min-len`..`--max-len` tokens run) /
(the same join into an empty batch) <= 1.5.

KV tensors have the shapes of the chosen preset's model (layers, KV heads, head
dim, dtype) and random values: joins, leaves and the cache's per-step work do not
depend on the weights, so no model is loaded. Measured per implementation:

  join_empty  one row (`--join-tokens` prompt tokens) joins an empty batch
  join_busy   the same row joins while `--rows` rows run (median of --reps; a warm-up
              join + leave first, so the paged pool is at its steady size)
  leave_busy  that row leaves again
  decode_kv   the cache's share of one decode step over all rows: every layer writes
              one token per row and returns the keys/values attention reads
  memory      bytes held with all rows running, beside the live tokens' own bytes

Then the alternatives issue 11 names, on the same shapes (one layer's attention of a
decode step): transformers' continuous-batching layout (all rows packed into one
sequence, block-diagonal mask: what its paged SDPA path computes), FlexAttention
(eager; on CPU compiling it is not practical here), and a preallocated per-row-slot
cache (memory only: its view costs the same gather as the paged pool once rows are
kept in adapter order).

Prints a table, writes JSON to bench-results/kv-<timestamp>.json (--out). Never
asserts timing. Command: `python benchmarks/bench_kv.py` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from machine import machine_info, write_results  # benchmarks/machine.py (the script's folder is on sys.path)

from qlora_serve.server.engine.kv_batch import PagedKVBatch

PRESETS = {  # KV shapes of bench_engine's models: layers, KV heads, head dim
    "cpu": dict(layers=4, heads=4, dim=64),
    "7b": dict(layers=32, heads=32, dim=128),
}


# ----------------------------------------------------------------- the old cache, for comparison
def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    return t if n == 0 else F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [n, 0])


class OldPaddedKVBatch:
    """server/engine/kv_batch.py before issue 11 (one left-padded DynamicCache), verbatim logic."""

    def __init__(self) -> None:
        self.cache, self.mask = None, None

    def decode_mask(self):
        return torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)

    def join(self, cache, mask) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        a, b = self.mask.shape[1], int(mask.shape[1])
        length = max(a, b)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length - a, 2), _pad_left(theirs.keys, length - b, 2)])
            mine.values = torch.cat([_pad_left(mine.values, length - a, 2), _pad_left(theirs.values, length - b, 2)])
        self.mask = torch.cat([_pad_left(self.mask, length - a, 1), _pad_left(mask, length - b, 1)])

    def keep(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self.mask = mask[:, start:]

    def nbytes(self) -> int:
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.cache.layers)


# ----------------------------------------------------------------- helpers
def prefill(shape: dict, lengths: list[int], dtype, device, gen) -> tuple[DynamicCache, torch.Tensor]:
    """A left-padded prefill's cache and mask, random KV of the preset's shape."""
    t = max(lengths)
    cache = DynamicCache()
    for layer in range(shape["layers"]):
        k = torch.randn(len(lengths), shape["heads"], t, shape["dim"], generator=gen).to(device, dtype)
        cache.update(k, torch.randn_like(k), layer)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
    return cache, mask.to(device)


def timed(fn, device) -> float:
    """Seconds fn() took (device work included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def one_token(shape, rows, dtype, device, gen):
    k = torch.randn(rows, shape["heads"], 1, shape["dim"], generator=gen).to(device, dtype)
    return k, torch.randn_like(k)


# ----------------------------------------------------------------- the measurements
def bench_old(shape, lens, join_len, reps, dtype, device, seed) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {"join_empty_s": [], "join_busy_s": [], "leave_busy_s": [], "decode_kv_s": []}
    for _ in range(reps):
        kv = OldPaddedKVBatch()
        cache, mask = prefill(shape, [join_len], dtype, device, gen)
        out["join_empty_s"].append(timed(lambda: kv.join(cache, mask), device))
    kv = OldPaddedKVBatch()
    kv.join(*prefill(shape, lens, dtype, device, gen))
    for _ in range(reps):
        cache, mask = prefill(shape, [join_len], dtype, device, gen)
        out["join_busy_s"].append(timed(lambda: kv.join(cache, mask), device))
        out["leave_busy_s"].append(timed(lambda: kv.keep(list(range(len(lens)))), device))
    kv.join(*prefill(shape, [join_len], dtype, device, gen))
    out["bytes_all_rows"] = kv.nbytes()
    for _ in range(reps):
        k, v = one_token(shape, len(lens) + 1, dtype, device, gen)

        def step():
            kv.mask = kv.decode_mask()
            for layer in range(shape["layers"]):
                kv.cache.update(k, v, layer)  # DynamicCache: torch.cat of every row's KV
        out["decode_kv_s"].append(timed(step, device))
    return out


def bench_paged(shape, lens, join_len, reps, dtype, device, seed) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {"join_empty_s": [], "join_idle_s": [], "join_busy_s": [], "leave_busy_s": [], "decode_kv_s": []}
    for _ in range(reps):
        kv = PagedKVBatch()
        cache, mask = prefill(shape, [join_len], dtype, device, gen)
        out["join_empty_s"].append(timed(lambda: kv.join(cache, mask), device))  # allocates the pool
    # The pool already there: one 1-token row keeps it (a conservative denominator).
    idle = PagedKVBatch()
    idle.join(*prefill(shape, [1], dtype, device, gen))
    idle._free.extend(idle._alloc(idle.pages_for(join_len)))  # grow now, not in a timed join
    kv = PagedKVBatch()
    running = kv.join(*prefill(shape, lens, dtype, device, gen))
    cache, mask = prefill(shape, [join_len], dtype, device, gen)
    grow = timed(lambda: running.extend(kv.join(cache, mask)), device)  # warm-up: the pool grows here
    kv.leave(running.pop())
    out["pool_growth_join_s"] = grow
    for _ in range(reps):  # idle and busy joins interleaved: machine noise hits both alike
        for batch, key in ((idle, "join_idle_s"), (kv, "join_busy_s")):
            cache, mask = prefill(shape, [join_len], dtype, device, gen)
            box = []
            out[key].append(timed(lambda: box.extend(batch.join(cache, mask)), device))
            leave = timed(lambda: batch.leave(box[0]), device)
            if batch is kv:
                out["leave_busy_s"].append(leave)
    running += kv.join(*prefill(shape, [join_len], dtype, device, gen))
    out["bytes_all_rows"] = kv.nbytes()
    out["bytes_held_all_rows"] = kv.held_bytes()
    for _ in range(reps):
        k, v = one_token(shape, len(running), dtype, device, gen)

        def step():
            view, _, _ = kv.decode(running)
            for layer in range(shape["layers"]):
                view.update(k, v, layer)  # write one token per row, gather the left-padded view
            kv.advance(running)
        out["decode_kv_s"].append(timed(step, device))
    return out


def bench_alternatives(shape, lens, dtype, device, seed) -> dict:
    """One layer's decode attention over all rows, three ways (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    rows, heads, dim, longest = len(lens), shape["heads"], shape["dim"], max(lens)
    q = torch.randn(rows, heads, 1, dim, generator=gen).to(device, dtype)
    k = torch.randn(rows, heads, longest, dim, generator=gen).to(device, dtype)
    v = torch.randn_like(k)
    n = torch.tensor(lens, device=device)
    pad = (torch.arange(longest, device=device)[None] >= (longest - n)[:, None])[:, None, None, :]
    res = {"batched_sdpa_s": statistics.median(
        timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=pad), device) for _ in range(3))}
    # transformers' continuous batching: one packed sequence, block-diagonal mask.
    kp = torch.cat([k[i, :, longest - lens[i]:] for i in range(rows)], dim=1)[None]
    vp = torch.cat([v[i, :, longest - lens[i]:] for i in range(rows)], dim=1)[None]
    owner = torch.repeat_interleave(torch.arange(rows, device=device), n)
    block = (owner[None, :] == torch.arange(rows, device=device)[:, None])[None, None]
    qp = q.transpose(0, 2)  # [1, heads, rows, dim]
    res["packed_sdpa_s"] = statistics.median(
        timed(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=block), device) for _ in range(3))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        starts = longest - n
        bm = create_block_mask(lambda b, h, qi, ki: ki >= starts[b], rows, None, 1, longest, device=str(device))
        flex_attention(q, k, v, block_mask=bm)  # first call builds the eager graph
        res["flex_eager_s"] = timed(lambda: flex_attention(q, k, v, block_mask=bm), device)
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        res["flex_eager_s"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    per_token = 2 * shape["layers"] * heads * dim * torch.finfo(dtype).bits // 8
    capacity = 1 << (longest - 1).bit_length()  # per-row slots, grown by doubling
    res["slots_bytes"] = rows * capacity * per_token
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--rows", type=int, default=31, help="long rows running before the join")
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--join-tokens", type=int, default=512, help="prompt tokens of the joining row")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", default=None, help="JSON path (default bench-results/kv-<timestamp>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, dtype, device = PRESETS[args.preset], getattr(torch, args.dtype), torch.device(args.device)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.rows,),
                         generator=torch.Generator().manual_seed(args.seed)).tolist()
    per_token = 2 * shape["layers"] * shape["heads"] * shape["dim"] * torch.finfo(dtype).bits // 8
    live_bytes = (sum(lens) + args.join_tokens) * per_token
    results = {}
    for name, fn in (("old", bench_old), ("paged", bench_paged)):
        r = fn(shape, lens, args.join_tokens, args.reps, dtype, device, args.seed)
        for key in ("join_empty_s", "join_busy_s", "leave_busy_s", "decode_kv_s"):
            r[key.replace("_s", "_median_s")] = statistics.median(r[key])
        r["ratio_busy_over_empty"] = r["join_busy_median_s"] / r["join_empty_median_s"]
        if "join_idle_s" in r:
            r["join_idle_median_s"] = statistics.median(r["join_idle_s"])
            r["ratio_busy_over_idle"] = r["join_busy_median_s"] / r["join_idle_median_s"]
        results[name] = r
    alt = bench_alternatives(shape, lens, dtype, device, args.seed)

    ms = lambda s: f"{1e3 * s:10.3f}"  # noqa: E731
    print(f"preset {args.preset}, {args.rows} rows of {min(lens)}-{max(lens)} tokens running, join of "
          f"{args.join_tokens} tokens, {args.dtype} on {device}, median of {args.reps}")
    print(f"{'':8}{'join empty ms':>14}{'join busy ms':>14}{'busy/empty':>12}{'leave ms':>10}"
          f"{'decode KV ms':>14}{'cache MB':>10}")
    for name, r in results.items():
        print(f"{name:8}{ms(r['join_empty_median_s']):>14}{ms(r['join_busy_median_s']):>14}"
              f"{r['ratio_busy_over_empty']:12.2f}{ms(r['leave_busy_median_s']):>10}"
              f"{ms(r['decode_kv_median_s']):>14}{r['bytes_all_rows'] / 2**20:10.1f}")
    p = results["paged"]
    print(f"live tokens' own KV: {live_bytes / 2**20:.1f} MB; paged pages held {p['bytes_held_all_rows'] / 2**20:.1f} MB; "
          f"per-row slots would hold {alt['slots_bytes'] / 2**20:.1f} MB; paged pool growth (once, x1.5): "
          f"{1e3 * p['pool_growth_join_s']:.1f} ms")
    print(f"paged join into an idle pool (1 row of 1 token, pool allocated): {ms(p['join_idle_median_s']).strip()} ms; "
          f"busy/idle {p['ratio_busy_over_idle']:.2f} (goal <= 1.5)")
    flex = alt["flex_eager_s"]
    print(f"one layer's decode attention: batched SDPA {ms(alt['batched_sdpa_s']).strip()} ms, packed SDPA "
          f"(transformers CB layout) {ms(alt['packed_sdpa_s']).strip()} ms, FlexAttention eager "
          f"{ms(flex).strip() + ' ms' if isinstance(flex, float) else flex}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = write_results("kv", {"run": f"kv-{stamp}", "args": vars(args), "row_lengths": lens, "live_bytes": live_bytes,
                               "results": results, "alternatives": alt, "machine": machine_info(device)}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
