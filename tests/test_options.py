"""The one config-to-flags generator (qlora_serve.options), used by `serve` and `train`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from qlora_serve.options import add_flags, option, values_from


@dataclass
class Demo:
    port: int | None = option(9, "a port", off_flag="no-port", off_help="no port")
    name: str = option("x", "a name", choices=["x", "y"])
    grace_s: float = option(1.5, "seconds", flag="grace")
    roots: list[Path] = option([], "a root (repeatable)", flag="root", action="append", metavar="DIR")
    fast: bool = option(False, "go fast")
    tags: list[str] = option(["a"], "tags")


def parse(argv, **kw):
    p = argparse.ArgumentParser()
    add_flags(p, Demo, **kw)
    return p.parse_args(argv)


def test_serve_mode_defaults_are_the_fields():
    assert Demo(**values_from(parse([]), Demo)) == Demo()
    args = parse(["--no-port", "--name", "y", "--grace", "2", "--root", "/a", "--root", "/b", "--fast"])
    cfg = Demo(**values_from(args, Demo))
    assert cfg == Demo(port=None, name="y", grace_s=2.0, roots=[Path("/a"), Path("/b")], fast=True)
    assert Demo().roots is not Demo().roots  # a list default is copied per instance


def test_override_mode_leaves_untyped_flags_none():
    args = parse([], overrides=True)
    assert {k: v for k, v in vars(args).items() if v is not None and not k.endswith("__off")} == {}
    args = parse(["--tags", "a,b", "--no-fast", "--port", "3"], overrides=True)
    assert (args.tags, args.fast, args.port) == ("a,b", False, 3)


def test_help_names_flags_and_defaults_once():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, Demo, help_overrides={"name": "the name"})
    text = p.format_help()
    assert "--grace GRACE " in text and "--root DIR" in text and "the name" in text
    assert text.index("--port") < text.index("--no-port") < text.index("--name")
    assert "(default: 1.5)" in text
