"""The loaded server state that every servicer shares, and the request-path
policies they all apply: readiness, authentication, adapter access, quotas."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

from qlora_serve.adapters.records import AdapterRecord
from qlora_serve.adapters.registry import AdapterRegistry
from qlora_serve.server.auth import Authenticator, Principal, check_adapter_access, principal_from_context
from qlora_serve.server.engine.engine import Engine
from qlora_serve.server.engine.request import AdapterHandle, FinalEvent, Request
from qlora_serve.errors import FailedPrecondition, Unavailable
from qlora_serve.server.metrics import Metrics
from qlora_serve.server.quotas import Lease, QuotaBook
from qlora_serve.server.requests import RequestLimits
from qlora_serve.server.status import abort


def unary_rpc(fn):
    """Servicer method wrapper: readiness and authentication first, then
    fn(self, request, context, principal); domain errors become statuses.
    The servicer keeps its Runtime in `self._rt`."""
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            self._rt.require_ready()
            return fn(self, request, context, self._rt.authenticate(context))
        except Exception as exc:
            abort(context, exc)
    return wrapper


def streaming_rpc(fn):
    """`unary_rpc` for handlers that yield (server streaming)."""
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            self._rt.require_ready()
            yield from fn(self, request, context, self._rt.authenticate(context))
        except Exception as exc:
            abort(context, exc)
    return wrapper


def handle_of(record: AdapterRecord) -> AdapterHandle:
    """The engine's view of a registered adapter version (its digest keys the weights)."""
    return AdapterHandle(name=record.name, version=record.version, digest=record.digest, path=str(record.path))


@dataclass
class Runtime:
    """Shared by the servicers. `engine` and `registry` are None until the base has
    loaded; `draining` is set once shutdown starts."""

    metrics: Metrics
    limits: RequestLimits
    auth: Authenticator
    quotas: QuotaBook
    engine: Engine | None = None
    registry: AdapterRegistry | None = None  # or a RemoteRegistry (--registry-address): the same reader methods
    draining: bool = False
    registry_only: bool = False  # a `--role registry` server: no engine, ever
    base_name: str = ""  # the base model's served name (the HTTP API's `model` for "no adapter")
    _leases: dict[int, Lease] = field(default_factory=dict)  # id(Request) -> its quota lease
    _relayed: dict[int, int] = field(default_factory=dict)  # id(Request) -> output tokens handed to its handler
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _drained: bool = False

    # Facts about the loaded base the request path needs.
    @property
    def tokenizer(self):
        return self.engine.base.tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.engine.base.model.config.vocab_size)

    @property
    def max_context(self) -> int:
        return self.engine.base.max_context

    def health(self) -> str:
        """"SERVING" once loaded and not draining, else "NOT_SERVING" (the gRPC health names)."""
        ready = not self.draining and self.registry is not None and (self.engine is not None or self.registry_only)
        return "SERVING" if ready else "NOT_SERVING"

    def load_stats(self) -> dict:
        """A cheap, racy snapshot for routing: running and queued requests, and the
        digests of the adapters resident in device slots ({} before loading)."""
        if self.engine is None:
            return {}
        # The engine's published snapshot: never its live residency tables.
        return {**self.engine.stats(), "resident_digests": sorted(self.engine.snapshot().device_adapters)}

    def model_info(self) -> dict:
        """What GetModelInfo and GET /v1/model_info answer: the base's info (name, context,
        vocabulary, dtype, footprint) and the server's token limits."""
        return {**self.engine.base.info(), "max_new_tokens": self.engine.config.max_new_tokens,
                "max_prompt_tokens": self.limits.max_prompt_tokens}

    def drain(self, grace_s: float = 30.0) -> None:
        """New requests get UNAVAILABLE; in-flight ones finish within grace_s (seconds),
        then the engine stops. Idempotent; handlers may still read the tokenizer after."""
        self.draining = True
        with self._lock:
            engine = None if self._drained else self.engine
            self._drained = self._drained or engine is not None
        if engine is not None:
            engine.shutdown(grace_s)

    def close(self, grace_s: float = 30.0) -> None:
        """`drain`, then close the registry (releases its data_dir lock). Idempotent."""
        self.drain(grace_s)
        if self.registry is not None:
            self.registry.close()

    def require_ready(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if self.registry is None or (self.engine is None and not self.registry_only):
            raise Unavailable("server is still loading the base model; retry in a few seconds (health: NOT_SERVING)")

    def authenticate(self, context) -> Principal:
        return principal_from_context(context, self.auth)

    def authenticate_metadata(self, metadata) -> Principal:
        """The principal for (key, value) request headers; any transport (Unauthenticated if bad)."""
        return self.auth.authenticate(metadata)

    def visible_adapters(self, principal: Principal) -> list[AdapterRecord]:
        """Every adapter version the caller may use, ordered by (name, version)."""
        return self.registry.list(owner=None if principal.is_admin else principal.tenant)

    def resolve_record(self, ref: str, principal: Principal) -> AdapterRecord:
        """name | name@N | name@alias -> the record, if the caller may use it
        (NOT_FOUND when unknown, PERMISSION_DENIED when another tenant's).
        Access is decided on the name alone, before the version or alias is looked
        up: NOT_FOUND for `name@99` would list another tenant's versions and aliases."""
        name = ref.partition("@")[0]
        check_adapter_access(principal, self.registry.owner_of(ref), adapter=f"adapter {name!r}")
        record = self.registry.resolve(ref)
        # Again on the record: the name may have changed hands in between (deleted, re-registered).
        check_adapter_access(principal, record.owner, adapter=f"adapter {name!r}")
        return record

    def resolve_adapter(self, ref: str, principal: Principal) -> AdapterHandle:
        """`resolve_record` for inference: FAILED_PRECONDITION at once for an adapter marked unusable."""
        record = self.resolve_record(ref, principal)
        reason = self.registry.unusable_reason(record.digest)
        if reason is not None:
            raise FailedPrecondition(reason)
        return handle_of(record)

    def admit(self, req: Request, principal: Principal) -> None:
        """Take the tenant's quota, then queue on the engine; on refusal nothing is held."""
        lease = self.quotas.acquire(principal.tenant, est_tokens=len(req.prompt_ids) + req.params.max_new_tokens)
        try:
            self.engine.submit(req)
        except BaseException:
            lease.release()
            raise
        with self._lock:
            self._leases[id(req)] = lease
            self._relayed[id(req)] = 0

    def relayed(self, req: Request, n: int) -> None:
        """The handler received `n` more generated tokens of `req` from the engine."""
        with self._lock:
            if id(req) in self._relayed:
                self._relayed[id(req)] += n

    def finished(self, req: Request | None, final: FinalEvent | None) -> tuple[int, int] | None:
        """Release the request's quota lease, charging its prompt and every token it
        generated: the final count when it finished, else the tokens relayed so far
        (a cancelled, timed-out or failed request pays for what it streamed).
        Returns (prompt tokens, completion tokens) as charged, the one count metrics
        and the access log also use; None when the request never held a lease."""
        if req is None:
            return None
        with self._lock:
            lease = self._leases.pop(id(req), None)
            relayed = self._relayed.pop(id(req), 0)
        if lease is None:
            return None
        usage = len(req.prompt_ids), max(relayed, len(final.token_ids) if final else 0)
        lease.charge(sum(usage))
        lease.release()
        return usage
