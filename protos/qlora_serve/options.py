"""Config dataclasses whose fields carry their own --help: one field helper and one
generator of argparse flags, shared by `qlora-serve serve` (ServerConfig, EngineConfig,
RequestLimits) and `qlora-serve train` (TrainConfig), so each default is stated once,
in its field.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Collection


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with help text for its --flag. A list default is copied per
    instance. `cli` keys tune the flag: flag (name without dashes, default the field's
    name with `-`), metavar, choices, type (argparse converter), action ("append"),
    off_flag / off_help (a `--no-X` switch that sets the field to None, listed after the
    flag of field `off_after`, default this one); cli=False
    leaves the field off the command line."""
    metadata = {"help": help, **cli}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _scalar_type(cls, name: str):
    """The field's annotation with `| None` removed (hints are strings under
    `from __future__ import annotations`)."""
    t = typing.get_type_hints(cls)[name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.metadata.get("action") == "append" else None


def add_flags(parser, cls, *, overrides: bool = False, help_overrides: dict[str, str] | None = None,
              metavars: dict[str, str] | None = None, only: Collection[str] | None = None) -> None:
    """One --flag per field of `cls` that has help (see `option`).

    overrides=False (serve): each flag defaults to the field's default, booleans are
    `store_true` (`--x/--no-x` when the field defaults to True); a formatter such as
    ArgumentDefaultsHelpFormatter shows the default.
    overrides=True (train): every flag defaults to None so a config file's value is
    replaced only by a flag the user typed; booleans are `--x/--no-x`, lists are
    comma-separated, and the help text says the field's default itself.
    help_overrides / metavars: field name -> a longer help text / a metavar.
    only: the fields to give flags (None = every field with help)."""
    # field name -> the field whose `--no-X` switch is listed right after that field's flag
    off_after = {f.metadata.get("off_after", f.name): f for f in dataclasses.fields(cls) if "off_flag" in f.metadata}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or meta.get("cli", True) is False or (only is not None and f.name not in only):
            continue
        t = _scalar_type(cls, f.name)
        default = _default(f)
        text = (help_overrides or {}).get(f.name, meta["help"])
        if overrides:
            shown = default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f"{text} (default: {shown!r})"
        kw: dict[str, Any] = {"dest": f.name, "help": text.replace("%", "%%")}
        metavar = (metavars or {}).get(f.name, meta.get("metavar"))
        if metavar is None and "flag" in meta and t is not bool:  # argparse would show the field's name
            metavar = meta["flag"].replace("-", "_").upper()
        if metavar is not None:
            kw["metavar"] = metavar
        if t is bool:  # a switch that is on by default needs its --no-x to turn it off
            kw.update(action=argparse.BooleanOptionalAction if overrides or default else "store_true",
                      default=None if overrides else default)
        elif typing.get_origin(t) is list and overrides and meta.get("action") != "append":  # append: a repeated flag
            kw.update(default=None, metavar=metavar or "A,B,...")
        else:
            if typing.get_origin(t) is list:  # action="append": the element type converts
                t = typing.get_args(t)[0]
            kw.update(type=meta.get("type", t), default=None if overrides else default)
            for key in ("choices", "action"):
                if key in meta:
                    kw[key] = meta[key]
        parser.add_argument("--" + meta.get("flag", f.name.replace("_", "-")), **kw)
        off = off_after.get(f.name)
        if off is not None:
            parser.add_argument("--" + off.metadata["off_flag"], action="store_true", dest=f"{off.name}__off",
                                help=off.metadata["off_help"])


def values_from(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The field values the flags of `add_flags(overrides=False)` parsed: a `--no-X`
    switch gives None, and None for a field with a default factory leaves it out (the
    factory decides)."""
    out = {}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.metadata.get("cli", True) is False or not hasattr(args, f.name):
            continue
        value = None if getattr(args, f"{f.name}__off", False) else getattr(args, f.name)
        if value is None and f.default is dataclasses.MISSING:
            continue
        out[f.name] = value
    return out
