"""The paged KV batch built directly on a tiny float32 Llama (no server): rows join,
decode in any order and leave; every row's logits equal a plain forward over its own
tokens; memory follows the pages live rows hold."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from qlora_serve.server.engine.kv_batch import PagedKVBatch
from qlora_serve.server.engine.request import SamplingParams
from qlora_serve.server.engine.sampling import RowSampler, sample_rows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


class _Seq:
    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.kv = None


def _prefill(model, kv, seqs):
    """Left-padded prefill as the engine does it; returns each row's next-token logits."""
    length = max(len(s.tokens) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s.tokens):] = torch.tensor(s.tokens)
        mask[i, length - len(s.tokens):] = 1
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    cache=cache, use_cache=True)
    for s, h in zip(seqs, kv.join(cache, mask)):
        s.kv = h
    return out.logits[:, -1]


def _decode(model, kv, seqs, tokens):
    """One decode step over seqs in this order, feeding `tokens`."""
    for s, t in zip(seqs, tokens):
        s.tokens.append(t)
    cache, mask, positions = kv.decode([s.kv for s in seqs])
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[t] for t in tokens]), attention_mask=mask,
                    position_ids=positions, cache=cache, use_cache=True)
    kv.advance([s.kv for s in seqs])
    return out.logits[:, -1]


def _reference(model, seq):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([seq.tokens])).logits[0, -1]


def _check(model, seqs, logits):
    for s, row in zip(seqs, logits):
        torch.testing.assert_close(row, _reference(model, s), rtol=1e-5, atol=1e-5)
        assert int(row.argmax()) == int(_reference(model, s).argmax())


def test_join_decode_leave_in_any_order_equals_each_rows_own_forward(model):
    kv = PagedKVBatch(page_tokens=4)
    gen = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 97, (n,), generator=gen).tolist()  # noqa: E731
    a, b = _Seq(rand(9)), _Seq(rand(3))
    _check(model, [a, b], _prefill(model, kv, [a, b]))
    for step in range(5):  # crosses page boundaries (page_tokens=4)
        order = [a, b] if step % 2 else [b, a]
        _check(model, order, _decode(model, kv, order, rand(2)))
    c, d = _Seq(rand(14)), _Seq(rand(1))
    _check(model, [c, d], _prefill(model, kv, [c, d]))  # join while a, b run
    _check(model, [d, a, c, b], _decode(model, kv, [d, a, c, b], rand(4)))
    kv.leave(a.kv)  # a leaves from the middle; nobody else's KV moves
    for _ in range(3):
        _check(model, [c, b, d], _decode(model, kv, [c, b, d], rand(3)))
    e = _Seq(rand(6))
    _check(model, [e], _prefill(model, kv, [e]))  # reuses a's pages
    _check(model, [b, e, d, c], _decode(model, kv, [b, e, d, c], rand(4)))
    assert [s.kv.length for s in (b, c, d, e)] == [len(s.tokens) for s in (b, c, d, e)]


def test_memory_follows_live_tokens_not_rows_times_longest(model):
    kv = PagedKVBatch(page_tokens=4)
    long, shorts = _Seq(list(range(1, 61))), [_Seq([5, 6]) for _ in range(7)]
    _prefill(model, kv, [long] + shorts)
    per_slot = sum(t[:, 0].numel() * t.element_size() for t in kv._k + kv._v)
    assert kv.rows == 8
    assert kv.pages_held == 15 + 7  # 60 tokens in 15 pages, 2 tokens in 1 page each
    assert kv.held_bytes() == 22 * 4 * per_slot  # not 8 rows x 60 tokens
    assert kv.nbytes() >= kv.held_bytes()
    kv.leave(long.kv)
    assert kv.pages_held == 7 and long.kv.pages == []
    kv.leave(long.kv)  # idempotent
    assert kv.pages_held == 7
    for s in shorts:
        kv.leave(s.kv)
    assert kv.rows == 0 and kv.nbytes() == 0 and kv.held_bytes() == 0  # released when empty


def test_handles_from_before_clear_leave_the_new_pool_alone(model):
    """The engine clears the batch when a step fails; a stale handle must not free
    pages of the rows that join afterwards."""
    kv = PagedKVBatch(page_tokens=4)
    old = _Seq(list(range(1, 12)))
    _prefill(model, kv, [old])
    kv.clear()
    new = _Seq(list(range(1, 12)))
    _prefill(model, kv, [new])
    free = list(kv._free)
    kv.leave(old.kv)
    assert kv._free == free and kv.rows == 1
    _check(model, [new], _decode(model, kv, [new], [3]))


def test_join_and_leave_touch_only_their_own_pages(model):
    """A join that fits leaves the pool and every running row's pages and KV as they were."""
    kv = PagedKVBatch(page_tokens=4)
    running = [_Seq(list(range(1, 30))) for _ in range(3)]
    _prefill(model, kv, running)
    kv.leave(running.pop().kv)  # frees 8 pages for the join below
    pool = [t.data_ptr() for t in kv._k]
    before = [(list(s.kv.pages), kv._k[0][:, s.kv.pages[0] * 4].clone()) for s in running]
    new = _Seq(list(range(3, 20)))
    _prefill(model, kv, [new])
    assert [t.data_ptr() for t in kv._k] == pool  # no reallocation, no copy of the pool
    for s, (pages, first) in zip(running, before):
        assert s.kv.pages == pages and torch.equal(kv._k[0][:, pages[0] * 4], first)
    assert not set(new.kv.pages) & {p for s in running for p in s.kv.pages}


def test_pool_growth_keeps_every_rows_kv(model):
    kv = PagedKVBatch(page_tokens=2)
    a = _Seq(list(range(1, 4)))
    _prefill(model, kv, [a])
    pages_before = kv._pages
    for _ in range(12):  # a alone outgrows the first pool several times
        _check(model, [a], _decode(model, kv, [a], [7]))
    assert kv._pages > pages_before
    b = _Seq(list(range(10, 40)))
    _check(model, [b], _prefill(model, kv, [b]))
    _check(model, [b, a], _decode(model, kv, [b, a], [3, 4]))


def test_padding_positions_read_the_zero_page(model):
    """Padding in the gathered view reads page 0 (zeros), never another row's stale
    KV, so a non-finite value left in a freed page cannot reach a later row."""
    kv = PagedKVBatch(page_tokens=4)
    a, b = _Seq(list(range(1, 20))), _Seq([4, 5])
    _prefill(model, kv, [a, b])
    freed = list(a.kv.pages)
    kv.leave(a.kv)
    for t in kv._k + kv._v:
        for p in freed:
            t[:, p * 4:(p + 1) * 4] = float("nan")
    c = _Seq(list(range(30, 36)))
    _prefill(model, kv, [c])  # takes some of the poisoned pages; its tail slots stay NaN
    logits = _decode(model, kv, [b, c], [1, 2])
    assert torch.isfinite(logits).all()
    _check(model, [b, c], logits)


def test_seeded_sampling_is_independent_of_row_order():
    """Reordering rows (the engine sorts them by adapter) changes no row's tokens:
    each row samples from its own generator."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=s, max_new_tokens=4) for s in (1, 2, 3)]

    def run(order):
        samplers = {i: RowSampler(params[i], torch.device("cpu")) for i in range(3)}
        out = {i: [] for i in range(3)}
        for _ in range(4):
            toks, _ = sample_rows([samplers[i] for i in order], logits[order])
            for i, t in zip(order, toks):
                out[i].append(t)
        return out

    assert run([0, 1, 2]) == run([2, 0, 1])


def test_pool_never_grows_past_the_kv_budget(model):
    kv = PagedKVBatch(page_tokens=4, max_tokens=40)  # at most 10 pages of rows + the zero page
    a, b = _Seq(list(range(1, 31))), _Seq(list(range(2, 10)))
    _prefill(model, kv, [a])
    assert kv._pages == 9  # sized to what joined: the zero page + 8
    _check(model, [b], _prefill(model, kv, [b]))
    assert kv._pages == 11  # growth by half (13) capped at the budget
    _check(model, [a, b], _decode(model, kv, [a, b], [5, 6]))


def test_sliding_window_model_decodes_exactly():
    """The view is left-padded, so query-key distances are true distances and a
    sliding-window mask (Mistral) stays exact for rows of different lengths."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=6)
    mistral = MistralForCausalLM(cfg).eval()
    kv = PagedKVBatch(page_tokens=4)
    a, b = _Seq(list(range(1, 15))), _Seq([3, 4, 5])
    _check(mistral, [a, b], _prefill(mistral, kv, [a, b]))
    for i in range(6):
        _check(mistral, [b, a], _decode(mistral, kv, [b, a], [i + 1, i + 2]))
