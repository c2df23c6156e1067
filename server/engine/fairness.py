"""Fair waiting queue across tenants, after VTC (Sheng et al., "Fairness in Serving
Large Language Models", OSDI 2024).

Each tenant has a virtual counter of the service it received, in weighted
tokens: ``input_weight * prompt_tokens + output_weight * output_tokens``
(output tokens cost more: each needs its own decode step). ``pop`` serves the
waiting tenant with the smallest counter, FIFO within a tenant. When a tenant
with nothing queued arrives, its counter is lifted to the smallest counter of
the tenants that are waiting, so a tenant that was idle cannot bank credit and
then monopolise the server.

Bound (proved in the VTC paper): between two backlogged tenants the service difference
stays within a small multiple of ``max(input_weight * max_prompt_tokens, output_weight * batch_tokens)``;
in queue terms, an arriving tenant that was lifted to the minimum has its first
item popped after at most one item of each tenant tied at that minimum, provided
pops are charged (a tenant that already used more than the others waits its turn).

Charging: pass ``prompt_tokens`` to `push` and `pop` charges them at admission
(before the next pop, as VTC does); call `charge(tenant, output_tokens=n)` as
tokens are generated. If you do not pass ``prompt_tokens``, charge them
yourself right after `pop`, or one tenant can win several pops in a row.

NOT thread-safe by design: the engine thread owns the queue (servicers hand
requests to the engine, which pushes, pops and charges between steps).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Container
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    seq: int  # global arrival order: breaks ties between equal counters FIFO
    item: T
    prompt_tokens: int


class FairQueue(Generic[T]):
    """Bounded multi-tenant queue: smallest virtual counter first, FIFO per tenant."""

    def __init__(self, max_size: int, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1 (requests), got {max_size}")
        if input_weight < 0 or output_weight < 0:
            raise ValueError("input_weight and output_weight must be >= 0")
        self.max_size = max_size
        self.input_weight = input_weight
        self.output_weight = output_weight
        self._queues: dict[str, deque[_Entry[T]]] = {}  # only tenants with items waiting
        self._counters: dict[str, float] = {}  # weighted tokens served, per tenant ever seen
        self._owner: dict[int, str] = {}  # id(item) -> tenant, for remove()
        self._seq = itertools.count()
        self._len = 0
        self._last_served: str | None = None

    def __len__(self) -> int:
        return self._len

    def tenants_waiting(self) -> dict[str, int]:
        """Tenants with queued items -> number of items waiting."""
        return {t: len(q) for t, q in self._queues.items()}

    def counter(self, tenant: str) -> float:
        """A tenant's virtual counter, in weighted tokens (0 for unknown tenants)."""
        return self._counters.get(tenant, 0.0)

    def push(self, item: T, tenant: str, prompt_tokens: int = 0) -> None:
        """Enqueue ``item``; ``prompt_tokens`` are charged when it is popped.

        The caller bounds the queue (the engine refuses requests beyond --max-waiting
        at submit, RESOURCE_EXHAUSTED): a push beyond ``max_size`` is a bug, RuntimeError.
        """
        if self._len >= self.max_size:
            raise RuntimeError(f"FairQueue overflow: {self._len} items waiting, max_size={self.max_size}; "
                               "the caller must refuse requests before the queue is full")
        if id(item) in self._owner:
            raise ValueError("item is already queued; push each request object once")
        q = self._queues.get(tenant)
        if q is None:
            self._lift(tenant)
            q = self._queues[tenant] = deque()
        q.append(_Entry(next(self._seq), item, prompt_tokens))
        self._owner[id(item)] = tenant
        self._len += 1

    def _lift(self, tenant: str) -> None:
        """VTC counter lift for a tenant arriving with nothing queued."""
        c = self._counters.get(tenant, 0.0)
        if self._queues:
            floor = min(self._counters[t] for t in self._queues)
        elif self._last_served is not None:
            # Nobody waiting: match the tenant served last, so idle time banks no credit.
            floor = self._counters[self._last_served]
        else:
            floor = c
        self._counters[tenant] = max(c, floor)

    def _next_tenant(self) -> str:
        return min(self._queues, key=lambda t: (self._counters[t], self._queues[t][0].seq))

    def peek(self, skip: Container[int] = ()) -> T | None:
        """The item `pop` would return next, left in place (None if empty).

        skip: ids (``id(item)``) of items to pass over, e.g. ones that cannot run
        yet: the result is then the next item in the same order (smallest counter,
        then earliest arrival) among the others; serve it with `take`.
        """
        if not skip:
            return self._queues[self._next_tenant()][0].item if self._queues else None
        best = None
        for tenant, q in self._queues.items():
            entry = next((e for e in q if id(e.item) not in skip), None)
            if entry is not None and (best is None or (self._counters[tenant], entry.seq) < best[0]):
                best = ((self._counters[tenant], entry.seq), entry.item)
        return None if best is None else best[1]

    def __iter__(self):
        """Every waiting item, in no particular order (a snapshot: safe to remove while iterating)."""
        return iter([e.item for q in self._queues.values() for e in q])

    def pop(self) -> T | None:
        """The next item (smallest counter, then earliest arrival), or None if empty."""
        if not self._queues:
            return None
        tenant = self._next_tenant()
        q = self._queues[tenant]
        entry = q.popleft()
        if not q:
            del self._queues[tenant]
        del self._owner[id(entry.item)]
        self._len -= 1
        self._last_served = tenant
        self.charge(tenant, prompt_tokens=entry.prompt_tokens)
        return entry.item

    def take(self, item: T) -> None:
        """Serve a waiting item that `peek(skip=...)` returned, as `pop` serves its
        result: it leaves the queue and its tenant is charged its prompt tokens."""
        tenant = self._owner[id(item)]
        entry = self._unlink(item)
        self._last_served = tenant
        self.charge(tenant, prompt_tokens=entry.prompt_tokens)

    def remove(self, item: T) -> bool:
        """Drop a waiting item (by identity), e.g. cancelled by its client. False if not queued."""
        return self._unlink(item) is not None

    def _unlink(self, item: T) -> _Entry[T] | None:
        tenant = self._owner.pop(id(item), None)
        if tenant is None:
            return None
        q = self._queues[tenant]
        i = next(i for i, e in enumerate(q) if e.item is item)
        entry = q[i]
        del q[i]
        if not q:
            del self._queues[tenant]
        self._len -= 1
        return entry

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add served tokens to a tenant's counter (the scheduler calls this as it serves)."""
        if prompt_tokens < 0 or output_tokens < 0:
            raise ValueError("prompt_tokens and output_tokens must be >= 0")
        self._counters[tenant] = (
            self._counters.get(tenant, 0.0)
            + self.input_weight * prompt_tokens
            + self.output_weight * output_tokens
        )
