"""API keys, principals and the gRPC authentication interceptor.

Security model
--------------
Every call carries an API key in gRPC metadata, either

    authorization: Bearer <key>        (preferred)
    x-api-key: <key>

Each key belongs to one tenant and has one role:

* ``client``: may run inference with its tenant's adapters and public adapters
  (owner ``None``), and list exactly those; may write (register, alias, delete)
  only adapters its tenant owns.
* ``admin``: may do everything, for every tenant's adapters and public ones.

Key file
--------
A TOML file that stores only the SHA-256 of each key (lowercase hex of the
UTF-8 bytes), never the key itself, so a leaked file grants nothing::

    [[keys]]
    tenant = "acme"          # [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
    role = "client"          # "client" or "admin"
    sha256 = "9f86d0...0f00a08"  # 64 hex digits

    [[keys]]
    tenant = "ops"
    role = "admin"
    sha256 = "..."

    # Optional per-tenant limits, read by qlora_serve.server.quotas
    [default_limits]
    max_concurrent = 8
    [tenants.acme]
    max_concurrent = 4
    tokens_per_minute = 20000

Create a key with ``qlora-serve keys new --tenant acme --role client``: it
prints the key once and the ``[[keys]]`` stanza to paste. A tenant may have
several keys (rotation: add the new one, deploy, remove the old one).

Keys are random 256-bit tokens (`generate_key`), so a plain SHA-256 is enough:
a slow password hash only protects low-entropy secrets against guessing.

Auth off
--------
With no key file configured, `Authenticator.disabled()` makes every caller
``Principal(tenant="anonymous", role="admin")`` (single-user / local dev: all
RPCs work) and logs a warning that authentication is off.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import grpc

from qlora_serve.errors import InvalidArgument, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

ROLES = ("client", "admin")
ANONYMOUS_TENANT = "anonymous"
KEY_PREFIX = "qls_"  # makes leaked keys recognisable to secret scanners
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KEY_FIELDS = {"tenant", "role", "sha256"}

# Health probes and reflection (`grpcurl list`) must work without a key.
DEFAULT_EXEMPT_METHODS: tuple[str, ...] = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)

_MISSING_MSG = (
    "no API key: send gRPC metadata 'authorization: Bearer <key>' (or 'x-api-key: <key>')"
)
_UNKNOWN_MSG = (
    "unknown API key: check the key you send in 'authorization: Bearer <key>', "
    "or ask an operator for one ('qlora-serve keys new')"
)


class KeyFileError(InvalidArgument):
    """The key file is unreadable or malformed; the message names the entry to fix."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant and its role (``client`` or ``admin``)."""

    tenant: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


ANONYMOUS = Principal(ANONYMOUS_TENANT, "admin")


def hash_key(plaintext: str) -> str:
    """SHA-256 of the key's UTF-8 bytes, lowercase hex (64 chars): what the key file stores."""
    if not isinstance(plaintext, str) or not plaintext:
        raise ValueError("plaintext: an API key must be a non-empty string")
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new random key (256 bits) and its hash: ``(plaintext, sha256_hex)``."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    return plaintext, hash_key(plaintext)


def key_stanza(tenant: str, role: str, sha256: str) -> str:
    """The ``[[keys]]`` TOML block for one key."""
    return f'[[keys]]\ntenant = "{tenant}"\nrole = "{role}"\nsha256 = "{sha256}"\n'


def _check_tenant(tenant: Any, where: str) -> str:
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise KeyFileError(
            f"{where}: tenant must be a string matching {TENANT_RE.pattern}, got {tenant!r}"
        )
    return tenant


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse the key file; errors name the file and say what is wrong."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise KeyFileError(f"key file {str(p)!r} does not exist: pass an existing file") from None
    except tomllib.TOMLDecodeError as e:
        raise KeyFileError(f"key file {str(p)!r} is not valid TOML: {e}") from None


def parse_keys(doc: dict[str, Any], source: str = "key file") -> list[tuple[str, Principal]]:
    """Validate the ``[[keys]]`` entries of a parsed key file: ``[(sha256, Principal)]``."""
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeyFileError(
            f"{source}: no [[keys]] entries; add one with 'qlora-serve keys new --tenant T --role client'"
        )
    seen: dict[str, str] = {}
    out: list[tuple[str, Principal]] = []
    for i, entry in enumerate(entries):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where}: must be a [[keys]] table")
        tenant = _check_tenant(entry.get("tenant"), where)
        where = f"{where} (tenant {tenant!r})"
        unknown = sorted(set(entry) - _KEY_FIELDS)
        if unknown:
            raise KeyFileError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_KEY_FIELDS)}")
        role = entry.get("role")
        if role not in ROLES:
            raise KeyFileError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest.lower()):
            raise KeyFileError(
                f"{where}: sha256 must be 64 hex digits (the SHA-256 of the key, not the key itself)"
            )
        digest = digest.lower()
        if digest in seen:
            raise KeyFileError(f"{where}: same sha256 as {seen[digest]}; each key must be listed once")
        seen[digest] = where
        out.append((digest, Principal(tenant, role)))
    return out


class Authenticator:
    """Maps presented API keys to principals. Immutable after construction: thread-safe."""

    def __init__(self, entries: Iterable[tuple[str, Principal]], *, enabled: bool = True) -> None:
        # Stored as bytes once so each comparison is a plain compare_digest.
        self._entries: tuple[tuple[bytes, Principal], ...] = tuple(
            (d.encode("ascii"), p) for d, p in entries
        )
        self.enabled = enabled

    @classmethod
    def from_file(cls, path: str | Path) -> "Authenticator":
        return cls(parse_keys(read_toml(path), source=f"key file {str(path)!r}"))

    @classmethod
    def disabled(cls) -> "Authenticator":
        """Auth off: every caller is ``ANONYMOUS`` (tenant 'anonymous', role admin). Logs a warning."""
        log.warning(
            "authentication is OFF (no key file configured): every caller is tenant %r with role admin; "
            "configure a key file before exposing this server",
            ANONYMOUS_TENANT,
        )
        return cls((), enabled=False)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The principal for a call's metadata; raises `Unauthenticated` (never echoes the key)."""
        if not self.enabled:
            return ANONYMOUS
        key = _key_from_metadata(metadata or ())
        digest = hash_key(key).encode("ascii")
        found: Principal | None = None
        # Compare against every entry, no early exit: timing says nothing about which matched.
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None:
            raise Unauthenticated(_UNKNOWN_MSG)
        return found


def _key_from_metadata(metadata: Iterable[tuple[str, Any]]) -> str:
    bearer: str | None = None
    api_key: str | None = None
    for k, v in metadata:
        if not isinstance(v, str):  # binary (-bin) metadata never carries a key
            continue
        k = k.lower()
        if k == "authorization" and bearer is None:
            scheme, _, rest = v.strip().partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthenticated(
                    "the 'authorization' metadata must be 'Bearer <key>' (scheme Bearer)"
                )
            bearer = rest.strip()
            if not bearer:
                raise Unauthenticated("the 'authorization' metadata has no key after 'Bearer '")
        elif k == "x-api-key" and api_key is None:
            api_key = v.strip()
    key = bearer or api_key
    if not key:
        raise Unauthenticated(_MISSING_MSG)
    return key


def principal_from_context(context: grpc.ServicerContext, authenticator: Authenticator) -> Principal:
    """For handlers: the caller's principal, re-derived from the call metadata (one SHA-256, cheap).

    The interceptor already rejected bad keys, so this only raises if a method is
    exempt from the interceptor and still asks for a principal.
    """
    return authenticator.authenticate(context.invocation_metadata())


def require_admin(principal: Principal, action: str = "this operation") -> None:
    """Raise `PermissionDenied` unless the principal is an admin."""
    if not principal.is_admin:
        raise PermissionDenied(
            f"{action} needs role 'admin'; tenant {principal.tenant!r} called with a 'client' key: "
            "use an admin key"
        )


def can_read_adapter(principal: Principal, owner: str | None) -> bool:
    """True if the principal may use/list an adapter owned by ``owner`` (None = public)."""
    return owner is None or principal.is_admin or owner == principal.tenant


def check_adapter_access(
    principal: Principal, owner: str | None, *, write: bool = False, adapter: str = "this adapter"
) -> None:
    """Raise `PermissionDenied` unless the principal may use (``write=False``) or change
    (register/alias/delete/load, ``write=True``) an adapter owned by ``owner``.

    Reads: own, public (owner None), or admin. Writes: own or admin; public
    adapters are admin-only. Messages never name another tenant.
    """
    if principal.is_admin or (owner is not None and owner == principal.tenant):
        return
    if not write and owner is None:
        return
    if owner is None:
        raise PermissionDenied(
            f"{adapter} is public: only role 'admin' may change it; tenant {principal.tenant!r} "
            "may change only adapters it owns"
        )
    verb = "change" if write else "use or list"
    raise PermissionDenied(
        f"{adapter} belongs to another tenant: tenant {principal.tenant!r} may {verb} only "
        "its own adapters" + ("" if write else " and public ones")
    )


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid key with UNAUTHENTICATED before the handler runs.

    For the sync ``grpc.server``. Handlers get the principal with
    `principal_from_context`.
    """

    def __init__(
        self, authenticator: Authenticator, exempt_methods: Iterable[str] = DEFAULT_EXEMPT_METHODS
    ) -> None:
        self._auth = authenticator
        self._exempt = frozenset(exempt_methods)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not self._auth.enabled or handler_call_details.method in self._exempt:
            return continuation(handler_call_details)
        try:
            self._auth.authenticate(handler_call_details.invocation_metadata)
        except Unauthenticated as e:
            handler = continuation(handler_call_details)
            if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
                return None
            log.info("rejected call to %s: %s", handler_call_details.method, e)
            return _abort_handler(handler, str(e))
        return continuation(handler_call_details)


# ---- CLI: `qlora-serve keys new --tenant acme --role client` -------------------------------


def add_keys_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``keys`` subcommand; each leaf sets ``func(args) -> int`` (exit code)."""
    keys = subparsers.add_parser("keys", help="create API keys for the key file")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser("new", help="generate a key; prints it once and the [[keys]] stanza")
    new.add_argument("--tenant", required=True, help="tenant the key belongs to")
    new.add_argument("--role", choices=ROLES, default="client", help="client (default) or admin")
    new.set_defaults(func=_cmd_keys_new)


def _cmd_keys_new(args: argparse.Namespace) -> int:
    if not TENANT_RE.fullmatch(args.tenant):
        print(f"--tenant must match {TENANT_RE.pattern}, got {args.tenant!r}")
        return 2
    plaintext, digest = generate_key()
    print(f"API key for tenant {args.tenant!r} (role {args.role}); shown once, store it now:\n")
    print(f"    {plaintext}\n")
    print("Add this to the key file (it holds only the hash):\n")
    print(key_stanza(args.tenant, args.role, digest))
    return 0
