"""What a registered adapter version is, and the rules for the names that refer to it.

Adapter names, refs ("name", "name@3", "name@alias"), owners and labels are
validated here, at the edge, before the registry touches SQLite or the store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qlora_serve.errors import InvalidArgument, clip_repr

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_MAX_LABELS = 64
_MAX_LABEL_CHARS = 256


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter version.

    digest: sha256 hex of the stored files (definition in adapters/store.py).
    source: "local" (server path), "upload", "startup" (a --adapter flag).
    base_fingerprint: the base the adapter declares, else the server's base at registration.
    rank: the largest LoRA rank over its modules. alpha: lora_alpha.
    target_modules: module name suffixes, sorted (e.g. ("q_proj", "v_proj")).
    size_bytes: total bytes of the stored files. created_at: unix seconds.
    owner: owning tenant, None = public. path: its directory in the store.
    aliases: the aliases pointing at this version when the record was read, sorted;
    read in the same transaction as the row, so a record never names a state that
    did not exist (not part of equality: aliases move, the version does not).
    """

    name: str
    version: int
    digest: str
    source: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    created_at: float
    owner: str | None
    labels: dict[str, str]
    path: Path
    aliases: tuple[str, ...] = field(default=(), compare=False)

    def __hash__(self) -> int:  # labels is a dict; identity is (name, version, digest)
        return hash((self.name, self.version, self.digest))

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"adapter name {clip_repr(name)} is invalid: use 1-64 characters from letters, digits, '.', '_', '-', "
            f"starting with a letter or digit (no '@' or '/')"
        )
    return name


def parse_ref(ref: object) -> tuple[str, str | None]:
    """Split "name[@selector]" -> (name, selector or None); validates the name."""
    if not isinstance(ref, str) or ref.count("@") > 1:
        raise InvalidArgument(f"adapter reference {clip_repr(ref)} is invalid: use 'name', 'name@3' or 'name@alias'")
    name, _, selector = ref.partition("@")
    validate_name(name)
    if "@" in ref and not (selector.isdigit() or ALIAS_RE.match(selector)):
        raise InvalidArgument(f"adapter reference {clip_repr(ref)} is invalid: after '@' put a version number or an alias name")
    return name, (selector if "@" in ref else None)


def _validate_owner(owner: object) -> str | None:
    if owner is None or owner == "":
        return None
    if not isinstance(owner, str) or len(owner) > _MAX_LABEL_CHARS:
        raise InvalidArgument(f"owner must be a string of at most {_MAX_LABEL_CHARS} characters, got {clip_repr(owner)}")
    return owner


def _validate_labels(labels: object) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping) or len(labels) > _MAX_LABELS:
        raise InvalidArgument(f"labels must be a mapping of at most {_MAX_LABELS} string keys to string values")
    out = {}
    for key, value in labels.items():
        if not (isinstance(key, str) and isinstance(value, str) and 0 < len(key) <= _MAX_LABEL_CHARS and len(value) <= _MAX_LABEL_CHARS):
            raise InvalidArgument(f"label {clip_repr(key)}={clip_repr(value)} is invalid: keys and values are strings of at most {_MAX_LABEL_CHARS} characters, keys non-empty")
        out[key] = value
    return out
