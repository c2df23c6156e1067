"""The scheduler built directly, without a model: admission order (fair across
tenants), the KV budget in pages, the prefill token budget, deadline and cancel
expiry, and the submission bound max_running + max_waiting."""

from __future__ import annotations

import time

import pytest

from qlora_serve.errors import Cancelled, DeadlineExceeded, QueueFull
from qlora_serve.server.engine.config import EngineConfig
from qlora_serve.server.engine.kv_batch import PagedKVBatch
from qlora_serve.server.engine.request import ErrorEvent, Request, SamplingParams
from qlora_serve.server.engine.scheduler import BASE_SLOT, Row, Scheduler


def _scheduler(**limits) -> Scheduler:
    config = EngineConfig(**limits)
    kv = PagedKVBatch(max_tokens=config.max_kv_tokens)  # page rounding only: no model, no pool
    return Scheduler(config, kv_slots=kv.slots_for, new_row=lambda req, slot: Row(req, None, None, slot))


def _request(rid: str, prompt_len: int = 4, max_new_tokens: int = 4, tenant: str = "", deadline=None) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new_tokens), None,
                   tenant=tenant, deadline=deadline)


def _submit(s: Scheduler, *reqs: Request) -> None:
    for r in reqs:
        s.reserve()
        s.enqueue(r)


def _admitted_ids(s: Scheduler) -> list[str]:
    return [row.request.request_id for row in s.admitted]


def test_admits_in_fair_order_across_tenants_up_to_max_running():
    s = _scheduler(max_running=3)
    _submit(s, _request("a1", tenant="a"), _request("a2", tenant="a"), _request("a3", tenant="a"),
            _request("b1", tenant="b"))
    s.admit()
    # VTC: after a1 is charged its prompt, tenant b (counter lifted to a's) goes before a2.
    assert _admitted_ids(s) == ["a1", "b1", "a2"]
    assert all(row.slot == BASE_SLOT for row in s.admitted)
    assert len(s.waiting) == 1 and s.queued == 1


def test_the_kv_budget_counts_whole_pages_and_waits_for_rows_to_leave():
    # Each row holds prompt + max_new_tokens = 17 tokens = 2 pages of 16 = 32 slots.
    s = _scheduler(max_running=8, max_kv_tokens=64)
    _submit(s, *(_request(f"r{i}", prompt_len=9, max_new_tokens=8) for i in range(3)))
    s.admit()
    assert _admitted_ids(s) == ["r0", "r1"]  # a third would need 96 slots > 64
    s.start_running(s.admitted)
    s.admit()
    assert s.admitted == []  # still full
    s.running[0].done = True
    assert [r.request.request_id for r in s.retire()] == ["r0"]
    s.admit()
    assert _admitted_ids(s) == ["r2"]


def test_one_row_alone_is_admitted_whatever_the_budgets():
    s = _scheduler(max_running=4, max_kv_tokens=16, max_prefill_tokens=2)
    _submit(s, _request("big", prompt_len=8, max_new_tokens=8), _request("next", prompt_len=1, max_new_tokens=1))
    s.admit()
    assert _admitted_ids(s) == ["big"]


def test_the_prefill_token_budget_limits_one_step():
    s = _scheduler(max_running=8, max_prefill_tokens=10)
    _submit(s, *(_request(f"r{i}", prompt_len=4) for i in range(3)))
    s.admit()
    assert _admitted_ids(s) == ["r0", "r1"]  # 12 prompt tokens would exceed 10


def test_submissions_are_bounded_by_max_running_plus_max_waiting():
    s = _scheduler(max_running=2, max_waiting=3)
    _submit(s, *(_request(f"r{i}") for i in range(5)))
    with pytest.raises(QueueFull, match="--max-waiting"):
        s.reserve()
    s.admit()  # two become rows: they still count until released
    assert s.queued == 3 and s.pending()
    with pytest.raises(QueueFull):
        s.reserve()
    s.start_running(s.admitted)
    s.running[0].done = True
    s.retire()
    s.reserve()  # a released row gives its place back


def test_expired_and_cancelled_requests_leave_with_their_status():
    s = _scheduler(max_running=1)
    past = time.monotonic() - 1.0
    running, late, gone, kept = _request("run"), _request("late", deadline=past), _request("gone"), _request("kept")
    _submit(s, running)
    s.admit()
    s.start_running(s.admitted)
    _submit(s, late, gone, kept)
    s.cancel(gone)
    s.cancel(running)
    s.expire()
    assert isinstance(late.events.get_nowait().error, DeadlineExceeded)
    assert isinstance(gone.events.get_nowait().error, Cancelled)
    ev = running.events.get_nowait()
    assert isinstance(ev, ErrorEvent) and isinstance(ev.error, Cancelled) and s.running[0].done
    assert list(s.waiting) == [kept] and s.queued == 1
    assert [r.request for r in s.retire()] == [running]
    s.admit()
    assert _admitted_ids(s) == ["kept"]


def test_a_cancel_matches_the_request_object_not_its_id():
    s = _scheduler()
    first, same_id = _request("dup"), _request("dup")
    _submit(s, first, same_id)
    s.cancel(first)
    s.expire()
    assert list(s.waiting) == [same_id]


def test_stopping_fails_everything_waiting():
    s = _scheduler()
    reqs = [_request(f"r{i}") for i in range(3)]
    _submit(s, *reqs)
    s.fail_waiting(QueueFull("stop"))
    assert all(isinstance(r.events.get_nowait(), ErrorEvent) for r in reqs)
    assert s.queued == 0 and not s.pending() and len(s.waiting) == 0
