"""Helpers for e2e tests with authentication on: a real key file (hashes only,
keys made by `generate_key`) and per-key gRPC metadata."""

from __future__ import annotations

from pathlib import Path

from qlora_serve.server.auth import generate_key, key_stanza


def write_key_file(path: Path, roles: dict[str, str], limits: dict[str, dict] | None = None,
                   default_limits: dict | None = None) -> dict[str, str]:
    """Write a key file with one fresh key per tenant (``roles``: tenant -> role) and
    optional quota tables; returns tenant -> plaintext key."""
    keys, parts = {}, []
    for tenant, role in roles.items():
        plaintext, digest = generate_key()
        keys[tenant] = plaintext
        parts.append(key_stanza(tenant, role, digest))
    if default_limits:
        parts.append("[default_limits]\n" + "".join(f"{k} = {v}\n" for k, v in default_limits.items()))
    for tenant, table in (limits or {}).items():
        parts.append(f"[tenants.{tenant}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()))
    path.write_text("\n".join(parts))
    assert "qls_" not in path.read_text(), "the key file must hold hashes only"
    return keys


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def rejections(server, reason: str, tenant: str) -> float:
    return server.metrics.registry.get_sample_value(
        "qlora_rejections_total", {"reason": reason, "tenant": tenant}) or 0.0
