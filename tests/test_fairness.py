"""FairQueue: VTC-style token-counting fairness across tenants."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qlora_serve.errors import ResourceExhausted
from qlora_serve.server.engine.fairness import FairQueue


@dataclass
class Req:
    tenant: str
    n: int
    prompt_tokens: int = 10


def serve(q: FairQueue, pops: int, output_tokens: int = 5) -> list[Req]:
    """Pop like a scheduler would: prompt tokens charged by pop, then output tokens."""
    out = []
    for _ in range(pops):
        r = q.pop()
        if r is None:
            break
        q.charge(r.tenant, output_tokens=output_tokens)
        out.append(r)
    return out


def test_flooding_tenant_does_not_delay_quiet_tenant():
    q: FairQueue[Req] = FairQueue(max_size=1000)
    for i in range(100):
        r = Req("flood", i)
        q.push(r, "flood", prompt_tokens=r.prompt_tokens)
    serve(q, 20)  # flood has been served a lot; its counter is high
    quiet = Req("quiet", 0)
    q.push(quiet, "quiet", prompt_tokens=quiet.prompt_tokens)
    # Lifted to flood's counter, it ties; flood's head arrived first, so quiet is at most 2nd.
    popped = serve(q, 2)
    assert quiet in popped
    assert len(q) == 100 - 20 - 1


def test_quiet_tenant_arriving_with_flood_queued_first():
    q: FairQueue[Req] = FairQueue(max_size=1000)
    for i in range(100):
        q.push(Req("flood", i), "flood", prompt_tokens=10)
    for i in range(3):
        q.push(Req("quiet", i), "quiet", prompt_tokens=10)
    order = [r.tenant for r in serve(q, 6)]
    # Equal costs: the two backlogged tenants alternate instead of flood draining first.
    assert order == ["flood", "quiet", "flood", "quiet", "flood", "quiet"]


def test_counter_lift_prevents_banked_credit():
    q: FairQueue[Req] = FairQueue(max_size=100, input_weight=1.0, output_weight=2.0)
    q.push(Req("a", 0), "a")
    q.push(Req("b", 0), "b")
    q.charge("a", prompt_tokens=100, output_tokens=50)  # a: 200
    q.charge("b", prompt_tokens=300)  # b: 300
    assert q.counter("a") == 200 and q.counter("b") == 300
    q.push(Req("idle", 0), "idle")  # new tenant: lifted to min of backlogged (a)
    assert q.counter("idle") == 200
    # A tenant already waiting is not lifted again by a second push.
    q.charge("idle", output_tokens=1)
    q.push(Req("idle", 1), "idle")
    assert q.counter("idle") == 202
    # A tenant above the floor keeps its (higher) counter.
    q.charge("rich", prompt_tokens=1000)
    q.push(Req("rich", 0), "rich")
    assert q.counter("rich") == 1000


def test_lift_when_queue_empty_uses_last_served():
    q: FairQueue[Req] = FairQueue(max_size=10)
    q.push(Req("a", 0), "a", prompt_tokens=50)
    assert q.pop().tenant == "a"
    assert len(q) == 0
    q.push(Req("b", 0), "b")
    assert q.counter("b") == 50


def test_fifo_within_tenant_and_weighted_order():
    q: FairQueue[Req] = FairQueue(max_size=10)
    for i in range(4):
        q.push(Req("a", i), "a")
    assert [q.pop().n for _ in range(4)] == [0, 1, 2, 3]
    assert q.pop() is None


def test_remove_waiting_item():
    q: FairQueue[Req] = FairQueue(max_size=10)
    r0, r1, r2 = Req("a", 0), Req("a", 1), Req("b", 0)
    q.push(r0, "a")
    q.push(r1, "a")
    q.push(r2, "b")
    twin = Req("a", 1)  # equal but a different object: not queued
    assert not q.remove(twin)
    assert q.remove(r1)
    assert not q.remove(r1)
    assert len(q) == 2 and q.tenants_waiting() == {"a": 1, "b": 1}
    assert q.remove(r2)
    assert q.tenants_waiting() == {"a": 1}
    assert q.pop() is r0 and q.pop() is None and len(q) == 0
    q.push(r1, "a")  # a removed item may be queued again
    assert q.pop() is r1


def test_push_beyond_max_size_is_a_caller_bug_and_changes_nothing():
    # The engine refuses requests at submit (RESOURCE_EXHAUSTED, --max-waiting) before the
    # queue fills, so a push beyond max_size is a programming error, not a client's status.
    q: FairQueue[Req] = FairQueue(max_size=3)
    for i in range(3):
        q.push(Req("a", i), "a")
    with pytest.raises(RuntimeError, match="max_size=3") as e:
        q.push(Req("b", 0), "b")
    assert not isinstance(e.value, ResourceExhausted)
    assert len(q) == 3 and "b" not in q.tenants_waiting()
    q.pop()
    q.push(Req("b", 0), "b")


def test_same_object_cannot_be_queued_twice():
    q: FairQueue[Req] = FairQueue(max_size=3)
    r = Req("a", 0)
    q.push(r, "a")
    with pytest.raises(ValueError, match="already queued"):
        q.push(r, "b")
    assert len(q) == 1


def test_service_shares_converge_under_flood():
    """Over many pops with equal request costs, two backlogged tenants get equal service."""
    q: FairQueue[Req] = FairQueue(max_size=1000)
    for i in range(300):
        q.push(Req("flood", i), "flood", prompt_tokens=10)
    for i in range(50):
        q.push(Req("quiet", i), "quiet", prompt_tokens=10)
    first = [r.tenant for r in serve(q, 100)]
    assert abs(first.count("quiet") - 50) <= 1
