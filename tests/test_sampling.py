"""Per-row sampling controls against transformers' logits processors (the
reference semantics), per-row isolation in one batch, and the validation of every
control's range. No model: the logits are random tensors, the samplers real."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qlora_serve.errors import InvalidArgument
from qlora_serve.server.engine.request import SamplingParams
from qlora_serve.server.engine.sampling import RowSampler, adjust, sample_rows, sampling_scores

VOCAB = 96
CPU = torch.device("cpu")


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def sampler(prompt=(), generated=(), eos=frozenset(), **kw) -> RowSampler:
    s = RowSampler(SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 32), **kw), CPU, prompt, eos)
    if s.params.penalized:
        s._state(VOCAB)  # the engine's first step does this; here tokens are recorded before any step
    for t in generated:
        s.accept(t)
    return s


PROMPT = [3, 5, 5, 9, 40]
GENERATED = [9, 11, 11, 11, 70]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    x = logits(1)
    ours = adjust(x.clone(), [sampler(PROMPT, GENERATED, repetition_penalty=penalty)])
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([PROMPT + GENERATED]), x.clone())
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, x)


def test_presence_and_frequency_penalties_follow_openai():
    """logit[j] - frequency x count[j] - presence x [count[j] > 0], over generated tokens only."""
    x = logits(1)
    ours = adjust(x.clone(), [sampler(PROMPT, GENERATED, presence_penalty=0.7, frequency_penalty=-0.4)])
    ref = x.clone()
    for tok in set(GENERATED):
        ref[0, tok] -= -0.4 * GENERATED.count(tok) + 0.7
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.equal(ours[0, 3], x[0, 3])  # a prompt-only token is not penalised by these two


def test_all_three_penalties_apply_repetition_first_as_vllm():
    x = logits(1)
    ours = adjust(x.clone(), [sampler(PROMPT, GENERATED, repetition_penalty=1.5, presence_penalty=0.5,
                                      frequency_penalty=0.25)])
    ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([PROMPT + GENERATED]), x.clone())
    for tok in set(GENERATED):
        ref[0, tok] -= 0.25 * GENERATED.count(tok) + 0.5
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, min_p=0.2),
    dict(temperature=1.1, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=VOCAB + 5),
])
def test_warpers_equal_transformers_chain(kw):
    x = logits(1, seed=3)
    procs = LogitsProcessorList([TemperatureLogitsWarper(kw["temperature"])])
    if kw.get("top_k"):
        procs.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p"):
        procs.append(TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        procs.append(MinPLogitsWarper(kw["min_p"]))
    ref = procs(None, x.clone())
    ours = sampling_scores([sampler(**kw)], x)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_mixed_batch_rows_match_their_own_reference_and_leave_others_alone():
    """Each row of one batch gets exactly its own controls; rows without controls
    come out bit-identical to the raw logits."""
    x = logits(5, seed=7)
    rows = [
        sampler(temperature=1.0),  # no controls beyond temperature 1
        sampler(PROMPT, GENERATED, temperature=1.0, repetition_penalty=1.8),
        sampler(temperature=1.0, top_k=4),
        sampler(temperature=1.0, min_p=0.3),
        sampler(temperature=0.5, top_p=0.7),
    ]
    out = sampling_scores(rows, x)
    assert torch.equal(out[0], x[0])
    rep = RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([PROMPT + GENERATED]), x[1:2].clone())
    assert torch.equal(out[1], rep[0])
    assert torch.equal(out[2], TopKLogitsWarper(4)(None, x[2:3].clone())[0])
    assert torch.equal(out[3], MinPLogitsWarper(0.3)(None, x[3:4].clone())[0])
    ref4 = TopPLogitsWarper(0.7)(None, TemperatureLogitsWarper(0.5)(None, x[4:5].clone()))[0]
    assert torch.equal(out[4], ref4)


def test_greedy_rows_with_and_without_penalties_in_one_batch():
    x = logits(3, seed=11)
    plain_top = int(x[1].argmax())
    rows = [sampler(), sampler([plain_top], repetition_penalty=1e6, presence_penalty=2.0), sampler()]
    # A prompt token with a crushing penalty cannot be the argmax of the penalised row.
    tokens, _ = sample_rows(rows, x.clone())
    assert tokens[0] == int(x[0].argmax()) and tokens[2] == int(x[2].argmax())
    assert tokens[1] != plain_top


def test_min_tokens_masks_eos_and_stop_ids_then_lifts():
    eos, stop = 7, 8
    x = torch.full((1, VOCAB), -5.0)
    x[0, eos], x[0, stop], x[0, 30] = 10.0, 9.0, 1.0
    s = sampler(eos=frozenset({eos}), stop_token_ids=frozenset({stop}), min_tokens=2)
    picks = [sample_rows([s], x.clone())[0][0] for _ in range(3)]
    assert picks == [30, 30, eos]  # masked for the first two tokens, then eos wins again
    # ignore_eos: eos is not an end token, so min_tokens masks only the stop id.
    s = sampler(eos=frozenset({eos}), stop_token_ids=frozenset({stop}), min_tokens=2, ignore_eos=True)
    assert sample_rows([s], x.clone())[0][0] == eos
    # Without min_tokens nothing is masked (and nothing pays for it).
    s = sampler(eos=frozenset({eos}), stop_token_ids=frozenset({stop}))
    assert not s.adjusts and sample_rows([s], x.clone())[0][0] == eos


def test_seeded_rows_draw_the_same_tokens_whatever_shares_the_batch():
    x = logits(4, seed=5)

    def run(batch_kw, steps=20):
        rows = [sampler(**kw) for kw in batch_kw]
        return [sample_rows(rows, x[:len(rows)].clone())[0] for _ in range(steps)]

    x[2] = x[0]  # the seeded row sees the same logits alone (row 0) and in the batch (row 2)
    alone = [t[0] for t in run([dict(temperature=1.0, seed=42)])]
    mixed = [t[2] for t in run([dict(temperature=0.8, seed=1), dict(), dict(temperature=1.0, seed=42),
                                dict(temperature=2.0, top_k=3, seed=9)])]
    assert alone == mixed
    assert len(set(alone)) > 1  # it samples


def test_draws_follow_the_distribution_and_skip_zero_probability_tokens():
    x = torch.full((1, VOCAB), float("-inf"))
    x[0, :4] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = sampler(temperature=1.0, seed=0)
    n = 20_000
    counts = torch.bincount(torch.tensor([sample_rows([s], x)[0][0] for _ in range(n)]), minlength=VOCAB)
    assert counts[4:].sum() == 0
    freq = counts[:4].double() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.015), freq


def test_logprobs_are_the_raw_float32_log_softmax():
    x = logits(3, seed=13).to(torch.bfloat16)
    rows = [sampler(logprobs=True, top_logprobs=5, temperature=0.7, seed=3, repetition_penalty=1.5),
            sampler(), sampler(logprobs=True)]
    tokens, lps = sample_rows(rows, x)
    ref = torch.log_softmax(x.float(), dim=-1)
    assert lps[1] is None
    for i in (0, 2):
        assert lps[i].token_id == tokens[i]
        assert lps[i].logprob == pytest.approx(float(ref[i, tokens[i]]), abs=1e-6)
    assert lps[2].top == ()
    top_v, top_i = ref[0].topk(5)
    assert [t for t, _ in lps[0].top] == top_i.tolist()
    assert [v for _, v in lps[0].top] == pytest.approx(top_v.tolist(), abs=1e-6)


def test_a_nan_row_fails_alone():
    x = logits(3, seed=2)
    x[1] = float("nan")
    rows = [sampler(temperature=1.0, seed=1), sampler(temperature=1.0, seed=2), sampler(logprobs=True)]
    tokens, lps = sample_rows(rows, x)
    assert isinstance(tokens[1], Exception) and "NaN" in str(tokens[1])
    assert isinstance(tokens[0], int) and tokens[2] == int(x[2].argmax()) and lps[2] is not None


@pytest.mark.parametrize("kw,needle", [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(presence_penalty=math.nan), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-2.01), "frequency_penalty must be in [-2, 2]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=math.inf), "repetition_penalty must be a finite number > 0"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(min_p=-0.1), "min_p must be in [0, 1]"),
    (dict(min_tokens=-1), "min_tokens must be in [0, max_new_tokens (8)]"),
    (dict(min_tokens=9), "min_tokens must be in [0, max_new_tokens (8)]"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs must be in [0, 20]"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs must be in [0, 20]"),
    (dict(top_logprobs=3), "top_logprobs needs logprobs"),
])
def test_out_of_range_controls_are_invalid_argument(kw, needle):
    with pytest.raises(InvalidArgument) as e:
        SamplingParams(max_new_tokens=8, **kw)
    assert needle in str(e.value)


def test_stop_token_ids_outside_the_vocabulary_are_refused():
    p = SamplingParams(max_new_tokens=8, stop_token_ids=frozenset({3, VOCAB + 1}))
    with pytest.raises(InvalidArgument, match=f"stop_token_ids contains {VOCAB + 1}, outside the vocabulary"):
        p.check_vocab(VOCAB)
    SamplingParams(max_new_tokens=8, stop_token_ids=frozenset({VOCAB - 1})).check_vocab(VOCAB)


def test_a_draw_at_the_top_of_the_unit_interval_never_picks_a_zero_probability_token():
    """u x total may round up to total in float32; the last token of nonzero probability is taken then."""
    x = torch.full((1, VOCAB), float("-inf"))
    x[0, 10], x[0, 20] = 0.0, 0.3
    s = sampler(temperature=1.0, seed=0)
    s.draw = lambda: 1.0 - 2.0 ** -30  # rounds to 1.0 in float32
    assert sample_rows([s], x)[0][0] == 20
    s.draw = lambda: 0.0
    assert sample_rows([s], x)[0][0] == 10


@pytest.mark.cuda
def test_on_the_gpu_every_control_matches_the_cpu():
    """Same controls, same seeds, logits on the GPU: the same processed scores and
    tokens (the uniform draws come from CPU generators on either device)."""
    gpu = torch.device("cuda")
    x = logits(4, seed=21)
    kws = [dict(PROMPT=PROMPT, repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2),
           dict(temperature=0.9, top_k=10, top_p=0.9, min_p=0.05, seed=3, logprobs=True, top_logprobs=4),
           dict(min_tokens=3, stop_token_ids=frozenset({int(x[2].argmax())})),
           dict(temperature=1.2, seed=8)]

    def make(device):
        out = []
        for kw in kws:
            kw = dict(kw)
            prompt = kw.pop("PROMPT", ())
            out.append(RowSampler(SamplingParams(max_new_tokens=8, **kw), device, prompt, frozenset()))
        return out

    cpu_rows, gpu_rows = make(CPU), make(gpu)
    for _ in range(4):
        t_cpu, lp_cpu = sample_rows(cpu_rows, x.clone())
        t_gpu, lp_gpu = sample_rows(gpu_rows, x.to(gpu))
        assert t_cpu == t_gpu
        assert lp_gpu[1].logprob == pytest.approx(lp_cpu[1].logprob, abs=1e-5)
        assert [t for t, _ in lp_gpu[1].top] == [t for t, _ in lp_cpu[1].top]
