"""Per-tenant admission limits: concurrent requests and tokens per minute.

Tokens are prompt tokens + generated tokens. The per-minute limit is a token
bucket of capacity ``tokens_per_minute`` refilled continuously at
``tokens_per_minute / 60`` tokens per second (so a tenant may burst one
minute's worth, then runs at the steady rate).

Usage (one lease per request)::

    with book.acquire(tenant, est_tokens=prompt_len + max_new_tokens) as lease:
        ...                       # generate
        lease.charge(n)           # as tokens are counted (prompt and output)
    # leaving the block releases the concurrency slot and refunds unused reservation

``acquire`` reserves ``est_tokens`` from the bucket so concurrent requests cannot
all pass on the same tokens; ``charge`` records the actual count, the bucket
holding ``max(reserved, charged)`` until release and exactly ``charged`` after.
Actual usage may push the bucket below zero (debt): later requests then wait
until it refills, so no request is refused forever for being large.

Limits may come from the key file (same TOML as `qlora_serve.server.auth`)::

    [default_limits]           # every tenant without its own table
    max_concurrent = 8
    tokens_per_minute = 100000

    [tenants.acme]             # missing fields inherit [default_limits]
    max_concurrent = 4
    tokens_per_minute = 20000  # or "unlimited"

With no ``[default_limits]`` table, tenants are unlimited by default.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping

from .auth import TENANT_RE, KeyFileError, read_toml
from qlora_serve.errors import ResourceExhausted

# No finishing time is known for a concurrency slot; a short, fixed hint.
CONCURRENCY_RETRY_S = 1


@dataclass(frozen=True)
class TenantLimits:
    """Limits of one tenant; None means unlimited."""

    max_concurrent: int | None = None
    """Requests in flight at once (admitted and not yet released)."""
    tokens_per_minute: int | None = None
    """Prompt + generated tokens per minute (token bucket, capacity one minute's worth)."""

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "tokens_per_minute"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None (unlimited), got {v!r}")


class QuotaExceeded(ResourceExhausted):
    """A tenant limit refused a request; attributes for metrics and retry metadata."""

    reason = "quota"  # the qlora_rejections_total label

    def __init__(self, message: str, *, tenant: str, limit_name: str, limit: int, retry_after_s: int):
        super().__init__(message)
        self.tenant = tenant
        self.limit_name = limit_name
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass
class _TenantState:
    limits: TenantLimits
    active: int = 0
    tokens: float = 0.0  # bucket level; may go negative (debt)
    stamp: float = 0.0  # clock time of the last refill


class Lease:
    """One admitted request's hold on its tenant's quota. Release exactly once (idempotent)."""

    def __init__(self, book: "QuotaBook", tenant: str, reserved: int) -> None:
        self._book = book
        self.tenant = tenant
        self.reserved = reserved  # tokens held back from the bucket at admission
        self.charged = 0  # actual tokens recorded
        self.released = False

    def charge(self, n: int) -> None:
        """Record ``n`` more tokens actually used (prompt or output). Allowed after release."""
        if n < 0:
            raise ValueError(f"n must be >= 0 tokens, got {n}")
        self._book._charge(self, n)

    def release(self) -> None:
        """Free the concurrency slot and refund the unused reservation."""
        self._book._release(self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class QuotaBook:
    """Thread-safe per-tenant quota accounting (one lock; every operation is O(1))."""

    def __init__(
        self,
        default_limits: TenantLimits = TenantLimits(),
        per_tenant: Mapping[str, TenantLimits] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_limits = default_limits
        self._per_tenant = dict(per_tenant or {})
        self._clock = clock  # seconds; injectable so tests need not sleep
        self._lock = threading.Lock()
        self._state: dict[str, _TenantState] = {}

    @classmethod
    def from_file(cls, path: str | Path, *, clock: Callable[[], float] = time.monotonic) -> "QuotaBook":
        default, per_tenant = load_limits(path)
        return cls(default, per_tenant, clock=clock)

    def limits_for(self, tenant: str) -> TenantLimits:
        return self._per_tenant.get(tenant, self.default_limits)

    # ---- admission -------------------------------------------------------------------

    def acquire(self, tenant: str, est_tokens: int = 0) -> Lease:
        """Admit one request of about ``est_tokens`` tokens or raise `QuotaExceeded`."""
        if est_tokens < 0:
            raise ValueError(f"est_tokens must be >= 0, got {est_tokens}")
        with self._lock:
            st = self._refilled(tenant)
            lim = st.limits
            if lim.max_concurrent is not None and st.active >= lim.max_concurrent:
                raise QuotaExceeded(
                    f"tenant {tenant!r} has {st.active} requests in flight, its limit "
                    f"max_concurrent={lim.max_concurrent}; retry in {CONCURRENCY_RETRY_S} s "
                    "or when one of them finishes",
                    tenant=tenant, limit_name="max_concurrent", limit=lim.max_concurrent,
                    retry_after_s=CONCURRENCY_RETRY_S,
                )
            reserve = est_tokens
            if lim.tokens_per_minute is not None:
                tpm = lim.tokens_per_minute
                # A request larger than the whole bucket needs a full bucket, not more,
                # so it is admitted eventually (and runs the bucket into debt).
                need = min(est_tokens, tpm)
                if st.tokens < need:
                    retry = max(1, math.ceil((need - st.tokens) / (tpm / 60.0)))
                    raise QuotaExceeded(
                        f"tenant {tenant!r} is over its limit tokens_per_minute={tpm}: this request "
                        f"needs ~{need} tokens, {max(0, int(st.tokens))} available; retry in {retry} s",
                        tenant=tenant, limit_name="tokens_per_minute", limit=tpm, retry_after_s=retry,
                    )
                st.tokens -= reserve
            st.active += 1
            return Lease(self, tenant, reserve)

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            st = self._state.get(tenant)
            return st.active if st else 0

    def tokens_available(self, tenant: str) -> float | None:
        """Current bucket level in tokens (negative = debt); None when unlimited."""
        with self._lock:
            st = self._refilled(tenant)
            return None if st.limits.tokens_per_minute is None else st.tokens

    # ---- internals (lock held by caller where noted) ---------------------------------

    def _refilled(self, tenant: str) -> _TenantState:
        """Tenant state with the bucket refilled up to now. Lock held."""
        now = self._clock()
        st = self._state.get(tenant)
        if st is None:
            lim = self.limits_for(tenant)
            st = _TenantState(lim, tokens=float(lim.tokens_per_minute or 0), stamp=now)
            self._state[tenant] = st
            return st
        tpm = st.limits.tokens_per_minute
        if tpm is not None:
            st.tokens = min(float(tpm), st.tokens + max(0.0, now - st.stamp) * tpm / 60.0)
        st.stamp = now
        return st

    def _charge(self, lease: Lease, n: int) -> None:
        with self._lock:
            st = self._refilled(lease.tenant)
            # The bucket already holds max(reserved, charged); debit only the growth.
            before = max(lease.reserved, lease.charged)
            lease.charged += n
            if st.limits.tokens_per_minute is not None:
                st.tokens -= max(lease.reserved, lease.charged) - before

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            st = self._refilled(lease.tenant)
            st.active -= 1
            if st.limits.tokens_per_minute is not None:
                st.tokens += max(0, lease.reserved - lease.charged)
            lease.reserved = 0  # from now on the bucket holds exactly `charged`


# ---- key-file loading ------------------------------------------------------------------

_LIMIT_FIELDS = ("max_concurrent", "tokens_per_minute")


def _limits_from_table(table: Any, base: TenantLimits, where: str) -> TenantLimits:
    if not isinstance(table, dict):
        raise KeyFileError(f"{where}: must be a table with {list(_LIMIT_FIELDS)}")
    unknown = sorted(set(table) - set(_LIMIT_FIELDS))
    if unknown:
        raise KeyFileError(f"{where}: unknown field(s) {unknown}; allowed: {list(_LIMIT_FIELDS)}")
    values: dict[str, int | None] = {}
    for name, v in table.items():
        values[name] = None if v == "unlimited" else v
    try:
        return replace(base, **values)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{where}: {e}") from None


def parse_limits(doc: Mapping[str, Any], source: str = "key file") -> tuple[TenantLimits, dict[str, TenantLimits]]:
    """``[default_limits]`` and ``[tenants.<name>]`` of a parsed key file."""
    default = TenantLimits()
    if "default_limits" in doc:
        default = _limits_from_table(doc["default_limits"], default, f"{source}: [default_limits]")
    tenants = doc.get("tenants", {})
    if not isinstance(tenants, dict):
        raise KeyFileError(f"{source}: 'tenants' must be tables like [tenants.acme]")
    per_tenant: dict[str, TenantLimits] = {}
    for name, table in tenants.items():
        where = f"{source}: [tenants.{name}]"
        if not TENANT_RE.fullmatch(name):
            raise KeyFileError(f"{where}: tenant name must match {TENANT_RE.pattern}")
        per_tenant[name] = _limits_from_table(table, default, where)
    return default, per_tenant


def load_limits(path: str | Path) -> tuple[TenantLimits, dict[str, TenantLimits]]:
    return parse_limits(read_toml(path), source=f"key file {str(path)!r}")
